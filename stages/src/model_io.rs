//! Models on disk, in the layout Hugging Face `transformers` loads: `model.safetensors` (f32,
//! Hugging Face names), `config.json` (`GPT2LMHeadModel` or `LlamaForCausalLM`) and
//! `tokenizer.json` beside them.
//!
//! Bytes are deterministic: the safetensors crate orders tensors by name within each dtype,
//! and the only metadata is `format = pt` (what `transformers` expects).
//!
//! A gpt2 without biases (nanoGPT's `bias = False`) has no bias tensors in training, but
//! `GPT2LMHeadModel` always has them: the export writes zeros, which compute exactly the same,
//! and `config.json` carries `"bias": false` so loading here drops them again.

use std::collections::HashMap;
use std::path::Path;

use engine::StageError;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{json, Value};

use crate::fail;
use crate::nn::config::WeightLayout;
use crate::nn::model::{Arch, Gelu, ModelConfig};
use crate::nn::params::{ParamMap, Tensor};
use crate::nn::quant::QMatrix;

pub const WEIGHTS: &str = "model.safetensors";
pub const CONFIG: &str = "config.json";
pub const TOKENIZER: &str = "tokenizer.json";

/// Refuse data made with another tokenizer than the model's: both artifacts carry a
/// `tokenizer.json`, compared by the digests their manifests record. The stage names go into
/// the message.
pub fn require_same_tokenizer(
    (model, model_stage): (&engine::cache::Artifact, &str),
    (data, data_stage): (&engine::cache::Artifact, &str),
) -> Result<(), StageError> {
    let (ours, theirs) = (model.file_digest(TOKENIZER), data.file_digest(TOKENIZER));
    if ours.is_none() || ours != theirs {
        return Err(StageError::msg(format!(
            "the data of stage `{data_stage}` was tokenized with another tokenizer than the model of stage \
             `{model_stage}`: wire `{data_stage}.model` to the same model"
        )));
    }
    Ok(())
}

/// A stage's `model` and `data` slots (both accept only artifacts), checked to come from one
/// tokenizer, with the model loaded.
pub struct ModelOverData<'a> {
    pub model: &'a engine::cache::Artifact,
    pub data: &'a engine::cache::Artifact,
    pub data_stage: &'a str,
    pub cfg: ModelConfig,
    pub params: ParamMap,
    /// The end-of-text token.
    pub eot: u32,
}

/// [`ModelOverData`] of a running stage: [`require_same_tokenizer`], then
/// [`load_model_with_eot`].
pub fn model_over_data<'a>(ctx: &'a engine::StageCtx<'_>) -> Result<ModelOverData<'a>, StageError> {
    let (
        engine::Input::Artifact { artifact: model, stage: model_stage, .. },
        engine::Input::Artifact { artifact: data, stage: data_stage, .. },
    ) = (ctx.required_input("model"), ctx.required_input("data"))
    else {
        unreachable!("both slots accept only artifacts");
    };
    require_same_tokenizer((model, model_stage), (data, data_stage))?;
    let (cfg, params, eot) = load_model_with_eot(&model.dir)?;
    Ok(ModelOverData { model, data, data_stage, cfg, params, eot })
}

/// `config.json` as `transformers` reads it; `eot_id` is the end-of-text token.
pub fn hf_config(cfg: &ModelConfig, eot_id: u32) -> Value {
    match cfg.arch {
        Arch::Gpt2 => json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size,
            "n_ctx": cfg.block_size,
            "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.ffn_hidden,
            "activation_function": cfg.gelu.hf_name(),
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": true,
            "bos_token_id": eot_id,
            "eos_token_id": eot_id,
            "torch_dtype": "float32",
            "bias": cfg.bias,
        }),
        Arch::Llama => json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.block_size,
            "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.ffn_hidden,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head,
            "head_dim": cfg.head_dim(),
            "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": eot_id,
            "eos_token_id": eot_id,
            "torch_dtype": "float32",
        }),
    }
}

