//! Grammar-constrained sampling, shared by the engine and the single-sequence session.
//!
//! Contract: [`sample`] returns a token the request's [`Matcher`] allows (an end-of-turn id only
//! once the grammar is complete). It first samples from the unmasked logits and keeps the token
//! when the grammar allows it — the common case, one trie-free byte check — and only otherwise
//! builds the full mask over the vocabulary and samples again from the masked logits. This is
//! rejection sampling, so the chosen token's distribution is the masked one either way. The
//! caller then feeds the token's bytes to [`Matcher::accept`] and ends the request once
//! [`Matcher::is_finished`].

use ferrolm_grammar::{Matcher, Vocab};
use ferrolm_sample::{Rng, Sampled, Sampler, SamplingParams};
use ferrolm_tokenizer::Tokenizer;

/// The vocabulary as the grammar sees it: each token's bytes, `None` for special tokens (which
/// a grammar never produces; end-of-turn ids are handled by [`sample`]).
pub fn grammar_vocab(tok: &Tokenizer) -> Vocab {
    Vocab::new(
        (0..tok.vocab_size() as u32)
            .map(|id| (!tok.is_special(id)).then(|| tok.token_bytes(id).to_vec()))
            .collect(),
    )
}

/// Buffers reused between calls.
#[derive(Default)]
pub struct MaskScratch {
    allowed: Vec<bool>,
    logits: Vec<f32>,
}

fn allows(m: &Matcher, vocab: &Vocab, tok: &Tokenizer, end_ids: &[u32], id: u32) -> bool {
    if end_ids.contains(&id) {
        return m.is_complete();
    }
    (id as usize) < vocab.len() && !tok.is_special(id) && m.allows(tok.token_bytes(id))
}

/// Sample one token of `logits`, within `grammar` when there is one.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    sampler: &mut Sampler,
    logits: &[f32],
    params: &SamplingParams,
    history: &[u32],
    rng: &mut Rng,
    grammar: Option<(&Matcher, &Vocab)>,
    tok: &Tokenizer,
    end_ids: &[u32],
    scratch: &mut MaskScratch,
) -> Result<Sampled, String> {
    let first = sampler.sample(logits, params, history, rng);
    let Some((m, vocab)) = grammar else {
        return Ok(first);
    };
    if allows(m, vocab, tok, end_ids, first.token) {
        return Ok(first);
    }
    scratch.allowed.clear();
    scratch.allowed.resize(vocab.len(), false);
    m.fill_mask(vocab, &mut scratch.allowed);
    let complete = m.is_complete();
    for &e in end_ids {
        if let Some(a) = scratch.allowed.get_mut(e as usize) {
            *a = complete;
        }
    }
    scratch.logits.clear();
    scratch
        .logits
        .extend(logits.iter().enumerate().map(|(i, &l)| {
            if scratch.allowed.get(i).copied().unwrap_or(false) {
                l
            } else {
                f32::NEG_INFINITY
            }
        }));
    if !scratch.logits.iter().any(|l| l.is_finite()) {
        return Err(
            "the output grammar allows no token here (the model's vocabulary cannot spell what the schema requires)"
                .into(),
        );
    }
    let s = sampler.sample(&scratch.logits, params, history, rng);
    if allows(m, vocab, tok, end_ids, s.token) {
        Ok(s)
    } else {
        // Only reachable if a logit bias or penalty turned every allowed logit into -inf.
        Err(format!(
            "the sampler chose token {} outside the output grammar: remove logit_bias entries that forbid every allowed token",
            s.token
        ))
    }
}
