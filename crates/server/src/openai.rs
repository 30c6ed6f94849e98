//! The OpenAI-compatible routes: models, chat completions and (legacy) completions, as JSON or
//! as SSE streams of chunks ending with `data: [DONE]`.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferrolm_engine::{Event, Usage};
use ferrolm_sample::SamplingParams;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::generate::{self, finish_name, Running, TokenInfo};
use crate::{logit_bias, parse, unix_now, AppState, Stop};

/// Fields shared by chat and text completions. Unknown fields are ignored.
#[derive(Debug, Default, Deserialize)]
struct Common {
    model: Option<String>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// Not OpenAI, but vLLM and llama.cpp accept it.
    top_k: Option<usize>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<HashMap<String, f32>>,
    seed: Option<u64>,
    stop: Option<Stop>,
    n: Option<u64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    tools: Option<Value>,
    response_format: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Value,
    logprobs: Option<bool>,
    top_logprobs: Option<usize>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Value,
    /// Legacy completions: how many alternatives to report per token.
    logprobs: Option<usize>,
    #[serde(flatten)]
    common: Common,
}

impl Common {
    /// Reject what the MVP cannot do, rather than silently ignore it.
    fn check_supported(&self) -> Result<(), ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid(
                "n: only n=1 is supported for now; send separate requests for more choices",
                Some("n"),
            ));
        }
        if self
            .tools
            .as_ref()
            .is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(ApiError::invalid(
                "tools: tool calling is not supported yet; remove `tools`",
                Some("tools"),
            ));
        }
        if let Some(f) = &self.response_format {
            if f.get("type").and_then(Value::as_str) != Some("text") {
                return Err(ApiError::invalid(
                    "response_format: JSON mode and structured outputs are not supported yet; remove `response_format` or use {\"type\": \"text\"}",
                    Some("response_format"),
                ));
            }
        }
        Ok(())
    }

    /// OpenAI's defaults: temperature 1, top_p 1, no other filter, no penalty.
    fn params(&self, logprobs: Option<usize>) -> Result<SamplingParams, ApiError> {
        Ok(SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0),
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            logit_bias: logit_bias(self.logit_bias.clone())?,
            seed: self.seed,
            logprobs,
            ..SamplingParams::greedy()
        })
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

/// What every response object of one request repeats.
#[derive(Clone)]
struct Meta {
    id: String,
    created: u64,
    model: String,
}

impl Meta {
    fn new(state: &AppState, prefix: &str) -> Self {
        Meta {
            id: format!("{prefix}-{:016x}", crate::random_seed()),
            created: unix_now(),
            model: state.model.id.clone(),
        }
    }
}

fn model_object(state: &AppState) -> Value {
    json!({
        "id": state.model.id,
        "object": "model",
        "created": state.model.created,
        "owned_by": "ferrolm",
    })
}

pub async fn models(State(s): State<AppState>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(&s)]}))
}

pub async fn model(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    s.check_model(Some(&id))?;
    Ok(Json(model_object(&s)))
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// One token's text as OpenAI reports it: the token's own bytes, lossily decoded.
fn token_text(s: &AppState, id: u32) -> (String, Vec<u8>) {
    let b = s.model.tok.token_bytes(id).to_vec();
    (String::from_utf8_lossy(&b).into_owned(), b)
}

/// Chat `logprobs.content` entries.
fn chat_logprobs(s: &AppState, tokens: &[TokenInfo]) -> Value {
    let entry = |id: u32, lp: f32| {
        let (t, b) = token_text(s, id);
        json!({"token": t, "logprob": lp, "bytes": b})
    };
    let content: Vec<Value> = tokens
        .iter()
        .map(|(id, lp, top)| {
            let mut e = entry(*id, lp.unwrap_or(f32::NEG_INFINITY));
            e["top_logprobs"] = top.iter().map(|&(t, l)| entry(t, l)).collect();
            e
        })
        .collect();
    json!({"content": content})
}

/// Legacy completions `logprobs`: parallel arrays.
fn completion_logprobs(s: &AppState, tokens: &[TokenInfo]) -> Value {
    let mut offset = 0;
    let (mut toks, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for (id, lp, top) in tokens {
        let (t, _) = token_text(s, *id);
        offsets.push(offset);
        offset += t.len();
        toks.push(t);
        lps.push(*lp);
        let m: serde_json::Map<String, Value> = top
            .iter()
            .map(|&(t, l)| (token_text(s, t).0, json!(l)))
            .collect();
        tops.push(m);
    }
    json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

pub async fn chat(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let mut req: ChatRequest = parse(&body)?;
    let stop = Stop::into_vec(req.common.stop.take());
    let c = &req.common;
    s.check_model(c.model.as_deref())?;
    c.check_supported()?;
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs needs logprobs: true",
                Some("top_logprobs"),
            ))
        }
        (false, None) => None,
        (true, n) => Some(n.unwrap_or(0)),
    };
    let prompt = s.chat_prompt(&req.messages)?;
    let max = c.max_completion_tokens.or(c.max_tokens);
    let opts = s.options(&prompt, c.params(logprobs)?, max, stop)?;
    let stream = c.stream.unwrap_or(false);
    let include_usage = c.include_usage();
    let run = generate::start(&s, prompt, opts).await?;
    let meta = Meta::new(&s, "chatcmpl");
    if stream {
        return Ok(chat_stream(s, run, meta, include_usage, logprobs.is_some()));
    }
    let out = generate::collect(run).await?;
    Ok(Json(json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": null,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": out.text, "refusal": null},
            "logprobs": if logprobs.is_some() { chat_logprobs(&s, &out.tokens) } else { Value::Null },
            "finish_reason": finish_name(out.reason),
        }],
        "usage": usage_json(&out.usage),
    }))
    .into_response())
}

