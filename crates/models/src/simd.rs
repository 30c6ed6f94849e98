//! Vector helpers for attention (over the K/V cache, f16 or quantized) and SwiGLU, with an
//! AVX2+FMA(+F16C) path picked at run time and a scalar one beside it.

use crate::kv_cache::{KvLayer, KvType, QK};

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| has_avx2() && is_x86_feature_detected!("f16c"))
}

/// The AVX-512 attention kernel may run: the CPU has it and `FERROLM_ISA` does not ask for
/// less (see [`crate::quant::Isa::detect`]).
#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| has_f16c() && crate::quant::Isa::detect() == crate::quant::Isa::Avx512Vnni)
}

/// `out[i] = x[i]` rounded to f16 (round to nearest even), as bits.
pub fn to_f16(x: &[f32], out: &mut [u16]) {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    let out: &mut [half::f16] = out.reinterpret_cast_mut();
    out.convert_from_f32_slice(x);
}

/// f16 bits → f32 (F16C where the CPU has it).
pub fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    let src: &[half::f16] = src.reinterpret_cast();
    src.convert_to_f32_slice(dst);
}

/// Σ a·b.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && a.len().is_multiple_of(8) {
        // SAFETY: features checked above; lengths equal and a multiple of 8.
        return unsafe { dot_avx2(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// [`dot`] of four vectors against one `w`, each bitwise equal to `dot(a[i], w)` (same
/// accumulators, same order), with `w` loaded once for the four.
#[inline]
pub fn dot4(a: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && w.len().is_multiple_of(8) && a.iter().all(|x| x.len() == w.len()) {
        // SAFETY: features checked above; lengths equal and a multiple of 8.
        return unsafe { dot4_avx2(a, w.as_ptr(), |p| _load_f32(p)) };
    }
    a.map(|x| dot(x, w))
}

/// [`dot_f16`] of four vectors against one `w`, each bitwise equal to `dot_f16(a[i], w)`.
#[inline]
pub fn dot4_f16(a: [&[f32]; 4], w: &[u16]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if has_f16c() && w.len().is_multiple_of(8) && a.iter().all(|x| x.len() == w.len()) {
        // SAFETY: features checked above; lengths equal and a multiple of 8.
        return unsafe { dot4_avx2(a, w.as_ptr(), |p| _load_f16(p)) };
    }
    a.map(|x| dot_f16(x, w))
}

/// Σ a·w with `w` f16 bits (F16C where the CPU has it).
#[inline]
pub fn dot_f16(a: &[f32], w: &[u16]) -> f32 {
    debug_assert_eq!(a.len(), w.len());
    #[cfg(target_arch = "x86_64")]
    if has_f16c() && a.len().is_multiple_of(8) {
        // SAFETY: features checked above; lengths equal and a multiple of 8.
        return unsafe { dot_f16_avx2(a, w) };
    }
    a.iter()
        .zip(w)
        .map(|(x, &h)| x * half::f16::from_bits(h).to_f32())
        .sum()
}

/// y += a·x.
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() && x.len().is_multiple_of(8) {
        // SAFETY: as in `dot`.
        return unsafe { axpy_avx2(y, a, x) };
    }
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Attention of the `g = q.len() / kv.head_dim` query heads that share one KV head (GQA):
/// `out_h = softmax(scale · q_h·K_j) · V_j` over the rows of `kv` that start at `offs[j]`.
/// `q` and `out` hold the `g` heads back to back; `scores` is scratch. Doing the group together
/// reads (and dequantizes) each K and V row once for all its heads. (The attention runs
/// [`attend_partial`] and merges; this whole-context form is for the kernels' tests.)
#[cfg(test)]
pub(crate) fn attend(
    q: &[f32],
    kv: &KvLayer,
    offs: &[usize],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let mut ml = vec![[0f32; 2]; q.len() / kv.head_dim];
    attend_partial(q, kv, offs, &[], scale, scores, out, &mut ml);
}

/// [`attend`] over one part of a context, left for the caller to merge with the other parts
/// (flash-decoding): `out_h` is this part's attention (softmax over its rows only), and
/// `ml[h] = [m_h, l_h]` with `s_hj = scale · q_h·K_j`, `m_h = max_j s_hj` and
/// `l_h = Σ_j e^(s_hj − m_h)`, the part's weight in a merge. The weights are normalized before
/// they multiply V (not the sum after), as the whole-context kernel always did: a context of
/// one part then gets that kernel's bits, and the quantized models' golden tests, whose
/// near-ties sit inside the noise of a last-bit change here, keep their margins. `offs` must
/// not be empty.
///
/// `seen` (empty: every head sees every row) gives each head the rows it sees, a prefix of
/// `offs` of at least one: prompt tokens at neighbouring positions share one pass over a
/// chunk though each sees a different part of it. A head's result is bit for bit what it gets
/// alone over its own rows: every score is its row's own, the softmax runs over exactly the
/// head's rows, and the rows past them weigh exactly zero in the weighted sum of V.
#[allow(clippy::too_many_arguments)]
pub fn attend_partial(
    q: &[f32],
    kv: &KvLayer,
    offs: &[usize],
    seen: &[usize],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    ml: &mut [[f32; 2]],
) {
    debug_assert_eq!(q.len(), out.len());
    debug_assert!(!offs.is_empty());
    let hd = kv.head_dim;
    debug_assert_eq!(ml.len(), q.len() / hd);
    let run = AttendKernel::pick(hd, q.len() / hd).function(kv.kind);
    // SAFETY: `pick` takes a kernel only where the CPU has its features; every row is
    // bounds-checked inside.
    unsafe { run(q, kv, offs, seen, scale, scores, out, ml) }
}

/// The kernels of [`attend_partial`], fastest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AttendKernel {
    Avx512,
    Avx2,
    Scalar,
}

/// The signature every [`AttendKernel`] shares (that of [`attend_partial`]).
type AttendFn = unsafe fn(
    &[f32],
    &KvLayer,
    &[usize],
    &[usize],
    f32,
    &mut Vec<f32>,
    &mut [f32],
    &mut [[f32; 2]],
);

impl AttendKernel {
    /// Whether this kernel runs on this CPU for heads of `hd` in groups of `g`.
    pub(crate) fn fits(self, hd: usize, g: usize) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            AttendKernel::Avx512 => hd.is_multiple_of(64) && g <= MAX_GROUP && has_avx512(),
            #[cfg(target_arch = "x86_64")]
            AttendKernel::Avx2 => hd.is_multiple_of(8) && g <= MAX_GROUP && has_f16c(),
            AttendKernel::Scalar => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest kernel that [`fits`](Self::fits).
    pub(crate) fn pick(hd: usize, g: usize) -> Self {
        [AttendKernel::Avx512, AttendKernel::Avx2]
            .into_iter()
            .find(|k| k.fits(hd, g))
            .unwrap_or(AttendKernel::Scalar)
    }

    /// This kernel multiplies rows of `kind` (heads of `hd`) as integers, rounding the queries
    /// to int8 ([`quantize_q8`]) and the weights of V to int16 ([`weighted_sum_q4`]): the
    /// AVX-512 one over a q4_0 cache.
    #[cfg(test)]
    pub(crate) fn rounds_to_int(self, kind: KvType, hd: usize) -> bool {
        self == AttendKernel::Avx512 && kind == KvType::Q4_0 && q4_as_int(hd)
    }

    /// `q` (heads of `hd`) as this kernel multiplies it for rows of `kind`: rounded to int8
    /// per head as [`quantize_q8`] rounds (to nearest even, saturating, in f32) where it
    /// [`rounds_to_int`](Self::rounds_to_int), else as it is.
    #[cfg(test)]
    pub(crate) fn query_as_used(self, kind: KvType, q: &[f32], hd: usize) -> Vec<f32> {
        if !self.rounds_to_int(kind, hd) {
            return q.to_vec();
        }
        q.chunks_exact(hd)
            .flat_map(|qh| {
                let amax = qh.iter().fold(0f32, |a, x| a.max(x.abs()));
                let (d, id) = (amax / 127.0, 127.0 / amax);
                qh.iter()
                    .map(move |x| (x * id).round_ties_even().clamp(-128.0, 127.0) * d)
            })
            .collect()
    }

    /// This kernel's function for rows of `kind`; unsafe to call where it does not
    /// [`fit`](Self::fits).
    fn function(self, kind: KvType) -> AttendFn {
        match (self, kind) {
            #[cfg(target_arch = "x86_64")]
            (AttendKernel::Avx512, KvType::F16) => attend_avx512::<F16>,
            #[cfg(target_arch = "x86_64")]
            (AttendKernel::Avx512, KvType::Q8_0) => attend_avx512::<Q8>,
            #[cfg(target_arch = "x86_64")]
            (AttendKernel::Avx512, KvType::Q4_0) => attend_avx512::<Q4>,
            #[cfg(target_arch = "x86_64")]
            (AttendKernel::Avx2, KvType::F16) => attend_avx2::<F16>,
            #[cfg(target_arch = "x86_64")]
            (AttendKernel::Avx2, KvType::Q8_0) => attend_avx2::<Q8>,
            #[cfg(target_arch = "x86_64")]
            (AttendKernel::Avx2, KvType::Q4_0) => attend_avx2::<Q4>,
            _ => attend_scalar,
        }
    }
}

/// [`attend_partial`] the obvious way: each row dequantized, then dot products, exps, axpys.
#[allow(clippy::too_many_arguments)]
fn attend_scalar(
    q: &[f32],
    kv: &KvLayer,
    offs: &[usize],
    seen: &[usize],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    ml: &mut [[f32; 2]],
) {
    let hd = kv.head_dim;
    let n = offs.len();
    let mut row = vec![0.0; hd];
    scores.clear();
    scores.resize(out.len() / hd * n, 0.0);
    for (j, &o) in offs.iter().enumerate() {
        kv.k_f32(o, &mut row);
        for (h, qh) in q.chunks_exact(hd).enumerate() {
            scores[h * n + j] = qh.iter().zip(&row).map(|(a, b)| a * b).sum::<f32>() * scale;
        }
    }
    for (h, (sc, ml)) in scores
        .chunks_exact_mut(n.max(1))
        .zip(ml.iter_mut())
        .enumerate()
    {
        let sc = visible(sc, seen, h);
        let mx = sc.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        let l = exp_sub_sum(sc, mx);
        *ml = [mx, l];
        let inv = 1.0 / l;
        sc.iter_mut().for_each(|x| *x *= inv);
    }
    out.fill(0.0);
    for (j, &o) in offs.iter().enumerate() {
        kv.v_f32(o, &mut row);
        for (h, oh) in out.chunks_exact_mut(hd).enumerate() {
            let w = scores[h * n + j];
            oh.iter_mut().zip(&row).for_each(|(y, &x)| *y += w * x);
        }
    }
}

/// Head `h`'s scores as far as it sees (`seen[h]` rows, all when `seen` is empty), the rows
/// past that zeroed: zero weights, which add exactly nothing to the weighted sum of V.
fn visible<'a>(row: &'a mut [f32], seen: &[usize], h: usize) -> &'a mut [f32] {
    let len = seen.get(h).map_or(row.len(), |&l| l.min(row.len()));
    let (mine, rest) = row.split_at_mut(len);
    rest.fill(0.0);
    mine
}

/// Most query heads the vectorized [`attend_partial`] takes in one pass (one accumulator
/// register each): a KV head's group of query heads, for one token or several (the
/// attention's one-token path stacks up to `MAX_GROUP / group` tokens of a sequence that
/// share a chunk of positions, so each K row is loaded once for all of them). Each head's
/// arithmetic is the same however many share the pass.
pub(crate) const MAX_GROUP: usize = 12;

