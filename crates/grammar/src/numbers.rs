//! Numeric ranges (`minimum`/`maximum`) as grammar alternatives.
//!
//! Contract: [`integer_range`] derives exactly the decimal integers in `[min, max]` (no sign on
//! non-negative values, no leading zeros, no `-0`) that have at most [`MAX_INT_DIGITS`] digits.
//! [`number_range`] derives numbers `int[.frac]` (no exponent) whose value is in `[min, max]` for
//! integer bounds; `-0` may appear when 0 is in range. Either returns no alternatives when nothing
//! fits (the caller reports that).
//!
//! Method: split `[lo, hi]` into runs of the same digit count, then split each run at its first
//! differing digit: `[a0 rest_a, z0 rest_z]` = `a0 [rest_a, 99..]` ∪ `[a0+1 .. z0-1] [0-9]*` ∪
//! `z0 [00.., rest_z]`.

use crate::grammar::{lit, ByteSet, Seq, Sym};
use crate::json::{Json, MAX_INT_DIGITS};
use crate::GrammarError;

fn pow10(d: u32) -> u64 {
    10u64.pow(d)
}

fn ndigits(n: u64) -> u32 {
    n.checked_ilog10().map_or(1, |l| l + 1)
}

/// The largest integer magnitude a grammar number may have.
pub(crate) fn max_magnitude() -> u64 {
    pow10(MAX_INT_DIGITS) - 1
}

/// Appends to `out` the sequences matching every digit string of `a.len()` digits between `a`
/// and `z` inclusive (`a <= z`), each prefixed by `prefix`.
fn same_len(a: &[u8], z: &[u8], prefix: &mut Vec<ByteSet>, out: &mut Vec<Vec<ByteSet>>) {
    let Some((&a0, a_rest)) = a.split_first() else {
        out.push(prefix.clone());
        return;
    };
    let (&z0, z_rest) = z.split_first().unwrap_or((&a0, &[]));
    if a0 == z0 {
        prefix.push(ByteSet::byte(a0));
        same_len(a_rest, z_rest, prefix, out);
        prefix.pop();
        return;
    }
    let n = a_rest.len();
    let (mut full_lo, mut full_hi) = (a0, z0);
    if !a_rest.iter().all(|&c| c == b'0') {
        prefix.push(ByteSet::byte(a0));
        same_len(a_rest, &vec![b'9'; n], prefix, out);
        prefix.pop();
        full_lo = a0 + 1;
    }
    if !z_rest.iter().all(|&c| c == b'9') {
        prefix.push(ByteSet::byte(z0));
        same_len(&vec![b'0'; n], z_rest, prefix, out);
        prefix.pop();
        full_hi = z0 - 1;
    }
    if full_lo <= full_hi {
        let mut seq = prefix.clone();
        seq.push(ByteSet::range(full_lo, full_hi));
        seq.extend(std::iter::repeat_n(ByteSet::range(b'0', b'9'), n));
        out.push(seq);
    }
}

/// The unsigned integers in `[lo, hi]` (`hi` beyond the digit limit or `None`: up to the limit).
pub(crate) fn uint_range(j: &mut Json, lo: u64, hi: Option<u64>) -> Result<Vec<Seq>, GrammarError> {
    let cap = max_magnitude();
    let mut flat = Vec::new();
    let mut alts = Vec::new();
    if lo > cap {
        return Ok(alts);
    }
    match hi.filter(|&h| h <= cap) {
        Some(hi) => {
            if lo > hi {
                return Ok(alts);
            }
            for d in ndigits(lo)..=ndigits(hi) {
                let a = lo.max(if d == 1 { 0 } else { pow10(d - 1) });
                let z = hi.min(pow10(d) - 1);
                same_len(
                    a.to_string().as_bytes(),
                    z.to_string().as_bytes(),
                    &mut Vec::new(),
                    &mut flat,
                );
            }
        }
        None => {
            let d = ndigits(lo);
            same_len(
                lo.to_string().as_bytes(),
                (pow10(d) - 1).to_string().as_bytes(),
                &mut Vec::new(),
                &mut flat,
            );
            if d < MAX_INT_DIGITS {
                // Every longer number: [1-9] then d to MAX_INT_DIGITS - 1 more digits.
                let mut seq = vec![Sym::Bytes(ByteSet::range(b'1', b'9'))];
                seq.extend(std::iter::repeat_n(crate::json::digit(), d as usize));
                seq.push(j.opt_digits(MAX_INT_DIGITS - 1 - d)?);
                alts.push(seq);
            }
        }
    }
    alts.extend(
        flat.into_iter()
            .map(|sets| sets.into_iter().map(Sym::Bytes).collect()),
    );
    Ok(alts)
}

fn negated(alts: Vec<Seq>) -> impl Iterator<Item = Seq> {
    alts.into_iter().map(|seq| {
        let mut s = lit(b"-");
        s.extend(seq);
        s
    })
}

/// The integers in `[min, max]` (see the module contract).
pub(crate) fn integer_range(
    j: &mut Json,
    min: Option<i64>,
    max: Option<i64>,
) -> Result<Vec<Seq>, GrammarError> {
    let mut alts = Vec::new();
    if max.is_none_or(|m| m >= 0) {
        let lo = min.map_or(0, |m| m.max(0).unsigned_abs());
        alts.extend(uint_range(j, lo, max.map(i64::unsigned_abs))?);
    }
    if min.is_none_or(|m| m < 0) {
        // -m for m in [lo, hi], m >= 1.
        let lo = max.map_or(1, |m| if m < 0 { m.unsigned_abs() } else { 1 });
        let hi = min.map(i64::unsigned_abs);
        alts.extend(negated(uint_range(j, lo, hi)?));
    }
    Ok(alts)
}

