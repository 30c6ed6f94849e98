//! `ferrolm finetune` on the default model (SmolLM2-135M-Instruct), as a user drives it: a
//! reduced run of the demonstration task (`scripts/sft_task.py`: reply with one fixed JSON
//! shape) takes held-out exact-match accuracy from near zero to most of the set; the LoRA run
//! is servable (`--model OUT`), exports a PEFT adapter, merges into a GGUF that gives the same
//! answers; resuming is step for step; bad files are refused by line.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::Path;

use serde_json::{json, Value};

const FIRST: [&str; 12] = [
    "Maria", "Jonas", "Aiko", "Pedro", "Lena", "Omar", "Greta", "Ravi", "Sofia", "Tomas", "Nadia",
    "Felix",
];
const LAST: [&str; 12] = [
    "Keller", "Novak", "Tanaka", "Silva", "Berg", "Haddad", "Lind", "Patel", "Rossi", "Horvat",
    "Weber", "Costa",
];
const CITY: [&str; 12] = [
    "Lyon", "Porto", "Osaka", "Ghent", "Tartu", "Leeds", "Graz", "Turin", "Bergen", "Split",
    "Cork", "Basel",
];
const PHRASES: [&str; 3] = [
    "{name}, {age}, lives in {city}.",
    "{name} is {age} years old and lives in {city}.",
    "Meet {name} from {city}, aged {age}.",
];

/// `n` examples of the task; held-out ones use names and cities training never shows.
fn task(n: usize, held_out: bool, seed: u64) -> String {
    let mut s = seed;
    let mut next = |m: usize| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) as usize) % m
    };
    let pool = |xs: &'static [&'static str; 12]| if held_out { &xs[8..] } else { &xs[..8] };
    let mut out = String::new();
    for _ in 0..n {
        let name = format!(
            "{} {}",
            pool(&FIRST)[next(pool(&FIRST).len())],
            pool(&LAST)[next(pool(&LAST).len())]
        );
        let city = pool(&CITY)[next(pool(&CITY).len())];
        let age = 18 + next(70);
        let text = PHRASES[next(PHRASES.len())]
            .replace("{name}", &name)
            .replace("{age}", &age.to_string())
            .replace("{city}", city);
        let answer = json!({"name": name, "age": age, "city": city}).to_string();
        let line = json!({"messages": [
            {"role": "user", "content": format!("Extract the person's name, age and city as JSON.\n{text}")},
            {"role": "assistant", "content": answer},
        ]});
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

fn accuracy(model: Option<&Path>, data: &Path) -> f64 {
    let mut c = ferrolm();
    c.args(["eval", "chat", "--data"])
        .arg(data)
        .args(["--json", "--max-tokens", "40"]);
    if let Some(m) = model {
        c.arg("--model").arg(m);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_of(&out)["accuracy"].as_f64().unwrap()
}

fn finetune(base: &Path, train: &Path, out: &Path, extra: &[&str]) -> Value {
    let o = ferrolm()
        .args(["finetune", "--model"])
        .arg(base)
        .arg("--train")
        .arg(train)
        .arg("--out")
        .arg(out)
        .args([
            "--targets",
            "q,k,v,o,gate,up,down",
            "--lr",
            "5e-4",
            "--batch",
            "4",
            "--json",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    json_of(&o)
}

#[test]
fn lora_teaches_the_json_shape_and_the_run_is_a_model() {
    let base = default_model();
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = (
        dir.path().join("train.jsonl"),
        dir.path().join("test.jsonl"),
    );
    std::fs::write(&train, task(64, false, 1)).unwrap();
    std::fs::write(&test, task(8, true, 2)).unwrap();

    let before = accuracy(Some(&base), &test);
    let out = dir.path().join("run");
    let s = finetune(
        &base,
        &train,
        &out,
        &["--iters", "24", "--eval-every", "100"],
    );
    assert_eq!(s["iters"], 24);
    let after = accuracy(Some(&out), &test);
    eprintln!("held-out exact match: base {before:.2}, after LoRA {after:.2}");
    assert!(
        before <= 0.25,
        "the base model already does the task ({before})"
    );
    assert!(after >= 0.75, "LoRA did not teach the task: {after}");

    // the PEFT adapter merges into a GGUF that answers the same
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    let merged = dir.path().join("merged.gguf");
    let o = ferrolm()
        .arg("merge")
        .arg(&base)
        .arg(out.join("adapter"))
        .args(["--type", "f32", "-o"])
        .arg(&merged)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(accuracy(Some(&merged), &test), after);
}

#[test]
fn resumed_finetune_matches_an_uninterrupted_one() {
    let base = default_model();
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    std::fs::write(&train, task(16, false, 3)).unwrap();
    let steps = |run: &Path| -> Vec<String> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"loss\""))
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                format!("{} {} {}", v["step"], v["loss"], v["grad_norm"])
            })
            .collect()
    };
    let common = ["--eval-every", "2", "--threads", "1", "--iters", "4"];
    let a = dir.path().join("a");
    finetune(&base, &train, &a, &common);
    // b: stopped by SIGTERM after its first step, then resumed
    let b = dir.path().join("b");
    let mut child = ferrolm()
        .args(["finetune", "--model"])
        .arg(&base)
        .arg("--train")
        .arg(&train)
        .arg("--out")
        .arg(&b)
        .args([
            "--targets",
            "q,k,v,o,gate,up,down",
            "--lr",
            "5e-4",
            "--batch",
            "4",
        ])
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
    finetune(&base, &train, &b, &resumed);
    assert_eq!(steps(&a), steps(&b));
    assert_eq!(steps(&a).len(), 4);
}

