//! `ferrolm cost audit`: where a chat request's prompt tokens go, and what they cost.
//!
//! The file is one OpenAI chat request (`.json`), or one per line (`.jsonl`; blank lines are
//! skipped, each line is priced, then all of them together). The prompt is cut into parts:
//! - `system`: the leading system / developer messages;
//! - `tool`: each tool definition, counted as the compact JSON of its `function`;
//! - `history`: the messages after those, but the last;
//! - `new`: the last message (normally the new user message).
//!
//! A message's text is its content (a string, or the `text` of its parts) and the name and
//! arguments of its tool calls; each piece is counted on its own and the counts summed.
//!
//! Which tokenizer counts, per catalog entry:
//! - `tokenizer = "o200k_base"` or `"cl100k_base"` (OpenAI): exact BPE counts (tiktoken-rs
//!   embeds the ranks). The framing, tokens in no part, follows OpenAI's published counting
//!   rule: 3 per message plus its role (plus 1 and its name), and 3 priming the reply. OpenAI
//!   renders tools in its own format, so the billed count of a tool differs from its JSON's by
//!   a few tokens.
//! - self-hosted entries: the GGUF's own tokenizer (`--gguf`, default ferrolm's default model).
//!   The total is the chat template over the messages as plain `{role, content}` turns — what
//!   `ferrolm tokenize --chat` counts — plus the tools' JSON (`ferrolm serve` wraps tools in a
//!   few words of its own).
//! - any other (Claude, Gemini, Llama via a host): the provider's tokenizer is not available
//!   here, so the counts are o200k_base's, marked `"exact": false` ("approx" in tables).
//!
//! Caching: the static prefix is the system and tool parts. With caching the month's first
//! request writes it and every later one reads it at the cached price
//! (`PromptCache::Prefix`); the framing of system messages is not counted in it, and
//! providers' minimum cacheable prompt (OpenAI: 1,024 tokens) is not modelled.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use ferrolm_accounting::{ModelPrice, PromptCache, Workload};
use ferrolm_tokenizer::{chat::ChatTemplate, Tokenizer};
use serde::Serialize;
use serde_json::{json, Map, Value};
use tiktoken_rs::CoreBPE;

use super::{pick, print_table, requests, tokens, usd, PricesArg};

#[derive(Args)]
pub struct AuditArgs {
    /// An OpenAI chat request (.json), or one request per line (.jsonl).
    file: PathBuf,
    /// Catalog models to price (repeatable), or `all` (the default).
    #[arg(long = "model", short = 'm', value_name = "ID")]
    models: Vec<String>,
    /// Output tokens per request to add to the price (0: the prompt alone).
    #[arg(long, value_name = "M", default_value_t = 0, allow_negative_numbers = true, value_parser = tokens)]
    output_tokens: u64,
    /// How many times a month each request is sent.
    #[arg(long, value_name = "N", default_value_t = 1, allow_negative_numbers = true, value_parser = requests)]
    requests: u64,
    /// The GGUF whose tokenizer counts for self-hosted catalog entries (default: the
    /// installed default model).
    #[arg(long, value_name = "GGUF")]
    gguf: Option<PathBuf>,
    #[command(flatten)]
    prices: PricesArg,
    /// Print JSON: {"file", "requests_per_month", "output_tokens", "requests": [...], "total"}.
    #[arg(long)]
    json: bool,
}

// ---- the request, cut into parts ----

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    System,
    Tool,
    History,
    New,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::System => "system",
            Kind::Tool => "tool",
            Kind::History => "history",
            Kind::New => "new",
        }
    }
}

/// A part of the prompt and the pieces of text it is made of.
struct Part {
    kind: Kind,
    /// `messages[i]`, or the tool's name.
    label: String,
    role: Option<String>,
    texts: Vec<String>,
}

/// A message as a plain turn: what chat templates and OpenAI's framing rule see.
struct Turn {
    role: String,
    name: Option<String>,
    content: String,
}

/// One chat request of the file.
struct Request {
    /// The line of a .jsonl file; None for a .json file.
    line: Option<usize>,
    parts: Vec<Part>,
    turns: Vec<Turn>,
}

