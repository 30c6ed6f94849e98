//! LoRA adapters in Hugging Face PEFT's format, so PEFT loads ours and we load PEFT's:
//! `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` ([r, in]) and
//! `….lora_B.weight` ([out, r]).
//!
//! Row order: in memory the model is in GGUF's q/k row order (RoPE pairs interleaved); PEFT
//! adapters apply to Hugging Face weights, whose q/k rows are in rotate-half order. `ΔW = B·A`
//! permutes with its rows, i.e. with B's rows: q_proj/k_proj B matrices are reordered on save
//! and back on load ([`crate::base::hf_rows`]); A and every other matrix are unchanged.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

use crate::base::hf_rows;
use crate::lora::{Lora, LoraConfig, Target};
use crate::model::ModelConfig;
use crate::TrainError;

fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// The largest `lora_alpha / r` an adapter may have. PEFT adapters use about 0.5 to 64; a
/// scale far past that only turns the model's activations into infinities (every reply empty).
pub const MAX_LORA_SCALE: f32 = 1024.0;

/// The most bytes an `adapter_config.json` may have.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The bytes of `path`, which must be a regular file of at most `max` bytes. It is opened
/// without blocking (`O_NONBLOCK`), so a FIFO or device planted at the path is refused at once
/// instead of hanging the reader until a writer comes.
fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, TrainError> {
    let mut open = std::fs::OpenOptions::new();
    open.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut open, libc::O_NONBLOCK);
    let f = open.open(path).map_err(TrainError::io(path))?;
    let meta = f.metadata().map_err(TrainError::io(path))?;
    if !meta.is_file() {
        return Err(bad(
            path,
            "is not a regular file (a FIFO, a device or a directory): adapters are read from plain files only",
        ));
    }
    if meta.len() > max {
        return Err(bad(
            path,
            format!(
                "is {} bytes, more than the {max} an adapter of this shape can need",
                meta.len()
            ),
        ));
    }
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(meta.len() as usize)
        .map_err(|_| bad(path, "does not fit in this machine's memory"))?;
    f.take(max)
        .read_to_end(&mut bytes)
        .map_err(TrainError::io(path))?;
    Ok(bytes)
}

/// (heads, head size) of a q/k B matrix's rows, if the tensor is one.
fn head_rows(c: &ModelConfig, name: &str) -> Option<usize> {
    if !name.ends_with("lora_B.weight") {
        return None;
    }
    if name.contains("self_attn.q_proj.") {
        Some(c.n_heads)
    } else if name.contains("self_attn.k_proj.") {
        Some(c.n_kv_heads)
    } else {
        None
    }
}

/// Write `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
pub fn save(
    dir: &Path,
    c: &ModelConfig,
    lora: &Lora,
    params: &[f32],
    base_name: &str,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
    let mut bytes = Vec::new();
    for t in &lora.tensors {
        let mut data = params[t.range()].to_vec();
        if let Some(heads) = head_rows(c, &t.name) {
            data = hf_rows(&data, heads, c.head_dim(), lora.cfg.rank, true);
        }
        bytes.push((
            t.name.clone(),
            t.shape.clone(),
            data.iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>(),
        ));
    }
    let path = dir.join("adapter_model.safetensors");
    let views = bytes
        .iter()
        .map(|(n, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&path, e.to_string()))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let st = safetensors::serialize(views, Some(meta)).map_err(|e| bad(&path, e.to_string()))?;
    std::fs::write(&path, st).map_err(TrainError::io(&path))?;
    let modules: Vec<&str> = lora.cfg.targets.iter().map(|t| t.module()).collect();
    // A reward model is PEFT's sequence classification with one label: the score head is
    // saved whole beside the adapters.
    let (task, to_save) = match lora.score {
        Some(_) => ("SEQ_CLS", json!(["score"])),
        None => ("CAUSAL_LM", serde_json::Value::Null),
    };
    let cfg = json!({
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base_name,
        "r": lora.cfg.rank,
        "lora_alpha": lora.cfg.alpha,
        "lora_dropout": 0.0,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": to_save,
        "layers_to_transform": null,
        "revision": null,
    });
    let cp = dir.join("adapter_config.json");
    std::fs::write(&cp, serde_json::to_string_pretty(&cfg).unwrap_or_default())
        .map_err(TrainError::io(&cp))
}

