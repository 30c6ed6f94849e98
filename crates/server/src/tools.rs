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
//!
//! Lazy tool loading ([`Strategy::Lazy`], past a [`Threshold`]): the prompt carries one function
//! instead of the definitions, [`LOAD_TOOLS`], whose description lists every tool by name and
//! the first line of its description. A reply that calls it is never shown to the client: the
//! pipeline ([`crate::generate`]) appends the call and a tool turn holding the definitions asked
//! for ([`Tools::loading`]) to the conversation and generates again in the same request, so
//! the prompt so far is a prefix of the next one (the prefix cache serves it). Names the model
//! asks for that no tool has are reported back to it in that tool turn (the model's slip, not
//! the client's: no 4xx); a request that is itself inconsistent (a tool of its own named
//! `load_tools`, `tool_choice` naming `load_tools` while its tools load eagerly, lazy with
//! `n` > 1) is a 400. `tool_choice: "required"` forces `load_tools` first, then a call of one
//! of the tools it loaded; a named tool is loaded up front (its full definition is in the prompt and the
//! grammar forces it); naming `load_tools` forces the load, then leaves the model free.

use ferrolm_grammar::{Grammar, ToolSpec};
use ferrolm_tokenizer::chat::ChatTemplate;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// The function lazy tool loading puts in the prompt instead of the definitions.
pub const LOAD_TOOLS: &str = "load_tools";
/// Most `load_tools` rounds one request runs; a later `load_tools` call is dropped from the
/// reply (so a model that keeps loading cannot loop until `max_tokens`).
const MAX_LOAD_ROUNDS: usize = 3;
/// Longest one-line description in the `load_tools` listing, in characters.
const LISTING_LINE_CHARS: usize = 120;
/// The default threshold: lazy loading applies past this many tools.
pub const DEFAULT_LAZY_THRESHOLD: Threshold = Threshold::Tools(8);

/// How a request's tool definitions go into the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Every definition, in full (the default).
    #[default]
    Eager,
    /// Past the threshold: names and one-line descriptions, and `load_tools`.
    Lazy,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "eager" => Ok(Strategy::Eager),
            "lazy" => Ok(Strategy::Lazy),
            other => Err(format!(
                "`{other}` is not a tool strategy: use eager or lazy"
            )),
        }
    }
}

/// When lazy loading starts: more tools than this, or tool definitions longer than this many
/// tokens (the request's `tools` JSON, by the model's tokenizer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threshold {
    Tools(usize),
    Tokens(usize),
}

impl std::str::FromStr for Threshold {
    type Err = String;
    /// `12` or `12tools` (tools), `1500tokens` (tokens).
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (digits, tokens) = match (t.strip_suffix("tokens"), t.strip_suffix("tools")) {
            (Some(d), _) => (d, true),
            (None, Some(d)) => (d, false),
            (None, None) => (t, false),
        };
        let n: usize = digits.trim().parse().map_err(|_| {
            format!("`{s}` is not a lazy-tools threshold: give a number of tools (`8`) or of tokens (`1500tokens`)")
        })?;
        Ok(if tokens {
            Threshold::Tokens(n)
        } else {
            Threshold::Tools(n)
        })
    }
}

impl<'de> Deserialize<'de> for Threshold {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(usize),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Threshold::Tools(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Default for Threshold {
    fn default() -> Self {
        DEFAULT_LAZY_THRESHOLD
    }
}

/// A model's tool strategy (its config entry, else `ferrolm serve --tool-strategy` and
/// `--lazy-tools-threshold`); a request may override either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ToolStrategy {
    pub strategy: Strategy,
    pub threshold: Threshold,
}

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
    /// Set when the definitions load lazily ([`Tools::apply_strategy`]).
    pub lazy: Option<Lazy>,
}

/// What lazy loading left out of a request's first prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeftOut {
    /// Tools listed by name instead of defined.
    pub tools: usize,
    /// Prompt tokens their definitions would have taken.
    pub tokens: usize,
}

impl LeftOut {
    /// The `x-ferrolm-tools` header of a request whose (lazy) first prompt has `prompt` tokens.
    pub fn header(&self, prompt: usize) -> String {
        format!(
            "lazy; tools={}; prompt_tokens={}->{prompt}",
            self.tools,
            prompt + self.tokens
        )
    }

