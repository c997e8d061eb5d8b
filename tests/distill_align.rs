//! Distillation and alignment end to end: the teacher's cached top-k log-probabilities, students
//! distilled from them (and what reruns when only the student changes), exact resume, and
//! vocabulary mismatches caught before anything runs.

use serde_json::Value;
use stages::arrow_io::{read_blocks, read_examples, TokenMeta};
use stages::generate_data::prompts;
use stages::model_io::load_model;
use stages::nn::batch::{Batch, IGNORE};
use stages::nn::decoder::Decoder;
use stages::nn::model::{Activations, Model};
use stages::nn::sample::argmax;
use stages::reference::{SeqLogps, TRAIN_LOGPS};
use stages::teacher::{TeacherLogits, TRAIN_LOGITS, VAL_LOGITS};

use crate::util::{artifact, interrupt_run, key, ran, stage, Sandbox};

#[test]
fn a_teacher_is_run_once_for_every_student() {
    let sb = Sandbox::new();
    let run = sb.run_json("distill.toml", &[]);
    let teacher = artifact(&sb, &run, "teacher");
    let logits = TeacherLogits::read(&teacher.join(TRAIN_LOGITS)).unwrap();
    let metrics = &stage(&run, "teacher")["metrics"];
    let train_blocks = stage(&run, "pack")["metrics"]["train_blocks"].as_u64().unwrap() as usize;
    assert_eq!((logits.k, logits.t, logits.positions()), (8, 16, train_blocks * 16));
    assert!(TeacherLogits::read(&teacher.join(VAL_LOGITS)).unwrap().positions() > 0);
    // Highest first, and the top k hold part of the mass: more than k uniform tokens would.
    for (lp, ids) in logits.logprobs.chunks(8).zip(logits.ids.chunks(8)).take(100) {
        assert!(lp.windows(2).all(|w| w[0] >= w[1]), "{lp:?}");
        let mut sorted = ids.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 8, "distinct ids");
    }
    let mass = metrics["top_k_mass"].as_f64().unwrap();
    assert!(mass > 8.0 / 56.0 && mass < 1.0, "{metrics}");
    assert!(metrics["bytes"].as_u64().unwrap() > (train_blocks * 16 * 8 * 4) as u64);

    // The student is a model like any other: evaluate takes it.
    let (cfg, params) = load_model(&artifact(&sb, &run, "student")).unwrap();
    assert_eq!((cfg.n_layer, cfg.n_embd, cfg.vocab_size), (1, 16, 56));
    assert_eq!(stage(&run, "student")["metrics"]["parameters"].as_u64(), Some(params.num_elements() as u64));
    assert!(stage(&run, "eval_student")["metrics"]["val_loss"].as_f64().unwrap().is_finite());

    // A second student of another size, another temperature, another divergence: the teacher's
    // log-probabilities come from the cache.
    for set in ["student.n_embd=32", "student.temperature=1.0", "student.divergence=\"reverse\""] {
        let again = sb.run_json("distill.toml", &["--set", set]);
        assert_eq!(ran(&again), ["student", "eval_student"], "{set}");
    }
    let plan = sb.plan_json("distill.toml", &["--set", "student.divergence=\"jsd\""]);
    assert_eq!(stage(&plan, "teacher")["action"], "cached");
}

#[test]
fn a_student_can_start_from_another_model() {
    let sb = Sandbox::new();
    // From the scratch model with a zero learning rate, the student is the scratch model.
    let frozen = ["student.init=\"scratch\"", "student.lr=0", "student.min_lr=0", "student.max_steps=2"];
    let args: Vec<&str> = frozen.iter().flat_map(|s| ["--set", *s]).collect();
    let run = sb.run_json("distill.toml", &args);
    let (cfg, student) = load_model(&artifact(&sb, &run, "student")).unwrap();
    let (_, scratch) = load_model(&artifact(&sb, &run, "scratch")).unwrap();
    assert_eq!((cfg.n_layer, cfg.n_embd), (1, 16));
    assert!(student == scratch, "the student starts from the init model's weights");
    // With a learning rate it moves away from them.
    let run = sb.run_json("distill.toml", &["--set", "student.init=\"scratch\"", "--set", "student.max_steps=2"]);
    let (_, student) = load_model(&artifact(&sb, &run, "student")).unwrap();
    assert!(student != scratch);
}

