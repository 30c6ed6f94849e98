//! Preference tuning: direct preference optimization (Rafailov et al. 2023) as an objective
//! of the one training loop, on OpenAI's preference fine-tuning format:
//!
//! ```text
//! {"input": {"messages": [...], "tools": [...]?},
//!  "preferred_output": [{"role": "assistant", "content": "..."}],
//!  "non_preferred_output": [{"role": "assistant", "content": "..."}]}
//! ```
//! Each pair is rendered twice with the model's chat template — the input messages followed
//! by one output — and only the output's tokens are scored (the same masking as SFT).
//!
//! * **The reference model** is the base with the adapters switched off (LoRA, QLoRA), or a
//!   copy of the starting weights (full): no second model is loaded for LoRA.
//! * **Reference log-probs** are computed once, before the first step, and cached under a
//!   hash of the base model and the tokenized pairs (`cache_dir/dpo-ref-HASH.json`, and the
//!   run's own `reference_logps.json`): a second run on the same model and file, or a
//!   resume, reads them instead of recomputing (TRL recomputes them every run).
//! * **Losses** with `h` the implicit reward margin: `sigmoid` (DPO, `−log σ(β·h)`), `ipo`
//!   (`(h − 1/2β)²` on per-token mean log-probs, Azar et al. 2023), `simpo` (no reference,
//!   `−log σ(β·(mean logp_c − mean logp_r) − γ)`, Meng et al. 2024).
//! * **Metrics** per step and per evaluation, with TRL's meanings: rewards of chosen and
//!   rejected (`β·(logp − ref logp)`), their margin, pair accuracy (ties count half, so an
//!   untrained policy scores 0.5), and the chosen log-prob. When the chosen log-prob keeps
//!   falling (by more than noise) while the margin grows — the policy pushing both answers down, DPO's known
//!   failure — the evaluation carries a warning.

use std::path::{Path, PathBuf};

use ferrolm_tokenizer::{chat::ChatTemplate, Tokenizer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::checkpoint::TrainState;
use crate::lora::LoraActs;
use crate::model::{Activations, IGNORE};
use crate::run::Event;
use crate::sft::{self, Conversation, Example, LineError};
use crate::trainer::{Evaluation, Policy, StepOut};
use crate::TrainError;

/// Which preference loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    Sigmoid,
    Ipo,
    Simpo,
}

impl std::str::FromStr for DpoLoss {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sigmoid" | "dpo" => Ok(DpoLoss::Sigmoid),
            "ipo" => Ok(DpoLoss::Ipo),
            "simpo" => Ok(DpoLoss::Simpo),
            _ => Err(format!(
                "`{s}` is not a preference loss: use sigmoid, ipo or simpo"
            )),
        }
    }
}

/// DPO's settings (saved in `finetune.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoConfig {
    /// Strength of the pull towards the reference (TRL's and OpenAI's `beta`; 0.1 is usual,
    /// 2.0 for SimPO).
    pub beta: f32,
    pub loss: DpoLoss,
    /// SimPO's target margin γ (in reward units).
    #[serde(default)]
    pub simpo_gamma: f32,
}

// ---- data -------------------------------------------------------------------------------------

/// A validated preference line.
#[derive(Debug, Clone)]
pub struct PrefLine {
    pub line: usize,
    pub input: Vec<Value>,
    pub tools: Option<Value>,
    pub preferred: Value,
    pub non_preferred: Value,
}

/// Parse and validate a preference file; every bad line is reported (up to 100).
pub fn parse_jsonl(text: &str) -> Result<Vec<PrefLine>, Vec<LineError>> {
    sft::parse_lines(
        text,
        |line, n| {
            parse_line(line).map(|(input, tools, preferred, non_preferred)| PrefLine {
                line: n,
                input,
                tools,
                preferred,
                non_preferred,
            })
        },
        "the file has no preference pairs: one JSON object per line, {\"input\": {\"messages\": [...]}, \"preferred_output\": [...], \"non_preferred_output\": [...]}",
    )
}

