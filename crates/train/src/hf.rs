//! A Hugging Face model directory (`config.json`, `*.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`, `generation_config.json`) as a GGUF in memory: the conversion
//! llama.cpp's `convert_hf_to_gguf.py` does in Python, for the architectures ferrolm runs. What
//! [`open_as_gguf`] returns is what `chat`, `generate`, `serve` and `quantize` load, exactly as
//! a training run is read through [`crate::export::open_as_gguf`].
//!
//! Weights keep their type: f32, f16 and bf16 matrices are copied as they are (`[out, in]`
//! row-major is GGUF's `[in, out]`), vectors (norms, biases) become f32, as the converter
//! writes them. Per architecture, as the converter does:
//! - `LlamaForCausalLM`, `MistralForCausalLM` → `llama`: q/k rows permuted from Hugging Face's
//!   half-split RoPE pairs (i, i + d/2) to GGUF's interleaved (2i, 2i + 1); Llama 3.1
//!   `rope_type: llama3` becomes `rope_freqs.weight` (one factor per frequency); Mistral's
//!   `sliding_window` becomes `llama.attention.sliding_window` (the converter drops it;
//!   ferrolm applies it).
//! - `Qwen2ForCausalLM` → `qwen2` (q/k/v biases), `Qwen3ForCausalLM` → `qwen3` (q/k norms).
//! - `Phi3ForCausalLM` → `phi3`: fused qkv and gate‖up kept fused; LongRoPE factors become
//!   `rope_factors_{short,long}.weight` with `rope.scaling.attn_factor`
//!   `sqrt(1 + ln(max / original) / ln original)`; partial RoPE as `rope.dimension_count`.
//! - `Gemma3ForCausalLM` → `gemma3`: every RMSNorm weight stored as `1 + w` (Gemma's norm
//!   multiplies by `1 + w`; GGUF holds the product's factor), `layer_types` as the per-layer
//!   `attention.sliding_window_pattern`, `rope_local_base_freq` as `rope.freq_base_swa`.
//!
//! Checked by hand against llama.cpp's own converter (build 11434, its tokenizer-hash and
//! SentencePiece vocab steps bypassed for the byte-level fixtures) on every
//! `golden/hf_tiny_*` directory: every tensor byte-identical, `rope_freqs` and Gemma's `1 + w`
//! norms included, and every metadata key both write equal. The converter adds
//! `general.size_label`/`general.type` (and `key_length` for `llama`); ferrolm adds
//! `{arch}.vocab_size`, `rope.dimension_count`, Mistral's window and Gemma 3's per-layer
//! window pattern (llama.cpp loads and honours that array).
//!
//! A tied head (no `lm_head.weight`) writes no `output.weight`. A tensor the architecture does
//! not use is an error, not silently dropped (only `rotary_emb.inv_freq` buffers are skipped).
//!
//! Tokenizer: a byte-level BPE `tokenizer.json` becomes `tokenizer.ggml.model = gpt2` with its
//! tokens, merges and token types (added special tokens CONTROL, other added tokens
//! USER_DEFINED, ids below the embedding's row count that the tokenizer lacks `[PADn]` UNUSED,
//! as the converter pads). `tokenizer.ggml.pre`: llama.cpp recognises a published tokenizer by
//! hashing its ids on a probe text (a table of known checkpoints); a tokenizer outside that table
//! (a new or retrained one) is refused. ferrolm instead reads the pre-tokenizer that
//! `tokenizer.json` declares and gives it the name llama.cpp's table gives the published
//! tokenizers with the same definition:
//! - `ByteLevel` with its own (GPT-2) regex → `gpt-2`;
//! - `Digits` (one by one) then `ByteLevel` with the GPT-2 regex → `smollm` (SmolLM, StarCoder);
//! - `Split` on Llama 3's regex then `ByteLevel` without a regex → `llama-bpe`;
//! - `Split` on Qwen2's regex (single digits; the NFC normalizer) → `qwen2`.
//!
//! A SentencePiece tokenizer (Llama 2, Mistral, Gemma: a `tokenizer.model`, or a
//! `tokenizer.json` of BPE with byte fallback) becomes `tokenizer.ggml.model = llama` with
//! scores, token types and byte tokens (see `sentencepiece.rs`). Anything else is refused with
//! what was found. `bos`/`eos` come from
//! `tokenizer_config.json` (else `generation_config.json`, else `config.json`), `add_bos_token`
//! from `tokenizer_config.json` (else whether the post-processor puts BOS first), the chat
//! template from `tokenizer_config.json` or `chat_template.jinja`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use ferrolm_gguf::{writer::GgufWriter, GgmlType, GgufFile, Value};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value as Json;

use crate::TrainError;

/// The `architectures` names [`open_as_gguf`] converts (for error messages).
pub const SUPPORTED: &str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM, Gemma3ForCausalLM";

/// Whether `path` should be read as a Hugging Face model directory: a directory that is not a
/// training run (those also hold a `config.json`) and holds a config, weights or a tokenizer.
pub fn is_hf_dir(path: &Path) -> bool {
    path.is_dir()
        && !crate::export::is_run(path)
        && (path.join("config.json").is_file()
            || path.join("tokenizer.json").is_file()
            || !safetensors_files(path).unwrap_or_default().is_empty())
}

/// The parsed in-memory GGUF of a Hugging Face directory, for the inference loader.
pub fn open_as_gguf(dir: &Path) -> Result<GgufFile, TrainError> {
    Ok(GgufFile::from_bytes(dir, gguf_bytes(dir)?)?)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Llama,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma3,
}

