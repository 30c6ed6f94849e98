//! Reward models over HTTP.
//!
//! * `POST /v1/rewards` `{"model", "messages", "tools"?}` → `{"object": "reward", "model",
//!   "score", "usage"}`: the served reward model's score of the conversation (rendered with
//!   the chat template as in training; the score is read at its last token).
//! * Best-of-n on chat completions: the extension field `"best_of": {"n": N, "reward_model":
//!   ID}` samples N candidates, scores each conversation-plus-candidate with the reward model,
//!   and answers with the highest-scored one; `best_of` in the reply lists every candidate's
//!   score and which was chosen.
//!
//! A reward model is a served adapter with a score head (`ferrolm serve --lora NAME=RUN` with a
//! `ferrolm finetune --method reward` run): its requests run in the engine's batches like any
//! other and end after the prompt with the score instead of a token.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ferrolm_engine::{Event, Usage};
use ferrolm_sample::SamplingParams;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::{parse, AppState, Levers, Model, Worst};

/// Most candidates one best-of request may ask for.
pub const MAX_BEST_OF: usize = 16;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RewardRequest {
    model: Option<String>,
    messages: Vec<Value>,
    #[serde(default)]
    tools: Option<Value>,
}

/// The served model `asked`, which must be a reward model.
fn reward_model(
    s: &AppState,
    caller: &Caller,
    asked: Option<&str>,
    param: &'static str,
) -> Result<Arc<Model>, ApiError> {
    let m = s.model(caller.key_id(), asked)?;
    if m.adapter.as_ref().and_then(|a| a.score.as_ref()).is_none() {
        return Err(ApiError::invalid(
            format!(
                "`{}` is not a reward model (it has no score head): serve one with `ferrolm serve --lora NAME=RUN`, RUN a `ferrolm finetune --method reward` run, and name it here",
                m.id
            ),
            Some(param),
        )
        .with_code("not_a_reward_model"));
    }
    Ok(m)
}

