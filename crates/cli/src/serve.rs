//! `ferrolm serve`: load the model, start the engine thread, serve HTTP until Ctrl-C/SIGTERM,
//! then let the requests in flight finish and stop the engine.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferrolm_engine::{Engine, EngineConfig};
use ferrolm_server::{AppState, ServedModel};

use crate::{load, threads, ModelArgs};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on. Anything but loopback exposes the API to the network, which has no
    /// authentication yet.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0: any free port; the URL printed says which).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Threads for the forward pass (default: available cores).
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// KV cache size in tokens, shared by all requests in flight (rounded up to blocks of 16).
    /// One request holds at most this many tokens, and at most the model's context.
    #[arg(long, default_value_t = 8192)]
    ctx: usize,
    /// KV cache size in blocks of 16 tokens (overrides --ctx).
    #[arg(long)]
    kv_blocks: Option<usize>,
    /// Most tokens computed in one engine step (prefill chunks + decode tokens of all requests).
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// Most requests generating at once; later ones wait in the queue.
    #[arg(long, default_value_t = 16)]
    max_running: usize,
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

pub fn run(a: ServeArgs) -> Result<()> {
    if a.max_batch_tokens == 0 || a.max_running == 0 {
        bail!("--max-batch-tokens and --max-running must be at least 1");
    }
    let block_size = EngineConfig::default().block_size;
    let num_blocks = match a.kv_blocks {
        Some(0) => bail!("--kv-blocks must be at least 1"),
        Some(n) => n,
        None if a.ctx == 0 => bail!("--ctx must be at least 1"),
        None => a.ctx.div_ceil(block_size),
    };
    let m = load(&a.model)?;
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
    let end_ids = m.end_ids();
    let cfg = EngineConfig {
        block_size,
        num_blocks,
        max_batch_tokens: a.max_batch_tokens,
        max_running: a.max_running,
        threads: threads(a.threads)?,
    };
    let served = ServedModel {
        id: model_id(&file_name),
        file_name,
        file_size: meta.len(),
        created,
        vocab_size: m.model.cfg.vocab_size,
        max_context: m.model.cfg.context_length.min(num_blocks * block_size),
        end_ids,
        template: m.template,
        tok: Arc::new(m.tok),
    };
    let engine = Engine::new(Arc::new(m.model), served.tok.clone(), cfg)?;
    let handle = ferrolm_engine::spawn(engine).context("could not start the engine thread")?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ferrolm-http")
        .build()
        .context("could not start the async runtime")?;
    let addr = SocketAddr::new(a.host, a.port);
    let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).with_context(|| {
        format!("cannot listen on {addr}: is another server using the port? pick another with --port")
    })?;
    let local = listener.local_addr()?;
    if !a.host.is_loopback() {
        eprintln!(
            "warning: listening on {local}, which other machines can reach; the API has no authentication yet"
        );
    }
    println!(
        "ferrolm serve: {} on http://{local} (OpenAI: /v1, Ollama: /api); Ctrl-C stops",
        served.id
    );
    let state = AppState::new(served, handle.tx);
    rt.block_on(ferrolm_server::serve(
        listener,
        state,
        ferrolm_server::shutdown_signal(),
    ))
    .context("the HTTP server failed")?;
    eprintln!("ferrolm serve: stopped");
    // The state (and with it the last command sender) is gone: the engine thread ends.
    drop(rt);
    handle
        .join
        .join()
        .map_err(|_| anyhow::anyhow!("the engine thread panicked"))?;
    Ok(())
}
