//! The one request pipeline of every generating route: admit → start → generate → tool
//! hold-back → settle. A [`Format`] at the edge turns what it produces into OpenAI chat, OpenAI
//! completions or Ollama bytes, as one JSON object or as a stream (STYLE principle 18: a new
//! response format is a new `Format`, never a copy of the pipeline).
//!
//! Contract:
//! - [`start`] reserves room in the model's bounded queue (or fails with a 429), then submits
//!   one [`Request`] per choice (`n`), each with its own tokio reply channel that the engine
//!   thread sends on directly. It waits until every choice has either been accepted (first
//!   event) or refused, so a refusal becomes an error status before any response is started:
//!   the request's fault → 400, no capacity → 503 with `Retry-After`, internal → 500.
//! - [`respond`] runs the job in a task of its own, so that it always ends in [`AppState::settle`]
//!   — one ledger row per admitted request, whether it finished, failed, or its client went
//!   away. A client that goes away (a stream's body dropped, or, for a JSON answer, the socket
//!   closed: see [`ClientConn`]) aborts the job's choices in the engine, which answers with what
//!   each had computed; those tokens are billed with status 499 (nginx's "client closed request").
//! - Streamed and non-streamed copies of one request produce the same ledger row: the usage is
//!   the engine's (prompt once, completions summed over choices), the same finish reason (the
//!   last choice's), the same time to first token.
//! - Dropping a [`Job`] before its choices end still aborts them (a handler that fails between
//!   `start` and `respond`).
//! - Lazy tool loading ([`crate::tools`]): a choice whose reply only called `load_tools` does not
//!   end; [`Run::reply`] adds the call and the definitions to the conversation ([`Resume`]) and
//!   submits the choice again with the longer prompt. The client sees neither the call nor the
//!   extra pass's start (streamed prose before the call is sent as content); the usage is the
//!   sum of the passes (every prompt, cached tokens included, and every completion token).

use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use axum::extract::connect_info::Connected;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use ferrolm_engine::{
    Command, EngineError, ErrorKind, Event, FinishReason, GenerateOptions, Request, Usage,
};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::auth::Caller;
use crate::compress::{self, fit_chat};
use crate::error::ApiError;
use crate::tools::{self, Call, HoldBack, Tools};
use crate::{AppState, InFlight, Levers, Model, Ticket};

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
    /// One reply channel per choice.
    replies: Vec<mpsc::UnboundedReceiver<Event>>,
    /// Events read while waiting for every choice to start.
    pending: VecDeque<(usize, Event)>,
    aborts: Vec<AbortOnDrop>,
    last_token: Vec<Option<Instant>>,
    /// Tokens received per choice (what a failed choice is billed for).
    received: Vec<usize>,
    /// The choice whose channel is polled first next time (round robin).
    turn: usize,
    /// Choices whose last event has not been handed out by [`Job::next`].
    live: usize,
    prompt_tokens: usize,
    cache_scope: u64,
    _slots: InFlight,
    state: AppState,
    /// When the first token of any choice arrived.
    pub first_token: Option<Instant>,
}

/// Submit `n` choices of `prompt` (choice `i` samples with seed + `i`) and wait until the engine
/// has accepted or refused each.
pub async fn start(
    state: &AppState,
    model: &Arc<Model>,
    prompt: Vec<u32>,
    opts: GenerateOptions,
    n: usize,
    cache_scope: u64,
) -> Result<Job, ApiError> {
    let slots = model.reserve(n)?;
    let mut job = Job {
        replies: Vec::with_capacity(n),
        pending: VecDeque::new(),
        aborts: Vec::with_capacity(n),
        last_token: vec![None; n],
        received: vec![0; n],
        turn: 0,
        live: n,
        prompt_tokens: prompt.len(),
        cache_scope,
        _slots: slots,
        state: state.clone(),
        first_token: None,
    };
    for i in 0..n {
        let id = state.next_request_id();
        let (reply, from_engine) = mpsc::unbounded_channel::<Event>();
        let mut opts = opts.clone();
        opts.seed = opts.seed.wrapping_add(i as u64);
        opts.params.seed = opts.params.seed.map(|s| s.wrapping_add(i as u64));
        let req = Request {
            id,
            prompt: prompt.clone(),
            opts,
            adapter: model.adapter.clone(),
            cache_scope,
            reply,
        };
        model
            .engine
            .send(Command::Submit(Box::new(req)))
            .map_err(|_| engine_gone())?;
        job.replies.push(from_engine);
        job.aborts.push(AbortOnDrop {
            id,
            engine: model.engine.clone(),
            done: false,
        });
    }
    let mut started = vec![false; n];
    while started.iter().any(|s| !s) {
        let (i, ev) = job.recv().await;
        if let Event::Error(e) = ev {
            return Err(refusal(model, e));
        }
        started[i] = true;
        job.pending.push_back((i, ev));
    }
    Ok(job)
}

