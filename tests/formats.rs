//! Tokenizing text, JSONL and Parquet (Hugging Face datasets shards as they are), existing
//! tokenizers, and the errors bad data gets (issue 2, item 6). Checks on the real data in
//! ../shared/data run when it is present and say so when they skip.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, StringArray};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;

use crate::util::{assert_success, key, shared_data, stage, Sandbox};

pub(crate) fn write_parquet(path: &Path, columns: Vec<(&str, ArrayRef)>) {
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let mut writer = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

fn texts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("Document {i} says hello to the world, {} times.", i % 7)).collect()
}

const PARQUET_RECIPE: &str = r#"[recipe]
name = "parquet"

[stages.tokenize]
kind = "tokenize"
input = "data.parquet"
algorithm = "byte"
field = "content"

[stages.pack]
kind = "pack"
data = "tokenize"
seq_len = 16
"#;

#[test]
fn parquet_jsonl_and_text_give_the_same_tokens_for_the_same_documents() {
    let sb = Sandbox::new();
    let docs = texts(40);
    let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(0..40));
    let content: ArrayRef = Arc::new(StringArray::from(docs.clone()));
    write_parquet(&sb.path("data.parquet"), vec![("id", ids), ("content", content)]);
    let jsonl: String = docs.iter().map(|d| serde_json::json!({ "content": d }).to_string() + "\n").collect();
    sb.write("data.jsonl", jsonl);
    sb.write("data.txt", docs.join("\n@@\n"));
    sb.write("parquet.toml", PARQUET_RECIPE);

    let from_parquet = sb.run_json("parquet.toml", &[]);
    assert_eq!(stage(&from_parquet, "tokenize")["metrics"]["documents"], 40);
    let from_jsonl = sb.run_json("parquet.toml", &["--set", "tokenize.input=data.jsonl"]);
    let from_text =
        sb.run_json("parquet.toml", &["--set", "tokenize.input=data.txt", "--set", "tokenize.doc_separator=@@"]);
    let digest = |sb: &Sandbox, run: &serde_json::Value| {
        let m = sb.manifest(&key(run, "tokenize"));
        m["files"].as_array().unwrap().iter().find(|f| f["name"] == "tokens.arrow").unwrap()["digest"].clone()
    };
    assert_eq!(digest(&sb, &from_parquet), digest(&sb, &from_jsonl));
    assert_eq!(digest(&sb, &from_parquet), digest(&sb, &from_text));
}

#[test]
fn tokenizer_json_loads_back_and_encodes_like_the_stored_ids() {
    let sb = Sandbox::new();
    let run = sb.run_json("tiny.toml", &[]);
    let dir = sb.store().join("objects").join(key(&run, "tokenize"));
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let corpus = sb.store().join("objects").join(key(&run, "corpus")).join("corpus.jsonl");
    let first_line = std::fs::read_to_string(corpus).unwrap().lines().next().unwrap().to_string();
    let first: serde_json::Value = serde_json::from_str(&first_line).unwrap();
    let encoding = tokenizer.encode(first["text"].as_str().unwrap(), false).unwrap();
    let stored = stages::arrow_io::read_docs(&dir.join("tokens.arrow")).unwrap();
    assert_eq!(encoding.get_ids(), stored.doc(0));
    assert_eq!(tokenizer.decode(stored.doc(0), false).unwrap(), first["text"].as_str().unwrap());
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["eot_id"], tokenizer.token_to_id("<|endoftext|>").unwrap());
}

#[test]
fn a_pretrained_tokenizer_json_is_used_as_it_is() {
    let sb = Sandbox::new();
    let trained = sb.run_json("tiny.toml", &[]);
    let source = sb.store().join("objects").join(key(&trained, "tokenize")).join("tokenizer.json");
    std::fs::copy(&source, sb.path("my_tokenizer.json")).unwrap();
    sb.write("data.txt", "Lily and Tom went to the park.");
    let run = sb.run_json(
        "raw_text.toml",
        &[
            "--set",
            "tokenize.algorithm=pretrained",
            "--set",
            "tokenize.tokenizer=my_tokenizer.json",
            "--set",
            "pack.seq_len=2",
        ],
    );
    let out = sb.store().join("objects").join(key(&run, "tokenize")).join("tokenizer.json");
    assert_eq!(std::fs::read(out).unwrap(), std::fs::read(source).unwrap(), "copied byte for byte");
}

