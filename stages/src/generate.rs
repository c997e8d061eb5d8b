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
use crate::nn::sample::{distribution, draw, pick, verify, Sampling};

/// Tokens a decoder takes per pass when it feeds a prompt or restarts from part of the
/// context: as many as the few-row products take, each pass reading the weights once.
const PREFILL_ROWS: usize = crate::nn::kernels::gemv::MAX_ROWS;

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

/// The sampling a stage's `temperature`, `top_k` and `top_p` parameters ask for.
pub fn sampling(p: &engine::Params) -> Sampling {
    Sampling { temperature: p.float("temperature") as f32, top_k: p.usize("top_k"), top_p: p.float("top_p") as f32 }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenOptions {
    pub sampling: Sampling,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// End the text at the end-of-text token.
    pub stop_at_eot: bool,
}

/// What generation did: tokens generated and, with a draft, the tokens it proposed, those the
/// model kept, and the rounds of verification.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SpecStats {
    /// Tokens generated.
    pub tokens: usize,
    pub proposed: usize,
    pub accepted: usize,
    pub rounds: usize,
}

impl SpecStats {
    /// Add another generation's counts.
    pub fn add(&mut self, other: &SpecStats) {
        self.tokens += other.tokens;
        self.proposed += other.proposed;
        self.accepted += other.accepted;
        self.rounds += other.rounds;
    }

    /// The share of proposals kept.
    pub fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.proposed.max(1) as f64
    }
}

/// A draft model for speculative decoding and how many tokens it proposes per round.
#[derive(Clone, Copy)]
pub struct Draft<'a> {
    pub lm: &'a LoadedModel,
    pub tokens: usize,
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
    on_text: impl FnMut(&str) + Send,
) -> Result<String, StageError> {
    generate_with_draft(lm, None, prompt, opts, on_text).map(|(text, _)| text)
}

/// [`generate`], with a draft model proposing tokens that the model verifies several at a time
/// (speculative sampling: the text follows the model's own distribution, and greedy text is
/// the text [`generate`] gives, token for token).
pub fn generate_with_draft(
    lm: &LoadedModel,
    draft: Option<Draft<'_>>,
    prompt: &str,
    opts: GenOptions,
    on_text: impl FnMut(&str) + Send,
) -> Result<(String, SpecStats), StageError> {
    let encoding =
        lm.tokenizer.encode_fast(prompt, false).map_err(|e| StageError::msg(format!("encoding the prompt: {e}")))?;
    let mut context: Vec<u32> = encoding.get_ids().to_vec();
    if context.is_empty() {
        context.push(lm.eot);
    }
    if let Some(bad) = context.iter().find(|id| **id as usize >= lm.cfg().vocab_size) {
        return Err(StageError::msg(format!("the prompt has token {bad}, outside the model's vocabulary")));
    }
    let mut out = Output {
        stream: lm.tokenizer.decode_stream(true),
        text: String::new(),
        on_text,
        stats: SpecStats::default(),
        opts,
        eot: lm.eot,
    };
    if let Some(d) = draft.filter(|d| d.lm.cfg().vocab_size != lm.cfg().vocab_size) {
        return Err(StageError::msg(format!(
            "the draft's vocabulary of {} is not the model's {}",
            d.lm.cfg().vocab_size,
            lm.cfg().vocab_size
        )));
    }
    let mut rng = SplitMix64::new(opts.seed);
    // On a thread of the pool, a kernel's parallel loop starts at once on this thread and a
    // loop of one item never leaves it; from outside, every loop would hand its work over and
    // sleep until it comes back, many times a token.
    rayon::scope(|_| match draft {
        None => plain(lm, &mut context, &mut out, &mut rng),
        Some(d) => speculative(lm, d, &mut context, &mut out, &mut rng),
    })?;
    Ok((out.text, out.stats))
}

