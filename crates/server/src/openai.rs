//! The OpenAI-compatible routes: models, chat completions and (legacy) completions, as JSON or
//! as SSE streams of chunks ending with `data: [DONE]`. `n` choices run as `n` requests in the
//! same continuous batch; `response_format` and forced tool calls are enforced by a grammar.
//! A chat answer to be kept (`store: true`, `serve --store-all`) goes to [`crate::stored`] as
//! the client got it: the JSON object, or the stream's chunks assembled.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ferrolm_engine::{FinishReason, Usage};
use ferrolm_grammar::Grammar;
use ferrolm_sample::SamplingParams;
use ferrolm_tokenizer::Tokenizer;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::compress::{fit_chat, Compression, Strategy};
use crate::error::ApiError;
use crate::generate::{self, with_headers, Choice, ClientConn, Format, Run, TokenInfo};
use crate::route::{self, Target};
use crate::stored::{self, Assembler, Keep};
use crate::tools::{self, Call, Tools};
use crate::{logit_bias, parse, unix_now, AppState, Levers, Model, Stop, Ticket, Worst};

/// Most choices one request may ask for.
const MAX_N: u64 = 16;

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
    response_format: Option<Value>,
    /// vLLM's and llama.cpp's extension: keep generating past end-of-turn tokens (benchmarks).
    ignore_eos: Option<bool>,
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
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    /// ferrolm's extension: `error` or `middle-out` for a conversation over the context.
    context_strategy: Option<Strategy>,
    /// ferrolm's extension: `eager` or `lazy` tool definitions (see `tools`).
    tool_strategy: Option<tools::Strategy>,
    /// ferrolm's extension: past how many tools (or `"Ntokens"`) `lazy` applies.
    lazy_tools_threshold: Option<tools::Threshold>,
    /// Keep the answer (see `stored`); `serve --store-all` makes it the default.
    store: Option<bool>,
    /// Up to 16 string pairs kept with a stored answer, to find it by.
    metadata: Option<Value>,
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

impl ChatRequest {
    /// Validated tools, the grammar of `response_format` (which a forced tool call may not
    /// join), and how many top logprobs to report. The grammar of a forced tool call depends on
    /// the model's tool strategy: see [`tools_for`].
    #[allow(clippy::type_complexity)]
    fn checked(&self) -> Result<(Option<Tools>, Option<Arc<Grammar>>, Option<usize>), ApiError> {
        let tools = Tools::parse(
            self.tools.as_ref(),
            self.tool_choice.as_ref(),
            self.parallel_tool_calls,
        )?;
        let grammar = self.common.grammar()?.map(Arc::new);
        if grammar.is_some() && tools.as_ref().is_some_and(Tools::forces) {
            return Err(ApiError::invalid(
                "response_format and a forced tool call (tool_choice required or a named function) cannot both constrain one reply: drop one",
                Some("response_format"),
            ));
        }
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (false, Some(_)) => {
                return Err(ApiError::invalid(
                    "top_logprobs needs logprobs: true",
                    Some("top_logprobs"),
                ))
            }
            (false, None) => None,
            (true, n) => Some(n.unwrap_or(0)),
        };
        Ok((tools, grammar, logprobs))
    }
}

impl Common {
    fn n(&self) -> Result<usize, ApiError> {
        match self.n.unwrap_or(1) {
            0 => Err(ApiError::invalid("n must be at least 1", Some("n"))),
            n if n > MAX_N => Err(ApiError::invalid(
                format!("n is {n}; at most {MAX_N} choices per request"),
                Some("n"),
            )),
            n => Ok(n as usize),
        }
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

    /// `response_format`: text (no grammar), `json_object`, or `json_schema` (enforced).
    fn grammar(&self) -> Result<Option<Grammar>, ApiError> {
        let Some(f) = &self.response_format else {
            return Ok(None);
        };
        let bad = |m: String| ApiError::invalid(m, Some("response_format"));
        match f.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(Grammar::json_object())),
            Some("json_schema") => {
                let Some(schema) = f.pointer("/json_schema/schema") else {
                    return Err(bad(
                        "response_format.json_schema.schema is missing: send {\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}".into(),
                    ));
                };
                Grammar::json_schema(schema)
                    .map(Some)
                    .map_err(|e| bad(format!("response_format.json_schema.schema: {e}")))
            }
            other => Err(bad(format!(
                "response_format.type is {other:?}: use text, json_object or json_schema"
            ))),
        }
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
    fn new(model: &Model, prefix: &str) -> Self {
        Meta {
            id: format!("{prefix}-{:016x}", crate::random_seed()),
            created: unix_now(),
            model: model.id.clone(),
        }
    }
}

