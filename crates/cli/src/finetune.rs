//! `ferrolm finetune` (SFT on chat JSONL; DPO and reward models on preference JSONL; RL on
//! prompts scored by a reward model or a grader; LoRA, QLoRA or full weights) and `ferrolm
//! merge` (an adapter folded into its base as one GGUF).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferrolm_train::dpo::{DpoConfig, DpoLoss};
use ferrolm_train::export::{self, ExportType};
use ferrolm_train::finetune::{self, FinetuneConfig, Method, ObjectiveConfig};
use ferrolm_train::lora::{LoraConfig, Target};
use ferrolm_train::rl::{RlConfig, Scorer};

#[derive(Args)]
pub struct FinetuneCmd {
    /// Base model: a GGUF file or a `ferrolm train` run (default: the default model).
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// Training data. `--method sft`: OpenAI chat fine-tuning JSONL ({"messages": [...]} per
    /// line; `weight` 0/1 on assistant messages), the loss on assistant tokens only.
    /// `--method dpo` and `--method reward`: OpenAI preference JSONL ({"input": {"messages":
    /// [...]}, "preferred_output": [...], "non_preferred_output": [...]} per line).
    /// `--method rl`: OpenAI reinforcement JSONL prompts ({"messages": [...], ...} per line,
    /// up to the turn to answer; further fields are what graders read as {{item.field}}).
    #[arg(long, alias = "prompts")]
    train: PathBuf,
    /// Validation JSONL (same format): loss and token accuracy (SFT), or rewards, margin and
    /// pair accuracy (DPO, reward), at every evaluation.
    #[arg(long)]
    val: Option<PathBuf>,
    /// Output directory (checkpoints, metrics, and the adapter or model).
    #[arg(long)]
    out: PathBuf,
    /// What to optimize: `sft` (supervised), `dpo` (direct preference optimization; the
    /// reference model is the base with the adapter off) or `reward` (a reward model: LoRA
    /// adapters and a scalar score head, Bradley–Terry loss on the pairs; score with `ferrolm
    /// eval reward` or serve it for `/v1/rewards`). `lora` and `full` are accepted as `sft`
    /// with that `--weights`, as before. `rl`: reinforcement learning on the policy's own
    /// samples (GRPO or RLOO, with a KL penalty to the base), scored by `--reward-model` or
    /// `--grader`.
    #[arg(long, default_value = "sft")]
    method: String,
    /// RL: score samples with this reward model (a `--method reward` run or PEFT directory).
    #[arg(long)]
    reward_model: Option<PathBuf>,
    /// RL: score samples with this OpenAI grader (a JSON file, or the JSON itself):
    /// string_check, text_similarity, score_model (a local model) or multi.
    #[arg(long)]
    grader: Option<String>,
    /// RL: samples per prompt (the group their rewards are compared in).
    #[arg(long, default_value_t = 4)]
    samples: usize,
    /// RL: the sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// RL: nucleus sampling.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// RL: most tokens per sample.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// RL: how rewards become advantages, `grpo` (standardized in the group) or `rloo` (less
    /// the mean of the others).
    #[arg(long, default_value = "grpo")]
    advantage: String,
    /// Which weights train: `lora` (adapters on a frozen base) or `full` (every weight).
    #[arg(long, default_value = "lora")]
    weights: String,
    /// DPO: how strongly the policy is held to the reference (default 0.1; 2.0 for simpo).
    /// RL: the weight of the KL penalty to the base (default 0.04; 0 turns it off).
    #[arg(long)]
    beta: Option<f32>,
    /// DPO: the preference loss, `sigmoid` (DPO), `ipo` or `simpo` (no reference model).
    #[arg(long, default_value = "sigmoid")]
    dpo_loss: String,
    /// DPO with `--dpo-loss simpo`: the target reward margin γ.
    #[arg(long, default_value_t = 0.5)]
    simpo_gamma: f32,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    /// Matrices that get adapters: any of q,k,v,o,gate,up,down.
    #[arg(long, default_value = "q,v", value_delimiter = ',')]
    targets: Vec<String>,
    /// Longest sequence in tokens (longer conversations are cut).
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    #[arg(long, default_value_t = 3.0)]
    epochs: f64,
    /// Optimizer steps (default: epochs × examples / (batch × grad_accum)).
    #[arg(long)]
    iters: Option<u64>,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate (default: 2e-4 for LoRA, 1e-5 for full).
    #[arg(long)]
    lr: Option<f32>,
    #[arg(long)]
    min_lr: Option<f32>,
    /// Warm-up steps (default: 1/30 of the steps).
    #[arg(long)]
    warmup: Option<u64>,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f32,
    /// Evaluate and checkpoint every N steps.
    #[arg(long, default_value_t = 50)]
    eval_every: u64,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 2)]
    keep: usize,
    /// QLoRA: keep the base in its stored quantized form in memory (dequantized matrix by
    /// matrix as the products need it); only the adapters are f32. LoRA only.
    #[arg(long)]
    qlora: bool,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    resume: bool,
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Print one JSON summary as the last line of stdout.
    #[arg(long)]
    json: bool,
}

