//! A training run's configuration in two steps (STYLE 10): [`ConfigFile`], shaped like the
//! TOML/JSON file and the command-line flags (every field optional, unknown keys rejected),
//! then [`RunConfig`], validated, with every default filled in from one place:
//! [`ConfigFile::defaults`] — nanoGPT's shakespeare-char CPU configuration.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::ModelConfig;
use crate::optim::{AdamWConfig, Schedule};
use crate::TrainError;

/// The file form. Flags given on the command line are the same struct, merged over the file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub model: ModelFile,
    #[serde(default)]
    pub train: LoopFile,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    pub layers: Option<usize>,
    pub heads: Option<usize>,
    pub kv_heads: Option<usize>,
    pub width: Option<usize>,
    pub ffn: Option<usize>,
    pub context: Option<usize>,
    pub rope_theta: Option<f32>,
    pub rms_eps: Option<f32>,
    pub tied_embeddings: Option<bool>,
}

impl From<&ModelConfig> for ModelFile {
    /// A resolved model as the file form, every field set (the base a resume merges flags over).
    fn from(m: &ModelConfig) -> Self {
        ModelFile {
            layers: Some(m.n_layers),
            heads: Some(m.n_heads),
            kv_heads: Some(m.n_kv_heads),
            width: Some(m.dim),
            ffn: Some(m.ffn_dim),
            context: Some(m.context),
            rope_theta: Some(m.rope_theta),
            rms_eps: Some(m.rms_eps),
            tied_embeddings: Some(m.tied_embeddings),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopFile {
    pub batch: Option<usize>,
    pub iters: Option<u64>,
    pub lr: Option<f32>,
    pub min_lr: Option<f32>,
    pub warmup: Option<u64>,
    pub decay_iters: Option<u64>,
    pub weight_decay: Option<f32>,
    pub beta1: Option<f32>,
    pub beta2: Option<f32>,
    pub grad_clip: Option<f32>,
    pub grad_accum: Option<usize>,
    pub eval_every: Option<u64>,
    pub eval_iters: Option<usize>,
    pub seed: Option<u64>,
    pub sample_tokens: Option<usize>,
    pub keep: Option<usize>,
}

/// The validated loop settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopConfig {
    pub batch: usize,
    pub iters: u64,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
    pub decay_iters: u64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub grad_clip: f32,
    pub grad_accum: usize,
    pub eval_every: u64,
    pub eval_iters: usize,
    pub seed: u64,
    pub sample_tokens: usize,
    pub keep: usize,
}

impl LoopConfig {
    pub fn schedule(&self) -> Schedule {
        Schedule {
            lr: self.lr,
            min_lr: self.min_lr,
            warmup: self.warmup,
            decay_iters: self.decay_iters,
        }
    }
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: 1e-8,
            weight_decay: self.weight_decay,
        }
    }
}

/// Model and loop, as saved in `RUN_DIR/config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub train: LoopConfig,
}

impl ConfigFile {
    /// Every default, each with its reason.
    pub fn defaults() -> ConfigFile {
        ConfigFile {
            model: ModelFile {
                // nanoGPT shakespeare-char on CPU: 4 layers, 4 heads, width 128, context 64.
                layers: Some(4),
                heads: Some(4),
                kv_heads: None, // = heads (plain multi-head attention)
                width: Some(128),
                ffn: None, // SwiGLU at 8/3·width (rounded up to 8): a 4× GELU MLP's parameters
                context: Some(64),
                rope_theta: Some(10_000.0),
                rms_eps: Some(1e-5),
                // nanoGPT ties the output head to the embedding.
                tied_embeddings: Some(true),
            },
            train: LoopFile {
                batch: Some(12),
                iters: Some(2000),
                lr: Some(1e-3),
                min_lr: None,      // lr / 10 (Chinchilla)
                warmup: Some(100), // nanoGPT shakespeare-char
                decay_iters: None, // = iters
                weight_decay: Some(0.1),
                beta1: Some(0.9),
                beta2: Some(0.99), // small-batch runs: nanoGPT's shakespeare-char setting
                grad_clip: Some(1.0),
                grad_accum: Some(1),
                eval_every: Some(250),
                eval_iters: Some(20),
                seed: Some(1337),
                sample_tokens: Some(200),
                keep: Some(3),
            },
        }
    }

