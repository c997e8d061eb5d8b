//! `quantize`: a model's linear layers (and, if asked, its embedding and head) as 8- or 4-bit
//! codes with a scale and zero point per group, by RTN, HQQ or GPTQ (see [`crate::nn::quant`]).
//!
//! Output: a model directory that `evaluate` and `sample` take like any model (config.json
//! with a `quantization_config`, model.safetensors with `W.qweight`, `W.scales` and `W.zeros`
//! for each quantized `W`, the tokenizer and what else the model's directory held for
//! inference), and `report.json`: per matrix its weight MSE, its output MSE on the
//! calibration data when a `calibrate` stage is wired (`mean((W - Q) x)^2` over calibration
//! tokens and outputs, from the statistics `E[x x^T]`), and its bytes; the file's size against
//! the f32 model's.
//!
//! A matrix whose input width is not a multiple of `group_size` is an error naming it, or,
//! with `indivisible = "keep"`, stays f32 (listed in the report).

use std::collections::{BTreeMap, BTreeSet};

use engine::{Accepts, Input, InputSpec, Metrics, ParamProblem, ParamSpec, Params, Stage, StageCtx, StageError};
use rayon::prelude::*;
use serde_json::{json, Map, Value};

use crate::calibrate::{load_hessians, site};
use crate::model_io::{load_model_with_eot, save_quantized_model, TOKENIZER, WEIGHTS};
use crate::nn::config::WeightLayout;
use crate::nn::model::{Arch, ModelConfig};
use crate::nn::params::ParamMap;
use crate::nn::quant::{gptq, hqq, out_in, rtn, QMatrix, Scheme};
use crate::{fail, round, CALIBRATION, MODEL, QUANTIZED_MODEL};

pub struct Quantize;

pub const REPORT_FILE: &str = "report.json";

/// Files of a model directory besides its weights and config that inference reads, copied
/// when present.
const CARRIED: &[&str] = &[TOKENIZER, crate::arrow_io::TokenMeta::FILE, crate::instructions::TEMPLATE_FILE];

const PARAMS: &[ParamSpec] = &[
    ParamSpec::choice("method", "rtn", &["rtn", "hqq", "gptq"], "round to nearest, HQQ's fitted zero points, or GPTQ"),
    ParamSpec::int("bits", 8, 4, 8, "bits per weight: 8 or 4"),
    ParamSpec::int("group_size", 64, 32, 1 << 16, "inputs per scale and zero point: a multiple of 32"),
    ParamSpec::bool("symmetric", false, "zero point fixed at the middle code (rtn and gptq)"),
    ParamSpec::bool("embeddings", false, "also quantize the token embedding and the output head"),
    ParamSpec::choice(
        "indivisible",
        "error",
        &["error", "keep"],
        "a matrix whose input width is not a multiple of group_size: an error, or kept in f32",
    ),
    ParamSpec::float("damp", 0.01, 0.0, 1.0, "gptq: added to the Hessian's diagonal, times its mean diagonal"),
];

const INPUTS: &[InputSpec] = &[
    InputSpec { name: "model", accepts: Accepts::Artifact(&[MODEL]), required: true, doc: "the model to quantize" },
    InputSpec {
        name: "calibration",
        accepts: Accepts::Artifact(&[CALIBRATION]),
        required: false,
        doc: "a `calibrate` stage of the same model: needed by gptq, and gives the report its output errors",
    },
];

