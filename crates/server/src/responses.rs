//! OpenAI's Responses API: `POST /v1/responses` (as one object or a stream of typed events),
//! `GET` / `DELETE /v1/responses/{id}` and `GET /v1/responses/{id}/input_items`.
//!
//! Contract:
//! - A request is translated into the chat pipeline's terms, never run beside it: input items
//!   become chat messages (rendered by the model's chat template, tools through [`crate::tools`]),
//!   function tools and `tool_choice` become chat's (validated by [`Tools::parse`]), and
//!   `text.format` becomes the same grammar as chat's `response_format`. [`ResponsesFormat`] is
//!   the pipeline's [`Format`] for this API.
//! - Input items are canonical once read: each gets an `id` (the client's, or a new one), a
//!   message's content is a list of `input_text` / `output_text` parts, and an `item_reference`
//!   is replaced by the stored item it names (of the caller's key).
//! - `store` (default true, as OpenAI's) keeps the response, the whole conversation it answered
//!   (a `previous_response_id` chain resolved) and its output in the store, scoped by key: another
//!   key's response, a deleted one and one never stored are the same 404 (400 when named by
//!   `previous_response_id`). `instructions` are not carried along a chain, as OpenAI's are not.
//! - A response is stored when it has been answered: by [`Format::whole`] for a JSON answer, at
//!   the stream's end for a stream (a stream the client left is not stored). A store that cannot
//!   be written is reported on stderr and the answer still sent (the tokens are spent).
//! - Not supported (a clear 400): hosted tools (web search, file search, computer use, MCP…),
//!   non-text input (images, files, audio), `background`, `conversation`; `reasoning`, `include`
//!   and `truncation` are accepted and ignored (the model's context strategy applies). Local
//!   models only: routers and upstreams serve chat completions.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ferrolm_accounting::ResponseRecord;
use ferrolm_engine::{FinishReason, Usage};
use ferrolm_grammar::Grammar;
use ferrolm_sample::SamplingParams;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;

use crate::auth::Caller;
use crate::compress::{fit_chat, Compression};
use crate::error::ApiError;
use crate::generate::{self, Choice, ClientConn, Format, Run, TokenInfo};
use crate::tools::{self, Call, Tools};
use crate::{parse, unix_now, AppState, Levers, Worst};

/// A `POST /v1/responses` body. Unknown fields are ignored, as chat's are.
#[derive(Debug, Deserialize)]
struct ResponsesRequest {
    model: Option<String>,
    input: Option<Value>,
    instructions: Option<String>,
    max_output_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// Not OpenAI's, but chat takes it: reproducible sampling.
    seed: Option<u64>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    text: Option<Value>,
    stream: Option<bool>,
    store: Option<bool>,
    previous_response_id: Option<String>,
    metadata: Option<Value>,
    user: Option<String>,
    /// Refused: responses run while their request is open.
    background: Option<bool>,
    /// Refused: conversations are not kept, only `previous_response_id` chains.
    conversation: Option<Value>,
    /// ferrolm's extension, as chat's: `eager` or `lazy` tool definitions.
    tool_strategy: Option<tools::Strategy>,
    /// ferrolm's extension, as chat's: past how many tools (or `"Ntokens"`) `lazy` applies.
    lazy_tools_threshold: Option<tools::Threshold>,
}

fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}_{:016x}{:08x}",
        crate::random_seed(),
        crate::random_seed() as u32
    )
}

fn bad(message: String, param: &'static str) -> ApiError {
    ApiError::invalid(message, Some(param))
}

/// 404 for a response that is not the caller's (or does not exist, or was deleted).
fn no_response(id: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: Some("response_not_found"),
        ..ApiError::invalid(
            format!("no response `{id}`: it was never stored (`store: false`), was deleted, or belongs to another key"),
            None,
        )
    }
}

