//! A weight matrix `[out, in]` in whichever form runs fastest for its GGUF type.
//!
//! * Every quantized weight type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K … Q6_K) → our repacked
//!   [`QMatrix`] and its kernels, losslessly (see [`crate::quant::Grain`]; stays 4/8-bit in
//!   memory).
//! * F32 and BF16 → f32 rows; F16 → kept as f16 (half the bytes a decode step reads), widened
//!   on the fly. One-token products are AVX2 dot products split by rows over the thread pool;
//!   prompts use the same dot products (batch invariant, the default) or, with
//!   `FERROLM_BATCH_INVARIANT=0`, `gemm` over f32 panels.

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::Device;
use ferrolm_gguf::{GgmlType, GgufFile, TensorInfo};
use rayon::prelude::*;

use crate::mat::{gemm_to_ptr, Mat, Par};
use crate::quant::{batch_invariant, matmul, Grain, Isa, QActs, QMatrix, SendPtr};
use crate::simd;
use crate::ModelError;

pub enum Linear {
    /// Boxed: a model holds its q/k/v either fused or split, and the enum stays small.
    Q(Box<QMatrix>),
    /// Row-major f32 (from F32 or BF16 weights, exactly).
    F32 {
        w: Vec<f32>,
        rows: usize,
        cols: usize,
    },
    /// Row-major f16 bits (from F16 weights).
    F16 {
        w: Vec<u16>,
        rows: usize,
        cols: usize,
    },
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Linear({}x{}, {})",
            self.rows(),
            self.cols(),
            self.kind()
        )
    }
}

fn candle_dtype(t: GgmlType) -> Option<GgmlDType> {
    Some(match t {
        GgmlType::F32 => GgmlDType::F32,
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::BF16 => GgmlDType::BF16,
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q8_1 => GgmlDType::Q8_1,
        GgmlType::Q2K => GgmlDType::Q2K,
        GgmlType::Q3K => GgmlDType::Q3K,
        GgmlType::Q4K => GgmlDType::Q4K,
        GgmlType::Q5K => GgmlDType::Q5K,
        GgmlType::Q6K => GgmlDType::Q6K,
        GgmlType::Q8K => GgmlDType::Q8K,
    })
}

/// Dequantize any GGUF tensor to f32 with candle (load-time only: norms, biases, embeddings
/// of types our kernels do not cover).
pub fn dequantize(g: &GgufFile, info: &TensorInfo) -> Result<Vec<f32>, ModelError> {
    Stored::load(g, info)?.dequantize()
}

/// A GGUF tensor kept in its stored (quantized) form and dequantized on demand: the frozen
/// base of QLoRA, which then takes the quantized file's memory instead of f32's.
pub struct Stored {
    qt: candle_core::quantized::QTensor,
    /// The file and tensor, for errors.
    path: String,
    name: String,
}

impl Stored {
    pub fn load(g: &GgufFile, info: &TensorInfo) -> Result<Stored, ModelError> {
        let raw = g.tensor_bytes(info)?;
        let dims: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
        let dt = candle_dtype(info.ggml_type)
            .ok_or_else(|| ModelError::tensor(g, info, "unsupported type"))?;
        let qt = qtensor_from_ggml(dt, &raw, dims, &Device::Cpu)
            .map_err(|e| ModelError::tensor(g, info, &e.to_string()))?;
        Ok(Stored {
            qt,
            path: g.path.display().to_string(),
            name: info.name.clone(),
        })
    }

    /// The values as f32.
    pub fn dequantize(&self) -> Result<Vec<f32>, ModelError> {
        self.qt
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| ModelError::Tensor {
                path: self.path.clone(),
                name: self.name.clone(),
                reason: e.to_string(),
            })
    }

    /// Bytes held.
    pub fn storage_bytes(&self) -> usize {
        self.qt.storage_size_in_bytes()
    }
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stored({}, {:?})", self.name, self.qt.dtype())
    }
}

