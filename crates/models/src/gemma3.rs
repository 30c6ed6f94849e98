//! Gemma 3 (GGUF `gemma3`): the Llama block with Gemma's changes, as llama.cpp runs the same
//! file (src/models/gemma3.cpp there):
//!
//! * embeddings scaled by `sqrt(dim)`;
//! * per-head RMSNorm on q and k before RoPE (NeoX pairs), and RMSNorm after attention and
//!   after the FFN (`post_attention_norm`, `post_ffw_norm`) before each residual add;
//! * layers alternate sliding-window and global attention: with `attention.sliding_window`
//!   set, layer `l` is local unless `l % pattern == pattern - 1` (pattern
//!   `attention.sliding_window_pattern`, default 6), local layers see the last `window`
//!   positions and rotate with `rope.freq_base_swa` (default 10 000), global layers with
//!   `rope.freq_base`;
//! * attention scale `1/sqrt(query_pre_attn_scalar)`, which GGUF does not store: llama.cpp
//!   (after gemma_pytorch's config) uses `head_dim` except for the 27B (62 layers), where it
//!   is `dim / n_heads`;
//! * GeGLU with tanh-approximated GELU;
//! * logits soft-capped, `cap · tanh(logit / cap)`, when `final_logit_softcapping` is set.
//!
//! GGUF norm weights already hold Gemma's `1 + w` (llama.cpp's converter adds the 1), so
//! every norm here is a plain RMSNorm.
//!
//! Reads top-down: config extras → weights → load → forward.

use ferrolm_gguf::{GgufFile, Value};

use crate::adapter::Adapter;
use crate::linear::Linear;
use crate::ops::{
    add_in_place, apply_rope, attention, check_batch, inv_freq, qk_norm, rms_norm, rope_table,
    slots_of, store_kv, vector, Scratch,
};
use crate::quant::Isa;
use crate::simd::Glu;
use crate::Site;
use crate::{simd, Batch, Config, KvCache, ModelError};

// ---- config extras ----------------------------------------------------------------------

/// What Gemma 3 reads beyond [`Config`].
#[derive(Debug, Clone)]
pub struct Gemma3Params {
    /// Per layer: local (sliding-window) attention.
    pub local: Vec<bool>,
    /// RoPE base of the local layers (the global ones use `Config::rope_theta`).
    pub rope_local_base: f32,
    /// Multiplies q·k.
    pub attn_scale: f32,
    /// `final_logit_softcapping`, if the file sets one.
    pub final_softcap: Option<f32>,
}

impl Gemma3Params {
    pub fn from_gguf(g: &GgufFile, c: &Config) -> Result<Self, ModelError> {
        let p = "gemma3";
        let bad = |key: &str, reason: String| ModelError::Config {
            path: g.path.display().to_string(),
            key: format!("{p}.{key}"),
            reason,
        };
        let mut local = vec![false; c.n_layers];
        if c.sliding_window.is_some() {
            let key = format!("{p}.attention.sliding_window_pattern");
            match g.get(&key) {
                // One flag per layer.
                Some(Value::Array(flags)) => {
                    if flags.len() != c.n_layers {
                        return Err(bad(
                            "attention.sliding_window_pattern",
                            format!("{} flags for {} layers", flags.len(), c.n_layers),
                        ));
                    }
                    for (l, f) in local.iter_mut().zip(flags) {
                        *l = matches!(f, Value::Bool(true)) || f.as_u64().is_some_and(|v| v != 0);
                    }
                }
                other => {
                    let n = match other {
                        Some(v) => v.as_u64().ok_or_else(|| {
                            bad(
                                "attention.sliding_window_pattern",
                                "must be an integer or an array of flags".into(),
                            )
                        })? as usize,
                        None => 6,
                    };
                    // llama.cpp's `set_swa_pattern(n)`: every n-th layer is global, the
                    // last of each group; n = 0 makes all local.
                    for (l, f) in local.iter_mut().enumerate() {
                        *f = n == 0 || l % n < n - 1;
                    }
                }
            }
        }
        let query_pre_attn_scalar = if c.n_layers == 62 {
            (c.dim / c.n_heads) as f32
        } else {
            c.head_dim as f32
        };
        Ok(Gemma3Params {
            local,
            rope_local_base: g
                .get_f64(&format!("{p}.rope.freq_base_swa"))
                .unwrap_or(10_000.0) as f32,
            attn_scale: 1.0 / query_pre_attn_scalar.sqrt(),
            final_softcap: g
                .get_f64(&format!("{p}.final_logit_softcapping"))
                .ok()
                .map(|v| v as f32)
                .filter(|&v| v > 0.0),
        })
    }
}

// ---- weights ----------------------------------------------------------------------------

#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    /// Per-head RMSNorm weights (`head_dim`).
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    wo: Linear,
    post_attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
    post_ffn_norm: Vec<f32>,
}

