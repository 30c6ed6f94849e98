//! Token shards and batches: a corpus becomes `train.bin` and `val.bin`, and training reads
//! them as seeded, resumable batches of windows.
//!
//! Shard file (little-endian), 32 bytes of header then the tokens:
//!
//! | bytes  | field      | value                                           |
//! |--------|------------|-------------------------------------------------|
//! | 0..8   | magic      | `FLMTOKS\0`                                     |
//! | 8..12  | version    | 1                                               |
//! | 12..16 | dtype      | 0 = u16 (vocab ≤ 65,536), 1 = u32               |
//! | 16..20 | vocab_size | the tokenizer's vocabulary size                 |
//! | 20..24 | reserved   | 0                                               |
//! | 24..32 | count      | number of tokens; the file is 32 + count × width |
//!
//! Contract:
//! * [`prepare`] splits the *text* as nanoGPT does (the first `floor(chars × (1 − val))`
//!   characters train, the rest validate), encodes each part without special tokens and writes
//!   both shards atomically (temp file, fsync, rename): a crash never leaves a half shard.
//! * [`Shard::open`] checks magic, version, dtype and that `count` matches the file size, then
//!   memory-maps it. It does not scan the tokens: the caller checks the header's vocabulary
//!   against its model ([`Shard::check_vocab`]).
//! * [`Batcher`] draws each row's window start from a counter-based hash of
//!   `(seed, cursor, row)`, so `{seed, cursor}` (saved in a checkpoint) is the whole state and
//!   resuming replays exactly the batches an uninterrupted run would have drawn.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferrolm_tokenizer::Tokenizer;
use memmap2::Mmap;
use rayon::prelude::*;

use crate::error::TrainError;

pub const SHARD_MAGIC: &[u8; 8] = b"FLMTOKS\0";
pub const SHARD_VERSION: u32 = 1;
pub const SHARD_HEADER_BYTES: u64 = 32;
pub const TRAIN_FILE: &str = "train.bin";
pub const VAL_FILE: &str = "val.bin";

/// Bytes of text per encoding job: large enough that per-call overhead vanishes, small enough
/// that two cores stay busy until the end.
const CHUNK_BYTES: usize = 1 << 16;

/// How tokens are stored in a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    /// The narrowest type that holds every id of a `vocab_size` vocabulary.
    pub fn for_vocab(vocab_size: u64) -> Self {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }

    fn id(self) -> u32 {
        match self {
            TokenDtype::U16 => 0,
            TokenDtype::U32 => 1,
        }
    }

    pub fn width(self) -> u64 {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }
}

// ---- files --------------------------------------------------------------------------------

/// Write `path` atomically: `fill` writes a temp file in the same directory, which is synced
/// and renamed over `path` (and the directory synced), so readers see the old file or the
/// whole new one. The temp file is removed if anything fails.
pub(crate) fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<(), TrainError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    result.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        TrainError::Io {
            path: path.to_owned(),
            source,
        }
    })
}

/// Read a UTF-8 text corpus.
pub fn read_corpus(path: &Path) -> Result<String, TrainError> {
    let bytes = std::fs::read(path).map_err(TrainError::io(path))?;
    if bytes.is_empty() {
        return Err(TrainError::CorpusEmpty {
            what: path.display().to_string(),
        });
    }
    String::from_utf8(bytes).map_err(|e| TrainError::CorpusNotUtf8 {
        path: path.to_owned(),
        offset: e.utf8_error().valid_up_to(),
    })
}

/// Write `tokens` as a shard of a `vocab_size` vocabulary.
pub fn write_shard(path: &Path, tokens: &[u32], vocab_size: u32) -> Result<(), TrainError> {
    if let Some(&bad) = tokens.iter().find(|&&t| t >= vocab_size) {
        return Err(TrainError::Tokenizer {
            message: format!(
                "token id {bad} is outside the vocabulary of {vocab_size}: the tokenizer file is inconsistent, rebuild it"
            ),
        });
    }
    let dtype = TokenDtype::for_vocab(vocab_size.into());
    write_atomic(path, |w| {
        w.write_all(SHARD_MAGIC)?;
        for field in [SHARD_VERSION, dtype.id(), vocab_size, 0] {
            w.write_all(&field.to_le_bytes())?;
        }
        w.write_all(&(tokens.len() as u64).to_le_bytes())?;
        for &t in tokens {
            match dtype {
                // Checked above: every id < vocab_size ≤ 65,536.
                TokenDtype::U16 => w.write_all(&(t as u16).to_le_bytes())?,
                TokenDtype::U32 => w.write_all(&t.to_le_bytes())?,
            }
        }
        Ok(())
    })
}

