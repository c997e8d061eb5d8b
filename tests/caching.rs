//! Reruns do only the work whose inputs changed (issue 2, items 3 and 8).

use crate::util::{key, ran, stage, touch, Sandbox};

#[test]
fn first_run_runs_every_stage_and_second_run_none() {
    let sb = Sandbox::new();
    let first = sb.run_json("tiny.toml", &[]);
    assert_eq!(ran(&first), ["corpus", "tokenize", "pack"]);
    let second = sb.run_json("tiny.toml", &[]);
    assert!(ran(&second).is_empty(), "{second}");
    for name in ["corpus", "tokenize", "pack"] {
        assert_eq!(key(&first, name), key(&second, name));
        assert_eq!(stage(&second, name)["metrics"], stage(&first, name)["metrics"], "cached metrics are reported");
    }
    assert!(stage(&first, "tokenize")["metrics"]["tokens"].as_u64().unwrap() > 1000);
}

#[test]
fn changing_seq_len_reruns_pack_but_not_tokenize_and_plan_names_it() {
    let sb = Sandbox::new();
    sb.run_json("tiny.toml", &[]);
    let plan = sb.tinygpt(&["plan", "tiny.toml", "--set", "pack.seq_len=16"]);
    let text = String::from_utf8(plan.stdout).unwrap();
    let pack_line = text.lines().find(|l| l.starts_with("pack")).unwrap();
    assert!(pack_line.contains("run") && pack_line.contains("seq_len changed (32 -> 16)"), "{text}");
    assert!(text.lines().find(|l| l.starts_with("tokenize")).unwrap().contains("cached"), "{text}");

    let plan = sb.plan_json("tiny.toml", &["--set", "pack.seq_len=16"]);
    assert_eq!(stage(&plan, "pack")["reason"], "seq_len changed (32 -> 16)");
    assert_eq!(stage(&plan, "pack")["reasons"][0]["reason"], "config_changed");

    let rerun = sb.run_json("tiny.toml", &["--set", "pack.seq_len=16"]);
    assert_eq!(ran(&rerun), ["pack"]);
}

#[test]
fn thread_count_is_not_part_of_the_key() {
    let sb = Sandbox::new();
    sb.run_json("tiny.toml", &[]);
    let rerun = sb.run_json("tiny.toml", &["--set", "tokenize.threads=1", "--set", "tokenize.chunk_docs=3"]);
    assert!(ran(&rerun).is_empty(), "{rerun}");
}

#[test]
fn one_and_two_threads_give_identical_artifacts() {
    let one = Sandbox::new();
    let two = Sandbox::new();
    let a = one.run_json(
        "tiny.toml",
        &["--set", "tokenize.threads=1", "--set", "corpus.threads=1", "--set", "pack.threads=1"],
    );
    let b = two.run_json("tiny.toml", &["--set", "tokenize.threads=2", "--set", "tokenize.chunk_docs=1"]);
    for name in ["corpus", "tokenize", "pack"] {
        assert_eq!(
            one.manifest(&key(&a, name))["content_digest"],
            two.manifest(&key(&b, name))["content_digest"],
            "stage {name}"
        );
    }
}

#[test]
fn touching_a_raw_input_reruns_nothing_but_changing_its_bytes_does() {
    let sb = Sandbox::new();
    sb.write("data.txt", "to be or not to be, that is the question\n".repeat(20));
    assert_eq!(ran(&sb.run_json("raw_text.toml", &[])), ["tokenize", "pack"]);
    touch(&sb.path("data.txt"));
    assert!(ran(&sb.run_json("raw_text.toml", &[])).is_empty());

    sb.write("data.txt", "whether 'tis nobler in the mind to suffer\n".repeat(20));
    let plan = sb.plan_json("raw_text.toml", &[]);
    assert_eq!(stage(&plan, "tokenize")["reason"], "input `input` changed (file `data.txt`)");
    assert_eq!(stage(&plan, "pack")["reason"], "input `data` is rebuilt first (stage `tokenize`)");
    assert_eq!(ran(&sb.run_json("raw_text.toml", &[])), ["tokenize", "pack"]);
}

