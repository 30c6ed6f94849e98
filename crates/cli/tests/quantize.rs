//! `ferrolm quantize` and `ferrolm eval kld`, run as a user runs them.
//!
//! The golden `golden/quantize_llamacpp.json` holds, for every type ferrolm writes, each
//! tensor's type and sha256 as llama.cpp's `llama-quantize` wrote them from the same f32
//! source (`scripts/quantize_reference.py`), with and without an importance matrix.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{default_model, ferrolm, golden, json_of};
use ferrolm_gguf::GgufFile;
use sha2::{Digest, Sha256};

fn quantize(args: &[&str]) -> std::process::Output {
    ferrolm().arg("quantize").args(args).output().unwrap()
}

fn ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "ferrolm quantize failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The default model dequantized to f32 (lossless: every Q4_1 value is exactly an f32), made
/// once per test process and shared by its tests: it is 538 MB, and CI machines can be short of
/// disk (one such run failed with ENOSPC while two tests each held a copy).
fn f32_source() -> &'static Path {
    static SOURCE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    SOURCE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("quantize-tests");
        std::fs::create_dir_all(&dir).unwrap();
        let f32 = dir.join("f32.gguf");
        let m = default_model();
        ok(&quantize(&[
            m.to_str().unwrap(),
            f32.to_str().unwrap(),
            "--type",
            "f32",
            "--no-receipt",
        ]));
        f32
    })
}

/// Each tensor as "TYPE:first 16 hex digits of sha256", as the golden file writes them.
fn tensor_hashes(path: &Path) -> BTreeMap<String, String> {
    let g = GgufFile::open(path).unwrap();
    g.tensors
        .iter()
        .map(|t| {
            let h = Sha256::digest(g.tensor_bytes(t).unwrap());
            let hex: String = h.iter().take(8).map(|b| format!("{b:02x}")).collect();
            let ty = format!("{:?}", t.ggml_type)
                .to_uppercase()
                .replace("2K", "2_K")
                .replace("3K", "3_K")
                .replace("4K", "4_K")
                .replace("5K", "5_K")
                .replace("6K", "6_K");
            (t.name.clone(), format!("{ty}:{hex}"))
        })
        .collect()
}

/// The importance matrix `scripts/quantize_reference.py` gives llama-quantize: for every 2-D
/// `blk.*` weight with C columns, column j weighs 0.1 + ((37·j + 11·len(name)) mod 101) / 25,
/// in llama.cpp's GGUF imatrix format with one chunk.
fn synthetic_imatrix(model: &Path, out: &Path) {
    use ferrolm_gguf::{writer::GgufWriter, Value};
    let g = GgufFile::open(model).unwrap();
    let mut w = GgufWriter::new();
    let mut names: Vec<_> = g
        .tensors
        .iter()
        .filter(|t| t.name.starts_with("blk.") && t.dims.len() == 2 && t.name.ends_with(".weight"))
        .collect();
    names.sort_by(|a, b| a.name.cmp(&b.name));
    for t in names {
        let cols = t.dims[0] as usize;
        let v: Vec<f32> = (0..cols)
            .map(|j| (0.1 + ((37 * j + 11 * t.name.len()) % 101) as f64 / 25.0) as f32)
            .collect();
        w.tensor_f32(&format!("{}.in_sum2", t.name), &[cols as u64], &v);
        w.tensor_f32(&format!("{}.counts", t.name), &[1], &[1.0]);
    }
    w.meta("general.architecture", Value::String("imatrix".into()));
    w.meta(
        "imatrix.datasets",
        Value::Array(vec![Value::String("synthetic".into())]),
    );
    w.meta("imatrix.chunk_count", Value::U32(1));
    w.meta("imatrix.chunk_size", Value::U32(512));
    std::fs::write(out, w.to_bytes()).unwrap();
}

