//! One training step held to the PyTorch reference (`scripts/train_reference.py`, float64):
//! the loss, every gradient, the clipped global norm, the weights after one AdamW step and
//! the loss there. The fixture is tiny (vocab 11, width 16, 2 layers, GQA 4/2 heads) with
//! weights large enough that attention is far from uniform.
#![allow(clippy::unwrap_used)]

use ferrolm_train::model::{self, Activations, Layout, ModelConfig};
use ferrolm_train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use serde_json::Value;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn fill(layout: &Layout, tensors: &Value, pick: impl Fn(&Value) -> &Value) -> Vec<f32> {
    let mut out = vec![f32::NAN; layout.len];
    for (name, t) in tensors.as_object().unwrap() {
        let slot = layout
            .get(name)
            .unwrap_or_else(|| panic!("no tensor {name} in the layout"));
        let data = floats(pick(t));
        assert_eq!(data.len(), slot.len(), "{name}");
        out[slot.range()].copy_from_slice(&data);
    }
    assert!(
        out.iter().all(|x| !x.is_nan()),
        "the fixture leaves tensors unset"
    );
    out
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn one_step_matches_pytorch() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/one_step.json"
    ))
    .unwrap();
    let f: Value = serde_json::from_str(&text).unwrap();
    let c = &f["config"];
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    let cfg = ModelConfig {
        vocab_size: u("vocab_size"),
        dim: u("dim"),
        n_layers: u("n_layers"),
        n_heads: u("n_heads"),
        n_kv_heads: u("n_kv_heads"),
        ffn_dim: u("ffn_dim"),
        context: u("seq_len"),
        rope_theta: c["rope_theta"].as_f64().unwrap() as f32,
        rms_eps: c["rms_eps"].as_f64().unwrap() as f32,
        tied_embeddings: c["tied_embeddings"].as_bool().unwrap(),
    };
    let layout = Layout::new(&cfg);
    let mut params = fill(&layout, &f["weights"], |t| &t["data"]);
    let tokens: Vec<u32> = f["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
        })
        .collect();
    let (b, t) = (u("batch_size"), cfg.context);
    let mut acts = Activations::new(&cfg, b, t);

    let loss = model::forward(&cfg, &layout, &params, &tokens, &mut acts, Some(1.0));
    let want = f["loss"].as_f64().unwrap() as f32;
    assert!((loss - want).abs() < 1e-5, "loss {loss} vs PyTorch {want}");

    let mut grads = vec![0f32; layout.len];
    model::backward(&cfg, &layout, &params, &mut grads, &mut acts);
    let want_grads = fill(&layout, &f["grads"], |g| g);
    let scale = want_grads.iter().fold(0f32, |m, g| m.max(g.abs()));
    for slot in &layout.tensors {
        let d = max_abs_diff(&grads[slot.range()], &want_grads[slot.range()]);
        assert!(
            d < 1e-5 * scale.max(1.0),
            "{}: gradients differ by {d}",
            slot.name
        );
    }

    let a = &f["adamw"];
    let g = |k: &str| a[k].as_f64().unwrap() as f32;
    let norm = clip_grad_norm(&mut grads, g("grad_clip"));
    let want_norm = f["grad_norm"].as_f64().unwrap() as f32;
    assert!(
        (norm - want_norm).abs() < 1e-4 * want_norm,
        "grad norm {norm} vs {want_norm}"
    );
    let cfg_opt = AdamWConfig {
        beta1: g("beta1"),
        beta2: g("beta2"),
        eps: g("eps"),
        weight_decay: g("weight_decay"),
    };
    let mut opt = AdamW::new(layout.len);
    opt.update(&cfg_opt, &layout.tensors, g("lr"), &mut params, &grads);
    let want_after = fill(&layout, &f["weights_after"], |w| w);
    let d = max_abs_diff(&params, &want_after);
    assert!(d < 1e-5, "weights after one AdamW step differ by {d}");

    let loss_after = model::forward(&cfg, &layout, &params, &tokens, &mut acts, None);
    let want = f["loss_after"].as_f64().unwrap() as f32;
    assert!(
        (loss_after - want).abs() < 1e-4,
        "loss after the step {loss_after} vs PyTorch {want}"
    );
}
