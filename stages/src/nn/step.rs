//! One optimizer step of training, shared by every training stage and `tinygpt bench`: zero
//! the gradients, forward, loss and backward over `accum` micro-batches, clip, update.
//!
//! What the step minimises is an [`Objective`]: cross-entropy on the data for pretraining and
//! fine-tuning, a distillation or preference loss for the stages that build on them.
//!
//! A step can split each micro-batch into a fixed number of shards of whole rows ([`StepWork`]):
//! each shard's forward, loss and backward run whole, shards side by side on the threads, each
//! into its own gradients, which are then added in shard order. Small models gain (each
//! kernel is too short to split well across threads); the bits depend on the shard count, a
//! recipe setting, never on the thread count. Only a loss that sums over rows ([`RowLoss`]) can
//! be split so.

use rayon::prelude::*;

use crate::nn::batch::Batch;
use crate::nn::kernels::adamw::AdamW;
use crate::nn::kernels::add_assign;
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
    /// When the loss is a sum over rows (or over groups of rows that a shard holds whole), each
    /// part computed from its rows alone: make ready what the rows of the micro-batch `batch`
    /// read (a teacher's rows, a reference point over the whole batch) and return the loss as a
    /// [`RowLoss`], which shards of the batch run side by side. `None` (the default): the
    /// objective cannot run in shards.
    fn rows(&mut self, _model: &Model, _params: &ParamMap, _batch: &Batch) -> Option<&dyn RowLoss> {
        None
    }
}

/// An objective's loss over some rows of a micro-batch ([`Objective::rows`]).
pub trait RowLoss: Sync {
    /// As [`Objective::loss`] for `shard`: rows of the micro-batch [`Objective::rows`] made
    /// ready, from its token `shard.first_token` on.
    fn shard_loss(&self, model: &Model, acts: &mut Activations, shard: &Batch, mean_over: usize) -> f64;
}

/// Cross-entropy of the batch's targets, with PaLM's z-loss.
#[derive(Clone, Copy, Debug, Default)]
pub struct CrossEntropy {
    pub z_loss: f32,
}

impl Objective for CrossEntropy {
    fn loss(&mut self, model: &Model, _: &ParamMap, acts: &mut Activations, batch: &Batch, mean_over: usize) -> f64 {
        self.shard_loss(model, acts, batch, mean_over)
    }
    fn rows(&mut self, _: &Model, _: &ParamMap, _: &Batch) -> Option<&dyn RowLoss> {
        Some(self)
    }
}

impl RowLoss for CrossEntropy {
    fn shard_loss(&self, model: &Model, acts: &mut Activations, shard: &Batch, mean_over: usize) -> f64 {
        cross_entropy(acts, shard, model.cfg.vocab_size, self.z_loss, mean_over)
    }
}

/// What a step computes in: each shard's rows of the micro-batch and its activations, and
/// for every shard after the first, its own gradients (the first shard's go straight into the
/// trainable's). One shard reads the micro-batch itself.
pub struct StepWork {
    shards: Vec<Shard>,
}

struct Shard {
    /// The shard's rows of the micro-batch (unused with a single shard, which reads the batch).
    batch: Batch,
    acts: Activations,
    /// Empty for the first shard.
    grads: ParamMap,
    /// The summed loss of the shard's rows in the last pass.
    loss: f64,
}

