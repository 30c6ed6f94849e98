//! Leaf operations the architectures' forward passes share: batch checks, RMSNorm, RoPE,
//! storing K/V, paged attention (full or sliding-window, over any KV type), LoRA hooks, and the scratch buffers they work in.
//! Each architecture's file composes these in its own order.

use ferrolm_gguf::GgufFile;
use rayon::prelude::*;

use crate::adapter::Proj;
use crate::kv_cache::{unrotate, KvLayer};
use crate::linear::dequantize;
use crate::mat::{gemm, Mat, Par};
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
    let qkv = &s.qkv;
    kv.write_batch(layer, slots, |i| {
        let row = &qkv[i * qkv_dim..(i + 1) * qkv_dim];
        (&row[q_dim..q_dim + kv_dim], &row[q_dim + kv_dim..])
    });
}

/// Causal attention of every (token, head) over its sequence's cached positions
/// `0..=position` (with a sliding `window`: the last `window` of them, as llama.cpp masks
/// `position - p >= window`): softmax of `scale · q·k` (usually `scale = 1/sqrt(head_dim)`),
/// weighted sum of V. When the cache stores Hadamard-rotated heads (q4_0), q is rotated in
/// place first and each output head un-rotated at the end, so the result is the same
/// attention (see `kv_cache.rs`).
///
/// Two paths, both online softmax (a running max and sum per query, parts merged by
/// rescaling), so neither ever holds a whole context's scores:
/// - unless prompts run batch invariant (`FERROLM_BATCH_INVARIANT`, on by default), a run of
///   [`ATTN_GEMM_MIN_TOKENS`] or more new tokens of one sequence (prefill) is tiled
///   flash-attention style ([`attend_tiled`]): per (KV head, tile of [`ATTN_ROWS`] queries),
///   K and V tiles of [`ATTN_COLS`] positions are converted to f32 once for the group's query
///   heads and multiplied with `gemm`;
/// - every other token (decode, and batch-invariant prompts) attends by
///   [`simd::attend_partial`] straight on the stored rows, its positions split into chunks of
///   [`ATTN_SPLIT`] aligned to absolute positions (flash-decoding): a task is one chunk of
///   one sequence for every KV head (rows contiguous in the cache) and for up to
///   `MAX_GROUP / group` neighbouring tokens that see the chunk from the same start (each K
///   and V row read once for all of them; a prompt token sees the rows of its last chunk up
///   to its own position), and each token's chunks are merged in position order. A step with
///   fewer tasks than twice the threads (one sequence over a short context) splits each task
///   into one per KV head, so every thread attends. Each (token, head)'s arithmetic depends
///   only on its own query, position and window, never on the tokens it shares a task with,
///   the rest of the batch or the thread count: a prompt token gets bit for bit what it would
///   decoding alone, which batch invariance asks.
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
    let tiled = !crate::quant::batch_invariant();
    attention_paths(c, layer, b, kv, s, scale, window, tiled);
}

