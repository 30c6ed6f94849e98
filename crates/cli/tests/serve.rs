//! `ferrolm serve` end to end: the real binary on a free port, driven over plain HTTP.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const PARIS: &str = "The capital of France is Paris.";

fn paris_request() -> Value {
    json!({
        "model": "smollm2-135m-instruct",
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
    })
}

/// The JSON payloads of an SSE body, up to and without `[DONE]`; asserts `[DONE]` ends it.
fn sse_payloads(body: &str) -> Vec<Value> {
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(
        data.last(),
        Some(&"[DONE]"),
        "stream did not end with [DONE]: {body}"
    );
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn error_of(v: &Value) -> (&str, &str) {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    (
        e["type"].as_str().unwrap(),
        e["code"].as_str().unwrap_or(""),
    )
}

#[test]
fn models_are_listed_and_unknown_ones_are_404() {
    let s = Server::start(&[]);
    let (status, v) = s.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "smollm2-135m-instruct");
    assert_eq!(v["data"][0]["object"], "model");
    let (status, v) = s.get("/v1/models/smollm2-135m-instruct");
    assert_eq!(
        (status, v["id"].as_str()),
        (200, Some("smollm2-135m-instruct"))
    );
    let (status, v) = s.get("/v1/models/gpt-4");
    assert_eq!(status, 404);
    assert_eq!(error_of(&v).1, "model_not_found");

    let mut req = paris_request();
    req["model"] = json!("gpt-4");
    let (status, v) = s.post("/v1/chat/completions", &req);
    assert_eq!(status, 404);
    assert_eq!(error_of(&v), ("invalid_request_error", "model_not_found"));
    let (status, v) = s.get("/v1/nothing-here");
    assert_eq!(status, 404);
    error_of(&v);
    let (status, v) = s.post("/v1/models", &json!({}));
    assert_eq!(status, 405);
    error_of(&v);
}

#[test]
fn bad_requests_are_400_with_an_openai_error_body() {
    let s = Server::start(&["--ctx", "256"]);
    let (status, body) = s.post_raw("/v1/chat/completions", "{\"messages\": [");
    assert_eq!(status, 400);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error_of(&v).0, "invalid_request_error");

    for n in [0, 17] {
        let mut req = paris_request();
        req["n"] = json!(n);
        let (status, v) = s.post("/v1/chat/completions", &req);
        assert_eq!(status, 400);
        assert_eq!(v["error"]["param"], "n");
    }

    let mut req = paris_request();
    req["max_tokens"] = json!(250);
    let (status, v) = s.post("/v1/chat/completions", &req);
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "max_tokens");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ask for at most"),
        "{v}"
    );

    let mut req = paris_request();
    req["messages"][1]["content"] = json!("tell me a story ".repeat(100));
    let (status, v) = s.post("/v1/chat/completions", &req);
    assert_eq!(status, 400);
    assert_eq!(error_of(&v).1, "context_length_exceeded");
    // It says by how much.
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("more than the 256"), "{m}");

    let mut req = paris_request();
    req["messages"][1]["role"] = json!("wizard");
    let (status, v) = s.post("/v1/chat/completions", &req);
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("messages"))
    );

    let mut req = paris_request();
    req["temperature"] = json!(-1);
    let (status, v) = s.post("/v1/chat/completions", &req);
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("temperature"));
}

#[test]
fn greedy_chat_completion_answers_and_streams_the_same_text() {
    let s = Server::start(&[]);
    let (status, v) = s.post("/v1/chat/completions", &paris_request());
    assert_eq!(status, 200, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "smollm2-135m-instruct");
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], PARIS);
    assert_eq!(choice["finish_reason"], "stop");
    let u = &v["usage"];
    let (p, c) = (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 20 && c >= 7, "{u}");
    assert_eq!(u["total_tokens"].as_u64().unwrap(), p + c);
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64());

    // Content as an array of text parts renders the same prompt.
    let mut req = paris_request();
    req["messages"][1]["content"] = json!([{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]);
    let (_, v2) = s.post("/v1/chat/completions", &req);
    assert_eq!(v2["choices"][0]["message"]["content"], PARIS);
    assert_eq!(v2["usage"]["prompt_tokens"], p);

    let mut req = paris_request();
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let (status, body) = s.post_raw("/v1/chat/completions", &req.to_string());
    assert_eq!(status, 200, "{body}");
    let chunks = sse_payloads(&body);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, PARIS);
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!("stop")]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], c);
    assert_eq!(last["usage"]["prompt_tokens"], p);

    // Without include_usage there is no usage chunk.
    req["stream_options"] = json!(null);
    let (_, body) = s.post_raw("/v1/chat/completions", &req.to_string());
    let chunks = sse_payloads(&body);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
}