#[test]
fn a_stage_that_reruns_to_identical_bytes_leaves_its_dependents_cached() {
    let sb = Sandbox::new();
    let lines: String = (0..30).map(|i| format!("{{\"text\": \"line number {i}\"}}\n")).collect();
    sb.write("data.jsonl", &lines);
    let args = ["--set", "tokenize.input=data.jsonl"];
    sb.run_json("raw_text.toml", &args);
    // New bytes in the file, same text in the field: tokenize reruns, writes the same tokens.
    let with_ids: String = (0..30).map(|i| format!("{{\"id\": {i}, \"text\": \"line number {i}\"}}\n")).collect();
    sb.write("data.jsonl", with_ids);
    let rerun = sb.run_json("raw_text.toml", &args);
    assert_eq!(ran(&rerun), ["tokenize"]);
    assert_eq!(stage(&rerun, "pack")["action"], "cached");
}

#[test]
fn a_pretrain_that_reruns_to_the_same_weights_leaves_evaluate_cached() {
    // metrics.jsonl holds timings and follows the unhashed log_interval: it differs between the
    // two runs, but it is volatile, so the content digest (the weights and the other files)
    // does not, and the early cutoff holds for the most expensive stage.
    let sb = Sandbox::new();
    let small = ["--set", "pretrain.max_steps=12", "--set", "evaluate.max_new_tokens=4"];
    let first = sb.run_json("train.toml", &small);
    let pretrain = sb.manifest(&key(&first, "pretrain"));
    std::fs::remove_dir_all(sb.store().join("objects").join(key(&first, "pretrain"))).unwrap();
    let rerun = sb.run_json("train.toml", &[&small[..], &["--set", "pretrain.log_interval=3"]].concat());
    assert_eq!(ran(&rerun), ["pretrain"]);
    assert_eq!(stage(&rerun, "evaluate")["action"], "cached");
    let again = sb.manifest(&key(&rerun, "pretrain"));
    assert_eq!(again["content_digest"], pretrain["content_digest"]);
    let metrics = |m: &serde_json::Value| {
        m["files"].as_array().unwrap().iter().find(|f| f["name"] == "metrics.jsonl").cloned().unwrap()
    };
    assert_ne!(metrics(&again)["digest"], metrics(&pretrain)["digest"], "the log was written anew");
    assert_eq!(metrics(&again)["volatile"], true);
}

#[test]
fn set_can_point_an_input_at_another_file() {
    let sb = Sandbox::new();
    sb.write("data.txt", "abcabcabcabc\n".repeat(10));
    sb.write("other.txt", "xyzxyzxyzxyz\n".repeat(10));
    let a = sb.run_json("raw_text.toml", &[]);
    let b = sb.run_json("raw_text.toml", &["--set", "tokenize.input=other.txt"]);
    assert_eq!(ran(&b), ["tokenize", "pack"]);
    assert_ne!(key(&a, "tokenize"), key(&b, "tokenize"));
    // Same bytes under another name: the key follows content, not paths.
    sb.write("copy.txt", std::fs::read(sb.path("data.txt")).unwrap());
    let c = sb.run_json("raw_text.toml", &["--set", "tokenize.input=copy.txt"]);
    assert!(ran(&c).is_empty());
}

#[test]
fn plan_says_new_stage_and_artifact_missing() {
    let sb = Sandbox::new();
    let plan = sb.plan_json("tiny.toml", &[]);
    assert_eq!(stage(&plan, "corpus")["reason"], "new stage");
    assert_eq!(stage(&plan, "tokenize")["key"], serde_json::Value::Null);
    let run = sb.run_json("tiny.toml", &[]);
    std::fs::remove_dir_all(sb.store().join("objects").join(key(&run, "pack"))).unwrap();
    let plan = sb.plan_json("tiny.toml", &[]);
    assert_eq!(stage(&plan, "pack")["reason"], "artifact missing");
    assert_eq!(stage(&plan, "tokenize")["action"], "cached");
}

#[test]
fn changing_the_seed_reruns_only_the_stages_that_use_it() {
    let sb = Sandbox::new();
    sb.run_json("tiny.toml", &[]);
    let plan = sb.plan_json("tiny.toml", &["--set", "corpus.seed=8"]);
    assert_eq!(stage(&plan, "corpus")["reason"], "seed changed (7 -> 8)");
    let rerun = sb.run_json("tiny.toml", &["--set", "recipe.seed=8"]);
    assert_eq!(ran(&rerun), ["corpus", "tokenize", "pack"]);
}
