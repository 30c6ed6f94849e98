//! Reward models: a language model with a scalar head, trained on preference pairs with the
//! Bradley–Terry loss (Ouyang et al. 2022; TRL's `RewardTrainer`), as an objective of the one
//! training loop.
//!
//! * **The score** of a conversation is `w · h`, with `h` the final hidden state (after the
//!   output norm) at its last token and `w` the head's `dim` weights — Hugging Face's
//!   `…ForSequenceClassification` with one label, whose head PEFT saves as
//!   `base_model.model.score.weight` (`modules_to_save = ["score"]`). The head trains with
//!   the LoRA adapters; the base stays frozen (LoRA or QLoRA).
//! * **The data** is the preference file DPO reads (OpenAI's format): each pair is rendered
//!   twice with the chat template, the input messages followed by one output
//!   (`ChatTemplate::conversation_ids`, which serving uses too).
//! * **The loss** is `−log σ(r_chosen − r_rejected)`, its mean over the step's pairs.
//! * **Metrics**, with TRL's meanings: pair accuracy (ties count half), the mean margin, and
//!   the mean rewards of chosen and rejected.

use serde_json::{json, Map, Value};

use crate::checkpoint::TrainState;
use crate::dpo::{pair_credit, sigmoid, softplus, Pair};
use crate::lora::LoraActs;
use crate::model::Activations;
use crate::sft::{self, Example};
use crate::trainer::{Evaluation, Policy, StepOut};
use crate::TrainError;

/// The position whose hidden state is scored: the last token of `ex` within `ctx`.
fn last(ex: &Example, ctx: usize) -> usize {
    ex.ids.len().min(ctx).max(1) - 1
}

/// Sums of pair figures, for means.
#[derive(Default)]
struct Tally {
    n: f64,
    loss: f64,
    chosen: f64,
    rejected: f64,
    correct: f64,
}

impl Tally {
    fn add(&mut self, c: f64, r: f64) {
        self.n += 1.0;
        self.loss += softplus(-(c - r));
        self.chosen += c;
        self.rejected += r;
        self.correct += pair_credit(c, r);
    }

    fn loss(&self) -> f32 {
        (self.loss / self.n.max(1.0)) as f32
    }

    fn metrics(&self) -> Map<String, Value> {
        let n = self.n.max(1.0);
        let mut m = Map::new();
        let (c, r) = (self.chosen / n, self.rejected / n);
        m.insert("rewards_chosen".into(), json!(c));
        m.insert("rewards_rejected".into(), json!(r));
        m.insert("reward_margin".into(), json!(c - r));
        m.insert("pair_accuracy".into(), json!(self.correct / n));
        m
    }
}

/// The reward objective: pairs, and scratch for `2 × batch` rows.
pub struct Reward {
    pub train: Vec<Pair>,
    pub val: Vec<Pair>,
    pub batch: usize,
    pub ctx: usize,
    pub pad: u32,
    pub acts: Activations,
    pub lacts: LoraActs,
}

impl Reward {
    /// Refuse a policy without a score head (a programming error in the caller: the
    /// finetune entry point adds it).
    fn head(policy: &Policy) -> Result<usize, TrainError> {
        policy
            .lora
            .as_ref()
            .and_then(|l| l.score)
            .ok_or_else(|| TrainError::Config {
                what: "--method reward".into(),
                reason: "a reward model trains LoRA adapters with a score head: use --weights lora (or --qlora)".into(),
            })
    }

