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
use std::sync::atomic::AtomicBool;

use ferrolm_tokenizer::{chat::ChatTemplate, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::base;
use crate::checkpoint::{self, TrainState};
use crate::config::{ConfigFile, LoopConfig, ModelFile, RunConfig};
use crate::data::Batcher;
use crate::distill::{self, Distill, DistillConfig, DistillMode, Taught, Teacher};
use crate::dpo::{self, Dpo, DpoConfig, Pair};
use crate::lora::{Lora, LoraConfig};
use crate::model::{self, Activations, Layout};
use crate::optim::AdamW;
use crate::reward::Reward;
use crate::rl::{self, Rl, RlConfig, RlEnv, RlItem, Scorer};
use crate::run::{write_json, Event, Summary};
use crate::sft::{self, Example};
use crate::trainer::{self, Frozen, Objective, Policy, Sft};
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
    /// What is optimized: `sft` (the default) or `dpo` on preference pairs.
    #[serde(default)]
    pub objective: ObjectiveConfig,
    /// Where reference log-probs are cached across runs (DPO); none: only in the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// Start from a new, randomly initialized model of this shape instead of `base`'s
    /// weights; `base` then only gives the tokenizer and chat template (a distillation
    /// student trained from scratch with its teacher's tokenizer). Full weights only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<ModelFile>,
}

/// The fine-tuning objective (OpenAI's `method.type`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum ObjectiveConfig {
    /// Masked next-token loss on assistant tokens of chat JSONL.
    #[default]
    Sft,
    /// Direct preference optimization on OpenAI preference JSONL.
    Dpo(DpoConfig),
    /// Distillation on a teacher's replies (chat JSONL, with its log-probs for token-level).
    Distill(DistillConfig),
    /// A reward model (a scalar head, Bradley–Terry loss) on OpenAI preference JSONL.
    Reward,
    /// Reinforcement learning on OpenAI reinforcement JSONL prompts, scored by a reward model
    /// or a grader.
    Rl(RlConfig),
}

pub(crate) fn data_error(path: &Path, errors: &[sft::LineError]) -> TrainError {
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
    finetune_with(cfg, out, resume, stop, on, None)
}

/// The item fields an RL scorer reads (`{{item.x}}`), after checking it parses.
pub fn rl_fields(scorer: &Scorer) -> Result<Vec<String>, TrainError> {
    match scorer {
        Scorer::RewardModel { .. } => Ok(Vec::new()),
        Scorer::Grader { grader } => crate::grader::Grader::parse(grader)
            .map(|g| g.item_fields())
            .map_err(|reason| TrainError::Config {
                what: "the grader".into(),
                reason,
            }),
    }
}

