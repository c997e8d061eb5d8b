//! `align`: preference tuning of a policy on data from a `preferences` stage, with DPO
//! (cDPO's label smoothing), IPO, SimPO, ORPO or KTO, in full or through LoRA adapters.
//!
//! DPO, IPO and KTO compare the policy with a frozen reference whose log-probabilities a
//! `reference` stage computed once: wiring it is required for them (checked when the recipe is
//! resolved) and optional for SimPO and ORPO, which then report the KL to it. A step's
//! micro-batch holds whole pairs, chosen and rejected in neighbouring rows, and the pair losses
//! average over the pairs of the step. KTO takes pairs as a desirable and an undesirable
//! example, or unpaired examples; it averages over examples, and its KL reference point is the
//! micro-batch's mean log-ratio on mismatched prompt/response sequences (each example's prompt
//! with another's response, scored by the reference once and by the policy at every step),
//! detached and clamped at 0, as TRL computes it. At every evaluation the validation pairs give the loss, the
//! mean rewards of chosen and rejected, reward accuracy and margin, the policy's log-prob
//! preference accuracy, and with a reference the KL to it (the mean log-ratio on chosen).
//!
//! Output: the model with any adapter merged in, in `pretrain`'s layout, and with an adapter,
//! `adapter/` in PEFT's layout.

use std::collections::{BTreeMap, BTreeSet};

use engine::{Accepts, Input, InputSpec, Metrics, ParamProblem, ParamSpec, Params, Stage, StageCtx, StageError};
use serde_json::json;

use crate::adapters::{check_lora, check_lora_targets, FineTune, Setup, LORA_PARAMS};
use crate::arrow_io::TokenMeta;
use crate::batches::EpochOrder;
use crate::checkpoint::DataPos;
use crate::example_rows::Rows;
use crate::instructions::TEMPLATE_FILE;
use crate::model_io::{model_over_data, save_model, ModelOverData, TOKENIZER};
use crate::nn::batch::{Batch, IGNORE};
use crate::nn::kernels::cross_entropy::cross_entropy_forward_backward;
use crate::nn::model::{Activations, Model};
use crate::nn::params::ParamMap;
use crate::nn::preference::{Kto, Pair, PairLoss, Seq};
use crate::nn::step::{LossMean, Objective, RowLoss};
use crate::preferences::{TRAIN_FILE, VAL_FILE};
use crate::reference::{load_reference, sequence_logps, PrefSplit, SeqLogps};
use crate::train::{self, check_train_params, TrainData, TrainSpec, Trainee, Validation, METRICS_FILE, TRAIN_PARAMS};
use crate::{concat_params, fail, MODEL, PREFERENCES, REFERENCE};

pub struct Align;

const LOSSES: &[&str] = &["dpo", "ipo", "kto", "simpo", "orpo"];

const OWN_PARAMS: [ParamSpec; 8] = [
    ParamSpec::choice(
        "loss",
        "dpo",
        LOSSES,
        "`dpo`, `ipo`, `kto` (these need a reference), `simpo` (length-normalised, no reference) or `orpo` (odds ratio plus SFT on chosen, no reference)",
    ),
    ParamSpec::opt_float("beta", 0.0, 1e4, "the loss's beta (default 0.1 for DPO, IPO and KTO, 2.0 for SimPO)"),
    ParamSpec::float("desirable_weight", 1.0, 0.0, 1e4, "kto: weight of desirable examples' losses"),
    ParamSpec::float("undesirable_weight", 1.0, 0.0, 1e4, "kto: weight of undesirable examples' losses"),
    ParamSpec::float("gamma", 1.0, -1e4, 1e4, "simpo: the target reward margin"),
    ParamSpec::float("label_smoothing", 0.0, 0.0, 0.5, "dpo, simpo: the assumed share of flipped labels (cDPO)"),
    ParamSpec::float("orpo_lambda", 0.1, 0.0, 1e4, "orpo: weight of the odds-ratio term beside SFT on chosen"),
    ParamSpec::int("val_batch_size", 16, 1, 1 << 20, "sequences per validation forward pass").not_hashed(),
];

