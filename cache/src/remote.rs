//! A remote copy of the store on object storage: S3 or any S3-compatible server
//! (`s3://bucket/prefix`), or a directory on a shared filesystem (`file:///mnt/team/cache`),
//! through the `object_store` crate.
//!
//! Layout under the remote's prefix:
//! - `blobs/<digest>`: one output file, named by the blake3 digest of its bytes;
//! - `objects/<key>.json`: an artifact's manifest, the same bytes as the local `manifest.json`.
//!
//! Uploads put every blob first and the manifest last, so a reader that finds a manifest finds
//! every blob it names, and an upload killed part-way leaves blobs that no manifest names.
//! Blobs are named by their content, so two writers of one key never overwrite each other's
//! files with different bytes; whichever manifest lands last names blobs that all exist. A
//! reader trusts nothing it downloads: each file is hashed as it streams in and checked against
//! the manifest before the store publishes the artifact.

use std::fmt;
use std::io::{Read, Write};
use std::path::{Component, Path as FsPath};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig, WriteMultipart};

use crate::digest::ContentHash;
use crate::error::CacheError;
use crate::manifest::{Manifest, MANIFEST_FORMAT};
use crate::store::{Artifact, Staging};

/// Files up to this size go up in one request; larger ones in parts of this size.
const PART_BYTES: usize = 8 << 20;
/// Parts of one file in flight at once: memory stays under `PART_BYTES * (1 + this)`.
const PARTS_IN_FLIGHT: usize = 2;

/// What went wrong with a remote, by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The remote could not be reached or failed (network, timeout, 5xx): build locally.
    #[error("remote `{url}` is unavailable: {message}")]
    Unavailable { url: String, message: String },
    /// The remote refused the credentials: nothing to retry until the user fixes them.
    #[error(
        "remote `{url}` refused the credentials (check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, \
         AWS_SESSION_TOKEN): {message}"
    )]
    Denied { url: String, message: String },
    /// An object in the remote does not match what names it: it is not used.
    #[error("remote `{url}` holds a damaged `{object}`: {message}")]
    Corrupt { url: String, object: String, message: String },
    /// The URL itself is not one we can use.
    #[error("remote `{url}`: {message}")]
    BadUrl { url: String, message: String },
    /// The cancel flag was set: the transfer stopped, leaving nothing a reader would take.
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    Local(#[from] CacheError),
}

impl RemoteError {}

pub type RemoteResult<T> = std::result::Result<T, RemoteError>;

/// What a push did with one artifact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pushed {
    /// Files sent; the others were in the remote already.
    pub files_sent: usize,
    pub bytes_sent: u64,
}

/// A connection to one remote.
pub struct Remote {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    runtime: tokio::runtime::Runtime,
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

impl Remote {
    /// Open the remote at `url`: `s3://bucket[/prefix]` (endpoint, region and credentials from
    /// the usual `AWS_*` environment variables), or `file:///path` (created if missing).
    pub fn open(url: &str) -> RemoteResult<Remote> {
        Remote::open_with_env(url, std::env::vars())
    }

