//! `instructions`: read instruction data, apply a prompt template, and tokenize each example
//! with the model's own tokenizer into token ids and a loss mask (1 on the response, 0 on the
//! prompt), split into train and validation.
//!
//! Formats: an Alpaca-style JSON array or JSONL (`instruction`, optional `input`, `output`),
//! Parquet with `instruction`, `response` (optional `input`), and chat JSONL with
//! `messages: [{role, content}]`. Every example ends with the end-of-text token, which is a
//! target: the model learns to stop.
//!
//! Bad data stops the stage with exit code 2 and a message naming the file, the row (the line
//! for JSONL) and the field; nothing is written.

use std::collections::BTreeSet;
use std::path::Path;

use engine::{Accepts, Input, InputSpec, Metrics, ParamProblem, ParamSpec, Params, Stage, StageCtx, StageError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::arrow_io::{write_examples, Examples, TokenMeta};
use crate::model_io::{load_config_with_eot, TOKENIZER};
use crate::nn::rng::SplitMix64;
use crate::text_source::{kind_of, read_utf8, strings, StringTable};
use crate::{fail, round, EXAMPLES, MODEL};

pub struct Instructions;

pub const TRAIN_FILE: &str = "train.arrow";
pub const VAL_FILE: &str = "val.arrow";
/// The template the examples were made with, so that sampling can apply it to a new prompt.
pub const TEMPLATE_FILE: &str = "template.json";

const PARAMS: &[ParamSpec] = &[
    ParamSpec::choice(
        "format",
        "auto",
        &["auto", "json", "jsonl", "parquet", "chat"],
        "`auto` (by extension; JSONL rows with `messages` are chat), an Alpaca `json` array, `jsonl`, `parquet`, or `chat` JSONL",
    ),
    ParamSpec::string(
        "template",
        Some("alpaca"),
        "`alpaca` (### Instruction / ### Input / ### Response), or a template with {instruction}, {input} and {response}",
    ),
    ParamSpec::string("instruction_field", Some("instruction"), "the field or column of the instruction"),
    ParamSpec::string("input_field", Some("input"), "the field or column of the optional input"),
    ParamSpec::string("response_field", None, "the field or column of the response (default `output`, else `response`)"),
    ParamSpec::string("messages_field", Some("messages"), "chat: the field holding the list of {role, content}"),
    ParamSpec::float("val_fraction", 0.1, 0.0, 0.9, "share of examples held out for validation (seeded)"),
];

const INPUTS: &[InputSpec] = &[
    InputSpec {
        name: "model",
        accepts: Accepts::Artifact(&[MODEL]),
        required: true,
        doc: "the model whose tokenizer encodes the examples",
    },
    InputSpec { name: "input", accepts: Accepts::Raw, required: true, doc: "a JSON, JSONL or Parquet file" },
];

/// Stanford Alpaca's prompt, with and without an input.
const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{response}";
const ALPACA: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{response}";

/// A prompt template: text with `{instruction}`, `{input}` and exactly one `{response}`. The
/// prompt is everything before `{response}`; the response is the response text followed by
/// what the template has after `{response}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    /// For examples with an input.
    pub with_input: String,
    /// For examples without one.
    pub without_input: String,
}

const PLACEHOLDERS: [&str; 3] = ["instruction", "input", "response"];

impl Template {
    /// `alpaca`, or a recipe's template checked for its placeholders.
    pub fn parse(spec: &str) -> Result<Template, String> {
        if spec == "alpaca" {
            return Ok(Template { with_input: ALPACA_WITH_INPUT.into(), without_input: ALPACA.into() });
        }
        let mut rest = spec;
        let mut responses = 0;
        while let Some(open) = rest.find('{') {
            let after = &rest[open + 1..];
            let Some(close) = after.find('}') else { break };
            let name = &after[..close];
            if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !name.is_empty() {
                if !PLACEHOLDERS.contains(&name) {
                    return Err(format!(
                        "unknown placeholder `{{{name}}}` in the template (known: {{instruction}}, {{input}}, {{response}})"
                    ));
                }
                responses += usize::from(name == "response");
            }
            rest = &after[close + 1..];
        }
        if responses != 1 {
            return Err(format!("the template needs `{{response}}` exactly once, not {responses} times"));
        }
        Ok(Template { with_input: spec.into(), without_input: spec.into() })
    }

