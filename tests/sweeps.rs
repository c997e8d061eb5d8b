//! Sweeps and `extends` (issue 16, items 1 and 2): members named by their grid point, sharing
//! every upstream artifact; downstream stages expanded with them; includes that override keys
//! and add stages; errors that point into the file that wrote the bad value.

use crate::util::{key, ran, stage, Sandbox};

/// tiny.toml with tokenize swept over two vocabulary sizes and pack over two lengths, plus a
/// second pack downstream of tokenize only.
const SWEEP: &str = r#"[recipe]
name = "swept"
extends = "tiny.toml"

[stages.tokenize]
sweep = { vocab_size = [300, 320] }

[stages.pack]
sweep = { seq_len = [16, 32] }

[stages.short]
kind = "pack"
data = "tokenize"
seq_len = 8
"#;

fn names(json: &serde_json::Value) -> Vec<String> {
    json["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_string()).collect()
}

fn refused(sb: &Sandbox, args: &[&str], expected: &[&str]) {
    let out = sb.tinygpt(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?} must exit 2:\n{stderr}");
    for fragment in expected {
        assert!(stderr.contains(fragment), "missing {fragment:?} in:\n{stderr}");
    }
}

#[test]
fn a_sweep_expands_into_named_members_that_share_upstream_artifacts() {
    let sb = Sandbox::new();
    sb.write("swept.toml", SWEEP);
    let first = sb.run_json("swept.toml", &[]);
    assert_eq!(
        names(&first),
        [
            "corpus",
            "tokenize[vocab_size=300]",
            "tokenize[vocab_size=320]",
            "pack[vocab_size=300,seq_len=16]",
            "pack[vocab_size=300,seq_len=32]",
            "pack[vocab_size=320,seq_len=16]",
            "pack[vocab_size=320,seq_len=32]",
            "short[vocab_size=300]",
            "short[vocab_size=320]",
        ]
    );
    // Each member is the stage it would be if written out: the same key as tiny.toml's.
    let tiny = sb.run_json("tiny.toml", &[]);
    assert!(ran(&tiny).is_empty(), "tiny.toml's stages are members of the sweep: {tiny}");
    assert_eq!(key(&tiny, "tokenize"), key(&first, "tokenize[vocab_size=320]"));
    assert_eq!(key(&tiny, "pack"), key(&first, "pack[vocab_size=320,seq_len=32]"));
    assert_ne!(key(&first, "pack[vocab_size=300,seq_len=32]"), key(&first, "pack[vocab_size=320,seq_len=32]"));
    assert_eq!(stage(&first, "pack[vocab_size=300,seq_len=16]")["kind"], "pack");

    // A value added to a grid runs only the new members.
    let grown = sb.run_json("swept.toml", &["--set", "pack.sweep={ seq_len = [16, 32, 64] }"]);
    assert_eq!(ran(&grown), ["pack[vocab_size=300,seq_len=64]", "pack[vocab_size=320,seq_len=64]"]);

    // plan and dag speak in member names; --set reaches one member.
    let plan = sb.plan_json("swept.toml", &["--set", "short[vocab_size=300].seq_len=4"]);
    let planned: Vec<(String, String)> = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_string(), s["action"].as_str().unwrap().to_string()))
        .collect();
    assert!(planned.contains(&("short[vocab_size=300]".into(), "run".into())), "{plan}");
    assert!(planned.contains(&("short[vocab_size=320]".into(), "cached".into())), "{plan}");
    let dag = String::from_utf8(sb.tinygpt(&["dag", "swept.toml"]).stdout).unwrap();
    assert!(dag.contains("pack[vocab_size=320,seq_len=16]\\n(pack)"), "{dag}");
}