const PARAMS: &[ParamSpec] =
    &concat_params::<18, 21, 39>(concat_params::<8, 10, 18>(OWN_PARAMS, LORA_PARAMS), TRAIN_PARAMS);

const INPUTS: &[InputSpec] = &[
    InputSpec {
        name: "model",
        accepts: Accepts::Artifact(&[MODEL]),
        required: true,
        doc: "the policy to start from (any model stage)",
    },
    InputSpec {
        name: "data",
        accepts: Accepts::Artifact(&[PREFERENCES]),
        required: true,
        doc: "a `preferences` stage made with the policy's tokenizer",
    },
    InputSpec {
        name: "reference",
        accepts: Accepts::Artifact(&[REFERENCE]),
        required: false,
        doc: "a `reference` stage over the same data: required by dpo, ipo and kto",
    },
];

/// A loss over pairs, or KTO's over examples.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Loss {
    Pair(PairLoss),
    Kto(Kto),
}

impl Loss {
    fn uses_reference(&self) -> bool {
        match self {
            Loss::Pair(l) => l.uses_reference(),
            Loss::Kto(_) => true,
        }
    }
}

/// The loss the parameters ask for.
fn loss_of(p: &Params) -> Loss {
    let beta = |default: f64| p.opt_float("beta").unwrap_or(default);
    let smoothing = p.float("label_smoothing");
    Loss::Pair(match p.str("loss") {
        "ipo" => PairLoss::Ipo { beta: beta(0.1) },
        "simpo" => PairLoss::Simpo { beta: beta(2.0), gamma: p.float("gamma"), label_smoothing: smoothing },
        "orpo" => PairLoss::Orpo { lambda: p.float("orpo_lambda") },
        "kto" => {
            return Loss::Kto(Kto {
                beta: beta(0.1),
                desirable_weight: p.float("desirable_weight"),
                undesirable_weight: p.float("undesirable_weight"),
            })
        }
        _ => PairLoss::Dpo { beta: beta(0.1), label_smoothing: smoothing },
    })
}