/// The `generate` stage's documents are the model's greedy continuations of the data's
/// document starts, decoded here one token at a time for reference; a student distills from
/// them, and a change to the generation reruns what follows it, never the model.
#[test]
fn a_model_s_continuations_are_packed_as_data_to_distill_from() {
    let sb = Sandbox::new();
    let run = sb.run_json("distill.toml", &[]);
    let (generated, pack) = (artifact(&sb, &run, "generated"), artifact(&sb, &run, "pack"));
    let meta = TokenMeta::read(&generated).unwrap();
    assert_eq!(meta, TokenMeta::read(&pack).unwrap(), "the data's vocabulary and seq_len");
    let blocks = read_blocks(&generated.join("train.arrow")).unwrap();
    assert_eq!((blocks.width, blocks.padding), (17, 0));
    let stream = blocks.stream();
    let docs: Vec<&[u32]> = stream.split(|&t| t == meta.eot_id).collect();
    assert!(docs.len() >= 40, "48 sequences, less the end that did not fill a block: {}", docs.len());

    let (cfg, params) = load_model(&artifact(&sb, &run, "teacher_model")).unwrap();
    let model = Model::new(cfg, &params);
    let starts = prompts(&read_blocks(&pack.join("train.arrow")).unwrap(), meta.eot_id, 4, 48, false).unwrap();
    for (i, doc) in docs.iter().enumerate().take(docs.len() - 1) {
        let mut want = starts[i].clone();
        let mut dec = Decoder::new(&model);
        let mut logits = Vec::new();
        for &t in &want {
            logits = dec.step(&model, &params, t).to_vec();
        }
        loop {
            let next = argmax(&logits) as u32;
            if next == meta.eot_id {
                break;
            }
            want.push(next);
            if want.len() == 4 + 13 {
                break;
            }
            logits = dec.step(&model, &params, next).to_vec();
        }
        assert_eq!(doc, &want, "sequence {i}");
    }
    let metrics = &stage(&run, "generated")["metrics"];
    assert_eq!(metrics["sequences"].as_u64(), Some(54), "{metrics}");
    let generated_tokens = metrics["generated_tokens"].as_u64().unwrap();
    assert!(generated_tokens > 0 && generated_tokens <= 54 * 13, "{metrics}");
    assert!(stage(&run, "seq_student")["metrics"]["val_loss"].as_f64().unwrap().is_finite());

    let again = sb.run_json("distill.toml", &["--set", "generated.new_tokens=10"]);
    assert_eq!(ran(&again), ["generated", "teacher_generated", "seq_student"]);
}

fn distill_resumes_bit_identically(sig: &str) {
    let long = ["--set", "student.max_steps=3000", "--set", "student.eval_interval=0"];
    let sb = Sandbox::new();
    sb.run_json("distill.toml", &["--set", "student.max_steps=1"]);
    let (student_key, _) = interrupt_run(&sb, "distill.toml", &long, sig);
    let resumed = sb.run_json("distill.toml", &long);
    assert_eq!(key(&resumed, "student"), student_key);
    let from = stage(&resumed, "student")["metrics"]["resumed_from_step"].as_u64();
    assert!(from.is_some_and(|s| s > 0 && s < 3000), "resumed from a checkpoint: {from:?}");
    let fresh = Sandbox::new();
    let uninterrupted = fresh.run_json("distill.toml", &long);
    let digest = |sb: &Sandbox, run: &Value| sb.manifest(&key(run, "student"))["content_digest"].clone();
    assert_eq!(digest(&sb, &resumed), digest(&fresh, &uninterrupted), "same student bits");
}

#[test]
fn a_killed_distillation_resumes_to_the_same_bits() {
    distill_resumes_bit_identically("-KILL");
}

