//! The server as an attacker or a careless client would try it (issue 12): tenants must not see
//! each other through the prefix cache or adapter names, hostile adapters must be refused
//! without harming the server, idle and half-sent connections must be cut, and every error must
//! be in the API's own shape. Each test is named after the bug it pins down.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// POST `body` to `path` as `key`: (status, body as JSON).
fn post_as(s: &Server, key: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = ureq::post(&s.url(path))
        .set("Authorization", &format!("Bearer {key}"))
        .send_string(&body.to_string());
    let (status, text) = match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("POST {path}: {e}"),
    };
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("POST {path}: not JSON ({e}): {text}"));
    (status, v)
}

#[test]
fn the_prefix_cache_is_no_oracle_across_keys() {
    let dir = tempfile::tempdir().unwrap();
    let alice = create_key(dir.path(), "alice", &[]);
    let bob = create_key(dir.path(), "bob", &[]);
    let carol = create_key(dir.path(), "carol", &[]);
    let cfg = dir.path().join("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[model]]\npath = {:?}\nid = \"small\"\n\n[[cache_scope]]\nname = \"team\"\nkeys = [\"alice\", \"bob\"]\n",
            default_model().to_string_lossy()
        ),
    )
    .unwrap();
    let s = Server::start_in(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let secret = "You are the assistant of ACME's payroll team. The vault code is 4-8-15-16-23-42; never reveal it. "
        .repeat(3);
    let cached = |key: &str, question: &str| {
        let req = json!({
            "model": "small",
            "temperature": 0,
            "max_tokens": 4,
            "messages": [{"role": "system", "content": secret}, {"role": "user", "content": question}],
        });
        let (status, v) = post_as(&s, key, "/v1/chat/completions", &req);
        assert_eq!(status, 200, "{v}");
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    // Carol's secret prefix is hers: Alice sending the same prefix (a right guess) learns
    // nothing, not even from a second try.
    assert_eq!(cached(&carol, "What is the capital of France?"), 0);
    assert_eq!(cached(&alice, "What is two plus two?"), 0);
    // The same key gets its own hit,
    assert!(cached(&carol, "What is two plus two?") >= 64);
    // and keys in one cache scope share theirs: Bob hits what Alice computed.
    assert!(cached(&bob, "What is three plus three?") >= 64);
}

/// A PEFT LoRA adapter on SmolLM2-135M's q_proj (30 layers, 576 → 576) in `dir`: rank `r`,
/// `lora_alpha`, and weights `value(i)` (the safetensors file written by hand: 8-byte header
/// length, JSON header, little-endian F32 data). With `weights: false`, only the config.
fn write_adapter(dir: &Path, r: u64, alpha: f64, weights: bool, value: impl Fn(usize) -> f32) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        json!({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj"]})
            .to_string(),
    )
    .unwrap();
    if !weights {
        return;
    }
    let (n, r) = (576usize, r as usize);
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for layer in 0..30 {
        for (ab, shape) in [("A", [r, n]), ("B", [n, r])] {
            let len = shape[0] * shape[1] * 4;
            header.insert(
                format!("base_model.model.model.layers.{layer}.self_attn.q_proj.lora_{ab}.weight"),
                json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len]}),
            );
            offset += len;
        }
    }
    let header = Value::Object(header).to_string().into_bytes();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    for i in 0..offset / 4 {
        bytes.extend_from_slice(&value(i).to_le_bytes());
    }
    std::fs::write(dir.join("adapter_model.safetensors"), bytes).unwrap();
}

fn small(i: usize) -> f32 {
    ((i % 17) as f32 - 8.0) * 1e-3
}

/// `mkfifo PATH` (coreutils): a FIFO nobody writes to.
fn mkfifo(path: &Path) {
    let st = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success(), "mkfifo {} failed", path.display());
}

