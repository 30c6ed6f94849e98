//! The shared store: keys, limits and the ledger in PostgreSQL (`--store postgres://…`), so
//! that several `ferrolm serve` replicas are one service.
//!
//! Contract:
//! - The schema is SQLite's (`store::MIGRATIONS`), translated word for word ([`postgres_ddl`]),
//!   versioned and migrated the same way; replicas starting together migrate one at a time (an
//!   advisory lock), and a database written by a newer ferrolm is refused, never touched.
//! - Nothing about a key is cached: every request's key is looked up in the database, so a
//!   revocation on one replica holds on every replica from its next request. (Only "this
//!   store has keys" is remembered once true: keys are never deleted.)
//! - Rate limits and budgets are decided inside one transaction per admitted request that
//!   locks the key's row (`SELECT … FOR UPDATE`), so replicas admit a key's requests one at a
//!   time: the window (`admissions` of the last 60 s, by the database's clock) and the
//!   budget's holds are read and the new admission written before the next replica looks.
//!   The decision itself is `limits`'s sliding-window rule, the same as one server's.
//! - A ledger row of an admitted request settles its admission in the same transaction (real
//!   tokens replace the estimate, the hold is released); a row whose admission is already
//!   settled is not written again, so a retried write counts the request once. So is any row
//!   whose `row_key` the ledger holds (a unique index), admitted or not.
//! - Stored chat completions, uploaded files' records and fine-tuning jobs (with their events,
//!   checkpoints and the queue's leases, see `tuning`) live here too: every replica lists and
//!   exports the same ones (the files' bytes and the runs are in the blob store, `--blobs`).
//!   So do stored responses and their items (see `responses`): a `previous_response_id`
//!   made on one replica continues on any other.
//! - Calls block the caller, as SQLite's do: each runs on this store's own small tokio runtime
//!   and is waited for. Nothing waits long: the pool's wait, connect and recycle steps each
//!   give up after [`STEP_TIMEOUT`], a whole call after [`CALL_TIMEOUT`]; such failures are
//!   [`AccountingError::StoreUnavailable`] (the server's 503), and the pool makes new
//!   connections once PostgreSQL is back, so service resumes by itself. After such a failure,
//!   calls fail at once for [`FAIL_FAST`], so a hung database does not tie up every request.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::PoisonError;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use crate::completions::{self, CompletionQuery, CompletionRecord, Owner};
use crate::limits::{Headroom, Limited, RateLimiter, WINDOW};
use crate::responses::{self, ResponseRecord};
use crate::store::{pick_key, GroupBy, KeyInfo, KeySpec, UsageGroup, UsageRow, KEY_COLUMNS};
use crate::tuning::{
    Claim, FileRecord, JobCheckpoint, JobEvent, JobRecord, Page, CLAIMABLE, FILE_COLUMNS,
    JOB_COLUMNS,
};
use crate::{AccountingError, SCHEMA_VERSION};

/// The most one pool step (waiting for a free connection, connecting, checking one) takes.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(2);
/// The most one store call takes, its queries included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// After a call found the store unavailable, later calls fail at once for this long, so a
/// database that hangs does not hold every request (and the server's threads) for
/// [`CALL_TIMEOUT`]; the first call after it tries again.
const FAIL_FAST: Duration = Duration::from_secs(2);
/// Connections per replica: requests hold one only for their short transactions.
const POOL_SIZE: usize = 8;
/// An admission not settled after this long is from a replica that died mid-request: its
/// budget hold lapses (and its row goes).
const HOLD_LAPSES_MS: i64 = 3_600_000;
/// The database's clock in unix milliseconds: one clock for every replica (leases, windows).
const DB_NOW_MS: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";
/// Serialises migrations of replicas that start together (any constant; "ferrolm" in ASCII).
const MIGRATION_LOCK: i64 = 0x0066_6572_726f_6c6d;

/// A request [`crate::Store::admit`] let through: its admission (for
/// [`crate::Store::record_admitted`]) and the key's rate-limit headroom.
#[derive(Clone, Debug)]
pub struct Admission {
    pub id: i64,
    pub headroom: Headroom,
}

/// Why [`crate::Store::admit`] refused a request.
#[derive(Clone, Debug)]
pub enum Refusal {
    /// Its rpm or tpm is used up.
    Limited(Limited),
    /// The key's recorded spend plus what its running requests hold reached its budget.
    OverBudget {
        spent_usd: f64,
        held_usd: f64,
        budget_usd: f64,
    },
    /// The key was revoked since the request was authenticated.
    Revoked,
}

pub(crate) struct Pg {
    /// The URL without its password, for messages.
    shown: String,
    pool: Pool,
    /// Runs the pool's connections; `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    /// Once true, stays true: keys are never deleted.
    has_keys: AtomicBool,
    /// Until when calls fail fast ([`FAIL_FAST`]), with the last failure's message.
    down: std::sync::Mutex<Option<(std::time::Instant, String)>>,
}

