//! Quantized weight matrices and their matrix-vector kernels — the hot path of inference.
//!
//! Every supported block format is repacked once at load into one layout, so one kernel
//! family serves them all. A weight row is a sequence of 32-element blocks; for block `b`
//!
//! ```text
//! w[i] = d[b] * q[i] + (offset)      q[i] unsigned (4-bit 0..15, or 8-bit 0..255)
//! dot(w, x) = Σ_b  d[b]·dx[b]·Σ_i q[i]·qx[i]  +  m[b]·sx[b]
//! ```
//!
//! where the activation `x` is quantized per 32-block to `qx` (i8) with scale `dx` and
//! `sx = dx · Σ qx`. The offset folds into `m`: Q4_1 stores `m` itself, Q4_0 (`q - 8`) becomes
//! `m = -8·d`, Q8_0 (signed `q`) is stored as `q + 128` with `m = -128·d`, Q5_0 (`q - 16`, 5-bit,
//! kept in the 8-bit layout) `m = -16·d`; Q4_K and Q5_K have 32-element sub-blocks with 6-bit
//! scales and mins, so `d = d_super·sc` and `m = -dmin·min` (exact in f32). Q2_K, Q3_K and Q6_K
//! have 16-element sub-blocks: they keep integer sub-block scales ([`Grain::Sub16`]) and their own
//! kernel, which folds the two scales of a 32-block into the `vpmaddwd` that sums its products.
//! Every repack is lossless (`tests/kquant.rs` holds it to candle's dequantizer). So the
//! integer part is always unsigned × signed bytes — exactly what AVX-512 VNNI `vpdpbusd` and
//! AVX2 `vpmaddubsw` compute — and the float part is a short dot product. This is the same arithmetic as
//! llama.cpp's Q4_1 × Q8_1 path (activations quantized to 8 bits), so results agree with it,
//! not bit-for-bit with an f32 reference; `tests` bounds the difference.
//!
//! 4-bit layout: blocks are taken in pairs; the 32 bytes of a pair hold element `j` of the pair
//! in the low nibble of byte `j` (j < 32) and element `j + 32` in the high nibble, so the low
//! nibbles are block 0 in order and the high nibbles block 1. An odd last block is stored on its
//! own the same way (element `j` low, `j + 16` high). 8-bit rows are plain bytes.
//!
//! Kernels: AVX-512 VNNI, AVX2 and scalar, picked at run time ([`Isa::detect`]); the scalar one
//! is the obviously-correct path the tests hold the others to. With AVX-512 VNNI the model
//! re-lays every matrix whose rows come in 16s as [`Layout::Group16`] (16 rows interleaved
//! per block) at load: its kernel keeps one row per vector lane, so a block costs eight
//! `vpdpbusd` and three float ops for 16 rows instead of a shuffle, a convert and a horizontal
//! sum per row — 2–4× the multiply-adds per second of the row-major tile at 16–128 tokens and
//! ~1.7× at one (`crates/models/examples/matmul.rs`), with the same integer sums (results
//! differ only in float summation order, ~1e-6). [`Grain::Sub16`] matrices share the layout
//! and the `vpdpbusd`s (`x86::group16_sub16`), weighting the two 16-element halves of each
//! block by their rows' integer sub-block scales; a [`Grain::Sub16`] matrix whose rows do not
//! come in 16s runs the AVX2 kernel on AVX-512 machines.
//!
//! On AVX2 (no AVX-512) the loader interleaves the K-quants (and Q4_1) as [`Layout::Group16`]
//! too where their rows come in 16s ([`QMatrix::prepare_avx2`]): `x86::group16_avx2` and
//! `x86::group16_sub16_avx2` run each 16-row group as two halves of 8, one row per 32-bit
//! lane, `vpmaddubsw` against 4 broadcast activation bytes standing in for `vpdpbusd` (the
//! i16 sums are kept below saturation, see the kernels), then one `vpmaddwd` per block.
//! 8-bit matrices whose values are all below 32 (the Q5 types, most matrices of the "Q4_K_M"
//! files of models whose rows are not whole 256-element super-blocks) keep 5 bits per quant,
//! since decoding one token is bound by the bytes it reads: in 16-row groups as
//! [`Layout::Group16Packed5`] (`x86::group16_5_avx2`, the 4-bit group kernel plus one shift,
//! mask and OR per quant vector for the fifth bits: SmolLM2 Q4_K_M prefill-512 ~2.1× the
//! row kernel's, decode unchanged), else row-major as [`Layout::Packed5`], whose kernel
//! (`x86::rows_avx2`) takes four rows per pass when decoding. Q8_0 stays row-major
//! ([`Layout::Signed8`]). From
//! [`GEMM_MIN_TOKENS`] tokens on (prefill) and with [`batch_invariant`] off, AVX2 matmuls
//! instead dequantize each chunk of rows to an f32 panel and run `gemm`'s register-blocked f32
//! kernel on the dequantized activations: the same quantized operands, ~3× the multiply-adds
//! per second of the row integer kernel at 512 tokens, and ~1.4× the group kernels' (Q4_1
//! SmolLM2 with `FERROLM_ISA=avx2`: ~480 against ~335 tok/s at 512 tokens, 1 thread), so the
//! loader leaves matrices row-major in that mode.

use crate::mat::{gemm_to_ptr, Mat, Par};
use half::f16;

/// Elements per quantization block.
pub const QK: usize = 32;

/// Instruction set the kernels run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512Vnni,
    Avx2,
    Scalar,
}

impl Isa {
    /// Best available on this CPU; `FERROLM_ISA=scalar|avx2|avx512` forces a lower one.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        let best = if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            Isa::Avx512Vnni
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Isa::Avx2
        } else {
            Isa::Scalar
        };
        #[cfg(not(target_arch = "x86_64"))]
        let best = Isa::Scalar;
        match std::env::var("FERROLM_ISA").as_deref() {
            Ok("scalar") => Isa::Scalar,
            Ok("avx2") if best != Isa::Scalar => Isa::Avx2,
            _ => best,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Avx2 => "avx2",
            Isa::Scalar => "scalar",
        }
    }
}

/// Bits per weight of a repacked matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QBits {
    Four,
    Eight,
}

/// How a matrix's quants, scales and offsets are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Row by row (module docs): every kernel reads it.
    Rows,
    /// 16 rows interleaved per block (AVX-512 VNNI; on AVX2 the 4-bit [`Grain::Block32`] and
    /// the [`Grain::Sub16`] types, see [`QMatrix::interleave16`], [`QMatrix::prepare_avx2`]): for
    /// group `g` of 16 rows and block `b`, 16 scales, 16 offsets ([`Grain::Sub16`]: per
    /// super-block instead, with the sub-block scales), then the quants as 64-byte
    /// vectors whose 32-bit lane `r` holds 4 consecutive elements of row `16g + r` — one
    /// `vpdpbusd` against 4 broadcast activation bytes advances 16 rows at once, and the block
    /// sums come out one row per lane (no horizontal sums, no scale shuffles).
    Group16,
    /// Row-major 5-bit quants (AVX2 only, see [`QMatrix::pack5`]; where the rows do not come
    /// in 16s, or with [`batch_invariant`] off): an 8-bit
    /// [`Grain::Block32`] matrix whose values are all below 32 (Q5_0, Q5_1, Q5_K) stored as
    /// each row's low nibbles in the 4-bit pair layout (`cols / 2` bytes), then its fifth bits,
    /// 4 bytes per block, bit `j` of a block's word for element `j` (`cols / 8` bytes): 20 bytes
    /// of quants per block instead of 32, which is what decoding reads from memory.
    Packed5,
    /// [`Layout::Group16`]'s order with [`Layout::Packed5`]'s 5 bits per quant (AVX2 only,
    /// see [`QMatrix::prepare_avx2`]; read by `x86::group16_5_avx2`): per group `g` of 16 rows
    /// and block `b`, 16 scales and 16 offsets (none when [`QMatrix::m_fixed`] holds them),
    /// then 320 bytes of quants: the low nibbles as the 4-bit [`Layout::Group16`] holds them
    /// (vector `p`, 64 bytes, lane `r` byte `i`: element `8p + i` of row `16g + r` low,
    /// `8p + 4 + i` high), then the fifth bits, lane `r` (4 bytes) for row `16g + r`, bit `k`
    /// of byte `i` the fifth bit of element `4k + i` — so the fifth bits of quant vector `k`
    /// are one shift of that word by `4 − k` and a mask away from bit 4 of each byte.
    Group16Packed5,
    /// Row-major signed bytes (AVX2 only, see [`QMatrix::prepare_avx2`]): a Q8_0 matrix (value
    /// `u`, offset `−128·d`) stored as `u ^ 0x80`, the signed quant itself, so the kernel takes
    /// `vpsignb`'s cheap signed product and no offset term.
    Signed8,
}

/// How a matrix's scales are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// One `d` and one `m` (f32) per 32-element block: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
    /// Q5_K (a K-quant's 6-bit sub-block scale times its f16 super-block scale is exact
    /// in f32, so Q4_K/Q5_K repack without loss).
    Block32,
    /// The 16-element sub-blocks of Q2_K, Q3_K and Q6_K, each with its own integer scale `sc`
    /// and offset multiplier `mn` (i8), and per 256-element super-block one f32 scale `D` and
    /// one f32 offset scale `M`: `w[i] = D·sc[j]·q[i] + M·mn[j]` for `i` in sub-block `j`.
    /// Q6_K: `sc` its scale, `M = −32·D`, `mn = sc` (`q` 0..63); Q3_K: `sc = mn` its scale − 32,
    /// `M = −4·D` (`q` 0..7); Q2_K: `sc` and `mn` its two nibbles, `M = −dmin` (`q` 0..3).
    Sub16,
}

