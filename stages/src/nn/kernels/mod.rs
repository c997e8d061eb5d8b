//! Hot numeric kernels: small functions over slices with explicit dimensions. Buffers that grow
//! with the model come from the caller; a few kernels keep a small per-call scratch. Shapes use
//! B, T, C, V (batch, time, channels, vocabulary); a `rows` argument is B * T flattened.
//!
//! Determinism: every reduction runs in an order that does not depend on the number of
//! threads (fixed-size chunks, combined in order), so 1 and 2 threads give the same bits.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod bf16;
pub mod bias;
pub mod cross_entropy;
pub mod distill;
pub mod embedding;
pub mod gemv;
pub mod lowrank;
pub mod matmul;
pub mod norm;
pub mod qmatmul;

use std::cell::RefCell;
use std::sync::OnceLock;

use matmul::{Dims, Layout};

use rayon::prelude::*;

/// The arithmetic of a model's products: each linear layer's forward product and both products
/// of backward, and attention's products. Adapters, norms, softmax and everything else stay
/// f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 operands and accumulation.
    #[default]
    F32,
    /// Operands rounded to bf16, products accumulated in f32 as AMX-BF16 does
    /// ([`crate::nn::kernels::bf16`]); weights, gradients and the optimizer stay f32.
    Bf16,
}

impl Precision {
    /// The name a recipe gives it.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "f32" => Some(Precision::F32),
            "bf16" => Some(Precision::Bf16),
            _ => None,
        }
    }

    /// `out = [out +] op(a) @ op(b)` in this precision.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul(
        self,
        a: &[f32],
        la: Layout,
        b: &[f32],
        lb: Layout,
        out: &mut [f32],
        d: Dims,
        accumulate: bool,
    ) {
        match self {
            Precision::F32 => matmul::matmul(a, la, b, lb, out, d, accumulate),
            Precision::Bf16 => bf16::matmul_bf16(a, la, b, lb, out, d, accumulate),
        }
    }

    /// Rows per block of [`Self::matmul_then`] for a product of `m` rows.
    pub(crate) fn then_rows(self, m: usize) -> usize {
        matmul::then_rows(m, self.then_most())
    }

    /// Blocks of [`Self::then_rows`] in a product of `m` rows.
    pub(crate) fn then_blocks(self, m: usize) -> usize {
        matmul::then_blocks(m, self.then_most())
    }

    fn then_most(self) -> usize {
        match self {
            Precision::F32 => matmul::THEN_ROWS,
            Precision::Bf16 => bf16::THEN_ROWS,
        }
    }

    /// [`Self::matmul`], then `then(first_row, rows, context)` on each block of
    /// [`Self::then_rows`] output rows with its item of `contexts`
    /// ([`matmul::matmul_then`], [`bf16::matmul_bf16_then`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul_then<C: Send>(
        self,
        a: &[f32],
        la: Layout,
        b: &[f32],
        lb: Layout,
        out: &mut [f32],
        d: Dims,
        accumulate: bool,
        contexts: impl IndexedParallelIterator<Item = C>,
        then: impl Fn(usize, &mut [f32], C) + Sync + Send,
    ) {
        match self {
            Precision::F32 => matmul::matmul_then(a, la, b, lb, out, d, accumulate, contexts, then),
            Precision::Bf16 => bf16::matmul_bf16_then(a, la, b, lb, out, d, accumulate, contexts, then),
        }
    }
}

/// The instruction set the kernels run on, detected once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// x86-64 with AVX-512 (F, BW, VL, DQ) besides AVX2 and FMA: elementwise loops compiled for
    /// 512-bit vectors.
    Avx512,
    /// x86-64 with AVX2 and FMA: elementwise loops compiled for 256-bit vectors.
    Avx2Fma,
    /// Plain Rust for the baseline target (NEON on aarch64, SSE2 on x86-64).
    Portable,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2Fma => "avx2+fma",
            Isa::Portable => "portable",
        }
    }

    /// AVX2 and FMA are there (they are wherever AVX-512 is).
    pub fn has_avx2_fma(self) -> bool {
        self != Isa::Portable
    }
}

