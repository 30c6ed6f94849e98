//! The Ollama-compatible routes: `/api/chat` and `/api/generate` (NDJSON lines by default, one
//! JSON object with `"stream": false`; `format` as `"json"` or a schema, enforced by a grammar;
//! tools on chat), `/api/tags`, `/api/show`, `/api/ps` and `/api/version`. Durations are in
//! nanoseconds, as Ollama reports them.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ferrolm_engine::{FinishReason, GenerateOptions, Usage};
use ferrolm_grammar::Grammar;
use ferrolm_sample::SamplingParams;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::auth::Caller;
use crate::compress::{fit_chat, Strategy};
use crate::error::{ApiError, OllamaError};
use crate::generate::{self, finish_name, Choice, ClientConn, Format, Run, TokenInfo};
use crate::tools::{self, Call, Tools};
use crate::{parse, unix_now, AppState, Levers, Model, Stop, Worst};
use tokio_stream::wrappers::ReceiverStream;

/// Ollama's `options`. Unknown ones (mirostat, num_gpu, ...) are ignored.
#[derive(Debug, Default, Deserialize)]
struct Options {
    /// This request's context window: prompt + reply must fit (a prompt that does not is a 400,
    /// never cut as Ollama does).
    num_ctx: Option<usize>,
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

    /// The engine options of a request with `prompt` on `model`.
    fn generate_options(
        &self,
        model: &Model,
        prompt: &[u32],
        grammar: Option<Arc<Grammar>>,
    ) -> Result<GenerateOptions, ApiError> {
        model.options(
            prompt,
            self.params(),
            self.max_tokens(prompt.len())?,
            Stop::into_vec(self.stop.clone()),
            grammar,
        )
    }

    /// `num_predict` (negative: until the context is full), within `num_ctx` when given.
    fn max_tokens(&self, prompt: usize) -> Result<Option<usize>, ApiError> {
        let asked = self.num_predict.and_then(|n| usize::try_from(n).ok());
        let Some(ctx) = self.num_ctx else {
            return Ok(asked);
        };
        if prompt >= ctx {
            return Err(ApiError::invalid(
                format!(
                    "the prompt has {prompt} tokens, {} more than options.num_ctx ({ctx}) leaves room for: raise num_ctx or shorten the prompt",
                    prompt + 1 - ctx
                ),
                Some("options.num_ctx"),
            ));
        }
        Ok(Some(asked.map_or(ctx - prompt, |n| n.min(ctx - prompt))))
    }
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Value,
    /// ferrolm's extension: `error` or `middle-out` for a conversation over the context.
    context_strategy: Option<Strategy>,
    /// ferrolm's extension, as OpenAI chat's: `eager` or `lazy` tool definitions.
    tool_strategy: Option<tools::Strategy>,
    /// ferrolm's extension: past how many tools (or `"Ntokens"`) `lazy` applies.
    lazy_tools_threshold: Option<tools::Threshold>,
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
    images: Option<Value>,
}

