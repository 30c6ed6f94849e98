//! Hostile or extreme schemas (they come from API clients): compiling and matching must stay
//! bounded in time and stack, and whatever is produced must still be valid.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check_document, close, Rng};
use ferrolm_grammar::{Grammar, GrammarError, Matcher, Vocab};
use serde_json::{json, Map, Value};

#[test]
fn public_types_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Grammar>();
    assert_send_sync::<Vocab>();
    assert_send_sync::<Matcher>();
    assert_send_sync::<GrammarError>();
}

#[test]
fn ambiguity_at_every_level_stays_bounded_and_valid() {
    // Two branches that read "[" the same way at every level: 2^depth parse stacks uncapped.
    let schema = json!({
        "$defs": {"a": {"anyOf": [
            {"type": "array", "items": {"$ref": "#/$defs/a"}},
            {"type": "array", "items": {"$ref": "#/$defs/a"}, "maxItems": 9}
        ]}},
        "$ref": "#/$defs/a"
    });
    let g = Arc::new(Grammar::json_schema(&schema).unwrap());
    let start = Instant::now();
    let mut m = Matcher::new(g);
    let mut out = vec![b'['; 40];
    for _ in 0..40 {
        m.accept(b"[").unwrap();
    }
    close(&mut m, &mut out, &mut Rng::new(1));
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}",
        start.elapsed()
    );
    check_document(&out, &schema);
}

#[test]
fn a_very_long_declared_key_compiles() {
    let long = "k".repeat(100_000);
    let mut props = Map::new();
    props.insert(long.clone(), json!({"type": "integer"}));
    let schema = json!({"type": "object", "properties": Value::Object(props)});
    let g = Arc::new(Grammar::json_schema(&schema).unwrap());
    // The long key itself is the declared property, so a string value is refused...
    let mut m = Matcher::new(g.clone());
    m.accept(format!("{{\"{long}\": ").as_bytes()).unwrap();
    assert!(!m.allows(b"\""));
    // ...and one byte less makes it an extra key that takes anything.
    let mut m = Matcher::new(g);
    m.accept(format!("{{\"{}\": \"x\"}}", &long[1..]).as_bytes())
        .unwrap();
    assert!(m.is_finished());
}

#[test]
fn deep_ref_chains_are_an_error_not_a_stack_overflow() {
    let mut defs = Map::new();
    for i in 0..1000 {
        defs.insert(
            format!("d{i}"),
            json!({"$ref": format!("#/$defs/d{}", i + 1)}),
        );
    }
    defs.insert("d1000".into(), json!({"type": "integer"}));
    let schema = json!({"$defs": Value::Object(defs), "$ref": "#/$defs/d0"});
    match Grammar::json_schema(&schema) {
        Err(GrammarError::InvalidSchema { message, .. }) => {
            assert!(message.contains("deeper than"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn many_properties_compile_quickly() {
    let mut props = Map::new();
    for i in 0..3000 {
        props.insert(
            format!("p{i:04}"),
            json!({"type": ["string", "integer", "null"], "maxLength": 20}),
        );
    }
    let required: Vec<String> = (0..3000).step_by(3).map(|i| format!("p{i:04}")).collect();
    let schema =
        json!({"type": "object", "properties": Value::Object(props), "required": required});
    let start = Instant::now();
    let g = Arc::new(Grammar::json_schema(&schema).unwrap());
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    let mut out = b"{".to_vec();
    let mut m = Matcher::new(g);
    m.accept(b"{").unwrap();
    close(&mut m, &mut out, &mut Rng::new(3));
    check_document(&out, &schema);
}

#[test]
fn huge_bounds_are_refused() {
    for schema in [
        json!({"type": "array", "minItems": 200_000}),
        json!({"type": "string", "maxLength": 4_000_000_000u64}),
    ] {
        assert!(
            matches!(
                Grammar::json_schema(&schema),
                Err(GrammarError::InvalidSchema { .. })
            ),
            "{schema}"
        );
    }
    // Within the per-keyword bound but too many in total.
    let mut props = Map::new();
    for i in 0..100 {
        props.insert(format!("p{i}"), json!({"type": "array", "items": {"type": "integer"}, "minItems": 99_000, "maxItems": 100_000}));
    }
    let schema = json!({"type": "object", "properties": Value::Object(props)});
    assert!(matches!(
        Grammar::json_schema(&schema),
        Err(GrammarError::TooLarge { .. })
    ));
}

#[test]
fn vacuous_unique_items_is_accepted() {
    assert!(Grammar::json_schema(&json!({"type": "array", "uniqueItems": false})).is_ok());
    assert!(matches!(
        Grammar::json_schema(&json!({"type": "array", "uniqueItems": true})),
        Err(GrammarError::Unsupported { .. })
    ));
}
