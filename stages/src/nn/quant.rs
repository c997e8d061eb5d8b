//! Weight quantization: a matrix of `b`-bit codes with a scale and a zero point per group of
//! `group_size` consecutive inputs of each output row, `w = scale * (q - zero)`, and the three
//! ways to choose them.
//!
//! - **RTN** (round to nearest): per group, the scale and zero point of the group's range, as
//!   GPTQ's `Quantizer.find_params` picks them: the range is widened to include 0; the scale is
//!   `(max - min) / (2^b - 1)`; the zero point is `round(-min / scale)`, or `2^(b-1)` when
//!   symmetric (the range is then `[-amax, amax]`). Codes are `clamp(round(w / scale) + zero)`.
//! - **HQQ** (Badri and Shaji 2023): RTN's asymmetric range with a real-valued zero point,
//!   then the zero point fitted by half-quadratic splitting to minimise `|W - dq(q(W))|_p^p`
//!   with `p = 0.7`: 20 rounds of shrinkage, `beta` from 10 growing by 1.01, stopping when the
//!   mean absolute error stops falling (the reference implementation's defaults and order).
//! - **GPTQ** (Frantar et al. 2022): columns quantized left to right; each column's rounding
//!   error is spread over the columns not yet quantized through the upper Cholesky factor of
//!   the inverse of the input Hessian `H = X^T X` (dampened by 1% of its mean diagonal). A
//!   group's scale and zero are chosen (as RTN) when its first column is reached, from the
//!   weights as the earlier errors left them.
//!
//! Codes are stored row by row; 4-bit codes two to a byte, the even column in the low nibble.
//! Rounding is to nearest, ties to even (PyTorch's `round`).

use crate::nn::config::{ModelConfig, WeightLayout};
use crate::nn::params::ParamMap;

/// Bits, group size and symmetry of a quantization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheme {
    /// 4 or 8.
    pub bits: u32,
    /// Inputs per scale and zero point; a multiple of 32 that divides the matrix's width.
    pub group_size: usize,
    pub symmetric: bool,
}

impl Scheme {
    /// The largest code, `2^bits - 1`.
    pub fn maxq(self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }
}

/// A quantized matrix (rows = outputs, cols = inputs).
#[derive(Clone, Debug, PartialEq)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    pub group_size: usize,
    /// Row by row, `cols * bits / 8` bytes each.
    pub codes: Vec<u8>,
    /// Per row, per group: (rows, cols / group_size).
    pub scales: Vec<f32>,
    pub zeros: Vec<f32>,
}

impl QMatrix {
    /// Pack one code per element (row-major, each below `2^bits`).
    ///
    /// # Panics
    /// If the shapes disagree, or `group_size` is not a multiple of 32 dividing `cols`.
    pub fn from_codes(rows: usize, cols: usize, s: Scheme, codes: &[u8], scales: Vec<f32>, zeros: Vec<f32>) -> Self {
        assert!(s.bits == 4 || s.bits == 8, "{} bits", s.bits);
        assert!(
            s.group_size.is_multiple_of(32) && cols.is_multiple_of(s.group_size),
            "group {} of width {cols}",
            s.group_size
        );
        let groups = rows * (cols / s.group_size);
        assert!(codes.len() == rows * cols && scales.len() == groups && zeros.len() == groups, "shapes");
        let packed = match s.bits {
            8 => codes.to_vec(),
            _ => codes.chunks_exact(2).map(|p| (p[0] & 15) | (p[1] << 4)).collect(),
        };
        QMatrix { rows, cols, bits: s.bits, group_size: s.group_size, codes: packed, scales, zeros }
    }

