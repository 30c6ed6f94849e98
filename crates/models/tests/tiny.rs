//! The fast forward pass held to the slow reference (`ferrolm_models::reference`) on tiny
//! random models built here with the GGUF writer: every weight format the loader takes
//! (F32, F16, Q8_0, Q4_0, Q4_1, a K-quant), both RoPE layouts, q/k/v biases, tied and untied
//! heads, and the paged cache (chunked prefill on a shuffled block table, several sequences in
//! one flat batch). The reference reads the same file, so for quantized weights both sides see
//! the same dequantized values and what remains is the fast path's own approximation: 8-bit
//! activations before Q4/Q8 (and candle's K-quant) matrix products.
//!
//! Tolerances are relative to the largest logit magnitude of each position (logits here are
//! O(1)); each constant says how it was measured.
#![allow(clippy::unwrap_used)]

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use ferrolm_gguf::{writer::GgufWriter, GgmlType, GgufFile, Value};
use ferrolm_models::linear::dequantize;
use ferrolm_models::reference::Reference;
use ferrolm_models::{Batch, KvCache, Llama, ModelError, Scratch, SeqSpan};
use half::f16;
use std::io::Write;

// ---- deterministic randomness -----------------------------------------------------------

/// splitmix64: tiny, deterministic, good enough for test weights.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }

    fn normals(&mut self, n: usize, std: f32, mean: f32) -> Vec<f32> {
        (0..n).map(|_| mean + std * self.normal()).collect()
    }

    fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n)
            .map(|_| (self.next_u64() % vocab as u64) as u32)
            .collect()
    }
}

// ---- ggml block encoders (ggml's `quantize_row_*_ref`) ----------------------------------

const QK: usize = 32;

/// Q4_0: f16 d, 16 bytes; x = (q - 8)·d, element j in the low nibble of byte j, j+16 high.
fn q4_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK * 18);
    for blk in x.chunks_exact(QK) {
        // d from the signed value of largest magnitude, so that value maps exactly to q = 0.
        let max = blk
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend((0..16).map(|j| q(blk[j]) | (q(blk[j + 16]) << 4)));
    }
    out
}

/// Q4_1: f16 d, f16 m, 16 bytes; x = q·d + m, nibbles as Q4_0.
fn q4_1(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK * 20);
    for blk in x.chunks_exact(QK) {
        let min = blk.iter().copied().fold(f32::INFINITY, f32::min);
        let max = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
        out.extend((0..16).map(|j| q(blk[j]) | (q(blk[j + 16]) << 4)));
    }
    out
}

