//! `sft`: supervised fine-tuning of a model on instruction examples, in full or with LoRA
//! adapters (rsLoRA, LoRA+, LoRA-FA, DoRA, PiSSA's start), with NEFTune.
//!
//! Examples are packed whole into rows of `seq_len` positions (first-fit decreasing; an
//! example is never split across rows) with block-diagonal attention and positions restarting
//! in each example, so a packed example trains exactly as it would alone; `packing = false`
//! gives each example a row of its own. The loss counts response tokens only (unless
//! `train_on_prompt`) and averages over every counted token of a step.
//!
//! Output: the model with any adapter merged in, in `pretrain`'s layout (so `evaluate`,
//! `sample` and later stages take it as it is), the template of the examples, and with an
//! adapter, `adapter/` in PEFT's layout (`adapter_config.json`, `adapter_model.safetensors`).

use std::collections::{BTreeMap, BTreeSet};

use engine::{Accepts, InputSpec, Metrics, ParamProblem, ParamSpec, Params, Stage, StageCtx, StageError};
use serde_json::json;

use crate::adapters::{check_lora, check_lora_targets, FineTune, Setup, LORA_PARAMS};
use crate::arrow_io::{read_examples, TokenMeta};
use crate::batches::EpochOrder;
use crate::checkpoint::DataPos;
use crate::example_rows::{rows_loss, Layout, Rows};
use crate::instructions::{TEMPLATE_FILE, TRAIN_FILE, VAL_FILE};
use crate::model_io::{model_over_data, save_model, ModelOverData, TOKENIZER};
use crate::nn::batch::{Batch, EmbeddingNoise};
use crate::nn::model::Model;
use crate::nn::params::ParamMap;
use crate::nn::step::{CrossEntropy, LossMean, Objective};
use crate::train::{self, check_train_params, TrainData, TrainSpec, Trainee, Validation, METRICS_FILE, TRAIN_PARAMS};
use crate::{concat_params, fail, round, EXAMPLES, MODEL};

pub struct Sft;

pub use crate::adapters::ADAPTER_DIR;

const OWN_PARAMS: [ParamSpec; 6] = [
    ParamSpec::int("seq_len", 256, 2, 1 << 20, "positions per row (at most the model's block size)"),
    ParamSpec::bool(
        "packing",
        true,
        "pack whole examples into rows (first-fit decreasing); false: one example per row",
    ),
    ParamSpec::choice(
        "overlong",
        "truncate",
        &["truncate", "drop"],
        "an example longer than seq_len + 1 tokens is cut to fit (`truncate`) or left out (`drop`)",
    ),
    ParamSpec::bool("train_on_prompt", false, "the loss counts the prompt's tokens too"),
    ParamSpec::float(
        "neftune_alpha",
        0.0,
        0.0,
        1e3,
        "NEFTune: uniform noise of alpha / sqrt(L d) on the input embeddings (0: off)",
    ),
    ParamSpec::int("val_batch_size", 16, 1, 1 << 20, "rows per validation forward pass").not_hashed(),
];

const PARAMS: &[ParamSpec] =
    &concat_params::<16, 21, 37>(concat_params::<6, 10, 16>(OWN_PARAMS, LORA_PARAMS), TRAIN_PARAMS);

const INPUTS: &[InputSpec] = &[
    InputSpec {
        name: "model",
        accepts: Accepts::Artifact(&[MODEL]),
        required: true,
        doc: "the model to fine-tune (`pretrain` or another `sft`)",
    },
    InputSpec {
        name: "data",
        accepts: Accepts::Artifact(&[EXAMPLES]),
        required: true,
        doc: "an `instructions` stage made with the same model's tokenizer",
    },
];

