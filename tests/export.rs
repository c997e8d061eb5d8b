//! Export end to end: GGUF files of a gpt2 (character vocabulary) and a llama (byte-level BPE)
//! in f32, f16, q8_0 and q4_0, checked by gguf-py (the format's Python reference: every tensor,
//! Q8_0 and Q4_0 bytes equal to its quantizer's, offsets, key types, tokenizer) and, where
//! llama-cpp-python is installed, run by llama.cpp against our logits; and the Hugging Face
//! folder with a fine-tune's PEFT adapter.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use stages::model_io::load_model;
use stages::nn::batch::Batch;
use stages::nn::model::{Activations, Model};

use crate::util::{artifact, ran, stage, Sandbox};

fn python_with_gguf() -> Option<PathBuf> {
    let python = PathBuf::from(std::env::var_os("TINYGPT_PYTHON").unwrap_or_else(|| "python3".into()));
    let probe = Command::new(&python).args(["-c", "import gguf, numpy, safetensors"]).output();
    match probe {
        Ok(out) if out.status.success() => Some(python),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{} cannot import gguf, numpy and safetensors; .ci/run installs them", python.display())
        }
        _ => None,
    }
}

/// Our logits for a token sequence of the model in `dir`, as the checker reads them.
fn logits_file(sb: &Sandbox, dir: &Path, name: &str) -> PathBuf {
    let (cfg, params) = load_model(dir).unwrap();
    let ids: Vec<u32> = (0..24).map(|i| ((i * 37 + 5) % (cfg.vocab_size - 1)) as u32).collect();
    let model = Model::new(cfg, &params);
    let mut acts = Activations::inference(&model, 1, ids.len());
    model.forward(&params, &Batch::whole_rows(ids.len(), &ids, &ids), &mut acts);
    let rows: Vec<&[f32]> = acts.logits.chunks(cfg.vocab_size).collect();
    let path = sb.path(&format!("{name}.logits.json"));
    std::fs::write(&path, json!({ "ids": ids, "logits": rows }).to_string()).unwrap();
    path
}

#[test]
fn gguf_files_match_gguf_py_and_llama_cpp() {
    let sb = Sandbox::new();
    let run = sb.run_json("export.toml", &[]);
    // Quantized files are smaller, in the order of their types.
    let size = |name: &str| stage(&run, name)["metrics"]["bytes"].as_u64().unwrap();
    for arch in ["gpt2", "llama"] {
        let sizes: Vec<u64> = ["f32", "f16", "q8_0", "q4_0"].iter().map(|d| size(&format!("{arch}_{d}"))).collect();
        assert!(sizes.windows(2).all(|w| w[0] > w[1]), "{arch}: {sizes:?}");
        let about: Value = serde_json::from_str(
            &std::fs::read_to_string(artifact(&sb, &run, &format!("{arch}_q4_0")).join("export.json")).unwrap(),
        )
        .unwrap();
        let types: Vec<&str> =
            about["tensors"].as_array().unwrap().iter().map(|t| t["type"].as_str().unwrap()).collect();
        assert!(types.contains(&"Q4_0") && types.contains(&"Q8_0") && types.contains(&"F32"), "{arch}: {types:?}");
    }
    let Some(python) = python_with_gguf() else {
        eprintln!(
            "SKIPPED: no Python with gguf, numpy and safetensors (pip install gguf==0.19.0; .ci/run installs it)"
        );
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/crosscheck/gguf_check.py");
    for arch in ["gpt2", "llama"] {
        let model = artifact(&sb, &run, arch);
        let logits = logits_file(&sb, &model, arch);
        for dtype in ["f32", "f16", "q8_0", "q4_0"] {
            let file = artifact(&sb, &run, &format!("{arch}_{dtype}")).join("model.gguf");
            let out =
                Command::new(&python).arg(&script).args([&file, &model]).arg(dtype).arg(&logits).output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{arch} {dtype}:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
            assert!(stdout.contains("tensors of model.gguf"), "{stdout}");
            eprint!("{arch} {dtype}: {stdout}");
        }
    }
}

#[test]
fn the_hugging_face_folder_holds_the_model_and_a_fine_tunes_adapter() {
    let sb = Sandbox::new();
    let run = sb.run_json("export.toml", &[]);
    let folder = artifact(&sb, &run, "llama_hf");
    let model = artifact(&sb, &run, "llama");
    for file in ["model.safetensors", "config.json", "tokenizer.json"] {
        assert_eq!(std::fs::read(folder.join(file)).unwrap(), std::fs::read(model.join(file)).unwrap(), "{file}");
    }
    // A LoRA fine-tune: the merged model and PEFT's adapter folder.
    let recipe = std::fs::read_to_string(sb.path("sft.toml")).unwrap();
    sb.write("sft_export.toml", recipe + "\n[stages.upload]\nkind = \"export\"\nmodel = \"sft\"\nformat = \"hf\"\n");
    let run = sb.run_json("sft_export.toml", &["--set", "sft.max_steps=2"]);
    let folder = artifact(&sb, &run, "upload");
    for file in ["model.safetensors", "config.json", "tokenizer.json", "template.json", "adapter/adapter_config.json"] {
        assert!(folder.join(file).is_file(), "{file}");
    }
    assert!(std::fs::read_dir(folder.join("adapter")).unwrap().count() >= 2);
    // Exporting again is free; another dtype is another file.
    let again = sb.run_json("export.toml", &["--set", "llama_q4_0.name=\"tiny\""]);
    assert_eq!(ran(&again), ["llama_q4_0"]);
}

#[test]
fn a_dtype_for_the_hugging_face_folder_is_refused() {
    let sb = Sandbox::new();
    let out = sb.tinygpt(&["plan", "export.toml", "--set", "llama_hf.dtype=\"q4_0\""]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("dtype is for gguf"), "{err}");
}
