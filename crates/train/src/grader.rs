//! Graders: the reward of a reinforcement fine-tuning run, written in OpenAI's grader JSON
//! (the shapes of its reinforcement fine-tuning and evals APIs) and computed locally.
//!
//! * [`Grader::parse`] checks a grader once, up front — its type, fields, templates and a
//!   `multi` grader's formula — and says what to change when something is wrong. Types:
//!   `string_check`, `text_similarity`, `score_model` and `multi`. `python` (no sandbox here)
//!   and `label_model` are refused, as is the `cosine` metric (it needs an embedding model).
//! * [`Grader::grade`] scores one sample of one dataset item. Templates (`{{ item.x }}`,
//!   `{{ sample.output_text }}`, `{{ sample.output_json.k }}`) are filled by [`render`].
//! * A `score_model` grader asks a local model through the [`Judge`] trait; the caller loads
//!   the models that [`Grader::judge_models`] names.
//! * Scores are raw: a `text_similarity` grader's similarity, a `score_model` grader's number
//!   clamped to its range. `pass_threshold` is parsed and exposed ([`Grader::pass_threshold`])
//!   for reporting; it does not change the score, as in OpenAI's reinforcement fine-tuning.
//!
//! The text metrics follow the reference implementations users compare against; each
//! function says which, and where it departs from it.

use std::collections::HashMap;

use serde_json::{json, Value};

/// The grader types this module runs, for error messages.
const SUPPORTED: &str = "string_check, text_similarity, score_model, multi";

/// A model's output for one item.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The generated text (`{{ sample.output_text }}`).
    pub output_text: String,
    /// The text parsed as JSON when the run asked for JSON output (`{{ sample.output_json }}`).
    pub output_json: Option<Value>,
}

impl Sample {
    /// A sample with text only; `output_json` is the text parsed as JSON when it is valid JSON.
    pub fn text(output_text: impl Into<String>) -> Sample {
        let output_text = output_text.into();
        let output_json = serde_json::from_str(&output_text).ok();
        Sample {
            output_text,
            output_json,
        }
    }
}

/// Generates a local model's reply for `score_model` graders.
pub trait Judge {
    /// The reply of `model` to the chat `messages` (`{"role", "content"}` objects, content
    /// already rendered), sampled with `sampling` (the grader's `sampling_params`, `{}` when
    /// absent: `temperature`, `top_p`, `seed`, `max_completions_tokens`, `reasoning_effort`).
    fn complete(
        &mut self,
        model: &str,
        messages: &[Value],
        sampling: &Value,
    ) -> Result<String, String>;
}

/// `string_check` operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StringOp {
    /// Equal (case-sensitive).
    Eq,
    /// Not equal (case-sensitive).
    Ne,
    /// The input contains the reference (case-sensitive).
    Like,
    /// The input contains the reference, ignoring case.
    Ilike,
}

/// `text_similarity` metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    FuzzyMatch,
    Bleu,
    Gleu,
    Meteor,
    /// ROUGE-n F-measure, n in 1..=5.
    Rouge(usize),
    RougeL,
}

/// One message of a `score_model` grader's prompt; `content` is a template.
#[derive(Debug, Clone, PartialEq)]
pub struct JudgeMessage {
    pub role: String,
    pub content: String,
}

/// A `multi` grader's `calculate_output`, parsed: arithmetic over the graders' names.
#[derive(Debug, Clone, PartialEq)]
pub struct Formula {
    source: String,
    ast: Expr,
}

/// A parsed, validated grader (OpenAI's JSON shapes).
#[derive(Debug, Clone, PartialEq)]
pub enum Grader {
    StringCheck {
        name: String,
        input: String,
        reference: String,
        operation: StringOp,
    },
    TextSimilarity {
        name: String,
        input: String,
        reference: String,
        metric: Metric,
        pass_threshold: Option<f64>,
    },
    ScoreModel {
        name: String,
        model: String,
        input: Vec<JudgeMessage>,
        /// `[min, max]`, default `[0, 1]`; the judge's number is clamped to it.
        range: [f64; 2],
        /// Passed to the [`Judge`] as given (`{}` when absent).
        sampling_params: Value,
        pass_threshold: Option<f64>,
    },
    Multi {
        name: String,
        /// The sub-graders in the JSON's order, under the names the formula uses.
        graders: Vec<(String, Grader)>,
        calculate_output: Formula,
    },
}

impl Grader {
    /// Parse and validate OpenAI grader JSON; Err says exactly what is wrong and how to fix it.
    pub fn parse(v: &Value) -> Result<Grader, String> {
        parse_grader(v, None)
    }

    /// The grader's `name` (inside a `multi`, its key when it has no `name`).
    pub fn name(&self) -> &str {
        match self {
            Grader::StringCheck { name, .. }
            | Grader::TextSimilarity { name, .. }
            | Grader::ScoreModel { name, .. }
            | Grader::Multi { name, .. } => name,
        }
    }

    /// `pass_threshold`, for reporting a pass rate; it never changes the score.
    pub fn pass_threshold(&self) -> Option<f64> {
        match self {
            Grader::TextSimilarity { pass_threshold, .. }
            | Grader::ScoreModel { pass_threshold, .. } => *pass_threshold,
            Grader::StringCheck { .. } | Grader::Multi { .. } => None,
        }
    }

    /// Score one sample of one item. `item` is the dataset line (a JSON object); `sample` the
    /// model's output. A `multi` grader runs only the graders its formula names.
    pub fn grade(
        &self,
        item: &Value,
        sample: &Sample,
        judge: &mut dyn Judge,
    ) -> Result<f64, String> {
        let ctx = |e: String| format!("grader `{}`: {e}", self.name());
        match self {
            Grader::StringCheck {
                input,
                reference,
                operation,
                ..
            } => {
                let a = render(input, item, sample).map_err(ctx)?;
                let b = render(reference, item, sample).map_err(ctx)?;
                let pass = match operation {
                    StringOp::Eq => a == b,
                    StringOp::Ne => a != b,
                    StringOp::Like => a.contains(&b),
                    StringOp::Ilike => a.to_lowercase().contains(&b.to_lowercase()),
                };
                Ok(if pass { 1.0 } else { 0.0 })
            }
            Grader::TextSimilarity {
                input,
                reference,
                metric,
                ..
            } => {
                let a = render(input, item, sample).map_err(ctx)?;
                let b = render(reference, item, sample).map_err(ctx)?;
                Ok(similarity(*metric, &a, &b))
            }
            Grader::ScoreModel {
                model,
                input,
                range,
                sampling_params,
                ..
            } => {
                let mut messages = Vec::with_capacity(input.len());
                for m in input {
                    let content = render(&m.content, item, sample).map_err(ctx)?;
                    messages.push(json!({"role": m.role, "content": content}));
                }
                let reply = judge
                    .complete(model, &messages, sampling_params)
                    .map_err(|e| ctx(format!("judge model `{model}` failed: {e}")))?;
                let score = parse_score(&reply).ok_or_else(|| {
                    ctx(format!(
                        "judge model `{model}` replied with no number: {:?}. Ask for a score in \
                         the prompt, e.g. \"Reply with a number from {} to {}\"",
                        truncate(&reply, 200),
                        range[0],
                        range[1]
                    ))
                })?;
                Ok(score.clamp(range[0], range[1]))
            }
            Grader::Multi {
                graders,
                calculate_output,
                ..
            } => {
                let mut scores = HashMap::new();
                for (key, g) in graders {
                    if calculate_output.ast.uses(key) {
                        scores.insert(key.as_str(), g.grade(item, sample, judge).map_err(ctx)?);
                    }
                }
                calculate_output.eval(&scores).map_err(ctx)
            }
        }
    }

    /// The names of model checkpoints a score_model grader (anywhere in a multi) needs, so the
    /// caller can load them first. Sorted, without repeats.
    pub fn judge_models(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.visit(&mut |g| {
            if let Grader::ScoreModel { model, .. } = g {
                out.push(model.clone());
            }
        });
        out.sort();
        out.dedup();
        out
    }

