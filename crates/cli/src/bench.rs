//! `ferrolm bench`: prefill and decode speed, and peak memory, the way llama-bench reports them.
//!
//! Prefill N (each `--prefill` length, 128 and 512 by default): N prompt tokens evaluated from
//! an empty cache in one pass, tokens/s.
//! Decode: 128 tokens generated one at a time after a 16-token prompt (`--decode-depth`),
//! greedy, timing only the decode steps. Each figure is the median of `--reps` runs after one
//! warm-up. Peak RSS is the process' high-water mark (VmHWM) at the end. The KV cache is of
//! `--kv-type`; its bytes per token are reported.
//!
//! With `--lookup K` or `--draft MODEL`, also speculative decoding: the chat-templated prompt
//! "summarise this document" over `bench/document.txt` (a 330-word town history written for
//! this benchmark), generated greedily up to `--spec-tokens` tokens without and with
//! speculation, in turn, `--reps` times after one warm-up pair. It reports each one's median
//! decode tokens/s (output tokens over the decode time, the prompt's prefill excluded), their
//! ratio, and the share of drafts accepted; it fails if the two outputs differ by one token.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use ferrolm_engine::{GenerateOptions, Generation, Session, SpecStats};
use ferrolm_sample::SamplingParams;
use serde_json::json;

use crate::{load, threads, KvArgs, Loaded, ModelArgs, SpecArgs};

/// The document of the speculative-decoding measurement.
const DOCUMENT: &str = include_str!("bench/document.txt");

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Repetitions per figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Tokens generated in the decode measurement.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Prompt tokens in the cache before the decode measurement starts (at least 1).
    #[arg(long, default_value_t = 16)]
    decode_depth: usize,
    /// Prompt lengths timed for prefill, comma separated (`--prefill 0`: none, e.g. when only
    /// decode at a long depth is wanted).
    #[arg(long, value_delimiter = ',', default_values_t = [128, 512])]
    prefill: Vec<usize>,
    #[command(flatten)]
    kv: KvArgs,
    #[command(flatten)]
    spec: SpecArgs,
    /// Most tokens generated in the speculative-decoding measurement (--lookup, --draft).
    #[arg(long, default_value_t = 256)]
    spec_tokens: usize,
    /// Print JSON: {"prefill_tps_N" for each --prefill N, "decode_tps", "decode_depth",
    /// "kv_type", "kv_bytes_per_token", "peak_rss_mb", "threads"}, and with --lookup or
    /// --draft "speculative": {"plain_tps", "spec_tps", "ratio", "acceptance", "tokens"}.
    #[arg(long)]
    json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

