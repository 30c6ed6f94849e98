//! Tier routing: a virtual model (e.g. `auto`) sends each chat request to the cheapest tier
//! expected to handle it, and falls back along the tiers when one is saturated or fails.
//!
//! Contract: [`Router::candidates`] returns, for a request's [`Needs`], the tiers to try in
//! order — from the first (cheapest) whose rules admit the request through the last (the top
//! tier, which takes anything). A tier's rules: `max_prompt_tokens` (longer prompts go up) and
//! whether it takes requests with tools, JSON output, or code. The handler tries each
//! candidate in turn when the previous one answers 429 (queue full), 503 (engine gone) or
//! `context_length_exceeded`; the response's `model` names the tier that answered, and the
//! ledger records the route and what the same tokens would have cost on the top tier.

use std::sync::Arc;

use serde_json::Value;

use ferrolm_accounting::ModelPrice;

use crate::error::ApiError;
use crate::upstream::Upstream;
use crate::{AppState, Model};

/// Where a request can go.
#[derive(Clone)]
pub enum Target {
    Local(Arc<Model>),
    Upstream(Arc<Upstream>),
}

impl Target {
    pub fn price(&self) -> Option<&ModelPrice> {
        match self {
            Target::Local(m) => m.price.as_ref(),
            Target::Upstream(u) => u.price.as_ref(),
        }
    }
}

/// One tier of a router, cheapest first.
#[derive(Debug, Clone)]
pub struct Tier {
    /// The served model's id.
    pub model: String,
    pub max_prompt_tokens: Option<usize>,
    pub tools: bool,
    pub json: bool,
    pub code: bool,
}

/// A virtual model.
#[derive(Debug, Clone)]
pub struct Router {
    pub id: String,
    pub tiers: Vec<Tier>,
}

/// What a request needs from a tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    pub prompt_tokens: usize,
    pub tools: bool,
    pub json: bool,
    pub code: bool,
}

impl Tier {
    fn admits(&self, n: &Needs) -> bool {
        self.max_prompt_tokens.is_none_or(|m| n.prompt_tokens <= m)
            && (self.tools || !n.tools)
            && (self.json || !n.json)
            && (self.code || !n.code)
    }
}

impl Router {
    /// The tiers to try for `needs`, in order; the top tier is always last.
    pub fn candidates(&self, s: &AppState, needs: &Needs) -> Result<Vec<Target>, ApiError> {
        let last = self.tiers.len().saturating_sub(1);
        let first = self
            .tiers
            .iter()
            .position(|t| t.admits(needs))
            .unwrap_or(last);
        self.tiers[first..]
            .iter()
            .map(|t| s.target(&t.model))
            .collect()
    }

    /// The top tier (the cost baseline of routing).
    pub fn top(&self, s: &AppState) -> Result<Target, ApiError> {
        let t = self
            .tiers
            .last()
            .ok_or_else(|| ApiError::invalid(format!("router `{}` has no tiers", self.id), None))?;
        s.target(&t.model)
    }
}

/// A router's id and its top tier's price (the baseline of what routing saved).
pub type Route = Option<(String, Option<ModelPrice>)>;

/// The prompt a router rendered to measure a request: the model whose template and tokenizer
/// made it, and the ids (reused when that model, or one sharing both, answers).
pub type Rendered = Option<(Arc<Model>, Vec<u32>)>;

/// Where a chat request naming `asked` may go, in the order to try: the one model (local or
/// upstream) it names, or a router's tiers from the first that takes it; with a router, its
/// [`Route`] and the prompt it rendered.
pub fn targets(
    s: &AppState,
    key: Option<i64>,
    asked: Option<&str>,
    messages: &Value,
    tools: Option<&Value>,
    json: bool,
) -> Result<(Vec<Target>, Route, Rendered), ApiError> {
    let Some(r) = s.router(asked) else {
        let t = match s.upstream(asked) {
            Some(u) => Target::Upstream(u),
            None => Target::Local(s.model(key, asked)?),
        };
        return Ok((vec![t], None, None));
    };
    // The prompt's length by the first local tier's tokenizer (upstreams only: ~4 bytes a token).
    let local = r.tiers.iter().find_map(|t| match s.target(&t.model) {
        Ok(Target::Local(m)) => Some(m),
        _ => None,
    });
    let rendered = match local {
        Some(m) => {
            let ids = m.chat_prompt(messages, tools)?;
            Some((m, ids))
        }
        None => None,
    };
    let prompt_tokens = match &rendered {
        Some((_, ids)) => ids.len(),
        None => messages.to_string().len() / 4,
    };
    let needs = Needs {
        prompt_tokens,
        tools: tools.is_some(),
        json,
        code: looks_like_code(messages),
    };
    let top = r.top(s)?;
    Ok((
        r.candidates(s, &needs)?,
        Some((r.id.clone(), top.price().cloned())),
        rendered,
    ))
}

/// Does any message look like code? (Fenced blocks, or several lines that end like code.)
pub fn looks_like_code(messages: &Value) -> bool {
    let Some(list) = messages.as_array() else {
        return false;
    };
    list.iter()
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .any(|c| {
            c.contains("```")
                || c.lines()
                    .filter(|l| {
                        let l = l.trim_end();
                        l.ends_with(';') || l.ends_with('{') || l.ends_with("):")
                    })
                    .count()
                    >= 3
        })
}

/// May a routed request move on to the next tier after this error?
pub fn falls_back(e: &ApiError) -> bool {
    e.status.as_u16() == 429 && e.code == Some("server_overloaded")
        || e.status.as_u16() == 503
        || e.code == Some("context_length_exceeded")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tier(max: Option<usize>, tools: bool) -> Tier {
        Tier {
            model: "m".into(),
            max_prompt_tokens: max,
            tools,
            json: true,
            code: false,
        }
    }

    #[test]
    fn tiers_admit_by_length_tools_and_code() {
        let small = tier(Some(100), false);
        let short = Needs {
            prompt_tokens: 20,
            ..Needs::default()
        };
        assert!(small.admits(&short));
        assert!(!small.admits(&Needs {
            prompt_tokens: 101,
            ..short
        }));
        assert!(!small.admits(&Needs {
            tools: true,
            ..short
        }));
        assert!(!small.admits(&Needs {
            code: true,
            ..short
        }));
        assert!(tier(None, true).admits(&Needs {
            prompt_tokens: 1_000_000,
            tools: true,
            json: true,
            code: false,
        }));
    }

    #[test]
    fn code_is_recognised() {
        assert!(looks_like_code(
            &json!([{"role": "user", "content": "Fix this:\n```rust\nfn main() {}\n```"}])
        ));
        assert!(looks_like_code(
            &json!([{"role": "user", "content": "int a = 1;\nint b = 2;\nif (a) {\n}"}])
        ));
        assert!(!looks_like_code(
            &json!([{"role": "user", "content": "Hello; how are you?"}])
        ));
    }
}
