//! Every quantized GGUF type on our own kernels: the lossless repack held to candle's
//! dequantizer (an independent reading of ggml's block layouts), each SIMD kernel held to the
//! scalar one, the scalar one held to f32 math, row lookups, fusion, and the refusal of
//! K-quant rows that are not whole 256-element super-blocks. The matrices are random bytes
//! with sane f16 scales, built here (written through the repo's GGUF writer where a file is
//! needed), so every bit pattern of the quants is exercised.
#![allow(clippy::unwrap_used)]

use ferrolm_gguf::{writer::GgufWriter, GgmlType, GgufFile};
use ferrolm_models::linear::{dequantize, Linear};
use ferrolm_models::quant::{matmul, Isa, Layout, QActs, QMatrix, GEMM_MIN_TOKENS};
use half::f16;

const ALL: [GgmlType; 10] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// A positive f16 scale in [lo, 2·lo).
    fn scale(&mut self, lo: f32) -> [u8; 2] {
        f16::from_f32(lo * (1.5 + 0.5 * self.unit())).to_le_bytes()
    }
}

/// One random ggml block of `ty`: random quant and sub-scale bytes, the f16/f32 scale fields
/// set to values of a realistic size (random bytes there could be inf or NaN).
fn random_block(ty: GgmlType, rng: &mut Rng) -> Vec<u8> {
    let mut b: Vec<u8> = (0..ty.block_bytes()).map(|_| rng.next() as u8).collect();
    let mut put = |at: usize, v: [u8; 2]| b[at..at + 2].copy_from_slice(&v);
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => put(0, rng.scale(0.01)),
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            put(0, rng.scale(0.01));
            put(2, rng.scale(0.05));
            b[3] |= 0x80; // a negative offset (f16 sign bit), as ggml's usually are
        }
        GgmlType::Q2K => {
            put(80, rng.scale(0.01));
            put(82, rng.scale(0.01));
        }
        GgmlType::Q3K => put(108, rng.scale(0.01)),
        GgmlType::Q4K | GgmlType::Q5K => {
            put(0, rng.scale(0.001));
            put(2, rng.scale(0.001));
        }
        GgmlType::Q6K => put(208, rng.scale(0.001)),
        other => unreachable!("{other:?} is not a weight block type"),
    }
    b
}

fn random_matrix(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let blocks = rows * cols / ty.block_size() as usize;
    (0..blocks).flat_map(|_| random_block(ty, rng)).collect()
}

/// Row widths to test a type at: whole blocks, odd block counts, odd super-block counts.
fn widths(ty: GgmlType) -> &'static [usize] {
    if ty.block_size() == 256 {
        &[256, 768, 1536]
    } else {
        &[32, 96, 576]
    }
}

/// A GGUF file holding one `[rows, cols]` matrix `w` of `ty`.
fn write_matrix(ty: GgmlType, rows: usize, cols: usize, raw: Vec<u8>) -> tempfile::NamedTempFile {
    let mut w = GgufWriter::new();
    w.tensor("w", &[cols as u64, rows as u64], ty, raw);
    let mut f = tempfile::NamedTempFile::new().unwrap();
    w.write_to(&mut f).unwrap();
    f
}

/// The repack is lossless: every row looked up through `Linear::row` (the embedding lookup)
/// equals candle's dequantization of the same file, to f32 rounding (Q6_K's `d·sc·q` may round
/// differently from ggml's `d·sc·(q − 32)`: |Δ| ≤ 2⁻²³ of the largest value).
#[test]
fn every_quant_type_repacks_losslessly_against_candles_dequantizer() {
    let mut rng = Rng(1);
    for ty in ALL {
        for &cols in widths(ty) {
            let rows = 3;
            let f = write_matrix(ty, rows, cols, random_matrix(ty, rows, cols, &mut rng));
            let g = GgufFile::open(f.path()).unwrap();
            let want = dequantize(&g, g.tensor("w").unwrap()).unwrap();
            let lin = Linear::load(&g, "w", rows, cols).unwrap();
            assert!(
                lin.kind().contains("ferrolm kernels"),
                "{ty:?}: {}",
                lin.kind()
            );
            let amax = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert!(
                amax > 0.0 && amax.is_finite(),
                "{ty:?}: degenerate test data"
            );
            let mut got = vec![0f32; cols];
            for r in 0..rows {
                lin.row(r, &mut got).unwrap();
                for (i, (a, b)) in got.iter().zip(&want[r * cols..]).enumerate() {
                    assert!(
                        (a - b).abs() <= amax * 2e-7,
                        "{ty:?} {cols} row {r} element {i}: {a} vs candle {b}"
                    );
                }
            }
        }
    }
}

