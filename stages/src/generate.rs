//! Text generation from a model directory: encode the prompt, feed it through a KV-cache
//! [`Decoder`], and sample token after token, handing each piece of text to a callback as soon
//! as it decodes (streaming).

use std::path::Path;

use engine::StageError;
use tokenizers::Tokenizer;

use crate::model_io::{load_model_with_eot, TOKENIZER};
use crate::nn::decoder::Decoder;
use crate::nn::model::{Model, ModelConfig};
use crate::nn::params::ParamMap;
use crate::nn::rng::SplitMix64;
use crate::nn::sample::{pick, Sampling};

/// A model ready to run: configuration, weights and tokenizer.
pub struct LoadedModel {
    pub params: ParamMap,
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// The end-of-text token: an empty prompt starts from it, and generation stops at it.
    pub eot: u32,
}

impl LoadedModel {
    /// Read `config.json`, `model.safetensors` and `tokenizer.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, StageError> {
        let (cfg, params, eot) = load_model_with_eot(dir)?;
        let path = dir.join(TOKENIZER);
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| StageError::msg(format!("`{}` is not a Hugging Face tokenizer.json: {e}", path.display())))?;
        let model = Model::new(cfg, &params);
        Ok(LoadedModel { params, model, tokenizer, eot })
    }

    pub fn cfg(&self) -> &ModelConfig {
        &self.model.cfg
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenOptions {
    pub sampling: Sampling,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// End the text at the end-of-text token.
    pub stop_at_eot: bool,
}

/// Generate a continuation of `prompt`; `on_text` receives the text as it decodes. Returns the
/// whole continuation (without the prompt).
///
/// When the context reaches the block size, the cache restarts from the last half of it, so
/// long generations cost about twice the cached work rather than a full pass per token.
pub fn generate(
    lm: &LoadedModel,
    prompt: &str,
    opts: GenOptions,
    mut on_text: impl FnMut(&str),
) -> Result<String, StageError> {
    let encoding =
        lm.tokenizer.encode_fast(prompt, false).map_err(|e| StageError::msg(format!("encoding the prompt: {e}")))?;
    let mut context: Vec<u32> = encoding.get_ids().to_vec();
    if context.is_empty() {
        context.push(lm.eot);
    }
    if let Some(bad) = context.iter().find(|id| **id as usize >= lm.cfg().vocab_size) {
        return Err(StageError::msg(format!("the prompt has token {bad}, outside the model's vocabulary")));
    }
    let block = lm.cfg().block_size;
    let mut decoder = Decoder::new(&lm.model);
    let keep = (block / 2).max(1);
    let start = context.len().saturating_sub(block.saturating_sub(1).max(1));
    for &id in &context[start..] {
        decoder.step(&lm.model, &lm.params, id);
    }
    let mut rng = SplitMix64::new(opts.seed);
    let mut scratch = Vec::new();
    let mut stream = lm.tokenizer.decode_stream(true);
    let mut text = String::new();
    for _ in 0..opts.max_new_tokens {
        let next = pick(&decoder.logits, opts.sampling, &mut rng, &mut scratch);
        if opts.stop_at_eot && next == lm.eot {
            break;
        }
        context.push(next);
        if let Some(piece) = stream.step(next).map_err(|e| StageError::msg(format!("decoding token {next}: {e}")))? {
            on_text(&piece);
            text.push_str(&piece);
        }
        if decoder.len() == block {
            decoder.clear();
            for &id in &context[context.len() - keep..] {
                decoder.step(&lm.model, &lm.params, id);
            }
        } else {
            decoder.step(&lm.model, &lm.params, next);
        }
    }
    Ok(text)
}