impl Stage for Align {
    fn kind(&self) -> &'static str {
        "align"
    }
    fn version(&self) -> u32 {
        // 2: attention's products in bf16 when precision = "bf16"; 3: LoRA gradients summed by
        // blocks of rows; 4: in f32, blocks of up to 256 rows; 5: DoRA's too; 6: adapters'
        // rank-r products by their own kernels
        6
    }
    fn about(&self) -> &'static str {
        "preference-tune a policy with DPO, IPO, SimPO or ORPO, in full or with LoRA adapters"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn inputs(&self) -> &'static [InputSpec] {
        INPUTS
    }
    fn output(&self) -> engine::ArtifactType {
        MODEL
    }
    fn vocabulary(&self) -> engine::Vocabulary {
        engine::Vocabulary::From("model")
    }
    fn same_vocabulary(&self) -> &'static [&'static str] {
        &["model", "data", "reference"]
    }
    fn uses_seed(&self) -> bool {
        true
    }
    fn volatile_outputs(&self) -> &'static [&'static str] {
        &[METRICS_FILE]
    }
    /// With `schedule = "wsd"`, a longer run continues from a shorter one's state at the end
    /// of its stable phase.
    fn run_length_params(&self) -> &'static [&'static str] {
        &["max_steps"]
    }

    fn check(&self, p: &Params, connected: &BTreeSet<&str>) -> Result<(), ParamProblem> {
        check_train_params(p)?;
        check_lora(p)?;
        let loss = loss_of(p);
        if loss.uses_reference() && !connected.contains("reference") {
            return Err(ParamProblem::new(
                "loss",
                format!(
                    "loss \"{}\" compares the policy with a reference: wire `reference` to a `reference` stage",
                    p.str("loss")
                ),
            ));
        }
        if matches!(loss, Loss::Pair(PairLoss::Ipo { beta }) if beta == 0.0) {
            return Err(ParamProblem::new("beta", "IPO's target margin is 1 / (2 beta): beta must be above 0"));
        }
        Ok(())
    }

    fn check_shapes(&self, p: &Params, upstream: &BTreeMap<&str, &serde_json::Value>) -> Result<(), ParamProblem> {
        check_lora_targets(p, upstream)
    }
    /// The model keeps its input's shape (adapters merge into the same matrices).
    fn output_shape(&self, _: &Params, upstream: &BTreeMap<&str, &serde_json::Value>) -> serde_json::Value {
        crate::quantize::shape_of_input(upstream, "model")
    }
    fn run(&self, ctx: &StageCtx<'_>) -> Result<Metrics, StageError> {
        let p = ctx.params();
        let ModelOverData { cfg, mut params, eot, data, data_stage, .. } = model_over_data(ctx)?;
        let reference = match ctx.input("reference") {
            Some(Input::Artifact { artifact: reference, stage: reference_stage, .. }) => {
                Some(load_reference((reference, reference_stage), (data, data_stage))?)
            }
            _ => None,
        };
        let train = PrefSplit::read(&data.dir, TRAIN_FILE, eot, cfg.block_size)?;
        let val = PrefSplit::read(&data.dir, VAL_FILE, eot, cfg.block_size)?;
        let t = train.rows.t;
        let loss = loss_of(p);
        if matches!(loss, Loss::Pair(_)) && !train.paired {
            return Err(StageError::msg(format!(
                "loss \"{}\" compares pairs, and stage `{data_stage}` holds unpaired examples: use loss = \"kto\"",
                p.str("loss")
            )));
        }
        let Setup { tune, model, grads, opts } = FineTune::setup(p, &cfg, &mut params, ctx.seed())?;
        let trainable_count = grads.num_elements();
        let mut spec = TrainSpec::from_params(p, t, LossMean::PerStep);
        let group = if train.paired { 2 } else { 1 };
        let groups_per_batch = spec.batch;
        spec.batch *= group; // rows: a pair's two sequences, or one example
        let (train_ref, val_ref) = reference.map_or((None, None), |(t, v)| (Some(t), Some(v)));
        let objective: Box<dyn Objective> = match loss {
            Loss::Pair(loss) => Box::new(PairObjective { loss, reference: train_ref }),
            Loss::Kto(loss) => Box::new(KtoObjective {
                loss,
                reference: train_ref.expect("resolution requires a reference for KTO"),
                kl: train.kl.clone(),
                labels: train.labels.clone(),
                kl_pass: None,
                z0: 0.0,
            }),
        };
        let n_groups = train.rows.rows / group;
        let mut source = PrefData {
            train,
            val,
            group,
            order: EpochOrder::new(ctx.seed()),
            dropout_seed: (tune.dropout > 0.0).then_some(ctx.seed() ^ 0x4452_4F50_4F55_5421),
            val_batch: p.usize("val_batch_size"),
            val_ref,
            loss,
            objective,
        };
        let trainee = Trainee { model, fresh: params, grads, opts };
        let outcome = train::train(ctx, &spec, trainee, &mut source)?;

        let merged = tune.finish(ctx, &cfg, &outcome.state.params)?;
        save_model(ctx.out_dir(), &cfg, &merged, eot)?;
        std::fs::copy(data.path(TOKENIZER), ctx.out(TOKENIZER)).map_err(|e| fail("copying tokenizer.json")(&e))?;
        if data.path(TEMPLATE_FILE).is_file() {
            std::fs::copy(data.path(TEMPLATE_FILE), ctx.out(TEMPLATE_FILE))
                .map_err(|e| fail("copying template.json")(&e))?;
        }
        TokenMeta { vocab_size: cfg.vocab_size as u32, eot_id: eot, seq_len: Some(t) }.write(ctx.out_dir())?;
        outcome.write_log(ctx)?;

        let mut metrics = outcome.metrics();
        metrics.extend([
            ("trainable_parameters".into(), json!(trainable_count)),
            (if group == 2 { "train_pairs" } else { "train_examples" }.into(), json!(n_groups)),
            (
                if group == 2 { "pairs_per_step" } else { "examples_per_step" }.into(),
                json!(groups_per_batch * spec.accum),
            ),
        ]);
        Ok(metrics)
    }
}

