//! Turns one row of logits into the next token.
//!
//! Contract: [`Sampler::sample`] is a pure function of `(logits, &SamplingParams, history, Rng
//! state)`: the same inputs give the same token on every run, and the only state it changes is
//! the [`Rng`] it is handed (and its own scratch buffers, which never influence the result). It
//! applies a fixed order of steps:
//!
//! 1. **logit bias**: `SamplingParams::logit_bias` is added to the raw logits;
//! 2. **penalties** over the last `repeat_last_n` tokens of the history: the repetition penalty
//!    (llama.cpp / Hugging Face: a positive logit is divided by it, a negative one multiplied),
//!    then `logit -= count * frequency_penalty + (count > 0) * presence_penalty` (OpenAI);
//! 3. **greedy** when `temperature == 0`: the argmax, lowest id on ties, and no RNG draw;
//! 4. otherwise **temperature**, then **top-k**, **top-p** (the smallest set of most likely tokens
//!    whose probability reaches `top_p`, at least one), **min-p** (probability at least `min_p`
//!    times the largest), both measured on the tempered distribution over the top-k survivors,
//!    then renormalise and **draw** with exactly one [`Rng::next_f64`]. Ties in any ranking go
//!    to the lower token id.
//!
//! The seed lives in the request ([`SamplingParams::seed`]); the caller turns it into the
//! request's [`Rng`] once and keeps that `Rng` with the request (its [`Rng::state`] is what to
//! checkpoint). For an unseeded request the *caller* picks a seed from its own entropy (clock,
//! request counter); nothing in this crate reads the clock.
//!
//! Log-probabilities, when asked for, follow OpenAI and vLLM: they describe the model's own
//! distribution, the log-softmax of the raw logits before bias, penalties and temperature, so
//! they do not depend on the sampling settings.
//!
//! The history is the whole sequence so far (prompt and generated tokens alike); the sampler
//! makes no distinction between the two. A caller who wants OpenAI's "generated tokens only"
//! counting passes just the generated tokens.
//!
//! Non-finite logits: NaN counts as `-inf` (never chosen, unless every token is `-inf`, in which
//! case the lowest id is returned so the sampler always yields a token).

mod params;
mod rng;
mod sampler;

pub use params::{SampleError, SamplingParams, MAX_LOGPROBS, WHOLE_HISTORY};
pub use rng::Rng;
pub use sampler::{Sampled, Sampler};