    /// [`Remote::open`] with the `AWS_*` settings taken from `env` rather than the process's
    /// environment.
    pub fn open_with_env(url: &str, env: impl IntoIterator<Item = (String, String)>) -> RemoteResult<Remote> {
        let bad = |message: String| RemoteError::BadUrl { url: url.to_string(), message };
        let (scheme, rest) =
            url.split_once("://").ok_or_else(|| bad("expected `s3://bucket/prefix` or `file:///path`".into()))?;
        let (store, prefix): (Arc<dyn ObjectStore>, &str) = match scheme {
            "s3" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(bad("names no bucket".into()));
                }
                let mut builder = AmazonS3Builder::new().with_client_options(client_options());
                let mut plain_http = false;
                for (name, value) in env {
                    let Some(key) = name.starts_with("AWS_").then(|| name.to_ascii_lowercase()) else { continue };
                    if let Ok(config) = key.parse::<AmazonS3ConfigKey>() {
                        plain_http |= matches!(config, AmazonS3ConfigKey::Endpoint) && value.starts_with("http://");
                        builder = builder.with_config(config, value);
                    }
                }
                // An endpoint given as http:// (a server on the local network) is taken as meant.
                if plain_http {
                    builder = builder.with_allow_http(true);
                }
                let builder = builder.with_bucket_name(bucket).with_retry(retry_config());
                let s3 = builder.build().map_err(|e| bad(e.to_string()))?;
                (Arc::new(s3), prefix)
            }
            "file" => {
                if !rest.starts_with('/') {
                    return Err(bad("a file URL needs an absolute path: `file:///path`".into()));
                }
                std::fs::create_dir_all(rest).map_err(|e| bad(format!("creating `{rest}`: {e}")))?;
                let local = LocalFileSystem::new_with_prefix(rest).map_err(|e| bad(e.to_string()))?;
                (Arc::new(local), "")
            }
            other => {
                return Err(bad(format!("unknown scheme `{other}`: expected `s3://bucket/prefix` or `file:///path`")))
            }
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tinygpt-remote")
            .enable_all()
            .build()
            .map_err(|e| bad(format!("cannot start the I/O runtime: {e}")))?;
        Ok(Remote { url: url.to_string(), store, prefix: Path::from(prefix.trim_matches('/')), runtime })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn manifest_path(&self, key: &ContentHash) -> Path {
        self.prefix.clone().join("objects").join(format!("{key}.json"))
    }

    fn blob_path(&self, digest: &ContentHash) -> Path {
        self.prefix.clone().join("blobs").join(digest.to_hex())
    }

    fn fail(&self, error: object_store::Error) -> RemoteError {
        let url = self.url.clone();
        let message = error.to_string();
        match error {
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                RemoteError::Denied { url, message }
            }
            _ => RemoteError::Unavailable { url, message },
        }
    }

    fn corrupt(&self, object: &Path, message: impl Into<String>) -> RemoteError {
        RemoteError::Corrupt { url: self.url.clone(), object: object.to_string(), message: message.into() }
    }

