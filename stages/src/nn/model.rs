//! The two decoder-only architectures, as one pre-norm transformer with per-architecture parts:
//!
//! | part            | `gpt2` (nanoGPT, `GPT2LMHeadModel`) | `llama` (`LlamaForCausalLM`)       |
//! |-----------------|-------------------------------------|------------------------------------|
//! | positions       | learned `wpe` added to the input    | rotary (RoPE) on queries and keys  |
//! | norm            | LayerNorm (bias if `bias`)          | RMSNorm                            |
//! | attention       | fused `c_attn`, H heads             | `q/k/v_proj`, `n_kv_head` kv heads |
//! | MLP             | GELU (tanh), 4x                     | SwiGLU, `ffn_hidden`               |
//! | weight layout   | `Conv1D` (in, out)                  | `nn.Linear` (out, in)              |
//! | output          | tied to `wte`                       | `lm_head`, or tied                 |
//!
//! Parameter names are Hugging Face's. Forward saves what backward needs in [`Activations`],
//! allocated once per (batch, time) shape; backward adds into a gradient map with the same
//! names. Every loss ends in a gradient on the logits. [`Decoder`] runs one token at a time
//! against a KV cache for sampling.

pub use crate::nn::kernels::activation::Gelu;
use crate::nn::kernels::activation::{bias_gelu_forward, gelu_backward, gelu_forward, swiglu_backward, swiglu_forward};
use crate::nn::kernels::add_assign;
use crate::nn::kernels::attention::{attention_backward, attention_forward, rope, AttnDims, QkvIn, QkvOut};
use crate::nn::kernels::bias::{add_bias, bias_backward};
use crate::nn::kernels::cross_entropy::cross_entropy_forward_backward;
use crate::nn::kernels::dot;
use crate::nn::kernels::embedding::{embedding_backward, embedding_forward};
use crate::nn::kernels::matmul::{matmul, Dims, Layout};
use crate::nn::kernels::norm::{layernorm_backward, layernorm_forward, rmsnorm_backward, rmsnorm_forward};
use crate::nn::params::{ParamId, ParamMap, Tensor};
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

/// A linear layer: `out = x W (+ b)` with W stored (in, out) (`Conv1D`), or `out = x W^T`
/// with W stored (out, in) (`nn.Linear`).
#[derive(Clone, Copy, Debug)]
struct Linear {
    w: ParamId,
    b: Option<ParamId>,
    cin: usize,
    cout: usize,
    out_in: bool,
}

impl Linear {
    fn w_layout(&self) -> Layout {
        if self.out_in {
            Layout::Transposed
        } else {
            Layout::Normal
        }
    }

    /// `out = x W + b`.
    fn forward(&self, p: &ParamMap, x: &[f32], out: &mut [f32], rows: usize) {
        self.product(p, x, out, rows);
        if let Some(b) = self.b {
            add_bias(out, p.at(b));
        }
    }

    /// `out = x W`, the bias left to the caller.
    fn product(&self, p: &ParamMap, x: &[f32], out: &mut [f32], rows: usize) {
        let d = Dims { m: rows, k: self.cin, n: self.cout };
        matmul(x, Layout::Normal, p.at(self.w), self.w_layout(), out, d, false);
    }

    /// Writes (or with `add_dx`, adds into) `dx`; adds into the weight and bias gradients.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        p: &ParamMap,
        g: &mut ParamMap,
        dout: &[f32],
        x: &[f32],
        dx: &mut [f32],
        rows: usize,
        add_dx: bool,
    ) {
        let (cin, cout) = (self.cin, self.cout);
        let dx_layout = if self.out_in { Layout::Normal } else { Layout::Transposed };
        matmul(dout, Layout::Normal, p.at(self.w), dx_layout, dx, Dims { m: rows, k: cout, n: cin }, add_dx);
        if self.out_in {
            matmul(
                dout,
                Layout::Transposed,
                x,
                Layout::Normal,
                g.at_mut(self.w),
                Dims { m: cout, k: rows, n: cin },
                true,
            );
        } else {
            matmul(
                x,
                Layout::Transposed,
                dout,
                Layout::Normal,
                g.at_mut(self.w),
                Dims { m: cin, k: rows, n: cout },
                true,
            );
        }
        if let Some(b) = self.b {
            bias_backward(dout, g.at_mut(b));
        }
    }
}

/// LayerNorm (with an optional bias) or RMSNorm.
#[derive(Clone, Copy, Debug)]
struct Norm {
    w: ParamId,
    b: Option<ParamId>,
    rms: bool,
}

