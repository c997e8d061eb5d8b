//! Remembers the digest of raw input files by (path, size, mtime, inode), so that a large
//! unchanged corpus is not rehashed on every run.
//!
//! A file whose modification time is within [`RACY_WINDOW`] of the moment it was hashed is not
//! remembered: it could still change within the same timestamp tick without its stat changing
//! (git calls this the "racily clean" problem). Such files are simply hashed again next time.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::digest::{hash_file, hash_listing, ContentHash};
use crate::error::{IoContext, Result};
use crate::store::write_atomically;

const RACY_WINDOW: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    size: u64,
    mtime_ns: i128,
    inode: u64,
    digest: ContentHash,
}

#[derive(Default, Serialize, Deserialize)]
struct Table {
    files: BTreeMap<PathBuf, Entry>,
}

/// The stat cache of one store. Safe to share between threads; saved with [`StatCache::save`].
pub struct StatCache {
    path: PathBuf,
    table: Mutex<Table>,
    dirty: Mutex<bool>,
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128
}

impl StatCache {
    /// Load the cache at `path`; a missing or unreadable file starts empty (it is only a cache).
    pub fn load(path: PathBuf) -> StatCache {
        let table = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        StatCache { path, table: Mutex::new(table), dirty: Mutex::new(false) }
    }

    /// The digest of a raw input: a file's bytes, or for a directory the listing of every file
    /// below it (relative paths with `/`, sizes and digests; hidden files are skipped).
    pub fn digest(&self, path: &Path) -> Result<ContentHash> {
        let meta = std::fs::metadata(path).ctx("reading metadata of", path)?;
        if meta.is_dir() {
            let files = list_files(path)?;
            let mut entries = Vec::with_capacity(files.len());
            for (rel, full) in files {
                let size = std::fs::metadata(&full).ctx("reading metadata of", &full)?.len();
                entries.push((rel, size, self.file_digest(&full)?));
            }
            Ok(hash_listing(entries.iter().map(|(n, s, d)| (n.as_str(), *s, d))))
        } else {
            self.file_digest(path)
        }
    }

    fn file_digest(&self, path: &Path) -> Result<ContentHash> {
        let canonical = std::fs::canonicalize(path).ctx("resolving", path)?;
        let meta = std::fs::metadata(&canonical).ctx("reading metadata of", path)?;
        let (size, mtime, inode) = (meta.len(), mtime_ns(&meta), meta.ino());
        if let Some(e) = self.table.lock().unwrap().files.get(&canonical) {
            if e.size == size && e.mtime_ns == mtime && e.inode == inode {
                return Ok(e.digest);
            }
        }
        let digest = hash_file(&canonical)?;
        let now_ns = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as i128;
        let entry = Entry { size, mtime_ns: mtime, inode, digest };
        let mut table = self.table.lock().unwrap();
        if now_ns - mtime > RACY_WINDOW.as_nanos() as i128 {
            table.files.insert(canonical, entry);
        } else {
            table.files.remove(&canonical);
        }
        *self.dirty.lock().unwrap() = true;
        Ok(digest)
    }

    /// Write the table back if it changed. Entries for files that no longer exist are dropped.
    pub fn save(&self) -> Result<()> {
        let mut dirty = self.dirty.lock().unwrap();
        if !*dirty {
            return Ok(());
        }
        let mut table = self.table.lock().unwrap();
        table.files.retain(|p, _| p.exists());
        let bytes = serde_json::to_vec(&*table).expect("the stat cache always serializes");
        write_atomically(&self.path, &bytes)?;
        *dirty = false;
        Ok(())
    }
}

/// Every file below `dir`, as (path relative to `dir` with `/` separators, full path), sorted,
/// hidden files and folders skipped. This is the set of files a directory input stands for:
/// the directory's digest covers exactly these, and stages reading the directory read these.
pub fn list_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    collect_files(dir, dir, &mut files)?;
    Ok(files)
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .ctx("listing", dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .ctx("listing", dir)?;
    names.sort();
    for path in names {
        let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            collect_files(root, &path, out)?;
        } else {
            let rel = path.strip_prefix(root).expect("walked below root");
            let rel = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
            out.push((rel, path));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_digest_follows_contents_not_mtimes() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("sub")).unwrap();
        std::fs::write(data.join("a.txt"), "alpha").unwrap();
        std::fs::write(data.join("sub/b.txt"), "beta").unwrap();
        let cache = StatCache::load(dir.path().join("stat.json"));
        let first = cache.digest(&data).unwrap();
        std::fs::write(data.join("a.txt"), "alpha").unwrap();
        assert_eq!(cache.digest(&data).unwrap(), first, "rewriting the same bytes keeps the digest");
        std::fs::write(data.join("sub/b.txt"), "BETA").unwrap();
        assert_ne!(cache.digest(&data).unwrap(), first);
    }

    #[test]
    fn remembered_digests_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("old.txt");
        std::fs::write(&file, "old bytes").unwrap();
        // Age the file past the racy window so that its digest is remembered.
        let old = SystemTime::now() - Duration::from_secs(60);
        std::fs::File::options().write(true).open(&file).unwrap().set_modified(old).unwrap();
        let cache = StatCache::load(dir.path().join("stat.json"));
        let digest = cache.digest(&file).unwrap();
        cache.save().unwrap();
        let reloaded = StatCache::load(dir.path().join("stat.json"));
        assert_eq!(reloaded.table.lock().unwrap().files.len(), 1);
        assert_eq!(reloaded.digest(&file).unwrap(), digest);
    }
}