#[test]
fn preference_pairs_are_split_counted_and_scored_by_the_reference() {
    let sb = Sandbox::new();
    let run = sb.run_json("align.toml", &[]);
    let pairs = &stage(&run, "pairs")["metrics"];
    assert_eq!((pairs["pairs"].as_u64(), pairs["skipped_empty"].as_u64()), (Some(40), Some(1)), "{pairs}");
    assert_eq!(pairs["skipped_identical"].as_u64(), Some(1));
    assert_eq!(pairs["train_pairs"].as_u64().unwrap() + pairs["val_pairs"].as_u64().unwrap(), 40);
    assert!(pairs["prompts_truncated"].as_u64().unwrap() > 0, "long prompts keep their end: {pairs}");

    // Chosen and rejected share the prompt; the mask covers the response and end-of-text.
    let data = artifact(&sb, &run, "pairs");
    let train = read_examples(&data.join("train.arrow")).unwrap();
    assert_eq!(train.len() as u64, 2 * pairs["train_pairs"].as_u64().unwrap());
    let ((c, cm), (r, rm)) = (train.example(0), train.example(1));
    let prompt = cm.iter().position(|m| *m == 1).unwrap();
    assert_eq!(prompt, rm.iter().position(|m| *m == 1).unwrap());
    assert_eq!(&c[..prompt], &r[..prompt]);
    assert!(cm[prompt..].iter().all(|m| *m == 1) && c.last() == r.last(), "responses end with end-of-text");

    // The reference's sums are a plain forward over each sequence alone.
    let logps = SeqLogps::read(&artifact(&sb, &run, "reference").join(TRAIN_LOGPS)).unwrap();
    assert_eq!(logps.logps.len(), train.len());
    let (cfg, params) = load_model(&artifact(&sb, &run, "pretrain")).unwrap();
    let model = Model::new(cfg, &params);
    for i in [0, 1, 7] {
        let (ids, mask) = train.example(i);
        let targets: Vec<u32> = (1..ids.len()).map(|k| if mask[k] == 1 { ids[k] } else { IGNORE }).collect();
        let batch = Batch::whole_rows(ids.len() - 1, &ids[..ids.len() - 1], &targets);
        let mut acts = Activations::inference(&model, 1, ids.len() - 1);
        let (sum, n) = model.target_losses(&params, &batch, &mut acts);
        assert!((-sum - logps.logps[i]).abs() < 1e-3, "sequence {i}: {} vs {}", -sum, logps.logps[i]);
        assert_eq!(n as u32, logps.tokens[i]);
    }
}

#[test]
fn dpo_learns_the_pairs_and_beta_reruns_only_align() {
    let sb = Sandbox::new();
    let run = sb.run_json("align.toml", &[]);
    let dpo = &stage(&run, "dpo")["metrics"];
    assert!(dpo["reward_accuracy"].as_f64().unwrap() > 0.6, "{dpo}");
    let base = &stage(&run, "eval_base")["metrics"];
    let tuned = &stage(&run, "eval_dpo")["metrics"];
    assert!(tuned["reward_accuracy"].as_f64().unwrap() > 0.6, "{tuned}");
    assert!(
        tuned["preference_accuracy"].as_f64().unwrap() >= base["preference_accuracy"].as_f64().unwrap(),
        "{base} vs {tuned}"
    );
    let log = std::fs::read_to_string(artifact(&sb, &run, "dpo").join("metrics.jsonl")).unwrap();
    let evals: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l.get("val_loss").is_some())
        .collect();
    assert_eq!(evals.len(), 2, "evaluations at steps 8 and 16");
    for key in ["rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "kl_chosen", "logp_accuracy"]
    {
        assert!(evals[1][key].is_number(), "{key} in {}", evals[1]);
    }
    // SimPO trained LoRA adapters and wrote them in PEFT's layout.
    let simpo = artifact(&sb, &run, "simpo");
    assert!(simpo.join("adapter/adapter_model.safetensors").is_file());
    assert!(stage(&run, "simpo")["metrics"].get("kl_chosen").is_none(), "no reference, no KL");

    // Another beta or loss: the reference is cached, align and its evaluation rerun.
    for set in ["dpo.beta=0.2", "dpo.loss=\"ipo\"", "dpo.label_smoothing=0.1"] {
        let plan = sb.plan_json("align.toml", &["--set", set]);
        assert_eq!(stage(&plan, "reference")["action"], "cached", "{set}");
        assert_eq!(stage(&plan, "dpo")["action"], "run", "{set}");
    }
    let again = sb.run_json("align.toml", &["--set", "dpo.beta=0.2"]);
    assert_eq!(ran(&again), ["dpo", "eval_dpo"]);
}

