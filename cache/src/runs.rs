//! Run records: which keys each `tinygpt run` produced or used, kept for `gc --keep-runs` and
//! for telling, on the next plan, what changed since.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::digest::ContentHash;
use crate::error::{IoContext, Result};

/// One run of one recipe. `detail` is opaque to the store (the engine keeps key preimages there).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    /// A label for the recipe (its `[recipe] name`).
    pub label: String,
    /// Every key the run produced or reused.
    pub keys: Vec<ContentHash>,
    pub detail: serde_json::Value,
    /// What the run did, for `tinygpt runs`; absent in records written before it existed.
    #[serde(default)]
    pub summary: Option<RunSummary>,
}

/// When a run started, how long it took, and what became of its stages.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunSummary {
    /// Seconds since the Unix epoch.
    pub started: u64,
    pub seconds: f64,
    /// The recipe path as given on the command line.
    pub recipe: String,
    pub ran: usize,
    pub cached: usize,
    /// Downloaded from the remote cache.
    #[serde(default)]
    pub remote: usize,
    pub failed: usize,
    /// Stages never started because of a failure or an interruption.
    pub not_run: usize,
    pub interrupted: bool,
}

impl RunRecord {
    pub(crate) fn read(path: &Path) -> Result<Option<RunRecord>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).ctx("reading", path),
        }
    }
}