/// The text of a message's `content`: a string, or a list of text parts.
fn content_parts(content: &Value, at: &str, out_type: &str) -> Result<Vec<Value>, ApiError> {
    let text_part = |t: &str| {
        if out_type == "output_text" {
            json!({"type": "output_text", "text": t, "annotations": []})
        } else {
            json!({"type": "input_text", "text": t})
        }
    };
    match content {
        Value::String(s) => Ok(vec![text_part(s)]),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(j, p)| {
                let kind = p.get("type").and_then(Value::as_str).unwrap_or_default();
                match (kind, p.get("text").and_then(Value::as_str)) {
                    ("input_text" | "output_text" | "text", Some(t)) => Ok(text_part(t)),
                    ("refusal", _) => Ok(text_part(
                        p.get("refusal").and_then(Value::as_str).unwrap_or_default(),
                    )),
                    ("input_text" | "output_text" | "text", None) => Err(bad(
                        format!("{at}.content[{j}].text is missing: a text part is {{\"type\": \"input_text\", \"text\": \"...\"}}"),
                        "input",
                    )),
                    (other, _) => Err(bad(
                        format!("{at}.content[{j}].type is `{other}`: this server takes text only (input_text, output_text); images, files and audio are not supported"),
                        "input",
                    )),
                }
            })
            .collect(),
        _ => Err(bad(
            format!("{at}.content must be a string or a list of input_text parts"),
            "input",
        )),
    }
}

/// The canonical form of `input` (a string, or a list of items).
fn input_items(s: &AppState, key: Option<i64>, input: &Value) -> Result<Vec<Value>, ApiError> {
    let list = match input {
        Value::String(t) => {
            return Ok(vec![json!({
                "id": new_id("msg"), "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_text", "text": t}],
            })])
        }
        Value::Array(a) => a,
        _ => {
            return Err(bad(
                "input must be a string or a list of items (message, function_call, function_call_output, item_reference)".into(),
                "input",
            ))
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let at = format!("input[{i}]");
        let id = |prefix: &str| {
            item.get("id")
                .and_then(Value::as_str)
                .map_or_else(|| new_id(prefix), str::to_owned)
        };
        let str_field = |name: &str| {
            item.get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("{at}.{name} is missing (a string)"), "input"))
        };
        // A message may leave out its type ("easy input message").
        let kind = match item.get("type").and_then(Value::as_str) {
            Some(k) => k,
            None if item.get("role").is_some() => "message",
            None => {
                return Err(bad(
                    format!("{at} has no `type`: use message, function_call, function_call_output or item_reference"),
                    "input",
                ))
            }
        };
        let canonical = match kind {
            "message" => {
                let role = str_field("role")?;
                if !matches!(role, "user" | "assistant" | "system" | "developer") {
                    return Err(bad(
                        format!("{at}.role is `{role}`: use user, assistant, system or developer"),
                        "input",
                    ));
                }
                let part = if role == "assistant" {
                    "output_text"
                } else {
                    "input_text"
                };
                let content = item.get("content").unwrap_or(&Value::Null);
                json!({
                    "id": id("msg"), "type": "message", "role": role, "status": "completed",
                    "content": content_parts(content, &at, part)?,
                })
            }
            "function_call" => {
                let arguments = match item.get("arguments") {
                    Some(Value::String(a)) => a.clone(),
                    Some(v @ Value::Object(_)) => v.to_string(),
                    _ => {
                        return Err(bad(
                            format!("{at}.arguments is missing: a function_call carries its arguments as a JSON string"),
                            "input",
                        ))
                    }
                };
                json!({
                    "id": id("fc"), "type": "function_call", "status": "completed",
                    "call_id": str_field("call_id")?, "name": str_field("name")?,
                    "arguments": arguments,
                })
            }
            "function_call_output" => {
                let output = match item.get("output") {
                    Some(Value::String(o)) => o.clone(),
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Value::as_str))
                        .collect::<Vec<_>>()
                        .join("\n"),
                    _ => {
                        return Err(bad(
                            format!("{at}.output is missing: a function_call_output carries the function's result as a string"),
                            "input",
                        ))
                    }
                };
                json!({
                    "id": id("fco"), "type": "function_call_output", "status": "completed",
                    "call_id": str_field("call_id")?, "output": output,
                })
            }
            "item_reference" => {
                let ref_id = str_field("id")?;
                s.access
                    .store
                    .response_item(ref_id, key)
                    .map_err(ApiError::storage)?
                    .ok_or_else(|| {
                        bad(
                            format!("{at} refers to the item `{ref_id}`, which no stored response of this key holds"),
                            "input",
                        )
                    })?
            }
            other => {
                return Err(bad(
                    format!("{at}.type is `{other}`: this server takes message, function_call, function_call_output and item_reference items"),
                    "input",
                ))
            }
        };
        out.push(canonical);
    }
    Ok(out)
}