    /// Item fields the templates reference (`item.x` → "x", `item.a.b` → "a.b", `item.a[0]` →
    /// "a.0"), sorted, without repeats; [`Grader::check_item`] checks a line against them.
    pub fn item_fields(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.visit(&mut |g| {
            for t in g.templates() {
                // Templates were checked at parse time.
                if let Ok(pieces) = parse_template(t) {
                    for p in pieces {
                        if let Piece::Item(path) = p {
                            out.push(path.join("."));
                        }
                    }
                }
            }
        });
        out.sort();
        out.dedup();
        out
    }

    /// Err naming the first field of [`Grader::item_fields`] that `item` lacks, so a dataset
    /// can be checked line by line before training starts.
    pub fn check_item(&self, item: &Value) -> Result<(), String> {
        check_fields(item, &self.item_fields())
    }

    /// Calls `f` on this grader and every grader inside it.
    fn visit(&self, f: &mut dyn FnMut(&Grader)) {
        f(self);
        if let Grader::Multi { graders, .. } = self {
            for (_, g) in graders {
                g.visit(f);
            }
        }
    }

    /// This grader's own templates (not those of a multi's graders).
    fn templates(&self) -> Vec<&str> {
        match self {
            Grader::StringCheck {
                input, reference, ..
            }
            | Grader::TextSimilarity {
                input, reference, ..
            } => vec![input.as_str(), reference.as_str()],
            Grader::ScoreModel { input, .. } => input.iter().map(|m| m.content.as_str()).collect(),
            Grader::Multi { .. } => Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing grader JSON.

/// `key`: the grader's key inside a multi grader, its default name.
fn parse_grader(v: &Value, key: Option<&str>) -> Result<Grader, String> {
    let where_ = match key {
        Some(k) => format!("grader `{k}` in `graders`"),
        None => "grader".to_string(),
    };
    let obj = v.as_object().ok_or_else(|| {
        format!("{where_}: expected a JSON object like {{\"type\": \"string_check\", …}}, got {v}")
    })?;
    let ty = match obj.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(other) => return Err(format!("{where_}: `type` must be a string, got {other}")),
        None => {
            return Err(format!(
                "{where_}: missing field `type`: set it to one of {SUPPORTED}"
            ))
        }
    };
    let fields: &[&str] = match ty {
        "string_check" => &["input", "reference", "operation"],
        "text_similarity" => &["input", "reference", "evaluation_metric", "pass_threshold"],
        "score_model" => &[
            "model",
            "input",
            "range",
            "sampling_params",
            "pass_threshold",
        ],
        "multi" => &["graders", "calculate_output"],
        "python" => {
            return Err(format!(
                "{where_}: grader type `python` is not supported here (ferrolm runs no sandboxed \
                 Python): express the check with {SUPPORTED}"
            ))
        }
        "label_model" => {
            return Err(format!(
                "{where_}: grader type `label_model` is not supported here: use a `score_model` \
                 grader whose prompt asks for a number (e.g. 1 for a passing label, 0 otherwise)"
            ))
        }
        other => {
            return Err(format!(
                "{where_}: unknown grader type `{other}`; supported: {SUPPORTED}"
            ))
        }
    };
    let name = match obj.get("name") {
        Some(Value::String(n)) => n.clone(),
        Some(other) => return Err(format!("{where_}: `name` must be a string, got {other}")),
        None => key.unwrap_or(ty).to_string(),
    };
    let ctx = format!("{ty} grader `{name}`");
    for k in obj.keys() {
        if k != "type" && k != "name" && !fields.contains(&k.as_str()) {
            return Err(format!(
                "{ctx}: unknown field `{k}`; its fields are type, name, {}",
                fields.join(", ")
            ));
        }
    }
    let need = |k: &str| {
        obj.get(k).ok_or_else(|| {
            format!(
                "{ctx}: missing field `{k}` ({ty} needs {})",
                fields
                    .iter()
                    .filter(|f| !matches!(**f, "pass_threshold" | "range" | "sampling_params"))
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    };
    let template = |k: &str| -> Result<String, String> {
        let t = need(k)?
            .as_str()
            .ok_or_else(|| format!("{ctx}: `{k}` must be a string (a template)"))?;
        parse_template(t).map_err(|e| format!("{ctx}: `{k}`: {e}"))?;
        Ok(t.to_string())
    };
    let threshold = || -> Result<Option<f64>, String> {
        match obj.get("pass_threshold") {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("{ctx}: `pass_threshold` must be a number, got {v}")),
        }
    };
    match ty {
        "string_check" => {
            let operation = match need("operation")?.as_str() {
                Some("eq") => StringOp::Eq,
                Some("ne") => StringOp::Ne,
                Some("like") => StringOp::Like,
                Some("ilike") => StringOp::Ilike,
                _ => {
                    return Err(format!(
                        "{ctx}: `operation` is {}; use one of eq, ne, like, ilike",
                        obj["operation"]
                    ))
                }
            };
            Ok(Grader::StringCheck {
                input: template("input")?,
                reference: template("reference")?,
                operation,
                name,
            })
        }
        "text_similarity" => {
            let m = need("evaluation_metric")?;
            let metric = match m.as_str() {
                Some("fuzzy_match") => Metric::FuzzyMatch,
                Some("bleu") => Metric::Bleu,
                Some("gleu") => Metric::Gleu,
                Some("meteor") => Metric::Meteor,
                Some("rouge_1") => Metric::Rouge(1),
                Some("rouge_2") => Metric::Rouge(2),
                Some("rouge_3") => Metric::Rouge(3),
                Some("rouge_4") => Metric::Rouge(4),
                Some("rouge_5") => Metric::Rouge(5),
                Some("rouge_l") => Metric::RougeL,
                Some("cosine") => {
                    return Err(format!(
                        "{ctx}: `evaluation_metric` cosine needs an embedding model, which is \
                         not supported here: use fuzzy_match, bleu, gleu, meteor, rouge_1 … \
                         rouge_5 or rouge_l"
                    ))
                }
                _ => {
                    return Err(format!(
                        "{ctx}: `evaluation_metric` is {m}; use one of fuzzy_match, bleu, gleu, \
                         meteor, rouge_1, rouge_2, rouge_3, rouge_4, rouge_5, rouge_l"
                    ))
                }
            };
            Ok(Grader::TextSimilarity {
                input: template("input")?,
                reference: template("reference")?,
                metric,
                pass_threshold: threshold()?,
                name,
            })
        }
        "score_model" => {
            let model = need("model")?
                .as_str()
                .filter(|m| !m.is_empty())
                .ok_or_else(|| {
                    format!("{ctx}: `model` must be a local model's name (a non-empty string)")
                })?
                .to_string();
            let list = need("input")?
                .as_array()
                .filter(|l| !l.is_empty())
                .ok_or_else(|| {
                    format!(
                        "{ctx}: `input` must be a non-empty list of messages like \
                     {{\"role\": \"user\", \"content\": \"Grade {{{{ sample.output_text }}}}\"}}"
                    )
                })?;
            let mut input = Vec::with_capacity(list.len());
            for (i, m) in list.iter().enumerate() {
                let msg = parse_message(m).map_err(|e| format!("{ctx}: `input[{i}]`: {e}"))?;
                input.push(msg);
            }
            let range = match obj.get("range") {
                None | Some(Value::Null) => [0.0, 1.0],
                Some(r) => match r
                    .as_array()
                    .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
                {
                    Some(a) if a.len() == 2 && a[0] < a[1] => [a[0], a[1]],
                    _ => {
                        return Err(format!(
                            "{ctx}: `range` is {r}; it must be [min, max] with min < max, e.g. \
                             [0, 1]"
                        ))
                    }
                },
            };
            let sampling_params = match obj.get("sampling_params") {
                None | Some(Value::Null) => json!({}),
                Some(Value::Object(p)) => {
                    const KNOWN: [&str; 5] = [
                        "temperature",
                        "top_p",
                        "seed",
                        "max_completions_tokens",
                        "reasoning_effort",
                    ];
                    if let Some(k) = p.keys().find(|k| !KNOWN.contains(&k.as_str())) {
                        return Err(format!(
                            "{ctx}: unknown sampling parameter `{k}`; known: {}",
                            KNOWN.join(", ")
                        ));
                    }
                    Value::Object(p.clone())
                }
                Some(other) => {
                    return Err(format!(
                        "{ctx}: `sampling_params` must be an object like {{\"temperature\": 0}}, \
                         got {other}"
                    ))
                }
            };
            Ok(Grader::ScoreModel {
                name,
                model,
                input,
                range,
                sampling_params,
                pass_threshold: threshold()?,
            })
        }
        _ => {
            // "multi": the only type left.
            let map = need("graders")?
                .as_object()
                .filter(|m| !m.is_empty())
                .ok_or_else(|| {
                    format!(
                        "{ctx}: `graders` must be a non-empty object of name → grader, e.g. \
                     {{\"exact\": {{\"type\": \"string_check\", …}}}}"
                    )
                })?;
            let mut graders = Vec::with_capacity(map.len());
            for (k, g) in map {
                if !is_ident(k) {
                    return Err(format!(
                        "{ctx}: grader name `{k}` cannot be used in `calculate_output`: rename it \
                         to letters, digits and `_`, not starting with a digit"
                    ));
                }
                let g = parse_grader(g, Some(k)).map_err(|e| format!("{ctx}: {e}"))?;
                graders.push((k.clone(), g));
            }
            let src = need("calculate_output")?
                .as_str()
                .ok_or_else(|| format!("{ctx}: `calculate_output` must be a string formula"))?;
            let names: Vec<&str> = graders.iter().map(|(k, _)| k.as_str()).collect();
            let calculate_output =
                Formula::parse(src, &names).map_err(|e| format!("{ctx}: {e}"))?;
            Ok(Grader::Multi {
                name,
                graders,
                calculate_output,
            })
        }
    }
}

/// One `score_model` input message: `content` a string, a text part
/// (`{"type": "input_text", "text": …}`) or a list of text parts (joined with newlines).
fn parse_message(m: &Value) -> Result<JudgeMessage, String> {
    let obj = m
        .as_object()
        .ok_or_else(|| format!("expected a message object with role and content, got {m}"))?;
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "role" | "content" | "type"))
    {
        return Err(format!(
            "unknown field `{k}`; a message has role, content (and type: \"message\")"
        ));
    }
    let role = match obj.get("role").and_then(Value::as_str) {
        Some(r @ ("system" | "developer" | "user" | "assistant")) => r.to_string(),
        _ => return Err("`role` must be one of system, developer, user, assistant".to_string()),
    };
    let part = |p: &Value| -> Result<String, String> {
        match p {
            Value::String(s) => Ok(s.clone()),
            Value::Object(o)
                if matches!(
                    o.get("type").and_then(Value::as_str),
                    Some("input_text" | "output_text" | "text")
                ) =>
            {
                o.get("text")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| format!("text part without a string `text`: {p}"))
            }
            _ => Err(format!(
                "only text content is supported here (a string or {{\"type\": \"input_text\", \
                 \"text\": …}}), got {p}"
            )),
        }
    };
    let content = match obj.get("content") {
        Some(Value::Array(parts)) => parts
            .iter()
            .map(part)
            .collect::<Result<Vec<_>, _>>()?
            .join("\n"),
        Some(c) => part(c)?,
        None => return Err("missing field `content`".to_string()),
    };
    parse_template(&content)?;
    Ok(JudgeMessage { role, content })
}

fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The first `max` characters of `s`, with `…` when cut.
fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Templates.

/// A piece of a template.
#[derive(Debug, PartialEq)]
enum Piece<'a> {
    Text(&'a str),
    /// `{{ item.a.b }}` → ["a", "b"].
    Item(Vec<String>),
    /// `{{ sample.output_text }}`.
    OutputText,
    /// `{{ sample.output_json.a }}` → ["a"] (empty: the whole JSON).
    OutputJson(Vec<String>),
}

/// Splits a template into text and variables; Err on a malformed or unsupported variable.
fn parse_template(t: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            out.push(Piece::Text(&rest[..open]));
        }
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or_else(|| {
            format!(
                "`{{{{` without a closing `}}}}` in {:?}",
                truncate(&rest[open..], 60)
            )
        })?;
        let var = after[..close].trim();
        out.push(parse_var(var)?);
        rest = &after[close + 2..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    Ok(out)
}

/// `item.a.b[0]` → Item(["a", "b", "0"]).
fn parse_var(var: &str) -> Result<Piece<'static>, String> {
    let bad = |why: &str| {
        format!(
            "template variable `{{{{ {var} }}}}` {why}: write `{{{{ item.<field> }}}}`, \
             `{{{{ sample.output_text }}}}` or `{{{{ sample.output_json.<field> }}}}`"
        )
    };
    let dotted = var.replace('[', ".").replace(']', "");
    let mut segs: Vec<String> = dotted.split('.').map(|s| s.trim().to_string()).collect();
    if segs.iter().any(String::is_empty) {
        return Err(bad("has an empty path segment"));
    }
    let ns = segs.remove(0);
    match ns.as_str() {
        "item" if segs.is_empty() => Err(bad("names no field of the item")),
        "item" => Ok(Piece::Item(segs)),
        "sample" => match segs.first().map(String::as_str) {
            Some("output_text") if segs.len() == 1 => Ok(Piece::OutputText),
            Some("output_text") => Err(bad("indexes into output_text, which is a string")),
            Some("output_json") => Ok(Piece::OutputJson(segs[1..].to_vec())),
            Some(f @ ("output_tools" | "choices" | "output_audio")) => Err(bad(&format!(
                "uses sample.{f}, which is not supported here"
            ))),
            _ => Err(bad("names an unknown sample field")),
        },
        _ => Err(bad("has an unknown namespace (only item and sample exist)")),
    }
}

