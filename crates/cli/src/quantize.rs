//! `ferrolm quantize IN OUT --type TYPE`: write a model in another tensor type, choose each
//! tensor's type as `llama-quantize` does for the same mix, and measure what it cost.
//!
//! * IN: a GGUF (f32/f16/bf16, or quantized: requantizing warns), a `ferrolm train` /
//!   `finetune` run directory, or an installed model's name.
//! * The per-tensor plan ([`plan`]) follows llama.cpp's `llama_tensor_get_type` for the mixes
//!   it names (Q4_K_M's Q6_K `attn_v`/`ffn_down` on the "more bits" layers, the Q6_K output,
//!   …) and its fallbacks for rows that do not split into a type's blocks, so a ferrolm
//!   Q4_K_M and a llama.cpp Q4_K_M of the same source hold the same types.
//! * The encoders are [`ferrolm_gguf::quants`].
//! * The receipt: both models run over a calibration text; KL divergence of the quantized
//!   model's next-token distribution from the source's (mean, p99), top-1 agreement and both
//!   perplexities. Printed and stored under `ferrolm.quantize.*` in the output's metadata.
//! * OUT is written to a temporary file beside it and renamed: never a half file.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferrolm_gguf::quants::{self, QuantizeError};
use ferrolm_gguf::{writer::GgufWriter, GgmlType, GgufFile, TensorInfo, Value};
use rayon::prelude::*;

use crate::eval::{self, KldReport};
use crate::{load_file, load_tokenizer, store, threads};

/// The calibration text used when none is given: 20 KB of the held-out tail of the repo's
/// `data/tinyshakespeare.txt` (see `data/README.md`).
pub const DEFAULT_CALIBRATION: &str = include_str!("quantize_calibration.txt");

#[derive(Args)]
pub struct QuantizeArgs {
    /// Source model: a GGUF file, a `ferrolm train`/`finetune` run directory, a Hugging Face
    /// model directory (config.json, *.safetensors, tokenizer.json: Llama, Mistral, Qwen2,
    /// Qwen3, Phi-3, Gemma 3), or an installed model's name (e.g. smollm2-135m).
    input: PathBuf,
    /// Output GGUF path (written atomically; replaced if it exists).
    output: PathBuf,
    /// Target: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s, q3_k_m, q3_k_l,
    /// q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k (q3_k, q4_k, q5_k mean their _m mixes, as in
    /// llama-quantize).
    #[arg(long = "type")]
    ty: String,
    /// Calibration text for the quality receipt (default: a built-in 20 KB English text).
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Tokens of calibration text to score (windows of --ctx).
    #[arg(long, default_value_t = 2048)]
    calibration_tokens: usize,
    /// Window length for the receipt.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// An importance matrix in llama.cpp's format (the GGUF `llama-imatrix` writes, or its
    /// legacy .dat): per column, the mean square of the activations each weight multiplies.
    /// The quantizers then weigh their errors by it, as llama-quantize --imatrix does.
    #[arg(long)]
    imatrix: Option<PathBuf>,
    /// Every quantizable tensor gets the --type's own tensor type: no mix rules, no Q6_K
    /// output (llama-quantize --pure). Rows that do not split into its blocks still fall back.
    #[arg(long)]
    pure: bool,
    /// Skip the quality receipt (faster; the file then carries none).
    #[arg(long)]
    no_receipt: bool,
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Print the receipt as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// llama.cpp's file types (`llama_ftype`): a default tensor type plus per-tensor rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum Ftype {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K_S,
    Q3_K_M,
    Q3_K_L,
    Q4_K_S,
    Q4_K_M,
    Q5_K_S,
    Q5_K_M,
    Q6_K,
}

impl Ftype {
    pub const ALL: [Ftype; 17] = [
        Ftype::F32,
        Ftype::F16,
        Ftype::BF16,
        Ftype::Q8_0,
        Ftype::Q4_0,
        Ftype::Q4_1,
        Ftype::Q5_0,
        Ftype::Q5_1,
        Ftype::Q2_K,
        Ftype::Q3_K_S,
        Ftype::Q3_K_M,
        Ftype::Q3_K_L,
        Ftype::Q4_K_S,
        Ftype::Q4_K_M,
        Ftype::Q5_K_S,
        Ftype::Q5_K_M,
        Ftype::Q6_K,
    ];