/// Per-row statistics a norm saves: `mean` (LayerNorm only) and the reciprocal deviation.
struct NormStats {
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

impl NormStats {
    fn new(rows: usize) -> Self {
        NormStats { mean: vec![0.0; rows], rstd: vec![0.0; rows] }
    }
}

impl Norm {
    fn forward(&self, p: &ParamMap, x: &[f32], out: &mut [f32], s: &mut NormStats, eps: f32, zeros: &[f32]) {
        let c = zeros.len();
        if self.rms {
            rmsnorm_forward(x, p.at(self.w), eps, out, &mut s.rstd, c);
        } else {
            let b = self.b.map_or(zeros, |b| p.at(b));
            layernorm_forward(x, p.at(self.w), b, eps, out, &mut s.mean, &mut s.rstd, c);
        }
    }

    /// Writes `dx`; adds into the weight (and bias) gradients. `scratch` (C) takes the bias
    /// gradient of a LayerNorm without bias.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        p: &ParamMap,
        g: &mut ParamMap,
        dout: &[f32],
        x: &[f32],
        s: &NormStats,
        dx: &mut [f32],
        scratch: &mut [f32],
    ) {
        let (w, c) = (p.at(self.w), scratch.len());
        if self.rms {
            rmsnorm_backward(dout, x, w, &s.rstd, dx, g.at_mut(self.w), c);
            return;
        }
        let (dw, db) = match self.b {
            Some(b) => g.pair_mut(self.w, b),
            None => (g.at_mut(self.w), scratch),
        };
        layernorm_backward(dout, x, w, &s.mean, &s.rstd, dx, dw, db, c);
    }
}

#[derive(Clone, Copy, Debug)]
enum Qkv {
    /// gpt2's `c_attn`: one (C, 3C) projection whose columns are q, k, v.
    Fused(Linear),
    /// llama's `q_proj`, `k_proj`, `v_proj`.
    Split(Linear, Linear, Linear),
}

#[derive(Clone, Copy, Debug)]
enum Mlp {
    Gelu { fc: Linear, proj: Linear },
    SwiGlu { gate: Linear, up: Linear, down: Linear },
}

#[derive(Clone, Copy, Debug)]
struct Block {
    norm1: Norm,
    qkv: Qkv,
    o: Linear,
    norm2: Norm,
    mlp: Mlp,
}

/// A configuration with every parameter resolved to its place in the map.
#[derive(Clone, Debug)]
pub struct Model {
    pub cfg: ModelConfig,
    wte: ParamId,
    wpe: Option<ParamId>,
    blocks: Vec<Block>,
    norm_f: Norm,
    head: Linear,
}

impl Model {
    /// Resolve the names of `cfg` in `params`.
    ///
    /// # Panics
    /// If `params` lacks a parameter of `cfg`: load paths check names and shapes first.
    pub fn new(cfg: ModelConfig, params: &ParamMap) -> Self {
        let id = |name: &str| params.id(name).unwrap_or_else(|| panic!("no parameter `{name}`"));
        let (c, f) = (cfg.n_embd, cfg.ffn_hidden);
        let ckv = cfg.n_kv_head * cfg.head_dim();
        match cfg.arch {
            Arch::Gpt2 => {
                let bias = |name: String| cfg.bias.then(|| id(&name));
                let lin = |l: usize, s: &str, cin, cout| Linear {
                    w: id(&format!("transformer.h.{l}.{s}.weight")),
                    b: bias(format!("transformer.h.{l}.{s}.bias")),
                    cin,
                    cout,
                    out_in: false,
                };
                let norm = |prefix: String| Norm {
                    w: id(&format!("{prefix}.weight")),
                    b: bias(format!("{prefix}.bias")),
                    rms: false,
                };
                let wte = id("transformer.wte.weight");
                Model {
                    cfg,
                    wte,
                    wpe: Some(id("transformer.wpe.weight")),
                    blocks: (0..cfg.n_layer)
                        .map(|l| Block {
                            norm1: norm(format!("transformer.h.{l}.ln_1")),
                            qkv: Qkv::Fused(lin(l, "attn.c_attn", c, 3 * c)),
                            o: lin(l, "attn.c_proj", c, c),
                            norm2: norm(format!("transformer.h.{l}.ln_2")),
                            mlp: Mlp::Gelu { fc: lin(l, "mlp.c_fc", c, f), proj: lin(l, "mlp.c_proj", f, c) },
                        })
                        .collect(),
                    norm_f: norm("transformer.ln_f".into()),
                    head: Linear { w: wte, b: None, cin: c, cout: cfg.vocab_size, out_in: true },
                }
            }
            Arch::Llama => {
                let lin = |l: usize, s: &str, cin, cout| Linear {
                    w: id(&format!("model.layers.{l}.{s}.weight")),
                    b: None,
                    cin,
                    cout,
                    out_in: true,
                };
                let norm = |name: String| Norm { w: id(&name), b: None, rms: true };
                let wte = id("model.embed_tokens.weight");
                let head = if cfg.tie_embeddings { wte } else { id("lm_head.weight") };
                Model {
                    cfg,
                    wte,
                    wpe: None,
                    blocks: (0..cfg.n_layer)
                        .map(|l| Block {
                            norm1: norm(format!("model.layers.{l}.input_layernorm.weight")),
                            qkv: Qkv::Split(
                                lin(l, "self_attn.q_proj", c, c),
                                lin(l, "self_attn.k_proj", c, ckv),
                                lin(l, "self_attn.v_proj", c, ckv),
                            ),
                            o: lin(l, "self_attn.o_proj", c, c),
                            norm2: norm(format!("model.layers.{l}.post_attention_layernorm.weight")),
                            mlp: Mlp::SwiGlu {
                                gate: lin(l, "mlp.gate_proj", c, f),
                                up: lin(l, "mlp.up_proj", c, f),
                                down: lin(l, "mlp.down_proj", f, c),
                            },
                        })
                        .collect(),
                    norm_f: norm("model.norm.weight".into()),
                    head: Linear { w: head, b: None, cin: c, cout: cfg.vocab_size, out_in: true },
                }
            }
        }
    }