fn sse_json(v: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

fn sse_stream(
    stream: tokio_stream::wrappers::ReceiverStream<Result<SseEvent, Infallible>>,
) -> Response {
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// `data: {"error": ...}` for a failure after the stream has started.
fn stream_error(message: String) -> Result<SseEvent, Infallible> {
    sse_json(&ApiError::server(axum::http::StatusCode::INTERNAL_SERVER_ERROR, message).body())
}

fn chat_stream(
    s: AppState,
    run: Running,
    meta: Meta,
    include_usage: bool,
    logprobs: bool,
) -> Response {
    let chunk = move |choices: Value, usage: Option<&Usage>| {
        let mut v = json!({
            "id": meta.id,
            "object": "chat.completion.chunk",
            "created": meta.created,
            "model": meta.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if include_usage {
            v["usage"] = usage.map_or(Value::Null, usage_json);
        }
        sse_json(&v)
    };
    let choice = |delta: Value, lp: Value, finish: Value| json!([{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]);
    let mut first = true;
    let stream = generate::pump(run, move |_, ev| {
        let mut out = Vec::new();
        if std::mem::take(&mut first) {
            out.push(chunk(
                choice(
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                    Value::Null,
                ),
                None,
            ));
        }
        match ev {
            Event::Token {
                id,
                text,
                logprob,
                top,
            } => {
                if !text.is_empty() || logprobs {
                    let lp = if logprobs {
                        chat_logprobs(&s, &[(id, logprob, top)])
                    } else {
                        Value::Null
                    };
                    out.push(chunk(
                        choice(json!({"content": text}), lp, Value::Null),
                        None,
                    ));
                }
            }
            Event::Finished { reason, usage, .. } => {
                out.push(chunk(
                    choice(json!({}), Value::Null, json!(finish_name(reason))),
                    None,
                ));
                if include_usage {
                    out.push(chunk(json!([]), Some(&usage)));
                }
                out.push(Ok(SseEvent::default().data("[DONE]")));
            }
            Event::Error(m) => out.push(stream_error(m)),
        }
        out
    });
    sse_stream(stream)
}

pub async fn completions(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let mut req: CompletionRequest = parse(&body)?;
    let stop = Stop::into_vec(req.common.stop.take());
    let c = &req.common;
    s.check_model(c.model.as_deref())?;
    c.check_supported()?;
    let text = match &req.prompt {
        Value::String(t) => t.as_str(),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default(),
        _ => {
            return Err(ApiError::invalid(
                "prompt must be a string (or an array holding one string): batches of prompts and token-id prompts are not supported yet",
                Some("prompt"),
            ))
        }
    };
    let prompt = s.text_prompt(text)?;
    let opts = s.options(
        &prompt,
        c.params(req.logprobs)?,
        c.max_completion_tokens.or(c.max_tokens).or(Some(16)),
        stop,
    )?;
    let stream = c.stream.unwrap_or(false);
    let include_usage = c.include_usage();
    let logprobs = req.logprobs.is_some();
    let run = generate::start(&s, prompt, opts).await?;
    let meta = Meta::new(&s, "cmpl");
    let object = move |meta: &Meta, text: String, lp: Value, finish: Value| {
        json!({
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "system_fingerprint": null,
            "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}],
        })
    };
    if stream {
        let stream = generate::pump(run, move |_, ev| match ev {
            Event::Token {
                id,
                text,
                logprob,
                top,
            } => {
                if text.is_empty() && !logprobs {
                    return vec![];
                }
                let lp = if logprobs {
                    completion_logprobs(&s, &[(id, logprob, top)])
                } else {
                    Value::Null
                };
                let mut v = object(&meta, text, lp, Value::Null);
                if include_usage {
                    v["usage"] = Value::Null;
                }
                vec![sse_json(&v)]
            }
            Event::Finished { reason, usage, .. } => {
                let mut v = object(
                    &meta,
                    String::new(),
                    Value::Null,
                    json!(finish_name(reason)),
                );
                let mut out = Vec::new();
                if include_usage {
                    v["usage"] = Value::Null;
                    out.push(sse_json(&v));
                    let mut u = object(&meta, String::new(), Value::Null, Value::Null);
                    u["choices"] = json!([]);
                    u["usage"] = usage_json(&usage);
                    out.push(sse_json(&u));
                } else {
                    out.push(sse_json(&v));
                }
                out.push(Ok(SseEvent::default().data("[DONE]")));
                out
            }
            Event::Error(m) => vec![stream_error(m)],
        });
        return Ok(sse_stream(stream));
    }
    let out = generate::collect(run).await?;
    let lp = if logprobs {
        completion_logprobs(&s, &out.tokens)
    } else {
        Value::Null
    };
    let mut v = object(&meta, out.text, lp, json!(finish_name(out.reason)));
    v["usage"] = usage_json(&out.usage);
    Ok(Json(v).into_response())
}