/// Q8_0: f16 d, 32 × i8; x = q·d.
fn q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK * 34);
    for blk in x.chunks_exact(QK) {
        let amax = blk.iter().fold(0f32, |m, &v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(blk.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    out
}

/// `x` (a row-major `[rows, cols]` matrix or a vector) in `ty`'s ggml layout.
fn encode(ty: GgmlType, x: &[f32], rows: usize, cols: usize) -> Vec<u8> {
    match ty {
        GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => x
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::Q4_0 => q4_0(x),
        GgmlType::Q4_1 => q4_1(x),
        GgmlType::Q8_0 => q8_0(x),
        // K-quants: candle's encoder (they only ever reach candle's kernels anyway).
        GgmlType::Q4K | GgmlType::Q6K => {
            let dt = if ty == GgmlType::Q4K {
                GgmlDType::Q4K
            } else {
                GgmlDType::Q6K
            };
            let t = Tensor::from_slice(x, (rows, cols), &Device::Cpu).unwrap();
            QTensor::quantize(&t, dt)
                .unwrap()
                .data()
                .unwrap()
                .into_owned()
        }
        other => panic!("no encoder for {other:?}"),
    }
}

// ---- tiny models ------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Spec {
    arch: &'static str,
    n_layers: usize,
    dim: usize,
    n_heads: usize,
    n_kv_heads: usize,
    /// 96 = three 32-blocks: an odd block count exercises the 4-bit layout's lone last block.
    ffn: usize,
    vocab: usize,
    /// Type of each 2-D weight, by tensor name (norms and biases are always F32, as in ggml).
    types: fn(&str) -> GgmlType,
    /// Write `output.weight` (untied head).
    untied: bool,
    /// `rope.dimension_count` below the head size, and `rope_freqs.weight` factors.
    partial_rope: Option<usize>,
    rope_freqs: bool,
    seed: u64,
}

const LLAMA: Spec = Spec {
    arch: "llama",
    n_layers: 2,
    dim: 64,
    n_heads: 4,
    n_kv_heads: 2,
    ffn: 96,
    vocab: 128,
    types: |_| GgmlType::F32,
    untied: false,
    partial_rope: None,
    rope_freqs: false,
    seed: 1,
};

const QWEN2: Spec = Spec {
    arch: "qwen2",
    untied: true,
    seed: 2,
    ..LLAMA
};

/// A model file on disk (kept alive as long as the model), its fast and slow forms.
struct Tiny {
    spec: Spec,
    model: Llama,
    reference: Reference,
    _file: tempfile::NamedTempFile,
}

fn write_model(spec: &Spec) -> tempfile::NamedTempFile {
    let s = spec;
    let head_dim = s.dim / s.n_heads;
    let (q_dim, kv_dim) = (s.n_heads * head_dim, s.n_kv_heads * head_dim);
    let mut rng = Rng(s.seed);
    let mut w = GgufWriter::new();
    let a = s.arch;
    w.meta("general.architecture", Value::String(a.into()))
        .meta(&format!("{a}.block_count"), Value::U32(s.n_layers as u32))
        .meta(&format!("{a}.embedding_length"), Value::U32(s.dim as u32))
        .meta(
            &format!("{a}.feed_forward_length"),
            Value::U32(s.ffn as u32),
        )
        .meta(
            &format!("{a}.attention.head_count"),
            Value::U32(s.n_heads as u32),
        )
        .meta(
            &format!("{a}.attention.head_count_kv"),
            Value::U32(s.n_kv_heads as u32),
        )
        .meta(&format!("{a}.context_length"), Value::U32(256))
        .meta(
            &format!("{a}.rope.freq_base"),
            Value::F32(if a == "qwen2" { 1e6 } else { 1e4 }),
        )
        .meta(
            &format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        );
    if let Some(r) = s.partial_rope {
        w.meta(&format!("{a}.rope.dimension_count"), Value::U32(r as u32));
    }
    // Weights N(0, 0.1): with width 64 each product keeps activations O(1); norms near 1.
    let mut mat = |w: &mut GgufWriter, name: &str, rows: usize, cols: usize| {
        let ty = (s.types)(name);
        let x = rng.normals(rows * cols, 0.1, 0.0);
        w.tensor(
            name,
            &[cols as u64, rows as u64],
            ty,
            encode(ty, &x, rows, cols),
        );
    };
    mat(&mut w, "token_embd.weight", s.vocab, s.dim);
    for l in 0..s.n_layers {
        let n = |x: &str| format!("blk.{l}.{x}");
        mat(&mut w, &n("attn_q.weight"), q_dim, s.dim);
        mat(&mut w, &n("attn_k.weight"), kv_dim, s.dim);
        mat(&mut w, &n("attn_v.weight"), kv_dim, s.dim);
        mat(&mut w, &n("attn_output.weight"), s.dim, q_dim);
        mat(&mut w, &n("ffn_gate.weight"), s.ffn, s.dim);
        mat(&mut w, &n("ffn_up.weight"), s.ffn, s.dim);
        mat(&mut w, &n("ffn_down.weight"), s.dim, s.ffn);
    }
    if s.untied {
        mat(&mut w, "output.weight", s.vocab, s.dim);
    }
    // 1-D tensors afterwards, from a second stream, so they do not shift the matrices above.
    let mut rng = Rng(s.seed ^ 0xABCD);
    for l in 0..s.n_layers {
        let n = |x: &str| format!("blk.{l}.{x}");
        for norm in ["attn_norm.weight", "ffn_norm.weight"] {
            w.tensor_f32(&n(norm), &[s.dim as u64], &rng.normals(s.dim, 0.1, 1.0));
        }
        if a == "qwen2" {
            // Biases large enough to matter against O(1) projections.
            for (b, len) in [("attn_q.bias", q_dim), ("attn_k.bias", kv_dim)] {
                w.tensor_f32(&n(b), &[len as u64], &rng.normals(len, 0.5, 0.0));
            }
            w.tensor_f32(
                &n("attn_v.bias"),
                &[kv_dim as u64],
                &rng.normals(kv_dim, 0.5, 0.0),
            );
        }
    }
    w.tensor_f32(
        "output_norm.weight",
        &[s.dim as u64],
        &rng.normals(s.dim, 0.1, 1.0),
    );
    if s.rope_freqs {
        let half = s.partial_rope.unwrap_or(head_dim) / 2;
        let f: Vec<f32> = (0..half).map(|i| 1.0 + i as f32).collect();
        w.tensor_f32("rope_freqs.weight", &[half as u64], &f);
    }
    let mut f = tempfile::NamedTempFile::new().unwrap();
    w.write_to(&mut f).unwrap();
    f.flush().unwrap();
    f
}

fn tiny(spec: Spec) -> Tiny {
    let file = write_model(&spec);
    let g = GgufFile::open(file.path()).unwrap();
    Tiny {
        spec,
        model: Llama::load(&g, &mut |_, _| {}).unwrap(),
        reference: Reference::load(&g).unwrap(),
        _file: file,
    }
}

// ---- running the fast path ----------------------------------------------------------------

/// One sequence's share of a step: its tokens at positions `pos0..`, its block table.
struct Part<'a> {
    tokens: &'a [u32],
    pos0: u32,
    table: &'a [u32],
}

