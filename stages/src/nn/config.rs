//! Model configurations: the two decoder-only architectures, as one pre-norm transformer with
//! per-architecture parts, their parameters (Hugging Face names, shapes, initialisation) and the
//! table of their linear layers by module name.
//!
//! | part            | `gpt2` (nanoGPT, `GPT2LMHeadModel`) | `llama` (`LlamaForCausalLM`)       |
//! |-----------------|-------------------------------------|------------------------------------|
//! | positions       | learned `wpe` added to the input    | rotary (RoPE) on queries and keys  |
//! | norm            | LayerNorm (bias if `bias`)          | RMSNorm                            |
//! | attention       | fused `c_attn`, H heads             | `q/k/v_proj`, `n_kv_head` kv heads |
//! | MLP             | GELU (tanh), 4x                     | SwiGLU, `ffn_hidden`               |
//! | weight layout   | `Conv1D` (in, out)                  | `nn.Linear` (out, in)              |
//! | output          | tied to `wte`                       | `lm_head`, or tied                 |

pub use crate::nn::kernels::activation::Gelu;
use crate::nn::params::{ParamMap, Tensor};
use crate::nn::rng::SplitMix64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Gpt2,
    Llama,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Gpt2 => "gpt2",
            Arch::Llama => "llama",
        }
    }
}

/// Everything that fixes a model's shapes and arithmetic.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    /// The longest sequence (the size of `wpe` for gpt2).
    pub block_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// Key/value heads: `n_head` for multi-head attention, fewer for grouped-query, 1 for
    /// multi-query. Always `n_head` for gpt2.
    pub n_kv_head: usize,
    pub n_embd: usize,
    /// The MLP's hidden width: 4 * n_embd for gpt2.
    pub ffn_hidden: usize,
    /// Biases in linear layers and LayerNorms (gpt2 only).
    pub bias: bool,
    /// Output projection shares the token embedding (always for gpt2).
    pub tie_embeddings: bool,
    /// gpt2's activation: GPT-2's tanh approximation, or exact with erf (nanoGPT's).
    pub gelu: Gelu,
    pub norm_eps: f32,
    pub rope_theta: f32,
}

impl ModelConfig {
    /// nanoGPT's model: GELU MLP of 4x, tied output, LayerNorm eps 1e-5.
    pub fn gpt2(
        vocab_size: usize,
        block_size: usize,
        n_layer: usize,
        n_head: usize,
        n_embd: usize,
        bias: bool,
    ) -> Self {
        ModelConfig {
            arch: Arch::Gpt2,
            vocab_size,
            block_size,
            n_layer,
            n_head,
            n_kv_head: n_head,
            n_embd,
            ffn_hidden: 4 * n_embd,
            bias,
            tie_embeddings: true,
            gelu: Gelu::Tanh,
            norm_eps: 1e-5,
            rope_theta: 0.0,
        }
    }

    /// A llama with the usual SwiGLU width: 8/3 * n_embd rounded up to a multiple of 32.
    pub fn llama(
        vocab_size: usize,
        block_size: usize,
        n_layer: usize,
        n_head: usize,
        n_kv_head: usize,
        n_embd: usize,
    ) -> Self {
        ModelConfig {
            arch: Arch::Llama,
            vocab_size,
            block_size,
            n_layer,
            n_head,
            n_kv_head,
            n_embd,
            ffn_hidden: (8 * n_embd / 3).div_ceil(32) * 32,
            bias: false,
            tie_embeddings: false,
            gelu: Gelu::Tanh,
            norm_eps: 1e-5,
            rope_theta: 10_000.0,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// What is wrong with these numbers, if anything, as one sentence.
    pub fn validate(&self) -> Result<(), String> {
        self.problem().map_or(Ok(()), |(_, message)| Err(message))
    }

    /// The first problem with these numbers: the field to blame and one sentence.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("block_size", self.block_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_kv_head", self.n_kv_head),
            ("n_embd", self.n_embd),
            ("ffn_hidden", self.ffn_hidden),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Some((name, format!("{name} must be positive")));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Some(("n_head", format!("n_embd {} is not a multiple of n_head {}", self.n_embd, self.n_head)));
        }
        if !self.n_head.is_multiple_of(self.n_kv_head) {
            return Some((
                "n_kv_head",
                format!("n_head {} is not a multiple of n_kv_head {}", self.n_head, self.n_kv_head),
            ));
        }
        if self.arch == Arch::Llama && !self.head_dim().is_multiple_of(2) {
            return Some(("n_head", format!("rotary embeddings need an even head size, not {}", self.head_dim())));
        }
        if self.arch == Arch::Gpt2 && self.n_kv_head != self.n_head {
            return Some(("n_kv_head", "gpt2 has as many key/value heads as heads".into()));
        }
        if self.arch == Arch::Llama && self.gelu != Gelu::Tanh {
            return Some(("activation", "llama's MLP is SwiGLU; `activation` chooses gpt2's GELU".into()));
        }
        if self.arch == Arch::Gpt2 && !self.tie_embeddings {
            return Some(("tie_embeddings", "gpt2 always ties its output to the token embedding".into()));
        }
        if self.arch == Arch::Llama && self.bias {
            return Some(("bias", "llama has no biases".into()));
        }
        None
    }

