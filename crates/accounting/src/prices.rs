//! The price catalog: what a request would cost at each model's list price.
//!
//! Contract:
//! - The builtin catalog is `prices.toml` in this crate, compiled in. A user file in the same
//!   layout may replace entries (same `id`) and add new ones; `models()` keeps builtin order,
//!   then the user's new entries in file order.
//! - Both files are read in two steps: a serde struct shaped like the file (unknown keys are
//!   errors), then validation into [`ModelPrice`]. Every error names the file and the field.
//! - Prices are US dollars per 1M tokens. `cached_tokens` are a subset of `prompt_tokens`,
//!   charged at the cached rate (the full input rate when the model has none). A tier replaces
//!   all three rates for the whole request once the prompt is longer than its threshold.
//! - A `self_hosted` entry has no prices of its own: they are derived from the hardware's cost
//!   and measured speed, `$/hour ÷ (tokens/s × 3600) × 1e6`, and cached tokens cost nothing.
//! - Estimates are pure arithmetic on these prices: [`ModelPrice::estimate`] prices a
//!   [`Workload`] (one kind of request sent N times a month, optionally compressed and served
//!   partly from the prompt cache) against the same requests sent whole and uncached;
//!   [`SelfHosted`] says what a dedicated machine costs per request and per month
//!   ([`HOURS_PER_MONTH`] hours, busy or idle) and from which monthly volume it is cheaper than
//!   a hosted price per request.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::AccountingError;

/// The builtin catalog's file, as shipped.
pub const BUILTIN_PRICES: &str = include_str!("../prices.toml");
/// The catalog layout this loader reads.
pub const PRICE_FORMAT: u32 = 1;

// ---- the file, as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    /// Layout version; required in the builtin file, defaults to 1 in a user file.
    format: Option<u32>,
    /// Catalog revision (a date), informational.
    version: Option<String>,
    #[serde(default)]
    model: Vec<ModelEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelEntry {
    id: String,
    provider: String,
    input_per_mtok: Option<f64>,
    cached_input_per_mtok: Option<f64>,
    output_per_mtok: Option<f64>,
    context_window: Option<u64>,
    tokenizer: Option<String>,
    source: String,
    as_of: String,
    #[serde(default)]
    tiers: Vec<TierEntry>,
    self_hosted: Option<SelfHostedEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TierEntry {
    above_input_tokens: u64,
    input_per_mtok: f64,
    cached_input_per_mtok: Option<f64>,
    output_per_mtok: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SelfHostedEntry {
    hardware: String,
    hardware_usd_per_hour: f64,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
}

// ---- the validated catalog ----

/// Rates that replace the base rates for prompts longer than `above_input_tokens`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PriceTier {
    pub above_input_tokens: u64,
    pub input_per_mtok: f64,
    pub cached_input_per_mtok: Option<f64>,
    pub output_per_mtok: f64,
}

/// The hardware a self-hosted model's prices are derived from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SelfHosted {
    pub hardware_usd_per_hour: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub hardware: String,
}

impl SelfHosted {
    /// Dollars per 1M tokens of a machine costing `usd_per_hour` that computes `tokens_per_s`.
    pub fn per_mtok(usd_per_hour: f64, tokens_per_s: f64) -> f64 {
        usd_per_hour / (tokens_per_s * 3600.0) * 1e6
    }
}

/// One model's prices, validated. For self-hosted models the rates are the derived ones.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelPrice {
    pub id: String,
    pub provider: String,
    pub input_per_mtok: f64,
    pub cached_input_per_mtok: Option<f64>,
    pub output_per_mtok: f64,
    pub context_window: Option<u64>,
    pub tokenizer: Option<String>,
    pub source: String,
    /// `YYYY-MM-DD`: when the price was read from `source`.
    pub as_of: String,
    /// Ascending by `above_input_tokens`.
    pub tiers: Vec<PriceTier>,
    pub self_hosted: Option<SelfHosted>,
}

impl ModelPrice {
    /// The cost in dollars of one request. `cached_tokens` are part of `prompt_tokens` (a
    /// larger value is clamped to it); the tier is chosen by `prompt_tokens`.
    pub fn cost_usd(&self, prompt_tokens: u64, cached_tokens: u64, completion_tokens: u64) -> f64 {
        let (input, cached, output) = match self
            .tiers
            .iter()
            .rev()
            .find(|t| prompt_tokens > t.above_input_tokens)
        {
            Some(t) => (t.input_per_mtok, t.cached_input_per_mtok, t.output_per_mtok),
            None => (
                self.input_per_mtok,
                self.cached_input_per_mtok,
                self.output_per_mtok,
            ),
        };
        let cached_tokens = cached_tokens.min(prompt_tokens);
        let fresh = (prompt_tokens - cached_tokens) as f64;
        let cached_rate = cached.unwrap_or(input);
        (fresh * input + cached_tokens as f64 * cached_rate + completion_tokens as f64 * output)
            / 1e6
    }
}

// ---- estimates: a workload's monthly cost, and where a dedicated machine breaks even ----

/// Hours a dedicated machine is billed per month: 24 × 30.
pub const HOURS_PER_MONTH: f64 = 720.0;

