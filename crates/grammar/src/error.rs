//! The one error type of this crate. Schema errors carry the JSON-pointer path (`#/properties/x`)
//! of the schema at fault; every message says what to change.

/// The JSON Schema keywords and formats this crate can enforce, quoted in error messages so that
/// the reader knows what to rewrite the schema with.
pub(crate) const SUPPORTED: &str = "type, enum, const, properties, required, \
additionalProperties, items, prefixItems, minItems, maxItems, minLength, maxLength, minimum, \
maximum, exclusiveMinimum, exclusiveMaximum (integers; numbers with integer bounds), anyOf, oneOf \
(as anyOf), allOf with one entry, $ref to #/..., nullable, format date/time/date-time/uuid; \
annotations such as title and description are ignored";

#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    /// A keyword (or keyword value) that constrains documents in a way the grammar cannot enforce.
    #[error(
        "unsupported JSON Schema keyword \"{keyword}\" at {path}: constrained decoding cannot \
         enforce it, and it will not be silently ignored; remove it from the schema (describe the \
         constraint in the prompt instead). Supported: {SUPPORTED}"
    )]
    Unsupported { keyword: String, path: String },

    /// A keyword that is supported on its own but not next to another one in the same schema.
    #[error(
        "JSON Schema keyword \"{keyword}\" next to \"{with}\" at {path} is not supported: move \
         \"{keyword}\" into each branch of \"{with}\", or remove it"
    )]
    Combination {
        keyword: String,
        with: String,
        path: String,
    },

    /// The schema is malformed, contradictory, or admits no finite document.
    #[error("invalid JSON Schema at {path}: {message}")]
    InvalidSchema { path: String, message: String },

    /// A bound (maxItems, maxLength, ...) so large that the grammar would not fit in memory.
    #[error(
        "the schema at {path} needs a grammar larger than {limit} symbols: lower its \
         minItems/maxItems/minLength/maxLength or split the schema"
    )]
    TooLarge { path: String, limit: usize },

    /// [`crate::Matcher::accept`] was given a byte the grammar does not allow there.
    #[error(
        "byte {byte:#04x} at offset {offset} of the given bytes is not allowed by the grammar \
         (after {position} accepted bytes{finished}): sample only tokens that Matcher::fill_mask \
         allows",
        finished = if *finished { ", when the document was already finished" } else { "" }
    )]
    Rejected {
        /// The offending byte.
        byte: u8,
        /// Its offset within the bytes passed to `accept`.
        offset: usize,
        /// Bytes the matcher had accepted before this call.
        position: usize,
        /// The document was already finished: no byte at all may follow.
        finished: bool,
    },
}
