//! A STREAM-style memory-bandwidth probe: the bound that decode speed is held to once a
//! model's weights no longer fit in the last-level cache (issue 20). `cargo run --release -p
//! ferrolm-models --example bandwidth -- [--mib N] [--reps R] [--json]`.
//!
//! Three f32 arrays of N MiB each (default 1024: together 10× the 260–300 MiB L3 of the dev
//! machines) are filled once (so their pages exist), then timed, best of R runs (default 5), on 1 and 2
//! threads, each thread taking a contiguous share of the indices:
//! - `read`: sum of all three arrays (3·N MiB read, nothing written) — what a decode step does
//!   with the weights;
//! - `triad`: `a[i] = b[i] + s·c[i]`, counted as STREAM counts it (two reads and one write per
//!   element, 12 bytes; the write-allocate read is not counted).
//!
//! GB/s are 10⁹ bytes per second. Best-of-R because other processes share the cores: the
//! figure wanted is what the memory system can deliver, not the average under contention.
use std::time::Instant;

fn sum(x: &[f32]) -> u32 {
    // Integer adds of the bits: associative, so the compiler vectorizes and unrolls the loop
    // freely (a float sum would be kept in order, one add at a time) and one core asks for
    // memory as fast as it can. The value only keeps the loads from being optimized away.
    x.iter().fold(0u32, |a, v| a.wrapping_add(v.to_bits()))
}

fn triad(a: &mut [f32], b: &[f32], c: &[f32], s: f32) {
    for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
        *a = b + s * c;
    }
}

/// Splits `0..n` into `threads` contiguous ranges.
fn ranges(n: usize, threads: usize) -> Vec<std::ops::Range<usize>> {
    let per = n.div_ceil(threads);
    (0..threads)
        .map(|t| (t * per).min(n)..((t + 1) * per).min(n))
        .collect()
}

fn time_read(arrays: &[Vec<f32>], threads: usize) -> (f64, u32) {
    let n = arrays[0].len();
    let t0 = Instant::now();
    let total = std::thread::scope(|sc| {
        let handles: Vec<_> = ranges(n, threads)
            .into_iter()
            .map(|r| {
                sc.spawn(move || {
                    let sums = arrays.iter().map(|x| sum(&x[r.clone()]));
                    sums.fold(0u32, u32::wrapping_add)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(0))
            .fold(0u32, u32::wrapping_add)
    });
    (t0.elapsed().as_secs_f64(), total)
}

fn time_triad(a: &mut [f32], b: &[f32], c: &[f32], threads: usize) -> f64 {
    let n = a.len();
    let t0 = Instant::now();
    std::thread::scope(|sc| {
        let mut rest = a;
        let mut start = 0;
        for r in ranges(n, threads) {
            let (mine, tail) = rest.split_at_mut(r.end - start);
            rest = tail;
            start = r.end;
            let (b, c) = (&b[r.clone()], &c[r]);
            sc.spawn(move || triad(mine, b, c, 3.0));
        }
    });
    t0.elapsed().as_secs_f64()
}

fn main() {
    let mut mib = 1024usize;
    let mut reps = 5usize;
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mib" => mib = args.next().and_then(|v| v.parse().ok()).unwrap_or(mib),
            "--reps" => reps = args.next().and_then(|v| v.parse().ok()).unwrap_or(reps),
            "--json" => json = true,
            _ => {
                eprintln!("usage: bandwidth [--mib N] [--reps R] [--json]");
                std::process::exit(2);
            }
        }
    }
    let n = mib * 1024 * 1024 / 4;
    // Distinct non-zero contents so no page is shared with the zero page.
    let mut arrays: Vec<Vec<f32>> = (0..3)
        .map(|k| (0..n).map(|i| (i % 7 + k) as f32).collect())
        .collect();
    let read_bytes = 3.0 * n as f64 * 4.0;
    let triad_bytes = 3.0 * n as f64 * 4.0;
    let mut results = Vec::new();
    let mut checksum = 0u32;
    for threads in [1usize, 2] {
        let mut best_read = f64::INFINITY;
        let mut best_triad = f64::INFINITY;
        for _ in 0..reps {
            let (t, s) = time_read(&arrays, threads);
            checksum = checksum.wrapping_add(s);
            best_read = best_read.min(t);
            let (a, bc) = arrays.split_at_mut(1);
            best_triad = best_triad.min(time_triad(&mut a[0], &bc[0], &bc[1], threads));
        }
        results.push((
            threads,
            read_bytes / best_read / 1e9,
            triad_bytes / best_triad / 1e9,
        ));
    }
    if json {
        let rows: Vec<String> = results
            .iter()
            .map(|(t, r, tr)| {
                format!("{{\"threads\": {t}, \"read_gbs\": {r:.2}, \"triad_gbs\": {tr:.2}}}")
            })
            .collect();
        println!(
            "{{\"array_mib\": {mib}, \"arrays\": 3, \"reps\": {reps}, \"best_of\": true, \"results\": [{}]}}",
            rows.join(", ")
        );
    } else {
        println!("3 arrays of {mib} MiB, best of {reps} (checksum {checksum:08x})");
        println!("threads  read GB/s  triad GB/s");
        for (t, r, tr) in &results {
            println!("{t:>7}  {r:>9.2}  {tr:>10.2}");
        }
    }
}