impl Linear {
    /// Load a 2-D weight `name` expecting `[rows, cols]` (ggml dims `[cols, rows]`).
    pub fn load(g: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<Linear, ModelError> {
        let info = g.tensor(name)?;
        if info.dims.len() != 2 || info.dims[0] as usize != cols || info.dims[1] as usize != rows {
            return Err(ModelError::tensor(
                g,
                info,
                &format!(
                    "shape {:?} (ggml order), expected [{cols}, {rows}]",
                    info.dims
                ),
            ));
        }
        match info.ggml_type {
            GgmlType::F16 => {
                let raw = g.tensor_bytes(info)?;
                let w = raw
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect();
                Ok(Linear::F16 { w, rows, cols })
            }
            GgmlType::F32 | GgmlType::BF16 => {
                let w = dequantize(g, info)?;
                Ok(Linear::F32 { w, rows, cols })
            }
            GgmlType::Q8_1 | GgmlType::Q8K => Err(ModelError::tensor(
                g,
                info,
                &format!(
                    "{:?} is ggml's activation format, not a weight format (no converter \
                     writes weights in it); requantize the file as Q8_0",
                    info.ggml_type
                ),
            )),
            ty => {
                let block = ty.block_size() as usize;
                if !cols.is_multiple_of(block) {
                    return Err(ModelError::tensor(
                        g,
                        info,
                        &format!(
                            "{ty:?} rows have {cols} elements, not a multiple of its block size \
                             {block} (K-quants pack rows in super-blocks of 256; requantize this \
                             tensor as Q4_0, Q5_0 or Q8_0, as llama-quantize does for such rows)"
                        ),
                    ));
                }
                let raw = g.tensor_bytes(info)?;
                let q = QMatrix::from_ggml(ty, rows, cols, &raw)
                    .ok_or_else(|| ModelError::tensor(g, info, "size does not match its type"))?;
                Ok(Linear::Q(Box::new(q)))
            }
        }
    }

    pub fn rows(&self) -> usize {
        match self {
            Linear::Q(q) => q.rows,
            Linear::F32 { rows, .. } | Linear::F16 { rows, .. } => *rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Linear::Q(q) => q.cols,
            Linear::F32 { cols, .. } | Linear::F16 { cols, .. } => *cols,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Linear::Q(q)
                if matches!(
                    q.layout,
                    crate::quant::Layout::Packed5 | crate::quant::Layout::Group16Packed5
                ) =>
            {
                "q5 (ferrolm kernels)"
            }
            Linear::Q(q) => match (q.bits, q.grain) {
                (crate::quant::QBits::Four, Grain::Block32) => "q4 (ferrolm kernels)",
                (crate::quant::QBits::Eight, Grain::Block32) => "q8 (ferrolm kernels)",
                (crate::quant::QBits::Four, Grain::Sub16) => {
                    "q4, 16-element scales (ferrolm kernels)"
                }
                (crate::quant::QBits::Eight, Grain::Sub16) => {
                    "q8, 16-element scales (ferrolm kernels)"
                }
            },
            Linear::F32 { .. } => "f32",
            Linear::F16 { .. } => "f16",
        }
    }

    pub fn memory_bytes(&self) -> usize {
        match self {
            Linear::Q(q) => q.memory_bytes(),
            Linear::F32 { rows, cols, .. } => rows * cols * 4,
            Linear::F16 { rows, cols, .. } => rows * cols * 2,
        }
    }

    /// Stack matrices with the same input width and the same repacked form along the output
    /// dimension (q‖k‖v, gate‖up), so one parallel pass computes them all, for the kernels of
    /// `isa` ([`QMatrix::concat_rows`]). The parts back if they do not fuse.
    pub fn concat(parts: Vec<Linear>, isa: Isa) -> Result<Linear, Vec<Linear>> {
        let all_q = parts.iter().all(|p| matches!(p, Linear::Q(_)));
        if !all_q {
            return Err(parts);
        }
        let qs: Vec<QMatrix> = parts
            .into_iter()
            .filter_map(|p| match p {
                Linear::Q(q) => Some(*q),
                _ => None,
            })
            .collect();
        match QMatrix::concat_rows(&qs, isa) {
            Some(q) => Ok(Linear::Q(Box::new(q))),
            None => Err(qs.into_iter().map(|q| Linear::Q(Box::new(q))).collect()),
        }
    }

    /// `out (n × rows) = x (n × cols) · Wᵀ`.
    pub fn forward(
        &self,
        isa: Isa,
        x: &[f32],
        n: usize,
        acts: &mut QActs,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        match self {
            Linear::Q(q) => {
                acts.quantize(&x[..n * q.cols], n, q.cols);
                matmul(isa, q, acts, &mut out[..n * q.rows]);
            }
            Linear::F32 { w, rows, cols } => {
                let panel = |r: std::ops::Range<usize>, p: &mut Vec<f32>| {
                    p.clear();
                    p.extend_from_slice(&w[r.start * cols..r.end * cols]);
                };
                let dot = |r: usize, x: &[f32]| simd::dot(x, &w[r * cols..(r + 1) * cols]);
                let dot4 = |r: usize, x: [&[f32]; 4]| simd::dot4(x, &w[r * cols..(r + 1) * cols]);
                dense(x, n, *rows, *cols, out, (dot, dot4), panel);
            }
            Linear::F16 { w, rows, cols } => {
                let panel = |r: std::ops::Range<usize>, p: &mut Vec<f32>| {
                    p.resize(r.len() * cols, 0.0);
                    simd::f16_to_f32(&w[r.start * cols..r.end * cols], p);
                };
                let dot = |r: usize, x: &[f32]| simd::dot_f16(x, &w[r * cols..(r + 1) * cols]);
                let dot4 =
                    |r: usize, x: [&[f32]; 4]| simd::dot4_f16(x, &w[r * cols..(r + 1) * cols]);
                dense(x, n, *rows, *cols, out, (dot, dot4), panel);
            }
        }
        Ok(())
    }

    /// Put the weights in the layout `isa`'s fastest kernel reads (16-row groups for AVX-512
    /// VNNI; for AVX2 16-row groups of the K-quants, Q4_1 and the Q5 types (5 bits per quant),
    /// see [`crate::quant::QMatrix::prepare_avx2`]); a no-op for others.
    pub fn prepare(&mut self, isa: Isa) {
        if let Linear::Q(q) = self {
            q.prepare(isa);
        }
    }

    /// Row `r` as f32 (embedding lookup).
    pub fn row(&self, r: usize, out: &mut [f32]) -> Result<(), ModelError> {
        match self {
            Linear::Q(q) => q.dequantize_row(r, out),
            Linear::F32 { w, cols, .. } => out.copy_from_slice(&w[r * cols..(r + 1) * cols]),
            Linear::F16 { w, cols, .. } => simd::f16_to_f32(&w[r * cols..(r + 1) * cols], out),
        }
        Ok(())
    }
}

/// Rows per parallel task of a float matrix product (f32 rows of 576–2,048 values: 36–128 KB).
const DENSE_ROWS: usize = 16;

/// `out (n × rows) = x (n × cols) · Wᵀ` for a float matrix: `dot(r, x_t)` is row r against one
/// token and `dot4` against four at once (bitwise the same per token); `panel(rows, buf)` writes
/// those rows as f32. Every output is one `dot` (the same
/// arithmetic for any n: batch invariant) unless batch invariance is off and there are enough
/// tokens to pay for `gemm` over f32 panels.
fn dense(
    x: &[f32],
    n: usize,
    rows: usize,
    cols: usize,
    out: &mut [f32],
    (dot, dot4): (
        impl Fn(usize, &[f32]) -> f32 + Sync,
        impl Fn(usize, [&[f32]; 4]) -> [f32; 4] + Sync,
    ),
    panel: impl Fn(std::ops::Range<usize>, &mut Vec<f32>) + Sync,
) {
    let out = &mut out[..n * rows];
    let x = &x[..n * cols];
    let ptr = SendPtr(out.as_mut_ptr());
    let ptr = &ptr;
    if batch_invariant() || n < 8 {
        (0..rows.div_ceil(DENSE_ROWS))
            .into_par_iter()
            .for_each(|c| {
                let rs = c * DENSE_ROWS..((c + 1) * DENSE_ROWS).min(rows);
                let quads = n / 4;
                for q in 0..quads {
                    let xs: [&[f32]; 4] = std::array::from_fn(|i| &x[(4 * q + i) * cols..][..cols]);
                    for r in rs.clone() {
                        for (i, v) in dot4(r, xs).into_iter().enumerate() {
                            // SAFETY: (t, r) is in bounds and written by this task only.
                            unsafe { *ptr.0.add((4 * q + i) * rows + r) = v };
                        }
                    }
                }
                for t in 4 * quads..n {
                    let xt = &x[t * cols..(t + 1) * cols];
                    for r in rs.clone() {
                        // SAFETY: as above.
                        unsafe { *ptr.0.add(t * rows + r) = dot(r, xt) };
                    }
                }
            });
        return;
    }
    const PANEL: usize = 64;
    (0..rows.div_ceil(PANEL))
        .into_par_iter()
        .for_each_init(Vec::new, |buf, c| {
            let rs = c * PANEL..((c + 1) * PANEL).min(rows);
            let rn = rs.len();
            panel(rs.clone(), buf);
            // SAFETY: the n × rn block at column rs.start (row stride `rows`) is in `out` and
            // written by this task only.
            unsafe {
                gemm_to_ptr(
                    ptr.0.add(rs.start),
                    rows,
                    Mat::rows(x, cols),
                    Mat::rows(buf, cols).t(),
                    (n, rn, cols),
                    false,
                    1.0,
                    Par::Serial,
                )
            }
        });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pseudo(i: usize) -> f32 {
        ((i.wrapping_mul(2_654_435_761) % 1000) as f32 / 500.0) - 1.0
    }

    /// Float matrices (f32 rows, f16 rows) against an f64 product, and a prompt of n tokens
    /// against the same tokens one at a time, bitwise (batch invariance), for widths with and
    /// without a 16-wide tail.
    #[test]
    fn float_matrices_are_exact_enough_and_batch_invariant() {
        crate::quant::set_batch_invariant(true);
        for cols in [96, 88, 40] {
            let rows = 37;
            let w: Vec<f32> = (0..rows * cols).map(pseudo).collect();
            let w16: Vec<u16> = w
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            let wide: Vec<f32> = w16
                .iter()
                .map(|&h| half::f16::from_bits(h).to_f32())
                .collect();
            for (lin, wref) in [
                (
                    Linear::F32 {
                        w: w.clone(),
                        rows,
                        cols,
                    },
                    &w,
                ),
                (Linear::F16 { w: w16, rows, cols }, &wide),
            ] {
                let n = 7;
                let x: Vec<f32> = (0..n * cols).map(|i| pseudo(i + 77)).collect();
                let mut all = vec![0f32; n * rows];
                lin.forward(Isa::Scalar, &x, n, &mut QActs::default(), &mut all)
                    .unwrap();
                for t in 0..n {
                    let mut one = vec![0f32; rows];
                    let xt = &x[t * cols..(t + 1) * cols];
                    lin.forward(Isa::Scalar, xt, 1, &mut QActs::default(), &mut one)
                        .unwrap();
                    for r in 0..rows {
                        let got = all[t * rows + r];
                        assert_eq!(got.to_bits(), one[r].to_bits(), "{} t{t} r{r}", lin.kind());
                        let want: f64 = (0..cols)
                            .map(|k| xt[k] as f64 * wref[r * cols + k] as f64)
                            .sum();
                        assert!(
                            (got as f64 - want).abs() < 1e-4,
                            "{} {got} vs {want}",
                            lin.kind()
                        );
                    }
                }
            }
        }
    }
}
