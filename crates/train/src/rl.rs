//! Reinforcement learning from a reward model or a grader, as an objective of the one training
//! loop: GRPO (Shao et al. 2024) or RLOO (Ahmadian et al. 2024) advantages, a policy-gradient
//! step on the policy's own samples, and a KL penalty to the reference model.
//!
//! ```text
//! step:  prompts ← the next `batch` lines of the prompts file
//!        k samples each ← env.rollouts(the policy's current adapter)     (the inference engine)
//!        r_ij ← env.rewards(item_i, sample_ij)               (a reward model, or a grader)
//!        A_ij ← GRPO: (r_ij − mean_i) / (std_i + ε)   RLOO: r_ij − mean of the other k − 1
//!        loss = mean_ij [ −A_ij · mean_t log π(y_t) + β · mean_t KL_t ]
//!               KL_t = exp(ref_t − lp_t) − (ref_t − lp_t) − 1     (k3: unbiased, ≥ 0)
//! eval:  one greedy reply per held-out prompt → its mean reward (before training: step 0)
//! ```
//!
//! * **On-policy, one step per batch of samples**, so the importance ratio is 1 and PPO's
//!   clipping never binds: the gradient is exactly `−A · ∇ log π` (plus the KL term's).
//! * **Samples come from the inference engine** (batched, the quantized base with the current
//!   adapter), through [`RlEnv`], which the CLI implements; the log-probs that train come from
//!   the training model (the same weights in f32). The small gap between the two is the one
//!   vLLM-sampled TRL runs have too.
//! * **The reference** is the base with the adapter switched off (LoRA, QLoRA): no second copy.
//! * **The data** is OpenAI's reinforcement fine-tuning JSONL: `{"messages": [...], ...}` per
//!   line, the conversation up to the turn to answer, and any further fields, which graders
//!   read as `{{item.field}}`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use ferrolm_tokenizer::{chat::ChatTemplate, Tokenizer};

use crate::checkpoint::TrainState;
use crate::lora::LoraActs;
use crate::model::{Activations, IGNORE};
use crate::sft::{self, Example, LineError};
use crate::trainer::{Evaluation, Policy, StepOut};
use crate::TrainError;

/// How samples' rewards become advantages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Advantage {
    /// GRPO: the reward standardized within its prompt's group.
    #[default]
    Grpo,
    /// RLOO: the reward less the mean of the group's other samples.
    Rloo,
}

impl std::str::FromStr for Advantage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grpo" => Ok(Advantage::Grpo),
            "rloo" => Ok(Advantage::Rloo),
            _ => Err(format!(
                "`{s}` is not an advantage estimator: use grpo or rloo"
            )),
        }
    }
}

/// What scores the samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Scorer {
    /// A reward model (`ferrolm finetune --method reward` run or PEFT directory): its score.
    RewardModel { path: std::path::PathBuf },
    /// An OpenAI grader (its JSON), e.g. `string_check`, `text_similarity`, `score_model`,
    /// `multi`.
    Grader { grader: Value },
}

/// An RL run's settings (saved in `finetune.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlConfig {
    pub scorer: Scorer,
    /// Samples per prompt (the group).
    pub k: usize,
    /// The KL penalty's weight (0: none, and no reference forward).
    pub beta: f32,
    pub temperature: f32,
    pub top_p: f32,
    /// Most tokens per sample.
    pub max_tokens: usize,
    #[serde(default)]
    pub advantage: Advantage,
}

/// One prompt of the RL file.
#[derive(Debug, Clone)]
pub struct RlItem {
    /// The line it came from (1-based).
    pub line: usize,
    /// The conversation rendered with the generation prompt, tokenized.
    pub prompt: Vec<u32>,
    /// The whole line, as graders see it (`{{item.…}}`).
    pub item: Value,
}

/// One sample: its ids (the end token included when it ended there) and its text.
#[derive(Debug, Clone)]
pub struct Completion {
    pub ids: Vec<u32>,
    pub text: String,
    /// It hit the token limit rather than ending.
    pub truncated: bool,
}

/// Where RL's samples and rewards come from: the CLI implements it with the inference engine,
/// reward models and graders.
pub trait RlEnv: Send {
    /// `k` samples of each prompt from the base model with `adapter`, at `temperature`
    /// (0: greedy), seeded by `seed` (sample `j` of prompt `i` is seeded `seed + i·k + j`).
    fn rollouts(
        &mut self,
        adapter: Arc<ferrolm_models::Adapter>,
        prompts: &[&[u32]],
        k: usize,
        temperature: f32,
        seed: u64,
    ) -> Result<Vec<Vec<Completion>>, String>;

