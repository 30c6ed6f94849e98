//! The continuous-batching engine: many requests share each forward pass.
//!
//! Contract: [`Engine::add`] queues a request (token ids + options + its own reply channel);
//! each [`Engine::step`] is `schedule → execute → update` (vLLM v1's `EngineCore.step`):
//!
//! * **schedule** — running requests first, then waiting ones, under a per-step token budget.
//!   There is no prefill or decode mode: a request's computed-token count simply catches up
//!   with its token count (a long prompt is prefilled in chunks across steps, mixed with other
//!   requests' decode tokens). A new request first takes whatever full blocks of its prompt are
//!   in the prefix cache ([`ferrolm_kv::KvCacheManager`]) and computes only the rest. When the
//!   pool is full a running request is preempted (its blocks freed, back to the front of the
//!   queue; it resumes from the prefix cache later) rather than failed.
//! * **execute** — one flat batch through the model; logits only for requests whose prompt is
//!   now fully computed.
//! * **update** — sample, detokenize incrementally, apply stop conditions, send each token on
//!   the request's channel, free the blocks of finished requests. A request whose receiver is
//!   gone (client disconnected) is dropped and its blocks freed.
//!
//! Speculative decoding ([`crate::speculate`], off by default): a greedy request that is
//! decoding may carry draft tokens — from prompt lookup (`EngineConfig::lookup`) or from a
//! draft model ([`Engine::with_draft`], run before the schedule) — as extra tokens of its span
//! in the same flat batch, with logits at each. Update samples them in order as one token per
//! step would and keeps the drafts up to the first mismatch; `num_computed` counts only those,
//! so the prefix cache never files a rejected draft, and blocks that held only rejected drafts
//! are released. The output is the same token for token (batch-invariant kernels).
//!
//! Reply channels are tokio's unbounded senders: `send` never blocks and needs no runtime, so
//! the engine thread writes straight into the server's async handler (no forwarding thread).
//! Every admitted request ends with exactly one last event: `Finished` (also for an aborted
//! one, with `FinishReason::Cancelled` and the tokens computed so far, so they can be billed)
//! or `Error`, whose [`ErrorKind`] says whose fault it was.
//!
//! The engine owns all of its state (STYLE principle 9); callers talk to it through channels.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ferrolm_grammar::{Matcher, Vocab};
use ferrolm_kv::{ComputedBlocks, KvCacheManager, RequestId};
use ferrolm_models::{Adapter, Batch, KvCache, KvType, Model, Scratch, SeqSpan};
use ferrolm_sample::{Rng, Sampler};
use ferrolm_tokenizer::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use crate::constrain::{self, MaskScratch};
use crate::session::{FinishReason, GenerateOptions, SessionError};
use crate::text::TextStream;

/// Sizes of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the pool (KV memory = blocks × block_size × `kv_type.bytes_per_token(cfg)`).
    pub num_blocks: usize,
    /// The element type of the KV cache (f16 by default).
    pub kv_type: KvType,
    /// Most tokens computed in one step (prefill chunks + decode tokens).
    pub max_batch_tokens: usize,
    /// Most requests running at once.
    pub max_running: usize,
    pub threads: usize,
    /// Prompt lookup decoding: up to this many draft tokens per greedy request and step, from
    /// its history's n-grams (0: off; see [`crate::speculate`]).
    pub lookup: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            block_size: 16,
            num_blocks: 512,
            kv_type: KvType::F16,
            max_batch_tokens: 512,
            max_running: 16,
            threads: 2,
            lookup: 0,
        }
    }
}

/// A request as the engine sees it: ids in, events out.
pub struct Request {
    pub id: RequestId,
    /// Prompt ids (BOS included when the model wants one).
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    /// The LoRA adapter to apply to this request's rows (`None`: the base model). Requests
    /// with different adapters share every batch but never a cached KV block.
    pub adapter: Option<Arc<Adapter>>,
    /// The tenant's prefix-cache namespace (0: the one shared namespace, e.g. a server without
    /// keys). Requests in different scopes never share a cached KV block, so one tenant cannot
    /// learn another's prompts from `cached_tokens` or from a faster first token.
    pub cache_scope: u64,
    pub reply: UnboundedSender<Event>,
}

/// A request's prefix-cache salt: its adapter (0: the base model) and its tenant's scope, mixed
/// into one `u64` (SplitMix64's finalizer). Base-model requests in scope 0 keep salt 0.
fn cache_salt(adapter: Option<&Adapter>, scope: u64) -> u64 {
    let uid = adapter.map_or(0, |a| a.uid());
    if scope == 0 {
        return uid;
    }
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    mix(uid.wrapping_add(0x9e37_79b9_7f4a_7c15) ^ mix(scope))
}

