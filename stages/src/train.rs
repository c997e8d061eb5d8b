//! The training loop every training stage shares: steps with a learning-rate schedule,
//! metrics lines, periodic validation, checkpoints every `checkpoint_interval` steps and on
//! Ctrl-C, resume from the last checkpoint (ending bit-identical to an uninterrupted run), a
//! stop with a clear message when the loss diverges, and progress.
//!
//! A stage supplies what differs: the model and its starting parameters, which tensors train
//! and how ([`TensorOpt`]), and its data ([`TrainData`]: batches and a validation loss).

use std::time::Instant;

use engine::{Metrics, ParamSpec, Params, StageCtx, StageError};
use serde_json::json;

use crate::checkpoint::{DataPos, Progress, TrainState};
use crate::nn::batch::Batch;
use crate::nn::kernels::adamw::AdamW;
use crate::nn::kernels::Precision;
use crate::nn::model::Model;
use crate::nn::optim::{AdamWState, Schedule, TensorOpt};
use crate::nn::params::ParamMap;
use crate::nn::step::{train_step, LossMean, Objective, StepConfig, StepWork, Trainable};
use crate::round;

/// The log of a training stage's output: wall-clock figures and lines shaped by unhashed
/// intervals, so a volatile output (see `Stage::volatile_outputs`).
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Where a training stage's batches, its loss and its validation come from.
pub trait TrainData {
    /// The data position of a fresh run.
    fn start(&self) -> DataPos;
    /// Fill `batch` with the next rows and advance `pos`.
    fn fill(&mut self, pos: &mut DataPos, batch: &mut Batch);
    /// What the steps minimise over the batches [`TrainData::fill`] made.
    fn objective(&mut self) -> &mut dyn Objective;
    /// The validation loss of `params` on at most `max_batches` batches, and any other
    /// figures the stage reports at each evaluation.
    fn validate(&mut self, model: &Model, params: &ParamMap, max_batches: usize) -> Result<Validation, StageError>;
}

/// What an evaluation during training found.
#[derive(Clone, Debug, Default)]
pub struct Validation {
    pub loss: f64,
    /// Further figures by name, in `metrics.jsonl` and the stage's metrics.
    pub figures: Vec<(String, f64)>,
}

impl Validation {
    pub fn loss(loss: f64) -> Self {
        Validation { loss, figures: Vec::new() }
    }
}

/// The optimisation and logging settings of a run, read from the parameters every training
/// stage declares ([`TRAIN_PARAMS`]).
#[derive(Clone, Debug)]
pub struct TrainSpec {
    pub batch: usize,
    pub accum: usize,
    pub t: usize,
    pub max_steps: u64,
    pub schedule: Schedule,
    pub adamw: AdamW,
    pub grad_clip: f64,
    /// PaLM's z-loss weight, for the stages whose objective is cross-entropy.
    pub z_loss: f32,
    pub mean: LossMean,
    pub eval_interval: u64,
    pub eval_batches: usize,
    pub log_interval: u64,
    pub checkpoint_interval: u64,
    /// Keep only each block's input in forward and run the block again in backward.
    pub activation_checkpointing: bool,
    /// The arithmetic of the weight products, in training and its validation.
    pub precision: Precision,
    /// Shards each micro-batch splits into ([`StepWork`]).
    pub shards: usize,
}