    /// The first prompt's tokens, had every definition been in it.
    pub fn eager_prompt_tokens(&self, prompt: usize) -> usize {
        prompt + self.tokens
    }
}

/// A request whose tools load lazily.
#[derive(Debug, Clone)]
pub struct Lazy {
    /// What the prompt carries instead of the definitions: `load_tools` (listing every tool),
    /// and a named `tool_choice`'s tool in full.
    listing: Value,
    /// `load_tools` rounds run so far.
    pub rounds: usize,
    /// The declared tools whose definitions the rounds loaded, in order.
    loaded: Vec<String>,
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
            // `load_tools` is checked by `apply_strategy`, once the strategy is known.
            if n != LOAD_TOOLS && !specs.iter().any(|s| &s.name == n) {
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
            lazy: None,
        }))
    }

    /// Decide how the definitions go into the prompt: `asked` / `threshold` are the request's
    /// (`tool_strategy`, `lazy_tools_threshold`), `default` the model's; `n` is the number of
    /// choices; `tokens` counts the tokens of a text (the tools' JSON, for a token threshold).
    /// Past the threshold a lazy strategy replaces the definitions by `load_tools`.
    pub fn apply_strategy(
        &mut self,
        default: ToolStrategy,
        asked: Option<Strategy>,
        threshold: Option<Threshold>,
        n: usize,
        tokens: impl FnOnce(&str) -> usize,
    ) -> Result<(), ApiError> {
        self.lazy = None;
        let strategy = asked.unwrap_or(default.strategy);
        let threshold = threshold.unwrap_or(default.threshold);
        let named_load = self.choice == Choice::Named(LOAD_TOOLS.into());
        let eager = |why: &str| {
            if named_load {
                return Err(ApiError::invalid(
                    format!("tool_choice names `{LOAD_TOOLS}`, which exists only when tools load lazily, and {why}: declare the tool you mean, or send `tool_strategy: \"lazy\"` with more tools than `lazy_tools_threshold`"),
                    Some("tool_choice"),
                ));
            }
            Ok(())
        };
        if strategy == Strategy::Eager {
            return eager("this request's tool strategy is eager");
        }
        if self.specs.iter().any(|s| s.name == LOAD_TOOLS) {
            return Err(ApiError::invalid(
                format!("tools: `{LOAD_TOOLS}` is the function lazy tool loading adds: rename your tool, or send `tool_strategy: \"eager\"`"),
                Some("tools"),
            ));
        }
        let past = match threshold {
            Threshold::Tools(t) => self.specs.len() > t,
            Threshold::Tokens(t) => tokens(&self.raw.to_string()) > t,
        };
        if !past {
            return eager("this request's tools do not pass the lazy-tools threshold");
        }
        if self.choice == Choice::None {
            return Ok(());
        }
        if n > 1 {
            if asked == Some(Strategy::Lazy) {
                return Err(ApiError::invalid(
                    "tool_strategy lazy serves one choice per request (each choice would load its own tools): send n = 1, or tool_strategy eager",
                    Some("tool_strategy"),
                ));
            }
            // The model's default: choices load nothing, so every definition goes in.
            return eager("this request asks for several choices");
        }
        let mut listing = vec![self.load_tool_definition()];
        if let Choice::Named(n) = &self.choice {
            listing.extend(self.definition(n).cloned());
        }
        self.lazy = Some(Lazy {
            listing: Value::Array(listing),
            rounds: 0,
            loaded: Vec::new(),
        });
        Ok(())
    }

    /// The request's tool strategy applied for `model` (its default strategy and its token
    /// count, see [`Tools::apply_strategy`]), and what lazy loading then leaves out of the
    /// prompt of `messages`. The one call every chat-shaped handler makes.
    pub fn apply_for(
        &mut self,
        model: &crate::Model,
        asked: Option<Strategy>,
        threshold: Option<Threshold>,
        n: usize,
        messages: &Value,
    ) -> Result<Option<LeftOut>, ApiError> {
        self.apply_strategy(model.tool_strategy, asked, threshold, n, |text| {
            model.token_count(text)
        })?;
        self.left_out(model, messages)
    }

    /// `load_tools` as the prompt describes it: its description lists every tool.
    fn load_tool_definition(&self) -> Value {
        let mut desc = String::from(
            "Load the full definitions of tools before calling them. Tools you can load (name: what it does):",
        );
        for (spec, t) in self
            .specs
            .iter()
            .zip(self.raw.as_array().into_iter().flatten())
        {
            let line = t
                .pointer("/function/description")
                .and_then(Value::as_str)
                .and_then(|d| d.lines().map(str::trim).find(|l| !l.is_empty()))
                .unwrap_or("");
            let line: String = if line.chars().count() > LISTING_LINE_CHARS {
                let cut: String = line.chars().take(LISTING_LINE_CHARS - 1).collect();
                format!("{cut}…")
            } else {
                line.to_owned()
            };
            desc.push_str(&format!("\n- {}: {line}", spec.name));
        }
        json!({"type": "function", "function": {
            "name": LOAD_TOOLS,
            "description": desc,
            "parameters": {"type": "object", "properties": {
                "names": {"type": "array", "items": {"type": "string"}, "description": "names from the list"}
            }, "required": ["names"]},
        }})
    }

    /// `load_tools` as the grammar forces it: only the declared names, at most 4 (SmolLM2, forced,
    /// repeated one name until `max_tokens`).
    fn load_tool_spec(&self) -> ToolSpec {
        let names: Vec<&str> = self.specs.iter().map(|s| s.name.as_str()).collect();
        ToolSpec {
            name: LOAD_TOOLS.to_owned(),
            parameters: json!({"type": "object", "properties": {
                "names": {"type": "array", "items": {"type": "string", "enum": names}, "minItems": 1, "maxItems": 4}
            }, "required": ["names"], "additionalProperties": false}),
        }
    }

    /// Does `tool_choice` force a call (`required` or a named function)?
    pub fn forces(&self) -> bool {
        matches!(self.choice, Choice::Required | Choice::Named(_))
    }

    /// What lazy loading leaves out of the prompt of `messages` for `model` (`None` when the
    /// tools load eagerly): the prompt rendered with every definition, against with the listing.
    fn left_out(
        &self,
        model: &crate::Model,
        messages: &Value,
    ) -> Result<Option<LeftOut>, ApiError> {
        if self.lazy.is_none() {
            return Ok(None);
        }
        let eager = model.chat_prompt(messages, Some(&self.raw))?.len();
        let lazy = model.chat_prompt(messages, self.for_prompt())?.len();
        Ok(Some(LeftOut {
            tools: self.specs.len(),
            tokens: eager.saturating_sub(lazy),
        }))
    }

    /// The request's definition of tool `name`, as sent.
    fn definition(&self, name: &str) -> Option<&Value> {
        self.raw
            .as_array()?
            .iter()
            .find(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(name))
    }

    /// The tools the prompt should describe (none for `tool_choice: "none"`; `load_tools` and
    /// its listing when they load lazily).
    pub fn for_prompt(&self) -> Option<&Value> {
        match &self.lazy {
            Some(l) => Some(&l.listing),
            None => (self.choice != Choice::None).then_some(&self.raw),
        }
    }

    /// The grammar that forces a call, for `required` and a named function (lazily: `required`
    /// and a named `load_tools` force `load_tools` first, then [`Tools::grammar_after_load`]).
    pub fn grammar(&self) -> Result<Option<Grammar>, ApiError> {
        let forces_load = match &self.choice {
            Choice::Required => true,
            Choice::Named(n) => n == LOAD_TOOLS,
            Choice::None | Choice::Auto => false,
        };
        if self.lazy.is_some() && forces_load {
            return Grammar::tool_calls(&[self.load_tool_spec()], false)
                .map(Some)
                .map_err(|e| ApiError::invalid(format!("tools: {e}"), Some("tools")));
        }
        self.forced()
    }

    /// The grammar for the generation that follows a `load_tools` round: `required` forces a
    /// call of a tool whose definition was loaded (of any tool, should none of the names asked
    /// for exist); after a named `load_tools` the model is free.
    pub fn grammar_after_load(&self) -> Result<Option<Grammar>, ApiError> {
        let loaded = self.lazy.as_ref().map_or(&[][..], |l| &l.loaded[..]);
        match &self.choice {
            Choice::Named(n) if n == LOAD_TOOLS => Ok(None),
            Choice::Required if !loaded.is_empty() => {
                let specs: Vec<ToolSpec> = self
                    .specs
                    .iter()
                    .filter(|s| loaded.contains(&s.name))
                    .cloned()
                    .collect();
                Grammar::tool_calls(&specs, self.parallel)
                    .map(Some)
                    .map_err(|e| ApiError::invalid(format!("tools: {e}"), Some("tools")))
            }
            _ => self.forced(),
        }
    }

    fn forced(&self) -> Result<Option<Grammar>, ApiError> {
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
        if !(self.lazy.is_some() && name == LOAD_TOOLS) {
            self.specs.iter().find(|s| s.name == name)?;
        }
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

impl Tools {
    /// For a reply (`content`, `calls`) that called `load_tools` and nothing else: the turns to
    /// add to the conversation before generating again (the call, and a tool turn with the
    /// definitions asked for; names no tool has are reported there). `None` when the reply is
    /// the answer: tools load eagerly, it called a real tool (then its `load_tools` calls are
    /// dropped), or the rounds are used up. Either way `calls` keeps no `load_tools` call.
    pub fn loading(&mut self, content: Option<&str>, calls: &mut Vec<Call>) -> Option<Vec<Value>> {
        // Eager: a `load_tools` call is a call of the client's own tool of that name.
        self.lazy.as_ref()?;
        let loads: Vec<Call> = calls
            .iter()
            .filter(|c| c.name == LOAD_TOOLS)
            .cloned()
            .collect();
        calls.retain(|c| c.name != LOAD_TOOLS);
        if loads.is_empty() || !calls.is_empty() {
            return None;
        }
        let rounds = {
            let lazy = self.lazy.as_mut()?;
            if lazy.rounds >= MAX_LOAD_ROUNDS {
                return None;
            }
            lazy.rounds += 1;
            lazy.rounds
        };
        let mut names: Vec<String> = Vec::new();
        for c in &loads {
            let asked = c.arguments.get("names").or_else(|| c.arguments.get("name"));
            let list: Vec<String> = match asked {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect(),
                Some(Value::String(s)) => s.split(',').map(|n| n.trim().to_owned()).collect(),
                _ => Vec::new(),
            };
            for n in list {
                if !n.is_empty() && !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        let mut result = String::new();
        let mut unknown = Vec::new();
        let mut found = Vec::new();
        for n in &names {
            match self.definition(n) {
                Some(d) => {
                    result.push_str(&d.to_string());
                    result.push('\n');
                    found.push(n.clone());
                }
                None => unknown.push(format!("`{n}`")),
            }
        }
        if let Some(l) = &mut self.lazy {
            for n in found {
                if !l.loaded.contains(&n) {
                    l.loaded.push(n);
                }
            }
        }
        if names.is_empty() {
            result.push_str("load_tools needs {\"names\": [...]}: names from its list.\n");
        }
        if !unknown.is_empty() {
            result.push_str(&format!(
                "No tool is named {}: load only names from the load_tools list.\n",
                unknown.join(", ")
            ));
        }
        result.push_str(
            "Call a loaded tool in <tool_call></tool_call> tags if it helps with the request.",
        );
        let call_id = format!("call_load_{rounds}");
        let args = json!({"names": names});
        Some(vec![
            json!({"role": "assistant", "content": content.unwrap_or(""), "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": LOAD_TOOLS, "arguments": args.to_string()}}
            ]}),
            json!({"role": "tool", "tool_call_id": call_id, "name": LOAD_TOOLS, "content": result}),
        ])
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

    fn forty_tools(choice: Option<Value>) -> Tools {
        let tools: Vec<Value> = (0..40)
            .map(|i| json!({"type": "function", "function": {"name": format!("tool_{i}"), "description": format!("Does thing {i}.\nMore detail that the listing leaves out."), "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}))
            .collect();
        Tools::parse(Some(&Value::Array(tools)), choice.as_ref(), None)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("tools should parse"))
    }

    /// About four characters a token, as English JSON goes.
    fn tok(text: &str) -> usize {
        text.len() / 4
    }

    #[test]
    fn thresholds_parse_as_tools_or_tokens() {
        assert_eq!("8".parse(), Ok(Threshold::Tools(8)));
        assert_eq!("8tools".parse(), Ok(Threshold::Tools(8)));
        assert_eq!("1500tokens".parse(), Ok(Threshold::Tokens(1500)));
        assert!("many"
            .parse::<Threshold>()
            .is_err_and(|e| e.contains("1500tokens")));
        assert_eq!(
            serde_json::from_value::<Threshold>(json!(3)).ok(),
            Some(Threshold::Tools(3))
        );
        assert_eq!(
            serde_json::from_value::<Threshold>(json!("20tokens")).ok(),
            Some(Threshold::Tokens(20))
        );
        assert!("sometimes".parse::<Strategy>().is_err());
    }

    #[test]
    fn lazy_applies_past_the_threshold_and_lists_names_with_one_line() {
        let lazy = ToolStrategy {
            strategy: Strategy::Lazy,
            threshold: Threshold::Tools(8),
        };
        let mut t = forty_tools(None);
        t.apply_strategy(ToolStrategy::default(), None, None, 1, tok)
            .unwrap_or_else(|e| panic!("{}", e.message));
        assert!(t.lazy.is_none(), "eager by default");
        t.apply_strategy(lazy, None, Some(Threshold::Tools(40)), 1, tok)
            .unwrap_or_else(|e| panic!("{}", e.message));
        assert!(t.lazy.is_none(), "40 tools do not pass a threshold of 40");
        t.apply_strategy(lazy, None, None, 1, tok)
            .unwrap_or_else(|e| panic!("{}", e.message));
        let listing = t.for_prompt().cloned().unwrap_or_default();
        assert_eq!(listing.as_array().map(Vec::len), Some(1));
        let desc = listing[0]["function"]["description"]
            .as_str()
            .unwrap_or_default();
        assert!(desc.contains("\n- tool_39: Does thing 39."), "{desc}");
        assert!(!desc.contains("More detail"), "{desc}");
        assert_eq!(listing[0]["function"]["name"], LOAD_TOOLS);
        // A token threshold: the tools' JSON is far longer than 100 tokens.
        t.apply_strategy(lazy, None, Some(Threshold::Tokens(100)), 1, tok)
            .unwrap_or_else(|e| panic!("{}", e.message));
        assert!(t.lazy.is_some());
        t.apply_strategy(lazy, None, Some(Threshold::Tokens(1_000_000)), 1, tok)
            .unwrap_or_else(|e| panic!("{}", e.message));
        assert!(t.lazy.is_none());
        // Several choices: the model's default falls back to eager; a request's own lazy is a 400.
        t.apply_strategy(lazy, None, None, 2, tok)
            .unwrap_or_else(|e| panic!("{}", e.message));
        assert!(t.lazy.is_none());
        assert!(t
            .apply_strategy(lazy, Some(Strategy::Lazy), None, 2, tok)
            .is_err());
        // A named tool is loaded up front, and forced.
        let mut t = forty_tools(Some(
            json!({"type": "function", "function": {"name": "tool_7"}}),
        ));
        t.apply_strategy(lazy, None, None, 1, tok)
            .unwrap_or_else(|e| panic!("{}", e.message));
        let listing = t.for_prompt().cloned().unwrap_or_default();
        assert_eq!(listing[1]["function"]["name"], "tool_7");
        assert!(t.grammar().is_ok_and(|g| g.is_some()));
    }

    #[test]
    fn inconsistent_lazy_requests_are_400s() {
        let lazy = ToolStrategy {
            strategy: Strategy::Lazy,
            threshold: Threshold::Tools(0),
        };
        let own = json!([{"type": "function", "function": {"name": LOAD_TOOLS}}]);
        let mut t = Tools::parse(Some(&own), None, None)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("parses"));
        let e = t
            .apply_strategy(lazy, None, None, 1, tok)
            .err()
            .map(|e| e.message)
            .unwrap_or_default();
        assert!(e.contains("rename your tool"), "{e}");
        let named = json!({"type": "function", "function": {"name": LOAD_TOOLS}});
        let mut t = forty_tools(Some(named));
        let e = t
            .apply_strategy(ToolStrategy::default(), None, None, 1, tok)
            .err()
            .map(|e| e.message)
            .unwrap_or_default();
        assert!(e.contains("exists only when tools load lazily"), "{e}");
        assert!(t.apply_strategy(lazy, None, None, 1, tok).is_ok());
    }

    #[test]
    fn load_tools_calls_become_definitions_and_unknown_names_are_reported_to_the_model() {
        let lazy = ToolStrategy {
            strategy: Strategy::Lazy,
            threshold: Threshold::Tools(8),
        };
        let mut t = forty_tools(Some(json!("required")));
        t.apply_strategy(lazy, None, None, 1, tok)
            .unwrap_or_else(|e| panic!("{}", e.message));
        let reply = "<tool_call>\n{\"name\": \"load_tools\", \"arguments\": {\"names\": [\"tool_3\", \"no_such_tool\"]}}\n</tool_call>";
        let (content, mut calls) = t.parse_reply(reply);
        assert_eq!(
            calls.len(),
            1,
            "load_tools is a call while tools load lazily"
        );
        let turns = t
            .loading(content.as_deref(), &mut calls)
            .unwrap_or_default();
        assert!(calls.is_empty());
        assert_eq!(turns.len(), 2);
        assert_eq!(turns[0]["tool_calls"][0]["function"]["name"], LOAD_TOOLS);
        let result = turns[1]["content"].as_str().unwrap_or_default();
        assert!(result.contains("\"name\":\"tool_3\""), "{result}");
        assert!(
            result.contains("No tool is named `no_such_tool`"),
            "{result}"
        );
        // The next pass forces a call of the loaded tool; rounds run out after MAX_LOAD_ROUNDS.
        let g = t
            .grammar_after_load()
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("a grammar"));
        let m = ferrolm_grammar::Matcher::new(std::sync::Arc::new(g));
        assert!(m.allows(b"<tool_call>\n{\"name\": \"tool_3\""));
        assert!(!m.allows(b"<tool_call>\n{\"name\": \"tool_1\""));
        for _ in 1..MAX_LOAD_ROUNDS {
            let (c, mut calls) = t.parse_reply(reply);
            assert!(t.loading(c.as_deref(), &mut calls).is_some());
        }
        let (c, mut calls) = t.parse_reply(reply);
        assert!(t.loading(c.as_deref(), &mut calls).is_none());
        assert!(
            calls.is_empty(),
            "a load_tools call never reaches the client"
        );
        // A real call beside a load: the real call is the answer.
        let both = format!(
            "{reply}\n<tool_call>\n{{\"name\": \"tool_1\", \"arguments\": {{}}}}\n</tool_call>"
        );
        let (c, mut calls) = t.parse_reply(&both);
        assert!(t.loading(c.as_deref(), &mut calls).is_none());
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "tool_1");
        // Eager tools: load_tools names no declared tool, so the reply stays text.
        let eager = forty_tools(None);
        assert!(eager.parse_reply(reply).1.is_empty());
    }

    /// Regression: with eager tools, a client's own tool named `load_tools` had its calls
    /// dropped from the reply (an empty answer with `finish_reason: stop`).
    #[test]
    fn an_eager_clients_own_load_tools_call_reaches_it() {
        let own = json!([{"type": "function", "function": {"name": LOAD_TOOLS, "parameters": {"type": "object"}}}]);
        let mut t = Tools::parse(Some(&own), None, None)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("parses"));
        t.apply_strategy(ToolStrategy::default(), None, None, 1, tok)
            .unwrap_or_else(|e| panic!("{}", e.message));
        let (content, mut calls) = t.parse_reply(
            "<tool_call>\n{\"name\": \"load_tools\", \"arguments\": {\"names\": [\"x\"]}}\n</tool_call>",
        );
        assert!(t.loading(content.as_deref(), &mut calls).is_none());
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, LOAD_TOOLS);
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