impl Drop for Pg {
    fn drop(&mut self) {
        // Dropping a runtime inside another one (the server's) panics; this does not wait.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// `url` with its password replaced by `***`.
fn shown_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((user, host)) if user.contains(':') => {
            let name = user.split(':').next().unwrap_or("");
            format!("{scheme}://{name}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

/// SQLite DDL as PostgreSQL's: the rowid keys become identity columns, and whole words
/// INTEGER, REAL and BLOB become BIGINT, DOUBLE PRECISION and BYTEA. The rest of the schema
/// (CHECKs, partial indexes, comments) is common SQL.
pub(crate) fn postgres_ddl(sqlite: &str) -> String {
    let identity = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY";
    let s = sqlite
        .replace("INTEGER PRIMARY KEY AUTOINCREMENT", identity)
        .replace("INTEGER PRIMARY KEY", identity);
    let word = |w: &str| -> String {
        match w {
            "INTEGER" => "BIGINT".into(),
            "REAL" => "DOUBLE PRECISION".into(),
            "BLOB" => "BYTEA".into(),
            w => w.into(),
        }
    };
    let mut out = String::with_capacity(s.len() + 64);
    let mut w = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            w.push(c);
        } else {
            out += &word(&w);
            w.clear();
            out.push(c);
        }
    }
    out += &word(&w);
    out
}

/// A failure of the connection (refused, closed, timed out, server shutting down) is the
/// store being unavailable; anything else is an error of the statement.
fn pg_error(shown: &str, e: tokio_postgres::Error) -> AccountingError {
    let unavailable = match e.as_db_error() {
        // 08: connection exception; 57P0x: the server is shutting down or starting.
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08") || code.starts_with("57P")
        }
        None => true,
    };
    if unavailable {
        AccountingError::StoreUnavailable {
            store: shown.to_owned(),
            message: e.to_string(),
        }
    } else {
        AccountingError::Postgres {
            store: shown.to_owned(),
            message: e
                .as_db_error()
                .map_or_else(|| e.to_string(), |d| d.to_string()),
        }
    }
}

fn pool_error(shown: &str, e: PoolError) -> AccountingError {
    match e {
        PoolError::Backend(e) => pg_error(shown, e),
        e => AccountingError::StoreUnavailable {
            store: shown.to_owned(),
            message: e.to_string(),
        },
    }
}

fn unique_violation(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().map(|d| d.code().code()) == Some("23505")
}

fn key_from_row(shown: &str, r: &Row) -> Result<KeyInfo, AccountingError> {
    let bad = |e: tokio_postgres::Error| pg_error(shown, e);
    let rpm: Option<i64> = r.try_get(3).map_err(bad)?;
    let tpm: Option<i64> = r.try_get(4).map_err(bad)?;
    let range = |field: &str, v: i64| AccountingError::Postgres {
        store: shown.to_owned(),
        message: format!("api_keys.{field} is {v}, out of range"),
    };
    Ok(KeyInfo {
        id: r.try_get(0).map_err(bad)?,
        name: r.try_get(1).map_err(bad)?,
        prefix: r.try_get(2).map_err(bad)?,
        rpm: rpm
            .map(|v| u32::try_from(v).map_err(|_| range("rpm", v)))
            .transpose()?,
        tpm: tpm
            .map(|v| u64::try_from(v).map_err(|_| range("tpm", v)))
            .transpose()?,
        budget_usd: r.try_get(5).map_err(bad)?,
        created: r.try_get(6).map_err(bad)?,
        revoked: r.try_get(7).map_err(bad)?,
        admin: r.try_get::<_, i64>(8).map_err(bad)? != 0,
    })
}

impl Pg {
    /// Connect to `url`, check that the database is reachable and migrate it.
    pub(crate) fn connect(url: &str) -> Result<Pg, AccountingError> {
        let shown = shown_url(url);
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e| AccountingError::Postgres {
                store: shown.clone(),
                message: format!("not a PostgreSQL URL ({e}): expected postgres://USER[:PASSWORD]@HOST[:PORT]/DB"),
            })?;
        config.connect_timeout(STEP_TIMEOUT);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                // A connection PostgreSQL closed (a restart) is seen as closed and replaced.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferrolm-pg")
            .enable_all()
            .build()
            .map_err(|e| AccountingError::StoreUnavailable {
                store: shown.clone(),
                message: format!("cannot start the store's runtime: {e}"),
            })?;
        let pool = {
            // The pool's timeouts run on the runtime they are built in.
            let _guard = rt.enter();
            Pool::builder(manager)
                .max_size(POOL_SIZE)
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(STEP_TIMEOUT))
                .create_timeout(Some(STEP_TIMEOUT))
                .recycle_timeout(Some(STEP_TIMEOUT))
                .build()
                .map_err(|e| AccountingError::Postgres {
                    store: shown.clone(),
                    message: format!("cannot make a connection pool: {e}"),
                })?
        };
        let pg = Pg {
            shown,
            pool,
            rt: Some(rt),
            has_keys: AtomicBool::new(false),
            down: std::sync::Mutex::new(None),
        };
        pg.call(|pool, shown| async move { migrate(&pool, &shown).await })?;
        Ok(pg)
    }

    pub(crate) fn shown_url(&self) -> &str {
        &self.shown
    }

    /// Run `f` on the store's runtime and wait for it, at most [`CALL_TIMEOUT`].
    fn call<T, F, Fut>(&self, f: F) -> Result<T, AccountingError>
    where
        F: FnOnce(Pool, String) -> Fut,
        Fut: Future<Output = Result<T, AccountingError>> + Send + 'static,
        T: Send + 'static,
    {
        let unavailable = |message: String| AccountingError::StoreUnavailable {
            store: self.shown.clone(),
            message,
        };
        let Some(rt) = &self.rt else {
            return Err(unavailable("the store is shutting down".into()));
        };
        let mut down = self.down.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((until, message)) = down.as_ref() {
            if std::time::Instant::now() < *until {
                return Err(unavailable(format!(
                    "{message}; not retried for {} s",
                    FAIL_FAST.as_secs()
                )));
            }
            *down = None;
        }
        drop(down);
        let fut = f(self.pool.clone(), self.shown.clone());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(tokio::time::timeout(CALL_TIMEOUT, fut).await);
        });
        let r = match rx.recv() {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(unavailable(format!(
                "no answer within {} s",
                CALL_TIMEOUT.as_secs()
            ))),
            Err(_) => Err(unavailable("the store's runtime stopped".into())),
        };
        if let Err(AccountingError::StoreUnavailable { message, .. }) = &r {
            *self.down.lock().unwrap_or_else(PoisonError::into_inner) =
                Some((std::time::Instant::now() + FAIL_FAST, message.clone()));
        }
        r
    }

    pub(crate) fn create_key(
        &self,
        spec: &KeySpec,
        rpm: Option<i64>,
        tpm: Option<i64>,
        prefix: &str,
        hash: Vec<u8>,
    ) -> Result<KeyInfo, AccountingError> {
        let (name, prefix, budget) = (spec.name.clone(), prefix.to_owned(), spec.budget_usd);
        let admin = i64::from(spec.admin);
        let created = crate::time::now_unix_ms() / 1000;
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let r = c
                .query_one(
                    &format!(
                        "INSERT INTO api_keys (name, prefix, hash, rpm, tpm, budget_usd, created, admin)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {KEY_COLUMNS}"
                    ),
                    &[&name, &prefix, &hash, &rpm, &tpm, &budget, &created, &admin],
                )
                .await;
            match r {
                Ok(row) => key_from_row(&shown, &row),
                // The partial unique index on active names: another replica may have made it.
                Err(e) if unique_violation(&e) => Err(AccountingError::DuplicateName(name)),
                Err(e) => Err(pg_error(&shown, e)),
            }
        })
    }

    pub(crate) fn list_keys(&self) -> Result<Vec<KeyInfo>, AccountingError> {
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let rows = c
                .query(
                    &format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id"),
                    &[],
                )
                .await
                .map_err(|e| pg_error(&shown, e))?;
            rows.iter().map(|r| key_from_row(&shown, r)).collect()
        })
    }

    pub(crate) fn find_key(&self, q: &str) -> Result<KeyInfo, AccountingError> {
        let q = q.to_owned();
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let client: &tokio_postgres::Client = &c;
            let found = keys_named(client, &shown, &q).await?;
            pick_key(found, &q, false)
        })
    }

    pub(crate) fn revoke_key(&self, q: &str) -> Result<KeyInfo, AccountingError> {
        let q = q.to_owned();
        self.call(|pool, shown| async move {
            let mut c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let tx = c.transaction().await.map_err(|e| pg_error(&shown, e))?;
            let t: &tokio_postgres::Transaction = &tx;
            let key = pick_key(keys_named(t, &shown, &q).await?, &q, true)?;
            let now = crate::time::now_unix_ms() / 1000;
            let n = tx
                .execute(
                    "UPDATE api_keys SET revoked = $1 WHERE id = $2 AND revoked IS NULL",
                    &[&now, &key.id],
                )
                .await
                .map_err(|e| pg_error(&shown, e))?;
            if n == 0 {
                return Err(AccountingError::AlreadyRevoked {
                    name: key.name,
                    id: key.id,
                });
            }
            tx.commit().await.map_err(|e| pg_error(&shown, e))?;
            Ok(KeyInfo {
                revoked: Some(now),
                ..key
            })
        })
    }

    pub(crate) fn has_keys(&self) -> Result<bool, AccountingError> {
        if self.has_keys.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let any = self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let r = c
                .query_one("SELECT EXISTS(SELECT 1 FROM api_keys)", &[])
                .await
                .map_err(|e| pg_error(&shown, e))?;
            r.try_get::<_, bool>(0).map_err(|e| pg_error(&shown, e))
        })?;
        if any {
            self.has_keys.store(true, Ordering::Relaxed);
        }
        Ok(any)
    }

    pub(crate) fn verify(&self, hash: Vec<u8>) -> Result<Option<KeyInfo>, AccountingError> {
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let row = c
                .query_opt(
                    &format!(
                        "SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = $1 AND revoked IS NULL"
                    ),
                    &[&hash],
                )
                .await
                .map_err(|e| pg_error(&shown, e))?;
            row.map(|r| key_from_row(&shown, &r)).transpose()
        })
    }

    pub(crate) fn spent_usd(&self, key_id: i64) -> Result<f64, AccountingError> {
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let row = c
                .query_opt("SELECT spent_usd FROM api_keys WHERE id = $1", &[&key_id])
                .await
                .map_err(|e| pg_error(&shown, e))?;
            match row {
                Some(r) => r.try_get(0).map_err(|e| pg_error(&shown, e)),
                None => Err(AccountingError::UnknownKey(key_id.to_string())),
            }
        })
    }

    /// See [`crate::Store::admit`].
    pub(crate) fn admit(
        &self,
        key: &KeyInfo,
        tokens: u64,
        worst_usd: f64,
    ) -> Result<Result<Admission, Refusal>, AccountingError> {
        let key = key.clone();
        self.call(|pool, shown| async move {
            let err = |e| pg_error(&shown, e);
            let mut c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let tx = c.transaction().await.map_err(err)?;
            // The row lock serialises this key's admissions across replicas; the clock is the
            // database's, one for all replicas.
            let Some(k) = tx
                .query_opt(
                    "SELECT budget_usd, spent_usd, revoked IS NOT NULL,
                            CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)
                     FROM api_keys WHERE id = $1 FOR UPDATE",
                    &[&key.id],
                )
                .await
                .map_err(err)?
            else {
                return Ok(Err(Refusal::Revoked));
            };
            let budget: Option<f64> = k.try_get(0).map_err(err)?;
            let spent: f64 = k.try_get(1).map_err(err)?;
            let revoked: bool = k.try_get(2).map_err(err)?;
            let now: i64 = k.try_get(3).map_err(err)?;
            if revoked {
                return Ok(Err(Refusal::Revoked));
            }
            let window_ms = WINDOW.as_millis() as i64;
            tx.execute(
                "DELETE FROM admissions WHERE key_id = $1 AND ts <= $2 AND (settled = 1 OR ts <= $3)",
                &[&key.id, &(now - window_ms), &(now - HOLD_LAPSES_MS)],
            )
            .await
            .map_err(err)?;
            let rows = tx
                .query(
                    "SELECT ts, tokens, held_usd, settled FROM admissions
                     WHERE key_id = $1 ORDER BY ts, id",
                    &[&key.id],
                )
                .await
                .map_err(err)?;
            let mut past = Vec::new();
            let mut held_usd = 0.0;
            for r in &rows {
                let ts: i64 = r.try_get(0).map_err(err)?;
                let t: i64 = r.try_get(1).map_err(err)?;
                let held: f64 = r.try_get(2).map_err(err)?;
                let settled: i64 = r.try_get(3).map_err(err)?;
                if settled == 0 && ts > now - HOLD_LAPSES_MS {
                    held_usd += held;
                }
                if ts > now - window_ms {
                    let age = u64::try_from(now - ts).unwrap_or(0);
                    past.push((Duration::from_millis(age), u64::try_from(t).unwrap_or(0)));
                }
            }
            // The same rule as one server's `Budgets`: refused once spend plus holds reach
            // the budget, so the overshoot is at most one request's worst case.
            if let Some(b) = budget {
                if spent + held_usd >= b {
                    return Ok(Err(Refusal::OverBudget {
                        spent_usd: spent,
                        held_usd,
                        budget_usd: b,
                    }));
                }
            }
            let headroom = match RateLimiter::admit_from_log(&key, &past, tokens) {
                Ok(h) => h,
                Err(l) => return Ok(Err(Refusal::Limited(l))),
            };
            let hold = if budget.is_some() {
                worst_usd.max(0.0)
            } else {
                0.0
            };
            let r = tx
                .query_one(
                    "INSERT INTO admissions (key_id, ts, tokens, held_usd) VALUES ($1, $2, $3, $4)
                     RETURNING id",
                    &[
                        &key.id,
                        &now,
                        &i64::try_from(tokens).unwrap_or(i64::MAX),
                        &hold,
                    ],
                )
                .await
                .map_err(err)?;
            let id: i64 = r.try_get(0).map_err(err)?;
            tx.commit().await.map_err(err)?;
            Ok(Ok(Admission { id, headroom }))
        })
    }

    pub(crate) fn record(
        &self,
        row: &UsageRow,
        [prompt, cached, completion]: [i64; 3],
        admission: Option<i64>,
    ) -> Result<(), AccountingError> {
        let row = row.clone();
        self.call(|pool, shown| async move {
            let err = |e| pg_error(&shown, e);
            let mut c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let tx = c.transaction().await.map_err(err)?;
            if let Some(a) = admission {
                let settled = tx
                    .query_opt(
                        "SELECT settled FROM admissions WHERE id = $1 FOR UPDATE",
                        &[&a],
                    )
                    .await
                    .map_err(err)?;
                let settled: Option<i64> =
                    settled.map(|r| r.try_get(0)).transpose().map_err(err)?;
                if settled == Some(1) {
                    return Ok(()); // written before: count it once
                }
                // A lapsed (deleted) admission still gets its ledger row.
                tx.execute(
                    "UPDATE admissions SET tokens = $2, held_usd = 0, settled = 1 WHERE id = $1",
                    &[&a, &(prompt + completion)],
                )
                .await
                .map_err(err)?;
            }
            if let Some(k) = row.key_id {
                let n = tx
                    .execute(
                        "UPDATE api_keys SET spent_usd = spent_usd + $1 WHERE id = $2",
                        &[&row.cost_usd, &k],
                    )
                    .await
                    .map_err(err)?;
                if n == 0 {
                    return Err(AccountingError::UsageUnknownKey {
                        request_id: row.request_id.clone(),
                        key_id: k,
                    });
                }
            }
            let status = i64::from(row.status);
            let compressed = i64::try_from(row.compressed_tokens).unwrap_or(i64::MAX);
            let written = tx.execute(
                "INSERT INTO usage (ts, request_id, key_id, model, endpoint, status, prompt_tokens,
                                    cached_tokens, completion_tokens, latency_ms, ttft_ms, cost_usd,
                                    finish_reason, route, compressed_tokens, saved_by_cache_usd,
                                    saved_by_compression_usd, saved_by_routing_usd,
                                    lazy_tool_tokens, saved_by_lazy_tools_usd, row_key)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                         $17, $18, $19, $20, $21)
                 ON CONFLICT (row_key) DO NOTHING",
                &[
                    &row.ts,
                    &row.request_id,
                    &row.key_id,
                    &row.model,
                    &row.endpoint,
                    &status,
                    &prompt,
                    &cached,
                    &completion,
                    &row.latency_ms,
                    &row.ttft_ms,
                    &row.cost_usd,
                    &row.finish_reason,
                    &row.route,
                    &compressed,
                    &row.saved_by_cache_usd,
                    &row.saved_by_compression_usd,
                    &row.saved_by_routing_usd,
                    &row.lazy_tool_tokens,
                    &row.saved_by_lazy_tools_usd,
                    &row.row_key,
                ],
            )
            .await
            .map_err(err)?;
            if written == 0 {
                return Ok(()); // written before: dropping tx rolls the spend back
            }
            tx.commit().await.map_err(err)
        })
    }

    /// Run a usage report built by `store::usage_sql`.
    pub(crate) fn usage(
        &self,
        sql: String,
        args: Vec<i64>,
        groups: Vec<GroupBy>,
    ) -> Result<Vec<UsageGroup>, AccountingError> {
        self.call(|pool, shown| async move {
            let err = |e| pg_error(&shown, e);
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let params: Vec<&(dyn ToSql + Sync)> =
                args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            let rows = c.query(&sql, &params).await.map_err(err)?;
            let n = groups.len();
            let count = |r: &Row, i: usize| -> Result<u64, AccountingError> {
                let v: i64 = r.try_get(i).map_err(err)?;
                u64::try_from(v).map_err(|_| AccountingError::Postgres {
                    store: shown.clone(),
                    message: format!("usage column {i} is {v}, negative"),
                })
            };
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let mut g = UsageGroup {
                    requests: count(r, n)?,
                    prompt_tokens: count(r, n + 1)?,
                    cached_tokens: count(r, n + 2)?,
                    completion_tokens: count(r, n + 3)?,
                    cost_usd: r.try_get(n + 4).map_err(err)?,
                    avg_latency_ms: r.try_get(n + 5).map_err(err)?,
                    avg_ttft_ms: r.try_get(n + 6).map_err(err)?,
                    compressed_tokens: count(r, n + 7)?,
                    saved_by_cache_usd: r.try_get(n + 8).map_err(err)?,
                    saved_by_compression_usd: r.try_get(n + 9).map_err(err)?,
                    saved_by_routing_usd: r.try_get(n + 10).map_err(err)?,
                    routed_requests: count(r, n + 11)?,
                    lazy_tool_tokens: r.try_get(n + 12).map_err(err)?,
                    saved_by_lazy_tools_usd: r.try_get(n + 13).map_err(err)?,
                    p50_latency_ms: r.try_get(n + 14).map_err(err)?,
                    p95_latency_ms: r.try_get(n + 15).map_err(err)?,
                    ..UsageGroup::default()
                };
                for (i, col) in groups.iter().enumerate() {
                    let v: String = r.try_get(i).map_err(err)?;
                    match col {
                        GroupBy::Key => g.key = Some(v),
                        GroupBy::Model => g.model = Some(v),
                        GroupBy::Day => g.day = Some(v),
                    }
                }
                out.push(g);
            }
            Ok(out)
        })
    }
}

