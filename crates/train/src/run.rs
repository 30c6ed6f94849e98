//! Pretraining (`ferrolm train`): the next-token objective of the one training loop
//! ([`crate::trainer`]), and the run directory it owns:
//!
//! ```text
//! RUN_DIR/config.json     the resolved model + loop configuration
//!         tokenizer.gguf  the vocabulary (tensor-less GGUF)
//!         data/           train.bin, val.bin (token shards)
//!         metrics.jsonl   one line per step and per evaluation
//!         checkpoints/, latest   see `checkpoint`
//! ```
//! Each step: windows of the token shard → forward → backward (× grad_accum) → clip →
//! AdamW(lr = schedule(step)). Every `eval_every` steps: loss on fixed train and validation
//! batches, a text sample, and a checkpoint. A stop request (Ctrl-C / SIGTERM, through `stop`) ends the step in progress,
//! writes a checkpoint and returns; `--resume` continues from the latest one exactly.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use ferrolm_tokenizer::Tokenizer;

use crate::checkpoint::{self, Checkpoint, CheckpointRef, TrainState};
use crate::config::{ConfigFile, LoopFile, ModelFile, RunConfig};
use crate::data::{self, Batcher, Shard};
use crate::lora::LoraActs;
use crate::model::{self, Activations, Layout, ModelConfig, SplitMix, TensorSlot};
use crate::optim::AdamW;
use crate::tokenize::{self, TokenizerChoice};
use crate::trainer::{self, Evaluation, Frozen, Objective, Policy, StepOut};
use crate::TrainError;

/// What `ferrolm train` asks for.
#[derive(Debug, Clone)]
pub struct TrainArgs {
    /// A text corpus, or a directory written by `ferrolm prepare` (train.bin, val.bin,
    /// tokenizer.gguf). Ignored on resume (the run's own shards are used).
    pub data: Option<PathBuf>,
    /// Required for a new run from a text corpus.
    pub tokenizer: Option<TokenizerChoice>,
    pub out: PathBuf,
    pub resume: bool,
    /// The config file merged with the flags given (only what the user set).
    pub config: ConfigFile,
}

/// Progress reports for the caller's display.
pub enum Event<'a> {
    Started {
        config: &'a RunConfig,
        params: usize,
        train_tokens: u64,
        val_tokens: u64,
        from_step: u64,
    },
    Step {
        step: u64,
        loss: f32,
        lr: f32,
        grad_norm: f32,
        ms: f64,
        tokens_per_s: f64,
        /// The objective's own figures (DPO: rewards, margin, pair accuracy, log-probs).
        metrics: &'a serde_json::Map<String, serde_json::Value>,
    },
    Eval {
        step: u64,
        train_loss: f32,
        val_loss: f32,
        /// Generated text (pretraining); empty when there is none.
        sample: &'a str,
        /// Next-token accuracy on the validation set's scored tokens (fine-tuning).
        token_accuracy: Option<f32>,
        /// The objective's own figures on the validation set.
        metrics: &'a serde_json::Map<String, serde_json::Value>,
    },
    /// Something about the run the user should see (e.g. DPO's chosen log-prob falling
    /// while the margin grows).
    Warning {
        step: u64,
        message: &'a str,
    },
    /// What the run is doing that takes a while or saves it (reference log-probs computed
    /// or read from the cache).
    Info {
        message: &'a str,
    },
    Checkpoint {
        step: u64,
        path: &'a Path,
    },
}

/// How a run ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub iters: u64,
    pub train_loss: f32,
    pub val_loss: f32,
    pub ms_per_iter: f64,
    pub params: usize,
    pub interrupted: bool,
    pub run_dir: PathBuf,
}