// ---- encoding -----------------------------------------------------------------------------

/// Byte offsets where `text` may be cut without changing its encoding: after a single `\n`
/// between two non-whitespace chars. Every pre-tokenizer ferrolm reads ends a piece there (a
/// piece starting with `\n` never takes the next non-space char; one ending in `\n` only
/// swallows more whitespace), whereas a cut inside a whitespace run changes how it is split.
fn safe_cuts(text: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut cuts = Vec::new();
    let mut from = CHUNK_BYTES;
    while from < bytes.len() {
        let found = bytes[from..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| from + i + 1);
        let Some(at) = found else { break };
        let before = text[..at - 1].chars().next_back();
        let after = text[at..].chars().next();
        match (before, after) {
            (Some(b), Some(a)) if !b.is_whitespace() && !a.is_whitespace() => {
                cuts.push(at);
                from = at + CHUNK_BYTES;
            }
            _ => from = at,
        }
    }
    cuts
}

/// `text` in pieces of about [`CHUNK_BYTES`], cut only where [`safe_cuts`] allows.
pub(crate) fn chunks(text: &str) -> Vec<&str> {
    let bounds: Vec<usize> = std::iter::once(0)
        .chain(safe_cuts(text))
        .chain(std::iter::once(text.len()))
        .collect();
    bounds.windows(2).map(|w| &text[w[0]..w[1]]).collect()
}

/// Encode `text` (no special tokens), in parallel chunks cut at line boundaries. The result
/// equals `tok.encode(text, false)`: chunking is used only if the tokenizer, probed on the
/// two lines around the first cut, encodes a line start as it does mid-text (SentencePiece
/// vocabularies that prepend a space to the text do not, and are encoded whole).
pub fn encode_corpus(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, TrainError> {
    let parts = chunks(text);
    if let [first, second, ..] = parts.as_slice() {
        // The last line of the first chunk and the first line of the second, apart and joined.
        let a = &first[first[..first.len() - 1].rfind('\n').map_or(0, |i| i + 1)..];
        let b = &second[..second.find('\n').map_or(second.len(), |i| i + 1)];
        let mut apart = tok.encode(a, false)?;
        apart.extend(tok.encode(b, false)?);
        if apart != tok.encode(&format!("{a}{b}"), false)? {
            return Ok(tok.encode(text, false)?);
        }
    }
    let ids = parts
        .par_iter()
        .map(|part| tok.encode(part, false))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ids.concat())
}

/// What [`prepare`] wrote.
#[derive(Debug, Clone)]
pub struct PrepareStats {
    pub train_path: PathBuf,
    pub val_path: PathBuf,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub vocab_size: u32,
    pub dtype: TokenDtype,
    pub elapsed: Duration,
}

/// Fail unless `val_fraction` is in `[0, 1)` (callers check before slow work).
pub fn check_val_fraction(val_fraction: f64) -> Result<(), TrainError> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(TrainError::BadValFraction {
            value: val_fraction,
        });
    }
    Ok(())
}

/// Split `corpus` into train and validation text (the last `val_fraction` of its chars
/// validate), encode both with `tok` and write `out_dir/train.bin` and `out_dir/val.bin`.
pub fn prepare(
    corpus: &str,
    tok: &Tokenizer,
    out_dir: &Path,
    val_fraction: f64,
) -> Result<PrepareStats, TrainError> {
    let started = Instant::now();
    check_val_fraction(val_fraction)?;
    if corpus.is_empty() {
        return Err(TrainError::CorpusEmpty {
            what: "the corpus to prepare".into(),
        });
    }
    let vocab_size = u32::try_from(tok.vocab_size()).map_err(|_| TrainError::Tokenizer {
        message: format!(
            "vocabulary of {} tokens does not fit a shard",
            tok.vocab_size()
        ),
    })?;
    // nanoGPT: n = len(data); train_data = data[:int(n*0.9)]
    let n_chars = corpus.chars().count();
    let n_train = (n_chars as f64 * (1.0 - val_fraction)).floor() as usize;
    let split = corpus
        .char_indices()
        .nth(n_train)
        .map_or(corpus.len(), |(i, _)| i);
    let (train_text, val_text) = corpus.split_at(split);
    let train = encode_corpus(tok, train_text)?;
    let val = encode_corpus(tok, val_text)?;

    std::fs::create_dir_all(out_dir).map_err(TrainError::io(out_dir))?;
    let train_path = out_dir.join(TRAIN_FILE);
    let val_path = out_dir.join(VAL_FILE);
    write_shard(&train_path, &train, vocab_size)?;
    write_shard(&val_path, &val, vocab_size)?;
    Ok(PrepareStats {
        train_path,
        val_path,
        train_tokens: train.len() as u64,
        val_tokens: val.len() as u64,
        vocab_size,
        dtype: TokenDtype::for_vocab(vocab_size.into()),
        elapsed: started.elapsed(),
    })
}

