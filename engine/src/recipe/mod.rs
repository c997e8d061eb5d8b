//! Recipes: the TOML file as written ([`raw`]), command-line overrides ([`overrides`]), and the
//! checked form the rest of the engine uses ([`Recipe`]). Nothing after resolution sees TOML.

pub mod overrides;
pub mod raw;
mod resolve;
mod sweep;
mod tables;

use std::path::PathBuf;
use std::sync::Arc;

pub use resolve::{load, resolve};

use crate::params::Params;
use crate::stage::Stage;

/// Index of a stage in [`Recipe::stages`].
pub type StageId = usize;

/// A checked recipe.
///
/// Invariant: `stages` is in topological order (every input stage comes before the stages it
/// feeds; ties keep the order of the recipe file), every parameter is checked against its
/// kind's declaration, every input slot is wired to an earlier stage of an accepted type or
/// to an existing file or directory.
pub struct Recipe {
    pub name: String,
    /// The recipe path as given on the command line.
    pub path: PathBuf,
    pub seed: u64,
    pub stages: Vec<ResolvedStage>,
}

pub struct ResolvedStage {
    /// `align`, or for a member of a sweep `align[beta=0.1]`.
    pub name: String,
    /// The stage as the recipe writes it: `align` for every member of its sweep.
    pub template: String,
    /// The grid point of a sweep member, (key, value) as its name shows them; empty otherwise.
    pub point: Vec<(String, String)>,
    pub kind: Arc<dyn Stage>,
    pub params: Params,
    /// The recipe seed unless the stage sets its own.
    pub seed: u64,
    /// Threads for this stage's parallel work; `None` uses every core. Not part of the key.
    pub threads: Option<usize>,
    /// What to ask a cluster scheduler for when it runs this stage. Not part of the key.
    pub resources: Resources,
    /// In the order the kind declares its slots.
    pub inputs: Vec<ResolvedInput>,
}

/// The resources a scheduler gives one stage: the recipe's `[executor]` table, then the
/// stage's own `executor = { ... }` key by key. Unset values are the scheduler's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub partition: Option<String>,
    /// A time limit as the scheduler writes it (`30:00`, `2:00:00`, `1-00:00:00`).
    pub time: Option<String>,
    pub cpus: Option<u32>,
    /// Memory as the scheduler writes it (`4G`, `500M`).
    pub mem: Option<String>,
}

/// The keys of an `[executor]` table.
pub const RESOURCE_KEYS: [&str; 4] = ["partition", "time", "cpus", "mem"];

pub struct ResolvedInput {
    pub slot: &'static str,
    pub source: InputSource,
}

pub enum InputSource {
    Stage(StageId),
    /// A file or directory: `path` is resolved (against the recipe's folder, or the current
    /// directory for `--set`), `shown` is the text as written.
    Raw {
        path: PathBuf,
        shown: String,
    },
}

impl Recipe {
    pub fn stage_id(&self, name: &str) -> Option<StageId> {
        self.stages.iter().position(|s| s.name == name)
    }
}
