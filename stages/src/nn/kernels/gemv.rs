//! Products of a few rows with an f32 weight matrix (decoding, a draft's verification):
//! `out (rows, n) = x (rows, k) W`, with `W` stored (out, in) or (in, out).
//!
//! A general matrix product packs the weights into panels on every call, a full extra pass
//! over them that a handful of rows cannot amortise; here each weight is read once, where it
//! lies. Outputs are split over threads in fixed chunks, each computed whole by one thread,
//! so neither the thread count nor the instruction set changes the bits, and a row gets the
//! same bits among others as alone.
//! - (out, in): each output is an eight-lane dot product of a weight row with the input row
//!   ([`dot`]'s bits). Every row and one to four outputs make a tile whose sums stay in
//!   registers, so each weight is loaded once for all the rows, and the weights further on
//!   are prefetched while it computes. The tile is written twice: with AVX2 intrinsics (left
//!   to itself the compiler vectorized four outputs' dot products across the outputs, a
//!   shuffle per product) and as plain loops (the portable path, and the reference the tests
//!   hold the other to). Both multiply then add, each rounded, so their bits agree; a fused
//!   multiply-add would round once and differ.
//! - (in, out): each chunk of outputs accumulates `x[i] * W[i, chunk]` over `i` in order, in
//!   registers. Register tiles over rows measured no faster here (the strided weight rows,
//!   not the arithmetic, set the pace), so each row adds a block of weights that stays in L1.

use rayon::prelude::*;

use crate::nn::kernels::{axpy, dot, dot_tail, isa, simd_fn, sum_lanes};

/// Weight rows per block of the (in, out) kernel: a chunk's block is 8 KiB, at home in L1.
const I_BLOCK: usize = 32;
/// At most this many rows take these kernels (more amortise [`super::matmul::matmul`]'s packing).
pub const MAX_ROWS: usize = 8;
/// Outputs per work item.
const CHUNK: usize = 64;
/// Below this many weights a product runs on the calling thread: handing out work would cost
/// more than the work (the chunks, and so the bits, are the same).
pub const SERIAL_WEIGHTS: usize = 1 << 17;

/// `f(i, chunk)` for every `size`-long chunk of `out`, on the pool or, for small products, here.
pub(crate) fn for_chunks(out: &mut [f32], size: usize, weights: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if weights < SERIAL_WEIGHTS {
        out.chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        out.par_chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// `out = x W^T` for `W` (n, k): rows of outputs.
///
/// # Panics
/// If the lengths do not match.
pub fn rows_times_out_in(x: &[f32], rows: usize, w: &[f32], out: &mut [f32]) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Matmul);
    let k = x.len() / rows.max(1);
    let n = w.len() / k.max(1);
    assert!(x.len() == rows * k && w.len() == n * k && out.len() == rows * n && rows <= MAX_ROWS, "shapes");
    let fast = isa().has_avx2_fma();
    if rows == 1 {
        for_chunks(out, CHUNK, w.len(), |c, o| dots(fast, x, &w[c * CHUNK * k..], k, 1, o));
        return;
    }
    // Output-major per chunk, then written into the rows.
    let mut by_output = vec![0.0f32; n * rows];
    for_chunks(&mut by_output, CHUNK * rows, w.len(), |c, o| dots(fast, x, &w[c * CHUNK * k..], k, rows, o));
    for (o, col) in by_output.chunks(rows).enumerate() {
        for (r, v) in col.iter().enumerate() {
            out[r * n + o] = *v;
        }
    }
}

