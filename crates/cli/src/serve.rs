//! `ferrolm serve`: load the models, start one engine thread per model, serve HTTP until
//! Ctrl-C/SIGTERM, then let the requests in flight finish (their ledger rows are written as they
//! finish) and stop the engines.
//!
//! Models come from `--model PATH` (repeatable) and from a `--config` TOML file (local
//! models, upstream models, routers; `docs/serve.example.toml` shows every key); with neither,
//! the installed default model.
//!
//! `/v1/files` and `/v1/fine_tuning/jobs` keep their records in the store (`ferrolm.db` in
//! the data dir, or `--store`) and their files and runs in the blob store (`--blobs`: the data
//! dir's `files/` and `fine_tuning/`, or S3); a job's training runs on `--train-threads`
//! threads beside the engines, and its model is served (to its key) as soon as it succeeds.
//! The jobs are a queue in the store that every replica's worker takes from under leases
//! (`--job-lease`); `--no-worker` makes a replica that never trains.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferrolm_accounting::{PriceCatalog, Store};
use ferrolm_engine::{Engine, EngineConfig, EngineHandle};
use ferrolm_server::adapters::AdapterLoading;
use ferrolm_server::blobs::{Blobs, BlobsUrl};
use ferrolm_server::route::{Router, Tier};
use ferrolm_server::tuner::Load;
use ferrolm_server::upstream::Upstream;
use ferrolm_server::{Access, AppState, ModelDetails, ServedModel};
use serde::Deserialize;

