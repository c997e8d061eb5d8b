//! Test helpers: seeded random inputs and central finite differences.

/// `n` values in [-1, 1) from a fixed seed, so tests are reproducible.
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = crate::nn::rng::SplitMix64::new(seed);
    (0..n).map(|_| rng.unit() as f32 * 2.0 - 1.0).collect()
}

/// `f` on a fresh pool of `threads` threads.
pub fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
}

/// Asserts that `product` of random `a @ b^T` of shape `d` gives the same bits on 1 and on 2
/// threads.
pub fn same_bits_on_one_and_two_threads(
    product: crate::nn::kernels::matmul::Product,
    d: crate::nn::kernels::matmul::Dims,
) {
    use crate::nn::kernels::matmul::Layout;
    let (a, b) = (random(d.m * d.k, 4), random(d.k * d.n, 5));
    let run = |threads| {
        let mut out = vec![0.0; d.m * d.n];
        on_threads(threads, || product(&a, Layout::Normal, &b, Layout::Transposed, &mut out, d, false));
        out
    };
    let (one, two) = (run(1), run(2));
    assert!(one.iter().zip(&two).all(|(x, y)| x.to_bits() == y.to_bits()), "1 and 2 threads differ");
}

/// Central differences of `loss` around `x`, each coordinate moved by 0.01. The loss is
/// evaluated in f32, so the result is good to about 1e-4 absolute.
fn numeric_gradient(x: &[f32], mut loss: impl FnMut(&[f32]) -> f64) -> Vec<f64> {
    let eps = 1e-2f32;
    let mut probe = x.to_vec();
    (0..x.len())
        .map(|i| {
            probe[i] = x[i] + eps;
            let plus = loss(&probe);
            probe[i] = x[i] - eps;
            let minus = loss(&probe);
            probe[i] = x[i];
            (plus - minus) / (2.0 * eps as f64)
        })
        .collect()
}

/// Compare an analytic gradient with finite differences coordinate by coordinate: a wrong
/// backward is off by O(1), rounding by O(1e-3).
pub fn check(name: &str, x: &[f32], analytic: &[f32], loss: impl FnMut(&[f32]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient has the wrong length");
    for (i, (numeric, a)) in numeric_gradient(x, loss).into_iter().zip(analytic).enumerate() {
        let a = *a as f64;
        let tolerance = 2e-2 * (1.0 + numeric.abs().max(a.abs()));
        assert!((a - numeric).abs() <= tolerance, "{name}[{i}]: analytic {a:.6}, finite differences {numeric:.6}");
    }
}

/// A fixed linear functional of an output, `sum(out * weights)`: a scalar loss whose gradient
/// with respect to `out` is `weights`, so any layer's backward can be checked with it.
pub fn probe_loss(out: &[f32], weights: &[f32]) -> f64 {
    out.iter().zip(weights).map(|(o, w)| *o as f64 * *w as f64).sum()
}

/// Whole-tensor check for deep compositions: the relative error
/// `|analytic - numeric| / (|analytic| + |numeric|)` over the tensor, in L2 norm. Coordinate
/// tolerances are meaningless when gradients are small; this is not.
pub fn check_relative(name: &str, x: &[f32], analytic: &[f32], loss: impl FnMut(&[f32]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient has the wrong length");
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (numeric, a) in numeric_gradient(x, loss).into_iter().zip(analytic) {
        diff += (*a as f64 - numeric).powi(2);
        norm += (*a as f64).powi(2) + numeric.powi(2);
    }
    let relative = diff.sqrt() / norm.sqrt().max(1e-12);
    assert!(relative < 1e-2, "{name}: relative error {relative:.2e} between analytic and finite-difference gradients");
}

/// Asserts that each tensor of `other` is within `tol` times the largest magnitude of the same
/// tensor of `reference` (gradients that differ only in the order of their sums), and that every
/// non-empty tensor of `reference` is not all zeros.
pub fn assert_maps_close(
    what: &str,
    reference: &crate::nn::params::ParamMap,
    other: &crate::nn::params::ParamMap,
    tol: f32,
) {
    for ((name, r), (_, o)) in reference.iter().zip(other.iter()) {
        let largest = r.data().iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let off = r.data().iter().zip(o.data()).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(r.data().is_empty() || largest > 0.0, "{what}: {name} is all zeros");
        assert!(off <= tol * largest, "{what}: {name} off by {off} of {largest}");
    }
}
