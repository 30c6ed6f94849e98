//! Writes a Llama-architecture GGUF with random f16 weights and a given shape, for speed
//! measurements only (`scripts/bench_matrix.py`): decode and prefill speed do not depend on
//! the weights' values, and the text such a model writes is noise. The tokenizer, chat
//! template and rope settings are copied from a real GGUF (`--like`, e.g. SmolLM2-135M, so
//! both ferrolm and llama.cpp load the file as they load that model); the embedding is tied
//! (no `output.weight`), as in SmolLM2. Quantize the result with `ferrolm quantize`.
//!
//! `cargo run --release -p ferrolm-gguf --example random_model -- --like SRC.gguf
//!  --hidden 960 --layers 32 --heads 15 --kv-heads 5 --ffn 2560 [--seed N] OUT.gguf`
use ferrolm_gguf::writer::GgufWriter;
use ferrolm_gguf::{GgmlType, GgufFile, Value};
use std::process::ExitCode;

struct Shape {
    hidden: u64,
    layers: u64,
    heads: u64,
    kv_heads: u64,
    ffn: u64,
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: random_model --like SRC.gguf --hidden H --layers L --heads N --kv-heads K \
         --ffn F [--seed S] OUT.gguf"
    );
    ExitCode::from(2)
}

/// xorshift64*: fast enough for billions of values, and reproducible from `--seed`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Roughly normal with standard deviation `std` (sum of four uniforms), as f16 bytes.
    fn f16_tensor(&mut self, n: u64, std: f32) -> Vec<u8> {
        let mut out = Vec::with_capacity(n as usize * 2);
        for _ in 0..n {
            let r = self.next();
            let s: f32 = (0..4)
                .map(|i| ((r >> (16 * i)) & 0xFFFF) as f32)
                .sum::<f32>();
            // four uniforms on [0, 65535]: mean 131070, std 65535 / sqrt(3)
            let z = (s - 131_070.0) / (65_535.0 / 3f32.sqrt());
            out.extend_from_slice(&half::f16::from_f32(z * std).to_le_bytes());
        }
        out
    }
}

