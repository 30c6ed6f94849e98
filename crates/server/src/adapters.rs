//! Multi-LoRA serving: LoRA adapters on a served base model, each a model of its own to
//! clients (`<base>:<name>`, or a fine-tuned model's `ft:…` id) that shares the base's engine,
//! weights, KV pool and request queue. The engine applies each request's adapter to its own
//! rows of the shared batch and keeps its prefix-cache entries apart (see
//! `ferrolm_engine::Request::adapter`), so base and adapter requests batch together.
//!
//! Adapters load and unload at runtime with vLLM's endpoints:
//!
//! * `POST /v1/load_lora_adapter` `{"lora_name", "lora_path", "base_model"?}` reads a PEFT
//!   adapter directory (or a `ferrolm finetune` run) onto `base_model` (default: the first
//!   model) and serves it as `<base>:<lora_name>`, also answering to the bare `lora_name`.
//! * `POST /v1/unload_lora_adapter` `{"lora_name"}` stops serving it; requests already running
//!   finish with it (they hold the adapter).
//!
//! Who may load what: a server open without keys (loopback) trusts its caller as the CLI does
//! and reads any path; once keys exist, paths must lie under a `--lora-dir` the operator named
//! (checked on the path's text before the file system is asked anything, so the answer never
//! says whether a file outside exists), and an adapter loaded with a key is that key's alone, as
//! its fine-tuned models are: each key has its own adapter names, and another key may load an
//! adapter under the same name without learning that it exists.
//!
//! Adapter files may be hostile: the reader validates them against the base model before
//! allocating (`ferrolm_train::peft::load`), and a load runs on a thread of its own with a time
//! limit ([`AdapterLoading::timeout`]), so a stuck read can neither hang the request nor keep
//! the server from stopping.

use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use ferrolm_engine::Adapter;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::{parse, AppState, Model};

/// Read the adapter at a path for the served base model `base` (its id), naming it `name`.
/// Runs on a blocking thread; `Err` is a message for the client.
pub type LoadAdapter = dyn Fn(&Path, &str, &str) -> Result<Adapter, String> + Send + Sync;

/// How the server reads adapters: the binary's loader and where keyed callers may read from.
pub struct AdapterLoading {
    pub load: Arc<LoadAdapter>,
    /// Directories (canonical) under which callers with a key may load adapters.
    pub roots: Vec<PathBuf>,
    /// The longest a runtime load may take before the request gets a 504 (the reading thread
    /// is left to finish on its own; it holds nothing the server waits for).
    pub timeout: Duration,
}

/// `path` with `.` and `..` resolved on its text alone (`..` above the root stays at the root),
/// touching no file.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// A `lora_name`: what clients put after `<base>:`.
fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            format!("lora_name {name:?} must be 1 to 64 letters, digits, `-`, `_` or `.`"),
            Some("lora_name"),
        ))
    }
}

impl AppState {
    /// Let clients load adapters at runtime (and fine-tuning jobs serve theirs on the base).
    pub fn enable_adapters(&self, loading: AdapterLoading) -> Result<(), String> {
        self.adapters
            .set(loading)
            .map_err(|_| "adapter loading was already set up".to_owned())
    }

    /// Read the adapter at `path` for the base model `base` (blocking: file reads).
    pub fn read_adapter(&self, path: &Path, base: &str, name: &str) -> Result<Adapter, String> {
        let loading = self
            .adapters
            .get()
            .ok_or("this server was started without adapter support")?;
        (loading.load)(path, base, name)
    }

