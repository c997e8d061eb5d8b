//! The `Stage` trait: what the engine knows about a stage kind, and what a stage gets to run.
//!
//! The engine never names a kind; `stages` registers its kinds in a [`Registry`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::observer::StageProgress;
use crate::params::{ParamSpec, Params};

/// The type of artifact a stage produces and an input slot accepts ("text", "tokens",
/// "packed", "model", ...). Checked when the recipe is resolved, before anything runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArtifactType(pub &'static str);

/// What an input slot may be wired to.
#[derive(Debug, Clone, Copy)]
pub enum Accepts {
    /// A file or directory, hashed by content.
    Raw,
    /// The output of another stage, of one of these types.
    Artifact(&'static [ArtifactType]),
    /// Either of the above.
    RawOrArtifact(&'static [ArtifactType]),
}

impl Accepts {
    pub fn raw(&self) -> bool {
        matches!(self, Accepts::Raw | Accepts::RawOrArtifact(_))
    }
    pub fn types(&self) -> &'static [ArtifactType] {
        match self {
            Accepts::Raw => &[],
            Accepts::Artifact(t) | Accepts::RawOrArtifact(t) => t,
        }
    }
}

/// One named input slot of a stage kind.
#[derive(Debug, Clone, Copy)]
pub struct InputSpec {
    pub name: &'static str,
    pub accepts: Accepts,
    pub required: bool,
    pub doc: &'static str,
}

/// Where the token ids of a stage's output come from, so that stages fed ids from different
/// tokenizers are refused when the recipe is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vocabulary {
    /// The output holds no token ids (text, evaluation results).
    None,
    /// The stage makes a tokenizer: its output's ids are its own.
    Own,
    /// The output's ids are those of the input wired to this slot.
    From(&'static str),
}

/// A cross-parameter problem found by [`Stage::check`]; `key` is the recipe key to point at.
#[derive(Debug, Clone)]
pub struct ParamProblem {
    pub key: String,
    pub message: String,
}

impl ParamProblem {
    pub fn new(key: &str, message: impl Into<String>) -> Self {
        ParamProblem { key: key.to_string(), message: message.into() }
    }
}

/// The numbers a stage reports: shown in the summary table, `--json`, and the manifest.
pub type Metrics = BTreeMap<String, serde_json::Value>;

/// Why a stage did not finish.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("interrupted")]
    Interrupted,
    /// A complete, human-readable message: what failed, on which file, at which place.
    #[error("{0}")]
    Failed(String),
    /// The stage's input data is malformed (a missing field, a wrong type): a message naming
    /// the file, the row and the field. Like a bad recipe, the user must fix what they gave.
    #[error("{0}")]
    BadInput(String),
}

impl StageError {
    pub fn msg(message: impl Into<String>) -> Self {
        StageError::Failed(message.into())
    }

    /// Malformed input data (see [`StageError::BadInput`]).
    pub fn bad_input(message: impl Into<String>) -> Self {
        StageError::BadInput(message.into())
    }

    /// An error with its whole chain of causes: "reading `x`: permission denied".
    pub fn chain(context: impl std::fmt::Display, err: &dyn std::error::Error) -> Self {
        let mut text = format!("{context}: {err}");
        let mut source = err.source();
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        StageError::Failed(text)
    }
}

/// A stage kind. Implementations live in the `stages` crate, one file per kind.
pub trait Stage: Send + Sync {
    /// The `kind` written in recipes.
    fn kind(&self) -> &'static str;
    /// Bump when the output bytes for the same inputs and parameters would change: every cached
    /// artifact of this kind then reruns.
    fn version(&self) -> u32;
    /// One line for `tinygpt doc` and the docs.
    fn about(&self) -> &'static str;
    fn params(&self) -> &'static [ParamSpec];
    fn inputs(&self) -> &'static [InputSpec];
    fn output(&self) -> ArtifactType;
    /// Whether the output depends on the seed (then the seed is part of the key).
    fn uses_seed(&self) -> bool {
        false
    }
    /// Output files whose bytes may differ between runs with the same key: wall-clock timings,
    /// or logs shaped by parameters that are not hashed. The store verifies them like any file
    /// but leaves them out of the content digest, so that rerunning such a stage to the same
    /// results keeps its dependents cached. Everything else a stage writes must depend only on
    /// its key.
    fn volatile_outputs(&self) -> &'static [&'static str] {
        &[]
    }
    /// Parameters that only say how long the stage runs (a training stage's `max_steps`): runs
    /// that differ only in them share [`StageCtx::family_dir`], where a shorter run leaves what
    /// a longer one may continue from. The stage must guarantee the continued result equals a
    /// run from scratch bit for bit.
    fn run_length_params(&self) -> &'static [&'static str] {
        &[]
    }
    /// Where the token ids of the output come from.
    fn vocabulary(&self) -> Vocabulary {
        Vocabulary::None
    }
    /// Input slots whose ids must come from one tokenizer (checked when the recipe is resolved).
    fn same_vocabulary(&self) -> &'static [&'static str] {
        &[]
    }
    /// Checks across parameters, run when the recipe is resolved. `connected` holds the input
    /// slots the recipe wired.
    fn check(&self, _params: &Params, _connected: &BTreeSet<&str>) -> Result<(), ParamProblem> {
        Ok(())
    }
    /// What the recipe alone tells of this stage's output before anything runs (a model
    /// stage: its layers' widths), from its parameters and from what its inputs' stages tell
    /// of theirs (`upstream`, by slot wired to a stage; `Null` where that stage tells nothing;
    /// raw inputs are absent). JSON the engine passes on without reading.
    fn output_shape(&self, _params: &Params, _upstream: &BTreeMap<&str, &serde_json::Value>) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Checks against what the inputs' stages tell of their outputs ([`Stage::output_shape`]),
    /// run when the recipe is resolved: a problem found here would otherwise stop the stage
    /// only after its inputs were built.
    fn check_shapes(
        &self,
        _params: &Params,
        _upstream: &BTreeMap<&str, &serde_json::Value>,
    ) -> Result<(), ParamProblem> {
        Ok(())
    }
    /// Write the output files into `ctx.out_dir()`.
    fn run(&self, ctx: &StageCtx<'_>) -> Result<Metrics, StageError>;
}