/// Uploaded files' records (see `tuning`): the same columns and scoping as SQLite's.
impl Pg {
    pub(crate) fn insert_file(&self, f: &FileRecord) -> Result<(), AccountingError> {
        let f = f.clone();
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            c.execute(
                &format!("INSERT INTO files ({FILE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"),
                &[
                    &f.id,
                    &f.key_id,
                    &i64::try_from(f.bytes).unwrap_or(i64::MAX),
                    &f.created_at,
                    &f.filename,
                    &f.purpose,
                ],
            )
            .await
            .map_err(|e| pg_error(&shown, e))?;
            Ok(())
        })
    }

    pub(crate) fn file(
        &self,
        id: &str,
        key: Option<i64>,
    ) -> Result<Option<FileRecord>, AccountingError> {
        let id = id.to_owned();
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let row = c
                .query_opt(
                    &format!("SELECT {FILE_COLUMNS} FROM files WHERE id = $1 AND key_id IS NOT DISTINCT FROM $2"),
                    &[&id, &key],
                )
                .await
                .map_err(|e| pg_error(&shown, e))?;
            row.map(|r| file_from_row(&shown, &r)).transpose()
        })
    }

    pub(crate) fn files(&self, key: Option<i64>) -> Result<Vec<FileRecord>, AccountingError> {
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let rows = c
                .query(
                    &format!("SELECT {FILE_COLUMNS} FROM files WHERE key_id IS NOT DISTINCT FROM $1 ORDER BY seq DESC"),
                    &[&key],
                )
                .await
                .map_err(|e| pg_error(&shown, e))?;
            rows.iter().map(|r| file_from_row(&shown, r)).collect()
        })
    }

    pub(crate) fn delete_file(&self, id: &str, key: Option<i64>) -> Result<bool, AccountingError> {
        let id = id.to_owned();
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let n = c
                .execute(
                    "DELETE FROM files WHERE id = $1 AND key_id IS NOT DISTINCT FROM $2",
                    &[&id, &key],
                )
                .await
                .map_err(|e| pg_error(&shown, e))?;
            Ok(n > 0)
        })
    }
}

