//! Tokenize throughput on the built-in corpus, against the tokenizers crate's own
//! `encode_batch` on the same documents. The stage does more (reads JSONL, writes Arrow IPC);
//! the ratio shows how much.
//!
//! Run with `cargo bench -p stages --bench tokenize`. Prints figures; asserts nothing.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use engine::{Input, Params, Silent, StageCtx};
use stages::registry;

/// Resolve a stage's parameters the way a recipe would, from TOML text.
fn params(kind: &str, toml_text: &str) -> Params {
    let stage = registry().get(kind).unwrap().clone();
    let text = format!("[recipe]\nname = \"bench\"\n[stages.s]\nkind = \"{kind}\"\n{toml_text}");
    let origin = std::sync::Arc::new(engine::Origin { name: "bench.toml".into(), text });
    let dir = std::env::temp_dir();
    let recipe = engine::recipe::resolve(origin, &dir, &[], &registry(), &dir, std::path::Path::new("bench.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(recipe.stages[0].kind.kind(), stage.kind());
    recipe.stages[0].params.clone()
}

fn run(kind: &str, p: &Params, inputs: &BTreeMap<&'static str, Input>, out: &std::path::Path) -> f64 {
    let cancel = AtomicBool::new(false);
    let work = tempfile::tempdir().unwrap();
    let ctx = StageCtx::new("s", p, 1, out, work.path(), inputs, &Silent, &cancel);
    let start = Instant::now();
    registry().get(kind).unwrap().run(&ctx).unwrap_or_else(|e| panic!("{e}"));
    start.elapsed().as_secs_f64()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    std::fs::create_dir(&corpus_dir).unwrap();
    run("corpus", &params("corpus", "n_bytes = 8_000_000"), &BTreeMap::new(), &corpus_dir);
    let corpus = corpus_dir.join("corpus.jsonl");
    let raw = |path: &std::path::Path| Input::Raw { path: path.to_path_buf(), shown: path.display().to_string() };

    // Train once; then measure encoding with the trained tokenizer.json as a pretrained one.
    let trained = dir.path().join("trained");
    std::fs::create_dir(&trained).unwrap();
    let train_secs = run(
        "tokenize",
        &params("tokenize", &format!("input = {corpus:?}\nalgorithm = \"bpe\"\nvocab_size = 2048")),
        &BTreeMap::from([("input", raw(&corpus))]),
        &trained,
    );
    let tokenizer_path = trained.join("tokenizer.json");
    let docs: Vec<String> = std::fs::read_to_string(&corpus)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].as_str().unwrap().to_string())
        .collect();
    let bytes: usize = docs.iter().map(String::len).sum();
    let mb = bytes as f64 / 1e6;
    println!("corpus: {} documents, {mb:.1} MB; BPE training + encoding (2048 vocab): {train_secs:.2} s", docs.len());

    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path).unwrap();
    let p =
        params("tokenize", &format!("input = {corpus:?}\nalgorithm = \"pretrained\"\ntokenizer = {tokenizer_path:?}"));
    let inputs = BTreeMap::from([("input", raw(&corpus)), ("tokenizer", raw(&tokenizer_path))]);
    let mut stage_secs = Vec::new();
    let mut batch_secs = Vec::new();
    for i in 0..5 {
        let out = dir.path().join(format!("out{i}"));
        std::fs::create_dir(&out).unwrap();
        stage_secs.push(run("tokenize", &p, &inputs, &out));
        let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
        let start = Instant::now();
        let encodings = tokenizer.encode_batch(refs, false).unwrap();
        batch_secs.push(start.elapsed().as_secs_f64());
        assert!(!encodings.is_empty());
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let (stage, batch) = (best(&stage_secs), best(&batch_secs));
    println!("tokenize stage (read JSONL + encode + write Arrow), best of 5: {stage:.3} s, {:.1} MB/s", mb / stage);
    println!("tokenizers encode_batch (in memory),              best of 5: {batch:.3} s, {:.1} MB/s", mb / batch);
    println!("stage time / encode_batch time: {:.2}x (target: 1.5x or less)", stage / batch);
}