fn stage_error(sb: &Sandbox, args: &[&str]) -> String {
    let out = sb.tinygpt(args);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn bad_parquet_files_name_the_file_and_the_column() {
    let sb = Sandbox::new();
    sb.write("parquet.toml", PARQUET_RECIPE);
    let numbers: ArrayRef = Arc::new(Int64Array::from_iter_values(0..3));
    write_parquet(&sb.path("data.parquet"), vec![("text", numbers.clone())]);
    let err = stage_error(&sb, &["run", "parquet.toml"]);
    assert!(err.contains("data.parquet`: no column `content` (columns: text)"), "{err}");
    write_parquet(&sb.path("data.parquet"), vec![("content", numbers)]);
    let err = stage_error(&sb, &["run", "parquet.toml"]);
    assert!(err.contains("column `content` holds Int64, not strings"), "{err}");
}

#[test]
fn bad_jsonl_and_bad_text_name_the_line_or_byte() {
    let sb = Sandbox::new();
    sb.write("data.jsonl", "{\"text\": \"fine\"}\n{\"txt\": \"oops\"}\n");
    let err = stage_error(&sb, &["run", "raw_text.toml", "--set", "tokenize.input=data.jsonl"]);
    assert!(err.contains("data.jsonl` line 2: no field `text` (fields: txt)"), "{err}");
    sb.write("data.txt", b"valid\xc3(");
    let err = stage_error(&sb, &["run", "raw_text.toml"]);
    assert!(err.contains("data.txt`: not UTF-8 text at byte offset 5"), "{err}");
    sb.write("data.txt", "");
    let err = stage_error(&sb, &["run", "raw_text.toml"]);
    assert!(err.contains("the corpus is empty"), "{err}");
}

#[test]
fn real_data_tiny_shakespeare_parquet_rows_join_back_to_the_text() {
    let Some(data) = shared_data() else { return };
    let sb = Sandbox::new();
    sb.write("parquet.toml", PARQUET_RECIPE);
    let parquet = data.join("tinyshakespeare/tinyshakespeare.parquet");
    let text = data.join("tinyshakespeare/input.txt");
    let p = sb.run_json(
        "parquet.toml",
        &["--set", &format!("tokenize.input={}", parquet.display()), "--set", "tokenize.field=text"],
    );
    assert_eq!(stage(&p, "tokenize")["metrics"]["documents"], 7222, "one document per Parquet row");
    let t = sb.run_json(
        "parquet.toml",
        &["--set", &format!("tokenize.input={}", text.display()), "--set", "pack.split=position"],
    );
    // Byte tokens: the rows plus the "\n\n" between them are exactly the text file's bytes.
    let rows = stage(&p, "tokenize")["metrics"]["tokens"].as_u64().unwrap();
    let whole = stage(&t, "tokenize")["metrics"]["tokens"].as_u64().unwrap();
    assert_eq!(rows + 2 * (7222 - 1), whole);
    assert_eq!(whole, 1_115_394);
}

#[test]
fn real_data_gpt2_tokenizer_loads_and_tinystories_parquet_tokenizes() {
    let Some(data) = shared_data() else { return };
    let sb = Sandbox::new();
    let recipe = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("recipes/tinystories_parquet.toml");
    let out = sb.command().args(["run", recipe.to_str().unwrap(), "--json"]).output().unwrap();
    assert_success(&out);
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stage(&run, "tokenize")["metrics"]["documents"], 2087);
    assert_eq!(stage(&run, "tokenize")["metrics"]["vocab_size"], 50257);
    assert!(data.exists());
}