// ---- reading ------------------------------------------------------------------------------

/// A memory-mapped token shard.
#[derive(Debug)]
pub struct Shard {
    path: PathBuf,
    map: Mmap,
    dtype: TokenDtype,
    vocab_size: u32,
    len: u64,
}

impl Shard {
    /// Open and check a shard (header only; tokens are not scanned).
    pub fn open(path: &Path) -> Result<Self, TrainError> {
        let bad = |field: &'static str, reason: String| TrainError::BadShard {
            path: path.to_owned(),
            field,
            reason,
        };
        let file = File::open(path).map_err(TrainError::io(path))?;
        let file_len = file.metadata().map_err(TrainError::io(path))?.len();
        if file_len < SHARD_HEADER_BYTES {
            return Err(bad(
                "header",
                format!("the file is {file_len} bytes, shorter than the {SHARD_HEADER_BYTES}-byte header (truncated)"),
            ));
        }
        // SAFETY: the map is only read. Shards are written once, to a temp file renamed into
        // place, and never modified afterwards; a file truncated by someone else under a
        // running job would fault (SIGBUS) rather than be read as other data.
        let map = unsafe { Mmap::map(&file) }.map_err(TrainError::io(path))?;
        let u32_at =
            |at: usize| u32::from_le_bytes([map[at], map[at + 1], map[at + 2], map[at + 3]]);
        if &map[..8] != SHARD_MAGIC {
            return Err(bad(
                "magic",
                format!(
                    "found {:?}, expected \"FLMTOKS\\0\": not a ferrolm token shard",
                    String::from_utf8_lossy(&map[..8])
                ),
            ));
        }
        let version = u32_at(8);
        if version != SHARD_VERSION {
            return Err(bad(
                "version",
                format!("version {version} is not supported (this ferrolm reads version {SHARD_VERSION})"),
            ));
        }
        let vocab_size = u32_at(16);
        let dtype = match u32_at(12) {
            0 if u64::from(vocab_size) <= 1 << 16 => TokenDtype::U16,
            0 => {
                return Err(bad(
                    "dtype",
                    format!("u16 tokens cannot hold a vocabulary of {vocab_size}"),
                ))
            }
            1 => TokenDtype::U32,
            d => {
                return Err(bad(
                    "dtype",
                    format!("unknown dtype {d} (0 = u16, 1 = u32)"),
                ))
            }
        };
        if vocab_size == 0 {
            return Err(bad("vocab_size", "is 0".into()));
        }
        let mut count = [0u8; 8];
        count.copy_from_slice(&map[24..32]);
        let len = u64::from_le_bytes(count);
        let expected = len
            .checked_mul(dtype.width())
            .and_then(|b| b.checked_add(SHARD_HEADER_BYTES));
        if expected != Some(file_len) {
            return Err(bad(
                "count",
                format!(
                    "the header says {len} tokens of {} bytes but the file holds {} bytes after the header (truncated or overwritten)",
                    dtype.width(),
                    file_len - SHARD_HEADER_BYTES
                ),
            ));
        }
        Ok(Shard {
            path: path.to_owned(),
            map,
            dtype,
            vocab_size,
            len,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tokens.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The vocabulary size of the tokenizer that wrote the shard.
    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    pub fn dtype(&self) -> TokenDtype {
        self.dtype
    }

    /// Fail unless every id of this shard is a row of a `model_vocab`-row embedding.
    pub fn check_vocab(&self, model_vocab: usize) -> Result<(), TrainError> {
        if self.vocab_size as usize > model_vocab {
            return Err(TrainError::VocabMismatch {
                path: self.path.clone(),
                shard: self.vocab_size.into(),
                model: model_vocab as u64,
            });
        }
        Ok(())
    }

    /// Token `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`, like slice indexing.
    pub fn get(&self, i: u64) -> u32 {
        assert!(i < self.len, "token {i} of a {}-token shard", self.len);
        let at = (SHARD_HEADER_BYTES + i * self.dtype.width()) as usize;
        match self.dtype {
            TokenDtype::U16 => u16::from_le_bytes([self.map[at], self.map[at + 1]]).into(),
            TokenDtype::U32 => u32::from_le_bytes([
                self.map[at],
                self.map[at + 1],
                self.map[at + 2],
                self.map[at + 3],
            ]),
        }
    }

    /// Append tokens `start .. start + len` to `out`.
    pub fn window(&self, start: u64, len: u64, out: &mut Vec<u32>) -> Result<(), TrainError> {
        let end = start.checked_add(len).filter(|&e| e <= self.len);
        let Some(end) = end else {
            return Err(TrainError::WindowOutOfRange {
                path: self.path.clone(),
                start,
                len,
                shard_len: self.len,
            });
        };
        let w = self.dtype.width();
        let bytes = &self.map
            [(SHARD_HEADER_BYTES + start * w) as usize..(SHARD_HEADER_BYTES + end * w) as usize];
        match self.dtype {
            TokenDtype::U16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))),
            ),
            TokenDtype::U32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
        }
        Ok(())
    }

    /// Fail unless the shard holds at least one window of `window` tokens.
    fn require(&self, window: u64) -> Result<(), TrainError> {
        if self.len < window {
            return Err(TrainError::CorpusTooShort {
                what: self.path.display().to_string(),
                tokens: self.len,
                needed: window,
            });
        }
        Ok(())
    }
}

