//! A trained checkpoint served by the inference engine: the GGUF that `export` builds (and
//! that `--model RUN_DIR` loads) gives the training forward's logits through
//! `ferrolm_models::Llama`, at f32 exactly up to summation order, at f16 and q8_0 within their
//! rounding; the run's tokenizer travels with it.
#![allow(clippy::unwrap_used)]

use ferrolm_models::{Batch, KvCache, Llama, Scratch, SeqSpan};
use ferrolm_train::checkpoint::{self, Checkpoint, TrainState};
use ferrolm_train::config::{ConfigFile, RunConfig};
use ferrolm_train::data::Batcher;
use ferrolm_train::export::{self, ExportType};
use ferrolm_train::model::{self, Activations, Layout, SplitMix};
use ferrolm_train::optim::AdamW;
use ferrolm_train::tokenize::{self, TokenizerChoice};

const CORPUS: &str =
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n";

/// A run directory with random weights (larger than the init, so logits are far apart).
fn fake_run(dir: &std::path::Path, tied: bool) -> (RunConfig, Vec<f32>) {
    let meta = tokenize::build(&TokenizerChoice::Char, CORPUS).unwrap();
    tokenize::write(&dir.join("tokenizer.gguf"), &meta).unwrap();
    let vocab = tokenize::load(&dir.join("tokenizer.gguf"))
        .unwrap()
        .vocab_size();
    let mut f = ConfigFile::default();
    f.model.layers = Some(2);
    f.model.width = Some(64);
    f.model.heads = Some(4);
    f.model.kv_heads = Some(2);
    f.model.context = Some(16);
    f.model.tied_embeddings = Some(tied);
    let cfg = f.resolve(vocab).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    let layout = Layout::new(&cfg.model);
    let mut rng = SplitMix(11);
    let mut params = model::init_params(&cfg.model, &layout, 5);
    for t in layout.tensors.iter().filter(|t| t.shape.len() == 2) {
        params[t.range()]
            .iter_mut()
            .for_each(|p| *p = 0.15 * rng.normal());
    }
    let ck = Checkpoint {
        params: params.clone(),
        opt: AdamW::new(layout.len),
        state: TrainState {
            step: 7,
            evaluated: true,
            best_val_loss: None,
            batcher: Batcher::new(1),
            tokens_seen: 0,
            train_seconds: 0.0,
        },
    };
    checkpoint::save(dir, &layout.tensors, ck.as_ref(), 2).unwrap();
    (cfg, params)
}

fn compare(tied: bool, ty: ExportType, tol: f32) {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, params) = fake_run(dir.path(), tied);
    let c = &cfg.model;
    let ids: Vec<u32> = tokenize::load(&dir.path().join("tokenizer.gguf"))
        .unwrap()
        .encode("Speak, speak.\nAll:", false)
        .unwrap();
    let t = ids.len();
    let mut acts = Activations::new(c, 1, t);
    acts.set_inputs(&ids);
    let layout = Layout::new(c);
    model::forward_logits(c, &layout, &params, &mut acts);

    let bytes = export::gguf_bytes(dir.path(), ty).unwrap();
    let g = ferrolm_gguf::GgufFile::from_bytes("run.gguf", bytes).unwrap();
    let llama = Llama::load(&g, &mut |_, _| {}).unwrap();
    let tok = ferrolm_tokenizer::Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(tok.encode("Speak, speak.\nAll:", false).unwrap(), ids);
    let mut kv = KvCache::new(&llama.cfg, 16, 2);
    let table = [0u32, 1];
    let spans = [SeqSpan {
        start: 0,
        len: t,
        block_table: &table,
    }];
    let positions: Vec<u32> = (0..t as u32).collect();
    let logits_for: Vec<usize> = (0..t).collect();
    let mut s = Scratch::new();
    let batch = Batch {
        tokens: &ids,
        positions: &positions,
        seqs: &spans,
        logits_for: &logits_for,
        adapters: &[],
    };
    llama.forward(&batch, &mut kv, &mut s).unwrap();
    let mut worst = 0f32;
    for i in 0..t {
        let a = &acts.logits[i * c.vocab_size..][..c.vocab_size];
        let b = s.logits_row(i, c.vocab_size);
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs() / scale);
        }
    }
    assert!(
        worst < tol,
        "{ty:?} tied={tied}: logits differ by {worst} of the largest"
    );
}

/// f32 weights on both sides; inference keeps K and V in f16 (its KV cache), which measured
/// up to 1.2e-3 of the largest logit on these random models (1e-5 with an f32 cache).
const F16_CACHE: f32 = 3e-3;

#[test]
fn f32_export_gives_the_training_logits_tied() {
    compare(true, ExportType::F32, F16_CACHE);
}

