//! Fused softmax + cross-entropy over (rows, V) logits, with optional z-loss. Every loss ends
//! in a gradient on the logits; the model's backward does the rest.

use rayon::prelude::*;

/// A target that is not predicted: its row adds nothing to the loss and gets a zero gradient
/// (padding; later, the prompt of a fine-tuning example).
pub const IGNORE: u32 = u32::MAX;

/// Mean of `-log softmax(logits)[target] + z_loss * logsumexp^2` over the rows whose target
/// is not [`IGNORE`], and its gradient with respect to the logits written into `dlogits`
/// (already divided by the number of those rows; zero on ignored rows).
///
/// Returns the mean cross-entropy alone (without the z-loss term), the number to report, or 0
/// when every target is ignored. Each row's loss goes to `row_loss` (one per target, the
/// caller's buffer) and the mean sums them in row order in f64, so it does not depend on the
/// thread count.
///
/// # Panics
/// If a target is neither below `v` nor [`IGNORE`].
pub fn cross_entropy_forward_backward(
    logits: &[f32],
    targets: &[u32],
    v: usize,
    z_loss: f32,
    dlogits: &mut [f32],
    row_loss: &mut [f64],
) -> f32 {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::CrossEntropy);
    let rows = targets.len();
    let counted = predicted(targets);
    let scale = 1.0 / counted.max(1) as f32;
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
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = l.iter().map(|x| ((x - max) as f64).exp()).sum();
        let lse = max as f64 + sum.ln();
        *loss = lse - l[target] as f64;
        let z_grad = 2.0 * z_loss as f64 * lse;
        for (i, (di, &x)) in d.iter_mut().zip(l).enumerate() {
            let p = ((x as f64) - lse).exp();
            let onehot = if i == target { 1.0 } else { 0.0 };
            *di = ((p - onehot + z_grad * p) as f32) * scale;
        }
    });
    (losses.iter().sum::<f64>() / counted.max(1) as f64) as f32
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
            let loss = cross_entropy_forward_backward(&logits, &targets, v, z_loss, &mut d, &mut [0.0; 4]);
            assert!((loss as f64 - reference_loss(&logits, &targets, v, 0.0)).abs() < 1e-5);
            check("dlogits", &logits, &d, |l| reference_loss(l, &targets, v, z_loss as f64));
        }
    }

    #[test]
    fn ignored_targets_add_no_loss_and_get_no_gradient() {
        let (v, targets) = (11, [3u32, IGNORE, 10, IGNORE]);
        let logits: Vec<f32> = random(4 * v, 2).iter().map(|x| x * 3.0).collect();
        let mut d = vec![1.0; logits.len()];
        let loss = cross_entropy_forward_backward(&logits, &targets, v, 1e-2, &mut d, &mut [0.0; 4]);
        // The mean is over the two predicted rows, as if the others were not there.
        let kept: Vec<f32> = [&logits[..v], &logits[2 * v..3 * v]].concat();
        assert!((loss as f64 - reference_loss(&kept, &[3, 10], v, 0.0)).abs() < 1e-5);
        assert!(d[v..2 * v].iter().chain(&d[3 * v..]).all(|g| *g == 0.0), "ignored rows get zeros");
        check("dlogits", &logits, &d, |l| reference_loss(l, &targets, v, 1e-2));
        let mut d = vec![1.0; logits.len()];
        assert_eq!(cross_entropy_forward_backward(&logits, &[IGNORE; 4], v, 0.0, &mut d, &mut [0.0; 4]), 0.0);
        assert!(d.iter().all(|g| *g == 0.0));
    }

    #[test]
    fn uniform_logits_give_log_v() {
        let mut d = vec![0.0; 2 * 50];
        let loss = cross_entropy_forward_backward(&[0.0; 100], &[1, 2], 50, 0.0, &mut d, &mut [0.0; 2]);
        assert!((loss - (50f32).ln()).abs() < 1e-6);
    }
}