/// One forward over all `parts` in one flat batch; logits of every token, per part.
fn step(
    model: &Llama,
    kv: &mut KvCache,
    s: &mut Scratch,
    parts: &[Part],
) -> Result<Vec<Vec<Vec<f32>>>, ModelError> {
    let (mut tokens, mut positions, mut spans) = (vec![], vec![], vec![]);
    for p in parts {
        spans.push(SeqSpan {
            start: tokens.len(),
            len: p.tokens.len(),
            block_table: p.table,
        });
        tokens.extend_from_slice(p.tokens);
        positions.extend((0..p.tokens.len() as u32).map(|i| p.pos0 + i));
    }
    let logits_for: Vec<usize> = (0..tokens.len()).collect();
    let batch = Batch {
        tokens: &tokens,
        positions: &positions,
        seqs: &spans,
        logits_for: &logits_for,
    };
    model.forward(&batch, kv, s)?;
    let vocab = model.cfg.vocab_size;
    Ok(spans
        .iter()
        .map(|sp| {
            (sp.start..sp.start + sp.len)
                .map(|j| s.logits_row(j, vocab).to_vec())
                .collect()
        })
        .collect())
}

const BLOCK: usize = 4;

/// The whole sequence as one prefill on a fresh cache with a contiguous block table.
fn prefill(model: &Llama, tokens: &[u32]) -> Vec<Vec<f32>> {
    let table: Vec<u32> = (0..tokens.len().div_ceil(BLOCK) as u32).collect();
    let mut kv = KvCache::new(&model.cfg, BLOCK, table.len());
    let parts = [Part {
        tokens,
        pos0: 0,
        table: &table,
    }];
    let mut out = step(model, &mut kv, &mut Scratch::new(), &parts).unwrap();
    out.remove(0)
}

// ---- comparing ----------------------------------------------------------------------------

