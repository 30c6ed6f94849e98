//! Knowledge distillation (Hinton et al. 2015) as an objective of the one training loop: a
//! student learns a teacher's replies. The data is chat JSONL where each line is a prompt
//! and the teacher's reply as the last assistant message, the file `ferrolm distill` writes
//! from a teacher and `ferrolm data export --stored [--with-logprobs]` writes from stored
//! traffic:
//!
//! ```text
//! {"messages": [..., {"role": "assistant", "content": "<the teacher's reply>"}],
//!  "logprobs": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]?,
//!  "label": "<a ground-truth reply>"?}
//! ```
//! * **sequence-level**: cross-entropy on the teacher's reply tokens (SFT on its outputs).
//! * **token-level**: KL(teacher ‖ student) at every reply position. The teacher's
//!   distribution is its full softmax when the teacher is a local model with the student's
//!   vocabulary (its own forward on the same rows), else its top-k log-probs from the line,
//!   renormalized over those k tokens; the reply is then the teacher's own tokens (a sampled
//!   reply need not be split as the tokenizer would split its text).
//! * `alpha` mixes in the ground truth: loss = (1 − α)·teacher + α·CE(label), each the mean
//!   over its own scored tokens. A line's label rides in the same batch as its teacher row.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ferrolm_tokenizer::{chat::ChatTemplate, Tokenizer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::checkpoint::TrainState;
use crate::lora::LoraActs;
use crate::model::{self, Activations, Layout, ModelConfig, Weights, IGNORE};
use crate::ops::{self, Dist};
use crate::sft::{self, Conversation, Example, LineError};
use crate::trainer::{argmax, Evaluation, Policy, StepOut};
use crate::TrainError;

/// What the student learns from the teacher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistillMode {
    /// Cross-entropy on the teacher's sampled reply.
    #[default]
    Sequence,
    /// KL divergence to the teacher's distribution at each reply token.
    Token,
}

impl std::str::FromStr for DistillMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sequence" | "seq" => Ok(DistillMode::Sequence),
            "token" => Ok(DistillMode::Token),
            _ => Err(format!(
                "`{s}` is not a distillation mode: use sequence or token"
            )),
        }
    }
}

/// Distillation's settings (saved in `finetune.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    pub mode: DistillMode,
    /// Weight of the ground-truth labels against the teacher, in [0, 1].
    #[serde(default)]
    pub alpha: f32,
    /// Token-level: a local teacher (GGUF or run) with the student's vocabulary, whose full
    /// distribution is computed on the fly; none: the lines' top-k log-probs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<PathBuf>,
}

// ---- data -------------------------------------------------------------------------------------

/// A teacher's distribution over one token: some tokens' probabilities, summing to 1.
pub type TokenDist = Box<[(u32, f32)]>;

/// A teacher line, tokenized.
#[derive(Debug, Clone)]
pub struct Taught {
    /// The prompt and the teacher's reply; the reply's positions are trained.
    pub ex: Example,
    /// Per position of `ex.ids`: the teacher's distribution over that token (top-k,
    /// renormalized), where known.
    pub soft: Vec<Option<TokenDist>>,
    /// The prompt and the ground-truth reply, when the line has one.
    pub label: Option<Example>,
}

/// A validated line.
struct Line {
    conv: Conversation,
    logprobs: Option<Vec<Value>>,
    label: Option<String>,
}

fn parse_line(text: &str, n: usize) -> Result<Line, String> {
    let (messages, tools) = sft::parse_line(text)?;
    let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let last_is_reply = messages
        .as_array()
        .and_then(|m| m.last())
        .is_some_and(|m| m["role"] == "assistant");
    if !last_is_reply {
        return Err("the last message must be the teacher's reply (role assistant)".into());
    }
    let logprobs = match v.get("logprobs") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(a.clone()),
        Some(_) => return Err("`logprobs` must be an array of {token, logprob, bytes, top_logprobs} (OpenAI's choices[].logprobs.content)".into()),
    };
    let label = match v.get("label") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("`label` must be the ground-truth reply as a string".into()),
    };
    Ok(Line {
        conv: Conversation {
            line: n,
            messages,
            tools,
        },
        logprobs,
        label,
    })
}

/// The student's token ids by their bytes (OpenAI's log-probs name tokens by bytes).
pub struct ByBytes(HashMap<Vec<u8>, u32>);