/// Row formats of the vectorized [`attend`], as its const parameter (see [`raw8`]).
const F16: u8 = 0;
const Q8: u8 = 1;
const Q4: u8 = 2;

/// Values `c..c + 8` (`c` a multiple of 8) of the KV row of `hd` values starting at `p`, as
/// f32: widened from f16, or a q8_0 / q4_0 block's quants before its scale ([`block_scale`];
/// `kv_cache.rs` has the layout).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn raw8<const KIND: u8>(p: *const u16, hd: usize, c: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    unsafe {
        if KIND == F16 {
            return _mm256_cvtph_ps(_mm_loadu_si128(p.add(c) as *const __m128i));
        }
        let qs = p.add(hd / QK) as *const u8;
        let q = if KIND == Q8 {
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(qs.add(c) as *const __m128i))
        } else {
            // Byte i of a block: element i (low nibble), element i + 16 (high nibble).
            let w = c % QK;
            let bytes = _mm_loadl_epi64(qs.add(c / QK * (QK / 2) + w % 16) as *const __m128i);
            let bytes = if w >= 16 {
                _mm_srli_epi16(bytes, 4)
            } else {
                bytes
            };
            let nib = _mm_and_si128(bytes, _mm_set1_epi8(15));
            let lut = _mm_loadu_si128(crate::kv_cache::Q4_LEVELS.as_ptr() as *const __m128i);
            _mm256_cvtepi8_epi32(_mm_shuffle_epi8(lut, nib))
        };
        _mm256_cvtepi32_ps(q)
    }
}

/// The scale of block `b` of the quantized row at `p`, in all 8 lanes (not for f16 rows).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_scale(p: *const u16, b: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    unsafe { _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(*p.add(b))))) }
}

/// [`attend_partial`] with the dot products, exp and axpys inlined into one AVX2 function, K
/// and V rows loaded in their stored format by [`raw8`], each block's scale applied once per
/// block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_avx2<const KIND: u8>(
    q: &[f32],
    kv: &KvLayer,
    offs: &[usize],
    seen: &[usize],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    ml: &mut [[f32; 2]],
) {
    let hd = kv.head_dim;
    let g = q.len() / hd;
    let n = offs.len();
    let (k, v) = (kv.k, kv.v);
    start_rows(kv, offs, scores, g * n);
    let qp = q.as_ptr();
    unsafe {
        // scores[h·n + j] = scale · q_h · K_j, heads four at a time (accumulators in
        // registers: with a run-time count they were kept on the stack, a store and a reload
        // around every FMA).
        let kp = k.as_ptr();
        for h0 in (0..g).step_by(4) {
            let (qh, sc) = (qp.add(h0 * hd), &mut scores[h0 * n..]);
            match g - h0 {
                1 => scores_block::<KIND, 1>(qh, kp, offs, hd, scale, sc),
                2 => scores_block::<KIND, 2>(qh, kp, offs, hd, scale, sc),
                3 => scores_block::<KIND, 3>(qh, kp, offs, hd, scale, sc),
                _ => scores_block::<KIND, 4>(qh, kp, offs, hd, scale, sc),
            }
        }
        softmax_rows(scores, g, n, seen, ml);
        // out_h = Σ_j w_hj · V_j, with the output rows held in registers across all j (a
        // load-add-store per row would chain every step through memory): up to four heads by
        // 16 columns at a time, so each slice of a V row is loaded (and dequantized) once for
        // the four.
        for h0 in (0..g).step_by(4) {
            let (w, o) = (&scores[h0 * n..], &mut out[h0 * hd..]);
            for c0 in (0..hd).step_by(16) {
                match (g - h0, hd - c0 >= 16) {
                    (1, true) => weighted_sum::<KIND, 1, 2>(w, v, offs, hd, c0, o),
                    (2, true) => weighted_sum::<KIND, 2, 2>(w, v, offs, hd, c0, o),
                    (3, true) => weighted_sum::<KIND, 3, 2>(w, v, offs, hd, c0, o),
                    (_, true) => weighted_sum::<KIND, 4, 2>(w, v, offs, hd, c0, o),
                    (1, false) => weighted_sum::<KIND, 1, 1>(w, v, offs, hd, c0, o),
                    (2, false) => weighted_sum::<KIND, 2, 1>(w, v, offs, hd, c0, o),
                    (3, false) => weighted_sum::<KIND, 3, 1>(w, v, offs, hd, c0, o),
                    (_, false) => weighted_sum::<KIND, 4, 1>(w, v, offs, hd, c0, o),
                }
            }
        }
    }
}

/// The vectorized kernels' start: every row at `offs` lies inside `kv` (they read rows
/// unchecked), and `scores` holds `len` zeros. Returns the smallest and largest offset.
fn start_rows(kv: &KvLayer, offs: &[usize], scores: &mut Vec<f32>, len: usize) -> (usize, usize) {
    // (The largest offset, checked once: a check per row took 6% of the q4_0 kernel's time.)
    let (first, last) = offs
        .iter()
        .fold((usize::MAX, 0), |(a, b), &o| (a.min(o), b.max(o)));
    assert!(last + kv.row <= kv.k.len().min(kv.v.len()));
    scores.clear();
    scores.resize(len, 0.0);
    (first, last)
}

/// Each of the `g` rows of `n` scores becomes its softmax, and `ml[h]` its `[max, Σ e^(s − max)]`
/// (the weights are normalized here, before they multiply V: see [`attend_partial`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn softmax_rows(
    scores: &mut [f32],
    g: usize,
    n: usize,
    seen: &[usize],
    ml: &mut [[f32; 2]],
) {
    let rows = scores.chunks_exact_mut(n.max(1)).take(g).zip(ml.iter_mut());
    for (h, (row, ml)) in rows.enumerate() {
        let row = visible(row, seen, h);
        let (mx, l) = unsafe {
            let mx = max_avx2(row);
            (mx, exp_sub_sum_avx2(row, mx))
        };
        *ml = [mx, l];
        let inv = 1.0 / l;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

/// [`softmax_rows`] for the q4_0 weighted sum, which takes the weights unnormalized: each of
/// the `g` rows of `n` scores becomes `e^(s − max)` over the head's visible rows (zero past
/// them), `ml[h] = [max, Σ]`, and `post[h] = 1 / Σ`, the factor [`weighted_sum_q4`] applies
/// to the head's sum once instead of to each weight. `top[h]`, where given, is the row's
/// largest score (the score pass's, over all `n`: only when every head sees every row). The
/// exps are 16 lanes at a time and summed in 16 lanes, the same for a head whatever the other
/// heads see.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma,f16c")]
unsafe fn softmax_q4(
    scores: &mut [f32],
    g: usize,
    n: usize,
    seen: &[usize],
    top: Option<&[f32]>,
    ml: &mut [[f32; 2]],
    post: &mut [f32],
) {
    use std::arch::x86_64::*;
    let rows = scores.chunks_exact_mut(n.max(1)).take(g);
    for (h, (row, (ml, post))) in rows.zip(ml.iter_mut().zip(post.iter_mut())).enumerate() {
        let row = visible(row, seen, h);
        let len = row.len();
        unsafe {
            let mx = match top {
                Some(t) => t[h],
                None => max_avx2(row),
            };
            let (m, p) = (_mm512_set1_ps(mx), row.as_mut_ptr());
            let mut acc = _mm512_setzero_ps();
            for i in (0..len).step_by(16) {
                let k = (u32::MAX >> (32 - (len - i).min(16))) as u16;
                let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), m));
                _mm512_mask_storeu_ps(p.add(i), k, e);
                acc = _mm512_mask_add_ps(acc, k, acc, e);
            }
            let l = _mm512_reduce_add_ps(acc);
            *ml = [mx, l];
            *post = 1.0 / l;
        }
    }
}

/// [`attend_partial`]'s AVX-512 kernel for heads that are a multiple of 64 values: each K and
/// V row is converted (f16) or dequantized (q8_0, q4_0) 64 values at a time into four 16-lane
/// registers ([`deq64`]), once for all the heads of the pass, and a head's dot products with
/// 16 rows are summed across lanes together ([`sum16`]) instead of one by one. The products
/// are [`attend_avx2`]'s for K (value times block scale, then times q) and the order of the
/// score sums differs (16 lanes, then `sum16`'s tree). For V, an f16 cache gets the AVX2 bits
/// (each output value gains `w·v` row by row in the same order); a quantized one multiplies
/// `w · (scale · value)` where AVX2 folds the weight into the scale, `(w · scale) · value`.
///
/// A q4_0 cache (heads of 64, 128 or 256) is multiplied as integers instead, its 4-bit values
/// looked up as their levels: the scores by `vpdpbusd` with each query head rounded to int8
/// ([`quantize_q8`], [`scores16_q4`], which also finds each head's largest score), the
/// weighted sum by `vpdpwssd` with each weight times its row's block scale rounded to int16
/// ([`weighted_sum_q4`]; the weights unnormalized, [`softmax_q4`]). Those two roundings are the
/// only new error, far below the 4-bit values' own; at 8000 positions of a 360M-shaped cache
/// this takes a token's attention from 16.1–16.7 ms to 10.5–10.7 at 2 threads, and the
/// passes' overheads trimmed (`softmax_q4`, the weighted sum's lookups and scales) to
/// 10.1–10.2 (BENCHMARKS.md).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_avx512<const KIND: u8>(
    q: &[f32],
    kv: &KvLayer,
    offs: &[usize],
    seen: &[usize],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    ml: &mut [[f32; 2]],
) {
    let hd = kv.head_dim;
    let g = q.len() / hd;
    let n = offs.len();
    let (k, v) = (kv.k, kv.v);
    assert!(hd.is_multiple_of(64) && out.len() == q.len());
    let (first, last) = start_rows(kv, offs, scores, g * n);
    let qp = q.as_ptr();
    unsafe {
        let rows = (k.as_ptr(), v.as_ptr(), kv.prefetch);
        // q4_0 keys: integer dot products with q rounded to int8 ([`quantize_q8`]), the rows
        // gathered by 32-bit byte offsets from one another (a cache whose rows lie over 2 GiB
        // apart takes the f32 products).
        let q4 = KIND == Q4 && q4_as_int(hd);
        // Each head's largest score, where the score pass finds it on the way.
        let mut top = [f32::NEG_INFINITY; MAX_GROUP];
        let mut found = false;
        if q4 && 2 * (last - first) < i32::MAX as usize {
            found = seen.is_empty();
            let (mut qi, mut qd) = ([0i8; MAX_GROUP * Q8_MAX_HD], [0f32; MAX_GROUP]);
            quantize_q8(q, hd, &mut qi, &mut qd);
            for h0 in (0..g).step_by(4) {
                let (qh, sc) = (qi.as_ptr().add(h0 * hd), &mut scores[h0 * n..]);
                let (d, mx) = (&qd[h0..], &mut top[h0..]);
                // (The head size as a constant too: with a run-time count of 64s, the loop
                // over them stayed a loop and copied each head's start into place.)
                match (g - h0, hd / 64) {
                    (1, 1) => scores16_q4::<1, 1>(qh, d, rows, offs, scale, sc, mx),
                    (2, 1) => scores16_q4::<2, 1>(qh, d, rows, offs, scale, sc, mx),
                    (3, 1) => scores16_q4::<3, 1>(qh, d, rows, offs, scale, sc, mx),
                    (_, 1) => scores16_q4::<4, 1>(qh, d, rows, offs, scale, sc, mx),
                    (1, 2) => scores16_q4::<1, 2>(qh, d, rows, offs, scale, sc, mx),
                    (2, 2) => scores16_q4::<2, 2>(qh, d, rows, offs, scale, sc, mx),
                    (3, 2) => scores16_q4::<3, 2>(qh, d, rows, offs, scale, sc, mx),
                    (_, 2) => scores16_q4::<4, 2>(qh, d, rows, offs, scale, sc, mx),
                    (1, _) => scores16_q4::<1, 4>(qh, d, rows, offs, scale, sc, mx),
                    (2, _) => scores16_q4::<2, 4>(qh, d, rows, offs, scale, sc, mx),
                    (3, _) => scores16_q4::<3, 4>(qh, d, rows, offs, scale, sc, mx),
                    (_, _) => scores16_q4::<4, 4>(qh, d, rows, offs, scale, sc, mx),
                }
            }
        } else {
            for h0 in (0..g).step_by(4) {
                let (qh, sc) = (qp.add(h0 * hd), &mut scores[h0 * n..]);
                match g - h0 {
                    1 => scores16::<KIND, 1>(qh, rows, offs, hd, scale, sc),
                    2 => scores16::<KIND, 2>(qh, rows, offs, hd, scale, sc),
                    3 => scores16::<KIND, 3>(qh, rows, offs, hd, scale, sc),
                    _ => scores16::<KIND, 4>(qh, rows, offs, hd, scale, sc),
                }
            }
        }
        // q4_0 values take the weights unnormalized (`post` divides each head's sum once).
        let mut post = [1f32; MAX_GROUP];
        if q4 {
            softmax_q4(
                scores,
                g,
                n,
                seen,
                found.then_some(&top[..g]),
                ml,
                &mut post,
            );
        } else {
            softmax_rows(scores, g, n, seen, ml);
        }
        let vp = v.as_ptr();
        for h0 in (0..g).step_by(4) {
            let (w, o) = (&scores[h0 * n..], &mut out[h0 * hd..]);
            for s in 0..hd / 64 {
                match g - h0 {
                    // q4_0 values: integer products with the weights rounded to int16.
                    1 if q4 => weighted_sum_q4::<1>(w, vp, offs, hd, s, &post[h0..], o),
                    2 if q4 => weighted_sum_q4::<2>(w, vp, offs, hd, s, &post[h0..], o),
                    3 if q4 => weighted_sum_q4::<3>(w, vp, offs, hd, s, &post[h0..], o),
                    _ if q4 => weighted_sum_q4::<4>(w, vp, offs, hd, s, &post[h0..], o),
                    1 => weighted_sum64::<KIND, 1>(w, vp, offs, hd, s, o),
                    2 => weighted_sum64::<KIND, 2>(w, vp, offs, hd, s, o),
                    3 => weighted_sum64::<KIND, 3>(w, vp, offs, hd, s, o),
                    _ => weighted_sum64::<KIND, 4>(w, vp, offs, hd, s, o),
                }
            }
        }
    }
}

