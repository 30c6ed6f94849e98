//! Gemma 3 270M (Q4_K_M, `ferrolm pull gemma3-270m`) against llama.cpp on the same file:
//! token ids, greedy continuations and top-1 agreement, recorded by
//! `scripts/gemma_reference.py` into `golden/gemma3_270m_reference.json`.
//!
//! The model is installed into the test store by `.ci/run` (and by the first test that needs
//! it, with `ferrolm pull gemma3-270m`); a failed install fails the tests.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use ferrolm_engine::Session;
use ferrolm_gguf::GgufFile;
use ferrolm_models::Model;
use ferrolm_tokenizer::Tokenizer;

const FILE: &str = "gemma-3-270m-q4_k_m.gguf";

fn reference() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(golden("gemma3_270m_reference.json")).unwrap()).unwrap()
}

/// The Gemma file in the test store, pulled on first use.
fn gemma_model() -> std::path::PathBuf {
    let p = test_home().join("models").join(FILE);
    if !p.exists() {
        let out = ferrolm().args(["pull", "gemma3-270m"]).output().unwrap();
        assert!(
            out.status.success(),
            "the Gemma tests need {FILE}: `FERROLM_HOME={} ferrolm pull gemma3-270m` failed: {}",
            test_home().display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(p.exists(), "{} is missing after the pull", p.display());
    p
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn reference_was_recorded_on_this_file() {
    let r = reference();
    assert_eq!(
        r["model_sha256"],
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    );
}

#[test]
fn tokenizer_ids_equal_llama_cpp() {
    let g = GgufFile::open(gemma_model()).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let r = reference();
    let cases = r["tokenize"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&c["ids"]),
            "ids of {text:?}"
        );
        assert_eq!(tok.decode(&ids(&c["ids"])), text, "round trip of {text:?}");
    }
}

/// The stable CLI interface: `tokenize --json` without BOS, `generate --raw --json` with it.
#[test]
fn cli_tokenize_and_raw_generate_follow_the_interface() {
    let path = gemma_model();
    let r = reference();
    let case = &r["tokenize"][1];
    let out = json_of(
        &ferrolm()
            .args(["tokenize", "--json", "--model"])
            .arg(&path)
            .arg(case["text"].as_str().unwrap())
            .output()
            .unwrap(),
    );
    assert_eq!(ids(&out["ids"]), ids(&case["ids"]));
    let g = &r["greedy"][0];
    let out = json_of(
        &ferrolm()
            .args([
                "generate",
                "--raw",
                "--json",
                "--temperature",
                "0",
                "--max-tokens",
                "4",
            ])
            .arg("--model")
            .arg(&path)
            .args(["--prompt", g["prompt"].as_str().unwrap()])
            .output()
            .unwrap(),
    );
    assert_eq!(ids(&out["prompt_ids"]), ids(&g["prompt_ids"]));
    assert_eq!(out["prompt_ids"][0], 2, "BOS first (add_bos_token is true)");
    assert_eq!(ids(&out["ids"]), ids(&g["ids"])[..4].to_vec());
}

/// Greedy continuations equal llama.cpp's up to the first step where llama.cpp's top two
/// log-probs are within `greedy_tie_logprob` (0.3) of each other. llama.cpp's ids are fed
/// back (teacher forcing), so one step's disagreement does not hide the next.
///
/// Measured: with candle's K-quant matmuls all 107 steps before the near-ties were equal;
/// with ferrolm's K-quant kernels (da386b1) one step differs where ferrolm's own top two are
/// 0.008 apart (`def is_prime(n):` step 6; llama.cpp's gap 0.48). That gap is rounding noise:
/// the AVX-512 attention kernel for the f16 cache, which sums the same products of q and K in
/// another order (16 lanes instead of 8), leaves the same step differing by 0.030. A step where
/// ferrolm's own top two are within 0.05 is therefore counted, not failed, and at most one is
/// allowed.
#[test]
fn greedy_continuations_equal_llama_cpp_until_a_near_tie() {
    let g = GgufFile::open(gemma_model()).unwrap();
    let model = Model::load(&g, &mut |_, _| {}).unwrap();
    let r = reference();
    let tie = r["greedy_tie_logprob"].as_f64().unwrap();
    let cases = r["greedy"].as_array().unwrap();
    assert!(cases.len() >= 12);
    let (mut compared, mut own_ties) = (0, 0);
    for c in cases {
        let prompt = ids(&c["prompt_ids"]);
        let want = ids(&c["ids"]);
        let top2 = c["top2"].as_array().unwrap();
        let mut s = Session::new(&model, 256, 2).unwrap();
        let mut logits = s.eval(&prompt, &[prompt.len() - 1]).unwrap();
        for (k, &w) in want.iter().enumerate() {
            let gap = top2[k][0][1].as_f64().unwrap() - top2[k][1][1].as_f64().unwrap();
            if gap < tie {
                break;
            }
            let ours = argmax(&logits);
            if ours != w {
                // Logit differences are log-prob differences.
                let own_gap = logits[ours as usize] - logits[w as usize];
                assert!(
                    own_gap < 0.05,
                    "{:?}: step {k}: ferrolm {ours}, llama.cpp {w} (llama.cpp's top-2 gap {gap:.3}, ferrolm's {own_gap:.3})",
                    c["prompt"]
                );
                own_ties += 1;
            }
            compared += 1;
            logits = s.eval(&[w], &[0]).unwrap();
        }
    }
    eprintln!(
        "greedy: {compared} steps compared over {} prompts, {own_ties} differ at ferrolm's own near-ties",
        cases.len()
    );
    assert!(compared >= 60, "only {compared} steps before near-ties");
    assert!(own_ties <= 1, "{own_ties} steps differ");
}

/// ferrolm on the 1,024-token text, one evaluation shared by the tests below: per position its
/// argmax and its log-probs of the ids the references rank first.
struct Ours {
    argmax: Vec<u32>,
    logprob: Vec<std::collections::HashMap<u32, f64>>,
}

fn ours_over_the_text() -> &'static Ours {
    static OURS: std::sync::OnceLock<Ours> = std::sync::OnceLock::new();
    OURS.get_or_init(|| {
        let g = GgufFile::open(gemma_model()).unwrap();
        let model = Model::load(&g, &mut |_, _| {}).unwrap();
        let (r, x) = (reference(), exact());
        let text = ids(&r["top1"]["ids"]);
        assert_eq!(
            text,
            ids(&x["ids"]),
            "the two references hold the same text"
        );
        let n = text.len() - 1;
        assert_eq!(n, 1024);
        let wanted = |k: usize| -> Vec<u32> {
            let a = r["top1"]["top2"][k].as_array().unwrap().iter();
            let b = x["top2"][k].as_array().unwrap().iter();
            a.chain(b).map(|p| p[0].as_u64().unwrap() as u32).collect()
        };
        let mut s = Session::new(&model, 2048, 2).unwrap();
        let vocab = model.cfg().vocab_size;
        let mut ours = Ours {
            argmax: Vec::with_capacity(n),
            logprob: Vec::with_capacity(n),
        };
        // Chunks of 64 positions, each with all its logits (64 × 262k floats at a time).
        let mut start = 0;
        while start < n {
            let chunk = &text[start..(start + 64).min(n)];
            let want: Vec<usize> = (0..chunk.len()).collect();
            let logits = s.eval(chunk, &want).unwrap();
            for (j, row) in logits.chunks_exact(vocab).enumerate() {
                let max = row.iter().fold(f32::MIN, |a, &v| a.max(v)) as f64;
                let lse = max
                    + row
                        .iter()
                        .map(|&v| (v as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                ours.argmax.push(argmax(row));
                let lp = wanted(start + j)
                    .into_iter()
                    .map(|id| (id, row[id as usize] as f64 - lse))
                    .collect();
                ours.logprob.push(lp);
            }
            start += chunk.len();
        }
        ours
    })
}

fn exact() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(golden("gemma3_270m_exact.json")).unwrap()).unwrap()
}

