//! `generate`: a model's own continuations of prompts taken from packed data, packed again as
//! data, the corpus of sequence-level distillation. A draft distilled on the text its model
//! writes learns the distribution speculative decoding asks it to predict, not the corpus's.
//!
//! Prompts are the first `prompt_tokens` tokens of documents of the data's splits, spread
//! evenly over them; train prompts give train sequences and validation prompts validation
//! ones. Each prompt and its continuation become one document, and the documents are packed as
//! `pack` packs them (joined by the end-of-text token, blocks of the data's `seq_len + 1`), so
//! every stage that takes `pack`'s output takes this one.
//!
//! Sequences are decoded eight at a time in passes of one token each (the weights are read once
//! per pass); each gets the bits it gets decoded alone, so greedy continuations are the text
//! `tinygpt sample --temperature 0` writes for the same prompt, and nothing depends on the
//! thread count.

use std::collections::{BTreeMap, BTreeSet};

use engine::{Accepts, InputSpec, Metrics, ParamProblem, ParamSpec, Params, Stage, StageCtx, StageError};
use serde_json::json;

use crate::arrow_io::{read_blocks, write_blocks, Blocks, TokenMeta};
use crate::generate::sampling;
use crate::model_io::{model_over_data, ModelOverData, TOKENIZER};
use crate::nn::decoder::Decoder;
use crate::nn::kernels::gemv;
use crate::nn::model::Model;
use crate::nn::params::ParamMap;
use crate::nn::rng::SplitMix64;
use crate::nn::sample::{pick, Sampling};
use crate::pack::{cut_blocks, stream, TRAIN_FILE, VAL_FILE};
use crate::{fail, round, MODEL, PACKED};

pub struct Generate;

/// Sequences decoded together: the most rows the few-row products take (each row keeps the
/// bits it gets alone).
const LANES: usize = gemv::MAX_ROWS;

const PARAMS: &[ParamSpec] = &[
    ParamSpec::int("sequences", 1024, 1, 1 << 24, "continuations of training prompts"),
    ParamSpec::int("val_sequences", 64, 0, 1 << 24, "continuations of validation prompts"),
    ParamSpec::int("prompt_tokens", 8, 1, 1 << 20, "tokens of each prompt: the start of a document"),
    ParamSpec::int("new_tokens", 120, 1, 1 << 20, "most tokens generated after each prompt"),
    ParamSpec::bool("stop_at_eot", true, "a continuation ends at the end-of-text token"),
    ParamSpec::float("temperature", 0.0, 0.0, 100.0, "sampling temperature (0: greedy)"),
    ParamSpec::int("top_k", 0, 0, 1 << 30, "sample among the k most likely tokens (0: all)"),
    ParamSpec::float("top_p", 1.0, 0.0, 1.0, "sample among the most likely tokens whose probability reaches top_p"),
];

const INPUTS: &[InputSpec] = &[
    InputSpec { name: "model", accepts: Accepts::Artifact(&[MODEL]), required: true, doc: "the model that writes" },
    InputSpec {
        name: "data",
        accepts: Accepts::Artifact(&[PACKED]),
        required: true,
        doc: "a `pack` stage made with the model's tokenizer: the prompts, and the blocks' length",
    },
];

