//! `export`: a model as one file or folder to take elsewhere.
//!
//! - `format = "gguf"`: `model.gguf`, which llama.cpp loads (arch `gpt2` or `llama`), with the
//!   tokenizer inside, in `dtype` f32, f16, q8_0 or q4_0. What llama.cpp's reader needs:
//!   - llama's q and k rows permuted from Hugging Face's rotate-half layout to ggml's adjacent
//!     pairs (within each head, new row `2j` is row `j`, new row `2j + 1` is row `j + D/2`);
//!   - gpt2's `Conv1D` weights transposed to (out, in) rows; zero biases for a gpt2 trained
//!     without them (llama.cpp's gpt2 requires them); a position table of exactly
//!     `context_length` rows;
//!   - norms and biases in f32; with q8_0 or q4_0, `position_embd` in f32 and a matrix whose
//!     rows are no multiple of 32 in f16 (as `llama-quantize` does); with q4_0 the output
//!     projection (the token embedding when tied) in q8_0 (`llama-quantize` gives it a wider
//!     type than the rest).
//!   - the tokenizer as a byte-level BPE (`tokenizer.ggml.model = gpt2`, pre-tokenizer
//!     `gpt-2`): the tokens in GPT-2's byte-to-character alphabet, the merges, token types
//!     (special tokens are control tokens; rows beyond the tokenizer are unused `[PAD{i}]`),
//!     the end-of-text token as bos, eos and eot, and no bos added. A `char` vocabulary is
//!     written in that alphabet too, each multi-byte character built by merges of its bytes.
//! - `format = "hf"`: the Hugging Face folder (`model.safetensors`, `config.json`,
//!   `tokenizer.json`, and a fine-tune's `template.json` and PEFT `adapter/`), ready to upload.
//!
//! `export.json` lists what was written: per GGUF tensor its name, shape and type.

use std::collections::BTreeSet;
use std::path::Path;

use engine::{Accepts, Input, InputSpec, Metrics, ParamProblem, ParamSpec, Params, Stage, StageCtx, StageError};
use serde_json::json;

use crate::adapters::ADAPTER_DIR;
use crate::gguf::{GgmlType, GgufFile, Value};
use crate::instructions::TEMPLATE_FILE;
use crate::model_io::{load_model_with_eot, CONFIG, TOKENIZER, WEIGHTS};
use crate::nn::model::{Arch, ModelConfig};
use crate::nn::params::ParamMap;
use crate::tokenize::byte_char;
use crate::{fail, EXPORT, MODEL};

pub struct Export;

pub const GGUF_FILE: &str = "model.gguf";
pub const ABOUT_FILE: &str = "export.json";

const PARAMS: &[ParamSpec] = &[
    ParamSpec::choice("format", "gguf", &["gguf", "hf"], "a GGUF file for llama.cpp, or the Hugging Face folder"),
    ParamSpec::choice("dtype", "f32", &["f32", "f16", "q8_0", "q4_0"], "gguf: the weights' type"),
    ParamSpec::string("name", None, "gguf: `general.name` (default: the stage's name)"),
];

const INPUTS: &[InputSpec] = &[InputSpec {
    name: "model",
    accepts: Accepts::Artifact(&[MODEL]),
    required: true,
    doc: "a model stage (`pretrain`, `sft`, `distill`, `align`)",
}];

