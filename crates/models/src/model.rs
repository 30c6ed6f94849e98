//! The model registry: the one place that knows which architectures exist. [`Arch`] names
//! them (as GGUF's `general.architecture` spells them), [`Model`] holds a loaded one, and
//! [`Model::load`] is the match that picks the forward pass. Everything above this crate
//! (engine, session, server, CLI) sees only [`Model`].
//!
//! Adding an architecture: a variant of an existing block (optional tensors, a fused matrix, a
//! window) is a variant of [`Arch`] (with its GGUF names) and an arm in [`Model::load`], plus
//! what its file reads differently (as `qwen3` and `phi3` in `llama.rs`). A block of its own:
//! write its file (config extras → weights → load → forward, using [`crate::ops`]), then add a
//! variant to [`Arch`], to [`Net`], and an arm to [`Model::load`] and to the `each!` dispatch
//! below.
//!
//! Embedding models are [`Encoder`]s: a text in, one vector out, no KV cache and no logits, so
//! they have a loader and a call of their own ([`Encoder::load`] on a Hugging Face directory,
//! [`Encoder::embed`]) instead of the decoder's paged-KV `forward`.

use std::path::Path;
use std::sync::OnceLock;

use ferrolm_gguf::GgufFile;

use crate::bert::Bert;

use crate::gemma3::Gemma3;
use crate::kv_cache::KeyCalibration;
use crate::llama::Llama;
use crate::{Adapter, Batch, Config, Isa, KvCache, ModelError, Scratch};

/// The architectures ferrolm runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// GGUF `llama` and `mistral`: SmolLM2, TinyLlama, Llama 2/3 (with `rope_freqs` scaling),
    /// Mistral (with `attention.sliding_window` where the file has it).
    Llama,
    /// GGUF `qwen2`: Llama with q/k/v biases and NeoX RoPE.
    Qwen2,
    /// GGUF `qwen3`: Llama with per-head RMSNorm on q and k, NeoX RoPE.
    Qwen3,
    /// GGUF `phi3`: Llama with fused qkv and gate‖up matrices, NeoX RoPE, sliding window,
    /// LongRoPE short factors within the original context.
    Phi3,
    /// GGUF `gemma3`: interleaved sliding-window/global attention, GeGLU, extra norms.
    Gemma3,
}

/// Every GGUF `general.architecture` name ferrolm accepts (for error messages).
pub const SUPPORTED_ARCHITECTURES: &str = "llama, mistral, qwen2, qwen3, phi3, gemma3";

impl Arch {
    pub fn from_name(name: &str) -> Option<Arch> {
        Some(match name {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "phi3" => Arch::Phi3,
            "gemma3" => Arch::Gemma3,
            _ => return None,
        })
    }

    /// The file's `general.architecture`, or a refusal that names what is supported.
    pub fn from_gguf(g: &GgufFile) -> Result<Arch, ModelError> {
        let name = g.architecture()?;
        Arch::from_name(name).ok_or_else(|| ModelError::UnsupportedArchitecture {
            path: g.path.display().to_string(),
            arch: name.to_owned(),
        })
    }

    /// NeoX-style RoPE rotates (i, i + d/2); GGUF `llama` weights are permuted for the
    /// interleaved (2i, 2i+1) form.
    pub fn rope_neox(self) -> bool {
        matches!(self, Arch::Qwen2 | Arch::Qwen3 | Arch::Phi3 | Arch::Gemma3)
    }
}

/// A loaded model: its network, of any supported architecture, and what the KV cache derives
/// from it once (the key calibration a q4_0 cache applies, from a text set at load).
#[derive(Debug)]
pub struct Model {
    pub net: Net,
    /// Token ids of a calibration text ([`Self::set_calibration`]); empty: none.
    calibration: Vec<u32>,
    /// [`crate::kv_cache::key_calibration`] over `calibration`, computed by the first cache
    /// that asks for it.
    keys: OnceLock<KeyCalibration>,
}

/// The network of each architecture.
#[derive(Debug)]
pub enum Net {
    Llama(Llama),
    Gemma3(Gemma3),
}

/// Run `$body` on whichever architecture `$model` holds, bound to `$m`.
macro_rules! each {
    ($model:expr, $m:ident => $body:expr) => {
        match &$model.net {
            Net::Llama($m) => $body,
            Net::Gemma3($m) => $body,
        }
    };
}

impl Model {
    /// Load the weights of a GGUF file (a training run is read through the GGUF its export
    /// writes); `progress(done, total)` is called after each layer.
    pub fn load(g: &GgufFile, progress: &mut dyn FnMut(usize, usize)) -> Result<Self, ModelError> {
        Self::load_for_context(g, None, progress)
    }

    /// [`Self::load`] for a run whose context will be `context` tokens, where the architecture
    /// depends on it (LongRoPE's long factors, see [`Llama::load_for_context`]).
    pub fn load_for_context(
        g: &GgufFile,
        context: Option<usize>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        let net = match Arch::from_gguf(g)? {
            Arch::Llama | Arch::Qwen2 | Arch::Qwen3 | Arch::Phi3 => {
                Net::Llama(Llama::load_for_context(g, context, progress)?)
            }
            Arch::Gemma3 => Net::Gemma3(Gemma3::load(g, progress)?),
        };
        Ok(net.into())
    }