    fn attn_dims(&self, b: usize, t: usize) -> AttnDims {
        AttnDims { b, t, h: self.cfg.n_head, h_kv: self.cfg.n_kv_head, d: self.cfg.head_dim() }
    }

    /// Token embeddings plus learned positions (gpt2); row `r` is at position `pos0 + r % t`.
    fn embed(&self, p: &ParamMap, ids: &[u32], x: &mut [f32], t: usize, pos0: usize) {
        let c = self.cfg.n_embd;
        embedding_forward(ids, p.at(self.wte), x, c);
        if let Some(wpe) = self.wpe {
            let wpe = p.at(wpe);
            for (r, row) in x.chunks_mut(c).enumerate() {
                let pos = pos0 + r % t;
                row.iter_mut().zip(&wpe[pos * c..(pos + 1) * c]).for_each(|(a, w)| *a += w);
            }
        }
    }

    /// q, k and v of the rows of normed input `x`, as attention reads them: gpt2's fused
    /// projection into `qkv` (left whole), or llama's three projections into `q`, `k`, `v`
    /// with rotary positions applied. The buffers of the other architecture are not touched.
    #[allow(clippy::too_many_arguments)]
    fn project_qkv<'a>(
        &self,
        blk: &Block,
        p: &ParamMap,
        x: &[f32],
        qkv: &'a mut [f32],
        q: &'a mut [f32],
        k: &'a mut [f32],
        v: &'a mut [f32],
        t: usize,
        pos0: usize,
    ) -> QkvIn<'a> {
        let rows = x.len() / self.cfg.n_embd;
        match blk.qkv {
            Qkv::Fused(lin) => {
                lin.forward(p, x, qkv, rows);
                QkvIn::Fused(qkv)
            }
            Qkv::Split(lq, lk, lv) => {
                lq.forward(p, x, q, rows);
                lk.forward(p, x, k, rows);
                lv.forward(p, x, v, rows);
                let (d, theta) = (self.cfg.head_dim(), self.cfg.rope_theta);
                rope(q, t, self.cfg.n_head, d, theta, pos0, false);
                rope(k, t, self.cfg.n_kv_head, d, theta, pos0, false);
                QkvIn::Split { q, k, v }
            }
        }
    }

    /// `out = MLP(x)`, keeping the pre-activations (`h`, and `u` for SwiGLU) and `g`.
    #[allow(clippy::too_many_arguments)]
    fn mlp_forward(
        &self,
        blk: &Block,
        p: &ParamMap,
        x: &[f32],
        h: &mut [f32],
        u: &mut [f32],
        g: &mut [f32],
        out: &mut [f32],
    ) {
        let rows = x.len() / self.cfg.n_embd;
        match blk.mlp {
            Mlp::Gelu { fc, proj } => {
                // The bias, if any, is added by the GELU's pass over `h`.
                fc.product(p, x, h, rows);
                match fc.b {
                    Some(b) => bias_gelu_forward(self.cfg.gelu, h, p.at(b), g),
                    None => gelu_forward(self.cfg.gelu, h, g),
                }
                proj.forward(p, g, out, rows);
            }
            Mlp::SwiGlu { gate, up, down } => {
                gate.forward(p, x, h, rows);
                up.forward(p, x, u, rows);
                swiglu_forward(h, u, g);
                down.forward(p, g, out, rows);
            }
        }
    }

    /// Forward pass: fills `acts` and `acts.logits` (B * T, V) for the token ids (B * T).
    pub fn forward(&self, p: &ParamMap, ids: &[u32], acts: &mut Activations) {
        let (b, t, eps) = (acts.b, acts.t, self.cfg.norm_eps);
        let rows = b * t;
        assert_eq!(ids.len(), rows, "ids are not B * T");
        let n = self.attn_dims(b, t);
        let x = &mut acts.x;
        self.embed(p, ids, x, t, 0);
        for (blk, a) in self.blocks.iter().zip(&mut acts.blocks) {
            a.x_in.copy_from_slice(x);
            blk.norm1.forward(p, x, &mut a.n1, &mut a.s1, eps, &acts.zeros_c);
            let qkv = self.project_qkv(blk, p, &a.n1, &mut a.qkv, &mut a.q, &mut a.k, &mut a.v, t, 0);
            attention_forward(qkv, &mut a.y, &mut a.att_stats, n);
            blk.o.forward(p, &a.y, &mut a.x_mid, rows);
            add_assign(&mut a.x_mid, x);
            blk.norm2.forward(p, &a.x_mid, &mut a.n2, &mut a.s2, eps, &acts.zeros_c);
            self.mlp_forward(blk, p, &a.n2, &mut a.h, &mut a.u, &mut a.g, x);
            add_assign(x, &a.x_mid);
        }
        self.norm_f.forward(p, x, &mut acts.nf, &mut acts.sf, eps, &acts.zeros_c);
        self.head.forward(p, &acts.nf, &mut acts.logits, rows);
    }

    /// Mean cross-entropy of the next tokens `targets` (those not `IGNORE`d), forward only.
    pub fn loss(&self, p: &ParamMap, ids: &[u32], targets: &[u32], acts: &mut Activations) -> f32 {
        self.forward(p, ids, acts);
        cross_entropy_forward_backward(
            &acts.logits,
            targets,
            self.cfg.vocab_size,
            0.0,
            &mut acts.dlogits,
            &mut acts.row_loss,
        )
    }

    /// Forward, mean cross-entropy against `targets` (those not `IGNORE`d; plus `z_loss` times
    /// the squared log-partition), and backward: adds every parameter's gradient into `grads`
    /// (made by `zeros_like` of `p`). Returns the mean cross-entropy.
    pub fn forward_backward(
        &self,
        p: &ParamMap,
        ids: &[u32],
        targets: &[u32],
        z_loss: f32,
        acts: &mut Activations,
        grads: &mut ParamMap,
    ) -> f32 {
        self.forward(p, ids, acts);
        let (b, t, c) = (acts.b, acts.t, self.cfg.n_embd);
        let rows = b * t;
        let n = self.attn_dims(b, t);
        let loss = cross_entropy_forward_backward(
            &acts.logits,
            targets,
            self.cfg.vocab_size,
            z_loss,
            &mut acts.dlogits,
            &mut acts.row_loss,
        );
        let Activations { blocks, x, nf, sf, dlogits, dx, dtmp, dn, dqkv, dq, dk, dv, dh, du, dg, scratch_c, .. } =
            acts;

        self.head.backward(p, grads, dlogits, nf, dtmp, rows, false);
        self.norm_f.backward(p, grads, dtmp, x, sf, dx, scratch_c);
        for (blk, a) in self.blocks.iter().zip(blocks.iter()).rev() {
            // dx holds d(block output) = d(x_mid + mlp(norm2(x_mid))).
            match blk.mlp {
                Mlp::Gelu { fc, proj } => {
                    proj.backward(p, grads, dx, &a.g, dg, rows, false);
                    gelu_backward(self.cfg.gelu, dg, &a.h, dh);
                    fc.backward(p, grads, dh, &a.n2, dtmp, rows, false);
                }
                Mlp::SwiGlu { gate, up, down } => {
                    down.backward(p, grads, dx, &a.g, dg, rows, false);
                    swiglu_backward(dg, &a.h, &a.u, dh, du);
                    gate.backward(p, grads, dh, &a.n2, dtmp, rows, false);
                    up.backward(p, grads, du, &a.n2, dtmp, rows, true);
                }
            }
            blk.norm2.backward(p, grads, dtmp, &a.x_mid, &a.s2, dn, scratch_c);
            add_assign(dx, dn); // d x_mid

            blk.o.backward(p, grads, dx, &a.y, dtmp, rows, false);
            match blk.qkv {
                Qkv::Fused(lin) => {
                    attention_backward(dtmp, QkvIn::Fused(&a.qkv), &a.att_stats, QkvOut::Fused(dqkv), n);
                    lin.backward(p, grads, dqkv, &a.n1, dtmp, rows, false);
                }
                Qkv::Split(lq, lk, lv) => {
                    let qkv = QkvIn::Split { q: &a.q, k: &a.k, v: &a.v };
                    attention_backward(dtmp, qkv, &a.att_stats, QkvOut::Split { dq, dk, dv }, n);
                    let (d, theta) = (self.cfg.head_dim(), self.cfg.rope_theta);
                    rope(dq, t, self.cfg.n_head, d, theta, 0, true);
                    rope(dk, t, self.cfg.n_kv_head, d, theta, 0, true);
                    lq.backward(p, grads, dq, &a.n1, dtmp, rows, false);
                    lk.backward(p, grads, dk, &a.n1, dtmp, rows, true);
                    lv.backward(p, grads, dv, &a.n1, dtmp, rows, true);
                }
            }
            blk.norm1.backward(p, grads, dtmp, &a.x_in, &a.s1, dn, scratch_c);
            add_assign(dx, dn); // d x_in
        }
        embedding_backward(ids, dx, grads.at_mut(self.wte), c);
        if let Some(wpe) = self.wpe {
            let dwpe = grads.at_mut(wpe);
            for (r, row) in dx.chunks(c).enumerate() {
                let pos = r % t;
                dwpe[pos * c..(pos + 1) * c].iter_mut().zip(row).for_each(|(g, d)| *g += d);
            }
        }
        loss
    }
}