/// Read a `config.json` written by [`hf_config`] (or a compatible Hugging Face one).
pub fn parse_hf_config(v: &Value) -> Result<ModelConfig, String> {
    let int = |key: &str| v.get(key).and_then(Value::as_u64).map(|x| x as usize).ok_or(format!("no integer `{key}`"));
    let float = |key: &str, default: f64| v.get(key).and_then(Value::as_f64).unwrap_or(default) as f32;
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let cfg = match model_type {
        "gpt2" => {
            let mut cfg = ModelConfig::gpt2(
                int("vocab_size")?,
                int("n_positions")?,
                int("n_layer")?,
                int("n_head")?,
                int("n_embd")?,
                v.get("bias").and_then(Value::as_bool).unwrap_or(true),
            );
            if let Ok(inner) = int("n_inner") {
                cfg.ffn_hidden = inner;
            }
            cfg.norm_eps = float("layer_norm_epsilon", 1e-5);
            let activation = v.get("activation_function").and_then(Value::as_str).unwrap_or("gelu_new");
            cfg.gelu = Gelu::from_hf_name(activation)
                .ok_or(format!("activation_function `{activation}` is not supported (gelu_new or gelu)"))?;
            cfg
        }
        "llama" => {
            let heads = int("num_attention_heads")?;
            let mut cfg = ModelConfig::llama(
                int("vocab_size")?,
                int("max_position_embeddings")?,
                int("num_hidden_layers")?,
                heads,
                int("num_key_value_heads").unwrap_or(heads),
                int("hidden_size")?,
            );
            cfg.ffn_hidden = int("intermediate_size")?;
            cfg.norm_eps = float("rms_norm_eps", 1e-6);
            cfg.rope_theta = float("rope_theta", 10_000.0);
            cfg.tie_embeddings = v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false);
            cfg
        }
        other => return Err(format!("model_type `{other}` is neither gpt2 nor llama")),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The tensors to write: the parameters, plus zero biases for a gpt2 without them.
fn export(cfg: &ModelConfig, params: &ParamMap) -> ParamMap {
    let mut out = params.clone();
    if cfg.arch == Arch::Gpt2 && !cfg.bias {
        let with_bias = ModelConfig { bias: true, ..*cfg };
        for spec in with_bias.params() {
            if !out.contains(&spec.name) {
                out.insert(spec.name, Tensor::zeros(&spec.shape));
            }
        }
    }
    out
}

/// Write `model.safetensors` and `config.json` into `dir`.
pub fn save_model(dir: &Path, cfg: &ModelConfig, params: &ParamMap, eot_id: u32) -> Result<(), StageError> {
    save_safetensors(&dir.join(WEIGHTS), &export(cfg, params))?;
    let config = serde_json::to_string_pretty(&hf_config(cfg, eot_id)).expect("JSON values serialize");
    let path = dir.join(CONFIG);
    std::fs::write(&path, config + "\n").map_err(|e| fail(format!("writing `{}`", path.display()))(&e))
}

/// Read a model directory: its configuration and its parameters in the model's own order,
/// every name and shape checked.
pub fn load_model(dir: &Path) -> Result<(ModelConfig, ParamMap), StageError> {
    load_model_with_eot(dir).map(|(cfg, params, _)| (cfg, params))
}

/// A model directory's configuration and the end-of-text token `config.json` names
/// (`eos_token_id`, else 0), without reading the weights.
pub fn load_config_with_eot(dir: &Path) -> Result<(ModelConfig, u32), StageError> {
    read_config(dir).map(|(cfg, eot, _)| (cfg, eot))
}

/// `config.json`: the configuration, the end-of-text token and the `quantization_config`.
fn read_config(dir: &Path) -> Result<(ModelConfig, u32, Option<Value>), StageError> {
    let path = dir.join(CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| fail(format!("reading `{}`", path.display()))(&e))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| fail(format!("`{}` is not JSON", path.display()))(&e))?;
    let cfg = parse_hf_config(&value).map_err(|e| StageError::msg(format!("`{}`: {e}", path.display())))?;
    Ok((cfg, value["eos_token_id"].as_u64().map_or(0, |x| x as u32), value.get(QUANTIZATION_KEY).cloned()))
}

