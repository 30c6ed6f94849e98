//! Supervised fine-tuning data: OpenAI's chat fine-tuning format (JSONL, one
//! `{"messages": [...], "tools": [...]?}` per line, optional `weight: 0|1` on assistant
//! messages), validated line by line, rendered with the model's own chat template, with the
//! loss only on the assistant tokens that carry weight.
//!
//! Which tokens are an assistant's: render the conversation through that message (`Q`) and
//! again with the message's content emptied; they agree up to where the content starts, and
//! the message's tokens run from there to the end of `Q` — its text and the end-of-turn the
//! template writes, so the model learns to stop. `Q` must be a prefix of the whole
//! conversation's tokens (templates render incrementally); a conversation where it is not is
//! an error naming the line.

use ferrolm_tokenizer::{chat::ChatTemplate, Tokenizer};
use serde_json::Value;

use crate::model::{SplitMix, IGNORE};

/// One bad line of a training file (1-based), and why.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LineError {
    pub line: usize,
    pub reason: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

/// A validated conversation.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub line: usize,
    pub messages: Value,
    pub tools: Option<Value>,
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Parse and validate a chat fine-tuning file; every bad line is reported (up to 100).
pub fn parse_jsonl(text: &str) -> Result<Vec<Conversation>, Vec<LineError>> {
    parse_lines(
        text,
        |line, n| {
            parse_line(line).map(|(messages, tools)| Conversation {
                line: n,
                messages,
                tools,
            })
        },
        "the file has no examples: one JSON object per line, {\"messages\": [...]}",
    )
}

/// Each non-blank line of a JSONL training file through `parse` (given the line and its
/// 1-based number): every item, or every bad line (up to 100) with its reason; a file without
/// any line is one error, `empty`.
pub fn parse_lines<T>(
    text: &str,
    parse: impl Fn(&str, usize) -> Result<T, String>,
    empty: &str,
) -> Result<Vec<T>, Vec<LineError>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse(line, i + 1) {
            Ok(item) => out.push(item),
            Err(reason) => {
                errors.push(LineError {
                    line: i + 1,
                    reason,
                });
                if errors.len() >= 100 {
                    break;
                }
            }
        }
    }
    if out.is_empty() && errors.is_empty() {
        errors.push(LineError {
            line: 1,
            reason: empty.into(),
        });
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// One chat line: its messages and tools, validated.
pub(crate) fn parse_line(line: &str) -> Result<(Value, Option<Value>), String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or("each line must be a JSON object with a `messages` array")?;
    if obj.contains_key("preferred_output") && !obj.contains_key("messages") {
        return Err("this is a preference (DPO) pair, not a chat line: fine-tune it with --method dpo (method.type \"dpo\" in the API)".into());
    }
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("missing `messages` (an array of {role, content} objects)")?;
    if messages.is_empty() {
        return Err("`messages` is empty".into());
    }
    let learnable = check_messages(messages)?;
    if learnable == 0 {
        return Err("no assistant message to learn from (every assistant message has weight 0, or there is none)".into());
    }
    Ok((Value::Array(messages.clone()), obj.get("tools").cloned()))
}

/// Check each message's role, content and `weight`; the number of assistant messages that
/// carry weight (are learned from).
pub fn check_messages(messages: &[Value]) -> Result<usize, String> {
    let mut learnable = 0;
    for (j, m) in messages.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("message {j} has no `role`"))?;
        if !ROLES.contains(&role) {
            return Err(format!(
                "message {j}: unknown role `{role}` (expected one of {ROLES:?})"
            ));
        }
        let content_ok = match m.get("content") {
            Some(Value::String(_)) => true,
            Some(Value::Array(parts)) => parts.iter().all(|p| {
                p.get("type").and_then(Value::as_str) == Some("text")
                    && p.get("text").is_some_and(Value::is_string)
            }),
            None | Some(Value::Null) => role == "assistant" && m.get("tool_calls").is_some(),
            _ => false,
        };
        if !content_ok {
            return Err(format!(
                "message {j} ({role}): `content` must be a string or an array of text parts"
            ));
        }
        match m.get("weight") {
            None => {}
            Some(w) if role != "assistant" => {
                return Err(format!(
                    "message {j} ({role}): `weight` {w} is only allowed on assistant messages"
                ))
            }
            Some(w) if w.as_u64() == Some(0) || w.as_u64() == Some(1) => {}
            Some(w) => return Err(format!("message {j}: `weight` must be 0 or 1, not {w}")),
        }
        if role == "assistant" && m.get("weight").and_then(Value::as_u64) != Some(0) {
            learnable += 1;
        }
    }
    Ok(learnable)
}

/// A tokenized example: the ids, and for each position whether predicting it is trained.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

impl Example {
    /// Tokens whose prediction is trained.
    pub fn trained_tokens(&self) -> usize {
        self.trained.iter().skip(1).filter(|&&t| t).count()
    }
}