impl Stage for Export {
    fn kind(&self) -> &'static str {
        "export"
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "a model as a GGUF file for llama.cpp (f32, f16, q8_0, q4_0) or a Hugging Face folder"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn inputs(&self) -> &'static [InputSpec] {
        INPUTS
    }
    fn output(&self) -> engine::ArtifactType {
        EXPORT
    }
    fn check(&self, p: &Params, _: &BTreeSet<&str>) -> Result<(), ParamProblem> {
        if p.str("format") == "hf" && p.str("dtype") != "f32" {
            return Err(ParamProblem::new("dtype", "the Hugging Face folder holds the f32 model: dtype is for gguf"));
        }
        Ok(())
    }

    fn run(&self, ctx: &StageCtx<'_>) -> Result<Metrics, StageError> {
        let Input::Artifact { artifact: model_dir, .. } = ctx.required_input("model") else {
            unreachable!("the slot accepts only artifacts");
        };
        let p = ctx.params();
        if p.str("format") == "hf" {
            return export_hf(ctx, &model_dir.dir);
        }
        let (cfg, params, eot) = load_model_with_eot(&model_dir.dir)?;
        let path = model_dir.path(TOKENIZER);
        let text = std::fs::read_to_string(&path).map_err(|e| fail(format!("reading `{}`", path.display()))(&e))?;
        let tokenizer: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| fail(format!("`{}` is not JSON", path.display()))(&e))?;
        let dtype = p.str("dtype");
        let name = p.opt_str("name").unwrap_or(ctx.stage());
        let file = gguf_model(&cfg, &params, &tokenizer, eot, dtype, name)?;
        file.write(&ctx.out(GGUF_FILE))?;
        let bytes = std::fs::metadata(ctx.out(GGUF_FILE)).map(|m| m.len()).unwrap_or(0);
        let tensors: Vec<_> =
            file.tensors.iter().map(|t| json!({ "name": t.name, "shape": t.shape, "type": t.ty.name() })).collect();
        let about =
            json!({ "format": "gguf", "dtype": dtype, "arch": cfg.arch.name(), "bytes": bytes, "tensors": tensors });
        write_json(&ctx.out(ABOUT_FILE), &about)?;
        let f32_bytes = std::fs::metadata(model_dir.path(WEIGHTS)).map(|m| m.len()).unwrap_or(0);
        Ok(Metrics::from([
            ("bytes".into(), json!(bytes)),
            ("tensors".into(), json!(file.tensors.len())),
            ("size_ratio".into(), json!(crate::round(bytes as f64 / f32_bytes.max(1) as f64, 4))),
        ]))
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), StageError> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize") + "\n";
    std::fs::write(path, text).map_err(|e| fail(format!("writing `{}`", path.display()))(&e))
}

/// The Hugging Face folder: the model directory's files that `transformers` and PEFT read.
fn export_hf(ctx: &StageCtx<'_>, dir: &Path) -> Result<Metrics, StageError> {
    let mut files = Vec::new();
    for file in [WEIGHTS, CONFIG, TOKENIZER, TEMPLATE_FILE] {
        if dir.join(file).is_file() {
            std::fs::copy(dir.join(file), ctx.out(file)).map_err(|e| fail(format!("copying {file}"))(&e))?;
            files.push(file.to_string());
        }
    }
    if dir.join(ADAPTER_DIR).is_dir() {
        std::fs::create_dir_all(ctx.out(ADAPTER_DIR)).map_err(|e| fail("creating adapter/")(&e))?;
        let entries = std::fs::read_dir(dir.join(ADAPTER_DIR)).map_err(|e| fail("reading adapter/")(&e))?;
        let mut names: Vec<_> = entries.filter_map(Result::ok).map(|e| e.file_name()).collect();
        names.sort();
        for name in names {
            let to = ctx.out(ADAPTER_DIR).join(&name);
            std::fs::copy(dir.join(ADAPTER_DIR).join(&name), to).map_err(|e| fail("copying the adapter")(&e))?;
            files.push(format!("{ADAPTER_DIR}/{}", name.to_string_lossy()));
        }
    }
    write_json(&ctx.out(ABOUT_FILE), &json!({ "format": "hf", "files": files }))?;
    Ok(Metrics::from([("files".into(), json!(files.len()))]))
}

