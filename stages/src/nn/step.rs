//! One optimizer step of training, shared by `pretrain` and `tinygpt bench`: zero the
//! gradients, forward and backward over `accum` micro-batches, average, clip, update.

use crate::nn::kernels::adamw::AdamW;
use crate::nn::model::{Activations, Model};
use crate::nn::optim::{clip_global_norm, global_norm, scale, AdamWState};
use crate::nn::params::ParamMap;

#[derive(Clone, Copy, Debug)]
pub struct StepConfig {
    /// Micro-batches per step.
    pub accum: usize,
    /// AdamW with this step's learning rate.
    pub adamw: AdamW,
    /// Clip the global gradient norm to this; 0 does not clip.
    pub grad_clip: f64,
    pub z_loss: f32,
}

/// What a step saw: the mean loss over its micro-batches and the gradient norm before clipping.
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

/// One step. `next_batch` fills the ids and targets of each micro-batch. When the loss or the
/// gradient norm is not finite, the parameters and optimizer are left as they were.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &Model,
    params: &mut ParamMap,
    opt: &mut AdamWState,
    grads: &mut ParamMap,
    acts: &mut Activations,
    ids: &mut [u32],
    targets: &mut [u32],
    cfg: StepConfig,
    mut next_batch: impl FnMut(&mut [u32], &mut [u32]),
) -> StepOutcome {
    grads.fill_zero();
    let mut loss = 0.0f64;
    for _ in 0..cfg.accum {
        next_batch(ids, targets);
        loss += model.forward_backward(params, ids, targets, cfg.z_loss, acts, grads) as f64;
    }
    loss /= cfg.accum as f64;
    if cfg.accum > 1 {
        scale(grads, 1.0 / cfg.accum as f32);
    }
    let grad_norm = if cfg.grad_clip > 0.0 { clip_global_norm(grads, cfg.grad_clip) } else { global_norm(grads) };
    let outcome = StepOutcome { loss, grad_norm };
    if outcome.finite() {
        opt.update(cfg.adamw, params, grads);
    }
    outcome
}