/// `n` zeros when the architecture uses the buffer, none otherwise.
fn zeros_if(used: bool, n: usize) -> Vec<f32> {
    vec![0.0; if used { n } else { 0 }]
}

/// What one block's forward saves for its backward.
struct BlockActs {
    x_in: Vec<f32>,
    n1: Vec<f32>,
    s1: NormStats,
    /// gpt2's fused projection (B, T, 3, C), which attention reads in place; empty for llama.
    qkv: Vec<f32>,
    /// llama's, after rotary embedding, as attention saw them; empty for gpt2.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Each attention score row's maximum and inverse sum (B, H, T, 2).
    att_stats: Vec<f32>,
    y: Vec<f32>,
    x_mid: Vec<f32>,
    n2: Vec<f32>,
    s2: NormStats,
    /// MLP pre-activation (gpt2) or gate (llama).
    h: Vec<f32>,
    /// SwiGLU's up projection; empty for gpt2.
    u: Vec<f32>,
    g: Vec<f32>,
}

/// Every buffer a training step needs, allocated once for a (batch, time) shape.
pub struct Activations {
    b: usize,
    t: usize,
    blocks: Vec<BlockActs>,
    /// The residual stream; after forward, the input of the final norm.
    x: Vec<f32>,
    nf: Vec<f32>,
    sf: NormStats,
    pub logits: Vec<f32>,
    dlogits: Vec<f32>,
    /// Each row's cross-entropy, summed in order for the mean.
    row_loss: Vec<f64>,
    dx: Vec<f32>,
    dtmp: Vec<f32>,
    dn: Vec<f32>,
    dqkv: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dh: Vec<f32>,
    du: Vec<f32>,
    dg: Vec<f32>,
    zeros_c: Vec<f32>,
    scratch_c: Vec<f32>,
}

