//! The one training loop (STYLE 16, 18). Pretraining, supervised fine-tuning, preference
//! tuning, reward models, reinforcement learning and distillation are [`Objective`]s of it; full weights, LoRA and QLoRA are [`Policy`]s. The loop
//! owns what they share: the schedule, gradient accumulation, clipping, AdamW, evaluation
//! when due, checkpoints, a stop request, `metrics.jsonl` and the progress events. An
//! objective only says how to turn the next micro-batches into a loss and gradients, and how
//! to evaluate.
//!
//! ```text
//! loop:
//!   evaluation due (every eval_every steps, and at the end)? → objective.evaluate → metrics,
//!       Event::Eval, checkpoint
//!   done? → return;  stop asked? → checkpoint, return
//!   grads = 0; objective.accumulate (× grad_accum, into grads) → clip → AdamW(lr(step))
//!   → metrics, Event::Step
//! ```

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde_json::{json, Map, Value};

use crate::checkpoint::{CheckpointRef, TrainState};
use crate::config::LoopConfig;
use crate::distill::Distill;
use crate::dpo::Dpo;
use crate::lora::{Lora, LoraActs};
use crate::model::{
    self, Activations, Layout, LoraGrad, LoraRun, ModelConfig, StoredBase, TensorSlot, Weights,
    IGNORE,
};
use crate::optim::{clip_grad_norm, AdamW};
use crate::reward::Reward;
use crate::rl::Rl;
use crate::run::{diverged, save_reported, Event, Metrics};
use crate::sft::{self, Example};
use crate::TrainError;

// ---- the policy: which weights train ----------------------------------------------------------

/// The frozen weights under the trained ones.
pub(crate) enum Frozen {
    /// Nothing frozen: the trained buffer is the whole model (pretraining, full SFT).
    None,
    /// f32 in the model layout: LoRA's base, or (full preference tuning) the starting weights
    /// kept as the reference model.
    F32(Vec<f32>),
    /// QLoRA: the base in its stored quantized form.
    Stored(StoredBase),
}

/// The model being trained: its config and layout, the frozen weights, and the adapters when
/// only they train. The trained buffer (`params`) is passed in, owned by the loop.
pub(crate) struct Policy {
    pub mc: ModelConfig,
    pub layout: Layout,
    pub frozen: Frozen,
    pub lora: Option<Lora>,
}

impl Policy {
    /// What the optimizer updates: the adapters, or the whole model.
    pub fn tensors(&self) -> &[TensorSlot] {
        match &self.lora {
            Some(l) => &l.tensors,
            None => &self.layout.tensors,
        }
    }

    /// Scratch for a (batch, ctx) shape.
    pub fn scratch(&self, batch: usize, ctx: usize) -> (Activations, LoraActs) {
        let lacts = match &self.lora {
            Some(l) => l.acts(batch * ctx),
            None => LoraActs::default(),
        };
        (Activations::new(&self.mc, batch, ctx), lacts)
    }

    /// The base weights the trained ones sit on (the trained buffer itself without adapters).
    fn base<'a>(&'a self, params: &'a [f32]) -> Weights<'a> {
        match (&self.lora, &self.frozen) {
            (Some(_), Frozen::F32(f)) => Weights::F32(f),
            (Some(_), Frozen::Stored(s)) => Weights::Stored(s),
            _ => Weights::F32(params),
        }
    }

    /// Forward with the trained weights; the mean cross-entropy over the scored targets in
    /// `acts`. With `grad_scale`, `acts.logits` is left holding the loss's gradient.
    pub fn forward_ce(
        &self,
        params: &[f32],
        acts: &mut Activations,
        lacts: &mut LoraActs,
        grad_scale: Option<f32>,
    ) -> f32 {
        let run = self.lora.as_ref().map(|l| LoraRun {
            lora: l,
            params,
            acts: lacts,
        });
        model::forward_scored(
            &self.mc,
            &self.layout,
            self.base(params),
            run,
            acts,
            grad_scale,
        )
    }

    /// Forward with the trained weights, logits only.
    pub fn forward_logits(&self, params: &[f32], acts: &mut Activations, lacts: &mut LoraActs) {
        let run = self.lora.as_ref().map(|l| LoraRun {
            lora: l,
            params,
            acts: lacts,
        });
        model::forward_with(&self.mc, &self.layout, self.base(params), run, acts);
    }

    /// Forward with the trained weights up to the final hidden states, no output head (a
    /// reward model's scalar head reads them).
    pub fn forward_hidden(&self, params: &[f32], acts: &mut Activations, lacts: &mut LoraActs) {
        let run = self.lora.as_ref().map(|l| LoraRun {
            lora: l,
            params,
            acts: lacts,
        });
        model::forward_hidden_with(&self.mc, &self.layout, self.base(params), run, acts);
    }