/// How much of each prompt the provider's prompt cache serves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PromptCache {
    /// Nothing: every prompt token is billed at the input rate.
    Off,
    /// A static prefix of this many tokens (system prompt, tools) that every request reads at
    /// the cached rate: the cache is warm, as providers' own worked examples assume (requests
    /// come more often than the provider evicts, which is minutes). With
    /// [`Workload::cold_first`] the month's first request writes it at the full input rate
    /// instead. Cache-write surcharges are not modelled.
    Prefix(u64),
    /// This fraction of every request's prompt is read from the cache: an observed average,
    /// e.g. cached ÷ prompt tokens in `ferrolm usage`.
    HitRatio(f64),
}

/// One kind of request, sent `requests` times a month.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Workload {
    /// Prompt tokens of one request, before compression.
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Fraction of the prompt removed before sending (pruning, summarising), in [0, 1).
    pub compression_ratio: f64,
    pub cache: PromptCache,
    /// Requests per month, at least 1.
    pub requests: u64,
    /// With a [`PromptCache::Prefix`]: the first request finds the cache cold and pays full.
    pub cold_first: bool,
}

impl Workload {
    /// Prompt tokens actually sent: `input_tokens × (1 − compression_ratio)`, rounded.
    pub fn sent_tokens(&self) -> u64 {
        (self.input_tokens as f64 * (1.0 - self.compression_ratio)).round() as u64
    }

    /// Prompt tokens of a request read from the cache once it is warm.
    pub fn cached_tokens(&self) -> u64 {
        match self.cache {
            PromptCache::Off => 0,
            PromptCache::Prefix(n) => n,
            PromptCache::HitRatio(r) => (self.sent_tokens() as f64 * r).round() as u64,
        }
    }

    /// Ratios in range, at least one request, a cached prefix no longer than what is sent.
    pub fn check(&self) -> Result<(), AccountingError> {
        let bad = |m: String| Err(AccountingError::InvalidEstimate(m));
        if self.requests == 0 {
            return bad("0 requests per month: give at least 1".into());
        }
        let c = self.compression_ratio;
        if !(0.0..1.0).contains(&c) {
            return bad(format!("the compression ratio is {c}: it is the fraction of prompt tokens removed before sending, so it must be >= 0 and < 1"));
        }
        match self.cache {
            PromptCache::HitRatio(r) if !(0.0..=1.0).contains(&r) => bad(format!(
                "the cache hit ratio is {r}: it is the fraction of prompt tokens read from the cache, so it must be between 0 and 1"
            )),
            PromptCache::Prefix(n) if n > self.sent_tokens() => bad(format!(
                "the cached prefix is {n} tokens, more than the {} prompt tokens sent: the prefix is part of the prompt",
                self.sent_tokens()
            )),
            _ => Ok(()),
        }
    }
}

/// What a [`Workload`] costs at one model's prices, and what it would cost sent whole and
/// uncached (the baseline).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Estimate {
    pub requests: u64,
    /// Prompt tokens per request as given, before compression.
    pub input_tokens: u64,
    /// Prompt tokens per request as sent, after compression.
    pub sent_input_tokens: u64,
    /// Prompt tokens per request read from the cache once it is warm.
    pub cached_tokens: u64,
    pub output_tokens: u64,
    /// The month's first request: with a static prefix, its cache is still cold.
    pub first_request_usd: f64,
    /// Every later request.
    pub warm_request_usd: f64,
    /// The month's average: `monthly_usd ÷ requests`.
    pub per_request_usd: f64,
    pub monthly_usd: f64,
    pub baseline_per_request_usd: f64,
    pub baseline_monthly_usd: f64,
    /// `baseline_monthly_usd − monthly_usd`.
    pub saving_usd: f64,
    /// `saving_usd` as a percentage of `baseline_monthly_usd` (0 when that is 0).
    pub saving_pct: f64,
}

impl ModelPrice {
    /// The month's cost of `w` at this model's prices.
    pub fn estimate(&self, w: &Workload) -> Result<Estimate, AccountingError> {
        w.check()?;
        let (sent, cached, out) = (w.sent_tokens(), w.cached_tokens(), w.output_tokens);
        let warm = self.cost_usd(sent, cached, out);
        let first = match w.cache {
            PromptCache::Prefix(_) if w.cold_first => self.cost_usd(sent, 0, out),
            _ => warm,
        };
        let monthly = first + warm * (w.requests - 1) as f64;
        let baseline = self.cost_usd(w.input_tokens, 0, out);
        let baseline_monthly = baseline * w.requests as f64;
        let saving = baseline_monthly - monthly;
        Ok(Estimate {
            requests: w.requests,
            input_tokens: w.input_tokens,
            sent_input_tokens: sent,
            cached_tokens: cached,
            output_tokens: out,
            first_request_usd: first,
            warm_request_usd: warm,
            per_request_usd: monthly / w.requests as f64,
            monthly_usd: monthly,
            baseline_per_request_usd: baseline,
            baseline_monthly_usd: baseline_monthly,
            saving_usd: saving,
            saving_pct: if baseline_monthly > 0.0 {
                saving / baseline_monthly * 100.0
            } else {
                0.0
            },
        })
    }
}

