//! Test helpers: seeded random inputs and central finite differences.

/// `n` values in [-1, 1) from a fixed seed (SplitMix64), so tests are reproducible.
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Compare an analytic gradient with central differences of `loss` around `x`, perturbing each
/// coordinate by `eps`. The loss is evaluated in f32, so the tolerance is loose but meaningful:
/// a wrong backward is off by O(1), rounding by O(1e-3).
pub fn check(name: &str, x: &[f32], analytic: &[f32], mut loss: impl FnMut(&[f32]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient has the wrong length");
    let eps = 1e-2f32;
    let mut probe = x.to_vec();
    for i in 0..x.len() {
        probe[i] = x[i] + eps;
        let plus = loss(&probe);
        probe[i] = x[i] - eps;
        let minus = loss(&probe);
        probe[i] = x[i];
        let numeric = (plus - minus) / (2.0 * eps as f64);
        let a = analytic[i] as f64;
        let tolerance = 2e-2 * (1.0 + numeric.abs().max(a.abs()));
        assert!((a - numeric).abs() <= tolerance, "{name}[{i}]: analytic {a:.6}, finite differences {numeric:.6}");
    }
}

/// A fixed linear functional of an output, `sum(out * weights)`: a scalar loss whose gradient
/// with respect to `out` is `weights`, so any layer's backward can be checked with it.
pub fn probe_loss(out: &[f32], weights: &[f32]) -> f64 {
    out.iter().zip(weights).map(|(o, w)| *o as f64 * *w as f64).sum()
}