    /// The prompt and the response text of one example.
    pub fn render(&self, instruction: &str, input: &str, response: &str) -> (String, String) {
        let text = if input.is_empty() { &self.without_input } else { &self.with_input };
        let (before, after) = text.split_once("{response}").expect("parse checked one {response}");
        let fill = |s: &str| s.replace("{instruction}", instruction).replace("{input}", input);
        (fill(before), format!("{response}{}", fill(after)))
    }

    /// The prompt for a new instruction, as sampling feeds it.
    pub fn prompt(&self, instruction: &str, input: &str) -> String {
        self.render(instruction, input, "").0
    }

    pub fn read(dir: &Path) -> Result<Template, StageError> {
        let path = dir.join(TEMPLATE_FILE);
        let bytes = std::fs::read(&path).map_err(|e| fail(format!("reading `{}`", path.display()))(&e))?;
        serde_json::from_slice(&bytes).map_err(|e| fail(format!("reading `{}`", path.display()))(&e))
    }
}

/// One example as read: an instruction with its response, or a conversation.
#[derive(Clone, Debug, PartialEq)]
pub enum Row {
    Single {
        instruction: String,
        input: String,
        response: String,
    },
    /// (role, content) in order; the assistant's turns are the responses.
    Chat(Vec<(String, String)>),
}

/// The names of the fields a row is read from.
struct Fields<'a> {
    instruction: &'a str,
    input: &'a str,
    response: Option<&'a str>,
    messages: &'a str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Jsonl,
    Parquet,
    Chat,
}

impl Stage for Instructions {
    fn kind(&self) -> &'static str {
        "instructions"
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "instruction data templated and tokenized with a model's tokenizer: token ids and a loss mask per example"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn inputs(&self) -> &'static [InputSpec] {
        INPUTS
    }
    fn output(&self) -> engine::ArtifactType {
        EXAMPLES
    }
    fn vocabulary(&self) -> engine::Vocabulary {
        engine::Vocabulary::From("model")
    }
    fn uses_seed(&self) -> bool {
        true
    }
    fn check(&self, p: &Params, _connected: &BTreeSet<&str>) -> Result<(), ParamProblem> {
        Template::parse(p.str("template")).map(|_| ()).map_err(|e| ParamProblem::new("template", e))
    }

    fn run(&self, ctx: &StageCtx<'_>) -> Result<Metrics, StageError> {
        let (Input::Artifact { artifact: model, .. }, Input::Raw { path, .. }) =
            (ctx.required_input("model"), ctx.required_input("input"))
        else {
            unreachable!("`model` accepts artifacts, `input` raw files");
        };
        let p = ctx.params();
        let template = Template::parse(p.str("template")).map_err(StageError::msg)?;
        let (cfg, eot) = load_config_with_eot(&model.dir)?;
        let tok_path = model.path(TOKENIZER);
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| {
            StageError::msg(format!("`{}` is not a Hugging Face tokenizer.json: {e}", tok_path.display()))
        })?;
        let fields = Fields {
            instruction: p.str("instruction_field"),
            input: p.str("input_field"),
            response: p.opt_str("response_field"),
            messages: p.str("messages_field"),
        };
        let rows = read_rows(path, p.str("format"), &fields)?;
        ctx.check_cancelled()?;
        ctx.progress().set_length(rows.len() as u64, "examples");
        let mut all = Examples::default();
        for (i, row) in rows.iter().enumerate() {
            let (ids, mask) = encode(&tokenizer, &template, row, eot)?;
            if let Some(bad) = ids.iter().find(|id| **id as usize >= cfg.vocab_size) {
                return Err(StageError::msg(format!(
                    "example {} encodes to token {bad}, outside the model's vocabulary of {}",
                    i + 1,
                    cfg.vocab_size
                )));
            }
            all.push(&ids, &mask);
            if i % 256 == 0 {
                ctx.check_cancelled()?;
                ctx.progress().set_position(i as u64);
            }
        }
        let (train, val) = split(&all, p.float("val_fraction"), ctx.seed());
        if train.is_empty() {
            return Err(StageError::msg("no training examples are left after the validation split"));
        }
        write_examples(&ctx.out(TRAIN_FILE), &train)?;
        write_examples(&ctx.out(VAL_FILE), &val)?;
        TokenMeta { vocab_size: cfg.vocab_size as u32, eot_id: eot, seq_len: None }.write(ctx.out_dir())?;
        let text = serde_json::to_string_pretty(&template).expect("template serializes") + "\n";
        std::fs::write(ctx.out(TEMPLATE_FILE), text).map_err(|e| fail("writing template.json")(&e))?;
        std::fs::copy(&tok_path, ctx.out(TOKENIZER)).map_err(|e| fail("copying tokenizer.json")(&e))?;

        let lens: Vec<usize> = (0..all.len()).map(|i| all.example(i).0.len()).collect();
        let response_tokens: usize = all.masks.values.iter().map(|m| *m as usize).sum();
        Ok(Metrics::from([
            ("examples".into(), json!(all.len())),
            ("train_examples".into(), json!(train.len())),
            ("val_examples".into(), json!(val.len())),
            ("tokens".into(), json!(all.tokens.values.len())),
            ("response_tokens".into(), json!(response_tokens)),
            ("mean_len".into(), json!(round(lens.iter().sum::<usize>() as f64 / lens.len().max(1) as f64, 1))),
            ("max_len".into(), json!(lens.iter().max().copied().unwrap_or(0))),
        ]))
    }
}