impl Stage for Sft {
    fn kind(&self) -> &'static str {
        "sft"
    }
    fn version(&self) -> u32 {
        // 2: attention's products in bf16 when precision = "bf16"; 3: LoRA gradients summed by
        // blocks of rows; 4: in f32, blocks of up to 256 rows; 5: DoRA's too; 6: adapters'
        // rank-r products by their own kernels
        6
    }
    fn about(&self) -> &'static str {
        "fine-tune a model on instruction examples, in full or with LoRA adapters, packed without cross-talk"
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
        &["model", "data"]
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

    fn check(&self, p: &Params, _connected: &BTreeSet<&str>) -> Result<(), ParamProblem> {
        check_train_params(p)?;
        check_lora(p)
    }

    fn check_shapes(&self, p: &Params, upstream: &BTreeMap<&str, &serde_json::Value>) -> Result<(), ParamProblem> {
        let seq_len = p.usize("seq_len");
        if let Some(block_size) = crate::told(upstream, "model", "block_size").filter(|b| seq_len > *b) {
            return Err(ParamProblem::new("seq_len", too_long(seq_len, block_size)));
        }
        check_lora_targets(p, upstream)
    }
    /// The model keeps its input's shape (adapters merge into the same matrices).
    fn output_shape(&self, _: &Params, upstream: &BTreeMap<&str, &serde_json::Value>) -> serde_json::Value {
        crate::quantize::shape_of_input(upstream, "model")
    }
    fn run(&self, ctx: &StageCtx<'_>) -> Result<Metrics, StageError> {
        let p = ctx.params();
        let ModelOverData { cfg, mut params, eot, data, .. } = model_over_data(ctx)?;
        let seq_len = p.usize("seq_len");
        if seq_len > cfg.block_size {
            return Err(StageError::msg(too_long(seq_len, cfg.block_size)));
        }
        let layout = Layout {
            t: seq_len,
            packing: p.bool("packing"),
            drop_overlong: p.str("overlong") == "drop",
            train_on_prompt: p.bool("train_on_prompt"),
            eot,
        };
        let (train_rows, stats) = layout.pack(&read_examples(&data.path(TRAIN_FILE))?);
        let (val_rows, _) = layout.pack(&read_examples(&data.path(VAL_FILE))?);
        if train_rows.rows == 0 {
            return Err(StageError::msg("no training example fits: raise `seq_len` or set overlong = \"truncate\""));
        }

        let Setup { tune, model, grads, opts } = FineTune::setup(p, &cfg, &mut params, ctx.seed())?;
        let dropout = tune.dropout;
        let trainable_count = grads.num_elements();
        let spec = TrainSpec::from_params(p, seq_len, LossMean::PerStep);
        let alpha = p.float("neftune_alpha") as f32;
        let mut data_source = ExampleData {
            train: train_rows,
            val: val_rows,
            order: EpochOrder::new(ctx.seed()),
            noise: (alpha > 0.0).then_some(EmbeddingNoise { alpha, seed: ctx.seed() }),
            dropout_seed: (dropout > 0.0).then_some(ctx.seed() ^ 0x4452_4F50_4F55_5421),
            val_batch: p.usize("val_batch_size"),
            objective: CrossEntropy { z_loss: spec.z_loss },
        };
        let trainee = Trainee { model, fresh: params, grads, opts };
        let outcome = train::train(ctx, &spec, trainee, &mut data_source)?;

        let merged = tune.finish(ctx, &cfg, &outcome.state.params)?;
        save_model(ctx.out_dir(), &cfg, &merged, eot)?;
        for file in [TOKENIZER, TEMPLATE_FILE] {
            std::fs::copy(data.path(file), ctx.out(file)).map_err(|e| fail(format!("copying {file}"))(&e))?;
        }
        TokenMeta { vocab_size: cfg.vocab_size as u32, eot_id: eot, seq_len: Some(seq_len) }.write(ctx.out_dir())?;
        outcome.write_log(ctx)?;

        let mut metrics = outcome.metrics();
        metrics.extend([
            ("trainable_parameters".into(), json!(trainable_count)),
            ("examples".into(), json!(stats.examples)),
            ("truncated".into(), json!(stats.truncated)),
            ("dropped".into(), json!(stats.dropped)),
            ("rows".into(), json!(stats.rows)),
            ("packing_efficiency".into(), json!(round(stats.efficiency(seq_len), 4))),
        ]);
        Ok(metrics)
    }
}

/// Packed training rows in a seeded order, and the validation rows in theirs.
struct ExampleData {
    train: Rows,
    val: Rows,
    order: EpochOrder,
    noise: Option<EmbeddingNoise>,
    /// Adapter dropout's seed, when there is dropout.
    dropout_seed: Option<u64>,
    val_batch: usize,
    objective: CrossEntropy,
}

impl TrainData for ExampleData {
    fn start(&self) -> DataPos {
        DataPos { rng: 0, consumed: 0 }
    }
    fn fill(&mut self, pos: &mut DataPos, batch: &mut Batch) {
        // Each micro-batch's noise and dropout come from the seed and where the data stands.
        let at = (pos.consumed + 1).wrapping_mul(0x9FB2_1C65_1E98_DF25);
        batch.noise = self.noise.map(|n| EmbeddingNoise { seed: n.seed ^ at, ..n });
        batch.dropout_seed = self.dropout_seed.map(|s| s ^ at);
        for i in 0..batch.batch() {
            let r = self.order.row(pos.consumed, self.train.rows);
            self.train.copy_row(r, batch, i);
            pos.consumed += 1;
        }
    }
    fn objective(&mut self) -> &mut dyn Objective {
        &mut self.objective
    }
    fn validate(&mut self, model: &Model, params: &ParamMap, max_batches: usize) -> Result<Validation, StageError> {
        Ok(Validation::loss(rows_loss(model, params, &self.val, self.val_batch, Some(max_batches), |_| Ok(()))?.0))
    }
}

/// `seq_len` longer than the model's block size.
fn too_long(seq_len: usize, block_size: usize) -> String {
    format!("seq_len {seq_len} is longer than the model's block size {block_size}: lower `seq_len`")
}
