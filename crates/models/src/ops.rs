//! Leaf operations the architectures' forward passes share: batch checks, RMSNorm, RoPE,
//! storing K/V, paged attention (full or sliding-window, over any KV type), LoRA hooks, and the scratch buffers they work in.
//! Each architecture's file composes these in its own order.

use ferrolm_gguf::GgufFile;
use rayon::prelude::*;

use crate::adapter::Proj;
use crate::kv_cache::unrotate;
use crate::linear::dequantize;
use crate::mat::{gemm, gemm_to_ptr, Mat, Par};
use crate::quant::{QActs, SendPtr};
use crate::{simd, Batch, Config, KvCache, ModelError};

pub(crate) fn vector(g: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
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

/// The batch is well formed for a model of blueprint `c` and for `kv`: every check that keeps the
/// forward pass from indexing out of bounds. Adapters are checked by the caller.
pub(crate) fn check_batch(c: &Config, b: &Batch, kv: &KvCache) -> Result<(), ModelError> {
    let n = b.tokens.len();
    if n == 0 || b.positions.len() != n {
        return Err(ModelError::Batch(format!(
            "{n} tokens but {} positions",
            b.positions.len()
        )));
    }
    if let Some(&t) = b.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
        return Err(ModelError::Batch(format!(
            "token id {t} is outside the vocabulary ({})",
            c.vocab_size
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
    Ok(())
}

/// RoPE's inverse frequencies `base^(-2i/rope_dim)`, one per rotated pair.
pub(crate) fn inv_freq(base: f32, rope_dim: usize) -> Vec<f32> {
    (0..rope_dim / 2)
        .map(|i| (1.0 / (base as f64).powf(2.0 * i as f64 / rope_dim as f64)) as f32)
        .collect()
}

/// cos/sin of `position · inv_freq` for each token of the batch.
pub(crate) fn rope_table(inv_freq: &[f32], positions: &[u32], s: &mut Scratch) {
    let half = inv_freq.len();
    for (i, &p) in positions.iter().enumerate() {
        for (j, &f) in inv_freq.iter().enumerate() {
            let a = p as f32 * f;
            s.cos[i * half + j] = a.cos();
            s.sin[i * half + j] = a.sin();
        }
    }
}

pub(crate) fn apply_rope(c: &Config, n: usize, s: &mut Scratch) {
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

/// Store the batch's K and V (the k and v parts of each `qkv` row, after RoPE) in `kv` at
/// `slots`, in the cache's type.
pub(crate) fn store_kv(c: &Config, layer: usize, slots: &[usize], s: &Scratch, kv: &mut KvCache) {
    let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
    let qkv_dim = q_dim + 2 * kv_dim;
    for (i, &slot) in slots.iter().enumerate() {
        let row = &s.qkv[i * qkv_dim..(i + 1) * qkv_dim];
        kv.write(
            layer,
            slot,
            &row[q_dim..q_dim + kv_dim],
            &row[q_dim + kv_dim..],
        );
    }
}

/// Causal attention of every (token, head) over its sequence's cached positions
/// `0..=position` (with a sliding `window`: the last `window` of them, as llama.cpp masks
/// `position - p >= window`): scores, softmax (vectorized exp), weighted sum of V. `scale`
/// multiplies q·k (usually `1/sqrt(head_dim)`). When the cache stores Hadamard-rotated heads
/// (q4_0), q is rotated in place first and each output head un-rotated at the end, so the
/// result is the same attention (see `kv_cache.rs`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    c: &Config,
    layer: usize,
    b: &Batch,
    kv: &KvCache,
    s: &mut Scratch,
    scale: f32,
    window: Option<usize>,
) {
    let (hd, group) = (c.head_dim, c.n_heads / c.n_kv_heads);
    let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
    let qkv_dim = q_dim + 2 * kv_dim;
    let bs = kv.block_size;
    let n = b.tokens.len();
    if kv.transforms_queries() {
        for row in s.qkv[..n * qkv_dim].chunks_exact_mut(qkv_dim) {
            for (h, qh) in row[..q_dim].chunks_exact_mut(hd).enumerate() {
                kv.query_to_stored(layer, h / group, qh);
            }
        }
    }
    let kl = kv.layer(layer);
    let kl = &kl;
    let qkv = &s.qkv;
    let seq_of = &mut s.seq_of;
    seq_of.clear();
    for (si, sq) in b.seqs.iter().enumerate() {
        seq_of.extend(std::iter::repeat_n(si as u32, sq.len));
    }
    // Long runs of one sequence's new tokens (prefill) as matrix products; the other tokens
    // one by one below.
    let by_gemm = &mut s.by_gemm;
    by_gemm.clear();
    by_gemm.resize(n, false);
    for sq in b.seqs {
        let p0 = b.positions[sq.start] as usize;
        let consecutive = (0..sq.len).all(|k| b.positions[sq.start + k] as usize == p0 + k);
        if sq.len >= ATTN_GEMM_MIN_TOKENS && consecutive && !crate::quant::batch_invariant() {
            by_gemm[sq.start..sq.start + sq.len].fill(true);
            let att = SendPtr(s.att.as_mut_ptr());
            (0..c.n_heads).into_par_iter().for_each_init(
                || (Vec::new(), Vec::new(), Vec::new()),
                |(kf, vf, sc): &mut (Vec<f32>, Vec<f32>, Vec<f32>), qh| {
                    let out = att;
                    let kvh = qh / group;
                    let ctx = p0 + sq.len;
                    // K and V of positions 0..ctx for this head, as f32.
                    kf.resize(ctx * hd, 0.0);
                    vf.resize(ctx * hd, 0.0);
                    for p in 0..ctx {
                        let slot = sq.block_table[p / bs] as usize * bs + p % bs;
                        let o = kl.row_offset(slot, kvh);
                        kl.k_f32(o, &mut kf[p * hd..(p + 1) * hd]);
                        kl.v_f32(o, &mut vf[p * hd..(p + 1) * hd]);
                    }
                    // Query rows in blocks, each against the columns it can see (causal,
                    // windowed): bounded scratch however long the prompt, and no work on the
                    // masked triangle beyond one block's.
                    for i0 in (0..sq.len).step_by(ATTN_ROWS) {
                        let l = (sq.len - i0).min(ATTN_ROWS);
                        let end = p0 + i0 + l;
                        let start = window.map_or(0, |w| (p0 + i0 + 1).saturating_sub(w));
                        let cols = end - start;
                        sc.resize(l * cols, 0.0);
                        let q0 = (sq.start + i0) * qkv_dim + qh * hd;
                        // Scores (l × cols): Q rows at stride qkv_dim inside `qkv`, K rows
                        // start..end of `kf`.
                        let qm = Mat::rows(&qkv[q0..], qkv_dim);
                        let km = Mat::rows(&kf[start * hd..], hd).t();
                        gemm(sc, cols, qm, km, (l, cols, hd), false, scale, Par::Serial);
                        // Softmax over each row's visible positions first..=last.
                        for (r, row) in sc.chunks_exact_mut(cols).enumerate() {
                            let last = p0 + i0 + r;
                            let first = window.map_or(0, |w| (last + 1).saturating_sub(w));
                            let (a, b) = (first - start, last - start);
                            let vis = &mut row[a..=b];
                            let mx = vis.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                            let inv = 1.0 / simd::exp_sub_sum(vis, mx);
                            vis.iter_mut().for_each(|x| *x *= inv);
                            row[..a].fill(0.0);
                            row[b + 1..].fill(0.0);
                        }
                        // SAFETY: head qh's columns of these rows of `att` (l × hd at stride
                        // q_dim): disjoint across heads, blocks and sequences.
                        unsafe {
                            gemm_to_ptr(
                                out.0.add((sq.start + i0) * q_dim + qh * hd),
                                q_dim,
                                Mat::rows(sc, cols),
                                Mat::rows(&vf[start * hd..], hd),
                                (l, hd, cols),
                                false,
                                1.0,
                                Par::Serial,
                            )
                        }
                    }
                },
            );
        }
    }
    let by_gemm = &s.by_gemm;
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
                if by_gemm[i] {
                    return;
                }
                let q0 = i * qkv_dim + kvh * group * hd;
                let q = &qkv[q0..q0 + group * hd];
                let table = b.seqs[seq_of[i] as usize].block_table;
                let ctx = b.positions[i] as usize + 1;
                let first = window.map_or(0, |w| ctx.saturating_sub(w));
                // Offsets of positions first..ctx in the cache, walking the block table.
                offs.clear();
                for (blk, &id) in table
                    .iter()
                    .enumerate()
                    .take(ctx.div_ceil(bs))
                    .skip(first / bs)
                {
                    let base = id as usize * bs;
                    let lo = first.saturating_sub(blk * bs);
                    offs.extend((lo..bs.min(ctx - blk * bs)).map(|o| kl.row_offset(base + o, kvh)));
                }
                simd::attend(q, kl, offs, scale, scores, out);
            },
        );
    if kv.rotated() {
        s.att[..n * q_dim].chunks_exact_mut(hd).for_each(unrotate);
    }
}

/// From this many new tokens of one sequence on, attention runs as two matrix products per
/// head (scores over the whole window, then the weighted sum), not one token at a time.
const ATTN_GEMM_MIN_TOKENS: usize = 32;
/// Query rows per block of that path.
const ATTN_ROWS: usize = 128;

pub(crate) fn slots_of(b: &Batch, bs: usize, out: &mut Vec<usize>) {
    out.clear();
    for sq in b.seqs {
        for i in sq.start..sq.start + sq.len {
            let p = b.positions[i] as usize;
            out.push(sq.block_table[p / bs] as usize * bs + p % bs);
        }
    }
}

pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ss + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * r * g;
        }
    }
}

