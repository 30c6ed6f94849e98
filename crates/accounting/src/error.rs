//! The one error type of this crate. Every message says what was wrong and how to fix it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AccountingError {
    #[error("cannot create the data directory {}: {source}; pass a writable --data-dir or set FERROLM_HOME", path.display())]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{}: {source} (is it a ferrolm database, and is the disk writable?)", path.display())]
    Db {
        path: PathBuf,
        source: rusqlite::Error,
    },

    #[error("{}: schema version {found}, but this ferrolm knows versions up to {supported}: it was written by a newer ferrolm; upgrade ferrolm, or use another --data-dir", path.display())]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },

    #[error("`{0}` is not a store URL: give sqlite:PATH (the database file; the default is DATA_DIR/ferrolm.db) or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE")]
    BadStoreUrl(String),

    #[error("the store {store} cannot be reached ({message}): check that PostgreSQL runs and accepts connections; requests resume by themselves once it does")]
    StoreUnavailable { store: String, message: String },

    #[error("the store {store} failed: {message}")]
    Postgres { store: String, message: String },

    #[error("this store operation has no PostgreSQL version (a bug: please report it); a sqlite: --store (the default) runs it")]
    NotInPostgres,

    #[error("rate limits and budgets are kept in the store only when it is shared (postgres://); a SQLite store's server keeps them in memory")]
    NotShared,

    #[error("cannot read random bytes from /dev/urandom to make a key: {0}")]
    Random(std::io::Error),

    #[error("invalid {field} for the key: {message}")]
    InvalidKeySpec {
        field: &'static str,
        message: String,
    },

    #[error(
        "an active key is already named `{0}`: pick another name, or revoke the old key first"
    )]
    DuplicateName(String),

    #[error("no key has the name or id `{0}`; `ferrolm keys list` shows the keys")]
    UnknownKey(String),

    #[error("`{query}` matches several keys (ids {ids}): use the id instead")]
    AmbiguousKey { query: String, ids: String },

    #[error("key `{name}` (id {id}) is already revoked")]
    AlreadyRevoked { name: String, id: i64 },

    #[error("invalid usage row for request `{request_id}`: {message}")]
    InvalidUsage { request_id: String, message: String },

    #[error("usage row for request `{request_id}` names key id {key_id}, which does not exist in this store")]
    UsageUnknownKey { request_id: String, key_id: i64 },

    #[error("invalid usage query: {0}")]
    InvalidQuery(String),

    #[error("`{0}` is not a date: expected YYYY-MM-DD, e.g. 2025-11-30")]
    BadDate(String),

    #[error("price file {file}: {message}")]
    PriceFile { file: String, message: String },

    #[error("no model `{id}` in the price catalog; the closest ids are {closest}. `ferrolm cost prices` lists them all, and a --prices file can add one")]
    UnknownModel { id: String, closest: String },

    #[error("invalid estimate: {0}")]
    InvalidEstimate(String),
}

impl AccountingError {
    /// The store cannot be reached for now (PostgreSQL stopped, a timeout): retrying later may
    /// work, so servers answer 503.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, AccountingError::StoreUnavailable { .. })
    }
}
