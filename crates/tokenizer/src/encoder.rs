//! The tokenizer of an embedding model (BERT's WordPiece and the like): a Hugging Face
//! `tokenizer.json` run as the file says (normalizer, pre-tokenizer, `[CLS] … [SEP]`
//! template), except for the file's own truncation and padding, which are switched off: the
//! caller decides what happens to a long input, and every sequence is encoded alone.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer as HfTokenizer;

use crate::TokenizerError;

#[derive(Debug)]
pub struct EncoderTokenizer {
    hf: HfTokenizer,
    pub path: PathBuf,
}

impl EncoderTokenizer {
    pub fn from_json_file(path: &Path) -> Result<Self, TokenizerError> {
        let invalid = |reason: String| TokenizerError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let mut hf = HfTokenizer::from_file(path).map_err(|e| invalid(e.to_string()))?;
        hf.with_truncation(None)
            .map_err(|e| invalid(e.to_string()))?;
        hf.with_padding(None);
        Ok(EncoderTokenizer {
            hf,
            path: path.to_owned(),
        })
    }

    /// The ids of `text` with the model's special tokens around it (`[CLS] … [SEP]`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .hf
            .encode(text, true)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids including added (special) tokens.
    pub fn vocab_size(&self) -> usize {
        self.hf.get_vocab_size(true)
    }
}