fn read_requests(path: &Path) -> Result<Vec<Request>> {
    let name = path.display();
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {name}"))?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        let mut out = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let n = i + 1;
            let v: Value = serde_json::from_str(line).map_err(|e| {
                let msg = e.to_string();
                let msg = msg.split(" at line ").next().unwrap_or_default();
                anyhow!("{name}: line {n}, column {}: not valid JSON ({msg}); each line of a .jsonl file must be one chat request object", e.column())
            })?;
            out.push(parse_request(&v, &format!("{name}: line {n}"), Some(n))?);
        }
        if out.is_empty() {
            bail!("{name}: no requests: every line is blank");
        }
        return Ok(out);
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| {
        anyhow!("{name}: not valid JSON ({e}); a .json file holds one chat request object (use .jsonl for one per line)")
    })?;
    Ok(vec![parse_request(&v, &name.to_string(), None)?])
}

fn parse_request(v: &Value, at: &str, line: Option<usize>) -> Result<Request> {
    let Some(messages) = v.get("messages").and_then(Value::as_array) else {
        bail!("{at}: `messages` is missing or not an array: an OpenAI chat request looks like {{\"model\": \"...\", \"messages\": [{{\"role\": \"user\", \"content\": \"...\"}}]}}");
    };
    if messages.is_empty() {
        bail!("{at}: `messages` is empty: a chat request has at least one message");
    }
    let mut parts = Vec::new();
    let mut turns = Vec::new();
    let mut leading_system = true;
    for (i, m) in messages.iter().enumerate() {
        let Some(role) = m.get("role").and_then(Value::as_str) else {
            bail!("{at}: messages[{i}] has no string `role` (system, user, assistant, tool)");
        };
        let texts = message_texts(m, &format!("{at}: messages[{i}]"))?;
        leading_system &= matches!(role, "system" | "developer");
        let kind = if leading_system {
            Kind::System
        } else if i + 1 == messages.len() {
            Kind::New
        } else {
            Kind::History
        };
        turns.push(Turn {
            role: role.to_owned(),
            name: m.get("name").and_then(Value::as_str).map(str::to_owned),
            content: texts.join("\n"),
        });
        parts.push(Part {
            kind,
            label: format!("messages[{i}]"),
            role: Some(role.to_owned()),
            texts,
        });
    }
    // Tools go after the system messages: the static prefix is system + tools.
    let system = parts.iter().filter(|p| p.kind == Kind::System).count();
    let tools = tool_parts(v.get("tools"), at)?;
    parts.splice(system..system, tools);
    Ok(Request { line, parts, turns })
}

/// The text pieces of one message: its content, and its tool calls' names and arguments.
fn message_texts(m: &Value, at: &str) -> Result<Vec<String>> {
    let mut texts = Vec::new();
    match m.get("content") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => texts.push(s.clone()),
        // Images, audio, files: not text, not counted.
        Some(Value::Array(items)) => texts.extend(
            items
                .iter()
                .filter_map(|item| item.get("text").and_then(Value::as_str))
                .map(str::to_owned),
        ),
        Some(other) => bail!(
            "{at}.content is {other}: it must be a string, an array of content parts, or null"
        ),
    }
    for call in m
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let f = call.get("function").unwrap_or(call);
        for key in ["name", "arguments"] {
            match f.get(key) {
                Some(Value::String(s)) => texts.push(s.clone()),
                Some(Value::Null) | None => {}
                Some(v) => texts.push(v.to_string()),
            }
        }
    }
    Ok(texts)
}

fn tool_parts(tools: Option<&Value>, at: &str) -> Result<Vec<Part>> {
    let list = match tools {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => bail!(
            "{at}: `tools` must be an array of {{\"type\": \"function\", \"function\": {{...}}}}"
        ),
    };
    let mut parts = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let Some(f) = t.get("function").filter(|f| f.is_object()) else {
            bail!("{at}: tools[{i}] has no `function` object: each tool is {{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": ...}}}}");
        };
        let name = f.get("name").and_then(Value::as_str);
        parts.push(Part {
            kind: Kind::Tool,
            label: name.map_or_else(|| format!("tools[{i}]"), str::to_owned),
            role: None,
            texts: vec![serde_json::to_string(f)?],
        });
    }
    Ok(parts)
}

// ---- tokenizers ----

