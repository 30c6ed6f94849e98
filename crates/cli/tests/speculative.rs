//! Speculative decoding (prompt lookup, a draft model) on the default model: greedy output with
//! drafts is token for token the output without them — in the session (the CLI), in the
//! continuous-batching engine and through the server — and drafts do get accepted where the
//! output copies the prompt.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::mpsc;

use ferrolm_engine::{
    Engine, EngineConfig, Event, FinishReason, GenerateOptions, Generation, Request, Session,
    Speculation,
};
use ferrolm_gguf::GgufFile;
use ferrolm_models::Model;
use ferrolm_sample::SamplingParams;
use ferrolm_tokenizer::{chat::ChatTemplate, Tokenizer};

struct Fixture {
    model: Arc<Model>,
    tok: Arc<Tokenizer>,
    tmpl: ChatTemplate,
}

/// Drafts verified in one forward pass must give the logits one token at a time gives: that
/// holds bitwise in batch-invariant mode, the default, pinned here whatever the environment says.
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

const DOCUMENT: &str = include_str!("../src/bench/document.txt");

fn chat(f: &Fixture, user: &str) -> Vec<u32> {
    let m = json!([{"role": "user", "content": user}]);
    f.tok
        .encode_chat(&f.tmpl.render(&f.tok, &m, true, None).unwrap())
        .unwrap()
}

