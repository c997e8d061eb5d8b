//! Products with a rank-`r` factor on one block of rows, on the calling thread: a LoRA
//! adapter's `x A^T`, `xa B^T`, `dout B`, `dxa A` and its gradients' block sums, run inside
//! the block's weight product while its rows are in cache.
//!
//! A general product would copy both operands into packed panels and pad `r` (8, say) up to
//! its micro-tile, for a few FLOPs per element copied; these read the rows where they are.
//! Each sum is written out in a fixed order (a dot product in [`LANES`] lanes, a sum over
//! rows or over `r` in order), so every compiled path gives the same bits.

use super::simd_fn;

/// Lanes of a dot product: element `p` of the row is summed in lane `p % LANES`.
pub const LANES: usize = 16;

/// Rows of `m` a pass of [`dot_rows`] takes at once, against two rows of `x`: each chunk of `x`
/// is loaded once per group, each chunk of `m` once per two rows, into 2 x 8 sums held in
/// registers.
const GROUP: usize = 8;

simd_fn! {
    /// `out (n, r) = x (n, k) m^T`, `m` stored (r, k): each output the dot product of a row of
    /// `x` and a row of `m` ([`dot_reference`]'s order).
    pub fn dot_rows(x: &[f32], m: &[f32], out: &mut [f32], k: usize) {
        let r = m.len() / k;
        assert!(x.len() == out.len() / r.max(1) * k && m.len() == r * k, "dot_rows: shapes");
        let whole = k - k % LANES;
        let mut pairs = x.chunks_exact(2 * k);
        for (rows, out) in (&mut pairs).zip(out.chunks_exact_mut(2 * r)) {
            let (first, second) = rows.split_at(k);
            let (out_first, out_second) = out.split_at_mut(r);
            let (mut groups, m_groups) = (out_first.chunks_exact_mut(GROUP), m.chunks_exact(GROUP * k));
            let mut second_groups = out_second.chunks_exact_mut(GROUP);
            for ((o1, o2), m) in (&mut groups).zip(&mut second_groups).zip(m_groups) {
                let mut lanes = [[[0.0f32; LANES]; GROUP]; 2];
                for p in (0..whole).step_by(LANES) {
                    let xs = [*chunk(first, p), *chunk(second, p)];
                    for j in 0..GROUP {
                        let ms = *chunk(m, j * k + p);
                        for (lanes, xs) in lanes.iter_mut().zip(&xs) {
                            for l in 0..LANES {
                                lanes[j][l] = xs[l].mul_add(ms[l], lanes[j][l]);
                            }
                        }
                    }
                }
                for ((row, out), lanes) in [first, second].into_iter().zip([o1, o2]).zip(&mut lanes) {
                    for ((o, lanes), mj) in out.iter_mut().zip(lanes).zip(m.chunks_exact(k)) {
                        *o = (whole..k).fold(fold_lanes(lanes), |s, p| row[p].mul_add(mj[p], s));
                    }
                }
            }
            let rest = &m[m.len() / (GROUP * k) * GROUP * k..];
            dots_one_by_one(first, rest, groups.into_remainder());
            dots_one_by_one(second, rest, second_groups.into_remainder());
        }
        let rest_out = &mut out[x.len() / (2 * k) * 2 * r..];
        for (row, out) in pairs.remainder().chunks_exact(k).zip(rest_out.chunks_exact_mut(r)) {
            dots_one_by_one(row, m, out);
        }
    }
}

