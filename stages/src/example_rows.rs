//! Instruction examples as rows for the model: whole examples packed into rows of T positions
//! (first-fit decreasing; an example is never split) or one example per row, with targets only
//! where the loss counts and positions restarting in each example; and the mean loss over such
//! rows. Shared by `sft` (training and validation) and `evaluate`.

use engine::StageError;

use crate::arrow_io::Examples;
use crate::batches::score_rows;
use crate::nn::batch::{Batch, IGNORE};
use crate::nn::model::{Activations, Model};
use crate::nn::params::ParamMap;

/// How examples become rows.
pub struct Layout {
    pub t: usize,
    pub packing: bool,
    pub drop_overlong: bool,
    pub train_on_prompt: bool,
    pub eot: u32,
}

/// Rows of `t` positions: ids, targets and positions, as a [`Batch`] holds them.
#[derive(Clone, Debug)]
pub struct Rows {
    pub t: usize,
    pub rows: usize,
    pub ids: Vec<u32>,
    pub targets: Vec<u32>,
    pub pos: Vec<u32>,
}

impl Rows {
    /// The first `max_batches` batches of `batch` rows, or all rows: how many rows
    /// [`rows_loss`] scores.
    pub fn rows_scored(&self, batch: usize, max_batches: Option<usize>) -> usize {
        max_batches.map_or(self.rows, |m| (m * batch).min(self.rows))
    }

    pub fn copy_row(&self, r: usize, batch: &mut Batch, i: usize) {
        let span = r * self.t..(r + 1) * self.t;
        let (ids, targets, pos) = batch.row_mut(i);
        ids.copy_from_slice(&self.ids[span.clone()]);
        targets.copy_from_slice(&self.targets[span.clone()]);
        pos.copy_from_slice(&self.pos[span]);
    }
}

/// What packing did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PackStats {
    pub examples: usize,
    pub truncated: usize,
    pub dropped: usize,
    pub rows: usize,
    /// Positions that hold an example's token (the rest is padding).
    pub filled: usize,
}

impl PackStats {
    /// Real tokens over row positions.
    pub fn efficiency(&self, t: usize) -> f64 {
        self.filled as f64 / (self.rows * t).max(1) as f64
    }
}

impl Layout {
    /// An example of n tokens fills n - 1 positions (inputs `..n-1`, targets `1..`).
    pub fn pack(&self, examples: &Examples) -> (Rows, PackStats) {
        let t = self.t;
        let mut stats = PackStats { examples: examples.len(), ..PackStats::default() };
        // (example, positions it fills)
        let mut items: Vec<(usize, usize)> = Vec::new();
        for i in 0..examples.len() {
            let len = examples.example(i).0.len().saturating_sub(1);
            if len > t {
                if self.drop_overlong {
                    stats.dropped += 1;
                    continue;
                }
                stats.truncated += 1;
            }
            if len > 0 {
                items.push((i, len.min(t)));
            }
        }
        // First-fit decreasing: longest first (ties in example order), each into the first
        // row with room; without packing, a row each.
        let mut bins: Vec<(usize, Vec<(usize, usize)>)> = Vec::new();
        if self.packing {
            items.sort_by_key(|&(i, len)| (std::cmp::Reverse(len), i));
            for item in items {
                match bins.iter_mut().find(|(free, _)| *free >= item.1) {
                    Some((free, members)) => {
                        *free -= item.1;
                        members.push(item);
                    }
                    None => bins.push((t - item.1, vec![item])),
                }
            }
        } else {
            bins = items.into_iter().map(|item| (t - item.1, vec![item])).collect();
        }
        let rows = bins.len();
        let mut out =
            Rows { t, rows, ids: vec![self.eot; rows * t], targets: vec![IGNORE; rows * t], pos: vec![0; rows * t] };
        for (r, (_, members)) in bins.iter().enumerate() {
            let mut at = r * t;
            for &(i, len) in members {
                let (ids, mask) = examples.example(i);
                for k in 0..len {
                    out.ids[at + k] = ids[k];
                    let counted = self.train_on_prompt || mask[k + 1] == 1;
                    out.targets[at + k] = if counted { ids[k + 1] } else { IGNORE };
                    out.pos[at + k] = k as u32;
                }
                at += len;
                stats.filled += len;
            }
            // Padding: its own segment, never a target.
            for (k, p) in out.pos[at..(r + 1) * t].iter_mut().enumerate() {
                *p = k as u32;
            }
        }
        stats.rows = rows;
        (out, stats)
    }
}