/// Chat messages for `instructions` and canonical `items`.
fn chat_messages(instructions: Option<&str>, items: &[Value]) -> Value {
    let mut msgs: Vec<Value> = Vec::with_capacity(items.len() + 1);
    if let Some(i) = instructions {
        msgs.push(json!({"role": "system", "content": i}));
    }
    for item in items {
        let field = |k: &str| item.get(k).cloned().unwrap_or(Value::Null);
        match item.get("type").and_then(Value::as_str) {
            Some("message") => {
                let role = match item.get("role").and_then(Value::as_str) {
                    Some("developer") => "system",
                    Some(r) => r,
                    None => "user",
                };
                let text: Vec<&str> = item
                    .get("content")
                    .and_then(Value::as_array)
                    .map(|ps| ps.iter().filter_map(|p| p.get("text")?.as_str()).collect())
                    .unwrap_or_default();
                msgs.push(json!({"role": role, "content": text.join("\n")}));
            }
            Some("function_call") => {
                let call = json!({
                    "id": field("call_id"), "type": "function",
                    "function": {"name": field("name"), "arguments": field("arguments")},
                });
                // Calls right after an assistant turn belong to it.
                match msgs.last_mut() {
                    Some(m) if m["role"] == "assistant" => match m.get_mut("tool_calls") {
                        Some(Value::Array(calls)) => calls.push(call),
                        _ => m["tool_calls"] = json!([call]),
                    },
                    _ => {
                        msgs.push(json!({"role": "assistant", "content": "", "tool_calls": [call]}))
                    }
                }
            }
            Some("function_call_output") => msgs.push(json!({
                "role": "tool", "tool_call_id": field("call_id"), "content": field("output"),
            })),
            _ => {}
        }
    }
    Value::Array(msgs)
}

/// Responses function tools (`{type, name, description, parameters}`) in chat's shape.
fn chat_tools(tools: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let list = match tools {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(bad(
                "tools must be a list of {\"type\": \"function\", \"name\": ..., \"parameters\": {...}} objects".into(),
                "tools",
            ))
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        match t.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => {
                return Err(bad(
                    format!("tools[{i}].type is `{other}`: this server runs function tools only (hosted tools such as web search, file search or MCP are OpenAI's)"),
                    "tools",
                ))
            }
            None => {
                return Err(bad(
                    format!("tools[{i}] has no `type`: a tool is {{\"type\": \"function\", \"name\": ..., \"parameters\": {{...}}}}"),
                    "tools",
                ))
            }
        }
        let Some(name) = t.get("name") else {
            return Err(bad(
                format!("tools[{i}].name is missing: a Responses function tool names itself at the top level ({{\"type\": \"function\", \"name\": ...}})"),
                "tools",
            ));
        };
        let mut f = json!({"name": name});
        for k in ["description", "parameters"] {
            if let Some(v) = t.get(k).filter(|v| !v.is_null()) {
                f[k] = v.clone();
            }
        }
        out.push(json!({"type": "function", "function": f}));
    }
    Ok(Some(Value::Array(out)))
}

