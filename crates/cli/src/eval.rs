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

use crate::{load, threads, KvArgs, Loaded, LoraArgs, ModelArgs};

#[derive(Subcommand)]
pub enum EvalCmd {
    /// Perplexity over a text file (windows of --ctx tokens, positions 1..ctx-1 scored).
    Perplexity(PplArgs),
    /// How far a model's next-token distributions are from a base model's on a text: KL
    /// divergence (mean, p99), top-1 agreement and both perplexities (as llama-perplexity
    /// --kl-divergence). For judging a quantization: `--model Q --base F32`.
    Kld(KldArgs),
    /// Exact-match accuracy on chat JSONL: each line's last assistant message is the answer,
    /// the messages before it the prompt; the model replies greedily.
    Chat(ChatEvalArgs),
    /// A reward model on preference pairs (OpenAI preference JSONL): pair accuracy (the
    /// preferred output scored higher; ties count half) and the mean margin.
    Reward(RewardEvalArgs),
}

#[derive(Args)]
pub struct RewardEvalArgs {
    /// The reward model: a `ferrolm finetune --method reward` run, or a PEFT adapter directory
    /// with a score head (task_type SEQ_CLS).
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// The base model under the adapter (default: the run's own base, else the default model).
    #[arg(long)]
    base: Option<PathBuf>,
    /// Preference JSONL ({"input": {"messages": [...]}, "preferred_output": [...],
    /// "non_preferred_output": [...]} per line).
    #[arg(long)]
    data: PathBuf,
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Print JSON: {"pair_accuracy", "mean_margin", "mean_chosen", "mean_rejected", "pairs"}.
    #[arg(long)]
    json: bool,
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
pub struct KldArgs {
    /// The model to judge (e.g. the quantized file).
    #[command(flatten)]
    model: ModelArgs,
    /// The reference model (e.g. the f32 or f16 source). Same vocabulary.
    #[arg(long)]
    base: PathBuf,
    /// The model's KV cache type (`--kv-type`); with `--base` the same file, this measures
    /// what a quantized KV cache costs against the base's `--base-kv-type`.
    #[command(flatten)]
    kv: KvArgs,
    /// The base model's KV cache type.
    #[arg(long, value_name = "f16|q8_0|q4_0", default_value = "f16")]
    base_kv_type: ferrolm_models::KvType,
    /// UTF-8 text file to score.
    #[arg(long)]
    file: PathBuf,
    /// Use only the first N tokens of the file (whole windows; default: all).
    #[arg(long)]
    tokens: Option<usize>,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Print JSON: {"kld_mean", "kld_p99", "top1_agreement", "ppl", "ppl_base", "tokens"}.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PplArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    lora: LoraArgs,
    #[command(flatten)]
    kv: KvArgs,
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
    /// Print JSON: {"ppl", "mean_nll", "scored_tokens", "windows", "ctx", "kv_type"}.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: EvalCmd) -> Result<()> {
    match cmd {
        EvalCmd::Perplexity(a) => perplexity(a),
        EvalCmd::Chat(a) => chat_accuracy(a),
        EvalCmd::Kld(a) => kld_cmd(a),
        EvalCmd::Reward(a) => reward_cmd(a),
    }
}

/// A reward model on the base it was trained on: the base loaded, and a session with the
/// adapter and its score head on.
pub struct RewardModel {
    pub base: Loaded,
    pub adapter: std::sync::Arc<ferrolm_models::Adapter>,
}

impl RewardModel {
    /// Open the reward model at `path` (a `finetune --method reward` run or a PEFT
    /// directory) on `base` (default: the run's base, else the default model); errors name
    /// it as `flag` (the option that gave it).
    pub fn open(
        path: &std::path::Path,
        base: Option<&std::path::Path>,
        flag: &str,
    ) -> Result<Self> {
        let base = match base {
            Some(b) => Some(b.to_owned()),
            None => run_base(path)?,
        };
        let base = load(&ModelArgs { model: base })?;
        let ad = ferrolm_train::peft::load_for_serving(path, &base.path, "reward")
            .with_context(|| format!("{flag} {}", path.display()))?;
        if ad.score.is_none() {
            bail!(
                "{flag} {}: a language-model adapter, not a reward model (it has no score head); train one with `ferrolm finetune --method reward`",
                path.display()
            );
        }
        base.model.check_adapter(&ad).with_context(|| {
            format!(
                "{flag} {}: not an adapter for {}",
                path.display(),
                base.path.display()
            )
        })?;
        Ok(RewardModel {
            base,
            adapter: std::sync::Arc::new(ad),
        })
    }

