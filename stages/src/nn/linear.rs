//! A linear layer with an optional adapter: `out = x W (+ b)` with W stored (in, out)
//! (`Conv1D`) or (out, in) (`nn.Linear`), plus a LoRA adapter's `scale * x A^T B^T`, or DoRA's
//! rescaling of the adapted layer's output per output feature.
//!
//! DoRA (Liu et al. 2024) as PEFT computes it: `out = m / |W + s B A| * (x W^T + s x A^T B^T)
//! + b`, the norm taken over each output row of the adapted weight and treated as a constant
//! in backward (PEFT detaches it). The norm is found without forming `W + s B A`:
//! `|W_o|^2 + 2 s B_o . (W A^T)_o + s^2 B_o (A A^T) B_o^T`.

use crate::nn::config::WeightLayout;
use crate::nn::kernels::bias::{add_bias, bias_backward};
use crate::nn::kernels::matmul::{matmul, Dims, Layout};
use crate::nn::params::{ParamId, ParamMap};

/// A LoRA adapter on a linear layer: `lora_A` (r, in) and `lora_B` (out, r), scaled, and for
/// DoRA a magnitude (out).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Adapter {
    pub(crate) a: ParamId,
    pub(crate) b: ParamId,
    pub(crate) r: usize,
    pub(crate) scale: f32,
    pub(crate) magnitude: Option<ParamId>,
}

/// What a linear layer's adapter keeps between forward and backward, sized for its shape.
#[derive(Clone, Debug, Default)]
pub(crate) struct AdapterActs {
    /// The scaled `s x A^T` (rows, r).
    xa: Vec<f32>,
    /// DoRA: the adapted product before rescaling (rows, out).
    z: Vec<f32>,
    /// DoRA: each output's norm `|W_o + s (B A)_o|` and factor `m_o / norm` (2 * out).
    norm_and_factor: Vec<f32>,
    /// DoRA scratch: `W A^T` (out, r) and `A A^T` (r, r).
    wa: Vec<f32>,
    gram: Vec<f32>,
}

impl AdapterActs {
    /// Buffers for `rows` rows through a layer of `cout` outputs with an adapter of rank `r`
    /// (0: none), DoRA or not.
    pub(crate) fn new(rows: usize, r: usize, cout: usize, dora: bool) -> Self {
        let z = |n: usize| vec![0.0f32; n];
        let d = |n: usize| if dora { z(n) } else { Vec::new() };
        AdapterActs {
            xa: z(rows * r),
            z: d(rows * cout),
            norm_and_factor: d(2 * cout),
            wa: d(cout * r),
            gram: d(r * r),
        }
    }
    pub(crate) fn floats(&self) -> usize {
        self.xa.len() + self.z.len() + self.norm_and_factor.len() + self.wa.len() + self.gram.len()
    }
}

/// Backward's scratch for adapters: `d(x A^T)` (rows, r) and DoRA's rescaled output gradient
/// (rows, out), sized for the widest layer.
pub(crate) struct AdapterScratch<'a> {
    pub(crate) dxa: &'a mut [f32],
    pub(crate) dz: &'a mut [f32],
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Linear {
    pub(crate) w: ParamId,
    pub(crate) b: Option<ParamId>,
    pub(crate) cin: usize,
    pub(crate) cout: usize,
    pub(crate) layout: WeightLayout,
    pub(crate) adapter: Option<Adapter>,
    /// The layer's place in its block: where its adapter's buffers are.
    pub(crate) slot: usize,
}

impl Linear {
    fn w_layout(&self) -> Layout {
        match self.layout {
            WeightLayout::OutIn => Layout::Transposed,
            WeightLayout::InOut => Layout::Normal,
        }
    }

    /// `out = x W + b` with the adapter's term.
    pub(crate) fn forward(&self, p: &ParamMap, x: &[f32], out: &mut [f32], rows: usize, acts: &mut AdapterActs) {
        self.product(p, x, out, rows, acts);
        if let Some(b) = self.b {
            add_bias(out, p.at(b));
        }
    }