/// Train (or resume) the run in `args.out`.
pub fn train(
    args: &TrainArgs,
    stop: &AtomicBool,
    on: &mut dyn FnMut(Event),
) -> Result<Summary, TrainError> {
    let run = &args.out;
    let (cfg, tok, ck) = if args.resume {
        open_for_resume(args)?
    } else {
        let (cfg, tok) = create(args)?;
        (cfg, tok, None)
    };
    let (mc, lc) = (&cfg.model, &cfg.train);
    let train_shard = Shard::open(&run.join("data/train.bin"))?;
    let val_shard = Shard::open(&run.join("data/val.bin"))?;
    for s in [&train_shard, &val_shard] {
        s.check_vocab(mc.vocab_size)?;
    }
    let layout = Layout::new(mc);
    let (mut params, mut opt, mut state) = match ck {
        Some(c) => (c.params, c.opt, c.state),
        None => (
            model::init_params(mc, &layout, lc.seed),
            AdamW::new(layout.len),
            TrainState {
                step: 0,
                evaluated: false,
                best_val_loss: None,
                batcher: Batcher::new(lc.seed),
                tokens_seen: 0,
                train_seconds: 0.0,
            },
        ),
    };
    // Fixed evaluation batches: the same every time (and across a resume).
    let eval_train = data::eval_batches(
        &train_shard,
        lc.batch,
        mc.context,
        lc.eval_iters,
        lc.seed ^ 0xE7A1,
    )?;
    let eval_val = data::eval_batches(
        &val_shard,
        lc.batch,
        mc.context,
        lc.eval_iters,
        lc.seed ^ 0x7A1D,
    )?;
    on(Event::Started {
        config: &cfg,
        params: layout.len,
        train_tokens: train_shard.len(),
        val_tokens: val_shard.len(),
        from_step: state.step,
    });
    let policy = Policy {
        mc: mc.clone(),
        layout,
        frozen: Frozen::None,
        lora: None,
    };
    let mut objective = Objective::NextToken(NextToken {
        shard: &train_shard,
        eval_train,
        eval_val,
        tok: &tok,
        batch: lc.batch,
        sample_tokens: lc.sample_tokens,
        seed: lc.seed,
        acts: Activations::new(mc, lc.batch, mc.context),
        tokens: Vec::new(),
    });
    let ended = trainer::run(
        run,
        lc,
        &policy,
        &mut objective,
        &mut params,
        &mut opt,
        &mut state,
        stop,
        on,
    )?;
    let done = state.step.max(1);
    Ok(Summary {
        iters: state.step,
        train_loss: ended.train_loss,
        val_loss: ended.val_loss,
        ms_per_iter: state.train_seconds * 1e3 / done as f64,
        params: policy.layout.len,
        interrupted: ended.interrupted,
        run_dir: run.clone(),
    })
}

/// Pretraining's objective: next-token cross-entropy on seeded windows of the token shard;
/// evaluated on fixed train and validation batches, with a text sample.
pub(crate) struct NextToken<'a> {
    shard: &'a Shard,
    eval_train: Vec<Vec<u32>>,
    eval_val: Vec<Vec<u32>>,
    tok: &'a Tokenizer,
    batch: usize,
    sample_tokens: usize,
    seed: u64,
    acts: Activations,
    tokens: Vec<u32>,
}

