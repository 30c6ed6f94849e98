//! A weight matrix `[out, in]` in whichever form runs fastest for its GGUF type.
//!
//! * Every quantized weight type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K … Q6_K) → our repacked
//!   [`QMatrix`] and its kernels, losslessly (see [`crate::quant::Grain`]; stays 4/8-bit in
//!   memory).
//! * F32 / F16 / BF16 → an f32 candle tensor and candle's GEMM.

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::{Device, Tensor};
use ferrolm_gguf::{GgmlType, GgufFile, TensorInfo};

use crate::quant::{matmul, Grain, Isa, QActs, QMatrix};
use crate::ModelError;

pub enum Linear {
    /// Boxed: a model holds its q/k/v either fused or split, and the enum stays small.
    Q(Box<QMatrix>),
    F32 {
        w: Tensor,
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
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                let w = dequantize(g, info)?;
                let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu)?;
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
            Linear::F32 { rows, .. } => *rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Linear::Q(q) => q.cols,
            Linear::F32 { cols, .. } => *cols,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Linear::Q(q) if q.layout == crate::quant::Layout::Packed5 => "q5 (ferrolm kernels)",
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
        }
    }

    pub fn memory_bytes(&self) -> usize {
        match self {
            Linear::Q(q) => q.memory_bytes(),
            Linear::F32 { rows, cols, .. } => rows * cols * 4,
        }
    }

    /// Stack matrices with the same input width and the same repacked form along the output
    /// dimension (q‖k‖v, gate‖up), so one parallel pass computes them all. `None` if they differ.
    pub fn concat(parts: Vec<Linear>) -> Result<Linear, Vec<Linear>> {
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
        match QMatrix::concat_rows(&qs) {
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
                let xt = Tensor::from_slice(&x[..n * cols], (n, *cols), &Device::Cpu)?;
                let y = xt.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
                out[..n * rows].copy_from_slice(&y);
            }
        }
        Ok(())
    }

    /// Put the weights in the layout `isa`'s fastest kernel reads (16-row groups for AVX-512
    /// VNNI, 5-bit packing of Q5 matrices for AVX2); a no-op for others.
    pub fn prepare(&mut self, isa: Isa) {
        match (self, isa) {
            (Linear::Q(q), Isa::Avx512Vnni) => {
                q.interleave16();
            }
            (Linear::Q(q), Isa::Avx2) => {
                q.prepare_avx2();
            }
            _ => {}
        }
    }

    /// Row `r` as f32 (embedding lookup).
    pub fn row(&self, r: usize, out: &mut [f32]) -> Result<(), ModelError> {
        match self {
            Linear::Q(q) => q.dequantize_row(r, out),
            Linear::F32 { w, .. } => out.copy_from_slice(&w.get(r)?.to_vec1::<f32>()?),
        }
        Ok(())
    }
}
