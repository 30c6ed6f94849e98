//! Why training (or preparing data for it) stopped: one enum for the crate, each message
//! naming the file or value at fault and saying how to fix it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{}: cannot read or write: {source}. Check the path and its permissions", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is empty: pass a text file with at least a few thousand characters")]
    CorpusEmpty {
        /// The file, or which text, was empty.
        what: String,
    },
    #[error("{}: the corpus is not UTF-8 (first invalid byte at offset {offset}): convert it, e.g. `iconv -f latin1 -t utf-8`", path.display())]
    CorpusNotUtf8 { path: PathBuf, offset: usize },
    #[error("{what} has {tokens} tokens but one training window needs {needed} (context + 1): use a longer corpus, a smaller --val-fraction, or a shorter context")]
    CorpusTooShort {
        /// What was too short, e.g. the shard's path.
        what: String,
        tokens: u64,
        needed: u64,
    },
    #[error("{}: bad token shard {field}: {reason}. Recreate it with `ferrolm prepare`", path.display())]
    BadShard {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
    #[error("{}: the shard was tokenized with a vocabulary of {shard} tokens but the model has {model}: prepare the data with the model's tokenizer", path.display())]
    VocabMismatch {
        path: PathBuf,
        shard: u64,
        model: u64,
    },
    #[error("{}: window [{start}, {start}+{len}) runs past the shard's {shard_len} tokens", path.display())]
    WindowOutOfRange {
        path: PathBuf,
        start: u64,
        len: u64,
        shard_len: u64,
    },
    #[error("tokenizer `{input}`: {reason}. Accepted: `char`, `bpe:VOCAB_SIZE` (e.g. `bpe:8192`), or the path of a .gguf model or tokenizer.gguf")]
    BadTokenizerChoice { input: String, reason: String },
    #[error("a BPE vocabulary of {requested} tokens is too small: it needs the 256 byte tokens, the {specials} special tokens and at least one merge, so ask for at least {minimum} (e.g. `bpe:8192`)")]
    VocabTooSmall {
        requested: usize,
        specials: usize,
        minimum: usize,
    },
    #[error("validation fraction {value} is outside [0, 1): pass e.g. `--val-fraction 0.1` (0 keeps everything for training)")]
    BadValFraction { value: f64 },
    #[error("tokenizer: {message}")]
    Tokenizer { message: String },
    #[error(transparent)]
    Gguf(#[from] ferrolm_gguf::GgufError),
    #[error("{what}: {reason}")]
    Config { what: String, reason: String },
    #[error("{}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    HfImport { path: PathBuf, reason: String },
}

impl From<ferrolm_tokenizer::TokenizerError> for TrainError {
    fn from(e: ferrolm_tokenizer::TokenizerError) -> Self {
        match e {
            ferrolm_tokenizer::TokenizerError::Gguf(g) => TrainError::Gguf(g),
            other => TrainError::Tokenizer {
                message: other.to_string(),
            },
        }
    }
}

impl TrainError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
        let path = path.into();
        move |source| TrainError::Io { path, source }
    }
}