fn model_object(m: &Model) -> Value {
    if m.adapter.is_some() {
        return crate::adapters::adapter_object(m);
    }
    let mut o = json!({
        "id": m.id,
        "object": "model",
        "created": m.created,
        "owned_by": "ferrolm",
    });
    // An extra field (clients ignore unknown ones): what quantizing this file cost.
    if !m.details.quantize_receipt.is_empty() {
        o["quantization"] =
            json!({"type": m.details.quantization, "receipt": m.details.quantize_receipt});
    }
    o
}

pub async fn models(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Json<Value> {
    let mut data: Vec<Value> = s
        .models(caller.key_id())
        .iter()
        .map(|m| model_object(m))
        .collect();
    data.extend(s.routers.iter().map(
        |r| json!({"id": r.id, "object": "model", "created": 0, "owned_by": "ferrolm-router"}),
    ));
    if let Some(e) = s.embeddings.get() {
        data.push(json!({"id": e.id, "object": "model", "created": e.created, "owned_by": "ferrolm", "type": "embedding", "dimensions": e.embedder.dim(), "max_input_tokens": e.embedder.max_tokens()}));
    }
    Json(json!({"object": "list", "data": data}))
}

pub async fn model(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let m = s.model(caller.key_id(), Some(&id))?;
    Ok(Json(model_object(&m)))
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// A stream's closing usage. An extra field (clients ignore unknown ones): `cost_usd`, what the
/// ledger charged, which a JSON answer sends as the `x-ferrolm-cost-usd` header but a stream
/// only knows after its headers are out.
fn stream_usage_json(u: &Usage, cost: Option<f64>) -> Value {
    let mut v = usage_json(u);
    if let Some(c) = cost {
        v["cost_usd"] = json!(c);
    }
    v
}

/// One token's text as OpenAI reports it: the token's own bytes, lossily decoded.
fn token_text(m: &Model, id: u32) -> (String, Vec<u8>) {
    token_text_of(&m.tok, id)
}

fn token_text_of(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let b = tok.token_bytes(id).to_vec();
    (String::from_utf8_lossy(&b).into_owned(), b)
}

/// Chat `logprobs.content` entries.
fn chat_logprobs(m: &Model, tokens: &[TokenInfo]) -> Value {
    json!({"content": logprobs_content(&m.tok, tokens)})
}

/// OpenAI's chat `logprobs.content`: per token `{token, logprob, bytes, top_logprobs}` (the
/// form stored completions, `data export --with-logprobs` and `ferrolm distill` keep).
pub fn logprobs_content(tok: &Tokenizer, tokens: &[TokenInfo]) -> Value {
    let entry = |id: u32, lp: f32| {
        let (t, b) = token_text_of(tok, id);
        json!({"token": t, "logprob": lp, "bytes": b})
    };
    tokens
        .iter()
        .map(|(id, lp, top)| {
            let mut e = entry(*id, lp.unwrap_or(f32::NEG_INFINITY));
            e["top_logprobs"] = top.iter().map(|&(t, l)| entry(t, l)).collect();
            e
        })
        .collect()
}

/// Legacy completions `logprobs`: parallel arrays.
fn completion_logprobs(m: &Model, tokens: &[TokenInfo]) -> Value {
    let mut offset = 0;
    let (mut toks, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for (id, lp, top) in tokens {
        let (t, _) = token_text(m, *id);
        offsets.push(offset);
        offset += t.len();
        toks.push(t);
        lps.push(*lp);
        let map: serde_json::Map<String, Value> = top
            .iter()
            .map(|&(t, l)| (token_text(m, t).0, json!(l)))
            .collect();
        tops.push(map);
    }
    json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

pub async fn chat(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    conn: Option<Extension<ConnectInfo<ClientConn>>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    // Best-of-n (an extension): sample the candidates as one request with `n`, then let the
    // reward model choose.
    let mut v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => return chat_one(s, caller, conn, body).await,
    };
    let Some(best) = crate::rewards::BestOf::take(&mut v)? else {
        return chat_one(s, caller, conn, body).await;
    };
    let rm = best.model(&s, &caller)?;
    let messages = v["messages"].as_array().cloned().unwrap_or_default();
    let tools = v.get("tools").cloned();
    let inner = Bytes::from(serde_json::to_vec(&v).unwrap_or_default());
    let resp = chat_one(s.clone(), caller.clone(), conn, inner).await?;
    if !resp.status().is_success() {
        return Ok(resp);
    }
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.map_err(|e| {
        ApiError::server(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the candidates: {e}"),
        )
    })?;
    let reply: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::server(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("the candidates are not JSON: {e}"),
        )
    })?;
    let chosen = best
        .choose(&s, &caller, &rm, &messages, tools.as_ref(), reply)
        .await?;
    let mut out = Json(chosen).into_response();
    for (k, val) in parts.headers.iter() {
        if k != axum::http::header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), val.clone());
        }
    }
    Ok(out)
}