/// `len` zero bytes, asking the kernel (Linux) to back them with transparent huge pages
/// before they are touched: decoding streams every weight once per token, and with 4 KiB pages
/// the hardware prefetchers stop at every page boundary and each page costs a TLB walk.
pub fn huge_zeroed(len: usize) -> Vec<u8> {
    let v = vec![0u8; len];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (v.as_ptr() as usize).next_multiple_of(HUGE);
        let end = (v.as_ptr() as usize + len) / HUGE * HUGE;
        if end > start {
            // SAFETY: advice only, on whole pages inside the allocation; the contents are not
            // changed (they are zero either way).
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    v
}

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

/// A quantized `[rows, cols]` matrix in the repacked layout described in the module docs.
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    pub bits: QBits,
    pub layout: Layout,
    pub grain: Grain,
    /// [`Grain::Block32`]: `rows * nb` block scales; [`Grain::Sub16`]: `rows * cols / 256`
    /// super-block scales `D`.
    d: Vec<f32>,
    /// [`Grain::Block32`]: `rows * nb` block offsets (see module docs); [`Grain::Sub16`]:
    /// `rows * cols / 256` super-block offset scales `M`.
    m: Vec<f32>,
    /// [`Grain::Sub16`]: per super-block, its 16 sub-block scales `sc` then its 16 offset
    /// multipliers `mn` (32 bytes). [`Grain::Block32`] K-quants (Q4_K, Q5_K) only, until
    /// [`QMatrix::prepare`]: per block its 6-bit `sc` and `mn` (2 bytes, `d = D·sc`,
    /// `m = −dmin·mn`); [`Layout::Group16`] keeps them as the block scales ([`Self::kscales`]).
    /// Empty for the other Block32 types.
    scm: Vec<i8>,
    /// Packed quants, `row_bytes` per row.
    qs: Vec<u8>,
    /// Every quant is below 64, so `vpmaddubsw` (u8 × i8 pairs) cannot saturate.
    small: bool,
    /// `Some(c)`: every block offset is `c · d` (Q4_0 −8, Q5_0 −16, Q8_0 −128), so `m` is not
    /// stored (empty) and the kernels fold the offsets as `c · Σ d·sx` (set by
    /// [`QMatrix::prepare_avx2`] only).
    m_fixed: Option<f32>,
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Pack one row's 4-bit values (one per element, 0..15) into the paired-nibble layout.
fn pack_nibbles(vals: &[u8], out: &mut Vec<u8>) {
    let nb = vals.len() / QK;
    let mut b = 0;
    while b + 1 < nb {
        let v = &vals[b * QK..(b + 2) * QK];
        out.extend((0..32).map(|j| v[j] | (v[j + 32] << 4)));
        b += 2;
    }
    if b < nb {
        let v = &vals[b * QK..(b + 1) * QK];
        out.extend((0..16).map(|j| v[j] | (v[j + 16] << 4)));
    }
}

/// The 32 values of block `b` of a [`Layout::Packed5`] row (`cols` elements), in a form the
/// compiler vectorises (the fifth bits by variable shifts).
#[inline(always)]
fn values5(q: &[u8], cols: usize, b: usize, vals: &mut [u8; QK]) {
    let nb = cols / QK;
    let (nib, hb) = q.split_at(cols / 2);
    if b.is_multiple_of(2) && b + 1 < nb {
        let p = &nib[b * 16..b * 16 + 32];
        vals.iter_mut().zip(p).for_each(|(v, &p)| *v = p & 0x0F);
    } else if b % 2 == 1 {
        let p = &nib[(b - 1) * 16..(b - 1) * 16 + 32];
        vals.iter_mut().zip(p).for_each(|(v, &p)| *v = p >> 4);
    } else {
        let p = &nib[b * 16..b * 16 + 16];
        for j in 0..16 {
            vals[j] = p[j] & 0x0F;
            vals[j + 16] = p[j] >> 4;
        }
    }
    let bits = u32::from_le_bytes([hb[4 * b], hb[4 * b + 1], hb[4 * b + 2], hb[4 * b + 3]]);
    for (j, v) in vals.iter_mut().enumerate() {
        *v |= (((bits >> j) & 1) << 4) as u8;
    }
}

/// One [`Layout::Packed5`] row into `o` (`d[b]·v + m(b)`).
#[inline(always)]
fn dequantize5(q: &[u8], cols: usize, d: &[f32], m: impl Fn(usize) -> f32, o: &mut [f32]) {
    let mut vals = [0u8; QK];
    for b in 0..cols / QK {
        values5(q, cols, b, &mut vals);
        let (db, mb) = (d[b], m(b));
        for (o, &v) in o[b * QK..(b + 1) * QK].iter_mut().zip(&vals) {
            *o = db * v as f32 + mb;
        }
    }
}

/// The quant types [`QMatrix::from_ggml`] repacks, with how.
pub fn repack_form(ty: ferrolm_gguf::GgmlType) -> Option<(QBits, Grain)> {
    use ferrolm_gguf::GgmlType as T;
    Some(match ty {
        T::Q4_0 | T::Q4_1 | T::Q4K => (QBits::Four, Grain::Block32),
        T::Q5_0 | T::Q5_1 | T::Q5K | T::Q8_0 => (QBits::Eight, Grain::Block32),
        T::Q2K | T::Q3K => (QBits::Four, Grain::Sub16),
        T::Q6K => (QBits::Eight, Grain::Sub16),
        // Q8_1 and Q8_K are ggml's activation formats: no converter writes weights in them.
        T::Q8_1 | T::Q8K | T::F32 | T::F16 | T::BF16 => return None,
    })
}

/// The scale and min of K-quant sub-block `j` (0..8) from the 12 packed 6-bit bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 16 six-bit scales of a Q3_K block (0..63, before the −32) from its 12 packed bytes.
fn q3k_scales(p: &[u8]) -> [u8; 16] {
    let mut s = [0u8; 16];
    for j in 0..16 {
        let low = if j < 8 { p[j] & 0xF } else { p[j - 8] >> 4 };
        let high = (p[8 + j % 4] >> (2 * (j / 4))) & 3;
        s[j] = low | (high << 4);
    }
    s
}

/// Scales decoded from one ggml block (see [`Grain`]).
#[derive(Default)]
struct Scales {
    d: Vec<f32>,
    m: Vec<f32>,
    /// [`Grain::Sub16`]: per super-block, 16 `sc`, then 16 `mn`; Q4_K/Q5_K: per block `sc`, `mn`.
    scm: Vec<i8>,
}

/// Decode one ggml block of `ty` into unsigned quants `v` (one per element) and its scales,
/// appended to `s`. The arithmetic is the ggml block definition's, rearranged exactly.
fn unpack_block(ty: ferrolm_gguf::GgmlType, blk: &[u8], v: &mut [u8], s: &mut Scales) {
    use ferrolm_gguf::GgmlType as T;
    match ty {
        T::Q4_0 | T::Q4_1 => {
            let d = f16_at(blk, 0);
            let (m, qs) = if ty == T::Q4_0 {
                (-8.0 * d, &blk[2..18])
            } else {
                (f16_at(blk, 2), &blk[4..20])
            };
            s.d.push(d);
            s.m.push(m);
            for j in 0..16 {
                v[j] = qs[j] & 0x0F;
                v[j + 16] = qs[j] >> 4;
            }
        }
        T::Q5_0 | T::Q5_1 => {
            let d = f16_at(blk, 0);
            let (m, at) = if ty == T::Q5_0 {
                (-16.0 * d, 2)
            } else {
                (f16_at(blk, 2), 4)
            };
            s.d.push(d);
            s.m.push(m);
            let qh = u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
            let qs = &blk[at + 4..at + 20];
            for j in 0..16 {
                v[j] = (qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
                v[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            }
        }
        T::Q8_0 => {
            let d = f16_at(blk, 0);
            s.d.push(d);
            s.m.push(-128.0 * d);
            for j in 0..QK {
                v[j] = (blk[2 + j] as i8 as i16 + 128) as u8;
            }
        }
        T::Q4K | T::Q5K => {
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let scales = &blk[4..16];
            let (qh, ql) = if ty == T::Q4K {
                (None, &blk[16..144])
            } else {
                (Some(&blk[16..48]), &blk[48..176])
            };
            for j in 0..4 {
                for half in 0..2 {
                    let (sc, mn) = scale_min_k4(2 * j + half, scales);
                    s.d.push(d * sc as f32);
                    s.m.push(-(dmin * mn as f32));
                    s.scm.extend([sc as i8, mn as i8]);
                    for l in 0..32 {
                        let q = ql[32 * j + l] >> (4 * half) & 0x0F;
                        let h = qh.map_or(0, |qh| (qh[l] >> (2 * j + half)) & 1);
                        v[64 * j + 32 * half + l] = q | (h << 4);
                    }
                }
            }
        }
        T::Q6K => {
            let (ql, qh, scales) = (&blk[0..128], &blk[128..192], &blk[192..208]);
            let d = f16_at(blk, 208);
            s.d.push(d);
            s.m.push(-32.0 * d);
            s.scm.extend(scales.iter().map(|&b| b as i8));
            s.scm.extend(scales.iter().map(|&b| b as i8));
            for n in 0..2 {
                let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
                let v = &mut v[128 * n..];
                for l in 0..32 {
                    v[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                    v[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                    v[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    v[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
        }
        T::Q3K => {
            let (hmask, qs) = (&blk[0..32], &blk[32..96]);
            let scales = q3k_scales(&blk[96..108]);
            let d = f16_at(blk, 108);
            s.d.push(d);
            s.m.push(-4.0 * d);
            s.scm.extend(scales.iter().map(|&b| b as i8 - 32));
            s.scm.extend(scales.iter().map(|&b| b as i8 - 32));
            for (e, v) in v.iter_mut().enumerate() {
                let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                let low = (qs[32 * n + l] >> (2 * j)) & 3;
                let high = (hmask[l] >> (4 * n + j)) & 1;
                *v = low | (high << 2);
            }
        }
        T::Q2K => {
            let (scales, qs) = (&blk[0..16], &blk[16..80]);
            s.d.push(f16_at(blk, 80));
            s.m.push(-f16_at(blk, 82));
            s.scm.extend(scales.iter().map(|&b| (b & 0xF) as i8));
            s.scm.extend(scales.iter().map(|&b| (b >> 4) as i8));
            for (e, v) in v.iter_mut().enumerate() {
                let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
                *v = (qs[32 * n + l] >> (2 * j)) & 3;
            }
        }
        T::Q8_1 | T::Q8K | T::F32 | T::F16 | T::BF16 => {
            unreachable!("repack_form refuses these types")
        }
    }
}

impl QMatrix {
    pub fn nb(&self) -> usize {
        self.cols / QK
    }

    fn row_bytes(&self) -> usize {
        match (self.layout, self.bits) {
            (Layout::Packed5 | Layout::Group16Packed5, _) => self.cols / 2 + self.cols / 8,
            (_, QBits::Four) => self.cols / 2,
            (_, QBits::Eight) => self.cols,
        }
    }

    /// Re-lay the matrix for `isa`'s kernels: [`Self::interleave16`] on AVX-512 VNNI,
    /// [`Self::prepare_avx2`] on AVX2. A Block32 K-quant that stays row-major drops its
    /// integer scales (the row kernels read `d` and `m`).
    pub fn prepare(&mut self, isa: Isa) {
        match isa {
            Isa::Avx512Vnni => {
                self.interleave16();
            }
            Isa::Avx2 => self.prepare_avx2(),
            Isa::Scalar => {}
        }
        if self.grain == Grain::Block32 && self.layout != Layout::Group16 {
            self.scm = Vec::new();
        }
    }

    /// A [`Layout::Group16`] [`Grain::Block32`] matrix from a K-quant (Q4_K, Q5_K) whose block
    /// scales are kept as the file has them, which is a quarter of the bytes of f32 `d` and
    /// `m` per block: per (group, super-block) `d` holds the 16 rows' `D` and `m` their
    /// `−dmin` (f32), and per (group, block) `scm` holds the 16 rows' `sc` then their `mn`
    /// (32 bytes). The block's scale is `D·sc` and its offset `−dmin·mn`, the same f32
    /// products [`unpack_block`] forms (exact: an f16 times a 6-bit integer).
    fn kscales(&self) -> bool {
        self.layout == Layout::Group16 && self.grain == Grain::Block32 && !self.scm.is_empty()
    }

    /// The scale and offset of block `b` of row `r` (any layout, [`Grain::Block32`]).
    fn block_dm(&self, r: usize, b: usize) -> (f32, f32) {
        let nb = self.nb();
        match self.layout {
            Layout::Rows | Layout::Packed5 | Layout::Signed8 => {
                let at = r * nb + b;
                (self.d[at], self.m_of(at))
            }
            Layout::Group16 if self.kscales() => {
                let gsb = (r / 16) * (nb / 8) + b / 8;
                let at = ((r / 16) * nb + b) * 32 + r % 16;
                let (sc, mn) = (self.scm[at] as f32, self.scm[at + 16] as f32);
                (
                    self.d[gsb * 16 + r % 16] * sc,
                    self.m[gsb * 16 + r % 16] * mn,
                )
            }
            Layout::Group16 | Layout::Group16Packed5 => {
                let at = ((r / 16) * nb + b) * 16 + r % 16;
                (self.d[at], self.m_of(at))
            }
        }
    }

    /// Re-lay a row-major matrix for the AVX2 kernels, which are bound by the bytes decoding
    /// reads: drop `m` where every offset is a fixed multiple of `d` ([`Self::m_fixed`]); where
    /// the rows come in 16s (and [`batch_invariant`] is on), interleave what the AVX2 group
    /// kernels read ([`Self::avx2_groups`]: Q4_K, Q4_1, Q2_K, Q3_K, Q6_K) as
    /// [`Layout::Group16`] and 8-bit [`Grain::Block32`] matrices whose values are all below 32
    /// (Q5_0, Q5_1, Q5_K) as [`Layout::Group16Packed5`]; otherwise pack those as
    /// [`Layout::Packed5`] and store Q8_0 as [`Layout::Signed8`]. Lossless; a no-op for
    /// anything else.
    pub fn prepare_avx2(&mut self) {
        if self.layout != Layout::Rows {
            return;
        }
        let fixed = [-8.0f32, -16.0, -128.0].into_iter().find(|&c| {
            self.grain == Grain::Block32 && self.d.iter().zip(&self.m).all(|(&d, &m)| m == c * d)
        });
        if let Some(c) = fixed {
            self.m_fixed = Some(c);
            self.m = Vec::new();
        }
        // Prompts with batch invariance off (`FERROLM_BATCH_INVARIANT=0`, read once at load
        // here) take the f32 GEMM panels, which dequantize row-major matrices fastest: grouped,
        // Q4_1 SmolLM2 prefill-512 fell from ~480 to ~330 tok/s on one thread.
        if batch_invariant() && self.avx2_groups() && self.interleave16() {
            return;
        }
        if self.grain != Grain::Block32 || self.bits != QBits::Eight {
            return;
        }
        if self.five_bit() {
            if batch_invariant() && self.regroup(Layout::Group16Packed5) {
                return;
            }
            self.pack5();
        } else if fixed == Some(-128.0) {
            self.qs.iter_mut().for_each(|v| *v ^= 0x80);
            self.layout = Layout::Signed8;
        }
    }

    /// An 8-bit [`Grain::Block32`] matrix whose quants all fit in 5 bits (Q5_0, Q5_1, Q5_K
    /// repacked), which the AVX2 kernels read as [`Layout::Group16Packed5`] or
    /// [`Layout::Packed5`].
    fn five_bit(&self) -> bool {
        self.bits == QBits::Eight
            && self.grain == Grain::Block32
            && self.layout == Layout::Rows
            && self.qs.iter().all(|&v| v < 32)
    }

    /// The offset of block `at` (an index into `d`).
    fn m_of(&self, at: usize) -> f32 {
        match self.m_fixed {
            Some(c) => c * self.d[at],
            None => self.m[at],
        }
    }

    /// [`Layout::Packed5`] (see [`Self::prepare_avx2`]).
    fn pack5(&mut self) {
        let (nb, cols) = (self.nb(), self.cols);
        let rb = cols / 2 + cols / 8;
        let mut qs = vec![0u8; self.rows * rb];
        for (src, dst) in self.qs.chunks_exact(cols).zip(qs.chunks_exact_mut(rb)) {
            let nib: Vec<u8> = src.iter().map(|v| v & 0x0F).collect();
            let (lo, hi) = dst.split_at_mut(cols / 2);
            let mut packed = Vec::with_capacity(cols / 2);
            pack_nibbles(&nib, &mut packed);
            lo.copy_from_slice(&packed);
            for b in 0..nb {
                let bits = src[b * QK..(b + 1) * QK]
                    .iter()
                    .enumerate()
                    .fold(0u32, |a, (j, &v)| a | (((v >> 4) as u32) << j));
                hi[b * 4..b * 4 + 4].copy_from_slice(&bits.to_le_bytes());
            }
        }
        self.qs = qs;
        self.layout = Layout::Packed5;
    }

    /// Repack the ggml bytes of a `[rows, cols]` matrix of any quantized type (see
    /// [`repack_form`]), losslessly. `None` for float types, a row length that is not a
    /// multiple of the type's block (32, or 256 for K-quants), or a byte count that does not
    /// match.
    pub fn from_ggml(
        ty: ferrolm_gguf::GgmlType,
        rows: usize,
        cols: usize,
        raw: &[u8],
    ) -> Option<Self> {
        let (bits, grain) = repack_form(ty)?;
        let bs = ty.block_size() as usize;
        let bb = ty.block_bytes() as usize;
        if cols == 0 || !cols.is_multiple_of(bs) || raw.len() != rows * (cols / bs) * bb {
            return None;
        }
        let mut s = Scales::default();
        let mut qs = Vec::with_capacity(rows * if bits == QBits::Four { cols / 2 } else { cols });
        let mut vals = vec![0u8; cols];
        let mut vmax = 0u8;
        for (r, row) in raw.chunks_exact((cols / bs) * bb).enumerate() {
            debug_assert!(r < rows);
            for (blk, v) in row.chunks_exact(bb).zip(vals.chunks_exact_mut(bs)) {
                unpack_block(ty, blk, v, &mut s);
            }
            vmax = vals.iter().fold(vmax, |a, &b| a.max(b));
            match bits {
                QBits::Four => pack_nibbles(&vals, &mut qs),
                QBits::Eight => qs.extend_from_slice(&vals),
            }
        }
        Some(QMatrix {
            rows,
            cols,
            bits,
            layout: Layout::Rows,
            grain,
            d: s.d,
            m: s.m,
            scm: s.scm,
            qs,
            small: vmax < 64,
            m_fixed: None,
        })
    }

    /// The AVX2 group kernels (`x86::group16_avx2`, `x86::group16_sub16_avx2`) read this
    /// matrix once it is in [`Layout::Group16`]: 4-bit [`Grain::Block32`] quants (Q4_K, Q4_1)
    /// or [`Grain::Sub16`] ones below 64 (Q2_K, Q3_K, Q6_K), whose `vpmaddubsw` sums cannot
    /// saturate. 8-bit [`Grain::Block32`] matrices below 32 (the Q5 types) have their own
    /// grouped layout, [`Layout::Group16Packed5`] (`x86::group16_5_avx2`); Q8_0 keeps its
    /// AVX2 row layout.
    fn avx2_groups(&self) -> bool {
        match self.grain {
            Grain::Block32 => self.bits == QBits::Four && self.m_fixed.is_none(),
            Grain::Sub16 => self.small,
        }
    }

    /// Bytes of one (16-row group, block) of quants in [`Layout::Group16`].
    fn group_block_bytes(&self) -> usize {
        16 * self.row_bytes() / self.nb()
    }

    /// Repack into [`Layout::Group16`] (same bytes, other order); `false` (unchanged) unless
    /// the rows come in whole groups of 16 and the layout is [`Layout::Rows`].
    ///
    /// [`Grain::Sub16`] matrices keep the same quant order; their scales go per (group,
    /// super-block): `D` and `M` as 16 f32 (one per row), and `scm` as 512 bytes, byte
    /// `16·j + r` the `sc` of sub-block `j` of row `r`, byte `256 + 16·j + r` its `mn` — the
    /// same bytes per weight as [`Layout::Rows`].
    pub fn interleave16(&mut self) -> bool {
        self.m_fixed.is_none() && self.regroup(Layout::Group16)
    }

    /// [`Self::interleave16`] into `to`: [`Layout::Group16`], or [`Layout::Group16Packed5`]
    /// for an 8-bit [`Grain::Block32`] matrix whose values are all below 32 (whose fixed
    /// offsets, if [`Self::m_fixed`], stay unstored).
    fn regroup(&mut self, to: Layout) -> bool {
        if self.layout != Layout::Rows || !self.rows.is_multiple_of(16) {
            return false;
        }
        let five = to == Layout::Group16Packed5;
        assert!(
            to == Layout::Group16 || (five && self.grain == Grain::Block32),
            "regroup makes the 16-row layouts"
        );
        let nb = self.nb();
        let groups = self.rows / 16;
        self.layout = to;
        let gbb = self.group_block_bytes();
        self.layout = Layout::Rows;
        let nsb = self.cols / QK_K;
        // Block32 K-quant scales stay integer in Group16 (see [`Self::kscales`]).
        let kq = self.grain == Grain::Block32 && !self.scm.is_empty() && !five;
        let scale_len = if kq { groups * nsb * 16 } else { self.d.len() };
        let mut d = vec![0f32; scale_len];
        let mut m = vec![0f32; if self.m_fixed.is_some() { 0 } else { scale_len }];
        let mut scm = vec![0i8; self.scm.len()];
        let mut qs = huge_zeroed(self.qs.len());
        let mut exact = true;
        for g in 0..groups {
            for r in 0..16 {
                let row = g * 16 + r;
                let vals = self.row_values(row);
                if self.grain == Grain::Sub16 {
                    for sb in 0..nsb {
                        let (gsb, at) = (g * nsb + sb, (row * nsb + sb) * 32);
                        d[gsb * 16 + r] = self.d[row * nsb + sb];
                        m[gsb * 16 + r] = self.m[row * nsb + sb];
                        for j in 0..32 {
                            scm[gsb * 512 + 16 * j + r] = self.scm[at + j];
                        }
                    }
                }
                if kq {
                    // `D` and `−dmin` back from any block whose multiplier is not 0 (the
                    // products are exact, so the quotients are too); checked below.
                    for sb in 0..nsb {
                        let gsb = (g * nsb + sb) * 16 + r;
                        for b in sb * 8..sb * 8 + 8 {
                            let (at, (sc, mn)) = (row * nb + b, self.k_sc_mn(row * nb + b));
                            if sc != 0 {
                                d[gsb] = self.d[at] / sc as f32;
                            }
                            if mn != 0 {
                                m[gsb] = self.m[at] / mn as f32;
                            }
                        }
                        for b in sb * 8..sb * 8 + 8 {
                            let (at, (sc, mn)) = (row * nb + b, self.k_sc_mn(row * nb + b));
                            exact &= d[gsb] * sc as f32 == self.d[at]
                                && m[gsb] * mn as f32 == self.m[at];
                            scm[(g * nb + b) * 32 + r] = sc;
                            scm[(g * nb + b) * 32 + 16 + r] = mn;
                        }
                    }
                }
                for b in 0..nb {
                    let gb = g * nb + b;
                    if self.grain == Grain::Block32 && !kq {
                        d[gb * 16 + r] = self.d[row * nb + b];
                        if self.m_fixed.is_none() {
                            m[gb * 16 + r] = self.m[row * nb + b];
                        }
                    }
                    let v = &vals[b * QK..(b + 1) * QK];
                    let out = &mut qs[gb * gbb..(gb + 1) * gbb];
                    for i in 0..4 {
                        if five {
                            for p in 0..4 {
                                out[p * 64 + r * 4 + i] =
                                    (v[8 * p + i] & 0x0F) | ((v[8 * p + 4 + i] & 0x0F) << 4);
                            }
                            out[256 + r * 4 + i] =
                                (0..8).fold(0u8, |a, k| a | (((v[4 * k + i] >> 4) & 1) << k));
                            continue;
                        }
                        match self.bits {
                            QBits::Eight => {
                                for k in 0..8 {
                                    out[k * 64 + r * 4 + i] = v[4 * k + i];
                                }
                            }
                            QBits::Four => {
                                for p in 0..4 {
                                    out[p * 64 + r * 4 + i] =
                                        v[8 * p + i] | (v[8 * p + 4 + i] << 4);
                                }
                            }
                        }
                    }
                }
            }
        }
        if !exact {
            // Scales that are not an f32 times small integers (not from a ggml K-quant block):
            // group them as f32 per block instead.
            self.scm = Vec::new();
            return self.regroup(to);
        }
        (self.d, self.m, self.scm, self.qs) = (d, m, scm, qs);
        self.layout = to;
        true
    }

    /// The 6-bit scale and offset multipliers of block `at` (`r·nb + b`) of a row-major
    /// Block32 K-quant.
    fn k_sc_mn(&self, at: usize) -> (i8, i8) {
        (self.scm[2 * at], self.scm[2 * at + 1])
    }

    /// Unpacked quant values of row `r` (one per element).
    fn row_values(&self, r: usize) -> Vec<u8> {
        if self.layout == Layout::Group16Packed5 {
            let (nb, gbb) = (self.nb(), self.group_block_bytes());
            let (g, rr) = (r / 16, r % 16);
            let mut out = vec![0u8; self.cols];
            for b in 0..nb {
                let q = &self.qs[(g * nb + b) * gbb..(g * nb + b + 1) * gbb];
                for (e, o) in out[b * QK..(b + 1) * QK].iter_mut().enumerate() {
                    let (k, i) = (e / 4, e % 4);
                    let byte = q[(k / 2) * 64 + rr * 4 + i];
                    let nib = if k % 2 == 0 { byte & 0x0F } else { byte >> 4 };
                    *o = nib | (((q[256 + rr * 4 + i] >> k) & 1) << 4);
                }
            }
            return out;
        }
        if self.layout == Layout::Group16 {
            let (nb, gbb) = (self.nb(), self.group_block_bytes());
            let (g, rr) = (r / 16, r % 16);
            let mut out = vec![0u8; self.cols];
            for b in 0..nb {
                let q = &self.qs[(g * nb + b) * gbb..(g * nb + b + 1) * gbb];
                for (e, o) in out[b * QK..(b + 1) * QK].iter_mut().enumerate() {
                    let (k, i) = (e / 4, e % 4);
                    *o = match self.bits {
                        QBits::Eight => q[k * 64 + rr * 4 + i],
                        QBits::Four => {
                            let byte = q[(k / 2) * 64 + rr * 4 + i];
                            if k % 2 == 0 {
                                byte & 0x0F
                            } else {
                                byte >> 4
                            }
                        }
                    };
                }
            }
            return out;
        }
        let rb = self.row_bytes();
        let q = &self.qs[r * rb..(r + 1) * rb];
        if self.layout == Layout::Signed8 {
            return q.iter().map(|v| v ^ 0x80).collect();
        }
        if self.layout == Layout::Packed5 {
            let mut out = vec![0u8; self.cols];
            let mut vals = [0u8; QK];
            for (b, o) in out.chunks_exact_mut(QK).enumerate() {
                values5(q, self.cols, b, &mut vals);
                o.copy_from_slice(&vals);
            }
            return out;
        }
        match self.bits {
            QBits::Eight => q.to_vec(),
            QBits::Four => {
                let nb = self.nb();
                let mut out = vec![0u8; self.cols];
                let mut b = 0;
                while b + 1 < nb {
                    let p = &q[b * 16..b * 16 + 32];
                    for j in 0..32 {
                        out[b * QK + j] = p[j] & 0x0F;
                        out[b * QK + j + 32] = p[j] >> 4;
                    }
                    b += 2;
                }
                if b < nb {
                    let p = &q[b * 16..b * 16 + 16];
                    for j in 0..16 {
                        out[b * QK + j] = p[j] & 0x0F;
                        out[b * QK + j + 16] = p[j] >> 4;
                    }
                }
                out
            }
        }
    }

    /// Dequantize row `r` into `out` (the slow, obviously-correct path; also the embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let nb = self.nb();
        let vals = self.row_values(r);
        if self.grain == Grain::Sub16 {
            let nsb = self.cols / QK_K;
            for (j, (o, v)) in out[..self.cols]
                .chunks_exact_mut(16)
                .zip(vals.chunks_exact(16))
                .enumerate()
            {
                // (index of D and M, index of sc; mn is `step` bytes after sc)
                let (sb, at, step) = match self.layout {
                    Layout::Group16 => {
                        let gsb = (r / 16) * nsb + j / 16;
                        (gsb * 16 + r % 16, gsb * 512 + (j % 16) * 16 + r % 16, 256)
                    }
                    _ => (r * nsb + j / 16, (r * nsb + j / 16) * 32 + j % 16, 16),
                };
                let d = self.d[sb] * self.scm[at] as f32;
                let m = self.m[sb] * self.scm[at + step] as f32;
                for (o, &q) in o.iter_mut().zip(v) {
                    *o = d * q as f32 + m;
                }
            }
            return;
        }
        for b in 0..nb {
            let (d, m) = self.block_dm(r, b);
            for j in 0..QK {
                out[b * QK + j] = d * vals[b * QK + j] as f32 + m;
            }
        }
    }

    /// Dequantize rows `rows` of a [`Layout::Rows`] matrix into `out` (`rows.len() × cols`,
    /// row-major): the weight panel of the f32 GEMM path. Same values as [`Self::dequantize_row`].
    pub fn dequantize_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]) {
        assert!(
            matches!(
                self.layout,
                Layout::Rows | Layout::Packed5 | Layout::Signed8
            ),
            "dequantize_rows reads row-major matrices"
        );
        assert!(rows.end <= self.rows && out.len() >= rows.len() * self.cols);
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA are present; the body only indexes checked slices.
            unsafe { x86::dequantize_rows_avx2(self, rows, out) };
            return;
        }
        self.dequantize_rows_generic(rows, out);
    }

    /// The loop behind [`Self::dequantize_rows`], written so the compiler vectorises it for
    /// whatever target features the caller enables.
    #[inline(always)]
    fn dequantize_rows_generic(&self, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let (cols, nb, rb) = (self.cols, self.nb(), self.row_bytes());
        for (i, r) in rows.enumerate() {
            let o = &mut out[i * cols..(i + 1) * cols];
            let q = &self.qs[r * rb..(r + 1) * rb];
            if self.grain == Grain::Block32 && self.m_fixed.is_some() {
                let d = &self.d[r * nb..(r + 1) * nb];
                let c = self.m_fixed.unwrap_or(0.0);
                match self.layout {
                    Layout::Signed8 => {
                        for (b, (o, q)) in
                            o.chunks_exact_mut(QK).zip(q.chunks_exact(QK)).enumerate()
                        {
                            for (o, &v) in o.iter_mut().zip(q) {
                                *o = d[b] * (v as i8) as f32;
                            }
                        }
                    }
                    Layout::Packed5 => dequantize5(q, cols, d, |b| c * d[b], o),
                    _ => self.dequantize_block32(q, d, |b| c * d[b], o),
                }
                continue;
            }
            if self.layout == Layout::Packed5 {
                let (d, m) = (&self.d[r * nb..(r + 1) * nb], &self.m[r * nb..(r + 1) * nb]);
                dequantize5(q, cols, d, |b| m[b], o);
                continue;
            }
            if self.grain == Grain::Sub16 {
                let nsb = cols / QK_K;
                for (j, o) in o.chunks_exact_mut(16).enumerate() {
                    let sb = r * nsb + j / 16;
                    let at = sb * 32 + j % 16;
                    let d = self.d[sb] * self.scm[at] as f32;
                    let m = self.m[sb] * self.scm[at + 16] as f32;
                    let b = j / 2;
                    let half = (j % 2) * 16;
                    match self.bits {
                        QBits::Eight => {
                            let v = &q[j * 16..j * 16 + 16];
                            for (o, &v) in o.iter_mut().zip(v) {
                                *o = d * v as f32 + m;
                            }
                        }
                        QBits::Four => {
                            let p = &q[(b / 2) * 32 + half..(b / 2) * 32 + half + 16];
                            let shift = if b % 2 == 0 { 0 } else { 4 };
                            for (o, &v) in o.iter_mut().zip(p) {
                                *o = d * ((v >> shift) & 0x0F) as f32 + m;
                            }
                        }
                    }
                }
                continue;
            }
            let (d, m) = (&self.d[r * nb..(r + 1) * nb], &self.m[r * nb..(r + 1) * nb]);
            self.dequantize_block32(q, d, |b| m[b], o);
        }
    }

    /// One row-major [`Grain::Block32`] row (4- or 8-bit) into `o`, the offset of block `b`
    /// being `m(b)`.
    #[inline(always)]
    fn dequantize_block32(&self, q: &[u8], d: &[f32], m: impl Fn(usize) -> f32, o: &mut [f32]) {
        let nb = self.nb();
        match self.bits {
            QBits::Eight => {
                for b in 0..nb {
                    let (d, m) = (d[b], m(b));
                    let v = &q[b * QK..(b + 1) * QK];
                    for (o, &v) in o[b * QK..(b + 1) * QK].iter_mut().zip(v) {
                        *o = d * v as f32 + m;
                    }
                }
            }
            QBits::Four => {
                let mut b = 0;
                while b + 1 < nb {
                    let p = &q[b * 16..b * 16 + 32];
                    let (d0, m0, d1, m1) = (d[b], m(b), d[b + 1], m(b + 1));
                    let (lo, hi) = o[b * QK..(b + 2) * QK].split_at_mut(QK);
                    for ((l, h), &v) in lo.iter_mut().zip(hi.iter_mut()).zip(p) {
                        *l = d0 * (v & 0x0F) as f32 + m0;
                        *h = d1 * (v >> 4) as f32 + m1;
                    }
                    b += 2;
                }
                if b < nb {
                    let p = &q[b * 16..b * 16 + 16];
                    let (d0, m0) = (d[b], m(b));
                    let (lo, hi) = o[b * QK..(b + 1) * QK].split_at_mut(16);
                    for ((l, h), &v) in lo.iter_mut().zip(hi.iter_mut()).zip(p) {
                        *l = d0 * (v & 0x0F) as f32 + m0;
                        *h = d0 * (v >> 4) as f32 + m0;
                    }
                }
            }
        }
    }

    pub fn memory_bytes(&self) -> usize {
        (self.d.len() + self.m.len()) * 4 + self.scm.len() + self.qs.len()
    }

    /// Stack matrices of the same width, bits and scale grain along the rows, for the kernels
    /// of `isa`. `None` if they differ, or on AVX2 if some are [`Self::five_bit`] and others
    /// not: fused, a Q5_0 q‖k with a Q8_0 v (llama-quantize's fallbacks for 576-wide Q4_K and
    /// Q6_K rows) would be a full 8-bit matrix, which AVX2 runs on its slowest row kernel
    /// (nibble-split 8-bit, ~12% of SmolLM2 Q4_K_M prefill); apart, q and k take the 5-bit
    /// group kernel and v the signed-byte one. AVX-512 runs the fused 8-bit matrix on its
    /// 8-bit group kernel, so there the parts stay one matrix and one parallel pass (apart
    /// was not measured faster: SmolLM2 Q4_K_M at 2 threads read the same within the noise).
    pub fn concat_rows(parts: &[QMatrix], isa: Isa) -> Option<QMatrix> {
        let first = parts.first()?;
        if parts.iter().any(|p| {
            p.cols != first.cols
                || p.bits != first.bits
                || p.grain != first.grain
                || p.layout != Layout::Rows
                || p.m_fixed.is_some()
                || (isa == Isa::Avx2 && p.five_bit() != first.five_bit())
        }) {
            return None;
        }
        Some(QMatrix {
            layout: Layout::Rows,
            grain: first.grain,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            bits: first.bits,
            d: parts.iter().flat_map(|p| p.d.iter().copied()).collect(),
            m: parts.iter().flat_map(|p| p.m.iter().copied()).collect(),
            // Block32 K-quant multipliers only if every part has them (Q4_K fused with Q4_0
            // keeps f32 scales).
            scm: if first.grain == Grain::Sub16 || parts.iter().all(|p| !p.scm.is_empty()) {
                parts.iter().flat_map(|p| p.scm.iter().copied()).collect()
            } else {
                Vec::new()
            },
            qs: parts.iter().flat_map(|p| p.qs.iter().copied()).collect(),
            small: parts.iter().all(|p| p.small),
            m_fixed: None,
        })
    }
}

/// Activations quantized to 8 bits per 32-block: `n` rows of `cols`.
#[derive(Debug, Default)]
pub struct QActs {
    pub n: usize,
    pub cols: usize,
    d: Vec<f32>,
    sx: Vec<f32>,
    /// `d · Σ qx` over each 16-element half block (the offsets of [`Grain::Sub16`] weights).
    s16: Vec<f32>,
    qs: Vec<i8>,
    /// `d · qx` as f32, `n × cols`, for the f32 GEMM path: filled when `gemm`.
    xf: Vec<f32>,
    /// These activations go through the f32 GEMM path (`n >= GEMM_MIN_TOKENS` and not
    /// [`batch_invariant`]), decided once per quantization.
    gemm: bool,
}

impl QActs {
    /// Quantize `x` (`n × cols`, row-major) in place of the previous contents; buffers are
    /// reused, so steady-state decoding allocates nothing.
    pub fn quantize(&mut self, x: &[f32], n: usize, cols: usize) {
        self.quantize_with(x, n, cols, n >= GEMM_MIN_TOKENS && !batch_invariant());
    }

    /// [`Self::quantize`], choosing the path: `gemm` also keeps the dequantized activations,
    /// and AVX2 matmuls of them take the f32 GEMM path (what `FERROLM_BATCH_INVARIANT=0` picks
    /// from [`GEMM_MIN_TOKENS`] tokens on; tests take it without the process-wide switch).
    pub fn quantize_with(&mut self, x: &[f32], n: usize, cols: usize, gemm: bool) {
        debug_assert_eq!(x.len(), n * cols);
        let nb = cols / QK;
        self.n = n;
        self.cols = cols;
        self.d.resize(n * nb, 0.0);
        self.sx.resize(n * nb, 0.0);
        self.s16.resize(2 * n * nb, 0.0);
        self.qs.resize(n * cols, 0);
        #[cfg(target_arch = "x86_64")]
        let simd = simd_quantize();
        for (bi, blk) in x.chunks_exact(QK).enumerate() {
            let q = &mut self.qs[bi * QK..(bi + 1) * QK];
            #[cfg(target_arch = "x86_64")]
            let (d, sum) = if simd {
                // SAFETY: AVX2 checked by `simd_quantize`; both slices are exactly one block.
                unsafe { x86::quantize_block_avx2(blk, q) }
            } else {
                quantize_block(blk, q)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (d, sum) = quantize_block(blk, q);
            self.d[bi] = d;
            self.sx[bi] = d * sum as f32;
            let s0: i32 = q[..16].iter().map(|&v| v as i32).sum();
            self.s16[2 * bi] = d * s0 as f32;
            self.s16[2 * bi + 1] = d * (sum - s0) as f32;
        }
        self.gemm = gemm;
        if self.gemm {
            self.xf.resize(n * cols, 0.0);
            for (bi, (o, q)) in self
                .xf
                .chunks_exact_mut(QK)
                .zip(self.qs.chunks_exact(QK))
                .enumerate()
            {
                let d = self.d[bi];
                for (o, &q) in o.iter_mut().zip(q) {
                    *o = d * q as f32;
                }
            }
        }
    }
}

impl QActs {
    /// Token `t`'s quants, block scales and half-block sums.
    fn qs_of(&self, t: usize) -> &[i8] {
        &self.qs[t * self.cols..(t + 1) * self.cols]
    }
    fn d_of(&self, t: usize) -> &[f32] {
        let nb = self.cols / QK;
        &self.d[t * nb..(t + 1) * nb]
    }
    fn s16_of(&self, t: usize) -> &[f32] {
        let n16 = self.cols / 16;
        &self.s16[t * n16..(t + 1) * n16]
    }

    /// `Σ_i w[i] · x̂_t[i]`: row `t` of the quantized activations, dequantized, against `w`.
    fn dequantized_dot(&self, t: usize, w: &[f32]) -> f32 {
        let nb = self.cols / QK;
        (0..nb)
            .map(|b| {
                let q = &self.qs[t * self.cols + b * QK..][..QK];
                let s: f32 = q
                    .iter()
                    .zip(&w[b * QK..])
                    .map(|(&q, &w)| q as f32 * w)
                    .sum();
                self.d[t * nb + b] * s
            })
            .sum()
    }
}

/// Whether activations are rounded by the AVX2+FMA kernel: [`Isa::detect`] finds at least
/// AVX2 (the CPU has AVX2 and FMA, and `FERROLM_ISA` does not ask for scalar code). Read once,
/// not per call, as the attention kernels' checks are.
#[cfg(target_arch = "x86_64")]
fn simd_quantize() -> bool {
    static SIMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SIMD.get_or_init(|| Isa::detect() != Isa::Scalar)
}

/// One block of 32 activations → i8 with scale `amax / 127`, rounding half to even (as
/// `vcvtps2dq` does); returns the scale and the sum of the quants.
fn quantize_block(blk: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (qi, &v) in q.iter_mut().zip(blk) {
        let r = (v * id).round_ties_even() as i32;
        *qi = r as i8;
        sum += r;
    }
    (d, sum)
}

/// `dot(w row r, x row t)` for the AVX2 and scalar paths (AVX-512 runs the tiles in `matmul`).
fn dot_row(isa: Isa, w: &QMatrix, r: usize, x: &QActs, t: usize) -> f32 {
    let nb = w.nb();
    let rb = w.row_bytes();
    let wq = &w.qs[r * rb..(r + 1) * rb];
    let xq = &x.qs[t * w.cols..(t + 1) * w.cols];
    let xd = &x.d[t * nb..(t + 1) * nb];
    if w.grain == Grain::Sub16 {
        let row = Sub16Row::of(w, r);
        let s16 = x.s16_of(t);
        return match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => (unsafe { x86::sub16_avx2::<1>(&row, [xq], [xd], [s16]) })[0],
            _ => dot_sub16_scalar(&row, xq, xd, s16),
        };
    }
    let wd = &w.d[r * nb..(r + 1) * nb];
    let wm = &w.m[r * nb..(r + 1) * nb];
    let xs = &x.sx[t * nb..(t + 1) * nb];
    let mut acc = 0f32;
    for b in 0..nb {
        acc += wm[b] * xs[b];
    }
    // AVX2 runs every Block32 matrix in `matmul`'s four-row kernel; this is the scalar path.
    acc + match w.bits {
        QBits::Four => dot4_scalar(wq, wd, xq, xd),
        QBits::Eight => dot8_scalar(wq, wd, xq, xd),
    }
}

/// One row of a [`Grain::Sub16`] matrix: quants, super-block `D` and `M`, sub-block `sc`, `mn`.
struct Sub16Row<'a> {
    four: bool,
    q: &'a [u8],
    d: &'a [f32],
    m: &'a [f32],
    scm: &'a [i8],
}

impl<'a> Sub16Row<'a> {
    /// Row `r` of a [`Grain::Sub16`] matrix.
    fn of(w: &'a QMatrix, r: usize) -> Self {
        let (nsb, rb) = (w.cols / QK_K, w.row_bytes());
        Sub16Row {
            four: w.bits == QBits::Four,
            q: &w.qs[r * rb..(r + 1) * rb],
            d: &w.d[r * nsb..(r + 1) * nsb],
            m: &w.m[r * nsb..(r + 1) * nsb],
            scm: &w.scm[r * nsb * 32..(r + 1) * nsb * 32],
        }
    }

    /// The 32 quants of block `b`.
    fn block(&self, b: usize) -> [u8; QK] {
        if self.four {
            let p = &self.q[(b / 2) * 32..(b / 2) * 32 + 32];
            std::array::from_fn(|j| {
                if b.is_multiple_of(2) {
                    p[j] & 0x0F
                } else {
                    p[j] >> 4
                }
            })
        } else {
            std::array::from_fn(|j| self.q[b * QK + j])
        }
    }
}

/// `Σ_sb D·Σ_b dx_b·(sc_lo·Σ_lo q·qx + sc_hi·Σ_hi q·qx) + M·Σ_j mn_j·s16_j` (scalar reference
/// for [`Grain::Sub16`] rows).
fn dot_sub16_scalar(w: &Sub16Row, xq: &[i8], xd: &[f32], s16: &[f32]) -> f32 {
    let mut acc = 0f32;
    for sb in 0..w.d.len() {
        let (mut isum, mut off) = (0f32, 0f32);
        for b in 8 * sb..8 * sb + 8 {
            let q = w.block(b);
            let x = &xq[b * QK..(b + 1) * QK];
            let lo = block_isum_u8(q[..16].iter().copied(), &x[..16]);
            let hi = block_isum_u8(q[16..].iter().copied(), &x[16..]);
            let (sc, mn) = (
                &w.scm[sb * 32..sb * 32 + 16],
                &w.scm[sb * 32 + 16..sb * 32 + 32],
            );
            let j = 2 * (b % 8);
            isum += xd[b] * (sc[j] as i32 * lo + sc[j + 1] as i32 * hi) as f32;
            off += mn[j] as f32 * s16[2 * b] + mn[j + 1] as f32 * s16[2 * b + 1];
        }
        acc += w.d[sb] * isum + w.m[sb] * off;
    }
    acc
}

fn block_isum_u8(q: impl Iterator<Item = u8>, x: &[i8]) -> i32 {
    q.zip(x).map(|(a, &b)| a as i32 * b as i32).sum()
}

/// Σ_b d_w·d_x·Σ q·qx for 4-bit rows (scalar reference).
pub fn dot4_scalar(wq: &[u8], wd: &[f32], xq: &[i8], xd: &[f32]) -> f32 {
    let nb = wd.len();
    let mut acc = 0f32;
    let mut b = 0;
    while b + 1 < nb {
        let p = &wq[b * 16..b * 16 + 32];
        let s0 = block_isum_u8(p.iter().map(|v| v & 0x0F), &xq[b * QK..(b + 1) * QK]);
        let s1 = block_isum_u8(p.iter().map(|v| v >> 4), &xq[(b + 1) * QK..(b + 2) * QK]);
        acc += wd[b] * xd[b] * s0 as f32 + wd[b + 1] * xd[b + 1] * s1 as f32;
        b += 2;
    }
    if b < nb {
        let p = &wq[b * 16..b * 16 + 16];
        let x = &xq[b * QK..(b + 1) * QK];
        let s = block_isum_u8(p.iter().map(|v| v & 0x0F), &x[..16])
            + block_isum_u8(p.iter().map(|v| v >> 4), &x[16..]);
        acc += wd[b] * xd[b] * s as f32;
    }
    acc
}

/// Σ_b d_w·d_x·Σ q·qx for 8-bit rows (scalar reference).
pub fn dot8_scalar(wq: &[u8], wd: &[f32], xq: &[i8], xd: &[f32]) -> f32 {
    let mut acc = 0f32;
    for b in 0..wd.len() {
        let s = block_isum_u8(
            wq[b * QK..(b + 1) * QK].iter().copied(),
            &xq[b * QK..(b + 1) * QK],
        );
        acc += wd[b] * xd[b] * s as f32;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// [`QMatrix::dequantize_rows`] compiled with AVX2 + FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dequantize_rows_avx2(
        w: &super::QMatrix,
        rows: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        w.dequantize_rows_generic(rows, out)
    }

    use super::QK;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Dots of weight rows `r0..r0+R` with tokens `t0..t0+NT`, each weight pair unpacked
    /// once and each activation pair loaded once per tile; `R·NT` independent accumulators keep
    /// the FMA pipes busy. Includes the `m·sx` offset term.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512dq,avx2,fma")]
    pub unsafe fn tile<const R: usize, const NT: usize>(
        w: &super::QMatrix,
        r0: usize,
        x: &super::QActs,
        t0: usize,
    ) -> [[f32; NT]; R] {
        let nb = w.cols / QK;
        let four = w.bits == super::QBits::Four;
        let rb = if four { w.cols / 2 } else { w.cols };
        debug_assert!((r0 + R) * nb <= w.d.len() && (t0 + NT) * nb <= x.d.len());
        let mut wq = [std::ptr::null::<u8>(); R];
        let mut wd = [std::ptr::null::<f32>(); R];
        let mut wm = [std::ptr::null::<f32>(); R];
        for i in 0..R {
            unsafe {
                wq[i] = w.qs.as_ptr().add((r0 + i) * rb);
                wd[i] = w.d.as_ptr().add((r0 + i) * nb);
                wm[i] = w.m.as_ptr().add((r0 + i) * nb);
            }
        }
        let mut xq = [std::ptr::null::<i8>(); NT];
        let mut xd = [std::ptr::null::<f32>(); NT];
        let mut xs = [std::ptr::null::<f32>(); NT];
        for t in 0..NT {
            unsafe {
                xq[t] = x.qs.as_ptr().add((t0 + t) * w.cols);
                xd[t] = x.d.as_ptr().add((t0 + t) * nb);
                xs[t] = x.sx.as_ptr().add((t0 + t) * nb);
            }
        }
        let mask = _mm256_set1_epi8(0x0F);
        // lanes 0..8 take element 0 of a pair of scales, lanes 8..16 element 1
        let spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let mut acc = [[_mm512_setzero_ps(); NT]; R];
        let mut macc = [[_mm_setzero_ps(); NT]; R];
        let mut b = 0;
        unsafe {
            while b + 1 < nb {
                let mut xv = [_mm512_setzero_si512(); NT];
                let mut xd2 = [_mm_setzero_ps(); NT];
                let mut xs2 = [_mm_setzero_ps(); NT];
                for t in 0..NT {
                    xv[t] = _mm512_loadu_si512(xq[t].add(b * QK) as *const __m512i);
                    xd2[t] = load2(xd[t].add(b));
                    xs2[t] = load2(xs[t].add(b));
                }
                for i in 0..R {
                    let wv = if four {
                        let v = _mm256_loadu_si256(wq[i].add(b * 16) as *const __m256i);
                        let lo = _mm256_and_si256(v, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                        _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
                    } else {
                        _mm512_loadu_si512(wq[i].add(b * QK) as *const __m512i)
                    };
                    let wd2 = load2(wd[i].add(b));
                    let wm2 = load2(wm[i].add(b));
                    for t in 0..NT {
                        let dp = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv[t]);
                        let s = _mm512_permutexvar_ps(
                            spread,
                            _mm512_castps128_ps512(_mm_mul_ps(wd2, xd2[t])),
                        );
                        acc[i][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), s, acc[i][t]);
                        macc[i][t] = _mm_fmadd_ps(wm2, xs2[t], macc[i][t]);
                    }
                }
                b += 2;
            }
            let mut out = [[0f32; NT]; R];
            for i in 0..R {
                for t in 0..NT {
                    let m2 = macc[i][t];
                    let mut v = _mm512_reduce_add_ps(acc[i][t])
                        + _mm_cvtss_f32(m2)
                        + _mm_cvtss_f32(_mm_movehdup_ps(m2));
                    if b < nb {
                        // odd last block
                        let wrow = std::slice::from_raw_parts(wq[i], rb);
                        let xrow = std::slice::from_raw_parts(xq[t], w.cols);
                        let isum: i32 = if four {
                            let p = &wrow[b * 16..b * 16 + 16];
                            let xb = &xrow[b * QK..(b + 1) * QK];
                            (0..16)
                                .map(|j| {
                                    (p[j] & 15) as i32 * xb[j] as i32
                                        + (p[j] >> 4) as i32 * xb[j + 16] as i32
                                })
                                .sum()
                        } else {
                            (0..QK)
                                .map(|j| wrow[b * QK + j] as i32 * xrow[b * QK + j] as i32)
                                .sum()
                        };
                        v += *wd[i].add(b) * *xd[t].add(b) * isum as f32
                            + *wm[i].add(b) * *xs[t].add(b);
                    }
                    out[i][t] = v;
                }
            }
            out
        }
    }

    /// The 16 rows' quants of one block of a [`super::Layout::Group16`] matrix at `q`: vector
    /// `k` holds elements `4k..4k+4` of row `r` in lane `r` (4-bit pairs unpacked).
    #[inline(always)]
    unsafe fn group_block(q: *const u8, four: bool) -> [__m512i; 8] {
        let mut wz = [_mm512_setzero_si512(); 8];
        unsafe {
            if four {
                let mask = _mm512_set1_epi8(0x0F);
                for p in 0..4 {
                    let v = _mm512_loadu_si512(q.add(p * 64) as *const __m512i);
                    wz[2 * p] = _mm512_and_si512(v, mask);
                    wz[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
                }
            } else {
                for (k, z) in wz.iter_mut().enumerate() {
                    *z = _mm512_loadu_si512(q.add(k * 64) as *const __m512i);
                }
            }
        }
        wz
    }

    /// The integer dots of a block's 16 rows (`wz`, see [`group_block`]) with one token's 32
    /// activation bytes at `xq`, one row per lane: over elements 0..16 and 16..32 (the two
    /// halves are the sub-blocks of [`super::Grain::Sub16`] weights).
    #[inline(always)]
    unsafe fn group_isums(wz: &[__m512i; 8], xq: *const i32) -> (__m512i, __m512i) {
        let mut i0 = _mm512_setzero_si512();
        let mut i1 = _mm512_setzero_si512();
        unsafe {
            for k in 0..4 {
                i0 = _mm512_dpbusd_epi32(i0, wz[k], _mm512_set1_epi32(xq.add(k).read_unaligned()));
                i1 = _mm512_dpbusd_epi32(
                    i1,
                    wz[k + 4],
                    _mm512_set1_epi32(xq.add(k + 4).read_unaligned()),
                );
            }
        }
        (i0, i1)
    }

    /// How far ahead of the quants being read [`prefetch_ahead`] asks for the next ones.
    /// 2 KiB measured as 4 KiB did (9.2 / 9.4 tok/s against 9.0 / 9.4 in the case below).
    const PF_BYTES: usize = 2048;

    /// Prefetch the `len` bytes at `p + PF_BYTES` into L1 (a hint: never faults, so it may
    /// run past the matrix). The group kernels ask only on their first pass over a group
    /// (`t0 == 0`): a prompt's later token tiles find it in cache. (Prefetching on every pass
    /// first read ~8% lower Q4_K_M prefill-512, but main read as low in the next round:
    /// noise.) One core's hardware prefetchers alone leave decoding well below the memory
    /// bandwidth on a large matrix (SmolLM2-1.7B-shaped Q4_K_M, 1 thread: 6.3 → 8.4 tok/s
    /// with it).
    #[inline(always)]
    unsafe fn prefetch_ahead(p: *const u8, len: usize) {
        unsafe {
            let p = p.wrapping_add(PF_BYTES) as *const i8;
            for l in (0..len).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(l));
            }
        }
    }
    /// Where the block scales and offsets of one 16-row group of a [`super::Layout::Group16`]
    /// [`super::Grain::Block32`] matrix are: f32 per block, or for K-quants
    /// ([`super::QMatrix::kscales`]) f32 `D` and `−dmin` per super-block times i8 multipliers
    /// per block — the same f32 products either way.
    struct GroupScales {
        d: *const f32,
        m: *const f32,
        /// The group's per-block `sc`/`mn` bytes for K-quants, else null.
        k: *const i8,
    }

    impl GroupScales {
        /// The scales of group `g`, bounds checked for all its blocks.
        fn of(w: &super::QMatrix, g: usize) -> Self {
            let nb = w.cols / QK;
            if w.kscales() {
                let nsb = nb / 8;
                assert!((g + 1) * nsb * 16 <= w.d.len() && (g + 1) * nsb * 16 <= w.m.len());
                assert!((g + 1) * nb * 32 <= w.scm.len());
                // SAFETY: in bounds (asserted).
                unsafe {
                    GroupScales {
                        d: w.d.as_ptr().add(g * nsb * 16),
                        m: w.m.as_ptr().add(g * nsb * 16),
                        k: w.scm.as_ptr().add(g * nb * 32),
                    }
                }
            } else {
                assert!((g + 1) * nb * 16 <= w.d.len() && (g + 1) * nb * 16 <= w.m.len());
                // SAFETY: in bounds (asserted).
                unsafe {
                    GroupScales {
                        d: w.d.as_ptr().add(g * nb * 16),
                        m: w.m.as_ptr().add(g * nb * 16),
                        k: std::ptr::null(),
                    }
                }
            }
        }

        /// Block `b`'s 16 scales and 16 offsets.
        #[inline(always)]
        unsafe fn at16(&self, b: usize) -> (__m512, __m512) {
            unsafe {
                if self.k.is_null() {
                    return (
                        _mm512_loadu_ps(self.d.add(b * 16)),
                        _mm512_loadu_ps(self.m.add(b * 16)),
                    );
                }
                let k = |p: *const i8| {
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
                };
                let (sb, kb) = ((b / 8) * 16, self.k.add(b * 32));
                (
                    _mm512_mul_ps(_mm512_loadu_ps(self.d.add(sb)), k(kb)),
                    _mm512_mul_ps(_mm512_loadu_ps(self.m.add(sb)), k(kb.add(16))),
                )
            }
        }

        /// Block `b`'s scales and offsets for rows `8h..8h+8`.
        #[inline(always)]
        unsafe fn at8(&self, b: usize, h: usize) -> (__m256, __m256) {
            unsafe {
                if self.k.is_null() {
                    return (
                        _mm256_loadu_ps(self.d.add(b * 16 + h * 8)),
                        _mm256_loadu_ps(self.m.add(b * 16 + h * 8)),
                    );
                }
                let k = |p: *const i8| {
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
                };
                let (sb, kb) = ((b / 8) * 16 + h * 8, self.k.add(b * 32 + h * 8));
                (
                    _mm256_mul_ps(_mm256_loadu_ps(self.d.add(sb)), k(kb)),
                    _mm256_mul_ps(_mm256_loadu_ps(self.m.add(sb)), k(kb.add(16))),
                )
            }
        }
    }

    /// Rows `16g..16g+16` (a [`super::Layout::Group16`] matrix) against tokens
    /// `t0..t0+NT`: per block, the weights are loaded (and unpacked) once for all NT tokens,
    /// eight `vpdpbusd` give the 16 rows' integer block sums in the lanes, and one scale
    /// multiply, one FMA and the offset's FMA fold them in. Writes `out[(t0+t)·m + 16g..][..16]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512dq,avx2,fma")]
    pub unsafe fn group16<const NT: usize>(
        w: &super::QMatrix,
        g: usize,
        x: &super::QActs,
        t0: usize,
        out: *mut f32,
        m: usize,
    ) {
        let nb = w.cols / QK;
        let four = w.bits == super::QBits::Four;
        let gbb = w.group_block_bytes();
        assert!(w.grain == super::Grain::Block32 && (g + 1) * nb * gbb <= w.qs.len());
        assert!((t0 + NT) * w.cols <= x.qs.len() && (t0 + NT) * nb <= x.sx.len());
        let scales = GroupScales::of(w, g);
        let mut acc = [_mm512_setzero_ps(); NT];
        // SAFETY (whole body): every read stays inside the group and tokens asserted above
        // (and in `GroupScales::of`).
        unsafe {
            let qbase = w.qs.as_ptr().add(g * nb * gbb);
            for b in 0..nb {
                if t0 == 0 {
                    prefetch_ahead(qbase.add(b * gbb), gbb);
                }
                let wz = group_block(qbase.add(b * gbb), four);
                let (wd, wm) = scales.at16(b);
                for (t, a) in acc.iter_mut().enumerate() {
                    let tok = t0 + t;
                    let xq = x.qs.as_ptr().add(tok * w.cols + b * QK) as *const i32;
                    let (i0, i1) = group_isums(&wz, xq);
                    let isum = _mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1));
                    let xd = *x.d.get_unchecked(tok * nb + b);
                    let xs = *x.sx.get_unchecked(tok * nb + b);
                    *a = _mm512_fmadd_ps(isum, _mm512_mul_ps(wd, _mm512_set1_ps(xd)), *a);
                    *a = _mm512_fmadd_ps(wm, _mm512_set1_ps(xs), *a);
                }
            }
            for (t, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add((t0 + t) * m + g * 16), *a);
            }
        }
    }

    /// [`group16`] for a [`super::Grain::Sub16`] matrix: the same quants and `vpdpbusd`s, whose
    /// two sub-block sums per row are weighted by that row's integer sub-block scales (in f32:
    /// `sc·Σ` is below 2²⁴, so `sc_lo·lo + sc_hi·hi` is the exact integer sum rounded once, as
    /// [`super::dot_sub16_scalar`] rounds it), then per super-block
    /// `acc += D·Σ_b dx_b·(…) + M·Σ_j mn_j·s16_j`. Each token's result is the same float
    /// operations whatever NT is (batch invariance).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512dq,avx2,fma")]
    pub unsafe fn group16_sub16<const NT: usize>(
        w: &super::QMatrix,
        g: usize,
        x: &super::QActs,
        t0: usize,
        out: *mut f32,
        m: usize,
    ) {
        let (nb, nsb, n16) = (w.cols / QK, w.cols / super::QK_K, w.cols / 16);
        let four = w.bits == super::QBits::Four;
        let gbb = w.group_block_bytes();
        assert!((g + 1) * nsb * 512 <= w.scm.len() && (g + 1) * nb * gbb <= w.qs.len());
        assert!((g + 1) * nsb * 16 <= w.d.len() && (g + 1) * nsb * 16 <= w.m.len());
        assert!((t0 + NT) * w.cols <= x.qs.len() && (t0 + NT) * n16 <= x.s16.len());
        // 16 i8 scales (one per row) → 16 f32 lanes.
        let scales = |p: *const i8| unsafe {
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
        };
        let mut acc = [_mm512_setzero_ps(); NT];
        // SAFETY (whole body): every read stays inside the group and tokens asserted above.
        unsafe {
            let qbase = w.qs.as_ptr().add(g * nb * gbb);
            for sb in 0..nsb {
                let gsb = g * nsb + sb;
                let scm = w.scm.as_ptr().add(gsb * 512);
                let mut fsum = [_mm512_setzero_ps(); NT];
                for bb in 0..8 {
                    let b = sb * 8 + bb;
                    if t0 == 0 {
                        prefetch_ahead(qbase.add(b * gbb), gbb);
                    }
                    let wz = group_block(qbase.add(b * gbb), four);
                    let sc0 = scales(scm.add(32 * bb));
                    let sc1 = scales(scm.add(32 * bb + 16));
                    for (t, f) in fsum.iter_mut().enumerate() {
                        let tok = t0 + t;
                        let xq = x.qs.as_ptr().add(tok * w.cols + b * QK) as *const i32;
                        let (i0, i1) = group_isums(&wz, xq);
                        let s = _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(i1),
                            sc1,
                            _mm512_mul_ps(_mm512_cvtepi32_ps(i0), sc0),
                        );
                        let xd = *x.d.get_unchecked(tok * nb + b);
                        *f = _mm512_fmadd_ps(s, _mm512_set1_ps(xd), *f);
                    }
                }
                let mut off = [_mm512_setzero_ps(); NT];
                for j in 0..16 {
                    let mn = scales(scm.add(256 + 16 * j));
                    for (t, o) in off.iter_mut().enumerate() {
                        let s16 = *x.s16.get_unchecked((t0 + t) * n16 + sb * 16 + j);
                        *o = _mm512_fmadd_ps(mn, _mm512_set1_ps(s16), *o);
                    }
                }
                let dsb = _mm512_loadu_ps(w.d.as_ptr().add(gsb * 16));
                let msb = _mm512_loadu_ps(w.m.as_ptr().add(gsb * 16));
                for t in 0..NT {
                    acc[t] = _mm512_fmadd_ps(fsum[t], dsb, acc[t]);
                    acc[t] = _mm512_fmadd_ps(off[t], msb, acc[t]);
                }
            }
            for (t, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add((t0 + t) * m + g * 16), *a);
            }
        }
    }

    /// Rows `8h..8h+8` of one block of a [`super::Layout::Group16`] group at `q`, four
    /// quant vectors `k0..k0+4` (elements `4k..4k+4` of row `8h + r` in 32-bit lane `r`; 4-bit
    /// pairs unpacked): the AVX2 half of [`group_block`].
    #[inline(always)]
    unsafe fn group_quarter(q: *const u8, four: bool, h: usize, k0: usize) -> [__m256i; 4] {
        unsafe {
            if four {
                let mask = _mm256_set1_epi8(0x0F);
                let p0 = k0 / 2;
                let v0 = _mm256_loadu_si256(q.add(p0 * 64 + h * 32) as *const __m256i);
                let v1 = _mm256_loadu_si256(q.add((p0 + 1) * 64 + h * 32) as *const __m256i);
                [
                    _mm256_and_si256(v0, mask),
                    _mm256_and_si256(_mm256_srli_epi16(v0, 4), mask),
                    _mm256_and_si256(v1, mask),
                    _mm256_and_si256(_mm256_srli_epi16(v1, 4), mask),
                ]
            } else {
                std::array::from_fn(|i| {
                    _mm256_loadu_si256(q.add((k0 + i) * 64 + h * 32) as *const __m256i)
                })
            }
        }
    }

    /// `Σ_i vpmaddubsw(wz[i], 4 activation bytes k0+i broadcast)` in i16: for each row lane,
    /// two i16 sums of products. With quants below 16 a lane's i16 is at most 4·2·15·127 =
    /// 15240; with quants below 64, two terms are at most 2·2·63·127 = 32004 (`pairs`).
    #[inline(always)]
    unsafe fn maddubs_bcast(wz: &[__m256i], xq: *const i32, k0: usize) -> __m256i {
        unsafe {
            let mut s = _mm256_maddubs_epi16(wz[0], _mm256_set1_epi32(xq.add(k0).read_unaligned()));
            for (i, w) in wz.iter().enumerate().skip(1) {
                let x = _mm256_set1_epi32(xq.add(k0 + i).read_unaligned());
                s = _mm256_add_epi16(s, _mm256_maddubs_epi16(*w, x));
            }
            s
        }
    }

    /// [`group16`] with AVX2 for a 4-bit [`super::Grain::Block32`] matrix (Q4_K, Q4_1): the
    /// 16 rows as two halves of 8, one row per 32-bit lane. Per block and token, eight
    /// `vpmaddubsw` against broadcast activation bytes summed in i16 (quants below 16: at
    /// most 8·2·15·127 = 30480, no saturation), one `vpmaddwd` by ones, then the scale FMA and
    /// the offset FMA, the same float operations whatever NT is (batch invariance).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn group16_avx2<const NT: usize>(
        w: &super::QMatrix,
        g: usize,
        x: &super::QActs,
        t0: usize,
        out: *mut f32,
        m: usize,
    ) {
        let nb = w.cols / QK;
        let gbb = w.group_block_bytes();
        assert!(w.bits == super::QBits::Four && w.grain == super::Grain::Block32);
        assert!((g + 1) * nb * gbb <= w.qs.len() && (t0 + NT) * nb <= x.d.len());
        assert!((t0 + NT) * w.cols <= x.qs.len() && (t0 + NT) * nb <= x.sx.len());
        let scales = GroupScales::of(w, g);
        let ones = _mm256_set1_epi16(1);
        // SAFETY (whole body): every read stays inside the group and tokens asserted above
        // (and in `GroupScales::of`).
        unsafe {
            let qbase = w.qs.as_ptr().add(g * nb * gbb);
            for h in 0..2 {
                let mut acc = [_mm256_setzero_ps(); NT];
                for b in 0..nb {
                    let q = qbase.add(b * gbb);
                    if h == 0 && t0 == 0 {
                        // The second half's pass finds the group in L2.
                        prefetch_ahead(q, gbb);
                    }
                    let mut s = [_mm256_setzero_si256(); NT];
                    for k0 in [0, 4] {
                        let wz = group_quarter(q, true, h, k0);
                        for (t, s) in s.iter_mut().enumerate() {
                            let xq = x.qs.as_ptr().add((t0 + t) * w.cols + b * QK) as *const i32;
                            *s = _mm256_add_epi16(*s, maddubs_bcast(&wz, xq, k0));
                        }
                    }
                    let (wd, wm) = scales.at8(b, h);
                    for (t, a) in acc.iter_mut().enumerate() {
                        let tok = t0 + t;
                        let isum = _mm256_cvtepi32_ps(_mm256_madd_epi16(s[t], ones));
                        let xd = _mm256_set1_ps(*x.d.get_unchecked(tok * nb + b));
                        let xs = _mm256_set1_ps(*x.sx.get_unchecked(tok * nb + b));
                        *a = _mm256_fmadd_ps(isum, _mm256_mul_ps(wd, xd), *a);
                        *a = _mm256_fmadd_ps(wm, xs, *a);
                    }
                }
                for (t, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(out.add((t0 + t) * m + g * 16 + h * 8), *a);
                }
            }
        }
    }

    /// [`group16_avx2`] for a [`super::Layout::Group16Packed5`] matrix (Q5_0, Q5_1, Q5_K):
    /// per half of 8 rows and block, the nibbles unpack as the 4-bit group's and each quant
    /// vector `k` takes its fifth bits from one 32-byte load, shifted by `4 − k` and masked to
    /// bit 4 of each byte. Quants below 32: a `vpmaddubsw` pair is at most 2·31·127 = 7874,
    /// so four are summed in i16 (31496, no saturation) before each of a block's two
    /// `vpmaddwd` by ones. Then the scale FMA and the offset FMA (a fixed offset `c·d` formed
    /// as `d·c` in the register: exact, `c` being a power of two), the same float operations
    /// whatever NT is (batch invariance).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn group16_5_avx2<const NT: usize>(
        w: &super::QMatrix,
        g: usize,
        x: &super::QActs,
        t0: usize,
        out: *mut f32,
        m: usize,
    ) {
        let nb = w.cols / QK;
        let gbb = w.group_block_bytes();
        assert!(w.layout == super::Layout::Group16Packed5 && w.grain == super::Grain::Block32);
        assert!((g + 1) * nb * gbb <= w.qs.len() && (g + 1) * nb * 16 <= w.d.len());
        assert!(w.m_fixed.is_some() || (g + 1) * nb * 16 <= w.m.len());
        assert!((t0 + NT) * w.cols <= x.qs.len() && (t0 + NT) * nb <= x.sx.len());
        assert!((t0 + NT) * nb <= x.d.len());
        let ones = _mm256_set1_epi16(1);
        let bit4 = _mm256_set1_epi8(0x10);
        let fixed = w.m_fixed.map(|c| _mm256_set1_ps(c));
        // Bit k of each byte of `hb` to bit 4 (the shifts cross no byte that the mask keeps).
        let fifth = |hb: __m256i, k: usize| {
            let v = match k {
                0 => _mm256_slli_epi32(hb, 4),
                1 => _mm256_slli_epi32(hb, 3),
                2 => _mm256_slli_epi32(hb, 2),
                3 => _mm256_slli_epi32(hb, 1),
                4 => hb,
                5 => _mm256_srli_epi32(hb, 1),
                6 => _mm256_srli_epi32(hb, 2),
                _ => _mm256_srli_epi32(hb, 3),
            };
            _mm256_and_si256(v, bit4)
        };
        // SAFETY (whole body): every read stays inside the group and tokens asserted above.
        unsafe {
            let qbase = w.qs.as_ptr().add(g * nb * gbb);
            let dbase = w.d.as_ptr().add(g * nb * 16);
            let mbase = w.m.as_ptr().wrapping_add(g * nb * 16);
            for h in 0..2 {
                let mut acc = [_mm256_setzero_ps(); NT];
                for b in 0..nb {
                    let q = qbase.add(b * gbb);
                    if h == 0 && t0 == 0 {
                        prefetch_ahead(q, gbb);
                    }
                    let hb = _mm256_loadu_si256(q.add(256 + h * 32) as *const __m256i);
                    let xq = |t: usize| x.qs.as_ptr().add((t0 + t) * w.cols + b * QK) as *const i32;
                    let unpack = |k0: usize| {
                        let mut wz = group_quarter(q, true, h, k0);
                        for (i, z) in wz.iter_mut().enumerate() {
                            *z = _mm256_or_si256(*z, fifth(hb, k0 + i));
                        }
                        wz
                    };
                    // Quant vectors 0..4 for every token, kept as i32 sums (NT registers,
                    // not 2·NT i16 ones), then 4..8 finishing each token's block.
                    let wz = unpack(0);
                    let mut s = [_mm256_setzero_si256(); NT];
                    for (t, s) in s.iter_mut().enumerate() {
                        *s = _mm256_madd_epi16(maddubs_bcast(&wz, xq(t), 0), ones);
                    }
                    let wz = unpack(4);
                    let wd = _mm256_loadu_ps(dbase.add(b * 16 + h * 8));
                    let wm = match fixed {
                        Some(c) => _mm256_mul_ps(wd, c),
                        None => _mm256_loadu_ps(mbase.add(b * 16 + h * 8)),
                    };
                    for (t, a) in acc.iter_mut().enumerate() {
                        let tok = t0 + t;
                        let hi = _mm256_madd_epi16(maddubs_bcast(&wz, xq(t), 4), ones);
                        let isum = _mm256_cvtepi32_ps(_mm256_add_epi32(s[t], hi));
                        let xd = _mm256_set1_ps(*x.d.get_unchecked(tok * nb + b));
                        let xs = _mm256_set1_ps(*x.sx.get_unchecked(tok * nb + b));
                        *a = _mm256_fmadd_ps(isum, _mm256_mul_ps(wd, xd), *a);
                        *a = _mm256_fmadd_ps(wm, xs, *a);
                    }
                }
                for (t, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(out.add((t0 + t) * m + g * 16 + h * 8), *a);
                }
            }
        }
    }

    /// [`group16_sub16`] with AVX2: the 16 rows as two halves of 8, one row per 32-bit lane.
    /// Per 16-element sub-block and token, four `vpmaddubsw` against broadcast activation
    /// bytes, summed two by two in i16 (quants below 64: at most 32004), and two `vpmaddwd`
    /// whose multiplier is the row's integer sub-block scale in both i16 halves of its lane:
    /// the block's `sc_lo·Σ_lo + sc_hi·Σ_hi` comes out exact in i32, as
    /// [`super::dot_sub16_scalar`] forms it, then one convert and one FMA by `dx`. Each token's
    /// result is the same float operations whatever NT is (batch invariance).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn group16_sub16_avx2<const NT: usize>(
        w: &super::QMatrix,
        g: usize,
        x: &super::QActs,
        t0: usize,
        out: *mut f32,
        m: usize,
    ) {
        let (nb, nsb, n16) = (w.cols / QK, w.cols / super::QK_K, w.cols / 16);
        let four = w.bits == super::QBits::Four;
        let gbb = w.group_block_bytes();
        assert!(w.grain == super::Grain::Sub16 && w.small);
        assert!((g + 1) * nsb * 512 <= w.scm.len() && (g + 1) * nb * gbb <= w.qs.len());
        assert!((g + 1) * nsb * 16 <= w.d.len() && (g + 1) * nsb * 16 <= w.m.len());
        assert!((t0 + NT) * w.cols <= x.qs.len() && (t0 + NT) * n16 <= x.s16.len());
        assert!((t0 + NT) * nb <= x.d.len());
        // 8 i8 scales (one per row) → each row's scale in both i16 halves of its lane.
        let both = _mm256_set_epi8(
            13, 12, 13, 12, 9, 8, 9, 8, 5, 4, 5, 4, 1, 0, 1, 0, 13, 12, 13, 12, 9, 8, 9, 8, 5, 4,
            5, 4, 1, 0, 1, 0,
        );
        let scales = |p: *const i8| unsafe {
            let s = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i));
            _mm256_shuffle_epi8(s, both)
        };
        // SAFETY (whole body): every read stays inside the group and tokens asserted above.
        unsafe {
            let qbase = w.qs.as_ptr().add(g * nb * gbb);
            for h in 0..2 {
                let mut acc = [_mm256_setzero_ps(); NT];
                for sb in 0..nsb {
                    let gsb = g * nsb + sb;
                    let scm = w.scm.as_ptr().add(gsb * 512 + h * 8);
                    let mut fsum = [_mm256_setzero_ps(); NT];
                    for bb in 0..8 {
                        let b = sb * 8 + bb;
                        let q = qbase.add(b * gbb);
                        if h == 0 && t0 == 0 {
                            prefetch_ahead(q, gbb);
                        }
                        let mut isum = [_mm256_setzero_si256(); NT];
                        for half in 0..2 {
                            let sc = scales(scm.add(32 * bb + 16 * half));
                            let wz = group_quarter(q, four, h, 4 * half);
                            for (t, i) in isum.iter_mut().enumerate() {
                                let xq =
                                    x.qs.as_ptr().add((t0 + t) * w.cols + b * QK) as *const i32;
                                let s0 = maddubs_bcast(&wz[..2], xq, 4 * half);
                                let s1 = maddubs_bcast(&wz[2..], xq, 4 * half + 2);
                                let p = _mm256_add_epi32(
                                    _mm256_madd_epi16(s0, sc),
                                    _mm256_madd_epi16(s1, sc),
                                );
                                *i = _mm256_add_epi32(*i, p);
                            }
                        }
                        for (t, f) in fsum.iter_mut().enumerate() {
                            let xd = _mm256_set1_ps(*x.d.get_unchecked((t0 + t) * nb + b));
                            *f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), xd, *f);
                        }
                    }
                    let mut off = [_mm256_setzero_ps(); NT];
                    for j in 0..16 {
                        let mn = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                            scm.add(256 + 16 * j) as *const __m128i,
                        )));
                        for (t, o) in off.iter_mut().enumerate() {
                            let s16 = *x.s16.get_unchecked((t0 + t) * n16 + sb * 16 + j);
                            *o = _mm256_fmadd_ps(mn, _mm256_set1_ps(s16), *o);
                        }
                    }
                    let dsb = _mm256_loadu_ps(w.d.as_ptr().add(gsb * 16 + h * 8));
                    let msb = _mm256_loadu_ps(w.m.as_ptr().add(gsb * 16 + h * 8));
                    for t in 0..NT {
                        acc[t] = _mm256_fmadd_ps(fsum[t], dsb, acc[t]);
                        acc[t] = _mm256_fmadd_ps(off[t], msb, acc[t]);
                    }
                }
                for (t, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(out.add((t0 + t) * m + g * 16 + h * 8), *a);
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn load2(p: *const f32) -> __m128 {
        unsafe { _mm_castpd_ps(_mm_load_sd(p as *const f64)) }
    }

    /// [`super::quantize_block`] with AVX2: same arithmetic, same rounding.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_block_avx2(blk: &[f32], q: &mut [i8]) -> (f32, i32) {
        assert!(blk.len() == QK && q.len() == QK);
        let p = blk.as_ptr();
        let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(p.add(8 * i)) });
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_andnot_ps(sign, v[0]);
        for x in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *x));
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        // vcvtps2dq rounds to nearest even under the default MXCSR mode.
        let i: [__m256i; 4] = std::array::from_fn(|k| _mm256_cvtps_epi32(_mm256_mul_ps(v[k], id)));
        let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b00_00_00_01)));
        // pack i32 → i16 → i8 (per 128-bit lane), then undo the lane interleave
        let w01 = _mm256_packs_epi32(i[0], i[1]);
        let w23 = _mm256_packs_epi32(i[2], i[3]);
        let b = _mm256_packs_epi16(w01, w23);
        let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        unsafe { _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, b) };
        (d, sum)
    }

    /// u8 × i8 block of 32 → 8 i32 partial sums, without VNNI. `vpmaddubsw` saturates at
    /// ±32767, which 255 · 127 · 2 = 64770 could reach for 8-bit rows, so split the u8 into
    /// its high and low nibbles for those (4-bit rows cannot saturate: 15 · 128 · 2 < 32767).
    /// Row kinds of [`rows_avx2`]: 4-bit pairs, 8-bit with values below 64, any 8-bit,
    /// [`Layout::Packed5`](super::Layout::Packed5).
    pub const K4: u8 = 0;
    pub const K8_SMALL: u8 = 1;
    pub const K8: u8 = 2;
    pub const K5: u8 = 3;
    /// [`Layout::Signed8`](super::Layout::Signed8): signed bytes, no offsets.
    pub const K8S: u8 = 4;

    /// 32 bytes, `0x10` where bit `j` of `bits` is set (byte `j`), else 0: a block's fifth bits.
    #[inline(always)]
    unsafe fn fifth_bits(bits: u32) -> __m256i {
        // Byte j takes byte j / 8 of `bits`, then tests bit j % 8 of it.
        let spread = _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        );
        let v = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), spread);
        let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// Dots of the [`Grain::Block32`] weight rows `r0..r0+R` (row-major, kind `K`) with tokens
    /// `t0..t0+T`, offset terms included: the AVX2 kernel for decoding (`T = 1`) and prompts
    /// (a tile of `R × T`). Each weight block is unpacked once for the `T` tokens and each
    /// activation block loaded once for the `R` rows; the `R·T` accumulators are independent.
    ///
    /// Batch invariance: every (row, token) result is the same sequence of float operations
    /// whatever `R` and `T` are — per block `acc += f32(Σ q·qx) · (d·dx)` in block order, then
    /// the horizontal sum, then the offsets `Σ m·sx` (one vector FMA per 8 blocks) — so a
    /// token's logits do not depend on what it is batched with.
    ///
    /// [`Grain::Block32`]: super::Grain::Block32
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows_avx2<const R: usize, const T: usize, const K: u8>(
        w: &super::QMatrix,
        r0: usize,
        x: &super::QActs,
        t0: usize,
    ) -> [[f32; T]; R] {
        let nb = w.cols / QK;
        let rb = w.row_bytes();
        assert!((r0 + R) * nb <= w.d.len() && (r0 + R) * rb <= w.qs.len());
        assert!((t0 + T) * nb <= x.d.len() && (t0 + T) * w.cols <= x.qs.len());
        let nibbles = K == K4 || K == K5;
        let mask = _mm256_set1_epi8(0x0F);
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        // SAFETY (whole body): every pointer read below stays inside the rows and tokens
        // asserted above; prefetches may point past them, which is harmless.
        unsafe {
            let xq: [*const i8; T] = std::array::from_fn(|j| x.qs.as_ptr().add((t0 + j) * w.cols));
            let xd: [*const f32; T] = std::array::from_fn(|j| x.d.as_ptr().add((t0 + j) * nb));
            let xs: [*const f32; T] = std::array::from_fn(|j| x.sx.as_ptr().add((t0 + j) * nb));
            let wq: [*const u8; R] = std::array::from_fn(|i| w.qs.as_ptr().add((r0 + i) * rb));
            let wd: [*const f32; R] = std::array::from_fn(|i| w.d.as_ptr().add((r0 + i) * nb));
            // With fixed offsets (`m` not stored) the offset FMAs run over `d`, times `c` after.
            let (mrow, mscale) = match w.m_fixed {
                Some(c) => (&w.d, c),
                None => (&w.m, 1.0),
            };
            let wm: [*const f32; R] = std::array::from_fn(|i| mrow.as_ptr().add((r0 + i) * nb));
            let hbits = |i: usize, b: usize| {
                fifth_bits((wq[i].add(w.cols / 2 + 4 * b) as *const u32).read_unaligned())
            };
            let isum = |w: __m256i, x: __m256i| {
                if K == K8 {
                    isum_u8(w, x)
                } else if K == K8S {
                    isum_i8(w, x)
                } else {
                    isum_u4(w, x)
                }
            };
            // The unpacked weight blocks of the R rows, `w0` block `b`, `w1` block `b + 1`.
            let unpack_pair = |i: usize, b: usize| {
                let (mut w0, mut w1) = if nibbles {
                    let v = _mm256_loadu_si256(wq[i].add(b * 16) as *const __m256i);
                    (
                        _mm256_and_si256(v, mask),
                        _mm256_and_si256(_mm256_srli_epi16(v, 4), mask),
                    )
                } else {
                    (
                        _mm256_loadu_si256(wq[i].add(b * QK) as *const __m256i),
                        _mm256_loadu_si256(wq[i].add((b + 1) * QK) as *const __m256i),
                    )
                };
                if K == K5 {
                    w0 = _mm256_or_si256(w0, hbits(i, b));
                    w1 = _mm256_or_si256(w1, hbits(i, b + 1));
                }
                (w0, w1)
            };
            // Blocks in groups of 8: the group's scale products `d·dx` are 8-wide multiplies
            // (the same f32 products as one at a time), each then broadcast from memory.
            let mut sc = [[[0f32; 8]; T]; R];
            let mut b = 0;
            while b < nb {
                let g0 = b;
                let g = (nb - b).min(8);
                for i in 0..R {
                    for j in 0..T {
                        if g == 8 {
                            let p = _mm256_mul_ps(
                                _mm256_loadu_ps(wd[i].add(b)),
                                _mm256_loadu_ps(xd[j].add(b)),
                            );
                            _mm256_storeu_ps(sc[i][j].as_mut_ptr(), p);
                        } else {
                            for (k, v) in sc[i][j][..g].iter_mut().enumerate() {
                                *v = *wd[i].add(b + k) * *xd[j].add(b + k);
                            }
                        }
                    }
                }
                while b + 1 < g0 + g {
                    let mut ws = [(_mm256_setzero_si256(), _mm256_setzero_si256()); R];
                    for (i, wsi) in ws.iter_mut().enumerate() {
                        // The next R rows' bytes at this position: rows interleave in R,
                        // which the hardware prefetcher does not follow.
                        let at = if nibbles { b * 16 } else { b * QK };
                        _mm_prefetch::<_MM_HINT_T0>(wq[i].wrapping_add(R * rb + at) as *const i8);
                        if b % 16 == 0 {
                            _mm_prefetch::<_MM_HINT_T0>(wd[i].wrapping_add(R * nb + b) as *const i8);
                            if w.m_fixed.is_none() {
                                _mm_prefetch::<_MM_HINT_T0>(
                                    wm[i].wrapping_add(R * nb + b) as *const i8
                                );
                            }
                        }
                        *wsi = unpack_pair(i, b);
                    }
                    // Block b for every (row, token), then block b + 1: each accumulator
                    // still takes its blocks in order.
                    for j in 0..T {
                        let x0 = _mm256_loadu_si256(xq[j].add(b * QK) as *const __m256i);
                        for i in 0..R {
                            let s0 = _mm256_cvtepi32_ps(isum(ws[i].0, x0));
                            let d = _mm256_broadcast_ss(&sc[i][j][b - g0]);
                            acc[i][j] = _mm256_fmadd_ps(s0, d, acc[i][j]);
                        }
                    }
                    for j in 0..T {
                        let x1 = _mm256_loadu_si256(xq[j].add((b + 1) * QK) as *const __m256i);
                        for i in 0..R {
                            let s1 = _mm256_cvtepi32_ps(isum(ws[i].1, x1));
                            let d = _mm256_broadcast_ss(&sc[i][j][b + 1 - g0]);
                            acc[i][j] = _mm256_fmadd_ps(s1, d, acc[i][j]);
                        }
                    }
                    b += 2;
                }
                if b < g0 + g {
                    // An odd last block (a nibble one is stored alone: element j low, j + 16
                    // high).
                    for i in 0..R {
                        let mut w0 = if nibbles {
                            let v = _mm_loadu_si128(wq[i].add(b * 16) as *const __m128i);
                            let m = _mm_set1_epi8(0x0F);
                            _mm256_set_m128i(
                                _mm_and_si128(_mm_srli_epi16(v, 4), m),
                                _mm_and_si128(v, m),
                            )
                        } else {
                            _mm256_loadu_si256(wq[i].add(b * QK) as *const __m256i)
                        };
                        if K == K5 {
                            w0 = _mm256_or_si256(w0, hbits(i, b));
                        }
                        for j in 0..T {
                            let x0 = _mm256_loadu_si256(xq[j].add(b * QK) as *const __m256i);
                            let s0 = _mm256_cvtepi32_ps(isum(w0, x0));
                            let d = _mm256_broadcast_ss(&sc[i][j][b - g0]);
                            acc[i][j] = _mm256_fmadd_ps(s0, d, acc[i][j]);
                        }
                    }
                    b += 1;
                }
            }
            let mut out = [[0f32; T]; R];
            for i in 0..R {
                for j in 0..T {
                    out[i][j] = hsum256(acc[i][j]);
                }
            }
            if K == K8S {
                // Signed bytes: no offsets.
                return out;
            }
            // Offsets: Σ_b m[b]·sx[b], 8 blocks per FMA.
            let mut macc = [[_mm256_setzero_ps(); T]; R];
            let mut b = 0;
            while b + 8 <= nb {
                for j in 0..T {
                    let sx = _mm256_loadu_ps(xs[j].add(b));
                    for i in 0..R {
                        macc[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(wm[i].add(b)), sx, macc[i][j]);
                    }
                }
                b += 8;
            }
            for i in 0..R {
                for j in 0..T {
                    let mut tail = 0f32;
                    for bb in b..nb {
                        tail += *wm[i].add(bb) * *xs[j].add(bb);
                    }
                    out[i][j] += mscale * (hsum256(macc[i][j]) + tail);
                }
            }
            out
        }
    }

    /// Signed × signed bytes: `|w| · (x with w's sign)`, the unsigned × signed form
    /// `vpmaddubsw` takes. Exact for every `w` (−128's magnitude reads as unsigned 128) and
    /// `x` in −127..=127 (activations are quantized to ±127): a pair is at most 2·128·127 <
    /// 32768, so nothing saturates.
    #[inline(always)]
    unsafe fn isum_i8(w: __m256i, x: __m256i) -> __m256i {
        let aw = _mm256_sign_epi8(w, w);
        let sx = _mm256_sign_epi8(x, w);
        _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1))
    }

    #[inline(always)]
    unsafe fn isum_u4(w: __m256i, x: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
    }

    #[inline(always)]
    unsafe fn isum_u8(w: __m256i, x: __m256i) -> __m256i {
        let m = _mm256_set1_epi8(0x0F);
        let lo = _mm256_and_si256(w, m);
        let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m);
        let slo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x), _mm256_set1_epi16(1));
        let shi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x), _mm256_set1_epi16(16));
        _mm256_add_epi32(slo, shi)
    }

    /// [`super::dot_sub16_scalar`] with AVX2, for one row and `T` tokens: the row's quants and
    /// scales are unpacked once for the `T` tokens. Per block one `vpmaddubsw` (quants < 64, no
    /// saturation) and one `vpmaddwd` whose multiplier is the two sub-block scales (the low
    /// 128-bit lane holds the first 16 elements, the high lane the second 16) instead of ones:
    /// the scales cost one `vpshufb` per block. Each token's result is the same sequence of
    /// float operations whatever `T` is (batch invariance).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sub16_avx2<const T: usize>(
        w: &super::Sub16Row,
        xq: [&[i8]; T],
        xd: [&[f32]; T],
        s16: [&[f32]; T],
    ) -> [f32; T] {
        let nsb = w.d.len();
        assert!(w.scm.len() == nsb * 32 && w.q.len() == nsb * if w.four { 128 } else { 256 });
        for j in 0..T {
            assert!(s16[j].len() == nsb * 16 && xd[j].len() == nsb * 8 && xq[j].len() == nsb * 256);
        }
        let mask = _mm256_set1_epi8(0x0F);
        // Block k of a group of four takes i16 scale 2k in its low lane, 2k + 1 in its high lane.
        let pick: [__m256i; 4] = std::array::from_fn(|k| {
            let lo = (4 * k as i16) | ((4 * k as i16 + 1) << 8);
            let hi = (4 * k as i16 + 2) | ((4 * k as i16 + 3) << 8);
            _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo))
        });
        let mut acc = [_mm256_setzero_ps(); T];
        let mut macc = [_mm256_setzero_ps(); T];
        let wp = w.q.as_ptr();
        unsafe {
            for sb in 0..nsb {
                let scb = _mm_loadu_si128(w.scm.as_ptr().add(sb * 32) as *const __m128i);
                let scs = [
                    _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(scb)),
                    _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_srli_si128(scb, 8))),
                ];
                let mut fsum = [_mm256_setzero_ps(); T];
                for p in 0..4 {
                    let b = sb * 8 + 2 * p;
                    let (w0, w1) = if w.four {
                        let v = _mm256_loadu_si256(wp.add(b * 16) as *const __m256i);
                        (
                            _mm256_and_si256(v, mask),
                            _mm256_and_si256(_mm256_srli_epi16(v, 4), mask),
                        )
                    } else {
                        (
                            _mm256_loadu_si256(wp.add(b * QK) as *const __m256i),
                            _mm256_loadu_si256(wp.add((b + 1) * QK) as *const __m256i),
                        )
                    };
                    let sv = scs[p / 2];
                    let s0 = _mm256_shuffle_epi8(sv, pick[(2 * p) % 4]);
                    let s1 = _mm256_shuffle_epi8(sv, pick[(2 * p + 1) % 4]);
                    for j in 0..T {
                        let xp = xq[j].as_ptr();
                        let x0 = _mm256_loadu_si256(xp.add(b * QK) as *const __m256i);
                        let x1 = _mm256_loadu_si256(xp.add((b + 1) * QK) as *const __m256i);
                        let i0 = _mm256_madd_epi16(_mm256_maddubs_epi16(w0, x0), s0);
                        let i1 = _mm256_madd_epi16(_mm256_maddubs_epi16(w1, x1), s1);
                        fsum[j] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(i0),
                            _mm256_set1_ps(*xd[j].get_unchecked(b)),
                            fsum[j],
                        );
                        fsum[j] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(i1),
                            _mm256_set1_ps(*xd[j].get_unchecked(b + 1)),
                            fsum[j],
                        );
                    }
                }
                let dsb = _mm256_set1_ps(*w.d.get_unchecked(sb));
                let msb = _mm256_set1_ps(*w.m.get_unchecked(sb));
                let mnb = _mm_loadu_si128(w.scm.as_ptr().add(sb * 32 + 16) as *const __m128i);
                let mn0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(mnb));
                let mn1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(mnb, 8)));
                for j in 0..T {
                    acc[j] = _mm256_fmadd_ps(fsum[j], dsb, acc[j]);
                    let sp = s16[j].as_ptr().add(sb * 16);
                    let t = _mm256_mul_ps(mn0, _mm256_loadu_ps(sp));
                    let t = _mm256_fmadd_ps(mn1, _mm256_loadu_ps(sp.add(8)), t);
                    macc[j] = _mm256_fmadd_ps(t, msb, macc[j]);
                }
            }
            std::array::from_fn(|j| hsum256(_mm256_add_ps(acc[j], macc[j])))
        }
    }
}

