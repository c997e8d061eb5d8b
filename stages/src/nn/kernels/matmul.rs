//! Matrix multiplication: `out (m, n) = op(a) @ op(b)`, optionally accumulated into `out`.
//!
//! The fast path hands blocks of the output, a grid fixed by the shape alone, to ndarray's
//! `general_mat_mul` (matrixmultiply) in parallel. Each output element is computed by one call
//! that sums over all of `k` in matrixmultiply's own order, whatever the grid and the thread
//! count, so results depend on neither. [`matmul_naive`] is the reference.

use ndarray::parallel::prelude::*;
use ndarray::{linalg::general_mat_mul, s, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

/// Work items a product should offer at least: two per thread, and no fewer than this.
const MIN_BLOCKS: usize = 4;
/// Columns per block are a multiple of this (matrixmultiply's widest micro-tile).
const COL_ALIGN: usize = 16;
/// Rows of a block are a multiple of this, the least that gives a block whole micro-tiles.
const ROW_ALIGN: usize = 16;

/// Rows and columns per block of the output grid for this shape on `threads` threads: two
/// blocks per thread (at least [`MIN_BLOCKS`]), cut so as to copy the least. Each call packs
/// its rows of `a` (m/R rows by k) and its columns of `b` (k by n/C) afresh, so a grid of R
/// row blocks and C column blocks copies `k (m C + n R)` floats; the grid with the fewest
/// (ties: more row blocks) wins. On gpt2-6x384's step on two threads this packs each weight
/// two to four times per product instead of sixteen (docs/bench.md). The grid does not
/// change the bits, so it may follow the thread count.
fn grid(d: Dims, threads: usize) -> (usize, usize) {
    let blocks = (2 * threads).max(MIN_BLOCKS);
    let (most_rows, most_cols) = (d.m.div_ceil(ROW_ALIGN).max(1), d.n.div_ceil(COL_ALIGN).max(1));
    let (r, c) = (1..=blocks)
        .map(|r| (r, blocks.div_ceil(r)))
        .filter(|&(r, c)| r <= most_rows && c <= most_cols)
        .min_by_key(|&(r, c)| (d.m * c + d.n * r, std::cmp::Reverse(r)))
        .unwrap_or((1, 1));
    (d.m.div_ceil(r).max(1), d.n.div_ceil(c).next_multiple_of(COL_ALIGN).max(1))
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

/// The operands' lengths against their dimensions.
fn check(a: &[f32], b: &[f32], out: &[f32], d: Dims) {
    assert_eq!(a.len(), d.m * d.k, "a is not m * k");
    assert_eq!(b.len(), d.k * d.n, "b is not k * n");
    assert_eq!(out.len(), d.m * d.n, "out is not m * n");
}

/// `out = op(a) @ op(b)` (or `out += ...` when `accumulate`).
///
/// # Panics
/// If a slice's length does not match its dimensions.
pub fn matmul(a: &[f32], la: Layout, b: &[f32], lb: Layout, out: &mut [f32], d: Dims, accumulate: bool) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Matmul);
    check(a, b, out, d);
    let (a, b) = (view(a, d.m, d.k, la), view(b, d.k, d.n, lb));
    let beta = if accumulate { 1.0 } else { 0.0 };
    let (rows, cols) = grid(d, rayon::current_num_threads());
    let mut out = ArrayViewMut2::from_shape((d.m, d.n), out).expect("checked");
    out.axis_chunks_iter_mut(Axis(0), rows).into_par_iter().enumerate().for_each(|(i, mut out_rows)| {
        let a_rows = a.slice(s![i * rows..i * rows + out_rows.nrows(), ..]);
        out_rows.axis_chunks_iter_mut(Axis(1), cols).into_par_iter().enumerate().for_each(|(j, mut block)| {
            let b_cols = b.slice(s![.., j * cols..j * cols + block.ncols()]);
            general_mat_mul(1.0, &a_rows, &b_cols, beta, &mut block);
        });
    });
}

/// The most rows per block of [`matmul_then`] in f32: each block packs the whole of `b` again,
/// and taller blocks pack it less often, while each block's output should still sit in cache
/// for `then` (on gpt2-6x384, 256 rows measured 3% faster LoRA steps than 128; docs/bench.md).
pub const THEN_ROWS: usize = 256;

/// Rows per block of a `matmul_then` of `m` rows whose blocks are at most `most` rows: at
/// least [`MIN_BLOCKS`] blocks where there are rows enough, a whole number of 32 (the row
/// block of the AMX kernel, [`super::bf16`]). A function of the shape alone, so sums over
/// the blocks do not depend on the thread count.
pub fn then_rows(m: usize, most: usize) -> usize {
    let blocks = m.div_ceil(most).max(MIN_BLOCKS);
    m.div_ceil(blocks).next_multiple_of(32)
}