impl Activations {
    pub fn new(cfg: &ModelConfig, b: usize, t: usize) -> Self {
        assert!(t <= cfg.block_size, "sequence of {t} is longer than the block size {}", cfg.block_size);
        let (rows, c, f, v) = (b * t, cfg.n_embd, cfg.ffn_hidden, cfg.vocab_size);
        let ckv = cfg.n_kv_head * cfg.head_dim();
        let swiglu = cfg.arch == Arch::Llama;
        let fused = cfg.arch == Arch::Gpt2;
        let z = |n: usize| vec![0.0f32; n];
        let block = || BlockActs {
            x_in: z(rows * c),
            n1: z(rows * c),
            s1: NormStats::new(rows),
            qkv: zeros_if(fused, rows * 3 * c),
            q: zeros_if(!fused, rows * c),
            k: zeros_if(!fused, rows * ckv),
            v: zeros_if(!fused, rows * ckv),
            att_stats: z(b * cfg.n_head * t * 2),
            y: z(rows * c),
            x_mid: z(rows * c),
            n2: z(rows * c),
            s2: NormStats::new(rows),
            h: z(rows * f),
            u: zeros_if(swiglu, rows * f),
            g: z(rows * f),
        };
        Activations {
            b,
            t,
            blocks: (0..cfg.n_layer).map(|_| block()).collect(),
            x: z(rows * c),
            nf: z(rows * c),
            sf: NormStats::new(rows),
            logits: z(rows * v),
            dlogits: z(rows * v),
            row_loss: vec![0.0; rows],
            dx: z(rows * c),
            dtmp: z(rows * c),
            dn: z(rows * c),
            dqkv: zeros_if(fused, rows * 3 * c),
            dq: zeros_if(!fused, rows * c),
            dk: zeros_if(!fused, rows * ckv),
            dv: zeros_if(!fused, rows * ckv),
            dh: z(rows * f),
            du: zeros_if(swiglu, rows * f),
            dg: z(rows * f),
            zeros_c: z(c),
            scratch_c: z(c),
        }
    }