impl NextToken<'_> {
    pub(crate) fn accumulate(
        &mut self,
        policy: &Policy,
        params: &[f32],
        grads: &mut [f32],
        state: &mut TrainState,
        grad_accum: usize,
    ) -> Result<StepOut, TrainError> {
        let ctx = policy.mc.context;
        let mut loss = 0.0;
        let mut none = LoraActs::default();
        for _ in 0..grad_accum {
            state
                .batcher
                .next(self.shard, self.batch, ctx, &mut self.tokens)?;
            self.acts.set_sequences(&self.tokens);
            let scale = 1.0 / grad_accum as f32;
            loss += scale * policy.forward_ce(params, &mut self.acts, &mut none, Some(scale));
            policy.backward(params, grads, &mut self.acts, &mut none);
        }
        let tokens = (self.batch * ctx * grad_accum) as u64;
        state.tokens_seen += tokens;
        Ok(StepOut {
            loss,
            tokens,
            metrics: Default::default(),
        })
    }

    pub(crate) fn evaluate(&mut self, policy: &Policy, params: &[f32], step: u64) -> Evaluation {
        let (mc, layout) = (&policy.mc, &policy.layout);
        let train_loss = mean_loss(mc, layout, params, &self.eval_train, &mut self.acts);
        let val_loss = mean_loss(mc, layout, params, &self.eval_val, &mut self.acts);
        let sample = sample_text(
            mc,
            layout,
            params,
            self.tok,
            self.sample_tokens,
            self.seed ^ step,
        );
        Evaluation {
            train_loss: Some(train_loss),
            val_loss,
            sample,
            token_accuracy: None,
            metrics: Default::default(),
            warning: None,
        }
    }
}

/// Write a checkpoint of `tensors` into `dir` and report it.
pub(crate) fn save_reported(
    dir: &Path,
    tensors: &[TensorSlot],
    ck: CheckpointRef,
    keep: usize,
    on: &mut dyn FnMut(Event),
) -> Result<(), TrainError> {
    let path = checkpoint::save(dir, tensors, ck, keep)?;
    on(Event::Checkpoint {
        step: ck.state.step,
        path: &path,
    });
    Ok(())
}

/// A step whose loss is not a number: stop before the optimizer spreads it into the weights,
/// so the latest checkpoint stays good.
pub(crate) fn diverged(step: u64, loss: f32) -> TrainError {
    TrainError::Config {
        what: format!("step {step}"),
        reason: format!(
            "the loss is {loss}: training diverged (the checkpoints written before it are intact); start a new run with a lower --lr or a longer --warmup"
        ),
    }
}

/// A new run: tokenizer, shards and config into `args.out`.
fn create(args: &TrainArgs) -> Result<(RunConfig, Tokenizer), TrainError> {
    let run = &args.out;
    if run.join("config.json").exists() {
        return Err(TrainError::Config {
            what: run.display().to_string(),
            reason:
                "already holds a training run: pass --resume to continue it, or choose a new --out"
                    .into(),
        });
    }
    let data_path = args.data.as_deref().ok_or_else(|| TrainError::Config {
        what: "ferrolm train".into(),
        reason:
            "--data is required for a new run (a text file, or a directory from `ferrolm prepare`)"
                .into(),
    })?;
    let data_dir = run.join("data");
    std::fs::create_dir_all(&data_dir).map_err(TrainError::io(&data_dir))?;
    let tok_path = run.join("tokenizer.gguf");
    if data_path.is_dir() {
        // prepared by `ferrolm prepare`: take its tokenizer and shards as they are
        for (from, to) in [
            ("tokenizer.gguf", tok_path.clone()),
            ("train.bin", data_dir.join("train.bin")),
            ("val.bin", data_dir.join("val.bin")),
        ] {
            let src = data_path.join(from);
            std::fs::copy(&src, &to).map_err(TrainError::io(&src))?;
        }
    } else {
        let choice = args.tokenizer.as_ref().ok_or_else(|| TrainError::Config {
            what: "ferrolm train".into(),
            reason: "--tokenizer is required with a text corpus: char, bpe:VOCAB (e.g. bpe:4096), or a model's .gguf".into(),
        })?;
        let corpus = data::read_corpus(data_path)?;
        let meta = tokenize::build(choice, &corpus)?;
        tokenize::write(&tok_path, &meta)?;
        let tok = tokenize::load(&tok_path)?;
        data::prepare(&corpus, &tok, &data_dir, 0.1)?;
    }
    let tok = tokenize::load(&tok_path)?;
    let cfg = args.config.resolve(tok.vocab_size())?;
    // A corpus shorter than one window is refused now, not after the first eval.
    for shard in ["train.bin", "val.bin"] {
        Batcher::new(0).next(
            &Shard::open(&data_dir.join(shard))?,
            1,
            cfg.model.context,
            &mut Vec::new(),
        )?;
    }
    write_json(&run.join("config.json"), &cfg)?;
    Ok((cfg, tok))
}

