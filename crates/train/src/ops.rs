//! The training kernels: each op's forward and backward over row-major f32 slices, written
//! for the shapes of small models (rows = batch × context tokens, widths of 64–1024).
//!
//! Contract: backward functions *accumulate* weight gradients (`+=`, so gradient accumulation
//! over micro-batches is free) and *overwrite* or *accumulate* input gradients as each says.
//! Matrix products go to the `gemm` crate (AVX-512 micro-kernels, rayon-parallel); the rest is
//! plain loops the compiler vectorises, parallel over batch rows where the work is large
//! enough to pay for a rayon split. Every op here is held to finite differences and to a
//! PyTorch reference by `tests/grad.rs`.

use rayon::prelude::*;

// ---- matrix products ----------------------------------------------------------------------

pub use ferrolm_models::mat::Mat;
use ferrolm_models::mat::{gemm, Par};

/// `dst (m×n, row stride dst_rs) = [dst +] scale · lhs · rhs` on the thread pool.
pub fn gemm_into(
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Mat,
    rhs: Mat,
    mnk: (usize, usize, usize),
    acc: bool,
    scale: f32,
) {
    gemm(dst, dst_rs, lhs, rhs, mnk, acc, scale, Par::Pool);
}

/// `out (m×n) [+]= a (m×k) · wᵀ` with `w` (n×k): a linear layer's forward.
pub fn matmul_nt(out: &mut [f32], a: &[f32], w: &[f32], m: usize, n: usize, k: usize, acc: bool) {
    let (a, w) = (Mat::rows(a, k), Mat::rows(w, k).t());
    gemm(out, n, a, w, (m, n, k), acc, 1.0, Par::Pool);
}

/// `out (m×n) [+]= a (m×k) · b (k×n)`: a linear layer's input gradient `dX = dY · W`.
pub fn matmul_nn(out: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize, acc: bool) {
    let (a, b) = (Mat::rows(a, k), Mat::rows(b, n));
    gemm(out, n, a, b, (m, n, k), acc, 1.0, Par::Pool);
}

/// `out (m×n) += aᵀ · b` with `a` (k×m), `b` (k×n): a linear layer's weight gradient
/// `dW += dYᵀ · X` (m = out features, n = in features, k = rows).
pub fn matmul_tn_acc(out: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize) {
    let (a, b) = (Mat::rows(a, m).t(), Mat::rows(b, n));
    gemm(out, n, a, b, (m, n, k), true, 1.0, Par::Pool);
}

/// Rows per rayon task for element-wise ops: below ~16K elements a split costs more than it
/// saves.
fn rows_per_task(width: usize) -> usize {
    (16_384 / width.max(1)).max(1)
}

// ---- RMSNorm ------------------------------------------------------------------------------

/// `y = x · r · w` with `r = 1 / sqrt(mean(x²) + eps)` per row; saves `r` for backward.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], rstd: &mut [f32]) {
    let c = w.len();
    let chunk = rows_per_task(c);
    y.par_chunks_mut(c * chunk)
        .zip(rstd.par_chunks_mut(chunk))
        .zip(x.par_chunks(c * chunk))
        .for_each(|((y, rstd), x)| {
            for ((y, r), x) in y.chunks_exact_mut(c).zip(rstd).zip(x.chunks_exact(c)) {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / c as f32;
                *r = 1.0 / (ms + eps).sqrt();
                for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * *r * w;
                }
            }
        });
}

/// Backward of [`rms_norm`]: `dx += ∂L/∂x`, `dw += ∂L/∂w`.
/// `dx = r·(dy⊙w) − x · r³/C · Σ (dy⊙w⊙x)`.
pub fn rms_norm_backward(
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
) {
    let c = w.len();
    for ((x, &r), dy) in x.chunks_exact(c).zip(rstd).zip(dy.chunks_exact(c)) {
        for ((dw, x), dy) in dw.iter_mut().zip(x).zip(dy) {
            *dw += dy * x * r;
        }
    }
    let chunk = rows_per_task(c);
    dx.par_chunks_mut(c * chunk)
        .zip(x.par_chunks(c * chunk))
        .zip(rstd.par_chunks(chunk))
        .zip(dy.par_chunks(c * chunk))
        .for_each(|(((dx, x), rstd), dy)| {
            for (((dx, x), &r), dy) in dx
                .chunks_exact_mut(c)
                .zip(x.chunks_exact(c))
                .zip(rstd)
                .zip(dy.chunks_exact(c))
            {
                let dot: f32 = dy.iter().zip(w).zip(x).map(|((d, w), x)| d * w * x).sum();
                let k = r * r * r * dot / c as f32;
                for (((dx, x), dy), w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                    *dx += r * dy * w - k * x;
                }
            }
        });
}