#[test]
fn a_shared_system_prompt_is_served_from_the_prefix_cache() {
    let s = Server::start(&[]);
    let system =
        "You are a meticulous assistant. Answer briefly, use plain words, and never invent facts. "
            .repeat(3);
    let ask = |q: &str| {
        let req = json!({
            "model": "smollm2-135m-instruct",
            "temperature": 0,
            "max_tokens": 8,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
        });
        let (status, v) = s.post("/v1/chat/completions", &req);
        assert_eq!(status, 200, "{v}");
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(ask("What is the capital of France?"), 0);
    assert!(ask("What is two plus two?") >= 64);
}

#[test]
fn concurrent_requests_both_succeed() {
    let s = Server::start(&[]);
    let url = s.url("/v1/chat/completions");
    let threads: Vec<_> = ["What is the capital of France?", "Name three colors."]
        .into_iter()
        .map(|q| {
            let url = url.clone();
            let mut req = paris_request();
            req["messages"][1]["content"] = json!(q);
            std::thread::spawn(move || {
                let r = ureq::post(&url).send_string(&req.to_string()).unwrap();
                serde_json::from_str::<Value>(&r.into_string().unwrap()).unwrap()
            })
        })
        .collect();
    let answers: Vec<Value> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(answers[0]["choices"][0]["message"]["content"], PARIS);
    let other = answers[1]["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    assert!(!other.is_empty());
}

#[test]
fn text_completions_stop_at_max_tokens() {
    let s = Server::start(&[]);
    let req = json!({"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0});
    let (status, v) = s.post("/v1/completions", &req);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let text = v["choices"][0]["text"].as_str().unwrap().to_owned();
    assert!(!text.is_empty());

    let mut req = req;
    req["stream"] = json!(true);
    let (_, body) = s.post_raw("/v1/completions", &req.to_string());
    let streamed: String = sse_payloads(&body)
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, text);
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_the_engine() {
    // One request at a time, and one that would run for minutes: the next request only gets
    // through if the disconnect aborted the first.
    let s = Server::start(&["--max-running", "1"]);
    let body = json!({
        "messages": [{"role": "user", "content": "Count from one to one thousand."}],
        "temperature": 0,
        "logit_bias": {"0": -100, "1": -100, "2": -100},
        "stream": true,
    })
    .to_string();
    let mut conn = TcpStream::connect(s.base.trim_start_matches("http://")).unwrap();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(conn);
    let mut seen = 0;
    let mut line = String::new();
    while seen < 5 {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stream ended early"
        );
        if line.starts_with("data: ") {
            seen += 1;
        }
    }
    drop(reader);
    let mut req = paris_request();
    req["max_tokens"] = json!(4);
    let r = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build()
        .post(&s.url("/v1/chat/completions"))
        .send_string(&req.to_string());
    assert!(r.is_ok(), "the aborted request kept running: {r:?}");
}

#[test]
fn ollama_chat_generate_tags_and_version() {
    let s = Server::start(&[]);
    let chat = json!({
        "model": "smollm2-135m-instruct:latest",
        "stream": false,
        "options": {"temperature": 0, "seed": 1},
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
    });
    let (status, v) = s.post("/api/chat", &chat);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["message"]["role"], "assistant");
    assert_eq!(v["message"]["content"], PARIS);
    assert_eq!(v["done"], true);
    assert_eq!(v["done_reason"], "stop");
    assert!(v["prompt_eval_count"].as_u64().unwrap() > 20);
    assert!(v["eval_count"].as_u64().unwrap() >= 7);
    for k in ["total_duration", "prompt_eval_duration", "eval_duration"] {
        assert!(v[k].as_u64().unwrap() > 0, "{k}: {v}");
    }
    assert!(v["total_duration"].as_u64() >= v["eval_duration"].as_u64());

    // Streaming is the default: one JSON object per line, the last one `done`.
    let mut streamed = chat.clone();
    streamed.as_object_mut().unwrap().remove("stream");
    let (status, body) = s.post_raw("/api/chat", &streamed.to_string());
    assert_eq!(status, 200);
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() > 2);
    let text: String = lines
        .iter()
        .map(|l| l["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, PARIS);
    assert!(lines[..lines.len() - 1].iter().all(|l| l["done"] == false));
    assert_eq!(lines.last().unwrap()["done"], true);
    assert_eq!(lines.last().unwrap()["eval_count"], v["eval_count"]);

    let gen = json!({
        "model": "smollm2-135m-instruct",
        "system": "You are a helpful assistant.",
        "prompt": "What is the capital of France?",
        "stream": false,
        "options": {"temperature": 0, "num_predict": 3},
    });
    let (status, g) = s.post("/api/generate", &gen);
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["response"], "The capital of");
    assert_eq!(
        (g["done_reason"].as_str(), g["eval_count"].as_u64()),
        (Some("length"), Some(3))
    );

    let (status, v) = s.post("/api/chat", &json!({"model": "llama3", "messages": []}));
    assert_eq!(status, 404);
    assert!(v["error"].as_str().unwrap().contains("llama3"));

    let (status, v) = s.get("/api/tags");
    assert_eq!(status, 200);
    assert_eq!(v["models"][0]["name"], "smollm2-135m-instruct");
    assert!(v["models"][0]["size"].as_u64().unwrap() > 1_000_000);
    let (status, v) = s.get("/api/version");
    assert_eq!(status, 200);
    assert!(v["version"].is_string());
}

#[cfg(unix)]
#[test]
fn sigterm_stops_the_server_cleanly() {
    let mut s = Server::start(&[]);
    let (status, _) = s.post("/v1/chat/completions", &paris_request());
    assert_eq!(status, 200);
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "server did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
}

#[test]
fn a_config_file_serves_several_models_with_aliases() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[model]]\npath = {:?}\nid = \"small\"\naliases = [\"gpt-4o-mini\"]\n",
            default_model().to_string_lossy()
        ),
    )
    .unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap(), "--ctx", "1024"]);
    let (_, v) = s.get("/v1/models");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["smollm2-135m-instruct", "small"]);
    let mut req = paris_request();
    req["model"] = json!("gpt-4o-mini");
    req["max_tokens"] = json!(8);
    let (status, v) = s.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "small");
    let (status, v) = s.post("/api/show", &json!({"model": "small"}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["details"]["quantization_level"], "Q4_1");
    let (_, v) = s.get("/api/ps");
    assert_eq!(v["models"].as_array().unwrap().len(), 2);

    // Unknown keys in the config are errors that name them.
    std::fs::write(&cfg, "[[model]]\npath = \"x.gguf\"\nalias = [\"y\"]\n").unwrap();
    let out = ferrolm()
        .args(["serve", "--port", "0", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("alias"), "{err}");
}

#[test]
fn health_metrics_and_request_ids() {
    let s = Server::start(&[]);
    let (status, v) = s.get("/health");
    assert_eq!((status, v["status"].as_str()), (200, Some("ok")));
    let r = ureq::post(&s.url("/v1/chat/completions"))
        .set("x-request-id", "trace-42")
        .send_string(&paris_request().to_string())
        .unwrap();
    assert_eq!(r.header("x-request-id"), Some("trace-42"));
    assert!(r.header("x-ferrolm-cost-usd").is_some());
    let r = ureq::get(&s.url("/v1/models")).call().unwrap();
    assert!(r
        .header("x-request-id")
        .is_some_and(|id| id.starts_with("req_")));
    let text = ureq::get(&s.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    for needle in [
        "ferrolm_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1",
        "ferrolm_completion_tokens_total{model=\"smollm2-135m-instruct\"}",
        "ferrolm_time_to_first_token_seconds_count 1",
        "ferrolm_inter_token_latency_seconds_bucket",
        "ferrolm_kv_blocks_free{model=\"smollm2-135m-instruct\"}",
        "ferrolm_prefix_cache_hit_rate{model=\"smollm2-135m-instruct\"}",
        "ferrolm_requests_waiting{model=\"smollm2-135m-instruct\"} 0",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    // One request runs, none may wait: a second concurrent one is refused at once.
    let s = Server::start(&["--max-running", "1", "--max-queue", "0"]);
    let mut long = paris_request();
    long["messages"][1]["content"] = json!("Count from 1 to 500.");
    long["max_tokens"] = json!(400);
    long["stream"] = json!(true);
    let url = s.url("/v1/chat/completions");
    let first = ureq::post(&url).send_string(&long.to_string()).unwrap();
    let mut reader = BufReader::new(first.into_reader());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap(); // the stream has started
    match ureq::post(&url).send_string(&paris_request().to_string()) {
        Err(ureq::Error::Status(429, r)) => {
            let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
            assert!(retry >= 1);
            let v: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
            assert_eq!(v["error"]["code"], "server_overloaded");
        }
        other => panic!("expected a 429, got {other:?}"),
    }
    drop(reader);
    // Once the first is gone, requests are served again.
    let t0 = Instant::now();
    loop {
        match ureq::post(&url).send_string(&paris_request().to_string()) {
            Ok(r) => {
                assert_eq!(r.status(), 200);
                break;
            }
            Err(ureq::Error::Status(429, _)) if t0.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn post_with_key(s: &Server, key: &str, body: &Value) -> (u16, Value) {
    let r = ureq::post(&s.url("/v1/chat/completions"))
        .set("Authorization", &format!("Bearer {key}"))
        .send_string(&body.to_string());
    let (status, text) = match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    };
    (status, serde_json::from_str(&text).unwrap())
}

#[test]
fn budgets_stop_spending_and_revoked_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // One request of the default model costs a few millionths of a dollar at the catalog's
    // self-hosted rate: a budget of one millionth is spent by the first request.
    let thrifty = create_key(dir.path(), "thrifty", &["--budget-usd", "0.000001"]);
    let other = create_key(dir.path(), "other", &[]);
    let s = Server::start_in(dir.path(), &[]);
    let mut req = paris_request();
    req["max_tokens"] = json!(8);
    let (status, v) = post_with_key(&s, &thrifty, &req);
    assert_eq!(status, 200, "{v}");
    let (status, v) = post_with_key(&s, &thrifty, &req);
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "insufficient_quota");
    // Another key is not affected.
    assert_eq!(post_with_key(&s, &other, &req).0, 200);
    // Revocation takes effect on the running server.
    let out = ferrolm()
        .args(["keys", "revoke", "other", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, v) = post_with_key(&s, &other, &req);
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["error"]["type"], "authentication_error");
}

#[test]
fn a_network_address_without_keys_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferrolm()
        .args(["serve", "--host", "0.0.0.0", "--port", "0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without API keys") && err.contains("--allow-unauthenticated"),
        "{err}"
    );
}

#[test]
fn context_strategies_drop_or_summarize_old_turns_and_say_so() {
    let s = Server::start(&["--ctx", "256"]);
    let mut messages = vec![json!({"role": "system", "content": "You are a helpful assistant."})];
    for i in 0..8 {
        messages.push(json!({"role": "user", "content": format!("Tell me fact number {i} about the history of the Roman empire and its roads.")}));
        messages.push(json!({"role": "assistant", "content": format!("Fact {i}: the Romans built long straight roads paved with stone that connected the provinces to Rome.")}));
    }
    messages.push(json!({"role": "user", "content": "What is the capital of France?"}));
    let mut req = json!({"model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 16, "messages": messages});
    // The default strategy is an error that says by how much.
    let (status, v) = s.post("/v1/chat/completions", &req);
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // middle-out keeps the system prompt and the latest turns.
    req["context_strategy"] = json!("middle-out");
    let r = ureq::post(&s.url("/v1/chat/completions"))
        .send_string(&req.to_string())
        .unwrap();
    let header = r.header("x-ferrolm-context").unwrap().to_owned();
    let v: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
    assert!(
        header.starts_with("middle-out; dropped_messages="),
        "{header}"
    );
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt + 16 <= 256, "{v}");
    assert!(header.ends_with(&format!("->{prompt}")), "{header} vs {v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text}");
    // summarize: the model condenses the oldest turns into a note; the next identical request
    // reuses the cached summary.
    req["context_strategy"] = json!("summarize");
    for want in ["summary=generated", "summary=cached"] {
        let r = ureq::post(&s.url("/v1/chat/completions"))
            .send_string(&req.to_string())
            .unwrap();
        let header = r.header("x-ferrolm-context").unwrap().to_owned();
        assert!(
            header.starts_with("summarize; summarized_messages=11"),
            "{header}"
        );
        assert!(header.contains(want), "{header}");
        let v: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
        assert!(
            v["usage"]["prompt_tokens"].as_u64().unwrap() + 16 <= 256,
            "{v}"
        );
    }
    // With a trigger at a fraction of the context, the server-wide strategy applies before
    // the context is full.
    let early = Server::start(&[
        "--ctx",
        "1024",
        "--context-strategy",
        "middle-out",
        "--context-trigger",
        "0.25",
    ]);
    let mut fits = req.clone();
    fits.as_object_mut().unwrap().remove("context_strategy");
    let r = ureq::post(&early.url("/v1/chat/completions"))
        .send_string(&fits.to_string())
        .unwrap();
    let header = r.header("x-ferrolm-context").unwrap().to_owned();
    let v: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
    assert!(header.starts_with("middle-out"), "{header}");
    assert!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() + 16 <= 256,
        "{v}"
    );
    drop(early);
    let out = ferrolm()
        .args(["serve", "--port", "0", "--context-trigger", "0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--context-trigger is 0"));
    // A last message that cannot fit even alone is still an error.
    req["messages"] = json!([{"role": "user", "content": "hello ".repeat(400)}]);
    let (status, v) = s.post("/v1/chat/completions", &req);
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("middle-out dropped all 0"),
        "{v}"
    );
}

#[test]
fn a_router_sends_easy_requests_to_the_small_tier_and_falls_back_when_it_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("serve.toml");
    let model = default_model();
    std::fs::write(
        &cfg,
        format!(
            r#"
[[model]]
path = {m:?}
id = "small"
price = "smollm2-135m-instruct"
[[model]]
path = {m:?}
id = "large"
price = "gpt-4o"
[[router]]
id = "auto"
[[router.tier]]
model = "small"
max_prompt_tokens = 60
tools = false
[[router.tier]]
model = "large"
"#,
            m = model.to_string_lossy()
        ),
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        data.path(),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--ctx",
            "1024",
            "--max-running",
            "1",
            "--max-queue",
            "0",
        ],
    );
    let (_, v) = s.get("/v1/models");
    assert!(v.to_string().contains("\"auto\""), "{v}");
    let ask = |req: &Value| {
        let (status, v) = s.post("/v1/chat/completions", req);
        assert_eq!(status, 200, "{v}");
        v["model"].as_str().unwrap().to_owned()
    };
    let mut req = paris_request();
    req["model"] = json!("auto");
    req["max_tokens"] = json!(8);
    assert_eq!(ask(&req), "small");
    // A long prompt, and a request with tools, go to the top tier.
    let mut long = req.clone();
    long["messages"][1]["content"] = json!("Tell me about Paris. ".repeat(20));
    assert_eq!(ask(&long), "large");
    let mut tools = req.clone();
    tools["tools"] = json!([{"type": "function", "function": {"name": "f"}}]);
    assert_eq!(ask(&tools), "large");
    // With the small tier busy (one running, no queue), the next easy request falls back.
    let mut busy = req.clone();
    busy["model"] = json!("small");
    busy["messages"][1]["content"] = json!("Count from 1 to 500.");
    busy["max_tokens"] = json!(400);
    busy["stream"] = json!(true);
    let first = ureq::post(&s.url("/v1/chat/completions"))
        .send_string(&busy.to_string())
        .unwrap();
    let mut reader = BufReader::new(first.into_reader());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(ask(&req), "large");
    drop(reader);
    // The ledger records the route and what routing saved against the top tier.
    drop(s);
    let small = usage_of_model(data.path(), "small");
    let v = &small;
    assert_eq!(small["routed_requests"], 1, "{v}");
    assert!(small["saved_by_routing_usd"].as_f64().unwrap() > 0.0, "{v}");
    // --savings prices the same traffic on a hosted model.
    let out = ferrolm()
        .args([
            "usage",
            "--savings",
            "--compare",
            "gpt-4o-mini",
            "--json",
            "--data-dir",
        ])
        .arg(data.path())
        .output()
        .unwrap();
    let v = json_of(&out);
    assert_eq!(v["compare"]["model"], "gpt-4o-mini");
    assert!(v["compare"]["total"].as_f64().unwrap() > 0.0, "{v}");
    let out = ferrolm()
        .args(["usage", "--savings", "--data-dir"])
        .arg(data.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("SAVED_ROUTING") && text.contains("ON_GPT-4O_USD"),
        "{text}"
    );
}