/// The optimizer, schedule and logging parameters of every training stage; a stage's own
/// table is its parameters followed by these ([`crate::concat_params`]).
pub const TRAIN_PARAMS: [ParamSpec; 21] = [
        ParamSpec::int("max_steps", 2000, 1, 1 << 40, "optimizer steps"),
        ParamSpec::int("batch_size", 12, 1, 1 << 20, "sequences per micro-batch"),
        ParamSpec::int("grad_accum", 1, 1, 1 << 16, "micro-batches per optimizer step"),
        ParamSpec::float("lr", 1e-3, 0.0, 10.0, "peak learning rate"),
        ParamSpec::float("min_lr", 1e-4, 0.0, 10.0, "learning rate at the end of the decay"),
        ParamSpec::int("warmup_steps", 100, 0, 1 << 40, "linear warmup from lr / (warmup + 1)"),
        ParamSpec::choice(
            "schedule",
            "cosine",
            &["cosine", "wsd", "constant"],
            "after warmup: `cosine` to min_lr, `wsd` (warmup-stable-decay, linear decay at the end), or `constant`",
        ),
        ParamSpec::opt_int(
            "decay_steps",
            1,
            1 << 40,
            "cosine: the step where the decay ends (default max_steps); wsd: length of the final decay (default max_steps / 5)",
        ),
        ParamSpec::float("beta1", 0.9, 0.0, 0.999_999, "AdamW first-moment decay"),
        ParamSpec::float("beta2", 0.99, 0.0, 0.999_999, "AdamW second-moment decay"),
        ParamSpec::float("eps", 1e-8, 0.0, 1.0, "AdamW epsilon"),
        ParamSpec::float("weight_decay", 0.1, 0.0, 10.0, "decoupled weight decay, on matrices only"),
        ParamSpec::float("grad_clip", 1.0, 0.0, 1e9, "clip the global gradient norm to this (0: no clipping)"),
        ParamSpec::float("z_loss", 0.0, 0.0, 1.0, "weight of the squared log-partition (PaLM's z-loss)"),
        ParamSpec::int(
            "eval_interval",
            250,
            0,
            1 << 40,
            "validation loss every this many steps, and at the end (0: only at the end)",
        )
        .not_hashed(),
        ParamSpec::int("eval_batches", 20, 1, 1 << 30, "validation batches per evaluation (the first ones, in order)")
            .not_hashed(),
        ParamSpec::int("log_interval", 10, 1, 1 << 40, "a metrics line every this many steps").not_hashed(),
        ParamSpec::int("checkpoint_interval", 250, 1, 1 << 40, "save the training state every this many steps")
            .not_hashed(),
        ParamSpec::bool(
            "activation_checkpointing",
            false,
            "keep only each block's input and recompute the block in backward: far less memory for a third more arithmetic, the same bits",
        )
        .not_hashed(),
        ParamSpec::choice(
            "precision",
            "f32",
            &["f32", "bf16"],
            "the operands of the weight and attention products: `bf16` rounds them to bfloat16 and accumulates in f32 as AMX does (fast on CPUs with AMX, emulated bit for bit elsewhere); weights, gradients, softmax and AdamW stay f32",
        )
        .keyed_when_set(),
        ParamSpec::int(
            "shards",
            1,
            1,
            1 << 10,
            "split each micro-batch into this many shards of whole rows, run side by side, each with its own activations and gradients, added in shard order: faster for small models on several cores, for the memory of one more gradient per extra shard; the bits depend on it, never on the thread count; must divide batch_size",
        )
        .keyed_when_set(),
    ];

/// The learning-rate schedule the parameters ask for.
pub fn schedule(p: &Params) -> Schedule {
    let (lr, min_lr, warmup, steps) =
        (p.float("lr"), p.float("min_lr"), p.int("warmup_steps") as u64, p.int("max_steps") as u64);
    let decay = p.opt_usize("decay_steps").map(|d| d as u64);
    match p.str("schedule") {
        "wsd" => {
            let len = decay.unwrap_or(steps / 5).min(steps);
            Schedule::Wsd { lr, min_lr, warmup, decay_start: (steps - len).max(warmup), decay_end: steps }
        }
        "constant" => Schedule::Constant { lr, warmup },
        _ => Schedule::Cosine { lr, min_lr, warmup, decay_end: decay.unwrap_or(steps).max(warmup + 1) },
    }
}

/// The errors `check` gives for the parameters of [`TRAIN_PARAMS`]: `min_lr` above `lr`, and
/// `shards` that do not divide `batch_size`.
pub fn check_train_params(p: &Params) -> Result<(), engine::ParamProblem> {
    if p.float("min_lr") > p.float("lr") {
        return Err(engine::ParamProblem::new(
            "min_lr",
            format!("min_lr {} is above lr {}", p.float("min_lr"), p.float("lr")),
        ));
    }
    let (shards, batch) = (p.usize("shards"), p.usize("batch_size"));
    if !batch.is_multiple_of(shards) {
        return Err(engine::ParamProblem::new(
            "shards",
            format!("{shards} shards do not split batch_size {batch} into equal shards of whole rows"),
        ));
    }
    Ok(())
}

impl TrainSpec {
    /// The settings of [`TRAIN_PARAMS`], for sequences of `t` tokens.
    pub fn from_params(p: &Params, t: usize, mean: LossMean) -> Self {
        TrainSpec {
            batch: p.usize("batch_size"),
            accum: p.usize("grad_accum"),
            t,
            max_steps: p.int("max_steps") as u64,
            schedule: schedule(p),
            adamw: AdamW {
                lr: 0.0,
                beta1: p.float("beta1") as f32,
                beta2: p.float("beta2") as f32,
                eps: p.float("eps") as f32,
                weight_decay: p.float("weight_decay") as f32,
            },
            grad_clip: p.float("grad_clip"),
            z_loss: p.float("z_loss") as f32,
            mean,
            eval_interval: p.int("eval_interval") as u64,
            eval_batches: p.usize("eval_batches"),
            log_interval: p.int("log_interval") as u64,
            checkpoint_interval: p.int("checkpoint_interval") as u64,
            activation_checkpointing: p.bool("activation_checkpointing"),
            shards: p.usize("shards"),
            precision: Precision::parse(p.str("precision")).expect("a declared choice"),
        }
    }
}