/// [`finetune`], with the environment RL draws its samples and rewards from (`--method rl`
/// needs one: the CLI's inference engine and scorers).
pub fn finetune_with(
    cfg: &FinetuneConfig,
    out: &Path,
    resume: bool,
    stop: &AtomicBool,
    on: &mut dyn FnMut(Event),
    env: Option<&mut dyn RlEnv>,
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
            reason: "QLoRA keeps the base quantized and frozen, so it needs --weights lora".into(),
        });
    }
    if let ObjectiveConfig::Dpo(d) = &cfg.objective {
        if d.beta.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return Err(TrainError::Config {
                what: "--beta".into(),
                reason: format!(
                    "must be > 0 (0.1 is usual for DPO, 2.0 for SimPO), not {}",
                    d.beta
                ),
            });
        }
    }
    if let ObjectiveConfig::Distill(d) = &cfg.objective {
        if !(0.0..=1.0).contains(&d.alpha) {
            return Err(TrainError::Config {
                what: "--alpha".into(),
                reason: format!(
                    "is the weight of the ground-truth labels against the teacher, in [0, 1], not {}",
                    d.alpha
                ),
            });
        }
    }
    if cfg.init.is_some() && cfg.method != Method::Full {
        return Err(TrainError::Config {
            what: "the student".into(),
            reason: "a new model trained from scratch trains all its weights: use --weights full"
                .into(),
        });
    }
    let reward = cfg.objective == ObjectiveConfig::Reward;
    if reward && cfg.method == Method::Full {
        return Err(TrainError::Config {
            what: "--method reward".into(),
            reason: "a reward model trains LoRA adapters and its score head on a frozen base: use --weights lora (or --qlora); full-weight reward models are not supported".into(),
        });
    }
    if let ObjectiveConfig::Rl(r) = &cfg.objective {
        if cfg.method == Method::Full {
            return Err(TrainError::Config {
                what: "--method rl".into(),
                reason: "samples are drawn by the inference engine with the policy's adapter: use --weights lora (or --qlora); full-weight RL is not supported".into(),
            });
        }
        if r.k < 2 {
            return Err(TrainError::Config {
                what: "--samples".into(),
                reason: format!(
                    "RL compares each sample with its group: use at least 2 per prompt, not {}",
                    r.k
                ),
            });
        }
        if r.max_tokens == 0
            || r.temperature.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
            || r.beta < 0.0
        {
            return Err(TrainError::Config {
                what: "RL settings".into(),
                reason: "--max-tokens must be ≥ 1, --temperature > 0 (samples must differ) and --beta ≥ 0".into(),
            });
        }
        if env.is_none() {
            return Err(TrainError::Config {
                what: "--method rl".into(),
                reason: "needs the inference engine to sample from: run it through `ferrolm finetune` or the fine-tuning API".into(),
            });
        }
    }
    let dpo = matches!(cfg.objective, ObjectiveConfig::Dpo(_));
    // QLoRA: the base stays in its stored (quantized) form; otherwise dequantized to f32. A
    // new model (`init`): `base` gives only the tokenizer; the weights are drawn below.
    let (mc, gguf, frozen) = if let Some(shape) = &cfg.init {
        let gguf = base::open_gguf(&cfg.base)?;
        let vocab = Tokenizer::from_gguf(&gguf)?.vocab_size();
        let over = ConfigFile {
            model: shape.clone(),
            ..ConfigFile::default()
        };
        (over.resolve(vocab)?.model, gguf, Frozen::None)
    } else if cfg.qlora {
        let (c, s, g) = base::load_stored(&cfg.base)?;
        (c, g, Frozen::Stored(s))
    } else {
        let b = base::load(&cfg.base)?;
        (b.config, b.gguf, Frozen::F32(b.params))
    };
    let tok = Tokenizer::from_gguf(&gguf)?;
    let template = ChatTemplate::from_gguf(&gguf, &tok)?;
    let data = match &cfg.objective {
        ObjectiveConfig::Sft => Data::Sft(
            load_examples(&cfg.train_file, &tok, &template)?,
            match &cfg.val_file {
                Some(p) => load_examples(p, &tok, &template)?,
                None => Vec::new(),
            },
        ),
        ObjectiveConfig::Dpo(_) | ObjectiveConfig::Reward => Data::Pairs(
            dpo::load_pairs(&cfg.train_file, &tok, &template)?,
            match &cfg.val_file {
                Some(p) => dpo::load_pairs(p, &tok, &template)?,
                None => Vec::new(),
            },
            match &cfg.objective {
                ObjectiveConfig::Dpo(d) => Some(d.clone()),
                _ => None,
            },
        ),
        ObjectiveConfig::Rl(r) => {
            let fields = rl_fields(&r.scorer)?;
            Data::Prompts(
                rl::load_items(&cfg.train_file, &tok, &template, &fields)?,
                match &cfg.val_file {
                    Some(p) => rl::load_items(p, &tok, &template, &fields)?,
                    None => Vec::new(),
                },
                r.clone(),
            )
        }
        ObjectiveConfig::Distill(d) => {
            let use_logprobs = d.mode == DistillMode::Token && d.teacher.is_none();
            let mut load = |p: &Path| -> Result<Vec<Taught>, TrainError> {
                let (items, stats) = distill::load(p, &tok, &template, use_logprobs)?;
                if d.alpha > 0.0 && stats.labelled == 0 {
                    return Err(TrainError::Config {
                        what: p.display().to_string(),
                        reason: "--alpha mixes in ground-truth labels, but no line has one (`label`: the prompts' own final assistant message)".into(),
                    });
                }
                if stats.retokenized > 0 {
                    on(Event::Info {
                        message: &format!(
                            "{}: the teacher's tokens of {} of {} replies do not spell their text; those train on the text",
                            p.display(),
                            stats.retokenized,
                            items.len()
                        ),
                    });
                }
                Ok(items)
            };
            let val = match &cfg.val_file {
                Some(p) => {
                    // the validation lines need no labels
                    let (v, _) = distill::load(p, &tok, &template, use_logprobs)?;
                    v
                }
                None => Vec::new(),
            };
            Data::Taught(load(&cfg.train_file)?, val, d.clone())
        }
    };
    // Next-token objectives read `ctx` inputs and predict the token after each; a reward
    // model reads whole sequences (its score is at the last token).
    let ctx = cfg
        .max_len
        .min(data.longest().saturating_sub(usize::from(!reward)))
        .min(mc.context)
        .max(1);
    if let Data::Prompts(t, v, r) = &data {
        let longest = t
            .iter()
            .chain(v)
            .map(|it| it.prompt.len())
            .max()
            .unwrap_or(0);
        if longest + r.max_tokens > ctx + 1 {
            let (it, path) = t
                .iter()
                .map(|it| (it, &cfg.train_file))
                .chain(
                    v.iter()
                        .map(|it| (it, cfg.val_file.as_ref().unwrap_or(&cfg.train_file))),
                )
                .max_by_key(|(it, _)| it.prompt.len())
                .map(|(it, p)| (it.line, p.display().to_string()))
                .unwrap_or_default();
            return Err(TrainError::Config {
                what: format!("{path} line {it}"),
                reason: format!(
                    "its prompt ({longest} tokens) and --max-tokens {} do not fit --max-len {} (context {}): raise --max-len, lower --max-tokens, or shorten the prompt",
                    r.max_tokens, cfg.max_len, mc.context
                ),
            });
        }
    }
    if let Data::Pairs(train, val, Some(_)) = &data {
        dpo::check_fit(&cfg.train_file, train, ctx)?;
        if let Some(v) = &cfg.val_file {
            dpo::check_fit(v, val, ctx)?;
        }
    }
    let per_step = cfg.batch * cfg.grad_accum;
    let iters = cfg.iters.unwrap_or(
        ((cfg.epochs * data.len() as f64) / per_step as f64)
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
        eval_iters: data.val_len().div_ceil(cfg.batch).max(1),
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
    let lora = match &cfg.method {
        Method::Full => None,
        Method::Lora(l) if reward => Some(Lora::new(&mc, l.clone()).with_score(mc.dim)),
        Method::Lora(l) => Some(Lora::new(&mc, l.clone())),
    };
    let mut policy = Policy {
        layout: Layout::new(&mc),
        mc,
        frozen,
        lora,
    };
    let n_train = checkpoint::buffer_len(policy.tensors());
    let (mut params, mut opt, mut state) = match checkpoint::latest(out)? {
        Some(dir) if resume => {
            let c = checkpoint::load(&dir, policy.tensors())?;
            (c.params, c.opt, c.state)
        }
        _ => (
            match (&policy.lora, &policy.frozen) {
                (Some(l), _) => l.init(cfg.seed),
                (None, Frozen::F32(w)) => w.clone(),
                (None, Frozen::None) => model::init_params(&policy.mc, &policy.layout, cfg.seed),
                (None, Frozen::Stored(_)) => Vec::new(),
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
    if policy.lora.is_none() {
        // A full run trains its own weights. SFT keeps one copy; DPO keeps the starting
        // weights as its reference model.
        if !dpo {
            policy.frozen = Frozen::None;
        }
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
                model: policy.mc.clone(),
                train: lc.clone(),
            },
        )?;
    }
    let run_cfg = RunConfig {
        model: policy.mc.clone(),
        train: lc.clone(),
    };
    on(Event::Started {
        config: &run_cfg,
        params: n_train,
        train_tokens: data.trained_tokens(true),
        val_tokens: data.trained_tokens(false),
        from_step: state.step,
    });
    if let Data::Prompts(t, v, r) = &data {
        let by = match &r.scorer {
            Scorer::RewardModel { path } => format!("the reward model {}", path.display()),
            Scorer::Grader { grader } => format!(
                "the {} grader",
                grader.get("type").and_then(|t| t.as_str()).unwrap_or("?")
            ),
        };
        on(Event::Info {
            message: &format!(
                "RL: {} prompts ({} held out), {} samples each per step, scored by {by}",
                t.len(),
                v.len(),
                r.k
            ),
        });
    }
    let pad = tok.eos_id.unwrap_or(0);
    let mut objective = match data {
        Data::Prompts(train, val, r) => {
            let (acts, lacts) = policy.scratch(r.k, ctx);
            let env = env.ok_or_else(|| TrainError::Config {
                what: "--method rl".into(),
                reason: "needs an environment".into(),
            })?;
            Objective::Rl(Box::new(Rl {
                cfg: r,
                train,
                val,
                batch: cfg.batch,
                ctx,
                pad,
                seed: cfg.seed,
                acts,
                lacts,
                env,
                name: "policy".into(),
            }))
        }
        Data::Pairs(train, val, None) => {
            let (acts, lacts) = policy.scratch(2 * cfg.batch, ctx);
            Objective::Reward(Box::new(Reward {
                train,
                val,
                batch: cfg.batch,
                ctx,
                pad,
                acts,
                lacts,
            }))
        }
        Data::Pairs(train, val, Some(d)) => {
            let [rt, rv] = dpo::reference_logps(
                &policy,
                &cfg.base,
                [&train, &val],
                cfg.batch,
                ctx,
                pad,
                out,
                cfg.cache_dir.as_deref(),
                on,
            )?;
            let scratch = policy.scratch(2 * cfg.batch, ctx);
            Objective::Dpo(Box::new(Dpo::new(
                d,
                train,
                val,
                (rt, rv),
                cfg.batch,
                ctx,
                pad,
                scratch,
            )))
        }
        Data::Taught(train, val, d) => {
            let rows = if d.alpha > 0.0 {
                2 * cfg.batch
            } else {
                cfg.batch
            };
            let (acts, lacts) = policy.scratch(rows, ctx);
            let teacher = match (&d.teacher, d.mode) {
                (Some(p), DistillMode::Token) => Some(load_teacher(p, &tok, cfg.batch, ctx)?),
                _ => None,
            };
            Objective::Distill(Box::new(Distill {
                cfg: d,
                train,
                val,
                batch: cfg.batch,
                ctx,
                pad,
                acts,
                lacts,
                teacher,
            }))
        }
        Data::Sft(train, val) => {
            let (acts, lacts) = policy.scratch(cfg.batch, ctx);
            Objective::Sft(Sft {
                train,
                val,
                batch: cfg.batch,
                ctx,
                pad,
                acts,
                lacts,
            })
        }
    };
    let ended = trainer::run(
        out,
        &lc,
        &policy,
        &mut objective,
        &mut params,
        &mut opt,
        &mut state,
        stop,
        on,
    )?;
    if let Some(l) = &policy.lora {
        let name = cfg
            .base
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        crate::peft::save(&out.join("adapter"), &policy.mc, l, &params, &name)?;
    }
    Ok(Summary {
        iters: state.step,
        train_loss: ended.train_loss,
        val_loss: ended.val_loss,
        ms_per_iter: state.train_seconds * 1e3 / state.step.max(1) as f64,
        params: n_train,
        interrupted: ended.interrupted,
        run_dir: out.to_owned(),
    })
}

/// A run's training data, tokenized: conversations (SFT) or preference pairs (DPO, with its
/// settings); each as (train, validation).
enum Data {
    Sft(Vec<Example>, Vec<Example>),
    /// Preference pairs, with DPO's settings (`None`: a reward model).
    Pairs(Vec<Pair>, Vec<Pair>, Option<DpoConfig>),
    Taught(Vec<Taught>, Vec<Taught>, DistillConfig),
    /// RL prompts, with the settings.
    Prompts(Vec<RlItem>, Vec<RlItem>, RlConfig),
}

/// A local teacher for token-level distillation: its weights in f32 and scratch for `batch`
/// rows of `ctx`; refused unless it has the student's vocabulary.
fn load_teacher(
    path: &Path,
    student: &Tokenizer,
    batch: usize,
    ctx: usize,
) -> Result<Teacher, TrainError> {
    let b = base::load(path)?;
    let tok = Tokenizer::from_gguf(&b.gguf)?;
    if !distill::same_vocab(student, &tok) {
        return Err(TrainError::Config {
            what: path.display().to_string(),
            reason: format!(
                "the teacher's vocabulary ({} tokens) is not the student's ({}): token-level distillation compares distributions token by token; use --mode sequence",
                tok.vocab_size(),
                student.vocab_size()
            ),
        });
    }
    if b.config.context < ctx {
        return Err(TrainError::Config {
            what: path.display().to_string(),
            reason: format!("the teacher's context ({}) is shorter than the examples ({ctx} tokens): lower --max-len", b.config.context),
        });
    }
    Ok(Teacher {
        acts: Activations::new(&b.config, batch, ctx),
        layout: Layout::new(&b.config),
        mc: b.config,
        params: b.params,
    })
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::Sft(t, _) => t.len(),
            Data::Pairs(t, _, _) => t.len(),
            Data::Taught(t, _, _) => t.len(),
            Data::Prompts(t, _, _) => t.len(),
        }
    }

    fn val_len(&self) -> usize {
        match self {
            Data::Sft(_, v) => v.len(),
            Data::Pairs(_, v, _) => v.len(),
            Data::Taught(_, v, _) => v.len(),
            Data::Prompts(_, v, _) => v.len(),
        }
    }

    /// The longest sequence, in tokens.
    fn longest(&self) -> usize {
        let m = match self {
            Data::Sft(t, v) => t.iter().chain(v).map(|e| e.ids.len()).max(),
            Data::Pairs(t, v, _) => t
                .iter()
                .chain(v)
                .flat_map(|p| [p.chosen.ids.len(), p.rejected.ids.len()])
                .max(),
            Data::Taught(t, v, _) => t
                .iter()
                .chain(v)
                .flat_map(|x| [x.ex.ids.len(), x.label.as_ref().map_or(0, |l| l.ids.len())])
                .max(),
            Data::Prompts(t, v, r) => t
                .iter()
                .chain(v)
                .map(|it| it.prompt.len() + r.max_tokens)
                .max(),
        };
        m.unwrap_or(2)
    }

    /// Tokens whose prediction is scored, in the train (or validation) set.
    fn trained_tokens(&self, train: bool) -> u64 {
        let n = match self {
            Data::Sft(t, v) => if train { t } else { v }
                .iter()
                .map(Example::trained_tokens)
                .sum(),
            Data::Pairs(t, v, _) => if train { t } else { v }
                .iter()
                .map(|p| p.chosen.trained_tokens() + p.rejected.trained_tokens())
                .sum::<usize>(),
            Data::Taught(t, v, _) => if train { t } else { v }
                .iter()
                .map(|x| x.ex.trained_tokens())
                .sum(),
            // the samples are drawn as it trains
            Data::Prompts(..) => 0,
        };
        n as u64
    }
}
