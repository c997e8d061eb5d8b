//! `calibrate`: the input statistics of every linear layer of a model on a few packed blocks,
//! the cached half of GPTQ. Trying another bit width, group size or damping reuses them.
//!
//! For each place a linear layer reads from (a block's attention input, shared by q, k and v;
//! the attention output; the MLP input, shared by gate and up; the MLP's hidden activations;
//! the head's input), the mean of `x x^T` over the calibration tokens, `H = X^T X / N`, from
//! the unquantized model (every layer's statistics come from full-precision inputs).
//!
//! Output: `hessians.safetensors` (F64, (in, in) per place, named by [`site`]) and
//! `calibration.json` (blocks and tokens used, and the digest of the model's weights, so that
//! `quantize` refuses statistics of another model).

use std::collections::BTreeMap;

use engine::{Accepts, InputSpec, Metrics, ParamSpec, Stage, StageCtx, StageError};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

use crate::arrow_io::{read_blocks, TokenMeta};
use crate::model_io::{model_over_data, save_raw_tensors, ModelOverData, WEIGHTS};
use crate::nn::batch::Batch;
use crate::nn::kernels::matmul::{matmul, Dims, Layout};
use crate::nn::model::{Activations, Model, ModelConfig};
use crate::pack::TRAIN_FILE;
use crate::{fail, CALIBRATION, MODEL, PACKED};

pub struct Calibrate;

pub const HESSIANS_FILE: &str = "hessians.safetensors";
pub const ABOUT_FILE: &str = "calibration.json";

const PARAMS: &[ParamSpec] = &[
    ParamSpec::int("blocks", 64, 1, 1 << 20, "training blocks the statistics are gathered on (from the first)"),
    ParamSpec::int("batch_size", 8, 1, 1 << 20, "blocks per forward pass").not_hashed(),
];

const INPUTS: &[InputSpec] = &[
    InputSpec { name: "model", accepts: Accepts::Artifact(&[MODEL]), required: true, doc: "the model to quantize" },
    InputSpec {
        name: "data",
        accepts: Accepts::Artifact(&[PACKED]),
        required: true,
        doc: "a `pack` stage made with the model's tokenizer; its training split is read",
    },
];

/// The name of the statistics of linear slot `slot` of block `layer` (the head's for `None`).
pub fn site(layer: usize, slot: Option<usize>) -> String {
    match slot {
        None => "head".into(),
        Some(0..=2) => format!("layers.{layer}.attn_in"),
        Some(3) => format!("layers.{layer}.attn_out"),
        Some(4 | 5) => format!("layers.{layer}.mlp_in"),
        Some(_) => format!("layers.{layer}.mlp_hidden"),
    }
}

/// Every place with its slot as [`Activations::linear_input`] takes it and its width.
fn sites(cfg: &ModelConfig) -> Vec<(String, usize, Option<usize>, usize)> {
    let mut out: Vec<(String, usize, Option<usize>, usize)> = Vec::new();
    for m in cfg.linear_modules() {
        let name = site(m.layer, Some(m.slot));
        if !out.iter().any(|s| s.0 == name) {
            out.push((name, m.layer, Some(m.slot), m.cin));
        }
    }
    out.push((site(0, None), 0, None, cfg.n_embd));
    out
}