impl SelfHosted {
    /// A machine, validated: a name, a price >= 0 and speeds > 0.
    pub fn new(
        hardware: &str,
        usd_per_hour: f64,
        prefill_tokens_per_s: f64,
        decode_tokens_per_s: f64,
    ) -> Result<SelfHosted, AccountingError> {
        for (field, v, zero_ok) in [
            ("hardware_usd_per_hour", usd_per_hour, true),
            ("prefill_tokens_per_s", prefill_tokens_per_s, false),
            ("decode_tokens_per_s", decode_tokens_per_s, false),
        ] {
            if !v.is_finite() || v < 0.0 || (v == 0.0 && !zero_ok) {
                let need = if zero_ok { ">= 0" } else { "> 0" };
                return Err(AccountingError::InvalidEstimate(format!(
                    "the machine's {field} is {v}: it must be a finite number {need}"
                )));
            }
        }
        Ok(SelfHosted {
            hardware_usd_per_hour: usd_per_hour,
            prefill_tokens_per_s,
            decode_tokens_per_s,
            hardware: hardware.to_owned(),
        })
    }

    /// Seconds of the whole machine one request takes: `input/prefill + output/decode`, one
    /// request at a time (batching several would raise the throughput; measure it with
    /// `ferrolm bench` and give that as the speed).
    pub fn seconds_per_request(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        input_tokens as f64 / self.prefill_tokens_per_s
            + output_tokens as f64 / self.decode_tokens_per_s
    }

    /// The marginal cost of one request: its seconds at the machine's hourly price.
    pub fn request_usd(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        self.seconds_per_request(input_tokens, output_tokens) * self.hardware_usd_per_hour / 3600.0
    }

    /// The machine's fixed cost for a month, busy or idle.
    pub fn monthly_usd(&self) -> f64 {
        self.hardware_usd_per_hour * HOURS_PER_MONTH
    }

    /// Whole requests it can serve in a month at 100% utilisation (saturates at `u64::MAX`
    /// for an empty request).
    pub fn capacity_per_month(&self, input_tokens: u64, output_tokens: u64) -> u64 {
        let secs = self.seconds_per_request(input_tokens, output_tokens);
        (HOURS_PER_MONTH * 3600.0 / secs).floor() as u64
    }

    /// The monthly volume from which this machine costs no more than paying
    /// `hosted_request_usd` per request: `⌈monthly_usd ÷ hosted_request_usd⌉`. `None` ("never")
    /// when the hosted price is below the machine's marginal cost per request, which is the
    /// same as that volume exceeding the machine's capacity (capacity × marginal cost =
    /// monthly cost).
    pub fn breakeven_requests(
        &self,
        hosted_request_usd: f64,
        input_tokens: u64,
        output_tokens: u64,
    ) -> Option<u64> {
        if hosted_request_usd <= 0.0
            || hosted_request_usd < self.request_usd(input_tokens, output_tokens)
        {
            return None;
        }
        let volume = ceil_whole(self.monthly_usd() / hosted_request_usd);
        (volume <= self.capacity_per_month(input_tokens, output_tokens) as f64)
            .then_some(volume as u64)
    }
}

/// `x` rounded up, except that a ratio of prices within 1e-9 of a whole number is that number:
/// float noise in `2592 / 0.03` must not add a request.
fn ceil_whole(x: f64) -> f64 {
    let r = x.round();
    if (x - r).abs() <= 1e-9 * x.abs().max(1.0) {
        r
    } else {
        x.ceil()
    }
}

/// Levenshtein distance between two strings, by chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1)
                .min(row[j] + 1)
                .min(diag + usize::from(ca != cb));
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Builtin prices, optionally merged with a user file.
#[derive(Clone, Debug)]
pub struct PriceCatalog {
    version: Option<String>,
    models: Vec<ModelPrice>,
    index: HashMap<String, usize>,
}