impl Family {
    fn from_hf(name: &str) -> Option<Family> {
        Some(match name {
            "LlamaForCausalLM" | "MistralForCausalLM" => Family::Llama,
            "Qwen2ForCausalLM" => Family::Qwen2,
            "Qwen3ForCausalLM" => Family::Qwen3,
            "Phi3ForCausalLM" => Family::Phi3,
            "Gemma3ForCausalLM" => Family::Gemma3,
            _ => return None,
        })
    }

    /// GGUF's `general.architecture`.
    fn gguf(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Phi3 => "phi3",
            Family::Gemma3 => "gemma3",
        }
    }
}

pub(crate) fn err(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::HfImport {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Json, TrainError> {
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    serde_json::from_str(&text).map_err(|e| err(path, format!("not valid JSON: {e}")))
}

/// A JSON value that may be absent or `null`.
fn opt<'a>(j: &'a Json, key: &str) -> Option<&'a Json> {
    j.get(key).filter(|v| !v.is_null())
}

/// `config.json`, read key by key (Hugging Face configs carry many keys no converter reads, so
/// unknown keys are not errors here).
struct HfConfig {
    path: PathBuf,
    j: Json,
}

impl HfConfig {
    fn usize(&self, key: &str) -> Result<usize, TrainError> {
        self.opt_usize(key)?.ok_or_else(|| {
            err(
                &self.path,
                format!("`{key}` is missing (every {SUPPORTED} config has it)"),
            )
        })
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, TrainError> {
        match opt(&self.j, key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|v| Some(v as usize))
                .ok_or_else(|| err(&self.path, format!("`{key}` = {v} is not a count"))),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, TrainError> {
        match opt(&self.j, key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| err(&self.path, format!("`{key}` = {v} is not a number"))),
        }
    }

    /// RoPE settings: transformers ≥ 5 writes `rope_parameters` (theta and scaling together),
    /// older files `rope_theta` and `rope_scaling`.
    fn rope(&self) -> Json {
        let mut r = opt(&self.j, "rope_parameters")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}));
        if let (Some(s), Some(m)) = (opt(&self.j, "rope_scaling"), r.as_object_mut()) {
            if let Some(s) = s.as_object() {
                for (k, v) in s {
                    m.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
        }
        r
    }

    fn rope_theta(&self, rope: &Json, default: f64) -> Result<f64, TrainError> {
        Ok(self
            .opt_f64("rope_theta")?
            .or_else(|| opt(rope, "rope_theta").and_then(Json::as_f64))
            .unwrap_or(default))
    }
}

