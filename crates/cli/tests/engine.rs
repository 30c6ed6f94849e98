//! The continuous-batching engine on the default model: batching, prefix caching, preemption
//! and disconnects must not change a single generated token.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::sync::mpsc;
use std::sync::Arc;

use ferrolm_engine::{
    Engine, EngineConfig, Event, FinishReason, GenerateOptions, Request, Session, Usage,
};
use ferrolm_gguf::GgufFile;
use ferrolm_models::Llama;
use ferrolm_sample::SamplingParams;
use ferrolm_tokenizer::{chat::ChatTemplate, Tokenizer};

struct Fixture {
    model: Arc<Llama>,
    tok: Arc<Tokenizer>,
    tmpl: ChatTemplate,
}

fn fixture() -> Fixture {
    let g = GgufFile::open(default_model()).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let tmpl = ChatTemplate::from_gguf(&g, &tok).unwrap();
    let model = Llama::load(&g, &mut |_, _| {}).unwrap();
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
        let (tx, rx) = mpsc::channel();
        e.add(Request {
            id: i as u64,
            prompt: p.clone(),
            opts: opts(max_tokens),
            adapter: None,
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
        .map(|rx| {
            let (mut ids, mut text) = (Vec::new(), String::new());
            for ev in rx.try_iter() {
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
        let (tx, rx) = mpsc::channel();
        e.add(Request {
            id: i as u64,
            prompt: p.clone(),
            opts: opts(16),
            adapter: None,
            reply: tx,
        });
        while e.has_work() {
            e.step().unwrap();
        }
        let evs: Vec<Event> = rx.try_iter().collect();
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
    let (tx, rx) = mpsc::channel();
    e.add(Request {
        id: 7,
        prompt: prompt(&f, "You are a helpful assistant.", "Count to one hundred."),
        opts: opts(200),
        adapter: None,
        reply: tx,
    });
    e.step().unwrap();
    assert!(e.num_free_blocks() < total);
    drop(rx);
    e.step().unwrap();
    assert!(!e.has_work());
    assert_eq!(e.num_free_blocks(), total);
}

#[test]
fn bad_requests_get_an_error_event() {
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
    for (p, max) in [
        (vec![], 4),
        (vec![1, 2, 3], 0),
        (vec![1; 100], 4),
        (vec![999_999], 4),
    ] {
        let (tx, rx) = mpsc::channel();
        e.add(Request {
            id: 1,
            prompt: p,
            opts: opts(max),
            adapter: None,
            reply: tx,
        });
        assert!(matches!(rx.try_recv(), Ok(Event::Error(_))));
    }
    assert!(!e.has_work());
}
