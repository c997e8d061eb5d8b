//! LayerNorm (gpt2) and RMSNorm (llama) over the last axis of (rows, C), forward and backward.
//!
//! Forward saves per-row statistics for backward. Rows run in parallel; the weight and bias
//! gradients are sums over rows, accumulated in row order on one thread so their bits do not
//! depend on the thread count.

use rayon::prelude::*;

/// Rows per parallel work item.
const ROWS: usize = 16;

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
            for (r, o) in out.chunks_mut(c).enumerate() {
                let row = chunk * ROWS + r;
                let xr = &x[row * c..(row + 1) * c];
                let m = xr.iter().map(|v| *v as f64).sum::<f64>() / c as f64;
                let var = xr.iter().map(|v| (*v as f64 - m).powi(2)).sum::<f64>() / c as f64;
                let s = 1.0 / (var + eps as f64).sqrt();
                for i in 0..c {
                    o[i] = ((xr[i] as f64 - m) * s) as f32 * w[i] + b[i];
                }
                mean[r] = m as f32;
                rstd[r] = s as f32;
            }
        },
    );
}

/// Gradients of [`layernorm_forward`]: writes `dx`, adds into `dw` and `db`.
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
    dx.par_chunks_mut(c).enumerate().for_each(|(row, dxr)| {
        let (xr, dr) = (&x[row * c..(row + 1) * c], &dout[row * c..(row + 1) * c]);
        let (m, s) = (mean[row], rstd[row]);
        let (mut mean_dn, mut mean_dn_n) = (0.0f64, 0.0f64);
        for i in 0..c {
            let n = (xr[i] - m) * s;
            let dn = dr[i] * w[i];
            mean_dn += dn as f64;
            mean_dn_n += (dn * n) as f64;
        }
        let (mean_dn, mean_dn_n) = ((mean_dn / c as f64) as f32, (mean_dn_n / c as f64) as f32);
        for i in 0..c {
            let n = (xr[i] - m) * s;
            dxr[i] = (dr[i] * w[i] - mean_dn - n * mean_dn_n) * s;
        }
    });
    for row in 0..mean.len() {
        for i in 0..c {
            let n = (x[row * c + i] - mean[row]) * rstd[row];
            dw[i] += dout[row * c + i] * n;
            db[i] += dout[row * c + i];
        }
    }
}

/// `out = x / sqrt(mean(x^2) + eps) * w` per row; saves `rrms` (rows).
pub fn rmsnorm_forward(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], rrms: &mut [f32], c: usize) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Norm);
    out.par_chunks_mut(ROWS * c).zip(rrms.par_chunks_mut(ROWS)).enumerate().for_each(|(chunk, (out, rrms))| {
        for (r, o) in out.chunks_mut(c).enumerate() {
            let row = chunk * ROWS + r;
            let xr = &x[row * c..(row + 1) * c];
            let ms = xr.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / c as f64;
            let s = (1.0 / (ms + eps as f64).sqrt()) as f32;
            for i in 0..c {
                o[i] = xr[i] * s * w[i];
            }
            rrms[r] = s;
        }
    });
}

/// Gradients of [`rmsnorm_forward`]: writes `dx`, adds into `dw`.
pub fn rmsnorm_backward(dout: &[f32], x: &[f32], w: &[f32], rrms: &[f32], dx: &mut [f32], dw: &mut [f32], c: usize) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Norm);
    dx.par_chunks_mut(c).enumerate().for_each(|(row, dxr)| {
        let (xr, dr, s) = (&x[row * c..(row + 1) * c], &dout[row * c..(row + 1) * c], rrms[row]);
        let mean_dn_n = (0..c).map(|i| (dr[i] * w[i] * xr[i] * s) as f64).sum::<f64>() / c as f64;
        for i in 0..c {
            dxr[i] = s * (dr[i] * w[i] - xr[i] * s * mean_dn_n as f32);
        }
    });
    for row in 0..rrms.len() {
        for i in 0..c {
            dw[i] += dout[row * c + i] * x[row * c + i] * rrms[row];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, probe_loss, random};

    const ROWS_: usize = 5;
    const C: usize = 7;

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
