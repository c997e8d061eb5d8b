//! Matrix multiplication: `out (m, n) = op(a) @ op(b)`, optionally accumulated into `out`.
//!
//! The fast path hands row blocks of a fixed size to ndarray's `general_mat_mul`
//! (matrixmultiply) in parallel. Each output element is computed by one call whatever the
//! thread count, so results do not depend on it. [`matmul_naive`] is the reference.

use ndarray::{linalg::general_mat_mul, ArrayView2, ArrayViewMut2};
use rayon::prelude::*;

/// Rows of the output per parallel work item: fixed, never "one chunk per thread".
const ROW_BLOCK: usize = 64;

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

/// `out = op(a) @ op(b)` (or `out += ...` when `accumulate`).
///
/// # Panics
/// If a slice's length does not match its dimensions.
pub fn matmul(a: &[f32], la: Layout, b: &[f32], lb: Layout, out: &mut [f32], d: Dims, accumulate: bool) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Matmul);
    assert_eq!(a.len(), d.m * d.k, "a is not m * k");
    assert_eq!(b.len(), d.k * d.n, "b is not k * n");
    assert_eq!(out.len(), d.m * d.n, "out is not m * n");
    let b = view(b, d.k, d.n, lb);
    let beta = if accumulate { 1.0 } else { 0.0 };
    out.par_chunks_mut(ROW_BLOCK * d.n.max(1)).enumerate().for_each(|(block, out_rows)| {
        let rows = out_rows.len() / d.n.max(1);
        let first = block * ROW_BLOCK;
        let a_rows = match la {
            Layout::Normal => {
                ArrayView2::from_shape((rows, d.k), &a[first * d.k..(first + rows) * d.k]).expect("in range")
            }
            Layout::Transposed => {
                let whole = ArrayView2::from_shape((d.k, d.m), a).expect("checked").reversed_axes();
                whole.slice_move(ndarray::s![first..first + rows, ..])
            }
        };
        let mut c = ArrayViewMut2::from_shape((rows, d.n), out_rows).expect("in range");
        general_mat_mul(1.0, &a_rows, &b, beta, &mut c);
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
    use crate::nn::gradcheck::random;

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
    fn one_and_two_threads_give_the_same_bits() {
        let d = Dims { m: 300, k: 96, n: 80 };
        let (a, b) = (random(d.m * d.k, 4), random(d.k * d.n, 5));
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut out = vec![0.0; d.m * d.n];
            pool.install(|| matmul(&a, Layout::Normal, &b, Layout::Transposed, &mut out, d, false));
            out
        };
        let (one, two) = (run(1), run(2));
        assert!(one.iter().zip(&two).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