/// Read a PEFT LoRA adapter for a model of config `c`: its layout and parameters (q/k B rows
/// in GGUF order).
///
/// The adapter may come from an untrusted client (`POST /v1/load_lora_adapter`), so nothing is
/// allocated before the config is checked against the base model: `1 ≤ r ≤` the smallest side
/// of an adapted projection, a finite `lora_alpha / r` of at most [`MAX_LORA_SCALE`], files that
/// are regular and no larger than the layout needs; and every weight must be finite.
pub fn load(dir: &Path, c: &ModelConfig) -> Result<(Lora, Vec<f32>), TrainError> {
    let cp = dir.join("adapter_config.json");
    let text = read_regular(&cp, MAX_CONFIG_BYTES)?;
    let v: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| bad(&cp, e.to_string()))?;
    if v["peft_type"].as_str() != Some("LORA") {
        return Err(bad(&cp, "peft_type is not LORA"));
    }
    let rank = v["r"]
        .as_u64()
        .ok_or_else(|| bad(&cp, "no `r` (the LoRA rank, a whole number from 1)"))?;
    let alpha = v["lora_alpha"]
        .as_f64()
        .ok_or_else(|| bad(&cp, "no `lora_alpha`"))?;
    if v["use_rslora"].as_bool() == Some(true) || v["use_dora"].as_bool() == Some(true) {
        return Err(bad(&cp, "rsLoRA and DoRA adapters are not supported"));
    }
    let targets = match &v["target_modules"] {
        serde_json::Value::Array(a) => a
            .iter()
            .map(|m| {
                m.as_str().and_then(Target::parse).ok_or_else(|| {
                    bad(
                        &cp,
                        format!("target module {m} is not one of q/k/v/o/gate/up/down_proj"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        other => return Err(bad(&cp, format!("target_modules {other} must be a list"))),
    };
    let Some(max_rank) = targets
        .iter()
        .map(|t| {
            let (n_in, n_out, _, _) = t.shape(c);
            n_in.min(n_out)
        })
        .min()
    else {
        return Err(bad(
            &cp,
            "target_modules is empty: name the projections the adapter adapts",
        ));
    };
    if rank == 0 || rank > max_rank as u64 {
        return Err(bad(
            &cp,
            format!("r = {rank} is not a rank for this base model: it must be 1 to {max_rank} (the smallest side of an adapted projection)"),
        ));
    }
    let rank = rank as usize;
    let scale = alpha / rank as f64;
    if !scale.is_finite() || scale.abs() > f64::from(MAX_LORA_SCALE) {
        return Err(bad(
            &cp,
            format!("lora_alpha {alpha} with r = {rank} gives a scale of {scale:e}: lora_alpha / r must be finite and at most {MAX_LORA_SCALE} in size (PEFT adapters use about 0.5 to 64)"),
        ));
    }
    let alpha = alpha as f32;
    let mut lora = Lora::new(
        c,
        LoraConfig {
            rank,
            alpha,
            targets,
        },
    );
    match v["task_type"].as_str() {
        Some("SEQ_CLS") => {
            if v["num_labels"].as_u64().is_some_and(|n| n != 1) {
                return Err(bad(&cp, "a sequence classifier with more than one label is not a reward model: ferrolm reads reward models (one score)"));
            }
            lora = lora.with_score(c.dim);
        }
        None | Some("CAUSAL_LM") => {}
        Some(other) => {
            return Err(bad(
                &cp,
                format!("task_type {other} is not supported: CAUSAL_LM (a language-model adapter) or SEQ_CLS (a reward model with a score head)"),
            ))
        }
    }
    let path = dir.join("adapter_model.safetensors");
    // F32 values, twice over for tensors the adapter may carry beside ours, and the header.
    let max_bytes = (lora.len as u64).saturating_mul(8).saturating_add(16 << 20);
    let bytes = read_regular(&path, max_bytes)?;
    let mut params = crate::checkpoint::decode_safetensors(&path, &bytes, &lora.tensors, "")?;
    drop(bytes);
    if let Some(t) = lora
        .tensors
        .iter()
        .find(|t| params[t.range()].iter().any(|x| !x.is_finite()))
    {
        return Err(bad(
            &path,
            format!("tensor `{}` holds NaN or infinite values: the adapter is broken (retrain or re-export it)", t.name),
        ));
    }
    for t in &lora.tensors {
        if let Some(heads) = head_rows(c, &t.name) {
            let gguf = hf_rows(&params[t.range()], heads, c.head_dim(), rank, false);
            params[t.range()].copy_from_slice(&gguf);
        }
    }
    Ok((lora, params))
}

/// The adapter as the inference engine applies it (per sequence of a batch, on the unchanged
/// base): `params` in memory order (q/k rows as GGUF stores them).
pub fn to_inference(
    c: &ModelConfig,
    lora: &Lora,
    params: &[f32],
    name: &str,
) -> Result<ferrolm_models::Adapter, TrainError> {
    use ferrolm_models::Proj;
    let r = lora.cfg.rank;
    let mut ad = ferrolm_models::Adapter::new(name, c.n_layers, r, lora.cfg.alpha / r as f32);
    for pair in lora.pairs().chunks_exact(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let rest = a.name.trim_start_matches("base_model.model.model.layers.");
        let (layer, module) = rest.split_once('.').unwrap_or(("", rest));
        let layer: usize = layer
            .parse()
            .map_err(|_| bad(Path::new(name), format!("tensor {}", a.name)))?;
        let module = module.trim_end_matches(".lora_A.weight");
        let target = module
            .rsplit('.')
            .next()
            .and_then(Target::parse)
            .ok_or_else(|| bad(Path::new(name), format!("tensor {}", a.name)))?;
        let proj = match target {
            Target::Q => Proj::Q,
            Target::K => Proj::K,
            Target::V => Proj::V,
            Target::O => Proj::O,
            Target::Gate => Proj::Gate,
            Target::Up => Proj::Up,
            Target::Down => Proj::Down,
        };
        let (n_in, n_out) = (a.shape[1], b.shape[0]);
        ad.set(
            layer,
            proj,
            params[a.range()].to_vec(),
            params[b.range()].to_vec(),
            n_in,
            n_out,
        )
        .map_err(|e| bad(Path::new(name), e.to_string()))?;
    }
    ad.score = lora.score.map(|off| params[off..off + c.dim].to_vec());
    Ok(ad)
}

/// The PEFT adapter at `dir` (or the final adapter of the `ferrolm finetune` run `dir`) as the
/// engine applies it on the base model at `base` (a GGUF or a run), called `name`.
pub fn load_for_serving(
    dir: &Path,
    base: &Path,
    name: &str,
) -> Result<ferrolm_models::Adapter, TrainError> {
    let run_adapter = dir.join("adapter");
    let dir = if dir.join("adapter_config.json").is_file() {
        dir
    } else if run_adapter.join("adapter_config.json").is_file() {
        run_adapter.as_path()
    } else {
        return Err(bad(
            dir,
            "is not a PEFT LoRA adapter (no adapter_config.json) nor a finished `ferrolm finetune --weights lora` run (no adapter/)",
        ));
    };
    let (c, _) = crate::base::open(base)?;
    let (lora, params) = load(dir, &c)?;
    to_inference(&c, &lora, &params, name)
}

/// `W += s·B·A` for every adapter: the base parameters with the adapter folded in.
pub fn merge(c: &ModelConfig, base: &mut [f32], lora: &Lora, params: &[f32]) {
    let layout = crate::model::Layout::new(c);
    let s = lora.cfg.alpha / lora.cfg.rank as f32;
    let r = lora.cfg.rank;
    for pair in lora.pairs().chunks_exact(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let base_name = a
            .name
            .trim_start_matches("base_model.model.")
            .replace(".lora_A.weight", ".weight");
        let Some(w) = layout.get(&base_name) else {
            continue;
        };
        let (n_out, n_in) = (b.shape[0], a.shape[1]);
        let (am, bm) = (&params[a.range()], &params[b.range()]);
        let wm = &mut base[w.range()];
        for i in 0..n_out {
            for k in 0..r {
                let bik = s * bm[i * r + k];
                for (wv, av) in wm[i * n_in..][..n_in]
                    .iter_mut()
                    .zip(&am[k * n_in..][..n_in])
                {
                    *wv += bik * av;
                }
            }
        }
    }
}
