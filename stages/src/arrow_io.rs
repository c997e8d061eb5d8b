//! Arrow IPC files of token ids: documents (`List<UInt32>`) and fixed-length blocks
//! (`FixedSizeList<UInt32>`), plus the small `meta.json` that travels with them.
//!
//! Written in record batches of a fixed number of rows, never "whatever fits", so the same
//! tokens always give the same bytes.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, FixedSizeListArray, ListArray, UInt32Array};
use arrow::buffer::{OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use arrow::record_batch::RecordBatch;
use engine::StageError;
use serde::{Deserialize, Serialize};

use crate::fail;

/// Rows per record batch.
const BATCH_ROWS: usize = 1024;

/// Token ids of many documents: document `i` is `values[offsets[i]..offsets[i + 1]]`.
/// Build it with [`TokenDocs::push`]; an empty one has no offsets at all.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TokenDocs {
    pub offsets: Vec<usize>,
    pub values: Vec<u32>,
}

impl TokenDocs {
    pub fn from_docs(docs: &[Vec<u32>]) -> Self {
        let mut out = TokenDocs { offsets: vec![0], values: Vec::with_capacity(docs.iter().map(Vec::len).sum()) };
        docs.iter().for_each(|d| out.push(d));
        out
    }
    /// Append one document.
    pub fn push(&mut self, doc: &[u32]) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        self.values.extend_from_slice(doc);
        self.offsets.push(self.values.len());
    }
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn doc(&self, i: usize) -> &[u32] {
        &self.values[self.offsets[i]..self.offsets[i + 1]]
    }
}

/// What `tokenize` and `pack` record beside their token files.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenMeta {
    pub vocab_size: u32,
    pub eot_id: u32,
    /// Present in packed data: tokens per block minus one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_len: Option<usize>,
}

impl TokenMeta {
    /// The packed data's block length (`seq_len`) in `dir`, refused when longer than a model's
    /// `block_size` (`whose` names the model in the message).
    pub fn seq_len_within(dir: &Path, block_size: usize, whose: &str) -> Result<usize, StageError> {
        let t = Self::read(dir)?.seq_len.ok_or_else(|| StageError::msg("the data's meta.json has no seq_len"))?;
        if t > block_size {
            return Err(StageError::msg(format!(
                "the data's blocks of {t} tokens are longer than {whose} block size {block_size}"
            )));
        }
        Ok(t)
    }

    pub const FILE: &'static str = "meta.json";

    pub fn write(&self, dir: &Path) -> Result<(), StageError> {
        let path = dir.join(Self::FILE);
        let mut text = serde_json::to_string_pretty(self).expect("meta serializes");
        text.push('\n');
        std::fs::write(&path, text).map_err(|e| fail(format!("writing `{}`", path.display()))(&e))
    }

    pub fn read(dir: &Path) -> Result<Self, StageError> {
        let path = dir.join(Self::FILE);
        let bytes = std::fs::read(&path).map_err(|e| fail(format!("reading `{}`", path.display()))(&e))?;
        serde_json::from_slice(&bytes).map_err(|e| fail(format!("reading `{}`", path.display()))(&e))
    }
}

fn write_batches(
    path: &Path,
    schema: Arc<Schema>,
    batches: impl Iterator<Item = Vec<ArrayRef>>,
) -> Result<(), StageError> {
    let err = |e: &dyn std::error::Error| fail(format!("writing `{}`", path.display()))(e);
    let file = File::create(path).map_err(|e| err(&e))?;
    let mut writer = FileWriter::try_new(BufWriter::new(file), &schema).map_err(|e| err(&e))?;
    for columns in batches {
        let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| err(&e))?;
        writer.write(&batch).map_err(|e| err(&e))?;
    }
    writer.finish().map_err(|e| err(&e))?;
    Ok(())
}

fn read_batches(path: &Path) -> Result<Vec<RecordBatch>, StageError> {
    let err = |e: &dyn std::error::Error| fail(format!("reading `{}`", path.display()))(e);
    let file = File::open(path).map_err(|e| err(&e))?;
    let reader = FileReader::try_new(std::io::BufReader::new(file), None).map_err(|e| err(&e))?;
    reader.collect::<Result<Vec<_>, _>>().map_err(|e| err(&e))
}

