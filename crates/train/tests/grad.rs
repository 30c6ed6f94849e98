//! The hand-written backward held to central finite differences of the forward, on tiny
//! configs that exercise every path: GQA, tied and untied heads, several layers.
#![allow(clippy::unwrap_used)]

use ferrolm_train::model::{self, Activations, Layout, ModelConfig, SplitMix};

fn tiny(tied: bool, n_kv_heads: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 13,
        dim: 16,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads,
        ffn_dim: 24,
        context: 8,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        tied_embeddings: tied,
    }
}

fn check(c: &ModelConfig) {
    let layout = Layout::new(c);
    let mut rng = SplitMix(7);
    // Weights large enough that attention is far from uniform and every path matters.
    let mut params: Vec<f32> = (0..layout.len).map(|_| 0.4 * rng.normal()).collect();
    for t in layout.tensors.iter().filter(|t| t.shape.len() == 1) {
        for p in &mut params[t.range()] {
            *p = 1.0 + 0.1 * rng.normal();
        }
    }
    let (b, t) = (3, c.context);
    let tokens: Vec<u32> = (0..b * (t + 1))
        .map(|_| (rng.next_u64() % c.vocab_size as u64) as u32)
        .collect();
    let mut acts = Activations::new(c, b, t);
    let mut grads = vec![0f32; layout.len];
    model::forward(c, &layout, &params, &tokens, &mut acts, Some(1.0));
    model::backward(c, &layout, &params, &mut grads, &mut acts);
    let mut loss_at =
        |p: &[f32]| f64::from(model::forward(c, &layout, p, &tokens, &mut acts, None));
    let mut worst = 0f64;
    for slot in &layout.tensors {
        // every element of small tensors, a sample of large ones
        let idx: Vec<usize> = if slot.len() <= 32 {
            slot.range().collect()
        } else {
            (0..24)
                .map(|_| slot.offset + (rng.next_u64() as usize % slot.len()))
                .collect()
        };
        for i in idx {
            let h = 2e-3f32;
            let mut p = params.clone();
            p[i] += h;
            let up = loss_at(&p);
            p[i] -= 2.0 * h;
            let down = loss_at(&p);
            let fd = (up - down) / (2.0 * f64::from(h));
            let g = f64::from(grads[i]);
            let err = (fd - g).abs() / (fd.abs().max(g.abs()).max(1e-2));
            worst = worst.max(err);
            assert!(
                err < 2e-2,
                "{} [{}]: backward {g:.6e} vs finite difference {fd:.6e}",
                slot.name,
                i - slot.offset
            );
        }
    }
    eprintln!("worst relative error {worst:.2e}");
}

#[test]
fn gradients_match_finite_differences_tied_gqa() {
    check(&tiny(true, 2));
}

#[test]
fn gradients_match_finite_differences_untied_mha() {
    check(&tiny(false, 4));
}

