//! The blueprint every architecture shares, read from GGUF metadata `{arch}.*`: sizes, heads,
//! RoPE and norm constants, the attention window. An architecture with more knobs (Gemma 3's
//! layer pattern, soft caps) reads them beside this in its own file.

use ferrolm_gguf::GgufFile;

use crate::{Arch, ModelError};

/// The blueprint, read from GGUF metadata `{arch}.*`.
#[derive(Debug, Clone)]
pub struct Config {
    pub arch: Arch,
    pub n_layers: usize,
    pub dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub vocab_size: usize,
    /// The context this load runs within (at most what the file declares).
    pub context_length: usize,
    /// The context the file declares: above `context_length` only for a LongRoPE model loaded
    /// within its original context (see `llama.rs`), which a longer `--ctx` loads in full.
    pub file_context_length: usize,
    pub rope_theta: f32,
    /// Dimensions of each head that RoPE rotates (the rest pass through).
    pub rope_dim: usize,
    /// NeoX-style RoPE rotates (i, i + d/2); GGUF `llama` weights are permuted for the
    /// interleaved (2i, 2i+1) form.
    pub rope_neox: bool,
    pub rms_eps: f32,
    /// `attention.sliding_window`: positions a windowed layer attends to, the current one
    /// included (Mistral, Phi-3: every layer; Gemma 3: its local layers). `None` (absent or 0):
    /// full causal attention.
    pub sliding_window: Option<usize>,
}

impl Config {
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        let path = g.path.display().to_string();
        let arch = Arch::from_gguf(g)?;
        let p = g.architecture()?;
        let get =
            |k: &str| -> Result<usize, ModelError> { Ok(g.get_u64(&format!("{p}.{k}"))? as usize) };
        let n_layers = get("block_count")?;
        let dim = get("embedding_length")?;
        let n_heads = get("attention.head_count")?;
        let n_kv_heads = g
            .get_u64(&format!("{p}.attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(n_heads);
        let ffn_dim = get("feed_forward_length")?;
        let context_length = get("context_length")?;
        let bad = |key: &str, reason: String| ModelError::Config {
            path: path.clone(),
            key: format!("{p}.{key}"),
            reason,
        };
        if n_heads == 0 || dim % n_heads != 0 {
            return Err(bad(
                "attention.head_count",
                format!("{n_heads} does not divide the width {dim}"),
            ));
        }
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(bad(
                "attention.head_count_kv",
                format!("{n_kv_heads} does not divide the head count {n_heads}"),
            ));
        }
        let head_dim = g
            .get_u64(&format!("{p}.attention.key_length"))
            .map(|v| v as usize)
            .unwrap_or(dim / n_heads);
        if head_dim > 256 || !head_dim.is_multiple_of(2) {
            return Err(bad(
                "attention.key_length",
                format!("head size {head_dim} must be even and at most 256"),
            ));
        }
        let rope_dim = g
            .get_u64(&format!("{p}.rope.dimension_count"))
            .map(|v| v as usize)
            .unwrap_or(head_dim);
        if rope_dim > head_dim || !rope_dim.is_multiple_of(2) {
            return Err(bad(
                "rope.dimension_count",
                format!("{rope_dim} must be even and at most {head_dim}"),
            ));
        }
        for (k, v) in [
            ("block_count", n_layers),
            ("embedding_length", dim),
            ("feed_forward_length", ffn_dim),
        ] {
            if v == 0 || v > 1 << 20 {
                return Err(bad(k, format!("{v} is out of range")));
            }
        }
        let vocab_size = g
            .tensor("token_embd.weight")?
            .dims
            .get(1)
            .copied()
            .unwrap_or(0) as usize;
        Ok(Config {
            arch,
            n_layers,
            dim,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_dim,
            vocab_size,
            context_length: context_length.max(1),
            file_context_length: context_length.max(1),
            rope_theta: g
                .get_f64(&format!("{p}.rope.freq_base"))
                .unwrap_or(10_000.0) as f32,
            rope_dim,
            rope_neox: arch.rope_neox(),
            rms_eps: g
                .get_f64(&format!("{p}.attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5) as f32,
            sliding_window: g
                .get_u64(&format!("{p}.attention.sliding_window"))
                .ok()
                .filter(|&w| w > 0)
                .map(|w| w as usize),
        })
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}
