//! A linear layer's bias: added to every row of its output, and its gradient, the column sums
//! of the output's gradient. [`bias_gelu_forward`](super::activation::bias_gelu_forward) fuses
//! the add into the GELU that follows an MLP's first projection.

use rayon::prelude::*;

use super::add_to;

/// Floats per parallel work item of the add: whole rows, about this many.
const CHUNK: usize = 4096;
/// Columns per parallel work item of the gradient.
const COLS: usize = 64;

/// Whole rows of `width` floats, about [`CHUNK`] of them.
pub(crate) fn row_chunk(width: usize) -> usize {
    width * (CHUNK / width.max(1)).max(1)
}

/// `out[r] += bias` for every row `r` of `out` (rows as wide as `bias`).
pub fn add_bias(out: &mut [f32], bias: &[f32]) {
    assert!(out.len().is_multiple_of(bias.len()), "{} floats are not rows of {}", out.len(), bias.len());
    out.par_chunks_mut(row_chunk(bias.len())).for_each(|rows| add_rows(rows, bias));
}

/// `rows[r] += bias` for each row in a block of whole rows.
pub(crate) fn add_rows(rows: &mut [f32], bias: &[f32]) {
    for row in rows.chunks_exact_mut(bias.len()) {
        add_to(row, bias);
    }
}

/// `db += sum of the rows of dout` (rows as wide as `db`). Each column sums its rows in order,
/// whatever the thread count.
pub fn bias_backward(dout: &[f32], db: &mut [f32]) {
    let width = db.len();
    assert!(dout.len().is_multiple_of(width), "{} floats are not rows of {width}", dout.len());
    db.par_chunks_mut(COLS).enumerate().for_each(|(chunk, db)| {
        let c0 = chunk * COLS;
        for row in dout.chunks_exact(width) {
            add_to(db, &row[c0..c0 + db.len()]);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::random;

    #[test]
    fn the_bias_and_its_gradient_match_plain_loops() {
        // Wider than one column block, with a partial one; more rows than one add chunk.
        let (rows, width) = (70, 150);
        let (x, bias, dout) = (random(rows * width, 1), random(width, 2), random(rows * width, 3));
        let mut out = x.clone();
        add_bias(&mut out, &bias);
        let mut db = random(width, 4);
        let mut db_ref = db.clone();
        bias_backward(&dout, &mut db);
        for r in 0..rows {
            for c in 0..width {
                assert_eq!(out[r * width + c], x[r * width + c] + bias[c]);
                db_ref[c] += dout[r * width + c];
            }
        }
        assert_eq!(db, db_ref, "each column sums its rows in order");
    }
}