use crate::{load_for_context, threads, KvArgs, ModelArgs};

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// A GGUF model to serve (repeat for several; default: the installed default model).
    #[arg(long, short = 'm')]
    model: Vec<PathBuf>,
    /// A TOML file: `[[model]]` entries (local: path, id, aliases, price, context_strategy,
    /// tool_strategy, lazy_tools_threshold, kv_type, lookup;
    /// upstream: id, upstream, upstream_model, api_key_env, price) and `[[router]]` virtual
    /// models (id, `[[router.tier]]` model / max_prompt_tokens / tools / json / code);
    /// `[[cache_scope]]` groups of keys that share one prefix cache (name, keys; by default each
    /// key has its own); unknown keys are errors. Example: docs/serve.example.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on. A non-loopback address is refused while the data dir has no API
    /// keys, unless --allow-unauthenticated.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0: any free port; the URL printed says which).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Where the key store and usage ledger live (default: $FERROLM_HOME/server).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The key store and usage ledger: sqlite:PATH (a database file; the default is
    /// DATA_DIR/ferrolm.db) or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE, which several
    /// replicas share as one service (keys, rate limits, budgets, one ledger, stored
    /// completions, file records, and fine-tuning jobs as one queue).
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Where uploaded files and fine-tuning runs (checkpoints, adapters, fine-tuned models)
    /// live: a directory (default: the data dir) or s3://BUCKET[/PREFIX], with the endpoint
    /// and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
    /// AWS_REGION (AWS_ALLOW_HTTP=true for an http:// endpoint). With S3, each replica keeps
    /// local copies in its data dir, fetched on first use.
    #[arg(long, value_name = "URL")]
    blobs: Option<BlobsUrl>,
    /// Serve a non-loopback address without API keys (anyone who can reach it can use it).
    #[arg(long)]
    allow_unauthenticated: bool,
    /// A price catalog (TOML) that overrides or extends the built-in one.
    #[arg(long)]
    prices: Option<PathBuf>,
    /// Threads for the forward pass of each model (default: available cores).
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Threads for fine-tuning jobs (one job runs at a time; default: available cores).
    #[arg(long)]
    train_threads: Option<usize>,
    /// Run no fine-tuning worker: this replica answers the job endpoints and serves the
    /// fine-tuned models, and the replicas with a worker (sharing its --store and --blobs)
    /// train.
    #[arg(long)]
    no_worker: bool,
    /// Seconds a worker's lease on a running job lasts (renewed every third of it): a job
    /// whose replica died continues on another once its lease runs out.
    #[arg(long, value_name = "SECONDS", default_value_t = ferrolm_server::tuner::DEFAULT_LEASE.as_secs_f64(), value_parser = parse_lease)]
    job_lease: f64,
    /// KV cache size in tokens per model, shared by its requests in flight (rounded up to
    /// blocks of 16). One request holds at most this many tokens, and at most the model's
    /// context.
    #[arg(long, default_value_t = 8192)]
    ctx: usize,
    /// KV cache size in blocks of 16 tokens (overrides --ctx).
    #[arg(long)]
    kv_blocks: Option<usize>,
    /// KV cache size in bytes per model, e.g. `512MiB`, `2GB` (overrides --ctx and --kv-blocks
    /// for the pool; one request still holds at most the model's context, and --ctx still
    /// decides a LongRoPE model's factors). The pool holds as many tokens as fit in the model's
    /// --kv-type: q8_0 about 1.9× and q4_0 about 3.6× as many as f16.
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    kv_memory: Option<u64>,
    /// The KV cache type of every model (a config `[[model]]` may set its own `kv_type`).
    #[command(flatten)]
    kv: KvArgs,
    /// Most tokens computed in one engine step (prefill chunks + decode tokens of all requests).
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// Most requests generating at once per model; later ones wait in the queue.
    #[arg(long, default_value_t = 16)]
    max_running: usize,
    /// Prompt lookup decoding for greedy requests (temperature 0): verify up to K draft tokens
    /// per request and step, copied from where its last 1–3 tokens occurred earlier in its
    /// prompt or output (as many as the match is long, more while drafts keep being accepted;
    /// 0: off). The output stays token for token the same; it pays when
    /// replies copy from the prompt. A config `[[model]]` may set its own `lookup`.
    #[arg(long, value_name = "K", default_value_t = 0)]
    lookup: usize,
    /// Speculative decoding for greedy requests with a draft model: a smaller GGUF model (or
    /// model name) with the same vocabulary as every served model proposes --draft-tokens
    /// tokens per step, verified in one forward pass; output unchanged. Not with --lookup.
    #[arg(long, value_name = "MODEL", conflicts_with = "lookup")]
    draft: Option<PathBuf>,
    /// Tokens the --draft model proposes per request and step.
    #[arg(long, value_name = "K", default_value_t = 4)]
    draft_tokens: usize,
    /// Most requests waiting per model beyond --max-running; past it, 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// A conversation longer than the context: `error` (a 400 saying by how much),
    /// `middle-out` (drop the oldest turns after the system prompt until it fits) or
    /// `summarize` (the model condenses the oldest ~70% of the turns into a system note, cached
    /// for the conversation's next request). The response header `x-ferrolm-context` says what
    /// was done. Requests may choose with the `context_strategy` field; a model's config entry
    /// may set its own.
    #[arg(long, default_value = "error")]
    context_strategy: ferrolm_server::compress::Strategy,
    /// Apply the context strategy (when not `error`) once prompt + reply would pass this
    /// fraction of the context, in (0, 1] (1: only when it would overflow).
    #[arg(long, default_value_t = 1.0)]
    context_trigger: f64,
    /// How tool definitions go into the prompt: `eager` (every definition, in full) or `lazy`
    /// (past --lazy-tools-threshold: each tool's name and one-line description, plus a
    /// `load_tools` function; when the model calls it, the server adds the definitions it asked
    /// for and goes on generating in the same request, unseen by the client). Requests may
    /// choose with the `tool_strategy` field; a model's config entry may set its own. The prompt
    /// tokens it saved are in the usage ledger (`ferrolm usage --savings`).
    #[arg(long, default_value = "eager")]
    tool_strategy: ferrolm_server::tools::Strategy,
    /// When lazy tool loading starts: more tools than N (`8`), or tool definitions longer than
    /// N tokens (`1500tokens`). Requests may set `lazy_tools_threshold`.
    #[arg(long, value_name = "N|Ntokens", default_value = "8")]
    lazy_tools_threshold: ferrolm_server::tools::Threshold,
    /// Serve a LoRA adapter on a model: `NAME=PATH` (on the first model) or `BASE:NAME=PATH`,
    /// where PATH is a PEFT adapter directory or a `ferrolm finetune` run. Clients name it
    /// `BASE:NAME` (or `NAME`); base and adapter requests share one batch and one copy of the
    /// weights. Repeatable. More load at runtime with POST /v1/load_lora_adapter.
    #[arg(long, value_name = "[BASE:]NAME=PATH")]
    lora: Vec<String>,
    /// A directory API-key holders may load adapters from at runtime (POST
    /// /v1/load_lora_adapter; relative `lora_path`s are looked up here). Without keys, any
    /// local path loads. Repeatable.
    #[arg(long, value_name = "DIR")]
    lora_dir: Vec<PathBuf>,
    /// An embedding model to serve beside the chat models, for POST /v1/embeddings and POST
    /// /api/embed: a catalog name (`all-minilm-l6-v2`, installed on first use) or a
    /// sentence-transformers BERT directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "NAME|DIR")]
    embedding_model: Option<PathBuf>,
    /// Close a connection whose request head has not fully arrived within this many seconds:
    /// counted from the connection's opening and again from the end of each response, so it
    /// cuts both idle keep-alive connections and slowly sent headers (slowloris).
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    header_timeout: f64,
    /// Most client connections open at once; further ones wait in the listen queue until one
    /// closes.
    #[arg(long, value_name = "N", default_value_t = 512)]
    max_connections: usize,
    /// Keep every chat completion, as if each request sent `store: true` (one that sends
    /// `store: false` is not kept): for capturing a teacher's traffic, an upstream provider's
    /// included, for `ferrolm data export --stored`. Read them back with GET
    /// /v1/chat/completions.
    #[arg(long)]
    store_all: bool,
    /// Forget stored chat completions older than N days (default: keep them until deleted).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    store_retention_days: Option<u32>,
}

