//! `evaluate` on any data (issue 16, item 6): raw text tokenized with the model's tokenizer
//! scores what the same text tokenized and packed by hand scores; multiple-choice and
//! exact-match benchmarks from JSONL; bad rows exit 2 naming the file, line and field.

use serde_json::Value;

use crate::util::{artifact, assert_success, stage, Sandbox};

const HELD_OUT: &str = "Once upon a time there was a small cat. It liked milk.\nThe end of the story came soon.";

/// train.toml plus evaluations of its model on held-out text, on its corpus stage, and on two
/// benchmark files.
const TASKS: &str = r#"[recipe]
name = "tasks"
extends = "train.toml"

[stages.on_text]
kind = "evaluate"
model = "pretrain"
data = "held.txt"
max_new_tokens = 0

[stages.on_corpus]
kind = "evaluate"
model = "pretrain"
data = "corpus"
max_new_tokens = 0

[stages.choices]
kind = "evaluate"
model = "pretrain"
data = "choices.jsonl"
task = "multiple_choice"

[stages.math]
kind = "evaluate"
model = "pretrain"
data = "math.jsonl"
task = "exact_match"
max_new_tokens = 8
"#;

const CHOICES: &str = r#"{"ctx": "Once upon a time", "endings": ["there was a cat.", "zq xv", "qqqq", "the end"], "label": 0}
{"ctx": "It liked", "endings": ["milk.", "xz", "kk", "jj"], "label": "0"}
"#;

const MATH: &str = concat!(
    "{\"question\": \"What is 3 + 4?\", \"answer\": \"3 + 4 = 7\\n#### 7\"}\n",
    "{\"question\": \"What is 10 times 100?\", \"answer\": \"#### 1,000\"}\n",
);

fn eval_json(sb: &Sandbox, run: &Value, name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(artifact(sb, run, name).join("eval.json")).unwrap()).unwrap()
}

fn sandbox() -> Sandbox {
    let sb = Sandbox::new();
    sb.write("tasks.toml", TASKS);
    sb.write("held.txt", HELD_OUT);
    sb.write("choices.jsonl", CHOICES);
    sb.write("math.jsonl", MATH);
    sb
}

#[test]
fn raw_text_scores_what_the_same_text_packed_by_hand_scores() {
    use stages::nn::model::Activations;
    let sb = sandbox();
    let run = sb.run_json("tasks.toml", &[]);
    let results = eval_json(&sb, &run, "on_text");

    // By hand: the model's tokenizer, the end-of-text token after the document, windows of
    // block_size + 1 tokens every block_size, the last one padded.
    let lm = stages::generate::LoadedModel::load(&artifact(&sb, &run, "pretrain")).unwrap();
    let t = lm.model.cfg.block_size;
    let mut stream = lm.tokenizer.encode(HELD_OUT, false).unwrap().get_ids().to_vec();
    stream.push(lm.eot);
    let mut tokens = Vec::new();
    let mut start = 0;
    while start + t < stream.len() {
        tokens.extend_from_slice(&stream[start..start + t + 1]);
        start += t;
    }
    let padding = if start + 1 < stream.len() { t + 1 - (stream.len() - start) } else { 0 };
    if start + 1 < stream.len() {
        tokens.extend_from_slice(&stream[start..]);
        tokens.extend(std::iter::repeat_n(lm.eot, padding));
    }
    let blocks = stages::arrow_io::Blocks { tokens, width: t + 1, padding };
    let batch = 16.min(blocks.rows());
    let mut acts = Activations::inference(&lm.model, batch, t);
    let scored = stages::batches::mean_loss(&lm.model, &lm.params, &blocks, &mut acts, None, |_| Ok(())).unwrap();
    assert_eq!(results["val_tokens"], stream.len() - 1, "every token after the first is predicted");
    assert!((results["val_loss"].as_f64().unwrap() - scored.mean).abs() < 1e-12, "{results} vs {}", scored.mean);
    // Bits per byte count the bytes of the predicted text: all of it but the first token's.
    let first = lm.tokenizer.decode(&stream[..1], true).unwrap().len();
    assert_eq!(results["val_bytes"], HELD_OUT.len() - first);

    // A corpus stage is text too: every document of it, scored.
    let corpus = stage(&run, "on_corpus")["metrics"].clone();
    assert!(corpus["val_tokens"].as_u64().unwrap() > 30_000 && corpus["bits_per_byte"].as_f64().unwrap() > 0.0);
}

#[test]
fn benchmarks_score_multiple_choice_and_exact_match() {
    let sb = sandbox();
    let run = sb.run_json("tasks.toml", &[]);
    let mc = eval_json(&sb, &run, "choices");
    assert_eq!((mc["questions"].as_u64(), mc["chance"].as_f64()), (Some(2), Some(0.25)));
    let details = mc["details"].as_array().unwrap();
    for (d, accuracy) in details.iter().zip([&mc["accuracy"], &mc["accuracy_normalized"]]) {
        assert_eq!(d["logps"].as_array().unwrap().len(), 4);
        assert!(d["logps"].as_array().unwrap().iter().all(|l| l.as_f64().unwrap() < 0.0));
        assert!(accuracy.as_f64().unwrap() >= 0.0 && accuracy.as_f64().unwrap() <= 1.0);
    }
    // The accuracy is the share of questions whose best ending is the label.
    let right = details.iter().filter(|d| d["pick"] == d["label"]).count() as f64;
    assert_eq!(mc["accuracy"].as_f64().unwrap(), right / 2.0);
    assert_eq!(stage(&run, "choices")["metrics"]["mc_chance"], 0.25);

    let em = eval_json(&sb, &run, "math");
    let details = em["details"].as_array().unwrap();
    assert_eq!(details.iter().map(|d| d["reference"].as_str().unwrap()).collect::<Vec<_>>(), ["7", "1000"]);
    let right = details.iter().filter(|d| d["correct"] == true).count() as f64;
    assert_eq!(em["exact_match"].as_f64().unwrap(), right / 2.0);
    for d in details {
        assert_eq!(d["correct"], d["predicted"] == d["reference"], "{d}");
    }
}

#[test]
fn bad_benchmark_rows_exit_2_naming_file_line_and_field() {
    for (file, text, expected) in [
        ("choices.jsonl", "{\"ctx\": \"a\", \"endings\": [\"b\", \"c\"], \"label\": 0}\n{\"ctx\": \"a\", \"endings\": [\"b\", \"c\"], \"label\": 5}\n", "choices.jsonl:2: field `label` is not an ending's index (0 to 1)"),
        ("choices.jsonl", "{\"endings\": [\"b\", \"c\"], \"label\": 0}\n", "choices.jsonl:1: field `ctx` is missing"),
        ("math.jsonl", "{\"question\": \"q\", \"answer\": \"#### 3\"}\n{\"question\": \"q\", \"answer\": \"no number\"}\n", "math.jsonl:2: field `answer` has no number after `####`"),
        ("math.jsonl", "{\"question\": 3, \"answer\": \"#### 3\"}\n", "math.jsonl:1: field `question` is a number, not a string"),
    ] {
        let sb = sandbox();
        sb.write(file, text);
        let out = sb.tinygpt(&["run", "tasks.toml"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(expected), "missing {expected:?} in:\n{stderr}");
    }
    let sb = sandbox();
    sb.write("tasks.toml", TASKS.replace("data = \"math.jsonl\"", "data = \"pack\""));
    let out = sb.tinygpt(&["run", "tasks.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("task `exact_match` reads a benchmark's JSONL file"));
    assert_success(&sb.tinygpt(&["plan", "tasks.toml"]));
}