pub fn run(a: BenchArgs) -> Result<()> {
    let m = load(&a.model)?;
    let threads = threads(a.threads)?;
    let reps = a.reps.max(1);
    // A fixed, realistic token stream: the tokenized text of a public-domain sonnet, repeated.
    let text = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: \
                Rough winds do shake the darling buds of May, And summer's lease hath all too short a date. ";
    let base = m.tok.encode(text, false)?;
    if a.decode_depth == 0 {
        bail!("--decode-depth must be at least 1");
    }
    let depth = a.decode_depth;
    let lens: Vec<usize> = a.prefill.iter().copied().filter(|&n| n > 0).collect();
    let stream: Vec<u32> = base
        .iter()
        .copied()
        .cycle()
        .take(lens.iter().copied().max().unwrap_or(0).max(depth) + a.decode_tokens)
        .collect();
    let longest = lens.iter().copied().max().unwrap_or(0);
    let ctx = 1024.max(longest).max(depth + a.decode_tokens + 1);
    let mut session = Session::with_kv_type(&m.model, ctx, threads, a.kv.kv_type)?;
    if depth + a.decode_tokens + 1 > m.model.cfg().context_length {
        bail!(
            "--decode-depth {depth} + --decode-tokens {} exceed the model's context ({})",
            a.decode_tokens,
            m.model.cfg().context_length
        );
    }

    let mut prefill = |n: usize| -> Result<f64> {
        let mut v = Vec::new();
        for r in 0..=reps {
            session.reset();
            let t = Instant::now();
            session.eval(&stream[..n], &[n - 1])?;
            let dt = t.elapsed().as_secs_f64();
            if r > 0 {
                v.push(n as f64 / dt);
            }
        }
        Ok(median(v))
    };
    // A model with a shorter context (a small trained one) measures the prompts that fit.
    let fits = |n: usize| n <= m.model.cfg().context_length;
    let mut prefills: Vec<(usize, Option<f64>)> = Vec::new();
    for &n in &lens {
        prefills.push((n, if fits(n) { Some(prefill(n)?) } else { None }));
    }
    let mut dv = Vec::new();
    for r in 0..=reps {
        session.reset();
        let logits = session.eval(&stream[..depth], &[depth - 1])?;
        let mut next = argmax(&logits);
        let t = Instant::now();
        for _ in 0..a.decode_tokens {
            let l = session.eval(&[next], &[0])?;
            next = argmax(&l);
        }
        let dt = t.elapsed().as_secs_f64();
        if r > 0 {
            dv.push(a.decode_tokens as f64 / dt);
        }
    }
    let decode = median(dv);
    let kv_bpt = session.kv_bytes_per_token();
    drop(session);
    let draft = a.spec.load_draft(ctx)?;
    let spec = if a.spec.lookup > 0 || draft.is_some() {
        Some(speculative(&a, &m, draft.as_ref(), threads, ctx, reps)?)
    } else {
        None
    };
    let rss = peak_rss_mb();
    if a.json {
        let mut out = json!({"engine": "ferrolm", "decode_tps": decode,
                   "decode_depth": depth, "kv_type": a.kv.kv_type.name(), "kv_bytes_per_token": kv_bpt,
                   "peak_rss_mb": rss, "threads": threads, "isa": m.model.isa().name(), "reps": reps,
                   "speculative": spec.as_ref().map(|s| json!({"plain_tps": s.plain_tps, "spec_tps": s.spec_tps,
                       "ratio": s.spec_tps / s.plain_tps, "acceptance": s.stats.acceptance(),
                       "drafted": s.stats.drafted, "accepted": s.stats.accepted, "tokens": s.tokens}))});
        for (n, p) in &prefills {
            out[format!("prefill_tps_{n}")] = json!(p);
        }
        println!("{out}");
    } else {
        println!("model:         {}", m.path.display());
        println!(
            "threads:       {threads} (kernels: {})",
            m.model.isa().name()
        );
        let ctx = m.model.cfg().context_length;
        for &(n, p) in &prefills {
            match p {
                Some(p) => println!("prefill {n}:   {p:.1} tokens/s"),
                None => println!("prefill {n}:   - (the model's context is {ctx} tokens)"),
            }
        }
        println!(
            "decode:        {decode:.1} tokens/s ({} tokens after {depth})",
            a.decode_tokens
        );
        println!("KV cache:      {} ({kv_bpt} bytes per token)", a.kv.kv_type);
        println!("peak RSS:      {rss:.1} MiB");
        if let Some(s) = &spec {
            println!(
                "speculative:   {:.1} tokens/s against {:.1} plain: {:.2}x ({} identical tokens of a summary; {:.0}% of {} drafts accepted)",
                s.spec_tps,
                s.plain_tps,
                s.spec_tps / s.plain_tps,
                s.tokens,
                100.0 * s.stats.acceptance(),
                s.stats.drafted
            );
        }
    }
    Ok(())
}

/// The speculative-decoding measurement's medians.
struct SpecFigures {
    plain_tps: f64,
    spec_tps: f64,
    /// Drafts of one run (every run drafts the same).
    stats: SpecStats,
    /// Tokens generated per run.
    tokens: usize,
}

fn speculative(
    a: &BenchArgs,
    m: &Loaded,
    draft: Option<&Loaded>,
    threads: usize,
    ctx: usize,
    reps: usize,
) -> Result<SpecFigures> {
    let prompt = m.chat_ids(&json!([{"role": "user",
        "content": format!("Summarise this document.\n\n{DOCUMENT}")}]))?;
    let ctx = ctx.max(prompt.len() + a.spec_tokens + 1);
    let mut plain = Session::with_kv_type(&m.model, ctx, threads, a.kv.kv_type)?;
    let mut spec = Session::with_kv_type(&m.model, ctx, threads, a.kv.kv_type)?;
    a.spec.apply(&mut spec, draft, threads, a.kv.kv_type)?;
    let opts = GenerateOptions {
        params: SamplingParams::greedy(),
        max_tokens: a.spec_tokens.max(1),
        stop: Vec::new(),
        end_ids: m.end_ids(),
        seed: 0,
        grammar: None,
    };
    let run = |s: &mut Session| -> Result<Generation> {
        s.reset();
        Ok(s.generate(&prompt, &m.tok, &opts, |_| true)?)
    };
    let tps = |g: &Generation| g.ids.len() as f64 / g.decode_time.as_secs_f64().max(1e-9);
    let (mut pv, mut sv) = (Vec::new(), Vec::new());
    let mut last = None;
    for r in 0..=reps {
        let p = run(&mut plain)?;
        let s = run(&mut spec)?;
        if p.ids != s.ids {
            let at = p.ids.iter().zip(&s.ids).take_while(|(a, b)| a == b).count();
            bail!(
                "speculative decoding changed the greedy output at token {at} of {}: a bug, please report it",
                p.ids.len()
            );
        }
        if r > 0 {
            pv.push(tps(&p));
            sv.push(tps(&s));
        }
        last = Some(s);
    }
    let last = last.ok_or_else(|| anyhow::anyhow!("no run"))?;
    Ok(SpecFigures {
        plain_tps: median(pv),
        spec_tps: median(sv),
        stats: last.speculation,
        tokens: last.ids.len(),
    })
}