#[test]
fn an_upstream_is_proxied_counted_and_a_dead_one_falls_back_within_the_request() {
    // Server A is the "hosted" upstream; B proxies it as `remote` and routes `auto` to it
    // first, to its own local model second.
    let a = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[[model]]
path = {m:?}
id = "local"
[[model]]
id = "remote"
upstream = "{base}/v1"
upstream_model = "smollm2-135m-instruct"
price = "gpt-4o"
[[router]]
id = "auto"
[[router.tier]]
model = "remote"
[[router.tier]]
model = "local"
"#,
            m = default_model().to_string_lossy(),
            base = a.base
        ),
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let b = Server::start_in(
        data.path(),
        &["--config", cfg.to_str().unwrap(), "--ctx", "1024"],
    );
    let mut req = paris_request();
    req["model"] = json!("remote");
    req["max_tokens"] = json!(16);
    let (status, v) = b.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("Paris"));
    // Streaming passes through, without the usage chunk the client did not ask for.
    req["stream"] = json!(true);
    let (status, body) = b.post_raw("/v1/chat/completions", &req.to_string());
    assert_eq!(status, 200);
    let chunks = sse_payloads(&body);
    assert!(chunks
        .iter()
        .all(|c| !c["choices"].as_array().unwrap().is_empty()));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(text.contains("Paris"), "{text}");
    // The upstream goes down: `remote` is a 503 that says so, `auto` falls back to `local`.
    drop(a);
    req["stream"] = json!(false);
    let (status, v) = b.post("/v1/chat/completions", &req);
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "upstream_unavailable");
    req["model"] = json!("auto");
    let (status, v) = b.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "local");
    // Both proxied requests are in B's ledger, priced at the catalog's gpt-4o rate.
    drop(b);
    let remote = usage_of_model(data.path(), "remote");
    let v = &remote;
    assert_eq!(remote["requests"], 2, "{v}");
    assert!(remote["cost_usd"].as_f64().unwrap() > 0.0, "{v}");
}

