//! Cross-check against Hugging Face `transformers`: models that `pretrain` writes load as
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
    let mut args: Vec<PathBuf> = Vec::new();
    let mut expected = Vec::new();
    for (set, class) in variants {
        let run = sb.run_json("train.toml", &[&small[..], set].concat());
        args.push(artifact(&sb, &run, "pretrain"));
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
