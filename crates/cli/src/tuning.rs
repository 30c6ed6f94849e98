//! The binary's side of `ferrolm serve`'s files and fine-tuning API: the server crate never
//! touches tensors, so it gets its training-file check, its training run and its model
//! loader from here, as [`Hooks`].
//!
//! A job is `ferrolm finetune` with OpenAI's defaults: LoRA rank 8, alpha 16 on q, k, v, o,
//! gate, up, down; lr 2e-4 × the job's learning_rate_multiplier (DPO: 2e-5 ×, the sigmoid
//! loss with the job's beta); sequences up to 512 tokens;
//! an evaluation and a checkpoint every ~1/5 of the steps. Training runs on a rayon pool of
//! `--train-threads` threads of its own (`install`), so the engines' pools keep theirs.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use ferrolm_server::tuner::{
    FileFormat, Hooks, JobMethod, Load, PreferenceFigures, Progress, TrainEnd, TrainSpec,
};
use ferrolm_train::dpo::{self, DpoConfig, DpoLoss};
use ferrolm_train::finetune::{self, FinetuneConfig, Method, ObjectiveConfig};
use ferrolm_train::lora::{LoraConfig, Target};
use ferrolm_train::rl::{self, Advantage, RlConfig, Scorer};
use ferrolm_train::run::Event;
use ferrolm_train::sft;

/// Checkpoints (and evaluations) a job writes, about.
const CHECKPOINTS: u64 = 5;
/// LoRA's learning rate at learning_rate_multiplier 1.
const LORA_LR: f64 = 2e-4;
/// LoRA's learning rate for DPO jobs at learning_rate_multiplier 1 (preference tuning moves
/// a model further per step than SFT: a tenth of the SFT rate, as in TRL's examples).
const DPO_LORA_LR: f64 = 2e-5;
const MAX_LEN: usize = 512;
/// LoRA's learning rate for reinforcement jobs at learning_rate_multiplier 1.
const RL_LORA_LR: f64 = 5e-5;
/// Most tokens per sampled reply in reinforcement jobs.
const RL_MAX_TOKENS: usize = 128;

/// The examples of a fine-tuning file in `format`, or its bad lines as `line N: reason`.
/// A file of either format is judged by its first line's shape: a line with `input` is a
/// preference pair.
fn examples(text: &str, format: &FileFormat) -> Result<usize, Vec<String>> {
    let lines = |errors: Vec<sft::LineError>| errors.iter().map(ToString::to_string).collect();
    let format = match format {
        FileFormat::Either => {
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            let v: serde_json::Value = serde_json::from_str(first).unwrap_or_default();
            let last_role = v["messages"]
                .as_array()
                .and_then(|m| m.last())
                .and_then(|m| m["role"].as_str());
            if v.get("input").is_some() || v.get("preferred_output").is_some() {
                FileFormat::Preference
            } else if last_role.is_some_and(|r| r != "assistant") {
                // a conversation up to the turn to answer: reinforcement prompts
                FileFormat::Reinforcement(Vec::new())
            } else {
                FileFormat::Chat
            }
        }
        f => f.clone(),
    };
    match format {
        FileFormat::Preference => dpo::parse_jsonl(text).map(|p| p.len()).map_err(lines),
        FileFormat::Reinforcement(fields) => rl::validate_jsonl(text, &fields).map_err(lines),
        _ => sft::parse_jsonl(text).map(|c| c.len()).map_err(lines),
    }
}

/// Point a run's saved `finetune.json` at this machine's copies of its files and base model.
/// A job's files are named by id (their bytes never change) and its base by the job, but their
/// local paths differ between replicas: a run continued on another replica (from the blob
/// store's checkpoints) is the same run, which `finetune`'s resume check would otherwise
/// refuse as "other settings". Every other setting is still checked.
fn relocate(out: &Path, cfg: &FinetuneConfig) -> Result<(), String> {
    let saved = out.join("finetune.json");
    let text = std::fs::read_to_string(&saved)
        .map_err(|e| format!("cannot read {}: {e}", saved.display()))?;
    let mut was: FinetuneConfig = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{} is not a fine-tuning run's settings: {e}",
            saved.display()
        )
    })?;
    if was.train_file == cfg.train_file && was.val_file == cfg.val_file && was.base == cfg.base {
        return Ok(());
    }
    was.train_file = cfg.train_file.clone();
    was.val_file = cfg.val_file.clone();
    was.base = cfg.base.clone();
    let tmp = out.join(".finetune.json.tmp");
    let json = serde_json::to_string_pretty(&was).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, &saved))
        .map_err(|e| format!("cannot rewrite {}: {e}", saved.display()))
}