/// Responses `tool_choice` in chat's shape.
fn chat_tool_choice(choice: Option<&Value>) -> Result<Option<Value>, ApiError> {
    match choice {
        None | Some(Value::Null) | Some(Value::String(_)) => Ok(choice.cloned()),
        Some(v) => match (
            v.get("type").and_then(Value::as_str),
            v.get("name").and_then(Value::as_str),
        ) {
            (Some("function"), Some(n)) => Ok(Some(json!({"type": "function", "function": {"name": n}}))),
            _ => Err(bad(
                "tool_choice must be none, auto, required, or {\"type\": \"function\", \"name\": ...}".into(),
                "tool_choice",
            )),
        },
    }
}

/// `text.format`: the format echoed in the response, and the grammar that enforces it (the same
/// JSON grammars as chat's `response_format`).
fn text_format(text: Option<&Value>) -> Result<(Value, Option<Grammar>), ApiError> {
    let Some(f) = text.and_then(|t| t.get("format")).filter(|f| !f.is_null()) else {
        return Ok((json!({"type": "text"}), None));
    };
    let grammar = match f.get("type").and_then(Value::as_str) {
        Some("text") => None,
        Some("json_object") => Some(Grammar::json_object()),
        Some("json_schema") => {
            let Some(schema) = f.get("schema") else {
                return Err(bad(
                    "text.format.schema is missing: send {\"type\": \"json_schema\", \"name\": ..., \"schema\": {...}}".into(),
                    "text",
                ));
            };
            Some(
                Grammar::json_schema(schema)
                    .map_err(|e| bad(format!("text.format.schema: {e}"), "text"))?,
            )
        }
        other => {
            return Err(bad(
                format!("text.format.type is {other:?}: use text, json_object or json_schema"),
                "text",
            ))
        }
    };
    Ok((f.clone(), grammar))
}