/// A raw pointer that may cross threads: each thread writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// From this many tokens on, AVX2 matmuls run as f32 GEMMs over dequantized panels (the
/// integer kernel is faster below it: 8.5 against 10.1 GMAC/s at 16 tokens counting the GEMM
/// alone, before the panel's dequantization).
pub const GEMM_MIN_TOKENS: usize = 32;

/// Batch invariance: when on (the default), prompts run the same integer arithmetic per (row,
/// token) as single tokens, so a request's output does not depend on what it is batched with,
/// how its prompt is chunked, whether its prefix was cached, or whether it was preempted and
/// recomputed. `FERROLM_BATCH_INVARIANT=0` trades that for speed: prompts of
/// [`GEMM_MIN_TOKENS`] or more take the f32 GEMM paths (on AVX2 at 512 tokens ~1.4× faster
/// for Q4_1 SmolLM2, ~1.07× for its Q4_K_M file, whose Q5_0 matrices have a group kernel),
/// whose float rounding differs from the one-token kernels' and can flip a near-tied
/// greedy token — llama.cpp's and vLLM's default
/// behaviour (vLLM's `VLLM_BATCH_INVARIANT=1` is the opposite switch). [`set_batch_invariant`]
/// sets it in code.
pub fn batch_invariant() -> bool {
    use std::sync::atomic::Ordering;
    match BATCH_INVARIANT.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var_os("FERROLM_BATCH_INVARIANT").is_none_or(|v| v != "0");
            BATCH_INVARIANT.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        v => v == 2,
    }
}

