//! Reward models on the default model (SmolLM2-135M-Instruct), as a user drives them:
//! `ferrolm finetune --method reward` on preferences a rule decides (the JSON answer to "extract
//! name, age and city as JSON" beats a prose one), `ferrolm eval reward` on held-out pairs
//! (names and cities never trained on), and the same model served: `POST /v1/rewards` scores a
//! conversation as `eval reward` does, and chat completions with `best_of` return the
//! candidate it ranks highest with every candidate's score; `finetune --method rl
//! --reward-model` takes a step on samples it scores. A language-model adapter is not a
//! reward model: 400.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::Path;

use serde_json::{json, Value};

fn eval_reward(rm: &Path, data: &Path) -> Value {
    let o = ferrolm()
        .args(["eval", "reward", "--model"])
        .arg(rm)
        .arg("--data")
        .arg(data)
        .args(["--json", "--threads", "2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    json_of(&o)
}

#[test]
fn a_reward_model_ranks_held_out_pairs_and_is_served() {
    let base = default_model();
    let dir = tempfile::tempdir().unwrap();
    let (train, val) = (dir.path().join("train.jsonl"), dir.path().join("val.jsonl"));
    std::fs::write(&train, preference_pairs(24, false, 1)).unwrap();
    std::fs::write(&val, preference_pairs(8, true, 2)).unwrap();
    let run = dir.path().join("rm");
    let args = [
        "--val",
        val.to_str().unwrap(),
        "--iters",
        "12",
        "--eval-every",
        "6",
        "--lr",
        "5e-4",
    ];
    let (s, err) = finetune_pairs("reward", &base, &train, &run, &args);
    assert_eq!(s["iters"], 12);
    assert!(err.contains("eval reward"), "{err}");
    let evals = common::evals(&run);
    let (first, last) = (&evals[0], evals.last().unwrap());
    eprintln!("evaluations: {evals:?}");
    // The head starts random: training must widen the held-out margin and lower the loss.
    let margin = |e: &Value| e["reward_margin"].as_f64().unwrap();
    assert!(margin(last) > margin(first) + 1.0, "{first} → {last}");
    assert!(
        last["val_loss"].as_f64() < first["val_loss"].as_f64(),
        "{first} → {last}"
    );
    assert!(last["pair_accuracy"].as_f64().unwrap() >= 0.8, "{last}");
    assert!(last["reward_margin"].as_f64().unwrap() > 0.0, "{last}");
    // The adapter is PEFT's sequence classifier: LoRA plus the saved score head.
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["modules_to_save"], json!(["score"]));

    // `eval reward` on the held-out pairs, on the quantized base as it is served.
    let e = eval_reward(&run, &val);
    eprintln!("eval reward: {e}");
    assert_eq!(e["pairs"], 8);
    assert!(e["pair_accuracy"].as_f64().unwrap() >= 0.8, "{e}");
    assert!(e["mean_margin"].as_f64().unwrap() > 0.0, "{e}");

    // RL against it: the samples scored by the reward model in an engine of its own.
    let prompts: String = std::fs::read_to_string(&val)
        .unwrap()
        .lines()
        .take(2)
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            json!({"messages": v["input"]["messages"]}).to_string() + "\n"
        })
        .collect();
    let p = dir.path().join("prompts.jsonl");
    std::fs::write(&p, prompts).unwrap();
    let rl_run = dir.path().join("rl");
    let o = ferrolm()
        .env("FERROLM_HOME", dir.path().join("home"))
        .args(["finetune", "--method", "rl", "--model"])
        .arg(&base)
        .arg("--prompts")
        .arg(&p)
        .arg("--reward-model")
        .arg(&run)
        .arg("--out")
        .arg(&rl_run)
        .args([
            "--samples",
            "3",
            "--batch",
            "2",
            "--iters",
            "1",
            "--max-tokens",
            "12",
        ])
        .args(["--max-len", "160", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let step = common::metrics(&rl_run)
        .into_iter()
        .find(|l| l.get("reward_mean").is_some())
        .unwrap();
    // reward-model scores (unbounded), differing between samples: the step has a gradient
    assert!(step["reward_mean"].as_f64().unwrap().is_finite(), "{step}");
    assert!(step["reward_std"].as_f64().unwrap() > 0.0, "{step}");
    assert!(step["grad_norm"].as_f64().unwrap() > 0.0, "{step}");

    // A language-model adapter is not a reward model.
    let o = ferrolm()
        .args(["eval", "reward", "--model"])
        .arg(&base)
        .arg("--data")
        .arg(&val)
        .output()
        .unwrap();
    assert!(!o.status.success());

    // Served: the reward model and the base under it.
    let data = dir.path().join("serve");
    let spec = format!("rm={}", run.display());
    let srv = Server::start_model(&base, &data, &["--lora", &spec]);
    let first: Value = serde_json::from_str(val_line(&val, 0).as_str()).unwrap();
    let mut conv = first["input"]["messages"].as_array().unwrap().clone();
    let (mut good, mut bad) = (conv.clone(), conv.clone());
    good.push(first["preferred_output"][0].clone());
    bad.push(first["non_preferred_output"][0].clone());
    let (st, a) = srv.post("/v1/rewards", &json!({"model": "rm", "messages": good}));
    assert_eq!(st, 200, "{a}");
    let (st, b) = srv.post("/v1/rewards", &json!({"model": "rm", "messages": bad}));
    assert_eq!(st, 200, "{b}");
    let (sa, sb) = (a["score"].as_f64().unwrap(), b["score"].as_f64().unwrap());
    eprintln!("served scores: preferred {sa}, other {sb}");
    assert!(sa > sb, "{a} {b}");
    assert!(a["usage"]["prompt_tokens"].as_u64().unwrap() > 10, "{a}");
    // the base model is not a reward model
    let (st, v) = srv.post(
        "/v1/rewards",
        &json!({"model": "smollm2-135m-instruct", "messages": good}),
    );
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["code"], "not_a_reward_model", "{v}");
    let (st, v) = srv.post("/v1/rewards", &json!({"model": "rm", "messages": []}));
    assert_eq!(st, 400, "{v}");

    // Best-of-4: sampled candidates, each scored, the highest returned.
    conv.truncate(1);
    let (st, v) = srv.post(
        "/v1/chat/completions",
        &json!({
            "model": "smollm2-135m-instruct",
            "messages": conv,
            "max_tokens": 24,
            "temperature": 1.0,
            "seed": 5,
            "best_of": {"n": 4, "reward_model": "rm"},
        }),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 1, "{v}");
    let scores: Vec<f64> = v["best_of"]["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(scores.len(), 4, "{v}");
    let chosen = v["best_of"]["chosen"].as_u64().unwrap() as usize;
    assert!(scores.iter().all(|&x| x <= scores[chosen]), "{v}");
    // the chosen reply scores the same through /v1/rewards
    let mut with = conv.clone();
    with.push(json!({"role": "assistant", "content": v["choices"][0]["message"]["content"]}));
    let (_, r) = srv.post("/v1/rewards", &json!({"model": "rm", "messages": with}));
    assert!(
        (r["score"].as_f64().unwrap() - scores[chosen]).abs() < 1e-3,
        "{r} vs {scores:?}"
    );
    // best_of refuses what it cannot do, and a reward model that is not one
    for (body, what) in [
        (
            json!({"messages": conv, "stream": true, "best_of": {"n": 2, "reward_model": "rm"}}),
            "stream",
        ),
        (
            json!({"messages": conv, "best_of": {"n": 1, "reward_model": "rm"}}),
            "best_of.n",
        ),
        (
            json!({"messages": conv, "best_of": {"n": 2, "reward_model": "smollm2-135m-instruct"}}),
            "not a reward model",
        ),
    ] {
        let (st, v) = srv.post("/v1/chat/completions", &body);
        assert_eq!(st, 400, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(what),
            "{v}"
        );
    }
}

fn val_line(path: &Path, i: usize) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .nth(i)
        .unwrap()
        .to_owned()
}