#[test]
fn f32_export_gives_the_training_logits_untied() {
    compare(false, ExportType::F32, F16_CACHE);
}

#[test]
fn f16_and_q8_0_exports_stay_close() {
    compare(true, ExportType::F16, 5e-3);
    // q8_0 runs with 8-bit activations too (the inference kernels' approximation, held to
    // the exact reference in ferrolm-models' tests); random weights measured 6.2%.
    compare(true, ExportType::Q8_0, 0.1);
}

#[test]
fn a_run_without_a_checkpoint_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = export::gguf_bytes(dir.path(), ExportType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no checkpoint"), "{e}");
}

/// A LoRA adapter folded into its base (`peft::merge`, what `merge` and `--model LORA_RUN`
/// serve) gives the logits of the training forward with the adapter applied on the side; and
/// the adapter survives a PEFT-format save/load (q/k rows reordered and back).
#[test]
fn merged_lora_gives_the_adapted_training_logits() {
    use ferrolm_train::lora::{Lora, LoraConfig, Target};
    use ferrolm_train::model::LoraRun;
    let dir = tempfile::tempdir().unwrap();
    let (cfg, params) = fake_run(dir.path(), true);
    let c = &cfg.model;
    let layout = Layout::new(c);
    let lora = Lora::new(
        c,
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: Target::ALL.to_vec(),
        },
    );
    let mut rng = SplitMix(21);
    let lp: Vec<f32> = (0..lora.len).map(|_| 0.2 * rng.normal()).collect();
    ferrolm_train::peft::save(&dir.path().join("adapter"), c, &lora, &lp, "base").unwrap();
    let (lora2, lp2) = ferrolm_train::peft::load(&dir.path().join("adapter"), c).unwrap();
    assert_eq!(lp2, lp, "PEFT save/load must round-trip");

    let ids: Vec<u32> = (0..12).map(|i| (i * 7 % c.vocab_size) as u32).collect();
    let mut acts = Activations::new(c, 1, ids.len());
    let targets = vec![ferrolm_train::model::IGNORE; ids.len()];
    acts.set_scored(&ids, &targets);
    let mut la = lora2.acts(ids.len());
    let run = LoraRun {
        lora: &lora2,
        params: &lp2,
        acts: &mut la,
    };
    model::forward_scored(
        c,
        &layout,
        model::Weights::F32(&params),
        Some(run),
        &mut acts,
        None,
    );
    let side = acts.logits.clone();

    let mut merged = params.clone();
    ferrolm_train::peft::merge(c, &mut merged, &lora2, &lp2);
    let mut acts2 = Activations::new(c, 1, ids.len());
    acts2.set_inputs(&ids);
    model::forward_logits(c, &layout, &merged, &mut acts2);
    let scale = side.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = side
        .iter()
        .zip(&acts2.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-4 * scale,
        "merged {worst} vs adapter on the side (scale {scale})"
    );
    assert!(
        side != model_logits(c, &layout, &params, &ids),
        "the adapter must change the logits"
    );
}

fn model_logits(
    c: &ferrolm_train::model::ModelConfig,
    layout: &Layout,
    p: &[f32],
    ids: &[u32],
) -> Vec<f32> {
    let mut a = Activations::new(c, 1, ids.len());
    a.set_inputs(ids);
    model::forward_logits(c, layout, p, &mut a);
    a.logits
}

/// QLoRA's base (tensors kept quantized, dequantized as products need them) computes exactly
/// what the same base dequantized up front does: same loss, same adapter gradients.
#[test]
fn stored_quantized_base_matches_the_dequantized_one() {
    use ferrolm_train::lora::{Lora, LoraConfig, Target};
    use ferrolm_train::model::{LoraGrad, LoraRun, Weights};
    let dir = tempfile::tempdir().unwrap();
    fake_run(dir.path(), true);
    let gguf = dir.path().join("q8.gguf");
    std::fs::write(
        &gguf,
        export::gguf_bytes(dir.path(), ExportType::Q8_0).unwrap(),
    )
    .unwrap();
    let full = ferrolm_train::base::load(&gguf).unwrap();
    let (c, stored, _) = ferrolm_train::base::load_stored(&gguf).unwrap();
    assert_eq!(c, full.config);
    let layout = Layout::new(&c);
    let lora = Lora::new(
        &c,
        LoraConfig {
            rank: 2,
            alpha: 4.0,
            targets: Target::ALL.to_vec(),
        },
    );
    let mut rng = SplitMix(5);
    let lp: Vec<f32> = (0..lora.len).map(|_| 0.1 * rng.normal()).collect();
    let ids: Vec<u32> = (0..2 * 16).map(|i| (i * 5 % c.vocab_size) as u32).collect();
    let targets: Vec<u32> = ids.iter().map(|&t| (t + 1) % c.vocab_size as u32).collect();
    let run = |w: Weights| {
        let mut acts = Activations::new(&c, 2, 16);
        acts.set_scored(&ids, &targets);
        let mut la = lora.acts(32);
        let r = LoraRun {
            lora: &lora,
            params: &lp,
            acts: &mut la,
        };
        let loss = model::forward_scored(&c, &layout, w, Some(r), &mut acts, Some(1.0));
        let mut g = vec![0f32; lora.len];
        let lg = LoraGrad {
            lora: &lora,
            params: &lp,
            grads: &mut g,
            acts: &mut la,
        };
        model::backward_with(&c, &layout, w, None, Some(lg), &mut acts);
        (loss, g)
    };
    let (l1, g1) = run(Weights::F32(&full.params));
    let (l2, g2) = run(Weights::Stored(&stored));
    assert_eq!(l1, l2);
    assert_eq!(g1, g2);
    assert!(
        stored.storage_bytes() * 3 < full.params.len() * 4,
        "q8_0 storage must be smaller than f32"
    );
}

