//! Fixed documents against the test schemas: valid ones are accepted byte by byte and complete;
//! invalid ones are rejected at exactly the byte where they go wrong; schemas with keywords the
//! grammar cannot enforce are refused with the keyword and its path.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{check_document, grammar, schemas};
use ferrolm_grammar::{Grammar, GrammarError, Matcher};
use serde_json::{json, Value};

fn schema(name: &str) -> Value {
    schemas().into_iter().find(|(n, _)| *n == name).unwrap().1
}

/// Feeds `doc` one byte at a time; returns the matcher, or the index of the first rejected byte.
fn feed(g: &Arc<Grammar>, doc: &[u8]) -> Result<Matcher, usize> {
    let mut m = Matcher::new(g.clone());
    for (i, &b) in doc.iter().enumerate() {
        if m.accept(&[b]).is_err() {
            return Err(i);
        }
    }
    Ok(m)
}

/// `doc` is accepted and complete, and (as a cross-check of the test itself) valid.
fn assert_accepts(schema: &Value, doc: &str) {
    let g = grammar(schema);
    match feed(&g, doc.as_bytes()) {
        Ok(m) => assert!(m.is_complete(), "{doc:?} is accepted but not complete"),
        Err(i) => panic!("{doc:?} rejected at byte {i} ({:?} accepted)", &doc[..i]),
    }
    check_document(doc.as_bytes(), schema);
}

/// `prefix` is accepted, and the first byte of `rest` is rejected.
fn assert_rejects(schema: &Value, prefix: &str, rest: &str) {
    let g = grammar(schema);
    let doc = format!("{prefix}{rest}");
    assert_eq!(
        feed(&g, doc.as_bytes()).err(),
        Some(prefix.len()),
        "{doc:?} should be rejected at byte {}",
        prefix.len()
    );
}

fn assert_rejects_bytes(schema: &Value, prefix: &[u8], rest: &[u8]) {
    let g = grammar(schema);
    let doc = [prefix, rest].concat();
    assert_eq!(
        feed(&g, &doc).err(),
        Some(prefix.len()),
        "{doc:?} should be rejected at byte {}",
        prefix.len()
    );
}

