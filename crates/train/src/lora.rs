//! LoRA (Hu et al. 2021) on the training model: for each targeted matrix `W` (out × in), the
//! layer computes `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ` with `A` (r × in), `B` (out × r), `s = alpha / r`;
//! `W` stays frozen, only `A` and `B` train. Initialised as PEFT does: `A` Kaiming-uniform
//! (bound 1/√in), `B` zero, so training starts from the base model exactly.
//!
//! Adapters live in one flat buffer (like the model's parameters) with PEFT's tensor names;
//! `model.rs` calls [`Lora::forward`] after each base product and [`Lora::backward`] with that
//! product's output gradient. q/k/v (and gate/up) are one fused product in the model, so each
//! adapter writes its own column range of the fused output.

use serde::{Deserialize, Serialize};

use crate::model::{ModelConfig, SplitMix, TensorSlot};
use crate::ops::{self, Mat};

/// The seven projection matrices of a Llama block, by their Hugging Face module names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// PEFT's `target_modules` name.
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The module path under `model.layers.N`.
    pub fn path(self) -> String {
        let parent = match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        };
        format!("{parent}.{}", self.module())
    }

    /// `q`, `q_proj`, … → the target.
    pub fn parse(s: &str) -> Option<Target> {
        let s = s.trim().trim_end_matches("_proj");
        Target::ALL
            .into_iter()
            .find(|t| t.module().trim_end_matches("_proj") == s)
    }

    /// (in, out, column offset in the fused product's output, the fused group).
    pub(crate) fn shape(self, c: &ModelConfig) -> (usize, usize, usize, Group) {
        let (d, q, kv, f) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
        match self {
            Target::Q => (d, q, 0, Group::Qkv),
            Target::K => (d, kv, q, Group::Qkv),
            Target::V => (d, kv, q + kv, Group::Qkv),
            Target::O => (q, d, 0, Group::O),
            Target::Gate => (d, f, 0, Group::GateUp),
            Target::Up => (d, f, f, Group::GateUp),
            Target::Down => (f, d, 0, Group::Down),
        }
    }
}

/// The model's four products that adapters attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Qkv,
    O,
    GateUp,
    Down,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<Target>,
}

/// PEFT's name for a sequence-classification model's head (`modules_to_save = ["score"]`).
pub const SCORE_TENSOR: &str = "base_model.model.score.weight";

/// One adapter: where its A and B sit in the flat buffer.
#[derive(Debug, Clone)]
struct Adapter {
    layer: usize,
    group: Group,
    a: usize,
    b: usize,
    n_in: usize,
    n_out: usize,
    col: usize,
}

/// The adapters of a model: layout of the flat buffer (PEFT names) and how to apply them.
#[derive(Debug, Clone)]
pub struct Lora {
    pub cfg: LoraConfig,
    pub tensors: Vec<TensorSlot>,
    pub len: usize,
    adapters: Vec<Adapter>,
    scale: f32,
    /// A reward model's scalar head: the offset of its `dim` weights (the last tensor,
    /// PEFT's `base_model.model.score.weight`, shape `[1, dim]`).
    pub score: Option<usize>,
}

/// What forward saves for backward: `x·Aᵀ` of each adapter (rows × r).
#[derive(Debug, Default)]
pub struct LoraActs {
    xa: Vec<Vec<f32>>,
    dxa: Vec<f32>,
}

impl Lora {
    pub fn new(c: &ModelConfig, cfg: LoraConfig) -> Lora {
        let mut tensors = Vec::new();
        let mut adapters = Vec::new();
        let mut len = 0;
        let mut targets = cfg.targets.clone();
        targets.sort();
        targets.dedup();
        for layer in 0..c.n_layers {
            for &t in &targets {
                let (n_in, n_out, col, group) = t.shape(c);
                let base = format!("base_model.model.model.layers.{layer}.{}", t.path());
                let a = len;
                tensors.push(TensorSlot {
                    name: format!("{base}.lora_A.weight"),
                    shape: vec![cfg.rank, n_in],
                    offset: a,
                    decay: true,
                });
                len += cfg.rank * n_in;
                let b = len;
                tensors.push(TensorSlot {
                    name: format!("{base}.lora_B.weight"),
                    shape: vec![n_out, cfg.rank],
                    offset: b,
                    decay: true,
                });
                len += n_out * cfg.rank;
                adapters.push(Adapter {
                    layer,
                    group,
                    a,
                    b,
                    n_in,
                    n_out,
                    col,
                });
            }
        }
        let scale = cfg.alpha / cfg.rank as f32;
        Lora {
            cfg: LoraConfig { targets, ..cfg },
            tensors,
            len,
            adapters,
            scale,
            score: None,
        }
    }

