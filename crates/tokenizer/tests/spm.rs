//! SentencePiece (`tokenizer.ggml.model = "llama"`) vocabularies, on a tiny one built here.
#![allow(clippy::unwrap_used)]

use ferrolm_gguf::{writer::GgufWriter, GgufFile, Value};
use ferrolm_tokenizer::Tokenizer;

fn tiny_spm() -> (tempfile::NamedTempFile, Vec<String>) {
    // <unk> <s> </s>, 256 byte tokens, then pieces with scores (higher merges first).
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types: Vec<Value> = vec![Value::I32(2), Value::I32(3), Value::I32(3)];
    let mut scores: Vec<Value> = vec![Value::F32(0.0); 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(Value::I32(6));
        scores.push(Value::F32(0.0));
    }
    for (p, s) in [
        ("▁", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("w", -2.0),
        ("r", -2.0),
        ("d", -2.0),
        ("ll", -3.0),
        ("▁h", -4.0),
        ("▁he", -5.0),
        ("▁hell", -6.0),
        ("▁hello", -7.0),
        ("▁w", -8.0),
        ("or", -9.0),
    ] {
        tokens.push(p.into());
        types.push(Value::I32(1));
        scores.push(Value::F32(s));
    }
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("tokenizer.ggml.model", Value::String("llama".into()))
        .meta(
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
        )
        .meta("tokenizer.ggml.scores", Value::Array(scores))
        .meta("tokenizer.ggml.token_type", Value::Array(types))
        .meta("tokenizer.ggml.bos_token_id", Value::U32(1))
        .meta("tokenizer.ggml.eos_token_id", Value::U32(2))
        .meta("tokenizer.ggml.unknown_token_id", Value::U32(0));
    let mut f = tempfile::NamedTempFile::new().unwrap();
    use std::io::Write;
    f.write_all(&w.to_bytes()).unwrap();
    (f, tokens)
}

#[test]
fn sentencepiece_merges_byte_fallback_and_round_trip() {
    let (f, tokens) = tiny_spm();
    let tok = Tokenizer::from_gguf(&GgufFile::open(f.path()).unwrap()).unwrap();
    assert!(tok.add_bos);
    assert_eq!((tok.bos_id, tok.eos_id), (Some(1), Some(2)));
    let pieces = |text: &str| -> Vec<String> {
        tok.encode(text, false)
            .unwrap()
            .iter()
            .map(|&i| tokens[i as usize].clone())
            .collect()
    };
    // "▁hello" is one piece; "world" splits as far as the vocabulary allows.
    assert_eq!(pieces("hello world"), vec!["▁hello", "▁w", "or", "l", "d"]);
    // Characters outside the vocabulary fall back to their UTF-8 bytes.
    assert_eq!(pieces("hé"), vec!["▁h", "<0xC3>", "<0xA9>"]);
    // Decoding gives back the text with the prefix space the normalizer added.
    let ids = tok.encode("hello héllo", false).unwrap();
    assert_eq!(tok.decode(&ids), " hello héllo");
    // Control tokens are plain text unless asked for.
    assert!(!tok.encode("<s>hello", false).unwrap().contains(&1));
    assert_eq!(tok.encode("<s>hello", true).unwrap()[0], 1);
}

#[test]
fn unsupported_tokenizer_model_is_refused_naming_the_supported_ones() {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("tokenizer.ggml.model", Value::String("bert".into()))
        .meta(
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::String("a".into())]),
        );
    let mut f = tempfile::NamedTempFile::new().unwrap();
    use std::io::Write;
    f.write_all(&w.to_bytes()).unwrap();
    let err = Tokenizer::from_gguf(&GgufFile::open(f.path()).unwrap()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("`bert`"), "{msg}");
    assert!(msg.contains("`gpt2`") && msg.contains("`llama`"), "{msg}");
}

/// Gemma's vocabulary holds runs of spaces and newlines as user-defined tokens (type 4);
/// llama.cpp matches them in the text before SentencePiece runs, so `"  x"` is the two-space
/// token then `x`, not `▁`, `▁x`.
#[test]
fn regression_user_defined_whitespace_tokens_are_matched_before_sentencepiece() {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types: Vec<Value> = vec![Value::I32(2), Value::I32(3), Value::I32(3)];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(Value::I32(6));
    }
    for (p, ty) in [
        ("▁", 1),
        ("x", 1),
        ("▁x", 1),
        ("  ", 4),
        ("   ", 4),
        ("\n\n", 4),
    ] {
        tokens.push(p.into());
        types.push(Value::I32(ty));
    }
    let scores = vec![Value::F32(0.0); tokens.len()];
    let id = |s: &str| tokens.iter().position(|t| t == s).unwrap() as u32;
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("tokenizer.ggml.model", Value::String("llama".into()))
        .meta(
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
        )
        .meta("tokenizer.ggml.scores", Value::Array(scores))
        .meta("tokenizer.ggml.token_type", Value::Array(types))
        .meta("tokenizer.ggml.add_space_prefix", Value::Bool(false));
    let mut f = tempfile::NamedTempFile::new().unwrap();
    use std::io::Write;
    f.write_all(&w.to_bytes()).unwrap();
    let tok = Tokenizer::from_gguf(&GgufFile::open(f.path()).unwrap()).unwrap();
    assert_eq!(tok.encode("  x", false).unwrap(), vec![id("  "), id("x")]);
    assert_eq!(
        tok.encode("x     x\n\n", false).unwrap(),
        vec![id("x"), id("   "), id("  "), id("x"), id("\n\n")]
    );
    assert_eq!(tok.encode(" x", false).unwrap(), vec![id("▁x")]);
    assert_eq!(
        tok.decode(&tok.encode("x     x\n\n", false).unwrap()),
        "x     x\n\n"
    );
}
