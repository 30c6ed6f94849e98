//! The key store and usage ledger: one SQLite file, `ferrolm.db`, in the server's data dir
//! (`--store sqlite:PATH` names another file), or a PostgreSQL database that several servers
//! share (`--store postgres://…`, see `pg`). Both take the same schema and migrations.
//!
//! Contract:
//! - `open` creates the directory and the database, and migrates it forward one version at a
//!   time inside one transaction; a database written by a newer ferrolm is refused, never
//!   touched. Several processes may open the same file (WAL mode, a busy timeout): the CLI
//!   creates and revokes keys while the server runs.
//! - A key's secret is `flm-` + 40 base62 characters from /dev/urandom (≈238 bits). Only its
//!   sha256 and an 8-character display prefix are stored; the secret is returned once by
//!   `create_key`. A fast unsalted hash is enough because the secret is random, not a password.
//! - At most one *active* key has a given name, and a name is never all digits, so a name or an
//!   id names one key. Ids are never reused (AUTOINCREMENT). Revoking keeps the row.
//! - The ledger is append-only, and holds a row once: each row carries its own key
//!   (`UsageRow::row_key`, unique), so writing it again is a no-op. Each key carries a
//!   running `spent_usd`, updated in the same transaction as the ledger row, so a budget
//!   check is one indexed read; a test holds it to the slow `SUM(cost_usd)` over the ledger.
//! - `usage` with `key_id: Some(k)` only ever reads rows of key `k`.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::AccountingError;

/// The database's file name inside the data dir.
pub const DB_FILE: &str = "ferrolm.db";
/// The schema version this code writes; `MIGRATIONS[v - 1]` brings version v-1 to v.
pub const SCHEMA_VERSION: i64 = 11;
/// What every key starts with, so a leaked one is recognisable (and greppable by scanners).
pub const KEY_PREFIX: &str = "flm-";
/// Random characters after `KEY_PREFIX`.
const KEY_RANDOM_CHARS: usize = 40;
/// Characters of the secret kept for display (`flm-` + 4 random).
const DISPLAY_PREFIX_CHARS: usize = 8;
/// The name `usage` gives requests made without a key (open access); key names cannot contain
/// parentheses, so it never collides with a real key.
pub const NO_KEY: &str = "(no key)";

pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: keys and the ledger.
    "CREATE TABLE api_keys (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        name        TEXT    NOT NULL,
        prefix      TEXT    NOT NULL,
        hash        BLOB    NOT NULL UNIQUE,        -- sha256(secret), 32 bytes
        rpm         INTEGER CHECK (rpm > 0),
        tpm         INTEGER CHECK (tpm > 0),
        budget_usd  REAL    CHECK (budget_usd > 0),
        spent_usd   REAL    NOT NULL DEFAULT 0,     -- running SUM(usage.cost_usd) of this key
        created     INTEGER NOT NULL,               -- unix seconds
        revoked     INTEGER                         -- unix seconds, NULL while active
    );
    CREATE UNIQUE INDEX api_keys_active_name ON api_keys(name) WHERE revoked IS NULL;
    CREATE TABLE usage (
        id                INTEGER PRIMARY KEY,
        ts                INTEGER NOT NULL CHECK (ts >= 0),   -- unix milliseconds
        request_id        TEXT    NOT NULL,
        key_id            INTEGER REFERENCES api_keys(id),    -- NULL: open access
        model             TEXT    NOT NULL,
        endpoint          TEXT    NOT NULL,
        status            INTEGER NOT NULL,
        prompt_tokens     INTEGER NOT NULL CHECK (prompt_tokens >= 0),
        cached_tokens     INTEGER NOT NULL CHECK (cached_tokens >= 0 AND cached_tokens <= prompt_tokens),
        completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
        latency_ms        REAL    NOT NULL,
        ttft_ms           REAL,
        cost_usd          REAL    NOT NULL CHECK (cost_usd >= 0),
        finish_reason     TEXT
    );
    CREATE INDEX usage_key_ts ON usage(key_id, ts);
    CREATE INDEX usage_ts ON usage(ts);",
    // 2: what the cost-cutting levers saved, per request (rows from version 1 saved nothing).
    "ALTER TABLE usage ADD COLUMN route TEXT;   -- the virtual model (router) that chose `model`
    ALTER TABLE usage ADD COLUMN compressed_tokens INTEGER NOT NULL DEFAULT 0
        CHECK (compressed_tokens >= 0);         -- prompt tokens a context strategy removed
    ALTER TABLE usage ADD COLUMN saved_by_cache_usd REAL NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN saved_by_compression_usd REAL NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN saved_by_routing_usd REAL NOT NULL DEFAULT 0;",
    // 3: OpenAI's files and fine-tuning jobs (see `tuning`). `key_id` NULL: open access.
    crate::tuning::MIGRATION,
    // 4: stored Responses (see `responses`).
    crate::responses::MIGRATION,
    // 5: what lazy tool loading saved (signed: a load round may cost more than it saves).
    "ALTER TABLE usage ADD COLUMN lazy_tool_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN saved_by_lazy_tools_usd REAL NOT NULL DEFAULT 0;",
    // 6: stored chat completions (see `completions`).
    crate::completions::MIGRATION,
    // 7: admitted requests of limited keys, where several servers share the store (PostgreSQL,
    // see `pg`): the rate windows and budget holds every replica sees. Unused by SQLite,
    // whose single server keeps them in memory.
    "CREATE TABLE admissions (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        key_id   INTEGER NOT NULL REFERENCES api_keys(id),
        ts       INTEGER NOT NULL,                -- unix milliseconds of the admission
        tokens   INTEGER NOT NULL CHECK (tokens >= 0),  -- the estimate, then the real count
        held_usd REAL    NOT NULL DEFAULT 0,      -- worst case held against the budget
        settled  INTEGER NOT NULL DEFAULT 0       -- 1 once its ledger row is written
    );
    CREATE INDEX admissions_key_ts ON admissions(key_id, ts);",
    // 8: admin keys, which may administer keys over the API and read every key's usage.
    "ALTER TABLE api_keys ADD COLUMN admin INTEGER NOT NULL DEFAULT 0 CHECK (admin IN (0, 1));",
    // 9: the fine-tuning queue's leases (see `tuning`): which worker runs a job, and until when
    // its lease holds; a running job whose lease ran out is taken over by another worker.
    crate::tuning::LEASE_MIGRATION,
    // 10: every ledger row's identity (`UsageRow::row_key`), unique, so a retried write of a
    // row whose first write committed (its acknowledgement lost) lands once. Rows from
    // before get one each from their id, duplicates included: none is dropped.
    "ALTER TABLE usage ADD COLUMN row_key TEXT;
    UPDATE usage SET row_key = 'v9-' || CAST(id AS TEXT);
    CREATE UNIQUE INDEX usage_row_key ON usage(row_key);",
    // 11: the fine-tuning queue's fencing tokens (see `tuning`): each claim of a job is a new
    // epoch, and a checkpoint is recorded only under the job's current one.
    crate::tuning::EPOCH_MIGRATION,
];

/// What a new key may do. `None` is unlimited. Also the body of the server's `POST /v1/keys`
/// (so a field the store does not know is refused there too).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    pub name: String,
    #[serde(default)]
    pub rpm: Option<u32>,
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub budget_usd: Option<f64>,
    /// May create, list and revoke keys and read every key's usage.
    #[serde(default)]
    pub admin: bool,
}

/// A key as stored, without its secret.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KeyInfo {
    pub id: i64,
    pub name: String,
    /// The secret's first characters, for telling keys apart.
    pub prefix: String,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub budget_usd: Option<f64>,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds; `None` while the key is active.
    pub revoked: Option<i64>,
    /// See [`KeySpec::admin`].
    pub admin: bool,
}

