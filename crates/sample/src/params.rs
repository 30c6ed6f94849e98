//! What a request asks of the sampler, its defaults, and its validation.
//!
//! Contract: [`SamplingParams`] is plain data that travels with the request (the seed included).
//! [`SamplingParams::validate`] is called once, where the request enters the engine, and accepts
//! exactly the values the sampler gives a meaning to; every rejection names the field, the value
//! and the allowed range. The sampler itself never fails on validated params.

/// The most alternatives a request may ask for with [`SamplingParams::logprobs`] (OpenAI's cap).
pub const MAX_LOGPROBS: usize = 20;

/// The [`SamplingParams::repeat_last_n`] value that makes the penalty window the whole history
/// passed to the sampler (llama.cpp spells this `-1`).
pub const WHOLE_HISTORY: usize = usize::MAX;

/// How to turn one row of logits into a token. Each field documents its "off" value.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature. `0` means greedy (argmax, no RNG draw); otherwise finite and `> 0`.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens. `0` = off.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability sums to at
    /// least `top_p`. In `(0, 1]`; `1` = off.
    pub top_p: f32,
    /// Keep only tokens whose probability is at least `min_p` times the most likely token's.
    /// In `[0, 1]`; `0` = off.
    pub min_p: f32,
    /// llama.cpp / Hugging Face repetition penalty for every token present in the penalty window:
    /// a positive logit is divided by it, a negative one multiplied. `> 0`; `1` = off.
    pub repetition_penalty: f32,
    /// The penalty window: the last `repeat_last_n` tokens of the history. `0` = no window (all
    /// three penalties off); [`WHOLE_HISTORY`] = the whole history.
    pub repeat_last_n: usize,
    /// OpenAI frequency penalty: `logit -= count * frequency_penalty`, where `count` is how often
    /// the token occurs in the penalty window. In `[-2, 2]`; `0` = off.
    pub frequency_penalty: f32,
    /// OpenAI presence penalty: `logit -= presence_penalty` once for every token that occurs in
    /// the penalty window. In `[-2, 2]`; `0` = off.
    pub presence_penalty: f32,
    /// `(token, bias)` pairs added to the raw logits before anything else. `-inf` (or, as with
    /// OpenAI, `-100`) bans a token; `+100` all but forces it. A token listed twice gets both.
    pub logit_bias: Vec<(u32, f32)>,
    /// The request's seed. The sampler takes an [`crate::Rng`], never this field: the caller
    /// builds the request's `Rng` from it once (or, when `None`, from its own entropy, and should
    /// then store the seed it picked so the generation can be replayed).
    pub seed: Option<u64>,
    /// `None`: no log-probabilities. `Some(n)`: report the chosen token's log-probability and the
    /// `n` most likely alternatives (`0..=`[`MAX_LOGPROBS`]); OpenAI's `logprobs: true,
    /// top_logprobs: n`.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    /// llama.cpp's defaults: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, penalties off
    /// (with a 64-token window ready for when a repetition penalty is set), no bias, no seed, no
    /// logprobs.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Plain greedy decoding: temperature 0 and every filter and penalty off.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            logprobs: None,
        }
    }

    /// Whether these params decode greedily (temperature 0): the sampler then takes the argmax
    /// after bias and penalties and does not touch the RNG.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every field against the range the sampler gives a meaning to, for a model whose
    /// vocabulary has `vocab_size` tokens (the length of a logits row).
    ///
    /// # Errors
    /// The first offending field, as a [`SampleError`] whose message names the field, the value
    /// and the allowed range.
    pub fn validate(&self, vocab_size: usize) -> Result<(), SampleError> {
        let t = self.temperature;
        if !(t == 0.0 || (t > 0.0 && t.is_finite())) {
            return Err(SampleError::Temperature { value: t });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SampleError::TopP { value: self.top_p });
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(SampleError::MinP { value: self.min_p });
        }
        let rp = self.repetition_penalty;
        if !(rp > 0.0 && rp.is_finite()) {
            return Err(SampleError::RepetitionPenalty { value: rp });
        }
        for (field, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(SampleError::Penalty { field, value });
            }
        }
        for &(token, bias) in &self.logit_bias {
            if token as usize >= vocab_size {
                return Err(SampleError::LogitBiasToken { token, vocab_size });
            }
            // +inf would make the softmax inf/inf = NaN; NaN would poison the row.
            if !(bias.is_finite() || bias == f32::NEG_INFINITY) {
                return Err(SampleError::LogitBiasValue { token, value: bias });
            }
        }
        if let Some(n) = self.logprobs {
            if n > MAX_LOGPROBS {
                return Err(SampleError::Logprobs {
                    value: n,
                    max: MAX_LOGPROBS,
                });
            }
        }
        Ok(())
    }
}