    /// Every parameter's Hugging Face name, shape and initialisation, in the map's order.
    ///
    /// Initialisation as in GPT-2 (and nanoGPT): weights normal(0, 0.02), the residual output
    /// projections (`c_proj`, `o_proj`, `down_proj`) scaled by 1/sqrt(2 n_layer), norm weights
    /// 1, biases 0. Llama uses the same rule.
    pub fn params(&self) -> Vec<ParamSpec> {
        let (c, f, v) = (self.n_embd, self.ffn_hidden, self.vocab_size);
        let ckv = self.n_kv_head * self.head_dim();
        let resid = 0.02 / (2.0 * self.n_layer as f64).sqrt();
        let mut out = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, init: Init| out.push(ParamSpec { name, shape, init });
        match self.arch {
            Arch::Gpt2 => {
                let bias = self.bias;
                add("transformer.wte.weight".into(), vec![v, c], Init::Normal(0.02));
                add("transformer.wpe.weight".into(), vec![self.block_size, c], Init::Normal(0.02));
                for l in 0..self.n_layer {
                    let name = |s: &str| format!("transformer.h.{l}.{s}");
                    for (s, shape, init, is_bias) in [
                        ("ln_1.weight", vec![c], Init::Ones, false),
                        ("ln_1.bias", vec![c], Init::Zeros, true),
                        ("attn.c_attn.weight", vec![c, 3 * c], Init::Normal(0.02), false),
                        ("attn.c_attn.bias", vec![3 * c], Init::Zeros, true),
                        ("attn.c_proj.weight", vec![c, c], Init::Normal(resid), false),
                        ("attn.c_proj.bias", vec![c], Init::Zeros, true),
                        ("ln_2.weight", vec![c], Init::Ones, false),
                        ("ln_2.bias", vec![c], Init::Zeros, true),
                        ("mlp.c_fc.weight", vec![c, f], Init::Normal(0.02), false),
                        ("mlp.c_fc.bias", vec![f], Init::Zeros, true),
                        ("mlp.c_proj.weight", vec![f, c], Init::Normal(resid), false),
                        ("mlp.c_proj.bias", vec![c], Init::Zeros, true),
                    ] {
                        if bias || !is_bias {
                            add(name(s), shape, init);
                        }
                    }
                }
                add("transformer.ln_f.weight".into(), vec![c], Init::Ones);
                if bias {
                    add("transformer.ln_f.bias".into(), vec![c], Init::Zeros);
                }
            }
            Arch::Llama => {
                add("model.embed_tokens.weight".into(), vec![v, c], Init::Normal(0.02));
                for l in 0..self.n_layer {
                    let name = |s: &str| format!("model.layers.{l}.{s}");
                    for (s, shape, init) in [
                        ("input_layernorm.weight", vec![c], Init::Ones),
                        ("self_attn.q_proj.weight", vec![c, c], Init::Normal(0.02)),
                        ("self_attn.k_proj.weight", vec![ckv, c], Init::Normal(0.02)),
                        ("self_attn.v_proj.weight", vec![ckv, c], Init::Normal(0.02)),
                        ("self_attn.o_proj.weight", vec![c, c], Init::Normal(resid)),
                        ("post_attention_layernorm.weight", vec![c], Init::Ones),
                        ("mlp.gate_proj.weight", vec![f, c], Init::Normal(0.02)),
                        ("mlp.up_proj.weight", vec![f, c], Init::Normal(0.02)),
                        ("mlp.down_proj.weight", vec![c, f], Init::Normal(resid)),
                    ] {
                        add(name(s), shape, init);
                    }
                }
                add("model.norm.weight".into(), vec![c], Init::Ones);
                if !self.tie_embeddings {
                    add("lm_head.weight".into(), vec![v, c], Init::Normal(0.02));
                }
            }
        }
        out
    }