simd_fn! {
    /// `out (n, k) += c (n, r) m (r, k)`: each output plus its `r` terms in order.
    pub fn add_combinations(out: &mut [f32], c: &[f32], m: &[f32], k: usize) {
        let r = m.len() / k;
        assert!(out.len() / k * r == c.len() && m.len() == r * k, "add_combinations: shapes");
        let whole = k - k % LANES;
        let mut tiles = out.chunks_exact_mut(ROWS * k);
        for (out, c) in (&mut tiles).zip(c.chunks_exact(ROWS * r)) {
            for p in (0..whole).step_by(LANES) {
                let mut acc = [[0.0f32; LANES]; ROWS];
                for (t, acc) in acc.iter_mut().enumerate() {
                    *acc = *chunk(out, t * k + p);
                }
                for j in 0..r {
                    let ms = chunk(m, j * k + p);
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let cj = c[t * r + j];
                        for l in 0..LANES {
                            acc[l] = cj.mul_add(ms[l], acc[l]);
                        }
                    }
                }
                for (t, acc) in acc.iter().enumerate() {
                    out[t * k + p..][..LANES].copy_from_slice(acc);
                }
            }
            for (out, c) in out.chunks_exact_mut(k).zip(c.chunks_exact(r)) {
                add_combination_tail(out, c, m, whole, k);
            }
        }
        let rest_rows = tiles.into_remainder();
        let rest_c = &c[c.len() - rest_rows.len() / k * r..];
        for (out, c) in rest_rows.chunks_exact_mut(k).zip(rest_c.chunks_exact(r)) {
            add_combination_tail(out, c, m, 0, k);
        }
    }
}

simd_fn! {
    /// `out (r, k) = c (n, r)^T x (n, k)`: each output the sum over the rows in order, from
    /// the first row's term.
    pub fn outer_sums(c: &[f32], x: &[f32], out: &mut [f32], k: usize) {
        let r = out.len() / k;
        assert!(c.len() / r.max(1) * k == x.len() && out.len() == r * k, "outer_sums: shapes");
        let whole = k - k % LANES;
        // Four outputs' rows at a time, each chunk of columns summed over every row in registers.
        let mut groups = out.chunks_exact_mut(SUMS * k);
        for (first, out) in (0..).step_by(SUMS).zip(&mut groups) {
            for p in (0..whole).step_by(LANES) {
                let mut acc = [[0.0f32; LANES]; SUMS];
                for (c, x) in c.chunks_exact(r).zip(x.chunks_exact(k)) {
                    let xs = *chunk(x, p);
                    for (acc, cj) in acc.iter_mut().zip(&c[first..first + SUMS]) {
                        for l in 0..LANES {
                            acc[l] = cj.mul_add(xs[l], acc[l]);
                        }
                    }
                }
                for (out, acc) in out.chunks_exact_mut(k).zip(&acc) {
                    out[p..p + LANES].copy_from_slice(acc);
                }
            }
            for (j, out) in (first..).zip(out.chunks_exact_mut(k)) {
                for (p, o) in out.iter_mut().enumerate().skip(whole) {
                    *o = c.chunks_exact(r).zip(x.chunks_exact(k)).fold(0.0, |s, (c, x)| c[j].mul_add(x[p], s));
                }
            }
        }
        // The outputs' rows past the last group, row by row of `x`.
        let rest = groups.into_remainder();
        rest.fill(0.0);
        for (c, x) in c.chunks_exact(r).zip(x.chunks_exact(k)) {
            for (cj, out) in c[r - rest.len() / k..].iter().zip(rest.chunks_exact_mut(k)) {
                for (o, x) in out.iter_mut().zip(x) {
                    *o = cj.mul_add(*x, *o);
                }
            }
        }
    }
}

/// Rows a pass of [`add_combinations`] takes at once, each chunk of `m` loaded once for all
/// of them.
const ROWS: usize = 4;

/// Outputs' rows a pass of [`outer_sums`] sums at once, each a chunk of [`LANES`] sums held in
/// registers over every row of `x`.
const SUMS: usize = 4;

/// The [`LANES`] floats of `v` from `p` on.
#[inline(always)]
fn chunk(v: &[f32], p: usize) -> &[f32; LANES] {
    v[p..p + LANES].try_into().expect("a whole chunk")
}

/// [`dot_rows`] of one row against the rows of `m` (as many as `out` has), one at a time.
#[inline(always)]
fn dots_one_by_one(row: &[f32], m: &[f32], out: &mut [f32]) {
    for (o, mj) in out.iter_mut().zip(m.chunks_exact(row.len())) {
        *o = dot_reference(row, mj);
    }
}

/// [`add_combinations`] on one row's outputs from `from` on, one at a time.
#[inline(always)]
fn add_combination_tail(out: &mut [f32], c: &[f32], m: &[f32], from: usize, k: usize) {
    for (p, o) in out.iter_mut().enumerate().skip(from) {
        *o = c.iter().zip(m.chunks_exact(k)).fold(*o, |acc, (cj, mj)| cj.mul_add(mj[p], acc));
    }
}