/// [`attention`], with the tiled prefill path allowed or not.
#[allow(clippy::too_many_arguments)]
fn attention_paths(
    c: &Config,
    layer: usize,
    b: &Batch,
    kv: &KvCache,
    s: &mut Scratch,
    scale: f32,
    window: Option<usize>,
    tiled: bool,
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
    let by_gemm = &mut s.by_gemm;
    by_gemm.clear();
    by_gemm.resize(n, false);
    for sq in b.seqs {
        let p0 = b.positions[sq.start] as usize;
        let consecutive = (0..sq.len).all(|k| b.positions[sq.start + k] as usize == p0 + k);
        if tiled && sq.len >= ATTN_GEMM_MIN_TOKENS && consecutive {
            by_gemm[sq.start..sq.start + sq.len].fill(true);
            attend_tiled(c, kl, bs, sq, p0, &s.qkv, &mut s.att, scale, window);
        }
    }
    // The other tokens: their positions in chunks, each (token, chunk) a slot of
    // `attn_parts`; one task per chunk shared by up to `tb` neighbouring tokens of a sequence.
    let per = c.n_heads * (hd + 2);
    let tb = (simd::MAX_GROUP / group).max(1);
    let by_gemm = &s.by_gemm;
    let (tasks, slots_of) = (&mut s.attn_tasks, &mut s.attn_slots);
    tasks.clear();
    slots_of.clear();
    slots_of.resize(n, (0, 0));
    let mut slots = 0u32;
    let mut pending: Vec<(u32, u32, u32, u32)> = Vec::new();
    for (si, sq) in b.seqs.iter().enumerate() {
        let mine: Vec<usize> = (sq.start..sq.start + sq.len)
            .filter(|&i| !by_gemm[i])
            .collect();
        for run in mine.chunks(tb) {
            pending.clear();
            for &i in run {
                let ctx = b.positions[i] as usize + 1;
                let first = window.map_or(0, |w| ctx.saturating_sub(w));
                let base = slots;
                let mut lo = first;
                while lo < ctx {
                    let hi = ((lo / ATTN_SPLIT + 1) * ATTN_SPLIT).min(ctx);
                    pending.push((lo as u32, hi as u32, i as u32, slots));
                    slots += 1;
                    lo = hi;
                }
                slots_of[i] = (base, slots - base);
            }
            // Tokens whose parts start at the same position share a task (stable: in token
            // order), each seeing its own rows of it: a prompt's tokens see different ends of
            // their last chunk.
            pending.sort_by_key(|&(lo, hi, _, _)| (lo, hi));
            for e in pending.chunk_by(|x, y| x.0 == y.0) {
                let mut t = AttnTask {
                    seq: si as u32,
                    lo: e[0].0,
                    hi: e[e.len() - 1].1,
                    h0: 0,
                    h1: c.n_kv_heads as u32,
                    n: e.len() as u32,
                    tokens: [0; TASK_TOKENS],
                    slots: [0; TASK_TOKENS],
                    seen: [0; TASK_TOKENS],
                };
                for (k, &(lo, hi, i, slot)) in e.iter().enumerate() {
                    t.tokens[k] = i;
                    t.slots[k] = slot;
                    t.seen[k] = hi - lo;
                }
                tasks.push(t);
            }
        }
    }
    // Too few tasks to keep every thread busy (one sequence's decode over a context of one
    // to a few ATTN_SPLIT chunks): one task per KV head instead. Each head's arithmetic is its
    // own either way, so the bits do not change.
    let threads = rayon::current_num_threads();
    if threads > 1 && tasks.len() < 2 * threads && c.n_kv_heads > 1 {
        let whole = tasks.len();
        for i in 0..whole {
            for h in 0..c.n_kv_heads as u32 {
                let mut t = tasks[i];
                (t.h0, t.h1) = (h, h + 1);
                tasks.push(t);
            }
        }
        tasks.drain(..whole);
    }
    if !tasks.is_empty() {
        s.attn_parts.resize(slots as usize * per, 0.0);
        let parts = SendPtr(s.attn_parts.as_mut_ptr());
        let qkv = &s.qkv;
        let gh = group * hd;
        s.attn_tasks
            .par_iter()
            .for_each_init(AttnBufs::default, |w, t| {
                let parts = &parts;
                let nt = t.n as usize;
                let table = b.seqs[t.seq as usize].block_table;
                w.q.resize(nt * gh, 0.0);
                w.o.resize(nt * gh, 0.0);
                w.ml.resize(nt * group, [0.0; 2]);
                // Each head sees its token's rows (left empty when every token sees them all).
                w.seen.clear();
                if t.seen[..nt].iter().any(|&l| l != t.hi - t.lo) {
                    let each = t.seen[..nt].iter().map(|&l| l as usize);
                    w.seen
                        .extend(each.flat_map(|l| std::iter::repeat_n(l, group)));
                }
                // The rows of KV head 0, a block at a time (a division per position cost
                // about half as much as the kernel at long context); head h's rows are h
                // rows further on.
                w.offs.clear();
                let (mut p, hi) = (t.lo as usize, t.hi as usize);
                while p < hi {
                    let (blk, end) = (p / bs, (p / bs + 1) * bs);
                    // (Slots of a block are consecutive: their rows one stride apart. Added,
                    // not multiplied: a 64-bit product per slot, SSE2 emulation in this
                    // closure, was 7% of a cache-resident layer in `examples/attention`,
                    // which builds its offsets the same way.)
                    let mut o = kl.row_offset(table[blk] as usize * bs + p % bs, t.h0 as usize);
                    let stride = kl.row_offset(1, 0);
                    w.offs.extend((p..end.min(hi)).map(|_| {
                        o += stride;
                        o - stride
                    }));
                    p = end;
                }
                let heads = (t.h1 - t.h0) as usize;
                for kvh in t.h0 as usize..t.h1 as usize {
                    if kvh > t.h0 as usize {
                        w.offs.iter_mut().for_each(|o| *o += kl.row);
                    }
                    let kl = &kl.for_head_pass(heads, kvh == t.h0 as usize);
                    for (k, qt) in w.q.chunks_exact_mut(gh).enumerate() {
                        let at = t.tokens[k] as usize * qkv_dim + kvh * gh;
                        qt.copy_from_slice(&qkv[at..at + gh]);
                    }
                    simd::attend_partial(
                        &w.q,
                        kl,
                        &w.offs,
                        &w.seen,
                        scale,
                        &mut w.scores,
                        &mut w.o,
                        &mut w.ml,
                    );
                    for k in 0..nt {
                        // SAFETY: KV head kvh of slot t.slots[k] belongs to this task alone
                        // (each (token, chunk) is one slot of one task, or of one task per KV
                        // head), these two ranges are that head's outputs and [max, sum]s,
                        // and `attn_parts` holds every slot.
                        let (out, ml) = unsafe {
                            let part = parts.0.add(t.slots[k] as usize * per);
                            (
                                std::slice::from_raw_parts_mut(part.add(kvh * gh), gh),
                                std::slice::from_raw_parts_mut(
                                    part.add(c.n_heads * hd + 2 * kvh * group),
                                    2 * group,
                                ),
                            )
                        };
                        out.copy_from_slice(&w.o[k * gh..(k + 1) * gh]);
                        for (g, &[m, l]) in w.ml[k * group..(k + 1) * group].iter().enumerate() {
                            ml[2 * g] = m;
                            ml[2 * g + 1] = l;
                        }
                    }
                }
            });
        // Merge each token's chunks, in position order.
        let parts = &s.attn_parts;
        let slots_of = &s.attn_slots;
        s.att[..n * q_dim]
            .par_chunks_mut(q_dim)
            .zip(slots_of.par_iter())
            .filter(|(_, &(_, count))| count > 0)
            .for_each(|(out, &(base, count))| {
                let (a, z) = (base as usize * per, (base + count) as usize * per);
                merge_parts(&parts[a..z], c.n_heads, hd, out);
            });
    }
    if kv.rotated() {
        s.att[..n * q_dim].chunks_exact_mut(hd).for_each(unrotate);
    }
}

