//! Tool calling: tools into the prompt, tool calls out of the text.
//!
//! Contract: a template that knows tools (its source mentions `tools`) gets them as the
//! template variable; for one that does not (SmolLM2's), the tools are described in the system
//! message in the Hermes format that most open models were tuned on, earlier assistant
//! `tool_calls` are written back as `<tool_call>{json}</tool_call>` blocks, and `tool` messages
//! become user turns wrapped in `<tool_response>`. The reply is parsed back the same way: each
//! `<tool_call>` block whose JSON names a declared tool becomes an OpenAI `tool_calls` entry.
//! `tool_choice: "required"` or a named function is enforced by a grammar
//! ([`ferrolm_grammar::Grammar::tool_calls`]), so the reply is always a valid call; `auto`
//! leaves the model free and parses whatever calls it made; `none` leaves tools out.

use ferrolm_grammar::{Grammar, ToolSpec};
use ferrolm_tokenizer::chat::ChatTemplate;
use serde_json::{json, Value};

use crate::error::ApiError;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// Does the template render a `tools` variable itself?
pub fn template_knows_tools(t: &ChatTemplate) -> bool {
    t.source.contains("tools")
}

/// How the request wants tools used.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A request's tools, validated.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `[{type: function, function: {name, description, parameters}}]`, as sent.
    pub raw: Value,
    pub specs: Vec<ToolSpec>,
    pub choice: Choice,
    /// Whether a forced call (`required`) may be followed by more: only when the request says
    /// `parallel_tool_calls: true` itself, as llama.cpp decides. OpenAI's default is `true`, but
    /// a forced grammar that may always go on lets a small model repeat the call until
    /// `max_tokens` (SmolLM2 did, and the cut reply lost every call); `auto` replies are parsed
    /// for any number of calls either way.
    pub parallel: bool,
}

/// One parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    pub arguments: Value,
}

