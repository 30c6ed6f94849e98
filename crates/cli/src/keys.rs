//! `ferrolm keys`: create, list and revoke the API keys of a server's data dir.
//!
//! The secret of a new key goes to stdout alone (so `KEY=$(ferrolm keys create --name ci)`
//! works) and is never shown again: the store keeps only its hash. Everything else — the
//! notice, listings' notes — goes to stderr or is printed without secrets. Reading commands
//! never create a store: a data dir without `ferrolm.db` simply has no keys.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferrolm_accounting::{time, KeyInfo, KeySpec, NewKey, Store, StoreUrl, DB_FILE};

/// `--data-dir` and `--store`, shared by `keys`, `usage` and `data export`.
#[derive(Args)]
pub struct DataDirArg {
    /// The server's data dir, holding ferrolm.db (default: $FERROLM_HOME/server, as for
    /// `ferrolm serve`).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The key store and ledger, as for `ferrolm serve --store`: sqlite:PATH (a database file;
    /// the default is DATA_DIR/ferrolm.db) or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE.
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
}

impl DataDirArg {
    /// The store these flags name.
    pub fn url(&self) -> Result<StoreUrl> {
        store_url(self.store.as_deref(), self.data_dir.as_deref())
    }

    /// The store, created (and migrated) if needed.
    pub fn open(&self) -> Result<Store> {
        let url = self.url()?;
        Store::open_url(&url).with_context(|| format!("cannot open the store {}", shown(&url)))
    }

    /// The store if one exists (reading commands do not create a SQLite file; a PostgreSQL
    /// database always exists, and is migrated).
    pub fn open_existing(&self) -> Result<Option<Store>> {
        match self.url()? {
            StoreUrl::Sqlite(f) if !f.exists() => Ok(None),
            _ => self.open().map(Some),
        }
    }

    /// The store, for messages.
    pub fn shown(&self) -> String {
        self.url().map_or_else(|e| e.to_string(), |u| shown(&u))
    }
}

/// `--store URL`, else the SQLite file in `--data-dir` (else in `$FERROLM_HOME/server`).
pub fn store_url(store: Option<&str>, dir: Option<&Path>) -> Result<StoreUrl> {
    match store {
        Some(u) => Ok(u.parse()?),
        None => Ok(StoreUrl::Sqlite(data_dir(dir)?.join(DB_FILE))),
    }
}

/// A store URL for messages: a SQLite file's path, a PostgreSQL URL without its password.
pub fn shown(url: &StoreUrl) -> String {
    match url {
        StoreUrl::Sqlite(f) => f.display().to_string(),
        StoreUrl::Postgres(u) => match u.split_once('@') {
            Some((_, host)) => format!("postgres://…@{host}"),
            None => u.clone(),
        },
    }
}

/// `dir`, else `$FERROLM_HOME/server`.
pub fn data_dir(dir: Option<&Path>) -> Result<PathBuf> {
    match dir {
        Some(d) => Ok(d.to_owned()),
        None => Ok(crate::store::home()?.join("server")),
    }
}

#[derive(Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    cmd: KeysCmd,
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Make a key. Its secret is printed once, on stdout; only its hash is stored.
    Create(CreateArgs),
    /// List the keys (never their secrets), revoked ones included.
    List {
        #[command(flatten)]
        dir: DataDirArg,
        /// Print JSON: an array of keys with their spend.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key: requests with it are refused from now on. Its usage stays in the ledger.
    Revoke {
        #[command(flatten)]
        dir: DataDirArg,
        /// The key's name, or its id (from `ferrolm keys list`).
        name_or_id: String,
        /// Print the revoked key as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct CreateArgs {
    #[command(flatten)]
    dir: DataDirArg,
    /// A name for the key: letters, digits, `.`, `_`, `-` (unique among active keys).
    #[arg(long)]
    name: String,
    /// Most requests per minute (default: no limit).
    #[arg(long, allow_negative_numbers = true, value_parser = limit::<u32>)]
    rpm: Option<u32>,
    /// Most tokens (prompt + completion) per minute (default: no limit).
    #[arg(long, allow_negative_numbers = true, value_parser = limit::<u64>)]
    tpm: Option<u64>,
    /// Most dollars the key may spend, at the price catalog's rates (default: no budget).
    #[arg(long, allow_negative_numbers = true)]
    budget_usd: Option<f64>,
    /// An admin key: it may also create, list and revoke keys over the API (`/v1/keys`, the
    /// web UI's server page) and read every key's usage.
    #[arg(long)]
    admin: bool,
    /// Print JSON: the key's record plus `secret`.
    #[arg(long)]
    json: bool,
}

/// A per-minute limit: a whole number (0 is passed on, for the store to explain).
fn limit<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.trim().parse().map_err(|_| {
        format!("`{s}` is not a limit: give a whole number of at least 1, or leave the option out for no limit")
    })
}

