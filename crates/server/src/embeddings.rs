//! Embeddings: OpenAI's `POST /v1/embeddings` and Ollama's `POST /api/embed`, answered by the
//! embedding model served beside the chat models ([`EmbeddingModel`], set once with
//! [`AppState::enable_embeddings`]).
//!
//! Both are admitted, rate-limited, budgeted and written to the usage ledger like generation
//! requests ([`AppState::admit`] / [`AppState::settle`]): the prompt tokens are the tokens the
//! model read, special tokens included; there are no completion tokens.
//!
//! The window: an input longer than the model's positions (512 for all-MiniLM-L6-v2) is a 400
//! naming the limit. Ollama's `truncate` (default true, as in Ollama) cuts it to the window
//! instead; OpenAI's API has no truncation switch, so there it is always a 400. Token-array
//! inputs (OpenAI) are embedded exactly as given: no `[CLS]`/`[SEP]` is added.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use ferrolm_accounting::ModelPrice;
use ferrolm_engine::{EmbedError, Embedder, Embedding, Usage};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::{ApiError, OllamaError};
use crate::{parse, AppState, Levers, Worst};

/// Most inputs in one request (OpenAI's own limit).
const MAX_INPUTS: usize = 2048;

/// The embedding model a server answers embedding requests with.
pub struct EmbeddingModel {
    pub id: String,
    pub aliases: Vec<String>,
    pub embedder: Arc<Embedder>,
    pub price: Option<ModelPrice>,
    /// Unix seconds (for `/v1/models`).
    pub created: u64,
    /// One embedding job at a time: each already uses every core through the matrix products.
    pub(crate) gate: tokio::sync::Semaphore,
}

impl EmbeddingModel {
    pub fn new(
        id: String,
        aliases: Vec<String>,
        embedder: Embedder,
        price: Option<ModelPrice>,
        created: u64,
    ) -> Self {
        EmbeddingModel {
            id,
            aliases,
            embedder: Arc::new(embedder),
            price,
            created,
            gate: tokio::sync::Semaphore::new(1),
        }
    }

    fn answers_to(&self, name: &str) -> bool {
        let name = name.strip_suffix(":latest").unwrap_or(name);
        name.eq_ignore_ascii_case(&self.id)
            || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    }
}

/// One input, before it is turned into token ids.
enum Input {
    Text(String),
    Ids(Vec<u32>),
}

/// The embedding model `asked` names, or a 4xx that says what is served.
fn embedding_model<'a>(
    s: &'a AppState,
    asked: Option<&str>,
) -> Result<&'a EmbeddingModel, ApiError> {
    let Some(em) = s.embeddings.get() else {
        return Err(ApiError {
            status: axum::http::StatusCode::NOT_FOUND,
            code: Some("model_not_found"),
            ..ApiError::invalid(
                "this server serves no embedding model: start it with `ferrolm serve --embedding-model all-minilm-l6-v2` (or a sentence-transformers model directory)",
                Some("model"),
            )
        });
    };
    let Some(asked) = asked.filter(|a| !a.is_empty()) else {
        return Err(ApiError::invalid(
            format!(
                "`model` is required: this server's embedding model is `{}`",
                em.id
            ),
            Some("model"),
        ));
    };
    if em.answers_to(asked) {
        return Ok(em);
    }
    let chat = s.all_models().iter().any(|m| {
        asked.eq_ignore_ascii_case(&m.id) || m.aliases.iter().any(|a| a.eq_ignore_ascii_case(asked))
    });
    let mut e = ApiError::unknown_model(asked, &[em.id.as_str()]);
    if chat {
        e = ApiError::invalid(
            format!(
                "`{asked}` is a chat model, not an embedding model: ask for `{}`",
                em.id
            ),
            Some("model"),
        );
    }
    Err(e)
}