/// Usage of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

/// What a request's channel receives.
#[derive(Debug, Clone)]
pub enum Event {
    /// One generated token and the text it released (may be empty).
    Token {
        id: u32,
        text: String,
        logprob: Option<f32>,
        top: Vec<(u32, f32)>,
    },
    Finished {
        reason: FinishReason,
        usage: Usage,
        /// Seconds from admission to the first token.
        time_to_first_token: f64,
        /// A reward model's score of the prompt (a request whose adapter has a score head
        /// ends after its prompt with this, and generates nothing).
        score: Option<f32>,
    },
    /// The request could not run, or failed while running.
    Error(EngineError),
}

/// Whose fault a failed request is: it decides the HTTP status the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong (empty prompt, token outside the vocabulary, bad sampling
    /// parameters, an adapter that does not fit the model): retrying it will not help.
    Request,
    /// The engine has no room for it now (its KV pool is smaller than the prompt): another
    /// server, or a later retry after a restart with more KV memory, may take it.
    Capacity,
    /// The engine failed (a model or KV-cache error): not the caller's fault.
    Internal,
}

/// A request the engine refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    pub kind: ErrorKind,
    pub message: String,
}

impl EngineError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        EngineError {
            kind,
            message: message.into(),
        }
    }
}

/// Figures the engine publishes after every step for `/metrics` and `/api/ps`: plain atomics
/// written only by the engine thread (which still owns all of its state) and read by anyone.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub kv_blocks_free: AtomicU64,
    /// Bytes of K and V one block holds over all layers (set once, at start).
    pub kv_bytes_per_block: AtomicU64,
    pub prefix_queried_tokens: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    pub steps: AtomicU64,
    /// Tokens run through the model (prompt chunks + decode tokens + drafts).
    pub tokens_computed: AtomicU64,
    /// Draft tokens checked against the model (speculative decoding; those after a stop are not).
    pub draft_tokens: AtomicU64,
    /// Of those, tokens accepted.
    pub accepted_tokens: AtomicU64,
}

impl EngineStats {
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }
}

struct Seq {
    req: Request,
    /// Prompt followed by generated ids.
    tokens: Vec<u32>,
    num_computed: usize,
    cached_tokens: usize,
    generated: usize,
    rng: Rng,
    stream: TextStream,
    admitted: Instant,
    first_token: Option<f64>,
    /// Where the output stands in the request's grammar, if it has one.
    matcher: Option<Matcher>,
    /// Its prefix-cache namespace: [`cache_salt`] of its adapter and tenant scope.
    salt: u64,
    /// A reward model's score of the prompt, once computed.
    score: Option<f32>,
    /// Draft tokens this step verifies after `tokens` (see [`crate::speculate`]): never part
    /// of `tokens`, and its K/V slots past `num_computed` are overwritten later.
    drafts: Vec<u32>,
    /// Its prompt-lookup proposer.
    lookup: crate::speculate::Lookup,
}

impl Seq {
    /// Whether it is decoding: only its last (sampled) token is uncomputed.
    fn decoding(&self) -> bool {
        self.num_computed + 1 == self.tokens.len() && self.generated > 0
    }

    /// Send the request's last event: why it ended and what it used.
    fn finish(self, reason: FinishReason) {
        let _ = self.req.reply.send(Event::Finished {
            reason,
            usage: Usage {
                prompt_tokens: self.req.prompt.len(),
                cached_tokens: self.cached_tokens,
                completion_tokens: self.generated,
            },
            time_to_first_token: self.first_token.unwrap_or(0.0),
            score: self.score,
        });
    }
}

pub struct Engine {
    model: Arc<Model>,
    tok: Arc<Tokenizer>,
    cfg: EngineConfig,
    kv: KvCache,
    blocks: KvCacheManager,
    scratch: Scratch,
    sampler: Sampler,
    pool: Arc<rayon::ThreadPool>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    preemptions: u64,
    stats: Arc<EngineStats>,
    /// The vocabulary as bytes for grammars, built on the first request that has one.
    grammar_vocab: Option<Arc<Vocab>>,
    mask: MaskScratch,
    /// The draft model, when drafts come from one instead of prompt lookup.
    draft: Option<Draft>,
}

/// A draft model of the target's vocabulary with its own KV pool (as many blocks as the
/// target's; no prefix cache): before each step it proposes up to `k` tokens greedily for every
/// greedy request that is decoding, `k` forward passes over all of them at once.
struct Draft {
    model: Arc<Model>,
    k: usize,
    kv: KvCache,
    blocks: KvCacheManager,
    scratch: Scratch,
    /// Per request, the tokens whose K/V its draft cache holds (its history, then drafts).
    cached: HashMap<RequestId, Vec<u32>>,
}

