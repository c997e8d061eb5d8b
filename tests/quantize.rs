//! Quantization end to end: calibration statistics cached once for every bit width, int8 and
//! int4 models that `evaluate` and `sample` run without dequantizing them whole, their reports,
//! and the same bits whatever the thread count or instruction set; and speculative decoding
//! with a draft model, whose greedy text is plain decoding's.

use serde_json::Value;
use stages::model_io::{load_model, load_model_with_eot};
use stages::nn::batch::Batch;
use stages::nn::model::{Activations, Model};

use crate::util::{artifact, assert_success, ran, stage, Sandbox};

fn val_loss(run: &Value, name: &str) -> f64 {
    stage(run, name)["metrics"]["val_loss"].as_f64().unwrap()
}

fn report(sb: &Sandbox, run: &Value, name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(artifact(sb, run, name).join("report.json")).unwrap()).unwrap()
}

#[test]
fn quantized_models_score_close_to_the_f32_model_and_reuse_the_calibration() {
    let sb = Sandbox::new();
    let run = sb.run_json("quantize.toml", &[]);
    let f32_loss = val_loss(&run, "eval_f32");
    let int8 = val_loss(&run, "eval_int8");
    assert!((int8 - f32_loss).abs() / f32_loss < 0.005, "int8 {int8} vs f32 {f32_loss}");
    for int4 in ["eval_hqq4", "eval_gptq4"] {
        let loss = val_loss(&run, int4);
        assert!((loss - f32_loss).abs() / f32_loss < 0.05, "{int4} {loss} vs f32 {f32_loss}");
    }

    // Reports: every matrix with its errors and bytes; int4 with the embedding is under 30% of f32.
    let gptq = report(&sb, &run, "gptq4");
    let hqq = report(&sb, &run, "hqq4");
    let layers = gptq["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2 * 4 + 1, "two blocks of four matrices, and the tied embedding");
    for l in layers {
        assert!(l["weight_mse"].as_f64().unwrap() > 0.0 && l["output_mse"].as_f64().unwrap() > 0.0, "{l}");
        assert!(l["bytes"].as_u64().unwrap() * 4 < l["f32_bytes"].as_u64().unwrap(), "{l}");
    }
    assert!(gptq["size_ratio"].as_f64().unwrap() <= 0.30, "{}", gptq["size_ratio"]);
    // GPTQ minimises the output error on the calibration data, HQQ the weights' error.
    let (g, h) = (gptq["mean_output_mse"].as_f64().unwrap(), hqq["mean_output_mse"].as_f64().unwrap());
    assert!(g < h, "gptq {g} vs hqq {h}");
    let int8 = report(&sb, &run, "int8");
    assert_eq!(int8["layers"].as_array().unwrap().len(), 8, "the embedding stays f32 by default");
    assert!(int8["mean_weight_mse"].as_f64().unwrap() * 50.0 < gptq["mean_weight_mse"].as_f64().unwrap());

    // The quantized directory loads with its matrices held quantized, and its logits are those
    // of the model the codes stand for.
    let (cfg, params, _) = load_model_with_eot(&artifact(&sb, &run, "gptq4")).unwrap();
    assert!(params.has_quantized());
    let (_, f32_params) = load_model(&artifact(&sb, &run, "pretrain")).unwrap();
    let ids: Vec<u32> = (0..20).map(|i| (i * 7 % cfg.vocab_size) as u32).collect();
    let logits = |p: &stages::nn::params::ParamMap| {
        let mut acts = Activations::inference(&Model::new(cfg, p), 1, ids.len());
        Model::new(cfg, p).forward(p, &Batch::whole_rows(ids.len(), &ids, &ids), &mut acts);
        acts.logits
    };
    let (q, f) = (logits(&params), logits(&f32_params));
    let diff = q.iter().zip(&f).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(diff > 0.0 && diff < 0.5, "int4 logits move, a little: {diff}");

    // Another bit width or group size reuses the calibration.
    let again = sb.run_json("quantize.toml", &["--set", "gptq4.bits=8", "--set", "hqq4.group_size=64"]);
    assert_eq!(ran(&again), ["hqq4", "gptq4", "eval_hqq4", "eval_gptq4"]);

    // `sample` takes a quantized stage like any model.
    let out = sb.tinygpt(&["sample", "quantize.toml", "gptq4", "--prompt", "The", "--max-new-tokens", "8"]);
    assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("The"));
}

/// Runs the recipe's int4 GPTQ evaluation under `env`; returns `eval.json`.
fn quantized_eval_with(env: &[(&str, &str)]) -> String {
    let sb = Sandbox::new();
    let out = sb.command().envs(env.iter().copied()).args(["run", "quantize.toml", "--json"]).output().unwrap();
    assert_success(&out);
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    std::fs::read_to_string(artifact(&sb, &run, "eval_gptq4").join("eval.json")).unwrap()
}

#[test]
fn quantized_evaluation_is_the_same_on_one_thread_two_threads_and_the_portable_kernels() {
    let two = quantized_eval_with(&[("RAYON_NUM_THREADS", "2")]);
    assert_eq!(quantized_eval_with(&[("RAYON_NUM_THREADS", "1")]), two);
    assert_eq!(quantized_eval_with(&[("TINYGPT_SIMD", "portable")]), two);
}

