//! One optimizer step of training, shared by every training stage and `tinygpt bench`: zero
//! the gradients, forward, loss and backward over `accum` micro-batches, clip, update.
//!
//! What the step minimises is an [`Objective`]: cross-entropy on the data for pretraining and
//! fine-tuning, a distillation or preference loss for the stages that build on them.

use crate::nn::batch::Batch;
use crate::nn::kernels::adamw::AdamW;
use crate::nn::loss::cross_entropy;
use crate::nn::model::{Activations, Model};
use crate::nn::optim::{clip_global_norm, global_norm, scale, AdamWState, TensorOpt};
use crate::nn::params::ParamMap;

/// How the losses of a step's micro-batches become the loss it minimises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossMean {
    /// Each micro-batch's mean over its own units, then the mean over micro-batches (nanoGPT's
    /// accumulation; every micro-batch weighs the same, whatever it predicts).
    PerMicroBatch,
    /// The mean over every unit of the step: a unit weighs the same whichever micro-batch holds
    /// it (fine-tuning, where prompts and padding predict nothing).
    PerStep,
}

/// What a training step minimises, given a micro-batch that [`Model::forward`] has just run.
pub trait Objective {
    /// The units the loss of `batch` averages over: its predicted tokens for a token loss, its
    /// pairs or examples for a sequence loss.
    fn units(&self, batch: &Batch) -> usize {
        batch.predicted()
    }
    /// Write the gradient of (the loss summed over the batch's units) / `mean_over` into the
    /// logits' gradient ([`Activations::loss_buffers`]) and return the summed loss. It may run
    /// forward passes of its own with other activations, never with `acts`.
    fn loss(
        &mut self,
        model: &Model,
        params: &ParamMap,
        acts: &mut Activations,
        batch: &Batch,
        mean_over: usize,
    ) -> f64;
}

/// Cross-entropy of the batch's targets, with PaLM's z-loss.
#[derive(Clone, Copy, Debug, Default)]
pub struct CrossEntropy {
    pub z_loss: f32,
}

impl Objective for CrossEntropy {
    fn loss(&mut self, model: &Model, _: &ParamMap, acts: &mut Activations, batch: &Batch, mean_over: usize) -> f64 {
        cross_entropy(acts, batch, model.cfg.vocab_size, self.z_loss, mean_over)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct StepConfig {
    /// AdamW with this step's learning rate.
    pub adamw: AdamW,
    /// Clip the global gradient norm to this; 0 does not clip.
    pub grad_clip: f64,
    pub mean: LossMean,
}

/// What a step saw: the mean loss and the gradient norm before clipping.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutcome {
    pub loss: f64,
    pub grad_norm: f64,
}

impl StepOutcome {
    pub fn finite(&self) -> bool {
        self.loss.is_finite() && self.grad_norm.is_finite()
    }
}

/// What a step updates: the parameters, their gradients (empty tensors for frozen ones), the
/// optimizer, and each tensor's optimizer settings.
pub struct Trainable<'a> {
    pub params: &'a mut ParamMap,
    pub grads: &'a mut ParamMap,
    pub opt: &'a mut AdamWState,
    pub opts: &'a [TensorOpt],
}

/// One step over the filled micro-batches `batches` (one per accumulation step). When the
/// loss or the gradient norm is not finite, the parameters and optimizer are left as they were.
pub fn train_step(
    model: &Model,
    t: Trainable<'_>,
    acts: &mut Activations,
    batches: &[Batch],
    cfg: StepConfig,
    objective: &mut dyn Objective,
) -> StepOutcome {
    t.grads.fill_zero();
    let accum = batches.len();
    let step_units: usize = batches.iter().map(|b| objective.units(b)).sum();
    let mut loss = 0.0f64;
    for batch in batches {
        model.forward(t.params, batch, acts);
        let units = objective.units(batch);
        let mean_over = match cfg.mean {
            LossMean::PerMicroBatch => units,
            LossMean::PerStep => step_units,
        };
        let sum = objective.loss(model, t.params, acts, batch, mean_over);
        loss += match cfg.mean {
            LossMean::PerMicroBatch => (sum / units.max(1) as f64) as f32 as f64,
            LossMean::PerStep => sum,
        };
        model.backward(t.params, batch, acts, t.grads);
    }
    match cfg.mean {
        LossMean::PerMicroBatch => {
            loss /= accum as f64;
            if accum > 1 {
                scale(t.grads, 1.0 / accum as f32);
            }
        }
        LossMean::PerStep => loss /= step_units.max(1) as f64,
    }
    let grad_norm = if cfg.grad_clip > 0.0 { clip_global_norm(t.grads, cfg.grad_clip) } else { global_norm(t.grads) };
    let outcome = StepOutcome { loss, grad_norm };
    if outcome.finite() {
        t.opt.update(cfg.adamw, t.params, t.grads, t.opts);
    }
    outcome
}