/// What one step runs: (index into `running`, tokens computed this step).
type Plan = Vec<(usize, usize)>;

impl Engine {
    pub fn new(
        model: Arc<Model>,
        tok: Arc<Tokenizer>,
        cfg: EngineConfig,
    ) -> Result<Self, SessionError> {
        let blocks = KvCacheManager::new(cfg.block_size, cfg.num_blocks)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads.max(1))
            .thread_name(|i| format!("ferrolm-engine-{i}"))
            .build()
            .map_err(|e| SessionError::Threads {
                threads: cfg.threads,
                reason: e.to_string(),
            })?;
        let kv = KvCache::for_model(&model, cfg.kv_type, cfg.block_size, cfg.num_blocks)?;
        let stats = Arc::<EngineStats>::default();
        stats.kv_bytes_per_block.store(
            (kv.bytes_per_token() * cfg.block_size) as u64,
            Ordering::Relaxed,
        );
        Ok(Engine {
            kv,
            model,
            tok,
            cfg,
            blocks,
            scratch: Scratch::new(),
            sampler: Sampler::new(),
            pool: Arc::new(pool),
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
            stats,
            grammar_vocab: None,
            mask: MaskScratch::default(),
            draft: None,
        })
    }

    /// Draft greedy requests' tokens with `model` (same vocabulary, up to `k` per step) instead
    /// of prompt lookup; its KV cache has the engine's block size, block count and KV type.
    pub fn with_draft(mut self, model: Arc<Model>, k: usize) -> Result<Self, SessionError> {
        let (draft, target) = (model.cfg().vocab_size, self.model.cfg().vocab_size);
        if draft != target {
            return Err(SessionError::DraftVocab { draft, target });
        }
        let kv = KvCache::for_model(
            &model,
            self.cfg.kv_type,
            self.cfg.block_size,
            self.cfg.num_blocks,
        )?;
        self.draft = Some(Draft {
            model,
            k,
            kv,
            blocks: KvCacheManager::new(self.cfg.block_size, self.cfg.num_blocks)?,
            scratch: Scratch::new(),
            cached: HashMap::new(),
        });
        Ok(self)
    }

    /// Queue a request. Invalid ones are answered with [`Event::Error`] at once.
    pub fn add(&mut self, req: Request) {
        let capacity = self.cfg.num_blocks * self.cfg.block_size;
        let limit = capacity.min(self.model.cfg().context_length);
        let refuse = |m: String| Some(EngineError::new(ErrorKind::Request, m));
        let problem = if req.prompt.is_empty() {
            refuse("the prompt is empty".to_owned())
        } else if req.opts.max_tokens == 0 {
            refuse("max_tokens must be at least 1".to_owned())
        } else if req.prompt.len() >= self.model.cfg().context_length {
            refuse(format!(
                "the prompt has {} tokens but the model's context holds {}",
                req.prompt.len(),
                self.model.cfg().context_length
            ))
        } else if req.prompt.len() >= limit {
            Some(EngineError::new(
                ErrorKind::Capacity,
                format!(
                    "the prompt has {} tokens but the KV pool holds {}: restart with more KV memory",
                    req.prompt.len(),
                    capacity
                ),
            ))
        } else if let Some(&t) = req
            .prompt
            .iter()
            .find(|&&t| t as usize >= self.model.cfg().vocab_size)
        {
            refuse(format!("token id {t} is outside the vocabulary"))
        } else if let Some(e) = req
            .adapter
            .as_ref()
            .and_then(|a| self.model.check_adapter(a).err())
        {
            refuse(e.to_string())
        } else {
            req.opts
                .params
                .validate(self.model.cfg().vocab_size)
                .err()
                .and_then(|e| refuse(e.to_string()))
        };
        if let Some(p) = problem {
            let _ = req.reply.send(Event::Error(p));
            return;
        }
        let seed = req.opts.params.seed.unwrap_or(req.opts.seed);
        let matcher = req.opts.grammar.clone().map(Matcher::new);
        if matcher.is_some() && self.grammar_vocab.is_none() {
            self.grammar_vocab = Some(Arc::new(constrain::grammar_vocab(&self.tok)));
        }
        self.waiting.push_back(Seq {
            matcher,
            salt: cache_salt(req.adapter.as_deref(), req.cache_scope),
            tokens: req.prompt.clone(),
            stream: TextStream::new(&req.opts.stop),
            rng: Rng::new(seed),
            req,
            num_computed: 0,
            cached_tokens: 0,
            generated: 0,
            admitted: Instant::now(),
            first_token: None,
            score: None,
            drafts: Vec::new(),
            lookup: crate::speculate::Lookup::default(),
        });
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests preempted so far (pool full).
    pub fn num_preemptions(&self) -> u64 {
        self.preemptions
    }

    /// A live view of the engine's figures, updated after every step.
    pub fn stats(&self) -> Arc<EngineStats> {
        self.publish_stats();
        self.stats.clone()
    }

    fn publish_stats(&self) {
        let st = &self.stats;
        let set = |a: &AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
        set(&st.running, self.running.len() as u64);
        set(&st.waiting, self.waiting.len() as u64);
        set(&st.kv_blocks_total, self.cfg.num_blocks as u64);
        set(&st.kv_blocks_free, self.blocks.num_free_blocks() as u64);
        let p = self.blocks.stats();
        set(&st.prefix_queried_tokens, p.queried_tokens);
        set(&st.prefix_hit_tokens, p.hit_tokens);
        set(&st.preemptions, self.preemptions);
    }

    /// The prefix cache's hit statistics.
    pub fn prefix_cache_stats(&self) -> ferrolm_kv::PrefixCacheStats {
        self.blocks.stats()
    }

    /// One step: schedule → execute → update. Returns how many tokens were computed.
    pub fn step(&mut self) -> Result<usize, SessionError> {
        // The whole step runs on a worker of the engine's pool, not only the forward pass:
        // scheduling and sampling on a third thread competed for the two cores with workers
        // still spinning after the pass (one stream at ~190 positions decoded at 156–212
        // tok/s in `bench --parallel 1` before the KV-head split, 162–201 with it, 224–282
        // with this; BENCHMARKS.md).
        let pool = self.pool.clone();
        pool.install(|| self.step_in_pool())
    }

    fn step_in_pool(&mut self) -> Result<usize, SessionError> {
        self.draft_with_model()?;
        let plan = self.schedule();
        if plan.is_empty() {
            self.publish_stats();
            return Ok(0);
        }
        let logits_rows = self.execute(&plan)?;
        self.update(&plan, &logits_rows);
        let computed: usize = plan.iter().map(|p| p.1).sum();
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .tokens_computed
            .fetch_add(computed as u64, Ordering::Relaxed);
        self.publish_stats();
        Ok(computed)
    }

    fn schedule(&mut self) -> Plan {
        let mut budget = self.cfg.max_batch_tokens;
        let mut plan = Plan::new();
        let mut i = 0;
        // False while request i retries without drafts (the pool had no room for them).
        let mut drafting = true;
        while i < self.running.len() && budget > 0 {
            if drafting {
                self.propose(i, budget);
            }
            let s = &self.running[i];
            let n = (s.tokens.len() - s.num_computed).min(budget) + s.drafts.len();
            let total = s.num_computed + n;
            match self
                .blocks
                .allocate_slots(s.req.id, total, &ComputedBlocks::default())
            {
                Ok(Some(())) => {
                    plan.push((i, n));
                    budget -= n;
                    i += 1;
                    drafting = true;
                }
                Ok(None) if !s.drafts.is_empty() => {
                    // No room for drafts: run the request without them before preempting.
                    self.running[i].drafts.clear();
                    drafting = false;
                }
                Ok(None) => {
                    // Pool full: preempt the most recent request (maybe this one) and retry.
                    let victim = self.running.len() - 1;
                    self.preempt(victim);
                    plan.retain(|&(j, _)| j != victim);
                    if victim == i {
                        break;
                    }
                }
                Err(e) => {
                    let s = self.running.remove(i);
                    let _ = self.blocks.free(s.req.id);
                    let _ = s.req.reply.send(Event::Error(EngineError::new(
                        ErrorKind::Internal,
                        format!("KV cache: {e}"),
                    )));
                    plan.clear(); // indices shifted: reschedule from scratch next step
                    return plan;
                }
            }
        }
        // Admit waiting requests while budget, slots and blocks allow.
        while budget > 0 && self.running.len() < self.cfg.max_running {
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            let hit = self.blocks.get_computed_blocks(&s.tokens, s.salt);
            let start = hit.num_tokens();
            let n = (s.tokens.len() - start).min(budget);
            match self.blocks.allocate_slots(s.req.id, start + n, &hit) {
                Ok(Some(())) => {
                    if s.generated == 0 {
                        s.cached_tokens = start;
                    }
                    s.num_computed = start;
                    plan.push((self.running.len(), n));
                    self.running.push(s);
                    budget -= n;
                }
                Ok(None) => {
                    self.waiting.push_front(s);
                    break;
                }
                Err(e) => {
                    let _ = self.blocks.free(s.req.id);
                    let _ = s.req.reply.send(Event::Error(EngineError::new(
                        ErrorKind::Internal,
                        format!("KV cache: {e}"),
                    )));
                }
            }
        }
        plan
    }

    /// With a draft model: set every decoding greedy request's drafts for this step. The draft
    /// cache of each keeps the longest prefix of what it holds that is still the request's
    /// history (accepted drafts stay, rejected ones go), computes the rest of the history and
    /// then its `k - 1` drafts one pass at a time; a request whose draft blocks do not fit
    /// simply does not draft.
    fn draft_with_model(&mut self) -> Result<(), SessionError> {
        let Some(d) = self.draft.as_mut() else {
            return Ok(());
        };
        // Forget requests that left (finished, failed, preempted) since the last step.
        let running: std::collections::HashSet<RequestId> =
            self.running.iter().map(|s| s.req.id).collect();
        d.cached.retain(|id, _| {
            running.contains(id) || {
                let _ = d.blocks.free(*id);
                false
            }
        });
        // The draft holds the history and k - 1 drafts, within its own context too.
        let limit = self
            .model
            .cfg()
            .context_length
            .min(d.model.cfg().context_length + 1)
            .min(self.cfg.num_blocks * self.cfg.block_size);
        // (index into running, drafts wanted), with each one's draft cache caught up below.
        let mut who = Vec::new();
        for (i, s) in self.running.iter_mut().enumerate() {
            s.drafts.clear();
            if !s.decoding() || !s.req.opts.params.is_greedy() {
                continue;
            }
            let k =
                d.k.min(s.req.opts.max_tokens.saturating_sub(s.generated + 1))
                    .min(limit.saturating_sub(s.tokens.len() + 1));
            if k == 0 {
                continue;
            }
            let id = s.req.id;
            let held = d.cached.entry(id).or_default();
            let keep = held
                .iter()
                .zip(&s.tokens)
                .take_while(|(a, b)| a == b)
                .count()
                .min(s.tokens.len() - 1);
            held.truncate(keep);
            if d.blocks.contains(id) {
                d.blocks.truncate(id, keep)?;
            }
            match d
                .blocks
                .allocate_slots(id, s.tokens.len() + k - 1, &ComputedBlocks::default())?
            {
                Some(()) => who.push((i, k)),
                None => {
                    // No room: this request goes without drafts (and starts over next time).
                    let _ = d.blocks.free(id);
                    d.cached.remove(&id);
                }
            }
        }
        let vocab = d.model.cfg().vocab_size;
        for pass in 0..who.iter().map(|w| w.1).max().unwrap_or(0) {
            let (mut tokens, mut positions, mut spans, mut logits_for) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut rows = Vec::new();
            for &(i, k) in &who {
                if pass >= k {
                    continue;
                }
                let s = &self.running[i];
                let held = &d.cached[&s.req.id];
                // Pass 0 catches up on the history; later ones feed the previous draft.
                let (from, new): (usize, &[u32]) = if pass == 0 {
                    (held.len(), &s.tokens[held.len()..])
                } else {
                    (held.len(), &s.drafts[pass - 1..pass])
                };
                let start = tokens.len();
                tokens.extend_from_slice(new);
                positions.extend((from..from + new.len()).map(|p| p as u32));
                spans.push((start, new.len(), s.req.id));
                logits_for.push(start + new.len() - 1);
                rows.push(i);
            }
            let seqs = seq_spans(&d.blocks, &spans);
            let batch = Batch {
                tokens: &tokens,
                positions: &positions,
                seqs: &seqs,
                logits_for: &logits_for,
                adapters: &[],
            };
            let (model, kv, scratch) = (&d.model, &mut d.kv, &mut d.scratch);
            self.pool.install(|| model.forward(&batch, kv, scratch))?;
            for (r, (&i, &(start, len, id))) in rows.iter().zip(&spans).enumerate() {
                let t = crate::speculate::argmax(d.scratch.logits_row(r, vocab));
                if let Some(held) = d.cached.get_mut(&id) {
                    held.extend_from_slice(&tokens[start..start + len]);
                }
                self.running[i].drafts.push(t);
            }
        }
        Ok(())
    }

    fn preempt(&mut self, idx: usize) {
        self.preemptions += 1;
        let mut s = self.running.remove(idx);
        let _ = self.blocks.free(s.req.id);
        s.num_computed = 0;
        s.drafts.clear();
        self.waiting.push_front(s);
    }

    /// Set running request `i`'s drafts for this step: prompt lookup for a greedy request
    /// that is decoding (only its last token is uncomputed), within the step's token `budget`,
    /// its `max_tokens` and the context (verifying k drafts yields up to k + 1 tokens).
    fn propose(&mut self, i: usize, budget: usize) {
        let limit = self
            .model
            .cfg()
            .context_length
            .min(self.cfg.num_blocks * self.cfg.block_size);
        let s = &mut self.running[i];
        if self.draft.is_some() {
            // Drafted before the step (`draft_with_model`): only trim to what fits now.
            let fit = budget
                .saturating_sub(1)
                .min(s.req.opts.max_tokens.saturating_sub(s.generated + 1))
                .min(limit.saturating_sub(s.tokens.len() + 1));
            s.drafts.truncate(fit);
            return;
        }
        s.drafts.clear();
        if self.cfg.lookup == 0 || !s.decoding() || !s.req.opts.params.is_greedy() {
            return;
        }
        let k = self
            .cfg
            .lookup
            .min(budget.saturating_sub(1))
            .min(s.req.opts.max_tokens.saturating_sub(s.generated + 1))
            .min(limit.saturating_sub(s.tokens.len() + 1));
        s.lookup.propose(&s.tokens, k, &mut s.drafts);
    }

    /// Run the planned tokens; returns, per plan entry, the row of its logits if it has one.
    fn execute(&mut self, plan: &Plan) -> Result<Vec<Option<usize>>, SessionError> {
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(plan.len());
        let mut logits_for = Vec::new();
        let mut rows = Vec::with_capacity(plan.len());
        for &(i, n) in plan {
            let s = &self.running[i];
            let start = tokens.len();
            // The planned tokens: `real` of the request's own, then its drafts.
            let real = n - s.drafts.len();
            tokens.extend_from_slice(&s.tokens[s.num_computed..s.num_computed + real]);
            tokens.extend_from_slice(&s.drafts);
            positions.extend((s.num_computed..s.num_computed + n).map(|p| p as u32));
            spans.push((start, n, s.req.id));
            if s.num_computed + real == s.tokens.len() {
                // Logits for its last token and after each draft.
                rows.push(Some(logits_for.len()));
                logits_for.extend(start + real - 1..start + n);
            } else {
                rows.push(None);
            }
        }
        let seqs = seq_spans(&self.blocks, &spans);
        // Each sequence's adapter, or none at all when no request in the step has one.
        let adapters: Vec<Option<&Adapter>> = if plan
            .iter()
            .any(|&(i, _)| self.running[i].req.adapter.is_some())
        {
            plan.iter()
                .map(|&(i, _)| self.running[i].req.adapter.as_deref())
                .collect()
        } else {
            Vec::new()
        };
        let batch = Batch {
            tokens: &tokens,
            positions: &positions,
            seqs: &seqs,
            logits_for: &logits_for,
            adapters: &adapters,
        };
        let (model, kv, scratch) = (&self.model, &mut self.kv, &mut self.scratch);
        self.pool.install(|| model.forward(&batch, kv, scratch))?;
        Ok(rows)
    }

    fn update(&mut self, plan: &Plan, rows: &[Option<usize>]) {
        let vocab = self.model.cfg().vocab_size;
        let mut finished = Vec::new();
        let (mut drafted, mut accepted) = (0, 0);
        for (&(i, n), row) in plan.iter().zip(rows) {
            let s = &mut self.running[i];
            let drafts = std::mem::take(&mut s.drafts);
            s.num_computed += n - drafts.len();
            let Some(row) = *row else {
                let _ = self
                    .blocks
                    .cache_full_blocks(s.req.id, &s.tokens, s.num_computed, s.salt);
                continue;
            };
            if let Some(w) = s.req.adapter.as_ref().and_then(|a| a.score.as_deref()) {
                // A reward model: its head on the prompt's last hidden state, and done.
                let h = self.scratch.hidden_row(row, w.len());
                s.score = Some(w.iter().zip(h).map(|(a, b)| a * b).sum());
                s.first_token = Some(s.admitted.elapsed().as_secs_f64());
                let _ = self
                    .blocks
                    .cache_full_blocks(s.req.id, &s.tokens, s.num_computed, s.salt);
                finished.push((i, Some(FinishReason::Stop)));
                continue;
            }
            // Row j's token follows the drafts before it: keep going while it equals draft
            // j (whose K/V this step computed), exactly as one token per step would.
            let mut end = None;
            let (mut compared, mut accepted_here) = (0, 0);
            for j in 0..=drafts.len() {
                let s = &mut self.running[i];
                let logits = self.scratch.logits_row(row + j, vocab);
                let outcome = emit(
                    s,
                    logits,
                    &self.tok,
                    self.grammar_vocab.as_deref(),
                    &mut self.sampler,
                    &mut self.mask,
                    &self.cfg,
                    self.model.cfg().context_length,
                );
                match outcome {
                    Emitted::Next(token) if j < drafts.len() => {
                        // Draft j is checked (drafts after an end never are).
                        compared += 1;
                        if drafts[j] != token {
                            break;
                        }
                        s.num_computed += 1;
                        accepted_here += 1;
                    }
                    Emitted::Next(_) => break,
                    Emitted::End(reason) => {
                        end = Some(reason);
                        break;
                    }
                }
            }
            drafted += compared;
            accepted += accepted_here;
            let s = &mut self.running[i];
            s.lookup.observe(drafts.len(), accepted_here);
            // Only accepted tokens are computed: rejected drafts never reach a filed block.
            let _ = self
                .blocks
                .cache_full_blocks(s.req.id, &s.tokens, s.num_computed, s.salt);
            if !drafts.is_empty() {
                // Release the blocks that only held rejected drafts.
                let _ = self.blocks.truncate(s.req.id, s.tokens.len());
            }
            if let Some(reason) = end {
                finished.push((i, reason));
            }
        }
        self.stats
            .draft_tokens
            .fetch_add(drafted as u64, Ordering::Relaxed);
        self.stats
            .accepted_tokens
            .fetch_add(accepted as u64, Ordering::Relaxed);
        // Remove from the back so indices stay valid.
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (i, reason) in finished {
            let s = self.running.remove(i);
            let _ = self.blocks.free(s.req.id);
            if let Some(reason) = reason {
                s.finish(reason);
            }
        }
    }

    /// Drop a request wherever it is (client gone); its blocks return to the pool, and its
    /// channel (if anyone still listens) gets `Finished` with `Cancelled` and what it used.
    pub fn abort(&mut self, id: RequestId) {
        if let Some(i) = self.running.iter().position(|s| s.req.id == id) {
            let s = self.running.remove(i);
            let _ = self.blocks.free(id);
            s.finish(FinishReason::Cancelled);
        }
        if let Some(i) = self.waiting.iter().position(|s| s.req.id == id) {
            if let Some(s) = self.waiting.remove(i) {
                s.finish(FinishReason::Cancelled);
            }
        }
    }

    /// Free KV blocks (cached-but-unused ones count as free).
    pub fn num_free_blocks(&self) -> usize {
        self.blocks.num_free_blocks()
    }
}