impl ByBytes {
    pub fn new(tok: &Tokenizer) -> Self {
        let mut m = HashMap::new();
        // Ordinary tokens first, so a special token never shadows one with the same text.
        for special in [false, true] {
            for id in 0..tok.vocab_size() as u32 {
                if tok.is_special(id) == special {
                    m.entry(tok.token_bytes(id).to_vec()).or_insert(id);
                }
            }
        }
        ByBytes(m)
    }

    /// The id of one log-prob entry (`bytes`, else the UTF-8 of `token`).
    pub fn id(&self, entry: &Value) -> Result<u32, String> {
        let bytes: Vec<u8> = match entry.get("bytes") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|b| b.as_u64().filter(|&b| b < 256).map(|b| b as u8))
                .collect::<Option<_>>()
                .ok_or("`bytes` must be an array of bytes (0–255)")?,
            _ => entry
                .get("token")
                .and_then(Value::as_str)
                .ok_or("a log-prob entry needs `token` or `bytes`")?
                .as_bytes()
                .to_vec(),
        };
        self.0.get(&bytes).copied().ok_or_else(|| {
            format!(
                "the teacher's token {:?} is not in the student's vocabulary: token-level distillation needs a teacher with the student's vocabulary; use --mode sequence",
                String::from_utf8_lossy(&bytes)
            )
        })
    }
}

fn logprob(entry: &Value) -> Result<f32, String> {
    entry
        .get("logprob")
        .and_then(Value::as_f64)
        .map(|l| l as f32)
        .ok_or_else(|| "a log-prob entry has no numeric `logprob`".into())
}

/// The teacher's reply as (token id, its distribution) from a line's `logprobs`.
fn teacher_tokens(ids: &ByBytes, logprobs: &[Value]) -> Result<Vec<(u32, TokenDist)>, String> {
    let mut out = Vec::with_capacity(logprobs.len());
    for (k, e) in logprobs.iter().enumerate() {
        let at = |m: String| format!("logprobs[{k}]: {m}");
        let id = ids.id(e).map_err(at)?;
        let mut dist: Vec<(u32, f32)> = Vec::new();
        if let Some(top) = e.get("top_logprobs").and_then(Value::as_array) {
            for t in top {
                let tid = ids.id(t).map_err(at)?;
                if !dist.iter().any(|d| d.0 == tid) {
                    dist.push((tid, logprob(t).map_err(at)?.exp()));
                }
            }
        }
        if dist.is_empty() {
            dist.push((id, 1.0));
        }
        let z: f32 = dist.iter().map(|d| d.1).sum();
        if !(z.is_finite() && z > 0.0) {
            return Err(at("the top log-probs do not form a distribution".into()));
        }
        dist.iter_mut().for_each(|d| d.1 /= z);
        out.push((id, dist.into_boxed_slice()));
    }
    Ok(out)
}

/// What [`load`] found besides the examples.
#[derive(Debug, Default, Clone, Copy)]
pub struct LoadStats {
    /// Lines whose teacher tokens do not spell the reply (or the reply is not where the
    /// template should put it): they train on the reply's text (token-level only).
    pub retokenized: usize,
    pub labelled: usize,
}

