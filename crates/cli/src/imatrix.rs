//! Importance matrices in llama.cpp's format: `ferrolm imatrix` computes one, `ferrolm
//! quantize --imatrix` reads one (also those of `llama-imatrix`, GGUF or legacy .dat).
//!
//! The GGUF format: per weight matrix `<tensor>.in_sum2` (f32, one sum of squared input
//! activations per column) and `<tensor>.counts` (f32, tokens seen), with `imatrix.datasets`,
//! `imatrix.chunk_count` and `imatrix.chunk_size`. A quantizer weighs column j of a tensor by
//! in_sum2[j] / count.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferrolm_engine::Session;
use ferrolm_gguf::{writer::GgufWriter, GgmlType, GgufFile, TensorInfo, Value};
use ferrolm_models::Site;

use crate::{threads, ModelArgs};

#[derive(Args)]
pub struct ImatrixArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// UTF-8 text whose activations weigh the columns (calibration data).
    #[arg(long)]
    data: PathBuf,
    /// Output file (GGUF imatrix, as llama-imatrix writes).
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Tokens per chunk; each chunk runs from an empty cache, BOS first when the model uses one.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Use at most this many chunks (default: all whole chunks of the text).
    #[arg(long)]
    chunks: Option<usize>,
    #[arg(long, short = 't')]
    threads: Option<usize>,
}

/// The GGUF tensors of layer `l` that read `site`'s activations, as the file names them.
fn readers(g: &GgufFile, l: usize, site: Site) -> Vec<String> {
    let names: &[&str] = match site {
        Site::AttnIn => &["attn_q", "attn_k", "attn_v", "attn_qkv"],
        Site::AttnOut => &["attn_output"],
        Site::FfnIn => &["ffn_gate", "ffn_up"],
        Site::FfnDownIn => &["ffn_down"],
        Site::Qkv => &[],
    };
    names
        .iter()
        .map(|n| format!("blk.{l}.{n}.weight"))
        .filter(|n| g.has_tensor(n))
        .collect()
}