/// The incremental decoder of a [`Tokenizer`].
type TextStream<'s> = tokenizers::DecodeStream<
    's,
    tokenizers::ModelWrapper,
    tokenizers::NormalizerWrapper,
    tokenizers::PreTokenizerWrapper,
    tokenizers::PostProcessorWrapper,
    tokenizers::DecoderWrapper,
>;

/// Where generated tokens go: decoded to text as they come, counted, and stopped at the end of
/// text or the token budget.
struct Output<'s, F> {
    stream: TextStream<'s>,
    text: String,
    on_text: F,
    stats: SpecStats,
    opts: GenOptions,
    eot: u32,
}

impl<F: FnMut(&str)> Output<'_, F> {
    /// Emit `token` (appended to `context`); false once generation is over (the end-of-text
    /// token, which is not emitted, or the budget reached).
    fn emit(&mut self, token: u32, context: &mut Vec<u32>) -> Result<bool, StageError> {
        if self.opts.stop_at_eot && token == self.eot {
            return Ok(false);
        }
        context.push(token);
        self.stats.tokens += 1;
        let piece = self.stream.step(token).map_err(|e| StageError::msg(format!("decoding token {token}: {e}")))?;
        if let Some(piece) = piece {
            (self.on_text)(&piece);
            self.text.push_str(&piece);
        }
        Ok(self.stats.tokens < self.opts.max_new_tokens)
    }
    fn remaining(&self) -> usize {
        self.opts.max_new_tokens - self.stats.tokens
    }
}

/// One token per pass of the model.
fn plain<F: FnMut(&str)>(
    lm: &LoadedModel,
    context: &mut Vec<u32>,
    out: &mut Output<'_, F>,
    rng: &mut SplitMix64,
) -> Result<(), StageError> {
    let mut target = Cached { lm, dec: Decoder::with_rows(&lm.model, PREFILL_ROWS) };
    target.restart(context);
    let mut scratch = Vec::new();
    while out.remaining() > 0 {
        let next = pick(&target.dec.logits, out.opts.sampling, rng, &mut scratch);
        if !out.emit(next, context)? {
            break;
        }
        target.catch_up(context, 1);
    }
    Ok(())
}

