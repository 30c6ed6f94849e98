//! `ferrolm train`, `ferrolm export` and `ferrolm plot`: the command-line face of
//! `ferrolm-train` — flags over the config file, a progress bar, Ctrl-C/SIGTERM to stop with a
//! checkpoint, `--json` for scripts, and the loss curve as SVG.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferrolm_train::config::{ConfigFile, LoopFile, ModelFile};
use ferrolm_train::export::{self, ExportType};
use ferrolm_train::run::{self, Event, Summary, TrainArgs};
use ferrolm_train::tokenize::TokenizerChoice;

use crate::cost::chart;

#[derive(Args)]
pub struct TrainCmd {
    /// Training text (UTF-8), or a directory written by `ferrolm prepare`.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Vocabulary: `char`, `bpe:VOCAB` (byte-level BPE trained on the corpus), or a .gguf
    /// model whose tokenizer to reuse.
    #[arg(long)]
    tokenizer: Option<TokenizerChoice>,
    /// Run directory: config, tokenizer, shards, metrics, checkpoints.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its latest checkpoint (only --iters, --eval-every,
    /// --eval-iters and --keep may change).
    #[arg(long)]
    resume: bool,
    /// Model and loop settings (TOML or JSON: [model] layers, heads, kv_heads, width, ffn,
    /// context, rope_theta, rms_eps, tied_embeddings; [train] batch, iters, lr, …); flags
    /// override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long)]
    heads: Option<usize>,
    /// Key/value heads (grouped-query attention; default: --heads).
    #[arg(long)]
    kv_heads: Option<usize>,
    #[arg(long)]
    width: Option<usize>,
    /// SwiGLU hidden width (default: 8/3 · width, rounded up to 8).
    #[arg(long)]
    ffn: Option<usize>,
    /// Context length in tokens.
    #[arg(long)]
    context: Option<usize>,
    #[arg(long)]
    batch: Option<usize>,
    /// Optimizer steps.
    #[arg(long)]
    iters: Option<u64>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f32>,
    /// Floor of the cosine decay (default: lr / 10).
    #[arg(long)]
    min_lr: Option<f32>,
    /// Linear warm-up steps.
    #[arg(long)]
    warmup: Option<u64>,
    /// Step at which the cosine reaches --min-lr (default: --iters).
    #[arg(long)]
    decay_iters: Option<u64>,
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Clip gradients to this global L2 norm (0: off).
    #[arg(long)]
    grad_clip: Option<f32>,
    /// Micro-batches per step.
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Evaluate, sample and checkpoint every N steps.
    #[arg(long)]
    eval_every: Option<u64>,
    /// Batches per evaluation.
    #[arg(long)]
    eval_iters: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Checkpoints to keep.
    #[arg(long)]
    keep: Option<usize>,
    /// Threads (default: available cores).
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Print one JSON summary as the last line of stdout.
    #[arg(long)]
    json: bool,
}

impl TrainCmd {
    fn config(&self) -> Result<ConfigFile> {
        let file = match &self.config {
            Some(p) => ConfigFile::read(p)?,
            None => ConfigFile::default(),
        };
        let flags = ConfigFile {
            model: ModelFile {
                layers: self.layers,
                heads: self.heads,
                kv_heads: self.kv_heads,
                width: self.width,
                ffn: self.ffn,
                context: self.context,
                ..Default::default()
            },
            train: LoopFile {
                batch: self.batch,
                iters: self.iters,
                lr: self.lr,
                min_lr: self.min_lr,
                warmup: self.warmup,
                decay_iters: self.decay_iters,
                weight_decay: self.weight_decay,
                grad_clip: self.grad_clip,
                grad_accum: self.grad_accum,
                eval_every: self.eval_every,
                eval_iters: self.eval_iters,
                seed: self.seed,
                keep: self.keep,
                ..Default::default()
            },
        };
        Ok(file.merged(&flags))
    }
}

pub fn run_train(a: TrainCmd) -> Result<()> {
    let args = TrainArgs {
        data: a.data.clone(),
        tokenizer: a.tokenizer.clone(),
        out: a.out.clone(),
        resume: a.resume,
        config: a.config()?,
    };
    let summary = drive(a.threads, |stop, on| Ok(run::train(&args, stop, on)?))?;
    finish(&a.out, &summary, a.json, "--raw --prompt '...'")
}

