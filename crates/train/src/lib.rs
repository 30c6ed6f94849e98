//! Training: from a text corpus to a model file that `chat`, `generate`, `eval` and `serve`
//! load directly (see `docs/STYLE.md`, "training").
//!
//! * [`tokenize`] — train a char-level or byte-level BPE vocabulary, or reuse a model's;
//!   a vocabulary is stored as a tensor-less GGUF (`tokenizer.gguf`), read by the same
//!   `ferrolm_tokenizer::Tokenizer::from_gguf` that inference uses.
//! * [`data`] — token shards (header + tokens, memory-mapped) and seeded, resumable batches.
//! * [`model`] — the Llama architecture with a hand-written forward and backward over a flat
//!   parameter buffer (fused kernels; the slow obviously-correct path lives in the tests).
//! * [`optim`] — AdamW and the learning-rate schedule.
//! * [`trainer`] — the one training loop (schedule, accumulation, clipping, AdamW,
//!   evaluation, checkpoints, exact resume) and its objectives; [`run`] is pretraining,
//!   [`finetune`] SFT, [`dpo`] preference tuning, [`reward`] reward models, [`rl`]
//!   reinforcement learning (GRPO/RLOO on the policy's own samples) and [`distill`]
//!   distillation from a teacher, on full weights, LoRA or QLoRA (RL and reward models: LoRA
//!   and QLoRA).
//! * [`export`] — a checkpoint as GGUF (f32, f16, q8_0).
//! * [`grader`] — OpenAI's fine-tuning graders (string_check, text_similarity, score_model,
//!   multi), the reward of reinforcement fine-tuning.

pub mod base;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod distill;
pub mod dpo;
pub mod error;
pub mod export;
pub mod finetune;
pub mod grader;
pub mod hf;
pub mod lora;
pub mod model;
pub mod ops;
pub mod optim;
pub mod peft;
pub mod reward;
pub mod rl;
pub mod run;
pub mod sentencepiece;
pub mod sft;
pub mod tokenize;
pub(crate) mod trainer;

pub use error::TrainError;