fn item_field() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::UInt32, false))
}

/// Documents `start..end` as one `List<UInt32>` column.
fn list_column(docs: &TokenDocs, start: usize, end: usize) -> ArrayRef {
    let base = docs.offsets[start];
    let offsets: Vec<i32> = docs.offsets[start..=end]
        .iter()
        .map(|o| i32::try_from(o - base).expect("a batch of documents holds under 2^31 tokens"))
        .collect();
    let values = UInt32Array::from(docs.values[base..docs.offsets[end]].to_vec());
    Arc::new(ListArray::new(item_field(), OffsetBuffer::new(ScalarBuffer::from(offsets)), Arc::new(values), None))
}

/// Write `List<UInt32>` columns of as many documents each, named `names`.
fn write_lists(path: &Path, names: &[&str], columns: &[&TokenDocs]) -> Result<(), StageError> {
    let fields: Vec<Field> = names.iter().map(|n| Field::new(*n, DataType::List(item_field()), false)).collect();
    let n = columns[0].len();
    assert!(columns.iter().all(|c| c.len() == n), "every column holds a value per row");
    let batches = (0..n).step_by(BATCH_ROWS).map(|start| {
        let end = (start + BATCH_ROWS).min(n);
        columns.iter().map(|c| list_column(c, start, end)).collect()
    });
    write_batches(path, Arc::new(Schema::new(fields)), batches)
}

/// Read column `index` of a file of `List<UInt32>` columns.
fn read_list(path: &Path, index: usize, what: &str) -> Result<TokenDocs, StageError> {
    let mut docs = TokenDocs::default();
    for batch in read_batches(path)? {
        let bad = || StageError::msg(format!("`{}`: column {index} is not a list of {what}", path.display()));
        let list = batch.columns().get(index).and_then(|c| c.as_any().downcast_ref::<ListArray>()).ok_or_else(bad)?;
        for i in 0..list.len() {
            let row = list.value(i);
            let ids = row.as_any().downcast_ref::<UInt32Array>().ok_or_else(bad)?;
            docs.push(ids.values());
        }
    }
    Ok(docs)
}

/// Write documents as one `tokens: List<UInt32>` column.
pub fn write_docs(path: &Path, docs: &TokenDocs) -> Result<(), StageError> {
    write_lists(path, &["tokens"], &[docs])
}

pub fn read_docs(path: &Path) -> Result<TokenDocs, StageError> {
    read_list(path, 0, "token ids")
}

/// Instruction examples: each example's token ids and, per token, 1 where it is a target the
/// loss counts (a response token) and 0 where it is not (the prompt).
///
/// Invariant: `masks` has the offsets of `tokens` and holds only 0 and 1.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Examples {
    pub tokens: TokenDocs,
    pub masks: TokenDocs,
}

impl Examples {
    pub fn push(&mut self, tokens: &[u32], mask: &[u32]) {
        assert_eq!(tokens.len(), mask.len(), "a mask value per token");
        self.tokens.push(tokens);
        self.masks.push(mask);
    }
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// Example `i`: its tokens and loss mask.
    pub fn example(&self, i: usize) -> (&[u32], &[u32]) {
        (self.tokens.doc(i), self.masks.doc(i))
    }
}

/// Write examples as `tokens` and `loss_mask` columns (`List<UInt32>` both).
pub fn write_examples(path: &Path, examples: &Examples) -> Result<(), StageError> {
    write_lists(path, &["tokens", "loss_mask"], &[&examples.tokens, &examples.masks])
}

pub fn read_examples(path: &Path) -> Result<Examples, StageError> {
    let tokens = read_list(path, 0, "token ids")?;
    let masks = read_list(path, 1, "loss-mask values")?;
    if tokens.offsets != masks.offsets || masks.values.iter().any(|m| *m > 1) {
        return Err(StageError::msg(format!("`{}`: the loss masks do not match the examples", path.display())));
    }
    Ok(Examples { tokens, masks })
}

