//! Checkpoints: everything needed to resume exactly (STYLE 16), written so that a crash or a
//! full disk mid-write never costs the last good one.
//!
//! ```text
//! RUN_DIR/checkpoints/step-000500/model.safetensors      weights, Hugging Face Llama names
//!                                 optimizer.safetensors  AdamW moments (`m.NAME`, `v.NAME`)
//!                                 state.json             step, cursor, best val loss, …
//! RUN_DIR/latest                                         the name of the newest complete one
//! ```
//! A checkpoint is written into `checkpoints/.tmp-step-N`, every file fsynced, then the
//! directory is renamed into place and `latest` replaced atomically; old ones are pruned only
//! after that (`keep`).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;
use serde::{Deserialize, Serialize};

use crate::data::Batcher;
use crate::model::TensorSlot;
use crate::optim::AdamW;
use crate::TrainError;

/// The small part of the state (everything but tensors).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    /// The next step to run (= steps completed).
    pub step: u64,
    /// Whether the evaluation due at `step` (if any) has already run and been logged.
    pub evaluated: bool,
    pub best_val_loss: Option<f32>,
    pub batcher: Batcher,
    pub tokens_seen: u64,
    /// Training time so far, for the reported ms/iter.
    pub train_seconds: f64,
}

/// A checkpoint to write, borrowed from the training loop (nothing is copied).
#[derive(Clone, Copy)]
pub struct CheckpointRef<'a> {
    pub params: &'a [f32],
    pub opt: &'a AdamW,
    pub state: &'a TrainState,
}

/// A checkpoint in memory.
pub struct Checkpoint {
    pub params: Vec<f32>,
    pub opt: AdamW,
    pub state: TrainState,
}

fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Floats a buffer with these tensors holds.
pub fn buffer_len(tensors: &[TensorSlot]) -> usize {
    tensors
        .iter()
        .map(|t| t.offset + t.len())
        .max()
        .unwrap_or(0)
}

/// Write the named slices of `buffers` (same layout) as a safetensors file, streamed: the
/// JSON header, then each tensor's little-endian f32s straight from the buffer (no copy of the
/// model in memory, which for full fine-tuning would double its peak), then fsync.
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorSlot],
    buffers: &[(&str, &[f32])],
) -> Result<(), TrainError> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut at = 0usize;
    for (prefix, _) in buffers {
        for t in tensors {
            let end = at + 4 * t.len();
            header.insert(
                format!("{prefix}{}", t.name),
                serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [at, end]}),
            );
            at = end;
        }
    }
    let mut head = serde_json::to_string(&header)
        .unwrap_or_default()
        .into_bytes();
    // the data starts 8-byte aligned, padded with spaces as the format allows
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let io = TrainError::io(path);
    let file = File::create(path).map_err(TrainError::io(path))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut write = || -> std::io::Result<()> {
        w.write_all(&(head.len() as u64).to_le_bytes())?;
        w.write_all(&head)?;
        let mut chunk = Vec::with_capacity(1 << 16);
        for (_, buf) in buffers {
            for t in tensors {
                for part in buf[t.range()].chunks(1 << 14) {
                    chunk.clear();
                    chunk.extend(part.iter().flat_map(|x| x.to_le_bytes()));
                    w.write_all(&chunk)?;
                }
            }
        }
        w.flush()?;
        w.get_ref().sync_all()
    };
    write().map_err(io)
}

impl Checkpoint {
    pub fn as_ref(&self) -> CheckpointRef<'_> {
        CheckpointRef {
            params: &self.params,
            opt: &self.opt,
            state: &self.state,
        }
    }
}

/// Read the tensors named `prefix + layout name` from a safetensors file into one buffer.
pub fn read_safetensors(
    path: &Path,
    tensors: &[TensorSlot],
    prefix: &str,
) -> Result<Vec<f32>, TrainError> {
    let bytes = std::fs::read(path).map_err(TrainError::io(path))?;
    decode_safetensors(path, &bytes, tensors, prefix)
}

