//! `ferrolm cost`: what requests cost at list prices, and when self-hosting pays off.
//!
//! - `prices`: the price catalog as a table (or JSON); self-hosted entries show the prices
//!   derived from their hardware.
//! - `estimate`: one kind of request, sent N times a month, per model (see `estimate.rs`).
//! - `breakeven`: a dedicated machine against hosted per-request prices (see `breakeven.rs`).
//! - `audit`: the tokens of each part of a real chat request file, priced (see `audit.rs`).
//! - `distill`: a teacher against its distilled student, and the break-even (see `distill.rs`).
//!
//! Every command reads the builtin catalog merged with `--prices FILE` and prints a table, or
//! JSON with `--json`. The arithmetic lives in `ferrolm-accounting` (`ModelPrice::estimate`,
//! `SelfHosted`); this module parses arguments, picks models, counts tokens and prints.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use ferrolm_accounting::{ModelPrice, PriceCatalog};
use serde::Serialize;

use crate::keys::print_table;

mod audit;
mod breakeven;
pub mod chart;
mod distill;
mod estimate;

#[derive(Args)]
pub struct CostArgs {
    #[command(subcommand)]
    cmd: CostCmd,
}

#[derive(Subcommand)]
enum CostCmd {
    /// List the price catalog: $ per 1M tokens, context, tokenizer, where and when each price
    /// was read; self-hosted entries with the prices derived from their hardware.
    Prices(PricesArgs),
    /// The cost of one request and of a month of them per model, with prompt caching and
    /// prompt compression, against the same requests sent whole and uncached.
    Estimate(estimate::EstimateArgs),
    /// From which monthly volume a dedicated machine is cheaper than a hosted API.
    Breakeven(breakeven::BreakevenArgs),
    /// Count the tokens of each part of a chat request file (system, tools, history, new
    /// message) with each model's tokenizer, and price it with and without prompt caching.
    Audit(audit::AuditArgs),
    /// What replacing a teacher model with a distilled student saves a month, and when the
    /// one-time cost of distilling is paid back.
    Distill(distill::DistillCostArgs),
}

pub fn run(a: CostArgs) -> Result<()> {
    match a.cmd {
        CostCmd::Prices(p) => prices(p),
        CostCmd::Estimate(e) => estimate::run(e),
        CostCmd::Breakeven(b) => breakeven::run(b),
        CostCmd::Audit(a) => audit::run(a),
        CostCmd::Distill(d) => distill::run(d),
    }
}

/// `--prices FILE`, shared by every cost command.
#[derive(Args)]
struct PricesArg {
    /// A price file in the layout of the builtin prices.toml: its entries replace builtin ones
    /// with the same id and add new ones.
    #[arg(long, value_name = "FILE")]
    prices: Option<PathBuf>,
}

impl PricesArg {
    fn load(&self) -> Result<PriceCatalog> {
        Ok(PriceCatalog::load(self.prices.as_deref())?)
    }
}

/// The catalog entries named by `ids`; `all` (alone or among others) means every entry.
fn pick<'a>(catalog: &'a PriceCatalog, ids: &[String]) -> Result<Vec<&'a ModelPrice>> {
    if ids.iter().any(|i| i == "all") {
        return Ok(catalog.models().iter().collect());
    }
    let mut picked: Vec<&ModelPrice> = Vec::new();
    for id in ids {
        let m = catalog.lookup(id)?;
        if !picked.iter().any(|p| p.id == m.id) {
            picked.push(m);
        }
    }
    Ok(picked)
}

/// A token count on the command line: a whole number >= 0.
fn tokens(s: &str) -> Result<u64, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a token count: give a whole number >= 0, e.g. 1500"))
}

/// Requests per month on the command line: a whole number >= 1.
fn requests(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "`{s}` is not a number of requests: give a whole number >= 1, e.g. 100000"
        )),
    }
}

