//! Reading documents from text, JSONL and Parquet files, with errors that name the file and
//! the place: the byte offset of invalid UTF-8, the line of bad JSON, the missing column.

use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;
use engine::{Input, StageError};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Jsonl,
    Parquet,
}

/// The values of a `format` parameter: `auto` (by extension) or a [`Format`].
pub const FORMAT_CHOICES: &[&str] = &["auto", "text", "jsonl", "parquet"];

impl Format {
    /// The format a `format` parameter names; `None` for `auto`.
    pub fn named(name: &str) -> Option<Format> {
        match name {
            "text" => Some(Format::Text),
            "jsonl" => Some(Format::Jsonl),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }

    fn from_extension(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "txt" | "text" | "md" => Some(Format::Text),
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }
}

pub struct SourceOptions<'a> {
    /// `None`: decided per file by its extension.
    pub format: Option<Format>,
    /// JSONL field or Parquet column holding the text.
    pub field: &'a str,
    /// Split text files into documents at this string; without it a text file is one document.
    pub doc_separator: Option<&'a str>,
}

/// The files an input names, in a fixed order: a file as given; the files of a directory as
/// [`engine::cache::list_files`] lists them (the same files its digest covers), or of an upstream
/// artifact, keeping those of a known format unless `format` is set.
fn files_of(input: &Input, format: Option<Format>) -> Result<Vec<PathBuf>, StageError> {
    let mut files: Vec<PathBuf> = match input {
        Input::Raw { path, .. } if path.is_file() => return Ok(vec![path.clone()]),
        Input::Raw { path, .. } => engine::cache::list_files(path)
            .map_err(|e| StageError::chain(format!("listing {}", input.describe()), &e))?
            .into_iter()
            .map(|(_, full)| full)
            .collect(),
        Input::Artifact { artifact, .. } => artifact.manifest.files.iter().map(|f| artifact.path(&f.name)).collect(),
    };
    files.retain(|f| format.is_some() || Format::from_extension(f).is_some());
    if files.is_empty() {
        return Err(StageError::msg(format!("{} holds no .txt, .jsonl or .parquet file", input.describe())));
    }
    Ok(files)
}

/// Every document of the input, in file order then document order. Empty documents are kept
/// out; an input with no text at all is an error.
pub fn read_documents(input: &Input, opts: &SourceOptions<'_>) -> Result<Vec<String>, StageError> {
    let mut docs = Vec::new();
    for file in files_of(input, opts.format)? {
        let format = opts.format.or_else(|| Format::from_extension(&file)).unwrap_or(Format::Text);
        match format {
            Format::Text => read_text(&file, opts.doc_separator, &mut docs)?,
            Format::Jsonl => read_jsonl(&file, opts.field, &mut docs)?,
            Format::Parquet => read_parquet(&file, opts.field, &mut docs)?,
        }
    }
    docs.retain(|d| !d.is_empty());
    if docs.is_empty() {
        return Err(StageError::msg(format!("{} holds no text: the corpus is empty", input.describe())));
    }
    Ok(docs)
}

pub(crate) fn read_utf8(file: &Path) -> Result<String, StageError> {
    let bytes = std::fs::read(file).map_err(|e| StageError::chain(format!("reading `{}`", file.display()), &e))?;
    String::from_utf8(bytes).map_err(|e| {
        let offset = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..offset].iter().filter(|b| **b == b'\n').count() + 1;
        StageError::msg(format!("`{}`: not UTF-8 text at byte offset {offset} (line {line})", file.display()))
    })
}

fn read_text(file: &Path, separator: Option<&str>, docs: &mut Vec<String>) -> Result<(), StageError> {
    let text = read_utf8(file)?;
    match separator {
        None => docs.push(text),
        Some(sep) => docs.extend(text.split(sep).map(|d| d.trim().to_string())),
    }
    Ok(())
}

fn read_jsonl(file: &Path, field: &str, docs: &mut Vec<String>) -> Result<(), StageError> {
    let text = read_utf8(file)?;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("`{}` line {}", file.display(), i + 1);
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| StageError::msg(format!("{}: not valid JSON: {e}", at())))?;
        let Some(object) = value.as_object() else {
            return Err(StageError::msg(format!("{}: expected a JSON object, found {}", at(), kind_of(&value))));
        };
        match object.get(field) {
            Some(serde_json::Value::String(s)) => docs.push(s.clone()),
            Some(other) => {
                return Err(StageError::msg(format!("{}: field `{field}` is {}, not a string", at(), kind_of(other))));
            }
            None => {
                let keys: Vec<&str> = object.keys().map(String::as_str).collect();
                return Err(StageError::msg(format!(
                    "{}: no field `{field}` (fields: {}); set `field` to choose one",
                    at(),
                    keys.join(", ")
                )));
            }
        }
    }
    Ok(())
}

