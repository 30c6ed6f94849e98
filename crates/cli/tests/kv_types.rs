//! KV cache types (`--kv-type`) against f16 KV on the default model: perplexity and KL
//! divergence on a fixed text of the repo (`data/tinyshakespeare.txt`), what the Hadamard
//! rotation and the key calibration buy q4_0, the error for a head size a type cannot take, and a server pool sized in
//! bytes.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use serde_json::Value;

/// `ferrolm eval kld` of the default model with a `kv` cache against itself with f16 KV, over
/// the first 4096 tokens of the repo's text (8 windows of 512).
fn kld_vs_f16(kv: &str, env: &[(&str, &str)]) -> Value {
    let model = default_model();
    let out = ferrolm()
        .envs(env.iter().copied())
        .args(["eval", "kld", "--json", "--tokens", "4096", "--ctx", "512"])
        .args(["--kv-type", kv, "--model"])
        .arg(&model)
        .arg("--base")
        .arg(&model)
        .arg("--file")
        .arg(repo_root().join("data/tinyshakespeare.txt"))
        .output()
        .unwrap();
    json_of(&out)
}

fn ppl_change(r: &Value) -> f64 {
    r["ppl"].as_f64().unwrap() / r["ppl_base"].as_f64().unwrap() - 1.0
}

/// Bounds from the measurements in BENCHMARKS.md ("KV cache types"), with headroom for the
/// rounding differences of other CPUs' kernels and for the small sample (4,088 scored tokens;
/// the targets are measured over 8,176 in BENCHMARKS.md): q8_0 within 0.5% of f16 and
/// a KL divergence under 0.008, q4_0 within 3% and under 0.04 (measured on the first 2,044:
/// +1.36%, 0.023; over 8,176 it meets the 2% target).
#[test]
fn kv_types_stay_within_their_perplexity_bounds_of_f16() {
    let f16 = kld_vs_f16("f16", &[]);
    assert_eq!(f16["kld_mean"].as_f64(), Some(0.0), "{f16}");
    assert_eq!(ppl_change(&f16), 0.0);

    let q8 = kld_vs_f16("q8_0", &[]);
    let (d8, k8) = (ppl_change(&q8), q8["kld_mean"].as_f64().unwrap());
    assert!(
        d8.abs() <= 0.005,
        "q8_0 perplexity {:+.3}%: {q8}",
        100.0 * d8
    );
    assert!(k8 > 0.0 && k8 < 0.008, "q8_0 KL divergence {k8}: {q8}");

    let q4 = kld_vs_f16("q4_0", &[]);
    let (d4, k4) = (ppl_change(&q4), q4["kld_mean"].as_f64().unwrap());
    assert!(
        d4.abs() <= 0.03,
        "q4_0 perplexity {:+.3}%: {q4}",
        100.0 * d4
    );
    assert!(k4 > k8 && k4 < 0.04, "q4_0 KL divergence {k4}: {q4}");

    // Without the key calibration (the model's mean key subtracted, channels scaled by what
    // their error costs; measured on real keys here) 4-bit keys cost more: the reason q4_0
    // calibrates (on the first 2,044 tokens the KL divergence is 1.8 times as large).
    let raw = kld_vs_f16(
        "q4_0",
        &[("FERROLM_KV_KEY_SHIFT", "0"), ("FERROLM_KV_KEY_SCALE", "0")],
    );
    let kr = raw["kld_mean"].as_f64().unwrap();
    assert!(
        kr > 1.3 * k4,
        "uncalibrated q4_0 KL {kr} vs calibrated {k4}"
    );
    assert!(ppl_change(&raw) > d4, "{raw} vs {q4}");

    // Without the rotation 4-bit keys cost far more: the reason q4_0 rotates (compared
    // without the calibration on either side, as BENCHMARKS.md measured it: 0.142 vs 0.040).
    let plain = kld_vs_f16(
        "q4_0",
        &[
            ("FERROLM_KV_HADAMARD", "0"),
            ("FERROLM_KV_KEY_SHIFT", "0"),
            ("FERROLM_KV_KEY_SCALE", "0"),
        ],
    );
    let kp = plain["kld_mean"].as_f64().unwrap();
    assert!(kp > 1.5 * kr, "unrotated q4_0 KL {kp} vs rotated {kr}");
    assert!(ppl_change(&plain) > ppl_change(&raw), "{plain} vs {raw}");

    // `eval perplexity --kv-type` scores the same positions the same way.
    let out = ferrolm()
        .args([
            "eval",
            "perplexity",
            "--json",
            "--tokens",
            "4096",
            "--ctx",
            "512",
        ])
        .args(["--kv-type", "q4_0", "--model"])
        .arg(default_model())
        .arg("--file")
        .arg(repo_root().join("data/tinyshakespeare.txt"))
        .output()
        .unwrap();
    let p = json_of(&out);
    assert_eq!(p["kv_type"], "q4_0");
    let (a, b) = (p["ppl"].as_f64().unwrap(), q4["ppl"].as_f64().unwrap());
    assert!((a / b - 1.0).abs() < 1e-6, "{a} vs {b}");
}