/// The batch's sequences, `(start, len, request)` each, with their block tables in `blocks`.
fn seq_spans<'a>(
    blocks: &'a KvCacheManager,
    spans: &[(usize, usize, RequestId)],
) -> Vec<SeqSpan<'a>> {
    spans
        .iter()
        .map(|&(start, len, id)| SeqSpan {
            start,
            len,
            block_table: blocks.block_table(id).unwrap_or(&[]),
        })
        .collect()
}

/// One request of [`Engine::run_all`].
pub struct Job {
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    pub adapter: Option<Arc<Adapter>>,
}

/// A request that [`Engine::run_all`] ran to its end.
#[derive(Debug, Clone, Default)]
pub struct Done {
    /// Generated ids, the end token included when the reply ended on one.
    pub ids: Vec<u32>,
    /// The reply's text (no end token).
    pub text: String,
    /// (log-prob, top alternatives) per generated token, when asked for.
    pub logprobs: Vec<crate::session::TokenLogprobs>,
    pub reason: Option<FinishReason>,
    /// A reward model's score (a request whose adapter has a score head).
    pub score: Option<f32>,
}

impl Engine {
    /// Run `jobs` to their ends in shared batches, in this thread (an idle engine: offline
    /// work such as distillation and RL sampling); each job's result in order.
    pub fn run_all(
        &mut self,
        jobs: Vec<Job>,
    ) -> Result<Vec<Result<Done, EngineError>>, SessionError> {
        let mut rxs = Vec::with_capacity(jobs.len());
        for (k, j) in jobs.into_iter().enumerate() {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            self.add(Request {
                id: k as RequestId,
                prompt: j.prompt,
                opts: j.opts,
                adapter: j.adapter,
                cache_scope: 0,
                reply: tx,
            });
            rxs.push(rx);
        }
        while self.has_work() {
            self.step()?;
        }
        Ok(rxs
            .into_iter()
            .map(|mut rx| {
                let mut d = Done::default();
                while let Ok(ev) = rx.try_recv() {
                    match ev {
                        Event::Token {
                            id,
                            text,
                            logprob,
                            top,
                        } => {
                            d.ids.push(id);
                            d.text.push_str(&text);
                            d.logprobs.push((logprob, top));
                        }
                        Event::Finished { reason, score, .. } => {
                            d.reason = Some(reason);
                            d.score = score;
                        }
                        Event::Error(e) => return Err(e),
                    }
                }
                Ok(d)
            })
            .collect())
    }
}