/// Run `work` on a thread pool of `threads` with Ctrl-C/SIGTERM wired to its stop flag and
/// its events drawn as a progress bar (or as log lines when stderr is not a terminal).
pub fn drive(
    threads: Option<usize>,
    work: impl FnOnce(&AtomicBool, &mut dyn FnMut(Event)) -> Result<Summary>,
) -> Result<Summary> {
    let threads = crate::threads(threads)?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("starting the thread pool")?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::Relaxed) {
                eprintln!("\nsecond interrupt: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!(
                "\nstopping: finishing this step and writing a checkpoint (Ctrl-C again to abort)"
            );
        })
        .context("installing the Ctrl-C handler")?;
    }
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut last_log = std::time::Instant::now();
    let summary = work(&stop, &mut |ev| match ev {
        Event::Started {
            config,
            params,
            train_tokens,
            val_tokens,
            from_step,
        } => {
            let m = &config.model;
            eprintln!(
                "model: {} layers, width {}, {}/{} heads, ffn {}, context {}, vocab {} — {:.2} M parameters",
                m.n_layers, m.dim, m.n_heads, m.n_kv_heads, m.ffn_dim, m.context, m.vocab_size, params as f64 / 1e6
            );
            eprintln!(
                "data: {train_tokens} train / {val_tokens} validation tokens; {} threads{}",
                threads,
                if from_step > 0 {
                    format!("; resuming at step {from_step}")
                } else {
                    String::new()
                }
            );
            bar.set_length(config.train.iters);
            bar.set_position(from_step);
        }
        Event::Step {
            step,
            loss,
            lr,
            tokens_per_s,
            ms,
            metrics,
            ..
        } => {
            bar.set_position(step + 1);
            let prefs = preference_figures(metrics);
            bar.set_message(format!(
                "loss {loss:.4}{prefs} lr {lr:.2e} {tokens_per_s:.0} tok/s"
            ));
            if !tty && last_log.elapsed().as_secs() >= 10 {
                eprintln!(
                    "step {step}: loss {loss:.4}{prefs}, lr {lr:.2e}, {ms:.1} ms, {tokens_per_s:.0} tok/s"
                );
                last_log = std::time::Instant::now();
            }
        }
        Event::Warning { step, message } => {
            bar.suspend(|| eprintln!("warning at step {step}: {message}"));
        }
        Event::Info { message } => bar.suspend(|| eprintln!("{message}")),
        Event::Eval {
            step,
            train_loss,
            val_loss,
            sample,
            token_accuracy,
            metrics,
        } => {
            bar.suspend(|| {
                let acc = token_accuracy
                    .map(|a| format!(", validation token accuracy {a:.3}"))
                    .unwrap_or_default();
                let prefs = preference_figures(metrics);
                let prefs = if prefs.is_empty() {
                    prefs
                } else {
                    format!(" (validation{prefs})")
                };
                eprintln!(
                    "step {step}: train loss {train_loss:.4}, val loss {val_loss:.4}{acc}{prefs}"
                );
                if !sample.is_empty() {
                    eprintln!("--- sample ---\n{}\n--------------", sample.trim_end());
                }
            });
        }
        Event::Checkpoint { path, .. } => {
            bar.suspend(|| eprintln!("checkpoint: {}", path.display()));
        }
    })?;
    bar.finish_and_clear();
    Ok(summary)
}

/// DPO's figures for a progress line (empty for the other objectives).
fn preference_figures(m: &serde_json::Map<String, serde_json::Value>) -> String {
    let get = |k: &str| m.get(k).and_then(serde_json::Value::as_f64);
    let mut out = String::new();
    if let (Some(acc), Some(margin), Some(chosen)) = (
        get("pair_accuracy"),
        get("reward_margin"),
        get("logps_chosen"),
    ) {
        out = format!(", pair accuracy {acc:.3}, margin {margin:.3}, chosen logp {chosen:.1}");
    }
    // RL: the samples' mean reward and KL (steps), the greedy replies' (evaluations)
    if let (Some(r), Some(kl), Some(len)) =
        (get("reward_mean"), get("kl"), get("completion_length"))
    {
        out = format!(", reward {r:.3}, kl {kl:.4}, length {len:.0}");
    }
    if let (Some(r), Some(len)) = (get("val_reward_mean"), get("val_completion_length")) {
        out = format!(", greedy reward {r:.3}, length {len:.0}");
    }
    out
}