fn file_from_row(shown: &str, r: &Row) -> Result<FileRecord, AccountingError> {
    let bad = |e: tokio_postgres::Error| pg_error(shown, e);
    let bytes: i64 = r.try_get(2).map_err(bad)?;
    Ok(FileRecord {
        id: r.try_get(0).map_err(bad)?,
        key_id: r.try_get(1).map_err(bad)?,
        bytes: u64::try_from(bytes).unwrap_or(0),
        created_at: r.try_get(3).map_err(bad)?,
        filename: r.try_get(4).map_err(bad)?,
        purpose: r.try_get(5).map_err(bad)?,
    })
}

/// Fine-tuning jobs, their events and checkpoints, and the queue's leases (see `tuning`): the
/// same columns, scoping and rules as SQLite's.
impl Pg {
    pub(crate) fn insert_job(&self, j: &JobRecord) -> Result<(), AccountingError> {
        let j = j.clone();
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let tokens = j
                .trained_tokens
                .map(|t| i64::try_from(t).unwrap_or(i64::MAX));
            let (spec, error) = (j.spec.to_string(), j.error.as_ref().map(|e| e.to_string()));
            c.execute(
                &format!(
                    "INSERT INTO ft_jobs ({JOB_COLUMNS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
                ),
                &[
                    &j.id,
                    &j.key_id,
                    &j.created_at,
                    &j.status,
                    &j.model,
                    &j.training_file,
                    &j.validation_file,
                    &spec,
                    &j.fine_tuned_model,
                    &j.finished_at,
                    &tokens,
                    &error,
                    &j.epoch,
                ],
            )
            .await
            .map_err(|e| pg_error(&shown, e))?;
            Ok(())
        })
    }

    /// The job `id`; with `Some(key)`, only if it belongs to `key`.
    pub(crate) fn job(
        &self,
        id: &str,
        key: Option<Option<i64>>,
    ) -> Result<Option<JobRecord>, AccountingError> {
        let id = id.to_owned();
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let row = match key {
                Some(key) => {
                    c.query_opt(
                        &format!("SELECT {JOB_COLUMNS} FROM ft_jobs WHERE id = $1 AND key_id IS NOT DISTINCT FROM $2"),
                        &[&id, &key],
                    )
                    .await
                }
                None => {
                    c.query_opt(
                        &format!("SELECT {JOB_COLUMNS} FROM ft_jobs WHERE id = $1"),
                        &[&id],
                    )
                    .await
                }
            }
            .map_err(|e| pg_error(&shown, e))?;
            row.map(|r| job_from_row(&shown, &r)).transpose()
        })
    }

    pub(crate) fn jobs(
        &self,
        key: Option<i64>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<JobRecord>, AccountingError> {
        let after = after.map(str::to_owned);
        self.call(|pool, shown| async move {
            let err = |e| pg_error(&shown, e);
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let below = match &after {
                None => i64::MAX,
                Some(a) => c
                    .query_opt(
                        "SELECT seq FROM ft_jobs WHERE id = $1 AND key_id IS NOT DISTINCT FROM $2",
                        &[a, &key],
                    )
                    .await
                    .map_err(err)?
                    .ok_or_else(|| {
                        AccountingError::InvalidQuery(format!(
                            "after: `{a}` is not an id in this list"
                        ))
                    })?
                    .try_get(0)
                    .map_err(err)?,
            };
            let rows = c
                .query(
                    &format!(
                        "SELECT {JOB_COLUMNS} FROM ft_jobs WHERE key_id IS NOT DISTINCT FROM $1 AND seq < $2
                         ORDER BY seq DESC LIMIT $3"
                    ),
                    &[&key, &below, &(limit as i64 + 1)],
                )
                .await
                .map_err(err)?;
            let items = rows
                .iter()
                .map(|r| job_from_row(&shown, r))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(page(items, limit))
        })
    }

    pub(crate) fn jobs_with_status(
        &self,
        statuses: &[&str],
    ) -> Result<Vec<JobRecord>, AccountingError> {
        let statuses: Vec<String> = statuses.iter().map(|s| (*s).to_owned()).collect();
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let rows = c
                .query(
                    &format!(
                        "SELECT {JOB_COLUMNS} FROM ft_jobs WHERE status = ANY($1) ORDER BY seq"
                    ),
                    &[&statuses],
                )
                .await
                .map_err(|e| pg_error(&shown, e))?;
            rows.iter().map(|r| job_from_row(&shown, r)).collect()
        })
    }

    pub(crate) fn set_job_status(
        &self,
        id: &str,
        to: &str,
        from: &[&str],
    ) -> Result<bool, AccountingError> {
        let (id, to) = (id.to_owned(), to.to_owned());
        let from: Vec<String> = from.iter().map(|s| (*s).to_owned()).collect();
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let n = c
                .execute(
                    "UPDATE ft_jobs SET status = $1 WHERE id = $2 AND status = ANY($3)",
                    &[&to, &id, &from],
                )
                .await
                .map_err(|e| pg_error(&shown, e))?;
            Ok(n > 0)
        })
    }

    /// See [`crate::Store::finish_job`]; `end` is (status, fine-tuned model, error, end time).
    pub(crate) fn finish_job(
        &self,
        id: &str,
        from: &[&str],
        owner: Option<&str>,
        end: (&str, Option<&str>, Option<&serde_json::Value>, i64),
    ) -> Result<bool, AccountingError> {
        let (id, owner) = (id.to_owned(), owner.map(str::to_owned));
        let from: Vec<String> = from.iter().map(|s| (*s).to_owned()).collect();
        let (to, model, error, at) = (
            end.0.to_owned(),
            end.1.map(str::to_owned),
            end.2.map(|e| e.to_string()),
            end.3,
        );
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            // One statement: the status (and lease) check and the update are atomic.
            let n = c
                .execute(
                    "UPDATE ft_jobs SET status = $2, fine_tuned_model = $3, error = $4, finished_at = $5
                     WHERE id = $1 AND status = ANY($6) AND ($7::TEXT IS NULL OR lease_owner = $7)",
                    &[&id, &to, &model, &error, &at, &from, &owner],
                )
                .await
                .map_err(|e| pg_error(&shown, e))?;
            Ok(n > 0)
        })
    }

    pub(crate) fn set_trained_tokens(&self, id: &str, tokens: u64) -> Result<(), AccountingError> {
        let id = id.to_owned();
        let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            c.execute(
                "UPDATE ft_jobs SET trained_tokens = $2 WHERE id = $1",
                &[&id, &tokens],
            )
            .await
            .map_err(|e| pg_error(&shown, e))?;
            Ok(())
        })
    }

    pub(crate) fn add_job_event(&self, job: &str, e: &JobEvent) -> Result<i64, AccountingError> {
        let (job, e) = (job.to_owned(), e.clone());
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let data = e.data.as_ref().map(|d| d.to_string());
            c.query_one(
                "INSERT INTO ft_events (job_id, created_at, level, message, type, data)
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING seq",
                &[&job, &e.created_at, &e.level, &e.message, &e.kind, &data],
            )
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| pg_error(&shown, e))
        })
    }

    pub(crate) fn job_events(
        &self,
        job: &str,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Page<JobEvent>, AccountingError> {
        let job = job.to_owned();
        self.call(|pool, shown| async move {
            let err = |e| pg_error(&shown, e);
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let rows = c
                .query(
                    "SELECT seq, created_at, level, message, type, data FROM ft_events
                     WHERE job_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
                    &[&job, &after.unwrap_or(i64::MAX), &(limit as i64 + 1)],
                )
                .await
                .map_err(err)?;
            let mut items = Vec::with_capacity(rows.len());
            for r in &rows {
                let data: Option<String> = r.try_get(5).map_err(err)?;
                items.push(JobEvent {
                    seq: r.try_get(0).map_err(err)?,
                    created_at: r.try_get(1).map_err(err)?,
                    level: r.try_get(2).map_err(err)?,
                    message: r.try_get(3).map_err(err)?,
                    kind: r.try_get(4).map_err(err)?,
                    data: data
                        .map(|d| json_text(&shown, "ft_events.data", &d))
                        .transpose()?,
                });
            }
            Ok(page(items, limit))
        })
    }

    /// See [`crate::Store::add_job_checkpoint`]: `FOR SHARE` waits for a claim of the job
    /// being committed, then sees its epoch.
    pub(crate) fn add_job_checkpoint(
        &self,
        job: &str,
        ck: &JobCheckpoint,
        owner: &str,
    ) -> Result<bool, AccountingError> {
        let (job, ck, owner) = (job.to_owned(), ck.clone(), owner.to_owned());
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let step = i64::try_from(ck.step).unwrap_or(i64::MAX);
            let n = c
                .execute(
                    "INSERT INTO ft_checkpoints (job_id, created_at, step, model, metrics, epoch)
                     SELECT $1::TEXT, $2::BIGINT, $3::BIGINT, $4::TEXT, $5::TEXT, $6::BIGINT
                     WHERE EXISTS (SELECT 1 FROM ft_jobs
                                   WHERE id = $1 AND epoch = $6 AND lease_owner = $7 FOR SHARE)",
                    &[
                        &job,
                        &ck.created_at,
                        &step,
                        &ck.model,
                        &ck.metrics.to_string(),
                        &ck.epoch,
                        &owner,
                    ],
                )
                .await
                .map_err(|e| pg_error(&shown, e))?;
            Ok(n > 0)
        })
    }

    pub(crate) fn job_checkpoints(
        &self,
        job: &str,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Page<JobCheckpoint>, AccountingError> {
        let job = job.to_owned();
        self.call(|pool, shown| async move {
            let err = |e| pg_error(&shown, e);
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let rows = c
                .query(
                    "SELECT seq, created_at, step, model, metrics, epoch FROM ft_checkpoints
                     WHERE job_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
                    &[&job, &after.unwrap_or(i64::MAX), &(limit as i64 + 1)],
                )
                .await
                .map_err(err)?;
            let mut items = Vec::with_capacity(rows.len());
            for r in &rows {
                let step: i64 = r.try_get(2).map_err(err)?;
                let metrics: String = r.try_get(4).map_err(err)?;
                items.push(JobCheckpoint {
                    seq: r.try_get(0).map_err(err)?,
                    created_at: r.try_get(1).map_err(err)?,
                    step: u64::try_from(step).unwrap_or(0),
                    model: r.try_get(3).map_err(err)?,
                    metrics: json_text(&shown, "ft_checkpoints.metrics", &metrics)?,
                    epoch: r.try_get(5).map_err(err)?,
                });
            }
            Ok(page(items, limit))
        })
    }

    /// See [`crate::Store::claim_job`]: the row lock with SKIP LOCKED lets replicas claiming
    /// at once each take a different job, none waiting on another.
    pub(crate) fn claim_job(
        &self,
        owner: &str,
        lease_ms: i64,
    ) -> Result<Option<Claim>, AccountingError> {
        let owner = owner.to_owned();
        self.call(|pool, shown| async move {
            let err = |e| pg_error(&shown, e);
            let mut c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let tx = c.transaction().await.map_err(err)?;
            let Some(found) = tx
                .query_opt(
                    &format!(
                        "SELECT id, status, lease_owner FROM ft_jobs WHERE ({})
                         ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED",
                        CLAIMABLE.replace('?', DB_NOW_MS)
                    ),
                    &[],
                )
                .await
                .map_err(err)?
            else {
                return Ok(None);
            };
            let id: String = found.try_get(0).map_err(err)?;
            let status: String = found.try_get(1).map_err(err)?;
            let was: Option<String> = found.try_get(2).map_err(err)?;
            let row = tx
                .query_one(
                    &format!(
                        "UPDATE ft_jobs SET status = 'running', lease_owner = $2,
                         lease_until = {DB_NOW_MS} + $3, epoch = epoch + 1
                         WHERE id = $1 RETURNING {JOB_COLUMNS}"
                    ),
                    &[&id, &owner, &lease_ms],
                )
                .await
                .map_err(err)?;
            let job = job_from_row(&shown, &row)?;
            tx.commit().await.map_err(err)?;
            Ok(Some(Claim {
                job,
                taken_from: (status == "running").then(|| was.unwrap_or_default()),
            }))
        })
    }

    pub(crate) fn renew_lease(
        &self,
        id: &str,
        owner: &str,
        lease_ms: i64,
    ) -> Result<bool, AccountingError> {
        let (id, owner) = (id.to_owned(), owner.to_owned());
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let n = c
                .execute(
                    &format!(
                        "UPDATE ft_jobs SET lease_until = {DB_NOW_MS} + $3
                         WHERE id = $1 AND lease_owner = $2 AND status = 'running'"
                    ),
                    &[&id, &owner, &lease_ms],
                )
                .await
                .map_err(|e| pg_error(&shown, e))?;
            Ok(n > 0)
        })
    }

    pub(crate) fn release_lease(&self, id: &str, owner: &str) -> Result<(), AccountingError> {
        let (id, owner) = (id.to_owned(), owner.to_owned());
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            c.execute(
                "UPDATE ft_jobs SET lease_until = NULL
                 WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
                &[&id, &owner],
            )
            .await
            .map_err(|e| pg_error(&shown, e))?;
            Ok(())
        })
    }
}