/// Values `64·s .. 64·s + 64` of the row at `p` of `hd` values as four registers of 16 in
/// order: f16 converted, quantized (q8_0 or q4_0) times their block scales.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma,f16c")]
#[inline]
unsafe fn deq64<const KIND: u8>(
    p: *const u16,
    hd: usize,
    s: usize,
) -> [std::arch::x86_64::__m512; 4] {
    use std::arch::x86_64::*;
    unsafe {
        if KIND == F16 {
            let at = p.add(64 * s) as *const __m256i;
            return [
                _mm512_cvtph_ps(_mm256_loadu_si256(at)),
                _mm512_cvtph_ps(_mm256_loadu_si256(at.add(1))),
                _mm512_cvtph_ps(_mm256_loadu_si256(at.add(2))),
                _mm512_cvtph_ps(_mm256_loadu_si256(at.add(3))),
            ];
        }
        // The two blocks' f16 scales, side by side.
        let two = (p.add(2 * s) as *const i32).read_unaligned();
        let d = _mm_cvtph_ps(_mm_cvtsi32_si128(two));
        let (d0, d1) = (
            _mm512_broadcastss_ps(d),
            _mm512_broadcastss_ps(_mm_movehdup_ps(d)),
        );
        let qs = p.add(hd / QK) as *const u8;
        if KIND == Q8 {
            let at = qs.add(64 * s) as *const __m128i;
            let mut z = [d0, d0, d1, d1];
            for (c, z) in z.iter_mut().enumerate() {
                let b = _mm_loadu_si128(at.add(c));
                *z = _mm512_mul_ps(*z, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)));
            }
            return z;
        }
        // Two blocks of 16 bytes; byte i of a block holds element i (low nibble) and element
        // i + 16 (high nibble). Each block's 16 levels times its scale make a table that
        // `vpermps` indexes with the nibbles (it reads the low 4 bits of each index, so the
        // other bits need no masking): one lookup per 16 values, already scaled.
        let x = _mm256_loadu_si256(qs.add(32 * s) as *const __m256i);
        let xh = _mm256_srli_epi16(x, 4);
        let levels = _mm512_loadu_ps(Q4_LEVELS_F32.as_ptr());
        let (t0, t1) = (_mm512_mul_ps(d0, levels), _mm512_mul_ps(d1, levels));
        let look = |b: __m128i, t: __m512| _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(b), t);
        [
            look(_mm256_castsi256_si128(x), t0),
            look(_mm256_castsi256_si128(xh), t0),
            look(_mm256_extracti128_si256(x, 1), t1),
            look(_mm256_extracti128_si256(xh, 1), t1),
        ]
    }
}

/// Rows [`scores16`] asks for ahead of the one it multiplies: about a DRAM latency of work.
const PF_ROWS: usize = 8;

/// Prefetch the `row` `u16`s at `p` into L1: every 64-byte line they touch, as one prefetch
/// every 64 bytes from `p` and one of its last byte. The count depends only on `row`, so the
/// loop's exit is predicted: walking the lines from `p`'s own, whose count alternates between
/// 1 and 2 for a 36-byte q4_0 row, left it to chance, and the attention of
/// `examples/attention` was ~5% slower at 1 thread with its cache in L3.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_row(p: *const u16, row: usize) {
    use std::arch::x86_64::*;
    if row == 0 {
        return;
    }
    let (p, bytes) = (p as *const i8, 2 * row);
    let mut at = 0;
    while at + 64 < bytes {
        // SAFETY: a prefetch never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(at)) };
        at += 64;
    }
    unsafe {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(at));
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(bytes - 1));
    }
}

/// [`crate::kv_cache::Q4_LEVELS`] as f32, for [`deq64`]'s table lookups.
static Q4_LEVELS_F32: [f32; 16] = {
    let lv = crate::kv_cache::Q4_LEVELS;
    let mut t = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = lv[i] as f32;
        i += 1;
    }
    t
};

/// Lane `i` of the result is the sum of the 16 lanes of `v[i]`: 16 horizontal sums for 46
/// shuffles and adds (a tree that halves the lanes per row while it doubles the rows per
/// register), where one at a time they take about 8 each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma,f16c")]
#[inline]
unsafe fn sum16(v: &[std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // (Plain loops: a closure would not inherit this function's target features, and
    // returning a 512-bit vector from one without them miscompiles.)
    let z = _mm512_setzero_ps();
    // Rows 2i and 2i+1: each 128-bit quarter a half-sum, a's in quarters 0–1, b's in 2–3.
    let mut a = [z; 8];
    for (i, a) in a.iter_mut().enumerate() {
        let (x, y) = (v[2 * i], v[2 * i + 1]);
        *a = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(x, y),
            _mm512_shuffle_f32x4::<0xEE>(x, y),
        );
    }
    // Rows 4k..4k+4: quarter m holds four partial sums of row 4k + m.
    let mut b = [z; 4];
    for (k, b) in b.iter_mut().enumerate() {
        let (x, y) = (a[2 * k], a[2 * k + 1]);
        *b = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(x, y),
            _mm512_shuffle_f32x4::<0xDD>(x, y),
        );
    }
    // Rows 8m..8m+8: quarter m holds two partials of row 8m + m, then two of row 8m + 4 + m.
    let mut c = [z; 2];
    for (m, c) in c.iter_mut().enumerate() {
        let (x, y) = (_mm512_castps_pd(b[2 * m]), _mm512_castps_pd(b[2 * m + 1]));
        *c = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
        );
    }
    // Lane 4m + e: row m + 4e.
    let d = _mm512_add_ps(
        _mm512_shuffle_ps::<0x88>(c[0], c[1]),
        _mm512_shuffle_ps::<0xDD>(c[0], c[1]),
    );
    let rows = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(rows, d)
}

/// `out[h·n + j] = scale · q_h · K_j` for the `H` heads at `q` and the K rows at
/// `k + offs[j]`, 16 rows at a time: each row converted ([`deq64`]) once for the `H` heads, each head's
/// 16 dot products summed across lanes by one [`sum16`]. Rows are bounds-checked by the caller.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma,f16c")]
unsafe fn scores16<const KIND: u8, const H: usize>(
    q: *const f32,
    (k, v, row): (*const u16, *const u16, usize),
    offs: &[usize],
    hd: usize,
    scale: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = offs.len();
    assert!(out.len() >= H * n);
    unsafe {
        let mut part = [[_mm512_setzero_ps(); 16]; H];
        for j0 in (0..n).step_by(16) {
            let rows = (n - j0).min(16);
            for (r, &o) in offs[j0..j0 + rows].iter().enumerate() {
                // The rows are scattered (one head's row of each slot), so the hardware
                // prefetchers do not see them coming: ask for the K row PF_ROWS ahead, and
                // for this row's V, which the weighted sum reads next.
                if let Some(&ahead) = offs.get(j0 + r + PF_ROWS) {
                    prefetch_row(k.add(ahead), row);
                }
                prefetch_row(v.add(o), row);
                let kr = k.add(o);
                let mut acc = [_mm512_setzero_ps(); H];
                for s in 0..hd / 64 {
                    let z = deq64::<KIND>(kr, hd, s);
                    for (h, a) in acc.iter_mut().enumerate() {
                        let qh = q.add(h * hd + 64 * s);
                        for (c, &zc) in z.iter().enumerate() {
                            *a = _mm512_fmadd_ps(_mm512_loadu_ps(qh.add(16 * c)), zc, *a);
                        }
                    }
                }
                for (p, &a) in part.iter_mut().zip(&acc) {
                    p[r] = a;
                }
            }
            for p in part.iter_mut() {
                p[rows..].fill(_mm512_setzero_ps());
            }
            let mask = (u32::MAX >> (32 - rows)) as u16;
            for (h, p) in part.iter().enumerate() {
                let s = _mm512_mul_ps(sum16(p), _mm512_set1_ps(scale));
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(h * n + j0), mask, s);
            }
        }
    }
}

/// Largest head the integer q4_0 scores take (the int8 queries live on the stack).
const Q8_MAX_HD: usize = 256;

/// The AVX-512 kernel multiplies a q4_0 cache with heads of `hd` as integers
/// ([`scores16_q4`], [`weighted_sum_q4`]): 64, 128 or 256.
fn q4_as_int(hd: usize) -> bool {
    hd.is_multiple_of(64) && hd.is_power_of_two() && hd <= Q8_MAX_HD
}