    /// Forward with the trained weights; each scored position's target log-prob and
    /// log-sum-exp (the head runs on the scored rows only, a few at a time: see
    /// [`model::scored_logprobs`]).
    pub fn forward_logprobs(
        &self,
        params: &[f32],
        acts: &mut Activations,
        lacts: &mut LoraActs,
        targets: &[u32],
    ) -> (Vec<f32>, Vec<f32>) {
        self.forward_hidden(params, acts, lacts);
        model::scored_logprobs(&self.mc, &self.layout, self.base(params), acts, targets)
    }

    /// Accumulate into `grads` the gradient of `−Σ w_i · log p(target_i)` after
    /// [`Policy::forward_logprobs`] (`lse` from it).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_logprobs(
        &self,
        params: &[f32],
        grads: &mut [f32],
        acts: &mut Activations,
        lacts: &mut LoraActs,
        targets: &[u32],
        lse: &[f32],
        w: &[f32],
    ) {
        // The head trains only in a full run (its weights are then in `params`).
        let head_grads = if self.lora.is_none() {
            Some(&mut *grads)
        } else {
            None
        };
        model::scored_head_backward(
            &self.mc,
            &self.layout,
            self.base(params),
            head_grads,
            acts,
            targets,
            lse,
            w,
        );
        self.backward_hidden(params, grads, acts, lacts);
    }

    /// [`Policy::forward_logprobs`] with the reference model — the base with the adapters
    /// switched off, or the starting weights of a full run. `None` when no reference is kept
    /// (full pretraining and SFT).
    pub fn reference_logprobs(
        &self,
        acts: &mut Activations,
        targets: &[u32],
    ) -> Option<(Vec<f32>, Vec<f32>)> {
        let w = match &self.frozen {
            Frozen::F32(f) => Weights::F32(f),
            Frozen::Stored(s) => Weights::Stored(s),
            Frozen::None => return None,
        };
        model::forward_hidden_with(&self.mc, &self.layout, w, None, acts);
        Some(model::scored_logprobs(
            &self.mc,
            &self.layout,
            w,
            acts,
            targets,
        ))
    }

    /// Accumulate into `grads` the gradient whose hidden-state gradient the caller left in
    /// `acts.hidden_grad_mut()` (after [`Policy::forward_hidden`]).
    pub fn backward_hidden(
        &self,
        params: &[f32],
        grads: &mut [f32],
        acts: &mut Activations,
        lacts: &mut LoraActs,
    ) {
        self.backward_from(params, grads, acts, lacts, true)
    }

    /// Accumulate into `grads` the gradient whose logits gradient the forward left in
    /// `acts.logits`.
    pub fn backward(
        &self,
        params: &[f32],
        grads: &mut [f32],
        acts: &mut Activations,
        lacts: &mut LoraActs,
    ) {
        self.backward_from(params, grads, acts, lacts, false)
    }

    fn backward_from(
        &self,
        params: &[f32],
        grads: &mut [f32],
        acts: &mut Activations,
        lacts: &mut LoraActs,
        from_hidden: bool,
    ) {
        let backward = if from_hidden {
            model::backward_hidden_with
        } else {
            model::backward_with
        };
        match &self.lora {
            Some(l) => {
                let g = LoraGrad {
                    lora: l,
                    params,
                    grads,
                    acts: lacts,
                };
                backward(
                    &self.mc,
                    &self.layout,
                    self.base(params),
                    None,
                    Some(g),
                    acts,
                );
            }
            None => backward(
                &self.mc,
                &self.layout,
                Weights::F32(params),
                Some(grads),
                None,
                acts,
            ),
        }
    }
}

// ---- objectives -------------------------------------------------------------------------------

/// One step's result.
pub(crate) struct StepOut {
    pub loss: f32,
    /// Tokens run through the model (for tokens/s).
    pub tokens: u64,
    /// Further per-step metrics (DPO's rewards, …), written to `metrics.jsonl` and reported.
    pub metrics: Map<String, Value>,
}

/// One evaluation's result.
pub(crate) struct Evaluation {
    /// The loss on fixed training batches; `None` reports the last step's loss.
    pub train_loss: Option<f32>,
    pub val_loss: f32,
    /// Generated text (pretraining), empty otherwise.
    pub sample: String,
    pub token_accuracy: Option<f32>,
    pub metrics: Map<String, Value>,
    /// Something the user should know about the run (DPO's falling chosen log-prob).
    pub warning: Option<String>,
}