/// [`load_model`] plus the end-of-text token `config.json` names (`eos_token_id`, else 0).
/// A quantized model (written by [`save_quantized_model`]) loads with its quantized matrices
/// held as such: for inference only.
pub fn load_model_with_eot(dir: &Path) -> Result<(ModelConfig, ParamMap, u32), StageError> {
    let (cfg, eot, quantization) = read_config(dir)?;
    if let Some(quantization) = quantization {
        return load_quantized(dir, &cfg, &quantization).map(|params| (cfg, params, eot));
    }
    let weights = dir.join(WEIGHTS);
    let mut file = load_safetensors(&weights)?;
    let mut params = ParamMap::default();
    let bad = |msg: String| StageError::msg(format!("`{}`: {msg}", weights.display()));
    for spec in cfg.params() {
        if !file.contains(&spec.name) {
            return Err(bad(format!("no tensor `{}` (a {} model needs it)", spec.name, cfg.arch.name())));
        }
        let t = file.tensor(&spec.name).clone();
        if t.shape() != spec.shape {
            return Err(bad(format!(
                "tensor `{}` has shape {:?}, the config says {:?}",
                spec.name,
                t.shape(),
                spec.shape
            )));
        }
        params.insert(spec.name.clone(), t);
        file.insert(spec.name, Tensor::zeros(&[0]));
    }
    for (name, t) in file.iter() {
        let dropped_bias = cfg.arch == Arch::Gpt2 && !cfg.bias && name.ends_with(".bias");
        if !(t.data().is_empty() || dropped_bias && t.data().iter().all(|x| *x == 0.0)) {
            return Err(bad(format!("unexpected tensor `{name}` for this config")));
        }
    }
    Ok((cfg, params, eot))
}

/// The key of `config.json` that describes a quantized model.
pub const QUANTIZATION_KEY: &str = "quantization_config";

/// Whether a parameter's tensor is stored (in, out) (gpt2's `Conv1D` weights): a quantized
/// matrix is always (out, in).
fn stored_in_out(cfg: &ModelConfig, name: &str) -> bool {
    cfg.linear_modules().iter().any(|m| m.layout == WeightLayout::InOut && name == format!("{}.weight", m.path))
}

/// Write a model some of whose matrices are quantized: `model.safetensors` holds the f32
/// tensors as [`save_model`] does and, for each quantized weight `W`, `W.qweight` (U8, one row
/// of packed codes per output), `W.scales` and `W.zeros` (F32, (out, groups)); `config.json`
/// gets `quantization` as its `quantization_config`.
pub fn save_quantized_model(
    dir: &Path,
    cfg: &ModelConfig,
    params: &ParamMap,
    eot_id: u32,
    quantization: Value,
) -> Result<(), StageError> {
    let all = export(cfg, params);
    let le = |x: &[f32]| x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in all.iter() {
        match all.quantized(all.id(name).expect("a name of the map")) {
            Some(q) => {
                let g = q.groups();
                owned.push((format!("{name}.qweight"), Dtype::U8, vec![q.rows, q.row_bytes()], q.codes.clone()));
                owned.push((format!("{name}.scales"), Dtype::F32, vec![q.rows, g], le(&q.scales)));
                owned.push((format!("{name}.zeros"), Dtype::F32, vec![q.rows, g], le(&q.zeros)));
            }
            None => owned.push((name.to_string(), Dtype::F32, t.shape().to_vec(), le(t.data()))),
        }
    }
    let tensors: Vec<(&str, Dtype, Vec<usize>, &[u8])> =
        owned.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.as_slice())).collect();
    save_raw_tensors(&dir.join(WEIGHTS), "pt", &tensors)?;
    let mut config = hf_config(cfg, eot_id);
    config[QUANTIZATION_KEY] = quantization;
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialize");
    let path = dir.join(CONFIG);
    std::fs::write(&path, text + "\n").map_err(|e| fail(format!("writing `{}`", path.display()))(&e))
}

