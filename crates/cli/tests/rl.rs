//! `ferrolm finetune --method rl` on the default model (SmolLM2-135M-Instruct), as a user
//! drives it: samples drawn by the inference engine with the policy's adapter, scored by an
//! OpenAI grader, a GRPO step with a KL penalty, greedy held-out rewards at each evaluation.
//! Bad prompt files and graders are refused with what is wrong (and the line).
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::Path;

use serde_json::{json, Value};

/// Prompts asking for a capital, each with the `answer` field the grader reads.
fn prompts(n: usize, skip: usize) -> String {
    let caps = [
        ("France", "Paris"),
        ("Italy", "Rome"),
        ("Spain", "Madrid"),
        ("Japan", "Tokyo"),
        ("Germany", "Berlin"),
        ("Egypt", "Cairo"),
        ("Peru", "Lima"),
        ("Kenya", "Nairobi"),
    ];
    caps.iter()
        .skip(skip)
        .take(n)
        .map(|(c, a)| {
            json!({
                "messages": [{"role": "user", "content": format!("What is the capital of {c}? Answer with the city.")}],
                "answer": a,
            })
            .to_string()
                + "\n"
        })
        .collect()
}

/// A grader with a graded (not 0/1) score, so a group's samples differ and the step moves.
fn grader() -> String {
    json!({
        "type": "text_similarity", "name": "close", "input": "{{sample.output_text}}",
        "reference": "The capital is {{item.answer}}.", "evaluation_metric": "fuzzy_match",
    })
    .to_string()
}

fn rl(dir: &Path, train: &Path, extra: &[&str]) -> std::process::Output {
    ferrolm()
        .env("FERROLM_HOME", dir.join("home"))
        .args(["finetune", "--method", "rl", "--model"])
        .arg(default_model())
        .arg("--prompts")
        .arg(train)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn rl_with_a_grader_samples_scores_and_steps() {
    let dir = tempfile::tempdir().unwrap();
    let (train, val) = (dir.path().join("p.jsonl"), dir.path().join("v.jsonl"));
    std::fs::write(&train, prompts(4, 0)).unwrap();
    std::fs::write(&val, prompts(2, 6)).unwrap();
    let run = dir.path().join("run");
    let g = grader();
    let o = rl(
        dir.path(),
        &train,
        &[
            "--val",
            val.to_str().unwrap(),
            "--grader",
            &g,
            "--samples",
            "3",
            "--batch",
            "2",
            "--iters",
            "2",
            "--eval-every",
            "2",
            "--max-tokens",
            "12",
            "--max-len",
            "96",
            "--lr",
            "1e-3",
            "--out",
            run.to_str().unwrap(),
            "--json",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("RL: 4 prompts (2 held out), 3 samples each per step, scored by the text_similarity grader"),
        "{err}"
    );
    let m = metrics(&run);
    let steps: Vec<&Value> = m
        .iter()
        .filter(|l| l.get("reward_mean").is_some())
        .collect();
    let evals: Vec<&Value> = m
        .iter()
        .filter(|l| l.get("val_reward_mean").is_some())
        .collect();
    assert_eq!(steps.len(), 2, "{m:?}");
    assert_eq!(
        evals.iter().map(|e| e["step"].as_u64()).collect::<Vec<_>>(),
        [Some(0), Some(2)]
    );
    for s in &steps {
        let r = s["reward_mean"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&r), "{s}");
        // replies of at most --max-tokens, scored with spread: the step has a gradient
        assert!(s["completion_length"].as_f64().unwrap() <= 12.0, "{s}");
        assert!(s["reward_std"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["grad_norm"].as_f64().unwrap() > 0.0, "{s}");
    }
    // the first step samples from the reference itself (KL 0); after one update it has moved
    assert!(
        steps[0]["kl"].as_f64().unwrap().abs() < 1e-6,
        "{}",
        steps[0]
    );
    assert!(steps[1]["kl"].as_f64().unwrap() > 0.0, "{}", steps[1]);
    for e in &evals {
        let r = e["val_reward_mean"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&r), "{e}");
    }
    // a PEFT adapter that serves
    assert!(run.join("adapter/adapter_config.json").is_file());
    let o = ferrolm()
        .args(["generate", "--model"])
        .arg(&run)
        .args([
            "--temperature",
            "0",
            "--max-tokens",
            "4",
            "--prompt",
            "The capital of France is",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn bad_rl_input_is_refused_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("p.jsonl");
    std::fs::write(&good, prompts(2, 0)).unwrap();
    let g = grader();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    let fails = |file: &Path, extra: &[&str]| -> String {
        let mut args = vec!["--out", out];
        args.extend_from_slice(extra);
        let o = rl(dir.path(), file, &args);
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // a line without the field the grader reads, and one that ends with the answer
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        prompts(1, 0)
            + "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n"
            + "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"a\"}], \"answer\": \"x\"}\n",
    )
    .unwrap();
    let e = fails(&bad, &["--grader", &g]);
    assert!(
        e.contains("line 2") && e.contains("no field `answer`"),
        "{e}"
    );
    assert!(
        e.contains("line 3") && e.contains("ends with an assistant"),
        "{e}"
    );
    // a grader that does not parse
    let e = fails(
        &good,
        &["--grader", "{\"type\": \"string_check\", \"input\": \"x\"}"],
    );
    assert!(e.contains("--grader") && e.contains("reference"), "{e}");
    let e = fails(&good, &["--grader", "{\"type\": \"cosmic\"}"]);
    assert!(e.contains("string_check"), "{e}");
    // a scorer, exactly one
    let e = fails(&good, &[]);
    assert!(e.contains("exactly one of --reward-model"), "{e}");
    // full weights
    let e = fails(&good, &["--grader", &g, "--weights", "full"]);
    assert!(e.contains("--weights lora"), "{e}");
    // one sample per prompt has nothing to compare with
    let e = fails(&good, &["--grader", &g, "--samples", "1"]);
    assert!(e.contains("at least 2"), "{e}");
    // a reward model that is a plain language-model adapter
    let e = fails(&good, &["--reward-model", "/no/such/run"]);
    assert!(e.contains("--reward-model /no/such/run"), "{e}");
    assert!(!Path::new(out).join("adapter").exists());
}
