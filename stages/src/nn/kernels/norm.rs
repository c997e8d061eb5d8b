//! LayerNorm (gpt2) and RMSNorm (llama) over the last axis of (rows, C), forward and backward.
//!
//! Forward saves per-row statistics for backward. Rows run in parallel; row statistics are f64
//! sums in a fixed lane order ([`super::sum_f64`]), [`LOCKSTEP`] rows side by side; the weight
//! and bias gradients are sums over rows, accumulated in row order per column (columns in
//! parallel). No bit depends on the thread count.

use std::ops::Range;

use rayon::prelude::*;

use super::{simd_fn, sum_f64_rows};

/// Rows per parallel work item.
const ROWS: usize = 16;
/// Rows whose statistics' sums run side by side: each row's sum is one dependent chain of
/// additions, too short on its own to keep the adders busy.
const LOCKSTEP: usize = 4;
/// Columns per parallel work item of the weight gradients.
const COLS: usize = 64;

/// Work item `chunk` of [`ROWS`] rows, `len` floats of them: its rows and its range of floats.
fn block(chunk: usize, len: usize, c: usize) -> (Range<usize>, Range<usize>) {
    let rows = chunk * ROWS..chunk * ROWS + len / c;
    (rows.clone(), rows.start * c..rows.end * c)
}

/// The first rows of `0..n` in groups of [`LOCKSTEP`]: each group's rows, the last group
/// filled up with repeats of row `n - 1` (their sums are computed and not used), and how many
/// of them are real.
fn lockstep_groups(n: usize) -> impl Iterator<Item = ([usize; LOCKSTEP], usize)> {
    (0..n).step_by(LOCKSTEP).map(move |g| (std::array::from_fn(|r| (g + r).min(n - 1)), LOCKSTEP.min(n - g)))
}

/// `out = (x - mean) / sqrt(var + eps) * w + b` per row; saves `mean` and `rstd` (rows).
#[allow(clippy::too_many_arguments)] // slices and dims, as every kernel
pub fn layernorm_forward(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f32,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    c: usize,
) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Norm);
    out.par_chunks_mut(ROWS * c).zip(mean.par_chunks_mut(ROWS).zip(rstd.par_chunks_mut(ROWS))).enumerate().for_each(
        |(chunk, (out, (mean, rstd)))| {
            layernorm_rows(&x[block(chunk, out.len(), c).1], &w[..c], &b[..c], eps, out, mean, rstd);
        },
    );
}

simd_fn! {
    fn layernorm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32], mean: &mut [f32], rstd: &mut [f32]) {
        let c = w.len();
        for (rows, real) in lockstep_groups(x.len() / c) {
            let xs = rows.map(|r| [&x[r * c..][..c]]);
            let m = sum_f64_rows(xs, |_, [x]| x as f64).map(|sum| sum / c as f64);
            let var = sum_f64_rows(xs, |r, [x]| (x as f64 - m[r]) * (x as f64 - m[r])).map(|sum| sum / c as f64);
            for (j, &r) in rows[..real].iter().enumerate() {
                let (xr, o, m) = (xs[j][0], &mut out[r * c..][..c], m[j]);
                let s = 1.0 / (var[j] + eps as f64).sqrt();
                for (((o, &x), &w), &b) in o.iter_mut().zip(xr).zip(w).zip(b) {
                    *o = ((x as f64 - m) * s) as f32 * w + b;
                }
                mean[r] = m as f32;
                rstd[r] = s as f32;
            }
        }
    }
}

/// Gradients of [`layernorm_forward`]: writes `dx`, adds into `dw` and `db`, which are both
/// empty (no column sums) or both `c` long.
///
/// # Panics
/// If only one of `dw` and `db` is empty: the column sums fill both or neither.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    c: usize,
) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Norm);
    assert_eq!(dw.len(), db.len(), "the weight's and the bias's gradients: both or neither");
    dx.par_chunks_mut(ROWS * c).enumerate().for_each(|(chunk, dx)| {
        let (rows, at) = block(chunk, dx.len(), c);
        layernorm_rows_backward(&dout[at.clone()], &x[at], &w[..c], &mean[rows.clone()], &rstd[rows], dx);
    });
    // Each column sums its rows in row order, whatever thread it lands on.
    dw.par_chunks_mut(COLS).zip(db.par_chunks_mut(COLS)).enumerate().for_each(|(chunk, (dw, db))| {
        layernorm_params_backward(dout, x, mean, rstd, c, chunk * COLS, dw, db);
    });
}