    pub fn batch(&self) -> usize {
        self.b
    }
    /// Bytes held: what forward saves for backward plus backward's scratch.
    pub fn bytes(&self) -> usize {
        let v = |x: &Vec<f32>| x.len();
        let s = |x: &NormStats| x.mean.len() + x.rstd.len();
        let blocks: usize = self
            .blocks
            .iter()
            .map(|a| {
                [&a.x_in, &a.n1, &a.qkv, &a.q, &a.k, &a.v, &a.att_stats, &a.y, &a.x_mid, &a.n2, &a.h, &a.u, &a.g]
                    .map(v)
                    .iter()
                    .sum::<usize>()
                    + s(&a.s1)
                    + s(&a.s2)
            })
            .sum();
        let rest = [
            &self.x,
            &self.nf,
            &self.logits,
            &self.dlogits,
            &self.dx,
            &self.dtmp,
            &self.dn,
            &self.dqkv,
            &self.dq,
            &self.dk,
            &self.dv,
            &self.dh,
            &self.du,
            &self.dg,
            &self.zeros_c,
            &self.scratch_c,
        ]
        .map(v)
        .iter()
        .sum::<usize>()
            + s(&self.sf);
        4 * (blocks + rest) + 8 * self.row_loss.len()
    }
    pub fn time(&self) -> usize {
        self.t
    }
    /// Each target's cross-entropy from the last loss (0 for an ignored target).
    #[cfg(test)]
    pub(crate) fn row_losses(&self) -> &[f64] {
        &self.row_loss
    }
}

/// One-token-at-a-time inference with a KV cache: each step costs one row through every
/// layer plus attention over the cached positions.
pub struct Decoder {
    /// Per layer, keys and values of every cached position: (block_size, n_kv_head, D).
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    x: Vec<f32>,
    n: Vec<f32>,
    stats: NormStats,
    qkv: Vec<f32>,
    q: Vec<f32>,
    k_new: Vec<f32>,
    v_new: Vec<f32>,
    y: Vec<f32>,
    x_mid: Vec<f32>,
    h: Vec<f32>,
    u: Vec<f32>,
    g: Vec<f32>,
    scores: Vec<f32>,
    zeros_c: Vec<f32>,
    pub logits: Vec<f32>,
}

impl Decoder {
    pub fn new(cfg: &ModelConfig) -> Self {
        let (c, f) = (cfg.n_embd, cfg.ffn_hidden);
        let ckv = cfg.n_kv_head * cfg.head_dim();
        let fused = cfg.arch == Arch::Gpt2;
        let z = |n: usize| vec![0.0f32; n];
        Decoder {
            k: (0..cfg.n_layer).map(|_| z(cfg.block_size * ckv)).collect(),
            v: (0..cfg.n_layer).map(|_| z(cfg.block_size * ckv)).collect(),
            len: 0,
            x: z(c),
            n: z(c),
            stats: NormStats::new(1),
            qkv: zeros_if(fused, 3 * c),
            q: zeros_if(!fused, c),
            k_new: zeros_if(!fused, ckv),
            v_new: zeros_if(!fused, ckv),
            y: z(c),
            x_mid: z(c),
            h: z(f),
            u: z(f),
            g: z(f),
            scores: z(cfg.block_size),
            zeros_c: z(c),
            logits: z(cfg.vocab_size),
        }
    }