impl PriceCatalog {
    /// The catalog compiled into this crate.
    pub fn builtin() -> PriceCatalog {
        // The file is part of this crate and a unit test parses it, so failing here is a bug in
        // the crate, never a user error.
        match parse("builtin prices.toml", BUILTIN_PRICES, true) {
            Ok((version, models)) => {
                let mut c = PriceCatalog {
                    version,
                    models: Vec::new(),
                    index: HashMap::new(),
                };
                c.merge(models);
                c
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// The builtin catalog, merged with `user_file` if given: an entry with the id of a builtin
    /// one replaces it, others are added.
    pub fn load(user_file: Option<&Path>) -> Result<PriceCatalog, AccountingError> {
        let mut c = PriceCatalog::builtin();
        if let Some(path) = user_file {
            let name = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|e| AccountingError::PriceFile {
                file: name.clone(),
                message: format!("cannot read it: {e}"),
            })?;
            let (_, models) = parse(&name, &text, false)?;
            c.merge(models);
        }
        Ok(c)
    }

    /// Parse a catalog from text, without the builtin entries (for tests and tools).
    pub fn from_toml(file_name: &str, text: &str) -> Result<PriceCatalog, AccountingError> {
        let (version, models) = parse(file_name, text, false)?;
        let mut c = PriceCatalog {
            version,
            models: Vec::new(),
            index: HashMap::new(),
        };
        c.merge(models);
        Ok(c)
    }

    /// The builtin catalog's revision date (`version` in prices.toml).
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    pub fn get(&self, id: &str) -> Option<&ModelPrice> {
        self.index.get(id).map(|&i| &self.models[i])
    }

    pub fn models(&self) -> &[ModelPrice] {
        &self.models
    }

    /// The model `id`, or an error naming the three ids closest to it (by edit distance,
    /// ignoring case; ties in catalog order).
    pub fn lookup(&self, id: &str) -> Result<&ModelPrice, AccountingError> {
        if let Some(m) = self.get(id) {
            return Ok(m);
        }
        let want = id.to_lowercase();
        let mut ids: Vec<(usize, &str)> = self
            .models
            .iter()
            .map(|m| (edit_distance(&want, &m.id.to_lowercase()), m.id.as_str()))
            .collect();
        ids.sort_by_key(|&(d, _)| d);
        let closest: Vec<String> = ids.iter().take(3).map(|(_, i)| format!("`{i}`")).collect();
        Err(AccountingError::UnknownModel {
            id: id.to_owned(),
            closest: if closest.is_empty() {
                "none (the catalog is empty)".to_owned()
            } else {
                closest.join(", ")
            },
        })
    }

    fn merge(&mut self, models: Vec<ModelPrice>) {
        for m in models {
            match self.index.get(&m.id) {
                Some(&i) => self.models[i] = m,
                None => {
                    self.index.insert(m.id.clone(), self.models.len());
                    self.models.push(m);
                }
            }
        }
    }
}

/// Read and validate one catalog file: `(version, models)`.
fn parse(
    file: &str,
    text: &str,
    builtin: bool,
) -> Result<(Option<String>, Vec<ModelPrice>), AccountingError> {
    let err = |message: String| AccountingError::PriceFile {
        file: file.to_owned(),
        message,
    };
    let raw: PriceFile = toml::from_str(text).map_err(|e| err(e.to_string()))?;
    match raw.format {
        Some(PRICE_FORMAT) => {}
        None if !builtin => {}
        None => return Err(err(format!("`format = {PRICE_FORMAT}` is missing"))),
        Some(f) => {
            return Err(err(format!(
                "format = {f}, but this ferrolm reads format {PRICE_FORMAT}: write the file in format {PRICE_FORMAT} or upgrade ferrolm"
            )))
        }
    }
    let mut seen = HashMap::new();
    let mut models = Vec::with_capacity(raw.model.len());
    for (i, entry) in raw.model.into_iter().enumerate() {
        let m = validate(entry, i).map_err(err)?;
        if let Some(first) = seen.insert(m.id.clone(), i) {
            return Err(err(format!(
                "model[{i}]: id `{}` is already used by model[{first}]; each id may appear once",
                m.id
            )));
        }
        models.push(m);
    }
    Ok((raw.version, models))
}

/// A price: finite and not negative.
fn price(at: &str, field: &str, v: f64) -> Result<f64, String> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!(
            "{at}.{field} is {v}: a price must be a finite number >= 0 (dollars per 1M tokens)"
        ))
    }
}

/// A rate of the hardware: finite and above zero.
fn positive(at: &str, field: &str, v: f64) -> Result<f64, String> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!(
            "{at}.{field} is {v}: it must be a finite number > 0"
        ))
    }
}

