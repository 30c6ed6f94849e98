//! Constrained decoding: JSON schemas, "any JSON object" and forced tool calls compiled to a
//! byte-level context-free grammar, and a matcher that tells the sampler which tokens may come
//! next.
//!
//! Contract:
//!
//! - A [`Grammar`] is compiled once per request shape and is immutable (`Send + Sync`). Every byte
//!   string it accepts *completely* is valid JSON (UTF-8, parsed by `serde_json`) that satisfies
//!   the schema it came from. A schema keyword that the grammar cannot enforce is never ignored:
//!   compiling fails with [`GrammarError::Unsupported`] (or [`GrammarError::Combination`]) naming
//!   the keyword and its JSON-pointer path. [`Grammar::json_schema`] lists what is supported and
//!   where the grammar is stricter than the schema (`oneOf` is compiled as `anyOf`, for one).
//! - A [`Matcher`] is the per-request state. It works on bytes, not characters: a token of a
//!   byte-level BPE vocabulary may end in the middle of a UTF-8 character and the matcher follows.
//!   [`Matcher::fill_mask`] marks exactly the tokens of a [`Vocab`] whose bytes
//!   [`Matcher::allows`] (both are sound; they can differ only past the stack cap that a grammar
//!   ambiguous at every nesting level reaches, see `matcher::MAX_STACKS`); [`Matcher::accept`]
//!   advances. Once [`Matcher::is_complete`] the output is
//!   a whole document and the caller may stop; once [`Matcher::is_finished`] it must.
//! - Every state a matcher can reach can still be completed (rules that could never finish are
//!   pruned at compile time), so generation ends only by completing the grammar or by the caller's
//!   own token limit; [`Matcher::min_bytes_to_complete`] tells how close the nearest end is.
//! - Whitespace between JSON tokens is bounded (nothing, one space or tab, or a newline and up to
//!   20 spaces or tabs), numbers have at most 15 integer digits, 15 fraction digits and a 2-digit
//!   exponent, so a small model cannot loop forever on padding or digits. The document itself has
//!   no leading or trailing whitespace.
//!
//! The engine is in the style of llama.cpp's grammar sampler: rules are alternatives of sequences
//! of byte sets and rule references; the matcher's state is a set of stacks of grammar positions;
//! a byte filters the stacks whose top accepts it and expands rule references until every stack
//! top is a byte set again. Stacks are hash-consed, so equal stacks are one value and the set stays
//! small. `fill_mask` walks a byte trie of the vocabulary and memoises (state, byte) → state, so
//! each distinct state is expanded once per call.

mod error;
mod grammar;
mod json;
mod matcher;
mod numbers;
mod schema;
mod tools;
mod vocab;

pub use error::GrammarError;
pub use grammar::Grammar;
pub use matcher::Matcher;
pub use tools::ToolSpec;
pub use vocab::Vocab;