#[test]
fn losses_with_a_reference_need_one_when_the_recipe_is_resolved() {
    let sb = Sandbox::new();
    let recipe = std::fs::read_to_string(sb.path("align.toml")).unwrap();
    sb.write("bad.toml", recipe.replacen("reference = \"reference\"\n", "", 1));
    let line = recipe.lines().position(|l| l == "loss = \"dpo\"").unwrap();
    for command in ["plan", "run"] {
        let out = sb.tinygpt(&[command, "bad.toml"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("wire `reference`") && err.contains(&format!("bad.toml:{line}:")), "{err}");
    }
    // SimPO and ORPO have none: the same recipe with them resolves.
    let plan = sb.plan_json("bad.toml", &["--set", "dpo.loss=\"orpo\""]);
    assert_eq!(stage(&plan, "dpo")["action"], "run");
}

/// DPO's pairs and KTO's examples split into shards of whole groups (KTO's reference point
/// still over the whole micro-batch): other bits than one pass, its validation loss to rounding.
#[test]
fn preference_losses_run_in_shards_of_whole_pairs() {
    let sb = Sandbox::new();
    let sets = ["--set", "dpo.max_steps=6", "--set", "kto.max_steps=6"];
    let whole = sb.run_json("align.toml", &sets);
    let sharded = sb.run_json("align.toml", &[&sets[..], &["--set", "dpo.shards=2", "--set", "kto.shards=2"]].concat());
    for name in ["dpo", "kto"] {
        assert_ne!(key(&whole, name), key(&sharded, name));
        let val = |run: &Value| stage(run, name)["metrics"]["val_loss"].as_f64().unwrap();
        let (one_pass, in_shards) = (val(&whole), val(&sharded));
        assert!((one_pass - in_shards).abs() <= 1e-4 * one_pass.abs().max(0.1), "{name}: {one_pass} vs {in_shards}");
        let digest = |sb: &Sandbox, run: &Value| sb.manifest(&key(run, name))["content_digest"].clone();
        assert_ne!(digest(&sb, &whole), digest(&sb, &sharded), "{name}: the shards trained the bits of one pass");
    }
}

#[test]
fn bad_preference_rows_exit_2_naming_the_file_row_and_field() {
    let sb = Sandbox::new();
    let rows = [
        ("{\"prompt\": \"a\", \"chosen\": \"b\"}\n", "line 1: missing field `rejected`"),
        ("{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"chosen\": [1], \"rejected\": \"c\"}\n", "line 2: field `chosen` is"),
        ("{\"chosen\": \"Human: a\", \"rejected\": \"Human: b\"}\n", "line 1: no field `prompt`"),
    ];
    for (text, expected) in rows {
        sb.write("bad.jsonl", text);
        let out = sb.tinygpt(&["run", "align.toml", "--set", "pairs.input=bad.jsonl"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("bad.jsonl") && err.contains(expected), "{err}");
    }
}

#[test]
fn a_killed_alignment_resumes_to_the_same_bits() {
    let long = [
        "--set",
        "dpo.max_steps=1000",
        "--set",
        "dpo.eval_interval=0",
        "--set",
        "dpo.lr=1e-5",
        "--set",
        "dpo.min_lr=0",
    ];
    let sb = Sandbox::new();
    sb.run_json("align.toml", &["--set", "dpo.max_steps=1"]);
    let (dpo_key, _) = interrupt_run(&sb, "align.toml", &long, "-KILL");
    let resumed = sb.run_json("align.toml", &long);
    assert_eq!(key(&resumed, "dpo"), dpo_key);
    let from = stage(&resumed, "dpo")["metrics"]["resumed_from_step"].as_u64();
    assert!(from.is_some_and(|s| s > 0 && s < 1000), "resumed from a checkpoint: {from:?}");
    let fresh = Sandbox::new();
    let uninterrupted = fresh.run_json("align.toml", &long);
    let digest = |sb: &Sandbox, run: &Value| sb.manifest(&key(run, "dpo"))["content_digest"].clone();
    assert_eq!(digest(&sb, &resumed), digest(&fresh, &uninterrupted), "same policy bits");
}

#[test]
fn one_and_two_threads_give_the_same_teacher_students_and_policies() {
    let digests = |threads: &str| {
        let sb = Sandbox::new();
        let mut out = Vec::new();
        for (recipe, stages, sets) in [
            (
                "distill.toml",
                &["teacher", "student", "generated"][..],
                &["--set", "student.max_steps=10", "--set", "generated.temperature=1.0"][..],
            ),
            // The student again, each batch in two shards that read their rows of the teacher's.
            ("distill.toml", &["student"][..], &["--set", "student.max_steps=10", "--set", "student.shards=2"][..]),
            (
                "align.toml",
                &["dpo", "kto"][..],
                &["--set", "dpo.max_steps=6", "--set", "dpo.shards=2", "--set", "kto.shards=2"][..],
            ),
            ("align.toml", &["reference", "dpo", "simpo", "eval_dpo"][..], &["--set", "dpo.max_steps=6"][..]),
        ] {
            let cmd =
                sb.command().env("RAYON_NUM_THREADS", threads).args(["run", recipe, "--json"]).args(sets).output();
            let run: Value = serde_json::from_slice(&cmd.unwrap().stdout).unwrap();
            for name in stages {
                out.push((name.to_string(), sb.manifest(&key(&run, name))["content_digest"].clone()));
            }
        }
        out
    };
    let one = digests("1");
    assert_eq!(one, digests("2"));
    assert_ne!(one[1], one[3], "the student in two shards has the bits of one pass: the batch was not split");
}

#[test]
fn different_vocabularies_are_refused_before_anything_runs() {
    let sb = Sandbox::new();
    let recipe = std::fs::read_to_string(sb.path("distill.toml")).unwrap();
    let other = "\n[stages.bytes]\nkind = \"tokenize\"\ninput = \"corpus\"\nalgorithm = \"byte\"\n\n\
                 [stages.bytes_pack]\nkind = \"pack\"\ndata = \"bytes\"\nseq_len = 16\n\n\
                 [stages.other]\nkind = \"pretrain\"\ndata = \"bytes_pack\"\nn_layer = 1\nn_head = 2\nn_embd = 16\n";
    sb.write("bad.toml", format!("{recipe}{other}"));
    for command in ["plan", "run"] {
        let out = sb.tinygpt(&[command, "bad.toml", "--set", "student.init=\"other\""]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        for part in ["stage `student`", "stage `other`", "stage `teacher`", "tokenizer stages `bytes` and `tokenize`"] {
            assert!(err.contains(part), "{part} in {err}");
        }
    }
    assert!(
        !sb.store().join("objects").exists() || std::fs::read_dir(sb.store().join("objects")).unwrap().count() == 0
    );
    // The same holds for a teacher scoring data from another tokenizer, and for evaluate.
    let out = sb.tinygpt(&["plan", "bad.toml", "--set", "teacher.data=\"bytes_pack\""]);
    assert_eq!(out.status.code(), Some(2));
    let out = sb.tinygpt(&["plan", "bad.toml", "--set", "eval_student.data=\"bytes_pack\""]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("input `data` (stage `bytes_pack`)"));
    // One tokenizer throughout: fine.
    sb.plan_json("bad.toml", &["--set", "student.init=\"scratch\""]);
}

#[test]
fn kto_trains_on_unpaired_examples_and_on_pairs() {
    let sb = Sandbox::new();
    let run = sb.run_json("kto.toml", &[]);
    let examples = &stage(&run, "examples")["metrics"];
    assert_eq!((examples["examples"].as_u64(), examples["skipped_empty"].as_u64()), (Some(36), Some(1)), "{examples}");
    assert_eq!(examples["desirable"].as_u64(), Some(24));
    let data = artifact(&sb, &run, "examples");
    let labels: Value = serde_json::from_slice(&std::fs::read(data.join("labels.json")).unwrap()).unwrap();
    assert_eq!(labels["paired"], false);
    let reference = SeqLogps::read(&artifact(&sb, &run, "reference").join(TRAIN_LOGPS)).unwrap();
    assert_eq!(reference.kl_logps.len(), reference.logps.len());
    assert!(reference.kl_logps.iter().zip(&reference.logps).any(|(a, b)| a != b), "mismatched sequences differ");

    let kto = &stage(&run, "kto")["metrics"];
    for key in ["kl", "rewards_chosen", "rewards_rejected", "train_examples"] {
        assert!(kto[key].is_number(), "{key} in {kto}");
    }
    assert!(kto["kl"].as_f64().unwrap() >= 0.0, "the KL point is clamped at 0");
    assert!(kto["rewards_chosen"].as_f64().unwrap() > kto["rewards_rejected"].as_f64().unwrap(), "{kto}");
    // Pair losses need pairs.
    let out = sb.tinygpt(&["run", "kto.toml", "--set", "kto.loss=\"simpo\""]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds unpaired examples: use loss = \"kto\""));

    // A pair is a desirable and an undesirable example.
    let paired = sb.run_json("align.toml", &[]);
    let kto = &stage(&paired, "kto")["metrics"];
    assert!(kto["kl"].is_number() && kto["logp_accuracy"].is_number(), "{kto}");
    assert_eq!(kto["train_pairs"], stage(&paired, "pairs")["metrics"]["train_pairs"]);
}

/// The shared preference data, in each of its formats, reads as its README describes it.
#[test]
fn real_preference_data_reads_in_every_format() {
    let Some(data) = crate::util::shared_data() else { return };
    let sb = Sandbox::new();
    // A one-step byte-level model: its tokenizer is all the stage needs.
    let base = ["--set", "pretrain.max_steps=1", "--set", "pretrain.block_size=512", "--set", "pairs.max_length=400"];
    let cases = [
        ("hh_rlhf/helpful-base_test_first_half.jsonl", 1177, 2, 1),
        ("hh_rlhf/helpful-base_test_first_half.parquet", 1177, 2, 1),
        ("hh_rlhf/harmless-base_test_first_half.jsonl", 1156, 4, 0),
        ("llms_from_scratch_preference/instruction-data-with-preference.json", 1100, 0, 6),
        ("llms_from_scratch_preference/instruction-data-with-preference.parquet", 1100, 0, 6),
    ];
    let mut prompts = Vec::new();
    for (file, rows, empty, identical) in cases {
        let input = format!("pairs.input={}", data.join(file).display());
        let run = sb.run_json("align.toml", &[&base[..], &["--set", &input, "--set", "dpo.max_steps=1"]].concat());
        let m = &stage(&run, "pairs")["metrics"];
        assert_eq!(m["skipped_empty"].as_u64(), Some(empty), "{file}: {m}");
        assert_eq!(m["skipped_identical"].as_u64(), Some(identical), "{file}: {m}");
        assert_eq!(m["pairs"].as_u64(), Some(rows - empty - identical), "{file}: {m}");
        let train = read_examples(&artifact(&sb, &run, "pairs").join("train.arrow")).unwrap();
        let (ids, mask) = train.example(0);
        prompts.push((file, ids[..mask.iter().position(|m| *m == 1).unwrap()].to_vec()));
    }
    // HH-RLHF's transcripts split where its Parquet copy was split: the same prompts.
    assert_eq!(prompts[0].1, prompts[1].1, "JSONL transcripts and Parquet prompts agree");
}

#[test]
fn unpaired_parquet_reads_as_its_jsonl() {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, BooleanArray, StringArray};
    let sb = Sandbox::new();
    let rows: Vec<Value> = std::fs::read_to_string(sb.path("kto.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let strings = |key: &str| -> ArrayRef {
        Arc::new(StringArray::from(rows.iter().map(|r| r[key].as_str().unwrap().to_string()).collect::<Vec<_>>()))
    };
    let labels: Vec<Option<bool>> = rows.iter().map(|r| r["label"].as_bool()).collect();
    let columns = |labels: Vec<Option<bool>>| {
        vec![
            ("prompt", strings("prompt")),
            ("completion", strings("completion")),
            ("label", Arc::new(BooleanArray::from(labels)) as ArrayRef),
        ]
    };
    crate::formats::write_parquet(&sb.path("kto.parquet"), columns(labels.clone()));
    let jsonl = sb.run_json("kto.toml", &["--set", "kto.max_steps=1"]);
    let parquet = sb.run_json("kto.toml", &["--set", "kto.max_steps=1", "--set", "examples.input=kto.parquet"]);
    assert_eq!(key(&jsonl, "reference"), key(&parquet, "reference"), "the same examples, so the same reference key");
    let mut nulls = labels;
    nulls[3] = None;
    crate::formats::write_parquet(&sb.path("bad.parquet"), columns(nulls));
    let out = sb.tinygpt(&["run", "kto.toml", "--set", "examples.input=bad.parquet"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.parquet` row 4: field `label` is null"));
}

#[test]
fn longer_wsd_align_and_distill_runs_continue_from_the_shorter_ones() {
    crate::util::check_prefix_reuse("align.toml", "dpo", 16, 24);
    crate::util::check_prefix_reuse("distill.toml", "student", 20, 30);
}
