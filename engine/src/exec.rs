//! Running a recipe: stages in topological order, independent branches concurrently (at most
//! `jobs` at once), each restored from the store or run into a staging directory and published.
//!
//! Keys are computed only when a stage's inputs are all built, from the upstream artifacts'
//! content digests: a stage that reran and wrote identical bytes leaves its dependents cached.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use cache::{Artifact, ContentHash, RunRecord, RunSummary, Staging, Store};
use serde_json::json;

use crate::error::EngineError;
use crate::key::Preimage;
use crate::observer::Observer;
use crate::plan::{gather_inputs, prepare, Action, Inputs};
use crate::recipe::{InputSource, Recipe, ResolvedStage, StageId};
use crate::remote::RemoteUse;
use crate::stage::{Input, Metrics, StageCtx, StageError};

pub struct RunOptions<'a> {
    /// Most stages running at once (at least 1).
    pub jobs: usize,
    /// Set by the binary on Ctrl-C; running stages stop at their next check.
    pub cancel: &'a AtomicBool,
    pub observer: &'a dyn Observer,
    /// Where to look for artifacts missing locally, and to upload the ones built.
    pub remote: Option<&'a RemoteUse>,
    /// Runs each stage that must be built somewhere else (a cluster job); `None` runs it here.
    pub runner: Option<&'a dyn StageRunner>,
    /// Run only this stage and what it reads, and only if its key is this one (a cluster job
    /// running one stage of a plan made elsewhere). No run record is written.
    pub only: Option<(&'a str, ContentHash)>,
}

impl<'a> RunOptions<'a> {
    /// Every stage, in this process, with no remote cache.
    pub fn local(jobs: usize, cancel: &'a AtomicBool, observer: &'a dyn Observer) -> Self {
        RunOptions { jobs, cancel, observer, remote: None, runner: None, only: None }
    }
}

/// Builds a stage outside this process, for example as a job of a cluster scheduler, into the
/// same store (a shared filesystem) or through the remote cache. The engine still walks the
/// DAG: a stage is handed over only once everything it reads is built.
pub trait StageRunner: Sync {
    /// Build `stage`'s artifact under `key` and return once it is published, failed, or
    /// cancelled because `cancel` was set ([`StageError::Interrupted`]).
    fn run_stage(&self, stage: &ResolvedStage, key: &ContentHash, cancel: &AtomicBool) -> Result<(), StageError>;
}

/// A stage that finished in this run, by running or from the cache.
#[derive(Clone, Debug)]
pub struct StageOutcome {
    pub name: String,
    pub kind: String,
    pub key: ContentHash,
    pub action: Action,
    /// Time spent in this run (near zero when cached).
    pub seconds: f64,
    pub metrics: serde_json::Value,
    pub artifact: Artifact,
}

#[derive(Debug)]
pub struct StageFailure {
    pub stage: String,
    pub message: String,
    /// The stage's input data was malformed ([`StageError::BadInput`]), not the stage broken.
    pub bad_input: bool,
}

#[derive(Debug, Default)]
pub struct RunReport {
    /// In topological order; stages that did not finish are absent.
    pub outcomes: Vec<StageOutcome>,
    pub failure: Option<StageFailure>,
    pub interrupted: bool,
    /// Stages never started because of a failure or an interruption.
    pub not_run: Vec<String>,
}

enum Done {
    Finished(Box<StageOutcome>),
    Failed { message: String, bad_input: bool },
    Interrupted,
}

