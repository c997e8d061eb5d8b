//! `compare` and `runs` (issue 16, item 4): a row per evaluated model of a sweep, in three
//! formats; the run history newest first, and pruned by `cache gc`.

use crate::util::{assert_success, Sandbox};

/// train.toml with pretrain swept over two learning rates and a model nothing evaluates.
pub const SWEPT: &str = r#"[recipe]
name = "lrs"
extends = "train.toml"

[stages.pretrain]
max_steps = 20
sweep = { lr = [3e-3, 1e-2] }

[stages.unevaluated]
kind = "pretrain"
data = "pack"
n_layer = 1
n_head = 1
n_embd = 16
batch_size = 2
max_steps = 2
"#;

pub fn stdout(sb: &Sandbox, args: &[&str]) -> String {
    let out = sb.tinygpt(args);
    assert_success(&out);
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn compare_shows_every_evaluated_model_of_a_sweep_and_runs_lists_the_history() {
    let sb = Sandbox::new();
    sb.write("lrs.toml", SWEPT);

    // Before anything is built, the models are listed as not built.
    let before = stdout(&sb, &["compare", "lrs.toml"]);
    assert!(before.contains("not built yet (run the recipe): pretrain[lr=0.003], pretrain[lr=0.01]"), "{before}");

    let run = sb.run_json("lrs.toml", &[]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&sb, &["compare", "lrs.toml", "--json"])).unwrap();
    let models = json["models"].as_array().unwrap();
    let names: Vec<&str> = models.iter().map(|m| m["model"].as_str().unwrap()).collect();
    assert_eq!(names, ["pretrain[lr=0.003]", "pretrain[lr=0.01]"]);
    assert_eq!(json["not_evaluated"], serde_json::json!(["unevaluated"]));
    for m in models {
        let eval = crate::util::stage(&run, &m["model"].as_str().unwrap().replace("pretrain", "evaluate"));
        assert_eq!(m["val_loss"], eval["metrics"]["val_loss"], "{json}");
        assert_eq!(m["perplexity"], eval["metrics"]["perplexity"]);
        assert_eq!(m["weights"], "f32");
        assert!(m["parameters"].as_u64().unwrap() > 10_000, "{m}");
        assert!(m["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{m}");
    }
    assert_ne!(models[0]["val_loss"], models[1]["val_loss"]);

    let table = stdout(&sb, &["compare", "lrs.toml"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("model") && lines[0].contains("val_loss") && lines[0].contains("bits_per_byte"));
    assert!(lines[1].starts_with("pretrain[lr=0.003]") && lines[2].starts_with("pretrain[lr=0.01]"), "{table}");
    assert_eq!(lines[3], "not evaluated by the recipe: unevaluated");

    let csv = stdout(&sb, &["compare", "lrs.toml", "--csv"]);
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 3, "{csv}");
    assert!(rows.iter().all(|r| r.len() == rows[0].len()), "{csv}");
    let col = rows[0].iter().position(|h| *h == "val_loss").unwrap();
    assert_eq!(rows[1][col], models[0]["val_loss"].to_string());

    // The history: the run above, then a cached rerun, newest first.
    sb.run_json("lrs.toml", &[]);
    sb.run_json("tiny.toml", &[]);
    let runs: serde_json::Value = serde_json::from_str(&stdout(&sb, &["runs", "--json"])).unwrap();
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    let summary = |i: usize, key: &str| runs[i]["summary"][key].clone();
    assert_eq!((runs[0]["recipe"].as_str(), summary(0, "ran")), (Some("tiny"), serde_json::json!(3)));
    assert_eq!(
        (runs[1]["recipe"].as_str(), summary(1, "ran"), summary(1, "cached")),
        (Some("lrs"), 0.into(), 8.into())
    );
    assert_eq!((summary(2, "ran"), summary(2, "failed")), (8.into(), 0.into()));
    assert!(summary(2, "started").as_u64().unwrap() <= summary(0, "started").as_u64().unwrap());
    let text = stdout(&sb, &["runs"]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("started (UTC)") && lines.len() == 4, "{text}");
    assert!(lines[1].contains("tiny") && lines[3].contains("lrs.toml"), "{text}");

    // gc keeps the records of the runs it keeps, and plan still knows what the last run built.
    let gc = stdout(&sb, &["cache", "gc", "lrs.toml", "--keep-runs", "1"]);
    assert!(gc.contains("and 2 run records"), "{gc}");
    assert_eq!(stdout(&sb, &["runs"]).lines().count(), 2);
    let plan = sb.plan_json("lrs.toml", &["--set", "evaluate.max_new_tokens=5"]);
    let reason = crate::util::stage(&plan, "evaluate[lr=0.01]")["reason"].clone();
    assert!(reason.as_str().is_some_and(|r| r.contains("max_new_tokens changed (40 -> 5)")), "{plan}");
}
