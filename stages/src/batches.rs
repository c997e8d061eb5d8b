//! Batches of (input, target) sequences from packed blocks, for training and for evaluation.
//!
//! A packed split is blocks of `T + 1` tokens that overlap by one (see `pack`). Training draws
//! either whole blocks in a seeded shuffled order, epoch after epoch, or nanoGPT's random
//! windows of `T + 1` tokens from the split's token stream (rebuilt from the blocks). Both are
//! functions of the seed and a [`DataPos`], so a checkpoint can resume the exact stream.
//!
//! Padding that `pack` added to fill a split's last block is never a target: its targets are
//! [`IGNORE`]d in blocks, and windows are drawn from the stream without it.

use engine::StageError;

use crate::arrow_io::Blocks;
use crate::checkpoint::DataPos;
use crate::nn::batch::{Batch, IGNORE};
use crate::nn::model::{Activations, Model};
use crate::nn::params::ParamMap;
use crate::nn::rng::SplitMix64;

impl Blocks {
    pub fn rows(&self) -> usize {
        self.tokens.len() / self.width
    }

    /// Row `r`'s inputs (its first T tokens) and targets (its last T), with the targets that
    /// are padding set to [`IGNORE`].
    fn fill_row(&self, r: usize, ids: &mut [u32], targets: &mut [u32]) {
        let row = &self.tokens[r * self.width..(r + 1) * self.width];
        let t = self.width - 1;
        ids.copy_from_slice(&row[..t]);
        targets.copy_from_slice(&row[1..]);
        if r + 1 == self.rows() {
            targets[t - self.padding..].fill(IGNORE);
        }
    }

    /// How many tokens [`Blocks::stream`] holds, without building it.
    pub fn stream_len(&self) -> usize {
        match self.rows() {
            0 => 0,
            rows => rows * (self.width - 1) + 1 - self.padding,
        }
    }

    /// The first `max_batches` batches of `batch` rows, or all rows: how many rows
    /// [`mean_loss`] scores.
    pub fn rows_scored(&self, batch: usize, max_batches: Option<usize>) -> usize {
        max_batches.map_or(self.rows(), |m| (m * batch).min(self.rows()))
    }

