//! `ferrolm cost` as a user drives it: the real binary, prices pinned in a test price file so
//! the figures below are hand-computed and do not move when the builtin catalog does.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::{json, Value};

/// gpt-4o at its list price; the same with a 90% cache discount; a cheap and a mid-priced
/// model for breakeven; a cl100k model; and a self-hosted box whose derived prices are round.
const PRICES: &str = r#"
[[model]]
id = "gpt-4o"
provider = "openai"
input_per_mtok = 2.50
cached_input_per_mtok = 1.25
output_per_mtok = 10.00
tokenizer = "o200k_base"
source = "test"
as_of = "2025-11-28"

[[model]]
id = "gpt-4o-cache90"
provider = "test"
input_per_mtok = 2.50
cached_input_per_mtok = 0.25
output_per_mtok = 10.00
tokenizer = "o200k_base"
source = "test"
as_of = "2025-11-28"

[[model]]
id = "cheap"
provider = "test"
input_per_mtok = 0.30
output_per_mtok = 4.00
source = "test"
as_of = "2025-11-28"

[[model]]
id = "mid"
provider = "test"
input_per_mtok = 0.41
output_per_mtok = 4.00
source = "test"
as_of = "2025-11-28"

[[model]]
id = "gpt-4-cl"
provider = "test"
input_per_mtok = 1.00
output_per_mtok = 1.00
tokenizer = "cl100k_base"
source = "test"
as_of = "2025-11-28"

[[model]]
id = "test-box"
provider = "self-hosted"
tokenizer = "smollm2"
source = "test"
as_of = "2025-11-28"
[model.self_hosted]
hardware = "1x test GPU"
hardware_usd_per_hour = 3.60
prefill_tokens_per_s = 10000
decode_tokens_per_s = 100
"#;

/// A temp dir holding the pinned price file.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("prices.toml"), PRICES).unwrap();
        Fixture { dir }
    }

    fn prices(&self) -> PathBuf {
        self.dir.path().join("prices.toml")
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `ferrolm cost ARGS --prices FILE`.
    fn cost(&self, args: &[&str]) -> Output {
        ferrolm()
            .arg("cost")
            .args(args)
            .arg("--prices")
            .arg(self.prices())
            .output()
            .unwrap()
    }
}