/// Turn [`batch_invariant`] on or off for this process.
pub fn set_batch_invariant(on: bool) {
    BATCH_INVARIANT.store(if on { 2 } else { 1 }, std::sync::atomic::Ordering::Relaxed);
}

/// 0: not read yet, 1: off, 2: on.
static BATCH_INVARIANT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Tokens per tile of the row-major AVX-512 kernel (`x86::tile`): one unpacked weight row
/// serves this many tokens.
const TILE: usize = 4;
/// Tokens per pass of the group kernels (AVX-512 and AVX2) at prompts (tails in 4s, then
/// 1–3): each block's quants are unpacked once per pass, so wider passes spread the unpack
/// (for the 5-bit groups a shift, mask and OR per quant vector on top of the nibbles) over
/// more tokens. AVX-512 took 4 until 2026-12-06: 8 read 1.1–1.3× its prefill-512 (2
/// threads, two rounds: SmolLM2-135M Q4_1 1260/1447 → 1396/1712 tok/s, the 1.7B shape's
/// Q4_K_M 135/144 → 172/177); 16 measured no better than 8.
const GROUP_TILE: usize = 8;
/// Weight rows per tile when decoding one token with the row-major AVX-512 tile (matrices not
/// in [`Layout::Group16`]). 2 and 4 measured slower here (decode 68 and 61 tok/s against 95 on
/// one thread): the row tiles spill.
const DECODE_ROWS: usize = 1;
/// Weight rows × tokens per tile of the AVX2 prompt kernel (`x86::rows_avx2`): 8
/// accumulators, the activation pair and the unpacked weight pair fit AVX2's 16 registers.
const PROMPT_ROWS: usize = 2;
const PROMPT_TOKENS: usize = 4;
/// Prompt tokens per pass over a chunk of rows: their quantized activations (≤ 64 × cols
/// bytes) stay in L2 while the chunk's rows go through them.
const TOKEN_BLOCK: usize = 64;