/// Render `{{ item.x }}` / `{{ sample.output_text }}` / `{{sample.output_json.k}}` templates
/// (whitespace inside braces allowed; nested paths with `.` or `[i]`). A string value is
/// inserted as is, any other value as compact JSON.
pub fn render(template: &str, item: &Value, sample: &Sample) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    for piece in parse_template(template)? {
        match piece {
            Piece::Text(s) => out.push_str(s),
            Piece::OutputText => out.push_str(&sample.output_text),
            Piece::Item(path) => push_value(&mut out, lookup_item(item, &path)?),
            Piece::OutputJson(path) => {
                let root = sample.output_json.as_ref().ok_or_else(|| {
                    "the template uses sample.output_json but the sample's output is not JSON: \
                     ask the model for JSON output, or use sample.output_text"
                        .to_string()
                })?;
                let v = lookup(root, &path).ok_or_else(|| {
                    format!(
                        "the sample's output_json has no field `{}` (the model's JSON: {})",
                        path.join("."),
                        truncate(&root.to_string(), 200)
                    )
                })?;
                push_value(&mut out, v);
            }
        }
    }
    Ok(out)
}

fn push_value(out: &mut String, v: &Value) {
    match v {
        Value::String(s) => out.push_str(s),
        other => out.push_str(&other.to_string()),
    }
}

/// `v` at `path` (object keys, array indices).
fn lookup<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, seg| match v {
        Value::Object(m) => m.get(seg),
        Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

fn lookup_item<'a>(item: &'a Value, path: &[String]) -> Result<&'a Value, String> {
    lookup(item, path).ok_or_else(|| {
        let fields = match item {
            Value::Object(m) => m.keys().cloned().collect::<Vec<_>>().join(", "),
            other => format!("none: the item is not a JSON object but {other}"),
        };
        format!(
            "the item has no field `{}` (its fields: {fields}): add it to every dataset line, or \
             change the grader's template",
            path.join(".")
        )
    })
}