/// Largest `max|a - b| / max|b|` over positions, and on how many positions the argmax agrees.
fn compare(fast: &[Vec<f32>], slow: &[Vec<f32>]) -> (f32, usize) {
    assert_eq!(fast.len(), slow.len());
    let mut worst = 0f32;
    let mut agree = 0;
    for (a, b) in fast.iter().zip(slow) {
        assert_eq!(a.len(), b.len());
        assert!(a.iter().all(|v| v.is_finite()), "non-finite logits");
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        worst = worst.max(diff / scale);
        agree += usize::from(argmax(a) == argmax(b));
    }
    (worst, agree)
}

fn argmax(x: &[f32]) -> usize {
    (0..x.len()).fold(0, |best, i| if x[i] > x[best] { i } else { best })
}

/// f32 / f16 weights: both sides multiply the same f32 values in f32 (candle's GEMM vs f64
/// sums here). Measured: ≤ 3e-6.
const TOL_FLOAT: f32 = 1e-3;
/// Q8_0 / Q4_0 / Q4_1 weights: the fast path rounds every activation row to 8 bits per
/// 32-block (relative error ≤ 1/254 per element) before each of the 7 products per layer and
/// the head. Measured over these models: 0.4%–0.9% of the largest logit; 3% leaves room for
/// other seeds, while a real mistake (a wrong nibble, a swapped RoPE pair, a missing bias)
/// moves logits by tens of percent.
const TOL_Q: f32 = 0.03;
/// Argmax may flip only where the reference's top two logits are nearly tied.
const MIN_AGREE: f32 = 0.9;

/// Fast one-shot prefill against the reference, `n` random tokens.
fn check_against_reference(spec: Spec, n: usize, tol: f32) -> f32 {
    let t = tiny(spec);
    let tokens = Rng(spec.seed + 100).tokens(n, spec.vocab);
    let fast = prefill(&t.model, &tokens);
    let slow = t.reference.forward_full(&tokens).unwrap();
    let (rel, agree) = compare(&fast, &slow);
    let name = format!("{} {:?}", spec.arch, (spec.types)("blk.0.attn_q.weight"));
    eprintln!("{name}: max rel diff {rel:.2e}, argmax agrees on {agree}/{n}");
    assert!(rel <= tol, "{name}: max rel diff {rel:e} > {tol:e}");
    assert!(
        agree as f32 >= MIN_AGREE * n as f32,
        "{name}: argmax agrees on only {agree}/{n} positions"
    );
    rel
}

// ---- the encoders themselves ----------------------------------------------------------------

/// Our block encoders against candle's decoder (an independent reading of ggml's layout):
/// every element round-trips within its format's rounding step, so a misplaced nibble or
/// scale fails here rather than hiding in a model test where both sides read the same bytes.
#[test]
fn encoders_round_trip_through_candle() {
    let (rows, cols) = (3, 96);
    let x = Rng(7).normals(rows * cols, 1.0, 0.3);
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::F16,
    ] {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", Value::String("llama".into()))
            .tensor(
                "m",
                &[cols as u64, rows as u64],
                ty,
                encode(ty, &x, rows, cols),
            );
        let mut f = tempfile::NamedTempFile::new().unwrap();
        w.write_to(&mut f).unwrap();
        f.flush().unwrap();
        let g = GgufFile::open(f.path()).unwrap();
        let y = dequantize(&g, g.tensor("m").unwrap()).unwrap();
        for (blk, (xb, yb)) in x.chunks(QK).zip(y.chunks(QK)).enumerate() {
            let lo = xb.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = xb.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let amax = lo.abs().max(hi.abs());
            // one quantization step (Q4_0's clamp at +7 costs a full step), plus f16 scales
            let step = match ty {
                GgmlType::Q4_0 => amax / 8.0,
                GgmlType::Q4_1 => (hi - lo) / 15.0 * 0.5,
                GgmlType::Q8_0 => amax / 127.0 * 0.5,
                _ => 0.0,
            };
            let bound = step * 1.01 + amax * 2e-3;
            for (a, b) in xb.iter().zip(yb) {
                assert!(
                    (a - b).abs() <= bound,
                    "{ty:?} block {blk}: {a} decoded as {b} (bound {bound})"
                );
            }
        }
    }
}

// ---- fast vs reference ----------------------------------------------------------------------