/// A new key and its secret, shown this once (`ferrolm keys create --json`, `POST /v1/keys`).
#[derive(Debug, Serialize)]
pub struct NewKey {
    #[serde(flatten)]
    pub key: KeyInfo,
    pub secret: String,
}

/// A key with its state and spend (`ferrolm keys list --json`, `GET /v1/keys`).
#[derive(Debug, Serialize)]
pub struct KeyListing {
    #[serde(flatten)]
    pub key: KeyInfo,
    pub active: bool,
    pub spent_usd: f64,
}

/// One request, as the ledger keeps it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UsageRow {
    /// Unix milliseconds.
    pub ts: i64,
    pub request_id: String,
    pub key_id: Option<i64>,
    pub model: String,
    pub endpoint: String,
    pub status: u16,
    pub prompt_tokens: u64,
    /// Part of `prompt_tokens`.
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub cost_usd: f64,
    pub finish_reason: Option<String>,
    /// The virtual model (router) that picked `model`, if one did.
    pub route: Option<String>,
    /// Prompt tokens a context strategy removed before the request ran.
    pub compressed_tokens: u64,
    /// What the prefix cache saved: the cost with every prompt token computed, minus `cost_usd`.
    pub saved_by_cache_usd: f64,
    /// What compression saved: the cost with the removed tokens sent too, minus `cost_usd`.
    pub saved_by_compression_usd: f64,
    /// What routing saved: the same tokens on the router's top tier, minus `cost_usd`.
    pub saved_by_routing_usd: f64,
    /// Prompt tokens lazy tool loading saved: the prompt with every tool definition in it,
    /// minus the prompt tokens the request ran (all its passes); negative when the
    /// `load_tools` rounds cost more than they saved.
    pub lazy_tool_tokens: i64,
    /// What lazy tool loading saved: the cost with every definition sent in one pass, minus
    /// `cost_usd`.
    pub saved_by_lazy_tools_usd: f64,
    /// The row's identity ([`UsageRow::new_key`]), made once with the row and kept by its
    /// retries: the ledger holds at most one row per key, so writing a row again (its first
    /// write committed, the acknowledgement lost) counts it once. Not the request id, which a
    /// client may choose (`x-request-id`) and which one request's several rows share (best-of
    /// generation and its reward scoring).
    pub row_key: String,
}

impl UsageRow {
    /// A fresh row key: `rk_` + 128 random bits from /dev/urandom in hex, so replicas never
    /// make the same one.
    pub fn new_key() -> Result<String, AccountingError> {
        let mut f = File::open("/dev/urandom").map_err(AccountingError::Random)?;
        let mut buf = [0u8; 16];
        f.read_exact(&mut buf).map_err(AccountingError::Random)?;
        let mut s = String::with_capacity(3 + 32);
        s.push_str("rk_");
        for b in buf {
            s.push_str(&format!("{b:02x}"));
        }
        Ok(s)
    }
}

/// A column to group the usage report by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Key,
    Model,
    /// The UTC date of the request.
    Day,
}

impl std::str::FromStr for GroupBy {
    type Err = AccountingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "key" => Ok(GroupBy::Key),
            "model" => Ok(GroupBy::Model),
            "day" => Ok(GroupBy::Day),
            _ => Err(AccountingError::InvalidQuery(format!(
                "cannot group by `{s}`: use key, model or day"
            ))),
        }
    }
}

/// A usage report: rows with `since_ms <= ts < until_ms`, grouped by `group_by` (in that
/// order of precedence); no grouping gives exactly one row, the total.
#[derive(Clone, Debug, Default)]
pub struct UsageQuery {
    pub group_by: Vec<GroupBy>,
    /// Only this key's rows.
    pub key_id: Option<i64>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

/// One line of a usage report. A grouping column that was not asked for is `None`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct UsageGroup {
    /// The key's name, or [`NO_KEY`] for requests made without one.
    pub key: Option<String>,
    pub model: Option<String>,
    /// `YYYY-MM-DD`, UTC.
    pub day: Option<String>,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    pub avg_latency_ms: f64,
    /// Latency percentiles (nearest rank); `None` without requests.
    pub p50_latency_ms: Option<f64>,
    pub p95_latency_ms: Option<f64>,
    /// Over the requests that reported a time to first token.
    pub avg_ttft_ms: Option<f64>,
    pub compressed_tokens: u64,
    pub saved_by_cache_usd: f64,
    pub saved_by_compression_usd: f64,
    pub saved_by_routing_usd: f64,
    pub lazy_tool_tokens: i64,
    pub saved_by_lazy_tools_usd: f64,
    /// Requests a router placed.
    pub routed_requests: u64,
}

/// The key store and ledger. `Send + Sync`: SQLite calls are serialised on one connection;
/// PostgreSQL calls take a connection from a pool (see `pg`).
pub struct Store {
    /// The database file; for PostgreSQL, its URL without the password (for messages).
    pub(crate) path: PathBuf,
    backend: Backend,
}

/// Where the store lives: the closed set of `--store` URLs.
enum Backend {
    Sqlite(Mutex<Connection>),
    Postgres(crate::pg::Pg),
}

/// A `--store` URL: `sqlite:PATH` (the database file) or `postgres://…` / `postgresql://…`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

impl std::str::FromStr for StoreUrl {
    type Err = AccountingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s.strip_prefix("sqlite:") {
            let p = p.strip_prefix("//").unwrap_or(p);
            if p.is_empty() {
                return Err(AccountingError::BadStoreUrl(s.to_owned()));
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(p)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(s.to_owned()));
        }
        Err(AccountingError::BadStoreUrl(s.to_owned()))
    }
}

/// Attach the database path to rusqlite errors.
pub(crate) trait At<T> {
    fn at(self, path: &Path) -> Result<T, AccountingError>;
}

impl<T> At<T> for rusqlite::Result<T> {
    fn at(self, path: &Path) -> Result<T, AccountingError> {
        self.map_err(|source| AccountingError::Db {
            path: path.to_owned(),
            source,
        })
    }
}

pub(crate) const KEY_COLUMNS: &str =
    "id, name, prefix, rpm, tpm, budget_usd, created, revoked, admin";

fn key_from_row(r: &Row<'_>) -> rusqlite::Result<KeyInfo> {
    // The CHECK constraints keep rpm and tpm positive; a value out of range reads as an error.
    let rpm: Option<i64> = r.get(3)?;
    let tpm: Option<i64> = r.get(4)?;
    let range = |i: usize, v: i64| rusqlite::Error::IntegralValueOutOfRange(i, v);
    Ok(KeyInfo {
        id: r.get(0)?,
        name: r.get(1)?,
        prefix: r.get(2)?,
        rpm: rpm
            .map(|v| u32::try_from(v).map_err(|_| range(3, v)))
            .transpose()?,
        tpm: tpm
            .map(|v| u64::try_from(v).map_err(|_| range(4, v)))
            .transpose()?,
        budget_usd: r.get(5)?,
        created: r.get(6)?,
        revoked: r.get(7)?,
        admin: r.get::<_, i64>(8)? != 0,
    })
}

fn unix_now_s() -> i64 {
    crate::time::now_unix_ms() / 1000
}

fn sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// `flm-` + 40 characters drawn uniformly from [0-9A-Za-z] by rejection sampling of
/// /dev/urandom bytes (bytes >= 248 = 4 × 62 are dropped so every character is equally likely).
fn new_secret() -> Result<String, AccountingError> {
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut f = File::open("/dev/urandom").map_err(AccountingError::Random)?;
    let mut s = String::with_capacity(KEY_PREFIX.len() + KEY_RANDOM_CHARS);
    s.push_str(KEY_PREFIX);
    let mut buf = [0u8; 64];
    while s.len() < KEY_PREFIX.len() + KEY_RANDOM_CHARS {
        f.read_exact(&mut buf).map_err(AccountingError::Random)?;
        for &b in buf.iter().filter(|&&b| b < 248) {
            if s.len() == KEY_PREFIX.len() + KEY_RANDOM_CHARS {
                break;
            }
            s.push(char::from(ALPHABET[usize::from(b % 62)]));
        }
    }
    Ok(s)
}

