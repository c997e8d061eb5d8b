//! Elementwise activations: GELU (GPT-2's tanh approximation or the exact one), alone or fused
//! with the bias before it, and SwiGLU (llama's MLP gate).

use rayon::prelude::*;

use super::bias::{add_rows, row_chunk};
use super::{exp_fast, simd_fn};

const CHUNK: usize = 4096;
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// `tanh` through [`exp_fast`]: GELU adds 1 to it, so the absolute error (below 1e-6) is what
/// counts, not the relative error near 0 that libm's `tanhf` pays `expm1f` for.
#[inline(always)]
fn tanh_fast(u: f32) -> f32 {
    let e = exp_fast(2.0 * u.clamp(-9.0, 9.0));
    (e - 1.0) / (e + 1.0)
}

/// Which GELU: GPT-2's tanh approximation (Hugging Face's `gelu_new`) or the exact one with erf
/// (PyTorch's `nn.GELU()`, which nanoGPT uses; Hugging Face's `gelu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gelu {
    Tanh,
    Erf,
}

impl Gelu {
    /// Its name in Hugging Face's `activation_function` (and in recipes).
    pub fn hf_name(self) -> &'static str {
        match self {
            Gelu::Tanh => "gelu_new",
            Gelu::Erf => "gelu",
        }
    }

    /// The GELU a Hugging Face `activation_function` names, if it is one of these two.
    pub fn from_hf_name(name: &str) -> Option<Gelu> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" => Some(Gelu::Tanh),
            "gelu" => Some(Gelu::Erf),
            _ => None,
        }
    }
}

/// `erf(x)` in f32 without a library call (Abramowitz and Stegun 7.1.26, absolute error below
/// 1.5e-7, plus [`exp_fast`]'s): `1 - poly(t) e^(-x^2)` with `t = 1 / (1 + p |x|)`, odd.
#[inline(always)]
fn erf_fast(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_fast(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

const SQRT_1_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2 pi)`, the standard normal density at 0.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `out = gelu(x)`: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` or `0.5 x (1 + erf(x / sqrt 2))`.
pub fn gelu_forward(kind: Gelu, x: &[f32], out: &mut [f32]) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Activation);
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| gelu_block(kind, x, o));
}

/// The MLP's first bias and its GELU in one pass: `x[r] += bias` for every row `r` of `x` (what
/// backward needs), then `out = gelu(x)`, a cache-sized block of whole rows at a time. The same
/// bits as [`add_bias`](super::bias::add_bias) followed by [`gelu_forward`].
pub fn bias_gelu_forward(kind: Gelu, x: &mut [f32], bias: &[f32], out: &mut [f32]) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Activation);
    let rows = row_chunk(bias.len());
    out.par_chunks_mut(rows).zip(x.par_chunks_mut(rows)).for_each(|(o, x)| {
        add_rows(x, bias);
        gelu_block(kind, x, o);
    });
}

fn gelu_block(kind: Gelu, x: &[f32], out: &mut [f32]) {
    match kind {
        Gelu::Tanh => gelu_chunk(x, out),
        Gelu::Erf => gelu_erf_chunk(x, out),
    }
}

simd_fn! {
    fn gelu_chunk(x: &[f32], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(x) {
            *o = 0.5 * x * (1.0 + tanh_fast(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)));
        }
    }
}

simd_fn! {
    fn gelu_erf_chunk(x: &[f32], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(x) {
            *o = 0.5 * x * (1.0 + erf_fast(x * SQRT_1_2));
        }
    }
}

/// `dx = dout * gelu'(x)`.
pub fn gelu_backward(kind: Gelu, dout: &[f32], x: &[f32], dx: &mut [f32]) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Activation);
    dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(dout.par_chunks(CHUNK))).for_each(|(dx, (x, d))| match kind {
        Gelu::Tanh => gelu_backward_chunk(d, x, dx),
        Gelu::Erf => gelu_erf_backward_chunk(d, x, dx),
    });
}

simd_fn! {
    fn gelu_backward_chunk(dout: &[f32], x: &[f32], dx: &mut [f32]) {
        for ((dx, &x), &d) in dx.iter_mut().zip(x).zip(dout) {
            let t = tanh_fast(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x));
            let dt = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x) * (1.0 - t * t);
            *dx = d * (0.5 * (1.0 + t) + 0.5 * x * dt);
        }
    }
}

simd_fn! {
    /// `gelu'(x) = Phi(x) + x phi(x)`.
    fn gelu_erf_backward_chunk(dout: &[f32], x: &[f32], dx: &mut [f32]) {
        for ((dx, &x), &d) in dx.iter_mut().zip(x).zip(dout) {
            let cdf = 0.5 * (1.0 + erf_fast(x * SQRT_1_2));
            let pdf = INV_SQRT_2PI * exp_fast(-0.5 * x * x);
            *dx = d * (cdf + x * pdf);
        }
    }
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_fast(-x))
}

