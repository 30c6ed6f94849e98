//! Forced tool calls: every completed output is one (or, parallel, several) Hermes
//! `<tool_call>` blocks whose JSON parses, names one of the tools, and whose arguments satisfy
//! that tool's schema.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{random_walk, validate, Rng};
use ferrolm_grammar::{Grammar, GrammarError, Matcher, ToolSpec};
use serde_json::{json, Value};

fn tools() -> Vec<ToolSpec> {
    vec![
        ToolSpec {
            name: "get_weather".into(),
            parameters: json!({
                "type": "object",
                "properties": {"location": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
                "required": ["location"],
                "additionalProperties": false
            }),
        },
        // Shares a prefix with get_weather: the name alone must pick the arguments schema.
        ToolSpec {
            name: "get_weather_alerts".into(),
            parameters: json!({
                "type": "object",
                "properties": {"region": {"type": "string", "maxLength": 5}, "severity": {"type": "integer", "minimum": 1, "maximum": 5}},
                "required": ["region", "severity"],
                "additionalProperties": false
            }),
        },
        ToolSpec {
            name: "now".into(),
            parameters: json!({"type": "object", "properties": {}, "additionalProperties": false}),
        },
        ToolSpec {
            name: "free \"form\"".into(),
            parameters: Value::Null,
        },
    ]
}

/// Splits the output into calls and checks each: returns the tool names called.
fn check_calls(out: &[u8], tools: &[ToolSpec]) -> Vec<String> {
    let text = std::str::from_utf8(out).unwrap();
    let mut names = Vec::new();
    for block in text.split("\n</tool_call>").filter(|b| !b.is_empty()) {
        let block = block.strip_prefix('\n').unwrap_or(block);
        let body = block
            .strip_prefix("<tool_call>\n")
            .unwrap_or_else(|| panic!("bad block {block:?} in {text:?}"));
        let call: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{body:?}: {e}"));
        let obj = call.as_object().unwrap();
        assert_eq!(obj.len(), 2, "{body}");
        let name = obj["name"].as_str().unwrap();
        let tool = tools
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("unknown tool {name:?}"));
        let schema = if tool.parameters.is_null() {
            json!({"type": "object"})
        } else {
            tool.parameters.clone()
        };
        validate(&obj["arguments"], &schema, &schema).unwrap_or_else(|e| panic!("{body}: {e}"));
        names.push(name.to_string());
    }
    names
}

#[test]
fn random_tool_calls_are_valid() {
    let tools = tools();
    for parallel in [false, true] {
        let g = Arc::new(Grammar::tool_calls(&tools, parallel).unwrap());
        let mut rng = Rng::new(u64::from(parallel));
        let mut seen = std::collections::HashSet::new();
        let mut multi = 0;
        for _ in 0..120 {
            let out = random_walk(&g, &mut rng, 400);
            let names = check_calls(&out, &tools);
            assert!(
                parallel || names.len() == 1,
                "{:?}",
                String::from_utf8_lossy(&out)
            );
            multi += usize::from(names.len() > 1);
            seen.extend(names);
        }
        assert_eq!(
            seen.len(),
            tools.len(),
            "every tool should be called at least once: {seen:?}"
        );
        assert!(!parallel || multi > 0, "no parallel call was generated");
    }
}

#[test]
fn the_name_picks_the_arguments_schema() {
    let g = Arc::new(Grammar::tool_calls(&tools(), false).unwrap());
    let good = "<tool_call>\n{\"name\": \"get_weather_alerts\", \"arguments\": {\"region\": \"EU\", \"severity\": 3}}\n</tool_call>";
    let mut m = Matcher::new(g.clone());
    m.accept(good.as_bytes()).unwrap();
    assert!(m.is_finished(), "a single call must end generation");

    let reject_at = |doc: &str| -> Option<usize> {
        let mut m = Matcher::new(g.clone());
        doc.bytes().position(|b| m.accept(&[b]).is_err())
    };
    let prefix = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"";
    // get_weather's arguments do not take "region"
    assert_eq!(
        reject_at(&format!("{prefix}region\": \"EU\"}}}}\n</tool_call>")),
        Some(prefix.len())
    );
    // unknown tool
    let p = "<tool_call>\n{\"name\": \"get_";
    assert_eq!(
        reject_at(&format!("{p}time\", \"arguments\": {{}}}}\n</tool_call>")),
        Some(p.len())
    );
    // the escaped name is written as serde_json writes it
    let mut m = Matcher::new(g.clone());
    m.accept(b"<tool_call>\n{\"name\": \"free \\\"form\\\"\", \"arguments\": {\"any\": [1]}}\n</tool_call>").unwrap();
    assert!(m.is_finished());
}

#[test]
fn parallel_calls_are_separated_by_a_newline() {
    let g = Arc::new(Grammar::tool_calls(&tools(), true).unwrap());
    let call = "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
    let mut m = Matcher::new(g);
    m.accept(call.as_bytes()).unwrap();
    assert!(m.is_complete() && !m.is_finished());
    assert!(!m.allows(b" "));
    m.accept(format!("\n{call}").as_bytes()).unwrap();
    assert!(m.is_complete());
}

#[test]
fn bad_tool_lists_are_errors() {
    assert!(matches!(
        Grammar::tool_calls(&[], false),
        Err(GrammarError::InvalidSchema { .. })
    ));
    let twice = vec![tools()[0].clone(), tools()[0].clone()];
    assert!(matches!(
        Grammar::tool_calls(&twice, false),
        Err(GrammarError::InvalidSchema { .. })
    ));
    let bad = vec![ToolSpec {
        name: "f".into(),
        parameters: json!({"type": "object", "properties": {"x": {"pattern": "a"}}}),
    }];
    match Grammar::tool_calls(&bad, false) {
        Err(GrammarError::Unsupported { keyword, path }) => {
            assert_eq!(keyword, "pattern");
            assert_eq!(path, "tool \"f\" #/properties/x");
        }
        other => panic!("{other:?}"),
    }
}
