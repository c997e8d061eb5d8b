//! What `evaluate` scores besides packed and preference data: raw text tokenized with the
//! model's own tokenizer, multiple-choice questions by the log-likelihood of each ending
//! (HellaSwag's JSONL: `ctx`, `endings`, `label`), and exact match of a greedy answer (GSM8K's
//! JSONL: `question`, `answer` with the number after `####`).

use std::path::PathBuf;

use engine::{Input, StageCtx, StageError};
use serde_json::{json, Value};

use crate::arrow_io::Blocks;
use crate::example_rows::Rows;
use crate::generate::{generate, GenOptions, LoadedModel};
use crate::nn::batch::IGNORE;
use crate::nn::sample::Sampling;
use crate::reference::sequence_logps;
use crate::text_source::read_utf8;

/// The model's ids for `text`, without special tokens.
pub fn encode(lm: &LoadedModel, text: &str) -> Result<Vec<u32>, StageError> {
    lm.tokenizer
        .encode_fast(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| StageError::msg(format!("encoding with the model's tokenizer: {e}")))
}

/// Documents as `pack` turns them into blocks: each followed by the end-of-text token, the
/// stream cut into windows of `t + 1` tokens starting every `t`, the last one padded with
/// end-of-text tokens that are never targets.
pub fn text_blocks<'a>(docs: impl Iterator<Item = &'a [u32]>, eot: u32, t: usize) -> Blocks {
    crate::pack::cut_blocks(&crate::pack::stream(docs, eot), t, true, eot).blocks
}

/// The JSONL files of a raw input, or of a directory, in sorted order.
fn jsonl_files(input: &Input) -> Result<Vec<PathBuf>, StageError> {
    let Input::Raw { path, .. } = input else {
        return Err(StageError::msg("a benchmark task reads a JSONL file or a directory of them"));
    };
    if path.is_file() {
        return Ok(vec![path.clone()]);
    }
    let files = engine::cache::list_files(path).map_err(|e| StageError::msg(e.to_string()))?;
    Ok(files.into_iter().map(|(_, file)| file).filter(|f| f.extension().is_some_and(|e| e == "jsonl")).collect())
}

/// One row of a benchmark file: its place for errors, and its fields.
struct Row {
    file: PathBuf,
    line: usize,
    value: Value,
}

impl Row {
    fn bad(&self, field: &str, what: &str) -> StageError {
        StageError::BadInput(format!("{}:{}: field `{field}` {what}", self.file.display(), self.line))
    }
    fn str(&self, field: &str) -> Result<&str, StageError> {
        match &self.value[field] {
            Value::String(s) => Ok(s),
            Value::Null => Err(self.bad(field, "is missing")),
            other => Err(self.bad(field, &format!("is {}, not a string", crate::text_source::kind_of(other)))),
        }
    }
}

fn read_rows(input: &Input, limit: Option<usize>) -> Result<Vec<Row>, StageError> {
    let mut rows = Vec::new();
    for file in jsonl_files(input)? {
        let text = read_utf8(&file)?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(line)
                .map_err(|e| StageError::BadInput(format!("{}:{}: not a JSON object: {e}", file.display(), i + 1)))?;
            if !value.is_object() {
                return Err(StageError::BadInput(format!("{}:{}: not a JSON object", file.display(), i + 1)));
            }
            rows.push(Row { file: file.clone(), line: i + 1, value });
            if limit.is_some_and(|l| rows.len() >= l) {
                return Ok(rows);
            }
        }
    }
    if rows.is_empty() {
        return Err(StageError::BadInput(format!("{} holds no rows", input.describe())));
    }
    Ok(rows)
}

/// One multiple-choice question read and checked.
struct Question {
    context: String,
    endings: Vec<String>,
    label: usize,
}

