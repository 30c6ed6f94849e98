//! `ferrolm train` as a user drives it, on a model small enough to train in milliseconds: a
//! resumed run is step for step the uninterrupted one, SIGTERM stops with a checkpoint that
//! resumes, the run directory is a model for `generate`, `export`, `info` and `plot`, and bad
//! input is refused with the reason, without a panic and without touching an existing run.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A 1-layer, width-32 model on 16-token windows (a step takes well under a millisecond),
/// evaluated on 2 batches every 5 steps unless `extra` says otherwise, then `extra`. One
/// thread, so that runs are bit-for-bit reproducible.
fn tiny<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--layers",
        "1",
        "--width",
        "32",
        "--heads",
        "2",
        "--context",
        "16",
        "--batch",
        "4",
        "--eval-iters",
        "2",
        "--threads",
        "1",
    ];
    if !extra.contains(&"--eval-every") {
        args.extend(["--eval-every", "5"]);
    }
    args.extend(extra);
    args
}

/// The first 30,000 characters of the repository's tinyshakespeare, written into `dir`.
fn corpus(dir: &Path) -> PathBuf {
    let shakespeare = repo_root().join("data/tinyshakespeare.txt");
    let text: String = std::fs::read_to_string(&shakespeare)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (it is part of the repository)",
                shakespeare.display()
            )
        })
        .chars()
        .take(30_000)
        .collect();
    let p = dir.join("corpus.txt");
    std::fs::write(&p, text).unwrap();
    p
}

fn train(out: &Path, args: &[&str]) -> Output {
    ferrolm()
        .arg("train")
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .unwrap()
}

/// A new run from `data` with the char tokenizer and `tiny(args)`; it must succeed.
fn new_run(data: &Path, out: &Path, args: &[&str]) -> Output {
    let out = ferrolm()
        .arg("train")
        .arg("--data")
        .arg(data)
        .args(["--tokenizer", "char", "--out"])
        .arg(out)
        .args(tiny(args))
        .output()
        .unwrap();
    assert_ok(&out);
    out
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "ferrolm failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A non-zero exit, no panic, and a message containing each of `needles`.
fn assert_refused(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "error should mention `{n}`: {err}");
    }
}

/// The JSON summary: the last line of stdout.
fn summary(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.trim_end().lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last stdout line is not JSON ({e}): {stdout}"))
}

fn step_lines(run: &Path) -> Vec<Value> {
    metrics(run)
        .into_iter()
        .filter(|v| v.get("loss").is_some())
        .collect()
}

fn eval_lines(run: &Path) -> Vec<Value> {
    metrics(run)
        .into_iter()
        .filter(|v| v.get("val_loss").is_some())
        .collect()
}

/// Step lines number 0, 1, 2, … in order, `n` of them.
fn assert_steps_are_0_to(lines: &[Value], n: u64) {
    let steps: Vec<u64> = lines.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (0..n).collect::<Vec<_>>());
}

fn latest(run: &Path) -> PathBuf {
    let name = std::fs::read_to_string(run.join("latest")).unwrap();
    run.join("checkpoints").join(name.trim())
}

fn checkpoint_step(dir: &Path) -> u64 {
    let v: Value = serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
    v["train"]["step"].as_u64().unwrap()
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                files.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    files
}

/// The optimisation settings that a resumed run keeps. The decay's default comes from --iters
/// when the run is created (decay = iters), so a 10-step run extended to 20 would otherwise be a
/// different schedule from a 20-step run.
const SCHEDULE: &[&str] = &["--warmup", "5", "--decay-iters", "20"];