/// The safetensors files of `dir`: those the index names when there is one, else every
/// `*.safetensors` in it.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, TrainError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let j = read_json(&index)?;
        let map = j
            .get("weight_map")
            .and_then(Json::as_object)
            .ok_or_else(|| err(&index, "has no `weight_map` object"))?;
        let files: BTreeSet<&str> = map.values().filter_map(Json::as_str).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(TrainError::io(dir))? {
        let p = e.map_err(TrainError::io(dir))?.path();
        if p.extension().is_some_and(|x| x == "safetensors") && p.is_file() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Every tensor of the checkpoint by name, and which ones the conversion used.
struct Tensors<'a> {
    dir: &'a Path,
    by_name: HashMap<String, (PathBuf, safetensors::tensor::TensorView<'a>)>,
    used: BTreeSet<String>,
}

impl<'a> Tensors<'a> {
    fn new(dir: &'a Path, files: &[PathBuf], maps: &'a [Mmap]) -> Result<Self, TrainError> {
        let mut by_name = HashMap::new();
        for (path, map) in files.iter().zip(maps) {
            let st = SafeTensors::deserialize(map)
                .map_err(|e| err(path, format!("not a safetensors file: {e}")))?;
            for (name, view) in st.tensors() {
                by_name.insert(name, (path.clone(), view));
            }
        }
        Ok(Tensors {
            dir,
            by_name,
            used: BTreeSet::new(),
        })
    }

    fn has(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The tensor `name`, which must have `shape` and a float type.
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<(Dtype, &'a [u8]), TrainError> {
        let (path, v) = self.by_name.get(name).ok_or_else(|| {
            err(
                self.dir,
                format!(
                    "tensor `{name}` is missing from the safetensors files (is config.json for these weights?)"
                ),
            )
        })?;
        if v.shape() != shape {
            return Err(err(
                path,
                format!(
                    "tensor `{name}` has shape {:?}, but config.json implies {shape:?}",
                    v.shape()
                ),
            ));
        }
        if !matches!(v.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(err(
                path,
                format!(
                    "tensor `{name}` is {:?}: only F32, F16 and BF16 weights can be imported (a pre-quantized checkpoint, e.g. GPTQ/AWQ/FP8, is not supported; use its unquantized release)",
                    v.dtype()
                ),
            ));
        }
        self.used.insert(name.to_owned());
        Ok((v.dtype(), v.data()))
    }

    /// Tensors no part of the conversion read.
    fn unused(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .by_name
            .keys()
            .filter(|k| !self.used.contains(*k) && !k.ends_with("rotary_emb.inv_freq"))
            .map(String::as_str)
            .collect();
        v.sort_unstable();
        v
    }
}

fn ggml_type(d: Dtype) -> GgmlType {
    match d {
        Dtype::F16 => GgmlType::F16,
        Dtype::BF16 => GgmlType::BF16,
        _ => GgmlType::F32,
    }
}

fn to_f32(d: Dtype, b: &[u8]) -> Vec<f32> {
    match d {
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}

/// convert_hf_to_gguf.py's q/k row order for GGUF `llama`: within each head of `rows / n_head`
/// rows, row `j * d/2 + i` (Hugging Face's rotate-half pairs) moves to `2i + j` (interleaved).
fn permute_rows(b: &[u8], n_head: usize, rows: usize) -> Vec<u8> {
    crate::base::hf_rows(b, n_head, rows / n_head, b.len() / rows, false)
}

/// How one Hugging Face tensor becomes its GGUF tensor.
#[derive(Clone, Copy, PartialEq)]
enum Edit {
    None,
    /// q or k of GGUF `llama`, with this many heads.
    Permute(usize),
    /// Gemma's RMSNorm weight `w` → `1 + w`.
    PlusOne,
}

/// The sizes every architecture has.
struct Dims {
    dim: usize,
    n_layers: usize,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    ffn: usize,
    vocab: usize,
}

/// (Hugging Face suffix after `model.layers.N.`, GGUF suffix after `blk.N.`, shape, edit,
/// required) of one layer.
type Slot = (&'static str, &'static str, Vec<usize>, Edit, bool);

fn layer_slots(f: Family, d: &Dims) -> Vec<Slot> {
    let (dim, qd, kvd, ffn) = (d.dim, d.n_heads * d.head_dim, d.n_kv * d.head_dim, d.ffn);
    let (pq, pk) = if f == Family::Llama {
        (Edit::Permute(d.n_heads), Edit::Permute(d.n_kv))
    } else {
        (Edit::None, Edit::None)
    };
    let n = Edit::None;
    let mut s: Vec<Slot> = vec![
        (
            "input_layernorm.weight",
            "attn_norm.weight",
            vec![dim],
            n,
            true,
        ),
        (
            "self_attn.o_proj.weight",
            "attn_output.weight",
            vec![dim, qd],
            n,
            true,
        ),
        (
            "mlp.down_proj.weight",
            "ffn_down.weight",
            vec![dim, ffn],
            n,
            true,
        ),
    ];
    match f {
        Family::Phi3 => s.extend([
            (
                "post_attention_layernorm.weight",
                "ffn_norm.weight",
                vec![dim],
                n,
                true,
            ),
            (
                "self_attn.qkv_proj.weight",
                "attn_qkv.weight",
                vec![qd + 2 * kvd, dim],
                n,
                true,
            ),
            (
                "mlp.gate_up_proj.weight",
                "ffn_up.weight",
                vec![2 * ffn, dim],
                n,
                true,
            ),
        ]),
        Family::Llama | Family::Qwen2 | Family::Qwen3 | Family::Gemma3 => {
            s.extend([
                (
                    "self_attn.q_proj.weight",
                    "attn_q.weight",
                    vec![qd, dim],
                    pq,
                    true,
                ),
                (
                    "self_attn.k_proj.weight",
                    "attn_k.weight",
                    vec![kvd, dim],
                    pk,
                    true,
                ),
                (
                    "self_attn.v_proj.weight",
                    "attn_v.weight",
                    vec![kvd, dim],
                    n,
                    true,
                ),
                (
                    "mlp.gate_proj.weight",
                    "ffn_gate.weight",
                    vec![ffn, dim],
                    n,
                    true,
                ),
                (
                    "mlp.up_proj.weight",
                    "ffn_up.weight",
                    vec![ffn, dim],
                    n,
                    true,
                ),
            ]);
            // Biases: Qwen2 always, Llama-family checkpoints with `attention_bias`.
            let need = f == Family::Qwen2;
            s.extend([
                ("self_attn.q_proj.bias", "attn_q.bias", vec![qd], pq, need),
                ("self_attn.k_proj.bias", "attn_k.bias", vec![kvd], pk, need),
                ("self_attn.v_proj.bias", "attn_v.bias", vec![kvd], n, need),
            ]);
        }
    }
    match f {
        Family::Qwen3 => s.extend([
            (
                "post_attention_layernorm.weight",
                "ffn_norm.weight",
                vec![dim],
                n,
                true,
            ),
            (
                "self_attn.q_norm.weight",
                "attn_q_norm.weight",
                vec![d.head_dim],
                n,
                true,
            ),
            (
                "self_attn.k_norm.weight",
                "attn_k_norm.weight",
                vec![d.head_dim],
                n,
                true,
            ),
        ]),
        Family::Gemma3 => {
            let p = Edit::PlusOne;
            s[0].3 = p;
            s.extend([
                (
                    "post_attention_layernorm.weight",
                    "post_attention_norm.weight",
                    vec![dim],
                    p,
                    true,
                ),
                (
                    "pre_feedforward_layernorm.weight",
                    "ffn_norm.weight",
                    vec![dim],
                    p,
                    true,
                ),
                (
                    "post_feedforward_layernorm.weight",
                    "post_ffw_norm.weight",
                    vec![dim],
                    p,
                    true,
                ),
                (
                    "self_attn.q_norm.weight",
                    "attn_q_norm.weight",
                    vec![d.head_dim],
                    p,
                    true,
                ),
                (
                    "self_attn.k_norm.weight",
                    "attn_k_norm.weight",
                    vec![d.head_dim],
                    p,
                    true,
                ),
            ]);
        }
        Family::Llama | Family::Qwen2 => s.push((
            "post_attention_layernorm.weight",
            "ffn_norm.weight",
            vec![dim],
            n,
            true,
        )),
        Family::Phi3 => {}
    }
    s
}

/// Hugging Face Llama tensor name → GGUF name (the training checkpoint's names are Llama's).
pub fn llama_gguf_name(hf: &str) -> Option<String> {
    let top = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = top.iter().find(|(h, _)| *h == hf) {
        return Some((*g).to_owned());
    }
    let (n, part) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let d = Dims {
        dim: 1,
        n_layers: 1,
        n_heads: 1,
        n_kv: 1,
        head_dim: 2,
        ffn: 1,
        vocab: 1,
    };
    layer_slots(Family::Llama, &d)
        .into_iter()
        .find(|s| s.0 == part)
        .map(|s| format!("blk.{n}.{}", s.1))
}

/// One tensor into the writer: matrices in their own type, vectors as f32.
fn put(
    w: &mut GgufWriter,
    t: &mut Tensors<'_>,
    hf: &str,
    gguf: &str,
    shape: &[usize],
    edit: Edit,
) -> Result<(), TrainError> {
    let (dt, bytes) = t.get(hf, shape)?;
    let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
    if shape.len() == 1 {
        let mut v = to_f32(dt, bytes);
        match edit {
            Edit::PlusOne => v.iter_mut().for_each(|x| *x += 1.0),
            Edit::Permute(n) => {
                let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                v = to_f32(Dtype::F32, &permute_rows(&b, n, shape[0]));
            }
            Edit::None => {}
        }
        w.tensor_f32(gguf, &dims, &v);
    } else {
        let data = match edit {
            Edit::Permute(n) => permute_rows(bytes, n, shape[0]),
            _ => bytes.to_vec(),
        };
        w.tensor(gguf, &dims, ggml_type(dt), data);
    }
    Ok(())
}

/// The GGUF file of the Hugging Face directory `dir`.
pub fn gguf_bytes(dir: &Path) -> Result<Vec<u8>, TrainError> {
    let cp = dir.join("config.json");
    if !cp.is_file() {
        return Err(err(
            dir,
            "has no config.json: a Hugging Face model directory holds config.json, *.safetensors and tokenizer.json (download all three, e.g. `huggingface-cli download REPO --local-dir DIR`)",
        ));
    }
    let c = HfConfig {
        j: read_json(&cp)?,
        path: cp.clone(),
    };
    let archs: Vec<&str> = opt(&c.j, "architectures")
        .and_then(Json::as_array)
        .map(|a| a.iter().filter_map(Json::as_str).collect())
        .unwrap_or_default();
    let Some((hf_arch, f)) = archs
        .iter()
        .find_map(|a| Family::from_hf(a).map(|f| (*a, f)))
    else {
        return Err(err(
            &cp,
            format!(
                "`architectures` is {archs:?}: ferrolm imports Hugging Face models of {SUPPORTED} (text only; for another model use a GGUF)"
            ),
        ));
    };
    let files = safetensors_files(dir)?;
    if files.is_empty() {
        return Err(err(
            dir,
            "has no *.safetensors weights (a pytorch_model.bin checkpoint is not read: download the safetensors files, or convert with transformers' save_pretrained(safe_serialization=True))",
        ));
    }
    if !dir.join("tokenizer.json").is_file() && !dir.join("tokenizer.model").is_file() {
        return Err(err(
            dir,
            "has neither tokenizer.json nor tokenizer.model (ferrolm reads the fast tokenizer's file, or a SentencePiece model; download them with the weights)",
        ));
    }
    for p in &files {
        if !p.is_file() {
            return Err(err(
                p,
                "is named by model.safetensors.index.json but missing: download every shard",
            ));
        }
    }

    let maps = files
        .iter()
        .map(|p| {
            let file = std::fs::File::open(p).map_err(TrainError::io(p))?;
            // SAFETY: read-only map of a file this process does not modify; a concurrent
            // writer would corrupt only the values read, as with any reader.
            unsafe { Mmap::map(&file) }.map_err(TrainError::io(p))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut t = Tensors::new(dir, &files, &maps)?;

    let act_key = if f == Family::Gemma3 {
        "hidden_activation"
    } else {
        "hidden_act"
    };
    let act = opt(&c.j, act_key).and_then(Json::as_str).unwrap_or("");
    let want_act = if f == Family::Gemma3 {
        "gelu_pytorch_tanh"
    } else {
        "silu"
    };
    if !act.is_empty() && act != want_act {
        return Err(err(
            &cp,
            format!("`{act_key}` = {act}: ferrolm's {hf_arch} runs {want_act} only"),
        ));
    }
    let dim = c.usize("hidden_size")?;
    let n_heads = c.usize("num_attention_heads")?;
    if n_heads == 0 || dim % n_heads != 0 && c.opt_usize("head_dim")?.is_none() {
        return Err(err(
            &cp,
            format!("num_attention_heads = {n_heads} does not divide hidden_size = {dim}"),
        ));
    }
    let d = Dims {
        dim,
        n_layers: c.usize("num_hidden_layers")?,
        n_heads,
        n_kv: c.opt_usize("num_key_value_heads")?.unwrap_or(n_heads),
        head_dim: c.opt_usize("head_dim")?.unwrap_or(dim / n_heads),
        ffn: c.usize("intermediate_size")?,
        vocab: c.usize("vocab_size")?,
    };
    let ctx = c.usize("max_position_embeddings")?;
    let rope = c.rope();
    let rope_type = opt(&rope, "rope_type")
        .or_else(|| opt(&rope, "type"))
        .and_then(Json::as_str)
        .unwrap_or("default")
        .to_owned();
    let a = f.gguf();
    let u = |v: usize| Value::U32(v as u32);
    let key = |k: &str| format!("{a}.{k}");

    let mut w = GgufWriter::new();
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "hf-model".into());
    let (embd_ty, _) = t.get("model.embed_tokens.weight", &[d.vocab, d.dim])?;
    w.meta("general.architecture", Value::String(a.into()))
        .meta("general.name", Value::String(name))
        .meta(&key("context_length"), u(ctx))
        .meta(&key("embedding_length"), u(d.dim))
        .meta(&key("block_count"), u(d.n_layers))
        .meta(&key("feed_forward_length"), u(d.ffn))
        .meta(&key("attention.head_count"), u(d.n_heads))
        .meta(&key("attention.head_count_kv"), u(d.n_kv))
        .meta(
            &key("attention.layer_norm_rms_epsilon"),
            Value::F32(c.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32),
        );
    // transformers ≥ 5 nests Gemma 3's RoPE per layer type; the global layers' is the base.
    let theta_src = opt(&rope, "full_attention").unwrap_or(&rope);
    let theta = c.rope_theta(theta_src, if f == Family::Gemma3 { 1e6 } else { 1e4 })?;
    w.meta(&key("rope.freq_base"), Value::F32(theta as f32));
    let rope_dims = if f == Family::Phi3 {
        let pf = c
            .opt_f64("partial_rotary_factor")?
            .or_else(|| opt(&rope, "partial_rotary_factor").and_then(Json::as_f64))
            .unwrap_or(1.0);
        (d.head_dim as f64 * pf) as usize
    } else {
        d.head_dim
    };
    w.meta(&key("rope.dimension_count"), u(rope_dims));
    if d.head_dim != d.dim / d.n_heads || f == Family::Gemma3 {
        w.meta(&key("attention.key_length"), u(d.head_dim))
            .meta(&key("attention.value_length"), u(d.head_dim));
    }
    w.meta(&key("vocab_size"), u(d.vocab)).meta(
        "general.file_type",
        Value::U32(match embd_ty {
            Dtype::F16 => 1,
            Dtype::BF16 => 32,
            _ => 0,
        }),
    );

    // Architecture extras, and the RoPE tensors they imply.
    let mut rope_tensors: Vec<(&str, Vec<f32>)> = Vec::new();
    let unsupported_rope = |what: &str| {
        err(
            &cp,
            format!("RoPE scaling `{what}` is not supported for {hf_arch} (ferrolm runs: none; llama3 for Llama; longrope for Phi-3)"),
        )
    };
    match f {
        Family::Llama => {
            match rope_type.as_str() {
                "default" => {}
                "llama3" => rope_tensors.push((
                    "rope_freqs.weight",
                    llama3_factors(&rope, theta, d.head_dim).map_err(|e| err(&cp, e))?,
                )),
                other => return Err(unsupported_rope(other)),
            }
            if let Some(win) = c.opt_usize("sliding_window")? {
                w.meta(&key("attention.sliding_window"), u(win));
            }
        }
        Family::Qwen2 | Family::Qwen3 => {
            if rope_type != "default" {
                return Err(unsupported_rope(&rope_type));
            }
            if opt(&c.j, "use_sliding_window").and_then(Json::as_bool) == Some(true) {
                return Err(err(
                    &cp,
                    "`use_sliding_window: true` is not supported for Qwen (the released models set it false)",
                ));
            }
        }
        Family::Phi3 => {
            let orig = c
                .opt_usize("original_max_position_embeddings")?
                .or_else(|| {
                    opt(&rope, "original_max_position_embeddings")
                        .and_then(Json::as_u64)
                        .map(|v| v as usize)
                })
                .unwrap_or(ctx);
            w.meta(&key("rope.scaling.original_context_length"), u(orig))
                .meta(
                    &key("attention.sliding_window"),
                    u(c.opt_usize("sliding_window")?.unwrap_or(0)),
                );
            match rope_type.as_str() {
                "default" => {}
                "longrope" | "su" => {
                    let factors = |k: &str| -> Result<Vec<f32>, TrainError> {
                        let v: Vec<f32> = opt(&rope, k)
                            .and_then(Json::as_array)
                            .map(|a| {
                                a.iter()
                                    .filter_map(Json::as_f64)
                                    .map(|x| x as f32)
                                    .collect()
                            })
                            .unwrap_or_default();
                        if v.len() != rope_dims / 2 {
                            return Err(err(
                                &cp,
                                format!("rope `{k}` has {} factors, expected {} (rotated dimensions / 2)", v.len(), rope_dims / 2),
                            ));
                        }
                        Ok(v)
                    };
                    rope_tensors.push(("rope_factors_long.weight", factors("long_factor")?));
                    rope_tensors.push(("rope_factors_short.weight", factors("short_factor")?));
                    let attn = match opt(&rope, "attention_factor").and_then(Json::as_f64) {
                        Some(v) => v,
                        None => {
                            let scale = ctx as f64 / orig as f64;
                            if scale <= 1.0 {
                                1.0
                            } else {
                                (1.0 + scale.ln() / (orig as f64).ln()).sqrt()
                            }
                        }
                    };
                    w.meta(&key("rope.scaling.attn_factor"), Value::F32(attn as f32));
                }
                other => return Err(unsupported_rope(other)),
            }
        }
        Family::Gemma3 => gemma3_meta(&c, &rope, &rope_type, &d, &mut w, &key)?,
    }

    let tok = tokenizer_meta(dir, &c, d.vocab)?;
    for (k, v) in tok {
        w.meta(&k, v);
    }

    let vd = [d.vocab, d.dim];
    put(
        &mut w,
        &mut t,
        "model.embed_tokens.weight",
        "token_embd.weight",
        &vd,
        Edit::None,
    )?;
    let norm_edit = if f == Family::Gemma3 {
        Edit::PlusOne
    } else {
        Edit::None
    };
    put(
        &mut w,
        &mut t,
        "model.norm.weight",
        "output_norm.weight",
        &[d.dim],
        norm_edit,
    )?;
    if t.has("lm_head.weight") {
        put(
            &mut w,
            &mut t,
            "lm_head.weight",
            "output.weight",
            &vd,
            Edit::None,
        )?;
    } else if opt(&c.j, "tie_word_embeddings").and_then(Json::as_bool) == Some(false) {
        return Err(err(
            dir,
            "tensor `lm_head.weight` is missing, and config.json says the head is not tied to the embedding (`tie_word_embeddings: false`)",
        ));
    }
    for (name, v) in &rope_tensors {
        w.tensor_f32(name, &[v.len() as u64], v);
    }
    let slots = layer_slots(f, &d);
    for l in 0..d.n_layers {
        for (hf, gg, shape, edit, required) in &slots {
            let hf = format!("model.layers.{l}.{hf}");
            if !required && !t.has(&hf) {
                continue;
            }
            put(&mut w, &mut t, &hf, &format!("blk.{l}.{gg}"), shape, *edit)?;
        }
    }
    let unused = t.unused();
    if !unused.is_empty() {
        return Err(err(
            dir,
            format!(
                "{} tensor(s) that ferrolm's {a} does not use, e.g. `{}` (a variant of {hf_arch} ferrolm cannot run, or weights for more layers than config.json declares)",
                unused.len(),
                unused[0]
            ),
        ));
    }
    Ok(w.into_bytes())
}

/// Llama 3.1's per-frequency RoPE factors (`rope_freqs.weight`), as the converter computes them:
/// wavelengths shorter than `original / high_freq_factor` keep their frequency, longer than
/// `original / low_freq_factor` are divided by `factor`, and those between are interpolated.
fn llama3_factors(rope: &Json, theta: f64, head_dim: usize) -> Result<Vec<f32>, String> {
    let g = |k: &str| {
        opt(rope, k)
            .and_then(Json::as_f64)
            .map(|v| v as f32)
            .ok_or_else(|| format!("rope_type llama3 needs `{k}`"))
    };
    let (factor, lo, hi, old) = (
        g("factor")?,
        g("low_freq_factor")?,
        g("high_freq_factor")?,
        g("original_max_position_embeddings")?,
    );
    let (lo_wl, hi_wl) = (old / lo, old / hi);
    Ok((0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32);
            let wl = 2.0 * std::f32::consts::PI / freq;
            if wl < hi_wl {
                1.0
            } else if wl > lo_wl {
                factor
            } else {
                let smooth = (old / wl - lo) / (hi - lo);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect())
}

fn gemma3_meta(
    c: &HfConfig,
    rope: &Json,
    rope_type: &str,
    d: &Dims,
    w: &mut GgufWriter,
    key: &dyn Fn(&str) -> String,
) -> Result<(), TrainError> {
    let cp = &c.path;
    let full = opt(rope, "full_attention").unwrap_or(rope);
    let local = opt(rope, "sliding_attention");
    let full_type = opt(full, "rope_type")
        .and_then(Json::as_str)
        .unwrap_or(rope_type);
    if full_type != "default" {
        return Err(err(
            cp,
            format!("RoPE scaling `{full_type}` is not supported for Gemma3ForCausalLM (the 270M and 1B models have none)"),
        ));
    }
    let local_theta = c
        .opt_f64("rope_local_base_freq")?
        .or_else(|| {
            local
                .and_then(|l| opt(l, "rope_theta"))
                .and_then(Json::as_f64)
        })
        .unwrap_or(10_000.0);
    w.meta(&key("rope.freq_base_swa"), Value::F32(local_theta as f32));
    if let Some(win) = c.opt_usize("sliding_window")? {
        w.meta(&key("attention.sliding_window"), Value::U32(win as u32));
        let flags: Vec<Value> = match opt(&c.j, "layer_types").and_then(Json::as_array) {
            Some(types) => {
                if types.len() != d.n_layers {
                    return Err(err(
                        cp,
                        format!(
                            "`layer_types` has {} entries for {} layers",
                            types.len(),
                            d.n_layers
                        ),
                    ));
                }
                types
                    .iter()
                    .map(|t| Value::Bool(t.as_str() == Some("sliding_attention")))
                    .collect()
            }
            None => {
                let n = c.opt_usize("sliding_window_pattern")?.unwrap_or(6);
                (0..d.n_layers)
                    .map(|l| Value::Bool(n == 0 || l % n < n - 1))
                    .collect()
            }
        };
        w.meta(
            &key("attention.sliding_window_pattern"),
            Value::Array(flags),
        );
    }
    if let Some(cap) = c.opt_f64("final_logit_softcapping")? {
        w.meta(&key("final_logit_softcapping"), Value::F32(cap as f32));
    }
    if c.opt_f64("attn_logit_softcapping")?.is_some() {
        return Err(err(
            cp,
            "`attn_logit_softcapping` is set: ferrolm's gemma3 has no attention soft-cap (Gemma 2 style)",
        ));
    }
    // ferrolm scales q·k by 1/sqrt(head_dim) (hidden/heads for the 62-layer 27B), as llama.cpp.
    let expect = if d.n_layers == 62 {
        d.dim / d.n_heads
    } else {
        d.head_dim
    };
    if let Some(q) = c.opt_f64("query_pre_attn_scalar")? {
        if (q - expect as f64).abs() > 1e-6 {
            return Err(err(
                cp,
                format!("`query_pre_attn_scalar` = {q}, but ferrolm's gemma3 scales attention by 1/sqrt({expect})"),
            ));
        }
    }
    Ok(())
}

/// A special token's string: `"<s>"` or `{"content": "<s>", …}`.
pub(crate) fn token_str(v: &Json) -> Option<&str> {
    v.as_str()
        .or_else(|| v.get("content").and_then(Json::as_str))
}

/// A byte-level BPE `tokenizer.json` (`model = gpt2`).
fn bpe_vocab(tp: &Path, tj: &Json, n_vocab: usize) -> Result<Vocab, TrainError> {
    let tp = tp.to_path_buf();
    let model = &tj["model"];
    let mtype = model.get("type").and_then(Json::as_str).unwrap_or("BPE");
    if mtype != "BPE" {
        return Err(err(
            &tp,
            format!("model type `{mtype}`: ferrolm imports byte-level BPE tokenizers (Llama 3, Qwen, SmolLM, GPT-2 style) and SentencePiece BPE ones (Llama 2, Mistral, Gemma); convert this model with llama.cpp's convert_hf_to_gguf.py and load the GGUF"),
        ));
    }
    let pre = pre_name(tj).map_err(|e| err(&tp, e))?;

    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| err(&tp, "model.vocab is not an object of token → id"))?;
    // Ids the tokenizer lacks stay `[PADn]`, UNUSED (5), as the converter pads to the
    // embedding's row count.
    let mut tokens: Vec<Option<String>> = vec![None; n_vocab];
    let mut types: Vec<i32> = vec![5; n_vocab];
    let mut set = |id: u64, s: &str, ty: i32| -> Result<(), TrainError> {
        let id = id as usize;
        if id >= n_vocab {
            return Err(err(
                &tp,
                format!("token `{s}` has id {id}, but the model's embedding has {n_vocab} rows (config.json vocab_size): the tokenizer is not this model's"),
            ));
        }
        tokens[id] = Some(s.to_owned());
        types[id] = ty;
        Ok(())
    };
    for (s, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| err(&tp, format!("token `{s}` has no integer id")))?;
        set(id, s, 1)?;
    }
    let mut ids: HashMap<String, u64> = vocab
        .iter()
        .filter_map(|(s, id)| Some((s.clone(), id.as_u64()?)))
        .collect();
    for at in tj
        .get("added_tokens")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(s)) = (
            at.get("id").and_then(Json::as_u64),
            at.get("content").and_then(Json::as_str),
        ) else {
            continue;
        };
        // Added special tokens are CONTROL (3), other added tokens USER_DEFINED (4).
        let special = at.get("special").and_then(Json::as_bool).unwrap_or(false);
        set(id, s, if special { 3 } else { 4 })?;
        ids.insert(s.to_owned(), id);
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| Value::String(t.unwrap_or_else(|| format!("[PAD{i}]"))))
        .collect();
    let types: Vec<Value> = types.into_iter().map(Value::I32).collect();
    let merges: Vec<Value> = model
        .get("merges")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(p) => Some(
                p.iter()
                    .filter_map(Json::as_str)
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            _ => None,
        })
        .map(Value::String)
        .collect();

    let ids_out = ids;
    Ok(Vocab {
        model: "gpt2",
        entries: vec![
            ("tokenizer.ggml.pre".to_owned(), Value::String(pre.into())),
            ("tokenizer.ggml.tokens".to_owned(), Value::Array(tokens)),
            ("tokenizer.ggml.token_type".to_owned(), Value::Array(types)),
            ("tokenizer.ggml.merges".to_owned(), Value::Array(merges)),
        ],
        ids: ids_out,
        post_processor: tj["post_processor"].clone(),
    })
}

