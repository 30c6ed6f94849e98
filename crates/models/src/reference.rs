//! The slow, obviously-correct forward pass of the Llama family, beside the fast one in
//! [`crate::llama`] (STYLE principle 14), in the manner of llama2.c: every weight dequantized to
//! f32 once, then plain loops.
//!
//! Contract:
//! * [`Reference::load`] reads the same GGUF files as [`crate::Llama::load`] (`llama`, `qwen2`)
//!   and dequantizes every tensor with candle's ggml decoder ([`crate::linear::dequantize`]),
//!   which is independent of our repacked 4/8-bit kernels in [`crate::quant`] (the fast path
//!   uses it only for norms, biases and f32/f16 weights; `tests/kquant.rs` holds the repack to
//!   it). Beyond that it shares only the
//!   blueprint, [`Config::from_gguf`], with the fast path.
//! * [`Reference::forward_full`] runs one sequence at positions `0..tokens.len()` from scratch —
//!   no KV cache, full causal attention with an explicit softmax — and returns the logits of
//!   every position. Values are f32 as in the model; sums (dot products, norms, softmax) are
//!   accumulated in f64, so the reference's own rounding is far below any tolerance it is used
//!   with.
//! * Covered: grouped-query attention, interleaved (`llama`) or NeoX (`qwen2`) RoPE over the
//!   first `rope_dim` dimensions of each head, `rope_freqs.weight` frequency factors, q/k/v
//!   biases, tied or untied output head.
//!
//! What the fast path does differently, and so what a comparison measures: besides batching
//! and a paged cache, it rounds the activations entering a quantized matrix product to 8 bits
//! (our kernels, for every quantized type: per 32 values, see [`crate::quant`]).
//! [`Reference::forward_full_with`] with [`Activations::LikeKernels`] applies
//! the same rounding before the same products, so the exact reference bounds the
//! approximation and the rounded one shows that the approximation is all there is: what is
//! left is summation order — which, for a value within an ulp of a rounding boundary, decides
//! which way it rounds (`tests/tiny.rs` measures what such a tie costs).
//!
//! Cost is O(T² + T·params) with no threads — meant for tiny test models and a handful of
//! tokens of a real one.

use ferrolm_gguf::{GgmlType, GgufFile};

use crate::linear::dequantize;
use crate::{Config, ModelError};

/// What happens to the activations entering a matrix product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// Used as they are (the model's own arithmetic).
    Exact,
    /// Rounded as the fast path's kernel for each weight type rounds them.
    LikeKernels,
}

/// How the fast path rounds a product's input, by the weight's GGUF type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rounding {
    /// f32 / f16 / bf16 weights (candle GEMM).
    None,
    /// Our kernels (`quant::QActs`), for every quantized type: per 32 values,
    /// `d = amax / 127`, `q = round(x / d)`.
    Q8Blocks32,
}

impl Rounding {
    fn of(t: GgmlType) -> Rounding {
        match t {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => Rounding::None,
            _ => Rounding::Q8Blocks32,
        }
    }
}

/// A weight matrix `[rows, cols]`, f32 row-major, with the rounding its fast form applies.
struct Matrix {
    w: Vec<f32>,
    rounding: Rounding,
}

/// One transformer block's weights.
struct Block {
    attn_norm: Vec<f32>,
    wq: Matrix, // (q_dim, dim)
    wk: Matrix, // (kv_dim, dim)
    wv: Matrix, // (kv_dim, dim)
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    wo: Matrix, // (dim, q_dim)
    ffn_norm: Vec<f32>,
    w_gate: Matrix, // (ffn, dim)
    w_up: Matrix,   // (ffn, dim)
    w_down: Matrix, // (dim, ffn)
}

/// All weights of the model as f32.
pub struct Reference {
    pub cfg: Config,
    /// (vocab, dim); rows are looked up exactly, the rounding applies when it is the head.
    tok_embd: Matrix,
    blocks: Vec<Block>,
    output_norm: Vec<f32>,
    /// `None`: the head is tied to `tok_embd`.
    output: Option<Matrix>, // (vocab, dim)
    /// RoPE frequency of pair `i`: `theta^(-2i / rope_dim)` (divided by `rope_freqs[i]`).
    inv_freq: Vec<f64>,
}

/// Tensor `name` as f32, checking that it has exactly the ggml dims `dims`.
fn load(g: &GgufFile, name: &str, dims: &[usize]) -> Result<Vec<f32>, ModelError> {
    let info = g.tensor(name)?;
    let got: Vec<usize> = info.dims.iter().map(|&d| d as usize).collect();
    if got != dims {
        return Err(ModelError::tensor(
            g,
            info,
            &format!("shape {got:?} (ggml order), expected {dims:?}"),
        ));
    }
    dequantize(g, info)
}

