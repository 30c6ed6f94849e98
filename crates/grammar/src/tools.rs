//! Forced tool calls in the Hermes format (Qwen 2.5 and Hermes chat templates); the public
//! contract is on [`Grammar::tool_calls`].

use serde_json::Value;

use crate::grammar::{lit, Grammar, Sym};
use crate::json::Json;
use crate::schema::SchemaCompiler;
use crate::GrammarError;

/// A function the model may call: its name and the JSON Schema of its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub parameters: Value,
}

impl Grammar {
    /// Forced tool calls in the Hermes format (Qwen 2.5 and Hermes chat templates):
    ///
    /// ```text
    /// <tool_call>
    /// {"name": "<name>", "arguments": <arguments>}
    /// </tool_call>
    /// ```
    ///
    /// One such block, or with `parallel` one or more separated by a single `"\n"`. `<name>` is
    /// one of the tools' names (JSON-escaped as `serde_json` writes it) and `<arguments>`
    /// satisfies *that* tool's parameters schema ([`Grammar::json_schema`]); the spacing is
    /// exactly as shown. A tool whose `parameters` is `null` takes any JSON object. Errors name
    /// the tool whose schema is at fault, e.g. `tool "get_weather" #/properties/unit`.
    pub fn tool_calls(tools: &[ToolSpec], parallel: bool) -> Result<Grammar, GrammarError> {
        if tools.is_empty() {
            return Err(GrammarError::InvalidSchema {
                path: "tools".into(),
                message: "no tools to call: give at least one tool, or do not force a tool call"
                    .into(),
            });
        }
        let mut json = Json::default();
        let mut calls = Vec::new();
        for (i, tool) in tools.iter().enumerate() {
            if tool.name.is_empty() || tools[..i].iter().any(|t| t.name == tool.name) {
                return Err(GrammarError::InvalidSchema {
                    path: format!("tools[{i}].name"),
                    message: format!(
                        "tool name {:?} is empty or used twice; give every tool its own name",
                        tool.name
                    ),
                });
            }
            let args = match &tool.parameters {
                Value::Null => json.object_any()?,
                schema => SchemaCompiler::new(&mut json, schema, format!("tool {:?} ", tool.name))
                    .compile_root()?,
            };
            let mut seq = lit(b"<tool_call>\n{\"name\": ");
            seq.extend(lit(Value::String(tool.name.clone()).to_string().as_bytes()));
            seq.extend(lit(b", \"arguments\": "));
            seq.push(Sym::Rule(args));
            seq.extend(lit(b"}\n</tool_call>"));
            calls.push(seq);
        }
        let call = json.b.rule("tool call", calls)?;
        let root = if parallel {
            let next = json.b.rule(
                "next tool call",
                vec![vec![
                    Sym::Bytes(crate::grammar::ByteSet::byte(b'\n')),
                    Sym::Rule(call),
                ]],
            )?;
            let more = json.b.star(next)?;
            json.b
                .rule("tool calls", vec![vec![Sym::Rule(call), Sym::Rule(more)]])?
        } else {
            call
        };
        json.b.finish(root)
    }
}
