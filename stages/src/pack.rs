//! `pack`: split tokenized documents into train and validation, join each split's documents
//! with the end-of-text token, and cut blocks of `seq_len + 1` tokens.
//!
//! Blocks start every `seq_len` tokens, so consecutive blocks share one token: the last token
//! of block i is the first of block i + 1, every token after the first is a prediction target
//! exactly once, and the split's token stream can be rebuilt from its blocks (for samplers that
//! draw random windows, as nanoGPT does).
//!
//! With `remainder = "pad"` a split's last, partial block is filled with end-of-text tokens,
//! and their number goes into the block file's metadata: training and evaluation feed them as
//! inputs but never predict them (their targets are ignored), and windows leave them out.

use engine::{Accepts, Input, InputSpec, Metrics, ParamSpec, Params, Stage, StageCtx, StageError};
use serde_json::json;
use std::collections::BTreeMap;

use crate::arrow_io::{read_docs, write_blocks, Blocks, TokenDocs, TokenMeta};
use crate::nn::rng::SplitMix64;
use crate::tokenize::{TOKENIZER_FILE, TOKENS_FILE};
use crate::{fail, PACKED, TOKENS};

pub struct Pack;

pub const TRAIN_FILE: &str = "train.arrow";
pub const VAL_FILE: &str = "val.arrow";

const PARAMS: &[ParamSpec] = &[
    ParamSpec::int("seq_len", 256, 1, 1 << 20, "tokens a model sees at once; blocks hold seq_len + 1"),
    ParamSpec::float(
        "val_fraction",
        0.1,
        0.0,
        0.9,
        "share of documents (or of tokens, with split = \"position\") for validation",
    ),
    ParamSpec::choice(
        "split",
        "document",
        &["document", "position"],
        "`document`: a seeded random choice of whole documents; `position`: the last tokens of the stream",
    ),
    ParamSpec::choice(
        "remainder",
        "drop",
        &["drop", "pad"],
        "a final partial block is dropped, or padded with the end-of-text token (never a target)",
    ),
];

const INPUTS: &[InputSpec] =
    &[InputSpec { name: "data", accepts: Accepts::Artifact(&[TOKENS]), required: true, doc: "a `tokenize` stage" }];

impl Stage for Pack {
    fn kind(&self) -> &'static str {
        "pack"
    }
    fn version(&self) -> u32 {
        2 // 2: the padding count travels in the block files' metadata
    }
    fn about(&self) -> &'static str {
        "split documents into train and validation and cut fixed blocks of seq_len + 1 tokens"
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
    fn vocabulary(&self) -> engine::Vocabulary {
        engine::Vocabulary::From("data")
    }
    fn uses_seed(&self) -> bool {
        true
    }
    fn output_shape(&self, p: &Params, _: &BTreeMap<&str, &serde_json::Value>) -> serde_json::Value {
        crate::packed_shape(Some(p.usize("seq_len")))
    }

    fn run(&self, ctx: &StageCtx<'_>) -> Result<Metrics, StageError> {
        let Input::Artifact { artifact, .. } = ctx.required_input("data") else {
            unreachable!("`data` accepts only artifacts");
        };
        let p = ctx.params();
        let seq_len = p.usize("seq_len");
        let val_fraction = p.float("val_fraction");
        let pad = p.str("remainder") == "pad";
        let meta = TokenMeta::read(&artifact.dir)?;
        let docs = read_docs(&artifact.path(TOKENS_FILE))?;
        ctx.check_cancelled()?;

        let (train, val) = match p.str("split") {
            "position" => split_by_position(&docs, meta.eot_id, val_fraction),
            _ => split_by_document(&docs, meta.eot_id, val_fraction, ctx.seed()),
        };
        let train_blocks = cut_blocks(&train, seq_len, pad, meta.eot_id);
        let val_blocks = cut_blocks(&val, seq_len, pad, meta.eot_id);
        if train_blocks.blocks.rows() == 0 {
            return Err(StageError::msg(format!(
                "the training split has {} tokens, fewer than seq_len + 1 = {}: lower `seq_len` or give more data",
                train.len(),
                seq_len + 1
            )));
        }
        if val_fraction > 0.0 && val_blocks.blocks.rows() == 0 {
            return Err(StageError::msg(format!(
                "the validation split has {} tokens, fewer than seq_len + 1 = {}: raise `val_fraction` or lower `seq_len`",
                val.len(),
                seq_len + 1
            )));
        }
        write_blocks(&ctx.out(TRAIN_FILE), &train_blocks.blocks)?;
        write_blocks(&ctx.out(VAL_FILE), &val_blocks.blocks)?;
        std::fs::copy(artifact.path(TOKENIZER_FILE), ctx.out(TOKENIZER_FILE))
            .map_err(|e| fail("copying tokenizer.json")(&e))?;
        TokenMeta { seq_len: Some(seq_len), ..meta }.write(ctx.out_dir())?;

        let dropped = train_blocks.dropped + val_blocks.dropped;
        let padded = train_blocks.blocks.padding + val_blocks.blocks.padding;
        let stored = train_blocks.blocks.tokens.len() + val_blocks.blocks.tokens.len();
        Ok(Metrics::from([
            ("train_blocks".into(), json!(train_blocks.blocks.rows())),
            ("val_blocks".into(), json!(val_blocks.blocks.rows())),
            ("train_tokens".into(), json!(train.len())),
            ("val_tokens".into(), json!(val.len())),
            ("dropped_tokens".into(), json!(dropped)),
            ("pad_tokens".into(), json!(padded)),
            ("padding_waste_pct".into(), json!((padded as f64 * 100_000.0 / stored.max(1) as f64).round() / 1000.0)),
        ]))
    }
}