/// An engine refusal as the client sees it.
fn refusal(model: &Model, e: EngineError) -> ApiError {
    match e.kind {
        ErrorKind::Request => ApiError::invalid(e.message, None),
        ErrorKind::Capacity => {
            let retry = model.retry_after_secs();
            let mut err = ApiError::server(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "`{}` has no room for this request now: {}; retry after {retry} s",
                    model.id, e.message
                ),
            );
            err.headers.push(("retry-after", retry.to_string()));
            err
        }
        ErrorKind::Internal => ApiError::server(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("generation failed: {}", e.message),
        ),
    }
}

fn engine_gone() -> ApiError {
    ApiError::server(
        StatusCode::SERVICE_UNAVAILABLE,
        "the engine has stopped (the server is shutting down or the model failed): restart `ferrolm serve`",
    )
}

impl Job {
    /// The next event of any choice whose last event has not arrived yet.
    async fn recv(&mut self) -> (usize, Event) {
        let n = self.replies.len();
        let (replies, aborts, turn) = (&mut self.replies, &mut self.aborts, &mut self.turn);
        std::future::poll_fn(|cx| {
            for k in 0..n {
                let i = (*turn + k) % n;
                if aborts[i].done {
                    continue;
                }
                let ev = match replies[i].poll_recv(cx) {
                    Poll::Pending => continue,
                    Poll::Ready(Some(ev)) => ev,
                    // The engine dropped the request without a last event: it is gone.
                    Poll::Ready(None) => {
                        Event::Error(EngineError::new(ErrorKind::Internal, engine_gone().message))
                    }
                };
                if matches!(ev, Event::Finished { .. } | Event::Error(_)) {
                    aborts[i].done = true;
                }
                *turn = i + 1;
                return Poll::Ready((i, ev));
            }
            Poll::Pending
        })
        .await
    }

    /// The next event of any choice; `None` once every choice has ended.
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
                self.received[i] += 1;
                if let Some(prev) = self.last_token[i].replace(now) {
                    self.state.metrics.inter_token((now - prev).as_secs_f64());
                }
            }
            Event::Finished { .. } | Event::Error(_) => self.live -= 1,
        }
        Some((i, ev))
    }

    pub fn choices(&self) -> usize {
        self.aborts.len()
    }

    /// Submit choice `i` again, whose last event has arrived, with a new prompt (a lazy tool
    /// loading round). Its events then come from the new request; a refusal arrives as its
    /// `Event::Error`.
    fn resubmit(
        &mut self,
        i: usize,
        model: &Model,
        prompt: Vec<u32>,
        opts: GenerateOptions,
    ) -> Result<(), ApiError> {
        let id = self.state.next_request_id();
        let (reply, from_engine) = mpsc::unbounded_channel::<Event>();
        self.prompt_tokens = prompt.len();
        let req = Request {
            id,
            prompt,
            opts,
            adapter: model.adapter.clone(),
            cache_scope: self.cache_scope,
            reply,
        };
        model
            .engine
            .send(Command::Submit(Box::new(req)))
            .map_err(|_| engine_gone())?;
        self.replies[i] = from_engine;
        self.aborts[i] = AbortOnDrop {
            id,
            engine: model.engine.clone(),
            done: false,
        };
        // The gap while the next pass is prefilled is not an inter-token latency.
        self.last_token[i] = None;
        self.live += 1;
        Ok(())
    }

    /// Abort every choice still running and read up to each one's last event (the engine
    /// answers an abort with `Finished` / `Cancelled` and what the choice used).
    async fn cancel(&mut self, choices: &mut [ChoiceState]) {
        for a in &self.aborts {
            if !a.done {
                let _ = a.engine.send(Command::Abort(a.id));
            }
        }
        while let Some((i, ev)) = self.next().await {
            if let Event::Finished { usage, .. } = ev {
                choices[i].ended(usage);
            }
        }
    }
}

