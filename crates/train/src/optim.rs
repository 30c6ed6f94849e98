//! AdamW, gradient clipping and the learning-rate schedule, over the flat parameter buffer.
//!
//! Semantics are PyTorch's (`torch.optim.AdamW`, `clip_grad_norm_`) so a step can be held to
//! the reference fixture: decoupled weight decay `p ← p·(1 − lr·wd)` before the Adam update,
//! bias correction folded into the step size, `eps` added to the bias-corrected √v.

use rayon::prelude::*;

use crate::model::TensorSlot;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

/// Optimizer state: first and second moments in the parameters' layout, and the step count.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Updates taken so far (bias correction uses step + 1 for the next one).
    pub step: u64,
}

impl AdamW {
    pub fn new(n: usize) -> Self {
        AdamW {
            m: vec![0.0; n],
            v: vec![0.0; n],
            step: 0,
        }
    }

    /// One update of `params` with `grads` at learning rate `lr`; weight decay only where the
    /// layout says so (matrices and embeddings).
    pub fn update(
        &mut self,
        cfg: &AdamWConfig,
        tensors: &[TensorSlot],
        lr: f32,
        params: &mut [f32],
        grads: &[f32],
    ) {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - (cfg.beta1 as f64).powi(t);
        let bc2_sqrt = (1.0 - (cfg.beta2 as f64).powi(t)).sqrt();
        let step_size = (lr as f64 / bc1) as f32;
        let inv_bc2_sqrt = (1.0 / bc2_sqrt) as f32;
        let (b1, b2, eps) = (cfg.beta1, cfg.beta2, cfg.eps);
        for slot in tensors {
            let r = slot.range();
            let decay = if slot.decay {
                1.0 - lr * cfg.weight_decay
            } else {
                1.0
            };
            let (p, g) = (&mut params[r.clone()], &grads[r.clone()]);
            let (m, v) = (&mut self.m[r.clone()], &mut self.v[r]);
            // 16K elements per rayon task: big tensors split, small ones stay whole.
            const CHUNK: usize = 16_384;
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| {
                    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                        *p *= decay;
                        *m = b1 * *m + (1.0 - b1) * g;
                        *v = b2 * *v + (1.0 - b2) * g * g;
                        *p -= step_size * *m / (v.sqrt() * inv_bc2_sqrt + eps);
                    }
                });
        }
    }
}

/// Global L2 norm of `grads`; if it exceeds `max_norm`, scale them down to it (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)`, never above 1). Returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    // Partial sums per fixed chunk, added in chunk order: reproducible for any thread count.
    let partial: Vec<f64> = grads
        .par_chunks(16_384)
        .map(|c| c.iter().map(|&g| f64::from(g) * f64::from(g)).sum::<f64>())
        .collect();
    let norm = partial.iter().sum::<f64>().sqrt() as f32;
    if max_norm > 0.0 {
        let k = max_norm / (norm + 1e-6);
        if k < 1.0 {
            grads.par_iter_mut().for_each(|g| *g *= k);
        }
    }
    norm
}

/// Linear warm-up over `warmup` steps, then cosine decay from `lr` to `min_lr` at
/// `decay_iters`, then `min_lr` (nanoGPT's `get_lr`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
    pub decay_iters: u64,
}

impl Schedule {
    pub fn at(&self, it: u64) -> f32 {
        if it < self.warmup {
            return self.lr * (it + 1) as f32 / (self.warmup + 1) as f32;
        }
        if it > self.decay_iters {
            return self.min_lr;
        }
        let span = (self.decay_iters - self.warmup).max(1) as f64;
        let ratio = (it - self.warmup) as f64 / span;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + (coeff * f64::from(self.lr - self.min_lr)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = Schedule {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup: 100,
            decay_iters: 2000,
        };
        assert!((s.at(0) - 1e-3 / 101.0).abs() < 1e-9);
        assert!((s.at(99) - 1e-3 * 100.0 / 101.0).abs() < 1e-9);
        assert!((s.at(100) - 1e-3).abs() < 1e-9);
        assert!((s.at(1050) - 5.5e-4).abs() < 1e-6);
        assert!((s.at(2000) - 1e-4).abs() < 1e-9);
        assert_eq!(s.at(5000), 1e-4);
    }

    #[test]
    fn clipping_scales_to_the_max_norm_and_leaves_small_gradients_alone() {
        let mut g = vec![3.0, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        let n: f32 = g.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5);
        let mut g = vec![0.3, 0.4];
        clip_grad_norm(&mut g, 1.0);
        assert_eq!(g, vec![0.3, 0.4]);
    }
}