/// The first `limit` of `items` (fetched as `limit + 1` to know whether more follow).
fn page<T>(mut items: Vec<T>, limit: usize) -> Page<T> {
    let has_more = items.len() > limit;
    items.truncate(limit);
    Page { items, has_more }
}

/// A JSON column's text, parsed; an error names the column.
fn json_text(shown: &str, column: &str, text: &str) -> Result<serde_json::Value, AccountingError> {
    serde_json::from_str(text).map_err(|e| AccountingError::Postgres {
        store: shown.to_owned(),
        message: format!("{column} is not valid JSON: {e}"),
    })
}

fn job_from_row(shown: &str, r: &Row) -> Result<JobRecord, AccountingError> {
    let bad = |e: tokio_postgres::Error| pg_error(shown, e);
    let tokens: Option<i64> = r.try_get(10).map_err(bad)?;
    let spec: String = r.try_get(7).map_err(bad)?;
    let error: Option<String> = r.try_get(11).map_err(bad)?;
    Ok(JobRecord {
        id: r.try_get(0).map_err(bad)?,
        key_id: r.try_get(1).map_err(bad)?,
        created_at: r.try_get(2).map_err(bad)?,
        status: r.try_get(3).map_err(bad)?,
        model: r.try_get(4).map_err(bad)?,
        training_file: r.try_get(5).map_err(bad)?,
        validation_file: r.try_get(6).map_err(bad)?,
        spec: json_text(shown, "ft_jobs.spec", &spec)?,
        fine_tuned_model: r.try_get(8).map_err(bad)?,
        finished_at: r.try_get(9).map_err(bad)?,
        trained_tokens: tokens.map(|t| u64::try_from(t).unwrap_or(0)),
        error: error
            .map(|e| json_text(shown, "ft_jobs.error", &e))
            .transpose()?,
        epoch: r.try_get(12).map_err(bad)?,
    })
}