impl Stage for Generate {
    fn kind(&self) -> &'static str {
        "generate"
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "a model's continuations of document starts, packed as data (sequence-level distillation)"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn inputs(&self) -> &'static [InputSpec] {
        INPUTS
    }
    fn output(&self) -> engine::ArtifactType {
        PACKED
    }
    /// Prompts and continuations longer than the model's block size are refused before
    /// anything runs, when the model's stage tells it.
    fn check_shapes(&self, p: &Params, upstream: &BTreeMap<&str, &serde_json::Value>) -> Result<(), ParamProblem> {
        let positions = p.usize("prompt_tokens") + p.usize("new_tokens") - 1;
        match crate::told(upstream, "model", "block_size") {
            Some(block_size) if positions > block_size => {
                Err(ParamProblem::new("new_tokens", too_many_positions(positions, block_size)))
            }
            _ => Ok(()),
        }
    }
    /// Blocks of the data's `seq_len`, as `pack` cut them.
    fn output_shape(&self, _: &Params, upstream: &BTreeMap<&str, &serde_json::Value>) -> serde_json::Value {
        crate::packed_shape(crate::told(upstream, "data", "seq_len"))
    }
    fn uses_seed(&self) -> bool {
        true
    }
    fn vocabulary(&self) -> engine::Vocabulary {
        engine::Vocabulary::From("model")
    }
    fn same_vocabulary(&self) -> &'static [&'static str] {
        &["model", "data"]
    }
    fn check(&self, p: &Params, _: &BTreeSet<&str>) -> Result<(), ParamProblem> {
        if p.float("temperature") == 0.0 && (p.usize("top_k") != 0 || p.float("top_p") != 1.0) {
            return Err(ParamProblem::new(
                "top_k",
                "greedy decoding (temperature 0) ignores top_k and top_p: set a temperature, or leave them out",
            ));
        }
        Ok(())
    }

    fn run(&self, ctx: &StageCtx<'_>) -> Result<Metrics, StageError> {
        let ModelOverData { cfg, params, eot, data, data_stage, .. } = model_over_data(ctx)?;
        let meta = TokenMeta::read(&data.dir)?;
        let seq_len = meta.seq_len.ok_or_else(|| StageError::msg("the data's meta.json has no seq_len"))?;
        let p = ctx.params();
        let spec = Spec {
            prompt: p.usize("prompt_tokens"),
            new: p.usize("new_tokens"),
            stop_at_eot: p.bool("stop_at_eot"),
            sampling: sampling(p),
            eot,
        };
        if spec.capacity() > cfg.block_size {
            return Err(StageError::msg(too_many_positions(spec.capacity(), cfg.block_size)));
        }
        let model = Model::new(cfg, &params);
        let mut seeds = SplitMix64::new(ctx.seed());
        let mut splits = Vec::new();
        for (file, count, key) in
            [(TRAIN_FILE, p.usize("sequences"), "sequences"), (VAL_FILE, p.usize("val_sequences"), "val_sequences")]
        {
            let blocks = read_blocks(&data.path(file))?;
            let prompts =
                prompts(&blocks, eot, spec.prompt, count, spec.sampling.temperature > 0.0).map_err(|found| {
                    StageError::msg(format!(
                        "`{file}` of stage `{data_stage}` has {found} documents of at least {} tokens, fewer than \
                     `{key}` = {count} (greedy decoding would repeat them): lower `{key}` or `prompt_tokens`, \
                     or sample with a `temperature` above 0",
                        spec.prompt
                    ))
                })?;
            let seeds: Vec<u64> = prompts.iter().map(|_| seeds.next_u64()).collect();
            splits.push((file, prompts, seeds));
        }
        let total: usize = splits.iter().map(|s| s.1.len()).sum();
        ctx.progress().set_length(total as u64, "sequences");
        let started = std::time::Instant::now();
        let (mut finished, mut generated, mut at_eot, mut rows) = (0, 0, 0, Vec::new());
        for (file, prompts, seeds) in &splits {
            let docs = continue_all(&model, &params, &spec, prompts, seeds, |done| {
                ctx.check_cancelled()?;
                ctx.progress().set_position((finished + done) as u64);
                Ok(())
            })?;
            finished += prompts.len();
            generated += docs.iter().map(|d| d.len() - spec.prompt).sum::<usize>();
            at_eot += docs.iter().filter(|d| d.len() - spec.prompt < spec.new).count();
            let cut = cut_blocks(&stream(docs.iter().map(Vec::as_slice), eot), seq_len, false, eot);
            if cut.blocks.rows() == 0 && !prompts.is_empty() {
                return Err(StageError::msg(format!(
                    "the {} continuations for `{file}` hold fewer than seq_len + 1 = {} tokens: \
                     raise the number of sequences or `new_tokens`",
                    prompts.len(),
                    seq_len + 1
                )));
            }
            write_blocks(&ctx.out(file), &cut.blocks)?;
            rows.push(cut.blocks.rows());
        }
        std::fs::copy(data.path(TOKENIZER), ctx.out(TOKENIZER)).map_err(|e| fail("copying tokenizer.json")(&e))?;
        meta.write(ctx.out_dir())?;
        let seconds = started.elapsed().as_secs_f64();
        Ok(Metrics::from([
            ("sequences".into(), json!(total)),
            ("generated_tokens".into(), json!(generated)),
            ("ended_at_eot".into(), json!(at_eot)),
            ("train_blocks".into(), json!(rows[0])),
            ("val_blocks".into(), json!(rows[1])),
            ("tokens_per_second".into(), json!(round(generated as f64 / seconds.max(1e-9), 1))),
        ]))
    }
}

