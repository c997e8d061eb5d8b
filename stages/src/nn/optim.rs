//! The optimizer over a whole parameter map: AdamW moments kept beside the parameters (same
//! names, same order), global gradient norm, clipping, and learning-rate schedules.

use rayon::prelude::*;

use crate::nn::kernels::adamw::{adamw_steps, AdamW, AdamWTensor};
use crate::nn::params::ParamMap;

/// Elements per chunk of the gradient-norm reduction: fixed, so the sum's bits do not depend
/// on the thread count.
const CHUNK: usize = 8192;

/// How the optimizer treats one tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorOpt {
    /// A factor on the step's learning rate (LoRA+ raises it for `lora_B`).
    pub lr_scale: f32,
    /// Whether weight decay applies.
    pub decay: bool,
}

impl TensorOpt {
    /// nanoGPT's rule for every tensor of `params`: decay on matrices (rank 2 and up: linear
    /// weights, embeddings, adapters) and not on vectors (biases, norm weights), the step's
    /// learning rate unscaled.
    pub fn defaults(params: &ParamMap) -> Vec<TensorOpt> {
        params.iter().map(|(_, t)| TensorOpt { lr_scale: 1.0, decay: t.shape().len() >= 2 }).collect()
    }
}

/// AdamW's state: first and second moments of the trainable tensors and the number of steps
/// taken. A frozen tensor has empty moments.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWState {
    pub m: ParamMap,
    pub v: ParamMap,
    pub step: u32,
}

impl AdamWState {
    /// Zero moments shaped like `grads`: the parameters' shapes, empty where frozen.
    pub fn new(grads: &ParamMap) -> Self {
        AdamWState { m: grads.zeros_like(), v: grads.zeros_like(), step: 0 }
    }

    /// One update of every trainable parameter (those whose gradient is not empty), each with
    /// its settings in `opts` (in the map's order), all in one parallel pass.
    pub fn update(&mut self, hp: AdamW, params: &mut ParamMap, grads: &ParamMap, opts: &[TensorOpt]) {
        let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Optimizer);
        assert_eq!(opts.len(), params.len(), "one optimizer setting per tensor");
        debug_assert!(
            params.iter().zip(grads.iter()).all(|((a, _), (b, _))| a == b),
            "gradients are not in parameter order"
        );
        self.step += 1;
        let tensors = params.tensors_mut().par_iter_mut().zip(grads.tensors()).zip(self.m.tensors_mut().par_iter_mut());
        let tensors = tensors.zip(self.v.tensors_mut().par_iter_mut()).zip(opts);
        let trainable = tensors.filter(|((((_, g), _), _), _)| !g.data().is_empty()).map(|((((p, g), m), v), opt)| {
            let weight_decay = if opt.decay { hp.weight_decay } else { 0.0 };
            let opt = AdamW { lr: hp.lr * opt.lr_scale, weight_decay, ..hp };
            AdamWTensor { opt, param: p.data_mut(), grad: g.data(), m: m.data_mut(), v: v.data_mut() }
        });
        adamw_steps(self.step, trainable);
    }
}

/// Chunks whose sums [`global_norm`] runs side by side.
const LOCKSTEP: usize = 8;

/// The L2 norm of all gradients together: squares summed in f64 along each chunk of [`CHUNK`]
/// (chunks in parallel, every tensor's at once), the chunks' sums in order per tensor, the
/// tensors' in order.
pub fn global_norm(grads: &ParamMap) -> f64 {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Optimizer);
    let groups = grads.tensors().par_iter().flat_map(|g| g.data().par_chunks(LOCKSTEP * CHUNK));
    let partial: Vec<f64> = groups.flat_map_iter(chunk_sums).collect();
    let mut total = 0.0f64;
    let mut at = 0;
    for g in grads.tensors() {
        let n = g.data().len().div_ceil(CHUNK);
        total += partial[at..at + n].iter().sum::<f64>();
        at += n;
    }
    total.sqrt()
}

/// The sum of squares of each [`CHUNK`] of `x` (at most [`LOCKSTEP`] of them), each along its
/// chunk in order from zero; the whole chunks' sums run side by side, so their latencies
/// overlap.
fn chunk_sums(x: &[f32]) -> impl Iterator<Item = f64> {
    let square = |x: &f32| (*x as f64) * (*x as f64);
    let whole = x.len() / CHUNK;
    let chunks: [&[f32]; LOCKSTEP] =
        std::array::from_fn(|c| &x[c.min(whole.saturating_sub(1)) * CHUNK..][..CHUNK.min(x.len())]);
    let mut sums = [0.0f64; LOCKSTEP];
    if whole > 0 {
        for j in 0..CHUNK {
            for (sum, chunk) in sums.iter_mut().zip(&chunks) {
                *sum += square(&chunk[j]);
            }
        }
    }
    let last = x[whole * CHUNK..].iter().map(square).sum::<f64>();
    sums.into_iter().take(whole).chain((whole < x.len().div_ceil(CHUNK)).then_some(last))
}