/// Most tokens one task of [`attention`]'s one-token path takes (its group of query heads
/// times its tokens is at most [`simd::MAX_GROUP`]).
const TASK_TOKENS: usize = simd::MAX_GROUP;

/// Per-thread buffers of [`attention`]'s one-token path.
#[derive(Default)]
struct AttnBufs {
    q: Vec<f32>,
    o: Vec<f32>,
    ml: Vec<[f32; 2]>,
    scores: Vec<f32>,
    offs: Vec<usize>,
    seen: Vec<usize>,
}

/// One token's attention from its chunks' parts (each `n_heads · hd` outputs, each chunk's
/// own attention, then `n_heads` `[max, sum]` pairs, as [`simd::attend_partial`] leaves
/// them), into `out` (`n_heads · hd`): `out_h = Σ_c (w_c / Σ_c' w_c') o_c` with
/// `w_c = e^(m_c − M) l_c`, `M = max_c m_c`. One chunk's weight is `l / l`, exactly 1, so a
/// context of one chunk keeps the bits of its part (see `attend_partial`).
fn merge_parts(parts: &[f32], n_heads: usize, hd: usize, out: &mut [f32]) {
    let per = n_heads * (hd + 2);
    let weight_of = |c: usize, h: usize, mx: f32| {
        let at = c * per + n_heads * hd + 2 * h;
        (parts[at] - mx).exp() * parts[at + 1]
    };
    let chunks = parts.len() / per;
    for (h, oh) in out.chunks_exact_mut(hd).enumerate() {
        let mx = (0..chunks).fold(f32::NEG_INFINITY, |m, c| {
            m.max(parts[c * per + n_heads * hd + 2 * h])
        });
        let sum = (0..chunks).fold(0.0, |s, c| s + weight_of(c, h, mx));
        oh.fill(0.0);
        for c in 0..chunks {
            let w = weight_of(c, h, mx) / sum;
            simd::axpy(oh, w, &parts[c * per + h * hd..c * per + (h + 1) * hd]);
        }
    }
}

/// One task of [`attention`]'s one-token path: positions `lo..hi` of sequence `seq`, KV
/// heads `h0..h1`, for its first `n` tokens, whose results go to their `slots` of
/// `attn_parts` (those heads' parts of them); token `k` sees the first `seen[k]` of them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnTask {
    seq: u32,
    lo: u32,
    hi: u32,
    h0: u32,
    h1: u32,
    n: u32,
    tokens: [u32; TASK_TOKENS],
    slots: [u32; TASK_TOKENS],
    seen: [u32; TASK_TOKENS],
}