/// How each sequence is generated.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub prompt: usize,
    pub new: usize,
    pub stop_at_eot: bool,
    pub sampling: Sampling,
    pub eot: u32,
}

impl Spec {
    /// Positions a sequence's cache holds: every token but the last generated one.
    fn capacity(&self) -> usize {
        self.prompt + self.new - 1
    }
}

/// `count` prompts of `len` tokens: the starts of the split's documents that have that many
/// tokens before their end, spread evenly over them, in order. With too few such documents the
/// prompts come round again when `repeat` allows it (sampling gives each its own text), and
/// otherwise the error is how many there are.
pub fn prompts(blocks: &Blocks, eot: u32, len: usize, count: usize, repeat: bool) -> Result<Vec<Vec<u32>>, usize> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let tokens = blocks.stream();
    let mut starts = Vec::new();
    let mut start = 0;
    for (i, &t) in tokens.iter().enumerate() {
        if t == eot {
            if i - start >= len {
                starts.push(start);
            }
            start = i + 1;
        }
    }
    if tokens.len() - start >= len {
        starts.push(start);
    }
    if starts.is_empty() || (starts.len() < count && !repeat) {
        return Err(starts.len());
    }
    let n = starts.len();
    Ok((0..count).map(|i| tokens[starts[i * n / count]..][..len].to_vec()).collect())
}

/// Every prompt continued, each into prompt + continuation (without the end-of-text token
/// that ended it). `progress` hears how many are done after each pass and may stop the work.
pub fn continue_all(
    model: &Model,
    p: &ParamMap,
    spec: &Spec,
    prompts: &[Vec<u32>],
    seeds: &[u64],
    mut progress: impl FnMut(usize) -> Result<(), StageError>,
) -> Result<Vec<Vec<u32>>, StageError> {
    /// A sequence in a lane: its tokens so far, how many the cache holds, its sampler.
    struct Lane {
        seq: usize,
        tokens: Vec<u32>,
        fed: usize,
        rng: SplitMix64,
    }
    let lanes_n = LANES.min(prompts.len()).max(1);
    let mut dec = Decoder::batched(model, lanes_n, spec.capacity());
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut next = 0;
    let start = |next: &mut usize| -> Option<Lane> {
        let seq = *next;
        (seq < prompts.len()).then(|| {
            *next += 1;
            Lane { seq, tokens: prompts[seq].clone(), fed: 0, rng: SplitMix64::new(seeds[seq]) }
        })
    };
    let mut lanes: Vec<Option<Lane>> = (0..lanes_n).map(|_| start(&mut next)).collect();
    let (mut rows, mut ended, mut scratch, mut done) = (Vec::with_capacity(lanes_n), Vec::new(), Vec::new(), 0);
    while lanes.iter().any(Option::is_some) {
        rows.clear();
        rows.extend(lanes.iter().enumerate().filter_map(|(i, l)| l.as_ref().map(|l| (i, l.tokens[l.fed]))));
        let logits = dec.feed_each(model, p, &rows);
        ended.clear();
        for (&(i, _), row) in rows.iter().zip(logits.chunks(model.cfg.vocab_size)) {
            let lane = lanes[i].as_mut().expect("a row comes from a busy lane");
            lane.fed += 1;
            if lane.fed < lane.tokens.len() {
                continue; // still reading the prompt
            }
            let token = pick(row, spec.sampling, &mut lane.rng, &mut scratch);
            let ends_text = spec.stop_at_eot && token == spec.eot;
            if !ends_text {
                lane.tokens.push(token);
            }
            if ends_text || lane.tokens.len() == spec.prompt + spec.new {
                ended.push(i);
            }
        }
        for &i in &ended {
            let lane = lanes[i].take().expect("an ended lane was busy");
            out[lane.seq] = lane.tokens;
            done += 1;
            dec.clear_seq(i);
            lanes[i] = start(&mut next);
        }
        progress(done)?;
    }
    Ok(out)
}

