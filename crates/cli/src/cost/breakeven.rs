//! `ferrolm cost breakeven`: a dedicated machine against hosted per-request prices.
//!
//! The machine is rented 24 × 30 = 720 hours a month, busy or idle: a fixed `$/hour × 720`.
//! One request occupies it `input/prefill + output/decode` seconds (one request at a time; for
//! batched serving give the measured aggregate speed), which sets its marginal cost and its
//! capacity (requests a month at 100% utilisation). A hosted model at `p` dollars a request
//! costs `p × V` for V requests, so the machine is no dearer from `V = ⌈monthly ÷ p⌉` on —
//! "never" when that exceeds the capacity, which is the same as `p` being below the marginal
//! cost.

use anyhow::{bail, Context, Result};
use clap::Args;
use ferrolm_accounting::{ModelPrice, SelfHosted, HOURS_PER_MONTH};
use serde::Serialize;

use super::{chart, pick, print_table, tokens, usd, PricesArg};

#[derive(Args)]
pub struct BreakevenArgs {
    /// What the machine costs per hour, in US dollars.
    #[arg(long, value_name = "USD", allow_negative_numbers = true)]
    hardware_usd_per_hour: f64,
    /// The machine's speed for prompt and output tokens alike (or give the two below).
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    tokens_per_s: Option<f64>,
    /// Prompt tokens per second (prefill), e.g. from `ferrolm bench`.
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    prefill_tokens_per_s: Option<f64>,
    /// Output tokens per second (decode), e.g. from `ferrolm bench`.
    #[arg(long, value_name = "D", allow_negative_numbers = true)]
    decode_tokens_per_s: Option<f64>,
    /// What the machine is, for the output.
    #[arg(long, default_value = "dedicated machine")]
    hardware: String,
    /// Prompt tokens of one request.
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = tokens)]
    input_tokens: u64,
    /// Output tokens of one request.
    #[arg(long, value_name = "M", allow_negative_numbers = true, value_parser = tokens)]
    output_tokens: u64,
    /// Hosted models to compare (repeatable), or `all`. Default: every catalog model that is
    /// not self-hosted.
    #[arg(long = "model", short = 'm', value_name = "ID")]
    models: Vec<String>,
    #[command(flatten)]
    prices: PricesArg,
    /// Print JSON: {"machine", "input_tokens", "output_tokens", "self_hosted", "models"}.
    #[arg(long)]
    json: bool,
    /// Also draw monthly cost against monthly volume (the machine — one more machine per
    /// capacity's worth — and each hosted model) into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    chart: Option<std::path::PathBuf>,
}

/// What `--json` prints.
#[derive(Serialize)]
struct Report<'a> {
    machine: Machine<'a>,
    input_tokens: u64,
    output_tokens: u64,
    self_hosted: PerRequest,
    /// Sorted by hosted price per request, dearest first.
    models: Vec<Versus<'a>>,
}

#[derive(Serialize)]
struct Machine<'a> {
    #[serde(flatten)]
    spec: &'a SelfHosted,
    hours_per_month: f64,
    monthly_usd: f64,
}

#[derive(Serialize)]
struct PerRequest {
    seconds_per_request: f64,
    /// Marginal cost: the request's seconds at the hourly price.
    per_request_usd: f64,
    /// Requests a month at 100% utilisation.
    capacity_requests_per_month: u64,
}

#[derive(Serialize)]
struct Versus<'a> {
    model: &'a str,
    provider: &'a str,
    per_request_usd: f64,
    /// Requests a month from which the machine is no dearer; null when never.
    breakeven_requests_per_month: Option<u64>,
    never: bool,
}

