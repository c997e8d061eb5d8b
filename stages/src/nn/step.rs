//! One optimizer step of training, shared by every training stage and `tinygpt bench`: zero
//! the gradients, forward, loss and backward over `accum` micro-batches, clip, update.

use crate::nn::batch::Batch;
use crate::nn::kernels::adamw::AdamW;
use crate::nn::loss::cross_entropy;
use crate::nn::model::{Activations, Model};
use crate::nn::optim::{clip_global_norm, global_norm, scale, AdamWState, TensorOpt};
use crate::nn::params::ParamMap;

/// How the token losses of a step's micro-batches become the loss it minimises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossMean {
    /// Each micro-batch's mean over its own predicted tokens, then the mean over micro-batches
    /// (nanoGPT's accumulation; every micro-batch weighs the same, whatever it predicts).
    PerMicroBatch,
    /// The mean over every predicted token of the step: a token weighs the same whichever
    /// micro-batch holds it (fine-tuning, where prompts and padding predict nothing).
    PerToken,
}

#[derive(Clone, Copy, Debug)]
pub struct StepConfig {
    /// AdamW with this step's learning rate.
    pub adamw: AdamW,
    /// Clip the global gradient norm to this; 0 does not clip.
    pub grad_clip: f64,
    pub z_loss: f32,
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

/// One step over the micro-batches `batches` (one per accumulation step), which `next_batch`
/// fills in order first. When the loss or the gradient norm is not finite, the parameters and
/// optimizer are left as they were.
pub fn train_step(
    model: &Model,
    t: Trainable<'_>,
    acts: &mut Activations,
    batches: &mut [Batch],
    cfg: StepConfig,
    mut next_batch: impl FnMut(&mut Batch),
) -> StepOutcome {
    t.grads.fill_zero();
    batches.iter_mut().for_each(&mut next_batch);
    let accum = batches.len();
    let step_tokens: usize = batches.iter().map(Batch::predicted).sum();
    let mut loss = 0.0f64;
    for batch in batches.iter() {
        model.forward(t.params, batch, acts);
        let tokens = batch.predicted();
        let mean_over = match cfg.mean {
            LossMean::PerMicroBatch => tokens,
            LossMean::PerToken => step_tokens,
        };
        let sum = cross_entropy(acts, batch, model.cfg.vocab_size, cfg.z_loss, mean_over);
        loss += match cfg.mean {
            LossMean::PerMicroBatch => (sum / tokens.max(1) as f64) as f32 as f64,
            LossMean::PerToken => sum,
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
        LossMean::PerToken => loss /= step_tokens.max(1) as f64,
    }
    let grad_norm = if cfg.grad_clip > 0.0 { clip_global_norm(t.grads, cfg.grad_clip) } else { global_norm(t.grads) };
    let outcome = StepOutcome { loss, grad_norm };
    if outcome.finite() {
        t.opt.update(cfg.adamw, t.params, t.grads, t.opts);
    }
    outcome
}
