//! Batches of (input, target) sequences from packed blocks, for training and for evaluation.
//!
//! A packed split is blocks of `T + 1` tokens that overlap by one (see `pack`). Training draws
//! either whole blocks in a seeded shuffled order, epoch after epoch, or nanoGPT's random
//! windows of `T + 1` tokens from the split's token stream (rebuilt from the blocks). Both are
//! functions of the seed and a [`DataPos`], so a checkpoint can resume the exact stream.

use crate::checkpoint::DataPos;
use crate::nn::model::{Activations, Model};
use crate::nn::params::ParamMap;
use crate::nn::rng::SplitMix64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerKind {
    Blocks,
    Windows,
}

/// Draws training sequences of `t` tokens (plus the shifted targets).
pub struct Sampler {
    kind: SamplerKind,
    /// Blocks of `t + 1` (Blocks) or the whole token stream (Windows).
    tokens: Vec<u32>,
    t: usize,
    seed: u64,
    perm: Vec<u32>,
    perm_epoch: Option<u64>,
}

impl Sampler {
    /// `blocks` are rows of `t + 1` tokens.
    ///
    /// # Panics
    /// If there are no blocks: `pack` guarantees at least one training block.
    pub fn new(kind: SamplerKind, blocks: Vec<u32>, t: usize, seed: u64) -> Self {
        assert!(!blocks.is_empty() && blocks.len().is_multiple_of(t + 1), "blocks are rows of t + 1");
        let tokens = match kind {
            SamplerKind::Blocks => blocks,
            SamplerKind::Windows => stream_of(&blocks, t + 1),
        };
        Sampler { kind, tokens, t, seed, perm: Vec::new(), perm_epoch: None }
    }

    /// The starting data position for a run.
    pub fn start(&self) -> DataPos {
        DataPos { rng: self.seed ^ 0x5749_4E44_4F57_5321, consumed: 0 }
    }

    /// Fill `ids` and `targets` (B * T each) with the next B sequences and advance `pos`.
    pub fn fill(&mut self, pos: &mut DataPos, ids: &mut [u32], targets: &mut [u32]) {
        let t = self.t;
        for (x, y) in ids.chunks_mut(t).zip(targets.chunks_mut(t)) {
            let start = match self.kind {
                SamplerKind::Blocks => {
                    let n = (self.tokens.len() / (t + 1)) as u64;
                    let (epoch, i) = (pos.consumed / n, pos.consumed % n);
                    if self.perm_epoch != Some(epoch) {
                        self.perm = (0..n as u32).collect();
                        let mut rng = SplitMix64::new(self.seed ^ (epoch + 1).wrapping_mul(0xA24B_AED4_963E_E407));
                        rng.shuffle(&mut self.perm);
                        self.perm_epoch = Some(epoch);
                    }
                    self.perm[i as usize] as usize * (t + 1)
                }
                SamplerKind::Windows => {
                    let mut rng = SplitMix64::new(pos.rng);
                    let start = rng.below(self.tokens.len() - t);
                    pos.rng = rng.state();
                    start
                }
            };
            pos.consumed += 1;
            x.copy_from_slice(&self.tokens[start..start + t]);
            y.copy_from_slice(&self.tokens[start + 1..start + t + 1]);
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

/// Mean cross-entropy (nats per token) over `blocks` (rows of T + 1) in order, in batches of
/// `acts.batch()`, stopping after `max_batches` batches when given. Returns (mean, tokens).
///
/// A last partial batch gets its own, smaller activations. The mean is summed in f64 in block
/// order, so it does not depend on the thread count.
pub fn mean_loss(
    model: &Model,
    p: &ParamMap,
    blocks: &[u32],
    acts: &mut Activations,
    max_batches: Option<usize>,
) -> (f64, usize) {
    let (b, t) = (acts.batch(), acts.time());
    let rows: Vec<&[u32]> = blocks.chunks(t + 1).collect();
    let mut ids = vec![0u32; b * t];
    let mut targets = vec![0u32; b * t];
    let (mut total, mut tokens) = (0.0f64, 0usize);
    let mut small = None;
    for (batch, chunk) in rows.chunks(b).enumerate() {
        if max_batches.is_some_and(|m| batch >= m) {
            break;
        }
        let n = chunk.len() * t;
        for (i, row) in chunk.iter().enumerate() {
            ids[i * t..(i + 1) * t].copy_from_slice(&row[..t]);
            targets[i * t..(i + 1) * t].copy_from_slice(&row[1..]);
        }
        let acts = if chunk.len() == b {
            &mut *acts
        } else {
            small.get_or_insert_with(|| Activations::new(&model.cfg, chunk.len(), t))
        };
        total += model.loss(p, &ids[..n], &targets[..n], acts) as f64 * n as f64;
        tokens += n;
    }
    (total / tokens.max(1) as f64, tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of 4 + 1 cut from the stream 0, 1, 2, ... as `pack` cuts them.
    fn blocks(n: u32) -> Vec<u32> {
        (0..n).flat_map(|i| (i * 4..i * 4 + 5).collect::<Vec<_>>()).collect()
    }

    #[test]
    fn blocks_come_in_a_seeded_order_and_every_epoch_covers_all() {
        let mut s = Sampler::new(SamplerKind::Blocks, blocks(6), 4, 9);
        let mut pos = s.start();
        let (mut ids, mut targets) = (vec![0; 6 * 4], vec![0; 6 * 4]);
        s.fill(&mut pos, &mut ids, &mut targets);
        let mut firsts: Vec<u32> = ids.chunks(4).map(|r| r[0]).collect();
        assert_ne!(firsts, [0, 4, 8, 12, 16, 20], "shuffled");
        assert!(ids.iter().zip(&targets).all(|(x, y)| y - x == 1), "targets are the next tokens");
        firsts.sort();
        assert_eq!(firsts, [0, 4, 8, 12, 16, 20], "one epoch is a permutation");
        // Resuming from a position gives the same next batch as going on.
        let saved = pos;
        s.fill(&mut pos, &mut ids, &mut targets);
        let mut fresh = Sampler::new(SamplerKind::Blocks, blocks(6), 4, 9);
        let (mut ids2, mut targets2) = (vec![0; 24], vec![0; 24]);
        fresh.fill(&mut { saved }, &mut ids2, &mut targets2);
        assert_eq!(ids, ids2);
        assert_eq!(pos.consumed, 12);
    }

    #[test]
    fn windows_are_random_spans_of_the_rebuilt_stream() {
        let mut s = Sampler::new(SamplerKind::Windows, blocks(5), 4, 1);
        assert_eq!(s.tokens, (0..21).collect::<Vec<_>>(), "the stream comes back whole");
        let mut pos = s.start();
        let (mut ids, mut targets) = (vec![0; 8 * 4], vec![0; 8 * 4]);
        s.fill(&mut pos, &mut ids, &mut targets);
        for (x, y) in ids.chunks(4).zip(targets.chunks(4)) {
            assert!(x.windows(2).all(|w| w[1] == w[0] + 1) && y[0] == x[0] + 1 && y[3] <= 20);
        }
        let starts: std::collections::BTreeSet<u32> = ids.chunks(4).map(|r| r[0]).collect();
        assert!(starts.len() > 3, "windows start at many places: {starts:?}");
    }
}
