//! Text ⇄ token ids, and chat templates: the text edge of ferrolm.
//!
//! Contract: [`Tokenizer`] is built from a GGUF's `tokenizer.ggml.*` metadata (or a Hugging
//! Face `tokenizer.json`) and reproduces Hugging Face `transformers`' ids for that model
//! (checked against committed vectors in `golden/tokenizer_vectors.json`).
//!
//! * Special tokens (GGUF token type CONTROL) are matched by ferrolm itself, not by the HF
//!   added-vocabulary: [`Tokenizer::encode`] with `special = false` treats a string such as
//!   `<|im_start|>` as plain text, with `special = true` it becomes its control id. The HF
//!   tokenizer underneath only ever sees plain text.
//! * Decoding goes through a per-id byte table ([`Tokenizer::token_bytes`]), so incremental
//!   detokenization works on bytes and never cuts a UTF-8 character (see `ferrolm-engine`).
//! * Chat templates ([`chat::ChatTemplate`]) render with minijinja under HF's conventions, and
//!   text inside messages can never become a special token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ferrolm_gguf::GgufFile;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{SplitDelimiterBehavior, Tokenizer as HfTokenizer};

pub mod chat;
pub mod encoder;

pub use encoder::EncoderTokenizer;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] ferrolm_gguf::GgufError),
    #[error("{path}: tokenizer model `{model}` is not supported (supported: `gpt2` byte-level BPE and `llama` SentencePiece)")]
    UnsupportedModel { path: PathBuf, model: String },
    #[error("{path}: invalid tokenizer data: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("tokenizer failed on the input: {0}")]
    Encode(String),
    #[error("chat template: {0}")]
    Template(String),
}

/// The GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// llama.cpp's `tokenizer.ggml.pre` names → the regex split that precedes byte-level BPE.
/// SmolLM2 ("smollm") splits digits individually and then uses GPT-2's byte-level regex.
enum PreTokenizerKind {
    /// GPT-2's regex inside ByteLevel, optionally preceded by splitting digits one by one.
    Gpt2 { split_digits: bool },
    /// A regex split (isolated) followed by ByteLevel without its own regex.
    Regex(&'static str),
}

/// Llama 3's pre-tokenizer split (`tokenizer.ggml.pre = llama-bpe`).
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split (`qwen2`): Llama 3's with single digits.
pub const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn pre_tokenizer_for(pre: &str) -> Option<PreTokenizerKind> {
    Some(match pre {
        "smollm" | "starcoder" | "refact" => PreTokenizerKind::Gpt2 { split_digits: true },
        "gpt2" | "default" | "gpt-2" | "phi-2" | "olmo" => PreTokenizerKind::Gpt2 {
            split_digits: false,
        },
        "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "smaug-bpe" => {
            PreTokenizerKind::Regex(LLAMA3_REGEX)
        }
        "qwen2" | "deepseek-r1-qwen" => PreTokenizerKind::Regex(QWEN2_REGEX),
        _ => return None,
    })
}

/// GPT-2's byte → printable char table, inverted: char → byte.
fn byte_level_inverse() -> HashMap<char, u8> {
    let mut bytes: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = bytes.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    bytes
        .into_iter()
        .zip(chars)
        .filter_map(|(b, c)| char::from_u32(c).map(|c| (c, b as u8)))
        .collect()
}

/// How vocabulary strings spell bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceKind {
    /// GPT-2's printable byte alphabet (`Ġ` = space).
    ByteLevel,
    /// SentencePiece: `▁` = space, `<0xNN>` = raw byte.
    Sentencepiece,
}