/// `POST /v1/responses`.
pub async fn create(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    conn: Option<Extension<ConnectInfo<ClientConn>>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: ResponsesRequest = parse(&body)?;
    if req.background == Some(true) {
        return Err(bad(
            "background mode is not supported: send the request without `background` (stream it to see progress)".into(),
            "background",
        ));
    }
    if req.conversation.as_ref().is_some_and(|c| !c.is_null()) {
        return Err(bad(
            "conversations are not supported: continue a response with `previous_response_id` instead".into(),
            "conversation",
        ));
    }
    let key = caller.key_id();
    let model = s.model(key, req.model.as_deref())?;
    let mut items = Vec::new();
    if let Some(prev) = &req.previous_response_id {
        let r = s
            .access
            .store
            .response(prev, key)
            .map_err(ApiError::storage)?
            .ok_or_else(|| {
                bad(
                    format!("previous_response_id: no response `{prev}`: it was never stored (`store: false`), was deleted, or belongs to another key"),
                    "previous_response_id",
                )
                .with_code("previous_response_not_found")
            })?;
        items.extend(r.input);
        items.extend(r.output);
    }
    match &req.input {
        Some(input) => items.extend(input_items(&s, key, input)?),
        None if items.is_empty() => {
            return Err(bad(
                "input is missing: send a string, or a list of message items".into(),
                "input",
            ))
        }
        None => {}
    }
    let mut tools = Tools::parse(
        chat_tools(req.tools.as_ref())?.as_ref(),
        chat_tool_choice(req.tool_choice.as_ref())?.as_ref(),
        req.parallel_tool_calls,
    )?;
    let (format_echo, grammar) = text_format(req.text.as_ref())?;
    if grammar.is_some() && tools.as_ref().is_some_and(Tools::forces) {
        return Err(bad(
            "text.format and a forced tool call (tool_choice required or a named function) cannot both constrain one reply: drop one".into(),
            "text",
        ));
    }
    let messages = chat_messages(req.instructions.as_deref(), &items);
    let mut left_out = None;
    if let Some(t) = &mut tools {
        left_out = t.apply_for(
            &model,
            req.tool_strategy,
            req.lazy_tools_threshold,
            1,
            &messages,
        )?;
    }
    let grammar = match grammar {
        Some(g) => Some(g),
        None => tools.as_ref().map(Tools::grammar).transpose()?.flatten(),
    }
    .map(Arc::new);
    let max = req.max_output_tokens;
    let (prompt, compressed) = fit_chat(
        &s,
        &model,
        &messages,
        tools.as_ref().and_then(Tools::for_prompt),
        model.context_strategy,
        max,
        None,
        caller.cache_scope,
    )
    .await?;
    let params = SamplingParams {
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        seed: req.seed,
        ..SamplingParams::greedy()
    };
    let opts = model.options(&prompt, params, max, Vec::new(), grammar)?;
    let eager_prompt_tokens = left_out.map(|l| l.eager_prompt_tokens(prompt.len()));
    let resume = left_out
        .map(|_| generate::Resume::new(messages.clone(), model.context_strategy, opts.clone()));
    let mut ticket = s.admit(
        &caller,
        Worst {
            prompt_tokens: prompt.len() as u64,
            completion_tokens: opts.max_tokens as u64,
            price: model.price.as_ref(),
        },
    )?;
    if let Some(c) = &compressed {
        ticket.headers.push(("x-ferrolm-context", c.header()));
    }
    if let Some(l) = &left_out {
        ticket
            .headers
            .push(("x-ferrolm-tools", l.header(prompt.len())));
    }
    let job = generate::start(&s, &model, prompt, opts, 1, caller.cache_scope).await?;
    let store = req.store.unwrap_or(true);
    let base = json!({
        "id": new_id("resp"),
        "object": "response",
        "created_at": unix_now(),
        "model": model.id,
        "error": null,
        "incomplete_details": null,
        "instructions": req.instructions,
        "max_output_tokens": max,
        "metadata": req.metadata.clone().unwrap_or_else(|| json!({})),
        "parallel_tool_calls": req.parallel_tool_calls.unwrap_or(true),
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": null, "summary": null},
        "store": store,
        "temperature": req.temperature.unwrap_or(1.0),
        "text": {"format": format_echo},
        "tool_choice": req.tool_choice.clone().unwrap_or_else(|| json!("auto")),
        "tools": req.tools.clone().unwrap_or_else(|| json!([])),
        "top_p": req.top_p.unwrap_or(1.0),
        "truncation": "disabled",
        "user": req.user,
    });
    let format = ResponsesFormat {
        state: s.clone(),
        key,
        store,
        base,
        input: items,
        seq: 0,
        output: Vec::new(),
        open: None,
        reason: None,
    };
    let run = Run {
        state: s,
        caller,
        ticket,
        levers: Levers {
            compressed_tokens: compressed.as_ref().map_or(0, Compression::saved),
            eager_prompt_tokens,
            ..Levers::default()
        },
        model,
        endpoint: "/v1/responses",
        tools,
        resume,
        job,
        conn: conn.map(|Extension(ConnectInfo(c))| c),
    };
    generate::respond(run, format, req.stream.unwrap_or(false)).await
}

/// `GET /v1/responses/{id}`.
pub async fn get_one(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let r = s
        .access
        .store
        .response(&id, caller.key_id())
        .map_err(ApiError::storage)?
        .ok_or_else(|| no_response(&id))?;
    Ok(Json(r.body))
}

/// `DELETE /v1/responses/{id}`.
pub async fn delete(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !s
        .access
        .store
        .delete_response(&id, caller.key_id())
        .map_err(ApiError::storage)?
    {
        return Err(no_response(&id));
    }
    Ok(Json(
        json!({"id": id, "object": "response.deleted", "deleted": true}),
    ))
}

