//! Vocabularies for training: built from a corpus (one token per character, or a byte-level
//! BPE trained here) or taken from an existing model, and stored as `tokenizer.gguf`.
//!
//! Contract:
//! * A vocabulary is a list of GGUF metadata entries, all under `tokenizer.` — the keys
//!   llama.cpp's converter writes (`tokenizer.ggml.model = "gpt2"`, `pre`, `tokens`,
//!   `token_type`, `merges`, BOS/EOS ids, `tokenizer.chat_template`). So the same entries go
//!   into an exported model GGUF unchanged, and `tokenizer.gguf` (those entries plus
//!   `general.architecture`, a tensor-less GGUF) is read by
//!   [`ferrolm_tokenizer::Tokenizer::from_gguf`], by `ChatTemplate::from_gguf` and by
//!   llama.cpp's vocab-only loader.
//! * Built vocabularies are byte-level BPE ("gpt2" model and pre-tokenizer) followed by three
//!   control tokens, in this order: `<|endoftext|>` (BOS and EOS), `<|im_start|>`, `<|im_end|>`;
//!   their chat template is ChatML.
//! * [`TokenizerChoice::Char`]: one token per distinct character of the corpus, ids in
//!   code-point order (nanoGPT's `sorted(set(text))`, so its `stoi` ids are ours). There are no
//!   merges between characters; a multi-byte character is its bytes joined by merges that exist
//!   only for it, and those byte and prefix tokens come after the characters. A character that
//!   is not in the corpus has no token and is dropped by the encoder (as with nanoGPT, whose
//!   `stoi` would raise).
//! * [`TokenizerChoice::Bpe`]: Hugging Face `tokenizers`' `BpeTrainer` over GPT-2's byte-level
//!   pre-tokenizer with all 256 bytes in the initial alphabet, so any text encodes. The size
//!   asked for counts the specials; a corpus too small to learn that many merges gives fewer.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ferrolm_gguf::{writer::GgufWriter, GgufFile, Value};
use ferrolm_tokenizer::chat::CHATML_TEMPLATE;
use ferrolm_tokenizer::Tokenizer;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{NormalizerWrapper, PostProcessorWrapper, TokenizerImpl};

use crate::data::{chunks, write_atomic};
use crate::error::TrainError;

/// End of text; also the BOS id (GPT-2's convention: one token separates documents).
pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
/// The control tokens every built vocabulary ends with, in id order.
pub const SPECIALS: [&str; 3] = [ENDOFTEXT, IM_START, IM_END];
/// The `tokenizer.ggml.pre` of built vocabularies: GPT-2's split regex inside ByteLevel, a
/// name both `ferrolm_tokenizer` and llama.cpp know.
/// (llama.cpp spells the GPT-2 pre-tokenizer `gpt-2`; `gpt2` is an error there.)
pub const PRE_TOKENIZER: &str = "gpt-2";

/// The file name a vocabulary gets in a data or run directory.
pub const TOKENIZER_FILE: &str = "tokenizer.gguf";

/// llama.cpp's `llama_token_type` values that built vocabularies use.
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_CONTROL: i32 = 3;

/// Where the vocabulary comes from: `char`, `bpe:VOCAB_SIZE`, or a GGUF file's path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TokenizerChoice {
    /// One token per distinct character of the corpus.
    Char,
    /// A byte-level BPE trained on the corpus; `vocab_size` counts the special tokens.
    Bpe { vocab_size: usize },
    /// The vocabulary of a GGUF model, or of a `tokenizer.gguf`.
    Model(PathBuf),
}

impl FromStr for TokenizerChoice {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self, TrainError> {
        let bad = |reason: &str| TrainError::BadTokenizerChoice {
            input: s.to_owned(),
            reason: reason.to_owned(),
        };
        if s == "char" {
            return Ok(TokenizerChoice::Char);
        }
        if let Some(n) = s.strip_prefix("bpe:") {
            let vocab_size = n
                .parse()
                .map_err(|_| bad("the vocabulary size after `bpe:` must be a whole number"))?;
            return Ok(TokenizerChoice::Bpe { vocab_size });
        }
        if s == "bpe" {
            return Err(bad("give the vocabulary size"));
        }
        let path = Path::new(s);
        // A typo such as `chars` must not turn into "cannot open file chars" later on.
        if path.exists() || s.to_ascii_lowercase().ends_with(".gguf") {
            return Ok(TokenizerChoice::Model(path.to_owned()));
        }
        Err(bad("not a known kind, and no such file"))
    }
}