/// Prompts and continuations that do not fit the model's block size.
fn too_many_positions(positions: usize, block_size: usize) -> String {
    format!(
        "prompt_tokens + new_tokens - 1 = {positions} positions do not fit the model's block size {block_size}: \
         lower `new_tokens` or `prompt_tokens`"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::random;
    use crate::nn::model::ModelConfig;
    use crate::nn::sample::argmax;
    use crate::pack::cut_blocks;

    #[test]
    fn prompts_are_document_starts_spread_evenly() {
        // Documents of 3, 1, 4 and 3 tokens; 0 ends each.
        let docs: [&[u32]; 4] = [&[1, 2, 3], &[4], &[5, 6, 7, 8], &[9, 9, 9]];
        let blocks = cut_blocks(&stream(docs.into_iter(), 0), 4, true, 0).blocks;
        assert_eq!(prompts(&blocks, 0, 2, 2, false), Ok(vec![vec![1, 2], vec![5, 6]]));
        assert_eq!(prompts(&blocks, 0, 3, 3, false), Ok(vec![vec![1, 2, 3], vec![5, 6, 7], vec![9, 9, 9]]));
        assert_eq!(prompts(&blocks, 0, 2, 4, false), Err(3), "three documents have two tokens");
        assert_eq!(prompts(&blocks, 0, 4, 2, true), Ok(vec![vec![5, 6, 7, 8]; 2]), "sampling may repeat");
        assert_eq!(prompts(&blocks, 0, 5, 1, true), Err(0));
        assert_eq!(prompts(&blocks, 0, 5, 0, false), Ok(vec![]));
    }

    fn model() -> (Model, ParamMap) {
        let mut cfg = ModelConfig::llama(13, 16, 2, 4, 2, 16);
        cfg.ffn_hidden = 24;
        let mut p = cfg.init(1);
        for (i, (_, t)) in p.iter_mut().enumerate() {
            let values = random(t.data().len(), 50 + i as u64);
            t.data_mut().iter_mut().zip(values).for_each(|(w, r)| *w = r);
        }
        (Model::new(cfg, &p), p)
    }

    /// Greedy decoding of one prompt with a single-sequence decoder, a step per token.
    fn greedy_alone(model: &Model, p: &ParamMap, spec: &Spec, prompt: &[u32]) -> Vec<u32> {
        let mut dec = Decoder::new(model);
        let mut tokens = prompt.to_vec();
        prompt.iter().for_each(|&t| _ = dec.step(model, p, t));
        loop {
            let next = argmax(&dec.logits) as u32;
            if spec.stop_at_eot && next == spec.eot {
                return tokens;
            }
            tokens.push(next);
            if tokens.len() == spec.prompt + spec.new {
                return tokens;
            }
            dec.step(model, p, next);
        }
    }

    /// Eleven prompts share eight lanes (three wait for a lane to free); each sequence is what
    /// it is decoded alone, greedy or sampled.
    #[test]
    fn sequences_decoded_together_are_the_sequences_decoded_alone() {
        let (model, p) = model();
        let prompts: Vec<Vec<u32>> = (0..11u32).map(|i| vec![1 + i % 12, 1 + (i * 5) % 12, 3]).collect();
        let seeds: Vec<u64> = (0..11).map(|i| 1000 + i).collect();
        let greedy = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 };
        let mut ended_early = 0;
        for (sampling, eot) in [(greedy, 0), (greedy, 7), (Sampling { temperature: 1.0, ..greedy }, 0)] {
            let spec = Spec { prompt: 3, new: 9, stop_at_eot: true, sampling, eot };
            let together = continue_all(&model, &p, &spec, &prompts, &seeds, |_| Ok(())).unwrap();
            for (i, seq) in together.iter().enumerate() {
                let alone = continue_all(&model, &p, &spec, &prompts[i..=i], &seeds[i..=i], |_| Ok(())).unwrap();
                assert_eq!(seq, &alone[0], "sequence {i}");
                assert_eq!(&seq[..3], &prompts[i][..]);
                assert!(seq.len() <= 12 && !seq[3..].contains(&eot), "{seq:?}");
                ended_early += usize::from(seq.len() < 12);
                if sampling.temperature == 0.0 {
                    assert_eq!(seq, &greedy_alone(&model, &p, &spec, &prompts[i]), "sequence {i}");
                }
            }
        }
        assert!(ended_early > 0, "some sequence met the end-of-text token");
    }

    #[test]
    fn an_interruption_stops_the_work() {
        let (model, p) = model();
        let spec = Spec {
            prompt: 1,
            new: 4,
            stop_at_eot: false,
            sampling: Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 },
            eot: 0,
        };
        let mut calls = 0;
        let stopped = continue_all(&model, &p, &spec, &[vec![1], vec![2]], &[0, 0], |_| {
            calls += 1;
            if calls == 2 {
                Err(StageError::Interrupted)
            } else {
                Ok(())
            }
        });
        assert!(matches!(stopped, Err(StageError::Interrupted)) && calls == 2);
    }
}
