//! `ferrolm usage`: the usage ledger of a server's data dir, grouped by key, model and/or day,
//! as a table with a totals row, or JSON `{"groups": [...], "total": {...}}`.
//!
//! Days are UTC; `--since` and `--until` are whole days, both included.
//!
//! `--savings` reports, per group, what was spent, what each lever saved (prefix caching,
//! context compression, tier routing, lazy tool loading; recorded per request by the server at
//! its prices), the prompt tokens lazy tool loading saved, and what the same traffic — the
//! prompts as sent by the clients, before compression and with every tool definition, with the
//! same cached prefixes — would have cost on a hosted model from the price catalog
//! (`--compare`, default `gpt-4o`; its base price, without long-context tiers).

use anyhow::{bail, Result};
use clap::Args;
use ferrolm_accounting::{time, GroupBy, ModelPrice, PriceCatalog, UsageGroup, UsageQuery};
use serde::Serialize;

use crate::keys::{print_table, DataDirArg};

const DAY_MS: i64 = 86_400_000;

/// What `usage --json` prints.
#[derive(Serialize)]
struct Report<'a> {
    since: Option<&'a str>,
    until: Option<&'a str>,
    key: Option<&'a str>,
    groups: &'a [UsageGroup],
    total: &'a UsageGroup,
    /// With `--savings`: the same traffic's cost on the compared model, per group and in total.
    #[serde(skip_serializing_if = "Option::is_none")]
    compare: Option<Compare<'a>>,
}

#[derive(Serialize)]
struct Compare<'a> {
    model: &'a str,
    groups: Vec<f64>,
    total: f64,
}

#[derive(Args)]
pub struct UsageArgs {
    #[command(flatten)]
    dir: DataDirArg,
    /// Group by these, comma-separated, in order: key, model, day.
    #[arg(long, value_delimiter = ',', default_value = "key,model")]
    by: Vec<GroupBy>,
    /// First day to include, YYYY-MM-DD (UTC).
    #[arg(long, value_name = "YYYY-MM-DD")]
    since: Option<String>,
    /// Last day to include, YYYY-MM-DD (UTC).
    #[arg(long, value_name = "YYYY-MM-DD")]
    until: Option<String>,
    /// Only this key's requests (its name, or id from `ferrolm keys list`).
    #[arg(long, value_name = "NAME")]
    key: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Show what caching, compression, routing and lazy tool loading saved, and the cost on
    /// --compare.
    #[arg(long)]
    savings: bool,
    /// The hosted model (a price catalog id) to compare against with --savings.
    #[arg(long, default_value = "gpt-4o", requires = "savings")]
    compare: String,
    /// A price catalog (TOML) that overrides or extends the built-in one.
    #[arg(long)]
    prices: Option<std::path::PathBuf>,
}

/// The same traffic on a hosted model: the clients' prompts (compressed tokens and every tool
/// definition included), the same cached prefixes, the same completions.
fn on_hosted(p: &ModelPrice, g: &UsageGroup) -> f64 {
    let prompt = (g.prompt_tokens + g.compressed_tokens) as i64 + g.lazy_tool_tokens;
    let prompt = prompt.max(0) as u64;
    p.cost_usd(prompt, g.cached_tokens.min(prompt), g.completion_tokens)
}