    /// One request that tells whether the remote answers and takes the credentials, before
    /// anything else is asked of it.
    pub fn check(&self) -> RemoteResult<()> {
        let path = self.prefix.clone().join("objects").join("probe");
        match self.runtime.block_on(self.store.head(&path)) {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// The manifest the remote holds for `key`, checked for consistency; `None` when it has
    /// none.
    pub fn manifest(&self, key: &ContentHash) -> RemoteResult<Option<Manifest>> {
        let path = self.manifest_path(key);
        let bytes = self.runtime.block_on(async {
            match self.store.get(&path).await {
                Ok(got) => got.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        let Some(bytes) = bytes.map_err(|e| self.fail(e))? else {
            return Ok(None);
        };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| self.corrupt(&path, format!("unreadable manifest: {e}")))?;
        if manifest.format != MANIFEST_FORMAT {
            // Written by another manifest format: as good as absent for us.
            return Ok(None);
        }
        if manifest.key != *key {
            return Err(self.corrupt(&path, format!("it is the manifest of key {}", manifest.key)));
        }
        if Manifest::digest_of(&manifest.files) != manifest.content_digest {
            return Err(self.corrupt(&path, "its files do not add up to its content digest"));
        }
        if let Some(file) = manifest.files.iter().find(|f| !is_plain_relative(&f.name)) {
            return Err(self.corrupt(&path, format!("it names a file outside the artifact: `{}`", file.name)));
        }
        Ok(Some(manifest))
    }

    /// Download every file of `manifest` into the staging directory, hashing each as it
    /// streams in. `on_bytes` is told of every chunk written; `cancel` is looked at between
    /// chunks. On any error (or interruption) the staging
    /// directory is left empty; a blob whose bytes do not match its digest is deleted from the
    /// remote, so that the next upload replaces it.
    pub fn download(
        &self,
        manifest: &Manifest,
        staging: &Staging,
        on_bytes: &dyn Fn(u64),
        cancel: &AtomicBool,
    ) -> RemoteResult<()> {
        let result = self.runtime.block_on(async {
            for file in &manifest.files {
                let path = self.blob_path(&file.digest);
                let target = staging.dir().join(&file.name);
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| io_error("creating", parent, e))?;
                }
                let mut out = std::fs::File::create(&target).map_err(|e| io_error("creating", &target, e))?;
                let mut hasher = blake3::Hasher::new();
                let mut size = 0u64;
                let got = match self.store.get(&path).await {
                    Ok(got) => got,
                    Err(object_store::Error::NotFound { .. }) => {
                        return Err(self.corrupt(&path, format!("missing, yet manifest {} names it", manifest.key)));
                    }
                    Err(e) => return Err(self.fail(e)),
                };
                let mut stream = got.into_stream();
                while let Some(chunk) = stream.next().await {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(RemoteError::Interrupted);
                    }
                    let chunk = chunk.map_err(|e| self.fail(e))?;
                    hasher.update(&chunk);
                    out.write_all(&chunk).map_err(|e| io_error("writing", &target, e))?;
                    size += chunk.len() as u64;
                    on_bytes(chunk.len() as u64);
                }
                out.sync_all().map_err(|e| io_error("syncing", &target, e))?;
                let digest = ContentHash::from_hasher(&hasher);
                if size != file.size || digest != file.digest {
                    let _ = self.store.delete(&path).await;
                    return Err(self.corrupt(
                        &path,
                        format!(
                            "{size} bytes with digest {} where `{}` needs {} bytes",
                            digest.short(),
                            file.name,
                            file.size
                        ),
                    ));
                }
            }
            Ok(())
        });
        if result.is_err() {
            staging.clear()?;
        }
        result
    }

    /// Upload a published artifact: each file whose blob the remote lacks, then the manifest.
    /// `on_bytes` is told of every chunk sent; `cancel` is looked at between files and parts,
    /// and an interrupted push writes no manifest.
    pub fn push(&self, artifact: &Artifact, on_bytes: &dyn Fn(u64), cancel: &AtomicBool) -> RemoteResult<Pushed> {
        let mut pushed = Pushed { files_sent: 0, bytes_sent: 0 };
        self.runtime.block_on(async {
            for file in &artifact.manifest.files {
                if cancel.load(Ordering::Relaxed) {
                    return Err(RemoteError::Interrupted);
                }
                let path = self.blob_path(&file.digest);
                match self.store.head(&path).await {
                    Ok(meta) if meta.size == file.size => continue,
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(self.fail(e)),
                }
                self.upload(&artifact.path(&file.name), &path, file.size, on_bytes, cancel).await?;
                pushed.files_sent += 1;
                pushed.bytes_sent += file.size;
            }
            let manifest = self.manifest_path(&artifact.manifest.key);
            self.store.put(&manifest, artifact.manifest.to_bytes().into()).await.map_err(|e| self.fail(e))?;
            Ok(pushed)
        })
    }

    async fn upload(
        &self,
        from: &FsPath,
        to: &Path,
        size: u64,
        on_bytes: &dyn Fn(u64),
        cancel: &AtomicBool,
    ) -> RemoteResult<()> {
        if size <= PART_BYTES as u64 {
            let bytes = std::fs::read(from).map_err(|e| io_error("reading", from, e))?;
            let n = bytes.len() as u64;
            self.store.put(to, bytes.into()).await.map_err(|e| self.fail(e))?;
            on_bytes(n);
            return Ok(());
        }
        let mut file = std::fs::File::open(from).map_err(|e| io_error("opening", from, e))?;
        let upload = self.store.put_multipart(to).await.map_err(|e| self.fail(e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut buf = vec![0u8; PART_BYTES];
        let sent: std::result::Result<(), RemoteError> = async {
            loop {
                let n = read_full(&mut file, &mut buf).map_err(|e| io_error("reading", from, e))?;
                if n == 0 {
                    return Ok(());
                }
                if cancel.load(Ordering::Relaxed) {
                    return Err(RemoteError::Interrupted);
                }
                writer.wait_for_capacity(PARTS_IN_FLIGHT).await.map_err(|e| self.fail(e))?;
                writer.write(&buf[..n]);
                on_bytes(n as u64);
            }
        }
        .await;
        match sent {
            Ok(()) => writer.finish().await.map(|_| ()).map_err(|e| self.fail(e)),
            Err(e) => {
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// Every key whose manifest the remote holds.
    pub fn keys(&self) -> RemoteResult<Vec<ContentHash>> {
        let dir = self.prefix.clone().join("objects");
        let listed: Vec<_> = self.runtime.block_on(self.store.list(Some(&dir)).collect());
        let mut keys = Vec::new();
        for meta in listed {
            let meta = meta.map_err(|e| self.fail(e))?;
            let name = meta.location.filename().unwrap_or_default();
            if let Some(key) = name.strip_suffix(".json").and_then(ContentHash::from_hex) {
                keys.push(key);
            }
        }
        keys.sort();
        Ok(keys)
    }
}

/// A remote that does not connect within 5 s, or stalls for 30 s mid-request, is unavailable;
/// a request that streams steadily may take up to half an hour (one large file on a slow link).
fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_read_timeout(Duration::from_secs(30))
        .with_timeout(Duration::from_secs(30 * 60))
}

/// A few quick retries: an unreachable remote should cost seconds, not the crate's default
/// three minutes, before the stage runs locally.
fn retry_config() -> RetryConfig {
    RetryConfig { max_retries: 2, retry_timeout: Duration::from_secs(20), ..RetryConfig::default() }
}

fn io_error(action: &'static str, path: &FsPath, source: std::io::Error) -> RemoteError {
    RemoteError::Local(CacheError::Io { action, path: path.to_path_buf(), source })
}

/// A manifest's file name that stays inside the artifact: relative, no `..`, no hidden part.
fn is_plain_relative(name: &str) -> bool {
    !name.is_empty()
        && FsPath::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(part) if !part.to_string_lossy().starts_with('.')))
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use serde_json::json;

    /// A cancel flag never set.
    static GO: AtomicBool = AtomicBool::new(false);

    struct Setup {
        _dir: tempfile::TempDir,
        remote_dir: std::path::PathBuf,
        remote: Remote,
        first: Store,
        second: Store,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let remote_dir = dir.path().join("remote");
        let remote = Remote::open(&format!("file://{}", remote_dir.display())).unwrap();
        let first = Store::open(&dir.path().join("a")).unwrap();
        let second = Store::open(&dir.path().join("b")).unwrap();
        Setup { _dir: dir, remote_dir, remote, first, second }
    }

    /// An artifact with a large file (sent in parts), a small one and one in a subdirectory.
    fn build(store: &Store, key: &ContentHash) -> Artifact {
        let staging = store.begin(key).unwrap();
        let big: Vec<u8> = (0..PART_BYTES * 2 + 12_345).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(staging.dir().join("model.bin"), big).unwrap();
        std::fs::write(staging.dir().join("config.json"), b"{}").unwrap();
        std::fs::create_dir(staging.dir().join("adapter")).unwrap();
        std::fs::write(staging.dir().join("adapter/weights"), b"lora").unwrap();
        store.publish(staging, &[], json!({"stage": "x"}), json!({"loss": 1.5}), 2.0).unwrap()
    }

    /// A setup whose first store built an artifact that is pushed.
    fn pushed() -> (Setup, ContentHash, Artifact) {
        let s = setup();
        let key = ContentHash::of_bytes(b"k");
        let built = build(&s.first, &key);
        s.remote.push(&built, &|_| {}, &GO).unwrap();
        (s, key, built)
    }

    fn pull(remote: &Remote, store: &Store, key: &ContentHash) -> RemoteResult<Option<Artifact>> {
        let Some(manifest) = remote.manifest(key)? else { return Ok(None) };
        let staging = store.begin(key)?;
        remote.download(&manifest, &staging, &|_| {}, &GO)?;
        Ok(Some(store.adopt(staging, manifest)?))
    }

    fn blob_file(s: &Setup, artifact: &Artifact, name: &str) -> std::path::PathBuf {
        s.remote_dir.join("blobs").join(artifact.file_digest(name).unwrap().to_hex())
    }

    #[test]
    fn a_pushed_artifact_pulls_into_another_store_byte_for_byte() {
        let s = setup();
        let key = ContentHash::of_bytes(b"k");
        let built = build(&s.first, &key);
        let sent = std::sync::atomic::AtomicU64::new(0);
        let pushed = s.remote.push(&built, &|n| _ = sent.fetch_add(n, Ordering::Relaxed), &GO).unwrap();
        assert_eq!(pushed.files_sent, 3);
        assert_eq!(sent.into_inner(), built.manifest.total_bytes());
        assert_eq!(s.remote.keys().unwrap(), vec![key]);

        let pulled = pull(&s.remote, &s.second, &key).unwrap().expect("the remote has it");
        for file in &built.manifest.files {
            assert_eq!(std::fs::read(pulled.path(&file.name)).unwrap(), std::fs::read(built.path(&file.name)).unwrap());
        }
        assert_eq!(pulled.manifest.content_digest, built.manifest.content_digest);
        assert_eq!(pulled.manifest.metrics, built.manifest.metrics);
        assert!(s.second.get(&key).unwrap().is_some());

        // A second push sends no file again.
        assert_eq!(s.remote.push(&built, &|_| {}, &GO).unwrap().files_sent, 0);
    }

    #[test]
    fn an_upload_stopped_before_its_manifest_is_not_seen() {
        let (s, key, _) = pushed();
        // The blobs are there, the manifest is not: what a killed upload leaves.
        std::fs::remove_file(s.remote_dir.join("objects").join(format!("{key}.json"))).unwrap();
        assert!(s.remote.manifest(&key).unwrap().is_none());
        assert!(pull(&s.remote, &s.second, &key).unwrap().is_none());
        assert!(s.second.get(&key).unwrap().is_none());
    }

    #[test]
    fn a_damaged_blob_is_refused_deleted_and_replaced_by_the_next_push() {
        let (s, key, built) = pushed();
        let blob = blob_file(&s, &built, "model.bin");
        let mut bytes = std::fs::read(&blob).unwrap();
        bytes[PART_BYTES + 3] ^= 1;
        std::fs::write(&blob, bytes).unwrap();

        let error = pull(&s.remote, &s.second, &key).unwrap_err();
        assert!(matches!(error, RemoteError::Corrupt { .. }), "{error}");
        assert!(error.to_string().contains(&built.file_digest("model.bin").unwrap().to_hex()), "{error}");
        assert!(s.second.get(&key).unwrap().is_none(), "nothing damaged is published");
        assert!(!blob.exists(), "the damaged blob is removed from the remote");

        assert_eq!(s.remote.push(&built, &|_| {}, &GO).unwrap().files_sent, 1);
        assert!(pull(&s.remote, &s.second, &key).unwrap().is_some());
    }

    #[test]
    fn a_truncated_blob_and_a_missing_blob_are_damage_too() {
        let (s, key, built) = pushed();
        std::fs::write(blob_file(&s, &built, "config.json"), b"{").unwrap();
        assert!(matches!(pull(&s.remote, &s.second, &key), Err(RemoteError::Corrupt { .. })));
        std::fs::remove_file(blob_file(&s, &built, "adapter/weights")).unwrap();
        s.remote.push(&built, &|_| {}, &GO).unwrap();
        std::fs::remove_file(blob_file(&s, &built, "adapter/weights")).unwrap();
        let error = pull(&s.remote, &s.second, &key).unwrap_err();
        assert!(error.to_string().contains("missing"), "{error}");
        assert!(s.second.get(&key).unwrap().is_none());
    }

    #[test]
    fn a_manifest_that_lies_is_refused() {
        let (s, key, _) = pushed();
        let path = s.remote_dir.join("objects").join(format!("{key}.json"));
        let original = std::fs::read_to_string(&path).unwrap();

        let mut escaping: serde_json::Value = serde_json::from_str(&original).unwrap();
        escaping["files"][0]["name"] = json!("../../outside");
        std::fs::write(&path, escaping.to_string()).unwrap();
        assert!(matches!(s.remote.manifest(&key), Err(RemoteError::Corrupt { .. })));

        let other = ContentHash::of_bytes(b"other");
        std::fs::write(path.with_file_name(format!("{other}.json")), &original).unwrap();
        assert!(matches!(s.remote.manifest(&other), Err(RemoteError::Corrupt { .. })));
    }

    #[test]
    fn concurrent_writers_of_one_key_leave_a_whole_artifact() {
        let s = setup();
        let key = ContentHash::of_bytes(b"k");
        // The same outputs, built twice: different timings, and a volatile file that differs.
        let build_with = |store: &Store, seconds: f64, log: &[u8]| {
            let staging = store.begin(&key).unwrap();
            std::fs::write(staging.dir().join("weights"), vec![7u8; 300_000]).unwrap();
            std::fs::write(staging.dir().join("log.txt"), log).unwrap();
            store.publish(staging, &["log.txt"], json!({}), json!({}), seconds).unwrap()
        };
        let a = build_with(&s.first, 1.0, b"run a");
        let b = build_with(&s.second, 2.0, b"run b, slower");
        std::thread::scope(|scope| {
            for artifact in [&a, &b] {
                let remote = &s.remote;
                scope.spawn(move || {
                    for _ in 0..5 {
                        remote.push(artifact, &|_| {}, &GO).unwrap();
                    }
                });
            }
        });
        let third = Store::open(&s._dir.path().join("c")).unwrap();
        let pulled = pull(&s.remote, &third, &key).unwrap().expect("one of the two manifests");
        assert_eq!(pulled.manifest.content_digest, a.manifest.content_digest);
        let log = std::fs::read(pulled.path("log.txt")).unwrap();
        let winner = if pulled.manifest.seconds == 1.0 { b"run a".to_vec() } else { b"run b, slower".to_vec() };
        assert_eq!(log, winner, "the manifest and the files it names agree");
    }

    #[test]
    fn a_cancelled_transfer_leaves_nothing_behind() {
        let s = setup();
        let key = ContentHash::of_bytes(b"k");
        let built = build(&s.first, &key);
        let stop = AtomicBool::new(true);
        assert!(matches!(s.remote.push(&built, &|_| {}, &stop), Err(RemoteError::Interrupted)));
        assert!(s.remote.manifest(&key).unwrap().is_none());

        // Stopped after the first part of the large file.
        let sent = std::sync::atomic::AtomicU64::new(0);
        let count = |n| {
            if sent.fetch_add(n, Ordering::Relaxed) + n >= PART_BYTES as u64 {
                stop.store(true, Ordering::Relaxed);
            }
        };
        stop.store(false, Ordering::Relaxed);
        assert!(matches!(s.remote.push(&built, &count, &stop), Err(RemoteError::Interrupted)));
        assert!(s.remote.manifest(&key).unwrap().is_none(), "no manifest after an interrupted push");

        s.remote.push(&built, &|_| {}, &GO).unwrap();
        let manifest = s.remote.manifest(&key).unwrap().unwrap();
        let staging = s.second.begin(&key).unwrap();
        let stop = AtomicBool::new(true);
        assert!(matches!(s.remote.download(&manifest, &staging, &|_| {}, &stop), Err(RemoteError::Interrupted)));
        assert_eq!(std::fs::read_dir(staging.dir()).unwrap().count(), 0, "the staging area is left empty");
    }

    #[test]
    fn urls_are_checked() {
        for url in ["/no/scheme", "ftp://host/x", "file://relative", "s3:///prefix"] {
            let error = Remote::open(url).unwrap_err();
            assert!(matches!(error, RemoteError::BadUrl { .. }), "{url}: {error}");
            assert!(error.to_string().contains(url), "{error}");
        }
    }
}