/// Stored chat completions (see `completions`): the same columns and scoping as SQLite's.
impl Pg {
    pub(crate) fn insert_completion(&self, c: &CompletionRecord) -> Result<(), AccountingError> {
        let (id, key, created, model) = (c.id.clone(), c.key_id, c.created, c.model.clone());
        let texts = [
            completions::metadata_text(&c.metadata),
            completions::request_text(c),
            c.body.to_string(),
        ];
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            c.execute(
                "INSERT INTO chat_completions (id, key_id, created, model, metadata, request, body)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[&id, &key, &created, &model, &texts[0], &texts[1], &texts[2]],
            )
            .await
            .map_err(|e| pg_error(&shown, e))?;
            Ok(())
        })
    }

    pub(crate) fn completion(
        &self,
        id: &str,
        key: Option<i64>,
    ) -> Result<Option<CompletionRecord>, AccountingError> {
        let id = id.to_owned();
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let row = c
                .query_opt(
                    "SELECT id, key_id, created, model, metadata, request, body
                     FROM chat_completions WHERE id = $1 AND key_id IS NOT DISTINCT FROM $2",
                    &[&id, &key],
                )
                .await
                .map_err(|e| pg_error(&shown, e))?;
            row.map(|r| completion_from_row(&shown, &r)).transpose()
        })
    }

    pub(crate) fn completions(
        &self,
        q: &CompletionQuery,
    ) -> Result<Page<CompletionRecord>, AccountingError> {
        let q = q.clone();
        self.call(|pool, shown| async move {
            let err = |e| pg_error(&shown, e);
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let mut sql = String::from(
                "SELECT id, key_id, created, model, metadata, request, body
                 FROM chat_completions WHERE TRUE",
            );
            let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
            let mut arg = |sql: &mut String, cond: &str, v: Box<dyn ToSql + Sync + Send>| {
                args.push(v);
                *sql += &cond.replace('?', &format!("${}", args.len()));
            };
            let key = match q.owner {
                Owner::Key(k) => {
                    arg(&mut sql, " AND key_id IS NOT DISTINCT FROM ?", Box::new(k));
                    Some(k)
                }
                Owner::Any => None,
            };
            if let Some(m) = &q.model {
                arg(&mut sql, " AND model = ?", Box::new(m.clone()));
            }
            for (k, v) in &q.metadata {
                arg(
                    &mut sql,
                    " AND (metadata::jsonb) ->> ?",
                    Box::new(k.clone()),
                );
                arg(&mut sql, " = ?", Box::new(v.clone()));
            }
            if let Some(a) = &q.after {
                let seq = match key {
                    Some(k) => {
                        c.query_opt(
                            "SELECT seq FROM chat_completions
                             WHERE id = $1 AND key_id IS NOT DISTINCT FROM $2",
                            &[a, &k],
                        )
                        .await
                    }
                    None => {
                        c.query_opt("SELECT seq FROM chat_completions WHERE id = $1", &[a])
                            .await
                    }
                }
                .map_err(err)?;
                let Some(seq) = seq else {
                    return Err(AccountingError::InvalidQuery(format!(
                        "after: `{a}` is not the id of a stored completion in this list"
                    )));
                };
                let seq: i64 = seq.try_get(0).map_err(err)?;
                let cond = if q.ascending {
                    " AND seq > ?"
                } else {
                    " AND seq < ?"
                };
                arg(&mut sql, cond, Box::new(seq));
            }
            let order = if q.ascending {
                " ORDER BY seq ASC LIMIT ?"
            } else {
                " ORDER BY seq DESC LIMIT ?"
            };
            arg(&mut sql, order, Box::new(q.limit as i64 + 1));
            let params: Vec<&(dyn ToSql + Sync)> = args
                .iter()
                .map(|a| a.as_ref() as &(dyn ToSql + Sync))
                .collect();
            let rows = c.query(&sql, &params).await.map_err(err)?;
            let mut items = rows
                .iter()
                .map(|r| completion_from_row(&shown, r))
                .collect::<Result<Vec<_>, _>>()?;
            let has_more = items.len() > q.limit;
            items.truncate(q.limit);
            Ok(Page { items, has_more })
        })
    }

    /// Whether `key` had the completion `id`.
    pub(crate) fn update_completion_metadata(
        &self,
        id: &str,
        key: Option<i64>,
        metadata: String,
    ) -> Result<bool, AccountingError> {
        let id = id.to_owned();
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let n = c
                .execute(
                    "UPDATE chat_completions SET metadata = $3
                     WHERE id = $1 AND key_id IS NOT DISTINCT FROM $2",
                    &[&id, &key, &metadata],
                )
                .await
                .map_err(|e| pg_error(&shown, e))?;
            Ok(n > 0)
        })
    }

    pub(crate) fn delete_completion(
        &self,
        id: &str,
        key: Option<i64>,
    ) -> Result<bool, AccountingError> {
        let id = id.to_owned();
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let n = c
                .execute(
                    "DELETE FROM chat_completions WHERE id = $1 AND key_id IS NOT DISTINCT FROM $2",
                    &[&id, &key],
                )
                .await
                .map_err(|e| pg_error(&shown, e))?;
            Ok(n > 0)
        })
    }

    pub(crate) fn prune_completions(&self, cutoff: i64) -> Result<usize, AccountingError> {
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let n = c
                .execute(
                    "DELETE FROM chat_completions WHERE created < $1",
                    &[&cutoff],
                )
                .await
                .map_err(|e| pg_error(&shown, e))?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }
}

