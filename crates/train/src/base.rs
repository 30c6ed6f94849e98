//! A pretrained model as the starting point of fine-tuning: a GGUF (`llama` architecture:
//! SmolLM2, TinyLlama, Llama) or a `ferrolm train` run, as the training model's config and
//! flat f32 parameters. GGUF weights are dequantized (any type ferrolm-models reads); GGUF
//! already stores q/k with RoPE pairs interleaved, as the training model computes them.
//!
//! Hugging Face checkpoints store q/k rows in the "rotate-half" order instead; llama.cpp's
//! converter permutes them. [`hf_rows`] undoes that for one head-structured matrix, so LoRA
//! B matrices of q/k can be saved in PEFT's (Hugging Face) order and read back.

use std::path::Path;

use ferrolm_gguf::GgufFile;
use ferrolm_models::Arch;

use crate::export::gguf_name;
use crate::model::{Layout, ModelConfig, StoredBase};
use crate::TrainError;

/// The base model: its config, parameters, and the GGUF holding its tokenizer and template.
pub struct Base {
    pub config: ModelConfig,
    pub params: Vec<f32>,
    pub gguf: GgufFile,
}

fn unsupported(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Config {
        what: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Load `path`: a GGUF file, or a training run directory (its latest checkpoint).
pub fn load(path: &Path) -> Result<Base, TrainError> {
    let (config, gguf) = open(path)?;
    let layout = Layout::new(&config);
    let mut params = vec![0f32; layout.len];
    for t in &layout.tensors {
        let info = gguf.tensor(&gguf_name(&t.name))?;
        let w = ferrolm_models::linear::dequantize(&gguf, info)
            .map_err(|e| unsupported(path, e.to_string()))?;
        params[t.range()].copy_from_slice(&w);
    }
    Ok(Base {
        config,
        params,
        gguf,
    })
}

/// Load `path` keeping every tensor in its stored (quantized) form: QLoRA's frozen base.
/// Each tensor is dequantized once here, so a bad one fails now and not mid-training.
pub fn load_stored(path: &Path) -> Result<(ModelConfig, StoredBase, GgufFile), TrainError> {
    let (config, gguf) = open(path)?;
    let layout = Layout::new(&config);
    let mut tensors = Vec::with_capacity(layout.tensors.len());
    for t in &layout.tensors {
        let info = gguf.tensor(&gguf_name(&t.name))?;
        let stored = ferrolm_models::linear::Stored::load(&gguf, info)
            .map_err(|e| unsupported(path, e.to_string()))?;
        stored
            .dequantize()
            .map_err(|e| unsupported(path, e.to_string()))?;
        tensors.push((t.offset, stored));
    }
    Ok((config, StoredBase { tensors }, gguf))
}

/// The GGUF of `path` (a file, or a training run as the GGUF `export` would write), of any
/// architecture: for its tokenizer and template.
pub fn open_gguf(path: &Path) -> Result<GgufFile, TrainError> {
    Ok(if crate::export::is_run(path) {
        crate::export::open_as_gguf(path)?
    } else {
        GgufFile::open(path)?
    })
}

/// The GGUF of `path` and the training config it describes, with every shape checked.
pub fn open(path: &Path) -> Result<(ModelConfig, GgufFile), TrainError> {
    let gguf = open_gguf(path)?;
    let lc =
        ferrolm_models::Config::from_gguf(&gguf).map_err(|e| unsupported(path, e.to_string()))?;
    if lc.arch != Arch::Llama || lc.rope_neox {
        return Err(unsupported(path, "fine-tuning supports the `llama` GGUF architecture (SmolLM2, TinyLlama, Llama); this model is not one"));
    }
    if let Some(w) = lc.sliding_window {
        return Err(unsupported(
            path,
            format!("fine-tuning attends over the whole context; this model has a sliding window of {w} (`llama.attention.sliding_window`)"),
        ));
    }
    if lc.head_dim * lc.n_heads != lc.dim || lc.rope_dim != lc.head_dim {
        return Err(unsupported(
            path,
            "fine-tuning needs head size = width / heads and RoPE over the whole head",
        ));
    }
    let config = ModelConfig {
        vocab_size: lc.vocab_size,
        dim: lc.dim,
        n_layers: lc.n_layers,
        n_heads: lc.n_heads,
        n_kv_heads: lc.n_kv_heads,
        ffn_dim: lc.ffn_dim,
        context: lc.context_length,
        rope_theta: lc.rope_theta,
        rms_eps: lc.rms_eps,
        tied_embeddings: !gguf.has_tensor("output.weight"),
    };
    if gguf.has_tensor("rope_freqs.weight") || gguf.has_tensor("blk.0.attn_q.bias") {
        return Err(unsupported(
            path,
            "RoPE frequency factors and q/k/v biases are not supported in training yet",
        ));
    }
    let layout = Layout::new(&config);
    for t in &layout.tensors {
        let name = gguf_name(&t.name);
        let info = gguf.tensor(&name)?;
        if info.n_elements() as usize != t.len() {
            return Err(unsupported(
                path,
                format!(
                    "tensor {name} has {} elements, expected {:?}",
                    info.n_elements(),
                    t.shape
                ),
            ));
        }
    }
    Ok((config, gguf))
}

/// Reorder the rows of a (heads · hd) × cols matrix from GGUF's interleaved-pair order to
/// Hugging Face's rotate-half order (`to_hf = true`) or back. GGUF row `h·hd + 2i + j` is HF
/// row `h·hd + j·hd/2 + i` (llama.cpp `permute`). Any element type: the Hugging Face importer
/// moves f16/bf16 rows as bytes (`cols` = bytes per row).
pub fn hf_rows<T: Copy + Default>(
    m: &[T],
    heads: usize,
    hd: usize,
    cols: usize,
    to_hf: bool,
) -> Vec<T> {
    let mut out = vec![T::default(); m.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let gguf = h * hd + 2 * i + j;
                let hf = h * hd + j * (hd / 2) + i;
                let (from, to) = if to_hf { (gguf, hf) } else { (hf, gguf) };
                out[to * cols..][..cols].copy_from_slice(&m[from * cols..][..cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::hf_rows;

    #[test]
    fn hf_row_order_round_trips_and_matches_llama_cpp_permute() {
        // 2 heads of 4, 1 column: GGUF rows [h0: a0 b0 a1 b1] ← HF [h0: a0 a1 b0 b1]
        let hf: Vec<f32> = (0..8).map(|x| x as f32).collect();
        let gguf = hf_rows(&hf, 2, 4, 1, false);
        assert_eq!(gguf, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        assert_eq!(hf_rows(&gguf, 2, 4, 1, true), hf);
    }
}