/// A dot product's lanes summed pairwise: lane `l` plus lane `l + 8`, then `+ 4`, `+ 2`, `+ 1`.
#[inline(always)]
fn fold_lanes(lanes: &mut [f32; LANES]) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            lanes[l] += lanes[l + width];
        }
    }
    lanes[0]
}

/// [`dot_rows`]' sum, plainly: `x[p] * m[p]` added into lane `p % LANES` for every whole chunk
/// of [`LANES`], the lanes folded pairwise, then the tail past the last whole chunk in order.
#[inline(always)]
pub fn dot_reference(x: &[f32], m: &[f32]) -> f32 {
    let whole = x.len() - x.len() % LANES;
    let mut lanes = [0.0f32; LANES];
    for p in 0..whole {
        lanes[p % LANES] = x[p].mul_add(m[p], lanes[p % LANES]);
    }
    (whole..x.len()).fold(fold_lanes(&mut lanes), |s, p| x[p].mul_add(m[p], s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::random;
    use crate::nn::kernels::matmul::{matmul_naive, Dims, Layout};

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// Within f32 rounding of the f64 product.
    fn close_to(out: &[f32], naive: &[f32]) -> bool {
        out.iter().zip(naive).all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()))
    }

    /// Ranks below, at and above a group, widths with and without a tail of lanes.
    const SHAPES: [(usize, usize, usize); 5] = [(1, 1, 1), (3, 16, 2), (5, 37, 8), (7, 64, 11), (4, 100, 17)];

    #[test]
    fn dot_rows_sums_each_output_in_the_reference_order() {
        for (n, k, r) in SHAPES {
            let (x, m) = (random(n * k, 1), random(r * k, 2));
            let mut out = vec![f32::NAN; n * r];
            dot_rows(&x, &m, &mut out, k);
            let expected: Vec<f32> =
                x.chunks(k).flat_map(|row| m.chunks(k).map(|mj| dot_reference(row, mj)).collect::<Vec<_>>()).collect();
            assert!(same_bits(&out, &expected), "{n}x{k} by rank {r}");
            let mut naive = vec![0.0; n * r];
            matmul_naive(&x, Layout::Normal, &m, Layout::Transposed, &mut naive, Dims { m: n, k, n: r }, false);
            assert!(close_to(&out, &naive), "{n}x{k}x{r}");
        }
    }

    #[test]
    fn add_combinations_adds_the_terms_in_order() {
        for (n, k, r) in SHAPES {
            let (c, m, start) = (random(n * r, 3), random(r * k, 4), random(n * k, 5));
            let mut out = start.clone();
            add_combinations(&mut out, &c, &m, k);
            let mut expected = start.clone();
            for i in 0..n {
                for p in 0..k {
                    for j in 0..r {
                        expected[i * k + p] = c[i * r + j].mul_add(m[j * k + p], expected[i * k + p]);
                    }
                }
            }
            assert!(same_bits(&out, &expected), "{n}x{k} by rank {r}");
            let mut naive = start;
            matmul_naive(&c, Layout::Normal, &m, Layout::Normal, &mut naive, Dims { m: n, k: r, n: k }, true);
            assert!(close_to(&out, &naive), "{n}x{k}x{r}");
        }
    }

    #[test]
    fn outer_sums_add_the_rows_in_order() {
        for (n, k, r) in SHAPES {
            let (c, x) = (random(n * r, 6), random(n * k, 7));
            let mut out = vec![f32::NAN; r * k];
            outer_sums(&c, &x, &mut out, k);
            let mut expected = vec![0.0f32; r * k];
            for i in 0..n {
                for j in 0..r {
                    for p in 0..k {
                        expected[j * k + p] = c[i * r + j].mul_add(x[i * k + p], expected[j * k + p]);
                    }
                }
            }
            assert!(same_bits(&out, &expected), "{n}x{k} by rank {r}");
            let mut naive = vec![0.0; r * k];
            matmul_naive(&c, Layout::Transposed, &x, Layout::Normal, &mut naive, Dims { m: r, k: n, n: k }, false);
            assert!(close_to(&out, &naive), "{n}x{k}x{r}");
        }
    }
}