#[test]
fn every_type_is_bit_identical_to_llama_quantize_from_the_same_f32_source() {
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("quantize_llamacpp.json")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f32 = f32_source();
    let sha: String = Sha256::digest(std::fs::read(f32).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        sha, want["source_sha256"],
        "the f32 source differs from the one the golden was recorded from"
    );
    let cases = want["cases"].as_object().unwrap();
    assert!(cases.len() >= 26, "golden has {} cases", cases.len());
    let imatrix = dir.path().join("imatrix.gguf");
    synthetic_imatrix(f32, &imatrix);
    let mut report = Vec::new();
    for (case, tensors) in cases {
        let mut words = case.split_whitespace();
        let ty = words.next().unwrap();
        let out = dir.path().join(format!("{}.gguf", case.replace(' ', "")));
        let mut args = vec![
            f32.to_str().unwrap(),
            out.to_str().unwrap(),
            "--type",
            ty,
            "--no-receipt",
        ];
        for w in words {
            args.push(w);
            if w == "--imatrix" {
                args.push(imatrix.to_str().unwrap());
            }
        }
        ok(&quantize(&args));
        let got = tensor_hashes(&out);
        let want = tensors.as_object().unwrap();
        assert_eq!(got.len(), want.len(), "{case}: tensor count");
        for (name, w) in want {
            let g = got
                .get(name)
                .unwrap_or_else(|| panic!("{case}: {name} missing"));
            let w = w.as_str().unwrap();
            if g != w {
                report.push(format!("{case}: {name}: ferrolm {g}, llama.cpp {w}"));
            }
        }
        std::fs::remove_file(&out).unwrap();
    }
    assert!(report.is_empty(), "{}", report.join("\n"));
}

