//! Matrix multiplication: `out (m, n) = op(a) @ op(b)`, optionally accumulated into `out`.
//!
//! The fast path hands blocks of the output, a grid fixed by the shape alone, to ndarray's
//! `general_mat_mul` (matrixmultiply) in parallel. Each output element is computed by one call
//! that sums over all of `k` in matrixmultiply's own order, whatever the grid and the thread
//! count, so results depend on neither. [`matmul_naive`] is the reference.

use ndarray::parallel::prelude::*;
use ndarray::{linalg::general_mat_mul, s, ArrayView2, ArrayViewMut2, Axis};

/// Rows of the output per parallel work item, at most; the rows are split into equal blocks
/// (130 rows are two blocks of 65, not 128 and 2). Fewer, taller blocks pack the other
/// operand fewer times: 128 measured 5 to 10% faster steps than 64 (docs/bench.md).
const ROW_BLOCK: usize = 128;
/// Work items a product should offer: one with fewer row blocks also splits its columns.
const MIN_BLOCKS: usize = 4;
/// Columns per block are a multiple of this (matrixmultiply's widest micro-tile).
const COL_ALIGN: usize = 16;

/// Rows and columns per block of the output grid for this shape.
fn grid(d: Dims) -> (usize, usize) {
    let row_blocks = d.m.div_ceil(ROW_BLOCK).max(1);
    let rows = d.m.div_ceil(row_blocks).max(1);
    let col_blocks = MIN_BLOCKS.div_ceil(row_blocks).min(d.n.div_ceil(4 * COL_ALIGN)).max(1);
    let cols = d.n.div_ceil(col_blocks).next_multiple_of(COL_ALIGN).max(1);
    (rows, cols)
}

/// How an operand is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `a` is stored (m, k): row-major as written.
    Normal,
    /// `a` is stored (k, m) and used transposed.
    Transposed,
}

/// Shapes of one product: `op(a)` is (m, k), `op(b)` is (k, n), `out` is (m, n).
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

fn view(data: &[f32], rows: usize, cols: usize, layout: Layout) -> ArrayView2<'_, f32> {
    match layout {
        Layout::Normal => ArrayView2::from_shape((rows, cols), data).expect("operand length checked"),
        Layout::Transposed => {
            ArrayView2::from_shape((cols, rows), data).expect("operand length checked").reversed_axes()
        }
    }
}

/// A product with [`matmul`]'s arguments: `out = [out +] op(a) @ op(b)`.
pub type Product = fn(&[f32], Layout, &[f32], Layout, &mut [f32], Dims, bool);

/// `out = op(a) @ op(b)` (or `out += ...` when `accumulate`).
///
/// # Panics
/// If a slice's length does not match its dimensions.
pub fn matmul(a: &[f32], la: Layout, b: &[f32], lb: Layout, out: &mut [f32], d: Dims, accumulate: bool) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Matmul);
    assert_eq!(a.len(), d.m * d.k, "a is not m * k");
    assert_eq!(b.len(), d.k * d.n, "b is not k * n");
    assert_eq!(out.len(), d.m * d.n, "out is not m * n");
    let (a, b) = (view(a, d.m, d.k, la), view(b, d.k, d.n, lb));
    let beta = if accumulate { 1.0 } else { 0.0 };
    let (rows, cols) = grid(d);
    let mut out = ArrayViewMut2::from_shape((d.m, d.n), out).expect("checked");
    out.axis_chunks_iter_mut(Axis(0), rows).into_par_iter().enumerate().for_each(|(i, mut out_rows)| {
        let a_rows = a.slice(s![i * rows..i * rows + out_rows.nrows(), ..]);
        out_rows.axis_chunks_iter_mut(Axis(1), cols).into_par_iter().enumerate().for_each(|(j, mut block)| {
            let b_cols = b.slice(s![.., j * cols..j * cols + block.ncols()]);
            general_mat_mul(1.0, &a_rows, &b_cols, beta, &mut block);
        });
    });
}

/// The reference: three loops, f64 accumulation.
pub fn matmul_naive(a: &[f32], la: Layout, b: &[f32], lb: Layout, out: &mut [f32], d: Dims, accumulate: bool) {
    let (a, b) = (view(a, d.m, d.k, la), view(b, d.k, d.n, lb));
    for i in 0..d.m {
        for j in 0..d.n {
            let mut sum = 0.0f64;
            for p in 0..d.k {
                sum += a[[i, p]] as f64 * b[[p, j]] as f64;
            }
            let o = &mut out[i * d.n + j];
            *o = if accumulate { *o + sum as f32 } else { sum as f32 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{random, same_bits_on_one_and_two_threads};

    #[test]
    fn matches_the_reference_in_every_layout() {
        for (m, k, n) in [(1, 1, 1), (3, 5, 7), (130, 33, 17), (64, 128, 65)] {
            let d = Dims { m, k, n };
            let (a, b) = (random(m * k, 1), random(k * n, 2));
            for la in [Layout::Normal, Layout::Transposed] {
                for lb in [Layout::Normal, Layout::Transposed] {
                    for accumulate in [false, true] {
                        let mut fast = random(m * n, 3);
                        let mut naive = fast.clone();
                        matmul(&a, la, &b, lb, &mut fast, d, accumulate);
                        matmul_naive(&a, la, &b, lb, &mut naive, d, accumulate);
                        for (x, y) in fast.iter().zip(&naive) {
                            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{m}x{k}x{n} {la:?} {lb:?}: {x} vs {y}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_grid_splits_few_rows_evenly_and_then_columns() {
        assert_eq!(grid(Dims { m: 768, k: 128, n: 384 }), (128, 384), "6 row blocks: whole rows");
        assert_eq!(grid(Dims { m: 130, k: 768, n: 128 }), (65, 64), "2 even row blocks, 2 column blocks");
        assert_eq!(grid(Dims { m: 65, k: 768, n: 384 }), (65, 96), "1 row block, 4 column blocks");
        assert_eq!(grid(Dims { m: 3, k: 5, n: 7 }), (3, 16), "too narrow to split");
    }

    #[test]
    fn every_grid_gives_the_same_bits() {
        // matrixmultiply sums each element over all of k the same way whatever block holds it.
        let d = Dims { m: 130, k: 300, n: 200 };
        let (a, b) = (random(d.m * d.k, 6), random(d.k * d.n, 7));
        let mut whole = vec![0.0; d.m * d.n];
        let mut c = ArrayViewMut2::from_shape((d.m, d.n), &mut whole[..]).unwrap();
        general_mat_mul(1.0, &view(&a, d.m, d.k, Layout::Transposed), &view(&b, d.k, d.n, Layout::Normal), 0.0, &mut c);
        let mut blocked = vec![0.0; d.m * d.n];
        matmul(&a, Layout::Transposed, &b, Layout::Normal, &mut blocked, d, false);
        assert!(whole.iter().zip(&blocked).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    fn one_and_two_threads_give_the_same_bits() {
        same_bits_on_one_and_two_threads(matmul, Dims { m: 300, k: 96, n: 80 });
    }
}