    /// Forward `pairs` (chosen and rejected rows interleaved, padded to `batch` pairs with
    /// copies of the last); each pair's two scores.
    fn forward(
        &mut self,
        policy: &Policy,
        params: &[f32],
        pairs: &[&Pair],
        head: usize,
    ) -> Vec<[f64; 2]> {
        let mut inputs = Vec::with_capacity(2 * self.batch * self.ctx);
        let mut scratch = Vec::new();
        for k in 0..self.batch {
            let p = pairs[k.min(pairs.len() - 1)];
            for ex in [&p.chosen, &p.rejected] {
                sft::row(ex, self.ctx, self.pad, &mut inputs, &mut scratch);
            }
        }
        self.acts.set_inputs(&inputs);
        policy.forward_hidden(params, &mut self.acts, &mut self.lacts);
        let d = policy.mc.dim;
        let w = &params[head..head + d];
        let h = self.acts.hidden();
        let score = |row: usize, ex: &Example| -> f64 {
            let at = (row * self.ctx + last(ex, self.ctx)) * d;
            h[at..at + d]
                .iter()
                .zip(w)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum()
        };
        pairs
            .iter()
            .enumerate()
            .map(|(k, p)| [score(2 * k, &p.chosen), score(2 * k + 1, &p.rejected)])
            .collect()
    }

    pub(crate) fn accumulate(
        &mut self,
        policy: &Policy,
        params: &[f32],
        grads: &mut [f32],
        state: &mut TrainState,
        grad_accum: usize,
    ) -> Result<StepOut, TrainError> {
        let head = Self::head(policy)?;
        let d = policy.mc.dim;
        let mut sb = state.batcher.examples();
        let mut tally = Tally::default();
        for _ in 0..grad_accum {
            let idx: Vec<usize> = (0..self.batch).map(|_| sb.take(self.train.len())).collect();
            let train = std::mem::take(&mut self.train);
            let pairs: Vec<&Pair> = idx.iter().map(|&i| &train[i]).collect();
            let scores = self.forward(policy, params, &pairs, head);
            // dL/dr for each row: the mean over the step's pairs of −log σ(r_c − r_r).
            let scale = 1.0 / (grad_accum * self.batch) as f64;
            let w = &params[head..head + d];
            let mut rows = Vec::with_capacity(2 * pairs.len());
            for (k, (p, &[c, r])) in pairs.iter().zip(&scores).enumerate() {
                tally.add(c, r);
                let g = -sigmoid(-(c - r)) * scale;
                for (row, ex, dr) in [(2 * k, &p.chosen, g), (2 * k + 1, &p.rejected, -g)] {
                    rows.push(((row * self.ctx + last(ex, self.ctx)) * d, dr));
                    state.tokens_seen += ex.ids.len().min(self.ctx) as u64;
                }
            }
            // dL/dw = Σ dr·h, dL/dh = dr·w at each scored position (zero elsewhere)
            let mut dw = vec![0f64; d];
            for &(at, dr) in &rows {
                for (acc, hi) in dw.iter_mut().zip(&self.acts.hidden()[at..at + d]) {
                    *acc += dr * f64::from(*hi);
                }
            }
            let dh = self.acts.hidden_grad_mut();
            dh.fill(0.0);
            for &(at, dr) in &rows {
                for (x, wi) in dh[at..at + d].iter_mut().zip(w) {
                    *x += (dr * f64::from(*wi)) as f32;
                }
            }
            for (g, x) in grads[head..head + d].iter_mut().zip(&dw) {
                *g += *x as f32;
            }
            policy.backward_hidden(params, grads, &mut self.acts, &mut self.lacts);
            self.train = train;
        }
        state.batcher.advance_to(sb);
        Ok(StepOut {
            loss: tally.loss(),
            tokens: (2 * self.batch * self.ctx * grad_accum) as u64,
            metrics: tally.metrics(),
        })
    }