/// A finished embedding request.
struct Done {
    vecs: Vec<Embedding>,
    tokens: usize,
    headers: Vec<(&'static str, String)>,
    cost: f64,
}

/// Embed `inputs` on a blocking thread, admitted and settled as `endpoint`. Returns the
/// vectors and the prompt tokens.
async fn run(
    s: &AppState,
    caller: &Caller,
    em: &EmbeddingModel,
    endpoint: &'static str,
    inputs: Vec<Input>,
    truncate: bool,
    param: &'static str,
) -> Result<Done, ApiError> {
    if inputs.is_empty() {
        return Err(ApiError::invalid(
            format!("{param} is empty: send a string or a non-empty array"),
            Some(param),
        ));
    }
    if inputs.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            format!("{} inputs: at most {MAX_INPUTS} per request", inputs.len()),
            Some(param),
        ));
    }
    let e = em.embedder.clone();
    let limit = e.max_tokens();
    // Tokenize and check every input before admission, so a bad one costs nothing.
    let mut seqs = Vec::with_capacity(inputs.len());
    for (i, inp) in inputs.into_iter().enumerate() {
        let ids = match inp {
            Input::Text(t) => {
                let mut ids = e.tokenize(&t).map_err(|err| bad_input(err, param, i))?;
                if ids.len() > limit {
                    if !truncate {
                        return Err(too_long(ids.len(), limit, param, i, endpoint));
                    }
                    let last = ids[ids.len() - 1];
                    ids.truncate(limit - 1);
                    ids.push(last);
                }
                ids
            }
            Input::Ids(ids) => {
                if ids.len() > limit {
                    return Err(too_long(ids.len(), limit, param, i, endpoint));
                }
                ids
            }
        };
        seqs.push(ids);
    }
    let tokens: usize = seqs.iter().map(Vec::len).sum();
    let ticket = s.admit(
        caller,
        Worst {
            prompt_tokens: tokens as u64,
            completion_tokens: 0,
            price: em.price.as_ref(),
        },
    )?;
    let _permit = em.gate.acquire().await.map_err(|_| {
        ApiError::server(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )
    })?;
    let out = tokio::task::spawn_blocking(move || e.embed_batch(&seqs)).await;
    let usage = Usage {
        prompt_tokens: tokens,
        cached_tokens: 0,
        completion_tokens: 0,
    };
    let levers = Levers::default();
    let mut settled = levers.settled_as(&em.id, em.price.as_ref(), endpoint, usage, None);
    match out {
        Ok(Ok(v)) => {
            let cost = s.settle(caller, &ticket, settled)?;
            Ok(Done {
                vecs: v,
                tokens,
                headers: ticket.headers.clone(),
                cost,
            })
        }
        Ok(Err((i, err))) if err.is_bad_input() => {
            settled.usage = Usage::default();
            settled.status = 400;
            let _ = s.settle(caller, &ticket, settled);
            Err(bad_input(err, param, i))
        }
        failed => {
            settled.usage = Usage::default();
            settled.status = 500;
            let _ = s.settle(caller, &ticket, settled);
            let why = match failed {
                Ok(Err((_, err))) => err.to_string(),
                Err(join) => format!("the embedding task failed: {join}"),
                Ok(Ok(_)) => String::new(),
            };
            Err(ApiError::server(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                format!("embedding failed: {why}"),
            ))
        }
    }
}

fn bad_input(err: EmbedError, param: &'static str, i: usize) -> ApiError {
    ApiError::invalid(format!("{param}[{i}]: {err}"), Some(param))
}

fn too_long(
    tokens: usize,
    limit: usize,
    param: &'static str,
    i: usize,
    endpoint: &str,
) -> ApiError {
    let fix = if endpoint == "/api/embed" {
        "shorten it, or send \"truncate\": true to embed its first tokens"
    } else {
        "shorten or split it (this endpoint does not truncate; Ollama's /api/embed does with \"truncate\": true)"
    };
    ApiError::invalid(
        format!(
            "{param}[{i}] is {tokens} tokens, more than the embedding model's limit of {limit} tokens: {fix}"
        ),
        Some(param),
    )
    .with_code("context_length_exceeded")
}

// ---- OpenAI -------------------------------------------------------------------------------

#[derive(Deserialize)]
struct EmbeddingsRequest {
    input: Value,
    model: Option<String>,
    encoding_format: Option<String>,
    dimensions: Option<u64>,
    #[allow(dead_code)]
    user: Option<String>,
}