/// For each output `o` of the chunk (`out.len() / rows` of them, output-major), its dot
/// product with each row of `x`, with the bits of [`dot`]. All the rows are one tile, so each
/// weight comes from memory once; the tile's outputs are as many as leave its sums, the
/// weights and a row of `x` room in sixteen registers.
fn dots(fast: bool, x: &[f32], w: &[f32], k: usize, rows: usize, out: &mut [f32]) {
    match rows {
        1 => dots_in_tiles::<1, 4>(fast, x, w, k, out),
        2 => dots_in_tiles::<2, 4>(fast, x, w, k, out),
        3 => dots_in_tiles::<3, 2>(fast, x, w, k, out),
        4 => dots_in_tiles::<4, 2>(fast, x, w, k, out),
        5 => dots_in_tiles::<5, 2>(fast, x, w, k, out),
        6 => dots_in_tiles::<6, 2>(fast, x, w, k, out),
        7 => dots_in_tiles::<7, 1>(fast, x, w, k, out),
        _ => dots_in_tiles::<8, 1>(fast, x, w, k, out),
    }
}

/// [`dots`] for `R` rows, `O` outputs at a time.
fn dots_in_tiles<const R: usize, const O: usize>(fast: bool, x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    let done = out.len() / R / O * O;
    let mut tiles = out.chunks_exact_mut(O * R);
    for (t, dst) in (&mut tiles).enumerate() {
        let ws: [&[f32]; O] = std::array::from_fn(|j| &w[(t * O + j) * k..(t * O + j + 1) * k]);
        for (r, sums) in out_in_sums::<R, O>(fast, x, k, ws).iter().enumerate() {
            for (j, sum) in sums.iter().enumerate() {
                dst[j * R + r] = sum + dot_tail(&x[r * k..(r + 1) * k], ws[j]);
            }
        }
    }
    for (i, dst) in tiles.into_remainder().chunks_mut(R).enumerate() {
        let wo = &w[(done + i) * k..(done + i + 1) * k];
        for (r, d) in dst.iter_mut().enumerate() {
            *d = dot(&x[r * k..(r + 1) * k], wo);
        }
    }
}

/// [`dot`] of each of `R` rows of `x` (each `k` long) with each of `O` weight rows, over the
/// whole chunks of eight (its eight lanes, summed as it sums them).
fn out_in_sums<const R: usize, const O: usize>(fast: bool, x: &[f32], k: usize, w: [&[f32]; O]) -> [[f32; O]; R] {
    assert!(x.len() == R * k && w.iter().all(|w| w.len() == k), "tile shapes");
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: the CPU has AVX2 (`fast`), and the lengths are as asserted.
        return unsafe { avx2::out_in_sums::<R, O>(x, k, w) };
    }
    let _ = fast;
    let mut acc = [[[0.0f32; 8]; O]; R];
    for c in (0..k / 8 * 8).step_by(8) {
        for (r, acc) in acc.iter_mut().enumerate() {
            for (o, acc) in acc.iter_mut().enumerate() {
                for (l, a) in acc.iter_mut().enumerate() {
                    *a += x[r * k + c + l] * w[o][c + l];
                }
            }
        }
    }
    acc.map(|acc| acc.map(sum_lanes))
}

/// `out = x W` for `W` (k, n).
///
/// # Panics
/// If the lengths do not match.
pub fn rows_times_in_out(x: &[f32], rows: usize, w: &[f32], out: &mut [f32]) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Matmul);
    let k = x.len() / rows.max(1);
    let n = w.len() / k.max(1);
    assert!(x.len() == rows * k && w.len() == n * k && out.len() == rows * n && rows <= MAX_ROWS, "shapes");
    let chunks = n.div_ceil(CHUNK);
    let mut by_chunk = vec![0.0f32; chunks * rows * CHUNK];
    for_chunks(&mut by_chunk, rows * CHUNK, w.len(), |c, acc| {
        let cols = c * CHUNK..((c + 1) * CHUNK).min(n);
        accumulate(x, w, k, n, cols.start, cols.len(), rows, acc);
    });
    for r in 0..rows {
        for c in 0..chunks {
            let width = CHUNK.min(n - c * CHUNK);
            let from = &by_chunk[(c * rows + r) * CHUNK..(c * rows + r) * CHUNK + width];
            out[r * n + c * CHUNK..r * n + c * CHUNK + width].copy_from_slice(from);
        }
    }
}

