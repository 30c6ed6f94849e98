//! Shared test helpers: the default model (installed once per target dir) and the binary.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