/// A pair loss over micro-batches of whole pairs (row 2i chosen, 2i + 1 rejected).
struct PairObjective {
    loss: PairLoss,
    /// The reference's log-probabilities of the training sequences, by sequence.
    reference: Option<SeqLogps>,
}

impl PairObjective {
    /// Pair `i` of a scored batch: `logps` and `tokens` per row, the reference by source.
    fn pair(&self, i: usize, logps: &[f64], tokens: &[usize], sources: &[usize], reference: Option<&SeqLogps>) -> Pair {
        let seq = |r: usize| Seq {
            logp: logps[r],
            ref_logp: reference.map_or(0.0, |s| s.logps[sources[r]]),
            tokens: tokens[r],
        };
        Pair { chosen: seq(2 * i), rejected: seq(2 * i + 1) }
    }
}

impl Objective for PairObjective {
    fn units(&self, batch: &Batch) -> usize {
        batch.batch() / 2
    }
    fn loss(&mut self, model: &Model, _: &ParamMap, acts: &mut Activations, batch: &Batch, mean_over: usize) -> f64 {
        self.shard_loss(model, acts, batch, mean_over)
    }
    /// A sum over pairs, and a shard holds whole pairs (`shards` divides `batch_size`, in pairs).
    fn rows(&mut self, _: &Model, _: &ParamMap, _: &Batch) -> Option<&dyn RowLoss> {
        Some(self)
    }
}

impl RowLoss for PairObjective {
    fn shard_loss(&self, model: &Model, acts: &mut Activations, batch: &Batch, mean_over: usize) -> f64 {
        let (b, t, v) = (batch.batch(), batch.time(), model.cfg.vocab_size);
        let (logits, dlogits, row_loss) = acts.loss_buffers();
        // softmax - onehot on every target, which is -d log p(target) / d logits.
        cross_entropy_forward_backward(logits, &batch.targets, v, 0.0, 1.0, dlogits, row_loss);
        let (logps, tokens) = row_logps(row_loss, batch);
        let mut total = 0.0;
        for i in 0..b / 2 {
            let pair = self.pair(i, &logps, &tokens, &batch.source, self.reference.as_ref());
            let (l, g_chosen, g_rejected) = self.loss.loss(&pair);
            total += l;
            for (row, g) in [(2 * i, g_chosen), (2 * i + 1, g_rejected)] {
                let scale = (-g / mean_over.max(1) as f64) as f32;
                dlogits[row * t * v..(row + 1) * t * v].iter_mut().for_each(|d| *d *= scale);
            }
        }
        total
    }
}

/// KTO over micro-batches of examples (a pair's two sequences, or unpaired ones), with the
/// KL reference point from the same examples' mismatched sequences.
struct KtoObjective {
    loss: Kto,
    /// The reference's log-probabilities of the training sequences and of their mismatched
    /// ones, by sequence.
    reference: SeqLogps,
    kl: Rows,
    labels: Vec<u8>,
    /// The forward pass of the mismatched sequences, allocated at the first step.
    kl_pass: Option<(Activations, Batch)>,
    /// The KL reference point of the micro-batch being trained on.
    z0: f64,
}

/// Each row's summed log-probability of its targets and their count, from the per-token losses
/// a forward pass left.
fn row_logps(row_loss: &[f64], batch: &Batch) -> (Vec<f64>, Vec<usize>) {
    let t = batch.time();
    let logps = row_loss[..batch.rows()].chunks(t).map(|r| -r.iter().sum::<f64>()).collect();
    let tokens = batch.targets.chunks(t).map(|r| r.iter().filter(|x| **x != IGNORE).count()).collect();
    (logps, tokens)
}

/// KTO's KL reference point: the mean of the policy's minus the reference's log-probabilities of
/// mismatched sequences, clamped at 0.
fn kl_point(policy: &[f64], reference: impl Iterator<Item = f64>) -> f64 {
    let sum: f64 = policy.iter().zip(reference).map(|(p, r)| p - r).sum();
    (sum / policy.len().max(1) as f64).max(0.0)
}

