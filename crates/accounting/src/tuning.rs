//! Files and fine-tuning jobs, as the server's OpenAI-compatible `/v1/files` and
//! `/v1/fine_tuning/jobs` keep them: in the same `ferrolm.db` as the keys and the ledger, so a
//! restart (or a `kill -9`) loses nothing that was answered.
//!
//! Contract:
//! - Every row belongs to one key (`key_id`, NULL for open access), and every read that a
//!   client can trigger is scoped by it: `file(id, key)` of another key's file is `None`,
//!   exactly as for a file that does not exist. The worker's reads (`job_by_id`,
//!   `jobs_with_status`) are unscoped.
//! - A job's mutable fields are written by targeted updates, never by rewriting the row, so
//!   the HTTP handlers (cancel, pause) and the worker (progress, the end) do not overwrite one
//!   another; `set_job_status(…, from)` only moves a job that is in one of `from`.
//! - Lists are newest first and paginate with `after` (an id of the previous page) by the
//!   insertion order (`seq`), which is stable when ids are random.
//! - What a job was asked for (`spec`), its error and its events' and checkpoints' metrics are
//!   JSON documents: their shape is the server's, this module only keeps them.
//! - The jobs are a queue that several workers (one per server replica) share: a worker
//!   claims the oldest job that is `queued`, or `running` under a lease that ran out (its
//!   worker died), in one transaction that takes it from every other worker (PostgreSQL:
//!   `SELECT … FOR UPDATE SKIP LOCKED`; SQLite: an immediate transaction), and holds a lease on
//!   it (`lease_owner`, `lease_until` in unix ms by the store's clock) that it renews while it
//!   runs. A renewal fails once the job is no longer `running` under that worker's lease
//!   (cancelled, paused, taken over), which is how a worker hears of a cancel made through
//!   another replica. The worker's own end of a job (`finish_job` with an owner) happens only
//!   while it holds the lease.
//! - Each claim starts a new epoch of the job (`epoch`, a fencing token). A checkpoint is
//!   recorded only under the job's current epoch and owner (`add_job_checkpoint`, one
//!   conditional statement), so a worker that stalled (not died) past its lease, whose job was
//!   claimed by another meanwhile, has its checkpoint refused and stops; its blobs went under
//!   its own epoch's key (the server's), so they clobber nothing either. A resume reads the run
//!   of the newest recorded checkpoint's epoch.
//! - Both backends keep the same rows and answer the same calls (`pg` holds PostgreSQL's
//!   side); only the SQL differs.

use std::time::Duration;

use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};
use serde_json::Value;

use crate::store::{At, Store};
use crate::AccountingError;

pub(crate) const MIGRATION: &str = "
    CREATE TABLE files (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        id         TEXT    NOT NULL UNIQUE,          -- file-…
        key_id     INTEGER REFERENCES api_keys(id),
        bytes      INTEGER NOT NULL CHECK (bytes >= 0),
        created_at INTEGER NOT NULL,                 -- unix seconds
        filename   TEXT    NOT NULL,
        purpose    TEXT    NOT NULL
    );
    CREATE INDEX files_key ON files(key_id, seq);
    CREATE TABLE ft_jobs (
        seq              INTEGER PRIMARY KEY AUTOINCREMENT,
        id               TEXT    NOT NULL UNIQUE,    -- ftjob-…
        key_id           INTEGER REFERENCES api_keys(id),
        created_at       INTEGER NOT NULL,
        status           TEXT    NOT NULL,
        model            TEXT    NOT NULL,
        training_file    TEXT    NOT NULL,
        validation_file  TEXT,
        spec             TEXT    NOT NULL,           -- JSON: hyperparameters, method, suffix, …
        fine_tuned_model TEXT,
        finished_at      INTEGER,
        trained_tokens   INTEGER,
        error            TEXT                        -- JSON {code, message, param}
    );
    CREATE INDEX ft_jobs_key ON ft_jobs(key_id, seq);
    CREATE INDEX ft_jobs_status ON ft_jobs(status);
    CREATE TABLE ft_events (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id     TEXT    NOT NULL REFERENCES ft_jobs(id),
        created_at INTEGER NOT NULL,
        level      TEXT    NOT NULL,
        message    TEXT    NOT NULL,
        type       TEXT    NOT NULL,                 -- message | metrics
        data       TEXT                              -- JSON
    );
    CREATE INDEX ft_events_job ON ft_events(job_id, seq);
    CREATE TABLE ft_checkpoints (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id     TEXT    NOT NULL REFERENCES ft_jobs(id),
        created_at INTEGER NOT NULL,
        step       INTEGER NOT NULL,
        model      TEXT    NOT NULL,                 -- the checkpoint's model name
        metrics    TEXT    NOT NULL                  -- JSON
    );
    CREATE INDEX ft_checkpoints_job ON ft_checkpoints(job_id, seq);";