fn message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// SIGTERM, then the process must be gone within `secs`.
fn stops_on_sigterm(s: &mut Server, secs: u64) {
    let st = std::process::Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let t0 = Instant::now();
    loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "the server did not exit within {secs} s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn hostile_adapters_are_refused_and_the_server_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_adapter(&d.join("good"), 2, 4.0, true, small);
    write_adapter(&d.join("rank0"), 0, 16.0, false, small);
    write_adapter(&d.join("rank_huge"), 100_000_000, 16.0, false, small);
    write_adapter(&d.join("nan"), 2, 4.0, true, |i| {
        if i == 1234 {
            f32::NAN
        } else {
            small(i)
        }
    });
    write_adapter(&d.join("alpha_huge"), 2, 1e38, true, small);
    write_adapter(&d.join("fifo_weights"), 2, 4.0, false, small);
    mkfifo(&d.join("fifo_weights/adapter_model.safetensors"));
    std::fs::create_dir_all(d.join("fifo_config")).unwrap();
    mkfifo(&d.join("fifo_config/adapter_config.json"));

    // At startup, a hostile --lora is an error that says why, not an abort.
    let out = ferrolm()
        .args(["serve", "--port", "0", "--model"])
        .arg(default_model())
        .arg("--lora")
        .arg(format!("huge={}", d.join("rank_huge").display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("r = 100000000"), "{err}");

    let mut s = Server::start(&[]);
    let load = |name: &str| {
        let t0 = Instant::now();
        let (status, v) = s.post(
            "/v1/load_lora_adapter",
            &json!({"lora_name": name, "lora_path": d.join(name)}),
        );
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{name}: took {:?}",
            t0.elapsed()
        );
        (status, v)
    };
    let (status, v) = load("good");
    assert_eq!(status, 200, "the hand-written adapter must load: {v}");
    for (name, says) in [
        ("rank0", "r = 0"),
        ("rank_huge", "r = 100000000"),
        ("nan", "NaN"),
        ("alpha_huge", "lora_alpha"),
        ("fifo_weights", "not a regular file"),
        ("fifo_config", "adapter_config.json"),
    ] {
        let (status, v) = load(name);
        assert_eq!(status, 400, "{name}: {v}");
        assert!(message(&v).contains(says), "{name}: {v}");
    }
    // The server still answers, on the base and on the good adapter, with text.
    for model in ["smollm2-135m-instruct", "smollm2-135m-instruct:good"] {
        let (status, v) = s.post(
            "/v1/chat/completions",
            &json!({"model": model, "max_tokens": 4, "temperature": 0,
                    "messages": [{"role": "user", "content": "Say hi"}]}),
        );
        assert_eq!(status, 200, "{v}");
        assert!(
            !v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .is_empty(),
            "{v}"
        );
    }
    stops_on_sigterm(&mut s, 15);
}

#[test]
fn a_lora_path_outside_the_adapter_dirs_is_403_whether_or_not_it_exists() {
    let data = tempfile::tempdir().unwrap();
    let lora = tempfile::tempdir().unwrap();
    let key = create_key(data.path(), "a", &[]);
    let s = Server::start_in(data.path(), &["--lora-dir", lora.path().to_str().unwrap()]);
    let load = |path: &str| {
        post_as(
            &s,
            &key,
            "/v1/load_lora_adapter",
            &json!({"lora_name": "x", "lora_path": path}),
        )
    };
    let inside_up = format!("{}/../../etc/passwd", lora.path().display());
    for outside in [
        "/etc/passwd",
        "/etc/no-such-file-here",
        "../../../../etc/passwd",
        "../../../../etc/no-such-file-here",
        inside_up.as_str(),
    ] {
        let (status, v) = load(outside);
        assert_eq!(status, 403, "{outside}: {v}");
        assert_eq!(v["error"]["type"], "permission_error", "{v}");
    }
    // Inside the directory, a missing adapter is the client's 400.
    let (status, v) = load("missing");
    assert_eq!(status, 400, "{v}");
}

