//! f32 → ggml block bytes for every type ferrolm writes: F32, F16, BF16, Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0 and the K-quants Q2_K … Q6_K.
//!
//! The byte layouts are ggml's (`ggml-common.h`), so llama.cpp reads these files. The
//! choices inside a block (scales, mins, levels) follow the same published algorithms as
//! llama.cpp's reference quantizers, so a ferrolm file and a `llama-quantize` file of the same
//! type have the same quality:
//!
//! * 32-blocks: Q8_0 `d = max|x|/127`; Q4_0/Q5_0 take `d` from the signed value of largest
//!   magnitude (so it maps to level 0 exactly) ; Q4_1/Q5_1 span `[min, max]`.
//! * K-quants work on super-blocks of 256 with sub-block scales (and mins) quantized to 4, 6
//!   or 8 bits against one f16 super-scale. Each sub-block's scale comes from a small search:
//!   - with a min (Q2_K, Q4_K, Q5_K): a grid of candidate scales around `(max-min)/nmax`, each
//!     refined by weighted least squares for (scale, min), keeping the lowest weighted error;
//!   - symmetric (Q6_K): candidate scales around `-nmax/max`, keeping the best
//!     `Σw·x·l)² / Σw·l²` with weights `x²`;
//!   - Q3_K: iterative re-assignment of levels under the x²-weighted least-squares scale.
//!
//!   Then the levels are recomputed against the scales as actually stored (quantized).
//!
//! Rounding matters for bit-identical files: `nearest` rounds half to even (as the FPU does for
//! ggml's `nearest_int`), Q8_0 uses `round` (half away from zero, C's `roundf`), and f16 is
//! round-to-nearest-even.

// Sub-block j's values, scale and levels live in parallel arrays: index loops read clearest.
#![allow(clippy::needless_range_loop)]

use half::{bf16, f16};

use crate::GgmlType;

/// Sub-block maxima below this are treated as all zero (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;
/// Values per K-quant super-block.
pub const QK_K: usize = 256;

/// Why a tensor could not be quantized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantizeError {
    #[error("ferrolm cannot write type {0:?} (it writes f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k)")]
    Unsupported(GgmlType),
    #[error("the importance matrix has {got} weights for rows of {cols} values: it was computed for another model")]
    Importance { got: usize, cols: usize },
    #[error("a row of {cols} values does not split into {ty:?} blocks of {block}")]
    Shape {
        ty: GgmlType,
        cols: usize,
        block: usize,
    },
}

/// Whether rows of `cols` values can be stored as `ty` (the row splits into whole blocks).
pub fn fits(ty: GgmlType, cols: usize) -> bool {
    cols.is_multiple_of(ty.block_size() as usize)
}

/// Encode `x` (whole rows of `cols` values) as `ty`.
pub fn quantize(ty: GgmlType, x: &[f32], cols: usize) -> Result<Vec<u8>, QuantizeError> {
    quantize_with(ty, x, cols, None)
}