/// The GGUF file of a model: metadata, tokenizer and tensors (see the module's documentation).
pub fn gguf_model(
    cfg: &ModelConfig,
    params: &ParamMap,
    tokenizer: &serde_json::Value,
    eot: u32,
    dtype: &str,
    name: &str,
) -> Result<GgufFile, StageError> {
    let mut f = GgufFile::default();
    let arch = cfg.arch.name();
    let u32_of = |x: usize| Value::U32(x as u32);
    f.set("general.architecture", Value::Str(arch.into()));
    f.set("general.name", Value::Str(name.into()));
    let file_type = match dtype {
        "f32" => 0,
        "f16" => 1,
        "q4_0" => 2,
        _ => 7,
    };
    f.set("general.file_type", Value::U32(file_type));
    if matches!(dtype, "q8_0" | "q4_0") {
        f.set("general.quantization_version", Value::U32(2));
    }
    f.set("general.alignment", u32_of(crate::gguf::ALIGNMENT));
    f.set(&format!("{arch}.context_length"), u32_of(cfg.block_size));
    f.set(&format!("{arch}.embedding_length"), u32_of(cfg.n_embd));
    f.set(&format!("{arch}.block_count"), u32_of(cfg.n_layer));
    f.set(&format!("{arch}.feed_forward_length"), u32_of(cfg.ffn_hidden));
    f.set(&format!("{arch}.attention.head_count"), u32_of(cfg.n_head));
    match cfg.arch {
        Arch::Gpt2 => f.set("gpt2.attention.layer_norm_epsilon", Value::F32(cfg.norm_eps)),
        Arch::Llama => {
            f.set("llama.attention.head_count_kv", u32_of(cfg.n_kv_head));
            f.set("llama.attention.layer_norm_rms_epsilon", Value::F32(cfg.norm_eps));
            f.set("llama.rope.freq_base", Value::F32(cfg.rope_theta));
            f.set("llama.rope.dimension_count", u32_of(cfg.head_dim()));
            f.set("llama.vocab_size", u32_of(cfg.vocab_size));
        }
    }
    for (key, value) in tokenizer_keys(tokenizer, cfg.vocab_size, eot)? {
        f.set(key, value);
    }
    for (gguf_name, shape, data) in tensors(cfg, params) {
        let ty = tensor_type(dtype, &gguf_name, &shape, cfg.tie_embeddings || cfg.arch == Arch::Gpt2);
        f.add_tensor(&gguf_name, &shape, ty, &data);
    }
    Ok(f)
}

/// The type a tensor is written as (see the module's documentation).
fn tensor_type(dtype: &str, name: &str, shape: &[usize], tied: bool) -> GgmlType {
    let width = *shape.last().expect("a tensor has a dimension");
    let output = name == "output.weight" || tied && name == "token_embd.weight";
    match dtype {
        _ if shape.len() == 1 => GgmlType::F32,
        "f32" => GgmlType::F32,
        "f16" => GgmlType::F16,
        _ if name == "position_embd.weight" => GgmlType::F32,
        _ if !width.is_multiple_of(crate::gguf::BLOCK) => GgmlType::F16,
        "q4_0" if !output => GgmlType::Q4_0,
        _ => GgmlType::Q8_0,
    }
}

