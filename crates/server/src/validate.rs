//! Checks of request fields that serde's types alone let through, each a 400 that names the
//! field and says what it must be: a tool's `parameters` must be a JSON Schema, and Ollama's
//! `images` must be base64 (and this server's models read text only).
//!
//! The schema check is structural, not a full meta-schema validation: it catches what a client
//! gets wrong by mistake (`"type": "nonsense"`, `"properties": 5`, `"required": "x"`) at every
//! depth, and lets through keywords it does not know, as JSON Schema itself does.

use serde_json::Value;

use crate::error::ApiError;

const TYPES: [&str; 7] = [
    "object", "array", "string", "number", "integer", "boolean", "null",
];

/// `schema` (found at `at`, e.g. `tools[0].function.parameters`) must be a JSON Schema.
pub fn json_schema(schema: &Value, at: &str) -> Result<(), ApiError> {
    check_schema(schema, at).map_err(|m| ApiError::invalid(m, Some("tools")))
}

fn check_schema(v: &Value, at: &str) -> Result<(), String> {
    let o = match v {
        Value::Bool(_) => return Ok(()),
        Value::Object(o) => o,
        other => {
            return Err(format!(
                "{at} must be a JSON Schema (an object such as {{\"type\": \"string\"}}, or true/false), not {other}"
            ))
        }
    };
    if let Some(t) = o.get("type") {
        let known = |t: &Value| t.as_str().is_some_and(|s| TYPES.contains(&s));
        let ok = match t {
            Value::Array(list) => !list.is_empty() && list.iter().all(known),
            t => known(t),
        };
        if !ok {
            return Err(format!(
                "{at}.type is {t}: a JSON Schema type is one of {} (or a list of them)",
                TYPES.join(", ")
            ));
        }
    }
    if let Some(p) = o.get("properties") {
        let Value::Object(props) = p else {
            return Err(format!(
                "{at}.properties is {p}: it must be an object mapping each property name to its schema"
            ));
        };
        for (name, s) in props {
            check_schema(s, &format!("{at}.properties.{name}"))?;
        }
    }
    for key in ["$defs", "definitions", "patternProperties"] {
        if let Some(d) = o.get(key) {
            let Value::Object(defs) = d else {
                return Err(format!(
                    "{at}.{key} is {d}: it must be an object of named schemas"
                ));
            };
            for (name, s) in defs {
                check_schema(s, &format!("{at}.{key}.{name}"))?;
            }
        }
    }
    if let Some(r) = o.get("required") {
        let strings = r.as_array().is_some_and(|a| a.iter().all(Value::is_string));
        if !strings {
            return Err(format!(
                "{at}.required is {r}: it must be a list of property names"
            ));
        }
    }
    for key in ["additionalProperties", "not", "contains", "propertyNames"] {
        if let Some(s) = o.get(key) {
            check_schema(s, &format!("{at}.{key}"))?;
        }
    }
    if let Some(items) = o.get("items") {
        match items {
            // Draft 4's tuple form.
            Value::Array(list) => {
                for (i, s) in list.iter().enumerate() {
                    check_schema(s, &format!("{at}.items[{i}]"))?;
                }
            }
            s => check_schema(s, &format!("{at}.items"))?,
        }
    }
    for key in ["anyOf", "oneOf", "allOf", "prefixItems"] {
        if let Some(l) = o.get(key) {
            let Some(list) = l.as_array().filter(|a| !a.is_empty()) else {
                return Err(format!(
                    "{at}.{key} is {l}: it must be a non-empty list of schemas"
                ));
            };
            for (i, s) in list.iter().enumerate() {
                check_schema(s, &format!("{at}.{key}[{i}]"))?;
            }
        }
    }
    if let Some(e) = o.get("enum") {
        if !e.is_array() {
            return Err(format!("{at}.enum is {e}: it must be a list of values"));
        }
    }
    Ok(())
}

/// Ollama's `images` (at `at`: `images` or `messages[i].images`): a list of base64 strings.
/// None, `null` and `[]` pass; anything else is a 400 that says what is wrong with it, since
/// the models served here read text only.
pub fn ollama_images(images: Option<&Value>, at: &str) -> Result<(), ApiError> {
    let param = if at == "images" { "images" } else { "messages" };
    let bad = |m: String| ApiError::invalid(m, Some(param));
    let list = match images {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(list)) if list.is_empty() => return Ok(()),
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(bad(format!(
                "{at} is {other}: it must be a list of base64-encoded images"
            )))
        }
    };
    for (j, img) in list.iter().enumerate() {
        match img.as_str() {
            Some(s) if is_base64(s) => {}
            Some(_) => {
                return Err(bad(format!(
                    "{at}[{j}] is not base64: send each image's bytes base64-encoded (and note that this model reads text only)"
                )))
            }
            None => {
                return Err(bad(format!(
                    "{at}[{j}] is {img}: it must be a base64-encoded image"
                )))
            }
        }
    }
    Err(bad(format!(
        "{at}: this model reads text only: remove the images, or serve a model that takes them"
    )))
}

/// Standard base64 (RFC 4648 §4), padded, non-empty; line breaks are allowed.
fn is_base64(s: &str) -> bool {
    let b: Vec<u8> = s.bytes().filter(|c| !matches!(c, b'\r' | b'\n')).collect();
    if b.is_empty() || !b.len().is_multiple_of(4) {
        return false;
    }
    let pad = b.iter().rev().take_while(|&&c| c == b'=').count();
    pad <= 2
        && b[..b.len() - pad]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn schemas_with_a_wrong_type_or_properties_are_refused_at_any_depth() {
        let ok = json!({"type": "object", "properties": {"city": {"type": "string"},
            "days": {"type": ["integer", "null"]}, "tags": {"type": "array", "items": {"enum": ["a"]}}},
            "required": ["city"], "additionalProperties": false});
        assert!(check_schema(&ok, "p").is_ok());
        for (bad, says) in [
            (json!({"type": "nonsense"}), "p.type"),
            (json!({"type": "object", "properties": 5}), "p.properties"),
            (
                json!({"properties": {"a": {"type": "strin"}}}),
                "p.properties.a.type",
            ),
            (json!({"required": "a"}), "p.required"),
            (json!({"items": 3}), "p.items"),
            (json!({"anyOf": []}), "p.anyOf"),
            (json!("string"), "p must be"),
        ] {
            let e = check_schema(&bad, "p").expect_err("a broken schema passed");
            assert!(e.starts_with(says), "{bad}: {e}");
        }
    }

    #[test]
    fn base64_is_recognised() {
        assert!(is_base64("aGVsbG8="));
        assert!(is_base64("aGVs\nbG8h"));
        for bad in ["", "not base64!", "aGVsbG8", "a===", "aGVs bG8h"] {
            assert!(!is_base64(bad), "{bad:?}");
        }
    }
}
