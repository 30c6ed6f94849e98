//! Transformer models as pure math over a flat batch: tokens, positions and KV-cache slots
//! in, logits out. No sampling, scheduling or text here (see `docs/STYLE.md`).
//!
//! * [`Model`] — the registry: one enum over the architectures, one loader ([`model`]).
//! * [`llama`] — the Llama family (`llama`: SmolLM2, TinyLlama, Llama 2/3; `qwen2`).
//! * [`Encoder`] — embedding models (no KV cache, no logits): [`bert`] (all-MiniLM-L6-v2).
//! * [`gemma3`] — Gemma 3 (interleaved sliding-window/global attention, GeGLU, extra norms).
//! * [`ops`] — the leaf operations the forward passes share (norms, RoPE, paged attention).
//! * [`quant`] — repacked 4/8-bit weights and their SIMD kernels, with a scalar reference.
//! * [`KvCache`] — K/V storage in fixed-size blocks addressed by slot
//!   (`block_id * block_size + offset`), as f16 or quantized ([`KvType`], [`kv_cache`]); which
//!   blocks a sequence owns is `ferrolm-kv`'s business.

use ferrolm_gguf::{GgufFile, TensorInfo};

pub mod activations;
pub mod adapter;
pub mod bert;
pub mod config;
pub mod gemma3;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod mat;
pub mod model;
pub mod ops;
mod pool;
pub mod quant;
pub mod reference;
pub mod simd;

pub use activations::{ActivationStats, Site};
pub use adapter::{Adapter, Proj};
pub use bert::Bert;
pub use config::Config;
pub use kv_cache::{KvCache, KvType, KV_TYPES};
pub use llama::Llama;
pub use model::{Arch, Encoder, Model, SUPPORTED_ARCHITECTURES, SUPPORTED_ENCODERS};
pub use ops::Scratch;
pub use quant::Isa;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] ferrolm_gguf::GgufError),
    #[error("{path}: tensor `{name}`: {reason}")]
    Tensor {
        path: String,
        name: String,
        reason: String,
    },
    #[error("{path}: architecture `{arch}` is not supported (supported: {supported})", supported = model::SUPPORTED_ARCHITECTURES)]
    UnsupportedArchitecture { path: String, arch: String },
    #[error("{path}: {key}: {reason}")]
    Config {
        path: String,
        key: String,
        reason: String,
    },
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error("--kv-type {kv_type}: the model's head size is {head_dim}, and {need}; types that work for this model: {works}")]
    KvType {
        kv_type: &'static str,
        head_dim: usize,
        need: &'static str,
        works: String,
    },
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("tensor library: {0}")]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn tensor(g: &GgufFile, info: &TensorInfo, reason: &str) -> Self {
        ModelError::Tensor {
            path: g.path.display().to_string(),
            name: info.name.clone(),
            reason: reason.to_owned(),
        }
    }
}

/// One sequence's part of a flat batch.
#[derive(Debug, Clone)]
pub struct SeqSpan<'a> {
    /// Index of the sequence's first token in the batch, and how many it has in this step.
    pub start: usize,
    pub len: usize,
    /// The blocks holding this sequence's KV, in position order.
    pub block_table: &'a [u32],
}

/// A flat batch: tokens of several sequences back to back. Token `i` sits at `positions[i]`
/// of its sequence; a sequence's tokens are consecutive, in position order, and its cache
/// already holds positions `0..positions[start]` (earlier steps or a shared prefix).
#[derive(Debug, Clone)]
pub struct Batch<'a> {
    pub tokens: &'a [u32],
    pub positions: &'a [u32],
    pub seqs: &'a [SeqSpan<'a>],
    /// Batch indices whose logits are wanted (e.g. each sequence's last token; all of them for
    /// perplexity). Logits come back in this order.
    pub logits_for: &'a [usize],
    /// Each sequence's LoRA adapter, in `seqs` order (empty: none for any).
    pub adapters: &'a [Option<&'a adapter::Adapter>],
}
