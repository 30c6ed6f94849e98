//! Times `Matcher::fill_mask` on a 49,152-token synthetic byte-level-BPE-like vocabulary in
//! typical JSON states. Run with
//! `cargo test -p ferrolm-grammar --release --test timing -- --ignored --nocapture`.
//!
//! To time a real vocabulary instead, point `FERROLM_GRAMMAR_VOCAB` at a file with one token per
//! line, its bytes in hex, an empty line for a special token (for a GGUF, decode
//! `tokenizer.ggml.tokens` from the GPT-2 byte alphabet and blank the non-normal token types).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::{grammar, schemas, synthetic_vocab};
use ferrolm_grammar::{Grammar, Matcher, Vocab};
use serde_json::json;

#[test]
#[ignore = "timing: run by hand in release mode"]
fn fill_mask_timing() {
    let tokens: Vec<Option<Vec<u8>>> = match std::env::var("FERROLM_GRAMMAR_VOCAB") {
        Ok(path) => {
            let text = std::fs::read_to_string(&path).unwrap();
            let hex = |s: &str| {
                (0..s.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                    .collect::<Vec<u8>>()
            };
            println!("vocabulary: {path}");
            text.lines()
                .map(|l| (!l.is_empty()).then(|| hex(l)))
                .collect()
        }
        Err(_) => {
            println!("vocabulary: synthetic");
            synthetic_vocab(49_152, 42).into_iter().map(Some).collect()
        }
    };
    let t0 = Instant::now();
    let vocab = Vocab::new(tokens.clone());
    println!(
        "Vocab::new for {} tokens: {:.1} ms ({vocab:?})",
        tokens.len(),
        t0.elapsed().as_secs_f64() * 1e3
    );

    let person = schemas()
        .into_iter()
        .find(|(n, _)| *n == "nested objects")
        .unwrap()
        .1;
    let object = Arc::new(Grammar::json_object());
    let person = grammar(&person);
    let tool = Arc::new(
        Grammar::tool_calls(
            &[ferrolm_grammar::ToolSpec { name: "get_weather".into(), parameters: json!({"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}) }],
            false,
        )
        .unwrap(),
    );
    let cases: Vec<(&str, &Arc<Grammar>, &str)> = vec![
        ("json_object: start", &object, ""),
        ("json_object: after {", &object, "{"),
        ("json_object: inside a key", &object, "{\"na"),
        (
            "json_object: inside a string value",
            &object,
            "{\"name\": \"Al",
        ),
        ("json_object: in a number", &object, "{\"age\": 12"),
        (
            "json_object: after a value",
            &object,
            "{\"a\": [1, {\"b\": true}",
        ),
        ("schema: after {", &person, "{"),
        (
            "schema: inside a string (maxLength 12)",
            &person,
            "{\"age\": 3, \"name\": \"Al",
        ),
        ("schema: in a bounded integer", &person, "{\"age\": 1"),
        (
            "tool call: arguments string",
            &tool,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"location\": \"Par",
        ),
    ];
    let mut mask = vec![false; vocab.len()];
    for (what, g, prefix) in cases {
        let mut m = Matcher::new((*g).clone());
        m.accept(prefix.as_bytes()).unwrap();
        m.fill_mask(&vocab, &mut mask); // warm up
        let n = 50;
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            m.fill_mask(&vocab, &mut mask);
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let allowed = mask.iter().filter(|&&a| a).count();
        // `allows` on one allowed token (what the engine tries before building a mask).
        let token = (0..mask.len())
            .find(|&t| mask[t] && tokens[t].as_ref().is_some_and(|b| b.len() >= 3))
            .and_then(|t| tokens[t].clone())
            .unwrap_or_default();
        let t = Instant::now();
        for _ in 0..1000 {
            assert!(m.allows(&token));
        }
        let allows_us = t.elapsed().as_secs_f64() * 1e3;
        println!(
            "{what:42} fill_mask p50 {:.3} ms  p90 {:.3} ms  max {:.3} ms  ({allowed:5} allowed)  allows({} bytes) {allows_us:.1} us",
            times[n / 2],
            times[n * 9 / 10],
            times[n - 1],
            token.len()
        );
    }
}
