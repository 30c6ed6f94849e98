//! `ferrolm finetune`: supervised fine-tuning of a pretrained model on chat JSONL, the whole
//! model (`full`) or LoRA adapters on a frozen base (`lora`). The same loop as pretraining
//! (warm-up + cosine AdamW, clipping, accumulation, metrics, checkpoints, exact resume), over
//! conversations instead of token windows: the loss is on assistant tokens only.
//!
//! ```text
//! OUT/finetune.json   what was asked (base, method, settings) — resume checks it
//!     metrics.jsonl   every step; every evaluation with validation loss and token accuracy
//!     checkpoints/    the trainable tensors (adapters, or the whole model) + AdamW + cursor
//!     adapter/        (lora) the final adapter in PEFT format
//!     config.json, tokenizer.gguf   (full) make OUT a run directory like `ferrolm train`'s
//! ```
//! `--model OUT` serves the result either way: a LoRA run is its base with the adapter folded
//! in (see `export`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ferrolm_tokenizer::{chat::ChatTemplate, Tokenizer};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::base;
use crate::checkpoint::{self, CheckpointRef, TrainState};
use crate::config::{LoopConfig, RunConfig};
use crate::data::Batcher;
use crate::lora::{Lora, LoraActs, LoraConfig};
use crate::model::{
    self, Activations, Layout, LoraGrad, LoraRun, ModelConfig, TensorSlot, Weights, IGNORE,
};
use crate::optim::{clip_grad_norm, AdamW};
use crate::run::{diverged, save_reported, write_json, Event, Metrics, Summary};
use crate::sft::{self, Example, SftBatcher};
use crate::TrainError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Method {
    Full,
    Lora(LoraConfig),
}

/// Everything a fine-tuning run is (saved as `finetune.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// A GGUF model or a training run directory.
    pub base: PathBuf,
    pub train_file: PathBuf,
    pub val_file: Option<PathBuf>,
    pub method: Method,
    /// Longest sequence in tokens; longer conversations are cut.
    pub max_len: usize,
    pub epochs: f64,
    /// Steps; default `epochs × examples / (batch × grad_accum)`.
    pub iters: Option<u64>,
    pub batch: usize,
    pub grad_accum: usize,
    pub lr: f32,
    pub min_lr: Option<f32>,
    pub warmup: Option<u64>,
    pub weight_decay: f32,
    pub grad_clip: f32,
    pub eval_every: u64,
    pub seed: u64,
    pub keep: usize,
    /// QLoRA: keep the base in its stored quantized form (LoRA only).
    #[serde(default)]
    pub qlora: bool,
}

/// Trainable tensors: the whole model, or the adapters.
enum Trainable {
    Full(Layout),
    Lora(Lora),
}

impl Trainable {
    fn tensors(&self) -> &[TensorSlot] {
        match self {
            Trainable::Full(l) => &l.tensors,
            Trainable::Lora(l) => &l.tensors,
        }
    }
}

fn data_error(path: &Path, errors: &[sft::LineError]) -> TrainError {
    let shown: Vec<String> = errors.iter().take(5).map(|e| e.to_string()).collect();
    let more = errors.len().saturating_sub(5);
    TrainError::Config {
        what: path.display().to_string(),
        reason: format!(
            "{}{}",
            shown.join("; "),
            if more > 0 {
                format!("; and {more} more bad lines")
            } else {
                String::new()
            }
        ),
    }
}

/// Read, validate and tokenize a chat JSONL file.
pub fn load_examples(
    path: &Path,
    tok: &Tokenizer,
    template: &ChatTemplate,
) -> Result<Vec<Example>, TrainError> {
    let text = crate::data::read_corpus(path)?;
    let convs = sft::parse_jsonl(&text).map_err(|e| data_error(path, &e))?;
    let mut out = Vec::with_capacity(convs.len());
    for c in &convs {
        let ex = sft::encode(tok, template, c).map_err(|reason| {
            data_error(
                path,
                &[sft::LineError {
                    line: c.line,
                    reason,
                }],
            )
        })?;
        out.push(ex);
    }
    Ok(out)
}

