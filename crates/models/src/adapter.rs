//! LoRA adapters at inference, per sequence of a flat batch: sequences that name an adapter get
//! `y += s·(x·Aᵀ)·Bᵀ` after each adapted projection, the others the base model alone — so
//! requests for different fine-tunes of one base share a batch and one copy of its weights.
//!
//! The model calls [`Adapter::apply_row`] on each adapted row after the base product. The
//! low-rank update costs `r·(in + out)` multiply-adds per row and projection (r = 8 on all
//! seven: 2.3% of a SmolLM2 layer's work), but its f32 matrices are read like weights: 9.5 MiB
//! for that adapter against the base's 85 MiB of Q4_1, so one adapted stream decodes ~11%
//! slower than the base (measured with `scripts/loadgen.py`; BENCHMARKS.md). Rows of q and k are in GGUF's interleaved-RoPE order, as the
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
    /// Bᵀ: (r × n_out), row-major, so the update is r SIMD `axpy`s over the output row.
    bt: Vec<f32>,
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
    /// A reward model's scalar head (`dim` weights on the final hidden state of a
    /// conversation's last token); `None` for a language-model adapter.
    pub score: Option<Vec<f32>>,
}

impl Adapter {
    pub fn new(name: &str, n_layers: usize, rank: usize, scale: f32) -> Adapter {
        Adapter {
            name: name.to_owned(),
            rank,
            scale,
            uid: next_uid(),
            layers: (0..n_layers).map(|_| Default::default()).collect(),
            score: None,
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
        if r == 0 || layer >= self.layers.len() || a.len() != r * n_in || b.len() != n_out * r {
            return Err(ModelError::Unsupported(format!(
                "adapter `{}`: layer {layer} {proj:?} has A {} and B {} values for rank {r}, {n_in} in, {n_out} out",
                self.name,
                a.len(),
                b.len()
            )));
        }
        let mut bt = vec![0f32; b.len()];
        for (j, brow) in b.chunks_exact(r).enumerate() {
            for (k, v) in brow.iter().enumerate() {
                bt[k * n_out + j] = *v;
            }
        }
        self.layers[layer][proj.index()] = Some(Pair { a, bt, n_in, n_out });
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
            .map(|p| p.a.len() + p.bt.len())
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

    /// One row: `y += s·(x·Aᵀ)·Bᵀ`, `x` the row's input (`n_in` values) and `y` its output
    /// (`n_out` values). No-op if `proj` is not adapted in `layer`.
    pub fn apply_row(&self, layer: usize, proj: Proj, x: &[f32], y: &mut [f32]) {
        let Some(p) = self
            .layers
            .get(layer)
            .and_then(|l| l[proj.index()].as_ref())
        else {
            return;
        };
        let (x, y) = (&x[..p.n_in], &mut y[..p.n_out]);
        for (a_k, bt_k) in p.a.chunks_exact(p.n_in).zip(p.bt.chunks_exact(p.n_out)) {
            let xa = self.scale * crate::simd::dot(x, a_k);
            crate::simd::axpy(y, xa, bt_k);
        }
    }
}
