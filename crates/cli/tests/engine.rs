//! The continuous-batching engine on the default model: batching, prefix caching, preemption
//! and disconnects must not change a single generated token.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::sync::Arc;

use tokio::sync::mpsc;

use ferrolm_engine::{
    Engine, EngineConfig, ErrorKind, Event, FinishReason, GenerateOptions, Request, Session, Usage,
};
use ferrolm_gguf::GgufFile;
use ferrolm_models::{Adapter, Model, Proj};
use ferrolm_sample::SamplingParams;
use ferrolm_tokenizer::{chat::ChatTemplate, Tokenizer};

struct Fixture {
    model: Arc<Model>,
    tok: Arc<Tokenizer>,
    tmpl: ChatTemplate,
}

/// The engine's tests compare a request's output in the engine (batched with others, its
/// prompt chunked, preempted and recomputed) to its output alone, token for token: that holds
/// exactly in batch-invariant mode, the default, which they pin here whatever the environment
/// says (`FERROLM_BATCH_INVARIANT=0` gives prompts faster f32 GEMM paths whose rounding can flip
/// a near-tied greedy token; `tests/gemma.rs` and `families.rs` hold those to their references).
fn fixture() -> Fixture {
    ferrolm_models::quant::set_batch_invariant(true);
    let g = GgufFile::open(default_model()).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let tmpl = ChatTemplate::from_gguf(&g, &tok).unwrap();
    let model = Model::load(&g, &mut |_, _| {}).unwrap();
    Fixture {
        model: Arc::new(model),
        tok: Arc::new(tok),
        tmpl,
    }
}

fn prompt(f: &Fixture, system: &str, user: &str) -> Vec<u32> {
    let m = serde_json::json!([{"role": "system", "content": system}, {"role": "user", "content": user}]);
    f.tok
        .encode_chat(&f.tmpl.render(&f.tok, &m, true, None).unwrap())
        .unwrap()
}

fn opts(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        params: SamplingParams::greedy(),
        max_tokens,
        stop: Vec::new(),
        end_ids: vec![2, 0],
        seed: 1,
        grammar: None,
    }
}

/// Greedy ids from the single-sequence session: the reference for the engine.
fn alone(f: &Fixture, p: &[u32], max_tokens: usize) -> Vec<u32> {
    let mut s = Session::new(&f.model, 2048, 2).unwrap();
    s.generate(p, &f.tok, &opts(max_tokens), |_| true)
        .unwrap()
        .ids
}

/// Run requests through an engine to completion: (ids, text, usage, finish) per request.
type Outcome = (Vec<u32>, String, Usage, FinishReason);

fn run(
    f: &Fixture,
    cfg: EngineConfig,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> (Vec<Outcome>, u64) {
    let mut e = Engine::new(f.model.clone(), f.tok.clone(), cfg).unwrap();
    let mut rxs = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        e.add(Request {
            id: i as u64,
            prompt: p.clone(),
            opts: opts(max_tokens),
            adapter: None,
            cache_scope: 0,
            reply: tx,
        });
        rxs.push(rx);
    }
    let mut steps = 0;
    while e.has_work() {
        e.step().unwrap();
        steps += 1;
        assert!(steps < 10_000, "engine did not finish");
    }
    let outcomes = rxs
        .into_iter()
        .map(|mut rx| {
            let (mut ids, mut text) = (Vec::new(), String::new());
            for ev in events(&mut rx) {
                match ev {
                    Event::Token { id, text: t, .. } => {
                        ids.push(id);
                        text.push_str(&t);
                    }
                    Event::Finished { reason, usage, .. } => return (ids, text, usage, reason),
                    Event::Error(e) => panic!("request failed: {e}"),
                }
            }
            panic!("no Finished event")
        })
        .collect();
    (outcomes, e.num_preemptions())
}

#[test]
fn batched_requests_generate_what_each_generates_alone() {
    let f = fixture();
    let prompts = vec![
        prompt(
            &f,
            "You are a helpful assistant.",
            "What is the capital of France?",
        ),
        prompt(
            &f,
            "You are a pirate.",
            "Tell me about the sea in one sentence.",
        ),
        prompt(&f, "You are terse.", "List three colors."),
    ];
    // A small token budget forces chunked prefill mixed with other requests' decoding.
    let cfg = EngineConfig {
        max_batch_tokens: 24,
        ..Default::default()
    };
    let (out, _) = run(&f, cfg, &prompts, 24);
    for (p, (ids, text, usage, _)) in prompts.iter().zip(&out) {
        assert_eq!(ids, &alone(&f, p, 24), "prompt {:?}", f.tok.decode(p));
        assert_eq!(usage.prompt_tokens, p.len());
        assert_eq!(usage.completion_tokens, ids.len());
        assert!(f.tok.decode(ids).starts_with(text.as_str()));
    }
}