/// An existing run: its config (flags may only change how long it runs and how it reports),
/// tokenizer and latest checkpoint.
fn open_for_resume(
    args: &TrainArgs,
) -> Result<(RunConfig, Tokenizer, Option<Checkpoint>), TrainError> {
    let run = &args.out;
    let cp = run.join("config.json");
    let text = std::fs::read_to_string(&cp).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TrainError::Config {
            what: run.display().to_string(),
            reason: "holds no training run to resume (no config.json): drop --resume to start one"
                .into(),
        },
        _ => TrainError::Io {
            path: cp.clone(),
            source: e,
        },
    })?;
    let mut cfg: RunConfig = serde_json::from_str(&text).map_err(|e| TrainError::Config {
        what: cp.display().to_string(),
        reason: e.to_string(),
    })?;
    let tok = tokenize::load(&run.join("tokenizer.gguf"))?;
    // Model flags given on resume must agree with the run's model; the ones not given are the
    // run's own (not the defaults), so `--resume --width 32` on a width-32 run is accepted.
    let saved = ConfigFile {
        model: ModelFile::from(&cfg.model),
        train: LoopFile::default(),
    };
    let asked = saved.merged(&args.config).resolve(cfg.model.vocab_size)?;
    let explicit = &args.config;
    if asked.model != cfg.model {
        return Err(TrainError::Config {
            what: run.display().to_string(),
            reason: format!(
                "was trained with another model config ({}), not the one given ({}): resume without model flags, or start a new --out",
                describe(&cfg.model),
                describe(&asked.model)
            ),
        });
    }
    // How long to run and how to report may change; the optimisation itself may not.
    let t = &explicit.train;
    let mut allowed = cfg.train.clone();
    allowed.iters = t.iters.unwrap_or(cfg.train.iters);
    allowed.eval_every = t.eval_every.unwrap_or(cfg.train.eval_every);
    allowed.eval_iters = t.eval_iters.unwrap_or(cfg.train.eval_iters);
    allowed.keep = t.keep.unwrap_or(cfg.train.keep);
    allowed.sample_tokens = t.sample_tokens.unwrap_or(cfg.train.sample_tokens);
    for (name, given, saved) in [
        ("lr", t.lr.map(|v| v.to_string()), cfg.train.lr.to_string()),
        (
            "min_lr",
            t.min_lr.map(|v| v.to_string()),
            cfg.train.min_lr.to_string(),
        ),
        (
            "batch",
            t.batch.map(|v| v.to_string()),
            cfg.train.batch.to_string(),
        ),
        (
            "warmup",
            t.warmup.map(|v| v.to_string()),
            cfg.train.warmup.to_string(),
        ),
        (
            "decay_iters",
            t.decay_iters.map(|v| v.to_string()),
            cfg.train.decay_iters.to_string(),
        ),
        (
            "weight_decay",
            t.weight_decay.map(|v| v.to_string()),
            cfg.train.weight_decay.to_string(),
        ),
        (
            "grad_clip",
            t.grad_clip.map(|v| v.to_string()),
            cfg.train.grad_clip.to_string(),
        ),
        (
            "grad_accum",
            t.grad_accum.map(|v| v.to_string()),
            cfg.train.grad_accum.to_string(),
        ),
        (
            "seed",
            t.seed.map(|v| v.to_string()),
            cfg.train.seed.to_string(),
        ),
    ] {
        if let Some(g) = given {
            if g != saved {
                return Err(TrainError::Config {
                    what: run.display().to_string(),
                    reason: format!(
                        "{name} was {saved} in this run; a resumed run keeps it (given {g}). Only --iters, --eval-every, --eval-iters and --keep may change on --resume"
                    ),
                });
            }
        }
    }
    if allowed != cfg.train {
        cfg.train = allowed;
        write_json(&cp, &cfg)?;
    }
    let ck = match checkpoint::latest(run)? {
        Some(dir) => Some(checkpoint::load(&dir, &Layout::new(&cfg.model).tensors)?),
        None => None,
    };
    Ok((cfg, tok, ck))
}