/// Report a finished (or stopped) run: the loss curve, how to use it, the JSON line.
/// Report a finished run; `try_args` are `generate`'s arguments to try it with, or
/// `eval reward …` for a reward model.
pub fn finish(out: &Path, summary: &Summary, json: bool, try_args: &str) -> Result<()> {
    let plot_path = write_plot(out)?;
    let val = if summary.val_loss.is_nan() {
        "no validation set".to_owned()
    } else {
        format!("val loss {:.4}", summary.val_loss)
    };
    eprintln!(
        "{} after {} steps: train loss {:.4}, {val}, {:.1} ms/step; loss curve: {}",
        if summary.interrupted {
            "stopped"
        } else {
            "done"
        },
        summary.iters,
        summary.train_loss,
        summary.ms_per_iter,
        plot_path.display()
    );
    match try_args.strip_prefix("eval reward") {
        Some(rest) => eprintln!(
            "use it: ferrolm eval reward --model {}{rest}, or serve it and POST /v1/rewards",
            out.display()
        ),
        None => eprintln!(
            "use it: ferrolm generate --model {} {try_args}",
            out.display()
        ),
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "iters": summary.iters,
                "train_loss": summary.train_loss,
                "val_loss": summary.val_loss,
                "ms_per_iter": summary.ms_per_iter,
                "params": summary.params,
                "interrupted": summary.interrupted,
            })
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct PlotCmd {
    /// Run directory.
    run_dir: PathBuf,
    /// Output SVG (default: RUN_DIR/loss.svg).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run_plot(a: PlotCmd) -> Result<()> {
    let p = match a.out {
        Some(out) => write_plot_to(&a.run_dir, &out)?,
        None => write_plot(&a.run_dir)?,
    };
    println!("{}", p.display());
    Ok(())
}

fn write_plot(run_dir: &Path) -> Result<PathBuf> {
    write_plot_to(run_dir, &run_dir.join("loss.svg"))
}

/// Train loss (mean of each 10 steps), and the evaluations' train and validation loss.
fn write_plot_to(run_dir: &Path, out: &Path) -> Result<PathBuf> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: no metrics (is this a training run directory?)",
            path.display()
        )
    })?;
    let (mut steps, mut evals_t, mut evals_v) = (Vec::new(), Vec::new(), Vec::new());
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: bad line `{line}`", path.display()))?;
        let step = v["step"].as_f64().unwrap_or(0.0);
        if let Some(l) = v["loss"].as_f64() {
            steps.push((step, l));
        }
        if let (Some(t), Some(val)) = (v["train_loss"].as_f64(), v["val_loss"].as_f64()) {
            evals_t.push((step, t));
            evals_v.push((step, val));
        }
    }
    let smoothed: Vec<(f64, f64)> = steps
        .chunks(10)
        .map(|c| {
            let n = c.len() as f64;
            (
                c.iter().map(|p| p.0).sum::<f64>() / n,
                c.iter().map(|p| p.1).sum::<f64>() / n,
            )
        })
        .collect();
    let series = [
        chart::Series {
            name: "train (batch, 10-step mean)".into(),
            points: smoothed,
        },
        chart::Series {
            name: "train (eval)".into(),
            points: evals_t,
        },
        chart::Series {
            name: "validation".into(),
            points: evals_v,
        },
    ];
    let title = format!("loss — {}", run_dir.display());
    std::fs::write(
        out,
        chart::plot(&title, ("step", "cross-entropy (nats/token)", ""), &series),
    )
    .with_context(|| format!("writing {}", out.display()))?;
    Ok(out.to_owned())
}

#[derive(Args)]
pub struct ExportCmd {
    /// Run directory (its latest checkpoint) or a checkpoint directory.
    run_dir: PathBuf,
    /// Output format (only gguf).
    #[arg(long, default_value = "gguf")]
    to: String,
    /// Weight type: f32, f16 or q8_0 (norms stay f32).
    #[arg(long = "type", default_value = "f16")]
    ty: ExportType,
    /// Output file (default: RUN_DIR/model-TYPE.gguf).
    #[arg(long, short = 'o')]
    out: Option<PathBuf>,
}

pub fn run_export(a: ExportCmd) -> Result<()> {
    if a.to != "gguf" {
        bail!("--to {}: only gguf is supported", a.to);
    }
    let name = format!("model-{}.gguf", format!("{:?}", a.ty).to_lowercase());
    let out = a.out.unwrap_or_else(|| a.run_dir.join(name));
    let bytes = export::export(&a.run_dir, &out, a.ty)?;
    println!("{} ({:.1} MiB)", out.display(), bytes as f64 / 1048576.0);
    Ok(())
}

/// A run directory or checkpoint, as the GGUF the inference loader reads.
pub fn open_run(path: &Path) -> Result<ferrolm_gguf::GgufFile> {
    Ok(export::open_as_gguf(path)?)
}

pub fn is_run(path: &Path) -> bool {
    export::is_run(path)
}
