//! A batch as the model and the losses read it: B rows of T tokens, each token with its id, the
//! target predicted from it, and its position in its own example.
//!
//! A row is one sequence (pretraining: positions 0..T) or several whole examples packed one
//! after another (fine-tuning: positions restart at 0 where an example starts). Attention stays
//! inside an example and learned or rotary positions count from its start, so a packed example
//! computes what it computes alone. A token that is not predicted (a prompt, padding, the last
//! token of an example) has the target [`IGNORE`]: its loss weight is 0.

use crate::nn::kernels::attention::check_positions;
pub use crate::nn::kernels::cross_entropy::IGNORE;

/// Token rows for one forward pass.
///
/// Invariant (checked by [`Batch::check`], which the model calls): the three buffers hold B * T
/// values, and each row's positions number its examples 0, 1, 2, ... from the row's start.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    b: usize,
    t: usize,
    /// Token ids (B, T).
    pub ids: Vec<u32>,
    /// The token each position predicts, or [`IGNORE`] (B, T).
    pub targets: Vec<u32>,
    /// Each token's position in its example (B, T).
    pub pos: Vec<u32>,
    /// NEFTune's noise on the input embeddings, when training asks for it.
    pub noise: Option<EmbeddingNoise>,
    /// The seed of adapter dropout's masks for this batch, in training (none: no dropout).
    pub dropout_seed: Option<u64>,
    /// The data row each batch row was drawn from, where the loss needs more than the targets
    /// (a teacher's logits, a reference's log-probabilities); [`Batch::UNTRACKED`] otherwise (B).
    pub source: Vec<usize>,
    /// The place of this batch's first token in the batch it was cut from ([`Batch::copy_rows_from`];
    /// 0 for a whole batch). Draws that depend on a token's place (NEFTune's noise, adapter
    /// dropout's masks) count from it, so a shard of a batch draws what the whole batch does.
    pub first_token: usize,
}

/// NEFTune: uniform noise in [-1, 1] scaled by `alpha / sqrt(L * C)` added to each token's input
/// embedding, L the length of the token's example and C the width. The draws come from `seed`
/// and the token's place in the batch, so a batch gets the same noise whatever the thread count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EmbeddingNoise {
    pub alpha: f32,
    pub seed: u64,
}

impl Batch {
    /// The source of a row that does not come from a numbered data row.
    pub const UNTRACKED: usize = usize::MAX;

    /// B rows of one sequence each, ids 0 and nothing predicted.
    pub fn new(b: usize, t: usize) -> Self {
        assert!(b > 0 && t > 0, "a batch has rows and tokens");
        Batch {
            b,
            t,
            ids: vec![0; b * t],
            targets: vec![IGNORE; b * t],
            pos: (0..b * t).map(|r| (r % t) as u32).collect(),
            noise: None,
            dropout_seed: None,
            source: vec![Self::UNTRACKED; b],
            first_token: 0,
        }
    }
    /// A batch of whole rows from ids and targets (B * T each).
    pub fn whole_rows(t: usize, ids: &[u32], targets: &[u32]) -> Self {
        assert_eq!(ids.len(), targets.len(), "as many targets as ids");
        let mut batch = Batch::new(ids.len() / t, t);
        batch.ids.copy_from_slice(ids);
        batch.targets.copy_from_slice(targets);
        batch
    }
    pub fn batch(&self) -> usize {
        self.b
    }
    pub fn time(&self) -> usize {
        self.t
    }
    pub fn rows(&self) -> usize {
        self.b * self.t
    }
    /// Tokens whose target is predicted (loss weight 1).
    pub fn predicted(&self) -> usize {
        crate::nn::kernels::cross_entropy::predicted(&self.targets)
    }
    /// Row `r`'s ids, targets and positions, to fill.
    pub fn row_mut(&mut self, r: usize) -> (&mut [u32], &mut [u32], &mut [u32]) {
        let span = r * self.t..(r + 1) * self.t;
        (&mut self.ids[span.clone()], &mut self.targets[span.clone()], &mut self.pos[span])
    }

    /// Make this batch rows `first..first + B` of `whole` (a shard of it): their ids, targets,
    /// positions and sources, `whole`'s seeds, and where its tokens sit in `whole`.
    ///
    /// # Panics
    /// If the rows are not `whole`'s length or run past its end.
    pub fn copy_rows_from(&mut self, whole: &Batch, first: usize) {
        assert!(self.t == whole.t && first + self.b <= whole.b, "a shard is whole rows of its batch");
        let tokens = first * self.t..(first + self.b) * self.t;
        self.ids.copy_from_slice(&whole.ids[tokens.clone()]);
        self.targets.copy_from_slice(&whole.targets[tokens.clone()]);
        self.pos.copy_from_slice(&whole.pos[tokens.clone()]);
        self.source.copy_from_slice(&whole.source[first..first + self.b]);
        self.noise = whole.noise;
        self.dropout_seed = whole.dropout_seed;
        self.first_token = whole.first_token + tokens.start;
    }

    /// # Panics
    /// If the invariant does not hold: the batch was filled wrong, a bug.
    pub fn check(&self) {
        let rows = self.b * self.t;
        assert!(
            self.ids.len() == rows && self.targets.len() == rows && self.pos.len() == rows,
            "a batch's buffers hold B * T values"
        );
        check_positions(&self.pos, self.t);
    }

    /// The examples of the batch in order, as (first token index, length): a new one starts at
    /// every position 0.
    pub fn examples(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let starts = self.pos.iter().enumerate().filter(|(_, p)| **p == 0).map(|(i, _)| i);
        starts.map(|start| {
            let len = 1 + self.pos[start + 1..].iter().take_while(|p| **p != 0).count();
            (start, len)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_start_at_every_position_zero() {
        let mut b = Batch::new(2, 4);
        assert_eq!(b.examples().collect::<Vec<_>>(), [(0, 4), (4, 4)]);
        b.row_mut(1).2.copy_from_slice(&[0, 0, 1, 2]);
        b.check();
        assert_eq!(b.examples().collect::<Vec<_>>(), [(0, 4), (4, 1), (5, 3)]);
        assert_eq!(b.predicted(), 0);
    }

    #[test]
    #[should_panic(expected = "count up by 1")]
    fn positions_that_skip_are_a_bug() {
        let mut b = Batch::new(1, 3);
        b.pos.copy_from_slice(&[0, 2, 3]);
        b.check();
    }
}
