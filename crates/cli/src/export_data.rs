//! `ferrolm data export --stored`: the server's stored chat completions (`store: true`,
//! `serve --store-all`) as fine-tuning JSONL in OpenAI's chat format, the file `ferrolm
//! finetune` and `/v1/fine_tuning/jobs` take. The lines are `ferrolm_accounting::sft_lines`,
//! the same as the server's `POST /v1/chat/completions/export`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use ferrolm_accounting::{sft_lines, CompletionQuery, Owner};

use crate::keys::DataDirArg;

#[derive(Subcommand)]
pub enum DataCmd {
    /// Write the server's stored chat completions as fine-tuning JSONL.
    ///
    /// Each stored reply (each choice) becomes one line: the request's messages followed by the
    /// reply as an assistant message, plus the request's `tools` when it had any. With
    /// --with-logprobs a line also has `logprobs`: the reply's tokens as OpenAI reports them in
    /// `choices[].logprobs.content`, [{"token", "logprob", "bytes", "top_logprobs": [{"token",
    /// "logprob", "bytes"}]}]; replies stored without log-probs are then left out (ask for
    /// them with `logprobs: true, top_logprobs: K`).
    Export(ExportArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DataFormat {
    /// OpenAI's chat fine-tuning format: one {"messages": [...]} per line.
    Sft,
}

#[derive(Args)]
pub struct ExportArgs {
    /// Export the stored chat completions of the server's data dir (the one source so far).
    #[arg(long, required = true)]
    stored: bool,
    #[command(flatten)]
    dir: DataDirArg,
    /// Only completions answered by this model (its id as the answers name it).
    #[arg(long)]
    model: Option<String>,
    /// Only completions whose metadata has KEY=VALUE (repeatable: every pair must match).
    #[arg(long, value_name = "KEY=VALUE")]
    metadata: Vec<String>,
    /// Only the completions of this API key (name or id); default: every key's.
    #[arg(long, value_name = "NAME|ID")]
    key: Option<String>,
    /// The file format.
    #[arg(long, value_enum, default_value = "sft")]
    format: DataFormat,
    /// Where to write the JSONL.
    #[arg(long, value_name = "FILE.jsonl")]
    out: PathBuf,
    /// Keep the teacher's top log-probs of every reply token in a `logprobs` field (for
    /// token-level distillation).
    #[arg(long)]
    with_logprobs: bool,
}

pub fn run(cmd: DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Export(a) => export(a),
    }
}

fn export(a: ExportArgs) -> Result<()> {
    let DataFormat::Sft = a.format;
    let Some(store) = a.dir.open_existing()? else {
        bail!(
            "there is no server store at {} (no ferrolm.db): give the --data-dir (or --store) of the `ferrolm serve` that stored the completions",
            a.dir.shown()
        );
    };
    let mut metadata = Vec::new();
    for m in &a.metadata {
        let Some((k, v)) = m.split_once('=') else {
            bail!("--metadata {m:?}: give KEY=VALUE");
        };
        metadata.push((k.to_owned(), v.to_owned()));
    }
    let owner = match &a.key {
        Some(k) => Owner::Key(Some(store.find_key(k)?.id)),
        None => Owner::Any,
    };
    let mut q = CompletionQuery {
        model: a.model.clone(),
        metadata,
        ..CompletionQuery::all(owner)
    };
    let mut text = String::new();
    let (mut completions, mut lines, mut skipped) = (0usize, 0usize, 0usize);
    loop {
        let page = store.completions(&q)?;
        for c in &page.items {
            completions += 1;
            let (ls, left_out) = sft_lines(c, a.with_logprobs);
            skipped += left_out;
            for l in ls {
                lines += 1;
                text.push_str(&l.to_string());
                text.push('\n');
            }
        }
        match (page.has_more, page.items.last()) {
            (true, Some(last)) => q.after = Some(last.id.clone()),
            _ => break,
        }
    }
    if lines == 0 {
        if skipped > 0 {
            bail!("nothing to export: the {skipped} matching replies were stored without log-probs; send `logprobs: true, top_logprobs: K` with the requests, or leave out --with-logprobs");
        }
        bail!(
            "nothing to export: {completions} stored completions in {} match; store some with `store: true` (or `ferrolm serve --store-all`), or loosen --model / --metadata",
            a.dir.shown()
        );
    }
    let tmp = a.out.with_extension("jsonl.tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.out).with_context(|| format!("cannot write {}", a.out.display()))?;
    print!(
        "{}: {lines} examples from {completions} stored completions",
        a.out.display()
    );
    if skipped > 0 {
        print!(" ({skipped} replies left out: stored without log-probs)");
    }
    println!();
    Ok(())
}
