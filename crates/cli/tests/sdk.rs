//! The official clients (`openai` and `ollama` for Python) against live servers: one open
//! (loopback, no keys) and one whose data dir has keys. The checks themselves are in
//! `tests/sdk/clients.py`; this test starts the servers, creates the keys and runs it.
//!
//! The clients are installed by `.ci/run` into `target/sdk-venv` (pinned versions); set
//! `FERROLM_SDK_PYTHON` to use another interpreter that has them.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::PathBuf;
use std::process::Command;

fn sdk_python() -> PathBuf {
    if let Some(p) = std::env::var_os("FERROLM_SDK_PYTHON") {
        return p.into();
    }
    let p = repo_root().join("target/sdk-venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run `.ci/run` once (it installs the openai and ollama clients there), or set FERROLM_SDK_PYTHON",
        p.display()
    );
    p
}

/// `ferrolm keys create` in `dir`; returns the secret.
fn create_key(dir: &std::path::Path, name: &str, extra: &[&str]) -> String {
    let out = ferrolm()
        .args(["keys", "create", "--json", "--name", name, "--data-dir"])
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    let v = json_of(&out);
    v["secret"].as_str().unwrap().to_owned()
}

#[test]
fn the_official_openai_and_ollama_clients_work_unchanged() {
    let python = sdk_python();
    let open = Server::start(&[]);
    let keyed_dir = tempfile::tempdir().unwrap();
    let key_a = create_key(keyed_dir.path(), "team-a", &[]);
    let key_b = create_key(keyed_dir.path(), "team-b", &["--rpm", "2"]);
    let keyed = Server::start_in(keyed_dir.path(), &[]);
    let script = repo_root().join("crates/cli/tests/sdk/clients.py");
    let out = Command::new(python)
        .arg(&script)
        .env("FERROLM_BASE", &open.base)
        .env("FERROLM_KEYED", &keyed.base)
        .env("FERROLM_KEY_A", &key_a)
        .env("FERROLM_KEY_B", &key_b)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "client checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The ledger saw every request of the keyed server, and `ferrolm usage` reports it by key.
    drop(keyed);
    let out = ferrolm()
        .args(["usage", "--json", "--by", "key", "--data-dir"])
        .arg(keyed_dir.path())
        .output()
        .unwrap();
    let v = json_of(&out);
    let text = v.to_string();
    assert!(text.contains("team-a") && text.contains("team-b"), "{text}");
}