fn invalid(field: &'static str, message: impl Into<String>) -> AccountingError {
    AccountingError::InvalidKeySpec {
        field,
        message: message.into(),
    }
}

/// The stored form of a key spec: `(rpm, tpm)` as SQLite integers.
fn check_spec(spec: &KeySpec) -> Result<(Option<i64>, Option<i64>), AccountingError> {
    let n = &spec.name;
    if n.is_empty() || n.len() > 64 {
        return Err(invalid(
            "name",
            format!("`{n}` must be 1 to 64 characters long"),
        ));
    }
    if !n
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            "name",
            format!("`{n}` may only use letters, digits, `.`, `_` and `-`"),
        ));
    }
    if n.bytes().all(|c| c.is_ascii_digit()) {
        return Err(invalid(
            "name",
            format!("`{n}` is all digits and would be mistaken for a key id: add a letter"),
        ));
    }
    if spec.rpm == Some(0) {
        return Err(invalid(
            "rpm",
            "0 requests per minute would refuse every request: give at least 1, or leave it out for no limit",
        ));
    }
    let tpm = match spec.tpm {
        Some(0) => {
            return Err(invalid(
                "tpm",
                "0 tokens per minute would refuse every request: give at least 1, or leave it out for no limit",
            ))
        }
        Some(t) => Some(
            i64::try_from(t)
                .map_err(|_| invalid("tpm", format!("{t} is too large; leave it out for no limit")))?,
        ),
        None => None,
    };
    if let Some(b) = spec.budget_usd {
        if !(b.is_finite() && b > 0.0) {
            return Err(invalid(
                "budget_usd",
                format!("{b} is not a budget: give a number of dollars > 0, or leave it out for no budget"),
            ));
        }
    }
    Ok((spec.rpm.map(i64::from), tpm))
}

fn check_row(row: &UsageRow) -> Result<[i64; 3], AccountingError> {
    let bad = |message: String| AccountingError::InvalidUsage {
        request_id: row.request_id.clone(),
        message,
    };
    if row.ts < 0 {
        return Err(bad(format!("ts is {}: expected unix milliseconds", row.ts)));
    }
    if row.row_key.is_empty() {
        return Err(bad(
            "row_key is empty: give each row its own (`UsageRow::new_key`), kept by its retries"
                .to_owned(),
        ));
    }
    if row.cached_tokens > row.prompt_tokens {
        return Err(bad(format!(
            "cached_tokens ({}) exceeds prompt_tokens ({}): cached tokens are part of the prompt",
            row.cached_tokens, row.prompt_tokens
        )));
    }
    for (field, v) in [
        ("latency_ms", Some(row.latency_ms)),
        ("ttft_ms", row.ttft_ms),
        ("cost_usd", Some(row.cost_usd)),
    ] {
        if let Some(v) = v {
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad(format!(
                    "{field} is {v}: expected a finite number >= 0"
                )));
            }
        }
    }
    for (field, v) in [
        ("saved_by_cache_usd", row.saved_by_cache_usd),
        ("saved_by_compression_usd", row.saved_by_compression_usd),
        ("saved_by_routing_usd", row.saved_by_routing_usd),
        ("saved_by_lazy_tools_usd", row.saved_by_lazy_tools_usd),
    ] {
        if !v.is_finite() {
            return Err(bad(format!("{field} is {v}: expected a finite number")));
        }
    }
    let int = |field: &str, v: u64| {
        i64::try_from(v).map_err(|_| bad(format!("{field} is {v}: too large to store")))
    };
    Ok([
        int("prompt_tokens", row.prompt_tokens)?,
        int("cached_tokens", row.cached_tokens)?,
        int("completion_tokens", row.completion_tokens)?,
    ])
}