    /// The id written as `general.file_type`.
    pub fn id(self) -> u32 {
        match self {
            Ftype::F32 => 0,
            Ftype::F16 => 1,
            Ftype::Q4_0 => 2,
            Ftype::Q4_1 => 3,
            Ftype::Q8_0 => 7,
            Ftype::Q5_0 => 8,
            Ftype::Q5_1 => 9,
            Ftype::Q2_K => 10,
            Ftype::Q3_K_S => 11,
            Ftype::Q3_K_M => 12,
            Ftype::Q3_K_L => 13,
            Ftype::Q4_K_S => 14,
            Ftype::Q4_K_M => 15,
            Ftype::Q5_K_S => 16,
            Ftype::Q5_K_M => 17,
            Ftype::Q6_K => 18,
            Ftype::BF16 => 32,
        }
    }

    pub fn from_id(id: u64) -> Option<Ftype> {
        Ftype::ALL.into_iter().find(|f| f.id() as u64 == id)
    }

    /// llama.cpp's name (`Q4_K_M`).
    pub fn name(self) -> String {
        format!("{self:?}")
    }

    /// Parse a `--type`, case-insensitively; `q3_k`, `q4_k`, `q5_k` are their `_m` mixes.
    pub fn parse(s: &str) -> Result<Ftype> {
        let l = s.to_ascii_lowercase();
        let l = match l.as_str() {
            "q3_k" => "q3_k_m",
            "q4_k" => "q4_k_m",
            "q5_k" => "q5_k_m",
            other => other,
        };
        Ftype::ALL
            .into_iter()
            .find(|f| f.name().to_ascii_lowercase() == l)
            .ok_or_else(|| {
                let names: Vec<String> = Ftype::ALL
                    .iter()
                    .map(|f| f.name().to_ascii_lowercase())
                    .collect();
                anyhow::anyhow!(
                    "unknown --type {s:?}; choose one of: {} (q3_k, q4_k, q5_k mean the _m mixes)",
                    names.join(", ")
                )
            })
    }

    /// The tensor type most weights get.
    pub fn default_type(self) -> GgmlType {
        match self {
            Ftype::F32 => GgmlType::F32,
            Ftype::F16 => GgmlType::F16,
            Ftype::BF16 => GgmlType::BF16,
            Ftype::Q4_0 => GgmlType::Q4_0,
            Ftype::Q4_1 => GgmlType::Q4_1,
            Ftype::Q5_0 => GgmlType::Q5_0,
            Ftype::Q5_1 => GgmlType::Q5_1,
            Ftype::Q8_0 => GgmlType::Q8_0,
            Ftype::Q2_K => GgmlType::Q2K,
            Ftype::Q3_K_S | Ftype::Q3_K_M | Ftype::Q3_K_L => GgmlType::Q3K,
            Ftype::Q4_K_S | Ftype::Q4_K_M => GgmlType::Q4K,
            Ftype::Q5_K_S | Ftype::Q5_K_M => GgmlType::Q5K,
            Ftype::Q6_K => GgmlType::Q6K,
        }
    }
}

/// One tensor's decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub name: String,
    pub from: GgmlType,
    pub to: GgmlType,
    /// Set when the rule's type did not fit the rows: (wanted, why).
    pub fallback: Option<(GgmlType, String)>,
}

/// What a tensor is, for the mix rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    TokenEmbd,
    Output,
    AttnV,
    AttnOutput,
    AttnQkv,
    FfnDown,
    Other,
}

fn role(name: &str) -> Role {
    let part = name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .map_or(name, |(_, p)| p);
    match (name, part) {
        ("token_embd.weight", _) => Role::TokenEmbd,
        ("output.weight", _) => Role::Output,
        (_, "attn_v.weight") => Role::AttnV,
        (_, "attn_output.weight") => Role::AttnOutput,
        (_, "attn_qkv.weight") => Role::AttnQkv,
        (_, "ffn_down.weight") => Role::FfnDown,
        _ => Role::Other,
    }
}

/// Whether llama.cpp would quantize this tensor at all: 2-D (or more) weights, not norms,
/// not BERT's position or token-type embeddings.
fn quantizable(t: &TensorInfo) -> bool {
    t.dims.len() >= 2
        && t.name.ends_with("weight")
        && !t.name.contains("_norm.weight")
        && t.name != "position_embd.weight"
        && t.name != "token_types.weight"
}