/// Each head of `q` (`hd` values, `g = q.len() / hd` heads) rounded to int8 with one scale:
/// `qi[h·hd + i] = round(q[h·hd + i] · 127 / amax_h)` (to nearest even) and `qd[h] = amax_h /
/// 127`, so `q_h ≈ qd[h] · qi_h`. The heads reaching a q4_0 cache are Hadamard-rotated, which
/// spreads an outlier channel over the whole head, so one scale a head loses little: the
/// rounding adds at most `qd/2` a value, against the 4-bit keys' error of up to a sixteenth of
/// their block's range.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma,f16c")]
unsafe fn quantize_q8(q: &[f32], hd: usize, qi: &mut [i8], qd: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(hd.is_multiple_of(16) && qi.len() >= q.len() && qd.len() >= q.len() / hd);
    for (h, qh) in q.chunks_exact(hd).enumerate() {
        unsafe {
            let mut mx = _mm512_setzero_ps();
            for c in (0..hd).step_by(16) {
                mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(qh.as_ptr().add(c))));
            }
            let amax = _mm512_reduce_max_ps(mx);
            qd[h] = amax / 127.0;
            let id = _mm512_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
            for c in (0..hd).step_by(16) {
                let x = _mm512_mul_ps(_mm512_loadu_ps(qh.as_ptr().add(c)), id);
                let i = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(x));
                _mm_storeu_si128(qi.as_mut_ptr().add(h * hd + c) as *mut __m128i, i);
            }
        }
    }
}

/// The 32-bit words at `base + at[i]` bytes for the lanes `i` in `lanes`, zero elsewhere.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma,f16c")]
#[inline]
unsafe fn gather16(
    base: *const u8,
    at: std::arch::x86_64::__m512i,
    lanes: u16,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    unsafe {
        _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), lanes, at, base as *const i32)
    }
}

/// [`scores16`] for q4_0 keys by integer dot products (`vpdpbusd`), 16 rows a pass with one
/// row per lane: `out[h·n + j] = scale · qd[h] · Σ_b d_jb · (qi_h · L_jb)` with `qi`, `qd`
/// from [`quantize_q8`], `d_jb` row j's block scales and `L_jb` its int8 levels. Each gather
/// takes the same 4 stored bytes (8 values: 4 low nibbles, 4 high) of 16 rows; the nibbles
/// become bytes `level + 128` (unsigned, as `vpdpbusd` takes them; each head's sum starts at
/// `−128 · Σ qi` over the block to cancel the offset) and each head adds 4 products per row
/// per instruction against its 4 int8 values broadcast. A block's sums are exact integers, one
/// per lane, scaled by the 16 rows' block scales in f32: no sum across lanes. Rows are
/// bounds-checked by the caller, and lie within 2^31 bytes of each other.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn scores16_q4<const H: usize, const S: usize>(
    qi: *const i8,
    qd: &[f32],
    (k, v, row): (*const u16, *const u16, usize),
    offs: &[usize],
    scale: f32,
    out: &mut [f32],
    top: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (n, hd) = (offs.len(), 64 * S);
    let blocks = 2 * S;
    assert!(out.len() >= H * n && qd.len() >= H && top.len() >= H);
    unsafe {
        let lut = levels_lut(128);
        let low = _mm512_set1_epi8(15);
        // Each head's start per block, −128 · Σ qi over the block, and its values as dwords:
        // `qw[h][b][t]` elements 32b + 4t.. (low nibbles of stored dword t), `[4 + t]` elements
        // 32b + 16 + 4t.. (its high nibbles).
        let mut start = [[_mm512_setzero_si512(); 8]; H];
        let mut qw = [[[0i32; 8]; 8]; H];
        for h in 0..H {
            for b in 0..blocks {
                let qb = std::slice::from_raw_parts(qi.add(h * hd + 32 * b), 32);
                let sum: i32 = qb.iter().map(|&x| i32::from(x)).sum();
                start[h][b] = _mm512_set1_epi32(-128 * sum);
                for (t, w) in qw[h][b].iter_mut().enumerate() {
                    *w = (qb.as_ptr().add(4 * t) as *const i32).read_unaligned();
                }
            }
        }
        let kb = k as *const u8;
        let mut most = [_mm512_set1_ps(f32::NEG_INFINITY); H];
        for j0 in (0..n).step_by(16) {
            let rows = (n - j0).min(16);
            let lanes = (u32::MAX >> (32 - rows)) as u16;
            let here = &offs[j0..j0 + rows];
            // Byte offsets of the rows from the first (lanes past `rows` unused), computed in
            // registers (built in memory, the 16-lane load of 8-lane stores stalled).
            let at = {
                let (p, b) = (
                    here.as_ptr() as *const i64,
                    _mm512_set1_epi64(here[0] as i64),
                );
                let o0 = _mm512_maskz_loadu_epi64(lanes as u8, p);
                let o1 = _mm512_maskz_loadu_epi64((lanes >> 8) as u8, p.wrapping_add(8));
                let lo = _mm512_cvtepi64_epi32(_mm512_sub_epi64(o0, b));
                let hi = _mm512_cvtepi64_epi32(_mm512_sub_epi64(o1, b));
                let at = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                _mm512_add_epi32(at, at)
            };
            for (r, &o) in here.iter().enumerate() {
                // The rows are scattered (one head's row of each slot), so the hardware
                // prefetchers do not see them coming: ask for the K row PF_ROWS ahead, and
                // for this row's V, which the weighted sum reads next.
                if let Some(&ahead) = offs.get(j0 + r + PF_ROWS) {
                    prefetch_row(k.add(ahead), row);
                }
                prefetch_row(v.add(o), row);
            }
            let base = kb.add(2 * here[0]);
            let gather = |byte: usize| gather16(base.add(byte), at, lanes);
            let mut score = [_mm512_setzero_ps(); H];
            let mut pair = _mm512_setzero_si512();
            for b in 0..blocks {
                // Block b's scale in each row (an f16 pair holds blocks 2c and 2c + 1, one
                // gather for both).
                let bits = if b % 2 == 0 {
                    pair = gather(4 * (b / 2));
                    pair
                } else {
                    _mm512_srli_epi32::<16>(pair)
                };
                let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(bits));
                // Two sums per head (low nibbles, high), added at the end: chains of 4
                // dependent `vpdpbusd` instead of 8. (Integers: the sum is the same.)
                let mut acc = [[_mm512_setzero_si512(); 2]; H];
                for (h, a) in acc.iter_mut().enumerate() {
                    a[0] = start[h][b];
                }
                for t in 0..4 {
                    let x = gather(2 * blocks + 16 * b + 4 * t);
                    let lo = _mm512_shuffle_epi8(lut, _mm512_and_si512(x, low));
                    let hi =
                        _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16::<4>(x), low));
                    for (h, a) in acc.iter_mut().enumerate() {
                        a[0] = _mm512_dpbusd_epi32(a[0], lo, _mm512_set1_epi32(qw[h][b][t]));
                        a[1] = _mm512_dpbusd_epi32(a[1], hi, _mm512_set1_epi32(qw[h][b][4 + t]));
                    }
                }
                for (sc, a) in score.iter_mut().zip(&acc) {
                    let a = _mm512_add_epi32(a[0], a[1]);
                    *sc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), d, *sc);
                }
            }
            for (h, sc) in score.iter().enumerate() {
                let s = _mm512_mul_ps(*sc, _mm512_set1_ps(scale * qd[h]));
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(h * n + j0), lanes, s);
                // (`max(s, m)` is `m` where `s` is NaN: passed over, as `max_avx2` does.)
                most[h] = _mm512_mask_max_ps(most[h], lanes, s, most[h]);
            }
        }
        for (t, m) in top.iter_mut().zip(&most) {
            *t = _mm512_reduce_max_ps(*m);
        }
    }
}