pub fn run(a: BreakevenArgs) -> Result<()> {
    let (prefill, decode) = match (a.tokens_per_s, a.prefill_tokens_per_s, a.decode_tokens_per_s) {
        (Some(t), None, None) => (t, t),
        (None, Some(p), Some(d)) => (p, d),
        _ => bail!("give the machine's speed either as --tokens-per-s T, or as both --prefill-tokens-per-s P and --decode-tokens-per-s D (`ferrolm bench` measures them)"),
    };
    let machine = SelfHosted::new(&a.hardware, a.hardware_usd_per_hour, prefill, decode)?;
    let catalog = a.prices.load()?;
    let models: Vec<&ModelPrice> = match a.models.as_slice() {
        [] => catalog.models().iter().collect(),
        ids => pick(&catalog, ids)?,
    };
    let hosted_only = a.models.is_empty() || a.models.iter().any(|m| m == "all");
    let (n, m) = (a.input_tokens, a.output_tokens);
    let mut versus: Vec<Versus> = models
        .into_iter()
        .filter(|p| !(hosted_only && p.self_hosted.is_some()))
        .map(|p| {
            let per_request_usd = p.cost_usd(n, 0, m);
            let breakeven = machine.breakeven_requests(per_request_usd, n, m);
            Versus {
                model: &p.id,
                provider: &p.provider,
                per_request_usd,
                breakeven_requests_per_month: breakeven,
                never: breakeven.is_none(),
            }
        })
        .collect();
    versus.sort_by(|x, y| y.per_request_usd.total_cmp(&x.per_request_usd));
    let report = Report {
        machine: Machine {
            spec: &machine,
            hours_per_month: HOURS_PER_MONTH,
            monthly_usd: machine.monthly_usd(),
        },
        input_tokens: n,
        output_tokens: m,
        self_hosted: PerRequest {
            seconds_per_request: machine.seconds_per_request(n, m),
            per_request_usd: machine.request_usd(n, m),
            capacity_requests_per_month: machine.capacity_per_month(n, m),
        },
        models: versus,
    };
    if let Some(path) = &a.chart {
        std::fs::write(path, chart_svg(&report))
            .with_context(|| format!("cannot write the chart to {}", path.display()))?;
        eprintln!("chart written to {}", path.display());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// Monthly cost against volume, from 0 to a little past the furthest break-even (or to one
/// machine's capacity when none breaks even).
fn chart_svg(r: &Report) -> String {
    let cap = r.self_hosted.capacity_requests_per_month.max(1) as f64;
    let far = r
        .models
        .iter()
        .filter_map(|v| v.breakeven_requests_per_month)
        .fold(0u64, u64::max) as f64;
    let xmax = if far > 0.0 {
        (far * 1.5).min(4.0 * cap).max(far)
    } else {
        cap
    };
    let xs: Vec<f64> = (0..=200).map(|i| xmax * f64::from(i) / 200.0).collect();
    let monthly = r.machine.monthly_usd;
    let mut series = vec![chart::Series {
        name: format!("self-hosted ({})", r.machine.spec.hardware),
        // One more machine for every capacity's worth of requests.
        points: xs
            .iter()
            .map(|&x| (x, monthly * (x / cap).ceil().max(1.0)))
            .collect(),
    }];
    series.extend(r.models.iter().take(9).map(|v| chart::Series {
        name: v.model.to_owned(),
        points: xs.iter().map(|&x| (x, v.per_request_usd * x)).collect(),
    }));
    chart::svg(
        &format!(
            "Monthly cost: {} prompt + {} output tokens a request",
            r.input_tokens, r.output_tokens
        ),
        &series,
    )
}

fn print_report(r: &Report) {
    let h = r.machine.spec;
    println!(
        "{}: ${}/hour, {} prompt / {} output tokens/s; ${} a month ({} hours, busy or idle)",
        h.hardware,
        usd(h.hardware_usd_per_hour),
        h.prefill_tokens_per_s,
        h.decode_tokens_per_s,
        usd(r.machine.monthly_usd),
        r.machine.hours_per_month
    );
    let s = &r.self_hosted;
    println!(
        "one request ({} prompt + {} output tokens): {:.3} s of the machine, ${} marginal; capacity {} requests a month at 100% utilisation",
        r.input_tokens,
        r.output_tokens,
        s.seconds_per_request,
        usd(s.per_request_usd),
        s.capacity_requests_per_month
    );
    let rows: Vec<Vec<String>> = r
        .models
        .iter()
        .map(|v| {
            vec![
                v.model.to_owned(),
                v.provider.to_owned(),
                usd(v.per_request_usd),
                v.breakeven_requests_per_month
                    .map_or_else(|| "never".to_owned(), |b| b.to_string()),
            ]
        })
        .collect();
    let headers = [
        "MODEL",
        "PROVIDER",
        "HOSTED_PER_REQUEST",
        "BREAKEVEN_REQUESTS/MONTH",
    ];
    print_table(&headers, &[false, false, true, true], &rows);
}
