//! `evaluate`: a model's validation loss, perplexity and bits per byte on a packed split, and
//! samples from given prompts; or, on instruction examples, the loss of the held-out responses
//! and the model's answers to held-out instructions; or, on preference pairs, how often the
//! model prefers the chosen response (by summed and by length-normalised log-probability) and,
//! given a reference, how often its implicit reward (the log-ratio to the reference) does.
//!
//! Bits per byte divide the total loss (in bits) by the UTF-8 length of the text the predicted
//! tokens decode to (special tokens count zero bytes), so models with different tokenizers
//! compare on the same footing.

use engine::{Accepts, Input, InputSpec, Metrics, ParamProblem, ParamSpec, Params, Stage, StageCtx, StageError};
use serde_json::json;
use std::collections::BTreeMap;

use crate::arrow_io::read_blocks;
use crate::arrow_io::read_examples;
use crate::batches::{mean_loss, stream_of};
use crate::example_rows::{rows_loss, Layout};
use crate::generate::{generate_with_draft, sampling, Draft, GenOptions, LoadedModel, SpecStats};
use crate::instructions::VAL_FILE as EXAMPLES_VAL_FILE;
use crate::model_io::require_same_tokenizer;
use crate::nn::batch::IGNORE;
use crate::nn::model::Activations;
use crate::pack::VAL_FILE;
use crate::preferences::VAL_FILE as PREFERENCES_VAL_FILE;
use crate::reference::{load_reference, sequence_logps, PrefSplit, SeqLogps};
use crate::{fail, round, EVAL, EXAMPLES, MODEL, PACKED, PREFERENCES, QUANTIZED_MODEL, REFERENCE, TEXT};

pub struct Evaluate;

pub const RESULTS_FILE: &str = "eval.json";

const PARAMS: &[ParamSpec] = &[
    ParamSpec::int("batch_size", 16, 1, 1 << 20, "validation blocks per forward pass").not_hashed(),
    ParamSpec::opt_int(
        "max_batches",
        1,
        1 << 40,
        "evaluate only the first this many batches (default: the whole split)",
    ),
    ParamSpec::str_list("prompts", &[""], "texts to continue; an empty prompt starts from the end-of-text token"),
    ParamSpec::int("max_new_tokens", 200, 0, 1 << 20, "tokens generated per prompt"),
    ParamSpec::float("temperature", 0.8, 0.0, 100.0, "sampling temperature (0: greedy)"),
    ParamSpec::int("top_k", 200, 0, 1 << 30, "sample among the k most likely tokens (0: all)"),
    ParamSpec::float("top_p", 1.0, 0.0, 1.0, "sample among the most likely tokens whose probability reaches top_p"),
    ParamSpec::bool("stop_at_eot", true, "end a sample at the end-of-text token"),
    ParamSpec::int("draft_tokens", 4, 1, 64, "with a `draft`: tokens it proposes per verification"),
    ParamSpec::choice(
        "task",
        "auto",
        &["auto", "loss", "multiple_choice", "exact_match"],
        "`loss` of the data (`auto`); `multiple_choice` (JSONL rows `ctx`, `endings`, `label`) or `exact_match` (JSONL rows `question`, `answer` ending `#### N`)",
    ),
    ParamSpec::choice(
        "format",
        "auto",
        crate::text_source::FORMAT_CHOICES,
        "raw text data: its format; `auto` goes by file extension",
    ),
    ParamSpec::string("field", Some("text"), "raw text data: the JSONL field or Parquet column holding the text"),
    ParamSpec::opt_int("max_examples", 1, 1 << 40, "benchmark tasks: score only the first this many rows"),
    ParamSpec::int(
        "instruction_samples",
        3,
        0,
        1 << 20,
        "with instruction examples: answer this many held-out instructions (their prompts, template applied)",
    ),
];