/// The queue's leases (schema version 9): the worker that runs a job and until when (unix
/// milliseconds, the store's clock). A `running` job without a lease (left by a ferrolm
/// before version 9) is free to take.
pub(crate) const LEASE_MIGRATION: &str = "
    ALTER TABLE ft_jobs ADD COLUMN lease_owner TEXT;
    ALTER TABLE ft_jobs ADD COLUMN lease_until INTEGER;";

/// The fencing tokens (schema version 11): `ft_jobs.epoch` counts the job's claims (0: never
/// claimed), `ft_checkpoints.epoch` is the claim a checkpoint was written under. Rows from
/// before are epoch 0, whose runs are at the job's unversioned blob key.
pub(crate) const EPOCH_MIGRATION: &str = "
    ALTER TABLE ft_jobs ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE ft_checkpoints ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;";

/// What a worker may claim: a queued job, or a running one whose lease ran out (`?` is now in
/// unix ms). Oldest first.
pub(crate) const CLAIMABLE: &str =
    "status = 'queued' OR (status = 'running' AND (lease_until IS NULL OR lease_until < ?))";

/// An uploaded file's metadata (its bytes are on disk, named by `id`).
#[derive(Clone, Debug, PartialEq)]
pub struct FileRecord {
    pub id: String,
    pub key_id: Option<i64>,
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
}

/// A fine-tuning job.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    pub id: String,
    pub key_id: Option<i64>,
    pub created_at: i64,
    pub status: String,
    /// The base model's id.
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    /// What was asked, resolved (the server's JSON).
    pub spec: Value,
    pub fine_tuned_model: Option<String>,
    pub finished_at: Option<i64>,
    pub trained_tokens: Option<u64>,
    pub error: Option<Value>,
    /// How many times the job was claimed: the current claim's fencing token (0 until the
    /// first claim; see [`Store::claim_job`] and [`Store::add_job_checkpoint`]).
    pub epoch: i64,
}

/// One line of a job's log.
#[derive(Clone, Debug, PartialEq)]
pub struct JobEvent {
    /// Assigned by the store (increasing).
    pub seq: i64,
    pub created_at: i64,
    pub level: String,
    pub message: String,
    /// `message` or `metrics`.
    pub kind: String,
    pub data: Option<Value>,
}

/// A checkpoint a job wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct JobCheckpoint {
    pub seq: i64,
    pub created_at: i64,
    pub step: u64,
    pub model: String,
    pub metrics: Value,
    /// The claim ([`JobRecord::epoch`]) it was written under: its run's blobs are that
    /// claim's.
    pub epoch: i64,
}

/// A job a worker claimed ([`Store::claim_job`]): it is `running` under the worker's lease.
#[derive(Clone, Debug, PartialEq)]
pub struct Claim {
    pub job: JobRecord,
    /// The worker whose lease ran out, when the job was running (a takeover); `None` for a
    /// queued job.
    pub taken_from: Option<String>,
}

/// A lease's length in the store's unit (milliseconds).
pub(crate) fn lease_ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX)
}

/// One page of a list, newest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_more: bool,
}

fn json_col(r: &Row<'_>, i: usize) -> rusqlite::Result<Option<Value>> {
    let text: Option<String> = r.get(i)?;
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
        })
    })
    .transpose()
}

fn count(r: &Row<'_>, i: usize) -> rusqlite::Result<u64> {
    let v: i64 = r.get(i)?;
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(i, v))
}

pub(crate) const FILE_COLUMNS: &str = "id, key_id, bytes, created_at, filename, purpose";

