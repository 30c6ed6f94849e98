//! A SentencePiece `tokenizer.model` (a serialized `sentencepiece.ModelProto`), read by hand:
//! the pieces (string, score, type), the trainer's model type and byte fallback, and the
//! normalizer's whitespace options. Only the fields the importer needs are decoded; every other
//! field is skipped by its wire type, so models from any SentencePiece version read.
//!
//! Field numbers, from `sentencepiece_model.proto`:
//! - `ModelProto`: `pieces = 1` (repeated `SentencePiece`), `trainer_spec = 2`,
//!   `normalizer_spec = 3`.
//! - `SentencePiece`: `piece = 1` (string), `score = 2` (float), `type = 3` (enum: NORMAL 1,
//!   UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6: GGUF's token types).
//! - `TrainerSpec`: `model_type = 3` (UNIGRAM 1, BPE 2, WORD 3, CHAR 4), `byte_fallback = 35`.
//! - `NormalizerSpec`: `name = 1`, `add_dummy_prefix = 3` (default true),
//!   `remove_extra_whitespaces = 4` (default true).
//!
//! [`vocab_from_model`] and [`vocab_from_json`] turn a Hugging Face directory's SentencePiece
//! vocabulary into the GGUF arrays llama.cpp's converter writes for `tokenizer.ggml.model =
//! "llama"`: tokens, scores, token types (byte tokens `<0xNN>` are BYTE), `add_space_prefix`
//! and the unknown token; added tokens of `tokenizer.json` / `tokenizer_config.json` are
//! CONTROL when special, else USER_DEFINED; ids up to the embedding's row count are padded as
//! `[PADn]` (UNUSED, score -1000). ferrolm and llama.cpp then tokenize as SentencePiece's BPE
//! does: a pair merges when its concatenation is a piece, the highest score first. Refused,
//! since both would tokenize differently from the model's own tokenizer: Unigram models,
//! normalizers other than `identity` and `remove_extra_whitespaces`.

use std::collections::HashMap;
use std::path::Path;

use ferrolm_gguf::Value;
use serde_json::Value as Json;

use crate::hf::{err, read_json, token_str, Vocab};
use crate::TrainError;

/// Token types (GGUF's and SentencePiece's numbering).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// Whether `s` is a byte-fallback piece, `<0xNN>`.
fn is_byte_piece(s: &str) -> bool {
    s.len() == 6
        && s.starts_with("<0x")
        && s.ends_with('>')
        && u8::from_str_radix(&s[3..5], 16).is_ok()
}