    pub fn scheme(&self) -> Scheme {
        Scheme { bits: self.bits, group_size: self.group_size, symmetric: false }
    }
    pub fn groups(&self) -> usize {
        self.cols / self.group_size
    }
    pub fn row_bytes(&self) -> usize {
        self.cols * self.bits as usize / 8
    }
    /// Bytes as stored: the codes plus an f32 scale and zero point per group.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * (self.scales.len() + self.zeros.len())
    }

    /// Row `r`'s codes, one per byte, into `out` (`cols` long).
    pub fn unpack_row(&self, r: usize, out: &mut [u8]) {
        let row = &self.codes[r * self.row_bytes()..(r + 1) * self.row_bytes()];
        unpack(row, self.bits, out);
    }

    /// Row `r` as f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (row, g) = (&self.codes[r * self.row_bytes()..(r + 1) * self.row_bytes()], self.groups());
        let chunk_bytes = 32 * self.bits as usize / 8;
        let mut codes = [0u8; 32];
        for (c, (o, packed)) in out.chunks_exact_mut(32).zip(row.chunks_exact(chunk_bytes)).enumerate() {
            unpack(packed, self.bits, &mut codes);
            let k = r * g + c * 32 / self.group_size;
            let (scale, zero) = (self.scales[k], self.zeros[k]);
            o.iter_mut().zip(&codes).for_each(|(o, q)| *o = scale * (*q as f32 - zero));
        }
    }

    /// The whole matrix as f32, (rows, cols).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        for (r, row) in out.chunks_mut(self.cols).enumerate() {
            self.dequantize_row(r, row);
        }
        out
    }
}

/// One code per byte from packed `bits`-bit codes.
#[inline(always)]
pub fn unpack(packed: &[u8], bits: u32, out: &mut [u8]) {
    match bits {
        8 => out.copy_from_slice(packed),
        _ => {
            for (pair, b) in out.chunks_exact_mut(2).zip(packed) {
                pair[0] = b & 15;
                pair[1] = b >> 4;
            }
        }
    }
}

/// RTN's scale and zero point for one group (see the module's documentation).
pub fn range_params(x: &[f32], s: Scheme) -> (f32, f32) {
    let mut lo = x.iter().fold(0.0f32, |m, v| m.min(*v));
    let mut hi = x.iter().fold(0.0f32, |m, v| m.max(*v));
    if s.symmetric {
        hi = hi.max(lo.abs());
        if lo < 0.0 {
            lo = -hi;
        }
    }
    if lo == 0.0 && hi == 0.0 {
        (lo, hi) = (-1.0, 1.0);
    }
    let scale = (hi - lo) / s.maxq();
    let zero = if s.symmetric { (s.maxq() + 1.0) / 2.0 } else { (-lo / scale).round_ties_even() };
    (scale, zero)
}

/// `clamp(round(x / scale) + zero, 0, maxq)`.
#[inline]
fn code(x: f32, scale: f32, zero: f32, maxq: f32) -> f32 {
    ((x / scale).round_ties_even() + zero).clamp(0.0, maxq)
}

/// Quantize `w` (rows, cols) by rounding to nearest, group by group.
pub fn rtn(w: &[f32], rows: usize, cols: usize, s: Scheme) -> QMatrix {
    let g = cols / s.group_size;
    let (mut codes, mut scales, mut zeros) = (vec![0u8; rows * cols], vec![0.0; rows * g], vec![0.0; rows * g]);
    for r in 0..rows {
        for k in 0..g {
            let span = r * cols + k * s.group_size..r * cols + (k + 1) * s.group_size;
            let (scale, zero) = range_params(&w[span.clone()], s);
            (scales[r * g + k], zeros[r * g + k]) = (scale, zero);
            for (q, x) in codes[span.clone()].iter_mut().zip(&w[span]) {
                *q = code(*x, scale, zero, s.maxq()) as u8;
            }
        }
    }
    QMatrix::from_codes(rows, cols, s, &codes, scales, zeros)
}

