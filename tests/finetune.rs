//! Fine-tuning end to end: instruction data with bad rows, `sft` with LoRA adapters written in
//! PEFT's layout, a merged model equal to base + scale * B A, what reruns after an edit, and
//! exact resume with and without adapters.

use serde_json::Value;
use stages::model_io::{load_model, load_safetensors};
use stages::nn::lora::LoraConfig;
use stages::nn::params::ParamMap;

use crate::util::{artifact, assert_success, interrupt_run, key, ran, stage, Sandbox};

/// The sft stage's adapter tensors under their in-map names (PEFT's without its prefix).
fn adapter_tensors(dir: &std::path::Path) -> ParamMap {
    let peft = load_safetensors(&dir.join("adapter/adapter_model.safetensors")).unwrap();
    let mut out = ParamMap::default();
    for (name, t) in peft.iter() {
        let name = name.strip_prefix("base_model.model.").expect("PEFT's prefix");
        out.insert(name, t.clone());
    }
    out
}

/// What the model of stage `sft` should be, from its base (stage `pretrain`) and its
/// `adapter/` read back as a LoRA of rank `r` and `alpha` (DoRA with `dora`), and what it is.
fn merged_from_adapter(sb: &Sandbox, run: &Value, r: usize, alpha: f32, dora: bool) -> (ParamMap, ParamMap) {
    let sft = artifact(sb, run, "sft");
    let (cfg, mut adapted) = load_model(&artifact(sb, run, "pretrain")).unwrap();
    for (name, t) in adapter_tensors(&sft).iter() {
        adapted.insert(name, t.clone());
    }
    let lora = LoraConfig { dora, ..LoraConfig::on_every_linear(&cfg, r, alpha) };
    (lora.merged(&cfg, &adapted), load_model(&sft).unwrap().1)
}

