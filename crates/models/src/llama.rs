//! The Llama family: RMSNorm, RoPE, grouped-query attention over a paged KV cache, SwiGLU,
//! tied or untied output head. Covers GGUF architectures `llama` (SmolLM2, TinyLlama,
//! Llama 2/3, Mistral-style) and `qwen2` (q/k/v biases, NeoX RoPE).
//!
//! Reads top-down: config → weights → forward. The forward pass is pure math over a flat batch
//! (see [`crate::Batch`]); it runs on the calling rayon pool, and all scratch lives in
//! [`Scratch`], so decoding allocates nothing per token once the buffers have grown.

use ferrolm_gguf::GgufFile;
use rayon::prelude::*;

use crate::adapter::{Adapter, Proj};
use crate::linear::{dequantize, Linear};
use crate::quant::{Isa, QActs};
use crate::{simd, Batch, KvCache, ModelError};

// ---- config ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

/// The blueprint, read from GGUF metadata `{arch}.*`.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub arch: Arch,
    pub n_layers: usize,
    pub dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    /// Dimensions of each head that RoPE rotates (the rest pass through).
    pub rope_dim: usize,
    /// NeoX-style RoPE rotates (i, i + d/2); GGUF `llama` weights are permuted for the
    /// interleaved (2i, 2i+1) form.
    pub rope_neox: bool,
    pub rms_eps: f32,
}