/// Quantize `w` (rows, cols) with HQQ's fitted zero points (always asymmetric).
pub fn hqq(w: &[f32], rows: usize, cols: usize, s: Scheme) -> QMatrix {
    const LP: f32 = 0.7;
    const ITERS: usize = 20;
    let (gs, g, maxq) = (s.group_size, cols / s.group_size, s.maxq());
    let (mut codes, mut scales, mut zeros) = (vec![0u8; rows * cols], vec![0.0; rows * g], vec![0.0; rows * g]);
    let mut wq = vec![0.0f32; gs];
    for r in 0..rows {
        for k in 0..g {
            let span = r * cols + k * gs..r * cols + (k + 1) * gs;
            let x = &w[span.clone()];
            let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            // HQQ's form: q = round(x * inv + zero), x = (q - zero) / inv.
            let inv = (maxq / (hi - lo)).min(2e4);
            let mut zero = -lo * inv;
            let (mut beta, mut best) = (10.0f32, f32::INFINITY);
            for _ in 0..ITERS {
                let mut err_sum = 0.0f32;
                let mut zero_sum = 0.0f32;
                for (q, x) in wq.iter_mut().zip(x) {
                    *q = (x * inv + zero).round_ties_even().clamp(0.0, maxq);
                    let e = x - (*q - zero) / inv;
                    let shrunk = e.signum() * (e.abs() - e.abs().powf(LP - 1.0) / beta).max(0.0);
                    zero_sum += *q - (x - shrunk) * inv;
                    err_sum += e.abs();
                }
                zero = zero_sum / gs as f32;
                beta *= 1.01;
                let err = err_sum / gs as f32;
                if err < best {
                    best = err;
                } else {
                    break;
                }
            }
            let scale = 1.0 / inv;
            (scales[r * g + k], zeros[r * g + k]) = (scale, zero);
            for (q, x) in codes[span.clone()].iter_mut().zip(x) {
                *q = (x * inv + zero).round_ties_even().clamp(0.0, maxq) as u8;
            }
        }
    }
    QMatrix::from_codes(rows, cols, s, &codes, scales, zeros)
}

/// Quantize `w` (rows, cols) by GPTQ given its input Hessian `h` (cols, cols; `X^T X` summed
/// over calibration rows), dampened by `damp` times its mean diagonal.
pub fn gptq(w: &[f32], rows: usize, cols: usize, h: &[f64], s: Scheme, damp: f64) -> QMatrix {
    assert_eq!(h.len(), cols * cols, "the Hessian is not cols x cols");
    let mut w: Vec<f64> = w.iter().map(|x| *x as f64).collect();
    let mut h = h.to_vec();
    // An input that never fires carries no information: its weights become 0.
    for i in 0..cols {
        if h[i * cols + i] == 0.0 {
            h[i * cols + i] = 1.0;
            (0..rows).for_each(|r| w[r * cols + i] = 0.0);
        }
    }
    let mean_diag = (0..cols).map(|i| h[i * cols + i]).sum::<f64>() / cols as f64;
    (0..cols).for_each(|i| h[i * cols + i] += damp * mean_diag);
    let u = upper_cholesky_of_inverse(&h, cols);
    let (gs, g, maxq) = (s.group_size, cols / s.group_size, s.maxq());
    let (mut codes, mut scales, mut zeros) = (vec![0u8; rows * cols], vec![0.0; rows * g], vec![0.0; rows * g]);
    let mut group = vec![0.0f32; gs];
    for i in 0..cols {
        if i % gs == 0 {
            for r in 0..rows {
                group.iter_mut().zip(&w[r * cols + i..r * cols + i + gs]).for_each(|(a, b)| *a = *b as f32);
                let (scale, zero) = range_params(&group, s);
                (scales[r * g + i / gs], zeros[r * g + i / gs]) = (scale, zero);
            }
        }
        let d = u[i * cols + i];
        for r in 0..rows {
            let (scale, zero) = (scales[r * g + i / gs], zeros[r * g + i / gs]);
            let x = w[r * cols + i];
            let q = code(x as f32, scale, zero, maxq);
            codes[r * cols + i] = q as u8;
            let err = (x - (scale * (q - zero)) as f64) / d;
            for j in i + 1..cols {
                w[r * cols + j] -= err * u[i * cols + j];
            }
        }
    }
    QMatrix::from_codes(rows, cols, s, &codes, scales, zeros)
}

