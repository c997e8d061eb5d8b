//! Products with quantized weights: `out (rows, n) = x (rows, k) W^T` for a [`QMatrix`] `W`
//! (n, k), without dequantizing `W` whole.
//!
//! - Few rows (decoding: one token, or a draft's few): each output is
//!   `sum over groups of scale * (q . x - zero * sum(x))`, the codes converted to f32 in the
//!   loop and each group's dot product in eight lanes combined in a fixed order; outputs are
//!   split over threads in fixed chunks, each computed whole by one thread. The weights are
//!   read once, at a quarter (int8) or an eighth (int4) of f32's bytes.
//! - Many rows (evaluation): tiles of 128 weight rows are dequantized and handed to
//!   [`matmul`], so the arithmetic runs at the f32 kernel's speed.
//!
//! The path depends on the row count only, and neither path's bits depend on the thread count
//! or the instruction set (the lanes compute the same operations in the same order).

use rayon::prelude::*;

use crate::nn::kernels::gemv::for_chunks;
use crate::nn::kernels::matmul::{matmul, Dims, Layout};
use crate::nn::kernels::simd_fn;
use crate::nn::quant::{unpack, QMatrix};

/// At most this many rows take the row-by-row path.
pub const GEMV_ROWS: usize = 8;
/// Outputs per parallel work item in the row-by-row path.
const OUT_CHUNK: usize = 32;
/// Weight rows dequantized at once in the tiled path.
const TILE: usize = 128;

/// `out = x W^T` (overwritten).
///
/// # Panics
/// If the lengths do not match `rows` and `w`'s shape.
pub fn qmatmul(x: &[f32], rows: usize, w: &QMatrix, out: &mut [f32]) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Matmul);
    assert_eq!(x.len(), rows * w.cols, "x is not rows * k");
    assert_eq!(out.len(), rows * w.rows, "out is not rows * n");
    if rows <= GEMV_ROWS {
        by_rows(x, rows, w, out);
    } else {
        tiled(x, rows, w, out);
    }
}

fn by_rows(x: &[f32], rows: usize, w: &QMatrix, out: &mut [f32]) {
    let (k, n, gs, g) = (w.cols, w.rows, w.group_size, w.groups());
    let mut xsum = vec![0.0f32; rows * g];
    for (r, sums) in xsum.chunks_mut(g).enumerate() {
        for (s, xg) in sums.iter_mut().zip(x[r * k..(r + 1) * k].chunks(gs)) {
            *s = lane_sum(xg);
        }
    }
    let xsum = &xsum[..];
    let rb = w.row_bytes();
    let one = |o: usize, dst: &mut [f32]| {
        let sg = o * g..(o + 1) * g;
        output(&w.codes[o * rb..(o + 1) * rb], w.bits, &w.scales[sg.clone()], &w.zeros[sg], gs, x, xsum, dst);
    };
    let work = |o0: usize, part: &mut [f32]| {
        if rows > 1 {
            // Each output's rows are independent chains already.
            part.chunks_mut(rows).enumerate().for_each(|(i, dst)| one(o0 + i, dst));
            return;
        }
        let done = part.len() / 4 * 4;
        let mut blocks = part.chunks_exact_mut(4);
        for (b, dst) in (&mut blocks).enumerate() {
            let o = o0 + 4 * b;
            let codes = std::array::from_fn(|j| &w.codes[(o + j) * rb..(o + j + 1) * rb]);
            let scales = std::array::from_fn(|j| &w.scales[(o + j) * g..(o + j + 1) * g]);
            let zeros = std::array::from_fn(|j| &w.zeros[(o + j) * g..(o + j + 1) * g]);
            output4(codes, w.bits, scales, zeros, gs, x, xsum, dst.try_into().expect("four"));
        }
        blocks.into_remainder().chunks_mut(1).enumerate().for_each(|(i, dst)| one(o0 + done + i, dst));
    };
    let weights = n * k;
    if rows == 1 {
        for_chunks(out, OUT_CHUNK, weights, |c, part| work(c * OUT_CHUNK, part));
    } else {
        // Output-major, then transposed into `out`.
        let mut t = vec![0.0f32; n * rows];
        for_chunks(&mut t, OUT_CHUNK * rows, weights, |c, part| work(c * OUT_CHUNK, part));
        for (o, col) in t.chunks(rows).enumerate() {
            for (r, v) in col.iter().enumerate() {
                out[r * n + o] = *v;
            }
        }
    }
}