/// Dollars for tables: 4 decimals from $1 up, else 8 (or 4 significant digits for smaller
/// amounts), trailing zeros dropped but 2 decimals kept (2.5 → "2.50", 0.031375 → "0.031375").
fn usd(v: f64) -> String {
    let decimals = if v.abs() >= 1.0 {
        4
    } else if v > 0.0 {
        (3 - v.log10().floor() as i64).clamp(8, 12) as usize
    } else {
        8
    };
    let s = format!("{v:.decimals$}");
    let s = s.trim_end_matches('0');
    match s.split_once('.') {
        Some((_, frac)) if frac.len() < 2 => format!("{s}{}", "0".repeat(2 - frac.len())),
        _ => s.to_owned(),
    }
}

#[derive(Args)]
struct PricesArgs {
    #[command(flatten)]
    prices: PricesArg,
    /// Print JSON: {"version", "models": [...]}, prices per 1M tokens.
    #[arg(long)]
    json: bool,
}

/// What `cost prices --json` prints.
#[derive(Serialize)]
struct Catalog<'a> {
    version: Option<&'a str>,
    models: &'a [ModelPrice],
}

fn prices(a: PricesArgs) -> Result<()> {
    let c = a.prices.load()?;
    if a.json {
        let out = Catalog {
            version: c.version(),
            models: c.models(),
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let headers = [
        "ID",
        "PROVIDER",
        "INPUT/1M",
        "CACHED/1M",
        "OUTPUT/1M",
        "CONTEXT",
        "TOKENIZER",
        "AS_OF",
        "SOURCE",
    ];
    let rows: Vec<Vec<String>> = c.models().iter().map(price_row).collect();
    let right = [false, false, true, true, true, true, false, false, false];
    print_table(&headers, &right, &rows);
    for m in c.models() {
        for line in price_notes(m) {
            println!("{line}");
        }
    }
    Ok(())
}

fn price_row(m: &ModelPrice) -> Vec<String> {
    let or_dash = |s: Option<String>| s.unwrap_or_else(|| "-".to_owned());
    vec![
        m.id.clone(),
        m.provider.clone(),
        usd(m.input_per_mtok),
        or_dash(m.cached_input_per_mtok.map(usd)),
        usd(m.output_per_mtok),
        or_dash(m.context_window.map(|c| c.to_string())),
        or_dash(m.tokenizer.clone()),
        m.as_of.clone(),
        m.source.clone(),
    ]
}

/// Lines under the table: the hardware of self-hosted entries, long-context tiers.
fn price_notes(m: &ModelPrice) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(h) = &m.self_hosted {
        notes.push(format!(
            "{}: self-hosted on {} at ${}/hour, {} prompt / {} output tokens/s (prices derived: $/hour ÷ (tokens/s × 3600) × 1M)",
            m.id,
            h.hardware,
            usd(h.hardware_usd_per_hour),
            h.prefill_tokens_per_s,
            h.decode_tokens_per_s
        ));
    }
    for t in &m.tiers {
        notes.push(format!(
            "{}: prompts over {} tokens cost {} / {} / {} per 1M (input / cached / output)",
            m.id,
            t.above_input_tokens,
            usd(t.input_per_mtok),
            t.cached_input_per_mtok.map_or_else(|| "-".to_owned(), usd),
            usd(t.output_per_mtok)
        ));
    }
    notes
}

#[cfg(test)]
mod tests {
    #[test]
    fn usd_keeps_cents_and_drops_noise() {
        assert_eq!(super::usd(2.5), "2.50");
        assert_eq!(super::usd(0.031375), "0.031375");
        assert_eq!(super::usd(3137.5), "3137.50");
        assert_eq!(super::usd(0.0), "0.00");
        assert_eq!(super::usd(10.0), "10.00");
        assert_eq!(super::usd(0.1 / 2_052_000.0 * 1e6), "0.04873294");
        assert_eq!(super::usd(0.000_004_337_23), "0.000004337");
        assert_eq!(super::usd(214.500_047_5), "214.50");
        assert_eq!(super::usd(1.234_567), "1.2346");
    }
}
