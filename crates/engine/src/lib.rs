//! Running a model: a single-sequence [`Session`] (the CLI's chat, generate, eval and bench)
//! with its paged KV cache, and the text edge of generation ([`text::TextStream`]).
//!
//! [`Embedder`] turns texts into vectors with an encoder model (the server's embeddings).
//!
//! The continuous-batching engine of the server grows here on the same pieces: the model's
//! flat batch, `ferrolm-kv` block ids, the sampler and the text stream.

pub mod constrain;
pub mod embed;
pub mod engine;
pub mod session;
pub mod speculate;
pub mod text;

pub use embed::{EmbedError, Embedder, Embedding};
pub use engine::{
    spawn, Command, Done, Engine, EngineConfig, EngineError, EngineHandle, EngineStats, ErrorKind,
    Event, Job, Request, Usage,
};
pub use ferrolm_models::Adapter;
pub use session::{
    FinishReason, GenerateOptions, Generation, Session, SessionError, Speculation, TokenEvent,
};
pub use speculate::SpecStats;
pub use text::TextStream;
