//! Keeping the thread pool's workers awake through a forward pass.
//!
//! A forward pass runs a few parallel regions per layer (the matrix products, attention), with
//! short serial stretches between them (norms, activation quantization, RoPE, the KV store).
//! rayon parks a worker that finds no work after a few dozen rounds, and the next region then
//! pays a futex wake-up and a reschedule before that worker helps, costs that dwarf the
//! region itself on a VM (a 16-row-group matrix times 16 tokens is tens of microseconds).
//! Measured with SmolLM2-135M at 16 sequences a step (`ferrolm bench --parallel 16`, 2
//! threads): ~200 context switches a step, and two threads only 1.2× one.
//!
//! [`spinning`] runs the pass beside one poller job per other worker, which polls the pool for
//! work (`rayon::yield_now`, which runs a stolen job in place) until the pass ends:
//! what ggml's thread pool gets by spinning at its barriers, while keeping rayon's work
//! stealing, so a worker that the OS takes away for a while delays only the chunks it holds.
//! Every 256th idle poll yields the core to the OS, so a busy core's other tenant is not
//! starved for a whole pass.

use std::sync::atomic::{AtomicBool, Ordering};

/// Idle polls between two `sched_yield`s of a worker waiting in [`spinning`].
const POLLS_PER_YIELD: u32 = 256;

/// `f()`, with the current rayon pool's other workers kept polling for its work until it
/// returns (see the module docs). Runs `f` alone on a pool of one thread or outside a pool.
pub(crate) fn spinning<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let others = rayon::current_num_threads().saturating_sub(1);
    if others == 0 || rayon::current_thread_index().is_none() {
        return f();
    }
    let done = AtomicBool::new(false);
    with_pollers(others, &done, f)
}

/// `f()` beside `k` pollers of [`poll`], `done` set when it returns. Each `join` pushes its
/// poller before anything `f` pushes, so the pollers are the oldest jobs in this worker's
/// deque: the first ones other workers steal, and never ones this worker pops while it waits
/// inside `f` (it pops its own newer jobs first). A poller left unstolen runs after `f` and
/// returns at once.
fn with_pollers<R: Send>(k: usize, done: &AtomicBool, f: impl FnOnce() -> R + Send) -> R {
    if k == 0 {
        let r = f();
        done.store(true, Ordering::Release);
        return r;
    }
    rayon::join(|| with_pollers(k - 1, done, f), || poll(done)).0
}

/// Run the pool's jobs as they come until `done`.
fn poll(done: &AtomicBool) {
    let mut idle = 0u32;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle = 0;
            continue;
        }
        idle += 1;
        if idle.is_multiple_of(POLLS_PER_YIELD) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Parallel regions inside [`spinning`] complete with their results, on one worker and on
    /// several, and nested calls (a pass that runs a pass) do not deadlock.
    #[test]
    fn a_pass_runs_to_its_result_beside_the_poller() {
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a thread pool");
            let sum = pool.install(|| {
                spinning(|| {
                    let mut total = 0u64;
                    for k in 0..50u64 {
                        total += (0..1000u64).into_par_iter().map(|i| i * k).sum::<u64>();
                        total += spinning(|| (0..10u64).into_par_iter().sum::<u64>());
                    }
                    total
                })
            });
            let want: u64 = (0..50u64).map(|k| 499_500 * k + 45).sum();
            assert_eq!(sum, want, "{threads} threads");
        }
        // Outside any pool it is a plain call.
        assert_eq!(spinning(|| 7), 7);
    }
}