/// The trained state and what the run saw.
pub struct Outcome {
    pub state: TrainState,
    pub last_loss: f64,
    /// The last evaluation.
    pub val: Validation,
    pub tokens_per_s: f64,
    /// The step of the checkpoint in the work directory this run resumed from.
    pub resumed_from: Option<u64>,
    /// The steps taken from a shorter run of the same family ([`StageCtx::family_dir`]).
    pub reused_steps: Option<u64>,
}

/// What trains: the model, the parameters a fresh run starts from, which of them train (a
/// gradient map with empty tensors for the frozen ones) and each tensor's optimizer settings.
pub struct Trainee {
    pub model: Model,
    pub fresh: ParamMap,
    pub grads: ParamMap,
    pub opts: Vec<TensorOpt>,
}

/// Train `trainee` on `data` as `spec` says, resuming from the checkpoint in the stage's work
/// directory if there is one.
pub fn train(
    ctx: &StageCtx<'_>,
    spec: &TrainSpec,
    trainee: Trainee,
    data: &mut dyn TrainData,
) -> Result<Outcome, StageError> {
    let Trainee { model, fresh, mut grads, opts } = trainee;
    let model = model.with_precision(spec.precision);
    let resumed = TrainState::load(ctx.work_dir(), &fresh, &grads)?;
    let resumed_from = resumed.as_ref().map(|s| s.progress.step);
    // Under warmup-stable-decay: the family directory, and the step whose state it shares.
    let sharing = ctx.family_dir().zip(spec.schedule.stable_until());
    let shared = match (&resumed, sharing) {
        (None, Some((family, stable))) => family_checkpoint(family, stable, &fresh, &grads)?,
        _ => None,
    };
    let reused_steps = shared.as_ref().map(|s| s.progress.step);
    let mut state = resumed.or(shared).unwrap_or_else(|| TrainState {
        opt: AdamWState::new(&grads),
        progress: Progress { step: 0, data: data.start(), elapsed: 0.0, log: Vec::new() },
        params: fresh,
    });
    let mut work = StepWork::new(&model, spec.batch, spec.t, spec.shards, spec.activation_checkpointing, &grads);
    let mut batches: Vec<Batch> = (0..spec.accum).map(|_| Batch::new(spec.batch, spec.t)).collect();

    let progress = ctx.progress();
    let emulated = match spec.precision == Precision::Bf16 && !crate::nn::kernels::bf16::amx() {
        true => " (bf16 emulated without AMX: several times slower than f32 here; `tinygpt bench` measures both)",
        false => "",
    };
    progress.set_length(spec.max_steps, "steps");
    progress.set_position(state.progress.step);
    let started = Instant::now();
    let elapsed_before = state.progress.elapsed;
    let mut last_loss = f64::NAN;
    let mut val = Validation::loss(f64::NAN);
    let mut window = (Instant::now(), 0u64);
    let tokens_per_step = (spec.batch * spec.t * spec.accum) as u64;

    while state.progress.step < spec.max_steps {
        if ctx.check_cancelled().is_err() {
            state.progress.elapsed = elapsed_before + started.elapsed().as_secs_f64();
            state.save(ctx.work_dir())?;
            return Err(StageError::Interrupted);
        }
        let step = state.progress.step;
        let lr = spec.schedule.lr(step);
        let cfg =
            StepConfig { adamw: AdamW { lr: lr as f32, ..spec.adamw }, grad_clip: spec.grad_clip, mean: spec.mean };
        for batch in &mut batches {
            data.fill(&mut state.progress.data, batch);
        }
        let trainable = Trainable { params: &mut state.params, grads: &mut grads, opt: &mut state.opt, opts: &opts };
        let outcome = train_step(&model, trainable, &mut work, &batches, cfg, data.objective());
        let (loss, norm) = (outcome.loss, outcome.grad_norm);
        if !outcome.finite() {
            return Err(StageError::msg(format!(
                "training diverged at step {}: loss {loss}, gradient norm {norm} (lr {lr:.3e}); \
                 lower `lr`, raise `warmup_steps` or set `grad_clip`",
                step + 1
            )));
        }
        state.progress.step += 1;
        let step = state.progress.step;
        last_loss = loss;
        window.1 += tokens_per_step;

        if step.is_multiple_of(spec.log_interval) || step == spec.max_steps {
            let secs = window.0.elapsed().as_secs_f64();
            state.progress.log.push(json!({
                "step": step,
                "loss": round(loss, 5),
                "lr": lr,
                "grad_norm": round(norm, 5),
                "tokens_per_s": round(window.1 as f64 / secs.max(1e-9), 0),
                "elapsed_s": round(elapsed_before + started.elapsed().as_secs_f64(), 3),
            }));
            window = (Instant::now(), 0);
        }
        let eval_now = step == spec.max_steps || (spec.eval_interval > 0 && step.is_multiple_of(spec.eval_interval));
        if eval_now {
            val = data.validate(&model, &state.params, spec.eval_batches)?;
            let mut line = json!({ "step": step, "val_loss": round(val.loss, 5) });
            for (name, value) in &val.figures {
                line[name] = json!(round(*value, 5));
            }
            state.progress.log.push(line);
        }
        progress.set_position(step);
        let val_note = if val.loss.is_nan() { String::new() } else { format!(" val {:.4}", val.loss) };
        progress.set_message(&format!("loss {loss:.4}{val_note}{emulated}"));
        if step.is_multiple_of(spec.checkpoint_interval) && step < spec.max_steps {
            state.progress.elapsed = elapsed_before + started.elapsed().as_secs_f64();
            state.save(ctx.work_dir())?;
        }
        if let Some((family, _)) = sharing.filter(|(_, stable)| *stable == step) {
            state.progress.elapsed = elapsed_before + started.elapsed().as_secs_f64();
            share_checkpoint(family, &state)?;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let trained = state.progress.step - resumed_from.or(reused_steps).unwrap_or(0);
    Ok(Outcome {
        last_loss,
        val,
        tokens_per_s: (trained * tokens_per_step) as f64 / seconds.max(1e-9),
        resumed_from,
        reused_steps,
        state,
    })
}

/// The name of a shared checkpoint taken after `step` steps.
fn shared_name(step: u64) -> String {
    format!("step-{step:012}")
}

/// The latest checkpoint in a family directory taken at or before `stable` (this run's last
/// step at the peak learning rate), where its state equals this run's at the same step.
fn family_checkpoint(
    family: &std::path::Path,
    stable: u64,
    fresh: &ParamMap,
    grads: &ParamMap,
) -> Result<Option<TrainState>, StageError> {
    let Ok(entries) = std::fs::read_dir(family) else { return Ok(None) };
    let best = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("step-")?.parse::<u64>().ok())
        .filter(|step| (1..=stable).contains(step))
        .max();
    match best {
        Some(step) => TrainState::load(&family.join(shared_name(step)), fresh, grads),
        None => Ok(None),
    }
}

/// Leave the state at the end of the stable phase where a longer run of the same family finds
/// it: written into a temporary directory and renamed, so a reader sees all of it or nothing.
fn share_checkpoint(family: &std::path::Path, state: &TrainState) -> Result<(), StageError> {
    let target = family.join(shared_name(state.progress.step));
    if target.exists() {
        return Ok(());
    }
    let tmp = family.join(format!(".tmp-{}-{}", std::process::id(), state.progress.step));
    std::fs::create_dir_all(&tmp).map_err(|e| crate::fail(format!("creating `{}`", tmp.display()))(&e))?;
    state.save(&tmp)?;
    match std::fs::rename(&tmp, &target) {
        Ok(()) => Ok(()),
        // Another run of the family got there first, with the same bytes.
        Err(_) if target.exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => Err(crate::fail(format!("renaming `{}`", target.display()))(&e)),
    }
}

impl Outcome {
    /// Write [`METRICS_FILE`]: one line per logged step and per evaluation.
    pub fn write_log(&self, ctx: &StageCtx<'_>) -> Result<(), StageError> {
        let mut lines = Vec::new();
        for line in &self.state.progress.log {
            use std::io::Write;
            writeln!(lines, "{line}").expect("writing to memory");
        }
        std::fs::write(ctx.out(METRICS_FILE), lines).map_err(|e| crate::fail("writing metrics.jsonl")(&e))
    }

    /// The metrics every training stage reports: steps, the last training and validation
    /// losses, tokens per second, and the step a resumed run started from.
    pub fn metrics(&self) -> Metrics {
        let mut metrics = Metrics::from([
            ("steps".into(), json!(self.state.progress.step)),
            ("train_loss".into(), json!(round(self.last_loss, 4))),
            ("val_loss".into(), json!(round(self.val.loss, 4))),
            ("tokens_per_s".into(), json!(round(self.tokens_per_s, 0))),
        ]);
        for (name, value) in &self.val.figures {
            metrics.insert(name.clone(), json!(round(*value, 4)));
        }
        if let Some(step) = self.reused_steps {
            metrics.insert("reused_steps".into(), json!(step));
        }
        if let Some(step) = self.resumed_from {
            metrics.insert("resumed_from_step".into(), json!(step));
        }
        metrics
    }
}