/// Layers that get more bits in the _M mixes: the first and last eighth, and every third
/// one between.
fn more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64).rem_euclid(3) == 2
}

/// The order llama.cpp quantizes and writes tensors in: by layer (tensors outside the blocks
/// first), then by name. The mixes' layer counters run in this order.
pub fn order(g: &GgufFile) -> Vec<&TensorInfo> {
    let layer = |n: &str| -> i64 {
        n.strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|d| d.parse().ok())
            .unwrap_or(-1)
    };
    let mut ts: Vec<&TensorInfo> = g.tensors.iter().collect();
    ts.sort_by(|a, b| (layer(&a.name), &a.name).cmp(&(layer(&b.name), &b.name)));
    ts
}

/// Each tensor's type under `ft` (`pure`: no mix rules; `imatrix`: one is given, which makes
/// Q4_0/Q5_0's first eighth of `ffn_down` Q4_1/Q5_1, as in llama.cpp), in [`order`].
pub fn plan(g: &GgufFile, ft: Ftype, pure: bool, imatrix: bool) -> Vec<Choice> {
    let arch = g.architecture().unwrap_or("llama").to_owned();
    let heads = g
        .get_u64(&format!("{arch}.attention.head_count"))
        .unwrap_or(1);
    let kv_heads = g
        .get_u64(&format!("{arch}.attention.head_count_kv"))
        .unwrap_or(heads)
        .max(1);
    let gqa = heads / kv_heads;
    let tied = !g.has_tensor("output.weight");
    let count = |r: Role| {
        g.tensors
            .iter()
            .filter(|t| quantizable(t) && role(&t.name) == r)
            .count()
    };
    let (n_v, n_down) = (count(Role::AttnV), count(Role::FfnDown));
    let (mut i_v, mut i_down) = (0usize, 0usize);
    let base = ft.default_type();
    order(g)
        .into_iter()
        .map(|t| {
            let keep = Choice {
                name: t.name.clone(),
                from: t.ggml_type,
                to: t.ggml_type,
                fallback: None,
            };
            if !quantizable(t) {
                return keep;
            }
            if !base.is_quantized() {
                return Choice { to: base, ..keep };
            }
            if pure {
                let (to, fallback) = fallback(base, t.dims[0] as usize);
                return Choice {
                    to,
                    fallback,
                    ..keep
                };
            }
            let cols = t.dims[0] as usize;
            let r = role(&t.name);
            let mut ty = base;
            use Ftype as F;
            use GgmlType as G;
            if r == Role::Output || (tied && r == Role::TokenEmbd) {
                ty = if !quants::fits(base, cols) {
                    G::Q8_0
                } else if base != G::Q8_0 {
                    G::Q6K
                } else {
                    base
                };
            } else if r == Role::AttnV {
                ty = match ft {
                    F::Q2_K if gqa >= 4 => G::Q4K,
                    F::Q2_K => G::Q3K,
                    F::Q3_K_M if i_v < 2 => G::Q5K,
                    F::Q3_K_M => G::Q4K,
                    F::Q3_K_L => G::Q5K,
                    F::Q4_K_M | F::Q5_K_M if more_bits(i_v, n_v) => G::Q6K,
                    F::Q4_K_S if i_v < 4 => G::Q5K,
                    _ => base,
                };
                i_v += 1;
            } else if r == Role::FfnDown {
                let (i, n) = (i_down, n_down);
                ty = match ft {
                    F::Q2_K => G::Q3K,
                    F::Q3_K_M if i < n / 16 => G::Q5K,
                    F::Q3_K_M => G::Q4K,
                    F::Q3_K_L => G::Q5K,
                    F::Q4_K_M | F::Q5_K_M if more_bits(i, n) => G::Q6K,
                    F::Q4_K_S if i < n / 8 => G::Q5K,
                    F::Q4_0 if imatrix && i < n / 8 => G::Q4_1,
                    F::Q5_0 if imatrix && i < n / 8 => G::Q5_1,
                    _ => base,
                };
                i_down += 1;
            } else if r == Role::AttnOutput {
                ty = match ft {
                    F::Q2_K => G::Q3K,
                    F::Q3_K_M => G::Q4K,
                    F::Q3_K_L => G::Q5K,
                    _ => base,
                };
            } else if r == Role::AttnQkv {
                ty = match ft {
                    F::Q3_K_M | F::Q3_K_L => G::Q4K,
                    F::Q4_K_M => G::Q5K,
                    F::Q5_K_M => G::Q6K,
                    _ => base,
                };
            }
            let (to, fallback) = fallback(ty, cols);
            Choice {
                to,
                fallback,
                ..keep
            }
        })
        .collect()
}

