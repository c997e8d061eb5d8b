//! `preferences`: read preference pairs (a prompt, a chosen and a rejected response), or
//! unpaired examples for KTO (a prompt, a completion and a desirable/undesirable label), and
//! tokenize them with the policy model's tokenizer, split into train and validation.
//!
//! Formats: HH-RLHF JSONL (`chosen` and `rejected` are whole transcripts; the prompt is the
//! text up to the last "\n\nAssistant:" the two share), JSONL or a JSON array with `prompt`
//! (or `instruction` and an optional `input`), `chosen` and `rejected`, and Parquet with string
//! columns of those names; unpaired examples as JSON, JSONL or Parquet rows with `prompt`,
//! `completion` and a boolean `label`. With a `template` (as `instructions` takes), the prompt is rendered
//! through it.
//!
//! Each pair becomes two sequences, chosen then rejected, in `instructions`' layout (token ids
//! and a loss mask that is 1 on the response and its end-of-text token); an unpaired example
//! becomes one. `labels.json` holds each sequence's label (a pair's chosen is desirable, its
//! rejected undesirable), which KTO reads. A prompt longer than
//! `max_prompt_length` tokens keeps its end; a response that does not fit `max_length` keeps
//! its start; both are counted. Pairs with an empty or identical response are skipped and
//! counted. Bad rows stop the stage with exit code 2, naming the file, the row and the field.

use std::collections::BTreeSet;
use std::path::Path;

use arrow::array::AsArray;
use engine::{Accepts, Input, InputSpec, Metrics, ParamProblem, ParamSpec, Params, Stage, StageCtx, StageError};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::arrow_io::{write_examples, Examples, TokenMeta};
use crate::instructions::{Template, TEMPLATE_FILE};
use crate::model_io::{load_config_with_eot, TOKENIZER};
use crate::nn::rng::SplitMix64;
use crate::text_source::{kind_of, read_utf8, strings, StringTable};
use crate::{fail, MODEL, PREFERENCES};

pub struct Preferences;

pub const TRAIN_FILE: &str = "train.arrow";
pub const VAL_FILE: &str = "val.arrow";
/// Whether the data is pairs, and every sequence's label (1 desirable, 0 undesirable).
pub const LABELS_FILE: &str = "labels.json";

/// What marks the start of the assistant's turn in an HH-RLHF transcript.
const ASSISTANT: &str = "\n\nAssistant:";

const PARAMS: &[ParamSpec] = &[
    ParamSpec::choice(
        "format",
        "auto",
        &["auto", "json", "jsonl", "parquet"],
        "`auto` (by extension), a `json` array, `jsonl` (HH-RLHF transcripts when rows have no prompt), or `parquet`",
    ),
    ParamSpec::string(
        "template",
        None,
        "a template with {instruction}, {input} and {response}, or `alpaca` (default: the prompt as written)",
    ),
    ParamSpec::opt_int("max_length", 2, 1 << 20, "tokens per sequence, prompt and response (default: block size + 1)"),
    ParamSpec::opt_int(
        "max_prompt_length",
        1,
        1 << 20,
        "tokens of prompt kept, from its end (default: max_length / 2)",
    ),
    ParamSpec::float("val_fraction", 0.1, 0.0, 0.9, "share of pairs held out for validation (seeded)"),
];

const INPUTS: &[InputSpec] = &[
    InputSpec {
        name: "model",
        accepts: Accepts::Artifact(&[MODEL]),
        required: true,
        doc: "the policy model whose tokenizer encodes the pairs",
    },
    InputSpec { name: "input", accepts: Accepts::Raw, required: true, doc: "a JSON, JSONL or Parquet file" },
];

/// One row as read: the prompt's parts and a pair of responses, or one labelled completion.
#[derive(Clone, Debug, PartialEq)]
pub struct PairRow {
    pub instruction: String,
    pub input: String,
    pub responses: Responses,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Responses {
    Pair {
        chosen: String,
        rejected: String,
    },
    /// KTO's unpaired example: a completion and whether it is desirable.
    Single {
        completion: String,
        desirable: bool,
    },
}

/// Every sequence's label, and whether the sequences come in pairs.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Labels {
    pub paired: bool,
    pub train: Vec<u8>,
    pub val: Vec<u8>,
}