/// Token ids and loss mask of one example: the prompt (mask 0), the response and the
/// end-of-text token (mask 1); a conversation alternates prompt turns and assistant turns.
fn encode(tokenizer: &Tokenizer, template: &Template, row: &Row, eot: u32) -> Result<(Vec<u32>, Vec<u32>), StageError> {
    let ids_of = |text: &str| -> Result<Vec<u32>, StageError> {
        tokenizer.encode_fast(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| fail("encoding")(&*e))
    };
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    let mut push = |text: &str, weight: u32| -> Result<(), StageError> {
        let part = ids_of(text)?;
        mask.extend(std::iter::repeat_n(weight, part.len()));
        ids.extend(part);
        Ok(())
    };
    match row {
        Row::Single { instruction, input, response } => {
            let (prompt, response) = template.render(instruction, input, response);
            push(&prompt, 0)?;
            push(&response, 1)?;
        }
        Row::Chat(turns) => {
            let mut system = String::new();
            let mut user = String::new();
            for (role, content) in turns {
                match role.as_str() {
                    "system" => system = format!("{content}\n\n"),
                    "assistant" => {
                        let (prompt, response) = template.render(&user, "", content);
                        push(&format!("{system}{prompt}"), 0)?;
                        push(&response, 1)?;
                        push("\n\n", 0)?;
                        system.clear();
                        user.clear();
                    }
                    _ => user = content.clone(),
                }
            }
            // The separator after the last turn gives way to the end-of-text token.
            let sep = ids_of("\n\n")?.len();
            ids.truncate(ids.len() - sep);
            mask.truncate(mask.len() - sep);
        }
    }
    ids.push(eot);
    mask.push(1);
    Ok((ids, mask))
}

/// A seeded share of the examples for validation, in their original order on both sides.
fn split(all: &Examples, val_fraction: f64, seed: u64) -> (Examples, Examples) {
    let n = all.len();
    let n_val = ((n as f64) * val_fraction).round() as usize;
    let mut order: Vec<u32> = (0..n as u32).collect();
    SplitMix64::new(seed ^ 0x494E_5354_5255_4354).shuffle(&mut order);
    let held: BTreeSet<u32> = order[..n_val.min(n.saturating_sub(1))].iter().copied().collect();
    let (mut train, mut val) = (Examples::default(), Examples::default());
    for i in 0..n {
        let (ids, mask) = all.example(i);
        if held.contains(&(i as u32)) { &mut val } else { &mut train }.push(ids, mask);
    }
    (train, val)
}

/// Every row of the file, in order.
fn read_rows(path: &Path, format: &str, fields: &Fields<'_>) -> Result<Vec<Row>, StageError> {
    let format = match format {
        "json" => Format::Json,
        "jsonl" => Format::Jsonl,
        "parquet" => Format::Parquet,
        "chat" => Format::Chat,
        _ => match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Format::Json,
            Some("jsonl" | "ndjson") => Format::Jsonl,
            Some("parquet") => Format::Parquet,
            _ => {
                return Err(StageError::bad_input(format!(
                    "`{}`: cannot tell the format from the extension; set `format`",
                    path.display()
                )))
            }
        },
    };
    let rows = match format {
        Format::Parquet => read_parquet(path, fields)?,
        Format::Json => {
            let text = read_text(path)?;
            let value: Value = serde_json::from_str(&text)
                .map_err(|e| StageError::bad_input(format!("`{}`: not valid JSON: {e}", path.display())))?;
            let Value::Array(items) = value else {
                return Err(StageError::bad_input(format!("`{}`: expected a JSON array of examples", path.display())));
            };
            let at = |i: usize| format!("`{}` row {}", path.display(), i + 1);
            items.iter().enumerate().map(|(i, v)| row_of(v, fields, &at(i), false)).collect::<Result<_, _>>()?
        }
        Format::Jsonl | Format::Chat => {
            let text = read_text(path)?;
            let mut rows = Vec::new();
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let at = format!("`{}` line {}", path.display(), i + 1);
                let value: Value = serde_json::from_str(line)
                    .map_err(|e| StageError::bad_input(format!("{at}: not valid JSON: {e}")))?;
                let chat = format == Format::Chat || value.get(fields.messages).is_some();
                rows.push(row_of(&value, fields, &at, chat)?);
            }
            rows
        }
    };
    if rows.is_empty() {
        return Err(StageError::bad_input(format!("`{}` holds no examples", path.display())));
    }
    Ok(rows)
}

