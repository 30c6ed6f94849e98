//! Shared test support: a seeded RNG, an independent validator for the JSON Schema subset, the
//! test schemas, random walks through a grammar, and synthetic vocabularies.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

use ferrolm_grammar::{Grammar, Matcher, Vocab};
use serde_json::{json, Value};

/// splitmix64: small, seeded, good enough for fuzzing.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

// ---------------------------------------------------------------------------------------------
// An independent validator for the supported subset (JSON Schema semantics: no type inference,
// `oneOf` is "exactly one").

pub fn validate(v: &Value, schema: &Value, root: &Value) -> Result<(), String> {
    let obj = match schema {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return Err("schema false".into()),
        Value::Object(o) => o,
        _ => return Err("bad schema".into()),
    };
    if let Some(r) = obj.get("$ref").and_then(Value::as_str) {
        let target = root.pointer(&r[1..]).ok_or(format!("unresolved {r}"))?;
        validate(v, target, root)?;
    }
    if let Some(t) = obj.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let ok = types.iter().any(|t| match *t {
            "string" => v.is_string(),
            "number" => v.is_number(),
            "integer" => v.as_f64().is_some_and(|f| f.fract() == 0.0),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            "object" => v.is_object(),
            "array" => v.is_array(),
            _ => false,
        });
        if !ok {
            return Err(format!("{v} is not of type {t}"));
        }
    }
    if let Some(e) = obj.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!("{v} not in enum"));
        }
    }
    if let Some(c) = obj.get("const") {
        if c != v {
            return Err(format!("{v} is not const {c}"));
        }
    }
    if let Some(branches) = obj.get("anyOf").and_then(Value::as_array) {
        if !branches.iter().any(|b| validate(v, b, root).is_ok()) {
            return Err(format!("{v} matches no anyOf branch"));
        }
    }
    if let Some(branches) = obj.get("oneOf").and_then(Value::as_array) {
        let n = branches
            .iter()
            .filter(|b| validate(v, b, root).is_ok())
            .count();
        if n != 1 {
            return Err(format!("{v} matches {n} oneOf branches"));
        }
    }
    if let Some(branches) = obj.get("allOf").and_then(Value::as_array) {
        for b in branches {
            validate(v, b, root)?;
        }
    }
    match v {
        Value::String(s) => {
            let n = s.chars().count() as u64;
            if obj
                .get("minLength")
                .and_then(Value::as_u64)
                .is_some_and(|m| n < m)
            {
                return Err(format!("{v} shorter than minLength"));
            }
            if obj
                .get("maxLength")
                .and_then(Value::as_u64)
                .is_some_and(|m| n > m)
            {
                return Err(format!("{v} longer than maxLength"));
            }
            if let Some(f) = obj.get("format").and_then(Value::as_str) {
                check_format(s, f)?;
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap();
            let bound = |k: &str| obj.get(k).and_then(Value::as_f64);
            if bound("minimum").is_some_and(|m| x < m)
                || bound("maximum").is_some_and(|m| x > m)
                || bound("exclusiveMinimum").is_some_and(|m| x <= m)
                || bound("exclusiveMaximum").is_some_and(|m| x >= m)
            {
                return Err(format!("{v} out of bounds"));
            }
        }
        Value::Object(map) => {
            let props = obj.get("properties").and_then(Value::as_object);
            if let Some(req) = obj.get("required").and_then(Value::as_array) {
                for k in req.iter().filter_map(Value::as_str) {
                    if !map.contains_key(k) {
                        return Err(format!("missing required {k}"));
                    }
                }
            }
            for (k, val) in map {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => validate(val, s, root).map_err(|e| format!("{k}: {e}"))?,
                    None => match obj.get("additionalProperties") {
                        None => {}
                        Some(s) => validate(val, s, root).map_err(|e| format!("extra {k}: {e}"))?,
                    },
                }
            }
        }
        Value::Array(items) => {
            let n = items.len() as u64;
            if obj
                .get("minItems")
                .and_then(Value::as_u64)
                .is_some_and(|m| n < m)
            {
                return Err(format!("{v}: fewer than minItems"));
            }
            if obj
                .get("maxItems")
                .and_then(Value::as_u64)
                .is_some_and(|m| n > m)
            {
                return Err(format!("{v}: more than maxItems"));
            }
            let (prefix, rest) = match (obj.get("prefixItems"), obj.get("items")) {
                (Some(Value::Array(p)), rest) => (p.as_slice(), rest),
                (None, Some(Value::Array(p))) => (p.as_slice(), obj.get("additionalItems")),
                (_, rest) => (&[][..], rest),
            };
            for (i, item) in items.iter().enumerate() {
                let s = if i < prefix.len() {
                    Some(&prefix[i])
                } else {
                    rest
                };
                if let Some(s) = s {
                    validate(item, s, root).map_err(|e| format!("[{i}]: {e}"))?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn digits(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn check_date(s: &str) -> Result<(), String> {
    let err = || format!("{s:?} is not a date");
    let p: Vec<&str> = s.split('-').collect();
    if p.len() != 3 || p[0].len() != 4 || p[1].len() != 2 || p[2].len() != 2 {
        return Err(err());
    }
    let (y, m, d) = (
        digits(p[0]).ok_or_else(err)?,
        digits(p[1]).ok_or_else(err)?,
        digits(p[2]).ok_or_else(err)?,
    );
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(err()),
    };
    if d == 0 || d > days {
        return Err(err());
    }
    Ok(())
}

fn check_time(s: &str) -> Result<(), String> {
    let err = || format!("{s:?} is not a time");
    let b = s.as_bytes();
    if b.len() < 9 || b[2] != b':' || b[5] != b':' {
        return Err(err());
    }
    let (h, m, sec) = (
        digits(&s[0..2]).ok_or_else(err)?,
        digits(&s[3..5]).ok_or_else(err)?,
        digits(&s[6..8]).ok_or_else(err)?,
    );
    if h > 23 || m > 59 || sec > 59 {
        return Err(err());
    }
    let mut rest = &s[8..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return Err(err());
        }
        rest = &frac[n..];
    }
    if rest == "Z" {
        return Ok(());
    }
    let off = rest.strip_prefix(['+', '-']).ok_or_else(err)?;
    if off.len() != 5 || off.as_bytes()[2] != b':' {
        return Err(err());
    }
    if digits(&off[0..2]).ok_or_else(err)? > 23 || digits(&off[3..5]).ok_or_else(err)? > 59 {
        return Err(err());
    }
    Ok(())
}

fn check_format(s: &str, format: &str) -> Result<(), String> {
    match format {
        "date" => check_date(s),
        "time" => check_time(s),
        "date-time" => {
            let (d, t) = s.split_once('T').ok_or(format!("{s:?} has no T"))?;
            check_date(d)?;
            check_time(t)
        }
        "uuid" => {
            let groups: Vec<&str> = s.split('-').collect();
            let ok = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
                && groups
                    .iter()
                    .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()));
            if ok {
                Ok(())
            } else {
                Err(format!("{s:?} is not a uuid"))
            }
        }
        _ => Err(format!("unknown format {format}")),
    }
}

/// Parses `out` as JSON and validates it against `schema`, with a readable failure.
pub fn check_document(out: &[u8], schema: &Value) {
    let v: Value = serde_json::from_slice(out)
        .unwrap_or_else(|e| panic!("{:?} does not parse: {e}", String::from_utf8_lossy(out)));
    if let Err(e) = validate(&v, schema, schema) {
        panic!(
            "{:?} does not satisfy {schema}: {e}",
            String::from_utf8_lossy(out)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The test schemas. Properties are declared in alphabetical order, so that the tests hold
// whether or not serde_json's `preserve_order` feature is on (the grammar follows map order).

pub fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "nested objects",
            json!({
                "type": "object",
                "properties": {
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string"},
                            "zip": {"type": "string", "minLength": 5, "maxLength": 5}
                        },
                        "required": ["city", "zip"],
                        "additionalProperties": false
                    },
                    "age": {"type": "integer", "minimum": 0, "maximum": 150},
                    "name": {"type": "string", "maxLength": 12},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}
                },
                "required": ["age", "name"],
                "additionalProperties": false
            }),
        ),
        (
            "array 2..4 integers",
            json!({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}),
        ),
        (
            "enums",
            json!({
                "type": "object",
                "properties": {
                    "color": {"enum": ["red", "green", "blue", "gr\u{e9}y"]},
                    "mixed": {"enum": ["a", null, true, {"k": [1]}]},
                    "size": {"type": "number", "enum": [1, 2.5, -3, "not a number"]}
                },
                "required": ["color", "size"],
                "additionalProperties": false
            }),
        ),
        (
            "const with extra keys",
            json!({"properties": {"kind": {"const": "circle"}, "r": {"type": "number"}}, "required": ["kind", "r"]}),
        ),
        (
            "anyOf",
            json!({"anyOf": [
                {"type": "string", "maxLength": 3},
                {"type": "integer"},
                {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"], "additionalProperties": false}
            ]}),
        ),
        (
            "nullable",
            json!({
                "type": "object",
                "properties": {
                    "a": {"type": ["string", "null"], "maxLength": 4},
                    "b": {"type": ["integer", "null"], "minimum": -5, "maximum": 5}
                },
                "required": ["a", "b"],
                "additionalProperties": false
            }),
        ),
        (
            "tree",
            json!({
                "$defs": {"node": {
                    "type": "object",
                    "properties": {
                        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 3},
                        "value": {"type": "integer"}
                    },
                    "required": ["value"],
                    "additionalProperties": false
                }},
                "$ref": "#/$defs/node"
            }),
        ),
        (
            "integer vs number",
            json!({
                "type": "object",
                "properties": {
                    "i": {"type": "integer"},
                    "n": {"type": "number"},
                    "p": {"type": "number", "minimum": 0, "maximum": 1},
                    "q": {"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 20}
                },
                "required": ["i", "n", "p", "q"],
                "additionalProperties": false
            }),
        ),
        (
            "formats",
            json!({
                "type": "object",
                "properties": {
                    "d": {"type": "string", "format": "date"},
                    "dt": {"type": "string", "format": "date-time"},
                    "t": {"type": "string", "format": "time"},
                    "u": {"type": "string", "format": "uuid"}
                },
                "required": ["d", "dt", "t", "u"],
                "additionalProperties": false
            }),
        ),
        (
            "additionalProperties schema",
            json!({"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"], "additionalProperties": {"type": "string", "maxLength": 4}}),
        ),
        (
            "prefixItems",
            json!({"type": "array", "prefixItems": [{"type": "string", "maxLength": 3}, {"type": "boolean"}], "items": {"type": "null"}, "minItems": 1, "maxItems": 4}),
        ),
        (
            "oneOf tagged",
            json!({"oneOf": [
                {"type": "object", "properties": {"type": {"const": "a"}, "x": {"type": "integer"}}, "required": ["type", "x"], "additionalProperties": false},
                {"type": "object", "properties": {"type": {"const": "b"}, "y": {"type": "string"}}, "required": ["type", "y"], "additionalProperties": false}
            ]}),
        ),
        ("empty schema", json!({})),
        (
            "unicode keys and extra keys",
            json!({"type": "object", "properties": {"a": {"type": "integer"}, "ab": {"type": "string", "maxLength": 2}, "\u{e9}": {"type": "integer"}, "\u{4e2d}": {"type": "boolean"}}}),
        ),
        (
            "allOf with a definitions ref",
            json!({"definitions": {"s": {"type": "string", "minLength": 2, "maxLength": 5}}, "allOf": [{"$ref": "#/definitions/s"}]}),
        ),
        (
            "required key only in additionalProperties",
            json!({"type": "object", "required": ["z"], "additionalProperties": {"type": "boolean"}}),
        ),
        (
            "inferred types",
            json!({"properties": {"list": {"items": {"minLength": 1, "maxLength": 2}, "maxItems": 2}, "num": {"minimum": -1, "maximum": 1}}, "required": ["list", "num"], "additionalProperties": false}),
        ),
    ]
}