#[test]
fn resumed_run_matches_an_uninterrupted_one_step_for_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));

    new_run(&data, &a, &[SCHEDULE, &["--iters", "20"]].concat());
    new_run(&data, &b, &[SCHEDULE, &["--iters", "10"]].concat());
    assert_steps_are_0_to(&step_lines(&b), 10);
    assert_eq!(checkpoint_step(&latest(&b)), 10);
    assert_ok(&train(
        &b,
        &tiny(&[SCHEDULE, &["--resume", "--iters", "20"]].concat()),
    ));

    let (sa, sb) = (step_lines(&a), step_lines(&b));
    assert_steps_are_0_to(&sa, 20);
    assert_steps_are_0_to(&sb, 20);
    for (x, y) in sa.iter().zip(&sb) {
        for key in ["loss", "lr", "grad_norm"] {
            assert_eq!(x[key].as_f64(), y[key].as_f64(), "{key}: {x} vs {y}");
        }
    }
    // Evaluations at 0, 5, 10 (once: before the stop, not again on resume), 15, 20.
    let (ea, eb) = (eval_lines(&a), eval_lines(&b));
    let steps: Vec<u64> = ea.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 5, 10, 15, 20]);
    assert_eq!(ea, eb);

    let (ca, cb) = (latest(&a), latest(&b));
    assert_eq!(ca.file_name().unwrap(), "step-000020");
    assert_eq!(cb.file_name().unwrap(), "step-000020");
    for f in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            std::fs::read(ca.join(f)).unwrap() == std::fs::read(cb.join(f)).unwrap(),
            "{f} differs between the resumed and the uninterrupted run"
        );
    }
}

/// Kills the child if the test fails while it runs.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn sigterm_writes_a_checkpoint_and_resume_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let run = tmp.path().join("run");
    let stderr = std::fs::File::create(tmp.path().join("stderr")).unwrap();
    let child = ferrolm()
        .arg("train")
        .arg("--data")
        .arg(&data)
        .args(["--tokenizer", "char", "--out"])
        .arg(&run)
        .args(tiny(&[
            "--iters",
            "10000000",
            "--eval-every",
            "500",
            "--json",
        ]))
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(Some(child));
    let c = child.0.as_mut().unwrap();
    let stderr = || std::fs::read_to_string(tmp.path().join("stderr")).unwrap();

    let t0 = Instant::now();
    while step_lines(&run).len() < 5 {
        if let Some(status) = c.try_wait().unwrap() {
            panic!("train exited before being stopped ({status}): {}", stderr());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no progress: {}",
            stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let t0 = Instant::now();
    while c.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "still running after SIGTERM: {}",
            stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.0.take().unwrap().wait_with_output().unwrap();
    assert!(out.status.success(), "{}: {}", out.status, stderr());

    let steps = step_lines(&run);
    let n = steps.len() as u64;
    assert!((5..10_000_000).contains(&n), "{n} steps");
    assert_steps_are_0_to(&steps, n);
    let s = summary(&out);
    assert_eq!(s["interrupted"], true, "{s}");
    assert_eq!(s["iters"], n, "{s}");
    let ck = latest(&run);
    assert_eq!(
        ck.file_name().unwrap().to_str().unwrap(),
        format!("step-{n:06}")
    );
    assert_eq!(checkpoint_step(&ck), n);

    let more = (n + 5).to_string();
    let out = train(
        &run,
        &["--resume", "--threads", "1", "--json", "--iters", &more],
    );
    assert_ok(&out);
    let s = summary(&out);
    assert_eq!(
        (s["iters"].as_u64(), &s["interrupted"]),
        (Some(n + 5), &Value::Bool(false))
    );
    assert_steps_are_0_to(&step_lines(&run), n + 5);
    assert_eq!(checkpoint_step(&latest(&run)), n + 5);
}

#[test]
fn trained_run_is_a_model_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let run = tmp.path().join("run");
    new_run(&data, &run, &["--iters", "100", "--eval-every", "50"]);
    // The char vocabulary has only the corpus's characters (others are dropped when encoding).
    let prompt: String = std::fs::read_to_string(&data)
        .unwrap()
        .chars()
        .take(6)
        .collect();

    let generate = |model: &Path| {
        let out = ferrolm()
            .args(["generate", "--json", "--raw", "--prompt", &prompt])
            .args([
                "--max-tokens",
                "8",
                "--seed",
                "7",
                "--threads",
                "1",
                "--model",
            ])
            .arg(model)
            .output()
            .unwrap();
        let v = json_of(&out);
        assert!(!ids(&v["ids"]).is_empty(), "{v}");
        v["text"].as_str().unwrap().to_owned()
    };
    let text = generate(&run);
    assert!(!text.is_empty());
    // The run directory is read as the f32 GGUF that `export --type f32` writes.
    let f32_file = tmp.path().join("f32.gguf");
    let out = ferrolm()
        .arg("export")
        .arg(&run)
        .args(["--type", "f32", "-o"])
        .arg(&f32_file)
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(generate(&f32_file), text);

    let q8 = tmp.path().join("q8.gguf");
    let out = ferrolm()
        .arg("export")
        .arg(&run)
        .args(["--type", "q8_0", "-o"])
        .arg(&q8)
        .output()
        .unwrap();
    assert_ok(&out);
    let out = ferrolm().arg("info").arg(&q8).output().unwrap();
    assert_ok(&out);
    let info = String::from_utf8_lossy(&out.stdout);
    let arch = info.lines().find(|l| l.starts_with("architecture:"));
    assert!(arch.is_some_and(|l| l.contains("llama")), "{info}");
    assert!(info.contains("1 layers, width 32"), "{info}");
    assert!(info.contains("Q8_0"), "{info}");
    generate(&q8);

    // `plot` redraws the curve from metrics.jsonl (remove the one training drew).
    let svg = run.join("loss.svg");
    std::fs::remove_file(&svg).unwrap();
    let out = ferrolm().arg("plot").arg(&run).output().unwrap();
    assert_ok(&out);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.contains("<svg") && text.contains("<polyline"),
        "{text}"
    );
}