/// The file as UTF-8 text; unreadable or not UTF-8 is bad input.
fn read_text(path: &Path) -> Result<String, StageError> {
    read_utf8(path).map_err(|e| StageError::bad_input(e.to_string()))
}

/// One JSON row as an example; `at` names the file and row for errors.
fn row_of(v: &Value, fields: &Fields<'_>, at: &str, chat: bool) -> Result<Row, StageError> {
    let Some(object) = v.as_object() else {
        return Err(StageError::bad_input(format!("{at}: expected a JSON object")));
    };
    let string = |name: &str, required: bool| -> Result<Option<String>, StageError> {
        match object.get(name) {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Null) | None if !required => Ok(None),
            None => Err(StageError::bad_input(format!("{at}: missing field `{name}`"))),
            Some(other) => {
                Err(StageError::bad_input(format!("{at}: field `{name}` is {}, not a string", kind_of(other))))
            }
        }
    };
    if chat {
        let Some(Value::Array(messages)) = object.get(fields.messages) else {
            return Err(StageError::bad_input(format!("{at}: field `{}` is not a list of messages", fields.messages)));
        };
        let mut turns = Vec::new();
        for (j, m) in messages.iter().enumerate() {
            let field = |name: &str| match m.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(StageError::bad_input(format!(
                    "{at}: field `{}[{j}].{name}` is missing or not a string",
                    fields.messages
                ))),
            };
            turns.push((field("role")?, field("content")?));
        }
        if !turns.iter().any(|(role, content)| role == "assistant" && !content.is_empty()) {
            return Err(StageError::bad_input(format!("{at}: field `{}` has no assistant reply", fields.messages)));
        }
        return Ok(Row::Chat(turns));
    }
    let instruction = string(fields.instruction, true)?.unwrap_or_default();
    let input = string(fields.input, false)?.unwrap_or_default();
    let (name, response) = match fields.response {
        Some(name) => (name, string(name, true)?),
        None if object.contains_key("output") || !object.contains_key("response") => {
            ("output", string("output", true)?)
        }
        None => ("response", string("response", true)?),
    };
    let response = response.unwrap_or_default();
    if response.trim().is_empty() {
        return Err(StageError::bad_input(format!("{at}: field `{name}` is empty")));
    }
    Ok(Row::Single { instruction, input, response })
}