pub fn run_finetune(a: FinetuneCmd) -> Result<()> {
    let base = crate::store::resolve(a.model.as_deref())?;
    let base = base
        .canonicalize()
        .with_context(|| format!("{}", base.display()))?;
    let (objective, weights) = match a.method.as_str() {
        "sft" | "supervised" => (ObjectiveConfig::Sft, a.weights.as_str()),
        "lora" | "full" => (ObjectiveConfig::Sft, a.method.as_str()),
        "dpo" => {
            let loss: DpoLoss = a.dpo_loss.parse().map_err(anyhow::Error::msg)?;
            let beta = a
                .beta
                .unwrap_or(if loss == DpoLoss::Simpo { 2.0 } else { 0.1 });
            let cfg = DpoConfig {
                beta,
                loss,
                simpo_gamma: if loss == DpoLoss::Simpo {
                    a.simpo_gamma
                } else {
                    0.0
                },
            };
            (ObjectiveConfig::Dpo(cfg), a.weights.as_str())
        }
        "reward" => {
            if a.weights != "lora" {
                bail!("--method reward trains LoRA adapters and a score head on a frozen base: use --weights lora (the default), with --qlora if you like");
            }
            (ObjectiveConfig::Reward, "lora")
        }
        "rl" | "reinforcement" => {
            if a.weights != "lora" {
                bail!("--method rl samples with the inference engine and the policy's adapter: use --weights lora (the default), with --qlora if you like");
            }
            let scorer = match (&a.reward_model, &a.grader) {
                (Some(p), None) => Scorer::RewardModel {
                    path: p
                        .canonicalize()
                        .with_context(|| format!("--reward-model {}: no such run", p.display()))?,
                },
                (None, Some(g)) => Scorer::Grader {
                    grader: crate::rl::read_grader(g)?,
                },
                _ => {
                    bail!("--method rl needs exactly one of --reward-model RUN or --grader G.json")
                }
            };
            let cfg = RlConfig {
                scorer,
                k: a.samples,
                beta: a.beta.unwrap_or(0.04),
                temperature: a.temperature,
                top_p: a.top_p,
                max_tokens: a.max_tokens,
                advantage: a.advantage.parse().map_err(anyhow::Error::msg)?,
            };
            (ObjectiveConfig::Rl(cfg), "lora")
        }
        m => bail!("--method {m}: use sft, dpo, reward or rl"),
    };
    if a.beta.is_some() && !matches!(objective, ObjectiveConfig::Dpo(_) | ObjectiveConfig::Rl(_)) {
        bail!("--beta applies to --method dpo and rl only");
    }
    if !matches!(objective, ObjectiveConfig::Rl(_))
        && (a.reward_model.is_some() || a.grader.is_some())
    {
        bail!("--reward-model and --grader score the samples of --method rl");
    }
    let method = match weights {
        "full" => Method::Full,
        "lora" => {
            let targets = a
                .targets
                .iter()
                .map(|t| {
                    Target::parse(t).with_context(|| {
                        format!("--targets: `{t}` is not one of q, k, v, o, gate, up, down")
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            if a.rank == 0 {
                bail!("--rank must be at least 1");
            }
            Method::Lora(LoraConfig {
                rank: a.rank,
                alpha: a.alpha,
                targets,
            })
        }
        w => bail!("--weights {w}: use lora or full"),
    };
    let abs = |p: &PathBuf| {
        p.canonicalize()
            .with_context(|| format!("{}: no such file", p.display()))
    };
    let cfg = FinetuneConfig {
        base,
        train_file: abs(&a.train)?,
        val_file: a.val.as_ref().map(abs).transpose()?,
        lr: a.lr.unwrap_or(if matches!(method, Method::Full) {
            1e-5
        } else {
            2e-4
        }),
        method,
        max_len: a.max_len,
        epochs: a.epochs,
        iters: a.iters,
        batch: a.batch,
        grad_accum: a.grad_accum,
        min_lr: a.min_lr,
        warmup: a.warmup,
        weight_decay: a.weight_decay,
        grad_clip: a.grad_clip,
        eval_every: a.eval_every,
        seed: a.seed,
        keep: a.keep,
        qlora: a.qlora,
        objective,
        cache_dir: Some(crate::store::home()?.join("cache")),
        init: None,
    };
    let out = a.out.clone();
    let summary = crate::train::drive(a.threads, |stop, on| {
        let mut env = match &cfg.objective {
            ObjectiveConfig::Rl(r) => {
                let (rows, tokens) = crate::rl::engine_size(&cfg, r);
                Some(crate::rl::EngineEnv::open(
                    &cfg.base,
                    r,
                    rows,
                    tokens,
                    crate::threads(a.threads)?,
                )?)
            }
            _ => None,
        };
        let env = env.as_mut().map(|e| e as &mut dyn ferrolm_train::rl::RlEnv);
        Ok(finetune::finetune_with(
            &cfg, &out, a.resume, stop, on, env,
        )?)
    })?;
    let try_args = if cfg.objective == ObjectiveConfig::Reward {
        "eval reward --data pairs.jsonl"
    } else {
        "--prompt '...'"
    };
    crate::train::finish(&a.out, &summary, a.json, try_args)
}

#[derive(Args)]
pub struct MergeCmd {
    /// Base model (GGUF or run directory).
    base: PathBuf,
    /// PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    adapter: PathBuf,
    /// Output format (only gguf).
    #[arg(long, default_value = "gguf")]
    to: String,
    /// Weight type: f32, f16 or q8_0.
    #[arg(long = "type", default_value = "f16")]
    ty: ExportType,
    /// Output file.
    #[arg(long, short = 'o')]
    out: PathBuf,
}

pub fn run_merge(a: MergeCmd) -> Result<()> {
    if a.to != "gguf" {
        bail!("--to {}: only gguf is supported", a.to);
    }
    let bytes = export::merged_gguf(&a.base, &a.adapter, a.ty)?;
    export::write_file(&a.out, &bytes)?;
    println!(
        "{} ({:.1} MiB)",
        a.out.display(),
        bytes.len() as f64 / 1048576.0
    );
    Ok(())
}
