//! One conversation with a model: KV cache, scratch and thread pool owned together.
//!
//! Contract: [`Session::eval`] appends tokens to the sequence (reusing whatever prefix is
//! already cached: a chat's next turn only computes its new tokens) and returns the logits
//! the caller asked for; [`Session::generate`] runs the sampler loop with stop conditions and
//! streams each token's final text to a callback. Prompts longer than the context are an error,
//! never a silent truncation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrolm_kv::BlockAllocator;
use ferrolm_models::{Adapter, Batch, KvCache, KvType, Model, ModelError, Scratch, SeqSpan};
use ferrolm_sample::{Rng, SampleError, Sampled, Sampler, SamplingParams};
use ferrolm_tokenizer::Tokenizer;

use crate::speculate::{self, SpecStats};
use crate::text::TextStream;

/// Tokens per KV block.
pub const BLOCK_SIZE: usize = 16;
/// Largest number of tokens in one forward pass (prefill is split into chunks of this size).
pub const MAX_CHUNK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Sample(#[from] SampleError),
    #[error("the prompt has {prompt} tokens and the context holds {ctx}: shorten the prompt or raise --ctx (the model supports up to {model_ctx})")]
    ContextFull {
        prompt: usize,
        ctx: usize,
        model_ctx: usize,
    },
    #[error("--max-tokens must be at least 1")]
    ZeroMaxTokens,
    #[error("the prompt is empty: give some text (or a chat message)")]
    EmptyPrompt,
    #[error("KV cache: {0}")]
    Kv(#[from] ferrolm_kv::KvError),
    #[error("could not start {threads} threads: {reason}")]
    Threads { threads: usize, reason: String },
    #[error("{0}")]
    Grammar(String),
    #[error("the draft model's vocabulary has {draft} tokens but the model's has {target}: a draft model must share the model's tokenizer (e.g. a smaller model of the same family)")]
    DraftVocab { draft: usize, target: usize },
}

/// Speculative decoding for a session's greedy generations (see [`crate::speculate`]).
pub enum Speculation<'m> {
    /// One token per forward pass.
    Off,
    /// Prompt lookup: up to `k` drafts from the history's n-grams.
    Lookup { k: usize },
    /// Up to `k` drafts from a draft model (of the same vocabulary) run greedily in its own
    /// session, whose context must be at least this session's.
    Draft { session: Box<Session<'m>>, k: usize },
}

pub struct Session<'m> {
    pub model: &'m Model,
    kv: KvCache,
    scratch: Scratch,
    blocks: BlockAllocator,
    table: Vec<u32>,
    /// Tokens whose K/V are in the cache, in order.
    cached: Vec<u32>,
    pool: rayon::ThreadPool,
    pub ctx: usize,
    sampler: Sampler,
    /// The LoRA adapter every token runs with (llama.cpp's `--lora`).
    adapter: Option<Arc<Adapter>>,
    spec: Speculation<'m>,
    /// The prompt-lookup proposer's state within one generation.
    lookup: speculate::Lookup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end token or a stop string.
    Stop,
    /// `max_tokens` reached or the context is full.
    Length,
    /// The caller's callback asked to stop (Ctrl-C).
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Token ids that end generation (EOS, the template's end-of-turn).
    pub end_ids: Vec<u32>,
    pub seed: u64,
    /// Constrain the output to this grammar (JSON schema, forced tool call); generation ends as
    /// soon as the grammar is finished.
    pub grammar: Option<std::sync::Arc<ferrolm_grammar::Grammar>>,
}

/// One generated token as it streams out.
#[derive(Debug)]
pub struct TokenEvent<'a> {
    pub id: u32,
    /// Final text released by this token (may be empty while bytes or a stop prefix are held).
    pub text: &'a str,
    pub sampled: &'a Sampled,
}

/// A token's log-probability and its top alternatives `(id, logprob)`.
pub type TokenLogprobs = (Option<f32>, Vec<(u32, f32)>);

#[derive(Debug, serde::Serialize)]
pub struct Generation {
    pub ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    /// (chosen logprob, top alternatives) per token when logprobs were asked for.
    pub logprobs: Vec<TokenLogprobs>,
    pub prompt_tokens: usize,
    /// Prompt tokens served from the cache of earlier turns.
    pub cached_tokens: usize,
    /// Draft tokens verified and accepted (zero without speculation).
    pub speculation: SpecStats,
    #[serde(with = "secs")]
    pub prefill_time: Duration,
    #[serde(with = "secs")]
    pub decode_time: Duration,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

impl<'m> Session<'m> {
    /// A session with room for `ctx` tokens (capped by the model's context) on `threads` threads,
    /// with an f16 KV cache.
    pub fn new(model: &'m Model, ctx: usize, threads: usize) -> Result<Self, SessionError> {
        Self::with_kv_type(model, ctx, threads, KvType::F16)
    }