/// Err naming the first of `fields` (as [`Grader::item_fields`] names them: `a.b`, `a.0`) that
/// `item` lacks: a dataset line checked before training, with or without the grader at hand.
pub fn check_fields(item: &Value, fields: &[String]) -> Result<(), String> {
    for field in fields {
        let path: Vec<String> = field.split('.').map(str::to_string).collect();
        lookup_item(item, &path)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// score_model replies.

/// The score in a judge's reply: a JSON object's `score` (or `result`) number when the reply
/// holds one, else the first number in the text.
pub fn parse_score(reply: &str) -> Option<f64> {
    if let (Some(a), Some(b)) = (reply.find('{'), reply.rfind('}')) {
        if a < b {
            if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(&reply[a..=b]) {
                if let Some(s) = ["score", "result"]
                    .iter()
                    .find_map(|k| m.get(*k).and_then(Value::as_f64))
                {
                    return Some(s);
                }
            }
        }
    }
    first_number(reply)
}

/// The first `-?(\d+(\.\d*)?|\.\d+)` in `s`.
fn first_number(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let starts =
            b[i].is_ascii_digit() || (b[i] == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit));
        if starts {
            let neg = i > 0 && b[i - 1] == b'-';
            let mut j = i;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            if j < b.len() && b[j] == b'.' {
                j += 1;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
            }
            let x: f64 = s[i..j].trim_end_matches('.').parse().ok()?;
            return Some(if neg { -x } else { x });
        }
        i += 1;
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Text similarity.

fn similarity(metric: Metric, input: &str, reference: &str) -> f64 {
    match metric {
        Metric::FuzzyMatch => fuzzy_match(input, reference),
        Metric::Bleu => bleu(input, reference),
        Metric::Gleu => gleu(input, reference),
        Metric::Meteor => meteor(input, reference),
        Metric::Rouge(n) => rouge_n(input, reference, n),
        Metric::RougeL => rouge_l(input, reference),
    }
}

/// Length of the longest common subsequence.
fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// rapidfuzz's `fuzz.ratio` / 100: `1 − indel_distance / (len_a + len_b)` over characters,
/// i.e. `2·LCS / (len_a + len_b)`; two empty strings are identical (1).
pub fn fuzzy_match(a: &str, b: &str) -> f64 {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    2.0 * lcs_len(&a, &b) as f64 / (a.len() + b.len()) as f64
}

/// Counts of the `n`-grams of `toks`.
fn ngrams<T: std::hash::Hash + Eq>(toks: &[T], n: usize) -> HashMap<&[T], usize> {
    let mut m = HashMap::new();
    if n > 0 {
        for w in toks.windows(n) {
            *m.entry(w).or_insert(0) += 1;
        }
    }
    m
}

/// Clipped n-gram matches of `hyp` against `reference`, and the n-gram totals of each.
fn ngram_overlap<T: std::hash::Hash + Eq>(hyp: &[T], reference: &[T], n: usize) -> [usize; 3] {
    let h = ngrams(hyp, n);
    let r = ngrams(reference, n);
    let matches = h
        .iter()
        .map(|(g, c)| (*c).min(r.get(g).copied().unwrap_or(0)))
        .sum();
    let total = |len: usize| (len + 1).saturating_sub(n);
    [matches, total(hyp.len()), total(reference.len())]
}

/// Sentence BLEU as sacrebleu's `sentence_bleu` computes it (up to 4-grams, `exp` smoothing,
/// effective order, brevity penalty), in [0, 1], but on whitespace tokens instead of its
/// `13a` tokenizer. An empty input scores 0.
pub fn bleu(hyp: &str, reference: &str) -> f64 {
    let h: Vec<&str> = hyp.split_whitespace().collect();
    let r: Vec<&str> = reference.split_whitespace().collect();
    if h.is_empty() {
        return 0.0;
    }
    let (mut smooth, mut log_sum, mut order) = (1.0f64, 0.0f64, 0usize);
    for n in 1..=4.min(h.len()) {
        let [correct, total, _] = ngram_overlap(&h, &r, n);
        order = n;
        let p = if correct == 0 {
            smooth *= 2.0;
            1.0 / (smooth * total as f64)
        } else {
            correct as f64 / total as f64
        };
        log_sum += p.ln();
    }
    let bp = if h.len() < r.len() {
        (1.0 - r.len() as f64 / h.len() as f64).exp()
    } else {
        1.0
    };
    bp * (log_sum / order as f64).exp()
}

/// Google-BLEU (Wu et al. 2016; NLTK's `sentence_gleu`): over all 1- to 4-grams, the minimum
/// of precision and recall of the matches, on whitespace tokens.
pub fn gleu(hyp: &str, reference: &str) -> f64 {
    let h: Vec<&str> = hyp.split_whitespace().collect();
    let r: Vec<&str> = reference.split_whitespace().collect();
    let [mut m, mut th, mut tr] = [0usize; 3];
    for n in 1..=4 {
        let [a, b, c] = ngram_overlap(&h, &r, n);
        m += a;
        th += b;
        tr += c;
    }
    if th == 0 || tr == 0 {
        return 0.0;
    }
    (m as f64 / th as f64).min(m as f64 / tr as f64)
}

/// A simplified METEOR (Banerjee & Lavie 2005, NLTK's parameters α=0.9, β=3, γ=0.5):
/// **exact matches only** of lowercased whitespace tokens — no stemming and no WordNet
/// synonyms, so it scores lower than NLTK's `meteor_score` wherever those would match.
/// Words are aligned as NLTK's exact stage does (from the end of both texts); the score is the
/// recall-weighted F-mean times `1 − γ·(chunks/matches)^β`.
pub fn meteor(hyp: &str, reference: &str) -> f64 {
    let h: Vec<String> = hyp.split_whitespace().map(str::to_lowercase).collect();
    let r: Vec<String> = reference
        .split_whitespace()
        .map(str::to_lowercase)
        .collect();
    let mut used = vec![false; r.len()];
    let mut matches = Vec::new();
    for i in (0..h.len()).rev() {
        if let Some(j) = (0..r.len()).rev().find(|&j| !used[j] && h[i] == r[j]) {
            used[j] = true;
            matches.push((i, j));
        }
    }
    if matches.is_empty() {
        return 0.0;
    }
    matches.sort_unstable();
    let chunks = 1 + matches
        .windows(2)
        .filter(|w| !(w[1].0 == w[0].0 + 1 && w[1].1 == w[0].1 + 1))
        .count();
    let m = matches.len() as f64;
    let (p, rc) = (m / h.len() as f64, m / r.len() as f64);
    let fmean = p * rc / (0.9 * p + 0.1 * rc);
    fmean * (1.0 - 0.5 * (chunks as f64 / m).powi(3))
}

/// Tokens as Google's `rouge_score` makes them (lowercase, runs of letters and digits), but
/// keeping non-ASCII letters, which `rouge_score` drops; no stemming.
fn rouge_tokens(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

fn f_measure(matches: usize, hyp_total: usize, ref_total: usize) -> f64 {
    if matches == 0 || hyp_total == 0 || ref_total == 0 {
        return 0.0;
    }
    let p = matches as f64 / hyp_total as f64;
    let r = matches as f64 / ref_total as f64;
    2.0 * p * r / (p + r)
}

/// ROUGE-n F-measure (`rouge_score`'s `fmeasure`).
pub fn rouge_n(hyp: &str, reference: &str, n: usize) -> f64 {
    let [m, th, tr] = ngram_overlap(&rouge_tokens(hyp), &rouge_tokens(reference), n);
    f_measure(m, th, tr)
}

/// ROUGE-L F-measure: the longest common subsequence of tokens.
pub fn rouge_l(hyp: &str, reference: &str) -> f64 {
    let (h, r) = (rouge_tokens(hyp), rouge_tokens(reference));
    f_measure(lcs_len(&h, &r), h.len(), r.len())
}

// ---------------------------------------------------------------------------------------------
// calculate_output formulas.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Func {
    Min,
    Max,
    Abs,
    Floor,
    Ceil,
    Exp,
    Sqrt,
    Log,
}

const FUNCS: &str = "min, max, abs, floor, ceil, exp, sqrt, log";

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Num(f64),
    Var(String),
    Neg(Box<Expr>),
    /// `op` one of `+ - * / ^`.
    Bin(char, Box<Expr>, Box<Expr>),
    Call(Func, Vec<Expr>),
}

impl Expr {
    fn uses(&self, name: &str) -> bool {
        match self {
            Expr::Num(_) => false,
            Expr::Var(v) => v == name,
            Expr::Neg(e) => e.uses(name),
            Expr::Bin(_, a, b) => a.uses(name) || b.uses(name),
            Expr::Call(_, args) => args.iter().any(|a| a.uses(name)),
        }
    }

    fn eval(&self, vars: &HashMap<&str, f64>) -> Result<f64, String> {
        Ok(match self {
            Expr::Num(x) => *x,
            Expr::Var(v) => *vars
                .get(v.as_str())
                .ok_or_else(|| format!("no score for grader `{v}`"))?,
            Expr::Neg(e) => -e.eval(vars)?,
            Expr::Bin(op, a, b) => {
                let (a, b) = (a.eval(vars)?, b.eval(vars)?);
                match op {
                    '+' => a + b,
                    '-' => a - b,
                    '*' => a * b,
                    '/' if b == 0.0 => return Err(format!("division by zero ({a} / 0)")),
                    '/' => a / b,
                    _ => a.powf(b),
                }
            }
            Expr::Call(f, args) => {
                let xs = args
                    .iter()
                    .map(|a| a.eval(vars))
                    .collect::<Result<Vec<_>, _>>()?;
                let x = xs.first().copied().unwrap_or(f64::NAN);
                match f {
                    Func::Min => xs.iter().copied().fold(f64::INFINITY, f64::min),
                    Func::Max => xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    Func::Abs => x.abs(),
                    Func::Floor => x.floor(),
                    Func::Ceil => x.ceil(),
                    Func::Exp => x.exp(),
                    Func::Sqrt if x < 0.0 => {
                        return Err(format!("sqrt of a negative number ({x})"))
                    }
                    Func::Sqrt => x.sqrt(),
                    Func::Log if x <= 0.0 => {
                        return Err(format!("log of {x}, which is not positive"))
                    }
                    Func::Log => x.ln(),
                }
            }
        })
    }
}

impl Formula {
    /// Parses `src` (numbers, grader `names`, `+ - * / ^` (or `**`), parentheses, unary minus,
    /// and the functions min, max, abs, floor, ceil, exp, sqrt, log — `log` is natural).
    /// Precedence: `^` binds tightest and to the right, then unary minus (`-2^2` is −4), then
    /// `* /`, then `+ -`.
    pub fn parse(src: &str, names: &[&str]) -> Result<Formula, String> {
        let mut p = ExprParser {
            src,
            toks: lex(src)?,
            pos: 0,
            names,
        };
        let ast = p.expr()?;
        if let Some((at, t)) = p.toks.get(p.pos) {
            return Err(p.err(*at, &format!("unexpected `{}`", t.show())));
        }
        Ok(Formula {
            source: src.to_string(),
            ast,
        })
    }

    /// The formula as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The value with each grader's score in `scores`; Err on division by zero, a missing
    /// score, or a result that is not a finite number.
    pub fn eval(&self, scores: &HashMap<&str, f64>) -> Result<f64, String> {
        let x = self
            .ast
            .eval(scores)
            .map_err(|e| format!("calculate_output `{}`: {e}", self.source))?;
        if x.is_finite() {
            Ok(x)
        } else {
            Err(format!(
                "calculate_output `{}` is {x} for scores {scores:?}",
                self.source
            ))
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Ident(String),
    /// One of `+ - * / ^ ( ) ,` (`**` is lexed as `^`).
    Sym(char),
}

impl Tok {
    fn show(&self) -> String {
        match self {
            Tok::Num(x) => x.to_string(),
            Tok::Ident(s) => s.clone(),
            Tok::Sym(c) => c.to_string(),
        }
    }
}

/// Tokens with their character offsets.
fn lex(src: &str) -> Result<Vec<(usize, Tok)>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            if i < chars.len() && matches!(chars[i], 'e' | 'E') {
                let mut j = i + 1;
                if j < chars.len() && matches!(chars[j], '+' | '-') {
                    j += 1;
                }
                if j < chars.len() && chars[j].is_ascii_digit() {
                    i = j;
                    while i < chars.len() && chars[i].is_ascii_digit() {
                        i += 1;
                    }
                }
            }
            let text: String = chars[start..i].iter().collect();
            let x = text.parse::<f64>().map_err(|_| {
                format!("calculate_output `{src}`: bad number `{text}` at character {start}")
            })?;
            out.push((start, Tok::Num(x)));
        } else if c.is_ascii_alphabetic() || c == '_' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((start, Tok::Ident(chars[start..i].iter().collect())));
        } else if c == '*' && chars.get(i + 1) == Some(&'*') {
            out.push((start, Tok::Sym('^')));
            i += 2;
        } else if "+-*/^(),".contains(c) {
            out.push((start, Tok::Sym(c)));
            i += 1;
        } else {
            return Err(format!(
                "calculate_output `{src}`: unexpected `{c}` at character {start}; use numbers, \
                 grader names, + - * / ^, parentheses and {FUNCS}"
            ));
        }
    }
    Ok(out)
}

