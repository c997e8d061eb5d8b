//! How the engine reports progress without printing: the binary implements these traits
//! (with indicatif), tests and benchmarks use the silent ones.

use crate::exec::StageOutcome;

/// Progress of one running stage.
pub trait StageProgress: Send + Sync {
    /// Total amount of work, in the stage's own unit (`unit` names it: "bytes", "docs", ...).
    fn set_length(&self, _total: u64, _unit: &'static str) {}
    fn set_position(&self, _done: u64) {}
    fn inc(&self, _delta: u64) {}
    fn set_message(&self, _message: &str) {}
}

/// Receives engine events while a recipe runs.
pub trait Observer: Sync {
    fn stage_started(&self, _name: &str, _kind: &str) -> Box<dyn StageProgress> {
        Box::new(Silent)
    }
    /// The stage's artifact is being downloaded from the remote cache.
    fn stage_downloading(&self, _name: &str) -> Box<dyn StageProgress> {
        Box::new(Silent)
    }
    /// Something went wrong that the run works around (an unreachable remote cache).
    fn warning(&self, _message: &str) {}
    /// Another process holds this stage's lock; the engine waits for it.
    fn stage_waiting(&self, _name: &str) {}
    fn stage_finished(&self, _outcome: &StageOutcome) {}
    fn stage_failed(&self, _name: &str, _error: &str) {}
}

/// Reports nothing.
pub struct Silent;

impl StageProgress for Silent {}
impl Observer for Silent {}