/// ferrolm's argmax at every position of a 1,024-token text against llama.cpp's top-1.
///
/// Issue 13's target is 98%; it is NOT met, and the exact model does not meet it either:
/// transformers running the same file's weights in f32 (`scripts/gemma_exact_reference.py`)
/// agrees with llama.cpp's top-1 at 976/1024 = 95.31% of these positions. llama.cpp's answers
/// carry its own rounding (8-bit activations in blocks of 256 for K-quant matrices, an f16 KV
/// cache, flash attention's f16 accumulation): on this text its log-prob of the exact model's
/// top token is off by 0.031 at the median and 0.172 at the 95th percentile, against 0.020 and
/// 0.103 for ferrolm (see the test below), and how it is run moves some of its log-probs by
/// more than 1: at position 464, evaluated as one batch, it ranks " could" 1.5 above " had"
/// with flash attention (its default) and 1.7 below with `-fa off` (the exact model: 1.5
/// below), and one token at a time, as recorded, 0.1 above. Measured (2026-12-04, AVX2): 970/1024 = 94.73% (47 of the 54 misses are positions
/// where llama.cpp's own top two are within 0.3 log-prob, 7 are clear misses); 94.53% with
/// candle's K-quant matmuls before. This test pins that state: at least 94%, at most 1% clear
/// misses.
#[test]
fn top1_agreement_over_1024_tokens() {
    let r = reference();
    let top2 = r["top1"]["top2"].as_array().unwrap();
    let n = top2.len();
    assert_eq!(n, 1024);
    let ours = ours_over_the_text();
    let (mut agree, mut near_ties, mut clear_misses) = (0, 0, 0);
    for (k, t) in top2.iter().enumerate() {
        if ours.argmax[k] == t[0][0].as_u64().unwrap() as u32 {
            agree += 1;
        } else if t[0][1].as_f64().unwrap() - t[1][1].as_f64().unwrap() < 0.3 {
            near_ties += 1;
        } else {
            clear_misses += 1;
        }
    }
    let rate = agree as f64 / n as f64;
    eprintln!(
        "top-1 agreement {agree}/{n} = {:.2}% ({near_ties} of the misses are near-ties)",
        rate * 100.0
    );
    assert!(rate >= 0.94, "top-1 agreement {:.2}% < 94%", rate * 100.0);
    assert!(
        clear_misses * 100 <= n,
        "{clear_misses} misses where llama.cpp's top two are 0.3 or more apart"
    );
}

