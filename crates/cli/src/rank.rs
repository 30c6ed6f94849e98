//! `ferrolm rank`: the human step of RLHF in a terminal. For each prompt the model samples
//! `--n` answers; a person picks the best (or orders them all, best first); the best is
//! appended to `--out` as a preference line against each worse answer, in OpenAI's preference
//! format — what `ferrolm finetune --method dpo|reward` and the fine-tuning API read.
//!
//! Each line is written (and flushed) as soon as it is ranked, so quitting at any point loses
//! nothing; rerunning skips the prompts `--out` already has. Answers are read from stdin one
//! line per prompt, so a script can drive it too.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferrolm_engine::Session;
use serde_json::{json, Value};

use crate::{load, threads, LoraArgs, ModelArgs};

#[derive(Args)]
pub struct RankCmd {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    lora: LoraArgs,
    /// Prompts: JSONL, one per line — `{"messages": [...]}` (the conversation to answer) or
    /// `{"prompt": "..."}`; a line that is not JSON is one user message.
    #[arg(long)]
    prompts: PathBuf,
    /// Answers sampled per prompt.
    #[arg(long, default_value_t = 4)]
    n: usize,
    /// Where the preference lines are appended (OpenAI preference JSONL).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, short = 't')]
    threads: Option<usize>,
}

/// One prompt's input messages, from a line of the prompts file.
fn input_of(line: &str, n: usize) -> Result<Vec<Value>> {
    let msgs = match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(o)) => {
            if let Some(m) = o.get("messages") {
                m.as_array()
                    .cloned()
                    .with_context(|| format!("line {n}: `messages` must be a list"))?
            } else if let Some(p) = o.get("prompt").and_then(Value::as_str) {
                vec![json!({"role": "user", "content": p})]
            } else if let Some(m) = o
                .get("input")
                .and_then(|i| i.get("messages"))
                .and_then(Value::as_array)
            {
                m.clone()
            } else {
                bail!("line {n}: a JSON line needs `messages` (a list) or `prompt` (a string)")
            }
        }
        _ => vec![json!({"role": "user", "content": line})],
    };
    if msgs.is_empty() {
        bail!("line {n}: `messages` is empty");
    }
    ferrolm_train::sft::check_messages(&msgs).map_err(|e| anyhow::anyhow!("line {n}: {e}"))?;
    if msgs.last().and_then(|m| m.get("role")) == Some(&json!("assistant")) {
        bail!("line {n}: the conversation ends with an assistant message; give it up to the turn to answer");
    }
    Ok(msgs)
}

/// What the person answered for one prompt.
#[derive(Debug, PartialEq)]
enum Choice {
    /// The answers' numbers (0-based), best first: the best alone, or a full order.
    Ranked(Vec<usize>),
    Skip,
    Quit,
}

fn parse_choice(line: &str, n: usize) -> Result<Choice, String> {
    let t = line.trim();
    match t {
        "s" | "skip" => return Ok(Choice::Skip),
        "q" | "quit" => return Ok(Choice::Quit),
        _ => {}
    }
    let mut order = Vec::new();
    for w in t.split(|c: char| c.is_whitespace() || c == ',' || c == '>') {
        if w.is_empty() {
            continue;
        }
        let k: usize = w
            .parse()
            .map_err(|_| format!("`{w}` is not an answer number (1 to {n})"))?;
        if k == 0 || k > n {
            return Err(format!("{k} is not an answer number (1 to {n})"));
        }
        if order.contains(&(k - 1)) {
            return Err(format!("{k} is named twice"));
        }
        order.push(k - 1);
    }
    match order.len() {
        0 => Err("nothing given".into()),
        1 => Ok(Choice::Ranked(order)),
        l if l == n => Ok(Choice::Ranked(order)),
        l => Err(format!(
            "{l} numbers: give the best one, or all {n} in order, best first"
        )),
    }
}