impl Tools {
    /// Validate `tools` (OpenAI's or Ollama's shape) and `tool_choice`. `None` when no tools.
    pub fn parse(
        tools: Option<&Value>,
        choice: Option<&Value>,
        parallel: Option<bool>,
    ) -> Result<Option<Tools>, ApiError> {
        let bad = |m: String| ApiError::invalid(m, Some("tools"));
        let list = match tools {
            None | Some(Value::Null) => &Vec::new(),
            Some(Value::Array(a)) => a,
            Some(_) => return Err(bad("tools must be an array of {\"type\": \"function\", \"function\": {\"name\", \"parameters\"}} objects".into())),
        };
        let mut specs = Vec::with_capacity(list.len());
        for (i, t) in list.iter().enumerate() {
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad(format!(
                    "tools[{i}].type must be \"function\" (the only kind of tool)"
                )));
            }
            let f = t.get("function").unwrap_or(&Value::Null);
            let Some(name) = f.get("name").and_then(Value::as_str).filter(|n| {
                !n.is_empty()
                    && n.len() <= 64
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            }) else {
                return Err(bad(format!(
                    "tools[{i}].function.name must be 1-64 letters, digits, `_` or `-`"
                )));
            };
            if specs.iter().any(|s: &ToolSpec| s.name == name) {
                return Err(bad(format!("tools[{i}]: the name `{name}` is used twice")));
            }
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(p @ Value::Object(_)) => p.clone(),
                Some(_) => {
                    return Err(bad(format!(
                        "tools[{i}].function.parameters must be a JSON Schema object"
                    )))
                }
            };
            crate::validate::json_schema(&parameters, &format!("tools[{i}].function.parameters"))?;
            specs.push(ToolSpec {
                name: name.to_owned(),
                parameters,
            });
        }
        let choice = match choice {
            None | Some(Value::Null) => Choice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => Choice::None,
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                other => {
                    return Err(ApiError::invalid(
                        format!("tool_choice `{other}` is not one of none, auto, required, or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"),
                        Some("tool_choice"),
                    ))
                }
            },
            Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
                Some(n) => Choice::Named(n.to_owned()),
                None => {
                    return Err(ApiError::invalid(
                        "tool_choice must be none, auto, required, or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        Some("tool_choice"),
                    ))
                }
            },
        };
        if specs.is_empty() {
            return match choice {
                Choice::Required | Choice::Named(_) => Err(ApiError::invalid(
                    "tool_choice asks for a tool call but `tools` is empty",
                    Some("tool_choice"),
                )),
                _ => Ok(None),
            };
        }
        if let Choice::Named(n) = &choice {
            if !specs.iter().any(|s| &s.name == n) {
                return Err(ApiError::invalid(
                    format!("tool_choice names `{n}`, which is not among `tools`"),
                    Some("tool_choice"),
                ));
            }
        }
        Ok(Some(Tools {
            raw: Value::Array(list.clone()),
            specs,
            choice,
            parallel: parallel == Some(true),
        }))
    }

    /// The tools the prompt should describe (none for `tool_choice: "none"`).
    pub fn for_prompt(&self) -> Option<&Value> {
        (self.choice != Choice::None).then_some(&self.raw)
    }

    /// The grammar that forces a call, for `required` and a named function.
    pub fn grammar(&self) -> Result<Option<Grammar>, ApiError> {
        let (specs, parallel): (Vec<ToolSpec>, bool) = match &self.choice {
            Choice::None | Choice::Auto => return Ok(None),
            Choice::Required => (self.specs.clone(), self.parallel),
            Choice::Named(n) => (
                self.specs
                    .iter()
                    .filter(|s| &s.name == n)
                    .cloned()
                    .collect(),
                false,
            ),
        };
        Grammar::tool_calls(&specs, parallel)
            .map(Some)
            .map_err(|e| ApiError::invalid(format!("tools: {e}"), Some("tools")))
    }

    /// Split a reply into its text and its calls. Calls that do not parse, or name no declared
    /// tool, leave the whole reply as text (never a call the client did not declare) — except
    /// an unclosed last block after complete calls (a reply cut by `max_tokens`): the complete
    /// calls are kept and the cut one dropped ([`finish_reason`] then says `length`).
    pub fn parse_reply(&self, text: &str) -> (Option<String>, Vec<Call>) {
        if self.choice == Choice::None {
            return (Some(text.to_owned()), Vec::new());
        }
        let as_text = || (Some(text.to_owned()), Vec::new());
        let Some(first) = text.find(OPEN) else {
            // Some models answer with the bare JSON object.
            return match self.call(text.trim()) {
                Some(c) => (None, vec![c]),
                None => as_text(),
            };
        };
        let mut calls = Vec::new();
        let mut rest = &text[first..];
        while let Some(start) = rest.find(OPEN) {
            let body = &rest[start + OPEN.len()..];
            let (json, next, closed) = match body.find(CLOSE) {
                Some(end) => (&body[..end], &body[end + CLOSE.len()..], true),
                None => (body, "", false),
            };
            match self.call(json.trim()) {
                Some(c) => calls.push(c),
                None if !closed && !calls.is_empty() => break,
                None => return as_text(),
            }
            rest = next;
        }
        let content = text[..first].trim();
        ((!content.is_empty()).then(|| content.to_owned()), calls)
    }

    fn call(&self, json: &str) -> Option<Call> {
        let v: Value = serde_json::from_str(json).ok()?;
        let name = v.get("name")?.as_str()?;
        self.specs.iter().find(|s| s.name == name)?;
        let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
            None | Some(Value::Null) => json!({}),
            Some(Value::String(s)) => serde_json::from_str(s).ok()?,
            Some(a) => a.clone(),
        };
        Some(Call {
            name: name.to_owned(),
            arguments,
        })
    }
}