    /// The same adapters with a reward model's scalar head on a model of width `dim`
    /// (trained with them; Hugging Face's `…ForSequenceClassification.score`).
    pub fn with_score(mut self, dim: usize) -> Lora {
        if self.score.is_none() {
            self.tensors.push(TensorSlot {
                name: SCORE_TENSOR.into(),
                shape: vec![1, dim],
                offset: self.len,
                decay: false,
            });
            self.score = Some(self.len);
            self.len += dim;
        }
        self
    }

    /// The A and B tensors of every adapter, in pairs (without the score head).
    pub fn pairs(&self) -> &[TensorSlot] {
        &self.tensors[..2 * self.adapters.len()]
    }

    /// PEFT's initialisation: A ~ U(−1/√in, 1/√in) (Kaiming-uniform with a = √5), B = 0.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut p = vec![0f32; self.len];
        let mut rng = SplitMix(seed);
        for ad in &self.adapters {
            let bound = 1.0 / (ad.n_in as f64).sqrt();
            for x in &mut p[ad.a..ad.a + self.cfg.rank * ad.n_in] {
                *x = ((2.0 * rng.uniform() - 1.0) * bound) as f32;
            }
        }
        if let Some(off) = self.score {
            // like Hugging Face's N(0, 0.02) for a new linear head: U(−a, a) with a = 0.02·√3
            let bound = 0.02 * 3f64.sqrt();
            for x in &mut p[off..] {
                *x = ((2.0 * rng.uniform() - 1.0) * bound) as f32;
            }
        }
        p
    }

    pub fn acts(&self, rows: usize) -> LoraActs {
        LoraActs {
            xa: self
                .adapters
                .iter()
                .map(|_| vec![0f32; rows * self.cfg.rank])
                .collect(),
            dxa: vec![0f32; rows * self.cfg.rank],
        }
    }

    /// `out[:, col..col+n_out] += s·(x·Aᵀ)·Bᵀ` for each adapter of (`layer`, `group`); `out`
    /// has row stride `stride`; `x` is the product's input (rows × in).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        params: &[f32],
        acts: &mut LoraActs,
        layer: usize,
        group: Group,
        x: &[f32],
        out: &mut [f32],
        stride: usize,
        rows: usize,
    ) {
        let r = self.cfg.rank;
        for (i, ad) in self.adapters.iter().enumerate() {
            if ad.layer != layer || ad.group != group {
                continue;
            }
            let xa = &mut acts.xa[i];
            ops::matmul_nt(xa, x, &params[ad.a..], rows, r, ad.n_in, false);
            let b = Mat::rows(&params[ad.b..ad.b + ad.n_out * r], r).t();
            ops::gemm_into(
                &mut out[ad.col..],
                stride,
                Mat::rows(xa, r),
                b,
                (rows, ad.n_out, r),
                true,
                self.scale,
            );
        }
    }

    /// Backward of [`Lora::forward`]: from the product's output gradient `dy` (row stride
    /// `stride`), accumulate `grads` of A and B and add the adapters' part of the input
    /// gradient to `dx` (rows × in).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &[f32],
        grads: &mut [f32],
        acts: &mut LoraActs,
        layer: usize,
        group: Group,
        x: &[f32],
        dy: &[f32],
        stride: usize,
        dx: &mut [f32],
        rows: usize,
    ) {
        let r = self.cfg.rank;
        for (i, ad) in self.adapters.iter().enumerate() {
            if ad.layer != layer || ad.group != group {
                continue;
            }
            let dy = Mat::rows(&dy[ad.col..], stride);
            let xa = Mat::rows(&acts.xa[i], r);
            // dB (out × r) += s · dyᵀ · xa
            ops::gemm_into(
                &mut grads[ad.b..],
                r,
                dy.t(),
                xa,
                (ad.n_out, r, rows),
                true,
                self.scale,
            );
            // dxa (rows × r) = s · dy · B
            let b = Mat::rows(&params[ad.b..ad.b + ad.n_out * r], r);
            ops::gemm_into(
                &mut acts.dxa,
                r,
                dy,
                b,
                (rows, r, ad.n_out),
                false,
                self.scale,
            );
            // dA (r × in) += dxaᵀ · x ; dx += dxa · A
            ops::matmul_tn_acc(&mut grads[ad.a..], &acts.dxa, x, r, ad.n_in, rows);
            ops::matmul_nn(dx, &acts.dxa, &params[ad.a..], rows, ad.n_in, r, true);
        }
    }
}