/// Which tokenizer counts for a catalog entry, in the order the output lists them.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Which {
    O200k,
    Cl100k,
    Gguf,
}

/// The tokenizer of `m`, and whether it is the model's own (else an o200k approximation).
fn which(m: &ModelPrice) -> (Which, bool) {
    match m.tokenizer.as_deref() {
        Some("o200k_base") => (Which::O200k, true),
        Some("cl100k_base") => (Which::Cl100k, true),
        _ if m.self_hosted.is_some() => (Which::Gguf, true),
        _ => (Which::O200k, false),
    }
}

enum Counter {
    Bpe(CoreBPE),
    Gguf {
        tok: Box<Tokenizer>,
        template: Box<ChatTemplate>,
    },
}

/// A loaded tokenizer and the name it has in the output.
struct Loaded {
    which: Which,
    label: String,
    counter: Counter,
}

fn load(which: Which, gguf: Option<&Path>) -> Result<Loaded> {
    let bpe = |name: &str, r: Result<CoreBPE>| -> Result<Loaded> {
        Ok(Loaded {
            which,
            label: name.to_owned(),
            counter: Counter::Bpe(r.with_context(|| format!("building the {name} tokenizer"))?),
        })
    };
    match which {
        Which::O200k => bpe("o200k_base", tiktoken_rs::o200k_base()),
        Which::Cl100k => bpe("cl100k_base", tiktoken_rs::cl100k_base()),
        Which::Gguf => {
            let path = crate::store::resolve(gguf)?;
            let (_g, tok, template) = crate::load_tokenizer(&path)?;
            let label = path
                .file_stem()
                .map_or_else(|| "gguf".to_owned(), |s| s.to_string_lossy().into_owned());
            Ok(Loaded {
                which,
                label,
                counter: Counter::Gguf {
                    tok: Box::new(tok),
                    template: Box::new(template),
                },
            })
        }
    }
}

impl Loaded {
    fn count(&self, text: &str) -> Result<usize> {
        Ok(match &self.counter {
            Counter::Bpe(b) => b.encode_ordinary(text).len(),
            Counter::Gguf { tok, .. } => tok.encode(text, false)?.len(),
        })
    }

    /// Tokens of the whole prompt of `r`, whose parts count `parts`.
    fn total(&self, r: &Request, parts: &[usize]) -> Result<usize> {
        match &self.counter {
            Counter::Bpe(_) => {
                let mut framing = 3; // every reply is primed with <|start|>assistant<|message|>
                for t in &r.turns {
                    framing += 3 + self.count(&t.role)?;
                    if let Some(n) = &t.name {
                        framing += 1 + self.count(n)?;
                    }
                }
                Ok(parts.iter().sum::<usize>() + framing)
            }
            Counter::Gguf { tok, template } => {
                let turns: Vec<Value> = r
                    .turns
                    .iter()
                    .map(|t| json!({"role": t.role, "content": t.content}))
                    .collect();
                let chat = template.render(tok, &Value::Array(turns), true, None)?;
                let tools: usize = r
                    .parts
                    .iter()
                    .zip(parts)
                    .filter(|(p, _)| p.kind == Kind::Tool)
                    .map(|(_, n)| n)
                    .sum();
                Ok(tok.encode_chat(&chat)?.len() + tools)
            }
        }
    }

    fn counts(&self, r: &Request) -> Result<Counts> {
        let per_part = r
            .parts
            .iter()
            .map(|p| p.texts.iter().map(|t| self.count(t)).sum::<Result<usize>>())
            .collect::<Result<Vec<_>>>()?;
        let parts_tokens: usize = per_part.iter().sum();
        let prompt_tokens = self.total(r, &per_part)?;
        let static_prefix_tokens = r
            .parts
            .iter()
            .zip(&per_part)
            .filter(|(p, _)| matches!(p.kind, Kind::System | Kind::Tool))
            .map(|(_, n)| n)
            .sum::<usize>()
            .min(prompt_tokens);
        Ok(Counts {
            tokenizer: self.label.clone(),
            parts_tokens,
            framing_tokens: prompt_tokens as i64 - parts_tokens as i64,
            prompt_tokens,
            static_prefix_tokens,
            per_part,
        })
    }
}

// ---- the report ----