/// The `finish_reason` of a reply with `calls`, given the engine's: a reply cut by `max_tokens`
/// says `length` even when complete calls were recovered from it, so the client knows a call may
/// be missing; otherwise calls make it `tool_calls`.
pub fn finish_reason(calls: &[Call], engine: &'static str) -> &'static str {
    match (calls.is_empty(), engine) {
        (true, r) | (false, r @ "length") => r,
        (false, _) => "tool_calls",
    }
}

/// Describe `tools` in the system message and rewrite tool turns as text, for templates that
/// know nothing of tools. `messages` is already normalized (an array of objects with string
/// content).
pub fn inline_tools(messages: Value, tools: Option<&Value>) -> Value {
    let Value::Array(list) = messages else {
        return messages;
    };
    let mut out: Vec<Value> = Vec::with_capacity(list.len() + 1);
    for mut m in list {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        let content = m
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if role == "tool" {
            m = json!({"role": "user", "content": format!("<tool_response>\n{content}\n</tool_response>")});
        } else if role == "assistant" {
            if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
                let mut text = content;
                for c in calls {
                    let f = c.get("function").unwrap_or(c);
                    let args = match f.get("arguments") {
                        Some(Value::String(s)) => {
                            serde_json::from_str(s).unwrap_or(Value::String(s.clone()))
                        }
                        Some(v) => v.clone(),
                        None => json!({}),
                    };
                    let call = json!({"name": f.get("name").cloned().unwrap_or(Value::Null), "arguments": args});
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&format!("{OPEN}\n{call}\n{CLOSE}"));
                }
                m = json!({"role": "assistant", "content": text});
            }
        }
        out.push(m);
    }
    if let Some(Value::Array(tools)) = tools {
        let mut desc = String::from(
            "# Tools\n\nYou may call functions to help with the user's request. The functions are described in JSON inside <tools></tools>:\n<tools>\n",
        );
        for t in tools {
            desc.push_str(&t.to_string());
            desc.push('\n');
        }
        desc.push_str("</tools>\n\nTo call a function, reply with a JSON object holding its name and arguments inside <tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <arguments-json-object>}\n</tool_call>");
        match out.first_mut() {
            Some(first) if first.get("role").and_then(Value::as_str) == Some("system") => {
                let c = first
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                first["content"] = Value::String(format!("{c}\n\n{desc}"));
            }
            _ => out.insert(0, json!({"role": "system", "content": desc})),
        }
    }
    Value::Array(out)
}

/// Holds back streamed text from the first `<tool_call>` on (and any tail that could be its
/// start), so a stream sends prose as content and the calls only once they are whole.
#[derive(Debug, Default)]
pub struct HoldBack {
    buf: String,
    capturing: bool,
}

impl HoldBack {
    /// Text that is certainly content.
    pub fn push(&mut self, text: &str) -> String {
        self.buf.push_str(text);
        if self.capturing {
            return String::new();
        }
        if let Some(pos) = self.buf.find(OPEN) {
            self.capturing = true;
            let out = self.buf[..pos].to_owned();
            self.buf.drain(..pos);
            return out;
        }
        // Keep the longest tail that is a prefix of `<tool_call>`.
        let keep = (1..OPEN.len().min(self.buf.len() + 1))
            .rev()
            .find(|&k| {
                self.buf.is_char_boundary(self.buf.len() - k)
                    && OPEN.starts_with(&self.buf[self.buf.len() - k..])
            })
            .unwrap_or(0);
        let cut = self.buf.len() - keep;
        let out = self.buf[..cut].to_owned();
        self.buf.drain(..cut);
        out
    }

    /// Everything held back.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.buf)
    }

    pub fn capturing(&self) -> bool {
        self.capturing
    }
}

/// OpenAI's `tool_calls` array (arguments as a JSON string).
pub fn openai_calls(calls: &[Call]) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "index": i,
                "id": format!("call_{:016x}", crate::random_seed()),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments.to_string()},
            })
        })
        .collect()
}