/// Everything that can go wrong in this crate; each message says how to fix it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SampleError {
    /// `temperature` is negative, NaN or infinite.
    #[error(
        "temperature = {value} is invalid: allowed is 0 (greedy) or a finite value > 0 \
         (typically 0.1 to 2)"
    )]
    Temperature {
        /// The rejected value.
        value: f32,
    },
    /// `top_p` is outside `(0, 1]`.
    #[error(
        "top_p = {value} is outside the allowed range (0, 1]: use 1 to turn nucleus sampling \
         off, or e.g. 0.95"
    )]
    TopP {
        /// The rejected value.
        value: f32,
    },
    /// `min_p` is outside `[0, 1]`.
    #[error(
        "min_p = {value} is outside the allowed range [0, 1]: use 0 to turn min-p off, or e.g. \
         0.05"
    )]
    MinP {
        /// The rejected value.
        value: f32,
    },
    /// `repetition_penalty` is not a finite value `> 0`.
    #[error(
        "repetition_penalty = {value} is outside the allowed range (0, inf): use 1 to turn it \
         off; values above 1 (e.g. 1.1) discourage repeats"
    )]
    RepetitionPenalty {
        /// The rejected value.
        value: f32,
    },
    /// `frequency_penalty` or `presence_penalty` is outside `[-2, 2]`.
    #[error(
        "{field} = {value} is outside the allowed range [-2, 2] (OpenAI's): use 0 to turn it \
         off; positive values discourage repeats"
    )]
    Penalty {
        /// `"frequency_penalty"` or `"presence_penalty"`.
        field: &'static str,
        /// The rejected value.
        value: f32,
    },
    /// A `logit_bias` token id is not in the vocabulary.
    #[error(
        "logit_bias names token {token}, but the vocabulary has {vocab_size} tokens (allowed ids \
         0..{vocab_size}): fix or remove that entry"
    )]
    LogitBiasToken {
        /// The out-of-range token id.
        token: u32,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// A `logit_bias` value is NaN or `+inf`.
    #[error(
        "logit_bias for token {token} is {value}: allowed is a finite value or -inf; use 100 to \
         force a token and -100 or -inf to ban it"
    )]
    LogitBiasValue {
        /// The token the bias is for.
        token: u32,
        /// The rejected bias.
        value: f32,
    },
    /// `logprobs` asks for more alternatives than [`MAX_LOGPROBS`].
    #[error(
        "logprobs = {value} is outside the allowed range 0..={max}: ask for at most {max} \
         alternatives"
    )]
    Logprobs {
        /// The rejected count.
        value: usize,
        /// The largest allowed count, [`MAX_LOGPROBS`].
        max: usize,
    },
    /// [`crate::Rng::from_state`] was given the all-zero state.
    #[error(
        "the RNG state is all-zero, which xoshiro256** can never leave and Rng::new never \
         produces: the saved state is corrupt; restore it from the request's seed with Rng::new"
    )]
    RngState,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const VOCAB: usize = 100;

    fn rejects(p: SamplingParams, needles: &[&str]) -> SampleError {
        let err = p
            .validate(VOCAB)
            .expect_err("these params must be rejected");
        let msg = err.to_string();
        for n in needles {
            assert!(msg.contains(n), "message {msg:?} lacks {n:?}");
        }
        err
    }

    #[test]
    fn defaults_and_greedy_are_valid() {
        SamplingParams::default().validate(VOCAB).unwrap();
        SamplingParams::greedy().validate(VOCAB).unwrap();
        assert!(SamplingParams::greedy().is_greedy());
        assert!(!SamplingParams::default().is_greedy());
        let d = SamplingParams::default();
        assert_eq!(
            (d.temperature, d.top_k, d.top_p, d.min_p),
            (0.8, 40, 0.95, 0.05)
        );
    }

    #[test]
    fn temperature_must_be_zero_or_positive_finite() {
        for t in [-0.1, f32::NAN, f32::INFINITY] {
            let p = SamplingParams {
                temperature: t,
                ..SamplingParams::default()
            };
            let e = rejects(p, &["temperature", &t.to_string(), "0 (greedy)", "> 0"]);
            assert!(matches!(e, SampleError::Temperature { .. }));
        }
        for t in [0.0, 1e-6, 5.0] {
            let p = SamplingParams {
                temperature: t,
                ..SamplingParams::default()
            };
            p.validate(VOCAB).unwrap();
        }
    }

    #[test]
    fn top_p_must_be_in_half_open_unit_interval() {
        for v in [0.0, -0.5, 1.01, f32::NAN] {
            let p = SamplingParams {
                top_p: v,
                ..SamplingParams::default()
            };
            let e = rejects(p, &["top_p", &v.to_string(), "(0, 1]"]);
            assert!(matches!(e, SampleError::TopP { .. }));
        }
        let p = SamplingParams {
            top_p: 1.0,
            ..SamplingParams::default()
        };
        p.validate(VOCAB).unwrap();
    }

    #[test]
    fn min_p_must_be_in_unit_interval() {
        for v in [-0.01, 1.5, f32::NAN] {
            let p = SamplingParams {
                min_p: v,
                ..SamplingParams::default()
            };
            let e = rejects(p, &["min_p", &v.to_string(), "[0, 1]"]);
            assert!(matches!(e, SampleError::MinP { .. }));
        }
        for v in [0.0, 1.0] {
            let p = SamplingParams {
                min_p: v,
                ..SamplingParams::default()
            };
            p.validate(VOCAB).unwrap();
        }
    }

    #[test]
    fn repetition_penalty_must_be_positive() {
        for v in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let p = SamplingParams {
                repetition_penalty: v,
                ..SamplingParams::default()
            };
            let e = rejects(p, &["repetition_penalty", &v.to_string(), "(0, inf)"]);
            assert!(matches!(e, SampleError::RepetitionPenalty { .. }));
        }
    }

    #[test]
    fn openai_penalties_must_be_in_range() {
        let p = SamplingParams {
            frequency_penalty: 2.5,
            ..SamplingParams::default()
        };
        rejects(p, &["frequency_penalty", "2.5", "[-2, 2]"]);
        let p = SamplingParams {
            presence_penalty: -2.1,
            ..SamplingParams::default()
        };
        rejects(p, &["presence_penalty", "-2.1", "[-2, 2]"]);
        let p = SamplingParams {
            presence_penalty: f32::NAN,
            ..SamplingParams::default()
        };
        rejects(p, &["presence_penalty", "NaN"]);
        let p = SamplingParams {
            frequency_penalty: -2.0,
            presence_penalty: 2.0,
            ..SamplingParams::default()
        };
        p.validate(VOCAB).unwrap();
    }

    #[test]
    fn logit_bias_ids_and_values_are_checked() {
        let p = SamplingParams {
            logit_bias: vec![(3, 1.0), (100, -100.0)],
            ..SamplingParams::default()
        };
        let e = rejects(p, &["logit_bias", "token 100", "100 tokens", "0..100"]);
        assert!(matches!(
            e,
            SampleError::LogitBiasToken {
                token: 100,
                vocab_size: VOCAB
            }
        ));
        for v in [f32::NAN, f32::INFINITY] {
            let p = SamplingParams {
                logit_bias: vec![(5, v)],
                ..SamplingParams::default()
            };
            let e = rejects(p, &["logit_bias", "token 5", &v.to_string(), "-inf"]);
            assert!(matches!(e, SampleError::LogitBiasValue { token: 5, .. }));
        }
        let p = SamplingParams {
            logit_bias: vec![(99, f32::NEG_INFINITY), (0, 100.0), (1, -100.0)],
            ..SamplingParams::default()
        };
        p.validate(VOCAB).unwrap();
    }

    #[test]
    fn logprobs_are_capped() {
        let p = SamplingParams {
            logprobs: Some(21),
            ..SamplingParams::default()
        };
        let e = rejects(p, &["logprobs", "21", "0..=20"]);
        assert!(matches!(e, SampleError::Logprobs { value: 21, max: 20 }));
        for n in [0, 20] {
            let p = SamplingParams {
                logprobs: Some(n),
                ..SamplingParams::default()
            };
            p.validate(VOCAB).unwrap();
        }
    }
}
