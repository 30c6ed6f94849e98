//! `ferrolm serve`: an OpenAI- and Ollama-compatible HTTP API in front of one engine per model.
//!
//! Contract: the server never touches tensors. A handler validates the JSON, renders the chat
//! template, tokenizes, and submits [`ferrolm_engine::Request`]s (one per choice), each carrying
//! its own reply channel, to the model's engine thread; it then turns the events that come back
//! into a JSON answer, an SSE stream (OpenAI) or NDJSON lines (Ollama). Stop strings and
//! incremental detokenization happen in the engine's text stream; JSON schemas and forced tool
//! calls become a grammar the engine enforces token by token. A client that disconnects
//! mid-stream aborts its requests in the engine.
//!
//! Every request passes [`auth::layer`] first: a request id (echoed in `x-request-id`), the
//! caller's API key when the store has keys, and an access-log line. Handlers then ask
//! [`AppState::admit`] for a [`Ticket`] (budget and rate limits, with OpenAI's `x-ratelimit-*`
//! headers; the request's worst-case cost is reserved against the key's budget until it is
//! settled), start the job and hand it to the one request pipeline (`generate::respond`) with
//! their response format; the pipeline ends every admitted request in [`AppState::settle`],
//! which prices it, writes the ledger row and updates `/metrics`.
//!
//! The ledger fails closed: a JSON answer whose row cannot be written is a 503 instead (nothing
//! served unrecorded). A stream has already sent its tokens when it ends, so its row is held in
//! memory and written once the ledger can be written again; until then every new request is
//! refused with a 503 that names the data dir.
//!
//! `/` and `/ui/*` serve the web UI (`ui`): static files compiled in, which call the same API.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, StatusCode, Uri};
use axum::routing::{delete, get, post};
use axum::Router;
use ferrolm_accounting::{
    Budgets, KeyInfo, ModelPrice, PriceCatalog, RateLimiter, Refusal, Reservation, Store, UsageRow,
};
use ferrolm_engine::{Adapter, Command, EngineStats, GenerateOptions, Usage};
use ferrolm_grammar::Grammar;
use ferrolm_sample::SamplingParams;
use ferrolm_tokenizer::{chat::ChatTemplate, Tokenizer};
use serde::Deserialize;
use serde_json::Value;

pub mod adapters;
mod auth;
pub mod blobs;
pub mod compress;
pub mod embeddings;
pub mod error;
mod files;
mod fine_tuning;
mod generate;
mod keys;
mod metrics;
mod ollama;
mod openai;
mod preferences;
mod responses;
mod rewards;
pub mod route;
pub mod stored;
pub mod tools;
pub mod tuner;
mod ui;
pub mod upstream;
mod validate;

pub use auth::Caller;
pub use error::ApiError;
pub use metrics::Metrics;
pub use openai::logprobs_content;

/// Largest request body accepted: a larger one (up to [`MAX_READ_BYTES`]) is read and refused
/// with a 413 that says so.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Bodies beyond this are cut off while being read (the connection is closed after the 413).
/// Reading up to it first lets clients that send the whole body before reading (most do) see
/// the JSON error instead of a reset connection.
pub const MAX_READ_BYTES: usize = 64 * 1024 * 1024;

/// What `/api/show` and `/api/ps` report about a model.
#[derive(Debug, Clone, Default)]
pub struct ModelDetails {
    /// GGUF `general.architecture`, e.g. `llama`.
    pub architecture: String,
    pub parameter_count: u64,
    /// The dominant weight type, e.g. `Q4_1`.
    pub quantization: String,
    pub context_length: usize,
    pub embedding_length: usize,
    pub block_count: usize,
    pub head_count: usize,
    pub head_count_kv: usize,
    /// Weights plus KV pool, in bytes.
    pub memory_bytes: u64,
    /// The quality receipt `ferrolm quantize` stored in the file (`ferrolm.quantize.*`, keys
    /// without the prefix: kld_mean, kld_p99, top1_agreement, ppl, ppl_base, tokens, source,
    /// calibration); empty when the file has none.
    pub quantize_receipt: serde_json::Map<String, serde_json::Value>,
}