#[test]
fn lora_fine_tuning_writes_a_peft_adapter_and_the_merged_model() {
    let sb = Sandbox::new();
    let run = sb.run_json("sft.toml", &[]);
    let sft = artifact(&sb, &run, "sft");
    for file in ["model.safetensors", "config.json", "tokenizer.json", "template.json", "metrics.jsonl"] {
        assert!(sft.join(file).is_file(), "sft writes {file}");
    }
    let metrics = &stage(&run, "sft")["metrics"];
    assert!(metrics["packing_efficiency"].as_f64().unwrap() > 0.8, "{metrics}");
    // Per layer r (in + out) for q, k, v, o (32 -> 32) and gate, up, down (32 <-> 96).
    assert_eq!(metrics["trainable_parameters"], 2 * (4 * 4 * (32 + 32) + 3 * 4 * (32 + 96)));

    let config: Value =
        serde_json::from_slice(&std::fs::read(sft.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["peft_type"].as_str(), config["r"].as_u64()), (Some("LORA"), Some(4)));
    assert_eq!(config["fan_in_fan_out"], false, "llama's weights are nn.Linear");
    let adapters = adapter_tensors(&sft);
    // q_proj of a 32-wide model: A (r, in), B (out, r).
    assert_eq!(adapters.tensor("model.layers.1.self_attn.q_proj.lora_A.weight").shape(), [4, 32]);
    assert_eq!(adapters.tensor("model.layers.0.mlp.down_proj.lora_B.weight").shape(), [32, 4]);
    assert!(adapters.get("model.layers.0.mlp.down_proj.lora_B.weight").iter().any(|x| *x != 0.0), "B trained");

    // The merged model is the untouched base plus scale * B A, to the bit.
    let (expected, merged) = merged_from_adapter(&sb, &run, 4, 8.0, false);
    assert!(expected == merged, "merged = frozen base + scale * B A");

    // evaluate scores the held-out responses as sft's validation did, and answers instructions.
    let eval: Value =
        serde_json::from_slice(&std::fs::read(artifact(&sb, &run, "evaluate").join("eval.json")).unwrap()).unwrap();
    let sft_val = metrics["val_loss"].as_f64().unwrap();
    assert!((eval["val_loss"].as_f64().unwrap() - sft_val).abs() < 1e-4, "{eval} vs {sft_val}");
    let samples = eval["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2);
    assert!(samples[0]["prompt"].as_str().unwrap().starts_with("Q: ") && samples[0]["reference"].is_string());
    // sample --instruction applies the template the model was tuned with.
    let out = sb.tinygpt(&["sample", "sft.toml", "--instruction", "What is 2 plus 3?", "--max-new-tokens", "3"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Q: What is 2 plus 3? \nA: "), "{out:?}");
    let out = sb.tinygpt(&["sample", "sft.toml", "pretrain", "--instruction", "Hi"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no instruction template"));
}

/// LoRA with the frozen base's products in bf16: only `sft` reruns, the adapters train (in
/// f32, block by block inside the base's products), to the same bits with the portable
/// kernels (the emulation where AMX would run), and the merged model is still the base plus
/// scale * B A to the bit.
#[test]
fn a_bf16_lora_fine_tune_trains_its_adapters_and_merges_them() {
    let sb = Sandbox::new();
    let f32_run = sb.run_json("sft.toml", &[]);
    let run = sb.run_json("sft.toml", &["--set", "sft.precision=bf16"]);
    assert_eq!(ran(&run), ["sft", "evaluate"], "{run}");
    let (b16, b32) = (adapter_tensors(&artifact(&sb, &run, "sft")), adapter_tensors(&artifact(&sb, &f32_run, "sft")));
    let name = "model.layers.0.mlp.down_proj.lora_B.weight";
    assert!(b16.get(name).iter().any(|x| *x != 0.0), "B trained");
    assert!(b16.get(name) != b32.get(name), "the bf16 run trained the f32 run's bits");
    let emulated = portable_adapters("sft.precision=bf16");
    assert!(emulated.get(name) == b16.get(name), "the portable kernels trained other adapters");
    let (expected, merged) = merged_from_adapter(&sb, &run, 4, 8.0, false);
    assert!(expected == merged, "merged = frozen base + scale * B A");
}

/// The adapters `sft.toml` trains with `set` in a fresh sandbox on the portable kernels.
fn portable_adapters(set: &str) -> ParamMap {
    let sb = Sandbox::new();
    let out = sb
        .command()
        .env("TINYGPT_SIMD", "portable")
        .args(["run", "sft.toml", "--json", "--set", set])
        .output()
        .unwrap();
    assert_success(&out);
    adapter_tensors(&artifact(&sb, &serde_json::from_slice(&out.stdout).unwrap(), "sft"))
}

#[test]
fn dora_writes_its_magnitudes_and_merges_them() {
    let sb = Sandbox::new();
    let run = sb.run_json("sft.toml", &["--set", "sft.use_dora=true"]);
    let sft = artifact(&sb, &run, "sft");
    let config: Value =
        serde_json::from_slice(&std::fs::read(sft.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["use_dora"], true);
    let adapters = adapter_tensors(&sft);
    // PEFT's name, without `.weight`, one magnitude per output.
    assert_eq!(adapters.tensor("model.layers.0.mlp.up_proj.lora_magnitude_vector").shape(), [96]);
    let (expected, merged) = merged_from_adapter(&sb, &run, 4, 8.0, true);
    assert!(expected == merged, "merged = m * (W + s B A) / |W + s B A|");
    // DoRA's own loops (norms, magnitude gradient) give the same bits with the portable kernels.
    let portable = portable_adapters("sft.use_dora=true");
    for (name, t) in adapters.iter() {
        assert!(portable.get(name) == t.data(), "{name} differs with TINYGPT_SIMD=portable");
    }
}

#[test]
fn pissa_starts_from_the_singular_part_and_exports_a_lora_on_the_original_weights() {
    let sb = Sandbox::new();
    let run = sb.run_json("sft.toml", &["--set", "sft.lora_init=pissa"]);
    let sft = artifact(&sb, &run, "sft");
    let config: Value =
        serde_json::from_slice(&std::fs::read(sft.join("adapter/adapter_config.json")).unwrap()).unwrap();
    // PEFT's conversion for saving: rank 2r, alpha raised to keep the scale.
    assert_eq!((config["r"].as_u64(), config["lora_alpha"].as_f64()), (Some(8), Some(16.0)));
    let adapters = adapter_tensors(&sft);
    assert_eq!(adapters.tensor("model.layers.0.self_attn.q_proj.lora_A.weight").shape(), [8, 32]);
    let (on_base, merged) = merged_from_adapter(&sb, &run, 8, 16.0, false);
    for ((name, a), (_, b)) in on_base.iter().zip(merged.iter()) {
        assert!(a.data().iter().zip(b.data()).all(|(x, y)| (x - y).abs() < 1e-5), "{name}: base + adapter = merged");
    }
}

#[test]
fn a_full_fine_tune_moves_every_weight() {
    let sb = Sandbox::new();
    let run = sb.run_json("sft.toml", &["--set", "sft.adapter=none", "--set", "sft.neftune_alpha=0"]);
    let sft = artifact(&sb, &run, "sft");
    assert!(!sft.join("adapter").exists(), "no adapter without one");
    let (_, base) = load_model(&artifact(&sb, &run, "pretrain")).unwrap();
    let (_, tuned) = load_model(&sft).unwrap();
    for ((name, a), (_, b)) in base.iter().zip(tuned.iter()) {
        assert_ne!(a, b, "{name} trained");
    }
    assert_eq!(stage(&run, "sft")["metrics"]["trainable_parameters"].as_u64(), Some(base.num_elements() as u64));
}

#[test]
fn changing_an_adapter_or_neftune_parameter_reruns_sft_but_not_pretrain() {
    let sb = Sandbox::new();
    sb.run_json("sft.toml", &[]);
    for set in [
        "sft.neftune_alpha=1",
        "sft.lora_r=2",
        "sft.use_rslora=true",
        "sft.lora_fa=true",
        "sft.use_dora=true",
        "sft.lora_dropout=0.1",
    ] {
        let run = sb.run_json("sft.toml", &["--set", set]);
        assert_eq!(ran(&run), ["sft", "evaluate"], "{set}");
    }
    let run = sb.run_json("sft.toml", &["--set", "instructions.val_fraction=0.25"]);
    assert_eq!(ran(&run), ["instructions", "sft", "evaluate"]);
}

#[test]
fn lora_fa_keeps_a_at_its_initialisation() {
    let sb = Sandbox::new();
    let fa = sb.run_json("sft.toml", &["--set", "sft.lora_fa=true", "--set", "sft.max_steps=3"]);
    let zero = sb.run_json("sft.toml", &["--set", "sft.lr=0", "--set", "sft.min_lr=0", "--set", "sft.max_steps=3"]);
    let (a, b) = (adapter_tensors(&artifact(&sb, &fa, "sft")), adapter_tensors(&artifact(&sb, &zero, "sft")));
    for (name, t) in a.iter().filter(|(n, _)| n.ends_with("lora_A.weight")) {
        assert_eq!(t, b.tensor(name), "{name} is frozen");
    }
}

#[test]
fn bad_instruction_rows_exit_2_naming_the_file_row_and_field() {
    let sb = Sandbox::new();
    let rows = [
        (
            "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": 3, \"output\": \"b\"}\n",
            "line 2: field `instruction` is a number, not a string",
        ),
        ("{\"instruction\": \"a\", \"output\": \"\"}\n", "line 1: field `output` is empty"),
        ("{\"instruction\": \"a\"}\n", "line 1: missing field `output`"),
    ];
    for (text, expected) in rows {
        sb.write("bad.jsonl", text);
        let out = sb.tinygpt(&["run", "sft.toml", "--set", "instructions.input=bad.jsonl"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("bad.jsonl") && err.contains(expected), "{err}");
    }
    let out = sb.tinygpt(&["plan", "sft.toml", "--set", "instructions.template={instruction} {answer}"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("unknown placeholder `{answer}`"), "{err}");
    let out = sb.tinygpt(&["plan", "sft.toml", "--set", "sft.lora_targets=[\"q_prj\"]"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`q_prj` is not a linear module"));
    // A module of the other architecture: refused when the recipe is resolved, at its line.
    let recipe = std::fs::read_to_string(sb.path("sft.toml")).unwrap();
    sb.write("gpt2_targets.toml", recipe.replace("[stages.sft]\n", "[stages.sft]\nlora_targets = [\"c_attn\"]\n"));
    let out = sb.tinygpt(&["plan", "gpt2_targets.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("the model has no module `c_attn`") && err.contains("q_proj"), "{err}");
    assert!(err.contains("gpt2_targets.toml:") && err.contains("lora_targets = [\"c_attn\"]"), "{err}");
    // Rows longer than the model's block size: refused when the recipe is resolved too.
    let out = sb.tinygpt(&["plan", "sft.toml", "--set", "sft.seq_len=4096"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("seq_len 4096 is longer than the model's block size"), "{err}");
}

/// Run the recipe's upstream stages, then a long sft interrupted by `sig`, then again: the
/// resumed weights equal an uninterrupted run's.
fn sft_resumes_bit_identically(sig: &str, sets: &[&str]) {
    let long = [&["--set", "sft.max_steps=1500", "--set", "sft.eval_interval=0"][..], sets].concat();
    let sb = Sandbox::new();
    sb.run_json("sft.toml", &["--set", "sft.max_steps=1"]);
    let (sft_key, _) = interrupt_run(&sb, "sft.toml", &long, sig);
    let resumed = sb.run_json("sft.toml", &long);
    assert_eq!(key(&resumed, "sft"), sft_key);
    let from = stage(&resumed, "sft")["metrics"]["resumed_from_step"].as_u64();
    assert!(from.is_some_and(|s| s > 0 && s < 1500), "resumed from a checkpoint: {from:?}");
    let fresh = Sandbox::new();
    let uninterrupted = fresh.run_json("sft.toml", &long);
    let digest = |sb: &Sandbox, run: &Value| sb.manifest(&key(run, "sft"))["content_digest"].clone();
    assert_eq!(digest(&sb, &resumed), digest(&fresh, &uninterrupted), "same model and adapter bits");
}

#[test]
fn a_killed_lora_fine_tune_resumes_to_the_same_bits() {
    sft_resumes_bit_identically("-KILL", &[]);
}

#[test]
fn an_interrupted_full_fine_tune_resumes_to_the_same_bits() {
    sft_resumes_bit_identically("-INT", &["--set", "sft.adapter=none"]);
}

/// Also with each batch in two shards, where NEFTune's noise and adapter dropout draw by each
/// token's place in the whole batch.
#[test]
fn one_and_two_threads_fine_tune_to_the_same_bits() {
    let digest = |threads: &str, extra: &[&str]| {
        let sb = Sandbox::new();
        let mut sets =
            vec!["--set".to_string(), format!("sft.threads={threads}"), "--set".into(), "sft.max_steps=6".into()];
        sets.extend(extra.iter().flat_map(|s| ["--set".to_string(), s.to_string()]));
        let run = sb.run_json("sft.toml", &sets.iter().map(String::as_str).collect::<Vec<_>>());
        sb.manifest(&key(&run, "sft"))["content_digest"].clone()
    };
    assert_eq!(digest("1", &[]), digest("2", &[]));
    let sharded = ["sft.shards=2", "sft.lora_dropout=0.1"];
    let one = digest("1", &sharded);
    assert_eq!(one, digest("2", &sharded));
    assert_ne!(one, digest("1", &sharded[1..]), "2 shards trained the bits of one pass");
}

/// The instruct recipe's data on the real files, with one step of each training stage: the
/// instructions of `llms_from_scratch_instruction` pack into rows of 256 with at least 90% of
/// the positions holding a real token.
#[test]
fn real_data_instructions_pack_densely() {
    let Some(_) = crate::util::shared_data() else {
        eprintln!("SKIPPED: real_data_instructions_pack_densely needs ../shared/data");
        return;
    };
    let sb = Sandbox::new();
    let recipe = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/instruct.toml");
    let sets = [
        "--set",
        "pretrain.max_steps=1",
        "--set",
        "sft.max_steps=1",
        "--set",
        "evaluate.instruction_samples=1",
        "--set",
        "evaluate.max_new_tokens=1",
    ];
    let run = sb.run_json(recipe.to_str().unwrap(), &sets);
    let instructions = &stage(&run, "instructions")["metrics"];
    assert_eq!(
        (instructions["train_examples"].as_u64(), instructions["val_examples"].as_u64()),
        (Some(990), Some(110))
    );
    let sft = &stage(&run, "sft")["metrics"];
    assert_eq!((sft["truncated"].as_u64(), sft["dropped"].as_u64()), (Some(0), Some(0)));
    let efficiency = sft["packing_efficiency"].as_f64().unwrap();
    assert!(efficiency >= 0.9, "packing efficiency {efficiency}");
    eprintln!("llms_from_scratch_instruction at seq_len 256: packing efficiency {efficiency}");
}

#[test]
fn a_longer_wsd_sft_with_lora_plus_and_neftune_continues_from_the_shorter_one() {
    crate::util::check_prefix_reuse("sft.toml", "sft", 12, 20);
}
