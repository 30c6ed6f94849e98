//! Times the quantized matmul on a SmolLM2-shaped FFN matrix (1536 × 576, random Q4_1
//! weights, one thread), row-major and in 16-row groups (AVX-512 VNNI), and prints how far the
//! two results are apart: `cargo run --release -p ferrolm-models --example matmul -- [TOKENS]
//! [REPS]`. Valgrind cannot run the AVX-512 kernels and this VM exposes no cycle counters, so
//! A/B kernel changes here by interleaved timings (repeat, take medians).
use ferrolm_models::quant::{matmul, Isa, QActs, QMatrix};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let reps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let (rows, cols) = (1536, 576);
    let mut seed = 0x9E37_79B9_u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    // Q4_1 blocks: f16 d, f16 m, 16 bytes of nibbles.
    let mut raw = Vec::new();
    for _ in 0..rows * cols / 32 {
        raw.extend_from_slice(
            &half::f16::from_f32(0.01 + (next() % 100) as f32 * 1e-4).to_le_bytes(),
        );
        raw.extend_from_slice(&half::f16::from_f32(-0.1).to_le_bytes());
        raw.extend((0..16).map(|_| next() as u8));
    }
    let w =
        QMatrix::from_ggml(ferrolm_gguf::GgmlType::Q4_1, rows, cols, &raw).expect("Q4_1 repacks");
    let x: Vec<f32> = (0..n * cols)
        .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    let mut acts = QActs::default();
    acts.quantize(&x, n, cols);
    let mut out = vec![0f32; n * rows];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let isa = Isa::detect();
    let mut g16 = w.clone();
    let grouped = isa == Isa::Avx512Vnni && g16.interleave16();
    let mut first: Option<Vec<f32>> = None;
    for (name, w) in [("rows", &w), ("group16", &g16)] {
        if name == "group16" && !grouped {
            continue;
        }
        let t0 = std::time::Instant::now();
        pool.install(|| {
            for _ in 0..reps {
                matmul(isa, w, &acts, &mut out);
            }
        });
        let dt = t0.elapsed().as_secs_f64();
        let diff = first.as_ref().map_or(0.0, |f| {
            f.iter()
                .zip(&out)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        });
        first.get_or_insert_with(|| out.clone());
        println!(
            "{isa:?} {name}: {n} tokens × {rows}×{cols}: {:.3} ms per matmul, {:.1} GMAC/s (max |Δ| vs rows {diff:.2e})",
            dt / reps as f64 * 1e3,
            (n * rows * cols * reps) as f64 / dt / 1e9
        );
    }
}