/// The parameters of a quantized model directory, every name and shape checked.
fn load_quantized(dir: &Path, cfg: &ModelConfig, quant: &Value) -> Result<ParamMap, StageError> {
    let weights = dir.join(WEIGHTS);
    let bad = |msg: String| StageError::msg(format!("`{}`: {msg}", weights.display()));
    let bits = quant["bits"].as_u64().filter(|b| *b == 4 || *b == 8).ok_or_else(|| {
        StageError::msg(format!("`{}`: quantization_config has no `bits` of 4 or 8", dir.join(CONFIG).display()))
    })? as u32;
    let bytes = std::fs::read(&weights).map_err(|e| fail(format!("reading `{}`", weights.display()))(&e))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    type Found<'a> = Option<(Vec<usize>, &'a [u8])>;
    let tensor = |name: &str, dtype: Dtype| -> Result<Found<'_>, StageError> {
        match file.tensor(name) {
            Ok(view) if view.dtype() == dtype => Ok(Some((view.shape().to_vec(), view.data()))),
            Ok(view) => Err(bad(format!("tensor `{name}` is {:?}, expected {dtype:?}", view.dtype()))),
            Err(_) => Ok(None),
        }
    };
    let floats = |b: &[u8]| b.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let mut params = ParamMap::default();
    let mut seen = 0;
    for spec in cfg.params() {
        let name = &spec.name;
        if let Some((shape, data)) = tensor(&format!("{name}.qweight"), Dtype::U8)? {
            let (rows, cols) =
                if stored_in_out(cfg, name) { (spec.shape[1], spec.shape[0]) } else { (spec.shape[0], spec.shape[1]) };
            let scales = tensor(&format!("{name}.scales"), Dtype::F32)?;
            let zeros = tensor(&format!("{name}.zeros"), Dtype::F32)?;
            let (Some((s_shape, scales)), Some((z_shape, zeros))) = (scales, zeros) else {
                return Err(bad(format!("`{name}.qweight` without its `.scales` and `.zeros`")));
            };
            let groups = s_shape.get(1).copied().unwrap_or(0);
            let fits = shape == [rows, cols * bits as usize / 8]
                && s_shape == z_shape
                && s_shape.first() == Some(&rows)
                && groups > 0
                && cols % groups == 0
                && (cols / groups) % 32 == 0;
            if !fits {
                return Err(bad(format!(
                    "quantized `{name}` has codes {shape:?} and scales {s_shape:?}, which do not fit ({rows}, {cols}) at {bits} bits"
                )));
            }
            let q = QMatrix {
                rows,
                cols,
                bits,
                group_size: cols / groups,
                codes: data.to_vec(),
                scales: floats(scales),
                zeros: floats(zeros),
            };
            params.insert_quantized(name.clone(), q);
            seen += 3;
            continue;
        }
        let Some((shape, data)) = tensor(name, Dtype::F32)? else {
            return Err(bad(format!("no tensor `{name}` (a {} model needs it)", cfg.arch.name())));
        };
        if shape != spec.shape {
            return Err(bad(format!("tensor `{name}` has shape {shape:?}, the config says {:?}", spec.shape)));
        }
        params.insert(name.clone(), Tensor::from_vec(&shape, floats(data)));
        seen += 1;
    }
    let dropped_biases = file
        .names()
        .iter()
        .filter(|n| cfg.arch == Arch::Gpt2 && !cfg.bias && n.ends_with(".bias") && !params.contains(n))
        .count();
    if seen + dropped_biases != file.len() {
        return Err(bad("holds tensors this config does not use".into()));
    }
    Ok(params)
}

/// Write every tensor of the map as little-endian f32.
pub fn save_safetensors(path: &Path, params: &ParamMap) -> Result<(), StageError> {
    save_safetensors_with(path, params, &[])
}

