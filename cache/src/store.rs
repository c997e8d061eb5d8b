//! The store: atomic publication of artifacts, lookup, verification and garbage collection.
//!
//! Layout under the root (default `.tinygpt/`):
//! - `objects/<key>/`: published artifacts, each with `manifest.json`;
//! - `tmp/<key>/`: an artifact being written; only the holder of the key's lock touches it;
//! - `work/<key>/`: a stage's checkpoints, kept across interrupted runs, removed on publish;
//! - `families/<family key>/`: what runs of a stage that differ only in their length share
//!   (checkpoints a longer run continues from), kept while an artifact naming it is kept;
//! - `locks/<key>.lock`: per-key lock files;
//! - `corrupt/`: artifacts that failed verification, moved aside rather than deleted;
//! - `runs/`: run records; `statcache.json`: digests of raw inputs.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::digest::{hash_file, ContentHash};
use crate::error::{CacheError, IoContext, Result};
use crate::lock::KeyLock;
use crate::manifest::{FileEntry, Manifest, MANIFEST_FORMAT};
use crate::runs::RunRecord;
use crate::statcache::{list_files, StatCache};

/// A published artifact: its directory and manifest.
#[derive(Clone, Debug)]
pub struct Artifact {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Artifact {
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
    /// The digest the manifest records for `file`, if the artifact has it.
    pub fn file_digest(&self, file: &str) -> Option<ContentHash> {
        self.manifest.files.iter().find(|f| f.name == file).map(|f| f.digest)
    }
}

/// An artifact being written. Holds the key's lock: while it lives, no other process writes
/// this key. Dropping it without [`Store::publish`] leaves nothing in `objects/`.
#[derive(Debug)]
pub struct Staging {
    key: ContentHash,
    dir: PathBuf,
    work_dir: PathBuf,
    _lock: KeyLock,
}

impl Staging {
    /// Where the stage writes its output files (subdirectories allowed; hidden names are not
    /// kept).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Where the stage may keep checkpoints; it survives an interrupted run.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }
    pub fn key(&self) -> ContentHash {
        self.key
    }
    /// Remove whatever was written into the staging directory so far.
    pub fn clear(&self) -> Result<()> {
        remove_dir_if_exists(&self.dir)?;
        std::fs::create_dir_all(&self.dir).ctx("creating", &self.dir)
    }
}

/// What `verify` found wrong with one artifact.
#[derive(Debug, Clone)]
pub struct VerifyProblem {
    pub key: String,
    pub problem: String,
}

#[derive(Debug, Default, Clone)]
pub struct GcReport {
    pub removed: usize,
    pub kept: usize,
    pub freed_bytes: u64,
}

pub struct Store {
    root: PathBuf,
}

/// The manifest `meta` key naming the family directory ([`Store::family_dir`]) of an artifact.
pub const FAMILY_META: &str = "family";

const DIRS: [&str; 7] = ["objects", "tmp", "work", "families", "locks", "corrupt", "runs/latest"];

impl Store {
    /// Open (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> Result<Store> {
        for dir in DIRS {
            let path = root.join(dir);
            std::fs::create_dir_all(&path).ctx("creating", &path)?;
        }
        Ok(Store { root: root.to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the artifact of `key` is, or would be once published.
    pub fn object_dir(&self, key: &ContentHash) -> PathBuf {
        self.root.join("objects").join(key.to_hex())
    }

    fn lock_path(&self, key: &ContentHash) -> PathBuf {
        self.root.join("locks").join(format!("{key}.lock"))
    }

    pub fn stat_cache(&self) -> StatCache {
        StatCache::load(self.root.join("statcache.json"))
    }

    /// The artifact for `key`, if it is published and whole as far as a stat can tell (every
    /// file present with its recorded size). Full rehashing is [`Store::verify`]'s job.
    pub fn get(&self, key: &ContentHash) -> Result<Option<Artifact>> {
        let dir = self.object_dir(key);
        let manifest = match Manifest::read(&dir) {
            Ok(m) => m,
            Err(CacheError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(CacheError::BadManifest { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        if manifest.format != MANIFEST_FORMAT || manifest.key != *key {
            return Ok(None);
        }
        for file in &manifest.files {
            match std::fs::metadata(dir.join(&file.name)) {
                Ok(meta) if meta.len() == file.size => {}
                _ => return Ok(None),
            }
        }
        Ok(Some(Artifact { dir, manifest }))
    }

    /// A shared lock on a published artifact, for a run to hold while later stages may read it:
    /// `gc` leaves an artifact alone while any run holds it (it needs the key's lock alone to
    /// remove it). Then the artifact as [`Store::get`] finds it, which is `None` if it went
    /// before the lock was taken; the lease is then dropped, since building the key takes the
    /// key's lock itself.
    pub fn lease(&self, key: &ContentHash) -> Result<Option<(Artifact, KeyLock)>> {
        let lock = KeyLock::acquire_shared(&self.lock_path(key))?;
        Ok(self.get(key)?.map(|artifact| (artifact, lock)))
    }

    /// Take the key's lock without waiting; `None` if another process is building it.
    pub fn try_begin(&self, key: &ContentHash) -> Result<Option<Staging>> {
        match KeyLock::try_acquire(&self.lock_path(key))? {
            Some(lock) => self.staging(key, lock).map(Some),
            None => Ok(None),
        }
    }

    /// Wait for the key's lock, then prepare an empty staging directory.
    pub fn begin(&self, key: &ContentHash) -> Result<Staging> {
        let lock = KeyLock::acquire(&self.lock_path(key))?;
        self.staging(key, lock)
    }

    fn staging(&self, key: &ContentHash, lock: KeyLock) -> Result<Staging> {
        let dir = self.root.join("tmp").join(key.to_hex());
        // We hold the lock, so anything here is left over from a run that died mid-stage.
        remove_dir_if_exists(&dir)?;
        std::fs::create_dir_all(&dir).ctx("creating", &dir)?;
        let work_dir = self.root.join("work").join(key.to_hex());
        std::fs::create_dir_all(&work_dir).ctx("creating", &work_dir)?;
        Ok(Staging { key: *key, dir, work_dir, _lock: lock })
    }

    /// Hash the staged files, write the manifest last, and rename the whole directory into
    /// `objects/` in one step: readers see the complete artifact or nothing. Files named in
    /// `volatile` are listed and verified but left out of the content digest. Files in
    /// subdirectories are named by their relative path (`adapter/adapter_config.json`).
    pub fn publish(
        &self,
        staging: Staging,
        volatile: &[&str],
        meta: serde_json::Value,
        metrics: serde_json::Value,
        seconds: f64,
    ) -> Result<Artifact> {
        let mut files = Vec::new();
        let listed = list_files(&staging.dir)?;
        for entry in std::fs::read_dir(&staging.dir).ctx("listing", &staging.dir)? {
            let name = entry.ctx("listing", &staging.dir)?.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name == Manifest::FILE_NAME {
                return Err(CacheError::BadOutputName { name });
            }
        }
        for (name, path) in listed {
            let size = std::fs::metadata(&path).ctx("reading metadata of", &path)?.len();
            std::fs::File::open(&path).and_then(|f| f.sync_all()).ctx("syncing", &path)?;
            let volatile = volatile.contains(&name.as_str());
            files.push(FileEntry { digest: hash_file(&path)?, name, size, volatile });
        }
        if files.is_empty() {
            return Err(CacheError::EmptyArtifact);
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let subdirs: HashSet<&str> = files.iter().filter_map(|f| f.name.rsplit_once('/')).map(|(d, _)| d).collect();
        for dir in subdirs {
            sync_dir(&staging.dir.join(dir))?;
        }

        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            key: staging.key,
            content_digest: Manifest::digest_of(&files),
            files,
            meta,
            metrics,
            seconds,
        };
        self.install(staging, manifest)
    }

    /// Publish files that arrived with their manifest (from a remote, already hashed as they
    /// streamed in): the staged files must be exactly the manifest's, at its sizes.
    pub fn adopt(&self, staging: Staging, manifest: Manifest) -> Result<Artifact> {
        let mut listed = list_files(&staging.dir)?;
        listed.sort_by(|a, b| a.0.cmp(&b.0));
        let matches = listed.len() == manifest.files.len()
            && listed.iter().zip(&manifest.files).all(|((name, path), file)| {
                *name == file.name && std::fs::metadata(path).is_ok_and(|m| m.len() == file.size)
            });
        if manifest.key != staging.key || !matches {
            return Err(CacheError::NotAsManifest { key: staging.key.to_hex() });
        }
        self.install(staging, manifest)
    }

    /// Write the manifest last and rename the staging directory into `objects/`.
    fn install(&self, staging: Staging, manifest: Manifest) -> Result<Artifact> {
        let manifest_path = staging.dir.join(Manifest::FILE_NAME);
        write_synced(&manifest_path, &manifest.to_bytes())?;
        sync_dir(&staging.dir)?;
        let target = self.object_dir(&staging.key);
        if target.exists() {
            // A damaged artifact (it failed `get`): keep it for inspection, out of the way.
            self.quarantine(&staging.key)?;
        }
        std::fs::rename(&staging.dir, &target).ctx("publishing", &target)?;
        sync_dir(&self.root.join("objects"))?;
        remove_dir_if_exists(&staging.work_dir)?;
        Ok(Artifact { dir: target, manifest })
    }

    /// Give up a staging area (the stage failed, was interrupted, or another process published
    /// the key first): the partial output goes; checkpoints in the work directory stay for the
    /// next attempt to resume from, unless there are none.
    pub fn abandon(&self, staging: Staging) -> Result<()> {
        remove_dir_if_exists(&staging.dir)?;
        // Fails (and keeps the directory) when checkpoints are in it: that is the point.
        let _ = std::fs::remove_dir(&staging.work_dir);
        Ok(())
    }

    /// Move an artifact to `corrupt/`, so that the next run treats it as missing.
    fn quarantine(&self, key: &ContentHash) -> Result<()> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let from = self.object_dir(key);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let to = self.root.join("corrupt").join(format!("{key}.{}.{n}", std::process::id()));
        std::fs::rename(&from, &to).ctx("moving aside", &from)
    }

    /// Every published artifact, sorted by key.
    pub fn list(&self) -> Result<Vec<Artifact>> {
        let mut out = Vec::new();
        for key in self.object_keys()? {
            if let Ok(manifest) = Manifest::read(&self.object_dir(&key)) {
                out.push(Artifact { dir: self.object_dir(&key), manifest });
            }
        }
        Ok(out)
    }

    fn object_keys(&self) -> Result<Vec<ContentHash>> {
        let objects = self.root.join("objects");
        let mut keys = Vec::new();
        for entry in std::fs::read_dir(&objects).ctx("listing", &objects)? {
            let name = entry.ctx("listing", &objects)?.file_name();
            if let Some(key) = name.to_str().and_then(ContentHash::from_hex) {
                keys.push(key);
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Rehash every artifact against its manifest. Each one that no longer matches is moved to
    /// `corrupt/` (so the next run recomputes it) and reported. Returns (checked, problems).
    pub fn verify(&self) -> Result<(usize, Vec<VerifyProblem>)> {
        let keys = self.object_keys()?;
        let mut problems = Vec::new();
        for key in &keys {
            if let Some(problem) = self.check(key)? {
                // Hold the lock so a run reading this key is not mid-publish.
                let _lock = KeyLock::acquire(&self.lock_path(key))?;
                self.quarantine(key)?;
                problems.push(VerifyProblem { key: key.to_hex(), problem });
            }
        }
        Ok((keys.len(), problems))
    }

    fn check(&self, key: &ContentHash) -> Result<Option<String>> {
        let dir = self.object_dir(key);
        let manifest = match Manifest::read(&dir) {
            Ok(m) => m,
            Err(e) => return Ok(Some(e.to_string())),
        };
        if manifest.key != *key {
            return Ok(Some(format!("manifest names key {}", manifest.key)));
        }
        for file in &manifest.files {
            let path = dir.join(&file.name);
            let Ok(meta) = std::fs::metadata(&path) else {
                return Ok(Some(format!("`{}` is missing", file.name)));
            };
            if meta.len() != file.size {
                return Ok(Some(format!("`{}` has {} bytes, manifest says {}", file.name, meta.len(), file.size)));
            }
            if hash_file(&path)? != file.digest {
                return Ok(Some(format!("`{}` does not match its digest", file.name)));
            }
        }
        if Manifest::digest_of(&manifest.files) != manifest.content_digest {
            return Ok(Some("content digest does not match the file list".into()));
        }
        Ok(None)
    }

    /// The directory runs of one family share (checkpoints a longer run continues from); the
    /// stage creates it when it first writes there. The family key goes into the manifests of
    /// the artifacts the family built, under [`FAMILY_META`], so that `gc` keeps it as long as
    /// one of them is kept.
    pub fn family_dir(&self, family: &ContentHash) -> PathBuf {
        self.root.join("families").join(family.to_hex())
    }

    /// [`Store::family_dir`] with a shared lock on the family, for a run to hold while it uses
    /// the directory: `gc` leaves a family alone while any run holds one, since the run's own
    /// artifact, which will name the family, is not published yet.
    pub fn lease_family(&self, family: &ContentHash) -> Result<(PathBuf, KeyLock)> {
        let lock = KeyLock::acquire_shared(&self.family_lock_path(&family.to_hex()))?;
        Ok((self.family_dir(family), lock))
    }

    fn family_lock_path(&self, family: &str) -> PathBuf {
        self.root.join("locks").join(format!("family-{family}.lock"))
    }

    /// Remove every artifact whose key is not in `keep` and that no run holds
    /// ([`Store::lease`]), every family directory that no kept artifact names and no run holds
    /// ([`Store::lease_family`]), everything in `corrupt/`, and staging and work directories
    /// that no running process holds.
    pub fn gc(&self, keep: &HashSet<ContentHash>) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut families = HashSet::new();
        for key in self.object_keys()? {
            if keep.contains(&key) {
                report.kept += 1;
                if let Ok(m) = Manifest::read(&self.object_dir(&key)) {
                    families.extend(m.meta[FAMILY_META].as_str().map(str::to_string));
                }
                continue;
            }
            let Some(_lock) = KeyLock::try_acquire(&self.lock_path(&key))? else { continue };
            let dir = self.object_dir(&key);
            report.freed_bytes += dir_size(&dir);
            remove_dir_if_exists(&dir)?;
            report.removed += 1;
        }
        let family_root = self.root.join("families");
        for entry in std::fs::read_dir(&family_root).ctx("listing", &family_root)? {
            let path = entry.ctx("listing", &family_root)?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if families.contains(&name) {
                continue;
            }
            if let Some(_lock) = KeyLock::try_acquire(&self.family_lock_path(&name))? {
                report.freed_bytes += dir_size(&path);
                remove_dir_if_exists(&path)?;
            }
        }
        let corrupt = self.root.join("corrupt");
        report.freed_bytes += dir_size(&corrupt);
        remove_dir_if_exists(&corrupt)?;
        std::fs::create_dir_all(&corrupt).ctx("creating", &corrupt)?;
        for area in ["tmp", "work"] {
            let base = self.root.join(area);
            for entry in std::fs::read_dir(&base).ctx("listing", &base)? {
                let path = entry.ctx("listing", &base)?.path();
                let Some(key) = path.file_name().and_then(|n| n.to_str()).and_then(ContentHash::from_hex) else {
                    continue;
                };
                if area == "work" && keep.contains(&key) {
                    continue; // a checkpoint a kept recipe may still resume from
                }
                if let Some(_lock) = KeyLock::try_acquire(&self.lock_path(&key))? {
                    report.freed_bytes += dir_size(&path);
                    remove_dir_if_exists(&path)?;
                }
            }
        }
        Ok(report)
    }

    /// Append a run record, and make it the latest for its label.
    pub fn record_run(&self, record: &RunRecord) -> Result<()> {
        let runs = self.root.join("runs");
        let _lock = KeyLock::acquire(&runs.join(".lock"))?;
        let next = self.run_numbers()?.last().map_or(1, |n| n + 1);
        let bytes = serde_json::to_vec(record).expect("a run record always serializes");
        write_atomically(&runs.join(format!("{next:08}.json")), &bytes)?;
        write_atomically(&self.latest_path(&record.label), &bytes)
    }

    fn latest_path(&self, label: &str) -> PathBuf {
        let name = ContentHash::of_bytes(label.as_bytes()).short();
        self.root.join("runs/latest").join(format!("{name}.json"))
    }

    /// The most recent run record with this label.
    pub fn latest_run(&self, label: &str) -> Result<Option<RunRecord>> {
        RunRecord::read(&self.latest_path(label))
    }

    /// The `n` most recent run records, newest first.
    pub fn recent_runs(&self, n: usize) -> Result<Vec<RunRecord>> {
        let runs = self.root.join("runs");
        let mut out = Vec::new();
        for number in self.run_numbers()?.into_iter().rev().take(n) {
            if let Some(r) = RunRecord::read(&runs.join(format!("{number:08}.json")))? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Remove the run records older than the `keep` most recent, returning how many went. The
    /// latest record of each recipe stays, whatever its age: `plan` reads it.
    pub fn prune_runs(&self, keep: usize) -> Result<usize> {
        let runs = self.root.join("runs");
        let _lock = KeyLock::acquire(&runs.join(".lock"))?;
        let numbers = self.run_numbers()?;
        let old = numbers.len().saturating_sub(keep);
        for number in &numbers[..old] {
            let path = runs.join(format!("{number:08}.json"));
            std::fs::remove_file(&path).ctx("removing", &path)?;
        }
        Ok(old)
    }

    fn run_numbers(&self) -> Result<Vec<u64>> {
        let runs = self.root.join("runs");
        let mut numbers = Vec::new();
        for entry in std::fs::read_dir(&runs).ctx("listing", &runs)? {
            let name = entry.ctx("listing", &runs)?.file_name();
            if let Some(n) = name.to_str().and_then(|n| n.strip_suffix(".json")).and_then(|n| n.parse().ok()) {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();
        Ok(numbers)
    }
}

fn remove_dir_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).ctx("removing", path),
        _ => Ok(()),
    }
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                dir_size(&p)
            } else {
                e.metadata().map(|m| m.len()).unwrap_or(0)
            }
        })
        .sum()
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = std::fs::File::create(path).ctx("creating", path)?;
    file.write_all(bytes).ctx("writing", path)?;
    file.sync_all().ctx("syncing", path)
}

fn sync_dir(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|d| d.sync_all()).ctx("syncing", path)
}

/// Write a small file so that readers see the old or the new bytes, never a torn mix.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    write_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path).ctx("replacing", path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(n: u8) -> ContentHash {
        ContentHash::of_bytes(&[n])
    }

    fn put(store: &Store, k: ContentHash, name: &str, bytes: &[u8]) -> Artifact {
        let staging = store.begin(&k).unwrap();
        std::fs::write(staging.dir().join(name), bytes).unwrap();
        store.publish(staging, &[], json!({}), json!({}), 0.0).unwrap()
    }

    #[test]
    fn unpublished_staging_leaves_no_artifact() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let staging = store.begin(&key(1)).unwrap();
        std::fs::write(staging.dir().join("half.bin"), b"half").unwrap();
        drop(staging);
        assert!(store.get(&key(1)).unwrap().is_none());
        // The next writer starts from an empty staging directory.
        let staging = store.begin(&key(1)).unwrap();
        assert_eq!(std::fs::read_dir(staging.dir()).unwrap().count(), 0);
    }

    #[test]
    fn content_digest_ignores_metrics_and_timing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = put(&store, key(1), "out.bin", b"same");
        let staging = store.begin(&key(2)).unwrap();
        std::fs::write(staging.dir().join("out.bin"), b"same").unwrap();
        let b = store.publish(staging, &[], json!({"x": 1}), json!({"loss": 2.0}), 9.0).unwrap();
        assert_eq!(a.manifest.content_digest, b.manifest.content_digest);
    }