impl Labels {
    pub fn read(dir: &Path) -> Result<Labels, StageError> {
        let path = dir.join(LABELS_FILE);
        let bytes = std::fs::read(&path).map_err(|e| fail(format!("reading `{}`", path.display()))(&e))?;
        serde_json::from_slice(&bytes).map_err(|e| fail(format!("reading `{}`", path.display()))(&e))
    }
}

/// Each sequence's prompt followed by the response of another, for KTO's KL estimate: sequence
/// i takes the response of sequence i + `shift` (wrapping), `shift` being 2 for pairs (the next
/// pair's response on the same side) and 1 otherwise, cut to `max_len` tokens.
pub fn mismatched(examples: &Examples, paired: bool, max_len: usize) -> Examples {
    let n = examples.len();
    let shift = if paired { 2 } else { 1 };
    let mut out = Examples::default();
    for i in 0..n {
        let (ids, mask) = examples.example(i);
        let prompt = mask.iter().position(|m| *m == 1).unwrap_or(ids.len());
        let (other, other_mask) = examples.example((i + shift) % n);
        let start = other_mask.iter().position(|m| *m == 1).unwrap_or(other.len());
        let room = max_len.saturating_sub(prompt).max(1);
        let response = &other[start..other.len().min(start + room)];
        let keep = prompt.min(max_len - response.len());
        let seq = [&ids[prompt - keep..prompt], response].concat();
        let seq_mask = [vec![0; keep], vec![1; response.len()]].concat();
        out.push(&seq, &seq_mask);
    }
    out
}

/// One encoded sequence: token ids, loss mask and label (1 desirable).
type Sequence = (Vec<u32>, Vec<u32>, u8);

/// What reading and encoding skipped or cut.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Counts {
    empty: usize,
    identical: usize,
    prompts_truncated: usize,
    responses_truncated: usize,
}