/// A vocabulary as GGUF arrays, before the specials and options every kind shares.
pub(crate) struct Vocab {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    pub(crate) model: &'static str,
    pub(crate) entries: Vec<(String, Value)>,
    /// Token string → id, for `tokenizer_config.json`'s named specials.
    pub(crate) ids: HashMap<String, u64>,
    /// `tokenizer.json`'s post-processor (Null without one), for whether it adds BOS.
    pub(crate) post_processor: Json,
}

/// The vocabulary of a directory: a byte-level BPE `tokenizer.json`; else a SentencePiece
/// `tokenizer.model`; else a SentencePiece-style `tokenizer.json` (BPE with byte fallback).
fn read_vocab(dir: &Path, n_vocab: usize) -> Result<Vocab, TrainError> {
    let tp = dir.join("tokenizer.json");
    let mp = dir.join("tokenizer.model");
    let tj = if tp.is_file() {
        Some(read_json(&tp)?)
    } else {
        None
    };
    let sp_style = |tj: &Json| {
        let m = &tj["model"];
        m.get("byte_fallback").and_then(Json::as_bool) == Some(true)
            || m.get("type").and_then(Json::as_str) == Some("Unigram")
            || pre_name(tj).is_err_and(|e| e.starts_with("no ByteLevel"))
    };
    match &tj {
        Some(tj) if !sp_style(tj) => bpe_vocab(&tp, tj, n_vocab),
        _ if mp.is_file() => crate::sentencepiece::vocab_from_model(&mp, tj.as_ref(), n_vocab),
        Some(tj) => crate::sentencepiece::vocab_from_json(&tp, tj, n_vocab),
        None => Err(err(dir, "has no tokenizer.json or tokenizer.model")),
    }
}