/// A type whose blocks split rows of `cols`: `ty` itself, or llama.cpp's fallback (a
/// 32-block type of at least as many bits; F16 when even 32 does not divide the row).
fn fallback(ty: GgmlType, cols: usize) -> (GgmlType, Option<(GgmlType, String)>) {
    if quants::fits(ty, cols) {
        return (ty, None);
    }
    let mut to = match ty {
        GgmlType::Q2K | GgmlType::Q3K => GgmlType::Q4_0,
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        GgmlType::Q6K => GgmlType::Q8_0,
        other => other,
    };
    if !quants::fits(to, cols) {
        to = GgmlType::F16;
    }
    let why = format!(
        "rows of {cols} do not split into {:?}'s blocks of {}",
        ty,
        ty.block_size()
    );
    (to, Some((ty, why)))
}

/// The source as a GGUF: a file, a run directory read as its f32 export, or a Hugging Face
/// model directory through its conversion (`ferrolm_train::hf`).
fn open_source(input: &Path) -> Result<(PathBuf, GgufFile)> {
    let path = store::resolve(Some(input))?;
    if path.is_dir() && !crate::train::is_run(&path) && !ferrolm_train::hf::is_hf_dir(&path) {
        bail!(
            "{}: a directory that is neither a ferrolm run (no run.json) nor a Hugging Face model (no config.json); pass a GGUF file",
            path.display()
        );
    }
    let (g, _, _) = load_tokenizer(&path)?;
    Ok((path, g))
}

/// A tensor's values as f32.
fn values(g: &GgufFile, t: &TensorInfo) -> Result<Vec<f32>> {
    if t.ggml_type == GgmlType::F32 {
        let b = g.tensor_bytes(t)?;
        return Ok(b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect());
    }
    Ok(ferrolm_models::linear::dequantize(g, t)?)
}