impl fmt::Display for TokenizerChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizerChoice::Char => f.write_str("char"),
            TokenizerChoice::Bpe { vocab_size } => write!(f, "bpe:{vocab_size}"),
            TokenizerChoice::Model(p) => write!(f, "{}", p.display()),
        }
    }
}

impl TryFrom<String> for TokenizerChoice {
    type Error = TrainError;
    fn try_from(s: String) -> Result<Self, TrainError> {
        s.parse()
    }
}

impl From<TokenizerChoice> for String {
    fn from(c: TokenizerChoice) -> String {
        c.to_string()
    }
}

/// The vocabulary `choice` describes, as `tokenizer.*` GGUF metadata entries. `corpus` is
/// what `Char` and `Bpe` learn from; `Model` ignores it.
pub fn build(choice: &TokenizerChoice, corpus: &str) -> Result<Vec<(String, Value)>, TrainError> {
    match choice {
        TokenizerChoice::Char => char_vocab(corpus),
        TokenizerChoice::Bpe { vocab_size } => {
            let trained = train_bpe(corpus, *vocab_size)?;
            bpe_vocab(trained.get_model())
        }
        TokenizerChoice::Model(path) => model_vocab(path),
    }
}

/// Write `meta` as a tensor-less GGUF (adding `general.architecture = "llama"`, which
/// llama.cpp's vocab-only loader needs), atomically.
pub fn write(path: &Path, meta: &[(String, Value)]) -> Result<(), TrainError> {
    let bytes = gguf_bytes(meta);
    write_atomic(path, |w| std::io::Write::write_all(w, &bytes))
}

/// Read a `tokenizer.gguf` (or any GGUF with a vocabulary).
pub fn load(path: &Path) -> Result<Tokenizer, TrainError> {
    let g = GgufFile::open(path)?;
    Ok(Tokenizer::from_gguf(&g)?)
}

/// The tokenizer `meta` describes, read back exactly as [`load`] would read the file that
/// [`write`] makes of it.
pub fn from_metadata(meta: &[(String, Value)]) -> Result<Tokenizer, TrainError> {
    let g = GgufFile::from_bytes("<built vocabulary>", gguf_bytes(meta))?;
    Ok(Tokenizer::from_gguf(&g)?)
}

fn gguf_bytes(meta: &[(String, Value)]) -> Vec<u8> {
    let mut w = GgufWriter::new();
    if !meta.iter().any(|(k, _)| k == "general.architecture") {
        w.meta("general.architecture", Value::String("llama".into()));
    }
    for (k, v) in meta {
        w.meta(k, v.clone());
    }
    w.to_bytes()
}

// ---- char-level ---------------------------------------------------------------------------

/// GPT-2's byte → printable char map (`bytes_to_unicode`): printable Latin-1 bytes stand for
/// themselves, the other 68 take U+0100.. in byte order (so space is `Ġ`, newline `Ċ`).
fn byte_level_char(b: u8) -> char {
    let n = match b {
        b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF => return char::from(b),
        0..=b' ' => u32::from(b),
        0x7F..=0xA0 => 33 + u32::from(b - 0x7F),
        0xAD => 67,
    };
    // 256 + n is at most U+0143: always a valid char.
    char::from_u32(256 + n).unwrap_or(char::REPLACEMENT_CHARACTER)
}

fn byte_level(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| byte_level_char(b)).collect()
}

/// Tokens in id order, each registered once.
#[derive(Default)]
struct VocabBuilder {
    tokens: Vec<String>,
    ids: HashMap<String, usize>,
}

impl VocabBuilder {
    fn add(&mut self, token: String) {
        if !self.ids.contains_key(&token) {
            self.ids.insert(token.clone(), self.tokens.len());
            self.tokens.push(token);
        }
    }
}

fn char_vocab(corpus: &str) -> Result<Vec<(String, Value)>, TrainError> {
    let chars: BTreeSet<char> = corpus.chars().collect();
    if chars.is_empty() {
        return Err(TrainError::CorpusEmpty {
            what: "the text to build a char vocabulary from".into(),
        });
    }
    let mut vocab = VocabBuilder::default();
    for c in &chars {
        vocab.add(byte_level(c.encode_utf8(&mut [0; 4]).as_bytes()));
    }
    // A multi-byte char is reached from its bytes by merging left to right: prefix + next
    // byte. Each merge starts with a UTF-8 lead byte, so none can join two characters.
    let mut merges = Vec::new();
    let mut seen_merges = BTreeSet::new();
    for c in &chars {
        let mut buf = [0; 4];
        let bytes = c.encode_utf8(&mut buf).as_bytes();
        for b in bytes.iter().filter(|_| bytes.len() > 1) {
            vocab.add(byte_level(&[*b]));
        }
        for k in 1..bytes.len() {
            vocab.add(byte_level(&bytes[..k]));
            let merge = format!("{} {}", byte_level(&bytes[..k]), byte_level(&bytes[k..=k]));
            if seen_merges.insert(merge.clone()) {
                merges.push(merge);
            }
        }
    }
    Ok(vocab_entries(vocab.tokens, merges))
}

