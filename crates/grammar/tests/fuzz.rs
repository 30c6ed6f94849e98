//! Random walks through the grammars: every completed document must parse with serde_json and
//! satisfy its schema (checked by the independent validator in `common`), and the fast token mask
//! must agree with the slow `allows` on every token of a synthetic vocabulary, in many states.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{
    check_document, close, grammar, random_walk, schemas, synthetic_vocab, vocab_of, Rng,
};
use ferrolm_grammar::{Grammar, Matcher, Vocab};

#[test]
fn random_byte_walks_give_valid_documents() {
    for (i, (name, schema)) in schemas().into_iter().enumerate() {
        let g = grammar(&schema);
        let mut rng = Rng::new(1000 + i as u64);
        let mut finished = 0;
        for _ in 0..100 {
            let out = random_walk(&g, &mut rng, 150);
            check_document(&out, &schema);
            finished += usize::from(Matcher::new(g.clone()).accept(&out).is_ok());
        }
        assert_eq!(finished, 100, "{name}");
    }
}

/// Picks random allowed tokens (by the mask) until the document finishes, the walk decides to
/// stop at a complete point, or `cap` bytes; then closes it byte by byte.
fn token_walk(
    g: &Arc<Grammar>,
    vocab: &Vocab,
    tokens: &[Vec<u8>],
    rng: &mut Rng,
    cap: usize,
    mut each_state: impl FnMut(&Matcher),
) -> Vec<u8> {
    let mut m = Matcher::new(g.clone());
    let mut out = Vec::new();
    let mut mask = vec![false; vocab.len()];
    while !m.is_finished() && out.len() < cap {
        if m.is_complete() && rng.chance(0.2) {
            return out;
        }
        each_state(&m);
        m.fill_mask(vocab, &mut mask);
        let allowed: Vec<usize> = (0..mask.len()).filter(|&t| mask[t]).collect();
        assert!(
            !allowed.is_empty(),
            "no token allowed after {:?}",
            String::from_utf8_lossy(&out)
        );
        let t = &tokens[*rng.pick(&allowed)];
        m.accept(t).unwrap_or_else(|e| {
            panic!(
                "masked-in token {t:?} rejected after {:?}: {e}",
                String::from_utf8_lossy(&out)
            )
        });
        out.extend_from_slice(t);
    }
    close(&mut m, &mut out, rng);
    out
}

#[test]
fn random_token_walks_give_valid_documents() {
    let tokens = synthetic_vocab(3000, 7);
    let vocab = vocab_of(&tokens);
    for (i, (_, schema)) in schemas().into_iter().enumerate() {
        let g = grammar(&schema);
        let mut rng = Rng::new(2000 + i as u64);
        for _ in 0..60 {
            let out = token_walk(&g, &vocab, &tokens, &mut rng, 200, |_| {});
            check_document(&out, &schema);
        }
    }
}

fn assert_mask_agrees(m: &Matcher, vocab: &Vocab, tokens: &[Option<Vec<u8>>], what: &str) {
    let mut mask = vec![true; vocab.len()];
    m.fill_mask(vocab, &mut mask);
    for (id, t) in tokens.iter().enumerate() {
        let want = t.as_ref().is_some_and(|t| !t.is_empty() && m.allows(t));
        assert_eq!(
            mask[id],
            want,
            "{what}: token {id} {:?}",
            t.as_deref().map(String::from_utf8_lossy)
        );
    }
}

#[test]
fn mask_agrees_with_allows() {
    let tokens = synthetic_vocab(3000, 11);
    // Also special (None) and empty tokens, which are never allowed.
    let mut with_specials: Vec<Option<Vec<u8>>> = tokens.iter().cloned().map(Some).collect();
    with_specials.insert(5, None);
    with_specials.push(Some(Vec::new()));
    with_specials.push(None);
    let vocab = Vocab::new(with_specials.clone());
    let mut states = 0;
    for (i, (name, schema)) in schemas().into_iter().enumerate() {
        let g = grammar(&schema);
        let mut rng = Rng::new(3000 + i as u64);
        for _ in 0..8 {
            let mut step = 0;
            token_walk(
                &g,
                &vocab,
                &with_specials
                    .iter()
                    .map(|t| t.clone().unwrap_or_default())
                    .collect::<Vec<_>>(),
                &mut rng,
                120,
                |m| {
                    if step % 3 == 0 {
                        assert_mask_agrees(m, &vocab, &with_specials, name);
                        states += 1;
                    }
                    step += 1;
                },
            );
        }
    }
    assert!(states > 400, "only {states} states compared");
}

#[test]
fn tokens_may_split_utf8_characters() {
    let tokens: Vec<Option<Vec<u8>>> = vec![
        Some(b"\"\xC3".to_vec()),
        Some(b"\xA9\"".to_vec()),
        Some(b"\xA9".to_vec()),
        Some(b"\"".to_vec()),
        Some(b"\xE4\xB8".to_vec()),
        Some(b"\xAD".to_vec()),
        Some(b"\xC3\xA9".to_vec()),
    ];
    let vocab = Vocab::new(tokens.clone());
    let g = Arc::new(Grammar::json_schema(&serde_json::json!({"type": "string"})).unwrap());
    let mut m = Matcher::new(g);
    let mask = |m: &Matcher| {
        let mut mask = vec![false; vocab.len()];
        m.fill_mask(&vocab, &mut mask);
        mask
    };
    assert_eq!(mask(&m), [true, false, false, true, false, false, false]);
    m.accept(b"\"\xC3").unwrap();
    // Any continuation byte completes the character (`\xA9`: é, `\xAD`: í).
    assert_eq!(mask(&m), [false, true, true, false, false, true, false]);
    m.accept(b"\xA9").unwrap();
    assert_eq!(mask(&m), [false, false, false, true, true, false, true]);
    m.accept(b"\xE4\xB8").unwrap();
    // One continuation byte completes the character; `\xA9"` also closes the string after it.
    assert_eq!(mask(&m), [false, true, true, false, false, true, false]);
    m.accept(b"\xAD\"").unwrap();
    assert!(m.is_finished());
    assert_eq!(mask(&m), [false; 7]);
}

#[test]
#[ignore = "prints sample documents for eyeballing"]
fn print_samples() {
    let tokens = synthetic_vocab(3000, 7);
    let vocab = vocab_of(&tokens);
    for (i, (name, schema)) in schemas().into_iter().enumerate() {
        let g = grammar(&schema);
        let mut rng = Rng::new(99 + i as u64);
        println!("== {name}");
        for _ in 0..3 {
            println!(
                "bytes:  {:?}",
                String::from_utf8_lossy(&random_walk(&g, &mut rng, 150))
            );
            println!(
                "tokens: {:?}",
                String::from_utf8_lossy(&token_walk(&g, &vocab, &tokens, &mut rng, 200, |_| {}))
            );
        }
    }
}