#[derive(Debug, Deserialize)]
pub struct ItemsQuery {
    limit: Option<usize>,
    order: Option<String>,
    after: Option<String>,
}

/// `GET /v1/responses/{id}/input_items`: newest first unless `order=asc`, 20 a page (1-100).
pub async fn input_items_list(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<ItemsQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(bad(format!("limit is {limit}: use 1 to 100"), "limit"));
    }
    let mut items = s
        .access
        .store
        .response(&id, caller.key_id())
        .map_err(ApiError::storage)?
        .ok_or_else(|| no_response(&id))?
        .input;
    match q.order.as_deref() {
        None | Some("desc") => items.reverse(),
        Some("asc") => {}
        Some(o) => return Err(bad(format!("order is `{o}`: use asc or desc"), "order")),
    }
    if let Some(a) = &q.after {
        let Some(pos) = items.iter().position(|i| i["id"] == a.as_str()) else {
            return Err(bad(
                format!("after: `{a}` is not an item of this response"),
                "after",
            ));
        };
        items.drain(..=pos);
    }
    let has_more = items.len() > limit;
    items.truncate(limit);
    Ok(Json(json!({
        "object": "list",
        "data": items,
        "first_id": items.first().map(|i| i["id"].clone()),
        "last_id": items.last().map(|i| i["id"].clone()),
        "has_more": has_more,
    })))
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "id": id, "type": "message", "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    })
}

fn call_item(c: &Call, status: &str) -> Value {
    json!({
        "id": new_id("fc"), "type": "function_call", "status": status,
        "call_id": new_id("call"), "name": c.name, "arguments": c.arguments.to_string(),
    })
}

type SseItem = Result<SseEvent, Infallible>;

/// Responses objects, or the API's typed SSE events (`event: <type>` + a `data` object carrying
/// the same `type` and a `sequence_number`). One choice (the API has no `n`).
struct ResponsesFormat {
    state: AppState,
    key: Option<i64>,
    store: bool,
    /// The response object's fields that do not change while it runs.
    base: Value,
    /// The conversation answered (input items, canonical), for the store.
    input: Vec<Value>,
    /// The next event's `sequence_number`.
    seq: u64,
    /// Output items completed so far (streaming).
    output: Vec<Value>,
    /// The message item being streamed: its id and text so far.
    open: Option<(String, String)>,
    reason: Option<FinishReason>,
}

impl ResponsesFormat {
    fn event(&mut self, mut v: Value) -> SseItem {
        v["sequence_number"] = json!(self.seq);
        self.seq += 1;
        let kind = v["type"].as_str().unwrap_or("message").to_owned();
        Ok(SseEvent::default().event(kind).data(v.to_string()))
    }

    /// The response object with `status`, `output` and (when done) `usage`.
    fn object(&self, status: &str, output: &[Value], usage: Option<&Usage>) -> Value {
        let mut v = self.base.clone();
        v["status"] = json!(status);
        v["output"] = json!(output);
        v["usage"] = usage.map_or(Value::Null, usage_json);
        if status == "incomplete" {
            v["incomplete_details"] = json!({"reason": "max_output_tokens"});
        }
        v
    }