type Parsed = (Vec<Value>, Option<Value>, Value, Value);

fn parse_line(line: &str) -> Result<Parsed, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let obj = v.as_object().ok_or(
        "each line must be a JSON object with `input`, `preferred_output` and `non_preferred_output`",
    )?;
    if obj.contains_key("messages") && !obj.contains_key("input") {
        return Err("this is a supervised (chat) line, not a preference pair: a preference line has `input`, `preferred_output` and `non_preferred_output` (or fine-tune with --method sft)".into());
    }
    let input = obj
        .get("input")
        .and_then(Value::as_object)
        .ok_or("missing `input` (an object with a `messages` array)")?;
    let messages = input
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("`input` has no `messages` array")?
        .clone();
    if messages.is_empty() {
        return Err("`input.messages` is empty".into());
    }
    sft::check_messages(&messages)?;
    if messages.last().and_then(|m| m.get("role")) == Some(&json!("assistant")) {
        return Err("`input.messages` ends with an assistant message: the input is the conversation up to the reply being compared".into());
    }
    let output = |key: &str| -> Result<Value, String> {
        let arr = obj
            .get(key)
            .ok_or_else(|| format!("missing `{key}` (a list with one assistant message)"))?
            .as_array()
            .ok_or_else(|| format!("`{key}` must be a list with one assistant message"))?;
        match arr.as_slice() {
            [m] => {
                let role = m.get("role").and_then(Value::as_str).unwrap_or("");
                if role != "assistant" {
                    return Err(format!(
                        "`{key}` has a `{role}` message: outputs must be assistant messages"
                    ));
                }
                sft::check_messages(std::slice::from_ref(m)).map_err(|e| format!("`{key}`: {e}"))?;
                Ok(m.clone())
            }
            [] => Err(format!("`{key}` is empty: it needs one assistant message")),
            _ => Err(format!(
                "`{key}` has {} messages: only the final assistant turn is compared, so give exactly one",
                arr.len()
            )),
        }
    };
    let preferred = output("preferred_output")?;
    let non_preferred = output("non_preferred_output")?;
    if preferred == non_preferred {
        return Err(
            "`preferred_output` and `non_preferred_output` are identical: a pair must differ"
                .into(),
        );
    }
    Ok((
        messages,
        input.get("tools").cloned(),
        preferred,
        non_preferred,
    ))
}

/// A tokenized pair: the same input with each output.
#[derive(Debug, Clone)]
pub struct Pair {
    pub line: usize,
    pub chosen: Example,
    pub rejected: Example,
}

/// Render both conversations of a pair and mark only the output's tokens as scored.
pub fn encode(tok: &Tokenizer, template: &ChatTemplate, p: &PrefLine) -> Result<Pair, String> {
    let conv = |out: &Value| {
        let mut msgs: Vec<Value> = p
            .input
            .iter()
            .map(|m| {
                let mut m = m.clone();
                if m["role"] == "assistant" {
                    m["weight"] = json!(0);
                }
                m
            })
            .collect();
        let mut o = out.clone();
        o["weight"] = json!(1);
        msgs.push(o);
        Conversation {
            line: p.line,
            messages: Value::Array(msgs),
            tools: p.tools.clone(),
        }
    };
    Ok(Pair {
        line: p.line,
        chosen: sft::encode(tok, template, &conv(&p.preferred))?,
        rejected: sft::encode(tok, template, &conv(&p.non_preferred))?,
    })
}

/// Read, validate and tokenize a preference file.
pub fn load_pairs(
    path: &Path,
    tok: &Tokenizer,
    template: &ChatTemplate,
) -> Result<Vec<Pair>, TrainError> {
    let text = crate::data::read_corpus(path)?;
    let lines = parse_jsonl(&text).map_err(|e| crate::finetune::data_error(path, &e))?;
    lines
        .iter()
        .map(|l| {
            encode(tok, template, l).map_err(|reason| {
                crate::finetune::data_error(
                    path,
                    &[LineError {
                        line: l.line,
                        reason,
                    }],
                )
            })
        })
        .collect()
}