/// ferrolm against the exact model (transformers, the same file's weights in f32,
/// `golden/gemma3_270m_exact.json`) on the same 1,024 positions, and closer to it than
/// llama.cpp is. Measured (2026-12-04, AVX2, default batch-invariant mode): top-1 989/1024 =
/// 96.58% (26 of the 35 misses are positions where the exact top two are within 0.1); the
/// log-prob of the exact top token is off by 0.020 at the median and 0.103 at the 95th
/// percentile, llama.cpp's (at the 1,017 positions where it is in llama.cpp's recorded top two)
/// by 0.031 and 0.172.
/// What is left is ferrolm's own rounding: 8-bit activations per 32 values and the f16 KV
/// cache.
#[test]
fn closer_to_the_exact_model_than_llama_cpp() {
    let x = exact();
    assert_eq!(
        x["model_sha256"],
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    );
    let r = reference();
    let ours = ours_over_the_text();
    let top2 = x["top2"].as_array().unwrap();
    let n = top2.len();
    assert_eq!(n, 1024);
    let (mut agree, mut ours_err, mut llama_err) = (0, Vec::new(), Vec::new());
    for (k, t) in top2.iter().enumerate() {
        let (id, lp) = (t[0][0].as_u64().unwrap() as u32, t[0][1].as_f64().unwrap());
        agree += usize::from(ours.argmax[k] == id);
        ours_err.push((ours.logprob[k][&id] - lp).abs());
        for l in r["top1"]["top2"][k].as_array().unwrap() {
            if l[0].as_u64().unwrap() as u32 == id {
                llama_err.push((l[1].as_f64().unwrap() - lp).abs());
            }
        }
    }
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p) as usize]
    };
    let (om, o95) = (pct(&mut ours_err, 0.5), pct(&mut ours_err, 0.95));
    let (lm, l95) = (pct(&mut llama_err, 0.5), pct(&mut llama_err, 0.95));
    eprintln!(
        "against the exact model: top-1 {agree}/{n}; |Δ log-prob| of its top token: ferrolm median {om:.3} p95 {o95:.3}, llama.cpp median {lm:.3} p95 {l95:.3} ({} positions)",
        llama_err.len()
    );
    assert!(
        agree * 100 >= 96 * n,
        "top-1 agreement with the exact model {agree}/{n} < 96%"
    );
    assert!(
        om <= lm && o95 <= l95,
        "ferrolm (median {om:.3}, p95 {o95:.3}) is further from the exact model than llama.cpp (median {lm:.3}, p95 {l95:.3})"
    );
}
