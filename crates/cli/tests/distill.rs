//! `ferrolm distill` as a user drives it, and `ferrolm cost distill`:
//! - token-level from a local teacher (the default model, its full softmax) into a new tiny
//!   student trained from scratch with its tokenizer: the KL to the teacher on held-out
//!   prompts falls, and the run is a model `generate` loads;
//! - a teacher server that starts failing mid-run (its key's rate limit) leaves the replies so
//!   far on disk; the same command resumes from there, in prompt order, and trains
//!   (token-level from the server's top-k log-probs);
//! - bad input: a teacher of another vocabulary for token-level, --alpha without labels;
//! - the seed's break-even to the cent, and `--measured`.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::Path;

use serde_json::{json, Value};

const NAMES: [&str; 8] = [
    "Maria Keller",
    "Jonas Novak",
    "Aiko Tanaka",
    "Pedro Silva",
    "Lena Berg",
    "Omar Haddad",
    "Greta Lind",
    "Ravi Patel",
];
const CITIES: [&str; 5] = ["Lyon", "Porto", "Osaka", "Ghent", "Tartu"];

/// `n` prompts of the JSON task, each with its ground-truth reply as the last message.
fn prompts(n: usize, offset: usize) -> String {
    let mut out = String::new();
    for i in offset..offset + n {
        let (name, city, age) = (NAMES[i % 8], CITIES[(i / 3) % 5], 20 + (i * 7) % 60);
        let line = json!({"messages": [
            {"role": "user", "content": format!("Extract the person's name, age and city as JSON.\n{name}, {age}, lives in {city}.")},
            {"role": "assistant", "content": json!({"name": name, "age": age, "city": city}).to_string()},
        ]});
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

const TINY: &str = "[model]\nlayers = 2\nheads = 2\nwidth = 64\ncontext = 256\n";

#[test]
fn token_level_from_a_local_teacher_into_a_new_student() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("train.jsonl"), prompts(16, 0)).unwrap();
    std::fs::write(d.join("val.jsonl"), prompts(4, 40)).unwrap();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    let run = d.join("run");
    let o = ferrolm()
        .args(["distill", "--teacher"])
        .arg(default_model())
        .arg("--student")
        .arg(d.join("tiny.toml"))
        .arg("--prompts")
        .arg(d.join("train.jsonl"))
        .arg("--val-prompts")
        .arg(d.join("val.jsonl"))
        .arg("--out")
        .arg(&run)
        .args(["--mode", "token", "--max-tokens", "24", "--iters", "12"])
        .args([
            "--batch",
            "4",
            "--eval-every",
            "6",
            "--lr",
            "3e-3",
            "-t",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    // the teacher answered every prompt, in order, with its log-probs
    let lines: Vec<Value> = std::fs::read_to_string(run.join("teacher.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 16);
    for (l, p) in lines.iter().zip(prompts(16, 0).lines()) {
        let p: Value = serde_json::from_str(p).unwrap();
        assert_eq!(l["messages"][0], p["messages"][0]);
        assert_eq!(l["messages"][1]["role"], "assistant");
        assert_eq!(l["label"], p["messages"][1]["content"]);
        assert!(!l["logprobs"].as_array().unwrap().is_empty());
    }
    // a new model with the teacher's vocabulary, learning the teacher's distribution
    assert!(err.contains("vocab 49152"), "{err}");
    let e = evals(&run);
    assert_eq!(e.len(), 3, "{e:?}");
    let (first, last) = (
        e[0]["val_loss"].as_f64().unwrap(),
        e[2]["val_loss"].as_f64().unwrap(),
    );
    assert!(
        last < 0.8 * first,
        "held-out KL to the teacher {first} -> {last}"
    );
    assert!(e[2]["teacher_kl"].as_f64().unwrap() > 0.0);
    // the run is a model
    let g = ferrolm()
        .args(["generate", "--model"])
        .arg(&run)
        .args([
            "--prompt",
            "Extract",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
        ])
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
}

#[test]
fn a_failing_teacher_server_leaves_a_resumable_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("train.jsonl"), prompts(12, 0)).unwrap();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    let data = d.join("data");
    std::fs::create_dir_all(&data).unwrap();
    // A key that may send 8 requests a minute: the third group of 4 is refused.
    let limited = create_key(&data, "limited", &["--rpm", "8"]);
    let free = create_key(&data, "free", &[]);
    let server = Server::start_in(&data, &[]);
    let run = d.join("run");
    let distill = |key: &str| {
        ferrolm()
            .args([
                "distill",
                "--teacher",
                &server.url("/v1"),
                "--teacher-key",
                key,
            ])
            .args(["--teacher-model", "smollm2-135m-instruct"])
            .arg("--student")
            .arg(d.join("tiny.toml"))
            .arg("--tokenizer")
            .arg(default_model())
            .arg("--prompts")
            .arg(d.join("train.jsonl"))
            .arg("--out")
            .arg(&run)
            .args([
                "--mode",
                "token",
                "--max-tokens",
                "16",
                "--teacher-concurrency",
                "4",
            ])
            .args(["--iters", "4", "--batch", "4", "-t", "2"])
            .output()
            .unwrap()
    };
    let o = distill(&limited);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("8 of 12 replies are kept") && err.contains("run the same command again"),
        "{err}"
    );
    assert!(err.contains("429"), "{err}");
    let kept = std::fs::read_to_string(run.join("teacher.jsonl")).unwrap();
    assert_eq!(kept.lines().count(), 8);
    // the same command (another key) resumes at prompt 9
    let o = distill(&free);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("8 of 12 prompts answered"), "{err}");
    let all = std::fs::read_to_string(run.join("teacher.jsonl")).unwrap();
    assert!(all.starts_with(&kept));
    for (l, p) in all.lines().zip(prompts(12, 0).lines()) {
        let (l, p): (Value, Value) = (
            serde_json::from_str(l).unwrap(),
            serde_json::from_str(p).unwrap(),
        );
        assert_eq!(l["messages"][0], p["messages"][0]);
    }
    assert_eq!(all.lines().count(), 12);
    assert_eq!(
        metrics(&run)
            .iter()
            .filter(|m| m.get("loss").is_some())
            .count(),
        4
    );
    // another prompt file is another run
    std::fs::write(d.join("train.jsonl"), prompts(12, 3)).unwrap();
    let o = distill(&free);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("another teacher, prompts or sampling"),
        "{err}"
    );
}