impl Store {
    /// Open (creating if needed) `data_dir/ferrolm.db` and migrate it to [`SCHEMA_VERSION`].
    pub fn open(data_dir: &Path) -> Result<Store, AccountingError> {
        std::fs::create_dir_all(data_dir).map_err(|source| AccountingError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
        Store::open_sqlite(&data_dir.join(DB_FILE))
    }

    /// Open the store a `--store` URL names (creating a SQLite file's directory if needed),
    /// migrated to [`SCHEMA_VERSION`].
    pub fn open_url(url: &StoreUrl) -> Result<Store, AccountingError> {
        match url {
            StoreUrl::Sqlite(file) => {
                if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|source| AccountingError::DataDir {
                        path: dir.to_owned(),
                        source,
                    })?;
                }
                Store::open_sqlite(file)
            }
            StoreUrl::Postgres(url) => {
                let pg = crate::pg::Pg::connect(url)?;
                Ok(Store {
                    path: PathBuf::from(pg.shown_url()),
                    backend: Backend::Postgres(pg),
                })
            }
        }
    }

    fn open_sqlite(path: &Path) -> Result<Store, AccountingError> {
        let path = path.to_owned();
        let mut conn = Connection::open(&path).at(&path)?;
        conn.busy_timeout(Duration::from_secs(5)).at(&path)?;
        // WAL lets the server read while `ferrolm keys` writes; NORMAL sync is durable across
        // process crashes (the ledger may lose its last rows on power loss, never corrupt).
        conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
            .at(&path)?;
        conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;")
            .at(&path)?;
        migrate(&mut conn, &path)?;
        Ok(Store {
            path,
            backend: Backend::Sqlite(Mutex::new(conn)),
        })
    }

    /// Admit a request of `key` (about `tokens` tokens, at most `worst_usd`) against its rate
    /// limits and budget as the shared store keeps them (see `pg`): `Ok(Err(_))` is a refusal.
    /// Only a shared store keeps them; one server's SQLite store leaves them to its
    /// [`crate::RateLimiter`] and [`crate::Budgets`], in memory.
    pub fn admit(
        &self,
        key: &KeyInfo,
        tokens: u64,
        worst_usd: f64,
    ) -> Result<Result<crate::Admission, crate::Refusal>, AccountingError> {
        match &self.backend {
            Backend::Postgres(pg) => pg.admit(key, tokens, worst_usd),
            Backend::Sqlite(_) => Err(AccountingError::NotShared),
        }
    }

    /// The database file (for PostgreSQL: its URL, password left out).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the store is shared by several servers (PostgreSQL): then rate limits and
    /// budgets are kept in it ([`Store::admit`]), not in one server's memory.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// The PostgreSQL backend, if that is where the store lives.
    pub(crate) fn pg(&self) -> Option<&crate::pg::Pg> {
        match &self.backend {
            Backend::Postgres(pg) => Some(pg),
            Backend::Sqlite(_) => None,
        }
    }

    /// The SQLite connection. Every store method asks [`Store::pg`] first, so a PostgreSQL
    /// store reaching here is a bug, refused rather than run against the wrong database.
    pub(crate) fn conn(&self) -> Result<MutexGuard<'_, Connection>, AccountingError> {
        match &self.backend {
            // A panic while holding the lock dropped any open transaction (rolled back), so
            // the connection is still consistent.
            Backend::Sqlite(conn) => Ok(conn.lock().unwrap_or_else(PoisonError::into_inner)),
            Backend::Postgres(_) => Err(AccountingError::NotInPostgres),
        }
    }

    /// Make a key. Returns its record and the secret, which is not stored and cannot be shown
    /// again.
    pub fn create_key(&self, spec: &KeySpec) -> Result<(KeyInfo, String), AccountingError> {
        let (rpm, tpm) = check_spec(spec)?;
        let secret = new_secret()?;
        let prefix: String = secret.chars().take(DISPLAY_PREFIX_CHARS).collect();
        if let Backend::Postgres(pg) = &self.backend {
            let info = pg.create_key(spec, rpm, tpm, &prefix, sha256(&secret).to_vec())?;
            return Ok((info, secret));
        }
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(&self.path)?;
        let taken: bool = tx
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM api_keys WHERE name = ?1 AND revoked IS NULL)",
                [&spec.name],
                |r| r.get(0),
            )
            .at(&self.path)?;
        if taken {
            return Err(AccountingError::DuplicateName(spec.name.clone()));
        }
        tx.execute(
            "INSERT INTO api_keys (name, prefix, hash, rpm, tpm, budget_usd, created, admin)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                spec.name,
                prefix,
                &sha256(&secret)[..],
                rpm,
                tpm,
                spec.budget_usd,
                unix_now_s(),
                i64::from(spec.admin)
            ],
        )
        .at(&self.path)?;
        let id = tx.last_insert_rowid();
        let info = tx
            .query_row(
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"),
                [id],
                key_from_row,
            )
            .at(&self.path)?;
        tx.commit().at(&self.path)?;
        Ok((info, secret))
    }

    /// All keys, revoked ones included, oldest first.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>, AccountingError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.list_keys();
        }
        let conn = self.conn()?;
        let mut st = conn
            .prepare(&format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id"))
            .at(&self.path)?;
        let rows = st.query_map([], key_from_row).at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    /// Every key (oldest first) with whether it is active and what it spent.
    pub fn key_listing(&self) -> Result<Vec<KeyListing>, AccountingError> {
        self.list_keys()?
            .into_iter()
            .map(|key| {
                Ok(KeyListing {
                    active: key.revoked.is_none(),
                    spent_usd: self.spent_usd(key.id)?,
                    key,
                })
            })
            .collect()
    }

    /// The key a name or id names, revoked or not. A name shared by several keys over time
    /// (a revoked one and its replacement) is ambiguous: pass the id.
    pub fn find_key(&self, name_or_id: &str) -> Result<KeyInfo, AccountingError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.find_key(name_or_id);
        }
        resolve(&*self.conn()?, &self.path, name_or_id, false)
    }

    /// Revoke the active key with this name, or the key with this id.
    pub fn revoke_key(&self, name_or_id: &str) -> Result<KeyInfo, AccountingError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.revoke_key(name_or_id);
        }
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(&self.path)?;
        let key = resolve(&tx, &self.path, name_or_id, true)?;
        if key.revoked.is_some() {
            return Err(AccountingError::AlreadyRevoked {
                name: key.name,
                id: key.id,
            });
        }
        let now = unix_now_s();
        tx.execute(
            "UPDATE api_keys SET revoked = ?1 WHERE id = ?2 AND revoked IS NULL",
            params![now, key.id],
        )
        .at(&self.path)?;
        tx.commit().at(&self.path)?;
        Ok(KeyInfo {
            revoked: Some(now),
            ..key
        })
    }

    /// Whether any key was ever created. Revoked keys count: once a store had keys, the server
    /// never falls back to open access.
    pub fn has_keys(&self) -> Result<bool, AccountingError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.has_keys();
        }
        self.conn()?
            .query_row("SELECT EXISTS(SELECT 1 FROM api_keys)", [], |r| r.get(0))
            .at(&self.path)
    }

    /// The active key with this secret, if any. The work is the same whether or not it matches:
    /// one sha256, one lookup in the unique index on the hash (no comparison of secrets).
    pub fn verify(&self, secret: &str) -> Result<Option<KeyInfo>, AccountingError> {
        let hash = sha256(secret);
        if let Backend::Postgres(pg) = &self.backend {
            return pg.verify(hash.to_vec());
        }
        self.conn()?
            .query_row(
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = ?1 AND revoked IS NULL"),
                [&hash[..]],
                key_from_row,
            )
            .optional()
            .at(&self.path)
    }

    /// Append a request to the ledger (and add its cost to its key's running total).
    pub fn record(&self, row: &UsageRow) -> Result<(), AccountingError> {
        self.record_admitted(row, None)
    }

    /// [`Store::record`] for a request [`Store::admit`] admitted (`admission`: its id): in the
    /// same transaction, its tokens replace its estimate in the rate window and its budget
    /// hold is released. A row whose admission is already settled, or whose `row_key` the
    /// ledger already holds, is not written again, so a retried write counts the request once.
    pub fn record_admitted(
        &self,
        row: &UsageRow,
        admission: Option<i64>,
    ) -> Result<(), AccountingError> {
        let [prompt, cached, completion] = check_row(row)?;
        if let Backend::Postgres(pg) = &self.backend {
            return pg.record(row, [prompt, cached, completion], admission);
        }
        let mut conn = self.conn()?;
        let tx = conn.transaction().at(&self.path)?;
        if let Some(k) = row.key_id {
            let n = tx
                .execute(
                    "UPDATE api_keys SET spent_usd = spent_usd + ?1 WHERE id = ?2",
                    params![row.cost_usd, k],
                )
                .at(&self.path)?;
            if n == 0 {
                return Err(AccountingError::UsageUnknownKey {
                    request_id: row.request_id.clone(),
                    key_id: k,
                });
            }
        }
        let written = tx
            .execute(
                "INSERT INTO usage (ts, request_id, key_id, model, endpoint, status, prompt_tokens,
                                cached_tokens, completion_tokens, latency_ms, ttft_ms, cost_usd,
                                finish_reason, route, compressed_tokens, saved_by_cache_usd,
                                saved_by_compression_usd, saved_by_routing_usd,
                                lazy_tool_tokens, saved_by_lazy_tools_usd, row_key)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                     ?17, ?18, ?19, ?20, ?21)
             ON CONFLICT (row_key) DO NOTHING",
                params![
                    row.ts,
                    row.request_id,
                    row.key_id,
                    row.model,
                    row.endpoint,
                    row.status,
                    prompt,
                    cached,
                    completion,
                    row.latency_ms,
                    row.ttft_ms,
                    row.cost_usd,
                    row.finish_reason,
                    row.route,
                    i64::try_from(row.compressed_tokens).unwrap_or(i64::MAX),
                    row.saved_by_cache_usd,
                    row.saved_by_compression_usd,
                    row.saved_by_routing_usd,
                    row.lazy_tool_tokens,
                    row.saved_by_lazy_tools_usd,
                    row.row_key
                ],
            )
            .at(&self.path)?;
        if written == 0 {
            return Ok(()); // written before: dropping tx rolls the spend back, counted once
        }
        tx.commit().at(&self.path)
    }

    /// Dollars spent by a key so far (its running total; see the module docs).
    pub fn spent_usd(&self, key_id: i64) -> Result<f64, AccountingError> {
        if let Backend::Postgres(pg) = &self.backend {
            return pg.spent_usd(key_id);
        }
        self.conn()?
            .query_row(
                "SELECT spent_usd FROM api_keys WHERE id = ?1",
                [key_id],
                |r| r.get(0),
            )
            .optional()
            .at(&self.path)?
            .ok_or_else(|| AccountingError::UnknownKey(key_id.to_string()))
    }

    /// The slow, obviously correct total that `spent_usd` must equal.
    #[cfg(test)]
    fn spent_usd_by_sum(&self, key_id: i64) -> f64 {
        let Ok(conn) = self.conn() else {
            return f64::NAN;
        };
        conn.query_row(
            "SELECT COALESCE(SUM(cost_usd), 0.0) FROM usage WHERE key_id = ?1",
            [key_id],
            |r| r.get(0),
        )
        .unwrap_or(f64::NAN)
    }

    /// A grouped report of the ledger, ordered by the grouping columns.
    pub fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageGroup>, AccountingError> {
        let (sql, args, groups) = usage_sql(q, matches!(self.backend, Backend::Postgres(_)))?;
        if let Backend::Postgres(pg) = &self.backend {
            return pg.usage(sql, args, groups);
        }
        let conn = self.conn()?;
        let mut st = conn.prepare(&sql).at(&self.path)?;
        let n = groups.len();
        let rows = st
            .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                let mut g = UsageGroup {
                    cost_usd: r.get(n + 4)?,
                    avg_latency_ms: r.get(n + 5)?,
                    avg_ttft_ms: r.get(n + 6)?,
                    saved_by_cache_usd: r.get(n + 8)?,
                    saved_by_compression_usd: r.get(n + 9)?,
                    saved_by_routing_usd: r.get(n + 10)?,
                    lazy_tool_tokens: r.get(n + 12)?,
                    saved_by_lazy_tools_usd: r.get(n + 13)?,
                    p50_latency_ms: r.get(n + 14)?,
                    p95_latency_ms: r.get(n + 15)?,
                    ..UsageGroup::default()
                };
                for (i, col) in groups.iter().enumerate() {
                    let v: String = r.get(i)?;
                    match col {
                        GroupBy::Key => g.key = Some(v),
                        GroupBy::Model => g.model = Some(v),
                        GroupBy::Day => g.day = Some(v),
                    }
                }
                let count = |i: usize| -> rusqlite::Result<u64> {
                    let v: i64 = r.get(i)?;
                    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(i, v))
                };
                g.requests = count(n)?;
                g.prompt_tokens = count(n + 1)?;
                g.cached_tokens = count(n + 2)?;
                g.completion_tokens = count(n + 3)?;
                g.compressed_tokens = count(n + 7)?;
                g.routed_requests = count(n + 11)?;
                Ok(g)
            })
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }
}

