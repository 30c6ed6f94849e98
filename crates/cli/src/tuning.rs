//! The binary's side of `ferrolm serve`'s files and fine-tuning API: the server crate never
//! touches tensors, so it gets its training-file check, its training run and its model
//! loader from here, as [`Hooks`].
//!
//! A job is `ferrolm finetune` with OpenAI's defaults: LoRA rank 8, alpha 16 on q, k, v, o,
//! gate, up, down; lr 2e-4 × the job's learning_rate_multiplier; sequences up to 512 tokens;
//! an evaluation and a checkpoint every ~1/5 of the steps. Training runs on a rayon pool of
//! `--train-threads` threads of its own (`install`), so the engines' pools keep theirs.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use ferrolm_server::tuner::{Hooks, Load, Progress, TrainEnd, TrainSpec};
use ferrolm_train::finetune::{self, FinetuneConfig, Method};
use ferrolm_train::lora::{LoraConfig, Target};
use ferrolm_train::run::Event;
use ferrolm_train::sft;

/// Checkpoints (and evaluations) a job writes, about.
const CHECKPOINTS: u64 = 5;
/// LoRA's learning rate at learning_rate_multiplier 1.
const LORA_LR: f64 = 2e-4;
const MAX_LEN: usize = 512;

/// The examples of a chat fine-tuning file, or its bad lines as `line N: reason`.
fn examples(text: &str) -> Result<usize, Vec<String>> {
    sft::parse_jsonl(text)
        .map(|c| c.len())
        .map_err(|errors| errors.iter().map(ToString::to_string).collect())
}

/// What `ferrolm finetune` is asked for a job (the same every time, so a resume matches).
fn config(spec: &TrainSpec, base: PathBuf) -> Result<FinetuneConfig, String> {
    let text = std::fs::read_to_string(&spec.training_file)
        .map_err(|e| format!("cannot read {}: {e}", spec.training_file.display()))?;
    let n = examples(&text).map_err(|lines| lines.join("; "))? as u64;
    let iters = (u64::from(spec.n_epochs) * n)
        .div_ceil(spec.batch_size as u64)
        .max(1);
    Ok(FinetuneConfig {
        base,
        train_file: spec.training_file.clone(),
        val_file: spec.validation_file.clone(),
        method: Method::Lora(LoraConfig {
            rank: 8,
            alpha: 16.0,
            targets: Target::ALL.to_vec(),
        }),
        max_len: MAX_LEN,
        epochs: f64::from(spec.n_epochs),
        iters: None,
        batch: spec.batch_size,
        grad_accum: 1,
        lr: (LORA_LR * spec.learning_rate_multiplier) as f32,
        min_lr: None,
        warmup: None,
        weight_decay: 0.0,
        grad_clip: 1.0,
        eval_every: iters.div_ceil(CHECKPOINTS).max(1),
        seed: spec.seed,
        // Every evaluation's checkpoint, plus those written on a stop.
        keep: 2 * CHECKPOINTS as usize,
        qlora: false,
    })
}

/// The hooks: `bases` are the served base models (id, file), `threads` the training pool's
/// size, `load` how a run directory becomes a served model.
pub fn hooks(bases: Vec<(String, PathBuf)>, threads: usize, load: Box<Load>) -> Result<Hooks> {
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ferrolm-train-{i}"))
            .build()
            .context("starting the fine-tuning thread pool")?,
    );
    let train = move |spec: &TrainSpec,
                      stop: &AtomicBool,
                      on: &mut (dyn FnMut(Progress) + Send)|
          -> Result<TrainEnd, String> {
        let base = bases
            .iter()
            .find(|(id, _)| *id == spec.base_model)
            .map(|(_, p)| p.clone())
            .ok_or_else(|| {
                format!(
                    "the base model `{}` is not served any more: restart the server with it",
                    spec.base_model
                )
            })?;
        let cfg = config(spec, base)?;
        let summary = pool.install(|| {
            finetune::finetune(&cfg, &spec.out, spec.resume, stop, &mut |ev| match ev {
                Event::Started {
                    config,
                    train_tokens,
                    from_step,
                    ..
                } => on(Progress::Started {
                    from_step,
                    total_steps: config.train.iters,
                    tokens_per_epoch: train_tokens,
                }),
                Event::Step { step, loss, .. } => on(Progress::Step {
                    step: step + 1,
                    train_loss: loss,
                }),
                Event::Eval {
                    step,
                    train_loss,
                    val_loss,
                    token_accuracy,
                    ..
                } => on(Progress::Eval {
                    step,
                    train_loss,
                    valid_loss: val_loss,
                    token_accuracy,
                }),
                Event::Checkpoint { step, .. } => on(Progress::Checkpoint { step }),
            })
        });
        let summary = summary.map_err(|e| e.to_string())?;
        Ok(TrainEnd {
            interrupted: summary.interrupted,
            steps: summary.iters,
        })
    };
    Ok(Hooks {
        validate: Box::new(examples),
        train: Box::new(train),
        load,
    })
}