/// The metadata of a byte-level BPE whose normal tokens are `tokens` (ids 0..), with the
/// specials appended.
fn vocab_entries(mut tokens: Vec<String>, merges: Vec<String>) -> Vec<(String, Value)> {
    let n_normal = tokens.len();
    tokens.extend(SPECIALS.iter().map(|s| (*s).to_owned()));
    let types = (0..tokens.len())
        .map(|i| {
            Value::I32(if i < n_normal {
                TOKEN_TYPE_NORMAL
            } else {
                TOKEN_TYPE_CONTROL
            })
        })
        .collect();
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let eos = n_normal as u32;
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            Value::String(PRE_TOKENIZER.into()),
        ),
        ("tokenizer.ggml.tokens".into(), strings(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), strings(merges)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(eos)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)),
        // Training windows carry no BOS, so generation must not add one either.
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHATML_TEMPLATE.into()),
        ),
    ]
}

// ---- byte-level BPE -----------------------------------------------------------------------

type HfBpe =
    TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, PostProcessorWrapper, ByteLevelDecoder>;

/// GPT-2's pipeline as `ferrolm_tokenizer` builds it for `pre = "gpt2"`: no prefix space,
/// GPT-2's regex.
fn gpt2_pre_tokenizer() -> ByteLevel {
    ByteLevel::new(false, true, true)
}

fn train_bpe(corpus: &str, vocab_size: usize) -> Result<HfBpe, TrainError> {
    let minimum = 256 + SPECIALS.len() + 1;
    if vocab_size < minimum {
        return Err(TrainError::VocabTooSmall {
            requested: vocab_size,
            specials: SPECIALS.len(),
            minimum,
        });
    }
    if corpus.is_empty() {
        return Err(TrainError::CorpusEmpty {
            what: "the text to train a BPE vocabulary on".into(),
        });
    }
    let mut trainer = BpeTrainer::builder()
        .vocab_size(vocab_size - SPECIALS.len())
        .min_frequency(0)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut hf = HfBpe::new(BPE::default());
    hf.with_pre_tokenizer(Some(gpt2_pre_tokenizer()))
        .with_decoder(Some(ByteLevelDecoder::default()));
    // Fed in the chunks `data::encode_corpus` encodes (so words are counted as they will be
    // split, blank-line runs included), which the trainer counts in parallel.
    hf.train(&mut trainer, chunks(corpus).into_iter())
        .map_err(|e| TrainError::Tokenizer {
            message: format!("BPE training failed: {e}"),
        })?;
    Ok(hf)
}

/// A trained BPE's vocabulary (ids must be 0..n) and merges in rank order, as metadata.
fn bpe_vocab(model: &BPE) -> Result<Vec<(String, Value)>, TrainError> {
    let fail = |message: String| TrainError::Tokenizer { message };
    let vocab = model.get_vocab();
    let mut tokens = vec![None; vocab.len()];
    for (token, id) in vocab {
        let slot = tokens
            .get_mut(id as usize)
            .ok_or_else(|| fail(format!("trained BPE has id {id} past its size")))?;
        *slot = Some(token);
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.ok_or_else(|| fail(format!("trained BPE has no token with id {i}"))))
        .collect::<Result<_, _>>()?;
    // `BPE` keeps its merges private; its serialization lists them in rank order.
    let json = serde_json::to_value(model).map_err(|e| fail(e.to_string()))?;
    let merges = json
        .get("merges")
        .and_then(|m| m.as_array())
        .ok_or_else(|| fail("trained BPE serialized without merges".into()))?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(pair) => match pair.as_slice() {
                [a, b] => Some(format!("{} {}", a.as_str()?, b.as_str()?)),
                _ => None,
            },
            _ => None,
        })
        .collect::<Option<Vec<String>>>()
        .ok_or_else(|| fail("trained BPE merges have an unexpected shape".into()))?;
    Ok(vocab_entries(tokens, merges))
}

