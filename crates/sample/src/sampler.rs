//! The sampling pipeline itself: bias → penalties → (greedy | temperature → top-k → top-p →
//! min-p → draw), plus raw log-probabilities.
//!
//! Contract: see the crate docs. Performance facts, so they are not rediscovered:
//! - The vocabulary-sized work per call is copying the row into `candidates` (with NaN mapped
//!   to `-inf`) and, when top-k is on, one scan that keeps the k best in a small heap; everything
//!   after top-k touches k entries. The scan replaced `select_nth_unstable_by`, which measured
//!   ~0.8 ms for k = 40 over a 49k vocabulary (a branchy comparator on random data) against
//!   ~0.1 ms for the scan, where almost every token is rejected by one comparison with the
//!   heap's worst entry. With top-k off and top-p on, tokens that provably cannot be in
//!   the nucleus are pruned before the sort (see [`Sampler::filter`]), so the sort is usually over
//!   a few hundred entries rather than the vocabulary.
//! - Penalties cost O(window), not O(vocab): occurrences are counted in a vocabulary-sized
//!   `counts` buffer that is reset entry by entry afterwards.
//! - Log-probabilities need a log-sum-exp over the whole raw row (one `exp` per vocabulary
//!   entry), so they are only computed when the request asks for them.
//! - After the first call (or a call with a larger vocabulary) nothing is allocated, except the
//!   returned `top` vector when logprobs with `n > 0` are requested.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::{Rng, SamplingParams};

/// Rounding slack for the top-p cut: a nucleus whose mass reaches `top_p` in exact arithmetic is
/// not widened by one token because f32 `exp` and summation landed a hair below it.
const TOP_P_SLACK: f64 = 1e-6;

/// The sampler's answer for one row of logits.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The chosen token id.
    pub token: u32,
    /// Log-probability of `token` under the model's raw distribution (log-softmax of the logits
    /// before bias, penalties and temperature). `None` unless `SamplingParams::logprobs` is
    /// `Some(_)`: computing it costs one `exp` per vocabulary entry.
    pub logprob: Option<f32>,
    /// The `n` tokens with the highest raw log-probability when `SamplingParams::logprobs` is
    /// `Some(n)`, as `(token, logprob)`, most likely first, ties by lower id. The chosen token
    /// may or may not be among them. Empty otherwise.
    pub top: Vec<(u32, f32)>,
}

/// Reusable scratch space for sampling; holds no information between calls. One per engine
/// thread is enough (it is not tied to a request: the request's state is its history and its
/// [`Rng`]).
#[derive(Debug, Clone, Default)]
pub struct Sampler {
    /// `(token id, value)`: the adjusted logit after [`Sampler::adjust`], then the unnormalised
    /// probability weight after [`Sampler::filter`].
    candidates: Vec<(u32, f32)>,
    /// Occurrences of each token id in the penalty window; all zero between calls.
    counts: Vec<u32>,
    /// The distinct token ids with a non-zero entry in `counts`.
    touched: Vec<u32>,
    /// The top-k survivors during the scan, worst on top.
    top_k: BinaryHeap<Ranked>,
}

impl Sampler {
    /// An empty sampler; its buffers grow to the vocabulary size on the first call.
    pub fn new() -> Self {
        Self::default()
    }

    /// Picks the next token from one row of `logits` (one entry per vocabulary token).
    ///
    /// `previous` is the sequence's whole history so far (prompt and generated tokens); the
    /// penalties look at its last `params.repeat_last_n` tokens, and ids outside the vocabulary
    /// are ignored. `params` should have passed [`SamplingParams::validate`] for this vocabulary;
    /// unvalidated values do not panic but may give meaningless results (out-of-range
    /// `logit_bias` ids are skipped).
    ///
    /// RNG use: greedy params (temperature 0) never touch `rng`; any other params consume exactly
    /// one [`Rng::next_f64`] per call, so a request's stream position is its number of sampled
    /// tokens.
    ///
    /// # Panics
    /// If `logits` is empty: a model that returns an empty row is broken, and no token can be
    /// produced from it.
    pub fn sample(
        &mut self,
        logits: &[f32],
        params: &SamplingParams,
        previous: &[u32],
        rng: &mut Rng,
    ) -> Sampled {
        assert!(
            !logits.is_empty(),
            "ferrolm-sample: the logits row is empty; the model must return one logit per \
             vocabulary entry"
        );
        self.adjust(logits, params, previous);
        let token = if params.is_greedy() {
            argmax(&self.candidates)
        } else {
            let r = rng.next_f64();
            self.filter(params);
            draw(&self.candidates, r)
        };
        let (logprob, top) = match params.logprobs {
            None => (None, Vec::new()),
            Some(n) => raw_logprobs(logits, token, n),
        };
        Sampled {
            token,
            logprob,
            top,
        }
    }

