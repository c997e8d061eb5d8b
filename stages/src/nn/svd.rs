//! The leading singular triplets of a matrix, for PiSSA's adapter initialisation: randomized
//! subspace iteration (Halko, Martinsson and Tropp 2011) with a few oversampled columns, then
//! the small projected problem solved exactly by cyclic Jacobi rotations. Plain f64 loops: it
//! runs once per adapted layer, on matrices of a few hundred to a few thousand rows.
//!
//! Deterministic: the random start comes from a seed, and every loop runs in a fixed order.

use crate::nn::rng::SplitMix64;

/// The top `r` singular values of `m` (rows x cols, row-major) in decreasing order, with their
/// left vectors `u` (rows x r) and right vectors `vt` (r x cols), so that `u diag(s) vt` is the
/// best rank-`r` approximation of `m` (up to the iteration's convergence).
///
/// # Panics
/// If `r` exceeds the smaller dimension.
pub fn top_singular(m: &[f32], rows: usize, cols: usize, r: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert!(r <= rows.min(cols) && m.len() == rows * cols, "rank {r} of a {rows} x {cols} matrix");
    let k = (r + 10).min(rows.min(cols));
    // Y = M Omega (rows x k), Omega gaussian (cols x k).
    let mut rng = SplitMix64::new(seed);
    let omega: Vec<f64> = (0..cols * k).map(|_| rng.normal()).collect();
    let mut y = times(m, rows, cols, &omega, k);
    orthonormalize(&mut y, rows, k);
    for _ in 0..12 {
        // Z = M^T Y, orthonormal; Y = M Z, orthonormal.
        let mut z = times_transposed(m, rows, cols, &y, k);
        orthonormalize(&mut z, cols, k);
        y = times(m, rows, cols, &z, k);
        orthonormalize(&mut y, rows, k);
    }
    // B = Y^T M (k x cols), kept transposed as M^T Y (cols x k); its Gram B B^T (k x k) is
    // W diag(s^2) W^T.
    let bt = times_transposed(m, rows, cols, &y, k);
    let b = |p: usize, j: usize| bt[j * k + p];
    let mut gram = vec![0.0f64; k * k];
    for p in 0..k {
        for q in 0..k {
            gram[p * k + q] = (0..cols).map(|j| b(p, j) * b(q, j)).sum();
        }
    }
    let (values, vectors) = symmetric_eigen(&mut gram, k);
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&p, &q| values[q].total_cmp(&values[p]));
    let (mut u, mut s, mut vt) = (vec![0.0f32; rows * r], vec![0.0f32; r], vec![0.0f32; r * cols]);
    for (c, &e) in order.iter().take(r).enumerate() {
        let sigma = values[e].max(0.0).sqrt();
        s[c] = sigma as f32;
        for i in 0..rows {
            u[i * r + c] = (0..k).map(|p| y[i * k + p] * vectors[p * k + e]).sum::<f64>() as f32;
        }
        for j in 0..cols {
            let w: f64 = (0..k).map(|p| vectors[p * k + e] * b(p, j)).sum();
            vt[c * cols + j] = if sigma > 0.0 { (w / sigma) as f32 } else { 0.0 };
        }
    }
    (u, s, vt)
}

/// `M x` (rows x k) for `m` (rows x cols) and `x` (cols x k).
fn times(m: &[f32], rows: usize, cols: usize, x: &[f64], k: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; rows * k];
    for i in 0..rows {
        for j in 0..cols {
            let v = m[i * cols + j] as f64;
            for c in 0..k {
                out[i * k + c] += v * x[j * k + c];
            }
        }
    }
    out
}

/// `M^T y` (cols x k) for `m` (rows x cols) and `y` (rows x k).
fn times_transposed(m: &[f32], rows: usize, cols: usize, y: &[f64], k: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; cols * k];
    for i in 0..rows {
        for j in 0..cols {
            let v = m[i * cols + j] as f64;
            for c in 0..k {
                out[j * k + c] += v * y[i * k + c];
            }
        }
    }
    out
}

/// Orthonormal columns in place (n x k, row-major), by modified Gram-Schmidt run twice.
fn orthonormalize(x: &mut [f64], n: usize, k: usize) {
    for _ in 0..2 {
        for c in 0..k {
            for p in 0..c {
                let dot: f64 = (0..n).map(|i| x[i * k + c] * x[i * k + p]).sum();
                for i in 0..n {
                    x[i * k + c] -= dot * x[i * k + p];
                }
            }
            let norm = (0..n).map(|i| x[i * k + c].powi(2)).sum::<f64>().sqrt();
            for i in 0..n {
                x[i * k + c] = if norm > 1e-300 { x[i * k + c] / norm } else { 0.0 };
            }
        }
    }
}