    /// The reward of each sample of each item.
    fn rewards(
        &mut self,
        items: &[&RlItem],
        samples: &[Vec<Completion>],
    ) -> Result<Vec<Vec<f64>>, String>;
}

/// Parse one line of an RL prompts file: a JSON object with `messages` up to the turn to
/// answer, and every field in `required` (what the grader reads as `{{item.x}}`).
fn parse_line(line: &str, required: &[String]) -> Result<(Value, Value), String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON ({e})"))?;
    let Value::Object(o) = &v else {
        return Err("not a JSON object: one {\"messages\": [...], …} per line".into());
    };
    let msgs = o
        .get("messages")
        .ok_or("no `messages`: each line needs the conversation to answer")?;
    let list = msgs.as_array().ok_or("`messages` must be a list")?;
    if list.is_empty() {
        return Err("`messages` is empty".into());
    }
    sft::check_messages(list)?;
    if list.last().and_then(|m| m.get("role")) == Some(&json!("assistant")) {
        return Err("the conversation ends with an assistant message: give it up to the turn the model should answer".into());
    }
    crate::grader::check_fields(&v, required)?;
    Ok((msgs.clone(), v))
}

/// Read, validate and tokenize an RL prompts file; a bad line is reported by number.
pub fn load_items(
    path: &std::path::Path,
    tok: &Tokenizer,
    template: &ChatTemplate,
    required: &[String],
) -> Result<Vec<RlItem>, TrainError> {
    let text = crate::data::read_corpus(path)?;
    let parsed = sft::parse_lines(
        &text,
        |line, n| parse_line(line, required).map(|p| (n, p)),
        "the file has no prompts: one JSON object per line, {\"messages\": [...]}",
    )
    .map_err(|e| crate::finetune::data_error(path, &e))?;
    let mut out = Vec::with_capacity(parsed.len());
    for (line, (msgs, item)) in parsed {
        let tools = item.get("tools");
        let ids = template
            .render(tok, &msgs, true, tools)
            .and_then(|r| tok.encode_chat(&r))
            .map_err(|e| {
                crate::finetune::data_error(
                    path,
                    &[LineError {
                        line,
                        reason: e.to_string(),
                    }],
                )
            })?;
        out.push(RlItem {
            line,
            prompt: ids,
            item,
        });
    }
    Ok(out)
}

/// Check an RL file without a tokenizer (the server's upload validation): each line's shape
/// and the grader's fields, every bad line by number.
pub fn validate_jsonl(text: &str, required: &[String]) -> Result<usize, Vec<LineError>> {
    sft::parse_lines(
        text,
        |line, _| parse_line(line, required),
        "the file has no prompts: one JSON object per line, {\"messages\": [...]}",
    )
    .map(|v| v.len())
}

/// The advantages of one group's rewards.
pub fn advantages(kind: Advantage, r: &[f64]) -> Vec<f64> {
    let k = r.len() as f64;
    let mean = r.iter().sum::<f64>() / k;
    match kind {
        Advantage::Grpo => {
            let var = r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (k - 1.0).max(1.0);
            let sd = var.sqrt();
            r.iter().map(|x| (x - mean) / (sd + 1e-4)).collect()
        }
        Advantage::Rloo if r.len() > 1 => {
            r.iter().map(|x| x - (mean * k - x) / (k - 1.0)).collect()
        }
        Advantage::Rloo => vec![0.0; r.len()],
    }
}

/// Sums over samples, for means.
#[derive(Default)]
struct Tally {
    n: f64,
    loss: f64,
    reward: f64,
    reward_sq: f64,
    kl: f64,
    len: f64,
    groups: f64,
    flat_groups: f64,
    truncated: f64,
    /// Seconds spent sampling, scoring and in the model's forward and backward.
    secs: [f64; 3],
}

impl Tally {
    fn metrics(&self) -> Map<String, Value> {
        let n = self.n.max(1.0);
        let mean = self.reward / n;
        let mut m = Map::new();
        m.insert("reward_mean".into(), json!(mean));
        m.insert(
            "reward_std".into(),
            json!((self.reward_sq / n - mean * mean).max(0.0).sqrt()),
        );
        m.insert("kl".into(), json!(self.kl / n));
        m.insert("completion_length".into(), json!(self.len / n));
        m.insert("clipped_ratio".into(), json!(self.truncated / n));
        m.insert("sample_s".into(), json!(self.secs[0]));
        m.insert("score_s".into(), json!(self.secs[1]));
        m.insert("train_s".into(), json!(self.secs[2]));
        if self.groups > 0.0 {
            m.insert(
                "frac_reward_zero_std".into(),
                json!(self.flat_groups / self.groups),
            );
        }
        m
    }
}