/// A model the server answers for: text-side pieces, plain numbers and its engine's sender.
pub struct ServedModel {
    /// The id clients name, e.g. `smollm2-135m-instruct`.
    pub id: String,
    /// Other names accepted for it (from the config file).
    pub aliases: Vec<String>,
    /// The GGUF file name, also accepted as a model name.
    pub file_name: String,
    pub file_size: u64,
    /// Unix seconds (the file's modification time).
    pub created: u64,
    pub tok: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
    /// Ids that end a reply (EOS, end of turn).
    pub end_ids: Vec<u32>,
    pub vocab_size: usize,
    /// Most tokens (prompt + completion) one request may hold: the model's context or the KV
    /// pool, whichever is smaller.
    pub max_context: usize,
    pub details: ModelDetails,
    pub engine: Sender<Command>,
    pub stats: Arc<EngineStats>,
    /// Requests running at once in the engine (its `max_running`).
    pub max_running: usize,
    /// Requests that may wait beyond those; past it the server answers 429 with `Retry-After`.
    pub max_queue: usize,
    /// What to do with a conversation longer than the context (requests may override it).
    pub context_strategy: compress::Strategy,
    /// The strategy (other than `error`) applies once prompt + reply would pass this fraction
    /// of the context, in (0, 1].
    pub context_trigger: f64,
    /// How tool definitions go into its prompts (requests may override it).
    pub tool_strategy: tools::ToolStrategy,
    /// Its price: a catalog entry (self-hosted ones are priced from hardware $/hour and
    /// measured throughput); `None` prices it at zero and says so in the ledger's cost.
    pub price: Option<ModelPrice>,
    /// The LoRA adapter its requests run with on the engine's base model (see [`adapters`]).
    pub adapter: Option<Arc<Adapter>>,
    /// The base model's id, for an adapter.
    pub parent: Option<String>,
}

/// A served model plus the counters the server keeps for it.
pub struct Model {
    pub m: ServedModel,
    /// The key a fine-tuned model belongs to: only it sees and uses the model. `None`: every
    /// caller (the models the server started with, and those tuned while it ran without keys).
    pub owner: Option<i64>,
    /// Its engine's queue, shared by the base model and its adapters.
    queue: Arc<Queue>,
}

/// What the server counts of one engine's requests.
#[derive(Default)]
struct Queue {
    /// Choices submitted to the engine and not yet finished.
    in_flight: AtomicUsize,
    /// Seconds of the most recent finished requests, for `Retry-After` estimates (EWMA, µs).
    avg_request_us: AtomicU64,
}

impl std::ops::Deref for Model {
    type Target = ServedModel;
    fn deref(&self) -> &ServedModel {
        &self.m
    }
}

/// How the server guards its routes.
pub struct Access {
    /// The key store and usage ledger (`--data-dir`).
    pub store: Store,
    /// Serve without keys while the store has none (loopback binds, or explicitly allowed).
    pub open_without_keys: bool,
    /// Key name → the named cache scope it shares the prefix cache with (`[[cache_scope]]` in
    /// the serve config). A key in none has a scope of its own.
    pub cache_scopes: HashMap<String, String>,
    /// Which chat completions are kept (`store: true`, `--store-all`) and for how long.
    pub completions: stored::Policy,
}

impl Access {
    /// The prefix-cache namespace of a caller (see `Request::cache_scope`): 0 without a key (one
    /// tenant), else its named scope's, else its own key's.
    pub fn cache_scope(&self, key: Option<&KeyInfo>) -> u64 {
        let Some(k) = key else { return 0 };
        let h = match self.cache_scopes.get(&k.name) {
            Some(scope) => fnv1a(b"scope:".iter().copied().chain(scope.bytes())),
            None => fnv1a(format!("key:{}", k.id).into_bytes()),
        };
        h.max(1)
    }
}

/// Shared by every handler: the models, the key store and ledger, limits, metrics, ids.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    /// The models started with, then fine-tuned ones as their jobs succeed (read it with
    /// [`AppState::models`]).
    models: RwLock<Vec<Arc<Model>>>,
    /// Virtual models that route chat requests to one of their tiers.
    pub routers: Vec<route::Router>,
    /// Models served by other OpenAI-compatible servers.
    pub upstreams: Vec<Arc<upstream::Upstream>>,
    pub access: Access,
    pub limiter: RateLimiter,
    pub metrics: Metrics,
    pub catalog: PriceCatalog,
    /// Conversation summaries of the `summarize` context strategy.
    pub summaries: compress::SummaryCache,
    next_id: AtomicU64,
    pub started: Instant,
    /// Files and fine-tuning jobs, once [`AppState::start_fine_tuning`] ran.
    pub tuning: OnceLock<tuner::Tuner>,
    /// How adapters are read, once [`AppState::enable_adapters`] ran.
    adapters: OnceLock<adapters::AdapterLoading>,
    /// The embedding model, once [`AppState::enable_embeddings`] ran.
    pub embeddings: OnceLock<embeddings::EmbeddingModel>,
    /// Money held against budgets by requests in flight.
    budgets: Arc<Budgets>,
    /// Ledger rows of served requests that could not be written yet (disk full), oldest first.
    /// With their admissions in a shared store.
    held_rows: Mutex<Vec<(UsageRow, Option<i64>)>>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// What an admitted request carries to its end: the rate-limit headers, its token estimate and
/// the budget it holds (released when the last copy of the ticket is dropped, after settling).
#[derive(Clone)]
pub struct Ticket {
    pub headers: Vec<(&'static str, String)>,
    estimated: u64,
    _budget: Option<Arc<Reservation>>,
    /// Its admission in a shared store (limits kept in PostgreSQL), settled with its ledger row.
    admission: Option<i64>,
}

/// The most a request may use, checked at admission: its prompt, every choice's `max_tokens`,
/// and the price they are charged at.
pub struct Worst<'a> {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub price: Option<&'a ModelPrice>,
}