/// `acc + Σ pairs a·b` (`vpdpwssd`) as one instruction: LLVM lowers the intrinsic to
/// `vpmaddwd` and `vpaddd`, two, which made the integer weighted sum no faster than the f32
/// one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn dpwssd(
    acc: std::arch::x86_64::__m512i,
    a: std::arch::x86_64::__m512i,
    b: std::arch::x86_64::__m512i,
) -> std::arch::x86_64::__m512i {
    let mut acc = acc;
    // SAFETY: register operands only; the caller's CPU has AVX512-VNNI (target feature).
    unsafe {
        std::arch::asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// Rows [`weighted_sum_q4`] sums in integers before it scales: `256 · 2 · 127 · 32767 / 2`
/// stays below 2^31.
const V16_ROWS: usize = 256;

/// [`crate::kv_cache::Q4_LEVELS`] plus `bias`, as bytes in each 128-bit lane of a register
/// (the table `vpshufb` looks the nibbles up in).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma,f16c")]
#[inline]
unsafe fn levels_lut(bias: i16) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let mut t = [0u8; 16];
    for (t, &l) in t.iter_mut().zip(&crate::kv_cache::Q4_LEVELS) {
        *t = (i16::from(l) + bias) as u8;
    }
    unsafe { _mm512_broadcast_i32x4(_mm_loadu_si128(t.as_ptr() as *const __m128i)) }
}

/// [`weighted_sum64`] for q4_0 rows by integer products (`vpdpwssd`), for 256 rows
/// ([`V16_ROWS`]) at a time: each head's weight times each row's block scale, `u = w·d`, is
/// rounded to int16 against the largest of the 256 (`u ≈ σ · ui`, `σ = max |u| / 32767`),
/// two rows' levels are looked up as int16 pairs (`vpermw`), and each head's 64 columns of the
/// two rows are four instructions; each head's sum is then scaled by `post[h]` (the softmax's
/// `1/Σ`, [`softmax_q4`]). The integer sums are exact, so the one rounding is `ui`'s:
/// at most `σ/2` a weight, 2^-16 of the largest, where the f16 cache rounds each value to
/// 2^-11 and q4_0 to a sixteenth of its block's range. A head's result depends only on its
/// own weights (a zero weight adds exactly nothing and leaves `σ` alone, so a head that sees
/// a prefix of the rows gets what it gets over the prefix alone). Rows are bounds-checked by
/// the caller.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn weighted_sum_q4<const H: usize>(
    w: &[f32],
    v: *const u16,
    offs: &[usize],
    hd: usize,
    s: usize,
    post: &[f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = offs.len();
    assert!(w.len() >= H * n && out.len() >= (H - 1) * hd + 64 * (s + 1) && post.len() >= H);
    unsafe {
        // The 16 levels as int16, twice; word k of a (row a, row b) pair of blocks goes to
        // word 2k, row b's to word 2k + 1.
        let table = {
            let mut t = [0i16; 32];
            for (i, t) in t.iter_mut().enumerate() {
                *t = i16::from(crate::kv_cache::Q4_LEVELS[i % 16]);
            }
            _mm512_loadu_si512(t.as_ptr() as *const __m512i)
        };
        let pairs = {
            let mut t = [0i16; 32];
            for (i, t) in t.iter_mut().enumerate() {
                *t = (i / 2 + 16 * (i % 2)) as i16;
            }
            _mm512_loadu_si512(t.as_ptr() as *const __m512i)
        };
        let mut total = [[_mm512_setzero_ps(); 4]; H];
        for j0 in (0..n).step_by(V16_ROWS) {
            let m = (n - j0).min(V16_ROWS);
            let rows = &offs[j0..j0 + m];
            // The rows' two block scales (an f16 pair; a missing row's are zero), then as f32:
            // once for all the heads.
            let mut dr = [0u32; V16_ROWS];
            for (d, &o) in dr.iter_mut().zip(rows) {
                *d = (v.add(o + 2 * s) as *const u32).read_unaligned();
            }
            let mut df = [[0f32; V16_ROWS]; 2];
            for j in (0..m).step_by(16) {
                let two = _mm512_loadu_si512(dr.as_ptr().add(j) as *const __m512i);
                let (d0, d1) = (two, _mm512_srli_epi32::<16>(two));
                _mm512_storeu_ps(
                    df[0].as_mut_ptr().add(j),
                    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(d0)),
                );
                _mm512_storeu_ps(
                    df[1].as_mut_ptr().add(j),
                    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(d1)),
                );
            }
            // ui[2h + b][j] and σ[h][b] for head h, block b (two blocks for up to 4 heads):
            // u = w·d once into `uf`, its largest magnitude on the way, then rounded.
            let mut ui = [[0i16; V16_ROWS]; 8];
            let mut sigma = [[0f32; 2]; H];
            let mut uf = [0f32; V16_ROWS];
            for h in 0..H {
                let wh = w.as_ptr().add(h * n + j0);
                for b in 0..2 {
                    let mut mx = _mm512_setzero_ps();
                    for j in (0..m).step_by(16) {
                        let wj = if j + 16 <= m {
                            _mm512_loadu_ps(wh.add(j))
                        } else {
                            _mm512_maskz_loadu_ps((u32::MAX >> (32 - (m - j))) as u16, wh.add(j))
                        };
                        let u = _mm512_mul_ps(wj, _mm512_loadu_ps(df[b].as_ptr().add(j)));
                        _mm512_storeu_ps(uf.as_mut_ptr().add(j), u);
                        mx = _mm512_max_ps(mx, _mm512_abs_ps(u));
                    }
                    let amax = _mm512_reduce_max_ps(mx);
                    sigma[h][b] = amax / 32767.0;
                    let inv = _mm512_set1_ps(if amax > 0.0 { 32767.0 / amax } else { 0.0 });
                    for j in (0..m).step_by(16) {
                        let u = _mm512_loadu_ps(uf.as_ptr().add(j));
                        let i = _mm512_cvtps_epi32(_mm512_mul_ps(u, inv));
                        let at = ui[2 * h + b].as_mut_ptr().add(j) as *mut __m256i;
                        _mm256_storeu_si256(at, _mm512_cvtsepi32_epi16(i));
                    }
                }
            }
            let mut acc = [[_mm512_setzero_si512(); 4]; H];
            for j in (0..m).step_by(2) {
                // A missing second row takes the first's values at weight zero (`ui` is zero
                // past `m`).
                let (a, b) = (rows[j], rows.get(j + 1).copied().unwrap_or(rows[j]));
                let (qa, qb) = (
                    v.add(a + hd / QK) as *const u8,
                    v.add(b + hd / QK) as *const u8,
                );
                // Per block: the two rows' 16 bytes as words side by side, paired (a, b) per
                // dword, then each nibble looked up as its int16 level by `vpermw` (it reads
                // the low 5 bits of each word: `table` holds the 16 levels twice). `p[2c]`
                // holds block c's columns 0..16, `p[2c + 1]` its 16..32.
                let mut p = [_mm512_setzero_si512(); 4];
                for c in 0..2 {
                    let at = 32 * s + 16 * c;
                    let x = _mm256_inserti128_si256::<1>(
                        _mm256_castsi128_si256(_mm_loadu_si128(qa.add(at) as *const __m128i)),
                        _mm_loadu_si128(qb.add(at) as *const __m128i),
                    );
                    let w = _mm512_permutexvar_epi16(pairs, _mm512_cvtepu8_epi16(x));
                    p[2 * c] = _mm512_permutexvar_epi16(w, table);
                    p[2 * c + 1] = _mm512_permutexvar_epi16(_mm512_srli_epi16::<4>(w), table);
                }
                for (h, acc) in acc.iter_mut().enumerate() {
                    let pair = |b: usize| {
                        let at = ui[2 * h + b].as_ptr().add(j) as *const i32;
                        _mm512_set1_epi32(at.read_unaligned())
                    };
                    let (w0, w1) = (pair(0), pair(1));
                    acc[0] = dpwssd(acc[0], p[0], w0);
                    acc[1] = dpwssd(acc[1], p[1], w0);
                    acc[2] = dpwssd(acc[2], p[2], w1);
                    acc[3] = dpwssd(acc[3], p[3], w1);
                }
            }
            for ((t, a), sg) in total.iter_mut().zip(&acc).zip(&sigma) {
                for (i, (t, a)) in t.iter_mut().zip(a).enumerate() {
                    let f = _mm512_mul_ps(_mm512_cvtepi32_ps(*a), _mm512_set1_ps(sg[i / 2]));
                    *t = _mm512_add_ps(*t, f);
                }
            }
        }
        for (h, t) in total.iter().enumerate() {
            let post = _mm512_set1_ps(post[h]);
            for (c, t) in t.iter().enumerate() {
                let t = _mm512_mul_ps(*t, post);
                _mm512_storeu_ps(out.as_mut_ptr().add(h * hd + 64 * s + 16 * c), t);
            }
        }
    }
}

/// `out_h[64·s..][..64] = Σ_j w_h[j] · V_j[64·s..][..64]` for `H` heads (`w_h` at `w[h·n..]`,
/// `out_h` at `out[h·hd..]`) over the rows `V_j` at `v + offs[j]` ([`deq64`]), the `4·H`
/// accumulators in registers. Rows are bounds-checked by the caller.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma,f16c")]
unsafe fn weighted_sum64<const KIND: u8, const H: usize>(
    w: &[f32],
    v: *const u16,
    offs: &[usize],
    hd: usize,
    s: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = offs.len();
    assert!(w.len() >= H * n && out.len() >= (H - 1) * hd + 64 * (s + 1));
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 4]; H];
        for (j, &o) in offs.iter().enumerate() {
            let z = deq64::<KIND>(v.add(o), hd, s);
            for (h, a) in acc.iter_mut().enumerate() {
                let wj = _mm512_set1_ps(*w.get_unchecked(h * n + j));
                for (ac, &zc) in a.iter_mut().zip(&z) {
                    *ac = _mm512_fmadd_ps(wj, zc, *ac);
                }
            }
        }
        for (h, a) in acc.iter().enumerate() {
            for (c, ac) in a.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(h * hd + 64 * s + 16 * c), *ac);
            }
        }
    }
}

/// `out[h·n + j] = scale · q_h · K_j` for the `H` query heads at `q` (back to back) and the
/// K rows at `k + offs[j]` (`n = offs.len()`), in their stored format: f16 rows 8 values at a
/// time, quantized ones a block (32) at a time with its scale applied to the dequantized
/// values once for all `H` heads. A head's arithmetic does not depend on `H`. Rows are
/// bounds-checked by the caller.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_block<const KIND: u8, const H: usize>(
    q: *const f32,
    k: *const u16,
    offs: &[usize],
    hd: usize,
    scale: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = offs.len();
    assert!(out.len() >= H * n);
    let step = if KIND == F16 { 8 } else { QK };
    unsafe {
        for (j, &o) in offs.iter().enumerate() {
            let kr = k.add(o);
            let mut acc = [_mm256_setzero_ps(); H];
            for c0 in (0..hd).step_by(step) {
                let d = if KIND == F16 {
                    _mm256_set1_ps(1.0)
                } else {
                    block_scale(kr, c0 / QK)
                };
                for c in (c0..c0 + step).step_by(8) {
                    let raw = raw8::<KIND>(kr, hd, c);
                    let kv = if KIND == F16 {
                        raw
                    } else {
                        _mm256_mul_ps(d, raw)
                    };
                    for (h, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(h * hd + c)), kv, *a);
                    }
                }
            }
            for (h, a) in acc.iter().enumerate() {
                let s = _mm_add_ps(_mm256_castps256_ps128(*a), _mm256_extractf128_ps(*a, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                out[h * n + j] = _mm_cvtss_f32(s) * scale;
            }
        }
    }
}

/// `out_h[c0..][..8·C] = Σ_j w_h[j] · V_j[c0..][..8·C]` for `H` heads (`w_h` at `w[h·n..]`,
/// `out_h` at `out[h·hd..]`, `n = offs.len()`) over the rows `V_j` at `offs[j]`, the `H·C`
/// accumulators in registers; for quantized rows the `8·C ≤ 16` columns lie in one block and
/// `w_h[j]` is folded into its scale. A head's arithmetic does not depend on `H`. Rows are
/// bounds-checked by the caller.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum<const KIND: u8, const H: usize, const C: usize>(
    w: &[f32],
    v: &[u16],
    offs: &[usize],
    hd: usize,
    c0: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = offs.len();
    assert!(w.len() >= H * n && out.len() >= (H - 1) * hd + c0 + 8 * C);
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); C]; H];
        for (j, &o) in offs.iter().enumerate() {
            let vr = v.as_ptr().add(o);
            let mut raw = [_mm256_setzero_ps(); C];
            for (c, r) in raw.iter_mut().enumerate() {
                *r = raw8::<KIND>(vr, hd, c0 + 8 * c);
            }
            let d = if KIND == F16 {
                _mm256_set1_ps(1.0)
            } else {
                block_scale(vr, c0 / QK)
            };
            for (h, a) in acc.iter_mut().enumerate() {
                let ws = _mm256_set1_ps(*w.get_unchecked(h * n + j));
                let coef = if KIND == F16 {
                    ws
                } else {
                    _mm256_mul_ps(ws, d)
                };
                for (ac, &r) in a.iter_mut().zip(&raw) {
                    *ac = _mm256_fmadd_ps(coef, r, *ac);
                }
            }
        }
        for (h, a) in acc.iter().enumerate() {
            for (c, ac) in a.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(h * hd + c0 + 8 * c), *ac);
            }
        }
    }
}

/// The gate activation of a gated feed-forward block: `out[i] = act(gate[i]) · up[i]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Glu {
    /// SwiGLU (Llama, Qwen, Mistral, Phi-3): `silu(g) = g / (1 + e^(-g))`.
    Silu,
    /// GeGLU (Gemma): GELU with the tanh approximation, as Gemma was trained and ggml's `gelu`
    /// computes, `0.5·g·(1 + tanh(u)) = g / (1 + e^(-2u))`, `u = √(2/π)·(g + 0.044715·g³)`.
    GeluTanh,
}

impl Glu {
    /// The activation on one value (the reference the vector kernel is held to).
    pub fn act(self, g: f32) -> f32 {
        match self {
            Glu::Silu => g / (1.0 + (-g).exp()),
            Glu::GeluTanh => {
                const SQRT_2_OVER_PI: f32 = 0.797_884_6;
                0.5 * g * (1.0 + (SQRT_2_OVER_PI * (g + 0.044_715 * g * g * g)).tanh())
            }
        }
    }
}

/// `out[i] = act(gate[i]) · up[i]`.
pub fn glu(kind: Glu, gate: &[f32], up: &[f32], out: &mut [f32]) {
    debug_assert!(gate.len() == out.len() && up.len() == out.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2+FMA checked; the function reads and writes whole 8-lanes in bounds.
        done = unsafe {
            match kind {
                Glu::Silu => glu_avx2::<false>(gate, up, out),
                Glu::GeluTanh => glu_avx2::<true>(gate, up, out),
            }
        };
    }
    for ((o, &g), &u) in out[done..].iter_mut().zip(&gate[done..]).zip(&up[done..]) {
        *o = kind.act(g) * u;
    }
}