impl KtoObjective {
    /// The KL reference point of `batch`'s examples, from a forward pass of their mismatched
    /// sequences.
    fn reference_point(&mut self, model: &Model, params: &ParamMap, batch: &Batch) -> f64 {
        let (b, t) = (batch.batch(), batch.time());
        let (kl_acts, kl_batch) =
            self.kl_pass.get_or_insert_with(|| (Activations::inference(model, b, t), Batch::new(b, t)));
        for (i, &source) in batch.source.iter().enumerate() {
            self.kl.copy_row(source, kl_batch, i);
        }
        model.target_losses(params, kl_batch, kl_acts);
        let (kl_logps, _) = row_logps(kl_acts.row_losses(), kl_batch);
        kl_point(&kl_logps, batch.source.iter().map(|&s| self.reference.kl_logps[s]))
    }
}

impl Objective for KtoObjective {
    fn units(&self, batch: &Batch) -> usize {
        batch.batch()
    }

    fn loss(
        &mut self,
        model: &Model,
        params: &ParamMap,
        acts: &mut Activations,
        batch: &Batch,
        mean_over: usize,
    ) -> f64 {
        self.z0 = self.reference_point(model, params, batch);
        self.shard_loss(model, acts, batch, mean_over)
    }
    /// A sum over examples once the micro-batch's reference point is known.
    fn rows(&mut self, model: &Model, params: &ParamMap, batch: &Batch) -> Option<&dyn RowLoss> {
        self.z0 = self.reference_point(model, params, batch);
        Some(self)
    }
}

impl RowLoss for KtoObjective {
    fn shard_loss(&self, model: &Model, acts: &mut Activations, batch: &Batch, mean_over: usize) -> f64 {
        let (t, v) = (batch.time(), model.cfg.vocab_size);
        let (logits, dlogits, row_loss) = acts.loss_buffers();
        cross_entropy_forward_backward(logits, &batch.targets, v, 0.0, 1.0, dlogits, row_loss);
        let (logps, tokens) = row_logps(row_loss, batch);
        let mut total = 0.0;
        for (row, &source) in batch.source.iter().enumerate() {
            let seq = Seq { logp: logps[row], ref_logp: self.reference.logps[source], tokens: tokens[row] };
            let (l, g) = self.loss.loss(&seq, self.z0, self.labels[source] == 1);
            total += l;
            let scale = (-g / mean_over.max(1) as f64) as f32;
            dlogits[row * t * v..(row + 1) * t * v].iter_mut().for_each(|d| *d *= scale);
        }
        total
    }
}

/// Training groups (pairs, or single examples) in a seeded order; the validation split scored
/// in order.
struct PrefData {
    train: PrefSplit,
    val: PrefSplit,
    /// Sequences per group: 2 for pairs, 1 for unpaired examples.
    group: usize,
    order: EpochOrder,
    dropout_seed: Option<u64>,
    val_batch: usize,
    val_ref: Option<SeqLogps>,
    loss: Loss,
    objective: Box<dyn Objective>,
}