/// The GGUF vocabulary from `pieces` (by id), the added tokens of `tokenizer.json` and
/// `tokenizer_config.json`, padded to `n_vocab`.
fn build(
    dir: &Path,
    pieces: Vec<Piece>,
    add_space_prefix: bool,
    tj: Option<&Json>,
    n_vocab: usize,
) -> Result<Vocab, TrainError> {
    let mut slots: Vec<Option<Piece>> = vec![None; n_vocab];
    let set = |slots: &mut Vec<Option<Piece>>,
               id: usize,
               p: Piece,
               what: &str|
     -> Result<(), TrainError> {
        let slot = slots.get_mut(id).ok_or_else(|| {
            err(
                dir,
                format!("{what} `{}` has id {id}, but the model's embedding has {n_vocab} rows (config.json vocab_size): the tokenizer is not this model's", p.piece),
            )
        })?;
        *slot = Some(p);
        Ok(())
    };
    for (id, p) in pieces.into_iter().enumerate() {
        set(&mut slots, id, p, "piece")?;
    }
    // Added tokens: `tokenizer.json`'s list, then `tokenizer_config.json`'s
    // `added_tokens_decoder` (id → {content, special}).
    let mut added: Vec<(u64, String, bool)> = Vec::new();
    for at in tj
        .and_then(|j| j.get("added_tokens"))
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        if let (Some(id), Some(s)) = (
            at.get("id").and_then(Json::as_u64),
            at.get("content").and_then(Json::as_str),
        ) {
            let special = at.get("special").and_then(Json::as_bool).unwrap_or(false);
            added.push((id, s.to_owned(), special));
        }
    }
    let tcp = dir.join("tokenizer_config.json");
    if tcp.is_file() {
        let tc = read_json(&tcp)?;
        for (id, at) in tc
            .get("added_tokens_decoder")
            .and_then(Json::as_object)
            .into_iter()
            .flatten()
        {
            if let (Ok(id), Some(s)) = (id.parse::<u64>(), at.get("content").and_then(Json::as_str))
            {
                let special = at.get("special").and_then(Json::as_bool).unwrap_or(false);
                added.push((id, s.to_owned(), special));
            }
        }
    }
    for (id, s, special) in added {
        // A piece of the model keeps its own type (`<s>` is CONTROL, `<unk>` UNKNOWN).
        let slot = slots.get_mut(id as usize).and_then(Option::as_mut);
        if let Some(p) = slot.filter(|p| p.piece == s) {
            // `tokenizer.json` lists `<s>` both in the vocabulary and as added.
            if p.kind == NORMAL {
                p.kind = if special { CONTROL } else { USER_DEFINED };
            }
        } else {
            let kind = if special { CONTROL } else { USER_DEFINED };
            set(
                &mut slots,
                id as usize,
                Piece {
                    piece: s,
                    score: 0.0,
                    kind,
                },
                "added token",
            )?;
        }
    }
    let pieces: Vec<Piece> = slots
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            p.unwrap_or_else(|| Piece {
                piece: format!("[PAD{i}]"),
                score: -1000.0,
                kind: UNUSED,
            })
        })
        .collect();
    let ids: HashMap<String, u64> = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.piece.clone(), i as u64))
        .collect();
    let unk = pieces.iter().position(|p| p.kind == UNKNOWN);
    let mut entries = vec![
        (
            "tokenizer.ggml.tokens".to_owned(),
            Value::Array(
                pieces
                    .iter()
                    .map(|p| Value::String(p.piece.clone()))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.scores".to_owned(),
            Value::Array(pieces.iter().map(|p| Value::F32(p.score)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_owned(),
            Value::Array(pieces.iter().map(|p| Value::I32(p.kind)).collect()),
        ),
        (
            "tokenizer.ggml.add_space_prefix".to_owned(),
            Value::Bool(add_space_prefix),
        ),
    ];
    if let Some(u) = unk {
        entries.push((
            "tokenizer.ggml.unknown_token_id".to_owned(),
            Value::U32(u as u32),
        ));
    }
    Ok(Vocab {
        model: "llama",
        entries,
        ids,
        post_processor: tj.map_or(Json::Null, |j| j["post_processor"].clone()),
    })
}

/// A SentencePiece `tokenizer.model` (BPE) as a GGUF vocabulary; `tj` is the directory's
/// `tokenizer.json`, if any, for its added tokens and post-processor.
pub(crate) fn vocab_from_model(
    mp: &Path,
    tj: Option<&Json>,
    n_vocab: usize,
) -> Result<Vocab, TrainError> {
    let bytes = std::fs::read(mp).map_err(TrainError::io(mp))?;
    let m = parse(&bytes)
        .map_err(|e| err(mp, format!("is not a readable SentencePiece model: {e}")))?;
    if m.model_type != 2 {
        let name = match m.model_type {
            1 => "Unigram",
            3 => "word",
            4 => "char",
            _ => "unknown",
        };
        return Err(err(
            mp,
            format!("is a SentencePiece {name} model: ferrolm (like llama.cpp's `llama` vocabulary) tokenizes SentencePiece BPE models only, so its ids would differ from the model's tokenizer; convert this model with llama.cpp's convert_hf_to_gguf.py if you accept that"),
        ));
    }
    if m.normalizer != "identity" && !m.normalizer.is_empty() {
        return Err(err(
            mp,
            format!("normalizes text with `{}`, which ferrolm does not reproduce (it imports SentencePiece models with the `identity` normalizer, as Llama 2, Mistral and Gemma have)", m.normalizer),
        ));
    }
    if m.remove_extra_whitespaces {
        return Err(err(
            mp,
            "collapses runs of spaces (remove_extra_whitespaces), which ferrolm does not reproduce (Llama 2, Mistral and Gemma keep them)",
        ));
    }
    let dir = mp.parent().unwrap_or(Path::new("."));
    build(dir, m.pieces, m.add_dummy_prefix, tj, n_vocab)
}

/// A SentencePiece-style `tokenizer.json` (BPE with byte fallback, `▁` for spaces) as a GGUF
/// vocabulary. It has no scores: a piece made by merge `r` scores `-r`, so merges apply in
/// the file's order; other pieces (characters, bytes, specials) score 0 and never merge.
pub(crate) fn vocab_from_json(tp: &Path, tj: &Json, n_vocab: usize) -> Result<Vocab, TrainError> {
    let model = &tj["model"];
    let mtype = model.get("type").and_then(Json::as_str).unwrap_or("BPE");
    if mtype != "BPE" || model.get("byte_fallback").and_then(Json::as_bool) != Some(true) {
        return Err(err(
            tp,
            format!("holds a `{mtype}` model with the pre-tokenizer `{}` and no byte fallback: ferrolm imports byte-level BPE tokenizers (Llama 3, Qwen, SmolLM) and SentencePiece BPE ones (Llama 2, Mistral, Gemma: a tokenizer.model, or BPE with byte fallback); convert this model with llama.cpp's convert_hf_to_gguf.py and load the GGUF", tj["pre_tokenizer"].get("type").and_then(Json::as_str).unwrap_or("none")),
        ));
    }
    let add_space_prefix = space_prefix(tj).map_err(|e| err(tp, e))?;
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| err(tp, "model.vocab is not an object of token → id"))?;
    let mut rank: HashMap<String, usize> = HashMap::new();
    for (r, m) in model
        .get("merges")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let pair = match m {
            Json::String(s) => s.split_once(' ').map(|(a, b)| format!("{a}{b}")),
            Json::Array(p) => Some(p.iter().filter_map(Json::as_str).collect::<String>()),
            _ => None,
        };
        if let Some(t) = pair {
            rank.entry(t).or_insert(r);
        }
    }
    let n = vocab
        .values()
        .filter_map(Json::as_u64)
        .max()
        .map_or(0, |m| m as usize + 1);
    let mut pieces: Vec<Piece> = (0..n)
        .map(|i| Piece {
            piece: format!("[PAD{i}]"),
            score: -1000.0,
            kind: UNUSED,
        })
        .collect();
    let tcp = tp.with_file_name("tokenizer_config.json");
    let tc = if tcp.is_file() {
        read_json(&tcp)?
    } else {
        Json::Null
    };
    let unk = model
        .get("unk_token")
        .and_then(Json::as_str)
        .or_else(|| tc.get("unk_token").and_then(token_str));
    for (s, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| err(tp, format!("token `{s}` has no integer id")))?
            as usize;
        let kind = if Some(s.as_str()) == unk {
            UNKNOWN
        } else if is_byte_piece(s) {
            BYTE
        } else {
            NORMAL
        };
        let score = rank.get(s).map_or(0.0, |&r| -(r as f32));
        pieces[id] = Piece {
            piece: s.clone(),
            score,
            kind,
        };
    }
    let dir = tp.parent().unwrap_or(Path::new("."));
    build(dir, pieces, add_space_prefix, Some(tj), n_vocab)
}

