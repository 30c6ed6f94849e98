//! The web UI end to end in a real browser: Debian's `chromium`, driven by `playwright-core`
//! (`tests/ui/ui.mjs`), against live servers: sign-in (a wrong key, then the right one), a chat
//! reply that streams in with its usage, stop, regenerate, a huge paste's 400, the usage page,
//! the sanitiser (a stored reply with `<script>` and `<img onerror>`), a bad upload line's
//! number, a tiny fine-tuning job's loss chart, the server page and its keys (an admin key
//! creates one, which signs in but is refused the keys, then revokes it, after which it fails
//! sign-in), a keyless loopback server, a ranking round's preference pair (read back from the
//! data dir) and the DPO job started from it (its loss and pair-accuracy charts), and a server
//! stalled (SIGSTOP), then killed, mid-reply.
//!
//! `.ci/run` installs Chromium (apt) and `playwright-core` (pinned, into `target/ui-node`);
//! `FERROLM_CHROMIUM` / `FERROLM_UI_NODE_DIR` point elsewhere. Neither missing is a skip: the
//! test fails and says how to install them. `FERROLM_UI_SHOTS=DIR` saves a screenshot of each
//! page (the README's are made with `FERROLM_UI_SHOTS=docs/ui`).
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_web_ui_signs_in_chats_reports_usage_and_fine_tunes_in_chromium() {
    let chromium = std::env::var_os("FERROLM_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        chromium.exists(),
        "{} is missing: install Debian's chromium (`apt-get install -y chromium`, as `.ci/run` does), or set FERROLM_CHROMIUM",
        chromium.display()
    );
    let node_dir = std::env::var_os("FERROLM_UI_NODE_DIR")
        .map_or_else(|| repo_root().join("target/ui-node"), PathBuf::from);
    assert!(
        node_dir.join("node_modules/playwright-core").exists(),
        "{} lacks playwright-core: run `.ci/run` once (it installs it there), or set FERROLM_UI_NODE_DIR",
        node_dir.display()
    );
    // ES modules resolve packages next to the script: run a copy inside the install dir.
    let script = node_dir.join("ui.mjs");
    std::fs::copy(repo_root().join("crates/cli/tests/ui/ui.mjs"), &script).unwrap();

    let args = ["--ctx", "1024", "--train-threads", "2"];
    let keyed_dir = tempfile::tempdir().unwrap();
    let key = create_key(keyed_dir.path(), "ui", &["--admin"]);
    let keyed = Server::start_in(keyed_dir.path(), &args);
    let open = Server::start(&args);
    let doomed = Server::start(&args);
    let mut cmd = Command::new("node");
    cmd.arg(&script)
        .env("FERROLM_KEYED", &keyed.base)
        .env("FERROLM_KEY", &key)
        .env("FERROLM_OPEN", &open.base)
        .env("FERROLM_DOOMED", &doomed.base)
        .env("FERROLM_DOOMED_PID", doomed.child.id().to_string())
        .env("FERROLM_CHROMIUM", &chromium);
    if let Some(d) = std::env::var_os("FERROLM_UI_SHOTS") {
        cmd.env("FERROLM_UI_SHOTS", repo_root().join(d));
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "web UI checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The ranking round's pair, in OpenAI's DPO format, in the open server's data dir.
    let path = open.data_dir.join("preferences/open.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    let p = &lines[0];
    assert_eq!(
        p["input"]["messages"][0]["content"],
        "Name a colour and say why you like it."
    );
    let (good, worse) = (
        &p["preferred_output"][0]["content"],
        &p["non_preferred_output"][0]["content"],
    );
    assert!(
        good.is_string() && worse.is_string() && good != worse,
        "{p}"
    );
}