/// [`save_safetensors`] with more metadata beside `format = pt`.
pub fn save_safetensors_with(path: &Path, params: &ParamMap, metadata: &[(&str, String)]) -> Result<(), StageError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = params
        .iter()
        .map(|(name, t)| {
            (name.to_string(), t.shape().to_vec(), t.data().iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.as_str(), v))
                .map_err(|e| fail(format!("tensor `{name}`"))(&e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    meta.extend(metadata.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let out = safetensors::tensor::serialize(views, Some(meta)).map_err(|e| fail("serializing safetensors")(&e))?;
    std::fs::write(path, out).map_err(|e| fail(format!("writing `{}`", path.display()))(&e))
}

/// Write tensors of any type, given as (name, type, shape, little-endian bytes), with
/// `format` as the file's `format` metadata (the cached arrays of `teacher` and `reference`).
pub fn save_raw_tensors(
    path: &Path,
    format: &str,
    tensors: &[(&str, Dtype, Vec<usize>, &[u8])],
) -> Result<(), StageError> {
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (*name, v))
                .map_err(|e| fail(format!("tensor `{name}`"))(&e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta = HashMap::from([("format".to_string(), format.to_string())]);
    let out = safetensors::tensor::serialize(views, Some(meta)).map_err(|e| fail("serializing safetensors")(&e))?;
    std::fs::write(path, out).map_err(|e| fail(format!("writing `{}`", path.display()))(&e))
}

/// Read every f32 tensor of a safetensors file.
pub fn load_safetensors(path: &Path) -> Result<ParamMap, StageError> {
    load_safetensors_with(path).map(|(params, _)| params)
}

/// Every f32 tensor of a safetensors file (in name order) and its metadata.
pub fn load_safetensors_with(path: &Path) -> Result<(ParamMap, HashMap<String, String>), StageError> {
    let bytes = std::fs::read(path).map_err(|e| fail(format!("reading `{}`", path.display()))(&e))?;
    let not_safetensors =
        |e: &dyn std::error::Error| fail(format!("`{}` is not a safetensors file", path.display()))(e);
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| not_safetensors(&e))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let file = SafeTensors::deserialize(&bytes).map_err(|e| not_safetensors(&e))?;
    let mut names = file.names();
    names.sort();
    let mut params = ParamMap::default();
    for name in names {
        let view = file.tensor(name).map_err(|e| fail(format!("tensor `{name}`"))(&e))?;
        if view.dtype() != Dtype::F32 {
            return Err(StageError::msg(format!(
                "`{}`: tensor `{name}` is {:?}, expected F32",
                path.display(),
                view.dtype()
            )));
        }
        let data = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        params.insert(name, Tensor::from_vec(view.shape(), data));
    }
    Ok((params, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::batch::Batch;
    use crate::nn::model::{Activations, Model};

    fn logits(cfg: &ModelConfig, p: &ParamMap, ids: &[u32]) -> Vec<f32> {
        let mut a = Activations::new(cfg, 1, ids.len());
        Model::new(*cfg, p).forward(p, &Batch::whole_rows(ids.len(), ids, ids), &mut a);
        a.logits
    }

    #[test]
    fn models_written_and_read_back_give_identical_logits_and_bytes() {
        let mut llama = ModelConfig::llama(13, 6, 2, 4, 2, 16);
        llama.tie_embeddings = true;
        let exact = ModelConfig { gelu: Gelu::Erf, ..ModelConfig::gpt2(13, 6, 2, 2, 8, false) };
        for cfg in [ModelConfig::gpt2(13, 6, 2, 2, 8, true), ModelConfig::gpt2(13, 6, 2, 2, 8, false), exact, llama] {
            let params = cfg.init(9);
            let dir = tempfile::tempdir().unwrap();
            save_model(dir.path(), &cfg, &params, 0).unwrap();
            let (cfg2, loaded) = load_model(dir.path()).unwrap();
            assert_eq!((cfg2, &loaded), (cfg, &params));
            let ids = [1u32, 5, 7, 12, 0, 3];
            let (a, b) = (logits(&cfg, &params, &ids), logits(&cfg2, &loaded, &ids));
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
            let first = std::fs::read(dir.path().join(WEIGHTS)).unwrap();
            save_model(dir.path(), &cfg2, &loaded, 0).unwrap();
            assert_eq!(first, std::fs::read(dir.path().join(WEIGHTS)).unwrap(), "writing is deterministic");
        }
    }

    /// The names and shapes `transformers` builds for these configs (GPT2LMHeadModel always has
    /// every bias; LlamaForCausalLM with tied embeddings has no `lm_head.weight` in the file).
    #[test]
    fn files_hold_what_hugging_face_expects() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ModelConfig::gpt2(13, 6, 1, 2, 8, false);
        save_model(dir.path(), &cfg, &cfg.init(1), 0).unwrap();
        let file = load_safetensors(&dir.path().join(WEIGHTS)).unwrap();
        let mut names: Vec<(&str, Vec<usize>)> = file.iter().map(|(n, t)| (n, t.shape().to_vec())).collect();
        names.sort();
        let expected: Vec<(&str, Vec<usize>)> = vec![
            ("transformer.h.0.attn.c_attn.bias", vec![24]),
            ("transformer.h.0.attn.c_attn.weight", vec![8, 24]),
            ("transformer.h.0.attn.c_proj.bias", vec![8]),
            ("transformer.h.0.attn.c_proj.weight", vec![8, 8]),
            ("transformer.h.0.ln_1.bias", vec![8]),
            ("transformer.h.0.ln_1.weight", vec![8]),
            ("transformer.h.0.ln_2.bias", vec![8]),
            ("transformer.h.0.ln_2.weight", vec![8]),
            ("transformer.h.0.mlp.c_fc.bias", vec![32]),
            ("transformer.h.0.mlp.c_fc.weight", vec![8, 32]),
            ("transformer.h.0.mlp.c_proj.bias", vec![8]),
            ("transformer.h.0.mlp.c_proj.weight", vec![32, 8]),
            ("transformer.ln_f.bias", vec![8]),
            ("transformer.ln_f.weight", vec![8]),
            ("transformer.wpe.weight", vec![6, 8]),
            ("transformer.wte.weight", vec![13, 8]),
        ];
        assert_eq!(names, expected);
        let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG)).unwrap()).unwrap();
        assert_eq!(config["architectures"][0], "GPT2LMHeadModel");
        assert_eq!(config["n_positions"], 6);

        let mut cfg = ModelConfig::llama(13, 6, 1, 4, 1, 16);
        cfg.ffn_hidden = 24;
        save_model(dir.path(), &cfg, &cfg.init(1), 0).unwrap();
        let file = load_safetensors(&dir.path().join(WEIGHTS)).unwrap();
        let mut names: Vec<(&str, Vec<usize>)> = file.iter().map(|(n, t)| (n, t.shape().to_vec())).collect();
        names.sort();
        let expected: Vec<(&str, Vec<usize>)> = vec![
            ("lm_head.weight", vec![13, 16]),
            ("model.embed_tokens.weight", vec![13, 16]),
            ("model.layers.0.input_layernorm.weight", vec![16]),
            ("model.layers.0.mlp.down_proj.weight", vec![16, 24]),
            ("model.layers.0.mlp.gate_proj.weight", vec![24, 16]),
            ("model.layers.0.mlp.up_proj.weight", vec![24, 16]),
            ("model.layers.0.post_attention_layernorm.weight", vec![16]),
            ("model.layers.0.self_attn.k_proj.weight", vec![4, 16]),
            ("model.layers.0.self_attn.o_proj.weight", vec![16, 16]),
            ("model.layers.0.self_attn.q_proj.weight", vec![16, 16]),
            ("model.layers.0.self_attn.v_proj.weight", vec![4, 16]),
            ("model.norm.weight", vec![16]),
        ];
        assert_eq!(names, expected);
        let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG)).unwrap()).unwrap();
        assert_eq!(config["architectures"][0], "LlamaForCausalLM");
        assert_eq!((config["num_key_value_heads"].as_u64(), config["intermediate_size"].as_u64()), (Some(1), Some(24)));
    }

    #[test]
    fn a_mismatched_model_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ModelConfig::gpt2(13, 6, 1, 2, 8, true);
        save_model(dir.path(), &cfg, &cfg.init(1), 0).unwrap();
        let bigger = ModelConfig::gpt2(13, 6, 2, 2, 8, true);
        std::fs::write(dir.path().join(CONFIG), hf_config(&bigger, 0).to_string()).unwrap();
        let err = load_model(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no tensor `transformer.h.1.ln_1.weight`"), "{err}");
        std::fs::write(dir.path().join(WEIGHTS), b"not a model").unwrap();
        let err = load_model(dir.path()).unwrap_err().to_string();
        assert!(err.contains("model.safetensors` is not a safetensors file"), "{err}");
    }
}