const INPUTS: &[InputSpec] = &[
    InputSpec {
        name: "model",
        accepts: Accepts::Artifact(&[MODEL, QUANTIZED_MODEL]),
        required: true,
        doc: "a model stage (`pretrain`, `sft`, ..., or `quantize`)",
    },
    InputSpec {
        name: "data",
        accepts: Accepts::RawOrArtifact(&[PACKED, EXAMPLES, PREFERENCES, TEXT]),
        required: true,
        doc: "a `pack`, `instructions` (responses only) or `preferences` stage, whose validation split is evaluated; raw text (a file, a directory, JSONL or Parquet, or a `corpus` stage), tokenized with the model's tokenizer; or a benchmark's JSONL file (see `task`)",
    },
    InputSpec {
        name: "draft",
        accepts: Accepts::Artifact(&[MODEL, QUANTIZED_MODEL]),
        required: false,
        doc: "a smaller model with the same tokenizer: samples are decoded speculatively (same text at greedy)",
    },
    InputSpec {
        name: "reference",
        accepts: Accepts::Artifact(&[REFERENCE]),
        required: false,
        doc: "with preference data: a `reference` stage over it, for the implicit-reward accuracy",
    },
];

impl Stage for Evaluate {
    fn kind(&self) -> &'static str {
        "evaluate"
    }
    fn version(&self) -> u32 {
        7 // 2: attention dot products in eight partial sums; 3: attention as matrix products; 4: exp without libm in GELU and SiLU; 5: attention in query blocks with exp_fast, norm statistics in four f64 lanes; 6: decoding multiplies a few rows without packing (gemv); 7: decoding attends with exp_fast
    }
    fn about(&self) -> &'static str {
        "validation loss, perplexity and bits per byte of a model, and samples from prompts"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn inputs(&self) -> &'static [InputSpec] {
        INPUTS
    }
    fn output(&self) -> engine::ArtifactType {
        EVAL
    }
    fn same_vocabulary(&self) -> &'static [&'static str] {
        &["model", "data", "reference", "draft"]
    }
    fn uses_seed(&self) -> bool {
        true
    }
    /// Packed blocks longer than the model's block size are refused before anything runs,
    /// when both stages tell their lengths.
    fn check_shapes(&self, _: &Params, upstream: &BTreeMap<&str, &serde_json::Value>) -> Result<(), ParamProblem> {
        let told = |slot, key| crate::told(upstream, slot, key);
        match (told("data", "seq_len"), told("model", "block_size")) {
            (Some(t), Some(block_size)) if t > block_size => {
                Err(ParamProblem::new("data", blocks_too_long(t, block_size)))
            }
            _ => Ok(()),
        }
    }

    fn run(&self, ctx: &StageCtx<'_>) -> Result<Metrics, StageError> {
        let Input::Artifact { artifact: model_dir, stage: model_stage, .. } = ctx.required_input("model") else {
            unreachable!("`model` accepts only artifacts");
        };
        let p = ctx.params();
        let lm = LoadedModel::load(&model_dir.dir)?;
        let data_input = ctx.required_input("data");
        match (p.str("task"), data_input) {
            ("multiple_choice" | "exact_match", Input::Raw { .. }) => return evaluate_task(ctx, &lm, data_input),
            ("multiple_choice" | "exact_match", _) => {
                return Err(StageError::msg(format!(
                    "task `{}` reads a benchmark's JSONL file, and `data` is {}: give it the file's path",
                    p.str("task"),
                    data_input.describe()
                )))
            }
            (_, Input::Raw { .. }) => return evaluate_text(ctx, &lm, data_input),
            (_, Input::Artifact { ty, .. }) if *ty == TEXT => return evaluate_text(ctx, &lm, data_input),
            _ => {}
        }
        let Input::Artifact { artifact: data, ty, stage: data_stage } = data_input else {
            unreachable!("raw inputs are handled above");
        };
        if *ty != PREFERENCES && ctx.input("reference").is_some() {
            return Err(StageError::msg(format!(
                "a `reference` scores preference pairs, and stage `{data_stage}` holds other data: wire `data` to a `preferences` stage"
            )));
        }
        if *ty == EXAMPLES {
            require_same_tokenizer((model_dir, model_stage), (data, data_stage))?;
            return evaluate_examples(ctx, &lm, data);
        }
        if *ty == PREFERENCES {
            require_same_tokenizer((model_dir, model_stage), (data, data_stage))?;
            let reference = match ctx.input("reference") {
                Some(Input::Artifact { artifact, stage, .. }) => {
                    Some(load_reference((artifact, stage), (data, data_stage))?.1)
                }
                _ => None,
            };
            return evaluate_preferences(ctx, &lm, data, reference.as_ref());
        }
        let blocks = read_blocks(&data.path(VAL_FILE))?;
        evaluate_blocks(ctx, &lm, blocks)
    }
}