/// One token as reported back: id, chosen logprob, top alternatives.
pub type TokenInfo = (u32, Option<f32>, Vec<(u32, f32)>);

/// One whole choice, for non-streaming answers.
#[derive(Debug)]
pub struct Choice {
    /// The reply's text (with tools: the prose around the calls; `None`: calls only).
    pub content: Option<String>,
    pub calls: Vec<Call>,
    pub tokens: Vec<TokenInfo>,
    pub reason: FinishReason,
    /// `tool_calls` when the reply holds calls, else the finish reason's name.
    pub finish: &'static str,
    /// Seconds from admission to the first token (engine side).
    pub time_to_first_token: f64,
}

/// How one response format renders the pipeline's output. Streaming methods return the body
/// items to send (SSE events, NDJSON lines); [`Format::whole`] builds the non-streamed answer.
pub trait Format: Send + 'static {
    type Item: Send + 'static;
    /// Choice `i` started (OpenAI chat sends the assistant role first).
    fn start(&mut self, i: usize) -> Vec<Self::Item>;
    /// Text of choice `i` that is certainly content (may be empty), with the token that
    /// released it unless tool hold-back is capturing.
    fn text(&mut self, i: usize, text: String, token: Option<TokenInfo>) -> Vec<Self::Item>;
    /// The tool calls of choice `i`, with the prose held back alongside them.
    fn calls(&mut self, i: usize, content: Option<String>, calls: &[Call]) -> Vec<Self::Item>;
    /// Choice `i` ended: `finish` is its reported finish reason (`tool_calls` when it called).
    fn finish(
        &mut self,
        i: usize,
        reason: FinishReason,
        finish: &'static str,
        usage: &Usage,
        time_to_first_token: f64,
    ) -> Vec<Self::Item>;
    /// Every choice ended and the request is settled (usage trailers, `[DONE]`); `cost` is
    /// what the ledger charged (`None` when the row could not be written).
    fn end(&mut self, usage: &Usage, cost: Option<f64>) -> Vec<Self::Item>;
    /// A failure after the stream started.
    fn error(&mut self, message: String) -> Vec<Self::Item>;
    /// The response around a stream of items.
    fn stream_response(stream: ReceiverStream<Self::Item>) -> Response;
    /// The non-streamed answer.
    fn whole(&self, choices: Vec<Choice>, usage: &Usage) -> Value;
}

/// A started request and everything its settlement needs.
pub struct Run {
    pub state: AppState,
    pub caller: Caller,
    pub ticket: Ticket,
    pub levers: Levers,
    pub model: Arc<Model>,
    pub endpoint: &'static str,
    pub tools: Option<Tools>,
    /// Set when the tools load lazily: how to generate again after a `load_tools` call.
    pub resume: Option<Resume>,
    pub job: Job,
    /// The client's connection (to notice, for a JSON answer, that it went away).
    pub conn: Option<ClientConn>,
}

/// What a run needs to generate again after the model loaded tools.
pub struct Resume {
    /// The conversation the first pass rendered, as the request gave it.
    pub messages: Value,
    /// The request's context strategy (the longer conversation may need it).
    pub strategy: compress::Strategy,
    /// The first pass's options: sampling, stops, and its `max_tokens`, which bounds what every
    /// pass together generates.
    pub opts: GenerateOptions,
    /// The turns the rounds added (each call and its definitions).
    pub turns: Vec<Value>,
}

impl Resume {
    pub fn new(messages: Value, strategy: compress::Strategy, opts: GenerateOptions) -> Resume {
        Resume {
            messages,
            strategy,
            opts,
            turns: Vec::new(),
        }
    }
}

/// What a choice's finished pass turned out to be.
enum Reply {
    /// A `load_tools` round goes on; `prose` is what the reply said before its call.
    Continues { prose: Option<String> },
    /// The answer: its text and calls (never a `load_tools` call).
    Done {
        content: Option<String>,
        calls: Vec<Call>,
    },
}