fn piece_bytes(piece: &str, kind: PieceKind, inverse: &HashMap<char, u8>) -> Vec<u8> {
    match kind {
        PieceKind::ByteLevel => {
            let mut b = Vec::with_capacity(piece.len());
            for c in piece.chars() {
                // Chars outside the byte alphabet (rare user-defined tokens) stand for themselves.
                match inverse.get(&c) {
                    Some(&x) => b.push(x),
                    None => b.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
            b
        }
        PieceKind::Sentencepiece => {
            if let Some(hex) = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
                if let Ok(b) = u8::from_str_radix(hex, 16) {
                    return vec![b];
                }
            }
            piece.replace('\u{2581}', " ").into_bytes()
        }
    }
}

/// Tell the HF tokenizer about the special tokens (so a saved `tokenizer.json` is complete)
/// while keeping it from ever matching them: ferrolm decides when text is special.
fn register_specials(hf: &mut HfTokenizer, specials: &[SpecialToken]) -> tokenizers::Result<()> {
    let added: Vec<tokenizers::AddedToken> = specials
        .iter()
        .map(|s| tokenizers::AddedToken::from(s.text.clone(), true))
        .collect();
    hf.add_special_tokens(added)?;
    hf.set_encode_special_tokens(true);
    Ok(())
}

/// SentencePiece BPE merges recovered from scores, as llama.cpp's SPM tokenizer applies them:
/// a pair merges when its concatenation is in the vocabulary, higher score first.
fn spm_merges(tokens: &[&str], scores: &[f32], types: &[i64]) -> Vec<(String, String)> {
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(f32, usize, String, String)> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if types[i] != 1 {
            continue;
        }
        for (k, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(k);
            if index.contains_key(a) && index.contains_key(b) {
                merges.push((scores[i], i, a.to_owned(), b.to_owned()));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    merges.into_iter().map(|(_, _, a, b)| (a, b)).collect()
}

/// A special (control) token: matched in text only when the caller asks for it.
#[derive(Debug, Clone)]
pub struct SpecialToken {
    pub id: u32,
    pub text: String,
}

/// Byte-level BPE tokenizer with ferrolm-managed special tokens.
pub struct Tokenizer {
    hf: HfTokenizer,
    /// id → the exact bytes it stands for (special tokens: their text).
    bytes: Vec<Vec<u8>>,
    /// id → its vocabulary string (`Ġthe`), for display.
    pieces: Vec<String>,
    /// Sorted longest first, so `<|im_start|>` wins over a shorter prefix.
    specials: Vec<SpecialToken>,
    /// User-defined tokens (GGUF token type 4, e.g. Gemma's runs of spaces, tabs and newlines):
    /// matched in any text before the model's own tokenizer runs, longest first, as llama.cpp
    /// and Hugging Face's added vocabulary do. Sorted longest first.
    user_defined: Vec<SpecialToken>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Whether the model expects a BOS before the prompt (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("specials", &self.specials.len())
            .finish()
    }
}

impl Tokenizer {
    /// Build from a GGUF's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, TokenizerError> {
        let path = &g.path;
        let invalid = |reason: String| TokenizerError::Invalid {
            path: path.clone(),
            reason,
        };
        let model = g.get_str("tokenizer.ggml.model")?;
        if model == "llama" {
            return Self::spm_from_gguf(g);
        }
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel {
                path: path.clone(),
                model: model.to_owned(),
            });
        }
        let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
        let merges = g.get_str_array("tokenizer.ggml.merges")?;
        let types = match g.get("tokenizer.ggml.token_type") {
            Some(_) => g.get_i64_array("tokenizer.ggml.token_type")?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(invalid(format!(
                "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}",
                types.len(),
                tokens.len()
            )));
        }
        let pre_name = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let pre = pre_tokenizer_for(pre_name).ok_or_else(|| {
            invalid(format!(
                "tokenizer.ggml.pre = `{pre_name}` is not a known pre-tokenizer; known: smollm, gpt2, llama-bpe, qwen2"
            ))
        })?;

        let mut vocab = tokenizers::models::bpe::Vocab::default();
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert((*t).to_owned(), i as u32);
        }
        let merges: Vec<(String, String)> = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| invalid(format!("merge #{i} `{m}` has no space separator")))
            })
            .collect::<Result<_, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| invalid(format!("BPE: {e}")))?;
        let mut hf = HfTokenizer::new(bpe);
        hf.with_decoder(Some(ByteLevelDecoder::default()));
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tok: PreTokenizerWrapper = match pre {
            PreTokenizerKind::Gpt2 { split_digits } => {
                if split_digits {
                    Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
                } else {
                    byte_level.into()
                }
            }
            PreTokenizerKind::Regex(re) => {
                let split = Split::new(
                    SplitPattern::Regex(re.to_owned()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| invalid(format!("pre-tokenizer regex: {e}")))?;
                Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ])
                .into()
            }
        };
        hf.with_pre_tokenizer(Some(pre_tok));

        Self::from_gguf_vocab(g, hf, &tokens, &types, PieceKind::ByteLevel, false)
    }

    /// A SentencePiece (`tokenizer.ggml.model = "llama"`) vocabulary: Llama 2, TinyLlama,
    /// Mistral. BPE over the scored pieces with byte fallback; a space is `▁`, and one is
    /// prepended to the text when `tokenizer.ggml.add_space_prefix` (default true).
    fn spm_from_gguf(g: &GgufFile) -> Result<Self, TokenizerError> {
        use tokenizers::normalizers::{Prepend, Replace, Sequence as NSeq};
        let path = &g.path;
        let invalid = |reason: String| TokenizerError::Invalid {
            path: path.clone(),
            reason,
        };
        let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
        let scores = g.get_f32_array("tokenizer.ggml.scores")?;
        let types = g.get_i64_array("tokenizer.ggml.token_type")?;
        if scores.len() != tokens.len() || types.len() != tokens.len() {
            return Err(invalid(
                "tokens, scores and token_type differ in length".into(),
            ));
        }
        let mut vocab = tokenizers::models::bpe::Vocab::default();
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert((*t).to_owned(), i as u32);
        }
        let unk = g
            .get_u64("tokenizer.ggml.unknown_token_id")
            .ok()
            .and_then(|i| tokens.get(i as usize))
            .map(|s| (*s).to_owned());
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, spm_merges(&tokens, &scores, &types))
            .byte_fallback(true)
            .fuse_unk(true);
        if let Some(u) = unk {
            builder = builder.unk_token(u);
        }
        let bpe = builder.build().map_err(|e| invalid(format!("BPE: {e}")))?;
        let mut hf = HfTokenizer::new(bpe);
        let replace = Replace::new(" ", "\u{2581}").map_err(|e| invalid(e.to_string()))?;
        let norm: tokenizers::NormalizerWrapper = if g
            .get_bool("tokenizer.ggml.add_space_prefix")
            .unwrap_or(true)
        {
            NSeq::new(vec![Prepend::new("\u{2581}".into()).into(), replace.into()]).into()
        } else {
            replace.into()
        };
        hf.with_normalizer(Some(norm))
            .map_err(|e| invalid(e.to_string()))?;
        Self::from_gguf_vocab(g, hf, &tokens, &types, PieceKind::Sentencepiece, true)
    }

    /// What both GGUF vocabularies share once the HF pipeline is built: control tokens become
    /// ferrolm specials, every id gets its byte string, BOS/EOS ids are read and checked.
    fn from_gguf_vocab(
        g: &GgufFile,
        mut hf: HfTokenizer,
        tokens: &[&str],
        types: &[i64],
        kind: PieceKind,
        default_add_bos: bool,
    ) -> Result<Self, TokenizerError> {
        let inverse = match kind {
            PieceKind::ByteLevel => byte_level_inverse(),
            PieceKind::Sentencepiece => HashMap::new(),
        };
        let mut specials = Vec::new();
        let mut user_defined = Vec::new();
        let mut bytes = Vec::with_capacity(tokens.len());
        for (i, (t, ty)) in tokens.iter().zip(types).enumerate() {
            if *ty == TOKEN_TYPE_USER_DEFINED && !t.is_empty() {
                user_defined.push(SpecialToken {
                    id: i as u32,
                    text: (*t).to_owned(),
                });
            }
            if *ty == TOKEN_TYPE_CONTROL {
                specials.push(SpecialToken {
                    id: i as u32,
                    text: (*t).to_owned(),
                });
                bytes.push(t.as_bytes().to_vec());
            } else {
                bytes.push(piece_bytes(t, kind, &inverse));
            }
        }
        specials.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.id.cmp(&b.id)));
        user_defined.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.id.cmp(&b.id)));
        register_specials(&mut hf, &specials).map_err(|e| TokenizerError::Invalid {
            path: g.path.clone(),
            reason: format!("special tokens: {e}"),
        })?;
        let id_key = |k: &str| {
            g.get_u64(k)
                .ok()
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| (v as usize) < tokens.len())
        };
        Ok(Tokenizer {
            hf,
            bytes,
            pieces: tokens.iter().map(|s| (*s).to_owned()).collect(),
            specials,
            user_defined,
            bos_id: id_key("tokenizer.ggml.bos_token_id"),
            eos_id: id_key("tokenizer.ggml.eos_token_id"),
            add_bos: g
                .get_bool("tokenizer.ggml.add_bos_token")
                .unwrap_or(default_add_bos),
        })
    }

    /// Write the tokenizer as a Hugging Face `tokenizer.json` (loadable with
    /// [`Tokenizer::from_json_file`] and by `transformers`).
    pub fn save_json(&self, path: &Path) -> Result<(), TokenizerError> {
        self.hf
            .save(path, true)
            .map_err(|e| TokenizerError::Invalid {
                path: path.to_owned(),
                reason: e.to_string(),
            })
    }

    /// Build from a Hugging Face `tokenizer.json`. Its added tokens marked `special` become
    /// ferrolm special tokens; the file's own pipeline (normalizer, pre-tokenizer) is kept.
    pub fn from_json_file(path: &Path) -> Result<Self, TokenizerError> {
        let invalid = |reason: String| TokenizerError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let mut hf = HfTokenizer::from_file(path).map_err(|e| invalid(e.to_string()))?;
        let added = hf.get_added_tokens_decoder();
        let vocab_size = hf.get_vocab_size(true);
        let mut specials: Vec<SpecialToken> = added
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| SpecialToken {
                id: *id,
                text: t.content.clone(),
            })
            .collect();
        specials.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.id.cmp(&b.id)));
        // The HF added-vocabulary must not match specials: ferrolm does that itself.
        hf.set_encode_special_tokens(true);
        let decoder = hf
            .get_decoder()
            .and_then(|d| serde_json::to_string(d).ok())
            .unwrap_or_default();
        let kind = if decoder.contains("ByteLevel") {
            Some(PieceKind::ByteLevel)
        } else if decoder.contains("ByteFallback") || decoder.contains("Metaspace") {
            Some(PieceKind::Sentencepiece)
        } else {
            None
        };
        let inverse = byte_level_inverse();
        let mut bytes = Vec::with_capacity(vocab_size);
        let mut pieces = Vec::with_capacity(vocab_size);
        for id in 0..vocab_size as u32 {
            let piece = hf.id_to_token(id).unwrap_or_default();
            let b = match (added.get(&id), kind) {
                (Some(t), _) => t.content.clone().into_bytes(),
                (None, Some(k)) => piece_bytes(&piece, k, &inverse),
                // Unknown decoder: ask it (exact for whole characters).
                (None, None) => hf.decode(&[id], false).unwrap_or_default().into_bytes(),
            };
            bytes.push(b);
            pieces.push(piece);
        }
        let find = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| specials.iter().find(|s| s.text == *n).map(|s| s.id))
        };
        let eos_id = find(&["<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>"]);
        let bos_id = find(&["<s>", "<|begin_of_text|>", "<|endoftext|>"]);
        Ok(Tokenizer {
            hf,
            bytes,
            pieces,
            specials,
            // The HF tokenizer's own added vocabulary matches these.
            user_defined: Vec::new(),
            bos_id,
            eos_id,
            add_bos: false,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    pub fn specials(&self) -> &[SpecialToken] {
        &self.specials
    }

    pub fn special_id(&self, text: &str) -> Option<u32> {
        self.specials.iter().find(|s| s.text == text).map(|s| s.id)
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.specials.iter().any(|s| s.id == id)
    }

    /// The vocabulary string of `id` (e.g. `Ġthe`).
    pub fn piece(&self, id: u32) -> &str {
        self.pieces.get(id as usize).map_or("", |s| s.as_str())
    }

    /// The exact bytes `id` stands for.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], |b| b.as_slice())
    }

    /// Encode text with no BOS. With `special`, control-token strings in `text` become their
    /// ids; without, they are plain text.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, TokenizerError> {
        if !special {
            return self.encode_plain(text);
        }
        let mut ids = Vec::new();
        let mut rest = text;
        while let Some((at, tok)) = self.find_special(rest) {
            ids.extend(self.encode_plain(&rest[..at])?);
            ids.push(tok.id);
            rest = &rest[at + tok.text.len()..];
        }
        ids.extend(self.encode_plain(rest)?);
        Ok(ids)
    }

    /// Leftmost special token in `text`, longest first at that position.
    fn find_special(&self, text: &str) -> Option<(usize, &SpecialToken)> {
        let mut best: Option<(usize, &SpecialToken)> = None;
        for s in &self.specials {
            if let Some(at) = text.find(&s.text) {
                if best.is_none_or(|(b, t)| at < b || (at == b && s.text.len() > t.text.len())) {
                    best = Some((at, s));
                }
            }
        }
        best
    }

    /// Plain text (no control tokens): user-defined tokens first, the model's tokenizer on
    /// the text between them.
    fn encode_plain(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        if self.user_defined.is_empty() {
            return self.encode_pieces(text);
        }
        let mut ids = Vec::new();
        let (bytes, mut start, mut i) = (text.as_bytes(), 0, 0);
        while i < bytes.len() {
            // Token texts are whole UTF-8 strings, so a match starts on a char boundary.
            let hit = self
                .user_defined
                .iter()
                .find(|u| bytes[i..].starts_with(u.text.as_bytes()));
            match hit {
                Some(u) => {
                    ids.extend(self.encode_pieces(&text[start..i])?);
                    ids.push(u.id);
                    i += u.text.len();
                    start = i;
                }
                None => i += 1,
            }
        }
        ids.extend(self.encode_pieces(&text[start..])?);
        Ok(ids)
    }

    fn encode_pieces(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .hf
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decode ids to text; invalid UTF-8 (a cut multi-byte char) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = Vec::new();
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id));
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}