    fn status(reason: Option<FinishReason>) -> &'static str {
        match reason {
            Some(FinishReason::Length) => "incomplete",
            _ => "completed",
        }
    }

    /// Keep the answered response, when asked to.
    fn keep(&self, body: &Value) {
        if !self.store {
            return;
        }
        let output = body["output"].as_array().cloned().unwrap_or_default();
        let r = ResponseRecord {
            id: body["id"].as_str().unwrap_or_default().to_owned(),
            key_id: self.key,
            created_at: body["created_at"].as_i64().unwrap_or_default(),
            body: body.clone(),
            input: self.input.clone(),
            output,
        };
        if let Err(e) = self.state.access.store.insert_response(&r) {
            eprintln!(
                "ferrolm serve: response {} was answered but could not be stored: {e}",
                r.id
            );
        }
    }

    /// Open the message item if none is (its `added` events).
    fn open_message(&mut self) -> Vec<SseItem> {
        if self.open.is_some() {
            return vec![];
        }
        let id = new_id("msg");
        let index = self.output.len();
        let mut item = message_item(&id, "", "in_progress");
        item["content"] = json!([]);
        self.open = Some((id.clone(), String::new()));
        vec![
            self.event(
                json!({"type": "response.output_item.added", "output_index": index, "item": item}),
            ),
            self.event(json!({
                "type": "response.content_part.added", "item_id": id, "output_index": index,
                "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []},
            })),
        ]
    }

    /// Close the open message item (its `done` events).
    fn close_message(&mut self) -> Vec<SseItem> {
        let Some((id, text)) = self.open.take() else {
            return vec![];
        };
        let index = self.output.len();
        let item = message_item(&id, &text, "completed");
        let out = vec![
            self.event(json!({
                "type": "response.output_text.done", "item_id": id, "output_index": index,
                "content_index": 0, "text": text, "logprobs": [],
            })),
            self.event(json!({
                "type": "response.content_part.done", "item_id": id, "output_index": index,
                "content_index": 0, "part": item["content"][0].clone(),
            })),
            self.event(
                json!({"type": "response.output_item.done", "output_index": index, "item": item}),
            ),
        ];
        self.output.push(item);
        out
    }
}

impl Format for ResponsesFormat {
    type Item = SseItem;

    fn start(&mut self, _i: usize) -> Vec<SseItem> {
        let created = self.object("in_progress", &[], None);
        vec![
            self.event(json!({"type": "response.created", "response": created})),
            self.event(json!({"type": "response.in_progress", "response": created})),
        ]
    }

    fn text(&mut self, _i: usize, text: String, _token: Option<TokenInfo>) -> Vec<SseItem> {
        if text.is_empty() {
            return vec![];
        }
        let mut out = self.open_message();
        let index = self.output.len();
        let Some((id, so_far)) = &mut self.open else {
            return out;
        };
        so_far.push_str(&text);
        let id = id.clone();
        out.push(self.event(json!({
            "type": "response.output_text.delta", "item_id": id, "output_index": index,
            "content_index": 0, "delta": text, "logprobs": [],
        })));
        out
    }

    fn calls(&mut self, i: usize, content: Option<String>, calls: &[Call]) -> Vec<SseItem> {
        let mut out = content.map(|c| self.text(i, c, None)).unwrap_or_default();
        out.extend(self.close_message());
        for c in calls {
            let index = self.output.len();
            let done = call_item(c, "completed");
            let mut added = done.clone();
            added["status"] = json!("in_progress");
            added["arguments"] = json!("");
            let id = done["id"].clone();
            out.push(self.event(
                json!({"type": "response.output_item.added", "output_index": index, "item": added}),
            ));
            out.push(self.event(json!({
                "type": "response.function_call_arguments.delta", "item_id": id,
                "output_index": index, "delta": done["arguments"],
            })));
            out.push(self.event(json!({
                "type": "response.function_call_arguments.done", "item_id": id,
                "output_index": index, "name": c.name, "arguments": done["arguments"],
            })));
            out.push(self.event(
                json!({"type": "response.output_item.done", "output_index": index, "item": done}),
            ));
            self.output.push(done);
        }
        out
    }

    fn finish(
        &mut self,
        _i: usize,
        reason: FinishReason,
        _finish: &'static str,
        _usage: &Usage,
        _ttft: f64,
    ) -> Vec<SseItem> {
        self.reason = Some(reason);
        // A reply with no text and no call is still one (empty) message.
        let mut out = if self.output.is_empty() {
            self.open_message()
        } else {
            vec![]
        };
        out.extend(self.close_message());
        out
    }