/// What a run optimizes (a closed set: STYLE 11).
pub(crate) enum Objective<'a> {
    /// Pretraining: next-token cross-entropy on windows of a token shard.
    NextToken(crate::run::NextToken<'a>),
    /// Masked next-token cross-entropy on the assistant tokens of conversations.
    Sft(Sft),
    /// Direct preference optimization (sigmoid, IPO or SimPO) on preference pairs.
    Dpo(Box<Dpo>),
    /// Distillation: the teacher's replies (sequence-level) or distributions (token-level).
    Distill(Box<Distill>),
    /// A reward model: Bradley–Terry on a scalar head, on preference pairs.
    Reward(Box<Reward>),
    /// Reinforcement learning on the policy's own samples, scored by a reward model or a
    /// grader.
    Rl(Box<Rl<'a>>),
}

impl Objective<'_> {
    fn evaluate(
        &mut self,
        policy: &Policy,
        params: &[f32],
        step: u64,
    ) -> Result<Evaluation, TrainError> {
        Ok(match self {
            Objective::NextToken(o) => o.evaluate(policy, params, step),
            Objective::Sft(o) => o.evaluate(policy, params),
            Objective::Dpo(o) => o.evaluate(policy, params),
            Objective::Distill(o) => o.evaluate(policy, params),
            Objective::Reward(o) => o.evaluate(policy, params),
            Objective::Rl(o) => o.evaluate(policy, params)?,
        })
    }

    fn accumulate(
        &mut self,
        policy: &Policy,
        params: &[f32],
        grads: &mut [f32],
        state: &mut TrainState,
        grad_accum: usize,
    ) -> Result<StepOut, TrainError> {
        match self {
            Objective::NextToken(o) => o.accumulate(policy, params, grads, state, grad_accum),
            Objective::Sft(o) => Ok(o.accumulate(policy, params, grads, state, grad_accum)),
            Objective::Dpo(o) => Ok(o.accumulate(policy, params, grads, state, grad_accum)),
            Objective::Distill(o) => Ok(o.accumulate(policy, params, grads, state, grad_accum)),
            Objective::Reward(o) => o.accumulate(policy, params, grads, state, grad_accum),
            Objective::Rl(o) => o.accumulate(policy, params, grads, state, grad_accum),
        }
    }
}

/// Supervised fine-tuning on tokenized conversations.
pub(crate) struct Sft {
    pub train: Vec<Example>,
    pub val: Vec<Example>,
    pub batch: usize,
    pub ctx: usize,
    pub pad: u32,
    pub acts: Activations,
    pub lacts: LoraActs,
}

impl Sft {
    fn accumulate(
        &mut self,
        policy: &Policy,
        params: &[f32],
        grads: &mut [f32],
        state: &mut TrainState,
        grad_accum: usize,
    ) -> StepOut {
        let mut sb = state.batcher.examples();
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        let mut loss = 0.0;
        for _ in 0..grad_accum {
            sb.next(
                &self.train,
                self.batch,
                self.ctx,
                self.pad,
                &mut inputs,
                &mut targets,
            );
            self.acts.set_scored(&inputs, &targets);
            let scale = 1.0 / grad_accum as f32;
            loss += scale * policy.forward_ce(params, &mut self.acts, &mut self.lacts, Some(scale));
            policy.backward(params, grads, &mut self.acts, &mut self.lacts);
            state.tokens_seen += targets.iter().filter(|&&t| t != IGNORE).count() as u64;
        }
        state.batcher.advance_to(sb);
        let mut metrics = Map::new();
        metrics.insert("trained_tokens".into(), json!(state.tokens_seen));
        StepOut {
            loss,
            tokens: (self.batch * self.ctx * grad_accum) as u64,
            metrics,
        }
    }

    /// Mean validation loss and next-token accuracy over the trained positions of `val`.
    fn evaluate(&mut self, policy: &Policy, params: &[f32]) -> Evaluation {
        let (loss, acc) = if self.val.is_empty() {
            (f32::NAN, f32::NAN)
        } else {
            sft_eval(self, policy, params)
        };
        let mut metrics = Map::new();
        metrics.insert("token_accuracy".into(), json!(acc));
        Evaluation {
            train_loss: None,
            val_loss: loss,
            sample: String::new(),
            token_accuracy: Some(acc).filter(|a| a.is_finite()),
            metrics,
            warning: None,
        }
    }
}

fn sft_eval(s: &mut Sft, policy: &Policy, params: &[f32]) -> (f32, f32) {
    let vocab = policy.mc.vocab_size;
    let (mut loss_sum, mut scored, mut correct) = (0f64, 0usize, 0usize);
    for chunk in s.val.chunks(s.batch) {
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for k in 0..s.batch {
            // a short last batch is filled with unscored copies
            let ex = &chunk[k.min(chunk.len() - 1)];
            sft::row(ex, s.ctx, s.pad, &mut inputs, &mut targets);
            if k >= chunk.len() {
                let n = targets.len();
                targets[n - s.ctx..].fill(IGNORE);
            }
        }
        s.acts.set_scored(&inputs, &targets);
        let n = targets.iter().filter(|&&t| t != IGNORE).count();
        let loss = policy.forward_ce(params, &mut s.acts, &mut s.lacts, None);
        loss_sum += f64::from(loss) * n as f64;
        scored += n;
        for (row, &t) in s.acts.logits.chunks_exact(vocab).zip(&targets) {
            if t != IGNORE {
                correct += usize::from(argmax(row) == t);
            }
        }
    }
    (
        (loss_sum / scored.max(1) as f64) as f32,
        correct as f32 / scored.max(1) as f32,
    )
}