simd_fn! {
    /// One output for each of the rows of `x` (`dst.len()` rows): `codes` is the output's row
    /// of `W`, `scales` and `zeros` its groups', `xsum` each row's sum per group.
    #[allow(clippy::too_many_arguments)]
    fn output(
        codes: &[u8],
        bits: u32,
        scales: &[f32],
        zeros: &[f32],
        gs: usize,
        x: &[f32],
        xsum: &[f32],
        dst: &mut [f32],
    ) {
        let rows = dst.len();
        let (g, k) = (scales.len(), scales.len() * gs);
        let chunk_bytes = 32 * bits as usize / 8;
        let mut q = [0.0f32; 32];
        let mut codes32 = [0u8; 32];
        dst.fill(0.0);
        for j in 0..g {
            let mut acc = [[0.0f32; 8]; GEMV_ROWS];
            for c in (j * gs..(j + 1) * gs).step_by(32) {
                let packed = &codes[c / 32 * chunk_bytes..(c / 32 + 1) * chunk_bytes];
                unpack(packed, bits, &mut codes32);
                for (f, b) in q.iter_mut().zip(&codes32) {
                    *f = *b as f32;
                }
                for (r, a) in acc.iter_mut().enumerate().take(rows) {
                    let xs = &x[r * k + c..r * k + c + 32];
                    for (qs, xs) in q.chunks_exact(8).zip(xs.chunks_exact(8)) {
                        for l in 0..8 {
                            a[l] += qs[l] * xs[l];
                        }
                    }
                }
            }
            for (r, a) in acc.iter().enumerate().take(rows) {
                let d = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
                dst[r] += scales[j] * (d - zeros[j] * xsum[r * g + j]);
            }
        }
    }
}

simd_fn! {
    /// [`output`] for four outputs of one row of `x` (decoding), the four chains of additions
    /// interleaved so that they overlap; each output gets [`output`]'s operations in its order,
    /// so its bits.
    #[allow(clippy::too_many_arguments)]
    fn output4(
        codes: [&[u8]; 4],
        bits: u32,
        scales: [&[f32]; 4],
        zeros: [&[f32]; 4],
        gs: usize,
        x: &[f32],
        xsum: &[f32],
        dst: &mut [f32; 4],
    ) {
        let g = scales[0].len();
        let chunk_bytes = 32 * bits as usize / 8;
        let mut q = [[0.0f32; 32]; 4];
        let mut codes32 = [0u8; 32];
        *dst = [0.0; 4];
        for j in 0..g {
            let mut acc = [[0.0f32; 8]; 4];
            for c in (j * gs..(j + 1) * gs).step_by(32) {
                let xs: &[f32; 32] = x[c..c + 32].try_into().expect("32");
                if bits == 8 {
                    // The codes are the bytes: converted as they are loaded.
                    let at = |o: usize| -> &[u8; 32] { codes[o][c..c + 32].try_into().expect("32") };
                    let q8 = [at(0), at(1), at(2), at(3)];
                    for part in 0..4 {
                        for (a, q) in acc.iter_mut().zip(&q8) {
                            for l in 0..8 {
                                a[l] += q[part * 8 + l] as f32 * xs[part * 8 + l];
                            }
                        }
                    }
                    continue;
                }
                for (q, codes) in q.iter_mut().zip(&codes) {
                    unpack(&codes[c / 32 * chunk_bytes..(c / 32 + 1) * chunk_bytes], bits, &mut codes32);
                    for (f, b) in q.iter_mut().zip(&codes32) {
                        *f = *b as f32;
                    }
                }
                for part in 0..4 {
                    for (a, q) in acc.iter_mut().zip(&q) {
                        for l in 0..8 {
                            a[l] += q[part * 8 + l] * xs[part * 8 + l];
                        }
                    }
                }
            }
            for (o, a) in acc.iter().enumerate() {
                let d = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
                dst[o] += scales[o][j] * (d - zeros[o][j] * xsum[j]);
            }
        }
    }
}