fn validate(e: ModelEntry, i: usize) -> Result<ModelPrice, String> {
    if e.id.trim().is_empty() {
        return Err(format!(
            "model[{i}].id is empty: give the model id clients send"
        ));
    }
    let at = format!("model[{i}] (`{}`)", e.id);
    for (field, v) in [
        ("provider", &e.provider),
        ("source", &e.source),
        ("as_of", &e.as_of),
    ] {
        if v.trim().is_empty() {
            return Err(format!("{at}.{field} is empty"));
        }
    }
    if crate::time::parse_day(&e.as_of).is_err() {
        return Err(format!(
            "{at}.as_of is `{}`: expected the date the price was read, as YYYY-MM-DD",
            e.as_of
        ));
    }
    if e.context_window == Some(0) {
        return Err(format!(
            "{at}.context_window is 0: give the model's context in tokens, or leave it out"
        ));
    }
    let (input, cached, output, self_hosted) = match e.self_hosted {
        Some(h) => {
            for (field, given) in [
                ("input_per_mtok", e.input_per_mtok.is_some()),
                ("cached_input_per_mtok", e.cached_input_per_mtok.is_some()),
                ("output_per_mtok", e.output_per_mtok.is_some()),
                ("tiers", !e.tiers.is_empty()),
            ] {
                if given {
                    return Err(format!(
                        "{at}.{field} is given, but a self_hosted model's prices are derived from its hardware: remove {field}"
                    ));
                }
            }
            let sh = format!("{at}.self_hosted");
            if h.hardware.trim().is_empty() {
                return Err(format!(
                    "{sh}.hardware is empty: say what it runs on, e.g. \"2 vCPU cloud VM\""
                ));
            }
            let usd = price(&sh, "hardware_usd_per_hour", h.hardware_usd_per_hour)?;
            let prefill = positive(&sh, "prefill_tokens_per_s", h.prefill_tokens_per_s)?;
            let decode = positive(&sh, "decode_tokens_per_s", h.decode_tokens_per_s)?;
            (
                SelfHosted::per_mtok(usd, prefill),
                Some(0.0),
                SelfHosted::per_mtok(usd, decode),
                Some(SelfHosted {
                    hardware_usd_per_hour: usd,
                    prefill_tokens_per_s: prefill,
                    decode_tokens_per_s: decode,
                    hardware: h.hardware,
                }),
            )
        }
        None => {
            let need = |field: &str, v: Option<f64>| {
                v.ok_or_else(|| {
                    format!("{at}.{field} is missing: give the list price in dollars per 1M tokens (or a [model.self_hosted] table)")
                })
                .and_then(|v| price(&at, field, v))
            };
            let input = need("input_per_mtok", e.input_per_mtok)?;
            let output = need("output_per_mtok", e.output_per_mtok)?;
            let cached = e
                .cached_input_per_mtok
                .map(|v| price(&at, "cached_input_per_mtok", v))
                .transpose()?;
            (input, cached, output, None)
        }
    };
    let mut tiers = Vec::with_capacity(e.tiers.len());
    let mut last = None;
    for (j, t) in e.tiers.into_iter().enumerate() {
        let ta = format!("{at}.tiers[{j}]");
        if last.is_some_and(|l| t.above_input_tokens <= l) {
            return Err(format!(
                "{ta}.above_input_tokens is {}: tiers must be listed in increasing above_input_tokens",
                t.above_input_tokens
            ));
        }
        last = Some(t.above_input_tokens);
        if t.cached_input_per_mtok.is_some() != cached.is_some() {
            return Err(format!(
                "{ta}.cached_input_per_mtok: give it in every tier or in none, like the model's own cached_input_per_mtok"
            ));
        }
        tiers.push(PriceTier {
            above_input_tokens: t.above_input_tokens,
            input_per_mtok: price(&ta, "input_per_mtok", t.input_per_mtok)?,
            cached_input_per_mtok: t
                .cached_input_per_mtok
                .map(|v| price(&ta, "cached_input_per_mtok", v))
                .transpose()?,
            output_per_mtok: price(&ta, "output_per_mtok", t.output_per_mtok)?,
        });
    }
    Ok(ModelPrice {
        id: e.id,
        provider: e.provider,
        input_per_mtok: input,
        cached_input_per_mtok: cached,
        output_per_mtok: output,
        context_window: e.context_window,
        tokenizer: e.tokenizer,
        source: e.source,
        as_of: e.as_of,
        tiers,
        self_hosted,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    fn cat() -> PriceCatalog {
        PriceCatalog::builtin()
    }

    #[test]
    fn builtin_parses_and_carries_the_published_prices() {
        let c = cat();
        assert_eq!(c.version(), Some("2025-11-28"));
        // (id, input, cached, output) per 1M tokens, late-2025 list prices.
        let want: &[(&str, f64, Option<f64>, f64)] = &[
            ("gpt-5", 1.25, Some(0.125), 10.0),
            ("gpt-5-mini", 0.25, Some(0.025), 2.0),
            ("gpt-4o", 2.50, Some(1.25), 10.0),
            ("gpt-4o-mini", 0.15, Some(0.075), 0.60),
            ("claude-sonnet-4.5", 3.0, Some(0.30), 15.0),
            ("claude-haiku-4.5", 1.0, Some(0.10), 5.0),
            ("gemini-2.5-pro", 1.25, Some(0.125), 10.0),
            ("gemini-2.5-flash", 0.30, Some(0.03), 2.50),
            ("gemini-2.5-flash-lite", 0.10, Some(0.01), 0.40),
            ("gemini-3-pro-preview", 2.0, Some(0.20), 12.0),
            ("llama-3.1-70b-instruct", 0.40, None, 0.40),
        ];
        for &(id, i, ci, o) in want {
            let m = c.get(id).unwrap_or_else(|| panic!("{id} missing"));
            assert_eq!(
                (m.input_per_mtok, m.cached_input_per_mtok, m.output_per_mtok),
                (i, ci, o),
                "{id}"
            );
            assert!(m.source.starts_with("https://"), "{id}");
        }
        assert_eq!(c.models().len(), want.len() + 1);
        for id in ["gpt-5", "gpt-5-mini", "gpt-4o", "gpt-4o-mini"] {
            assert_eq!(c.get(id).unwrap().tokenizer.as_deref(), Some("o200k_base"));
        }
        let tier = |id: &str| {
            let t = &c.get(id).unwrap().tiers;
            assert_eq!(t.len(), 1, "{id}");
            (
                t[0].above_input_tokens,
                t[0].input_per_mtok,
                t[0].cached_input_per_mtok,
                t[0].output_per_mtok,
            )
        };
        assert_eq!(tier("claude-sonnet-4.5"), (200_000, 6.0, Some(0.60), 22.50));
        assert_eq!(tier("gemini-2.5-pro"), (200_000, 2.50, Some(0.25), 15.0));
        assert_eq!(
            tier("gemini-3-pro-preview"),
            (200_000, 4.0, Some(0.40), 18.0)
        );
        assert!(c.get("no-such-model").is_none());
    }

    #[test]
    fn gpt4o_request_costs() {
        let m = cat().get("gpt-4o").cloned().unwrap();
        // 10,550 × 2.50/1M + 500 × 10/1M = 0.026375 + 0.005.
        close(m.cost_usd(10_550, 0, 500), 0.031375);
        // 3,050 × 2.50/1M + 500 × 10/1M = 0.007625 + 0.005.
        close(m.cost_usd(3_050, 0, 500), 0.012625);
        close(m.cost_usd(0, 0, 0), 0.0);
    }

    #[test]
    fn cached_prefix_at_a_90_percent_discount() {
        let m = cat().get("claude-sonnet-4.5").cloned().unwrap();
        // 3,050 prompt tokens of which 2,500 are a cached prefix, 500 out:
        // 550 × 3 + 2,500 × 0.30 + 500 × 15 = 1,650 + 750 + 7,500 → $0.0099.
        close(m.cost_usd(3_050, 2_500, 500), 0.0099);
        // Without the cache the same request is 9,150 + 7,500 → $0.01665.
        close(m.cost_usd(3_050, 0, 500), 0.01665);
        // The 2,500 cached tokens cost 10% of full price: 0.00075 instead of 0.0075.
        close(
            m.cost_usd(3_050, 0, 500) - m.cost_usd(3_050, 2_500, 500),
            0.9 * 2_500.0 * 3.0 / 1e6,
        );
        // More "cached" than prompt tokens is clamped: the whole prompt at the cached rate.
        close(m.cost_usd(1_000, 5_000, 0), 1_000.0 * 0.30 / 1e6);
        // A model without a cached rate charges cached tokens at the full input rate.
        let l = cat().get("llama-3.1-70b-instruct").cloned().unwrap();
        close(l.cost_usd(3_050, 2_500, 500), l.cost_usd(3_050, 0, 500));
    }

    #[test]
    fn tier_switches_above_200k_prompt_tokens() {
        let c = cat();
        let s = c.get("claude-sonnet-4.5").unwrap();
        // Exactly 200K is still the base tier; one more token moves the whole request.
        close(s.cost_usd(200_000, 0, 1_000), 0.6 + 0.015);
        close(
            s.cost_usd(200_001, 0, 1_000),
            200_001.0 * 6.0 / 1e6 + 0.0225,
        );
        close(
            s.cost_usd(300_000, 100_000, 0),
            (200_000.0 * 6.0 + 100_000.0 * 0.60) / 1e6,
        );
        let g = c.get("gemini-2.5-pro").unwrap();
        close(g.cost_usd(150_000, 0, 10_000), 0.1875 + 0.1);
        close(g.cost_usd(250_000, 0, 10_000), 0.625 + 0.15);
    }

    #[test]
    fn self_hosted_prices_come_from_the_hardware() {
        let c = cat();
        let m = c.get("smollm2-135m-instruct").unwrap();
        let h = m.self_hosted.as_ref().unwrap();
        assert_eq!(h.hardware, "2 vCPU cloud VM");
        assert_eq!(
            (
                h.hardware_usd_per_hour,
                h.prefill_tokens_per_s,
                h.decode_tokens_per_s
            ),
            (0.10, 570.0, 180.0)
        );
        // $0.10/h ÷ (570 tok/s × 3600 s/h) × 1e6 = $0.048733…/1M prompt tokens;
        // ÷ (180 × 3600) × 1e6 = $0.154320…/1M completion tokens.
        close(m.input_per_mtok, 0.1 / 2_052_000.0 * 1e6);
        close(m.output_per_mtok, 0.1 / 648_000.0 * 1e6);
        assert!((m.input_per_mtok - 0.048733).abs() < 1e-6);
        assert!((m.output_per_mtok - 0.154321).abs() < 1e-6);
        assert_eq!(m.cached_input_per_mtok, Some(0.0));
        // One hour of decode (180 × 3600 tokens) costs exactly the hour of hardware.
        close(m.cost_usd(0, 0, 180 * 3600), 0.10);
        // Cached prompt tokens cost nothing to compute.
        close(m.cost_usd(1_000, 1_000, 0), 0.0);
    }

    fn workload(input: u64, output: u64, cache: PromptCache, requests: u64) -> Workload {
        Workload {
            input_tokens: input,
            output_tokens: output,
            compression_ratio: 0.0,
            cache,
            requests,
            cold_first: false,
        }
    }

    #[test]
    fn estimate_of_the_worked_gpt4o_examples() {
        let m = cat().get("gpt-4o").cloned().unwrap();
        let e = m
            .estimate(&workload(10_550, 500, PromptCache::Off, 100_000))
            .unwrap();
        close(e.per_request_usd, 0.031375);
        assert!((e.monthly_usd - 3_137.50).abs() < 1e-6, "{}", e.monthly_usd);
        close(e.saving_usd, 0.0);
        let e = m
            .estimate(&workload(3_050, 500, PromptCache::Off, 1))
            .unwrap();
        close(e.per_request_usd, 0.012625);
        close(e.monthly_usd, 0.012625);
    }

    #[test]
    fn a_cached_prefix_is_read_by_every_request_or_written_first_when_cold() {
        // $2.50 input, $0.25 cached (90% off), $10 output per 1M.
        let c = PriceCatalog::from_toml(
            "t",
            &OK_ENTRY
                .replace(
                    "input_per_mtok = 1.0",
                    "input_per_mtok = 2.5\ncached_input_per_mtok = 0.25",
                )
                .replace("output_per_mtok = 2.0", "output_per_mtok = 10.0"),
        )
        .unwrap();
        let m = c.get("x").unwrap();
        // A warm cache (the default): both requests read the prefix, $0.007 each: $0.014
        // against $0.02525 uncached, 44.55% saved (the seed's "saves 44% over two requests").
        let warm = m
            .estimate(&workload(3_050, 500, PromptCache::Prefix(2_500), 2))
            .unwrap();
        close(warm.monthly_usd, 0.014);
        assert!(
            (warm.saving_pct - 44.554).abs() < 0.001,
            "{}",
            warm.saving_pct
        );
        let mut w = workload(3_050, 500, PromptCache::Prefix(2_500), 2);
        w.cold_first = true;
        let e = m.estimate(&w).unwrap();
        // First: 3,050 × 2.50 + 500 × 10 = $0.012625. Second: 550 × 2.50 + 2,500 × 0.25 +
        // 500 × 10 = $0.007. Uncached, both cost $0.012625: $0.02525 against $0.019625.
        close(e.first_request_usd, 0.012625);
        close(e.warm_request_usd, 0.007);
        close(e.monthly_usd, 0.019625);
        close(e.per_request_usd, 0.0098125);
        close(e.baseline_monthly_usd, 0.02525);
        close(e.saving_usd, 0.005625);
        close(e.saving_pct, 0.005625 / 0.02525 * 100.0);
        assert!((e.saving_pct - 22.28).abs() < 0.005, "{}", e.saving_pct);
        // One request alone, cold, never reads the cache.
        let mut w = workload(3_050, 500, PromptCache::Prefix(2_500), 1);
        w.cold_first = true;
        close(m.estimate(&w).unwrap().saving_usd, 0.0);
    }

    #[test]
    fn compression_and_hit_ratio_apply_to_every_request() {
        let m = cat().get("gpt-4o").cloned().unwrap();
        let mut w = workload(10_000, 500, PromptCache::HitRatio(0.5), 10);
        w.compression_ratio = 0.2;
        let e = m.estimate(&w).unwrap();
        // 8,000 sent, 4,000 of them cached: 4,000 × 2.50 + 4,000 × 1.25 + 500 × 10 = $0.02.
        assert_eq!((e.sent_input_tokens, e.cached_tokens), (8_000, 4_000));
        close(e.first_request_usd, 0.02);
        close(e.warm_request_usd, 0.02);
        close(e.monthly_usd, 0.2);
        // Baseline: 10,000 × 2.50 + 500 × 10 = $0.03 a request.
        close(e.baseline_monthly_usd, 0.3);
        assert!((e.saving_pct - 100.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn workload_errors_say_what_is_allowed() {
        let m = cat().get("gpt-4o").cloned().unwrap();
        let err = |w: Workload| m.estimate(&w).unwrap_err().to_string();
        let mut w = workload(100, 10, PromptCache::Off, 1);
        w.compression_ratio = 1.0;
        assert!(err(w).contains("compression ratio is 1: "), "{}", err(w));
        w.compression_ratio = f64::NAN;
        assert!(err(w).contains("compression ratio is NaN"), "{}", err(w));
        w.compression_ratio = 0.5;
        w.cache = PromptCache::Prefix(51);
        assert!(
            err(w).contains("cached prefix is 51 tokens, more than the 50 prompt tokens sent"),
            "{}",
            err(w)
        );
        w.cache = PromptCache::HitRatio(-0.1);
        assert!(err(w).contains("cache hit ratio is -0.1"), "{}", err(w));
        let w = workload(100, 10, PromptCache::Off, 0);
        assert!(err(w).contains("0 requests per month"), "{}", err(w));
    }

    #[test]
    fn breakeven_of_a_dedicated_machine() {
        // $3.60/h = $0.001/s; 10,000 prompt tokens at 10,000 tok/s (1 s) + 500 at 100 tok/s
        // (5 s): 6 s and $0.006 a request; $2,592 a month; 2,592,000 s / 6 = 432,000 requests.
        let h = SelfHosted::new("box", 3.6, 10_000.0, 100.0).unwrap();
        close(h.seconds_per_request(10_000, 500), 6.0);
        close(h.request_usd(10_000, 500), 0.006);
        close(h.monthly_usd(), 2_592.0);
        assert_eq!(h.capacity_per_month(10_000, 500), 432_000);
        // gpt-4o: 10,000 × 2.50 + 500 × 10 = $0.03 a request: 2,592 / 0.03 = 86,400.
        let hosted = cat().get("gpt-4o").unwrap().cost_usd(10_000, 0, 500);
        assert_eq!(h.breakeven_requests(hosted, 10_000, 500), Some(86_400));
        // $0.0061 a request: 424,919 requests (⌈424,918.03⌉), under the capacity.
        assert_eq!(h.breakeven_requests(0.0061, 10_000, 500), Some(424_919));
        // At or below the machine's own cost per request it never pays off.
        assert_eq!(h.breakeven_requests(0.0059, 10_000, 500), None);
        assert_eq!(h.breakeven_requests(0.0, 10_000, 500), None);
        let e = SelfHosted::new("box", 1.0, 0.0, 1.0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("prefill_tokens_per_s is 0: it must be a finite number > 0"),
            "{e}"
        );
        let e = SelfHosted::new("box", -1.0, 1.0, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hardware_usd_per_hour is -1"), "{e}");
    }

    #[test]
    fn unknown_model_names_the_closest_ids() {
        let c = cat();
        assert_eq!(c.lookup("gpt-4o").unwrap().id, "gpt-4o");
        let e = c.lookup("GPT4o").unwrap_err().to_string();
        assert!(
            e.contains("no model `GPT4o`") && e.contains("closest ids are `gpt-4o`, `gpt-5`"),
            "{e}"
        );
        let e = c.lookup("claude-sonet").unwrap_err().to_string();
        assert!(e.contains("closest ids are `claude-sonnet-4.5`"), "{e}");
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
        let p = dir.path().join("my-prices.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn user_file_replaces_and_extends() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            r#"
[[model]]
id = "gpt-4o"
provider = "openai"
input_per_mtok = 2.00
output_per_mtok = 8.00
source = "negotiated contract"
as_of = "2025-12-01"

[[model]]
id = "my-model"
provider = "self-hosted"
source = "our GPU box"
as_of = "2025-12-01"
[model.self_hosted]
hardware = "1x H100"
hardware_usd_per_hour = 2.5
prefill_tokens_per_s = 10000
decode_tokens_per_s = 1000
"#,
        );
        let c = PriceCatalog::load(Some(&p)).unwrap();
        let n = cat().models().len();
        assert_eq!(c.models().len(), n + 1);
        let g = c.get("gpt-4o").unwrap();
        assert_eq!((g.input_per_mtok, g.cached_input_per_mtok), (2.0, None));
        assert_eq!(
            c.models()[2].id,
            "gpt-4o",
            "a replaced entry keeps its place"
        );
        assert_eq!(c.models()[n].id, "my-model");
        close(
            c.get("my-model").unwrap().output_per_mtok,
            2.5 / 3.6e6 * 1e6,
        );
        // Untouched builtin entries are still there.
        assert_eq!(c.get("gpt-5").unwrap().input_per_mtok, 1.25);
        // No user file: the builtin catalog.
        assert_eq!(PriceCatalog::load(None).unwrap().models(), cat().models());
    }

    fn load_err(text: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, text);
        let e = PriceCatalog::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("my-prices.toml"), "names the file: {e}");
        e
    }

    const OK_ENTRY: &str = r#"
[[model]]
id = "x"
provider = "p"
input_per_mtok = 1.0
output_per_mtok = 2.0
source = "s"
as_of = "2025-12-01"
"#;

    #[test]
    fn user_file_errors_name_the_file_and_the_field() {
        let e = load_err(&format!("{OK_ENTRY}input_price = 3\n"));
        assert!(e.contains("unknown field `input_price`"), "{e}");
        let e = load_err(&format!("{OK_ENTRY}[model.self_hosted]\nhardware = \"h\"\nhardware_usd_per_hour = 1\nprefill_tokens_per_s = 1\ndecode_tokens_per_s = 1\ngpu = 2\n"));
        assert!(e.contains("unknown field `gpu`"), "{e}");
        let e = load_err("prices = 1\n");
        assert!(e.contains("unknown field `prices`"), "{e}");

        let e = load_err(&OK_ENTRY.replace("input_per_mtok = 1.0", "input_per_mtok = -1.0"));
        assert!(e.contains("model[0] (`x`).input_per_mtok is -1"), "{e}");
        let e = load_err(&OK_ENTRY.replace("output_per_mtok = 2.0", "output_per_mtok = nan"));
        assert!(e.contains("output_per_mtok is NaN"), "{e}");
        let e = load_err(&OK_ENTRY.replace("output_per_mtok = 2.0\n", ""));
        assert!(e.contains("output_per_mtok is missing"), "{e}");
        let e = load_err(&OK_ENTRY.replace("2025-12-01", "Dec 2025"));
        assert!(e.contains("as_of is `Dec 2025`"), "{e}");
        let e = load_err(&format!("{OK_ENTRY}{OK_ENTRY}"));
        assert!(e.contains("id `x` is already used by model[0]"), "{e}");
        let e = load_err(&format!("format = 2\n{OK_ENTRY}"));
        assert!(e.contains("format = 2"), "{e}");
        let e = load_err(&format!(
            "{OK_ENTRY}[[model.tiers]]\nabove_input_tokens = 100\ninput_per_mtok = 1\noutput_per_mtok = -2\n"
        ));
        assert!(e.contains("tiers[0].output_per_mtok is -2"), "{e}");
        let e = load_err(&format!(
            "{OK_ENTRY}[[model.tiers]]\nabove_input_tokens = 100\ninput_per_mtok = 1\noutput_per_mtok = 2\n[[model.tiers]]\nabove_input_tokens = 100\ninput_per_mtok = 1\noutput_per_mtok = 2\n"
        ));
        assert!(e.contains("tiers[1].above_input_tokens is 100"), "{e}");
        let e = load_err(&format!(
            "{OK_ENTRY}[model.self_hosted]\nhardware = \"h\"\nhardware_usd_per_hour = 1\nprefill_tokens_per_s = 0\ndecode_tokens_per_s = 1\n"
        ));
        assert!(e.contains("input_per_mtok is given"), "{e}");
        let e = load_err(
            "[[model]]\nid = \"y\"\nprovider = \"p\"\nsource = \"s\"\nas_of = \"2025-12-01\"\n[model.self_hosted]\nhardware = \"h\"\nhardware_usd_per_hour = 1\nprefill_tokens_per_s = 0\ndecode_tokens_per_s = 1\n",
        );
        assert!(
            e.contains("self_hosted.prefill_tokens_per_s is 0: it must be a finite number > 0"),
            "{e}"
        );
        let e = load_err("[[model]]\nid = \"y\"\n");
        assert!(e.contains("missing field"), "{e}");

        let missing = PriceCatalog::load(Some(Path::new("/nonexistent/prices.toml")))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("/nonexistent/prices.toml: cannot read it"),
            "{missing}"
        );
    }
}
