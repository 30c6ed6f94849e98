//! `ferrolm eval perplexity`: the standard language-modelling score, stated exactly.
//!
//! The file is tokenized whole, without BOS or special tokens; the first `--tokens` ids are
//! cut into non-overlapping windows of `--ctx` ids (a partial last window is dropped); each
//! window is evaluated from an empty cache and positions 1..ctx-1 are scored (position 0 has no
//! context). PPL = exp(mean NLL) over all scored positions, accumulated in f64.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferrolm_engine::Session;
use serde_json::json;

use crate::{load, threads, LoraArgs, ModelArgs};

#[derive(Subcommand)]
pub enum EvalCmd {
    /// Perplexity over a text file (windows of --ctx tokens, positions 1..ctx-1 scored).
    Perplexity(PplArgs),
    /// Exact-match accuracy on chat JSONL: each line's last assistant message is the answer,
    /// the messages before it the prompt; the model replies greedily.
    Chat(ChatEvalArgs),
}

#[derive(Args)]
pub struct ChatEvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    lora: LoraArgs,
    /// Chat JSONL (OpenAI fine-tuning format).
    #[arg(long)]
    data: PathBuf,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Print each wrong reply.
    #[arg(long)]
    show: bool,
    /// Print JSON: {"accuracy", "correct", "total"}.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PplArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    lora: LoraArgs,
    /// UTF-8 text file to score.
    #[arg(long)]
    file: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Use only the first N tokens of the file (default: all).
    #[arg(long)]
    tokens: Option<usize>,
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Print JSON: {"ppl", "mean_nll", "scored_tokens", "windows", "ctx"}.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: EvalCmd) -> Result<()> {
    match cmd {
        EvalCmd::Perplexity(a) => perplexity(a),
        EvalCmd::Chat(a) => chat_accuracy(a),
    }
}

fn chat_accuracy(a: ChatEvalArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.data)
        .with_context(|| format!("reading {}", a.data.display()))?;
    let convs = ferrolm_train::sft::parse_jsonl(&text).map_err(|errs| {
        let shown: Vec<String> = errs.iter().take(5).map(|e| e.to_string()).collect();
        anyhow::anyhow!("{}: {}", a.data.display(), shown.join("; "))
    })?;
    let m = load(&a.model)?;
    let mut session = Session::new(
        &m.model,
        m.model.cfg().context_length.min(4096),
        threads(a.threads)?,
    )?;
    a.lora.apply(&m, &mut session)?;
    let opts = ferrolm_engine::GenerateOptions {
        params: ferrolm_sample::SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        max_tokens: a.max_tokens,
        stop: Vec::new(),
        end_ids: m.end_ids(),
        seed: 0,
        grammar: None,
    };
    let (mut correct, mut total) = (0usize, 0usize);
    for c in &convs {
        let msgs = c.messages.as_array().cloned().unwrap_or_default();
        let Some(last) = msgs.iter().rposition(|m| m["role"] == "assistant") else {
            continue;
        };
        let want = msgs[last]["content"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let prompt = m.template.render(
            &m.tok,
            &serde_json::Value::Array(msgs[..last].to_vec()),
            true,
            c.tools.as_ref(),
        )?;
        let ids = m.tok.encode_chat(&prompt)?;
        let g = session.generate(&ids, &m.tok, &opts, |_| true)?;
        let got = g.text.trim();
        total += 1;
        if got == want {
            correct += 1;
        } else if a.show {
            eprintln!("line {}: want {want:?}\n         got  {got:?}", c.line);
        }
    }
    let acc = correct as f64 / total.max(1) as f64;
    if a.json {
        println!(
            "{}",
            json!({"accuracy": acc, "correct": correct, "total": total})
        );
    } else {
        println!("exact match: {correct}/{total} = {:.1}%", 100.0 * acc);
    }
    Ok(())
}

fn perplexity(a: PplArgs) -> Result<()> {
    if a.ctx < 2 {
        bail!("--ctx must be at least 2 (position 0 of each window is not scored)");
    }
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("{}: not valid UTF-8 text", a.file.display()))?;
    let m = load(&a.model)?;
    if a.ctx > m.model.cfg().context_length {
        bail!(
            "--ctx {} exceeds the model's context length {}",
            a.ctx,
            m.model.cfg().context_length
        );
    }
    let mut ids = m.tok.encode(&text, false)?;
    if let Some(t) = a.tokens {
        ids.truncate(t);
    }
    let windows = ids.len() / a.ctx;
    if windows == 0 {
        bail!(
            "the file has {} tokens, fewer than one window of --ctx {}",
            ids.len(),
            a.ctx
        );
    }
    let mut session = Session::new(&m.model, a.ctx, threads(a.threads)?)?;
    a.lora.apply(&m, &mut session)?;
    let vocab = m.model.cfg().vocab_size;
    let t0 = Instant::now();
    let (mut nll, mut scored) = (0f64, 0usize);
    let bar = indicatif::ProgressBar::new(windows as u64);
    if a.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    // Logits for a whole window at once would be ctx × vocab floats; score in chunks instead.
    const CHUNK: usize = 64;
    for w in 0..windows {
        let win = &ids[w * a.ctx..(w + 1) * a.ctx];
        session.reset();
        for start in (0..a.ctx).step_by(CHUNK) {
            let chunk = &win[start..(start + CHUNK).min(a.ctx)];
            let want: Vec<usize> = (0..chunk.len())
                .filter(|&i| start + i + 1 < a.ctx)
                .collect();
            let logits = session.eval(chunk, &want)?;
            for (j, &i) in want.iter().enumerate() {
                let row = &logits[j * vocab..(j + 1) * vocab];
                let target = win[start + i + 1] as usize;
                let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                let lse = row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln() + mx;
                nll += lse - row[target] as f64;
                scored += 1;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mean = nll / scored as f64;
    let ppl = mean.exp();
    if a.json {
        println!(
            "{}",
            json!({"ppl": ppl, "mean_nll": mean, "scored_tokens": scored, "windows": windows, "ctx": a.ctx,
                   "tokens": windows * a.ctx, "seconds": t0.elapsed().as_secs_f64()})
        );
    } else {
        println!(
            "perplexity {ppl:.4} (mean NLL {mean:.5}) over {scored} scored tokens: {windows} windows of {} tokens, positions 1..{} of each; {:.1}s",
            a.ctx,
            a.ctx - 1,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