fn describe(m: &ModelConfig) -> String {
    format!(
        "layers {}, heads {}/{}, width {}, ffn {}, context {}, vocab {}",
        m.n_layers, m.n_heads, m.n_kv_heads, m.dim, m.ffn_dim, m.context, m.vocab_size
    )
}

pub(crate) fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(TrainError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(TrainError::io(path))
}

/// Mean loss over fixed batches.
fn mean_loss(
    c: &ModelConfig,
    layout: &Layout,
    params: &[f32],
    batches: &[Vec<u32>],
    acts: &mut Activations,
) -> f32 {
    let sum: f64 = batches
        .iter()
        .map(|b| f64::from(model::forward(c, layout, params, b, acts, None)))
        .sum();
    (sum / batches.len().max(1) as f64) as f32
}

/// `n` tokens sampled at temperature 0.8 from the first token of the vocabulary's newline
/// (or token 0), decoded. Runs the training forward over the growing window (no KV cache:
/// this is a few hundred tokens of a small model, once per evaluation).
pub fn sample_text(
    c: &ModelConfig,
    layout: &Layout,
    params: &[f32],
    tok: &Tokenizer,
    n: usize,
    seed: u64,
) -> String {
    let mut ids: Vec<u32> = tok.encode("\n", false).unwrap_or_default();
    if ids.is_empty() {
        ids.push(0);
    }
    let prompt = ids.len();
    let mut rng = SplitMix(seed);
    for _ in 0..n {
        let window = &ids[ids.len().saturating_sub(c.context)..];
        let mut acts = Activations::new(c, 1, window.len());
        acts.set_inputs(window);
        model::forward_logits(c, layout, params, &mut acts);
        let last = &acts.logits[(window.len() - 1) * c.vocab_size..][..c.vocab_size];
        ids.push(sample(last, 0.8, &mut rng));
    }
    tok.decode(&ids[prompt..])
}

fn sample(logits: &[f32], temperature: f32, rng: &mut SplitMix) -> u32 {
    let mx = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let w: Vec<f64> = logits
        .iter()
        .map(|&l| f64::from((l - mx) / temperature).exp())
        .collect();
    let mut r = rng.uniform() * w.iter().sum::<f64>();
    for (i, x) in w.iter().enumerate() {
        r -= x;
        if r <= 0.0 {
            return i as u32;
        }
    }
    (w.len() - 1) as u32
}

/// `metrics.jsonl`, cut back on resume to what the checkpoint had done, so that a resumed
/// run's file is line for line the one an uninterrupted run writes.
pub(crate) struct Metrics {
    file: std::fs::File,
    path: PathBuf,
}

impl Metrics {
    pub(crate) fn open(run: &Path, step: u64, evaluated: bool) -> Result<Self, TrainError> {
        let path = run.join("metrics.jsonl");
        let kept: Vec<String> = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .filter(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
                    let s = v["step"].as_u64().unwrap_or(u64::MAX);
                    let is_eval = v.get("val_loss").is_some();
                    s < step || (is_eval && s == step && evaluated)
                })
                .map(str::to_owned)
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        std::fs::write(&path, text).map_err(TrainError::io(&path))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(TrainError::io(&path))?;
        Ok(Metrics { file, path })
    }

    pub(crate) fn line(&mut self, v: serde_json::Value) -> Result<(), TrainError> {
        writeln!(self.file, "{v}").map_err(TrainError::io(&self.path))
    }
}