/// [`quantize`], with an importance matrix when given: one weight per column (llama.cpp's
/// imatrix entry for this tensor, the mean square of the activations each column multiplies).
/// The weighted searches are llama.cpp's `quantize_row_*_impl` algorithms; Q8_0 and the float
/// types do not use the weights, as in llama.cpp.
pub fn quantize_with(
    ty: GgmlType,
    x: &[f32],
    cols: usize,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>, QuantizeError> {
    let block = ty.block_size() as usize;
    if cols == 0 || !cols.is_multiple_of(block) || !x.len().is_multiple_of(cols) {
        return Err(QuantizeError::Shape { ty, cols, block });
    }
    if let Some(w) = importance {
        if w.len() != cols {
            return Err(QuantizeError::Importance { got: w.len(), cols });
        }
    }
    let mut out = Vec::with_capacity(x.len() / block * ty.block_bytes() as usize);
    match (ty, importance) {
        (GgmlType::F32, _) => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
        (GgmlType::F16, _) => x
            .iter()
            .for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
        (GgmlType::BF16, _) => x
            .iter()
            .for_each(|v| out.extend(bf16::from_f32(*v).to_le_bytes())),
        (GgmlType::Q8_0, _) => x.chunks_exact(32).for_each(|b| q8_0(b, &mut out)),
        (GgmlType::Q4_0, None) => x.chunks_exact(32).for_each(|b| q4_0(b, &mut out)),
        (GgmlType::Q4_1, None) => x.chunks_exact(32).for_each(|b| q4_1(b, &mut out)),
        (GgmlType::Q5_0, None) => x.chunks_exact(32).for_each(|b| q5_0(b, &mut out)),
        (GgmlType::Q5_1, None) => x.chunks_exact(32).for_each(|b| q5_1(b, &mut out)),
        (GgmlType::Q2K, None) => x.chunks_exact(QK_K).for_each(|b| q2_k(b, &mut out)),
        (GgmlType::Q3K, None) => x.chunks_exact(QK_K).for_each(|b| q3_k(b, &mut out)),
        (GgmlType::Q4K, None) => x.chunks_exact(QK_K).for_each(|b| q45_k(b, 15, &mut out)),
        (GgmlType::Q5K, None) => x.chunks_exact(QK_K).for_each(|b| q45_k(b, 31, &mut out)),
        (GgmlType::Q6K, None) => x.chunks_exact(QK_K).for_each(|b| q6_k(b, &mut out, None)),
        (GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1, Some(w)) => {
            for row in x.chunks_exact(cols) {
                weighted_32(ty, row, w, &mut out);
            }
        }
        (
            GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K,
            Some(w),
        ) => {
            for row in x.chunks_exact(cols) {
                for (b, wb) in row.chunks_exact(QK_K).zip(w.chunks_exact(QK_K)) {
                    match ty {
                        GgmlType::Q2K => q2_k_weighted(b, wb, &mut out),
                        GgmlType::Q3K => q3_k_weighted(b, wb, &mut out),
                        GgmlType::Q4K => q45_k_weighted(b, wb, 15, &mut out),
                        GgmlType::Q5K => q45_k_weighted(b, wb, 31, &mut out),
                        _ => q6_k(b, &mut out, Some(wb)),
                    }
                }
            }
        }
        (GgmlType::Q8_1 | GgmlType::Q8K, _) => return Err(QuantizeError::Unsupported(ty)),
    }
    debug_assert_eq!(out.len(), x.len() / block * ty.block_bytes() as usize);
    Ok(out)
}

/// Round half to even, as ggml's `nearest_int` does.
#[inline]
fn nearest(v: f32) -> i32 {
    v.round_ties_even() as i32
}

fn put_f16(out: &mut Vec<u8>, v: f32) {
    out.extend(f16::from_f32(v).to_le_bytes());
}

/// The f16 a value is stored as, back as f32: later choices use the stored scale.
fn stored(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// The value of largest magnitude, with its sign, and that magnitude.
fn signed_max(x: &[f32]) -> (f32, f32) {
    x.iter().fold((0f32, 0f32), |(m, a), &v| {
        if v.abs() > a {
            (v, v.abs())
        } else {
            (m, a)
        }
    })
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

// ---- 32-value blocks ----------------------------------------------------------------------

fn q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, d);
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

/// Q4_0 / Q5_0 levels: `d = max / -half`, level `trunc(x/d + half + 0.5)` capped at `top`.
fn symmetric_levels(x: &[f32], half: f32, top: u8) -> (f32, [u8; 32]) {
    let (max, _) = signed_max(x);
    let d = max / -half;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut l = [0u8; 32];
    for (l, v) in l.iter_mut().zip(x) {
        *l = ((v * id + half + 0.5) as i8).clamp(0, top as i8) as u8;
    }
    (d, l)
}

/// Q4_1 / Q5_1 levels: `d = (max - min) / top`, level `trunc((x - min)/d + 0.5)`.
fn affine_levels(x: &[f32], top: u8) -> (f32, f32, [u8; 32]) {
    let (min, max) = min_max(x);
    let d = (max - min) / top as f32;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut l = [0u8; 32];
    for (l, v) in l.iter_mut().zip(x) {
        *l = (((v - min) * id + 0.5) as u8).min(top);
    }
    (d, min, l)
}

/// Low nibbles: values 0..16 in the low halves, 16..32 in the high halves.
fn put_nibbles(out: &mut Vec<u8>, l: &[u8; 32]) {
    out.extend((0..16).map(|j| (l[j] & 15) | ((l[j + 16] & 15) << 4)));
}

/// The fifth bits of 32 levels, bit j for value j.
fn high_bits(l: &[u8; 32]) -> [u8; 4] {
    let qh = l
        .iter()
        .enumerate()
        .fold(0u32, |h, (j, &v)| h | (((v as u32 >> 4) & 1) << j));
    qh.to_le_bytes()
}

fn q4_0(x: &[f32], out: &mut Vec<u8>) {
    let (d, l) = symmetric_levels(x, 8.0, 15);
    put_f16(out, d);
    put_nibbles(out, &l);
}

fn q4_1(x: &[f32], out: &mut Vec<u8>) {
    let (d, min, l) = affine_levels(x, 15);
    put_f16(out, d);
    put_f16(out, min);
    put_nibbles(out, &l);
}

fn q5_0(x: &[f32], out: &mut Vec<u8>) {
    let (d, l) = symmetric_levels(x, 16.0, 31);
    put_f16(out, d);
    out.extend(high_bits(&l));
    put_nibbles(out, &l);
}

fn q5_1(x: &[f32], out: &mut Vec<u8>) {
    let (d, min, l) = affine_levels(x, 31);
    put_f16(out, d);
    put_f16(out, min);
    out.extend(high_bits(&l));
    put_nibbles(out, &l);
}

// ---- scale searches -----------------------------------------------------------------------

/// Levels `0..=nmax` and `(scale, min)` with `x ≈ scale·l - min`, min ≥ 0 stored positive,
/// chosen by weighted error over `nstep + 1` candidate scales `(nmax + rmin + rdelta·i)/(max-min)`,
/// each refit by weighted least squares. `mad` scores absolute rather than squared error.
#[allow(clippy::too_many_arguments)]
fn scale_min_search(
    x: &[f32],
    w: &[f32],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: usize,
    mad: bool,
    l: &mut [u8],
) -> (f32, f32) {
    let (mut min, max) = min_max(x);
    min = min.min(0.0);
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let sum_w: f32 = w.iter().sum();
    let sum_x: f32 = w.iter().zip(x).map(|(w, x)| w * x).sum();
    let err = |scale: f32, min: f32, l: &[u8]| -> f32 {
        x.iter()
            .zip(w)
            .zip(l)
            .map(|((&x, &w), &l)| {
                let d = scale * l as f32 + min - x;
                w * if mad { d.abs() } else { d * d }
            })
            .sum()
    };
    let iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    for (l, &v) in l.iter_mut().zip(x) {
        *l = nearest(iscale * (v - min)).clamp(0, nmax) as u8;
    }
    let mut best = err(scale, min, l);
    let mut aux = vec![0u8; x.len()];
    for i in 0..=nstep {
        let iscale = (rmin + rdelta * i as f32 + nmax as f32) / (max - min);
        let (mut sl, mut sl2, mut sxl) = (0f32, 0f32, 0f32);
        for ((a, &v), &w) in aux.iter_mut().zip(x).zip(w) {
            let q = nearest(iscale * (v - min)).clamp(0, nmax);
            *a = q as u8;
            let q = q as f32;
            sl += w * q;
            sl2 += w * q * q;
            sxl += w * q * v;
        }
        let det = sum_w * sl2 - sl * sl;
        if det > 0.0 {
            let mut s = (sum_w * sxl - sum_x * sl) / det;
            let mut m = (sl2 * sum_x - sl * sxl) / det;
            if m > 0.0 {
                m = 0.0;
                s = sxl / sl2;
            }
            let e = err(s, m, &aux);
            if e < best {
                l.copy_from_slice(&aux);
                best = e;
                scale = s;
                min = m;
            }
        }
    }
    (scale, -min)
}

/// Symmetric levels `-nmax..nmax-1` (stored `+nmax`) and their scale, best of 19 candidate
/// scales around `-nmax/max` by `(Σ w·x·l)² / Σ w·l²`, weights `qw` or else `x²`.
fn symmetric_search(x: &[f32], nmax: i32, l: &mut [i8], qw: Option<&[f32]>) -> f32 {
    let (max, amax) = signed_max(x);
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let fit = |iscale: f32| -> (f32, f32) {
        x.iter()
            .enumerate()
            .fold((0f32, 0f32), |(sxl, sl2), (i, &v)| {
                let q = nearest(iscale * v).clamp(-nmax, nmax - 1) as f32;
                let w = qw.map_or(v * v, |qw| qw[i]);
                (sxl + w * v * q, sl2 + w * q * q)
            })
    };
    let assign = |iscale: f32, l: &mut [i8]| {
        for (l, &v) in l.iter_mut().zip(x) {
            *l = (nearest(iscale * v).clamp(-nmax, nmax - 1) + nmax) as i8;
        }
    };
    let iscale = -(nmax as f32) / max;
    let (sxl, sl2) = fit(iscale);
    assign(iscale, l);
    let mut scale = if sl2 != 0.0 { sxl / sl2 } else { 0.0 };
    let mut best = scale * sxl;
    for i in (-9..=9).filter(|&i| i != 0) {
        let iscale = -(nmax as f32 + 0.1 * i as f32) / max;
        let (sxl, sl2) = fit(iscale);
        if sl2 > 0.0 && sxl * sxl > best * sl2 {
            assign(iscale, l);
            scale = sxl / sl2;
            best = scale * sxl;
        }
    }
    scale
}

/// Q3_K's sub-block search: levels `-nmax..nmax-1` (stored `+nmax`) under the x²-weighted
/// least-squares scale, improved by moving single levels while that raises the fit.
fn q3_search(x: &[f32], nmax: i32, l: &mut [i8]) -> f32 {
    let (max, amax) = signed_max(x);
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sxl, mut sl2) = (0f32, 0f32);
    for (l, &v) in l.iter_mut().zip(x) {
        let q = nearest(iscale * v).clamp(-nmax, nmax - 1);
        *l = q as i8;
        let w = v * v;
        sxl += w * v * q as f32;
        sl2 += w * q as f32 * q as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (l, &v) in l.iter_mut().zip(x) {
            let w = v * v;
            let q = *l as f32;
            let slx = sxl - w * v * q;
            if slx > 0.0 {
                let sl2_without = sl2 - w * q * q;
                let nq = nearest(v * sl2_without / slx).clamp(-nmax, nmax - 1);
                if nq != *l as i32 {
                    let nqf = nq as f32;
                    let slx2 = slx + w * v * nqf;
                    let sl22 = sl2_without + w * nqf * nqf;
                    if sl22 > 0.0 && slx2 * slx2 * sl2 > sxl * sxl * sl22 {
                        *l = nq as i8;
                        sxl = slx2;
                        sl2 = sl22;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for l in l.iter_mut() {
        *l += nmax as i8;
    }
    if sl2 > 0.0 {
        sxl / sl2
    } else {
        0.0
    }
}

// ---- K-quants -----------------------------------------------------------------------------

/// Pack 2-bit levels as ggml's Q2_K/Q3_K `qs`: per 128 values, byte `l` holds values
/// `l, l+32, l+64, l+96` in bits 0-1, 2-3, 4-5, 6-7.
fn put_2bit(out: &mut Vec<u8>, l: &[u8; QK_K]) {
    for j in (0..QK_K).step_by(128) {
        out.extend((0..32).map(|i| {
            l[j + i] | (l[j + i + 32] << 2) | (l[j + i + 64] << 4) | (l[j + i + 96] << 6)
        }));
    }
}

fn q2_k(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 16], [0f32; 16]);
    for j in 0..16 {
        let xs = &x[16 * j..16 * (j + 1)];
        let w: Vec<f32> = xs.iter().map(|v| v.abs()).collect();
        (scales[j], mins[j]) =
            scale_min_search(xs, &w, 3, -0.5, 0.1, 15, true, &mut l[16 * j..16 * (j + 1)]);
    }
    let max_scale = scales.iter().fold(0f32, |m, &s| m.max(s));
    let max_min = mins.iter().fold(0f32, |m, &s| m.max(s));
    let mut sc = [0u8; 16];
    let (mut d, mut dmin) = (0.0, 0.0);
    if max_scale > 0.0 {
        let is = 15.0 / max_scale;
        for (q, &s) in sc.iter_mut().zip(&scales) {
            *q = nearest(is * s) as u8;
        }
        d = max_scale / 15.0;
    }
    if max_min > 0.0 {
        let im = 15.0 / max_min;
        for (q, &m) in sc.iter_mut().zip(&mins) {
            *q |= (nearest(im * m) as u8) << 4;
        }
        dmin = max_min / 15.0;
    }
    q2_k_finish(x, &mut l, sc, d, dmin, out);
}

/// Q2_K's common tail: levels against the scales and mins as stored, packing.
fn q2_k_finish(x: &[f32], l: &mut [u8; QK_K], sc: [u8; 16], d: f32, dmin: f32, out: &mut Vec<u8>) {
    let (ds, dms) = (stored(d), stored(dmin));
    for j in 0..16 {
        let dj = ds * (sc[j] & 15) as f32;
        if dj == 0.0 {
            continue;
        }
        let mj = dms * (sc[j] >> 4) as f32;
        for i in 16 * j..16 * (j + 1) {
            l[i] = nearest((x[i] + mj) / dj).clamp(0, 3) as u8;
        }
    }
    out.extend(sc);
    put_2bit(out, l);
    put_f16(out, d);
    put_f16(out, dmin);
}

fn q3_k(x: &[f32], out: &mut Vec<u8>) {
    let mut li = [0i8; QK_K];
    let mut scales = [0f32; 16];
    for j in 0..16 {
        scales[j] = q3_search(&x[16 * j..16 * (j + 1)], 4, &mut li[16 * j..16 * (j + 1)]);
    }
    let (max_scale, _) = signed_max(&scales);
    let mut packed = [0u8; 12];
    let mut d = 0.0;
    if max_scale != 0.0 {
        let is = -32.0 / max_scale;
        for (j, &s) in scales.iter().enumerate() {
            let q = (nearest(is * s).clamp(-32, 31) + 32) as u8;
            if j < 8 {
                packed[j] = q & 15;
            } else {
                packed[j - 8] |= (q & 15) << 4;
            }
            packed[8 + j % 4] |= (q >> 4) << (2 * (j / 4));
        }
        d = 1.0 / is;
    }
    q3_k_finish(x, &li, packed, d, out);
}

/// Pack eight 6-bit (scale, min) pairs as ggml's `get_scale_min_k4` reads them.
fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 15) | ((lm[j] & 15) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

/// Q4_K (`nmax` 15) and Q5_K (`nmax` 31): eight 32-value sub-blocks, each with a 6-bit scale
/// and min, searched with weights `rms(x) + |x|`.
fn q45_k(x: &[f32], nmax: i32, out: &mut Vec<u8>) {
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (rmin, nstep) = if nmax == 15 { (-1.0, 20) } else { (-0.5, 15) };
    for j in 0..8 {
        let xs = &x[32 * j..32 * (j + 1)];
        let rms = (xs.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
        let w: Vec<f32> = xs.iter().map(|v| rms + v.abs()).collect();
        (scales[j], mins[j]) = scale_min_search(
            xs,
            &w,
            nmax,
            rmin,
            0.1,
            nstep,
            false,
            &mut l[32 * j..32 * (j + 1)],
        );
    }
    let max_scale = scales.iter().fold(0f32, |m, &s| m.max(s));
    let max_min = mins.iter().fold(0f32, |m, &s| m.max(s));
    let is = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let im = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        ls[j] = (nearest(is * scales[j]) as u8).min(63);
        lm[j] = (nearest(im * mins[j]) as u8).min(63);
    }
    let (d, dmin) = (max_scale / 63.0, max_min / 63.0);
    q45_k_finish(x, &mut l, &ls, &lm, d, dmin, nmax, out);
}

/// Q4_K/Q5_K's common tail: levels against the scales and mins as stored, packing.
#[allow(clippy::too_many_arguments)]
fn q45_k_finish(
    x: &[f32],
    l: &mut [u8; QK_K],
    ls: &[u8; 8],
    lm: &[u8; 8],
    d: f32,
    dmin: f32,
    nmax: i32,
    out: &mut Vec<u8>,
) {
    let (ds, dms) = (stored(d), stored(dmin));
    for j in 0..8 {
        let dj = ds * ls[j] as f32;
        if dj == 0.0 {
            continue;
        }
        let mj = dms * lm[j] as f32;
        for i in 32 * j..32 * (j + 1) {
            l[i] = nearest((x[i] + mj) / dj).clamp(0, nmax) as u8;
        }
    }
    put_f16(out, d);
    put_f16(out, dmin);
    out.extend(pack_scale_min_k4(ls, lm));
    if nmax == 31 {
        // High bits: per 64 values, bit 2k of qh[i] is value 64k + i's, bit 2k+1 value 64k+32+i's.
        let mut qh = [0u8; 32];
        for (k, n) in (0..QK_K).step_by(64).enumerate() {
            for i in 0..32 {
                qh[i] |= ((l[n + i] >> 4) << (2 * k)) | ((l[n + i + 32] >> 4) << (2 * k + 1));
            }
        }
        out.extend(qh);
    }
    for n in (0..QK_K).step_by(64) {
        out.extend((0..32).map(|i| (l[n + i] & 15) | ((l[n + i + 32] & 15) << 4)));
    }
}

/// Q6_K; with `weights` (an importance matrix slice), llama.cpp's weighted variant, which
/// differs only in the sub-block search's weights.
fn q6_k(x: &[f32], out: &mut Vec<u8>, weights: Option<&[f32]>) {
    let mut li = [0i8; QK_K];
    let mut scales = [0f32; 16];
    for j in 0..16 {
        let qw = weights.map(|w| &w[16 * j..16 * (j + 1)]);
        scales[j] = symmetric_search(
            &x[16 * j..16 * (j + 1)],
            32,
            &mut li[16 * j..16 * (j + 1)],
            qw,
        );
    }
    let (max_scale, amax) = signed_max(&scales);
    if amax < GROUP_MAX_EPS {
        out.extend([0u8; 210]);
        return;
    }
    let is = -128.0 / max_scale;
    let d = 1.0 / is;
    let ds = stored(d);
    let mut sc = [0i8; 16];
    for (q, &s) in sc.iter_mut().zip(&scales) {
        *q = nearest(is * s).min(127) as i8;
    }
    let mut l = [0u8; QK_K];
    for j in 0..16 {
        let dj = ds * sc[j] as f32;
        for i in 16 * j..16 * (j + 1) {
            l[i] = if dj == 0.0 {
                li[i] as u8
            } else {
                (nearest(x[i] / dj).clamp(-32, 31) + 32) as u8
            };
        }
    }
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for (h, j) in (0..QK_K).step_by(128).enumerate() {
        for i in 0..32 {
            let (a, b, c, e) = (l[j + i], l[j + i + 32], l[j + i + 64], l[j + i + 96]);
            ql[64 * h + i] = (a & 15) | ((c & 15) << 4);
            ql[64 * h + i + 32] = (b & 15) | ((e & 15) << 4);
            qh[32 * h + i] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.map(|v| v as u8));
    put_f16(out, d);
}

// ---- with an importance matrix ------------------------------------------------------------

/// Per-value weights of a block: `importance · sqrt(σ² + x²)`.
fn block_weights(x: &[f32], importance: &[f32], sigma2: f32) -> Vec<f32> {
    x.iter()
        .zip(importance)
        .map(|(&v, &q)| q * (sigma2 + v * v).sqrt())
        .collect()
}

/// Q4_0/Q4_1/Q5_0/Q5_1 of one row, weighted; σ² is the row's mean square.
fn weighted_32(ty: GgmlType, row: &[f32], importance: &[f32], out: &mut Vec<u8>) {
    let sigma2 = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    for (xb, qb) in row.chunks_exact(32).zip(importance.chunks_exact(32)) {
        let w = block_weights(xb, qb, sigma2);
        let mut l = [0u8; 32];
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 => {
                let nmax = if ty == GgmlType::Q4_0 { 8 } else { 16 };
                let mut li = [0i8; 32];
                let d = symmetric_search(xb, nmax, &mut li, Some(&w));
                l.iter_mut().zip(li).for_each(|(l, v)| *l = v as u8);
                put_f16(out, d);
                if ty == GgmlType::Q5_0 {
                    out.extend(high_bits(&l));
                }
            }
            _ => {
                let nmax = if ty == GgmlType::Q4_1 { 15 } else { 31 };
                let (d, neg_min) = scale_min_search(xb, &w, nmax, -0.9, 0.05, 36, false, &mut l);
                put_f16(out, d);
                put_f16(out, -neg_min);
                if ty == GgmlType::Q5_1 {
                    out.extend(high_bits(&l));
                }
            }
        }
        put_nibbles(out, &l);
    }
}

/// Quantize positive sub-block scales (or mins) `x` to levels `0..=nmax` under weights `qw`:
/// a grid search of the super-scale, then single-level moves while they improve the fit.
/// Levels are bytes, as in ggml (a negative level wraps, as it does there).
fn scale_levels(x: &[f32], nmax: i32, l: &mut [u8], qw: &[f32]) -> f32 {
    let max = x.iter().fold(0f32, |m, &v| m.max(v));
    if max < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let mse = |iscale: f32, cap: bool| -> f32 {
        let scale = 1.0 / iscale;
        x.iter()
            .zip(qw)
            .map(|(&v, &w)| {
                let mut q = nearest(iscale * v);
                if cap {
                    q = q.min(nmax);
                }
                // The first pass stores levels as bytes (ggml's uint8_t), the others do not.
                let d = if cap {
                    v - scale * q as f32
                } else {
                    v - scale * (q as u8) as f32
                };
                w * d * d
            })
            .sum()
    };
    let mut iscale = nmax as f32 / max;
    let mut best = mse(iscale, false);
    for is in (-4..=4).filter(|&i| i != 0) {
        let cand = (0.1 * is as f32 + nmax as f32) / max;
        let e = mse(cand, true);
        if e < best {
            best = e;
            iscale = cand;
        }
    }
    let (mut slx, mut sl2) = (0f32, 0f32);
    for ((l, &v), &w) in l.iter_mut().zip(x).zip(qw) {
        let q = nearest(iscale * v).min(nmax);
        *l = q as u8;
        slx += w * v * q as f32;
        sl2 += w * q as f32 * q as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for ((l, &v), &w) in l.iter_mut().zip(x).zip(qw) {
            let q = *l as f32;
            let s1 = slx - w * v * q;
            let s2 = sl2 - w * q * q;
            if s1 > 0.0 && s2 > 0.0 {
                let nq = nearest(v * s2 / s1).min(nmax);
                if nq != *l as i32 {
                    let nqf = nq as f32;
                    let (t1, t2) = (s1 + w * v * nqf, s2 + w * nqf * nqf);
                    if t1 * t1 * sl2 > slx * slx * t2 {
                        *l = nq as u8;
                        slx = t1;
                        sl2 = t2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    if sl2 > 0.0 {
        slx / sl2
    } else {
        0.0
    }
}

fn q2_k_weighted(x: &[f32], qw: &[f32], out: &mut Vec<u8>) {
    let sigma2 = x.iter().map(|v| v * v).sum::<f32>() / QK_K as f32;
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins, mut sw) = ([0f32; 16], [0f32; 16], [0f32; 16]);
    for j in 0..16 {
        let xs = &x[16 * j..16 * (j + 1)];
        let w = block_weights(xs, &qw[16 * j..16 * (j + 1)], sigma2);
        sw[j] = w.iter().sum();
        (scales[j], mins[j]) = scale_min_search(
            xs,
            &w,
            3,
            -0.9,
            0.05,
            36,
            false,
            &mut l[16 * j..16 * (j + 1)],
        );
    }
    let (mut ls, mut lm) = ([0u8; 16], [0u8; 16]);
    let d = scale_levels(&scales, 15, &mut ls, &sw);
    let dmin = scale_levels(&mins, 15, &mut lm, &sw);
    let mut sc = [0u8; 16];
    for j in 0..16 {
        sc[j] = ls[j] | (lm[j] << 4);
    }
    q2_k_finish(x, &mut l, sc, d, dmin, out);
}

fn q3_k_weighted(x: &[f32], qw: &[f32], out: &mut Vec<u8>) {
    let sigma2 = 2.0 * x.iter().map(|v| v * v).sum::<f32>() / QK_K as f32;
    let mut li = [0i8; QK_K];
    let (mut scales, mut sw) = ([0f32; 16], [0f32; 16]);
    for j in 0..16 {
        let xs = &x[16 * j..16 * (j + 1)];
        let w = block_weights(xs, &qw[16 * j..16 * (j + 1)], sigma2);
        sw[j] = w.iter().sum();
        scales[j] = symmetric_search(xs, 4, &mut li[16 * j..16 * (j + 1)], Some(&w));
    }
    let mut ls = [0i8; 16];
    let d = symmetric_search(&scales, 32, &mut ls, Some(&sw));
    let mut packed = [0u8; 12];
    for (j, &q) in ls.iter().enumerate() {
        let q = q as u8;
        if j < 8 {
            packed[j] = q & 15;
        } else {
            packed[j - 8] |= (q & 15) << 4;
        }
        packed[8 + j % 4] |= (q >> 4) << (2 * (j / 4));
    }
    q3_k_finish(x, &li, packed, d, out);
}

/// Q3_K's common tail: levels against the scales as stored, high-bit mask, packing.
fn q3_k_finish(x: &[f32], li: &[i8; QK_K], packed: [u8; 12], d: f32, out: &mut Vec<u8>) {
    let ds = stored(d);
    let mut l = [0u8; QK_K];
    for j in 0..16 {
        let low = if j < 8 {
            packed[j] & 15
        } else {
            packed[j - 8] >> 4
        };
        let q = (low | (((packed[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i32 - 32;
        let dj = ds * q as f32;
        for i in 16 * j..16 * (j + 1) {
            l[i] = if dj == 0.0 {
                li[i] as u8
            } else {
                (nearest(x[i] / dj).clamp(-4, 3) + 4) as u8
            };
        }
    }
    let mut hmask = [0u8; 32];
    for (i, v) in l.iter_mut().enumerate() {
        if *v > 3 {
            hmask[i % 32] |= 1 << (i / 32);
            *v -= 4;
        }
    }
    out.extend(hmask);
    put_2bit(out, &l);
    out.extend(packed);
    put_f16(out, d);
}

fn q45_k_weighted(x: &[f32], qw: &[f32], nmax: i32, out: &mut Vec<u8>) {
    let sigma2 = 2.0 * x.iter().map(|v| v * v).sum::<f32>() / QK_K as f32;
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins, mut sw) = ([0f32; 8], [0f32; 8], [0f32; 8]);
    for j in 0..8 {
        let xs = &x[32 * j..32 * (j + 1)];
        let w = block_weights(xs, &qw[32 * j..32 * (j + 1)], sigma2);
        sw[j] = w.iter().sum();
        (scales[j], mins[j]) = scale_min_search(
            xs,
            &w,
            nmax,
            -0.9,
            0.05,
            36,
            false,
            &mut l[32 * j..32 * (j + 1)],
        );
    }
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    let d = scale_levels(&scales, 63, &mut ls, &sw);
    let dmin = scale_levels(&mins, 63, &mut lm, &sw);
    ls.iter_mut().for_each(|v| *v = (*v).min(63));
    lm.iter_mut().for_each(|v| *v = (*v).min(63));
    q45_k_finish(x, &mut l, &ls, &lm, d, dmin, nmax, out);
}
