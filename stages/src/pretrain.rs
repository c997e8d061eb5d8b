//! `pretrain`: train a gpt2 or llama model from scratch on packed blocks.
//!
//! AdamW (weight decay on matrices only), warmup then cosine or warmup-stable-decay, clipping
//! by global norm, gradient accumulation, optional z-loss, and a batch order fixed by the seed.
//! Every `checkpoint_interval` steps (and on Ctrl-C) the whole training state goes to the work
//! directory; a rerun resumes from it and ends bit-identical to an uninterrupted run.
//!
//! Output: `model.safetensors`, `config.json` and `tokenizer.json` (a directory Hugging Face
//! `transformers` loads), `meta.json`, and `metrics.jsonl` with one line per logged step and
//! per evaluation. `metrics.jsonl` holds wall-clock figures and follows the unhashed
//! `log_interval` and `eval_interval`, so it is a volatile output: left out of the content
//! digest, which the weights and the other files determine.

use std::collections::{BTreeMap, BTreeSet};

use engine::{Accepts, Input, InputSpec, Metrics, ParamProblem, ParamSpec, Params, Stage, StageCtx, StageError};
use serde_json::json;

use crate::arrow_io::{read_blocks, Blocks, TokenMeta};
use crate::batches::{mean_loss, Sampler, SamplerKind};
use crate::checkpoint::DataPos;
use crate::model_io::{save_model, TOKENIZER};
use crate::nn::batch::Batch;
use crate::nn::model::{Activations, Gelu, Model, ModelConfig};
use crate::nn::optim::TensorOpt;
use crate::nn::params::ParamMap;
use crate::nn::step::{CrossEntropy, LossMean, Objective};
use crate::pack::{TRAIN_FILE, VAL_FILE};
use crate::train::{self, check_train_params, TrainData, TrainSpec, Trainee, Validation, TRAIN_PARAMS};
use crate::{concat_params, fail, MODEL, PACKED};

pub struct Pretrain;

use crate::train::METRICS_FILE;

/// The shape of a model trained from scratch (`pretrain`, and `distill` without `init`).
pub(crate) const MODEL_PARAMS: [ParamSpec; 11] = [
    ParamSpec::choice("arch", "gpt2", &["gpt2", "llama"], "`gpt2` (nanoGPT's model) or `llama`"),
    ParamSpec::int("n_layer", 4, 1, 1024, "transformer blocks"),
    ParamSpec::int("n_head", 4, 1, 1024, "attention heads"),
    ParamSpec::opt_int("n_kv_head", 1, 1024, "llama: key/value heads (default n_head; 1 is multi-query)"),
    ParamSpec::int("n_embd", 128, 2, 65536, "model width"),
    ParamSpec::opt_int("block_size", 1, 1 << 20, "longest sequence the model accepts (default: the data's seq_len)"),
    ParamSpec::opt_int(
        "ffn_hidden",
        1,
        1 << 20,
        "MLP width (default 4 n_embd for gpt2, 8/3 n_embd rounded up to 32 for llama)",
    ),
    ParamSpec::bool("bias", false, "gpt2: biases in linear layers and LayerNorms"),
    ParamSpec::choice(
        "activation",
        "gelu_new",
        &["gelu_new", "gelu"],
        "gpt2: `gelu_new` (GPT-2's tanh approximation) or `gelu` (exact, with erf: PyTorch's `nn.GELU`, as nanoGPT)",
    ),
    ParamSpec::bool("tie_embeddings", true, "llama: the output projection is the token embedding (gpt2 always ties)"),
    ParamSpec::float("rope_theta", 10_000.0, 1.0, 1e9, "llama: rotary embedding base"),
];

const OWN_PARAMS: [ParamSpec; 12] = concat_params::<11, 1, 12>(
    MODEL_PARAMS,
    [ParamSpec::choice(
        "sampler",
        "blocks",
        &["blocks", "windows"],
        "`blocks`: packed blocks in a seeded shuffled order; `windows`: random windows of the token stream (nanoGPT)",
    )],
);

const PARAMS: &[ParamSpec] = &concat_params::<12, 21, 33>(OWN_PARAMS, TRAIN_PARAMS);

const INPUTS: &[InputSpec] =
    &[InputSpec { name: "data", accepts: Accepts::Artifact(&[PACKED]), required: true, doc: "a `pack` stage" }];