#[test]
fn shared_system_prompt_is_served_from_the_prefix_cache() {
    let f = fixture();
    let system =
        "You are a meticulous assistant. Answer briefly, use plain words, and never invent facts. "
            .repeat(3);
    let a = prompt(&f, &system, "What is the capital of France?");
    let b = prompt(&f, &system, "What is two plus two?");
    let mut e = Engine::new(f.model.clone(), f.tok.clone(), EngineConfig::default()).unwrap();
    let mut results = Vec::new();
    for (i, p) in [&a, &b].into_iter().enumerate() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        e.add(Request {
            id: i as u64,
            prompt: p.clone(),
            opts: opts(16),
            adapter: None,
            cache_scope: 0,
            reply: tx,
        });
        while e.has_work() {
            e.step().unwrap();
        }
        let evs: Vec<Event> = events(&mut rx);
        let ids: Vec<u32> = evs
            .iter()
            .filter_map(|ev| {
                if let Event::Token { id, .. } = ev {
                    Some(*id)
                } else {
                    None
                }
            })
            .collect();
        let usage = evs
            .iter()
            .find_map(|ev| {
                if let Event::Finished { usage, .. } = ev {
                    Some(*usage)
                } else {
                    None
                }
            })
            .unwrap();
        results.push((ids, usage));
    }
    assert_eq!(results[0].1.cached_tokens, 0);
    let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(shared > 64, "the prompts share {shared} tokens");
    // Every full block of the shared prefix is reused.
    assert_eq!(results[1].1.cached_tokens, shared / 16 * 16);
    assert_eq!(results[1].0, alone(&f, &b, 16));
}

#[test]
fn a_full_pool_preempts_and_resumes_without_changing_output() {
    let f = fixture();
    let prompts = vec![
        prompt(
            &f,
            "You are a helpful assistant.",
            "Write a short poem about the moon.",
        ),
        prompt(
            &f,
            "You are a helpful assistant.",
            "Write a short poem about the sun.",
        ),
    ];
    // 8 blocks of 16 = 128 slots: both prompts (~40 tokens) fit, but not both completions.
    let cfg = EngineConfig {
        num_blocks: 8,
        ..Default::default()
    };
    let (out, preemptions) = run(&f, cfg, &prompts, 60);
    assert!(preemptions > 0, "the pool was never full");
    for (p, (ids, ..)) in prompts.iter().zip(&out) {
        assert_eq!(ids, &alone(&f, p, 60));
    }
}

#[test]
fn a_disconnected_client_frees_its_blocks() {
    let f = fixture();
    let mut e = Engine::new(f.model.clone(), f.tok.clone(), EngineConfig::default()).unwrap();
    let total = e.num_free_blocks();
    let (tx, rx) = mpsc::unbounded_channel();
    e.add(Request {
        id: 7,
        prompt: prompt(&f, "You are a helpful assistant.", "Count to one hundred."),
        opts: opts(200),
        adapter: None,
        cache_scope: 0,
        reply: tx,
    });
    e.step().unwrap();
    assert!(e.num_free_blocks() < total);
    drop(rx);
    e.step().unwrap();
    assert!(!e.has_work());
    assert_eq!(e.num_free_blocks(), total);
}

/// Issue 12 item 8: an aborted request's channel still learns what it used, so the server
/// can bill the tokens it computed and sent.
#[test]
fn an_aborted_request_reports_the_tokens_it_used() {
    let f = fixture();
    let mut e = Engine::new(f.model.clone(), f.tok.clone(), EngineConfig::default()).unwrap();
    let p = prompt(&f, "You are a helpful assistant.", "Count to one hundred.");
    let (tx, mut rx) = mpsc::unbounded_channel();
    e.add(Request {
        id: 9,
        prompt: p.clone(),
        opts: opts(200),
        adapter: None,
        cache_scope: 0,
        reply: tx,
    });
    for _ in 0..4 {
        e.step().unwrap();
    }
    e.abort(9);
    assert!(!e.has_work());
    let evs = events(&mut rx);
    let tokens = evs
        .iter()
        .filter(|ev| matches!(ev, Event::Token { .. }))
        .count();
    assert!(tokens >= 3, "{tokens} tokens before the abort");
    match evs.last() {
        Some(Event::Finished { reason, usage, .. }) => {
            assert_eq!(*reason, FinishReason::Cancelled);
            assert_eq!(usage.prompt_tokens, p.len());
            assert_eq!(usage.completion_tokens, tokens);
        }
        other => panic!("expected Finished(Cancelled), got {other:?}"),
    }
}

#[test]
fn engine_refusals_are_typed_by_whose_fault() {
    let f = fixture();
    let mut e = Engine::new(
        f.model.clone(),
        f.tok.clone(),
        EngineConfig {
            num_blocks: 4,
            ..Default::default()
        },
    )
    .unwrap();
    // Whose fault each refusal is decides the server's status (400, 503, 500).
    for (p, max, kind) in [
        (vec![], 4, ErrorKind::Request),
        (vec![1, 2, 3], 0, ErrorKind::Request),
        (vec![1; 100], 4, ErrorKind::Capacity),
        (vec![999_999], 4, ErrorKind::Request),
    ] {
        let (tx, mut rx) = mpsc::unbounded_channel();
        e.add(Request {
            id: 1,
            prompt: p.clone(),
            opts: opts(max),
            adapter: None,
            cache_scope: 0,
            reply: tx,
        });
        match rx.try_recv() {
            Ok(Event::Error(err)) => assert_eq!(err.kind, kind, "{p:?}: {err}"),
            other => panic!("{p:?}: expected a refusal, got {other:?}"),
        }
    }
    assert!(!e.has_work());
}