pub fn grammar(schema: &Value) -> Arc<Grammar> {
    Arc::new(
        Grammar::json_schema(schema).unwrap_or_else(|e| panic!("{schema} does not compile: {e}")),
    )
}

// ---------------------------------------------------------------------------------------------
// Walks.

/// A vocabulary of the 256 single bytes, token id = byte value.
pub fn byte_vocab() -> &'static Vocab {
    static V: std::sync::OnceLock<Vocab> = std::sync::OnceLock::new();
    V.get_or_init(|| Vocab::new((0..=255u8).map(|b| Some(vec![b])).collect()))
}

/// The bytes `m` allows next (by `fill_mask` on [`byte_vocab`]; `mask_agrees_with_allows`
/// holds that to the slow path).
pub fn allowed_bytes(m: &Matcher) -> Vec<u8> {
    let mut mask = vec![false; 256];
    m.fill_mask(byte_vocab(), &mut mask);
    (0..=255u8).filter(|&b| mask[usize::from(b)]).collect()
}

/// Forces the document closed: picks, among the allowed bytes, one that brings the nearest end
/// one byte closer (checking that one always does).
pub fn close(m: &mut Matcher, out: &mut Vec<u8>, rng: &mut Rng) {
    while !m.is_complete() {
        let need = m.min_bytes_to_complete();
        let best: Vec<u8> = allowed_bytes(m)
            .into_iter()
            .filter(|&b| {
                let mut n = m.clone();
                n.accept(&[b]).unwrap();
                n.min_bytes_to_complete() + 1 == need
            })
            .collect();
        assert!(
            !best.is_empty(),
            "no byte brings {:?} closer to its end ({need} bytes away)",
            String::from_utf8_lossy(out)
        );
        let b = *rng.pick(&best);
        m.accept(&[b]).unwrap();
        out.push(b);
    }
}