/// The rows of a Parquet file with string columns for the fields.
fn read_parquet(path: &Path, fields: &Fields<'_>) -> Result<Vec<Row>, StageError> {
    let table = StringTable::open(path)?;
    let response_column =
        fields.response.unwrap_or(if table.names.iter().any(|n| n == "output") { "output" } else { "response" });
    let column = |name: &str, required: bool| table.column(name, required);
    let ci = column(fields.instruction, true)?.expect("a required column");
    let cr = column(response_column, true)?.expect("a required column");
    let cin = column(fields.input, false)?;
    let mut rows = Vec::new();
    for batch in table.batches() {
        let batch = batch?;
        let values = |i: usize| strings(batch.column(i).as_ref());
        let (ins, res) = (values(ci), values(cr));
        let inp = cin.map(values).unwrap_or_else(|| vec![None; batch.num_rows()]);
        for ((instruction, response), input) in ins.into_iter().zip(res).zip(inp) {
            let at = format!("`{}` row {}", path.display(), rows.len() + 1);
            let Some(instruction) = instruction else {
                return Err(StageError::bad_input(format!("{at}: field `{}` is null", fields.instruction)));
            };
            let response = response.unwrap_or_default();
            if response.trim().is_empty() {
                return Err(StageError::bad_input(format!("{at}: field `{response_column}` is empty")));
            }
            rows.push(Row::Single { instruction, input: input.unwrap_or_default(), response });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Fields<'static> {
        Fields { instruction: "instruction", input: "input", response: None, messages: "messages" }
    }

    #[test]
    fn templates_split_prompt_and_response_and_refuse_unknown_placeholders() {
        let t = Template::parse("Q: {instruction} {input}\nA: {response}.").unwrap();
        assert_eq!(t.render("add", "1 2", "3"), ("Q: add 1 2\nA: ".into(), "3.".into()));
        assert!(Template::parse("{instrution} {response}").unwrap_err().contains("unknown placeholder `{instrution}`"));
        assert!(Template::parse("{instruction}").unwrap_err().contains("exactly once"));
        let alpaca = Template::parse("alpaca").unwrap();
        assert!(alpaca.prompt("Say hi.", "").ends_with("### Instruction:\nSay hi.\n\n### Response:\n"));
        assert!(alpaca.prompt("Add.", "1, 2").contains("### Input:\n1, 2\n\n"));
    }

    #[test]
    fn rows_name_the_file_the_row_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("d.json");
        std::fs::write(&json, r#"[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": 5}]"#).unwrap();
        let err = read_rows(&json, "auto", &fields()).unwrap_err();
        assert!(
            matches!(&err, StageError::BadInput(m) if m.contains("d.json` row 2: field `output` is a number")),
            "{err}"
        );
        let jsonl = dir.path().join("d.jsonl");
        std::fs::write(&jsonl, "{\"instruction\": \"a\", \"output\": \"b\"}\n\n{\"output\": \"x\"}\n").unwrap();
        let err = read_rows(&jsonl, "auto", &fields()).unwrap_err().to_string();
        assert!(err.contains("d.jsonl` line 3: missing field `instruction`"), "{err}");
        std::fs::write(&jsonl, "{\"instruction\": \"a\", \"response\": \"  \"}\n").unwrap();
        let err = read_rows(&jsonl, "auto", &fields()).unwrap_err().to_string();
        assert!(err.contains("line 1: field `response` is empty"), "{err}");
        let chat = dir.path().join("c.jsonl");
        std::fs::write(
            &chat,
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\"}]}\n",
        )
        .unwrap();
        let err = read_rows(&chat, "auto", &fields()).unwrap_err().to_string();
        assert!(err.contains("field `messages[1].content` is missing"), "{err}");
    }

    #[test]
    fn the_mask_covers_the_response_and_the_end_of_text_token() {
        let tok = crate::tokenize::byte_tokenizer();
        let t = Template::parse("Q:{instruction}|A:{response}").unwrap();
        let row = Row::Single { instruction: "hi".into(), input: String::new(), response: "yo".into() };
        let (ids, mask) = encode(&tok, &t, &row, 256).unwrap();
        assert_eq!(ids.len(), "Q:hi|A:".len() + 3);
        assert_eq!(mask, [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]);
        assert_eq!(*ids.last().unwrap(), 256);
        let chat = Row::Chat(vec![
            ("system".into(), "S".into()),
            ("user".into(), "u1".into()),
            ("assistant".into(), "a1".into()),
            ("user".into(), "u2".into()),
            ("assistant".into(), "a2".into()),
        ]);
        let (ids, mask) = encode(&tok, &t, &chat, 256).unwrap();
        let text: String = ids[..ids.len() - 1].iter().map(|&b| b as u8 as char).collect();
        assert_eq!(text, "S\n\nQ:u1|A:a1\n\nQ:u2|A:a2");
        let trained: String = ids.iter().zip(&mask).filter(|(_, m)| **m == 1).map(|(&b, _)| b as u8 as char).collect();
        assert_eq!(&trained[..4], "a1a2", "only the assistant's turns (and the end) are targets");
    }

    #[test]
    fn the_split_is_seeded_and_keeps_order() {
        let mut all = Examples::default();
        for i in 0..20u32 {
            all.push(&[i, i], &[0, 1]);
        }
        let (train, val) = split(&all, 0.25, 3);
        assert_eq!((train.len(), val.len()), (15, 5));
        assert_eq!(split(&all, 0.25, 3), (train.clone(), val.clone()));
        assert_ne!(split(&all, 0.25, 4).1, val);
        assert!(train.tokens.values.windows(2).all(|w| w[0] <= w[1]));
    }
}
