//! Llama 3, Mistral, Qwen3 and Phi-3 against Hugging Face `transformers`: tiny random models of
//! each family that `scripts/tiny_reference.py` built, wrote as GGUF (`golden/tiny_*.gguf`) and
//! ran (`golden/tiny_reference.json`, `golden/tiny_*_logits.f32`). Each test covers all four
//! families and names the one that fails.
//!
//! What each family's file exercises: `llama3` Llama 3.1 RoPE scaling (`rope_freqs.weight`) and
//! the `llama-bpe` pre-tokenizer; `mistral` a sliding window of 8 over a 40-token sequence (three
//! layers, so the window compounds); `qwen3` per-head q/k RMSNorm, head size ≠ width / heads,
//! tied embeddings and the `qwen2` pre-tokenizer; `phi3` fused qkv and gate‖up matrices and a
//! sliding window of 12; `phi3_longrope` (Phi-3.5 / Phi-4 mini style) LongRoPE's short factors
//! and attention factor, RoPE on 3/4 of each head, tied embeddings, and its long factors on a
//! 300-token sequence past the original context of 256. The reference records how far the logits move without each feature
//! (`sensitivity`, 4–13): far above the tolerance here, so a family that ignored its feature
//! fails.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use ferrolm_gguf::GgufFile;
use ferrolm_models::{Batch, KvCache, Model, Scratch, SeqSpan};
use ferrolm_tokenizer::Tokenizer;

const FAMILIES: [&str; 5] = ["llama3", "mistral", "qwen3", "phi3", "phi3_longrope"];

fn reference() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(golden("tiny_reference.json")).unwrap()).unwrap()
}