/// Ollama's `tool_calls` array (arguments as an object).
pub fn ollama_calls(calls: &[Call]) -> Value {
    calls
        .iter()
        .map(|c| json!({"function": {"name": c.name, "arguments": c.arguments}}))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tools {
        let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
        Tools::parse(Some(&tools), None, None)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("tools should parse"))
    }

    #[test]
    fn calls_are_parsed_from_tagged_blocks_and_bare_json() {
        let t = weather();
        let (text, calls) = t.parse_reply(
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        );
        assert_eq!(text.as_deref(), Some("Let me check."));
        assert_eq!(
            calls,
            vec![Call {
                name: "get_weather".into(),
                arguments: json!({"city": "Paris"})
            }]
        );
        let (text, calls) = t.parse_reply(
            "{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Oslo\\\"}\"}",
        );
        assert_eq!(text, None);
        assert_eq!(calls[0].arguments, json!({"city": "Oslo"}));
    }

    /// Regression: with `tool_choice: "required"` SmolLM2 repeated the forced call until
    /// `max_tokens`, and the cut last block turned the whole reply into text: no `tool_calls`.
    #[test]
    fn tool_choice_required_keeps_complete_calls_before_a_cut_one() {
        let t = weather();
        let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let reply = format!("{call}\n{call}\n<tool_call>\n{{\"name\": \"get_wea");
        let (text, calls) = t.parse_reply(&reply);
        assert_eq!(text, None);
        assert_eq!(calls.len(), 2);
        assert_eq!(finish_reason(&calls, "length"), "length");
        assert_eq!(finish_reason(&calls, "stop"), "tool_calls");
        assert_eq!(finish_reason(&[], "length"), "length");
    }

    /// Regression (same bug): the forced grammar could always go on with another call, so it
    /// never had to end. Without an explicit `parallel_tool_calls: true` it allows exactly one.
    #[test]
    fn tool_choice_required_forces_one_call_unless_parallel_is_asked_for() {
        let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
        let call = b"<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        for (parallel, may_go_on) in [(None, false), (Some(false), false), (Some(true), true)] {
            let t = Tools::parse(Some(&tools), Some(&json!("required")), parallel)
                .ok()
                .flatten()
                .unwrap_or_else(|| panic!("tools should parse"));
            let g = t
                .grammar()
                .ok()
                .flatten()
                .unwrap_or_else(|| panic!("a grammar"));
            let mut m = ferrolm_grammar::Matcher::new(std::sync::Arc::new(g));
            assert!(m.accept(call).is_ok(), "{parallel:?}");
            assert!(m.is_complete());
            assert_eq!(m.allows(b"\n<tool_call>"), may_go_on, "{parallel:?}");
        }
    }

    #[test]
    fn undeclared_or_broken_calls_stay_text() {
        let t = weather();
        for reply in [
            "<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": \"get_weather\", \"argu",
            "It is sunny.",
        ] {
            let (text, calls) = t.parse_reply(reply);
            assert!(calls.is_empty(), "{reply}");
            assert_eq!(text.as_deref(), Some(reply));
        }
    }

    #[test]
    fn bad_tools_and_choices_are_400s() {
        let ok = json!([{"type": "function", "function": {"name": "f"}}]);
        for (tools, choice) in [
            (json!({"name": "f"}), json!("auto")),
            (json!([{"type": "retrieval"}]), json!("auto")),
            (
                json!([{"type": "function", "function": {"name": "bad name"}}]),
                json!("auto"),
            ),
            (ok.clone(), json!("sometimes")),
            (
                ok.clone(),
                json!({"type": "function", "function": {"name": "g"}}),
            ),
            (json!([]), json!("required")),
        ] {
            assert!(
                Tools::parse(Some(&tools), Some(&choice), None).is_err(),
                "{tools} {choice}"
            );
        }
    }

    #[test]
    fn tools_are_described_in_the_system_message_and_turns_rewritten() {
        let msgs = json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        ]);
        let t = weather();
        let out = inline_tools(msgs, t.for_prompt());
        let list = out.as_array().cloned().unwrap_or_default();
        assert_eq!(list.len(), 4);
        assert_eq!(list[0]["role"], "system");
        assert!(list[0]["content"]
            .as_str()
            .is_some_and(|c| c.contains("get_weather") && c.contains("<tool_call>")));
        assert_eq!(
            list[2]["content"],
            "<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}\n</tool_call>"
        );
        assert_eq!(list[3]["role"], "user");
        assert_eq!(list[3]["content"], "<tool_response>\n18C\n</tool_response>");
    }

    #[test]
    fn hold_back_releases_prose_and_keeps_calls() {
        let mut h = HoldBack::default();
        let mut out = String::new();
        for piece in [
            "Sure",
            ". <tool",
            "_ca",
            "ll>\n{\"name\"",
            ": 1}</tool_call>",
        ] {
            out.push_str(&h.push(piece));
        }
        assert_eq!(out, "Sure. ");
        assert!(h.capturing());
        assert_eq!(h.finish(), "<tool_call>\n{\"name\": 1}</tool_call>");
        let mut h = HoldBack::default();
        assert_eq!(h.push("a <to"), "a ");
        assert_eq!(h.push("y"), "<toy");
        assert_eq!(h.finish(), "");
    }
}