    /// Serve `adapter` on the base model `base` as the model `id` (with `aliases`), for `owner`
    /// only when given. The base must be a model every caller sees, served here, and not an
    /// adapter itself; the id and aliases must be free.
    pub fn add_adapter(
        &self,
        base: &str,
        id: String,
        aliases: Vec<String>,
        adapter: Adapter,
        owner: Option<i64>,
    ) -> Result<Arc<Model>, ApiError> {
        let mut models = self.models.write().unwrap_or_else(PoisonError::into_inner);
        let base_model = models
            .iter()
            .find(|m| m.owner.is_none() && m.adapter.is_none() && m.id.eq_ignore_ascii_case(base))
            .cloned()
            .ok_or_else(|| {
                let bases: Vec<&str> = models
                    .iter()
                    .filter(|m| m.owner.is_none() && m.adapter.is_none())
                    .map(|m| m.id.as_str())
                    .collect();
                ApiError::unknown_model(base, &bases)
            })?;
        // Names are per key: a key's adapter may share its name with another key's, never with
        // a model every caller sees (and an operator's adapter, seen by all, with none).
        let visible = |m: &Model| owner.is_none() || m.owner.is_none() || m.owner == owner;
        let taken = |name: &str| {
            models.iter().filter(|m| visible(m)).any(|m| {
                m.id.eq_ignore_ascii_case(name)
                    || m.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
            }) || self.routers.iter().any(|r| r.id.eq_ignore_ascii_case(name))
                || self.upstreams.iter().any(|u| u.answers_to(name))
        };
        if let Some(name) = std::iter::once(&id).chain(&aliases).find(|n| taken(n)) {
            return Err(ApiError {
                status: StatusCode::CONFLICT,
                ..ApiError::invalid(
                    format!("a model called `{name}` is already served: unload it first (POST /v1/unload_lora_adapter) or pick another lora_name"),
                    Some("lora_name"),
                )
            }
            .with_code("model_exists"));
        }
        let m = Arc::new(base_model.with_adapter(id, aliases, Arc::new(adapter), owner));
        models.push(m.clone());
        Ok(m)
    }

    /// Stop serving the adapter model called `name` (its id or an alias) for `key`.
    pub fn remove_adapter(&self, key: Option<i64>, name: &str) -> Result<Arc<Model>, ApiError> {
        let mut models = self.models.write().unwrap_or_else(PoisonError::into_inner);
        let pos = models.iter().position(|m| {
            (m.owner.is_none() || m.owner == key)
                && (m.id.eq_ignore_ascii_case(name)
                    || m.aliases.iter().any(|a| a.eq_ignore_ascii_case(name)))
        });
        let Some(pos) = pos else {
            let loaded: Vec<&str> = models
                .iter()
                .filter(|m| m.adapter.is_some() && (m.owner.is_none() || m.owner == key))
                .map(|m| m.id.as_str())
                .collect();
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                ..ApiError::invalid(
                    format!(
                        "no adapter `{name}` is loaded{}",
                        if loaded.is_empty() {
                            String::new()
                        } else {
                            format!(" (loaded: {})", loaded.join(", "))
                        }
                    ),
                    Some("lora_name"),
                )
            }
            .with_code("model_not_found"));
        };
        if models[pos].adapter.is_none() {
            return Err(ApiError::invalid(
                format!(
                    "`{name}` is a base model, not an adapter: only adapters unload at runtime"
                ),
                Some("lora_name"),
            ));
        }
        if models[pos].owner.is_none() && key.is_some() {
            // An operator's adapter (from --lora): keyed callers may use it, not remove it.
            return Err(ApiError {
                status: StatusCode::FORBIDDEN,
                kind: "permission_error",
                ..ApiError::invalid(
                    format!("`{name}` was loaded by the server's operator (--lora): restart the server without it to remove it"),
                    Some("lora_name"),
                )
            });
        }
        Ok(models.remove(pos))
    }

    /// Where a keyed caller's `lora_path` is allowed to point: under a `--lora-dir`. The
    /// directory is checked on the path's text first (403 whether or not a file is there), then
    /// the file is looked up, and its real path (links followed) must still be under the root.
    fn resolve_path(&self, caller: &Caller, asked: &str) -> Result<PathBuf, ApiError> {
        let roots = self
            .adapters
            .get()
            .map(|l| l.roots.as_slice())
            .unwrap_or_default();
        let asked_path = Path::new(asked);
        let mut candidates: Vec<PathBuf> = if asked_path.is_absolute() || roots.is_empty() {
            vec![asked_path.to_owned()]
        } else {
            roots.iter().map(|r| r.join(asked_path)).collect()
        };
        let listed = roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let outside = || ApiError {
            status: StatusCode::FORBIDDEN,
            kind: "permission_error",
            ..ApiError::invalid(
                if roots.is_empty() {
                    "this server does not load adapters for API keys: its operator can allow it with `ferrolm serve --lora-dir DIR`, and adapters under DIR can then be loaded".to_owned()
                } else {
                    format!(
                            "lora_path {asked:?} is outside the adapter directories this server loads from ({listed}): put the adapter there"
                        )
                },
                Some("lora_path"),
            )
        };
        if caller.key.is_some() {
            candidates.retain(|p| {
                let p = lexical(p);
                roots.iter().any(|r| p.starts_with(r))
            });
            if candidates.is_empty() {
                return Err(outside());
            }
        }
        let found = candidates.iter().find_map(|p| p.canonicalize().ok());
        let Some(path) = found else {
            return Err(ApiError::invalid(
                format!(
                    "lora_path {asked:?} does not exist on the server{}",
                    if roots.is_empty() {
                        String::new()
                    } else {
                        format!(" (relative paths are looked up under {listed})")
                    }
                ),
                Some("lora_path"),
            ));
        };
        if caller.key.is_some() && !roots.iter().any(|r| path.starts_with(r)) {
            // A link under a root that leads out of it.
            return Err(outside());
        }
        Ok(path)
    }
}

