//! `ferrolm finetune --method dpo` on the default model (SmolLM2-135M-Instruct), as a user
//! drives it, with preferences a rule decides: for "extract name, age and city as JSON", the
//! JSON answer is preferred to a prose one. Held-out pairs (names and cities never trained on)
//! measure DPO's implicit reward: an untrained policy ties every pair (accuracy 0.5); a few
//! steps must rank most of them right. The reference log-probs are cached by (model, pairs):
//! a second run reads them. A resumed run is step for step the uninterrupted one. Bad
//! preference lines are refused by number.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::Path;

use serde_json::Value;

fn dpo(base: &Path, train: &Path, out: &Path, extra: &[&str]) -> (Value, String) {
    finetune_pairs("dpo", base, train, out, extra)
}

#[test]
fn dpo_ranks_held_out_pairs_and_reuses_its_reference() {
    let base = default_model();
    let dir = tempfile::tempdir().unwrap();
    let (train, val) = (dir.path().join("train.jsonl"), dir.path().join("val.jsonl"));
    std::fs::write(&train, preference_pairs(24, false, 1)).unwrap();
    std::fs::write(&val, preference_pairs(8, true, 2)).unwrap();
    let run = dir.path().join("run");
    let args = [
        "--val",
        val.to_str().unwrap(),
        "--iters",
        "12",
        "--eval-every",
        "6",
        "--lr",
        "2e-4",
        "--beta",
        "0.1",
    ];
    let (s, err) = dpo(&base, &train, &run, &args);
    assert_eq!(s["iters"], 12);
    assert!(err.contains("reference log-probs: computed"), "{err}");
    let e = evals(&run);
    let (first, last) = (&e[0], &e[e.len() - 1]);
    eprintln!(
        "held-out pair accuracy {} → {}, margin {} → {}, loss {} → {}",
        first["pair_accuracy"],
        last["pair_accuracy"],
        first["reward_margin"],
        last["reward_margin"],
        first["val_loss"],
        last["val_loss"]
    );
    // An untrained policy is its own reference: every pair ties, the loss is log 2.
    assert_eq!(first["pair_accuracy"], 0.5);
    assert!((first["val_loss"].as_f64().unwrap() - 2f64.ln()).abs() < 1e-4);
    assert!(last["pair_accuracy"].as_f64().unwrap() >= 0.8, "{last}");
    assert!(last["reward_margin"].as_f64().unwrap() > 0.0, "{last}");
    // per-step figures are in the metrics too
    let steps = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(steps
        .lines()
        .any(|l| l.contains("\"loss\"") && l.contains("rewards_chosen")));
    // the adapter is a PEFT adapter, and the run serves as a model
    assert!(run.join("adapter/adapter_config.json").is_file());
    let o = ferrolm()
        .args(["generate", "--model"])
        .arg(&run)
        .args(["--temperature", "0", "--max-tokens", "4", "--prompt", "Hi"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Same model, same pairs, another run: the reference comes from the cache.
    let (_, err) = dpo(
        &base,
        &train,
        &dir.path().join("again"),
        &["--val", val.to_str().unwrap(), "--iters", "1"],
    );
    assert!(err.contains("reference log-probs: read from"), "{err}");
    // Other pairs: computed again.
    let other = dir.path().join("other.jsonl");
    std::fs::write(&other, preference_pairs(4, false, 9)).unwrap();
    let (_, err) = dpo(&base, &other, &dir.path().join("third"), &["--iters", "1"]);
    assert!(err.contains("reference log-probs: computed"), "{err}");
}

#[test]
fn resumed_dpo_matches_an_uninterrupted_one() {
    let base = default_model();
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    std::fs::write(&train, preference_pairs(8, false, 3)).unwrap();
    let steps = |run: &Path| -> Vec<String> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"loss\""))
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                format!(
                    "{} {} {} {}",
                    v["step"], v["loss"], v["grad_norm"], v["reward_margin"]
                )
            })
            .collect()
    };
    let common = ["--eval-every", "2", "--threads", "1", "--iters", "4"];
    let a = dir.path().join("a");
    dpo(&base, &train, &a, &common);
    // b: stopped by SIGTERM after its first step, then resumed
    let b = dir.path().join("b");
    let mut child = ferrolm()
        .env("FERROLM_HOME", dir.path().join("home"))
        .args(["finetune", "--method", "dpo", "--model"])
        .arg(&base)
        .arg("--train")
        .arg(&train)
        .arg("--out")
        .arg(&b)
        .args(["--targets", "q,v,o,down", "--batch", "2"])
        .args(common)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(b.join("metrics.jsonl")).map_or(true, |t| !t.contains("\"loss\""))
    {
        assert!(t0.elapsed().as_secs() < 120, "no step in 120 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let done = steps(&b).len();
    assert!(done < 4, "the run was not interrupted ({done} steps)");
    let mut resumed = common.to_vec();
    resumed.push("--resume");
    let (_, err) = dpo(&base, &train, &b, &resumed);
    assert!(err.contains("reference log-probs: read from"), "{err}");
    assert_eq!(steps(&a), steps(&b));
    assert_eq!(steps(&a).len(), 4);
}

#[test]
fn bad_preference_files_are_refused_by_line() {
    let base = default_model();
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("bad.jsonl");
    let mut text = preference_pairs(2, false, 4);
    text.push_str(r#"{"input": {"messages": [{"role": "user", "content": "hi"}]}, "preferred_output": [{"role": "assistant", "content": "a"}]}"#);
    text.push('\n');
    text.push_str(r#"{"input": {"messages": [{"role": "user", "content": "hi"}]}, "preferred_output": [{"role": "assistant", "content": "a"}], "non_preferred_output": [{"role": "assistant", "content": "a"}]}"#);
    text.push('\n');
    text.push_str(r#"{"input": {"messages": [{"role": "user", "content": "hi"}]}, "preferred_output": [{"role": "tool", "content": "a"}], "non_preferred_output": [{"role": "assistant", "content": "b"}]}"#);
    text.push('\n');
    std::fs::write(&train, text).unwrap();
    let o = ferrolm()
        .args(["finetune", "--method", "dpo", "--model"])
        .arg(&base)
        .arg("--train")
        .arg(&train)
        .arg("--out")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("line 3") && err.contains("non_preferred_output"),
        "{err}"
    );
    assert!(err.contains("line 4") && err.contains("identical"), "{err}");
    assert!(err.contains("line 5") && err.contains("assistant"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // a chat (SFT) file given to DPO says so
    let chat = dir.path().join("chat.jsonl");
    std::fs::write(
        &chat,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
    )
    .unwrap();
    let o = ferrolm()
        .args(["finetune", "--method", "dpo", "--model"])
        .arg(&base)
        .arg("--train")
        .arg(&chat)
        .arg("--out")
        .arg(dir.path().join("run2"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("line 1") && err.contains("--method sft"),
        "{err}"
    );
}