    /// `out = x W` with the adapter's term (and DoRA's rescaling), the bias left to the caller.
    pub(crate) fn product(&self, p: &ParamMap, x: &[f32], out: &mut [f32], rows: usize, acts: &mut AdapterActs) {
        let d = Dims { m: rows, k: self.cin, n: self.cout };
        matmul(x, Layout::Normal, p.at(self.w), self.w_layout(), out, d, false);
        let Some(ad) = self.adapter else { return };
        // (rows, in) x (in, r) -> (rows, r), scaled; then (rows, r) x (r, out) added.
        let xa = &mut acts.xa[..rows * ad.r];
        matmul(x, Layout::Normal, p.at(ad.a), Layout::Transposed, xa, Dims { m: rows, k: self.cin, n: ad.r }, false);
        xa.iter_mut().for_each(|v| *v *= ad.scale);
        matmul(xa, Layout::Normal, p.at(ad.b), Layout::Transposed, out, Dims { m: rows, k: ad.r, n: self.cout }, true);
        if let Some(m) = ad.magnitude {
            self.dora_norms(p, ad, acts);
            let (norms, factors) = acts.norm_and_factor.split_at_mut(self.cout);
            for ((f, n), m) in factors.iter_mut().zip(norms.iter()).zip(p.at(m)) {
                *f = m / n;
            }
            acts.z[..rows * self.cout].copy_from_slice(out);
            for row in out.chunks_mut(self.cout) {
                row.iter_mut().zip(factors.iter()).for_each(|(o, f)| *o *= f);
            }
        }
    }

    /// Each output's `|W_o + s (B A)_o|` into the first half of `acts.norm_and_factor`.
    fn dora_norms(&self, p: &ParamMap, ad: Adapter, acts: &mut AdapterActs) {
        let (cin, cout, r) = (self.cin, self.cout, ad.r);
        let (w, a, b) = (p.at(self.w), p.at(ad.a), p.at(ad.b));
        // W's rows (outputs) against A's rows: (out, in) x (in, r).
        let wa_layout = match self.layout {
            WeightLayout::OutIn => Layout::Normal,
            WeightLayout::InOut => Layout::Transposed,
        };
        matmul(w, wa_layout, a, Layout::Transposed, &mut acts.wa, Dims { m: cout, k: cin, n: r }, false);
        matmul(a, Layout::Normal, a, Layout::Transposed, &mut acts.gram, Dims { m: r, k: cin, n: r }, false);
        let s = ad.scale as f64;
        for o in 0..cout {
            let w_sq: f64 = match self.layout {
                WeightLayout::OutIn => w[o * cin..(o + 1) * cin].iter().map(|x| (*x as f64).powi(2)).sum(),
                WeightLayout::InOut => (0..cin).map(|i| (w[i * cout + o] as f64).powi(2)).sum(),
            };
            let bo = &b[o * r..(o + 1) * r];
            let cross: f64 = bo.iter().zip(&acts.wa[o * r..(o + 1) * r]).map(|(x, y)| *x as f64 * *y as f64).sum();
            let mut quad = 0.0f64;
            for j in 0..r {
                for k in 0..r {
                    quad += bo[j] as f64 * acts.gram[j * r + k] as f64 * bo[k] as f64;
                }
            }
            acts.norm_and_factor[o] = (w_sq + 2.0 * s * cross + s * s * quad).max(0.0).sqrt().max(1e-12) as f32;
        }
    }