/// The 8-lane part of [`glu`] (`GELU` picks GeGLU over SwiGLU); returns how many elements it
/// wrote. Both are `g / (1 + e^(-z))`: `z = g` for SiLU, `z = 2u` for GELU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn glu_avx2<const GELU: bool>(gate: &[f32], up: &[f32], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let n = out.len() / 8 * 8;
    let one = _mm256_set1_ps(1.0);
    // e^88 is finite; beyond it g / (1 + e^-z) is 0 to f32 precision anyway.
    let hi = _mm256_set1_ps(88.0);
    let (c1, c3) = (
        _mm256_set1_ps(2.0 * 0.797_884_6),
        _mm256_set1_ps(2.0 * 0.797_884_6 * 0.044_715),
    );
    unsafe {
        for i in (0..n).step_by(8) {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let u = _mm256_loadu_ps(up.as_ptr().add(i));
            let z = if GELU {
                // 2u = g·(2√(2/π) + 2√(2/π)·0.044715·g²)
                _mm256_mul_ps(g, _mm256_fmadd_ps(c3, _mm256_mul_ps(g, g), c1))
            } else {
                g
            };
            let e = exp256(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), z), hi));
            let a = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(a, u));
        }
    }
    n
}

/// `x[i] = exp(x[i] - max)` in place; returns the sum. Inputs at or below `max` (softmax).
pub fn exp_sub_sum(x: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: features checked above.
        return unsafe { exp_sub_sum_avx2(x, max) };
    }
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    sum
}

/// ln 2 in two parts (high, low) for the exps' range reduction `r = x − n·ln2`.
const EXP_LN2: [f32; 2] = [0.693_145_75, 1.428_606_8e-6];

/// The exps' polynomial on `r`, highest power first (Horner), before its `r² · p + r + 1`.
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// exp on 8 lanes for arguments in [-87, 0]: 2^n · p(r) with r = x - n·ln2, |r| ≤ ln2/2, and a
/// degree-6 polynomial (relative error < 2e-7, like Cephes' expf).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp256(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2[0]), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2[1]), r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let r2 = _mm256_mul_ps(r, r);
    let p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    let e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_mul_ps(p, _mm256_castsi256_ps(e))
}

/// The largest of `x` (NaNs ignored; `-inf` if none), as `x.iter().fold(-inf, f32::max)`
/// gives it, 8 lanes at a time (the fold did not vectorize, 3% of the q4_0 kernel's time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn max_avx2(x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        // `max_ps(a, b)` is `b` when `a` is NaN: a NaN score is passed over, as by the fold.
        acc = _mm256_max_ps(unsafe { _mm256_loadu_ps(c.as_ptr()) }, acc);
    }
    let mut lanes = [0f32; 8];
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    lanes
        .iter()
        .chain(chunks.remainder())
        .fold(f32::NEG_INFINITY, |a, &x| a.max(x))
}

/// `exp256` on 16 lanes: the same operations lane for lane, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma")]
unsafe fn exp512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2[0]), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2[1]), r);
    let mut p = _mm512_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    let r2 = _mm512_mul_ps(r, r);
    let p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(n),
        _mm512_set1_epi32(127),
    ));
    _mm512_mul_ps(p, _mm512_castsi512_ps(e))
}

/// [`exp_sub_sum_avx2`]'s first `16·k` values by [`exp512`], summed into its 8 lanes in its
/// order (each 16's low half, then its high half): the same bits at half the exps' cost.
/// Returns the 8 lanes and how many values it took.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma")]
unsafe fn exp_sub_sum16(x: &mut [f32], max: f32) -> (std::arch::x86_64::__m256, usize) {
    use std::arch::x86_64::*;
    let m = _mm512_set1_ps(max);
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    let p = x.as_mut_ptr();
    unsafe {
        while i + 16 <= x.len() {
            let v = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), m));
            _mm512_storeu_ps(p.add(i), v);
            acc = _mm256_add_ps(acc, _mm512_castps512_ps256(v));
            acc = _mm256_add_ps(acc, _mm512_extractf32x8_ps::<1>(v));
            i += 16;
        }
    }
    (acc, i)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_sum_avx2(x: &mut [f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    let m = _mm256_set1_ps(max);
    let (mut acc, mut i) = if has_avx512() {
        // SAFETY: the CPU has AVX-512 (checked).
        unsafe { exp_sub_sum16(x, max) }
    } else {
        (_mm256_setzero_ps(), 0)
    };
    let p = x.as_mut_ptr();
    unsafe {
        while i + 8 <= x.len() {
            let v = exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m));
            _mm256_storeu_ps(p.add(i), v);
            acc = _mm256_add_ps(acc, v);
            i += 8;
        }
    }
    let mut sum = {
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    };
    for v in &mut x[i..] {
        *v = (*v - max).exp();
        sum += *v;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    unsafe {
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                acc1,
            );
            i += 16;
        }
        if i < n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        }
    }
    let v = _mm256_add_ps(acc0, acc1);
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn _load_f32(p: *const f32) -> std::arch::x86_64::__m256 {
    unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn _load_f16(p: *const u16) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
}

/// The four-token form of `dot_avx2` / `dot_f16_avx2`: per token the same two accumulators,
/// the same steps and the same reduction, so each result equals the one-token kernel's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_avx2<T>(
    a: [&[f32]; 4],
    w: *const T,
    load: impl Fn(*const T) -> std::arch::x86_64::__m256,
) -> [f32; 4] {
    use std::arch::x86_64::*;
    let n = a[0].len();
    let pa = a.map(|x| x.as_ptr());
    let mut acc0 = [_mm256_setzero_ps(); 4];
    let mut acc1 = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    unsafe {
        while i + 16 <= n {
            let (w0, w1) = (load(w.add(i)), load(w.add(i + 8)));
            for t in 0..4 {
                acc0[t] = _mm256_fmadd_ps(_mm256_loadu_ps(pa[t].add(i)), w0, acc0[t]);
                acc1[t] = _mm256_fmadd_ps(_mm256_loadu_ps(pa[t].add(i + 8)), w1, acc1[t]);
            }
            i += 16;
        }
        if i < n {
            let w0 = load(w.add(i));
            for t in 0..4 {
                acc0[t] = _mm256_fmadd_ps(_mm256_loadu_ps(pa[t].add(i)), w0, acc0[t]);
            }
        }
    }
    let mut out = [0f32; 4];
    for t in 0..4 {
        let v = _mm256_add_ps(acc0[t], acc1[t]);
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        out[t] = _mm_cvtss_f32(s);
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_avx2(a: &[f32], w: &[u16]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pw) = (a.as_ptr(), w.as_ptr());
    let wide = |p: *const u16| unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) };
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    unsafe {
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), wide(pw.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), wide(pw.add(i + 8)), acc1);
            i += 16;
        }
        if i < n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), wide(pw.add(i)), acc0);
        }
    }
    let v = _mm256_add_ps(acc0, acc1);
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(y: &mut [f32], a: f32, x: &[f32]) {
    use std::arch::x86_64::*;
    let av = _mm256_set1_ps(a);
    let (py, px) = (y.as_mut_ptr(), x.as_ptr());
    let mut i = 0;
    unsafe {
        while i + 8 <= x.len() {
            let v = _mm256_fmadd_ps(av, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), v);
            i += 8;
        }
    }
}

/// The statistics of one q4_0 KV block `x` (32 values) quantized at each inverse scale of
/// `is`: each value `t = x_j · is` goes to the level of [`crate::kv_cache::Q4_LEVELS`] whose
/// interval holds it (index = how many of the 15 midpoints [`crate::kv_cache::Q4_MIDS`] lie
/// below `t`), and `out[c] = [Σ x_j·l_j, Σ l_j²]` for `is[c]`, the sums taken in one fixed
/// order whatever the kernel ([`q4_sum`]). With `q`, the indices at the last scale of `is` too, byte `j` holding
/// element `j` in its low nibble and element `j + 16` in its high one. [`crate::kv_cache`]'s
/// scale search calls it for every K and V row a token writes.
pub(crate) fn q4_stats(
    x: &[f32; QK],
    is: &[f32],
    out: &mut [[f32; 2]],
    q: Option<&mut [u8; QK / 2]>,
) {
    assert!(out.len() >= is.len() && !is.is_empty());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            // SAFETY: the CPU has the features (checked).
            return unsafe { q4_stats_avx512(x, is, out, q) };
        }
        if has_avx2() {
            // SAFETY: as above.
            return unsafe { q4_stats_avx2(x, is, out, q) };
        }
    }
    q4_stats_scalar(x, is, out, q)
}

/// The signature of the [`q4_stats`] kernels.
#[cfg(test)]
type Q4StatsFn = fn(&[f32; QK], &[f32], &mut [[f32; 2]], Option<&mut [u8; QK / 2]>);

/// The order [`q4_stats`] sums in, from the 16 pair sums `p_j = x_j·l_j + x_{j+16}·l_{j+16}`
/// (each product rounded, then the sum): halves added lane by lane (`p_j + p_{j+8}`), then
/// again (`+4`, `+2`, `+1`), as a 16-lane register folds down.
fn q4_sum(p: &[f32; 16]) -> f32 {
    let s8: [f32; 8] = std::array::from_fn(|i| p[i] + p[i + 8]);
    let s4: [f32; 4] = std::array::from_fn(|i| s8[i] + s8[i + 4]);
    let s2: [f32; 2] = std::array::from_fn(|i| s4[i] + s4[i + 2]);
    s2[0] + s2[1]
}

/// [`q4_stats`] one value at a time.
fn q4_stats_scalar(
    x: &[f32; QK],
    is: &[f32],
    out: &mut [[f32; 2]],
    mut q: Option<&mut [u8; QK / 2]>,
) {
    let (lv, mids) = (&crate::kv_cache::Q4_LEVELS, &crate::kv_cache::Q4_MIDS[..15]);
    for (&is, o) in is.iter().zip(out.iter_mut()) {
        let idx: [usize; QK] = std::array::from_fn(|j| {
            let t = x[j] * is;
            mids.iter().map(|&b| usize::from(b < t)).sum()
        });
        let l = |j: usize| f32::from(lv[idx[j]]);
        let xl: [f32; 16] = std::array::from_fn(|j| x[j] * l(j) + x[j + 16] * l(j + 16));
        let ll: [f32; 16] = std::array::from_fn(|j| l(j) * l(j) + l(j + 16) * l(j + 16));
        if let Some(q) = q.as_deref_mut() {
            for (j, b) in q.iter_mut().enumerate() {
                *b = idx[j] as u8 | (idx[j + 16] as u8) << 4;
            }
        }
        *o = [q4_sum(&xl), q4_sum(&ll)];
    }
}

/// [`q4_sum`] of the 16 lanes of `p`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn q4_sum8x2(lo: std::arch::x86_64::__m256, hi: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s8 = _mm256_add_ps(lo, hi);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)))
}