    /// Read a TOML (`.toml`) or JSON file; unknown keys are errors naming the key.
    pub fn read(path: &Path) -> Result<ConfigFile, TrainError> {
        let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
        let bad = |reason: String| TrainError::Config {
            what: path.display().to_string(),
            reason,
        };
        if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
        } else {
            toml::from_str(&text).map_err(|e| bad(e.to_string()))
        }
    }

    /// `self` with every field that `over` sets replaced.
    pub fn merged(mut self, over: &ConfigFile) -> ConfigFile {
        macro_rules! take {
            ($sec:ident: $($f:ident),*) => { $( if over.$sec.$f.is_some() { self.$sec.$f = over.$sec.$f; } )* };
        }
        take!(model: layers, heads, kv_heads, width, ffn, context, rope_theta, rms_eps, tied_embeddings);
        take!(train: batch, iters, lr, min_lr, warmup, decay_iters, weight_decay, beta1, beta2,
            grad_clip, grad_accum, eval_every, eval_iters, seed, sample_tokens, keep);
        self
    }

    /// Fill defaults and validate, for a vocabulary of `vocab_size` tokens.
    pub fn resolve(&self, vocab_size: usize) -> Result<RunConfig, TrainError> {
        let f = ConfigFile::defaults().merged(self);
        let bad = |reason: String| TrainError::Config {
            what: "the model/training configuration".into(),
            reason,
        };
        let (m, t) = (&f.model, &f.train);
        let req = |v: Option<usize>, name: &str| v.ok_or_else(|| bad(format!("{name} is not set")));
        let width = req(m.width, "width")?;
        let heads = req(m.heads, "heads")?;
        let model = ModelConfig {
            vocab_size,
            dim: width,
            n_layers: req(m.layers, "layers")?,
            n_heads: heads,
            n_kv_heads: m.kv_heads.unwrap_or(heads),
            ffn_dim: m.ffn.unwrap_or((8 * width / 3).div_ceil(8) * 8),
            context: req(m.context, "context")?,
            rope_theta: m.rope_theta.unwrap_or(10_000.0),
            rms_eps: m.rms_eps.unwrap_or(1e-5),
            tied_embeddings: m.tied_embeddings.unwrap_or(true),
        };
        model.validate().map_err(bad)?;
        let iters = t.iters.unwrap_or(2000);
        let lr = t.lr.unwrap_or(1e-3);
        let train = LoopConfig {
            batch: req(t.batch, "batch")?,
            iters,
            lr,
            min_lr: t.min_lr.unwrap_or(lr / 10.0),
            // Not clamped to `iters`: nanoGPT warms up over `warmup` steps, past the end if need be,
            // and a resumed run must accept the flags that made it.
            warmup: t.warmup.unwrap_or(100),
            decay_iters: t.decay_iters.unwrap_or(iters),
            weight_decay: t.weight_decay.unwrap_or(0.1),
            beta1: t.beta1.unwrap_or(0.9),
            beta2: t.beta2.unwrap_or(0.99),
            grad_clip: t.grad_clip.unwrap_or(1.0),
            grad_accum: t.grad_accum.unwrap_or(1),
            eval_every: t.eval_every.unwrap_or(250),
            eval_iters: t.eval_iters.unwrap_or(20),
            seed: t.seed.unwrap_or(1337),
            sample_tokens: t.sample_tokens.unwrap_or(200),
            keep: t.keep.unwrap_or(3),
        };
        let checks: [(bool, &str); 9] = [
            (train.batch >= 1, "batch must be at least 1"),
            (train.grad_accum >= 1, "grad_accum must be at least 1"),
            (train.eval_every >= 1, "eval_every must be at least 1"),
            (train.eval_iters >= 1, "eval_iters must be at least 1"),
            (
                train.keep >= 1,
                "keep must be at least 1 (the latest checkpoint is always kept)",
            ),
            (lr > 0.0 && lr.is_finite(), "lr must be a positive number"),
            (
                train.min_lr >= 0.0 && train.min_lr <= lr,
                "min_lr must be in [0, lr]",
            ),
            (
                (0.0..1.0).contains(&train.beta1) && (0.0..1.0).contains(&train.beta2),
                "beta1 and beta2 must be in [0, 1)",
            ),
            (
                train.weight_decay >= 0.0 && train.grad_clip >= 0.0,
                "weight_decay and grad_clip must be ≥ 0 (grad_clip 0 disables clipping)",
            ),
        ];
        for (ok, msg) in checks {
            if !ok {
                return Err(bad(msg.into()));
            }
        }
        Ok(RunConfig { model, train })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_nanogpts_shakespeare_char_run() {
        let c = ConfigFile::default().resolve(65).unwrap();
        assert_eq!(
            (
                c.model.n_layers,
                c.model.n_heads,
                c.model.dim,
                c.model.context
            ),
            (4, 4, 128, 64)
        );
        assert_eq!(c.model.ffn_dim, 344);
        assert_eq!((c.train.batch, c.train.iters), (12, 2000));
        assert!((c.train.min_lr - 1e-4).abs() < 1e-9);
        // within 10% of nanoGPT's 0.80M (its count without position embeddings)
        let p = c.model.n_params() as f64;
        assert!((p / 0.80e6 - 1.0).abs() < 0.1, "{p}");
    }

    #[test]
    fn the_documented_example_is_the_defaults() {
        let text = include_str!("../../../docs/train.example.toml");
        let f: ConfigFile = toml::from_str(text).unwrap();
        assert_eq!(
            f.resolve(65).unwrap(),
            ConfigFile::default().resolve(65).unwrap()
        );
    }

    #[test]
    fn bad_shapes_and_unknown_keys_are_errors() {
        let mut f = ConfigFile::default();
        f.model.heads = Some(0);
        assert!(f
            .resolve(65)
            .unwrap_err()
            .to_string()
            .contains("n_heads must be at least 1"));
        f.model.heads = Some(3);
        assert!(f
            .resolve(65)
            .unwrap_err()
            .to_string()
            .contains("not divisible"));
        let e = toml::from_str::<ConfigFile>("[model]\nlayrs = 2\n").unwrap_err();
        assert!(e.to_string().contains("layrs"), "{e}");
    }
}
