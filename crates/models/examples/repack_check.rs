//! Holds our lossless repack of every quantized matrix in a GGUF file to candle's dequantizer:
//! `cargo run --release -p ferrolm-models --example repack_check -- FILE.gguf...`. Prints, per
//! type, how many tensors were checked and the largest |Δ| relative to the tensor's largest
//! value; exits non-zero on any difference above 2⁻²² or any tensor our loader refuses.
//! (`tests/kquant.rs` does the same on random matrices; this is for real files.)
use std::collections::BTreeMap;

use ferrolm_gguf::{GgmlType, GgufFile};
use ferrolm_models::linear::{dequantize, Linear};

fn main() {
    let mut bad = 0;
    for path in std::env::args().skip(1) {
        let g = match GgufFile::open(&path) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(2);
            }
        };
        let mut by_type: BTreeMap<String, (usize, f32)> = BTreeMap::new();
        for info in &g.tensors {
            if info.dims.len() != 2
                || matches!(
                    info.ggml_type,
                    GgmlType::F32 | GgmlType::F16 | GgmlType::BF16
                )
            {
                continue;
            }
            let (cols, rows) = (info.dims[0] as usize, info.dims[1] as usize);
            let want = match dequantize(&g, info) {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("candle: {e}");
                    bad += 1;
                    continue;
                }
            };
            let lin = match Linear::load(&g, &info.name, rows, cols) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("ours: {e}");
                    bad += 1;
                    continue;
                }
            };
            let amax = want
                .iter()
                .fold(0f32, |a, v| a.max(v.abs()))
                .max(f32::MIN_POSITIVE);
            let mut row = vec![0f32; cols];
            let mut worst = 0f32;
            for r in 0..rows {
                if lin.row(r, &mut row).is_err() {
                    bad += 1;
                    break;
                }
                for (a, b) in row.iter().zip(&want[r * cols..(r + 1) * cols]) {
                    worst = worst.max((a - b).abs() / amax);
                }
            }
            if worst > 2f32.powi(-22) {
                eprintln!("{}: {:?} max rel |Δ| {worst:e}", info.name, info.ggml_type);
                bad += 1;
            }
            let e = by_type
                .entry(format!("{:?}", info.ggml_type))
                .or_insert((0, 0.0));
            e.0 += 1;
            e.1 = e.1.max(worst);
        }
        println!("{path}");
        for (ty, (n, worst)) in by_type {
            println!("  {ty:6} {n:4} tensors, max rel |Δ| {worst:.1e}");
        }
    }
    if bad > 0 {
        eprintln!("{bad} tensor(s) differ or were refused");
        std::process::exit(1);
    }
}
