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
/// unchecked), and `scores` holds `len` zeros.
fn start_rows(kv: &KvLayer, offs: &[usize], scores: &mut Vec<f32>, len: usize) {
    assert!(offs
        .iter()
        .all(|&o| o + kv.row <= kv.k.len() && o + kv.row <= kv.v.len()));
    scores.clear();
    scores.resize(len, 0.0);
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
        let mx = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        let l = unsafe { exp_sub_sum_avx2(row, mx) };
        *ml = [mx, l];
        let inv = 1.0 / l;
        row.iter_mut().for_each(|x| *x *= inv);
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
    start_rows(kv, offs, scores, g * n);
    let qp = q.as_ptr();
    unsafe {
        let rows = (k.as_ptr(), v.as_ptr(), kv.row);
        for h0 in (0..g).step_by(4) {
            let (qh, sc) = (qp.add(h0 * hd), &mut scores[h0 * n..]);
            match g - h0 {
                1 => scores16::<KIND, 1>(qh, rows, offs, hd, scale, sc),
                2 => scores16::<KIND, 2>(qh, rows, offs, hd, scale, sc),
                3 => scores16::<KIND, 3>(qh, rows, offs, hd, scale, sc),
                _ => scores16::<KIND, 4>(qh, rows, offs, hd, scale, sc),
            }
        }
        softmax_rows(scores, g, n, seen, ml);
        let vp = v.as_ptr();
        for h0 in (0..g).step_by(4) {
            let (w, o) = (&scores[h0 * n..], &mut out[h0 * hd..]);
            for s in 0..hd / 64 {
                match g - h0 {
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

/// Prefetch the `row` `u16`s at `p` into L1: every 64-byte line they touch.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_row(p: *const u16, row: usize) {
    use std::arch::x86_64::*;
    // (A plain loop: `(a..=b).step_by(64)` compiled to overflow checks that took a fifth of
    // the kernel's time at short context.)
    let (mut line, last) = (p as usize & !63, p.wrapping_add(row - 1) as usize);
    while line <= last {
        // SAFETY: a prefetch never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line as *const i8) };
        line += 64;
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
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let r2 = _mm256_mul_ps(r, r);
    let p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    let e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_mul_ps(p, _mm256_castsi256_ps(e))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_sum_avx2(x: &mut [f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    let m = _mm256_set1_ps(max);
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
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
                let mut kernels = vec![("fast", fast)];
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
                    kernels.push((
                        if kernel == AttendKernel::Avx2 {
                            "avx2"
                        } else {
                            "avx512"
                        },
                        o,
                    ));
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
                for h in 0..g {
                    let qh = &q[h * hd..(h + 1) * hd];
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
                    for d in 0..hd {
                        let want: f64 = order
                            .iter()
                            .zip(&sc)
                            .map(|(&r, x)| (x - mx).exp() / z * f64::from(v[r * hd + d]))
                            .sum();
                        for (name, got) in kernels
                            .iter()
                            .map(|(n, o)| (*n, o))
                            .chain([("scalar", &slow)])
                        {
                            let e = (f64::from(got[h * hd + d]) - want).abs();
                            assert!(
                                e < 2e-5 * want.abs().max(1.0),
                                "{kind} {name} hd={hd} g={g} head {h} dim {d}: {} vs {want}",
                                got[h * hd + d]
                            );
                        }
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
}