/// How a request ended, for the ledger and the metrics.
pub struct Settled<'a> {
    /// The id of the model that answered.
    pub model: &'a str,
    pub price: Option<&'a ModelPrice>,
    /// The local model, whose request-time average feeds `Retry-After` (none for upstreams).
    pub local: Option<&'a Model>,
    pub endpoint: &'static str,
    pub usage: Usage,
    /// Seconds from submission to the first token.
    pub ttft: Option<f64>,
    pub finish_reason: Option<&'static str>,
    /// Prompt tokens a context strategy removed.
    pub compressed_tokens: usize,
    /// Prompt tokens lazy tool loading saved: the prompt with every tool definition, minus the
    /// prompt tokens every pass ran (negative when the rounds cost more than they saved).
    pub lazy_tool_tokens: i64,
    /// The router that chose `model`, and its top tier's price.
    pub route: Option<(&'a str, Option<&'a ModelPrice>)>,
    /// The ledger's status: 200, 499 (the client went away), 500 (generation failed).
    pub status: u16,
    /// The answer has already been sent (a stream): a row that cannot be written is held and
    /// written later, rather than the answer refused.
    pub sent: bool,
}

/// What the cost levers did to one request, carried to its settlement.
#[derive(Clone, Default)]
pub struct Levers {
    /// Prompt tokens a context strategy removed.
    pub compressed_tokens: usize,
    /// With lazy tool loading: the first prompt's tokens had every tool definition been in it.
    pub eager_prompt_tokens: Option<usize>,
    /// The router that placed the request, and its top tier's price.
    pub route: route::Route,
}

impl Levers {
    /// How a request to a local model ended.
    pub fn settled<'a>(
        &'a self,
        model: &'a Model,
        endpoint: &'static str,
        usage: Usage,
        ttft: Option<f64>,
        finish_reason: Option<&'static str>,
    ) -> Settled<'a> {
        let mut s = self.settled_as(&model.id, model.price.as_ref(), endpoint, usage, ttft);
        s.local = Some(model);
        s.finish_reason = finish_reason;
        s
    }

    /// How a request to the model `id` (local or not) at `price` ended.
    pub fn settled_as<'a>(
        &'a self,
        id: &'a str,
        price: Option<&'a ModelPrice>,
        endpoint: &'static str,
        usage: Usage,
        ttft: Option<f64>,
    ) -> Settled<'a> {
        Settled {
            model: id,
            price,
            local: None,
            endpoint,
            usage,
            ttft,
            finish_reason: None,
            compressed_tokens: self.compressed_tokens,
            lazy_tool_tokens: self
                .eager_prompt_tokens
                .map_or(0, |e| e as i64 - usage.prompt_tokens as i64),
            route: self.route.as_ref().map(|(r, p)| (r.as_str(), p.as_ref())),
            status: 200,
            sent: false,
        }
    }
}

impl AppState {
    pub fn new(
        models: Vec<ServedModel>,
        upstreams: Vec<upstream::Upstream>,
        routers: Vec<route::Router>,
        access: Access,
        catalog: PriceCatalog,
    ) -> Self {
        AppState(Arc::new(Inner {
            routers,
            upstreams: upstreams.into_iter().map(Arc::new).collect(),
            models: RwLock::new(
                models
                    .into_iter()
                    .map(|m| Arc::new(Model::new(m, None)))
                    .collect(),
            ),
            access,
            limiter: RateLimiter::new(),
            metrics: Metrics::new(),
            catalog,
            summaries: compress::SummaryCache::default(),
            next_id: AtomicU64::new(1),
            started: Instant::now(),
            tuning: OnceLock::new(),
            adapters: OnceLock::new(),
            embeddings: OnceLock::new(),
            budgets: Budgets::new(),
            held_rows: Mutex::new(Vec::new()),
        }))
    }

    /// Serve `m` for `/v1/embeddings` and `/api/embed` (once; a second call is refused).
    pub fn enable_embeddings(&self, m: embeddings::EmbeddingModel) -> Result<(), String> {
        self.embeddings.set(m).map_err(|m| {
            format!(
                "an embedding model is already served; not adding `{}`",
                m.id
            )
        })
    }

    /// The models `key` may use (`None`: the caller has no key), in order.
    pub fn models(&self, key: Option<i64>) -> Vec<Arc<Model>> {
        self.all_models()
            .into_iter()
            .filter(|m| m.owner.is_none() || m.owner == key)
            .collect()
    }

    /// Every model, whoever owns it (for the operator's /metrics).
    pub fn all_models(&self) -> Vec<Arc<Model>> {
        self.models
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Serve one more model from now on (a fine-tuned one, for `owner` only).
    pub fn add_model(&self, m: ServedModel, owner: Option<i64>) {
        self.models
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::new(Model::new(m, owner)));
    }