#[test]
fn a_q4_k_m_file_carries_its_receipt_which_info_shows_and_it_generates() {
    let dir = tempfile::tempdir().unwrap();
    let f32 = f32_source();
    let q = dir.path().join("q4km.gguf");
    let out = quantize(&[
        f32.to_str().unwrap(),
        q.to_str().unwrap(),
        "--type",
        "q4_k_m",
        "--calibration-tokens",
        "512",
        "--ctx",
        "256",
        "--json",
    ]);
    let r = json_of(&out);
    let kld = r["kld_mean"].as_f64().unwrap();
    let top1 = r["top1_agreement"].as_f64().unwrap();
    assert_eq!(r["tokens"], 510, "{r}");
    // A 4-bit mix of a 135M model: measurably different from f32, and far from broken.
    assert!(kld > 0.005 && kld < 0.3, "{r}");
    assert!(r["kld_p99"].as_f64().unwrap() >= kld, "{r}");
    assert!(top1 > 0.7 && top1 < 1.0, "{r}");
    let (ppl, base) = (r["ppl"].as_f64().unwrap(), r["ppl_base"].as_f64().unwrap());
    assert!(ppl > base * 0.97 && ppl < base * 1.3, "{r}");

    let g = GgufFile::open(&q).unwrap();
    assert_eq!(
        g.get_u64("general.file_type").unwrap(),
        15,
        "LLAMA_FTYPE_MOSTLY_Q4_K_M"
    );
    assert_eq!(g.get_f64("ferrolm.quantize.kld_mean").unwrap(), kld);
    assert_eq!(g.get_str("ferrolm.quantize.source").unwrap(), "f32.gguf");

    let info = ferrolm()
        .args(["info", q.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        text.contains("quantization:") && text.contains("kld_mean"),
        "{text}"
    );

    // The same figures from `eval kld` on the written file.
    let calib = dir.path().join("calib.txt");
    std::fs::write(&calib, include_str!("../src/quantize_calibration.txt")).unwrap();
    let e = json_of(
        &ferrolm()
            .args([
                "eval",
                "kld",
                "-m",
                q.to_str().unwrap(),
                "--base",
                f32.to_str().unwrap(),
            ])
            .args([
                "--file",
                calib.to_str().unwrap(),
                "--tokens",
                "512",
                "--ctx",
                "256",
                "--json",
            ])
            .output()
            .unwrap(),
    );
    assert_eq!(e["tokens"], 510);
    assert!(
        (e["kld_mean"].as_f64().unwrap() - kld).abs() < 1e-9,
        "{e} vs {r}"
    );

    let gen = ferrolm()
        .args([
            "generate",
            "-m",
            q.to_str().unwrap(),
            "--max-tokens",
            "8",
            "--temperature",
            "0",
        ])
        .args(["-p", "What is the capital of France?"])
        .output()
        .unwrap();
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    assert!(!gen.stdout.is_empty());
}

#[test]
fn bad_input_gets_a_clear_error_and_leaves_no_output_file() {
    let dir = tempfile::tempdir().unwrap();
    let m = default_model();
    let m = m.to_str().unwrap();
    let out = dir.path().join("out.gguf");
    let o = out.to_str().unwrap();
    let err = |args: &[&str]| {
        let r = quantize(args);
        assert!(!r.status.success(), "{args:?} succeeded");
        assert!(!out.exists(), "{args:?} left {o}");
        String::from_utf8_lossy(&r.stderr).into_owned()
    };

    let e = err(&[m, o, "--type", "q4_k_x"]);
    assert!(
        e.contains("unknown --type \"q4_k_x\"") && e.contains("q4_k_m"),
        "{e}"
    );

    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    std::fs::write(hf.join("config.json"), "{}").unwrap();
    let e = err(&[hf.to_str().unwrap(), o, "--type", "q8_0"]);
    assert!(e.contains("Hugging Face"), "{e}");

    let e = err(&[
        m,
        o,
        "--type",
        "q8_0",
        "--calibration",
        "/nonexistent/calib.txt",
    ]);
    assert!(
        e.contains("--calibration") && e.contains("no such file"),
        "{e}"
    );

    let short = dir.path().join("short.txt");
    std::fs::write(&short, "Too short to judge a model by.").unwrap();
    let e = err(&[
        m,
        o,
        "--type",
        "q8_0",
        "--calibration",
        short.to_str().unwrap(),
    ]);
    assert!(e.contains("fewer than one window"), "{e}");

    // An importance matrix of another model (other widths), or not an imatrix at all.
    let other = dir.path().join("other.imatrix.gguf");
    {
        use ferrolm_gguf::{writer::GgufWriter, Value};
        let mut w = GgufWriter::new();
        w.tensor_f32("blk.0.attn_q.weight.in_sum2", &[100], &[1.0; 100]);
        w.tensor_f32("blk.0.attn_q.weight.counts", &[1], &[1.0]);
        w.meta("imatrix.chunk_count", Value::U32(1));
        std::fs::write(&other, w.to_bytes()).unwrap();
    }
    let e = err(&[
        m,
        o,
        "--type",
        "q4_k_m",
        "--imatrix",
        other.to_str().unwrap(),
    ]);
    assert!(
        e.contains("another model") && e.contains("blk.0.attn_q.weight"),
        "{e}"
    );
    let e = err(&[
        m,
        o,
        "--type",
        "q4_k_m",
        "--imatrix",
        short.to_str().unwrap(),
    ]);
    assert!(e.contains("not an imatrix file"), "{e}");

    let copy = dir.path().join("model.gguf");
    std::fs::copy(m, &copy).unwrap();
    let c = copy.to_str().unwrap();
    let r = quantize(&[c, c, "--type", "q8_0"]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("overwrite the source"));
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(m).unwrap());

    // No temporary file is left beside the output either.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn an_imatrix_of_the_models_own_activations_lowers_q4_0_kl_divergence() {
    let dir = tempfile::tempdir().unwrap();
    let f32 = f32_source();
    // Calibration for the imatrix: the start of the corpus (the receipts use its held-out end).
    let text: String =
        std::fs::read_to_string(common::repo_root().join("data/tinyshakespeare.txt"))
            .unwrap()
            .chars()
            .take(20_000)
            .collect();
    let data = dir.path().join("train.txt");
    std::fs::write(&data, text).unwrap();
    let im = dir.path().join("m.imatrix.gguf");
    let out = ferrolm()
        .args([
            "imatrix",
            "-m",
            f32.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .args(["-o", im.to_str().unwrap(), "--ctx", "256", "--chunks", "4"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // llama.cpp's GGUF imatrix layout: sums and counts per weight matrix, and its metadata.
    let g = GgufFile::open(&im).unwrap();
    assert_eq!(g.get_u64("imatrix.chunk_count").unwrap(), 4);
    assert_eq!(g.get_u64("imatrix.chunk_size").unwrap(), 256);
    let sums: Vec<_> = g
        .tensors
        .iter()
        .filter(|t| t.name.ends_with(".in_sum2"))
        .collect();
    assert_eq!(
        sums.len(),
        30 * 7,
        "q, k, v, output, gate, up, down of 30 layers"
    );
    let down = g.tensor("blk.3.ffn_down.weight.in_sum2").unwrap();
    assert_eq!(down.dims, [1536, 1]);
    let counts = g
        .tensor_bytes(g.tensor("blk.3.ffn_down.weight.counts").unwrap())
        .unwrap();
    assert_eq!(f32::from_le_bytes(counts[..4].try_into().unwrap()), 1024.0);

    let receipt = |extra: &[&str]| -> f64 {
        let q = dir.path().join("q.gguf");
        let mut args = vec![f32.to_str().unwrap(), q.to_str().unwrap(), "--type", "q4_0"];
        args.extend_from_slice(&["--calibration-tokens", "512", "--ctx", "256", "--json"]);
        args.extend_from_slice(extra);
        json_of(&quantize(&args))["kld_mean"].as_f64().unwrap()
    };
    let plain = receipt(&[]);
    let weighted = receipt(&["--imatrix", im.to_str().unwrap()]);
    // Measured: 0.34 → 0.22 with 16 chunks of 512; a smaller matrix still helps clearly.
    assert!(weighted < plain * 0.9, "imatrix {weighted} vs none {plain}");
}
