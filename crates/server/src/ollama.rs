//! The Ollama-compatible routes: `/api/chat` and `/api/generate` (NDJSON lines by default, one
//! JSON object with `"stream": false`), `/api/tags` and `/api/version`. Durations are in
//! nanoseconds, as Ollama reports them.

use std::convert::Infallible;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferrolm_engine::{Event, FinishReason, Usage};
use ferrolm_sample::SamplingParams;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::{ApiError, OllamaError};
use crate::generate::{self, finish_name, Running};
use crate::{parse, unix_now, AppState, Stop};

/// Ollama's `options`. Unknown ones (num_ctx, mirostat, ...) are ignored.
#[derive(Debug, Default, Deserialize)]
struct Options {
    temperature: Option<f32>,
    /// Most tokens to generate; -1 (or absent) = until the context is full.
    num_predict: Option<i64>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<usize>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
}

impl Options {
    /// llama.cpp's defaults ([`SamplingParams::default`]) for whatever is not given.
    fn params(&self) -> SamplingParams {
        let d = SamplingParams::default();
        SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repetition_penalty: self.repeat_penalty.unwrap_or(d.repetition_penalty),
            repeat_last_n: self.repeat_last_n.unwrap_or(d.repeat_last_n),
            presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
            seed: self.seed,
            ..d
        }
    }

    fn max_tokens(&self) -> Option<usize> {
        self.num_predict.and_then(|n| usize::try_from(n).ok())
    }
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Value,
    stream: Option<bool>,
    #[serde(default)]
    options: Options,
    tools: Option<Value>,
    format: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct GenerateRequest {
    model: String,
    prompt: String,
    system: Option<String>,
    /// Send the prompt as is, without the chat template.
    #[serde(default)]
    raw: bool,
    stream: Option<bool>,
    #[serde(default)]
    options: Options,
    format: Option<Value>,
}

fn check_supported(tools: Option<&Value>, format: Option<&Value>) -> Result<(), ApiError> {
    if tools.is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(ApiError::invalid(
            "tools: tool calling is not supported yet; remove `tools`",
            Some("tools"),
        ));
    }
    if format.is_some_and(|f| !f.is_null() && f != "") {
        return Err(ApiError::invalid(
            "format: JSON mode and structured outputs are not supported yet; remove `format`",
            Some("format"),
        ));
    }
    Ok(())
}

/// Which Ollama endpoint a stream answers: the key its text goes under differs.
#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Generate,
}

impl Kind {
    fn text(self, text: &str) -> (&'static str, Value) {
        match self {
            Kind::Chat => ("message", json!({"role": "assistant", "content": text})),
            Kind::Generate => ("response", json!(text)),
        }
    }
}

/// One NDJSON line (or the whole non-streaming answer); `done` holds the last line's stats.
fn line(kind: Kind, model: &str, text: &str, done: Option<Map<String, Value>>) -> Value {
    let (key, value) = kind.text(text);
    let mut v = json!({"model": model, "created_at": rfc3339_now()});
    v[key] = value;
    v["done"] = json!(done.is_some());
    for (k, x) in done.into_iter().flatten() {
        v[k] = x;
    }
    v
}

/// The last line's fields: why it stopped, token counts and durations (ns).
fn done_stats(
    reason: FinishReason,
    usage: &Usage,
    ttft: f64,
    started: Instant,
) -> Map<String, Value> {
    let total = started.elapsed().as_nanos() as u64;
    let prompt_eval = (ttft * 1e9) as u64;
    let stats = json!({
        "done_reason": finish_name(reason),
        "total_duration": total,
        "load_duration": 0,
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": prompt_eval,
        "eval_count": usage.completion_tokens,
        "eval_duration": total.saturating_sub(prompt_eval),
    });
    match stats {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

async fn answer(
    s: AppState,
    kind: Kind,
    run: Running,
    stream: bool,
) -> Result<Response, OllamaError> {
    let model = s.model.id.clone();
    if !stream {
        let out = generate::collect(run).await?;
        let stats = done_stats(out.reason, &out.usage, out.time_to_first_token, out.started);
        return Ok(Json(line(kind, &model, &out.text, Some(stats))).into_response());
    }
    let lines = generate::pump(run, move |run, ev| {
        let v = match ev {
            Event::Token { text, .. } if text.is_empty() => return vec![],
            Event::Token { text, .. } => line(kind, &model, &text, None),
            Event::Finished {
                reason,
                usage,
                time_to_first_token,
            } => line(
                kind,
                &model,
                "",
                Some(done_stats(reason, &usage, time_to_first_token, run.started)),
            ),
            Event::Error(m) => json!({"error": m}),
        };
        vec![Ok::<_, Infallible>(format!("{v}\n"))]
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

pub async fn chat(State(s): State<AppState>, body: Bytes) -> Result<Response, OllamaError> {
    let req: ChatRequest = parse(&body)?;
    s.check_model(Some(&req.model))?;
    check_supported(req.tools.as_ref(), req.format.as_ref())?;
    let prompt = s.chat_prompt(&req.messages)?;
    let o = &req.options;
    let opts = s.options(
        &prompt,
        o.params(),
        o.max_tokens(),
        Stop::into_vec(req.options.stop),
    )?;
    let run = generate::start(&s, prompt, opts).await?;
    answer(s, Kind::Chat, run, req.stream.unwrap_or(true)).await
}

pub async fn generate(State(s): State<AppState>, body: Bytes) -> Result<Response, OllamaError> {
    let req: GenerateRequest = parse(&body)?;
    s.check_model(Some(&req.model))?;
    check_supported(None, req.format.as_ref())?;
    let prompt = if req.raw {
        s.text_prompt(&req.prompt)?
    } else {
        let mut m = Vec::new();
        if let Some(sys) = &req.system {
            m.push(json!({"role": "system", "content": sys}));
        }
        m.push(json!({"role": "user", "content": req.prompt}));
        s.chat_prompt(&Value::Array(m))?
    };
    let o = &req.options;
    let opts = s.options(
        &prompt,
        o.params(),
        o.max_tokens(),
        Stop::into_vec(req.options.stop),
    )?;
    let run = generate::start(&s, prompt, opts).await?;
    answer(s, Kind::Generate, run, req.stream.unwrap_or(true)).await
}

pub async fn tags(State(s): State<AppState>) -> Json<Value> {
    let m = &s.model;
    Json(json!({"models": [{
        "name": m.id,
        "model": m.id,
        "modified_at": ferrolm_tokenizer::chat::rfc3339(m.created),
        "size": m.file_size,
        "digest": "",
        "details": {"format": "gguf", "file": m.file_name},
    }]}))
}

pub async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

fn rfc3339_now() -> String {
    ferrolm_tokenizer::chat::rfc3339(unix_now())
}