/// Eigenvalues and eigenvectors (columns, k x k) of a symmetric matrix, by cyclic Jacobi
/// rotations until the off-diagonal part vanishes. `a` is destroyed.
fn symmetric_eigen(a: &mut [f64], k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0f64; k * k];
    (0..k).for_each(|i| v[i * k + i] = 1.0);
    for _ in 0..100 {
        let off: f64 = (0..k)
            .flat_map(|p| (0..k).filter(move |q| *q != p).map(move |q| (p, q)))
            .map(|(p, q)| a[p * k + q].powi(2))
            .sum();
        let total: f64 = a.iter().map(|x| x * x).sum();
        if off <= 1e-30 * total.max(1e-300) {
            break;
        }
        for p in 0..k {
            for q in p + 1..k {
                let apq = a[p * k + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * k + q] - a[p * k + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let (c, s) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
                for i in 0..k {
                    let (aip, aiq) = (a[i * k + p], a[i * k + q]);
                    a[i * k + p] = c * aip - s * aiq;
                    a[i * k + q] = s * aip + c * aiq;
                }
                for i in 0..k {
                    let (api, aqi) = (a[p * k + i], a[q * k + i]);
                    a[p * k + i] = c * api - s * aqi;
                    a[q * k + i] = s * api + c * aqi;
                }
                for i in 0..k {
                    let (vip, viq) = (v[i * k + p], v[i * k + q]);
                    v[i * k + p] = c * vip - s * viq;
                    v[i * k + q] = s * vip + c * viq;
                }
            }
        }
    }
    ((0..k).map(|i| a[i * k + i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::random;

    /// A matrix with known singular values: orthonormal random factors around them.
    fn with_spectrum(rows: usize, cols: usize, s: &[f64]) -> Vec<f32> {
        let n = s.len();
        let mut u: Vec<f64> = random(rows * n, 1).iter().map(|x| *x as f64).collect();
        let mut v: Vec<f64> = random(cols * n, 2).iter().map(|x| *x as f64).collect();
        orthonormalize(&mut u, rows, n);
        orthonormalize(&mut v, cols, n);
        let mut m = vec![0.0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                m[i * cols + j] = (0..n).map(|c| u[i * n + c] * s[c] * v[j * n + c]).sum::<f64>() as f32;
            }
        }
        m
    }

    #[test]
    fn the_leading_triplets_of_a_known_spectrum_come_back() {
        let spectrum: Vec<f64> = (0..12).map(|i| 10.0 * 0.6f64.powi(i)).collect();
        for (rows, cols) in [(40, 24), (24, 40)] {
            let m = with_spectrum(rows, cols, &spectrum);
            let r = 4;
            let (u, s, vt) = top_singular(&m, rows, cols, r, 7);
            for c in 0..r {
                assert!((s[c] as f64 - spectrum[c]).abs() < 1e-4 * spectrum[0], "s[{c}] {} vs {}", s[c], spectrum[c]);
            }
            // u diag(s) vt is the best rank-r approximation: the rest is the tail of the spectrum.
            let mut err = 0.0f64;
            for i in 0..rows {
                for j in 0..cols {
                    let approx: f32 = (0..r).map(|c| u[i * r + c] * s[c] * vt[c * cols + j]).sum();
                    err += ((m[i * cols + j] - approx) as f64).powi(2);
                }
            }
            let tail: f64 = spectrum[r..].iter().map(|x| x * x).sum();
            assert!((err - tail).abs() < 1e-3 * tail, "{err} vs {tail}");
        }
    }

    #[test]
    fn jacobi_diagonalizes_a_symmetric_matrix() {
        let mut a = vec![4.0, 1.0, 2.0, 1.0, 3.0, 0.5, 2.0, 0.5, 1.0];
        let original = a.clone();
        let (values, v) = symmetric_eigen(&mut a, 3);
        for e in 0..3 {
            for i in 0..3 {
                let av: f64 = (0..3).map(|j| original[i * 3 + j] * v[j * 3 + e]).sum();
                assert!((av - values[e] * v[i * 3 + e]).abs() < 1e-10);
            }
        }
    }
}