/// Run every stage of the recipe that is not cached.
pub fn run(recipe: &Recipe, store: &Store, opts: &RunOptions<'_>) -> Result<RunReport, EngineError> {
    let jobs = opts.jobs.max(1);
    let started = (std::time::SystemTime::now(), Instant::now());
    let (raw, previous) = prepare(recipe, store)?;

    let n = recipe.stages.len();
    let wanted = wanted_stages(recipe, opts.only.map(|(name, _)| name))?;
    let mut dependents: Vec<Vec<StageId>> = vec![Vec::new(); n];
    let mut waiting: Vec<usize> = vec![0; n];
    for (id, stage) in recipe.stages.iter().enumerate().filter(|(id, _)| wanted[*id]) {
        let mut ups: Vec<StageId> = stage
            .inputs
            .iter()
            .filter_map(|i| if let InputSource::Stage(up) = i.source { Some(up) } else { None })
            .collect();
        ups.sort_unstable();
        ups.dedup();
        waiting[id] = ups.len();
        for up in ups {
            dependents[up].push(id);
        }
    }

    let mut artifacts: Vec<Option<Artifact>> = vec![None; n];
    let mut outcomes: Vec<Option<StageOutcome>> = vec![None; n];
    let mut preimages: BTreeMap<String, Preimage> = BTreeMap::new();
    let mut report = RunReport::default();
    // A shared lock on every artifact the run has, until it ends: `cache gc` from elsewhere
    // leaves what later stages will read.
    let mut leases = Vec::new();
    let mut ready: BinaryHeap<Reverse<StageId>> =
        (0..n).filter(|i| wanted[*i] && waiting[*i] == 0).map(Reverse).collect();
    let (tx, rx) = mpsc::channel::<(StageId, Done)>();

    let result: Result<(), EngineError> = std::thread::scope(|scope| {
        let mut running = 0usize;
        let mut stop = false;
        loop {
            let mut deferred = Vec::new();
            while let Some(Reverse(id)) = ready.pop() {
                if stop || opts.cancel.load(Ordering::Relaxed) {
                    report.interrupted |= opts.cancel.load(Ordering::Relaxed);
                    stop = true;
                    deferred.push(id);
                    continue;
                }
                let stage = &recipe.stages[id];
                let Inputs::Known(inputs) = gather_inputs(recipe, id, &artifacts, &raw) else {
                    unreachable!("a stage becomes ready only when every upstream stage finished");
                };
                let preimage = Preimage::new(stage, inputs);
                let key = preimage.key();
                if let Some((name, expected)) = opts.only.filter(|(name, _)| *name == stage.name) {
                    if key != expected {
                        return Err(EngineError::KeyChanged {
                            stage: name.to_string(),
                            here: key.short(),
                            submitted: expected.short(),
                        });
                    }
                }
                if let Some((artifact, lease)) = store.lease(&key)? {
                    leases.push(lease);
                    let outcome = cached_outcome(stage, key, artifact, 0.0);
                    opts.observer.stage_finished(&outcome);
                    preimages.insert(stage.name.clone(), preimage);
                    complete(id, outcome, &mut artifacts, &mut outcomes, &dependents, &mut waiting, &mut ready);
                    continue;
                }
                if running >= jobs {
                    deferred.push(id);
                    continue;
                }
                let inputs = stage_inputs(recipe, id, &artifacts);
                preimages.insert(stage.name.clone(), preimage.clone());
                let tx = tx.clone();
                let family = preimage.family_key(stage.kind.run_length_params());
                let mut meta = json!({
                    "recipe": recipe.name,
                    "stage": stage.name,
                    "kind": stage.kind.kind(),
                    "params": stage.params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
                    "preimage": preimage,
                });
                if let Some(family) = family {
                    meta[cache::FAMILY_META] = json!(family.to_hex());
                }
                running += 1;
                scope.spawn(move || {
                    let done = match opts.runner {
                        None => try_execute(stage, key, family, meta, &inputs, store, opts),
                        Some(runner) => try_submit(stage, key, store, opts, runner),
                    };
                    let done = done.unwrap_or_else(|e| match e {
                        EngineError::Interrupted => Done::Interrupted,
                        e => Done::Failed { message: e.to_string(), bad_input: false },
                    });
                    let _ = tx.send((id, done));
                });
            }
            ready.extend(deferred.into_iter().map(Reverse));
            if running == 0 {
                break;
            }
            let (id, done) = rx.recv().expect("a worker always reports before exiting");
            running -= 1;
            let done = match done {
                Done::Finished(outcome) => match store.lease(&outcome.key)? {
                    Some((_, lease)) => {
                        leases.push(lease);
                        Done::Finished(outcome)
                    }
                    None => Done::Failed {
                        message: "its artifact was removed as it was published (a `cache gc` at that moment?); \
                                  run again"
                            .to_string(),
                        bad_input: false,
                    },
                },
                other => other,
            };
            match done {
                Done::Finished(outcome) => {
                    opts.observer.stage_finished(&outcome);
                    complete(id, *outcome, &mut artifacts, &mut outcomes, &dependents, &mut waiting, &mut ready);
                }
                Done::Failed { message, bad_input } => {
                    let name = recipe.stages[id].name.clone();
                    opts.observer.stage_failed(&name, &message);
                    report.failure.get_or_insert(StageFailure { stage: name, message, bad_input });
                    stop = true;
                }
                Done::Interrupted => {
                    report.interrupted = true;
                    stop = true;
                }
            }
        }
        Ok(())
    });
    result?;

    for (id, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            Some(o) => report.outcomes.push(o),
            None if wanted[id] => report.not_run.push(recipe.stages[id].name.clone()),
            None => {}
        }
    }
    if opts.only.is_none() {
        record_run(store, recipe, &report, previous, preimages, started)?;
    }
    Ok(report)
}