pub fn run(a: UsageArgs) -> Result<()> {
    let since_ms = a.since.as_deref().map(time::day_start_ms).transpose()?;
    let until_ms = a
        .until
        .as_deref()
        .map(|d| time::day_start_ms(d).map(|ms| ms + DAY_MS))
        .transpose()?;
    if let (Some(s), Some(u), Some(sm), Some(um)) = (&a.since, &a.until, since_ms, until_ms) {
        if sm >= um {
            bail!("--since {s} is after --until {u}: the period is empty");
        }
    }
    let store = a.dir.open_existing()?;
    let key_id = match (&a.key, &store) {
        (Some(k), Some(s)) => Some(s.find_key(k)?.id),
        (Some(k), None) => bail!(
            "no key has the name or id `{k}`: there is no key store at {} yet",
            a.dir.shown()
        ),
        (None, _) => None,
    };
    let q = UsageQuery {
        group_by: a.by.clone(),
        key_id,
        since_ms,
        until_ms,
    };
    let (groups, total) = match &store {
        Some(s) => {
            let groups = s.usage(&q)?;
            let total = s.usage(&UsageQuery {
                group_by: Vec::new(),
                ..q
            })?;
            (groups, total.into_iter().next())
        }
        None => (Vec::new(), None),
    };
    let total = total.unwrap_or_default();
    let catalog;
    let compare = if a.savings {
        catalog = PriceCatalog::load(a.prices.as_deref())?;
        Some(catalog.lookup(&a.compare)?)
    } else {
        None
    };
    if a.json {
        let report = Report {
            since: a.since.as_deref(),
            until: a.until.as_deref(),
            key: a.key.as_deref(),
            groups: &groups,
            total: &total,
            compare: compare.map(|p| Compare {
                model: &p.id,
                groups: groups.iter().map(|g| on_hosted(p, g)).collect(),
                total: on_hosted(p, &total),
            }),
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if total.requests == 0 {
        eprintln!("no requests recorded in {} for this period", a.dir.shown());
    }
    let mut by = Vec::new();
    for g in &a.by {
        if !by.contains(g) {
            by.push(*g);
        }
    }
    let mut headers: Vec<&str> = by
        .iter()
        .map(|g| match g {
            GroupBy::Key => "KEY",
            GroupBy::Model => "MODEL",
            GroupBy::Day => "DAY",
        })
        .collect();
    let lead = headers.len();
    let on_compare = format!(
        "ON_{}_USD",
        compare.map_or("", |p| p.id.as_str()).to_uppercase()
    );
    if compare.is_some() {
        headers.extend([
            "REQUESTS",
            "COST_USD",
            "SAVED_CACHE",
            "SAVED_COMPRESSION",
            "SAVED_ROUTING",
            "SAVED_LAZY_TOOLS",
            "LAZY_TOOL_TOKENS",
            on_compare.as_str(),
        ]);
    } else {
        headers.extend([
            "REQUESTS",
            "PROMPT",
            "CACHED",
            "COMPLETION",
            "COST_USD",
            "AVG_LATENCY_MS",
            "AVG_TTFT_MS",
        ]);
    }
    let numbers = |g: &UsageGroup| match compare {
        Some(p) => vec![
            g.requests.to_string(),
            format!("{:.6}", g.cost_usd),
            format!("{:.6}", g.saved_by_cache_usd),
            format!("{:.6}", g.saved_by_compression_usd),
            format!("{:.6}", g.saved_by_routing_usd),
            format!("{:.6}", g.saved_by_lazy_tools_usd),
            g.lazy_tool_tokens.to_string(),
            format!("{:.6}", on_hosted(p, g)),
        ],
        None => vec![
            g.requests.to_string(),
            g.prompt_tokens.to_string(),
            g.cached_tokens.to_string(),
            g.completion_tokens.to_string(),
            format!("{:.6}", g.cost_usd),
            format!("{:.1}", g.avg_latency_ms),
            g.avg_ttft_ms
                .map_or_else(|| "-".to_owned(), |t| format!("{t:.1}")),
        ],
    };
    let mut rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            let mut r: Vec<String> = by
                .iter()
                .map(|c| {
                    match c {
                        GroupBy::Key => &g.key,
                        GroupBy::Model => &g.model,
                        GroupBy::Day => &g.day,
                    }
                    .clone()
                    .unwrap_or_default()
                })
                .collect();
            r.extend(numbers(g));
            r
        })
        .collect();
    let mut t: Vec<String> = (0..lead)
        .map(|i| {
            if i == 0 {
                "TOTAL".to_owned()
            } else {
                String::new()
            }
        })
        .collect();
    t.extend(numbers(&total));
    rows.push(t);
    let right: Vec<bool> = (0..headers.len()).map(|i| i >= lead).collect();
    print_table(&headers, &right, &rows);
    Ok(())
}