/// What one input slot is wired to, as a running stage sees it.
#[derive(Debug, Clone)]
pub enum Input {
    /// A raw file or directory, with the path as the recipe wrote it for messages.
    Raw { path: PathBuf, shown: String },
    /// A published artifact of an upstream stage.
    Artifact { artifact: cache::Artifact, stage: String, ty: ArtifactType },
}

impl Input {
    /// How to name this input in a message.
    pub fn describe(&self) -> String {
        match self {
            Input::Raw { shown, .. } => format!("`{shown}`"),
            Input::Artifact { stage, .. } => format!("the output of stage `{stage}`"),
        }
    }
}

/// Everything a running stage may use. It writes only into `out_dir` (and `work_dir` for
/// checkpoints); it reads only its inputs.
pub struct StageCtx<'a> {
    pub(crate) stage: &'a str,
    pub(crate) params: &'a Params,
    pub(crate) seed: u64,
    pub(crate) out_dir: &'a Path,
    pub(crate) work_dir: &'a Path,
    pub(crate) inputs: &'a BTreeMap<&'static str, Input>,
    pub(crate) progress: &'a dyn StageProgress,
    pub(crate) cancel: &'a AtomicBool,
    pub(crate) family_dir: Option<&'a Path>,
}

impl<'a> StageCtx<'a> {
    /// Build a context directly, for running a stage outside the engine (tests, benchmarks).
    #[allow(clippy::too_many_arguments)] // one argument per field of a plain struct
    pub fn new(
        stage: &'a str,
        params: &'a Params,
        seed: u64,
        out_dir: &'a Path,
        work_dir: &'a Path,
        inputs: &'a BTreeMap<&'static str, Input>,
        progress: &'a dyn StageProgress,
        cancel: &'a AtomicBool,
    ) -> Self {
        StageCtx { stage, params, seed, out_dir, work_dir, inputs, progress, cancel, family_dir: None }
    }
    pub fn stage(&self) -> &str {
        self.stage
    }
    pub fn params(&self) -> &Params {
        self.params
    }
    pub fn seed(&self) -> u64 {
        self.seed
    }
    pub fn out_dir(&self) -> &Path {
        self.out_dir
    }
    pub fn out(&self, file: &str) -> PathBuf {
        self.out_dir.join(file)
    }
    pub fn work_dir(&self) -> &Path {
        self.work_dir
    }
    /// For a kind with [`Stage::run_length_params`]: a directory shared by every run of this
    /// stage that differs from this one at most in those parameters (the same inputs, seed
    /// and other parameters), kept across runs; it may not exist yet. A run leaves checkpoints
    /// there that a longer run starts from; each entry must be written atomically and depend
    /// only on the shared key. `None` for other kinds.
    pub fn family_dir(&self) -> Option<&Path> {
        self.family_dir
    }
    pub fn input(&self, slot: &str) -> Option<&Input> {
        self.inputs.get(slot)
    }
    /// # Panics
    /// If the slot is not connected: resolution guarantees required slots are.
    pub fn required_input(&self, slot: &str) -> &Input {
        self.inputs.get(slot).unwrap_or_else(|| panic!("required input slot `{slot}` is not connected"))
    }
    pub fn progress(&self) -> &dyn StageProgress {
        self.progress
    }
    /// Return `Err(Interrupted)` once the user asked to stop; call it in long loops.
    pub fn check_cancelled(&self) -> Result<(), StageError> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(StageError::Interrupted)
        } else {
            Ok(())
        }
    }
}

/// The stage kinds a recipe may use.
#[derive(Default, Clone)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn Stage>>,
}

impl Registry {
    /// # Panics
    /// If two kinds share a name: a programming error in the registration list.
    pub fn register(&mut self, stage: Arc<dyn Stage>) {
        let kind = stage.kind();
        assert!(self.kinds.insert(kind, stage).is_none(), "stage kind `{kind}` registered twice");
    }
    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Stage>> {
        self.kinds.get(kind)
    }
    pub fn kinds(&self) -> impl Iterator<Item = &Arc<dyn Stage>> {
        self.kinds.values()
    }
    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }
}