    /// Positions in the cache.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Forget every cached position.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Feed one token at the next position; `self.logits` then predicts the one after it.
    ///
    /// # Panics
    /// If the cache already holds `block_size` positions (call [`Decoder::clear`] and feed a
    /// shorter context again).
    pub fn step(&mut self, model: &Model, p: &ParamMap, token: u32) -> &[f32] {
        let cfg = &model.cfg;
        let (d, eps, pos) = (cfg.head_dim(), cfg.norm_eps, self.len);
        let ckv = cfg.n_kv_head * d;
        assert!(pos < cfg.block_size, "the KV cache is full ({pos} positions)");
        model.embed(p, &[token], &mut self.x, 1, pos);
        for (l, blk) in model.blocks.iter().enumerate() {
            blk.norm1.forward(p, &self.x, &mut self.n, &mut self.stats, eps, &self.zeros_c);
            let (qkv, q, k_new, v_new) = (&mut self.qkv, &mut self.q, &mut self.k_new, &mut self.v_new);
            let (q, k_new, v_new) = match model.project_qkv(blk, p, &self.n, qkv, q, k_new, v_new, 1, pos) {
                // One row: q, k and v side by side (H = Hkv).
                QkvIn::Fused(row) => (&row[..ckv], &row[ckv..2 * ckv], &row[2 * ckv..]),
                QkvIn::Split { q, k, v } => (q, k, v),
            };
            self.k[l][pos * ckv..(pos + 1) * ckv].copy_from_slice(k_new);
            self.v[l][pos * ckv..(pos + 1) * ckv].copy_from_slice(v_new);
            attend_cached(q, &self.k[l], &self.v[l], pos + 1, cfg, &mut self.scores, &mut self.y);
            blk.o.forward(p, &self.y, &mut self.x_mid, 1);
            self.x_mid.iter_mut().zip(&self.x).for_each(|(m, r)| *m += r);
            blk.norm2.forward(p, &self.x_mid, &mut self.n, &mut self.stats, eps, &self.zeros_c);
            model.mlp_forward(blk, p, &self.n, &mut self.h, &mut self.u, &mut self.g, &mut self.x);
            self.x.iter_mut().zip(&self.x_mid).for_each(|(o, m)| *o += m);
        }
        model.norm_f.forward(p, &self.x, &mut self.n, &mut self.stats, eps, &self.zeros_c);
        model.head.forward(p, &self.n, &mut self.logits, 1);
        self.len += 1;
        &self.logits
    }
}