/// Read, validate and tokenize a distillation file. With `use_logprobs` (token-level without
/// a local teacher) every line needs `logprobs`, and the reply is the teacher's own tokens.
pub fn load(
    path: &Path,
    tok: &Tokenizer,
    template: &ChatTemplate,
    use_logprobs: bool,
) -> Result<(Vec<Taught>, LoadStats), TrainError> {
    let text = crate::data::read_corpus(path)?;
    let lines = sft::parse_lines(&text, parse_line, "the file has no examples: one {\"messages\": [...]} per line, ending with the teacher's reply")
        .map_err(|e| crate::finetune::data_error(path, &e))?;
    let by_bytes = ByBytes::new(tok);
    let mut stats = LoadStats::default();
    let mut out = Vec::with_capacity(lines.len());
    let bad = |line: usize, reason: String| {
        crate::finetune::data_error(path, &[LineError { line, reason }])
    };
    for l in lines {
        let n = l.conv.line;
        // Only the teacher's (last) reply is learned: earlier assistant turns are prompt.
        let mut msgs = l.conv.messages.as_array().cloned().unwrap_or_default();
        let last = msgs.len() - 1;
        for m in &mut msgs[..last] {
            if m["role"] == "assistant" {
                m["weight"] = json!(0);
            }
        }
        let conv = Conversation {
            line: n,
            messages: Value::Array(msgs.clone()),
            tools: l.conv.tools.clone(),
        };
        let mut ex = sft::encode(tok, template, &conv).map_err(|r| bad(n, r))?;
        let mut soft = vec![None; ex.ids.len()];
        match &l.logprobs {
            Some(lp) if use_logprobs => {
                let mut taught = teacher_tokens(&by_bytes, lp).map_err(|r| bad(n, r))?;
                // A trailing stop token in the log-probs is not part of the reply text.
                if taught.last().is_some_and(|t| tok.is_special(t.0)) {
                    taught.pop();
                }
                let start = ex.trained.iter().position(|&t| t).unwrap_or(ex.ids.len());
                let reply = msgs[last]["content"].as_str().unwrap_or_default().as_bytes();
                if splice_reply(tok, &mut ex, start, reply, &taught) {
                    soft.resize(ex.ids.len(), None);
                    for (k, (_, d)) in taught.into_iter().enumerate() {
                        soft[start + k] = Some(d);
                    }
                } else {
                    stats.retokenized += 1;
                }
            }
            None if use_logprobs => return Err(bad(n, "no `logprobs`: token-level distillation from a file needs the teacher's top log-probs on every line (generate with logprobs, or export with --with-logprobs); or use --mode sequence".into())),
            _ => {}
        }
        let label = match &l.label {
            Some(text) => {
                msgs[last]["content"] = Value::String(text.clone());
                let c = Conversation {
                    line: n,
                    messages: Value::Array(msgs),
                    tools: l.conv.tools,
                };
                stats.labelled += 1;
                Some(sft::encode(tok, template, &c).map_err(|r| bad(n, r))?)
            }
            None => None,
        };
        out.push(Taught { ex, soft, label });
    }
    Ok((out, stats))
}

/// Put the teacher's own tokens for the reply into `ex` at `start`, where the student's
/// tokenization of the same text is (a sampled reply need not be split as the tokenizer would
/// split its text). False (and `ex` unchanged) when the teacher's tokens do not spell `reply`
/// or the reply is not found at `start` (a template that rewrites content).
fn splice_reply(
    tok: &Tokenizer,
    ex: &mut Example,
    start: usize,
    reply: &[u8],
    taught: &[(u32, TokenDist)],
) -> bool {
    let spelled: Vec<u8> = taught
        .iter()
        .flat_map(|t| tok.token_bytes(t.0).to_vec())
        .collect();
    if spelled != reply {
        return false;
    }
    let mut have = Vec::new();
    let mut end = start;
    while have.len() < reply.len() && end < ex.ids.len() {
        have.extend_from_slice(tok.token_bytes(ex.ids[end]));
        end += 1;
    }
    if have != reply {
        return false;
    }
    let ids: Vec<u32> = taught.iter().map(|t| t.0).collect();
    ex.ids.splice(start..end, ids);
    ex.trained
        .splice(start..end, std::iter::repeat_n(true, taught.len()));
    true
}

/// Is `b` the same vocabulary as `a` (every token's bytes and specialness)?
pub fn same_vocab(a: &Tokenizer, b: &Tokenizer) -> bool {
    a.vocab_size() == b.vocab_size()
        && (0..a.vocab_size() as u32).all(|id| {
            a.token_bytes(id) == b.token_bytes(id) && a.is_special(id) == b.is_special(id)
        })
}

// ---- the objective ----------------------------------------------------------------------------

/// A local teacher whose full distribution the student learns (token-level).
pub struct Teacher {
    pub mc: ModelConfig,
    pub layout: Layout,
    pub params: Vec<f32>,
    pub acts: Activations,
}

/// The distillation objective: teacher lines, and scratch for `batch` teacher rows (plus
/// `batch` label rows when α > 0).
pub struct Distill {
    pub cfg: DistillConfig,
    pub train: Vec<Taught>,
    pub val: Vec<Taught>,
    pub batch: usize,
    pub ctx: usize,
    pub pad: u32,
    pub acts: Activations,
    pub lacts: LoraActs,
    pub teacher: Option<Teacher>,
}

/// A batch laid out as rows: inputs and, per position, where its target distribution is.
struct Rows {
    inputs: Vec<u32>,
    targets: Vec<u32>,
    /// Per position: a teacher row (its item and the index of the predicted token), a label
    /// row, or unscored.
    at: Vec<At>,
}

#[derive(Clone, Copy)]
enum At {
    None,
    /// Teacher row of batch item `k`, predicting `ids[j]`.
    Teacher(usize, usize),
    Label,
}

impl Distill {
    fn rows_per_batch(&self) -> usize {
        if self.cfg.alpha > 0.0 {
            2 * self.batch
        } else {
            self.batch
        }
    }