// ---- RoPE ---------------------------------------------------------------------------------

/// cos/sin of `pos · θ^(−2i/hd)` for `pos < ctx`, `i < hd/2`: (ctx, hd/2) each.
pub fn rope_table(ctx: usize, hd: usize, theta: f32) -> (Vec<f32>, Vec<f32>) {
    let half = hd / 2;
    let mut cos = Vec::with_capacity(ctx * half);
    let mut sin = Vec::with_capacity(ctx * half);
    for pos in 0..ctx {
        for i in 0..half {
            let f = 1.0 / (theta as f64).powf(2.0 * i as f64 / hd as f64);
            let a = pos as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

/// Rotate the interleaved pairs `(x[2i], x[2i+1])` of every head in the first `width`
/// columns of each row (q ‖ k of a qkv row) by its position's angle (GGUF / llama.cpp "norm"
/// RoPE). `sign = 1` rotates forward; `-1` applies the inverse rotation, which is RoPE's
/// backward (the rotation is orthogonal).
#[allow(clippy::too_many_arguments)]
pub fn rope(
    rows: &mut [f32],
    stride: usize,
    width: usize,
    hd: usize,
    ctx: usize,
    cos: &[f32],
    sin: &[f32],
    sign: f32,
) {
    let half = hd / 2;
    rows.par_chunks_mut(stride * ctx).for_each(|seq| {
        for (pos, row) in seq.chunks_exact_mut(stride).enumerate() {
            let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
            for head in row[..width].chunks_exact_mut(hd) {
                for ((p, &c), &s) in head.chunks_exact_mut(2).zip(c).zip(s) {
                    let s = sign * s;
                    let (a, b) = (p[0], p[1]);
                    p[0] = a * c - b * s;
                    p[1] = a * s + b * c;
                }
            }
        }
    });
}

// ---- causal attention -----------------------------------------------------------------------

/// Shapes of one attention call: `b` sequences of `t` tokens; each qkv row holds `n_heads`
/// query heads then `n_kv` key heads then `n_kv` value heads, `hd` wide each.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub t: usize,
    pub n_heads: usize,
    pub n_kv: usize,
    pub hd: usize,
}

impl AttnShape {
    fn q_dim(&self) -> usize {
        self.n_heads * self.hd
    }
    fn qkv_dim(&self) -> usize {
        (self.n_heads + 2 * self.n_kv) * self.hd
    }
    /// Offsets of head `h`'s query, key and value in a qkv row (GQA: query heads share
    /// key/value head `h / (n_heads / n_kv)`).
    fn offsets(&self, h: usize) -> (usize, usize, usize) {
        let kvh = h / (self.n_heads / self.n_kv);
        let q = h * self.hd;
        let k = self.q_dim() + kvh * self.hd;
        (q, k, k + self.n_kv * self.hd)
    }
}

/// Causal softmax attention, scale `1/sqrt(hd)`. `qkv`: (b·t, qkv_dim) with RoPE applied;
/// `probs`: (b, n_heads, t, t) (zero above the diagonal; see [`attention_probs`]); `out`: (b·t,
/// q_dim). Parallel over sequences; each head is two small matrix products computed in full
/// (the masked half costs less than a scalar causal loop saves).
pub fn attention(s: AttnShape, qkv: &[f32], probs: &mut [f32], out: &mut [f32]) {
    attention_probs(s, qkv, probs);
    let (t, hd, qd, qkvd) = (s.t, s.hd, s.q_dim(), s.qkv_dim());
    let serial = Par::Serial;
    out.par_chunks_mut(t * qd)
        .zip(probs.par_chunks(s.n_heads * t * t))
        .zip(qkv.par_chunks(t * qkvd))
        .for_each(|((out, probs), qkv)| {
            for (h, p) in probs.chunks_exact(t * t).enumerate() {
                let (qo, _, vo) = s.offsets(h);
                // (t, hd) = P (t, t) · V (t, hd)
                let v = Mat::rows(&qkv[vo..], qkvd);
                gemm(
                    &mut out[qo..],
                    qd,
                    Mat::rows(p, t),
                    v,
                    (t, hd, t),
                    false,
                    1.0,
                    serial,
                );
            }
        });
}

/// The attention probabilities of [`attention`] alone, into `probs` (b, n_heads, t, t): the
/// backward pass recomputes them layer by layer instead of keeping every layer's.
pub fn attention_probs(s: AttnShape, qkv: &[f32], probs: &mut [f32]) {
    let (t, hd, qkvd) = (s.t, s.hd, s.qkv_dim());
    let scale = 1.0 / (hd as f32).sqrt();
    let serial = Par::Serial;
    probs
        .par_chunks_mut(s.n_heads * t * t)
        .zip(qkv.par_chunks(t * qkvd))
        .for_each(|(probs, qkv)| {
            for (h, p) in probs.chunks_exact_mut(t * t).enumerate() {
                let (qo, ko, _) = s.offsets(h);
                // (t, t) = scale · Q (t, hd) · Kᵀ (hd, t)
                let (q, k) = (Mat::rows(&qkv[qo..], qkvd), Mat::rows(&qkv[ko..], qkvd));
                gemm(p, t, q, k.t(), (t, t, hd), false, scale, serial);
                for (i, row) in p.chunks_exact_mut(t).enumerate() {
                    softmax_causal(row, i);
                }
            }
        });
}

/// Softmax of `row[..=i]` in place; `row[i + 1..]` (the future) set to zero.
fn softmax_causal(row: &mut [f32], i: usize) {
    let (live, future) = row.split_at_mut(i + 1);
    let mx = live.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0;
    for x in live.iter_mut() {
        *x = exp(*x - mx);
        sum += *x;
    }
    let inv = 1.0 / sum;
    live.iter_mut().for_each(|x| *x *= inv);
    future.fill(0.0);
}

/// Backward of [`attention`]: `dqkv` (b·t, qkv_dim) is overwritten with ∂L/∂(q‖k‖v) (q and
/// k still rotated) from `dout` (b·t, q_dim).
pub fn attention_backward(
    s: AttnShape,
    qkv: &[f32],
    probs: &[f32],
    dout: &[f32],
    dqkv: &mut [f32],
) {
    let (t, hd, qd, qkvd) = (s.t, s.hd, s.q_dim(), s.qkv_dim());
    let scale = 1.0 / (hd as f32).sqrt();
    let serial = Par::Serial;
    dqkv.par_chunks_mut(t * qkvd)
        .zip(probs.par_chunks(s.n_heads * t * t))
        .zip(qkv.par_chunks(t * qkvd))
        .zip(dout.par_chunks(t * qd))
        .for_each(|(((dqkv, probs), qkv), dout)| {
            // key/value gradients accumulate over the query heads that share them
            dqkv.fill(0.0);
            let mut ds = vec![0f32; t * t];
            for (h, p) in probs.chunks_exact(t * t).enumerate() {
                let (qo, ko, vo) = s.offsets(h);
                let (q, k) = (Mat::rows(&qkv[qo..], qkvd), Mat::rows(&qkv[ko..], qkvd));
                let (v, d_o, pm) = (
                    Mat::rows(&qkv[vo..], qkvd),
                    Mat::rows(&dout[qo..], qd),
                    Mat::rows(p, t),
                );
                // dP = dO · Vᵀ ; dV += Pᵀ · dO
                gemm(&mut ds, t, d_o, v.t(), (t, t, hd), false, 1.0, serial);
                gemm(
                    &mut dqkv[vo..],
                    qkvd,
                    pm.t(),
                    d_o,
                    (t, hd, t),
                    true,
                    1.0,
                    serial,
                );
                // dS = scale · P ⊙ (dP − Σⱼ P·dP) (zero where P is: above the diagonal)
                for (dsr, pr) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                    let c: f32 = dsr.iter().zip(pr).map(|(d, p)| d * p).sum();
                    for (d, &p) in dsr.iter_mut().zip(pr) {
                        *d = scale * p * (*d - c);
                    }
                }
                // dQ = dS · K ; dK += dSᵀ · Q
                let dsm = Mat::rows(&ds, t);
                gemm(
                    &mut dqkv[qo..],
                    qkvd,
                    dsm,
                    k,
                    (t, hd, t),
                    false,
                    1.0,
                    serial,
                );
                gemm(
                    &mut dqkv[ko..],
                    qkvd,
                    dsm.t(),
                    q,
                    (t, hd, t),
                    true,
                    1.0,
                    serial,
                );
            }
        });
}

/// `eˣ` without a libm call, so loops over it vectorise: Cephes' range reduction
/// `x = n·ln2 + r` and a degree-6 polynomial for `eʳ` (relative error < 2e-7 on the clamped
/// range; inputs below −87 give ~1e-38 rather than 0).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

// ---- SwiGLU ---------------------------------------------------------------------------------

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `act = silu(gate) ⊙ up` where each row of `gu` is `gate (f) ‖ up (f)`.
pub fn swiglu(gu: &[f32], f: usize, act: &mut [f32]) {
    let chunk = rows_per_task(2 * f);
    act.par_chunks_mut(f * chunk)
        .zip(gu.par_chunks(2 * f * chunk))
        .for_each(|(act, gu)| {
            for (a, gu) in act.chunks_exact_mut(f).zip(gu.chunks_exact(2 * f)) {
                let (g, u) = gu.split_at(f);
                for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
                    *a = g * sigmoid(g) * u;
                }
            }
        });
}

