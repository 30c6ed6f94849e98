//! `ferrolm cost estimate`: one kind of request, sent `--requests` times a month, priced per
//! model.
//!
//! Caching, one of two ways (not both):
//! - `--cached-tokens C`: a static prefix of C prompt tokens (system prompt, tools). The
//!   month's first request writes it at the full input price, every later request reads it at
//!   the cached price (the cache is assumed warm all month). So `--requests 2 --cached-tokens
//!   2500` is "the same request twice, the second one hitting the cache".
//! - `--cache-hit-ratio X`: this fraction of every request's prompt is read from the cache.
//!
//! `--compression-ratio Y` removes that fraction of the prompt before it is sent. The saving
//! is measured against the same requests sent whole and uncached.
//!
//! JSON: one object for one `--model`, else an array of them sorted by monthly cost.

use anyhow::Result;
use clap::Args;
use ferrolm_accounting::{Estimate, ModelPrice, PromptCache, Workload};
use serde::Serialize;

use super::{pick, print_table, requests, tokens, usd, PricesArg};

#[derive(Args)]
pub struct EstimateArgs {
    /// A catalog model id (repeatable), or `all` to compare every model in the catalog.
    #[arg(long = "model", short = 'm', value_name = "ID", required = true)]
    models: Vec<String>,
    /// Prompt tokens of one request, before compression.
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = tokens)]
    input_tokens: u64,
    /// Output (completion) tokens of one request.
    #[arg(long, value_name = "M", allow_negative_numbers = true, value_parser = tokens)]
    output_tokens: u64,
    /// A static prompt prefix of C tokens that every request reads from the provider's prompt
    /// cache at the cached price (a warm cache; see --cold-start).
    #[arg(long, value_name = "C", allow_negative_numbers = true, value_parser = tokens)]
    cached_tokens: Option<u64>,
    /// With --cached-tokens: the month's first request finds the cache cold and writes the
    /// prefix at the full price.
    #[arg(long, requires = "cached_tokens")]
    cold_start: bool,
    /// Requests per month.
    #[arg(long, value_name = "R", default_value_t = 1, allow_negative_numbers = true, value_parser = requests)]
    requests: u64,
    /// Fraction (0 to 1) of every request's prompt tokens read from the cache, e.g. cached ÷
    /// prompt tokens from `ferrolm usage`. An alternative to --cached-tokens.
    #[arg(
        long,
        value_name = "X",
        allow_negative_numbers = true,
        conflicts_with = "cached_tokens"
    )]
    cache_hit_ratio: Option<f64>,
    /// Fraction (0 to below 1) of the prompt tokens removed before sending.
    #[arg(
        long,
        value_name = "Y",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    compression_ratio: f64,
    #[command(flatten)]
    prices: PricesArg,
    /// Print JSON (an object for one model, an array sorted by monthly cost for several).
    #[arg(long)]
    json: bool,
}

/// One model's estimate, as `--json` prints it.
#[derive(Serialize)]
struct Row<'a> {
    model: &'a str,
    provider: &'a str,
    #[serde(flatten)]
    estimate: Estimate,
    compression_ratio: f64,
    cache_hit_ratio: Option<f64>,
}

pub fn run(a: EstimateArgs) -> Result<()> {
    let catalog = a.prices.load()?;
    let models = pick(&catalog, &a.models)?;
    let w = Workload {
        input_tokens: a.input_tokens,
        output_tokens: a.output_tokens,
        compression_ratio: a.compression_ratio,
        cache: match (a.cached_tokens, a.cache_hit_ratio) {
            (Some(n), _) => PromptCache::Prefix(n),
            (None, Some(r)) => PromptCache::HitRatio(r),
            (None, None) => PromptCache::Off,
        },
        requests: a.requests,
        cold_first: a.cold_start,
    };
    let mut rows = models
        .iter()
        .map(|m| row(m, &w, a.cache_hit_ratio))
        .collect::<Result<Vec<_>>>()?;
    rows.sort_by(|x, y| x.estimate.monthly_usd.total_cmp(&y.estimate.monthly_usd));
    let several = a.models.len() > 1 || a.models.iter().any(|m| m == "all");
    if a.json {
        let text = match rows.as_slice() {
            [one] if !several => serde_json::to_string_pretty(one)?,
            _ => serde_json::to_string_pretty(&rows)?,
        };
        println!("{text}");
    } else {
        print_rows(&w, &rows);
    }
    Ok(())
}

fn row<'a>(m: &'a ModelPrice, w: &Workload, cache_hit_ratio: Option<f64>) -> Result<Row<'a>> {
    Ok(Row {
        model: &m.id,
        provider: &m.provider,
        estimate: m.estimate(w)?,
        compression_ratio: w.compression_ratio,
        cache_hit_ratio,
    })
}

fn print_rows(w: &Workload, rows: &[Row]) {
    println!(
        "{} requests/month of {} prompt tokens ({} sent, {} read from the cache) + {} output tokens",
        w.requests,
        w.input_tokens,
        w.sent_tokens(),
        w.cached_tokens(),
        w.output_tokens
    );
    let headers = [
        "MODEL",
        "PROVIDER",
        "PER_REQUEST",
        "MONTHLY",
        "BASELINE_MONTHLY",
        "SAVING",
    ];
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let e = &r.estimate;
            vec![
                r.model.to_owned(),
                r.provider.to_owned(),
                usd(e.per_request_usd),
                usd(e.monthly_usd),
                usd(e.baseline_monthly_usd),
                format!("{:.2}%", e.saving_pct),
            ]
        })
        .collect();
    print_table(&headers, &[false, false, true, true, true, true], &table);
    println!("(US dollars; PER_REQUEST is the month's average; BASELINE: every prompt sent whole and uncached)");
}
