//! LoRA adapters on linear layers (Hu et al. 2021) and the variants that change only their
//! scale, initialisation or training: rsLoRA (scale alpha / sqrt(r)), LoRA+ (a larger learning
//! rate for B), LoRA-FA (A frozen at its initialisation); and DoRA (a magnitude per output
//! times the adapted weight's direction, see [`crate::nn::linear`]).
//!
//! An adapted layer computes `x W + scale * x A^T B^T` with `A` (r, in) and `B` (out, r), in
//! PEFT's shapes whatever the base weight's layout. The adapters sit in the parameter map after
//! the model's own tensors, named `{module}.lora_A.weight` and `{module}.lora_B.weight`
//! (PEFT's names without its `base_model.model.` prefix); the model's tensors keep their names
//! and values, and [`LoraConfig::merged`] folds the adapters in for export.

use crate::nn::config::{LinearModule, ModelConfig, WeightLayout};
use crate::nn::kernels::matmul::{matmul, Dims, Layout};
use crate::nn::params::{ParamMap, Tensor};
use crate::nn::rng::SplitMix64;
use crate::nn::svd::top_singular;

pub fn a_name(module: &str) -> String {
    format!("{module}.lora_A.weight")
}

pub fn b_name(module: &str) -> String {
    format!("{module}.lora_B.weight")
}

/// DoRA's magnitude of a module (its outputs), as PEFT names it (no `.weight`).
pub fn magnitude_name(module: &str) -> String {
    format!("{module}.lora_magnitude_vector")
}

/// Whether a parameter name is an adapter's.
pub fn is_adapter(name: &str) -> bool {
    name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight") || name.ends_with(".lora_magnitude_vector")
}

/// How `A` starts (`B` always starts at zero, so training starts from the base model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraInit {
    /// PEFT's default: Kaiming-uniform with a = sqrt(5), that is U(-1/sqrt(in), 1/sqrt(in)).
    Kaiming,
    /// N(0, (1/r)^2), PEFT's `init_lora_weights = "gaussian"`.
    Gaussian,
    /// PiSSA (Meng et al. 2024), PEFT's `"pissa"`: B A starts as the weight's top-r singular
    /// part, `B = U_r sqrt(S_r / scale)`, `A = sqrt(S_r / scale) V_r^T`, and the frozen weight
    /// keeps the residual `W - scale B A`, so the adapted model starts as the base model.
    Pissa,
}

/// Which layers get adapters, and their shape and scale.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    /// rsLoRA: scale by alpha / sqrt(r) instead of alpha / r.
    pub rslora: bool,
    /// Module names (`c_attn`, `q_proj`, ...) as PEFT's `target_modules`.
    pub targets: Vec<String>,
    pub init: LoraInit,
    /// DoRA: a magnitude per output, starting at the norms of the weight's rows.
    pub dora: bool,
}

