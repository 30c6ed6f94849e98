//! Who is asking: every request gets an id (the client's `x-request-id` when it sends a sane
//! one), echoed in the response's `x-request-id`; then its API key is checked; then one logfmt
//! line goes to stderr (`ts=… id=… method=… path=… status=… ms=… key=…`).
//!
//! Keys: while the store has never had a key and the server was allowed to run open (a
//! loopback bind, or `--allow-unauthenticated`), requests need none, as with Ollama. Once a key
//! exists, every route but `/health` and the web UI's files needs `Authorization: Bearer <key>` (or `x-api-key`), and
//! revoked or unknown keys get OpenAI's 401. A generation request that fails is still written to
//! the usage ledger, with its status and no tokens.

use std::time::Instant;

use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ferrolm_accounting::{GroupBy, KeyInfo, PriceCatalog, UsageGroup, UsageQuery, UsageRow};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, OllamaError};
use crate::AppState;

/// The caller of one request, put in the request's extensions by [`layer`].
#[derive(Clone, Debug)]
pub struct Caller {
    pub request_id: String,
    /// `None` when the server runs open (no keys yet).
    pub key: Option<KeyInfo>,
    /// Its prefix-cache namespace ([`crate::Access::cache_scope`]).
    pub cache_scope: u64,
    pub started: Instant,
}

impl Caller {
    /// The caller's key id (`None` without a key).
    pub fn key_id(&self) -> Option<i64> {
        self.key.as_ref().map(|k| k.id)
    }

    /// Seconds from the request's arrival to `first` (its first token), if it came.
    pub fn ttft(&self, first: Option<Instant>) -> Option<f64> {
        first.map(|f| f.saturating_duration_since(self.started).as_secs_f64())
    }
}

pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        let token = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .unwrap_or(v)
            .trim();
        return (!token.is_empty()).then_some(token);
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn authenticate(s: &AppState, headers: &HeaderMap) -> Result<Option<KeyInfo>, ApiError> {
    let store = &s.access.store;
    if !store.has_keys().map_err(ApiError::storage)? {
        if s.access.open_without_keys {
            return Ok(None);
        }
        return Err(ApiError::unauthorized(
            "this server listens on a network address and has no API keys yet, so it answers no one: create a key with `ferrolm keys create --data-dir DIR --name NAME` and send it as `Authorization: Bearer <key>`",
        ));
    }
    let Some(token) = bearer(headers) else {
        return Err(ApiError::unauthorized(
            "missing API key: send `Authorization: Bearer <key>` (keys come from `ferrolm keys create`)",
        ));
    };
    match store.verify(token).map_err(ApiError::storage)? {
        Some(k) => Ok(Some(k)),
        None => Err(ApiError::unauthorized(
            "the API key is not valid (unknown or revoked): check it, or ask for a new one (`ferrolm keys create`)",
        )),
    }
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(
            || format!("req_{:016x}", crate::random_seed()),
            str::to_owned,
        )
}

/// A request that generates (the ledger records its refusals); `GET /v1/chat/completions`
/// lists stored completions instead.
fn is_generation(method: &axum::http::Method, path: &str) -> bool {
    method == axum::http::Method::POST
        && matches!(
            path,
            "/v1/chat/completions" | "/v1/completions" | "/api/chat" | "/api/generate"
        )
}

/// The middleware in front of every route.
pub async fn layer(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(req.headers());
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_owned();
    let ollama = path.starts_with("/api/");
    let key = if path == "/health" || crate::ui::is_public(&method, &path) {
        Ok(None)
    } else {
        authenticate(&s, req.headers())
    };
    let key_name = key
        .as_ref()
        .ok()
        .and_then(|k| k.as_ref())
        .map(|k| k.name.clone());
    let key_id = key.as_ref().ok().and_then(|k| k.as_ref()).map(|k| k.id);
    let mut resp = match key {
        Err(e) if ollama => OllamaError(e).into_response(),
        Err(e) => e.into_response(),
        Ok(key) => {
            req.extensions_mut().insert(Caller {
                request_id: id.clone(),
                cache_scope: s.access.cache_scope(key.as_ref()),
                key,
                started,
            });
            // The handler runs as its own task so that a bug that panics in it answers 500
            // (and is logged) instead of dropping the client's connection.
            match tokio::spawn(next.run(req)).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("ferrolm serve: {id}: the handler failed: {e}");
                    let e = ApiError::server(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("internal error while handling request {id}; it is logged on the server: please report it"),
                    );
                    if ollama {
                        OllamaError(e).into_response()
                    } else {
                        e.into_response()
                    }
                }
            }
        }
    };
    let status = resp.status();
    if status.as_u16() >= 400 && !is_json(&resp) {
        // Every error leaves in the API's shape, whoever made it: axum's extractors (a body
        // that is not JSON or multipart, a bad query string or path, a wrong method) answer
        // plain text, and so does a body cut off past MAX_READ_BYTES.
        let e = if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(crate::MAX_READ_BYTES)
        } else {
            rejection(status, resp.into_body(), &path).await
        };
        resp = if ollama {
            OllamaError(e).into_response()
        } else {
            e.into_response()
        };
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    s.metrics.request(&route, status.as_u16());
    if status.as_u16() >= 400 && is_generation(&method, &path) {
        let row = UsageRow::new_key().map(|row_key| UsageRow {
            ts: unix_ms(),
            request_id: id.clone(),
            key_id,
            model: String::new(),
            endpoint: path.clone(),
            status: status.as_u16(),
            prompt_tokens: 0,
            cached_tokens: 0,
            completion_tokens: 0,
            latency_ms: started.elapsed().as_secs_f64() * 1e3,
            ttft_ms: None,
            cost_usd: 0.0,
            finish_reason: None,
            row_key,
            ..UsageRow::default()
        });
        if let Err(e) = row.and_then(|row| s.access.store.record(&row)) {
            eprintln!("ferrolm serve: {id}: could not write the usage ledger: {e}");
        }
    }
    eprintln!(
        "ts={} id={id} method={method} path={path} status={} ms={:.1} key={}",
        crate::auth::unix_ms(),
        status.as_u16(),
        started.elapsed().as_secs_f64() * 1e3,
        key_name.as_deref().unwrap_or("-"),
    );
    resp
}