/// Documents joined, each followed by the end-of-text token.
pub(crate) fn stream<'a>(docs: impl Iterator<Item = &'a [u32]>, eot: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for d in docs {
        out.extend_from_slice(d);
        out.push(eot);
    }
    out
}

/// A seeded random set of `round(n * fraction)` documents (at least one when the fraction is
/// positive and there are two or more) goes to validation; both splits keep document order.
fn split_by_document(docs: &TokenDocs, eot: u32, fraction: f64, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let n = docs.len();
    let mut n_val = (n as f64 * fraction).round() as usize;
    if fraction > 0.0 && n >= 2 {
        n_val = n_val.clamp(1, n - 1);
    }
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed).shuffle(&mut order);
    let mut is_val = vec![false; n];
    for &i in &order[..n_val] {
        is_val[i] = true;
    }
    let train = stream((0..n).filter(|i| !is_val[*i]).map(|i| docs.doc(i)), eot);
    let val = stream((0..n).filter(|i| is_val[*i]).map(|i| docs.doc(i)), eot);
    (train, val)
}

/// The first `1 - fraction` of the token stream trains, the rest validates (nanoGPT's split).
fn split_by_position(docs: &TokenDocs, eot: u32, fraction: f64) -> (Vec<u32>, Vec<u32>) {
    let mut all = stream((0..docs.len()).map(|i| docs.doc(i)), eot);
    let cut = ((all.len() as f64) * (1.0 - fraction)).round() as usize;
    let val = all.split_off(cut.min(all.len()));
    (all, val)
}

/// One split cut into blocks, and what did not fit.
pub(crate) struct Cut {
    pub blocks: Blocks,
    pub dropped: usize,
}

/// Windows of `seq_len + 1` tokens starting every `seq_len` tokens.
pub(crate) fn cut_blocks(stream: &[u32], seq_len: usize, pad: bool, eot: u32) -> Cut {
    let width = seq_len + 1;
    let full = if stream.len() >= width { (stream.len() - 1) / seq_len } else { 0 };
    let mut tokens = Vec::with_capacity((full + 1) * width);
    for b in 0..full {
        tokens.extend_from_slice(&stream[b * seq_len..b * seq_len + width]);
    }
    // Tokens after the last full block's end never become targets unless padded.
    let used = if full > 0 { full * seq_len + 1 } else { 0 };
    let rest = stream.len() - used;
    let (mut dropped, mut padded) = (rest, 0);
    if pad && rest > 0 {
        let start = if full > 0 { full * seq_len } else { 0 };
        let tail = &stream[start..];
        tokens.extend_from_slice(tail);
        padded = width - tail.len();
        tokens.extend(std::iter::repeat_n(eot, padded));
        dropped = 0;
    }
    Cut { blocks: Blocks { tokens, width, padding: padded }, dropped }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_overlap_by_one_and_rebuild_the_stream() {
        let s: Vec<u32> = (0..23).collect();
        let b = cut_blocks(&s, 4, false, 99);
        assert_eq!(b.blocks.rows(), 5);
        assert_eq!(&b.blocks.tokens[..5], &[0, 1, 2, 3, 4]);
        assert_eq!(&b.blocks.tokens[5..10], &[4, 5, 6, 7, 8]);
        assert_eq!(b.dropped, 2); // 21 and 22 are never targets
        let mut rebuilt: Vec<u32> = b.blocks.tokens[..5].to_vec();
        for row in b.blocks.tokens.chunks(5).skip(1) {
            rebuilt.extend_from_slice(&row[1..]);
        }
        assert_eq!(rebuilt, s[..21]);
    }

    #[test]
    fn padding_fills_the_last_block_with_end_of_text() {
        let s: Vec<u32> = (0..23).collect();
        let b = cut_blocks(&s, 4, true, 99);
        assert_eq!(b.blocks.rows(), 6);
        assert_eq!(&b.blocks.tokens[25..], &[20, 21, 22, 99, 99]);
        assert_eq!((b.dropped, b.blocks.padding), (0, 2));
        let short = cut_blocks(&[1, 2], 4, true, 9);
        assert_eq!(
            (short.blocks.rows(), short.blocks.padding, short.blocks.tokens.as_slice()),
            (1, 3, &[1, 2, 9, 9, 9][..])
        );
    }

    #[test]
    fn document_split_is_seeded_and_keeps_every_token() {
        let docs = TokenDocs::from_docs(&(0..20u32).map(|i| vec![i; 3]).collect::<Vec<_>>());
        let (t1, v1) = split_by_document(&docs, 100, 0.25, 1);
        let (t2, v2) = split_by_document(&docs, 100, 0.25, 1);
        let (_, v3) = split_by_document(&docs, 100, 0.25, 2);
        assert_eq!((&t1, &v1), (&t2, &v2));
        assert_ne!(v1, v3);
        assert_eq!(v1.len(), 5 * 4);
        assert_eq!(t1.len() + v1.len(), 20 * 4);
    }

    #[test]
    fn position_split_takes_the_tail() {
        let docs = TokenDocs::from_docs(&[vec![1; 9]]);
        let (t, v) = split_by_position(&docs, 0, 0.1);
        assert_eq!((t.len(), v.len()), (9, 1));
        assert_eq!(v, vec![0]);
    }
}