/// RMSNorm of each `head_dim`-wide head of the q and k parts of every `qkv` row, in place,
/// with weights `q_norm` and `k_norm` (`head_dim` each): Qwen3's and Gemma 3's q/k norms,
/// applied before RoPE.
pub(crate) fn qk_norm(c: &Config, n: usize, qkv: &mut [f32], q_norm: &[f32], k_norm: &[f32]) {
    let (hd, q_dim, kv_dim) = (c.head_dim, c.q_dim(), c.kv_dim());
    let norm = |h: &mut [f32], w: &[f32]| {
        let ss = h.iter().map(|v| v * v).sum::<f32>() / h.len() as f32;
        let r = 1.0 / (ss + c.rms_eps).sqrt();
        h.iter_mut().zip(w).for_each(|(v, &g)| *v *= r * g);
    };
    for row in qkv[..n * (q_dim + 2 * kv_dim)].chunks_exact_mut(q_dim + 2 * kv_dim) {
        let (q, rest) = row.split_at_mut(q_dim);
        // (n_heads, head_dim) and (n_kv_heads, head_dim)
        q.chunks_exact_mut(hd).for_each(|h| norm(h, q_norm));
        rest[..kv_dim]
            .chunks_exact_mut(hd)
            .for_each(|h| norm(h, k_norm));
    }
}

