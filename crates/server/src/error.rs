//! Errors as clients see them: OpenAI's `{"error": {message, type, param, code}}` with the right
//! HTTP status (and headers such as `Retry-After` and `x-ratelimit-*`), or Ollama's
//! `{"error": message}` on the `/api` routes. Every message says what to change in the request.

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// A request the server will not (or could not) answer.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's error `type`: `invalid_request_error`, `authentication_error`,
    /// `rate_limit_error`, `insufficient_quota`, `server_error`.
    pub kind: &'static str,
    pub message: String,
    /// The request field at fault, when there is one.
    pub param: Option<&'static str>,
    /// A machine-readable code, e.g. `model_not_found`.
    pub code: Option<&'static str>,
    /// Extra response headers (`Retry-After`, `x-ratelimit-*`).
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    /// 400: the request itself is wrong.
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param,
            code: None,
            headers: Vec::new(),
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 404: a model this server does not serve.
    pub fn unknown_model(asked: &str, served: &[&str]) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: Some("model_not_found"),
            ..ApiError::invalid(
                format!(
                    "the model `{asked}` does not exist here: this server serves {} (see GET /v1/models)",
                    served
                        .iter()
                        .map(|s| format!("`{s}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Some("model"),
            )
        }
    }

    /// 404: no such route.
    pub fn no_route(method: &str, path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: Some("unknown_url"),
            ..ApiError::invalid(
                format!(
                    "no route {method} {path}: this server has /v1/models, /v1/chat/completions, /v1/completions, /v1/usage, /v1/keys (admin keys), /v1/files, /v1/fine_tuning/jobs, /v1/load_lora_adapter, /v1/unload_lora_adapter, /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version, /health and /metrics"
                ),
                None,
            )
        }
    }

    /// 500/503: the engine failed or is gone.
    pub fn server(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind: "server_error",
            ..ApiError::invalid(message, None)
        }
    }

    /// 500: the key store or ledger failed; 503 (retry later) when the store cannot be reached
    /// for now (a shared PostgreSQL store stopped or timed out).
    pub fn storage(e: ferrolm_accounting::AccountingError) -> Self {
        if e.is_unavailable() {
            let mut err = ApiError::server(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
            err.code = Some("store_unavailable");
            err.headers.push(("retry-after", "5".to_owned()));
            return err;
        }
        ApiError::server(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the key store failed: {e}; check the data dir's disk and permissions"),
        )
    }

    /// 401: no key, or one this server does not know.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "authentication_error",
            code: Some("invalid_api_key"),
            ..ApiError::invalid(message, None)
        }
    }

    /// 429: the key's requests or tokens per minute are used up.
    pub fn rate_limited(
        message: String,
        retry_after: u64,
        mut headers: Vec<(&'static str, String)>,
    ) -> Self {
        headers.push(("retry-after", retry_after.max(1).to_string()));
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "rate_limit_error",
            code: Some("rate_limit_exceeded"),
            headers,
            ..ApiError::invalid(message, None)
        }
    }

    /// 429: the key's spend budget is reached (OpenAI's `insufficient_quota`).
    pub fn budget_exhausted(key: &str, spent: f64, budget: f64) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "insufficient_quota",
            code: Some("insufficient_quota"),
            ..ApiError::invalid(
                format!(
                    "the key `{key}` has spent ${spent:.6} of its ${budget:.6} budget: create a key with a larger --budget-usd"
                ),
                None,
            )
        }
    }

    /// 429: the model's queue is full.
    pub fn overloaded(model: &str, in_flight: usize, capacity: usize, retry_after: u64) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "rate_limit_error",
            code: Some("server_overloaded"),
            headers: vec![("retry-after", retry_after.to_string())],
            ..ApiError::invalid(
                format!(
                    "`{model}` already has {in_flight} requests running or queued (the most is {capacity}): retry after {retry_after} s, or raise --max-queue"
                ),
                None,
            )
        }
    }

    /// 413: the body is over [`crate::MAX_BODY_BYTES`].
    pub fn too_large(len: usize) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            ..ApiError::invalid(
                format!(
                    "the request body has {len} bytes, larger than the {} MiB this server reads: send a shorter prompt",
                    crate::MAX_BODY_BYTES >> 20
                ),
                None,
            )
        }
    }

    /// The OpenAI error body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }

    fn with_headers(&self, mut r: Response) -> Response {
        for (k, v) in &self.headers {
            if let Ok(v) = HeaderValue::from_str(v) {
                r.headers_mut().insert(HeaderName::from_static(k), v);
            }
        }
        r
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let r = (self.status, Json(self.body())).into_response();
        self.with_headers(r)
    }
}

/// The same error in Ollama's shape, for the `/api` routes.
#[derive(Debug)]
pub struct OllamaError(pub ApiError);

impl From<ApiError> for OllamaError {
    fn from(e: ApiError) -> Self {
        OllamaError(e)
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        let r = (self.0.status, Json(json!({"error": self.0.message}))).into_response();
        self.0.with_headers(r)
    }
}