/// A byte size: a number with an optional unit, `B`, `KB`/`MB`/`GB` (powers of 1000) or
/// `KiB`/`MiB`/`GiB` (powers of 1024), e.g. `512MiB`, `1.5GB`, `100000000`.
fn parse_bytes(v: &str) -> Result<u64, String> {
    let t = v.trim();
    let split = t
        .find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000 * 1000,
        "gb" => 1000 * 1000 * 1000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        u => {
            return Err(format!(
                "`{v}`: unknown unit `{u}`: use B, KB, MB, GB, KiB, MiB or GiB"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{v}`: give a size such as 512MiB or 2GB"))?;
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 / 2.0 {
        return Err(format!("`{v}`: too large"));
    }
    Ok(bytes as u64)
}

/// One `--lora` value: (base id if given, name, path).
fn parse_lora(v: &str) -> Result<(Option<String>, String, PathBuf)> {
    let Some((who, path)) = v.split_once('=') else {
        bail!("--lora {v:?}: give NAME=PATH or BASE:NAME=PATH");
    };
    let (base, name) = match who.rsplit_once(':') {
        Some((b, n)) => (Some(b.to_owned()), n),
        None => (None, who),
    };
    if name.is_empty() || path.is_empty() {
        bail!("--lora {v:?}: give NAME=PATH or BASE:NAME=PATH");
    }
    Ok((base, name.to_owned(), PathBuf::from(path)))
}

/// The config file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    model: Vec<ModelEntry>,
    #[serde(default)]
    router: Vec<RouterEntry>,
    #[serde(default)]
    cache_scope: Vec<CacheScopeEntry>,
}

/// Keys that share one prefix cache (by default each key has its own, so that no key can learn
/// another's prompts from `cached_tokens` or a faster first token).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheScopeEntry {
    name: String,
    /// Key names (`ferrolm keys create --name`).
    keys: Vec<String>,
}

/// `[[cache_scope]]` entries → key name → scope name; a key in two scopes is an error.
fn cache_scopes(entries: &[CacheScopeEntry]) -> Result<std::collections::HashMap<String, String>> {
    let mut map = std::collections::HashMap::new();
    for e in entries {
        if e.name.is_empty() {
            bail!("a [[cache_scope]] has an empty `name`: give each scope a name");
        }
        for k in &e.keys {
            if let Some(was) = map.insert(k.clone(), e.name.clone()) {
                bail!("key `{k}` is in two cache scopes, `{was}` and `{}`: a key shares its prefix cache with one scope at most", e.name);
            }
        }
    }
    Ok(map)
}

/// A virtual model that routes chat requests to the cheapest tier that can take them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouterEntry {
    id: String,
    tier: Vec<TierEntry>,
}

/// One tier, cheapest first; the last one takes anything.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierEntry {
    /// A served model's id or alias.
    model: String,
    /// Prompts longer than this go to a later tier (default: no limit).
    max_prompt_tokens: Option<usize>,
    /// Does this tier take requests with tools / JSON output / code? (default: yes)
    #[serde(default = "yes")]
    tools: bool,
    #[serde(default = "yes")]
    json: bool,
    #[serde(default = "yes")]
    code: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelEntry {
    /// A local GGUF file (or "default"); or else `upstream`.
    path: Option<String>,
    /// An OpenAI-compatible server's base URL, e.g. `https://openrouter.ai/api/v1`.
    upstream: Option<String>,
    /// The model's name there (default: `id`).
    upstream_model: Option<String>,
    /// The environment variable holding the upstream's API key.
    api_key_env: Option<String>,
    id: Option<String>,
    #[serde(default)]
    aliases: Vec<String>,
    price: Option<String>,
    context_strategy: Option<ferrolm_server::compress::Strategy>,
    tool_strategy: Option<ferrolm_server::tools::Strategy>,
    lazy_tools_threshold: Option<ferrolm_server::tools::Threshold>,
    /// The model's KV cache type (default: --kv-type).
    kv_type: Option<String>,
    /// Prompt lookup draft tokens per step (default: --lookup).
    lookup: Option<usize>,
}

/// The id clients use: the file name up to its first dot, lowercased
/// (`SmolLM2-135M-Instruct.Q4_1.gguf` → `smollm2-135m-instruct`).
fn model_id(file_name: &str) -> String {
    file_name
        .split('.')
        .next()
        .unwrap_or(file_name)
        .to_lowercase()
}

fn read_config(path: &Path) -> Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let cfg: ConfigFile = toml::from_str(&text)
        .with_context(|| format!("{}: not a valid ferrolm serve config", path.display()))?;
    if cfg.model.is_empty() {
        bail!(
            "{}: no [[model]] entries: add one with at least `path = \"...\"`",
            path.display()
        );
    }
    Ok(cfg)
}

/// Check the routers against the served models' names.
fn routers(
    entries: &[RouterEntry],
    served: &[ServedModel],
    upstreams: &[Upstream],
) -> Result<Vec<Router>> {
    let named = |name: &str| -> Option<String> {
        served
            .iter()
            .find(|m| {
                m.id.eq_ignore_ascii_case(name)
                    || m.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
            })
            .map(|m| m.id.clone())
            .or_else(|| {
                upstreams
                    .iter()
                    .find(|u| u.answers_to(name))
                    .map(|u| u.id.clone())
            })
    };
    let mut out: Vec<Router> = Vec::new();
    for r in entries {
        if named(&r.id).is_some() || out.iter().any(|o| o.id.eq_ignore_ascii_case(&r.id)) {
            bail!(
                "router `{}`: the name is already a model's or another router's: pick another `id`",
                r.id
            );
        }
        if r.tier.is_empty() {
            bail!("router `{}` has no [[router.tier]] entries", r.id);
        }
        let mut tiers = Vec::with_capacity(r.tier.len());
        for t in &r.tier {
            let Some(m) = named(&t.model) else {
                bail!(
                    "router `{}`: tier model `{}` is not served here (served: {})",
                    r.id,
                    t.model,
                    served
                        .iter()
                        .map(|m| m.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            tiers.push(Tier {
                model: m,
                max_prompt_tokens: t.max_prompt_tokens,
                tools: t.tools,
                json: t.json,
                code: t.code,
            });
        }
        out.push(Router {
            id: r.id.clone(),
            tiers,
        });
    }
    Ok(out)
}

/// The models to serve, in order (the first answers requests that name none).
/// An `upstream` config entry → the proxy for it.
fn upstream_of(e: &ModelEntry, url: &str, catalog: &PriceCatalog) -> Result<Upstream> {
    let Some(id) = e.id.clone() else {
        bail!("the [[model]] entry with upstream = {url:?} needs an `id` (the name clients use)");
    };
    if e.path.is_some() {
        bail!("model `{id}`: give either `path` (a local GGUF) or `upstream`, not both");
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("model `{id}`: upstream = {url:?} is not an http(s) URL");
    }
    let api_key = match &e.api_key_env {
        Some(var) => Some(std::env::var(var).with_context(|| {
            format!("model `{id}`: the environment variable {var} (api_key_env) is not set")
        })?),
        None => None,
    };
    let price_id = e.price.as_deref().unwrap_or(&id);
    let price = catalog.get(price_id).cloned();
    if price.is_none() {
        eprintln!("ferrolm serve: `{price_id}` has no entry in the price catalog: requests to `{id}` are recorded at $0");
    }
    Upstream::new(
        id.clone(),
        e.aliases.clone(),
        url.to_owned(),
        e.upstream_model.clone().unwrap_or(id),
        api_key,
        price,
    )
    .map_err(anyhow::Error::msg)
}

fn model_entries(a: &ServeArgs, cfg: &ConfigFile) -> Result<Vec<ModelEntry>> {
    let local = |path: String| ModelEntry {
        path: Some(path),
        upstream: None,
        upstream_model: None,
        api_key_env: None,
        id: None,
        aliases: Vec::new(),
        price: None,
        context_strategy: None,
        tool_strategy: None,
        lazy_tools_threshold: None,
        kv_type: None,
        lookup: None,
    };
    let mut entries: Vec<ModelEntry> = a
        .model
        .iter()
        .map(|p| local(p.to_string_lossy().into_owned()))
        .collect();
    entries.extend(cfg.model.iter().cloned());
    if entries.is_empty() {
        entries.push(local("default".into()));
    }
    Ok(entries)
}

/// Load one model and start its engine; also returns the model's file.
fn start_model(
    e: &ModelEntry,
    a: &ServeArgs,
    cfg: &EngineConfig,
    catalog: &PriceCatalog,
) -> Result<(ServedModel, EngineHandle, PathBuf)> {
    let path = e
        .path
        .as_deref()
        .filter(|p| *p != "default")
        .map(PathBuf::from);
    // One request holds at most the KV pool: a LongRoPE model whose pool is past its
    // original context takes its long factors (as llama-server does for its context).
    let context = a.kv_blocks.map_or(a.ctx, |b| b * 16);
    let m = load_for_context(&ModelArgs { model: path }, Some(context))?;
    let file_name = m
        .path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let meta = std::fs::metadata(&m.path)
        .with_context(|| format!("{}: cannot read the file's metadata", m.path.display()))?;
    let created = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let id = e.id.clone().unwrap_or_else(|| model_id(&file_name));
    let price_id = e.price.as_deref().unwrap_or(&id);
    let price = catalog.get(price_id).cloned();
    if price.is_none() {
        eprintln!(
            "ferrolm serve: `{price_id}` has no entry in the price catalog: its requests are recorded at $0; add one with --prices FILE (see `ferrolm keys --help`)"
        );
    }
    let c = m.model.cfg().clone();
    let mut cfg = cfg.clone();
    if let Some(t) = &e.kv_type {
        cfg.kv_type = t
            .parse()
            .map_err(|m| anyhow::anyhow!("model `{id}`: kv_type: {m}"))?;
    }
    cfg.kv_type
        .check(&c)
        .with_context(|| format!("model `{id}`"))?;
    if let Some(k) = e.lookup {
        cfg.lookup = k;
    }
    let per_block = cfg.kv_type.bytes_per_token(&c) * cfg.block_size;
    if let Some(bytes) = a.kv_memory {
        cfg.num_blocks = (bytes / per_block as u64) as usize;
        if cfg.num_blocks == 0 {
            bail!(
                "model `{id}`: --kv-memory {bytes} bytes holds no block of {} tokens ({per_block} bytes in {}): give at least {per_block}",
                cfg.block_size,
                cfg.kv_type
            );
        }
    }
    let kv_bytes = cfg.num_blocks * per_block;
    // As Ollama's `quantization_level`: llama.cpp's file type, else the dominant tensor type.
    let quantization = crate::store::quant_name(&m.gguf);
    let details = ModelDetails {
        architecture: m.gguf.architecture()?.to_owned(),
        parameter_count: m.model.n_params() as u64,
        quantization,
        context_length: c.context_length,
        embedding_length: c.dim,
        block_count: c.n_layers,
        head_count: c.n_heads,
        head_count_kv: c.n_kv_heads,
        memory_bytes: (m.model.weight_bytes() + kv_bytes) as u64,
        quantize_receipt: crate::quantize::receipt_json(&m.gguf),
    };
    let end_ids = m.end_ids();
    let path = m.path.clone();
    let tok = Arc::new(m.tok);
    let mut engine = Engine::new(Arc::new(m.model), tok.clone(), cfg.clone())
        .with_context(|| format!("model `{id}`"))?;
    if let Some(draft) = &a.draft {
        if a.draft_tokens == 0 {
            bail!("--draft-tokens must be at least 1");
        }
        let d = load_for_context(
            &ModelArgs {
                model: Some(draft.clone()),
            },
            Some(context),
        )
        .with_context(|| format!("--draft {}", draft.display()))?;
        engine = engine
            .with_draft(Arc::new(d.model), a.draft_tokens)
            .with_context(|| format!("model `{id}`: --draft {}", draft.display()))?;
    }
    let stats = engine.stats();
    let handle = ferrolm_engine::spawn(engine).context("could not start the engine thread")?;
    let served = ServedModel {
        id,
        aliases: e.aliases.clone(),
        file_name,
        file_size: meta.len(),
        created,
        vocab_size: c.vocab_size,
        max_context: c.context_length.min(cfg.num_blocks * cfg.block_size),
        details,
        end_ids,
        template: Arc::new(m.template),
        tok,
        engine: handle.tx.clone(),
        stats,
        max_running: cfg.max_running,
        max_queue: a.max_queue,
        context_strategy: e.context_strategy.unwrap_or(a.context_strategy),
        context_trigger: a.context_trigger,
        tool_strategy: ferrolm_server::tools::ToolStrategy {
            strategy: e.tool_strategy.unwrap_or(a.tool_strategy),
            threshold: e.lazy_tools_threshold.unwrap_or(a.lazy_tools_threshold),
        },
        price,
        adapter: None,
        parent: None,
    };
    Ok((served, handle, path))
}

/// How a fine-tuning run directory becomes a served model: a LoRA run loads as its base with
/// the adapter folded in, priced as its base (`ft:<base>:…`). Its engine thread ends when the
/// server's state is dropped, as the others do.
fn run_loader(a: &ServeArgs, cfg: &EngineConfig, catalog: &PriceCatalog) -> Box<Load> {
    let (a, cfg, catalog) = (a.clone(), cfg.clone(), catalog.clone());
    Box::new(move |dir: &Path, id: &str| {
        let entry = ModelEntry {
            path: Some(dir.to_string_lossy().into_owned()),
            upstream: None,
            upstream_model: None,
            api_key_env: None,
            id: Some(id.to_owned()),
            aliases: Vec::new(),
            price: id.split(':').nth(1).map(str::to_owned),
            context_strategy: None,
            tool_strategy: None,
            lazy_tools_threshold: None,
            kv_type: None,
            lookup: None,
        };
        let (m, handle, _) =
            start_model(&entry, &a, &cfg, &catalog).map_err(|e| format!("{e:#}"))?;
        drop(handle.tx); // detached: `m.engine` is its sender
        Ok(m)
    })
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.max_batch_tokens == 0 || a.max_running == 0 {
        bail!("--max-batch-tokens and --max-running must be at least 1");
    }
    if !(a.context_trigger > 0.0 && a.context_trigger <= 1.0) {
        bail!(
            "--context-trigger is {}: give a fraction of the context in (0, 1], e.g. 0.8",
            a.context_trigger
        );
    }
    if !(a.header_timeout.is_finite() && a.header_timeout > 0.0 && a.header_timeout <= 86_400.0) {
        bail!(
            "--header-timeout {}: give seconds, more than 0 and at most 86400",
            a.header_timeout
        );
    }
    if a.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    let limits = ferrolm_server::ConnLimits {
        header_timeout: std::time::Duration::from_secs_f64(a.header_timeout),
        max_connections: a.max_connections,
    };
    let block_size = EngineConfig::default().block_size;
    let num_blocks = match a.kv_blocks {
        Some(0) => bail!("--kv-blocks must be at least 1"),
        Some(n) => n,
        None if a.ctx == 0 => bail!("--ctx must be at least 1"),
        None => a.ctx.div_ceil(block_size),
    };
    let data_dir = crate::keys::data_dir(a.data_dir.as_deref())?;
    let store_url = crate::keys::store_url(a.store.as_deref(), Some(&data_dir))?;
    let db = Store::open_url(&store_url)
        .with_context(|| format!("cannot open the store {}", crate::keys::shown(&store_url)))?;
    if a.no_worker && !db.is_shared() {
        // Jobs are claimed only by workers on this store; a SQLite file is one machine's.
        eprintln!(
            "ferrolm serve: warning: --no-worker on the SQLite store {}: this server never trains, so fine-tuning jobs created through it stay queued until a `ferrolm serve` without --no-worker runs on the same file. Leave --no-worker out, or share jobs between machines with --store postgres://… (and --blobs s3://…)",
            crate::keys::shown(&store_url)
        );
    }
    let has_keys = db.has_keys()?;
    if !a.host.is_loopback() && !has_keys && !a.allow_unauthenticated {
        bail!(
            "refusing to listen on {} without API keys: anyone on the network could use the server. Create a key first (`ferrolm keys create --data-dir {} --name NAME`), or pass --allow-unauthenticated",
            a.host,
            data_dir.display()
        );
    }
    let catalog = PriceCatalog::load(a.prices.as_deref())?;
    if a.kv_memory == Some(0) {
        bail!("--kv-memory must be more than 0 bytes");
    }
    let cfg = EngineConfig {
        block_size,
        num_blocks,
        kv_type: a.kv.kv_type,
        max_batch_tokens: a.max_batch_tokens,
        max_running: a.max_running,
        threads: threads(a.threads)?,
        lookup: a.lookup,
    };
    let cfg_file = match &a.config {
        Some(c) => read_config(c)?,
        None => ConfigFile::default(),
    };
    let entries = model_entries(&a, &cfg_file)?;
    let mut served = Vec::with_capacity(entries.len());
    let mut upstreams: Vec<Upstream> = Vec::new();
    let mut handles = Vec::with_capacity(entries.len());
    let mut bases: Vec<(String, PathBuf)> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let mut claim = |id: &str, aliases: &[String]| -> Result<()> {
        for name in std::iter::once(id).chain(aliases.iter().map(String::as_str)) {
            if names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                bail!(
                    "two models are both called `{name}`: give one another `id` in the config file"
                );
            }
            names.push(name.to_owned());
        }
        Ok(())
    };
    for e in &entries {
        if let Some(url) = &e.upstream {
            let u = upstream_of(e, url, &catalog)?;
            claim(&u.id, &u.aliases)?;
            upstreams.push(u);
            continue;
        }
        if e.path.is_none() {
            bail!("a [[model]] entry needs `path` (a local GGUF, or \"default\") or `upstream` (a URL)");
        }
        let (m, h, path) = start_model(e, &a, &cfg, &catalog)?;
        claim(&m.id, &m.aliases)?;
        bases.push((m.id.clone(), path.canonicalize().unwrap_or(path)));
        served.push(m);
        handles.push(h);
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ferrolm-http")
        .build()
        .context("could not start the async runtime")?;
    let blobs_url = a
        .blobs
        .clone()
        .unwrap_or_else(|| BlobsUrl::Dir(data_dir.clone()));
    let blobs = Blobs::open(&blobs_url, &data_dir, rt.handle().clone())?;
    rt.block_on(blobs.check())
        .context("the blob store (--blobs) is not usable")?;
    let addr = SocketAddr::new(a.host, a.port);
    let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).with_context(|| {
        format!("cannot listen on {addr}: is another server using the port? pick another with --port")
    })?;
    let local = listener.local_addr()?;
    let ids: Vec<String> = served
        .iter()
        .map(|m| m.id.clone())
        .chain(upstreams.iter().map(|u| format!("{} (upstream)", u.id)))
        .collect();
    println!(
        "ferrolm serve: {} on http://{local} (OpenAI: /v1, Ollama: /api); {}; Ctrl-C stops",
        ids.join(", "),
        if has_keys {
            "API keys required".to_owned()
        } else if a.host.is_loopback() {
            "no API keys yet, so loopback clients need none".to_owned()
        } else {
            "WITHOUT authentication".to_owned()
        }
    );
    let access = Access {
        store: db,
        open_without_keys: a.host.is_loopback() || a.allow_unauthenticated,
        cache_scopes: cache_scopes(&cfg_file.cache_scope)?,
        completions: ferrolm_server::stored::Policy {
            store_all: a.store_all,
            retention_days: a.store_retention_days,
        },
    };
    let routers = routers(&cfg_file.router, &served, &upstreams)?;
    let loader = run_loader(&a, &cfg, &catalog);
    let first = served.first().map(|m| m.id.clone());
    let embedding = match &a.embedding_model {
        Some(m) => Some(embedding_model(m, &served, &catalog)?),
        None => None,
    };
    let state = AppState::new(served, upstreams, routers, access, catalog);
    if let Some(e) = embedding {
        println!(
            "ferrolm serve: embedding model {} ({} dimensions, at most {} tokens per input) from {}",
            e.id,
            e.embedder.dim(),
            e.embedder.max_tokens(),
            e.embedder.model_dir().display()
        );
        state.enable_embeddings(e).map_err(anyhow::Error::msg)?;
    }
    let mut roots = Vec::with_capacity(a.lora_dir.len());
    for d in &a.lora_dir {
        roots.push(
            d.canonicalize()
                .with_context(|| format!("--lora-dir {}: no such directory", d.display()))?,
        );
    }
    let adapter_bases = bases.clone();
    state
        .enable_adapters(AdapterLoading {
            load: Arc::new(move |dir: &Path, base: &str, name: &str| {
                let (_, file) = adapter_bases
                    .iter()
                    .find(|(id, _)| id == base)
                    .ok_or_else(|| format!("`{base}` is not a local model of this server"))?;
                ferrolm_train::peft::load_for_serving(dir, file, name).map_err(|e| e.to_string())
            }),
            roots,
            timeout: std::time::Duration::from_secs(60),
        })
        .map_err(anyhow::Error::msg)?;
    for v in &a.lora {
        let (base, name, path) = parse_lora(v)?;
        let Some(base) = base.or_else(|| first.clone()) else {
            bail!("--lora {v:?}: no local model to put it on");
        };
        let base = state
            .model(None, Some(&base))
            .map_err(|e| anyhow::anyhow!("--lora {v}: {}", e.message))?
            .id
            .clone();
        let id = format!("{base}:{name}");
        let adapter = state
            .read_adapter(&path, &base, &id)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("--lora {v}"))?;
        let bytes = adapter.memory_bytes();
        state
            .add_adapter(&base, id.clone(), vec![name], adapter, None)
            .map_err(|e| anyhow::anyhow!("--lora {v}: {}", e.message))?;
        println!(
            "ferrolm serve: adapter {id} ({} KiB) from {}",
            bytes / 1024,
            path.display()
        );
    }
    let hooks = crate::tuning::hooks(bases, threads(a.train_threads)?, loader)?;
    let worker_lease = (!a.no_worker).then(|| std::time::Duration::from_secs_f64(a.job_lease));
    state
        .start_fine_tuning(hooks, &data_dir, blobs, worker_lease)
        .map_err(anyhow::Error::msg)
        .context("cannot start fine-tuning")?;
    let served = rt.block_on(ferrolm_server::serve(
        listener,
        state.clone(),
        ferrolm_server::shutdown_signal(),
        limits,
    ));
    // A running job stops with a checkpoint (the next start resumes it); the worker lets go
    // of the state.
    state.stop_fine_tuning();
    drop(state);
    served.context("the HTTP server failed")?;
    eprintln!("ferrolm serve: stopped");
    // The state (and with it the last command senders) is gone: the engine threads end.
    drop(rt);
    for h in handles {
        drop(h.tx);
        h.join
            .join()
            .map_err(|_| anyhow::anyhow!("an engine thread panicked"))?;
    }
    Ok(())
}

/// `--job-lease`: a number of seconds, at least 1 (renewals every third of it must reach the
/// store in time).
fn parse_lease(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (1.0..=86_400.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "`{s}` is not a lease: give seconds from 1 to 86400, e.g. 30"
        )),
    }
}

/// `--embedding-model`: load it, named by its catalog name (with Ollama's and Hugging Face's
/// names as aliases) or its directory's name.
fn embedding_model(
    m: &Path,
    served: &[ServedModel],
    catalog: &PriceCatalog,
) -> Result<ferrolm_server::embeddings::EmbeddingModel> {
    let dir = crate::store::resolve_embedding(m)?;
    let embedder = ferrolm_engine::Embedder::load(&dir)
        .with_context(|| format!("--embedding-model {}", m.display()))?;
    // A catalog name, or the catalog model's directory given by path, is named as in the
    // catalog.
    let known = m.to_str().and_then(crate::store::entry).or_else(|| {
        let f = dir.file_name()?.to_str()?;
        crate::store::CATALOG.iter().find(|e| e.file == f)
    });
    let (id, aliases) = match known {
        Some(e) if e.name == "all-minilm-l6-v2" => (
            e.name.to_owned(),
            vec![
                "all-minilm".to_owned(),
                "all-MiniLM-L6-v2".to_owned(),
                "sentence-transformers/all-MiniLM-L6-v2".to_owned(),
            ],
        ),
        Some(e) => (e.name.to_owned(), Vec::new()),
        None => (
            dir.file_name().map_or_else(
                || "embedding".to_owned(),
                |f| f.to_string_lossy().into_owned(),
            ),
            Vec::new(),
        ),
    };
    for name in std::iter::once(&id).chain(&aliases) {
        if served.iter().any(|s| {
            s.id.eq_ignore_ascii_case(name)
                || s.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
        }) {
            bail!("the embedding model's name `{name}` is also a chat model's: rename one in the config file");
        }
    }
    let price = catalog.get(&id).cloned();
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(ferrolm_server::embeddings::EmbeddingModel::new(
        id, aliases, embedder, price, created,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_config_parses() {
        let cfg: ConfigFile = toml::from_str(include_str!("../../../docs/serve.example.toml"))
            .unwrap_or_else(|e| panic!("docs/serve.example.toml: {e}"));
        assert_eq!(cfg.model.len(), 2);
        assert_eq!(cfg.router.len(), 1);
        assert!(cfg.model[1].upstream.is_some());
        assert_eq!(cfg.model[0].kv_type.as_deref(), Some("q8_0"));
        assert_eq!(cfg.model[0].lookup, Some(8));
    }

    #[test]
    fn kv_memory_sizes_parse() {
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("1.5 KiB"), Ok(1536));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("12 parsecs")
            .expect_err("no unit")
            .contains("unknown unit"));
        assert!(parse_bytes("MiB")
            .expect_err("no number")
            .contains("512MiB"));
    }
}