impl Stage for Calibrate {
    fn kind(&self) -> &'static str {
        "calibrate"
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "input statistics of every linear layer on packed data, cached for GPTQ"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn inputs(&self) -> &'static [InputSpec] {
        INPUTS
    }
    fn output(&self) -> engine::ArtifactType {
        CALIBRATION
    }
    fn same_vocabulary(&self) -> &'static [&'static str] {
        &["model", "data"]
    }

    fn run(&self, ctx: &StageCtx<'_>) -> Result<Metrics, StageError> {
        let ModelOverData { cfg, params, model: model_dir, data, .. } = model_over_data(ctx)?;
        let t = TokenMeta::seq_len_within(&data.dir, cfg.block_size, "the model's")?;
        let blocks = read_blocks(&data.path(TRAIN_FILE))?;
        let n = ctx.params().usize("blocks").min(blocks.rows());
        let batch = ctx.params().usize("batch_size");
        let model = Model::new(cfg, &params);
        let sites = sites(&cfg);
        let mut sums: Vec<Vec<f64>> = sites.iter().map(|s| vec![0.0; s.3 * s.3]).collect();
        let mut gram = Vec::new();
        let mut acts: Option<Activations> = None;
        ctx.progress().set_length(n as u64, "blocks");
        let mut done = 0;
        while done < n {
            ctx.check_cancelled()?;
            let chunk = batch.min(n - done);
            let mut ids = Vec::with_capacity(chunk * t);
            for row in blocks.tokens[done * (t + 1)..(done + chunk) * (t + 1)].chunks(t + 1) {
                ids.extend_from_slice(&row[..t]);
            }
            if acts.as_ref().is_none_or(|a| a.batch() != chunk) {
                acts = Some(Activations::new(&cfg, chunk, t));
            }
            let acts = acts.as_mut().expect("just made");
            model.forward(&params, &Batch::whole_rows(t, &ids, &vec![0; ids.len()]), acts);
            for ((_, layer, slot, k), sum) in sites.iter().zip(&mut sums) {
                let x = acts.linear_input(*layer, *slot);
                gram.resize(k * k, 0.0f32);
                let d = Dims { m: *k, k: chunk * t, n: *k };
                matmul(x, Layout::Transposed, x, Layout::Normal, &mut gram, d, false);
                sum.iter_mut().zip(&gram).for_each(|(s, g)| *s += *g as f64);
            }
            done += chunk;
            ctx.progress().set_position(done as u64);
        }
        let tokens = n * t;
        let bytes: Vec<Vec<u8>> =
            sums.iter().map(|s| s.iter().flat_map(|v| (v / tokens.max(1) as f64).to_le_bytes()).collect()).collect();
        let tensors: Vec<(&str, Dtype, Vec<usize>, &[u8])> =
            sites.iter().zip(&bytes).map(|(s, b)| (s.0.as_str(), Dtype::F64, vec![s.3, s.3], &b[..])).collect();
        save_raw_tensors(&ctx.out(HESSIANS_FILE), "tinygpt-calibration", &tensors)?;
        let about = json!({
            "blocks": n,
            "tokens": tokens,
            "model_weights": model_dir.file_digest(WEIGHTS).map(|d| d.to_string()),
        });
        let text = serde_json::to_string_pretty(&about).expect("JSON values serialize") + "\n";
        std::fs::write(ctx.out(ABOUT_FILE), text).map_err(|e| fail("writing calibration.json")(&e))?;
        Ok(Metrics::from([("blocks".into(), json!(n)), ("tokens".into(), json!(tokens))]))
    }
}

/// The statistics a [`Calibrate`] stage wrote for the model whose weights file has digest
/// `weights` (refused if they were gathered on another model), by site.
pub fn load_hessians(
    calibration: &engine::cache::Artifact,
    stage: &str,
    weights: Option<String>,
) -> Result<BTreeMap<String, Vec<f64>>, StageError> {
    let path = calibration.path(ABOUT_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| fail(format!("reading `{}`", path.display()))(&e))?;
    let about: Value = serde_json::from_str(&text).map_err(|e| fail(format!("`{}`", path.display()))(&e))?;
    if about["model_weights"].as_str() != weights.as_deref() {
        return Err(StageError::msg(format!(
            "the calibration of stage `{stage}` was gathered on another model: wire its `model` to the model being quantized"
        )));
    }
    let path = calibration.path(HESSIANS_FILE);
    let bytes = std::fs::read(&path).map_err(|e| fail(format!("reading `{}`", path.display()))(&e))?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| StageError::msg(format!("`{}` is not a safetensors file: {e}", path.display())))?;
    let mut out = BTreeMap::new();
    for (name, view) in file.tensors() {
        let values = view.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
        out.insert(name, values);
    }
    Ok(out)
}
