//! `align`: preference tuning of a policy on pairs from a `preferences` stage, with DPO
//! (cDPO's label smoothing), IPO, SimPO or ORPO, in full or through LoRA adapters.
//!
//! DPO and IPO compare the policy with a frozen reference whose log-probabilities a
//! `reference` stage computed once: wiring it is required for them (checked when the recipe is
//! resolved) and optional for SimPO and ORPO, which then report the KL to it. A step's
//! micro-batch holds whole pairs, chosen and rejected in neighbouring rows; the loss averages
//! over the pairs of the step. At every evaluation the validation pairs give the loss, the
//! mean rewards of chosen and rejected, reward accuracy and margin, the policy's log-prob
//! preference accuracy, and with a reference the KL to it (the mean log-ratio on chosen).
//!
//! Output: the model with any adapter merged in, in `pretrain`'s layout, and with an adapter,
//! `adapter/` in PEFT's layout.

use std::collections::BTreeSet;

use engine::{Accepts, Input, InputSpec, Metrics, ParamProblem, ParamSpec, Params, Stage, StageCtx, StageError};
use serde_json::json;

use crate::adapters::{check_lora, FineTune, Setup, LORA_PARAMS};
use crate::arrow_io::TokenMeta;
use crate::batches::EpochOrder;
use crate::checkpoint::DataPos;
use crate::example_rows::Rows;
use crate::instructions::TEMPLATE_FILE;
use crate::model_io::{load_model_with_eot, require_same_tokenizer, save_model, TOKENIZER};
use crate::nn::batch::{Batch, IGNORE};
use crate::nn::kernels::cross_entropy::cross_entropy_forward_backward;
use crate::nn::model::{Activations, Model};
use crate::nn::params::ParamMap;
use crate::nn::preference::{Pair, PairLoss, Seq};
use crate::nn::step::{LossMean, Objective};
use crate::preferences::{TRAIN_FILE, VAL_FILE};
use crate::reference::{load_reference, pair_rows, sequence_logps, SeqLogps};
use crate::train::{self, check_lrs, TrainData, TrainSpec, Trainee, Validation, METRICS_FILE, TRAIN_PARAMS};
use crate::{concat_params, fail, MODEL, PREFERENCES, REFERENCE};

pub struct Align;

const LOSSES: &[&str] = &["dpo", "ipo", "simpo", "orpo"];

const OWN_PARAMS: [ParamSpec; 6] = [
    ParamSpec::choice(
        "loss",
        "dpo",
        LOSSES,
        "`dpo`, `ipo` (both need a reference), `simpo` (length-normalised, no reference) or `orpo` (odds ratio plus SFT on chosen, no reference)",
    ),
    ParamSpec::opt_float("beta", 0.0, 1e4, "the loss's beta (default 0.1 for DPO and IPO, 2.0 for SimPO)"),
    ParamSpec::float("gamma", 1.0, -1e4, 1e4, "simpo: the target reward margin"),
    ParamSpec::float("label_smoothing", 0.0, 0.0, 0.5, "dpo, simpo: the assumed share of flipped labels (cDPO)"),
    ParamSpec::float("orpo_lambda", 0.1, 0.0, 1e4, "orpo: weight of the odds-ratio term beside SFT on chosen"),
    ParamSpec::int("val_batch_size", 16, 1, 1 << 20, "sequences per validation forward pass").not_hashed(),
];

const PARAMS: &[ParamSpec] =
    &concat_params::<16, 18, 34>(concat_params::<6, 10, 16>(OWN_PARAMS, LORA_PARAMS), TRAIN_PARAMS);

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
        doc: "a `reference` stage over the same data: required by dpo and ipo",
    },
];

/// The loss the parameters ask for.
fn pair_loss(p: &Params) -> PairLoss {
    let beta = |default: f64| p.opt_float("beta").unwrap_or(default);
    let smoothing = p.float("label_smoothing");
    match p.str("loss") {
        "ipo" => PairLoss::Ipo { beta: beta(0.1) },
        "simpo" => PairLoss::Simpo { beta: beta(2.0), gamma: p.float("gamma"), label_smoothing: smoothing },
        "orpo" => PairLoss::Orpo { lambda: p.float("orpo_lambda") },
        _ => PairLoss::Dpo { beta: beta(0.1), label_smoothing: smoothing },
    }
}