#[test]
fn bad_corpora_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let new = |name: &str, bytes: &[u8], args: &[&str]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        ferrolm()
            .arg("train")
            .arg("--data")
            .arg(&p)
            .args(["--tokenizer", "char", "--out"])
            .arg(tmp.path().join(format!("run-{name}")))
            .args(args)
            .output()
            .unwrap()
    };
    let args = &tiny(&["--iters", "5"]);
    assert_refused(&new("empty.txt", b"", args), &["empty.txt", "is empty"]);
    assert_refused(
        &new("latin1.txt", b"abc\xff\xfe def", args),
        &["latin1.txt", "not UTF-8", "offset 3"],
    );
    assert_refused(
        &new(
            "short.txt",
            b"0123456789",
            &[
                "--layers",
                "1",
                "--width",
                "32",
                "--heads",
                "2",
                "--context",
                "64",
            ],
        ),
        &["one training window needs 65", "context"],
    );
}

#[test]
fn bad_settings_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let attempt = |args: &[&str]| {
        ferrolm()
            .arg("train")
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(tmp.path().join("run"))
            .args(["--iters", "5", "--threads", "1"])
            .args(args)
            .output()
            .unwrap()
    };
    let char_tok = ["--tokenizer", "char"];
    assert_refused(
        &attempt(&[&char_tok[..], &["--width", "32", "--heads", "0"]].concat()),
        &["n_heads must be at least 1"],
    );
    assert_refused(
        &attempt(&[&char_tok[..], &["--width", "30", "--heads", "4"]].concat()),
        &["30", "not divisible", "4"],
    );
    let toml = tmp.path().join("bad.toml");
    std::fs::write(&toml, "[model]\nlayrs = 2\n").unwrap();
    assert_refused(
        &attempt(&[&char_tok[..], &["--config", toml.to_str().unwrap()]].concat()),
        &["bad.toml", "unknown field", "layrs"],
    );
    assert_refused(
        &attempt(&["--tokenizer", "chars"]),
        &["chars", "Accepted", "bpe:"],
    );
    assert!(
        !tmp.path().join("run/config.json").exists(),
        "a refused run wrote a config"
    );
}

#[test]
fn resume_without_a_run_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_refused(
        &train(&empty, &["--resume", "--iters", "5"]),
        &["no training run to resume", "drop --resume"],
    );
}