/// Refuse pairs whose outputs fall entirely past `ctx` tokens: they would carry no signal.
pub fn check_fit(path: &Path, pairs: &[Pair], ctx: usize) -> Result<(), TrainError> {
    for p in pairs {
        for ex in [&p.chosen, &p.rejected] {
            if !ex.trained.iter().take(ctx + 1).skip(1).any(|&t| t) {
                return Err(crate::finetune::data_error(
                    path,
                    &[LineError {
                        line: p.line,
                        reason: format!(
                            "the input takes all of the {ctx} tokens allowed, so no output token is scored: raise --max-len or shorten the input"
                        ),
                    }],
                ));
            }
        }
    }
    Ok(())
}

// ---- the objective ----------------------------------------------------------------------------

/// Per sequence: summed log-prob of its scored tokens, and how many there are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SeqLogp {
    pub sum: f32,
    pub len: u32,
}

impl SeqLogp {
    fn mean(self) -> f64 {
        f64::from(self.sum) / f64::from(self.len.max(1))
    }
}

/// One pair's loss, the gradient of the loss w.r.t. each sequence's summed log-prob, and the
/// rewards reported.
struct PairLoss {
    loss: f64,
    d_chosen: f64,
    d_rejected: f64,
    reward_chosen: f64,
    reward_rejected: f64,
}

