//! `ferrolm distill`: train a student on a teacher's answers. Two stages in one run
//! directory, each resumable by running the same command again:
//!
//! ```text
//! RUN/distill.json        what was asked (teacher, sampling, prompts' hash) — a rerun checks it
//!     teacher.jsonl       the teacher's replies to --prompts, one line per prompt, in order:
//!     teacher-val.jsonl   {"messages": [...prompt, reply], "logprobs": [...], "label": "..."?}
//!     finetune.json, metrics.jsonl, checkpoints/, config.json, tokenizer.gguf
//!                         the student's training (`ferrolm_train::distill`, an objective of the
//!                         one training loop), served with `--model RUN`
//! ```
//! The teacher is a local model (batched through the engine, as `serve` runs it) or any
//! OpenAI-compatible server (`http://…`: another ferrolm, vLLM, an upstream provider). Lines
//! are appended as replies arrive, so a teacher that fails mid-run leaves the run resumable.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferrolm_engine::{Engine, EngineConfig, GenerateOptions, Job};
use ferrolm_train::config::ConfigFile;
use ferrolm_train::distill::{DistillConfig, DistillMode};
use ferrolm_train::finetune::{self, FinetuneConfig, Method, ObjectiveConfig};
use ferrolm_train::lora::{LoraConfig, Target};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use ferrolm_tokenizer::{chat::ChatTemplate, Tokenizer};

use crate::ModelArgs;