/// The `tokenizer.*` metadata of the directory's vocabulary (+ `tokenizer_config.json`,
/// `generation_config.json`, `chat_template.jinja`), padded to `n_vocab` tokens.
fn tokenizer_meta(
    dir: &Path,
    c: &HfConfig,
    n_vocab: usize,
) -> Result<Vec<(String, Value)>, TrainError> {
    let v = read_vocab(dir, n_vocab)?;
    let ids = v.ids;
    let tcp = dir.join("tokenizer_config.json");
    let tc = if tcp.is_file() {
        read_json(&tcp)?
    } else {
        Json::Null
    };
    let gcp = dir.join("generation_config.json");
    let gc = if gcp.is_file() {
        read_json(&gcp)?
    } else {
        Json::Null
    };
    let first_id = |v: Option<&Json>| -> Option<u64> {
        let v = v?;
        v.as_u64()
            .or_else(|| v.as_array().and_then(|a| a.first()).and_then(Json::as_u64))
    };
    let special = |k: &str| -> Option<u64> {
        opt(&tc, k)
            .and_then(token_str)
            .and_then(|s| ids.get(s).copied())
            .or_else(|| first_id(opt(&gc, &format!("{k}_id"))))
            .or_else(|| first_id(opt(&c.j, &format!("{k}_id"))))
    };
    let bos = special("bos_token");
    let eos = special("eos_token");

    let mut out = vec![(
        "tokenizer.ggml.model".to_owned(),
        Value::String(v.model.into()),
    )];
    out.extend(v.entries);
    if let Some(b) = bos {
        out.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b as u32)));
    }
    if let Some(e) = eos {
        out.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e as u32)));
    }
    let add_bos = match opt(&tc, "add_bos_token").and_then(Json::as_bool) {
        Some(b) => b,
        // A `tokenizer.model` alone: LlamaTokenizer's default, BOS first.
        None if v.post_processor.is_null() && v.model == "llama" => true,
        None => post_processor_adds(&v.post_processor, bos, &ids),
    };
    out.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    if opt(&tc, "add_eos_token").and_then(Json::as_bool) == Some(true) {
        out.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(true)));
    }
    let template = match opt(&tc, "chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(Json::as_str)
            .map(str::to_owned),
        _ => {
            let jp = dir.join("chat_template.jinja");
            if jp.is_file() {
                Some(std::fs::read_to_string(&jp).map_err(TrainError::io(&jp))?)
            } else {
                None
            }
        }
    };
    if let Some(t) = template {
        out.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok(out)
}