pub(crate) fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn read_parquet(file: &Path, column: &str, docs: &mut Vec<String>) -> Result<(), StageError> {
    let err = |e: &dyn std::error::Error| StageError::chain(format!("reading Parquet file `{}`", file.display()), e);
    let handle = std::fs::File::open(file).map_err(|e| err(&e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(handle).map_err(|e| err(&e))?;
    let schema = builder.schema().clone();
    let Some((index, field)) = schema.column_with_name(column) else {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        return Err(StageError::msg(format!(
            "`{}`: no column `{column}` (columns: {}); set `field` to choose one",
            file.display(),
            names.join(", ")
        )));
    };
    if !matches!(field.data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) {
        return Err(StageError::msg(format!(
            "`{}`: column `{column}` holds {}, not strings",
            file.display(),
            field.data_type()
        )));
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), [index]);
    let reader = builder.with_projection(mask).build().map_err(|e| err(&e))?;
    for batch in reader {
        let batch = batch.map_err(|e| err(&e))?;
        let array = batch.column(0);
        docs.extend(strings(array).into_iter().map(Option::unwrap_or_default));
    }
    Ok(())
}

/// A Parquet file of named string columns, as instruction and preference data come. Every
/// problem is bad input naming the file.
pub(crate) struct StringTable {
    reader: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    /// The names of all its columns.
    pub names: Vec<String>,
    schema: arrow::datatypes::SchemaRef,
    path: std::path::PathBuf,
}

impl StringTable {
    pub fn open(path: &Path) -> Result<StringTable, StageError> {
        let err = |e: &dyn std::error::Error| {
            StageError::bad_input(format!("reading Parquet file `{}`: {e}", path.display()))
        };
        let handle = std::fs::File::open(path).map_err(|e| err(&e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(handle).map_err(|e| err(&e))?;
        let schema = builder.schema().clone();
        let reader = builder.build().map_err(|e| err(&e))?;
        let names = schema.fields().iter().map(|f| f.name().clone()).collect();
        Ok(StringTable { reader, names, schema, path: path.to_path_buf() })
    }

    /// The index of string column `name`; `None` when it is absent and not `required`.
    pub fn column(&self, name: &str, required: bool) -> Result<Option<usize>, StageError> {
        match self.schema.column_with_name(name) {
            Some((i, f)) if matches!(f.data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) => {
                Ok(Some(i))
            }
            Some((_, f)) => Err(StageError::bad_input(format!(
                "`{}`: column `{name}` holds {}, not strings",
                self.path.display(),
                f.data_type()
            ))),
            None if !required => Ok(None),
            None => Err(StageError::bad_input(format!(
                "`{}`: no column `{name}` (columns: {})",
                self.path.display(),
                self.names.join(", ")
            ))),
        }
    }

    /// The index of boolean column `name`, which must be there.
    pub fn bool_column(&self, name: &str) -> Result<usize, StageError> {
        match self.schema.column_with_name(name) {
            Some((i, f)) if *f.data_type() == DataType::Boolean => Ok(i),
            Some((_, f)) => Err(StageError::bad_input(format!(
                "`{}`: column `{name}` holds {}, not booleans",
                self.path.display(),
                f.data_type()
            ))),
            None => Err(StageError::bad_input(format!(
                "`{}`: no column `{name}` (columns: {})",
                self.path.display(),
                self.names.join(", ")
            ))),
        }
    }

    /// The record batches, a failure to decode one being bad input naming the file.
    pub fn batches(self) -> impl Iterator<Item = Result<arrow::array::RecordBatch, StageError>> {
        let path = self.path;
        self.reader.map(move |batch| {
            batch.map_err(|e| StageError::bad_input(format!("reading Parquet file `{}`: {e}", path.display())))
        })
    }
}

/// The values of a string column (`string`, `large_string` or `string_view`), nulls as `None`.
///
/// # Panics
/// If the column holds another type: callers check the schema first.
pub(crate) fn strings(array: &dyn Array) -> Vec<Option<String>> {
    let owned = |s: Option<&str>| s.map(str::to_string);
    match array.data_type() {
        DataType::Utf8 => array.as_string::<i32>().iter().map(owned).collect(),
        DataType::LargeUtf8 => array.as_string::<i64>().iter().map(owned).collect(),
        DataType::Utf8View => array.as_string_view().iter().map(owned).collect(),
        other => unreachable!("column type {other} was checked to be a string type"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(path: &Path) -> Input {
        Input::Raw { path: path.to_path_buf(), shown: path.display().to_string() }
    }

    fn opts(field: &str) -> SourceOptions<'_> {
        SourceOptions { format: None, field, doc_separator: None }
    }

    #[test]
    fn invalid_utf8_names_the_byte_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.txt");
        std::fs::write(&path, b"fine\nthen \xff broken").unwrap();
        let err = read_documents(&raw(&path), &opts("text")).unwrap_err().to_string();
        assert!(err.contains("not UTF-8 text at byte offset 10 (line 2)"), "{err}");
    }

    #[test]
    fn bad_jsonl_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, "{\"text\": \"a\"}\n\n{\"text\": 3}\n").unwrap();
        let err = read_documents(&raw(&path), &opts("text")).unwrap_err().to_string();
        assert!(err.contains("line 3: field `text` is a number"), "{err}");
        std::fs::write(&path, "{\"text\": \"a\"}\n{oops\n").unwrap();
        let err = read_documents(&raw(&path), &opts("text")).unwrap_err().to_string();
        assert!(err.contains("line 2: not valid JSON"), "{err}");
        std::fs::write(&path, "{\"body\": \"a\"}\n").unwrap();
        let err = read_documents(&raw(&path), &opts("text")).unwrap_err().to_string();
        assert!(err.contains("line 1: no field `text` (fields: body)"), "{err}");
    }

    #[test]
    fn separators_split_text_files_and_empty_corpora_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.txt");
        std::fs::write(&path, "one\n<|endoftext|>\ntwo\n<|endoftext|>\n").unwrap();
        let o = SourceOptions { format: None, field: "text", doc_separator: Some("<|endoftext|>") };
        assert_eq!(read_documents(&raw(&path), &o).unwrap(), vec!["one", "two"]);
        std::fs::write(&path, "").unwrap();
        let err = read_documents(&raw(&path), &o).unwrap_err().to_string();
        assert!(err.contains("the corpus is empty"), "{err}");
    }
}