/// Which stages a run builds: all, or the one named and the stages it reads, transitively.
fn wanted_stages(recipe: &Recipe, only: Option<&str>) -> Result<Vec<bool>, EngineError> {
    let Some(name) = only else { return Ok(vec![true; recipe.stages.len()]) };
    let target = recipe.stage_id(name).ok_or_else(|| {
        EngineError::Recipe(crate::error::RecipeError::new(format!(
            "the recipe `{}` has no stage `{name}`",
            recipe.path.display()
        )))
    })?;
    let mut wanted = vec![false; recipe.stages.len()];
    wanted[target] = true;
    for id in (0..=target).rev() {
        if wanted[id] {
            for input in &recipe.stages[id].inputs {
                if let InputSource::Stage(up) = input.source {
                    wanted[up] = true;
                }
            }
        }
    }
    Ok(wanted)
}

fn complete(
    id: StageId,
    outcome: StageOutcome,
    artifacts: &mut [Option<Artifact>],
    outcomes: &mut [Option<StageOutcome>],
    dependents: &[Vec<StageId>],
    waiting: &mut [usize],
    ready: &mut BinaryHeap<Reverse<StageId>>,
) {
    artifacts[id] = Some(outcome.artifact.clone());
    outcomes[id] = Some(outcome);
    for &d in &dependents[id] {
        waiting[d] -= 1;
        if waiting[d] == 0 {
            ready.push(Reverse(d));
        }
    }
}

fn cached_outcome(stage: &ResolvedStage, key: ContentHash, artifact: Artifact, seconds: f64) -> StageOutcome {
    StageOutcome {
        name: stage.name.clone(),
        kind: stage.kind.kind().to_string(),
        key,
        action: Action::Cached,
        seconds,
        metrics: artifact.manifest.metrics.clone(),
        artifact,
    }
}

fn stage_inputs(recipe: &Recipe, id: StageId, artifacts: &[Option<Artifact>]) -> BTreeMap<&'static str, Input> {
    recipe.stages[id]
        .inputs
        .iter()
        .map(|i| {
            let input = match &i.source {
                InputSource::Stage(up) => Input::Artifact {
                    artifact: artifacts[*up].clone().expect("upstream finished"),
                    stage: recipe.stages[*up].name.clone(),
                    ty: recipe.stages[*up].kind.output(),
                },
                InputSource::Raw { path, shown } => Input::Raw { path: path.clone(), shown: shown.clone() },
            };
            (i.slot, input)
        })
        .collect()
}