fn main() -> ExitCode {
    let mut like = None;
    let mut out = None;
    let mut seed = 0x5EED_u64;
    let (mut hidden, mut layers, mut heads, mut kv_heads, mut ffn) = (None, None, None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args.next();
        let num = value.as_deref().and_then(|v| v.parse::<u64>().ok());
        let slot = match a.as_str() {
            "--like" => {
                like = value.clone();
                like.is_some()
            }
            "--hidden" => num.map(|v| hidden = Some(v)).is_some(),
            "--layers" => num.map(|v| layers = Some(v)).is_some(),
            "--heads" => num.map(|v| heads = Some(v)).is_some(),
            "--kv-heads" => num.map(|v| kv_heads = Some(v)).is_some(),
            "--ffn" => num.map(|v| ffn = Some(v)).is_some(),
            "--seed" => num.map(|v| seed = v.max(1)).is_some(),
            _ if !a.starts_with('-') && out.is_none() && value.is_none() => {
                out = Some(a.clone());
                true
            }
            _ => false,
        };
        if !slot {
            eprintln!("bad or incomplete argument: {a}");
            return usage();
        }
    }
    let (Some(like), Some(out), Some(hidden), Some(layers), Some(heads), Some(kv_heads), Some(ffn)) =
        (like, out, hidden, layers, heads, kv_heads, ffn)
    else {
        return usage();
    };
    let shape = Shape {
        hidden,
        layers,
        heads,
        kv_heads,
        ffn,
    };
    if !shape.hidden.is_multiple_of(shape.heads) || !shape.heads.is_multiple_of(shape.kv_heads) {
        eprintln!("--hidden must be a multiple of --heads, and --heads a multiple of --kv-heads");
        return ExitCode::from(2);
    }
    match write(&like, &out, &shape, seed) {
        Ok(bytes) => {
            eprintln!(
                "wrote {out}: {:.1} MiB of random f16 weights",
                bytes as f64 / 1048576.0
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn write(like: &str, out: &str, s: &Shape, seed: u64) -> Result<u64, String> {
    let src = GgufFile::open(like).map_err(|e| format!("--like {like}: {e}"))?;
    if src.architecture().map_err(|e| e.to_string())? != "llama" {
        return Err(format!(
            "--like {like}: expected a llama-architecture GGUF (SmolLM2)"
        ));
    }
    let vocab = src
        .get_str_array("tokenizer.ggml.tokens")
        .map_err(|e| format!("--like {like}: {e}"))?
        .len() as u64;
    let head_dim = s.hidden / s.heads;
    let kv_dim = head_dim * s.kv_heads;
    let name = format!(
        "random weights, {} layers, width {}, {}/{} heads, ffn {}",
        s.layers, s.hidden, s.heads, s.kv_heads, s.ffn
    );
    let mut w = GgufWriter::new();
    for (k, v) in &src.metadata {
        // The source's own file type, quantization receipt and shape do not describe this file.
        if k.starts_with("ferrolm.")
            || k == "general.file_type"
            || k == "general.quantization_version"
        {
            continue;
        }
        let v = match k.as_str() {
            "general.name" => Value::String(name.clone()),
            "llama.embedding_length" => Value::U32(s.hidden as u32),
            "llama.block_count" => Value::U32(s.layers as u32),
            "llama.feed_forward_length" => Value::U32(s.ffn as u32),
            "llama.attention.head_count" => Value::U32(s.heads as u32),
            "llama.attention.head_count_kv" => Value::U32(s.kv_heads as u32),
            "llama.rope.dimension_count" => Value::U32(head_dim as u32),
            _ => v.clone(),
        };
        w.meta(k, v);
    }
    w.meta("general.file_type", Value::U32(1)); // MOSTLY_F16
    let mut rng = Rng(seed);
    let std = 0.02;
    let ones = |n: u64| vec![1.0f32; n as usize];
    w.tensor(
        "token_embd.weight",
        &[s.hidden, vocab],
        GgmlType::F16,
        rng.f16_tensor(s.hidden * vocab, std),
    );
    for l in 0..s.layers {
        let b = |t: &str| format!("blk.{l}.{t}.weight");
        w.tensor_f32(&b("attn_norm"), &[s.hidden], &ones(s.hidden));
        for (t, rows) in [("attn_q", s.hidden), ("attn_k", kv_dim), ("attn_v", kv_dim)] {
            let data = rng.f16_tensor(s.hidden * rows, std);
            w.tensor(&b(t), &[s.hidden, rows], GgmlType::F16, data);
        }
        let data = rng.f16_tensor(s.hidden * s.hidden, std);
        w.tensor(
            &b("attn_output"),
            &[s.hidden, s.hidden],
            GgmlType::F16,
            data,
        );
        w.tensor_f32(&b("ffn_norm"), &[s.hidden], &ones(s.hidden));
        for t in ["ffn_gate", "ffn_up"] {
            let data = rng.f16_tensor(s.hidden * s.ffn, std);
            w.tensor(&b(t), &[s.hidden, s.ffn], GgmlType::F16, data);
        }
        let data = rng.f16_tensor(s.ffn * s.hidden, std);
        w.tensor(&b("ffn_down"), &[s.ffn, s.hidden], GgmlType::F16, data);
    }
    w.tensor_f32("output_norm.weight", &[s.hidden], &ones(s.hidden));
    let bytes = w.into_bytes();
    let tmp = format!("{out}.tmp");
    std::fs::write(&tmp, &bytes).map_err(|e| format!("{tmp}: {e}"))?;
    std::fs::rename(&tmp, out).map_err(|e| format!("{out}: {e}"))?;
    Ok(bytes.len() as u64)
}