impl Stage for Preferences {
    fn kind(&self) -> &'static str {
        "preferences"
    }
    fn version(&self) -> u32 {
        2 // 2: labels.json, unpaired examples
    }
    fn about(&self) -> &'static str {
        "read preference pairs (HH-RLHF, JSON, JSONL, Parquet) and tokenize them with the policy's tokenizer"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn inputs(&self) -> &'static [InputSpec] {
        INPUTS
    }
    fn output(&self) -> engine::ArtifactType {
        PREFERENCES
    }
    fn vocabulary(&self) -> engine::Vocabulary {
        engine::Vocabulary::From("model")
    }
    fn uses_seed(&self) -> bool {
        true
    }
    fn check(&self, p: &Params, _connected: &BTreeSet<&str>) -> Result<(), ParamProblem> {
        if let Some(t) = p.opt_str("template") {
            Template::parse(t).map_err(|e| ParamProblem::new("template", e))?;
        }
        if let (Some(len), Some(prompt)) = (p.opt_usize("max_length"), p.opt_usize("max_prompt_length")) {
            if prompt >= len {
                return Err(ParamProblem::new(
                    "max_prompt_length",
                    format!("max_prompt_length {prompt} leaves no room for a response in max_length {len}"),
                ));
            }
        }
        Ok(())
    }

    fn run(&self, ctx: &StageCtx<'_>) -> Result<Metrics, StageError> {
        let (Input::Artifact { artifact: model, .. }, Input::Raw { path, .. }) =
            (ctx.required_input("model"), ctx.required_input("input"))
        else {
            unreachable!("`model` accepts artifacts, `input` raw files");
        };
        let p = ctx.params();
        let template = p.opt_str("template").map(Template::parse).transpose().map_err(StageError::msg)?;
        let (cfg, eot) = load_config_with_eot(&model.dir)?;
        let max_len = p.opt_usize("max_length").unwrap_or(cfg.block_size + 1).min(cfg.block_size + 1);
        let max_prompt = p.opt_usize("max_prompt_length").unwrap_or(max_len / 2).min(max_len - 1);
        let tok_path = model.path(TOKENIZER);
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| {
            StageError::msg(format!("`{}` is not a Hugging Face tokenizer.json: {e}", tok_path.display()))
        })?;
        let rows = read_pairs(path, p.str("format"))?;
        ctx.check_cancelled()?;
        ctx.progress().set_length(rows.len() as u64, "pairs");
        let encode = |text: &str| -> Result<Vec<u32>, StageError> {
            tokenizer.encode_fast(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| fail("encoding")(&*e))
        };
        let mut counts = Counts::default();
        let paired = matches!(rows[0].responses, Responses::Pair { .. });
        // Per usable row: its sequences with their labels.
        let mut groups: Vec<Vec<Sequence>> = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let responses: Vec<(&str, u8)> = match &row.responses {
                Responses::Pair { chosen, rejected } if paired => {
                    if chosen.trim().is_empty() || rejected.trim().is_empty() {
                        counts.empty += 1;
                        continue;
                    }
                    if chosen == rejected {
                        counts.identical += 1;
                        continue;
                    }
                    vec![(chosen, 1), (rejected, 0)]
                }
                Responses::Single { completion, desirable } if !paired => {
                    if completion.trim().is_empty() {
                        counts.empty += 1;
                        continue;
                    }
                    vec![(completion, u8::from(*desirable))]
                }
                _ => {
                    return Err(StageError::bad_input(format!(
                    "`{}` row {}: pairs (`chosen`, `rejected`) and unpaired examples (`completion`, `label`) are mixed",
                    path.display(),
                    i + 1
                )))
                }
            };
            let render = |response: &str| match &template {
                Some(t) => t.render(&row.instruction, &row.input, response),
                None if row.input.is_empty() => (row.instruction.clone(), response.to_string()),
                None => (format!("{}\n\n{}", row.instruction, row.input), response.to_string()),
            };
            let mut prompt_ids = encode(&render("").0)?;
            if prompt_ids.len() > max_prompt {
                prompt_ids.drain(..prompt_ids.len() - max_prompt);
                counts.prompts_truncated += 1;
            }
            let mut group = Vec::new();
            for (response, label) in responses {
                let mut response = encode(&render(response).1)?;
                response.push(eot);
                let room = max_len - prompt_ids.len();
                if response.len() > room {
                    response.truncate(room);
                    counts.responses_truncated += 1;
                }
                if let Some(bad) = prompt_ids.iter().chain(&response).find(|id| **id as usize >= cfg.vocab_size) {
                    return Err(StageError::msg(format!(
                        "row {} encodes to token {bad}, outside the model's vocabulary of {}",
                        i + 1,
                        cfg.vocab_size
                    )));
                }
                let mask = [vec![0; prompt_ids.len()], vec![1; response.len()]].concat();
                group.push(([prompt_ids.clone(), response].concat(), mask, label));
            }
            groups.push(group);
            if i % 256 == 0 {
                ctx.check_cancelled()?;
                ctx.progress().set_position(i as u64);
            }
        }
        if groups.len() < 2 {
            return Err(StageError::bad_input(format!(
                "`{}` holds {} usable rows: at least 2 are needed",
                path.display(),
                groups.len()
            )));
        }
        let n_val = ((groups.len() as f64) * p.float("val_fraction")).round() as usize;
        let mut order: Vec<u32> = (0..groups.len() as u32).collect();
        SplitMix64::new(ctx.seed() ^ 0x5052_4546_5350_4C54).shuffle(&mut order);
        let held: BTreeSet<u32> = order[..n_val.min(groups.len() - 1)].iter().copied().collect();
        let (mut train, mut val) = (Examples::default(), Examples::default());
        let mut labels = Labels { paired, train: Vec::new(), val: Vec::new() };
        for (i, group) in groups.iter().enumerate() {
            let (split, split_labels) =
                if held.contains(&(i as u32)) { (&mut val, &mut labels.val) } else { (&mut train, &mut labels.train) };
            for (ids, mask, label) in group {
                split.push(ids, mask);
                split_labels.push(*label);
            }
        }
        let text = serde_json::to_string(&labels).expect("labels serialize") + "\n";
        std::fs::write(ctx.out(LABELS_FILE), text).map_err(|e| fail("writing labels.json")(&e))?;
        write_examples(&ctx.out(TRAIN_FILE), &train)?;
        write_examples(&ctx.out(VAL_FILE), &val)?;
        TokenMeta { vocab_size: cfg.vocab_size as u32, eot_id: eot, seq_len: Some(max_len - 1) }
            .write(ctx.out_dir())?;
        std::fs::copy(&tok_path, ctx.out(TOKENIZER)).map_err(|e| fail("copying tokenizer.json")(&e))?;
        if let Some(template) = &template {
            let text = serde_json::to_string_pretty(template).expect("template serializes") + "\n";
            std::fs::write(ctx.out(TEMPLATE_FILE), text).map_err(|e| fail("writing template.json")(&e))?;
        }
        let longest = groups.iter().flatten().map(|(ids, _, _)| ids.len()).max().unwrap_or(0);
        let (rows_name, per) = if paired { ("pairs", 2) } else { ("examples", 1) };
        Ok(Metrics::from([
            (rows_name.into(), json!(groups.len())),
            (format!("train_{rows_name}"), json!(train.len() / per)),
            (format!("val_{rows_name}"), json!(val.len() / per)),
            ("desirable".into(), json!(labels.train.iter().chain(&labels.val).filter(|l| **l == 1).count())),
            ("skipped_empty".into(), json!(counts.empty)),
            ("skipped_identical".into(), json!(counts.identical)),
            ("prompts_truncated".into(), json!(counts.prompts_truncated)),
            ("responses_truncated".into(), json!(counts.responses_truncated)),
            ("max_len".into(), json!(longest)),
        ]))
    }
}

