//! Upstream providers: a served model that is another OpenAI-compatible server (OpenRouter,
//! OpenAI, another ferrolm, llama-server), proxied for `/v1/chat/completions`.
//!
//! Contract: [`Upstream::chat`] forwards the client's request body with `model` replaced by
//! the upstream's name and the upstream's key (from an environment variable) as the bearer;
//! JSON answers are passed back, SSE streams are forwarded event by event as they arrive. The
//! usage the upstream reports (streams are asked for it with `stream_options.include_usage`;
//! the usage-only chunk is dropped again when the client did not ask) is priced from the
//! catalog and written to the same ledger as local requests. An upstream that cannot be
//! reached, times out before answering, or answers 5xx/429 is a 503 with
//! code `upstream_unavailable`, which a router takes as its cue to try the next tier; a 4xx
//! (the request itself) is passed through. An answer to be kept (`store: true`,
//! `--store-all`) is stored as the client received it, a stream once it reached `[DONE]`.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use ferrolm_accounting::ModelPrice;
use ferrolm_engine::Usage;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::stored::{Assembler, Keep};
use crate::{AppState, Levers, Ticket};

/// A model served by another server.
pub struct Upstream {
    /// The id clients name here.
    pub id: String,
    pub aliases: Vec<String>,
    /// Base URL including the API prefix, e.g. `https://openrouter.ai/api/v1`.
    pub base_url: String,
    /// The model's name upstream.
    pub model: String,
    /// The bearer key (read from the configured environment variable at start).
    pub api_key: Option<String>,
    pub price: Option<ModelPrice>,
    client: reqwest::Client,
}

impl Upstream {
    pub fn new(
        id: String,
        aliases: Vec<String>,
        base_url: String,
        model: String,
        api_key: Option<String>,
        price: Option<ModelPrice>,
    ) -> Result<Self, String> {
        // TLS for https upstreams: rustls with ring (a second install is a harmless no-op).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("upstream `{id}`: cannot build an HTTP client: {e}"))?;
        Ok(Upstream {
            id,
            aliases,
            base_url: base_url.trim_end_matches('/').to_owned(),
            model,
            api_key,
            price,
            client,
        })
    }

    pub fn answers_to(&self, name: &str) -> bool {
        name.eq_ignore_ascii_case(&self.id)
            || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    }

