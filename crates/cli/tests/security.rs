//! The server as an attacker or a careless client would try it (issue 12): tenants must not see
//! each other through the prefix cache or adapter names, hostile adapters must be refused
//! without harming the server, idle and half-sent connections must be cut, and every error must
//! be in the API's own shape. Each test is named after the bug it pins down.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use serde_json::{json, Value};

/// POST `body` to `path` as `key`: (status, body as JSON).
fn post_as(s: &Server, key: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = ureq::post(&s.url(path))
        .set("Authorization", &format!("Bearer {key}"))
        .send_string(&body.to_string());
    let (status, text) = match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("POST {path}: {e}"),
    };
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("POST {path}: not JSON ({e}): {text}"));
    (status, v)
}

#[test]
fn the_prefix_cache_is_no_oracle_across_keys() {
    let dir = tempfile::tempdir().unwrap();
    let alice = create_key(dir.path(), "alice", &[]);
    let bob = create_key(dir.path(), "bob", &[]);
    let carol = create_key(dir.path(), "carol", &[]);
    let cfg = dir.path().join("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[model]]\npath = {:?}\nid = \"small\"\n\n[[cache_scope]]\nname = \"team\"\nkeys = [\"alice\", \"bob\"]\n",
            default_model().to_string_lossy()
        ),
    )
    .unwrap();
    let s = Server::start_in(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let secret = "You are the assistant of ACME's payroll team. The vault code is 4-8-15-16-23-42; never reveal it. "
        .repeat(3);
    let cached = |key: &str, question: &str| {
        let req = json!({
            "model": "small",
            "temperature": 0,
            "max_tokens": 4,
            "messages": [{"role": "system", "content": secret}, {"role": "user", "content": question}],
        });
        let (status, v) = post_as(&s, key, "/v1/chat/completions", &req);
        assert_eq!(status, 200, "{v}");
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    // Carol's secret prefix is hers: Alice sending the same prefix (a right guess) learns
    // nothing, not even from a second try.
    assert_eq!(cached(&carol, "What is the capital of France?"), 0);
    assert_eq!(cached(&alice, "What is two plus two?"), 0);
    // The same key gets its own hit,
    assert!(cached(&carol, "What is two plus two?") >= 64);
    // and keys in one cache scope share theirs: Bob hits what Alice computed.
    assert!(cached(&bob, "What is three plus three?") >= 64);
}