#[test]
fn adapter_names_are_per_key_and_tell_no_key_of_another() {
    let data = tempfile::tempdir().unwrap();
    let lora = tempfile::tempdir().unwrap();
    write_adapter(&lora.path().join("one"), 2, 4.0, true, small);
    write_adapter(&lora.path().join("two"), 2, 4.0, true, |i| small(i + 5));
    let ka = create_key(data.path(), "a", &[]);
    let kb = create_key(data.path(), "b", &[]);
    let s = Server::start_in(data.path(), &["--lora-dir", lora.path().to_str().unwrap()]);
    let load = |key: &str, path: &str| {
        post_as(
            &s,
            key,
            "/v1/load_lora_adapter",
            &json!({"lora_name": "mine", "lora_path": path}),
        )
    };
    let (status, v) = load(&ka, "one");
    assert_eq!(status, 200, "{v}");
    // B loads its own adapter under the same name: no 409, nothing about A's.
    let (status, v) = load(&kb, "two");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["id"], "smollm2-135m-instruct:mine");
    // A name is still taken within one key.
    let (status, v) = load(&ka, "two");
    assert_eq!(status, 409, "{v}");
    // Each key reaches its own, and unloading A's leaves B's.
    let ask = |key: &str| {
        post_as(
            &s,
            key,
            "/v1/chat/completions",
            &json!({"model": "mine", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .0
    };
    assert_eq!((ask(&ka), ask(&kb)), (200, 200));
    let (status, _) = post_as(
        &s,
        &ka,
        "/v1/unload_lora_adapter",
        &json!({"lora_name": "mine"}),
    );
    assert_eq!(status, 200);
    assert_eq!((ask(&ka), ask(&kb)), (404, 200));
}

/// Read from `c` until the server closes it (EOF or reset) or `limit` passes: whether it closed.
fn closed_within(c: &mut std::net::TcpStream, limit: Duration) -> bool {
    use std::io::Read;
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < limit {
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

fn connect(s: &Server) -> std::net::TcpStream {
    std::net::TcpStream::connect(s.base.trim_start_matches("http://")).unwrap()
}

#[test]
fn slowloris_idle_and_half_sent_connections_are_closed() {
    use std::io::Write;
    let mut s = Server::start(&["--header-timeout", "2"]);
    let mut idle: Vec<_> = (0..50).map(|_| connect(&s)).collect();
    let mut half: Vec<_> = (0..50)
        .map(|_| {
            let mut c = connect(&s);
            c.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            c
        })
        .collect();
    // A client that keeps its connection alive gets its answers, then the same cut when idle.
    let mut kept = connect(&s);
    for _ in 0..2 {
        kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 512];
        kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = std::io::Read::read(&mut kept, &mut buf).unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    let t0 = Instant::now();
    for c in idle
        .iter_mut()
        .chain(half.iter_mut())
        .chain(std::iter::once(&mut kept))
    {
        assert!(
            closed_within(c, Duration::from_secs(8)),
            "a connection was still open {:?} after it opened (--header-timeout 2)",
            t0.elapsed()
        );
    }
    // The server is well, and stops at once with nothing in flight.
    assert_eq!(s.get("/health").0, 200);
    let _open: Vec<_> = (0..10).map(|_| connect(&s)).collect();
    stops_on_sigterm(&mut s, 10);
}

#[test]
fn connections_past_the_cap_wait_their_turn() {
    use std::io::{Read, Write};
    let s = Server::start(&["--max-connections", "4", "--header-timeout", "3"]);
    let _held: Vec<_> = (0..4).map(|_| connect(&s)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut fifth = connect(&s);
    fifth
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let t0 = Instant::now();
    fifth
        .set_read_timeout(Some(Duration::from_millis(1000)))
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(
        fifth.read(&mut buf).is_err(),
        "the fifth connection was served while four were open (--max-connections 4)"
    );
    // Once the four idle ones are cut (--header-timeout 3), it is served.
    fifth
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let n = fifth.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert!(t0.elapsed() >= Duration::from_secs(1), "{:?}", t0.elapsed());
}

#[test]
fn invalid_input_is_a_400_that_says_why() {
    let s = Server::start(&[]);
    let chat = |extra: Value| {
        let mut req = json!({"model": "smollm2-135m-instruct", "max_tokens": 2,
            "messages": [{"role": "user", "content": "Hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        s.post("/v1/chat/completions", &req)
    };
    let (status, v) = chat(json!({"messages": [{"role": "user", "content": null}]}));
    assert_eq!(status, 400, "{v}");
    assert!(message(&v).contains("messages[0].content"), "{v}");
    let tool = |parameters: Value| {
        json!({"tool_choice": "auto", "tools": [{"type": "function",
            "function": {"name": "get_weather", "parameters": parameters}}]})
    };
    for (parameters, says) in [
        (json!({"type": "nonsense"}), "parameters.type"),
        (
            json!({"type": "object", "properties": 5}),
            "parameters.properties",
        ),
    ] {
        let (status, v) = chat(tool(parameters));
        assert_eq!(status, 400, "{v}");
        assert!(message(&v).contains(says), "{v}");
    }
    // A real schema is still taken.
    let (status, v) = chat(tool(
        json!({"type": "object", "properties": {"city": {"type": "string"}}}),
    ));
    assert_eq!(status, 200, "{v}");

    // Ollama's images: not base64 → says so; on /api/generate and in /api/chat messages.
    let (status, v) = s.post(
        "/api/generate",
        &json!({"model": "smollm2-135m-instruct", "prompt": "Hi", "stream": false,
                "images": ["this is not base64!"]}),
    );
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("not base64"), "{v}");
    let (status, v) = s.post(
        "/api/chat",
        &json!({"model": "smollm2-135m-instruct", "stream": false,
                "messages": [{"role": "user", "content": "Hi", "images": ["%%%"]}]}),
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("messages[0].images[0] is not base64"),
        "{v}"
    );
}

/// (status, body as JSON) of any request; the body must be JSON.
fn call(req: ureq::Request, body: Option<&str>) -> (u16, Value) {
    let r = match body {
        Some(b) => req.send_string(b),
        None => req.call(),
    };
    let (status, text) = match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    };
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    (status, v)
}

#[test]
fn extractor_errors_are_openai_shaped_not_plain_text() {
    let s = Server::start(&[]);
    let openai = |(status, v): (u16, Value)| {
        assert!((400..500).contains(&status), "{status} {v}");
        assert!(!message(&v).is_empty(), "{v}");
        assert!(v["error"]["type"].is_string(), "{v}");
        v
    };
    let v = openai(call(
        ureq::post(&s.url("/v1/files")).set("Content-Type", "application/json"),
        Some(r#"{"purpose": "fine-tune"}"#),
    ));
    assert!(message(&v).contains("multipart/form-data"), "{v}");
    openai(call(
        ureq::get(&s.url("/v1/fine_tuning/jobs?limit=-1")),
        None,
    ));
    // GET lists stored completions (OpenAI's route); a bad query is a 400 of OpenAI's shape.
    openai(call(
        ureq::get(&s.url("/v1/chat/completions?limit=-1")),
        None,
    ));
    openai(call(ureq::put(&s.url("/v1/chat/completions")), None));
    openai(call(
        ureq::post(&s.url("/v1/chat/completions")).set("Content-Type", "application/json"),
        Some("{not json"),
    ));
    // Ollama's shape under /api.
    let (status, v) = call(ureq::get(&s.url("/api/chat")), None);
    assert_eq!(status, 405, "{v}");
    assert!(v["error"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}