/// One tokenizer's counts for one request.
#[derive(Serialize)]
struct Counts {
    tokenizer: String,
    parts_tokens: usize,
    /// Role markers and template text: in the prompt but in no part.
    framing_tokens: i64,
    prompt_tokens: usize,
    /// System and tool parts.
    static_prefix_tokens: usize,
    #[serde(skip)]
    per_part: Vec<usize>,
}

/// One model's price for one request (or, in `total`, for all of them).
#[derive(Serialize, Clone)]
struct Priced {
    model: String,
    provider: String,
    tokenizer: String,
    exact: bool,
    prompt_tokens: u64,
    static_prefix_tokens: u64,
    output_tokens: u64,
    per_request_usd: f64,
    /// A request that reads the static prefix from the cache.
    per_request_cached_usd: f64,
    monthly_usd: f64,
    /// The first request of the month writes the cache, the others read it.
    monthly_cached_usd: f64,
    saving_pct: f64,
}

#[derive(Serialize)]
struct Audited {
    line: Option<usize>,
    parts: Vec<Value>,
    tokenizers: Vec<Counts>,
    models: Vec<Priced>,
}

#[derive(Serialize)]
struct Report {
    file: String,
    requests_per_month: u64,
    output_tokens: u64,
    requests: Vec<Audited>,
    /// Per model, summed over the file's requests.
    total: Vec<Priced>,
}

pub fn run(a: AuditArgs) -> Result<()> {
    let requests = read_requests(&a.file)?;
    let catalog = a.prices.load()?;
    let models = match a.models.as_slice() {
        [] => catalog.models().iter().collect(),
        ids => pick(&catalog, ids)?,
    };
    let mut needed: Vec<Which> = models.iter().map(|m| which(m).0).collect();
    needed.sort();
    needed.dedup();
    let loaded = needed
        .into_iter()
        .map(|w| load(w, a.gguf.as_deref()))
        .collect::<Result<Vec<_>>>()?;
    let audited = requests
        .iter()
        .map(|r| audit(r, &loaded, &models, &a))
        .collect::<Result<Vec<_>>>()?;
    let report = Report {
        file: a.file.display().to_string(),
        requests_per_month: a.requests,
        output_tokens: a.output_tokens,
        total: total(&audited),
        requests: audited,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, &requests);
    }
    Ok(())
}

fn audit(r: &Request, loaded: &[Loaded], models: &[&ModelPrice], a: &AuditArgs) -> Result<Audited> {
    let counts = loaded
        .iter()
        .map(|l| l.counts(r))
        .collect::<Result<Vec<_>>>()?;
    let parts = r
        .parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let tokens: Map<String, Value> = counts
                .iter()
                .map(|c| (c.tokenizer.clone(), json!(c.per_part[i])))
                .collect();
            json!({
                "kind": p.kind.name(),
                "label": p.label,
                "role": p.role,
                "chars": p.texts.iter().map(|t| t.chars().count()).sum::<usize>(),
                "tokens": tokens,
            })
        })
        .collect();
    let models = models
        .iter()
        .map(|m| {
            let (w, exact) = which(m);
            // `loaded` holds the tokenizer of every model in `models` (see `run`).
            let i = loaded.iter().position(|l| l.which == w).unwrap_or_default();
            price(m, &counts[i], exact, a)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Audited {
        line: r.line,
        parts,
        tokenizers: counts,
        models,
    })
}

fn price(m: &ModelPrice, c: &Counts, exact: bool, a: &AuditArgs) -> Result<Priced> {
    let w = Workload {
        input_tokens: c.prompt_tokens as u64,
        output_tokens: a.output_tokens,
        compression_ratio: 0.0,
        cache: PromptCache::Prefix(c.static_prefix_tokens as u64),
        requests: a.requests,
        // A month of requests: the first one writes the prefix into the cache.
        cold_first: true,
    };
    let e = m.estimate(&w)?;
    Ok(Priced {
        model: m.id.clone(),
        provider: m.provider.clone(),
        tokenizer: c.tokenizer.clone(),
        exact,
        prompt_tokens: w.input_tokens,
        static_prefix_tokens: e.cached_tokens,
        output_tokens: a.output_tokens,
        per_request_usd: e.baseline_per_request_usd,
        per_request_cached_usd: e.warm_request_usd,
        monthly_usd: e.baseline_monthly_usd,
        monthly_cached_usd: e.monthly_usd,
        saving_pct: e.saving_pct,
    })
}