fn file_from_row(r: &Row<'_>) -> rusqlite::Result<FileRecord> {
    Ok(FileRecord {
        id: r.get(0)?,
        key_id: r.get(1)?,
        bytes: count(r, 2)?,
        created_at: r.get(3)?,
        filename: r.get(4)?,
        purpose: r.get(5)?,
    })
}

pub(crate) const JOB_COLUMNS: &str = "id, key_id, created_at, status, model, training_file, validation_file, spec, fine_tuned_model, finished_at, trained_tokens, error, epoch";

fn job_from_row(r: &Row<'_>) -> rusqlite::Result<JobRecord> {
    let tokens: Option<i64> = r.get(10)?;
    Ok(JobRecord {
        id: r.get(0)?,
        key_id: r.get(1)?,
        created_at: r.get(2)?,
        status: r.get(3)?,
        model: r.get(4)?,
        training_file: r.get(5)?,
        validation_file: r.get(6)?,
        spec: json_col(r, 7)?.unwrap_or(Value::Null),
        fine_tuned_model: r.get(8)?,
        finished_at: r.get(9)?,
        trained_tokens: tokens.map(|t| t.max(0) as u64),
        error: json_col(r, 11)?,
        epoch: r.get(12)?,
    })
}

/// The seq of row `after` in `table` (scoped to `key_col = key`), for a page that starts after
/// it; an unknown `after` is an error rather than a silent first page.
fn after_seq(
    store: &Store,
    conn: &rusqlite::Connection,
    table: &str,
    scope: (&str, &dyn rusqlite::ToSql),
    after: Option<&str>,
) -> Result<i64, AccountingError> {
    let Some(a) = after else {
        return Ok(i64::MAX);
    };
    conn.query_row(
        &format!(
            "SELECT seq FROM {table} WHERE id = ?1 AND {} IS ?2",
            scope.0
        ),
        params![a, scope.1],
        |r| r.get(0),
    )
    .optional()
    .at(&store.path)?
    .ok_or_else(|| AccountingError::InvalidQuery(format!("after: `{a}` is not an id in this list")))
}

