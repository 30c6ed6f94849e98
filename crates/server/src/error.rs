//! Errors as clients see them: OpenAI's `{"error": {message, type, param, code}}` with the right
//! HTTP status, or Ollama's `{"error": message}` on the `/api` routes. Every message says what
//! to change in the request.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// A request the server will not (or could not) answer.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's error `type`: `invalid_request_error`, `not_found_error`, `server_error`.
    pub kind: &'static str,
    pub message: String,
    /// The request field at fault, when there is one.
    pub param: Option<&'static str>,
    /// A machine-readable code, e.g. `model_not_found`.
    pub code: Option<&'static str>,
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
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 404: a model this server does not serve.
    pub fn unknown_model(asked: &str, served: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            message: format!(
                "the model `{asked}` does not exist here: this server serves `{served}` (see GET /v1/models)"
            ),
            param: Some("model"),
            code: Some("model_not_found"),
        }
    }

    /// 404: no such route.
    pub fn no_route(method: &str, path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            message: format!(
                "no route {method} {path}: this server has /v1/models, /v1/chat/completions, /v1/completions, /api/chat, /api/generate, /api/tags and /api/version"
            ),
            param: None,
            code: Some("unknown_url"),
        }
    }

    /// 500/503: the engine failed or is gone.
    pub fn server(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind: "server_error",
            message: message.into(),
            param: None,
            code: None,
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
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
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
        (self.0.status, Json(json!({"error": self.0.message}))).into_response()
    }
}
