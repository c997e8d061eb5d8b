//! LoRA adapters on linear layers (Hu et al. 2021) and the variants that change only their
//! scale, initialisation or training: rsLoRA (scale alpha / sqrt(r)), LoRA+ (a larger learning
//! rate for B), LoRA-FA (A frozen at its initialisation).
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

pub fn a_name(module: &str) -> String {
    format!("{module}.lora_A.weight")
}

pub fn b_name(module: &str) -> String {
    format!("{module}.lora_B.weight")
}

/// Whether a parameter name is an adapter's.
pub fn is_adapter(name: &str) -> bool {
    name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight")
}

/// How `A` starts (`B` always starts at zero, so training starts from the base model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraInit {
    /// PEFT's default: Kaiming-uniform with a = sqrt(5), that is U(-1/sqrt(in), 1/sqrt(in)).
    Kaiming,
    /// N(0, (1/r)^2), PEFT's `init_lora_weights = "gaussian"`.
    Gaussian,
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
}

impl LoraConfig {
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
            let a: Vec<f32> = match self.init {
                LoraInit::Kaiming => {
                    let bound = 1.0 / (m.cin as f64).sqrt();
                    (0..self.r * m.cin).map(|_| ((rng.unit() * 2.0 - 1.0) * bound) as f32).collect()
                }
                LoraInit::Gaussian => (0..self.r * m.cin).map(|_| (rng.normal() / self.r as f64) as f32).collect(),
            };
            params.insert(a_name(&m.path), Tensor::from_vec(&[self.r, m.cin], a));
            params.insert(b_name(&m.path), Tensor::zeros(&[m.cout, self.r]));
        }
    }

    /// The model's own tensors with every adapter folded in, `W + scale * B A` (transposed
    /// for a `Conv1D` weight): a plain model that computes what the adapted one does.
    pub fn merged(&self, cfg: &ModelConfig, params: &ParamMap) -> ParamMap {
        let mut out = ParamMap::default();
        for (name, t) in params.iter().filter(|(name, _)| !is_adapter(name)) {
            out.insert(name, t.clone());
        }
        for m in self.modules(cfg) {
            let (a, b) = (params.get(&a_name(&m.path)), params.get(&b_name(&m.path)));
            let mut delta = vec![0.0f32; m.cin * m.cout];
            match m.layout {
                // (out, r) x (r, in) -> (out, in)
                WeightLayout::OutIn => {
                    let d = Dims { m: m.cout, k: self.r, n: m.cin };
                    matmul(b, Layout::Normal, a, Layout::Normal, &mut delta, d, false);
                }
                // (in, r) x (r, out) -> (in, out)
                WeightLayout::InOut => {
                    let d = Dims { m: m.cin, k: self.r, n: m.cout };
                    matmul(a, Layout::Transposed, b, Layout::Transposed, &mut delta, d, false);
                }
            }
            let scale = self.scale();
            let w = out.get_mut(&format!("{}.weight", m.path));
            w.iter_mut().zip(&delta).for_each(|(w, d)| *w += scale * d);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_follow_lora_and_rslora() {
        let mut c = LoraConfig { r: 16, alpha: 32.0, rslora: false, targets: vec![], init: LoraInit::Kaiming };
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
            let lora = LoraConfig {
                r: 2,
                alpha: 3.0,
                rslora: false,
                targets: cfg.module_names().iter().map(|s| s.to_string()).collect(),
                init: LoraInit::Gaussian,
            };
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
}
