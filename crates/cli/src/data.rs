//! `ferrolm tokenizer train` and `ferrolm prepare`: a text corpus becomes a vocabulary
//! (`tokenizer.gguf`) and token shards (`train.bin`, `val.bin`) that `ferrolm train` reads.
//!
//! Both are thin: the work and its checks live in `ferrolm_train::{tokenize, data}`; this
//! file parses arguments and reports what was written.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use ferrolm_tokenizer::Tokenizer;
use ferrolm_train::data;
use ferrolm_train::tokenize::{self, TokenizerChoice, TOKENIZER_FILE};

#[derive(Args)]
pub struct TokenizerTrainArgs {
    /// UTF-8 text corpus.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// `char` (one token per distinct character, nanoGPT's ids) or `bpe:N` (a byte-level BPE
    /// of N tokens, the 3 special tokens included); a .gguf path copies that vocabulary.
    #[arg(long, value_name = "char|bpe:N")]
    pub kind: TokenizerChoice,
    /// Where to write the vocabulary.
    #[arg(long, value_name = "FILE", default_value = TOKENIZER_FILE)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct PrepareArgs {
    /// UTF-8 text corpus.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// `char`, `bpe:N` (trained on --data), or the path of a GGUF model or tokenizer.gguf
    /// whose vocabulary to use.
    #[arg(long, value_name = "char|bpe:N|PATH.gguf")]
    pub tokenizer: TokenizerChoice,
    /// Output directory: tokenizer.gguf, train.bin and val.bin are written there.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Fraction of the corpus, taken from its end, kept for validation.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
}

pub fn run_tokenizer_train(a: TokenizerTrainArgs) -> Result<()> {
    let started = Instant::now();
    let corpus = data::read_corpus(&a.data)?;
    let meta = tokenize::build(&a.kind, &corpus)?;
    let tok = tokenize::from_metadata(&meta)?;
    tokenize::write(&a.out, &meta)?;
    println!(
        "{}: {} vocabulary of {} tokens ({} special), built in {:.1}s",
        a.out.display(),
        a.kind,
        tok.vocab_size(),
        tok.specials().len(),
        started.elapsed().as_secs_f64()
    );
    report_short_vocab(&a.kind, &tok);
    print_sample(&tok, &corpus)
}

pub fn run_prepare(a: PrepareArgs) -> Result<()> {
    let started = Instant::now();
    // Checked first: BPE training can take minutes.
    data::check_val_fraction(a.val_fraction)?;
    let corpus = data::read_corpus(&a.data)?;
    let meta = tokenize::build(&a.tokenizer, &corpus)?;
    let tok = tokenize::from_metadata(&meta)?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create the output directory {}", a.out.display()))?;
    let tok_path = a.out.join(TOKENIZER_FILE);
    tokenize::write(&tok_path, &meta)?;
    println!(
        "{}: {} vocabulary of {} tokens ({:.1}s)",
        tok_path.display(),
        a.tokenizer,
        tok.vocab_size(),
        started.elapsed().as_secs_f64()
    );
    report_short_vocab(&a.tokenizer, &tok);
    let stats = data::prepare(&corpus, &tok, &a.out, a.val_fraction)?;
    println!(
        "{}: {} tokens\n{}: {} tokens\n({:?} ids, encoded and written in {:.1}s)",
        stats.train_path.display(),
        stats.train_tokens,
        stats.val_path.display(),
        stats.val_tokens,
        stats.dtype,
        stats.elapsed.as_secs_f64()
    );
    Ok(())
}

/// Say so when the corpus could not fill the BPE vocabulary that was asked for.
fn report_short_vocab(kind: &TokenizerChoice, tok: &Tokenizer) {
    if let TokenizerChoice::Bpe { vocab_size } = kind {
        if tok.vocab_size() < *vocab_size {
            println!(
                "note: the corpus has too few distinct pairs to fill {vocab_size} tokens; the vocabulary has {}",
                tok.vocab_size()
            );
        }
    }
}

/// Show how the corpus's first line (up to 80 chars) splits into tokens.
fn print_sample(tok: &Tokenizer, corpus: &str) -> Result<()> {
    let line = corpus.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let sample: String = line.chars().take(80).collect();
    let ids = tok.encode(&sample, false)?;
    let pieces: Vec<String> = ids
        .iter()
        .map(|&id| {
            String::from_utf8_lossy(tok.token_bytes(id))
                .escape_debug()
                .to_string()
        })
        .collect();
    println!(
        "sample: {sample:?} → {} tokens\n  {}\n  ids {:?}",
        ids.len(),
        pieces.join("|"),
        ids
    );
    Ok(())
}