    /// Fresh parameters. Each tensor draws from its own stream (seed, index), so adding a
    /// parameter does not move the others.
    pub fn init(&self, seed: u64) -> ParamMap {
        let mut params = ParamMap::default();
        for (i, spec) in self.params().into_iter().enumerate() {
            let mut t = Tensor::zeros(&spec.shape);
            match spec.init {
                Init::Zeros => {}
                Init::Ones => t.data_mut().fill(1.0),
                Init::Normal(std) => {
                    let mut rng = SplitMix64::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    t.data_mut().iter_mut().for_each(|w| *w = (rng.normal() * std) as f32);
                }
            }
            params.insert(spec.name, t);
        }
        params
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Normal(f64),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

/// How a linear layer stores its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// (in, out), `out = x W`: GPT-2's `Conv1D`.
    InOut,
    /// (out, in), `out = x W^T`: `nn.Linear`.
    OutIn,
}

/// A linear layer of a block, named as Hugging Face names its module.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearModule {
    pub layer: usize,
    /// The module's own name, as PEFT's `target_modules` give it: `c_attn`, `q_proj`, ...
    pub short: &'static str,
    /// The module's path; its weight is `{path}.weight`, its bias `{path}.bias`.
    pub path: String,
    pub cin: usize,
    pub cout: usize,
    pub layout: WeightLayout,
    /// The layer's place in its block, the same for every block: 0 is the (first) attention
    /// input projection, then key, value, attention output, MLP input (gate), up, MLP output.
    pub slot: usize,
}

/// Linear layers a block may hold, by slot (see [`LinearModule::slot`]).
pub const LINEAR_SLOTS: usize = 7;