impl LoraConfig {
    /// Rank-`r` adapters scaled by `alpha / r` on every linear layer of `cfg`, otherwise PEFT's
    /// defaults: Kaiming-uniform A, no rsLoRA, no DoRA.
    pub fn on_every_linear(cfg: &ModelConfig, r: usize, alpha: f32) -> Self {
        LoraConfig {
            r,
            alpha,
            rslora: false,
            targets: cfg.module_names().iter().map(|s| s.to_string()).collect(),
            init: LoraInit::Kaiming,
            dora: false,
        }
    }

    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.r as f32).sqrt()
        } else {
            self.alpha / self.r as f32
        }
    }

    /// The linear layers of `cfg` this configuration adapts, in the model's order.
    pub fn modules(&self, cfg: &ModelConfig) -> Vec<LinearModule> {
        cfg.linear_modules().into_iter().filter(|m| self.targets.iter().any(|t| t == m.short)).collect()
    }

    /// Append fresh adapters to `params` (a model of `cfg`): A from `init`, B zeros. Each A draws
    /// from its own stream (seed, module), so adding a target does not move the others.
    pub fn add(&self, cfg: &ModelConfig, params: &mut ParamMap, seed: u64) {
        for (i, m) in self.modules(cfg).into_iter().enumerate() {
            let mut rng = SplitMix64::new(seed ^ (i as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
            if self.init == LoraInit::Pissa {
                self.add_pissa(&m, params, rng.next_u64());
                continue;
            }
            let a: Vec<f32> = match self.init {
                LoraInit::Pissa => unreachable!("handled above"),
                LoraInit::Kaiming => {
                    let bound = 1.0 / (m.cin as f64).sqrt();
                    (0..self.r * m.cin).map(|_| ((rng.unit() * 2.0 - 1.0) * bound) as f32).collect()
                }
                LoraInit::Gaussian => (0..self.r * m.cin).map(|_| (rng.normal() / self.r as f64) as f32).collect(),
            };
            params.insert(a_name(&m.path), Tensor::from_vec(&[self.r, m.cin], a));
            params.insert(b_name(&m.path), Tensor::zeros(&[m.cout, self.r]));
            if self.dora {
                let norms = row_norms(&self.adapted(&m, params), m.cin);
                params.insert(magnitude_name(&m.path), Tensor::from_vec(&[m.cout], norms));
            }
        }
    }

    /// PiSSA's start for module `m`: adapters from the weight's top singular triplets, the
    /// weight replaced by its residual.
    fn add_pissa(&self, m: &LinearModule, params: &mut ParamMap, seed: u64) {
        let (r, scale) = (self.r, self.scale());
        let w = weight_rows(m, params);
        let (u, s, vt) = top_singular(&w, m.cout, m.cin, r, seed);
        let root: Vec<f32> = s.iter().map(|s| (s / scale).max(0.0).sqrt()).collect();
        let b: Vec<f32> = (0..m.cout * r).map(|at| u[at] * root[at % r]).collect();
        let a: Vec<f32> = (0..r * m.cin).map(|at| root[at / m.cin] * vt[at]).collect();
        params.insert(a_name(&m.path), Tensor::from_vec(&[r, m.cin], a));
        params.insert(b_name(&m.path), Tensor::from_vec(&[m.cout, r], b));
        let residual: Vec<f32> = w.iter().zip(self.scaled_ba(m, params)).map(|(w, top)| w - top).collect();
        set_weight_rows(m, params, &residual);
    }

    /// The adapters of a PiSSA fine-tune as a standard LoRA of rank 2r relative to the
    /// original weight, as PEFT converts them for saving: `A' = [A; A0]`, `B' = [B, -B0]` (A0,
    /// B0 the start), so `scale (B' A') = scale (B A - B0 A0)`; `alpha` is raised to keep the
    /// scale at rank 2r. Returns the converted configuration and tensors (in-map names).
    pub fn pissa_as_lora(&self, cfg: &ModelConfig, trained: &ParamMap, start: &ParamMap) -> (LoraConfig, ParamMap) {
        let r2 = 2 * self.r;
        let alpha = if self.rslora { self.alpha * 2f32.sqrt() } else { 2.0 * self.alpha };
        let converted = LoraConfig { r: r2, alpha, init: LoraInit::Kaiming, ..self.clone() };
        let mut out = ParamMap::default();
        for m in self.modules(cfg) {
            let (a, a0) = (trained.get(&a_name(&m.path)), start.get(&a_name(&m.path)));
            out.insert(a_name(&m.path), Tensor::from_vec(&[r2, m.cin], [a, a0].concat()));
            let (b, b0) = (trained.get(&b_name(&m.path)), start.get(&b_name(&m.path)));
            let rows: Vec<f32> = (0..m.cout)
                .flat_map(|o| {
                    let (b, b0) = (&b[o * self.r..(o + 1) * self.r], &b0[o * self.r..(o + 1) * self.r]);
                    b.iter().copied().chain(b0.iter().map(|x| -x)).collect::<Vec<f32>>()
                })
                .collect();
            out.insert(b_name(&m.path), Tensor::from_vec(&[m.cout, r2], rows));
        }
        (converted, out)
    }

    /// `W + scale * B A` of module `m`, as (out, in) whatever W's layout.
    fn adapted(&self, m: &LinearModule, params: &ParamMap) -> Vec<f32> {
        let mut out = self.scaled_ba(m, params);
        out.iter_mut().zip(weight_rows(m, params)).for_each(|(o, w)| *o += w);
        out
    }

    /// `scale * B A` of module `m`, (out, in).
    fn scaled_ba(&self, m: &LinearModule, params: &ParamMap) -> Vec<f32> {
        let (a, b) = (params.get(&a_name(&m.path)), params.get(&b_name(&m.path)));
        let mut out = vec![0.0f32; m.cin * m.cout];
        // (out, r) x (r, in) -> (out, in)
        matmul(b, Layout::Normal, a, Layout::Normal, &mut out, Dims { m: m.cout, k: self.r, n: m.cin }, false);
        let scale = self.scale();
        out.iter_mut().for_each(|x| *x *= scale);
        out
    }

    /// The model's own tensors with every adapter folded in, `W + scale * B A` (transposed
    /// for a `Conv1D` weight): a plain model that computes what the adapted one does.
    pub fn merged(&self, cfg: &ModelConfig, params: &ParamMap) -> ParamMap {
        let mut out = ParamMap::default();
        for (name, t) in params.iter().filter(|(name, _)| !is_adapter(name)) {
            out.insert(name, t.clone());
        }
        for m in self.modules(cfg) {
            let mut adapted = self.adapted(&m, params);
            if self.dora {
                let norms = row_norms(&adapted, m.cin);
                let magnitude = params.get(&magnitude_name(&m.path));
                for ((row, n), mag) in adapted.chunks_mut(m.cin).zip(&norms).zip(magnitude) {
                    row.iter_mut().for_each(|w| *w *= mag / n);
                }
            }
            set_weight_rows(&m, &mut out, &adapted);
        }
        out
    }
}

/// Module `m`'s weight as (out, in), whatever its layout.
fn weight_rows(m: &LinearModule, params: &ParamMap) -> Vec<f32> {
    let w = params.get(&format!("{}.weight", m.path));
    match m.layout {
        WeightLayout::OutIn => w.to_vec(),
        WeightLayout::InOut => (0..m.cout).flat_map(|o| (0..m.cin).map(move |i| w[i * m.cout + o])).collect(),
    }
}

/// Set module `m`'s weight from `rows` (out, in), in the weight's own layout.
fn set_weight_rows(m: &LinearModule, params: &mut ParamMap, rows: &[f32]) {
    let w = params.get_mut(&format!("{}.weight", m.path));
    match m.layout {
        WeightLayout::OutIn => w.copy_from_slice(rows),
        WeightLayout::InOut => {
            for (o, row) in rows.chunks(m.cin).enumerate() {
                row.iter().enumerate().for_each(|(i, v)| w[i * m.cout + o] = *v);
            }
        }
    }
}

/// The L2 norm of each row of `w` (rows of `cols`), summed in f64.
fn row_norms(w: &[f32], cols: usize) -> Vec<f32> {
    w.chunks(cols).map(|row| row.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_follow_lora_and_rslora() {
        let mut c =
            LoraConfig { r: 16, alpha: 32.0, rslora: false, targets: vec![], init: LoraInit::Kaiming, dora: false };
        assert_eq!(c.scale(), 2.0);
        c.rslora = true;
        assert_eq!(c.scale(), 8.0);
    }

    #[test]
    fn adapters_take_peft_shapes_and_start_as_the_base_model() {
        let cfg = ModelConfig::gpt2(13, 6, 2, 2, 8, false);
        let mut p = cfg.init(1);
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            rslora: false,
            targets: vec!["c_attn".into(), "c_proj".into()],
            init: LoraInit::Kaiming,
            dora: false,
        };
        lora.add(&cfg, &mut p, 7);
        assert_eq!(p.tensor("transformer.h.1.attn.c_attn.lora_A.weight").shape(), [4, 8]);
        assert_eq!(p.tensor("transformer.h.1.attn.c_attn.lora_B.weight").shape(), [24, 4]);
        assert_eq!(p.tensor("transformer.h.0.mlp.c_proj.lora_A.weight").shape(), [4, 32]);
        assert!(!p.contains("transformer.h.0.mlp.c_fc.lora_A.weight"));
        let a = p.get("transformer.h.0.mlp.c_proj.lora_A.weight");
        assert!(a.iter().all(|x| x.abs() <= 1.0 / 32f32.sqrt()) && a.iter().any(|x| *x != 0.0));
        assert_eq!(lora.merged(&cfg, &p), cfg.init(1), "B = 0: the merged model is the base");
    }

    #[test]
    fn merging_adds_scale_times_b_a_in_each_layout() {
        for cfg in [ModelConfig::gpt2(13, 6, 1, 2, 8, true), ModelConfig::llama(13, 6, 1, 4, 2, 16)] {
            let lora = LoraConfig { init: LoraInit::Gaussian, ..LoraConfig::on_every_linear(&cfg, 2, 3.0) };
            let mut p = cfg.init(1);
            lora.add(&cfg, &mut p, 2);
            for (_, t) in p.iter_mut().filter(|(n, _)| n.ends_with("lora_B.weight")) {
                t.data_mut().iter_mut().enumerate().for_each(|(i, x)| *x = (i as f32 * 0.37).sin());
            }
            let merged = lora.merged(&cfg, &p);
            for m in lora.modules(&cfg) {
                let (a, b) = (p.get(&a_name(&m.path)), p.get(&b_name(&m.path)));
                let w0 = p.get(&format!("{}.weight", m.path));
                let w = merged.get(&format!("{}.weight", m.path));
                for o in 0..m.cout {
                    for i in 0..m.cin {
                        let ba: f32 = (0..2).map(|k| b[o * 2 + k] * a[k * m.cin + i]).sum();
                        let at = if m.layout == WeightLayout::OutIn { o * m.cin + i } else { i * m.cout + o };
                        assert!((w[at] - (w0[at] + 1.5 * ba)).abs() < 1e-6, "{} [{o}, {i}]", m.path);
                    }
                }
            }
        }
    }

    #[test]
    fn pissa_starts_as_the_base_model_with_the_top_singular_part_in_the_adapters() {
        for cfg in [ModelConfig::gpt2(13, 6, 1, 2, 16, true), ModelConfig::llama(13, 6, 1, 4, 2, 16)] {
            let lora = LoraConfig { init: LoraInit::Pissa, ..LoraConfig::on_every_linear(&cfg, 3, 6.0) };
            let base = cfg.init(5);
            let mut p = base.clone();
            lora.add(&cfg, &mut p, 2);
            let merged = lora.merged(&cfg, &p);
            for ((name, a), (_, b)) in merged.iter().zip(base.iter()) {
                assert!(a.data().iter().zip(b.data()).all(|(x, y)| (x - y).abs() < 1e-5), "{name}");
            }
            for m in lora.modules(&cfg) {
                // The residual has no more of the top singular values: its largest is the base's
                // (r + 1)-th.
                let (_, s_base, _) = top_singular(&weight_rows(&m, &base), m.cout, m.cin, 4, 1);
                let (_, s_res, _) = top_singular(&weight_rows(&m, &p), m.cout, m.cin, 1, 1);
                assert!((s_res[0] - s_base[3]).abs() < 1e-4 * s_base[0], "{}: {s_res:?} vs {s_base:?}", m.path);
            }
            // As PEFT saves it: a rank-2r LoRA on the original weights with the same scale.
            let mut trained = p.clone();
            for (_, t) in trained.iter_mut().filter(|(n, _)| is_adapter(n)) {
                t.data_mut().iter_mut().for_each(|x| *x *= 1.1);
            }
            let (plain, tensors) = lora.pissa_as_lora(&cfg, &trained, &p);
            assert_eq!((plain.r, plain.scale()), (6, lora.scale()));
            let mut on_base = base.clone();
            for (name, t) in tensors.iter() {
                on_base.insert(name, t.clone());
            }
            let (a, b) = (plain.merged(&cfg, &on_base), lora.merged(&cfg, &trained));
            for ((name, x), (_, y)) in a.iter().zip(b.iter()) {
                assert!(x.data().iter().zip(y.data()).all(|(x, y)| (x - y).abs() < 1e-5), "{name}");
            }
        }
    }
}
