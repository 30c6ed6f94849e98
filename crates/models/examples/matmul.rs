//! Times the quantized matmul on a SmolLM2-shaped FFN matrix (1536 × 576, random weights of
//! TYPE — q4_1, q5_0 or q8_0 —, one thread, or `MM_THREADS`; 1536 × 768 for the K-quants
//! q2_k, q3_k, q4_k and q6_k, whose rows are whole 256-element super-blocks), row-major and in
//! 16-row groups (AVX-512 VNNI), and prints how far the two results are apart: `cargo run
//! --release -p ferrolm-models --example matmul -- [TOKENS] [REPS] [TYPE]`. (On AVX-512,
//! row-major q2_k/q3_k/q6_k run the AVX2 kernel, as rows not in 16s do.) On AVX2 the matrix is
//! prepared as the loader does (`prepare_avx2`: q5_0 in 16-row 5-bit groups, q8_0 row-major;
//! the printed layout says which), and the prompt's result is checked bitwise against the same
//! tokens one at a time (batch invariance); `FERROLM_BATCH_INVARIANT=0` times the f32 GEMM path
//! instead. Valgrind cannot run the AVX-512 kernels and this VM exposes no cycle counters, so
//! A/B kernel changes here by interleaved timings (repeat, take medians).
use ferrolm_models::quant::{matmul, Isa, QActs, QMatrix};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let reps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let ty = args.next().unwrap_or_else(|| "q4_1".into());
    use ferrolm_gguf::GgmlType as G;
    let mut seed = 0x9E37_79B9_u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let gty = match ty.as_str() {
        "q4_1" => G::Q4_1,
        "q5_0" => G::Q5_0,
        "q8_0" => G::Q8_0,
        "q2_k" => G::Q2K,
        "q3_k" => G::Q3K,
        "q4_k" => G::Q4K,
        "q6_k" => G::Q6K,
        other => panic!("TYPE must be q4_1, q5_0, q8_0, q2_k, q3_k, q4_k or q6_k, not {other}"),
    };
    let (rows, cols) = (1536, if gty.block_size() == 256 { 768 } else { 576 });
    // Random GGML blocks with sane f16 scales at their offsets: Q4_1 also an f16 m, Q4_K
    // f16 d and dmin first, Q2_K d and dmin at 80, Q3_K d at 108, Q6_K d at 208.
    let f16_at: &[usize] = match gty {
        G::Q4_1 | G::Q4K => &[0, 2],
        G::Q2K => &[80, 82],
        G::Q3K => &[108],
        G::Q6K => &[208],
        _ => &[0],
    };
    let bb = gty.block_bytes() as usize;
    let mut raw = Vec::new();
    for _ in 0..rows * cols / gty.block_size() as usize {
        let mut blk: Vec<u8> = (0..bb).map(|_| next() as u8).collect();
        for &at in f16_at {
            let v = half::f16::from_f32(0.01 + (next() % 100) as f32 * 1e-4);
            blk[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
        raw.extend_from_slice(&blk);
    }
    let mut w = QMatrix::from_ggml(gty, rows, cols, &raw).expect("the type repacks");
    if Isa::detect() == Isa::Avx2 {
        w.prepare_avx2();
    }
    let x: Vec<f32> = (0..n * cols)
        .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    let mut acts = QActs::default();
    acts.quantize(&x, n, cols);
    let mut out = vec![0f32; n * rows];
    // Batch invariance: the prompt's rows equal the same tokens' one-token products bitwise.
    if ferrolm_models::quant::batch_invariant() {
        matmul(Isa::detect(), &w, &acts, &mut out);
        let mut one = QActs::default();
        let mut o1 = vec![0f32; rows];
        let mut differ = 0;
        for t in 0..n {
            one.quantize(&x[t * cols..(t + 1) * cols], 1, cols);
            matmul(Isa::detect(), &w, &one, &mut o1);
            differ += o1
                .iter()
                .zip(&out[t * rows..(t + 1) * rows])
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
        }
        println!(
            "batch invariance: {differ} of {} outputs differ from one token at a time",
            n * rows
        );
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(
            std::env::var("MM_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
        )
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
            "{isa:?} {name} ({:?}): {n} tokens × {rows}×{cols}: {:.3} ms per matmul, {:.1} GMAC/s (max |Δ| vs rows {diff:.2e})",
            w.layout,
            dt / reps as f64 * 1e3,
            (n * rows * cols * reps) as f64 / dt / 1e9
        );
    }
}
