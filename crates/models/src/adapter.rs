//! LoRA adapters at inference, per sequence of a flat batch: sequences that name an adapter get
//! `y += s·(x·Aᵀ)·Bᵀ` after each adapted projection, the others the base model alone — so
//! requests for different fine-tunes of one base share a batch and one copy of its weights.
//!
//! The model calls [`Adapter::apply`] on each sequence's rows after the base product. The
//! low-rank update costs `r·(in + out)` multiply-adds per row and projection (r = 8: under 2%
//! of a SmolLM2 layer's work). Rows of q and k are in GGUF's interleaved-RoPE order, as the
//! base weights are (PEFT files are converted when they are read).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::ModelError;

/// Gives every adapter (and every change to one) an identity of its own.
static NEXT_UID: AtomicU64 = AtomicU64::new(1);

fn next_uid() -> u64 {
    NEXT_UID.fetch_add(1, Ordering::Relaxed)
}

/// The seven projections of a Llama block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone)]
struct Pair {
    /// (r × n_in), row-major.
    a: Vec<f32>,
    /// (n_out × r), row-major.
    b: Vec<f32>,
    n_in: usize,
    n_out: usize,
}

/// One LoRA adapter for a model: rank, scale (`alpha / r`) and, per layer, the (A, B) of each
/// adapted projection.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub name: String,
    pub rank: usize,
    pub scale: f32,
    /// Unique per adapter in this process and renewed by every [`Adapter::set`]: the engine's
    /// prefix-cache namespace, so two adapters (or one reloaded with other weights) never share
    /// cached KV blocks, whatever their names.
    uid: u64,
    layers: Vec<[Option<Pair>; 7]>,
}

impl Adapter {
    pub fn new(name: &str, n_layers: usize, rank: usize, scale: f32) -> Adapter {
        Adapter {
            name: name.to_owned(),
            rank,
            scale,
            uid: next_uid(),
            layers: (0..n_layers).map(|_| Default::default()).collect(),
        }
    }

    /// Set `layer`'s adapter on `proj`: `a` is (rank × n_in), `b` is (n_out × rank).
    pub fn set(
        &mut self,
        layer: usize,
        proj: Proj,
        a: Vec<f32>,
        b: Vec<f32>,
        n_in: usize,
        n_out: usize,
    ) -> Result<(), ModelError> {
        let r = self.rank;
        if layer >= self.layers.len() || a.len() != r * n_in || b.len() != n_out * r {
            return Err(ModelError::Unsupported(format!(
                "adapter `{}`: layer {layer} {proj:?} has A {} and B {} values for rank {r}, {n_in} in, {n_out} out",
                self.name,
                a.len(),
                b.len()
            )));
        }
        self.layers[layer][proj.index()] = Some(Pair { a, b, n_in, n_out });
        self.uid = next_uid();
        Ok(())
    }

    /// This adapter's identity (see the field): never 0.
    pub fn uid(&self) -> u64 {
        self.uid
    }

    /// Bytes of its A and B matrices.
    pub fn memory_bytes(&self) -> usize {
        let values: usize = self
            .layers
            .iter()
            .flatten()
            .flatten()
            .map(|p| p.a.len() + p.b.len())
            .sum();
        values * std::mem::size_of::<f32>()
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Shapes this adapter expects of a projection, if it adapts it: (in, out).
    pub fn shape(&self, layer: usize, proj: Proj) -> Option<(usize, usize)> {
        self.layers.get(layer)?[proj.index()]
            .as_ref()
            .map(|p| (p.n_in, p.n_out))
    }

    /// For rows `rows` of the batch: `out[i][col..col + n_out] += s·(x[i]·Aᵀ)·Bᵀ`, where `x` has
    /// row stride `x_stride` and `out` row stride `out_stride`. No-op if `proj` is not adapted.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &self,
        layer: usize,
        proj: Proj,
        x: &[f32],
        x_stride: usize,
        out: &mut [f32],
        out_stride: usize,
        col: usize,
        rows: std::ops::Range<usize>,
    ) {
        let Some(p) = self
            .layers
            .get(layer)
            .and_then(|l| l[proj.index()].as_ref())
        else {
            return;
        };
        let r = self.rank;
        let mut xa = vec![0f32; r];
        for i in rows {
            let xi = &x[i * x_stride..][..p.n_in];
            for (k, v) in xa.iter_mut().enumerate() {
                *v = self.scale * crate::simd::dot(xi, &p.a[k * p.n_in..][..p.n_in]);
            }
            let yi = &mut out[i * out_stride + col..][..p.n_out];
            for (y, brow) in yi.iter_mut().zip(p.b.chunks_exact(r)) {
                *y += brow.iter().zip(&xa).map(|(b, v)| b * v).sum::<f32>();
            }
        }
    }
}
