//! `distill`: train a student on a teacher's cached top-k log-probabilities (a `teacher`
//! stage) and the same packed data: alpha T^2 D(teacher_T || student_T) over the teacher's top
//! k plus one tail bucket, plus (1 - alpha) cross-entropy on the data, with D the forward KL,
//! the reverse KL or GKD's generalised Jensen-Shannon divergence.
//!
//! The student is either shaped like a `pretrain` model (its parameters) or starts from a
//! model stage wired to `init`. Everything else is `pretrain`'s: schedules, checkpoints and
//! bit-exact resume, metrics, progress; the validation loss is cross-entropy on the data, so
//! students distilled or trained from scratch compare directly. Output: a model in the usual
//! layout.

use std::collections::{BTreeMap, BTreeSet};

use engine::{Accepts, Input, InputSpec, Metrics, ParamProblem, ParamSpec, Params, Stage, StageCtx, StageError};
use serde_json::json;

use crate::arrow_io::{read_blocks, TokenMeta};
use crate::batches::{Sampler, SamplerKind};
use crate::model_io::{load_model_with_eot, require_same_tokenizer, save_model, TOKENIZER};
use crate::nn::batch::Batch;
use crate::nn::kernels::distill::{distill_forward_backward, Distill as DistillLoss, Divergence, TopK};
use crate::nn::model::{Activations, Model};
use crate::nn::optim::TensorOpt;
use crate::nn::params::ParamMap;
use crate::nn::step::{LossMean, Objective, RowLoss};
use crate::pack::{TRAIN_FILE, VAL_FILE};
use crate::pretrain::{model_config, BlockData, MODEL_PARAMS};
use crate::teacher::{TeacherLogits, TRAIN_LOGITS};
use crate::train::{self, check_train_params, TrainSpec, Trainee, METRICS_FILE, TRAIN_PARAMS};
use crate::{concat_params, fail, MODEL, TEACHER};

pub struct Distill;

const KD_PARAMS: [ParamSpec; 4] = [
    ParamSpec::float("temperature", 1.0, 0.05, 100.0, "softens both distributions; the divergence is scaled by T^2"),
    ParamSpec::float("alpha", 0.5, 0.0, 1.0, "weight of the divergence; 1 - alpha weighs cross-entropy on the data"),
    ParamSpec::choice(
        "divergence",
        "forward",
        &["forward", "reverse", "jsd"],
        "`forward` KL(teacher || student), `reverse` KL(student || teacher), or `jsd` (GKD's generalised Jensen-Shannon)",
    ),
    ParamSpec::float("jsd_beta", 0.5, 0.0, 1.0, "jsd: the teacher's weight in the mixture, strictly between 0 and 1"),
];

const OWN_PARAMS: [ParamSpec; 15] = concat_params::<4, 11, 15>(KD_PARAMS, MODEL_PARAMS);
const PARAMS: &[ParamSpec] = &concat_params::<15, 21, 36>(OWN_PARAMS, TRAIN_PARAMS);

const INPUTS: &[InputSpec] = &[
    InputSpec {
        name: "teacher",
        accepts: Accepts::Artifact(&[TEACHER]),
        required: true,
        doc: "a `teacher` stage: the teacher's top-k log-probabilities and the packed data",
    },
    InputSpec {
        name: "init",
        accepts: Accepts::Artifact(&[MODEL]),
        required: false,
        doc: "a model to start the student from (default: a fresh model shaped by the parameters)",
    },
];