/// The ids of `messages` as the reward model reads them, checked against its context.
fn conversation(
    m: &Model,
    messages: &[Value],
    tools: Option<&Value>,
) -> Result<Vec<u32>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages is empty: send the conversation to score, ending with the reply",
            Some("messages"),
        ));
    }
    if let Some(i) = messages
        .iter()
        .position(|m| m.get("role").and_then(Value::as_str).is_none())
    {
        return Err(ApiError::invalid(
            format!(
                "messages[{i}] has no `role`: each message is {{\"role\": ..., \"content\": ...}}"
            ),
            Some("messages"),
        ));
    }
    let ids = m
        .template
        .conversation_ids(&m.tok, &Value::Array(messages.to_vec()), tools)
        .map_err(|e| ApiError::invalid(format!("messages: {e}"), Some("messages")))?;
    if ids.len() >= m.max_context {
        return Err(ApiError::invalid(
            format!(
                "the conversation has {} tokens, more than the {} the reward model `{}` may read here",
                ids.len(),
                m.max_context.saturating_sub(1),
                m.id
            ),
            Some("messages"),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(ids)
}

/// Run `ids` through the reward model `m` in its engine: the score and what it used.
async fn score(
    s: &AppState,
    m: &Arc<Model>,
    ids: Vec<u32>,
    scope: u64,
) -> Result<(f32, Usage), ApiError> {
    let opts = m.options(&ids, SamplingParams::default(), Some(1), Vec::new(), None)?;
    let mut job = crate::generate::start(s, m, ids, opts, 1, scope).await?;
    while let Some((_, ev)) = job.next().await {
        match ev {
            Event::Finished {
                score: Some(x),
                usage,
                ..
            } => return Ok((x, usage)),
            Event::Error(e) => {
                return Err(ApiError::server(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    e.message,
                ))
            }
            _ => {}
        }
    }
    Err(ApiError::server(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("the engine of `{}` ended the request without a score", m.id),
    ))
}

/// Score several conversations with `m`, admitted and written to the ledger as one request to
/// `endpoint`.
async fn score_all(
    s: &AppState,
    caller: &Caller,
    m: &Arc<Model>,
    convs: Vec<Vec<u32>>,
    endpoint: &'static str,
) -> Result<(Vec<f32>, Usage, f64, Vec<(&'static str, String)>), ApiError> {
    let tokens: usize = convs.iter().map(Vec::len).sum();
    let ticket = s.admit(
        caller,
        Worst {
            prompt_tokens: tokens as u64,
            completion_tokens: 0,
            price: m.price.as_ref(),
        },
    )?;
    // Submitted together, so the engine batches them.
    let runs: Vec<_> = convs
        .into_iter()
        .map(|ids| {
            let (s, m, scope) = (s.clone(), m.clone(), caller.cache_scope);
            tokio::spawn(async move { score(&s, &m, ids, scope).await })
        })
        .collect();
    let mut results = Vec::with_capacity(runs.len());
    for r in runs {
        results.push(r.await.unwrap_or_else(|e| {
            Err(ApiError::server(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("scoring failed: {e}"),
            ))
        }));
    }
    let mut usage = Usage::default();
    let mut scores = Vec::with_capacity(results.len());
    let mut failed = None;
    for r in results {
        match r {
            Ok((x, u)) => {
                scores.push(x);
                usage.prompt_tokens += u.prompt_tokens;
                usage.cached_tokens += u.cached_tokens;
            }
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    let levers = Levers::default();
    let settled = levers.settled(m, endpoint, usage, None, Some("stop"));
    let cost = s.settle(caller, &ticket, settled)?;
    if let Some(e) = failed {
        return Err(e);
    }
    Ok((scores, usage, cost, ticket.headers.clone()))
}

/// `POST /v1/rewards`.
pub async fn create(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: RewardRequest = parse(&body)?;
    let m = reward_model(&s, &caller, req.model.as_deref(), "model")?;
    let ids = conversation(&m, &req.messages, req.tools.as_ref())?;
    let (scores, usage, cost, headers) =
        score_all(&s, &caller, &m, vec![ids], "/v1/rewards").await?;
    let body = json!({
        "object": "reward",
        "model": m.id,
        "score": scores[0],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "total_tokens": usage.prompt_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        },
    });
    Ok(crate::generate::with_headers(
        Json(body).into_response(),
        &headers,
        Some(cost),
    ))
}

/// A chat request's `best_of` field, checked.
pub struct BestOf {
    pub n: usize,
    pub reward_model: String,
}

impl BestOf {
    /// Take `best_of` out of a chat request body, if it has one; the body left is the
    /// request for the candidates (`n` of them, not streamed).
    pub fn take(body: &mut Value) -> Result<Option<BestOf>, ApiError> {
        let Some(b) = body.as_object_mut().and_then(|o| o.remove("best_of")) else {
            return Ok(None);
        };
        let bad = |msg: String| Err(ApiError::invalid(msg, Some("best_of")));
        let Some(o) = b.as_object() else {
            return bad("best_of must be an object: {\"n\": 4, \"reward_model\": \"ID\"}".into());
        };
        if let Some(k) = o
            .keys()
            .find(|k| !["n", "reward_model"].contains(&k.as_str()))
        {
            return bad(format!(
                "best_of has an unknown field `{k}`: it takes `n` and `reward_model`"
            ));
        }
        let n = match o.get("n").and_then(Value::as_u64) {
            Some(n) if (2..=MAX_BEST_OF as u64).contains(&n) => n as usize,
            _ => return bad(format!("best_of.n must be a whole number from 2 to {MAX_BEST_OF}: the candidates to sample")),
        };
        let Some(rm) = o.get("reward_model").and_then(Value::as_str) else {
            return bad("best_of.reward_model is missing: name a served reward model".into());
        };
        let Some(req) = body.as_object_mut() else {
            return bad("the request must be a JSON object".into());
        };
        if req.get("stream").and_then(Value::as_bool) == Some(true) {
            return bad("best_of cannot stream: every candidate is scored before one is chosen; leave out stream".into());
        }
        if req.get("n").and_then(Value::as_u64).is_some_and(|x| x != 1) {
            return bad("best_of returns one choice: leave out n (best_of.n is how many candidates are sampled)".into());
        }
        req.insert("n".into(), json!(n));
        Ok(Some(BestOf {
            n,
            reward_model: rm.to_owned(),
        }))
    }

    /// The reward model, checked before any candidate is sampled.
    pub fn model(&self, s: &AppState, caller: &Caller) -> Result<Arc<Model>, ApiError> {
        reward_model(s, caller, Some(&self.reward_model), "best_of.reward_model")
    }

    /// Score the candidates of `reply` (a chat completion with `n` choices) and keep the best.
    pub async fn choose(
        &self,
        s: &AppState,
        caller: &Caller,
        rm: &Arc<Model>,
        messages: &[Value],
        tools: Option<&Value>,
        mut reply: Value,
    ) -> Result<Value, ApiError> {
        let choices = reply["choices"].as_array().cloned().unwrap_or_default();
        let mut convs = Vec::with_capacity(choices.len());
        for c in &choices {
            let mut m = c["message"].clone();
            if let Some(o) = m.as_object_mut() {
                // what the reward model reads is the reply as a conversation turn
                o.retain(|k, v| {
                    ["role", "content", "tool_calls"].contains(&k.as_str()) && !v.is_null()
                });
                o.entry("content").or_insert(json!(""));
            }
            let mut conv = messages.to_vec();
            conv.push(m);
            convs.push(conversation(rm, &conv, tools)?);
        }
        let (scores, usage, cost, _) =
            score_all(s, caller, rm, convs, "/v1/chat/completions").await?;
        let best = scores
            .iter()
            .enumerate()
            .fold(0, |b, (i, x)| if *x > scores[b] { i } else { b });
        let mut chosen = choices.get(best).cloned().unwrap_or(Value::Null);
        chosen["index"] = json!(0);
        reply["choices"] = json!([chosen]);
        reply["best_of"] = json!({
            "n": self.n,
            "reward_model": rm.id,
            "scores": scores,
            "chosen": best,
            "finish_reasons": choices.iter().map(|c| c["finish_reason"].clone()).collect::<Vec<_>>(),
            "usage": {"prompt_tokens": usage.prompt_tokens, "cost_usd": cost},
        });
        Ok(reply)
    }
}