pub fn run(a: ImatrixArgs) -> Result<()> {
    if a.ctx < 2 {
        bail!("--ctx must be at least 2");
    }
    let text = std::fs::read_to_string(&a.data)
        .with_context(|| format!("reading --data {} (a UTF-8 text file)", a.data.display()))?;
    let m = crate::load(&a.model)?;
    if a.ctx > m.model.cfg().context_length {
        bail!(
            "--ctx {} exceeds the model's context length {}",
            a.ctx,
            m.model.cfg().context_length
        );
    }
    let ids = m.tok.encode(&text, false)?;
    let mut n_chunks = ids.len() / a.ctx;
    if let Some(c) = a.chunks {
        n_chunks = n_chunks.min(c);
    }
    if n_chunks == 0 {
        bail!(
            "{} has {} tokens, fewer than one chunk of --ctx {}: give more text or a smaller --ctx",
            a.data.display(),
            ids.len(),
            a.ctx
        );
    }
    let mut session = Session::new(&m.model, a.ctx, threads(a.threads)?)?;
    session.record_activations(true);
    let t0 = Instant::now();
    for c in 0..n_chunks {
        let mut chunk = ids[c * a.ctx..(c + 1) * a.ctx].to_vec();
        if let Some(bos) = m.tok.bos_id.filter(|_| m.tok.add_bos) {
            chunk[0] = bos;
        }
        session.reset();
        session.eval(&chunk, &[])?;
        eprint!("\rchunk {}/{n_chunks}", c + 1);
    }
    eprintln!();
    let stats = session
        .record_activations(false)
        .context("no activations were recorded")?;
    let mut w = GgufWriter::new();
    w.meta("general.type", Value::String("imatrix".into()));
    w.meta(
        "imatrix.datasets",
        Value::Array(vec![Value::String(a.data.display().to_string())]),
    );
    w.meta("imatrix.chunk_count", Value::U32(n_chunks as u32));
    w.meta("imatrix.chunk_size", Value::U32(a.ctx as u32));
    let mut entries = BTreeMap::new();
    for ((l, site), (sum, count)) in &stats.sites {
        for name in readers(&m.gguf, *l, *site) {
            entries.insert(name, (sum, *count));
        }
    }
    for (name, (sum, count)) in &entries {
        let sums: Vec<f32> = sum.iter().map(|&v| v as f32).collect();
        w.tensor_f32(&format!("{name}.in_sum2"), &[sums.len() as u64, 1], &sums);
        w.tensor_f32(&format!("{name}.counts"), &[1], &[*count as f32]);
    }
    let tmp = a.output.with_extension("imatrix.tmp");
    std::fs::write(&tmp, w.to_bytes()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.output).with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "{}: {} tensors, {} chunks of {} tokens, {:.1}s",
        a.output.display(),
        entries.len(),
        n_chunks,
        a.ctx,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// An importance matrix: per tensor, one weight per column (sum of squares / count).
pub struct Imatrix {
    pub entries: std::collections::HashMap<String, Vec<f32>>,
    pub datasets: Vec<String>,
    pub chunks: u32,
}

/// Read llama.cpp's imatrix: the GGUF format (`<tensor>.in_sum2` and `<tensor>.counts`, f32)
/// or the legacy binary one.
pub fn load(path: &Path) -> Result<Imatrix> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading --imatrix {}", path.display()))?;
    if bytes.starts_with(b"GGUF") {
        let g = GgufFile::from_bytes(path, bytes)?;
        let mut entries = std::collections::HashMap::new();
        for t in &g.tensors {
            let Some(name) = t.name.strip_suffix(".in_sum2") else {
                continue;
            };
            let counts = g
                .tensor(&format!("{name}.counts"))
                .with_context(|| format!("{}: {} has sums but no counts", path.display(), name))?;
            if t.ggml_type != GgmlType::F32 || counts.ggml_type != GgmlType::F32 {
                bail!("{}: {name}: sums and counts must be F32", path.display());
            }
            let f = |info: &TensorInfo| -> Result<Vec<f32>> {
                Ok(g.tensor_bytes(info)?
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            };
            let (sums, counts) = (f(t)?, f(counts)?);
            if counts.is_empty() || sums.len() % counts.len() != 0 {
                bail!(
                    "{}: {name}: {} sums for {} counts",
                    path.display(),
                    sums.len(),
                    counts.len()
                );
            }
            let per = sums.len() / counts.len();
            let w = sums
                .chunks_exact(per)
                .zip(&counts)
                .flat_map(|(s, &c)| {
                    let c = c.round();
                    s.iter().map(move |&v| if c > 0.0 { v / c } else { 1.0 })
                })
                .collect();
            entries.insert(name.to_owned(), w);
        }
        let datasets = g
            .get_str_array("imatrix.datasets")
            .map(|v| v.into_iter().map(str::to_owned).collect())
            .unwrap_or_default();
        let chunks = g.get_u64("imatrix.chunk_count").unwrap_or(0) as u32;
        return finish_imatrix(path, entries, datasets, chunks);
    }
    // Legacy: i32 count; per entry i32 name length, name, i32 calls, i32 values, f32 values;
    // then optionally i32 chunks, i32 length and the dataset's name.
    let mut at = 0usize;
    let bad = || {
        anyhow::anyhow!(
            "{}: not an imatrix file (neither GGUF nor llama.cpp's legacy format)",
            path.display()
        )
    };
    let i32_at = |at: &mut usize| -> Option<i32> {
        let v = bytes.get(*at..*at + 4)?;
        *at += 4;
        Some(i32::from_le_bytes([v[0], v[1], v[2], v[3]]))
    };
    let n = i32_at(&mut at).filter(|&n| n > 0).ok_or_else(bad)?;
    let mut entries = std::collections::HashMap::new();
    for _ in 0..n {
        let len = i32_at(&mut at).filter(|&l| l > 0).ok_or_else(bad)? as usize;
        let name = bytes.get(at..at + len).ok_or_else(bad)?;
        let name = String::from_utf8(name.to_vec()).map_err(|_| bad())?;
        at += len;
        let calls = i32_at(&mut at).ok_or_else(bad)?;
        let nval = i32_at(&mut at).filter(|&v| v > 0).ok_or_else(bad)? as usize;
        let raw = bytes.get(at..at + 4 * nval).ok_or_else(bad)?;
        at += 4 * nval;
        let w = raw
            .chunks_exact(4)
            .map(|c| {
                let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                if calls > 0 {
                    v / calls as f32
                } else {
                    v
                }
            })
            .collect();
        entries.insert(name, w);
    }
    let chunks = i32_at(&mut at).unwrap_or(0).max(0) as u32;
    let datasets = match i32_at(&mut at) {
        Some(len) if len > 0 => bytes
            .get(at..at + len as usize)
            .map(|d| vec![String::from_utf8_lossy(d).into_owned()])
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    finish_imatrix(path, entries, datasets, chunks)
}

fn finish_imatrix(
    path: &Path,
    entries: std::collections::HashMap<String, Vec<f32>>,
    datasets: Vec<String>,
    chunks: u32,
) -> Result<Imatrix> {
    if entries.is_empty() {
        bail!("{}: the importance matrix has no entries", path.display());
    }
    if let Some((name, _)) = entries
        .iter()
        .find(|(_, w)| w.iter().any(|v| !v.is_finite()))
    {
        bail!("{}: {name} holds a non-finite value", path.display());
    }
    Ok(Imatrix {
        entries,
        datasets,
        chunks,
    })
}