    fn next_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The model a request of `key` names: its id, an alias, its file name, or any of them
    /// with Ollama's `:latest` tag; `None` (or an empty name) means the first model. Another
    /// key's fine-tuned model is unknown, as one that does not exist.
    pub fn model(&self, key: Option<i64>, asked: Option<&str>) -> Result<Arc<Model>, ApiError> {
        let models = self.models(key);
        let first = models.first().cloned();
        let Some(asked) = asked.filter(|a| !a.is_empty()) else {
            return first.ok_or_else(|| ApiError::unknown_model("", &[]));
        };
        let name = asked.strip_suffix(":latest").unwrap_or(asked);
        let find = |models: &[Arc<Model>]| {
            models
                .iter()
                .find(|m| {
                    name.eq_ignore_ascii_case(&m.id)
                        || name == m.file_name
                        || m.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
                })
                .cloned()
        };
        if let Some(m) = find(&models) {
            return Ok(m);
        }
        // A model fine-tuned on another replica: loaded from the blob store on first use.
        if name.starts_with("ft:") && self.load_tuned(key, name) {
            if let Some(m) = find(&self.models(key)) {
                return Ok(m);
            }
        }
        let ids: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
        Err(ApiError::unknown_model(asked, &ids))
    }

    /// The upstream model a request names, if it names one.
    pub fn upstream(&self, asked: Option<&str>) -> Option<Arc<upstream::Upstream>> {
        let name = asked?;
        let name = name.strip_suffix(":latest").unwrap_or(name);
        self.upstreams.iter().find(|u| u.answers_to(name)).cloned()
    }

    /// A local or upstream model by name (a router's tier: one every caller may use).
    pub fn target(&self, name: &str) -> Result<route::Target, ApiError> {
        match self.upstream(Some(name)) {
            Some(u) => Ok(route::Target::Upstream(u)),
            None => Ok(route::Target::Local(self.model(None, Some(name))?)),
        }
    }

    /// The router a request names, if it names one.
    pub fn router(&self, asked: Option<&str>) -> Option<&route::Router> {
        let asked = asked?;
        let name = asked.strip_suffix(":latest").unwrap_or(asked);
        self.routers
            .iter()
            .find(|r| r.id.eq_ignore_ascii_case(name))
    }

    /// Check a caller's budget and rate limits before any work, and reserve the request's
    /// worst case: its cost against the key's budget (see [`ferrolm_accounting::Budgets`]) and
    /// its tokens against the key's tpm (the estimate is replaced by the real count when the
    /// request settles). Refused with a 503 while ledger rows wait to be written.
    pub fn admit(&self, caller: &Caller, worst: Worst<'_>) -> Result<Ticket, ApiError> {
        self.flush_held_rows()?;
        let tokens = worst.prompt_tokens + worst.completion_tokens;
        let Some(key) = &caller.key else {
            return Ok(Ticket {
                headers: Vec::new(),
                estimated: tokens,
                _budget: None,
                admission: None,
            });
        };
        if self.access.store.is_shared() {
            return self.admit_shared(key, tokens, &worst);
        }
        let budget = match key.budget_usd {
            None => None,
            Some(budget) => {
                let worst_usd = worst.price.map_or(0.0, |p| {
                    p.cost_usd(worst.prompt_tokens, 0, worst.completion_tokens)
                });
                let held = self.held_cost(key.id);
                let r = self
                    .budgets
                    .reserve(key.id, budget, worst_usd, || {
                        self.access.store.spent_usd(key.id).map(|s| s + held)
                    })
                    .map_err(ApiError::storage)?;
                match r {
                    Ok(r) => Some(Arc::new(r)),
                    Err(over) => {
                        return Err(ApiError::budget_exhausted(
                            &key.name,
                            over.spent_usd + over.reserved_usd,
                            budget,
                        ))
                    }
                }
            }
        };
        match self.limiter.admit(key, tokens, Instant::now()) {
            Ok(h) => Ok(Ticket {
                headers: h.headers(),
                estimated: tokens,
                _budget: budget,
                admission: None,
            }),
            Err(l) => Err(ApiError::rate_limited(
                l.message(),
                l.retry_after_secs(),
                l.headers(),
            )),
        }
    }