#[test]
fn llama_f32_matches_reference() {
    check_against_reference(LLAMA, 40, TOL_FLOAT);
    // untied head, and a longer sequence so RoPE angles wrap many times
    let untied = Spec {
        untied: true,
        seed: 3,
        ..LLAMA
    };
    check_against_reference(untied, 100, TOL_FLOAT);
}

#[test]
fn llama_q8_0_matches_reference_on_dequantized_weights() {
    let spec = Spec {
        types: |_| GgmlType::Q8_0,
        untied: true,
        seed: 4,
        ..LLAMA
    };
    check_against_reference(spec, 40, TOL_Q);
}

#[test]
fn llama_q4_0_matches_reference_on_dequantized_weights() {
    // tied head: the quantized embedding is both the lookup table and the output matrix
    let spec = Spec {
        types: |_| GgmlType::Q4_0,
        seed: 5,
        ..LLAMA
    };
    check_against_reference(spec, 40, TOL_Q);
}

#[test]
fn llama_q4_1_matches_reference_on_dequantized_weights() {
    let spec = Spec {
        types: |_| GgmlType::Q4_1,
        seed: 6,
        ..LLAMA
    };
    check_against_reference(spec, 40, TOL_Q);
}

/// Mixed formats as in real Q4 files: q/k and v (and gate and up) differ in width, so the
/// loader cannot stack them and takes its split path; the head is Q8_0.
#[test]
fn llama_mixed_quant_types_match_reference() {
    fn types(name: &str) -> GgmlType {
        if name.contains("attn_v") || name.contains("ffn_up") || name == "output.weight" {
            GgmlType::Q8_0
        } else if name.contains("ffn") {
            GgmlType::Q4_1
        } else {
            GgmlType::Q4_0
        }
    }
    let spec = Spec {
        types,
        untied: true,
        seed: 7,
        ..LLAMA
    };
    check_against_reference(spec, 40, TOL_Q);
}

#[test]
fn qwen2_f32_with_biases_and_neox_rope_matches_reference() {
    check_against_reference(QWEN2, 40, TOL_FLOAT);
}

#[test]
fn qwen2_q4_1_matches_reference_on_dequantized_weights() {
    let spec = Spec {
        types: |_| GgmlType::Q4_1,
        seed: 8,
        ..QWEN2
    };
    check_against_reference(spec, 40, TOL_Q);
}

/// RoPE over the first 8 of 16 head dimensions, with per-frequency factors, in both layouts.
#[test]
fn partial_rope_with_frequency_factors_matches_reference() {
    for base in [LLAMA, QWEN2] {
        let spec = Spec {
            partial_rope: Some(8),
            rope_freqs: true,
            seed: base.seed + 10,
            ..base
        };
        check_against_reference(spec, 40, TOL_FLOAT);
    }
}

#[test]
fn f16_weights_match_reference() {
    let spec = Spec {
        types: |_| GgmlType::F16,
        untied: true,
        seed: 9,
        ..LLAMA
    };
    check_against_reference(spec, 40, TOL_FLOAT);
}

/// K-quants go to candle's kernels (which quantize activations to Q8_K); a K-quant embedding
/// is looked up dequantized. K-quant rows are 256-element super-blocks, hence the width.
#[test]
fn k_quant_weights_match_reference() {
    let spec = Spec {
        dim: 256,
        ffn: 256,
        types: |name| {
            if name == "output.weight" {
                GgmlType::Q6K
            } else {
                GgmlType::Q4K
            }
        },
        untied: true,
        seed: 11,
        ..LLAMA
    };
    check_against_reference(spec, 24, TOL_Q);
}

#[test]
fn reference_rejects_a_token_outside_the_vocabulary() {
    let t = tiny(LLAMA);
    assert!(matches!(
        t.reference.forward_full(&[1, 128]),
        Err(ModelError::Batch(_))
    ));
}

// ---- the paged cache ------------------------------------------------------------------------