#[test]
fn bad_training_files_are_refused_by_line() {
    let base = default_model();
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("bad.jsonl");
    let mut text = task(2, false, 4);
    text.push_str("{\"messages\": [{\"role\": \"user\", \"content\": \"no answer\"}]}\n");
    text.push_str("not json\n");
    std::fs::write(&train, text).unwrap();
    let o = ferrolm()
        .args(["finetune", "--model"])
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
        err.contains("line 3") && err.contains("no assistant message"),
        "{err}"
    );
    assert!(
        err.contains("line 4") && err.contains("not valid JSON"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Regression: a conversation of one assistant message (SmolLM2's template adds its default
/// system prompt only to a non-empty conversation) and replies that start with whitespace
/// (their first token merges with the template's header) train, with the reply's tokens
/// located by rendering it emptied.
#[test]
fn assistant_only_and_space_led_replies_train() {
    let base = default_model();
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    let lines = [
        json!({"messages": [{"role": "assistant", "content": "To be, or not to be, that is the question."}]}),
        json!({"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "  hi there"}]}),
        json!({"messages": [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "\n1 2 3"}]}),
        json!({"messages": [{"role": "system", "content": ""}, {"role": "assistant", "content": "Words, words, words."}]}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&train, text).unwrap();
    let s = finetune(
        &base,
        &train,
        &dir.path().join("run"),
        &["--iters", "1", "--eval-every", "10"],
    );
    assert_eq!(s["iters"], 1);
    assert!(s["train_loss"].as_f64().unwrap().is_finite());
}

/// POST with an optional API key; (status, JSON body).
fn post_as(s: &Server, key: Option<&str>, path: &str, body: &Value) -> (u16, Value) {
    let mut r = ureq::post(&s.url(path)).set("Content-Type", "application/json");
    if let Some(k) = key {
        r = r.set("Authorization", &format!("Bearer {k}"));
    }
    let (status, text) = match r.send_string(&body.to_string()) {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("POST {path}: {e}"),
    };
    (status, serde_json::from_str(&text).unwrap())
}

/// A greedy chat request: (status, reply text or error body, cached prompt tokens).
fn ask(s: &Server, key: Option<&str>, model: &str, messages: &Value) -> (u16, String, u64) {
    let body = json!({"model": model, "messages": messages, "temperature": 0, "max_tokens": 40});
    let (status, v) = post_as(s, key, "/v1/chat/completions", &body);
    if status != 200 {
        return (status, v.to_string(), 0);
    }
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    (status, text, cached)
}

/// The held-out prompts of the task, as chat messages, with their expected answers.
fn held_out(n: usize, seed: u64) -> Vec<(Value, String)> {
    task(n, true, seed)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let m = &v["messages"];
            (json!([m[0]]), m[1]["content"].as_str().unwrap().to_owned())
        })
        .collect()
}

#[test]
fn adapters_are_served_per_request_on_one_shared_base() {
    let base = default_model();
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    std::fs::write(&train, task(64, false, 1)).unwrap();
    let run = dir.path().join("run");
    finetune(
        &base,
        &train,
        &run,
        &["--iters", "24", "--eval-every", "100"],
    );
    let lora = format!("json={}", run.join("adapter").display());
    let s = Server::start(&["--lora", &lora]);
    const BASE: &str = "smollm2-135m-instruct";
    const JSON: &str = "smollm2-135m-instruct:json";

    // Listed as a model whose parent is the base.
    let (_, models) = s.get("/v1/models");
    let listed = models["data"].as_array().unwrap();
    let m = listed.iter().find(|m| m["id"] == JSON).unwrap();
    assert_eq!(m["parent"], BASE, "{models}");

    // One at a time: the adapter does the task, the base does not.
    let cases = held_out(4, 5);
    let one_by_one: Vec<(String, String)> = cases
        .iter()
        .map(|(msgs, _)| (ask(&s, None, BASE, msgs).1, ask(&s, None, JSON, msgs).1))
        .collect();
    let right = |i: usize| {
        one_by_one
            .iter()
            .zip(&cases)
            .filter(|((b, a), (_, want))| [b, a][i] == want)
            .count()
    };
    // The trained shape: one line of JSON with name, age, city in that order.
    let shaped = |a: &str| {
        let keys = serde_json::from_str::<Value>(a)
            .ok()
            .and_then(|v| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()));
        !a.contains('\n') && keys == Some(vec!["name".into(), "age".into(), "city".into()])
    };
    assert!(
        one_by_one.iter().all(|(b, a)| shaped(a) && !shaped(b)),
        "{one_by_one:?}"
    );
    assert!(right(1) >= 2 && right(1) > right(0), "{one_by_one:?}");
    // The alias answers as the adapter, and so does `generate --lora` (llama.cpp's flag).
    assert_eq!(ask(&s, None, "json", &cases[0].0).1, one_by_one[0].1);
    let o = ferrolm()
        .args([
            "generate",
            "--json",
            "--temperature",
            "0",
            "--max-tokens",
            "40",
        ])
        .arg("--lora")
        .arg(&run)
        .arg("--prompt")
        .arg(cases[0].0[0]["content"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json_of(&o)["text"], one_by_one[0].1.as_str());

    // All at once, base and adapter requests in the same batches: the same answers, each
    // request with its own adapter (or none).
    let together: Vec<(String, String)> = std::thread::scope(|sc| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(msgs, _)| {
                let b = sc.spawn(|| ask(&s, None, BASE, msgs).1);
                let a = sc.spawn(|| ask(&s, None, JSON, msgs).1);
                (b, a)
            })
            .collect();
        handles
            .into_iter()
            .map(|(b, a)| (b.join().unwrap(), a.join().unwrap()))
            .collect()
    });
    assert_eq!(together, one_by_one);

    // Prefix-cache entries are never shared across adapters.
    let system = "You read every word of the user's message with care. ".repeat(12);
    let long = json!([{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]);
    assert_eq!(ask(&s, None, BASE, &long).2, 0);
    assert!(ask(&s, None, BASE, &long).2 > 0);
    assert_eq!(
        ask(&s, None, JSON, &long).2,
        0,
        "the adapter used the base's KV"
    );
    assert!(ask(&s, None, JSON, &long).2 > 0);

    // Load and unload at runtime (a run directory works as well as a PEFT directory).
    let load = |name: &str, path: &Path| {
        s.post(
            "/v1/load_lora_adapter",
            &json!({"lora_name": name, "lora_path": path}),
        )
    };
    let (status, v) = load("again", &run);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["id"], "smollm2-135m-instruct:again");
    assert_eq!(
        ask(&s, None, "smollm2-135m-instruct:again", &cases[0].0).1,
        one_by_one[0].1
    );
    let (status, v) = load("again", &run);
    assert_eq!(status, 409, "{v}");
    let (status, v) = load("other", dir.path());
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("adapter_config.json"),
        "{v}"
    );
    let (status, v) = load("bad name", &run);
    assert_eq!(status, 400, "{v}");
    let unload = |name: &str| s.post("/v1/unload_lora_adapter", &json!({"lora_name": name}));
    assert_eq!(unload("again").0, 200);
    assert_eq!(unload("again").0, 404);
    assert_eq!(unload(BASE).0, 400);
    assert_eq!(
        ask(&s, None, "smollm2-135m-instruct:again", &cases[0].0).0,
        404
    );
    // The base and the other adapter are untouched.
    assert_eq!(ask(&s, None, JSON, &cases[0].0).1, one_by_one[0].1);
    drop(s);

    // With API keys: adapters load only from --lora-dir, and belong to the key that loaded them.
    let data = tempfile::tempdir().unwrap();
    let ka = create_key(data.path(), "a", &[]);
    let kb = create_key(data.path(), "b", &[]);
    let roots = dir.path().to_str().unwrap();
    let s = Server::start_in(data.path(), &["--lora-dir", roots]);
    let body = |path: &str| json!({"lora_name": "mine", "lora_path": path});
    let (status, v) = post_as(&s, Some(&ka), "/v1/load_lora_adapter", &body("/etc"));
    assert_eq!(status, 403, "{v}");
    let (status, v) = post_as(&s, Some(&ka), "/v1/load_lora_adapter", &body("run"));
    assert_eq!(status, 200, "{v}");
    let mine = "smollm2-135m-instruct:mine";
    assert_eq!(ask(&s, Some(&ka), mine, &cases[0].0).1, one_by_one[0].1);
    assert_eq!(ask(&s, Some(&kb), mine, &cases[0].0).0, 404);
    let (status, _) = post_as(
        &s,
        Some(&kb),
        "/v1/unload_lora_adapter",
        &json!({"lora_name": "mine"}),
    );
    assert_eq!(status, 404);
}
