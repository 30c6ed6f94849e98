//! `ferrolm cost distill`: what replacing a teacher with a distilled student saves, and when
//! the one-time cost of distilling (teacher generation, training, evaluation) is paid back.
//!
//! monthly cost = requests a month × cost of one request (from the catalog's prices for the
//! request's tokens, or given per request); savings = teacher − student; break-even = one-time
//! ÷ monthly savings, in months ("never" when the student is not cheaper).
//!
//! The seed's example — $29,000 a month of teacher traffic against $2,000 for the student, and
//! $5,000 once — is `--teacher-usd 0.029 --student-usd 0.002 --requests 1000000 --one-time-usd
//! 5000`: $27,000.00 saved a month, paid back in 0.19 months (5.6 days).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use super::{print_table, requests, tokens, usd, PricesArg};

#[derive(Args)]
pub struct DistillCostArgs {
    /// The teacher: a catalog model id (priced for --input-tokens/--output-tokens).
    #[arg(long, value_name = "ID")]
    teacher: Option<String>,
    /// The student: a catalog model id (a self-hosted entry prices it from its hardware).
    #[arg(long, value_name = "ID")]
    student: Option<String>,
    /// The teacher's cost of one request in US dollars, instead of a catalog model.
    #[arg(long, value_name = "USD")]
    teacher_usd: Option<f64>,
    /// The student's cost of one request in US dollars, instead of a catalog model.
    #[arg(long, value_name = "USD")]
    student_usd: Option<f64>,
    /// Requests a month.
    #[arg(long, value_parser = requests)]
    requests: Option<u64>,
    /// Prompt tokens of one request (with --teacher/--student).
    #[arg(long, value_parser = tokens)]
    input_tokens: Option<u64>,
    /// Output tokens of one request (with --teacher/--student).
    #[arg(long, value_parser = tokens)]
    output_tokens: Option<u64>,
    /// What distilling costs once (teacher generation, training, evaluation), in US dollars.
    #[arg(long, value_name = "USD")]
    one_time_usd: Option<f64>,
    /// Take every figure not given from a demonstration's measurements (RUN/measured.json,
    /// written by scripts/distill_demo.py: the ledger's cost per request of teacher and
    /// student, the tokens per request, the requests a month and the one-time cost).
    #[arg(long, value_name = "RUN")]
    measured: Option<PathBuf>,
    #[command(flatten)]
    prices: PricesArg,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// A demonstration's measured figures (`RUN/measured.json`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Measured {
    teacher_usd_per_request: Option<f64>,
    student_usd_per_request: Option<f64>,
    requests_per_month: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    one_time_usd: Option<f64>,
    /// How each figure was measured (shown, not used).
    #[serde(default)]
    notes: Vec<String>,
}

#[derive(Serialize)]
struct Side {
    what: String,
    usd_per_request: f64,
    usd_per_month: f64,
}

#[derive(Serialize)]
struct Report {
    requests_per_month: u64,
    teacher: Side,
    student: Side,
    savings_usd_per_month: f64,
    one_time_usd: f64,
    /// `None`: never (the student is not cheaper).
    breakeven_months: Option<f64>,
    breakeven_days: Option<f64>,
}

pub fn run(a: DistillCostArgs) -> Result<()> {
    let m = match &a.measured {
        Some(run) => {
            let f = run.join("measured.json");
            let text = std::fs::read_to_string(&f).with_context(|| {
                format!(
                    "--measured: cannot read {} (written by scripts/distill_demo.py)",
                    f.display()
                )
            })?;
            serde_json::from_str(&text).with_context(|| format!("{}", f.display()))?
        }
        None => Measured::default(),
    };
    let catalog = a.prices.load()?;
    let input = a.input_tokens.or(m.input_tokens);
    let output = a.output_tokens.or(m.output_tokens);
    let side = |name: &str,
                id: &Option<String>,
                given: Option<f64>,
                measured: Option<f64>|
     -> Result<(String, f64)> {
        match (id, given.or(measured)) {
            (Some(_), Some(_)) if given.is_some() => bail!("give --{name} or --{name}-usd, not both"),
            (Some(id), _) => {
                let (Some(i), Some(o)) = (input, output) else {
                    bail!("--{name} {id}: give --input-tokens and --output-tokens to price its requests");
                };
                let p = catalog.lookup(id)?;
                Ok((p.id.clone(), p.cost_usd(i, 0, o)))
            }
            (None, Some(u)) if u.is_finite() && u >= 0.0 => Ok((
                if given.is_some() { "(given)" } else { "(measured)" }.to_owned(),
                u,
            )),
            (None, Some(u)) => bail!("--{name}-usd {u}: give a cost in dollars >= 0"),
            (None, None) => bail!("the {name}'s cost is missing: give --{name} ID (a catalog model), --{name}-usd USD, or --measured RUN"),
        }
    };
    let (tw, tu) = side(
        "teacher",
        &a.teacher,
        a.teacher_usd,
        m.teacher_usd_per_request,
    )?;
    let (sw, su) = side(
        "student",
        &a.student,
        a.student_usd,
        m.student_usd_per_request,
    )?;
    let n = a
        .requests
        .or(m.requests_per_month)
        .context("give --requests (a month), or --measured RUN")?;
    let once = a.one_time_usd.or(m.one_time_usd).unwrap_or(0.0);
    if !(once.is_finite() && once >= 0.0) {
        bail!("--one-time-usd {once}: give dollars >= 0");
    }
    let (tm, sm) = (tu * n as f64, su * n as f64);
    let savings = tm - sm;
    let months = (savings > 0.0).then(|| once / savings);
    let r = Report {
        requests_per_month: n,
        teacher: Side {
            what: tw,
            usd_per_request: tu,
            usd_per_month: tm,
        },
        student: Side {
            what: sw,
            usd_per_request: su,
            usd_per_month: sm,
        },
        savings_usd_per_month: savings,
        one_time_usd: once,
        breakeven_months: months,
        breakeven_days: months.map(|x| x * 30.0),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let cents = |v: f64| format!("{v:.2}");
    let rows = vec![
        vec!["teacher".into(), r.teacher.what.clone(), usd(tu), cents(tm)],
        vec!["student".into(), r.student.what.clone(), usd(su), cents(sm)],
        vec![
            "savings".into(),
            String::new(),
            usd(tu - su),
            cents(savings),
        ],
    ];
    println!("{n} requests a month");
    print_table(
        &["", "MODEL", "$/REQUEST", "$/MONTH"],
        &[false, false, true, true],
        &rows,
    );
    println!("one-time cost: ${}", cents(once));
    match months {
        Some(x) => {
            let when = if x >= 0.01 {
                format!("{x:.2} months ({:.1} days)", x * 30.0)
            } else {
                format!("{x:.5} months ({:.1} hours)", x * 30.0 * 24.0)
            };
            println!(
                "break-even: {when}; first-year net saving ${}",
                cents(12.0 * savings - once)
            )
        }
        None => println!("break-even: never (the student costs as much as the teacher or more)"),
    }
    for note in &m.notes {
        println!("  {note}");
    }
    Ok(())
}
