//! The Llama family: RMSNorm, RoPE, grouped-query attention over a paged KV cache, SwiGLU,
//! tied or untied output head. One block, read from the file's tensors as each GGUF
//! architecture names them:
//!
//! * `llama` (SmolLM2, TinyLlama, Llama 2/3, Mistral): q/k rows permuted by the converter for
//!   interleaved RoPE; Llama 3.1's per-frequency scaling from `rope_freqs.weight` (each inverse
//!   frequency divided by its factor, as llama.cpp applies it); Mistral's sliding window from
//!   `llama.attention.sliding_window` where the file has it (llama.cpp's converter leaves it
//!   out, so most Mistral files attend over the whole context, as llama.cpp does);
//! * `qwen2`: q/k/v biases, NeoX RoPE;
//! * `qwen3`: per-head RMSNorm on q and k before RoPE (`attn_q_norm`, `attn_k_norm`), NeoX
//!   RoPE, head size from `attention.key_length` (may differ from width / heads);
//! * `phi3`: q‖k‖v in one matrix (`attn_qkv`) and gate‖up in one (`ffn_up`, 2 × ffn rows, gate
//!   first), NeoX RoPE, `phi3.attention.sliding_window` on every layer (as transformers applies
//!   it; llama.cpp currently ignores it). LongRoPE files (the 128k Phi-3 variants, Phi-3.5 and
//!   Phi-4 mini: `rope_factors_short/long`) run within their original context
//!   (`rope.scaling.original_context_length`, 4096 for those models), where transformers uses
//!   the short factors (each inverse frequency divided by its factor) and multiplies cos and sin
//!   by `rope.scaling.attn_factor`. Loaded for a longer context
//!   ([`Llama::load_for_context`], the CLI's and server's `--ctx`), every position takes the
//!   long factors instead, as llama.cpp does when its context exceeds the original one and
//!   transformers when the sequence does; otherwise the model's context is capped at the
//!   original one.
//!
//! Reads top-down: weights → load → forward (the blueprint is [`crate::Config`]). The forward
//! pass is pure math over a flat batch (see [`crate::Batch`]); it runs on the calling rayon
//! pool, and all scratch lives in [`Scratch`], so decoding allocates nothing per token once the
//! buffers have grown.

use ferrolm_gguf::GgufFile;

use crate::adapter::{Adapter, Proj};
use crate::linear::Linear;
use crate::ops::{
    adapt, add_in_place, apply_rope, attention, check_batch, inv_freq, qk_norm, rms_norm,
    rope_table, slots_of, store_kv, vector, Scratch,
};
use crate::quant::Isa;
use crate::simd::Glu;
use crate::Site;
use crate::{simd, Arch, Batch, Config, KvCache, ModelError};

// ---- weights ----------------------------------------------------------------------------

#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    /// q‖k‖v stacked when their formats allow (one pass), else separate.
    qkv: Qkv,
    qkv_bias: Option<Vec<f32>>,
    /// Qwen3's per-head RMSNorm weights for q and k (`head_dim` each).
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    wo: Linear,
    ffn_norm: Vec<f32>,
    gate_up: GateUp,
    w_down: Linear,
}

#[derive(Debug)]
enum Qkv {
    Fused(Linear),
    Split(Linear, Linear, Linear),
}

#[derive(Debug)]
enum GateUp {
    Fused(Linear),
    Split(Linear, Linear),
}

/// Immutable weights after load.
#[derive(Debug)]
pub struct Llama {
    pub cfg: Config,
    tok_embd: Linear,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// `None`: tied to the embedding.
    output: Option<Linear>,
    inv_freq: Vec<f32>,
    /// Multiplies RoPE's cos and sin (LongRoPE's attention factor; 1 otherwise).
    rope_mscale: f32,
    n_params: usize,
    pub isa: Isa,
}

impl Llama {
    /// Load weights; `progress(done, total)` is called after each layer.
    pub fn load(g: &GgufFile, progress: &mut dyn FnMut(usize, usize)) -> Result<Self, ModelError> {
        Self::load_for_context(g, None, progress)
    }

