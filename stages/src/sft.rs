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

use std::collections::BTreeSet;

use engine::{Accepts, Input, InputSpec, Metrics, ParamProblem, ParamSpec, Params, Stage, StageCtx, StageError};
use serde_json::json;

use crate::arrow_io::{read_examples, TokenMeta};
use crate::batches::EpochOrder;
use crate::checkpoint::DataPos;
use crate::example_rows::{rows_loss, Layout, Rows};
use crate::instructions::{TEMPLATE_FILE, TRAIN_FILE, VAL_FILE};
use crate::model_io::{load_model_with_eot, require_same_tokenizer, save_model, save_safetensors, TOKENIZER};
use crate::nn::batch::{Batch, EmbeddingNoise};
use crate::nn::config::{Arch, ModelConfig};
use crate::nn::lora::{self, LoraConfig, LoraInit};
use crate::nn::model::Model;
use crate::nn::optim::TensorOpt;
use crate::nn::params::ParamMap;
use crate::nn::step::LossMean;
use crate::train::{self, check_lrs, TrainData, TrainSpec, Trainee, METRICS_FILE, TRAIN_PARAMS};
use crate::{concat_params, fail, round, EXAMPLES, MODEL};

pub struct Sft;

/// PEFT's adapter directory inside the output.
pub const ADAPTER_DIR: &str = "adapter";

const OWN_PARAMS: [ParamSpec; 16] = [
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
    ParamSpec::choice("adapter", "none", &["none", "lora"], "`none` trains every weight; `lora` trains adapters only"),
    ParamSpec::int("lora_r", 8, 1, 4096, "LoRA rank"),
    ParamSpec::float("lora_alpha", 16.0, 0.0, 1e6, "LoRA scale numerator: scale = alpha / r (or / sqrt(r))"),
    ParamSpec::float("lora_dropout", 0.0, 0.0, 0.99, "dropout on the adapters' inputs in training"),
    ParamSpec::str_list(
        "lora_targets",
        &["all-linear"],
        "module names to adapt (gpt2: c_attn, c_proj, c_fc; llama: q_proj ... down_proj), or `all-linear`",
    ),
    ParamSpec::bool("use_rslora", false, "rsLoRA: scale by alpha / sqrt(r)"),
    ParamSpec::float("lora_plus_ratio", 1.0, 1.0, 1e4, "LoRA+: lora_B learns at this times the learning rate"),
    ParamSpec::bool("lora_fa", false, "LoRA-FA: lora_A stays at its random initialisation"),
    ParamSpec::bool("use_dora", false, "DoRA: a trained magnitude per output times the adapted weight's direction"),
    ParamSpec::choice(
        "lora_init",
        "kaiming",
        &["kaiming", "gaussian", "pissa"],
        "lora_A's initialisation: PEFT's default Kaiming-uniform, N(0, 1/r^2), or PiSSA (the weight's top-r singular part; the base keeps the residual)",
    ),
    ParamSpec::int("val_batch_size", 16, 1, 1 << 20, "rows per validation forward pass").not_hashed(),
];

const PARAMS: &[ParamSpec] = &concat_params::<16, 18, 34>(OWN_PARAMS, TRAIN_PARAMS);

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