    /// The calibration text (token ids, a few hundred are enough) from which a q4_0 KV cache
    /// takes the model's key statistics ([`Self::key_calibration`]); set once, at load, before
    /// any cache is built. Without one, caches store keys uncalibrated.
    pub fn set_calibration(&mut self, tokens: Vec<u32>) {
        self.calibration = tokens;
        self.keys = OnceLock::new();
    }

    /// The key statistics a q4_0 cache applies, over the calibration text, computed on the
    /// first call (one forward pass over it); `None` without a calibration text.
    pub fn key_calibration(&self) -> Result<Option<&KeyCalibration>, ModelError> {
        if self.calibration.is_empty() {
            return Ok(None);
        }
        if let Some(k) = self.keys.get() {
            return Ok(Some(k));
        }
        let k = crate::kv_cache::key_calibration(self, &self.calibration)?;
        Ok(Some(self.keys.get_or_init(|| k)))
    }

    /// The shared blueprint: sizes, heads, context, vocabulary.
    pub fn cfg(&self) -> &Config {
        each!(self, m => &m.cfg)
    }

    /// The SIMD level the kernels run at.
    pub fn isa(&self) -> Isa {
        each!(self, m => m.isa)
    }

    /// Run the batch: write its K/V into `kv` at its slots, and return logits (`vocab` floats
    /// per entry of `batch.logits_for`, in that order) in `s.logits`. On a rayon pool of more
    /// than one thread, the other workers poll for the pass's work until it ends
    /// ([`crate::pool`]) instead of parking between its parallel regions.
    pub fn forward(
        &self,
        batch: &Batch,
        kv: &mut KvCache,
        s: &mut Scratch,
    ) -> Result<(), ModelError> {
        crate::pool::spinning(|| each!(self, m => m.forward(batch, kv, s)))
    }

    /// An adapter fits this model (or the refusal says why not).
    pub fn check_adapter(&self, ad: &Adapter) -> Result<(), ModelError> {
        each!(self, m => m.check_adapter(ad))
    }

    /// Parameter count (all weights, a tied head counted once).
    pub fn n_params(&self) -> usize {
        each!(self, m => m.n_params())
    }

    /// Bytes of weights in memory.
    pub fn weight_bytes(&self) -> usize {
        each!(self, m => m.weight_bytes())
    }

    /// How each kind of matrix is held (for `ferrolm info`).
    pub fn kernel_summary(&self) -> String {
        each!(self, m => m.kernel_summary())
    }
}

impl From<Net> for Model {
    fn from(net: Net) -> Self {
        Model {
            net,
            calibration: Vec::new(),
            keys: OnceLock::new(),
        }
    }
}

/// Every encoder `config.json` `model_type` ferrolm accepts (for error messages).
pub const SUPPORTED_ENCODERS: &str =
    "bert (sentence-transformers directories such as all-MiniLM-L6-v2)";

/// A loaded embedding model of any supported encoder architecture.
#[derive(Debug)]
pub enum Encoder {
    /// `config.json` `model_type: bert`.
    Bert(Bert),
}

impl Encoder {
    /// Load a Hugging Face model directory (`config.json` names the architecture).
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Config {
            path: path.display().to_string(),
            key: "(file)".into(),
            reason: format!("cannot read ({e}); an embedding model is a directory with config.json, model.safetensors and tokenizer.json"),
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.display().to_string(),
            key: "(file)".into(),
            reason: format!("not JSON: {e}"),
        })?;
        match v.get("model_type").and_then(serde_json::Value::as_str) {
            Some("bert") => Ok(Encoder::Bert(Bert::load(dir)?)),
            other => Err(ModelError::Config {
                path: path.display().to_string(),
                key: "model_type".into(),
                reason: format!(
                    "`{}` is not a supported encoder (supported: {SUPPORTED_ENCODERS})",
                    other.unwrap_or("(missing)")
                ),
            }),
        }
    }

    /// One vector per token sequence (special tokens included), pooled as the model says.
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        match self {
            Encoder::Bert(m) => m.embed(ids),
        }
    }

    /// [`Encoder::embed`] of several sequences in one pass.
    pub fn embed_batch(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        match self {
            Encoder::Bert(m) => m.embed_batch(seqs),
        }
    }

    /// The directory the model was loaded from.
    pub fn dir(&self) -> &Path {
        match self {
            Encoder::Bert(m) => &m.dir,
        }
    }

    /// The length of each vector.
    pub fn dim(&self) -> usize {
        match self {
            Encoder::Bert(m) => m.dim(),
        }
    }

    /// The longest token sequence the model takes (its position embeddings).
    pub fn max_tokens(&self) -> usize {
        match self {
            Encoder::Bert(m) => m.cfg.max_positions,
        }
    }

    pub fn n_params(&self) -> usize {
        match self {
            Encoder::Bert(m) => m.n_params(),
        }
    }
}