pub fn run(a: RankCmd) -> Result<()> {
    if a.n < 2 {
        bail!("--n must be at least 2: a preference needs two answers");
    }
    let text = std::fs::read_to_string(&a.prompts)
        .with_context(|| format!("reading {}", a.prompts.display()))?;
    let inputs = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| input_of(l, i + 1))
        .collect::<Result<Vec<_>>>()
        .with_context(|| a.prompts.display().to_string())?;
    if inputs.is_empty() {
        bail!("{}: no prompts", a.prompts.display());
    }
    // Prompts already ranked (a rerun goes on where the last one stopped).
    let mut done = HashSet::new();
    if let Ok(prev) = std::fs::read_to_string(&a.out) {
        for (i, l) in prev.lines().enumerate() {
            let v: Value = serde_json::from_str(l).with_context(|| {
                format!("{} line {}: not a preference line", a.out.display(), i + 1)
            })?;
            done.insert(v["input"]["messages"].to_string());
        }
    }
    let m = load(&a.model)?;
    let mut session = Session::new(
        &m.model,
        m.model.cfg().context_length.min(4096),
        threads(a.threads)?,
    )?;
    a.lora.apply(&m, &mut session)?;
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.out)
        .with_context(|| format!("opening {}", a.out.display()))?;
    let stdin = std::io::stdin();
    let mut answers = stdin.lock().lines();
    let (mut written, mut ranked) = (0usize, 0usize);
    let todo: Vec<&Vec<Value>> = inputs
        .iter()
        .filter(|i| !done.contains(&Value::Array(i.to_vec()).to_string()))
        .collect();
    if todo.len() < inputs.len() {
        println!(
            "{} of {} prompts are already in {}; going on with the rest",
            inputs.len() - todo.len(),
            inputs.len(),
            a.out.display()
        );
    }
    'prompts: for (k, input) in todo.iter().enumerate() {
        let rendered = m
            .template
            .render(&m.tok, &Value::Array(input.to_vec()), true, None)?;
        let ids = m.tok.encode_chat(&rendered)?;
        let mut replies: Vec<String> = Vec::with_capacity(a.n);
        for i in 0..a.n {
            let opts = ferrolm_engine::GenerateOptions {
                params: ferrolm_sample::SamplingParams {
                    temperature: a.temperature,
                    top_p: a.top_p,
                    ..Default::default()
                },
                max_tokens: a.max_tokens,
                stop: Vec::new(),
                end_ids: m.end_ids(),
                seed: a.seed.wrapping_add((k * a.n + i) as u64),
                grammar: None,
            };
            let g = session.generate(&ids, &m.tok, &opts, |_| true)?;
            replies.push(g.text.trim().to_owned());
        }
        println!("\n── prompt {} of {} ──", k + 1, todo.len());
        for msg in input.iter() {
            println!(
                "{}: {}",
                msg["role"].as_str().unwrap_or(""),
                msg["content"].as_str().unwrap_or("")
            );
        }
        for (i, r) in replies.iter().enumerate() {
            println!("\n[{}] {r}", i + 1);
        }
        let order = loop {
            print!(
                "\nbest answer (1-{}), or all in order best first (e.g. 2 1 3 ...); s skips, q quits: ",
                a.n
            );
            std::io::stdout().flush()?;
            let Some(line) = answers.next() else {
                break 'prompts;
            };
            match parse_choice(&line?, a.n) {
                Ok(Choice::Ranked(o)) => break o,
                Ok(Choice::Skip) => continue 'prompts,
                Ok(Choice::Quit) => break 'prompts,
                Err(e) => println!("{e}"),
            }
        };
        let best = order[0];
        ranked += 1;
        // The best against each worse answer; an answer equal to the best says nothing.
        let worse: Vec<usize> = if order.len() == a.n {
            order[1..].to_vec()
        } else {
            (0..a.n).filter(|&i| i != best).collect()
        };
        for w in worse {
            if replies[w] == replies[best] {
                continue;
            }
            let line = json!({
                "input": {"messages": input},
                "preferred_output": [{"role": "assistant", "content": replies[best]}],
                "non_preferred_output": [{"role": "assistant", "content": replies[w]}],
            });
            writeln!(out, "{line}").with_context(|| format!("writing {}", a.out.display()))?;
            written += 1;
        }
        out.flush()?;
    }
    println!(
        "\n{ranked} prompts ranked, {written} preference lines appended to {}; train on them with `ferrolm finetune --method dpo --train {}` (or --method reward)",
        a.out.display(),
        a.out.display()
    );
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_as_a_person_types_them() {
        assert_eq!(parse_choice("2", 4), Ok(Choice::Ranked(vec![1])));
        assert_eq!(
            parse_choice(" 3 1 4 2 ", 4),
            Ok(Choice::Ranked(vec![2, 0, 3, 1]))
        );
        assert_eq!(
            parse_choice("3>1>4>2", 4),
            Ok(Choice::Ranked(vec![2, 0, 3, 1]))
        );
        assert_eq!(parse_choice("s", 4), Ok(Choice::Skip));
        assert_eq!(parse_choice("q", 4), Ok(Choice::Quit));
        assert!(parse_choice("5", 4).unwrap_err().contains("1 to 4"));
        assert!(parse_choice("0", 4).is_err());
        assert!(parse_choice("1 1 2 3", 4).unwrap_err().contains("twice"));
        assert!(parse_choice("1 2", 4).unwrap_err().contains("all 4"));
        assert!(parse_choice("", 4).is_err());
        assert!(parse_choice("best", 4).is_err());
    }

    #[test]
    fn prompt_lines_take_three_shapes() {
        let m = input_of(r#"{"prompt": "hi"}"#, 1).unwrap();
        assert_eq!(m, vec![json!({"role": "user", "content": "hi"})]);
        let m = input_of(r#"{"messages": [{"role": "user", "content": "yo"}]}"#, 2).unwrap();
        assert_eq!(m[0]["content"], "yo");
        let m = input_of("plain text", 3).unwrap();
        assert_eq!(m[0]["content"], "plain text");
        let e = input_of(
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
            4,
        )
        .unwrap_err();
        assert!(e.to_string().contains("line 4"), "{e}");
        assert!(input_of(r#"{"other": 1}"#, 5).is_err());
    }
}