impl Stage for Quantize {
    fn kind(&self) -> &'static str {
        "quantize"
    }
    fn version(&self) -> u32 {
        2 // 2: GPTQ rounds the token embedding (tied or not) as RTN does
    }
    fn about(&self) -> &'static str {
        "a model's weights as int8 or int4 codes by RTN, HQQ or GPTQ, with a per-layer error report"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn inputs(&self) -> &'static [InputSpec] {
        INPUTS
    }
    fn output(&self) -> engine::ArtifactType {
        QUANTIZED_MODEL
    }
    fn vocabulary(&self) -> engine::Vocabulary {
        engine::Vocabulary::From("model")
    }
    fn same_vocabulary(&self) -> &'static [&'static str] {
        &["model", "calibration"]
    }
    fn check(&self, p: &Params, connected: &BTreeSet<&str>) -> Result<(), ParamProblem> {
        if !matches!(p.int("bits"), 4 | 8) {
            return Err(ParamProblem::new("bits", format!("{} bits: use 8 or 4", p.int("bits"))));
        }
        if p.int("group_size") % 32 != 0 {
            return Err(ParamProblem::new(
                "group_size",
                format!("{} is not a multiple of 32 (try 32, 64 or 128)", p.int("group_size")),
            ));
        }
        if p.str("method") == "gptq" && !connected.contains("calibration") {
            return Err(ParamProblem::new(
                "method",
                "gptq needs the inputs' statistics: wire `calibration` to a `calibrate` stage of the same model",
            ));
        }
        if p.str("method") == "hqq" && p.bool("symmetric") {
            return Err(ParamProblem::new("symmetric", "hqq fits a zero point per group: it is never symmetric"));
        }
        Ok(())
    }

    /// A matrix whose width `group_size` does not divide is refused when the recipe is
    /// resolved, if the model stage tells its widths ([`plan_shape`]).
    fn check_shapes(&self, p: &Params, upstream: &BTreeMap<&str, &Value>) -> Result<(), ParamProblem> {
        let Some(shape) = upstream.get("model") else { return Ok(()) };
        if shape.is_null() || p.str("indivisible") == "keep" {
            return Ok(());
        }
        let gs = p.usize("group_size");
        let sections: &[&str] = if p.bool("embeddings") { &["linears", "tables"] } else { &["linears"] };
        let widths = sections.iter().filter_map(|s| shape[*s].as_object()).flatten();
        for (name, width) in widths {
            let width = width.as_u64().unwrap_or(0) as usize;
            if !width.is_multiple_of(gs) {
                return Err(ParamProblem::new("group_size", indivisible(name, width, gs)));
            }
        }
        Ok(())
    }
    fn output_shape(&self, _: &Params, upstream: &BTreeMap<&str, &Value>) -> Value {
        shape_of_input(upstream, "model")
    }

    fn run(&self, ctx: &StageCtx<'_>) -> Result<Metrics, StageError> {
        let Input::Artifact { artifact: model_dir, .. } = ctx.required_input("model") else {
            unreachable!("the slot accepts only artifacts");
        };
        let p = ctx.params();
        let (cfg, params, eot) = load_model_with_eot(&model_dir.dir)?;
        let hessians = match ctx.input("calibration") {
            Some(Input::Artifact { artifact, stage, .. }) => {
                Some(load_hessians(artifact, stage, model_dir.file_digest(WEIGHTS).map(|d| d.to_string()))?)
            }
            _ => None,
        };
        let scheme =
            Scheme { bits: p.int("bits") as u32, group_size: p.usize("group_size"), symmetric: p.bool("symmetric") };
        let method = p.str("method");
        let (mut todo, mut kept) = (Vec::new(), Vec::new());
        for t in targets(&cfg, p.bool("embeddings")) {
            if t.cols % scheme.group_size == 0 {
                todo.push(t);
            } else if p.str("indivisible") == "keep" {
                kept.push(t.name);
            } else {
                return Err(StageError::msg(indivisible(&t.name, t.cols, scheme.group_size)));
            }
        }
        if let Some(h) = &hessians {
            for t in &todo {
                if let Some(site) = &t.site {
                    if h.get(site).map(Vec::len) != Some(t.cols * t.cols) {
                        return Err(StageError::msg(format!(
                            "the calibration has no statistics of width {} for `{}`",
                            t.cols, t.name
                        )));
                    }
                }
            }
        }
        ctx.progress().set_length(todo.len() as u64, "matrices");
        let done = std::sync::atomic::AtomicU64::new(0);
        let results: Vec<(QMatrix, f64, Option<f64>)> = todo
            .par_iter()
            .map(|t| {
                let w = t.matrix(&params);
                let h = t.site.as_ref().and_then(|s| hessians.as_ref().and_then(|h| h.get(s)));
                let q = match method {
                    "rtn" => rtn(&w, t.rows, t.cols, scheme),
                    "hqq" => hqq(&w, t.rows, t.cols, scheme),
                    // A table that is also (or only) the embedding is rounded: GPTQ would fit it to
                    // the head's inputs alone, at the expense of the rows the embedding reads.
                    _ => match h.filter(|_| !t.embedding) {
                        Some(h) => gptq(&w, t.rows, t.cols, h, scheme, p.float("damp")),
                        None => rtn(&w, t.rows, t.cols, scheme),
                    },
                };
                let err: Vec<f64> = q.dequantize().iter().zip(&w).map(|(a, b)| (*a - *b) as f64).collect();
                let weight_mse = err.iter().map(|e| e * e).sum::<f64>() / err.len() as f64;
                let output_mse = h.map(|h| quadratic_mean(&err, t.rows, t.cols, h));
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                ctx.progress().set_position(n);
                (q, weight_mse, output_mse)
            })
            .collect();
        ctx.check_cancelled()?;

        let mut out = params.clone();
        let mut layers = Vec::new();
        for (t, (q, weight_mse, output_mse)) in todo.iter().zip(results) {
            layers.push(json!({
                "name": t.name,
                "shape": [t.rows, t.cols],
                "weight_mse": weight_mse,
                "output_mse": output_mse,
                "bytes": q.bytes(),
                "f32_bytes": 4 * t.rows * t.cols,
            }));
            out.insert_quantized(t.name.clone(), q);
        }
        let quantization = json!({
            "quant_method": "tinygpt",
            "method": method,
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            "symmetric": scheme.symmetric,
            "modules": todo.iter().map(|t| t.name.clone()).collect::<Vec<_>>(),
            "kept_f32": &kept,
            "layout": "per quantized W: W.qweight (out, in * bits / 8) codes, even input in the low nibble; W.scales and W.zeros (out, in / group_size); w = scale * (code - zero)",
        });
        save_quantized_model(ctx.out_dir(), &cfg, &out, eot, quantization)?;
        for file in CARRIED {
            if model_dir.path(file).is_file() {
                std::fs::copy(model_dir.path(file), ctx.out(file)).map_err(|e| fail(format!("copying {file}"))(&e))?;
            }
        }
        let size = |path: std::path::PathBuf| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let (bytes, f32_bytes) = (size(ctx.out(WEIGHTS)), size(model_dir.path(WEIGHTS)));
        let ratio = bytes as f64 / f32_bytes.max(1) as f64;
        let mean = |key: &str| {
            let v: Vec<f64> = layers.iter().filter_map(|l| l[key].as_f64()).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        let report = json!({
            "method": method,
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            "symmetric": scheme.symmetric,
            "bytes": bytes,
            "f32_bytes": f32_bytes,
            "size_ratio": round(ratio, 4),
            "mean_weight_mse": mean("weight_mse"),
            "mean_output_mse": mean("output_mse"),
            "layers": layers,
            "kept_f32": kept,
        });
        let text = serde_json::to_string_pretty(&report).expect("JSON values serialize") + "\n";
        std::fs::write(ctx.out(REPORT_FILE), text).map_err(|e| fail("writing report.json")(&e))?;
        let mut metrics = Metrics::from([
            ("matrices".into(), json!(todo.len())),
            ("bytes".into(), json!(bytes)),
            ("size_ratio".into(), json!(round(ratio, 4))),
        ]);
        if let Some(m) = mean("weight_mse") {
            metrics.insert("mean_weight_mse".into(), json!(m));
        }
        if let Some(m) = mean("output_mse") {
            metrics.insert("mean_output_mse".into(), json!(m));
        }
        Ok(metrics)
    }
}