/// Raw text: every document tokenized with the model's tokenizer, followed by its end-of-text
/// token, and cut into blocks of the model's block size as `pack` cuts them.
fn evaluate_text(ctx: &StageCtx<'_>, lm: &LoadedModel, input: &Input) -> Result<Metrics, StageError> {
    let p = ctx.params();
    let format = crate::text_source::Format::named(p.str("format"));
    let opts = crate::text_source::SourceOptions { format, field: p.str("field"), doc_separator: None };
    let docs = crate::text_source::read_documents(input, &opts)?;
    ctx.progress().set_message("tokenizing");
    let ids = crate::tokenize::encode_all(&lm.tokenizer, &docs, 64, ctx)?;
    let docs = (0..ids.len()).map(|i| ids.doc(i));
    evaluate_blocks(ctx, lm, crate::tasks::text_blocks(docs, lm.eot, lm.cfg().block_size))
}

/// A benchmark task: multiple choice or exact match, with every row's result in `eval.json`.
fn evaluate_task(ctx: &StageCtx<'_>, lm: &LoadedModel, input: &Input) -> Result<Metrics, StageError> {
    let p = ctx.params();
    let limit = p.opt_usize("max_examples");
    let (results, metrics) = match p.str("task") {
        "multiple_choice" => crate::tasks::multiple_choice(ctx, lm, input, limit, p.usize("batch_size"))?,
        _ => crate::tasks::exact_match(ctx, lm, input, limit, p.usize("max_new_tokens"))?,
    };
    write_results(ctx, &results)?;
    Ok(metrics)
}

/// Blocks of validation text: loss, perplexity, bits per byte, and samples.
fn evaluate_blocks(
    ctx: &StageCtx<'_>,
    lm: &LoadedModel,
    blocks: crate::arrow_io::Blocks,
) -> Result<Metrics, StageError> {
    let p = ctx.params();
    let t = blocks.width - 1;
    if t > lm.cfg().block_size {
        return Err(StageError::msg(blocks_too_long(t, lm.cfg().block_size)));
    }
    if let Some(bad) = blocks.tokens.iter().find(|id| **id as usize >= lm.cfg().vocab_size) {
        return Err(StageError::msg(format!(
            "the data has token {bad}, outside the model's vocabulary of {}: were they made with another tokenizer?",
            lm.cfg().vocab_size
        )));
    }
    if blocks.tokens.is_empty() {
        return Err(StageError::msg(
            "the data has no validation blocks: give `pack` a `val_fraction` above 0, or more text",
        ));
    }
    let batch = p.usize("batch_size").min(blocks.rows()).max(1);
    let max_batches = p.opt_usize("max_batches");
    let progress = ctx.progress();
    progress.set_message("validation loss");
    progress.set_length(blocks.rows_scored(batch, max_batches) as u64, "blocks");
    let mut acts = Activations::inference(&lm.model, batch, t);
    let scored = mean_loss(&lm.model, &lm.params, &blocks, &mut acts, max_batches, |rows| {
        progress.set_position(rows as u64);
        ctx.check_cancelled()
    })?;
    let (val_loss, tokens) = (scored.mean, scored.tokens);

    // The predicted tokens are the stream of the scored blocks after its first token (any
    // padding ends the stream, and is not predicted).
    let stream = stream_of(&blocks.tokens[..scored.rows * blocks.width], blocks.width);
    let text = lm.tokenizer.decode(&stream[1..=tokens], true).map_err(|e| fail("decoding validation text")(&*e))?;
    let bytes = text.len();
    let bits_per_byte = val_loss * tokens as f64 / std::f64::consts::LN_2 / bytes.max(1) as f64;

    let prompts: Vec<(String, Option<String>)> = p.str_list("prompts").iter().map(|s| (s.clone(), None)).collect();
    scored_with_samples(ctx, lm, &prompts, (val_loss, bits_per_byte, tokens, bytes), None)
}