/// [`attention`] of sequence `sq`'s new tokens (positions `p0..p0 + sq.len`, consecutive) into
/// `att`, flash-attention style: one task per (KV head, tile of [`ATTN_ROWS`] queries), whose
/// `group` query heads are stacked into one `(group · rows) × hd` matrix; for each tile of
/// [`ATTN_COLS`] positions the queries can see, K and V are converted to f32 once, scores are
/// one `gemm`, the running max and sum of each query row are updated (rescaling its output
/// when the max grows), and the output gains `P · V`, a second `gemm`.
#[allow(clippy::too_many_arguments)]
fn attend_tiled(
    c: &Config,
    kl: &KvLayer,
    bs: usize,
    sq: &crate::SeqSpan,
    p0: usize,
    qkv: &[f32],
    att: &mut [f32],
    scale: f32,
    window: Option<usize>,
) {
    let (hd, group) = (c.head_dim, c.n_heads / c.n_kv_heads);
    let (q_dim, qkv_dim) = (c.q_dim(), c.q_dim() + 2 * c.kv_dim());
    let tiles = sq.len.div_ceil(ATTN_ROWS);
    let out = SendPtr(att.as_mut_ptr());
    assert!((sq.start + sq.len) * q_dim <= att.len());
    (0..c.n_kv_heads * tiles)
        .into_par_iter()
        .for_each_init(TileScratch::default, |ts, task| {
            let out = &out;
            let (kvh, tile) = (task / tiles, task % tiles);
            let i0 = tile * ATTN_ROWS;
            let l = (sq.len - i0).min(ATTN_ROWS);
            let rows = group * l;
            // Row h·l + r: query head kvh·group + h of token sq.start + i0 + r.
            ts.q.resize(rows * hd, 0.0);
            for (row, qr) in ts.q.chunks_exact_mut(hd).enumerate() {
                let (h, r) = (row / l, row % l);
                let at = (sq.start + i0 + r) * qkv_dim + (kvh * group + h) * hd;
                qr.copy_from_slice(&qkv[at..at + hd]);
            }
            ts.o.clear();
            ts.o.resize(rows * hd, 0.0);
            ts.m.clear();
            ts.m.resize(rows, f32::NEG_INFINITY);
            ts.l.clear();
            ts.l.resize(rows, 0.0);
            let end = p0 + i0 + l;
            let start = window.map_or(0, |w| (p0 + i0 + 1).saturating_sub(w));
            for k0 in (start..end).step_by(ATTN_COLS) {
                let k1 = (k0 + ATTN_COLS).min(end);
                let cols = k1 - k0;
                ts.k.resize(cols * hd, 0.0);
                ts.v.resize(cols * hd, 0.0);
                let kv_rows = ts.k.chunks_exact_mut(hd).zip(ts.v.chunks_exact_mut(hd));
                for (p, (kr, vr)) in (k0..k1).zip(kv_rows) {
                    let slot = sq.block_table[p / bs] as usize * bs + p % bs;
                    let o = kl.row_offset(slot, kvh);
                    kl.k_f32(o, kr);
                    kl.v_f32(o, vr);
                }
                ts.s.resize(rows * cols, 0.0);
                // Scores (rows × cols).
                gemm(
                    &mut ts.s,
                    cols,
                    Mat::rows(&ts.q, hd),
                    Mat::rows(&ts.k, hd).t(),
                    (rows, cols, hd),
                    false,
                    scale,
                    Par::Serial,
                );
                for (row, sr) in ts.s.chunks_exact_mut(cols).enumerate() {
                    let last = p0 + i0 + row % l;
                    let first = window.map_or(0, |w| (last + 1).saturating_sub(w));
                    let (a, b) = (first.max(k0), (last + 1).min(k1));
                    if a >= b {
                        sr.fill(0.0);
                        continue;
                    }
                    let vis = &mut sr[a - k0..b - k0];
                    let m_old = ts.m[row];
                    let m_new = vis.iter().fold(m_old, |m, &x| m.max(x));
                    let sum = simd::exp_sub_sum(vis, m_new);
                    if m_new > m_old {
                        let alpha = (m_old - m_new).exp();
                        ts.l[row] *= alpha;
                        ts.o[row * hd..(row + 1) * hd]
                            .iter_mut()
                            .for_each(|x| *x *= alpha);
                        ts.m[row] = m_new;
                    }
                    ts.l[row] += sum;
                    sr[..a - k0].fill(0.0);
                    sr[b - k0..].fill(0.0);
                }
                // Output (rows × hd) += P · V.
                gemm(
                    &mut ts.o,
                    hd,
                    Mat::rows(&ts.s, cols),
                    Mat::rows(&ts.v, hd),
                    (rows, hd, cols),
                    true,
                    1.0,
                    Par::Serial,
                );
            }
            for (row, or) in ts.o.chunks_exact(hd).enumerate() {
                let (h, r) = (row / l, row % l);
                let inv = 1.0 / ts.l[row];
                // SAFETY: head kvh·group + h of token sq.start + i0 + r: written by this task
                // alone (tasks are disjoint in (KV head, query tile)), inside `att` (asserted).
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        out.0
                            .add((sq.start + i0 + r) * q_dim + (kvh * group + h) * hd),
                        hd,
                    )
                };
                dst.iter_mut().zip(or).for_each(|(d, &x)| *d = x * inv);
            }
        });
}

