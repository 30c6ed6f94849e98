//! `ferrolm serve`: an OpenAI- and Ollama-compatible HTTP API in front of one engine.
//!
//! Contract: the server never touches tensors. A handler validates the JSON, renders the chat
//! template, tokenizes, and submits a [`ferrolm_engine::Request`] carrying its own reply channel
//! to the engine thread through the [`ferrolm_engine::Command`] sender it was given; it then
//! turns the events that come back into a JSON answer, an SSE stream (OpenAI) or NDJSON lines
//! (Ollama). Stop strings and incremental detokenization happen in the engine's text stream. A
//! client that disconnects mid-stream aborts its request in the engine.
//!
//! Served routes: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`,
//! `POST /v1/completions`, `POST /api/chat`, `POST /api/generate`, `GET /api/tags`,
//! `GET /api/version`. Not yet: authentication, rate limits, tools, JSON mode, `n > 1`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use axum::http::{Method, Uri};
use axum::routing::{get, post};
use axum::Router;
use ferrolm_engine::{Command, GenerateOptions};
use ferrolm_sample::SamplingParams;
use ferrolm_tokenizer::{chat::ChatTemplate, Tokenizer};
use serde::Deserialize;
use serde_json::Value;

pub mod error;
mod generate;
mod ollama;
mod openai;

pub use error::ApiError;

/// What the server knows about the model it serves: text-side pieces and plain numbers, no weights.
pub struct ServedModel {
    /// The id clients name, e.g. `smollm2-135m-instruct`.
    pub id: String,
    /// The GGUF file name, also accepted as a model name.
    pub file_name: String,
    pub file_size: u64,
    /// Unix seconds (the file's modification time).
    pub created: u64,
    pub tok: Arc<Tokenizer>,
    pub template: ChatTemplate,
    /// Ids that end a reply (EOS, end of turn).
    pub end_ids: Vec<u32>,
    pub vocab_size: usize,
    /// Most tokens (prompt + completion) one request may hold: the model's context or the KV
    /// pool, whichever is smaller.
    pub max_context: usize,
}

/// Shared by every handler: read-only model facts, the engine's command sender, an id counter.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub model: ServedModel,
    pub engine: Sender<Command>,
    next_id: AtomicU64,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(model: ServedModel, engine: Sender<Command>) -> Self {
        AppState(Arc::new(Inner {
            model,
            engine,
            next_id: AtomicU64::new(1),
        }))
    }

    fn next_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Accept the served id, the file name, or either with Ollama's `:latest` tag; `None` means
    /// the served model.
    fn check_model(&self, asked: Option<&str>) -> Result<(), ApiError> {
        let Some(asked) = asked else { return Ok(()) };
        let name = asked.strip_suffix(":latest").unwrap_or(asked);
        let m = &self.model;
        if name.eq_ignore_ascii_case(&m.id) || name == m.file_name {
            Ok(())
        } else {
            Err(ApiError::unknown_model(asked, &m.id))
        }
    }

    /// Render OpenAI/Ollama-shaped messages through the chat template and tokenize them.
    fn chat_prompt(&self, messages: &Value) -> Result<Vec<u32>, ApiError> {
        let messages = normalize_messages(messages)?;
        let m = &self.model;
        let rendered = m
            .template
            .render(&m.tok, &messages, true, None)
            .map_err(|e| {
                ApiError::invalid(
                    format!("messages: the model's chat template rejected them: {e}"),
                    Some("messages"),
                )
            })?;
        m.tok
            .encode_chat(&rendered)
            .map_err(|e| ApiError::invalid(format!("messages: {e}"), Some("messages")))
    }

    /// A plain-text prompt: BOS (when the model wants one) + the text's ids.
    fn text_prompt(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        let tok = &self.model.tok;
        let mut ids: Vec<u32> = tok.bos_id.filter(|_| tok.add_bos).into_iter().collect();
        ids.extend(
            tok.encode(text, false)
                .map_err(|e| ApiError::invalid(format!("prompt: {e}"), Some("prompt")))?,
        );
        Ok(ids)
    }

    /// Finish a request's options: check the prompt fits, cap `max_tokens` to the room left,
    /// validate the sampling parameters, pick a seed when none was given.
    fn options(
        &self,
        prompt: &[u32],
        params: SamplingParams,
        max_tokens: Option<usize>,
        stop: Vec<String>,
    ) -> Result<GenerateOptions, ApiError> {
        let limit = self.model.max_context;
        if prompt.len() >= limit {
            return Err(ApiError::invalid(
                format!(
                    "the prompt has {} tokens but a request here holds at most {} (prompt + completion): shorten the prompt, or restart `ferrolm serve` with a larger --ctx (the model's own context is the upper bound)",
                    prompt.len(),
                    limit
                ),
                Some("messages"),
            )
            .with_code("context_length_exceeded"));
        }
        let room = limit - prompt.len();
        let max_tokens = match max_tokens {
            Some(0) => {
                return Err(ApiError::invalid(
                    "max_tokens must be at least 1",
                    Some("max_tokens"),
                ))
            }
            Some(n) => n.min(room),
            None => room,
        };
        params
            .validate(self.model.vocab_size)
            .map_err(|e| ApiError::invalid(e.to_string(), None))?;
        Ok(GenerateOptions {
            seed: params.seed.unwrap_or_else(random_seed),
            params,
            max_tokens,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            end_ids: self.model.end_ids.clone(),
        })
    }
}