/// A random document: bytes picked among the allowed ones (half the time ASCII only, so that
/// structure happens), stopping with some probability once complete; past `cap` bytes the
/// document is forced closed.
pub fn random_walk(g: &Arc<Grammar>, rng: &mut Rng, cap: usize) -> Vec<u8> {
    let mut m = Matcher::new(g.clone());
    let mut out = Vec::new();
    loop {
        if m.is_finished() || (m.is_complete() && rng.chance(0.2)) {
            break;
        }
        if out.len() >= cap {
            close(&mut m, &mut out, rng);
            break;
        }
        let allowed = allowed_bytes(&m);
        assert!(
            !allowed.is_empty(),
            "stuck after {:?}",
            String::from_utf8_lossy(&out)
        );
        let ascii: Vec<u8> = allowed.iter().copied().filter(u8::is_ascii).collect();
        let b = if !ascii.is_empty() && rng.chance(0.5) {
            *rng.pick(&ascii)
        } else {
            *rng.pick(&allowed)
        };
        m.accept(&[b]).unwrap();
        out.push(b);
    }
    assert!(m.is_complete());
    out
}

// ---------------------------------------------------------------------------------------------
// Synthetic vocabularies.

const SYLLABLES: &[&str] = &[
    "a", "e", "i", "o", "u", "ka", "ti", "ro", "ne", "su", "ma", "le", "th", "in", "er", "on",
    "an", "re", "st", "ch", "al", "ing", "ion", "ed", "es", "or", "ar", "is", "it", "at",
];
const PIECES: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ":",
    ",",
    "{\"",
    "\"}",
    "\":",
    "\": ",
    "\": \"",
    "\", \"",
    "\",",
    "},",
    "],",
    "[{",
    "}]",
    "\"]",
    "[\"",
    ", ",
    " ",
    "  ",
    "\n",
    "\n ",
    "\n  ",
    "\n    ",
    "\t",
    "\\",
    "\\\"",
    "\\n",
    "\\u",
    "\\u00",
    "true",
    "false",
    "null",
    " true",
    " null",
    "-",
    ".",
    "e",
    "E",
    "+",
    "0",
    "00",
    "1",
    "12",
    "123",
    "2024",
    "-0",
    "0.",
    ".5",
    "e+",
    "<tool_call>",
    "\n{\"name\": \"",
    "\", \"arguments\": ",
    "}\n</tool_call>",
    "</",
    "_",
    "get",
    "_weather",
    "age",
    "name",
    "value",
    "children",
    "type",
    "color",
    "red",
    "circle",
    "kind",
];
const UTF8_CHARS: &[&str] = &[
    "\u{e9}",
    "\u{fc}",
    "\u{df}",
    "\u{4e2d}",
    "\u{6587}",
    "\u{1f600}",
    "\u{20ac}",
    "\u{3b1}",
    "\u{ff21}",
    "\u{10348}",
];