/// The ISAs this CPU can run, scalar first.
fn isas() -> Vec<Isa> {
    let best = Isa::detect();
    let mut v = vec![Isa::Scalar];
    if best != Isa::Scalar {
        v.push(Isa::Avx2);
    }
    if best == Isa::Avx512Vnni {
        v.push(Isa::Avx512Vnni);
    }
    v
}

/// Check that `lin`, prepared for `isa`, is in the layout the AVX2 kernels are meant to read
/// (so a test cannot pass through a slow fallback): the Q5 types grouped in 16 rows where the
/// rows come in 16s, else 5-bit row-major.
fn assert_avx2_layout(ty: GgmlType, rows: usize, isa: Isa, lin: &Linear) {
    let Linear::Q(q) = lin else {
        panic!("{ty:?}: not a quantized matrix")
    };
    if isa != Isa::Avx2 || !matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5K) {
        return;
    }
    let want = if rows.is_multiple_of(16) {
        Layout::Group16Packed5
    } else {
        Layout::Packed5
    };
    assert_eq!(q.layout, want, "{ty:?} {rows} rows prepared for AVX2");
}

/// Every kernel against the scalar one, on every type, at row counts that are and are not
/// multiples of 16 (the SIMD paths regroup those that are) and 1..70 tokens; and the scalar
/// one against f32 math on the dequantized weights, where the only difference is the
/// activations' 8-bit rounding: |err| ≤ Σ|w|·max|x|/127/2 per output.
#[test]
fn every_kernel_matches_scalar_and_f32_on_every_type() {
    let mut rng = Rng(2);
    let shapes = [
        (1, 1),
        (5, 2),
        (16, 3),
        (17, 7),
        (33, 16),
        (48, 33),
        (7, 70),
        (32, 5),
    ];
    for ty in ALL {
        for (si, &(rows, n)) in shapes.iter().enumerate() {
            let widths = widths(ty);
            let cols = widths[si % widths.len()];
            let raw = random_matrix(ty, rows, cols, &mut rng);
            let w = QMatrix::from_ggml(ty, rows, cols, &raw).unwrap();
            let x: Vec<f32> = (0..n * cols).map(|_| rng.unit()).collect();
            let mut acts = QActs::default();
            acts.quantize(&x, n, cols);
            let mut want = vec![0f32; n * rows];
            matmul(Isa::Scalar, &w, &acts, &mut want);
            let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
            for isa in isas() {
                let mut wi = w.clone();
                let mut lin = Linear::Q(Box::new(w.clone()));
                lin.prepare(isa);
                assert_avx2_layout(ty, rows, isa, &lin);
                if isa != Isa::Scalar {
                    // Both SIMD ISAs have 16-row group kernels (AVX2's read 4-bit Block32 and
                    // Sub16 matrices, and the Q5 types in their own 5-bit grouped layout that
                    // `lin.prepare` makes; it takes the slow fallback for 8-bit Group16).
                    let grouped = wi.interleave16();
                    assert_eq!(grouped, rows % 16 == 0, "{ty:?} {rows}");
                    // The regrouped matrix holds the same values (the embedding lookup).
                    let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
                    for r in 0..rows {
                        w.dequantize_row(r, &mut a);
                        wi.dequantize_row(r, &mut b);
                        assert_eq!(a, b, "{ty:?} {rows}×{cols} row {r} after interleave16");
                    }
                }
                let mut got = vec![0f32; n * rows];
                matmul(isa, &wi, &acts, &mut got);
                if isa == Isa::Avx2 && n >= GEMM_MIN_TOKENS {
                    // Activations quantized for the f32 GEMM prompt path
                    // (`FERROLM_BATCH_INVARIANT=0`): row-major matrices take the GEMM panels,
                    // grouped ones their integer group kernel; the same operands either way,
                    // float rounding apart.
                    let mut fa = QActs::default();
                    fa.quantize_with(&x, n, cols, true);
                    let mut by_gemm = vec![0f32; n * rows];
                    matmul(isa, &wi, &fa, &mut by_gemm);
                    for (i, (a, b)) in by_gemm.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 2e-5 * scale,
                            "{ty:?} GEMM path {rows}×{cols}, {n} tokens, output {i}: {a} vs scalar {b}"
                        );
                    }
                }
                let mut via_linear = vec![0f32; n * rows];
                lin.forward(isa, &x, n, &mut QActs::default(), &mut via_linear)
                    .unwrap();
                for (i, ((a, b), c)) in got.iter().zip(&want).zip(&via_linear).enumerate() {
                    assert!(
                        (a - b).abs() <= 2e-5 * scale && (c - b).abs() <= 2e-5 * scale,
                        "{ty:?} {isa:?} {rows}×{cols}, {n} tokens, output {i}: {a} / {c} vs scalar {b}"
                    );
                }
            }
            let mut wrow = vec![0f32; cols];
            for r in 0..rows {
                w.dequantize_row(r, &mut wrow);
                for t in 0..n {
                    let xr = &x[t * cols..(t + 1) * cols];
                    let exact: f32 = wrow.iter().zip(xr).map(|(a, b)| a * b).sum();
                    let amax = xr.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let bound = wrow.iter().map(|v| v.abs()).sum::<f32>() * amax / 127.0 / 2.0
                        + 1e-5 * scale;
                    let got = want[t * rows + r];
                    assert!(
                        (got - exact).abs() <= bound,
                        "{ty:?} {rows}×{cols} row {r} token {t}: {got} vs f32 {exact} (bound {bound})"
                    );
                }
            }
        }
    }
}