/// `log(1 + eˣ)`, the loss `−log σ(−x)` of a pair whose margin is `−x`.
pub(crate) fn softplus(x: f64) -> f64 {
    if x > 30.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

pub(crate) fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn pair_loss(cfg: &DpoConfig, c: SeqLogp, r: SeqLogp, rc: SeqLogp, rr: SeqLogp) -> PairLoss {
    let beta = f64::from(cfg.beta);
    match cfg.loss {
        DpoLoss::Sigmoid => {
            let (wc, wr) = (
                beta * f64::from(c.sum - rc.sum),
                beta * f64::from(r.sum - rr.sum),
            );
            let h = wc - wr;
            let dh = -sigmoid(-h);
            PairLoss {
                loss: softplus(-h),
                d_chosen: beta * dh,
                d_rejected: -beta * dh,
                reward_chosen: wc,
                reward_rejected: wr,
            }
        }
        DpoLoss::Ipo => {
            let (lc, lr) = (c.mean() - rc.mean(), r.mean() - rr.mean());
            let h = lc - lr;
            let dh = 2.0 * (h - 1.0 / (2.0 * beta));
            PairLoss {
                loss: (h - 1.0 / (2.0 * beta)).powi(2),
                d_chosen: dh / f64::from(c.len.max(1)),
                d_rejected: -dh / f64::from(r.len.max(1)),
                reward_chosen: beta * lc,
                reward_rejected: beta * lr,
            }
        }
        DpoLoss::Simpo => {
            let (wc, wr) = (beta * c.mean(), beta * r.mean());
            let h = wc - wr - f64::from(cfg.simpo_gamma);
            let dh = -sigmoid(-h);
            PairLoss {
                loss: softplus(-h),
                d_chosen: beta * dh / f64::from(c.len.max(1)),
                d_rejected: -beta * dh / f64::from(r.len.max(1)),
                reward_chosen: wc,
                reward_rejected: wr,
            }
        }
    }
}

/// A pair's share of the pair accuracy: 1 when the preferred answer scores higher, a half
/// for a tie (so an untrained model scores 0.5), 0 otherwise.
pub fn pair_credit(chosen: f64, rejected: f64) -> f64 {
    match chosen.partial_cmp(&rejected) {
        Some(std::cmp::Ordering::Greater) => 1.0,
        Some(std::cmp::Ordering::Equal) => 0.5,
        _ => 0.0,
    }
}

/// Sums of pair figures, for means.
#[derive(Default)]
struct Tally {
    n: f64,
    loss: f64,
    reward_chosen: f64,
    reward_rejected: f64,
    correct: f64,
    logps_chosen: f64,
    logps_rejected: f64,
}

impl Tally {
    fn add(&mut self, p: &PairLoss, c: SeqLogp, r: SeqLogp) {
        self.n += 1.0;
        self.loss += p.loss;
        self.reward_chosen += p.reward_chosen;
        self.reward_rejected += p.reward_rejected;
        self.correct += pair_credit(p.reward_chosen, p.reward_rejected);
        self.logps_chosen += f64::from(c.sum);
        self.logps_rejected += f64::from(r.sum);
    }

    fn loss(&self) -> f32 {
        (self.loss / self.n.max(1.0)) as f32
    }

    fn metrics(&self) -> Map<String, Value> {
        let n = self.n.max(1.0);
        let mut m = Map::new();
        let (c, r) = (self.reward_chosen / n, self.reward_rejected / n);
        m.insert("rewards_chosen".into(), json!(c));
        m.insert("rewards_rejected".into(), json!(r));
        m.insert("reward_margin".into(), json!(c - r));
        m.insert("pair_accuracy".into(), json!(self.correct / n));
        m.insert("logps_chosen".into(), json!(self.logps_chosen / n));
        m.insert("logps_rejected".into(), json!(self.logps_rejected / n));
        m
    }
}

struct Forwarded {
    logps: Vec<[SeqLogp; 2]>,
    lse: Vec<f32>,
    targets: Vec<u32>,
}

/// The DPO objective: pairs, their reference log-probs, and scratch for `2 × batch` rows.
pub struct Dpo {
    pub cfg: DpoConfig,
    pub train: Vec<Pair>,
    pub val: Vec<Pair>,
    /// Reference log-probs, `[chosen, rejected]` per pair (unused by SimPO).
    pub ref_train: Vec<[SeqLogp; 2]>,
    pub ref_val: Vec<[SeqLogp; 2]>,
    pub batch: usize,
    pub ctx: usize,
    pub pad: u32,
    pub acts: Activations,
    pub lacts: LoraActs,
    /// Step figures since the last evaluation (for the warning without a validation set).
    since_eval: Tally,
    /// (chosen log-prob, margin) at each evaluation of this process.
    history: Vec<(f64, f64)>,
}

impl Dpo {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: DpoConfig,
        train: Vec<Pair>,
        val: Vec<Pair>,
        refs: (Vec<[SeqLogp; 2]>, Vec<[SeqLogp; 2]>),
        batch: usize,
        ctx: usize,
        pad: u32,
        scratch: (Activations, LoraActs),
    ) -> Self {
        Dpo {
            cfg,
            train,
            val,
            ref_train: refs.0,
            ref_val: refs.1,
            batch,
            ctx,
            pad,
            acts: scratch.0,
            lacts: scratch.1,
            since_eval: Tally::default(),
            history: Vec::new(),
        }
    }

    /// Forward `pairs` (chosen and rejected rows interleaved): each sequence's log-prob, each
    /// row's log-sum-exp, and the targets. The logits are computed at scored positions only
    /// and never held whole.
    fn forward(&mut self, policy: &Policy, params: &[f32], pairs: &[&Pair]) -> Forwarded {
        let (inputs, targets) = rows(pairs, self.batch, self.ctx, self.pad);
        self.acts.set_scored(&inputs, &targets);
        let (logp, lse) =
            policy.forward_logprobs(params, &mut self.acts, &mut self.lacts, &targets);
        Forwarded {
            logps: seq_logps(&logp, &targets, pairs.len(), self.ctx),
            lse,
            targets,
        }
    }

    pub(crate) fn accumulate(
        &mut self,
        policy: &Policy,
        params: &[f32],
        grads: &mut [f32],
        state: &mut TrainState,
        grad_accum: usize,
    ) -> StepOut {
        let mut sb = state.batcher.examples();
        let mut tally = Tally::default();
        for _ in 0..grad_accum {
            let idx: Vec<usize> = (0..self.batch).map(|_| sb.take(self.train.len())).collect();
            let train = std::mem::take(&mut self.train);
            let pairs: Vec<&Pair> = idx.iter().map(|&i| &train[i]).collect();
            let Forwarded {
                logps,
                lse,
                targets,
            } = self.forward(policy, params, &pairs);
            // d(mean loss over the step's pairs)/d(logits): each row's weight is
            // −dL/d(its sequence's log-prob), spread over its scored tokens by the CE gradient.
            let scale = 1.0 / (grad_accum * self.batch) as f64;
            let mut w = vec![0f32; self.batch * 2 * self.ctx];
            for (k, &i) in idx.iter().enumerate() {
                let [c, r] = logps[k];
                let [rc, rr] = self.ref_train[i];
                let p = pair_loss(&self.cfg, c, r, rc, rr);
                tally.add(&p, c, r);
                let (wc, wr) = ((-p.d_chosen * scale) as f32, (-p.d_rejected * scale) as f32);
                w[2 * k * self.ctx..][..self.ctx].fill(wc);
                w[(2 * k + 1) * self.ctx..][..self.ctx].fill(wr);
            }
            policy.backward_logprobs(
                params,
                grads,
                &mut self.acts,
                &mut self.lacts,
                &targets,
                &lse,
                &w,
            );
            state.tokens_seen += targets.iter().filter(|&&t| t != IGNORE).count() as u64;
            self.train = train;
        }
        state.batcher.advance_to(sb);
        self.since_eval.n += tally.n;
        self.since_eval.logps_chosen += tally.logps_chosen;
        self.since_eval.reward_chosen += tally.reward_chosen;
        self.since_eval.reward_rejected += tally.reward_rejected;
        StepOut {
            loss: tally.loss(),
            tokens: (2 * self.batch * self.ctx * grad_accum) as u64,
            metrics: tally.metrics(),
        }
    }

    pub(crate) fn evaluate(&mut self, policy: &Policy, params: &[f32]) -> Evaluation {
        let mut tally = Tally::default();
        let val = std::mem::take(&mut self.val);
        for (chunk, refs) in val
            .chunks(self.batch)
            .zip(self.ref_val.clone().chunks(self.batch))
        {
            let pairs: Vec<&Pair> = chunk.iter().collect();
            let logps = self.forward(policy, params, &pairs).logps;
            for (k, [rc, rr]) in refs.iter().enumerate() {
                let [c, r] = logps[k];
                tally.add(&pair_loss(&self.cfg, c, r, *rc, *rr), c, r);
            }
        }
        self.val = val;
        let (metrics, val_loss) = if tally.n > 0.0 {
            (tally.metrics(), tally.loss())
        } else {
            (Map::new(), f32::NAN)
        };
        // The watch uses the validation figures, or the steps' since the last evaluation.
        let watched = if tally.n > 0.0 {
            Some(&tally)
        } else {
            Some(&self.since_eval).filter(|t| t.n > 0.0)
        };
        if let Some(t) = watched {
            let n = t.n.max(1.0);
            self.history.push((
                t.logps_chosen / n,
                (t.reward_chosen - t.reward_rejected) / n,
            ));
        }
        self.since_eval = Tally::default();
        Evaluation {
            train_loss: None,
            val_loss,
            sample: String::new(),
            token_accuracy: None,
            metrics,
            warning: falling_chosen(&self.history),
        }
    }
}

