//! The environment of `ferrolm finetune --method rl` (and of `reinforcement` fine-tuning
//! jobs): samples drawn by the inference engine from the base with the policy's current
//! adapter, scored by a reward model (its engine, its score head) or an OpenAI grader, whose
//! `score_model` judges are local models answering through their own engines.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use ferrolm_engine::{Adapter, Engine, EngineConfig, GenerateOptions, Job};
use ferrolm_tokenizer::{chat::ChatTemplate, Tokenizer};
use ferrolm_train::grader::{Grader, Judge, Sample};
use ferrolm_train::rl::{Completion, RlConfig, RlEnv, RlItem, Scorer};
use serde_json::{json, Value};

use crate::{load, ModelArgs};

/// A model behind an engine of its own.
struct Local {
    engine: Engine,
    tok: Arc<Tokenizer>,
    template: ChatTemplate,
    end_ids: Vec<u32>,
}

impl Local {
    /// `model` with an engine for `rows` requests of up to `tokens` tokens at once.
    fn open(model: &Path, rows: usize, tokens: usize, threads: usize) -> Result<Local> {
        let m = load(&ModelArgs {
            model: Some(model.to_owned()),
        })?;
        Local::with(m, rows, tokens, threads)
    }

    fn with(m: crate::Loaded, rows: usize, tokens: usize, threads: usize) -> Result<Local> {
        let end_ids = m.end_ids();
        let tok = Arc::new(m.tok);
        let block = 16;
        let engine = Engine::new(
            Arc::new(m.model),
            tok.clone(),
            EngineConfig {
                block_size: block,
                num_blocks: rows.max(1) * tokens.div_ceil(block).max(1) + 16,
                max_running: rows.max(1),
                max_batch_tokens: 512,
                threads,
                ..EngineConfig::default()
            },
        )?;
        Ok(Local {
            engine,
            tok,
            template: m.template,
            end_ids,
        })
    }

    fn opts(&self, temperature: f32, top_p: f32, max_tokens: usize, seed: u64) -> GenerateOptions {
        GenerateOptions {
            params: ferrolm_sample::SamplingParams {
                temperature,
                top_p: if temperature > 0.0 { top_p } else { 1.0 },
                ..Default::default()
            },
            max_tokens,
            stop: Vec::new(),
            end_ids: self.end_ids.clone(),
            seed,
            grammar: None,
        }
    }
}

/// How samples are scored.
enum Scoring {
    /// A reward model: its base in an engine, and the adapter with the score head.
    Reward {
        rm: Box<Local>,
        adapter: Arc<Adapter>,
    },
    Grader {
        grader: Box<Grader>,
        judges: Judges,
    },
}

/// The local models `score_model` graders name, each opened on first use.
pub struct Judges {
    threads: usize,
    open: HashMap<String, Local>,
}

impl Judge for Judges {
    fn complete(
        &mut self,
        model: &str,
        messages: &[Value],
        sampling: &Value,
    ) -> std::result::Result<String, String> {
        if !self.open.contains_key(model) {
            let path = crate::store::resolve(Some(Path::new(model)))
                .map_err(|e| format!("score_model grader: model `{model}`: {e:#}"))?;
            let l = Local::open(&path, 1, 4096, self.threads)
                .map_err(|e| format!("score_model grader: model `{model}`: {e:#}"))?;
            self.open.insert(model.to_owned(), l);
        }
        let l = self
            .open
            .get_mut(model)
            .ok_or_else(|| format!("score_model grader: model `{model}` is not open"))?;
        let ids = l
            .template
            .render(&l.tok, &Value::Array(messages.to_vec()), true, None)
            .and_then(|r| l.tok.encode_chat(&r))
            .map_err(|e| format!("score_model grader: {e}"))?;
        let num = |k: &str| sampling.get(k).and_then(Value::as_f64);
        let opts = l.opts(
            num("temperature").unwrap_or(0.0) as f32,
            num("top_p").unwrap_or(1.0) as f32,
            num("max_completions_tokens")
                .or(num("max_tokens"))
                .unwrap_or(64.0) as usize,
            num("seed").unwrap_or(0.0) as u64,
        );
        let done = l
            .engine
            .run_all(vec![Job {
                prompt: ids,
                opts,
                adapter: None,
            }])
            .map_err(|e| format!("score_model grader `{model}`: {e}"))?;
        match done.into_iter().next() {
            Some(Ok(d)) => Ok(d.text),
            Some(Err(e)) => Err(format!("score_model grader `{model}`: {}", e.message)),
            None => Err(format!("score_model grader `{model}`: no reply")),
        }
    }
}

/// The CLI's [`RlEnv`]: the policy's engine, and its scoring.
pub struct EngineEnv {
    policy: Local,
    top_p: f32,
    max_tokens: usize,
    scoring: Scoring,
}