/// The SQL of a usage report, its arguments and its grouping columns, for SQLite or
/// PostgreSQL (placeholders, the day expression; integer sums are cast back to integers,
/// which PostgreSQL widens to numeric).
fn usage_sql(
    q: &UsageQuery,
    postgres: bool,
) -> Result<(String, Vec<i64>, Vec<GroupBy>), AccountingError> {
    if let (Some(s), Some(u)) = (q.since_ms, q.until_ms) {
        if s >= u {
            return Err(AccountingError::InvalidQuery(format!(
                "the period is empty: since ({}) is not before until ({})",
                crate::time::utc_day(s),
                crate::time::utc_day(u)
            )));
        }
    }
    let mut groups = Vec::new();
    for g in &q.group_by {
        if !groups.contains(g) {
            groups.push(*g);
        }
    }
    // (selected expression, grouping expression) per column, in the caller's order.
    let cols: Vec<(String, String)> = groups
        .iter()
        .map(|g| {
            let (select, group) = match g {
                // k.name is grouped by too (PostgreSQL wants every selected column
                // grouped); it is the key id's, so the groups are the ids'.
                GroupBy::Key => (
                    format!("COALESCE(k.name, '{NO_KEY}')"),
                    "u.key_id, k.name".into(),
                ),
                GroupBy::Model => ("u.model".into(), "u.model".into()),
                GroupBy::Day => {
                    let day = if postgres {
                        "to_char(to_timestamp(u.ts / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
                    } else {
                        "strftime('%Y-%m-%d', u.ts / 1000, 'unixepoch')"
                    }
                    .to_owned();
                    (day.clone(), day)
                }
            };
            (select, group)
        })
        .collect();
    let mut select: Vec<&str> = cols.iter().map(|(s, _)| s.as_str()).collect();
    select.extend([
        "COUNT(*)",
        "CAST(COALESCE(SUM(u.prompt_tokens), 0) AS BIGINT)",
        "CAST(COALESCE(SUM(u.cached_tokens), 0) AS BIGINT)",
        "CAST(COALESCE(SUM(u.completion_tokens), 0) AS BIGINT)",
        "COALESCE(SUM(u.cost_usd), 0.0)",
        "COALESCE(AVG(u.latency_ms), 0.0)",
        "AVG(u.ttft_ms)",
        "CAST(COALESCE(SUM(u.compressed_tokens), 0) AS BIGINT)",
        "COALESCE(SUM(u.saved_by_cache_usd), 0.0)",
        "COALESCE(SUM(u.saved_by_compression_usd), 0.0)",
        "COALESCE(SUM(u.saved_by_routing_usd), 0.0)",
        "COUNT(u.route)",
        "CAST(COALESCE(SUM(u.lazy_tool_tokens), 0) AS BIGINT)",
        "COALESCE(SUM(u.saved_by_lazy_tools_usd), 0.0)",
        // Nearest-rank percentiles: the smallest latency whose rank in its group (from the
        // window in the FROM below) is at least p × the group's size.
        "MIN(CASE WHEN u.lat_rank >= 0.5 * u.lat_n THEN u.latency_ms END)",
        "MIN(CASE WHEN u.lat_rank >= 0.95 * u.lat_n THEN u.latency_ms END)",
    ]);
    let mut conds = Vec::new();
    let mut args: Vec<i64> = Vec::new();
    for (cond, v) in [
        ("u.key_id = ", q.key_id),
        ("u.ts >= ", q.since_ms),
        ("u.ts < ", q.until_ms),
    ] {
        if let Some(v) = v {
            args.push(v);
            let mark = if postgres { '$' } else { '?' };
            conds.push(format!("{cond}{mark}{}", args.len()));
        }
    }
    // The rows of the period, each with its latency's rank within its group (partitioned by
    // the usage columns alone: the key's name is joined outside).
    let partition = if groups.is_empty() {
        String::new()
    } else {
        let by: Vec<String> = groups
            .iter()
            .zip(&cols)
            .map(|(g, (_, group))| match g {
                GroupBy::Key => "u.key_id".to_owned(),
                _ => group.clone(),
            })
            .collect();
        format!("PARTITION BY {} ", by.join(", "))
    };
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    let mut sql = format!(
        "SELECT {} FROM (SELECT u.*, \
         ROW_NUMBER() OVER ({partition}ORDER BY u.latency_ms) AS lat_rank, \
         COUNT(*) OVER ({partition}) AS lat_n FROM usage u{filter}) u \
         LEFT JOIN api_keys k ON k.id = u.key_id",
        select.join(", ")
    );
    if !cols.is_empty() {
        // Group by the key's id (two keys may have shared a name over time), order by what
        // is shown, in the caller's order of precedence.
        let group: Vec<&str> = cols.iter().map(|(_, g)| g.as_str()).collect();
        let order: Vec<String> = (1..=cols.len()).map(|i| i.to_string()).collect();
        sql += &format!(
            " GROUP BY {} ORDER BY {}",
            group.join(", "),
            order.join(", ")
        );
    }
    Ok((sql, args, groups))
}

