//! `ferrolm finetune` (SFT on chat JSONL, DPO on preference JSONL; LoRA, QLoRA or full
//! weights) and `ferrolm merge` (an adapter folded into its base as one GGUF).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferrolm_train::dpo::{DpoConfig, DpoLoss};
use ferrolm_train::export::{self, ExportType};
use ferrolm_train::finetune::{self, FinetuneConfig, Method, ObjectiveConfig};
use ferrolm_train::lora::{LoraConfig, Target};

#[derive(Args)]
pub struct FinetuneCmd {
    /// Base model: a GGUF file or a `ferrolm train` run (default: the default model).
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// Training data. `--method sft`: OpenAI chat fine-tuning JSONL ({"messages": [...]} per
    /// line; `weight` 0/1 on assistant messages), the loss on assistant tokens only.
    /// `--method dpo` and `--method reward`: OpenAI preference JSONL ({"input": {"messages":
    /// [...]}, "preferred_output": [...], "non_preferred_output": [...]} per line).
    #[arg(long)]
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
    /// with that `--weights`, as before.
    #[arg(long, default_value = "sft")]
    method: String,
    /// Which weights train: `lora` (adapters on a frozen base) or `full` (every weight).
    #[arg(long, default_value = "lora")]
    weights: String,
    /// DPO: how strongly the policy is held to the reference (default 0.1; 2.0 for simpo).
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
        m => bail!("--method {m}: use sft, dpo or reward"),
    };
    if a.beta.is_some() && !matches!(objective, ObjectiveConfig::Dpo(_)) {
        bail!("--beta applies to --method dpo only");
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
        Ok(finetune::finetune(&cfg, &out, a.resume, stop, on)?)
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
