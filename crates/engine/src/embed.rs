//! Embeddings: an [`Embedder`] is an encoder model with its tokenizer, loaded from a Hugging
//! Face / sentence-transformers directory, turning texts (or token ids) into vectors. It holds
//! no state between calls and is shared by reference (the server runs it on blocking threads).

use std::path::Path;

use ferrolm_models::{Encoder, ModelError};
use ferrolm_tokenizer::{EncoderTokenizer, TokenizerError};

/// Most tokens stacked into one encoder pass (bounds its activations: ~15 MB of f32 per 1,000
/// tokens for all-MiniLM-L6-v2).
pub const BATCH_TOKENS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The input does not fit the model's window and truncation was not asked for.
    #[error(
        "the input is {tokens} tokens, more than the embedding model's limit of {limit} tokens"
    )]
    TooLong { tokens: usize, limit: usize },
    #[error("token id {id} is outside the embedding model's vocabulary (0..{vocab})")]
    BadToken { id: u32, vocab: usize },
    #[error("an input is an empty list of tokens")]
    NoTokens,
}

impl EmbedError {
    /// The caller's input was at fault (an HTTP 400), not the model.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, EmbedError::Model(_))
    }
}

/// One embedded input.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub vector: Vec<f32>,
    /// Tokens the model read (after truncation, special tokens included).
    pub tokens: usize,
}

#[derive(Debug)]
pub struct Embedder {
    pub model: Encoder,
    pub tokenizer: EncoderTokenizer,
}

impl Embedder {
    /// Load `dir` (`config.json`, `model.safetensors`, `tokenizer.json`, the
    /// sentence-transformers pooling files).
    pub fn load(dir: &Path) -> Result<Self, EmbedError> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(EmbedError::Tokenizer(TokenizerError::Invalid {
                path: tok_path,
                reason: "missing: an embedding model directory needs its tokenizer.json".into(),
            }));
        }
        let model = Encoder::load(dir)?;
        let tokenizer = EncoderTokenizer::from_json_file(&tok_path)?;
        Ok(Embedder { model, tokenizer })
    }

    /// The directory the model was loaded from.
    pub fn model_dir(&self) -> &Path {
        self.model.dir()
    }

    pub fn dim(&self) -> usize {
        self.model.dim()
    }

    /// The most tokens one input may have (special tokens included).
    pub fn max_tokens(&self) -> usize {
        self.model.max_tokens()
    }

    /// The token ids `text` is embedded from.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        Ok(self.tokenizer.encode(text)?)
    }

    /// Embed a text. Past the window it is refused, or with `truncate` cut to the window
    /// keeping its closing special token (`[CLS] first tokens … [SEP]`, as Hugging Face's
    /// truncation does).
    pub fn embed_text(&self, text: &str, truncate: bool) -> Result<Embedding, EmbedError> {
        let mut ids = self.tokenize(text)?;
        let limit = self.max_tokens();
        if ids.len() > limit {
            if !truncate {
                return Err(EmbedError::TooLong {
                    tokens: ids.len(),
                    limit,
                });
            }
            let last = ids[ids.len() - 1];
            ids.truncate(limit - 1);
            ids.push(last);
        }
        self.embed_ids(&ids)
    }

    /// Embed token ids as given (no special tokens are added; never truncated).
    pub fn embed_ids(&self, ids: &[u32]) -> Result<Embedding, EmbedError> {
        let mut v = self.embed_batch(&[ids.to_vec()]).map_err(|(_, e)| e)?;
        Ok(v.pop().unwrap_or(Embedding {
            vector: Vec::new(),
            tokens: 0,
        }))
    }

    /// Embed several token sequences as given, stacked into passes of at most
    /// [`BATCH_TOKENS`] tokens (many short texts run as one large matrix product). A refused
    /// input comes back with its index.
    pub fn embed_batch(&self, seqs: &[Vec<u32>]) -> Result<Vec<Embedding>, (usize, EmbedError)> {
        for (i, ids) in seqs.iter().enumerate() {
            self.check(ids).map_err(|e| (i, e))?;
        }
        let mut out = Vec::with_capacity(seqs.len());
        let mut i = 0;
        while i < seqs.len() {
            let mut end = i + 1;
            let mut tokens = seqs[i].len();
            while end < seqs.len() && tokens + seqs[end].len() <= BATCH_TOKENS {
                tokens += seqs[end].len();
                end += 1;
            }
            let pass: Vec<&[u32]> = seqs[i..end].iter().map(Vec::as_slice).collect();
            let vecs = self
                .model
                .embed_batch(&pass)
                .map_err(|e| (i, EmbedError::Model(e)))?;
            out.extend(vecs.into_iter().zip(&pass).map(|(vector, ids)| Embedding {
                vector,
                tokens: ids.len(),
            }));
            i = end;
        }
        Ok(out)
    }

    fn check(&self, ids: &[u32]) -> Result<(), EmbedError> {
        let limit = self.max_tokens();
        if ids.is_empty() {
            return Err(EmbedError::NoTokens);
        }
        if ids.len() > limit {
            return Err(EmbedError::TooLong {
                tokens: ids.len(),
                limit,
            });
        }
        let vocab = self.tokenizer.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(EmbedError::BadToken { id, vocab });
        }
        Ok(())
    }
}