/// Multiply every gradient by `s` (gradient accumulation's 1/steps, clipping).
pub fn scale(grads: &mut ParamMap, s: f32) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Optimizer);
    let chunks = grads.tensors_mut().par_iter_mut().flat_map(|g| g.data_mut().par_chunks_mut(CHUNK));
    chunks.for_each(|c| c.iter_mut().for_each(|x| *x *= s));
}

/// Clip to a global norm of at most `max_norm`, as `torch.nn.utils.clip_grad_norm_` does
/// (scale by `max_norm / (norm + 1e-6)` when that is below 1). Returns the norm before.
pub fn clip_global_norm(grads: &mut ParamMap, max_norm: f64) -> f64 {
    let norm = global_norm(grads);
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        scale(grads, coef as f32);
    }
    norm
}

/// How the learning rate moves over training. Steps count from 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// Linear warmup to `lr` over `warmup` steps, then a cosine to `min_lr` at `decay_end`,
    /// then `min_lr` (nanoGPT's `get_lr`).
    Cosine {
        lr: f64,
        min_lr: f64,
        warmup: u64,
        decay_end: u64,
    },
    /// Warmup-stable-decay: warmup, `lr` until `decay_start`, then linear to `min_lr` at
    /// `decay_end`.
    Wsd {
        lr: f64,
        min_lr: f64,
        warmup: u64,
        decay_start: u64,
        decay_end: u64,
    },
    Constant {
        lr: f64,
        warmup: u64,
    },
}

impl Schedule {
    /// With warmup-stable-decay: the steps before the decay begins. Up to there the learning
    /// rate does not depend on the run's length, so a longer run with the same settings
    /// passes through the same states.
    pub fn stable_until(&self) -> Option<u64> {
        match *self {
            Schedule::Wsd { decay_start, .. } => Some(decay_start),
            _ => None,
        }
    }

