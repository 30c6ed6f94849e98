//! Shared test helpers: the default model (installed once per target dir) and the binary.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A model store shared by all test processes of this checkout.
pub fn test_home() -> PathBuf {
    let h = repo_root().join("target").join("ferrolm-test-home");
    std::fs::create_dir_all(&h).unwrap();
    h
}

pub fn ferrolm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferrolm"));
    c.env("FERROLM_HOME", test_home());
    c
}

/// The default model, installed with `ferrolm pull` on first use (atomic, so concurrent test
/// processes are safe).
pub fn default_model() -> PathBuf {
    let p = test_home()
        .join("models")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !p.exists() {
        let out = ferrolm().arg("pull").output().unwrap();
        assert!(
            out.status.success(),
            "ferrolm pull failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(p.exists());
    p
}

pub fn golden(name: &str) -> PathBuf {
    repo_root().join("golden").join(name)
}

pub fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "ferrolm failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A running `ferrolm serve`, killed when dropped (also when a test panics).
pub struct Server {
    pub child: Child,
    pub base: String,
    /// The server's data dir (key store, ledger), removed with the server unless given.
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// Start on a free port with a fresh data dir.
    pub fn start(extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let mut s = Server::start_in(&dir, extra);
        s._tmp = Some(tmp);
        s
    }

    /// Start on a free port with `data_dir` (e.g. one where keys were created).
    pub fn start_in(data_dir: &Path, extra: &[&str]) -> Server {
        Server::start_model(&default_model(), data_dir, extra)
    }

    /// Start serving `model` on a free port with `data_dir`.
    pub fn start_model(model: &Path, data_dir: &Path, extra: &[&str]) -> Server {
        Server::start_env(model, data_dir, extra, &[])
    }

    /// [`Server::start_model`] with environment variables set for the server (e.g. the AWS
    /// endpoint and credentials of `--blobs s3://…`).
    pub fn start_env(
        model: &Path,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, String)],
    ) -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = ferrolm()
            .args(["serve", "--threads", "1", "--port", &port.to_string()])
            .arg("--model")
            .arg(model)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Drain stderr as it comes: a server logs a line per request, and a pipe nobody reads
        // fills up (64 KiB) and blocks the server mid-write (a hung test, not a failure).
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        {
            let mut pipe = child.stderr.take().unwrap();
            let log = log.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let base = format!("http://127.0.0.1:{port}");
        let t0 = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(200));
                let err = log.lock().unwrap().clone();
                panic!("ferrolm serve exited early ({status}): {err}");
            }
            if ureq::get(&format!("{base}/health")).call().is_ok() {
                return Server {
                    child,
                    base,
                    data_dir: data_dir.to_owned(),
                    _tmp: None,
                };
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "server never answered"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let (status, body) = match ureq::get(&self.url(path)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
            Err(e) => panic!("GET {path}: {e}"),
        };
        (status, serde_json::from_str(&body).unwrap())
    }

    /// POST a raw body; (status, body text).
    pub fn post_raw(&self, path: &str, body: &str) -> (u16, String) {
        match ureq::post(&self.url(path))
            .set("Content-Type", "application/json")
            .send_string(body)
        {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
            Err(e) => panic!("POST {path}: {e}"),
        }
    }

    /// Upload `body` to `/v1/files` (multipart, purpose=fine-tune) with `key` if given:
    /// (status, body text).
    pub fn upload(&self, body: &str, key: Option<&str>) -> (u16, String) {
        let boundary = "ferrolm-test-boundary";
        let form = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"train.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n{body}\r\n--{boundary}--\r\n"
        );
        let mut r = ureq::post(&self.url("/v1/files")).set(
            "Content-Type",
            &format!("multipart/form-data; boundary={boundary}"),
        );
        if let Some(k) = key {
            r = r.set("Authorization", &format!("Bearer {k}"));
        }
        match r.send_string(&form) {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
            Err(e) => panic!("upload: {e}"),
        }
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
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

/// `ferrolm keys create` in `dir`; returns the secret.
pub fn create_key(dir: &Path, name: &str, extra: &[&str]) -> String {
    let out = ferrolm()
        .args(["keys", "create", "--json", "--name", name, "--data-dir"])
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    json_of(&out)["secret"].as_str().unwrap().to_owned()
}

pub const FIRST: [&str; 10] = [
    "Maria", "Jonas", "Aiko", "Pedro", "Lena", "Omar", "Greta", "Ravi", "Sofia", "Tomas",
];
pub const LAST: [&str; 10] = [
    "Keller", "Novak", "Tanaka", "Silva", "Berg", "Haddad", "Lind", "Patel", "Rossi", "Horvat",
];
pub const CITY: [&str; 10] = [
    "Lyon", "Porto", "Osaka", "Ghent", "Tartu", "Leeds", "Graz", "Turin", "Bergen", "Split",
];

/// `n` preference pairs whose rule a script can check (for "extract name, age and city as
/// JSON", the JSON answer is preferred to a prose one); held-out ones use names and cities training never shows.
pub fn preference_pairs(n: usize, held_out: bool, seed: u64) -> String {
    let mut s = seed;
    let mut next = |m: usize| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) as usize) % m
    };
    let pool = |xs: &'static [&'static str; 10]| if held_out { &xs[7..] } else { &xs[..7] };
    let mut out = String::new();
    for _ in 0..n {
        let name = format!(
            "{} {}",
            pool(&FIRST)[next(pool(&FIRST).len())],
            pool(&LAST)[next(pool(&LAST).len())]
        );
        let city = pool(&CITY)[next(pool(&CITY).len())];
        let age = 18 + next(70);
        let line = serde_json::json!({
            "input": {"messages": [{"role": "user", "content": format!(
                "Extract the person's name, age and city as JSON.\n{name} is {age} years old and lives in {city}."
            )}]},
            "preferred_output": [{"role": "assistant",
                "content": serde_json::json!({"name": name, "age": age, "city": city}).to_string()}],
            "non_preferred_output": [{"role": "assistant", "content": format!(
                "Sure! The person is {name}. They are {age} years old and they live in {city}."
            )}],
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

/// `ferrolm finetune --method METHOD` on preference pairs (LoRA on q, v, o, down, batch 2),
/// with `FERROLM_HOME` (DPO's reference cache) in `out`'s parent, each test's own temp dir, so
/// that what one test or an earlier run cached cannot change what another sees. Returns the
/// JSON summary and stderr.
pub fn finetune_pairs(
    method: &str,
    base: &Path,
    train: &Path,
    out: &Path,
    extra: &[&str],
) -> (Value, String) {
    let home = out.parent().unwrap().join("home");
    let o = ferrolm()
        .env("FERROLM_HOME", &home)
        .args(["finetune", "--method", method, "--model"])
        .arg(base)
        .arg("--train")
        .arg(train)
        .arg("--out")
        .arg(out)
        .args(["--targets", "q,v,o,down", "--batch", "2", "--json"])
        .args(extra)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    (json_of(&o), err)
}

/// The complete lines of a run's `metrics.jsonl` (a line still being written is left out).
pub fn metrics(run: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad metrics line ({e}): {l}")))
        .collect()
}

/// The evaluation lines of a run's `metrics.jsonl`.
pub fn evals(run: &Path) -> Vec<Value> {
    metrics(run)
        .into_iter()
        .filter(|v| v.get("val_loss").is_some())
        .collect()
}