simd_fn! {
    fn layernorm_rows_backward(dout: &[f32], x: &[f32], w: &[f32], mean: &[f32], rstd: &[f32], dx: &mut [f32]) {
        let c = w.len();
        for (rows, real) in lockstep_groups(x.len() / c) {
            let (xs, ds) = (rows.map(|r| &x[r * c..][..c]), rows.map(|r| &dout[r * c..][..c]));
            let (m, s) = (rows.map(|r| mean[r]), rows.map(|r| rstd[r]));
            let mean_dn = sum_f64_rows(ds.map(|d| [d, w]), |_, [d, w]| (d * w) as f64);
            let inputs: [_; LOCKSTEP] = std::array::from_fn(|j| [ds[j], w, xs[j]]);
            let mean_dn_n = sum_f64_rows(inputs, |j, [d, w, x]| (d * w * ((x - m[j]) * s[j])) as f64);
            for (j, &r) in rows[..real].iter().enumerate() {
                let (xr, dr, dxr, m, s) = (xs[j], ds[j], &mut dx[r * c..][..c], m[j], s[j]);
                let (mean_dn, mean_dn_n) = ((mean_dn[j] / c as f64) as f32, (mean_dn_n[j] / c as f64) as f32);
                for (((dx, &d), &w), &x) in dxr.iter_mut().zip(dr).zip(w).zip(xr) {
                    let n = (x - m) * s;
                    *dx = (d * w - mean_dn - n * mean_dn_n) * s;
                }
            }
        }
    }
}

simd_fn! {
    /// Columns `i0..i0 + dw.len()` of the weight and bias gradients, rows in order.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_params_backward(
        dout: &[f32],
        x: &[f32],
        mean: &[f32],
        rstd: &[f32],
        c: usize,
        i0: usize,
        dw: &mut [f32],
        db: &mut [f32],
    ) {
        let cols = dw.len();
        let db = &mut db[..cols];
        for (row, (&m, &s)) in mean.iter().zip(rstd).enumerate() {
            let (xr, dr) = (&x[row * c + i0..][..cols], &dout[row * c + i0..][..cols]);
            for i in 0..cols {
                dw[i] += dr[i] * ((xr[i] - m) * s);
                db[i] += dr[i];
            }
        }
    }
}

/// `out = x / sqrt(mean(x^2) + eps) * w` per row; saves `rrms` (rows).
pub fn rmsnorm_forward(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], rrms: &mut [f32], c: usize) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Norm);
    out.par_chunks_mut(ROWS * c).zip(rrms.par_chunks_mut(ROWS)).enumerate().for_each(|(chunk, (out, rrms))| {
        rmsnorm_rows(&x[block(chunk, out.len(), c).1], &w[..c], eps, out, rrms);
    });
}

simd_fn! {
    fn rmsnorm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], rrms: &mut [f32]) {
        let c = w.len();
        for (rows, real) in lockstep_groups(x.len() / c) {
            let xs = rows.map(|r| [&x[r * c..][..c]]);
            let ms = sum_f64_rows(xs, |_, [x]| x as f64 * x as f64);
            for (j, &r) in rows[..real].iter().enumerate() {
                let (xr, o) = (xs[j][0], &mut out[r * c..][..c]);
                let s = (1.0 / (ms[j] / c as f64 + eps as f64).sqrt()) as f32;
                for ((o, &x), &w) in o.iter_mut().zip(xr).zip(w) {
                    *o = x * s * w;
                }
                rrms[r] = s;
            }
        }
    }
}

/// Gradients of [`rmsnorm_forward`]: writes `dx`, adds into `dw`.
pub fn rmsnorm_backward(dout: &[f32], x: &[f32], w: &[f32], rrms: &[f32], dx: &mut [f32], dw: &mut [f32], c: usize) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Norm);
    dx.par_chunks_mut(ROWS * c).enumerate().for_each(|(chunk, dx)| {
        let (rows, at) = block(chunk, dx.len(), c);
        rmsnorm_rows_backward(&dout[at.clone()], &x[at], &w[..c], &rrms[rows], dx);
    });
    dw.par_chunks_mut(COLS)
        .enumerate()
        .for_each(|(chunk, dw)| rmsnorm_params_backward(dout, x, rrms, c, chunk * COLS, dw));
}