/// Fine-tune as `cfg` says into `out` (or resume it).
pub fn finetune(
    cfg: &FinetuneConfig,
    out: &Path,
    resume: bool,
    stop: &AtomicBool,
    on: &mut dyn FnMut(Event),
) -> Result<Summary, TrainError> {
    let saved = out.join("finetune.json");
    if resume {
        let text = std::fs::read_to_string(&saved).map_err(TrainError::io(&saved))?;
        let was: FinetuneConfig = serde_json::from_str(&text).map_err(|e| TrainError::Config {
            what: saved.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut asked = cfg.clone();
        asked.iters = was.iters.or(asked.iters);
        if was != asked {
            return Err(TrainError::Config {
                what: out.display().to_string(),
                reason: "was fine-tuned with other settings; resume with the same ones, or choose a new --out".into(),
            });
        }
    } else if saved.exists() {
        return Err(TrainError::Config {
            what: out.display().to_string(),
            reason: "already holds a fine-tuning run: pass --resume to continue it, or choose a new --out".into(),
        });
    }
    if cfg.batch == 0
        || cfg.grad_accum == 0
        || cfg.max_len < 2
        || cfg.eval_every == 0
        || cfg.lr.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
    {
        return Err(TrainError::Config {
            what: "fine-tuning settings".into(),
            reason: "batch, grad_accum and eval_every must be ≥ 1, max_len ≥ 2, lr > 0".into(),
        });
    }
    if cfg.qlora && cfg.method == Method::Full {
        return Err(TrainError::Config {
            what: "--qlora".into(),
            reason: "QLoRA keeps the base quantized and frozen, so it needs --method lora".into(),
        });
    }
    // QLoRA: the base stays in its stored (quantized) form; otherwise dequantized to f32.
    let (mc, gguf, mut frozen, stored) = if cfg.qlora {
        let (c, s, g) = base::load_stored(&cfg.base)?;
        (c, g, Vec::new(), Some(s))
    } else {
        let b = base::load(&cfg.base)?;
        (b.config, b.gguf, b.params, None)
    };
    let mc = &mc;
    let tok = Tokenizer::from_gguf(&gguf)?;
    let template = ChatTemplate::from_gguf(&gguf, &tok)?;
    let train = load_examples(&cfg.train_file, &tok, &template)?;
    let val = match &cfg.val_file {
        Some(p) => load_examples(p, &tok, &template)?,
        None => Vec::new(),
    };
    let longest = train
        .iter()
        .chain(&val)
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(2);
    let ctx = cfg
        .max_len
        .min(longest.saturating_sub(1))
        .min(mc.context)
        .max(1);
    let per_step = cfg.batch * cfg.grad_accum;
    let iters = cfg.iters.unwrap_or(
        ((cfg.epochs * train.len() as f64) / per_step as f64)
            .ceil()
            .max(1.0) as u64,
    );
    let lc = LoopConfig {
        batch: cfg.batch,
        iters,
        lr: cfg.lr,
        min_lr: cfg.min_lr.unwrap_or(cfg.lr / 10.0),
        warmup: cfg.warmup.unwrap_or(iters / 30),
        decay_iters: iters,
        weight_decay: cfg.weight_decay,
        beta1: 0.9,
        beta2: 0.999,
        grad_clip: cfg.grad_clip,
        grad_accum: cfg.grad_accum,
        eval_every: cfg.eval_every,
        eval_iters: val.len().div_ceil(cfg.batch).max(1),
        seed: cfg.seed,
        sample_tokens: 0,
        keep: cfg.keep,
    };
    std::fs::create_dir_all(out).map_err(TrainError::io(out))?;
    if !resume {
        write_json(
            &saved,
            &FinetuneConfig {
                iters: Some(iters),
                ..cfg.clone()
            },
        )?;
    }
    let layout = Layout::new(mc);
    let trainable = match &cfg.method {
        Method::Full => Trainable::Full(layout.clone()),
        Method::Lora(l) => Trainable::Lora(Lora::new(mc, l.clone())),
    };
    let n_train = checkpoint::buffer_len(trainable.tensors());
    let (mut params, mut opt, mut state) = match checkpoint::latest(out)? {
        Some(dir) if resume => {
            let c = checkpoint::load(&dir, trainable.tensors())?;
            (c.params, c.opt, c.state)
        }
        _ => (
            match &trainable {
                Trainable::Full(_) => frozen.clone(),
                Trainable::Lora(l) => l.init(cfg.seed),
            },
            AdamW::new(n_train),
            TrainState {
                step: 0,
                evaluated: false,
                best_val_loss: None,
                batcher: Batcher::new(cfg.seed),
                tokens_seen: 0,
                train_seconds: 0.0,
            },
        ),
    };
    if matches!(trainable, Trainable::Full(_)) {
        // The full run's own weights are what it trains; keep one copy.
        frozen = Vec::new();
        let meta: Vec<(String, ferrolm_gguf::Value)> = gguf
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        crate::tokenize::write(&out.join("tokenizer.gguf"), &meta)?;
        write_json(
            &out.join("config.json"),
            &RunConfig {
                model: mc.clone(),
                train: lc.clone(),
            },
        )?;
    }
    let run_cfg = RunConfig {
        model: mc.clone(),
        train: lc.clone(),
    };
    let trained_tokens: u64 = train.iter().map(|e| e.trained_tokens() as u64).sum();
    let val_tokens: u64 = val.iter().map(|e| e.trained_tokens() as u64).sum();
    on(Event::Started {
        config: &run_cfg,
        params: n_train,
        train_tokens: trained_tokens,
        val_tokens,
        from_step: state.step,
    });
    let mut metrics = Metrics::open(out, state.step, state.evaluated)?;
    let rows = cfg.batch * ctx;
    let mut acts = Activations::new(mc, cfg.batch, ctx);
    let (mut lacts, lora) = match &trainable {
        Trainable::Lora(l) => (l.acts(rows), Some(l)),
        Trainable::Full(_) => (LoraActs::default(), None),
    };
    let pad = tok.eos_id.unwrap_or(0);
    let mut grads = vec![0f32; n_train];
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    let (schedule, adamw) = (lc.schedule(), lc.adamw());
    let (mut last_train, mut last_val) = (f32::NAN, f32::NAN);
    let mut interrupted = false;
    let save = |params: &[f32], opt: &AdamW, state: &TrainState, on: &mut dyn FnMut(Event)| {
        let ck = CheckpointRef { params, opt, state };
        save_reported(out, trainable.tensors(), ck, lc.keep, on)
    };
    loop {
        let step = state.step;
        if (step % lc.eval_every == 0 || step == iters) && !state.evaluated {
            let base_params = match (&stored, lora.is_some()) {
                (Some(s), _) => Weights::Stored(s),
                (None, true) => Weights::F32(&frozen),
                (None, false) => Weights::F32(&params),
            };
            let lp: &[f32] = if lora.is_some() { &params } else { &[] };
            let (loss, acc) = evaluate(
                mc,
                &layout,
                base_params,
                lora.map(|l| (l, lp)),
                &val,
                cfg.batch,
                ctx,
                pad,
                &mut acts,
                &mut lacts,
            );
            last_val = loss;
            metrics.line(json!({"step": step, "train_loss": last_train, "val_loss": loss, "token_accuracy": acc}))?;
            on(Event::Eval {
                step,
                train_loss: last_train,
                val_loss: loss,
                sample: "",
                token_accuracy: Some(acc).filter(|a| a.is_finite()),
            });
            state.evaluated = true;
            if step > 0 {
                save(&params, &opt, &state, on)?;
            }
        }
        if step >= iters {
            break;
        }
        if stop.load(Ordering::Relaxed) {
            save(&params, &opt, &state, on)?;
            interrupted = true;
            break;
        }
        let started = Instant::now();
        let lr = schedule.at(step);
        grads.fill(0.0);
        let mut loss = 0.0;
        let mut sb = SftBatcher {
            seed: state.batcher.seed,
            cursor: state.batcher.cursor,
        };
        for _ in 0..cfg.grad_accum {
            sb.next(&train, cfg.batch, ctx, pad, &mut inputs, &mut targets);
            acts.set_scored(&inputs, &targets);
            let scale = 1.0 / cfg.grad_accum as f32;
            match lora {
                Some(l) => {
                    let run = LoraRun {
                        lora: l,
                        params: &params,
                        acts: &mut lacts,
                    };
                    let base = match &stored {
                        Some(s) => Weights::Stored(s),
                        None => Weights::F32(&frozen),
                    };
                    loss += scale
                        * model::forward_scored(
                            mc,
                            &layout,
                            base,
                            Some(run),
                            &mut acts,
                            Some(scale),
                        );
                    let g = LoraGrad {
                        lora: l,
                        params: &params,
                        grads: &mut grads,
                        acts: &mut lacts,
                    };
                    model::backward_with(mc, &layout, base, None, Some(g), &mut acts);
                }
                None => {
                    loss += scale
                        * model::forward_scored(
                            mc,
                            &layout,
                            Weights::F32(&params),
                            None,
                            &mut acts,
                            Some(scale),
                        );
                    let w = Weights::F32(&params);
                    model::backward_with(mc, &layout, w, Some(&mut grads), None, &mut acts);
                }
            }
            state.tokens_seen += targets.iter().filter(|&&t| t != IGNORE).count() as u64;
        }
        state.batcher = Batcher {
            seed: sb.seed,
            cursor: sb.cursor,
        };
        if !loss.is_finite() {
            return Err(diverged(step, loss));
        }
        let grad_norm = clip_grad_norm(&mut grads, lc.grad_clip);
        opt.update(&adamw, trainable.tensors(), lr, &mut params, &grads);
        let secs = started.elapsed().as_secs_f64();
        state.step += 1;
        state.evaluated = false;
        state.train_seconds += secs;
        last_train = loss;
        let tokens_per_s = rows as f64 * cfg.grad_accum as f64 / secs;
        metrics.line(json!({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "ms": secs * 1e3, "tokens_per_s": tokens_per_s, "trained_tokens": state.tokens_seen}))?;
        on(Event::Step {
            step,
            loss,
            lr,
            grad_norm,
            ms: secs * 1e3,
            tokens_per_s,
        });
    }
    if let Some(l) = lora {
        let name = cfg
            .base
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        crate::peft::save(&out.join("adapter"), mc, l, &params, &name)?;
    }
    Ok(Summary {
        iters: state.step,
        train_loss: last_train,
        val_loss: last_val,
        ms_per_iter: state.train_seconds * 1e3 / state.step.max(1) as f64,
        params: n_train,
        interrupted,
        run_dir: out.to_owned(),
    })
}

/// Mean validation loss and next-token accuracy over the trained positions of `val`.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    c: &ModelConfig,
    layout: &Layout,
    base: Weights,
    lora: Option<(&Lora, &[f32])>,
    val: &[Example],
    batch: usize,
    ctx: usize,
    pad: u32,
    acts: &mut Activations,
    lacts: &mut LoraActs,
) -> (f32, f32) {
    if val.is_empty() {
        return (f32::NAN, f32::NAN);
    }
    let (mut loss_sum, mut scored, mut correct) = (0f64, 0usize, 0usize);
    for chunk in val.chunks(batch) {
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for k in 0..batch {
            // a short last batch is filled with unscored copies
            let ex = &chunk[k.min(chunk.len() - 1)];
            sft::row(ex, ctx, pad, &mut inputs, &mut targets);
            if k >= chunk.len() {
                let n = targets.len();
                targets[n - ctx..].fill(IGNORE);
            }
        }
        acts.set_scored(&inputs, &targets);
        let n = targets.iter().filter(|&&t| t != IGNORE).count();
        let run = lora.map(|(l, p)| LoraRun {
            lora: l,
            params: p,
            acts: &mut *lacts,
        });
        let loss = model::forward_scored(c, layout, base, run, acts, None);
        loss_sum += f64::from(loss) * n as f64;
        scored += n;
        for (row, &t) in acts.logits.chunks_exact(c.vocab_size).zip(&targets) {
            if t == IGNORE {
                continue;
            }
            let arg = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |m, (i, &v)| if v > m.1 { (i, v) } else { m },
                )
                .0;
            correct += usize::from(arg as u32 == t);
        }
    }
    (
        (loss_sum / scored.max(1) as f64) as f32,
        correct as f32 / scored.max(1) as f32,
    )
}