/// Every tensor llama.cpp's `gpt2` or `llama` reads, by its GGUF name, in PyTorch shape
/// (out, in), with its values.
fn tensors(cfg: &ModelConfig, params: &ParamMap) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let (c, f, v) = (cfg.n_embd, cfg.ffn_hidden, cfg.vocab_size);
    let mut out: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let get = |name: &str| params.get(name).to_vec();
    // gpt2 without biases: llama.cpp's gpt2 requires them, and zeros compute the same.
    let bias = |name: &str, n: usize| if params.contains(name) { get(name) } else { vec![0.0; n] };
    match cfg.arch {
        Arch::Gpt2 => {
            out.push(("token_embd.weight".into(), vec![v, c], get("transformer.wte.weight")));
            out.push(("position_embd.weight".into(), vec![cfg.block_size, c], get("transformer.wpe.weight")));
            for l in 0..cfg.n_layer {
                let hf = |s: &str| format!("transformer.h.{l}.{s}");
                let mut push =
                    |s: &str, shape: Vec<usize>, data: Vec<f32>| out.push((format!("blk.{l}.{s}"), shape, data));
                push("attn_norm.weight", vec![c], get(&hf("ln_1.weight")));
                push("attn_norm.bias", vec![c], bias(&hf("ln_1.bias"), c));
                push("attn_qkv.weight", vec![3 * c, c], transpose(&get(&hf("attn.c_attn.weight")), c, 3 * c));
                push("attn_qkv.bias", vec![3 * c], bias(&hf("attn.c_attn.bias"), 3 * c));
                push("attn_output.weight", vec![c, c], transpose(&get(&hf("attn.c_proj.weight")), c, c));
                push("attn_output.bias", vec![c], bias(&hf("attn.c_proj.bias"), c));
                push("ffn_norm.weight", vec![c], get(&hf("ln_2.weight")));
                push("ffn_norm.bias", vec![c], bias(&hf("ln_2.bias"), c));
                push("ffn_up.weight", vec![f, c], transpose(&get(&hf("mlp.c_fc.weight")), c, f));
                push("ffn_up.bias", vec![f], bias(&hf("mlp.c_fc.bias"), f));
                push("ffn_down.weight", vec![c, f], transpose(&get(&hf("mlp.c_proj.weight")), f, c));
                push("ffn_down.bias", vec![c], bias(&hf("mlp.c_proj.bias"), c));
            }
            out.push(("output_norm.weight".into(), vec![c], get("transformer.ln_f.weight")));
            out.push(("output_norm.bias".into(), vec![c], bias("transformer.ln_f.bias", c)));
        }
        Arch::Llama => {
            let (d, ckv) = (cfg.head_dim(), cfg.n_kv_head * cfg.head_dim());
            out.push(("token_embd.weight".into(), vec![v, c], get("model.embed_tokens.weight")));
            for l in 0..cfg.n_layer {
                let hf = |s: &str| get(&format!("model.layers.{l}.{s}"));
                let mut push =
                    |s: &str, shape: Vec<usize>, data: Vec<f32>| out.push((format!("blk.{l}.{s}"), shape, data));
                push("attn_norm.weight", vec![c], hf("input_layernorm.weight"));
                push("attn_q.weight", vec![c, c], rotary_pairs(&hf("self_attn.q_proj.weight"), cfg.n_head, d, c));
                push("attn_k.weight", vec![ckv, c], rotary_pairs(&hf("self_attn.k_proj.weight"), cfg.n_kv_head, d, c));
                push("attn_v.weight", vec![ckv, c], hf("self_attn.v_proj.weight"));
                push("attn_output.weight", vec![c, c], hf("self_attn.o_proj.weight"));
                push("ffn_norm.weight", vec![c], hf("post_attention_layernorm.weight"));
                push("ffn_gate.weight", vec![f, c], hf("mlp.gate_proj.weight"));
                push("ffn_up.weight", vec![f, c], hf("mlp.up_proj.weight"));
                push("ffn_down.weight", vec![c, f], hf("mlp.down_proj.weight"));
            }
            out.push(("output_norm.weight".into(), vec![c], get("model.norm.weight")));
            if !cfg.tie_embeddings {
                out.push(("output.weight".into(), vec![v, c], get("lm_head.weight")));
            }
        }
    }
    out
}