/// Per-thread buffers of [`attend_tiled`].
#[derive(Default)]
struct TileScratch {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

/// From this many new tokens of one sequence on, attention runs tiled ([`attend_tiled`]), not
/// one token at a time.
const ATTN_GEMM_MIN_TOKENS: usize = 32;
/// Query rows per tile of [`attend_tiled`] (times the group's heads: its score tile's rows).
const ATTN_ROWS: usize = 128;
/// Positions per K/V tile of [`attend_tiled`]: with `ATTN_ROWS` and a group of 3 heads, a
/// 384 × 256 f32 score tile (384 KiB), which stays in L2 between its two products.
const ATTN_COLS: usize = 256;
/// Positions per chunk of the one-token path (flash-decoding); chunk boundaries sit at
/// multiples of it, so they depend on nothing but the position.
const ATTN_SPLIT: usize = 256;

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
    /// Per token of the batch: its attention ran tiled (see `attention`).
    pub(crate) by_gemm: Vec<bool>,
    /// The one-token path's tasks, each token's (first slot, slots) and the slots' partial
    /// results (see `attention`).
    pub(crate) attn_tasks: Vec<AttnTask>,
    pub(crate) attn_slots: Vec<(u32, u32)>,
    pub(crate) attn_parts: Vec<f32>,
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kv_cache::{KeyCalibration, KvType, KV_TYPES};
    use crate::model::Arch;
    use crate::SeqSpan;

