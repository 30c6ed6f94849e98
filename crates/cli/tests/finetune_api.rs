//! OpenAI's files and fine-tuning jobs API on `ferrolm serve`: the official `openai` Python
//! client uploads, fine-tunes, follows events, chats with the result and cancels a job, with a
//! second key that must see none of it (`tests/sdk/finetune.py`); and a server killed with
//! SIGKILL mid-job resumes the job from its last checkpoint when it starts again.
//!
//! The client is the pinned one `.ci/run` installs into `target/sdk-venv`
//! (`FERROLM_SDK_PYTHON` points elsewhere).
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

fn sdk_python() -> PathBuf {
    if let Some(p) = std::env::var_os("FERROLM_SDK_PYTHON") {
        return p.into();
    }
    let p = repo_root().join("target/sdk-venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run `.ci/run` once (it installs the openai client there), or set FERROLM_SDK_PYTHON",
        p.display()
    );
    p
}

#[test]
fn the_openai_sdk_uploads_fine_tunes_chats_and_cancels_per_key() {
    let python = sdk_python();
    let dir = tempfile::tempdir().unwrap();
    let key_a = create_key(dir.path(), "tuner-a", &[]);
    let key_b = create_key(dir.path(), "tuner-b", &[]);
    let server = Server::start_in(dir.path(), &["--ctx", "1024", "--train-threads", "2"]);
    let out = Command::new(python)
        .arg(repo_root().join("crates/cli/tests/sdk/finetune.py"))
        .env("FERROLM_KEYED", &server.base)
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
}

/// Twelve one-line conversations.
fn training_jsonl() -> String {
    (0..12)
        .map(|i| {
            format!(
                "{{\"messages\": [{{\"role\": \"user\", \"content\": \"What is {i} plus one?\"}}, {{\"role\": \"assistant\", \"content\": \"Bolt says: {}.\"}}]}}\n",
                i + 1
            )
        })
        .collect()
}

fn messages(s: &Server, job: &str) -> Vec<String> {
    let (status, v) = s.get(&format!("/v1/fine_tuning/jobs/{job}/events?limit=100"));
    assert_eq!(status, 200, "{v}");
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect()
}

/// Poll until `done` holds for the job's (status, event messages), or fail after `limit`.
fn wait(s: &Server, job: &str, limit: Duration, done: impl Fn(&str, &[String]) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let (_, j) = s.get(&format!("/v1/fine_tuning/jobs/{job}"));
        let status = j["status"].as_str().unwrap_or_default().to_owned();
        let m = messages(s, job);
        if done(&status, &m) {
            return j;
        }
        assert!(
            status != "failed" && t0.elapsed() < limit,
            "job {job} is {status} after {:?}: {j}\n{m:#?}",
            t0.elapsed()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_killed_server_resumes_its_job_from_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--ctx", "1024", "--train-threads", "2"];
    let mut server = Server::start_in(dir.path(), &args);
    let (status, text) = server.upload(&training_jsonl(), None);
    assert_eq!(status, 200, "{text}");
    let file: Value = serde_json::from_str(&text).unwrap();
    let file_id = file["id"].as_str().unwrap();
    // 2 epochs × 12 examples / batch 4 = 6 steps, a checkpoint every 2.
    let (status, job) = server.post(
        "/v1/fine_tuning/jobs",
        &serde_json::json!({
            "model": "smollm2-135m-instruct",
            "training_file": file_id,
            "hyperparameters": {"n_epochs": 2, "batch_size": 4},
        }),
    );
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    wait(&server, &id, Duration::from_secs(120), |_, m| {
        m.iter().any(|m| m.starts_with("Checkpoint created"))
    });
    // SIGKILL: no chance to write anything more.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    assert!(checkpoints_on_disk(&dir) > 0);
    let server = Server::start_in(dir.path(), &args);
    let done = wait(&server, &id, Duration::from_secs(120), |status, _| {
        status == "succeeded"
    });
    let m = messages(&server, &id);
    assert!(
        m.iter().any(|m| m.contains("queued again")),
        "no restart event: {m:#?}"
    );
    assert!(
        m.iter()
            .any(|m| m.starts_with("Fine-tuning job resumed from the checkpoint at step")),
        "the job did not resume from its checkpoint: {m:#?}"
    );
    let ft = done["fine_tuned_model"].as_str().unwrap();
    let (_, models) = server.get("/v1/models");
    assert!(models.to_string().contains(ft), "{models}");
    let (status, r) = server.post(
        "/v1/chat/completions",
        &serde_json::json!({"model": ft, "messages": [{"role": "user", "content": "What is 2 plus one?"}], "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(status, 200, "{r}");
    // A second restart serves the succeeded job's model again.
    drop(server);
    let server = Server::start_in(dir.path(), &args);
    let (_, models) = server.get("/v1/models");
    assert!(models.to_string().contains(ft), "{models}");
}

/// The checkpoints the killed run left in its run directory.
fn checkpoints_on_disk(dir: &tempfile::TempDir) -> usize {
    let runs = dir.path().join("fine_tuning");
    std::fs::read_dir(&runs)
        .unwrap()
        .flatten()
        .map(|run| std::fs::read_dir(run.path().join("checkpoints")).map_or(0, |c| c.count()))
        .sum()
}