/// What callers send to a running engine thread (on a `std` channel: the engine thread blocks
/// on it while idle).
pub enum Command {
    Submit(Box<Request>),
    Abort(RequestId),
}

/// A handle on an engine running in its own thread; dropping every sender stops it once the
/// work in flight is done.
pub struct EngineHandle {
    pub tx: std::sync::mpsc::Sender<Command>,
    pub join: std::thread::JoinHandle<()>,
}

/// Run `engine` on a dedicated thread: block while idle, otherwise drain commands and step.
pub fn spawn(mut engine: Engine) -> std::io::Result<EngineHandle> {
    let (tx, rx) = std::sync::mpsc::channel::<Command>();
    let join = std::thread::Builder::new()
        .name("ferrolm-engine".into())
        .spawn(move || {
            let apply = |engine: &mut Engine, c: Command| {
                match c {
                    Command::Submit(r) => engine.add(*r),
                    Command::Abort(id) => engine.abort(id),
                }
                engine.publish_stats();
            };
            loop {
                if !engine.has_work() {
                    match rx.recv() {
                        Ok(c) => apply(&mut engine, c),
                        Err(_) => return,
                    }
                }
                while let Ok(c) = rx.try_recv() {
                    apply(&mut engine, c);
                }
                if let Err(e) = engine.step() {
                    // A model error fails every request in flight, never the thread.
                    engine.fail_all(&e.to_string());
                }
            }
        })?;
    Ok(EngineHandle { tx, join })
}

