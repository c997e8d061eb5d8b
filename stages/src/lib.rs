//! tinygpt's stage kinds, one module per kind, and the registry that lists them.
//!
//! A new kind is a new module plus one line in [`registry`].

pub mod adapters;
pub mod align;
pub mod arrow_io;
pub mod batches;
pub mod bench;
pub mod calibrate;
pub mod checkpoint;
pub mod corpus;
pub mod distill;
pub mod evaluate;
pub mod example_rows;
pub mod export;
pub mod generate;
pub mod generate_data;
pub mod gguf;
pub mod instructions;
pub mod model_io;
pub mod nn;
pub mod pack;
pub mod preferences;
pub mod pretrain;
pub mod quantize;
pub mod reference;
pub mod sft;
pub mod tasks;
pub mod teacher;

mod text_source;
pub mod tokenize;
pub mod train;

use std::sync::Arc;

use engine::{ArtifactType, Registry};

/// Documents of text: JSONL with a `text` field (the `corpus` stage) or raw files.
pub const TEXT: ArtifactType = ArtifactType("text");
/// Token ids per document, a `tokenizer.json` and `meta.json` (the `tokenize` stage).
pub const TOKENS: ArtifactType = ArtifactType("tokens");
/// Fixed-length training blocks split into train and validation (the `pack` stage).
pub const PACKED: ArtifactType = ArtifactType("packed");

/// A trained model directory: `model.safetensors`, `config.json`, `tokenizer.json` and
/// `meta.json` (the `pretrain` stage).
pub const MODEL: ArtifactType = ArtifactType("model");

/// Instruction examples: token ids and a loss mask per example, train and validation, with
/// the model's tokenizer and the template (the `instructions` stage).
pub const EXAMPLES: ArtifactType = ArtifactType("examples");

/// A teacher's top-k log-probabilities at every position of packed blocks, with the blocks
/// (the `teacher` stage).
pub const TEACHER: ArtifactType = ArtifactType("teacher_logits");

/// Preference pairs: a chosen and a rejected sequence per pair with loss masks on the
/// responses, train and validation, with the policy's tokenizer (the `preferences` stage).
pub const PREFERENCES: ArtifactType = ArtifactType("preferences");

/// A reference model's summed log-probability of every response of a preference dataset (the
/// `reference` stage).
pub const REFERENCE: ArtifactType = ArtifactType("reference_logprobs");

/// A model whose matrices are held as int8 or int4 codes (the `quantize` stage): a model
/// directory for inference only.
pub const QUANTIZED_MODEL: ArtifactType = ArtifactType("quantized_model");

/// Every linear layer's input statistics on calibration data (the `calibrate` stage).
pub const CALIBRATION: ArtifactType = ArtifactType("calibration");

/// A model made ready to take elsewhere: a GGUF file or a Hugging Face folder (the `export`
/// stage).
pub const EXPORT: ArtifactType = ArtifactType("export");

/// Evaluation results: `eval.json` with losses and samples (the `evaluate` stage).
pub const EVAL: ArtifactType = ArtifactType("eval");

/// Every stage kind a recipe may use.
pub fn registry() -> Registry {
    let mut r = Registry::default();
    r.register(Arc::new(corpus::Corpus));
    r.register(Arc::new(tokenize::Tokenize));
    r.register(Arc::new(pack::Pack));
    r.register(Arc::new(pretrain::Pretrain));
    r.register(Arc::new(instructions::Instructions));
    r.register(Arc::new(sft::Sft));
    r.register(Arc::new(teacher::Teacher));
    r.register(Arc::new(generate_data::Generate));
    r.register(Arc::new(distill::Distill));
    r.register(Arc::new(preferences::Preferences));
    r.register(Arc::new(reference::Reference));
    r.register(Arc::new(align::Align));
    r.register(Arc::new(calibrate::Calibrate));
    r.register(Arc::new(quantize::Quantize));
    r.register(Arc::new(evaluate::Evaluate));
    r.register(Arc::new(export::Export));
    r
}

/// Turn any displayable error into a stage failure with context.
pub(crate) fn fail(context: impl std::fmt::Display) -> impl FnOnce(&dyn std::error::Error) -> engine::StageError {
    move |e| engine::StageError::chain(context, e)
}

/// `x` rounded to `digits` decimals, for metrics people read.
pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Two parameter tables as one, for a kind whose table is its own parameters followed by a
/// shared list (every training stage's [`train::TRAIN_PARAMS`]).
pub(crate) const fn concat_params<const A: usize, const B: usize, const N: usize>(
    a: [engine::ParamSpec; A],
    b: [engine::ParamSpec; B],
) -> [engine::ParamSpec; N] {
    assert!(A + B == N && A > 0, "N is the sum of the two lengths");
    let mut out = [a[0]; N];
    let mut i = 0;
    while i < N {
        out[i] = if i < A { a[i] } else { b[i - A] };
        i += 1;
    }
    out
}

/// A length the stage wired to `slot` tells of its output when the recipe is resolved
/// ([`engine::Stage::output_shape`]: `block_size` of a model, `seq_len` of packed data), if it
/// tells it.
pub(crate) fn told(
    upstream: &std::collections::BTreeMap<&str, &serde_json::Value>,
    slot: &str,
    key: &str,
) -> Option<usize> {
    upstream.get(slot)?.get(key)?.as_u64().map(|n| n as usize)
}

/// What a stage whose output is packed blocks tells of it: their `seq_len`, when known.
pub(crate) fn packed_shape(seq_len: Option<usize>) -> serde_json::Value {
    seq_len.map_or(serde_json::Value::Null, |n| serde_json::json!({ "seq_len": n }))
}