/// Immutable weights after load.
#[derive(Debug)]
pub struct Gemma3 {
    pub cfg: Config,
    pub params: Gemma3Params,
    tok_embd: Linear,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// `None`: tied to the embedding (as in the released files).
    output: Option<Linear>,
    inv_freq_global: Vec<f32>,
    inv_freq_local: Vec<f32>,
    n_params: usize,
    pub isa: Isa,
}

impl Gemma3 {
    /// Load weights; `progress(done, total)` is called after each layer.
    pub fn load(g: &GgufFile, progress: &mut dyn FnMut(usize, usize)) -> Result<Self, ModelError> {
        let cfg = Config::from_gguf(g)?;
        let params = Gemma3Params::from_gguf(g, &cfg)?;
        let (dim, q_dim, kv_dim, ffn, hd) = (
            cfg.dim,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.ffn_dim,
            cfg.head_dim,
        );
        // Every type loads as a matrix whose rows are looked up directly (`Linear::row`).
        let tok_embd = Linear::load(g, "token_embd.weight", cfg.vocab_size, dim)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            layers.push(Layer {
                attn_norm: vector(g, &n("attn_norm.weight"), dim)?,
                wq: Linear::load(g, &n("attn_q.weight"), q_dim, dim)?,
                wk: Linear::load(g, &n("attn_k.weight"), kv_dim, dim)?,
                wv: Linear::load(g, &n("attn_v.weight"), kv_dim, dim)?,
                q_norm: vector(g, &n("attn_q_norm.weight"), hd)?,
                k_norm: vector(g, &n("attn_k_norm.weight"), hd)?,
                wo: Linear::load(g, &n("attn_output.weight"), dim, q_dim)?,
                post_attn_norm: vector(g, &n("post_attention_norm.weight"), dim)?,
                ffn_norm: vector(g, &n("ffn_norm.weight"), dim)?,
                w_gate: Linear::load(g, &n("ffn_gate.weight"), ffn, dim)?,
                w_up: Linear::load(g, &n("ffn_up.weight"), ffn, dim)?,
                w_down: Linear::load(g, &n("ffn_down.weight"), dim, ffn)?,
                post_ffn_norm: vector(g, &n("post_ffw_norm.weight"), dim)?,
            });
            progress(l + 1, cfg.n_layers);
        }
        let output = if g.has_tensor("output.weight") {
            Some(Linear::load(g, "output.weight", cfg.vocab_size, dim)?)
        } else {
            None
        };
        let isa = Isa::detect();
        let mut tok_embd = tok_embd;
        let mut output = output;
        tok_embd.prepare(isa);
        output.iter_mut().for_each(|o| o.prepare(isa));
        for l in &mut layers {
            for w in [
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.w_gate,
                &mut l.w_up,
                &mut l.w_down,
            ] {
                w.prepare(isa);
            }
        }
        let n_params = g.tensors.iter().map(|t| t.n_elements() as usize).sum();
        Ok(Gemma3 {
            output_norm: vector(g, "output_norm.weight", dim)?,
            inv_freq_global: inv_freq(cfg.rope_theta, cfg.rope_dim),
            inv_freq_local: inv_freq(params.rope_local_base, cfg.rope_dim),
            cfg,
            params,
            tok_embd,
            layers,
            output,
            n_params,
            isa,
        })
    }

    /// Parameter count (every tensor in the file; a tied head counted once).
    pub fn n_params(&self) -> usize {
        self.n_params
    }

    /// Bytes of weights in memory.
    pub fn weight_bytes(&self) -> usize {
        let mut b =
            self.tok_embd.memory_bytes() + self.output.as_ref().map_or(0, |o| o.memory_bytes());
        for l in &self.layers {
            for w in [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down] {
                b += w.memory_bytes();
            }
        }
        b
    }

    /// How each kind of matrix is held (for `ferrolm info`).
    pub fn kernel_summary(&self) -> String {
        let head = self.output.as_ref().unwrap_or(&self.tok_embd);
        let l0 = &self.layers[0];
        format!(
            "{} layers: q {}, ffn_down {} ; output head: {} ; isa: {}",
            self.layers.len(),
            l0.wq.kind(),
            l0.w_down.kind(),
            head.kind(),
            self.isa.name()
        )
    }

    /// LoRA adapters are trained and served for the Llama family only.
    pub fn check_adapter(&self, ad: &Adapter) -> Result<(), ModelError> {
        Err(ModelError::Unsupported(format!(
            "adapter `{}`: LoRA adapters are supported on `llama`-architecture models (SmolLM2, TinyLlama, Llama); this model is gemma3",
            ad.name
        )))
    }

    // ---- forward --------------------------------------------------------------------------

    /// Run the batch: write its K/V into `kv` at its slots, and return logits (`vocab` floats
    /// per entry of `batch.logits_for`, in that order) in `s.logits`.
    pub fn forward(
        &self,
        batch: &Batch,
        kv: &mut KvCache,
        s: &mut Scratch,
    ) -> Result<(), ModelError> {
        let c = &self.cfg;
        let n = batch.tokens.len();
        check_batch(c, batch, kv)?;
        for ad in batch.adapters.iter().flatten() {
            self.check_adapter(ad)?;
        }
        s.ensure(c, n, batch.logits_for.len());
        let (dim, q_dim, kv_dim, ffn) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
        let qkv_dim = q_dim + 2 * kv_dim;
        let p = &self.params;

        let embd_scale = (dim as f32).sqrt();
        for (i, &t) in batch.tokens.iter().enumerate() {
            let row = &mut s.x[i * dim..(i + 1) * dim];
            self.tok_embd.row(t as usize, row)?;
            row.iter_mut().for_each(|v| *v *= embd_scale);
        }
        let mut slots = std::mem::take(&mut s.slots);
        slots_of(batch, kv.block_size, &mut slots);
        // The RoPE table in `s.cos`/`s.sin` is for local (true) or global (false) layers.
        let mut table_local = None;

        for (l, layer) in self.layers.iter().enumerate() {
            let local = p.local[l];
            if table_local != Some(local) {
                let f = if local {
                    &self.inv_freq_local
                } else {
                    &self.inv_freq_global
                };
                rope_table(f, batch.positions, s);
                table_local = Some(local);
            }

            // attention: q, k, v → per-head norms on q and k → RoPE → cache → attend
            rms_norm(
                &s.x[..n * dim],
                &layer.attn_norm,
                c.rms_eps,
                &mut s.xb[..n * dim],
            );
            s.record(c, l, Site::AttnIn, n);
            for (w, off, rows) in [
                (&layer.wq, 0, q_dim),
                (&layer.wk, q_dim, kv_dim),
                (&layer.wv, q_dim + kv_dim, kv_dim),
            ] {
                w.forward(self.isa, &s.xb, n, &mut s.acts, &mut s.tmp)?;
                for i in 0..n {
                    s.qkv[i * qkv_dim + off..i * qkv_dim + off + rows]
                        .copy_from_slice(&s.tmp[i * rows..(i + 1) * rows]);
                }
            }
            qk_norm(c, n, &mut s.qkv, &layer.q_norm, &layer.k_norm);
            apply_rope(c, n, s);
            s.record(c, l, Site::Qkv, n);
            store_kv(c, l, &slots, s, kv);
            let window = if local { c.sliding_window } else { None };
            attention(c, l, batch, kv, s, p.attn_scale, window);
            s.record(c, l, Site::AttnOut, n);
            layer
                .wo
                .forward(self.isa, &s.att, n, &mut s.acts, &mut s.tmp)?;
            rms_norm(
                &s.tmp[..n * dim],
                &layer.post_attn_norm,
                c.rms_eps,
                &mut s.xb[..n * dim],
            );
            add_in_place(&mut s.x[..n * dim], &s.xb[..n * dim]);

            // feed-forward: GeGLU, then its post-norm
            rms_norm(
                &s.x[..n * dim],
                &layer.ffn_norm,
                c.rms_eps,
                &mut s.xb[..n * dim],
            );
            s.record(c, l, Site::FfnIn, n);
            layer
                .w_gate
                .forward(self.isa, &s.xb, n, &mut s.acts, &mut s.gu[..n * ffn])?;
            layer
                .w_up
                .forward(self.isa, &s.xb, n, &mut s.acts, &mut s.tmp)?;
            simd::glu(
                Glu::GeluTanh,
                &s.gu[..n * ffn],
                &s.tmp[..n * ffn],
                &mut s.h[..n * ffn],
            );
            s.record(c, l, Site::FfnDownIn, n);
            layer
                .w_down
                .forward(self.isa, &s.h, n, &mut s.acts, &mut s.tmp)?;
            rms_norm(
                &s.tmp[..n * dim],
                &layer.post_ffn_norm,
                c.rms_eps,
                &mut s.xb[..n * dim],
            );
            add_in_place(&mut s.x[..n * dim], &s.xb[..n * dim]);
        }
        s.slots = slots;

        // output head on the wanted rows only
        let m = batch.logits_for.len();
        if m == 0 {
            return Ok(());
        }
        for (j, &i) in batch.logits_for.iter().enumerate() {
            let (src, dst) = (
                &s.x[i * dim..(i + 1) * dim],
                &mut s.xb[j * dim..(j + 1) * dim],
            );
            rms_norm(src, &self.output_norm, c.rms_eps, dst);
        }
        let head = self.output.as_ref().unwrap_or(&self.tok_embd);
        head.forward(self.isa, &s.xb, m, &mut s.acts, &mut s.logits)?;
        if let Some(cap) = p.final_softcap {
            for v in &mut s.logits[..m * c.vocab_size] {
                *v = cap * (*v / cap).tanh();
            }
        }
        Ok(())
    }
}