/// The detected [`Isa`]; `TINYGPT_SIMD=portable` forces the portable kernels, and
/// `TINYGPT_SIMD=avx2` the AVX2 ones where there is AVX-512. The choice never
/// changes a result's bits (each kernel computes the same operations in the same order on every
/// path), only its speed.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let forced = std::env::var("TINYGPT_SIMD").ok();
        if forced.as_deref() == Some("portable") {
            return Isa::Portable;
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            let avx512 = std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512dq");
            return if avx512 && forced.as_deref() != Some("avx2") { Isa::Avx512 } else { Isa::Avx2Fma };
        }
        Isa::Portable
    })
}

/// Defines a kernel function three times, compiled for AVX-512, for AVX2+FMA and for the
/// baseline target, and picks one per call by [`isa`]. Rust never contracts `a * b + c` into an
/// FMA nor reorders float operations, so all three compute the same bits; the wider ones are
/// only faster. Helpers the body calls must be `#[inline(always)]`, or they stay baseline code.
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
            unsafe fn widest($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn wide($($arg: $ty),*) $(-> $ret)? $body
            #[inline(always)]
            fn narrow($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            match $crate::nn::kernels::isa() {
                // SAFETY: `isa` checked that the CPU has these.
                $crate::nn::kernels::Isa::Avx512 => return unsafe { widest($($arg),*) },
                // SAFETY: `isa` checked that the CPU has AVX2 and FMA.
                $crate::nn::kernels::Isa::Avx2Fma => return unsafe { wide($($arg),*) },
                $crate::nn::kernels::Isa::Portable => {}
            }
            narrow($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch block of `len` floats, grown once and then reused, so a
/// kernel's per-task blocks allocate nothing inside the step loop. Its contents are whatever
/// the last user left: write before reading. `f` must not call another kernel that uses it
/// (the borrow would panic, not alias).
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        if scratch.len() < len {
            scratch.resize(len, 0.0);
        }
        f(&mut scratch[..len])
    })
}

simd_fn! {
    /// `acc += x`, elementwise.
    pub(crate) fn add_to(acc: &mut [f32], x: &[f32]) {
        for (a, x) in acc.iter_mut().zip(x) {
            *a += x;
        }
    }
}

/// `acc += x`, elementwise, in parallel blocks (the residual stream's additions).
pub fn add_assign(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len(), "add_assign of unequal lengths");
    const CHUNK: usize = 16_384;
    acc.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(acc, x)| add_to(acc, x));
}

/// `e^x` in f32 without a library call, so loops over it vectorize: `x = n ln2 + r` with
/// |r| <= ln2 / 2, a degree-6 polynomial for `e^r` (Cephes' `expf` coefficients), and `2^n`
/// built in the exponent bits. Relative error below 3e-7 on [-87, 88]; clamped outside.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to the nearest integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let two_n = f32::from_bits(((t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) as u32) << 23);
    er * two_n
}

/// `sum(f(cols[0][i], cols[1][i], ...))` over the columns' elements in f64, in four
/// interleaved partial sums combined in a fixed order: it vectorizes (four f64 lanes), and
/// its bits depend on the inputs only.
///
/// # Panics
/// If the columns' lengths differ.
#[inline(always)]
pub fn sum_f64<const K: usize>(cols: [&[f32]; K], f: impl Fn([f32; K]) -> f64) -> f64 {
    let [sum] = sum_f64_rows([cols], |_, v| f(v));
    sum
}

/// [`sum_f64`] of `R` rows side by side, `f` told the row: each row's sum has the bits of
/// [`sum_f64`] of that row alone, and the rows' dependent chains of additions overlap.
///
/// # Panics
/// If the columns' lengths differ.
#[inline(always)]
pub fn sum_f64_rows<const R: usize, const K: usize>(
    rows: [[&[f32]; K]; R],
    f: impl Fn(usize, [f32; K]) -> f64,
) -> [f64; R] {
    let n = rows.first().and_then(|cols| cols.first()).map_or(0, |c| c.len());
    assert!(rows.iter().flatten().all(|c| c.len() == n), "sum_f64 over columns of different lengths");
    let quads = rows.map(|cols| cols.map(|c| c.as_chunks::<4>().0));
    let mut acc = [[0.0f64; 4]; R];
    #[allow(clippy::needless_range_loop)] // q walks every row's and column's quads in step
    for q in 0..n / 4 {
        for (r, acc) in acc.iter_mut().enumerate() {
            let quad: [&[f32; 4]; K] = std::array::from_fn(|k| &quads[r][k][q]);
            for (lane, a) in acc.iter_mut().enumerate() {
                *a += f(r, quad.map(|x| x[lane]));
            }
        }
    }
    std::array::from_fn(|r| {
        let tail: f64 = (n - n % 4..n).map(|i| f(r, rows[r].map(|c| c[i]))).sum();
        let a = acc[r];
        ((a[0] + a[2]) + (a[1] + a[3])) + tail
    })
}