    pub fn lr(&self, step: u64) -> f64 {
        let (peak, warmup) = match *self {
            Schedule::Cosine { lr, warmup, .. }
            | Schedule::Wsd { lr, warmup, .. }
            | Schedule::Constant { lr, warmup } => (lr, warmup),
        };
        if step < warmup {
            return peak * (step + 1) as f64 / (warmup + 1) as f64;
        }
        match *self {
            Schedule::Constant { lr, .. } => lr,
            Schedule::Cosine { lr, min_lr, warmup, decay_end } => {
                if step >= decay_end {
                    return min_lr;
                }
                let ratio = (step - warmup) as f64 / (decay_end - warmup) as f64;
                min_lr + 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos()) * (lr - min_lr)
            }
            Schedule::Wsd { lr, min_lr, decay_start, decay_end, .. } => {
                if step < decay_start {
                    lr
                } else if step >= decay_end {
                    min_lr
                } else {
                    let ratio = (step - decay_start) as f64 / (decay_end - decay_start) as f64;
                    lr + ratio * (min_lr - lr)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::batch::Batch;
    use crate::nn::gradcheck::on_threads;
    use crate::nn::loss::cross_entropy;
    use crate::nn::model::{Activations, Model, ModelConfig};
    use crate::nn::params::Tensor;

    #[test]
    fn cosine_follows_nanogpt() {
        let s = Schedule::Cosine { lr: 1e-3, min_lr: 1e-4, warmup: 100, decay_end: 2000 };
        assert!((s.lr(0) - 1e-3 / 101.0).abs() < 1e-12);
        assert!((s.lr(99) - 1e-3 * 100.0 / 101.0).abs() < 1e-12);
        assert!((s.lr(100) - 1e-3).abs() < 1e-12);
        assert!((s.lr(1050) - 5.5e-4).abs() < 1e-9, "half way: the mean of lr and min_lr");
        assert_eq!(s.lr(2000), 1e-4);
        assert_eq!(s.lr(5000), 1e-4);
    }

    #[test]
    fn wsd_holds_then_decays_linearly() {
        let s = Schedule::Wsd { lr: 1.0, min_lr: 0.0, warmup: 10, decay_start: 80, decay_end: 100 };
        assert_eq!(s.lr(10), 1.0);
        assert_eq!(s.lr(79), 1.0);
        assert!((s.lr(90) - 0.5).abs() < 1e-12);
        assert_eq!(s.lr(100), 0.0);
    }

    fn map(values: &[(&str, &[usize], Vec<f32>)]) -> ParamMap {
        let mut p = ParamMap::default();
        for (name, shape, data) in values {
            p.insert(*name, Tensor::from_vec(shape, data.clone()));
        }
        p
    }

    #[test]
    fn clipping_scales_to_the_global_norm_like_pytorch() {
        let mut g = map(&[("a", &[2], vec![3.0, 0.0]), ("b", &[1, 1], vec![4.0])]);
        assert_eq!(global_norm(&g), 5.0);
        assert_eq!(clip_global_norm(&mut g, 1.0), 5.0);
        assert!((global_norm(&g) - 1.0).abs() < 1e-6);
        let before = g.clone();
        clip_global_norm(&mut g, 10.0);
        assert_eq!(g, before, "below the limit nothing moves");
    }

    /// The norm's chunks, side by side and all tensors at once, sum as one chunk at a time in
    /// order would: empty tensors, short ones, whole groups of chunks and a short last chunk.
    #[test]
    fn the_global_norm_sums_chunk_by_chunk_in_order() {
        let sizes = [0, 3, CHUNK, LOCKSTEP * CHUNK + 5, 2 * LOCKSTEP * CHUNK + 3 * CHUNK + 1, 7];
        let tensors: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let data: Vec<f32> = crate::nn::gradcheck::random(n, i as u64 + 1).iter().map(|x| x * 1e3).collect();
                (format!("t{i}"), vec![n], data)
            })
            .collect();
        let g = map(&tensors.iter().map(|(n, s, d)| (n.as_str(), &s[..], d.clone())).collect::<Vec<_>>());
        let mut want = 0.0f64;
        for (_, t) in g.iter() {
            let partial: Vec<f64> =
                t.data().chunks(CHUNK).map(|c| c.iter().map(|x| (*x as f64) * (*x as f64)).sum()).collect();
            want += partial.iter().sum::<f64>();
        }
        assert_eq!(global_norm(&g).to_bits(), want.sqrt().to_bits());
    }

    #[test]
    fn weight_decay_spares_vectors() {
        let mut p = map(&[("w", &[1, 2], vec![1.0, 1.0]), ("b", &[2], vec![1.0, 1.0])]);
        let g = p.zeros_like();
        let mut opt = AdamWState::new(&p);
        let hp = AdamW { lr: 0.1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.5 };
        let opts = TensorOpt::defaults(&p);
        opt.update(hp, &mut p, &g, &opts);
        assert!((p.get("w")[0] - 0.95).abs() < 1e-6, "matrix decays: {}", p.get("w")[0]);
        assert_eq!(p.get("b"), &[1.0, 1.0], "vector does not");
        assert_eq!(opt.step, 1);
    }

    /// `steps` AdamW steps on one fixed batch; returns the losses and the final parameters.
    fn train(cfg: ModelConfig, steps: u32, threads: usize) -> (Vec<f32>, ParamMap) {
        on_threads(threads, || {
            let (b, t) = (2, cfg.block_size);
            let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % cfg.vocab_size) as u32).collect();
            let targets: Vec<u32> = (0..b * t).map(|i| ((i * 7 + 3) % cfg.vocab_size) as u32).collect();
            let batch = Batch::whole_rows(t, &ids, &targets);
            let mut params = cfg.init(5);
            let opts = TensorOpt::defaults(&params);
            let model = Model::new(cfg, &params);
            let mut grads = params.zeros_like();
            let mut opt = AdamWState::new(&params);
            let mut acts = Activations::new(&cfg, b, t);
            let hp = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0 };
            let mut losses = Vec::new();
            for _ in 0..steps {
                grads.fill_zero();
                model.forward(&params, &batch, &mut acts);
                let sum = cross_entropy(&mut acts, &batch, cfg.vocab_size, 0.0, b * t);
                losses.push((sum / (b * t) as f64) as f32);
                model.backward(&params, &batch, &mut acts, &mut grads);
                clip_global_norm(&mut grads, 1.0);
                opt.update(hp, &mut params, &grads, &opts);
            }
            (losses, params)
        })
    }

    #[test]
    fn a_tiny_model_overfits_one_batch() {
        for cfg in [ModelConfig::gpt2(16, 8, 2, 2, 32, true), ModelConfig::llama(16, 8, 2, 4, 2, 32)] {
            let (losses, _) = train(cfg, 150, 2);
            assert!((losses[0] - (16f32).ln()).abs() < 0.1, "starts near ln V: {}", losses[0]);
            assert!(
                *losses.last().unwrap() < 0.05,
                "{:?} memorised the batch: {:?}",
                cfg.arch,
                &losses[losses.len() - 5..]
            );
        }
    }

    #[test]
    fn one_and_two_threads_train_to_the_same_bits() {
        for cfg in [ModelConfig::gpt2(50, 70, 1, 2, 16, false), ModelConfig::llama(50, 70, 1, 4, 2, 16)] {
            let (l1, p1) = train(cfg, 5, 1);
            let (l2, p2) = train(cfg, 5, 2);
            assert_eq!(
                l1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                l2.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            for ((name, a), (_, b)) in p1.iter().zip(p2.iter()) {
                assert!(a.data().iter().zip(b.data()).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} differs");
            }
        }
    }
}