/// `mean over outputs o of e_o^T H e_o`: the mean squared output error of an error matrix
/// `e` (rows, cols) on inputs whose second moments are `h` (cols, cols).
fn quadratic_mean(e: &[f64], rows: usize, cols: usize, h: &[f64]) -> f64 {
    let total: f64 = e
        .chunks(cols)
        .map(|eo| (0..cols).map(|i| eo[i] * (0..cols).map(|j| h[i * cols + j] * eo[j]).sum::<f64>()).sum::<f64>())
        .sum();
    total / rows as f64
}

/// A matrix to quantize: its parameter's name, its shape as (out, in), and where its inputs'
/// statistics are.
struct Target {
    name: String,
    rows: usize,
    cols: usize,
    in_out: bool,
    site: Option<String>,
    /// The token embedding (tied to the head or not).
    embedding: bool,
}

impl Target {
    /// The weight as (out, in), row-major.
    fn matrix(&self, p: &ParamMap) -> Vec<f32> {
        let layout = if self.in_out { WeightLayout::InOut } else { WeightLayout::OutIn };
        out_in(p.get(&self.name), layout, self.cols, self.rows)
    }
}

fn indivisible(name: &str, cols: usize, group_size: usize) -> String {
    format!(
        "`{name}` has {cols} inputs, not a multiple of group_size {group_size}: choose a group_size that divides it, \
         or set indivisible = \"keep\" to leave such matrices in f32"
    )
}