    #[test]
    fn volatile_files_are_verified_but_left_out_of_the_content_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let publish = |k: u8, log: &[u8], volatile: &[&str]| {
            let staging = store.begin(&key(k)).unwrap();
            std::fs::write(staging.dir().join("w.bin"), b"weights").unwrap();
            std::fs::write(staging.dir().join("log.jsonl"), log).unwrap();
            store.publish(staging, volatile, json!({}), json!({}), 0.0).unwrap()
        };
        let a = publish(10, b"took 3 s", &["log.jsonl"]);
        let b = publish(11, b"took 4.5 s", &["log.jsonl"]);
        assert_eq!(a.manifest.content_digest, b.manifest.content_digest);
        assert!(a.manifest.file("log.jsonl").unwrap().volatile && !a.manifest.file("w.bin").unwrap().volatile);
        let c = publish(12, b"took 3 s", &[]);
        assert_ne!(a.manifest.content_digest, c.manifest.content_digest, "not volatile: digested");
        // Still verified: `verify` finds a damaged volatile file and moves the artifact aside.
        std::fs::write(b.path("log.jsonl"), b"took 4.6 s").unwrap();
        let (_, problems) = store.verify().unwrap();
        assert_eq!(problems.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(), [key(11).to_hex()]);
    }

    #[test]
    fn the_lock_excludes_a_second_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let held = store.try_begin(&key(3)).unwrap().expect("free at first");
        assert!(store.try_begin(&key(3)).unwrap().is_none());
        drop(held);
        assert!(store.try_begin(&key(3)).unwrap().is_some());
    }

    #[test]
    fn verify_moves_a_corrupted_artifact_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let art = put(&store, key(4), "w.bin", b"weights!");
        put(&store, key(5), "ok.bin", b"fine");
        std::fs::write(art.path("w.bin"), b"WEIGHTS!").unwrap(); // same size, other bytes
        assert!(store.get(&key(4)).unwrap().is_some(), "a stat cannot see same-size damage");
        let (checked, problems) = store.verify().unwrap();
        assert_eq!(checked, 2);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, key(4).to_hex());
        assert!(store.get(&key(4)).unwrap().is_none());
        assert!(store.get(&key(5)).unwrap().is_some());
    }

    #[test]
    fn a_truncated_file_makes_the_artifact_missing_and_republishing_works() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let art = put(&store, key(6), "w.bin", b"weights");
        std::fs::write(art.path("w.bin"), b"wei").unwrap();
        assert!(store.get(&key(6)).unwrap().is_none());
        put(&store, key(6), "w.bin", b"weights");
        assert!(store.get(&key(6)).unwrap().is_some());
    }

    #[test]
    fn gc_keeps_only_what_it_is_told() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        put(&store, key(7), "a", b"a");
        put(&store, key(8), "b", b"bb");
        let report = store.gc(&HashSet::from([key(7)])).unwrap();
        assert_eq!((report.removed, report.kept), (1, 1));
        assert!(store.get(&key(7)).unwrap().is_some());
        assert!(store.get(&key(8)).unwrap().is_none());
    }

    #[test]
    fn gc_leaves_an_artifact_while_a_run_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        put(&store, key(10), "tokens", b"ids");
        let (artifact, lease) = store.lease(&key(10)).unwrap().expect("published");
        assert_eq!(artifact.manifest.key, key(10));
        let report = store.gc(&HashSet::new()).unwrap();
        assert_eq!(report.removed, 0);
        assert!(store.get(&key(10)).unwrap().is_some(), "gc removed an artifact a run holds");
        drop(lease);
        store.gc(&HashSet::new()).unwrap();
        assert!(store.get(&key(10)).unwrap().is_none(), "gc keeps an artifact nothing holds");
        assert!(store.lease(&key(10)).unwrap().is_none(), "a lease on nothing");
    }

    #[test]
    fn gc_leaves_a_family_while_a_run_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (family_dir, lease) = store.lease_family(&key(9)).unwrap();
        std::fs::create_dir_all(&family_dir).unwrap();
        std::fs::write(family_dir.join("step-10"), b"checkpoint").unwrap();
        store.gc(&HashSet::new()).unwrap();
        assert!(family_dir.join("step-10").exists(), "gc removed a family a run holds");
        // Runs of one family hold it together.
        let (_, other_run) = store.lease_family(&key(9)).unwrap();
        drop(lease);
        store.gc(&HashSet::new()).unwrap();
        assert!(family_dir.exists(), "gc removed a family the second run holds");
        drop(other_run);
        store.gc(&HashSet::new()).unwrap();
        assert!(!family_dir.exists(), "gc keeps a family that nothing names or holds");
    }

    #[test]
    fn run_records_are_ordered_and_latest_per_label() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for (label, k) in [("a", 1), ("b", 2), ("a", 3)] {
            let record = RunRecord { label: label.into(), keys: vec![key(k)], detail: json!(null), summary: None };
            store.record_run(&record).unwrap();
        }
        let recent = store.recent_runs(2).unwrap();
        assert_eq!(recent.iter().map(|r| r.keys[0]).collect::<Vec<_>>(), vec![key(3), key(2)]);
        assert_eq!(store.latest_run("a").unwrap().unwrap().keys, vec![key(3)]);
        assert!(store.latest_run("c").unwrap().is_none());
        assert_eq!(store.prune_runs(1).unwrap(), 2);
        assert_eq!(store.recent_runs(5).unwrap().len(), 1);
        assert_eq!(store.latest_run("a").unwrap().unwrap().keys, vec![key(3)], "the latest per label stays");
    }
}
