//! The content-addressed artifact store behind every tinygpt run.
//!
//! `objects/<key>/` holds one artifact: the files a stage wrote plus `manifest.json`.
//! Artifacts are staged in `tmp/<key>/` under a per-key lock and renamed into place only when
//! complete, so a crash leaves either the whole artifact or none.
//!
//! [`Remote`] mirrors the store on object storage (S3 or a shared directory) for a team.
//!
//! This crate stores bytes under keys. It never names a stage kind, never parses a recipe and
//! never decides what a key is made of: the engine does that and hands over opaque metadata.

mod digest;
mod error;
mod lock;
mod manifest;
mod remote;
mod runs;
mod statcache;
mod store;

pub use digest::{hash_file, ContentHash};
pub use error::{CacheError, Result};
pub use lock::KeyLock;
pub use manifest::{FileEntry, Manifest, MANIFEST_FORMAT};
pub use remote::{Pushed, Remote, RemoteError, RemoteResult};
pub use runs::{RunRecord, RunSummary};
pub use statcache::{list_files, StatCache};
pub use store::{Artifact, GcReport, Staging, Store, VerifyProblem, FAMILY_META};