/// `w` (rows, cols) transposed to (cols, rows).
fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// Rows of a q or k projection (heads * d, cols) reordered from rotate-half pairs `(j, j + d/2)`
/// to adjacent pairs `(2j, 2j + 1)`, head by head.
pub fn rotary_pairs(w: &[f32], heads: usize, d: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; w.len()];
    for h in 0..heads {
        for j in 0..d / 2 {
            for (new, old) in [(2 * j, j), (2 * j + 1, j + d / 2)] {
                let (to, from) = ((h * d + new) * cols, (h * d + old) * cols);
                out[to..to + cols].copy_from_slice(&w[from..from + cols]);
            }
        }
    }
    out
}

/// The `tokenizer.ggml.*` keys of a Hugging Face `tokenizer.json` with a BPE model.
fn tokenizer_keys(
    tok: &serde_json::Value,
    vocab_size: usize,
    eot: u32,
) -> Result<Vec<(&'static str, Value)>, StageError> {
    let model = &tok["model"];
    if model["type"] != "BPE" {
        return Err(StageError::msg(format!(
            "llama.cpp reads byte-level BPE tokenizers, and this model's is {}: export with format = \"hf\"",
            model["type"]
        )));
    }
    let byte_level = is_byte_level(&tok["pre_tokenizer"]);
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![1i32; vocab_size];
    let mut merges: Vec<String> = Vec::new();
    let vocab = model["vocab"].as_object().map(|m| m.iter().collect::<Vec<_>>()).unwrap_or_default();
    for (text, id) in vocab {
        let id = id.as_u64().unwrap_or(u64::MAX) as usize;
        if id < vocab_size {
            tokens[id] = Some(if byte_level { text.clone() } else { in_byte_alphabet(text, &mut merges) });
        }
    }
    for added in tok["added_tokens"].as_array().into_iter().flatten() {
        let id = added["id"].as_u64().unwrap_or(u64::MAX) as usize;
        if id < vocab_size {
            tokens[id] = added["content"].as_str().map(String::from);
            if added["special"].as_bool() == Some(true) {
                types[id] = 3;
            }
        }
    }
    let file_merges = model["merges"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !byte_level && !file_merges.is_empty() {
        return Err(StageError::msg(
            "this tokenizer merges characters without byte-level pre-tokenization, which llama.cpp's BPE cannot reproduce: export with format = \"hf\"",
        ));
    }
    for m in file_merges {
        match (m.as_str(), m.as_array()) {
            (Some(s), _) => merges.push(s.to_string()),
            (_, Some(pair)) if pair.len() == 2 => {
                merges.push(format!("{} {}", pair[0].as_str().unwrap_or(""), pair[1].as_str().unwrap_or("")))
            }
            _ => return Err(StageError::msg(format!("tokenizer.json has a merge that is not a pair: {m}"))),
        }
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let mut seen = BTreeSet::new();
    merges.retain(|m| seen.insert(m.clone()));
    let distinct: BTreeSet<&String> = tokens.iter().collect();
    if distinct.len() != tokens.len() {
        return Err(StageError::msg("two tokens of the vocabulary have the same text, which llama.cpp refuses"));
    }
    Ok(vec![
        ("tokenizer.ggml.model", Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Value::Str("gpt-2".into())),
        ("tokenizer.ggml.tokens", Value::Strs(tokens)),
        ("tokenizer.ggml.token_type", Value::I32s(types)),
        ("tokenizer.ggml.merges", Value::Strs(merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(eot)),
        ("tokenizer.ggml.eos_token_id", Value::U32(eot)),
        ("tokenizer.ggml.eot_token_id", Value::U32(eot)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
    ])
}

/// Whether a `pre_tokenizer` is (or contains) a ByteLevel one.
fn is_byte_level(pre: &serde_json::Value) -> bool {
    pre["type"] == "ByteLevel" || pre["pretokenizers"].as_array().is_some_and(|items| items.iter().any(is_byte_level))
}

/// A character token's text in GPT-2's byte alphabet; a character of several bytes also gets
/// the merges that build it from its bytes, left to right.
fn in_byte_alphabet(text: &str, merges: &mut Vec<String>) -> String {
    let chars: Vec<String> = text.bytes().map(|b| byte_char(b).to_string()).collect();
    let mut built = chars[0].clone();
    for next in &chars[1..] {
        merges.push(format!("{built} {next}"));
        built.push_str(next);
    }
    built
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml's NORM rotary embedding on the permuted rows gives the scores Hugging Face's
    /// rotate-half gives on the original rows.
    #[test]
    fn permuted_rows_rotate_in_adjacent_pairs_as_the_originals_do_in_halves() {
        let (heads, d, cols, pos) = (2, 8, 3, 5.0f32);
        let w: Vec<f32> = (0..heads * d * cols).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        let x = [0.3f32, -1.2, 0.7];
        let project = |w: &[f32]| -> Vec<f32> {
            w.chunks(cols).map(|row| row.iter().zip(&x).map(|(a, b)| a * b).sum()).collect()
        };
        let angle = |i: usize| pos / 10_000f32.powf(2.0 * i as f32 / d as f32);
        let halves = |q: &[f32]| -> Vec<f32> {
            let mut out = q.to_vec();
            for h in 0..heads {
                for i in 0..d / 2 {
                    let (a, b) = (q[h * d + i], q[h * d + i + d / 2]);
                    let (s, c) = angle(i).sin_cos();
                    out[h * d + i] = a * c - b * s;
                    out[h * d + i + d / 2] = b * c + a * s;
                }
            }
            out
        };
        let adjacent = |q: &[f32]| -> Vec<f32> {
            let mut out = q.to_vec();
            for h in 0..heads {
                for i in 0..d / 2 {
                    let (a, b) = (q[h * d + 2 * i], q[h * d + 2 * i + 1]);
                    let (s, c) = angle(i).sin_cos();
                    out[h * d + 2 * i] = a * c - b * s;
                    out[h * d + 2 * i + 1] = b * c + a * s;
                }
            }
            out
        };
        let ours = halves(&project(&w));
        let theirs = adjacent(&project(&rotary_pairs(&w, heads, d, cols)));
        // The same vectors up to the order of their elements within each head: dot products
        // of two such vectors (attention scores) agree.
        for h in 0..heads {
            let a: Vec<f32> = (0..d).map(|i| ours[h * d + i]).collect();
            let mut b: Vec<f32> = (0..d / 2).map(|j| theirs[h * d + 2 * j]).collect();
            b.extend((0..d / 2).map(|j| theirs[h * d + 2 * j + 1]));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn char_tokens_are_written_in_the_byte_alphabet_with_merges_for_wide_characters() {
        let mut merges = Vec::new();
        assert_eq!(in_byte_alphabet("a", &mut merges), "a");
        assert_eq!(in_byte_alphabet(" ", &mut merges), "\u{120}");
        assert!(merges.is_empty());
        assert_eq!(in_byte_alphabet("é", &mut merges), "\u{c3}\u{a9}");
        assert_eq!(merges, ["\u{c3} \u{a9}"]);
        let tok = json!({
            "model": { "type": "BPE", "vocab": { "a": 0, "\n": 1, "é": 2 }, "merges": [] },
            "pre_tokenizer": null,
            "added_tokens": [{ "id": 3, "content": "<|endoftext|>", "special": true }],
        });
        let keys = tokenizer_keys(&tok, 5, 3).unwrap();
        let get = |k: &str| keys.iter().find(|(key, _)| *key == k).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(
            get("tokenizer.ggml.tokens"),
            Value::Strs(vec![
                "a".into(),
                "\u{10a}".into(),
                "\u{c3}\u{a9}".into(),
                "<|endoftext|>".into(),
                "[PAD4]".into()
            ])
        );
        assert_eq!(get("tokenizer.ggml.token_type"), Value::I32s(vec![1, 1, 1, 3, 5]));
        assert_eq!(get("tokenizer.ggml.eos_token_id"), Value::U32(3));
    }
}