/// Encode whole rows in parallel (the searches of the K-quants dominate: ~1 µs per value).
fn encode(
    ty: GgmlType,
    x: &[f32],
    cols: usize,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>, QuantizeError> {
    let rows_per_task = (65_536 / cols).max(1);
    let parts: Vec<Result<Vec<u8>, QuantizeError>> = x
        .par_chunks(rows_per_task * cols)
        .map(|c| quants::quantize_with(ty, c, cols, importance))
        .collect();
    let mut out = Vec::new();
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}

/// Metadata keys not copied from the source: what this file says differently.
fn replaced(key: &str) -> bool {
    key == "general.file_type"
        || key == "general.quantization_version"
        || key == "general.alignment"
        || key.starts_with("ferrolm.quantize.")
}

/// Write `bytes` to `to` through a temporary file in the same directory.
fn write_atomic(to: &Path, w: &GgufWriter) -> Result<()> {
    let dir = match to.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    {
        let mut bw = std::io::BufWriter::new(tmp.as_file_mut());
        w.write_to(&mut bw)
            .and_then(|_| std::io::Write::flush(&mut bw))
            .with_context(|| format!("writing {}", to.display()))?;
    }
    tmp.as_file().sync_all()?;
    let mut perms = tmp.as_file().metadata()?.permissions();
    // A model file, readable as any other (the temporary file was created 0600).
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    tmp.as_file().set_permissions(perms)?;
    tmp.persist(to)
        .map_err(|e| anyhow::anyhow!("writing {}: {}", to.display(), e.error))?;
    Ok(())
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let ft = Ftype::parse(&a.ty)?;
    let (src_path, src) = open_source(&a.input)?;
    if a.output.exists() && std::fs::canonicalize(&a.output)? == std::fs::canonicalize(&src_path)? {
        bail!(
            "the output would overwrite the source {}; choose another OUT",
            src_path.display()
        );
    }
    if let Some(c) = &a.calibration {
        if !c.is_file() {
            bail!("--calibration {}: no such file", c.display());
        }
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads(a.threads)?)
        .build()?;
    let imatrix = match &a.imatrix {
        Some(p) => Some(crate::imatrix::load(p)?),
        None => None,
    };
    let choices = plan(&src, ft, a.pure, imatrix.is_some());
    let requant: Vec<&Choice> = choices
        .iter()
        .filter(|c| c.from.is_quantized() && c.to != c.from)
        .collect();
    if !requant.is_empty() {
        eprintln!(
            "warning: {} tensors of {} are already quantized ({:?}, …): requantizing compounds both errors; quantize from an f32/f16/bf16 source when you have one",
            requant.len(),
            src_path.display(),
            requant[0].from
        );
    }
    for c in choices.iter().filter(|c| c.fallback.is_some()) {
        let (want, why) = c.fallback.as_ref().expect("filtered");
        eprintln!("{}: {why}: {:?} instead of {want:?}", c.name, c.to);
    }

    let t0 = Instant::now();
    let mut w = GgufWriter::new();
    for (k, v) in &src.metadata {
        if !replaced(k) {
            w.meta(k, v.clone());
        }
    }
    w.meta("general.file_type", Value::U32(ft.id()));
    w.meta("general.quantization_version", Value::U32(2));
    if let (Some(m), Some(p)) = (&imatrix, &a.imatrix) {
        // The keys llama-quantize writes.
        w.meta(
            "quantize.imatrix.file",
            Value::String(p.display().to_string()),
        );
        w.meta(
            "quantize.imatrix.entries_count",
            Value::U32(m.entries.len() as u32),
        );
        w.meta("quantize.imatrix.chunks_count", Value::U32(m.chunks));
        if let Some(d) = m.datasets.first() {
            w.meta("quantize.imatrix.dataset", Value::String(d.clone()));
        }
        let named = choices
            .iter()
            .filter(|c| c.to.is_quantized() && c.to != c.from && m.entries.contains_key(&c.name))
            .count();
        if named == 0 {
            bail!(
                "{}: the importance matrix names none of this model's tensors: it was computed for another model",
                p.display()
            );
        }
    }
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(src.tensors.len() as u64).with_style(
            indicatif::ProgressStyle::with_template("quantizing [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
    for (t, c) in order(&src).into_iter().zip(&choices) {
        bar.set_message(t.name.clone());
        bytes_in += t.n_bytes;
        let data = if c.to == t.ggml_type {
            src.tensor_bytes(t)?
        } else {
            let x = values(&src, t)?;
            let importance = match imatrix.as_ref().and_then(|m| m.entries.get(&t.name)) {
                Some(w) if w.len() != t.dims[0] as usize => bail!(
                    "{}: the importance matrix has {} columns for {} but the tensor has {}: it was computed for another model",
                    a.imatrix.as_deref().unwrap_or(Path::new("")).display(),
                    w.len(),
                    t.name,
                    t.dims[0]
                ),
                other => other.map(Vec::as_slice),
            };
            pool.install(|| encode(c.to, &x, t.dims[0] as usize, importance))
                .with_context(|| format!("quantizing {}", t.name))?
        };
        bytes_out += data.len() as u64;
        w.tensor(&t.name, &t.dims, c.to, data);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let mut by_type = std::collections::BTreeMap::<String, usize>::new();
    for c in &choices {
        *by_type.entry(format!("{:?}", c.to)).or_default() += 1;
    }
    let mix: Vec<String> = by_type.iter().map(|(t, n)| format!("{n} {t}")).collect();
    eprintln!(
        "{} → {} ({}): {:.1} MB → {:.1} MB in {secs:.1}s; tensors: {}",
        src_path.display(),
        a.output.display(),
        ft.name(),
        bytes_in as f64 / 1e6,
        bytes_out as f64 / 1e6,
        mix.join(", ")
    );

    if a.no_receipt {
        write_atomic(&a.output, &w)?;
        return Ok(());
    }
    let text = match &a.calibration {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading --calibration {}", p.display()))?,
        None => DEFAULT_CALIBRATION.to_owned(),
    };
    // Measure the result as it will be read: parsed from the bytes about to be written.
    let q = GgufFile::from_bytes(&a.output, w.to_bytes())?;
    let qm = load_file(q, a.output.clone(), None)?;
    let (g2, _, _) = load_tokenizer(&src_path)?;
    let base = load_file(g2, src_path.clone(), None)?;
    let r = eval::kld(
        &base,
        &qm,
        &text,
        a.calibration_tokens,
        a.ctx,
        threads(a.threads)?,
    )?;
    drop((qm, base));
    let calib = a
        .calibration
        .as_ref()
        .map_or_else(|| "built-in".to_owned(), |p| p.display().to_string());
    for (k, v) in receipt_metadata(&r, &src_path, &calib) {
        w.meta(&k, v);
    }
    write_atomic(&a.output, &w)?;
    if a.json {
        println!("{}", r.json());
    } else {
        println!("{}", r.summary());
    }
    Ok(())
}

/// The receipt as `ferrolm.quantize.*` metadata.
fn receipt_metadata(r: &KldReport, src: &Path, calibration: &str) -> Vec<(String, Value)> {
    let name = src
        .file_name()
        .map_or_else(|| src.display().to_string(), |f| f.to_string_lossy().into());
    vec![
        ("ferrolm.quantize.source".into(), Value::String(name)),
        (
            "ferrolm.quantize.calibration".into(),
            Value::String(calibration.to_owned()),
        ),
        (
            "ferrolm.quantize.tokens".into(),
            Value::U64(r.tokens as u64),
        ),
        ("ferrolm.quantize.kld_mean".into(), Value::F64(r.kld_mean)),
        ("ferrolm.quantize.kld_p99".into(), Value::F64(r.kld_p99)),
        (
            "ferrolm.quantize.top1_agreement".into(),
            Value::F64(r.top1_agreement),
        ),
        ("ferrolm.quantize.ppl".into(), Value::F64(r.ppl)),
        ("ferrolm.quantize.ppl_base".into(), Value::F64(r.ppl_base)),
    ]
}

/// The receipt a file carries as JSON (keys without the `ferrolm.quantize.` prefix); empty
/// when none.
pub fn receipt_json(g: &GgufFile) -> serde_json::Map<String, serde_json::Value> {
    g.metadata
        .iter()
        .filter_map(|(k, v)| {
            let short = k.strip_prefix("ferrolm.quantize.")?;
            let j = match v {
                Value::F64(x) => serde_json::json!(x),
                Value::F32(x) => serde_json::json!(x),
                Value::String(s) => serde_json::json!(s),
                other => serde_json::json!(other.as_u64()?),
            };
            Some((short.to_owned(), j))
        })
        .collect()
}

/// The receipt a file carries, as (short key, printable value) pairs; empty when none.
pub fn receipt(g: &GgufFile) -> Vec<(String, String)> {
    g.metadata
        .iter()
        .filter_map(|(k, v)| {
            let short = k.strip_prefix("ferrolm.quantize.")?;
            let s = match v {
                Value::F64(x) => format!("{x:.6}"),
                Value::F32(x) => format!("{x:.6}"),
                Value::String(s) => s.clone(),
                other => other
                    .as_u64()
                    .map_or_else(|| format!("{other:?}"), |n| n.to_string()),
            };
            Some((short.to_owned(), s))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn more_bits_matches_llama_cpp_for_30_layers() {
        // llama.cpp: i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2, with n = 30 → n/8 = 3, 7n/8 = 26.
        let got: Vec<usize> = (0..30).filter(|&i| more_bits(i, 30)).collect();
        assert_eq!(got, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
    }

    #[test]
    fn every_type_name_parses_and_aliases_are_the_m_mixes() {
        for f in Ftype::ALL {
            assert_eq!(Ftype::parse(&f.name()).unwrap(), f);
            assert_eq!(Ftype::from_id(f.id() as u64), Some(f));
        }
        assert_eq!(Ftype::parse("q4_k").unwrap(), Ftype::Q4_K_M);
        let e = Ftype::parse("q4_k_x").unwrap_err().to_string();
        assert!(e.contains("q4_k_m") && e.contains("q8_0"), "{e}");
    }

    #[test]
    fn rows_that_do_not_split_fall_back_as_llama_cpp_does() {
        assert_eq!(fallback(GgmlType::Q4K, 576).0, GgmlType::Q5_0);
        assert_eq!(fallback(GgmlType::Q6K, 576).0, GgmlType::Q8_0);
        assert_eq!(fallback(GgmlType::Q3K, 576).0, GgmlType::Q4_0);
        assert_eq!(fallback(GgmlType::Q5K, 576).0, GgmlType::Q5_1);
        assert_eq!(fallback(GgmlType::Q4K, 1536), (GgmlType::Q4K, None));
        assert_eq!(fallback(GgmlType::Q8_0, 100).0, GgmlType::F16);
    }
}