/// Batch invariance: on every type and kernel, a prompt's products (tiles of rows × tokens,
/// token blocks, row and token tails) equal the same tokens' one-token products bit for bit,
/// so a token's logits do not depend on what it is batched with. Row counts in 16s take the
/// 16-row group kernels (AVX-512's for every type, AVX2's for all but Q4_0 and Q8_0), the
/// others the row kernels. (With
/// `FERROLM_BATCH_INVARIANT=0` the AVX2 prompt path is an f32 GEMM instead, not batch
/// invariant by design; the every-kernel test above holds it to the scalar kernel.)
#[test]
fn prompts_equal_one_token_products_bitwise_on_every_type() {
    assert!(ferrolm_models::quant::batch_invariant());
    let mut rng = Rng(3);
    for ty in ALL {
        let shapes = [(7, 9), (9, 70), (4, 5), (32, 9), (16, 70), (48, 3)];
        for (si, &(rows, n)) in shapes.iter().enumerate() {
            let widths = widths(ty);
            let cols = widths[si % widths.len()];
            let raw = random_matrix(ty, rows, cols, &mut rng);
            let x: Vec<f32> = (0..n * cols).map(|_| rng.unit()).collect();
            for isa in isas() {
                let mut lin =
                    Linear::Q(Box::new(QMatrix::from_ggml(ty, rows, cols, &raw).unwrap()));
                lin.prepare(isa);
                assert_avx2_layout(ty, rows, isa, &lin);
                let mut prompt = vec![0f32; n * rows];
                lin.forward(isa, &x, n, &mut QActs::default(), &mut prompt)
                    .unwrap();
                let mut one = vec![0f32; rows];
                for t in 0..n {
                    lin.forward(
                        isa,
                        &x[t * cols..(t + 1) * cols],
                        1,
                        &mut QActs::default(),
                        &mut one,
                    )
                    .unwrap();
                    for (r, v) in one.iter().enumerate() {
                        let p = prompt[t * rows + r];
                        assert_eq!(
                            v.to_bits(),
                            p.to_bits(),
                            "{ty:?} {isa:?} {rows}×{cols}: token {t} row {r} is {v} alone, {p} in a prompt of {n}"
                        );
                    }
                }
            }
        }
    }
}

