//! Golden files: expected outputs kept in `tests/golden/`. A stage whose output bytes change
//! without a bump of its implementation version fails here (issue 2, item 8).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::util::{key, Sandbox};

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

fn updating() -> bool {
    std::env::var_os("UPDATE_GOLDEN").is_some()
}

/// Compare `actual` with the golden file, or rewrite it under `UPDATE_GOLDEN=1`.
pub fn check(name: &str, actual: &str) {
    let path = golden_path(name);
    if updating() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected =
        std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("missing {name}; run with UPDATE_GOLDEN=1"));
    assert_eq!(
        actual, expected,
        "output differs from tests/golden/{name}; if intended, rerun with UPDATE_GOLDEN=1 and review the diff"
    );
}

/// The section of `digests.json` for outputs that no machine's arithmetic changes.
const ANY_MACHINE: &str = "any machine";

/// This machine, as far as the bits of a trained model go: the platform and how its matmul
/// rounds (matrixmultiply picks its micro-kernel at run time).
pub fn machine() -> String {
    let os = std::env::consts::OS;
    format!("{}-{os}, matmul {}", std::env::consts::ARCH, stages::bench::matmul_fingerprint())
}

/// Content digests of every stage kind's output on small fixtures, with the implementation
/// version that produced them. Stages that train or run a model (their labels start with
/// the kind's name: `pretrain`, `evaluate`, `sft`, `teacher`, `distill`, `generate`, `reference`,
/// `align`, `calibrate`, `quantize`, `export`) are kept per machine: on a machine not yet recorded they are
/// skipped, saying so, and `UPDATE_GOLDEN=1` records it.
#[test]
fn stage_outputs_match_their_golden_digests() {
    let sb = Sandbox::new();
    sb.write(
        "data.txt",
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n".repeat(8),
    );
    let machine = machine();
    let mut actual: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    // Volatile files (a training stage's metrics.jsonl, which holds timings) are not part of
    // the content digest, so one digest stands for every stage's output.
    let mut record = |label: &str, run: &Value, stage: &str| {
        let manifest = sb.manifest(&key(run, stage));
        let entry = json!({
            "version": manifest["meta"]["preimage"]["version"],
            "content_digest": manifest["content_digest"],
        });
        let uses_a_model = [
            "pretrain",
            "evaluate",
            "sft",
            "teacher",
            "distill",
            "generate",
            "reference",
            "align",
            "calibrate",
            "quantize",
            "export",
        ]
        .iter()
        .any(|kind| label.starts_with(kind));
        let section = if uses_a_model { machine.clone() } else { ANY_MACHINE.to_string() };
        actual.entry(section).or_default().insert(label.to_string(), entry);
    };
    let tiny = sb.run_json("tiny.toml", &[]);
    record("corpus", &tiny, "corpus");
    record("tokenize-bpe", &tiny, "tokenize");
    record("pack-document", &tiny, "pack");
    for algorithm in ["char", "byte"] {
        let run = sb.run_json("raw_text.toml", &["--set", &format!("tokenize.algorithm={algorithm}")]);
        record(&format!("tokenize-{algorithm}"), &run, "tokenize");
        if algorithm == "char" {
            record("pack-position", &run, "pack");
        }
    }
    let padded = sb.run_json("raw_text.toml", &["--set", "pack.remainder=pad", "--set", "pack.seq_len=7"]);
    record("pack-pad", &padded, "pack");
    let small = ["--set", "pretrain.max_steps=12", "--set", "evaluate.max_new_tokens=12"];
    let gpt2 = sb.run_json("train.toml", &small);
    record("pretrain-gpt2", &gpt2, "pretrain");
    record("evaluate", &gpt2, "evaluate");
    let llama_sets = ["--set", "pretrain.arch=llama", "--set", "pretrain.n_kv_head=1"];
    let llama = sb.run_json("train.toml", &[&small[..], &llama_sets[..]].concat());
    record("pretrain-llama", &llama, "pretrain");
    let bf16 = ["--set", "pretrain.precision=bf16"];
    for (arch, sets) in [("gpt2", &[][..]), ("llama", &llama_sets[..])] {
        let bf16 = sb.run_json("train.toml", &[&small[..], sets, &bf16[..]].concat());
        record(&format!("pretrain-{arch}-bf16"), &bf16, "pretrain");
    }
    let sft = sb.run_json("sft.toml", &["--set", "sft.max_steps=4"]);
    record("instructions", &sft, "instructions");
    record("sft-lora", &sft, "sft");
    let full = sb.run_json("sft.toml", &["--set", "sft.max_steps=4", "--set", "sft.adapter=none"]);
    record("sft-full", &full, "sft");
    let distill = sb.run_json("distill.toml", &["--set", "teacher_model.max_steps=8", "--set", "student.max_steps=4"]);
    record("teacher", &distill, "teacher");
    record("distill", &distill, "student");
    record("generate", &distill, "generated");
    let align = sb.run_json(
        "align.toml",
        &["--set", "dpo.max_steps=3", "--set", "simpo.max_steps=3", "--set", "kto.max_steps=3"],
    );
    record("preferences", &align, "pairs");
    record("reference", &align, "reference");
    record("align-dpo", &align, "dpo");
    record("align-simpo-lora", &align, "simpo");
    let kto = sb.run_json("kto.toml", &["--set", "kto.max_steps=3"]);
    record("preferences-unpaired", &kto, "examples");
    record("align-kto", &kto, "kto");
    record("evaluate-preferences", &align, "eval_dpo");
    let quantize = sb.run_json("quantize.toml", &["--set", "pretrain.max_steps=12"]);
    record("calibrate", &quantize, "calibrate");
    record("quantize-rtn8", &quantize, "int8");
    record("quantize-hqq4", &quantize, "hqq4");
    record("quantize-gptq4", &quantize, "gptq4");
    record("evaluate-quantized", &quantize, "eval_gptq4");
    let export = sb.run_json("export.toml", &["--set", "gpt2.max_steps=4", "--set", "llama.max_steps=4"]);
    for name in ["gpt2_f16", "gpt2_q4_0", "llama_q8_0", "llama_q4_0", "llama_hf"] {
        record(&format!("export-{name}"), &export, name);
    }

    let path = golden_path("digests.json");
    let mut expected: BTreeMap<String, BTreeMap<String, Value>> = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).expect("digests.json holds sections of digests"),
        Err(_) if updating() => BTreeMap::new(),
        Err(e) => panic!("reading {}: {e}; run with UPDATE_GOLDEN=1", path.display()),
    };
    if updating() {
        // Other machines keep the digests of stages whose version has not changed.
        for (other, entries) in expected.iter_mut().filter(|(m, _)| **m != machine && *m != ANY_MACHINE) {
            entries
                .retain(|label, then| actual[&machine].get(label).is_some_and(|now| now["version"] == then["version"]));
            if !entries.is_empty() {
                actual.insert(other.clone(), std::mem::take(entries));
            }
        }
        std::fs::write(&path, serde_json::to_string_pretty(&actual).unwrap() + "\n").unwrap();
        return;
    }
    compare(&actual[ANY_MACHINE], &expected[ANY_MACHINE]);
    match expected.get(&machine) {
        Some(recorded) => compare(&actual[&machine], recorded),
        None => {
            let known: Vec<&String> = expected.keys().filter(|m| *m != ANY_MACHINE).collect();
            eprintln!(
                "SKIPPED: golden digests of pretrain and evaluate are recorded for {known:?}, not for this machine ({machine}), whose arithmetic differs; UPDATE_GOLDEN=1 records it"
            );
        }
    }
}

/// Each fixture's digest against its golden one, and the same fixtures on both sides.
fn compare(actual: &BTreeMap<String, Value>, expected: &BTreeMap<String, Value>) {
    for (label, now) in actual {
        let Some(then) = expected.get(label) else { panic!("no golden digest for {label}; run with UPDATE_GOLDEN=1") };
        if now["content_digest"] != then["content_digest"] {
            if now["version"] == then["version"] {
                panic!("the output of {label} changed but its implementation version did not: bump the stage's `version()` (then UPDATE_GOLDEN=1)");
            }
            panic!("{label} has a new version and new output: rerun with UPDATE_GOLDEN=1 and review the diff");
        }
    }
    assert_eq!(actual.len(), expected.len(), "golden file lists other fixtures");
}
