//! What to do with a conversation that does not fit the context window: a declared strategy,
//! never silent truncation.
//!
//! * `error` (the default): the request is a 400 that says by how many tokens it is over.
//! * `middle-out`: drop the oldest turns after the leading system messages — an assistant turn
//!   goes with the tool results that answer it — until the prompt leaves room for the reply;
//!   the system prompt and the latest turns stay verbatim. If even the system messages and the
//!   last message do not fit, it is a 400 that says so.
//! * `summarize`: the model itself summarises the oldest ~70% of the turns after the system
//!   messages into one system note; the rest stay verbatim (then middle-out, should that still
//!   not fit). Summaries are cached by the exact turns they cover, so the conversation's next
//!   request reuses its summary instead of generating it again.
//!
//! The strategy comes from the request (`context_strategy`, an extension field), the model's
//! config entry, or the server's `--context-strategy`; it applies once prompt + reply would
//! pass `--context-trigger` (a fraction of the context, default 1: only on overflow). A compressed request's response carries
//! `x-ferrolm-context: STRATEGY; dropped_messages=N; prompt_tokens=FROM->TO` (summarize adds
//! `summarized_messages=K; summary=generated|cached`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferrolm_engine::GenerateOptions;
use ferrolm_sample::SamplingParams;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::{generate, normalize_messages, AppState, Model};

/// Share of the turns after the system messages that `summarize` condenses.
const SUMMARIZE_SHARE: f64 = 0.7;
/// Longest summary, in tokens.
const SUMMARY_MAX_TOKENS: usize = 160;
/// Summaries kept for conversations' next requests.
const SUMMARY_CACHE_ENTRIES: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    #[default]
    Error,
    MiddleOut,
    Summarize,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "error" => Ok(Strategy::Error),
            "middle-out" => Ok(Strategy::MiddleOut),
            "summarize" => Ok(Strategy::Summarize),
            other => Err(format!(
                "`{other}` is not a context strategy: use error, middle-out or summarize"
            )),
        }
    }
}

/// What a strategy did to a request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Compression {
    pub dropped_messages: usize,
    pub tokens_before: usize,
    pub tokens_after: usize,
    /// Turns condensed into a summary note (summarize), and whether it came from the cache.
    pub summarized: Option<(usize, bool)>,
}

impl Compression {
    /// Prompt tokens removed.
    pub fn saved(&self) -> usize {
        self.tokens_before - self.tokens_after
    }

    /// The `x-ferrolm-context` header value.
    pub fn header(&self) -> String {
        match self.summarized {
            None => format!(
                "middle-out; dropped_messages={}; prompt_tokens={}->{}",
                self.dropped_messages, self.tokens_before, self.tokens_after
            ),
            Some((k, cached)) => format!(
                "summarize; summarized_messages={k}; summary={}; dropped_messages={}; prompt_tokens={}->{}",
                if cached { "cached" } else { "generated" },
                self.dropped_messages,
                self.tokens_before,
                self.tokens_after
            ),
        }
    }
}

/// Summaries by the hash of the model and the exact turns they cover.
#[derive(Default)]
pub struct SummaryCache(Mutex<HashMap<u64, String>>);

impl SummaryCache {
    fn get(&self, k: u64) -> Option<String> {
        self.0.lock().ok()?.get(&k).cloned()
    }

    fn put(&self, k: u64, v: String) {
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= SUMMARY_CACHE_ENTRIES {
                // Any entry will do: a miss costs one summary.
                if let Some(&old) = m.keys().next() {
                    m.remove(&old);
                }
            }
            m.insert(k, v);
        }
    }
}

fn turns_key(model: &str, turns: &[Value]) -> u64 {
    // The model id and the turns' JSON.
    let json = Value::from(turns.to_vec()).to_string();
    crate::fnv1a(model.bytes().chain(json.bytes()))
}