impl Engine {
    fn fail_all(&mut self, why: &str) {
        for s in self.running.drain(..).chain(self.waiting.drain(..)) {
            let _ = self.blocks.free(s.req.id);
            let _ = s
                .req
                .reply
                .send(Event::Error(EngineError::new(ErrorKind::Internal, why)));
        }
    }
}

/// What [`emit`] did with one row of logits.
enum Emitted {
    /// It sent this token; the request goes on.
    Next(u32),
    /// The request ends: `Some(reason)` after its last token was sent, `None` when it failed
    /// (its `Error` was sent) or its receiver is gone.
    End(Option<FinishReason>),
}

/// Sample request `s`'s next token from `logits`, append it, send it with the text it
/// releases, and apply the stop conditions (end id, stop string, finished grammar,
/// `max_tokens`, full context).
#[allow(clippy::too_many_arguments)]
fn emit(
    s: &mut Seq,
    logits: &[f32],
    tok: &Tokenizer,
    grammar_vocab: Option<&Vocab>,
    sampler: &mut Sampler,
    mask: &mut MaskScratch,
    cfg: &EngineConfig,
    context_length: usize,
) -> Emitted {
    let grammar = s.matcher.as_ref().zip(grammar_vocab);
    let out = match constrain::sample(
        sampler,
        logits,
        &s.req.opts.params,
        &s.tokens,
        &mut s.rng,
        grammar,
        tok,
        &s.req.opts.end_ids,
        mask,
    ) {
        Ok(out) => out,
        Err(e) => {
            let _ = s
                .req
                .reply
                .send(Event::Error(EngineError::new(ErrorKind::Internal, e)));
            return Emitted::End(None);
        }
    };
    s.tokens.push(out.token);
    s.generated += 1;
    if s.first_token.is_none() {
        s.first_token = Some(s.admitted.elapsed().as_secs_f64());
    }
    let end = s.req.opts.end_ids.contains(&out.token);
    if let (Some(m), false) = (&mut s.matcher, end) {
        // `sample` only returns tokens the grammar allows.
        let _ = m.accept(tok.token_bytes(out.token));
    }
    let grammar_done = s.matcher.as_ref().is_some_and(Matcher::is_finished);
    let (text, stopped) = if end {
        (s.stream.finish(), false)
    } else {
        let p = s.stream.push(tok.token_bytes(out.token));
        (p.text, p.stop.is_some())
    };
    let ctx_full = s.tokens.len() >= context_length.min(cfg.num_blocks * cfg.block_size);
    let reason = if end || stopped || grammar_done {
        Some(FinishReason::Stop)
    } else if s.generated >= s.req.opts.max_tokens || ctx_full {
        Some(FinishReason::Length)
    } else {
        None
    };
    let mut text = text;
    if reason == Some(FinishReason::Length) || (grammar_done && !end && !stopped) {
        text.push_str(&s.stream.finish());
    }
    let sent = s.req.reply.send(Event::Token {
        id: out.token,
        text,
        logprob: out.logprob,
        top: out.top,
    });
    match (sent, reason) {
        (Err(_), _) => Emitted::End(None),
        (Ok(()), Some(r)) => Emitted::End(Some(r)),
        (Ok(()), None) => Emitted::Next(out.token),
    }
}