impl Stage for Distill {
    fn kind(&self) -> &'static str {
        "distill"
    }
    fn version(&self) -> u32 {
        2 // 2: attention's products in bf16 when precision = "bf16"
    }
    fn about(&self) -> &'static str {
        "train a student on a teacher's cached top-k log-probabilities and the data (KD, reverse KL or GKD's JSD)"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn inputs(&self) -> &'static [InputSpec] {
        INPUTS
    }
    fn output(&self) -> engine::ArtifactType {
        MODEL
    }
    fn vocabulary(&self) -> engine::Vocabulary {
        engine::Vocabulary::From("teacher")
    }
    fn same_vocabulary(&self) -> &'static [&'static str] {
        &["teacher", "init"]
    }
    fn uses_seed(&self) -> bool {
        true
    }
    fn volatile_outputs(&self) -> &'static [&'static str] {
        &[METRICS_FILE]
    }
    /// With `schedule = "wsd"`, a longer run continues from a shorter one's state at the end
    /// of its stable phase.
    fn run_length_params(&self) -> &'static [&'static str] {
        &["max_steps"]
    }

    fn check(&self, p: &Params, _connected: &BTreeSet<&str>) -> Result<(), ParamProblem> {
        let beta = p.float("jsd_beta");
        if p.str("divergence") == "jsd" && !(beta > 0.0 && beta < 1.0) {
            return Err(ParamProblem::new(
                "jsd_beta",
                format!("jsd_beta {beta} must be strictly between 0 and 1 (0 is divergence = \"forward\", 1 is \"reverse\")"),
            ));
        }
        let cfg = model_config(p, 2, p.opt_usize("block_size").unwrap_or(1));
        if let Some((key, problem)) = cfg.problem() {
            return Err(ParamProblem::new(key, problem));
        }
        check_train_params(p)
    }

    /// A student whose block size (the `init` model's, else `block_size`) is shorter than the
    /// teacher's data's `seq_len` is refused before anything runs.
    fn check_shapes(&self, p: &Params, upstream: &BTreeMap<&str, &serde_json::Value>) -> Result<(), ParamProblem> {
        let (key, block_size) = match upstream.contains_key("init") {
            true => ("init", crate::told(upstream, "init", "block_size")),
            false => ("block_size", p.opt_usize("block_size")),
        };
        match (block_size, crate::told(upstream, "teacher", "seq_len")) {
            (Some(block_size), Some(t)) if block_size < t => {
                Err(ParamProblem::new(key, student_too_short(block_size, t)))
            }
            _ => Ok(()),
        }
    }
    /// The student: the `init` model's shape when one is wired (as far as it tells), else the
    /// one the parameters describe (its block size: `block_size`, else the data's `seq_len`).
    fn output_shape(&self, p: &Params, upstream: &BTreeMap<&str, &serde_json::Value>) -> serde_json::Value {
        if upstream.contains_key("init") {
            crate::quantize::shape_of_input(upstream, "init")
        } else {
            crate::pretrain::planned_shape(p, crate::told(upstream, "teacher", "seq_len"))
        }
    }
    fn run(&self, ctx: &StageCtx<'_>) -> Result<Metrics, StageError> {
        let Input::Artifact { artifact: teacher, stage: teacher_stage, .. } = ctx.required_input("teacher") else {
            unreachable!("`teacher` accepts only artifacts");
        };
        let p = ctx.params();
        let meta = TokenMeta::read(&teacher.dir)?;
        let t = meta.seq_len.ok_or_else(|| StageError::msg("the teacher's meta.json has no seq_len"))?;
        let (cfg, fresh) = match ctx.input("init") {
            Some(Input::Artifact { artifact: init, stage: init_stage, .. }) => {
                require_same_tokenizer((init, init_stage), (teacher, teacher_stage))?;
                let (cfg, params, _) = load_model_with_eot(&init.dir)?;
                (cfg, params)
            }
            _ => {
                let cfg = model_config(p, meta.vocab_size as usize, t);
                (cfg, cfg.init(ctx.seed()))
            }
        };
        if cfg.block_size < t {
            return Err(StageError::msg(student_too_short(cfg.block_size, t)));
        }
        let logits = TeacherLogits::read(&teacher.path(TRAIN_LOGITS))?;
        let train = read_blocks(&teacher.path(TRAIN_FILE))?;
        let val = read_blocks(&teacher.path(VAL_FILE))?;
        if logits.positions() != train.rows() * t {
            return Err(StageError::msg(format!(
                "the teacher of stage `{teacher_stage}` holds {} positions for {} blocks of {t}",
                logits.positions(),
                train.rows()
            )));
        }
        let loss = DistillLoss {
            temperature: p.float("temperature"),
            alpha: p.float("alpha"),
            divergence: match p.str("divergence") {
                "reverse" => Divergence::Reverse,
                "jsd" => Divergence::Jsd(p.float("jsd_beta")),
                _ => Divergence::Forward,
            },
        };
        let spec = TrainSpec::from_params(p, t, LossMean::PerMicroBatch);
        let k = logits.k;
        let objective = TopKObjective {
            loss,
            teacher: logits,
            ids: vec![0; spec.batch * t * k],
            logprobs: vec![0.0; spec.batch * t * k],
        };
        let val_batch = spec.batch.min(val.rows()).max(1);
        let mut data =
            BlockData { sampler: Sampler::new(SamplerKind::Blocks, train, ctx.seed()), val, val_batch, objective };
        let trainee = Trainee {
            model: Model::new(cfg, &fresh),
            grads: fresh.zeros_like(),
            opts: TensorOpt::defaults(&fresh),
            fresh,
        };
        let outcome = train::train(ctx, &spec, trainee, &mut data)?;

        save_model(ctx.out_dir(), &cfg, &outcome.state.params, meta.eot_id)?;
        std::fs::copy(teacher.path(TOKENIZER), ctx.out(TOKENIZER)).map_err(|e| fail("copying tokenizer.json")(&e))?;
        meta.write(ctx.out_dir())?;
        outcome.write_log(ctx)?;
        let mut metrics = outcome.metrics();
        metrics.insert("parameters".into(), json!(outcome.state.params.num_elements()));
        metrics.insert("tokens".into(), json!(outcome.state.progress.step * (spec.batch * spec.accum * t) as u64));
        Ok(metrics)
    }
}