/// `out = silu(gate) * up`, where `silu(a) = a * sigmoid(a)`.
pub fn swiglu_forward(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Activation);
    out.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))).for_each(|(o, (g, u))| {
        swiglu_chunk(g, u, o);
    });
}

simd_fn! {
    fn swiglu_chunk(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid(g) * u;
        }
    }
}

/// Gradients of [`swiglu_forward`] with respect to `gate` and `up`.
pub fn swiglu_backward(dout: &[f32], gate: &[f32], up: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Activation);
    dgate.par_chunks_mut(CHUNK).zip(dup.par_chunks_mut(CHUNK)).enumerate().for_each(|(chunk, (dg, du))| {
        let at = chunk * CHUNK..chunk * CHUNK + dg.len();
        swiglu_backward_chunk(&dout[at.clone()], &gate[at.clone()], &up[at], dg, du);
    });
}

simd_fn! {
    fn swiglu_backward_chunk(dout: &[f32], gate: &[f32], up: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
        for ((((dg, du), &g), &u), &d) in dgate.iter_mut().zip(dup.iter_mut()).zip(gate).zip(up).zip(dout) {
            let s = sigmoid(g);
            *dg = d * u * s * (1.0 + g * (1.0 - s));
            *du = d * g * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, probe_loss, random};

    #[test]
    fn gelu_matches_its_formula_and_finite_differences() {
        let x: Vec<f32> = random(50, 1).iter().map(|v| v * 4.0).collect();
        let probe = random(50, 2);
        for (kind, at_one) in [(Gelu::Tanh, 0.841_192), (Gelu::Erf, 0.841_344_7)] {
            let forward = |x: &[f32]| {
                let mut out = vec![0.0; x.len()];
                gelu_forward(kind, x, &mut out);
                out
            };
            assert!((forward(&[1.0])[0] - at_one).abs() < 1e-5, "{kind:?} gelu(1)");
            let mut dx = vec![0.0; 50];
            gelu_backward(kind, &probe, &x, &mut dx);
            check("gelu dx", &x, &dx, |x| probe_loss(&forward(x), &probe));
        }
    }

    #[test]
    fn the_fused_bias_and_gelu_equal_the_two_steps() {
        let (rows, width) = (40, 300);
        let (x, bias) = (random(rows * width, 6), random(width, 7));
        for kind in [Gelu::Tanh, Gelu::Erf] {
            let (mut fused_x, mut fused) = (x.clone(), vec![0.0; x.len()]);
            bias_gelu_forward(kind, &mut fused_x, &bias, &mut fused);
            let (mut plain_x, mut plain) = (x.clone(), vec![0.0; x.len()]);
            crate::nn::kernels::bias::add_bias(&mut plain_x, &bias);
            gelu_forward(kind, &plain_x, &mut plain);
            assert_eq!((fused_x, fused), (plain_x, plain), "{kind:?}");
        }
    }

    /// `kind`'s GELU against `want` (f64) on a fine grid over [-10, 10] and a few far points.
    fn matches_everywhere(kind: Gelu, want: impl Fn(f64) -> f64) {
        let x: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.005).chain([-80.0, -12.0, 12.0, 80.0]).collect();
        let mut out = vec![0.0; x.len()];
        gelu_forward(kind, &x, &mut out);
        for (x, y) in x.iter().zip(&out) {
            let (x64, want) = (*x as f64, want(*x as f64));
            assert!((*y as f64 - want).abs() <= 1e-6 * (1.0 + x64.abs()), "gelu({x}) = {y}, want {want}");
        }
    }

    #[test]
    fn gelu_matches_the_f64_formula_everywhere() {
        matches_everywhere(Gelu::Tanh, |x| {
            0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        });
    }

    /// erf in f64 by its Taylor series, exact to about 1e-10 on [-4, 4]; +-1 beyond.
    fn erf_reference(x: f64) -> f64 {
        if x.abs() > 4.0 {
            return x.signum() * (1.0 - (-x * x).exp() / (x.abs() * std::f64::consts::PI.sqrt()));
        }
        let (mut term, mut sum, mut n) = (x, x, 0.0f64);
        while term.abs() > 1e-17 {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    }

    #[test]
    fn exact_gelu_matches_the_f64_formula_everywhere() {
        matches_everywhere(Gelu::Erf, |x| 0.5 * x * (1.0 + erf_reference(x / 2f64.sqrt())));
    }

    #[test]
    fn swiglu_backward_matches_finite_differences() {
        let (g, u, probe) = (random(40, 3), random(40, 4), random(40, 5));
        let forward = |g: &[f32], u: &[f32]| {
            let mut out = vec![0.0; g.len()];
            swiglu_forward(g, u, &mut out);
            out
        };
        let (mut dg, mut du) = (vec![0.0; 40], vec![0.0; 40]);
        swiglu_backward(&probe, &g, &u, &mut dg, &mut du);
        check("dgate", &g, &dg, |g| probe_loss(&forward(g, &u), &probe));
        check("dup", &u, &du, |u| probe_loss(&forward(&g, u), &probe));
    }
}
