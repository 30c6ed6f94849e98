//! Where the server's blobs live (`--blobs URL`): uploaded files' bytes and fine-tuning runs
//! (checkpoints, the adapter, the fine-tuned model).
//!
//! Contract:
//! - One type, [`Blobs`], over `object_store`'s `ObjectStore` trait, which both back ends
//!   implement: a directory (`LocalFileSystem`, the default: the data dir, today's layout) or
//!   S3-compatible object storage (`s3://BUCKET/PREFIX`, endpoint and credentials from the
//!   standard AWS environment variables). Callers name blobs by relative keys (`files/<id>`,
//!   `fine_tuning/<job>/…`) and never see which back end holds them.
//! - A put is whole or nothing: in a directory the bytes go to a staging file, fsynced and
//!   renamed; an S3 PUT is atomic, and a blob over [`PART_BYTES`] goes up as a multipart
//!   upload (read from its file a part at a time), completed only once every part is in and
//!   aborted otherwise. Downloads stream into the cache. Callers write a blob before the record that names it (a
//!   record never points at a missing or half-written blob) and delete the record before the
//!   blob (a crash leaves an orphan blob, never a record without one).
//! - Training reads and writes local files, so each blob has a local path ([`Blobs::local`]):
//!   in a directory back end it is the blob itself; with S3 it is a cache under the data dir,
//!   filled on first use ([`Blobs::fetch_file`], [`Blobs::fetch_dir`]), and a run is mirrored
//!   into the store from it at each checkpoint and at its end ([`Blobs::sync_dir`]). So any replica serves a run another one trained.
//! - S3 calls give up quickly (a few retries, short connect timeout): an unreachable endpoint
//!   is an error that says so, not a hang. [`Blobs::check`] probes it at startup.
//! - The async calls run on the server's runtime; the blocking ones ([`Blobs::wait`]) are for
//!   threads outside it (the fine-tuning worker, `spawn_blocking`, startup).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::aws::AmazonS3ConfigKey::Client;
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::prefix::PrefixStore;
use object_store::{
    ClientConfigKey, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart,
};
use tokio_stream::StreamExt;

/// Marks a run directory fetched whole into the local cache.
const FETCHED: &str = ".fetched";

/// A `--blobs` URL: a directory, or `s3://BUCKET[/PREFIX]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobsUrl {
    Dir(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl std::str::FromStr for BlobsUrl {
    type Err = BlobError;
    fn from_str(s: &str) -> Result<Self, BlobError> {
        let bad = || BlobError::BadUrl(s.to_owned());
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            // S3's bucket naming rules, so a typo is caught here and not as an opaque 400.
            let ok = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !ok {
                return Err(bad());
            }
            return Ok(BlobsUrl::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
            });
        }
        if let Some(p) = s.strip_prefix("file://") {
            return Ok(BlobsUrl::Dir(PathBuf::from(p)));
        }
        if s.is_empty() || s.contains("://") {
            return Err(bad());
        }
        Ok(BlobsUrl::Dir(PathBuf::from(s)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("`{0}` is not a --blobs URL: give a directory (e.g. /var/lib/ferrolm) or s3://BUCKET[/PREFIX] (a bucket name of 3 to 63 lowercase letters, digits, `-` and `.`), with the endpoint and credentials in AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (and AWS_ALLOW_HTTP=true for an http:// endpoint)")]
    BadUrl(String),

    #[error("cannot use the blob store {blobs}: {message}")]
    Setup { blobs: String, message: String },

    #[error("the blob store {blobs} could not {op} `{key}`: {message}{hint}")]
    Io {
        blobs: String,
        op: &'static str,
        key: String,
        message: String,
        hint: &'static str,
        not_found: bool,
    },
}

impl BlobError {
    /// The blob is not there (rather than the store failing).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            BlobError::Io {
                not_found: true,
                ..
            }
        )
    }
}

