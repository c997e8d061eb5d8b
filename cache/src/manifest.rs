//! The manifest beside every artifact: what files it holds and what made it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::digest::{hash_listing, ContentHash};
use crate::error::{CacheError, IoContext, Result};

/// Bumped when the manifest layout changes; older manifests are then treated as missing.
pub const MANIFEST_FORMAT: u32 = 1;

/// One output file of an artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub digest: ContentHash,
    /// A file whose bytes may differ between two runs with the same key (wall-clock timings, a
    /// log shaped by unhashed parameters): its digest is verified like any other, but it is
    /// left out of the artifact's `content_digest`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub volatile: bool,
}

/// Everything recorded about one artifact.
///
/// `content_digest` covers the output files only (sorted names, sizes and digests), and of those
/// only the ones not marked volatile: never timings, metrics or paths, so a stage that reruns
/// and writes the same bytes gets the same digest and its dependents stay fresh (early cutoff).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub key: ContentHash,
    pub content_digest: ContentHash,
    /// Sorted by name.
    pub files: Vec<FileEntry>,
    /// Opaque to the store: the engine records the stage, its kind, parameters and key preimage.
    pub meta: serde_json::Value,
    /// Opaque to the store: the numbers the stage reported.
    pub metrics: serde_json::Value,
    pub seconds: f64,
}

impl Manifest {
    pub const FILE_NAME: &'static str = "manifest.json";

    pub fn digest_of(files: &[FileEntry]) -> ContentHash {
        hash_listing(files.iter().filter(|f| !f.volatile).map(|f| (f.name.as_str(), f.size, &f.digest)))
    }

    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(Self::FILE_NAME);
        let bytes = std::fs::read(&path).ctx("reading", &path)?;
        serde_json::from_slice(&bytes).map_err(|source| CacheError::BadManifest { path, source })
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        bytes.push(b'\n');
        bytes
    }

    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}