/// `stop`: one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(s: Option<Stop>) -> Vec<String> {
        match s {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        }
    }
}

/// Messages as the template wants them: `developer` becomes `system`, content arrays of text
/// parts become one string; other keys pass through.
fn normalize_messages(messages: &Value) -> Result<Value, ApiError> {
    let bad = |m: String| ApiError::invalid(m, Some("messages"));
    let Value::Array(list) = messages else {
        return Err(bad(
            "`messages` must be an array of {role, content} objects".into(),
        ));
    };
    if list.is_empty() {
        return Err(bad("`messages` is empty: send at least one message".into()));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Value::Object(obj) = m else {
            return Err(bad(format!(
                "messages[{i}] must be an object with `role` and `content`"
            )));
        };
        let role = match obj.get("role").and_then(Value::as_str) {
            Some("developer") => "system",
            Some(r @ ("system" | "user" | "assistant" | "tool")) => r,
            other => {
                return Err(bad(format!(
                    "messages[{i}].role is {other:?}: use one of system, developer, user, assistant, tool"
                )))
            }
        };
        if obj
            .get("images")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
        {
            return Err(bad(format!(
                "messages[{i}] has images, but this model reads text only: remove them"
            )));
        }
        let content = match obj.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => s.push_str(t),
                        (ty, _) => {
                            return Err(bad(format!(
                                "messages[{i}].content[{j}] has type {ty:?}: only {{\"type\": \"text\", \"text\": ...}} parts are supported"
                            )))
                        }
                    }
                }
                s
            }
            Some(_) => {
                return Err(bad(format!(
                    "messages[{i}].content must be a string or an array of text parts"
                )))
            }
        };
        let mut o = obj.clone();
        o.insert("role".into(), Value::String(role.into()));
        o.insert("content".into(), Value::String(content));
        out.push(Value::Object(o));
    }
    Ok(Value::Array(out))
}

/// OpenAI's `logit_bias`: token-id strings → bias in [-100, 100].
fn logit_bias(map: Option<HashMap<String, f32>>) -> Result<Vec<(u32, f32)>, ApiError> {
    let mut out = Vec::new();
    for (k, v) in map.unwrap_or_default() {
        let id: u32 = k.trim().parse().map_err(|_| {
            ApiError::invalid(
                format!("logit_bias key `{k}` is not a token id: keys are token ids as strings, e.g. {{\"42\": -100}}"),
                Some("logit_bias"),
            )
        })?;
        if !(-100.0..=100.0).contains(&v) {
            return Err(ApiError::invalid(
                format!("logit_bias[{k}] = {v} is outside [-100, 100]"),
                Some("logit_bias"),
            ));
        }
        out.push((id, v));
    }
    out.sort_by_key(|p| p.0);
    Ok(out)
}

/// Parse a JSON body; bad JSON or wrong field types are a 400 that quotes serde's reason.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            format!("the request body is not valid JSON for this endpoint: {e}"),
            None,
        )
    })
}

fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // splitmix64 finalizer: nearby clock readings give unrelated seeds.
    let mut z = t.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::no_route(method.as_str(), uri.path())
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError {
        status: axum::http::StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::invalid(
            format!(
                "{} does not take {method}: GET the models, tags and version, POST the rest",
                uri.path()
            ),
            None,
        )
    }
}

/// Every route, on `state`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/tags", get(ollama::tags))
        .route("/api/version", get(ollama::version))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
}

/// Serve until `shutdown` resolves, then stop accepting and let requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_are_normalized_for_the_template() {
        let m = json!([
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": null},
        ]);
        let out = normalize_messages(&m).unwrap_or_default();
        assert_eq!(
            out,
            json!([
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": ""},
            ])
        );
    }

    #[test]
    fn bad_messages_name_the_offending_field() {
        for (m, needle) in [
            (json!({"role": "user"}), "array"),
            (json!([]), "empty"),
            (
                json!([{"role": "wizard", "content": "x"}]),
                "messages[0].role",
            ),
            (
                json!([{"role": "user", "content": [{"type": "image_url"}]}]),
                "messages[0].content[0]",
            ),
            (
                json!([{"role": "user", "content": 3}]),
                "messages[0].content",
            ),
        ] {
            let e = normalize_messages(&m)
                .err()
                .map(|e| e.message)
                .unwrap_or_default();
            assert!(e.contains(needle), "{m}: {e}");
        }
    }

    #[test]
    fn logit_bias_keys_are_token_ids_and_values_are_bounded() {
        let ok = HashMap::from([("42".to_owned(), -100.0), ("7".to_owned(), 5.0)]);
        assert_eq!(
            logit_bias(Some(ok)).ok(),
            Some(vec![(7, 5.0), (42, -100.0)])
        );
        assert!(logit_bias(Some(HashMap::from([("the".to_owned(), 1.0)]))).is_err());
        assert!(logit_bias(Some(HashMap::from([("1".to_owned(), 101.0)]))).is_err());
    }
}