/// The sum of a group (a multiple of 8 long) in eight lanes, combined in a fixed order.
#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut a = [0.0f32; 8];
    for xs in x.chunks_exact(8) {
        for l in 0..8 {
            a[l] += xs[l];
        }
    }
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

fn tiled(x: &[f32], rows: usize, w: &QMatrix, out: &mut [f32]) {
    let (k, n) = (w.cols, w.rows);
    let mut tile = vec![0.0f32; TILE.min(n) * k];
    let mut part = vec![0.0f32; rows * TILE.min(n)];
    for o0 in (0..n).step_by(TILE) {
        let m = TILE.min(n - o0);
        tile[..m * k].par_chunks_mut(k).enumerate().for_each(|(i, row)| w.dequantize_row(o0 + i, row));
        let part = &mut part[..rows * m];
        matmul(x, Layout::Normal, &tile[..m * k], Layout::Transposed, part, Dims { m: rows, k, n: m }, false);
        for (r, p) in part.chunks(m).enumerate() {
            out[r * n + o0..r * n + o0 + m].copy_from_slice(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{on_threads, random};
    use crate::nn::kernels::matmul::matmul_naive;
    use crate::nn::quant::{rtn, Scheme};

    fn reference(x: &[f32], rows: usize, w: &QMatrix) -> Vec<f32> {
        let mut out = vec![0.0f32; rows * w.rows];
        let d = Dims { m: rows, k: w.cols, n: w.rows };
        matmul_naive(x, Layout::Normal, &w.dequantize(), Layout::Transposed, &mut out, d, false);
        out
    }

    /// One row (four outputs at a time) gets the bits each output gets among several rows
    /// (one output at a time): the speculative verification relies on it.
    #[test]
    fn one_row_has_the_bits_it_has_among_others() {
        for (bits, gs, k, n) in [(8, 32, 64, 43), (4, 64, 128, 70)] {
            let w = rtn(&random(n * k, 5), n, k, Scheme { bits, group_size: gs, symmetric: bits == 8 });
            let x = random(3 * k, 6);
            let (mut alone, mut among) = (vec![0.0f32; n], vec![0.0f32; 3 * n]);
            qmatmul(&x[..k], 1, &w, &mut alone);
            qmatmul(&x, 3, &w, &mut among);
            assert!(alone.iter().zip(&among[..n]).all(|(a, b)| a.to_bits() == b.to_bits()), "bits {bits}");
        }
    }

    /// Both paths, int8 and int4, several group sizes and widths (one output chunk and
    /// several, a partial last tile), against dequantize-then-f32; and the same bits on one
    /// thread and two.
    #[test]
    fn quantized_products_match_dequantize_then_f32_whatever_the_threads() {
        for (bits, gs, k, n) in [(8, 32, 64, 40), (4, 32, 96, 33), (4, 64, 128, 300), (8, 128, 256, 129)] {
            let s = Scheme { bits, group_size: gs, symmetric: bits == 8 };
            let w = rtn(&random(n * k, 1), n, k, s);
            for rows in [1, 3, GEMV_ROWS, GEMV_ROWS + 1, 40] {
                let x = random(rows * k, rows as u64);
                let want = reference(&x, rows, &w);
                let run = |threads: usize| {
                    let mut out = vec![f32::NAN; rows * n];
                    on_threads(threads, || qmatmul(&x, rows, &w, &mut out));
                    out
                };
                let (one, two) = (run(1), run(2));
                for (a, b) in one.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "bits {bits} k {k} rows {rows}: {a} vs {b}");
                }
                assert!(one.iter().zip(&two).all(|(a, b)| a.to_bits() == b.to_bits()), "rows {rows}");
            }
        }
    }
}