impl Store {
    pub fn insert_file(&self, f: &FileRecord) -> Result<(), AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.insert_file(f);
        }
        self.conn()?
            .execute(
                &format!("INSERT INTO files ({FILE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
                params![
                    f.id,
                    f.key_id,
                    i64::try_from(f.bytes).unwrap_or(i64::MAX),
                    f.created_at,
                    f.filename,
                    f.purpose
                ],
            )
            .at(&self.path)?;
        Ok(())
    }

    /// The file `id` if it belongs to `key`.
    pub fn file(&self, id: &str, key: Option<i64>) -> Result<Option<FileRecord>, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.file(id, key);
        }
        self.conn()?
            .query_row(
                &format!("SELECT {FILE_COLUMNS} FROM files WHERE id = ?1 AND key_id IS ?2"),
                params![id, key],
                file_from_row,
            )
            .optional()
            .at(&self.path)
    }

    /// `key`'s files, newest first.
    pub fn files(&self, key: Option<i64>) -> Result<Vec<FileRecord>, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.files(key);
        }
        let conn = self.conn()?;
        let mut st = conn
            .prepare(&format!(
                "SELECT {FILE_COLUMNS} FROM files WHERE key_id IS ?1 ORDER BY seq DESC"
            ))
            .at(&self.path)?;
        let rows = st.query_map([key], file_from_row).at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    /// Forget the file `id` of `key`; false when there was none.
    pub fn delete_file(&self, id: &str, key: Option<i64>) -> Result<bool, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.delete_file(id, key);
        }
        let n = self
            .conn()?
            .execute(
                "DELETE FROM files WHERE id = ?1 AND key_id IS ?2",
                params![id, key],
            )
            .at(&self.path)?;
        Ok(n > 0)
    }

    pub fn insert_job(&self, j: &JobRecord) -> Result<(), AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.insert_job(j);
        }
        self.conn()?
            .execute(
                &format!(
                    "INSERT INTO ft_jobs ({JOB_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
                ),
                params![
                    j.id,
                    j.key_id,
                    j.created_at,
                    j.status,
                    j.model,
                    j.training_file,
                    j.validation_file,
                    j.spec.to_string(),
                    j.fine_tuned_model,
                    j.finished_at,
                    j.trained_tokens.map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
                    j.error.as_ref().map(Value::to_string),
                    j.epoch,
                ],
            )
            .at(&self.path)?;
        Ok(())
    }

    /// The job `id` if it belongs to `key`.
    pub fn job(&self, id: &str, key: Option<i64>) -> Result<Option<JobRecord>, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.job(id, Some(key));
        }
        self.conn()?
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM ft_jobs WHERE id = ?1 AND key_id IS ?2"),
                params![id, key],
                job_from_row,
            )
            .optional()
            .at(&self.path)
    }

    /// The job `id`, whoever owns it (for the worker).
    pub fn job_by_id(&self, id: &str) -> Result<Option<JobRecord>, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.job(id, None);
        }
        self.conn()?
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM ft_jobs WHERE id = ?1"),
                [id],
                job_from_row,
            )
            .optional()
            .at(&self.path)
    }

    /// `key`'s jobs, newest first, `limit` of them after the job `after`.
    pub fn jobs(
        &self,
        key: Option<i64>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<JobRecord>, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.jobs(key, after, limit);
        }
        let conn = self.conn()?;
        let below = after_seq(self, &conn, "ft_jobs", ("key_id", &key), after)?;
        let mut st = conn
            .prepare(&format!(
                "SELECT {JOB_COLUMNS} FROM ft_jobs WHERE key_id IS ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3"
            ))
            .at(&self.path)?;
        let rows = st
            .query_map(params![key, below, limit as i64 + 1], job_from_row)
            .at(&self.path)?;
        page(
            rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)?,
            limit,
        )
    }

    /// Every job in one of `statuses`, oldest first (for the worker's queue at start).
    pub fn jobs_with_status(&self, statuses: &[&str]) -> Result<Vec<JobRecord>, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.jobs_with_status(statuses);
        }
        let conn = self.conn()?;
        let marks = vec!["?"; statuses.len()].join(", ");
        let mut st = conn
            .prepare(&format!(
                "SELECT {JOB_COLUMNS} FROM ft_jobs WHERE status IN ({marks}) ORDER BY seq"
            ))
            .at(&self.path)?;
        let rows = st
            .query_map(rusqlite::params_from_iter(statuses), job_from_row)
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    /// Move the job to `to` if its status is one of `from`; whether it moved.
    pub fn set_job_status(
        &self,
        id: &str,
        to: &str,
        from: &[&str],
    ) -> Result<bool, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.set_job_status(id, to, from);
        }
        let marks: Vec<String> = (0..from.len()).map(|i| format!("?{}", i + 3)).collect();
        let mut args: Vec<&dyn rusqlite::ToSql> = vec![&to, &id];
        args.extend(from.iter().map(|s| s as &dyn rusqlite::ToSql));
        let n = self
            .conn()?
            .execute(
                &format!(
                    "UPDATE ft_jobs SET status = ?1 WHERE id = ?2 AND status IN ({})",
                    marks.join(", ")
                ),
                args.as_slice(),
            )
            .at(&self.path)?;
        Ok(n > 0)
    }

    /// End a job that is in one of `from` (and, given an `owner`, under that worker's lease):
    /// its final status, model, error and end time. Whether it ended.
    #[allow(clippy::too_many_arguments)]
    pub fn finish_job(
        &self,
        id: &str,
        to: &str,
        from: &[&str],
        owner: Option<&str>,
        fine_tuned_model: Option<&str>,
        error: Option<&Value>,
        finished_at: i64,
    ) -> Result<bool, AccountingError> {
        if let Some(pg) = self.pg() {
            let end = (to, fine_tuned_model, error, finished_at);
            return pg.finish_job(id, from, owner, end);
        }
        let conn = self.conn()?;
        let tx = conn.unchecked_transaction().at(&self.path)?;
        let row: Option<(String, Option<String>)> = tx
            .query_row(
                "SELECT status, lease_owner FROM ft_jobs WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .at(&self.path)?;
        let Some((status, lease_owner)) = row else {
            return Ok(false);
        };
        if !from.contains(&status.as_str())
            || owner.is_some_and(|o| lease_owner.as_deref() != Some(o))
        {
            return Ok(false);
        }
        tx.execute(
            "UPDATE ft_jobs SET status = ?2, fine_tuned_model = ?3, error = ?4, finished_at = ?5 WHERE id = ?1",
            params![id, to, fine_tuned_model, error.map(Value::to_string), finished_at],
        )
        .at(&self.path)?;
        tx.commit().at(&self.path)?;
        Ok(true)
    }

    pub fn set_trained_tokens(&self, id: &str, tokens: u64) -> Result<(), AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.set_trained_tokens(id, tokens);
        }
        self.conn()?
            .execute(
                "UPDATE ft_jobs SET trained_tokens = ?2 WHERE id = ?1",
                params![id, i64::try_from(tokens).unwrap_or(i64::MAX)],
            )
            .at(&self.path)?;
        Ok(())
    }

    /// Append to a job's log (`e.seq` is ignored); returns the new event's seq.
    pub fn add_job_event(&self, job: &str, e: &JobEvent) -> Result<i64, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.add_job_event(job, e);
        }
        let conn = self.conn()?;
        conn.execute(
            "INSERT INTO ft_events (job_id, created_at, level, message, type, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![job, e.created_at, e.level, e.message, e.kind, e.data.as_ref().map(Value::to_string)],
        )
        .at(&self.path)?;
        Ok(conn.last_insert_rowid())
    }

    /// A job's events, newest first, `limit` of them below seq `after`.
    pub fn job_events(
        &self,
        job: &str,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Page<JobEvent>, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.job_events(job, after, limit);
        }
        let conn = self.conn()?;
        let mut st = conn
            .prepare(
                "SELECT seq, created_at, level, message, type, data FROM ft_events
                 WHERE job_id = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
            )
            .at(&self.path)?;
        let rows = st
            .query_map(
                params![job, after.unwrap_or(i64::MAX), limit as i64 + 1],
                |r| {
                    Ok(JobEvent {
                        seq: r.get(0)?,
                        created_at: r.get(1)?,
                        level: r.get(2)?,
                        message: r.get(3)?,
                        kind: r.get(4)?,
                        data: json_col(r, 5)?,
                    })
                },
            )
            .at(&self.path)?;
        page(
            rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)?,
            limit,
        )
    }

    /// Record a checkpoint of a job (`c.seq` is ignored) that the worker `owner` wrote under
    /// its claim `c.epoch`: only while that claim is the job's current one (the fence), so a
    /// worker that stalled past its lease, whose job another worker claimed since, records
    /// nothing. Whether it was recorded; false tells the worker to stop.
    pub fn add_job_checkpoint(
        &self,
        job: &str,
        c: &JobCheckpoint,
        owner: &str,
    ) -> Result<bool, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.add_job_checkpoint(job, c, owner);
        }
        let n = self
            .conn()?
            .execute(
                "INSERT INTO ft_checkpoints (job_id, created_at, step, model, metrics, epoch)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE EXISTS
                    (SELECT 1 FROM ft_jobs WHERE id = ?1 AND epoch = ?6 AND lease_owner = ?7)",
                params![
                    job,
                    c.created_at,
                    i64::try_from(c.step).unwrap_or(i64::MAX),
                    c.model,
                    c.metrics.to_string(),
                    c.epoch,
                    owner
                ],
            )
            .at(&self.path)?;
        Ok(n > 0)
    }

    /// A job's checkpoints, newest first, `limit` of them below seq `after`.
    pub fn job_checkpoints(
        &self,
        job: &str,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Page<JobCheckpoint>, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.job_checkpoints(job, after, limit);
        }
        let conn = self.conn()?;
        let mut st = conn
            .prepare(
                "SELECT seq, created_at, step, model, metrics, epoch FROM ft_checkpoints
                 WHERE job_id = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
            )
            .at(&self.path)?;
        let rows = st
            .query_map(
                params![job, after.unwrap_or(i64::MAX), limit as i64 + 1],
                |r| {
                    Ok(JobCheckpoint {
                        seq: r.get(0)?,
                        created_at: r.get(1)?,
                        step: count(r, 2)?,
                        model: r.get(3)?,
                        metrics: json_col(r, 4)?.unwrap_or(Value::Null),
                        epoch: r.get(5)?,
                    })
                },
            )
            .at(&self.path)?;
        page(
            rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)?,
            limit,
        )
    }
}