/// Per model, the sums over all requests.
fn total(audited: &[Audited]) -> Vec<Priced> {
    let Some((first, rest)) = audited.split_first() else {
        return Vec::new();
    };
    let mut sum = first.models.clone();
    for a in rest {
        for (s, p) in sum.iter_mut().zip(&a.models) {
            s.prompt_tokens += p.prompt_tokens;
            s.static_prefix_tokens += p.static_prefix_tokens;
            s.output_tokens += p.output_tokens;
            s.per_request_usd += p.per_request_usd;
            s.per_request_cached_usd += p.per_request_cached_usd;
            s.monthly_usd += p.monthly_usd;
            s.monthly_cached_usd += p.monthly_cached_usd;
        }
    }
    for s in &mut sum {
        let saving = s.monthly_usd - s.monthly_cached_usd;
        s.saving_pct = if s.monthly_usd > 0.0 {
            saving / s.monthly_usd * 100.0
        } else {
            0.0
        };
    }
    sum
}

fn print_report(r: &Report, requests: &[Request]) {
    for (a, req) in r.requests.iter().zip(requests) {
        let n = req.parts.len();
        let parts = if n == 1 {
            "1 part".to_owned()
        } else {
            format!("{n} parts")
        };
        match a.line {
            Some(line) => println!("{} line {line}: {parts}", r.file),
            None => println!("{}: {parts}", r.file),
        }
        print_parts(a, req);
        println!();
        print_priced(&a.models);
        println!();
    }
    if r.requests.len() > 1 {
        println!("TOTAL of {} requests:", r.requests.len());
        print_priced(&r.total);
    }
    println!(
        "(US dollars; each request sent {} times a month, {} output tokens each; approx: the provider's tokenizer is not public, counted with o200k_base; CACHED: the static prefix, system + tools, read from the prompt cache)",
        r.requests_per_month, r.output_tokens
    );
}

fn print_parts(a: &Audited, req: &Request) {
    let mut headers = vec!["PART", "CHARS"];
    headers.extend(a.tokenizers.iter().map(|c| c.tokenizer.as_str()));
    let mut rows: Vec<Vec<String>> = req
        .parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let role = p
                .role
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            let chars: usize = p.texts.iter().map(|t| t.chars().count()).sum();
            let mut row = vec![
                format!("{} {}{role}", p.kind.name(), p.label),
                chars.to_string(),
            ];
            row.extend(a.tokenizers.iter().map(|c| c.per_part[i].to_string()));
            row
        })
        .collect();
    let summary = |name: &str, f: fn(&Counts) -> String| {
        let mut row = vec![name.to_owned(), String::new()];
        row.extend(a.tokenizers.iter().map(f));
        row
    };
    rows.push(summary("(framing)", |c| c.framing_tokens.to_string()));
    rows.push(summary("TOTAL", |c| c.prompt_tokens.to_string()));
    rows.push(summary("static prefix", |c| {
        c.static_prefix_tokens.to_string()
    }));
    let right: Vec<bool> = (0..headers.len()).map(|i| i > 0).collect();
    print_table(&headers, &right, &rows);
}

fn print_priced(models: &[Priced]) {
    let headers = [
        "MODEL",
        "TOKENIZER",
        "PROMPT",
        "STATIC",
        "PER_REQUEST",
        "CACHED",
        "PER_MONTH",
        "PER_MONTH_CACHED",
        "SAVING",
    ];
    let rows: Vec<Vec<String>> = models
        .iter()
        .map(|p| {
            let tokenizer = if p.exact {
                p.tokenizer.clone()
            } else {
                format!("{} (approx)", p.tokenizer)
            };
            vec![
                p.model.clone(),
                tokenizer,
                p.prompt_tokens.to_string(),
                p.static_prefix_tokens.to_string(),
                usd(p.per_request_usd),
                usd(p.per_request_cached_usd),
                usd(p.monthly_usd),
                usd(p.monthly_cached_usd),
                format!("{:.2}%", p.saving_pct),
            ]
        })
        .collect();
    let right = [false, false, true, true, true, true, true, true, true];
    print_table(&headers, &right, &rows);
}