/// [`q4_stats`] 16 values a register: each value's level index found by a binary search over
/// the midpoints (four `vpermps` lookups and compares), its level by one more lookup.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma,f16c")]
unsafe fn q4_stats_avx512(
    x: &[f32; QK],
    is: &[f32],
    out: &mut [[f32; 2]],
    q: Option<&mut [u8; QK / 2]>,
) {
    use std::arch::x86_64::*;
    unsafe {
        let lv = _mm512_loadu_ps(Q4_LEVELS_F32.as_ptr());
        let mv = _mm512_loadu_ps(crate::kv_cache::Q4_MIDS.as_ptr());
        let xv = [
            _mm512_loadu_ps(x.as_ptr()),
            _mm512_loadu_ps(x.as_ptr().add(16)),
        ];
        let mut idx = [_mm512_setzero_si512(); 2];
        for (&is, o) in is.iter().zip(out.iter_mut()) {
            let s = _mm512_set1_ps(is);
            let mut l = [_mm512_setzero_ps(); 2];
            for h in 0..2 {
                let t = _mm512_mul_ps(xv[h], s);
                // idx = how many midpoints lie below t: take each power of two while the
                // midpoint it would step past (Q4_MIDS[idx + step − 1]) lies below t.
                let mut i = _mm512_setzero_si512();
                for step in [8, 4, 2, 1] {
                    let probe = _mm512_add_epi32(i, _mm512_set1_epi32(step - 1));
                    let below =
                        _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_permutexvar_ps(probe, mv), t);
                    i = _mm512_mask_add_epi32(i, below, i, _mm512_set1_epi32(step));
                }
                idx[h] = i;
                l[h] = _mm512_permutexvar_ps(i, lv);
            }
            let xl = _mm512_add_ps(_mm512_mul_ps(xv[0], l[0]), _mm512_mul_ps(xv[1], l[1]));
            let ll = _mm512_add_ps(_mm512_mul_ps(l[0], l[0]), _mm512_mul_ps(l[1], l[1]));
            // (No closure for the halves: closures do not take this function's features.)
            let (xl0, xl1) = (
                _mm512_castps512_ps256(xl),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(xl))),
            );
            let (ll0, ll1) = (
                _mm512_castps512_ps256(ll),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(ll))),
            );
            *o = [q4_sum8x2(xl0, xl1), q4_sum8x2(ll0, ll1)];
        }
        if let Some(q) = q {
            let b = _mm512_cvtepi32_epi8(_mm512_or_si512(idx[0], _mm512_slli_epi32::<4>(idx[1])));
            _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, b);
        }
    }
}