#[test]
fn an_existing_run_is_left_untouched_by_refused_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let run = tmp.path().join("run");
    new_run(&data, &run, &["--iters", "10"]);
    let before = snapshot(&run);
    assert!(before.keys().any(|p| p.ends_with("model.safetensors")));

    let out = train(
        &run,
        &[
            "--resume",
            "--width",
            "64",
            "--iters",
            "20",
            "--threads",
            "1",
        ],
    );
    assert_refused(&out, &["another model config", "width 32", "width 64"]);
    assert!(snapshot(&run) == before, "a refused resume changed the run");

    let out = ferrolm()
        .arg("train")
        .arg("--data")
        .arg(&data)
        .args(["--tokenizer", "char", "--out"])
        .arg(&run)
        .args(tiny(&["--iters", "20"]))
        .output()
        .unwrap();
    assert_refused(&out, &["already holds a training run", "--resume"]);
    assert!(
        snapshot(&run) == before,
        "a refused new run changed the run"
    );
}

/// Regression: model flags given with --resume were resolved over the defaults (4 layers,
/// 4 heads, context 64), so `--resume --width 32` on a 1-layer width-32 run was refused as
/// "another model config".
#[test]
fn resume_accepts_model_flags_that_match_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let run = tmp.path().join("run");
    new_run(&data, &run, &["--iters", "5"]);
    let out = train(
        &run,
        &[
            "--resume",
            "--width",
            "32",
            "--iters",
            "8",
            "--threads",
            "1",
        ],
    );
    assert_ok(&out);
    assert_steps_are_0_to(&step_lines(&run), 8);
}

/// Regression: `--iters 30 --warmup 100` silently clamped warmup to 30, and the same command
/// with `--iters 60 --resume` was then refused ("warmup was 30 in this run … given 100"). The
/// warm-up is not clamped (nanoGPT warms up over `warmup` steps, past the end if need be), and a
/// resumed run accepts the flags that made it.
#[test]
fn resume_accepts_the_warmup_flag_that_made_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let run = tmp.path().join("run");
    let flags = ["--warmup", "100", "--lr", "1e-3"];
    new_run(&data, &run, &[&flags[..], &["--iters", "30"]].concat());
    assert_ok(&train(
        &run,
        &tiny(&[&flags[..], &["--resume", "--iters", "60"]].concat()),
    ));
    let steps = step_lines(&run);
    assert_steps_are_0_to(&steps, 60);
    // Still warming up at step 59: lr · (it + 1) / (warmup + 1), unclamped.
    for v in &steps {
        let it = v["step"].as_f64().unwrap();
        let want = 1e-3 * (it + 1.0) / 101.0;
        let got = v["lr"].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-9,
            "step {it}: lr {got}, want {want}"
        );
    }
}

