//! The reader against well-formed and forged files: every error names the field, none panics.
#![allow(clippy::unwrap_used)]

use ferrolm_gguf::{writer::GgufWriter, GgmlType, GgufError, GgufFile, Value};
use std::io::Write;

fn sample() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("llama.block_count", Value::U32(2))
        .meta(
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
        )
        .tensor_f32("a", &[4, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
        .tensor("q", &[32], GgmlType::Q8_0, vec![7u8; 34]);
    w.to_bytes()
}

fn open_bytes(bytes: &[u8]) -> Result<GgufFile, GgufError> {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    GgufFile::open(f.path())
}

#[test]
fn round_trip() {
    let g = open_bytes(&sample()).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(g.get_u64("llama.block_count").unwrap(), 2);
    assert_eq!(
        g.get_str_array("tokenizer.ggml.tokens").unwrap(),
        vec!["a", "b"]
    );
    let a = g.tensor("a").unwrap();
    assert_eq!(a.dims, vec![4, 2]);
    let bytes = g.tensor_bytes(a).unwrap();
    assert_eq!(f32::from_le_bytes(bytes[28..32].try_into().unwrap()), 8.0);
    let q = g.tensor("q").unwrap();
    assert_eq!(q.ggml_type, GgmlType::Q8_0);
    assert_eq!(g.tensor_bytes(q).unwrap(), vec![7u8; 34]);
    assert!(matches!(
        g.get_str("llama.block_count"),
        Err(GgufError::WrongType { .. })
    ));
    assert!(matches!(
        g.get_str("nope"),
        Err(GgufError::MissingKey { .. })
    ));
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let full = sample();
    // The last tensor (34 bytes) is followed by 30 bytes of padding the reader does not need.
    let data_end = full.len() - 30;
    for n in 0..data_end {
        if let Ok(g) = open_bytes(&full[..n]) {
            panic!("prefix of {n}/{} bytes parsed: {:?}", full.len(), g.tensors);
        }
    }
    assert!(open_bytes(&full[..data_end]).is_ok());
}

#[test]
fn wrong_magic_names_the_file() {
    let mut b = sample();
    b[0] = b'X';
    let e = open_bytes(&b).unwrap_err();
    assert!(matches!(e, GgufError::BadMagic { .. }), "{e}");
    assert!(e.to_string().contains("not a GGUF file"), "{e}");
}

#[test]
fn unknown_version() {
    let mut b = sample();
    b[4..8].copy_from_slice(&99u32.to_le_bytes());
    let e = open_bytes(&b).unwrap_err();
    assert!(
        matches!(e, GgufError::UnsupportedVersion { version: 99, .. }),
        "{e}"
    );
}

#[test]
fn forged_counts_do_not_allocate() {
    // tensor count of 2^60
    let mut b = sample();
    b[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let e = open_bytes(&b).unwrap_err().to_string();
    assert!(e.contains("tensor_count"), "{e}");
    // metadata count of 2^62
    let mut b = sample();
    b[16..24].copy_from_slice(&(1u64 << 62).to_le_bytes());
    let e = open_bytes(&b).unwrap_err().to_string();
    assert!(e.contains("metadata_kv_count"), "{e}");
    // first key's string length forged to 2^40
    let mut b = sample();
    b[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = open_bytes(&b).unwrap_err().to_string();
    assert!(e.contains("metadata key #0") && e.contains("limit"), "{e}");
}

#[test]
fn forged_array_length() {
    let mut w = GgufWriter::new();
    w.meta(
        "tokenizer.ggml.tokens",
        Value::Array(vec![Value::U32(1), Value::U32(2)]),
    );
    let mut b = w.to_bytes();
    // key: 8 + 21 bytes, type 4 bytes, elem type 4 bytes, then the count
    let at = 24 + 8 + "tokenizer.ggml.tokens".len() + 4 + 4;
    assert_eq!(u64::from_le_bytes(b[at..at + 8].try_into().unwrap()), 2);
    b[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = open_bytes(&b).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.ggml.tokens") && e.contains("cannot fit"),
        "{e}"
    );
}

#[test]
fn tensor_data_past_the_end() {
    let mut w = GgufWriter::new();
    w.tensor_f32("big", &[1024], &[0.0; 1024]);
    let b = w.to_bytes();
    let e = open_bytes(&b[..b.len() - 100]).unwrap_err().to_string();
    assert!(
        e.contains("tensor `big`") && e.contains("past the end"),
        "{e}"
    );
}

#[test]
fn absurd_dims_and_types() {
    for (dims, ty, needle) in [
        (vec![1u64 << 40, 1 << 40], GgmlType::F32, "overflow"),
        (vec![33], GgmlType::Q4_0, "whose blocks hold 32"),
    ] {
        let mut w = GgufWriter::new();
        w.tensor("t", &dims, ty, vec![0u8; 64]);
        let e = open_bytes(&w.to_bytes()).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
    // unknown type id 99: patch the type field of the only tensor info
    let mut w = GgufWriter::new();
    w.tensor_f32("t", &[4], &[0.0; 4]);
    let mut b = w.to_bytes();
    let at = 24 + 8 + 1 + 4 + 8;
    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let e = open_bytes(&b).unwrap_err().to_string();
    assert!(e.contains("type") && e.contains("99"), "{e}");
    // five dims
    let mut b = w.to_bytes();
    let at = 24 + 8 + 1;
    b[at..at + 4].copy_from_slice(&5u32.to_le_bytes());
    let e = open_bytes(&b).unwrap_err().to_string();
    assert!(e.contains("n_dims"), "{e}");
}

#[test]
fn bad_alignment_and_missing_file() {
    let mut w = GgufWriter::new();
    w.meta("general.alignment", Value::U32(3));
    let e = open_bytes(&w.to_bytes()).unwrap_err().to_string();
    assert!(e.contains("general.alignment"), "{e}");
    let e = GgufFile::open("/nonexistent/model.gguf")
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/model.gguf"), "{e}");
}

#[test]
fn from_bytes_parses_like_open_and_reads_tensors() {
    let g = GgufFile::from_bytes("in-memory.gguf", sample()).unwrap();
    assert_eq!(g.path, std::path::Path::new("in-memory.gguf"));
    assert_eq!(g.version, 3);
    assert_eq!(g.file_len, sample().len() as u64);
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(
        g.get_str_array("tokenizer.ggml.tokens").unwrap(),
        vec!["a", "b"]
    );
    let a = g.tensor("a").unwrap();
    let floats: Vec<f32> = g
        .tensor_bytes(a)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(floats, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    assert_eq!(
        g.tensor_bytes(g.tensor("q").unwrap()).unwrap(),
        vec![7u8; 34]
    );
    // A tensor info that points past this buffer is an error, not a panic.
    let mut forged = a.clone();
    forged.offset = u64::MAX - 4;
    assert!(matches!(g.tensor_bytes(&forged), Err(GgufError::Io { .. })));
}

#[test]
fn from_bytes_truncation_matches_the_file_error() {
    let full = sample();
    let data_end = full.len() - 30;
    for n in [0, 3, 7, 20, 40, full.len() / 2, data_end - 1] {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&full[..n]).unwrap();
        f.flush().unwrap();
        let from_file = GgufFile::open(f.path()).unwrap_err().to_string();
        let from_mem = GgufFile::from_bytes(f.path(), full[..n].to_vec())
            .unwrap_err()
            .to_string();
        assert_eq!(from_mem, from_file, "prefix of {n} bytes");
    }
    let e = GgufFile::from_bytes("cut.gguf", full[..6].to_vec()).unwrap_err();
    assert!(
        matches!(&e, GgufError::Truncated { field, offset: 4, .. } if field == "version"),
        "{e}"
    );
    assert!(e.to_string().starts_with("cut.gguf: truncated"), "{e}");
}
