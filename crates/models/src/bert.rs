//! BERT as a sentence encoder (all-MiniLM-L6-v2 and its kin): token ids in, one pooled,
//! normalised vector per text out.
//!
//! An encoder has no KV cache, no causal mask and no logits, so it does not go through the
//! decoder's `forward(&Batch, &mut KvCache, &mut Scratch)`: [`Bert::embed_batch`] runs whole
//! sequences (their rows stacked for the dense layers) with full (bidirectional) attention
//! within each, and pools each. Weights are the f32
//! `model.safetensors` of a Hugging Face / sentence-transformers directory, read as they are
//! (no repacking): post-LayerNorm blocks, erf GELU, absolute position embeddings, token type 0.
//! Every matrix product goes through `gemm`.
//!
//! Top-down: the directory's config → weights → [`Bert::load`] → [`Bert::embed`].

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::mat::{gemm, Mat, Par};
use crate::ModelError;

/// How token vectors become one text vector (sentence-transformers' `1_Pooling/config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The average over the tokens (`pooling_mode_mean_tokens`).
    Mean,
    /// The first token's (`[CLS]`) vector (`pooling_mode_cls_token`).
    Cls,
}

/// `config.json` of a `BertModel`, plus the sentence-transformers modules around it.
#[derive(Debug, Clone)]
pub struct BertConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub ffn: usize,
    /// Positions the model has embeddings for: the longest input it takes.
    pub max_positions: usize,
    pub type_vocab: usize,
    pub eps: f32,
    pub pooling: Pooling,
    /// A `Normalize` module follows pooling (unit-length vectors).
    pub normalize: bool,
}

fn config_err(path: &Path, key: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Config {
        path: path.display().to_string(),
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| config_err(path, "(file)", format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| config_err(path, "(file)", format!("not JSON: {e}")))
}

impl BertConfig {
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let v = read_json(&path)?;
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        if model_type != "bert" {
            return Err(config_err(
                &path,
                "model_type",
                format!("`{model_type}`: only `bert` encoders are supported"),
            ));
        }
        let int = |key: &str| -> Result<usize, ModelError> {
            v.get(key)
                .and_then(Value::as_u64)
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| config_err(&path, key, "missing or not a positive integer"))
        };
        let act = v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu");
        if act != "gelu" {
            return Err(config_err(
                &path,
                "hidden_act",
                format!("`{act}`: only `gelu` (erf) is supported"),
            ));
        }
        let pos = v
            .get("position_embedding_type")
            .and_then(Value::as_str)
            .unwrap_or("absolute");
        if pos != "absolute" {
            return Err(config_err(
                &path,
                "position_embedding_type",
                format!("`{pos}`: only `absolute` is supported"),
            ));
        }
        let cfg = BertConfig {
            vocab: int("vocab_size")?,
            hidden: int("hidden_size")?,
            layers: int("num_hidden_layers")?,
            heads: int("num_attention_heads")?,
            ffn: int("intermediate_size")?,
            max_positions: int("max_position_embeddings")?,
            type_vocab: int("type_vocab_size")?,
            eps: v
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-12) as f32,
            pooling: pooling_of(dir)?,
            normalize: normalize_of(dir)?,
        };
        if !cfg.hidden.is_multiple_of(cfg.heads) {
            return Err(config_err(
                &path,
                "num_attention_heads",
                format!("{} does not divide hidden_size {}", cfg.heads, cfg.hidden),
            ));
        }
        Ok(cfg)
    }
}

/// `1_Pooling/config.json` (mean pooling when the directory has none, as sentence-transformers
/// does for a bare transformers model).
fn pooling_of(dir: &Path) -> Result<Pooling, ModelError> {
    let path = dir.join("1_Pooling").join("config.json");
    if !path.exists() {
        return Ok(Pooling::Mean);
    }
    let v = read_json(&path)?;
    let on = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
    match (on("pooling_mode_mean_tokens"), on("pooling_mode_cls_token")) {
        (true, false) => Ok(Pooling::Mean),
        (false, true) => Ok(Pooling::Cls),
        _ => Err(config_err(
            &path,
            "pooling_mode_*",
            "exactly one of mean-tokens and cls-token pooling is supported",
        )),
    }
}