/// The distillation loss of a batch of blocks, with each block's teacher log-probabilities.
struct TopKObjective {
    loss: DistillLoss,
    teacher: TeacherLogits,
    /// The batch's teacher ids and log-probabilities, gathered by block (B * T * k).
    ids: Vec<u32>,
    logprobs: Vec<f32>,
}

impl TopKObjective {
    /// Gather the teacher's top k of every row of `batch` into `ids` and `logprobs`.
    fn gather(&mut self, batch: &Batch) {
        let per_row = batch.time() * self.teacher.k;
        for (r, &block) in batch.source.iter().enumerate() {
            let span = r * per_row..(r + 1) * per_row;
            self.teacher.block(block, &mut self.ids[span.clone()], &mut self.logprobs[span]);
        }
    }
}

impl Objective for TopKObjective {
    fn loss(&mut self, model: &Model, _: &ParamMap, acts: &mut Activations, batch: &Batch, mean_over: usize) -> f64 {
        self.gather(batch);
        self.shard_loss(model, acts, batch, mean_over)
    }
    fn rows(&mut self, _: &Model, _: &ParamMap, batch: &Batch) -> Option<&dyn RowLoss> {
        self.gather(batch);
        Some(self)
    }
}

impl RowLoss for TopKObjective {
    fn shard_loss(&self, model: &Model, acts: &mut Activations, shard: &Batch, mean_over: usize) -> f64 {
        let k = self.teacher.k;
        let span = shard.first_token * k..(shard.first_token + shard.rows()) * k;
        let top = TopK { k, ids: &self.ids[span.clone()], logprobs: &self.logprobs[span] };
        let (logits, dlogits, row_loss) = acts.loss_buffers();
        let v = model.cfg.vocab_size;
        distill_forward_backward(
            logits,
            &shard.targets,
            v,
            top,
            self.loss,
            1.0 / mean_over.max(1) as f32,
            dlogits,
            row_loss,
        )
    }
}

/// A student's block size shorter than the data's `seq_len`.
fn student_too_short(block_size: usize, seq_len: usize) -> String {
    format!("the student's block size {block_size} is shorter than the data's seq_len {seq_len}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{assert_maps_close, random};
    use crate::nn::model::ModelConfig;
    use crate::nn::step::step_at_lr_zero;
    use half::f16;

    /// A step of the top-k loss in 2 and 4 shards gives the loss and gradients of one pass up to
    /// rounding: each shard reads its own rows of the teacher's, which one pass gathered by
    /// the rows' source blocks.
    #[test]
    fn a_distillation_step_in_shards_reads_each_rows_teacher() {
        let (v, t, k, blocks) = (11, 8, 3, 6);
        let cfg = ModelConfig::gpt2(v, t, 2, 2, 8, true);
        let mut params = cfg.init(1);
        for (i, (_, w)) in params.iter_mut().enumerate() {
            let values = random(w.data().len(), 50 + i as u64);
            w.data_mut().iter_mut().zip(values).for_each(|(w, r)| *w = r * 0.5);
        }
        let model = Model::new(cfg, &params);
        // Each position's top 3: distinct ids, log-probabilities falling from about -0.5.
        let positions = blocks * t;
        let ids: Vec<u32> = (0..positions * k).map(|i| ((i / k * 5 + i % k) % v) as u32).collect();
        let draws = random(positions * k, 9);
        let logprobs = draws.iter().enumerate().map(|(i, r)| f16::from_f32(-0.5 - (i % k) as f32 - 0.2 * r.abs()));
        let teacher = TeacherLogits { k, t, ids, logprobs: logprobs.collect(), lse: vec![0.0; positions] };
        let token = |r: &f32| ((r + 1.0) * 5.49) as u32;
        let ids: Vec<u32> = random(4 * t, 3).iter().map(token).collect();
        let targets: Vec<u32> = random(4 * t, 4).iter().map(token).collect();
        let mut batch = Batch::whole_rows(t, &ids, &targets);
        batch.source.copy_from_slice(&[5, 2, 0, 3]);
        let loss = DistillLoss { temperature: 2.0, alpha: 0.7, divergence: Divergence::Forward };
        let step = |shards: usize| {
            let mut objective = TopKObjective {
                loss,
                teacher: teacher.clone(),
                ids: vec![0; 4 * t * k],
                logprobs: vec![0.0; 4 * t * k],
            };
            let batches = std::slice::from_ref(&batch);
            step_at_lr_zero(&model, &params, &params, batches, LossMean::PerMicroBatch, shards, &mut objective)
        };
        let (loss, whole) = step(1);
        for shards in [2, 4] {
            let (sharded_loss, sharded) = step(shards);
            assert!((loss - sharded_loss).abs() <= 1e-6 * loss.abs(), "{shards} shards: {loss} vs {sharded_loss}");
            assert_maps_close(&format!("{shards} shards"), &whole, &sharded, 1e-5);
        }
    }
}