/// `out (n × w.rows) = x (n × w.cols) · wᵀ`, rows of `w` split across the rayon pool.
pub fn matmul(isa: Isa, w: &QMatrix, x: &QActs, out: &mut [f32]) {
    use rayon::prelude::*;
    let n = x.n;
    let m = w.rows;
    assert_eq!(
        x.cols, w.cols,
        "activation width must equal the weight's input width"
    );
    assert!(out.len() >= n * m);
    // The row-major AVX-512 tile reads [`Grain::Block32`] scales only: row-major Sub16
    // matrices (rows not in 16s) run the AVX2 kernel, which those CPUs have too.
    let isa = match (isa, w.grain, w.layout) {
        (Isa::Avx512Vnni, Grain::Sub16, Layout::Rows) => Isa::Avx2,
        _ => isa,
    };
    let ptr = SendPtr(out.as_mut_ptr());
    // Enough chunks for work stealing to absorb a busy core, few enough to stay cheap: at most
    // four a thread, of whole 16-row groups. (Rounded down instead, 576 rows made nine chunks
    // of 64 on two threads, five on one and four on the other.)
    let threads = rayon::current_num_threads().max(1);
    let chunk = m.div_ceil(4 * threads).next_multiple_of(16).clamp(16, 512);
    if isa == Isa::Avx2 && x.gemm && !matches!(w.layout, Layout::Group16 | Layout::Group16Packed5) {
        // Prefill on AVX2: each chunk of rows dequantized to an f32 panel, multiplied by the
        // dequantized activations with `gemm`'s register-blocked kernel. The integer path does
        // one (row, token) dot product at a time; this one reuses every loaded weight across
        // tokens (3.6× the multiply-adds per second at 512 tokens, `examples/matmul.rs`).
        // Same quantized operands, so results differ from the integer path only in float
        // rounding. (A grouped matrix, which the loader makes only with batch invariance
        // on, takes its integer group kernel below, as with invariance on.)
        assert!(
            x.xf.len() >= n * w.cols,
            "activations were quantized for the integer path"
        );
        (0..m.div_ceil(chunk)).into_par_iter().for_each_init(
            Vec::new,
            |panel: &mut Vec<f32>, c| {
                let p = ptr;
                let rows = c * chunk..((c + 1) * chunk).min(m);
                let rn = rows.len();
                panel.resize(rn * w.cols, 0.0);
                w.dequantize_rows(rows.clone(), panel);
                // SAFETY: writes the n × rn block of `out` at column `rows.start` with row
                // stride m, which is in bounds (asserted above) and disjoint across chunks.
                unsafe {
                    gemm_to_ptr(
                        p.0.add(rows.start),
                        m,
                        Mat::rows(&x.xf, w.cols),
                        Mat::rows(panel, w.cols).t(),
                        (n, rn, w.cols),
                        false,
                        1.0,
                        Par::Serial,
                    )
                }
            },
        );
        return;
    }
    (0..m.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let p = ptr;
        let rows = c * chunk..((c + 1) * chunk).min(m);
        // SAFETY (all writes below): (t, r) pairs are disjoint across chunks and in bounds.
        if (w.layout == Layout::Group16
            && (isa == Isa::Scalar || (isa == Isa::Avx2 && !w.avx2_groups())))
            || ((w.m_fixed.is_some()
                || matches!(
                    w.layout,
                    Layout::Packed5 | Layout::Signed8 | Layout::Group16Packed5
                ))
                && isa != Isa::Avx2)
        {
            // The loaders interleave only what their ISA's group kernels read; anything else
            // gets a slow, correct answer.
            let mut wr = vec![0f32; w.cols];
            for r in rows {
                w.dequantize_row(r, &mut wr);
                for t in 0..n {
                    let v = x.dequantized_dot(t, &wr);
                    unsafe { *p.0.add(t * m + r) = v };
                }
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if matches!(w.layout, Layout::Group16 | Layout::Group16Packed5) {
            // Chunks are whole groups (`chunk` is a multiple of 16 when m is).
            let groups = rows.start / 16..rows.end / 16;
            let mut t = 0;
            while t < n {
                let nt = match (n - t).min(GROUP_TILE) {
                    k if k >= 8 => 8,
                    k => k.min(4),
                };
                for g in groups.clone() {
                    macro_rules! go {
                        ($nt:literal) => {
                            match (isa, w.grain) {
                                (Isa::Avx512Vnni, Grain::Block32) => unsafe {
                                    x86::group16::<$nt>(w, g, x, t, p.0, m)
                                },
                                (Isa::Avx512Vnni, Grain::Sub16) => unsafe {
                                    x86::group16_sub16::<$nt>(w, g, x, t, p.0, m)
                                },
                                (_, Grain::Block32) if w.layout == Layout::Group16Packed5 => unsafe {
                                    x86::group16_5_avx2::<$nt>(w, g, x, t, p.0, m)
                                },
                                (_, Grain::Block32) => unsafe {
                                    x86::group16_avx2::<$nt>(w, g, x, t, p.0, m)
                                },
                                (_, Grain::Sub16) => unsafe {
                                    x86::group16_sub16_avx2::<$nt>(w, g, x, t, p.0, m)
                                },
                            }
                        };
                    }
                    match nt {
                        8 => go!(8),
                        4 => go!(4),
                        3 => go!(3),
                        2 => go!(2),
                        _ => go!(1),
                    }
                }
                t += nt;
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512Vnni {
            let put = |t: usize, r: usize, v: f32| unsafe { *p.0.add(t * m + r) = v };
            if n == 1 {
                // Decode: four rows share each activation load.
                let mut r = rows.start;
                while r + DECODE_ROWS <= rows.end {
                    let v = unsafe { x86::tile::<DECODE_ROWS, 1>(w, r, x, 0) };
                    (0..DECODE_ROWS).for_each(|i| put(0, r + i, v[i][0]));
                    r += DECODE_ROWS;
                }
                for r in r..rows.end {
                    put(0, r, unsafe { x86::tile::<1, 1>(w, r, x, 0) }[0][0]);
                }
                return;
            }
            // Prefill: token groups outside, rows inside, so the chunk's weights stay in cache
            // while each group of activations streams through once.
            let mut t = 0;
            while t < n {
                let nt = (n - t).min(TILE);
                for r in rows.clone() {
                    macro_rules! go {
                        ($nt:literal) => {{
                            let v = unsafe { x86::tile::<1, $nt>(w, r, x, t) };
                            (0..$nt).for_each(|j| put(t + j, r, v[0][j]));
                        }};
                    }
                    match nt {
                        4 => go!(4),
                        3 => go!(3),
                        2 => go!(2),
                        _ => go!(1),
                    }
                }
                t += nt;
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx2
            && w.grain == Grain::Block32
            && matches!(w.layout, Layout::Rows | Layout::Packed5 | Layout::Signed8)
        {
            // Decoding: four rows per pass share each activation load. Prompts: tiles of
            // PROMPT_ROWS rows × PROMPT_TOKENS tokens, tokens inside, so the tile's rows stay
            // in L1 while the prompt's tokens go through them. Each (row, token) is the same
            // arithmetic either way (see `rows_avx2`).
            let put = |t: usize, r: usize, v: f32| unsafe { *p.0.add(t * m + r) = v };
            macro_rules! go {
                ($k:expr) => {{
                    const R: usize = PROMPT_ROWS;
                    const T: usize = PROMPT_TOKENS;
                    let mut r = rows.start;
                    if n == 1 {
                        while r + 4 <= rows.end {
                            let v = unsafe { x86::rows_avx2::<4, 1, { $k }>(w, r, x, 0) };
                            (0..4).for_each(|i| put(0, r + i, v[i][0]));
                            r += 4;
                        }
                    } else {
                        let r0 = r;
                        for tb in (0..n).step_by(TOKEN_BLOCK) {
                            let te = (tb + TOKEN_BLOCK).min(n);
                            r = r0;
                            while r + R <= rows.end {
                                let mut t = tb;
                                while t + T <= te {
                                    let v = unsafe { x86::rows_avx2::<R, T, { $k }>(w, r, x, t) };
                                    for i in 0..R {
                                        (0..T).for_each(|j| put(t + j, r + i, v[i][j]));
                                    }
                                    t += T;
                                }
                                for t in t..te {
                                    let v = unsafe { x86::rows_avx2::<R, 1, { $k }>(w, r, x, t) };
                                    (0..R).for_each(|i| put(t, r + i, v[i][0]));
                                }
                                r += R;
                            }
                        }
                    }
                    for r in r..rows.end {
                        for t in 0..n {
                            put(
                                t,
                                r,
                                unsafe { x86::rows_avx2::<1, 1, { $k }>(w, r, x, t) }[0][0],
                            );
                        }
                    }
                }};
            }
            match (w.layout, w.bits, w.small) {
                (Layout::Packed5, _, _) => go!(x86::K5),
                (Layout::Signed8, _, _) => go!(x86::K8S),
                (_, QBits::Four, _) => go!(x86::K4),
                (_, QBits::Eight, true) => go!(x86::K8_SMALL),
                (_, QBits::Eight, false) => go!(x86::K8),
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx2 && w.grain == Grain::Sub16 && n > 1 {
            // Prompts: one row × PROMPT_TOKENS tokens per pass, tokens in blocks that stay in
            // L2 while the chunk's rows go through them.
            const T: usize = PROMPT_TOKENS;
            let put = |t: usize, r: usize, v: f32| unsafe { *p.0.add(t * m + r) = v };
            for tb in (0..n).step_by(TOKEN_BLOCK) {
                let te = (tb + TOKEN_BLOCK).min(n);
                for r in rows.clone() {
                    let row = Sub16Row::of(w, r);
                    let mut t = tb;
                    while t + T <= te {
                        let v = unsafe {
                            x86::sub16_avx2::<T>(
                                &row,
                                std::array::from_fn(|j| x.qs_of(t + j)),
                                std::array::from_fn(|j| x.d_of(t + j)),
                                std::array::from_fn(|j| x.s16_of(t + j)),
                            )
                        };
                        (0..T).for_each(|j| put(t + j, r, v[j]));
                        t += T;
                    }
                    for t in t..te {
                        put(t, r, dot_row(isa, w, r, x, t));
                    }
                }
            }
            return;
        }
        for r in rows {
            for t in 0..n {
                let v = dot_row(isa, w, r, x, t);
                unsafe { *p.0.add(t * m + r) = v };
            }
        }
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ferrolm_gguf::GgmlType;

    /// Deterministic pseudo-random bytes/floats.
    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    fn random_blocks(ty: GgmlType, rows: usize, cols: usize, seed: &mut u64) -> Vec<u8> {
        let nb = cols / QK;
        let bb = ty.block_bytes() as usize;
        let mut raw = Vec::with_capacity(rows * nb * bb);
        for _ in 0..rows * nb {
            let d = f16::from_f32(0.001 + (lcg(seed) % 1000) as f32 * 1e-5);
            raw.extend_from_slice(&d.to_le_bytes());
            if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                let m = f16::from_f32(-0.01 * (lcg(seed) % 100) as f32 / 100.0);
                raw.extend_from_slice(&m.to_le_bytes());
            }
            let n = bb - raw.len() % bb;
            for _ in 0..(if n == bb { 0 } else { n }) {
                raw.push(lcg(seed) as u8);
            }
        }
        raw
    }

    /// Reference dequantization straight from the ggml block definitions.
    fn ggml_dequant(ty: GgmlType, raw: &[u8], n: usize) -> Vec<f32> {
        let bb = ty.block_bytes() as usize;
        let mut out = vec![0f32; n];
        for (b, blk) in raw.chunks_exact(bb).enumerate() {
            let d = f16_at(blk, 0);
            for j in 0..QK {
                out[b * QK + j] = match ty {
                    GgmlType::Q4_0 => {
                        let q = if j < 16 {
                            blk[2 + j] & 15
                        } else {
                            blk[2 + j - 16] >> 4
                        };
                        (q as f32 - 8.0) * d
                    }
                    GgmlType::Q4_1 => {
                        let q = if j < 16 {
                            blk[4 + j] & 15
                        } else {
                            blk[4 + j - 16] >> 4
                        };
                        q as f32 * d + f16_at(blk, 2)
                    }
                    _ => blk[2 + j] as i8 as f32 * d,
                };
            }
        }
        out
    }

    #[test]
    fn simd_activation_quantization_matches_scalar() {
        let mut seed = 3;
        for scale in [0.0f32, 1e-3, 1.0, 250.0] {
            let x: Vec<f32> = (0..QK * 8)
                .map(|_| ((lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0) * scale)
                .collect();
            for blk in x.chunks_exact(QK) {
                let (mut a, mut b) = ([0i8; QK], [0i8; QK]);
                let want = quantize_block(blk, &mut a);
                #[cfg(target_arch = "x86_64")]
                if is_x86_feature_detected!("avx2") {
                    let got = unsafe { x86::quantize_block_avx2(blk, &mut b) };
                    assert_eq!((got, b), (want, a), "{blk:?}");
                }
                let _ = &mut b;
            }
        }
    }

    #[test]
    fn repack_matches_ggml_dequantization() {
        let mut seed = 7;
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            for cols in [32, 64, 96, 576] {
                let rows = 3;
                let raw = random_blocks(ty, rows, cols, &mut seed);
                let w = QMatrix::from_ggml(ty, rows, cols, &raw).unwrap();
                let want = ggml_dequant(ty, &raw, rows * cols);
                let mut got = vec![0f32; cols];
                for r in 0..rows {
                    w.dequantize_row(r, &mut got);
                    for (a, b) in got.iter().zip(&want[r * cols..(r + 1) * cols]) {
                        assert!(
                            (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                            "{ty:?} {cols}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn group16_layout_holds_the_same_matrix_and_its_kernel_matches_scalar() {
        let mut seed = 23;
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            for (rows, cols, n) in [(16, 32, 1), (32, 96, 5), (48, 576, 9), (20, 64, 2)] {
                let raw = random_blocks(ty, rows, cols, &mut seed);
                let w = QMatrix::from_ggml(ty, rows, cols, &raw).unwrap();
                let mut g = w.clone();
                let grouped = g.interleave16();
                assert_eq!(grouped, rows % 16 == 0, "{ty:?} {rows}");
                assert!(!g.clone().interleave16(), "interleaving twice");
                assert!(
                    QMatrix::concat_rows(&[g.clone(), g.clone()], Isa::detect()).is_none()
                        || !grouped
                );
                let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
                for r in 0..rows {
                    w.dequantize_row(r, &mut a);
                    g.dequantize_row(r, &mut b);
                    assert_eq!(a, b, "{ty:?} {rows}×{cols} row {r}");
                }
                let x: Vec<f32> = (0..n * cols)
                    .map(|_| (lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0)
                    .collect();
                let mut qa = QActs::default();
                qa.quantize(&x, n, cols);
                let mut want = vec![0f32; n * rows];
                matmul(Isa::Scalar, &w, &qa, &mut want);
                // The group kernels where the CPU has them (AVX2's reads the 4-bit types, the
                // 8-bit one takes its fallback), the fallback everywhere.
                let mut isas = vec![Isa::Scalar];
                if Isa::detect() != Isa::Scalar {
                    isas.push(Isa::Avx2);
                }
                if Isa::detect() == Isa::Avx512Vnni {
                    isas.push(Isa::Avx512Vnni);
                }
                for isa in isas {
                    let mut got = vec![0f32; n * rows];
                    matmul(isa, &g, &qa, &mut got);
                    for (a, b) in got.iter().zip(&want) {
                        assert!(
                            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                            "{ty:?} {isa:?} {rows}×{cols}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn simd_kernels_match_scalar_and_f32() {
        let mut seed = 11;
        let isas: Vec<Isa> = [Isa::Avx512Vnni, Isa::Avx2]
            .into_iter()
            .filter(|&i| match i {
                Isa::Avx512Vnni => Isa::detect() == Isa::Avx512Vnni,
                Isa::Avx2 => Isa::detect() != Isa::Scalar,
                Isa::Scalar => true,
            })
            .collect();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            for (cols, n) in [(32, 1), (64, 3), (96, 6), (576, 5), (1536, 2)] {
                let rows = 5;
                let raw = random_blocks(ty, rows, cols, &mut seed);
                let w = QMatrix::from_ggml(ty, rows, cols, &raw).unwrap();
                let x: Vec<f32> = (0..n * cols)
                    .map(|_| (lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0)
                    .collect();
                let mut qa = QActs::default();
                qa.quantize(&x, n, cols);
                let mut want = vec![0f32; n * rows];
                matmul(Isa::Scalar, &w, &qa, &mut want);
                for &isa in &isas {
                    let mut got = vec![0f32; n * rows];
                    matmul(isa, &w, &qa, &mut got);
                    for (a, b) in got.iter().zip(&want) {
                        assert!(
                            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                            "{ty:?} {isa:?} {cols}: {a} vs {b}"
                        );
                    }
                }
                // Against f32 math on the dequantized weights: the only difference is the
                // activations' 8-bit quantization, |err| ≤ Σ|w|·dx/2 per row.
                let mut wrow = vec![0f32; cols];
                for r in 0..rows {
                    w.dequantize_row(r, &mut wrow);
                    for t in 0..n {
                        let xr = &x[t * cols..(t + 1) * cols];
                        let exact: f32 = wrow.iter().zip(xr).map(|(a, b)| a * b).sum();
                        let amax = xr.iter().fold(0f32, |a, v| a.max(v.abs()));
                        let bound =
                            wrow.iter().map(|v| v.abs()).sum::<f32>() * amax / 127.0 / 2.0 + 1e-4;
                        let got = want[t * rows + r];
                        assert!(
                            (got - exact).abs() <= bound,
                            "{ty:?} {cols}: {got} vs {exact} (bound {bound})"
                        );
                    }
                }
            }
        }
    }
}