/// How many blocks of [`then_rows`] a product of `m` rows is cut into.
pub fn then_blocks(m: usize, most: usize) -> usize {
    m.div_ceil(then_rows(m, most).max(1))
}

/// Column pieces per block of a [`matmul_then`] on `threads` threads: one, unless its blocks
/// of rows are fewer than two per thread; then as many as make two tasks per thread, in whole
/// micro-tiles. The blocks of rows are fixed by the shape (what `then` sums over them must
/// not depend on the thread count); the pieces only share out each block's product, whose
/// bits do not depend on them.
fn then_pieces(d: Dims, threads: usize) -> usize {
    let blocks = then_blocks(d.m, THEN_ROWS).max(1);
    (2 * threads).div_ceil(blocks).clamp(1, d.n.div_ceil(COL_ALIGN).max(1))
}

/// [`matmul`], then `then(first_row, rows, context)` on each block of [`then_rows`] output
/// rows (at most [`THEN_ROWS`]), as soon as the block is done and while it is in cache, each
/// block with its own item of `contexts` (one per block). On more threads than the blocks
/// keep busy, each block's product is shared out in column pieces ([`then_pieces`]). The
/// product has [`matmul`]'s bits.
///
/// # Panics
/// If a slice's length does not match its dimensions, or `contexts` has not one item per block.
#[allow(clippy::too_many_arguments)]
pub fn matmul_then<C: Send>(
    a: &[f32],
    la: Layout,
    b: &[f32],
    lb: Layout,
    out: &mut [f32],
    d: Dims,
    accumulate: bool,
    contexts: impl IndexedParallelIterator<Item = C>,
    then: impl Fn(usize, &mut [f32], C) + Sync + Send,
) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Matmul);
    check(a, b, out, d);
    assert_eq!(contexts.len(), then_blocks(d.m, THEN_ROWS), "one context per block of rows");
    if d.m == 0 || d.n == 0 {
        return;
    }
    let (a, b) = (view(a, d.m, d.k, la), view(b, d.k, d.n, lb));
    let beta = if accumulate { 1.0 } else { 0.0 };
    let rows = then_rows(d.m, THEN_ROWS);
    let cols = d.n.div_ceil(then_pieces(d, rayon::current_num_threads())).next_multiple_of(COL_ALIGN);
    out.par_chunks_mut(rows * d.n).zip(contexts).enumerate().for_each(|(i, (block, context))| {
        let (first, height) = (i * rows, block.len() / d.n);
        let mut view = ArrayViewMut2::from_shape((height, d.n), &mut *block).expect("checked");
        let a_rows = a.slice(s![first..first + height, ..]);
        if cols >= d.n {
            general_mat_mul(1.0, &a_rows, &b, beta, &mut view);
        } else {
            view.axis_chunks_iter_mut(Axis(1), cols).into_par_iter().enumerate().for_each(|(j, mut piece)| {
                let b_cols = b.slice(s![.., j * cols..j * cols + piece.ncols()]);
                general_mat_mul(1.0, &a_rows, &b_cols, beta, &mut piece);
            });
        }
        then(first, block, context);
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

    /// Two blocks per thread (at least four), cut where they pack the fewest floats `m C + n R`
    /// (per unit of k).
    #[test]
    fn the_grid_packs_the_least() {
        // gpt2-6x384's step on two threads: forward (R = C = 2: 6400 against 6656 for four row
        // blocks) and a weight's gradient (four column blocks: 2688 against 3072 for 2 x 2).
        assert_eq!(grid(Dims { m: 2048, k: 384, n: 1152 }, 2), (1024, 576));
        assert_eq!(grid(Dims { m: 384, k: 2048, n: 1152 }, 2), (384, 288));
        assert_eq!(grid(Dims { m: 768, k: 128, n: 384 }, 1), (192, 384), "a tie goes to more row blocks");
        assert_eq!(grid(Dims { m: 130, k: 768, n: 128 }, 2), (65, 64), "2 even row blocks, 2 column blocks");
        assert_eq!(grid(Dims { m: 65, k: 768, n: 384 }, 2), (65, 96), "1 row block, 4 column blocks");
        assert_eq!(grid(Dims { m: 3, k: 5, n: 7 }, 2), (3, 16), "too small to split");
        // Eight threads: sixteen blocks, 4 x 4 (12800 against 13312 for 8 x 2).
        assert_eq!(grid(Dims { m: 2048, k: 384, n: 1152 }, 8), (512, 288));
    }

    #[test]
    fn every_grid_gives_the_same_bits() {
        // matrixmultiply sums each element over all of k the same way whatever block holds it,
        // and the grid follows the thread count.
        let d = Dims { m: 130, k: 300, n: 200 };
        let (a, b) = (random(d.m * d.k, 6), random(d.k * d.n, 7));
        let mut whole = vec![0.0; d.m * d.n];
        let mut c = ArrayViewMut2::from_shape((d.m, d.n), &mut whole[..]).unwrap();
        general_mat_mul(1.0, &view(&a, d.m, d.k, Layout::Transposed), &view(&b, d.k, d.n, Layout::Normal), 0.0, &mut c);
        for threads in [1, 2, 3, 8] {
            assert_ne!(grid(d, threads), (d.m, d.n), "a grid of one block");
            let mut blocked = vec![0.0; d.m * d.n];
            crate::nn::gradcheck::on_threads(threads, || {
                matmul(&a, Layout::Transposed, &b, Layout::Normal, &mut blocked, d, false)
            });
            assert!(whole.iter().zip(&blocked).all(|(x, y)| x.to_bits() == y.to_bits()), "{threads} threads");
        }
    }

    /// One piece per block where the blocks give two tasks per thread (gpt2-6x384's 2,048 rows,
    /// eight blocks, on two or four threads); beyond, enough pieces for two tasks per thread,
    /// as far as the columns go.
    #[test]
    fn then_pieces_keep_every_thread_busy() {
        let d = Dims { m: 2048, k: 384, n: 1152 };
        assert_eq!(then_blocks(d.m, THEN_ROWS), 8);
        assert_eq!((then_pieces(d, 1), then_pieces(d, 2), then_pieces(d, 4)), (1, 1, 1));
        assert_eq!((then_pieces(d, 8), then_pieces(d, 16), then_pieces(d, 32)), (2, 4, 8));
        assert_eq!(then_pieces(Dims { m: 100, k: 8, n: 40 }, 16), 3, "no more pieces than micro-tiles");
        assert_eq!(then_pieces(Dims { m: 0, k: 8, n: 0 }, 16), 1);
    }

    #[test]
    fn one_and_two_threads_give_the_same_bits() {
        same_bits_on_one_and_two_threads(matmul, Dims { m: 300, k: 96, n: 80 });
    }

    /// `matmul_then`'s blocks tile the rows in order, whole numbers of 32 rows but the last,
    /// each passed to `then` once with its context, after its product; the products have
    /// `matmul`'s bits, in f32 and in bf16, on one thread and on more than the blocks keep
    /// busy (each block's product then in column pieces).
    #[test]
    fn matmul_then_runs_then_once_per_block_after_the_product() {
        for threads in [1, 2, 16] {
            crate::nn::gradcheck::on_threads(threads, matmul_then_blocks_on_this_pool);
        }
    }

    fn matmul_then_blocks_on_this_pool() {
        use crate::nn::kernels::Precision;
        for m in [0, 1, 3, 33, 100, 300, 1024] {
            let d = Dims { m, k: 40, n: 24 };
            let (a, b) = (random(m * d.k, 1), random(d.k * d.n, 2));
            for precision in [Precision::F32, Precision::Bf16] {
                let rows = precision.then_rows(m);
                let blocks = precision.then_blocks(m);
                assert!(rows.is_multiple_of(32) && blocks == m.div_ceil(rows.max(1)), "m = {m}");
                let mut plain = random(m * d.n, 3);
                let mut fused = plain.clone();
                precision.matmul(&a, Layout::Normal, &b, Layout::Transposed, &mut plain, d, true);
                let mut seen = vec![(usize::MAX, 0, false); blocks];
                let expected = &plain;
                precision.matmul_then(
                    &a,
                    Layout::Normal,
                    &b,
                    Layout::Transposed,
                    &mut fused,
                    d,
                    true,
                    seen.par_iter_mut(),
                    |first, block, slot| {
                        let done = block.iter().zip(&expected[first * d.n..]).all(|(x, y)| x.to_bits() == y.to_bits());
                        *slot = (first, block.len() / d.n, done);
                    },
                );
                assert!(plain.iter().zip(&fused).all(|(x, y)| x.to_bits() == y.to_bits()), "m = {m}, {precision:?}");
                for (i, (first, height, done)) in seen.into_iter().enumerate() {
                    assert_eq!((first, height), (i * rows, rows.min(m - i * rows)), "m = {m}, block {i}");
                    assert!(done, "block {i} of m = {m} ({precision:?}) was not done when `then` saw it");
                }
            }
        }
    }
}
