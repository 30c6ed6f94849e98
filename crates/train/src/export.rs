//! A checkpoint as GGUF (`llama` architecture): the file `ferrolm export` writes and, built in
//! memory at f32, what `chat`/`generate`/`serve --model RUN_DIR` load — one loader for trained
//! and downloaded models.
//!
//! Names map key for key (Hugging Face Llama → GGUF): `model.layers.N.self_attn.q_proj` →
//! `blk.N.attn_q`, … ; the training model already keeps RoPE pairs interleaved as GGUF
//! `llama` does, so q/k need no permutation. Matrices are `[out, in]` row-major, which is
//! GGUF's `[in, out]` (innermost first). Norm weights stay f32 at every type; a q8_0 export
//! keeps f16 for matrices whose rows are not a multiple of 32 (q8_0's block), as llama.cpp's
//! quantizer falls back for such shapes.

use std::path::{Path, PathBuf};

use ferrolm_gguf::{writer::GgufWriter, GgmlType, GgufFile, Value};
use half::f16;

use crate::checkpoint;
use crate::config::RunConfig;
use crate::model::{Layout, ModelConfig};
use crate::TrainError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportType {
    F32,
    F16,
    Q8_0,
}

impl std::str::FromStr for ExportType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(ExportType::F32),
            "f16" => Ok(ExportType::F16),
            "q8_0" => Ok(ExportType::Q8_0),
            _ => Err(format!("unknown type `{s}`: use f32, f16 or q8_0")),
        }
    }
}

/// Whether `path` is a training run directory or one of its checkpoints.
pub fn is_run(path: &Path) -> bool {
    path.join("finetune.json").is_file()
        || path.join("config.json").is_file() && path.join("tokenizer.gguf").is_file()
        || path.join("model.safetensors").is_file() && path.join("state.json").is_file()
}

/// (run directory, checkpoint directory) for a run (its latest checkpoint) or a checkpoint.
pub fn locate(path: &Path) -> Result<(PathBuf, PathBuf), TrainError> {
    if path.join("model.safetensors").is_file() {
        let run = path
            .parent()
            .and_then(Path::parent)
            .map(Path::to_owned)
            .unwrap_or_default();
        return Ok((run, path.to_owned()));
    }
    match checkpoint::latest(path)? {
        Some(ck) => Ok((path.to_owned(), ck)),
        None => Err(TrainError::Checkpoint {
            path: path.to_owned(),
            reason:
                "has no checkpoint yet (one is written at every evaluation and when training stops)"
                    .into(),
        }),
    }
}

/// The GGUF file of `path` (a run or a checkpoint) at weight type `ty`, in memory.
pub fn gguf_bytes(path: &Path, ty: ExportType) -> Result<Vec<u8>, TrainError> {
    if let Some(bytes) = lora_run_gguf(path, ty)? {
        return Ok(bytes);
    }
    let (run, ck) = locate(path)?;
    let cp = run.join("config.json");
    let text = std::fs::read_to_string(&cp).map_err(TrainError::io(&cp))?;
    let cfg: RunConfig = serde_json::from_str(&text).map_err(|e| TrainError::Config {
        what: cp.display().to_string(),
        reason: e.to_string(),
    })?;
    let layout = Layout::new(&cfg.model);
    let params = checkpoint::read_safetensors(&ck.join("model.safetensors"), &layout.tensors, "")?;
    let tok = GgufFile::open(run.join("tokenizer.gguf"))?;
    let name = run
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "ferrolm-run".into());
    Ok(gguf_from_params(&cfg.model, &params, &tok, &name, ty))
}