/// What the pipeline keeps per choice.
#[derive(Default)]
struct ChoiceState {
    started: bool,
    hold: Option<HoldBack>,
    text: String,
    tokens: Vec<TokenInfo>,
    usage: Option<Usage>,
    /// The usage of its passes before the current one (lazy tool loading rounds).
    carried: Usage,
    /// What earlier passes said before their `load_tools` calls (JSON answers).
    prose: String,
    /// The answer, once its last pass ended (JSON answers).
    answer: Option<(Option<String>, Vec<Call>)>,
    reason: Option<FinishReason>,
    finish: Option<&'static str>,
    ttft: Option<f64>,
}

impl ChoiceState {
    /// The choice ended with its last pass's `usage`.
    fn ended(&mut self, usage: Usage) {
        self.usage = Some(add_usage(self.carried, usage));
    }
}

fn add_usage(a: Usage, b: Usage) -> Usage {
    Usage {
        prompt_tokens: a.prompt_tokens + b.prompt_tokens,
        cached_tokens: a.cached_tokens + b.cached_tokens,
        completion_tokens: a.completion_tokens + b.completion_tokens,
    }
}

/// How a run ended, for the ledger.
enum Ending {
    Finished,
    ClientGone,
    Failed(String),
}

impl Run {
    fn states(&self) -> Vec<ChoiceState> {
        (0..self.job.choices())
            .map(|_| ChoiceState {
                hold: self.tools.as_ref().map(|_| HoldBack::default()),
                ..ChoiceState::default()
            })
            .collect()
    }

    /// Write the ledger row; returns the cost, or the error to answer when the ledger could not
    /// be written. `sent`: the answer is already out (a stream), so such a row is held.
    fn settle(
        &self,
        choices: &[ChoiceState],
        ending: &Ending,
        sent: bool,
    ) -> Result<f64, ApiError> {
        let usage = total_usage(choices.iter().enumerate().map(|(i, c)| {
            c.usage.unwrap_or(Usage {
                prompt_tokens: c.carried.prompt_tokens + self.job.prompt_tokens,
                cached_tokens: c.carried.cached_tokens,
                completion_tokens: self.job.received[i],
            })
        }));
        let status = match ending {
            Ending::Finished => 200,
            Ending::ClientGone => 499,
            Ending::Failed(_) => 500,
        };
        let finish = match ending {
            Ending::ClientGone => Some("cancelled"),
            _ => choices.last().and_then(|c| c.finish),
        };
        let mut s = self.levers.settled(
            &self.model,
            self.endpoint,
            usage,
            self.caller.ttft(self.job.first_token),
            finish,
        );
        s.status = status;
        s.sent = sent;
        self.state.settle(&self.caller, &self.ticket, s)
    }

    /// Feed one engine event through tool hold-back into `f`'s items.
    fn step<F: Format>(
        &self,
        f: &mut F,
        choices: &mut [ChoiceState],
        i: usize,
        ev: Event,
    ) -> Vec<F::Item> {
        let mut out = Vec::new();
        let c = &mut choices[i];
        if !std::mem::replace(&mut c.started, true) {
            out.extend(f.start(i));
        }
        match ev {
            Event::Token {
                id,
                text,
                logprob,
                top,
            } => {
                let text = match &mut c.hold {
                    Some(h) => h.push(&text),
                    None => text,
                };
                let held = c.hold.as_ref().is_some_and(HoldBack::capturing);
                out.extend(f.text(i, text, (!held).then_some((id, logprob, top))));
            }
            // `pump` ends a pass through `Run::reply` and `Run::finish`.
            Event::Finished { .. } => {}
            Event::Error(e) => out.extend(f.error(e.message)),
        }
        out
    }

    /// Choice `i`'s last pass ended with `reply`: its calls (or the rest of its text), and the
    /// end of the choice.
    fn finish<F: Format>(
        &self,
        f: &mut F,
        c: &mut ChoiceState,
        i: usize,
        reason: FinishReason,
        ttft: f64,
        (content, calls): (Option<String>, &[Call]),
    ) -> Vec<F::Item> {
        let mut out = Vec::new();
        let mut finish = finish_name(reason);
        if calls.is_empty() {
            if let Some(text) = content.filter(|t| !t.is_empty()) {
                out.extend(f.text(i, text, None));
            }
        } else {
            out.extend(f.calls(i, content, calls));
            finish = tools::finish_reason(calls, finish);
        }
        c.finish = Some(finish);
        let usage = c.usage.unwrap_or_default();
        out.extend(f.finish(i, reason, finish, &usage, c.ttft.unwrap_or(ttft)));
        out
    }