    fn config(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Config {
        Config {
            arch: Arch::Llama,
            n_layers: 1,
            dim: n_heads * head_dim,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_dim: 4,
            vocab_size: 8,
            context_length: 4096,
            file_context_length: 4096,
            rope_theta: 10000.0,
            rope_dim: head_dim,
            rope_neox: false,
            rms_eps: 1e-5,
            sliding_window: None,
        }
    }

    /// Standard normal samples (xorshift64 and Box-Muller) from `state` (also for `kv_cache`'s
    /// tests).
    pub(crate) fn gaussian(mut state: u64) -> impl FnMut() -> f32 {
        move || {
            let mut u = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 11) as f64 / (1u64 << 53) as f64).max(1e-12)
            };
            let (a, b) = (u(), u());
            ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
        }
    }

    /// Attention of one query head over positions `first..=last` of a cache, the plain way:
    /// every row dequantized, scores, softmax and weighted sum in f64 over the query already
    /// in the stored basis.
    fn reference(
        kl: &KvLayer,
        slot: impl Fn(usize) -> usize,
        kvh: usize,
        q: &[f32],
        scale: f32,
        first: usize,
        last: usize,
    ) -> Vec<f64> {
        let hd = q.len();
        let mut row = vec![0f32; hd];
        let mut sc = Vec::new();
        for p in first..=last {
            kl.k_f32(kl.row_offset(slot(p), kvh), &mut row);
            sc.push(
                f64::from(scale)
                    * q.iter()
                        .zip(&row)
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum::<f64>(),
            );
        }
        let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
        let mut out = vec![0f64; hd];
        for (p, x) in (first..=last).zip(&sc) {
            kl.v_f32(kl.row_offset(slot(p), kvh), &mut row);
            let w = (x - mx).exp() / z;
            out.iter_mut()
                .zip(&row)
                .for_each(|(o, &v)| *o += w * f64::from(v));
        }
        out
    }

    /// The tiled prefill path (a 300-token run of one sequence) and the chunked one-token path
    /// (the same run batch invariant, a 3-token run and a lone token, over up to 2,000
    /// positions: eight chunks to merge), against plain attention, for every KV type, with
    /// full and sliding-window attention over a scattered block table. A wrong online-softmax
    /// rescale, merge, grouping or mask is off by far more than the tolerance.
    #[test]
    fn tiled_and_chunked_attention_match_plain_attention_at_long_context() {
        let (nh, nkv, hd, bs) = (6, 2, 64, 16);
        let c = config(nh, nkv, hd);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let qkv_dim = q_dim + 2 * kv_dim;
        let ctx: usize = 2000;
        let blocks = ctx.div_ceil(bs);
        // Blocks in a scrambled order, as a block manager may hand them out.
        let table: Vec<u32> = (0..blocks as u32)
            .map(|b| (b * 37) % blocks as u32)
            .collect();
        let slot = |p: usize| table[p / bs] as usize * bs + p % bs;
        let mut gauss = gaussian(0x2545_f491_4f6c_dd1d);
        let keys: Vec<f32> = (0..ctx * kv_dim)
            .map(|i| gauss() + if i % hd == 3 { 4.0 } else { 0.0 })
            .collect();
        let values: Vec<f32> = (0..ctx * kv_dim).map(|_| gauss()).collect();
        // Queries: a 300-token run ending at ctx - 1 (tiled), then 3 tokens and 1 token of two
        // more sequences over the same blocks (one-token path).
        let runs = [(ctx - 300, 300), (ctx - 3, 3), (1700, 1), (0, 27)];
        let n: usize = runs.iter().map(|r| r.1).sum();
        let positions: Vec<u32> = runs
            .iter()
            .flat_map(|&(p0, len)| (p0..p0 + len).map(|p| p as u32))
            .collect();
        let qs: Vec<f32> = (0..n * q_dim).map(|_| 2.0 * gauss()).collect();
        let tokens = vec![0u32; n];
        let mut start = 0;
        let seqs: Vec<SeqSpan> = runs
            .iter()
            .map(|&(_, len)| {
                let sq = SeqSpan {
                    start,
                    len,
                    block_table: &table,
                };
                start += len;
                sq
            })
            .collect();
        let b = Batch {
            tokens: &tokens,
            positions: &positions,
            seqs: &seqs,
            logits_for: &[],
            adapters: &[],
        };
        let scale = 0.125;
        for kind in KV_TYPES {
            let mut kv =
                KvCache::with_type(&c, kind, bs, blocks).expect("head size 64 takes every type");
            if kind.calibrates_keys() {
                let shift: Vec<f32> = (0..kv_dim)
                    .map(|i| if i % hd == 3 { 4.0 } else { 0.1 })
                    .collect();
                let scale: Vec<f32> = (0..kv_dim).map(|i| 0.5 + (i % 5) as f32 * 0.25).collect();
                kv.set_keys(KeyCalibration { shift, scale });
            }
            for p in 0..ctx {
                kv.write(
                    0,
                    slot(p),
                    &keys[p * kv_dim..][..kv_dim],
                    &values[p * kv_dim..][..kv_dim],
                );
            }
            for (window, tiled) in [
                (None, true),
                (Some(700), true),
                (None, false),
                (Some(700), false),
            ] {
                let mut s = Scratch::new();
                s.ensure(&c, n, 0);
                for (i, qr) in qs.chunks_exact(q_dim).enumerate() {
                    s.qkv[i * qkv_dim..i * qkv_dim + q_dim].copy_from_slice(qr);
                }
                attention_paths(&c, 0, &b, &kv, &mut s, scale, window, tiled);
                assert_eq!(
                    s.by_gemm,
                    (0..n).map(|i| tiled && i < 300).collect::<Vec<_>>()
                );
                let kl = kv.layer(0);
                let mut worst = 0f64;
                for (i, &p) in positions.iter().enumerate() {
                    let p = p as usize;
                    let first = window.map_or(0, |w| (p + 1).saturating_sub(w));
                    for h in 0..nh {
                        let kvh = h / (nh / nkv);
                        let mut q = qs[i * q_dim + h * hd..][..hd].to_vec();
                        kv.query_to_stored(0, kvh, &mut q);
                        // The one-token kernel may multiply as integers (q4_0 on AVX-512): the
                        // reference takes the query it rounds, and allows 5e-4 for the weights'
                        // rounding to int16 (half a step, 2^-16 of the largest of 256 rows, times
                        // each value's level, up to 127; the worst here measured 3.4e-4).
                        let kernel = simd::AttendKernel::pick(hd, nh / nkv);
                        let rounds = !s.by_gemm[i] && kernel.rounds_to_int(kind, hd);
                        if rounds {
                            q = kernel.query_as_used(kind, &q, hd);
                        }
                        let mut want = reference(&kl, slot, kvh, &q, scale, first, p);
                        if kv.rotated() {
                            let mut w: Vec<f32> = want.iter().map(|&x| x as f32).collect();
                            unrotate(&mut w);
                            want = w.iter().map(|&x| f64::from(x)).collect();
                        }
                        let got = &s.att[i * q_dim + h * hd..][..hd];
                        for (d, (&g, &w)) in got.iter().zip(&want).enumerate() {
                            let e = (f64::from(g) - w).abs();
                            worst = worst.max(e);
                            let room = if rounds { 5e-4 } else { 1e-4 };
                            assert!(e < room, "{kind} window {window:?} tiled {tiled} token {i} (position {p}) head {h} dim {d}: {g} vs {w}");
                        }
                    }
                }
                eprintln!("{kind} window {window:?} tiled {tiled}: worst |error| {worst:.2e}");
                if !tiled {
                    // Batch invariance: token 150 of the run, decoded alone, gets the same bits.
                    let i = 150;
                    let alone = [SeqSpan {
                        start: 0,
                        len: 1,
                        block_table: &table,
                    }];
                    let one = Batch {
                        tokens: &tokens[..1],
                        positions: &positions[i..=i],
                        seqs: &alone,
                        logits_for: &[],
                        adapters: &[],
                    };
                    let mut s1 = Scratch::new();
                    s1.ensure(&c, 1, 0);
                    s1.qkv[..q_dim].copy_from_slice(&qs[i * q_dim..(i + 1) * q_dim]);
                    attention_paths(&c, 0, &one, &kv, &mut s1, scale, window, false);
                    assert_eq!(
                        s1.att[..q_dim],
                        s.att[i * q_dim..(i + 1) * q_dim],
                        "{kind} window {window:?}"
                    );
                }
            }
        }
    }

    /// Regression (branch `attn` failing SmolLM2's golden greedy and last-logits tests): a
    /// context of one chunk keeps the arithmetic of the whole-context kernel, the softmax
    /// weights normalized before they multiply V. Dividing the weighted sum afterwards is as
    /// accurate (within 2e-6 of f64 on that model), but it moves outputs by a last bit, and
    /// through the 8-bit activations of the Q4_1 model that swapped the reference's top two
    /// first tokens (0.09 apart; scaling every attention output by 1 ± 1.2e-7 moves that gap
    /// by as much). So the one-token path is held bit for bit to a scalar model of the kernel,
    /// on SmolLM2's shape (9 query heads over 3 KV heads of 64, f16 cache): its 27-token chat
    /// prompt, batch invariant, and a token at position 255, the last of the first chunk.
    #[test]
    fn one_chunk_attention_keeps_the_whole_context_kernels_bits() {
        let (nh, nkv, hd, bs) = (9, 3, 64, 16);
        let c = config(nh, nkv, hd);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let qkv_dim = q_dim + 2 * kv_dim;
        let ctx = ATTN_SPLIT;
        let blocks = ctx / bs;
        let table: Vec<u32> = (0..blocks as u32)
            .map(|b| (b * 5) % blocks as u32)
            .collect();
        let slot = |p: usize| table[p / bs] as usize * bs + p % bs;
        let mut gauss = gaussian(0x9e37_79b9_7f4a_7c15);
        let mut kv = KvCache::with_type(&c, KvType::F16, bs, blocks).expect("f16 cache");
        let mut ks = vec![vec![0f32; hd]; ctx * nkv];
        let mut vs = vec![vec![0f32; hd]; ctx * nkv];
        for p in 0..ctx {
            let k: Vec<f32> = (0..kv_dim).map(|_| gauss()).collect();
            let v: Vec<f32> = (0..kv_dim).map(|_| gauss()).collect();
            kv.write(0, slot(p), &k, &v);
            let kl = kv.layer(0);
            for kvh in 0..nkv {
                let o = kl.row_offset(slot(p), kvh);
                kl.k_f32(o, &mut ks[p * nkv + kvh]);
                kl.v_f32(o, &mut vs[p * nkv + kvh]);
            }
        }
        let positions: Vec<u32> = (0..27).chain([ctx as u32 - 1]).collect();
        let n = positions.len();
        let tokens = vec![0u32; n];
        let seqs = [
            SeqSpan {
                start: 0,
                len: 27,
                block_table: &table,
            },
            SeqSpan {
                start: 27,
                len: 1,
                block_table: &table,
            },
        ];
        let b = Batch {
            tokens: &tokens,
            positions: &positions,
            seqs: &seqs,
            logits_for: &[],
            adapters: &[],
        };
        let mut s = Scratch::new();
        s.ensure(&c, n, 0);
        let qs: Vec<f32> = (0..n * q_dim).map(|_| 2.0 * gauss()).collect();
        for (i, qr) in qs.chunks_exact(q_dim).enumerate() {
            s.qkv[i * qkv_dim..i * qkv_dim + q_dim].copy_from_slice(qr);
        }
        let scale = 0.125;
        attention_paths(&c, 0, &b, &kv, &mut s, scale, None, false);
        // The kernel for f16 rows: 8-lane FMA dot products reduced as `attend_avx2` does,
        // 16-lane ones reduced by `sum16`'s tree as `attend_avx512` does (or the scalar
        // kernel's plain sums), its exp, weights times 1/sum, FMA weighted sum.
        let kernel = simd::AttendKernel::pick(hd, nh / nkv);
        let vector = kernel != simd::AttendKernel::Scalar;
        for (i, &p) in positions.iter().enumerate() {
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let q = &qs[i * q_dim + h * hd..][..hd];
                let mut w: Vec<f32> = (0..=p as usize)
                    .map(|p| {
                        let k = &ks[p * nkv + kvh];
                        let lanes = match kernel {
                            simd::AttendKernel::Scalar => {
                                return q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
                            }
                            simd::AttendKernel::Avx2 => 8,
                            simd::AttendKernel::Avx512 => 16,
                        };
                        let mut acc = [0f32; 16];
                        for c0 in (0..hd).step_by(lanes) {
                            for (l, a) in acc[..lanes].iter_mut().enumerate() {
                                *a = q[c0 + l].mul_add(k[c0 + l], *a);
                            }
                        }
                        if lanes == 16 {
                            // sum16: lane l + 8, then + 4 (quarters), then + 2, then + 1.
                            let t: Vec<f32> = (0..8).map(|l| acc[l] + acc[l + 8]).collect();
                            let t: Vec<f32> = (0..4).map(|l| t[l] + t[l + 4]).collect();
                            return ((t[0] + t[2]) + (t[1] + t[3])) * scale;
                        }
                        let t: Vec<f32> = (0..4).map(|l| acc[l] + acc[l + 4]).collect();
                        ((t[0] + t[2]) + (t[1] + t[3])) * scale
                    })
                    .collect();
                let mx = w.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                let inv = 1.0 / simd::exp_sub_sum(&mut w, mx);
                w.iter_mut().for_each(|x| *x *= inv);
                let mut want = vec![0f32; hd];
                for (p, &wp) in w.iter().enumerate() {
                    for (o, &x) in want.iter_mut().zip(&vs[p * nkv + kvh]) {
                        *o = if vector {
                            wp.mul_add(x, *o)
                        } else {
                            *o + wp * x
                        };
                    }
                }
                let got = &s.att[i * q_dim + h * hd..][..hd];
                assert_eq!(got, &want[..], "token {i} (position {p}) head {h}");
            }
        }
    }

    /// With more threads than a step's attention tasks (one sequence decoding over one or a
    /// few chunks), the one-token path splits each task by KV head; every head's output must
    /// keep the bits it gets unsplit, on one thread, for every cache type.
    #[test]
    fn splitting_decode_attention_by_kv_head_keeps_the_bits() {
        let (nh, nkv, hd, bs) = (9, 3, 64, 16);
        let c = config(nh, nkv, hd);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let ctx = ATTN_SPLIT + 90;
        let blocks = ctx.div_ceil(bs);
        let table: Vec<u32> = (0..blocks as u32)
            .map(|b| (b * 7) % blocks as u32)
            .collect();
        let slot = |p: usize| table[p / bs] as usize * bs + p % bs;
        for kind in [KvType::F16, KvType::Q8_0, KvType::Q4_0] {
            let mut gauss = gaussian(0x5eed_0000 + kind as u64);
            let mut kv = KvCache::with_type(&c, kind, bs, blocks).expect("cache");
            for p in 0..ctx {
                let k: Vec<f32> = (0..kv_dim).map(|_| gauss()).collect();
                let v: Vec<f32> = (0..kv_dim).map(|_| gauss()).collect();
                kv.write(0, slot(p), &k, &v);
            }
            // One token at position 100 (one chunk), then one at the last position (two).
            for p in [100u32, ctx as u32 - 1] {
                let seqs = [SeqSpan {
                    start: 0,
                    len: 1,
                    block_table: &table,
                }];
                let b = Batch {
                    tokens: &[0],
                    positions: &[p],
                    seqs: &seqs,
                    logits_for: &[],
                    adapters: &[],
                };
                let q: Vec<f32> = (0..q_dim).map(|_| 2.0 * gauss()).collect();
                let run = |threads: usize| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .expect("pool");
                    pool.install(|| {
                        let mut s = Scratch::new();
                        s.ensure(&c, 1, 0);
                        s.qkv[..q_dim].copy_from_slice(&q);
                        attention_paths(&c, 0, &b, &kv, &mut s, 0.125, None, false);
                        let split = s.attn_tasks.iter().all(|t| t.h1 - t.h0 == 1);
                        assert!(s.att[..q_dim].iter().all(|x| x.is_finite()));
                        (s.att[..q_dim].to_vec(), split, s.attn_tasks.len())
                    })
                };
                let (whole, split1, n1) = run(1);
                let (parts, split4, n4) = run(4);
                assert!(
                    !split1 && split4,
                    "{kind:?} at {p}: tasks {n1} on 1 thread, {n4} on 4"
                );
                assert_eq!(n4, n1 * nkv);
                for (h, (a, b)) in whole.chunks(hd).zip(parts.chunks(hd)).enumerate() {
                    let (a, b): (Vec<u32>, Vec<u32>) = (
                        a.iter().map(|x| x.to_bits()).collect(),
                        b.iter().map(|x| x.to_bits()).collect(),
                    );
                    assert_eq!(a, b, "{kind:?} at position {p}, head {h}");
                }
            }
        }
    }
}