/// One chat completion request (`n` choices, streamed or not).
async fn chat_one(
    s: AppState,
    caller: Caller,
    conn: Option<Extension<ConnectInfo<ClientConn>>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut req: ChatRequest = parse(&body)?;
    let stop = Stop::into_vec(req.common.stop.take());
    let c = &req.common;
    let n = c.n()?;
    let (tools, format_grammar, logprobs) = req.checked()?;
    let keep = Keep::of(
        &s,
        &caller,
        req.store,
        stored::metadata(req.metadata.as_ref())?,
        &req.messages,
        req.tools.as_ref(),
    );
    let max = c.max_completion_tokens.or(c.max_tokens);
    let prompt_tools = tools.as_ref().and_then(Tools::for_prompt);
    let json_out = c
        .response_format
        .as_ref()
        .is_some_and(|f| f.get("type").and_then(Value::as_str) != Some("text"));
    let (candidates, route, mut rendered) = route::targets(
        &s,
        caller.key_id(),
        c.model.as_deref(),
        &req.messages,
        prompt_tools,
        json_out,
    )?;
    let params = c.params(logprobs)?;
    let mut ticket: Option<Ticket> = None;
    let mut started = None;
    for (i, target) in candidates.iter().enumerate() {
        let last = i + 1 == candidates.len();
        let model = match target {
            Target::Local(m) => m,
            Target::Upstream(u) => {
                if ticket.is_none() {
                    ticket = Some(s.admit(
                        &caller,
                        Worst {
                            prompt_tokens: (body.len() / 4) as u64,
                            completion_tokens: (max.unwrap_or(256) * n) as u64,
                            price: u.price.as_ref(),
                        },
                    )?);
                }
                let Some(t) = &ticket else { continue };
                let levers = Levers {
                    route: route.clone(),
                    ..Levers::default()
                };
                let raw: Value = parse(&body)?;
                match u.chat(&s, &caller, t, &levers, raw, keep.clone()).await {
                    Ok(r) => return Ok(with_headers(r, &t.headers, None)),
                    Err(e) if route.is_some() && !last && route::falls_back(&e) => {
                        eprintln!(
                            "ferrolm serve: {}: tier `{}` could not take the request ({}), trying the next",
                            caller.request_id, u.id, e.message
                        );
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let attempt = async {
            let (tools, grammar, left_out) =
                tools_for(model, tools.clone(), format_grammar.clone(), &req, n)?;
            // The router's rendering (of every definition) serves any tier with the same
            // template and tokenizer.
            let same = left_out.is_none()
                && rendered.as_ref().is_some_and(|(m, _)| {
                    Arc::ptr_eq(&m.template, &model.template) && Arc::ptr_eq(&m.tok, &model.tok)
                });
            let prompt_ids = if same {
                rendered.take().map(|(_, ids)| ids)
            } else {
                None
            };
            let strategy = req.context_strategy.unwrap_or(model.context_strategy);
            let (prompt, compressed) = fit_chat(
                &s,
                model,
                &req.messages,
                tools.as_ref().and_then(Tools::for_prompt),
                strategy,
                max,
                prompt_ids,
                caller.cache_scope,
            )
            .await?;
            let mut opts = model.options(&prompt, params.clone(), max, stop.clone(), grammar)?;
            if c.ignore_eos == Some(true) {
                opts.end_ids.clear();
            }
            let lazy = left_out.map(|l| {
                (
                    l,
                    prompt.len(),
                    generate::Resume::new(req.messages.clone(), strategy, opts.clone()),
                )
            });
            if ticket.is_none() {
                let mut t = s.admit(
                    &caller,
                    Worst {
                        prompt_tokens: prompt.len() as u64,
                        completion_tokens: (opts.max_tokens * n) as u64,
                        price: model.price.as_ref(),
                    },
                )?;
                if let Some(c) = &compressed {
                    t.headers.push(("x-ferrolm-context", c.header()));
                }
                ticket = Some(t);
            }
            if let (Some(t), Some((l, len, _))) = (&mut ticket, &lazy) {
                t.headers.push(("x-ferrolm-tools", l.header(*len)));
            }
            let job = generate::start(&s, model, prompt, opts, n, caller.cache_scope).await?;
            Ok::<_, ApiError>((job, compressed, tools, lazy))
        };
        match attempt.await {
            Ok(x) => {
                started = Some((model.clone(), x));
                break;
            }
            Err(e) if route.is_some() && !last && route::falls_back(&e) => {
                eprintln!(
                    "ferrolm serve: {}: tier `{}` could not take the request ({}), trying the next",
                    caller.request_id, model.id, e.message
                );
            }
            Err(e) => return Err(e),
        }
    }
    let (Some((model, (job, compressed, tools, lazy))), Some(ticket)) = (started, ticket) else {
        return Err(ApiError::server(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "no tier of the router could take the request",
        ));
    };
    let levers = Levers {
        compressed_tokens: compressed.as_ref().map_or(0, Compression::saved),
        eager_prompt_tokens: lazy.as_ref().map(|(l, len, _)| l.eager_prompt_tokens(*len)),
        route,
    };
    let format = ChatFormat {
        meta: Meta::new(&model, "chatcmpl"),
        model: model.clone(),
        include_usage: c.include_usage(),
        logprobs: logprobs.is_some(),
        keep: keep.map(|k| (k, Assembler::default())),
    };
    let run = Run {
        state: s,
        caller,
        ticket,
        levers,
        model,
        endpoint: "/v1/chat/completions",
        tools,
        resume: lazy.map(|(_, _, r)| r),
        job,
        conn: conn.map(|Extension(ConnectInfo(c))| c),
    };
    generate::respond(run, format, c.stream.unwrap_or(false)).await
}

/// What [`tools_for`] returns.
type ToolsFor = (Option<Tools>, Option<Arc<Grammar>>, Option<tools::LeftOut>);

/// The request's tools for `model` (its tool strategy applied), the grammar of the first pass
/// (`response_format`'s, else a forced call's), and what lazy loading left out of the prompt.
fn tools_for(
    model: &Model,
    tools: Option<Tools>,
    format_grammar: Option<Arc<Grammar>>,
    req: &ChatRequest,
    n: usize,
) -> Result<ToolsFor, ApiError> {
    let Some(mut t) = tools else {
        return Ok((None, format_grammar, None));
    };
    let left_out = t.apply_for(
        model,
        req.tool_strategy,
        req.lazy_tools_threshold,
        n,
        &req.messages,
    )?;
    let grammar = match format_grammar {
        Some(g) => Some(g),
        None => t.grammar()?.map(Arc::new),
    };
    Ok((Some(t), grammar, left_out))
}

type SseItem = Result<SseEvent, Infallible>;

fn sse_json(v: &Value) -> SseItem {
    Ok(SseEvent::default().data(v.to_string()))
}

fn sse_stream(stream: tokio_stream::wrappers::ReceiverStream<SseItem>) -> Response {
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// `data: {"error": ...}` for a failure after the stream has started.
fn stream_error(message: String) -> SseItem {
    sse_json(&ApiError::server(axum::http::StatusCode::INTERNAL_SERVER_ERROR, message).body())
}

/// Chat completions: `chat.completion` objects, or `chat.completion.chunk` SSE events.
struct ChatFormat {
    model: Arc<Model>,
    meta: Meta,
    include_usage: bool,
    logprobs: bool,
    /// Set when the answer is to be kept; a stream's chunks are assembled into it.
    keep: Option<(Keep, Assembler)>,
}

impl ChatFormat {
    fn chunk(&mut self, choices: Value, usage: Option<Value>) -> SseItem {
        let mut v = json!({
            "id": self.meta.id,
            "object": "chat.completion.chunk",
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        if let Some((_, a)) = &mut self.keep {
            a.push(&v);
        }
        sse_json(&v)
    }

    fn delta(&mut self, i: usize, delta: Value, lp: Value, finish: Value) -> SseItem {
        self.chunk(
            json!([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]),
            None,
        )
    }
}

impl Format for ChatFormat {
    type Item = SseItem;

    fn start(&mut self, i: usize) -> Vec<SseItem> {
        vec![self.delta(
            i,
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            Value::Null,
        )]
    }

    fn text(&mut self, i: usize, text: String, token: Option<TokenInfo>) -> Vec<SseItem> {
        let lp = match token {
            Some(t) if self.logprobs => chat_logprobs(&self.model, &[t]),
            _ => Value::Null,
        };
        if text.is_empty() && lp.is_null() {
            return vec![];
        }
        vec![self.delta(i, json!({"content": text}), lp, Value::Null)]
    }

    fn calls(&mut self, i: usize, content: Option<String>, calls: &[Call]) -> Vec<SseItem> {
        let mut out = Vec::new();
        if let Some(text) = content {
            out.push(self.delta(i, json!({"content": text}), Value::Null, Value::Null));
        }
        out.push(self.delta(
            i,
            json!({"tool_calls": tools::openai_calls(calls)}),
            Value::Null,
            Value::Null,
        ));
        out
    }

    fn finish(
        &mut self,
        i: usize,
        _reason: FinishReason,
        finish: &'static str,
        _usage: &Usage,
        _ttft: f64,
    ) -> Vec<SseItem> {
        vec![self.delta(i, json!({}), Value::Null, json!(finish))]
    }

    fn end(&mut self, usage: &Usage, cost: Option<f64>) -> Vec<SseItem> {
        let mut out = Vec::new();
        if self.include_usage {
            out.push(self.chunk(json!([]), Some(stream_usage_json(usage, cost))));
        }
        if let Some((keep, a)) = self.keep.take() {
            let mut whole = a.finish();
            whole["usage"] = usage_json(usage);
            keep.save(&whole);
        }
        out.push(Ok(SseEvent::default().data("[DONE]")));
        out
    }

    fn error(&mut self, message: String) -> Vec<SseItem> {
        vec![stream_error(message)]
    }

    fn stream_response(stream: tokio_stream::wrappers::ReceiverStream<SseItem>) -> Response {
        sse_stream(stream)
    }

    fn whole(&self, choices: Vec<Choice>, usage: &Usage) -> Value {
        let v = self.whole_object(choices, usage);
        if let Some((keep, _)) = &self.keep {
            keep.save(&v);
        }
        v
    }
}

impl ChatFormat {
    /// The `chat.completion` object of a non-streamed answer.
    fn whole_object(&self, choices: Vec<Choice>, usage: &Usage) -> Value {
        let choices: Vec<Value> = choices
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let mut message =
                    json!({"role": "assistant", "content": c.content, "refusal": null});
                if !c.calls.is_empty() {
                    message["tool_calls"] = tools::openai_calls(&c.calls);
                }
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": if self.logprobs { chat_logprobs(&self.model, &c.tokens) } else { Value::Null },
                    "finish_reason": c.finish,
                })
            })
            .collect();
        json!({
            "id": self.meta.id,
            "object": "chat.completion",
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": null,
            "choices": choices,
            "usage": usage_json(usage),
        })
    }
}

/// Legacy completions: `text_completion` objects, as one answer or as SSE events.
struct CompletionFormat {
    model: Arc<Model>,
    meta: Meta,
    include_usage: bool,
    logprobs: bool,
}

impl CompletionFormat {
    fn object(&self, i: usize, text: String, lp: Value, finish: Value) -> Value {
        json!({
            "id": self.meta.id,
            "object": "text_completion",
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": null,
            "choices": [{"text": text, "index": i, "logprobs": lp, "finish_reason": finish}],
        })
    }

    fn event(&self, mut v: Value) -> SseItem {
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        sse_json(&v)
    }
}

impl Format for CompletionFormat {
    type Item = SseItem;

    fn start(&mut self, _i: usize) -> Vec<SseItem> {
        vec![]
    }

    fn text(&mut self, i: usize, text: String, token: Option<TokenInfo>) -> Vec<SseItem> {
        if text.is_empty() && !self.logprobs {
            return vec![];
        }
        let lp = match token {
            Some(t) if self.logprobs => completion_logprobs(&self.model, &[t]),
            _ => Value::Null,
        };
        vec![self.event(self.object(i, text, lp, Value::Null))]
    }

    fn calls(&mut self, _i: usize, _content: Option<String>, _calls: &[Call]) -> Vec<SseItem> {
        vec![]
    }

    fn finish(
        &mut self,
        i: usize,
        _reason: FinishReason,
        finish: &'static str,
        _usage: &Usage,
        _ttft: f64,
    ) -> Vec<SseItem> {
        vec![self.event(self.object(i, String::new(), Value::Null, json!(finish)))]
    }

    fn end(&mut self, usage: &Usage, cost: Option<f64>) -> Vec<SseItem> {
        let mut out = Vec::new();
        if self.include_usage {
            let mut u = self.object(0, String::new(), Value::Null, Value::Null);
            u["choices"] = json!([]);
            u["usage"] = stream_usage_json(usage, cost);
            out.push(sse_json(&u));
        }
        out.push(Ok(SseEvent::default().data("[DONE]")));
        out
    }

    fn error(&mut self, message: String) -> Vec<SseItem> {
        vec![stream_error(message)]
    }

    fn stream_response(stream: tokio_stream::wrappers::ReceiverStream<SseItem>) -> Response {
        sse_stream(stream)
    }

    fn whole(&self, choices: Vec<Choice>, usage: &Usage) -> Value {
        let choices: Vec<Value> = choices
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let lp = if self.logprobs {
                    completion_logprobs(&self.model, &c.tokens)
                } else {
                    Value::Null
                };
                let text = c.content.unwrap_or_default();
                self.object(i, text, lp, json!(c.finish))["choices"][0].clone()
            })
            .collect();
        let mut v = self.object(0, String::new(), Value::Null, Value::Null);
        v["choices"] = Value::Array(choices);
        v["usage"] = usage_json(usage);
        v
    }
}

pub async fn completions(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    conn: Option<Extension<ConnectInfo<ClientConn>>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut req: CompletionRequest = parse(&body)?;
    let stop = Stop::into_vec(req.common.stop.take());
    let c = &req.common;
    let model = s.model(caller.key_id(), c.model.as_deref())?;
    let n = c.n()?;
    let text = match &req.prompt {
        Value::String(t) => t.as_str(),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default(),
        _ => {
            return Err(ApiError::invalid(
                "prompt must be a string (or an array holding one string): batches of prompts and token-id prompts are not supported; send one request per prompt",
                Some("prompt"),
            ))
        }
    };
    let prompt = model.text_prompt(text)?;
    let mut opts = model.options(
        &prompt,
        c.params(req.logprobs)?,
        c.max_completion_tokens.or(c.max_tokens).or(Some(16)),
        stop,
        c.grammar()?.map(Arc::new),
    )?;
    if c.ignore_eos == Some(true) {
        opts.end_ids.clear();
    }
    let ticket = s.admit(
        &caller,
        Worst {
            prompt_tokens: prompt.len() as u64,
            completion_tokens: (opts.max_tokens * n) as u64,
            price: model.price.as_ref(),
        },
    )?;
    let job = generate::start(&s, &model, prompt, opts, n, caller.cache_scope).await?;
    let format = CompletionFormat {
        meta: Meta::new(&model, "cmpl"),
        model: model.clone(),
        include_usage: c.include_usage(),
        logprobs: req.logprobs.is_some(),
    };
    let run = Run {
        state: s,
        caller,
        ticket,
        levers: Levers::default(),
        model,
        endpoint: "/v1/completions",
        tools: None,
        resume: None,
        job,
        conn: conn.map(|Extension(ConnectInfo(c))| c),
    };
    generate::respond(run, format, c.stream.unwrap_or(false)).await
}