/// Within a millionth of a cent.
fn close(v: &Value, want: f64) {
    let got = v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    assert!((got - want).abs() < 1e-8, "{got} != {want}");
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Failed with a non-zero exit, no panic, and a message containing every needle.
fn fails(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    for n in needles {
        assert!(err.contains(n), "error should mention `{n}`: {err}");
    }
}

// ---- prices ----

#[test]
fn prices_lists_the_catalog_with_derived_self_hosted_prices() {
    let f = Fixture::new();
    let v = json_of(&f.cost(&["prices", "--json"]));
    let models = v["models"].as_array().unwrap();
    let get = |id: &str| models.iter().find(|m| m["id"] == id).unwrap().clone();
    assert_eq!(v["version"], "2025-11-28");
    assert_eq!(
        get("gpt-4o")["source"],
        "test",
        "the file replaces the builtin entry"
    );
    assert_eq!(get("gpt-5")["input_per_mtok"], 1.25, "builtin entries stay");
    // $3.60/h ÷ (10,000 tok/s × 3600) × 1e6 = $0.10 per 1M prompt tokens; ÷ 100 tok/s: $10.
    let b = get("test-box");
    close(&b["input_per_mtok"], 0.10);
    close(&b["output_per_mtok"], 10.0);
    assert_eq!(b["self_hosted"]["hardware"], "1x test GPU");

    let o = f.cost(&["prices"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    let header = text.lines().next().unwrap();
    for col in [
        "ID",
        "PROVIDER",
        "INPUT/1M",
        "CACHED/1M",
        "OUTPUT/1M",
        "CONTEXT",
        "TOKENIZER",
        "AS_OF",
        "SOURCE",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let row = text.lines().find(|l| l.starts_with("test-box ")).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &cells[..5],
        ["test-box", "self-hosted", "0.10", "0.00", "10.00"],
        "{row}"
    );
    assert!(
        text.contains("test-box: self-hosted on 1x test GPU at $3.60/hour"),
        "{text}"
    );
    assert!(text.contains("claude-sonnet-4.5: prompts over 200000 tokens cost 6.00 / 0.60 / 22.50"));
}

// ---- estimate ----

fn estimate(f: &Fixture, model: &str, extra: &[&str]) -> Value {
    let mut args = vec!["estimate", "--json", "--model", model];
    args.extend(extra);
    json_of(&f.cost(&args))
}

#[test]
fn estimate_reproduces_the_gpt4o_worked_examples() {
    let f = Fixture::new();
    // 10,550 × $2.50/1M + 500 × $10/1M = $0.026375 + $0.005.
    let v = estimate(
        &f,
        "gpt-4o",
        &["--input-tokens", "10550", "--output-tokens", "500"],
    );
    assert_eq!(v["model"], "gpt-4o");
    assert_eq!(
        (v["input_tokens"].as_u64(), v["output_tokens"].as_u64()),
        (Some(10_550), Some(500))
    );
    assert_eq!(
        (v["cached_tokens"].as_u64(), v["requests"].as_u64()),
        (Some(0), Some(1))
    );
    close(&v["per_request_usd"], 0.031375);
    close(&v["monthly_usd"], 0.031375);
    // 100,000 of them: $3,137.50.
    let v = estimate(
        &f,
        "gpt-4o",
        &[
            "--input-tokens",
            "10550",
            "--output-tokens",
            "500",
            "--requests",
            "100000",
        ],
    );
    close(&v["per_request_usd"], 0.031375);
    close(&v["monthly_usd"], 3_137.50);
    // 3,050 × $2.50/1M + 500 × $10/1M = $0.007625 + $0.005.
    let v = estimate(
        &f,
        "gpt-4o",
        &["--input-tokens", "3050", "--output-tokens", "500"],
    );
    close(&v["per_request_usd"], 0.012625);
}

#[test]
fn estimate_with_the_builtin_catalog_gives_the_same_gpt4o_price() {
    let o = ferrolm()
        .args(["cost", "estimate", "--json", "--model", "gpt-4o"])
        .args(["--input-tokens", "10550", "--output-tokens", "500"])
        .output()
        .unwrap();
    close(&json_of(&o)["per_request_usd"], 0.031375);
}

#[test]
fn a_cached_static_prefix_over_two_requests_saves_44_percent_or_22_cold() {
    let f = Fixture::new();
    // `--requests 2 --cached-tokens 2500`: both requests read the 2,500-token prefix at
    // $0.25/1M (90% off $2.50): 2 × (550 × 2.50 + 2,500 × 0.25 + 500 × 10) = $0.014 against
    // $0.02525 uncached — the seed's "saves 44% over two requests".
    let warm = estimate(
        &f,
        "gpt-4o-cache90",
        &[
            "--input-tokens",
            "3050",
            "--output-tokens",
            "500",
            "--requests",
            "2",
            "--cached-tokens",
            "2500",
        ],
    );
    close(&warm["monthly_usd"], 0.014);
    close(&warm["baseline_monthly_usd"], 0.02525);
    let pct = warm["saving_pct"].as_f64().unwrap();
    assert!((pct - 44.554_455_4).abs() < 1e-6, "{pct}");
    // `--cold-start`: the first request writes the prefix at the full price, the second reads it.
    let v = estimate(
        &f,
        "gpt-4o-cache90",
        &[
            "--input-tokens",
            "3050",
            "--output-tokens",
            "500",
            "--requests",
            "2",
            "--cached-tokens",
            "2500",
            "--cold-start",
        ],
    );
    // First: 3,050 × 2.50 + 500 × 10 → $0.012625.
    close(&v["first_request_usd"], 0.012625);
    // Second: 550 × 2.50 + 2,500 × 0.25 + 500 × 10 = 1,375 + 625 + 5,000 → $0.007.
    close(&v["warm_request_usd"], 0.007);
    close(&v["monthly_usd"], 0.019625);
    // Without caching: 2 × $0.012625 = $0.02525; saving $0.005625 = 22.277…%.
    close(&v["baseline_monthly_usd"], 0.02525);
    close(&v["saving_usd"], 0.005625);
    let pct = v["saving_pct"].as_f64().unwrap();
    assert!((pct - 22.277_227_7).abs() < 1e-6, "{pct}");
    assert_eq!(v["cached_tokens"], 2_500);

    // The same two requests priced one by one agree with the monthly figure.
    let cold = estimate(
        &f,
        "gpt-4o-cache90",
        &["--input-tokens", "3050", "--output-tokens", "500"],
    );
    let warm = estimate(
        &f,
        "gpt-4o-cache90",
        &[
            "--input-tokens",
            "3050",
            "--output-tokens",
            "500",
            "--cache-hit-ratio",
            &(2500.0 / 3050.0).to_string(),
        ],
    );
    close(&cold["per_request_usd"], 0.012625);
    close(&warm["per_request_usd"], 0.007);

    // With gpt-4o's own 50% discount (and a warm cache) the text table reports 24.75%.
    let o = f.cost(&[
        "estimate",
        "--model",
        "gpt-4o",
        "--input-tokens",
        "3050",
        "--output-tokens",
        "500",
        "--requests",
        "2",
        "--cached-tokens",
        "2500",
    ]);
    let text = String::from_utf8(o.stdout).unwrap();
    let row = text.lines().find(|l| l.starts_with("gpt-4o ")).unwrap();
    assert!(row.ends_with("24.75%"), "{row}");
}

#[test]
fn compression_and_cache_hit_ratio_apply_to_every_request() {
    let f = Fixture::new();
    let v = estimate(
        &f,
        "gpt-4o",
        &[
            "--input-tokens",
            "10000",
            "--output-tokens",
            "500",
            "--requests",
            "10",
            "--compression-ratio",
            "0.2",
            "--cache-hit-ratio",
            "0.5",
        ],
    );
    // 8,000 sent, 4,000 cached: 4,000 × 2.50 + 4,000 × 1.25 + 500 × 10 → $0.02 each.
    assert_eq!(
        (v["sent_input_tokens"].as_u64(), v["cached_tokens"].as_u64()),
        (Some(8_000), Some(4_000))
    );
    close(&v["per_request_usd"], 0.02);
    close(&v["monthly_usd"], 0.2);
    // Baseline 10,000 × 2.50 + 500 × 10 → $0.03 each.
    close(&v["baseline_monthly_usd"], 0.3);
    assert_eq!(v["compression_ratio"], 0.2);
    assert_eq!(v["cache_hit_ratio"], 0.5);
}

#[test]
fn estimate_all_compares_every_model_sorted_by_cost() {
    let f = Fixture::new();
    let v = estimate(
        &f,
        "all",
        &["--input-tokens", "3050", "--output-tokens", "500"],
    );
    let rows = v.as_array().unwrap();
    let catalog = json_of(&f.cost(&["prices", "--json"]));
    assert_eq!(rows.len(), catalog["models"].as_array().unwrap().len());
    let monthly: Vec<f64> = rows
        .iter()
        .map(|r| r["monthly_usd"].as_f64().unwrap())
        .collect();
    assert!(monthly.windows(2).all(|w| w[0] <= w[1]), "{monthly:?}");
    let four_o = rows.iter().find(|r| r["model"] == "gpt-4o").unwrap();
    close(&four_o["per_request_usd"], 0.012625);
    // Two named models: an array too, cheapest first.
    let v = json_of(&f.cost(&[
        "estimate",
        "--json",
        "-m",
        "gpt-4o",
        "-m",
        "cheap",
        "--input-tokens",
        "3050",
        "--output-tokens",
        "500",
    ]));
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["model"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["cheap", "gpt-4o"]);
}

#[test]
fn estimate_rejects_bad_numbers_and_unknown_models() {
    let f = Fixture::new();
    let base = [
        "estimate",
        "--model",
        "gpt-4o",
        "--input-tokens",
        "100",
        "--output-tokens",
        "10",
    ];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend(extra);
        f.cost(&a)
    };
    fails(
        &f.cost(&[
            "estimate",
            "--model",
            "gpt-4o",
            "--input-tokens",
            "-5",
            "--output-tokens",
            "10",
        ]),
        &["`-5` is not a token count", "whole number >= 0"],
    );
    fails(
        &with(&["--compression-ratio", "NaN"]),
        &["compression ratio is NaN", "must be >= 0 and < 1"],
    );
    fails(
        &with(&["--compression-ratio", "-0.1"]),
        &["compression ratio is -0.1"],
    );
    fails(
        &with(&["--cache-hit-ratio", "1.5"]),
        &["cache hit ratio is 1.5", "between 0 and 1"],
    );
    fails(
        &with(&["--cache-hit-ratio", "nan"]),
        &["cache hit ratio is NaN"],
    );
    fails(
        &with(&["--cached-tokens", "101"]),
        &["cached prefix is 101 tokens, more than the 100"],
    );
    fails(
        &with(&["--cached-tokens", "10", "--cache-hit-ratio", "0.5"]),
        &[
            "--cached-tokens",
            "cannot be used with",
            "--cache-hit-ratio",
        ],
    );
    fails(
        &with(&["--requests", "0"]),
        &["`0` is not a number of requests"],
    );
    let o = f.cost(&[
        "estimate",
        "--model",
        "gpt4o",
        "--input-tokens",
        "1",
        "--output-tokens",
        "1",
    ]);
    fails(
        &o,
        &[
            "no model `gpt4o`",
            "closest ids are `gpt-4o`",
            "ferrolm cost prices",
        ],
    );
}

// ---- breakeven ----

fn breakeven(f: &Fixture, speed: &[&str], models: &[&str]) -> Value {
    let mut args = vec!["breakeven", "--json", "--hardware-usd-per-hour", "3.60"];
    args.extend(speed);
    args.extend(["--input-tokens", "10000", "--output-tokens", "500"]);
    for m in models {
        args.extend(["--model", m]);
    }
    json_of(&f.cost(&args))
}

#[test]
fn breakeven_against_hand_computed_figures() {
    let f = Fixture::new();
    let split = [
        "--prefill-tokens-per-s",
        "10000",
        "--decode-tokens-per-s",
        "100",
    ];
    let v = breakeven(&f, &split, &["gpt-4o", "cheap", "mid"]);
    // $3.60/h is $0.001/s. 10,000 / 10,000 + 500 / 100 = 6 s → $0.006 a request. A month is
    // 720 h → $2,592, and 720 × 3600 / 6 = 432,000 requests at 100% utilisation.
    close(&v["self_hosted"]["seconds_per_request"], 6.0);
    close(&v["self_hosted"]["per_request_usd"], 0.006);
    assert_eq!(v["self_hosted"]["capacity_requests_per_month"], 432_000);
    close(&v["machine"]["monthly_usd"], 2_592.0);
    assert_eq!(v["machine"]["hours_per_month"], 720.0);
    let m = |id: &str| {
        v["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["model"] == id)
            .unwrap()
            .clone()
    };
    // gpt-4o: 10,000 × 2.50 + 500 × 10 → $0.03; $2,592 / $0.03 = 86,400 requests.
    close(&m("gpt-4o")["per_request_usd"], 0.03);
    assert_eq!(m("gpt-4o")["breakeven_requests_per_month"], 86_400);
    assert_eq!(m("gpt-4o")["never"], false);
    // mid: 10,000 × 0.41 + 500 × 4 → $0.0061; 2,592 / 0.0061 = 424,918.03 → 424,919 ≤ 432,000.
    close(&m("mid")["per_request_usd"], 0.0061);
    assert_eq!(m("mid")["breakeven_requests_per_month"], 424_919);
    // cheap: 10,000 × 0.30 + 500 × 4 → $0.005 < $0.006: it would take 518,400 requests,
    // more than the machine can serve.
    close(&m("cheap")["per_request_usd"], 0.005);
    assert_eq!(m("cheap")["breakeven_requests_per_month"], Value::Null);
    assert_eq!(m("cheap")["never"], true);
    // Dearest hosted price first.
    let order: Vec<&str> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["gpt-4o", "mid", "cheap"]);

    // One speed for both: (10,000 + 500) / 1,750 = 6 s, the same figures.
    let one = breakeven(&f, &["--tokens-per-s", "1750"], &["gpt-4o"]);
    close(&one["self_hosted"]["seconds_per_request"], 6.0);
    assert_eq!(one["models"][0]["breakeven_requests_per_month"], 86_400);

    // No --model: every hosted model, self-hosted ones left out.
    let all = breakeven(&f, &split, &[]);
    let ids: Vec<&str> = all["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"gpt-4o") && ids.contains(&"claude-sonnet-4.5"),
        "{ids:?}"
    );
    assert!(
        !ids.contains(&"test-box") && !ids.contains(&"smollm2-135m-instruct"),
        "{ids:?}"
    );

    let o = f.cost(&[
        "breakeven",
        "--hardware-usd-per-hour",
        "3.6",
        "--prefill-tokens-per-s",
        "10000",
        "--input-tokens",
        "1",
        "--output-tokens",
        "1",
    ]);
    fails(
        &o,
        &["--tokens-per-s T, or as both --prefill-tokens-per-s P and --decode-tokens-per-s D"],
    );
    let o = f.cost(&[
        "breakeven",
        "--hardware-usd-per-hour",
        "-1",
        "--tokens-per-s",
        "10",
        "--input-tokens",
        "1",
        "--output-tokens",
        "1",
    ]);
    fails(&o, &["hardware_usd_per_hour is -1", ">= 0"]);
    let o = f.cost(&[
        "breakeven",
        "--hardware-usd-per-hour",
        "1",
        "--tokens-per-s",
        "0",
        "--input-tokens",
        "1",
        "--output-tokens",
        "1",
    ]);
    fails(&o, &["prefill_tokens_per_s is 0", "> 0"]);
}

// ---- audit ----

const SYSTEM: &str = "You are a helpful assistant.";
const HISTORY_USER: &str = "tiktoken is great!";
const HISTORY_ASSISTANT: &str = "2 + 2 = 4";
const NEW_USER: &str = "What is the weather in Paris?";

fn messages() -> Value {
    json!([
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": HISTORY_USER},
        {"role": "assistant", "content": HISTORY_ASSISTANT},
        {"role": "user", "content": NEW_USER},
    ])
}

fn weather_tool() -> Value {
    json!({"name": "get_weather", "description": "Get the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}})
}

fn request(tools: bool) -> Value {
    let mut r = json!({"model": "gpt-4o", "messages": messages()});
    if tools {
        r["tools"] = json!([{"type": "function", "function": weather_tool()}]);
    }
    r
}

/// `ferrolm tokenize` with the default model: the count.
fn tokenize(args: &[&str]) -> u64 {
    let o = ferrolm()
        .arg("tokenize")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    json_of(&o)["count"].as_u64().unwrap()
}

fn audit(f: &Fixture, file: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["audit", "--json"];
    let file = file.to_str().unwrap();
    args.push(file);
    args.extend(extra);
    json_of(&f.cost(&args))
}

#[test]
fn tiktoken_gives_the_published_counts() {
    // From OpenAI's cookbook "How to count tokens with tiktoken".
    let o200k = tiktoken_rs::o200k_base().unwrap();
    let cl100k = tiktoken_rs::cl100k_base().unwrap();
    assert_eq!(
        cl100k.encode_ordinary("tiktoken is great!"),
        [83, 1609, 5963, 374, 2294, 0]
    );
    assert_eq!(
        o200k.encode_ordinary("tiktoken is great!"),
        [83, 8251, 2488, 382, 2212, 0]
    );
    for (text, cl, o) in [
        ("antidisestablishmentarianism", 6, 6),
        ("2 + 2 = 4", 7, 7),
        ("お誕生日おめでとう", 9, 8),
    ] {
        assert_eq!(cl100k.encode_ordinary(text).len(), cl, "{text}");
        assert_eq!(o200k.encode_ordinary(text).len(), o, "{text}");
    }
    assert_eq!(o200k.encode_ordinary("hello world"), [24912, 2375]);
}

#[test]
fn audit_counts_each_part_with_each_models_tokenizer() {
    default_model();
    let f = Fixture::new();
    let file = f.write("req.json", &request(true).to_string());
    let v = audit(
        &f,
        &file,
        &[
            "-m",
            "gpt-4o",
            "-m",
            "gpt-4-cl",
            "-m",
            "claude-sonnet-4.5",
            "-m",
            "test-box",
            "--requests",
            "1000",
        ],
    );
    let r = &v["requests"][0];
    assert_eq!(r["line"], Value::Null);
    let parts = r["parts"].as_array().unwrap();
    let kinds: Vec<(&str, &str)> = parts
        .iter()
        .map(|p| (p["kind"].as_str().unwrap(), p["label"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("system", "messages[0]"),
            ("tool", "get_weather"),
            ("history", "messages[1]"),
            ("history", "messages[2]"),
            ("new", "messages[3]")
        ]
    );
    let tokens = |tok: &str| -> Vec<u64> {
        parts
            .iter()
            .map(|p| p["tokens"][tok].as_u64().unwrap())
            .collect()
    };

    // o200k_base and cl100k_base: the counts the tokenizers give, checked above against the
    // cookbook's where it has them; the tool is the compact JSON of its function.
    let tool_json = serde_json::to_string(&weather_tool()).unwrap();
    let o200k = tiktoken_rs::o200k_base().unwrap();
    let cl100k = tiktoken_rs::cl100k_base().unwrap();
    let o_tool = o200k.encode_ordinary(&tool_json).len() as u64;
    let cl_tool = cl100k.encode_ordinary(&tool_json).len() as u64;
    assert_eq!(tokens("o200k_base"), [6, o_tool, 6, 7, 7]);
    assert_eq!(tokens("cl100k_base"), [6, cl_tool, 6, 7, 7]);
    // OpenAI's rule: 4 messages × (3 + 1 role token) + 3 priming the reply = 19.
    let o = r["tokenizers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tokenizer"] == "o200k_base")
        .unwrap();
    assert_eq!(o["framing_tokens"], 19);
    assert_eq!(o["prompt_tokens"], 26 + o_tool + 19);
    assert_eq!(o["static_prefix_tokens"], 6 + o_tool);

    // Our model: each part is what `ferrolm tokenize` counts, and the messages together are
    // what `ferrolm tokenize --chat` counts (tools are added as their JSON).
    let ours = tokens("SmolLM2-135M-Instruct.Q4_1");
    let want: Vec<u64> = [
        SYSTEM,
        &tool_json,
        HISTORY_USER,
        HISTORY_ASSISTANT,
        NEW_USER,
    ]
    .iter()
    .map(|t| tokenize(&[t]))
    .collect();
    assert_eq!(ours, want);
    let chat = tokenize(&["--chat", &messages().to_string()]);
    let g = r["tokenizers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tokenizer"] == "SmolLM2-135M-Instruct.Q4_1")
        .unwrap();
    assert_eq!(g["prompt_tokens"].as_u64().unwrap(), chat + ours[1]);

    // Prices per model, with the tokenizer each model uses.
    let model = |id: &str| {
        r["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["model"] == id)
            .unwrap()
            .clone()
    };
    let four_o = model("gpt-4o");
    assert_eq!(
        (four_o["tokenizer"].as_str(), four_o["exact"].as_bool()),
        (Some("o200k_base"), Some(true))
    );
    let (total, fixed) = (26 + o_tool + 19, 6 + o_tool);
    close(&four_o["per_request_usd"], total as f64 * 2.5 / 1e6);
    close(
        &four_o["per_request_cached_usd"],
        ((total - fixed) as f64 * 2.5 + fixed as f64 * 1.25) / 1e6,
    );
    close(&four_o["monthly_usd"], 1000.0 * total as f64 * 2.5 / 1e6);
    close(
        &four_o["monthly_cached_usd"],
        (total as f64 * 2.5 + 999.0 * ((total - fixed) as f64 * 2.5 + fixed as f64 * 1.25)) / 1e6,
    );
    let claude = model("claude-sonnet-4.5");
    assert_eq!(
        (claude["tokenizer"].as_str(), claude["exact"].as_bool()),
        (Some("o200k_base"), Some(false))
    );
    assert_eq!(claude["prompt_tokens"], total);
    assert_eq!(model("gpt-4-cl")["prompt_tokens"], 26 + cl_tool + 19);
    let b = model("test-box");
    assert_eq!(
        (b["prompt_tokens"].as_u64(), b["exact"].as_bool()),
        (Some(chat + ours[1]), Some(true))
    );
    // A single request: the total is that request.
    assert_eq!(v["total"], r["models"]);

    // The text report labels approximations.
    let o = f.cost(&[
        "audit",
        file.to_str().unwrap(),
        "-m",
        "claude-sonnet-4.5",
        "-m",
        "gpt-4o",
    ]);
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("claude-sonnet-4.5") && l.contains("o200k_base (approx)")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("gpt-4o") && !l.contains("approx")),
        "{text}"
    );
}

#[test]
fn audit_without_tools_matches_tokenize_chat_exactly() {
    default_model();
    let f = Fixture::new();
    let file = f.write("plain.json", &request(false).to_string());
    let v = audit(&f, &file, &["-m", "test-box"]);
    let chat = tokenize(&["--chat", &messages().to_string()]);
    assert_eq!(
        v["requests"][0]["models"][0]["prompt_tokens"]
            .as_u64()
            .unwrap(),
        chat
    );
    assert_eq!(
        v["requests"][0]["models"][0]["static_prefix_tokens"]
            .as_u64()
            .unwrap(),
        tokenize(&[SYSTEM])
    );
}

#[test]
fn audit_jsonl_prices_each_line_and_the_total() {
    let f = Fixture::new();
    let short = json!({"messages": [{"role": "user", "content": "hello world"}]});
    let text = format!("{}\n\n{}\n", request(false), short);
    let file = f.write("reqs.jsonl", &text);
    let v = audit(&f, &file, &["-m", "gpt-4o", "--requests", "10"]);
    let reqs = v["requests"].as_array().unwrap();
    assert_eq!(reqs.len(), 2, "the blank line is skipped");
    assert_eq!(
        (reqs[0]["line"].as_u64(), reqs[1]["line"].as_u64()),
        (Some(1), Some(3))
    );
    // Line 1: 26 text + 19 framing. Line 3: "hello world" is 2 tokens + 1 × 4 + 3 = 9.
    assert_eq!(reqs[0]["models"][0]["prompt_tokens"], 45);
    assert_eq!(reqs[1]["models"][0]["prompt_tokens"], 9);
    assert_eq!(reqs[1]["parts"][0]["kind"], "new");
    let t = &v["total"][0];
    assert_eq!(t["prompt_tokens"], 54);
    close(&t["per_request_usd"], 54.0 * 2.5 / 1e6);
    close(&t["monthly_usd"], 10.0 * 54.0 * 2.5 / 1e6);
}

#[test]
fn audit_errors_name_the_file_and_the_line() {
    let f = Fixture::new();
    let jsonl = f.write(
        "bad.jsonl",
        &format!("{}\n{{\"messages\": [}}\n", request(false)),
    );
    let o = f.cost(&["audit", jsonl.to_str().unwrap(), "-m", "gpt-4o"]);
    fails(
        &o,
        &[
            "bad.jsonl: line 2, column",
            "not valid JSON",
            "one chat request object",
        ],
    );
    let json_file = f.write("bad.json", "{\"messages\": \n  [}");
    let o = f.cost(&["audit", json_file.to_str().unwrap(), "-m", "gpt-4o"]);
    fails(&o, &["bad.json: not valid JSON", "line 2"]);
    let no_messages = f.write(
        "none.jsonl",
        &format!("{}\n{{\"model\": \"x\"}}\n", request(false)),
    );
    let o = f.cost(&["audit", no_messages.to_str().unwrap(), "-m", "gpt-4o"]);
    fails(&o, &["none.jsonl: line 2: `messages` is missing"]);
    let empty = f.write("empty.json", "{\"messages\": []}");
    let o = f.cost(&["audit", empty.to_str().unwrap(), "-m", "gpt-4o"]);
    fails(&o, &["empty.json: `messages` is empty"]);
    let bad_content = f.write(
        "content.json",
        "{\"messages\": [{\"role\": \"user\", \"content\": 5}]}",
    );
    let o = f.cost(&["audit", bad_content.to_str().unwrap(), "-m", "gpt-4o"]);
    fails(&o, &["content.json: messages[0].content is 5"]);
    let o = f.cost(&["audit", "/nonexistent/req.json", "-m", "gpt-4o"]);
    fails(&o, &["cannot read /nonexistent/req.json"]);
}

#[test]
fn breakeven_draws_a_chart_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("be.svg");
    let out = ferrolm()
        .args([
            "cost",
            "breakeven",
            "--hardware-usd-per-hour",
            "0.10",
            "--tokens-per-s",
            "500",
            "--input-tokens",
            "1000",
            "--output-tokens",
            "200",
            "--model",
            "gpt-4o",
            "--model",
            "gpt-4o-mini",
            "--chart",
        ])
        .arg(&svg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    // The machine and the two hosted models, one line each, named in the legend.
    assert_eq!(text.matches("<polyline").count(), 3, "{text}");
    assert!(
        text.contains(">gpt-4o<") && text.contains(">gpt-4o-mini<"),
        "{text}"
    );
}