    /// Steps 1 and 2: fills `candidates` with `(id, logit)` in id order, NaN mapped to `-inf`,
    /// logit bias added, then the penalties for the tokens in the window applied.
    fn adjust(&mut self, logits: &[f32], params: &SamplingParams, previous: &[u32]) {
        let n = logits.len();
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, not_nan(l))),
        );
        for &(token, bias) in &params.logit_bias {
            if let Some(c) = self.candidates.get_mut(token as usize) {
                c.1 = not_nan(c.1 + bias);
            }
        }

        let rp = params.repetition_penalty;
        let (freq, presence) = (params.frequency_penalty, params.presence_penalty);
        if params.repeat_last_n == 0 || (rp == 1.0 && freq == 0.0 && presence == 0.0) {
            return;
        }
        let window = &previous[previous.len().saturating_sub(params.repeat_last_n)..];
        if self.counts.len() < n {
            self.counts.resize(n, 0);
        }
        for &t in window {
            let t = t as usize;
            if t >= n {
                continue;
            }
            if self.counts[t] == 0 {
                self.touched.push(t as u32);
            }
            self.counts[t] += 1;
        }
        for &t in &self.touched {
            let t = t as usize;
            let count = std::mem::take(&mut self.counts[t]);
            let l = &mut self.candidates[t].1;
            if rp != 1.0 {
                *l = if *l > 0.0 { *l / rp } else { *l * rp };
            }
            *l -= count as f32 * freq + presence;
            *l = not_nan(*l);
        }
        self.touched.clear();
    }

    /// Step 4 up to the draw: leaves in `candidates` the surviving tokens with their
    /// unnormalised probability weights (all `> 0`, at least one), in draw order: most likely
    /// first (ties by lower id) when top-k or top-p is on, id order otherwise.
    fn filter(&mut self, params: &SamplingParams) {
        let c = &mut self.candidates;

        // Top-k on the logits: dividing by a positive temperature keeps the ranking.
        let k = params.top_k;
        let top_k_on = k > 0 && k < c.len();
        if top_k_on {
            let heap = &mut self.top_k;
            heap.clear();
            for &x in c.iter() {
                if heap.len() < k {
                    heap.push(Ranked(x));
                } else if let Some(mut worst) = heap.peek_mut() {
                    if by_rank(&x, &worst.0) == Ordering::Less {
                        *worst = Ranked(x);
                    }
                }
            }
            c.clear();
            c.extend(heap.drain().map(|r| r.0));
        }

        let max = c.iter().fold(f32::NEG_INFINITY, |m, x| m.max(x.1));
        if max == f32::NEG_INFINITY {
            // Every token is banned. Return the lowest id rather than no token: the caller's
            // stop conditions, not the sampler, decide what a dead row means.
            let lowest = c.iter().map(|x| x.0).min().unwrap_or(0);
            c.clear();
            c.push((lowest, 1.0));
            return;
        }

        // Temperature and softmax numerators in one pass: weight = exp((l - max) / T), so the
        // most likely token has weight 1 and min-p is simply `weight >= min_p`. Subtracting
        // before dividing keeps tiny temperatures from overflowing to inf - inf.
        let t = params.temperature;
        let n_all = c.len();
        let mut total = 0.0f64;
        c.retain_mut(|x| {
            let w = if x.1 == max {
                1.0
            } else {
                ((x.1 - max) / t).exp()
            };
            x.1 = w;
            total += f64::from(w);
            w > 0.0 && w >= params.min_p
        });
        // Min-p before top-p gives the same set as the documented order: both keep a prefix of
        // the tokens sorted by probability, and min-p's test is a ratio to the maximum, which
        // renormalising after top-p would not change. Top-p still measures mass against
        // `total`, the distribution before min-p.

        if params.top_p < 1.0 {
            let top_p = f64::from(params.top_p);
            // Pruning: a token lighter than (1 - top_p) * total / n_all sits after every heavier
            // token in the sorted order, and all those heavier tokens together already hold
            // more than top_p of the mass (the lighter ones hold less than n_all times the cut),
            // so it can never be in the nucleus. This turns a sort of the vocabulary into a sort
            // of the plausible tokens.
            let cut = ((1.0 - top_p) * total / n_all as f64) as f32;
            c.retain(|x| x.1 >= cut);
            c.sort_unstable_by(by_rank);
            let threshold = (top_p - TOP_P_SLACK) * total;
            let mut cum = 0.0f64;
            let mut keep = c.len();
            for (i, x) in c.iter().enumerate() {
                cum += f64::from(x.1);
                if cum >= threshold {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        } else if top_k_on {
            c.sort_unstable_by(by_rank);
        }
    }
}

/// Maps NaN to `-inf` so that NaN is never chosen and comparisons are total.
fn not_nan(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x
    }
}