    /// Rows for `items` (a short batch is filled with unscored rows): the teacher rows, then
    /// (α > 0) each item's label row.
    fn rows(&self, items: &[&Taught]) -> Rows {
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        let mut at = Vec::new();
        let labels = self.cfg.alpha > 0.0;
        for k in 0..self.batch {
            let it = items[k.min(items.len() - 1)];
            let from = targets.len();
            sft::row(&it.ex, self.ctx, self.pad, &mut inputs, &mut targets);
            for j in 0..self.ctx {
                at.push(if k >= items.len() || targets[from + j] == IGNORE {
                    At::None
                } else {
                    At::Teacher(k, j + 1)
                });
            }
        }
        if labels {
            for k in 0..self.batch {
                let it = items[k.min(items.len() - 1)];
                let ex = it.label.as_ref().unwrap_or(&it.ex);
                let from = targets.len();
                sft::row(ex, self.ctx, self.pad, &mut inputs, &mut targets);
                let scored = k < items.len() && it.label.is_some();
                for j in 0..self.ctx {
                    if !scored {
                        targets[from + j] = IGNORE;
                    }
                    at.push(if targets[from + j] == IGNORE {
                        At::None
                    } else {
                        At::Label
                    });
                }
            }
        }
        Rows {
            inputs,
            targets,
            at,
        }
    }

    /// Forward `items`; per row the KL (or CE) to its target, the teacher rows' agreement
    /// (student argmax = teacher token), and with `scale` the gradient of
    /// `scale · ((1 − α)·mean teacher loss + α·mean label CE)` in `acts.logits`.
    fn forward(
        &mut self,
        policy: &Policy,
        params: &[f32],
        items: &[&Taught],
        scale: Option<f32>,
    ) -> Tally {
        let r = self.rows(items);
        self.acts.set_scored(&r.inputs, &r.targets);
        policy.forward_logits(params, &mut self.acts, &mut self.lacts);
        let v = policy.mc.vocab_size;
        let token = self.cfg.mode == DistillMode::Token;
        let n_teacher = self.batch * self.ctx;
        if let (true, Some(t)) = (token, self.teacher.as_mut()) {
            t.acts.set_inputs(&r.inputs[..n_teacher]);
            model::forward_with(&t.mc, &t.layout, Weights::F32(&t.params), None, &mut t.acts);
        }
        let dense = self
            .teacher
            .as_ref()
            .filter(|_| token)
            .map(|t| &t.acts.logits);
        let mut tally = Tally::default();
        let dists: Vec<Dist> =
            r.at.iter()
                .enumerate()
                .map(|(p, a)| match *a {
                    At::None => Dist::None,
                    At::Label => Dist::Hard(r.targets[p]),
                    At::Teacher(k, j) => match (token, dense) {
                        (false, _) => Dist::Hard(r.targets[p]),
                        (true, Some(d)) => Dist::Dense(&d[p * v..][..v]),
                        (true, None) => match &items[k].soft[j] {
                            Some(s) => Dist::Sparse(s),
                            None => Dist::Hard(r.targets[p]),
                        },
                    },
                })
                .collect();
        for (p, a) in r.at.iter().enumerate() {
            if let At::Teacher(..) = a {
                tally.agree += f64::from(u8::from(
                    argmax(&self.acts.logits[p * v..][..v]) == r.targets[p],
                ));
            }
        }
        let n_t = r.at.iter().filter(|a| matches!(a, At::Teacher(..))).count();
        let n_l = r.at.iter().filter(|a| matches!(a, At::Label)).count();
        let alpha = self.cfg.alpha;
        let s = scale.unwrap_or(0.0);
        let (wt, wl) = (
            s * (1.0 - alpha) / n_t.max(1) as f32,
            s * alpha / n_l.max(1) as f32,
        );
        let w: Vec<f32> =
            r.at.iter()
                .map(|a| match a {
                    At::None => 0.0,
                    At::Teacher(..) => wt,
                    At::Label => wl,
                })
                .collect();
        let kl = ops::kl_grad(&mut self.acts.logits, v, &dists, &w);
        for (a, &l) in r.at.iter().zip(&kl) {
            match a {
                At::Teacher(..) => {
                    tally.teacher += f64::from(l);
                    tally.n_teacher += 1.0;
                }
                At::Label => {
                    tally.label += f64::from(l);
                    tally.n_label += 1.0;
                }
                At::None => {}
            }
        }
        tally
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
            let items: Vec<&Taught> = idx.iter().map(|&i| &train[i]).collect();
            let t = self.forward(policy, params, &items, Some(1.0 / grad_accum as f32));
            self.train = train;
            policy.backward(params, grads, &mut self.acts, &mut self.lacts);
            state.tokens_seen += (t.n_teacher + t.n_label) as u64;
            tally.add(&t);
        }
        state.batcher.advance_to(sb);
        let mut metrics = tally.metrics(self.cfg.mode);
        metrics.insert("trained_tokens".into(), json!(state.tokens_seen));
        StepOut {
            loss: tally.loss(self.cfg.alpha),
            tokens: (self.rows_per_batch() * self.ctx * grad_accum) as u64,
            metrics,
        }
    }

    /// The teacher loss (KL, or CE for sequence-level) and the agreement on the validation
    /// lines.
    pub(crate) fn evaluate(&mut self, policy: &Policy, params: &[f32]) -> Evaluation {
        let mut tally = Tally::default();
        let val = std::mem::take(&mut self.val);
        for chunk in val.chunks(self.batch) {
            let items: Vec<&Taught> = chunk.iter().collect();
            tally.add(&self.forward(policy, params, &items, None));
        }
        self.val = val;
        let metrics = if tally.n_teacher > 0.0 {
            tally.metrics(self.cfg.mode)
        } else {
            Map::new()
        };
        let val_loss = if tally.n_teacher > 0.0 {
            (tally.teacher / tally.n_teacher) as f32
        } else {
            f32::NAN
        };
        Evaluation {
            train_loss: None,
            val_loss,
            sample: String::new(),
            token_accuracy: (tally.n_teacher > 0.0).then(|| (tally.agree / tally.n_teacher) as f32),
            metrics,
            warning: None,
        }
    }
}