/// A head size a type cannot take is refused at startup with the head size and the types that
/// work, by every command that takes `--kv-type` (the tiny Llama 3 has heads of 16).
#[test]
fn kv_type_the_head_size_cannot_take_is_a_clear_error() {
    let tiny = repo_root().join("golden/tiny_llama3.gguf");
    let data = tempfile::tempdir().unwrap();
    for kv in ["q8_0", "q4_0"] {
        let runs: [Vec<&str>; 3] = [
            vec!["generate", "--raw", "--prompt", "a", "--max-tokens", "1"],
            vec!["bench", "--reps", "1", "--decode-tokens", "1"],
            vec!["serve", "--port", "0", "--threads", "1"],
        ];
        for args in runs {
            let mut c = ferrolm();
            c.args(&args).args(["--kv-type", kv, "--model"]).arg(&tiny);
            if args[0] == "serve" {
                c.arg("--data-dir").arg(data.path());
            }
            let out = c.output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} {kv} ran");
            assert!(
                err.contains(&format!("--kv-type {kv}"))
                    && err.contains("head size is 16")
                    && err.contains("types that work for this model: f16")
                    && !err.contains("panicked"),
                "{args:?} {kv}: {err}"
            );
        }
    }
    let out = ferrolm()
        .args(["generate", "--raw", "--prompt", "a", "--kv-type", "q5_0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("f16, q8_0, q4_0"),
        "{err}"
    );
}

/// `ferrolm_<name>{model=...}` from a /metrics text.
fn metric(text: &str, name: &str) -> f64 {
    let prefix = format!("{name}{{model=\"smollm2-135m-instruct\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
        .parse()
        .unwrap()
}

/// With the pool sized in bytes, q8_0 holds ~1.9× the tokens of f16 (the target) and
/// /metrics reports the pool's bytes.
#[test]
fn kv_memory_holds_more_tokens_with_q8_0() {
    let mut blocks = Vec::new();
    for kv in ["f16", "q8_0", "q4_0"] {
        let s = Server::start(&["--kv-memory", "64MiB", "--kv-type", kv]);
        let get = || {
            ureq::get(&s.url("/metrics"))
                .call()
                .unwrap()
                .into_string()
                .unwrap()
        };
        let text = get();
        let free = metric(&text, "ferrolm_kv_blocks_free");
        let cap = metric(&text, "ferrolm_kv_bytes_capacity");
        assert!(cap <= 64.0 * 1024.0 * 1024.0, "{kv}: {cap}");
        assert!(cap > 63.0 * 1024.0 * 1024.0, "{kv}: {cap}");
        assert_eq!(metric(&text, "ferrolm_kv_bytes_used"), 0.0);
        // A request in flight holds blocks: their bytes are in use.
        let body = serde_json::json!({
            "model": "smollm2-135m-instruct", "max_tokens": 400, "stream": true,
            "messages": [{"role": "user", "content": "Count from 1 to 500."}]
        });
        let r = ureq::post(&s.url("/v1/chat/completions"))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .unwrap();
        let mut reader = std::io::BufReader::new(r.into_reader());
        let mut line = String::new();
        use std::io::BufRead;
        reader.read_line(&mut line).unwrap();
        // The engine publishes its figures after each step: wait for one with the request in.
        let t0 = std::time::Instant::now();
        let used = loop {
            let used = metric(&get(), "ferrolm_kv_bytes_used");
            if used > 0.0 || t0.elapsed() > std::time::Duration::from_secs(10) {
                break used;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(used > 0.0 && used < cap, "{kv}: {used} of {cap}");
        blocks.push(free);
    }
    let (f16, q8, q4) = (blocks[0], blocks[1], blocks[2]);
    assert!(q8 / f16 >= 1.85, "q8_0 {q8} blocks vs f16 {f16}");
    assert!(q4 / f16 >= 3.4, "q4_0 {q4} blocks vs f16 {f16}");
}
