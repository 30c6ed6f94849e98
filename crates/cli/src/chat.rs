//! `ferrolm chat`: an interactive, streaming, multi-turn conversation.
//!
//! Ctrl-C during a reply stops that reply and keeps the session; Ctrl-C at the prompt (or
//! Ctrl-D, or /quit) leaves. Each turn re-renders the whole conversation through the template;
//! the session reuses the cached prefix, so only the new turn is computed.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use ferrolm_engine::{FinishReason, GenerateOptions};
use serde_json::json;

use crate::{load_for_context, random_seed, ChatArgs};

pub fn run(a: ChatArgs) -> Result<()> {
    if a.max_tokens == 0 {
        anyhow::bail!("--max-tokens must be at least 1");
    }
    let params = a.sampling.params(None)?;
    let m = load_for_context(&a.run.model, Some(a.run.ctx))?;
    params.validate(m.model.cfg().vocab_size)?;
    let draft = a.run.spec.load_draft(a.run.ctx)?;
    let mut session = a.run.session(&m, draft.as_ref())?;

    let generating = Arc::new(AtomicBool::new(false));
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let (g, i) = (generating.clone(), interrupted.clone());
        ctrlc::set_handler(move || {
            if g.load(Ordering::SeqCst) {
                i.store(true, Ordering::SeqCst);
            } else {
                eprintln!();
                std::process::exit(130);
            }
        })?;
    }

    let mut system = a.system.clone();
    let mut history: Vec<serde_json::Value> = Vec::new();
    let mut stats = a.stats;
    let mut seed = a.sampling.seed.unwrap_or_else(random_seed);
    eprintln!(
        "ferrolm chat — {} ({} threads). /reset, /system TEXT, /stats, /quit; Ctrl-C stops a reply.",
        m.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        session.threads()
    );
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            eprintln!();
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
            match name {
                "quit" | "exit" | "bye" => break,
                "reset" => {
                    history.clear();
                    session.reset();
                    eprintln!("(conversation cleared)");
                }
                "system" => {
                    system = if arg.trim().is_empty() {
                        None
                    } else {
                        Some(arg.to_owned())
                    };
                    history.clear();
                    session.reset();
                    eprintln!(
                        "(system prompt {}; conversation cleared)",
                        if system.is_some() { "set" } else { "removed" }
                    );
                }
                "stats" => {
                    stats = !stats;
                    eprintln!("(stats {})", if stats { "on" } else { "off" });
                }
                _ => eprintln!("unknown command /{name}: try /reset, /system TEXT, /stats, /quit"),
            }
            continue;
        }
        history.push(json!({"role": "user", "content": line}));
        let mut msgs = Vec::new();
        if let Some(s) = &system {
            msgs.push(json!({"role": "system", "content": s}));
        }
        msgs.extend(history.iter().cloned());
        let ids = match m.chat_ids(&serde_json::Value::Array(msgs)) {
            Ok(ids) => ids,
            Err(e) => {
                eprintln!("error: {e}");
                history.pop();
                continue;
            }
        };
        let opts = GenerateOptions {
            params: params.clone(),
            max_tokens: a.max_tokens,
            stop: Vec::new(),
            end_ids: m.end_ids(),
            seed,
            grammar: None,
        };
        seed = seed.wrapping_add(1);
        generating.store(true, Ordering::SeqCst);
        interrupted.store(false, Ordering::SeqCst);
        let r = session.generate(&ids, &m.tok, &opts, |ev| {
            let _ = out.write_all(ev.text.as_bytes());
            let _ = out.flush();
            !interrupted.load(Ordering::SeqCst)
        });
        generating.store(false, Ordering::SeqCst);
        println!();
        match r {
            Ok(g) => {
                if g.finish_reason == FinishReason::Cancelled {
                    eprintln!("(stopped)");
                }
                if stats {
                    eprintln!(
                        "({} prompt tokens, {} cached, {:.1} tok/s prefill; {} tokens, {:.1} tok/s)",
                        g.prompt_tokens,
                        g.cached_tokens,
                        (g.prompt_tokens - g.cached_tokens) as f64 / g.prefill_time.as_secs_f64().max(1e-9),
                        g.ids.len(),
                        g.ids.len() as f64 / g.decode_time.as_secs_f64().max(1e-9)
                    );
                    let sp = g.speculation;
                    if sp.drafted > 0 {
                        eprintln!(
                            "({} of {} draft tokens accepted, {:.0}%)",
                            sp.accepted,
                            sp.drafted,
                            100.0 * sp.acceptance()
                        );
                    }
                }
                history.push(json!({"role": "assistant", "content": g.text}));
            }
            Err(e) => {
                eprintln!("error: {e}");
                history.pop();
                session.reset();
            }
        }
    }
    Ok(())
}