/// [`read_safetensors`] of a file's bytes already read (`path` names it in errors). The buffer
/// is reserved fallibly: a layout too large for this machine is an error, not an abort.
pub fn decode_safetensors(
    path: &Path,
    bytes: &[u8],
    tensors: &[TensorSlot],
    prefix: &str,
) -> Result<Vec<f32>, TrainError> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
    let n = buffer_len(tensors);
    let mut out = Vec::new();
    out.try_reserve_exact(n).map_err(|_| {
        bad(
            path,
            format!("{n} parameters do not fit in this machine's memory"),
        )
    })?;
    out.resize(n, 0f32);
    for t in tensors {
        let name = format!("{prefix}{}", t.name);
        let v = st.tensor(&name).map_err(|_| {
            bad(
                path,
                format!("tensor `{name}` is missing (was it written for another model config?)"),
            )
        })?;
        let floats = matches!(v.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16);
        if !floats || v.shape() != t.shape.as_slice() {
            return Err(bad(
                path,
                format!(
                    "tensor `{name}` is {:?} {:?}, expected F32 (or F16/BF16) {:?}",
                    v.dtype(),
                    v.shape(),
                    t.shape
                ),
            ));
        }
        let out = &mut out[t.range()];
        match v.dtype() {
            Dtype::F16 => {
                for (o, b) in out.iter_mut().zip(v.data().chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            Dtype::BF16 => {
                for (o, b) in out.iter_mut().zip(v.data().chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            _ => {
                for (o, b) in out.iter_mut().zip(v.data().chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        }
    }
    Ok(out)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let io = TrainError::io(path);
    let mut f = File::create(path).map_err(TrainError::io(path))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io)
}

fn sync_dir(dir: &Path) -> Result<(), TrainError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(TrainError::io(dir))
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Write a checkpoint for `ck.state.step`, point `latest` at it, and keep the newest `keep`.
/// Returns its directory.
pub fn save(
    run_dir: &Path,
    tensors: &[TensorSlot],
    ck: CheckpointRef,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let dir = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&dir).map_err(TrainError::io(&dir))?;
    let name = format!("step-{:06}", ck.state.step);
    let tmp = dir.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(TrainError::io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(TrainError::io(&tmp))?;
    write_safetensors(&tmp.join("model.safetensors"), tensors, &[("", ck.params)])?;
    let moments = [("m.", ck.opt.m.as_slice()), ("v.", ck.opt.v.as_slice())];
    write_safetensors(&tmp.join("optimizer.safetensors"), tensors, &moments)?;
    let state = serde_json::json!({ "train": ck.state, "adamw_step": ck.opt.step });
    write_synced(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(&state)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    sync_dir(&tmp)?;
    let final_dir = dir.join(&name);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(TrainError::io(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(TrainError::io(&final_dir))?;
    sync_dir(&dir)?;
    let latest = run_dir.join("latest");
    let latest_tmp = run_dir.join(".latest.tmp");
    write_synced(&latest_tmp, name.as_bytes())?;
    std::fs::rename(&latest_tmp, &latest).map_err(TrainError::io(&latest))?;
    sync_dir(run_dir)?;
    prune(&dir, keep)?;
    Ok(final_dir)
}

/// Remove all but the newest `keep` complete checkpoints (and stale temporaries).
fn prune(dir: &Path, keep: usize) -> Result<(), TrainError> {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(TrainError::io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
        })
        .collect();
    steps.sort();
    let excess = steps.len().saturating_sub(keep.max(1));
    for p in &steps[..excess] {
        std::fs::remove_dir_all(p).map_err(TrainError::io(p))?;
    }
    Ok(())
}

/// The newest complete checkpoint of a run, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>, TrainError> {
    let latest = run_dir.join("latest");
    match std::fs::read_to_string(&latest) {
        Ok(name) => {
            let p = checkpoints_dir(run_dir).join(name.trim());
            if !p.join("model.safetensors").is_file() {
                return Err(bad(
                    &latest,
                    format!("points at {}, which is missing", p.display()),
                ));
            }
            Ok(Some(p))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TrainError::Io {
            path: latest,
            source: e,
        }),
    }
}

/// Load the checkpoint in `dir` for `layout`.
pub fn load(dir: &Path, tensors: &[TensorSlot]) -> Result<Checkpoint, TrainError> {
    let params = read_safetensors(&dir.join("model.safetensors"), tensors, "")?;
    let opt_path = dir.join("optimizer.safetensors");
    let m = read_safetensors(&opt_path, tensors, "m.")?;
    let v = read_safetensors(&opt_path, tensors, "v.")?;
    let sp = dir.join("state.json");
    let text = std::fs::read_to_string(&sp).map_err(TrainError::io(&sp))?;
    #[derive(Deserialize)]
    struct Saved {
        train: TrainState,
        adamw_step: u64,
    }
    let s: Saved = serde_json::from_str(&text).map_err(|e| bad(&sp, e.to_string()))?;
    Ok(Checkpoint {
        params,
        opt: AdamW {
            m,
            v,
            step: s.adamw_step,
        },
        state: s.train,
    })
}
