//! `/metrics` in Prometheus' text format and `/health`.
//!
//! Counters and histograms live behind one mutex (a handful of integer adds per request, far
//! from the hot path: the engine thread never touches it); the engine's own figures (running and
//! waiting requests, KV blocks, prefix-cache hits) are read from its published
//! [`ferrolm_engine::EngineStats`] at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use ferrolm_engine::{EngineStats, Usage};
use serde_json::{json, Value};

use crate::AppState;

/// A fixed-bucket histogram (seconds).
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

const LATENCY_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const TOKEN_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct ModelCounters {
    requests: u64,
    prompt: u64,
    cached: u64,
    completion: u64,
}

#[derive(Debug)]
struct Inner {
    /// (route, status) → count.
    requests: BTreeMap<(String, u16), u64>,
    models: BTreeMap<String, ModelCounters>,
    ttft: Histogram,
    itl: Histogram,
    duration: Histogram,
}

/// The server's counters.
#[derive(Debug)]
pub struct Metrics(Mutex<Inner>);

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics(Mutex::new(Inner {
            requests: BTreeMap::new(),
            models: BTreeMap::new(),
            ttft: Histogram::new(LATENCY_BOUNDS),
            itl: Histogram::new(TOKEN_BOUNDS),
            duration: Histogram::new(LATENCY_BOUNDS),
        }))
    }

    fn with(&self, f: impl FnOnce(&mut Inner)) {
        if let Ok(mut g) = self.0.lock() {
            f(&mut g);
        }
    }

    pub fn request(&self, route: &str, status: u16) {
        self.with(|m| *m.requests.entry((route.to_owned(), status)).or_default() += 1);
    }

    /// A finished generation: its tokens, time to first token and duration (seconds).
    pub fn finished(&self, model: &str, u: &Usage, ttft: Option<f64>, seconds: f64) {
        self.with(|m| {
            let c = m.models.entry(model.to_owned()).or_default();
            c.requests += 1;
            c.prompt += u.prompt_tokens as u64;
            c.cached += u.cached_tokens as u64;
            c.completion += u.completion_tokens as u64;
            if let Some(t) = ttft {
                m.ttft.observe(t);
            }
            m.duration.observe(seconds);
        });
    }

    /// The gap between two tokens of one stream (seconds).
    pub fn inter_token(&self, seconds: f64) {
        self.with(|m| m.itl.observe(seconds));
    }

    fn render(&self, models: &[(String, &EngineStats)]) -> String {
        let mut out = String::new();
        let Ok(m) = self.0.lock() else { return out };
        out.push_str("# HELP ferrolm_requests_total HTTP requests by route and status.\n# TYPE ferrolm_requests_total counter\n");
        for ((route, status), n) in &m.requests {
            let _ = writeln!(
                out,
                "ferrolm_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        for (name, help, get) in [
            (
                "ferrolm_generations_total",
                "Finished generation requests.",
                (|c: &ModelCounters| c.requests) as fn(&ModelCounters) -> u64,
            ),
            (
                "ferrolm_prompt_tokens_total",
                "Prompt tokens of finished requests.",
                |c| c.prompt,
            ),
            (
                "ferrolm_cached_prompt_tokens_total",
                "Prompt tokens served from the prefix cache.",
                |c| c.cached,
            ),
            (
                "ferrolm_completion_tokens_total",
                "Generated tokens.",
                |c| c.completion,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (model, c) in &m.models {
                let _ = writeln!(out, "{name}{{model=\"{model}\"}} {}", get(c));
            }
        }
        m.ttft.render(
            &mut out,
            "ferrolm_time_to_first_token_seconds",
            "Seconds from request to first generated token.",
        );
        m.itl.render(
            &mut out,
            "ferrolm_inter_token_latency_seconds",
            "Seconds between consecutive tokens of one stream.",
        );
        m.duration.render(
            &mut out,
            "ferrolm_request_duration_seconds",
            "Seconds from request to its last token.",
        );
        drop(m);
        for (name, kind, help, get) in [
            (
                "ferrolm_requests_running",
                "gauge",
                "Requests in the running batch.",
                (|s: &EngineStats| ld(&s.running) as f64) as fn(&EngineStats) -> f64,
            ),
            (
                "ferrolm_requests_waiting",
                "gauge",
                "Requests queued for the batch.",
                |s| ld(&s.waiting) as f64,
            ),
            (
                "ferrolm_kv_blocks_used",
                "gauge",
                "KV cache blocks held by requests.",
                |s| ld(&s.kv_blocks_total).saturating_sub(ld(&s.kv_blocks_free)) as f64,
            ),
            (
                "ferrolm_kv_blocks_free",
                "gauge",
                "KV cache blocks free (cached-but-unused count as free).",
                |s| ld(&s.kv_blocks_free) as f64,
            ),
            (
                "ferrolm_kv_bytes_used",
                "gauge",
                "Bytes of K and V in the blocks held by requests (in the model's --kv-type).",
                |s| {
                    let used = ld(&s.kv_blocks_total).saturating_sub(ld(&s.kv_blocks_free));
                    (used * ld(&s.kv_bytes_per_block)) as f64
                },
            ),
            (
                "ferrolm_kv_bytes_capacity",
                "gauge",
                "Bytes of the model's whole KV pool.",
                |s| (ld(&s.kv_blocks_total) * ld(&s.kv_bytes_per_block)) as f64,
            ),
            (
                "ferrolm_prefix_cache_hit_rate",
                "gauge",
                "Prompt tokens found in the prefix cache / prompt tokens looked up.",
                |s| {
                    let q = ld(&s.prefix_queried_tokens);
                    if q == 0 {
                        0.0
                    } else {
                        ld(&s.prefix_hit_tokens) as f64 / q as f64
                    }
                },
            ),
            (
                "ferrolm_preemptions_total",
                "counter",
                "Requests preempted because the KV pool was full.",
                |s| ld(&s.preemptions) as f64,
            ),
            (
                "ferrolm_engine_tokens_computed_total",
                "counter",
                "Tokens run through the model (prompt chunks + decode + drafts).",
                |s| ld(&s.tokens_computed) as f64,
            ),
            (
                "ferrolm_spec_draft_tokens_total",
                "counter",
                "Draft tokens verified by speculative decoding (serve --lookup).",
                |s| ld(&s.draft_tokens) as f64,
            ),
            (
                "ferrolm_spec_accepted_tokens_total",
                "counter",
                "Draft tokens accepted: each saved a forward pass.",
                |s| ld(&s.accepted_tokens) as f64,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (model, st) in models {
                let _ = writeln!(out, "{name}{{model=\"{model}\"}} {}", get(st));
            }
        }
        render_vllm(&mut out, models);
        out
    }
}

/// The same gauges under vLLM's names and its `model_name` label, which existing routers read
/// to balance replicas (vLLM's production-stack router, the Gateway API Inference Extension,
/// SGLang's router): requests running and waiting, KV-cache usage as a fraction (both the
/// current `kv_cache_usage_perc` and the older `gpu_cache_usage_perc`), and prefix-cache
/// queries and hits in tokens (counters).
fn render_vllm(out: &mut String, models: &[(String, &EngineStats)]) {
    let usage = |s: &EngineStats| {
        let total = ld(&s.kv_blocks_total);
        if total == 0 {
            0.0
        } else {
            total.saturating_sub(ld(&s.kv_blocks_free)) as f64 / total as f64
        }
    };
    for (name, kind, help, get) in [
        (
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            (|s: &EngineStats| ld(&s.running) as f64) as fn(&EngineStats) -> f64,
        ),
        (
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            |s| ld(&s.waiting) as f64,
        ),
        (
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            usage,
        ),
        (
            "vllm:gpu_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage (the older name).",
            usage,
        ),
        (
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            |s| ld(&s.prefix_queried_tokens) as f64,
        ),
        (
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            |s| ld(&s.prefix_hit_tokens) as f64,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (model, st) in models {
            let _ = writeln!(out, "{name}{{model_name=\"{model}\"}} {}", get(st));
        }
    }
}

fn ld(a: &std::sync::atomic::AtomicU64) -> u64 {
    EngineStats::get(a)
}

/// `GET /metrics`.
pub async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    // The operator's view: every model, fine-tuned ones of every key included.
    let all = s.all_models();
    // One series per engine: adapters share their base model's.
    let models: Vec<(String, &EngineStats)> = all
        .iter()
        .filter(|m| m.adapter.is_none())
        .map(|m| (m.id.clone(), m.stats.as_ref()))
        .collect();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(&models),
    )
}

/// `GET /health`: always open (no key), cheap, says which models answer.
pub async fn health(State(s): State<AppState>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "models": s.models(None).iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        "uptime_seconds": s.started.elapsed().as_secs(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.5, 5.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }
}