/// The sampler's ranking: larger value first, lower id first among equals. A total order on
/// NaN-free values.
fn by_rank(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.partial_cmp(&a.1)
        .unwrap_or(Ordering::Equal)
        .then(a.0.cmp(&b.0))
}

/// A candidate ordered by [`by_rank`], so a `BinaryHeap` of them has the worst on top.
#[derive(Debug, Clone, Copy)]
struct Ranked((u32, f32));

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        by_rank(&self.0, &other.0)
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ranked {}

/// The id with the largest value, the first one (lowest id, as `candidates` is in id order) on
/// ties.
fn argmax(candidates: &[(u32, f32)]) -> u32 {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (i, &c) in candidates.iter().enumerate() {
        if i == 0 || c.1 > best.1 {
            best = c;
        }
    }
    best.0
}

/// Inverse-CDF draw: walks `weighted` in order and returns the first id whose cumulative weight
/// exceeds `r * total`, `r` uniform in `[0, 1)`. Zero-weight entries can never be returned.
fn draw(weighted: &[(u32, f32)], r: f64) -> u32 {
    let total: f64 = weighted.iter().map(|x| f64::from(x.1)).sum();
    let target = r * total;
    let mut cum = 0.0f64;
    for &(id, w) in weighted {
        cum += f64::from(w);
        if target < cum {
            return id;
        }
    }
    // Only reachable when rounding puts `target` at `total`: the last token is the right one.
    weighted.last().map_or(0, |x| x.0)
}