fn family(r: &serde_json::Value, name: &str) -> serde_json::Value {
    let f = r["families"][name].clone();
    assert!(
        f.is_object(),
        "golden/tiny_reference.json has no family `{name}`"
    );
    f
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn open(f: &serde_json::Value) -> GgufFile {
    // This file holds the fast paths (f32 GEMM prompts and attention) to transformers and to
    // the one-token kernels; every test here opens its model through this function.
    ferrolm_models::quant::set_batch_invariant(false);
    let path = golden(f["gguf"].as_str().unwrap());
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(
        sha256_hex(&bytes),
        f["gguf_sha256"].as_str().unwrap(),
        "{} is not the file the reference was recorded on",
        path.display()
    );
    GgufFile::open(&path).unwrap()
}

/// The recorded logits, `seq × vocab`.
fn recorded_logits(f: &serde_json::Value) -> Vec<f32> {
    let raw = std::fs::read(golden(f["logits_file"].as_str().unwrap())).unwrap();
    assert_eq!(sha256_hex(&raw), f["logits_sha256"].as_str().unwrap());
    raw.chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Logits at every position of `tokens`, fed in chunks of the given sizes (one batch each) over
/// a cache of 4-slot blocks, so that windows and chunks cross block boundaries.
fn run(model: &Model, tokens: &[u32], chunks: &[usize]) -> Vec<f32> {
    let vocab = model.cfg().vocab_size;
    let bs = 4;
    let mut kv = KvCache::new(model.cfg(), bs, tokens.len().div_ceil(bs));
    let table: Vec<u32> = (0..kv.num_blocks as u32).collect();
    let mut s = Scratch::new();
    let mut out = Vec::with_capacity(tokens.len() * vocab);
    let mut start = 0;
    for &len in chunks {
        let positions: Vec<u32> = (start as u32..(start + len) as u32).collect();
        let seqs = [SeqSpan {
            start: 0,
            len,
            block_table: &table,
        }];
        let want: Vec<usize> = (0..len).collect();
        let batch = Batch {
            tokens: &tokens[start..start + len],
            positions: &positions,
            seqs: &seqs,
            logits_for: &want,
            adapters: &[],
        };
        model.forward(&batch, &mut kv, &mut s).unwrap();
        out.extend_from_slice(&s.logits[..len * vocab]);
        start += len;
    }
    assert_eq!(start, tokens.len());
    out
}

fn argmax(x: &[f32]) -> usize {
    (0..x.len()).fold(0, |b, i| if x[i] > x[b] { i } else { b })
}

/// Logits at all 40 positions within `TOL` of transformers', for the whole sequence in one batch
/// and for a 5-token prefill followed by one token at a time; the same argmax wherever the
/// reference's top two are more than `2 · TOL` apart.
///
/// Measured (max |Δ| over 40 × 640 logits, logits' std ≈ 3, the same in one batch and token by
/// token, AVX2 and `FERROLM_ISA=scalar`): llama3 0.0036, mistral 0.0041, qwen3 0.0071, phi3
/// 0.0036, phi3_longrope 0.0060. The weights are the same f16 values on both sides (f16 matrices run through the f32
/// GEMM, not the quantized kernels); the difference is the f16 KV cache and summation order.
/// `TOL` = 0.02.
#[test]
fn logits_equal_transformers_at_every_position() {
    const TOL: f32 = 0.02;
    let r = reference();
    let seq_len = r["seq_len"].as_u64().unwrap() as usize;
    for name in FAMILIES {
        let f = family(&r, name);
        let g = open(&f);
        let model = Model::load(&g, &mut |_, _| {}).unwrap();
        let vocab = model.cfg().vocab_size;
        assert_eq!(vocab as u64, f["vocab_size"].as_u64().unwrap(), "{name}");
        let tokens = ids(&f["ids"]);
        assert_eq!(tokens.len(), seq_len, "{name}");
        let want = recorded_logits(&f);
        assert_eq!(want.len(), seq_len * vocab, "{name}");
        let mut decode_chunks = vec![5];
        decode_chunks.resize(seq_len - 4, 1);
        for (how, chunks) in [
            ("one batch", vec![seq_len]),
            ("token by token", decode_chunks),
        ] {
            let got = run(&model, &tokens, &chunks);
            let max = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            eprintln!("{name} ({how}): max |Δ| logits {max:.4}");
            assert!(max <= TOL, "{name} ({how}): max |Δ| {max} > {TOL}");
            for p in 0..seq_len {
                let (gr, wr) = (
                    &got[p * vocab..(p + 1) * vocab],
                    &want[p * vocab..(p + 1) * vocab],
                );
                let top = argmax(wr);
                let second = (0..vocab)
                    .filter(|&i| i != top)
                    .fold(f32::NEG_INFINITY, |m, i| m.max(wr[i]));
                if wr[top] - second > 2.0 * TOL {
                    assert_eq!(argmax(gr), top, "{name} ({how}): argmax at position {p}");
                }
            }
        }
    }
}

/// Long prompts take attention's matrix-product path (32 or more new tokens of one sequence:
/// query rows in blocks of 128 against the columns each block can see): a 256-token sequence
/// in one batch, and as a 40-token prefix then 216 tokens, gives the logits of feeding it token
/// by token (the one-token path), with and without sliding windows. Measured max |Δ|: llama3
/// 3.3e-4, mistral 2.2e-3, qwen3 1.3e-4, phi3 3.8e-4, phi3_longrope 1.0e-3 — the same as with
/// the one-token attention in both runs (2.2e-4 … 2.2e-3): the rest of the forward's summation
/// order, not attention. A masking or windowing error moves logits by O(1).
#[test]
fn prefill_attention_by_matrix_products_equals_token_by_token() {
    let r = reference();
    for name in FAMILIES {
        let f = family(&r, name);
        let g = open(&f);
        let model = Model::load(&g, &mut |_, _| {}).unwrap();
        let n = 256;
        let tokens: Vec<u32> = ids(&f["ids"]).into_iter().cycle().take(n).collect();
        let one = run(&model, &tokens, &vec![1; n]);
        for chunks in [vec![n], vec![40, n - 40]] {
            let got = run(&model, &tokens, &chunks);
            let max = got
                .iter()
                .zip(&one)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            eprintln!("{name} {chunks:?}: max |Δ| against token by token {max:.2e}");
            assert!(max <= 5e-3, "{name} {chunks:?}: max |Δ| {max}");
        }
    }
}

/// The GGUF's tokenizer gives the ids Hugging Face `tokenizers` gave on texts with emoji, CJK,
/// code, whitespace runs, contractions and digit runs (special-token strings as plain text),
/// and decodes them back to the text.
#[test]
fn tokenizer_ids_equal_hf_tokenizers() {
    let r = reference();
    for name in FAMILIES {
        let f = family(&r, name);
        let tok = Tokenizer::from_gguf(&open(&f)).unwrap();
        let cases = f["tokenize"].as_array().unwrap();
        assert!(cases.len() >= 15, "{name}");
        for c in cases {
            let text = c["text"].as_str().unwrap();
            let want = ids(&c["ids"]);
            assert_eq!(
                tok.encode(text, false).unwrap(),
                want,
                "{name}: ids of {text:?}"
            );
            assert_eq!(tok.decode(&want), text, "{name}: round trip of {text:?}");
        }
        assert_eq!(tok.bos_id, Some(f["bos_id"].as_u64().unwrap() as u32));
        assert_eq!(tok.add_bos, f["add_bos"].as_bool().unwrap(), "{name}");
    }
}

/// `ferrolm generate --raw --json --temperature 0` on each tiny file: BOS where the file says so,
/// and transformers' greedy ids up to the first step where its top two are within 0.015 (twice
/// the largest logit difference measured above) or the end-of-generation token (measured: all 8
/// steps equal in llama3, mistral and qwen3; phi3 equal up to its EOS at step 5).
#[test]
fn cli_raw_greedy_generation_equals_transformers() {
    let r = reference();
    for name in FAMILIES {
        let f = family(&r, name);
        let gr = &f["greedy"];
        let steps = gr["steps"].as_array().unwrap();
        let out = ferrolm()
            .args(["generate", "--model"])
            .arg(golden(f["gguf"].as_str().unwrap()))
            .args(["--raw", "--json", "--temperature", "0", "--max-tokens"])
            .arg(steps.len().to_string())
            .args(["--prompt", gr["prompt"].as_str().unwrap()])
            .output()
            .unwrap();
        let v = json_of(&out);
        assert_eq!(ids(&v["prompt_ids"]), ids(&gr["prompt_ids"]), "{name}");
        let got = ids(&v["ids"]);
        let mut compared = 0;
        for (i, st) in steps.iter().enumerate() {
            assert_eq!(
                got.get(i).copied(),
                Some(st["id"].as_u64().unwrap() as u32),
                "{name}: greedy step {i}"
            );
            compared += 1;
            // ferrolm stops at the end-of-generation token; the reference ran on.
            if st["margin"].as_f64().unwrap() < 0.015 || st["id"] == f["eos_id"] {
                break;
            }
        }
        eprintln!("{name}: {compared} greedy steps equal");
    }
}

/// LongRoPE past its original context: loaded for a 1,024-token context, the Phi-3.5-style
/// file takes its long factors at every position, and a 300-token sequence (original context
/// 256) matches transformers, which switches to the long factors for a sequence that long.
/// The last 32 positions are recorded; with the short factors in their place transformers
/// moves them by `long.sensitivity` (8.8), so the comparison shows which factors ran.
/// Measured max |Δ| (2026-12-04, AVX2): 0.0039 (one batch and 200 + 100), tolerance 0.02. Loaded without a context (or
/// for one within 256 tokens) the model stays capped at 256, and a file that has short but no
/// long factors is refused for a longer context.
#[test]
fn longrope_past_the_original_context_runs_on_the_long_factors() {
    const TOL: f32 = 0.02;
    let r = reference();
    let f = family(&r, "phi3_longrope");
    let long = &f["long"];
    let g = open(&f);
    let model = Model::load_for_context(&g, Some(1024), &mut |_, _| {}).unwrap();
    assert_eq!(model.cfg().context_length, 1024);
    let vocab = model.cfg().vocab_size;
    let tokens = ids(&long["ids"]);
    assert_eq!(tokens.len(), 300);
    let tail = long["tail"].as_u64().unwrap() as usize;
    let raw = std::fs::read(golden(long["logits_file"].as_str().unwrap())).unwrap();
    assert_eq!(sha256_hex(&raw), long["logits_sha256"].as_str().unwrap());
    let want: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(want.len(), tail * vocab);
    assert!(long["sensitivity"].as_f64().unwrap() > 1.0);
    for chunks in [vec![300], vec![200, 100]] {
        let got = run(&model, &tokens, &chunks);
        let got = &got[(300 - tail) * vocab..];
        let worst = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("phi3_longrope, 300 tokens in {chunks:?}: max |Δ| {worst:.4}");
        assert!(worst <= TOL, "{chunks:?}: max |Δ| {worst} > {TOL}");
    }
    // Within the original context: the short factors, and the cap.
    let short = Model::load_for_context(&g, Some(256), &mut |_, _| {}).unwrap();
    assert_eq!(short.cfg().context_length, 256);
    // A LongRoPE file without long factors is refused past its original context, with the fix.
    let file = broken_copy("phi3_longrope", |_, tensors| {
        tensors.retain(|t| t.0 != "rope_factors_long.weight");
    });
    let g = GgufFile::open(file.path()).unwrap();
    let Err(err) = Model::load_for_context(&g, Some(1024), &mut |_, _| {}) else {
        panic!("a LongRoPE file without long factors loaded for a longer context");
    };
    let err = err.to_string();
    assert!(
        err.contains("rope_factors_long") && err.contains("at most 256"),
        "{err}"
    );
    assert!(Model::load_for_context(&g, Some(256), &mut |_, _| {}).is_ok());
}

/// The registry names what each file is, and the names the refusals list include the new ones.
#[test]
fn each_family_loads_as_its_architecture() {
    let r = reference();
    for (name, arch) in [
        ("llama3", ferrolm_models::Arch::Llama),
        ("mistral", ferrolm_models::Arch::Llama),
        ("qwen3", ferrolm_models::Arch::Qwen3),
        ("phi3", ferrolm_models::Arch::Phi3),
        ("phi3_longrope", ferrolm_models::Arch::Phi3),
    ] {
        let f = family(&r, name);
        let g = open(&f);
        let m = Model::load(&g, &mut |_, _| {}).unwrap();
        assert_eq!(m.cfg().arch, arch, "{name}");
        let window = f["config"]["sliding_window"].as_u64().map(|w| w as usize);
        assert_eq!(m.cfg().sliding_window, window, "{name}");
        // Every file says 256, except phi3_longrope's 1024: a LongRoPE file loaded without a
        // longer context runs within its original context, 256 here (see `llama.rs`).
        assert_eq!(m.cfg().context_length, 256, "{name}");
        assert_eq!(
            m.n_params() as u64,
            g.tensors
                .iter()
                .filter(|t| !t.name.starts_with("rope_"))
                .map(|t| t.n_elements())
                .sum::<u64>()
        );
    }
}

// ---- bad input: each refusal names what is supported, and nothing panics ----------------

/// A copy of a tiny family file with `edit` applied to its metadata and tensors (name, ggml
/// dims, type, bytes), written with ferrolm's own GGUF writer.
fn broken_copy(
    name: &str,
    edit: impl FnOnce(
        &mut std::collections::BTreeMap<String, ferrolm_gguf::Value>,
        &mut Vec<(String, Vec<u64>, ferrolm_gguf::GgmlType, Vec<u8>)>,
    ),
) -> tempfile::NamedTempFile {
    let r = reference();
    let g = open(&family(&r, name));
    let mut meta = g.metadata.clone();
    let mut tensors: Vec<_> = g
        .tensors
        .iter()
        .map(|t| {
            let bytes = g.tensor_bytes(t).unwrap();
            (t.name.clone(), t.dims.clone(), t.ggml_type, bytes)
        })
        .collect();
    edit(&mut meta, &mut tensors);
    let mut w = ferrolm_gguf::writer::GgufWriter::new();
    for (k, v) in meta {
        w.meta(&k, v);
    }
    for (n, dims, ty, bytes) in tensors {
        w.tensor(&n, &dims, ty, bytes);
    }
    let mut f = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
    w.write_to(&mut f).unwrap();
    f
}

const GENERATE: &[&str] = &["generate", "--raw", "--max-tokens", "1", "--prompt", "hi"];
const TOKENIZE: &[&str] = &["tokenize", "--json", "hi"];

/// Each command (`GENERATE`, `TOKENIZE`) on `file` fails with an error (not a panic) whose
/// message contains every one of `needles`.
fn refused(file: &std::path::Path, commands: &[&[&str]], needles: &[&str]) {
    for args in commands {
        let out = ferrolm()
            .args(&args[..1])
            .arg("--model")
            .arg(file)
            .args(&args[1..])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted a broken file");
        assert_ne!(out.status.code(), Some(101), "{args:?} panicked: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: {n:?} missing from: {err}");
        }
    }
}

#[test]
fn unknown_architecture_is_refused_naming_the_supported_ones() {
    let f = broken_copy("llama3", |m, _| {
        m.insert(
            "general.architecture".into(),
            ferrolm_gguf::Value::String("mamba2".into()),
        );
    });
    // `tokenize` needs only the tokenizer, and works on such a file.
    refused(
        f.path(),
        &[GENERATE],
        &[
            "architecture `mamba2` is not supported",
            "supported: llama, mistral, qwen2, qwen3, phi3, gemma3",
        ],
    );
}

#[test]
fn k_quant_rows_not_a_multiple_of_256_are_refused_naming_what_fits() {
    // ffn_down of the tiny Phi-3 has rows of 128 values; claim they are Q4_K (144 bytes per
    // 256 values: half a block per row).
    let f = broken_copy("phi3", |_, tensors| {
        let t = tensors
            .iter_mut()
            .find(|t| t.0 == "blk.0.ffn_down.weight")
            .unwrap();
        assert_eq!(t.1, vec![128, 64]);
        t.2 = ferrolm_gguf::GgmlType::Q4K;
        t.3 = vec![0; 64 * 72];
    });
    refused(
        f.path(),
        &[GENERATE, TOKENIZE],
        &[
            "blk.0.ffn_down.weight",
            "rows of 128 values cannot be stored as Q4K",
            "K-quants need rows of a multiple of 256",
            "F32, F16 and BF16 any length",
        ],
    );
}

#[test]
fn unsupported_tokenizer_type_is_refused_naming_the_supported_ones() {
    let f = broken_copy("qwen3", |m, _| {
        m.insert(
            "tokenizer.ggml.model".into(),
            ferrolm_gguf::Value::String("rwkv".into()),
        );
    });
    refused(
        f.path(),
        &[GENERATE, TOKENIZE],
        &[
            "tokenizer model `rwkv` is not supported",
            "supported: `gpt2` byte-level BPE and `llama` SentencePiece",
        ],
    );
}

#[test]
fn unknown_pre_tokenizer_is_refused_naming_the_known_ones() {
    let f = broken_copy("llama3", |m, _| {
        m.insert(
            "tokenizer.ggml.pre".into(),
            ferrolm_gguf::Value::String("tekken".into()),
        );
    });
    refused(
        f.path(),
        &[GENERATE, TOKENIZE],
        &["`tekken` is not a known pre-tokenizer", "llama-bpe"],
    );
}
