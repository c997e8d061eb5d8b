//! AdamW (Loshchilov and Hutter), one parameter tensor at a time, with bias correction and
//! decoupled weight decay. Elementwise, so trivially independent of the thread count.

use rayon::prelude::*;

use super::simd_fn;

const CHUNK: usize = 4096;

/// Hyperparameters of one update.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled: `p -= lr * weight_decay * p`. Callers pass 0 for vectors (biases, norms).
    pub weight_decay: f32,
}

/// Update `param`, `m` and `v` in place for step `step` (1-based).
pub fn adamw_step(opt: AdamW, step: u32, param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
    adamw_steps(step, rayon::iter::once(AdamWTensor { opt, param, grad, m, v }));
}

/// One tensor of an update: its hyperparameters, its values, gradient and moments.
pub struct AdamWTensor<'a> {
    pub opt: AdamW,
    pub param: &'a mut [f32],
    pub grad: &'a [f32],
    pub m: &'a mut [f32],
    pub v: &'a mut [f32],
}

/// [`adamw_step`] on every tensor of `tensors` in one parallel pass over all their chunks, so
/// that a model of many small tensors hands out its work once, not once per tensor. Each
/// element's arithmetic is [`adamw_step`]'s.
pub fn adamw_steps<'a>(step: u32, tensors: impl ParallelIterator<Item = AdamWTensor<'a>>) {
    tensors
        .flat_map(|t| {
            let opt = t.opt;
            let c1 = 1.0 - opt.beta1.powi(step as i32);
            let c2 = 1.0 - opt.beta2.powi(step as i32);
            let chunks = t.param.par_chunks_mut(CHUNK).zip(t.grad.par_chunks(CHUNK));
            chunks.zip(t.m.par_chunks_mut(CHUNK).zip(t.v.par_chunks_mut(CHUNK))).map(move |c| (opt, c1, c2, c))
        })
        .for_each(|(opt, c1, c2, ((p, g), (m, v)))| adamw_chunk(opt, c1, c2, p, g, m, v));
}

simd_fn! {
    fn adamw_chunk(opt: AdamW, c1: f32, c2: f32, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let (g, m, v) = (&g[..p.len()], &mut m[..p.len()], &mut v[..p.len()]);
        for i in 0..p.len() {
            m[i] = opt.beta1 * m[i] + (1.0 - opt.beta1) * g[i];
            v[i] = opt.beta2 * v[i] + (1.0 - opt.beta2) * g[i] * g[i];
            let update = (m[i] / c1) / ((v[i] / c2).sqrt() + opt.eps);
            p[i] -= opt.lr * (update + opt.weight_decay * p[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook algorithm for one scalar, in f64.
    fn reference(opt: AdamW, steps: &[f64], mut p: f64) -> f64 {
        let (mut m, mut v) = (0.0f64, 0.0f64);
        let (b1, b2) = (opt.beta1 as f64, opt.beta2 as f64);
        for (t, g) in steps.iter().enumerate() {
            let t = t as i32 + 1;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let (mh, vh) = (m / (1.0 - b1.powi(t)), v / (1.0 - b2.powi(t)));
            p -= opt.lr as f64 * (mh / (vh.sqrt() + opt.eps as f64) + opt.weight_decay as f64 * p);
        }
        p
    }

    #[test]
    fn matches_the_textbook_update() {
        let opt = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
        let grads = [0.5, -0.25, 1.0, 0.0, 2.0];
        let (mut p, mut m, mut v) = (vec![0.3f32], vec![0.0f32], vec![0.0f32]);
        for (t, g) in grads.iter().enumerate() {
            adamw_step(opt, t as u32 + 1, &mut p, &[*g as f32], &mut m, &mut v);
        }
        let expected = reference(opt, &grads, 0.3);
        assert!((p[0] as f64 - expected).abs() < 1e-6, "{} vs {expected}", p[0]);
    }

    #[test]
    fn the_first_step_moves_each_weight_by_about_lr() {
        let opt = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let (mut p, mut m, mut v) = (vec![1.0f32; 3], vec![0.0; 3], vec![0.0; 3]);
        adamw_step(opt, 1, &mut p, &[3.0, -0.01, 0.0], &mut m, &mut v);
        assert!((p[0] - 0.999).abs() < 1e-6 && (p[1] - 1.001).abs() < 1e-6 && p[2] == 1.0);
    }
}