/// Recursive descent over the grammar
/// `expr = term (("+"|"-") term)*`, `term = unary (("*"|"/") unary)*`,
/// `unary = ("-"|"+") unary | power`, `power = primary ("^" unary)?`,
/// `primary = number | name | func "(" expr ("," expr)* ")" | "(" expr ")"`.
struct ExprParser<'a> {
    src: &'a str,
    toks: Vec<(usize, Tok)>,
    pos: usize,
    names: &'a [&'a str],
}

impl ExprParser<'_> {
    fn err(&self, at: usize, what: &str) -> String {
        format!("calculate_output `{}`: {what} at character {at}", self.src)
    }

    fn peek_sym(&self) -> Option<char> {
        match self.toks.get(self.pos) {
            Some((_, Tok::Sym(c))) => Some(*c),
            _ => None,
        }
    }

    fn eat(&mut self, c: char) -> bool {
        let hit = self.peek_sym() == Some(c);
        if hit {
            self.pos += 1;
        }
        hit
    }

    fn expect(&mut self, c: char) -> Result<(), String> {
        if self.eat(c) {
            return Ok(());
        }
        let (at, found) = match self.toks.get(self.pos) {
            Some((at, t)) => (*at, format!("`{}`", t.show())),
            None => (self.src.chars().count(), "the end".to_string()),
        };
        Err(self.err(at, &format!("expected `{c}`, found {found}")))
    }

    fn expr(&mut self) -> Result<Expr, String> {
        let mut e = self.term()?;
        while let Some(op @ ('+' | '-')) = self.peek_sym() {
            self.pos += 1;
            e = Expr::Bin(op, Box::new(e), Box::new(self.term()?));
        }
        Ok(e)
    }

    fn term(&mut self) -> Result<Expr, String> {
        let mut e = self.unary()?;
        while let Some(op @ ('*' | '/')) = self.peek_sym() {
            self.pos += 1;
            e = Expr::Bin(op, Box::new(e), Box::new(self.unary()?));
        }
        Ok(e)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.eat('-') {
            return Ok(Expr::Neg(Box::new(self.unary()?)));
        }
        if self.eat('+') {
            return self.unary();
        }
        let base = self.primary()?;
        if self.eat('^') {
            return Ok(Expr::Bin('^', Box::new(base), Box::new(self.unary()?)));
        }
        Ok(base)
    }

    fn primary(&mut self) -> Result<Expr, String> {
        let Some((at, tok)) = self.toks.get(self.pos).cloned() else {
            let end = self.src.chars().count();
            return Err(self.err(
                end,
                "expected a number, a grader name or `(`, found the end",
            ));
        };
        self.pos += 1;
        match tok {
            Tok::Num(x) => Ok(Expr::Num(x)),
            Tok::Sym('(') => {
                let e = self.expr()?;
                self.expect(')')?;
                Ok(e)
            }
            Tok::Ident(name) if self.peek_sym() == Some('(') => {
                let f = match name.as_str() {
                    "min" => Func::Min,
                    "max" => Func::Max,
                    "abs" => Func::Abs,
                    "floor" => Func::Floor,
                    "ceil" => Func::Ceil,
                    "exp" => Func::Exp,
                    "sqrt" => Func::Sqrt,
                    "log" => Func::Log,
                    _ => {
                        return Err(
                            self.err(at, &format!("unknown function `{name}` (known: {FUNCS})"))
                        )
                    }
                };
                self.pos += 1;
                let mut args = vec![self.expr()?];
                while self.eat(',') {
                    args.push(self.expr()?);
                }
                self.expect(')')?;
                let variadic = matches!(f, Func::Min | Func::Max);
                if !variadic && args.len() != 1 {
                    return Err(self.err(
                        at,
                        &format!("`{name}` takes one argument, got {}", args.len()),
                    ));
                }
                Ok(Expr::Call(f, args))
            }
            Tok::Ident(name) if self.names.contains(&name.as_str()) => Ok(Expr::Var(name)),
            Tok::Ident(name) => Err(self.err(
                at,
                &format!(
                    "unknown grader `{name}` (the graders are: {})",
                    self.names.join(", ")
                ),
            )),
            Tok::Sym(c) => Err(self.err(
                at,
                &format!("expected a number, a grader name or `(`, found `{c}`"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A judge that answers from a script and records what it was asked.
    struct ScriptedJudge {
        replies: Vec<String>,
        calls: Vec<(String, Vec<Value>, Value)>,
    }

    impl ScriptedJudge {
        fn new(replies: &[&str]) -> ScriptedJudge {
            ScriptedJudge {
                replies: replies.iter().rev().map(|s| s.to_string()).collect(),
                calls: Vec::new(),
            }
        }
    }

    impl Judge for ScriptedJudge {
        fn complete(
            &mut self,
            model: &str,
            messages: &[Value],
            sampling: &Value,
        ) -> Result<String, String> {
            self.calls
                .push((model.to_string(), messages.to_vec(), sampling.clone()));
            self.replies
                .pop()
                .ok_or_else(|| "the script ran out of replies".to_string())
        }
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} != {b}");
    }

    fn grade(g: &Value, item: &Value, out: &str) -> Result<f64, String> {
        let g = Grader::parse(g)?;
        g.grade(item, &Sample::text(out), &mut ScriptedJudge::new(&[]))
    }

    fn parse_err(v: Value) -> String {
        match Grader::parse(&v) {
            Err(e) => e,
            Ok(g) => panic!("parsed {v} into {g:?}"),
        }
    }

    #[test]
    fn string_check_operations() {
        let item = json!({"answer": "Paris"});
        let check = |op: &str, out: &str| {
            let g = json!({"type": "string_check", "name": "s", "operation": op,
                "input": "{{ sample.output_text }}", "reference": "{{item.answer}}"});
            grade(&g, &item, out).expect("grades")
        };
        assert_eq!(check("eq", "Paris"), 1.0);
        assert_eq!(check("eq", "paris"), 0.0);
        assert_eq!(check("ne", "paris"), 1.0);
        assert_eq!(check("ne", "Paris"), 0.0);
        assert_eq!(check("like", "It is Paris."), 1.0);
        assert_eq!(check("like", "It is PARIS."), 0.0);
        assert_eq!(check("ilike", "It is PARIS."), 1.0);
        assert_eq!(check("ilike", "It is Lyon."), 0.0);
    }

    #[test]
    fn fuzzy_match_is_rapidfuzz_ratio() {
        // rapidfuzz: fuzz.ratio("kitten", "sitting") = 61.538461…: LCS "ittn", 2·4/13.
        close(fuzzy_match("kitten", "sitting"), 8.0 / 13.0);
        close(fuzzy_match("abc", "abc"), 1.0);
        close(fuzzy_match("abc", "xyz"), 0.0);
        close(fuzzy_match("", ""), 1.0);
        close(fuzzy_match("héllo", "hello"), 0.8);
    }

    const HYP: &str = "the cat sat on the mat";
    const REF: &str = "the cat is on the mat";

    #[test]
    fn bleu_values() {
        close(bleu(HYP, HYP), 1.0);
        // Short identical sentences count only the orders they have (effective order).
        close(bleu("hello world", "hello world"), 1.0);
        // Matches by order: 5/6, 3/5, 1/4, and 0/3 smoothed to 1/(2·3).
        let expected = ((5.0 / 6.0) * (3.0 / 5.0) * (1.0 / 4.0) * (1.0 / 6.0f64)).powf(0.25);
        close(bleu(HYP, REF), expected);
        // Brevity penalty: 2 tokens against 4, precisions 1 and 1.
        close(bleu("the cat", "the cat is here"), (1.0f64 - 2.0).exp());
        close(bleu("", REF), 0.0);
    }

    #[test]
    fn gleu_values() {
        close(gleu(HYP, HYP), 1.0);
        // 9 matching n-grams (5 + 3 + 1 + 0) out of 18 on both sides.
        close(gleu(HYP, REF), 0.5);
        // Recall limits a short hypothesis: 3 matches (2 + 1) out of 3 and of 4 + 3 + 2 + 1.
        close(gleu("the cat", "the cat is here"), 0.3);
    }

    #[test]
    fn meteor_values() {
        // NLTK's meteor_score for an identical 6-word sentence: 1 − 0.5·(1/6)³.
        close(meteor(HYP, HYP), 1.0 - 0.5 / 216.0);
        // 5 matches in 2 chunks ("the cat", "on the mat"), P = R = 5/6.
        close(
            meteor(HYP, REF),
            5.0 / 6.0 * (1.0 - 0.5 * (2.0f64 / 5.0).powi(3)),
        );
        // Case is ignored; nothing in common scores 0.
        close(meteor("The Cat", "the cat"), 1.0 - 0.5 / 8.0);
        close(meteor("dog", "cat"), 0.0);
    }

    #[test]
    fn rouge_values() {
        close(rouge_n(HYP, REF, 1), 5.0 / 6.0);
        close(rouge_n(HYP, REF, 2), 3.0 / 5.0);
        close(rouge_n(HYP, REF, 3), 1.0 / 4.0);
        close(rouge_n(HYP, REF, 4), 0.0);
        close(rouge_n(HYP, HYP, 5), 1.0);
        // LCS "the cat on the mat": 5 of 6 on both sides.
        close(rouge_l(HYP, REF), 5.0 / 6.0);
        // LCS "the cat the mat": P = 4/4, R = 4/6 → F = 0.8; punctuation and case do not matter.
        close(rouge_l("The cat, the mat!", "the big cat on the mat"), 0.8);
        close(rouge_l("a b c", "a x b y c z"), 2.0 / 3.0);
    }

    #[test]
    fn text_similarity_grader_uses_its_metric_and_keeps_the_threshold() {
        let g = Grader::parse(&json!({"type": "text_similarity", "name": "sim",
            "input": "{{sample.output_text}}", "reference": "{{ item.ref }}",
            "evaluation_metric": "rouge_l", "pass_threshold": 0.5}))
        .expect("parses");
        assert_eq!(g.pass_threshold(), Some(0.5));
        let s = g
            .grade(
                &json!({"ref": REF}),
                &Sample::text(HYP),
                &mut ScriptedJudge::new(&[]),
            )
            .expect("grades");
        close(s, 5.0 / 6.0);
    }

    #[test]
    fn render_fills_item_and_sample_fields() {
        let item = json!({"q": "2+2", "a": {"b": [10, {"c": "deep"}]}, "n": 4, "flag": true});
        let sample = Sample {
            output_text: "four".into(),
            output_json: Some(json!({"k": "v", "list": [1, 2]})),
        };
        let out = render(
            "Q: {{item.q}} A: {{ sample.output_text }} {{  item.a.b[1].c  }} {{item.a.b.0}} \
             {{item.n}} {{item.flag}} {{sample.output_json.k}} {{sample.output_json.list}}",
            &item,
            &sample,
        )
        .expect("renders");
        assert_eq!(out, "Q: 2+2 A: four deep 10 4 true v [1,2]");
        assert_eq!(
            render("no vars", &item, &sample).expect("renders"),
            "no vars"
        );
    }

    #[test]
    fn render_errors_name_the_problem() {
        let item = json!({"q": "x"});
        let text = Sample::text("plain words");
        let e = render("{{ item.missing }}", &item, &text).expect_err("missing field");
        assert!(
            e.contains("no field `missing`") && e.contains("its fields: q"),
            "{e}"
        );
        let e = render("{{ item.q.deeper }}", &item, &text).expect_err("not an object");
        assert!(e.contains("`q.deeper`"), "{e}");
        let e = render("{{ sample.output_json.k }}", &item, &text).expect_err("no json");
        assert!(e.contains("not JSON"), "{e}");
        let json_sample = Sample::text("{\"k\": 1}");
        let e = render("{{ sample.output_json.j }}", &item, &json_sample).expect_err("no key");
        assert!(e.contains("no field `j`"), "{e}");
        let e = render("{{ item.q", &item, &text).expect_err("unclosed");
        assert!(e.contains("closing"), "{e}");
        for bad in ["{{ q }}", "{{ other.q }}", "{{ item }}", "{{ item..q }}"] {
            let e = render(bad, &item, &text).expect_err(bad);
            assert!(e.contains("template variable"), "{bad}: {e}");
        }
        let e = render("{{ sample.choices }}", &item, &text).expect_err("choices");
        assert!(e.contains("not supported here"), "{e}");
    }

    #[test]
    fn parse_errors_say_what_to_fix() {
        let cases: Vec<(Value, &str)> = vec![
            (json!("string_check"), "expected a JSON object"),
            (
                json!({"name": "x"}),
                "missing field `type`: set it to one of string_check",
            ),
            (
                json!({"type": "regex"}),
                "unknown grader type `regex`; supported: string_check",
            ),
            (
                json!({"type": "python", "source": "def grade(): pass"}),
                "`python` is not supported here",
            ),
            (
                json!({"type": "label_model"}),
                "`label_model` is not supported here",
            ),
            (
                json!({"type": "string_check", "input": "a", "operation": "eq"}),
                "missing field `reference`",
            ),
            (
                json!({"type": "string_check", "input": "a", "reference": "b", "operation": "contains"}),
                "use one of eq, ne, like, ilike",
            ),
            (
                json!({"type": "string_check", "input": "a", "reference": "b", "operation": "eq", "extra": 1}),
                "unknown field `extra`",
            ),
            (
                json!({"type": "string_check", "input": 3, "reference": "b", "operation": "eq"}),
                "`input` must be a string",
            ),
            (
                json!({"type": "string_check", "input": "{{ itm.a }}", "reference": "b", "operation": "eq"}),
                "unknown namespace",
            ),
            (
                json!({"type": "text_similarity", "input": "a", "reference": "b"}),
                "missing field `evaluation_metric`",
            ),
            (
                json!({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "cosine"}),
                "cosine needs an embedding model",
            ),
            (
                json!({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "rouge_6"}),
                "use one of fuzzy_match",
            ),
            (
                json!({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "bleu", "pass_threshold": "high"}),
                "`pass_threshold` must be a number",
            ),
            (
                json!({"type": "score_model", "input": [{"role": "user", "content": "x"}]}),
                "missing field `model`",
            ),
            (
                json!({"type": "score_model", "model": "j", "input": []}),
                "non-empty list of messages",
            ),
            (
                json!({"type": "score_model", "model": "j", "input": [{"role": "judge", "content": "x"}]}),
                "`input[0]`: `role` must be one of",
            ),
            (
                json!({"type": "score_model", "model": "j", "input": [{"role": "user", "content": {"type": "input_image", "image_url": "u"}}]}),
                "only text content",
            ),
            (
                json!({"type": "score_model", "model": "j", "input": [{"role": "user"}]}),
                "missing field `content`",
            ),
            (
                json!({"type": "score_model", "model": "j", "input": [{"role": "user", "content": "x"}], "range": [1, 0]}),
                "min < max",
            ),
            (
                json!({"type": "score_model", "model": "j", "input": [{"role": "user", "content": "x"}], "sampling_params": {"temp": 0}}),
                "unknown sampling parameter `temp`",
            ),
            (
                json!({"type": "multi", "calculate_output": "1"}),
                "missing field `graders`",
            ),
            (
                json!({"type": "multi", "graders": {}, "calculate_output": "1"}),
                "non-empty object",
            ),
            (
                json!({"type": "multi", "graders": {"a-b": {"type": "string_check", "input": "a", "reference": "b", "operation": "eq"}}, "calculate_output": "1"}),
                "rename it",
            ),
            (
                json!({"type": "multi", "graders": {"a": {"type": "string_check", "input": "a", "reference": "b", "operation": "eq"}}}),
                "missing field `calculate_output`",
            ),
            (
                json!({"type": "multi", "graders": {"a": {"type": "string_check", "input": "a", "reference": "b", "operation": "eq"}}, "calculate_output": "a + b"}),
                "unknown grader `b` (the graders are: a)",
            ),
            (
                json!({"type": "multi", "graders": {"a": {"type": "string_check", "input": "a", "reference": "b", "operation": "eq"}}, "calculate_output": "(a + 1"}),
                "expected `)`, found the end",
            ),
            (
                json!({"type": "multi", "graders": {"a": {"type": "string_check", "input": "a", "reference": "b", "operation": "eq"}}, "calculate_output": "mean(a)"}),
                "unknown function `mean`",
            ),
            (
                json!({"type": "multi", "graders": {"a": {"type": "string_check", "input": "a", "reference": "b", "operation": "eq"}}, "calculate_output": "a % 2"}),
                "unexpected `%` at character 2",
            ),
            (
                json!({"type": "multi", "graders": {"a": {"type": "string_check", "input": "a", "reference": "b", "operation": "eq"}}, "calculate_output": "a 2"}),
                "unexpected `2`",
            ),
            (
                json!({"type": "multi", "graders": {"a": {"type": "string_check", "input": "a", "reference": "b", "operation": "eq"}}, "calculate_output": "abs(a, 1)"}),
                "takes one argument",
            ),
            (
                json!({"type": "multi", "graders": {"a": {"type": "python"}}, "calculate_output": "a"}),
                "grader `a` in `graders`: grader type `python` is not supported",
            ),
        ];
        for (v, want) in cases {
            let e = parse_err(v.clone());
            assert!(e.contains(want), "{v}\n  gave: {e}\n  want: {want}");
        }
    }

    fn formula(src: &str, scores: &[(&str, f64)]) -> Result<f64, String> {
        let names: Vec<&str> = scores.iter().map(|(n, _)| *n).collect();
        Formula::parse(src, &names)?.eval(&scores.iter().copied().collect())
    }

    #[test]
    fn formula_precedence_and_functions() {
        let f = |s: &str| formula(s, &[("a", 0.5), ("b", 2.0)]).expect(s);
        close(f("1 + 2 * 3"), 7.0);
        close(f("(1 + 2) * 3"), 9.0);
        close(f("8 / 2 / 2"), 2.0);
        close(f("10 - 4 - 3"), 3.0);
        close(f("2 ^ 3 ^ 2"), 512.0);
        close(f("2 ** 3"), 8.0);
        close(f("-2 ^ 2"), -4.0);
        close(f("2 ^ -1"), 0.5);
        close(f("--a"), 0.5);
        close(f("0.7 * a + 0.3 * b"), 0.95);
        close(f("min(a, b, 0.1)"), 0.1);
        close(f("max(a, b)"), 2.0);
        close(f("abs(a - b)"), 1.5);
        close(f("floor(b * 1.7) + ceil(a)"), 4.0);
        close(f("exp(0) + sqrt(b * 8) + log(exp(2))"), 1.0 + 4.0 + 2.0);
        close(f("1e-1 * b"), 0.2);
        close(f(".5 + a"), 1.0);
    }

    #[test]
    fn formula_runtime_errors() {
        let e = formula("a / (b - 2)", &[("a", 1.0), ("b", 2.0)]).expect_err("div 0");
        assert!(e.contains("division by zero"), "{e}");
        let e = formula("sqrt(a)", &[("a", -1.0)]).expect_err("sqrt");
        assert!(e.contains("sqrt of a negative"), "{e}");
        let e = formula("log(a)", &[("a", 0.0)]).expect_err("log");
        assert!(e.contains("not positive"), "{e}");
        let e = formula("exp(a)", &[("a", 1000.0)]).expect_err("overflow");
        assert!(e.contains("inf"), "{e}");
    }

    #[test]
    fn score_model_asks_the_judge_and_clamps() {
        let g = Grader::parse(&json!({"type": "score_model", "name": "judge",
            "model": "judge-7b", "range": [0, 10], "sampling_params": {"temperature": 0, "seed": 1},
            "input": [
                {"role": "system", "content": "You grade answers from 0 to 10."},
                {"role": "user", "content": [{"type": "input_text", "text": "Q: {{item.q}}"},
                                             {"type": "input_text", "text": "A: {{sample.output_text}}"}]}
            ]}))
        .expect("parses");
        assert_eq!(g.judge_models(), vec!["judge-7b".to_string()]);
        assert_eq!(g.item_fields(), vec!["q".to_string()]);
        let mut judge = ScriptedJudge::new(&[
            "I'd give it 7.5 out of 10.",
            "{\"reason\": \"2 mistakes\", \"score\": 4}",
            "Score: 12",
            "-3",
            "It is wrong.",
        ]);
        let item = json!({"q": "2+2?"});
        let sample = Sample::text("4");
        let mut next = || g.grade(&item, &sample, &mut judge);
        close(next().expect("7.5"), 7.5);
        close(next().expect("json"), 4.0);
        close(next().expect("clamped up"), 10.0);
        close(next().expect("clamped down"), 0.0);
        let e = next().expect_err("no number");
        assert!(e.contains("no number") && e.contains("It is wrong."), "{e}");
        let (model, messages, sampling) = &judge.calls[0];
        assert_eq!(model, "judge-7b");
        assert_eq!(sampling, &json!({"temperature": 0, "seed": 1}));
        assert_eq!(
            messages,
            &vec![
                json!({"role": "system", "content": "You grade answers from 0 to 10."}),
                json!({"role": "user", "content": "Q: 2+2?\nA: 4"}),
            ]
        );
    }

    #[test]
    fn score_model_reply_truncated_in_errors_and_judge_errors_named() {
        let g = Grader::parse(&json!({"type": "score_model", "name": "j", "model": "m",
            "input": [{"role": "user", "content": "{{sample.output_text}}"}]}))
        .expect("parses");
        let long = "no ".repeat(200);
        let mut judge = ScriptedJudge::new(&[long.as_str()]);
        let e = g
            .grade(&json!({}), &Sample::text("x"), &mut judge)
            .expect_err("no number");
        assert!(e.len() < 500 && e.contains('…'), "{e}");
        let e = g
            .grade(&json!({}), &Sample::text("x"), &mut judge)
            .expect_err("script exhausted");
        assert!(
            e.contains("judge model `m` failed: the script ran out"),
            "{e}"
        );
    }

    #[test]
    fn multi_combines_its_graders() {
        let g = Grader::parse(&json!({"type": "multi", "name": "combo",
            "graders": {
                "exact": {"type": "string_check", "name": "exact", "operation": "eq",
                          "input": "{{sample.output_text}}", "reference": "{{item.answer}}"},
                "sim": {"type": "text_similarity", "evaluation_metric": "fuzzy_match",
                        "input": "{{sample.output_text}}", "reference": "{{item.answer}}"},
                "style": {"type": "score_model", "model": "judge-a",
                          "input": [{"role": "user", "content": "Rate {{ item.meta.topic }}"}]},
                "unused": {"type": "score_model", "model": "judge-b",
                           "input": [{"role": "user", "content": "x"}]}
            },
            "calculate_output": "0.5 * exact + 0.25 * sim + 0.25 * style"}))
        .expect("parses");
        assert_eq!(g.name(), "combo");
        assert_eq!(
            g.judge_models(),
            vec!["judge-a".to_string(), "judge-b".to_string()]
        );
        assert_eq!(
            g.item_fields(),
            vec!["answer".to_string(), "meta.topic".to_string()]
        );
        let item = json!({"answer": "kitten", "meta": {"topic": "cats"}});
        g.check_item(&item).expect("complete item");
        let e = g
            .check_item(&json!({"answer": "x"}))
            .expect_err("lacks meta");
        assert!(e.contains("`meta.topic`"), "{e}");
        // Only the graders the formula names run: one judge call, not two.
        let mut judge = ScriptedJudge::new(&["0.8"]);
        let s = g
            .grade(&item, &Sample::text("sitting"), &mut judge)
            .expect("grades");
        close(s, 0.25 * 8.0 / 13.0 + 0.25 * 0.8);
        assert_eq!(judge.calls.len(), 1);
        assert_eq!(judge.calls[0].1[0]["content"], "Rate cats");
    }

    #[test]
    fn multi_errors_name_the_failing_grader() {
        let g = Grader::parse(&json!({"type": "multi", "name": "ratio",
            "graders": {"a": {"type": "string_check", "operation": "eq",
                              "input": "{{sample.output_text}}", "reference": "{{item.x}}"}},
            "calculate_output": "1 / a"}))
        .expect("parses");
        let e = grade_with(&g, &json!({"x": "no"}), "yes").expect_err("1 / 0");
        assert!(
            e.starts_with("grader `ratio`:") && e.contains("division by zero"),
            "{e}"
        );
        close(
            grade_with(&g, &json!({"x": "yes"}), "yes").expect("1 / 1"),
            1.0,
        );
        let e = grade_with(&g, &json!({}), "yes").expect_err("missing x");
        assert!(
            e.contains("grader `ratio`: grader `a`:") && e.contains("no field `x`"),
            "{e}"
        );
    }

    fn grade_with(g: &Grader, item: &Value, out: &str) -> Result<f64, String> {
        g.grade(item, &Sample::text(out), &mut ScriptedJudge::new(&[]))
    }

    #[test]
    fn parse_score_reads_numbers_and_json() {
        assert_eq!(parse_score("0.7"), Some(0.7));
        assert_eq!(parse_score("{\"score\": 0.25}"), Some(0.25));
        assert_eq!(
            parse_score("```json\n{\"steps\": 3, \"score\": 0.9}\n```"),
            Some(0.9)
        );
        assert_eq!(parse_score("Score: -2."), Some(-2.0));
        assert_eq!(parse_score("about .5 I think"), Some(0.5));
        assert_eq!(parse_score("none"), None);
    }
}