fn write_results(ctx: &StageCtx<'_>, results: &serde_json::Value) -> Result<(), StageError> {
    let pretty = serde_json::to_string_pretty(results).expect("JSON values serialize") + "\n";
    std::fs::write(ctx.out(RESULTS_FILE), pretty).map_err(|e| fail("writing eval.json")(&e))
}

/// What speculative decoding did over the samples, and their time with and without the draft.
#[derive(Default)]
struct Speculation {
    stats: SpecStats,
    seconds: f64,
    plain_seconds: f64,
    /// Whether every sample's text is the one decoding without the draft gives (always, greedy).
    same_text: bool,
}

/// With a draft, what speculative decoding did: in the results (counts, and whether the text
/// is the one plain decoding gives) and the metrics (with the speed-up, a timing).
fn add_speculative(results: &mut serde_json::Value, metrics: &mut Metrics, spec: Option<Speculation>) {
    if let Some(Speculation { stats: s, seconds, plain_seconds, same_text }) = spec {
        let acceptance = round(s.acceptance(), 4);
        results["speculative"] = json!({
            "proposed": s.proposed,
            "accepted": s.accepted,
            "rounds": s.rounds,
            "acceptance": acceptance,
            "same_text_as_plain": same_text,
        });
        metrics.insert("draft_acceptance".into(), json!(acceptance));
        metrics.insert("speculative_speedup".into(), json!(round(plain_seconds / seconds.max(1e-9), 3)));
        metrics.insert("speculative_tokens_per_s".into(), json!(round(s.tokens as f64 / seconds.max(1e-9), 1)));
    }
}

/// What [`answer`] gives back.
struct Answers {
    samples: Vec<serde_json::Value>,
    speculative: Option<Speculation>,
    /// Tokens decoded without the draft, and their seconds.
    plain_decoding: (usize, f64),
}

/// A sample per prompt (each with the next seed), with its reference answer when there is one;
/// decoded speculatively when a `draft` is wired (then with what the draft did). Also the
/// tokens decoded without the draft and their seconds, for the decoding speed.
fn answer(ctx: &StageCtx<'_>, lm: &LoadedModel, prompts: &[(String, Option<String>)]) -> Result<Answers, StageError> {
    let p = ctx.params();
    let draft_lm = match ctx.input("draft") {
        Some(Input::Artifact { artifact, .. }) => Some(LoadedModel::load(&artifact.dir)?),
        _ => None,
    };
    let draft = draft_lm.as_ref().map(|lm| Draft { lm, tokens: p.usize("draft_tokens") });
    let mut spec = draft.map(|_| Speculation { same_text: true, ..Default::default() });
    let opts = GenOptions {
        sampling: sampling(p),
        max_new_tokens: p.usize("max_new_tokens"),
        seed: ctx.seed(),
        stop_at_eot: p.bool("stop_at_eot"),
    };
    let mut samples = Vec::new();
    let mut plain_decoding = (0, 0.0);
    for (i, (prompt, reference)) in prompts.iter().enumerate() {
        ctx.check_cancelled()?;
        ctx.progress().set_message(&format!("sample {}", i + 1));
        let seeded = GenOptions { seed: opts.seed.wrapping_add(i as u64), ..opts };
        let started = std::time::Instant::now();
        let (text, s) = generate_with_draft(lm, draft, prompt, seeded, |_| {})?;
        let seconds = started.elapsed().as_secs_f64();
        match &mut spec {
            None => plain_decoding = (plain_decoding.0 + s.tokens, plain_decoding.1 + seconds),
            Some(total) => {
                total.seconds += seconds;
                total.stats.add(&s);
                // The same sample without the draft, for the speed-up (and, greedy, the same text).
                let started = std::time::Instant::now();
                let (plain, plain_stats) = generate_with_draft(lm, None, prompt, seeded, |_| {})?;
                let seconds = started.elapsed().as_secs_f64();
                total.plain_seconds += seconds;
                total.same_text &= plain == text;
                plain_decoding = (plain_decoding.0 + plain_stats.tokens, plain_decoding.1 + seconds);
            }
        }
        samples.push(match reference {
            Some(reference) => json!({ "prompt": prompt, "reference": reference, "text": text }),
            None => json!({ "prompt": prompt, "text": text }),
        });
    }
    Ok(Answers { samples, speculative: spec, plain_decoding })
}

