//! `ferrolm serve` end to end: the real binary on a free port, driven over plain HTTP.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const PARIS: &str = "The capital of France is Paris.";

/// A running `ferrolm serve`, killed when dropped (also when a test panics).
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let model = default_model();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = ferrolm()
            .args(["serve", "--threads", "1", "--port", &port.to_string()])
            .arg("--model")
            .arg(&model)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let t0 = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("ferrolm serve exited early ({status}): {err}");
            }
            if ureq::get(&format!("{base}/v1/models")).call().is_ok() {
                return Server { child, base };
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "server never answered"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let (status, body) = match ureq::get(&self.url(path)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
            Err(e) => panic!("GET {path}: {e}"),
        };
        (status, serde_json::from_str(&body).unwrap())
    }

    /// POST a raw body; (status, body text).
    fn post_raw(&self, path: &str, body: &str) -> (u16, String) {
        match ureq::post(&self.url(path))
            .set("Content-Type", "application/json")
            .send_string(body)
        {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
            Err(e) => panic!("POST {path}: {e}"),
        }
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.post_raw(path, &body.to_string());
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("POST {path}: not JSON ({e}): {text}"));
        (status, v)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

    let mut req = paris_request();
    req["n"] = json!(2);
    let (status, v) = s.post("/v1/chat/completions", &req);
    assert_eq!(status, 400);
    assert_eq!(v["error"]["param"], "n");
    assert!(v["error"]["message"].as_str().unwrap().contains("n=1"));

    let mut req = paris_request();
    req["messages"][1]["content"] = json!("tell me a story ".repeat(100));
    let (status, v) = s.post("/v1/chat/completions", &req);
    assert_eq!(status, 400);
    assert_eq!(error_of(&v).1, "context_length_exceeded");

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