simd_fn! {
    /// Columns `start..start + width` of `x W` for each row into `acc` (rows of `CHUNK`):
    /// `sum over i of x[r, i] * W[i, cols]`, in order of `i`. A whole chunk sums in a local
    /// array the compiler keeps in registers ([`CHUNK`] independent sums), a block of weight
    /// rows at a time for every row in turn (the same operations in the same order as one row
    /// alone, so the same bits).
    #[allow(clippy::too_many_arguments)]
    fn accumulate(x: &[f32], w: &[f32], k: usize, n: usize, start: usize, width: usize, rows: usize, acc: &mut [f32]) {
        if width == CHUNK {
            // Blocks of I_BLOCK weight rows: each block comes from memory once and stays in L1
            // while every row adds it into its running sums.
            let mut sums = [[0.0f32; CHUNK]; MAX_ROWS];
            let block = if rows == 1 { k.max(1) } else { I_BLOCK };
            for i0 in (0..k).step_by(block) {
                let i1 = (i0 + block).min(k);
                for (r, sums) in sums.iter_mut().enumerate().take(rows) {
                    let mut local = *sums;
                    for (i, xi) in x[r * k + i0..r * k + i1].iter().enumerate() {
                        let at = (i0 + i) * n + start;
                        let wi: &[f32; CHUNK] = w[at..at + CHUNK].try_into().expect("a whole chunk");
                        for j in 0..CHUNK {
                            local[j] += xi * wi[j];
                        }
                    }
                    *sums = local;
                }
            }
            for (r, sums) in sums.iter().enumerate().take(rows) {
                acc[r * CHUNK..(r + 1) * CHUNK].copy_from_slice(sums);
            }
            return;
        }
        for r in 0..rows {
            let a = &mut acc[r * CHUNK..r * CHUNK + width];
            a.fill(0.0);
            for (i, xi) in x[r * k..(r + 1) * k].iter().enumerate() {
                axpy(*xi, &w[i * n + start..i * n + start + width], a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// How many floats ahead of its loads a tile prefetches each weight row. Left to the
    /// hardware prefetcher, a tile of several rows waited on memory most of the time: this
    /// measured a pass over four rows of a 6x384 llama at 1.3 single steps instead of 1.5.
    const PREFETCH_AHEAD: usize = 1024;

    /// [`super::out_in_sums`] on AVX2: the weights' eight lanes loaded once for all rows,
    /// each row's loaded once for all weights.
    ///
    /// # Safety
    /// The CPU must have AVX2; `x` holds `R * k` values and each of `w` `k`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn out_in_sums<const R: usize, const O: usize>(
        x: &[f32],
        k: usize,
        w: [&[f32]; O],
    ) -> [[f32; O]; R] {
        let mut acc = [[_mm256_setzero_ps(); O]; R];
        let (xp, wp) = (x.as_ptr(), w.map(<[f32]>::as_ptr));
        for c in (0..k / 8 * 8).step_by(8) {
            if c % 16 == 0 {
                // A line of each weight row, far enough ahead to be in L1 when its turn comes
                // (a hint: an address past the weights is harmless).
                for wp in &wp {
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(c + PREFETCH_AHEAD) as *const i8);
                }
            }
            let mut ws = [_mm256_setzero_ps(); O];
            for (v, wp) in ws.iter_mut().zip(&wp) {
                *v = _mm256_loadu_ps(wp.add(c));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add(r * k + c));
                for (a, wv) in acc.iter_mut().zip(&ws) {
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(xv, *wv));
                }
            }
        }
        let mut out = [[0.0f32; O]; R];
        for (out, acc) in out.iter_mut().zip(&acc) {
            for (out, acc) in out.iter_mut().zip(acc) {
                *out = sum_lanes(*acc);
            }
        }
        out
    }

    /// [`super::sum_lanes`] of a register: the high half onto the low, then pairs, as it adds.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum_lanes(v: __m256) -> f32 {
        let b = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let pairs = _mm_hadd_ps(b, b);
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{on_threads, random};
    use crate::nn::kernels::matmul::{matmul_naive, Dims, Layout};

    /// The blocked kernels compute each output as the plain loops do, bit for bit: (out, in)
    /// as one [`dot`], (in, out) as a sum over `i` in order from zero.
    #[test]
    fn each_output_has_the_bits_of_the_plain_loop() {
        for (rows, k, n) in [(1, 128, 390), (5, 40, 67), (2, 9, 130), (7, 70, 131), (8, 64, 200), (3, 13, 64)] {
            let (x, w) = (random(rows * k, 3), random(k * n, 4));
            let mut out = vec![0.0f32; rows * n];
            rows_times_out_in(&x, rows, &w, &mut out);
            for r in 0..rows {
                for o in 0..n {
                    let want = dot(&x[r * k..(r + 1) * k], &w[o * k..(o + 1) * k]);
                    assert_eq!(out[r * n + o].to_bits(), want.to_bits(), "out_in {rows}x{k}x{n} at ({r}, {o})");
                }
            }
            rows_times_in_out(&x, rows, &w, &mut out);
            for r in 0..rows {
                for o in 0..n {
                    let want = (0..k).fold(0.0f32, |s, i| s + x[r * k + i] * w[i * n + o]);
                    assert_eq!(out[r * n + o].to_bits(), want.to_bits(), "in_out {rows}x{k}x{n} at ({r}, {o})");
                }
            }
        }
    }

    /// The AVX2 tiles compute what the portable ones do, bit for bit.
    #[test]
    fn avx2_tiles_have_the_bits_of_the_portable_ones() {
        if !isa().has_avx2_fma() {
            eprintln!("SKIPPED: no AVX2 on this machine; the portable tiles are the only path");
            return;
        }
        let k = 77;
        let (x, w) = (random(8 * k, 5), random(4 * k, 6));
        fn both<const R: usize, const O: usize>(x: &[f32], w: &[f32], k: usize) {
            let ws: [&[f32]; O] = std::array::from_fn(|j| &w[j * k..(j + 1) * k]);
            let bits = |fast| {
                let sums = out_in_sums::<R, O>(fast, &x[..R * k], k, ws);
                sums.iter().flatten().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(bits(true), bits(false), "{R} rows by {O} outputs");
        }
        both::<1, 4>(&x, &w, k);
        both::<2, 4>(&x, &w, k);
        both::<5, 2>(&x, &w, k);
        both::<8, 1>(&x, &w, k);
    }

    #[test]
    fn few_rows_match_the_reference_in_both_layouts_whatever_the_threads() {
        for (rows, k, n) in [(1, 16, 5), (3, 64, 130), (8, 96, 64), (2, 40, 200)] {
            let (x, w) = (random(rows * k, 1), random(k * n, 2));
            let d = Dims { m: rows, k, n };
            for (layout, f) in [
                (Layout::Transposed, rows_times_out_in as fn(&[f32], usize, &[f32], &mut [f32])),
                (Layout::Normal, rows_times_in_out),
            ] {
                let mut want = vec![0.0f32; rows * n];
                matmul_naive(&x, Layout::Normal, &w, layout, &mut want, d, false);
                let run = |threads: usize| {
                    let mut out = vec![f32::NAN; rows * n];
                    on_threads(threads, || f(&x, rows, &w, &mut out));
                    out
                };
                let (one, two) = (run(1), run(2));
                for (a, b) in one.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{rows}x{k}x{n} {layout:?}: {a} vs {b}");
                }
                assert!(one.iter().zip(&two).all(|(a, b)| a.to_bits() == b.to_bits()));
                // One row alone gets the bits it gets among others.
                let mut first = vec![0.0f32; n];
                f(&x[..k], 1, &w, &mut first);
                assert!(first.iter().zip(&one[..n]).all(|(a, b)| a.to_bits() == b.to_bits()), "{layout:?}");
            }
        }
    }
}