/// The model a recipe asks for; the data supplies the vocabulary and the default block size.
pub(crate) fn model_config(p: &Params, vocab_size: usize, seq_len: usize) -> ModelConfig {
    let (layers, heads, embd) = (p.usize("n_layer"), p.usize("n_head"), p.usize("n_embd"));
    let block = p.opt_usize("block_size").unwrap_or(seq_len);
    let mut cfg = match p.str("arch") {
        "llama" => {
            let mut cfg =
                ModelConfig::llama(vocab_size, block, layers, heads, p.opt_usize("n_kv_head").unwrap_or(heads), embd);
            cfg.rope_theta = p.float("rope_theta") as f32;
            cfg.bias = p.bool("bias"); // `check` refuses true: llama has no biases
            cfg
        }
        _ => {
            let mut cfg = ModelConfig::gpt2(vocab_size, block, layers, heads, embd, p.bool("bias"));
            cfg.n_kv_head = p.opt_usize("n_kv_head").unwrap_or(heads);
            cfg
        }
    };
    if let Some(f) = p.opt_usize("ffn_hidden") {
        cfg.ffn_hidden = f;
    }
    // `check` refuses false for gpt2, and the exact GELU for llama (the choice's values are
    // Hugging Face's names).
    cfg.tie_embeddings = p.bool("tie_embeddings");
    cfg.gelu = Gelu::from_hf_name(p.str("activation")).expect("a declared choice");
    cfg
}

impl Stage for Pretrain {
    fn kind(&self) -> &'static str {
        "pretrain"
    }
    fn version(&self) -> u32 {
        6 // 2: GELU through one exp, dot products in eight partial sums; 3: attention as matrix products; 4: exp without libm in GELU and SiLU; 5: attention in query blocks with exp_fast, norm statistics in four f64 lanes; 6: attention's products in bf16 when precision = "bf16"
    }
    fn about(&self) -> &'static str {
        "train a gpt2 or llama model from scratch on packed blocks, with checkpoints and exact resume"
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
        engine::Vocabulary::From("data")
    }
    fn uses_seed(&self) -> bool {
        true
    }
    fn volatile_outputs(&self) -> &'static [&'static str] {
        &[METRICS_FILE]
    }
    /// With `schedule = "wsd"`, a longer run continues from a shorter one's state at the end
    /// of its stable phase (the sampler's order and the learning rate up to there do not
    /// depend on `max_steps`).
    fn run_length_params(&self) -> &'static [&'static str] {
        &["max_steps"]
    }

    fn check(&self, p: &Params, _connected: &BTreeSet<&str>) -> Result<(), ParamProblem> {
        let cfg = model_config(p, 2, p.opt_usize("block_size").unwrap_or(1));
        if let Some((key, problem)) = cfg.problem() {
            return Err(ParamProblem::new(key, problem));
        }
        check_train_params(p)
    }

    /// A `block_size` the recipe sets shorter than the data's `seq_len` is refused before
    /// anything runs.
    fn check_shapes(&self, p: &Params, upstream: &BTreeMap<&str, &serde_json::Value>) -> Result<(), ParamProblem> {
        match (p.opt_usize("block_size"), crate::told(upstream, "data", "seq_len")) {
            (Some(block_size), Some(seq_len)) if block_size < seq_len => {
                Err(ParamProblem::new("block_size", block_too_short(block_size, seq_len)))
            }
            _ => Ok(()),
        }
    }
    /// The widths, and the block size: the parameter, else the data's `seq_len`.
    fn output_shape(&self, p: &Params, upstream: &BTreeMap<&str, &serde_json::Value>) -> serde_json::Value {
        planned_shape(p, crate::told(upstream, "data", "seq_len"))
    }
    fn run(&self, ctx: &StageCtx<'_>) -> Result<Metrics, StageError> {
        let Input::Artifact { artifact, .. } = ctx.required_input("data") else {
            unreachable!("`data` accepts only artifacts");
        };
        let p = ctx.params();
        let meta = TokenMeta::read(&artifact.dir)?;
        let seq_len = meta.seq_len.ok_or_else(|| StageError::msg("the data's meta.json has no seq_len"))?;
        let cfg = model_config(p, meta.vocab_size as usize, seq_len);
        if cfg.block_size < seq_len {
            return Err(StageError::msg(block_too_short(cfg.block_size, seq_len)));
        }
        let train = read_blocks(&artifact.path(TRAIN_FILE))?;
        let val = read_blocks(&artifact.path(VAL_FILE))?;
        assert_eq!(train.width, seq_len + 1, "pack writes blocks of seq_len + 1");
        let kind = if p.str("sampler") == "windows" { SamplerKind::Windows } else { SamplerKind::Blocks };
        if kind == SamplerKind::Windows && !Sampler::windows_fit(&train) {
            return Err(StageError::msg(format!(
                "random windows need seq_len + 1 = {} training tokens that are not padding, and the data has {}: lower `pack.seq_len` or use sampler = \"blocks\"",
                seq_len + 1,
                train.stream_len()
            )));
        }
        let spec = TrainSpec::from_params(p, seq_len, LossMean::PerMicroBatch);
        let fresh = cfg.init(ctx.seed());
        let trainee = Trainee {
            model: Model::new(cfg, &fresh),
            grads: fresh.zeros_like(),
            opts: TensorOpt::defaults(&fresh),
            fresh,
        };
        let val_batch = spec.batch.min(val.rows()).max(1);
        let mut data = BlockData {
            sampler: Sampler::new(kind, train, ctx.seed()),
            val,
            val_batch,
            objective: CrossEntropy { z_loss: spec.z_loss },
        };
        let outcome = train::train(ctx, &spec, trainee, &mut data)?;

        save_model(ctx.out_dir(), &cfg, &outcome.state.params, meta.eot_id)?;
        std::fs::copy(artifact.path(TOKENIZER), ctx.out(TOKENIZER)).map_err(|e| fail("copying tokenizer.json")(&e))?;
        meta.write(ctx.out_dir())?;
        outcome.write_log(ctx)?;

        let tokens = outcome.state.progress.step * (spec.batch * spec.accum * seq_len) as u64;
        let mut metrics = outcome.metrics();
        metrics.insert("parameters".into(), json!(outcome.state.params.num_elements()));
        metrics.insert("tokens".into(), json!(tokens));
        Ok(metrics)
    }
}