#[derive(Args)]
pub struct DistillCmd {
    /// The teacher: a local model (GGUF, run directory, or a name from `ferrolm pull`), or the
    /// base URL of an OpenAI-compatible server (`http://host:port/v1`), e.g. a `ferrolm
    /// serve` or an upstream provider (key in $OPENAI_API_KEY or --teacher-key).
    #[arg(long)]
    teacher: String,
    /// Requests in flight at once to a teacher server.
    #[arg(long, default_value_t = 8)]
    teacher_concurrency: usize,
    /// The model name to ask a teacher server for (default: the first of its /v1/models).
    #[arg(long)]
    teacher_model: Option<String>,
    /// API key for a teacher server (default: $OPENAI_API_KEY, if set).
    #[arg(long)]
    teacher_key: Option<String>,
    /// The student: a model (GGUF, run directory or name) whose weights start the run, or a
    /// `ferrolm train` config file (.toml/.json, its [model] section) for a new model trained
    /// from scratch with the teacher's tokenizer (or --tokenizer's).
    #[arg(long)]
    student: String,
    /// A new student's tokenizer and chat template: a model (default: the teacher, when local).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Prompts: chat JSONL, {"messages": [...]} per line. A line whose last message is an
    /// assistant's carries its ground truth (used with --alpha; not shown to the teacher).
    #[arg(long)]
    prompts: PathBuf,
    /// Held-out prompts (same format): the teacher answers them too, and each evaluation
    /// reports the student's loss and agreement with the teacher on them.
    #[arg(long)]
    val_prompts: Option<PathBuf>,
    /// The run directory (rerun the same command to resume it).
    #[arg(long)]
    out: PathBuf,
    /// `sequence`: train on the teacher's replies (cross-entropy). `token`: match the teacher's
    /// distribution at each reply token (KL), the full softmax when the teacher is local with
    /// the student's vocabulary, else its top --top-logprobs log-probs.
    #[arg(long, default_value = "sequence")]
    mode: String,
    /// Token-level: what the student matches. `full`: the teacher's whole softmax, from its
    /// own forward on each batch (a local teacher with the student's vocabulary; it costs a
    /// teacher forward per step). `top-k`: the --top-logprobs log-probs saved with each reply
    /// (the only choice for a teacher server).
    #[arg(long, value_name = "full|top-k")]
    soft_targets: Option<String>,
    /// The teacher's sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Top log-probs the teacher reports per token (kept in teacher.jsonl; token-level from a
    /// server learns from them).
    #[arg(long, default_value_t = 8)]
    top_logprobs: usize,
    /// The teacher's longest reply in tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Weight of the prompts' own ground-truth replies against the teacher, in [0, 1].
    #[arg(long, default_value_t = 0.0)]
    alpha: f32,
    /// Which student weights train: `full` or `lora` (a new student is always full).
    #[arg(long, default_value = "full")]
    weights: String,
    /// Longest sequence in tokens (longer examples are cut).
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    #[arg(long, default_value_t = 3.0)]
    epochs: f64,
    /// Optimizer steps (default: epochs × prompts / batch).
    #[arg(long)]
    iters: Option<u64>,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Peak learning rate (default: 1e-3 for a new student, 1e-5 full, 2e-4 LoRA).
    #[arg(long)]
    lr: Option<f32>,
    /// Evaluate and checkpoint every N steps.
    #[arg(long, default_value_t = 50)]
    eval_every: u64,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Print one JSON summary as the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// A prompt line: the messages the teacher sees, and the line's own answer if it had one.
struct Prompt {
    messages: Vec<Value>,
    tools: Option<Value>,
    label: Option<String>,
}

fn read_prompts(path: &Path) -> Result<(Vec<Prompt>, String)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let prompts = ferrolm_train::sft::parse_lines(
        &text,
        |line, _| {
            let v: Value =
                serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
            let mut messages = v
                .get("messages")
                .and_then(Value::as_array)
                .cloned()
                .ok_or("missing `messages` (an array of {role, content} objects)")?;
            ferrolm_train::sft::check_messages(&messages)?;
            let label = match messages.last() {
                Some(m) if m["role"] == "assistant" => {
                    let l = m["content"].as_str().map(str::to_owned);
                    messages.pop();
                    l
                }
                _ => None,
            };
            if messages.is_empty() {
                return Err("no prompt: the only message is an assistant's".into());
            }
            Ok(Prompt {
                messages,
                tools: v.get("tools").cloned(),
                label,
            })
        },
        "the file has no prompts: one {\"messages\": [...]} per line",
    )
    .map_err(|errs| {
        let shown: Vec<String> = errs.iter().take(5).map(|e| e.to_string()).collect();
        anyhow::anyhow!("{}: {}", path.display(), shown.join("; "))
    })?;
    Ok((prompts, hex(&Sha256::digest(text.as_bytes()))))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What the teacher stage was asked (saved as `distill.json`; a rerun must ask the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Asked {
    teacher: String,
    teacher_model: Option<String>,
    temperature: f32,
    top_logprobs: usize,
    max_tokens: usize,
    seed: u64,
    prompts_sha256: String,
    val_prompts_sha256: Option<String>,
}

/// The teacher: answers a batch of prompts with (reply text, logprobs content).
enum Teacher {
    Local(Box<LocalTeacher>),
    Remote {
        base: String,
        model: String,
        key: Option<String>,
        rt: tokio::runtime::Runtime,
        client: reqwest::Client,
    },
}

/// A local teacher: its engine (batching as `serve` does), tokenizer and template.
struct LocalTeacher {
    engine: Engine,
    tok: Arc<Tokenizer>,
    template: ChatTemplate,
    end_ids: Vec<u32>,
}

struct Reply {
    text: String,
    logprobs: Value,
}

impl Teacher {
    fn open(a: &DistillCmd) -> Result<Teacher> {
        if a.teacher.starts_with("http://") || a.teacher.starts_with("https://") {
            let mut base = a.teacher.trim_end_matches('/').to_owned();
            if !base.ends_with("/v1") {
                base.push_str("/v1");
            }
            let _ = rustls::crypto::ring::default_provider().install_default();
            let client = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(600))
                .build()
                .context("cannot build the HTTP client")?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the HTTP runtime")?;
            let key = a
                .teacher_key
                .clone()
                .or_else(|| std::env::var("OPENAI_API_KEY").ok());
            let model = match &a.teacher_model {
                Some(m) => m.clone(),
                None => {
                    let v =
                        rt.block_on(get_json(&client, &format!("{base}/models"), key.as_deref()))?;
                    v["data"][0]["id"]
                        .as_str()
                        .map(str::to_owned)
                        .with_context(|| {
                            format!("{base}/models lists no model: name one with --teacher-model")
                        })?
                }
            };
            Ok(Teacher::Remote {
                base,
                model,
                key,
                rt,
                client,
            })
        } else {
            let m = crate::load(&ModelArgs {
                model: Some(PathBuf::from(&a.teacher)),
            })
            .with_context(|| format!("--teacher {}", a.teacher))?;
            let end_ids = m.end_ids();
            let tok = Arc::new(m.tok);
            let engine = Engine::new(
                Arc::new(m.model),
                tok.clone(),
                EngineConfig {
                    threads: crate::threads(a.threads)?,
                    ..EngineConfig::default()
                },
            )?;
            Ok(Teacher::Local(Box::new(LocalTeacher {
                engine,
                tok,
                template: m.template,
                end_ids,
            })))
        }
    }

    /// Replies to `prompts`, in order.
    fn answer(&mut self, a: &DistillCmd, prompts: &[Prompt], first: usize) -> Result<Vec<Reply>> {
        match self {
            Teacher::Local(t) => local_replies(t, a, prompts, first),
            Teacher::Remote {
                base,
                model,
                key,
                rt,
                client,
            } => {
                // Up to --teacher-concurrency requests in flight, answers kept in prompt order.
                let one = |k: usize, p: &Prompt| {
                    let mut body = json!({
                        "model": model,
                        "messages": p.messages,
                        "temperature": a.temperature,
                        "max_tokens": a.max_tokens,
                        "seed": a.seed.wrapping_add((first + k) as u64),
                        "logprobs": true,
                        "top_logprobs": a.top_logprobs,
                    });
                    if let Some(t) = &p.tools {
                        body["tools"] = t.clone();
                    }
                    let url = format!("{base}/chat/completions");
                    let (client, key) = (client.clone(), key.clone());
                    async move { post_json(&client, &url, key.as_deref(), &body).await }
                };
                let mut out = Vec::with_capacity(prompts.len());
                for (g, group) in prompts.chunks(a.teacher_concurrency.max(1)).enumerate() {
                    let k0 = g * a.teacher_concurrency.max(1);
                    let answers = rt.block_on(async {
                        let mut set = tokio::task::JoinSet::new();
                        for (k, p) in group.iter().enumerate() {
                            let f = one(k0 + k, p);
                            set.spawn(async move { (k, f.await) });
                        }
                        let mut got: Vec<Option<Result<Value>>> =
                            group.iter().map(|_| None).collect();
                        while let Some(r) = set.join_next().await {
                            let (k, v) = r.context("a teacher request task failed")?;
                            got[k] = Some(v);
                        }
                        Ok::<_, anyhow::Error>(got)
                    })?;
                    for (k, v) in answers.into_iter().enumerate() {
                        let v = v.context("a teacher request was lost")?.with_context(|| {
                            format!("the teacher failed on prompt {}", first + k0 + k + 1)
                        })?;
                        let c = &v["choices"][0];
                        out.push(Reply {
                            text: c["message"]["content"]
                                .as_str()
                                .unwrap_or_default()
                                .to_owned(),
                            logprobs: c["logprobs"]["content"].clone(),
                        });
                    }
                }
                Ok(out)
            }
        }
    }
}

async fn get_json(client: &reqwest::Client, url: &str, key: Option<&str>) -> Result<Value> {
    let mut r = client.get(url);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    read_json(r.send().await, url).await
}

async fn post_json(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: &Value,
) -> Result<Value> {
    let mut r = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    read_json(r.send().await, url).await
}

async fn read_json(r: reqwest::Result<reqwest::Response>, url: &str) -> Result<Value> {
    let r = r.with_context(|| format!("{url}: no answer"))?;
    let status = r.status();
    let bytes = r
        .bytes()
        .await
        .with_context(|| format!("{url}: the answer broke off"))?;
    if !status.is_success() {
        bail!("{url}: {status}: {}", String::from_utf8_lossy(&bytes));
    }
    serde_json::from_slice(&bytes).with_context(|| format!("{url}: the answer is not JSON"))
}

/// A local teacher's replies: every prompt queued on one engine, batched as `serve` batches.
fn local_replies(
    m: &mut LocalTeacher,
    a: &DistillCmd,
    prompts: &[Prompt],
    first: usize,
) -> Result<Vec<Reply>> {
    let mut jobs = Vec::with_capacity(prompts.len());
    for (k, p) in prompts.iter().enumerate() {
        let r = m.template.render(
            &m.tok,
            &Value::Array(p.messages.clone()),
            true,
            p.tools.as_ref(),
        )?;
        jobs.push(Job {
            prompt: m.tok.encode_chat(&r)?,
            opts: GenerateOptions {
                params: ferrolm_sample::SamplingParams {
                    temperature: a.temperature,
                    top_k: 0,
                    top_p: 1.0,
                    min_p: 0.0,
                    logprobs: Some(a.top_logprobs),
                    ..Default::default()
                },
                max_tokens: a.max_tokens,
                stop: Vec::new(),
                end_ids: m.end_ids.clone(),
                seed: a.seed.wrapping_add((first + k) as u64),
                grammar: None,
            },
            adapter: None,
        });
    }
    let done = m.engine.run_all(jobs)?;
    let mut out = Vec::with_capacity(prompts.len());
    for (k, d) in done.into_iter().enumerate() {
        let d = d.map_err(|e| {
            anyhow::anyhow!(
                "the teacher failed on prompt {}: {}",
                first + k + 1,
                e.message
            )
        })?;
        let text = d.text;
        let mut tokens: Vec<_> = d
            .ids
            .into_iter()
            .zip(d.logprobs)
            .map(|(id, (lp, top))| (id, lp, top))
            .collect();
        // the end-of-turn token that stopped the reply is not part of it
        if tokens.last().is_some_and(|t| m.end_ids.contains(&t.0)) {
            tokens.pop();
        }
        out.push(Reply {
            text,
            logprobs: ferrolm_server::logprobs_content(&m.tok, &tokens),
        });
    }
    Ok(out)
}

/// Answer `prompts` into `file`, resuming after its complete lines; each chunk (32 prompts
/// for a local teacher, --teacher-concurrency for a server) is appended and synced as it
/// finishes.
fn generate(teacher: &mut Teacher, a: &DistillCmd, prompts: &[Prompt], file: &Path) -> Result<()> {
    let done = match std::fs::read_to_string(file) {
        Ok(text) => {
            // a half-written last line (a crash mid-write) is dropped and redone
            let complete = text.rfind('\n').map_or(0, |i| i + 1);
            if complete < text.len() {
                std::fs::write(file, &text[..complete])
                    .with_context(|| format!("cannot write {}", file.display()))?;
            }
            text[..complete].lines().count()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    if done >= prompts.len() {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .with_context(|| format!("cannot write {}", file.display()))?;
    let started = std::time::Instant::now();
    eprintln!(
        "teacher: {} of {} prompts answered in {}; answering the rest",
        done,
        prompts.len(),
        file.display()
    );
    let mut n = done;
    let chunk_len = match teacher {
        Teacher::Local(_) => 32,
        Teacher::Remote { .. } => a.teacher_concurrency.max(1),
    };
    for chunk in prompts[done..].chunks(chunk_len) {
        let replies = teacher.answer(a, chunk, n).with_context(|| {
            format!(
                "{n} of {} replies are kept in {}: run the same command again to resume from there",
                prompts.len(),
                file.display()
            )
        })?;
        let mut text = String::new();
        for (p, r) in chunk.iter().zip(replies) {
            let mut messages = p.messages.clone();
            messages.push(json!({"role": "assistant", "content": r.text}));
            let mut line = json!({"messages": messages, "logprobs": r.logprobs});
            if let Some(t) = &p.tools {
                line["tools"] = t.clone();
            }
            if let Some(l) = &p.label {
                line["label"] = json!(l);
            }
            text.push_str(&line.to_string());
            text.push('\n');
        }
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_data())
            .with_context(|| format!("cannot write {}", file.display()))?;
        n += chunk.len();
        eprintln!(
            "teacher: {n}/{} ({:.1} prompts/s)",
            prompts.len(),
            (n - done) as f64 / started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

pub fn run(a: DistillCmd) -> Result<()> {
    let mode: DistillMode = a.mode.parse().map_err(anyhow::Error::msg)?;
    if !(0.0..=1.0).contains(&a.alpha) {
        bail!(
            "--alpha {}: the weight of the ground-truth replies against the teacher is in [0, 1]",
            a.alpha
        );
    }
    let (prompts, sha) = read_prompts(&a.prompts)?;
    if a.alpha > 0.0 && prompts.iter().all(|p| p.label.is_none()) {
        bail!(
            "--alpha {}: no prompt in {} has a ground-truth reply (a last message with role assistant) to mix in",
            a.alpha,
            a.prompts.display()
        );
    }
    let val = a.val_prompts.as_deref().map(read_prompts).transpose()?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let out = a
        .out
        .canonicalize()
        .with_context(|| format!("{}", a.out.display()))?;
    let asked = Asked {
        teacher: a.teacher.clone(),
        teacher_model: a.teacher_model.clone(),
        temperature: a.temperature,
        top_logprobs: a.top_logprobs,
        max_tokens: a.max_tokens,
        seed: a.seed,
        prompts_sha256: sha,
        val_prompts_sha256: val.as_ref().map(|v| v.1.clone()),
    };
    let saved = out.join("distill.json");
    match std::fs::read_to_string(&saved) {
        Ok(text) => {
            let was: Asked = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a distill run's record", saved.display()))?;
            if was != asked {
                bail!(
                    "{} was distilled with another teacher, prompts or sampling ({}); rerun with the same ones to resume, or choose a new --out",
                    out.display(),
                    text.trim()
                );
            }
        }
        Err(_) => std::fs::write(&saved, serde_json::to_string_pretty(&asked)? + "\n")
            .with_context(|| format!("cannot write {}", saved.display()))?,
    }
    // The student first, so a bad one fails before the teacher's work.
    let student_cfg = a.student.ends_with(".toml") || a.student.ends_with(".json");
    let local_teacher = !(a.teacher.starts_with("http://") || a.teacher.starts_with("https://"));
    let (base, init) = if student_cfg {
        let file = ConfigFile::read(Path::new(&a.student))?;
        let tok_from = match (&a.tokenizer, local_teacher) {
            (Some(t), _) => crate::store::resolve(Some(t))?,
            (None, true) => crate::store::resolve(Some(Path::new(&a.teacher)))?,
            (None, false) => bail!("--student {}: a new model needs a tokenizer: give --tokenizer MODEL (the teacher is a server, so its tokenizer is not here)", a.student),
        };
        (tok_from, Some(file.model))
    } else {
        (crate::store::resolve(Some(Path::new(&a.student)))?, None)
    };
    let base = base
        .canonicalize()
        .with_context(|| format!("{}", base.display()))?;
    // Token-level with a local teacher of the student's vocabulary learns its full softmax.
    let teacher_path = if local_teacher {
        Some(
            crate::store::resolve(Some(Path::new(&a.teacher)))?
                .canonicalize()
                .with_context(|| a.teacher.clone())?,
        )
    } else {
        None
    };
    let full = match (a.soft_targets.as_deref(), local_teacher) {
        (None, local) => local,
        (Some("full"), true) => true,
        (Some("full"), false) => bail!("--soft-targets full needs the teacher's forward, so a local teacher; a server gives its top-k log-probs: use --soft-targets top-k"),
        (Some("top-k" | "topk"), _) => false,
        (Some(x), _) => bail!("--soft-targets {x}: use full or top-k"),
    };
    if a.soft_targets.is_some() && mode == DistillMode::Sequence {
        bail!("--soft-targets applies to --mode token only");
    }
    if mode == DistillMode::Token && full {
        let (_, stok, _) = crate::load_tokenizer(&base)?;
        if let Some(t) = &teacher_path {
            let (_, ttok, _) = crate::load_tokenizer(t)?;
            if !ferrolm_train::distill::same_vocab(&stok, &ttok) {
                bail!("--mode token: the teacher's vocabulary ({} tokens) is not the student's ({}); token-level distillation compares distributions token by token: use --mode sequence", ttok.vocab_size(), stok.vocab_size());
            }
        }
    }
    let mut teacher = Teacher::open(&a)?;
    let train_file = out.join("teacher.jsonl");
    generate(&mut teacher, &a, &prompts, &train_file)?;
    let val_file = match &val {
        Some((v, _)) => {
            let f = out.join("teacher-val.jsonl");
            generate(&mut teacher, &a, v, &f)?;
            Some(f)
        }
        None => None,
    };
    drop(teacher);
    let method = match (a.weights.as_str(), init.is_some()) {
        ("full", _) => Method::Full,
        ("lora", false) => Method::Lora(LoraConfig {
            rank: 8,
            alpha: 16.0,
            targets: Target::ALL.to_vec(),
        }),
        ("lora", true) => {
            bail!("--weights lora: a new student trains all its weights; use --weights full")
        }
        (w, _) => bail!("--weights {w}: use full or lora"),
    };
    let cfg = FinetuneConfig {
        base,
        train_file,
        val_file,
        lr: a.lr.unwrap_or(match (&method, init.is_some()) {
            (_, true) => 1e-3,
            (Method::Full, false) => 1e-5,
            (Method::Lora(_), false) => 2e-4,
        }),
        method,
        max_len: a.max_len,
        epochs: a.epochs,
        iters: a.iters,
        batch: a.batch,
        grad_accum: 1,
        min_lr: None,
        warmup: None,
        weight_decay: if init.is_some() { 0.1 } else { 0.0 },
        grad_clip: 1.0,
        eval_every: a.eval_every,
        seed: a.seed,
        keep: 2,
        qlora: false,
        objective: ObjectiveConfig::Distill(DistillConfig {
            mode,
            alpha: a.alpha,
            teacher: teacher_path.filter(|_| mode == DistillMode::Token && full),
        }),
        cache_dir: None,
        init,
    };
    let resume = out.join("finetune.json").exists();
    let summary = crate::train::drive(a.threads, |stop, on| {
        Ok(finetune::finetune(&cfg, &out, resume, stop, on)?)
    })?;
    crate::train::finish(&out, &summary, a.json, "--prompt '...'")
}