#[test]
fn reward_models_refuse_full_weights_and_bad_pairs() {
    let base = default_model();
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    std::fs::write(&train, preference_pairs(2, false, 4)).unwrap();
    let o = ferrolm()
        .args([
            "finetune",
            "--method",
            "reward",
            "--weights",
            "full",
            "--model",
        ])
        .arg(&base)
        .arg("--train")
        .arg(&train)
        .arg("--out")
        .arg(dir.path().join("full"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--weights lora"), "{err}");
    // a supervised line is not a pair, and says so with its number
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n",
    )
    .unwrap();
    let o = ferrolm()
        .args(["finetune", "--method", "reward", "--model"])
        .arg(&base)
        .arg("--train")
        .arg(&bad)
        .arg("--out")
        .arg(dir.path().join("bad"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 1"), "{err}");
}

/// `ferrolm rank` driven as a person would through stdin: one prompt's best picked, the
/// next one's answers ordered, a rerun going on where the last stopped; every line is a
/// preference pair the trainers read.
#[test]
fn rank_appends_the_best_answer_against_each_worse_one() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"Name a colour.\"}\nWhat is 2 + 2?\n{\"messages\": [{\"role\": \"user\", \"content\": \"Say hi.\"}]}\n",
    )
    .unwrap();
    let out = dir.path().join("prefs.jsonl");
    let rank = |answers: &str| {
        let mut c = ferrolm()
            .args([
                "rank",
                "--n",
                "3",
                "--max-tokens",
                "12",
                "--temperature",
                "1.2",
                "--prompts",
            ])
            .arg(&prompts)
            .arg("--out")
            .arg(&out)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin
            .take()
            .unwrap()
            .write_all(answers.as_bytes())
            .unwrap();
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // a typo is asked again; then best = 2; then an order; then quit
    let shown = rank("7\n2\n3 1 2\nq\n");
    assert!(
        shown.contains("[3]") && shown.contains("not an answer number"),
        "{shown}"
    );
    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty() && lines.len() <= 4, "{lines:?}");
    for l in &lines {
        assert_ne!(l["preferred_output"], l["non_preferred_output"]);
        assert_eq!(l["preferred_output"][0]["role"], "assistant");
    }
    // the second prompt's best is its third answer, against both others
    let second: Vec<&Value> = lines
        .iter()
        .filter(|l| l["input"]["messages"][0]["content"] == "What is 2 + 2?")
        .collect();
    if let Some(first) = second.first() {
        assert!(second
            .iter()
            .all(|l| l["preferred_output"] == first["preferred_output"]));
    }
    // a rerun skips both ranked prompts and asks about the third only
    let shown = rank("s\n");
    assert!(shown.contains("2 of 3 prompts are already in"), "{shown}");
    assert!(
        shown.contains("prompt 1 of 1") && shown.contains("Say hi."),
        "{shown}"
    );
    // what it wrote trains: the DPO parser takes every line
    let o = ferrolm()
        .args([
            "finetune", "--method", "dpo", "--iters", "1", "--batch", "1", "--train",
        ])
        .arg(&out)
        .arg("--out")
        .arg(dir.path().join("dpo"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
