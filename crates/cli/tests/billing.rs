//! Every admitted request is billed once, the same way whatever its response format, and a
//! budget or tpm limit holds under concurrency (issue 12, items 2, 7, 8 and 13). The real
//! binary serves the default model; the ledger rows are read straight from `ferrolm.db`.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// One ledger row, as the test compares them.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    endpoint: String,
    status: i64,
    prompt: i64,
    cached: i64,
    completion: i64,
    cost: f64,
    finish: Option<String>,
}

fn rows(data_dir: &Path) -> Vec<Row> {
    let db = rusqlite::Connection::open(data_dir.join("ferrolm.db")).unwrap();
    let mut st = db
        .prepare(
            "SELECT endpoint, status, prompt_tokens, cached_tokens, completion_tokens, cost_usd,
                    finish_reason FROM usage ORDER BY id",
        )
        .unwrap();
    st.query_map([], |r| {
        Ok(Row {
            endpoint: r.get(0)?,
            status: r.get(1)?,
            prompt: r.get(2)?,
            cached: r.get(3)?,
            completion: r.get(4)?,
            cost: r.get(5)?,
            finish: r.get(6)?,
        })
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// Wait (up to 10 s) until the ledger holds `n` rows.
fn wait_rows(data_dir: &Path, n: usize) -> Vec<Row> {
    let t0 = Instant::now();
    loop {
        let r = rows(data_dir);
        if r.len() >= n {
            return r;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the ledger has {} rows, expected {n}: {r:#?}",
            r.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// POST and read the whole body as text (a JSON answer or a stream).
fn post_text(s: &Server, path: &str, key: Option<&str>, body: &Value) -> (u16, String) {
    let mut r = ureq::post(&s.url(path));
    if let Some(k) = key {
        r = r.set("Authorization", &format!("Bearer {k}"));
    }
    match r.send_string(&body.to_string()) {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("POST {path}: {e}"),
    }
}

fn chat(max_tokens: usize) -> Value {
    json!({
        "model": "smollm2-135m-instruct",
        "temperature": 0,
        "seed": 7,
        "max_tokens": max_tokens,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer in one sentence, plainly and briefly."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
    })
}

/// The number `ferrolm_requests_running` reports.
fn running(s: &Server) -> u64 {
    let text = ureq::get(&s.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("ferrolm_requests_running"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn wait_running(s: &Server, want: u64, limit: Duration) -> Duration {
    let t0 = Instant::now();
    while running(s) != want {
        assert!(
            t0.elapsed() < limit,
            "{} requests still running after {limit:?}, expected {want}",
            running(s)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

/// Issue 12 item 13: the pipeline is one, so a request streamed and the same request answered
/// as one JSON object write identical ledger rows (tokens, cached tokens, cost, finish) — for
/// chat, legacy completions and Ollama's chat.
#[test]
fn streamed_and_non_streamed_copies_of_a_request_bill_identical_rows() {
    let s = Server::start(&[]);
    let completion = json!({
        "model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 12,
        "prompt": "Here is a list of the planets of the solar system, in order from the sun outwards, with one short fact about each of them:",
    });
    let ollama = json!({
        "model": "smollm2-135m-instruct",
        "messages": chat(12)["messages"],
        "options": {"temperature": 0, "seed": 7, "num_predict": 12},
    });
    let cases = [
        ("/v1/chat/completions", chat(12)),
        ("/v1/completions", completion),
        ("/api/chat", ollama),
    ];
    let mut n = 0;
    for (path, req) in cases {
        // The first copy fills the prefix cache, so the next two see the same cached prefix.
        let mut json_req = req.clone();
        json_req["stream"] = json!(false);
        let mut stream_req = req.clone();
        stream_req["stream"] = json!(true);
        for r in [&json_req, &stream_req, &json_req] {
            let (status, body) = post_text(&s, path, None, r);
            assert_eq!(status, 200, "{path}: {body}");
        }
        n += 3;
        let all = wait_rows(&s.data_dir, n);
        let (streamed, whole) = (&all[n - 2], &all[n - 1]);
        assert_eq!(streamed, whole, "{path}");
        assert_eq!(whole.endpoint, path);
        assert_eq!(whole.status, 200);
        assert!(whole.completion > 0 && whole.cost > 0.0, "{whole:?}");
        assert!(whole.cached > 0, "{path}: no prefix-cache hit: {whole:?}");
    }
}

/// Issue 12 item 7: a non-streaming request whose client has gone kept generating (6,000
/// tokens, still running 30 s after the client closed). Now it is aborted within about a
/// second, and (item 8) billed for what it computed, with status 499.
#[test]
fn a_non_streaming_request_whose_client_has_gone_keeps_generating() {
    let s = Server::start(&[]);
    let mut req = chat(4000);
    req["ignore_eos"] = json!(true);
    let body = req.to_string();
    let addr = s.base.trim_start_matches("http://").to_owned();
    let mut sock = TcpStream::connect(&addr).unwrap();
    write!(
        sock,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_running(&s, 1, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    drop(sock);
    let took = wait_running(&s, 0, Duration::from_secs(5));
    println!("the engine was idle {took:?} after the client closed its socket");
    assert!(took < Duration::from_millis(1500), "aborted after {took:?}");
    let r = wait_rows(&s.data_dir, 1);
    assert_eq!(r.len(), 1, "{r:#?}");
    assert_eq!(r[0].status, 499, "{r:?}");
    assert_eq!(r[0].finish.as_deref(), Some("cancelled"));
    assert!(
        r[0].completion > 0 && r[0].completion < 4000 && r[0].cost > 0.0,
        "{r:?}"
    );
}

/// Issue 12 item 8: streams the client dropped midway left no ledger row (free tokens). Now
/// the row carries the tokens computed and sent, with status 499.
#[test]
fn a_stream_the_client_drops_midway_is_billed() {
    let s = Server::start(&[]);
    let mut req = chat(4000);
    req["ignore_eos"] = json!(true);
    req["stream"] = json!(true);
    let r = ureq::post(&s.url("/v1/chat/completions"))
        .send_string(&req.to_string())
        .unwrap();
    let mut reader = BufReader::new(r.into_reader());
    let mut chunks = 0;
    let mut line = String::new();
    while chunks < 6 {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended");
        if line.starts_with("data: ") {
            chunks += 1;
        }
    }
    drop(reader);
    wait_running(&s, 0, Duration::from_secs(5));
    let r = wait_rows(&s.data_dir, 1);
    assert_eq!(r[0].status, 499, "{r:?}");
    // Six chunks read: the role chunk and at least five tokens were sent.
    assert!(
        r[0].completion >= 5 && r[0].completion < 4000 && r[0].cost > 0.0,
        "{r:?}"
    );
}

/// Send `n` copies of `req` at once with `key`; the statuses and bodies.
fn concurrently(s: &Server, key: &str, req: &Value, n: usize) -> Vec<(u16, String)> {
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..n)
            .map(|_| sc.spawn(|| post_text(s, "/v1/chat/completions", Some(key), req)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Issue 12 item 2: a key with a budget worth 5.5 requests sent 20 at once: all 20 were served
/// and 363% of the budget spent. Each request now reserves its worst case at admission, so at
/// most 6 run and the overshoot is at most one request.
#[test]
fn budget_overrun_under_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let probe = create_key(dir.path(), "probe", &[]);
    let s = Server::start_in(dir.path(), &[]);
    let mut req = chat(8);
    req["ignore_eos"] = json!(true);
    // One request's cost, with no prefix-cache hit: its worst case (max_tokens all generated).
    let mut first = req.clone();
    first["messages"][0]["content"] = json!("You are terse.");
    let (status, body) = post_text(&s, "/v1/chat/completions", Some(&probe), &first);
    assert_eq!(status, 200, "{body}");
    let one = wait_rows(dir.path(), 1)[0].clone();
    assert!(one.cost > 0.0 && one.cached == 0, "{one:?}");
    // The worst case of the real request (its prompt differs from the probe's).
    let probe_prompt = one.prompt as f64;
    let (status, body) = post_text(&s, "/v1/chat/completions", Some(&probe), &req);
    assert_eq!(status, 200, "{body}");
    let two = wait_rows(dir.path(), 2)[1].clone();
    let worst = one.cost * (two.prompt as f64 + 8.0) / (probe_prompt + 8.0);
    drop(s);

    let budget = 5.5 * worst;
    let spender = create_key(
        dir.path(),
        "spender",
        &["--budget-usd", &format!("{budget:.12}")],
    );
    let s = Server::start_in(dir.path(), &[]);
    let answers = concurrently(&s, &spender, &req, 20);
    let served = answers.iter().filter(|(c, _)| *c == 200).count();
    for (c, b) in &answers {
        assert!(
            *c == 200 || (*c == 429 && b.contains("insufficient_quota")),
            "{c}: {b}"
        );
    }
    let db = rusqlite::Connection::open(dir.path().join("ferrolm.db")).unwrap();
    let spent: f64 = db
        .query_row(
            "SELECT spent_usd FROM api_keys WHERE name = 'spender'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    println!(
        "budget worth 5.5 requests, 20 sent at once: {served} served, {:.0}% of the budget spent",
        100.0 * spent / budget
    );
    assert!(
        (5..=6).contains(&served),
        "{served} of 20 served on a budget worth 5.5"
    );
    assert!(
        spent <= budget + worst * 1.0001,
        "spent ${spent} of a ${budget} budget (one request: ${worst})"
    );
}

/// Issue 12 item 2, tpm: 20 requests at once of a key whose tokens per minute hold 5.5 of them
/// are admitted against their worst case (prompt + max_tokens), so exactly 5 run.
#[test]
fn tpm_overrun_under_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let probe = create_key(dir.path(), "probe", &[]);
    let s = Server::start_in(dir.path(), &[]);
    let req = chat(8);
    let (status, body) = post_text(&s, "/v1/chat/completions", Some(&probe), &req);
    assert_eq!(status, 200, "{body}");
    let per_request = wait_rows(dir.path(), 1)[0].prompt as f64 + 8.0;
    drop(s);
    let tpm = (5.5 * per_request) as u64;
    let limited = create_key(dir.path(), "limited", &["--tpm", &tpm.to_string()]);
    let s = Server::start_in(dir.path(), &[]);
    let answers = concurrently(&s, &limited, &req, 20);
    let served = answers.iter().filter(|(c, _)| *c == 200).count();
    for (c, b) in &answers {
        assert!(
            *c == 200 || (*c == 429 && b.contains("rate_limit_exceeded")),
            "{c}: {b}"
        );
    }
    println!("tpm worth 5.5 requests, 20 sent at once: {served} served");
    assert_eq!(served, 5, "{served} of 20 served within a tpm worth 5.5");
}

/// A tmpfs of `size` mounted at `dir` until dropped. Needs root (CI runs as root); a machine
/// where it cannot be mounted fails the test, loudly.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("running `mount`");
        assert!(
            out.status.success(),
            "the full-disk test needs to mount a tmpfs (run it as root, as CI does): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fill the filesystem of `dir` with one file until it is full; returns its path.
fn fill(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 64 * 1024];
    loop {
        if f.write_all(&block).is_err() {
            break;
        }
    }
    // Whatever fits in a smaller write as well.
    while f.write_all(&block[..512]).is_ok() {}
    let _ = f.sync_all();
    path
}

fn training_jsonl() -> String {
    (0..12)
        .map(|i| {
            format!(
                "{{\"messages\": [{{\"role\": \"user\", \"content\": \"What is {i} plus one?\"}}, {{\"role\": \"assistant\", \"content\": \"{}.\"}}]}}\n",
                i + 1
            )
        })
        .collect()
}

/// Issue 12 item 8: with the data dir's disk full, chats were answered 200 and none reached
/// the ledger. Now, on a full tmpfs: an upload, a fine-tuning job and chats get clear errors
/// (chats a 503: nothing is served unrecorded; a stream's row is held), and once space is
/// freed the held row is written, the ledger continues and the database is intact.
#[test]
fn a_full_disk_refuses_clearly_and_corrupts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let _fs = Tmpfs::mount(dir.path(), "8m");
    let data = dir.path().join("data");
    let s = Server::start_in(&data, &["--ctx", "512"]);
    let (status, body) = s.upload(&training_jsonl(), None);
    assert_eq!(status, 200, "{body}");
    let file_id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = post_text(&s, "/v1/chat/completions", None, &chat(8));
    assert_eq!(status, 200, "{body}");
    assert_eq!(wait_rows(&data, 1).len(), 1);

    let filler = fill(dir.path());
    // An upload: an error that names the disk.
    let (status, body) = s.upload(&training_jsonl(), None);
    assert!(status >= 500, "{status}: {body}");
    assert!(
        body.contains("disk") || body.contains("space"),
        "upload on a full disk: {body}"
    );
    // A fine-tuning job: refused, and it says why.
    let (status, body) = post_text(
        &s,
        "/v1/fine_tuning/jobs",
        None,
        &json!({"model": "smollm2-135m-instruct", "training_file": file_id}),
    );
    assert!(status >= 500, "{status}: {body}");
    assert!(
        body.contains("disk") || body.contains("full"),
        "job on a full disk: {body}"
    );
    // A JSON chat: a 503, not an unrecorded answer.
    let (status, body) = post_text(&s, "/v1/chat/completions", None, &chat(8));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("ledger_unavailable"), "{body}");
    assert!(body.contains("free space"), "{body}");
    // Nothing reached the ledger meanwhile, and nothing was served.
    std::fs::remove_file(&filler).unwrap();
    let (status, body) = post_text(&s, "/v1/chat/completions", None, &chat(8));
    assert_eq!(status, 200, "after space was freed: {body}");
    let r = wait_rows(&data, 2);
    assert_eq!(r.len(), 2, "{r:#?}");
    assert!(r.iter().all(|r| r.status == 200), "{r:#?}");

    // A stream on a full disk: it is served, its row held, then written once space is back;
    // meanwhile new requests are refused.
    let filler = fill(dir.path());
    let mut req = chat(8);
    req["stream"] = json!(true);
    let (status, body) = post_text(&s, "/v1/chat/completions", None, &req);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("[DONE]"), "{body}");
    let (status, body) = post_text(&s, "/v1/chat/completions", None, &chat(8));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("wait to be written"), "{body}");
    std::fs::remove_file(&filler).unwrap();
    let (status, body) = post_text(&s, "/v1/chat/completions", None, &chat(8));
    assert_eq!(status, 200, "{body}");
    let r = wait_rows(&data, 4);
    assert_eq!(r.len(), 4, "{r:#?}");
    drop(s);
    let db = rusqlite::Connection::open(data.join("ferrolm.db")).unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    // The ledger continues after a restart.
    let s = Server::start_in(&data, &["--ctx", "512"]);
    let (status, body) = post_text(&s, "/v1/chat/completions", None, &chat(8));
    assert_eq!(status, 200, "{body}");
    assert_eq!(wait_rows(&data, 5).len(), 5);
}