/// An error response that is not in the API's shape (an axum extractor's rejection) → the
/// API's error, its text kept as the message, with a hint of what the endpoint takes.
async fn rejection(status: StatusCode, body: axum::body::Body, path: &str) -> ApiError {
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let mut message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("the request was refused")
            .to_owned()
    } else {
        text
    };
    let hint = match status {
        StatusCode::METHOD_NOT_ALLOWED => Some(format!("{path} does not take this method")),
        StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::BAD_REQUEST if path == "/v1/files" => {
            Some(
                "upload a file as multipart/form-data with the fields `file` and `purpose`"
                    .to_owned(),
            )
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            Some("send a JSON body with `Content-Type: application/json`".to_owned())
        }
        _ => None,
    };
    if let Some(h) = hint {
        message = format!("{message}: {h}");
    }
    if status.is_server_error() {
        ApiError::server(status, message)
    } else {
        ApiError {
            status,
            ..ApiError::invalid(message, None)
        }
    }
}

fn is_json(r: &Response) -> bool {
    r.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

#[derive(Debug, Deserialize)]
pub struct UsageParams {
    /// Comma-separated: key, model, day.
    by: Option<String>,
    /// Unix seconds.
    since: Option<i64>,
    until: Option<i64>,
}

/// `GET /v1/usage`: the caller's own usage (every key's for an admin key, and when the server
/// runs without keys),
/// grouped `?by=model,day` by default, and `hosted`: the same traffic at hosted list prices.
pub async fn usage(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<UsageParams>,
) -> Result<Json<Value>, ApiError> {
    let mut group_by = Vec::new();
    for g in q.by.as_deref().unwrap_or("model,day").split(',') {
        group_by.push(match g.trim() {
            "key" => GroupBy::Key,
            "model" => GroupBy::Model,
            "day" => GroupBy::Day,
            "" => continue,
            other => {
                return Err(ApiError::invalid(
                    format!("by: `{other}` is not a grouping: use key, model and/or day"),
                    Some("by"),
                ))
            }
        });
    }
    let query = UsageQuery {
        group_by,
        key_id: caller.key.as_ref().filter(|k| !k.admin).map(|k| k.id),
        since_ms: q.since.map(|t| t * 1000),
        until_ms: q.until.map(|t| t * 1000),
    };
    let groups = s.access.store.usage(&query).map_err(ApiError::storage)?;
    let total = s
        .access
        .store
        .usage(&UsageQuery {
            group_by: Vec::new(),
            ..query
        })
        .map_err(ApiError::storage)?;
    let hosted = total
        .first()
        .map(|t| hosted_costs(&s.catalog, t))
        .unwrap_or_default();
    Ok(Json(
        json!({"object": "list", "data": groups, "hosted": hosted}),
    ))
}

/// An extra field of `/v1/usage` (clients ignore unknown ones): what the same tokens would have
/// cost on each hosted model of the price catalog, cheapest first. From totals, so at the base
/// rates: long-prompt tiers, chosen per request, are not applied.
fn hosted_costs(catalog: &PriceCatalog, t: &UsageGroup) -> Vec<Value> {
    let mut out: Vec<(f64, Value)> = catalog
        .models()
        .iter()
        .filter(|m| m.self_hosted.is_none())
        .map(|m| {
            let cached = t.cached_tokens.min(t.prompt_tokens);
            let cost = ((t.prompt_tokens - cached) as f64 * m.input_per_mtok
                + cached as f64 * m.cached_input_per_mtok.unwrap_or(m.input_per_mtok)
                + t.completion_tokens as f64 * m.output_per_mtok)
                / 1e6;
            (
                cost,
                json!({"model": m.id, "provider": m.provider, "cost_usd": cost, "as_of": m.as_of}),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out.into_iter().map(|(_, v)| v).collect()
}