impl TrainData for PrefData {
    fn start(&self) -> DataPos {
        DataPos { rng: 0, consumed: 0 }
    }
    fn fill(&mut self, pos: &mut DataPos, batch: &mut Batch) {
        let at = (pos.consumed + 1).wrapping_mul(0x9FB2_1C65_1E98_DF25);
        batch.dropout_seed = self.dropout_seed.map(|s| s ^ at);
        let g = self.group;
        for i in 0..batch.batch() / g {
            let first = g * self.order.row(pos.consumed, self.train.rows.rows / g);
            for k in 0..g {
                self.train.rows.copy_row(first + k, batch, g * i + k);
                batch.source[g * i + k] = first + k;
            }
            pos.consumed += 1;
        }
    }
    fn objective(&mut self) -> &mut dyn Objective {
        self.objective.as_mut()
    }
    fn validate(&mut self, model: &Model, params: &ParamMap, max_batches: usize) -> Result<Validation, StageError> {
        let g = self.group;
        let groups = (self.val.rows.rows / g).min(max_batches * self.val_batch.div_ceil(g).max(1));
        if groups == 0 {
            return Ok(Validation::loss(f64::NAN));
        }
        let first = |rows: &Rows, n: usize| Rows {
            t: rows.t,
            rows: n,
            ids: rows.ids[..n * rows.t].to_vec(),
            targets: rows.targets[..n * rows.t].to_vec(),
            pos: rows.pos[..n * rows.t].to_vec(),
        };
        let n = g * groups;
        let scored = sequence_logps(model, params, &first(&self.val.rows, n), self.val_batch, |_| Ok(()))?;
        let tokens: Vec<usize> = scored.tokens.iter().map(|n| *n as usize).collect();
        let reference = self.val_ref.as_ref();
        let seq = |r: usize| Seq {
            logp: scored.logps[r],
            ref_logp: reference.map_or(0.0, |s| s.logps[r]),
            tokens: tokens[r],
        };
        let mut figures = Vec::new();
        let mut sum = PairStats::default();
        let loss = match self.loss {
            Loss::Kto(kto) => {
                let kl = sequence_logps(model, params, &first(&self.val.kl, n), self.val_batch, |_| Ok(()))?;
                let reference = reference.expect("KTO has a reference");
                let z0 = kl_point(&kl.logps, reference.kl_logps[..n].iter().copied());
                let mut total = 0.0;
                let mut rewards = [(0.0, 0usize); 2];
                for r in 0..n {
                    let desirable = self.val.labels[r] == 1;
                    total += kto.loss(&seq(r), z0, desirable).0;
                    let slot = &mut rewards[usize::from(desirable)];
                    *slot = (slot.0 + kto.beta * seq(r).delta(), slot.1 + 1);
                }
                let mean = |(s, k): (f64, usize)| if k == 0 { f64::NAN } else { s / k as f64 };
                figures.push(("kl".to_string(), z0));
                figures.push(("rewards_chosen".to_string(), mean(rewards[1])));
                figures.push(("rewards_rejected".to_string(), mean(rewards[0])));
                total / n as f64
            }
            Loss::Pair(pair_loss) => {
                for i in 0..groups {
                    let pair = Pair { chosen: seq(2 * i), rejected: seq(2 * i + 1) };
                    sum.add(&pair_loss, &pair);
                }
                let k = groups as f64;
                figures.extend([
                    ("rewards_chosen".to_string(), sum.reward_chosen / k),
                    ("rewards_rejected".to_string(), sum.reward_rejected / k),
                    ("reward_accuracy".to_string(), sum.reward_correct / k),
                    ("reward_margin".to_string(), (sum.reward_chosen - sum.reward_rejected) / k),
                ]);
                sum.loss / k
            }
        };
        if g == 2 {
            let correct = (0..groups).filter(|i| scored.logps[2 * i] > scored.logps[2 * i + 1]).count();
            figures.push(("logp_accuracy".to_string(), correct as f64 / groups as f64));
            if let Some(reference) = reference {
                let kl: f64 = (0..groups).map(|i| scored.logps[2 * i] - reference.logps[2 * i]).sum();
                figures.push(("kl_chosen".to_string(), kl / groups as f64));
            }
        }
        Ok(Validation { loss, figures })
    }
}

/// Sums over validation pairs.
#[derive(Default)]
struct PairStats {
    loss: f64,
    reward_chosen: f64,
    reward_rejected: f64,
    reward_correct: f64,
}