    /// [`Self::load`] for a run whose context will be `context` tokens: a LongRoPE file run
    /// past its original context takes its long factors at every position, as llama.cpp does
    /// when its context exceeds the original one (and transformers when the sequence does).
    pub fn load_for_context(
        g: &GgufFile,
        context: Option<usize>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        let mut cfg = Config::from_gguf(g)?;
        let (dim, q_dim, kv_dim, ffn) = (cfg.dim, cfg.q_dim(), cfg.kv_dim(), cfg.ffn_dim);
        let phi3 = cfg.arch == Arch::Phi3;
        // Every type loads as a matrix whose rows are looked up directly (`Linear::row`).
        let tok_embd = Linear::load(g, "token_embd.weight", cfg.vocab_size, dim)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            let qkv = if phi3 {
                Qkv::Fused(Linear::load(
                    g,
                    &n("attn_qkv.weight"),
                    q_dim + 2 * kv_dim,
                    dim,
                )?)
            } else {
                let parts = vec![
                    Linear::load(g, &n("attn_q.weight"), q_dim, dim)?,
                    Linear::load(g, &n("attn_k.weight"), kv_dim, dim)?,
                    Linear::load(g, &n("attn_v.weight"), kv_dim, dim)?,
                ];
                match Linear::concat(parts, Isa::detect()) {
                    Ok(f) => Qkv::Fused(f),
                    Err(mut p) => {
                        let v = p.pop();
                        let k = p.pop();
                        let q = p.pop();
                        match (q, k, v) {
                            (Some(q), Some(k), Some(v)) => Qkv::Split(q, k, v),
                            _ => return Err(ModelError::Unsupported("qkv split".into())),
                        }
                    }
                }
            };
            let qkv_bias = if g.has_tensor(&n("attn_q.bias")) {
                let mut b = vector(g, &n("attn_q.bias"), q_dim)?;
                b.extend(vector(g, &n("attn_k.bias"), kv_dim)?);
                b.extend(vector(g, &n("attn_v.bias"), kv_dim)?);
                Some(b)
            } else {
                None
            };
            let qk_norm = if cfg.arch == Arch::Qwen3 {
                Some((
                    vector(g, &n("attn_q_norm.weight"), cfg.head_dim)?,
                    vector(g, &n("attn_k_norm.weight"), cfg.head_dim)?,
                ))
            } else {
                None
            };
            let gate_up = if phi3 {
                GateUp::Fused(Linear::load(g, &n("ffn_up.weight"), 2 * ffn, dim)?)
            } else {
                let gu = vec![
                    Linear::load(g, &n("ffn_gate.weight"), ffn, dim)?,
                    Linear::load(g, &n("ffn_up.weight"), ffn, dim)?,
                ];
                match Linear::concat(gu, Isa::detect()) {
                    Ok(f) => GateUp::Fused(f),
                    Err(mut p) => {
                        let up = p.pop();
                        let gate = p.pop();
                        match (gate, up) {
                            (Some(a), Some(b)) => GateUp::Split(a, b),
                            _ => return Err(ModelError::Unsupported("gate/up split".into())),
                        }
                    }
                }
            };
            layers.push(Layer {
                attn_norm: vector(g, &n("attn_norm.weight"), dim)?,
                qkv,
                qkv_bias,
                qk_norm,
                wo: Linear::load(g, &n("attn_output.weight"), dim, q_dim)?,
                ffn_norm: vector(g, &n("ffn_norm.weight"), dim)?,
                gate_up,
                w_down: Linear::load(g, &n("ffn_down.weight"), dim, ffn)?,
            });
            progress(l + 1, cfg.n_layers);
        }
        let output = if g.has_tensor("output.weight") {
            Some(Linear::load(g, "output.weight", cfg.vocab_size, dim)?)
        } else {
            None
        };
        let half = cfg.rope_dim / 2;
        let mut inv_freq = inv_freq(cfg.rope_theta, cfg.rope_dim);
        // Per-frequency scaling factors: Llama 3.1's, or LongRoPE's short ones (see the top).
        let mut rope_mscale = 1.0;
        let factors = if g.has_tensor("rope_factors_short.weight") {
            let p = g.architecture()?;
            let orig = g
                .get_u64(&format!("{p}.rope.scaling.original_context_length"))
                .map_err(|_| ModelError::Config {
                    path: g.path.display().to_string(),
                    key: format!("{p}.rope.scaling.original_context_length"),
                    reason: "a file with LongRoPE factors must say its original context".into(),
                })? as usize;
            // transformers' default when the config does not set it.
            let scale = cfg.context_length as f64 / orig.max(2) as f64;
            let default = if scale > 1.0 {
                (1.0 + scale.ln() / (orig.max(2) as f64).ln()).sqrt()
            } else {
                1.0
            };
            rope_mscale = g
                .get_f64(&format!("{p}.rope.scaling.attn_factor"))
                .unwrap_or(default) as f32;
            if context.is_some_and(|c| c > orig) {
                if !g.has_tensor("rope_factors_long.weight") {
                    return Err(ModelError::Config {
                        path: g.path.display().to_string(),
                        key: "rope_factors_long.weight".into(),
                        reason: format!(
                            "a context past the original {orig} tokens needs LongRoPE's long factors, which the file lacks; run with a context of at most {orig}"
                        ),
                    });
                }
                Some("rope_factors_long.weight")
            } else {
                cfg.context_length = cfg.context_length.min(orig.max(1));
                Some("rope_factors_short.weight")
            }
        } else if g.has_tensor("rope_freqs.weight") {
            Some("rope_freqs.weight")
        } else {
            None
        };
        if let Some(name) = factors {
            let f = vector(g, name, half)?;
            for (x, s) in inv_freq.iter_mut().zip(f) {
                *x /= s;
            }
        }
        let isa = Isa::detect();
        let mut tok_embd = tok_embd;
        let mut output = output;
        tok_embd.prepare(isa);
        output.iter_mut().for_each(|o| o.prepare(isa));
        for l in &mut layers {
            match &mut l.qkv {
                Qkv::Fused(w) => w.prepare(isa),
                Qkv::Split(q, k, v) => [q, k, v].into_iter().for_each(|w| w.prepare(isa)),
            }
            match &mut l.gate_up {
                GateUp::Fused(w) => w.prepare(isa),
                GateUp::Split(a, b) => [a, b].into_iter().for_each(|w| w.prepare(isa)),
            }
            l.wo.prepare(isa);
            l.w_down.prepare(isa);
        }
        let n_params = g
            .tensors
            .iter()
            .filter(|t| !t.name.starts_with("rope_"))
            .map(|t| t.n_elements() as usize)
            .sum();
        Ok(Llama {
            output_norm: vector(g, "output_norm.weight", dim)?,
            n_params,
            rope_mscale,
            cfg,
            tok_embd,
            layers,
            output,
            inv_freq,
            isa,
        })
    }

    /// Parameter count (every weight tensor in the file, a tied head counted once; RoPE
    /// frequency factors are not parameters).
    pub fn n_params(&self) -> usize {
        self.n_params
    }

    /// Bytes of weights in memory.
    pub fn weight_bytes(&self) -> usize {
        let mut b =
            self.tok_embd.memory_bytes() + self.output.as_ref().map_or(0, |o| o.memory_bytes());
        for l in &self.layers {
            b += match &l.qkv {
                Qkv::Fused(x) => x.memory_bytes(),
                Qkv::Split(a, b2, c) => a.memory_bytes() + b2.memory_bytes() + c.memory_bytes(),
            };
            b += match &l.gate_up {
                GateUp::Fused(x) => x.memory_bytes(),
                GateUp::Split(a, b2) => a.memory_bytes() + b2.memory_bytes(),
            };
            b += l.wo.memory_bytes() + l.w_down.memory_bytes();
        }
        b
    }

    /// How each kind of matrix is held (for `ferrolm info`).
    pub fn kernel_summary(&self) -> String {
        let head = self.output.as_ref().unwrap_or(&self.tok_embd);
        let l0 = &self.layers[0];
        format!(
            "{} layers: {} ; output head: {} ; isa: {}",
            self.layers.len(),
            l0.wo.kind(),
            head.kind(),
            self.isa.name()
        )
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

        for (i, &t) in batch.tokens.iter().enumerate() {
            self.tok_embd
                .row(t as usize, &mut s.x[i * dim..(i + 1) * dim])?;
        }
        rope_table(&self.inv_freq, batch.positions, s);
        if self.rope_mscale != 1.0 {
            let m = self.rope_mscale;
            let len = n * c.rope_dim / 2;
            s.cos[..len].iter_mut().for_each(|v| *v *= m);
            s.sin[..len].iter_mut().for_each(|v| *v *= m);
        }
        let mut slots = std::mem::take(&mut s.slots);
        slots_of(batch, kv.block_size, &mut slots);

        for (l, layer) in self.layers.iter().enumerate() {
            // attention
            rms_norm(
                &s.x[..n * dim],
                &layer.attn_norm,
                c.rms_eps,
                &mut s.xb[..n * dim],
            );
            s.record(c, l, Site::AttnIn, n);
            match &layer.qkv {
                Qkv::Fused(w) => w.forward(self.isa, &s.xb, n, &mut s.acts, &mut s.qkv)?,
                Qkv::Split(wq, wk, wv) => {
                    for (w, off, rows) in [
                        (wq, 0, q_dim),
                        (wk, q_dim, kv_dim),
                        (wv, q_dim + kv_dim, kv_dim),
                    ] {
                        w.forward(self.isa, &s.xb, n, &mut s.acts, &mut s.tmp)?;
                        for i in 0..n {
                            s.qkv[i * qkv_dim + off..i * qkv_dim + off + rows]
                                .copy_from_slice(&s.tmp[i * rows..(i + 1) * rows]);
                        }
                    }
                }
            }
            for (proj, col) in [(Proj::Q, 0), (Proj::K, q_dim), (Proj::V, q_dim + kv_dim)] {
                adapt(batch, l, proj, (&s.xb, dim), (&mut s.qkv, qkv_dim), col);
            }
            if let Some(b) = &layer.qkv_bias {
                for row in s.qkv[..n * qkv_dim].chunks_exact_mut(qkv_dim) {
                    row.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                }
            }
            if let Some((qn, kn)) = &layer.qk_norm {
                qk_norm(c, n, &mut s.qkv, qn, kn);
            }
            apply_rope(c, n, s);
            s.record(c, l, Site::Qkv, n);
            store_kv(c, l, &slots, s, kv);
            let scale = 1.0 / (c.head_dim as f32).sqrt();
            attention(c, l, batch, kv, s, scale, c.sliding_window);
            s.record(c, l, Site::AttnOut, n);
            layer
                .wo
                .forward(self.isa, &s.att, n, &mut s.acts, &mut s.tmp)?;
            adapt(batch, l, Proj::O, (&s.att, q_dim), (&mut s.tmp, dim), 0);
            add_in_place(&mut s.x[..n * dim], &s.tmp[..n * dim]);

            // feed-forward
            rms_norm(
                &s.x[..n * dim],
                &layer.ffn_norm,
                c.rms_eps,
                &mut s.xb[..n * dim],
            );
            s.record(c, l, Site::FfnIn, n);
            match &layer.gate_up {
                GateUp::Fused(w) => {
                    w.forward(self.isa, &s.xb, n, &mut s.acts, &mut s.gu)?;
                    adapt(batch, l, Proj::Gate, (&s.xb, dim), (&mut s.gu, 2 * ffn), 0);
                    adapt(batch, l, Proj::Up, (&s.xb, dim), (&mut s.gu, 2 * ffn), ffn);
                    for i in 0..n {
                        let (g, u) = s.gu[i * 2 * ffn..(i + 1) * 2 * ffn].split_at(ffn);
                        simd::glu(Glu::Silu, g, u, &mut s.h[i * ffn..(i + 1) * ffn]);
                    }
                }
                GateUp::Split(wg, wu) => {
                    wg.forward(self.isa, &s.xb, n, &mut s.acts, &mut s.gu[..n * ffn])?;
                    wu.forward(self.isa, &s.xb, n, &mut s.acts, &mut s.tmp)?;
                    adapt(batch, l, Proj::Gate, (&s.xb, dim), (&mut s.gu, ffn), 0);
                    adapt(batch, l, Proj::Up, (&s.xb, dim), (&mut s.tmp, ffn), 0);
                    for i in 0..n {
                        simd::glu(
                            Glu::Silu,
                            &s.gu[i * ffn..(i + 1) * ffn],
                            &s.tmp[i * ffn..(i + 1) * ffn],
                            &mut s.h[i * ffn..(i + 1) * ffn],
                        );
                    }
                }
            }
            s.record(c, l, Site::FfnDownIn, n);
            layer
                .w_down
                .forward(self.isa, &s.h, n, &mut s.acts, &mut s.tmp)?;
            adapt(batch, l, Proj::Down, (&s.h, ffn), (&mut s.tmp, dim), 0);
            add_in_place(&mut s.x[..n * dim], &s.tmp[..n * dim]);
        }
        s.slots = slots;

        // output head on the wanted rows only
        let m = batch.logits_for.len();
        if m == 0 {
            return Ok(()); // a prefill chunk that wants no logits skips the head
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
        Ok(())
    }

    /// An adapter fits this model: every adapted projection has this model's shape.
    pub fn check_adapter(&self, ad: &Adapter) -> Result<(), ModelError> {
        let c = &self.cfg;
        let (d, q, kv, f) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
        let want = [
            (Proj::Q, (d, q)),
            (Proj::K, (d, kv)),
            (Proj::V, (d, kv)),
            (Proj::O, (q, d)),
            (Proj::Gate, (d, f)),
            (Proj::Up, (d, f)),
            (Proj::Down, (f, d)),
        ];
        for l in 0..c.n_layers {
            for (proj, shape) in want {
                if let Some(got) = ad.shape(l, proj) {
                    if got != shape {
                        return Err(ModelError::Unsupported(format!(
                            "adapter `{}`: layer {l} {proj:?} is {got:?} (in, out), the model's is {shape:?}",
                            ad.name
                        )));
                    }
                }
            }
        }
        if let Some(w) = ad.score.as_ref().filter(|w| w.len() != d) {
            return Err(ModelError::Unsupported(format!(
                "adapter `{}`: its score head has {} weights, the model's width is {d}",
                ad.name,
                w.len()
            )));
        }
        if ad.n_layers() != c.n_layers {
            return Err(ModelError::Unsupported(format!(
                "adapter `{}` has {} layers, the model {}",
                ad.name,
                ad.n_layers(),
                c.n_layers
            )));
        }
        Ok(())
    }
}