    fn end(&mut self, usage: &Usage, _cost: Option<f64>) -> Vec<SseItem> {
        let status = Self::status(self.reason);
        let body = self.object(status, &self.output, Some(usage));
        self.keep(&body);
        let kind = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        vec![self.event(json!({"type": kind, "response": body}))]
    }

    fn error(&mut self, message: String) -> Vec<SseItem> {
        let mut body = self.object("failed", &self.output, None);
        body["error"] = json!({"code": "server_error", "message": message});
        vec![self.event(json!({"type": "response.failed", "response": body}))]
    }

    fn stream_response(stream: ReceiverStream<SseItem>) -> Response {
        Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response()
    }

    fn whole(&self, choices: Vec<Choice>, usage: &Usage) -> Value {
        let mut output = Vec::new();
        let reason = choices.first().map(|c| c.reason);
        if let Some(c) = choices.into_iter().next() {
            match c.content {
                Some(t) if !t.is_empty() || c.calls.is_empty() => {
                    output.push(message_item(&new_id("msg"), &t, "completed"))
                }
                None if c.calls.is_empty() => {
                    output.push(message_item(&new_id("msg"), "", "completed"))
                }
                _ => {}
            }
            output.extend(c.calls.iter().map(|call| call_item(call, "completed")));
        }
        let body = self.object(Self::status(reason), &output, Some(usage));
        self.keep(&body);
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_calls_after_an_assistant_turn_join_it_and_outputs_become_tool_messages() {
        let items = vec![
            json!({"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]}),
            json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]}),
            json!({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]}),
            json!({"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{\"city\":\"Paris\"}"}),
            json!({"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{\"city\":\"Rome\"}"}),
            json!({"type": "function_call_output", "call_id": "c1", "output": "sunny"}),
        ];
        let m = chat_messages(Some("Sys"), &items);
        let roles: Vec<&str> = m
            .as_array()
            .map(|a| a.iter().filter_map(|x| x["role"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(roles, ["system", "system", "user", "assistant", "tool"]);
        assert_eq!(m[3]["content"], "Checking.");
        assert_eq!(m[3]["tool_calls"][1]["id"], "c2");
        assert_eq!(
            m[3]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Paris\"}"
        );
        assert_eq!(m[4]["tool_call_id"], "c1");
    }

    #[test]
    fn responses_tools_and_tool_choice_take_chat_shape_and_hosted_tools_are_refused() {
        let t = chat_tools(Some(
            &json!([{"type": "function", "name": "w", "description": "d", "parameters": {"type": "object"}, "strict": true}]),
        ));
        assert_eq!(
            t.ok().flatten(),
            Some(
                json!([{"type": "function", "function": {"name": "w", "description": "d", "parameters": {"type": "object"}}}])
            )
        );
        let e = chat_tools(Some(&json!([{"type": "web_search"}]))).err();
        assert!(e.is_some_and(|e| e.message.contains("web_search")));
        let e = chat_tools(Some(&json!([{"type": "function", "parameters": {}}]))).err();
        assert!(e.is_some_and(|e| e.message.contains("tools[0].name")));
        assert_eq!(
            chat_tool_choice(Some(&json!({"type": "function", "name": "w"})))
                .ok()
                .flatten(),
            Some(json!({"type": "function", "function": {"name": "w"}}))
        );
        assert!(chat_tool_choice(Some(&json!({"type": "allowed_tools"}))).is_err());
    }

    #[test]
    fn text_format_json_schema_needs_a_schema_and_text_means_no_grammar() {
        assert!(text_format(None).is_ok_and(|(f, g)| f["type"] == "text" && g.is_none()));
        assert!(text_format(Some(
            &json!({"format": {"type": "json_schema", "name": "x"}})
        ))
        .is_err_and(|e| e.message.contains("text.format.schema")));
        let schema =
            json!({"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}});
        assert!(text_format(Some(&schema)).is_ok_and(|(_, g)| g.is_some()));
        assert!(text_format(Some(&json!({"format": {"type": "xml"}}))).is_err());
    }
}