/// Log-softmax of the raw row for `token` and the `n` most likely alternatives.
fn raw_logprobs(logits: &[f32], token: u32, n: usize) -> (Option<f32>, Vec<(u32, f32)>) {
    let max = logits
        .iter()
        .fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
    let logprob_of = |l: f32| -> f32 {
        let l = not_nan(l);
        if !max.is_finite() {
            // All -inf (no distribution) or an inf logit (all mass on it).
            return if l == f32::INFINITY {
                0.0
            } else {
                f32::NEG_INFINITY
            };
        }
        l - max
    };
    let log_sum: f32 = if max.is_finite() {
        let sum: f64 = logits
            .iter()
            .filter(|l| !l.is_nan())
            .map(|&l| f64::from((l - max).exp()))
            .sum();
        sum.ln() as f32
    } else {
        0.0
    };
    let lp = |l: f32| logprob_of(l) - log_sum;

    let mut top: Vec<(u32, f32)> = Vec::new();
    if n > 0 {
        top.reserve_exact(n + 1);
        for (i, &l) in logits.iter().enumerate() {
            let l = not_nan(l);
            // Strictly greater: among equals the earlier (lower) id keeps its place.
            if top.len() == n && top.last().is_some_and(|&(_, v)| l <= v) {
                continue;
            }
            let at = top.partition_point(|&(_, v)| v >= l);
            top.insert(at, (i as u32, l));
            top.truncate(n);
        }
        for x in &mut top {
            x.1 = lp(x.1);
        }
    }
    let chosen = logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&l| lp(l));
    (Some(chosen), top)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const SEED: u64 = 0x5eed;

    /// Filters and penalties all off, temperature 1: plain sampling from softmax(logits).
    fn plain() -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplingParams::greedy()
        }
    }

    fn ln_probs(p: &[f64]) -> Vec<f32> {
        p.iter().map(|&x| x.ln() as f32).collect()
    }

    /// Empirical frequency of each token over `n` draws.
    fn frequencies(logits: &[f32], params: &SamplingParams, n: usize, seed: u64) -> Vec<f64> {
        let mut s = Sampler::new();
        let mut rng = Rng::new(seed);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[s.sample(logits, params, &[], &mut rng).token as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol,
                "token {i}: got {g}, want {w} (±{tol})"
            );
        }
    }

    fn normalised(w: &[f64]) -> Vec<f64> {
        let s: f64 = w.iter().sum();
        w.iter().map(|x| x / s).collect()
    }

    /// Greedy with no history and the given params.
    fn greedy_token(logits: &[f32], params: &SamplingParams, previous: &[u32]) -> u32 {
        let mut rng = Rng::new(SEED);
        Sampler::new()
            .sample(logits, params, previous, &mut rng)
            .token
    }

    /// The slow, obviously correct path: the full final distribution over the vocabulary,
    /// computed in f64 step by step in the documented order, with full sorts.
    fn reference_distribution(
        logits: &[f32],
        params: &SamplingParams,
        previous: &[u32],
    ) -> Vec<f64> {
        let n = logits.len();
        let mut l: Vec<f64> = logits.iter().map(|&x| f64::from(x)).collect();
        for &(t, b) in &params.logit_bias {
            l[t as usize] += f64::from(b);
        }
        let start = previous.len().saturating_sub(params.repeat_last_n);
        let window = &previous[start..];
        for (t, lt) in l.iter_mut().enumerate() {
            let count = window.iter().filter(|&&x| x as usize == t).count();
            if count == 0 {
                continue;
            }
            let rp = f64::from(params.repetition_penalty);
            *lt = if *lt > 0.0 { *lt / rp } else { *lt * rp };
            *lt -= count as f64 * f64::from(params.frequency_penalty)
                + f64::from(params.presence_penalty);
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| l[b].partial_cmp(&l[a]).unwrap().then(a.cmp(&b)));
        let mut p = vec![0.0; n];
        if params.temperature == 0.0 {
            p[order[0]] = 1.0;
            return p;
        }
        // Temperature.
        let z: Vec<f64> = l
            .iter()
            .map(|&x| x / f64::from(params.temperature))
            .collect();
        // Top-k.
        if params.top_k > 0 {
            order.truncate(params.top_k);
        }
        // Softmax over the survivors.
        let zmax = z[order[0]];
        let sum: f64 = order.iter().map(|&i| (z[i] - zmax).exp()).sum();
        for &i in &order {
            p[i] = (z[i] - zmax).exp() / sum;
        }
        // Top-p: the shortest prefix whose mass reaches top_p.
        let mut cum = 0.0;
        let mut keep = order.len();
        for (j, &i) in order.iter().enumerate() {
            cum += p[i];
            if cum >= f64::from(params.top_p) {
                keep = j + 1;
                break;
            }
        }
        for &i in &order[keep..] {
            p[i] = 0.0;
        }
        // Min-p.
        let pmax = p[order[0]];
        for &i in &order {
            if p[i] < f64::from(params.min_p) * pmax {
                p[i] = 0.0;
            }
        }
        normalised(&p)
    }

    /// The fast path's final distribution, spread back over the vocabulary.
    fn fast_distribution(
        sampler: &mut Sampler,
        logits: &[f32],
        params: &SamplingParams,
        previous: &[u32],
    ) -> Vec<f64> {
        sampler.adjust(logits, params, previous);
        let mut p = vec![0.0; logits.len()];
        if params.is_greedy() {
            p[argmax(&sampler.candidates) as usize] = 1.0;
            return p;
        }
        sampler.filter(params);
        for &(id, w) in &sampler.candidates {
            p[id as usize] = f64::from(w);
        }
        normalised(&p)
    }

    #[test]
    fn fast_path_matches_the_reference_distribution() {
        let mut rng = Rng::new(123);
        let mut sampler = Sampler::new();
        for case in 0..300 {
            let n = [7, 50, 1000][case % 3];
            // Every other case rounds logits to 0.5 so ties cross the top-k and top-p cuts.
            let logits: Vec<f32> = (0..n)
                .map(|_| {
                    let x = rng.next_f32() * 12.0 - 6.0;
                    if case % 2 == 0 {
                        (x * 2.0).round() / 2.0
                    } else {
                        x
                    }
                })
                .collect();
            let previous: Vec<u32> = (0..20)
                .map(|_| (rng.next_u64() % n as u64) as u32)
                .collect();
            let pick = |rng: &mut Rng, xs: &[f32]| xs[(rng.next_u64() % xs.len() as u64) as usize];
            let params = SamplingParams {
                temperature: pick(&mut rng, &[0.0, 0.3, 0.8, 1.0, 2.5]),
                top_k: [0, 1, 3, 40][(rng.next_u64() % 4) as usize],
                top_p: pick(&mut rng, &[1.0, 0.95, 0.7, 0.3, 0.01]),
                min_p: pick(&mut rng, &[0.0, 0.05, 0.3]),
                repetition_penalty: pick(&mut rng, &[1.0, 1.3, 0.8]),
                repeat_last_n: [0, 5, 64, crate::WHOLE_HISTORY][(rng.next_u64() % 4) as usize],
                frequency_penalty: pick(&mut rng, &[0.0, 0.5, -0.4]),
                presence_penalty: pick(&mut rng, &[0.0, 1.0, -0.7]),
                logit_bias: vec![(1, f32::NEG_INFINITY), (2, 3.0)],
                seed: None,
                logprobs: None,
            };
            params.validate(n).unwrap();
            let want = reference_distribution(&logits, &params, &previous);
            let got = fast_distribution(&mut sampler, &logits, &params, &previous);
            assert_close(&got, &want, 1e-5);
        }
    }

    #[test]
    fn greedy_picks_the_argmax() {
        let logits = [0.1, -3.0, 7.5, 7.25, 2.0];
        assert_eq!(greedy_token(&logits, &SamplingParams::greedy(), &[]), 2);
    }

    #[test]
    fn greedy_ties_go_to_the_lowest_id() {
        let logits = [1.0, 4.0, -2.0, 4.0, 4.0];
        assert_eq!(greedy_token(&logits, &SamplingParams::greedy(), &[]), 1);
        // NaN is never the argmax, even first.
        let logits = [f32::NAN, 0.5, 0.5];
        assert_eq!(greedy_token(&logits, &SamplingParams::greedy(), &[]), 1);
    }

    #[test]
    fn greedy_does_not_touch_the_rng_and_sampling_draws_exactly_once() {
        let logits = [0.0, 1.0, 2.0];
        let mut s = Sampler::new();
        let mut rng = Rng::new(SEED);
        s.sample(&logits, &SamplingParams::greedy(), &[], &mut rng);
        assert_eq!(rng, Rng::new(SEED));
        s.sample(&logits, &SamplingParams::default(), &[], &mut rng);
        let mut once = Rng::new(SEED);
        once.next_f64();
        assert_eq!(rng, once);
    }

    #[test]
    fn logit_bias_bans_and_forces() {
        let logits = [1.0, 5.0, 2.0, 0.0];
        let ban = SamplingParams {
            logit_bias: vec![(1, f32::NEG_INFINITY)],
            ..SamplingParams::greedy()
        };
        assert_eq!(greedy_token(&logits, &ban, &[]), 2);
        let ban100 = SamplingParams {
            logit_bias: vec![(1, -100.0)],
            ..SamplingParams::greedy()
        };
        assert_eq!(greedy_token(&logits, &ban100, &[]), 2);
        let force = SamplingParams {
            logit_bias: vec![(3, 100.0)],
            ..SamplingParams::greedy()
        };
        assert_eq!(greedy_token(&logits, &force, &[]), 3);

        // Under sampling a banned token is never drawn, even the most likely one.
        let sampled_ban = SamplingParams {
            logit_bias: vec![(1, f32::NEG_INFINITY)],
            ..plain()
        };
        let f = frequencies(&logits, &sampled_ban, 20_000, SEED);
        assert_eq!(f[1], 0.0);
        assert!(f[0] > 0.0 && f[2] > 0.0 && f[3] > 0.0, "{f:?}");
    }

    #[test]
    fn every_token_banned_still_yields_the_lowest_id() {
        let logits = [1.0, 2.0, 3.0];
        let all = vec![
            (0, f32::NEG_INFINITY),
            (1, f32::NEG_INFINITY),
            (2, f32::NEG_INFINITY),
        ];
        for params in [
            SamplingParams {
                logit_bias: all.clone(),
                ..SamplingParams::greedy()
            },
            SamplingParams {
                logit_bias: all.clone(),
                ..SamplingParams::default()
            },
            SamplingParams {
                logit_bias: all.clone(),
                ..plain()
            },
        ] {
            assert_eq!(greedy_token(&logits, &params, &[]), 0);
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let rp = SamplingParams {
            repetition_penalty: 1.5,
            ..SamplingParams::greedy()
        };
        // Positive: 2.0 / 1.5 = 1.33 drops below 1.5, so token 1 wins once 0 was seen.
        let logits = [2.0, 1.5, -1.0];
        assert_eq!(greedy_token(&logits, &rp, &[]), 0);
        assert_eq!(greedy_token(&logits, &rp, &[0]), 1);
        // Negative: -1.0 * 1.5 = -1.5 drops below -1.2. Dividing instead (-0.67) would keep
        // token 0, so this catches the sign-blind version.
        let logits = [-1.0, -1.2, -5.0];
        assert_eq!(greedy_token(&logits, &rp, &[]), 0);
        assert_eq!(greedy_token(&logits, &rp, &[0]), 1);
        // The penalty is per distinct token, not per occurrence: 2.0 / 1.5 once, still > 1.3.
        let logits = [2.0, 1.3];
        assert_eq!(greedy_token(&logits, &rp, &[0, 0, 0, 0]), 0);
    }

    #[test]
    fn penalty_window_is_the_last_repeat_last_n_tokens() {
        // Token 2 is filler that cannot win; token 0 loses to 1 only when it is penalised.
        let logits = [2.0, 1.5, -5.0];
        let mut rp = SamplingParams {
            repetition_penalty: 1.5,
            repeat_last_n: 2,
            ..SamplingParams::greedy()
        };
        // Token 0 is three back: outside a window of 2.
        assert_eq!(greedy_token(&logits, &rp, &[0, 2, 2]), 0);
        assert_eq!(greedy_token(&logits, &rp, &[2, 0, 2]), 1);
        rp.repeat_last_n = crate::WHOLE_HISTORY;
        assert_eq!(greedy_token(&logits, &rp, &[0, 2, 2]), 1);
        rp.repeat_last_n = 0;
        assert_eq!(greedy_token(&logits, &rp, &[0, 0, 0]), 0);
        // Ids outside the vocabulary in the history are ignored, not a panic.
        rp.repeat_last_n = 64;
        assert_eq!(greedy_token(&logits, &rp, &[7, 1_000_000]), 0);
    }

    #[test]
    fn frequency_and_presence_penalties_are_exact() {
        let params = SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            repeat_last_n: 5,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new();
        // The 5-token window is [2, 1, 2, 0, 0]: the leading 3 and 2 are outside it, so 0 and 2
        // occur twice, 1 once, 3 and 4 not at all.
        s.adjust(&[1.0; 5], &params, &[3, 2, 2, 1, 2, 0, 0]);
        let got: Vec<f32> = s.candidates.iter().map(|c| c.1).collect();
        let want = [
            1.0 - (2.0 * 0.5 + 0.25),
            1.0 - (0.5 + 0.25),
            1.0 - (2.0 * 0.5 + 0.25),
            1.0,
            1.0,
        ];
        assert_eq!(got, want);

        // Combined with the repetition penalty: divide first, then subtract.
        let both = SamplingParams {
            repetition_penalty: 2.0,
            ..params.clone()
        };
        s.adjust(&[3.0, -3.0], &both, &[0, 1, 1]);
        let got: Vec<f32> = s.candidates.iter().map(|c| c.1).collect();
        assert_eq!(got, [3.0 / 2.0 - 0.75, -3.0 * 2.0 - 1.25]);
        // Negative penalties reward repeats.
        let reward = SamplingParams {
            frequency_penalty: -1.0,
            presence_penalty: 0.0,
            ..params
        };
        assert_eq!(greedy_token(&[1.0, 1.5], &reward, &[0]), 0);
    }

    #[test]
    fn counts_are_reset_between_calls() {
        // A call with a larger vocabulary and a long history must not leak counts into the next.
        let params = SamplingParams {
            frequency_penalty: 1.0,
            repeat_last_n: crate::WHOLE_HISTORY,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new();
        let mut rng = Rng::new(SEED);
        s.sample(&[0.0; 10], &params, &[0, 0, 0, 9, 9], &mut rng);
        s.adjust(&[0.0; 3], &params, &[1]);
        let got: Vec<f32> = s.candidates.iter().map(|c| c.1).collect();
        assert_eq!(got, [0.0, -1.0, 0.0]);
    }

    #[test]
    fn top_k_1_equals_greedy_whatever_the_temperature() {
        let mut rng = Rng::new(9);
        let mut s = Sampler::new();
        for case in 0..50 {
            let mut logits: Vec<f32> = (0..300).map(|_| rng.next_f32() * 4.0).collect();
            if case % 5 == 0 {
                logits[17] = 10.0;
                logits[3] = 10.0; // a tie: both paths must take the lower id
            }
            let greedy = greedy_token(&logits, &SamplingParams::greedy(), &[]);
            for t in [0.1, 1.0, 5.0, 100.0] {
                let p = SamplingParams {
                    temperature: t,
                    top_k: 1,
                    top_p: 1.0,
                    min_p: 0.0,
                    ..SamplingParams::default()
                };
                assert_eq!(s.sample(&logits, &p, &[], &mut rng).token, greedy);
            }
        }
    }

    #[test]
    fn top_k_keeps_exactly_the_k_most_likely() {
        let probs = [0.05, 0.3, 0.15, 0.5];
        let p = SamplingParams {
            top_k: 2,
            ..plain()
        };
        let f = frequencies(&ln_probs(&probs), &p, 100_000, SEED);
        assert_close(&f, &[0.0, 0.375, 0.0, 0.625], 0.01);
    }

    #[test]
    fn top_p_keeps_the_minimal_nucleus() {
        // 0.5 + 0.3 reaches 0.8 exactly: the nucleus is {0, 1}, renormalised to 0.625 / 0.375.
        let probs = [0.5, 0.3, 0.15, 0.05];
        let p = SamplingParams {
            top_p: 0.8,
            ..plain()
        };
        let f = frequencies(&ln_probs(&probs), &p, 100_000, SEED);
        assert_eq!((f[2], f[3]), (0.0, 0.0), "{f:?}");
        assert_close(&f, &[0.625, 0.375, 0.0, 0.0], 0.01);

        // Just above: the third token joins.
        let p = SamplingParams {
            top_p: 0.81,
            ..plain()
        };
        let f = frequencies(&ln_probs(&probs), &p, 100_000, SEED);
        assert_eq!(f[3], 0.0);
        assert_close(&f, &normalised(&[0.5, 0.3, 0.15, 0.0]), 0.01);

        // Tiny top_p still keeps one token.
        let p = SamplingParams {
            top_p: 0.01,
            ..plain()
        };
        assert_eq!(
            frequencies(&ln_probs(&probs), &p, 1_000, SEED),
            [1.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    fn top_p_pruning_on_a_large_vocabulary_keeps_the_nucleus() {
        // A peaked head of five tokens and a long flat tail; top-p 0.99 needs the whole head
        // (the first four hold 97.7%). At -10 the tail holds ~0.04% of the mass, so it is pruned
        // before the sort; at -4 it holds ~12% and the nucleus must reach ~46k tokens into it
        // (its tied tokens taken by lower id), so nothing may be pruned.
        for (tail, nucleus) in [(-10.0f32, 5..=5), (-4.0, 6..=50_000)] {
            let mut logits = vec![tail; 50_000];
            for (i, l) in [8.0, 7.5, 7.0, 6.0, 5.0].iter().enumerate() {
                logits[i * 1000 + 3] = *l;
            }
            let params = SamplingParams {
                top_p: 0.99,
                ..plain()
            };
            let want = reference_distribution(&logits, &params, &[]);
            let got = fast_distribution(&mut Sampler::new(), &logits, &params, &[]);
            assert_close(&got, &want, 1e-5);
            let kept = want.iter().filter(|&&p| p > 0.0).count();
            assert!(nucleus.contains(&kept), "tail {tail}: {kept} tokens kept");
        }
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_best() {
        // min_p 0.2 of p_max 0.5 = 0.1: the 0.05 token goes, 0.15 stays.
        let probs = [0.5, 0.3, 0.15, 0.05];
        let p = SamplingParams {
            min_p: 0.2,
            ..plain()
        };
        let f = frequencies(&ln_probs(&probs), &p, 100_000, SEED);
        assert_eq!(f[3], 0.0);
        assert_close(&f, &normalised(&[0.5, 0.3, 0.15, 0.0]), 0.01);
        // min_p 1 keeps only the best.
        let p = SamplingParams {
            min_p: 1.0,
            ..plain()
        };
        assert_eq!(
            frequencies(&ln_probs(&probs), &p, 1_000, SEED),
            [1.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    fn temperature_reshapes_the_distribution() {
        let probs = [0.5, 0.3, 0.15, 0.05];
        let logits = ln_probs(&probs);
        let f1 = frequencies(&logits, &plain(), 100_000, SEED);
        assert_close(&f1, &probs, 0.01);
        // softmax(log p / T) is p^(1/T), renormalised.
        for t in [0.5f32, 2.0] {
            let p = SamplingParams {
                temperature: t,
                ..plain()
            };
            let want = normalised(&probs.map(|x: f64| x.powf(1.0 / f64::from(t))));
            let f = frequencies(&logits, &p, 100_000, SEED + 1);
            assert_close(&f, &want, 0.01);
        }
        // A vanishing temperature is greedy in effect (and must not produce NaN).
        let p = SamplingParams {
            temperature: 1e-30,
            ..plain()
        };
        assert_eq!(frequencies(&logits, &p, 1_000, SEED), [1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn same_seed_same_logits_same_history_same_tokens() {
        let mut rng = Rng::new(1);
        let logits: Vec<f32> = (0..2000).map(|_| rng.next_f32() * 8.0).collect();
        let history: Vec<u32> = (0..100).map(|i| (i * 37 % 2000) as u32).collect();
        let params = SamplingParams {
            temperature: 1.3,
            repetition_penalty: 1.1,
            frequency_penalty: 0.3,
            ..SamplingParams::default()
        };
        let run = |seed: u64| -> Vec<u32> {
            let mut s = Sampler::new();
            let mut rng = Rng::new(seed);
            (0..200)
                .map(|_| s.sample(&logits, &params, &history, &mut rng).token)
                .collect()
        };
        let a = run(77);
        assert_eq!(a, run(77));
        assert_ne!(a, run(78));
        // Not a constant: the draws actually vary.
        assert!(a.iter().any(|&t| t != a[0]));
    }

    #[test]
    fn logprobs_are_the_raw_log_softmax() {
        let logits = [0.0f32, 3.0f32.ln()];
        let params = SamplingParams {
            logprobs: Some(2),
            ..SamplingParams::greedy()
        };
        let mut rng = Rng::new(SEED);
        let out = Sampler::new().sample(&logits, &params, &[], &mut rng);
        assert_eq!(out.token, 1);
        assert!((out.logprob.unwrap() - 0.75f32.ln()).abs() < 1e-6);
        assert_eq!(out.top[0].0, 1);
        assert_eq!(out.top[1].0, 0);
        assert!((out.top[0].1 - 0.75f32.ln()).abs() < 1e-6);
        assert!((out.top[1].1 - 0.25f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn logprobs_sum_to_one_are_ordered_and_ignore_sampling_settings() {
        let logits = [1.0, -2.0, 0.5, 3.0, 0.5, -7.0];
        // Bias forces token 5, which the raw distribution finds very unlikely.
        let params = SamplingParams {
            logprobs: Some(6),
            logit_bias: vec![(5, 100.0)],
            temperature: 0.1,
            repetition_penalty: 1.7,
            ..SamplingParams::default()
        };
        let mut rng = Rng::new(SEED);
        let out = Sampler::new().sample(&logits, &params, &[3, 0], &mut rng);
        assert_eq!(out.token, 5);
        assert_eq!(out.top.len(), 6);
        let total: f64 = out.top.iter().map(|x| f64::from(x.1).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        let ids: Vec<u32> = out.top.iter().map(|x| x.0).collect();
        assert_eq!(
            ids,
            [3, 0, 2, 4, 1, 5],
            "descending, equal logits by lower id"
        );
        assert!(out.top.windows(2).all(|w| w[0].1 >= w[1].1));
        // The chosen token's logprob is its raw one, not the biased one (which would be ~0).
        assert_eq!(out.logprob, Some(out.top[5].1));
        assert!(out.logprob.unwrap() < -9.0);

        // Fewer alternatives: a prefix of the full list.
        let three = SamplingParams {
            logprobs: Some(3),
            ..params.clone()
        };
        let out3 = Sampler::new().sample(&logits, &three, &[3, 0], &mut Rng::new(SEED));
        assert_eq!(out3.top, out.top[..3]);
        // Some(0): the chosen logprob without alternatives; None: neither.
        let zero = SamplingParams {
            logprobs: Some(0),
            ..params.clone()
        };
        let out0 = Sampler::new().sample(&logits, &zero, &[3, 0], &mut Rng::new(SEED));
        assert_eq!((out0.logprob, out0.top.len()), (out.logprob, 0));
        let none = SamplingParams {
            logprobs: None,
            ..params
        };
        let outn = Sampler::new().sample(&logits, &none, &[3, 0], &mut Rng::new(SEED));
        assert_eq!((outn.logprob, outn.top.len()), (None, 0));
    }

    #[test]
    fn logprobs_on_a_large_vocabulary_sum_to_one() {
        let mut rng = Rng::new(5);
        let logits: Vec<f32> = (0..5000).map(|_| rng.next_f32() * 20.0 - 10.0).collect();
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let lse = f64::from(max)
            + logits
                .iter()
                .map(|&l| f64::from(l - max).exp())
                .sum::<f64>()
                .ln();
        let (chosen, top) = raw_logprobs(&logits, 42, 20);
        assert!((f64::from(chosen.unwrap()) - (f64::from(logits[42]) - lse)).abs() < 1e-5);
        let mut sorted: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        sorted.sort_by(by_rank);
        let want: Vec<u32> = sorted[..20].iter().map(|x| x.0).collect();
        let got: Vec<u32> = top.iter().map(|x| x.0).collect();
        assert_eq!(got, want);
    }

    #[test]
    #[should_panic(expected = "logits row is empty")]
    fn empty_logits_panic_with_a_message() {
        Sampler::new().sample(&[], &SamplingParams::default(), &[], &mut Rng::new(0));
    }

    #[test]
    fn draw_walks_the_cumulative_weights() {
        let w = [(7, 1.0), (8, 0.0), (9, 3.0)];
        assert_eq!(draw(&w, 0.0), 7);
        assert_eq!(draw(&w, 0.2499), 7);
        assert_eq!(draw(&w, 0.25), 9);
        assert_eq!(draw(&w, 0.999_999), 9);
        // Rounding past the end lands on the last entry.
        assert_eq!(draw(&w, 1.0), 9);
    }
}