/// `sum(a[i] * b[i])` in eight interleaved partial sums, combined in a fixed order: the
/// compiler vectorizes it (a single running sum it may not reorder), and the bits do not
/// depend on anything but the inputs.
///
/// # Panics
/// If the lengths differ.
#[inline(always)] // so that `simd_fn!` bodies get it at their width
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of slices of different lengths");
    let mut acc = [0.0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    sum_lanes(acc) + dot_tail(a, b)
}

/// [`dot`]'s eight lanes summed in its fixed order: the high half onto the low, then pairs.
/// Kernels that compute the lanes their own way finish here to keep [`dot`]'s bits.
#[inline(always)]
pub(crate) fn sum_lanes(acc: [f32; 8]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// [`dot`]'s products past the last whole eight, summed in order from zero: what it adds to
/// [`sum_lanes`] last.
#[inline(always)]
pub(crate) fn dot_tail(a: &[f32], b: &[f32]) -> f32 {
    let whole = a.len() / 8 * 8;
    let mut tail = 0.0f32;
    for (x, y) in a[whole..].iter().zip(&b[whole..]) {
        tail += x * y;
    }
    tail
}

/// `y += a * x`, element by element (so the bits are those of the plain loop).
#[inline(always)]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy of slices of different lengths");
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_fast_matches_f64_exp() {
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let (got, want) = (super::exp_fast(x) as f64, (x as f64).exp());
            assert!(((got - want) / want).abs() < 3e-7, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(super::exp_fast(-1000.0), super::exp_fast(-87.0));
        assert!(super::exp_fast(1000.0).is_finite());
    }

    #[test]
    fn sum_f64_matches_a_plain_sum() {
        for n in [0, 1, 3, 4, 5, 8, 13, 128] {
            let x = crate::nn::gradcheck::random(n, 3);
            let want: f64 = x.iter().map(|v| *v as f64).sum();
            assert!((super::sum_f64([&x], |[v]| v as f64) - want).abs() < 1e-12, "n = {n}");
        }
    }

    #[test]
    fn sum_f64_rows_has_the_bits_of_four_lanes_in_order_for_each_row() {
        // Four interleaved partial sums, each in element order, combined as (0 + 2) + (1 + 3),
        // then the elements past the last whole four from zero.
        let plain = |x: &[f32], y: &[f32]| {
            let mut lanes = [0.0f64; 4];
            let whole = x.len() / 4 * 4;
            for i in 0..whole {
                lanes[i % 4] += x[i] as f64 * y[i] as f64;
            }
            let tail: f64 = (whole..x.len()).map(|i| x[i] as f64 * y[i] as f64).sum();
            ((lanes[0] + lanes[2]) + (lanes[1] + lanes[3])) + tail
        };
        for n in [0, 3, 4, 13, 128] {
            let rows: Vec<Vec<f32>> = (0..3).map(|r| crate::nn::gradcheck::random(n, 10 + r)).collect();
            let y = crate::nn::gradcheck::random(n, 20);
            let scale = [1.0f32, -2.0, 0.5];
            let sums: [f64; 3] = super::sum_f64_rows(std::array::from_fn(|r| [&rows[r][..], &y[..]]), |r, [x, y]| {
                (x * scale[r]) as f64 * y as f64
            });
            for r in 0..3 {
                let scaled: Vec<f32> = rows[r].iter().map(|x| x * scale[r]).collect();
                assert_eq!(sums[r].to_bits(), plain(&scaled, &y).to_bits(), "n = {n}, row {r}");
            }
        }
    }

    super::simd_fn! {
        fn scaled_sum(x: &[f32], k: f32) -> f32 {
            x.iter().map(|v| v * k).sum()
        }
    }

    #[test]
    fn simd_fn_computes_the_bits_of_the_baseline_code() {
        let x = crate::nn::gradcheck::random(1000, 4);
        let plain: f32 = x.iter().map(|v| v * 0.3).sum();
        assert_eq!(scaled_sum(&x, 0.3).to_bits(), plain.to_bits());
    }

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