impl ModelConfig {
    /// The module names of this architecture's linear layers, for PEFT's `target_modules`.
    pub fn module_names(&self) -> &'static [&'static str] {
        match self.arch {
            Arch::Gpt2 => &["c_attn", "c_proj", "c_fc"],
            Arch::Llama => &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        }
    }

    /// Every block's linear layers, block by block in slot order: the one table of their names
    /// that the model, adapters and exports read.
    pub fn linear_modules(&self) -> Vec<LinearModule> {
        let (c, f) = (self.n_embd, self.ffn_hidden);
        let ckv = self.n_kv_head * self.head_dim();
        let per_block: &[(usize, &str, &'static str, usize, usize)] = match self.arch {
            Arch::Gpt2 => &[
                (0, "attn.c_attn", "c_attn", c, 3 * c),
                (3, "attn.c_proj", "c_proj", c, c),
                (4, "mlp.c_fc", "c_fc", c, f),
                (6, "mlp.c_proj", "c_proj", f, c),
            ],
            Arch::Llama => &[
                (0, "self_attn.q_proj", "q_proj", c, c),
                (1, "self_attn.k_proj", "k_proj", c, ckv),
                (2, "self_attn.v_proj", "v_proj", c, ckv),
                (3, "self_attn.o_proj", "o_proj", c, c),
                (4, "mlp.gate_proj", "gate_proj", c, f),
                (5, "mlp.up_proj", "up_proj", c, f),
                (6, "mlp.down_proj", "down_proj", f, c),
            ],
        };
        let (prefix, layout) = match self.arch {
            Arch::Gpt2 => ("transformer.h", WeightLayout::InOut),
            Arch::Llama => ("model.layers", WeightLayout::OutIn),
        };
        (0..self.n_layer)
            .flat_map(|layer| {
                per_block.iter().map(move |&(slot, name, short, cin, cout)| LinearModule {
                    layer,
                    short,
                    path: format!("{prefix}.{layer}.{name}"),
                    cin,
                    cout,
                    layout,
                    slot,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(cfg: &ModelConfig) -> std::collections::BTreeMap<String, Vec<usize>> {
        cfg.params().into_iter().map(|s| (s.name, s.shape)).collect()
    }

    #[test]
    fn gpt2_hugging_face_names_and_shapes() {
        let cfg = ModelConfig::gpt2(50257, 1024, 12, 12, 768, true);
        // GPT-2 small has 124,439,808 parameters (the tied lm_head counted once).
        assert_eq!(cfg.init(0).num_elements(), 124_439_808);
        let s = shapes(&cfg);
        assert_eq!(s["transformer.h.0.attn.c_attn.weight"], [768, 2304]);
        assert_eq!(s["transformer.h.11.mlp.c_proj.weight"], [3072, 768]);
        assert_eq!(s["transformer.wpe.weight"], [1024, 768]);
        assert_eq!(s.len(), 2 + 12 * 12 + 2);
        assert!(!shapes(&ModelConfig::gpt2(11, 4, 2, 2, 8, false)).keys().any(|n| n.ends_with("bias")));
    }

    #[test]
    fn llama_hugging_face_names_and_shapes() {
        // TinyLlama-1.1B: 22 layers, 32 heads, 4 kv heads, 2048 wide, 5632 MLP, 32000 vocab,
        // untied: 1,100,048,384 parameters.
        let mut cfg = ModelConfig::llama(32000, 2048, 22, 32, 4, 2048);
        cfg.ffn_hidden = 5632;
        let s = shapes(&cfg);
        assert_eq!(s.values().map(|v| v.iter().product::<usize>()).sum::<usize>(), 1_100_048_384);
        assert_eq!(s["model.layers.0.self_attn.k_proj.weight"], [256, 2048]);
        assert_eq!(s["model.layers.21.mlp.down_proj.weight"], [2048, 5632]);
        assert_eq!(s["lm_head.weight"], [32000, 2048]);
        assert_eq!(s.len(), 1 + 22 * 9 + 2);
        let mut tied = ModelConfig::llama(11, 4, 2, 4, 2, 16);
        tied.tie_embeddings = true;
        assert!(!shapes(&tied).contains_key("lm_head.weight"), "tied: no lm_head");
        assert_eq!(ModelConfig::llama(10, 8, 1, 4, 4, 128).ffn_hidden, 352);
    }

    #[test]
    fn init_scales_residual_projections() {
        for (cfg, fc, proj, norm) in [
            (
                ModelConfig::gpt2(64, 16, 4, 4, 64, false),
                "transformer.h.0.mlp.c_fc.weight",
                "transformer.h.0.mlp.c_proj.weight",
                "transformer.h.1.ln_2.weight",
            ),
            (
                ModelConfig::llama(64, 16, 4, 4, 2, 64),
                "model.layers.0.mlp.up_proj.weight",
                "model.layers.0.mlp.down_proj.weight",
                "model.layers.1.input_layernorm.weight",
            ),
        ] {
            let p = cfg.init(3);
            let std = |name: &str| {
                let d = p.get(name);
                (d.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / d.len() as f64).sqrt()
            };
            assert!((std(fc) - 0.02).abs() < 0.002, "{fc}");
            assert!((std(proj) - 0.02 / 8f64.sqrt()).abs() < 0.001, "{proj}");
            assert!(p.get(norm).iter().all(|w| *w == 1.0));
        }
    }

    #[test]
    fn validate_names_the_problem() {
        assert!(ModelConfig::llama(10, 8, 1, 4, 3, 16).validate().unwrap_err().contains("n_kv_head 3"));
        assert!(ModelConfig::gpt2(10, 8, 1, 3, 16, true).validate().unwrap_err().contains("n_head 3"));
        assert!(ModelConfig::llama(10, 8, 1, 4, 1, 16).validate().is_ok());
    }

    #[test]
    fn the_module_table_names_every_linear_weight() {
        for cfg in [ModelConfig::gpt2(11, 4, 2, 2, 8, true), ModelConfig::llama(11, 4, 2, 4, 2, 16)] {
            let names = shapes(&cfg);
            let modules = cfg.linear_modules();
            assert_eq!(modules.len(), 2 * if cfg.arch == Arch::Gpt2 { 4 } else { 7 });
            for m in modules {
                let w = &names[&format!("{}.weight", m.path)];
                let want = if m.layout == WeightLayout::InOut { [m.cin, m.cout] } else { [m.cout, m.cin] };
                assert_eq!(w, &want, "{}", m.path);
                assert!(cfg.module_names().contains(&m.short));
            }
        }
    }
}