    /// A pass of choice `c` (index `i`) ended with `text` and `usage`: its answer, or, when it
    /// only called `load_tools` (and rounds and tokens are left), the next pass submitted.
    /// `Err`: the next pass could not start (the message says why).
    async fn reply(
        &mut self,
        c: &mut ChoiceState,
        i: usize,
        text: String,
        usage: Usage,
        ttft: f64,
    ) -> Result<Reply, String> {
        c.ttft.get_or_insert(ttft);
        let Some(t) = &mut self.tools else {
            c.ended(usage);
            return Ok(Reply::Done {
                content: Some(text),
                calls: Vec::new(),
            });
        };
        let (content, mut calls) = t.parse_reply(&text);
        let turns = t.loading(content.as_deref(), &mut calls);
        let (Some(turns), Some(r)) = (turns, &mut self.resume) else {
            c.ended(usage);
            return Ok(Reply::Done { content, calls });
        };
        c.carried = add_usage(c.carried, usage);
        let left = r
            .opts
            .max_tokens
            .saturating_sub(c.carried.completion_tokens);
        if left == 0 {
            // `max_tokens` is spent: the reply ends here (its finish reason says `length`).
            c.usage = Some(c.carried);
            return Ok(Reply::Done {
                content,
                calls: Vec::new(),
            });
        }
        r.turns.extend(turns);
        let mut messages = r.messages.as_array().cloned().unwrap_or_default();
        messages.extend(r.turns.iter().cloned());
        let (prompt, _) = fit_chat(
            &self.state,
            &self.model,
            &Value::Array(messages),
            t.for_prompt(),
            r.strategy,
            Some(left),
            None,
            self.job.cache_scope,
        )
        .await
        .map_err(|e| format!("after loading tools: {}", e.message))?;
        let room = self.model.max_context.saturating_sub(prompt.len());
        if room == 0 {
            return Err(format!(
                "after loading tools the prompt has {} tokens, more than the {} a request here may hold: load fewer tools, or restart `ferrolm serve` with a larger --ctx",
                prompt.len(),
                self.model.max_context
            ));
        }
        let mut opts = r.opts.clone();
        opts.max_tokens = left.min(room);
        opts.grammar = t.grammar_after_load().map_err(|e| e.message)?.map(Arc::new);
        self.job
            .resubmit(i, &self.model, prompt, opts)
            .map_err(|e| e.message)?;
        Ok(Reply::Continues { prose: content })
    }
}