/// Backward of [`swiglu`]: `dgu` (rows × 2f) is overwritten.
pub fn swiglu_backward(gu: &[f32], dact: &[f32], f: usize, dgu: &mut [f32]) {
    let chunk = rows_per_task(2 * f);
    dgu.par_chunks_mut(2 * f * chunk)
        .zip(gu.par_chunks(2 * f * chunk))
        .zip(dact.par_chunks(f * chunk))
        .for_each(|((dgu, gu), dact)| {
            for ((dgu, gu), da) in dgu
                .chunks_exact_mut(2 * f)
                .zip(gu.chunks_exact(2 * f))
                .zip(dact.chunks_exact(f))
            {
                let (g, u) = gu.split_at(f);
                let (dg, du) = dgu.split_at_mut(f);
                for i in 0..f {
                    let sg = sigmoid(g[i]);
                    let silu = g[i] * sg;
                    du[i] = da[i] * silu;
                    dg[i] = da[i] * u[i] * sg * (1.0 + g[i] * (1.0 - sg));
                }
            }
        });
}

// ---- cross-entropy --------------------------------------------------------------------------

/// Mean cross-entropy of `logits` (rows × v) against `targets`, over the rows whose target
/// is not `u32::MAX` (unscored: prompt tokens, padding). With `grad_scale = Some(s)`, `logits`
/// is overwritten with the gradient of `s · loss`: `s · (softmax − onehot) / scored` on scored
/// rows, zero on the rest. The mean is summed in row order (not a parallel reduction), so it
/// is reproducible. No scored row: loss 0.
pub fn cross_entropy(
    logits: &mut [f32],
    targets: &[u32],
    v: usize,
    grad_scale: Option<f32>,
) -> f32 {
    let scored = targets.iter().filter(|&&y| y != u32::MAX).count();
    let mut row_loss = vec![0f32; targets.len()];
    let chunk = rows_per_task(v);
    let k = grad_scale.map(|s| s / scored.max(1) as f32);
    logits
        .par_chunks_mut(v * chunk)
        .zip(targets.par_chunks(chunk))
        .zip(row_loss.par_chunks_mut(chunk))
        .for_each(|((logits, targets), losses)| {
            for ((row, &y), loss) in logits.chunks_exact_mut(v).zip(targets).zip(losses) {
                if y == u32::MAX {
                    if k.is_some() {
                        row.fill(0.0);
                    }
                    continue;
                }
                let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let z: f32 = row.iter().map(|&x| exp(x - mx)).sum();
                let lse = mx + z.ln();
                *loss = lse - row[y as usize];
                if let Some(k) = k {
                    for x in row.iter_mut() {
                        *x = exp(*x - lse) * k;
                    }
                    row[y as usize] -= k;
                }
            }
        });
    (row_loss.iter().map(|&l| f64::from(l)).sum::<f64>() / scored.max(1) as f64) as f32
}