/// Every module name a supported architecture has.
const KNOWN_MODULES: [&str; 10] =
    ["c_attn", "c_proj", "c_fc", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

impl Stage for Sft {
    fn kind(&self) -> &'static str {
        "sft"
    }
    fn version(&self) -> u32 {
        1
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
    fn uses_seed(&self) -> bool {
        true
    }
    fn volatile_outputs(&self) -> &'static [&'static str] {
        &[METRICS_FILE]
    }

    fn check(&self, p: &Params, _connected: &BTreeSet<&str>) -> Result<(), ParamProblem> {
        check_lrs(p)?;
        if p.str("lora_init") == "pissa" && p.bool("use_dora") {
            return Err(ParamProblem::new("lora_init", "PiSSA's start with DoRA is not supported: choose one"));
        }
        for target in p.str_list("lora_targets") {
            if target != "all-linear" && !KNOWN_MODULES.contains(&target.as_str()) {
                return Err(ParamProblem::new(
                    "lora_targets",
                    format!("`{target}` is not a linear module of gpt2 or llama (known: {})", KNOWN_MODULES.join(", ")),
                ));
            }
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
        let seq_len = p.usize("seq_len");
        if seq_len > cfg.block_size {
            return Err(StageError::msg(format!(
                "seq_len {seq_len} is longer than the model's block size {}: lower `seq_len`",
                cfg.block_size
            )));
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

        let lora = lora_config(p, &cfg)?;
        if let Some(lora) = &lora {
            lora.add(&cfg, &mut params, ctx.seed());
        }
        // PEFT saves a PiSSA adapter relative to the weights before PiSSA: keep its start.
        let pissa_start = lora.as_ref().filter(|l| l.init == LoraInit::Pissa).map(|_| {
            let mut start = ParamMap::default();
            params.iter().filter(|(n, _)| lora::is_adapter(n)).for_each(|(n, t)| start.insert(n, t.clone()));
            start
        });
        let (grads, opts) = trainable(p, &params, lora.is_some());
        let dropout = if lora.is_some() { p.float("lora_dropout") as f32 } else { 0.0 };
        let model = Model::with_lora_scale(cfg, &params, lora.as_ref().map_or(1.0, LoraConfig::scale))
            .with_lora_dropout(dropout);
        let trainable_count = grads.num_elements();
        let spec = TrainSpec::from_params(p, seq_len, LossMean::PerToken);
        let alpha = p.float("neftune_alpha") as f32;
        let mut data_source = ExampleData {
            train: train_rows,
            val: val_rows,
            order: EpochOrder::new(ctx.seed()),
            noise: (alpha > 0.0).then_some(EmbeddingNoise { alpha, seed: ctx.seed() }),
            dropout_seed: (dropout > 0.0).then_some(ctx.seed() ^ 0x4452_4F50_4F55_5421),
            val_batch: p.usize("val_batch_size"),
        };
        let trainee = Trainee { model, fresh: params, grads, opts };
        let outcome = train::train(ctx, &spec, trainee, &mut data_source)?;

        let trained = &outcome.state.params;
        let merged = match &lora {
            Some(lora) => lora.merged(&cfg, trained),
            None => trained.clone(),
        };
        save_model(ctx.out_dir(), &cfg, &merged, eot)?;
        for file in [TOKENIZER, TEMPLATE_FILE] {
            std::fs::copy(data.path(file), ctx.out(file)).map_err(|e| fail(format!("copying {file}"))(&e))?;
        }
        TokenMeta { vocab_size: cfg.vocab_size as u32, eot_id: eot, seq_len: Some(seq_len) }.write(ctx.out_dir())?;
        if let Some(lora) = &lora {
            match &pissa_start {
                Some(start) => {
                    let (plain, tensors) = lora.pissa_as_lora(&cfg, trained, start);
                    write_peft_adapter(&ctx.out(ADAPTER_DIR), &cfg, &plain, dropout, &tensors)?;
                }
                None => write_peft_adapter(&ctx.out(ADAPTER_DIR), &cfg, lora, dropout, trained)?,
            }
        }
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

/// The adapters the parameters ask for, checked against the model's architecture.
fn lora_config(p: &Params, cfg: &ModelConfig) -> Result<Option<LoraConfig>, StageError> {
    if p.str("adapter") != "lora" {
        return Ok(None);
    }
    let names = cfg.module_names();
    let mut targets: Vec<String> = Vec::new();
    for t in p.str_list("lora_targets") {
        if t == "all-linear" {
            targets.extend(names.iter().map(|s| s.to_string()));
        } else if names.contains(&t.as_str()) {
            targets.push(t.clone());
        } else {
            return Err(StageError::msg(format!(
                "lora_targets: a {} model has no module `{t}` (its linear modules: {})",
                cfg.arch.name(),
                names.join(", ")
            )));
        }
    }
    targets.sort();
    targets.dedup();
    Ok(Some(LoraConfig {
        r: p.usize("lora_r"),
        alpha: p.float("lora_alpha") as f32,
        rslora: p.bool("use_rslora"),
        targets,
        init: match p.str("lora_init") {
            "gaussian" => LoraInit::Gaussian,
            "pissa" => LoraInit::Pissa,
            _ => LoraInit::Kaiming,
        },
        dora: p.bool("use_dora"),
    }))
}

/// Which tensors train, and how: everything (a full fine-tune), or the adapters only, `lora_A`
/// not at all under LoRA-FA and `lora_B` at `lora_plus_ratio` times the learning rate.
fn trainable(p: &Params, params: &ParamMap, adapters: bool) -> (ParamMap, Vec<TensorOpt>) {
    if !adapters {
        return (params.zeros_like(), TensorOpt::defaults(params));
    }
    let lora_fa = p.bool("lora_fa");
    let trains = |name: &str| lora::is_adapter(name) && !(lora_fa && name.ends_with(".lora_A.weight"));
    let ratio = p.float("lora_plus_ratio") as f32;
    let lora_b = |name: &str| name.ends_with(".lora_B.weight");
    let opts = TensorOpt::defaults(params)
        .into_iter()
        .zip(params.iter())
        .map(|(opt, (name, _))| if lora_b(name) { TensorOpt { lr_scale: ratio, ..opt } } else { opt })
        .collect();
    (params.zeros_like_trainable(trains), opts)
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
    fn val_loss(&mut self, model: &Model, params: &ParamMap, max_batches: usize) -> Result<f64, StageError> {
        Ok(rows_loss(model, params, &self.val, self.val_batch, Some(max_batches), |_| Ok(()))?.0)
    }
}

/// PEFT's layout: `adapter_config.json` and `adapter_model.safetensors` with PEFT's tensor
/// names (`base_model.model.` + the module path + `.lora_A.weight`).
fn write_peft_adapter(
    dir: &std::path::Path,
    cfg: &ModelConfig,
    lora: &LoraConfig,
    dropout: f32,
    params: &ParamMap,
) -> Result<(), StageError> {
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("creating `{}`", dir.display()))(&e))?;
    let mut tensors = ParamMap::default();
    for m in lora.modules(cfg) {
        for name in [lora::a_name(&m.path), lora::b_name(&m.path), lora::magnitude_name(&m.path)] {
            if params.contains(&name) {
                tensors.insert(format!("base_model.model.{name}"), params.tensor(&name).clone());
            }
        }
    }
    save_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": null,
        "inference_mode": true,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": dropout,
        "target_modules": lora.targets,
        "fan_in_fan_out": cfg.arch == Arch::Gpt2,
        "bias": "none",
        "use_rslora": lora.rslora,
        "use_dora": lora.dora,
        "init_lora_weights": if lora.init == LoraInit::Gaussian { json!("gaussian") } else { json!(true) },
        "modules_to_save": null,
    });
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialize") + "\n";
    let path = dir.join("adapter_config.json");
    std::fs::write(&path, text).map_err(|e| fail(format!("writing `{}`", path.display()))(&e))
}