/// Magnitudes `int[.frac]` with value in `[lo, hi]`.
fn magnitude(j: &mut Json, lo: u64, hi: Option<u64>) -> Result<Vec<Seq>, GrammarError> {
    let frac = Sym::Rule(j.opt_frac()?);
    let with_frac = |alts: Vec<Seq>| -> Vec<Seq> {
        alts.into_iter()
            .map(|mut s| {
                s.push(frac);
                s
            })
            .collect()
    };
    match hi.filter(|&h| h <= max_magnitude()) {
        None => Ok(with_frac(uint_range(j, lo, None)?)),
        Some(hi) if hi < lo => Ok(Vec::new()),
        Some(hi) => {
            // Below hi any fraction; hi itself only with zeros after the point.
            let mut alts = if hi > lo {
                with_frac(uint_range(j, lo, Some(hi - 1))?)
            } else {
                Vec::new()
            };
            let mut exact = lit(hi.to_string().as_bytes());
            exact.push(Sym::Rule(j.opt_zero_frac()?));
            alts.push(exact);
            Ok(alts)
        }
    }
}

/// The numbers in `[min, max]` for integer bounds (see the module contract).
pub(crate) fn number_range(
    j: &mut Json,
    min: Option<i64>,
    max: Option<i64>,
) -> Result<Vec<Seq>, GrammarError> {
    let mut alts = Vec::new();
    if max.is_none_or(|m| m >= 0) {
        let lo = min.map_or(0, |m| m.max(0).unsigned_abs());
        alts.extend(magnitude(j, lo, max.map(i64::unsigned_abs))?);
    }
    if min.is_none_or(|m| m < 0) {
        // -m for m in [lo, hi], m >= 0 (m = 0 only when 0 is in range).
        let lo = max.map_or(0, |m| if m < 0 { m.unsigned_abs() } else { 0 });
        let hi = min.map(i64::unsigned_abs);
        alts.extend(negated(magnitude(j, lo, hi)?));
    }
    Ok(alts)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::grammar::Grammar;
    use crate::Matcher;
    use std::sync::Arc;

    fn grammar(build: impl FnOnce(&mut Json) -> Vec<Seq>) -> Arc<Grammar> {
        let mut j = Json::default();
        let alts = build(&mut j);
        let root = j.b.rule("root", alts).unwrap();
        Arc::new(j.b.finish(root).unwrap())
    }

    fn matches(g: &Arc<Grammar>, text: &str) -> bool {
        let mut m = Matcher::new(g.clone());
        m.accept(text.as_bytes()).is_ok() && m.is_complete()
    }

    #[test]
    fn integer_ranges_match_exactly_their_members() {
        let bounds = [
            (Some(0), Some(0)),
            (Some(-7), Some(13)),
            (Some(5), Some(1234)),
            (Some(-1234), Some(-5)),
            (Some(100), Some(100)),
            (Some(99), Some(1001)),
            (None, Some(-3)),
            (Some(-3), None),
            (Some(10), None),
            (None, None),
        ];
        for (min, max) in bounds {
            let g = grammar(|j| integer_range(j, min, max).unwrap());
            for n in -1500i64..=1500 {
                let want = min.is_none_or(|m| n >= m) && max.is_none_or(|m| n <= m);
                assert_eq!(
                    matches(&g, &n.to_string()),
                    want,
                    "{n} in [{min:?}, {max:?}]"
                );
            }
            for bad in ["-0", "007", "", "-", "1.0"] {
                assert!(!matches(&g, bad), "{bad:?} for [{min:?}, {max:?}]");
            }
        }
    }

    #[test]
    fn unbounded_integers_stop_at_the_digit_limit() {
        let g = grammar(|j| integer_range(j, Some(10), None).unwrap());
        assert!(matches(&g, &max_magnitude().to_string()));
        assert!(!matches(&g, &(max_magnitude() + 1).to_string()));
    }

    #[test]
    fn number_ranges_hold_their_bounds() {
        for (min, max) in [
            (Some(0), Some(1)),
            (Some(-2), Some(3)),
            (Some(-5), Some(-2)),
            (Some(2), None),
            (None, Some(-1)),
        ] {
            let g = grammar(|j| number_range(j, min, max).unwrap());
            for text in [
                "0", "-0", "0.5", "1", "1.0", "1.5", "-1.5", "-2", "-2.0", "-2.01", "2.99", "3",
                "3.0", "3.01", "-5", "-5.0", "-5.1", "-4.99", "2", "100.25", "-0.5", "-1", "-1.0",
                "-0.99",
            ] {
                let v: f64 = text.parse().unwrap();
                let want = min.is_none_or(|m| v >= m as f64) && max.is_none_or(|m| v <= m as f64);
                let got = matches(&g, text);
                // Sound always; complete except that "-0" is offered only when negatives are.
                assert!(!got || want, "{text} accepted outside [{min:?}, {max:?}]");
                if !(text.starts_with('-') && v == 0.0) {
                    assert_eq!(got, want, "{text} in [{min:?}, {max:?}]");
                }
            }
        }
    }
}