/// A GGUF (`llama`) of `params` in `c`'s layout, with every `tokenizer.*` key of `tok`.
pub fn gguf_from_params(
    c: &ModelConfig,
    params: &[f32],
    tok: &GgufFile,
    name: &str,
    ty: ExportType,
) -> Vec<u8> {
    let layout = Layout::new(c);
    let mut w = GgufWriter::new();
    let u = |v: usize| Value::U32(v as u32);
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("general.name", Value::String(name.to_owned()))
        .meta(
            "general.file_type",
            Value::U32(match ty {
                ExportType::F32 => 0,
                ExportType::F16 => 1,
                ExportType::Q8_0 => 7,
            }),
        )
        .meta("llama.context_length", u(c.context))
        .meta("llama.embedding_length", u(c.dim))
        .meta("llama.block_count", u(c.n_layers))
        .meta("llama.feed_forward_length", u(c.ffn_dim))
        .meta("llama.attention.head_count", u(c.n_heads))
        .meta("llama.attention.head_count_kv", u(c.n_kv_heads))
        .meta("llama.rope.dimension_count", u(c.head_dim()))
        .meta("llama.rope.freq_base", Value::F32(c.rope_theta))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(c.rms_eps),
        )
        .meta("llama.vocab_size", u(c.vocab_size));
    for (k, v) in tok
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
    {
        w.meta(k, v.clone());
    }
    for t in &layout.tensors {
        let data = &params[t.range()];
        let dims: Vec<u64> = t.shape.iter().rev().map(|&d| d as u64).collect();
        let gguf_name = gguf_name(&t.name);
        if t.shape.len() == 1 || ty == ExportType::F32 {
            w.tensor_f32(&gguf_name, &dims, data);
        } else if ty == ExportType::Q8_0 && t.shape[1] % 32 == 0 {
            w.tensor(&gguf_name, &dims, GgmlType::Q8_0, q8_0(data));
        } else {
            let bytes = data
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect();
            w.tensor(&gguf_name, &dims, GgmlType::F16, bytes);
        }
    }
    w.to_bytes()
}

/// A LoRA fine-tuning run (`finetune.json` with method lora) as its base with the adapter of
/// its latest checkpoint folded in; `None` for any other directory.
fn lora_run_gguf(path: &Path, ty: ExportType) -> Result<Option<Vec<u8>>, TrainError> {
    let fp = path.join("finetune.json");
    let Ok(text) = std::fs::read_to_string(&fp) else {
        return Ok(None);
    };
    let cfg: crate::finetune::FinetuneConfig =
        serde_json::from_str(&text).map_err(|e| TrainError::Config {
            what: fp.display().to_string(),
            reason: e.to_string(),
        })?;
    let crate::finetune::Method::Lora(lc) = cfg.method else {
        return Ok(None);
    };
    let base = crate::base::load(&cfg.base)?;
    let (_, ck) = locate(path)?;
    let lora = crate::lora::Lora::new(&base.config, lc);
    let adapter = checkpoint::read_safetensors(&ck.join("model.safetensors"), &lora.tensors, "")?;
    let mut params = base.params;
    crate::peft::merge(&base.config, &mut params, &lora, &adapter);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Some(gguf_from_params(
        &base.config,
        &params,
        &base.gguf,
        &name,
        ty,
    )))
}

/// `base` (a GGUF or run) with a PEFT LoRA adapter directory folded in, as GGUF bytes.
pub fn merged_gguf(base: &Path, adapter: &Path, ty: ExportType) -> Result<Vec<u8>, TrainError> {
    let b = crate::base::load(base)?;
    let (lora, ap) = crate::peft::load(adapter, &b.config)?;
    let mut params = b.params;
    crate::peft::merge(&b.config, &mut params, &lora, &ap);
    let name = adapter
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(gguf_from_params(&b.config, &params, &b.gguf, &name, ty))
}

/// Write `bytes` to `to` atomically (temp file + rename).
pub fn write_file(to: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let tmp = to.with_extension("gguf.tmp");
    std::fs::write(&tmp, bytes).map_err(TrainError::io(&tmp))?;
    std::fs::rename(&tmp, to).map_err(TrainError::io(to))
}

/// The parsed in-memory GGUF of a run or checkpoint (f32), for the inference loader.
pub fn open_as_gguf(path: &Path) -> Result<GgufFile, TrainError> {
    Ok(GgufFile::from_bytes(
        path,
        gguf_bytes(path, ExportType::F32)?,
    )?)
}

/// Hugging Face Llama tensor name → GGUF name (the table lives with the importer, [`crate::hf`]).
pub fn gguf_name(hf: &str) -> String {
    crate::hf::llama_gguf_name(hf).unwrap_or_else(|| hf.to_owned())
}

/// ggml's Q8_0 (`quantize_row_q8_0_ref`): per 32 values an f16 scale `d = max|x| / 127` and
/// 32 signed bytes `round(x / d)`.
fn q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for blk in x.chunks_exact(32) {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

/// Write the GGUF of `path` to `to` (atomically).
pub fn export(path: &Path, to: &Path, ty: ExportType) -> Result<u64, TrainError> {
    let bytes = gguf_bytes(path, ty)?;
    write_file(to, &bytes)?;
    Ok(bytes.len() as u64)
}