/// Packed blocks as `pack` writes them: rows of `width` (T + 1) tokens. The last `padding`
/// tokens of the last row are end-of-text tokens that fill it: inputs, never targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocks {
    pub tokens: Vec<u32>,
    pub width: usize,
    pub padding: usize,
}

/// The schema metadata key that holds [`Blocks::padding`] (absent when there is none).
const PADDING_KEY: &str = "padding";

/// Write blocks as one `tokens: FixedSizeList<UInt32, width>` column; a padding count goes
/// into the schema's metadata.
pub fn write_blocks(path: &Path, blocks: &Blocks) -> Result<(), StageError> {
    let Blocks { tokens, width, padding } = blocks;
    let width = *width;
    assert!(width > 0 && tokens.len().is_multiple_of(width), "blocks hold a whole number of rows of {width}");
    assert!(*padding < width && (*padding == 0 || !tokens.is_empty()), "padding fills part of the last row");
    let field = Field::new("tokens", DataType::FixedSizeList(item_field(), width as i32), false);
    let mut schema = Schema::new(vec![field]);
    if *padding > 0 {
        schema =
            schema.with_metadata(std::collections::HashMap::from([(PADDING_KEY.to_string(), padding.to_string())]));
    }
    let rows = tokens.len() / width;
    let columns = (0..rows).step_by(BATCH_ROWS).map(|start| {
        let end = (start + BATCH_ROWS).min(rows);
        let values = UInt32Array::from(tokens[start * width..end * width].to_vec());
        vec![Arc::new(FixedSizeListArray::new(item_field(), width as i32, Arc::new(values), None)) as ArrayRef]
    });
    write_batches(path, Arc::new(schema), columns)
}

/// Read blocks back, with their padding.
pub fn read_blocks(path: &Path) -> Result<Blocks, StageError> {
    let batches = read_batches(path)?;
    let bad = |what: &str| StageError::msg(format!("`{}` {what}", path.display()));
    let Some(schema) = batches.first().map(|b| b.schema()) else {
        return Err(bad("holds no fixed-size token blocks"));
    };
    let DataType::FixedSizeList(_, width) = schema.field(0).data_type() else {
        return Err(bad("holds no fixed-size token blocks"));
    };
    let width = *width as usize;
    let padding = match schema.metadata().get(PADDING_KEY) {
        Some(text) => {
            text.parse().ok().filter(|p| *p < width).ok_or_else(|| bad("has a bad `padding` in its metadata"))?
        }
        None => 0,
    };
    let mut tokens = Vec::new();
    for batch in batches {
        let list = batch.column(0).as_any().downcast_ref::<FixedSizeListArray>().expect("schema checked above");
        let values = list.values().as_any().downcast_ref::<UInt32Array>().expect("blocks hold uint32");
        tokens.extend_from_slice(values.values());
    }
    Ok(Blocks { tokens, width, padding })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_and_blocks_round_trip_across_batches() {
        let dir = tempfile::tempdir().unwrap();
        let docs: Vec<Vec<u32>> = (0..2500u32).map(|i| (0..i % 7).map(|j| i * 10 + j).collect()).collect();
        let docs = TokenDocs::from_docs(&docs);
        write_docs(&dir.path().join("d.arrow"), &docs).unwrap();
        assert_eq!(read_docs(&dir.path().join("d.arrow")).unwrap(), docs);

        for padding in [0, 3] {
            let blocks = Blocks { tokens: (0..3000 * 5).collect(), width: 5, padding };
            write_blocks(&dir.path().join("b.arrow"), &blocks).unwrap();
            assert_eq!(read_blocks(&dir.path().join("b.arrow")).unwrap(), blocks);
        }
    }

    #[test]
    fn writing_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let docs = TokenDocs::from_docs(&[vec![1, 2, 3], vec![], vec![4]]);
        write_docs(&dir.path().join("a"), &docs).unwrap();
        write_docs(&dir.path().join("b"), &docs).unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), std::fs::read(dir.path().join("b")).unwrap());
    }
}