/// The RL objective: prompts, the environment, and scratch for `k` rows (one group per
/// forward).
pub struct Rl<'e> {
    pub cfg: RlConfig,
    pub train: Vec<RlItem>,
    pub val: Vec<RlItem>,
    pub batch: usize,
    pub ctx: usize,
    pub pad: u32,
    pub seed: u64,
    pub acts: Activations,
    pub lacts: LoraActs,
    pub env: &'e mut dyn RlEnv,
    /// A name for the adapter the engine samples with.
    pub name: String,
}

/// A prompt and one sample as a training row: the sample's tokens are scored.
fn example(prompt: &[u32], c: &Completion) -> Example {
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(&c.ids);
    let mut trained = vec![false; prompt.len()];
    trained.resize(ids.len(), true);
    Example { ids, trained }
}

fn env_error(what: &str, e: String) -> TrainError {
    TrainError::Config {
        what: what.into(),
        reason: e,
    }
}

impl Rl<'_> {
    /// The policy's current adapter, for the inference engine.
    fn adapter(
        &self,
        policy: &Policy,
        params: &[f32],
    ) -> Result<Arc<ferrolm_models::Adapter>, TrainError> {
        let lora = policy.lora.as_ref().ok_or_else(|| TrainError::Config {
            what: "--method rl".into(),
            reason: "samples are drawn by the inference engine with the policy's adapter: use --weights lora (or --qlora)".into(),
        })?;
        Ok(Arc::new(crate::peft::to_inference(
            &policy.mc, lora, params, &self.name,
        )?))
    }

    pub(crate) fn accumulate(
        &mut self,
        policy: &Policy,
        params: &[f32],
        grads: &mut [f32],
        state: &mut TrainState,
        grad_accum: usize,
    ) -> Result<StepOut, TrainError> {
        let adapter = self.adapter(policy, params)?;
        let mut sb = state.batcher.examples();
        let k = self.cfg.k;
        let mut tally = Tally::default();
        let seed = self.seed ^ state.step.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for micro in 0..grad_accum {
            let idx: Vec<usize> = (0..self.batch).map(|_| sb.take(self.train.len())).collect();
            let items: Vec<&RlItem> = idx.iter().map(|&i| &self.train[i]).collect();
            let prompts: Vec<&[u32]> = items.iter().map(|it| it.prompt.as_slice()).collect();
            let t = std::time::Instant::now();
            let samples = self
                .env
                .rollouts(
                    adapter.clone(),
                    &prompts,
                    k,
                    self.cfg.temperature,
                    seed.wrapping_add((micro * self.batch * k) as u64),
                )
                .map_err(|e| env_error("sampling", e))?;
            tally.secs[0] += t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            let rewards = self
                .env
                .rewards(&items, &samples)
                .map_err(|e| env_error("scoring", e))?;
            tally.secs[1] += t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            let scale = 1.0 / (grad_accum * self.batch * k) as f64;
            let prompts: Vec<Vec<u32>> = items.iter().map(|it| it.prompt.clone()).collect();
            for ((prompt, group), r) in prompts.iter().zip(&samples).zip(&rewards) {
                tally.groups += 1.0;
                if r.iter().all(|x| *x == r[0]) {
                    tally.flat_groups += 1.0;
                }
                for (c, x) in group.iter().zip(r) {
                    tally.n += 1.0;
                    tally.reward += x;
                    tally.reward_sq += x * x;
                    tally.len += c.ids.len() as f64;
                    tally.truncated += f64::from(u8::from(c.truncated));
                }
                let exs: Vec<Example> = group.iter().map(|c| example(prompt, c)).collect();
                let adv = advantages(self.cfg.advantage, r);
                state.tokens_seen +=
                    self.group_step(policy, params, grads, &exs, &adv, scale, &mut tally);
            }
            tally.secs[2] += t.elapsed().as_secs_f64();
        }
        state.batcher.advance_to(sb);
        Ok(StepOut {
            loss: (tally.loss / tally.n.max(1.0)) as f32,
            tokens: (grad_accum * self.batch * k * self.ctx) as u64,
            metrics: tally.metrics(),
        })
    }

    /// Forward and backward one group's `k` rows; returns the trained tokens.
    #[allow(clippy::too_many_arguments)]
    fn group_step(
        &mut self,
        policy: &Policy,
        params: &[f32],
        grads: &mut [f32],
        exs: &[Example],
        adv: &[f64],
        scale: f64,
        tally: &mut Tally,
    ) -> u64 {
        let (ctx, k) = (self.ctx, self.cfg.k);
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for ex in exs {
            sft::row(ex, ctx, self.pad, &mut inputs, &mut targets);
        }
        self.acts.set_scored(&inputs, &targets);
        let reference = if self.cfg.beta > 0.0 {
            policy.reference_logprobs(&mut self.acts, &targets)
        } else {
            None
        };
        let (logp, lse) =
            policy.forward_logprobs(params, &mut self.acts, &mut self.lacts, &targets);
        let beta = f64::from(self.cfg.beta);
        let mut w = vec![0f32; k * ctx];
        let mut trained = 0u64;
        for (row, a) in adv.iter().enumerate().take(k) {
            let span = row * ctx..(row + 1) * ctx;
            let n = targets[span.clone()]
                .iter()
                .filter(|&&t| t != IGNORE)
                .count();
            if n == 0 {
                continue;
            }
            trained += n as u64;
            let inv = 1.0 / n as f64;
            let (mut lp_sum, mut kl_sum) = (0f64, 0f64);
            for j in span {
                if targets[j] == IGNORE {
                    continue;
                }
                let lp = f64::from(logp[j]);
                lp_sum += lp;
                let mut g = *a;
                if let Some((rl, _)) = &reference {
                    let d = f64::from(rl[j]) - lp;
                    kl_sum += d.exp() - d - 1.0;
                    // d KL_t / d lp_t = 1 − exp(ref − lp); the weight is −dL/d lp.
                    g -= beta * (1.0 - d.exp());
                }
                w[j] = (g * inv * scale) as f32;
            }
            tally.loss += -a * lp_sum * inv + beta * kl_sum * inv;
            tally.kl += kl_sum * inv;
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
        trained
    }

    /// One greedy reply per held-out prompt, and their mean reward.
    pub(crate) fn evaluate(
        &mut self,
        policy: &Policy,
        params: &[f32],
    ) -> Result<Evaluation, TrainError> {
        let mut metrics = Map::new();
        if !self.val.is_empty() {
            let adapter = self.adapter(policy, params)?;
            let prompts: Vec<&[u32]> = self.val.iter().map(|it| it.prompt.as_slice()).collect();
            let samples = self
                .env
                .rollouts(adapter, &prompts, 1, 0.0, self.seed)
                .map_err(|e| env_error("sampling", e))?;
            let items: Vec<&RlItem> = self.val.iter().collect();
            let rewards = self
                .env
                .rewards(&items, &samples)
                .map_err(|e| env_error("scoring", e))?;
            let all: Vec<f64> = rewards.iter().flatten().copied().collect();
            let mean = all.iter().sum::<f64>() / all.len().max(1) as f64;
            let len = samples.iter().flatten().map(|c| c.ids.len()).sum::<usize>() as f64
                / all.len().max(1) as f64;
            metrics.insert("val_reward_mean".into(), json!(mean));
            metrics.insert("val_completion_length".into(), json!(len));
        }
        Ok(Evaluation {
            train_loss: None,
            val_loss: f32::NAN,
            sample: String::new(),
            token_accuracy: None,
            metrics,
            warning: None,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn grpo_advantages_are_standardized_within_the_group() {
        let a = advantages(Advantage::Grpo, &[1.0, 0.0, 0.0, 1.0]);
        // mean 0.5, sample sd sqrt(1/3)
        let sd = (1.0f64 / 3.0).sqrt();
        for (x, want) in a.iter().zip([0.5 / sd, -0.5 / sd, -0.5 / sd, 0.5 / sd]) {
            assert!((x - want).abs() < 1e-3, "{x} vs {want}");
        }
        assert!(advantages(Advantage::Grpo, &[0.3, 0.3, 0.3])
            .iter()
            .all(|x| *x == 0.0));
    }

    #[test]
    fn rloo_advantages_leave_one_out() {
        let a = advantages(Advantage::Rloo, &[1.0, 0.0, 0.0, 0.0]);
        assert_eq!(a, vec![1.0, -1.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0]);
        assert_eq!(advantages(Advantage::Rloo, &[2.0]), vec![0.0]);
    }

    #[test]
    fn bad_lines_are_reported_by_number() {
        let text = concat!(
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"answer\": \"x\"}\n",
            "not json\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"a\"}], \"answer\": \"x\"}\n",
            "{\"prompt\": \"hi\", \"answer\": \"x\"}\n",
        );
        let errs = validate_jsonl(text, &["answer".into()]).unwrap_err();
        let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5]);
        assert!(
            errs[1].reason.contains("no field `answer`"),
            "{}",
            errs[1].reason
        );
        assert!(errs[2].reason.contains("ends with an assistant"));
        assert!(errs[3].reason.contains("no `messages`"));
        assert_eq!(validate_jsonl(text.lines().next().unwrap(), &[]), Ok(1));
    }
}