/// What a model stage tells of its output when the recipe is resolved
/// ([`engine::Stage::output_shape`]): the input width of each matrix `quantize` may take, by
/// name, the blocks' linear layers (`linears`) apart from the embedding tables (`tables`), and
/// the block size when the recipe fixes it (`block_size`, else absent).
pub(crate) fn plan_shape(cfg: &ModelConfig, block_size: Option<usize>) -> Value {
    let linears: Map<String, Value> = targets(cfg, false).into_iter().map(|t| (t.name, json!(t.cols))).collect();
    let tables: Map<String, Value> = targets(cfg, true)
        .into_iter()
        .filter(|t| !linears.contains_key(&t.name))
        .map(|t| (t.name, json!(t.cols)))
        .collect();
    let mut shape = json!({ "linears": linears, "tables": tables });
    if let Some(block_size) = block_size {
        shape["block_size"] = json!(block_size);
    }
    shape
}

/// The shape the stage wired to `slot` tells ([`plan_shape`] or `Null`), for a stage whose
/// output model has its input's shape.
pub(crate) fn shape_of_input(upstream: &BTreeMap<&str, &Value>, slot: &str) -> Value {
    upstream.get(slot).map_or(Value::Null, |shape| (*shape).clone())
}

/// Every block's linear layers, then (with `embeddings`) the embedding and the head.
fn targets(cfg: &ModelConfig, embeddings: bool) -> Vec<Target> {
    let mut out: Vec<Target> = cfg
        .linear_modules()
        .into_iter()
        .map(|m| Target {
            name: format!("{}.weight", m.path),
            rows: m.cout,
            cols: m.cin,
            in_out: m.layout == WeightLayout::InOut,
            site: Some(site(m.layer, Some(m.slot))),
            embedding: false,
        })
        .collect();
    if embeddings {
        let (v, c) = (cfg.vocab_size, cfg.n_embd);
        // The head's input statistics belong to the tied table too, for its report.
        let tied = cfg.tie_embeddings || cfg.arch == Arch::Gpt2;
        let table = |name: &str, embedding: bool| Target {
            name: name.into(),
            rows: v,
            cols: c,
            in_out: false,
            site: (!embedding || tied).then(|| site(0, None)),
            embedding,
        };
        match cfg.arch {
            Arch::Gpt2 => out.push(table("transformer.wte.weight", true)),
            Arch::Llama => {
                out.push(table("model.embed_tokens.weight", true));
                if !tied {
                    out.push(table("lm_head.weight", false));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use engine::{ParamValue, Params, Stage};

    use super::*;

    /// A model stage tells each matrix's input width; fine-tuning and alignment keep the shape
    /// they are given, distillation takes its `init` model's or its parameters'; quantize
    /// refuses a group its widths do not hold, unless asked to keep such matrices.
    #[test]
    fn model_stages_tell_their_widths_and_quantize_checks_them() {
        let shape = plan_shape(&ModelConfig::gpt2(11, 8, 1, 2, 16, false), Some(8));
        assert_eq!(shape["linears"]["transformer.h.0.attn.c_attn.weight"], 16);
        assert_eq!(shape["linears"]["transformer.h.0.mlp.c_proj.weight"], 64);
        assert_eq!(shape["tables"]["transformer.wte.weight"], 16);
        assert!(shape["linears"].get("transformer.wte.weight").is_none());
        let upstream = BTreeMap::from([("model", &shape)]);
        let none = Params::from_defaults(&[], &[]);
        assert_eq!(crate::sft::Sft.output_shape(&none, &upstream), shape);
        assert_eq!(crate::align::Align.output_shape(&none, &upstream), shape);
        let distill = Params::from_defaults(crate::distill::Distill.params(), &[("n_embd", ParamValue::Int(96))]);
        let student = crate::distill::Distill.output_shape(&distill, &BTreeMap::new());
        assert_eq!(student["linears"]["transformer.h.0.attn.c_proj.weight"], 96);
        let from_init = BTreeMap::from([("init", &shape)]);
        assert_eq!(crate::distill::Distill.output_shape(&distill, &from_init), shape);

        let quantize = |pairs: &[(&str, ParamValue)]| {
            Quantize.check_shapes(&Params::from_defaults(Quantize.params(), pairs), &upstream)
        };
        let problem = quantize(&[("group_size", ParamValue::Int(32))]).unwrap_err();
        assert_eq!(problem.key, "group_size");
        assert!(problem.message.contains("`transformer.h.0.attn.c_attn.weight` has 16 inputs"), "{}", problem.message);
        assert!(
            quantize(&[("group_size", ParamValue::Int(32)), ("indivisible", ParamValue::Str("keep".into()))]).is_ok()
        );
        let wide = plan_shape(&ModelConfig::gpt2(11, 8, 1, 2, 64, false), None);
        let upstream = BTreeMap::from([("model", &wide)]);
        let check = |pairs: &[(&str, ParamValue)]| {
            Quantize.check_shapes(&Params::from_defaults(Quantize.params(), pairs), &upstream)
        };
        assert!(check(&[("group_size", ParamValue::Int(64))]).is_ok());
        assert!(check(&[("group_size", ParamValue::Int(128))]).is_err(), "64-wide layers");
    }

    /// Packed data tells its `seq_len`, a pretrained model its block size (the parameter, else
    /// the data's), and what does not fit is refused when the recipe is resolved: a pretrain's
    /// or a student's block size under the data's `seq_len`, an sft `seq_len`, generated
    /// prompts and continuations, or evaluated blocks over the model's block size.
    #[test]
    fn lengths_travel_with_the_shapes_and_what_does_not_fit_is_refused() {
        use crate::{pack::Pack, pretrain::Pretrain, sft::Sft};
        let with = |stage: &dyn Stage, pairs: &[(&str, ParamValue)]| Params::from_defaults(stage.params(), pairs);
        let packed = Pack.output_shape(&with(&Pack, &[("seq_len", ParamValue::Int(64))]), &BTreeMap::new());
        let data = BTreeMap::from([("data", &packed)]);
        let block =
            |pairs: &[(&str, ParamValue)]| Pretrain.output_shape(&with(&Pretrain, pairs), &data)["block_size"].clone();
        assert_eq!(block(&[]), 64, "the data's seq_len");
        assert_eq!(block(&[("block_size", ParamValue::Int(128))]), 128);
        assert!(Pretrain.output_shape(&with(&Pretrain, &[]), &BTreeMap::new()).get("block_size").is_none());
        let short = Pretrain.check_shapes(&with(&Pretrain, &[("block_size", ParamValue::Int(32))]), &data).unwrap_err();
        assert_eq!(short.key, "block_size");
        assert!(short.message.contains("block_size 32 is shorter than the data's seq_len 64"), "{}", short.message);
        assert!(Pretrain.check_shapes(&with(&Pretrain, &[("block_size", ParamValue::Int(64))]), &data).is_ok());

        let model = Pretrain.output_shape(&with(&Pretrain, &[]), &data);
        let upstream = BTreeMap::from([("model", &model)]);
        let sft = |seq_len| Sft.check_shapes(&with(&Sft, &[("seq_len", ParamValue::Int(seq_len))]), &upstream);
        assert!(sft(64).is_ok());
        let long = sft(65).unwrap_err();
        assert_eq!(long.key, "seq_len");
        assert!(long.message.contains("seq_len 65 is longer than the model's block size 64"), "{}", long.message);
        assert_eq!(Sft.output_shape(&with(&Sft, &[]), &upstream)["block_size"], 64, "fine-tuning keeps the shape");

        // Generated continuations must fit the model; the teacher keeps its data's seq_len, and
        // a student must hold it.
        use crate::{distill::Distill, generate_data::Generate, teacher::Teacher};
        let wired = BTreeMap::from([("model", &model), ("data", &packed)]);
        let generate = |new| Generate.check_shapes(&with(&Generate, &[("new_tokens", ParamValue::Int(new))]), &wired);
        assert!(generate(57).is_ok(), "8 prompt tokens + 57 - 1 = 64 positions");
        assert_eq!(generate(58).unwrap_err().key, "new_tokens");
        assert_eq!(Generate.output_shape(&with(&Generate, &[]), &wired)["seq_len"], 64);
        let teacher = Teacher.output_shape(&with(&Teacher, &[]), &wired);
        assert_eq!(teacher["seq_len"], 64);
        let from_teacher = BTreeMap::from([("teacher", &teacher)]);
        let student = |pairs: &[(&str, ParamValue)]| Distill.check_shapes(&with(&Distill, pairs), &from_teacher);
        assert!(student(&[]).is_ok(), "the data's seq_len by default");
        assert_eq!(Distill.output_shape(&with(&Distill, &[]), &from_teacher)["block_size"], 64);
        let short = student(&[("block_size", ParamValue::Int(32))]).unwrap_err();
        assert!(short.message.contains("block size 32 is shorter than the data's seq_len 64"), "{}", short.message);
        let small = Pretrain.output_shape(&with(&Pretrain, &[("block_size", ParamValue::Int(32))]), &BTreeMap::new());
        let init = BTreeMap::from([("teacher", &teacher), ("init", &small)]);
        assert_eq!(Distill.check_shapes(&with(&Distill, &[]), &init).unwrap_err().key, "init");
        // Evaluation on packed blocks longer than the model's block size.
        let evaluate = crate::evaluate::Evaluate;
        let none = with(&evaluate, &[]);
        assert!(evaluate.check_shapes(&none, &BTreeMap::from([("model", &model), ("data", &packed)])).is_ok());
        let long = evaluate.check_shapes(&none, &BTreeMap::from([("model", &small), ("data", &packed)])).unwrap_err();
        assert_eq!(long.key, "data");
        assert!(
            long.message.contains("blocks hold 64 tokens, more than the model's block size 32"),
            "{}",
            long.message
        );
    }
}