fn push(v: &mut Vec<Vec<u8>>, seen: &mut std::collections::HashSet<Vec<u8>>, t: Vec<u8>) {
    if !t.is_empty() && seen.insert(t.clone()) {
        v.push(t);
    }
}

/// A byte-level-BPE-like vocabulary of `size` distinct tokens: all 256 single bytes (so any
/// document can be spelled), JSON punctuation runs, words with and without a leading space,
/// numbers, whole and split multi-byte UTF-8 characters, and some random byte strings.
pub fn synthetic_vocab(size: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = Rng::new(seed);
    let mut seen = std::collections::HashSet::new();
    let mut v = Vec::with_capacity(size);
    for b in 0..=255u8 {
        push(&mut v, &mut seen, vec![b]);
    }
    for p in PIECES {
        push(&mut v, &mut seen, p.as_bytes().to_vec());
        push(&mut v, &mut seen, format!(" {p}").into_bytes());
    }
    for c in UTF8_CHARS {
        let b = c.as_bytes();
        for cut in 1..=b.len() {
            push(&mut v, &mut seen, b[..cut].to_vec());
            push(&mut v, &mut seen, b[cut - 1..].to_vec());
        }
    }
    while v.len() < size {
        let t: Vec<u8> = match rng.below(10) {
            0..=4 => {
                // A word, maybe capitalised, maybe with a leading space or quote.
                let mut w = String::new();
                for _ in 0..1 + rng.below(4) {
                    w.push_str(SYLLABLES[rng.below(SYLLABLES.len())]);
                }
                if rng.chance(0.2) {
                    w[..1].make_ascii_uppercase();
                }
                match rng.below(4) {
                    0 | 1 => format!(" {w}"),
                    2 => format!("\"{w}"),
                    _ => w,
                }
                .into_bytes()
            }
            5 => rng.below(100_000).to_string().into_bytes(),
            6 => {
                // UTF-8 text, possibly cut inside a character at either end.
                let mut s = Vec::new();
                for _ in 0..1 + rng.below(3) {
                    s.extend_from_slice(rng.pick(UTF8_CHARS).as_bytes());
                }
                let start = if rng.chance(0.3) {
                    rng.below(s.len())
                } else {
                    0
                };
                let end = if rng.chance(0.3) {
                    start + 1 + rng.below(s.len() - start)
                } else {
                    s.len()
                };
                s[start..end].to_vec()
            }
            7 => {
                let mut s = rng.pick(PIECES).as_bytes().to_vec();
                s.extend_from_slice(rng.pick(SYLLABLES).as_bytes());
                s
            }
            8 => (0..1 + rng.below(6))
                .map(|_| rng.next_u64() as u8)
                .collect(),
            _ => {
                let mut s = rng.pick(SYLLABLES).as_bytes().to_vec();
                s.extend_from_slice(rng.pick(PIECES).as_bytes());
                s
            }
        };
        push(&mut v, &mut seen, t);
    }
    v
}

pub fn vocab_of(tokens: &[Vec<u8>]) -> Vocab {
    Vocab::new(tokens.iter().cloned().map(Some).collect())
}