impl EngineEnv {
    /// The environment of an RL run on `base` as `cfg` says: `rows` samples at once (the
    /// step's prompts × samples each), each up to `tokens` tokens (prompt and reply).
    pub fn open(
        base: &Path,
        cfg: &RlConfig,
        rows: usize,
        tokens: usize,
        threads: usize,
    ) -> Result<EngineEnv> {
        let policy = Local::open(base, rows, tokens, threads)?;
        let scoring = match &cfg.scorer {
            Scorer::RewardModel { path } => {
                let rm = crate::eval::RewardModel::open(path, None, "--reward-model")?;
                Scoring::Reward {
                    rm: Box::new(Local::with(rm.base, rows, tokens, threads)?),
                    adapter: rm.adapter,
                }
            }
            Scorer::Grader { grader } => Scoring::Grader {
                grader: Box::new(
                    Grader::parse(grader).map_err(|e| anyhow::anyhow!("the grader: {e}"))?,
                ),
                judges: Judges {
                    threads,
                    open: HashMap::new(),
                },
            },
        };
        Ok(EngineEnv {
            policy,
            top_p: cfg.top_p,
            max_tokens: cfg.max_tokens,
            scoring,
        })
    }
}

impl RlEnv for EngineEnv {
    fn rollouts(
        &mut self,
        adapter: Arc<Adapter>,
        prompts: &[&[u32]],
        k: usize,
        temperature: f32,
        seed: u64,
    ) -> std::result::Result<Vec<Vec<Completion>>, String> {
        let mut jobs = Vec::with_capacity(prompts.len() * k);
        for (i, p) in prompts.iter().enumerate() {
            for j in 0..k {
                jobs.push(Job {
                    prompt: p.to_vec(),
                    opts: self.policy.opts(
                        temperature,
                        self.top_p,
                        self.max_tokens,
                        seed.wrapping_add((i * k + j) as u64),
                    ),
                    adapter: Some(adapter.clone()),
                });
            }
        }
        let done = self
            .policy
            .engine
            .run_all(jobs)
            .map_err(|e| e.to_string())?;
        let mut out: Vec<Vec<Completion>> = Vec::with_capacity(prompts.len());
        for (n, d) in done.into_iter().enumerate() {
            let d = d.map_err(|e| {
                format!(
                    "sample {} of prompt {}: {}",
                    n % k + 1,
                    n / k + 1,
                    e.message
                )
            })?;
            if n % k == 0 {
                out.push(Vec::with_capacity(k));
            }
            if let Some(g) = out.last_mut() {
                g.push(Completion {
                    truncated: d.reason == Some(ferrolm_engine::FinishReason::Length),
                    ids: d.ids,
                    text: d.text,
                });
            }
        }
        Ok(out)
    }

    fn rewards(
        &mut self,
        items: &[&RlItem],
        samples: &[Vec<Completion>],
    ) -> std::result::Result<Vec<Vec<f64>>, String> {
        match &mut self.scoring {
            Scoring::Reward { rm, adapter } => {
                // The conversation with each reply, rendered by the reward model's template.
                let mut jobs = Vec::new();
                for (it, group) in items.iter().zip(samples) {
                    for c in group {
                        let mut msgs = it.item["messages"].as_array().cloned().unwrap_or_default();
                        msgs.push(json!({"role": "assistant", "content": c.text}));
                        let ids = rm
                            .template
                            .conversation_ids(&rm.tok, &Value::Array(msgs), it.item.get("tools"))
                            .map_err(|e| format!("line {}: {e}", it.line))?;
                        jobs.push(Job {
                            prompt: ids,
                            opts: rm.opts(0.0, 1.0, 1, 0),
                            adapter: Some(adapter.clone()),
                        });
                    }
                }
                let done = rm.engine.run_all(jobs).map_err(|e| e.to_string())?;
                let mut scores = done.into_iter();
                let mut out = Vec::with_capacity(samples.len());
                for group in samples {
                    let mut g = Vec::with_capacity(group.len());
                    for _ in group {
                        let d = scores
                            .next()
                            .ok_or("the reward model answered fewer samples than asked")?
                            .map_err(|e| format!("the reward model: {}", e.message))?;
                        g.push(f64::from(
                            d.score.ok_or("the reward model returned no score")?,
                        ));
                    }
                    out.push(g);
                }
                Ok(out)
            }
            Scoring::Grader { grader, judges } => items
                .iter()
                .zip(samples)
                .map(|(it, group)| {
                    group
                        .iter()
                        .map(|c| {
                            let s = Sample::text(c.text.clone());
                            grader
                                .grade(&it.item, &s, judges)
                                .map_err(|e| format!("grading line {}: {e}", it.line))
                        })
                        .collect()
                })
                .collect(),
        }
    }
}

/// Samples per step and tokens per sample an RL run's engines must hold.
pub fn engine_size(cfg: &ferrolm_train::finetune::FinetuneConfig, r: &RlConfig) -> (usize, usize) {
    (cfg.batch.max(1) * r.k, cfg.max_len + 1)
}

/// Grader JSON from `--grader`: a file, or the JSON itself.
pub fn read_grader(arg: &str) -> Result<Value> {
    let text = if Path::new(arg).is_file() {
        std::fs::read_to_string(arg).with_context(|| format!("reading --grader {arg}"))?
    } else {
        arg.to_owned()
    };
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("--grader {arg}: not a file, nor valid grader JSON"))?;
    Grader::parse(&v).map_err(|e| anyhow::anyhow!("--grader {arg}: {e}"))?;
    Ok(v)
}