/// Whether `modules.json` lists a `Normalize` module.
fn normalize_of(dir: &Path) -> Result<bool, ModelError> {
    let path = dir.join("modules.json");
    if !path.exists() {
        return Ok(false);
    }
    let v = read_json(&path)?;
    let mods = v
        .as_array()
        .ok_or_else(|| config_err(&path, "(file)", "not a list of modules"))?;
    Ok(mods.iter().any(|m| {
        m.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.ends_with(".Normalize"))
    }))
}

// ---- weights ------------------------------------------------------------------------------

/// A dense layer: `w` is `[out, in]` row-major (PyTorch's layout), `y = x·wᵀ + b`.
#[derive(Debug)]
struct Dense {
    w: Vec<f32>,
    b: Vec<f32>,
    n_in: usize,
    n_out: usize,
}

#[derive(Debug)]
struct Norm {
    w: Vec<f32>,
    b: Vec<f32>,
}

#[derive(Debug)]
struct Layer {
    q: Dense,
    k: Dense,
    v: Dense,
    o: Dense,
    attn_norm: Norm,
    up: Dense,
    down: Dense,
    out_norm: Norm,
}

/// A loaded BERT encoder.
#[derive(Debug)]
pub struct Bert {
    pub cfg: BertConfig,
    pub dir: PathBuf,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    emb_norm: Norm,
    layers: Vec<Layer>,
}

struct Weights<'a> {
    st: SafeTensors<'a>,
    path: &'a Path,
    /// `bert.` when the checkpoint is a `BertFor…` head model, else empty.
    prefix: &'static str,
}

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let full = format!("{}{name}", self.prefix);
        let err = |reason: String| ModelError::Tensor {
            path: self.path.display().to_string(),
            name: full.clone(),
            reason,
        };
        let t = self
            .st
            .tensor(&full)
            .map_err(|_| err("missing".to_owned()))?;
        if t.dtype() != Dtype::F32 {
            return Err(err(format!("dtype {:?}, expected F32", t.dtype())));
        }
        if t.shape() != shape {
            return Err(err(format!("shape {:?}, expected {shape:?}", t.shape())));
        }
        Ok(t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    fn dense(&self, name: &str, n_out: usize, n_in: usize) -> Result<Dense, ModelError> {
        Ok(Dense {
            w: self.get(&format!("{name}.weight"), &[n_out, n_in])?,
            b: self.get(&format!("{name}.bias"), &[n_out])?,
            n_in,
            n_out,
        })
    }

    fn norm(&self, name: &str, n: usize) -> Result<Norm, ModelError> {
        Ok(Norm {
            w: self.get(&format!("{name}.weight"), &[n])?,
            b: self.get(&format!("{name}.bias"), &[n])?,
        })
    }
}