    /// [`Session::new`] with a KV cache of `kv_type` (an error if the model's head size cannot
    /// take it).
    pub fn with_kv_type(
        model: &'m Model,
        ctx: usize,
        threads: usize,
        kv_type: KvType,
    ) -> Result<Self, SessionError> {
        let ctx = ctx.clamp(1, model.cfg().context_length);
        let num_blocks = ctx.div_ceil(BLOCK_SIZE);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("ferrolm-{i}"))
            .build()
            .map_err(|e| SessionError::Threads {
                threads,
                reason: e.to_string(),
            })?;
        Ok(Session {
            model,
            kv: KvCache::for_model(model, kv_type, BLOCK_SIZE, num_blocks)?,
            scratch: Scratch::new(),
            blocks: BlockAllocator::new(BLOCK_SIZE, num_blocks),
            table: Vec::new(),
            cached: Vec::new(),
            pool,
            ctx,
            sampler: Sampler::new(),
            adapter: None,
            spec: Speculation::Off,
            lookup: speculate::Lookup::default(),
        })
    }

    /// Draft tokens for later greedy generations (see [`crate::speculate`]); the output stays
    /// the same, token for token. A draft model must have this model's vocabulary size.
    pub fn set_speculation(&mut self, spec: Speculation<'m>) -> Result<(), SessionError> {
        if let Speculation::Draft { session, .. } = &spec {
            let (draft, target) = (session.model.cfg().vocab_size, self.model.cfg().vocab_size);
            if draft != target {
                return Err(SessionError::DraftVocab { draft, target });
            }
        }
        self.spec = spec;
        Ok(())
    }

    /// Up to `k` draft tokens to follow `history` (whose last token is not cached yet), from
    /// the session's proposer; `out` is cleared first.
    fn propose(
        &mut self,
        history: &[u32],
        k: usize,
        out: &mut Vec<u32>,
    ) -> Result<(), SessionError> {
        out.clear();
        match &mut self.spec {
            Speculation::Off => {}
            Speculation::Lookup { k: max } => self.lookup.propose(history, k.min(*max), out),
            Speculation::Draft { session: d, k: max } => {
                // The draft computes the history's uncached tail, then k - 1 of its own tokens.
                let k = k.min(*max).min((d.ctx + 1).saturating_sub(history.len()));
                if k == 0 {
                    return Ok(());
                }
                let common = d.reuse_prefix(history);
                let tail = &history[common..];
                let mut logits = d.eval(tail, &[tail.len() - 1])?;
                loop {
                    let t = speculate::argmax(&logits);
                    out.push(t);
                    if out.len() == k {
                        break;
                    }
                    logits = d.eval(&[t], &[0])?;
                }
            }
        }
        Ok(())
    }

    /// Run every later token with `adapter` (or none); the cache is cleared, since what it
    /// holds was computed without it.
    pub fn set_adapter(&mut self, adapter: Option<Arc<Adapter>>) -> Result<(), SessionError> {
        if let Some(a) = &adapter {
            self.model.check_adapter(a)?;
        }
        self.adapter = adapter;
        self.reset();
        Ok(())
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// The KV cache's element type.
    pub fn kv_type(&self) -> KvType {
        self.kv.kind()
    }

    /// Bytes of K and V one cached token takes, over all layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.kv.bytes_per_token()
    }

    /// Forget the cached sequence.
    pub fn reset(&mut self) {
        self.truncate(0);
    }

    /// Keep only the first `len` cached tokens, returning freed blocks to the pool.
    fn truncate(&mut self, len: usize) {
        let len = len.min(self.cached.len());
        self.cached.truncate(len);
        let keep = self.blocks.blocks_for(len);
        for b in self.table.drain(keep..) {
            // Blocks in the table are allocated by construction.
            let _ = self.blocks.release(b);
        }
    }

    pub fn cached_tokens(&self) -> &[u32] {
        &self.cached
    }

    /// Make the cached sequence equal `tokens` minus whatever is new, and return how many
    /// tokens of `tokens` were already cached. At least one token is always left to compute,
    /// so the caller gets fresh logits.
    fn reuse_prefix(&mut self, tokens: &[u32]) -> usize {
        let common = self
            .cached
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
            .min(tokens.len().saturating_sub(1));
        self.truncate(common);
        common
    }

    /// Start recording activation statistics for an importance matrix (every later
    /// [`Session::eval`] adds to them), or stop and return what was recorded.
    pub fn record_activations(&mut self, on: bool) -> Option<ferrolm_models::ActivationStats> {
        let was = self.scratch.activations.take();
        if on {
            self.scratch.activations = Some(was.unwrap_or_default());
            None
        } else {
            was
        }
    }

