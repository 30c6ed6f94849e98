//! OpenAI's stored chat completions: a chat request with `store: true` (or any chat request
//! under `ferrolm serve --store-all`, unless it says `store: false`) is kept with its messages,
//! tools, metadata and the answer as the client received it; the routes below read, page,
//! relabel and delete them, and `POST /v1/chat/completions/export` turns a selection into a
//! `purpose=fine-tune` file for `/v1/fine_tuning/jobs`.
//!
//! Contract:
//! - What is kept is the `chat.completion` object the client got: for a JSON answer the object
//!   itself, for a stream the chunks assembled into one ([`Assembler`]; local models and
//!   upstreams alike). Log-probs are kept when the request asked for them. A request that failed
//!   or whose client went away is not kept.
//! - Every route is scoped by the caller's key: another key's completion is a 404, exactly as one
//!   that does not exist.
//! - The retention limit (`--store-retention-days`) is applied before every read and write, so
//!   an expired completion is never served.
//! - A completion that cannot be written (disk full) is logged and the answer still goes out:
//!   the request has been served and billed; only its copy is missing.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use ferrolm_accounting::{
    check_metadata, sft_lines, CompletionQuery, CompletionRecord, Metadata, Owner, Store,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::{parse, AppState};

/// Which chat completions the server keeps, and for how long.
#[derive(Clone, Copy, Debug, Default)]
pub struct Policy {
    /// Keep every chat request that does not say `store: false` (`serve --store-all`).
    pub store_all: bool,
    /// Forget completions older than this many days (`serve --store-retention-days`).
    pub retention_days: Option<u32>,
}

/// Most completions one list page may hold (OpenAI's limit), and the default.
const MAX_LIMIT: usize = 100;
const DEFAULT_LIMIT: usize = 20;

/// The store, with completions past the retention limit forgotten.
fn store(s: &AppState) -> Result<&Store, ApiError> {
    let store = &s.access.store;
    if let Some(days) = s.access.completions.retention_days {
        let cutoff = crate::unix_now() as i64 - i64::from(days) * 86_400;
        store.prune_completions(cutoff).map_err(ApiError::storage)?;
    }
    Ok(store)
}

/// The request's `metadata`, checked against OpenAI's limits (a 400 naming the one broken).
pub fn metadata(v: Option<&Value>) -> Result<Metadata, ApiError> {
    check_metadata(v.unwrap_or(&Value::Null)).map_err(|m| ApiError::invalid(m, Some("metadata")))
}

/// A chat request to be kept once it is answered.
#[derive(Clone)]
pub struct Keep {
    state: AppState,
    key_id: Option<i64>,
    metadata: Metadata,
    messages: Value,
    tools: Option<Value>,
}

impl Keep {
    /// `Some` when the request is to be kept: it asked (`store: true`), or the server keeps
    /// every request and it did not refuse (`store: false`).
    pub fn of(
        s: &AppState,
        caller: &Caller,
        store: Option<bool>,
        metadata: Metadata,
        messages: &Value,
        tools: Option<&Value>,
    ) -> Option<Keep> {
        store
            .unwrap_or(s.access.completions.store_all)
            .then(|| Keep {
                state: s.clone(),
                key_id: caller.key_id(),
                metadata,
                messages: messages.clone(),
                tools: tools.cloned(),
            })
    }

    /// Keep `answer`, a `chat.completion` object.
    pub fn save(&self, answer: &Value) {
        let id = answer
            .get("id")
            .and_then(Value::as_str)
            .map_or_else(|| crate::files::new_id("chatcmpl"), str::to_owned);
        let mut body = answer.clone();
        body["id"] = Value::String(id.clone());
        if let Some(o) = body.as_object_mut() {
            o.remove("metadata");
        }
        let rec = CompletionRecord {
            id,
            key_id: self.key_id,
            created: answer
                .get("created")
                .and_then(Value::as_i64)
                .unwrap_or(crate::unix_now() as i64),
            model: answer
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            metadata: self.metadata.clone(),
            messages: self.messages.clone(),
            tools: self.tools.clone(),
            body,
        };
        if let Err(e) =
            store(&self.state).and_then(|st| st.insert_completion(&rec).map_err(ApiError::storage))
        {
            eprintln!(
                "ferrolm serve: the answer {} was served but could not be stored: {}",
                rec.id, e.message
            );
        }
    }
}

/// Builds the `chat.completion` object a stream of `chat.completion.chunk`s amounts to: content
/// and tool-call arguments concatenated per choice, log-probs appended, the last finish reason
/// and the usage chunk kept.
#[derive(Default)]
pub struct Assembler {
    head: Option<Value>,
    choices: std::collections::BTreeMap<u64, Assembled>,
    usage: Option<Value>,
}