fn question(row: &Row) -> Result<Question, StageError> {
    let context = row.str("ctx")?.to_string();
    let Some(list) = row.value["endings"].as_array() else {
        return Err(row.bad("endings", "is not a list of strings"));
    };
    let endings = list
        .iter()
        .map(|e| {
            e.as_str().map(str::to_string).ok_or_else(|| row.bad("endings", "holds something other than a string"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if endings.len() < 2 {
        return Err(row.bad("endings", "needs at least two endings"));
    }
    let label = match &row.value["label"] {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    };
    let label = label.map(|l| l as usize).filter(|l| *l < endings.len());
    let Some(label) = label else {
        return Err(row.bad("label", &format!("is not an ending's index (0 to {})", endings.len() - 1)));
    };
    Ok(Question { context, endings, label })
}

/// The summed log-probability of each ending given its context and the ending's length in
/// bytes, for every question, scored in batches of `batch` sequences. A sequence longer than
/// the model's block size loses context tokens from its start.
fn ending_logps(
    ctx: &StageCtx<'_>,
    lm: &LoadedModel,
    questions: &[Question],
    batch: usize,
) -> Result<Vec<Vec<(f64, usize)>>, StageError> {
    let block = lm.cfg().block_size;
    let mut seqs: Vec<(Vec<u32>, usize)> = Vec::new();
    for q in questions {
        let mut context = vec![lm.eot];
        context.extend(encode(lm, &q.context)?);
        for ending in &q.endings {
            let cont = encode(lm, &format!(" {ending}"))?;
            let mut ids = context.clone();
            ids.extend(&cont);
            let cut = ids.len().saturating_sub(block + 1).min(context.len() - 1);
            seqs.push((ids[cut..].to_vec(), context.len() - cut));
        }
    }
    let t = seqs.iter().map(|(ids, _)| ids.len() - 1).max().unwrap_or(1).clamp(1, block);
    let mut rows = Rows {
        t,
        rows: seqs.len(),
        ids: vec![lm.eot; seqs.len() * t],
        targets: vec![IGNORE; seqs.len() * t],
        pos: Vec::with_capacity(seqs.len() * t),
    };
    for (r, (ids, context)) in seqs.iter().enumerate() {
        let n = (ids.len() - 1).min(t);
        rows.ids[r * t..r * t + n].copy_from_slice(&ids[..n]);
        for i in context - 1..n {
            rows.targets[r * t + i] = ids[i + 1];
        }
        rows.pos.extend(0..t as u32);
    }
    let progress = ctx.progress();
    progress.set_length(rows.rows as u64, "endings");
    let scored = sequence_logps(&lm.model, &lm.params, &rows, batch, |done| {
        progress.set_position(done as u64);
        ctx.check_cancelled()
    })?;
    let mut out = Vec::with_capacity(questions.len());
    let mut next = 0;
    for q in questions {
        let row: Vec<(f64, usize)> =
            q.endings.iter().enumerate().map(|(i, e)| (scored.logps[next + i], format!(" {e}").len())).collect();
        next += q.endings.len();
        out.push(row);
    }
    Ok(out)
}

/// The ending of highest log-likelihood, and of highest log-likelihood per byte (the first
/// of equals), from each ending's (log-likelihood, bytes).
pub fn picks(scores: &[(f64, usize)]) -> (usize, usize) {
    let best = |key: &dyn Fn(&(f64, usize)) -> f64| {
        (0..scores.len()).fold(0, |best, i| if key(&scores[i]) > key(&scores[best]) { i } else { best })
    };
    (best(&|s| s.0), best(&|s| s.0 / s.1.max(1) as f64))
}

/// Multiple choice: accuracy picking the ending of highest log-likelihood, and picking by
/// log-likelihood per byte of the ending (`acc_norm`), against chance (one over the endings).
pub fn multiple_choice(
    ctx: &StageCtx<'_>,
    lm: &LoadedModel,
    input: &Input,
    limit: Option<usize>,
    batch: usize,
) -> Result<(Value, engine::Metrics), StageError> {
    let questions = read_rows(input, limit)?.iter().map(question).collect::<Result<Vec<_>, _>>()?;
    let logps = ending_logps(ctx, lm, &questions, batch)?;
    let (mut plain, mut normalized, mut chance) = (0usize, 0usize, 0.0);
    let mut details = Vec::new();
    for (q, scores) in questions.iter().zip(&logps) {
        let (a, b) = picks(scores);
        plain += usize::from(a == q.label);
        normalized += usize::from(b == q.label);
        chance += 1.0 / q.endings.len() as f64;
        details.push(json!({
            "label": q.label,
            "pick": a,
            "pick_normalized": b,
            "logps": scores.iter().map(|s| crate::round(s.0, 4)).collect::<Vec<_>>(),
        }));
    }
    let n = questions.len() as f64;
    let (accuracy, accuracy_norm, chance) = (plain as f64 / n, normalized as f64 / n, chance / n);
    let results = json!({
        "task": "multiple_choice",
        "questions": questions.len(),
        "accuracy": accuracy,
        "accuracy_normalized": accuracy_norm,
        "chance": chance,
        "details": details,
    });
    let metrics = engine::Metrics::from([
        ("questions".into(), json!(questions.len())),
        ("mc_accuracy".into(), json!(crate::round(accuracy, 4))),
        ("mc_accuracy_normalized".into(), json!(crate::round(accuracy_norm, 4))),
        ("mc_chance".into(), json!(crate::round(chance, 4))),
    ]);
    Ok((results, metrics))
}

/// The number a GSM8K answer ends with: after its last `####`, else its last number; commas,
/// a leading `$` or `+` and a trailing `.` dropped, so `$1,000.` and `1000` agree.
pub fn final_number(text: &str) -> Option<String> {
    let tail = match text.rfind("####") {
        Some(i) => &text[i + 4..],
        None => text,
    };
    let mut numbers = Vec::new();
    let mut current = String::new();
    for c in tail.chars().chain(std::iter::once(' ')) {
        let continues =
            c.is_ascii_digit() || (c == ',' || c == '.') && !current.is_empty() || c == '-' && current.is_empty();
        if continues {
            current.push(c);
        } else if !current.is_empty() {
            numbers.push(std::mem::take(&mut current));
        }
    }
    let n = if text.contains("####") { numbers.into_iter().next() } else { numbers.pop() }?;
    let n = n.replace(',', "");
    let n = n.trim_end_matches('.');
    (n.chars().any(|c| c.is_ascii_digit())).then(|| n.to_string())
}

/// The prompt a GSM8K question becomes.
pub fn math_prompt(question: &str) -> String {
    format!("Question: {question}\nAnswer:")
}

/// Exact match: the share of questions whose greedy answer ends with the reference's number.
pub fn exact_match(
    ctx: &StageCtx<'_>,
    lm: &LoadedModel,
    input: &Input,
    limit: Option<usize>,
    max_new_tokens: usize,
) -> Result<(Value, engine::Metrics), StageError> {
    let rows = read_rows(input, limit)?;
    let mut checked = Vec::with_capacity(rows.len());
    for row in &rows {
        let question = row.str("question")?;
        let answer = row.str("answer")?;
        let Some(reference) = final_number(answer) else {
            return Err(row.bad("answer", "has no number after `####`"));
        };
        checked.push((question.to_string(), reference));
    }
    let progress = ctx.progress();
    progress.set_length(checked.len() as u64, "questions");
    let opts = GenOptions {
        sampling: Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 },
        max_new_tokens,
        seed: 0,
        stop_at_eot: true,
    };
    let (mut right, mut details) = (0usize, Vec::new());
    for (i, (question, reference)) in checked.iter().enumerate() {
        ctx.check_cancelled()?;
        let text = generate(lm, &math_prompt(question), opts, |_| {})?;
        let predicted = final_number(&text);
        let correct = predicted.as_deref() == Some(reference.as_str());
        right += usize::from(correct);
        details.push(json!({ "reference": reference, "predicted": predicted, "correct": correct, "text": text }));
        progress.set_position(i as u64 + 1);
    }
    let accuracy = right as f64 / checked.len() as f64;
    let results =
        json!({ "task": "exact_match", "questions": checked.len(), "exact_match": accuracy, "details": details });
    let metrics = engine::Metrics::from([
        ("questions".into(), json!(checked.len())),
        ("exact_match".into(), json!(crate::round(accuracy, 4))),
    ]);
    Ok((results, metrics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_number_of_an_answer() {
        assert_eq!(final_number("She makes 9 * 2 = $18 every day.\n#### 18").as_deref(), Some("18"));
        assert_eq!(final_number("#### 1,000").as_deref(), Some("1000"));
        assert_eq!(final_number("so it is -3.5.").as_deref(), Some("-3.5"));
        assert_eq!(final_number("First 4, then 12 apples.").as_deref(), Some("12"));
        assert_eq!(final_number("no number here"), None);
        assert_eq!(final_number("#### 7 and then 9").as_deref(), Some("7"), "the number right after ####");
    }

    #[test]
    fn multiple_choice_picks_by_likelihood_and_by_likelihood_per_byte() {
        // A short ending of -4 nats over 2 bytes against a long one of -6 over 10: the plain
        // score takes the short one, per byte (-2 against -0.6) the long one.
        assert_eq!(picks(&[(-4.0, 2), (-6.0, 10)]), (0, 1));
        assert_eq!(picks(&[(-10.0, 5), (-8.0, 20), (-9.0, 3)]), (1, 1));
        assert_eq!(picks(&[(-3.0, 3), (-3.0, 3)]), (0, 0), "ties go to the first");
    }

    #[test]
    fn text_is_cut_into_blocks_as_pack_cuts_it() {
        let docs = [vec![1, 2, 3], vec![4, 5]];
        // Stream 1 2 3 E 4 5 E with E = 9: windows of 3 every 2 tokens, the last one padded.
        let b = text_blocks(docs.iter().map(Vec::as_slice), 9, 2);
        assert_eq!(b.tokens, [1, 2, 3, 3, 9, 4, 4, 5, 9]);
        assert_eq!((b.width, b.padding), (3, 0));
        let b = text_blocks([&[1, 2, 3, 4][..]].into_iter(), 9, 2);
        assert_eq!(b.tokens, [1, 2, 3, 3, 4, 9]);
        let b = text_blocks([&[1, 2, 3, 4, 5][..]].into_iter(), 9, 2);
        assert_eq!(b.tokens, [1, 2, 3, 3, 4, 5, 5, 9, 9]);
        assert_eq!(b.padding, 1);
    }
}