/// Per row of `logits` (rows × v): the log-probability of its target and the row's
/// log-sum-exp; 0 and 0 on unscored rows (`u32::MAX`). `logits` is left as it is, for
/// [`weighted_ce_grad`] — the sequence-level objectives (DPO, reward) need every row's
/// log-prob before they know how much each row's gradient weighs.
pub fn target_logprobs(logits: &[f32], targets: &[u32], v: usize) -> (Vec<f32>, Vec<f32>) {
    let mut logp = vec![0f32; targets.len()];
    let mut lse = vec![0f32; targets.len()];
    let chunk = rows_per_task(v);
    logits
        .par_chunks(v * chunk)
        .zip(targets.par_chunks(chunk))
        .zip(logp.par_chunks_mut(chunk).zip(lse.par_chunks_mut(chunk)))
        .for_each(|((logits, targets), (logp, lse))| {
            for (((row, &y), lp), l) in logits.chunks_exact(v).zip(targets).zip(logp).zip(lse) {
                if y == u32::MAX {
                    continue;
                }
                let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let z: f32 = row.iter().map(|&x| exp(x - mx)).sum();
                *l = mx + z.ln();
                *lp = row[y as usize] - *l;
            }
        });
    (logp, lse)
}

/// Overwrite `logits` with the gradient of `−Σ_rows w_row · log p(target_row)`:
/// `w_row · (softmax − onehot)` on scored rows, zero elsewhere; `lse` is from
/// [`target_logprobs`]. With every `w_row = s / scored` this is [`cross_entropy`]'s gradient.
pub fn weighted_ce_grad(logits: &mut [f32], targets: &[u32], v: usize, lse: &[f32], w: &[f32]) {
    let chunk = rows_per_task(v);
    logits
        .par_chunks_mut(v * chunk)
        .zip(targets.par_chunks(chunk))
        .zip(lse.par_chunks(chunk).zip(w.par_chunks(chunk)))
        .for_each(|((logits, targets), (lse, w))| {
            for (((row, &y), &l), &k) in logits.chunks_exact_mut(v).zip(targets).zip(lse).zip(w) {
                if y == u32::MAX || k == 0.0 {
                    row.fill(0.0);
                    continue;
                }
                for x in row.iter_mut() {
                    *x = exp(*x - l) * k;
                }
                row[y as usize] -= k;
            }
        });
}