/// Build one stage under its key's lock. Runs on a worker thread.
fn try_execute(
    stage: &ResolvedStage,
    key: ContentHash,
    family: Option<ContentHash>,
    meta: serde_json::Value,
    inputs: &BTreeMap<&'static str, Input>,
    store: &Store,
    opts: &RunOptions<'_>,
) -> Result<Done, EngineError> {
    let staging = match store.try_begin(&key)? {
        Some(s) => s,
        None => {
            opts.observer.stage_waiting(&stage.name);
            store.begin(&key)?
        }
    };
    // Another process may have published this key while we waited for the lock.
    if let Some(artifact) = store.get(&key)? {
        store.abandon(staging)?;
        return Ok(Done::Finished(Box::new(cached_outcome(stage, key, artifact, 0.0))));
    }
    let remote = opts.remote.filter(|r| r.usable());
    let warn = stage_warning(opts, stage);
    let staging = match remote {
        Some(remote) => match pull(remote, stage, key, staging, store, opts, &warn)? {
            Ok(outcome) => return Ok(Done::Finished(Box::new(outcome))),
            Err(staging) => staging,
        },
        None => staging,
    };
    // Held until the artifact, which names the family, is published: `gc` leaves it alone.
    let family = family.map(|f| store.lease_family(&f)).transpose()?;
    let family_dir = family.as_ref().map(|(dir, _)| dir.as_path());
    let progress = opts.observer.stage_started(&stage.name, stage.kind.kind());
    let start = Instant::now();
    let ctx = StageCtx {
        stage: &stage.name,
        params: &stage.params,
        seed: stage.seed,
        out_dir: staging.dir(),
        work_dir: staging.work_dir(),
        inputs,
        progress: progress.as_ref(),
        cancel: opts.cancel,
        family_dir,
    };
    let run = || std::panic::catch_unwind(AssertUnwindSafe(|| stage.kind.run(&ctx)));
    let result = match stage.threads {
        Some(threads) => match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
            Ok(pool) => pool.install(run),
            Err(e) => Ok(Err(StageError::msg(format!("cannot start {threads} threads: {e}")))),
        },
        // On a thread of the global pool: a stage's parallel loops then start on its own
        // thread instead of handing their work over and sleeping until it is done.
        None => rayon::scope(|_| run()),
    };
    let result: Result<Metrics, StageError> = result.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(StageError::msg(format!("internal error (a bug in tinygpt, please report it): {what}")))
    });
    match result {
        Ok(metrics) => {
            let seconds = start.elapsed().as_secs_f64();
            let metrics = serde_json::Value::Object(metrics.into_iter().collect());
            let artifact = store.publish(staging, stage.kind.volatile_outputs(), meta, metrics.clone(), seconds)?;
            if let Some(remote) = remote.filter(|r| r.usable()) {
                progress.set_message("uploading to the remote cache");
                progress.set_length(artifact.manifest.total_bytes(), "bytes");
                remote.consult(remote.remote.push(&artifact, &|n| progress.inc(n), opts.cancel), &warn)?;
            }
            Ok(Done::Finished(Box::new(StageOutcome {
                name: stage.name.clone(),
                kind: stage.kind.kind().to_string(),
                key,
                action: Action::Run,
                seconds,
                metrics,
                artifact,
            })))
        }
        Err(e) => {
            store.abandon(staging)?;
            Ok(match e {
                StageError::Interrupted => Done::Interrupted,
                StageError::Failed(message) => Done::Failed { message, bad_input: false },
                StageError::BadInput(message) => Done::Failed { message, bad_input: true },
            })
        }
    }
}

/// Build one stage through the runner: from the remote if it has the artifact, else handed
/// over, then read from the store (shared with the runner) or the remote. Runs on a worker
/// thread.
fn try_submit(
    stage: &ResolvedStage,
    key: ContentHash,
    store: &Store,
    opts: &RunOptions<'_>,
    runner: &dyn StageRunner,
) -> Result<Done, EngineError> {
    let warn = stage_warning(opts, stage);
    let from_remote = |staging| -> Result<Result<StageOutcome, Staging>, EngineError> {
        match opts.remote.filter(|r| r.usable()) {
            Some(remote) => pull(remote, stage, key, staging, store, opts, &warn),
            None => Ok(Err(staging)),
        }
    };
    if opts.remote.is_some_and(|r| r.usable()) {
        let staging = store.begin(&key)?;
        match from_remote(staging)? {
            Ok(outcome) => return Ok(Done::Finished(Box::new(outcome))),
            Err(staging) => store.abandon(staging)?,
        }
    }
    let start = Instant::now();
    let progress = opts.observer.stage_started(&stage.name, stage.kind.kind());
    progress.set_message("submitted");
    match runner.run_stage(stage, &key, opts.cancel) {
        Ok(()) => {}
        Err(StageError::Interrupted) => return Ok(Done::Interrupted),
        Err(StageError::Failed(message)) => return Ok(Done::Failed { message, bad_input: false }),
        Err(StageError::BadInput(message)) => return Ok(Done::Failed { message, bad_input: true }),
    }
    let artifact = match store.get(&key)? {
        Some(artifact) => artifact,
        None => match from_remote(store.begin(&key)?)? {
            Ok(outcome) => outcome.artifact,
            Err(staging) => {
                store.abandon(staging)?;
                return Ok(Done::Failed {
                    message: "its job finished, but its artifact is neither in this store nor in the remote cache \
                              (the job's store must be this one, on a shared filesystem, or both must use one \
                              remote)"
                        .into(),
                    bad_input: false,
                });
            }
        },
    };
    let mut outcome = cached_outcome(stage, key, artifact, start.elapsed().as_secs_f64());
    outcome.action = Action::Run;
    Ok(Done::Finished(Box::new(outcome)))
}