/// DPO's known failure: over the last three evaluations the chosen answers' log-prob fell at
/// each one (by half a nat or more in all) while the margin grew — the policy is lowering both answers, the preferred one
/// too, and the margin comes from lowering the rejected one faster.
fn falling_chosen(history: &[(f64, f64)]) -> Option<String> {
    let [a, b, c] = history.get(history.len().checked_sub(3)?..)? else {
        return None;
    };
    // A fall within noise (a tenth of a nat on a 150-token answer) is not a trend: it must be
    // at least half a nat, and half a percent of the log-prob.
    let fell = a.0 - c.0 >= 0.5_f64.max(0.005 * a.0.abs());
    (fell && c.0 < b.0 && b.0 < a.0 && c.1 > b.1 && b.1 > a.1).then(|| {
        format!(
            "the preferred answers' log-prob fell from {:.2} to {:.2} over the last 3 evaluations while the reward margin grew from {:.3} to {:.3}: the policy is pushing both answers down (a known DPO failure); try a larger --beta, a lower --lr, fewer epochs, or --dpo-loss ipo",
            a.0, c.0, a.1, c.1
        )
    })
}

/// Rows for `pairs`, chosen and rejected interleaved, padded to `batch` pairs with unscored
/// copies of the last one.
fn rows(pairs: &[&Pair], batch: usize, ctx: usize, pad: u32) -> (Vec<u32>, Vec<u32>) {
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    for k in 0..batch {
        let p = pairs[k.min(pairs.len() - 1)];
        for ex in [&p.chosen, &p.rejected] {
            sft::row(ex, ctx, pad, &mut inputs, &mut targets);
            if k >= pairs.len() {
                let n = targets.len();
                targets[n - ctx..].fill(IGNORE);
            }
        }
    }
    (inputs, targets)
}