/// What `ferrolm finetune` is asked for a job (the same every time, so a resume matches).
fn config(spec: &TrainSpec, base: PathBuf) -> Result<FinetuneConfig, String> {
    let text = std::fs::read_to_string(&spec.training_file)
        .map_err(|e| format!("cannot read {}: {e}", spec.training_file.display()))?;
    let n = examples(&text, &spec.method.format()).map_err(|lines| lines.join("; "))? as u64;
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
        lr: (match spec.method {
            JobMethod::Supervised => LORA_LR,
            JobMethod::Dpo { .. } => DPO_LORA_LR,
            JobMethod::Reinforcement { .. } => RL_LORA_LR,
        } * spec.learning_rate_multiplier) as f32,
        min_lr: None,
        warmup: None,
        weight_decay: 0.0,
        grad_clip: 1.0,
        eval_every: match &spec.method {
            JobMethod::Reinforcement {
                eval_interval: Some(e),
                ..
            } => *e,
            _ => iters.div_ceil(CHECKPOINTS).max(1),
        },
        seed: spec.seed,
        // Every evaluation's checkpoint, plus those written on a stop.
        keep: 2 * CHECKPOINTS as usize,
        qlora: false,
        objective: match &spec.method {
            JobMethod::Supervised => ObjectiveConfig::Sft,
            JobMethod::Dpo { beta } => ObjectiveConfig::Dpo(DpoConfig {
                beta: *beta as f32,
                loss: DpoLoss::Sigmoid,
                simpo_gamma: 0.0,
            }),
            JobMethod::Reinforcement {
                grader,
                compute_multiplier,
                ..
            } => ObjectiveConfig::Rl(RlConfig {
                scorer: Scorer::Grader {
                    grader: grader.clone(),
                },
                k: ((4.0 * compute_multiplier).round() as usize).max(2),
                beta: 0.04,
                temperature: 1.0,
                top_p: 1.0,
                max_tokens: RL_MAX_TOKENS,
                advantage: Advantage::Grpo,
            }),
        },
        cache_dir: None,
        init: None,
    })
}

/// A DPO run's figures from an event's metrics (none for SFT).
fn preference(m: &serde_json::Map<String, serde_json::Value>) -> Option<PreferenceFigures> {
    let get = |k: &str| {
        m.get(k)
            .and_then(serde_json::Value::as_f64)
            .map(|x| x as f32)
    };
    Some(PreferenceFigures {
        rewards_chosen: get("rewards_chosen")?,
        rewards_rejected: get("rewards_rejected")?,
        reward_margin: get("reward_margin")?,
        pair_accuracy: get("pair_accuracy")?,
        logps_chosen: get("logps_chosen")?,
    })
}

/// A reinforcement run's figures from an event's metrics (none for the other methods).
fn rl_figures(
    m: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    [
        "reward_mean",
        "reward_std",
        "kl",
        "completion_length",
        "val_reward_mean",
        "val_completion_length",
    ]
    .iter()
    .filter_map(|k| m.get(*k).map(|v| ((*k).to_owned(), v.clone())))
    .collect()
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
        if spec.resume {
            relocate(&spec.out, &cfg)?;
        }
        // Reinforcement: samples from the inference engine, graded by the job's grader.
        let mut env = match &cfg.objective {
            ObjectiveConfig::Rl(r) => {
                let (rows, tokens) = crate::rl::engine_size(&cfg, r);
                Some(
                    crate::rl::EngineEnv::open(&cfg.base, r, rows, tokens, threads)
                        .map_err(|e| format!("{e:#}"))?,
                )
            }
            _ => None,
        };
        let env = env.as_mut().map(|e| e as &mut dyn rl::RlEnv);
        let summary = pool.install(|| {
            finetune::finetune_with(
                &cfg,
                &spec.out,
                spec.resume,
                stop,
                &mut |ev| match ev {
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
                    Event::Step {
                        step,
                        loss,
                        metrics,
                        ..
                    } => on(Progress::Step {
                        step: step + 1,
                        train_loss: loss,
                        preference: preference(metrics),
                        extra: rl_figures(metrics),
                    }),
                    Event::Eval {
                        step,
                        train_loss,
                        val_loss,
                        token_accuracy,
                        metrics,
                        ..
                    } => on(Progress::Eval {
                        step,
                        train_loss,
                        valid_loss: val_loss,
                        token_accuracy,
                        preference: preference(metrics),
                        extra: rl_figures(metrics),
                    }),
                    Event::Checkpoint { step, .. } => on(Progress::Checkpoint { step }),
                    Event::Warning { message, .. } => on(Progress::Warning {
                        message: message.to_owned(),
                    }),
                    Event::Info { .. } => {}
                },
                env,
            )
        });
        let summary = summary.map_err(|e| e.to_string())?;
        Ok(TrainEnd {
            interrupted: summary.interrupted,
            steps: summary.iters,
        })
    };
    Ok(Hooks {
        validate: Box::new(examples),
        grader: Box::new(|g: &serde_json::Value| {
            ferrolm_train::grader::Grader::parse(g).map(|g| g.item_fields())
        }),
        train: Box::new(train),
        load,
    })
}