pub(crate) fn add_in_place(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// Mutable run state: activations for up to `cap` tokens. Grows on demand, never shrinks.
#[derive(Default)]
pub struct Scratch {
    pub(crate) cap: usize,
    pub(crate) logit_cap: usize,
    pub(crate) x: Vec<f32>,
    pub(crate) xb: Vec<f32>,
    pub(crate) qkv: Vec<f32>,
    pub(crate) att: Vec<f32>,
    pub(crate) gu: Vec<f32>,
    pub(crate) h: Vec<f32>,
    pub(crate) tmp: Vec<f32>,
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
    pub(crate) slots: Vec<usize>,
    pub(crate) seq_of: Vec<u32>,
    /// Per token of the batch: its attention ran as matrix products (see `attention`).
    pub(crate) by_gemm: Vec<bool>,
    pub(crate) acts: QActs,
    /// Logits of the last forward: `logits_for.len() × vocab`.
    pub logits: Vec<f32>,
    /// When set, the forward adds each weight input's squares here (`ferrolm imatrix`).
    pub activations: Option<crate::ActivationStats>,
}

impl Scratch {
    pub fn new() -> Self {
        Self::default()
    }

    /// The final hidden states (after the output norm) of the last forward's `logits_for`
    /// rows, `m × dim`, in that order: what a scalar head (a reward model's score) reads.
    pub fn hidden(&self, m: usize, dim: usize) -> &[f32] {
        &self.xb[..m * dim]
    }

    /// Row `j` of [`Scratch::hidden`].
    pub fn hidden_row(&self, j: usize, dim: usize) -> &[f32] {
        &self.xb[j * dim..(j + 1) * dim]
    }

    pub(crate) fn ensure(&mut self, c: &Config, n: usize, n_logits: usize) {
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

    /// Add the `n` rows now at `site` to [`Scratch::activations`], if recording.
    pub(crate) fn record(&mut self, c: &Config, layer: usize, site: crate::Site, n: usize) {
        use crate::Site;
        let Scratch {
            activations,
            xb,
            att,
            h,
            qkv,
            ..
        } = self;
        let Some(a) = activations.as_mut() else {
            return;
        };
        let (buf, cols) = match site {
            Site::AttnIn | Site::FfnIn => (xb, c.dim),
            Site::AttnOut => (att, c.q_dim()),
            Site::FfnDownIn => (h, c.ffn_dim),
            Site::Qkv => (qkv, c.q_dim() + 2 * c.kv_dim()),
        };
        a.add(layer, site, &buf[..n * cols], cols);
    }

    /// Logits of entry `j` of the last batch's `logits_for`.
    pub fn logits_row(&self, j: usize, vocab: usize) -> &[f32] {
        &self.logits[j * vocab..(j + 1) * vocab]
    }
}

/// Apply each sequence's adapter (if any) to `proj` of layer `l`: `x` and `out` with their
/// row strides; the update lands in `out`'s columns from `col`.
pub(crate) fn adapt(
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