/// The `ferrolm usage --by model` row of `model` in the ledger of `data_dir`.
fn usage_of_model(data_dir: &std::path::Path, model: &str) -> Value {
    let out = ferrolm()
        .args(["usage", "--json", "--by", "model", "--data-dir"])
        .arg(data_dir)
        .output()
        .unwrap();
    let v = json_of(&out);
    v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["model"] == model)
        .unwrap_or_else(|| panic!("no row for {model}: {v}"))
        .clone()
}

#[test]
fn middle_out_keeps_the_system_prompt_and_the_last_turn_verbatim() {
    // A 64-token context holds the system prompt and the last question (27 tokens) with room
    // for 16 more, but not one earlier turn as well: middle-out must leave exactly those two,
    // unchanged — the same ids `ferrolm generate` makes of them.
    let out = ferrolm()
        .args([
            "generate",
            "--system",
            "You are a helpful assistant.",
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "1",
            "--json",
        ])
        .arg("--model")
        .arg(default_model())
        .output()
        .unwrap();
    let want = json_of(&out)["prompt_ids"].as_array().unwrap().len() as u64;
    let s = Server::start(&["--ctx", "64", "--context-strategy", "middle-out"]);
    let mut messages = vec![json!({"role": "system", "content": "You are a helpful assistant."})];
    for i in 0..3 {
        messages.push(json!({"role": "user", "content": format!("Question {i} about something else entirely?")}));
        messages.push(json!({"role": "assistant", "content": format!("Answer {i}: a long reply about another topic, with enough words in it to take up about thirty tokens of the context.")}));
    }
    messages.push(json!({"role": "user", "content": "What is the capital of France?"}));
    let req = json!({"model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 16, "messages": messages});
    let r = ureq::post(&s.url("/v1/chat/completions"))
        .send_string(&req.to_string())
        .unwrap();
    let header = r.header("x-ferrolm-context").unwrap().to_owned();
    let v: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
    assert!(header.contains("dropped_messages=6"), "{header}");
    assert_eq!(v["usage"]["prompt_tokens"].as_u64().unwrap(), want, "{v}");
}
