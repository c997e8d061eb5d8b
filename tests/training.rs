//! Training end to end (issue 3): pretrain and evaluate from a recipe, samples on the command
//! line, exact resume after kill -9 and Ctrl-C, identical weights on 1 and 2 threads, and a
//! diverging run that stops with the step named.

use std::path::PathBuf;

use serde_json::Value;

use crate::util::{artifact, assert_success, interrupt_run, key, poll_until, ran, shared_data, stage, Sandbox};

fn weights(sb: &Sandbox, run: &Value) -> Vec<u8> {
    std::fs::read(artifact(sb, run, "pretrain").join("model.safetensors")).unwrap()
}

#[test]
fn a_recipe_pretrains_evaluates_and_samples_for_both_architectures() {
    let sb = Sandbox::new();
    for arch in [&[][..], &["--set", "pretrain.arch=llama", "--set", "pretrain.n_kv_head=1"][..]] {
        let run = sb.run_json("train.toml", arch);
        let dir = artifact(&sb, &run, "pretrain");
        for file in ["model.safetensors", "config.json", "tokenizer.json", "meta.json", "metrics.jsonl"] {
            assert!(dir.join(file).is_file(), "pretrain writes {file}");
        }
        let lines: Vec<Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let logged: Vec<&Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
        assert_eq!(logged.iter().map(|l| l["step"].as_u64().unwrap()).collect::<Vec<_>>(), [10, 20, 30, 40, 50, 60]);
        for key in ["lr", "grad_norm", "tokens_per_s", "elapsed_s"] {
            assert!(logged.iter().all(|l| l[key].is_number()), "every logged step has {key}");
        }
        let evals: Vec<u64> =
            lines.iter().filter(|l| l.get("val_loss").is_some()).map(|l| l["step"].as_u64().unwrap()).collect();
        assert_eq!(evals, [20, 40, 60]);

        // The model learned something: validation loss well below a uniform guess.
        let vocab = stage(&run, "tokenize")["metrics"]["vocab_size"].as_f64().unwrap();
        let m = &stage(&run, "evaluate")["metrics"];
        let val_loss = m["val_loss"].as_f64().unwrap();
        assert!(val_loss < vocab.ln() - 0.5, "val_loss {val_loss} against ln V = {}", vocab.ln());
        assert!((m["perplexity"].as_f64().unwrap() - val_loss.exp()).abs() < 1e-3 * val_loss.exp());
        assert!(m["bits_per_byte"].as_f64().unwrap() > 0.0);
        let results: Value =
            serde_json::from_slice(&std::fs::read(artifact(&sb, &run, "evaluate").join("eval.json")).unwrap()).unwrap();
        assert_eq!(results["samples"][0]["prompt"], "Once");
        assert!(!results["samples"][0]["text"].as_str().unwrap().is_empty());

        // `tinygpt sample` from the recipe's stage and from the directory, seeded.
        let mut args =
            vec!["sample", "train.toml", "pretrain", "--prompt", "Once", "--max-new-tokens", "20", "--seed", "5"];
        args.extend_from_slice(arch);
        let from_recipe = sb.tinygpt(&args);
        assert_success(&from_recipe);
        let text = String::from_utf8(from_recipe.stdout).unwrap();
        assert!(text.starts_with("Once") && text.trim_end().len() > 4, "{text:?}");
        let dir_arg = dir.to_str().unwrap();
        let from_dir = sb.tinygpt(&["sample", dir_arg, "--prompt", "Once", "--max-new-tokens", "20", "--seed", "5"]);
        assert_eq!(String::from_utf8(from_dir.stdout).unwrap(), text, "same model, same seed, same text");
    }
}

#[test]
fn padding_fills_the_last_block_but_is_never_scored() {
    let sb = Sandbox::new();
    let small = ["--set", "pack.remainder=pad", "--set", "pretrain.max_steps=12", "--set", "evaluate.max_new_tokens=4"];
    let run = sb.run_json("train.toml", &small);
    let pack = &stage(&run, "pack")["metrics"];
    let (val_stream, seq_len) = (pack["val_tokens"].as_u64().unwrap(), 16);
    assert_ne!((val_stream - 1) % seq_len, 0, "the fixture pads the validation split's last block: {pack}");
    // Every validation token after the first is predicted once; the padding is not.
    assert_eq!(stage(&run, "evaluate")["metrics"]["val_tokens"], val_stream - 1);
    // Random windows are drawn from the stream without it.
    let windows = sb.run_json("train.toml", &[&small[..], &["--set", "pretrain.sampler=windows"]].concat());
    assert!(stage(&windows, "pretrain")["metrics"]["train_loss"].as_f64().unwrap().is_finite());
}