/// A row's target distribution for [`kl_grad`].
#[derive(Debug, Clone, Copy)]
pub enum Dist<'a> {
    /// Unscored (prompt, padding).
    None,
    /// All mass on one token: the loss is cross-entropy.
    Hard(u32),
    /// Some tokens' probabilities (a teacher's top-k, renormalized to sum to 1).
    Sparse(&'a [(u32, f32)]),
    /// Logits over the whole vocabulary (a teacher's own forward); their softmax.
    Dense(&'a [f32]),
}

/// Per row of `logits` (rows × v): `KL(p ‖ softmax(row))` for its target `p` (0 on unscored
/// rows); `logits` is overwritten with the gradient of `Σ_rows w_row · KL`,
/// `w_row · (softmax − p)`, zero on unscored rows. With `Hard` targets this is
/// [`weighted_ce_grad`] (KL against a one-hot is the cross-entropy).
pub fn kl_grad(logits: &mut [f32], v: usize, targets: &[Dist], w: &[f32]) -> Vec<f32> {
    let mut kl = vec![0f32; targets.len()];
    let chunk = rows_per_task(v);
    logits
        .par_chunks_mut(v * chunk)
        .zip(targets.par_chunks(chunk))
        .zip(kl.par_chunks_mut(chunk).zip(w.par_chunks(chunk)))
        .for_each(|((logits, targets), (kl, w))| {
            let mut p = Vec::new();
            for (((row, t), kl), &k) in logits.chunks_exact_mut(v).zip(targets).zip(kl).zip(w) {
                if matches!(t, Dist::None) {
                    row.fill(0.0);
                    continue;
                }
                let lse = |r: &[f32]| {
                    let mx = r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    mx + r.iter().map(|&x| exp(x - mx)).sum::<f32>().ln()
                };
                let l = lse(row);
                let mut sum = 0f64;
                match *t {
                    Dist::None => {}
                    Dist::Hard(y) => sum = f64::from(l - row[y as usize]),
                    Dist::Sparse(d) => {
                        for &(id, pi) in d {
                            if pi > 0.0 {
                                sum += f64::from(pi * (pi.ln() - (row[id as usize] - l)));
                            }
                        }
                    }
                    Dist::Dense(tl) => {
                        let lt = lse(tl);
                        p.clear();
                        p.extend(tl.iter().map(|&x| x - lt));
                        for (&lp, &x) in p.iter().zip(row.iter()) {
                            let pi = exp(lp);
                            if pi > 0.0 {
                                sum += f64::from(pi * (lp - (x - l)));
                            }
                        }
                    }
                }
                *kl = sum as f32;
                for x in row.iter_mut() {
                    *x = exp(*x - l) * k;
                }
                match *t {
                    Dist::None => {}
                    Dist::Hard(y) => row[y as usize] -= k,
                    Dist::Sparse(d) => {
                        for &(id, pi) in d {
                            row[id as usize] -= k * pi;
                        }
                    }
                    Dist::Dense(_) => {
                        for (g, &lp) in row.iter_mut().zip(&p) {
                            *g -= k * exp(lp);
                        }
                    }
                }
            }
        });
    kl
}