/// [`q4_stats`] 8 values a register: 15 compares count each value's midpoints below it; the
/// 16-level lookup is two `vpermps` and a blend on the index's bit 3.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q4_stats_avx2(
    x: &[f32; QK],
    is: &[f32],
    out: &mut [[f32; 2]],
    q: Option<&mut [u8; QK / 2]>,
) {
    use std::arch::x86_64::*;
    unsafe {
        let (lv_lo, lv_hi) = (
            _mm256_loadu_ps(Q4_LEVELS_F32.as_ptr()),
            _mm256_loadu_ps(Q4_LEVELS_F32.as_ptr().add(8)),
        );
        let mut xv = [_mm256_setzero_ps(); 4];
        for (c, v) in xv.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(x.as_ptr().add(8 * c));
        }
        let mut idx = [_mm256_setzero_si256(); 4];
        for (&is, o) in is.iter().zip(out.iter_mut()) {
            let s = _mm256_set1_ps(is);
            let mut l = [_mm256_setzero_ps(); 4];
            for c in 0..4 {
                let t = _mm256_mul_ps(xv[c], s);
                let mut i = _mm256_setzero_si256();
                for &b in &crate::kv_cache::Q4_MIDS[..15] {
                    let below = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_set1_ps(b), t);
                    // A true compare is all ones, -1 as an integer.
                    i = _mm256_sub_epi32(i, _mm256_castps_si256(below));
                }
                let hi = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(i));
                l[c] = _mm256_blendv_ps(
                    _mm256_permutevar8x32_ps(lv_lo, i),
                    _mm256_permutevar8x32_ps(lv_hi, i),
                    hi,
                );
                idx[c] = i;
            }
            // Pair sums j = 0..8 (elements j and j + 16), then j = 8..16.
            let (mut xl, mut ll) = ([_mm256_setzero_ps(); 2], [_mm256_setzero_ps(); 2]);
            for h in 0..2 {
                let (a, b) = (h, h + 2);
                xl[h] = _mm256_add_ps(_mm256_mul_ps(xv[a], l[a]), _mm256_mul_ps(xv[b], l[b]));
                ll[h] = _mm256_add_ps(_mm256_mul_ps(l[a], l[a]), _mm256_mul_ps(l[b], l[b]));
            }
            *o = [q4_sum8x2(xl[0], xl[1]), q4_sum8x2(ll[0], ll[1])];
        }
        if let Some(q) = q {
            for h in 0..2 {
                let b = _mm256_or_si256(idx[h], _mm256_slli_epi32::<4>(idx[h + 2]));
                let mut w = [0u32; 8];
                _mm256_storeu_si256(w.as_mut_ptr() as *mut __m256i, b);
                for (k, &v) in w.iter().enumerate() {
                    q[8 * h + k] = v as u8;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::AttendKernel;
    use crate::kv_cache::{dequantize_row, quantize_row, KvLayer, KvType, KV_TYPES};

    fn f16s(x: &[f32]) -> Vec<u16> {
        let mut out = vec![0u16; x.len()];
        super::to_f16(x, &mut out);
        out
    }

    #[test]
    fn glu_kernels_match_the_formulas() {
        let gate: Vec<f32> = (0..203).map(|i| (i as f32 - 100.0) * 0.97).collect();
        let up: Vec<f32> = (0..203).map(|i| (i as f32 * 0.3).sin()).collect();
        let mut out = vec![0.0; 203];
        super::glu(super::Glu::Silu, &gate, &up, &mut out);
        for ((o, &g), &u) in out.iter().zip(&gate).zip(&up) {
            let want = (f64::from(g) / (1.0 + (-f64::from(g)).exp()) * f64::from(u)) as f32;
            assert!(
                (o - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "silu {g}: {o} vs {want}"
            );
        }
        // Small gates too, where GELU's curve bends.
        let gate: Vec<f32> = (0..203).map(|i| (i as f32 - 100.0) * 0.07).collect();
        super::glu(super::Glu::GeluTanh, &gate, &up, &mut out);
        for ((o, &g), &u) in out.iter().zip(&gate).zip(&up) {
            let g = f64::from(g);
            let t = ((2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g)).tanh();
            let want = (0.5 * g * (1.0 + t) * f64::from(u)) as f32;
            assert!(
                (o - want).abs() <= 2e-6 * want.abs().max(1e-3),
                "gelu {g}: {o} vs {want}"
            );
        }
    }

    #[test]
    fn dot_and_axpy_match_scalar() {
        for n in [8, 16, 24, 64, 128] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((super::dot(&a, &b) - want).abs() < 1e-4);
            let mut e: Vec<f32> = a.iter().map(|v| v * 40.0 - 45.0).collect();
            let want_e: Vec<f32> = e.iter().map(|v| (v - 1.0).exp()).collect();
            let sum = super::exp_sub_sum(&mut e, 1.0);
            for (g, w) in e.iter().zip(&want_e) {
                assert!((g - w).abs() <= 1e-6 * w.abs() + 1e-30, "{g} vs {w}");
            }
            assert!((sum - want_e.iter().sum::<f32>()).abs() <= 1e-5 * sum);
            // attend: two rows, scores 0 and 1 → weights 1/(1+e), e/(1+e)
            // K and V are stored as f16: compare against the f16-rounded values.
            let r = |x: &[f32]| -> Vec<f32> {
                x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
            };
            let (a16, b16) = (r(&a), r(&b));
            let kk = f16s(&[vec![0.0; n], a.clone()].concat());
            let vv = f16s(&[b.clone(), a.clone()].concat());
            let q: Vec<f32> = a
                .iter()
                .map(|x| x / a.iter().map(|y| y * y).sum::<f32>())
                .collect();
            let (mut sc, mut o) = (Vec::new(), vec![0.0; n]);
            let layer = KvLayer::of_rows(KvType::F16, n, &kk, &vv);
            super::attend(&q, &layer, &[0, n], 1.0, &mut sc, &mut o);
            let s1: f32 = q.iter().zip(&a16).map(|(x, y)| x * y).sum();
            let e = s1.exp();
            for i in 0..n {
                let want = (b16[i] + e * a16[i]) / (1.0 + e);
                assert!((o[i] - want).abs() < 1e-4, "attend {i}: {} vs {want}", o[i]);
            }
            let mut y = b.clone();
            super::axpy(&mut y, 0.5, &a);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
            }
        }
    }

    /// The 16-lane exp gives `exp256`'s bits lane for lane, and `exp_sub_sum` (which takes it
    /// where the CPU has AVX-512) the 8-lane loop's sum, bit for bit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp_on_16_lanes_keeps_the_8_lane_bits() {
        use std::arch::x86_64::*;
        if !super::has_avx512() {
            eprintln!("no AVX-512 on this CPU: only the 8-lane exp runs here");
            return;
        }
        let all: Vec<f32> = (0..1003)
            .map(|i| {
                // Neighbouring 8s far apart in size, so the order of the sum shows in its bits.
                let t = ((i as f32) * 0.731).sin().abs();
                if i % 16 < 8 {
                    -t
                } else {
                    -9.0 - t
                }
            })
            .chain([-87.0, -87.5, -200.0, 0.0, -0.0, -1e-30, -86.9])
            .collect();
        // Every length, so that some sum's last bit shows a change in the order.
        for len in 1..=all.len() {
            let x = &all[all.len() - len..];
            let mut fast = x.to_vec();
            let sum = super::exp_sub_sum(&mut fast, 0.25);
            let mut slow = x.to_vec();
            let mut acc: f32;
            let mut lanes = [0f32; 8];
            // SAFETY: AVX-512 (so AVX2 and FMA) checked above; whole 8-lanes in bounds.
            unsafe {
                let mut a = _mm256_setzero_ps();
                let m = _mm256_set1_ps(0.25);
                let mut i = 0;
                while i + 8 <= slow.len() {
                    let p = slow.as_mut_ptr().add(i);
                    let v = super::exp256(_mm256_sub_ps(_mm256_loadu_ps(p), m));
                    _mm256_storeu_ps(p, v);
                    a = _mm256_add_ps(a, v);
                    i += 8;
                }
                _mm256_storeu_ps(lanes.as_mut_ptr(), a);
                let l = &lanes;
                acc = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
                for v in &mut slow[i..] {
                    *v = (*v - 0.25).exp();
                    acc += *v;
                }
            }
            assert_eq!(fast, slow, "{len} values");
            assert_eq!(sum.to_bits(), acc.to_bits(), "{len} values: {sum} vs {acc}");
        }
    }

    /// A group of query heads attends exactly as each head alone would, in f64 over the
    /// dequantized rows: the vectorized kernel and the scalar one, for every KV type.
    #[test]
    fn grouped_attention_matches_one_head_at_a_time() {
        for kind in KV_TYPES {
            for (hd, g, rows) in [
                (64, 1, 5),
                (64, 3, 37),
                (32, 4, 1),
                (128, 8, 70),
                (256, 2, 9),
                (40, 3, 9),
                (64, 9, 3),
                // More rows than the int16 weighted sum takes at once.
                (64, 3, 300),
            ] {
                if kind != KvType::F16 && hd % 32 != 0 {
                    continue;
                }
                let f = |i: usize, a: f32| ((i as f32) * a).sin() * (1.0 + (i % 5) as f32);
                let q: Vec<f32> = (0..g * hd).map(|i| f(i, 0.31)).collect();
                let ru = kind.row_units(hd);
                let quant = |a: f32| -> (Vec<u16>, Vec<f32>) {
                    let x: Vec<f32> = (0..rows * hd).map(|i| f(i, a)).collect();
                    let mut st = vec![0u16; rows * ru];
                    let mut back = vec![0.0; rows * hd];
                    for r in 0..rows {
                        quantize_row(kind, &x[r * hd..][..hd], &mut st[r * ru..][..ru]);
                        dequantize_row(kind, &st[r * ru..][..ru], &mut back[r * hd..][..hd]);
                    }
                    (st, back)
                };
                let (k16, k) = quant(0.17);
                let (v16, v) = quant(0.07);
                let layer = KvLayer::of_rows(kind, hd, &k16, &v16);
                // Rows out of order, as a block table would give them.
                let order: Vec<usize> = (0..rows).rev().collect();
                let offs: Vec<usize> = order.iter().map(|r| r * ru).collect();
                let mut fast = vec![0.0; g * hd];
                super::attend(&q, &layer, &offs, 0.125, &mut Vec::new(), &mut fast);
                // Each vectorized kernel this CPU has, called directly (`attend` takes the best
                // one for the row type and head size, and gets its bits).
                let best = AttendKernel::pick(hd, g);
                let mut kernels = vec![("fast", fast, best.rounds_to_int(kind, hd))];
                for kernel in [AttendKernel::Avx2, AttendKernel::Avx512] {
                    if !kernel.fits(hd, g) {
                        continue;
                    }
                    let mut o = vec![0.0; g * hd];
                    let mut ml = vec![[0f32; 2]; g];
                    let (run, sc) = (kernel.function(kind), &mut Vec::new());
                    // SAFETY: the kernel fits this CPU (checked above).
                    unsafe { run(&q, &layer, &offs, &[], 0.125, sc, &mut o, &mut ml) };
                    if kernel == AttendKernel::pick(hd, g) {
                        assert_eq!(
                            o, kernels[0].1,
                            "{kind} hd={hd} g={g}: attend takes {kernel:?}"
                        );
                    }
                    let name = if kernel == AttendKernel::Avx2 {
                        "avx2"
                    } else {
                        "avx512"
                    };
                    kernels.push((name, o, kernel.rounds_to_int(kind, hd)));
                }
                let mut slow = vec![0.0; g * hd];
                let mut ml = vec![[0f32; 2]; g];
                super::attend_scalar(
                    &q,
                    &layer,
                    &offs,
                    &[],
                    0.125,
                    &mut Vec::new(),
                    &mut slow,
                    &mut ml,
                );
                kernels.push(("scalar", slow, false));
                // The queries a kernel that rounds them multiplies: `qd · qi`.
                let q8 = AttendKernel::Avx512.query_as_used(KvType::Q4_0, &q, hd);
                for (h, (name, got, rounds)) in (0..g)
                    .flat_map(|h| kernels.iter().map(move |k| (h, k)))
                    .map(|(h, (n, o, r))| (h, (*n, o, *r)))
                {
                    let qh = &(if rounds { &q8 } else { &q })[h * hd..(h + 1) * hd];
                    let sc: Vec<f64> = order
                        .iter()
                        .map(|&r| {
                            0.125
                                * qh.iter()
                                    .zip(&k[r * hd..(r + 1) * hd])
                                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                                    .sum::<f64>()
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                    // A kernel that rounds the weights times the block scales to int16 (each
                    // to within half a step, σ = max |w·d| / 32767 over the block's rows, 256
                    // at a time) may be off by up to Σ_j (σ/2)·|level| beside f32's noise.
                    let scale_of = |r: usize, c: usize| {
                        let bits = v16[r * ru + c / super::QK];
                        f64::from(half::f16::from_bits(bits).to_f32())
                    };
                    for d in 0..hd {
                        let (mut want, mut room) = (0f64, 0f64);
                        for part in order
                            .chunks(super::V16_ROWS)
                            .zip(sc.chunks(super::V16_ROWS))
                        {
                            let ws: Vec<f64> = part.1.iter().map(|x| (x - mx).exp() / z).collect();
                            let sigma = part
                                .0
                                .iter()
                                .zip(&ws)
                                .map(|(&r, w)| (w * scale_of(r, d)).abs() / 32767.0)
                                .fold(0.0, f64::max);
                            for (&r, w) in part.0.iter().zip(&ws) {
                                let x = f64::from(v[r * hd + d]);
                                want += w * x;
                                if rounds {
                                    room += sigma / 2.0 * (x / scale_of(r, d)).abs();
                                }
                            }
                        }
                        let e = (f64::from(got[h * hd + d]) - want).abs();
                        assert!(
                            e < 2e-5 * want.abs().max(1.0) + room,
                            "{kind} {name} hd={hd} g={g} head {h} dim {d}: {} vs {want}",
                            got[h * hd + d]
                        );
                    }
                }
            }
        }
    }

    /// Heads that see only the first rows of a pass (prompt tokens sharing a chunk) get bit
    /// for bit what each gets alone over its own rows: output and `[max, sum]`, for every KV
    /// type, on the kernel this CPU takes and on the scalar one.
    #[test]
    fn heads_seeing_a_prefix_get_their_bits_alone() {
        for kind in KV_TYPES {
            for (hd, seen) in [
                (64, vec![37, 20, 1]),
                (64, vec![16, 17, 15, 33, 33, 2]),
                (128, vec![5, 40, 40, 39]),
                (40, vec![9, 3, 8]),
            ] {
                if kind != KvType::F16 && hd % 32 != 0 {
                    continue;
                }
                let (g, rows) = (seen.len(), *seen.iter().max().expect("heads"));
                let f = |i: usize, a: f32| ((i as f32) * a).sin() * (1.0 + (i % 5) as f32);
                let q: Vec<f32> = (0..g * hd).map(|i| f(i, 0.31)).collect();
                let ru = kind.row_units(hd);
                let mut k16 = vec![0u16; rows * ru];
                let mut v16 = vec![0u16; rows * ru];
                for r in 0..rows {
                    let kx: Vec<f32> = (0..hd).map(|i| f(r * hd + i, 0.17)).collect();
                    let vx: Vec<f32> = (0..hd).map(|i| f(r * hd + i, 0.07)).collect();
                    quantize_row(kind, &kx, &mut k16[r * ru..][..ru]);
                    quantize_row(kind, &vx, &mut v16[r * ru..][..ru]);
                }
                let layer = KvLayer::of_rows(kind, hd, &k16, &v16);
                let offs: Vec<usize> = (0..rows).rev().map(|r| r * ru).collect();
                let kernels = [
                    AttendKernel::Avx512,
                    AttendKernel::Avx2,
                    AttendKernel::Scalar,
                ];
                for kernel in kernels.into_iter().filter(|k| k.fits(hd, g)) {
                    let run = kernel.function(kind);
                    let (mut o, mut ml) = (vec![0.0; g * hd], vec![[0f32; 2]; g]);
                    // SAFETY (both calls): the kernel fits this CPU (filtered above).
                    unsafe {
                        run(
                            &q,
                            &layer,
                            &offs,
                            &seen,
                            0.125,
                            &mut Vec::new(),
                            &mut o,
                            &mut ml,
                        )
                    };
                    for (h, &l) in seen.iter().enumerate() {
                        let (mut oh, mut mlh) = (vec![0.0; hd], vec![[0f32; 2]; 1]);
                        let (qh, sc) = (&q[h * hd..][..hd], &mut Vec::new());
                        unsafe { run(qh, &layer, &offs[..l], &[], 0.125, sc, &mut oh, &mut mlh) };
                        let got = &o[h * hd..][..hd];
                        assert_eq!(got, &oh[..], "{kind} {kernel:?} hd={hd} head {h} sees {l}");
                        assert_eq!(
                            ml[h], mlh[0],
                            "{kind} {kernel:?} hd={hd} head {h}: [max, sum]"
                        );
                    }
                }
            }
        }
    }

    /// Every q4_0 search kernel gives the scalar one's bits (the sums in [`super::q4_sum`]'s
    /// order, the indices exact), and the indices are the levels whose intervals hold the
    /// values, as a binary search over the midpoints finds them.
    #[test]
    fn q4_search_kernels_agree_bit_for_bit() {
        use crate::kv_cache::{Q4_LEVELS, QK};
        let lv = &Q4_LEVELS;
        let mids: [f32; 15] =
            std::array::from_fn(|i| 0.5 * (f32::from(lv[i]) + f32::from(lv[i + 1])));
        let mut g = crate::ops::tests::gaussian(7);
        let mut blocks: Vec<[f32; QK]> = (0..300).map(|_| std::array::from_fn(|_| g())).collect();
        // Outliers, ties on a midpoint, zeros, a constant block, a negative maximum.
        blocks[0][5] = 40.0;
        blocks[1] = [0.0; QK];
        blocks[2] = [1.5; QK];
        blocks[3][31] = -9.0;
        blocks[4] = std::array::from_fn(|j| mids[j % 15] / 100.0);
        let mut kernels: Vec<(&str, super::Q4StatsFn)> = vec![("scalar", super::q4_stats_scalar)];
        #[cfg(target_arch = "x86_64")]
        {
            if super::has_avx2() {
                kernels.push(("avx2", |x, is, o, q| unsafe {
                    super::q4_stats_avx2(x, is, o, q)
                }));
            }
            if super::has_avx512() {
                kernels.push(("avx512", |x, is, o, q| unsafe {
                    super::q4_stats_avx512(x, is, o, q)
                }));
            }
        }
        eprintln!(
            "q4_0 search kernels checked: {:?}",
            kernels.iter().map(|k| k.0).collect::<Vec<_>>()
        );
        for (b, x) in blocks.iter().enumerate() {
            let m = x
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let scales = [-134.0 / m, -127.0 / m, -120.0 / m, 100.0, 0.0];
            let mut want = [[0f32; 2]; 5];
            let mut want_q = [0u8; QK / 2];
            super::q4_stats_scalar(x, &scales, &mut want, Some(&mut want_q));
            for (j, &v) in x.iter().enumerate() {
                let i = mids.partition_point(|&b| b < v * scales[4]) as u8;
                let got = if j < 16 {
                    want_q[j] & 15
                } else {
                    want_q[j - 16] >> 4
                };
                assert_eq!(got, i, "block {b}, element {j}");
            }
            for (c, &is) in scales.iter().enumerate() {
                // One scale at a time gives the same sums and the same indices.
                let (mut one, mut q) = ([[0f32; 2]; 1], [0u8; QK / 2]);
                super::q4_stats_scalar(x, &[is], &mut one, Some(&mut q));
                assert_eq!(one[0].map(f32::to_bits), want[c].map(f32::to_bits));
                for (j, &v) in x.iter().enumerate() {
                    let i = mids.partition_point(|&b| b < v * is) as u8;
                    let got = if j < 16 { q[j] & 15 } else { q[j - 16] >> 4 };
                    assert_eq!(got, i, "block {b}, is {is}, element {j}");
                }
            }
            for (name, k) in &kernels {
                let (mut got, mut q) = ([[0f32; 2]; 5], [0u8; QK / 2]);
                k(x, &scales, &mut got, Some(&mut q));
                let bits = |v: &[[f32; 2]; 5]| v.map(|p| p.map(f32::to_bits));
                assert_eq!(bits(&got), bits(&want), "{name}, block {b}");
                assert_eq!(q, want_q, "{name}, block {b}");
                let mut again = [[0f32; 2]; 5];
                k(x, &scales, &mut again, None);
                assert_eq!(bits(&again), bits(&got), "{name}, block {b}");
            }
        }
    }
}