/// Multi-LoRA at inference: one flat batch where one sequence runs with an adapter and another
/// without gives, for each, the training forward's logits (adapter on the side / base alone).
#[test]
fn inference_adapters_apply_per_sequence() {
    use ferrolm_train::lora::{Lora, LoraConfig, Target};
    use ferrolm_train::model::{LoraRun, Weights, IGNORE};
    let dir = tempfile::tempdir().unwrap();
    let (cfg, params) = fake_run(dir.path(), false);
    let c = &cfg.model;
    let layout = Layout::new(c);
    let lora = Lora::new(
        c,
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: Target::ALL.to_vec(),
        },
    );
    let mut rng = SplitMix(33);
    let lp: Vec<f32> = (0..lora.len).map(|_| 0.2 * rng.normal()).collect();
    let ad = ferrolm_train::peft::to_inference(c, &lora, &lp, "test").unwrap();

    let ids: Vec<u32> = (0..10).map(|i| (i * 3 % c.vocab_size) as u32).collect();
    let t = ids.len();
    // training side: with the adapter, and without
    let mut acts = Activations::new(c, 1, t);
    acts.set_scored(&ids, &vec![IGNORE; t]);
    let mut la = lora.acts(t);
    let run = LoraRun {
        lora: &lora,
        params: &lp,
        acts: &mut la,
    };
    model::forward_scored(
        c,
        &layout,
        Weights::F32(&params),
        Some(run),
        &mut acts,
        None,
    );
    let want_adapted = acts.logits.clone();
    let want_base = model_logits(c, &layout, &params, &ids);

    // inference side: the two sequences in one batch
    let g = ferrolm_gguf::GgufFile::from_bytes(
        "run.gguf",
        export::gguf_bytes(dir.path(), ExportType::F32).unwrap(),
    )
    .unwrap();
    let llama = Llama::load(&g, &mut |_, _| {}).unwrap();
    let mut kv = KvCache::new(&llama.cfg, 16, 4);
    let (t0, t1) = ([0u32], [1u32]);
    let spans = [
        SeqSpan {
            start: 0,
            len: t,
            block_table: &t0,
        },
        SeqSpan {
            start: t,
            len: t,
            block_table: &t1,
        },
    ];
    let tokens: Vec<u32> = ids.iter().chain(&ids).copied().collect();
    let positions: Vec<u32> = (0..t as u32).chain(0..t as u32).collect();
    let logits_for: Vec<usize> = (0..2 * t).collect();
    let adapters = [Some(&ad), None];
    let batch = Batch {
        tokens: &tokens,
        positions: &positions,
        seqs: &spans,
        logits_for: &logits_for,
        adapters: &adapters,
    };
    let mut s = Scratch::new();
    llama.forward(&batch, &mut kv, &mut s).unwrap();
    let v = c.vocab_size;
    for (seq, want) in [(0, &want_adapted), (1, &want_base)] {
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        for i in 0..t {
            let got = s.logits_row(seq * t + i, v);
            for (a, b) in got.iter().zip(&want[i * v..][..v]) {
                assert!(
                    (a - b).abs() < F16_CACHE * scale,
                    "sequence {seq} position {i}: {a} vs {b}"
                );
            }
        }
    }
    // The adapter moves the logits far more than the tolerance above.
    let scale = want_base.iter().fold(0f32, |m, x| m.max(x.abs()));
    let moved = want_adapted
        .iter()
        .zip(&want_base)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        moved > 10.0 * F16_CACHE * scale,
        "the adapter moved logits by {moved}"
    );
}
