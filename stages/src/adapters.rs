//! Fine-tuning a model in full or through LoRA-family adapters, shared by `sft` and `align`:
//! the adapter parameters, which tensors train and how, the model that applies the adapters,
//! and the output (the merged model, and the adapter in PEFT's layout).

use engine::{ParamProblem, ParamSpec, Params, StageCtx, StageError};
use serde_json::{json, Value};
use std::collections::BTreeMap;

use crate::fail;
use crate::model_io::save_safetensors;
use crate::nn::config::{Arch, ModelConfig};
use crate::nn::lora::{self, LoraConfig, LoraInit};
use crate::nn::model::Model;
use crate::nn::optim::TensorOpt;
use crate::nn::params::ParamMap;

/// PEFT's adapter directory inside the output.
pub const ADAPTER_DIR: &str = "adapter";

/// The adapter parameters of every fine-tuning stage.
pub const LORA_PARAMS: [ParamSpec; 10] = [
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
];

/// Every module name a supported architecture has.
const KNOWN_MODULES: [&str; 10] =
    ["c_attn", "c_proj", "c_fc", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The adapter parameters' checks, run when the recipe is resolved.
pub fn check_lora(p: &Params) -> Result<(), ParamProblem> {
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

/// `lora_targets` against the linear modules of the model wired to `model`, when its stage
/// tells them when the recipe is resolved ([`crate::quantize::plan_shape`]): a module of the
/// other architecture is refused before anything runs.
pub fn check_lora_targets(p: &Params, upstream: &BTreeMap<&str, &Value>) -> Result<(), ParamProblem> {
    let Some(linears) = upstream.get("model").and_then(|shape| shape["linears"].as_object()) else {
        return Ok(());
    };
    if p.str("adapter") != "lora" {
        return Ok(());
    }
    // `transformer.h.0.attn.c_attn.weight` is module `c_attn`.
    let mut modules: Vec<&str> =
        linears.keys().filter_map(|name| name.strip_suffix(".weight")?.rsplit('.').next()).collect();
    modules.sort_unstable();
    modules.dedup();
    match p.str_list("lora_targets").iter().find(|t| *t != "all-linear" && !modules.contains(&t.as_str())) {
        Some(missing) => Err(ParamProblem::new(
            "lora_targets",
            format!("the model has no module `{missing}` (its linear modules: {})", modules.join(", ")),
        )),
        None => Ok(()),
    }
}

/// How a model is fine-tuned: in full, or through adapters (and then from which start).
pub struct FineTune {
    pub lora: Option<LoraConfig>,
    /// PiSSA's adapters as they started: PEFT saves a PiSSA adapter relative to them.
    pissa_start: Option<ParamMap>,
    /// Adapter dropout's probability (0 without adapters).
    pub dropout: f32,
}

/// What [`FineTune::setup`] gives a training stage.
pub struct Setup {
    pub tune: FineTune,
    pub model: Model,
    pub grads: ParamMap,
    pub opts: Vec<TensorOpt>,
}

impl FineTune {
    /// Add the adapters the parameters ask for to `params` (seeded by `seed`), and build the
    /// model, the gradient map of what trains and each tensor's optimizer settings.
    pub fn setup(p: &Params, cfg: &ModelConfig, params: &mut ParamMap, seed: u64) -> Result<Setup, StageError> {
        let lora = lora_config(p, cfg)?;
        if let Some(lora) = &lora {
            lora.add(cfg, params, seed);
        }
        let pissa_start = lora.as_ref().filter(|l| l.init == LoraInit::Pissa).map(|_| {
            let mut start = ParamMap::default();
            params.iter().filter(|(n, _)| lora::is_adapter(n)).for_each(|(n, t)| start.insert(n, t.clone()));
            start
        });
        let (grads, opts) = trainable(p, params, lora.is_some());
        let dropout = if lora.is_some() { p.float("lora_dropout") as f32 } else { 0.0 };
        let model = Model::with_lora_scale(*cfg, params, lora.as_ref().map_or(1.0, LoraConfig::scale))
            .with_lora_dropout(dropout);
        Ok(Setup { tune: FineTune { lora, pissa_start, dropout }, model, grads, opts })
    }

    /// The trained model with any adapter merged in; with an adapter, also write it in PEFT's
    /// layout into the output's [`ADAPTER_DIR`].
    pub fn finish(&self, ctx: &StageCtx<'_>, cfg: &ModelConfig, trained: &ParamMap) -> Result<ParamMap, StageError> {
        let Some(lora) = &self.lora else {
            return Ok(trained.clone());
        };
        let dir = ctx.out(ADAPTER_DIR);
        match &self.pissa_start {
            Some(start) => {
                let (plain, tensors) = lora.pissa_as_lora(cfg, trained, start);
                write_peft_adapter(&dir, cfg, &plain, self.dropout, &tensors)?;
            }
            None => write_peft_adapter(&dir, cfg, lora, self.dropout, trained)?,
        }
        Ok(lora.merged(cfg, trained))
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