simd_fn! {
    fn rmsnorm_rows_backward(dout: &[f32], x: &[f32], w: &[f32], rrms: &[f32], dx: &mut [f32]) {
        let c = w.len();
        for (rows, real) in lockstep_groups(x.len() / c) {
            let (xs, ds, s) = (rows.map(|r| &x[r * c..][..c]), rows.map(|r| &dout[r * c..][..c]), rows.map(|r| rrms[r]));
            let inputs: [_; LOCKSTEP] = std::array::from_fn(|j| [ds[j], w, xs[j]]);
            let sums = sum_f64_rows(inputs, |j, [d, w, x]| (d * w * x * s[j]) as f64);
            for (j, &r) in rows[..real].iter().enumerate() {
                let (xr, dr, dxr, s) = (xs[j], ds[j], &mut dx[r * c..][..c], s[j]);
                let mean_dn_n = (sums[j] / c as f64) as f32;
                for (((dx, &d), &w), &x) in dxr.iter_mut().zip(dr).zip(w).zip(xr) {
                    *dx = s * (d * w - x * s * mean_dn_n);
                }
            }
        }
    }
}

simd_fn! {
    /// Columns `i0..i0 + dw.len()` of the weight gradient, rows in order.
    fn rmsnorm_params_backward(dout: &[f32], x: &[f32], rrms: &[f32], c: usize, i0: usize, dw: &mut [f32]) {
        let cols = dw.len();
        for (row, &r) in rrms.iter().enumerate() {
            let (xr, dr) = (&x[row * c + i0..][..cols], &dout[row * c + i0..][..cols]);
            for i in 0..cols {
                dw[i] += dr[i] * xr[i] * r;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, probe_loss, random};

    const ROWS_: usize = 5;
    const C: usize = 7;

    /// The weight's column sums without the bias's would be silently dropped (they run side by
    /// side), so the kernel refuses them.
    #[test]
    #[should_panic(expected = "both or neither")]
    fn a_layernorm_weight_gradient_without_the_bias_is_refused() {
        let (x, w, dout) = (random(ROWS_ * C, 1), random(C, 2), random(ROWS_ * C, 3));
        let (mean, rstd) = (vec![0.0; ROWS_], vec![1.0; ROWS_]);
        let (mut dx, mut dw) = (vec![0.0; ROWS_ * C], vec![0.0; C]);
        layernorm_backward(&dout, &x, &w, &mean, &rstd, &mut dx, &mut dw, &mut [], C);
    }

    #[test]
    fn layernorm_normalizes_and_its_backward_matches_finite_differences() {
        let (x, w, b, probe) = (random(ROWS_ * C, 1), random(C, 2), random(C, 3), random(ROWS_ * C, 4));
        let forward = |x: &[f32], w: &[f32], b: &[f32]| {
            let (mut out, mut m, mut s) = (vec![0.0; ROWS_ * C], vec![0.0; ROWS_], vec![0.0; ROWS_]);
            layernorm_forward(x, w, b, 1e-5, &mut out, &mut m, &mut s, C);
            (out, m, s)
        };
        let (ones, zeros) = (vec![1.0; C], vec![0.0; C]);
        let (plain, _, _) = forward(&x, &ones, &zeros);
        for row in plain.chunks(C) {
            let mean: f32 = row.iter().sum::<f32>() / C as f32;
            let var: f32 = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / C as f32;
            assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-3);
        }
        let (_, m, s) = forward(&x, &w, &b);
        let (mut dx, mut dw, mut db) = (vec![0.0; ROWS_ * C], vec![0.0; C], vec![0.0; C]);
        layernorm_backward(&probe, &x, &w, &m, &s, &mut dx, &mut dw, &mut db, C);
        check("dx", &x, &dx, |x| probe_loss(&forward(x, &w, &b).0, &probe));
        check("dw", &w, &dw, |w| probe_loss(&forward(&x, w, &b).0, &probe));
        check("db", &b, &db, |b| probe_loss(&forward(&x, &w, b).0, &probe));
    }

    #[test]
    fn rmsnorm_backward_matches_finite_differences() {
        let (x, w, probe) = (random(ROWS_ * C, 5), random(C, 6), random(ROWS_ * C, 7));
        let forward = |x: &[f32], w: &[f32]| {
            let (mut out, mut r) = (vec![0.0; ROWS_ * C], vec![0.0; ROWS_]);
            rmsnorm_forward(x, w, 1e-5, &mut out, &mut r, C);
            (out, r)
        };
        let (_, r) = forward(&x, &w);
        let (mut dx, mut dw) = (vec![0.0; ROWS_ * C], vec![0.0; C]);
        rmsnorm_backward(&probe, &x, &w, &r, &mut dx, &mut dw, C);
        check("dx", &x, &dx, |x| probe_loss(&forward(x, &w).0, &probe));
        check("dw", &w, &dw, |w| probe_loss(&forward(&x, w).0, &probe));
    }
}