#[test]
fn prepared_data_dir_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let prepared = tmp.path().join("prepared");
    let out = ferrolm()
        .arg("prepare")
        .arg("--data")
        .arg(&data)
        .args(["--tokenizer", "bpe:300", "--out"])
        .arg(&prepared)
        .output()
        .unwrap();
    assert_ok(&out);

    let run = tmp.path().join("run");
    let out = ferrolm()
        .arg("train")
        .arg("--data")
        .arg(&prepared)
        .arg("--out")
        .arg(&run)
        .args(tiny(&["--iters", "5", "--json"]))
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(summary(&out)["iters"], 5);
    assert_steps_are_0_to(&step_lines(&run), 5);
    let config: Value =
        serde_json::from_slice(&std::fs::read(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model"]["vocab_size"], 300);
    for (from, to) in [
        ("tokenizer.gguf", "tokenizer.gguf"),
        ("train.bin", "data/train.bin"),
        ("val.bin", "data/val.bin"),
    ] {
        assert!(
            std::fs::read(prepared.join(from)).unwrap() == std::fs::read(run.join(to)).unwrap(),
            "{to} is not the prepared {from}"
        );
    }
}

#[test]
fn json_summary_is_the_last_stdout_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let run = tmp.path().join("run");
    let out = new_run(&data, &run, &["--iters", "7", "--json"]);
    let s = summary(&out);
    let mut keys: Vec<&str> = s.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "interrupted",
            "iters",
            "ms_per_iter",
            "params",
            "train_loss",
            "val_loss"
        ]
    );
    assert_eq!(s["iters"], 7);
    assert_eq!(s["interrupted"], false);
    assert!(s["params"].as_u64().is_some_and(|p| p > 0), "{s}");
    assert!(s["ms_per_iter"].as_f64().is_some_and(|m| m > 0.0), "{s}");
    // The losses are the final evaluation's (at step 7: the last step is always evaluated).
    let last_eval = eval_lines(&run).pop().unwrap();
    assert_eq!(last_eval["step"], 7);
    for key in ["train_loss", "val_loss"] {
        let v = s[key].as_f64().unwrap();
        assert!(v.is_finite() && v > 0.0, "{key} {v}");
        assert_eq!(s[key].as_f64(), last_eval[key].as_f64(), "{key}");
    }
}

/// Regression: a diverging run (absurd learning rate, no clipping) stops with the reason and
/// writes no checkpoint of its NaN weights — `latest` still points at a checkpoint from before,
/// whose weights are finite (the optimizer never applied the bad step).
#[test]
fn a_diverging_run_stops_without_checkpointing_nan_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let run = dir.path().join("run");
    let out = ferrolm()
        .arg("train")
        .arg("--data")
        .arg(&data)
        .args(["--tokenizer", "char", "--out"])
        .arg(&run)
        .args(tiny(&[
            "--lr",
            "1e6",
            "--warmup",
            "0",
            "--grad-clip",
            "0",
            "--iters",
            "200",
            "--eval-every",
            "2",
        ]))
        .output()
        .unwrap();
    assert_refused(&out, &["the loss is", "diverged"]);
    let ck = latest(&run);
    let failed_at = step_lines(&run).len() as u64;
    assert!(
        checkpoint_step(&ck) <= failed_at,
        "a checkpoint after the failure"
    );
    let bytes = std::fs::read(ck.join("model.safetensors")).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let data = &bytes[8 + header..];
    assert!(
        data.chunks_exact(4)
            .all(|b| f32::from_le_bytes(b.try_into().unwrap()).is_finite()),
        "the latest checkpoint holds non-finite weights"
    );
}

/// `--tokenizer MODEL.gguf` reuses the default model's vocabulary and chat template exactly
/// (it used to be a unit test that skipped itself when the model was not installed).
#[test]
fn model_vocab_of_the_default_model_is_reused_exactly() {
    use ferrolm_train::tokenize::{build, from_metadata, TokenizerChoice};
    let path = default_model();
    let g = ferrolm_gguf::GgufFile::open(&path).unwrap();
    let original = ferrolm_tokenizer::Tokenizer::from_gguf(&g).unwrap();
    let meta = build(&TokenizerChoice::Model(path), "").unwrap();
    let tok = from_metadata(&meta).unwrap();
    let text = "Hello, world! 12345 <|im_start|>user\nWhat's up?";
    assert_eq!(tok.vocab_size(), original.vocab_size());
    for special in [false, true] {
        assert_eq!(
            tok.encode(text, special).unwrap(),
            original.encode(text, special).unwrap()
        );
    }
    let t1 = ferrolm_tokenizer::chat::ChatTemplate::from_gguf(&g, &original).unwrap();
    let mut w = ferrolm_gguf::writer::GgufWriter::new();
    for (k, v) in &meta {
        w.meta(k, v.clone());
    }
    let g2 = ferrolm_gguf::GgufFile::from_bytes("copy", w.to_bytes()).unwrap();
    let t2 = ferrolm_tokenizer::chat::ChatTemplate::from_gguf(&g2, &tok).unwrap();
    assert_eq!(t1.source, t2.source);
}