    /// Append `tokens` to the cached sequence; return logits for the positions in `want`
    /// (indices into `tokens`), in order, as `want.len() × vocab` floats.
    pub fn eval(&mut self, tokens: &[u32], want: &[usize]) -> Result<Vec<f32>, SessionError> {
        self.run(tokens, want, false)
    }

    /// Like [`Session::eval`], but return the final hidden states (after the output norm) at
    /// `want`, `want.len() × dim` floats: what a reward model's scalar head reads.
    pub fn eval_hidden(
        &mut self,
        tokens: &[u32],
        want: &[usize],
    ) -> Result<Vec<f32>, SessionError> {
        self.run(tokens, want, true)
    }

    fn run(
        &mut self,
        tokens: &[u32],
        want: &[usize],
        hidden: bool,
    ) -> Result<Vec<f32>, SessionError> {
        let width = if hidden {
            self.model.cfg().dim
        } else {
            self.model.cfg().vocab_size
        };
        let start = self.cached.len();
        if start + tokens.len() > self.ctx {
            return Err(SessionError::ContextFull {
                prompt: start + tokens.len(),
                ctx: self.ctx,
                model_ctx: self.model.cfg().file_context_length,
            });
        }
        if !self.blocks.grow(&mut self.table, start + tokens.len()) {
            return Err(SessionError::ContextFull {
                prompt: start + tokens.len(),
                ctx: self.ctx,
                model_ctx: self.model.cfg().file_context_length,
            });
        }
        let mut out = Vec::with_capacity(want.len() * width);
        let mut positions = Vec::with_capacity(MAX_CHUNK);
        let mut logits_for = Vec::new();
        for (c, chunk) in tokens.chunks(MAX_CHUNK).enumerate() {
            let base = c * MAX_CHUNK;
            positions.clear();
            positions.extend((0..chunk.len()).map(|i| (start + base + i) as u32));
            logits_for.clear();
            logits_for.extend(
                want.iter()
                    .filter(|&&w| w >= base && w < base + chunk.len())
                    .map(|&w| w - base),
            );
            let seqs = [SeqSpan {
                start: 0,
                len: chunk.len(),
                block_table: &self.table,
            }];
            let adapter = [self.adapter.as_deref()];
            let batch = Batch {
                tokens: chunk,
                positions: &positions,
                seqs: &seqs,
                logits_for: &logits_for,
                adapters: if self.adapter.is_some() {
                    &adapter
                } else {
                    &[]
                },
            };
            let (model, kv, scratch) = (self.model, &mut self.kv, &mut self.scratch);
            self.pool.install(|| model.forward(&batch, kv, scratch))?;
            if hidden {
                out.extend_from_slice(self.scratch.hidden(logits_for.len(), width));
            } else if !logits_for.is_empty() {
                out.extend_from_slice(&self.scratch.logits[..logits_for.len() * width]);
            }
            self.cached.extend_from_slice(chunk);
        }
        Ok(out)
    }