/// One query row (H, D) against `len` cached keys and values (len, Hkv, D).
fn attend_cached(q: &[f32], k: &[f32], v: &[f32], len: usize, cfg: &ModelConfig, scores: &mut [f32], y: &mut [f32]) {
    let (h, h_kv, d) = (cfg.n_head, cfg.n_kv_head, cfg.head_dim());
    let scale = 1.0 / (d as f32).sqrt();
    let group = h / h_kv;
    for head in 0..h {
        let qh = &q[head * d..(head + 1) * d];
        let kv = head / group;
        let mut max = f32::NEG_INFINITY;
        for s in 0..len {
            let ks = &k[(s * h_kv + kv) * d..(s * h_kv + kv + 1) * d];
            scores[s] = dot(qh, ks) * scale;
            max = max.max(scores[s]);
        }
        let mut sum = 0.0f32;
        for s in &mut scores[..len] {
            *s = (*s - max).exp();
            sum += *s;
        }
        let out = &mut y[head * d..(head + 1) * d];
        out.fill(0.0);
        for s in 0..len {
            let w = scores[s] / sum;
            let vs = &v[(s * h_kv + kv) * d..(s * h_kv + kv + 1) * d];
            out.iter_mut().zip(vs).for_each(|(o, v)| *o += w * v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check_relative, random};

    fn tiny(arch: Arch, variant: usize) -> ModelConfig {
        match arch {
            // variant: 0 = biases and GPT-2's GELU, 1 = no biases and the exact GELU
            Arch::Gpt2 => ModelConfig {
                gelu: [Gelu::Tanh, Gelu::Erf][variant],
                ..ModelConfig::gpt2(11, 4, 2, 2, 8, variant == 0)
            },
            Arch::Llama => {
                // variant: 0 = MHA untied, 1 = GQA tied, 2 = MQA
                let kv = [4, 2, 1][variant];
                let mut cfg = ModelConfig::llama(11, 4, 2, 4, kv, 16);
                cfg.tie_embeddings = variant == 1;
                cfg.ffn_hidden = 12;
                cfg
            }
        }
    }

    const VARIANTS: [(Arch, usize); 5] =
        [(Arch::Gpt2, 0), (Arch::Gpt2, 1), (Arch::Llama, 0), (Arch::Llama, 1), (Arch::Llama, 2)];

    /// Random parameters of a useful size (the 0.02 init would make every gradient tiny).
    fn random_params(cfg: &ModelConfig) -> ParamMap {
        let mut p = cfg.init(1);
        for (i, (_, t)) in p.iter_mut().enumerate() {
            let values = random(t.data().len(), 100 + i as u64);
            t.data_mut().iter_mut().zip(values).for_each(|(w, r)| *w = r * 0.5);
        }
        p
    }

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
        assert!(!shapes(&tiny(Arch::Gpt2, 1)).keys().any(|n| n.ends_with("bias")));
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
        assert!(!shapes(&tiny(Arch::Llama, 1)).contains_key("lm_head.weight"), "tied: no lm_head");
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
    fn whole_model_gradients_match_finite_differences() {
        for (arch, variant) in VARIANTS {
            let cfg = tiny(arch, variant);
            let (b, t) = (2, 4);
            let ids: Vec<u32> = random(b * t, 7).iter().map(|r| ((r + 1.0) * 5.4) as u32).collect();
            let targets: Vec<u32> = random(b * t, 8).iter().map(|r| ((r + 1.0) * 5.4) as u32).collect();
            let params = random_params(&cfg);
            let model = Model::new(cfg, &params);
            let mut acts = Activations::new(&cfg, b, t);
            let mut grads = params.zeros_like();
            model.forward_backward(&params, &ids, &targets, 0.0, &mut acts, &mut grads);
            let loss_of = |p: &ParamMap| -> f64 {
                let mut acts = Activations::new(&cfg, b, t);
                model.loss(p, &ids, &targets, &mut acts) as f64
            };
            for (name, analytic) in grads.iter() {
                check_relative(
                    &format!("{name} ({} {variant})", arch.name()),
                    params.get(name),
                    analytic.data(),
                    |x| {
                        let mut p = params.clone();
                        p.get_mut(name).copy_from_slice(x);
                        loss_of(&p)
                    },
                );
            }
        }
    }

    #[test]
    fn gradients_accumulate_across_calls() {
        for (arch, variant) in VARIANTS {
            let cfg = tiny(arch, variant);
            let params = random_params(&cfg);
            let model = Model::new(cfg, &params);
            let (ids, targets) = ([1u32, 2, 3, 4], [2u32, 3, 4, 5]);
            let mut acts = Activations::new(&cfg, 1, 4);
            let mut once = params.zeros_like();
            model.forward_backward(&params, &ids, &targets, 0.0, &mut acts, &mut once);
            let mut twice = params.zeros_like();
            model.forward_backward(&params, &ids, &targets, 0.0, &mut acts, &mut twice);
            model.forward_backward(&params, &ids, &targets, 0.0, &mut acts, &mut twice);
            for ((name, a), (_, b)) in once.iter().zip(twice.iter()) {
                let close = a.data().iter().zip(b.data()).all(|(x, y)| (2.0 * x - y).abs() <= 1e-5 * (1.0 + y.abs()));
                assert!(close, "{name}");
            }
        }
    }

    #[test]
    fn the_kv_cache_decoder_gives_the_full_forward_logits() {
        for (arch, variant) in VARIANTS {
            let mut cfg = tiny(arch, variant);
            cfg.block_size = 6;
            let params = random_params(&cfg);
            let model = Model::new(cfg, &params);
            let ids = [3u32, 1, 4, 1, 5, 9];
            let mut acts = Activations::new(&cfg, 1, ids.len());
            model.forward(&params, &ids, &mut acts);
            let mut dec = Decoder::new(&cfg);
            for (pos, &id) in ids.iter().enumerate() {
                let logits = dec.step(&model, &params, id);
                let full = &acts.logits[pos * cfg.vocab_size..(pos + 1) * cfg.vocab_size];
                for (a, b) in logits.iter().zip(full) {
                    assert!((a - b).abs() < 1e-4, "{} {variant} at {pos}: {a} vs {b}", arch.name());
                }
            }
            assert_eq!(dec.len(), ids.len());
        }
    }

    #[test]
    fn z_loss_adds_a_gradient_toward_small_logits() {
        let cfg = tiny(Arch::Llama, 0);
        let params = random_params(&cfg);
        let model = Model::new(cfg, &params);
        let (ids, targets) = ([1u32, 2, 3, 4], [2u32, 3, 4, 5]);
        let mut acts = Activations::new(&cfg, 1, 4);
        let (mut g0, mut g1) = (params.zeros_like(), params.zeros_like());
        let l0 = model.forward_backward(&params, &ids, &targets, 0.0, &mut acts, &mut g0);
        let l1 = model.forward_backward(&params, &ids, &targets, 1e-2, &mut acts, &mut g1);
        assert_eq!(l0, l1, "the reported loss is the cross-entropy alone");
        assert_ne!(g0.get("lm_head.weight"), g1.get("lm_head.weight"));
    }
}