/// `U` upper triangular with `U^T U = H^-1`, for symmetric positive definite `H` (n, n).
///
/// # Panics
/// If `H` is not positive definite (GPTQ's damping makes it so).
fn upper_cholesky_of_inverse(h: &[f64], n: usize) -> Vec<f64> {
    let l = cholesky(h, n);
    // H^-1 = L^-T L^-1: invert the lower factor by forward substitution.
    let mut li = vec![0.0f64; n * n];
    for c in 0..n {
        for r in c..n {
            let mut sum = if r == c { 1.0 } else { 0.0 };
            for k in c..r {
                sum -= l[r * n + k] * li[k * n + c];
            }
            li[r * n + c] = sum / l[r * n + r];
        }
    }
    let mut inv = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let v: f64 = (i..n).map(|k| li[k * n + i] * li[k * n + j]).sum();
            inv[i * n + j] = v;
            inv[j * n + i] = v;
        }
    }
    // U = L'^T for the lower factor L' of H^-1.
    let lower = cholesky(&inv, n);
    let mut u = vec![0.0f64; n * n];
    for r in 0..n {
        for c in 0..=r {
            u[c * n + r] = lower[r * n + c];
        }
    }
    u
}

/// The lower Cholesky factor of a symmetric positive definite matrix (n, n).
fn cholesky(a: &[f64], n: usize) -> Vec<f64> {
    let mut l = vec![0.0f64; n * n];
    for r in 0..n {
        for c in 0..=r {
            let sum: f64 = a[r * n + c] - (0..c).map(|k| l[r * n + k] * l[c * n + k]).sum::<f64>();
            if r == c {
                assert!(sum > 0.0, "the matrix is not positive definite (pivot {r} is {sum})");
                l[r * n + r] = sum.sqrt();
            } else {
                l[r * n + c] = sum / l[c * n + c];
            }
        }
    }
    l
}

/// A linear layer's weight as (out, in), row-major, whatever its stored layout.
pub fn out_in(w: &[f32], layout: WeightLayout, cin: usize, cout: usize) -> Vec<f32> {
    match layout {
        WeightLayout::OutIn => w.to_vec(),
        WeightLayout::InOut => {
            let mut t = vec![0.0f32; w.len()];
            for i in 0..cin {
                for o in 0..cout {
                    t[o * cin + i] = w[i * cout + o];
                }
            }
            t
        }
    }
}