/// Rounds of speculation: the draft proposes up to `k` tokens, and one pass of the model over
/// the last token and the proposals verifies them ([`verify`]). Each token enters the model's
/// cache at the place and in the state plain decoding gives it (a restart when the cache is
/// full happens at the same token), and a pass of several tokens gives each the bits it gets
/// alone, so the model's distributions are plain decoding's.
fn speculative<F: FnMut(&str)>(
    lm: &LoadedModel,
    d: Draft<'_>,
    context: &mut Vec<u32>,
    out: &mut Output<'_, F>,
    rng: &mut SplitMix64,
) -> Result<(), StageError> {
    let k = d.tokens.max(1);
    let (block, v) = (lm.cfg().block_size, lm.cfg().vocab_size);
    let mut target = Cached { lm, dec: Decoder::with_rows(&lm.model, (k + 1).max(PREFILL_ROWS)) };
    let mut draft = Cached { lm: d.lm, dec: Decoder::with_rows(&d.lm.model, PREFILL_ROWS) };
    target.restart(context);
    draft.restart(context);
    // Tokens at the end of the context that the draft's cache lacks: the last one emitted and,
    // after a round that kept every proposal, the last proposal too (both fed in one pass).
    let mut draft_behind = 0;
    let (mut qs, mut ps) = (vec![Vec::new(); k], vec![Vec::new(); k + 1]);
    let (mut residual, mut proposals, mut feed) = (Vec::new(), Vec::new(), Vec::with_capacity(k + 1));
    let mut scratch = Vec::new();
    // The last emitted token, which neither cache holds yet.
    let mut pending = false;
    while out.remaining() > 0 {
        feed.clear();
        if pending {
            if target.dec.len() == block {
                target.restart_from_half(context);
            } else {
                feed.push(*context.last().expect("a pending token is in the context"));
            }
        }
        let round = k.min(block - target.dec.len() - feed.len()).min(out.remaining());
        if round == 0 {
            // No room for a proposal before the cache restarts: one plain step.
            if !feed.is_empty() {
                target.dec.extend(&lm.model, &lm.params, &feed);
            }
            draft.catch_up(context, draft_behind);
            let next = pick(&target.dec.logits, out.opts.sampling, rng, &mut scratch);
            (pending, draft_behind) = (true, 1);
            if !out.emit(next, context)? {
                break;
            }
            continue;
        }
        let draft_block = d.lm.cfg().block_size;
        if draft.dec.len() + draft_behind + round > draft_block {
            // From the last half block, as plain decoding restarts: room for many rounds.
            draft.restart_with_room(context, round.max(draft_block / 2));
        } else {
            draft.catch_up(context, draft_behind);
        }
        let base = (target.dec.len() + feed.len(), draft.dec.len());
        proposals.clear();
        for (i, q) in qs[..round].iter_mut().enumerate() {
            distribution(&draft.dec.logits, out.opts.sampling, q, &mut scratch);
            let x = draw(q, rng);
            proposals.push(x);
            if i + 1 < round {
                draft.dec.step(&d.lm.model, &d.lm.params, x);
            }
        }
        if feed.is_empty() {
            distribution(&target.dec.logits, out.opts.sampling, &mut ps[0], &mut scratch);
        }
        let first = usize::from(feed.is_empty());
        feed.extend_from_slice(&proposals);
        let rows = target.dec.extend(&lm.model, &lm.params, &feed);
        for (i, row) in rows.chunks(v).enumerate() {
            distribution(row, out.opts.sampling, &mut ps[first + i], &mut scratch);
        }
        let (kept, next) = verify(&proposals, &qs[..round], &ps[..round + 1], rng, &mut residual);
        out.stats.proposed += round;
        out.stats.accepted += kept;
        out.stats.rounds += 1;
        target.dec.truncate(base.0 + kept);
        draft.dec.truncate(base.1 + kept);
        pending = true;
        draft_behind = if kept == round { 2 } else { 1 };
        let mut going = true;
        for &x in proposals[..kept].iter().chain([&next]) {
            going = out.emit(x, context)?;
            if !going {
                break;
            }
        }
        if !going {
            break;
        }
    }
    Ok(())
}

/// A model and its KV cache.
struct Cached<'a> {
    lm: &'a LoadedModel,
    dec: Decoder,
}

impl Cached<'_> {
    /// Feed the context's last `behind` tokens in one pass, or when the cache has no room for
    /// them, restart from the last half of the context (so long generations cost about twice
    /// the cached work rather than a full pass per token).
    fn catch_up(&mut self, context: &[u32], behind: usize) {
        if self.dec.len() + behind > self.lm.cfg().block_size {
            self.restart_from_half(context);
        } else if behind > 0 {
            self.dec.extend(&self.lm.model, &self.lm.params, &context[context.len() - behind..]);
        }
    }

    /// Empty the cache and feed the last half block of `context`.
    fn restart_from_half(&mut self, context: &[u32]) {
        let keep = (self.lm.cfg().block_size / 2).max(1);
        self.restart(&context[context.len() - keep..]);
    }

    /// Empty the cache and feed the end of `context`: all of it when it fits, else the last
    /// `block_size - 1` tokens (so the next one fits too).
    fn restart(&mut self, context: &[u32]) {
        self.restart_with_room(context, 1);
    }

    /// [`Self::restart`], leaving room for `room` more tokens.
    fn restart_with_room(&mut self, context: &[u32], room: usize) {
        let block = self.lm.cfg().block_size;
        let start = context.len().saturating_sub(block.saturating_sub(room).max(1));
        self.dec.clear();
        for part in context[start..].chunks(self.dec.max_rows()) {
            self.dec.extend(&self.lm.model, &self.lm.params, part);
        }
    }
}
