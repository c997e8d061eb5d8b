//! What issue 18's first idea would gain: the batch split into shards, each shard's forward and
//! backward run whole on one thread with its own activations and gradients, the gradients
//! then summed in shard order, against today's one pass over the whole batch whose kernels
//! each split their work across the threads.
//!
//! Both reference models' shapes (`tinygpt bench`'s), in f32 and in bf16: forward, the
//! cross-entropy's gradient and backward, plus the sum of the shards' gradients; no optimizer
//! (it is the same in both). Blocks of steps of each way alternate (4 x 10 steps each after
//! a warm-up step per block; gpt2-6x384 3 x 2), so each block runs warm in the caches as
//! training does and a slow spell of the machine falls on both; medians. Also how far the summed gradients are from the whole batch's (they differ in
//! rounding only: the weight gradients sum over rows in another order).
//!
//! Run with `cargo bench -p stages --bench shards`. Prints figures; asserts nothing.

use std::time::Instant;

use rayon::prelude::*;
use stages::bench::reference_models;
use stages::nn::batch::Batch;
use stages::nn::kernels::{add_assign, Precision};
use stages::nn::model::{Activations, Model};
use stages::nn::params::ParamMap;
use stages::nn::rng::SplitMix64;
use stages::nn::step::{CrossEntropy, Objective};

/// One shard (or the whole batch): its rows, activations and gradients.
struct Part {
    batch: Batch,
    acts: Activations,
    grads: ParamMap,
}

impl Part {
    fn new(model: &Model, params: &ParamMap, rows: usize, t: usize) -> Part {
        Part { batch: Batch::new(rows, t), acts: Activations::for_training(model, rows, t), grads: params.zeros_like() }
    }

    /// Forward, the loss's gradient (mean over `units` tokens) and backward into fresh gradients.
    fn pass(&mut self, model: &Model, params: &ParamMap, units: usize) {
        self.grads.fill_zero();
        model.forward(params, &self.batch, &mut self.acts);
        CrossEntropy::default().loss(model, params, &mut self.acts, &self.batch, units);
        model.backward(params, &self.batch, &mut self.acts, &mut self.grads);
    }
}

/// Every shard's pass, one shard per task, then the shards' gradients summed into the first
/// shard's, in shard order.
fn sharded_pass(parts: &mut [Part], model: &Model, params: &ParamMap, units: usize) {
    parts.par_iter_mut().with_max_len(1).for_each(|part| part.pass(model, params, units));
    let (first, rest) = parts.split_at_mut(1);
    for part in rest.iter() {
        for ((_, sum), (_, g)) in first[0].grads.iter_mut().zip(part.grads.iter()) {
            add_assign(sum.data_mut(), g.data());
        }
    }
}

fn median(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    x[x.len() / 2]
}

fn main() {
    // On a thread of the pool, as a training stage runs (engine::exec): the one pass's kernels
    // then start their parallel loops on the calling thread, not from outside the pool.
    rayon::scope(|_| models());
}

fn models() {
    println!("{} threads; median step times (forward + backward, ms)", rayon::current_num_threads());
    for m in reference_models() {
        for precision in [Precision::F32, Precision::Bf16] {
            for shards in [2, 4] {
                run(m.name, &m.cfg, m.batch, precision, shards);
            }
        }
    }
}

fn run(name: &str, cfg: &stages::nn::model::ModelConfig, rows: usize, precision: Precision, shards: usize) {
    let t = cfg.block_size;
    let params = cfg.init(1);
    let model = Model::new(*cfg, &params).with_precision(precision);
    let mut whole = Part::new(&model, &params, rows, t);
    let mut parts: Vec<Part> = (0..shards).map(|_| Part::new(&model, &params, rows / shards, t)).collect();
    let mut rng = SplitMix64::new(2);
    let (mut one_pass, mut sharded) = (Vec::new(), Vec::new());
    let mut worst = 0.0f32;
    // Blocks of steps, each way's block warm in the caches as in training, the blocks
    // alternating so that a slow spell of the machine falls on both.
    let (rounds, block) = if rows * t > 4096 { (3, 3) } else { (4, 11) };
    for _ in 0..rounds {
        for way in [0, 1] {
            for step in 0..block {
                let batch = &mut whole.batch;
                let vocab = cfg.vocab_size;
                batch.ids.iter_mut().chain(batch.targets.iter_mut()).for_each(|id| *id = rng.below(vocab) as u32);
                let per = rows / shards * t;
                for (s, part) in parts.iter_mut().enumerate() {
                    part.batch.ids.copy_from_slice(&batch.ids[s * per..][..per]);
                    part.batch.targets.copy_from_slice(&batch.targets[s * per..][..per]);
                }
                let units = whole.batch.predicted();
                let start = Instant::now();
                if way == 0 {
                    whole.pass(&model, &params, units);
                } else {
                    sharded_pass(&mut parts, &model, &params, units);
                }
                let ms = start.elapsed().as_secs_f64() * 1e3;
                if step > 0 {
                    [&mut one_pass, &mut sharded][way].push(ms);
                }
            }
        }
        // The last blocks' batches differ; compare the gradients of one batch both ways.
        whole.pass(&model, &params, whole.batch.predicted());
        let units = whole.batch.predicted();
        sharded_pass(&mut parts, &model, &params, units);
        for ((_, g), (_, w)) in parts[0].grads.iter().zip(whole.grads.iter()) {
            let scale = w.data().iter().fold(0.0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
            let off = g.data().iter().zip(w.data()).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            worst = worst.max(off / scale);
        }
    }
    let (a, b) = (median(one_pass), median(sharded));
    println!(
        "{name} {precision:?}, batch {rows} x {t}: one pass {a:.2}, {shards} shards {b:.2} ({:.2}x); \
         gradients within {worst:.1e} of the largest",
        a / b
    );
}