impl LlamaConfig {
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        let path = g.path.display().to_string();
        let arch_name = g.architecture()?;
        let arch = match arch_name {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(ModelError::UnsupportedArchitecture {
                    path,
                    arch: other.to_owned(),
                })
            }
        };
        let p = arch_name;
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
        Ok(LlamaConfig {
            arch,
            n_layers,
            dim,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_dim,
            vocab_size,
            context_length: context_length.max(1),
            rope_theta: g
                .get_f64(&format!("{p}.rope.freq_base"))
                .unwrap_or(10_000.0) as f32,
            rope_dim,
            rope_neox: arch == Arch::Qwen2,
            rms_eps: g
                .get_f64(&format!("{p}.attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5) as f32,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

// ---- weights ----------------------------------------------------------------------------

#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    /// q‖k‖v stacked when their formats allow (one pass), else separate.
    qkv: Qkv,
    qkv_bias: Option<Vec<f32>>,
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
    pub cfg: LlamaConfig,
    tok_embd: Linear,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// `None`: tied to the embedding.
    output: Option<Linear>,
    inv_freq: Vec<f32>,
    pub isa: Isa,
}

fn vector(g: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let info = g.tensor(name)?;
    if info.n_elements() != len as u64 {
        return Err(ModelError::tensor(
            g,
            info,
            &format!("has {} elements, expected {len}", info.n_elements()),
        ));
    }
    dequantize(g, info)
}

impl Llama {
    /// Load weights; `progress(done, total)` is called after each layer.
    pub fn load(g: &GgufFile, progress: &mut dyn FnMut(usize, usize)) -> Result<Self, ModelError> {
        let cfg = LlamaConfig::from_gguf(g)?;
        let (dim, q_dim, kv_dim, ffn) = (cfg.dim, cfg.q_dim(), cfg.kv_dim(), cfg.ffn_dim);
        // Every type loads as a matrix whose rows are looked up directly (`Linear::row`).
        let tok_embd = Linear::load(g, "token_embd.weight", cfg.vocab_size, dim)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            let parts = vec![
                Linear::load(g, &n("attn_q.weight"), q_dim, dim)?,
                Linear::load(g, &n("attn_k.weight"), kv_dim, dim)?,
                Linear::load(g, &n("attn_v.weight"), kv_dim, dim)?,
            ];
            let qkv = match Linear::concat(parts) {
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
            };
            let qkv_bias = if g.has_tensor(&n("attn_q.bias")) {
                let mut b = vector(g, &n("attn_q.bias"), q_dim)?;
                b.extend(vector(g, &n("attn_k.bias"), kv_dim)?);
                b.extend(vector(g, &n("attn_v.bias"), kv_dim)?);
                Some(b)
            } else {
                None
            };
            let gu = vec![
                Linear::load(g, &n("ffn_gate.weight"), ffn, dim)?,
                Linear::load(g, &n("ffn_up.weight"), ffn, dim)?,
            ];
            let gate_up = match Linear::concat(gu) {
                Ok(f) => GateUp::Fused(f),
                Err(mut p) => {
                    let up = p.pop();
                    let gate = p.pop();
                    match (gate, up) {
                        (Some(a), Some(b)) => GateUp::Split(a, b),
                        _ => return Err(ModelError::Unsupported("gate/up split".into())),
                    }
                }
            };
            layers.push(Layer {
                attn_norm: vector(g, &n("attn_norm.weight"), dim)?,
                qkv,
                qkv_bias,
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
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                (1.0 / (cfg.rope_theta as f64).powf(2.0 * i as f64 / cfg.rope_dim as f64)) as f32
            })
            .collect();
        // Llama 3.1-style per-frequency scaling factors.
        if g.has_tensor("rope_freqs.weight") {
            let f = vector(g, "rope_freqs.weight", half)?;
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
        Ok(Llama {
            output_norm: vector(g, "output_norm.weight", dim)?,
            cfg,
            tok_embd,
            layers,
            output,
            inv_freq,
            isa,
        })
    }

    /// Parameter count (all weights, the tied head counted once).
    pub fn n_params(&self) -> usize {
        let c = &self.cfg;
        let per_layer = 2 * c.dim
            + c.dim * (c.q_dim() + 2 * c.kv_dim())
            + c.q_dim() * c.dim
            + 3 * c.dim * c.ffn_dim;
        let bias = if self.layers.first().is_some_and(|l| l.qkv_bias.is_some()) {
            c.q_dim() + 2 * c.kv_dim()
        } else {
            0
        };
        c.vocab_size * c.dim * (1 + usize::from(self.output.is_some()))
            + c.n_layers * (per_layer + bias)
            + c.dim
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
        self.check_batch(batch, kv)?;
        s.ensure(c, n, batch.logits_for.len());
        let (dim, q_dim, kv_dim, ffn) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
        let qkv_dim = q_dim + 2 * kv_dim;

        for (i, &t) in batch.tokens.iter().enumerate() {
            self.tok_embd
                .row(t as usize, &mut s.x[i * dim..(i + 1) * dim])?;
        }
        self.rope_table(batch.positions, s);
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
            self.apply_rope(n, s);
            for (i, &slot) in slots.iter().enumerate() {
                let row = &s.qkv[i * qkv_dim..(i + 1) * qkv_dim];
                let off = kv.offset(l, slot);
                simd::to_f16(&row[q_dim..q_dim + kv_dim], &mut kv.k[off..off + kv_dim]);
                simd::to_f16(&row[q_dim + kv_dim..], &mut kv.v[off..off + kv_dim]);
            }
            self.attention(l, batch, kv, s);
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
            match &layer.gate_up {
                GateUp::Fused(w) => {
                    w.forward(self.isa, &s.xb, n, &mut s.acts, &mut s.gu)?;
                    adapt(batch, l, Proj::Gate, (&s.xb, dim), (&mut s.gu, 2 * ffn), 0);
                    adapt(batch, l, Proj::Up, (&s.xb, dim), (&mut s.gu, 2 * ffn), ffn);
                    for i in 0..n {
                        let (g, u) = s.gu[i * 2 * ffn..(i + 1) * 2 * ffn].split_at(ffn);
                        simd::swiglu(g, u, &mut s.h[i * ffn..(i + 1) * ffn]);
                    }
                }
                GateUp::Split(wg, wu) => {
                    wg.forward(self.isa, &s.xb, n, &mut s.acts, &mut s.gu[..n * ffn])?;
                    wu.forward(self.isa, &s.xb, n, &mut s.acts, &mut s.tmp)?;
                    adapt(batch, l, Proj::Gate, (&s.xb, dim), (&mut s.gu, ffn), 0);
                    adapt(batch, l, Proj::Up, (&s.xb, dim), (&mut s.tmp, ffn), 0);
                    for i in 0..n {
                        simd::swiglu(
                            &s.gu[i * ffn..(i + 1) * ffn],
                            &s.tmp[i * ffn..(i + 1) * ffn],
                            &mut s.h[i * ffn..(i + 1) * ffn],
                        );
                    }
                }
            }
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

    fn check_batch(&self, b: &Batch, kv: &KvCache) -> Result<(), ModelError> {
        let n = b.tokens.len();
        if n == 0 || b.positions.len() != n {
            return Err(ModelError::Batch(format!(
                "{n} tokens but {} positions",
                b.positions.len()
            )));
        }
        if let Some(&t) = b
            .tokens
            .iter()
            .find(|&&t| t as usize >= self.cfg.vocab_size)
        {
            return Err(ModelError::Batch(format!(
                "token id {t} is outside the vocabulary ({})",
                self.cfg.vocab_size
            )));
        }
        if let Some(&i) = b.logits_for.iter().find(|&&i| i >= n) {
            return Err(ModelError::Batch(format!(
                "logits requested for index {i} of a {n}-token batch"
            )));
        }
        let mut covered = 0;
        for sq in b.seqs {
            if sq.start != covered || sq.len == 0 {
                return Err(ModelError::Batch(
                    "sequences must tile the batch in order".into(),
                ));
            }
            covered += sq.len;
            for i in sq.start..sq.start + sq.len {
                let p = b.positions[i] as usize;
                if i > sq.start && p != b.positions[i - 1] as usize + 1 {
                    return Err(ModelError::Batch(
                        "positions within a sequence must be consecutive".into(),
                    ));
                }
                if p / kv.block_size >= sq.block_table.len() {
                    return Err(ModelError::Batch(format!(
                        "position {p} has no KV block in its block table"
                    )));
                }
            }
            if let Some(&bad) = sq
                .block_table
                .iter()
                .find(|&&blk| blk as usize >= kv.num_blocks)
            {
                return Err(ModelError::Batch(format!(
                    "block id {bad} is outside the cache ({} blocks)",
                    kv.num_blocks
                )));
            }
        }
        if covered != n {
            return Err(ModelError::Batch(format!(
                "sequences cover {covered} of {n} tokens"
            )));
        }
        if !b.adapters.is_empty() && b.adapters.len() != b.seqs.len() {
            return Err(ModelError::Batch(format!(
                "{} adapters for {} sequences",
                b.adapters.len(),
                b.seqs.len()
            )));
        }
        for ad in b.adapters.iter().flatten() {
            self.check_adapter(ad)?;
        }
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

    /// cos/sin of `position · inv_freq` for each token of the batch.
    fn rope_table(&self, positions: &[u32], s: &mut Scratch) {
        let half = self.inv_freq.len();
        for (i, &p) in positions.iter().enumerate() {
            for (j, &f) in self.inv_freq.iter().enumerate() {
                let a = p as f32 * f;
                s.cos[i * half + j] = a.cos();
                s.sin[i * half + j] = a.sin();
            }
        }
    }

    fn apply_rope(&self, n: usize, s: &mut Scratch) {
        let c = &self.cfg;
        let (hd, half) = (c.head_dim, c.rope_dim / 2);
        let qkv_dim = c.q_dim() + 2 * c.kv_dim();
        for i in 0..n {
            let (cos, sin) = (
                &s.cos[i * half..(i + 1) * half],
                &s.sin[i * half..(i + 1) * half],
            );
            // q heads then k heads: both rotate the same way.
            let row = &mut s.qkv[i * qkv_dim..i * qkv_dim + c.q_dim() + c.kv_dim()];
            for head in row.chunks_exact_mut(hd) {
                for j in 0..half {
                    let (a, b) = if c.rope_neox {
                        (j, j + half)
                    } else {
                        (2 * j, 2 * j + 1)
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos[j] - x1 * sin[j];
                    head[b] = x0 * sin[j] + x1 * cos[j];
                }
            }
        }
    }

    /// Causal attention of every (token, head) over its sequence's cached positions
    /// `0..=position`: scores, softmax (vectorized exp), weighted sum of V.
    fn attention(&self, layer: usize, b: &Batch, kv: &KvCache, s: &mut Scratch) {
        let c = &self.cfg;
        let (hd, group) = (c.head_dim, c.n_heads / c.n_kv_heads);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let qkv_dim = q_dim + 2 * kv_dim;
        let scale = 1.0 / (hd as f32).sqrt();
        let bs = kv.block_size;
        let base = kv.offset(layer, 0);
        let (kc, vc) = (&kv.k[base..], &kv.v[base..]);
        let n = b.tokens.len();
        let qkv = &s.qkv;
        let seq_of = &mut s.seq_of;
        seq_of.clear();
        for (si, sq) in b.seqs.iter().enumerate() {
            seq_of.extend(std::iter::repeat_n(si as u32, sq.len));
        }
        let seq_of = &s.seq_of;
        // One task per (token, KV head): the `group` query heads that share it are contiguous
        // in q and in the output, and attend together.
        let nkv = c.n_kv_heads;
        s.att[..n * q_dim]
            .par_chunks_mut(group * hd)
            .enumerate()
            .for_each_init(
                || (Vec::new(), Vec::new()),
                |(scores, offs): &mut (Vec<f32>, Vec<usize>), (task, out)| {
                    let (i, kvh) = (task / nkv, task % nkv);
                    let q0 = i * qkv_dim + kvh * group * hd;
                    let q = &qkv[q0..q0 + group * hd];
                    let table = b.seqs[seq_of[i] as usize].block_table;
                    let ctx = b.positions[i] as usize + 1;
                    // Offsets of positions 0..ctx in the cache, walking the block table.
                    offs.clear();
                    for (blk, &id) in table.iter().enumerate().take(ctx.div_ceil(bs)) {
                        let base = id as usize * bs;
                        offs.extend(
                            (0..bs.min(ctx - blk * bs)).map(|o| (base + o) * kv_dim + kvh * hd),
                        );
                    }
                    simd::attend(q, hd, kc, vc, offs, scale, scores, out);
                },
            );
    }
}

fn slots_of(b: &Batch, bs: usize, out: &mut Vec<usize>) {
    out.clear();
    for sq in b.seqs {
        for i in sq.start..sq.start + sq.len {
            let p = b.positions[i] as usize;
            out.push(sq.block_table[p / bs] as usize * bs + p % bs);
        }
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ss + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * r * g;
        }
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// Mutable run state: activations for up to `cap` tokens. Grows on demand, never shrinks.
#[derive(Default)]
pub struct Scratch {
    cap: usize,
    logit_cap: usize,
    x: Vec<f32>,
    xb: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    gu: Vec<f32>,
    h: Vec<f32>,
    tmp: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    slots: Vec<usize>,
    seq_of: Vec<u32>,
    acts: QActs,
    /// Logits of the last forward: `logits_for.len() × vocab`.
    pub logits: Vec<f32>,
}

impl Scratch {
    pub fn new() -> Self {
        Self::default()
    }

    fn ensure(&mut self, c: &LlamaConfig, n: usize, n_logits: usize) {
        // The output head reads `n_logits` normed rows from `xb` (indices may repeat).
        let n = n.max(n_logits);
        if n > self.cap {
            let qkv = c.q_dim() + 2 * c.kv_dim();
            let widest = c.dim.max(qkv).max(2 * c.ffn_dim).max(c.q_dim());
            self.x.resize(n * c.dim, 0.0);
            self.xb.resize(n * c.dim, 0.0);
            self.qkv.resize(n * qkv, 0.0);
            self.att.resize(n * c.q_dim(), 0.0);
            self.gu.resize(n * 2 * c.ffn_dim, 0.0);
            self.h.resize(n * c.ffn_dim, 0.0);
            self.tmp.resize(n * widest, 0.0);
            self.cos.resize(n * c.rope_dim / 2, 0.0);
            self.sin.resize(n * c.rope_dim / 2, 0.0);
            self.cap = n;
        }
        if n_logits > self.logit_cap {
            self.logits.resize(n_logits * c.vocab_size, 0.0);
            self.logit_cap = n_logits;
        }
    }

    /// Logits of entry `j` of the last batch's `logits_for`.
    pub fn logits_row(&self, j: usize, vocab: usize) -> &[f32] {
        &self.logits[j * vocab..(j + 1) * vocab]
    }
}

/// Apply each sequence's adapter (if any) to `proj` of layer `l`: `x` and `out` with their
/// row strides; the update lands in `out`'s columns from `col`.
fn adapt(
    batch: &Batch,
    l: usize,
    proj: Proj,
    (x, xs): (&[f32], usize),
    (out, os): (&mut [f32], usize),
    col: usize,
) {
    if batch.adapters.iter().all(Option::is_none) {
        return;
    }
    // Rows in parallel: each is written by one thread, with its own sequence's adapter.
    let rows = batch.tokens.len();
    out[..rows * os]
        .par_chunks_mut(os)
        .enumerate()
        .with_min_len(4)
        .for_each(|(i, y)| {
            let seq = batch.seqs.partition_point(|sq| sq.start + sq.len <= i);
            if let Some(Some(ad)) = batch.adapters.get(seq) {
                ad.apply_row(l, proj, &x[i * xs..], &mut y[col..]);
            }
        });
}