    /// The token stream the blocks were cut from, without the padding.
    pub fn stream(&self) -> Vec<u32> {
        let mut stream = stream_of(&self.tokens, self.width);
        stream.truncate(stream.len() - self.padding);
        stream
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerKind {
    Blocks,
    Windows,
}

/// Rows in a seeded shuffled order, epoch after epoch: the `consumed`-th row drawn is a
/// function of the seed and `consumed` alone, so a run resumes its exact order.
pub struct EpochOrder {
    seed: u64,
    perm: Vec<u32>,
    perm_epoch: Option<u64>,
}

impl EpochOrder {
    pub fn new(seed: u64) -> Self {
        EpochOrder { seed, perm: Vec::new(), perm_epoch: None }
    }

    /// The row drawn `consumed`-th from `n` rows.
    pub fn row(&mut self, consumed: u64, n: usize) -> usize {
        let n = n as u64;
        let (epoch, i) = (consumed / n, consumed % n);
        if self.perm_epoch != Some(epoch) {
            self.perm = (0..n as u32).collect();
            let mut rng = SplitMix64::new(self.seed ^ (epoch + 1).wrapping_mul(0xA24B_AED4_963E_E407));
            rng.shuffle(&mut self.perm);
            self.perm_epoch = Some(epoch);
        }
        self.perm[i as usize] as usize
    }
}

/// Draws training sequences of `t` tokens (plus the shifted targets).
pub struct Sampler {
    source: Source,
    t: usize,
    seed: u64,
    order: EpochOrder,
}

/// What a [`Sampler`] draws from.
enum Source {
    /// Whole blocks.
    Blocks(Blocks),
    /// Windows of the token stream the blocks were cut from, without padding.
    Stream(Vec<u32>),
}

impl Sampler {
    /// Sequences of `blocks.width - 1` tokens.
    ///
    /// # Panics
    /// If there are no blocks (`pack` guarantees at least one training block), or if windows
    /// are asked of fewer than T + 1 tokens (see [`Sampler::windows_fit`]).
    pub fn new(kind: SamplerKind, blocks: Blocks, seed: u64) -> Self {
        assert!(
            !blocks.tokens.is_empty() && blocks.tokens.len().is_multiple_of(blocks.width),
            "blocks are rows of t + 1"
        );
        let t = blocks.width - 1;
        let source = match kind {
            SamplerKind::Blocks => Source::Blocks(blocks),
            SamplerKind::Windows => {
                assert!(Self::windows_fit(&blocks), "random windows need at least T + 1 tokens");
                Source::Stream(blocks.stream())
            }
        };
        Sampler { source, t, seed, order: EpochOrder::new(seed) }
    }

    /// Whether the split holds a window of T + 1 tokens that are not padding.
    pub fn windows_fit(blocks: &Blocks) -> bool {
        blocks.stream_len() > blocks.width - 1
    }

    /// The starting data position for a run.
    pub fn start(&self) -> DataPos {
        DataPos { rng: self.seed ^ 0x5749_4E44_4F57_5321, consumed: 0 }
    }

    /// Fill the ids and targets of `batch` (B rows of T) with the next B sequences and advance
    /// `pos`. Each row is one sequence: its positions stay 0..T. Drawn blocks are the rows'
    /// sources.
    pub fn fill(&mut self, pos: &mut DataPos, batch: &mut Batch) {
        let t = self.t;
        assert_eq!(batch.time(), t, "the batch's rows are T long");
        let rows = batch.ids.chunks_mut(t).zip(batch.targets.chunks_mut(t)).zip(&mut batch.source);
        for ((x, y), source) in rows {
            match &self.source {
                Source::Blocks(blocks) => {
                    let row = self.order.row(pos.consumed, blocks.rows());
                    blocks.fill_row(row, x, y);
                    *source = row;
                }
                Source::Stream(stream) => {
                    let mut rng = SplitMix64::new(pos.rng);
                    let start = rng.below(stream.len() - t);
                    pos.rng = rng.state();
                    x.copy_from_slice(&stream[start..start + t]);
                    y.copy_from_slice(&stream[start + 1..start + t + 1]);
                    *source = Batch::UNTRACKED;
                }
            }
            pos.consumed += 1;
        }
    }
}

/// The token stream that blocks of `width` were cut from: consecutive blocks share one token,
/// so it is the first block whole and every later one without its first token.
pub fn stream_of(blocks: &[u32], width: usize) -> Vec<u32> {
    let mut stream = Vec::with_capacity(blocks.len());
    for (i, row) in blocks.chunks(width).enumerate() {
        stream.extend_from_slice(if i == 0 { row } else { &row[1..] });
    }
    stream
}

/// What [`mean_loss`] scored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scored {
    /// Mean cross-entropy in nats per predicted token.
    pub mean: f64,
    /// Tokens predicted (targets that are not padding).
    pub tokens: usize,
    /// Blocks scored, from the first.
    pub rows: usize,
}

/// Mean cross-entropy over the targets of `blocks` in order (padding is not predicted), in
/// batches of `acts.batch()` (inference activations will do), stopping after `max_batches`
/// batches when given. After each batch, `after_batch` gets the number of blocks scored so far
/// (for progress); an error from it (an interrupt) stops the scoring.
///
/// A last partial batch gets its own, smaller activations. The mean is summed in f64 in block
/// order, so it does not depend on the thread count.
pub fn mean_loss(
    model: &Model,
    p: &ParamMap,
    blocks: &Blocks,
    acts: &mut Activations,
    max_batches: Option<usize>,
    mut after_batch: impl FnMut(usize) -> Result<(), StageError>,
) -> Result<Scored, StageError> {
    assert_eq!(blocks.width, acts.time() + 1, "blocks are rows of T + 1");
    let last = blocks.rows_scored(acts.batch(), max_batches);
    let fill = |r: usize, batch: &mut Batch, i: usize| {
        let (ids, targets, _) = batch.row_mut(i);
        blocks.fill_row(r, ids, targets);
    };
    let (mut total, mut tokens) = (0.0f64, 0usize);
    let rows = score_rows(model, p, acts, last, fill, |sum, counted, rows| {
        // Each batch's mean as the f32 a loss reports, weighed by its tokens.
        total += (sum / counted.max(1) as f64) as f32 as f64 * counted as f64;
        tokens += counted;
        after_batch(rows)
    })?;
    Ok(Scored { mean: total / tokens.max(1) as f64, tokens, rows })
}

/// Forward passes over rows `0..last` in order, in batches of `acts.batch()` rows (inference
/// activations will do): `fill(r, batch, i)` writes row `r` into row `i` of the batch, and
/// `scored` gets each batch's summed target loss, its counted targets and the rows scored so
/// far; an error from it (an interrupt) stops the scoring. A last partial batch gets its own,
/// smaller activations. Returns the rows scored.
pub fn score_rows(
    model: &Model,
    p: &ParamMap,
    acts: &mut Activations,
    last: usize,
    mut fill: impl FnMut(usize, &mut Batch, usize),
    mut scored: impl FnMut(f64, usize, usize) -> Result<(), StageError>,
) -> Result<usize, StageError> {
    let (b, t) = (acts.batch(), acts.time());
    let mut batch = Batch::new(b, t);
    let mut small = None;
    let mut rows = 0;
    while rows < last {
        let chunk = b.min(last - rows);
        let (acts, batch) = if chunk == b {
            (&mut *acts, &mut batch)
        } else {
            let (a, b) = small.get_or_insert_with(|| (Activations::inference(model, chunk, t), Batch::new(chunk, t)));
            (a, b)
        };
        for i in 0..chunk {
            fill(rows + i, batch, i);
        }
        let (sum, counted) = model.target_losses(p, batch, acts);
        rows += chunk;
        scored(sum, counted, rows)?;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of 4 + 1 cut from the stream 0, 1, 2, ... as `pack` cuts them.
    fn blocks(n: u32) -> Blocks {
        Blocks { tokens: (0..n).flat_map(|i| (i * 4..i * 4 + 5).collect::<Vec<_>>()).collect(), width: 5, padding: 0 }
    }

    /// The same, with the last `padding` tokens replaced by an end-of-text token 99.
    fn padded(n: u32, padding: usize) -> Blocks {
        let mut b = blocks(n);
        let len = b.tokens.len();
        b.tokens[len - padding..].fill(99);
        Blocks { padding, ..b }
    }

    #[test]
    fn blocks_come_in_a_seeded_order_and_every_epoch_covers_all() {
        let mut s = Sampler::new(SamplerKind::Blocks, blocks(6), 9);
        let mut pos = s.start();
        let mut batch = Batch::new(6, 4);
        s.fill(&mut pos, &mut batch);
        let (ids, targets) = (batch.ids.clone(), batch.targets.clone());
        let mut firsts: Vec<u32> = ids.chunks(4).map(|r| r[0]).collect();
        assert_ne!(firsts, [0, 4, 8, 12, 16, 20], "shuffled");
        assert!(ids.iter().zip(&targets).all(|(x, y)| y - x == 1), "targets are the next tokens");
        firsts.sort();
        assert_eq!(firsts, [0, 4, 8, 12, 16, 20], "one epoch is a permutation");
        // Resuming from a position gives the same next batch as going on.
        let saved = pos;
        s.fill(&mut pos, &mut batch);
        let mut fresh = Sampler::new(SamplerKind::Blocks, blocks(6), 9);
        let mut again = Batch::new(6, 4);
        fresh.fill(&mut { saved }, &mut again);
        assert_eq!(batch.ids, again.ids);
        assert_eq!(pos.consumed, 12);
    }

    #[test]
    fn windows_are_random_spans_of_the_rebuilt_stream() {
        let mut s = Sampler::new(SamplerKind::Windows, blocks(5), 1);
        let Source::Stream(stream) = &s.source else { panic!("windows draw from the stream") };
        assert_eq!(stream, &(0..21).collect::<Vec<_>>(), "the stream comes back whole");
        let mut pos = s.start();
        let mut batch = Batch::new(8, 4);
        s.fill(&mut pos, &mut batch);
        let (ids, targets) = (&batch.ids, &batch.targets);
        for (x, y) in ids.chunks(4).zip(targets.chunks(4)) {
            assert!(x.windows(2).all(|w| w[1] == w[0] + 1) && y[0] == x[0] + 1 && y[3] <= 20);
        }
        let starts: std::collections::BTreeSet<u32> = ids.chunks(4).map(|r| r[0]).collect();
        assert!(starts.len() > 3, "windows start at many places: {starts:?}");
    }

    #[test]
    fn padding_is_never_a_target() {
        // Blocks: the padded row's last two targets are ignored, its inputs kept.
        let mut s = Sampler::new(SamplerKind::Blocks, padded(3, 2), 5);
        let mut pos = s.start();
        let mut batch = Batch::new(3, 4);
        s.fill(&mut pos, &mut batch);
        let (ids, targets) = (&batch.ids, &batch.targets);
        let row = ids.chunks(4).position(|r| r[0] == 8).expect("the last block is drawn");
        assert_eq!(&ids[row * 4..row * 4 + 4], &[8, 9, 10, 99]);
        assert_eq!(&targets[row * 4..row * 4 + 4], &[9, 10, IGNORE, IGNORE]);
        assert_eq!(targets.iter().filter(|t| **t == IGNORE).count(), 2, "other rows are whole");
        // Windows: drawn from the stream without its padding.
        let s = Sampler::new(SamplerKind::Windows, padded(3, 2), 5);
        let Source::Stream(stream) = &s.source else { panic!("windows draw from the stream") };
        assert_eq!(stream, &(0..11).collect::<Vec<_>>());
        assert!(Sampler::windows_fit(&padded(1, 0)) && !Sampler::windows_fit(&padded(1, 1)));
        for b in [blocks(0), blocks(1), blocks(4), padded(3, 2), padded(1, 4)] {
            assert_eq!(b.stream_len(), b.stream().len(), "{b:?}");
        }
    }

    #[test]
    fn mean_loss_scores_every_target_but_padding() {
        use crate::nn::model::ModelConfig;
        let cfg = ModelConfig::gpt2(100, 4, 1, 2, 8, false);
        let p = cfg.init(1);
        let model = Model::new(cfg, &p);
        let blocks = padded(5, 3);
        let mut seen = Vec::new();
        let scored = mean_loss(&model, &p, &blocks, &mut Activations::inference(&model, 2, 4), None, |rows| {
            seen.push(rows);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [2, 4, 5], "blocks scored after each batch");
        assert_eq!((scored.tokens, scored.rows), (5 * 4 - 3, 5));
        // Score each block alone, whole, and drop the padded targets' losses by hand.
        let mut acts = Activations::new(&cfg, 1, 4);
        let mut total = 0.0;
        for row in blocks.tokens.chunks(5) {
            model.loss(&p, &Batch::whole_rows(4, &row[..4], &row[1..]), &mut acts);
            let kept = if row[4] == 99 { 1 } else { 4 };
            total += acts.row_losses()[..kept].iter().sum::<f64>();
        }
        assert!((scored.mean - total / 17.0).abs() < 1e-6, "{} vs {}", scored.mean, total / 17.0);
        let first = mean_loss(&model, &p, &blocks, &mut Activations::new(&cfg, 2, 4), Some(1), |_| Ok(())).unwrap();
        assert_eq!(
            first.mean,
            mean_loss(&model, &p, &blocks, &mut Activations::inference(&model, 2, 4), Some(1), |_| Ok(()))
                .unwrap()
                .mean
        );
        assert_eq!((first.tokens, first.rows), (8, 2));
        // An interrupt after the first batch stops the scoring there.
        let mut batches = 0;
        let stopped = mean_loss(&model, &p, &blocks, &mut Activations::inference(&model, 2, 4), None, |_| {
            batches += 1;
            Err(StageError::Interrupted)
        });
        assert!(matches!(stopped, Err(StageError::Interrupted)) && batches == 1);
    }
}