/// Every pair of the file, in order.
pub fn read_pairs(path: &Path, format: &str) -> Result<Vec<PairRow>, StageError> {
    let ext = path.extension().and_then(|e| e.to_str());
    let format = match (format, ext) {
        ("auto", Some("json")) => "json",
        ("auto", Some("jsonl" | "ndjson")) => "jsonl",
        ("auto", Some("parquet")) => "parquet",
        ("auto", _) => {
            return Err(StageError::bad_input(format!(
                "`{}`: cannot tell the format from the extension; set `format`",
                path.display()
            )))
        }
        (f, _) => f,
    };
    let rows = match format {
        "parquet" => read_parquet(path)?,
        "json" => {
            let text = read_utf8(path).map_err(|e| StageError::bad_input(e.to_string()))?;
            let value: Value = serde_json::from_str(&text)
                .map_err(|e| StageError::bad_input(format!("`{}`: not valid JSON: {e}", path.display())))?;
            let Value::Array(items) = value else {
                return Err(StageError::bad_input(format!("`{}`: expected a JSON array of pairs", path.display())));
            };
            let at = |i: usize| format!("`{}` row {}", path.display(), i + 1);
            items.iter().enumerate().map(|(i, v)| pair_of(v, &at(i))).collect::<Result<_, _>>()?
        }
        _ => {
            let text = read_utf8(path).map_err(|e| StageError::bad_input(e.to_string()))?;
            let mut rows = Vec::new();
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let at = format!("`{}` line {}", path.display(), i + 1);
                let value: Value = serde_json::from_str(line)
                    .map_err(|e| StageError::bad_input(format!("{at}: not valid JSON: {e}")))?;
                rows.push(pair_of(&value, &at)?);
            }
            rows
        }
    };
    if rows.is_empty() {
        return Err(StageError::bad_input(format!("`{}` holds no pairs", path.display())));
    }
    Ok(rows)
}

/// One JSON row as a pair, or as an unpaired example when it has a `completion`; `at` names
/// the file and row for errors. A pair without a prompt is an HH-RLHF pair of transcripts.
fn pair_of(v: &Value, at: &str) -> Result<PairRow, StageError> {
    let Some(object) = v.as_object() else {
        return Err(StageError::bad_input(format!("{at}: expected a JSON object")));
    };
    let string = |name: &str| -> Result<Option<String>, StageError> {
        match object.get(name) {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Null) | None => Ok(None),
            Some(other) => {
                Err(StageError::bad_input(format!("{at}: field `{name}` is {}, not a string", kind_of(other))))
            }
        }
    };
    let required =
        |name: &str| string(name)?.ok_or_else(|| StageError::bad_input(format!("{at}: missing field `{name}`")));
    if object.contains_key("completion") {
        let desirable = match object.get("label") {
            Some(Value::Bool(b)) => *b,
            None => return Err(StageError::bad_input(format!("{at}: missing field `label`"))),
            Some(other) => {
                return Err(StageError::bad_input(format!("{at}: field `label` is {}, not a boolean", kind_of(other))))
            }
        };
        return Ok(PairRow {
            instruction: required("prompt")?,
            input: String::new(),
            responses: Responses::Single { completion: required("completion")?, desirable },
        });
    }
    let (chosen, rejected) = (required("chosen")?, required("rejected")?);
    if let Some(prompt) = string("prompt")?.or(string("instruction")?) {
        let input = string("input")?.unwrap_or_default();
        return Ok(PairRow { instruction: prompt, input, responses: Responses::Pair { chosen, rejected } });
    }
    split_transcripts(&chosen, &rejected)
        .ok_or_else(|| {
            StageError::bad_input(format!(
                "{at}: no field `prompt`, and `chosen` and `rejected` share no \"\\n\\nAssistant:\" to split a transcript at"
            ))
        })
        .map(|(prompt, chosen, rejected)| PairRow {
            instruction: prompt,
            input: String::new(),
            responses: Responses::Pair { chosen, rejected },
        })
}