impl Bert {
    /// Load a sentence-transformers / Hugging Face BERT directory (`config.json`,
    /// `model.safetensors`, optionally `1_Pooling/config.json` and `modules.json`).
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let cfg = BertConfig::from_dir(dir)?;
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path)
            .map_err(|e| config_err(&path, "(file)", format!("cannot read: {e}")))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| config_err(&path, "(file)", format!("not a safetensors file: {e}")))?;
        let prefix = if st.tensor("embeddings.word_embeddings.weight").is_ok() {
            ""
        } else {
            "bert."
        };
        let w = Weights {
            st,
            path: &path,
            prefix,
        };
        let (h, f) = (cfg.hidden, cfg.ffn);
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                q: w.dense(&format!("{p}.attention.self.query"), h, h)?,
                k: w.dense(&format!("{p}.attention.self.key"), h, h)?,
                v: w.dense(&format!("{p}.attention.self.value"), h, h)?,
                o: w.dense(&format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: w.norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                up: w.dense(&format!("{p}.intermediate.dense"), f, h)?,
                down: w.dense(&format!("{p}.output.dense"), h, f)?,
                out_norm: w.norm(&format!("{p}.output.LayerNorm"), h)?,
            });
        }
        Ok(Bert {
            word: w.get("embeddings.word_embeddings.weight", &[cfg.vocab, h])?,
            position: w.get(
                "embeddings.position_embeddings.weight",
                &[cfg.max_positions, h],
            )?,
            token_type: w.get(
                "embeddings.token_type_embeddings.weight",
                &[cfg.type_vocab, h],
            )?,
            emb_norm: w.norm("embeddings.LayerNorm", h)?,
            layers,
            dir: dir.to_owned(),
            cfg,
        })
    }

    /// The length of each output vector.
    pub fn dim(&self) -> usize {
        self.cfg.hidden
    }

    /// Parameter count of the encoder (the unused pooler head is not loaded).
    pub fn n_params(&self) -> usize {
        let dense = |d: &Dense| d.w.len() + d.b.len();
        let norm = |n: &Norm| n.w.len() + n.b.len();
        self.word.len()
            + self.position.len()
            + self.token_type.len()
            + norm(&self.emb_norm)
            + self
                .layers
                .iter()
                .map(|l| {
                    dense(&l.q)
                        + dense(&l.k)
                        + dense(&l.v)
                        + dense(&l.o)
                        + norm(&l.attn_norm)
                        + dense(&l.up)
                        + dense(&l.down)
                        + norm(&l.out_norm)
                })
                .sum::<usize>()
    }

    /// The pooled (and, when the model says so, unit-length) vector of one sequence of token
    /// ids, special tokens included. Refuses an empty sequence, one longer than
    /// `max_positions`, and ids outside the vocabulary.
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        let mut v = self.embed_batch(&[ids])?;
        Ok(v.pop().unwrap_or_default())
    }

    /// [`Bert::embed`] of several sequences at once: their tokens go through every dense layer
    /// as one matrix (many short texts make one large product instead of many small ones);
    /// attention and pooling stay within each sequence, so each vector is what it would be
    /// alone, up to the summation order of the products.
    pub fn embed_batch(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        let cfg = &self.cfg;
        let h = cfg.hidden;
        for ids in seqs {
            self.check(ids)?;
        }
        let t: usize = seqs.iter().map(|s| s.len()).sum();
        if t == 0 {
            return Ok(Vec::new());
        }
        // Where each sequence's rows start.
        let starts: Vec<usize> = seqs
            .iter()
            .scan(0, |at, s| {
                let start = *at;
                *at += s.len();
                Some(start)
            })
            .collect();
        // Embeddings: word + position (within its sequence) + token type 0, then LayerNorm.
        let mut x = vec![0f32; t * h];
        let ty = &self.token_type[..h];
        for (ids, &start) in seqs.iter().zip(&starts) {
            for (i, &id) in ids.iter().enumerate() {
                let row = &mut x[(start + i) * h..][..h];
                let w = &self.word[id as usize * h..][..h];
                let p = &self.position[i * h..][..h];
                for j in 0..h {
                    row[j] = w[j] + p[j] + ty[j];
                }
            }
        }
        layer_norm(&mut x, &self.emb_norm, h, cfg.eps);

        let (nh, hd) = (cfg.heads, h / cfg.heads);
        let scale = 1.0 / (hd as f32).sqrt();
        let longest = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut q = vec![0f32; t * h];
        let mut k = vec![0f32; t * h];
        let mut v = vec![0f32; t * h];
        let mut ctx = vec![0f32; t * h];
        let mut tmp = vec![0f32; t * h];
        let mut scores = vec![0f32; longest * longest];
        let mut up = vec![0f32; t * cfg.ffn];
        for l in &self.layers {
            dense(&mut q, &x, &l.q, t);
            dense(&mut k, &x, &l.k, t);
            dense(&mut v, &x, &l.v, t);
            for (ids, &start) in seqs.iter().zip(&starts) {
                let n = ids.len();
                let scores = &mut scores[..n * n];
                for head in 0..nh {
                    let off = start * h + head * hd;
                    // scores (n×n) = scale · Q_h (n×hd) · K_hᵀ (hd×n); Q_h and K_h are column
                    // slices of this sequence's rows of q and k (row stride h).
                    let (qh, kh) = (Mat::rows(&q[off..], h), Mat::rows(&k[off..], h).t());
                    gemm(scores, n, qh, kh, (n, n, hd), false, scale, Par::Pool);
                    for row in scores.chunks_exact_mut(n) {
                        softmax(row);
                    }
                    // ctx_h (n×hd, row stride h) = P (n×n) · V_h (n×hd).
                    let (p, vh) = (Mat::rows(scores, n), Mat::rows(&v[off..], h));
                    gemm(&mut ctx[off..], h, p, vh, (n, hd, n), false, 1.0, Par::Pool);
                }
            }
            dense(&mut tmp, &ctx, &l.o, t);
            add_norm(&mut x, &tmp, &l.attn_norm, h, cfg.eps);
            dense(&mut up, &x, &l.up, t);
            up.iter_mut().for_each(|u| *u = gelu(*u));
            dense(&mut tmp, &up, &l.down, t);
            add_norm(&mut x, &tmp, &l.out_norm, h, cfg.eps);
        }

        Ok(seqs
            .iter()
            .zip(&starts)
            .map(|(ids, &start)| self.pool(&x[start * h..(start + ids.len()) * h]))
            .collect())
    }

    fn check(&self, ids: &[u32]) -> Result<(), ModelError> {
        let cfg = &self.cfg;
        if ids.is_empty() {
            return Err(ModelError::Batch("an embedding input has no tokens".into()));
        }
        if ids.len() > cfg.max_positions {
            return Err(ModelError::Batch(format!(
                "{} tokens, but the model takes at most {}",
                ids.len(),
                cfg.max_positions
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= cfg.vocab) {
            return Err(ModelError::Batch(format!(
                "token id {bad} is outside the vocabulary (0..{})",
                cfg.vocab
            )));
        }
        Ok(())
    }

    /// One sequence's final hidden rows → its vector.
    fn pool(&self, x: &[f32]) -> Vec<f32> {
        let cfg = &self.cfg;
        let h = cfg.hidden;
        let t = x.len() / h;
        let mut out = match cfg.pooling {
            Pooling::Cls => x[..h].to_vec(),
            Pooling::Mean => {
                let mut acc = vec![0f64; h];
                for row in x.chunks_exact(h) {
                    for (a, &r) in acc.iter_mut().zip(row) {
                        *a += r as f64;
                    }
                }
                acc.iter().map(|&a| (a / t as f64) as f32).collect()
            }
        };
        if cfg.normalize {
            let norm = out.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
            // sentence-transformers' Normalize: x / max(‖x‖, 1e-12).
            let inv = 1.0 / norm.max(1e-12);
            out.iter_mut().for_each(|a| *a = (*a as f64 * inv) as f32);
        }
        out
    }
}

// ---- leaf operations ----------------------------------------------------------------------

/// `y (t×out) = x (t×in) · wᵀ + b`.
fn dense(y: &mut [f32], x: &[f32], d: &Dense, t: usize) {
    let y = &mut y[..t * d.n_out];
    let (x, w) = (Mat::rows(x, d.n_in), Mat::rows(&d.w, d.n_in).t());
    gemm(
        y,
        d.n_out,
        x,
        w,
        (t, d.n_out, d.n_in),
        false,
        1.0,
        Par::Pool,
    );
    for row in y.chunks_exact_mut(d.n_out) {
        for (a, &b) in row.iter_mut().zip(&d.b) {
            *a += b;
        }
    }
}

/// LayerNorm over each row of `x` (statistics in f64).
fn layer_norm(x: &mut [f32], n: &Norm, h: usize, eps: f32) {
    for row in x.chunks_exact_mut(h) {
        let mean = row.iter().map(|&a| a as f64).sum::<f64>() / h as f64;
        let var = row.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / h as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for ((a, &w), &b) in row.iter_mut().zip(&n.w).zip(&n.b) {
            *a = ((*a as f64 - mean) * inv) as f32 * w + b;
        }
    }
}

/// Post-LayerNorm residual: `x = LayerNorm(x + y)`.
fn add_norm(x: &mut [f32], y: &[f32], n: &Norm, h: usize, eps: f32) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
    layer_norm(x, n, h, eps);
}

fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for a in row.iter_mut() {
        *a = (*a - max).exp();
        sum += *a;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|a| *a *= inv);
}

/// GELU with the exact erf (BERT's `gelu`, not the tanh approximation).
fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
}

/// erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7, below f32 resolution of the
/// activations it feeds).
fn erf(x: f64) -> f64 {
    let s = x.signum();
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let p = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    s * (1.0 - p * (-x * x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_8),
            (1.0, 0.842_700_792_9),
            (-2.0, -0.995_322_265_0),
            (3.0, 0.999_977_909_5),
        ] {
            assert!((erf(x) - want).abs() < 2e-7, "erf({x}) = {}", erf(x));
        }
    }
}
