//! Planning: for every stage, is its artifact cached, and if not, why must it run. Shared by
//! `tinygpt plan` (which stops there) and the executor (which decides stage by stage).

use std::collections::{BTreeMap, HashMap};

use cache::{Artifact, ContentHash, StatCache, Store};
use serde::Serialize;

use crate::error::EngineError;
use crate::key::{diff, DirtyReason, InputDigest, Preimage};
use crate::recipe::{InputSource, Recipe, StageId};
use crate::remote::RemoteUse;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Run,
    Cached,
    /// Not in the local store, but in the remote cache: downloaded rather than built.
    Remote,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Run => "run",
            Action::Cached => "cached",
            Action::Remote => "remote",
        })
    }
}

/// One stage of a plan.
pub struct PlannedStage {
    pub name: String,
    pub kind: String,
    /// Unknown while an upstream stage must run first.
    pub key: Option<ContentHash>,
    pub action: Action,
    /// Why the local store lacks it; empty when cached.
    pub reasons: Vec<DirtyReason>,
    /// The local artifact, when cached.
    pub artifact: Option<Artifact>,
}

/// Digests of every raw input of the recipe, by (stage, slot).
pub(crate) type RawDigests = HashMap<(StageId, &'static str), ContentHash>;

fn hash_raw_inputs(recipe: &Recipe, stat: &StatCache) -> Result<RawDigests, EngineError> {
    let mut out = HashMap::new();
    for (id, stage) in recipe.stages.iter().enumerate() {
        for input in &stage.inputs {
            if let InputSource::Raw { path, .. } = &input.source {
                let digest = stat.digest(path).map_err(|source| EngineError::RawInput {
                    stage: stage.name.clone(),
                    slot: input.slot.to_string(),
                    source,
                })?;
                out.insert((id, input.slot), digest);
            }
        }
    }
    Ok(out)
}

/// The inputs of a stage, once every upstream artifact it reads is known.
pub(crate) enum Inputs {
    Known(BTreeMap<String, InputDigest>),
    Pending { slot: &'static str, stage: String },
}

pub(crate) fn gather_inputs(recipe: &Recipe, id: StageId, artifacts: &[Option<Artifact>], raw: &RawDigests) -> Inputs {
    let mut known = BTreeMap::new();
    for input in &recipe.stages[id].inputs {
        let digest = match &input.source {
            InputSource::Stage(up) => match &artifacts[*up] {
                Some(a) => InputDigest {
                    digest: a.manifest.content_digest,
                    from: format!("stage `{}`", recipe.stages[*up].name),
                },
                None => return Inputs::Pending { slot: input.slot, stage: recipe.stages[*up].name.clone() },
            },
            InputSource::Raw { shown, .. } => {
                InputDigest { digest: raw[&(id, input.slot)], from: format!("file `{shown}`") }
            }
        };
        known.insert(input.slot.to_string(), digest);
    }
    Inputs::Known(known)
}

/// What planning and running both start from: the digest of every raw input (through the
/// stat cache, saved straight away) and the preimages of the last build of each stage of this
/// recipe, by stage name.
pub(crate) fn prepare(recipe: &Recipe, store: &Store) -> Result<(RawDigests, BTreeMap<String, Preimage>), EngineError> {
    let stat = store.stat_cache();
    let raw = hash_raw_inputs(recipe, &stat)?;
    stat.save()?;
    let previous = match store.latest_run(&recipe.name)? {
        Some(record) => serde_json::from_value(record.detail["stages"].clone()).unwrap_or_default(),
        None => BTreeMap::new(),
    };
    Ok((raw, previous))
}

/// Plan the recipe without running anything.
pub fn plan(recipe: &Recipe, store: &Store) -> Result<Vec<PlannedStage>, EngineError> {
    plan_with_remote(recipe, store, None, &|_| {})
}

/// Plan the recipe, asking the remote (if any) for each artifact missing locally: a stage the
/// remote has is planned as [`Action::Remote`], and its manifest gives the keys of the stages
/// below it. Failures of the remote that only warrant a warning are told to `warn`.
pub fn plan_with_remote(
    recipe: &Recipe,
    store: &Store,
    remote: Option<&RemoteUse>,
    warn: &dyn Fn(&str),
) -> Result<Vec<PlannedStage>, EngineError> {
    let (raw, previous) = prepare(recipe, store)?;
    let mut artifacts: Vec<Option<Artifact>> = vec![None; recipe.stages.len()];
    let mut planned = Vec::with_capacity(recipe.stages.len());
    for (id, stage) in recipe.stages.iter().enumerate() {
        let kind = stage.kind.kind().to_string();
        let entry = match gather_inputs(recipe, id, &artifacts, &raw) {
            Inputs::Pending { slot, stage: up } => PlannedStage {
                name: stage.name.clone(),
                kind,
                key: None,
                action: Action::Run,
                reasons: vec![DirtyReason::UpstreamRuns { slot: slot.to_string(), stage: up }],
                artifact: None,
            },
            Inputs::Known(inputs) => {
                let preimage = Preimage::new(stage, inputs);
                let key = preimage.key();
                match store.get(&key)? {
                    Some(artifact) => {
                        artifacts[id] = Some(artifact.clone());
                        PlannedStage {
                            name: stage.name.clone(),
                            kind,
                            key: Some(key),
                            action: Action::Cached,
                            reasons: vec![],
                            artifact: Some(artifact),
                        }
                    }
                    None => {
                        let in_remote = match remote.filter(|r| r.usable()) {
                            Some(r) => r.consult(r.remote.manifest(&key), warn)?.flatten(),
                            None => None,
                        };
                        let action = match in_remote {
                            Some(manifest) => {
                                artifacts[id] = Some(Artifact { dir: store.object_dir(&key), manifest });
                                Action::Remote
                            }
                            None => Action::Run,
                        };
                        PlannedStage {
                            name: stage.name.clone(),
                            kind,
                            key: Some(key),
                            action,
                            reasons: match previous.get(&stage.name) {
                                None => vec![DirtyReason::NeverRun],
                                Some(old) => diff(old, &preimage),
                            },
                            artifact: None,
                        }
                    }
                }
            }
        };
        planned.push(entry);
    }
    Ok(planned)
}
