//! Lazy tool loading against a live server and the default model: the lazy prompt is smaller,
//! a `load_tools` round runs inside one request (chat completions, streamed and not, and the
//! Responses API) and the client sees only the final call, the ledger and `ferrolm usage
//! --savings` show the tokens saved, and the strategy is chosen per request, per model (config
//! file) and per server (flags), with inconsistent requests refused.
//!
//! SmolLM2-135M rarely calls `load_tools` by itself, so the round trips use
//! `tool_choice: "required"`, which forces (by grammar) a `load_tools` call and then a call of a
//! real tool: the model still picks the names, at temperature 0.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use serde_json::{json, Value};

/// The 40-tool request set of the benchmark (`scripts/lazy_tools.py`).
fn forty_tools() -> (Value, Vec<Value>) {
    let path = repo_root().join("data/lazy_tools/requests.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the request set is part of the repo)",
            path.display()
        )
    });
    let v: Value = serde_json::from_str(&text).unwrap();
    let tools = v["tools"].clone();
    assert_eq!(tools.as_array().unwrap().len(), 40);
    (tools, v["requests"].as_array().unwrap().clone())
}

/// POST `body`; (status, the `x-ferrolm-tools` header, body text).
fn post(s: &Server, path: &str, body: &Value) -> (u16, Option<String>, String) {
    let r = ureq::post(&s.url(path))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string());
    let r = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST {path}: {e}"),
    };
    let status = r.status();
    let header = r.header("x-ferrolm-tools").map(str::to_owned);
    (status, header, r.into_string().unwrap())
}

