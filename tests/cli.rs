//! The command line itself: help on every command, graphs, the generated stage reference
//! (issue 2, items 5 and 9).

use crate::util::{assert_success, Sandbox};

#[test]
fn every_command_has_help() {
    let sb = Sandbox::new();
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["plan", "--help"],
        vec!["dag", "--help"],
        vec!["cache", "--help"],
        vec!["cache", "ls", "--help"],
        vec!["cache", "verify", "--help"],
        vec!["cache", "gc", "--help"],
        vec!["doc", "--help"],
        vec!["bench", "--help"],
    ] {
        let out = sb.tinygpt(&args);
        assert_success(&out);
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage:"), "{args:?}");
    }
}

/// `bench --json`: one JSON document on stdout with the machine, and per reference model the
/// step, its LoRA twin (also in bf16, and with dropout), DoRA's (with and without dropout) and
/// the same step with every weight frozen, LoRA's and the frozen step's ratios from steps taken
/// in turn with the full step's, decoding speeds and speculative decoding; progress
/// on stderr.
#[test]
fn bench_json_reports_every_section_as_numbers() {
    let sb = Sandbox::new();
    let out = sb.tinygpt(&["bench", "--json", "--no-matmul", "--steps", "1"]);
    assert_success(&out);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    assert!(doc["machine"]["fma_peak_gflops"][0]["gflops"].as_f64().unwrap() > 0.0, "{doc}");
    assert!(doc.get("matmul").is_none(), "--no-matmul skips the table");
    let models = doc["models"].as_array().unwrap();
    let names: Vec<&str> = models.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["shakespeare_char", "gpt2-6x384"]);
    for m in models {
        let step = &m["step"];
        assert!(step["tokens_per_s"].as_f64().unwrap() > 0.0 && m["mfu"].as_f64().unwrap() > 0.0, "{m}");
        assert!(step["breakdown"]["matmuls"].as_f64().unwrap() > 0.0, "{m}");
        let needed = |what: &str| m[what]["needed_bytes"].as_u64().unwrap();
        assert!(needed("lora_r8") < step["needed_bytes"].as_u64().unwrap(), "{m}");
        assert!(needed("lora_r8_checkpointed") < needed("lora_r8"), "{m}");
        assert_eq!(needed("lora_r8_dropout"), needed("lora_r8"), "dropout keeps no copy of the inputs: {m}");
        assert!(needed("dora_r8") > needed("lora_r8"), "DoRA keeps its adapted products: {m}");
        assert_eq!(needed("dora_r8_dropout"), needed("dora_r8"), "dropout keeps no copy of the inputs: {m}");
        assert!(needed("frozen") < needed("lora_r8"), "{m}");
        assert!(m["lora_r8_bf16"]["step_seconds"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["lora_r8"]["breakdown"]["adapters"].as_f64().unwrap() > 0.0, "{m}");
        for paired in ["lora_r8_paired", "frozen_paired"] {
            assert_eq!(m[paired]["pairs"], 4, "--steps 1 still takes four pairs: {m}");
            assert!(m[paired]["median_ratio"].as_f64().unwrap() > 0.0, "{m}");
        }
        let weights: Vec<&str> =
            m["decode"].as_array().unwrap().iter().map(|d| d["weights"].as_str().unwrap()).collect();
        assert_eq!(weights, ["f32", "int8", "int4"]);
        assert_eq!(m["speculative"]["same_tokens"], true, "{m}");
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("bench: gpt2-6x384"));
}

#[test]
fn dag_prints_dot_and_mermaid_with_raw_inputs() {
    let sb = Sandbox::new();
    sb.write("data.txt", "hello");
    let dot = String::from_utf8(sb.tinygpt(&["dag", "raw_text.toml"]).stdout).unwrap();
    assert!(dot.starts_with("digraph \"raw-text\""), "{dot}");
    assert!(dot.contains("f0 -> s0 [label=\"input\"]") && dot.contains("s0 -> s1 [label=\"data\"]"), "{dot}");
    assert!(dot.contains("label=\"data.txt\""), "{dot}");
    let mermaid = String::from_utf8(sb.tinygpt(&["dag", "tiny.toml", "--format", "mermaid"]).stdout).unwrap();
    assert!(mermaid.starts_with("flowchart LR") && mermaid.contains("s1 -->|data| s2"), "{mermaid}");
}

#[test]
fn run_prints_a_summary_table() {
    let sb = Sandbox::new();
    let out = sb.tinygpt(&["run", "tiny.toml"]);
    assert_success(&out);
    let table = String::from_utf8(out.stdout).unwrap();
    let header = table.lines().next().unwrap();
    assert!(header.starts_with("stage") && header.contains("action") && header.contains("seconds"), "{table}");
    let pack = table.lines().find(|l| l.starts_with("pack")).unwrap();
    assert!(
        pack.contains(" run ") && pack.contains("dropped_tokens=") && pack.contains("padding_waste_pct="),
        "{table}"
    );
}

#[test]
fn the_recipe_reference_in_the_docs_is_generated_from_the_code() {
    let sb = Sandbox::new();
    let out = sb.tinygpt(&["doc"]);
    assert_success(&out);
    let generated = String::from_utf8(out.stdout).unwrap();
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/RECIPES.md")).unwrap();
    assert!(
        docs.contains(&generated),
        "docs/RECIPES.md is out of date: paste the output of `tinygpt doc` between its STAGE REFERENCE markers"
    );
}

#[test]
fn every_shipped_recipe_resolves() {
    let sb = Sandbox::new();
    let recipes = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes");
    let shared = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data");
    for entry in std::fs::read_dir(recipes).unwrap() {
        let path = entry.unwrap().path();
        let needs_shared = std::fs::read_to_string(&path).unwrap().contains("shared/data");
        if needs_shared && !std::path::Path::new(shared).exists() {
            eprintln!("skipping {}: ../shared/data is not present", path.display());
            continue;
        }
        let out = sb.tinygpt(&["plan", path.to_str().unwrap()]);
        assert_success(&out);
    }
}