    /// [`AppState::admit`] with a shared store: the key's limits and budget are decided in the
    /// database, in one transaction, so they hold across every replica (see
    /// `ferrolm_accounting::Store::admit`). A key with neither limit nor budget needs no
    /// admission.
    fn admit_shared(
        &self,
        key: &KeyInfo,
        tokens: u64,
        worst: &Worst<'_>,
    ) -> Result<Ticket, ApiError> {
        if key.rpm.is_none() && key.tpm.is_none() && key.budget_usd.is_none() {
            return Ok(Ticket {
                headers: Vec::new(),
                estimated: tokens,
                _budget: None,
                admission: None,
            });
        }
        let worst_usd = worst.price.map_or(0.0, |p| {
            p.cost_usd(worst.prompt_tokens, 0, worst.completion_tokens)
        });
        match self
            .access
            .store
            .admit(key, tokens, worst_usd)
            .map_err(ApiError::storage)?
        {
            Ok(a) => Ok(Ticket {
                headers: a.headroom.headers(),
                estimated: tokens,
                _budget: None,
                admission: Some(a.id),
            }),
            Err(Refusal::Limited(l)) => Err(ApiError::rate_limited(
                l.message(),
                l.retry_after_secs(),
                l.headers(),
            )),
            Err(Refusal::OverBudget {
                spent_usd,
                held_usd,
                budget_usd,
            }) => Err(ApiError::budget_exhausted(
                &key.name,
                spent_usd + held_usd,
                budget_usd,
            )),
            Err(Refusal::Revoked) => Err(ApiError::unauthorized(
                "the API key was revoked: ask for a new one (`ferrolm keys create`)",
            )),
        }
    }

    /// Write the rows held since the ledger last failed; a 503 while it still cannot be written.
    fn flush_held_rows(&self) -> Result<(), ApiError> {
        let mut held = self
            .held_rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while let Some((row, admission)) = held.first() {
            if let Err(e) = self.access.store.record_admitted(row, *admission) {
                return Err(ledger_unavailable(&self.access.store, e, held.len()));
            }
            held.remove(0);
        }
        Ok(())
    }

    /// The cost of `key_id`'s rows that wait to be written.
    fn held_cost(&self, key_id: i64) -> f64 {
        let held = self
            .held_rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        held.iter()
            .filter(|(r, _)| r.key_id == Some(key_id))
            .map(|(r, _)| r.cost_usd)
            .sum()
    }

    /// Price a finished request, write its ledger row and count it in the metrics. Returns the
    /// cost in USD, or, when the row cannot be written, the 503 to answer instead (for an
    /// answer already sent, `s.sent`, the row is held and written by a later admission).
    pub fn settle(
        &self,
        caller: &Caller,
        ticket: &Ticket,
        s: Settled<'_>,
    ) -> Result<f64, ApiError> {
        let u = &s.usage;
        let (prompt, cached, completion) = (
            u.prompt_tokens as u64,
            u.cached_tokens as u64,
            u.completion_tokens as u64,
        );
        let price = s.price;
        let cost = price.map_or(0.0, |p| p.cost_usd(prompt, cached, completion));
        // What each lever saved, at this model's price (routing: at the top tier's).
        let saved_by_cache = price.map_or(0.0, |p| p.cost_usd(prompt, 0, completion) - cost);
        let compressed = s.compressed_tokens as u64;
        let saved_by_compression = price.map_or(0.0, |p| {
            p.cost_usd(prompt + compressed, cached, completion) - cost
        });
        // The same request with every tool definition sent, in one pass.
        let lazy = s.lazy_tool_tokens;
        let saved_by_lazy_tools = price.map_or(0.0, |p| {
            let eager = (prompt as i64 + lazy).max(0) as u64;
            p.cost_usd(eager, cached.min(eager), completion) - cost
        });
        let saved_by_routing = s
            .route
            .and_then(|(_, top)| top)
            .map_or(0.0, |p| p.cost_usd(prompt, cached, completion) - cost);
        let used = (u.prompt_tokens + u.completion_tokens) as u64;
        if let (Some(key), None) = (&caller.key, ticket.admission) {
            self.limiter
                .settle(key.id, ticket.estimated, used, Instant::now());
        }
        let latency = caller.started.elapsed().as_secs_f64();
        if let Some(m) = s.local {
            let prev = m.queue.avg_request_us.load(Ordering::Relaxed);
            let now_us = (latency * 1e6) as u64;
            let avg = if prev == 0 {
                now_us
            } else {
                (prev * 7 + now_us) / 8
            };
            m.queue.avg_request_us.store(avg, Ordering::Relaxed);
        }
        self.metrics.finished(s.model, u, s.ttft, latency);
        // Made once here, kept by the row's retries (held rows): the ledger writes it once.
        let row_key =
            UsageRow::new_key().map_err(|e| ledger_unavailable(&self.access.store, e, 0))?;
        let row = UsageRow {
            ts: auth::unix_ms(),
            request_id: caller.request_id.clone(),
            key_id: caller.key.as_ref().map(|k| k.id),
            model: s.model.to_owned(),
            endpoint: s.endpoint.to_owned(),
            status: s.status,
            prompt_tokens: u.prompt_tokens as u64,
            cached_tokens: u.cached_tokens as u64,
            completion_tokens: u.completion_tokens as u64,
            latency_ms: latency * 1e3,
            ttft_ms: s.ttft.map(|t| t * 1e3),
            cost_usd: cost,
            finish_reason: s.finish_reason.map(str::to_owned),
            route: s.route.map(|(r, _)| r.to_owned()),
            compressed_tokens: compressed,
            lazy_tool_tokens: lazy,
            saved_by_lazy_tools_usd: if lazy == 0 { 0.0 } else { saved_by_lazy_tools },
            saved_by_cache_usd: saved_by_cache,
            saved_by_compression_usd: saved_by_compression,
            saved_by_routing_usd: saved_by_routing,
            row_key,
        };
        // Rows held earlier go first, so the ledger stays in order.
        let flushed = self.flush_held_rows();
        let written = match flushed {
            Ok(()) => self
                .access
                .store
                .record_admitted(&row, ticket.admission)
                .map_err(|e| ledger_unavailable(&self.access.store, e, 0)),
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => Ok(cost),
            Err(e) => {
                eprintln!(
                    "ferrolm serve: {}: could not write the usage ledger ({}); {}",
                    caller.request_id,
                    e.message,
                    if s.sent {
                        "the row is held until it can be written"
                    } else {
                        "the answer is refused"
                    }
                );
                if s.sent {
                    self.held_rows
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((row, ticket.admission));
                }
                Err(e)
            }
        }
    }
}