/// OpenAI's `input`: a string, an array of strings, an array of token ids, or an array of
/// arrays of token ids.
fn openai_inputs(v: &Value) -> Result<Vec<Input>, ApiError> {
    let bad = |m: String| ApiError::invalid(m, Some("input"));
    let ids = |a: &[Value], at: &str| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        bad(format!(
                            "{at} holds {t}: token ids are non-negative integers"
                        ))
                    })
            })
            .collect()
    };
    match v {
        Value::String(t) => Ok(vec![Input::Text(t.clone())]),
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_number) => {
            Ok(vec![Input::Ids(ids(a, "input")?)])
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, x)| match x {
                Value::String(t) => Ok(Input::Text(t.clone())),
                Value::Array(t) => Ok(Input::Ids(ids(t, &format!("input[{i}]"))?)),
                other => Err(bad(format!(
                    "input[{i}] is {other}: each input is a string or an array of token ids"
                ))),
            })
            .collect(),
        other => Err(bad(format!(
            "input is {other}: send a string, an array of strings, or arrays of token ids"
        ))),
    }
}

pub async fn openai(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<axum::response::Response, ApiError> {
    let req: EmbeddingsRequest = parse(&body)?;
    let em = embedding_model(&s, req.model.as_deref())?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("encoding_format `{other}` is not one of `float`, `base64`"),
                Some("encoding_format"),
            ))
        }
    };
    let dim = em.embedder.dim();
    if let Some(d) = req.dimensions {
        if d as usize != dim {
            return Err(ApiError::invalid(
                format!(
                    "dimensions {d}: `{}` makes {dim}-dimensional vectors and cannot shorten them; leave dimensions out or send {dim}",
                    em.id
                ),
                Some("dimensions"),
            ));
        }
    }
    let inputs = openai_inputs(&req.input)?;
    let done = run(&s, &caller, em, "/v1/embeddings", inputs, false, "input").await?;
    let tokens = done.tokens;
    let data: Vec<Value> = done
        .vecs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let embedding = if base64 {
                Value::String(base64_f32(&e.vector))
            } else {
                json!(e.vector)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": em.id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    Ok(crate::generate::with_headers(
        Json(body).into_response(),
        &done.headers,
        Some(done.cost),
    ))
}

/// Little-endian f32 bytes in standard base64 (what OpenAI's `encoding_format: base64` is).
fn base64_f32(v: &[f32]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (c.get(1).copied().unwrap_or(0) as u32) << 8
            | c.get(2).copied().unwrap_or(0) as u32;
        for k in 0..4 {
            if k <= c.len() {
                out.push(ABC[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---- Ollama -------------------------------------------------------------------------------

#[derive(Deserialize)]
struct EmbedRequest {
    model: Option<String>,
    input: Value,
    truncate: Option<bool>,
    dimensions: Option<u64>,
    #[allow(dead_code)]
    keep_alive: Option<Value>,
    #[allow(dead_code)]
    options: Option<Value>,
}

pub async fn ollama(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<axum::response::Response, OllamaError> {
    let started = Instant::now();
    let req: EmbedRequest = parse(&body)?;
    let em = embedding_model(&s, req.model.as_deref())?;
    let dim = em.embedder.dim();
    if let Some(d) = req.dimensions {
        if d as usize != dim {
            return Err(ApiError::invalid(
                format!(
                    "dimensions {d}: `{}` makes {dim}-dimensional vectors",
                    em.id
                ),
                Some("dimensions"),
            )
            .into());
        }
    }
    let inputs = match &req.input {
        Value::String(t) => vec![Input::Text(t.clone())],
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_str()
                    .map(|t| Input::Text(t.to_owned()))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            format!("input[{i}] is {x}: input is a string or an array of strings"),
                            Some("input"),
                        )
                    })
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(ApiError::invalid(
                format!("input is {other}: send a string or an array of strings"),
                Some("input"),
            )
            .into())
        }
    };
    let truncate = req.truncate.unwrap_or(true);
    let done = run(&s, &caller, em, "/api/embed", inputs, truncate, "input").await?;
    let tokens = done.tokens;
    let embeddings: Vec<&[f32]> = done.vecs.iter().map(|e| e.vector.as_slice()).collect();
    let body = json!({
        "model": em.id,
        "embeddings": embeddings,
        "total_duration": started.elapsed().as_nanos() as u64,
        "load_duration": 0,
        "prompt_eval_count": tokens,
    });
    Ok(crate::generate::with_headers(
        Json(body).into_response(),
        &done.headers,
        Some(done.cost),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_of_floats_matches_the_standard_alphabet() {
        // 1.0f32 = 00 00 80 3f; two floats = 8 bytes → 12 chars with one '='.
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, -2.0]), "AACAPwAAAMA=");
        assert_eq!(base64_f32(&[]), "");
    }
}
