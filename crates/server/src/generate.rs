//! The bridge between HTTP handlers and an engine thread.
//!
//! Contract: [`start`] reserves room in the model's bounded queue (or fails with a 429), then
//! submits one [`Request`] per choice (`n`), each with its own `std::sync::mpsc` reply channel
//! that a small thread forwards, tagged with the choice's index, onto one tokio channel (the
//! engine never blocks on a client). It waits until every choice has either been accepted
//! (first event) or rejected, so that a request the engine refuses becomes a 400 before any
//! response is started. Dropping the [`Job`] before its choices finish sends `Command::Abort`
//! for each: a client that goes away frees its KV blocks at once. [`pump`] turns a job into a
//! response stream and stops (aborting) as soon as the client has disconnected; [`collect`]
//! gathers whole answers.

use std::collections::VecDeque;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use ferrolm_engine::{Command, Event, FinishReason, GenerateOptions, Request, Usage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;
use crate::{AppState, InFlight, Model};

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

/// The `n` choices of one HTTP request, in the engine.
pub struct Job {
    events: mpsc::UnboundedReceiver<(usize, Event)>,
    /// Events read while waiting for every choice to start.
    pending: VecDeque<(usize, Event)>,
    aborts: Vec<AbortOnDrop>,
    last_token: Vec<Option<Instant>>,
    live: usize,
    _slots: InFlight,
    state: AppState,
    /// When the first token of any choice arrived.
    pub first_token: Option<Instant>,
}

/// Submit `n` choices of `prompt` (choice `i` samples with seed + `i`) and wait until the engine
/// has accepted or rejected each.
pub async fn start(
    state: &AppState,
    model: &Arc<Model>,
    prompt: Vec<u32>,
    opts: GenerateOptions,
    n: usize,
) -> Result<Job, ApiError> {
    let slots = model.reserve(n)?;
    let (to_handler, events) = mpsc::unbounded_channel::<(usize, Event)>();
    let mut job = Job {
        events,
        pending: VecDeque::new(),
        aborts: Vec::with_capacity(n),
        last_token: vec![None; n],
        live: n,
        _slots: slots,
        state: state.clone(),
        first_token: None,
    };
    for i in 0..n {
        let id = state.next_request_id();
        let (reply, from_engine) = std::sync::mpsc::channel::<Event>();
        let tx = to_handler.clone();
        std::thread::Builder::new()
            .name(format!("ferrolm-reply-{id}"))
            .spawn(move || {
                // Ends when the engine drops the request (finished or aborted) or the job is gone.
                for ev in from_engine {
                    if tx.send((i, ev)).is_err() {
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
        let mut opts = opts.clone();
        opts.seed = opts.seed.wrapping_add(i as u64);
        opts.params.seed = opts.params.seed.map(|s| s.wrapping_add(i as u64));
        let req = Request {
            id,
            prompt: prompt.clone(),
            opts,
            adapter: model.adapter.clone(),
            reply,
        };
        model
            .engine
            .send(Command::Submit(Box::new(req)))
            .map_err(|_| engine_gone())?;
        job.aborts.push(AbortOnDrop {
            id,
            engine: model.engine.clone(),
            done: false,
        });
    }
    drop(to_handler);
    let mut started = vec![false; n];
    while started.iter().any(|s| !s) {
        let (i, ev) = job.recv().await;
        if let Event::Error(message) = ev {
            return Err(ApiError::invalid(message, None));
        }
        started[i] = true;
        job.pending.push_back((i, ev));
    }
    Ok(job)
}

fn engine_gone() -> ApiError {
    ApiError::server(
        StatusCode::SERVICE_UNAVAILABLE,
        "the engine has stopped (the server is shutting down or the model failed): restart `ferrolm serve`",
    )
}

impl Job {
    async fn recv(&mut self) -> (usize, Event) {
        match self.events.recv().await {
            Some(x) => x,
            // Every forwarding thread is gone before every choice finished.
            None => (
                self.aborts.iter().position(|a| !a.done).unwrap_or(0),
                Event::Error(engine_gone().message),
            ),
        }
    }

    /// The next event of any choice; `None` once every choice has finished.
    pub async fn next(&mut self) -> Option<(usize, Event)> {
        if self.live == 0 {
            return None;
        }
        let (i, ev) = match self.pending.pop_front() {
            Some(x) => x,
            None => self.recv().await,
        };
        match &ev {
            Event::Token { .. } => {
                let now = Instant::now();
                self.first_token.get_or_insert(now);
                if let Some(prev) = self.last_token[i].replace(now) {
                    self.state.metrics.inter_token((now - prev).as_secs_f64());
                }
            }
            Event::Finished { .. } | Event::Error(_) => {
                if let Some(a) = self.aborts.get_mut(i) {
                    if !a.done {
                        a.done = true;
                        self.live -= 1;
                    }
                }
            }
        }
        Some((i, ev))
    }

    pub fn choices(&self) -> usize {
        self.aborts.len()
    }
}

/// One token as reported back: id, chosen logprob, top alternatives.
pub type TokenInfo = (u32, Option<f32>, Vec<(u32, f32)>);

/// One whole choice, for non-streaming answers.
#[derive(Debug, Default)]
pub struct Outcome {
    pub text: String,
    pub tokens: Vec<TokenInfo>,
    pub reason: Option<FinishReason>,
    pub usage: Usage,
    /// Seconds from admission to the first token (engine side).
    pub time_to_first_token: f64,
}

/// Run every choice to its end. Returns the outcomes (by choice) and the usage of the whole
/// request: the prompt counted once, completions summed.
pub async fn collect(mut job: Job) -> Result<(Vec<Outcome>, Usage, Option<Instant>), ApiError> {
    let mut outs: Vec<Outcome> = (0..job.choices()).map(|_| Outcome::default()).collect();
    while let Some((i, ev)) = job.next().await {
        let o = &mut outs[i];
        match ev {
            Event::Token {
                id,
                text,
                logprob,
                top,
            } => {
                o.text.push_str(&text);
                o.tokens.push((id, logprob, top));
            }
            Event::Finished {
                reason,
                usage,
                time_to_first_token,
            } => {
                o.reason = Some(reason);
                o.usage = usage;
                o.time_to_first_token = time_to_first_token;
            }
            Event::Error(m) => {
                return Err(ApiError::server(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("generation failed: {m}"),
                ))
            }
        }
    }
    let usage = total_usage(outs.iter().map(|o| &o.usage));
    Ok((outs, usage, job.first_token))
}

/// The usage of `n` choices of one prompt: the prompt once, completions summed.
pub fn total_usage<'a>(us: impl Iterator<Item = &'a Usage>) -> Usage {
    let mut total = Usage {
        prompt_tokens: 0,
        cached_tokens: 0,
        completion_tokens: 0,
    };
    for (i, u) in us.enumerate() {
        if i == 0 {
            total.prompt_tokens = u.prompt_tokens;
            total.cached_tokens = u.cached_tokens;
        }
        total.completion_tokens += u.completion_tokens;
    }
    total
}

/// Stream a job: `render` turns each (choice, event) into items of the response body, and is
/// called once more with `None` after the last choice finished (for trailers such as usage and
/// `[DONE]`). Stops as soon as the client disconnects (dropping the job aborts it).
pub fn pump<T: Send + 'static>(
    mut job: Job,
    mut render: impl FnMut(&Job, Option<(usize, Event)>) -> Vec<T> + Send + 'static,
) -> ReceiverStream<T> {
    let (tx, rx) = mpsc::channel::<T>(32);
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = tx.closed() => return,
                ev = job.next() => ev,
            };
            let last = ev.is_none();
            let failed = matches!(ev, Some((_, Event::Error(_))));
            for item in render(&job, ev) {
                if tx.send(item).await.is_err() {
                    return;
                }
            }
            if last || failed {
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