    fn unavailable(&self, why: impl std::fmt::Display) -> ApiError {
        ApiError {
            code: Some("upstream_unavailable"),
            ..ApiError::server(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the upstream model `{}` ({}) is unavailable: {why}",
                    self.id, self.base_url
                ),
            )
        }
    }

    /// Proxy one chat completion; `body` is the client's request.
    pub async fn chat(
        &self,
        s: &AppState,
        caller: &Caller,
        ticket: &Ticket,
        levers: &Levers,
        mut body: Value,
        keep: Option<Keep>,
    ) -> Result<Response, ApiError> {
        let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
        let client_wants_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        body["model"] = Value::String(self.model.clone());
        // ferrolm's own extension fields: an upstream gets the request as OpenAI defines it
        // (every tool definition: lazy tool loading runs on local models only).
        if let Some(o) = body.as_object_mut() {
            for k in ["context_strategy", "tool_strategy", "lazy_tools_threshold"] {
                o.remove(k);
            }
        }
        if stream {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        let mut req = self
            .client
            .post(format!("{}/chat/completions", self.base_url))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.map_err(|e| self.unavailable(e))?;
        let status = resp.status();
        if status.is_server_error() || status.as_u16() == 429 {
            let text = resp.text().await.unwrap_or_default();
            return Err(self.unavailable(format!("it answered {status}: {}", excerpt(&text))));
        }
        if !status.is_success() {
            // The request itself was refused: pass the upstream's answer through.
            let bytes = resp.bytes().await.map_err(|e| self.unavailable(e))?;
            let code = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            return Ok((code, [(header::CONTENT_TYPE, "application/json")], bytes).into_response());
        }
        if !stream {
            let bytes = resp.bytes().await.map_err(|e| self.unavailable(e))?;
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| self.unavailable(format!("its answer is not JSON: {e}")))?;
            let finish = v
                .pointer("/choices/0/finish_reason")
                .and_then(Value::as_str)
                .map(finish_static);
            let mut st = levers.settled_as(
                &self.id,
                self.price.as_ref(),
                "/v1/chat/completions",
                usage_of(&v),
                None,
            );
            st.finish_reason = finish;
            // The answer is passed through as is: a row that cannot be written is held.
            st.sent = true;
            let _ = s.settle(caller, ticket, st);
            if let Some(k) = &keep {
                k.save(&v);
            }
            let code = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::OK);
            return Ok((code, [(header::CONTENT_TYPE, "application/json")], bytes).into_response());
        }
        let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(32);
        let mut upstream = resp.bytes_stream();
        let (s, caller, ticket, levers) =
            (s.clone(), caller.clone(), ticket.clone(), levers.clone());
        let me = (self.id.clone(), self.price.clone());
        tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::new();
            let mut usage = Usage::default();
            let mut first: Option<Instant> = None;
            let mut finish = None;
            let mut keep = keep.map(|k| (k, Assembler::default()));
            let mut complete = false;
            'read: while let Some(chunk) = upstream.next().await {
                let Ok(chunk) = chunk else { break };
                buf.extend_from_slice(&chunk);
                // Forward whole SSE events (blank-line separated) as they complete.
                while let Some(end) = find_event_end(&buf) {
                    let event: Vec<u8> = buf.drain(..end).collect();
                    let data = sse_data(&event);
                    complete |= is_done(&event);
                    let mut forward = true;
                    if let Some(v) = data.and_then(|d| serde_json::from_str::<Value>(d).ok()) {
                        if let Some((_, a)) = &mut keep {
                            a.push(&v);
                        }
                        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                            usage = usage_of(&serde_json::json!({"usage": u}));
                            let empty = v
                                .get("choices")
                                .and_then(Value::as_array)
                                .is_some_and(Vec::is_empty);
                            forward = client_wants_usage || !empty;
                        }
                        if v.pointer("/choices/0/delta/content").is_some() {
                            first.get_or_insert_with(Instant::now);
                        }
                        if let Some(f) = v
                            .pointer("/choices/0/finish_reason")
                            .and_then(Value::as_str)
                        {
                            finish = Some(finish_static(f));
                        }
                    }
                    if forward && tx.send(Ok(Bytes::from(event))).await.is_err() {
                        break 'read; // the client went away; dropping the stream closes upstream
                    }
                }
            }
            let mut st = levers.settled_as(
                &me.0,
                me.1.as_ref(),
                "/v1/chat/completions",
                usage,
                caller.ttft(first),
            );
            st.finish_reason = finish;
            st.sent = true;
            let _ = s.settle(&caller, &ticket, st);
            // Only a stream that ran to its `[DONE]` is kept.
            if let (Some((k, a)), true) = (keep, complete) {
                k.save(&a.finish());
            }
        });
        Ok((
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(ReceiverStream::new(rx)),
        )
            .into_response())
    }
}

/// OpenAI usage → ours (missing fields count 0).
fn usage_of(v: &Value) -> Usage {
    let n = |p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0) as usize;
    let prompt = n("/usage/prompt_tokens");
    Usage {
        prompt_tokens: prompt,
        cached_tokens: n("/usage/prompt_tokens_details/cached_tokens").min(prompt),
        completion_tokens: n("/usage/completion_tokens"),
    }
}

fn finish_static(f: &str) -> &'static str {
    match f {
        "length" => "length",
        "tool_calls" => "tool_calls",
        "content_filter" => "content_filter",
        _ => "stop",
    }
}

/// The end (exclusive) of the first complete SSE event in `buf`, blank line included.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The `data:` payload of one event (single-line data, as OpenAI-compatible servers send).
fn sse_data(event: &[u8]) -> Option<&str> {
    std::str::from_utf8(event)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| *d != "[DONE]")
}

/// Whether `event` is the stream's last, `data: [DONE]`.
fn is_done(event: &[u8]) -> bool {
    std::str::from_utf8(event).is_ok_and(|e| {
        e.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .any(|d| d.trim() == "[DONE]")
    })
}

fn excerpt(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_on_blank_lines_and_usage_parses() {
        let buf = b"data: {\"a\":1}\n\ndata: [DONE]\n\n";
        assert_eq!(find_event_end(buf), Some(15));
        assert_eq!(sse_data(&buf[..15]), Some("{\"a\":1}"));
        assert_eq!(sse_data(&buf[15..]), None);
        assert_eq!(find_event_end(b"data: {\"a\""), None);
        let u = usage_of(
            &serde_json::json!({"usage": {"prompt_tokens": 10, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}}}),
        );
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.completion_tokens),
            (10, 4, 3)
        );
    }
}