/// q‖k‖v and gate‖up fuse when their repacked forms agree (Q4_K with Q4_0/Q4_1, the Q5 types
/// together, Q8_0 with itself, Q6_K with itself), and the fused product is the parts' products
/// side by side; forms that differ (Q4_K with Q6_K, 5-bit Q5_0 with 8-bit Q8_0) stay apart.
#[test]
fn concat_fuses_matching_forms_and_keeps_their_products() {
    let mut rng = Rng(3);
    let cols = 512;
    let load = |ty: GgmlType, rows: usize, rng: &mut Rng| {
        let q = QMatrix::from_ggml(ty, rows, cols, &random_matrix(ty, rows, cols, rng)).unwrap();
        Linear::Q(Box::new(q))
    };
    let fuse = [
        vec![GgmlType::Q4K, GgmlType::Q4_0, GgmlType::Q4_1],
        vec![GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q5K],
        vec![GgmlType::Q8_0, GgmlType::Q8_0],
        vec![GgmlType::Q6K, GgmlType::Q6K],
        vec![GgmlType::Q3K, GgmlType::Q2K],
    ];
    let n = 3;
    let x: Vec<f32> = (0..n * cols).map(|_| rng.unit()).collect();
    for types in fuse {
        let rows = [32, 16, 40];
        let parts: Vec<Linear> = types
            .iter()
            .zip(rows)
            .map(|(&t, r)| load(t, r, &mut rng))
            .collect();
        let mut separate = vec![];
        for p in &parts {
            let mut y = vec![0f32; n * p.rows()];
            p.forward(Isa::Scalar, &x, n, &mut QActs::default(), &mut y)
                .unwrap();
            separate.push(y);
        }
        let fused = Linear::concat(parts, Isa::detect())
            .unwrap_or_else(|_| panic!("{types:?} should fuse"));
        let total = fused.rows();
        for isa in isas() {
            let mut f = Linear::Q(match &fused {
                Linear::Q(q) => q.clone(),
                _ => unreachable!(),
            });
            f.prepare(isa);
            let mut y = vec![0f32; n * total];
            f.forward(isa, &x, n, &mut QActs::default(), &mut y)
                .unwrap();
            for t in 0..n {
                let mut at = 0;
                for s in &separate {
                    let r = s.len() / n;
                    for i in 0..r {
                        let (a, b) = (y[t * total + at + i], s[t * r + i]);
                        assert!(
                            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                            "{types:?} {isa:?}: {a} vs {b}"
                        );
                    }
                    at += r;
                }
            }
        }
    }
    let apart = vec![
        load(GgmlType::Q4K, 16, &mut rng),
        load(GgmlType::Q6K, 16, &mut rng),
    ];
    assert!(
        Linear::concat(apart, Isa::detect()).is_err(),
        "Q4_K and Q6_K repack differently"
    );
    // Regression: a Q5_0 q‖k fused with a Q8_0 v (SmolLM2 Q4_K_M) was one full 8-bit matrix,
    // which AVX2 ran on its slowest row kernel instead of the 5-bit group kernel.
    // AVX-512 runs the fused 8-bit matrix on its group kernel, so there they still fuse.
    for (isa, fuses) in [(Isa::Avx2, false), (Isa::Avx512Vnni, true)] {
        let parts = vec![
            load(GgmlType::Q5_0, 32, &mut rng),
            load(GgmlType::Q8_0, 16, &mut rng),
        ];
        assert_eq!(
            Linear::concat(parts, isa).is_ok(),
            fuses,
            "Q5_0 (5-bit) with Q8_0 (8-bit) for {isa:?}"
        );
    }
}

/// Regression: a K-quant tensor whose rows are not whole 256-element super-blocks (SmolLM2's
/// width 576, say) is refused with a message naming the tensor and the rule, not a panic.
#[test]
fn k_quant_rows_not_a_multiple_of_256_are_refused_with_the_rule() {
    for ty in [GgmlType::Q2K, GgmlType::Q4K, GgmlType::Q6K] {
        let (rows, cols) = (4usize, 576usize);
        // Bytes as if the row were 2.25 super-blocks long: the reader must not trust them.
        let bytes = rows * cols * ty.block_bytes() as usize / 256;
        let f = write_matrix(ty, rows, cols, vec![0; bytes]);
        let err = GgufFile::open(f.path()).err().unwrap().to_string();
        assert!(
            err.contains("`w`") && err.contains("576") && err.contains("256"),
            "{ty:?}: {err}"
        );
        assert!(QMatrix::from_ggml(ty, rows, cols, &vec![0; bytes]).is_none());
    }
}

/// ggml's activation formats are not weights: a file that stores a matrix in one is refused
/// with what to do, not loaded wrongly or with a panic.
#[test]
fn activation_formats_as_weights_are_refused_with_a_fix() {
    for ty in [GgmlType::Q8_1, GgmlType::Q8K] {
        let (rows, cols) = (2usize, 256usize);
        let bytes = rows * cols / ty.block_size() as usize * ty.block_bytes() as usize;
        let f = write_matrix(ty, rows, cols, vec![0; bytes]);
        let g = GgufFile::open(f.path()).unwrap();
        let err = Linear::load(&g, "w", rows, cols).err().unwrap().to_string();
        assert!(
            err.contains("`w`") && err.contains("activation format") && err.contains("Q8_0"),
            "{ty:?}: {err}"
        );
    }
}