/// Sums over rows.
#[derive(Default)]
struct Tally {
    teacher: f64,
    n_teacher: f64,
    label: f64,
    n_label: f64,
    agree: f64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.teacher += o.teacher;
        self.n_teacher += o.n_teacher;
        self.label += o.label;
        self.n_label += o.n_label;
        self.agree += o.agree;
    }

    fn loss(&self, alpha: f32) -> f32 {
        let t = self.teacher / self.n_teacher.max(1.0);
        let l = self.label / self.n_label.max(1.0);
        ((1.0 - f64::from(alpha)) * t + f64::from(alpha) * l) as f32
    }

    fn metrics(&self, mode: DistillMode) -> Map<String, Value> {
        let mut m = Map::new();
        let name = match mode {
            DistillMode::Token => "teacher_kl",
            DistillMode::Sequence => "teacher_ce",
        };
        m.insert(name.into(), json!(self.teacher / self.n_teacher.max(1.0)));
        m.insert(
            "teacher_agreement".into(),
            json!(self.agree / self.n_teacher.max(1.0)),
        );
        if self.n_label > 0.0 {
            m.insert("label_ce".into(), json!(self.label / self.n_label));
        }
        m
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The gradient `kl_grad` leaves is the derivative of the KL it reports, for each kind
    /// of target (finite differences in f64 of the same formula).
    #[test]
    fn kl_gradient_matches_finite_differences() {
        let v = 7;
        let logits: Vec<f32> = (0..v).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
        let teacher: Vec<f32> = (0..v).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.5).collect();
        let sparse = [(2u32, 0.7f32), (5, 0.3)];
        for t in [Dist::Hard(3), Dist::Sparse(&sparse), Dist::Dense(&teacher)] {
            let mut g = logits.clone();
            let kl = ops::kl_grad(&mut g, v, &[t], &[1.0])[0];
            assert!(kl >= 0.0);
            for i in 0..v {
                let h = 1e-3f32;
                let f = |d: f32| {
                    let mut x = logits.clone();
                    x[i] += d;
                    ops::kl_grad(&mut x, v, &[t], &[0.0])[0]
                };
                let fd = (f(h) - f(-h)) / (2.0 * h);
                assert!(
                    (fd - g[i]).abs() < 2e-3,
                    "{t:?} logit {i}: fd {fd} vs {}",
                    g[i]
                );
            }
        }
        // A student equal to a dense teacher has zero KL and zero gradient.
        let mut g = teacher.clone();
        let kl = ops::kl_grad(&mut g, v, &[Dist::Dense(&teacher)], &[1.0])[0];
        assert!(kl.abs() < 1e-5 && g.iter().all(|x| x.abs() < 1e-5));
    }
}