/// Sum the token log-probs of each of the first `n` pairs' two rows.
fn seq_logps(logp: &[f32], targets: &[u32], n: usize, ctx: usize) -> Vec<[SeqLogp; 2]> {
    let row = |r: usize| {
        let mut s = SeqLogp::default();
        let mut sum = 0f64;
        for (lp, &t) in logp[r * ctx..][..ctx]
            .iter()
            .zip(&targets[r * ctx..][..ctx])
        {
            if t != IGNORE {
                sum += f64::from(*lp);
                s.len += 1;
            }
        }
        s.sum = sum as f32;
        s
    };
    (0..n).map(|k| [row(2 * k), row(2 * k + 1)]).collect()
}

// ---- reference log-probs ----------------------------------------------------------------------

/// The reference model's log-probs of every pair: read from the run's `reference_logps.json`
/// or the cache, or computed (and written to both).
#[allow(clippy::too_many_arguments)]
pub(crate) fn reference_logps(
    policy: &Policy,
    base: &Path,
    sets: [&[Pair]; 2],
    batch: usize,
    ctx: usize,
    pad: u32,
    run_dir: &Path,
    cache_dir: Option<&Path>,
    on: &mut dyn FnMut(Event),
) -> Result<[Vec<[SeqLogp; 2]>; 2], TrainError> {
    let key = cache_key(base, &sets, ctx)?;
    let in_run = run_dir.join("reference_logps.json");
    let cached = cache_dir.map(|d| d.join(format!("dpo-ref-{key}.json")));
    for path in std::iter::once(&in_run).chain(cached.as_ref()) {
        if let Some(found) = read_refs(path, &key, &sets) {
            if path != &in_run {
                write_refs(&in_run, &key, &found)?;
            }
            on(Event::Info {
                message: &format!("reference log-probs: read from {}", path.display()),
            });
            return Ok(found);
        }
    }
    let started = std::time::Instant::now();
    let (mut acts, _) = policy.scratch(2 * batch, ctx);
    let mut out: [Vec<[SeqLogp; 2]>; 2] = [Vec::new(), Vec::new()];
    for (set, dst) in sets.iter().zip(out.iter_mut()) {
        for chunk in set.chunks(batch) {
            let pairs: Vec<&Pair> = chunk.iter().collect();
            let (inputs, targets) = rows(&pairs, batch, ctx, pad);
            // batch 2×batch rows: one row per sequence
            acts.set_scored(&inputs, &targets);
            let Some((logp, _)) = policy.reference_logprobs(&mut acts, &targets) else {
                // No reference kept (SimPO on a full run needs none): zeros.
                dst.extend(std::iter::repeat_n([SeqLogp::default(); 2], chunk.len()));
                continue;
            };
            dst.extend(seq_logps(&logp, &targets, chunk.len(), ctx));
        }
    }
    on(Event::Info {
        message: &format!(
            "reference log-probs: computed for {} pairs in {:.1} s (cached under key {key})",
            sets[0].len() + sets[1].len(),
            started.elapsed().as_secs_f64()
        ),
    });
    write_refs(&in_run, &key, &out)?;
    if let Some(p) = &cached {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(TrainError::io(d))?;
        }
        write_refs(p, &key, &out)?;
    }
    Ok(out)
}