/// Ollama's `format`: `"json"` (any JSON object) or a JSON schema, enforced by a grammar.
fn format_grammar(format: Option<&Value>) -> Result<Option<Arc<Grammar>>, ApiError> {
    let bad = |m: String| ApiError::invalid(m, Some("format"));
    match format {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s == "json" => Ok(Some(Arc::new(Grammar::json_object()))),
        Some(Value::String(s)) => Err(bad(format!(
            "format `{s}` is not \"json\" or a JSON schema object"
        ))),
        Some(schema @ Value::Object(_)) => Grammar::json_schema(schema)
            .map(|g| Some(Arc::new(g)))
            .map_err(|e| bad(format!("format: {e}"))),
        Some(_) => Err(bad("format must be \"json\" or a JSON schema object".into())),
    }
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

/// Ollama's `/api/chat` and `/api/generate`: one JSON object, or NDJSON lines whose last one
/// (`done: true`) carries the stats.
struct OllamaFormat {
    kind: Kind,
    model: String,
    started: Instant,
    /// The last line, sent once the request is settled.
    done: Option<Value>,
}

type Line = Result<String, Infallible>;

fn ndjson(v: &Value) -> Line {
    Ok(format!("{v}\n"))
}

impl Format for OllamaFormat {
    type Item = Line;

    fn start(&mut self, _i: usize) -> Vec<Line> {
        vec![]
    }

    fn text(&mut self, _i: usize, text: String, _token: Option<TokenInfo>) -> Vec<Line> {
        if text.is_empty() {
            return vec![];
        }
        vec![ndjson(&line(self.kind, &self.model, &text, None))]
    }

    fn calls(&mut self, _i: usize, content: Option<String>, calls: &[Call]) -> Vec<Line> {
        let mut v = line(
            self.kind,
            &self.model,
            content.as_deref().unwrap_or(""),
            None,
        );
        v["message"]["tool_calls"] = tools::ollama_calls(calls);
        vec![ndjson(&v)]
    }

    fn finish(
        &mut self,
        _i: usize,
        reason: FinishReason,
        _finish: &'static str,
        usage: &Usage,
        ttft: f64,
    ) -> Vec<Line> {
        let stats = done_stats(reason, usage, ttft, self.started);
        self.done = Some(line(self.kind, &self.model, "", Some(stats)));
        vec![]
    }

    fn end(&mut self, _usage: &Usage, _cost: Option<f64>) -> Vec<Line> {
        self.done.take().iter().map(ndjson).collect()
    }

    fn error(&mut self, message: String) -> Vec<Line> {
        vec![ndjson(&json!({ "error": message }))]
    }

    fn stream_response(stream: ReceiverStream<Line>) -> Response {
        (
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            Body::from_stream(stream),
        )
            .into_response()
    }

    fn whole(&self, choices: Vec<Choice>, usage: &Usage) -> Value {
        let Some(c) = choices.into_iter().next() else {
            return json!({"error": "no reply"});
        };
        let stats = done_stats(c.reason, usage, c.time_to_first_token, self.started);
        let mut v = line(
            self.kind,
            &self.model,
            c.content.as_deref().unwrap_or(""),
            Some(stats),
        );
        if !c.calls.is_empty() {
            v["message"]["tool_calls"] = tools::ollama_calls(&c.calls);
        }
        v
    }
}

/// One request, as the handlers below have prepared it.
struct Prepared {
    model: Arc<Model>,
    kind: Kind,
    prompt: Vec<u32>,
    opts: GenerateOptions,
    tools: Option<Tools>,
    resume: Option<generate::Resume>,
    stream: bool,
    levers: Levers,
    /// Headers to add to the answer (`x-ferrolm-context`).
    headers: Vec<(&'static str, String)>,
}

async fn answer(
    s: AppState,
    caller: Caller,
    conn: Option<ClientConn>,
    p: Prepared,
) -> Result<Response, OllamaError> {
    let Prepared {
        model,
        kind,
        prompt,
        opts,
        tools,
        resume,
        stream,
        levers,
        headers,
    } = p;
    let endpoint = match kind {
        Kind::Chat => "/api/chat",
        Kind::Generate => "/api/generate",
    };
    let mut ticket = s.admit(
        &caller,
        Worst {
            prompt_tokens: prompt.len() as u64,
            completion_tokens: opts.max_tokens as u64,
            price: model.price.as_ref(),
        },
    )?;
    ticket.headers.extend(headers);
    let job = generate::start(&s, &model, prompt, opts, 1, caller.cache_scope).await?;
    let format = OllamaFormat {
        kind,
        model: model.id.clone(),
        started: caller.started,
        done: None,
    };
    let run = Run {
        state: s,
        caller,
        ticket,
        levers,
        model,
        endpoint,
        tools,
        resume,
        job,
        conn,
    };
    Ok(generate::respond(run, format, stream).await?)
}

pub async fn chat(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    conn: Option<Extension<ConnectInfo<ClientConn>>>,
    body: Bytes,
) -> Result<Response, OllamaError> {
    let req: ChatRequest = parse(&body)?;
    let model = s.model(caller.key_id(), Some(&req.model))?;
    let mut tools = Tools::parse(req.tools.as_ref(), None, None)?;
    let mut left_out = None;
    if let Some(t) = &mut tools {
        left_out = t.apply_for(
            &model,
            req.tool_strategy,
            req.lazy_tools_threshold,
            1,
            &req.messages,
        )?;
    }
    let grammar = format_grammar(req.format.as_ref())?;
    let o = &req.options;
    let strategy = req.context_strategy.unwrap_or(model.context_strategy);
    let (prompt, compressed) = fit_chat(
        &s,
        &model,
        &req.messages,
        tools.as_ref().and_then(Tools::for_prompt),
        strategy,
        o.num_predict.and_then(|n| usize::try_from(n).ok()),
        None,
        caller.cache_scope,
    )
    .await?;
    let opts = o.generate_options(&model, &prompt, grammar)?;
    let mut headers: Vec<(&'static str, String)> = compressed
        .as_ref()
        .map(|c| ("x-ferrolm-context", c.header()))
        .into_iter()
        .collect();
    headers.extend(left_out.map(|l| ("x-ferrolm-tools", l.header(prompt.len()))));
    let p = Prepared {
        model,
        kind: Kind::Chat,
        levers: Levers {
            compressed_tokens: compressed.as_ref().map_or(0, |c| c.saved()),
            eager_prompt_tokens: left_out.map(|l| l.eager_prompt_tokens(prompt.len())),
            route: None,
        },
        resume: left_out
            .map(|_| generate::Resume::new(req.messages.clone(), strategy, opts.clone())),
        prompt,
        opts,
        tools,
        stream: req.stream.unwrap_or(true),
        headers,
    };
    answer(s, caller, conn.map(|Extension(ConnectInfo(c))| c), p).await
}

pub async fn generate(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    conn: Option<Extension<ConnectInfo<ClientConn>>>,
    body: Bytes,
) -> Result<Response, OllamaError> {
    let req: GenerateRequest = parse(&body)?;
    crate::validate::ollama_images(req.images.as_ref(), "images")?;
    let model = s.model(caller.key_id(), Some(&req.model))?;
    let grammar = format_grammar(req.format.as_ref())?;
    let prompt = if req.raw {
        model.text_prompt(&req.prompt)?
    } else {
        let mut m = Vec::new();
        if let Some(sys) = &req.system {
            m.push(json!({"role": "system", "content": sys}));
        }
        m.push(json!({"role": "user", "content": req.prompt}));
        model.chat_prompt(&Value::Array(m), None)?
    };
    let o = &req.options;
    let opts = o.generate_options(&model, &prompt, grammar)?;
    let p = Prepared {
        model,
        kind: Kind::Generate,
        prompt,
        opts,
        tools: None,
        resume: None,
        stream: req.stream.unwrap_or(true),
        levers: Levers::default(),
        headers: Vec::new(),
    };
    answer(s, caller, conn.map(|Extension(ConnectInfo(c))| c), p).await
}

/// Ollama's `details` object.
fn details(m: &Model) -> Value {
    let d = &m.details;
    json!({
        "parent_model": m.parent.as_deref().unwrap_or_default(),
        "format": "gguf",
        "family": d.architecture,
        "families": [d.architecture],
        "parameter_size": parameter_size(d.parameter_count),
        "quantization_level": d.quantization,
    })
}

/// `134515008` → `134.5M`, as Ollama prints sizes.
fn parameter_size(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1}B", n / 1e9)
    } else {
        format!("{:.1}M", n / 1e6)
    }
}

fn digest(m: &Model) -> String {
    // Not the file's sha256 (hashing a large file per listing is too slow): a stable id built
    // from its name, size and modification time.
    let h = crate::fnv1a(format!("{}:{}:{}:{}", m.id, m.file_name, m.file_size, m.created).bytes());
    format!("{h:016x}")
}

pub async fn tags(State(s): State<AppState>, Extension(caller): Extension<Caller>) -> Json<Value> {
    let mut models: Vec<Value> = s
        .models(caller.key_id())
        .iter()
        .map(|m| {
            json!({
                "name": m.id,
                "model": m.id,
                "modified_at": ferrolm_tokenizer::chat::rfc3339(m.created),
                "size": m.file_size,
                "digest": digest(m),
                "details": details(m),
            })
        })
        .collect();
    if let Some(e) = s.embeddings.get() {
        // The encoder's f32 safetensors: 4 bytes a parameter (the header is a few KiB).
        let size = std::fs::metadata(e.embedder.model_dir().join("model.safetensors"))
            .map_or(0, |m| m.len());
        let h = crate::fnv1a(format!("{}:{size}:{}", e.id, e.created).bytes());
        models.push(json!({
            "name": e.id,
            "model": e.id,
            "modified_at": ferrolm_tokenizer::chat::rfc3339(e.created),
            "size": size,
            "digest": format!("{h:016x}"),
            "details": {
                "parent_model": "",
                "format": "safetensors",
                "family": "bert",
                "families": ["bert"],
                "parameter_size": parameter_size(size / 4),
                "quantization_level": "F32",
            },
        }));
    }
    Json(json!({"models": models}))
}

#[derive(Debug, Deserialize)]
struct ShowRequest {
    model: Option<String>,
    /// The older name of the field.
    name: Option<String>,
}

/// `POST /api/show`: the model's template, details, metadata and capabilities.
pub async fn show(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Json<Value>, OllamaError> {
    let req: ShowRequest = parse(&body)?;
    let Some(name) = req.model.or(req.name) else {
        return Err(ApiError::invalid("send {\"model\": \"<name>\"}", Some("model")).into());
    };
    let m = s.model(caller.key_id(), Some(&name))?;
    let d = &m.details;
    let arch = &d.architecture;
    let mut info = serde_json::Map::new();
    info.insert("general.architecture".into(), json!(arch));
    info.insert("general.parameter_count".into(), json!(d.parameter_count));
    for (k, v) in [
        ("context_length", d.context_length),
        ("embedding_length", d.embedding_length),
        ("block_count", d.block_count),
        ("attention.head_count", d.head_count),
        ("attention.head_count_kv", d.head_count_kv),
    ] {
        info.insert(format!("{arch}.{k}"), json!(v));
    }
    info.insert(
        "tokenizer.ggml.model_vocab_size".into(),
        json!(m.vocab_size),
    );
    for (k, v) in &d.quantize_receipt {
        info.insert(format!("ferrolm.quantize.{k}"), v.clone());
    }
    Ok(Json(json!({
        "license": "",
        "modelfile": format!("FROM {}\n", m.file_name),
        "parameters": "",
        "template": m.template.source,
        "details": details(&m),
        "model_info": info,
        "capabilities": ["completion", "tools"],
        "modified_at": ferrolm_tokenizer::chat::rfc3339(m.created),
    })))
}

/// `GET /api/ps`: the loaded models (all of them: ferrolm loads every model at start and keeps
/// it until it stops).
pub async fn ps(State(s): State<AppState>, Extension(caller): Extension<Caller>) -> Json<Value> {
    let models: Vec<Value> = s
        .models(caller.key_id())
        .iter()
        .map(|m| {
            json!({
                "name": m.id,
                "model": m.id,
                "size": m.details.memory_bytes,
                "digest": digest(m),
                "details": details(m),
                "expires_at": "9999-12-31T23:59:59Z",
                "size_vram": 0,
                "context_length": m.max_context,
            })
        })
        .collect();
    Json(json!({"models": models}))
}

pub async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

fn rfc3339_now() -> String {
    ferrolm_tokenizer::chat::rfc3339(unix_now())
}