#[test]
fn bad_input_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    let unlabelled: String = prompts(4, 0)
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v["messages"].as_array_mut().unwrap().pop();
            v.to_string() + "\n"
        })
        .collect();
    std::fs::write(d.join("p.jsonl"), unlabelled).unwrap();
    let run = |extra: &[&str], teacher: &Path, student: &Path| {
        let o = ferrolm()
            .args(["distill", "--teacher"])
            .arg(teacher)
            .arg("--student")
            .arg(student)
            .arg("--prompts")
            .arg(d.join("p.jsonl"))
            .arg("--out")
            .arg(d.join("run"))
            .args(extra)
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let m = default_model();
    let e = run(&["--alpha", "0.5"], &m, &d.join("tiny.toml"));
    assert!(e.contains("no prompt") && e.contains("ground-truth"), "{e}");
    let e = run(&["--alpha", "1.5"], &m, &d.join("tiny.toml"));
    assert!(e.contains("[0, 1]"), "{e}");
    let e = run(&["--mode", "tokens"], &m, &d.join("tiny.toml"));
    assert!(e.contains("sequence or token"), "{e}");
    // Gemma 3's 262k vocabulary is not SmolLM2's: token-level is refused, sequence-level named.
    let o = ferrolm().args(["pull", "gemma3-270m"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let gemma = test_home().join("models").join("gemma-3-270m-q4_k_m.gguf");
    std::fs::remove_dir_all(d.join("run")).ok();
    let e = run(&["--mode", "token"], &gemma, &m);
    assert!(
        e.contains("vocabulary") && e.contains("--mode sequence"),
        "{e}"
    );
}

#[test]
fn cost_distill_reproduces_the_seed_and_reads_measurements() {
    let o = ferrolm()
        .args([
            "cost",
            "distill",
            "--teacher-usd",
            "0.029",
            "--student-usd",
            "0.002",
        ])
        .args(["--requests", "1000000", "--one-time-usd", "5000"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for want in ["29000.00", "2000.00", "27000.00", "5000.00", "0.19 months"] {
        assert!(out.contains(want), "{want} not in:\n{out}");
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("measured.json"),
        json!({"teacher_usd_per_request": 2e-5, "student_usd_per_request": 5e-6,
               "requests_per_month": 100000, "input_tokens": 60, "output_tokens": 20,
               "one_time_usd": 0.3, "notes": ["from a test"]})
        .to_string(),
    )
    .unwrap();
    let v = json_of(
        &ferrolm()
            .args(["cost", "distill", "--json", "--measured"])
            .arg(dir.path())
            .output()
            .unwrap(),
    );
    assert!((v["savings_usd_per_month"].as_f64().unwrap() - 1.5).abs() < 1e-9);
    assert!((v["breakeven_months"].as_f64().unwrap() - 0.2).abs() < 1e-9);
    // a student that costs more never breaks even
    let v = json_of(
        &ferrolm()
            .args(["cost", "distill", "--json", "--teacher-usd", "0.001"])
            .args(["--student-usd", "0.002", "--requests", "10"])
            .output()
            .unwrap(),
    );
    assert!(v["breakeven_months"].is_null());
}