/// Instruction examples: the loss of the held-out responses (prompts are not scored, as in
/// training), and answers to the first `instruction_samples` held-out instructions.
fn evaluate_examples(
    ctx: &StageCtx<'_>,
    lm: &LoadedModel,
    data: &engine::cache::Artifact,
) -> Result<Metrics, StageError> {
    let p = ctx.params();
    let examples = read_examples(&data.path(EXAMPLES_VAL_FILE))?;
    if examples.is_empty() {
        return Err(StageError::msg(
            "the examples have no validation split: give `instructions` a `val_fraction` above 0",
        ));
    }
    let longest = (0..examples.len()).map(|i| examples.example(i).0.len()).max().unwrap_or(2);
    let t = (longest - 1).clamp(1, lm.cfg().block_size);
    let layout = Layout { t, packing: true, drop_overlong: false, train_on_prompt: false, eot: lm.eot };
    let (rows, _) = layout.pack(&examples);
    let batch = p.usize("batch_size").min(rows.rows).max(1);
    let max_batches = p.opt_usize("max_batches");
    let progress = ctx.progress();
    progress.set_message("validation loss (responses)");
    let scored_rows = rows.rows_scored(batch, max_batches);
    progress.set_length(scored_rows as u64, "rows");
    let (val_loss, tokens) = rows_loss(&lm.model, &lm.params, &rows, batch, max_batches, |r| {
        progress.set_position(r as u64);
        ctx.check_cancelled()
    })?;
    let predicted: Vec<u32> = rows.targets[..scored_rows * t].iter().copied().filter(|id| *id != IGNORE).collect();
    let decode = |ids: &[u32]| lm.tokenizer.decode(ids, true).map_err(|e| fail("decoding")(&*e));
    let bytes = decode(&predicted)?.len();
    let bits_per_byte = val_loss * tokens as f64 / std::f64::consts::LN_2 / bytes.max(1) as f64;

    let mut prompts = Vec::new();
    for i in 0..p.usize("instruction_samples").min(examples.len()) {
        let (ids, mask) = examples.example(i);
        let prompt_len = mask.iter().position(|m| *m == 1).unwrap_or(ids.len());
        let response: Vec<u32> = ids[prompt_len..].iter().copied().filter(|id| *id != lm.eot).collect();
        prompts.push((decode(&ids[..prompt_len])?, Some(decode(&response)?)));
    }
    let extra = ("val_examples", json!(examples.len()));
    scored_with_samples(ctx, lm, &prompts, (val_loss, bits_per_byte, tokens, bytes), Some(extra))
}

/// Write `eval.json` for a validation loss (mean, bits per byte, tokens and bytes scored), an
/// extra figure, and samples of the prompts; return the stage's metrics.
fn scored_with_samples(
    ctx: &StageCtx<'_>,
    lm: &LoadedModel,
    prompts: &[(String, Option<String>)],
    (val_loss, bits_per_byte, tokens, bytes): (f64, f64, usize, usize),
    extra: Option<(&str, serde_json::Value)>,
) -> Result<Metrics, StageError> {
    let Answers { samples, speculative, plain_decoding: (decoded, seconds) } = answer(ctx, lm, prompts)?;
    let mut results = json!({
        "val_loss": val_loss,
        "perplexity": val_loss.exp(),
        "bits_per_byte": bits_per_byte,
        "val_tokens": tokens,
        "val_bytes": bytes,
        "samples": samples,
    });
    if let Some((key, value)) = extra {
        results[key] = value;
    }
    let mut metrics = loss_metrics(val_loss, bits_per_byte, tokens, samples.len());
    if decoded > 0 {
        metrics.insert("decode_tokens_per_s".into(), json!(round(decoded as f64 / seconds.max(1e-9), 1)));
    }
    add_speculative(&mut results, &mut metrics, speculative);
    write_results(ctx, &results)?;
    Ok(metrics)
}