/// An HH-RLHF pair of transcripts as (prompt, chosen reply, rejected reply): the prompt runs to
/// the end of the last "\n\nAssistant:" that both transcripts share.
pub fn split_transcripts(chosen: &str, rejected: &str) -> Option<(String, String, String)> {
    let common = chosen.bytes().zip(rejected.bytes()).take_while(|(a, b)| a == b).count();
    let mut shared = &chosen[..common];
    // The shared prefix must end on a character boundary of both; back off to one.
    while !chosen.is_char_boundary(shared.len()) || !rejected.is_char_boundary(shared.len()) {
        shared = &shared[..shared.len() - 1];
    }
    let end = shared.rfind(ASSISTANT)? + ASSISTANT.len();
    Some((chosen[..end].to_string(), chosen[end..].to_string(), rejected[end..].to_string()))
}

/// The rows of a Parquet file with string columns `prompt`, `chosen` and `rejected`, or
/// unpaired: `prompt` and `completion` with a boolean `label`.
fn read_parquet(path: &Path) -> Result<Vec<PairRow>, StageError> {
    let table = StringTable::open(path)?;
    let unpaired = table.names.iter().any(|n| n == "completion");
    let column = |name: &str| table.column(name, true).map(|c| c.expect("a required column"));
    let columns = if unpaired {
        [column("prompt")?, column("completion")?, table.bool_column("label")?]
    } else {
        [column("prompt")?, column("chosen")?, column("rejected")?]
    };
    let mut rows = Vec::new();
    for batch in table.batches() {
        let batch = batch?;
        let [prompts, seconds] = [columns[0], columns[1]].map(|i| strings(batch.column(i).as_ref()));
        // The third column: the rejected responses, or the labels.
        let (rejected, labels): (Vec<Option<String>>, Vec<Option<bool>>) = if unpaired {
            (vec![None; batch.num_rows()], batch.column(columns[2]).as_boolean().iter().collect())
        } else {
            (strings(batch.column(columns[2]).as_ref()), vec![None; batch.num_rows()])
        };
        for (((prompt, second), rejected), label) in prompts.into_iter().zip(seconds).zip(rejected).zip(labels) {
            let at = format!("`{}` row {}", path.display(), rows.len() + 1);
            let null = |name: &str| StageError::bad_input(format!("{at}: field `{name}` is null"));
            let field = |v: Option<String>, name: &str| v.ok_or_else(|| null(name));
            let responses = if unpaired {
                let desirable = label.ok_or_else(|| null("label"))?;
                Responses::Single { completion: field(second, "completion")?, desirable }
            } else {
                Responses::Pair { chosen: field(second, "chosen")?, rejected: field(rejected, "rejected")? }
            };
            rows.push(PairRow { instruction: field(prompt, "prompt")?, input: String::new(), responses });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcripts_split_at_the_last_shared_assistant_turn() {
        let c = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help?\n\nAssistant: Sure.";
        let r = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help?\n\nAssistant: No.";
        let (prompt, chosen, rejected) = split_transcripts(c, r).unwrap();
        assert_eq!(prompt, "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help?\n\nAssistant:");
        assert_eq!((chosen.as_str(), rejected.as_str()), (" Sure.", " No."));
        assert_eq!(split_transcripts("\n\nHuman: a", "\n\nHuman: b"), None);
    }

    #[test]
    fn rows_name_the_file_the_row_and_the_field() {
        let bad = |v: Value| pair_of(&v, "`p.jsonl` line 3").unwrap_err().to_string();
        assert_eq!(bad(json!({"prompt": "x", "chosen": "a"})), "`p.jsonl` line 3: missing field `rejected`");
        assert_eq!(
            bad(json!({"prompt": "x", "chosen": 1, "rejected": "b"})),
            "`p.jsonl` line 3: field `chosen` is a number, not a string"
        );
        assert!(bad(json!({"chosen": "a", "rejected": "b"})).contains("no field `prompt`"));
        let ok = pair_of(&json!({"instruction": "i", "input": "x", "chosen": "a", "rejected": "b"}), "").unwrap();
        assert_eq!((ok.instruction.as_str(), ok.input.as_str()), ("i", "x"));
    }
}