/// Warnings about one stage's use of the remote, told to the observer with the stage's name.
fn stage_warning<'a>(opts: &'a RunOptions<'_>, stage: &'a ResolvedStage) -> impl Fn(&str) + 'a {
    move |message: &str| opts.observer.warning(&format!("stage `{}`: {message}", stage.name))
}

/// Download the key's artifact from the remote into `staging` and publish it, if the remote
/// has it whole; otherwise hand the staging area back for a local build.
fn pull(
    remote: &RemoteUse,
    stage: &ResolvedStage,
    key: ContentHash,
    staging: Staging,
    store: &Store,
    opts: &RunOptions<'_>,
    warn: &dyn Fn(&str),
) -> Result<Result<StageOutcome, Staging>, EngineError> {
    let Some(Some(manifest)) = remote.consult(remote.remote.manifest(&key), warn)? else {
        return Ok(Err(staging));
    };
    let start = Instant::now();
    let progress = opts.observer.stage_downloading(&stage.name);
    progress.set_length(manifest.total_bytes(), "bytes");
    let artifact = match remote.download_into(store, staging, manifest, &|n| progress.inc(n), opts.cancel, warn)? {
        Ok(artifact) => artifact,
        Err(staging) => return Ok(Err(staging)),
    };
    let mut outcome = cached_outcome(stage, key, artifact, start.elapsed().as_secs_f64());
    outcome.action = Action::Remote;
    Ok(Ok(outcome))
}

/// Remember what this run built: the keys (for `gc --keep-runs`) and each stage's preimage (for
/// the next plan's reasons). Stages that did not finish keep their previous preimage.
fn record_run(
    store: &Store,
    recipe: &Recipe,
    report: &RunReport,
    mut previous: BTreeMap<String, Preimage>,
    built: BTreeMap<String, Preimage>,
    (started, clock): (std::time::SystemTime, Instant),
) -> Result<(), EngineError> {
    let finished: std::collections::HashSet<&str> = report.outcomes.iter().map(|o| o.name.as_str()).collect();
    for (name, preimage) in built {
        if finished.contains(name.as_str()) {
            previous.insert(name, preimage);
        }
    }
    previous.retain(|name, _| recipe.stage_id(name).is_some());
    let record = RunRecord {
        label: recipe.name.clone(),
        keys: report.outcomes.iter().map(|o| o.key).collect(),
        detail: json!({ "recipe": recipe.path.display().to_string(), "stages": previous }),
        summary: Some(RunSummary {
            started: started.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            seconds: clock.elapsed().as_secs_f64(),
            recipe: recipe.path.display().to_string(),
            ran: report.outcomes.iter().filter(|o| o.action == Action::Run).count(),
            cached: report.outcomes.iter().filter(|o| o.action == Action::Cached).count(),
            remote: report.outcomes.iter().filter(|o| o.action == Action::Remote).count(),
            failed: usize::from(report.failure.is_some()),
            not_run: report.not_run.len() - usize::from(report.failure.is_some()),
            interrupted: report.interrupted,
        }),
    };
    store.record_run(&record)?;
    Ok(())
}
