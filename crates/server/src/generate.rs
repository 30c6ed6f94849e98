//! The bridge between HTTP handlers and the engine thread.
//!
//! Contract: [`start`] submits one [`Request`] whose reply channel is its own `std::sync::mpsc`
//! sender, forwards that channel onto a tokio channel from a small thread (the engine never
//! blocks on a client), and waits for the first event so that a request the engine rejects
//! (prompt too long, bad parameters) becomes a 400 before any response is started. Dropping the
//! returned [`Running`] before its last event sends `Command::Abort`: a client that goes away
//! frees its KV blocks at once. [`pump`] turns a [`Running`] into a response stream and stops
//! (aborting) as soon as the client has disconnected.

use std::sync::mpsc::Sender;
use std::time::Instant;

use axum::http::StatusCode;
use ferrolm_engine::{Command, Event, FinishReason, GenerateOptions, Request, Usage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;
use crate::AppState;

/// A request in the engine, seen from a handler.
pub struct Running {
    first: Option<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    abort: AbortOnDrop,
    /// When the HTTP request was accepted (Ollama's `total_duration` starts here).
    pub started: Instant,
}

/// Sends `Command::Abort` when dropped before the request's last event.
struct AbortOnDrop {
    id: u64,
    engine: Sender<Command>,
    done: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.engine.send(Command::Abort(self.id));
        }
    }
}

/// Submit `prompt` and wait until the engine has either accepted it (first token) or rejected it.
pub async fn start(
    state: &AppState,
    prompt: Vec<u32>,
    opts: GenerateOptions,
) -> Result<Running, ApiError> {
    let started = Instant::now();
    let id = state.next_request_id();
    let (reply, from_engine) = std::sync::mpsc::channel::<Event>();
    let (to_handler, events) = mpsc::unbounded_channel::<Event>();
    std::thread::Builder::new()
        .name(format!("ferrolm-reply-{id}"))
        .spawn(move || {
            // Ends when the engine drops the request (finished or aborted) or the handler is gone.
            for ev in from_engine {
                if to_handler.send(ev).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| {
            ApiError::server(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("could not start a reply thread ({e}): the machine is out of threads; retry later"),
            )
        })?;
    let req = Request {
        id,
        prompt,
        opts,
        salt: 0,
        reply,
    };
    state
        .engine
        .send(Command::Submit(Box::new(req)))
        .map_err(|_| engine_gone())?;
    let mut run = Running {
        first: None,
        events,
        abort: AbortOnDrop {
            id,
            engine: state.engine.clone(),
            done: false,
        },
        started,
    };
    match run.next().await {
        Event::Error(message) => Err(ApiError::invalid(message, None)),
        ev => {
            run.first = Some(ev);
            Ok(run)
        }
    }
}

fn engine_gone() -> ApiError {
    ApiError::server(
        StatusCode::SERVICE_UNAVAILABLE,
        "the engine has stopped (the server is shutting down or the model failed): restart `ferrolm serve`",
    )
}

impl Running {
    /// The next event; a vanished engine reads as [`Event::Error`]. After `Finished` or `Error`
    /// do not call again.
    pub async fn next(&mut self) -> Event {
        let ev = match self.first.take() {
            Some(ev) => ev,
            None => match self.events.recv().await {
                Some(ev) => ev,
                None => Event::Error(engine_gone().message),
            },
        };
        if matches!(ev, Event::Finished { .. } | Event::Error(_)) {
            self.abort.done = true;
        }
        ev
    }
}

/// One token as reported back: id, chosen logprob, top alternatives.
pub type TokenInfo = (u32, Option<f32>, Vec<(u32, f32)>);

/// A whole generation, for non-streaming answers.
pub struct Outcome {
    pub text: String,
    pub tokens: Vec<TokenInfo>,
    pub reason: FinishReason,
    pub usage: Usage,
    /// Seconds from admission to the first token (engine side).
    pub time_to_first_token: f64,
    pub started: Instant,
}

pub async fn collect(mut run: Running) -> Result<Outcome, ApiError> {
    let (mut text, mut tokens) = (String::new(), Vec::new());
    loop {
        match run.next().await {
            Event::Token {
                id,
                text: t,
                logprob,
                top,
            } => {
                text.push_str(&t);
                tokens.push((id, logprob, top));
            }
            Event::Finished {
                reason,
                usage,
                time_to_first_token,
            } => {
                return Ok(Outcome {
                    text,
                    tokens,
                    reason,
                    usage,
                    time_to_first_token,
                    started: run.started,
                })
            }
            Event::Error(m) => {
                return Err(ApiError::server(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("generation failed: {m}"),
                ))
            }
        }
    }
}

/// Stream a running request: `render` turns each event into items of the response body. Stops
/// after `Finished` or `Error`, or as soon as the client disconnects (dropping `run` aborts).
pub fn pump<T: Send + 'static>(
    mut run: Running,
    mut render: impl FnMut(&Running, Event) -> Vec<T> + Send + 'static,
) -> ReceiverStream<T> {
    let (tx, rx) = mpsc::channel::<T>(32);
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = tx.closed() => return,
                ev = run.next() => ev,
            };
            let last = matches!(ev, Event::Finished { .. } | Event::Error(_));
            for item in render(&run, ev) {
                if tx.send(item).await.is_err() {
                    return;
                }
            }
            if last {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// OpenAI's and Ollama's name for a finish reason.
pub fn finish_name(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}