// ---- batches ------------------------------------------------------------------------------

/// SplitMix64's finalizer: a bijective mix of 64 bits (Steele, Lea & Flood 2014).
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in `0..n` from 64 random bits (Lemire's multiply-shift; the bias, below n / 2^64,
/// is far under anything a training run could notice).
fn below(bits: u64, n: u64) -> u64 {
    ((u128::from(bits) * u128::from(n)) >> 64) as u64
}

/// Seeded random windows over a shard. `{seed, cursor}` is the whole state: batch `cursor`
/// is a pure function of it, so a checkpoint that saves this struct resumes exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Batcher {
    pub seed: u64,
    /// Batches drawn so far.
    pub cursor: u64,
}

impl Batcher {
    pub fn new(seed: u64) -> Self {
        Batcher { seed, cursor: 0 }
    }

    /// The same state read as an epoch order over examples (fine-tuning's conversations,
    /// pairs, …); [`Batcher::advance_to`] keeps where it got to.
    pub fn examples(&self) -> crate::sft::SftBatcher {
        crate::sft::SftBatcher {
            seed: self.seed,
            cursor: self.cursor,
        }
    }

    pub fn advance_to(&mut self, examples: crate::sft::SftBatcher) {
        self.cursor = examples.cursor;
    }

    /// Fill `out` with `batch` rows of `ctx + 1` tokens (row-major; inputs are a row's first
    /// `ctx` tokens, targets its last `ctx`), each starting at a uniform offset in
    /// `0..=len - (ctx + 1)`, then advance the cursor.
    pub fn next(
        &mut self,
        shard: &Shard,
        batch: usize,
        ctx: usize,
        out: &mut Vec<u32>,
    ) -> Result<(), TrainError> {
        let window = ctx as u64 + 1;
        shard.require(window)?;
        let starts = shard.len() - window + 1;
        out.clear();
        out.reserve(batch * (ctx + 1));
        let batch_key = splitmix64(splitmix64(self.seed) ^ self.cursor);
        for row in 0..batch as u64 {
            let start = below(splitmix64(batch_key ^ row), starts);
            shard.window(start, window, out)?;
        }
        self.cursor += 1;
        Ok(())
    }
}