impl Stage for Align {
    fn kind(&self) -> &'static str {
        "align"
    }
    fn version(&self) -> u32 {
        1
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

    fn check(&self, p: &Params, connected: &BTreeSet<&str>) -> Result<(), ParamProblem> {
        check_lrs(p)?;
        check_lora(p)?;
        let loss = pair_loss(p);
        if loss.uses_reference() && !connected.contains("reference") {
            return Err(ParamProblem::new(
                "loss",
                format!(
                    "loss \"{}\" compares the policy with a reference: wire `reference` to a `reference` stage",
                    p.str("loss")
                ),
            ));
        }
        if matches!(loss, PairLoss::Ipo { beta } if beta == 0.0) {
            return Err(ParamProblem::new("beta", "IPO's target margin is 1 / (2 beta): beta must be above 0"));
        }
        Ok(())
    }

    fn run(&self, ctx: &StageCtx<'_>) -> Result<Metrics, StageError> {
        let (
            Input::Artifact { artifact: model_dir, stage: model_stage, .. },
            Input::Artifact { artifact: data, stage: data_stage, .. },
        ) = (ctx.required_input("model"), ctx.required_input("data"))
        else {
            unreachable!("both slots accept only artifacts");
        };
        let p = ctx.params();
        let (cfg, mut params, eot) = load_model_with_eot(&model_dir.dir)?;
        require_same_tokenizer((model_dir, model_stage), (data, data_stage))?;
        let reference = match ctx.input("reference") {
            Some(Input::Artifact { artifact: reference, stage: reference_stage, .. }) => {
                Some(load_reference((reference, reference_stage), (data, data_stage))?)
            }
            _ => None,
        };
        let train_rows = pair_rows(&data.dir, TRAIN_FILE, eot, cfg.block_size)?;
        let val_rows = pair_rows(&data.dir, VAL_FILE, eot, cfg.block_size)?;
        let t = train_rows.t;
        let loss = pair_loss(p);
        let Setup { tune, model, grads, opts } = FineTune::setup(p, &cfg, &mut params, ctx.seed())?;
        let trainable_count = grads.num_elements();
        let mut spec = TrainSpec::from_params(p, t, LossMean::PerStep);
        let pairs_per_batch = spec.batch;
        spec.batch *= 2; // rows: a chosen and a rejected sequence per pair
        let (train_ref, val_ref) = reference.map_or((None, None), |(t, v)| (Some(t), Some(v)));
        let mut source = PairData {
            train: train_rows,
            val: val_rows,
            order: EpochOrder::new(ctx.seed()),
            dropout_seed: (tune.dropout > 0.0).then_some(ctx.seed() ^ 0x4452_4F50_4F55_5421),
            val_batch: p.usize("val_batch_size"),
            val_ref,
            objective: PairObjective { loss, reference: train_ref },
        };
        let n_pairs = source.train.rows / 2;
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
            ("train_pairs".into(), json!(n_pairs)),
            ("pairs_per_step".into(), json!(pairs_per_batch * spec.accum)),
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
        let (b, t, v) = (batch.batch(), batch.time(), model.cfg.vocab_size);
        let (logits, dlogits, row_loss) = acts.loss_buffers();
        // softmax - onehot on every target, which is -d log p(target) / d logits.
        cross_entropy_forward_backward(logits, &batch.targets, v, 0.0, 1.0, dlogits, row_loss);
        let logps: Vec<f64> = row_loss[..b * t].chunks(t).map(|r| -r.iter().sum::<f64>()).collect();
        let tokens: Vec<usize> = batch.targets.chunks(t).map(|r| r.iter().filter(|x| **x != IGNORE).count()).collect();
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

/// Training pairs in a seeded order; the validation pairs scored in order.
struct PairData {
    train: Rows,
    val: Rows,
    order: EpochOrder,
    dropout_seed: Option<u64>,
    val_batch: usize,
    val_ref: Option<SeqLogps>,
    objective: PairObjective,
}

impl TrainData for PairData {
    fn start(&self) -> DataPos {
        DataPos { rng: 0, consumed: 0 }
    }
    fn fill(&mut self, pos: &mut DataPos, batch: &mut Batch) {
        let at = (pos.consumed + 1).wrapping_mul(0x9FB2_1C65_1E98_DF25);
        batch.dropout_seed = self.dropout_seed.map(|s| s ^ at);
        for i in 0..batch.batch() / 2 {
            let pair = self.order.row(pos.consumed, self.train.rows / 2);
            for side in 0..2 {
                self.train.copy_row(2 * pair + side, batch, 2 * i + side);
                batch.source[2 * i + side] = 2 * pair + side;
            }
            pos.consumed += 1;
        }
    }
    fn objective(&mut self) -> &mut dyn Objective {
        &mut self.objective
    }
    fn validate(&mut self, model: &Model, params: &ParamMap, max_batches: usize) -> Result<Validation, StageError> {
        let pairs = (self.val.rows / 2).min(max_batches * self.val_batch.div_ceil(2).max(1));
        if pairs == 0 {
            return Ok(Validation::loss(f64::NAN));
        }
        let rows = Rows {
            t: self.val.t,
            rows: 2 * pairs,
            ids: self.val.ids[..2 * pairs * self.val.t].to_vec(),
            targets: self.val.targets[..2 * pairs * self.val.t].to_vec(),
            pos: self.val.pos[..2 * pairs * self.val.t].to_vec(),
        };
        let scored = sequence_logps(model, params, &rows, self.val_batch, |_| Ok(()))?;
        let tokens: Vec<usize> = scored.tokens.iter().map(|n| *n as usize).collect();
        let sources: Vec<usize> = (0..2 * pairs).collect();
        let loss = self.objective.loss;
        let mut sum = PairStats::default();
        for i in 0..pairs {
            let pair = self.objective.pair(i, &scored.logps, &tokens, &sources, self.val_ref.as_ref());
            sum.add(&loss, &pair);
        }
        let n = pairs as f64;
        let mut figures = vec![
            ("rewards_chosen".to_string(), sum.reward_chosen / n),
            ("rewards_rejected".to_string(), sum.reward_rejected / n),
            ("reward_accuracy".to_string(), sum.reward_correct / n),
            ("reward_margin".to_string(), (sum.reward_chosen - sum.reward_rejected) / n),
            ("logp_accuracy".to_string(), sum.logp_correct / n),
        ];
        if self.val_ref.is_some() {
            figures.push(("kl_chosen".to_string(), sum.kl / n));
        }
        Ok(Validation { loss: sum.loss / n, figures })
    }
}

/// Sums over validation pairs.
#[derive(Default)]
struct PairStats {
    loss: f64,
    reward_chosen: f64,
    reward_rejected: f64,
    reward_correct: f64,
    logp_correct: f64,
    kl: f64,
}

impl PairStats {
    fn add(&mut self, loss: &PairLoss, pair: &Pair) {
        let (rc, rr) = loss.rewards(pair);
        self.loss += loss.loss(pair).0;
        self.reward_chosen += rc;
        self.reward_rejected += rr;
        self.reward_correct += f64::from(u8::from(rc > rr));
        self.logp_correct += f64::from(u8::from(pair.chosen.logp > pair.rejected.logp));
        self.kl += pair.chosen.delta();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::check_relative;
    use crate::nn::model::ModelConfig;

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
        let reference = SeqLogps { logps: vec![-9.0, -11.0, -8.5, -7.0], tokens: vec![4, 4, 4, 3] };
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
                let rows =
                    Rows { t, rows: b, ids: batch.ids.clone(), targets: batch.targets.clone(), pos: batch.pos.clone() };
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
}