/// A rank-4 adapter on q, v and down of every layer with seeded random weights, large enough
/// to change greedy replies.
fn random_adapter(f: &Fixture, seed: u64) -> Arc<Adapter> {
    let c = f.model.cfg();
    let r = 4;
    let mut ad = Adapter::new("random", c.n_layers, r, 2.0);
    let mut s = seed;
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
    };
    for l in 0..c.n_layers {
        for (proj, n_in, n_out) in [
            (Proj::Q, c.dim, c.q_dim()),
            (Proj::V, c.dim, c.kv_dim()),
            (Proj::Down, c.ffn_dim, c.dim),
        ] {
            let a = (0..r * n_in).map(|_| next()).collect();
            let b = (0..n_out * r).map(|_| next()).collect();
            ad.set(l, proj, a, b, n_in, n_out).unwrap();
        }
    }
    Arc::new(ad)
}

fn submit(
    e: &mut Engine,
    id: u64,
    p: &[u32],
    adapter: Option<Arc<Adapter>>,
) -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    e.add(Request {
        id,
        prompt: p.to_vec(),
        opts: opts(24),
        adapter,
        cache_scope: 0,
        reply: tx,
    });
    rx
}

/// Every event a request's channel holds now.
fn events(rx: &mut mpsc::UnboundedReceiver<Event>) -> Vec<Event> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

fn outcome(rx: &mut mpsc::UnboundedReceiver<Event>) -> (Vec<u32>, Usage) {
    let mut ids = Vec::new();
    for ev in events(rx) {
        match ev {
            Event::Token { id, .. } => ids.push(id),
            Event::Finished { usage, .. } => return (ids, usage),
            Event::Error(e) => panic!("request failed: {e}"),
        }
    }
    panic!("no Finished event")
}

fn drain(e: &mut Engine) {
    while e.has_work() {
        e.step().unwrap();
    }
}

#[test]
fn adapters_apply_per_request_in_one_batch_and_keep_their_own_prefix_cache() {
    let f = fixture();
    let ad = random_adapter(&f, 7);
    let p = prompt(
        &f,
        "You are a helpful assistant.",
        "Name three colours of the rainbow.",
    );
    let base_alone = alone(&f, &p, 24);

    // Alone in an engine, the adapted request generates its own reply.
    let mut e = Engine::new(f.model.clone(), f.tok.clone(), EngineConfig::default()).unwrap();
    let mut rx = submit(&mut e, 1, &p, Some(ad.clone()));
    drain(&mut e);
    let (adapted_alone, _) = outcome(&mut rx);
    assert_ne!(adapted_alone, base_alone, "the adapter changed nothing");

    // Together: the first step prefills both and samples a token for each (one batch), and
    // each request generates exactly what it generates alone.
    let mut e = Engine::new(f.model.clone(), f.tok.clone(), EngineConfig::default()).unwrap();
    let (mut rb, mut ra) = (
        submit(&mut e, 1, &p, None),
        submit(&mut e, 2, &p, Some(ad.clone())),
    );
    let computed = e.step().unwrap();
    assert_eq!(computed, 2 * p.len(), "both prompts in the first batch");
    drain(&mut e);
    let ((b, ub), (a, ua)) = (outcome(&mut rb), outcome(&mut ra));
    assert_eq!(b, base_alone);
    assert_eq!(a, adapted_alone);
    // The adapter's request did not reuse the base's blocks, though its prompt is the same.
    assert_eq!((ub.cached_tokens, ua.cached_tokens), (0, 0));

    // Each one's later requests hit their own cache entries, never the other's.
    let mut ra = submit(&mut e, 3, &p, Some(ad.clone()));
    drain(&mut e);
    let (a2, u) = outcome(&mut ra);
    assert!(u.cached_tokens > 0, "{u:?}");
    assert_eq!(a2, adapted_alone);
    let other = random_adapter(&f, 8);
    let mut rx = submit(&mut e, 4, &p, Some(other));
    drain(&mut e);
    assert_eq!(
        outcome(&mut rx).1.cached_tokens,
        0,
        "another adapter used this one's KV"
    );

    // An adapter for another model shape is refused with a clear error.
    let mut bad = Adapter::new("bad", f.model.cfg().n_layers, 2, 1.0);
    bad.set(0, Proj::Q, vec![0.0; 2 * 10], vec![0.0; 10 * 2], 10, 10)
        .unwrap();
    let mut rx = submit(&mut e, 5, &p, Some(Arc::new(bad)));
    match rx.try_recv() {
        Ok(Event::Error(m)) => {
            assert_eq!(m.kind, ErrorKind::Request);
            assert!(m.message.contains("adapter `bad`"), "{m}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
}