/// Whether a `TemplateProcessing` post-processor (alone or in a `Sequence`) starts a single
/// sequence with the BOS token.
fn post_processor_adds(pp: &Json, bos: Option<u64>, ids: &HashMap<String, u64>) -> bool {
    let Some(bos) = bos else { return false };
    let procs: Vec<&Json> = match pp.get("type").and_then(Json::as_str) {
        Some("Sequence") => pp
            .get("processors")
            .and_then(Json::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        _ => vec![pp],
    };
    procs.iter().any(|p| {
        p.get("type").and_then(Json::as_str) == Some("TemplateProcessing")
            && p.get("single")
                .and_then(Json::as_array)
                .and_then(|s| s.first())
                .and_then(|first| first.get("SpecialToken"))
                .and_then(|s| s.get("id"))
                .and_then(Json::as_str)
                .and_then(|s| ids.get(s))
                == Some(&bos)
    })
}

/// llama.cpp's `tokenizer.ggml.pre` name for the pre-tokenizer `tokenizer.json` declares (the
/// rule is in the module doc).
fn pre_name(tj: &Json) -> Result<&'static str, String> {
    let pre = &tj["pre_tokenizer"];
    let list: Vec<&Json> = match pre.get("type").and_then(Json::as_str) {
        Some("Sequence") => pre
            .get("pretokenizers")
            .and_then(Json::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        Some(_) => vec![pre],
        None => vec![],
    };
    let ty = |p: &Json| {
        p.get("type")
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let types: Vec<String> = list.iter().map(|p| ty(p)).collect();
    let Some(bl) = list.iter().find(|p| ty(p) == "ByteLevel") else {
        return Err(format!("no ByteLevel pre-tokenizer (found {types:?})"));
    };
    if bl.get("add_prefix_space").and_then(Json::as_bool) == Some(true) {
        return Err("ByteLevel with add_prefix_space is not supported".into());
    }
    let regex = bl.get("use_regex").and_then(Json::as_bool).unwrap_or(true);
    let normalizer = tj["normalizer"]
        .get("type")
        .and_then(Json::as_str)
        .map(str::to_owned);
    let name = match (types.iter().map(String::as_str).collect::<Vec<_>>().as_slice(), regex) {
        (["ByteLevel"], true) => "gpt-2",
        (["Digits", "ByteLevel"], true)
            if list[0].get("individual_digits").and_then(Json::as_bool) == Some(true) =>
        {
            "smollm"
        }
        (["Split", "ByteLevel"], false) => {
            let r = list[0]
                .get("pattern")
                .and_then(|p| p.get("Regex"))
                .and_then(Json::as_str)
                .unwrap_or("");
            if r == ferrolm_tokenizer::LLAMA3_REGEX {
                "llama-bpe"
            } else if r == ferrolm_tokenizer::QWEN2_REGEX {
                "qwen2"
            } else {
                return Err(format!(
                    "the pre-tokenizer splits on the regex `{r}`, which is not one ferrolm knows (Llama 3's or Qwen2's)"
                ));
            }
        }
        _ => {
            return Err(format!(
                "the pre-tokenizer sequence {types:?} (ByteLevel use_regex: {regex}) is not one ferrolm knows: GPT-2's ByteLevel, SmolLM's Digits + ByteLevel, or a Llama 3 / Qwen2 regex Split + ByteLevel"
            ))
        }
    };
    match normalizer.as_deref() {
        None => {}
        Some("NFC") if name == "qwen2" => {}
        Some(other) => {
            return Err(format!(
                "the normalizer `{other}` is not supported with the `{name}` pre-tokenizer"
            ))
        }
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_rows_interleaves_rope_pairs_per_head() {
        // 2 heads of 4 rows, one byte per row: HF (0 1 | 2 3) pairs (0,2), (1,3).
        let b: Vec<u8> = (0..8).collect();
        assert_eq!(permute_rows(&b, 2, 8), vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn llama_names_match_the_training_checkpoints() {
        assert_eq!(
            llama_gguf_name("model.layers.3.self_attn.k_proj.weight").as_deref(),
            Some("blk.3.attn_k.weight")
        );
        assert_eq!(
            llama_gguf_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(
            llama_gguf_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(llama_gguf_name("model.layers.0.unknown"), None);
    }
}