/// Stored responses and their items (see `responses`): the same columns, scoping and
/// transactions as SQLite's.
impl Pg {
    pub(crate) fn insert_response(&self, r: &ResponseRecord) -> Result<(), AccountingError> {
        let (id, key, created_at, body) =
            (r.id.clone(), r.key_id, r.created_at, r.body.to_string());
        let items: Vec<(&'static str, String, String)> =
            [("input", &r.input), ("output", &r.output)]
                .into_iter()
                .flat_map(|(kind, items)| {
                    items
                        .iter()
                        .map(move |i| (kind, responses::item_id(i).to_owned(), i.to_string()))
                })
                .collect();
        self.call(|pool, shown| async move {
            let err = |e| pg_error(&shown, e);
            let mut c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let tx = c.transaction().await.map_err(err)?;
            tx.execute(
                "INSERT INTO responses (id, key_id, created_at, body) VALUES ($1, $2, $3, $4)",
                &[&id, &key, &created_at, &body],
            )
            .await
            .map_err(err)?;
            let st = tx
                .prepare(
                    "INSERT INTO response_items (response_id, item_id, kind, item)
                     VALUES ($1, $2, $3, $4)",
                )
                .await
                .map_err(err)?;
            for (kind, item_id, item) in &items {
                tx.execute(&st, &[&id, item_id, kind, item])
                    .await
                    .map_err(err)?;
            }
            tx.commit().await.map_err(err)
        })
    }

    pub(crate) fn response(
        &self,
        id: &str,
        key: Option<i64>,
    ) -> Result<Option<ResponseRecord>, AccountingError> {
        let id = id.to_owned();
        self.call(|pool, shown| async move {
            let err = |e| pg_error(&shown, e);
            let mut c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            // One snapshot for the response and its items: a delete between them is not seen.
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(err)?;
            let Some(row) = tx
                .query_opt(
                    "SELECT created_at, body FROM responses
                     WHERE id = $1 AND key_id IS NOT DISTINCT FROM $2",
                    &[&id, &key],
                )
                .await
                .map_err(err)?
            else {
                return Ok(None);
            };
            let created_at: i64 = row.try_get(0).map_err(err)?;
            let body: String = row.try_get(1).map_err(err)?;
            let rows = tx
                .query(
                    "SELECT kind, item FROM response_items WHERE response_id = $1 ORDER BY seq",
                    &[&id],
                )
                .await
                .map_err(err)?;
            let items = rows
                .iter()
                .map(|r| {
                    let kind: String = r.try_get(0).map_err(err)?;
                    let item: String = r.try_get(1).map_err(err)?;
                    Ok((kind, json_text(&shown, "response_items.item", &item)?))
                })
                .collect::<Result<Vec<_>, AccountingError>>()?;
            let [input, output] = responses::split_items(items);
            Ok(Some(ResponseRecord {
                id,
                key_id: key,
                created_at,
                body: json_text(&shown, "responses.body", &body)?,
                input,
                output,
            }))
        })
    }

    pub(crate) fn response_item(
        &self,
        item_id: &str,
        key: Option<i64>,
    ) -> Result<Option<serde_json::Value>, AccountingError> {
        let item_id = item_id.to_owned();
        self.call(|pool, shown| async move {
            let c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let row = c
                .query_opt(
                    "SELECT i.item FROM response_items i JOIN responses r ON r.id = i.response_id
                     WHERE i.item_id = $1 AND r.key_id IS NOT DISTINCT FROM $2
                     ORDER BY i.seq DESC LIMIT 1",
                    &[&item_id, &key],
                )
                .await
                .map_err(|e| pg_error(&shown, e))?;
            row.map(|r| {
                let item: String = r.try_get(0).map_err(|e| pg_error(&shown, e))?;
                json_text(&shown, "response_items.item", &item)
            })
            .transpose()
        })
    }

    pub(crate) fn delete_response(
        &self,
        id: &str,
        key: Option<i64>,
    ) -> Result<bool, AccountingError> {
        let id = id.to_owned();
        self.call(|pool, shown| async move {
            let err = |e| pg_error(&shown, e);
            let mut c = pool.get().await.map_err(|e| pool_error(&shown, e))?;
            let tx = c.transaction().await.map_err(err)?;
            // Items first: they reference the response.
            tx.execute(
                "DELETE FROM response_items WHERE response_id = $1
                 AND EXISTS (SELECT 1 FROM responses
                             WHERE id = $1 AND key_id IS NOT DISTINCT FROM $2)",
                &[&id, &key],
            )
            .await
            .map_err(err)?;
            let n = tx
                .execute(
                    "DELETE FROM responses WHERE id = $1 AND key_id IS NOT DISTINCT FROM $2",
                    &[&id, &key],
                )
                .await
                .map_err(err)?;
            tx.commit().await.map_err(err)?;
            Ok(n > 0)
        })
    }
}

fn completion_from_row(shown: &str, r: &Row) -> Result<CompletionRecord, AccountingError> {
    let err = |e| pg_error(shown, e);
    let head = (
        r.try_get(0).map_err(err)?,
        r.try_get(1).map_err(err)?,
        r.try_get(2).map_err(err)?,
        r.try_get(3).map_err(err)?,
    );
    let texts = [
        r.try_get(4).map_err(err)?,
        r.try_get(5).map_err(err)?,
        r.try_get(6).map_err(err)?,
    ];
    completions::from_texts(head, texts).map_err(|e| AccountingError::Postgres {
        store: shown.to_owned(),
        message: format!("a stored completion is not valid JSON: {e}"),
    })
}

/// The keys `q` names: the key with id `q` (if it is a number), then those named `q`, oldest
/// first.
async fn keys_named<C: tokio_postgres::GenericClient + Sync>(
    c: &C,
    shown: &str,
    q: &str,
) -> Result<Vec<KeyInfo>, AccountingError> {
    let mut found = Vec::new();
    if let Ok(id) = q.parse::<i64>() {
        let row = c
            .query_opt(
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(|e| pg_error(shown, e))?;
        if let Some(r) = row {
            found.push(key_from_row(shown, &r)?);
        }
    }
    let rows = c
        .query(
            &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE name = $1 ORDER BY id"),
            &[&q],
        )
        .await
        .map_err(|e| pg_error(shown, e))?;
    for r in &rows {
        let k = key_from_row(shown, r)?;
        if !found.iter().any(|f: &KeyInfo| f.id == k.id) {
            found.push(k);
        }
    }
    Ok(found)
}

/// Bring the database to [`SCHEMA_VERSION`], or refuse one from a newer ferrolm.
async fn migrate(pool: &Pool, shown: &str) -> Result<(), AccountingError> {
    let err = |e| pg_error(shown, e);
    let mut c = pool.get().await.map_err(|e| pool_error(shown, e))?;
    let tx = c.transaction().await.map_err(err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        .await
        .map_err(err)?;
    let current: Option<i64> = tx
        .query_one("SELECT MAX(version) FROM schema_version", &[])
        .await
        .map_err(err)?
        .try_get(0)
        .map_err(err)?;
    let current = current.unwrap_or(0);
    if current > SCHEMA_VERSION {
        return Err(AccountingError::SchemaTooNew {
            path: shown.into(),
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    if current == SCHEMA_VERSION {
        return tx.commit().await.map_err(err);
    }
    for sql in crate::store::MIGRATIONS
        .iter()
        .skip(usize::try_from(current).unwrap_or(0))
    {
        tx.batch_execute(&postgres_ddl(sql)).await.map_err(err)?;
    }
    tx.execute("DELETE FROM schema_version", &[])
        .await
        .map_err(err)?;
    tx.execute(
        "INSERT INTO schema_version (version) VALUES ($1)",
        &[&SCHEMA_VERSION],
    )
    .await
    .map_err(err)?;
    tx.commit().await.map_err(err)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ddl_is_translated_word_for_word() {
        let d = postgres_ddl(
            "CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER NOT NULL, \
             r REAL, b BLOB, -- REALLY an INTEGER_ish comment\n x INTEGER PRIMARY KEY)",
        );
        assert_eq!(
            d,
            "CREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, \
             n BIGINT NOT NULL, r DOUBLE PRECISION, b BYTEA, -- REALLY an INTEGER_ish comment\n \
             x BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY)"
        );
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            shown_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(shown_url("postgres://u@h/db"), "postgres://u@h/db");
    }
}