/// `n` fixed batches for validation: the same ones for the same `seed`, every time.
pub fn eval_batches(
    shard: &Shard,
    batch: usize,
    ctx: usize,
    n: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>, TrainError> {
    let mut b = Batcher::new(seed);
    (0..n)
        .map(|_| {
            let mut out = Vec::new();
            b.next(shard, batch, ctx, &mut out)?;
            Ok(out)
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::tokenize::{build, from_metadata, TokenizerChoice};

    /// The repository's corpus (`data/tinyshakespeare.txt`); a missing file fails the test.
    pub(crate) fn shakespeare() -> String {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/tinyshakespeare.txt");
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e} (it is part of the repository)", p.display()))
    }

    fn shard_with(dir: &Path, tokens: &[u32], vocab: u32) -> PathBuf {
        let p = dir.join("s.bin");
        write_shard(&p, tokens, vocab).unwrap();
        p
    }

    #[test]
    fn shard_header_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for (vocab, dtype) in [(65_536, TokenDtype::U16), (65_537, TokenDtype::U32)] {
            let tokens: Vec<u32> = (0..1000).map(|i| (i * 7919) % vocab).collect();
            let p = shard_with(dir.path(), &tokens, vocab);
            let s = Shard::open(&p).unwrap();
            assert_eq!((s.len(), s.vocab_size(), s.dtype()), (1000, vocab, dtype));
            let len = std::fs::metadata(&p).unwrap().len();
            assert_eq!(len, SHARD_HEADER_BYTES + 1000 * dtype.width());
            assert_eq!((0..1000).map(|i| s.get(i)).collect::<Vec<_>>(), tokens);
            let mut w = vec![42];
            s.window(10, 5, &mut w).unwrap();
            assert_eq!(w[1..], tokens[10..15]);
            assert!(s.window(996, 5, &mut w).is_err());
            assert!(s.check_vocab(vocab as usize).is_ok());
            assert!(matches!(
                s.check_vocab(vocab as usize - 1),
                Err(TrainError::VocabMismatch { .. })
            ));
        }
        assert!(write_shard(&dir.path().join("x.bin"), &[3], 3).is_err());
        // No temp files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["s.bin"]);
    }

    #[test]
    fn every_bad_header_names_the_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = shard_with(dir.path(), &[1, 2, 3, 4], 10);
        let good = std::fs::read(&p).unwrap();
        let patch = |at: usize, bytes: &[u8]| {
            let mut b = good.clone();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            b
        };
        let cases: Vec<(Vec<u8>, &str, &str)> = vec![
            (patch(0, b"GGUF"), "magic", "not a ferrolm token shard"),
            (patch(8, &2u32.to_le_bytes()), "version", "version 2"),
            (patch(12, &7u32.to_le_bytes()), "dtype", "unknown dtype 7"),
            (patch(16, &70_000u32.to_le_bytes()), "dtype", "cannot hold"),
            (patch(24, &5u64.to_le_bytes()), "count", "says 5 tokens"),
            (patch(24, &u64::MAX.to_le_bytes()), "count", "truncated"),
            (good[..good.len() - 1].to_vec(), "count", "truncated"),
            (
                good[..20].to_vec(),
                "header",
                "shorter than the 32-byte header",
            ),
            (Vec::new(), "header", "0 bytes"),
        ];
        for (bytes, field, needle) in cases {
            std::fs::write(&p, &bytes).unwrap();
            let e = Shard::open(&p).unwrap_err();
            assert!(
                matches!(&e, TrainError::BadShard { field: f, .. } if *f == field),
                "{field}: {e}"
            );
            let msg = e.to_string();
            assert!(msg.contains(&p.display().to_string()), "{msg}");
            assert!(
                msg.contains(needle) && msg.contains("ferrolm prepare"),
                "{msg}"
            );
        }
        let e = Shard::open(&dir.path().join("missing.bin")).unwrap_err();
        assert!(matches!(e, TrainError::Io { .. }), "{e}");
    }

    #[test]
    fn batcher_resumes_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let tokens: Vec<u32> = (0..5000).map(|i| i % 1000).collect();
        let s = Shard::open(&shard_with(dir.path(), &tokens, 1000)).unwrap();
        let draw = |b: &mut Batcher, n: usize| {
            (0..n)
                .map(|_| {
                    let mut out = Vec::new();
                    b.next(&s, 4, 16, &mut out).unwrap();
                    out
                })
                .collect::<Vec<_>>()
        };
        let mut straight = Batcher::new(1337);
        let first = draw(&mut straight, 5);
        let saved = serde_json::to_string(&straight).unwrap();
        let rest = draw(&mut straight, 5);
        let mut resumed: Batcher = serde_json::from_str(&saved).unwrap();
        assert_eq!(resumed.cursor, 5);
        assert_eq!(draw(&mut resumed, 5), rest);
        assert_ne!(first, rest);
        for batch in first.iter().chain(&rest) {
            assert_eq!(batch.len(), 4 * 17);
            // Each row is a contiguous window of the shard.
            for row in batch.chunks(17) {
                let start = tokens.windows(17).position(|w| w == row);
                assert!(start.is_some(), "{row:?}");
            }
        }
        assert_ne!(draw(&mut Batcher::new(1338), 1)[0], first[0]);
    }

    #[test]
    fn batcher_covers_both_ends_of_the_shard() {
        let dir = tempfile::tempdir().unwrap();
        let tokens: Vec<u32> = (0..10).collect();
        let s = Shard::open(&shard_with(dir.path(), &tokens, 10)).unwrap();
        let mut seen = [false; 3];
        let mut b = Batcher::new(0);
        let mut out = Vec::new();
        for _ in 0..50 {
            b.next(&s, 2, 7, &mut out).unwrap();
            for row in out.chunks(8) {
                seen[row[0] as usize] = true;
            }
        }
        assert_eq!(seen, [true; 3]);
    }

    #[test]
    fn short_shard_is_an_error_with_counts() {
        let dir = tempfile::tempdir().unwrap();
        let s = Shard::open(&shard_with(dir.path(), &[1; 64], 10)).unwrap();
        let mut out = Vec::new();
        let e = Batcher::new(0).next(&s, 1, 64, &mut out).unwrap_err();
        assert!(
            matches!(
                e,
                TrainError::CorpusTooShort {
                    tokens: 64,
                    needed: 65,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("s.bin"), "{e}");
        assert!(Batcher::new(0).next(&s, 1, 63, &mut out).is_ok());
        assert!(eval_batches(&s, 2, 64, 3, 0).is_err());
    }

    #[test]
    fn eval_batches_are_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let tokens: Vec<u32> = (0..300).collect();
        let s = Shard::open(&shard_with(dir.path(), &tokens, 300)).unwrap();
        let a = eval_batches(&s, 3, 8, 4, 7).unwrap();
        assert_eq!(a, eval_batches(&s, 3, 8, 4, 7).unwrap());
        assert_eq!(a.len(), 4);
        assert_ne!(a[0], a[1]);
    }

    #[test]
    fn read_corpus_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.txt");
        assert!(matches!(read_corpus(&p), Err(TrainError::Io { .. })));
        std::fs::write(&p, b"").unwrap();
        let e = read_corpus(&p).unwrap_err();
        assert!(matches!(e, TrainError::CorpusEmpty { .. }) && e.to_string().contains("c.txt"));
        std::fs::write(&p, b"caf\xc3\xa9 \xff!").unwrap();
        let e = read_corpus(&p).unwrap_err();
        assert!(
            matches!(e, TrainError::CorpusNotUtf8 { offset: 6, .. }),
            "{e}"
        );
        std::fs::write(&p, "café").unwrap();
        assert_eq!(read_corpus(&p).unwrap(), "café");
    }

    #[test]
    fn cuts_keep_whitespace_runs_whole() {
        let text = format!("{}\n\n\nb c\nd", "a".repeat(CHUNK_BYTES));
        let cuts = safe_cuts(&text);
        assert_eq!(cuts, vec![text.len() - 1]);
        assert!(safe_cuts("short\ntext").is_empty());
    }

    #[test]
    fn chunked_encoding_equals_whole_text_on_multibyte_text() {
        // Mostly blank-line runs, where a cut would change the split; a safe cut now and then.
        let text: String = (0..5 * CHUNK_BYTES / 40)
            .map(|i| match i % 100 {
                0 => "tail\nhead ",
                _ => "naïve — ünïcödé 日本語,  spaces\n\n\n",
            })
            .collect();
        assert!(safe_cuts(&text).len() >= 3);
        for choice in [
            TokenizerChoice::Char,
            TokenizerChoice::Bpe { vocab_size: 400 },
        ] {
            let tok = from_metadata(&build(&choice, &text).unwrap()).unwrap();
            let whole = tok.encode(&text, false).unwrap();
            // Every cut is safe on its own, not only the one the probe looks at.
            let pieces: Vec<u32> = chunks(&text)
                .iter()
                .flat_map(|c| tok.encode(c, false).unwrap())
                .collect();
            assert_eq!(pieces, whole, "{choice}");
            assert_eq!(encode_corpus(&tok, &text).unwrap(), whole, "{choice}");
        }
    }

    /// A SentencePiece vocabulary prepends `▁` to the text, so chunks would each gain one:
    /// the probe must see that and encode whole.
    #[test]
    fn chunked_encoding_falls_back_for_a_space_prefixing_vocabulary() {
        use ferrolm_gguf::{writer::GgufWriter, GgufFile, Value};
        let strs =
            |v: &[&str]| Value::Array(v.iter().map(|s| Value::String((*s).into())).collect());
        let mut w = GgufWriter::new();
        w.meta("tokenizer.ggml.model", Value::String("llama".into()))
            .meta(
                "tokenizer.ggml.tokens",
                strs(&["<unk>", "\u{2581}", "a", "b", "<0x0A>"]),
            )
            .meta(
                "tokenizer.ggml.scores",
                Value::Array(vec![Value::F32(0.0); 5]),
            )
            .meta(
                "tokenizer.ggml.token_type",
                Value::Array([2, 1, 1, 1, 6].map(Value::I32).to_vec()),
            )
            .meta("tokenizer.ggml.unknown_token_id", Value::U32(0));
        let g = GgufFile::from_bytes("spm", w.to_bytes()).unwrap();
        let tok = Tokenizer::from_gguf(&g).unwrap();
        let text = "ab\n".repeat(CHUNK_BYTES);
        assert!(!safe_cuts(&text).is_empty());
        let whole = tok.encode(&text, false).unwrap();
        assert_eq!(whole.iter().filter(|&&t| t == 1).count(), 1);
        assert_eq!(encode_corpus(&tok, &text).unwrap(), whole);
    }

    #[test]
    fn prepare_tinyshakespeare_char_matches_nanogpt() {
        let text = shakespeare();
        let tok = from_metadata(&build(&TokenizerChoice::Char, &text).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let stats = prepare(&text, &tok, dir.path(), 0.1).unwrap();
        // nanoGPT data/shakespeare_char/prepare.py: "train has 1,003,854 tokens",
        // "val has 111,540 tokens".
        assert_eq!((stats.train_tokens, stats.val_tokens), (1_003_854, 111_540));
        assert_eq!((stats.vocab_size, stats.dtype), (68, TokenDtype::U16));
        let train = Shard::open(&stats.train_path).unwrap();
        let val = Shard::open(&stats.val_path).unwrap();
        assert_eq!(
            (train.len(), val.len(), train.vocab_size()),
            (1_003_854, 111_540, 68)
        );
        let mut all = Vec::new();
        train.window(0, train.len(), &mut all).unwrap();
        val.window(0, val.len(), &mut all).unwrap();
        assert_eq!(all, tok.encode(&text, false).unwrap());
        assert_eq!(tok.decode(&all[..13]), "First Citizen");
        assert!(matches!(
            prepare(&text, &tok, dir.path(), 1.0),
            Err(TrainError::BadValFraction { .. })
        ));
    }

    #[test]
    fn chunked_bpe_encoding_equals_whole_text_on_tinyshakespeare() {
        let text = shakespeare();
        let tok = from_metadata(&build(&TokenizerChoice::Bpe { vocab_size: 2048 }, &text).unwrap())
            .unwrap();
        let t = Instant::now();
        let chunked = encode_corpus(&tok, &text).unwrap();
        let fast = t.elapsed();
        let t = Instant::now();
        let whole = tok.encode(&text, false).unwrap();
        eprintln!(
            "{} tokens: chunked {fast:?}, whole {:?}",
            chunked.len(),
            t.elapsed()
        );
        assert_eq!(chunked, whole);
        let pieces: Vec<u32> = chunks(&text)
            .iter()
            .flat_map(|c| tok.encode(c, false).unwrap())
            .collect();
        assert_eq!(pieces, whole);
    }
}
