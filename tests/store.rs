//! The store never holds a partial or damaged artifact: kill -9, Ctrl-C, corruption,
//! concurrent runs, garbage collection (issue 2, items 4 and 5).

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::util::{assert_success, key, ran, stage, Sandbox};

/// A recipe whose corpus stage takes a few seconds, long enough to interrupt.
fn slow_recipe(sb: &Sandbox) {
    sb.write("slow.toml", "[recipe]\nname = \"slow\"\n\n[stages.corpus]\nkind = \"corpus\"\nn_bytes = 150_000_000\n");
}

/// Start `tinygpt run slow.toml` and wait until the corpus stage is writing its output.
fn start_and_wait_for_output(sb: &Sandbox, corpus_key: &str) -> Child {
    let child = sb.command().args(["run", "slow.toml"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let partial = sb.store().join("tmp").join(corpus_key).join("corpus.jsonl");
    let start = Instant::now();
    while std::fs::metadata(&partial).map_or(true, |m| m.len() < 1_000_000) {
        assert!(start.elapsed() < Duration::from_secs(60), "the stage never started writing");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

fn signal(child: &Child, sig: &str) {
    let status = std::process::Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

/// Start the slow recipe, send `sig` once its stage is writing, and wait for the process:
/// returns the sandbox, the corpus stage's key and the exit status.
fn interrupt_mid_stage(sig: &str) -> (Sandbox, String, std::process::ExitStatus) {
    let sb = Sandbox::new();
    slow_recipe(&sb);
    let corpus_key = key(&sb.plan_json("slow.toml", &[]), "corpus");
    let mut child = start_and_wait_for_output(&sb, &corpus_key);
    signal(&child, sig);
    let status = child.wait().unwrap();
    (sb, corpus_key, status)
}

fn published(sb: &Sandbox, key: &str) -> bool {
    sb.store().join("objects").join(key).exists()
}

#[test]
fn a_process_killed_mid_stage_leaves_no_artifact_and_the_rerun_completes() {
    let (sb, corpus_key, _) = interrupt_mid_stage("-KILL");
    assert!(!published(&sb, &corpus_key), "a killed stage must not publish");
    assert_eq!(sb.plan_json("slow.toml", &[])["stages"][0]["action"], "run");

    let rerun = sb.run_json("slow.toml", &[]);
    assert_eq!(ran(&rerun), ["corpus"]);
    assert!(published(&sb, &corpus_key));
    assert!(!sb.store().join("tmp").join(&corpus_key).exists(), "the leftover staging directory is cleared");
    let verify = sb.tinygpt(&["cache", "verify"]);
    assert_success(&verify);
}

#[test]
fn ctrl_c_stops_the_stage_exits_130_and_publishes_nothing() {
    let (sb, corpus_key, status) = interrupt_mid_stage("-INT");
    assert_eq!(status.code(), Some(130));
    assert!(!published(&sb, &corpus_key));
    assert!(!sb.store().join("tmp").join(&corpus_key).exists(), "an interrupted stage cleans its staging directory");
}

#[test]
fn a_corrupted_artifact_is_found_by_verify_and_rebuilt_by_the_next_run() {
    let sb = Sandbox::new();
    let first = sb.run_json("tiny.toml", &[]);
    let tokens = sb.store().join("objects").join(key(&first, "tokenize")).join("tokens.arrow");
    let mut bytes = std::fs::read(&tokens).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&tokens, bytes).unwrap();

    let verify = sb.tinygpt(&["cache", "verify"]);
    assert_eq!(verify.status.code(), Some(1));
    let text = String::from_utf8(verify.stdout).unwrap();
    assert!(text.contains(&key(&first, "tokenize")[..12]) && text.contains("tokens.arrow"), "{text}");
    assert!(text.contains("verified 3 artifacts: 1 damaged"), "{text}");

    let plan = sb.plan_json("tiny.toml", &[]);
    assert_eq!(stage(&plan, "tokenize")["reason"], "artifact missing");
    let rerun = sb.run_json("tiny.toml", &[]);
    // Rebuilt to the same bytes, so pack stays cached.
    assert_eq!(ran(&rerun), ["tokenize"]);
    assert_success(&sb.tinygpt(&["cache", "verify"]));
}

#[test]
fn a_truncated_file_is_noticed_without_verify() {
    let sb = Sandbox::new();
    let first = sb.run_json("tiny.toml", &[]);
    let train = sb.store().join("objects").join(key(&first, "pack")).join("train.arrow");
    std::fs::write(&train, b"short").unwrap();
    assert_eq!(ran(&sb.run_json("tiny.toml", &[])), ["pack"]);
}

#[test]
fn two_concurrent_runs_build_each_artifact_once() {
    let sb = Sandbox::new();
    let spawn = || {
        sb.command().args(["run", "tiny.toml", "--json"]).stderr(Stdio::null()).stdout(Stdio::piped()).spawn().unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert_success(&a);
    assert_success(&b);
    let (a, b): (serde_json::Value, serde_json::Value) =
        (serde_json::from_slice(&a.stdout).unwrap(), serde_json::from_slice(&b.stdout).unwrap());
    for name in ["corpus", "tokenize", "pack"] {
        let runs = [&a, &b].iter().filter(|j| stage(j, name)["action"] == "run").count();
        assert_eq!(runs, 1, "stage {name} was built {runs} times");
        assert_eq!(key(&a, name), key(&b, name));
    }
    assert_success(&sb.tinygpt(&["cache", "verify"]));
}

#[test]
fn gc_keeps_what_the_named_recipe_uses_and_removes_the_rest() {
    let sb = Sandbox::new();
    let base = sb.run_json("tiny.toml", &[]);
    let other = sb.run_json("tiny.toml", &["--set", "pack.seq_len=16"]);
    let out = sb.tinygpt(&["cache", "gc", "tiny.toml", "--keep-runs", "0"]);
    assert_success(&out);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("removed 1 artifacts and 2 run records, kept 3 artifacts"), "{said}");
    assert!(!sb.store().join("objects").join(key(&other, "pack")).exists());
    for name in ["corpus", "tokenize", "pack"] {
        assert!(sb.store().join("objects").join(key(&base, name)).exists());
    }
    // With no recipe named, the last run's artifacts are kept.
    sb.run_json("tiny.toml", &["--set", "pack.seq_len=16"]);
    assert_success(&sb.tinygpt(&["cache", "gc", "--keep-runs", "1"]));
    assert!(sb.store().join("objects").join(key(&other, "pack")).exists());
    assert!(!sb.store().join("objects").join(key(&base, "pack")).exists());
    let ls = String::from_utf8(sb.tinygpt(&["cache", "ls"]).stdout).unwrap();
    assert_eq!(ls.lines().count(), 1 + 3, "{ls}");
}

#[test]
fn a_failing_stage_exits_1_names_the_problem_and_publishes_nothing() {
    let sb = Sandbox::new();
    sb.write("data.txt", "ab");
    let out = sb.tinygpt(&["run", "raw_text.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stage `pack` failed") && err.contains("fewer than seq_len + 1"), "{err}");
    let objects = std::fs::read_dir(sb.store().join("objects")).unwrap().count();
    assert_eq!(objects, 1, "only tokenize was published");
}

#[test]
fn the_store_location_follows_cache_and_tinygpt_cache() {
    let sb = Sandbox::new();
    let out = sb.command().args(["run", "tiny.toml", "--cache", "elsewhere"]).output().unwrap();
    assert_success(&out);
    assert!(Path::new(&sb.path("elsewhere/objects")).exists());
    let out =
        sb.command().args(["plan", "tiny.toml", "--json"]).env("TINYGPT_CACHE", sb.path("elsewhere")).output().unwrap();
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(ran(&plan).is_empty(), "{plan}");
    assert!(!sb.store().exists(), "the default store was never created");
}
