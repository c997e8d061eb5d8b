//! Fused softmax + cross-entropy over (rows, V) logits, with optional z-loss. Every loss ends
//! in a gradient on the logits; the model's backward does the rest.

use rayon::prelude::*;

/// Mean over rows of `-log softmax(logits)[target] + z_loss * logsumexp^2`, and its gradient
/// with respect to the logits written into `dlogits` (already divided by the row count).
///
/// Returns the mean cross-entropy alone (without the z-loss term), the number to report.
/// Each row's loss goes to `row_loss` (one per target, the caller's buffer) and the mean sums
/// them in row order in f64, so it does not depend on the thread count.
///
/// # Panics
/// If a target is not below `v`.
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
    let scale = 1.0 / rows as f32;
    let losses = &mut row_loss[..rows];
    dlogits.par_chunks_mut(v).zip(losses.par_iter_mut()).enumerate().for_each(|(row, (d, loss))| {
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
    (losses.iter().sum::<f64>() / rows as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, random};

    fn reference_loss(logits: &[f32], targets: &[u32], v: usize, z_loss: f64) -> f64 {
        let mut total = 0.0;
        for (row, &t) in targets.iter().enumerate() {
            let l = &logits[row * v..(row + 1) * v];
            let lse = l.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
            total += lse - l[t as usize] as f64 + z_loss * lse * lse;
        }
        total / targets.len() as f64
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
    fn uniform_logits_give_log_v() {
        let mut d = vec![0.0; 2 * 50];
        let loss = cross_entropy_forward_backward(&[0.0; 100], &[1, 2], 50, 0.0, &mut d, &mut [0.0; 2]);
        assert!((loss - (50f32).ln()).abs() < 1e-6);
    }
}