#[test]
fn bad_quantization_settings_are_refused_with_their_place() {
    let sb = Sandbox::new();
    for (sets, message) in [
        (&["--set", "int8.bits=6"][..], "6 bits: use 8 or 4"),
        (&["--set", "int8.group_size=48"][..], "48 is not a multiple of 32"),
        (&["--set", "hqq4.symmetric=true"][..], "hqq fits a zero point per group"),
    ] {
        let out = sb.tinygpt(&[&["plan", "quantize.toml"][..], sets].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{sets:?}: {err}");
        assert!(err.contains(message), "{sets:?}: {err}");
    }
    // GPTQ without statistics, at the line of its method.
    let recipe = std::fs::read_to_string(sb.path("quantize.toml")).unwrap();
    let at = recipe.find("[stages.gptq4]").unwrap();
    sb.write("bad.toml", format!("{}{}", &recipe[..at], recipe[at..].replacen("calibration = \"calibrate\"\n", "", 1)));
    // Its 1-based line in bad.toml, one above its place in the recipe.
    let line = recipe.lines().position(|l| l == "method = \"gptq\"").unwrap();
    let out = sb.tinygpt(&["plan", "bad.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("gptq needs the inputs' statistics") && err.contains(&format!("bad.toml:{line}:")), "{err}");
    // A width that is no multiple of the group: refused when the recipe is resolved, before
    // anything runs, naming the matrix and pointing at the key; or kept in f32 on request.
    let out = sb.tinygpt(&["run", "quantize.toml", "--set", "int8.group_size=128"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "stage `int8`: `transformer.h.0.attn.c_attn.weight` has 64 inputs, not a multiple of group_size 128"
        ),
        "{err}"
    );
    let built = std::fs::read_dir(sb.store().join("artifacts")).map_or(0, |d| d.count());
    assert_eq!(built, 0, "nothing ran: {err}");
    // Written in the file: the error points at its line (the first group_size, int8's).
    let line = recipe.lines().position(|l| l == "group_size = 32").unwrap() + 1;
    sb.write("wide_groups.toml", recipe.replacen("group_size = 32\n", "group_size = 96\n", 1));
    let out = sb.tinygpt(&["plan", "wide_groups.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let place = format!("wide_groups.toml:{line}:");
    assert!(err.contains("has 64 inputs, not a multiple of group_size 96") && err.contains(&place), "{err}");
    let run = sb.run_json("quantize.toml", &["--set", "int8.group_size=128", "--set", "int8.indivisible=\"keep\""]);
    let kept = report(&sb, &run, "int8");
    let layers: Vec<&str> = kept["layers"].as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(layers, ["transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.weight"], "256 inputs");
    assert_eq!(kept["kept_f32"].as_array().unwrap().len(), 6);
}

fn eval_json(sb: &Sandbox, run: &Value, name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(artifact(sb, run, name).join("eval.json")).unwrap()).unwrap()
}

#[test]
fn speculative_greedy_text_is_plain_greedy_text() {
    let sb = Sandbox::new();
    let run = sb.run_json("quantize.toml", &[]);
    let spec = eval_json(&sb, &run, "eval_speculative");
    let plain = eval_json(&sb, &run, "eval_f32");
    assert_eq!(spec["samples"], plain["samples"], "the same prompt, seed and greedy decoding");
    assert_eq!(spec["speculative"]["same_text_as_plain"], true);
    let acceptance = spec["speculative"]["acceptance"].as_f64().unwrap();
    assert!(acceptance > 0.0 && acceptance <= 1.0, "{spec}");
    assert!(spec["speculative"]["proposed"].as_u64().unwrap() >= 3);
    let metrics = &stage(&run, "eval_speculative")["metrics"];
    assert!(metrics["speculative_speedup"].as_f64().unwrap() > 0.0);

    // Longer than the block (32): the caches restart at the same tokens as plain decoding's.
    let long = ["--set", "eval_speculative.max_new_tokens=100", "--set", "eval_f32.max_new_tokens=100"];
    let run = sb.run_json("quantize.toml", &long);
    let (spec, plain) = (eval_json(&sb, &run, "eval_speculative"), eval_json(&sb, &run, "eval_f32"));
    assert_eq!(spec["samples"], plain["samples"]);
    assert!(spec["samples"][0]["text"].as_str().unwrap().len() > 40, "{spec}");

    // Sampling: the draft's proposals are verified against the model's distribution.
    let sampled = sb.run_json("quantize.toml", &["--set", "eval_speculative.temperature=0.9"]);
    let text = eval_json(&sb, &sampled, "eval_speculative")["samples"][0]["text"].as_str().unwrap().to_string();
    assert!(!text.is_empty());

    // `sample --draft`: the same greedy text as without.
    let args =
        ["sample", "quantize.toml", "pretrain", "--prompt", "The", "--temperature", "0", "--max-new-tokens", "50"];
    let without = sb.tinygpt(&args);
    let with = sb.tinygpt(&[&args[..], &["--draft", "draft", "--draft-tokens", "4"]].concat());
    assert_success(&without);
    assert_success(&with);
    assert_eq!(with.stdout, without.stdout);
    assert!(String::from_utf8_lossy(&with.stderr).contains("proposals kept"));
}

#[test]
fn a_draft_with_another_vocabulary_is_refused_before_anything_runs() {
    let sb = Sandbox::new();
    let recipe = std::fs::read_to_string(sb.path("quantize.toml")).unwrap();
    let other = "\n[stages.bytes]\nkind = \"tokenize\"\ninput = \"corpus\"\nalgorithm = \"byte\"\n\n\
                 [stages.pack_bytes]\nkind = \"pack\"\ndata = \"bytes\"\nseq_len = 32\n";
    sb.write(
        "bad.toml",
        recipe.replace(
            "[stages.draft]\nkind = \"pretrain\"\ndata = \"pack\"",
            "[stages.draft]\nkind = \"pretrain\"\ndata = \"pack_bytes\"",
        ) + other,
    );
    let out = sb.tinygpt(&["plan", "bad.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("eval_speculative") && err.contains("draft") && err.contains("tokeniz"), "{err}");
}
