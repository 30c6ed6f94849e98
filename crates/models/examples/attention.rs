//! The attention kernel of one decode step, alone: how long a token's attention takes at a
//! given context length, without the weights' matrix products or a long prompt to fill the
//! cache first (issue 20's "decode at 8k context" lever). `cargo run --release -p
//! ferrolm-models --example attention -- [--depth 8000] [--kv-type q4_0] [--threads 2]`.
//!
//! The cache is laid out as `KvCache` lays out one layer (`[slot][KV head][row]`, rows of
//! random values quantized as the type stores them), one such layer per model layer so a
//! token reads as many distinct bytes as a real one; the default shape is SmolLM2-360M's (32
//! layers, 5 KV heads of 64, 3 query heads per KV head). Each layer's context is cut into the
//! 256-position chunks of the one-token path and the chunks run in parallel, each over every
//! KV head, as `ops::attention` does (its per-chunk merge is left out: a few hundred flops).
//! `FERROLM_ISA=avx2` measures the AVX2 kernel on an AVX-512 machine. Prints the median of
//! `--reps` steps, in ms and as the tok/s attention alone would allow. `--flush MB` reads that
//! many MB between steps (untimed), as a decode step reads the weights, so each starts cold.
use std::time::Instant;

use ferrolm_models::kv_cache::{quantize_row, KvLayer};
use ferrolm_models::{simd, KvType};
use rayon::prelude::*;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: cannot parse {v:?}"))
        })
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let depth: usize = arg(&args, "--depth", 8000);
    let layers: usize = arg(&args, "--layers", 32);
    let nkv: usize = arg(&args, "--kv-heads", 5);
    let group: usize = arg(&args, "--group", 3);
    let hd: usize = arg(&args, "--head-dim", 64);
    let threads: usize = arg(&args, "--threads", 2);
    let reps: usize = arg(&args, "--reps", 20);
    let kind: KvType = arg(&args, "--kv-type", KvType::Q4_0);
    // MB read between steps (untimed), as a decode step reads the weights between one
    // token's attention and the next: the cache then starts cold, as in a real decode.
    let flush_mb: usize = arg(&args, "--flush", 0);
    let flush: Vec<u64> = vec![1; flush_mb << 17];
    const CHUNK: usize = 256;

    let ru = kind.row_units(hd);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    let mut row = vec![0f32; hd];
    let mut layer_rows = |rand: &mut dyn FnMut() -> f32| {
        let mut st = vec![0u16; depth * nkv * ru];
        for r in st.chunks_exact_mut(ru) {
            row.iter_mut().for_each(|x| *x = rand());
            if kind == KvType::F16 {
                simd::to_f16(&row, r);
            } else {
                quantize_row(kind, &row, r);
            }
        }
        st
    };
    let cache: Vec<(Vec<u16>, Vec<u16>)> = (0..layers)
        .map(|_| (layer_rows(&mut rand), layer_rows(&mut rand)))
        .collect();
    let q: Vec<f32> = (0..nkv * group * hd).map(|_| rand()).collect();
    let chunks: Vec<(usize, usize)> = (0..depth)
        .step_by(CHUNK)
        .map(|lo| (lo, (lo + CHUNK).min(depth)))
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool");
    let step = || {
        for (k, v) in &cache {
            let layer = KvLayer::of_rows(kind, hd, k, v);
            chunks.par_iter().for_each_init(
                || {
                    (
                        Vec::new(),
                        Vec::new(),
                        vec![0f32; group * hd],
                        vec![[0f32; 2]; group],
                    )
                },
                |(offs, scores, out, ml), &(lo, hi)| {
                    for kvh in 0..nkv {
                        offs.clear();
                        offs.extend((lo..hi).map(|p| (p * nkv + kvh) * ru));
                        let qh = &q[kvh * group * hd..][..group * hd];
                        // As `ops::attention` reads a task of every KV head.
                        let layer = layer.for_head_pass(nkv, kvh == 0);
                        simd::attend_partial(qh, &layer, offs, &[], 0.125, scores, out, ml);
                    }
                },
            );
        }
    };
    pool.install(|| {
        step();
        let mut ms: Vec<f64> = (0..reps)
            .map(|_| {
                std::hint::black_box(flush.iter().fold(0u64, |a, &x| a ^ x));
                let t = Instant::now();
                step();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        ms.sort_by(|a, b| a.total_cmp(b));
        let med = ms[reps / 2];
        let bytes = 2 * layers * depth * nkv * ru * 2;
        println!(
            "{kind} depth {depth} threads {threads}: attention {med:.2} ms per token (min {:.2}), {:.1} tok/s if it were all; {:.1} MB read per token, {:.1} GB/s",
            ms[0],
            1e3 / med,
            bytes as f64 / 1e6,
            bytes as f64 / 1e6 / med
        );
    });
}