    /// Writes (or with `add_dx`, adds into) `dx`; adds into the gradients of the weight, bias
    /// and adapter that are not frozen. `acts` is what forward saved for this layer.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &self,
        p: &ParamMap,
        g: &mut ParamMap,
        dout: &[f32],
        x: &[f32],
        acts: &AdapterActs,
        scratch: &mut AdapterScratch<'_>,
        dx: &mut [f32],
        rows: usize,
        add_dx: bool,
    ) {
        let (cin, cout) = (self.cin, self.cout);
        if let Some(b) = self.b.filter(|b| !g.at(*b).is_empty()) {
            bias_backward(dout, g.at_mut(b));
        }
        // DoRA: the product's gradient is dout scaled per output; the magnitude's is dout . z / norm.
        let dout: &[f32] = match self.adapter.and_then(|ad| ad.magnitude) {
            Some(m) => {
                let (norms, factors) = acts.norm_and_factor.split_at(cout);
                if !g.at(m).is_empty() {
                    let dm = g.at_mut(m);
                    for (drow, zrow) in dout.chunks(cout).zip(acts.z.chunks(cout)) {
                        for o in 0..cout {
                            dm[o] += drow[o] * zrow[o] / norms[o];
                        }
                    }
                }
                let dz = &mut scratch.dz[..rows * cout];
                for (dzrow, drow) in dz.chunks_mut(cout).zip(dout.chunks(cout)) {
                    dzrow.iter_mut().zip(drow).zip(factors).for_each(|((z, d), f)| *z = d * f);
                }
                dz
            }
            None => dout,
        };
        let dx_layout = match self.layout {
            WeightLayout::OutIn => Layout::Normal,
            WeightLayout::InOut => Layout::Transposed,
        };
        matmul(dout, Layout::Normal, p.at(self.w), dx_layout, dx, Dims { m: rows, k: cout, n: cin }, add_dx);
        if !g.at(self.w).is_empty() {
            match self.layout {
                WeightLayout::OutIn => {
                    let d = Dims { m: cout, k: rows, n: cin };
                    matmul(dout, Layout::Transposed, x, Layout::Normal, g.at_mut(self.w), d, true);
                }
                WeightLayout::InOut => {
                    let d = Dims { m: cin, k: rows, n: cout };
                    matmul(x, Layout::Transposed, dout, Layout::Normal, g.at_mut(self.w), d, true);
                }
            }
        }
        if let Some(ad) = self.adapter {
            let (xa, dxa) = (&acts.xa[..rows * ad.r], &mut scratch.dxa[..rows * ad.r]);
            // dB += dout^T (scale x A^T): (out, rows) x (rows, r).
            if !g.at(ad.b).is_empty() {
                let d = Dims { m: cout, k: rows, n: ad.r };
                matmul(dout, Layout::Transposed, xa, Layout::Normal, g.at_mut(ad.b), d, true);
            }
            // d(x A^T) = scale * dout B: (rows, out) x (out, r).
            matmul(dout, Layout::Normal, p.at(ad.b), Layout::Normal, dxa, Dims { m: rows, k: cout, n: ad.r }, false);
            dxa.iter_mut().for_each(|v| *v *= ad.scale);
            // dA += d(x A^T)^T x: (r, rows) x (rows, in); dx += d(x A^T) A: (rows, r) x (r, in).
            if !g.at(ad.a).is_empty() {
                let d = Dims { m: ad.r, k: rows, n: cin };
                matmul(dxa, Layout::Transposed, x, Layout::Normal, g.at_mut(ad.a), d, true);
            }
            matmul(dxa, Layout::Normal, p.at(ad.a), Layout::Normal, dx, Dims { m: rows, k: ad.r, n: cin }, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, probe_loss, random};
    use crate::nn::params::Tensor;

    /// A layer of 5 inputs and 4 outputs with a rank-2 adapter in `layout`, random values.
    fn layer(layout: WeightLayout, dora: bool) -> (Linear, ParamMap) {
        let (cin, cout, r) = (5, 4, 2);
        let mut p = ParamMap::default();
        let shape = if layout == WeightLayout::OutIn { [cout, cin] } else { [cin, cout] };
        p.insert("w", Tensor::from_vec(&shape, random(cin * cout, 1)));
        p.insert("b", Tensor::from_vec(&[cout], random(cout, 2)));
        p.insert("a", Tensor::from_vec(&[r, cin], random(r * cin, 3)));
        p.insert("bb", Tensor::from_vec(&[cout, r], random(cout * r, 4)));
        p.insert("m", Tensor::from_vec(&[cout], random(cout, 5).iter().map(|x| 1.0 + x * 0.5).collect()));
        let ad = Adapter {
            a: p.id("a").unwrap(),
            b: p.id("bb").unwrap(),
            r,
            scale: 1.5,
            magnitude: dora.then(|| p.id("m").unwrap()),
        };
        let lin = Linear { w: p.id("w").unwrap(), b: p.id("b"), cin, cout, layout, adapter: Some(ad), slot: 0 };
        (lin, p)
    }

    fn forward(lin: &Linear, p: &ParamMap, x: &[f32], rows: usize) -> (Vec<f32>, AdapterActs) {
        let mut acts = AdapterActs::new(rows, 2, lin.cout, lin.adapter.unwrap().magnitude.is_some());
        let mut out = vec![0.0; rows * lin.cout];
        lin.forward(p, x, &mut out, rows, &mut acts);
        (out, acts)
    }

    /// The adapted weight `W + s B A` as (out, in), formed explicitly.
    fn adapted_weight(lin: &Linear, p: &ParamMap) -> Vec<f32> {
        let ad = lin.adapter.unwrap();
        let (w, a, b) = (p.at(lin.w), p.at(ad.a), p.at(ad.b));
        let mut out = vec![0.0; lin.cout * lin.cin];
        for o in 0..lin.cout {
            for i in 0..lin.cin {
                let wi = if lin.layout == WeightLayout::OutIn { w[o * lin.cin + i] } else { w[i * lin.cout + o] };
                let ba: f32 = (0..ad.r).map(|k| b[o * ad.r + k] * a[k * lin.cin + i]).sum();
                out[o * lin.cin + i] = wi + ad.scale * ba;
            }
        }
        out
    }

    #[test]
    fn dora_rescales_each_output_by_magnitude_over_the_adapted_norm() {
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            let (lin, p) = layer(layout, true);
            let rows = 3;
            let x = random(rows * 5, 6);
            let (out, _) = forward(&lin, &p, &x, rows);
            let w = adapted_weight(&lin, &p);
            for row in 0..rows {
                for o in 0..4 {
                    let wo = &w[o * 5..(o + 1) * 5];
                    let norm = wo.iter().map(|v| v * v).sum::<f32>().sqrt();
                    let z: f32 = wo.iter().zip(&x[row * 5..(row + 1) * 5]).map(|(a, b)| a * b).sum();
                    let want = p.get("m")[o] / norm * z + p.get("b")[o];
                    assert!((out[row * 4 + o] - want).abs() < 1e-5, "{layout:?} [{row}, {o}]");
                }
            }
        }
    }

    /// LoRA's gradients against finite differences; DoRA's against finite differences of the
    /// same forward with its norms held at their values (PEFT detaches them), and the
    /// magnitude's against the true forward (the norms do not depend on it).
    #[test]
    fn adapter_gradients_match_finite_differences() {
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            for dora in [false, true] {
                let (lin, p) = layer(layout, dora);
                let rows = 3;
                let x = random(rows * 5, 7);
                let probe = random(rows * 4, 8);
                let (_, acts) = forward(&lin, &p, &x, rows);
                let mut g = p.zeros_like_trainable(|n| n != "w");
                let (mut dxa, mut dz) = (vec![0.0; rows * 2], vec![0.0; rows * 4]);
                let mut scratch = AdapterScratch { dxa: &mut dxa, dz: &mut dz };
                let mut dx = vec![0.0; rows * 5];
                lin.backward(&p, &mut g, &probe, &x, &acts, &mut scratch, &mut dx, rows, false);
                let factors: Vec<f32> = if dora { acts.norm_and_factor[4..].to_vec() } else { vec![1.0; 4] };
                // The forward with the norm factors fixed: the plain LoRA layer, scaled.
                let fixed = |p: &ParamMap, x: &[f32]| -> f64 {
                    let plain = Linear { adapter: Some(Adapter { magnitude: None, ..lin.adapter.unwrap() }), ..lin };
                    let (mut out, _) = forward(&plain, p, x, rows);
                    let bias = p.get("b");
                    for row in out.chunks_mut(4) {
                        for o in 0..4 {
                            row[o] = (row[o] - bias[o]) * factors[o] + bias[o];
                        }
                    }
                    probe_loss(&out, &probe)
                };
                let label = |what: &str| format!("{what} ({layout:?}, dora {dora})");
                check(&label("dx"), &x, &dx, |x| fixed(&p, x));
                for name in ["a", "bb", "b"] {
                    check(&label(name), p.get(name), g.get(name), |v| {
                        let mut q = p.clone();
                        q.get_mut(name).copy_from_slice(v);
                        fixed(&q, &x)
                    });
                }
                if dora {
                    check(&label("m"), p.get("m"), g.get("m"), |v| {
                        let mut q = p.clone();
                        q.get_mut("m").copy_from_slice(v);
                        probe_loss(&forward(&lin, &q, &x, rows).0, &probe)
                    });
                }
            }
        }
    }
}