/// 503: the usage ledger cannot be written, so nothing more is served.
fn ledger_unavailable(store: &Store, e: impl std::fmt::Display, held: usize) -> ApiError {
    let fix = if store.is_shared() {
        format!("check that PostgreSQL runs at {}", store.path().display())
    } else {
        let dir = store
            .path()
            .parent()
            .map_or_else(String::new, |d| d.display().to_string());
        format!("free space (or fix permissions) in the data dir {dir}")
    };
    let mut err = ApiError::server(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "the usage ledger cannot be written ({e}){}: nothing is served unrecorded; {fix} and retry",
            if held > 0 {
                format!("; {held} rows of served requests wait to be written")
            } else {
                String::new()
            }
        ),
    );
    err.code = Some("ledger_unavailable");
    err.headers.push(("retry-after", "10".to_owned()));
    err
}

impl Model {
    fn new(m: ServedModel, owner: Option<i64>) -> Model {
        Model {
            m,
            owner,
            queue: Arc::default(),
        }
    }

    /// `adapter` on this (base) model, served as `id`: the same engine, queue, tokenizer,
    /// template and price.
    fn with_adapter(
        &self,
        id: String,
        aliases: Vec<String>,
        adapter: Arc<Adapter>,
        owner: Option<i64>,
    ) -> Model {
        let b = &self.m;
        let details = ModelDetails {
            memory_bytes: adapter.memory_bytes() as u64,
            ..b.details.clone()
        };
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Model {
            m: ServedModel {
                id,
                aliases,
                file_name: String::new(),
                file_size: adapter.memory_bytes() as u64,
                created,
                tok: b.tok.clone(),
                template: b.template.clone(),
                end_ids: b.end_ids.clone(),
                vocab_size: b.vocab_size,
                max_context: b.max_context,
                details,
                engine: b.engine.clone(),
                stats: b.stats.clone(),
                max_running: b.max_running,
                max_queue: b.max_queue,
                context_strategy: b.context_strategy,
                context_trigger: b.context_trigger,
                tool_strategy: b.tool_strategy,
                price: b.price.clone(),
                adapter: Some(adapter),
                parent: Some(b.id.clone()),
            },
            owner,
            queue: self.queue.clone(),
        }
    }

    /// Render OpenAI/Ollama-shaped messages (and tools) through the chat template and tokenize.
    pub(crate) fn chat_prompt(
        &self,
        messages: &Value,
        tools: Option<&Value>,
    ) -> Result<Vec<u32>, ApiError> {
        self.render_ids(&normalize_messages(messages)?, tools)
    }

    /// Render already normalized messages (and tools) and tokenize.
    fn render_ids(&self, messages: &Value, tools: Option<&Value>) -> Result<Vec<u32>, ApiError> {
        let knows_tools = tools::template_knows_tools(&self.template);
        let (messages, tools) = if knows_tools {
            (messages.clone(), tools)
        } else {
            (tools::inline_tools(messages.clone(), tools), None)
        };
        let rendered = self
            .template
            .render(&self.tok, &messages, true, tools)
            .map_err(|e| {
                ApiError::invalid(
                    format!("messages: the model's chat template rejected them: {e}"),
                    Some("messages"),
                )
            })?;
        self.tok
            .encode_chat(&rendered)
            .map_err(|e| ApiError::invalid(format!("messages: {e}"), Some("messages")))
    }

    /// How many tokens `text` is (no special tokens); a text the tokenizer rejects counts as
    /// endless.
    fn token_count(&self, text: &str) -> usize {
        self.tok
            .encode(text, false)
            .map_or(usize::MAX, |ids| ids.len())
    }