/// `params` with every linear layer of the blocks whose input width `scheme`'s groups divide
/// held quantized by RTN (the others stay f32).
pub fn rtn_linears(cfg: &ModelConfig, params: &ParamMap, scheme: Scheme) -> ParamMap {
    let mut out = params.clone();
    for m in cfg.linear_modules().iter().filter(|m| m.cin % scheme.group_size == 0) {
        let name = format!("{}.weight", m.path);
        let w = out_in(params.get(&name), m.layout, m.cin, m.cout);
        out.insert_quantized(name, rtn(&w, m.cout, m.cin, scheme));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::random;
    use crate::nn::kernels::matmul::{matmul_naive, Dims, Layout};

    /// `sum over rows of |x W^T - x Q^T|^2 / (rows * cols_out)`: the mean squared error of a
    /// quantized layer's output on inputs `x` (rows, cols).
    pub fn output_mse(x: &[f32], rows: usize, w: &[f32], q: &QMatrix) -> f64 {
        let d = Dims { m: rows, k: q.cols, n: q.rows };
        let (mut a, mut b) = (vec![0.0f32; rows * q.rows], vec![0.0f32; rows * q.rows]);
        matmul_naive(x, Layout::Normal, w, Layout::Transposed, &mut a, d, false);
        matmul_naive(x, Layout::Normal, &q.dequantize(), Layout::Transposed, &mut b, d, false);
        a.iter().zip(&b).map(|(u, v)| ((u - v) as f64).powi(2)).sum::<f64>() / a.len().max(1) as f64
    }

    const INT4: Scheme = Scheme { bits: 4, group_size: 32, symmetric: false };

    #[test]
    fn four_bit_codes_pack_two_to_a_byte_and_unpack_again() {
        let codes: Vec<u8> = (0..64).map(|i| (i * 7 % 16) as u8).collect();
        let q = QMatrix::from_codes(2, 32, INT4, &codes, vec![1.0; 2], vec![0.0; 2]);
        assert_eq!(q.codes.len(), 32);
        assert_eq!(q.codes[0], codes[0] | (codes[1] << 4), "the even column is the low nibble");
        let mut back = vec![0u8; 32];
        for r in 0..2 {
            q.unpack_row(r, &mut back);
            assert_eq!(back, codes[r * 32..(r + 1) * 32]);
        }
        let q8 = QMatrix::from_codes(1, 32, Scheme { bits: 8, ..INT4 }, &codes[..32], vec![0.5], vec![3.0]);
        assert_eq!(q8.dequantize()[1], 0.5 * (codes[1] as f32 - 3.0));
    }

    #[test]
    fn rtn_follows_its_formula() {
        // One group of 32: a ramp from -1 to 2.1 (step 0.1).
        let x: Vec<f32> = (0..32).map(|i| -1.0 + 0.1 * i as f32).collect();
        let q = rtn(&x, 1, 32, INT4);
        let scale = (x[31] - -1.0) / 15.0;
        assert_eq!(q.scales[0], scale);
        assert_eq!(q.zeros[0], (1.0 / scale).round_ties_even());
        let dq = q.dequantize();
        for (a, b) in x.iter().zip(&dq) {
            assert!((a - b).abs() <= scale / 2.0 + 1e-6, "{a} vs {b}");
        }
        // Symmetric: zero point 2^(b-1), range [-amax, amax].
        let sym = rtn(&x, 1, 32, Scheme { symmetric: true, ..INT4 });
        assert_eq!((sym.scales[0], sym.zeros[0]), (2.0 * x[31] / 15.0, 8.0));
        // A group of zeros quantizes to zeros.
        assert!(rtn(&[0.0; 32], 1, 32, INT4).dequantize().iter().all(|v| *v == 0.0));
        // int8 is far closer than int4.
        let w = random(4 * 64, 3);
        let err = |q: &QMatrix| q.dequantize().iter().zip(&w).map(|(a, b)| (a - b).powi(2)).sum::<f32>();
        assert!(err(&rtn(&w, 4, 64, Scheme { bits: 8, ..INT4 })) * 100.0 < err(&rtn(&w, 4, 64, INT4)));
    }

    /// HQQ's first round by hand: the starting zero point is RTN's unrounded `-min * inv`, and
    /// the fitted one lowers the p-norm error that HQQ minimises.
    #[test]
    fn hqq_fits_zero_points_that_lower_the_lp_error() {
        let w: Vec<f32> = random(8 * 64, 5).iter().map(|v| v * v * v).collect(); // heavy tails
        let fitted = hqq(&w, 8, 64, INT4);
        let lp =
            |q: &QMatrix| q.dequantize().iter().zip(&w).map(|(a, b)| ((a - b).abs() as f64).powf(0.7)).sum::<f64>();
        // The unfitted start: min-max range, real zero point.
        let mut start = fitted.clone();
        for r in 0..8 {
            for k in 0..2 {
                let x = &w[r * 64 + k * 32..r * 64 + (k + 1) * 32];
                let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let inv = 15.0 / (hi - lo);
                assert_eq!(fitted.scales[r * 2 + k], 1.0 / inv);
                start.zeros[r * 2 + k] = -lo * inv;
                let mut codes = vec![0u8; 64];
                start.unpack_row(r, &mut codes);
                for (j, x) in x.iter().enumerate() {
                    codes[k * 32 + j] = (x * inv - lo * inv).round_ties_even().clamp(0.0, 15.0) as u8;
                }
                start.codes[r * 32..(r + 1) * 32]
                    .copy_from_slice(&codes.chunks_exact(2).map(|p| p[0] | (p[1] << 4)).collect::<Vec<u8>>());
            }
        }
        assert!(lp(&fitted) < lp(&start), "fitted {} vs start {}", lp(&fitted), lp(&start));
    }

    /// GPTQ worked by hand on the first 2 x 4 block of a 2 x 32 matrix (32 is the smallest
    /// group), with a Hessian that couples column pairs (0, 1) and (2, 3) only:
    /// `H = [[1, .5], [.5, 1]]` per pair, identity elsewhere, no damping.
    ///
    /// `H^-1` per pair is `[[4/3, -2/3], [-2/3, 4/3]]`; its upper Cholesky factor `U` has
    /// `U00 = sqrt(4/3)`, `U01 = -(2/3) / sqrt(4/3)`. Quantizing column 0 to `q0` leaves the
    /// error `e = (w0 - q0) / U00`, and column 1 becomes `w1 - e U01 = w1 + (w0 - q0) / 2`:
    /// half of column 0's rounding error moves to its partner (the optimal update
    /// `-(w0 - q0) H^-1_10 / H^-1_00 = (w0 - q0) / 2`). Columns 2 and 3 likewise; the other
    /// columns round as RTN does.
    #[test]
    fn gptq_moves_each_rounding_error_to_the_coupled_column() {
        let cols = 32;
        let mut h = vec![0.0f64; cols * cols];
        (0..cols).for_each(|i| h[i * cols + i] = 1.0);
        for (a, b) in [(0, 1), (2, 3)] {
            h[a * cols + b] = 0.5;
            h[b * cols + a] = 0.5;
        }
        let mut w = vec![0.0f32; 2 * cols];
        w[..4].copy_from_slice(&[0.33, 0.71, -0.52, 0.18]);
        w[cols..cols + 4].copy_from_slice(&[-0.94, 0.05, 0.61, -0.27]);
        for j in 4..cols {
            w[j] = 0.9 - 0.05 * j as f32;
            w[cols + j] = -0.8 + 0.04 * j as f32;
        }
        let q = gptq(&w, 2, cols, &h, INT4, 0.0);
        let rtn_q = rtn(&w, 2, cols, INT4);
        assert_eq!((&q.scales, &q.zeros), (&rtn_q.scales, &rtn_q.zeros), "one group, chosen before any update");
        let dq = q.dequantize();
        for r in 0..2 {
            let (scale, zero) = (q.scales[r], q.zeros[r]);
            let round = |x: f32| scale * (code(x, scale, zero, 15.0) - zero);
            let row = &w[r * cols..(r + 1) * cols];
            for (a, b) in [(0, 1), (2, 3)] {
                let qa = round(row[a]);
                assert_eq!(dq[r * cols + a], qa);
                let moved = row[b] + (row[a] - qa) / 2.0;
                assert!((dq[r * cols + b] - round(moved)).abs() < 1e-6, "row {r} column {b}");
            }
            for j in 4..cols {
                assert_eq!(dq[r * cols + j], rtn_q.dequantize()[r * cols + j]);
            }
        }
    }

    /// On correlated inputs GPTQ's output error is below RTN's, for the same grid.
    #[test]
    fn gptq_lowers_the_output_error_on_its_calibration_inputs() {
        let (rows, cols, n) = (16, 64, 256);
        let base = random(n * 8, 7);
        let mix = random(8 * cols, 8);
        let noise = random(n * cols, 9);
        // Inputs of rank ~8 plus a little noise: strongly correlated columns.
        let mut x = vec![0.0f32; n * cols];
        matmul_naive(&base, Layout::Normal, &mix, Layout::Normal, &mut x, Dims { m: n, k: 8, n: cols }, false);
        x.iter_mut().zip(&noise).for_each(|(v, e)| *v += 0.05 * e);
        let mut h = vec![0.0f64; cols * cols];
        for row in x.chunks(cols) {
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += row[i] as f64 * row[j] as f64;
                }
            }
        }
        let w = random(rows * cols, 10);
        let (g, r) = (gptq(&w, rows, cols, &h, INT4, 0.01), rtn(&w, rows, cols, INT4));
        let (eg, er) = (output_mse(&x, n, &w, &g), output_mse(&x, n, &w, &r));
        assert!(eg < 0.7 * er, "gptq {eg} vs rtn {er}");
    }

    #[test]
    fn the_inverse_factor_satisfies_its_definition() {
        let n = 5;
        let a = random(n * n, 11);
        let mut h = vec![0.0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                h[i * n + j] = (0..n).map(|k| a[i * n + k] as f64 * a[j * n + k] as f64).sum::<f64>();
            }
            h[i * n + i] += 0.5;
        }
        let u = upper_cholesky_of_inverse(&h, n);
        // U^T U H = I.
        for i in 0..n {
            for j in 0..n {
                let uu = |a: usize, b: usize| (0..n).map(|k| u[k * n + a] * u[k * n + b]).sum::<f64>();
                let v: f64 = (0..n).map(|k| uu(i, k) * h[k * n + j]).sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9);
                if i > j {
                    assert_eq!(u[i * n + j], 0.0);
                }
            }
        }
    }
}