#[derive(Default)]
struct Assembled {
    content: Option<String>,
    refusal: Option<String>,
    calls: std::collections::BTreeMap<u64, Value>,
    logprobs: Option<Vec<Value>>,
    finish: Value,
}

impl Assembler {
    /// Take in one chunk.
    pub fn push(&mut self, chunk: &Value) {
        if self.head.is_none() {
            self.head = Some(json!({
                "id": chunk.get("id").cloned().unwrap_or(Value::Null),
                "created": chunk.get("created").cloned().unwrap_or(Value::Null),
                "model": chunk.get("model").cloned().unwrap_or(Value::Null),
                "system_fingerprint": chunk.get("system_fingerprint").cloned().unwrap_or(Value::Null),
            }));
        }
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(u.clone());
        }
        for (k, c) in chunk
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let i = c.get("index").and_then(Value::as_u64).unwrap_or(k as u64);
            let a = self.choices.entry(i).or_default();
            let delta = c.get("delta").unwrap_or(&Value::Null);
            for (field, into) in [("content", &mut a.content), ("refusal", &mut a.refusal)] {
                if let Some(t) = delta.get(field).and_then(Value::as_str) {
                    into.get_or_insert_with(String::new).push_str(t);
                }
            }
            for (j, call) in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let at = call
                    .get("index")
                    .and_then(Value::as_u64)
                    .unwrap_or(j as u64);
                let whole = a.calls.entry(at).or_insert_with(|| {
                    json!({"index": at, "id": null, "type": "function", "function": {"name": "", "arguments": ""}})
                });
                for f in ["id", "type"] {
                    if let Some(v) = call.get(f).filter(|v| !v.is_null()) {
                        whole[f] = v.clone();
                    }
                }
                for f in ["name", "arguments"] {
                    if let Some(t) = call
                        .pointer(&format!("/function/{f}"))
                        .and_then(Value::as_str)
                    {
                        let so_far = whole["function"][f].as_str().unwrap_or_default().to_owned();
                        whole["function"][f] = Value::String(so_far + t);
                    }
                }
            }
            if let Some(l) = c.pointer("/logprobs/content").and_then(Value::as_array) {
                a.logprobs
                    .get_or_insert_with(Vec::new)
                    .extend(l.iter().cloned());
            }
            if let Some(f) = c.get("finish_reason").filter(|f| !f.is_null()) {
                a.finish = f.clone();
            }
        }
    }

    /// The whole answer.
    pub fn finish(self) -> Value {
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .map(|(i, a)| {
                let mut message =
                    json!({"role": "assistant", "content": a.content, "refusal": a.refusal});
                if !a.calls.is_empty() {
                    message["tool_calls"] = a.calls.into_values().collect();
                }
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": a.logprobs.map_or(Value::Null, |l| json!({"content": l})),
                    "finish_reason": a.finish,
                })
            })
            .collect();
        let mut v = self.head.unwrap_or_else(|| json!({}));
        v["object"] = json!("chat.completion");
        v["choices"] = Value::Array(choices);
        v["usage"] = self.usage.unwrap_or(Value::Null);
        v
    }
}

/// 404 for an id that is not the caller's (or does not exist: the same answer).
fn not_found(id: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: Some("not_found"),
        ..ApiError::invalid(
            format!("no stored chat completion `{id}`: it was not stored (send `store: true`), was deleted or expired; GET /v1/chat/completions lists yours"),
            None,
        )
    }
}

/// A stored completion as OpenAI answers it: the `chat.completion` object with its metadata.
fn object(c: &CompletionRecord) -> Value {
    let mut v = c.body.clone();
    v["metadata"] = json!(c.metadata);
    v
}

fn own(s: &AppState, caller: &Caller, id: &str) -> Result<CompletionRecord, ApiError> {
    store(s)?
        .completion(id, caller.key_id())
        .map_err(ApiError::storage)?
        .ok_or_else(|| not_found(id))
}

/// `limit`, `order` and `after` of a list request.
fn paging(
    q: &[(String, String)],
    default_ascending: bool,
) -> Result<(usize, bool, Option<String>), ApiError> {
    let mut limit = DEFAULT_LIMIT;
    let mut ascending = default_ascending;
    let mut after = None;
    for (k, v) in q {
        match k.as_str() {
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            format!("limit is `{v}`: give a number from 1 to {MAX_LIMIT}"),
                            Some("limit"),
                        )
                    })?;
            }
            "order" => {
                ascending = match v.as_str() {
                    "asc" => true,
                    "desc" => false,
                    _ => {
                        return Err(ApiError::invalid(
                            format!("order is `{v}`: use asc or desc"),
                            Some("order"),
                        ))
                    }
                }
            }
            "after" => after = Some(v.clone()),
            _ => {}
        }
    }
    Ok((limit, ascending, after))
}