    pub(crate) fn evaluate(&mut self, policy: &Policy, params: &[f32]) -> Evaluation {
        let mut tally = Tally::default();
        if let Ok(head) = Self::head(policy) {
            let val = std::mem::take(&mut self.val);
            for chunk in val.chunks(self.batch) {
                let pairs: Vec<&Pair> = chunk.iter().collect();
                for [c, r] in self.forward(policy, params, &pairs, head) {
                    tally.add(c, r);
                }
            }
            self.val = val;
        }
        let (metrics, val_loss) = if tally.n > 0.0 {
            (tally.metrics(), tally.loss())
        } else {
            (Map::new(), f32::NAN)
        };
        Evaluation {
            train_loss: None,
            val_loss,
            sample: String::new(),
            token_accuracy: None,
            metrics,
            warning: None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::data::Batcher;
    use crate::lora::{Lora, LoraConfig, Target};
    use crate::model::{Layout, ModelConfig, SplitMix};
    use crate::trainer::Frozen;

    fn ex(ids: &[u32]) -> Example {
        Example {
            ids: ids.to_vec(),
            trained: vec![false; ids.len()],
        }
    }

    /// The objective's gradient (adapters and score head, through the frozen base) matches
    /// central finite differences of its loss, with pairs of different lengths (the score is
    /// read at each sequence's own last token, past it is padding).
    #[test]
    fn reward_gradients_match_finite_differences() {
        let c = ModelConfig {
            vocab_size: 13,
            dim: 16,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            ffn_dim: 24,
            context: 8,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            tied_embeddings: true,
        };
        let layout = Layout::new(&c);
        let mut rng = SplitMix(11);
        let base: Vec<f32> = (0..layout.len).map(|_| 0.4 * rng.normal()).collect();
        let lora = Lora::new(
            &c,
            LoraConfig {
                rank: 2,
                alpha: 4.0,
                targets: Target::ALL.to_vec(),
            },
        )
        .with_score(c.dim);
        let head = lora.score.unwrap();
        assert_eq!(lora.tensors.last().unwrap().name, crate::lora::SCORE_TENSOR);
        let params: Vec<f32> = (0..lora.len).map(|_| 0.3 * rng.normal()).collect();
        let policy = Policy {
            layout,
            mc: c.clone(),
            frozen: Frozen::F32(base),
            lora: Some(lora),
        };
        let pairs = vec![
            Pair {
                line: 1,
                chosen: ex(&[1, 2, 3, 4, 5, 6]),
                rejected: ex(&[1, 2, 3, 7]),
            },
            Pair {
                line: 2,
                chosen: ex(&[9, 8, 7]),
                rejected: ex(&[9, 8, 2, 2, 11, 12, 3]),
            },
        ];
        let (acts, lacts) = policy.scratch(4, 7);
        let mut r = Reward {
            train: pairs.clone(),
            val: Vec::new(),
            batch: 2,
            ctx: 7,
            pad: 0,
            acts,
            lacts,
        };
        let mut state = TrainState {
            step: 0,
            evaluated: false,
            best_val_loss: None,
            batcher: Batcher::new(3),
            tokens_seen: 0,
            train_seconds: 0.0,
        };
        let mut grads = vec![0f32; params.len()];
        let out = r
            .accumulate(&policy, &params, &mut grads, &mut state, 1)
            .unwrap();
        let refs: Vec<&Pair> = pairs.iter().collect();
        let mut loss_at = |p: &[f32]| -> f64 {
            let s = r.forward(&policy, p, &refs, head);
            s.iter().map(|[c, r]| softplus(-(c - r))).sum::<f64>() / 2.0
        };
        assert!((loss_at(&params) - f64::from(out.loss)).abs() < 1e-5);
        let tensors = policy.lora.as_ref().unwrap().tensors.clone();
        for slot in &tensors {
            let idx: Vec<usize> = (0..6)
                .map(|_| slot.offset + (rng.next_u64() as usize % slot.len()))
                .collect();
            for i in idx {
                let h = 1e-2f32;
                let mut p = params.clone();
                p[i] += h;
                let up = loss_at(&p);
                p[i] -= 2.0 * h;
                let down = loss_at(&p);
                let fd = (up - down) / (2.0 * f64::from(h));
                let g = f64::from(grads[i]);
                let err = (fd - g).abs() / fd.abs().max(g.abs()).max(1e-2);
                assert!(
                    err < 2e-2,
                    "{} [{}]: backward {g:.6e} vs finite difference {fd:.6e}",
                    slot.name,
                    i - slot.offset
                );
            }
        }
    }
}