    /// Generate from `prompt` (ids, no BOS added here). `on_token` sees each token with its
    /// released text; returning `false` cancels.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        tok: &Tokenizer,
        opts: &GenerateOptions,
        mut on_token: impl FnMut(TokenEvent) -> bool,
    ) -> Result<Generation, SessionError> {
        if prompt.is_empty() {
            return Err(SessionError::EmptyPrompt);
        }
        if opts.max_tokens == 0 {
            return Err(SessionError::ZeroMaxTokens);
        }
        opts.params.validate(self.model.cfg().vocab_size)?;
        if prompt.len() >= self.ctx {
            return Err(SessionError::ContextFull {
                prompt: prompt.len(),
                ctx: self.ctx,
                model_ctx: self.model.cfg().file_context_length,
            });
        }
        let t0 = Instant::now();
        let cached = self.reuse_prefix(prompt);
        let new = &prompt[cached..];
        let mut logits = self.eval(new, &[new.len() - 1])?;
        let prefill_time = t0.elapsed();

        let t1 = Instant::now();
        let mut rng = Rng::new(opts.params.seed.unwrap_or(opts.seed));
        let mut history: Vec<u32> = prompt.to_vec();
        let mut stream = TextStream::new(&opts.stop);
        let mut ids = Vec::new();
        let mut logprobs = Vec::new();
        let mut matcher = opts.grammar.clone().map(ferrolm_grammar::Matcher::new);
        let vocab = matcher
            .as_ref()
            .map(|_| crate::constrain::grammar_vocab(tok));
        let mut mask = crate::constrain::MaskScratch::default();
        let n_vocab = self.model.cfg().vocab_size;
        let spec_on = opts.params.is_greedy() && !matches!(self.spec, Speculation::Off);
        let mut spec = SpecStats::default();
        // Drafts verified by the rows of `logits` after its first (see `crate::speculate`).
        let mut drafts: Vec<u32> = Vec::new();
        self.lookup = speculate::Lookup::default();
        let finish;
        'decode: loop {
            // Row j's token follows the drafts before it; keep going while it equals draft j.
            let mut accepted = 0;
            for j in 0..=drafts.len() {
                let row = &logits[j * n_vocab..(j + 1) * n_vocab];
                let s = crate::constrain::sample(
                    &mut self.sampler,
                    row,
                    &opts.params,
                    &history,
                    &mut rng,
                    matcher.as_ref().zip(vocab.as_ref()),
                    tok,
                    &opts.end_ids,
                    &mut mask,
                )
                .map_err(SessionError::Grammar)?;
                let hit = drafts.get(j) == Some(&s.token);
                ids.push(s.token);
                history.push(s.token);
                if opts.params.logprobs.is_some() {
                    logprobs.push((s.logprob, s.top.clone()));
                }
                let end = if opts.end_ids.contains(&s.token) {
                    let rest = stream.finish();
                    on_token(TokenEvent {
                        id: s.token,
                        text: &rest,
                        sampled: &s,
                    });
                    Some(FinishReason::Stop)
                } else {
                    emit(
                        &s,
                        tok,
                        opts,
                        &mut stream,
                        &mut matcher,
                        ids.len(),
                        history.len() >= self.ctx,
                        &mut on_token,
                    )
                };
                if let Some(reason) = end {
                    // The drafts after this token were never output: drop their K/V.
                    self.truncate(history.len() - 1);
                    finish = reason;
                    break 'decode;
                }
                if j == drafts.len() {
                    break;
                }
                // Draft j is checked (drafts after an end never are).
                spec.drafted += 1;
                if !hit {
                    break;
                }
                spec.accepted += 1;
                accepted += 1;
            }
            self.lookup.observe(drafts.len(), accepted);
            // The cache holds the history but its last token (the rejected drafts' K/V goes).
            self.truncate(history.len() - 1);
            let last = history[history.len() - 1];
            drafts.clear();
            if spec_on {
                // Verifying k drafts yields up to k + 1 tokens, all within max_tokens and ctx.
                let k = (opts.max_tokens - ids.len() - 1).min(self.ctx - history.len());
                let mut d = std::mem::take(&mut drafts);
                self.propose(&history, k, &mut d)?;
                drafts = d;
            }
            let mut step = Vec::with_capacity(drafts.len() + 1);
            step.push(last);
            step.extend_from_slice(&drafts);
            let want: Vec<usize> = (0..step.len()).collect();
            logits = self.eval(&step, &want)?;
        }
        Ok(Generation {
            text: stream.text().to_owned(),
            ids,
            finish_reason: finish,
            logprobs,
            prompt_tokens: prompt.len(),
            cached_tokens: cached,
            speculation: spec,
            prefill_time,
            decode_time: t1.elapsed(),
        })
    }
}

/// Stream one sampled token that is not an end token, and say whether generation ends with it:
/// a stop string, a finished grammar, the callback cancelling, `max_tokens` (`generated`
/// tokens so far, this one included) or a full context.
#[allow(clippy::too_many_arguments)]
fn emit(
    s: &Sampled,
    tok: &Tokenizer,
    opts: &GenerateOptions,
    stream: &mut TextStream,
    matcher: &mut Option<ferrolm_grammar::Matcher>,
    generated: usize,
    ctx_full: bool,
    on_token: &mut impl FnMut(TokenEvent) -> bool,
) -> Option<FinishReason> {
    let piece = stream.push(tok.token_bytes(s.token));
    let keep_going = on_token(TokenEvent {
        id: s.token,
        text: &piece.text,
        sampled: s,
    });
    if piece.stop.is_some() {
        return Some(FinishReason::Stop);
    }
    if let Some(m) = matcher {
        // `sample` only returns tokens the grammar allows.
        let _ = m.accept(tok.token_bytes(s.token));
        if m.is_finished() {
            let rest = stream.finish();
            on_token(TokenEvent {
                id: s.token,
                text: &rest,
                sampled: s,
            });
            return Some(FinishReason::Stop);
        }
    }
    if !keep_going {
        return Some(FinishReason::Cancelled);
    }
    if generated >= opts.max_tokens || ctx_full {
        let rest = stream.finish();
        if !rest.is_empty() {
            on_token(TokenEvent {
                id: s.token,
                text: &rest,
                sampled: s,
            });
        }
        return Some(FinishReason::Length);
    }
    None
}