pub fn run(a: KeysArgs) -> Result<()> {
    match a.cmd {
        KeysCmd::Create(c) => create(c),
        KeysCmd::List { dir, json } => list(&dir, json),
        KeysCmd::Revoke {
            dir,
            name_or_id,
            json,
        } => revoke(&dir, &name_or_id, json),
    }
}

fn create(c: CreateArgs) -> Result<()> {
    let store = c.dir.open()?;
    let (key, secret) = store.create_key(&KeySpec {
        name: c.name,
        rpm: c.rpm,
        tpm: c.tpm,
        budget_usd: c.budget_usd,
        admin: c.admin,
    })?;
    if c.json {
        let created = NewKey {
            key: key.clone(),
            secret: secret.clone(),
        };
        println!("{}", serde_json::to_string_pretty(&created)?);
    } else {
        println!("{secret}");
    }
    eprintln!(
        "created key `{}` (id {}; {}) in {}",
        key.name,
        key.id,
        limits(&key),
        store.path().display()
    );
    eprintln!("this is the only time the secret is shown: store it now (only its hash is kept)");
    Ok(())
}

fn limits(k: &KeyInfo) -> String {
    let mut parts = Vec::new();
    if let Some(r) = k.rpm {
        parts.push(format!("{r} requests/min"));
    }
    if let Some(t) = k.tpm {
        parts.push(format!("{t} tokens/min"));
    }
    if let Some(b) = k.budget_usd {
        parts.push(format!("budget ${b}"));
    }
    if k.admin {
        parts.push("admin".to_owned());
    }
    if parts.is_empty() {
        "no limits".to_owned()
    } else {
        parts.join(", ")
    }
}

fn list(dir: &DataDirArg, json: bool) -> Result<()> {
    let keys = match dir.open_existing()? {
        Some(store) => store.key_listing()?,
        None => Vec::new(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&keys)?);
        return Ok(());
    }
    if keys.is_empty() {
        eprintln!(
            "no keys in {}; `ferrolm keys create --name NAME` makes one",
            dir.shown()
        );
        return Ok(());
    }
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|l| {
            let (k, s) = (&l.key, l.spent_usd);
            vec![
                k.id.to_string(),
                k.name.clone(),
                format!("{}…", k.prefix),
                opt(k.rpm.map(|v| v.to_string())),
                opt(k.tpm.map(|v| v.to_string())),
                opt(k.budget_usd.map(|v| format!("{v:.2}"))),
                format!("{s:.6}"),
                time::utc_datetime(k.created),
                match k.revoked {
                    Some(t) => format!("revoked {}", time::utc_datetime(t)),
                    None if k.admin => "active, admin".to_owned(),
                    None => "active".to_owned(),
                },
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "NAME",
            "PREFIX",
            "RPM",
            "TPM",
            "BUDGET_USD",
            "SPENT_USD",
            "CREATED (UTC)",
            "STATUS",
        ],
        &[true, false, false, true, true, true, true, false, false],
        &rows,
    );
    Ok(())
}

fn revoke(dir: &DataDirArg, name_or_id: &str, json: bool) -> Result<()> {
    let Some(store) = dir.open_existing()? else {
        bail!(
            "no key store at {}: nothing to revoke (is --data-dir right?)",
            dir.shown()
        );
    };
    let k = store
        .revoke_key(name_or_id)
        .with_context(|| format!("cannot revoke `{name_or_id}`"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&k)?);
    } else {
        println!("revoked key `{}` (id {}, {}…)", k.name, k.id, k.prefix);
    }
    Ok(())
}

/// Print an aligned table to stdout; `right[i]` right-aligns column i (numbers).
pub fn print_table(headers: &[&str], right: &[bool], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let s: Vec<String> = cells
            .zip(&width)
            .zip(right)
            .map(|((c, &w), &r)| {
                let pad = " ".repeat(w.saturating_sub(c.chars().count()));
                if r {
                    format!("{pad}{c}")
                } else {
                    format!("{c}{pad}")
                }
            })
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(&mut headers.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
}