/// Answer a started request in `format`, streamed or as one JSON object, with the ticket's
/// headers (and, for JSON, the cost).
pub async fn respond<F: Format>(run: Run, format: F, stream: bool) -> Result<Response, ApiError> {
    let headers = run.ticket.headers.clone();
    if stream {
        return Ok(with_headers(
            F::stream_response(pump(run, format)),
            &headers,
            None,
        ));
    }
    let (done, answer) = oneshot::channel();
    tokio::spawn(collect(run, format, done));
    match answer.await {
        Ok(Ok((body, cost))) => Ok(with_headers(
            axum::Json(body).into_response(),
            &headers,
            Some(cost),
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ApiError::server(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request's task ended without an answer",
        )),
    }
}

type Answer = Result<(Value, f64), ApiError>;

/// Run every choice to its end (or until the handler, or the client's socket, is gone), settle,
/// and send the whole answer to the handler.
async fn collect<F: Format>(mut run: Run, format: F, mut done: oneshot::Sender<Answer>) {
    let mut choices = run.states();
    let conn = run.conn.take();
    let ending = {
        let gone = async {
            match &conn {
                Some(c) => tokio::select! {
                    _ = done.closed() => {},
                    _ = c.gone() => {},
                },
                None => done.closed().await,
            }
        };
        tokio::pin!(gone);
        loop {
            let ev = tokio::select! {
                _ = &mut gone => break Ending::ClientGone,
                ev = run.job.next() => ev,
            };
            let Some((i, ev)) = ev else {
                break Ending::Finished;
            };
            let c = &mut choices[i];
            match ev {
                Event::Token {
                    id,
                    text,
                    logprob,
                    top,
                } => {
                    c.text.push_str(&text);
                    c.tokens.push((id, logprob, top));
                }
                Event::Finished {
                    reason,
                    usage,
                    time_to_first_token,
                    ..
                } => {
                    let text = std::mem::take(&mut c.text);
                    match run.reply(c, i, text, usage, time_to_first_token).await {
                        Ok(Reply::Continues { prose }) => {
                            c.prose.push_str(prose.as_deref().unwrap_or_default());
                            // Logprobs cover the answer's pass.
                            c.tokens.clear();
                        }
                        Ok(Reply::Done { content, calls }) => {
                            c.answer = Some((content, calls));
                            c.reason = Some(reason);
                            c.finish = Some(finish_name(reason));
                        }
                        Err(m) => break Ending::Failed(m),
                    }
                }
                Event::Error(e) => break Ending::Failed(e.message),
            }
        }
    };
    if !matches!(ending, Ending::Finished) {
        run.job.cancel(&mut choices).await;
    }
    let mut whole = Vec::with_capacity(choices.len());
    for c in &mut choices {
        let (content, calls) = match c.answer.take() {
            Some(a) => a,
            // Cut short: what it had said.
            None => {
                let text = std::mem::take(&mut c.text);
                match &run.tools {
                    Some(t) => {
                        let (content, mut calls) = t.parse_reply(&text);
                        calls.retain(|c| c.name != tools::LOAD_TOOLS);
                        (content, calls)
                    }
                    None => (Some(text), Vec::new()),
                }
            }
        };
        let content = match (std::mem::take(&mut c.prose), content) {
            (p, c) if p.is_empty() => c,
            (p, None) => Some(p),
            (p, Some(c)) => Some(p + &c),
        };
        let reason = c.reason.unwrap_or(FinishReason::Cancelled);
        if !calls.is_empty() {
            c.finish = Some(tools::finish_reason(
                &calls,
                c.finish.unwrap_or(finish_name(reason)),
            ));
        }
        whole.push(Choice {
            content,
            calls,
            tokens: std::mem::take(&mut c.tokens),
            reason,
            finish: c.finish.unwrap_or(finish_name(reason)),
            time_to_first_token: c.ttft.unwrap_or_default(),
        });
    }
    let settled = run.settle(&choices, &ending, false);
    let answer = match (ending, settled) {
        (Ending::Failed(m), _) => Err(ApiError::server(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("generation failed: {m}"),
        )),
        (_, Err(e)) => Err(e),
        (_, Ok(cost)) => {
            let usage = total_usage(choices.iter().map(|c| c.usage.unwrap_or_default()));
            Ok((format.whole(whole, &usage), cost))
        }
    };
    let _ = done.send(answer);
}

/// Stream a run through `format`. Stops as soon as the client disconnects (its choices are
/// aborted and what they computed is billed).
fn pump<F: Format>(run: Run, mut format: F) -> ReceiverStream<F::Item> {
    let (tx, rx) = mpsc::channel::<F::Item>(32);
    tokio::spawn(async move {
        let mut run = run;
        let mut choices = run.states();
        let ending = 'run: loop {
            let ev = tokio::select! {
                _ = tx.closed() => break Ending::ClientGone,
                ev = run.job.next() => ev,
            };
            let Some((i, ev)) = ev else {
                break Ending::Finished;
            };
            let mut failed = match &ev {
                Event::Error(e) => Some(e.message.clone()),
                _ => None,
            };
            let finished = match &ev {
                Event::Finished {
                    reason,
                    usage,
                    time_to_first_token,
                    ..
                } => Some((*reason, *usage, *time_to_first_token)),
                _ => None,
            };
            let mut items = run.step(&mut format, &mut choices, i, ev);
            if let Some((reason, usage, time_to_first_token)) = finished {
                let c = &mut choices[i];
                let held = c.hold.as_mut().map(HoldBack::finish).unwrap_or_default();
                match run.reply(c, i, held, usage, time_to_first_token).await {
                    Ok(Reply::Continues { prose }) => {
                        if let Some(p) = prose.filter(|p| !p.is_empty()) {
                            items.extend(format.text(i, p, None));
                        }
                        c.hold = Some(HoldBack::default());
                    }
                    Ok(Reply::Done { content, calls }) => items.extend(run.finish(
                        &mut format,
                        c,
                        i,
                        reason,
                        time_to_first_token,
                        (content, &calls),
                    )),
                    Err(m) => {
                        items.extend(format.error(m.clone()));
                        failed = Some(m);
                    }
                }
            }
            for item in items {
                if tx.send(item).await.is_err() {
                    break 'run Ending::ClientGone;
                }
            }
            if let Some(m) = failed {
                break Ending::Failed(m);
            }
        };
        if !matches!(ending, Ending::Finished) {
            run.job.cancel(&mut choices).await;
        }
        // The tokens are already sent: a ledger that cannot be written holds the row (see
        // `AppState::settle`), so the stream's end is not turned into an error.
        let cost = run.settle(&choices, &ending, true).ok();
        if matches!(ending, Ending::Finished) {
            let usage = total_usage(choices.iter().map(|c| c.usage.unwrap_or_default()));
            for item in format.end(&usage, cost) {
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Run a job of one choice to its end and return its text (the server's own requests, such as
/// conversation summaries: no ledger row).
pub async fn text_of(mut job: Job) -> Result<String, ApiError> {
    let mut text = String::new();
    while let Some((_, ev)) = job.next().await {
        match ev {
            Event::Token { text: t, .. } => text.push_str(&t),
            Event::Finished { .. } => {}
            Event::Error(e) => {
                return Err(ApiError::server(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("generation failed: {}", e.message),
                ))
            }
        }
    }
    Ok(text)
}

/// The usage of `n` choices of one prompt: the prompt once, completions summed.
pub fn total_usage(us: impl Iterator<Item = Usage>) -> Usage {
    let mut total = Usage::default();
    for (i, u) in us.enumerate() {
        if i == 0 {
            total.prompt_tokens = u.prompt_tokens;
            total.cached_tokens = u.cached_tokens;
        }
        total.completion_tokens += u.completion_tokens;
    }
    total
}

/// OpenAI's and Ollama's name for a finish reason.
pub fn finish_name(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

/// Add the rate-limit (and, once known, cost) headers to a response.
pub fn with_headers(
    mut r: Response,
    headers: &[(&'static str, String)],
    cost: Option<f64>,
) -> Response {
    let mut set = |k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            r.headers_mut().insert(HeaderName::from_static(k), v);
        }
    };
    for (k, v) in headers {
        set(k, v.clone());
    }
    if let Some(c) = cost {
        set("x-ferrolm-cost-usd", format!("{c:.8}"));
    }
    r
}

/// A client's TCP connection, as a handler sees it: a duplicate of the socket's descriptor, so
/// that a handler preparing a JSON answer can notice that the client closed the connection
/// (hyper only notices when it next writes, which for a JSON answer is after the last token).
#[derive(Clone)]
pub struct ClientConn {
    fd: Option<Arc<OwnedFd>>,
}

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for ClientConn {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        ClientConn::of(stream.io())
    }
}

impl ClientConn {
    /// The connection `stream` (`crate::serve` puts it in each of its requests' extensions).
    pub fn of(stream: &tokio::net::TcpStream) -> ClientConn {
        ClientConn {
            fd: stream.as_fd().try_clone_to_owned().ok().map(Arc::new),
        }
    }

    /// Resolves once the peer has closed the connection (end of stream or an error on the
    /// socket). Never resolves while the connection is open, or when the client has already
    /// sent its next request (pipelining: that client is still there).
    pub fn gone(&self) -> impl Future<Output = ()> + Send + 'static {
        let fd = self.fd.as_ref().and_then(|f| f.try_clone().ok());
        async move {
            let Some(fd) = fd else {
                return std::future::pending().await;
            };
            let std = std::net::TcpStream::from(fd);
            let sock = match std
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(std))
            {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
            let mut b = [0u8; 1];
            match sock.peek(&mut b).await {
                Ok(0) | Err(_) => {}
                Ok(_) => std::future::pending().await,
            }
        }
    }
}