/// Preference pairs: the share of validation pairs where the model's summed log-probability
/// of the chosen response is higher than of the rejected one, the same per token, and with a
/// reference the share where the chosen response's log-ratio to the reference is higher (DPO's
/// implicit reward); and the loss of the chosen responses per token.
fn evaluate_preferences(
    ctx: &StageCtx<'_>,
    lm: &LoadedModel,
    data: &engine::cache::Artifact,
    reference: Option<&SeqLogps>,
) -> Result<Metrics, StageError> {
    let split = PrefSplit::read(&data.dir, PREFERENCES_VAL_FILE, lm.eot, lm.cfg().block_size)?;
    if !split.paired {
        return Err(StageError::msg("preference accuracy compares pairs, and the data holds unpaired examples"));
    }
    let rows = split.rows;
    if rows.rows == 0 {
        return Err(StageError::msg("the pairs have no validation split: give `preferences` a `val_fraction` above 0"));
    }
    let progress = ctx.progress();
    progress.set_message("preference pairs");
    progress.set_length(rows.rows as u64, "sequences");
    let scored = sequence_logps(&lm.model, &lm.params, &rows, ctx.params().usize("batch_size"), |n| {
        progress.set_position(n as u64);
        ctx.check_cancelled()
    })?;
    let pairs = rows.rows / 2;
    let share = |prefers: &dyn Fn(usize, usize) -> bool| {
        (0..pairs).filter(|i| prefers(2 * i, 2 * i + 1)).count() as f64 / pairs as f64
    };
    let (lp, n) = (&scored.logps, &scored.tokens);
    let accuracy = share(&|c, r| lp[c] > lp[r]);
    let normalized = share(&|c, r| lp[c] / n[c].max(1) as f64 > lp[r] / n[r].max(1) as f64);
    let chosen_tokens: u32 = (0..pairs).map(|i| n[2 * i]).sum();
    let chosen_loss = -(0..pairs).map(|i| lp[2 * i]).sum::<f64>() / chosen_tokens.max(1) as f64;
    let mut results = json!({
        "pairs": pairs,
        "preference_accuracy": accuracy,
        "preference_accuracy_normalized": normalized,
        "chosen_loss": chosen_loss,
        "mean_logp_chosen": (0..pairs).map(|i| lp[2 * i]).sum::<f64>() / pairs as f64,
        "mean_logp_rejected": (0..pairs).map(|i| lp[2 * i + 1]).sum::<f64>() / pairs as f64,
    });
    let mut metrics = Metrics::from([
        ("pairs".into(), json!(pairs)),
        ("preference_accuracy".into(), json!(round(accuracy, 4))),
        ("preference_accuracy_normalized".into(), json!(round(normalized, 4))),
        ("chosen_loss".into(), json!(round(chosen_loss, 4))),
    ]);
    if let Some(reference) = reference {
        let rl = &reference.logps;
        let reward = share(&|c, r| lp[c] - rl[c] > lp[r] - rl[r]);
        results["reward_accuracy"] = json!(reward);
        metrics.insert("reward_accuracy".into(), json!(round(reward, 4)));
    }
    write_results(ctx, &results)?;
    Ok(metrics)
}

/// The metrics of an evaluation.
fn loss_metrics(val_loss: f64, bits_per_byte: f64, tokens: usize, samples: usize) -> Metrics {
    Metrics::from([
        ("val_loss".into(), json!(round(val_loss, 4))),
        ("perplexity".into(), json!(round(val_loss.exp(), 4))),
        ("bits_per_byte".into(), json!(round(bits_per_byte, 4))),
        ("val_tokens".into(), json!(tokens)),
        ("samples".into(), json!(samples)),
    ])
}

/// Packed blocks longer than the model's block size.
fn blocks_too_long(t: usize, block_size: usize) -> String {
    format!("the data's blocks hold {t} tokens, more than the model's block size {block_size}")
}