/// Whether the tokenizer puts a `▁` before the text: a `Metaspace` pre-tokenizer (unless its
/// `prepend_scheme` is `never`) or a `Prepend("▁")` normalizer; spaces must become `▁` by one
/// of them.
fn space_prefix(tj: &Json) -> Result<bool, String> {
    let list = |j: &Json, key: &str| -> Vec<Json> {
        match j.get("type").and_then(Json::as_str) {
            Some("Sequence") => j
                .get(key)
                .and_then(Json::as_array)
                .cloned()
                .unwrap_or_default(),
            Some(_) => vec![j.clone()],
            None => Vec::new(),
        }
    };
    let pre = list(&tj["pre_tokenizer"], "pretokenizers");
    let norm = list(&tj["normalizer"], "normalizers");
    let ty = |j: &Json| {
        j.get("type")
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_owned()
    };
    if let Some(m) = pre.iter().find(|p| ty(p) == "Metaspace") {
        if m.get("split").and_then(Json::as_bool) == Some(true) {
            return Err("its Metaspace pre-tokenizer splits on spaces (split: true), which SentencePiece models do not".into());
        }
        return Ok(
            m.get("prepend_scheme").and_then(Json::as_str) != Some("never")
                && m.get("add_prefix_space").and_then(Json::as_bool) != Some(false),
        );
    }
    if let Some(p) = pre.first() {
        return Err(format!("pre-tokenizer `{}` is not SentencePiece's", ty(p)));
    }
    let replaces = norm
        .iter()
        .any(|n| ty(n) == "Replace" && n.get("content").and_then(Json::as_str) == Some("\u{2581}"));
    if !replaces {
        return Err(
            "neither a Metaspace pre-tokenizer nor a normalizer replacing spaces by `▁`".into(),
        );
    }
    Ok(norm
        .iter()
        .any(|n| ty(n) == "Prepend" && n.get("prepend").and_then(Json::as_str) == Some("\u{2581}")))
}

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    /// GGUF's token type (the same numbering as SentencePiece's).
    pub kind: i32,
}

