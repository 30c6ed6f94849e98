//! Preference pairs for DPO, as the web UI's ranking page makes them (a ferrolm extension):
//!
//! - `POST /v1/preferences` `{"pairs": [...]}` appends each pair, checked, as one line of the
//!   caller's file `DATA_DIR/preferences/<key>.jsonl` (`key-<id>`, or `open` without a key), in
//!   OpenAI's DPO fine-tuning format:
//!   `{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": …}],
//!   "non_preferred_output": [{"role": "assistant", "content": …}]}`;
//! - `GET /v1/preferences` returns that file (JSONL), ready to upload for a DPO job.
//!
//! One request's lines are written with one `write` on a file opened for appending, so two
//! requests' lines do not interleave.

use std::io::Write;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::files::tuner;
use crate::{parse, AppState};

/// The most pairs one request may append.
const MAX_PAIRS: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Append {
    pairs: Vec<Value>,
}

fn file_name(caller: &Caller) -> String {
    caller
        .key_id()
        .map_or_else(|| "open.jsonl".to_owned(), |id| format!("key-{id}.jsonl"))
}

fn bad(i: usize, what: &str) -> ApiError {
    ApiError::invalid(
        format!("pairs[{i}]: {what}: each pair is {{\"input\": {{\"messages\": [...]}}, \"preferred_output\": [{{\"role\": \"assistant\", \"content\": \"...\"}}], \"non_preferred_output\": [same]}}"),
        Some("pairs"),
    )
}

/// One assistant message with text, as `preferred_output` / `non_preferred_output` hold it.
fn output<'a>(i: usize, p: &'a Value, field: &str) -> Result<&'a str, ApiError> {
    match p[field].as_array().map(Vec::as_slice) {
        Some([m]) if m["role"] == "assistant" => m["content"]
            .as_str()
            .ok_or_else(|| bad(i, &format!("{field}[0].content is not text"))),
        _ => Err(bad(i, &format!("{field} is not one assistant message"))),
    }
}

/// The pair as one JSONL line, or why it is not a DPO pair.
fn line(i: usize, p: &Value) -> Result<String, ApiError> {
    let messages = p["input"]["messages"]
        .as_array()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| bad(i, "input.messages is not a non-empty list"))?;
    for (j, m) in messages.iter().enumerate() {
        let role_ok = matches!(m["role"].as_str(), Some("system" | "user" | "assistant"));
        if !role_ok || !m["content"].is_string() {
            return Err(bad(
                i,
                &format!(
                    "input.messages[{j}] needs a role (system, user, assistant) and text content"
                ),
            ));
        }
    }
    let (good, worse) = (
        output(i, p, "preferred_output")?,
        output(i, p, "non_preferred_output")?,
    );
    if good == worse {
        return Err(bad(
            i,
            "the preferred and non-preferred outputs are the same text",
        ));
    }
    Ok(json!({
        "input": {"messages": messages},
        "preferred_output": [{"role": "assistant", "content": good}],
        "non_preferred_output": [{"role": "assistant", "content": worse}],
    })
    .to_string())
}

fn io_error(what: &str, path: &std::path::Path, e: std::io::Error) -> ApiError {
    ApiError::server(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("could not {what} {}: {e}", path.display()),
    )
}

/// `POST /v1/preferences`.
pub async fn append(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let t = tuner(&s)?;
    let req: Append = parse(&body)?;
    if req.pairs.is_empty() || req.pairs.len() > MAX_PAIRS {
        return Err(ApiError::invalid(
            format!(
                "pairs has {} entries: send 1 to {MAX_PAIRS}",
                req.pairs.len()
            ),
            Some("pairs"),
        ));
    }
    let mut text = String::new();
    for (i, p) in req.pairs.iter().enumerate() {
        text.push_str(&line(i, p)?);
        text.push('\n');
    }
    let path = t.preference_path(&file_name(&caller));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_data()))
        .map_err(|e| io_error("append to", &path, e))?;
    let total = std::fs::read_to_string(&path)
        .map_err(|e| io_error("read", &path, e))?
        .lines()
        .count();
    Ok(Json(json!({
        "object": "preferences.append",
        "appended": req.pairs.len(),
        "total": total,
        "file": format!("preferences/{}", file_name(&caller)),
    })))
}

/// `GET /v1/preferences`: the caller's pairs (empty before the first).
pub async fn get(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let t = tuner(&s)?;
    let path = t.preference_path(&file_name(&caller));
    let text = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_error("read", &path, e)),
    };
    Ok((
        [(header::CONTENT_TYPE, "application/jsonl; charset=utf-8")],
        text,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_becomes_one_dpo_line_and_a_bad_one_names_its_field() {
        let p = json!({
            "input": {"messages": [{"role": "user", "content": "Hi?"}]},
            "preferred_output": [{"role": "assistant", "content": "Hello!"}],
            "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
        });
        let l: Value = serde_json::from_str(&line(0, &p).unwrap_or_default()).unwrap_or_default();
        assert_eq!(l, p);
        let mut same = p.clone();
        same["non_preferred_output"][0]["content"] = json!("Hello!");
        assert!(line(3, &same).is_err_and(|e| e.message.contains("pairs[3]")));
        let mut two = p.clone();
        two["preferred_output"] =
            json!([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]);
        assert!(line(0, &two).is_err_and(|e| e.message.contains("preferred_output")));
        let mut role = p;
        role["input"]["messages"][0]["role"] = json!("tool");
        assert!(line(0, &role).is_err_and(|e| e.message.contains("messages[0]")));
    }
}