/// The queue (see the module's contract).
impl Store {
    /// Claim the oldest job that is queued, or running under a lease that ran out, for the
    /// worker `owner`: it is `running` under `owner`'s lease for `lease` from now, in a new
    /// epoch (`claim.job.epoch`, one more than the last claim's: the fencing token its
    /// checkpoints are written under). `None` when no job is free.
    pub fn claim_job(
        &self,
        owner: &str,
        lease: Duration,
    ) -> Result<Option<Claim>, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.claim_job(owner, lease_ms(lease));
        }
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(&self.path)?;
        let now = crate::time::now_unix_ms();
        let found: Option<(String, String, Option<String>)> = tx
            .query_row(
                &format!("SELECT id, status, lease_owner FROM ft_jobs WHERE ({CLAIMABLE}) ORDER BY seq LIMIT 1"),
                [now],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .at(&self.path)?;
        let Some((id, status, was)) = found else {
            return Ok(None);
        };
        tx.execute(
            "UPDATE ft_jobs SET status = 'running', lease_owner = ?2, lease_until = ?3,
                    epoch = epoch + 1 WHERE id = ?1",
            params![id, owner, now.saturating_add(lease_ms(lease))],
        )
        .at(&self.path)?;
        let job = tx
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM ft_jobs WHERE id = ?1"),
                [&id],
                job_from_row,
            )
            .at(&self.path)?;
        tx.commit().at(&self.path)?;
        Ok(Some(Claim {
            job,
            taken_from: if status == "running" {
                Some(was.unwrap_or_default())
            } else {
                None
            },
        }))
    }

    /// Extend `owner`'s lease on the job `id` to `lease` from now. False when the job is no
    /// longer running under that lease (cancelled, paused, finished or taken over): the worker
    /// must stop it.
    pub fn renew_lease(
        &self,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.renew_lease(id, owner, lease_ms(lease));
        }
        let until = crate::time::now_unix_ms().saturating_add(lease_ms(lease));
        let n = self
            .conn()?
            .execute(
                "UPDATE ft_jobs SET lease_until = ?3 WHERE id = ?1 AND lease_owner = ?2 AND status = 'running'",
                params![id, owner, until],
            )
            .at(&self.path)?;
        Ok(n > 0)
    }

    /// Give up `owner`'s lease on the running job `id` (a server stopping mid-job), so that
    /// another worker takes it over at once rather than when the lease runs out.
    pub fn release_lease(&self, id: &str, owner: &str) -> Result<(), AccountingError> {
        if let Some(pg) = self.pg() {
            return pg.release_lease(id, owner);
        }
        self.conn()?
            .execute(
                "UPDATE ft_jobs SET lease_until = NULL WHERE id = ?1 AND lease_owner = ?2 AND status = 'running'",
                params![id, owner],
            )
            .at(&self.path)?;
        Ok(())
    }
}