// ---- from a model -------------------------------------------------------------------------

fn model_vocab(path: &Path) -> Result<Vec<(String, Value)>, TrainError> {
    let g = GgufFile::open(path)?;
    if g.get("tokenizer.ggml.model").is_none() {
        return Err(TrainError::Tokenizer {
            message: format!(
                "{} has no vocabulary (no `tokenizer.ggml.model` key): pass a GGUF model or a tokenizer.gguf made by `ferrolm tokenizer train`",
                path.display()
            ),
        });
    }
    Ok(g.metadata
        .into_iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use crate::data::tests::shakespeare;

    #[test]
    fn choice_parses_the_accepted_forms() {
        assert_eq!(
            "char".parse::<TokenizerChoice>().unwrap(),
            TokenizerChoice::Char
        );
        assert_eq!(
            "bpe:8192".parse::<TokenizerChoice>().unwrap(),
            TokenizerChoice::Bpe { vocab_size: 8192 }
        );
        assert_eq!(
            "m/x.gguf".parse::<TokenizerChoice>().unwrap(),
            TokenizerChoice::Model("m/x.gguf".into())
        );
        for bad in ["bpe", "bpe:lots", "chars", "bpe:-3"] {
            let e = bad.parse::<TokenizerChoice>().unwrap_err().to_string();
            assert!(e.contains("`char`") && e.contains("bpe:VOCAB_SIZE"), "{e}");
        }
        let c = TokenizerChoice::Bpe { vocab_size: 512 };
        assert_eq!(c.to_string().parse::<TokenizerChoice>().unwrap(), c);
    }

    #[test]
    fn byte_level_table_is_gpt2s() {
        let ours: std::collections::HashSet<char> = (0..=255u8).map(byte_level_char).collect();
        let hf: std::collections::HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        assert_eq!(ours, hf);
        assert_eq!(byte_level(b" \n\tA"), "\u{120}\u{10A}\u{109}A");
        assert_eq!(byte_level("é".as_bytes()), "Ã©");
    }

    #[test]
    fn char_vocab_gives_one_id_per_char_for_multibyte_text() {
        let text = "héllo — wörld 日本語\nnaïve café 😀 ok";
        let meta = build(&TokenizerChoice::Char, text).unwrap();
        let tok = from_metadata(&meta).unwrap();
        let chars: Vec<char> = text.chars().collect::<BTreeSet<_>>().into_iter().collect();
        let ids = tok.encode(text, false).unwrap();
        let want: Vec<u32> = text
            .chars()
            .map(|c| chars.binary_search(&c).unwrap() as u32)
            .collect();
        assert_eq!(ids, want);
        assert_eq!(tok.decode(&ids), text);
        // Chars, then the byte and prefix tokens of multi-byte chars, then the specials.
        assert!(tok.vocab_size() > chars.len() + 3);
        assert_eq!(tok.eos_id, Some(tok.vocab_size() as u32 - 3));
        assert_eq!(tok.special_id(IM_END), Some(tok.vocab_size() as u32 - 1));
    }

    #[test]
    fn char_vocab_on_tinyshakespeare_matches_nanogpt_stoi() {
        let text = shakespeare();
        let meta = build(&TokenizerChoice::Char, &text).unwrap();
        let tok = from_metadata(&meta).unwrap();
        // nanoGPT: chars = sorted(list(set(data))); stoi = {ch: i for i, ch in enumerate(chars)}
        let chars: Vec<char> = text.chars().collect::<BTreeSet<_>>().into_iter().collect();
        assert_eq!(chars.len(), 65);
        assert_eq!(tok.vocab_size(), 65 + 3);
        assert_eq!(chars[0], '\n');
        assert_eq!(chars[1], ' ');
        let ids = tok.encode(&text, false).unwrap();
        assert_eq!(ids.len(), text.chars().count());
        for (c, id) in text.chars().zip(&ids) {
            assert_eq!(chars[*id as usize], c);
        }
        assert_eq!(tok.decode(&ids), text);
    }

    #[test]
    fn chat_template_and_specials_work_through_the_file() {
        // Chars missing from a char vocabulary are dropped, so the corpus spells the template.
        let corpus = "<|im_start|>abcdefghijklmnopqrstuvwxyz\n";
        let meta = build(&TokenizerChoice::Char, corpus).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.gguf");
        write(&path, &meta).unwrap();
        let tok = load(&path).unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.architecture().unwrap(), "llama");
        assert!(g.tensors.is_empty());
        let tmpl = ferrolm_tokenizer::chat::ChatTemplate::from_gguf(&g, &tok).unwrap();
        let msgs = serde_json::json!([{"role": "b", "content": "a<|im_end|>"}]);
        let chat = tmpl.render(&tok, &msgs, true, None).unwrap();
        let ids = tok.encode_chat(&chat).unwrap();
        let (start, end) = (
            tok.special_id(IM_START).unwrap(),
            tok.special_id(IM_END).unwrap(),
        );
        // The template's markers are control ids; the message's `<|im_end|>` is not.
        assert_eq!(ids.iter().filter(|&&i| i == start).count(), 2);
        assert_eq!(ids.iter().filter(|&&i| i == end).count(), 1);
        assert_eq!(
            tok.decode(&ids),
            "<|im_start|>b\na<|im_end|><|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn bpe_rejects_a_vocabulary_without_room_for_merges() {
        let e = build(&TokenizerChoice::Bpe { vocab_size: 259 }, "hello").unwrap_err();
        assert!(
            matches!(e, TrainError::VocabTooSmall { minimum: 260, .. }),
            "{e}"
        );
        assert!(build(&TokenizerChoice::Bpe { vocab_size: 260 }, "hello hello").is_ok());
    }

    /// ferrolm's reader over the converted metadata must encode exactly as the trained HF
    /// tokenizer does.
    fn check_bpe_against_hf(corpus: &str, vocab_size: usize, sample: &str) -> Tokenizer {
        let hf = train_bpe(corpus, vocab_size).unwrap();
        let tok = from_metadata(&bpe_vocab(hf.get_model()).unwrap()).unwrap();
        let want = hf.encode(sample, false).unwrap().get_ids().to_vec();
        let got = tok.encode(sample, false).unwrap();
        assert_eq!(got, want);
        assert_eq!(tok.decode(&got), sample);
        assert_eq!(tok.vocab_size(), hf.get_vocab_size(false) + SPECIALS.len());
        tok
    }

    #[test]
    fn bpe_small_corpus_gives_fewer_tokens_than_asked() {
        let corpus = "the cat sat on the mat. the cat ate. 日本語 ok\n".repeat(20);
        let tok = check_bpe_against_hf(&corpus, 4096, &corpus);
        assert!(tok.vocab_size() < 4096);
        assert!(tok.vocab_size() > 256 + 3);
        // Text the corpus never had still encodes (all 256 bytes are in the vocabulary).
        let unseen = "Zebra ünïcödé ✓";
        assert_eq!(tok.decode(&tok.encode(unseen, false).unwrap()), unseen);
    }

    #[test]
    fn bpe_on_tinyshakespeare_matches_hf() {
        let text = shakespeare();
        let sample: String = text.chars().take(5000).collect();
        let tok = check_bpe_against_hf(&text, 1024, &sample);
        assert_eq!(tok.vocab_size(), 1024);
        let ids = tok.encode(&sample, false).unwrap();
        assert!(ids.len() < sample.len() / 2, "{} ids", ids.len());
    }

    #[test]
    fn model_vocab_copies_every_tokenizer_key() {
        let mut w = GgufWriter::new();
        let meta = build(&TokenizerChoice::Char, "xyz\n").unwrap();
        w.meta("general.architecture", Value::String("llama".into()))
            .meta("llama.block_count", Value::U32(1))
            .meta(
                "tokenizer.ggml.scores",
                Value::Array(vec![Value::F32(0.5); 7]),
            );
        for (k, v) in &meta {
            w.meta(k, v.clone());
        }
        w.tensor_f32("t", &[2], &[1.0, 2.0]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, w.to_bytes()).unwrap();
        let copied = build(&TokenizerChoice::Model(path.clone()), "").unwrap();
        let keys: BTreeSet<&str> = copied.iter().map(|(k, _)| k.as_str()).collect();
        let mut want: BTreeSet<&str> = meta.iter().map(|(k, _)| k.as_str()).collect();
        want.insert("tokenizer.ggml.scores");
        assert_eq!(keys, want);
        for (k, v) in &meta {
            assert_eq!(copied.iter().find(|(ck, _)| ck == k).unwrap().1, *v, "{k}");
        }
        // A GGUF without a vocabulary is refused with a hint.
        let mut w = GgufWriter::new();
        w.meta("general.architecture", Value::String("llama".into()));
        std::fs::write(&path, w.to_bytes()).unwrap();
        let e = build(&TokenizerChoice::Model(path), "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no vocabulary"), "{e}");
    }
}