/// Bring the database to [`SCHEMA_VERSION`], or refuse one from a newer ferrolm.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), AccountingError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .at(path)?;
    let current: Option<i64> = tx
        .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
        .at(path)?;
    let current = current.unwrap_or(0);
    if current > SCHEMA_VERSION {
        return Err(AccountingError::SchemaTooNew {
            path: path.to_owned(),
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    if current == SCHEMA_VERSION {
        return Ok(()); // dropping tx rolls back the no-op CREATE IF NOT EXISTS
    }
    for sql in MIGRATIONS
        .iter()
        .skip(usize::try_from(current).unwrap_or(0))
    {
        tx.execute_batch(sql).at(path)?;
    }
    tx.execute("DELETE FROM schema_version", []).at(path)?;
    tx.execute(
        "INSERT INTO schema_version (version) VALUES (?1)",
        [SCHEMA_VERSION],
    )
    .at(path)?;
    tx.commit().at(path)
}

/// The key `q` names: an id, or a name. With `prefer_active`, a name shared by a revoked key
/// and the active one names the active one.
fn resolve(
    conn: &Connection,
    path: &Path,
    q: &str,
    prefer_active: bool,
) -> Result<KeyInfo, AccountingError> {
    let mut found: Vec<KeyInfo> = Vec::new();
    if let Ok(id) = q.parse::<i64>() {
        if let Some(k) = conn
            .query_row(
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"),
                [id],
                key_from_row,
            )
            .optional()
            .at(path)?
        {
            found.push(k);
        }
    }
    let mut st = conn
        .prepare(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE name = ?1 ORDER BY id"
        ))
        .at(path)?;
    for k in st.query_map([q], key_from_row).at(path)? {
        let k = k.at(path)?;
        if !found.iter().any(|f| f.id == k.id) {
            found.push(k);
        }
    }
    pick_key(found, q, prefer_active)
}

/// The one key among those `q` names (see [`resolve`]).
pub(crate) fn pick_key(
    mut found: Vec<KeyInfo>,
    q: &str,
    prefer_active: bool,
) -> Result<KeyInfo, AccountingError> {
    if found.len() > 1 && prefer_active {
        let active: Vec<&KeyInfo> = found.iter().filter(|k| k.revoked.is_none()).collect();
        if active.len() == 1 {
            return Ok(active[0].clone());
        }
        if active.is_empty() {
            // Only revoked keys by that name: report the latest.
            if let Some(k) = found.pop() {
                return Ok(k);
            }
        }
    }
    match found.len() {
        0 => Err(AccountingError::UnknownKey(q.to_owned())),
        1 => Ok(found.remove(0)),
        _ => Err(AccountingError::AmbiguousKey {
            query: q.to_owned(),
            ids: found
                .iter()
                .map(|k| k.id.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("server")).unwrap();
        (dir, s)
    }

    fn spec(name: &str) -> KeySpec {
        KeySpec {
            name: name.to_owned(),
            ..KeySpec::default()
        }
    }

    fn row(key_id: Option<i64>, model: &str, ts: i64, cost: f64) -> UsageRow {
        UsageRow {
            ts,
            request_id: format!("req-{ts}"),
            key_id,
            model: model.to_owned(),
            endpoint: "/v1/chat/completions".to_owned(),
            status: 200,
            prompt_tokens: 100,
            cached_tokens: 20,
            completion_tokens: 10,
            latency_ms: 50.0,
            ttft_ms: Some(5.0),
            cost_usd: cost,
            finish_reason: Some("stop".to_owned()),
            row_key: UsageRow::new_key().unwrap(),
            ..UsageRow::default()
        }
    }

    #[test]
    fn savings_are_summed_per_group_and_a_version_1_ledger_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A ledger written by version 1 (schema 1), with one row.
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_version (version INTEGER NOT NULL);
                 INSERT INTO schema_version VALUES (1);
                 INSERT INTO usage (ts, request_id, model, endpoint, status, prompt_tokens,
                    cached_tokens, completion_tokens, latency_ms, cost_usd)
                 VALUES (1, 'old', 'm', '/v1/chat/completions', 200, 10, 0, 5, 1.0, 0.5);",
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let mut r = row(None, "m", 2, 0.25);
        r.route = Some("auto".into());
        r.compressed_tokens = 300;
        r.saved_by_cache_usd = 0.125;
        r.saved_by_compression_usd = 0.5;
        r.saved_by_routing_usd = 2.0;
        r.lazy_tool_tokens = -40;
        r.saved_by_lazy_tools_usd = -0.25;
        store.record(&r).unwrap();
        let mut lazy = row(None, "m", 0, 0.0);
        lazy.lazy_tool_tokens = 1000;
        lazy.saved_by_lazy_tools_usd = 1.0;
        store.record(&lazy).unwrap();
        let g = store
            .usage(&UsageQuery {
                group_by: vec![GroupBy::Model],
                ..UsageQuery::default()
            })
            .unwrap();
        assert_eq!(g.len(), 1);
        let g = &g[0];
        assert_eq!(
            (g.requests, g.routed_requests, g.compressed_tokens),
            (3, 1, 300)
        );
        assert_eq!((g.lazy_tool_tokens, g.saved_by_lazy_tools_usd), (960, 0.75));
        assert_eq!(g.cost_usd, 0.75);
        assert_eq!(
            (
                g.saved_by_cache_usd,
                g.saved_by_compression_usd,
                g.saved_by_routing_usd
            ),
            (0.125, 0.5, 2.0)
        );
        r.saved_by_routing_usd = f64::NAN;
        assert!(store.record(&r).is_err());
        r.saved_by_routing_usd = 0.0;
        r.saved_by_lazy_tools_usd = f64::INFINITY;
        assert!(store.record(&r).is_err());
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Store>();
    }

    #[test]
    fn keys_round_trip() {
        let (_d, s) = store();
        assert!(!s.has_keys().unwrap());
        let (info, secret) = s
            .create_key(&KeySpec {
                name: "ci".into(),
                rpm: Some(60),
                tpm: Some(10_000),
                budget_usd: Some(5.0),
                admin: false,
            })
            .unwrap();
        assert!(s.has_keys().unwrap());
        assert_eq!(secret.len(), 44);
        assert!(secret.starts_with("flm-"));
        assert!(secret[4..].bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(info.prefix, &secret[..8]);
        assert_eq!(
            (info.rpm, info.tpm, info.budget_usd, info.revoked),
            (Some(60), Some(10_000), Some(5.0), None)
        );
        assert!(info.created > 1_700_000_000);
        assert_eq!(s.verify(&secret).unwrap(), Some(info.clone()));
        assert_eq!(s.verify("flm-nope").unwrap(), None);
        assert_eq!(s.verify(&secret[..43]).unwrap(), None);
        assert_eq!(s.list_keys().unwrap(), vec![info.clone()]);
        // An admin key says so; the listing carries state and spend.
        let (boss, _) = s
            .create_key(&KeySpec {
                admin: true,
                ..spec("boss")
            })
            .unwrap();
        assert!(boss.admin && !info.admin);
        let listed = s.key_listing().unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed[1].key.admin && listed[1].active && listed[1].spent_usd == 0.0);
        s.revoke_key("boss").unwrap();
        assert!(!s.key_listing().unwrap()[1].active);

        // The secret itself is nowhere in the database file.
        drop(s);
        let bytes = std::fs::read(_d.path().join("server").join(DB_FILE)).unwrap();
        let wal =
            std::fs::read(_d.path().join("server").join("ferrolm.db-wal")).unwrap_or_default();
        for b in [&bytes, &wal] {
            assert!(!b.windows(44).any(|w| w == secret.as_bytes()));
        }
        let s = Store::open(&_d.path().join("server")).unwrap();

        let revoked = s.revoke_key("ci").unwrap();
        assert!(revoked.revoked.is_some());
        assert_eq!(s.verify(&secret).unwrap(), None, "a revoked key is refused");
        assert!(s.has_keys().unwrap(), "revoked keys still count");
        assert!(matches!(
            s.revoke_key("ci"),
            Err(AccountingError::AlreadyRevoked { .. })
        ));
        assert!(matches!(
            s.revoke_key(&info.id.to_string()),
            Err(AccountingError::AlreadyRevoked { .. })
        ));
        // The name is free again; revoke by name then picks the active one.
        let (again, secret2) = s.create_key(&spec("ci")).unwrap();
        assert_ne!(again.id, info.id);
        assert_ne!(secret2, secret);
        assert_eq!(s.verify(&secret2).unwrap().map(|k| k.id), Some(again.id));
        assert!(matches!(
            s.find_key("ci"),
            Err(AccountingError::AmbiguousKey { .. })
        ));
        assert_eq!(s.find_key(&info.id.to_string()).unwrap().id, info.id);
        assert_eq!(s.revoke_key("ci").unwrap().id, again.id);
        assert!(matches!(
            s.revoke_key("nobody"),
            Err(AccountingError::UnknownKey(_))
        ));
        assert!(matches!(
            s.revoke_key("999"),
            Err(AccountingError::UnknownKey(_))
        ));
    }

    #[test]
    fn key_specs_are_validated() {
        let (_d, s) = store();
        let bad = [
            KeySpec::default(),
            spec("has space"),
            spec("1234"),
            spec(&"x".repeat(65)),
            spec("(no key)"),
            KeySpec {
                rpm: Some(0),
                ..spec("a")
            },
            KeySpec {
                tpm: Some(0),
                ..spec("a")
            },
            KeySpec {
                tpm: Some(u64::MAX),
                ..spec("a")
            },
            KeySpec {
                budget_usd: Some(-1.0),
                ..spec("a")
            },
            KeySpec {
                budget_usd: Some(0.0),
                ..spec("a")
            },
            KeySpec {
                budget_usd: Some(f64::NAN),
                ..spec("a")
            },
        ];
        for k in bad {
            let e = s.create_key(&k).unwrap_err();
            assert!(
                matches!(e, AccountingError::InvalidKeySpec { .. }),
                "{k:?}: {e}"
            );
        }
        assert!(!s.has_keys().unwrap());
        let e = s
            .create_key(&KeySpec {
                rpm: Some(0),
                ..spec("a")
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("rpm") && e.contains("at least 1"), "{e}");
        s.create_key(&spec("a")).unwrap();
        assert!(matches!(
            s.create_key(&spec("a")),
            Err(AccountingError::DuplicateName(_))
        ));
    }

    #[test]
    fn secrets_are_distinct_and_use_the_whole_alphabet() {
        let mut seen = std::collections::HashSet::new();
        let mut chars = std::collections::HashSet::new();
        for _ in 0..200 {
            let s = new_secret().unwrap();
            chars.extend(s[4..].chars());
            assert!(seen.insert(s));
        }
        // 8000 draws from 62 symbols: missing one has probability ~62 × (61/62)^8000 ≈ 0.
        assert_eq!(chars.len(), 62);
    }

    #[test]
    fn reopen_keeps_data_and_refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let (k, secret) = {
            let s = Store::open(dir.path()).unwrap();
            s.create_key(&spec("a")).unwrap()
        };
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.verify(&secret).unwrap(), Some(k));
        drop(s);
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute("UPDATE schema_version SET version = 99", [])
            .unwrap();
        drop(conn);
        let e = Store::open(dir.path()).err().unwrap();
        assert!(matches!(e, AccountingError::SchemaTooNew { found: 99, .. }));
        assert!(e.to_string().contains("upgrade ferrolm"), "{e}");
    }

    #[test]
    fn open_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        let e = Store::open(&file).err().unwrap().to_string();
        assert!(e.contains("not-a-dir") && e.contains("--data-dir"), "{e}");
        let garbage = dir.path().join("g");
        std::fs::create_dir(&garbage).unwrap();
        std::fs::write(garbage.join(DB_FILE), vec![b'z'; 4096]).unwrap();
        let e = Store::open(&garbage).err().unwrap().to_string();
        assert!(e.contains(DB_FILE), "{e}");
    }

    #[test]
    fn ledger_and_running_spend() {
        let (_d, s) = store();
        let (a, _) = s.create_key(&spec("a")).unwrap();
        let (b, _) = s.create_key(&spec("b")).unwrap();
        let costs = [0.1, 0.2, 0.3, 1e-7, 0.031375, 0.012625];
        for (i, c) in costs.iter().enumerate() {
            s.record(&row(Some(a.id), "m", 1_000 + i as i64, *c))
                .unwrap();
        }
        s.record(&row(Some(b.id), "m", 5_000, 2.0)).unwrap();
        s.record(&row(None, "m", 6_000, 9.0)).unwrap();
        let total: f64 = costs.iter().sum();
        assert!((s.spent_usd(a.id).unwrap() - total).abs() < 1e-12);
        assert!((s.spent_usd(a.id).unwrap() - s.spent_usd_by_sum(a.id)).abs() < 1e-12);
        assert_eq!(s.spent_usd(b.id).unwrap(), 2.0);
        assert!(matches!(
            s.spent_usd(12345),
            Err(AccountingError::UnknownKey(_))
        ));
        // Revoked keys keep their rows and may still record (a request in flight).
        s.revoke_key("b").unwrap();
        s.record(&row(Some(b.id), "m", 7_000, 1.0)).unwrap();
        assert_eq!(s.spent_usd(b.id).unwrap(), 3.0);
        assert_eq!(s.spent_usd_by_sum(b.id), 3.0);
    }

    /// A write whose commit landed but whose acknowledgement was lost is retried with the
    /// same row: it must count once, for keys without limits too (no admission to settle).
    #[test]
    fn a_retried_ledger_row_lands_once_and_rows_of_one_request_each_land() {
        let (_d, s) = store();
        let (a, _) = s.create_key(&spec("a")).unwrap();
        for key in [Some(a.id), None] {
            let r = row(key, "m", 1_000, 0.5);
            s.record(&r).unwrap();
            s.record(&r).unwrap(); // the retry
            s.record_admitted(&r, None).unwrap();
        }
        assert_eq!(s.spent_usd(a.id).unwrap(), 0.5);
        assert_eq!(s.spent_usd_by_sum(a.id), 0.5);
        // best_of: the generation and its reward scoring share the request id, not the key.
        let gen = row(Some(a.id), "policy", 2_000, 0.25);
        let mut scoring = row(Some(a.id), "reward", 2_000, 0.125);
        scoring.request_id = gen.request_id.clone();
        s.record(&gen).unwrap();
        s.record(&scoring).unwrap();
        s.record(&scoring).unwrap();
        assert_eq!(s.spent_usd(a.id).unwrap(), 0.875);
        assert_eq!(s.spent_usd_by_sum(a.id), 0.875);
        let total = s.usage(&UsageQuery::default()).unwrap();
        assert_eq!(total[0].requests, 4);
        let mut keyless = row(None, "m", 3_000, 0.0);
        keyless.row_key.clear();
        assert!(matches!(
            s.record(&keyless),
            Err(AccountingError::InvalidUsage { .. })
        ));
    }

    /// Schema 10 gives old rows a key each, so a ledger with repeated request ids (best_of,
    /// or a client reusing `x-request-id`) migrates with none dropped.
    #[test]
    fn a_version_9_ledger_with_repeated_request_ids_migrates_to_unique_row_keys() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            for sql in &MIGRATIONS[..9] {
                conn.execute_batch(sql).unwrap();
            }
            conn.execute_batch(
                "CREATE TABLE schema_version (version INTEGER NOT NULL);
                 INSERT INTO schema_version VALUES (9);",
            )
            .unwrap();
            for cost in [0.5, 0.5, 0.25] {
                conn.execute(
                    "INSERT INTO usage (ts, request_id, model, endpoint, status, prompt_tokens,
                        cached_tokens, completion_tokens, latency_ms, cost_usd)
                     VALUES (1, 'same', 'm', '/v1/chat/completions', 200, 10, 0, 5, 1.0, ?1)",
                    [cost],
                )
                .unwrap();
            }
        }
        let store = Store::open(dir.path()).unwrap();
        let total = store.usage(&UsageQuery::default()).unwrap();
        assert_eq!(total[0].requests, 3);
        assert!((total[0].cost_usd - 1.25).abs() < 1e-12);
        let conn = store.conn().unwrap();
        let keys: i64 = conn
            .query_row(
                "SELECT COUNT(DISTINCT row_key) FROM usage WHERE row_key IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(keys, 3);
    }

    #[test]
    fn bad_rows_are_refused_and_leave_no_trace() {
        let (_d, s) = store();
        let (a, _) = s.create_key(&spec("a")).unwrap();
        let mut r = row(Some(a.id), "m", 1, 1.0);
        r.cached_tokens = 101;
        assert!(matches!(
            s.record(&r),
            Err(AccountingError::InvalidUsage { .. })
        ));
        for f in [
            |r: &mut UsageRow| r.cost_usd = -0.5,
            |r: &mut UsageRow| r.latency_ms = f64::NAN,
            |r: &mut UsageRow| r.ttft_ms = Some(f64::INFINITY),
            |r: &mut UsageRow| r.ts = -1,
            |r: &mut UsageRow| r.prompt_tokens = u64::MAX,
        ] {
            let mut r = row(Some(a.id), "m", 1, 1.0);
            f(&mut r);
            assert!(s.record(&r).is_err(), "{r:?}");
        }
        let e = s.record(&row(Some(777), "m", 1, 1.0)).unwrap_err();
        assert!(matches!(
            e,
            AccountingError::UsageUnknownKey { key_id: 777, .. }
        ));
        assert_eq!(s.spent_usd(a.id).unwrap(), 0.0);
        let total = s.usage(&UsageQuery::default()).unwrap();
        assert_eq!(total.len(), 1);
        assert_eq!(total[0].requests, 0);
    }

    #[test]
    fn usage_groups_filters_and_isolation() {
        let (_d, s) = store();
        let (a, _) = s.create_key(&spec("alice")).unwrap();
        let (b, _) = s.create_key(&spec("bob")).unwrap();
        let day1 = crate::time::day_start_ms("2025-11-29").unwrap();
        let day2 = crate::time::day_start_ms("2025-11-30").unwrap();
        s.record(&row(Some(a.id), "gpt-4o", day1 + 10, 1.0))
            .unwrap();
        s.record(&row(Some(a.id), "gpt-4o", day2 + 10, 2.0))
            .unwrap();
        let mut no_ttft = row(Some(a.id), "smol", day2 + 20, 0.5);
        no_ttft.ttft_ms = None;
        no_ttft.latency_ms = 150.0;
        s.record(&no_ttft).unwrap();
        s.record(&row(Some(b.id), "gpt-4o", day2 + 30, 4.0))
            .unwrap();
        s.record(&row(None, "smol", day2 + 40, 0.0)).unwrap();

        // No grouping: one total row.
        let t = s.usage(&UsageQuery::default()).unwrap();
        assert_eq!(t.len(), 1);
        let t = &t[0];
        assert_eq!(
            (t.key.as_deref(), t.model.as_deref(), t.day.as_deref()),
            (None, None, None)
        );
        assert_eq!(
            (
                t.requests,
                t.prompt_tokens,
                t.cached_tokens,
                t.completion_tokens
            ),
            (5, 500, 100, 50)
        );
        assert_eq!(t.cost_usd, 7.5);
        assert_eq!(t.avg_latency_ms, 70.0);
        // Latencies 50, 50, 50, 50, 150: nearest ranks 3 and 5.
        assert_eq!(
            (t.p50_latency_ms, t.p95_latency_ms),
            (Some(50.0), Some(150.0))
        );
        assert_eq!(t.avg_ttft_ms, Some(5.0));
        // Per group: smol has 150 and 50 (ranks 1 and 2), gpt-4o three 50s.
        let by_model = s
            .usage(&UsageQuery {
                group_by: vec![GroupBy::Model],
                ..Default::default()
            })
            .unwrap();
        let p: Vec<_> = by_model
            .iter()
            .map(|g| (g.model.clone().unwrap(), g.p50_latency_ms, g.p95_latency_ms))
            .collect();
        assert_eq!(
            p,
            vec![
                ("gpt-4o".to_owned(), Some(50.0), Some(50.0)),
                ("smol".to_owned(), Some(50.0), Some(150.0))
            ]
        );

        // By key: alice, bob, then requests without a key.
        let by_key = s
            .usage(&UsageQuery {
                group_by: vec![GroupBy::Key],
                ..Default::default()
            })
            .unwrap();
        let keys: Vec<_> = by_key
            .iter()
            .map(|g| (g.key.clone().unwrap(), g.requests, g.cost_usd))
            .collect();
        assert_eq!(
            keys,
            vec![
                (NO_KEY.to_owned(), 1, 0.0),
                ("alice".to_owned(), 3, 3.5),
                ("bob".to_owned(), 1, 4.0)
            ]
        );

        // One key sees only its own rows, whatever the grouping.
        for group_by in [
            vec![],
            vec![GroupBy::Key],
            vec![GroupBy::Model, GroupBy::Day],
            vec![GroupBy::Day, GroupBy::Key, GroupBy::Model],
        ] {
            let r = s
                .usage(&UsageQuery {
                    group_by: group_by.clone(),
                    key_id: Some(b.id),
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(r.len(), 1, "{group_by:?}");
            assert_eq!((r[0].requests, r[0].cost_usd), (1, 4.0));
            if group_by.contains(&GroupBy::Key) {
                assert_eq!(r[0].key.as_deref(), Some("bob"));
            }
        }

        // By day then model, for alice.
        let r = s
            .usage(&UsageQuery {
                group_by: vec![GroupBy::Day, GroupBy::Model, GroupBy::Day],
                key_id: Some(a.id),
                ..Default::default()
            })
            .unwrap();
        let got: Vec<_> = r
            .iter()
            .map(|g| {
                (
                    g.day.clone().unwrap(),
                    g.model.clone().unwrap(),
                    g.requests,
                    g.avg_ttft_ms,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("2025-11-29".into(), "gpt-4o".into(), 1, Some(5.0)),
                ("2025-11-30".into(), "gpt-4o".into(), 1, Some(5.0)),
                ("2025-11-30".into(), "smol".into(), 1, None),
            ]
        );

        // since is inclusive, until exclusive.
        let r = s
            .usage(&UsageQuery {
                since_ms: Some(day2),
                until_ms: Some(day2 + 30),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(r[0].requests, 2);
        assert!(matches!(
            s.usage(&UsageQuery {
                since_ms: Some(day2),
                until_ms: Some(day2),
                ..Default::default()
            }),
            Err(AccountingError::InvalidQuery(_))
        ));
    }

    #[test]
    fn store_urls_parse_and_a_sqlite_url_opens_that_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub").join("x.db");
        let url: StoreUrl = format!("sqlite:{}", file.display()).parse().unwrap();
        assert_eq!(url, StoreUrl::Sqlite(file.clone()));
        let s = Store::open_url(&url).unwrap();
        assert!(!s.is_shared());
        s.create_key(&spec("a")).unwrap();
        assert!(file.exists());
        assert!(matches!(
            s.admit(&s.find_key("a").unwrap(), 1, 0.0),
            Err(AccountingError::NotShared)
        ));
        assert_eq!(
            "postgresql://u@h/db".parse::<StoreUrl>().unwrap(),
            StoreUrl::Postgres("postgresql://u@h/db".into())
        );
        for bad in ["", "sqlite:", "mysql://h/db", "/tmp/x.db"] {
            let e = bad.parse::<StoreUrl>().unwrap_err().to_string();
            assert!(
                e.contains("sqlite:PATH") && e.contains("postgres://"),
                "{e}"
            );
        }
    }

    #[test]
    fn group_by_parses() {
        assert_eq!("Key".parse::<GroupBy>().unwrap(), GroupBy::Key);
        assert_eq!(" day".parse::<GroupBy>().unwrap(), GroupBy::Day);
        let e = "week".parse::<GroupBy>().unwrap_err().to_string();
        assert!(e.contains("key, model or day"), "{e}");
    }

    #[test]
    fn concurrent_writers_from_two_handles() {
        let dir = tempfile::tempdir().unwrap();
        let s1 = std::sync::Arc::new(Store::open(dir.path()).unwrap());
        let s2 = std::sync::Arc::new(Store::open(dir.path()).unwrap());
        let (k, _) = s1.create_key(&spec("k")).unwrap();
        let threads: Vec<_> = [s1.clone(), s2.clone(), s1.clone(), s2.clone()]
            .into_iter()
            .enumerate()
            .map(|(t, s)| {
                std::thread::spawn(move || {
                    for i in 0..50 {
                        s.record(&row(Some(k.id), "m", (t * 100 + i) as i64, 0.01))
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let total = &s2.usage(&UsageQuery::default()).unwrap()[0];
        assert_eq!(total.requests, 200);
        assert!((s1.spent_usd(k.id).unwrap() - 2.0).abs() < 1e-9);
    }
}
