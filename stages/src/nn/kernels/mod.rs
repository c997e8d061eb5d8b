//! Hot numeric kernels: small functions over slices with explicit dimensions. Buffers that grow
//! with the model come from the caller; a few kernels keep a small per-call scratch. Shapes use
//! B, T, C, V (batch, time, channels, vocabulary); a `rows` argument is B * T flattened.
//!
//! Determinism: every reduction runs in an order that does not depend on the number of
//! threads (fixed-size chunks, combined in order), so 1 and 2 threads give the same bits.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod matmul;
pub mod norm;

/// `sum(a[i] * b[i])` in eight interleaved partial sums, combined in a fixed order: the
/// compiler vectorizes it (a single running sum it may not reorder), and the bits do not
/// depend on anything but the inputs.
///
/// # Panics
/// If the lengths differ.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of slices of different lengths");
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `y += a * x`, element by element (so the bits are those of the plain loop).
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy of slices of different lengths");
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dot_matches_an_f64_reference() {
        for n in [0, 1, 7, 8, 9, 32, 45, 128] {
            let a = crate::nn::gradcheck::random(n, 1);
            let b = crate::nn::gradcheck::random(n, 2);
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((super::dot(&a, &b) as f64 - want).abs() < 1e-5, "n = {n}");
        }
    }
}