#[derive(Serialize, Deserialize)]
struct RefFile {
    key: String,
    train: Vec<[SeqLogp; 2]>,
    val: Vec<[SeqLogp; 2]>,
}

fn read_refs(path: &Path, key: &str, sets: &[&[Pair]; 2]) -> Option<[Vec<[SeqLogp; 2]>; 2]> {
    let text = std::fs::read_to_string(path).ok()?;
    let f: RefFile = serde_json::from_str(&text).ok()?;
    (f.key == key && f.train.len() == sets[0].len() && f.val.len() == sets[1].len())
        .then_some([f.train, f.val])
}

fn write_refs(path: &Path, key: &str, refs: &[Vec<[SeqLogp; 2]>; 2]) -> Result<(), TrainError> {
    let f = RefFile {
        key: key.to_owned(),
        train: refs[0].clone(),
        val: refs[1].clone(),
    };
    crate::run::write_json(path, &f)
}

/// sha256 over the base model's bytes (a GGUF file, or a run's config and latest weights)
/// and the tokenized pairs as scored at `ctx`: the same model and file give the same key
/// whatever their paths; another template, tokenizer or `--max-len` gives another.
fn cache_key(base: &Path, sets: &[&[Pair]; 2], ctx: usize) -> Result<String, TrainError> {
    let mut h = Sha256::new();
    h.update(b"ferrolm dpo reference v1\0");
    let files: Vec<PathBuf> = if base.is_dir() {
        let mut v = vec![base.join("config.json")];
        if let Some(ck) = crate::checkpoint::latest(base)? {
            v.push(ck.join("model.safetensors"));
        }
        v
    } else {
        vec![base.to_owned()]
    };
    for f in files {
        let mut file = std::fs::File::open(&f).map_err(TrainError::io(&f))?;
        std::io::copy(&mut file, &mut h).map_err(TrainError::io(&f))?;
    }
    h.update((ctx as u64).to_le_bytes());
    for set in sets {
        h.update((set.len() as u64).to_le_bytes());
        for p in set.iter() {
            for ex in [&p.chosen, &p.rejected] {
                h.update((ex.ids.len() as u64).to_le_bytes());
                for (&id, &t) in ex.ids.iter().zip(&ex.trained) {
                    h.update(id.to_le_bytes());
                    h.update([u8::from(t)]);
                }
            }
        }
    }
    Ok(h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn s(sum: f32, len: u32) -> SeqLogp {
        SeqLogp { sum, len }
    }

    #[test]
    fn bad_preference_lines_are_reported_by_number() {
        let ok = r#"{"input": {"messages": [{"role": "user", "content": "hi"}]}, "preferred_output": [{"role": "assistant", "content": "Hello!"}], "non_preferred_output": [{"role": "assistant", "content": "go away"}]}"#;
        let text = [
            ok,
            r#"{"input": {"messages": [{"role": "user", "content": "hi"}]}, "non_preferred_output": [{"role": "assistant", "content": "x"}]}"#,
            r#"{"input": {"messages": [{"role": "user", "content": "hi"}]}, "preferred_output": [{"role": "assistant", "content": "x"}]}"#,
            r#"{"input": {"messages": [{"role": "user", "content": "hi"}]}, "preferred_output": [{"role": "assistant", "content": "x"}], "non_preferred_output": [{"role": "assistant", "content": "x"}]}"#,
            r#"{"input": {"messages": [{"role": "user", "content": "hi"}]}, "preferred_output": [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}], "non_preferred_output": [{"role": "assistant", "content": "z"}]}"#,
            r#"{"input": {"messages": [{"role": "user", "content": "hi"}]}, "preferred_output": [{"role": "user", "content": "x"}], "non_preferred_output": [{"role": "assistant", "content": "z"}]}"#,
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}"#,
            "nope",
        ]
        .join("\n");
        let errs = parse_jsonl(&text).unwrap_err();
        let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.reason.as_str())).collect();
        assert_eq!(got.len(), 7, "{got:?}");
        assert!(got[0].0 == 2 && got[0].1.contains("missing `preferred_output`"));
        assert!(got[1].0 == 3 && got[1].1.contains("missing `non_preferred_output`"));
        assert!(got[2].0 == 4 && got[2].1.contains("identical"));
        assert!(got[3].0 == 5 && got[3].1.contains("only the final assistant turn"));
        assert!(got[4].0 == 6 && got[4].1.contains("`user` message"));
        assert!(got[5].0 == 7 && got[5].1.contains("supervised"));
        assert!(got[6].0 == 8 && got[6].1.contains("not valid JSON"));
        assert!(parse_jsonl(ok).is_ok());
    }

    #[test]
    fn losses_match_their_formulas_and_finite_differences() {
        let (c, r, rc, rr) = (s(-10.0, 4), s(-12.0, 5), s(-11.0, 4), s(-11.5, 5));
        for loss in [DpoLoss::Sigmoid, DpoLoss::Ipo, DpoLoss::Simpo] {
            let cfg = DpoConfig {
                beta: 0.3,
                loss,
                simpo_gamma: 0.2,
            };
            let p = pair_loss(&cfg, c, r, rc, rr);
            // a power of two: the perturbed f32 sums are exact
            let eps = 1.0 / 128.0;
            let at = |dc: f32, dr: f32| {
                pair_loss(&cfg, s(c.sum + dc, c.len), s(r.sum + dr, r.len), rc, rr).loss
            };
            let fd_c = (at(eps, 0.0) - at(-eps, 0.0)) / (2.0 * f64::from(eps));
            let fd_r = (at(0.0, eps) - at(0.0, -eps)) / (2.0 * f64::from(eps));
            assert!(
                (fd_c - p.d_chosen).abs() < 1e-4,
                "{loss:?} {fd_c} {}",
                p.d_chosen
            );
            assert!(
                (fd_r - p.d_rejected).abs() < 1e-4,
                "{loss:?} {fd_r} {}",
                p.d_rejected
            );
        }
        // DPO's sigmoid loss at the reference is log 2, and the rewards are zero.
        let cfg = DpoConfig {
            beta: 0.1,
            loss: DpoLoss::Sigmoid,
            simpo_gamma: 0.0,
        };
        let p = pair_loss(&cfg, c, r, c, r);
        assert!((p.loss - 2f64.ln()).abs() < 1e-12);
        assert_eq!((p.reward_chosen, p.reward_rejected), (0.0, 0.0));
        // -log σ(β((−10+11) − (−12+11.5))) = softplus(−0.1·1.5)
        let p = pair_loss(&cfg, c, r, rc, rr);
        assert!((p.loss - softplus(-0.15)).abs() < 1e-6);
    }

    #[test]
    fn the_warning_needs_three_evaluations_of_falling_chosen_and_growing_margin() {
        assert!(falling_chosen(&[(-10.0, 0.1), (-11.0, 0.2)]).is_none());
        assert!(falling_chosen(&[(-10.0, 0.1), (-11.0, 0.2), (-12.0, 0.3)]).is_some());
        assert!(falling_chosen(&[(-10.0, 0.1), (-11.0, 0.2), (-10.5, 0.3)]).is_none());
        assert!(falling_chosen(&[(-10.0, 0.1), (-11.0, 0.3), (-12.0, 0.2)]).is_none());
        // a fall of 0.13 nats on a 149-nat answer is noise
        assert!(falling_chosen(&[(-148.93, 0.03), (-148.95, 0.08), (-149.06, 0.11)]).is_none());
    }
}
