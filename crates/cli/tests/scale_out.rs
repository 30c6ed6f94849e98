//! Several `ferrolm serve` replicas as one service on one PostgreSQL (`--store postgres://…`):
//! a real PostgreSQL from Debian's packages (`.ci/run` installs it), started by the test in a
//! temporary directory on a loopback port, and three real replicas on the default model.
//!
//! Targets held here: a key made through the shared store works on every replica; a
//! revocation stops it on another replica at its next request; `--rpm 60` offered 180 requests
//! over three replicas admits at most 61; a budget is overshot by at most one request's cost;
//! the ledger has each request exactly once; a completion stored through one replica is listed
//! by another and exported; a response stored through one replica is read, continued
//! (`previous_response_id`) and deleted through another, and by its key only; PostgreSQL
//! stopped, or frozen, gives a quick 503, and service returns by itself when it is back; a
//! database newer than the binary is refused. And
//! `docs/deploy/nginx.conf`, run by a real nginx from Debian in front of three replicas, keeps
//! each session on one replica and skips a dead one; `/metrics` has the gauges routers read
//! under vLLM's names. With `--blobs s3://…` on a real S3-compatible server (moto's, from
//! PyPI, which `.ci/run` installs in target/s3-venv): a file uploaded through one replica is
//! read through another, deleting it deletes its object; a bad URL or an unreachable endpoint
//! stops `serve` with a clear error; an upload whose blob cannot be written leaves no record;
//! an adapter fine-tuned on one replica is loaded from S3 by another (a `--no-worker` one) on
//! its first request. Fine-tuning jobs are one queue in PostgreSQL: of two worker replicas
//! exactly one runs each job, a pause or cancel through a third replica stops the job where it
//! runs (and a resumed one continues from its checkpoint), a `--no-worker` replica never
//! trains, and a job whose replica is killed (`kill -9`) is taken over by the other, already
//! running, replica once its lease runs out, from its last checkpoint in S3; its model is
//! then served by every replica. Through the store and blob seams: a ledger row written
//! again (its acknowledgement lost) lands once; a worker that stalled past its lease has its
//! checkpoint refused and clobbers none of the new owner's blobs; a blob over the part size
//! goes up as a multipart upload and comes back byte for byte. And `serve --no-worker` on a
//! SQLite store warns at start-up.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ferrolm, Server};
use serde_json::{json, Value};

/// A PostgreSQL server of its own in a temporary directory, on a loopback port; stopped when
/// dropped. Run as `nobody` when the test runs as root (postgres refuses root).
struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