pub(crate) fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |m, (i, &v)| if v > m.1 { (i, v) } else { m },
        )
        .0 as u32
}

// ---- the loop ---------------------------------------------------------------------------------

/// How a loop ended.
pub(crate) struct Ended {
    pub train_loss: f32,
    pub val_loss: f32,
    pub interrupted: bool,
}

/// Run `objective` on `policy` from `state` until `lc.iters` steps (or a stop request),
/// checkpointing into `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    out: &Path,
    lc: &LoopConfig,
    policy: &Policy,
    objective: &mut Objective,
    params: &mut [f32],
    opt: &mut AdamW,
    state: &mut TrainState,
    stop: &AtomicBool,
    on: &mut dyn FnMut(Event),
) -> Result<Ended, TrainError> {
    let mut metrics = Metrics::open(out, state.step, state.evaluated)?;
    let mut grads = vec![0f32; params.len()];
    let (schedule, adamw) = (lc.schedule(), lc.adamw());
    let (mut last_train, mut last_val) = (f32::NAN, f32::NAN);
    let mut interrupted = false;
    let save = |params: &[f32], opt: &AdamW, state: &TrainState, on: &mut dyn FnMut(Event)| {
        let ck = CheckpointRef { params, opt, state };
        save_reported(out, policy.tensors(), ck, lc.keep, on)
    };
    loop {
        let step = state.step;
        let due = step.is_multiple_of(lc.eval_every) || step == lc.iters;
        if due && !state.evaluated {
            let e = objective.evaluate(policy, params, step)?;
            if let Some(t) = e.train_loss {
                last_train = t;
            }
            last_val = e.val_loss;
            let mut line = Map::new();
            line.insert("step".into(), json!(step));
            line.insert("train_loss".into(), json!(last_train));
            line.insert("val_loss".into(), json!(last_val));
            if matches!(objective, Objective::NextToken(_)) {
                line.insert("sample".into(), json!(e.sample));
            }
            line.extend(e.metrics.clone());
            if let Some(w) = &e.warning {
                line.insert("warning".into(), json!(w));
            }
            metrics.line(Value::Object(line))?;
            on(Event::Eval {
                step,
                train_loss: last_train,
                val_loss: last_val,
                sample: &e.sample,
                token_accuracy: e.token_accuracy,
                metrics: &e.metrics,
            });
            if let Some(w) = &e.warning {
                on(Event::Warning { step, message: w });
            }
            state.evaluated = true;
            if last_val.is_finite() && state.best_val_loss.is_none_or(|b| last_val < b) {
                state.best_val_loss = Some(last_val);
            }
            if step > 0 {
                save(params, opt, state, on)?;
            }
        }
        if step >= lc.iters {
            break;
        }
        if stop.load(Ordering::Relaxed) {
            save(params, opt, state, on)?;
            interrupted = true;
            break;
        }
        let started = Instant::now();
        let lr = schedule.at(step);
        grads.fill(0.0);
        let s = objective.accumulate(policy, params, &mut grads, state, lc.grad_accum)?;
        if !s.loss.is_finite() {
            return Err(diverged(step, s.loss));
        }
        let grad_norm = clip_grad_norm(&mut grads, lc.grad_clip);
        opt.update(&adamw, policy.tensors(), lr, params, &grads);
        let secs = started.elapsed().as_secs_f64();
        state.step += 1;
        state.evaluated = false;
        state.train_seconds += secs;
        last_train = s.loss;
        let tokens_per_s = s.tokens as f64 / secs;
        let mut line = Map::new();
        line.insert("step".into(), json!(step));
        line.insert("loss".into(), json!(s.loss));
        line.insert("lr".into(), json!(lr));
        line.insert("grad_norm".into(), json!(grad_norm));
        line.insert("ms".into(), json!(secs * 1e3));
        line.insert("tokens_per_s".into(), json!(tokens_per_s));
        line.extend(s.metrics.clone());
        metrics.line(Value::Object(line))?;
        on(Event::Step {
            step,
            loss: s.loss,
            lr,
            grad_norm,
            ms: secs * 1e3,
            tokens_per_s,
            metrics: &s.metrics,
        });
    }
    Ok(Ended {
        train_loss: last_train,
        val_loss: last_val,
        interrupted,
    })
}