fn json_body(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// `lazy; tools=N; prompt_tokens=E->L` → (N, E, L).
fn parse_header(h: &str) -> (usize, usize, usize) {
    let field = |k: &str| {
        h.split("; ")
            .find_map(|p| p.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {h}"))
            .to_owned()
    };
    assert!(h.starts_with("lazy; "), "{h}");
    let (e, l) = field("prompt_tokens=")
        .split_once("->")
        .map(|(e, l)| (e.parse().unwrap(), l.parse().unwrap()))
        .unwrap();
    (field("tools=").parse().unwrap(), e, l)
}

fn chat(tools: &Value, content: &str, extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": content}],
        "tools": tools,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[test]
fn lazy_tools_by_flag_shrink_the_prompt_load_inside_one_request_and_show_in_the_ledger() {
    let (tools, requests) = forty_tools();
    let ask = requests[0]["content"].as_str().unwrap();
    let s = Server::start(&["--tool-strategy", "lazy", "--lazy-tools-threshold", "8"]);

    // The request may still ask for every definition.
    let (status, header, text) = post(
        &s,
        "/v1/chat/completions",
        &chat(
            &tools,
            ask,
            json!({"max_tokens": 1, "tool_strategy": "eager"}),
        ),
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(header, None, "an eager request has no x-ferrolm-tools");
    let eager = json_body(&text)["usage"]["prompt_tokens"].as_u64().unwrap() as usize;

    // By the flag: 40 tools > 8, so the prompt lists names and `load_tools`.
    let (status, header, text) = post(
        &s,
        "/v1/chat/completions",
        &chat(&tools, ask, json!({"max_tokens": 1})),
    );
    assert_eq!(status, 200, "{text}");
    let (n, e, lazy) = parse_header(&header.unwrap());
    assert_eq!(
        (n, e),
        (40, eager),
        "the header's eager count is the eager request's"
    );
    let v = json_body(&text);
    assert_eq!(v["usage"]["prompt_tokens"], lazy, "{v}");
    assert!(
        lazy * 2 < eager,
        "the lazy prompt ({lazy} tokens) should be far smaller than the eager one ({eager})"
    );
    let mut saved = (eager - lazy) as i64;

    // A load_tools round inside one request: the client sees one real call, never load_tools.
    let names: Vec<&str> = tools
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    let forced = chat(
        &tools,
        ask,
        json!({"max_tokens": 200, "tool_choice": "required"}),
    );
    let (status, header, text) = post(&s, "/v1/chat/completions", &forced);
    assert_eq!(status, 200, "{text}");
    assert_eq!(parse_header(&header.unwrap()).2, lazy);
    assert!(!text.contains("load_tools"), "{text}");
    let v = json_body(&text);
    let m = &v["choices"][0]["message"];
    let calls = m["tool_calls"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(calls.len(), 1, "{v}");
    assert!(
        names.contains(&calls[0]["function"]["name"].as_str().unwrap()),
        "{v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let u = &v["usage"];
    let prompt = u["prompt_tokens"].as_u64().unwrap() as usize;
    // Two passes ran: the first prompt, then it with the call and the definitions.
    assert!(
        prompt > 2 * lazy,
        "usage {u}: the second pass's prompt is counted"
    );
    assert!(
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap() as usize
            > lazy,
        "usage {u}: the prefix cache serves the second pass the first one's prompt"
    );
    saved += eager as i64 - prompt as i64;

    // Streamed: the same passes, the same answer, no load_tools on the wire.
    let mut streamed = forced.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, _, text) = post(&s, "/v1/chat/completions", &streamed);
    assert_eq!(status, 200, "{text}");
    assert!(!text.contains("load_tools"), "{text}");
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(json_body)
        .collect();
    let stream_calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(stream_calls.len(), 1, "{text}");
    assert_eq!(stream_calls[0]["function"], calls[0]["function"], "{text}");
    let su = &chunks.last().unwrap()["usage"];
    assert_eq!(
        (su["prompt_tokens"].clone(), su["completion_tokens"].clone()),
        (u["prompt_tokens"].clone(), u["completion_tokens"].clone()),
        "streamed and not, one request's passes are the same"
    );
    saved += eager as i64 - su["prompt_tokens"].as_i64().unwrap();

    // The Responses API, through the same pipeline.
    let rtools: Vec<Value> = tools
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let mut f = t["function"].clone();
            f["type"] = json!("function");
            f
        })
        .collect();
    let (status, header, text) = post(
        &s,
        "/v1/responses",
        &json!({"input": ask, "tools": rtools, "tool_choice": "required", "temperature": 0,
                "max_output_tokens": 200}),
    );
    assert_eq!(status, 200, "{text}");
    assert!(!text.contains("load_tools"), "{text}");
    let (_, r_eager, _) = parse_header(&header.unwrap());
    let v = json_body(&text);
    let out = v["output"].as_array().unwrap();
    assert_eq!(out.len(), 1, "{v}");
    assert_eq!(out[0]["type"], "function_call", "{v}");
    assert!(names.contains(&out[0]["name"].as_str().unwrap()), "{v}");
    saved += r_eager as i64 - v["usage"]["input_tokens"].as_i64().unwrap();

    // The ledger: the tokens saved, per request, summed in the usage report...
    let (status, v) = s.get("/v1/usage?by=model");
    assert_eq!(status, 200, "{v}");
    let g = &v["data"][0];
    assert_eq!(g["requests"], 5, "{v}");
    assert_eq!(g["lazy_tool_tokens"].as_i64().unwrap(), saved, "{v}");
    assert!(g["saved_by_lazy_tools_usd"].as_f64().is_some(), "{v}");
    // ... and in `ferrolm usage --savings`.
    let out = ferrolm()
        .args(["usage", "--savings", "--json", "--data-dir"])
        .arg(&s.data_dir)
        .output()
        .unwrap();
    let report = json_of(&out);
    assert_eq!(report["total"]["lazy_tool_tokens"].as_i64().unwrap(), saved);
    let out = ferrolm()
        .args(["usage", "--savings", "--data-dir"])
        .arg(&s.data_dir)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("SAVED_LAZY_TOOLS") && table.contains("LAZY_TOOL_TOKENS"),
        "{table}"
    );
    assert!(table.contains(&saved.to_string()), "{table}");
}

/// Twelve short tools (about 500 tokens of JSON), or the first `n`.
fn tools_of(n: usize) -> Value {
    let (tools, _) = forty_tools();
    Value::Array(tools.as_array().unwrap()[..n].to_vec())
}

#[test]
fn tool_strategy_is_chosen_per_request_model_and_server_and_bad_requests_are_400s() {
    let (status, header, text) = {
        // Default: eager, whatever the number of tools.
        let plain = Server::start(&[]);
        post(
            &plain,
            "/v1/chat/completions",
            &chat(&tools_of(12), "Hi", json!({"max_tokens": 1})),
        )
    };
    assert_eq!(status, 200, "{text}");
    assert_eq!(header, None, "eager by default");

    // A model's config entry: lazy past 300 tokens of tool JSON (beside the `--model` that
    // `Server::start` gives, which stays eager).
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[model]]\npath = {:?}\nid = \"lazy\"\ntool_strategy = \"lazy\"\nlazy_tools_threshold = \"300tokens\"\n",
            default_model().display().to_string()
        ),
    )
    .unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap()]);
    let ask = |tools: Value, mut extra: Value| {
        extra["model"] = json!("lazy");
        post(
            &s,
            "/v1/chat/completions",
            &chat(&tools, "What's the weather in Oslo?", extra),
        )
    };
    let (status, header, text) = ask(tools_of(2), json!({"max_tokens": 1}));
    assert_eq!(
        (status, header),
        (200, None),
        "two tools stay under 300 tokens: {text}"
    );
    let (status, header, text) = ask(tools_of(12), json!({"max_tokens": 1}));
    assert_eq!(status, 200, "{text}");
    assert_eq!(parse_header(&header.unwrap()).0, 12);
    // The request overrides the model: eager, or its own threshold.
    let (status, header, text) = ask(
        tools_of(12),
        json!({"max_tokens": 1, "tool_strategy": "eager"}),
    );
    assert_eq!((status, header), (200, None), "{text}");
    let (status, header, text) = ask(
        tools_of(2),
        json!({"max_tokens": 1, "lazy_tools_threshold": 1}),
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(parse_header(&header.unwrap()).0, 2);
    // Ollama's chat takes the same fields.
    let (status, header, text) = post(
        &s,
        "/api/chat",
        &json!({"model": "lazy", "stream": false, "tools": tools_of(12),
                "messages": [{"role": "user", "content": "Hi"}], "options": {"num_predict": 1}}),
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(parse_header(&header.unwrap()).0, 12);

    // Inconsistent requests are 400s that say what to change.
    let mut own = tools_of(12);
    own[0]["function"]["name"] = json!("load_tools");
    let named_load = json!({"type": "function", "function": {"name": "load_tools"}});
    for (tools, extra, says) in [
        (own, json!({}), "rename your tool"),
        (
            tools_of(2),
            json!({"tool_choice": named_load}),
            "exists only when tools load lazily",
        ),
        (
            tools_of(12),
            json!({"tool_strategy": "lazy", "n": 2}),
            "one choice per request",
        ),
        (
            tools_of(12),
            json!({"tool_strategy": "sometimes"}),
            "sometimes",
        ),
        (
            tools_of(12),
            json!({"lazy_tools_threshold": "lots"}),
            "1500tokens",
        ),
    ] {
        let mut extra = extra;
        extra["max_tokens"] = json!(1);
        let (status, _, text) = ask(tools, extra.clone());
        assert_eq!(status, 400, "{extra}: {text}");
        let msg = json_body(&text)["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(msg.contains(says), "{extra}: {msg}");
    }
    let (status, _, text) = post(
        &s,
        "/v1/responses",
        &json!({"model": "lazy", "input": "Hi", "tool_strategy": "sometimes", "max_output_tokens": 1}),
    );
    assert_eq!(status, 400, "{text}");
}

#[test]
fn an_upstream_model_gets_every_definition_and_no_tool_strategy_field() {
    // A is the upstream (a ferrolm, which would honour `tool_strategy`: its ledger shows
    // whether the field reached it); B proxies it as `remote`.
    let a = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[model]]\nid = \"remote\"\nupstream = \"{}/v1\"\nupstream_model = \"smollm2-135m-instruct\"\n",
            a.base
        ),
    )
    .unwrap();
    let b = Server::start(&["--config", cfg.to_str().unwrap()]);
    let (status, _, text) = post(
        &b,
        "/v1/chat/completions",
        &chat(
            &tools_of(12),
            "Hi",
            json!({"model": "remote", "max_tokens": 1, "tool_strategy": "lazy",
                   "lazy_tools_threshold": 1}),
        ),
    );
    assert_eq!(status, 200, "{text}");
    let (status, v) = a.get("/v1/usage?by=model");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"][0]["requests"], 1, "{v}");
    assert_eq!(v["data"][0]["lazy_tool_tokens"], 0, "{v}");
}