#[derive(Debug, Deserialize)]
struct LoadRequest {
    lora_name: String,
    lora_path: String,
    /// The base model's id (default: the first model).
    base_model: Option<String>,
}

#[derive(Debug, Deserialize)]
struct UnloadRequest {
    lora_name: String,
}

/// The model object of an adapter (OpenAI's, plus vLLM's `parent` and `root`).
pub(crate) fn adapter_object(m: &Model) -> Value {
    json!({
        "id": m.id,
        "object": "model",
        "created": m.created,
        "owned_by": "ferrolm",
        "parent": m.parent,
        "root": m.parent,
        "aliases": m.aliases,
    })
}

/// `POST /v1/load_lora_adapter`.
pub async fn load(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: LoadRequest = parse(&body)?;
    check_name(&req.lora_name)?;
    let key = caller.key_id();
    let base = match &req.base_model {
        Some(b) => s.model(key, Some(b))?,
        None => s.model(key, None)?,
    };
    if base.adapter.is_some() || base.owner.is_some() {
        return Err(ApiError::invalid(
            format!(
                "`{}` is an adapter or a fine-tuned model: give a base model as base_model{}",
                base.id,
                base.parent
                    .as_ref()
                    .map(|p| format!(" (its base is `{p}`)"))
                    .unwrap_or_default()
            ),
            Some("base_model"),
        ));
    }
    let path = s.resolve_path(&caller, &req.lora_path)?;
    let id = format!("{}:{}", base.id, req.lora_name);
    let Some(loading) = s.adapters.get() else {
        return Err(ApiError::invalid(
            "this server was started without adapter support",
            None,
        ));
    };
    // The thread gets the reader alone, not the server's state: a read that never ends must
    // not hold the engines' senders (the server waits for the engines when it stops).
    let (reader, timeout) = (loading.load.clone(), loading.timeout);
    let (base_id, name) = (base.id.clone(), id.clone());
    // A thread of its own, not tokio's blocking pool: the runtime waits for that pool when it
    // shuts down, so a read that never ends would keep the server from stopping.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ferrolm-adapter-load".into())
        .spawn(move || {
            let _ = tx.send(reader(&path, &base_id, &name));
        })
        .map_err(|e| {
            ApiError::server(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("could not start a thread to read the adapter ({e}): retry later"),
            )
        })?;
    let read = match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => {
            return Err(ApiError::server(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the adapter reader stopped without an answer (a bug in ferrolm: please report it)",
            ))
        }
        Err(_) => {
            return Err(ApiError::server(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "reading the adapter at {:?} took more than {} s: is it on a slow or stuck file system?",
                    req.lora_path,
                    timeout.as_secs()
                ),
            ))
        }
    };
    let adapter = read.map_err(|e| {
        ApiError::invalid(
            format!("the adapter at {:?} does not load: {e}", req.lora_path),
            Some("lora_path"),
        )
    })?;
    let m = s.add_adapter(&base.id, id, vec![req.lora_name], adapter, key)?;
    eprintln!(
        "ferrolm serve: {}: adapter `{}` loaded ({} KiB)",
        caller.request_id,
        m.id,
        m.details.memory_bytes / 1024
    );
    Ok(Json(adapter_object(&m)))
}

/// `POST /v1/unload_lora_adapter`.
pub async fn unload(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: UnloadRequest = parse(&body)?;
    let m = s.remove_adapter(caller.key_id(), &req.lora_name)?;
    eprintln!(
        "ferrolm serve: {}: adapter `{}` unloaded",
        caller.request_id, m.id
    );
    Ok(Json(
        json!({"id": m.id, "object": "model", "deleted": true}),
    ))
}