impl PairStats {
    fn add(&mut self, loss: &PairLoss, pair: &Pair) {
        let (rc, rr) = loss.rewards(pair);
        self.loss += loss.loss(pair).0;
        self.reward_chosen += rc;
        self.reward_rejected += rr;
        self.reward_correct += f64::from(u8::from(rc > rr));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{assert_maps_close, check_relative};
    use crate::nn::model::ModelConfig;
    use crate::nn::step::step_at_lr_zero;

    /// The objective's gradient through the whole model matches finite differences of the
    /// pair loss computed from forward passes alone.
    #[test]
    fn pair_gradients_through_the_model_match_finite_differences() {
        let cfg = ModelConfig::llama(11, 6, 1, 2, 2, 8);
        let params = cfg.init(3);
        let model = Model::new(cfg, &params);
        let (b, t) = (4, 6);
        let mut batch = Batch::new(b, t);
        for r in 0..b {
            let (ids, targets, _) = batch.row_mut(r);
            for k in 0..t {
                ids[k] = ((r * 7 + k * 3) % 11) as u32;
                // A prompt of 2 positions, then the response; the last row is shorter.
                targets[k] = if k < 2 || (r == 3 && k == 5) { IGNORE } else { ((r + k * 5) % 11) as u32 };
            }
            batch.source[r] = r;
        }
        let reference = SeqLogps {
            logps: vec![-9.0, -11.0, -8.5, -7.0],
            tokens: vec![4, 4, 4, 3],
            kl_logps: vec![-20.0, -21.0, -19.0, -22.0],
        };
        let rows = Rows { t, rows: b, ids: batch.ids.clone(), targets: batch.targets.clone(), pos: batch.pos.clone() };
        for loss in [
            PairLoss::Ipo { beta: 0.5 },
            PairLoss::Simpo { beta: 2.0, gamma: 0.5, label_smoothing: 0.0 },
            PairLoss::Orpo { lambda: 0.5 },
            PairLoss::Dpo { beta: 2.0, label_smoothing: 0.1 },
        ] {
            let mut objective = PairObjective { loss, reference: Some(reference.clone()) };
            let mut acts = Activations::for_training(&model, b, t);
            let mut grads = params.zeros_like();
            model.forward(&params, &batch, &mut acts);
            let total = objective.loss(&model, &params, &mut acts, &batch, 2);
            model.backward(&params, &batch, &mut acts, &mut grads);
            let loss_of = |p: &ParamMap| {
                let s = sequence_logps(&model, p, &rows, b, |_| Ok(())).unwrap();
                let tokens: Vec<usize> = s.tokens.iter().map(|n| *n as usize).collect();
                let sources: Vec<usize> = (0..b).collect();
                (0..b / 2)
                    .map(|i| loss.loss(&objective.pair(i, &s.logps, &tokens, &sources, Some(&reference))).0)
                    .sum::<f64>()
                    / 2.0
            };
            assert!((total / 2.0 - loss_of(&params)).abs() < 1e-4, "{loss:?}: the objective's loss is the pairs'");
            for name in
                ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.norm.weight"]
            {
                check_relative(&format!("{name} ({loss:?})"), params.get(name), grads.get(name), |x| {
                    let mut p = params.clone();
                    p.get_mut(name).copy_from_slice(x);
                    loss_of(&p)
                });
            }
        }
    }

    /// Four rows of 6 tokens (a prompt of 2, then the response), each its own source, the
    /// mismatched sequences KTO's reference point reads, and the reference's log-probabilities.
    fn kto_fixture() -> (Batch, Rows, SeqLogps) {
        let (b, t) = (4, 6);
        let mut batch = Batch::new(b, t);
        let mut kl = Batch::new(b, t);
        for r in 0..b {
            for (x, shift) in [(&mut batch, 0), (&mut kl, 5)] {
                let (ids, targets, _) = x.row_mut(r);
                for k in 0..t {
                    ids[k] = ((r * 7 + k * 3 + shift) % 11) as u32;
                    targets[k] = if k < 2 { IGNORE } else { ((r + k * 5 + shift) % 11) as u32 };
                }
            }
            batch.source[r] = r;
        }
        let reference = SeqLogps {
            logps: vec![-9.0, -11.0, -8.5, -7.0],
            tokens: vec![4; 4],
            kl_logps: vec![-20.0, -21.0, -19.0, -22.0],
        };
        (batch, as_rows(&kl), reference)
    }

    /// KTO with desirable and undesirable examples alternating, over the fixture's sequences.
    fn kto_objective(kl: &Rows, reference: &SeqLogps) -> KtoObjective {
        KtoObjective {
            loss: Kto { beta: 0.3, desirable_weight: 1.0, undesirable_weight: 1.5 },
            reference: reference.clone(),
            kl: kl.clone(),
            labels: vec![1, 0, 1, 0],
            kl_pass: None,
            z0: 0.0,
        }
    }

    fn as_rows(x: &Batch) -> Rows {
        Rows { t: x.time(), rows: x.batch(), ids: x.ids.clone(), targets: x.targets.clone(), pos: x.pos.clone() }
    }

    /// KTO's gradient through the model, its KL reference point held fixed (it is detached).
    #[test]
    fn kto_gradients_through_the_model_match_finite_differences() {
        let cfg = ModelConfig::llama(11, 6, 1, 2, 2, 8);
        let params = cfg.init(4);
        let model = Model::new(cfg, &params);
        let (batch, kl_rows, reference) = kto_fixture();
        let (b, t) = (batch.batch(), batch.time());
        let rows = as_rows(&batch);
        let mut objective = kto_objective(&kl_rows, &reference);
        let (kto, labels) = (objective.loss, objective.labels.clone());
        let mut acts = Activations::for_training(&model, b, t);
        let mut grads = params.zeros_like();
        model.forward(&params, &batch, &mut acts);
        let total = objective.loss(&model, &params, &mut acts, &batch, b);
        model.backward(&params, &batch, &mut acts, &mut grads);
        let z0 = kl_point(
            &sequence_logps(&model, &params, &kl_rows, b, |_| Ok(())).unwrap().logps,
            reference.kl_logps.iter().copied(),
        );
        assert!(z0 > 0.0, "the test's reference puts the KL point above the clamp");
        let loss_of = |p: &ParamMap| {
            let s = sequence_logps(&model, p, &rows, b, |_| Ok(())).unwrap();
            (0..b)
                .map(|r| {
                    let seq = Seq { logp: s.logps[r], ref_logp: reference.logps[r], tokens: s.tokens[r] as usize };
                    kto.loss(&seq, z0, labels[r] == 1).0
                })
                .sum::<f64>()
                / b as f64
        };
        assert!((total / b as f64 - loss_of(&params)).abs() < 1e-5);
        for name in
            ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.norm.weight"]
        {
            check_relative(name, params.get(name), grads.get(name), |x| {
                let mut p = params.clone();
                p.get_mut(name).copy_from_slice(x);
                loss_of(&p)
            });
        }
    }

    /// DPO over pairs and KTO over examples, in 2 shards of whole pairs: the loss and gradients
    /// of one pass up to rounding (KTO's reference point taken over the whole micro-batch).
    #[test]
    fn preference_steps_in_shards_compute_what_one_pass_does() {
        let cfg = ModelConfig::llama(11, 6, 1, 2, 2, 8);
        let params = cfg.init(5);
        let model = Model::new(cfg, &params);
        let (batch, kl, reference) = kto_fixture();
        let kto = || kto_objective(&kl, &reference);
        let dpo = || PairObjective {
            loss: PairLoss::Dpo { beta: 2.0, label_smoothing: 0.1 },
            reference: Some(reference.clone()),
        };
        for (what, objectives) in [
            ("dpo", [Box::new(dpo()) as Box<dyn Objective>, Box::new(dpo())]),
            ("kto", [Box::new(kto()) as Box<dyn Objective>, Box::new(kto())]),
        ] {
            let [mut one, mut two] = objectives;
            let (loss, whole) = step_at_lr_zero(
                &model,
                &params,
                &params,
                std::slice::from_ref(&batch),
                LossMean::PerStep,
                1,
                one.as_mut(),
            );
            let (sharded_loss, sharded) = step_at_lr_zero(
                &model,
                &params,
                &params,
                std::slice::from_ref(&batch),
                LossMean::PerStep,
                2,
                two.as_mut(),
            );
            assert!((loss - sharded_loss).abs() <= 1e-6 * loss.abs(), "{what}: {loss} vs {sharded_loss}");
            assert_maps_close(what, &whole, &sharded, 1e-5);
        }
    }
}
