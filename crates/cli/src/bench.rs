//! `ferrolm bench`: prefill and decode speed, and peak memory, the way llama-bench reports them.
//!
//! Prefill N (each `--prefill` length, 128 and 512 by default): N prompt tokens evaluated from
//! an empty cache in one pass, tokens/s.
//! Decode: 128 tokens generated one at a time after a 16-token prompt (`--decode-depth`),
//! greedy, timing only the decode steps. Each figure is the median of `--reps` runs after one
//! warm-up. Peak RSS is the process' high-water mark (VmHWM) at the end. The KV cache is of
//! `--kv-type`; its bytes per token are reported.
//!
//! With `--parallel N,…`, also batched decoding as a server runs it: for each N, N requests
//! with their own `--decode-depth`-token prompts (no two alike, so none finds a cached
//! block) go into one engine (the server's scheduler and
//! kernels, `--max-batch-tokens` per step), which generates `--decode-tokens` tokens for each,
//! greedily and without stopping at an end token. It reports the tokens/s of all N sequences
//! together from the step after the last prompt's prefill to the last token (and so the time
//! of one decode step of N sequences), and the prompts' prefill time, the median of `--reps`
//! runs after one warm-up: what `llama-batched-bench` calls S_TG and S_PP.
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
use std::sync::Arc;

use ferrolm_engine::{
    Engine, EngineConfig, Event, GenerateOptions, Generation, Request, Session, SpecStats,
};
use ferrolm_models::Model;
use ferrolm_sample::SamplingParams;
use ferrolm_tokenizer::Tokenizer;
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
    /// Batched decoding: for each N (comma separated), N greedy requests of --decode-depth
    /// prompt tokens and --decode-tokens generated tokens run together in the server's engine;
    /// reports the N sequences' total tokens/s from the step after the last prompt's prefill
    /// (as llama-batched-bench's S_TG), the time of one such step, and the prompts' prefill time.
    #[arg(long, value_delimiter = ',')]
    parallel: Vec<usize>,
    /// Most tokens one engine step computes in the --parallel measurement (prompt chunks plus
    /// decode tokens), as `ferrolm serve --max-batch-tokens`.
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// Print JSON: {"prefill_tps_N" for each --prefill N, "decode_tps", "decode_depth",
    /// "kv_type", "kv_bytes_per_token", "peak_rss_mb", "threads"}, with --lookup or --draft
    /// "speculative": {"plain_tps", "spec_tps", "ratio", "acceptance", "tokens"}, and with
    /// --parallel "parallel": [{"sequences", "decode_tps", "step_ms", "prefill_s"}, …].
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