impl StepWork {
    /// Buffers for micro-batches of `b` rows of `t` tokens split into `shards` shards, for a
    /// model whose gradients are shaped like `grads` (empty tensors for frozen parameters);
    /// with `checkpointed`, activation checkpointing.
    ///
    /// # Panics
    /// If `shards` is 0 or does not divide `b`; recipes check it at plan time.
    pub fn new(model: &Model, b: usize, t: usize, shards: usize, checkpointed: bool, grads: &ParamMap) -> Self {
        assert!(shards > 0 && b.is_multiple_of(shards), "{shards} shards do not split {b} rows evenly");
        let rows = b / shards;
        let shards = (0..shards)
            .map(|s| Shard {
                batch: Batch::new(rows, t),
                acts: match checkpointed {
                    true => Activations::checkpointed(model, rows, t),
                    false => Activations::for_training(model, rows, t),
                },
                grads: if s == 0 { ParamMap::default() } else { grads.zeros_like() },
                loss: 0.0,
            })
            .collect();
        StepWork { shards }
    }
    /// The bytes of the activations and of the shards' own gradients.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.acts.bytes() + 4 * s.grads.num_elements()).sum()
    }

    /// Forward, loss and backward of `batch`, adding its gradients into `grads` (the first
    /// shard's) and each later shard's own; returns the summed loss.
    fn pass(
        &mut self,
        model: &Model,
        params: &ParamMap,
        grads: &mut ParamMap,
        batch: &Batch,
        objective: &mut dyn Objective,
        mean_over: usize,
    ) -> f64 {
        if let [whole] = &mut self.shards[..] {
            model.forward(params, batch, &mut whole.acts);
            let sum = objective.loss(model, params, &mut whole.acts, batch, mean_over);
            model.backward(params, batch, &mut whole.acts, grads);
            return sum;
        }
        let rows_loss = objective
            .rows(model, params, batch)
            .expect("an objective without `rows` ran in shards: its stage must refuse `shards` at plan time");
        // Into `grads` for the first shard, into its own map for every other.
        let run = |shard: &mut Shard, grads: Option<&mut ParamMap>| {
            let Shard { batch, acts, grads: own, loss } = shard;
            model.forward(params, batch, acts);
            *loss = rows_loss.shard_loss(model, acts, batch, mean_over);
            model.backward(params, batch, acts, grads.unwrap_or(own));
        };
        let rows = self.shards[0].batch.batch();
        for (s, shard) in self.shards.iter_mut().enumerate() {
            shard.batch.copy_rows_from(batch, s * rows);
        }
        let (first, rest) = self.shards.split_first_mut().expect("at least one shard");
        rayon::join(
            || run(first, Some(grads)),
            || rest.par_iter_mut().with_max_len(1).for_each(|shard| run(shard, None)),
        );
        self.shards.iter().map(|s| s.loss).sum()
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
    work: &mut StepWork,
    batches: &[Batch],
    cfg: StepConfig,
    objective: &mut dyn Objective,
) -> StepOutcome {
    t.grads.fill_zero();
    for shard in &mut work.shards[1..] {
        shard.grads.fill_zero();
    }
    let accum = batches.len();
    let step_units: usize = batches.iter().map(|b| objective.units(b)).sum();
    let mut loss = 0.0f64;
    for batch in batches {
        let units = objective.units(batch);
        let mean_over = match cfg.mean {
            LossMean::PerMicroBatch => units,
            LossMean::PerStep => step_units,
        };
        let sum = work.pass(model, t.params, t.grads, batch, objective, mean_over);
        loss += match cfg.mean {
            LossMean::PerMicroBatch => (sum / units.max(1) as f64) as f32 as f64,
            LossMean::PerStep => sum,
        };
    }
    for shard in &work.shards[1..] {
        for ((_, sum), (_, g)) in t.grads.iter_mut().zip(shard.grads.iter()) {
            add_assign(sum.data_mut(), g.data());
        }
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

/// For tests: one step over `batches` in `shards` shards at learning rate 0, from `params` with
/// gradients shaped like `grads`: the loss and the gradients.
#[cfg(test)]
pub(crate) fn step_at_lr_zero(
    model: &Model,
    params: &ParamMap,
    grads: &ParamMap,
    batches: &[Batch],
    mean: LossMean,
    shards: usize,
    objective: &mut dyn Objective,
) -> (f64, ParamMap) {
    let (mut params, mut grads) = (params.clone(), grads.zeros_like());
    let mut opt = AdamWState::new(&grads);
    let opts = TensorOpt::defaults(&params);
    let mut work = StepWork::new(model, batches[0].batch(), batches[0].time(), shards, false, &grads);
    let adamw = AdamW { lr: 0.0, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0 };
    let cfg = StepConfig { adamw, grad_clip: 0.0, mean };
    let t = Trainable { params: &mut params, grads: &mut grads, opt: &mut opt, opts: &opts };
    let outcome = train_step(model, t, &mut work, batches, cfg, objective);
    (outcome.loss, grads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::batch::{EmbeddingNoise, IGNORE};
    use crate::nn::config::{Arch, ModelConfig};
    use crate::nn::gradcheck::{assert_maps_close, on_threads, random};
    use crate::nn::lora::{is_adapter, LoraConfig};

    /// A tiny model of `arch`, its parameters random and of a useful size, with LoRA adapters
    /// (dropout 0.25) on every linear layer when `lora`; its gradients (adapters only with LoRA).
    fn tiny(arch: Arch, lora: bool) -> (Model, ParamMap, ParamMap) {
        let cfg = match arch {
            Arch::Gpt2 => ModelConfig::gpt2(11, 8, 2, 2, 8, true),
            Arch::Llama => ModelConfig::llama(11, 8, 2, 4, 2, 16),
        };
        let mut params = cfg.init(1);
        let adapters = LoraConfig::on_every_linear(&cfg, 2, 4.0);
        if lora {
            adapters.add(&cfg, &mut params, 3);
        }
        for (i, (_, t)) in params.iter_mut().enumerate() {
            let values = random(t.data().len(), 100 + i as u64);
            t.data_mut().iter_mut().zip(values).for_each(|(w, r)| *w = r * 0.5);
        }
        let (model, grads) = match lora {
            true => (
                Model::with_lora_scale(cfg, &params, adapters.scale()).with_lora_dropout(0.25),
                params.zeros_like_trainable(is_adapter),
            ),
            false => (Model::new(cfg, &params), params.zeros_like()),
        };
        (model, params, grads)
    }

    /// Four rows of packed examples with random ids, some targets ignored as prompts are, and
    /// NEFTune's noise and adapter dropout drawn by place.
    fn packed(seed: u64) -> Batch {
        let (ids, targets) = (random(32, seed), random(32, seed + 1));
        let token = |r: &f32| ((r + 1.0) * 5.49) as u32;
        let mut batch = Batch::whole_rows(
            8,
            &ids.iter().map(token).collect::<Vec<_>>(),
            &targets.iter().map(token).collect::<Vec<_>>(),
        );
        for r in 0..4 {
            batch.row_mut(r).2.copy_from_slice(&[[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 1]][r % 2]);
        }
        for i in [0, 3, 4, 8, 17, 30] {
            batch.targets[i] = IGNORE;
        }
        batch.noise = Some(EmbeddingNoise { alpha: 5.0, seed: 4 });
        batch.dropout_seed = Some(9);
        batch
    }

    /// One step of two micro-batches in `shards` shards at learning rate 0: the loss and the
    /// gradients.
    fn step(arch: Arch, lora: bool, mean: LossMean, shards: usize) -> (f64, ParamMap) {
        let (model, params, grads) = tiny(arch, lora);
        let batches = [packed(5), packed(7)];
        step_at_lr_zero(&model, &params, &grads, &batches, mean, shards, &mut CrossEntropy::default())
    }

    /// Shards compute the whole batch's loss and gradients up to the order of the sums over
    /// rows: the same noise and dropout masks for every token, the same weights on the losses.
    #[test]
    fn a_step_in_shards_computes_what_the_whole_batch_does() {
        for (arch, lora, mean) in [
            (Arch::Gpt2, false, LossMean::PerMicroBatch),
            (Arch::Llama, false, LossMean::PerStep),
            (Arch::Gpt2, true, LossMean::PerStep),
            (Arch::Llama, true, LossMean::PerMicroBatch),
        ] {
            let (loss, whole) = step(arch, lora, mean, 1);
            for shards in [2, 4] {
                let what = format!("{} lora {lora} {mean:?}, {shards} shards", arch.name());
                let (sharded_loss, sharded) = step(arch, lora, mean, shards);
                assert!((loss - sharded_loss).abs() <= 1e-6 * loss.abs(), "{what}: loss {loss} vs {sharded_loss}");
                assert_maps_close(&what, &whole, &sharded, 1e-5);
            }
        }
    }

    #[test]
    fn a_step_in_shards_has_the_same_bits_on_one_and_two_threads() {
        for (arch, lora) in [(Arch::Gpt2, false), (Arch::Llama, true)] {
            let one = on_threads(1, || step(arch, lora, LossMean::PerStep, 2));
            let two = on_threads(2, || step(arch, lora, LossMean::PerStep, 2));
            assert_eq!(one.0.to_bits(), two.0.to_bits(), "{}: loss", arch.name());
            for ((name, a), (_, b)) in one.1.iter().zip(two.1.iter()) {
                assert!(a.data().iter().zip(b.data()).all(|(x, y)| x.to_bits() == y.to_bits()), "{name}");
            }
        }
    }

    #[test]
    fn a_shard_draws_the_noise_of_its_place_in_the_batch() {
        let whole = packed(5);
        let mut shard = Batch::new(2, 8);
        shard.copy_rows_from(&whole, 2);
        assert_eq!(shard.ids, whole.ids[16..]);
        assert_eq!(shard.pos, whole.pos[16..]);
        assert_eq!((shard.first_token, shard.noise, shard.dropout_seed), (16, whole.noise, whole.dropout_seed));
    }
}