/// LoRA on every target with the base frozen, and unscored (IGNORE) positions: the adapter
/// gradients match finite differences of the loss.
#[test]
fn lora_gradients_match_finite_differences_with_ignored_targets() {
    use ferrolm_train::lora::{Lora, LoraConfig, Target};
    use ferrolm_train::model::{LoraGrad, LoraRun, Weights, IGNORE};
    let c = tiny(true, 2);
    let layout = Layout::new(&c);
    let mut rng = SplitMix(9);
    let params: Vec<f32> = (0..layout.len).map(|_| 0.4 * rng.normal()).collect();
    let lora = Lora::new(
        &c,
        LoraConfig {
            rank: 3,
            alpha: 6.0,
            targets: Target::ALL.to_vec(),
        },
    );
    // B is zero at init; make it non-zero so every path carries gradient.
    let lp: Vec<f32> = (0..lora.len).map(|_| 0.3 * rng.normal()).collect();
    let (b, t) = (2, c.context);
    let inputs: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % 13) as u32).collect();
    let targets: Vec<u32> = (0..b * t)
        .map(|i| {
            if i % 3 == 0 {
                IGNORE
            } else {
                (rng.next_u64() % 13) as u32
            }
        })
        .collect();
    let mut acts = Activations::new(&c, b, t);
    let mut la = lora.acts(b * t);
    acts.set_scored(&inputs, &targets);
    let run = LoraRun {
        lora: &lora,
        params: &lp,
        acts: &mut la,
    };
    model::forward_scored(
        &c,
        &layout,
        Weights::F32(&params),
        Some(run),
        &mut acts,
        Some(1.0),
    );
    let mut lg = vec![0f32; lora.len];
    let grad = LoraGrad {
        lora: &lora,
        params: &lp,
        grads: &mut lg,
        acts: &mut la,
    };
    model::backward_with(
        &c,
        &layout,
        Weights::F32(&params),
        None,
        Some(grad),
        &mut acts,
    );
    let mut loss_at = |p: &[f32]| {
        let mut la = lora.acts(b * t);
        let run = LoraRun {
            lora: &lora,
            params: p,
            acts: &mut la,
        };
        f64::from(model::forward_scored(
            &c,
            &layout,
            Weights::F32(&params),
            Some(run),
            &mut acts,
            None,
        ))
    };
    for slot in &lora.tensors {
        for _ in 0..6 {
            let i = slot.offset + (rng.next_u64() as usize % slot.len());
            let h = 2e-3f32;
            let mut p = lp.clone();
            p[i] += h;
            let up = loss_at(&p);
            p[i] -= 2.0 * h;
            let down = loss_at(&p);
            let fd = (up - down) / (2.0 * f64::from(h));
            let g = f64::from(lg[i]);
            let err = (fd - g).abs() / (fd.abs().max(g.abs()).max(1e-2));
            assert!(
                err < 2e-2,
                "{}: backward {g:.6e} vs finite difference {fd:.6e}",
                slot.name
            );
        }
    }
}

/// The output head on scored rows only, a chunk at a time (what DPO runs), gives the log-probs
/// and the gradient of the whole-logits path, head included.
#[test]
fn the_scored_rows_head_matches_the_whole_logits_path() {
    use ferrolm_train::model::{Weights, IGNORE};
    use ferrolm_train::ops;
    let c = ModelConfig {
        context: 80,
        ..tiny(false, 2)
    };
    let layout = Layout::new(&c);
    let mut rng = SplitMix(5);
    let params: Vec<f32> = (0..layout.len).map(|_| 0.3 * rng.normal()).collect();
    let (b, t) = (2, c.context);
    let inputs: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % 13) as u32).collect();
    // more than one chunk of scored rows, with gaps
    let targets: Vec<u32> = (0..b * t)
        .map(|i| {
            if i % 5 == 0 {
                IGNORE
            } else {
                (rng.next_u64() % 13) as u32
            }
        })
        .collect();
    let w: Vec<f32> = (0..b * t)
        .map(|i| {
            if i % 7 == 0 {
                0.0
            } else {
                0.01 * (i % 3) as f32 + 0.005
            }
        })
        .collect();
    let p = Weights::F32(&params);

    let mut a = Activations::new(&c, b, t);
    a.set_scored(&inputs, &targets);
    model::forward_with(&c, &layout, p, None, &mut a);
    let (lp_full, lse_full) = ops::target_logprobs(&a.logits, &targets, c.vocab_size);
    ops::weighted_ce_grad(&mut a.logits, &targets, c.vocab_size, &lse_full, &w);
    let mut g_full = vec![0f32; layout.len];
    model::backward_with(&c, &layout, p, Some(&mut g_full), None, &mut a);

    let mut a = Activations::new(&c, b, t);
    a.set_scored(&inputs, &targets);
    model::forward_hidden_with(&c, &layout, p, None, &mut a);
    let (lp, lse) = model::scored_logprobs(&c, &layout, p, &a, &targets);
    let mut g = vec![0f32; layout.len];
    model::scored_head_backward(&c, &layout, p, Some(&mut g), &mut a, &targets, &lse, &w);
    model::backward_hidden_with(&c, &layout, p, Some(&mut g), None, &mut a);

    for i in 0..targets.len() {
        if targets[i] != IGNORE {
            assert!((lp[i] - lp_full[i]).abs() < 1e-5, "logp {i}");
            assert!((lse[i] - lse_full[i]).abs() < 1e-5, "lse {i}");
        }
    }
    let worst = g
        .iter()
        .zip(&g_full)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-3))
        .fold(0f32, f32::max);
    assert!(worst < 1e-3, "gradients differ by {worst:.2e}");
}