/// The newest PostgreSQL under /usr/lib/postgresql/*/bin (Debian's layout).
fn postgres_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.flatten()
                .filter_map(|d| {
                    let v: u32 = d.file_name().to_str()?.parse().ok()?;
                    let bin = d.path().join("bin");
                    bin.join("initdb").exists().then_some((v, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().map(|(_, b)| b).unwrap_or_else(|| {
        panic!("no PostgreSQL under /usr/lib/postgresql/*/bin: install it (`apt-get install -y postgresql`, as .ci/run does)")
    })
}

/// A temp dir; under root, in /tmp, so that `nobody` can reach it whatever $TMPDIR is.
fn reachable_tempdir() -> tempfile::TempDir {
    if is_root() {
        tempfile::tempdir_in("/tmp").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

impl Postgres {
    fn start() -> Postgres {
        let bin = postgres_bin();
        let dir = reachable_tempdir();
        if is_root() {
            // postgres will not run as root: the cluster belongs to `nobody`.
            let out = Command::new("chown")
                .args(["-R", "nobody"])
                .arg(dir.path())
                .output()
                .unwrap();
            assert!(out.status.success(), "chown: {out:?}");
        }
        let pg = Postgres {
            bin,
            port: TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
            dir,
        };
        let out = pg
            .cmd("initdb")
            .args([
                "--auth=trust",
                "--username=ferrolm",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(pg.data())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.pg_ctl_start();
        pg
    }

    /// A PostgreSQL program, as `nobody` when we are root.
    fn cmd(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        format!("postgres://ferrolm@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl_start(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .cmd("pg_ctl")
            .args(["-w", "-t", "60", "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-o", &opts, "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
    }

    fn pg_ctl_stop(&self) {
        let out = self
            .cmd("pg_ctl")
            .args(["-w", "-m", "fast", "-D"])
            .arg(self.data())
            .arg("stop")
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl stop: {out:?}");
    }

    /// Freeze (SIGSTOP) or thaw (SIGCONT) the postmaster and its backends: a database that
    /// hangs rather than refuses.
    fn signal_all(&self, sig: &str) {
        let pid_file = std::fs::read_to_string(self.data().join("postmaster.pid")).unwrap();
        let master: u32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
        let mut pids = vec![master];
        for d in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = d.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(d.path().join("stat")).unwrap_or_default();
            // pid (comm) state ppid …: the comm may hold spaces, so read after its ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(master) {
                pids.push(pid);
            }
        }
        let out = Command::new("kill")
            .arg(format!("-{sig}"))
            .args(pids.iter().map(u32::to_string))
            .output()
            .unwrap();
        assert!(out.status.success(), "kill -{sig} {pids:?}: {out:?}");
    }

    /// One value from `psql`.
    fn sql(&self, query: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.url(),
                "-c",
            ])
            .arg(query)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {query}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .cmd("pg_ctl")
            .args(["-w", "-m", "immediate", "-D"])
            .arg(self.data())
            .arg("stop")
            .output();
    }
}

fn keys_cmd(url: &str, args: &[&str]) -> std::process::Output {
    ferrolm()
        .arg("keys")
        .args(args)
        .args(["--store", url])
        .output()
        .unwrap()
}

fn create_key(url: &str, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["create", "--json", "--name", name];
    args.extend_from_slice(extra);
    let out = keys_cmd(url, &args);
    assert!(
        out.status.success(),
        "keys create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["secret"].as_str().unwrap().to_owned()
}

/// A one-token chat request with `key`: (status, body).
fn chat(s: &Server, key: &str, max_tokens: u32) -> (u16, Value) {
    let body = json!({
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": max_tokens,
        "temperature": 0,
    });
    let r = ureq::post(&s.url("/v1/chat/completions"))
        .timeout(Duration::from_secs(60))
        .set("Authorization", &format!("Bearer {key}"))
        .send_string(&body.to_string());
    let (status, text) = match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    };
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

/// `method path` on `s` with `key` and an optional JSON body: (status, body).
fn keyed(s: &Server, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let req = ureq::request(method, &s.url(path))
        .timeout(Duration::from_secs(60))
        .set("Authorization", &format!("Bearer {key}"));
    let r = match body {
        Some(b) => req.send_string(&b.to_string()),
        None => req.call(),
    };
    let (status, text) = match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

/// Send `n` requests of `key` over `replicas` (round robin) from `threads` threads; the
/// statuses (with the error code of refusals).
fn offer(
    replicas: &[Arc<Server>],
    key: &str,
    n: usize,
    threads: usize,
) -> Vec<(u16, Option<String>)> {
    let next = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let next = next.clone();
            let replicas: Vec<Arc<Server>> = replicas.to_vec();
            let key = key.to_owned();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        return got;
                    }
                    let (status, v) = chat(&replicas[i % replicas.len()], &key, 1);
                    let code = v["error"]["code"].as_str().map(str::to_owned);
                    got.push((status, code));
                }
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

fn replica(url: &str, data: &Path) -> Arc<Server> {
    Arc::new(Server::start_in(
        data,
        &["--store", url, "--max-queue", "256"],
    ))
}

#[test]
fn three_replicas_share_keys_limits_budgets_and_one_ledger_on_postgres() {
    let pg = Postgres::start();
    let url = pg.url();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // The first key before the replicas start: they serve keyed from the first request.
    let shared = create_key(&url, "shared", &[]);
    let replicas: Vec<Arc<Server>> = dirs.iter().map(|d| replica(&url, d.path())).collect();
    let (a, b, c) = (&replicas[0], &replicas[1], &replicas[2]);

    // A key made in the shared store works on every replica; revoked through the store (as
    // by an operator next to replica C), replica A refuses it at its next request.
    for s in [a, b, c] {
        let (status, v) = chat(s, &shared, 1);
        assert_eq!(status, 200, "{v}");
    }
    let late = create_key(&url, "late", &[]);
    for s in [c, b, a] {
        assert_eq!(
            chat(s, &late, 1).0,
            200,
            "a key made while the replicas run"
        );
    }
    let out = keys_cmd(&url, &["revoke", "late"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, v) = chat(a, &late, 1);
    assert_eq!(status, 401, "revoked, yet served: {v}");
    assert_eq!(v["error"]["type"], "authentication_error");

    // rpm across replicas: 180 requests at a key with --rpm 60, spread over the three.
    let limited = create_key(&url, "limited", &["--rpm", "60"]);
    let t0 = Instant::now();
    let got = offer(&replicas, &limited, 180, 6);
    let took = t0.elapsed();
    let accepted = got.iter().filter(|(s, _)| *s == 200).count();
    let limited_429 = got
        .iter()
        .filter(|(s, c)| *s == 429 && c.as_deref() == Some("rate_limit_exceeded"))
        .count();
    eprintln!("rpm 60 over 3 replicas: {accepted} of 180 accepted, {limited_429} refused (429) in {took:?}");
    assert!(
        took < Duration::from_secs(60),
        "the 180 requests took {took:?}: the window slid, so the count says nothing"
    );
    assert_eq!(accepted + limited_429, 180, "{got:?}");
    assert!((60..=61).contains(&accepted), "{accepted} accepted");

    // A budget worth a few requests, spent from three replicas at once.
    let budget = 0.00002;
    let thrifty = create_key(&url, "thrifty", &["--budget-usd", &budget.to_string()]);
    let got = offer(&replicas, &thrifty, 60, 6);
    let paid = got.iter().filter(|(s, _)| *s == 200).count();
    let over = got
        .iter()
        .filter(|(s, c)| *s == 429 && c.as_deref() == Some("insufficient_quota"))
        .count();
    assert_eq!(paid + over, 60, "{got:?}");
    // Worst-case holds may refuse a burst before the budget is spent; one request at a time
    // then spends it to the end.
    let mut paid = paid;
    for i in 0.. {
        assert!(i < 200, "the budget was never exhausted");
        let (status, v) = chat(&replicas[i % 3], &thrifty, 1);
        if status == 429 {
            assert_eq!(v["error"]["code"], "insufficient_quota", "{v}");
            break;
        }
        assert_eq!(status, 200, "{v}");
        paid += 1;
    }
    let spent: f64 = pg
        .sql("SELECT spent_usd FROM api_keys WHERE name = 'thrifty'")
        .parse()
        .unwrap();
    let max_cost: f64 = pg
        .sql("SELECT MAX(cost_usd) FROM usage u JOIN api_keys k ON k.id = u.key_id WHERE k.name = 'thrifty'")
        .parse()
        .unwrap();
    eprintln!("budget ${budget}: {paid} paid, spent ${spent:.9}, one request ≤ ${max_cost:.9}");
    assert!(
        spent >= budget,
        "refused at {spent}, under the budget {budget}"
    );
    assert!(
        spent <= budget + max_cost + 1e-12,
        "spent {spent} passes the budget {budget} by more than one request ({max_cost})"
    );

    // One ledger, each request once: the rpm key's rows are its 180 answers.
    let rows = |key: &str, status: u16| -> usize {
        pg.sql(&format!(
            "SELECT COUNT(*) FROM usage u JOIN api_keys k ON k.id = u.key_id
             WHERE k.name = '{key}' AND u.status = {status}"
        ))
        .parse()
        .unwrap()
    };
    assert_eq!(rows("limited", 200), accepted);
    assert_eq!(rows("limited", 429), limited_429);
    assert_eq!(rows("thrifty", 200), paid);
    let sum: f64 = pg
        .sql("SELECT SUM(cost_usd) FROM usage u JOIN api_keys k ON k.id = u.key_id WHERE k.name = 'thrifty'")
        .parse()
        .unwrap();
    assert!(
        (sum - spent).abs() < 1e-12,
        "ledger {sum} vs running spend {spent}"
    );
    // `ferrolm usage` reads the same ledger.
    let out = ferrolm()
        .args(["usage", "--by", "key", "--json", "--store", &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let limited_row = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["key"] == "limited")
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(limited_row["requests"], json!(180));

    // A completion stored through replica B is listed by replica C and exported by the CLI.
    let body = json!({
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 2,
        "store": true,
        "metadata": {"task": "pg"},
    });
    let stored: Value = ureq::post(&b.url("/v1/chat/completions"))
        .set("Authorization", &format!("Bearer {shared}"))
        .send_string(&body.to_string())
        .unwrap()
        .into_string()
        .map(|t| serde_json::from_str::<Value>(&t).unwrap())
        .unwrap();
    let listed: Value = ureq::get(&c.url("/v1/chat/completions?metadata[task]=pg"))
        .set("Authorization", &format!("Bearer {shared}"))
        .call()
        .unwrap()
        .into_string()
        .map(|t| serde_json::from_str::<Value>(&t).unwrap())
        .unwrap();
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap_or_else(|| panic!("{listed}"))
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![stored["id"].as_str().unwrap()], "{listed}");
    let out_dir = tempfile::tempdir().unwrap();
    let jsonl = out_dir.path().join("sft.jsonl");
    let out = ferrolm()
        .args([
            "data",
            "export",
            "--stored",
            "--metadata",
            "task=pg",
            "--store",
            &url,
        ])
        .arg("--out")
        .arg(&jsonl)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = std::fs::read_to_string(&jsonl).unwrap();
    assert_eq!(lines.lines().count(), 1, "{lines}");

    // A stored response made on replica A is read, continued and deleted on replica B, and is
    // seen by its key only.
    let first = keyed(
        a,
        "POST",
        "/v1/responses",
        &shared,
        Some(json!({
            "input": "Name a colour.", "max_output_tokens": 2, "temperature": 0, "store": true,
        })),
    );
    assert_eq!(first.0, 200, "{}", first.1);
    let id = first.1["id"].as_str().unwrap().to_owned();
    let got = keyed(b, "GET", &format!("/v1/responses/{id}"), &shared, None);
    assert_eq!(
        got,
        (200, first.1.clone()),
        "replica B's copy of A's response"
    );
    let items = keyed(
        b,
        "GET",
        &format!("/v1/responses/{id}/input_items"),
        &shared,
        None,
    );
    assert_eq!(items.0, 200, "{}", items.1);
    assert_eq!(
        items.1["data"].as_array().map(Vec::len),
        Some(1),
        "{}",
        items.1
    );
    assert_eq!(
        items.1["data"][0]["content"][0]["text"], "Name a colour.",
        "{}",
        items.1
    );
    let second = keyed(
        b,
        "POST",
        "/v1/responses",
        &shared,
        Some(json!({
            "previous_response_id": id, "input": "Another.", "max_output_tokens": 2,
            "temperature": 0,
        })),
    );
    assert_eq!(second.0, 200, "{}", second.1);
    assert_eq!(second.1["previous_response_id"], id.as_str());
    let second_id = second.1["id"].as_str().unwrap();
    let chain = keyed(
        a,
        "GET",
        &format!("/v1/responses/{second_id}/input_items?order=asc"),
        &shared,
        None,
    );
    let chain: Vec<&Value> = chain.1["data"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", chain.1))
        .iter()
        .collect();
    assert_eq!(
        chain.len(),
        3,
        "A's input, A's answer, B's input: {chain:?}"
    );
    assert_eq!(chain[1]["id"], first.1["output"][0]["id"], "{chain:?}");
    let other = create_key(&url, "other", &[]);
    for (method, path) in [
        ("GET", format!("/v1/responses/{id}")),
        ("DELETE", format!("/v1/responses/{id}")),
    ] {
        let (status, v) = keyed(b, method, &path, &other, None);
        assert_eq!(status, 404, "another key's {method} {path}: {v}");
    }
    let (status, v) = keyed(
        a,
        "POST",
        "/v1/responses",
        &other,
        Some(json!({
            "previous_response_id": id, "input": "Another.", "max_output_tokens": 1,
        })),
    );
    assert_eq!(status, 400, "another key continued it: {v}");
    assert_eq!(v["error"]["code"], "previous_response_not_found", "{v}");
    let (status, v) = keyed(b, "DELETE", &format!("/v1/responses/{id}"), &shared, None);
    assert_eq!((status, &v["deleted"]), (200, &json!(true)), "{v}");
    for path in [
        format!("/v1/responses/{id}"),
        format!("/v1/responses/{id}/input_items"),
    ] {
        let (status, v) = keyed(a, "GET", &path, &shared, None);
        assert_eq!(status, 404, "deleted on B, yet A has {path}: {v}");
    }
    assert_eq!(
        pg.sql(&format!(
            "SELECT COUNT(*) FROM response_items WHERE response_id = '{id}'"
        )),
        "0"
    );

    // PostgreSQL stopped: a quick 503 in OpenAI's shape; back by itself when it is.
    pg.pg_ctl_stop();
    for s in [a, b] {
        let t = Instant::now();
        let (status, v) = chat(s, &shared, 1);
        assert_eq!(status, 503, "{v}");
        assert_eq!(v["error"]["type"], "server_error", "{v}");
        assert_eq!(v["error"]["code"], "store_unavailable", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("PostgreSQL"),
            "{v}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(6),
            "took {:?}",
            t.elapsed()
        );
    }
    pg.pg_ctl_start();
    let t = Instant::now();
    for s in [a, b, c] {
        loop {
            let (status, v) = chat(s, &shared, 1);
            if status == 200 {
                break;
            }
            assert_eq!(status, 503, "{v}");
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "not back 30 s after PostgreSQL: {v}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    eprintln!("service back {:?} after PostgreSQL restarted", t.elapsed());

    // PostgreSQL hanging (frozen, connections open): the timeouts answer 503, nothing waits
    // for ever; thawed, service goes on.
    pg.signal_all("STOP");
    let t = Instant::now();
    let (status, v) = chat(c, &shared, 1);
    let hung = t.elapsed();
    pg.signal_all("CONT");
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "store_unavailable", "{v}");
    assert!(
        hung < Duration::from_secs(7),
        "a frozen database held a request {hung:?}"
    );
    eprintln!("frozen PostgreSQL: 503 after {hung:?}");
    let t = Instant::now();
    while chat(c, &shared, 1).0 != 200 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "not back after SIGCONT"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A database migrated by a newer ferrolm is refused, with the fix.
    drop(replicas);
    pg.sql("UPDATE schema_version SET version = 999");
    let out = keys_cmd(&url, &["list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("999") && err.contains("upgrade ferrolm"),
        "{err}"
    );
}

/// `docs/deploy/nginx.conf`, run as it is with its ports rewritten to ours; stopped when
/// dropped.
struct Nginx {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(upstreams: &[u16]) -> Nginx {
        let conf =
            std::fs::read_to_string(common::repo_root().join("docs/deploy/nginx.conf")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut conf = conf.replace(
            "listen 127.0.0.1:8080;",
            &format!("listen 127.0.0.1:{port};"),
        );
        for (i, up) in upstreams.iter().enumerate() {
            let from = format!("server 127.0.0.1:{} ", 8081 + i);
            assert!(conf.contains(&from), "nginx.conf has no `{from}` line");
            conf = conf.replace(&from, &format!("server 127.0.0.1:{up} "));
        }
        let dir = reachable_tempdir();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or_else(|| {
                panic!("no nginx: install it (`apt-get install -y nginx`, as .ci/run does)")
            });
        let mut cmd = if is_root() {
            // Not as root: its workers would switch to `nobody` and lose the temp dirs.
            let out = Command::new("chown")
                .args(["-R", "nobody"])
                .arg(dir.path())
                .output()
                .unwrap();
            assert!(out.status.success());
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--", nginx]);
            c
        } else {
            Command::new(nginx)
        };
        let child = cmd
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "nginx never listened: {}",
                std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx {
            child,
            port,
            _dir: dir,
        }
    }

    /// GET `path` with a session header: (status, the replica that answered).
    fn get(&self, path: &str, session: &str) -> (u16, String) {
        let r = ureq::get(&format!("http://127.0.0.1:{}{path}", self.port))
            .set("X-Session-Id", session)
            .call();
        let r = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{e}"),
        };
        let replica = r.header("x-ferrolm-replica").unwrap_or("").to_owned();
        (r.status(), replica)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to runuser reaches nginx's master (fast shutdown); then make sure.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn port_of(s: &Server) -> u16 {
    s.url("").rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn nginx_keeps_each_session_on_one_replica_and_skips_a_dead_one() {
    let mut replicas: Vec<Option<Server>> = (0..3).map(|_| Some(Server::start(&[]))).collect();
    let ports: Vec<u16> = replicas
        .iter()
        .map(|s| port_of(s.as_ref().unwrap()))
        .collect();
    let nginx = Nginx::start(&ports);
    let sessions: Vec<String> = (0..12).map(|i| format!("session-{i}")).collect();
    let mut home = std::collections::HashMap::new();
    for _ in 0..3 {
        for s in &sessions {
            let (status, replica) = nginx.get("/v1/models", s);
            assert_eq!(status, 200);
            let first = home.entry(s.clone()).or_insert_with(|| replica.clone());
            assert_eq!(*first, replica, "{s} moved between replicas");
        }
    }
    let used: std::collections::HashSet<&String> = home.values().collect();
    assert!(used.len() >= 2, "12 sessions all hashed to {used:?}");

    // The replica of session-0 goes away: its sessions move, the others stay.
    let gone = home["session-0"].clone();
    let i = ports
        .iter()
        .position(|p| gone.ends_with(&format!(":{p}")))
        .unwrap();
    replicas[i] = None;
    for s in &sessions {
        let (status, replica) = nginx.get("/v1/models", s);
        assert_eq!(status, 200, "{s} not served after a replica died");
        assert_ne!(replica.rsplit(", ").next().unwrap(), gone);
        if home[s] != gone {
            assert_eq!(replica, home[s], "{s} moved though its replica is up");
        }
    }

    // The gauges routers read, under vLLM's names.
    let text = ureq::get(&format!("http://127.0.0.1:{}/metrics", nginx.port))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{model_name=\"smollm2-135m-instruct\"}} ")))
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"));
        let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(v >= 0.0 && (!name.contains("perc") || v <= 1.0), "{line}");
    }
}

/// An S3-compatible server of its own: moto's server mode from PyPI (`.ci/run` installs it in
/// target/s3-venv), on a loopback port, in memory; stopped when dropped.
struct S3 {
    child: std::process::Child,
    port: u16,
}

const BUCKET: &str = "ferrolm-test";

impl S3 {
    fn start() -> S3 {
        let exe = common::repo_root().join("target/s3-venv/bin/moto_server");
        assert!(
            exe.exists(),
            "no {}: install moto's S3 server (`python3 -m venv target/s3-venv && target/s3-venv/bin/pip install 'moto[server]==5.2.5'`, as .ci/run does)",
            exe.display()
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&exe)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let mut s3 = S3 { child, port };
        let t0 = Instant::now();
        // The bucket, once the server answers.
        loop {
            match ureq::put(&s3.url(BUCKET)).call() {
                Ok(_) => break,
                Err(e) => {
                    if let Some(status) = s3.child.try_wait().unwrap() {
                        panic!("moto_server exited ({status}) before answering: {e}");
                    }
                    assert!(
                        t0.elapsed() < Duration::from_secs(60),
                        "moto_server never answered on port {port}: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        s3
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    /// The environment a replica reads the endpoint and credentials from.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", self.port),
            ),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// The bucket's keys under `prefix`, read past ferrolm (moto lists a bucket to anyone,
    /// but serves its objects only to their owner).
    fn keys(&self, prefix: &str) -> Vec<String> {
        let xml = ureq::get(&self.url(&format!("{BUCKET}?list-type=2&prefix={prefix}")))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        xml.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split_once("</Key>").map(|(k, _)| k.to_owned()))
            .collect()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn replica_with_blobs(url: &str, data: &Path, blobs: &str, s3: &S3) -> Server {
    Server::start_env(
        &common::default_model(),
        data,
        &["--store", url, "--blobs", blobs],
        &s3.env(),
    )
}

/// GET a path's body as text: (status, text).
fn get_text(s: &Server, path: &str) -> (u16, String) {
    match ureq::get(&s.url(path)).call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("GET {path}: {e}"),
    }
}

/// `ferrolm serve` that must refuse to start: its stderr.
fn serve_refused(args: &[&str], env: &[(&str, String)]) -> String {
    let out = ferrolm()
        .args(["serve", "--threads", "1", "--port", "0", "--model"])
        .arg(common::default_model())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "serve {args:?} started: {err}");
    assert!(!err.contains("panicked"), "serve {args:?} panicked: {err}");
    err
}

const TRAIN_LINE: &str = "{\"messages\": [{\"role\": \"user\", \"content\": \"What is 1 plus one?\"}, {\"role\": \"assistant\", \"content\": \"2.\"}]}\n";

#[test]
fn files_live_in_s3_blobs_that_two_replicas_share() {
    let s3 = S3::start();
    let pg = Postgres::start();
    let url = pg.url();
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let blobs = format!("s3://{BUCKET}/replicas");
    let a = replica_with_blobs(&url, dirs[0].path(), &blobs, &s3);
    let b = replica_with_blobs(&url, dirs[1].path(), &blobs, &s3);

    // Uploaded on A: the bytes are in the bucket, and B reads them.
    let (status, text) = a.upload(TRAIN_LINE, None);
    assert_eq!(status, 200, "{text}");
    let file: Value = serde_json::from_str(&text).unwrap();
    let id = file["id"].as_str().unwrap().to_owned();
    let key = format!("replicas/files/{id}");
    assert_eq!(s3.keys("replicas/files/"), vec![key]);
    assert!(
        !dirs[0].path().join("files").join(&id).exists(),
        "the upload was written to the data dir, not only to S3"
    );
    assert_eq!(
        get_text(&b, &format!("/v1/files/{id}/content")),
        (200, TRAIN_LINE.to_owned())
    );
    let (status, listed) = b.get("/v1/files");
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["data"][0]["id"], id.as_str(), "{listed}");

    // Deleted on B: the record is gone on A, and so is the object.
    let r = ureq::delete(&b.url(&format!("/v1/files/{id}")))
        .call()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get_text(&a, &format!("/v1/files/{id}/content")).0, 404);
    assert_eq!(
        s3.keys("replicas/"),
        Vec::<String>::new(),
        "the deleted file's object is still in S3"
    );

    // A bad --blobs URL, and an endpoint nobody listens on: clear errors at startup.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    for bad in ["gs://bucket/x", "s3://", "s3://Not_A_Bucket"] {
        let err = serve_refused(&["--data-dir", data, "--blobs", bad], &[]);
        assert!(err.contains("s3://BUCKET"), "{bad}: {err}");
    }
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut env = s3.env();
    env[0].1 = format!("http://127.0.0.1:{closed}");
    let t0 = Instant::now();
    let err = serve_refused(&["--data-dir", data, "--blobs", &blobs], &env);
    assert!(
        err.contains("--blobs") && err.contains("AWS_ENDPOINT_URL is reachable"),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());

    // The object store goes away: an upload fails clearly (a 503 that names it) and leaves
    // no record on any replica.
    drop(s3);
    let t0 = Instant::now();
    let (status, text) = a.upload(TRAIN_LINE, None);
    assert_eq!(status, 503, "{text}");
    assert!(
        text.contains("blob_store_failed") && text.contains(&blobs),
        "{text}"
    );
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    let (_, listed) = b.get("/v1/files");
    assert_eq!(listed["data"], json!([]), "{listed}");
    assert_eq!(pg.sql("SELECT count(*) FROM files"), "0");
}

/// A greedy one-line answer of `model` on `s`: (status, body).
fn ask(s: &Server, model: &str) -> (u16, Value) {
    s.post(
        "/v1/chat/completions",
        &json!({
            "model": model,
            "messages": [{"role": "user", "content": "What is 3 plus one?"}],
            "max_tokens": 8,
            "temperature": 0,
        }),
    )
}

#[test]
fn an_adapter_tuned_on_one_replica_is_loaded_from_s3_by_another_on_first_use() {
    let s3 = S3::start();
    let pg = Postgres::start();
    let store = pg.url();
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let blobs = format!("s3://{BUCKET}/tuned");
    // A trains; B, serving only, never does.
    let a = replica_with_blobs(&store, dirs[0].path(), &blobs, &s3);
    let b = Server::start_env(
        &common::default_model(),
        dirs[1].path(),
        &["--store", &store, "--blobs", &blobs, "--no-worker"],
        &s3.env(),
    );

    let lines: String = (0..8)
        .map(|i| format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"What is {i} plus one?\"}}, {{\"role\": \"assistant\", \"content\": \"Bolt says: {}.\"}}]}}\n", i + 1))
        .collect();
    let (status, text) = a.upload(&lines, None);
    assert_eq!(status, 200, "{text}");
    let file: Value = serde_json::from_str(&text).unwrap();
    let (status, job) = a.post(
        "/v1/fine_tuning/jobs",
        &json!({
            "model": "smollm2-135m-instruct",
            "training_file": file["id"],
            "hyperparameters": {"n_epochs": 1, "batch_size": 4},
        }),
    );
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let t0 = Instant::now();
    let job = loop {
        let (_, j) = a.get(&format!("/v1/fine_tuning/jobs/{id}"));
        match j["status"].as_str() {
            Some("succeeded") => break j,
            Some("failed" | "cancelled") => panic!("the job ended: {j}"),
            _ => {}
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "still {j}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let model = job["fine_tuned_model"].as_str().unwrap().to_owned();
    // The run is in the bucket (mirrored before the job succeeded) in the folder of its one
    // claim (epoch 1): A's run directory, file for file (pruned checkpoints deleted), the
    // adapter among them.
    let mut keys = s3.keys(&format!("tuned/fine_tuning/{id}/"));
    keys.sort();
    let run = dirs[0].path().join("fine_tuning").join(&id);
    let mut files = Vec::new();
    let mut stack = vec![run.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(&run).unwrap().to_string_lossy().into_owned();
                files.push(format!("tuned/fine_tuning/{id}/epoch-1/{rel}"));
            }
        }
    }
    files.sort();
    assert_eq!(keys, files);
    for k in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(
            keys.contains(&format!("tuned/fine_tuning/{id}/epoch-1/{k}")),
            "{k} not in {keys:?}"
        );
    }

    // B never saw the job run: it loads the adapter from S3 when it is first asked for it,
    // and answers as A does.
    let fetched = dirs[1]
        .path()
        .join("fine_tuning")
        .join(&id)
        .join("adapter/adapter_model.safetensors");
    assert!(!fetched.exists());
    let (status, on_a) = ask(&a, &model);
    assert_eq!(status, 200, "{on_a}");
    let (status, on_b) = ask(&b, &model);
    assert_eq!(status, 200, "{on_b}");
    assert!(fetched.exists(), "B answered without fetching the adapter");
    assert_eq!(on_b["model"], model.as_str());
    assert_eq!(
        on_a["choices"][0]["message"]["content"],
        on_b["choices"][0]["message"]["content"]
    );
}

/// A job's status and its log's messages, oldest first.
fn job_log(s: &Server, id: &str) -> (String, Vec<String>) {
    let (_, j) = s.get(&format!("/v1/fine_tuning/jobs/{id}"));
    let (_, ev) = s.get(&format!("/v1/fine_tuning/jobs/{id}/events?limit=100"));
    let mut m: Vec<String> = ev["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["message"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    m.reverse();
    (j["status"].as_str().unwrap_or_default().to_owned(), m)
}

/// Chat lines `What is i plus one?` → `i+1.`, `n` of them.
fn sums(n: usize) -> String {
    (0..n)
        .map(|i| format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"What is {i} plus one?\"}}, {{\"role\": \"assistant\", \"content\": \"{}.\"}}]}}\n", i + 1))
        .collect()
}

/// Create a job on `s` from `file`: its id.
fn new_job(s: &Server, file: &str, n_epochs: u32, batch_size: u32) -> String {
    let (status, job) = s.post(
        "/v1/fine_tuning/jobs",
        &json!({
            "model": "smollm2-135m-instruct",
            "training_file": file,
            "hyperparameters": {"n_epochs": n_epochs, "batch_size": batch_size},
        }),
    );
    assert_eq!(status, 200, "{job}");
    job["id"].as_str().unwrap().to_owned()
}

/// Wait until `done` holds of the job's (status, log), at most `limit`; panics on a failed job.
fn wait_job(
    s: &Server,
    id: &str,
    limit: Duration,
    done: impl Fn(&str, &[String]) -> bool,
) -> (String, Vec<String>) {
    let t0 = Instant::now();
    loop {
        let (status, m) = job_log(s, id);
        if done(&status, &m) {
            return (status, m);
        }
        assert!(
            status != "failed" && t0.elapsed() < limit,
            "{id} {status}: {m:#?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The replica (an index into `replicas`) of the worker `owner` (`host:pid:tag`).
fn replica_of(owner: &str, replicas: &[&Server]) -> usize {
    let pid = owner.split(':').nth(1).unwrap_or_default();
    replicas
        .iter()
        .position(|r| r.child.id().to_string() == pid)
        .unwrap_or_else(|| panic!("worker {owner} is none of the replicas"))
}

#[test]
fn fine_tuning_jobs_are_one_queue_that_worker_replicas_share_under_leases() {
    let s3 = S3::start();
    let pg = Postgres::start();
    let url = pg.url();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let blobs = format!("s3://{BUCKET}/queue");
    let start = |dir: &Path, extra: &[&str]| {
        let mut args = vec!["--store", url.as_str(), "--blobs", blobs.as_str()];
        args.extend_from_slice(extra);
        Server::start_env(&common::default_model(), dir, &args, &s3.env())
    };
    // Two workers with 5-second leases, and a serving-only replica that takes the requests.
    let lease = ["--job-lease", "5"];
    let a = start(dirs[0].path(), &lease);
    let b = start(dirs[1].path(), &lease);
    let c = start(dirs[2].path(), &["--no-worker"]);
    let (status, text) = c.upload(&sums(12), None);
    assert_eq!(status, 200, "{text}");
    let file: Value = serde_json::from_str(&text).unwrap();
    let file = file["id"].as_str().unwrap().to_owned();

    // Several one-step jobs at once: each is claimed once, and trained once, by one worker.
    let small: Vec<String> = (0..3).map(|_| new_job(&c, &file, 1, 12)).collect();
    for id in &small {
        wait_job(&c, id, Duration::from_secs(300), |s, _| s == "succeeded");
    }
    let replicas = [&a, &b, &c];
    let lease_owner = |id: &str| {
        pg.sql(&format!(
            "SELECT lease_owner FROM ft_jobs WHERE id = '{id}'"
        ))
    };
    for id in &small {
        let (_, log) = job_log(&c, id);
        let count = |p: &str| log.iter().filter(|m| m.starts_with(p)).count();
        assert_eq!(count("Worker "), 1, "{id}: {log:#?}");
        assert_eq!(count("Fine-tuning job started"), 1, "{id}: {log:#?}");
        assert_eq!(count("The lease of worker"), 0, "{id}: {log:#?}");
        let owner = lease_owner(id);
        assert!(
            log.contains(&format!("Worker {owner} claimed the job")),
            "{owner}: {log:#?}"
        );
        let ran = replica_of(&owner, &replicas);
        assert_ne!(ran, 2, "the --no-worker replica ran {id}");
        // The run directory is on the replica that trained, and on no other.
        for (i, d) in dirs.iter().enumerate() {
            let run = d.path().join("fine_tuning").join(id).join("finetune.json");
            assert_eq!(run.exists(), i == ran, "{}", run.display());
        }
    }

    // A pause and a cancel through the serving-only replica stop the job on the worker that
    // runs it, which hears of them at its next lease renewal; resumed, the job continues from
    // the checkpoint the pause wrote (in S3: whichever worker claims it fetches the run).
    let long = new_job(&c, &file, 50, 1);
    wait_job(&c, &long, Duration::from_secs(120), |_, m| {
        m.iter().any(|m| m.starts_with("Fine-tuning job started"))
    });
    let stopped = |status: &str| {
        let suffix = format!("the job is {status}");
        move |_: &str, m: &[String]| {
            m.iter()
                .any(|m| m.contains("stopped training at step") && m.ends_with(&suffix))
        }
    };
    let (status, v) = c.post(&format!("/v1/fine_tuning/jobs/{long}/pause"), &json!({}));
    assert_eq!((status, v["status"].as_str()), (200, Some("paused")), "{v}");
    wait_job(&c, &long, Duration::from_secs(60), stopped("paused"));
    let (status, v) = c.post(&format!("/v1/fine_tuning/jobs/{long}/resume"), &json!({}));
    assert_eq!(status, 200, "{v}");
    wait_job(&c, &long, Duration::from_secs(120), |_, m| {
        m.iter()
            .any(|m| m.starts_with("Fine-tuning job resumed from the checkpoint at step"))
    });
    let (status, v) = c.post(&format!("/v1/fine_tuning/jobs/{long}/cancel"), &json!({}));
    assert_eq!(
        (status, v["status"].as_str()),
        (200, Some("cancelled")),
        "{v}"
    );
    let (status, log) = wait_job(&c, &long, Duration::from_secs(60), stopped("cancelled"));
    assert_eq!(status, "cancelled", "{log:#?}");

    // The replica that runs a job is killed (SIGKILL) after a checkpoint: the other worker,
    // already running, takes the job over once the lease runs out, from that checkpoint.
    // 2 epochs × 12 examples / batch 4 = 6 steps, a checkpoint every 2.
    let id = new_job(&c, &file, 2, 4);
    wait_job(&c, &id, Duration::from_secs(300), |_, m| {
        m.iter().any(|m| m.starts_with("Checkpoint created"))
    });
    let owner = lease_owner(&id);
    let (mut dead, alive) = if replica_of(&owner, &replicas) == 0 {
        (a, b)
    } else {
        (b, a)
    };
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    let killed = Instant::now();
    let (_, log) = wait_job(&c, &id, Duration::from_secs(300), |s, _| s == "succeeded");
    eprintln!(
        "the killed replica's job succeeded on the other {:?} after the kill",
        killed.elapsed()
    );
    let next = lease_owner(&id);
    assert!(
        log.contains(&format!(
            "The lease of worker {owner} ran out: worker {next} takes the job over"
        )),
        "no takeover by {next}: {log:#?}"
    );
    assert_eq!(
        next.split(':').nth(1),
        Some(alive.child.id().to_string().as_str())
    );
    assert!(
        log.iter()
            .any(|m| m.starts_with("Fine-tuning job resumed from the checkpoint at step")),
        "the job did not resume from the bucket's checkpoint: {log:#?}"
    );

    // The serving-only replica never trained: no job was ever claimed by it, and it holds no
    // run (it fetches one only to serve it, below).
    let owners = pg.sql("SELECT string_agg(DISTINCT lease_owner, ',') FROM ft_jobs");
    assert!(!owners.contains(&format!(":{}:", c.child.id())), "{owners}");
    assert!(!dirs[2].path().join("fine_tuning").join(&id).exists());

    // The fine-tuned model is served by every replica left, the serving-only one too.
    let (_, j) = c.get(&format!("/v1/fine_tuning/jobs/{id}"));
    let model = j["fine_tuned_model"].as_str().unwrap().to_owned();
    let (status, on_alive) = ask(&alive, &model);
    assert_eq!(status, 200, "{on_alive}");
    let (status, on_c) = ask(&c, &model);
    assert_eq!(status, 200, "{on_c}");
    assert_eq!(
        on_alive["choices"][0]["message"]["content"],
        on_c["choices"][0]["message"]["content"]
    );
    drop(dead);
}

/// A ledger row written again through the store seam (its first commit landed, its
/// acknowledgement was lost) lands once on PostgreSQL, for a key without limits (no admission
/// deduplicates it) and for open access; two rows of one request (best_of's generation and its
/// reward scoring) both land; and a schema-9 ledger with repeated request ids migrates to
/// schema 10 with none dropped.
#[test]
fn a_retried_ledger_row_lands_once_on_postgres_and_old_rows_migrate() {
    use ferrolm_accounting::{KeySpec, Store, UsageQuery, UsageRow};
    let pg = Postgres::start();
    let store = Store::open_url(&pg.url().parse().unwrap()).unwrap();
    let (key, _) = store
        .create_key(&KeySpec {
            name: "unlimited".into(),
            ..KeySpec::default()
        })
        .unwrap();
    let row = |key_id: Option<i64>, request_id: &str, cost: f64| UsageRow {
        ts: 1_000,
        request_id: request_id.into(),
        key_id,
        model: "m".into(),
        endpoint: "/v1/chat/completions".into(),
        status: 200,
        prompt_tokens: 10,
        completion_tokens: 5,
        latency_ms: 1.0,
        cost_usd: cost,
        row_key: UsageRow::new_key().unwrap(),
        ..UsageRow::default()
    };
    for key_id in [Some(key.id), None] {
        let r = row(key_id, "retried", 0.5);
        store.record(&r).unwrap();
        store.record(&r).unwrap();
    }
    let generation = row(Some(key.id), "best-of", 0.25);
    let scoring = row(Some(key.id), "best-of", 0.125);
    for r in [&generation, &scoring, &scoring] {
        store.record(r).unwrap();
    }
    assert_eq!(pg.sql("SELECT COUNT(*) FROM usage"), "4");
    assert_eq!(
        pg.sql("SELECT COUNT(*) FROM usage WHERE request_id = 'retried'"),
        "2"
    );
    assert_eq!(store.spent_usd(key.id).unwrap(), 0.875);
    assert_eq!(
        pg.sql(&format!(
            "SELECT SUM(cost_usd) FROM usage WHERE key_id = {}",
            key.id
        )),
        "0.875"
    );
    drop(store);

    // Back to schema 9 (no row keys, no epochs), with a request id repeated, then migrated
    // again.
    pg.sql(
        "DROP INDEX usage_row_key; ALTER TABLE usage DROP COLUMN row_key;
         ALTER TABLE ft_jobs DROP COLUMN epoch; ALTER TABLE ft_checkpoints DROP COLUMN epoch;
         UPDATE schema_version SET version = 9;
         INSERT INTO usage (ts, request_id, model, endpoint, status, prompt_tokens,
            cached_tokens, completion_tokens, latency_ms, cost_usd)
         SELECT ts, request_id, model, endpoint, status, prompt_tokens, cached_tokens,
            completion_tokens, latency_ms, cost_usd FROM usage",
    );
    let store = Store::open_url(&pg.url().parse().unwrap()).unwrap();
    assert_eq!(
        pg.sql("SELECT MAX(version) FROM schema_version"),
        ferrolm_accounting::SCHEMA_VERSION.to_string()
    );
    assert_eq!(
        pg.sql("SELECT COUNT(DISTINCT row_key) FROM usage WHERE row_key IS NOT NULL"),
        "8"
    );
    let total = store.usage(&UsageQuery::default()).unwrap();
    assert_eq!(total[0].requests, 8);
    // And the guard holds on the migrated table.
    let again = row(None, "after", 0.0);
    store.record(&again).unwrap();
    store.record(&again).unwrap();
    assert_eq!(pg.sql("SELECT COUNT(*) FROM usage"), "9");
}

/// The S3 blob store of `s3` for this test process (its endpoint and credentials are read
/// from the environment, as `serve` reads them), with its own cache dir.
fn s3_blobs(s3: &S3, rt: &tokio::runtime::Runtime, cache: &Path) -> ferrolm_server::blobs::Blobs {
    for (k, v) in s3.env() {
        std::env::set_var(k, v);
    }
    let url = format!("s3://{BUCKET}/fenced").parse().unwrap();
    ferrolm_server::blobs::Blobs::open(&url, cache, rt.handle().clone()).unwrap()
}

/// A worker that stalls (not dies) past its lease while another worker claims its job:
/// when it wakes and writes its checkpoint through the store seam, the record is refused
/// (its claim's epoch is no longer the job's) and its blobs went to its own epoch's folder,
/// so the new owner's checkpoint is what a resume reads, byte for byte. Real PostgreSQL and
/// moto's S3.
#[test]
fn a_stalled_workers_checkpoint_is_refused_and_clobbers_nothing_on_postgres_and_s3() {
    use ferrolm_accounting::{JobCheckpoint, JobRecord, Store};
    use ferrolm_server::tuner::{run_blob_key, run_key};
    let (pg, s3) = (Postgres::start(), S3::start());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open_url(&pg.url().parse().unwrap()).unwrap();
    let id = "ftjob-fenced";
    store
        .insert_job(&JobRecord {
            id: id.into(),
            key_id: None,
            created_at: 1,
            status: "queued".into(),
            model: "base".into(),
            training_file: "file-1".into(),
            validation_file: None,
            spec: json!({}),
            fine_tuned_model: None,
            finished_at: None,
            trained_tokens: None,
            error: None,
            epoch: 0,
        })
        .unwrap();
    // Worker A claims with a lease that lapses at once; B takes the job over.
    let a = store
        .claim_job("worker-a", Duration::from_millis(1))
        .unwrap()
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let b = store
        .claim_job("worker-b", Duration::from_secs(600))
        .unwrap()
        .unwrap();
    assert_eq!((a.job.epoch, b.job.epoch), (1, 2));
    assert_eq!(b.taken_from.as_deref(), Some("worker-a"));
    let checkpoint = |step: u64, epoch: i64| JobCheckpoint {
        seq: 0,
        created_at: 1,
        step,
        model: format!("ft:base:{id}:ckpt-step-{step}"),
        metrics: json!({"step": step}),
        epoch,
    };
    // Each worker's run directory (its own replica's cache), with its checkpoint.
    let write_run = |worker: &str, content: &str| {
        let blobs = s3_blobs(&s3, &rt, &tmp.path().join(worker));
        let dir = blobs.local(&run_key(id));
        std::fs::create_dir_all(dir.join("ckpt")).unwrap();
        std::fs::write(dir.join("ckpt/model.safetensors"), content).unwrap();
        std::fs::write(dir.join("finetune.json"), content).unwrap();
        blobs
    };
    // B checkpoints step 4: blob, then record.
    let blobs_b = write_run("b", "B at step 4");
    blobs_b
        .sync_dir(&run_key(id), &run_blob_key(id, b.job.epoch))
        .unwrap();
    assert!(store
        .add_job_checkpoint(id, &checkpoint(4, b.job.epoch), "worker-b")
        .unwrap());
    // A wakes up and checkpoints step 6 under its old claim: its blobs go to its own folder,
    // its record is refused (so its worker stops).
    let blobs_a = write_run("a", "A, stale, at step 6");
    blobs_a
        .sync_dir(&run_key(id), &run_blob_key(id, a.job.epoch))
        .unwrap();
    assert!(!store
        .add_job_checkpoint(id, &checkpoint(6, a.job.epoch), "worker-a")
        .unwrap());
    assert!(!store
        .add_job_checkpoint(id, &checkpoint(6, b.job.epoch), "worker-a")
        .unwrap());
    assert_eq!(
        pg.sql(&format!(
            "SELECT string_agg(step || '@' || epoch, ',' ORDER BY seq) FROM ft_checkpoints WHERE job_id = '{id}'"
        )),
        "4@2"
    );
    // A resume (a third replica) reads the run the newest record names: B's, intact.
    let newest = store.job_checkpoints(id, None, 1).unwrap().items;
    assert_eq!((newest[0].step, newest[0].epoch), (4, 2));
    let blobs_c = s3_blobs(&s3, &rt, &tmp.path().join("c"));
    let run = blobs_c
        .fetch_dir(&run_blob_key(id, newest[0].epoch), &run_key(id))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(run.join("ckpt/model.safetensors")).unwrap(),
        "B at step 4"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("finetune.json")).unwrap(),
        "B at step 4"
    );
}

/// A blob over the part size goes up as an S3 multipart upload (moto's ETag of a multipart
/// object ends in `-<parts>`), streamed from its file, and comes back byte for byte through
/// another replica's cache; a small one is still one PUT.
#[test]
fn a_large_blob_goes_up_in_parts_and_round_trips_through_s3() {
    use ferrolm_server::blobs::MIN_PART_BYTES;
    let s3 = S3::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let up = s3_blobs(&s3, &rt, &tmp.path().join("up")).with_part_bytes(MIN_PART_BYTES);
    // Two full parts and a short last one, of bytes that are not all alike.
    let n = 2 * MIN_PART_BYTES + 12_345;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let bytes: Vec<u8> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let path = tmp.path().join("big.bin");
    std::fs::write(&path, &bytes).unwrap();
    up.wait(up.put_file("files/big", &path)).unwrap();
    up.wait(up.put_file(
        "files/small",
        &tmp.path().join("big.bin").with_file_name("small"),
    ))
    .unwrap_err(); // no such file: an error, nothing written
    std::fs::write(tmp.path().join("small"), b"small").unwrap();
    up.wait(up.put_file("files/small", &tmp.path().join("small")))
        .unwrap();
    let xml = ureq::get(&s3.url(&format!("{BUCKET}?list-type=2&prefix=fenced/files/")))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let etag_of = |key: &str| {
        let at = xml.find(&format!("<Key>{key}</Key>")).unwrap();
        let rest = &xml[at..];
        let tag = &rest[rest.find("<ETag>").unwrap() + 6..rest.find("</ETag>").unwrap()];
        tag.replace("&#34;", "").replace('"', "")
    };
    assert!(etag_of("fenced/files/big").ends_with("-3"), "{xml}");
    assert!(!etag_of("fenced/files/small").contains('-'), "{xml}");
    let down = s3_blobs(&s3, &rt, &tmp.path().join("down"));
    let got = down.fetch_file("files/big").unwrap();
    assert_ne!(got, path);
    assert!(std::fs::read(&got).unwrap() == bytes, "the bytes differ");
    // In-memory uploads over the part size take the same path.
    up.wait(up.put("files/big2", bytes.clone().into())).unwrap();
    let got = down.fetch_file("files/big2").unwrap();
    assert!(std::fs::read(got).unwrap() == bytes, "the bytes differ");
}

/// `serve --no-worker` on a SQLite store says at start-up that its jobs wait for a worker
/// on the same file; without --no-worker it says nothing of the kind.
#[test]
fn no_worker_on_a_sqlite_store_warns_at_start_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    // --kv-memory 0 stops `serve` just after the store is opened: no model is loaded.
    let err = serve_refused(&["--data-dir", dir, "--no-worker", "--kv-memory", "0"], &[]);
    assert!(
        err.contains("warning: --no-worker on the SQLite store")
            && err.contains(
                "stay queued until a `ferrolm serve` without --no-worker runs on the same file"
            ),
        "{err}"
    );
    let err = serve_refused(&["--data-dir", dir, "--kv-memory", "0"], &[]);
    assert!(!err.contains("--no-worker"), "{err}");
}
