//! Speculative decoding: where the draft tokens a decode step verifies come from.
//!
//! Contract: a proposer guesses up to `k` tokens that follow a sequence's history. The caller
//! (the engine's step, or [`crate::Session::generate`]) runs the sequence's last token and the
//! drafts through the target model in one forward pass, as consecutive tokens of that sequence
//! with logits at every position, then samples position by position exactly as plain decoding
//! would — same sampler, same history, same grammar matcher — and stops at the first position
//! whose token differs from the draft there. Every position it samples yields one output token,
//! so a step yields 1 to `k + 1` tokens, and they are the tokens plain decoding would produce as
//! long as a token's logits do not depend on what else is in the forward pass (ferrolm's default
//! batch-invariant kernels; see `FERROLM_BATCH_INVARIANT` in `ferrolm-models`). The K/V written
//! for rejected drafts is dropped by rolling the sequence's cached length back; those positions
//! are recomputed with the real tokens later, and a block is only filed in the prefix cache once
//! all of its tokens are accepted ones.
//!
//! Only greedy requests draft (temperature 0): with sampling the check above would still give
//! exactly plain decoding's tokens, but drafts are then rarely accepted and verifying them costs
//! compute.
//!
//! Two proposers: [`lookup`] (prompt lookup decoding, Saxena 2023: the tokens that followed the
//! latest earlier occurrence of the history's last n-gram — free, and right whenever the output
//! copies from the prompt) and a small draft model of the same vocabulary run greedily
//! ([`crate::Session::set_draft`], the CLI's `--draft`).

/// Longest suffix n-gram [`lookup`] matches (it tries this length first, then shorter ones).
pub const LOOKUP_MAX_NGRAM: usize = 3;

/// Drafts for `history` by prompt lookup: for n = `max_ngram` down to 1, find the latest earlier
/// occurrence of the history's last n tokens and propose the (up to `k`) tokens that followed
/// it. `out` is cleared first; it stays empty when no suffix n-gram occurs earlier. Returns the
/// length of the n-gram matched (0: none).
pub fn lookup(history: &[u32], max_ngram: usize, k: usize, out: &mut Vec<u32>) -> usize {
    out.clear();
    let len = history.len();
    if k == 0 {
        return 0;
    }
    for n in (1..=max_ngram.min(len.saturating_sub(1))).rev() {
        let suffix = &history[len - n..];
        // Occurrences start at i with i + n < len (at least one token follows); latest first.
        if let Some(i) = (0..len - n).rev().find(|&i| &history[i..i + n] == suffix) {
            let from = i + n;
            out.extend_from_slice(&history[from..(from + k).min(len)]);
            return n;
        }
    }
    0
}

/// A sequence's prompt-lookup proposer: [`lookup`] with a draft length that follows how well
/// drafts have been doing. Each draft costs a token of compute in the verifying pass (on a CPU
/// nearly as much as a token of plain decoding at long context), and one matched on a single
/// common token is rarely right, so a step drafts as many tokens as the n-gram it matched is
/// long, plus the drafts accepted in a row just before: a copy in progress earns longer drafts
/// (up to `k`), a miss starts short again. Measured on the summary of `ferrolm bench`, drafting
/// the full `k` after every match verified 3.7× as many drafts as this for 1.2× the accepted
/// ones, and was slower than no drafts at all.
#[derive(Debug, Clone, Default)]
pub struct Lookup {
    /// Drafts accepted in a row by the latest steps, all of whose drafts were accepted.
    streak: usize,
}

impl Lookup {
    /// Up to `k` drafts to follow `history` in `out` (cleared first).
    pub fn propose(&self, history: &[u32], k: usize, out: &mut Vec<u32>) {
        let matched = lookup(history, LOOKUP_MAX_NGRAM, k, out);
        out.truncate(matched + self.streak);
    }

    /// Record a step's outcome: `drafted` drafts verified, of which `accepted` were accepted.
    pub fn observe(&mut self, drafted: usize, accepted: usize) {
        if drafted > 0 && accepted == drafted {
            self.streak += accepted;
        } else {
            self.streak = 0;
        }
    }
}

/// The most likely token of `logits` (the lowest id on ties), as a draft model proposes.
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draft and acceptance counts, for reporting the acceptance rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpecStats {
    /// Draft tokens checked against the model (those after a stop are not).
    pub drafted: usize,
    /// Of those, tokens accepted (each saved one forward pass).
    pub accepted: usize,
}

impl SpecStats {
    /// `accepted / drafted`, 0 before any draft.
    pub fn acceptance(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drafts(history: &[u32], k: usize) -> Vec<u32> {
        let mut out = vec![99]; // must be cleared
        lookup(history, LOOKUP_MAX_NGRAM, k, &mut out);
        out
    }

    #[test]
    fn proposes_what_followed_the_latest_longest_match() {
        // "1 2 3" occurred at 0 (followed by 4 5) and at 5 (followed by 7 8): the latest wins.
        let h = [1, 2, 3, 4, 5, 1, 2, 3, 7, 8, 9, 1, 2, 3];
        assert_eq!(drafts(&h, 2), vec![7, 8]);
        assert_eq!(drafts(&h, 8), vec![7, 8, 9, 1, 2, 3]);
        // A 3-gram match beats a later 1-gram one: "5 6 7" only at 0, "7" also at 8.
        let h = [5, 6, 7, 1, 2, 0, 0, 0, 7, 4, 5, 6, 7];
        assert_eq!(drafts(&h, 3), vec![1, 2, 0]);
    }

    #[test]
    fn falls_back_to_shorter_ngrams_and_to_nothing() {
        // Only the last token (2) occurred before.
        assert_eq!(drafts(&[2, 7, 9, 2], 4), vec![7, 9, 2]);
        // No earlier occurrence of anything: no drafts.
        assert_eq!(drafts(&[1, 2, 3, 4], 4), Vec::<u32>::new());
        assert_eq!(drafts(&[], 4), Vec::<u32>::new());
        assert_eq!(drafts(&[5], 4), Vec::<u32>::new());
        // k = 0 never drafts.
        assert_eq!(drafts(&[1, 1, 1], 0), Vec::<u32>::new());
        // The latest match of a run is its previous position: one token follows it.
        assert_eq!(drafts(&[1, 1, 1, 1], 2), vec![1]);
    }

    #[test]
    fn lookup_drafts_grow_with_the_match_and_a_run_of_accepted_drafts() {
        let h: Vec<u32> = (0..40).chain(0..3).collect(); // "0 1 2" occurred at 0
        let mut l = Lookup::default();
        let mut out = Vec::new();
        l.propose(&h, 8, &mut out);
        assert_eq!(out, vec![3, 4, 5], "a 3-gram match drafts 3");
        l.observe(3, 3);
        l.propose(&h, 8, &mut out);
        assert_eq!(out, vec![3, 4, 5, 6, 7, 8], "3 + a streak of 3");
        l.observe(6, 6);
        l.propose(&h, 8, &mut out);
        assert_eq!(out.len(), 8, "capped at k");
        l.observe(8, 2);
        l.propose(&h, 8, &mut out);
        assert_eq!(out.len(), 3, "a rejection ends the streak");
        l.observe(0, 0);
        l.propose(&[7, 1, 7], 8, &mut out);
        assert_eq!(out, vec![1], "a 1-gram match drafts 1");
    }

    #[test]
    fn acceptance_rate() {
        assert_eq!(SpecStats::default().acceptance(), 0.0);
        let s = SpecStats {
            drafted: 8,
            accepted: 6,
        };
        assert_eq!(s.acceptance(), 0.75);
    }
}