    /// A plain-text prompt: BOS (when the model wants one) + the text's ids.
    fn text_prompt(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        let tok = &self.tok;
        let mut ids: Vec<u32> = tok.bos_id.filter(|_| tok.add_bos).into_iter().collect();
        ids.extend(
            tok.encode(text, false)
                .map_err(|e| ApiError::invalid(format!("prompt: {e}"), Some("prompt")))?,
        );
        Ok(ids)
    }

    /// Finish a request's options: the prompt must leave room for at least one token, and an
    /// explicit `max_tokens` must fit the room left (never silently cut); validate the sampling
    /// parameters; pick a seed when none was given.
    fn options(
        &self,
        prompt: &[u32],
        params: SamplingParams,
        max_tokens: Option<usize>,
        stop: Vec<String>,
        grammar: Option<Arc<Grammar>>,
    ) -> Result<GenerateOptions, ApiError> {
        let limit = self.max_context;
        if prompt.len() >= limit {
            return Err(ApiError::invalid(
                format!(
                    "the prompt has {} tokens, {} more than the {} a request here may hold with room for one token of reply: shorten the prompt, or restart `ferrolm serve` with a larger --ctx (the model's own context, {}, is the upper bound)",
                    prompt.len(),
                    prompt.len() + 1 - limit,
                    limit,
                    self.details.context_length,
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
            Some(n) if n > room => {
                return Err(ApiError::invalid(
                    format!(
                        "max_tokens is {n}, but the prompt ({} tokens) leaves room for {room} in this model's {limit}-token context: ask for at most {room}",
                        prompt.len()
                    ),
                    Some("max_tokens"),
                )
                .with_code("context_length_exceeded"))
            }
            Some(n) => n,
            None => room,
        };
        params
            .validate(self.vocab_size)
            .map_err(|e| ApiError::invalid(e.to_string(), None))?;
        Ok(GenerateOptions {
            seed: params.seed.unwrap_or_else(random_seed),
            params,
            max_tokens,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            end_ids: self.end_ids.clone(),
            grammar,
        })
    }

    /// Seconds until the requests ahead in this model's queue should be done: the average
    /// request time times the waves of `max_running` queued.
    fn retry_after_secs(&self) -> u64 {
        let q = &self.queue;
        let prev = q.in_flight.load(Ordering::Relaxed);
        let avg = q.avg_request_us.load(Ordering::Relaxed) as f64 / 1e6;
        let waves = (prev as f64 / self.max_running.max(1) as f64)
            .ceil()
            .max(1.0);
        (avg * waves).ceil().clamp(1.0, 600.0) as u64
    }

    /// Reserve room for `n` more requests in the engine, or answer 429 with a `Retry-After`.
    fn reserve(self: &Arc<Self>, n: usize) -> Result<InFlight, ApiError> {
        let cap = self.max_running + self.max_queue;
        let q = &self.queue;
        let prev = q.in_flight.fetch_add(n, Ordering::AcqRel);
        if prev + n > cap {
            q.in_flight.fetch_sub(n, Ordering::AcqRel);
            let retry = self.retry_after_secs();
            return Err(ApiError::overloaded(&self.id, prev, cap, retry));
        }
        Ok(InFlight {
            queue: self.queue.clone(),
            n,
        })
    }
}

/// Requests counted against a model's queue; released when dropped.
pub struct InFlight {
    queue: Arc<Queue>,
    n: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.queue.in_flight.fetch_sub(self.n, Ordering::AcqRel);
    }
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, Deserialize)]
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
/// parts become one string; other keys (`tool_calls`, `tool_call_id`, `name`) pass through.
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
        validate::ollama_images(obj.get("images"), &format!("messages[{i}].images"))?;
        let content = match obj.get("content") {
            // An assistant turn that only calls tools has none; every other turn needs it.
            None | Some(Value::Null) if role == "assistant" => String::new(),
            None | Some(Value::Null) => {
                return Err(bad(format!(
                    "messages[{i}].content is missing or null: a {role} message needs content, a string or a list of text parts"
                )))
            }
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
    if body.len() > MAX_BODY_BYTES {
        return Err(ApiError::too_large(body.len()));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            format!("the request body is not valid JSON for this endpoint: {e}"),
            None,
        )
    })
}

fn random_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // splitmix64 finalizer over the clock and a counter: two calls in one clock tick differ.
    let mut z = t
        .wrapping_add(
            COUNTER
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x2545_F491),
        )
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 64-bit FNV-1a: a stable, non-cryptographic id (model digests, summary-cache keys).
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `e` in the shape of the API `uri` belongs to: Ollama's under `/api/`, else OpenAI's.
fn shaped(uri: &Uri, e: ApiError) -> axum::response::Response {
    use axum::response::IntoResponse;
    if uri.path().starts_with("/api/") {
        error::OllamaError(e).into_response()
    } else {
        e.into_response()
    }
}

async fn no_route(method: Method, uri: Uri) -> axum::response::Response {
    shaped(&uri, ApiError::no_route(method.as_str(), uri.path()))
}

