//! Cross-check against Hugging Face `transformers`: models that `pretrain` and `sft` write load as
//! `GPT2LMHeadModel` and `LlamaForCausalLM` (their Flax classes, which read safetensors without
//! PyTorch), strictly (no weight missing, unused or misshapen), and give the validation loss
//! that `evaluate` reports on the same blocks.
//!
//! Needs a Python with `transformers` (4.x), `flax`, `jax` and `pyarrow`: `TINYGPT_PYTHON`, or
//! else `python3`. `.ci/run` installs them; elsewhere the test says it skips, and under CI
//! (`CI` set) their absence is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::util::{artifact, Sandbox};

fn python() -> Option<PathBuf> {
    let python = PathBuf::from(std::env::var_os("TINYGPT_PYTHON").unwrap_or_else(|| "python3".into()));
    let probe = Command::new(&python).args(["-c", "import transformers, flax, pyarrow"]).output();
    match probe {
        Ok(out) if out.status.success() => Some(python),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{} cannot import transformers, flax and pyarrow; .ci/run installs them", python.display())
        }
        _ => None,
    }
}

#[test]
fn transformers_loads_every_architecture_and_agrees_on_the_validation_loss() {
    let Some(python) = python() else {
        eprintln!("SKIPPED: no Python with transformers, flax and pyarrow (set TINYGPT_PYTHON; .ci/run installs them)");
        return;
    };
    let sb = Sandbox::new();
    // Trained long enough (60 steps) that its logits are far from uniform, so a weight read
    // in the wrong place would move the loss well past the tolerance.
    let small = ["--set", "evaluate.max_new_tokens=4"];
    let variants: [(&[&str], &str); 4] = [
        (&[], "FlaxGPT2LMHeadModel"),
        (&["--set", "pretrain.bias=true", "--set", "pretrain.activation=gelu"], "FlaxGPT2LMHeadModel"),
        // Padded data: the last validation block's padding is scored on neither side.
        (&["--set", "pretrain.arch=llama", "--set", "pack.remainder=pad"], "FlaxLlamaForCausalLM"),
        (
            &[
                "--set",
                "pretrain.arch=llama",
                "--set",
                "pretrain.n_kv_head=1",
                "--set",
                "pretrain.tie_embeddings=false",
            ],
            "FlaxLlamaForCausalLM",
        ),
    ];
    // A LoRA fine-tune of a llama, merged: scored on the pretraining validation blocks.
    let tuned: [&str; 6] =
        ["--set", "evaluate.data=pack", "--set", "evaluate.max_new_tokens=4", "--set", "sft.max_steps=30"];
    let runs = variants
        .iter()
        .map(|(set, class)| ("train.toml", "pretrain", [&small[..], set].concat(), *class))
        .chain([("sft.toml", "sft", tuned.to_vec(), "FlaxLlamaForCausalLM")]);
    let mut args: Vec<PathBuf> = Vec::new();
    let mut expected = Vec::new();
    for (recipe, model, set, class) in runs {
        let run = sb.run_json(recipe, &set);
        args.push(artifact(&sb, &run, model));
        args.push(artifact(&sb, &run, "pack").join("val.arrow"));
        let eval: Value =
            serde_json::from_slice(&std::fs::read(artifact(&sb, &run, "evaluate").join("eval.json")).unwrap()).unwrap();
        expected.push((set, class, eval["val_loss"].as_f64().unwrap(), eval["val_tokens"].clone()));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/crosscheck/hf_loss.py");
    let out = Command::new(&python).arg(script).args(&args).output().expect("python runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the cross-check failed:\n{stderr}");
    let lines: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), expected.len(), "one result per model:\n{stderr}");
    for (got, (set, class, ours, tokens)) in lines.iter().zip(expected) {
        assert_eq!(got["class"], class, "{set:?}");
        assert_eq!(got["tokens"], tokens, "{set:?}: both score the same targets");
        let theirs = got["val_loss"].as_f64().unwrap();
        assert!((theirs - ours).abs() < 2e-5 * ours, "{set:?}: transformers {theirs}, tinygpt {ours}");
        eprintln!("{set:?}: transformers {theirs:.6}, tinygpt {ours:.6}");
    }
}

/// PEFT loads the base model plus `sft`'s `adapter/` (gpt2's Conv1D layout with
/// `fan_in_fan_out`, llama's, llama's with DoRA, and a PiSSA start converted for saving) and gives the logits of tinygpt's merged model. Needs a
/// Python with torch, transformers and peft; without them it says it skips (PyTorch is a large
/// download that `.ci/run` does not make).
#[test]
fn peft_loads_the_adapter_and_gives_the_merged_models_logits() {
    let python = PathBuf::from(std::env::var_os("TINYGPT_PYTHON").unwrap_or_else(|| "python3".into()));
    let probe = Command::new(&python).args(["-c", "import torch, transformers, peft"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: no Python with torch, transformers and peft (pip install torch transformers peft; set TINYGPT_PYTHON)");
        return;
    }
    let sb = Sandbox::new();
    let variants = [
        ("llama", "false", "kaiming"),
        ("gpt2", "false", "kaiming"),
        ("llama", "true", "kaiming"),
        ("gpt2", "false", "pissa"),
    ];
    for (arch, dora, init) in variants {
        let sets = ["pretrain.arch", arch, "sft.use_dora", dora, "sft.lora_init", init];
        let sets: Vec<String> =
            sets.chunks(2).flat_map(|kv| ["--set".to_string(), format!("{}={}", kv[0], kv[1])]).collect();
        let sets: Vec<&str> = sets.iter().map(String::as_str).chain(["--set", "sft.max_steps=30"]).collect();
        let run = sb.run_json("sft.toml", &sets);
        let (base, tuned) = (artifact(&sb, &run, "pretrain"), artifact(&sb, &run, "sft"));
        let ids: Vec<u32> = "Q: What is 2 plus 3?\nA: 5".bytes().map(u32::from).collect();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/crosscheck/peft_logits.py");
        let out = Command::new(&python)
            .arg(script)
            .arg(&base)
            .arg(tuned.join("adapter"))
            .args(ids.iter().map(u32::to_string))
            .output()
            .expect("python runs");
        assert!(
            out.status.success(),
            "{arch} (DoRA {dora}, {init}): PEFT failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs: Value = serde_json::from_slice(&out.stdout).unwrap();
        let (cfg, params) = stages::model_io::load_model(&tuned).unwrap();
        let model = stages::nn::model::Model::new(cfg, &params);
        let batch = stages::nn::batch::Batch::whole_rows(ids.len(), &ids, &ids);
        let mut acts = stages::nn::model::Activations::inference(&model, 1, ids.len());
        model.forward(&params, &batch, &mut acts);
        let theirs: Vec<f64> = theirs["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
            .collect();
        assert_eq!(theirs.len(), acts.logits.len());
        let worst = theirs.iter().zip(&acts.logits).map(|(a, b)| (a - *b as f64).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-4, "{arch} (DoRA {dora}, {init}): PEFT's logits differ from the merged model's by {worst}");
        eprintln!("{arch} (DoRA {dora}, {init}): PEFT and the merged model agree to {worst:.2e}");
    }
}