/// Prompts where lookup drafts are accepted (a summary, a copy) and one where they mostly are
/// not (a short question).
fn prompts(f: &Fixture) -> Vec<Vec<u32>> {
    vec![
        chat(f, &format!("Summarise this document.\n\n{DOCUMENT}")),
        chat(
            f,
            "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog near the old mill by the river.",
        ),
        chat(f, "What is the capital of France?"),
    ]
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

fn generate(
    f: &Fixture,
    spec: Speculation<'_>,
    prompt: &[u32],
    o: &GenerateOptions,
) -> (Generation, Vec<(u32, String)>, String) {
    let mut s = Session::new(&f.model, 2048, 2).unwrap();
    s.set_speculation(spec).unwrap();
    // The streamed events and text, as the CLI prints them.
    let (mut events, mut text) = (Vec::new(), String::new());
    let g = s
        .generate(prompt, &f.tok, o, |ev| {
            text.push_str(ev.text);
            events.push((ev.id, ev.text.to_owned()));
            true
        })
        .unwrap();
    (g, events, text)
}

#[test]
fn session_lookup_and_draft_model_keep_greedy_output_token_for_token() {
    let f = fixture();
    let mut accepted = Vec::new();
    for p in prompts(&f) {
        let o = opts(160);
        let (plain, plain_stream, plain_text) = generate(&f, Speculation::Off, &p, &o);
        let (look, look_stream, look_text) = generate(&f, Speculation::Lookup { k: 8 }, &p, &o);
        assert_eq!(look.ids, plain.ids, "prompt {:?}", f.tok.decode(&p));
        assert_eq!(look.text, plain.text);
        assert_eq!(look_text, plain_text);
        assert_eq!(look_stream, plain_stream);
        assert_eq!(look.finish_reason, plain.finish_reason);
        assert_eq!(plain.speculation.drafted, 0);
        assert!(look.speculation.accepted <= look.speculation.drafted);
        accepted.push(look.speculation.accepted);

        // The model as its own draft: every draft is accepted, output unchanged.
        let draft = Session::new(&f.model, 2048, 2).unwrap();
        let spec = Speculation::Draft {
            session: Box::new(draft),
            k: 4,
        };
        let (drafted, _, _) = generate(&f, spec, &p, &o);
        assert_eq!(drafted.ids, plain.ids, "draft model");
        assert_eq!(drafted.text, plain.text);
        let st = drafted.speculation;
        assert!(st.drafted > 0);
        assert_eq!(st.accepted, st.drafted, "a model agrees with itself");
    }
    // The summary and the copy take many drafts.
    assert!(accepted[0] >= 20, "summary: {accepted:?}");
    assert!(accepted[1] >= 5, "copy: {accepted:?}");
}

#[test]
fn session_lookup_stops_where_plain_decoding_stops() {
    let f = fixture();
    let p = &prompts(&f)[1];
    let (full, _, _) = generate(&f, Speculation::Off, p, &opts(64));
    // A stop string in the middle of the copied sentence, and a max_tokens that cuts a run of
    // accepted drafts short.
    let mut o = opts(64);
    o.stop = vec!["lazy".into()];
    let (plain, _, _) = generate(&f, Speculation::Off, p, &o);
    let (look, _, _) = generate(&f, Speculation::Lookup { k: 8 }, p, &o);
    assert_eq!(plain.finish_reason, FinishReason::Stop, "{:?}", full.text);
    assert!(!plain.text.contains("lazy"));
    assert_eq!(look.ids, plain.ids);
    assert_eq!(look.text, plain.text);
    assert_eq!(look.finish_reason, FinishReason::Stop);
    for n in [1, 2, 7, 13] {
        let (plain, _, _) = generate(&f, Speculation::Off, p, &opts(n));
        let (look, _, _) = generate(&f, Speculation::Lookup { k: 8 }, p, &opts(n));
        assert_eq!(look.ids, plain.ids, "max_tokens {n}");
        assert_eq!(look.ids.len(), n.min(full.ids.len()));
        assert_eq!(look.finish_reason, plain.finish_reason);
    }
}

#[test]
fn session_chat_turns_after_rejected_drafts_reuse_only_real_tokens() {
    // After a lookup generation, the cache must hold exactly prompt + output (rejected drafts
    // rolled back), so the next turn's prompt reuses it and still matches a fresh session.
    let f = fixture();
    let p = &prompts(&f)[0];
    let mut s = Session::new(&f.model, 2048, 2).unwrap();
    s.set_speculation(Speculation::Lookup { k: 8 }).unwrap();
    let g = s.generate(p, &f.tok, &opts(48), |_| true).unwrap();
    assert!(
        g.speculation.drafted > g.speculation.accepted,
        "some rejected"
    );
    let history: Vec<u32> = p.iter().chain(&g.ids).copied().collect();
    assert_eq!(s.cached_tokens(), &history[..history.len() - 1]);
    let next: Vec<u32> = history
        .iter()
        .copied()
        .chain(f.tok.encode(" Now say it shorter.", false).unwrap())
        .collect();
    let again = s.generate(&next, &f.tok, &opts(24), |_| true).unwrap();
    assert_eq!(again.cached_tokens, history.len() - 1);
    let (fresh, _, _) = generate(&f, Speculation::Off, &next, &opts(24));
    assert_eq!(again.ids, fresh.ids);
}

/// A request's ids, text and finish reason.
type Outcome = (Vec<u32>, String, FinishReason);

/// Run `prompts` through one engine to completion: each one's outcome, then the drafts
/// verified, the drafts accepted and the preemptions.
fn engine_run(
    f: &Fixture,
    cfg: EngineConfig,
    prompts: &[Vec<u32>],
    o: &GenerateOptions,
) -> (Vec<Outcome>, u64, u64, u64) {
    let e = Engine::new(f.model.clone(), f.tok.clone(), cfg).unwrap();
    engine_drive(e, prompts, o)
}

fn engine_drive(
    mut e: Engine,
    prompts: &[Vec<u32>],
    o: &GenerateOptions,
) -> (Vec<Outcome>, u64, u64, u64) {
    let stats = e.stats();
    let mut rxs = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        e.add(Request {
            id: i as u64,
            prompt: p.clone(),
            opts: o.clone(),
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
    let out = rxs
        .into_iter()
        .map(|mut rx| {
            let (mut ids, mut text) = (Vec::new(), String::new());
            while let Ok(ev) = rx.try_recv() {
                match ev {
                    Event::Token { id, text: t, .. } => {
                        ids.push(id);
                        text.push_str(&t);
                    }
                    Event::Finished { reason, usage, .. } => {
                        assert_eq!(usage.completion_tokens, ids.len());
                        return (ids, text, reason);
                    }
                    Event::Error(e) => panic!("request failed: {e}"),
                }
            }
            panic!("no Finished event")
        })
        .collect();
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    (
        out,
        ld(&stats.draft_tokens),
        ld(&stats.accepted_tokens),
        e.num_preemptions(),
    )
}

#[test]
fn engine_lookup_keeps_every_batched_requests_greedy_output() {
    let f = fixture();
    let ps = prompts(&f);
    let mut o = opts(96);
    o.stop = vec!["lazy dog".into()];
    let base = EngineConfig::default();
    let (plain, d0, _, _) = engine_run(&f, base.clone(), &ps, &o);
    assert_eq!(d0, 0);
    let cfg = EngineConfig { lookup: 8, ..base };
    let (look, drafted, accepted, _) = engine_run(&f, cfg, &ps, &o);
    assert_eq!(look, plain);
    assert!(
        accepted >= 20 && accepted <= drafted,
        "{accepted} of {drafted}"
    );
    // Each also equals the single-sequence session's output.
    for (p, (ids, _, _)) in ps.iter().zip(&plain) {
        let (g, _, _) = generate(&f, Speculation::Off, p, &o);
        assert_eq!(&g.ids, ids);
    }
}

#[test]
fn engine_lookup_under_a_full_pool_and_a_small_budget() {
    // A pool too small for all three at once (preemption, blocks released after rejected
    // drafts and reused), and a step budget smaller than the drafts wanted.
    let f = fixture();
    let ps = prompts(&f);
    let o = opts(64);
    let tight = EngineConfig {
        // The summary alone needs 34 blocks (its ~470-token prompt + 64).
        num_blocks: 36,
        max_batch_tokens: 20,
        ..EngineConfig::default()
    };
    let (plain, _, _, plain_preempted) = engine_run(&f, tight.clone(), &ps, &o);
    assert!(
        plain_preempted > 0,
        "the pool should be too small for all three"
    );
    let cfg = EngineConfig { lookup: 8, ..tight };
    let (look, _, accepted, preempted) = engine_run(&f, cfg, &ps, &o);
    assert_eq!(look, plain);
    assert!(accepted > 0);
    assert!(preempted > 0, "the pool should be too small for all three");
}

#[test]
fn engine_draft_model_keeps_output_and_rolls_its_own_cache_back() {
    // The model as its own draft accepts everything; a draft of k = 3 against stop strings,
    // max_tokens and a pool that preempts exercises the draft cache's rollback and refill.
    let f = fixture();
    let ps = prompts(&f);
    let mut o = opts(64);
    o.stop = vec!["lazy dog".into()];
    for cfg in [
        EngineConfig::default(),
        EngineConfig {
            num_blocks: 36,
            max_batch_tokens: 20,
            ..EngineConfig::default()
        },
    ] {
        let (plain, _, _, _) = engine_run(&f, cfg.clone(), &ps, &o);
        let e = Engine::new(f.model.clone(), f.tok.clone(), cfg)
            .unwrap()
            .with_draft(f.model.clone(), 3)
            .unwrap();
        let (drafted, n, accepted, _) = engine_drive(e, &ps, &o);
        assert_eq!(drafted, plain);
        assert!(n > 0);
        assert_eq!(accepted, n, "a model agrees with itself");
    }
}

fn chat_request(user: &str) -> Value {
    json!({"model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 96,
           "messages": [{"role": "user", "content": user}]})
}

fn metric(s: &Server, name: &str) -> f64 {
    let body = ureq::get(&s.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[test]
fn server_lookup_answers_concurrent_requests_as_without_it() {
    let questions = [
        format!("Summarise this document.\n\n{DOCUMENT}"),
        "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog near the old mill by the river.".to_owned(),
        "What is the capital of France?".to_owned(),
        "Name three colors.".to_owned(),
    ];
    let answers = |s: &Server| -> Vec<Value> {
        let url = s.url("/v1/chat/completions");
        let threads: Vec<_> = questions
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let url = url.clone();
                let mut req = chat_request(q);
                if i == 1 {
                    req["stream"] = json!(true);
                }
                std::thread::spawn(move || {
                    let r = ureq::post(&url).send_string(&req.to_string()).unwrap();
                    let body = r.into_string().unwrap();
                    if i == 1 {
                        // The streamed deltas, joined.
                        let text: String = body
                            .lines()
                            .filter_map(|l| l.strip_prefix("data: "))
                            .filter(|d| *d != "[DONE]")
                            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                            .filter_map(|v| {
                                v["choices"][0]["delta"]["content"]
                                    .as_str()
                                    .map(str::to_owned)
                            })
                            .collect();
                        json!({"content": text})
                    } else {
                        let v: Value = serde_json::from_str(&body).unwrap();
                        json!({"content": v["choices"][0]["message"]["content"],
                               "usage": v["usage"]["completion_tokens"]})
                    }
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    };
    let plain = Server::start(&[]);
    let want = answers(&plain);
    assert_eq!(metric(&plain, "ferrolm_spec_draft_tokens_total"), 0.0);
    drop(plain);
    let look = Server::start(&["--lookup", "8"]);
    let got = answers(&look);
    assert_eq!(got, want);
    assert!(!want[0]["content"].as_str().unwrap().is_empty());
    assert!(metric(&look, "ferrolm_spec_accepted_tokens_total") >= 20.0);
    drop(look);
    // The model as its own draft model.
    let model = default_model();
    let draft = Server::start(&["--draft", model.to_str().unwrap(), "--draft-tokens", "3"]);
    assert_eq!(answers(&draft), want);
    let n = metric(&draft, "ferrolm_spec_draft_tokens_total");
    assert!(n > 0.0);
    assert_eq!(metric(&draft, "ferrolm_spec_accepted_tokens_total"), n);
}

#[test]
fn cli_generate_and_bench_with_lookup() {
    let prompt = format!("Summarise this document.\n\n{DOCUMENT}");
    let run = |extra: &[&str]| -> Value {
        let out = ferrolm()
            .args([
                "generate",
                "--temperature",
                "0",
                "--max-tokens",
                "64",
                "--json",
                "-p",
            ])
            .arg(&prompt)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        json_of(&out)
    };
    let plain = run(&[]);
    let look = run(&["--lookup", "8"]);
    assert_eq!(look["ids"], plain["ids"]);
    assert_eq!(look["text"], plain["text"]);
    assert_eq!(plain["timings"]["draft_tokens"], 0);
    assert!(look["timings"]["accepted_tokens"].as_u64().unwrap() > 0);

    let out = ferrolm()
        .args([
            "bench",
            "--reps",
            "1",
            "--decode-tokens",
            "8",
            "--lookup",
            "8",
            "--spec-tokens",
            "48",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_of(&out);
    let s = &v["speculative"];
    assert!(s["spec_tps"].as_f64().unwrap() > 0.0, "{v}");
    assert!(s["acceptance"].as_f64().unwrap() > 0.0, "{v}");
    let n = s["tokens"].as_u64().unwrap();
    assert!(n > 0 && n <= 48, "{v}");
}