/// Packed blocks: training batches from a [`Sampler`], the loss `objective` (cross-entropy for
/// `pretrain`, the distillation loss for `distill`), and as validation the cross-entropy over the
/// first blocks of the validation split.
pub(crate) struct BlockData<O> {
    pub sampler: Sampler,
    pub val: Blocks,
    pub val_batch: usize,
    pub objective: O,
}

impl<O: Objective> TrainData for BlockData<O> {
    fn start(&self) -> DataPos {
        self.sampler.start()
    }
    fn fill(&mut self, pos: &mut DataPos, batch: &mut Batch) {
        self.sampler.fill(pos, batch);
    }
    fn objective(&mut self) -> &mut dyn Objective {
        &mut self.objective
    }
    fn validate(&mut self, model: &Model, params: &ParamMap, max_batches: usize) -> Result<Validation, StageError> {
        let mut acts = Activations::inference(model, self.val_batch, self.val.width - 1);
        Ok(Validation::loss(mean_loss(model, params, &self.val, &mut acts, Some(max_batches), |_| Ok(()))?.mean))
    }
}

/// The plan shape ([`crate::quantize::plan_shape`]) of the model `p` describes, its block size
/// `block_size`, else the `seq_len` its data tells (absent if neither).
pub(crate) fn planned_shape(p: &Params, seq_len: Option<usize>) -> serde_json::Value {
    let block_size = p.opt_usize("block_size").or(seq_len);
    crate::quantize::plan_shape(&model_config(p, 2, block_size.unwrap_or(1)), block_size)
}

/// A block size shorter than the data's `seq_len`.
fn block_too_short(block_size: usize, seq_len: usize) -> String {
    format!("block_size {block_size} is shorter than the data's seq_len {seq_len}: raise `block_size` or lower the data's `seq_len`")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::model::Arch;
    use crate::nn::optim::Schedule;
    use crate::train::schedule;

    #[test]
    fn schedules_come_from_the_parameters() {
        let params = |pairs: &[(&str, engine::ParamValue)]| Params::from_defaults(PARAMS, pairs);
        use engine::ParamValue::{Int, Str};
        let cos = schedule(&params(&[]));
        assert_eq!(cos, Schedule::Cosine { lr: 1e-3, min_lr: 1e-4, warmup: 100, decay_end: 2000 });
        let wsd = schedule(&params(&[("schedule", Str("wsd".into())), ("max_steps", Int(1000))]));
        assert_eq!(wsd, Schedule::Wsd { lr: 1e-3, min_lr: 1e-4, warmup: 100, decay_start: 800, decay_end: 1000 });
        let cfg = model_config(&params(&[("arch", Str("llama".into())), ("n_kv_head", Int(1))]), 65, 64);
        assert_eq!((cfg.arch, cfg.n_kv_head, cfg.block_size, cfg.vocab_size), (Arch::Llama, 1, 64, 65));
    }
}