/// The blob store: one back end, where it is, and the local paths training uses.
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
    url: BlobsUrl,
    /// The URL for messages (no credentials are in it: those are in the environment).
    shown: String,
    /// Local paths of blobs: the directory back end itself, else the cache dir.
    local: PathBuf,
    rt: tokio::runtime::Handle,
    /// Blobs larger than this go up in parts of this size ([`PART_BYTES`]).
    part_bytes: usize,
}

/// Blobs larger than this are uploaded in parts of this size (S3's multipart upload: parts
/// go up four at a time, a failed upload is aborted, and a file is read a part at a time,
/// never whole).
pub const PART_BYTES: usize = 8 << 20;
/// S3's smallest part (all but the last).
pub const MIN_PART_BYTES: usize = 5 << 20;
/// Parts of one blob in flight at once.
const PARTS_IN_FLIGHT: usize = 4;

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Blobs {
    /// Open the blob store `url`; `cache` holds local copies of S3 blobs. Nothing is contacted
    /// yet (see [`Blobs::check`]). `rt` runs the blocking calls.
    pub fn open(
        url: &BlobsUrl,
        cache: &Path,
        rt: tokio::runtime::Handle,
    ) -> Result<Blobs, BlobError> {
        let (store, shown, local): (Arc<dyn ObjectStore>, String, PathBuf) = match url {
            BlobsUrl::Dir(dir) => {
                let shown = dir.display().to_string();
                std::fs::create_dir_all(dir).map_err(|e| BlobError::Setup {
                    blobs: shown.clone(),
                    message: format!("cannot create the directory: {e}"),
                })?;
                let fs = LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| BlobError::Setup {
                        blobs: shown.clone(),
                        message: e.to_string(),
                    })?
                    .with_fsync(true);
                (Arc::new(fs), shown, dir.clone())
            }
            BlobsUrl::S3 { bucket, prefix } => {
                let shown = format!("s3://{bucket}/{prefix}");
                // reqwest's rustls has no crypto provider of its own here (see the workspace's
                // Cargo.toml): ring's, as for upstream providers.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let s3 = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    // Quick failures: an unreachable endpoint fails an upload in seconds.
                    .with_retry(RetryConfig {
                        max_retries: 2,
                        retry_timeout: Duration::from_secs(10),
                        ..RetryConfig::default()
                    })
                    // (Keys, not `with_client_options`, which would drop AWS_ALLOW_HTTP.)
                    .with_config(Client(ClientConfigKey::ConnectTimeout), "3s")
                    .with_config(Client(ClientConfigKey::Timeout), "300s")
                    .build()
                    .map_err(|e| BlobError::Setup {
                        blobs: shown.clone(),
                        message: format!("{e}; set AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION (AWS_ALLOW_HTTP=true for an http:// endpoint)"),
                    })?;
                let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                    Arc::new(s3)
                } else {
                    Arc::new(PrefixStore::new(s3, prefix.as_str()))
                };
                (store, shown, cache.to_owned())
            }
        };
        Ok(Blobs {
            store,
            url: url.clone(),
            shown,
            local,
            rt,
            part_bytes: PART_BYTES,
        })
    }

    /// Upload blobs over `bytes` (at least [`MIN_PART_BYTES`]) in parts of that size; tests
    /// use it to reach the multipart path with smaller blobs.
    pub fn with_part_bytes(mut self, bytes: usize) -> Blobs {
        self.part_bytes = bytes.max(MIN_PART_BYTES);
        self
    }

    /// The URL, for messages.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Whether blobs are local files (a directory back end): nothing to fetch or upload.
    pub fn is_local(&self) -> bool {
        matches!(self.url, BlobsUrl::Dir(_))
    }

    /// The local path of the blob (or blob folder) `key`: the blob itself in a directory back
    /// end, else its place in the cache.
    pub fn local(&self, key: &str) -> PathBuf {
        self.local.join(key)
    }

    /// Run `fut` on the server's runtime and wait for it (from a thread outside the runtime).
    pub fn wait<T>(&self, fut: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(fut)
    }

    fn err(&self, op: &'static str, key: &str, e: object_store::Error) -> BlobError {
        let not_found = matches!(e, object_store::Error::NotFound { .. });
        BlobError::Io {
            blobs: self.shown.clone(),
            op,
            key: key.to_owned(),
            message: e.to_string(),
            hint: if self.is_local() || not_found {
                ""
            } else {
                "; check that AWS_ENDPOINT_URL is reachable, the bucket exists and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY may write it"
            },
            not_found,
        }
    }

    /// Reach the store once: an S3 endpoint that cannot be reached, a missing bucket or bad
    /// credentials are found at startup, not at the first upload.
    pub async fn check(&self) -> Result<(), BlobError> {
        self.store
            .list_with_delimiter(Some(&Key::from("files")))
            .await
            .map(|_| ())
            .map_err(|e| self.err("list", "files/", e))
    }

    /// Write the blob `key` whole (or not at all): one PUT, or above the part size a
    /// multipart upload that is aborted if any part fails.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), BlobError> {
        if bytes.len() <= self.part_bytes {
            return self
                .store
                .put(&Key::from(key), PutPayload::from(bytes))
                .await
                .map(|_| ())
                .map_err(|e| self.err("write", key, e));
        }
        let mut w = self.multipart(key).await?;
        w.put(bytes);
        w.finish()
            .await
            .map(|_| ())
            .map_err(|e| self.err("write", key, e))
    }

    async fn multipart(&self, key: &str) -> Result<WriteMultipart, BlobError> {
        let upload = self
            .store
            .put_multipart(&Key::from(key))
            .await
            .map_err(|e| self.err("write", key, e))?;
        Ok(WriteMultipart::new_with_chunk_size(upload, self.part_bytes))
    }

    /// Write the local file `path` as the blob `key`, whole or not at all, reading it a part
    /// at a time (see [`Blobs::put`]).
    pub async fn put_file(&self, key: &str, path: &Path) -> Result<(), BlobError> {
        let local = |e| self.local_err(key, path, e);
        let size = std::fs::metadata(path).map_err(local)?.len();
        if size <= self.part_bytes as u64 {
            let bytes = std::fs::read(path).map_err(local)?;
            return self.put(key, Bytes::from(bytes)).await;
        }
        let mut f = std::fs::File::open(path).map_err(local)?;
        let mut w = self.multipart(key).await?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = w.abort().await;
                    return Err(local(e));
                }
            };
            if let Err(e) = w.wait_for_capacity(PARTS_IN_FLIGHT).await {
                let _ = w.abort().await;
                return Err(self.err("write", key, e));
            }
            w.write(&buf[..n]);
        }
        // (finish aborts the upload itself when a part or the completion fails.)
        w.finish()
            .await
            .map(|_| ())
            .map_err(|e| self.err("write", key, e))
    }

    /// Copy the blob `key` into the local file `path` (a temporary file beside it, renamed),
    /// streaming it rather than holding it whole.
    async fn download(&self, key: &str, path: &Path) -> Result<(), BlobError> {
        let got = self
            .store
            .get(&Key::from(key))
            .await
            .map_err(|e| self.err("read", key, e))?;
        let tmp = path.with_extension("part");
        let local = |e| self.local_err(key, path, e);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(local)?;
        }
        let mut f = std::fs::File::create(&tmp).map_err(local)?;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.err("read", key, e))?;
            f.write_all(&chunk).map_err(local)?;
        }
        drop(f);
        std::fs::rename(&tmp, path).map_err(local)
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, BlobError> {
        let got = self
            .store
            .get(&Key::from(key))
            .await
            .map_err(|e| self.err("read", key, e))?;
        got.bytes().await.map_err(|e| self.err("read", key, e))
    }

    /// Delete the blob `key` (and its cached copy); a missing blob is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        if !self.is_local() {
            let _ = std::fs::remove_file(self.local(key));
        }
        match self.store.delete(&Key::from(key)).await {
            Ok(()) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }

    /// The blob `key` as a local file, fetched into the cache on first use (blocking).
    pub fn fetch_file(&self, key: &str) -> Result<PathBuf, BlobError> {
        let path = self.local(key);
        if self.is_local() || path.is_file() {
            return Ok(path);
        }
        self.wait(self.download(key, &path))?;
        Ok(path)
    }

    /// The blob folder `remote` (a run) as the local directory of `local`, fetched whole into
    /// the cache unless it holds that folder already (blocking). A cached copy of another
    /// folder (an older claim's run) is replaced. Sub-folders `epoch-*` are other claims' runs
    /// (see `tuner::run_blob_key`) and are left out.
    pub fn fetch_dir(&self, remote: &str, local: &str) -> Result<PathBuf, BlobError> {
        let dir = self.local(local);
        if self.is_local() || self.holds(&dir, remote) {
            return Ok(dir);
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| self.local_err(local, &dir, e))?;
        }
        let prefix = Key::from(remote);
        let metas = self.wait(async {
            let mut list = self.store.list(Some(&prefix));
            let mut metas = Vec::new();
            while let Some(m) = list.next().await {
                metas.push(m.map_err(|e| self.err("list", remote, e))?);
            }
            Ok::<_, BlobError>(metas)
        })?;
        if metas.is_empty() {
            return Err(self.err(
                "fetch",
                remote,
                object_store::Error::NotFound {
                    path: remote.to_owned(),
                    source: "no blobs under this prefix".into(),
                },
            ));
        }
        for m in metas {
            let name = m.location.to_string();
            let Some(rel) = name.strip_prefix(&format!("{remote}/")) else {
                continue;
            };
            if rel.starts_with("epoch-") {
                continue;
            }
            self.wait(self.download(&name, &dir.join(rel)))?;
        }
        self.write_local(local, &dir.join(FETCHED), remote.as_bytes())?;
        Ok(dir)
    }

    /// Whether the local directory `dir` is a whole copy of the blob folder `remote`.
    fn holds(&self, dir: &Path, remote: &str) -> bool {
        std::fs::read(dir.join(FETCHED)).is_ok_and(|m| m == remote.as_bytes())
    }

    /// Mirror the local folder of `local` (a run) into the blob folder `remote` (blocking):
    /// upload the files it lacks or holds older or of another size, deepest first (a run's
    /// checkpoint folder before the `latest` that names it), then delete the blobs under
    /// `remote` whose files are gone (pruned checkpoints). Hidden files (temporaries) are left
    /// out. A directory back end already holds it.
    pub fn sync_dir(&self, local: &str, remote: &str) -> Result<(), BlobError> {
        if self.is_local() {
            return Ok(());
        }
        let prefix = Key::from(remote);
        let listed = self.wait(async {
            let mut list = self.store.list(Some(&prefix));
            let mut listed = std::collections::HashMap::new();
            while let Some(m) = list.next().await {
                let m = m.map_err(|e| self.err("list", remote, e))?;
                listed.insert(
                    m.location.to_string(),
                    (m.size, m.last_modified.timestamp()),
                );
            }
            Ok::<_, BlobError>(listed)
        })?;
        // (depth, blob name, path, size, modified: unix seconds)
        let root = self.local(local);
        let mut files = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let entries = std::fs::read_dir(&dir).map_err(|e| self.local_err(local, &dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| self.local_err(local, &dir, e))?;
                if entry.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                let path = entry.path();
                let meta = entry
                    .metadata()
                    .map_err(|e| self.local_err(local, &path, e))?;
                if meta.is_dir() {
                    stack.push(path);
                    continue;
                }
                let Ok(rel) = path.strip_prefix(&root) else {
                    continue;
                };
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0.0, |d| d.as_secs_f64());
                let name = format!("{remote}/{}", rel.to_string_lossy());
                files.push((rel.components().count(), name, path, meta.len(), modified));
            }
        }
        files.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        for (_, name, path, size, modified) in &files {
            // Remote times are whole seconds of the upload: a file written in the same second
            // as its upload is sent again, never missed.
            let current = listed
                .get(name)
                .is_some_and(|&(rsize, rtime)| rsize == *size && (rtime as f64) > *modified);
            if current {
                continue;
            }
            self.wait(self.put_file(name, path))?;
        }
        for name in listed.keys() {
            if !files.iter().any(|l| &l.1 == name) {
                self.wait(self.delete(name))?;
            }
        }
        // This replica's copy is whole: no need to fetch it again.
        self.write_local(local, &root.join(FETCHED), remote.as_bytes())
    }

    fn local_err(&self, key: &str, path: &Path, e: std::io::Error) -> BlobError {
        BlobError::Io {
            blobs: self.shown.clone(),
            op: "copy",
            key: key.to_owned(),
            message: format!("{}: {e}", path.display()),
            hint: "; check the data dir's disk",
            not_found: false,
        }
    }

    /// Write a cached copy atomically (a temporary file beside it, renamed).
    fn write_local(&self, key: &str, path: &Path, bytes: &[u8]) -> Result<(), BlobError> {
        let tmp = path.with_extension("part");
        let r = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        r.map_err(|e| self.local_err(key, path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_say_what_is_expected() {
        assert_eq!(
            "s3://ferrolm-blobs/prod/a".parse::<BlobsUrl>().ok(),
            Some(BlobsUrl::S3 {
                bucket: "ferrolm-blobs".into(),
                prefix: "prod/a".into()
            })
        );
        assert_eq!(
            "s3://bkt".parse::<BlobsUrl>().ok(),
            Some(BlobsUrl::S3 {
                bucket: "bkt".into(),
                prefix: String::new()
            })
        );
        assert_eq!(
            "/var/lib/x".parse::<BlobsUrl>().ok(),
            Some(BlobsUrl::Dir("/var/lib/x".into()))
        );
        for bad in ["gs://b/p", "s3://", "s3://Bad_Bucket/p", ""] {
            let e = bad.parse::<BlobsUrl>().err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|m| m.contains("s3://BUCKET")),
                "{bad}: {e:?}"
            );
        }
    }

    /// The directory back end, on a real directory: a put is readable, the blob's local path
    /// is the blob itself (nothing fetched or uploaded), and a delete removes it (twice: no error).
    #[test]
    fn a_directory_holds_blobs_at_their_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let blobs = Blobs::open(
            &BlobsUrl::Dir(dir.path().to_owned()),
            Path::new("/nonexistent-cache"),
            rt.handle().clone(),
        )
        .expect("open");
        assert!(blobs.is_local());
        blobs.wait(blobs.check()).expect("check");
        let key = "files/file-1";
        blobs
            .wait(blobs.put(key, Bytes::from_static(b"{}\n")))
            .expect("put");
        assert_eq!(
            std::fs::read(dir.path().join(key)).ok(),
            Some(b"{}\n".to_vec())
        );
        assert_eq!(blobs.fetch_file(key).ok(), Some(dir.path().join(key)));
        assert_eq!(
            blobs.wait(blobs.get(key)).ok(),
            Some(Bytes::from_static(b"{}\n"))
        );
        blobs.wait(blobs.delete(key)).expect("delete");
        assert!(!dir.path().join(key).exists());
        blobs.wait(blobs.delete(key)).expect("a second delete");
        let gone = blobs.wait(blobs.get(key)).err();
        assert!(
            gone.as_ref().is_some_and(BlobError::is_not_found),
            "{gone:?}"
        );
    }
}