/// Mean loss over the counted targets of the first rows (at most `max_batches` batches of
/// `batch`), and how many targets counted. Summed in row order in f64. After each batch,
/// `after_batch` gets the rows scored so far; its error (an interrupt) stops the scoring.
pub fn rows_loss(
    model: &Model,
    params: &ParamMap,
    rows: &Rows,
    batch: usize,
    max_batches: Option<usize>,
    mut after_batch: impl FnMut(usize) -> Result<(), StageError>,
) -> Result<(f64, usize), StageError> {
    let batch = batch.min(rows.rows).max(1);
    let last = rows.rows_scored(batch, max_batches);
    let mut acts = Activations::inference(model, batch, rows.t);
    let (mut total, mut tokens) = (0.0f64, 0usize);
    let fill = |r: usize, x: &mut Batch, i: usize| rows.copy_row(r, x, i);
    score_rows(model, params, &mut acts, last, fill, |sum, counted, scored| {
        total += sum;
        tokens += counted;
        after_batch(scored)
    })?;
    Ok((total / tokens.max(1) as f64, tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(lens: &[usize]) -> Examples {
        let mut ex = Examples::default();
        for (j, &n) in lens.iter().enumerate() {
            let ids: Vec<u32> = (0..n as u32).map(|k| 10 * j as u32 + k).collect();
            // The first half is the prompt.
            let mask: Vec<u32> = (0..n).map(|k| u32::from(k >= n / 2)).collect();
            ex.push(&ids, &mask);
        }
        ex
    }

    fn layout(t: usize, packing: bool) -> Layout {
        Layout { t, packing, drop_overlong: false, train_on_prompt: false, eot: 99 }
    }

    #[test]
    fn first_fit_decreasing_packs_whole_examples_with_restarting_positions() {
        // Examples fill 5, 3, 2, 4 and 1 positions in rows of 6.
        let ex = examples(&[6, 4, 3, 5, 2]);
        let (rows, stats) = layout(6, true).pack(&ex);
        assert_eq!(stats.rows, 3);
        assert_eq!(stats.filled, 15);
        assert!((stats.efficiency(6) - 15.0 / 18.0).abs() < 1e-12);
        // Row 0: the 5 then the 1; row 1: the 4 then the 2; row 2: the 3 and padding.
        assert_eq!(&rows.pos[..6], &[0, 1, 2, 3, 4, 0]);
        assert_eq!(&rows.ids[..6], &[0, 1, 2, 3, 4, 40]);
        assert_eq!(&rows.pos[6..12], &[0, 1, 2, 3, 0, 1]);
        assert_eq!(&rows.ids[12..18], &[10, 11, 12, 99, 99, 99]);
        assert_eq!(&rows.targets[15..18], &[IGNORE; 3], "padding is never a target");
        // Example 0 (6 tokens, prompt 0..3): targets 1, 2 are prompt, 3.. are response.
        assert_eq!(&rows.targets[..5], &[IGNORE, IGNORE, 3, 4, 5]);
        let mut batch = Batch::new(3, 6);
        for r in 0..3 {
            rows.copy_row(r, &mut batch, r);
        }
        batch.check();
    }

    #[test]
    fn without_packing_each_example_has_a_row_and_long_ones_are_cut_or_dropped() {
        let ex = examples(&[3, 9, 2]);
        let (rows, stats) = layout(4, false).pack(&ex);
        assert_eq!((stats.rows, stats.truncated, stats.filled), (3, 1, 2 + 4 + 1));
        assert_eq!(&rows.ids[4..8], &[10, 11, 12, 13]);
        let dropping = Layout { drop_overlong: true, ..layout(4, false) };
        let (_, stats) = dropping.pack(&ex);
        assert_eq!((stats.rows, stats.dropped), (2, 1));
        let prompt_too = Layout { train_on_prompt: true, ..layout(4, false) };
        let (rows, _) = prompt_too.pack(&ex);
        assert_eq!(&rows.targets[..2], &[1, 2]);
    }
}
