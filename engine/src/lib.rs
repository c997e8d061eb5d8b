//! The tinygpt engine: a TOML recipe becomes a checked DAG of stages; each stage is restored
//! from the content-addressed store when its key is unchanged, or run and stored.
//!
//! The engine knows stages only through the [`Stage`] trait and never names a kind. It does not
//! print, read environment variables or pick exit codes: the binary does, through [`Observer`].

pub mod error;
pub mod exec;
pub mod graph;
pub mod key;
pub mod observer;
pub mod params;
pub mod plan;
pub mod recipe;
pub mod remote;
pub mod stage;

pub use cache;
pub use error::{EngineError, Origin, RecipeError};
pub use exec::{run, RunOptions, RunReport, StageOutcome, StageRunner};
pub use key::{DirtyReason, Preimage};
pub use observer::{Observer, Silent, StageProgress};
pub use params::{ParamSpec, ParamType, ParamValue, Params};
pub use plan::{plan, plan_with_remote, Action, PlannedStage};
pub use recipe::{Recipe, ResolvedStage, Resources};
pub use remote::RemoteUse;
pub use stage::{
    Accepts, ArtifactType, Input, InputSpec, Metrics, ParamProblem, Registry, Stage, StageCtx, StageError, Vocabulary,
};