/// The memory the kernel says is available (`MemAvailable`), in bytes, where it says.
fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = s
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
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
    if a.parallel.contains(&0) {
        bail!("--parallel takes sequence counts of at least 1");
    }
    if a.max_batch_tokens == 0 {
        bail!("--max-batch-tokens must be at least 1");
    }
    if !a.parallel.is_empty() && a.decode_tokens < 2 {
        bail!("--parallel times the steps after each request's first token: give --decode-tokens 2 or more");
    }
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
    let (path, isa) = (m.path.clone(), m.model.isa().name());
    let Loaded { model, tok, .. } = m;
    let (model, tok) = (Arc::new(model), Arc::new(tok));
    let par = a
        .parallel
        .iter()
        .map(|&n| parallel(&a, &model, &tok, &stream, n, threads, reps))
        .collect::<Result<Vec<_>>>()?;
    let rss = peak_rss_mb();
    if a.json {
        let mut out = json!({"engine": "ferrolm", "decode_tps": decode,
                   "decode_depth": depth, "kv_type": a.kv.kv_type.name(), "kv_bytes_per_token": kv_bpt,
                   "peak_rss_mb": rss, "threads": threads, "isa": isa, "reps": reps,
                   "speculative": spec.as_ref().map(|s| json!({"plain_tps": s.plain_tps, "spec_tps": s.spec_tps,
                       "ratio": s.spec_tps / s.plain_tps, "acceptance": s.stats.acceptance(),
                       "drafted": s.stats.drafted, "accepted": s.stats.accepted, "tokens": s.tokens}))});
        for (n, p) in &prefills {
            out[format!("prefill_tps_{n}")] = json!(p);
        }
        if !par.is_empty() {
            out["parallel"] = json!(par
                .iter()
                .map(|p| json!({"sequences": p.n, "decode_tps": p.decode_tps,
                    "step_ms": p.step_ms, "prefill_s": p.prefill_s}))
                .collect::<Vec<_>>());
        }
        println!("{out}");
    } else {
        println!("model:         {}", path.display());
        println!("threads:       {threads} (kernels: {isa})");
        let ctx = model.cfg().context_length;
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
        for p in &par {
            println!(
                "parallel {}:   {:.1} tokens/s decoding ({:.2} ms a step of {} sequence{}; their {}-token prompts took {:.3} s)",
                p.n,
                p.decode_tps,
                p.step_ms,
                p.n,
                if p.n == 1 { "" } else { "s" },
                depth,
                p.prefill_s
            );
        }
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

/// The `--parallel` measurement's medians for one sequence count.
struct ParallelFigures {
    n: usize,
    /// Tokens of all sequences per second, from the first step after the last prefill.
    decode_tps: f64,
    /// One decode step of the `n` sequences.
    step_ms: f64,
    /// From adding the requests to the step that gave the last prompt its first token.
    prefill_s: f64,
}

/// `n` greedy requests of `--decode-depth` prompt tokens and `--decode-tokens` generated
/// tokens each, run to their ends by one engine (see the module docs).
fn parallel(
    a: &BenchArgs,
    model: &Arc<Model>,
    tok: &Arc<Tokenizer>,
    stream: &[u32],
    n: usize,
    threads: usize,
    reps: usize,
) -> Result<ParallelFigures> {
    let (depth, gen) = (a.decode_depth, a.decode_tokens);
    let per_seq = (depth + gen + 1).div_ceil(16);
    let num_blocks = n * per_seq + 1;
    let kv_bytes = num_blocks * 16 * a.kv.kv_type.bytes_per_token(model.cfg());
    if let Some(avail) = mem_available() {
        if kv_bytes as u64 > avail / 2 {
            bail!(
                "--parallel {n} needs {:.1} GiB of KV cache ({n} sequences of {} tokens), more than half of the {:.1} GiB of memory available: lower N, --decode-depth or --decode-tokens, or take --kv-type q8_0 or q4_0",
                kv_bytes as f64 / (1u64 << 30) as f64,
                depth + gen,
                avail as f64 / (1u64 << 30) as f64
            );
        }
    }
    let cfg = EngineConfig {
        block_size: 16,
        num_blocks,
        kv_type: a.kv.kv_type,
        max_batch_tokens: a.max_batch_tokens,
        max_running: n,
        threads,
        lookup: 0,
    };
    let opts = GenerateOptions {
        params: SamplingParams::greedy(),
        max_tokens: gen,
        stop: Vec::new(),
        end_ids: Vec::new(),
        seed: 0,
        grammar: None,
    };
    // One engine for every run, as a server keeps one: its KV pages are touched by the
    // warm-up, not timed.
    let mut engine = Engine::new(model.clone(), tok.clone(), cfg)?;
    let vocab = model.cfg().vocab_size;
    let (mut dv, mut sv, mut pv) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..=reps {
        // Request i of run r: its own first token (an ordinary id, different for every request
        // of every run, so no prompt finds a cached block), then the stream from token i.
        let prompts = (0..n).map(|i| {
            let first = (1000 + r * n + i) % vocab;
            std::iter::once(first as u32)
                .chain((0..depth - 1).map(move |k| stream[(i + k) % stream.len()]))
                .collect::<Vec<u32>>()
        });
        let mut rxs = Vec::with_capacity(n);
        let t0 = Instant::now();
        for (i, p) in prompts.enumerate() {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            engine.add(Request {
                id: (r * n + i) as u64,
                prompt: p,
                opts: opts.clone(),
                adapter: None,
                cache_scope: 0,
                reply: tx,
            });
            rxs.push(rx);
        }
        let mut got = vec![0usize; n];
        let mut done = 0;
        let (mut first, mut after, mut steps) = (None, 0usize, 0usize);
        while engine.has_work() {
            engine.step()?;
            if first.is_some() {
                steps += 1;
            }
            for (g, rx) in got.iter_mut().zip(rxs.iter_mut()) {
                while let Ok(ev) = rx.try_recv() {
                    match ev {
                        Event::Token { .. } => *g += 1,
                        Event::Finished { .. } => done += 1,
                        Event::Error(e) => bail!("--parallel {n}: a request failed: {e}"),
                    }
                }
            }
            if first.is_none() && got.iter().all(|&g| g > 0) {
                // Every prompt is in: from here on, steps decode only.
                first = Some(Instant::now());
                after = got.iter().sum();
            }
        }
        let end = Instant::now();
        if done != n || got.iter().any(|&g| g != gen) {
            bail!("--parallel {n}: expected {gen} tokens from each of {n} requests, got {got:?}");
        }
        let first = first.unwrap_or(end);
        let decoded = n * gen - after;
        let dt = (end - first).as_secs_f64().max(1e-9);
        if r > 0 {
            dv.push(decoded as f64 / dt);
            sv.push(1e3 * dt / steps.max(1) as f64);
            pv.push((first - t0).as_secs_f64());
        }
    }
    Ok(ParallelFigures {
        n,
        decode_tps: median(dv),
        step_ms: median(sv),
        prefill_s: median(pv),
    })
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