/// What the importer reads of a `tokenizer.model`.
#[derive(Debug, Clone, PartialEq)]
pub struct SpModel {
    pub pieces: Vec<Piece>,
    /// 1 unigram, 2 BPE, 3 word, 4 char.
    pub model_type: i32,
    pub byte_fallback: bool,
    /// A `▁` is put before the text.
    pub add_dummy_prefix: bool,
    /// Runs of spaces are collapsed and leading/trailing ones removed before encoding.
    pub remove_extra_whitespaces: bool,
    /// The normalizer's name (`identity`, `nmt_nfkc`, …).
    pub normalizer: String,
}

/// A protobuf message's fields: `(number, value)`, where a value is a varint, a fixed 32/64-bit
/// word or a length-delimited byte string.
enum Field<'a> {
    Varint(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
    Other,
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.b.split_first().ok_or("truncated varint")?;
            self.b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.b.len() {
            return Err(format!(
                "field of {n} bytes runs past the end ({} left)",
                self.b.len()
            ));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }

    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, String> {
        if self.b.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Other
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|e| e.to_string())?;
                Field::Bytes(self.take(n)?)
            }
            5 => {
                let w = self.take(4)?;
                Field::Fixed32(u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            }
            wt => return Err(format!("unsupported wire type {wt} (field {})", key >> 3)),
        };
        Ok(Some((key >> 3, field)))
    }
}