fn list_object(data: Vec<Value>, has_more: bool) -> Value {
    let id = |v: Option<&Value>| v.and_then(|v| v.get("id")).cloned().unwrap_or(Value::Null);
    json!({
        "object": "list",
        "first_id": id(data.first()),
        "last_id": id(data.last()),
        "has_more": has_more,
        "data": data,
    })
}

/// The `model` and `metadata[k]=v` filters of a list or export request.
fn filters(q: &[(String, String)]) -> (Option<String>, Vec<(String, String)>) {
    let mut model = None;
    let mut metadata = Vec::new();
    for (k, v) in q {
        if k == "model" {
            model = Some(v.clone());
        } else if let Some(key) = k
            .strip_prefix("metadata[")
            .and_then(|r| r.strip_suffix(']'))
        {
            metadata.push((key.to_owned(), v.clone()));
        }
    }
    (model, metadata)
}

/// `GET /v1/chat/completions`: the caller's stored completions, oldest first unless
/// `order=desc`, filtered by `model` and `metadata[k]=v`.
pub async fn list(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    let (limit, ascending, after) = paging(&q, true)?;
    let (model, metadata) = filters(&q);
    let page = store(&s)?
        .completions(&CompletionQuery {
            owner: Owner::Key(caller.key_id()),
            model,
            metadata,
            after,
            limit,
            ascending,
        })
        .map_err(|e| match e {
            ferrolm_accounting::AccountingError::InvalidQuery(m) => {
                ApiError::invalid(m, Some("after"))
            }
            e => ApiError::storage(e),
        })?;
    Ok(Json(list_object(
        page.items.iter().map(object).collect(),
        page.has_more,
    )))
}

/// `GET /v1/chat/completions/{id}`.
pub async fn get_one(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(object(&own(&s, &caller, &id)?)))
}

#[derive(Deserialize)]
struct Update {
    metadata: Option<Value>,
}

/// `POST /v1/chat/completions/{id}` with `{"metadata": {...}}`: replaces the metadata.
pub async fn update(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let u: Update = parse(&body)?;
    let Some(m) = u.metadata else {
        return Err(ApiError::invalid(
            "metadata is missing: send {\"metadata\": {\"key\": \"value\"}} (only the metadata of a stored completion can change)",
            Some("metadata"),
        ));
    };
    let m = metadata(Some(&m))?;
    let c = store(&s)?
        .update_completion_metadata(&id, caller.key_id(), &m)
        .map_err(ApiError::storage)?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(object(&c)))
}

/// `DELETE /v1/chat/completions/{id}`.
pub async fn delete(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !store(&s)?
        .delete_completion(&id, caller.key_id())
        .map_err(ApiError::storage)?
    {
        return Err(not_found(&id));
    }
    Ok(Json(
        json!({"id": id, "object": "chat.completion.deleted", "deleted": true}),
    ))
}

/// One request message as OpenAI lists it: an id (`{completion id}-{index}`), the role, the
/// content as text (the parts, when it was sent as parts, in `content_parts`).
fn message_object(completion: &str, i: usize, m: &Value) -> Value {
    let mut v = m.clone();
    v["id"] = json!(format!("{completion}-{i}"));
    match m.get("content") {
        Some(Value::Array(parts)) => {
            let text: String = parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect();
            v["content"] = json!(text);
            v["content_parts"] = Value::Array(parts.clone());
        }
        _ => v["content_parts"] = Value::Null,
    }
    if v.get("name").is_none() {
        v["name"] = Value::Null;
    }
    v
}

/// `GET /v1/chat/completions/{id}/messages`: the request's messages, in order unless
/// `order=desc`, paged with `after` (a message id) and `limit`.
pub async fn messages(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    let (limit, ascending, after) = paging(&q, true)?;
    let c = own(&s, &caller, &id)?;
    let mut all: Vec<Value> = c
        .messages
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, m)| message_object(&c.id, i, m))
        .collect();
    if !ascending {
        all.reverse();
    }
    let start = match after {
        None => 0,
        Some(a) => {
            all.iter()
                .position(|m| m["id"].as_str() == Some(a.as_str()))
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!("after: `{a}` is not the id of a message of `{id}`"),
                        Some("after"),
                    )
                })?
                + 1
        }
    };
    let rest: Vec<Value> = all.into_iter().skip(start).collect();
    let has_more = rest.len() > limit;
    Ok(Json(list_object(
        rest.into_iter().take(limit).collect(),
        has_more,
    )))
}