#[test]
fn sampling_an_unbuilt_stage_says_to_run_the_recipe() {
    let sb = Sandbox::new();
    let out = sb.tinygpt(&["sample", "train.toml", "pretrain"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stage `pretrain` is not built") && err.contains("tinygpt run train.toml"), "{err}");
    let out = sb.tinygpt(&["sample", "train.toml", "pack"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not make a model"));
}

#[test]
fn bad_model_shapes_are_recipe_errors_naming_the_key() {
    let sb = Sandbox::new();
    let out = sb.tinygpt(&["plan", "train.toml", "--set", "pretrain.arch=llama", "--set", "pretrain.n_kv_head=3"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("n_head 2 is not a multiple of n_kv_head 3") && err.contains("n_kv_head"), "{err}");
    for (sets, message) in [
        (&["--set", "pretrain.tie_embeddings=false"][..], "gpt2 always ties its output"),
        (&["--set", "pretrain.arch=llama", "--set", "pretrain.bias=true"][..], "llama has no biases"),
        (&["--set", "pretrain.arch=llama", "--set", "pretrain.activation=gelu"][..], "llama's MLP is SwiGLU"),
    ] {
        let out = sb.tinygpt(&[&["plan", "train.toml"][..], sets].concat());
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains(message));
    }
}

/// Trains `train.toml` (with `sets`) under the environment `env`; returns the weights and
/// `eval.json`.
fn train_with(env: &[(&str, &str)], sets: &[&str]) -> (Vec<u8>, String) {
    let sb = Sandbox::new();
    let out = sb.command().envs(env.iter().copied()).args(["run", "train.toml", "--json"]).args(sets).output().unwrap();
    assert_success(&out);
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    let eval = std::fs::read_to_string(artifact(&sb, &run, "evaluate").join("eval.json")).unwrap();
    (weights(&sb, &run), eval)
}

#[test]
fn one_and_two_threads_train_identical_weights() {
    let (w1, e1) = train_with(&[("RAYON_NUM_THREADS", "1")], &[]);
    let (w2, e2) = train_with(&[("RAYON_NUM_THREADS", "2")], &[]);
    assert!(w1 == w2, "model.safetensors differs between 1 and 2 threads");
    assert_eq!(e1, e2);
}

/// Activation checkpointing recomputes each block in backward: the same weights, bit for bit,
/// for both architectures, and the same key (it is not hashed: a run with it is a cache hit).
#[test]
fn activation_checkpointing_trains_the_same_weights() {
    for sets in [&[][..], &["--set", "pretrain.arch=llama", "--set", "pretrain.n_kv_head=1"][..]] {
        let (kept, e1) = train_with(&[], sets);
        let checkpointed = [sets, &["--set", "pretrain.activation_checkpointing=true"][..]].concat();
        let (recomputed, e2) = train_with(&[], &checkpointed);
        assert!(kept == recomputed, "model.safetensors differs with activation checkpointing ({sets:?})");
        assert_eq!(e1, e2);
    }
    let sb = Sandbox::new();
    let first = sb.run_json("train.toml", &[]);
    let again = sb.run_json("train.toml", &["--set", "pretrain.activation_checkpointing=true"]);
    assert_eq!(key(&first, "pretrain"), key(&again, "pretrain"));
    assert!(ran(&again).is_empty(), "{again}");
}

/// The portable kernels run on every machine here, forced, and must give the bits of the ones
/// the CPU was detected for (AVX-512 or AVX2+FMA on x86-64), for both architectures' kernels;
/// so must the AVX2 ones where AVX-512 was detected (elsewhere `avx2` changes nothing); also
/// with each batch in shards.
#[test]
fn the_portable_kernels_train_the_same_weights_as_the_detected_ones() {
    let llama = ["--set", "pretrain.arch=llama", "--set", "pretrain.n_kv_head=1"];
    for sets in [&[][..], &llama[..], &["--set", "pretrain.shards=2"][..]] {
        let (detected, e1) = train_with(&[], sets);
        for simd in ["portable", "avx2"] {
            let (forced, e2) = train_with(&[("TINYGPT_SIMD", simd)], sets);
            assert!(detected == forced, "model.safetensors differs with TINYGPT_SIMD={simd} ({sets:?})");
            assert_eq!(e1, e2);
        }
    }
}

/// `precision = "bf16"` rounds the weight products' operands to bf16 (AMX-BF16's arithmetic):
/// the same bits on 1 and 2 threads and with the portable kernels (the plain emulation, where
/// AMX would otherwise run), other bits than f32 but a validation loss within 2% of it, and a
/// key of its own, while the default leaves `precision` out of the key so that caches made
/// before the parameter existed stay valid.
#[test]
fn bf16_training_has_one_set_of_bits_and_the_loss_of_f32() {
    let bf16 = ["--set", "pretrain.precision=bf16"];
    let (one, e1) = train_with(&[("RAYON_NUM_THREADS", "1")], &bf16);
    let (two, e2) = train_with(&[("RAYON_NUM_THREADS", "2")], &bf16);
    let (portable, e3) = train_with(&[("TINYGPT_SIMD", "portable")], &bf16);
    assert!(one == two, "bf16 weights differ between 1 and 2 threads");
    assert!(one == portable, "bf16 weights differ with TINYGPT_SIMD=portable");
    assert_eq!((&e1, &e1), (&e2, &e3));
    let (full, e_full) = train_with(&[], &[]);
    assert!(full != one, "bf16 trained the bits of f32: its products did not run in bf16");
    let loss = |e: &str| serde_json::from_str::<Value>(e).unwrap()["val_loss"].as_f64().unwrap();
    let (l16, l32) = (loss(&e1), loss(&e_full));
    assert!((l16 - l32).abs() <= 0.02 * l32, "validation loss bf16 {l16} vs f32 {l32}");

    let sb = Sandbox::new();
    let default = sb.run_json("train.toml", &[]);
    let params = |run: &Value| sb.manifest(&key(run, "pretrain"))["meta"]["preimage"]["params"].clone();
    assert!(params(&default).get("precision").is_none(), "{}", params(&default));
    let explicit = sb.run_json("train.toml", &["--set", "pretrain.precision=f32"]);
    assert!(ran(&explicit).is_empty(), "f32 set explicitly is the default: {explicit}");
    let other = sb.run_json("train.toml", &bf16);
    assert_eq!(params(&other)["precision"], "\"bf16\"");
    assert_ne!(key(&other, "pretrain"), key(&default, "pretrain"));
}

/// `shards` splits each batch into shards run side by side: the same bits on 1 and 2 threads,
/// other bits than one pass (the gradients add in another order) but its validation loss to
/// rounding, and a key of its own while the default stays out of the key.
#[test]
fn shards_train_one_set_of_bits_and_the_loss_of_one_pass() {
    let shards = ["--set", "pretrain.shards=2"];
    let (one, e1) = train_with(&[("RAYON_NUM_THREADS", "1")], &shards);
    let (two, e2) = train_with(&[("RAYON_NUM_THREADS", "2")], &shards);
    assert!(one == two, "sharded weights differ between 1 and 2 threads");
    assert_eq!(e1, e2);
    let (whole, e_whole) = train_with(&[], &[]);
    assert!(whole != one, "2 shards trained the bits of one pass: the batch was not split");
    let loss = |e: &str| serde_json::from_str::<Value>(e).unwrap()["val_loss"].as_f64().unwrap();
    let (sharded, one_pass) = (loss(&e1), loss(&e_whole));
    assert!(
        (sharded - one_pass).abs() <= 0.005 * one_pass,
        "validation loss {sharded} in shards, {one_pass} in one pass"
    );

    let sb = Sandbox::new();
    let default = sb.run_json("train.toml", &[]);
    let params = |run: &Value| sb.manifest(&key(run, "pretrain"))["meta"]["preimage"]["params"].clone();
    assert!(params(&default).get("shards").is_none(), "{}", params(&default));
    assert!(ran(&sb.run_json("train.toml", &["--set", "pretrain.shards=1"])).is_empty(), "1 is the default");
    let other = sb.run_json("train.toml", &shards);
    assert_ne!(key(&other, "pretrain"), key(&default, "pretrain"));
}

/// Starts a 3000-step warmup-stable-decay run of `train.toml` (as `wsd.toml`) and waits for
/// its decay to begin: the family's state is written, the run's own artifact (which will name
/// the family) is not. Returns the run and the state's path.
fn wsd_run_in_its_decay(sb: &Sandbox) -> (std::process::Child, PathBuf) {
    let text = std::fs::read_to_string(sb.path("train.toml")).unwrap();
    let long = "max_steps = 3000\nschedule = \"wsd\"\neval_interval = 0\n";
    sb.write("wsd.toml", text.replace("max_steps = 60\n", long).replace("eval_interval = 20\n", ""));
    let child = sb.command().args(["run", "wsd.toml"]).stdout(std::process::Stdio::null()).spawn().unwrap();
    let families = sb.store().join("families");
    let state = || -> Option<PathBuf> {
        let family = std::fs::read_dir(&families).ok()?.next()?.ok()?.path();
        let mut states = std::fs::read_dir(&family).ok()?.filter_map(|e| e.ok()).map(|e| e.path());
        states.find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")))
    };
    (child, poll_until("family state", state))
}

/// `cache gc` while a warmup-stable-decay run is in its decay: gc must leave the family's state
/// (a run holds its family), and the run must finish with it in place.
#[test]
fn gc_during_a_run_leaves_the_family_the_run_uses() {
    let sb = Sandbox::new();
    let (mut child, state) = wsd_run_in_its_decay(&sb);
    assert_success(&sb.tinygpt(&["cache", "gc", "wsd.toml", "--keep-runs", "0"]));
    assert!(child.try_wait().unwrap().is_none(), "the run finished before gc; make it longer");
    assert!(state.exists(), "gc removed the family state of a running stage");
    assert!(child.wait().unwrap().success());
    assert!(state.exists(), "the finished run's family state is gone");
}

/// `cache gc` told to keep nothing, while a run is in its third stage: the artifacts the run
/// has (the corpus, tokens and blocks that `pretrain` and then `evaluate` read) are held, so
/// gc leaves them, the run finishes, and running the recipe again builds nothing.
#[test]
fn gc_keeping_nothing_during_a_run_leaves_what_the_run_reads() {
    let sb = Sandbox::new();
    let (mut child, _) = wsd_run_in_its_decay(&sb);
    let objects = || std::fs::read_dir(sb.store().join("objects")).unwrap().count();
    let before = objects();
    assert!(before >= 3, "corpus, tokenize and pack are published ({before} artifacts)");
    assert_success(&sb.tinygpt(&["cache", "gc", "--keep-runs", "0"]));
    assert!(child.try_wait().unwrap().is_none(), "the run finished before gc; make it longer");
    assert_eq!(objects(), before, "gc removed an artifact of a running recipe");
    assert!(child.wait().unwrap().success(), "the run failed after gc");
    let again = sb.run_json("wsd.toml", &[]);
    assert!(ran(&again).is_empty(), "{again}");
}

/// Long enough to be interrupted: a few seconds, with a checkpoint every 10 steps.
const LONG: [&str; 4] = ["--set", "pretrain.max_steps=600", "--set", "pretrain.eval_interval=0"];

/// Start the long run (with `sets`), interrupt it with `sig` once it has written a checkpoint.
/// Returns the sandbox, the pretrain key and the exit status.
fn interrupt_training(sig: &str, sets: &[&str]) -> (Sandbox, String, std::process::ExitStatus) {
    let sb = Sandbox::new();
    let (key, status) = interrupt_run(&sb, "train.toml", &[&LONG[..], sets].concat(), sig);
    (sb, key, status)
}

fn resumes_bit_identically_after(sig: &str, sets: &[&str]) {
    let (sb, _, status) = interrupt_training(sig, sets);
    if sig == "-INT" {
        assert_eq!(status.code(), Some(130), "Ctrl-C exits 130");
    }
    let long = [&LONG[..], sets].concat();
    let resumed = sb.run_json("train.toml", &long);
    let from = stage(&resumed, "pretrain")["metrics"]["resumed_from_step"].as_u64();
    assert!(from.is_some_and(|s| s > 0 && s < 600), "the rerun resumed from a checkpoint: {from:?}");

    let fresh = Sandbox::new();
    let uninterrupted = fresh.run_json("train.toml", &long);
    assert!(
        weights(&sb, &resumed) == weights(&fresh, &uninterrupted),
        "resumed weights differ from an uninterrupted run"
    );
    let digest = |sb: &Sandbox, run: &Value| sb.manifest(&key(run, "pretrain"))["content_digest"].clone();
    assert_eq!(digest(&sb, &resumed), digest(&fresh, &uninterrupted), "every file but the volatile log is the same");
    let steps = |sb: &Sandbox, run: &Value| -> Vec<(u64, Option<f64>, Option<f64>)> {
        std::fs::read_to_string(artifact(sb, run, "pretrain").join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .map(|l| (l["step"].as_u64().unwrap(), l["loss"].as_f64(), l["val_loss"].as_f64()))
            .collect()
    };
    assert_eq!(steps(&sb, &resumed), steps(&fresh, &uninterrupted), "the metrics log continues where it stopped");
}

#[test]
fn a_killed_pretraining_resumes_to_the_same_bits() {
    resumes_bit_identically_after("-KILL", &[]);
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_the_rerun_ends_with_the_same_bits() {
    // nanoGPT's random windows with two micro-batches per step: the checkpoint's data position
    // must carry the window generator's state, which advances twice per step. Each batch in
    // two shards, whose gradient buffers a checkpoint need not hold.
    let sets = ["--set", "pretrain.sampler=windows", "--set", "pretrain.grad_accum=2", "--set", "pretrain.shards=2"];
    resumes_bit_identically_after("-INT", &sets);
}

#[test]
fn a_nan_loss_stops_the_stage_naming_the_step_and_publishes_nothing() {
    use stages::checkpoint::TrainState;
    let (sb, pretrain_key, _) = interrupt_training("-INT", &[]);
    let work = sb.store().join("work").join(&pretrain_key);
    // Poison one weight of the saved state, as a diverged run would have.
    let like = {
        let (params, _) = stages::model_io::load_safetensors_with(&work.join("checkpoint.safetensors")).unwrap();
        let mut like = stages::nn::params::ParamMap::default();
        for (name, t) in params.iter() {
            if let Some(name) = name.strip_prefix("param.") {
                like.insert(name, t.clone());
            }
        }
        like
    };
    let mut state = TrainState::load(&work, &like, &like).unwrap().expect("Ctrl-C left a checkpoint");
    state.params.get_mut("transformer.h.0.mlp.c_fc.weight")[0] = f32::NAN;
    state.save(&work).unwrap();
    let step = state.progress.step;

    let out = sb.command().args(["run", "train.toml"]).args(LONG).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("training diverged at step {}: loss NaN", step + 1)), "{err}");
    assert!(!sb.store().join("objects").join(&pretrain_key).exists(), "no artifact for a diverged run");
}

/// Two micro-batches of 4 accumulate to the gradient of one batch of 8 (the same blocks, in
/// the same order), so training follows the same path up to rounding.
#[test]
fn gradient_accumulation_matches_a_larger_batch() {
    let losses = |sets: &[&str]| -> Vec<f64> {
        let sb = Sandbox::new();
        let mut args = vec!["--set", "pretrain.sampler=blocks"];
        args.extend_from_slice(sets);
        let run = sb.run_json("train.toml", &args);
        std::fs::read_to_string(artifact(&sb, &run, "pretrain").join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64())
            .collect()
    };
    let big = losses(&["--set", "pretrain.batch_size=8"]);
    let accumulated = losses(&["--set", "pretrain.batch_size=4", "--set", "pretrain.grad_accum=2"]);
    assert_eq!(big.len(), accumulated.len());
    for (step, (a, b)) in big.iter().zip(&accumulated).enumerate() {
        assert!((a - b).abs() < 1e-3 * (1.0 + step as f64), "logged loss {step}: {a} vs {b}");
    }
    let other = losses(&["--set", "pretrain.batch_size=4"]);
    assert!((other[0] - big[0]).abs() > 1e-3, "a different batch gives a different path");
}

/// The machine kind the shakespeare_char figures in docs/bench.md were measured on (platform
/// and matmul fingerprint, as the golden digests name machines). There the recipe reproduces
/// them bit for bit; elsewhere it trains other, equally valid bits: another draw from a
/// seed-to-seed spread of about 0.012 (docs/bench.md).
const SHAKESPEARE_MEASURED_ON: &str = "x86_64-linux, matmul afd09ebc60c7";

/// Issue 3's bar, on the real recipe and data: nanoGPT reports a validation loss of 1.88 for
/// its CPU recipe, and ours must reach 1.90 or lower. nanoGPT's figure is its estimate over
/// 240 random validation windows; `pretrain`'s `val_loss` is an estimate of the same size (the
/// first 240 validation blocks: 20 batches of 12), while `evaluate` scores every validation
/// block. About two minutes.
#[test]
fn real_data_shakespeare_char_reaches_the_validation_loss_of_nanogpt() {
    let Some(data) = shared_data() else { return };
    let sb = Sandbox::new();
    let recipe = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("recipes/shakespeare_char.toml");
    let input = format!("tokenize.input={}", data.join("tinyshakespeare/input.txt").display());
    let run = sb.run_json(recipe.to_str().unwrap(), &["--set", &input]);
    let estimate = stage(&run, "pretrain")["metrics"]["val_loss"].as_f64().unwrap();
    let whole = stage(&run, "evaluate")["metrics"]["val_loss"].as_f64().unwrap();
    let machine = crate::golden::machine();
    eprintln!("shakespeare_char on {machine}: val_loss {estimate} (240 windows), {whole} (whole split)");
    // An untrained model scores about 4.19 (ln 66) and one that learned only character
    // frequencies 3.31 (their entropy), so both bounds fail unless the model learned context.
    assert!(estimate < 1.95 && whole < 1.95, "the recipe no longer trains: {estimate}, {whole}");
    if machine == SHAKESPEARE_MEASURED_ON {
        assert!(estimate <= 1.90, "the 240-block estimate: {estimate} > 1.90");
    } else {
        eprintln!("not checking the 1.90 bar: this machine trains other bits than {SHAKESPEARE_MEASURED_ON}");
    }
    // The same recipe with bf16 weight products: the whole split's loss within 1% of f32's.
    if !stages::nn::kernels::bf16::amx() {
        eprintln!("SKIPPED the bf16 run: no AMX here, and its emulation would take minutes");
        return;
    }
    let bf16 = sb.run_json(recipe.to_str().unwrap(), &["--set", &input, "--set", "pretrain.precision=bf16"]);
    let bf16_whole = stage(&bf16, "evaluate")["metrics"]["val_loss"].as_f64().unwrap();
    eprintln!("shakespeare_char in bf16: val_loss {bf16_whole} (whole split)");
    assert!((bf16_whole - whole).abs() <= 0.01 * whole, "bf16 {bf16_whole} against f32 {whole}");
}

/// Issue 16, item 3: raising `max_steps` of a warmup-stable-decay run continues from the
/// shorter run's state at the end of its stable phase, bit-identical to a run from scratch.
#[test]
fn a_longer_wsd_run_continues_from_the_shorter_one_bit_for_bit() {
    let wsd = |sb: &Sandbox| {
        let text = std::fs::read_to_string(sb.path("train.toml")).unwrap();
        assert!(text.contains("max_steps = 60\n"));
        sb.write("wsd.toml", text.replace("max_steps = 60\n", "max_steps = 50\nschedule = \"wsd\"\n"));
    };
    let sb = Sandbox::new();
    wsd(&sb);
    let short = sb.run_json("wsd.toml", &["--set", "pretrain.max_steps=30"]);
    assert!(stage(&short, "pretrain")["metrics"]["reused_steps"].is_null());
    // 30 steps, the last 30 / 5 decaying: the state after step 24 is shared.
    let family = sb.store().join("families");
    let shared: Vec<_> =
        std::fs::read_dir(&family).unwrap().flat_map(|f| std::fs::read_dir(f.unwrap().path()).unwrap()).collect();
    assert_eq!(shared.len(), 1);
    assert_eq!(shared[0].as_ref().unwrap().file_name(), "step-000000000024");

    let table = sb.tinygpt(&["run", "wsd.toml"]);
    assert_success(&table);
    let text = String::from_utf8_lossy(&table.stdout);
    let line = text.lines().find(|l| l.starts_with("pretrain")).unwrap();
    assert!(line.contains("reused_steps=24") && line.contains("steps=50"), "{text}");
    let longer = sb.run_json("wsd.toml", &[]);

    let scratch = Sandbox::new();
    wsd(&scratch);
    let fresh = scratch.run_json("wsd.toml", &[]);
    assert!(stage(&fresh, "pretrain")["metrics"]["reused_steps"].is_null());
    let digest = |sb: &Sandbox, run: &Value| sb.manifest(&key(run, "pretrain"))["content_digest"].clone();
    assert_eq!(digest(&sb, &longer), digest(&scratch, &fresh), "the continued run's bytes are a fresh run's");
    assert_eq!(key(&longer, "evaluate"), key(&fresh, "evaluate"));

    // gc keeps a family directory while an artifact of the family is kept.
    assert_success(&sb.tinygpt(&["cache", "gc", "wsd.toml", "--keep-runs", "0"]));
    assert_eq!(std::fs::read_dir(&family).unwrap().count(), 1, "kept: the recipe's pretrain names it");
    assert_success(&sb.tinygpt(&["cache", "gc", "--keep-runs", "0"]));
    assert_eq!(std::fs::read_dir(&family).unwrap().count(), 0, "no kept artifact names it");
}