#[test]
fn bad_sweeps_are_plan_time_errors_with_their_line() {
    let sb = Sandbox::new();
    sb.write("swept.toml", SWEEP.replace("[16, 32]", "[]"));
    refused(&sb, &["plan", "swept.toml"], &["the sweep of stage `pack` gives `seq_len` no values", "swept.toml:9:21"]);
    sb.write("swept.toml", SWEEP.replace("seq_len = [16, 32]", "seq_lne = [16, 32]"));
    refused(&sb, &["plan", "swept.toml"], &["unknown key `seq_lne`", "swept.toml:9:11", "did you mean `seq_len`?"]);
    sb.write("swept.toml", SWEEP.replace("[16, 32]", "[16, 16]"));
    refused(&sb, &["run", "swept.toml"], &["`seq_len` = 16 appears twice", "swept.toml:9:26"]);
    sb.write("swept.toml", SWEEP.replace("[16, 32]", "[16, 0]"));
    refused(&sb, &["run", "swept.toml"], &["`seq_len` of stage `pack[vocab_size=300,seq_len=0]`", "swept.toml:9:26"]);
    sb.write("swept.toml", SWEEP.replace("seq_len = [16, 32]", "data = [\"a\", \"b\"]"));
    refused(&sb, &["plan", "swept.toml"], &["cannot sweep its input `data`"]);
    sb.write("swept.toml", SWEEP);
    refused(&sb, &["plan", "swept.toml", "--set", "pack.seq_len=8"], &["`seq_len` is swept in stage `pack`"]);
    refused(&sb, &["plan", "swept.toml", "--set", "short[vocab_size=999].seq_len=8"], &["no stage named"]);
    assert!(
        !sb.store().join("objects").exists() || std::fs::read_dir(sb.store().join("objects")).unwrap().count() == 0
    );
}

#[test]
fn a_recipe_extends_another_overriding_keys_and_adding_stages() {
    let sb = Sandbox::new();
    std::fs::create_dir(sb.path("more")).unwrap();
    sb.write(
        "more/longer.toml",
        "[recipe]\nname = \"longer\"\nextends = \"../tiny.toml\"\n\n[stages.pack]\nseq_len = 16\n\n\
         [stages.again]\nkind = \"pack\"\ndata = \"tokenize\"\nseq_len = 8\n",
    );
    let base = sb.run_json("tiny.toml", &[]);
    let child = sb.run_json("more/longer.toml", &[]);
    assert_eq!(names(&child), ["corpus", "tokenize", "pack", "again"]);
    assert_eq!(ran(&child), ["pack", "again"], "corpus and tokenize are tiny.toml's, unchanged");
    assert_eq!(key(&base, "tokenize"), key(&child, "tokenize"));
    assert_eq!(stage(&child, "pack")["metrics"]["train_tokens"], 34091, "{child}");
    assert_eq!(stage(&child, "pack")["metrics"]["train_blocks"], 34091 / 16, "{child}");

    // A bad value is reported in the file that writes it, with the file's own line.
    sb.write("tiny.toml", std::fs::read_to_string(sb.path("tiny.toml")).unwrap().replace("320", "\"many\""));
    refused(&sb, &["plan", "more/longer.toml"], &["`vocab_size` of stage `tokenize`", "more/../tiny.toml:14:14"]);
    sb.write(
        "more/longer.toml",
        "[recipe]\nname = \"longer\"\nextends = \"../tiny.toml\"\n\n[stages.pack]\nkind = \"tokenize\"\n",
    );
    refused(&sb, &["plan", "more/longer.toml"], &["may change its keys but not its kind", "more/longer.toml:6:8"]);

    // Cycles of includes, and a missing one.
    sb.write("a.toml", "[recipe]\nname = \"a\"\nextends = \"b.toml\"\n");
    sb.write("b.toml", "[recipe]\nname = \"b\"\nextends = \"a.toml\"\n");
    refused(&sb, &["plan", "a.toml"], &["extend each other in a cycle: a.toml -> b.toml -> a.toml", "b.toml:3:11"]);
    sb.write("a.toml", "[recipe]\nname = \"a\"\nextends = \"nowhere.toml\"\n");
    refused(&sb, &["plan", "a.toml"], &["cannot read `nowhere.toml`", "a.toml:3:11"]);
}