/// The first `limit` of `rows` (fetched as `limit + 1` to know whether more follow).
fn page<T>(mut rows: Vec<T>, limit: usize) -> Result<Page<T>, AccountingError> {
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    Ok(Page {
        items: rows,
        has_more,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::KeySpec;
    use serde_json::json;

    fn job(id: &str, key: Option<i64>) -> JobRecord {
        JobRecord {
            id: id.into(),
            key_id: key,
            created_at: 1,
            status: "queued".into(),
            model: "base".into(),
            training_file: "file-1".into(),
            validation_file: None,
            spec: json!({"seed": 1}),
            fine_tuned_model: None,
            finished_at: None,
            trained_tokens: None,
            error: None,
            epoch: 0,
        }
    }

    #[test]
    fn files_and_jobs_are_scoped_to_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (a, _) = s
            .create_key(&KeySpec {
                name: "a".into(),
                ..KeySpec::default()
            })
            .unwrap();
        let (b, _) = s
            .create_key(&KeySpec {
                name: "b".into(),
                ..KeySpec::default()
            })
            .unwrap();
        let f = FileRecord {
            id: "file-1".into(),
            key_id: Some(a.id),
            bytes: 3,
            created_at: 1,
            filename: "x.jsonl".into(),
            purpose: "fine-tune".into(),
        };
        s.insert_file(&f).unwrap();
        assert_eq!(s.file("file-1", Some(a.id)).unwrap(), Some(f.clone()));
        assert_eq!(s.file("file-1", Some(b.id)).unwrap(), None);
        assert_eq!(s.file("file-1", None).unwrap(), None);
        assert!(s.files(Some(b.id)).unwrap().is_empty());
        assert!(!s.delete_file("file-1", Some(b.id)).unwrap());
        s.insert_job(&job("ftjob-1", Some(a.id))).unwrap();
        assert!(s.job("ftjob-1", Some(b.id)).unwrap().is_none());
        assert!(s.job("ftjob-1", Some(a.id)).unwrap().is_some());
        assert!(s.jobs(Some(b.id), None, 10).unwrap().items.is_empty());
        // Paginating with another key's job id reveals nothing either.
        assert!(s.jobs(Some(b.id), Some("ftjob-1"), 10).is_err());
        assert!(s.delete_file("file-1", Some(a.id)).unwrap());
        assert!(s.files(Some(a.id)).unwrap().is_empty());
    }

    #[test]
    fn job_lists_page_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for i in 0..5 {
            s.insert_job(&job(&format!("ftjob-{i}"), None)).unwrap();
        }
        let p = s.jobs(None, None, 2).unwrap();
        let ids: Vec<&str> = p.items.iter().map(|j| j.id.as_str()).collect();
        assert_eq!((ids, p.has_more), (vec!["ftjob-4", "ftjob-3"], true));
        let p = s.jobs(None, Some("ftjob-3"), 10).unwrap();
        let ids: Vec<&str> = p.items.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(
            (ids, p.has_more),
            (vec!["ftjob-2", "ftjob-1", "ftjob-0"], false)
        );
    }

    #[test]
    fn status_moves_only_from_the_given_states() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.insert_job(&job("ftjob-1", None)).unwrap();
        assert!(s.set_job_status("ftjob-1", "running", &["queued"]).unwrap());
        assert!(s
            .set_job_status("ftjob-1", "cancelled", &["queued", "running"])
            .unwrap());
        // The worker's end does not overwrite a cancel that came first.
        assert!(!s
            .finish_job(
                "ftjob-1",
                "succeeded",
                &["running"],
                None,
                Some("ft:x"),
                None,
                9
            )
            .unwrap());
        let j = s.job_by_id("ftjob-1").unwrap().unwrap();
        assert_eq!((j.status.as_str(), j.fine_tuned_model), ("cancelled", None));
        assert_eq!(s.jobs_with_status(&["queued", "running"]).unwrap(), vec![]);
    }

    #[test]
    fn workers_claim_each_job_once_and_take_over_a_lapsed_lease() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(dir.path()).unwrap();
        let b = Store::open(dir.path()).unwrap();
        let long = Duration::from_secs(60);
        for i in 0..2 {
            a.insert_job(&job(&format!("ftjob-{i}"), None)).unwrap();
        }
        // Oldest first, each to one worker; nothing is left for a third.
        let first = a.claim_job("wa", long).unwrap().unwrap();
        let second = b.claim_job("wb", long).unwrap().unwrap();
        assert_eq!((first.job.id.as_str(), first.taken_from), ("ftjob-0", None));
        assert_eq!(second.job.id, "ftjob-1");
        assert_eq!(first.job.status, "running");
        assert_eq!(b.claim_job("wc", long).unwrap(), None);
        // Renewing is the owner's alone.
        assert!(a.renew_lease("ftjob-0", "wa", long).unwrap());
        assert!(!a.renew_lease("ftjob-0", "wb", long).unwrap());
        // A lease that ran out is taken over, and its old owner's renewal then fails.
        assert!(b.renew_lease("ftjob-1", "wb", Duration::ZERO).unwrap());
        std::thread::sleep(Duration::from_millis(5));
        let c = a.claim_job("wc", long).unwrap().unwrap();
        assert_eq!(
            (c.job.id.as_str(), c.taken_from.as_deref()),
            ("ftjob-1", Some("wb"))
        );
        assert!(!b.renew_lease("ftjob-1", "wb", long).unwrap());
        // The old owner's end is refused; the new owner's is not.
        assert!(!b
            .finish_job("ftjob-1", "failed", &["running"], Some("wb"), None, None, 9)
            .unwrap());
        assert!(a
            .finish_job(
                "ftjob-1",
                "succeeded",
                &["running"],
                Some("wc"),
                Some("ft:x"),
                None,
                9
            )
            .unwrap());
        // A cancel ends the lease: the renewal says to stop.
        assert!(a
            .finish_job("ftjob-0", "cancelled", &["running"], None, None, None, 9)
            .unwrap());
        assert!(!a.renew_lease("ftjob-0", "wa", long).unwrap());
        // A released lease is free at once.
        a.insert_job(&job("ftjob-2", None)).unwrap();
        a.claim_job("wa", long).unwrap().unwrap();
        a.release_lease("ftjob-2", "wa").unwrap();
        let again = b.claim_job("wb", long).unwrap().unwrap();
        assert_eq!(
            (again.job.id.as_str(), again.taken_from.as_deref()),
            ("ftjob-2", Some("wa"))
        );
    }

    #[test]
    fn events_and_checkpoints_come_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.insert_job(&job("ftjob-1", None)).unwrap();
        let mut seqs = Vec::new();
        for i in 0..3 {
            let e = JobEvent {
                seq: 0,
                created_at: i,
                level: "info".into(),
                message: format!("m{i}"),
                kind: "message".into(),
                data: None,
            };
            seqs.push(s.add_job_event("ftjob-1", &e).unwrap());
        }
        let p = s.job_events("ftjob-1", None, 2).unwrap();
        let msgs: Vec<&str> = p.items.iter().map(|e| e.message.as_str()).collect();
        assert_eq!((msgs, p.has_more), (vec!["m2", "m1"], true));
        let p = s.job_events("ftjob-1", Some(seqs[1]), 10).unwrap();
        assert_eq!(p.items.len(), 1);
        let claim = s.claim_job("w", Duration::from_secs(60)).unwrap().unwrap();
        assert!(s
            .add_job_checkpoint("ftjob-1", &checkpoint(4, claim.job.epoch), "w")
            .unwrap());
        let c = s.job_checkpoints("ftjob-1", None, 10).unwrap();
        assert_eq!((c.items[0].step, c.items[0].epoch), (4, 1));
    }

    fn checkpoint(step: u64, epoch: i64) -> JobCheckpoint {
        JobCheckpoint {
            seq: 0,
            created_at: 1,
            step,
            model: format!("ft:x:ckpt-step-{step}"),
            metrics: json!({"step": step}),
            epoch,
        }
    }

    /// A worker that stalled past its lease while another claimed the job: its checkpoint
    /// (under its old epoch) is refused, the new owner's stands, and every claim is a new
    /// epoch.
    #[test]
    fn a_stalled_workers_checkpoint_is_refused_after_a_takeover() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.insert_job(&job("ftjob-1", None)).unwrap();
        let lapsed = Duration::from_millis(1);
        let first = s.claim_job("wa", lapsed).unwrap().unwrap();
        assert_eq!(first.job.epoch, 1);
        assert!(s
            .add_job_checkpoint("ftjob-1", &checkpoint(2, first.job.epoch), "wa")
            .unwrap());
        std::thread::sleep(Duration::from_millis(5));
        let second = s.claim_job("wb", Duration::from_secs(60)).unwrap().unwrap();
        assert_eq!(
            (second.job.epoch, second.taken_from.as_deref()),
            (2, Some("wa"))
        );
        assert!(s
            .add_job_checkpoint("ftjob-1", &checkpoint(4, second.job.epoch), "wb")
            .unwrap());
        // The stalled worker wakes up and writes its step-6 checkpoint: refused.
        assert!(!s
            .add_job_checkpoint("ftjob-1", &checkpoint(6, first.job.epoch), "wa")
            .unwrap());
        // Nor does the new epoch with the old owner's name pass.
        assert!(!s
            .add_job_checkpoint("ftjob-1", &checkpoint(6, second.job.epoch), "wa")
            .unwrap());
        let c = s.job_checkpoints("ftjob-1", None, 10).unwrap();
        let got: Vec<(u64, i64)> = c.items.iter().map(|c| (c.step, c.epoch)).collect();
        assert_eq!(got, vec![(4, 2), (2, 1)]);
    }
}
