//! A small, seedable, fast PRNG: xoshiro256** (Blackman and Vigna) seeded through splitmix64.
//!
//! Contract: the stream is a pure function of the seed, the same on every platform, and its full
//! state is four `u64` words ([`Rng::state`] / [`Rng::from_state`]), so a checkpoint or a
//! preempted request can resume the exact stream. This module never reads the clock or any other
//! entropy: an unseeded request gets its seed from the *caller* (for example the clock mixed with
//! a request counter), which should then record that seed so the generation can be replayed.
//!
//! It is not cryptographically secure and is not meant to be.

use crate::SampleError;

/// A xoshiro256** generator. Cheap to copy: 32 bytes of state, no heap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

/// One step of splitmix64: advances `state` and returns a well-mixed word. Used only to expand a
/// `u64` seed into the four state words, as the xoshiro authors recommend.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator whose stream is fully determined by `seed`. Every seed (0 included) gives a
    /// valid, non-zero state: splitmix64 never yields four zero words in a row.
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Self { s }
    }

    /// Rebuilds a generator from words previously returned by [`Rng::state`]; the stream then
    /// continues exactly where it was saved.
    ///
    /// # Errors
    /// [`SampleError::RngState`] for the all-zero state, which xoshiro can never leave (it would
    /// emit zeros forever) and which [`Rng::new`] never produces, so it means corrupt saved data.
    pub fn from_state(state: [u64; 4]) -> Result<Self, SampleError> {
        if state == [0; 4] {
            return Err(SampleError::RngState);
        }
        Ok(Self { s: state })
    }

    /// The full generator state, for saving next to the request or in a training checkpoint.
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    /// The next 64 uniformly distributed bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 24 bits of resolution (every value is a multiple of 2^-24).
    /// Consumes one [`Rng::next_u64`].
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in `[0, 1)` with 53 bits of resolution (every value is a multiple of 2^-53).
    /// Consumes one [`Rng::next_u64`]. The sampler draws with this one so that tokens with tiny
    /// probabilities are not rounded away.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_vector() {
        // First outputs of splitmix64 from state 0 (Vigna's splitmix64.c).
        let mut s = 0u64;
        assert_eq!(splitmix64(&mut s), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64(&mut s), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(splitmix64(&mut s), 0x06c4_5d18_8009_454f);
    }

    #[test]
    fn xoshiro256starstar_matches_the_reference_vector() {
        // State {1, 2, 3, 4}: outputs of the reference xoshiro256starstar.c, as also used by the
        // rand_xoshiro crate's tests.
        let mut r = Rng::from_state([1, 2, 3, 4]).unwrap();
        let expected: [u64; 10] = [
            11520,
            0,
            1509978240,
            1215971899390074240,
            1216172134540287360,
            607988272756665600,
            16172922978634559625,
            8476171486693032832,
            10595114339597558777,
            2904607092377533576,
        ];
        for e in expected {
            assert_eq!(r.next_u64(), e);
        }
    }

    #[test]
    fn same_seed_same_stream_different_seed_different_stream() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        let mut c = Rng::new(43);
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..100).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }

    #[test]
    fn state_round_trip_resumes_the_exact_stream() {
        let mut a = Rng::new(7);
        for _ in 0..37 {
            a.next_u64();
        }
        let saved = a.state();
        let tail: Vec<u64> = (0..50).map(|_| a.next_u64()).collect();
        let mut b = Rng::from_state(saved).unwrap();
        let resumed: Vec<u64> = (0..50).map(|_| b.next_u64()).collect();
        assert_eq!(tail, resumed);
    }

    #[test]
    fn zero_state_is_rejected() {
        let err = Rng::from_state([0; 4]).unwrap_err();
        assert!(matches!(err, SampleError::RngState));
        assert!(err.to_string().contains("all-zero"));
    }

    #[test]
    fn floats_are_in_the_unit_interval_and_roughly_uniform() {
        let mut r = Rng::new(1);
        let n = 200_000;
        let mut sum32 = 0.0f64;
        let mut sum64 = 0.0f64;
        for _ in 0..n {
            let x = r.next_f32();
            let y = r.next_f64();
            assert!((0.0..1.0).contains(&x), "{x}");
            assert!((0.0..1.0).contains(&y), "{y}");
            sum32 += f64::from(x);
            sum64 += y;
        }
        // Mean of U[0,1) is 0.5 with standard error 0.29 / sqrt(n) ~ 0.00065.
        assert!((sum32 / n as f64 - 0.5).abs() < 0.005);
        assert!((sum64 / n as f64 - 0.5).abs() < 0.005);
    }

    #[test]
    fn float_extremes_stay_below_one() {
        // The largest u64 must map strictly below 1.0 in both widths.
        let top32 = (u64::MAX >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
        let top64 = (u64::MAX >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        assert!(top32 < 1.0);
        assert!(top64 < 1.0);
    }
}