/// Render `messages` for `model` (unless `rendered` holds them, rendered for `model`'s template
/// and tokenizer), applying `strategy` if the prompt would leave no room for `max_tokens` (or
/// for one token when none is asked).
// Eight plain inputs of one request, each used once; a struct for them would serve this call
// alone.
#[allow(clippy::too_many_arguments)]
pub async fn fit_chat(
    s: &AppState,
    model: &Arc<Model>,
    messages: &Value,
    tools: Option<&Value>,
    strategy: Strategy,
    max_tokens: Option<usize>,
    rendered: Option<Vec<u32>>,
    cache_scope: u64,
) -> Result<(Vec<u32>, Option<Compression>), ApiError> {
    let msgs = normalize_messages(messages)?;
    // A router already rendered the whole conversation for this model's template.
    let ids = match rendered {
        Some(ids) => ids,
        None => model.render_ids(&msgs, tools)?,
    };
    let room = max_tokens.unwrap_or(1).max(1);
    // Compress past the configured fraction of the context, not only at the edge.
    let trigger = ((model.max_context as f64 * model.context_trigger) as usize).max(room + 1);
    if ids.len() + room <= trigger || strategy == Strategy::Error {
        // `Model::options` turns an overflow into the 400 that says by how much.
        return Ok((ids, None));
    }
    let Value::Array(mut list) = msgs else {
        return Ok((ids, None));
    };
    let head = list
        .iter()
        .take_while(|m| m.get("role").and_then(Value::as_str) == Some("system"))
        .count();
    let mut c = Compression {
        tokens_before: ids.len(),
        ..Compression::default()
    };
    if strategy == Strategy::Summarize {
        let rest = list.len() - head;
        if rest >= 2 {
            // At least one turn, never the last message.
            let k = ((rest as f64 * SUMMARIZE_SHARE) as usize).clamp(1, rest - 1);
            let turns: Vec<Value> = list[head..head + k].to_vec();
            let key = turns_key(&model.id, &turns) ^ cache_scope;
            let (summary, cached) = match s.summaries.get(key) {
                Some(v) => (v, true),
                None => {
                    let v = summarize(s, model, &turns, cache_scope).await?;
                    s.summaries.put(key, v.clone());
                    (v, false)
                }
            };
            let note = json!({"role": "system", "content": format!("Summary of the earlier conversation: {summary}")});
            list.splice(head..head + k, [note]);
            c.summarized = Some((k, cached));
            let ids = model.render_ids(&Value::Array(list.clone()), tools)?;
            if ids.len() + room <= trigger {
                c.tokens_after = ids.len();
                return Ok((ids, Some(c)));
            }
        }
    }
    middle_out(model, list, head, tools, room, trigger, c)
}

/// Drop the oldest turns after `head` until the prompt leaves `room` tokens.
fn middle_out(
    model: &Model,
    mut list: Vec<Value>,
    head: usize,
    tools: Option<&Value>,
    room: usize,
    limit: usize,
    mut c: Compression,
) -> Result<(Vec<u32>, Option<Compression>), ApiError> {
    // A summary note right after the system messages stays: it is what the dropped turns were.
    let keep = head + usize::from(c.summarized.is_some());
    while list.len() > keep + 1 {
        // The oldest turn after the system prompt, with the tool results that follow it.
        list.remove(keep);
        c.dropped_messages += 1;
        while list.len() > keep + 1
            && list[keep].get("role").and_then(Value::as_str) == Some("tool")
        {
            list.remove(keep);
            c.dropped_messages += 1;
        }
        let ids = model.render_ids(&Value::Array(list.clone()), tools)?;
        if ids.len() + room <= limit {
            c.tokens_after = ids.len();
            return Ok((ids, Some(c)));
        }
    }
    let last = model.render_ids(&Value::Array(list), tools)?;
    if last.len() + room <= model.max_context {
        // Over the trigger but within the context: run it as it is.
        c.tokens_after = last.len();
        return Ok((last, Some(c)));
    }
    Err(ApiError::invalid(
        format!(
            "middle-out dropped all {} earlier messages, but the system prompt and the last message alone take {} tokens and this model's {}-token context must also hold {room} for the reply ({} too many): shorten them",
            c.dropped_messages,
            last.len(),
            model.max_context,
            last.len() + room - model.max_context
        ),
        Some("messages"),
    )
    .with_code("context_length_exceeded"))
}

/// Ask `model` for a short summary of `turns` (greedy, at most [`SUMMARY_MAX_TOKENS`]).
async fn summarize(
    s: &AppState,
    model: &Arc<Model>,
    turns: &[Value],
    cache_scope: u64,
) -> Result<String, ApiError> {
    // A transcript too long to summarise in one pass keeps its most recent turns.
    let mut prompt = Vec::new();
    for start in 0..turns.len() {
        let mut transcript = String::new();
        for t in &turns[start..] {
            let role = t.get("role").and_then(Value::as_str).unwrap_or("user");
            let content = t.get("content").and_then(Value::as_str).unwrap_or_default();
            transcript.push_str(&format!("{role}: {content}\n"));
        }
        let msgs = json!([
            {"role": "system", "content": "You summarize conversations. Keep names, numbers, facts and decisions; write a few plain sentences."},
            {"role": "user", "content": format!("Summarize this conversation:\n\n{transcript}")},
        ]);
        prompt = model.render_ids(&msgs, None)?;
        if prompt.len() + SUMMARY_MAX_TOKENS < model.max_context {
            break;
        }
    }
    if prompt.len() + SUMMARY_MAX_TOKENS >= model.max_context {
        return Err(ApiError::invalid(
            "summarize: even the most recent turn alone is too long to summarise in this model's context: shorten it or use middle-out",
            Some("messages"),
        )
        .with_code("context_length_exceeded"));
    }
    let opts = GenerateOptions {
        params: SamplingParams::greedy(),
        max_tokens: SUMMARY_MAX_TOKENS,
        stop: Vec::new(),
        end_ids: model.end_ids.clone(),
        seed: 0,
        grammar: None,
    };
    let job = generate::start(s, model, prompt, opts, 1, cache_scope).await?;
    Ok(generate::text_of(job).await?.trim().to_owned())
}