/// Run an unrelated sequence over every block first, so stale K/V sits wherever a later
/// sequence has not written yet: reading a slot it should not would change its logits.
fn dirty_cache(t: &Tiny, num_blocks: usize) -> KvCache {
    let mut kv = KvCache::new(&t.model.cfg, BLOCK, num_blocks);
    let table: Vec<u32> = (0..num_blocks as u32).rev().collect();
    let junk = Rng(99).tokens(num_blocks * BLOCK, t.spec.vocab);
    let parts = [Part {
        tokens: &junk,
        pos0: 0,
        table: &table,
    }];
    step(&t.model, &mut kv, &mut Scratch::new(), &parts).unwrap();
    kv
}

/// Identical arithmetic per token whatever the batching, up to GEMM blocking order.
/// Measured: 0 (bit-identical) for Q weights, ≤ 1e-6 for f32.
const TOL_PAGED: f32 = 1e-5;

#[test]
fn chunked_prefill_on_a_shuffled_block_table_matches_one_shot() {
    for types in [(|_| GgmlType::Q4_0) as fn(&str) -> GgmlType, |_| {
        GgmlType::F32
    }] {
        let t = tiny(Spec { types, ..LLAMA });
        let tokens = Rng(12).tokens(22, t.spec.vocab);
        let one_shot = prefill(&t.model, &tokens);

        let mut kv = dirty_cache(&t, 16);
        let mut s = Scratch::new();
        let table = [11u32, 3, 14, 0, 7, 9]; // 6 blocks of 4 hold 22 positions
        let mut chunked = vec![];
        let mut pos = 0;
        for len in [7, 1, 1, 13] {
            let parts = [Part {
                tokens: &tokens[pos..pos + len],
                pos0: pos as u32,
                table: &table,
            }];
            chunked.extend(step(&t.model, &mut kv, &mut s, &parts).unwrap().remove(0));
            pos += len;
        }
        let (rel, agree) = compare(&chunked, &one_shot);
        eprintln!("chunked vs one-shot: max rel diff {rel:.2e}");
        assert!(rel <= TOL_PAGED, "chunked prefill differs by {rel:e}");
        assert_eq!(agree, tokens.len());
        // and both are still the model
        let (rel, _) = compare(&one_shot, &t.reference.forward_full(&tokens).unwrap());
        assert!(rel <= TOL_Q, "{rel}");
    }
}

#[test]
fn two_sequences_in_one_batch_match_each_alone() {
    let t = tiny(Spec {
        types: |_| GgmlType::Q4_1,
        ..QWEN2
    });
    let mut rng = Rng(13);
    let a = rng.tokens(20, t.spec.vocab);
    let b = rng.tokens(15, t.spec.vocab);
    let (alone_a, alone_b) = (prefill(&t.model, &a), prefill(&t.model, &b));

    // Interleaved, out-of-order blocks of one cache.
    let (table_a, table_b) = ([3u32, 12, 7, 0, 9], [10u32, 1, 6, 15]);
    let mut kv = dirty_cache(&t, 16);
    let mut s = Scratch::new();
    // step 1: both prefill part of their prompt
    let parts = [
        Part {
            tokens: &a[..9],
            pos0: 0,
            table: &table_a,
        },
        Part {
            tokens: &b[..14],
            pos0: 0,
            table: &table_b,
        },
    ];
    let mut out = step(&t.model, &mut kv, &mut s, &parts).unwrap();
    let (mut got_a, mut got_b) = (out.remove(0), out.remove(0));
    // step 2: b decodes one token while a prefills the rest, b first in the batch
    let parts = [
        Part {
            tokens: &b[14..],
            pos0: 14,
            table: &table_b,
        },
        Part {
            tokens: &a[9..],
            pos0: 9,
            table: &table_a,
        },
    ];
    let mut out = step(&t.model, &mut kv, &mut s, &parts).unwrap();
    got_b.extend(out.remove(0));
    got_a.extend(out.remove(0));

    for (name, got, want) in [("a", &got_a, &alone_a), ("b", &got_b, &alone_b)] {
        let (rel, _) = compare(got, want);
        eprintln!("sequence {name} batched vs alone: max rel diff {rel:.2e}");
        assert!(rel <= TOL_PAGED, "sequence {name} differs by {rel:e}");
    }
}

