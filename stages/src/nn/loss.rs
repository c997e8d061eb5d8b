//! Losses over the logits of a forward pass. Each writes the logits' gradient, which
//! [`crate::nn::model::Model::backward`] takes from there, and returns the loss summed over
//! tokens; how the sum becomes a mean (per micro-batch or per step) is the caller's choice,
//! passed in as the number of tokens the mean divides by.

use crate::nn::batch::Batch;
use crate::nn::kernels::cross_entropy::cross_entropy_forward_backward;
use crate::nn::model::Activations;

/// Cross-entropy of the batch's predicted targets (plus `z_loss` times the squared
/// log-partition), its gradient being that of the sum divided by `mean_over` tokens. Returns
/// the summed cross-entropy without the z-loss term.
pub fn cross_entropy(acts: &mut Activations, batch: &Batch, vocab_size: usize, z_loss: f32, mean_over: usize) -> f64 {
    let (logits, dlogits, row_loss) = acts.loss_buffers();
    let grad_scale = 1.0 / mean_over.max(1) as f32;
    cross_entropy_forward_backward(logits, &batch.targets, vocab_size, z_loss, grad_scale, dlogits, row_loss)
}