#[derive(Deserialize, Default)]
struct Export {
    model: Option<String>,
    metadata: Option<Value>,
    #[serde(default)]
    with_logprobs: bool,
    filename: Option<String>,
}

/// `POST /v1/chat/completions/export` with `{"model"?, "metadata"?: {k: v}, "with_logprobs"?,
/// "filename"?}`: the caller's matching stored completions as a chat fine-tuning file (the
/// same lines as `ferrolm data export --stored --format sft`), kept as a `purpose=fine-tune`
/// file; answers the file object, ready for `POST /v1/fine_tuning/jobs`.
pub async fn export(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let e: Export = if body.iter().all(u8::is_ascii_whitespace) {
        Export::default()
    } else {
        parse(&body)?
    };
    crate::files::tuner(&s)?;
    let metadata: Vec<(String, String)> = metadata(e.metadata.as_ref())?.into_iter().collect();
    let mut q = CompletionQuery {
        model: e.model.clone(),
        metadata,
        ..CompletionQuery::all(Owner::Key(caller.key_id()))
    };
    let st = store(&s)?;
    let (mut text, mut skipped, mut completions) = (String::new(), 0, 0);
    loop {
        let page = st.completions(&q).map_err(ApiError::storage)?;
        for c in &page.items {
            completions += 1;
            let (lines, left_out) = sft_lines(c, e.with_logprobs);
            skipped += left_out;
            for l in lines {
                text.push_str(&l.to_string());
                text.push('\n');
            }
        }
        match (page.has_more, page.items.last()) {
            (true, Some(last)) => q.after = Some(last.id.clone()),
            _ => break,
        }
    }
    if text.is_empty() {
        let why = if skipped > 0 {
            format!("the {skipped} matching replies were stored without log-probs: send `logprobs: true, top_logprobs: K` with the requests, or export without with_logprobs")
        } else {
            format!("{completions} stored completions match: store some with `store: true`, or loosen the model / metadata filter")
        };
        return Err(ApiError::invalid(format!("nothing to export: {why}"), None));
    }
    let filename = e
        .filename
        .unwrap_or_else(|| "stored-completions.jsonl".to_owned());
    let rec = crate::files::keep(&s, &caller, filename, text.into_bytes().into()).await?;
    Ok(Json(crate::files::file_object(&rec)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_assemble_into_the_whole_answer() {
        let mut a = Assembler::default();
        for c in [
            json!({"id": "c", "created": 5, "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]}),
            json!({"id": "c", "created": 5, "model": "m", "choices": [{"index": 0, "delta": {"content": "Hel"}, "logprobs": {"content": [{"token": "Hel", "logprob": -1.0}]}, "finish_reason": null}]}),
            json!({"id": "c", "created": 5, "model": "m", "choices": [{"index": 1, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\""}}]}, "finish_reason": null}]}),
            json!({"id": "c", "created": 5, "model": "m", "choices": [{"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}, "finish_reason": "tool_calls"}]}),
            json!({"id": "c", "created": 5, "model": "m", "choices": [{"index": 0, "delta": {"content": "lo"}, "logprobs": {"content": [{"token": "lo", "logprob": -2.0}]}, "finish_reason": null}]}),
            json!({"id": "c", "created": 5, "model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            json!({"id": "c", "created": 5, "model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}),
        ] {
            a.push(&c);
        }
        let v = a.finish();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(
            (v["id"].clone(), v["created"].clone()),
            (json!("c"), json!(5))
        );
        assert_eq!(v["choices"][0]["message"]["content"], "Hello");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["choices"][0]["logprobs"]["content"][1]["token"], "lo");
        let call = &v["choices"][1]["message"]["tool_calls"][0];
        assert_eq!(call["id"], "call_1");
        assert_eq!(
            call["function"],
            json!({"name": "f", "arguments": "{\"a\": 1}"})
        );
        assert_eq!(v["choices"][1]["message"]["content"], Value::Null);
        assert_eq!(v["choices"][1]["logprobs"], Value::Null);
        assert_eq!(v["usage"]["total_tokens"], 7);
    }

    #[test]
    fn list_filters_read_metadata_brackets() {
        let q = vec![
            ("model".to_owned(), "m".to_owned()),
            ("metadata[task]".to_owned(), "x".to_owned()),
            ("limit".to_owned(), "2".to_owned()),
        ];
        assert_eq!(
            filters(&q),
            (
                Some("m".to_owned()),
                vec![("task".to_owned(), "x".to_owned())]
            )
        );
        assert_eq!(paging(&q, true).ok(), Some((2, true, None)));
        for bad in [("limit", "0"), ("limit", "101"), ("order", "up")] {
            assert!(paging(&[(bad.0.to_owned(), bad.1.to_owned())], true).is_err());
        }
    }
}
