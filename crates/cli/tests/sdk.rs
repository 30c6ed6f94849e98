//! The official clients against live servers: `openai`, `ollama` and LangChain's `ChatOpenAI`
//! for Python (`tests/sdk/clients.py`, against one open server and one whose data dir has keys),
//! and `openai` and the Vercel AI SDK for Node (`tests/sdk/clients.mjs`: its OpenAI-compatible
//! provider on chat completions, its OpenAI provider on the Responses API), and the `openai`
//! SDK's stored chat completions (`scripts/stored_completions_sdk.py`). These tests start the
//! servers, create the keys and run the scripts.
//!
//! The clients are installed by `.ci/run` into `target/sdk-venv` and `target/sdk-node` (pinned
//! versions); `FERROLM_SDK_PYTHON` / `FERROLM_SDK_NODE_DIR` point elsewhere.
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

/// Print a client script's report (shown with --nocapture) and fail with it if any check failed.
fn assert_checks_passed(out: &std::process::Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "client checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    assert_checks_passed(&out);
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

#[test]
fn the_node_openai_sdk_and_the_vercel_ai_sdk_work_unchanged() {
    let node_dir = std::env::var_os("FERROLM_SDK_NODE_DIR")
        .map_or_else(|| repo_root().join("target/sdk-node"), PathBuf::from);
    assert!(
        node_dir.join("node_modules/ai").exists() && node_dir.join("node_modules/@ai-sdk/openai").exists(),
        "{} lacks the Node clients: run `.ci/run` once (it installs openai, ai, @ai-sdk/openai-compatible and @ai-sdk/openai there), or set FERROLM_SDK_NODE_DIR",
        node_dir.display()
    );
    // ES modules resolve packages next to the script: run a copy inside the install dir.
    let script = node_dir.join("clients.mjs");
    std::fs::copy(
        repo_root().join("crates/cli/tests/sdk/clients.mjs"),
        &script,
    )
    .unwrap();
    let open = Server::start(&[]);
    let out = Command::new("node")
        .arg(&script)
        .env("FERROLM_BASE", &open.base)
        .env("AI_SDK_LOG_WARNINGS", "false")
        .output()
        .unwrap();
    assert_checks_passed(&out);
}

/// `scripts/stored_completions_sdk.py`: the `openai` SDK's stored-completion calls
/// (`create(store=True, metadata=...)`, `list`, `retrieve`, `update`, `delete`, `messages.list`)
/// unchanged, against a server with two keys.
#[test]
fn the_openai_sdk_stores_lists_updates_and_deletes_chat_completions_per_key() {
    let python = sdk_python();
    let dir = tempfile::tempdir().unwrap();
    let key_a = create_key(dir.path(), "team-a", &[]);
    let key_b = create_key(dir.path(), "team-b", &[]);
    let s = Server::start_in(dir.path(), &[]);
    let out = Command::new(python)
        .arg(repo_root().join("scripts/stored_completions_sdk.py"))
        .env("FERROLM_BASE", &s.base)
        .env("FERROLM_KEY_A", &key_a)
        .env("FERROLM_KEY_B", &key_b)
        .output()
        .unwrap();
    assert_checks_passed(&out);
}