/// `logits_for` picks rows in its own order (the engine asks for each sequence's last token).
#[test]
fn logits_for_returns_the_requested_rows_in_order() {
    let t = tiny(LLAMA);
    let tokens = Rng(14).tokens(10, t.spec.vocab);
    let all = prefill(&t.model, &tokens);
    let table = [0u32, 1, 2];
    let mut kv = KvCache::new(&t.model.cfg, BLOCK, 3);
    let mut s = Scratch::new();
    let positions: Vec<u32> = (0..10).collect();
    let seqs = [SeqSpan {
        start: 0,
        len: 10,
        block_table: &table,
    }];
    let logits_for = [9, 2, 5];
    let batch = Batch {
        tokens: &tokens,
        positions: &positions,
        seqs: &seqs,
        logits_for: &logits_for,
    };
    t.model.forward(&batch, &mut kv, &mut s).unwrap();
    for (j, &i) in logits_for.iter().enumerate() {
        let (rel, _) = compare(&[s.logits_row(j, 128).to_vec()], &all[i..=i]);
        assert!(rel <= TOL_PAGED, "row {j} (token {i}) differs by {rel:e}");
    }
}

// ---- bad batches --------------------------------------------------------------------------

#[test]
fn bad_batches_are_errors_not_panics() {
    let t = tiny(LLAMA);
    let mut kv = KvCache::new(&t.model.cfg, BLOCK, 4);
    let mut s = Scratch::new();
    let table = [2u32, 0];
    let run = |tokens: &[u32],
               positions: &[u32],
               seqs: &[SeqSpan],
               logits_for: &[usize],
               kv: &mut KvCache,
               s: &mut Scratch| {
        let batch = Batch {
            tokens,
            positions,
            seqs,
            logits_for,
        };
        t.model.forward(&batch, kv, s)
    };
    let seq = |start, len, block_table| SeqSpan {
        start,
        len,
        block_table,
    };
    let cases: Vec<(&str, Result<(), ModelError>)> = vec![
        (
            "token id = vocab",
            run(
                &[1, 128],
                &[0, 1],
                &[seq(0, 2, &table)],
                &[1],
                &mut kv,
                &mut s,
            ),
        ),
        (
            "position 8 with a 2-block table",
            run(&[1], &[8], &[seq(0, 1, &table)], &[0], &mut kv, &mut s),
        ),
        (
            "block id outside the cache",
            run(&[1], &[0], &[seq(0, 1, &[4])], &[0], &mut kv, &mut s),
        ),
        (
            "positions not consecutive",
            run(
                &[1, 2],
                &[0, 2],
                &[seq(0, 2, &table)],
                &[1],
                &mut kv,
                &mut s,
            ),
        ),
        (
            "fewer positions than tokens",
            run(&[1, 2], &[0], &[seq(0, 2, &table)], &[1], &mut kv, &mut s),
        ),
        (
            "logits for an index past the batch",
            run(&[1], &[0], &[seq(0, 1, &table)], &[1], &mut kv, &mut s),
        ),
        (
            "sequences leave a token uncovered",
            run(
                &[1, 2],
                &[0, 1],
                &[seq(0, 1, &table)],
                &[0],
                &mut kv,
                &mut s,
            ),
        ),
        ("empty batch", run(&[], &[], &[], &[], &mut kv, &mut s)),
    ];
    for (what, r) in cases {
        match r {
            Err(ModelError::Batch(msg)) => eprintln!("{what}: {msg}"),
            other => panic!("{what}: expected a batch error, got {other:?}"),
        }
    }
    // and the model still works afterwards
    run(
        &[1, 2],
        &[0, 1],
        &[seq(0, 2, &table)],
        &[1],
        &mut kv,
        &mut s,
    )
    .unwrap();
}