/// `[rows, cols]` matrix, stored with ggml dims `[cols, rows]`.
fn matrix(g: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<Matrix, ModelError> {
    Ok(Matrix {
        w: load(g, name, &[cols, rows])?,
        rounding: Rounding::of(g.tensor(name)?.ggml_type),
    })
}

fn optional(g: &GgufFile, name: &str, len: usize) -> Result<Option<Vec<f32>>, ModelError> {
    if g.has_tensor(name) {
        load(g, name, &[len]).map(Some)
    } else {
        Ok(None)
    }
}

impl Reference {
    pub fn load(g: &GgufFile) -> Result<Self, ModelError> {
        let cfg = Config::from_gguf(g)?;
        let (dim, q_dim, kv_dim, ffn) = (cfg.dim, cfg.q_dim(), cfg.kv_dim(), cfg.ffn_dim);
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            blocks.push(Block {
                attn_norm: load(g, &n("attn_norm.weight"), &[dim])?,
                wq: matrix(g, &n("attn_q.weight"), q_dim, dim)?,
                wk: matrix(g, &n("attn_k.weight"), kv_dim, dim)?,
                wv: matrix(g, &n("attn_v.weight"), kv_dim, dim)?,
                bq: optional(g, &n("attn_q.bias"), q_dim)?,
                bk: optional(g, &n("attn_k.bias"), kv_dim)?,
                bv: optional(g, &n("attn_v.bias"), kv_dim)?,
                wo: matrix(g, &n("attn_output.weight"), dim, q_dim)?,
                ffn_norm: load(g, &n("ffn_norm.weight"), &[dim])?,
                w_gate: matrix(g, &n("ffn_gate.weight"), ffn, dim)?,
                w_up: matrix(g, &n("ffn_up.weight"), ffn, dim)?,
                w_down: matrix(g, &n("ffn_down.weight"), dim, ffn)?,
            });
        }
        let output = if g.has_tensor("output.weight") {
            Some(matrix(g, "output.weight", cfg.vocab_size, dim)?)
        } else {
            None
        };
        let half = cfg.rope_dim / 2;
        let factors = optional(g, "rope_freqs.weight", half)?;
        let inv_freq = (0..half)
            .map(|i| {
                let f = (cfg.rope_theta as f64).powf(-2.0 * i as f64 / cfg.rope_dim as f64);
                f / factors.as_ref().map_or(1.0, |s| s[i] as f64)
            })
            .collect();
        let tok_embd = matrix(g, "token_embd.weight", cfg.vocab_size, dim)?;
        Ok(Reference {
            tok_embd,
            output_norm: load(g, "output_norm.weight", &[dim])?,
            output,
            inv_freq,
            blocks,
            cfg,
        })
    }

    /// Logits (`vocab` floats) of every position of `tokens`, the sequence starting at
    /// position 0, computed exactly.
    pub fn forward_full(&self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.forward_full_with(tokens, Activations::Exact)
    }

    /// [`Self::forward_full`], with the inputs of matrix products rounded as `acts` says.
    pub fn forward_full_with(
        &self,
        tokens: &[u32],
        acts: Activations,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let c = &self.cfg;
        // out = W · x, with x rounded first if asked to
        let mul = |out: &mut [f32], m: &Matrix, x: &[f32]| match acts {
            Activations::Exact => matvec(out, &m.w, x),
            Activations::LikeKernels => matvec(out, &m.w, &round(x, m.rounding)),
        };
        let (dim, hd, ffn) = (c.dim, c.head_dim, c.ffn_dim);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let group = c.n_heads / c.n_kv_heads; // query heads per KV head
        let t_len = tokens.len();

        // token embeddings: x[t] = tok_embd[tokens[t]]
        let mut x: Vec<Vec<f32>> = Vec::with_capacity(t_len);
        for &tok in tokens {
            let t = tok as usize;
            if t >= c.vocab_size {
                return Err(ModelError::Batch(format!(
                    "token id {t} is outside the vocabulary ({})",
                    c.vocab_size
                )));
            }
            x.push(self.tok_embd.w[t * dim..(t + 1) * dim].to_vec());
        }

        for b in &self.blocks {
            // ---- attention: q, k, v of every position, then causal attention per head
            let mut q = vec![vec![0f32; q_dim]; t_len];
            let mut k = vec![vec![0f32; kv_dim]; t_len];
            let mut v = vec![vec![0f32; kv_dim]; t_len];
            for t in 0..t_len {
                let xb = rms_norm(&x[t], &b.attn_norm, c.rms_eps);
                mul(&mut q[t], &b.wq, &xb);
                mul(&mut k[t], &b.wk, &xb);
                mul(&mut v[t], &b.wv, &xb);
                add_bias(&mut q[t], b.bq.as_deref());
                add_bias(&mut k[t], b.bk.as_deref());
                add_bias(&mut v[t], b.bv.as_deref());
                for head in q[t].chunks_exact_mut(hd) {
                    self.rope(head, t);
                }
                for head in k[t].chunks_exact_mut(hd) {
                    self.rope(head, t);
                }
            }
            let scale = 1.0 / (hd as f64).sqrt();
            for t in 0..t_len {
                let mut att = vec![0f32; q_dim]; // (n_heads, head_dim)
                for h in 0..c.n_heads {
                    let kvh = h / group;
                    let qh = &q[t][h * hd..(h + 1) * hd];
                    // scores over positions 0..=t (causal), then softmax
                    let mut scores: Vec<f64> = (0..=t)
                        .map(|s| dot(qh, &k[s][kvh * hd..(kvh + 1) * hd]) * scale)
                        .collect();
                    softmax(&mut scores);
                    for (i, o) in att[h * hd..(h + 1) * hd].iter_mut().enumerate() {
                        let sum: f64 = (0..=t).map(|s| scores[s] * v[s][kvh * hd + i] as f64).sum();
                        *o = sum as f32;
                    }
                }
                let mut out = vec![0f32; dim];
                mul(&mut out, &b.wo, &att);
                add(&mut x[t], &out);
            }

            // ---- feed-forward: x += W_down · (silu(W_gate · xb) ⊙ (W_up · xb))
            for xt in x.iter_mut() {
                let xb = rms_norm(xt, &b.ffn_norm, c.rms_eps);
                let mut gate = vec![0f32; ffn];
                let mut up = vec![0f32; ffn];
                mul(&mut gate, &b.w_gate, &xb);
                mul(&mut up, &b.w_up, &xb);
                let hidden: Vec<f32> = gate
                    .iter()
                    .zip(&up)
                    .map(|(&g, &u)| {
                        let g = g as f64;
                        (g / (1.0 + (-g).exp()) * u as f64) as f32
                    })
                    .collect();
                let mut out = vec![0f32; dim];
                mul(&mut out, &b.w_down, &hidden);
                add(xt, &out);
            }
        }

        // ---- output head
        let head = self.output.as_ref().unwrap_or(&self.tok_embd);
        Ok(x.iter()
            .map(|xt| {
                let xb = rms_norm(xt, &self.output_norm, c.rms_eps);
                let mut logits = vec![0f32; c.vocab_size];
                mul(&mut logits, head, &xb);
                logits
            })
            .collect())
    }

    /// Rotate the first `rope_dim` dimensions of one head at position `pos`: pair `i` is
    /// `(2i, 2i+1)` (interleaved, GGUF `llama`) or `(i, i + rope_dim/2)` (NeoX, `qwen2`), turned
    /// by the angle `pos · inv_freq[i]`.
    fn rope(&self, head: &mut [f32], pos: usize) {
        let half = self.cfg.rope_dim / 2;
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let (a, b) = if self.cfg.rope_neox {
                (i, i + half)
            } else {
                (2 * i, 2 * i + 1)
            };
            let angle = pos as f64 * f;
            let (sin, cos) = angle.sin_cos();
            let (x0, x1) = (head[a] as f64, head[b] as f64);
            head[a] = (x0 * cos - x1 * sin) as f32;
            head[b] = (x0 * sin + x1 * cos) as f32;
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// `out[r] = Σ_c w[r, c] · x[c]` for a row-major `w` of `out.len()` rows.
fn matvec(out: &mut [f32], w: &[f32], x: &[f32]) {
    let cols = x.len();
    for (r, o) in out.iter_mut().enumerate() {
        *o = dot(&w[r * cols..(r + 1) * cols], x) as f32;
    }
}

/// `x / sqrt(mean(x²) + eps) · w`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mean_sq = dot(x, x) / x.len() as f64;
    let r = 1.0 / (mean_sq + eps as f64).sqrt();
    x.iter()
        .zip(w)
        .map(|(&v, &g)| (v as f64 * r * g as f64) as f32)
        .collect()
}

/// `x` as the fast path's kernels see it after quantizing it to 8 bits (see [`Rounding`]).
fn round(x: &[f32], r: Rounding) -> Vec<f32> {
    let mut out = x.to_vec();
    match r {
        Rounding::None => {}
        Rounding::Q8Blocks32 => {
            for blk in out.chunks_mut(32) {
                let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                for v in blk.iter_mut() {
                    *v = (*v * id).round() * d;
                }
            }
        }
    }
    out
}

fn softmax(x: &mut [f64]) {
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        add(x, b);
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}