/// Render and tokenize `c`; positions of weighted assistant messages are trained.
pub fn encode(
    tok: &Tokenizer,
    template: &ChatTemplate,
    c: &Conversation,
) -> Result<Example, String> {
    let msgs = c.messages.as_array().cloned().unwrap_or_default();
    let tools = c.tools.as_ref();
    // Tokens of the first `upto` messages (message `blank`'s content emptied).
    let ids_of = |upto: usize, blank: Option<usize>| -> Result<Vec<u32>, String> {
        let m = Value::Array(
            msgs[..upto]
                .iter()
                .enumerate()
                .map(|(j, m)| {
                    let mut m = strip_weight(m);
                    if Some(j) == blank {
                        m["content"] = Value::String(String::new());
                    }
                    m
                })
                .collect(),
        );
        template
            .conversation_ids(tok, &m, tools)
            .map_err(|e| e.to_string())
    };
    let ids = ids_of(msgs.len(), None)?;
    let mut trained = vec![false; ids.len()];
    for (i, m) in msgs.iter().enumerate() {
        if m["role"] != "assistant" || m.get("weight").and_then(Value::as_u64) == Some(0) {
            continue;
        }
        // Where message i's content starts: render the conversation through it once as is
        // and once with its content empty; the tokens agree up to there. (Rendering the
        // prefix alone is not enough: templates add a default system prompt only to a
        // non-empty conversation, and a content's first token can merge with the header.)
        let q = ids_of(i + 1, None)?;
        let empty = ids_of(i + 1, Some(i))?;
        let start = q.iter().zip(&empty).take_while(|(a, b)| a == b).count();
        if !ids.starts_with(&q) {
            return Err(format!(
                "line {}: the chat template does not render this conversation incrementally (message {i}'s prefix changes), so its assistant tokens cannot be located",
                c.line
            ));
        }
        trained[start..q.len()].iter_mut().for_each(|t| *t = true);
    }
    Ok(Example { ids, trained })
}

fn strip_weight(m: &Value) -> Value {
    let mut m = m.clone();
    if let Some(o) = m.as_object_mut() {
        o.remove("weight");
    }
    m
}

/// Examples in batches of `batch` rows of `ctx` positions: inputs (padded with `pad`) and
/// targets ([`IGNORE`] where untrained or padding). Each epoch is a seeded permutation;
/// `cursor` (examples consumed) is the whole state, so a checkpoint resumes exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SftBatcher {
    pub seed: u64,
    pub cursor: u64,
}

impl SftBatcher {
    /// The index of the next of `n` examples (pairs, …), and advance.
    pub fn take(&mut self, n: usize) -> usize {
        let i = self.index(self.cursor, n);
        self.cursor += 1;
        i
    }

    /// The example index at position `k` of the stream (epoch after epoch).
    fn index(&self, k: u64, n: usize) -> usize {
        let epoch = k / n as u64;
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = SplitMix(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for i in (1..n).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order[(k % n as u64) as usize]
    }

    /// Fill `inputs` and `targets` (batch × ctx) with the next `batch` examples.
    pub fn next(
        &mut self,
        examples: &[Example],
        batch: usize,
        ctx: usize,
        pad: u32,
        inputs: &mut Vec<u32>,
        targets: &mut Vec<u32>,
    ) {
        inputs.clear();
        targets.clear();
        for _ in 0..batch {
            let ex = &examples[self.take(examples.len())];
            row(ex, ctx, pad, inputs, targets);
        }
    }
}

/// One example as a row of `ctx` inputs and targets (truncated or padded).
pub fn row(ex: &Example, ctx: usize, pad: u32, inputs: &mut Vec<u32>, targets: &mut Vec<u32>) {
    for j in 0..ctx {
        inputs.push(ex.ids.get(j).copied().unwrap_or(pad));
        let t = match (ex.ids.get(j + 1), ex.trained.get(j + 1)) {
            (Some(&id), Some(true)) => id,
            _ => IGNORE,
        };
        targets.push(t);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_are_reported_by_number_and_reason() {
        let text = concat!(
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
            "not json\n",
            "{\"messages\": []}\n",
            "{\"messages\": [{\"role\": \"wizard\", \"content\": \"x\"}]}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\", \"weight\": 1}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"a\", \"weight\": 2}]}\n",
        );
        let errs = parse_jsonl(text).unwrap_err();
        let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5, 6, 7]);
        assert!(errs[0].reason.contains("not valid JSON"));
        assert!(errs[2].reason.contains("unknown role `wizard`"));
        assert!(errs[3].reason.contains("no assistant message"));
        assert!(errs[4].reason.contains("only allowed on assistant"));
        assert!(errs[5].reason.contains("0 or 1"));
    }

    #[test]
    fn rows_pad_and_ignore_untrained_positions() {
        let ex = Example {
            ids: vec![5, 6, 7, 8],
            trained: vec![false, false, true, true],
        };
        let (mut i, mut t) = (vec![], vec![]);
        row(&ex, 6, 0, &mut i, &mut t);
        assert_eq!(i, vec![5, 6, 7, 8, 0, 0]);
        assert_eq!(t, vec![IGNORE, 7, 8, IGNORE, IGNORE, IGNORE]);
    }

    #[test]
    fn batches_visit_every_example_once_per_epoch_and_resume() {
        let exs: Vec<Example> = (0..7)
            .map(|k| Example {
                ids: vec![k, k],
                trained: vec![true, true],
            })
            .collect();
        let mut b = SftBatcher { seed: 3, cursor: 0 };
        let (mut i, mut t) = (vec![], vec![]);
        let mut seen = vec![];
        for _ in 0..7 {
            b.next(&exs, 1, 1, 0, &mut i, &mut t);
            seen.push(i[0]);
        }
        seen.sort();
        assert_eq!(seen, (0..7).collect::<Vec<u32>>());
        let saved = b;
        b.next(&exs, 3, 1, 0, &mut i, &mut t);
        let first = i.clone();
        let mut again = saved;
        again.next(&exs, 3, 1, 0, &mut i, &mut t);
        assert_eq!(i, first);
    }
}