#[test]
fn valid_documents_are_accepted_and_complete() {
    let cases: &[(&str, &[&str])] = &[
        (
            "nested objects",
            &[
                r#"{"age": 30, "name": "Al"}"#,
                r#"{"address": {"city": "Ghent", "zip": "90000"}, "age": 0, "name": "", "tags": ["a", "b"]}"#,
                "{\n  \"age\": 150,\n  \"name\": \"Z\u{e9}\",\n  \"tags\": []\n}",
            ],
        ),
        (
            "array 2..4 integers",
            &["[1, 2]", "[-1,0,3,4]", "[ 10 , -20 ]"],
        ),
        (
            "enums",
            &[
                r#"{"color": "gréy", "mixed": {"k":[1]}, "size": 2.5}"#,
                r#"{"color": "red", "size": -3}"#,
            ],
        ),
        (
            "const with extra keys",
            &[
                r#"{"kind": "circle", "r": 1.5e3}"#,
                r#"{"kind": "circle", "r": -0.25, "note": [1, {"x": null}]}"#,
            ],
        ),
        ("anyOf", &[r#""abc""#, "-42", r#"{"x": true}"#]),
        (
            "nullable",
            &[r#"{"a": null, "b": null}"#, r#"{"a": "abcd", "b": -5}"#],
        ),
        (
            "tree",
            &[
                r#"{"children": [{"value": 2}, {"children": [], "value": 3}], "value": 1}"#,
                r#"{"value": 0}"#,
            ],
        ),
        (
            "integer vs number",
            &[
                r#"{"i": -7, "n": 3.25E-2, "p": 1.000, "q": -2}"#,
                r#"{"i": 0, "n": 0, "p": 0.999, "q": 19}"#,
            ],
        ),
        (
            "formats",
            &[
                r#"{"d": "2024-02-29", "dt": "2000-02-29T23:59:59.123+05:30", "t": "00:00:00Z", "u": "123e4567-E89B-12d3-a456-426614174000"}"#,
            ],
        ),
        (
            "additionalProperties schema",
            &[r#"{"id": 3, "x": "abcd", "y": ""}"#],
        ),
        (
            "prefixItems",
            &[r#"["ab"]"#, r#"["ab", false, null, null]"#],
        ),
        (
            "oneOf tagged",
            &[r#"{"type": "a", "x": 1}"#, r#"{"type": "b", "y": "s"}"#],
        ),
        (
            "empty schema",
            &[
                "[1, \"x\", {\"a\": [true, null]}]",
                "-0.5e+10",
                "\"\\u00e9\\n\"",
            ],
        ),
        (
            "unicode keys and extra keys",
            &[
                r#"{"a": 1, "ab": "xy", "é": 2, "中": true, "aa": [], "中文": 1}"#,
                "{}",
            ],
        ),
        ("allOf with a definitions ref", &[r#""abcde""#]),
        (
            "required key only in additionalProperties",
            &[r#"{"z": false}"#, r#"{"z": true, "y": false}"#],
        ),
        ("inferred types", &[r#"{"list": ["a", "bc"], "num": -1}"#]),
    ];
    for (name, docs) in cases {
        let s = schema(name);
        for doc in *docs {
            assert_accepts(&s, doc);
        }
    }
}

#[test]
fn invalid_documents_are_rejected_at_the_first_bad_byte() {
    let person = schema("nested objects");
    // wrong type
    assert_rejects(&person, r#"{"age": "#, r#""30"}"#);
    assert_rejects(&person, r#"{"age": 3"#, ".5}");
    // missing required key
    assert_rejects(&person, r#"{"age": 3"#, "}");
    // extra key with additionalProperties false ("n" could still start "name")
    assert_rejects(&person, r#"{"age": 3, "n"#, r#"ick": 1}"#);
    assert_rejects(&person, r#"{"age": 3, "name": "x", ""#, r#"other": 1}"#);
    // a bound
    assert_rejects(&person, r#"{"age": 15"#, "1");
    assert_rejects(&person, r#"{"age": "#, "-1");
    assert_rejects(&person, r#"{"address": {"city": "x", "zip": "1234"#, "\"");
    // too many items
    let arr = schema("array 2..4 integers");
    assert_rejects(&arr, "[1, 2, 3, 4", ",");
    assert_rejects(&arr, "[1", "]");
    assert_rejects(&arr, "[1, 2", ".0]");
    // enums and const
    let enums = schema("enums");
    assert_rejects(&enums, r#"{"color": "gr"#, "a");
    assert_rejects(&enums, r#"{"color": "red", "size": "#, r#""not a number"}"#);
    assert_rejects(&enums, r#"{"color": "red", "size": 2"#, "}");
    assert_rejects(&schema("const with extra keys"), r#"{"kind": ""#, "square");
    // anyOf
    assert_rejects(&schema("anyOf"), "\"abc", "d");
    assert_rejects(&schema("anyOf"), "", "true");
    // nullable integer with bounds
    let nullable = schema("nullable");
    assert_rejects(&nullable, r#"{"a": null, "b": "#, "6");
    assert_rejects(&nullable, r#"{"a": null, "b": -"#, "6");
    assert_rejects(&nullable, r#"{"a": nul"#, "s");
    // integer vs number
    let nums = schema("integer vs number");
    assert_rejects(&nums, r#"{"i": 1"#, ".");
    assert_rejects(&nums, r#"{"i": 1, "n": 2, "p": "#, "2");
    assert_rejects(&nums, r#"{"i": 1, "n": 2, "p": 1.0"#, "1");
    assert_rejects(&nums, r#"{"i": 1, "n": 2, "p": 0.5, "q": -"#, "3");
    assert_rejects(&nums, r#"{"i": 1, "n": 2, "p": 0.5, "q": 2"#, "0");
    // formats
    let formats = schema("formats");
    assert_rejects(&formats, r#"{"d": "2024-02-"#, "30");
    assert_rejects(&formats, r#"{"d": "2023-02-2"#, "9");
    assert_rejects(&formats, r#"{"d": "1900-02-2"#, "9");
    assert_rejects(&formats, r#"{"d": "2024-1"#, "3");
    assert_rejects(&formats, r#"{"d": "2024-04-3"#, "1");
    // tree: the recursive schema keeps its own constraints
    assert_rejects(
        &schema("tree"),
        r#"{"children": [{"value": 1"#,
        r#", "extra": 1}]}"#,
    );
    assert_rejects(&schema("tree"), r#"{"children": [{"children": ["#, "1");
    // extra keys never repeat a declared key, and declared keys keep their schemas
    let uni = schema("unicode keys and extra keys");
    assert_rejects(&uni, r#"{"a": 1, "a"#, r#"": 2}"#);
    assert_rejects(&uni, r#"{"a": "#, r#""not an integer"}"#);
    assert_rejects(&uni, r#"{"é": 1, "é"#, r#"": 2}"#);
    assert_rejects(&uni, r#"{"é": 1, ""#, r#"\u0061": 2}"#);
    // prefixItems
    let prefix = schema("prefixItems");
    assert_rejects(&prefix, r#"["a", "#, "null");
    assert_rejects(&prefix, r#"["a", true, null, null"#, ", null]");
    assert_rejects(&prefix, "[", "]");
    // oneOf: the tag picks the branch
    assert_rejects(&schema("oneOf tagged"), r#"{"type": "a", ""#, r#"y": "s"}"#);
}

#[test]
fn unterminated_and_trailing_bytes() {
    let person = schema("nested objects");
    let g = grammar(&person);
    let m = feed(&g, br#"{"age": 3, "name": "Al"#).unwrap();
    assert!(!m.is_complete() && !m.is_finished());
    let mut m = feed(&g, br#"{"age": 3, "name": "Al"}"#).unwrap();
    assert!(m.is_complete() && m.is_finished());
    for garbage in [&b" "[..], b"\n", b"x", b"}", b","] {
        assert!(!m.allows(garbage));
        assert!(matches!(
            m.accept(garbage),
            Err(GrammarError::Rejected { finished: true, .. })
        ));
    }
    // A top-level number is complete but may go on.
    let g = grammar(&json!({"type": "integer"}));
    let m = feed(&g, b"12").unwrap();
    assert!(m.is_complete() && !m.is_finished());
    // Leading whitespace is not part of the document.
    assert_rejects(&person, "", " {");
}

#[test]
fn whitespace_is_bounded() {
    let s = json!({});
    assert_accepts(&s, "[1,\n\t\t2]");
    assert_rejects(&s, "[ ", " 1]");
    assert_rejects(&s, "[1 ", " ,2]");
    let indent = " ".repeat(20);
    assert_accepts(&s, &format!("[\n{indent}1]"));
    assert_rejects(&s, &format!("[\n{indent}"), " 1]");
    assert_rejects(&s, "[\n", "\n1]");
}

#[test]
fn numbers_are_bounded_in_length() {
    let s = json!({"type": "number"});
    assert_accepts(&s, "123456789012345.123456789012345e-99");
    assert_rejects(&s, "123456789012345", "6");
    assert_rejects(&s, "1.123456789012345", "6");
    assert_rejects(&s, "1e99", "9");
    assert_rejects(&s, "0", "1");
    assert_rejects(&s, "-", "-");
}

#[test]
fn strings_are_valid_utf8_and_json() {
    let s = json!({"type": "string"});
    assert_accepts(&s, "\"\u{0}\"".replace('\u{0}', "\\u0000").as_str());
    assert_accepts(&s, "\"\\\"\\\\\\/\\b\\f\\n\\r\\t\\uFFFF\u{7f}\u{80}\u{7ff}\u{800}\u{d7ff}\u{e000}\u{ffff}\u{10000}\u{10ffff}\"");
    assert_rejects_bytes(&s, b"\"", &[0x01]); // control character
    assert_rejects_bytes(&s, b"\"", b"\n");
    assert_rejects_bytes(&s, b"\"", &[0x80]); // lone continuation byte
    assert_rejects_bytes(&s, b"\"", &[0xC0, 0x80]); // overlong
    assert_rejects_bytes(&s, b"\"", &[0xC1]);
    assert_rejects_bytes(&s, b"\"\xE0", &[0x80]); // overlong 3-byte
    assert_rejects_bytes(&s, b"\"\xED", &[0xA0]); // surrogate
    assert_rejects_bytes(&s, b"\"\xF0", &[0x80]); // overlong 4-byte
    assert_rejects_bytes(&s, b"\"\xF4", &[0x90]); // above U+10FFFF
    assert_rejects_bytes(&s, b"\"", &[0xF5]);
    assert_rejects_bytes(&s, b"\"\xC3", b"\""); // truncated character
    assert_rejects_bytes(&s, b"\"\\", b"x"); // bad escape
    assert_rejects_bytes(&s, b"\"\\uD", b"800\""); // surrogate escape
    assert_rejects_bytes(&s, b"\"\\u12", b"g");
    // minLength/maxLength count code points; an escape is one.
    let short = json!({"type": "string", "minLength": 2, "maxLength": 2});
    assert_accepts(&short, "\"\u{1f600}\\n\"");
    assert_rejects(&short, "\"\u{1f600}", "\"");
    assert_rejects(&short, "\"ab", "c");
}

#[test]
fn properties_follow_the_schema_map_order() {
    // Declared as b, a: serde_json keeps that order only with its `preserve_order` feature.
    let s = json!({"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}}, "required": ["a", "b"], "additionalProperties": false});
    let keys: Vec<&String> = s["properties"].as_object().unwrap().keys().collect();
    let (first, second) = (keys[0], keys[1]);
    assert_accepts(&s, &format!(r#"{{"{first}": 1, "{second}": 2}}"#));
    assert_rejects(&s, "{\"", &format!(r#"{second}": 2, "{first}": 1}}"#));
}

#[test]
fn json_object_accepts_any_object_only() {
    let g = Arc::new(Grammar::json_object());
    for doc in [
        &b"{}"[..],
        b"{\"a\": [1, {\"b\": null}], \"c\": \"\xC3\xA9\"}",
        b"{ \"x\" : -1.5e3 }",
    ] {
        let m = feed(&g, doc).unwrap();
        assert!(m.is_finished(), "{doc:?}");
    }
    for doc in [&b"[]"[..], b"1", b"\"s\"", b"null"] {
        assert_eq!(feed(&g, doc).err(), Some(0), "{doc:?}");
    }
}

fn unsupported(schema: Value) -> (String, String) {
    match Grammar::json_schema(&schema) {
        Err(GrammarError::Unsupported { keyword, path }) => (keyword, path),
        other => panic!("{schema}: expected Unsupported, got {other:?}"),
    }
}

#[test]
fn unsupported_keywords_are_named_with_their_path() {
    let cases = [
        (
            json!({"type": "object", "properties": {"x": {"type": "string", "pattern": "^a"}}}),
            "pattern",
            "#/properties/x",
        ),
        (
            json!({"type": "object", "patternProperties": {"^a": {}}}),
            "patternProperties",
            "#",
        ),
        (
            json!({"type": "integer", "multipleOf": 2}),
            "multipleOf",
            "#",
        ),
        (
            json!({"type": "array", "items": {"uniqueItems": true}}),
            "uniqueItems",
            "#/items",
        ),
        (json!({"not": {"type": "string"}}), "not", "#"),
        (json!({"if": {"type": "string"}, "then": {}}), "if", "#"),
        (
            json!({"type": "object", "dependentRequired": {"a": ["b"]}}),
            "dependentRequired",
            "#",
        ),
        (
            json!({"type": "object", "minProperties": 1}),
            "minProperties",
            "#",
        ),
        (
            json!({"type": "object", "propertyNames": {"maxLength": 3}}),
            "propertyNames",
            "#",
        ),
        (
            json!({"type": "array", "contains": {"type": "string"}}),
            "contains",
            "#",
        ),
        (
            json!({"anyOf": [{"type": "string"}, {"type": "object", "unevaluatedProperties": false}]}),
            "unevaluatedProperties",
            "#/anyOf/1",
        ),
        (
            json!({"allOf": [{"type": "string"}, {"maxLength": 3}]}),
            "allOf",
            "#",
        ),
        (
            json!({"type": "string", "format": "email"}),
            "format: email",
            "#",
        ),
        (json!({"type": "number", "minimum": 0.5}), "minimum", "#"),
        (
            json!({"type": "number", "exclusiveMinimum": 0}),
            "exclusiveMinimum",
            "#",
        ),
        (
            json!({"$defs": {"a~b/c": {"type": "string", "pattern": "x"}}, "properties": {"y": {"$ref": "#/$defs/a~0b~1c"}}}),
            "pattern",
            "#/$defs/a~0b~1c",
        ),
        (
            json!({"properties": {"a/b": {"const": 1, "contentEncoding": "base64"}}}),
            "contentEncoding",
            "#/properties/a~1b",
        ),
    ];
    for (schema, keyword, path) in cases {
        let (k, p) = unsupported(schema.clone());
        assert_eq!((k.as_str(), p.as_str()), (keyword, path), "{schema}");
    }
    let msg = Grammar::json_schema(&json!({"properties": {"x": {"pattern": "a"}}}))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("\"pattern\"") && msg.contains("#/properties/x") && msg.contains("remove"),
        "{msg}"
    );
}

#[test]
fn combinations_and_invalid_schemas_are_errors() {
    match Grammar::json_schema(&json!({"type": "object", "anyOf": [{"required": ["a"]}]})) {
        Err(GrammarError::Combination {
            keyword,
            with,
            path,
        }) => assert_eq!(
            (keyword.as_str(), with.as_str(), path.as_str()),
            ("type", "anyOf", "#")
        ),
        other => panic!("{other:?}"),
    }
    match Grammar::json_schema(&json!({"enum": ["a"], "maxLength": 3})) {
        Err(GrammarError::Combination { keyword, with, .. }) => {
            assert_eq!((keyword.as_str(), with.as_str()), ("maxLength", "enum"))
        }
        other => panic!("{other:?}"),
    }
    let invalid = [
        (json!({"$ref": "#"}), "#"),
        (
            json!({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"anyOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"}),
            "#/$defs/a",
        ),
        (json!({"$ref": "https://example.com/s.json"}), "#"),
        (json!({"$ref": "#/$defs/missing"}), "#"),
        (
            json!({"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}, "required": ["next"]}}, "$ref": "#/$defs/n"}),
            "#/$defs/n",
        ),
        (json!({"enum": []}), "#"),
        (json!({"type": "strin"}), "#"),
        (json!({"type": "array", "minItems": 3, "maxItems": 2}), "#"),
        (
            json!({"type": "array", "prefixItems": [{}], "items": false, "minItems": 2}),
            "#",
        ),
        (
            json!({"type": "string", "minLength": 5, "maxLength": 2}),
            "#",
        ),
        (json!({"type": "integer", "minimum": 3, "maximum": 2}), "#"),
        (
            json!({"type": "integer", "exclusiveMinimum": 2, "exclusiveMaximum": 3}),
            "#",
        ),
        (
            json!({"type": "object", "properties": {"a": false}, "required": ["a"]}),
            "#/properties/a",
        ),
        (
            json!({"type": "object", "required": ["a"], "additionalProperties": false}),
            "#",
        ),
        (json!({"type": "string", "maxLength": 1_000_000}), "#"),
        (json!({"type": "string", "enum": [1, 2]}), "#"),
        (json!(false), "#"),
        (json!(42), "#"),
    ];
    for (schema, want) in invalid {
        match Grammar::json_schema(&schema) {
            Err(GrammarError::InvalidSchema { path, message }) => {
                assert_eq!(path, want, "{schema}: {message}");
                assert!(!message.is_empty());
            }
            other => panic!("{schema}: expected InvalidSchema, got {other:?}"),
        }
    }
}

#[test]
fn annotations_are_ignored_and_true_means_anything() {
    let s = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "x", "title": "T", "description": "D",
        "default": 1, "examples": [1], "x-vendor": {"anything": true}, "nullable": true,
        "type": "integer"
    });
    assert_accepts(&s, "5");
    assert_rejects(&s, "", "null");
    let g = Arc::new(Grammar::json_schema(&json!(true)).unwrap());
    assert!(feed(&g, b"[true]").unwrap().is_complete());
}
