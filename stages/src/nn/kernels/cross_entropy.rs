//! Fused softmax + cross-entropy over (rows, V) logits, with optional z-loss. Every loss ends
//! in a gradient on the logits; the model's backward does the rest.

use rayon::prelude::*;

/// A target that is not predicted: its row adds nothing to the loss and gets a zero gradient
/// (padding; later, the prompt of a fine-tuning example).
pub const IGNORE: u32 = u32::MAX;

/// `-log softmax(logits)[target] + z_loss * logsumexp^2` for the rows whose target is not
/// [`IGNORE`], and its gradient with respect to the logits times `grad_scale` written into
/// `dlogits` (zero on ignored rows). A mean over N tokens passes `grad_scale = 1 / N`.
///
/// Returns the summed cross-entropy alone (without the z-loss term), the number to report.
/// Each row's loss goes to `row_loss` (one per target, the caller's buffer) and the sum adds
/// them in row order in f64, so it does not depend on the thread count.
///
/// # Panics
/// If a target is neither below `v` nor [`IGNORE`].
pub fn cross_entropy_forward_backward(
    logits: &[f32],
    targets: &[u32],
    v: usize,
    z_loss: f32,
    grad_scale: f32,
    dlogits: &mut [f32],
    row_loss: &mut [f64],
) -> f64 {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::CrossEntropy);
    let rows = targets.len();
    let scale = grad_scale;
    let losses = &mut row_loss[..rows];
    dlogits.par_chunks_mut(v).zip(losses.par_iter_mut()).enumerate().for_each(|(row, (d, loss))| {
        if targets[row] == IGNORE {
            d.fill(0.0);
            *loss = 0.0;
            return;
        }
        let l = &logits[row * v..(row + 1) * v];
        let target = targets[row] as usize;
        assert!(target < v, "target {target} is outside the vocabulary of {v}");
        let lse = log_sum_exp(l);
        *loss = lse - l[target] as f64;
        let z_grad = 2.0 * z_loss as f64 * lse;
        for (i, (di, &x)) in d.iter_mut().zip(l).enumerate() {
            let p = ((x as f64) - lse).exp();
            let onehot = if i == target { 1.0 } else { 0.0 };
            *di = ((p - onehot + z_grad * p) as f32) * scale;
        }
    });
    losses.iter().sum::<f64>()
}

/// `log(sum(exp(l)))` of one row, in f64 after subtracting the row's maximum.
#[inline]
fn log_sum_exp(l: &[f32]) -> f64 {
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = l.iter().map(|x| ((x - max) as f64).exp()).sum();
    max as f64 + sum.ln()
}

/// Forward only: each row's `-log softmax(logits)[target]` into `row_loss` (0 for an
/// [`IGNORE`]d target), the same bits as [`cross_entropy_forward_backward`] writes; returns
/// their sum in row order.
///
/// # Panics
/// If a target is neither below `v` nor [`IGNORE`].
pub fn target_losses(logits: &[f32], targets: &[u32], v: usize, row_loss: &mut [f64]) -> f64 {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::CrossEntropy);
    let losses = &mut row_loss[..targets.len()];
    losses.par_iter_mut().enumerate().for_each(|(row, loss)| {
        *loss = match targets[row] {
            IGNORE => 0.0,
            target => {
                let target = target as usize;
                assert!(target < v, "target {target} is outside the vocabulary of {v}");
                let l = &logits[row * v..(row + 1) * v];
                log_sum_exp(l) - l[target] as f64
            }
        }
    });
    losses.iter().sum()
}

/// How many of `targets` are predicted (not [`IGNORE`]).
pub fn predicted(targets: &[u32]) -> usize {
    targets.iter().filter(|t| **t != IGNORE).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, random};

    fn reference_loss(logits: &[f32], targets: &[u32], v: usize, z_loss: f64) -> f64 {
        let (mut total, mut n) = (0.0, 0);
        for (row, &t) in targets.iter().enumerate().filter(|(_, t)| **t != IGNORE) {
            let l = &logits[row * v..(row + 1) * v];
            let lse = l.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
            total += lse - l[t as usize] as f64 + z_loss * lse * lse;
            n += 1;
        }
        total / n as f64
    }

    #[test]
    fn loss_and_gradient_match_the_plain_formula() {
        let (v, targets) = (11, [3u32, 0, 10, 7]);
        let logits: Vec<f32> = random(4 * v, 1).iter().map(|x| x * 3.0).collect();
        for z_loss in [0.0, 1e-2] {
            let mut d = vec![0.0; logits.len()];
            let sum = cross_entropy_forward_backward(&logits, &targets, v, z_loss, 0.25, &mut d, &mut [0.0; 4]);
            assert!((sum / 4.0 - reference_loss(&logits, &targets, v, 0.0)).abs() < 1e-5);
            check("dlogits", &logits, &d, |l| reference_loss(l, &targets, v, z_loss as f64));
        }
    }

    #[test]
    fn ignored_targets_add_no_loss_and_get_no_gradient() {
        let (v, targets) = (11, [3u32, IGNORE, 10, IGNORE]);
        let logits: Vec<f32> = random(4 * v, 2).iter().map(|x| x * 3.0).collect();
        let mut d = vec![1.0; logits.len()];
        let mut rows = [0.0; 4];
        let sum = cross_entropy_forward_backward(&logits, &targets, v, 1e-2, 0.5, &mut d, &mut rows);
        // The mean is over the two predicted rows, as if the others were not there.
        let kept: Vec<f32> = [&logits[..v], &logits[2 * v..3 * v]].concat();
        assert!((sum / 2.0 - reference_loss(&kept, &[3, 10], v, 0.0)).abs() < 1e-5);
        let mut forward_only = [9.0; 4];
        assert_eq!(target_losses(&logits, &targets, v, &mut forward_only), sum);
        assert_eq!(forward_only, rows, "forward only gives the same bits");
        assert!(d[v..2 * v].iter().chain(&d[3 * v..]).all(|g| *g == 0.0), "ignored rows get zeros");
        check("dlogits", &logits, &d, |l| reference_loss(l, &targets, v, 1e-2));
        let mut d = vec![1.0; logits.len()];
        assert_eq!(cross_entropy_forward_backward(&logits, &[IGNORE; 4], v, 0.0, 1.0, &mut d, &mut [0.0; 4]), 0.0);
        assert!(d.iter().all(|g| *g == 0.0));
    }

    #[test]
    fn uniform_logits_give_log_v() {
        let mut d = vec![0.0; 2 * 50];
        let sum = cross_entropy_forward_backward(&[0.0; 100], &[1, 2], 50, 0.0, 0.5, &mut d, &mut [0.0; 2]);
        assert!((sum / 2.0 - 50f64.ln()).abs() < 1e-6);
    }
}
