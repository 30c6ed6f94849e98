//! Embeddings: all-MiniLM-L6-v2 (`ferrolm pull all-minilm-l6-v2`) against sentence-transformers
//! on the same weights (`scripts/embedding_reference.py` → `golden/minilm_embeddings.json`), and
//! the two HTTP endpoints that serve it: OpenAI's `/v1/embeddings` and Ollama's `/api/embed`,
//! with the official `openai` client running README's vector-search recipe.
//!
//! The model is installed into the test store by `.ci/run` (and by the first test that needs
//! it); a failed install fails the tests.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::PathBuf;

use ferrolm_engine::Embedder;
use serde_json::{json, Value};

/// Measured: cosine ≥ 0.99999999 and max |Δ| ≤ 3.2e-7 on every case; the bounds leave room for
/// another machine's summation order, not for a wrong layer.
const MIN_COSINE: f64 = 0.9999;
const MAX_ABS_DIFF: f64 = 1e-5;

fn reference() -> Value {
    serde_json::from_slice(&std::fs::read(golden("minilm_embeddings.json")).unwrap()).unwrap()
}

/// The model directory in the test store, pulled on first use.
fn minilm_dir() -> PathBuf {
    let p = test_home().join("models").join("all-MiniLM-L6-v2");
    if !p.join("model.safetensors").exists() {
        let out = ferrolm()
            .args(["pull", "all-minilm-l6-v2"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the embedding tests need all-MiniLM-L6-v2: `FERROLM_HOME={} ferrolm pull all-minilm-l6-v2` failed: {}",
            test_home().display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        p.join("model.safetensors").exists(),
        "{} is missing after the pull",
        p.display()
    );
    p
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// (cosine, max |a - b|).
fn compare(a: &[f32], b: &[f32]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max);
    (dot / (na * nb), diff)
}

#[test]
fn reference_was_recorded_on_this_model() {
    let r = reference();
    assert_eq!(
        r["model_safetensors_sha256"],
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    );
    assert!(r["cases"].as_array().unwrap().len() >= 10);
}

#[test]
fn minilm_token_ids_and_embeddings_equal_sentence_transformers() {
    let e = Embedder::load(&minilm_dir()).unwrap();
    assert_eq!((e.dim(), e.max_tokens()), (384, 512));
    let r = reference();
    let mut worst = (1.0f64, 0.0f64);
    for c in r["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let text = c["text"].as_str().unwrap();
        assert_eq!(
            e.tokenize(text).unwrap(),
            ids(&c["ids"]),
            "{name}: token ids"
        );
        let got = e.embed_text(text, false).unwrap();
        assert_eq!(got.tokens, c["ids"].as_array().unwrap().len(), "{name}");
        let (cos, diff) = compare(&got.vector, &floats(&c["embedding"]));
        println!(
            "{name}: {} tokens, cosine {cos:.9}, max |Δ| {diff:.2e}",
            got.tokens
        );
        assert!(
            cos >= MIN_COSINE && diff <= MAX_ABS_DIFF,
            "{name}: cosine {cos}, max |Δ| {diff}"
        );
        let norm: f64 = got
            .vector
            .iter()
            .map(|x| (*x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{name}: norm {norm}");
        worst = (worst.0.min(cos), worst.1.max(diff));
    }
    println!("worst: cosine {:.9}, max |Δ| {:.2e}", worst.0, worst.1);
    // All at once (one stacked pass): each vector is still its own sequence's.
    let cases = r["cases"].as_array().unwrap();
    let seqs: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["ids"])).collect();
    let batch = e.embed_batch(&seqs).unwrap();
    for (got, c) in batch.iter().zip(cases) {
        let (cos, diff) = compare(&got.vector, &floats(&c["embedding"]));
        assert!(
            cos >= MIN_COSINE && diff <= MAX_ABS_DIFF,
            "{} in a batch: cosine {cos}, max |Δ| {diff}",
            c["name"]
        );
    }
}

#[test]
fn embedding_input_past_the_window_is_refused_unless_truncated() {
    let e = Embedder::load(&minilm_dir()).unwrap();
    let long = "word ".repeat(600);
    let err = e.embed_text(&long, false).unwrap_err().to_string();
    assert!(err.contains("602 tokens") && err.contains("512"), "{err}");
    let cut = e.embed_text(&long, true).unwrap();
    assert_eq!(cut.tokens, 512);
    // Truncation keeps [CLS] … [SEP]: the same as embedding the first 510 words' ids by hand.
    let mut ids = e.tokenize(&long).unwrap();
    let sep = *ids.last().unwrap();
    ids.truncate(511);
    ids.push(sep);
    assert_eq!(e.embed_ids(&ids).unwrap().vector, cut.vector);
    assert!(e.embed_ids(&[]).is_err());
    let bad = e.embed_ids(&[101, 999_999, 102]).unwrap_err().to_string();
    assert!(bad.contains("999999"), "{bad}");
}

fn embedding_server(extra: &[&str]) -> Server {
    let dir = minilm_dir();
    let mut args = vec!["--embedding-model", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[test]
fn openai_embeddings_endpoint_serves_golden_vectors_and_refuses_bad_input() {
    let s = embedding_server(&[]);
    let r = reference();
    let cases = r["cases"].as_array().unwrap();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let (status, v) = s.post(
        "/v1/embeddings",
        &json!({"model": "all-MiniLM-L6-v2", "input": texts}),
    );
    assert_eq!(status, 200, "{v}");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), cases.len());
    let mut tokens = 0;
    for (i, (d, c)) in data.iter().zip(cases).enumerate() {
        assert_eq!(d["index"], i);
        assert_eq!(d["object"], "embedding");
        let (cos, diff) = compare(&floats(&d["embedding"]), &floats(&c["embedding"]));
        assert!(
            cos >= MIN_COSINE && diff <= MAX_ABS_DIFF,
            "{}: {cos} {diff}",
            c["name"]
        );
        tokens += c["ids"].as_array().unwrap().len();
    }
    assert_eq!(v["usage"]["prompt_tokens"], tokens);
    assert_eq!(v["usage"]["total_tokens"], tokens);

    // Token-array input is embedded as given: the golden ids give the golden vector.
    let (status, v) = s.post(
        "/v1/embeddings",
        &json!({"model": "all-MiniLM-L6-v2", "input": cases[1]["ids"], "encoding_format": "base64", "dimensions": 384}),
    );
    assert_eq!(status, 200, "{v}");
    let b64 = v["data"][0]["embedding"].as_str().unwrap();
    let got = decode_base64_f32(b64);
    let (cos, _) = compare(&got, &floats(&cases[1]["embedding"]));
    assert!(cos >= MIN_COSINE, "{cos}");

    // The model is listed.
    let (_, models) = s.get("/v1/models");
    let listed = models["data"].as_array().unwrap();
    assert!(
        listed
            .iter()
            .any(|m| m["id"] == "all-minilm-l6-v2" && m["dimensions"] == 384),
        "{models}"
    );

    // Bad input: clear 400s naming the problem.
    let long = "word ".repeat(600);
    for (body, needle) in [
        (
            json!({"model": "all-MiniLM-L6-v2", "input": long}),
            "limit of 512 tokens",
        ),
        (
            json!({"model": "all-MiniLM-L6-v2", "input": "x", "dimensions": 256}),
            "384",
        ),
        (json!({"model": "all-MiniLM-L6-v2", "input": []}), "empty"),
        (
            json!({"model": "all-MiniLM-L6-v2", "input": [[101, -1]]}),
            "token ids",
        ),
        (
            json!({"model": "all-MiniLM-L6-v2", "input": "x", "encoding_format": "hex"}),
            "encoding_format",
        ),
        (json!({"input": "x"}), "`model` is required"),
        (
            json!({"model": "smollm2-135m-instruct", "input": "x"}),
            "not an embedding model",
        ),
    ] {
        let (status, v) = s.post("/v1/embeddings", &body);
        assert_eq!(status, 400, "{body} → {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body} → {msg}");
    }
    let (status, v) = s.post("/v1/embeddings", &json!({"model": "nope", "input": "x"}));
    assert_eq!(status, 404, "{v}");
}

fn decode_base64_f32(s: &str) -> Vec<f32> {
    const ABC: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut bytes = Vec::new();
    for ch in s.chars().filter(|&c| c != '=') {
        bits = bits << 6 | ABC.find(ch).unwrap() as u32;
        n += 6;
        if n >= 8 {
            n -= 8;
            bytes.push((bits >> n) as u8);
        }
    }
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn ollama_embed_truncates_by_default_and_refuses_when_told_not_to() {
    let s = embedding_server(&[]);
    // Ollama clients find the embedding model in /api/tags, beside the chat model.
    let (status, tags) = s.get("/api/tags");
    assert_eq!(status, 200, "{tags}");
    let e = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["details"]["family"] == "bert")
        .unwrap_or_else(|| panic!("no embedding model in /api/tags: {tags}"));
    assert_eq!(e["name"], "all-minilm-l6-v2", "{e}");
    assert_eq!(e["details"]["parameter_size"], "22.7M", "{e}");
    assert!(e["size"].as_u64().unwrap() > 90_000_000, "{e}");
    let r = reference();
    let c = &r["cases"][1];
    let (status, v) = s.post(
        "/api/embed",
        &json!({"model": "all-minilm", "input": c["text"]}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["embeddings"].as_array().unwrap().len(), 1);
    let (cos, _) = compare(&floats(&v["embeddings"][0]), &floats(&c["embedding"]));
    assert!(cos >= MIN_COSINE, "{cos}");
    assert_eq!(v["prompt_eval_count"], c["ids"].as_array().unwrap().len());

    let long = "word ".repeat(600);
    let (status, v) = s.post(
        "/api/embed",
        &json!({"model": "all-minilm:latest", "input": [long.clone(), "short"]}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["embeddings"].as_array().unwrap().len(), 2);
    assert_eq!(v["prompt_eval_count"], 512 + 3);

    let (status, v) = s.post(
        "/api/embed",
        &json!({"model": "all-minilm", "input": long, "truncate": false}),
    );
    assert_eq!(status, 400, "{v}");
    // Ollama's error shape: {"error": "message"}.
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains("602 tokens") && msg.contains("512"), "{v}");
}

#[test]
fn embedding_requests_need_a_key_and_land_in_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let key = create_key(dir.path(), "embedder", &[]);
    let model = minilm_dir();
    let s = Server::start_in(dir.path(), &["--embedding-model", model.to_str().unwrap()]);
    let (status, _) = s.post(
        "/v1/embeddings",
        &json!({"model": "all-MiniLM-L6-v2", "input": "hi"}),
    );
    assert_eq!(status, 401);
    let ok = |path: &str, body: Value| {
        let r = ureq::post(&s.url(path))
            .set("Authorization", &format!("Bearer {key}"))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .unwrap();
        assert_eq!(r.status(), 200);
    };
    ok(
        "/v1/embeddings",
        json!({"model": "all-MiniLM-L6-v2", "input": ["hi", "there"]}),
    );
    ok("/api/embed", json!({"model": "all-minilm", "input": "hi"}));
    drop(s);
    let db = rusqlite::Connection::open(dir.path().join("ferrolm.db")).unwrap();
    let rows: Vec<(String, String, i64, i64, i64)> = db
        .prepare("SELECT endpoint, model, status, prompt_tokens, completion_tokens FROM usage WHERE key_id IS NOT NULL ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let id = "all-minilm-l6-v2".to_owned();
    assert_eq!(
        rows,
        vec![
            ("/v1/embeddings".to_owned(), id.clone(), 200, 3 + 3, 0),
            ("/api/embed".to_owned(), id, 200, 3, 0),
        ]
    );
}

#[test]
fn the_official_openai_client_creates_embeddings() {
    let python = std::env::var_os("FERROLM_SDK_PYTHON").map_or_else(
        || repo_root().join("target/sdk-venv/bin/python"),
        PathBuf::from,
    );
    assert!(
        python.exists(),
        "{} is missing: run `.ci/run` once (it installs the openai client there), or set FERROLM_SDK_PYTHON",
        python.display()
    );
    let s = embedding_server(&[]);
    let script = r#"
import base64, os, sys, json
from openai import OpenAI, BadRequestError
ref = json.load(open(sys.argv[1]))
c = OpenAI(base_url=os.environ["FERROLM_BASE"] + "/v1", api_key="unused")
texts = [x["text"] for x in ref["cases"]]
r = c.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
assert len(r.data) == len(texts), r
worst = 1.0
for d, x in zip(r.data, ref["cases"]):
    a, b = d.embedding, x["embedding"]
    dot = sum(p * q for p, q in zip(a, b))
    worst = min(worst, dot / (sum(p * p for p in a) ** 0.5 * sum(q * q for q in b) ** 0.5))
assert worst >= 0.9999, worst
assert r.usage.prompt_tokens == sum(len(x["ids"]) for x in ref["cases"]), r.usage
# The SDK asks for base64 by default when numpy is absent or present alike and decodes it.
one = c.embeddings.create(model="all-MiniLM-L6-v2", input="Hello, world!")
assert len(one.data[0].embedding) == 384
try:
    c.embeddings.create(model="all-MiniLM-L6-v2", input="x", dimensions=128)
    raise SystemExit("dimensions=128 was accepted")
except BadRequestError as e:
    assert "384" in str(e), e
# The README's vector-search recipe: the right chunk comes first.
chunks = [
    "To reset your password, open Settings, choose Security and press Reset password.",
    "Invoices are emailed on the first day of each month and can be downloaded as PDF.",
    "The API rate limit is 60 requests per minute per key; a 429 carries Retry-After.",
    "Our office dog is called Biscuit and likes tennis balls.",
]
def embed(texts):
    r = c.embeddings.create(model="all-minilm-l6-v2", input=texts)
    return [d.embedding for d in r.data]
index = embed(chunks)
def search_docs(query, k=1):
    q = embed([query])[0]
    scores = [sum(a * b for a, b in zip(q, v)) for v in index]
    return sorted(range(len(chunks)), key=scores.__getitem__, reverse=True)[:k]
for query, want in [("how do I change my password?", 0), ("where is my bill?", 1),
                    ("too many requests error", 2), ("pets at work", 3)]:
    got = search_docs(query)[0]
    assert got == want, (query, got, want)
print("openai embeddings: ok, worst cosine", worst)
"#;
    let out = std::process::Command::new(python)
        .args(["-c", script])
        .arg(golden("minilm_embeddings.json"))
        .env("FERROLM_BASE", &s.base)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
