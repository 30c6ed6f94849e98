//! What to do with a conversation that does not fit the context window: a declared strategy,
//! never silent truncation.
//!
//! * `error` (the default): the request is a 400 that says by how many tokens it is over.
//! * `middle-out`: drop the oldest turns after the leading system messages — an assistant turn
//!   goes with the tool results that answer it — until the prompt leaves room for the reply;
//!   the system prompt and the latest turns stay verbatim. If even the system messages and the
//!   last message do not fit, it is a 400 that says so.
//!
//! The strategy comes from the request (`context_strategy`, an extension field) or the
//! server's `--context-strategy`. A compressed request's response carries
//! `x-ferrolm-context: middle-out; dropped_messages=N; prompt_tokens=FROM->TO`.

use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;
use crate::{normalize_messages, Model};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    #[default]
    Error,
    MiddleOut,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "error" => Ok(Strategy::Error),
            "middle-out" => Ok(Strategy::MiddleOut),
            other => Err(format!(
                "`{other}` is not a context strategy: use error or middle-out"
            )),
        }
    }
}

/// What a strategy did to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compression {
    pub dropped_messages: usize,
    pub tokens_before: usize,
    pub tokens_after: usize,
}

impl Compression {
    /// Prompt tokens removed.
    pub fn saved(&self) -> usize {
        self.tokens_before - self.tokens_after
    }

    /// The `x-ferrolm-context` header value.
    pub fn header(&self) -> String {
        format!(
            "middle-out; dropped_messages={}; prompt_tokens={}->{}",
            self.dropped_messages, self.tokens_before, self.tokens_after
        )
    }
}

/// Render `messages` for `model`, applying `strategy` if the prompt would leave no room for
/// `max_tokens` (or for one token when none is asked).
pub fn fit_chat(
    model: &Model,
    messages: &Value,
    tools: Option<&Value>,
    strategy: Strategy,
    max_tokens: Option<usize>,
) -> Result<(Vec<u32>, Option<Compression>), ApiError> {
    let msgs = normalize_messages(messages)?;
    let ids = model.render_ids(&msgs, tools)?;
    let room = max_tokens.unwrap_or(1).max(1);
    let fits = |n: usize| n + room <= model.max_context;
    if fits(ids.len()) || strategy == Strategy::Error {
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
    let before = ids.len();
    let mut dropped = 0;
    while list.len() > head + 1 {
        // The oldest turn after the system prompt, with the tool results that follow it.
        list.remove(head);
        dropped += 1;
        while list.len() > head + 1
            && list[head].get("role").and_then(Value::as_str) == Some("tool")
        {
            list.remove(head);
            dropped += 1;
        }
        let ids = model.render_ids(&Value::Array(list.clone()), tools)?;
        if fits(ids.len()) {
            let c = Compression {
                dropped_messages: dropped,
                tokens_before: before,
                tokens_after: ids.len(),
            };
            return Ok((ids, Some(c)));
        }
    }
    let last = model.render_ids(&Value::Array(list), tools)?;
    Err(ApiError::invalid(
        format!(
            "middle-out dropped all {dropped} earlier messages, but the system prompt and the last message alone take {} tokens and this model's {}-token context must also hold {room} for the reply ({} too many): shorten them",
            last.len(),
            model.max_context,
            last.len() + room - model.max_context
        ),
        Some("messages"),
    )
    .with_code("context_length_exceeded"))
}