fn fields(b: &[u8], mut f: impl FnMut(u64, Field<'_>) -> Result<(), String>) -> Result<(), String> {
    let mut r = Reader { b };
    while let Some((n, v)) = r.next()? {
        f(n, v)?;
    }
    Ok(())
}

/// Parse a serialized `ModelProto`; the error says which part is malformed.
pub fn parse(b: &[u8]) -> Result<SpModel, String> {
    let mut m = SpModel {
        pieces: Vec::new(),
        model_type: 1,
        byte_fallback: false,
        add_dummy_prefix: true,
        remove_extra_whitespaces: true,
        normalizer: String::new(),
    };
    fields(b, |n, v| {
        match (n, v) {
            (1, Field::Bytes(p)) => {
                let mut piece = Piece {
                    piece: String::new(),
                    score: 0.0,
                    kind: 1,
                };
                fields(p, |n, v| {
                    match (n, v) {
                        (1, Field::Bytes(s)) => {
                            piece.piece = String::from_utf8(s.to_vec())
                                .map_err(|_| "a piece is not UTF-8".to_string())?
                        }
                        (2, Field::Fixed32(w)) => piece.score = f32::from_bits(w),
                        (3, Field::Varint(t)) => piece.kind = t as i32,
                        _ => {}
                    }
                    Ok(())
                })
                .map_err(|e| format!("piece #{}: {e}", m.pieces.len()))?;
                m.pieces.push(piece);
            }
            (2, Field::Bytes(t)) => fields(t, |n, v| {
                match (n, v) {
                    (3, Field::Varint(x)) => m.model_type = x as i32,
                    (35, Field::Varint(x)) => m.byte_fallback = x != 0,
                    _ => {}
                }
                Ok(())
            })
            .map_err(|e| format!("trainer_spec: {e}"))?,
            (3, Field::Bytes(t)) => fields(t, |n, v| {
                match (n, v) {
                    (1, Field::Bytes(s)) => m.normalizer = String::from_utf8_lossy(s).into_owned(),
                    (3, Field::Varint(x)) => m.add_dummy_prefix = x != 0,
                    (4, Field::Varint(x)) => m.remove_extra_whitespaces = x != 0,
                    _ => {}
                }
                Ok(())
            })
            .map_err(|e| format!("normalizer_spec: {e}"))?,
            _ => {}
        }
        Ok(())
    })?;
    if m.pieces.is_empty() {
        return Err("no pieces (is this a SentencePiece model?)".into());
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn bytes_field(n: u64, b: &[u8], out: &mut Vec<u8>) {
        varint(n << 3 | 2, out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }

    #[test]
    fn reads_pieces_and_specs_and_skips_unknown_fields() {
        let mut piece = Vec::new();
        bytes_field(1, "▁the".as_bytes(), &mut piece);
        varint(2 << 3 | 5, &mut piece);
        piece.extend_from_slice(&(-3.5f32).to_le_bytes());
        varint(3 << 3, &mut piece);
        varint(6, &mut piece);
        let mut trainer = Vec::new();
        varint(3 << 3, &mut trainer);
        varint(2, &mut trainer);
        varint(35 << 3, &mut trainer);
        varint(1, &mut trainer);
        varint(40 << 3 | 1, &mut trainer); // an unknown fixed64
        trainer.extend_from_slice(&[0; 8]);
        let mut norm = Vec::new();
        bytes_field(1, b"identity", &mut norm);
        varint(4 << 3, &mut norm);
        varint(0, &mut norm);
        let mut m = Vec::new();
        bytes_field(1, &piece, &mut m);
        bytes_field(2, &trainer, &mut m);
        bytes_field(3, &norm, &mut m);
        bytes_field(1, &[], &mut m); // an empty piece: defaults
        let sp = parse(&m).expect("parses");
        assert_eq!(
            sp.pieces,
            vec![
                Piece {
                    piece: "▁the".into(),
                    score: -3.5,
                    kind: 6
                },
                Piece {
                    piece: String::new(),
                    score: 0.0,
                    kind: 1
                }
            ]
        );
        assert_eq!((sp.model_type, sp.byte_fallback), (2, true));
        assert!(sp.add_dummy_prefix && !sp.remove_extra_whitespaces);
        assert_eq!(sp.normalizer, "identity");
        let e = parse(&m[..m.len() - 5]).expect_err("truncated");
        assert!(e.contains("past the end"), "{e}");
    }
}
