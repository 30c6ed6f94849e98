//! Who may use the server, how fast, at what cost: API keys, rate limits, budgets, the usage
//! ledger and the price catalog.
//!
//! - [`Store`]: one SQLite file (`ferrolm.db`) in the server's data dir holding the keys (only
//!   a hash of each secret) and the append-only usage ledger, with a running spend per key for
//!   budget checks. Shared by the server and the `ferrolm keys` / `ferrolm usage` commands.
//!   Or a PostgreSQL database ([`StoreUrl`]) that several servers share, which then also keeps
//!   the rate limits and budget holds ([`Store::admit`]).
//! - [`RateLimiter`]: per-key requests-per-minute and tokens-per-minute over sliding 60-second
//!   windows, in memory, producing OpenAI's `x-ratelimit-*` headers.
//! - [`Budgets`]: money reserved by each key's requests in flight, so concurrent requests
//!   cannot spend past a budget by more than one request.
//! - [`PriceCatalog`]: list prices per 1M tokens (builtin `prices.toml`, optionally merged with
//!   a user file), [`ModelPrice::cost_usd`] for one request, [`ModelPrice::estimate`] for a
//!   month of a [`Workload`] (prompt caching, compression), and [`SelfHosted`]'s breakeven
//!   against hosted prices.
//!
//! - Files and fine-tuning jobs (`tuning`): what `/v1/files` and `/v1/fine_tuning/jobs` keep,
//!   in the same database, scoped by key.
//! - Stored chat completions (`completions`): what `store: true` keeps, scoped by key, and
//!   their fine-tuning lines for `ferrolm data export --stored`.
//!
//! Nothing here knows about HTTP or the engine: the server decides when to verify, admit,
//! record and settle.

mod budget;
mod completions;
mod error;
mod limits;
mod pg;
mod prices;
mod responses;
mod store;
pub mod time;
mod tuning;

pub use budget::{Budgets, OverBudget, Reservation};
pub use completions::{
    check_metadata, sft_lines, CompletionQuery, CompletionRecord, Metadata, Owner,
    MAX_METADATA_KEY_CHARS, MAX_METADATA_PAIRS, MAX_METADATA_VALUE_CHARS,
};
pub use error::AccountingError;
pub use limits::{format_reset, Headroom, LimitKind, Limited, RateLimiter, Window, WINDOW};
pub use pg::{Admission, Refusal, CALL_TIMEOUT, STEP_TIMEOUT};
pub use prices::{
    Estimate, ModelPrice, PriceCatalog, PriceTier, PromptCache, SelfHosted, Workload,
    BUILTIN_PRICES, HOURS_PER_MONTH, PRICE_FORMAT,
};
pub use responses::ResponseRecord;
pub use store::{
    GroupBy, KeyInfo, KeyListing, KeySpec, NewKey, Store, StoreUrl, UsageGroup, UsageQuery,
    UsageRow, DB_FILE, KEY_PREFIX, NO_KEY, SCHEMA_VERSION,
};
pub use tuning::{Claim, FileRecord, JobCheckpoint, JobEvent, JobRecord, Page};