async fn wrong_method(method: Method, uri: Uri) -> axum::response::Response {
    let e = ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::invalid(
            format!(
                "{} does not take {method}: GET the models, tags, version, health, metrics, files, stored chat completions and fine-tuning jobs, DELETE a file or a stored completion, POST the rest",
                uri.path()
            ),
            None,
        )
    };
    shaped(&uri, e)
}

/// Every route, on `state`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        .route("/v1/chat/completions", post(openai::chat).get(stored::list))
        .route("/v1/chat/completions/export", post(stored::export))
        .route(
            "/v1/chat/completions/{id}",
            get(stored::get_one)
                .post(stored::update)
                .delete(stored::delete),
        )
        .route("/v1/chat/completions/{id}/messages", get(stored::messages))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/responses", post(responses::create))
        .route("/v1/embeddings", post(embeddings::openai))
        .route("/v1/rewards", post(rewards::create))
        .route("/api/embed", post(embeddings::ollama))
        .route(
            "/v1/responses/{id}",
            get(responses::get_one).delete(responses::delete),
        )
        .route(
            "/v1/responses/{id}/input_items",
            get(responses::input_items_list),
        )
        .route("/v1/usage", get(auth::usage))
        .route("/v1/keys", get(keys::list).post(keys::create))
        .route("/v1/keys/{id}", delete(keys::revoke))
        .route("/v1/load_lora_adapter", post(adapters::load))
        .route("/v1/unload_lora_adapter", post(adapters::unload))
        .route(
            "/v1/files",
            get(files::list)
                .post(files::upload)
                .layer(DefaultBodyLimit::max(
                    // The file plus the multipart envelope around it.
                    files::MAX_FILE_BYTES + 64 * 1024,
                )),
        )
        .route("/v1/files/{id}", get(files::get_one).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route(
            "/v1/fine_tuning/jobs",
            get(fine_tuning::list).post(fine_tuning::create),
        )
        .route("/v1/fine_tuning/jobs/{id}", get(fine_tuning::get_one))
        .route("/v1/fine_tuning/jobs/{id}/events", get(fine_tuning::events))
        .route(
            "/v1/fine_tuning/jobs/{id}/checkpoints",
            get(fine_tuning::checkpoints),
        )
        .route(
            "/v1/fine_tuning/jobs/{id}/cancel",
            post(fine_tuning::cancel),
        )
        .route("/v1/fine_tuning/jobs/{id}/pause", post(fine_tuning::pause))
        .route(
            "/v1/fine_tuning/jobs/{id}/resume",
            post(fine_tuning::resume),
        )
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/ps", get(ollama::ps))
        .route("/api/version", get(ollama::version))
        .route(
            "/v1/preferences",
            get(preferences::get).post(preferences::append),
        )
        .route("/", get(ui::index))
        .route("/ui/{*file}", get(ui::asset))
        .route("/health", get(metrics::health))
        .route("/metrics", get(metrics::metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_READ_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::layer,
        ))
        .with_state(state)
}

/// What the server allows each connection (`ferrolm serve --header-timeout`,
/// `--max-connections`).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// The longest a connection may go without a complete request head: from its opening, and
    /// again from the end of each response (an idle keep-alive connection). Past it the
    /// connection is closed, so idle and slowly-sent-header (slowloris) connections cannot pile
    /// up.
    pub header_timeout: Duration,
    /// The most connections open at once; further ones wait in the listen queue.
    pub max_connections: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_timeout: Duration::from_secs(10),
            max_connections: 512,
        }
    }
}

/// Serve until `shutdown` resolves, then stop accepting, close idle connections and let
/// requests in flight finish.
///
/// Connections are driven by hyper's HTTP/1 builder (not `axum::serve`, which sets no header
/// timeout and no cap): each holds one of `limits.max_connections` permits, taken before it is
/// accepted, and hyper closes it when a request head takes longer than `limits.header_timeout`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: ConnLimits,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let app = router(state);
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    eprintln!("ferrolm serve: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // Each request carries its connection (`generate::ClientConn`), so a JSON answer can be
        // abandoned when its client closes the socket.
        let info = axum::extract::ConnectInfo(generate::ClientConn::of(&stream));
        let svc = TowerToHyperService::new(app.clone());
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
            req.extensions_mut().insert(info.clone());
            hyper::service::Service::call(&svc, req)
        });
        let conn = http.serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A connection's end (a timeout, a reset) is the client's business, not an error.
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
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

    #[test]
    fn fnv1a_matches_the_published_vectors() {
        assert_eq!(fnv1a(*b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(*b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(*b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn random_seeds_differ_within_one_clock_tick() {
        let a: Vec<u64> = (0..64).map(|_| random_seed()).collect();
        let mut b = a.clone();
        b.sort_unstable();
        b.dedup();
        assert_eq!(a.len(), b.len());
    }
}