    /// The score of each id sequence (a rendered conversation).
    pub fn score(&self, session: &mut Session, ids: &[u32]) -> Result<f32> {
        let w = self.adapter.score.as_deref().unwrap_or(&[]);
        session.reset();
        let h = session.eval_hidden(ids, &[ids.len().saturating_sub(1)])?;
        Ok(w.iter().zip(&h).map(|(a, b)| a * b).sum())
    }
}

/// The base model a `ferrolm finetune` run was trained on (from its `finetune.json`).
fn run_base(dir: &std::path::Path) -> Result<Option<PathBuf>> {
    let p = dir.join("finetune.json");
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", p.display()))?;
    Ok(v["base"].as_str().map(PathBuf::from))
}

fn reward_cmd(a: RewardEvalArgs) -> Result<()> {
    let rm = RewardModel::open(&a.model, a.base.as_deref(), "--model")?;
    let (tok, template) = (&rm.base.tok, &rm.base.template);
    let pairs = ferrolm_train::dpo::load_pairs(&a.data, tok, template)?;
    let longest = pairs
        .iter()
        .flat_map(|p| [p.chosen.ids.len(), p.rejected.ids.len()])
        .max()
        .unwrap_or(1);
    let ctx = rm.base.model.cfg().context_length;
    if longest > ctx {
        bail!(
            "{}: a conversation has {longest} tokens, more than the model's context of {ctx}",
            a.data.display()
        );
    }
    let mut session = Session::new(&rm.base.model, longest, threads(a.threads)?)?;
    session.set_adapter(Some(rm.adapter.clone()))?;
    let bar = indicatif::ProgressBar::new(pairs.len() as u64);
    if a.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let (mut correct, mut margin, mut chosen, mut rejected) = (0f64, 0f64, 0f64, 0f64);
    for p in &pairs {
        let c = f64::from(rm.score(&mut session, &p.chosen.ids)?);
        let r = f64::from(rm.score(&mut session, &p.rejected.ids)?);
        correct += ferrolm_train::dpo::pair_credit(c, r);
        margin += c - r;
        chosen += c;
        rejected += r;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let n = pairs.len().max(1) as f64;
    let report = json!({
        "pair_accuracy": correct / n,
        "mean_margin": margin / n,
        "mean_chosen": chosen / n,
        "mean_rejected": rejected / n,
        "pairs": pairs.len(),
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "pair accuracy {:.3} over {} pairs; mean margin {:.3} (chosen {:.3}, rejected {:.3})",
            correct / n,
            pairs.len(),
            margin / n,
            chosen / n,
            rejected / n
        );
    }
    Ok(())
}

fn kld_cmd(a: KldArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {} (a UTF-8 text file)", a.file.display()))?;
    let m = load(&a.model)?;
    let base = load(&ModelArgs {
        model: Some(a.base.clone()),
    })?;
    let r = kld_with_kv(
        &base,
        &m,
        &text,
        a.tokens.unwrap_or(usize::MAX),
        a.ctx,
        threads(a.threads)?,
        (a.base_kv_type, a.kv.kv_type),
    )?;
    if a.json {
        println!("{}", r.json());
    } else {
        println!("{}", r.summary());
    }
    Ok(())
}

/// How a model's next-token distributions differ from a base model's over the same tokens.
#[derive(Debug, Clone)]
pub struct KldReport {
    /// Mean over scored positions of KL(base ‖ model), in nats.
    pub kld_mean: f64,
    /// 99th percentile of the per-position KL.
    pub kld_p99: f64,
    /// Share of positions where both models' most likely token is the same.
    pub top1_agreement: f64,
    pub ppl: f64,
    pub ppl_base: f64,
    /// Positions scored.
    pub tokens: usize,
}

impl KldReport {
    pub fn json(&self) -> serde_json::Value {
        json!({"kld_mean": self.kld_mean, "kld_p99": self.kld_p99,
               "top1_agreement": self.top1_agreement, "ppl": self.ppl,
               "ppl_base": self.ppl_base, "tokens": self.tokens})
    }

    pub fn summary(&self) -> String {
        format!(
            "KL divergence mean {:.6}, p99 {:.6}; top-1 agreement {:.2}%; perplexity {:.4} vs base {:.4} ({:+.2}%); {} tokens",
            self.kld_mean,
            self.kld_p99,
            100.0 * self.top1_agreement,
            self.ppl,
            self.ppl_base,
            100.0 * (self.ppl / self.ppl_base - 1.0),
            self.tokens
        )
    }
}

/// log-softmax of one logit row, in f64.
fn log_probs(row: &[f32]) -> Vec<f64> {
    let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln() + mx;
    row.iter().map(|&x| x as f64 - lse).collect()
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Score `text` (its first `max_tokens` tokens, in whole windows of `ctx`, each from an empty
/// cache, positions 1..ctx-1) with both models and compare them position by position.
pub fn kld(
    base: &Loaded,
    m: &Loaded,
    text: &str,
    max_tokens: usize,
    ctx: usize,
    threads: usize,
) -> Result<KldReport> {
    let f16 = ferrolm_models::KvType::F16;
    kld_with_kv(base, m, text, max_tokens, ctx, threads, (f16, f16))
}

/// [`kld`] with KV caches of the given types (base's, model's).
pub fn kld_with_kv(
    base: &Loaded,
    m: &Loaded,
    text: &str,
    max_tokens: usize,
    ctx: usize,
    threads: usize,
    (base_kv, kv): (ferrolm_models::KvType, ferrolm_models::KvType),
) -> Result<KldReport> {
    let vocab = m.model.cfg().vocab_size;
    if base.model.cfg().vocab_size != vocab || base.tok.vocab_size() != m.tok.vocab_size() {
        bail!(
            "{} has {} tokens but the base {} has {}: KL divergence needs the same vocabulary",
            m.path.display(),
            vocab,
            base.path.display(),
            base.model.cfg().vocab_size
        );
    }
    if ctx < 2 {
        bail!("--ctx must be at least 2 (position 0 of each window is not scored)");
    }
    let limit = m
        .model
        .cfg()
        .context_length
        .min(base.model.cfg().context_length);
    if ctx > limit {
        bail!("--ctx {ctx} exceeds the models' context length {limit}");
    }
    let mut ids = base.tok.encode(text, false)?;
    ids.truncate(max_tokens);
    let windows = ids.len() / ctx;
    if windows == 0 {
        bail!(
            "the text has {} tokens, fewer than one window of {ctx}; give a longer text or a smaller --ctx",
            ids.len()
        );
    }
    let mut sb = Session::with_kv_type(&base.model, ctx, threads, base_kv)?;
    let mut sm = Session::with_kv_type(&m.model, ctx, threads, kv)?;
    let (mut nll, mut nll_base, mut agree) = (0f64, 0f64, 0usize);
    let mut kls = Vec::with_capacity(windows * ctx);
    const CHUNK: usize = 64;
    for w in 0..windows {
        let win = &ids[w * ctx..(w + 1) * ctx];
        sb.reset();
        sm.reset();
        for start in (0..ctx).step_by(CHUNK) {
            let chunk = &win[start..(start + CHUNK).min(ctx)];
            let want: Vec<usize> = (0..chunk.len()).filter(|&i| start + i + 1 < ctx).collect();
            let lb = sb.eval(chunk, &want)?;
            let lm = sm.eval(chunk, &want)?;
            for (j, &i) in want.iter().enumerate() {
                let (rb, rm) = (
                    &lb[j * vocab..(j + 1) * vocab],
                    &lm[j * vocab..(j + 1) * vocab],
                );
                let (pb, pm) = (log_probs(rb), log_probs(rm));
                let kl: f64 = pb.iter().zip(&pm).map(|(&b, &q)| b.exp() * (b - q)).sum();
                kls.push(kl.max(0.0));
                let target = win[start + i + 1] as usize;
                nll -= pm[target];
                nll_base -= pb[target];
                agree += usize::from(argmax(rb) == argmax(rm));
            }
        }
    }
    let n = kls.len();
    let kld_mean = kls.iter().sum::<f64>() / n as f64;
    kls.sort_by(f64::total_cmp);
    let kld_p99 = kls[((n as f64 * 0.99).ceil() as usize).clamp(1, n) - 1];
    Ok(KldReport {
        kld_mean,
        kld_p99,
        top1_agreement: agree as f64 / n as f64,
        ppl: (nll / n as f64).exp(),
        ppl_base: (nll_base / n as f64).exp(),
        tokens: n,
    })
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
    let mut session = Session::with_kv_type(&m.model, a.ctx, threads(a.threads)?, a.kv.kv_type)?;
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
            json!({"ppl": ppl, "mean_nll": mean, "scored_tokens": scored, "windows": windows, "ctx": a.ctx, "kv_type": a.kv.kv_type.name(),
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
