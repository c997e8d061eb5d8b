//! The model: gpt2 and llama (see [`crate::nn::config`]) as explicit forward and backward passes
//! over a [`ParamMap`] with Hugging Face names.
//!
//! Forward reads a [`Batch`] (ids and positions) and writes logits; a loss writes the logits'
//! gradient into [`Activations::loss_buffers`]; backward reads it and adds every trainable
//! parameter's gradient into a gradient map. A parameter whose gradient tensor is empty is
//! frozen: backward does no weight-gradient work for it, and its input gradient still flows.
//!
//! A linear layer may carry a LoRA adapter (`lora_A`, `lora_B` in the same map, see
//! [`crate::nn::lora`]): forward adds `scale * x A^T B^T` without forming `W + scale B A`.
//!
//! [`Activations`] are allocated once per (batch, time) shape: for training they keep every
//! block's intermediates; for inference ([`Activations::inference`]) one block's buffers serve
//! every layer and nothing is kept for backward.

use crate::nn::batch::Batch;
use crate::nn::config::LINEAR_SLOTS;
pub use crate::nn::config::{Arch, Gelu, Init, LinearModule, ModelConfig, ParamSpec, WeightLayout};
use crate::nn::kernels::activation::{bias_gelu_forward, gelu_backward, gelu_forward, swiglu_backward, swiglu_forward};
use crate::nn::kernels::add_assign;
use crate::nn::kernels::attention::{attention_backward, attention_forward, rope, AttnDims, QkvIn, QkvOut};
use crate::nn::kernels::cross_entropy::target_losses;
use crate::nn::kernels::embedding::{embedding_backward, embedding_forward};
use crate::nn::kernels::norm::{layernorm_backward, layernorm_forward, rmsnorm_backward, rmsnorm_forward};
use crate::nn::kernels::Precision;
use crate::nn::linear::{lora_partial, Adapter, AdapterActs, AdapterScratch, AdapterShape, InputGradient, Linear};
use crate::nn::lora;
use crate::nn::params::{ParamId, ParamMap};
use crate::nn::rng::SplitMix64;

/// LayerNorm (with an optional bias) or RMSNorm.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Norm {
    w: ParamId,
    b: Option<ParamId>,
    rms: bool,
}

/// Per-row statistics a norm saves: `mean` (LayerNorm only) and the reciprocal deviation.
pub(crate) struct NormStats {
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

impl NormStats {
    pub(crate) fn new(rows: usize) -> Self {
        NormStats { mean: vec![0.0; rows], rstd: vec![0.0; rows] }
    }
}

impl Norm {
    pub(crate) fn forward(&self, p: &ParamMap, x: &[f32], out: &mut [f32], s: &mut NormStats, eps: f32, zeros: &[f32]) {
        let c = zeros.len();
        if self.rms {
            rmsnorm_forward(x, p.at(self.w), eps, out, &mut s.rstd, c);
        } else {
            let b = self.b.map_or(zeros, |b| p.at(b));
            layernorm_forward(x, p.at(self.w), b, eps, out, &mut s.mean, &mut s.rstd, c);
        }
    }

    /// Whether `g` holds a gradient for the norm's weight or bias.
    fn trains(&self, g: &ParamMap) -> bool {
        [Some(self.w), self.b].into_iter().flatten().any(|id| !g.at(id).is_empty())
    }

    /// Writes `dx`; adds into the weight and bias gradients that are not frozen. `scratch` (C)
    /// takes the column sums of a LayerNorm's absent or frozen bias (or frozen weight) when the
    /// other trains.
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
        // Empty gradient slices make the kernels skip the parameters' column sums.
        let frozen = g.at(self.w).is_empty();
        if self.rms {
            let dw = if frozen { &mut [][..] } else { g.at_mut(self.w) };
            rmsnorm_backward(dout, x, w, &s.rstd, dx, dw, c);
            return;
        }
        let (dw, db) = match self.b.map(|b| (b, !g.at(b).is_empty())) {
            None | Some((_, false)) if frozen => (&mut [][..], &mut [][..]),
            None | Some((_, false)) => (g.at_mut(self.w), scratch),
            Some((b, true)) if frozen => (scratch, g.at_mut(b)),
            Some((b, true)) => g.pair_mut(self.w, b),
        };
        layernorm_backward(dout, x, w, &s.mean, &s.rstd, dx, dw, db, c);
    }
}

// One per block: the three-layer variant's size costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
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
pub(crate) struct Block {
    pub(crate) norm1: Norm,
    qkv: Qkv,
    pub(crate) o: Linear,
    pub(crate) norm2: Norm,
    mlp: Mlp,
}

/// The places of a block's operations in forward order, from a block's first place: backward
/// stops below the first place that trains ([`Model::first_trainable`]).
const NORM1: usize = 0;
const QKV: usize = 1;
const ATTN_OUT: usize = 3;
const NORM2: usize = 4;
const MLP_IN: usize = 5;
const MLP_OUT: usize = 7;
/// Places per block: the above, attention (2) and the MLP's activation (6).
const PLACES_PER_BLOCK: usize = 8;

/// An operation of a block that has parameters.
#[derive(Clone, Copy)]
enum Op {
    Norm(Norm),
    Linear(Linear),
}

impl Op {
    fn trains(&self, g: &ParamMap) -> bool {
        match self {
            Op::Norm(n) => n.trains(g),
            Op::Linear(l) => l.trains(g),
        }
    }
}

impl Block {
    /// The operations with parameters, each with its place ([`NORM1`] ...), in forward order
    /// (without allocating: backward asks on every step).
    fn ops(&self) -> impl Iterator<Item = (usize, Op)> {
        let qkv = match self.qkv {
            Qkv::Fused(l) => [Some(l), None, None],
            Qkv::Split(q, k, v) => [Some(q), Some(k), Some(v)],
        };
        let (mlp_in, mlp_out) = match self.mlp {
            Mlp::Gelu { fc, proj } => ([Some(fc), None], proj),
            Mlp::SwiGlu { gate, up, down } => ([Some(gate), Some(up)], down),
        };
        let at = |place: usize| move |l: Option<Linear>| l.map(|l| (place, Op::Linear(l)));
        std::iter::once((NORM1, Op::Norm(self.norm1)))
            .chain(qkv.into_iter().filter_map(at(QKV)))
            .chain([(ATTN_OUT, Op::Linear(self.o)), (NORM2, Op::Norm(self.norm2))])
            .chain(mlp_in.into_iter().filter_map(at(MLP_IN)))
            .chain(std::iter::once((MLP_OUT, Op::Linear(mlp_out))))
    }

    /// The first place, in forward order ([`NORM1`] ...), of an operation whose parameters `g`
    /// trains.
    fn first_trainable(&self, g: &ParamMap) -> Option<usize> {
        self.ops().find_map(|(place, op)| op.trains(g).then_some(place))
    }

    fn for_each_linear(&mut self, mut f: impl FnMut(&mut Linear)) {
        match &mut self.qkv {
            Qkv::Fused(l) => f(l),
            Qkv::Split(q, k, v) => [q, k, v].into_iter().for_each(&mut f),
        }
        f(&mut self.o);
        match &mut self.mlp {
            Mlp::Gelu { fc, proj } => [fc, proj].into_iter().for_each(&mut f),
            Mlp::SwiGlu { gate, up, down } => [gate, up, down].into_iter().for_each(&mut f),
        }
    }
}

/// A configuration with every parameter (and adapter) resolved to its place in the map.
#[derive(Clone, Debug)]
pub struct Model {
    pub cfg: ModelConfig,
    wte: ParamId,
    wpe: Option<ParamId>,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm_f: Norm,
    pub(crate) head: Linear,
    /// Attention's products; the linear layers carry their own.
    attention: Precision,
}

impl Model {
    /// Resolve the names of `cfg` in `params`; a linear layer whose `lora_A` and `lora_B` are in
    /// the map gets its adapter, scaled by `lora_scale` (and with its `lora_magnitude_vector`,
    /// DoRA).
    ///
    /// # Panics
    /// If `params` lacks a parameter of `cfg`: load paths check names and shapes first.
    pub fn new(cfg: ModelConfig, params: &ParamMap) -> Self {
        Self::with_lora_scale(cfg, params, 1.0)
    }

    /// [`Model::new`] with the scale of every adapter the map holds.
    pub fn with_lora_scale(cfg: ModelConfig, params: &ParamMap, lora_scale: f32) -> Self {
        let id = |name: &str| params.id(name).unwrap_or_else(|| panic!("no parameter `{name}`"));
        let c = cfg.n_embd;
        let mut linears: Vec<[Option<Linear>; LINEAR_SLOTS]> = vec![[None; LINEAR_SLOTS]; cfg.n_layer];
        for m in cfg.linear_modules() {
            let adapter = match (params.id(&lora::a_name(&m.path)), params.id(&lora::b_name(&m.path))) {
                (Some(a), Some(b)) => Some(Adapter {
                    a,
                    b,
                    r: params.at(a).len() / m.cin,
                    scale: lora_scale,
                    magnitude: params.id(&lora::magnitude_name(&m.path)),
                    dropout: 0.0,
                }),
                _ => None,
            };
            linears[m.layer][m.slot] = Some(Linear {
                w: id(&format!("{}.weight", m.path)),
                b: cfg.bias.then(|| id(&format!("{}.bias", m.path))),
                cin: m.cin,
                cout: m.cout,
                layout: m.layout,
                adapter,
                slot: m.slot,
                precision: Precision::F32,
            });
        }
        let lin = |l: usize, slot: usize| linears[l][slot].expect("the module table covers every slot of the arch");
        let (wte, wpe, norm_f, head_w) = match cfg.arch {
            Arch::Gpt2 => {
                let wte = id("transformer.wte.weight");
                let bias = cfg.bias.then(|| id("transformer.ln_f.bias"));
                (
                    wte,
                    Some(id("transformer.wpe.weight")),
                    Norm { w: id("transformer.ln_f.weight"), b: bias, rms: false },
                    wte,
                )
            }
            Arch::Llama => {
                let wte = id("model.embed_tokens.weight");
                let head = if cfg.tie_embeddings { wte } else { id("lm_head.weight") };
                (wte, None, Norm { w: id("model.norm.weight"), b: None, rms: true }, head)
            }
        };
        let norm = |name: String| match cfg.arch {
            Arch::Gpt2 => {
                Norm { w: id(&format!("{name}.weight")), b: cfg.bias.then(|| id(&format!("{name}.bias"))), rms: false }
            }
            Arch::Llama => Norm { w: id(&format!("{name}.weight")), b: None, rms: true },
        };
        let blocks = (0..cfg.n_layer)
            .map(|l| match cfg.arch {
                Arch::Gpt2 => Block {
                    norm1: norm(format!("transformer.h.{l}.ln_1")),
                    qkv: Qkv::Fused(lin(l, 0)),
                    o: lin(l, 3),
                    norm2: norm(format!("transformer.h.{l}.ln_2")),
                    mlp: Mlp::Gelu { fc: lin(l, 4), proj: lin(l, 6) },
                },
                Arch::Llama => Block {
                    norm1: norm(format!("model.layers.{l}.input_layernorm")),
                    qkv: Qkv::Split(lin(l, 0), lin(l, 1), lin(l, 2)),
                    o: lin(l, 3),
                    norm2: norm(format!("model.layers.{l}.post_attention_layernorm")),
                    mlp: Mlp::SwiGlu { gate: lin(l, 4), up: lin(l, 5), down: lin(l, 6) },
                },
            })
            .collect();
        let head = Linear {
            w: head_w,
            b: None,
            cin: c,
            cout: cfg.vocab_size,
            layout: WeightLayout::OutIn,
            adapter: None,
            slot: 0,
            precision: Precision::F32,
        };
        Model { cfg, wte, wpe, blocks, norm_f, head, attention: Precision::F32 }
    }

    fn attn_dims(&self, b: usize, t: usize) -> AttnDims {
        AttnDims { b, t, h: self.cfg.n_head, h_kv: self.cfg.n_kv_head, d: self.cfg.head_dim() }
    }

    /// Adapter dropout of probability `p` on every adapter's input, in training.
    pub fn with_lora_dropout(mut self, p: f32) -> Self {
        for blk in &mut self.blocks {
            blk.for_each_linear(|lin| {
                if let Some(ad) = &mut lin.adapter {
                    ad.dropout = p;
                }
            });
        }
        self
    }

    /// Every product (the blocks' linear layers, attention and the output head) in
    /// `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        for blk in &mut self.blocks {
            blk.for_each_linear(|lin| lin.precision = precision);
        }
        self.head.precision = precision;
        self.attention = precision;
        self
    }

    /// Per linear slot of a block, the shape of its adapter (rank 0 without one). Every block
    /// has the same.
    pub(crate) fn adapter_shapes(&self) -> [AdapterShape; LINEAR_SLOTS] {
        let mut shapes = [AdapterShape::default(); LINEAR_SLOTS];
        if let Some(mut blk) = self.blocks.first().copied() {
            blk.for_each_linear(|lin| {
                if let Some(ad) = lin.adapter {
                    shapes[lin.slot] =
                        AdapterShape { r: ad.r, cin: lin.cin, cout: lin.cout, dora: ad.magnitude.is_some() };
                }
            });
        }
        shapes
    }

    /// Token embeddings plus learned positions (gpt2), token `r` at position `pos[r]`.
    pub(crate) fn embed(&self, p: &ParamMap, ids: &[u32], pos: &[u32], x: &mut [f32]) {
        let c = self.cfg.n_embd;
        match p.quantized(self.wte) {
            Some(q) => {
                for (row, &id) in x.chunks_mut(c).zip(ids) {
                    assert!((id as usize) < q.rows, "token id {id} is outside the vocabulary of {}", q.rows);
                    q.dequantize_row(id as usize, row);
                }
            }
            None => embedding_forward(ids, p.at(self.wte), x, c),
        }
        if let Some(wpe) = self.wpe {
            let wpe = p.at(wpe);
            for (row, &pos) in x.chunks_mut(c).zip(pos) {
                let pos = pos as usize;
                row.iter_mut().zip(&wpe[pos * c..(pos + 1) * c]).for_each(|(a, w)| *a += w);
            }
        }
    }

    /// q, k and v of the rows of normed input `x`, as attention reads them: gpt2's fused
    /// projection into `qkv` (left whole), or llama's three projections into `q`, `k`, `v`
    /// with rotary positions applied. The buffers of the other architecture are not touched.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn project_qkv<'a>(
        &self,
        blk: &Block,
        p: &ParamMap,
        x: &[f32],
        pos: &[u32],
        qkv: &'a mut [f32],
        q: &'a mut [f32],
        k: &'a mut [f32],
        v: &'a mut [f32],
        xa: &mut [AdapterActs],
    ) -> QkvIn<'a> {
        let rows = x.len() / self.cfg.n_embd;
        match blk.qkv {
            Qkv::Fused(lin) => {
                lin.forward(p, x, qkv, rows, &mut xa[lin.slot]);
                QkvIn::Fused(qkv)
            }
            Qkv::Split(lq, lk, lv) => {
                lq.forward(p, x, q, rows, &mut xa[lq.slot]);
                lk.forward(p, x, k, rows, &mut xa[lk.slot]);
                lv.forward(p, x, v, rows, &mut xa[lv.slot]);
                let (d, theta) = (self.cfg.head_dim(), self.cfg.rope_theta);
                rope(q, pos, self.cfg.n_head, d, theta, false);
                rope(k, pos, self.cfg.n_kv_head, d, theta, false);
                QkvIn::Split { q, k, v }
            }
        }
    }

    /// `out = MLP(x)`, keeping the pre-activations (`h`, and `u` for SwiGLU) and `g`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn mlp_forward(
        &self,
        blk: &Block,
        p: &ParamMap,
        x: &[f32],
        h: &mut [f32],
        u: &mut [f32],
        g: &mut [f32],
        out: &mut [f32],
        xa: &mut [AdapterActs],
    ) {
        let rows = x.len() / self.cfg.n_embd;
        match blk.mlp {
            Mlp::Gelu { fc, proj } => {
                // The bias, if any, is added by the GELU's pass over `h`.
                fc.product(p, x, h, rows, &mut xa[fc.slot]);
                match fc.b {
                    Some(b) => bias_gelu_forward(self.cfg.gelu, h, p.at(b), g),
                    None => gelu_forward(self.cfg.gelu, h, g),
                }
                proj.forward(p, g, out, rows, &mut xa[proj.slot]);
            }
            Mlp::SwiGlu { gate, up, down } => {
                gate.forward(p, x, h, rows, &mut xa[gate.slot]);
                up.forward(p, x, u, rows, &mut xa[up.slot]);
                swiglu_forward(h, u, g);
                down.forward(p, g, out, rows, &mut xa[down.slot]);
            }
        }
    }

    /// Block `l` on the residual stream `x` (B * T, C), in place, keeping its intermediates in
    /// `a`. Its adapters' dropout draws from streams of (batch seed, layer, slot), so running
    /// it again on the same input gives the same bits.
    fn block_forward(&self, l: usize, p: &ParamMap, batch: &Batch, a: &mut BlockActs, x: &mut [f32], zeros_c: &[f32]) {
        let blk = &self.blocks[l];
        let (rows, eps) = (batch.batch() * batch.time(), self.cfg.norm_eps);
        let n = self.attn_dims(batch.batch(), batch.time());
        for (slot, ad) in a.adapters.iter_mut().enumerate() {
            let place = (l * LINEAR_SLOTS + slot) as u64 + 1;
            ad.dropout_seed = batch.dropout_seed.map(|s| s ^ place.wrapping_mul(0x94D0_49BB_1331_11EB));
            ad.first_row = batch.first_token;
        }
        a.x_in.copy_from_slice(x);
        blk.norm1.forward(p, x, &mut a.n1, &mut a.s1, eps, zeros_c);
        let qkv =
            self.project_qkv(blk, p, &a.n1, &batch.pos, &mut a.qkv, &mut a.q, &mut a.k, &mut a.v, &mut a.adapters);
        attention_forward(qkv, &batch.pos, &mut a.y, &mut a.att_stats, n, self.attention);
        blk.o.forward(p, &a.y, &mut a.x_mid, rows, &mut a.adapters[blk.o.slot]);
        add_assign(&mut a.x_mid, x);
        blk.norm2.forward(p, &a.x_mid, &mut a.n2, &mut a.s2, eps, zeros_c);
        self.mlp_forward(blk, p, &a.n2, &mut a.h, &mut a.u, &mut a.g, x, &mut a.adapters);
        add_assign(x, &a.x_mid);
    }

    /// Forward pass: `acts.logits` (B * T, V) for the batch's ids at its positions. With
    /// training activations every block's intermediates are kept for [`Model::backward`].
    ///
    /// # Panics
    /// If the batch is not the activations' shape, or breaks its invariant.
    pub fn forward(&self, p: &ParamMap, batch: &Batch, acts: &mut Activations) {
        let (b, t, eps) = (acts.b, acts.t, self.cfg.norm_eps);
        assert_eq!((batch.batch(), batch.time()), (b, t), "the batch is not the activations' shape");
        batch.check();
        let rows = b * t;
        let x = &mut acts.x;
        self.embed(p, &batch.ids, &batch.pos, x);
        if let Some(noise) = batch.noise {
            add_embedding_noise(x, batch, noise.alpha, noise.seed, self.cfg.n_embd);
        }
        // Inference and checkpointed activations hold one block's buffers, which every layer
        // reuses; checkpointed ones also keep each block's input, to run it again in backward.
        let kept = acts.blocks.len();
        for l in 0..self.blocks.len() {
            if let Some(input) = acts.block_inputs.get_mut(l) {
                input.copy_from_slice(x);
            }
            self.block_forward(l, p, batch, &mut acts.blocks[l.min(kept - 1)], x, &acts.zeros_c);
        }
        self.norm_f.forward(p, x, &mut acts.nf, &mut acts.sf, eps, &acts.zeros_c);
        self.head.forward(p, &acts.nf, &mut acts.logits, rows, &mut acts.no_adapter);
    }

    /// Forward only: each token's negative log-probability of its target into
    /// `acts.row_losses()` (0 where the target is `IGNORE`d); returns their sum and how many
    /// were predicted. Works with inference activations.
    pub fn target_losses(&self, p: &ParamMap, batch: &Batch, acts: &mut Activations) -> (f64, usize) {
        self.forward(p, batch, acts);
        let sum = target_losses(&acts.logits, &batch.targets, self.cfg.vocab_size, &mut acts.row_loss);
        (sum, batch.predicted())
    }

    /// Mean cross-entropy of the batch's predicted targets, forward only.
    pub fn loss(&self, p: &ParamMap, batch: &Batch, acts: &mut Activations) -> f32 {
        let (sum, n) = self.target_losses(p, batch, acts);
        (sum / n.max(1) as f64) as f32
    }

    /// The places of the final norm and the head, after every block's (the embeddings are at 0).
    fn final_places(&self) -> (usize, usize) {
        let norm_f = 1 + self.blocks.len() * PLACES_PER_BLOCK;
        (norm_f, norm_f + 1)
    }

    /// The first place, in forward order, of an operation whose parameters `grads` trains: 0 for
    /// the embeddings, then each block's places ([`PLACES_PER_BLOCK`] from `1 + l *
    /// PLACES_PER_BLOCK`), the final norm's and the head's; none when nothing trains.
    fn first_trainable(&self, grads: &ParamMap) -> Option<usize> {
        let trains = |id: ParamId| !grads.at(id).is_empty();
        let (norm_f, head) = self.final_places();
        let blocks = self.blocks.iter().enumerate();
        (trains(self.wte) || self.wpe.is_some_and(trains))
            .then_some(0)
            .or_else(|| {
                blocks.filter_map(|(l, blk)| blk.first_trainable(grads).map(|op| 1 + l * PLACES_PER_BLOCK + op)).next()
            })
            .or_else(|| self.norm_f.trains(grads).then_some(norm_f))
            .or_else(|| self.head.trains(grads).then_some(head))
    }

    /// The floating-point operations per token of a training step on sequences of `t` tokens
    /// that trains what `grads` holds, counted as nanoGPT's `6 N + 12 L H D T` is, but only
    /// for the work [`Model::backward`] does: each parameter element costs 2 in forward, 2 in
    /// its operation's input gradient and 2 in its own gradient, each of the last two only
    /// when backward computes it; each layer's attention costs `4 H D T` in forward and
    /// `8 H D T` in backward. Position embeddings cost nothing, a token embedding tied to the
    /// head costs as the head, an untied one has no input gradient. A step that trains
    /// everything of gpt2 costs nanoGPT's estimate exactly; a LoRA step loses its frozen
    /// weights' gradients and the input gradients below its first adapter, and adds its
    /// adapters' six per element.
    pub fn flops_per_token(&self, p: &ParamMap, grads: &ParamMap, t: usize) -> f64 {
        let first = self.first_trainable(grads);
        let below = |place: usize| first.is_some_and(|first| first < place);
        let cost = |id: ParamId, input_gradient: bool| {
            let (n, trains) = (p.at(id).len(), !grads.at(id).is_empty());
            2 * n * (1 + usize::from(input_gradient) + usize::from(trains))
        };
        // A weight and its optional bias.
        let pair = |w: ParamId, b: Option<ParamId>, dx: bool| cost(w, dx) + b.map_or(0, |b| cost(b, dx));
        let linear = |lin: &Linear, place: usize| {
            let dx = below(place);
            // B's input is `x A^T`, whose gradient backward needs for A's as well.
            pair(lin.w, lin.b, dx)
                + lin.adapter.map_or(0, |ad| {
                    let dxa = dx || !grads.at(ad.a).is_empty();
                    cost(ad.a, dx) + cost(ad.b, dxa) + ad.magnitude.map_or(0, |m| cost(m, dxa))
                })
        };
        let norm = |n: &Norm, place: usize| pair(n.w, n.b, below(place));
        let (norm_f_place, head_place) = self.final_places();
        let attention = self.cfg.n_head * self.cfg.head_dim() * t;
        let blocks: usize = (self.blocks.iter().enumerate())
            .map(|(l, blk)| {
                let place = |op: usize| 1 + l * PLACES_PER_BLOCK + op;
                let params: usize = (blk.ops())
                    .map(|(op, o)| match o {
                        Op::Norm(n) => norm(&n, place(op)),
                        Op::Linear(lin) => linear(&lin, place(op)),
                    })
                    .sum();
                params + 4 * attention + if below(place(ATTN_OUT)) { 8 * attention } else { 0 }
            })
            .sum();
        let embedding = if self.head.w == self.wte { 0 } else { cost(self.wte, false) };
        (embedding + blocks + norm(&self.norm_f, norm_f_place) + linear(&self.head, head_place)) as f64
    }

    /// Backward from the logits' gradient a loss wrote into [`Activations::loss_buffers`] after
    /// [`Model::forward`] of the same batch: adds every gradient whose tensor in `grads` is not
    /// empty (a map made by [`ParamMap::zeros_like`] or [`ParamMap::zeros_like_trainable`] of
    /// `p`). It stops below the first operation in forward order that trains: the gradients of
    /// inputs nothing below needs are not computed (with LoRA, the first layer's input
    /// gradient; with every parameter frozen, everything).
    ///
    /// # Panics
    /// If `acts` are inference activations.
    pub fn backward(&self, p: &ParamMap, batch: &Batch, acts: &mut Activations, grads: &mut ParamMap) {
        assert!(acts.training, "backward needs training activations");
        let (b, t, c) = (acts.b, acts.t, self.cfg.n_embd);
        let rows = b * t;
        let n = self.attn_dims(b, t);
        let pos = &batch.pos[..];
        let Activations {
            blocks,
            block_inputs,
            x,
            nf,
            sf,
            dlogits,
            dx,
            dtmp,
            dn,
            dqkv,
            dq,
            dk,
            dv,
            dh,
            du,
            dg,
            dxa,
            dz,
            lora_partials,
            scratch_c,
            zeros_c,
            no_adapter,
            ..
        } = acts;
        let dxa = &mut AdapterScratch { dxa, dz, partials: lora_partials };

        // The input of the operation at `place` needs its gradient when something before it trains.
        let first = self.first_trainable(grads);
        let below = |place: usize| first.is_some_and(|first| first < place);
        let (norm_f_place, head_place) = self.final_places();
        let dn_f = InputGradient::write_if(below(head_place), dtmp);
        self.head.backward(p, grads, dlogits, nf, no_adapter, dxa, dn_f, rows);
        if !below(head_place) {
            return;
        }
        self.norm_f.backward(p, grads, dtmp, x, sf, dx, scratch_c);
        if !below(norm_f_place) {
            return;
        }
        let last = self.blocks.len() - 1;
        for (l, blk) in self.blocks.iter().enumerate().rev() {
            let needed = |op: usize| below(1 + l * PLACES_PER_BLOCK + op);
            let a: &BlockActs = match block_inputs.get(l) {
                None => &blocks[l],
                // Checkpointed: the last block's intermediates are still those forward left;
                // every other block runs again from its input (into `x`, which backward no
                // longer needs) to get back the intermediates its backward reads.
                Some(input) => {
                    if l != last {
                        x.copy_from_slice(input);
                        self.block_forward(l, p, batch, &mut blocks[0], x, zeros_c);
                    }
                    &blocks[0]
                }
            };
            // dx holds d(block output) = d(x_mid + mlp(norm2(x_mid))).
            let xa = &a.adapters;
            let (mlp_out, mlp_in) = (needed(MLP_OUT), needed(MLP_IN));
            match blk.mlp {
                Mlp::Gelu { fc, proj } => {
                    proj.backward(p, grads, dx, &a.g, &xa[proj.slot], dxa, InputGradient::write_if(mlp_out, dg), rows);
                    if !mlp_out {
                        return;
                    }
                    gelu_backward(self.cfg.gelu, dg, &a.h, dh);
                    let dn2 = InputGradient::write_if(mlp_in, dtmp);
                    fc.backward(p, grads, dh, &a.n2, &xa[fc.slot], dxa, dn2, rows);
                }
                Mlp::SwiGlu { gate, up, down } => {
                    down.backward(p, grads, dx, &a.g, &xa[down.slot], dxa, InputGradient::write_if(mlp_out, dg), rows);
                    if !mlp_out {
                        return;
                    }
                    swiglu_backward(dg, &a.h, &a.u, dh, du);
                    let dn2 = InputGradient::write_if(mlp_in, dtmp);
                    gate.backward(p, grads, dh, &a.n2, &xa[gate.slot], dxa, dn2, rows);
                    let dn2 = InputGradient::add_if(mlp_in, dtmp);
                    up.backward(p, grads, du, &a.n2, &xa[up.slot], dxa, dn2, rows);
                }
            }
            if !mlp_in {
                return;
            }
            blk.norm2.backward(p, grads, dtmp, &a.x_mid, &a.s2, dn, scratch_c);
            if !needed(NORM2) {
                return;
            }
            add_assign(dx, dn); // d x_mid

            let attn_out = needed(ATTN_OUT);
            blk.o.backward(p, grads, dx, &a.y, &xa[blk.o.slot], dxa, InputGradient::write_if(attn_out, dtmp), rows);
            if !attn_out {
                return;
            }
            let qkv_in = needed(QKV);
            match blk.qkv {
                Qkv::Fused(lin) => {
                    let (qkv, fused) = (QkvIn::Fused(&a.qkv), QkvOut::Fused(dqkv));
                    attention_backward(dtmp, qkv, pos, &a.att_stats, fused, n, self.attention);
                    let dn1 = InputGradient::write_if(qkv_in, dtmp);
                    lin.backward(p, grads, dqkv, &a.n1, &xa[lin.slot], dxa, dn1, rows);
                }
                Qkv::Split(lq, lk, lv) => {
                    let qkv = QkvIn::Split { q: &a.q, k: &a.k, v: &a.v };
                    attention_backward(dtmp, qkv, pos, &a.att_stats, QkvOut::Split { dq, dk, dv }, n, self.attention);
                    let (d, theta) = (self.cfg.head_dim(), self.cfg.rope_theta);
                    rope(dq, pos, self.cfg.n_head, d, theta, true);
                    rope(dk, pos, self.cfg.n_kv_head, d, theta, true);
                    lq.backward(p, grads, dq, &a.n1, &xa[lq.slot], dxa, InputGradient::write_if(qkv_in, dtmp), rows);
                    lk.backward(p, grads, dk, &a.n1, &xa[lk.slot], dxa, InputGradient::add_if(qkv_in, dtmp), rows);
                    lv.backward(p, grads, dv, &a.n1, &xa[lv.slot], dxa, InputGradient::add_if(qkv_in, dtmp), rows);
                }
            }
            if !qkv_in {
                return;
            }
            blk.norm1.backward(p, grads, dtmp, &a.x_in, &a.s1, dn, scratch_c);
            if !needed(NORM1) {
                return;
            }
            add_assign(dx, dn); // d x_in
        }
        if !grads.at(self.wte).is_empty() {
            embedding_backward(&batch.ids, dx, grads.at_mut(self.wte), c);
        }
        if let Some(wpe) = self.wpe.filter(|w| !grads.at(*w).is_empty()) {
            let dwpe = grads.at_mut(wpe);
            for (row, &pos) in dx.chunks(c).zip(pos) {
                let pos = pos as usize;
                dwpe[pos * c..(pos + 1) * c].iter_mut().zip(row).for_each(|(g, d)| *g += d);
            }
        }
    }
}

/// NEFTune's noise (see [`crate::nn::batch::EmbeddingNoise`]) added to the input embeddings
/// `x` (B * T, C). Each token draws from its own stream (seed, index), so the noise does not
/// depend on the thread count.
fn add_embedding_noise(x: &mut [f32], batch: &Batch, alpha: f32, seed: u64, c: usize) {
    for (start, len) in batch.examples() {
        let magnitude = alpha / ((len * c) as f32).sqrt();
        for r in start..start + len {
            let place = (batch.first_token + r) as u64 + 1;
            let mut rng = SplitMix64::new(seed ^ place.wrapping_mul(0xD1B5_4A32_D192_ED03));
            for v in &mut x[r * c..(r + 1) * c] {
                *v += (rng.unit() as f32 * 2.0 - 1.0) * magnitude;
            }
        }
    }
}

/// `n` zeros when the architecture uses the buffer, none otherwise.
pub(crate) fn zeros_if(used: bool, n: usize) -> Vec<f32> {
    vec![0.0; if used { n } else { 0 }]
}

/// What a forward pass keeps for backward.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kept {
    /// Every block's intermediates.
    Every,
    /// Each block's input, and one block's intermediates (activation checkpointing).
    Inputs,
    /// Nothing: inference, one block's intermediates overwritten layer by layer.
    None,
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
    /// Per linear slot, what its adapter keeps (empty without one).
    adapters: Vec<AdapterActs>,
}

/// Every buffer a forward (and for training, a backward) pass needs, allocated once for a
/// (batch, time) shape.
pub struct Activations {
    b: usize,
    t: usize,
    /// Whether every block's intermediates are kept for backward.
    training: bool,
    blocks: Vec<BlockActs>,
    /// With activation checkpointing, each block's input (B * T, C): `blocks` then holds one
    /// block's intermediates, which backward recomputes layer by layer. Empty otherwise.
    block_inputs: Vec<Vec<f32>>,
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
    /// An adapter's gradient of `x A^T` (B * T, r) and DoRA's rescaled output gradient
    /// (B * T, out).
    dxa: Vec<f32>,
    dz: Vec<f32>,
    /// Each block of rows' part of an adapter's gradients ([`lora_partial`]).
    lora_partials: Vec<f32>,
    /// The buffers of a layer without adapter (the head).
    no_adapter: AdapterActs,
    zeros_c: Vec<f32>,
    scratch_c: Vec<f32>,
}

impl Activations {
    /// Buffers for training a model without adapters.
    pub fn new(cfg: &ModelConfig, b: usize, t: usize) -> Self {
        Self::build(cfg, b, t, [AdapterShape::default(); LINEAR_SLOTS], Kept::Every)
    }

    /// Buffers for training `model` (its adapters included).
    pub fn for_training(model: &Model, b: usize, t: usize) -> Self {
        Self::build(&model.cfg, b, t, model.adapter_shapes(), Kept::Every)
    }

    /// Buffers for training `model` with activation checkpointing: forward keeps only each
    /// block's input and backward runs each block again before its backward. One block's
    /// intermediates instead of every block's, for a third more arithmetic; the same bits.
    pub fn checkpointed(model: &Model, b: usize, t: usize) -> Self {
        Self::build(&model.cfg, b, t, model.adapter_shapes(), Kept::Inputs)
    }

    /// Buffers for forward passes of `model` only: one block's intermediates, which every
    /// layer overwrites, and no gradients.
    pub fn inference(model: &Model, b: usize, t: usize) -> Self {
        Self::build(&model.cfg, b, t, model.adapter_shapes(), Kept::None)
    }

    fn build(cfg: &ModelConfig, b: usize, t: usize, adapters: [AdapterShape; LINEAR_SLOTS], kept: Kept) -> Self {
        let training = kept != Kept::None;
        assert!(t <= cfg.block_size, "sequence of {t} is longer than the block size {}", cfg.block_size);
        let (rows, c, f, v) = (b * t, cfg.n_embd, cfg.ffn_hidden, cfg.vocab_size);
        let ckv = cfg.n_kv_head * cfg.head_dim();
        let swiglu = cfg.arch == Arch::Llama;
        let fused = cfg.arch == Arch::Gpt2;
        let z = |n: usize| vec![0.0f32; n];
        let g = |n: usize| zeros_if(training, n);
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
            adapters: adapters.iter().map(|&shape| AdapterActs::new(rows, shape)).collect(),
        };
        let (blocks, inputs) = match kept {
            Kept::Every => (cfg.n_layer, 0),
            Kept::Inputs => (1, cfg.n_layer),
            Kept::None => (1, 0),
        };
        Activations {
            b,
            t,
            training,
            blocks: (0..blocks).map(|_| block()).collect(),
            block_inputs: (0..inputs).map(|_| z(rows * c)).collect(),
            x: z(rows * c),
            nf: z(rows * c),
            sf: NormStats::new(rows),
            logits: z(rows * v),
            dlogits: g(rows * v),
            row_loss: vec![0.0; rows],
            dx: g(rows * c),
            dtmp: g(rows * c),
            dn: g(rows * c),
            dqkv: zeros_if(training && fused, rows * 3 * c),
            dq: zeros_if(training && !fused, rows * c),
            dk: zeros_if(training && !fused, rows * ckv),
            dv: zeros_if(training && !fused, rows * ckv),
            dh: g(rows * f),
            du: zeros_if(training && swiglu, rows * f),
            dg: g(rows * f),
            dxa: g(rows * adapters.iter().map(|a| a.r).max().unwrap_or(0)),
            dz: g(rows * adapters.iter().filter(|a| a.dora).map(|a| a.cout).max().unwrap_or(0)),
            // As many blocks as either precision cuts the rows into.
            lora_partials: g([Precision::F32, Precision::Bf16]
                .map(|p| p.then_blocks(rows))
                .into_iter()
                .max()
                .unwrap_or(0)
                * adapters.iter().map(|a| lora_partial(a.r, a.cin, a.cout)).max().unwrap_or(0)),
            no_adapter: AdapterActs::default(),
            zeros_c: z(c),
            scratch_c: z(c),
        }
    }

    pub fn batch(&self) -> usize {
        self.b
    }
    /// After [`Model::forward`] with training activations: what linear slot `slot` of block
    /// `layer` read, (B * T, in); the head's input for `None`.
    ///
    /// # Panics
    /// If these are inference activations and `layer` is given.
    pub fn linear_input(&self, layer: usize, slot: Option<usize>) -> &[f32] {
        let Some(slot) = slot else { return &self.nf };
        assert!(self.training && self.block_inputs.is_empty(), "these activations keep no block's inputs");
        let a = &self.blocks[layer];
        match slot {
            0..=2 => &a.n1,
            3 => &a.y,
            4 | 5 => &a.n2,
            _ => &a.g,
        }
    }
    pub fn time(&self) -> usize {
        self.t
    }
    /// What a loss reads and writes after [`Model::forward`]: the logits (B * T, V), their
    /// gradient (empty for inference activations) and one f64 per token for its losses.
    pub fn loss_buffers(&mut self) -> (&[f32], &mut [f32], &mut [f64]) {
        (&self.logits, &mut self.dlogits, &mut self.row_loss)
    }
    /// Each token's loss as the last loss wrote it (0 for an ignored target).
    pub fn row_losses(&self) -> &[f64] {
        &self.row_loss
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
                    + a.adapters.iter().map(AdapterActs::floats).sum::<usize>()
                    + s(&a.s1)
                    + s(&a.s2)
            })
            .sum::<usize>()
            + self.block_inputs.iter().map(Vec::len).sum::<usize>();
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
            &self.dxa,
            &self.dz,
            &self.lora_partials,
            &self.zeros_c,
            &self.scratch_c,
        ]
        .map(v)
        .iter()
        .sum::<usize>()
            + s(&self.sf);
        4 * (blocks + rest) + 8 * self.row_loss.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::batch::IGNORE;
    use crate::nn::decoder::Decoder;
    use crate::nn::gradcheck::{check_relative, random};
    use crate::nn::lora::{LoraConfig, LoraInit};
    use crate::nn::loss::cross_entropy;

    fn tiny(arch: Arch, variant: usize) -> ModelConfig {
        match arch {
            // variant: 0 = biases and GPT-2's GELU, 1 = no biases and the exact GELU
            Arch::Gpt2 => ModelConfig {
                gelu: [Gelu::Tanh, Gelu::Erf][variant],
                ..ModelConfig::gpt2(11, 8, 2, 2, 8, variant == 0)
            },
            Arch::Llama => {
                // variant: 0 = MHA untied, 1 = GQA tied, 2 = MQA
                let kv = [4, 2, 1][variant];
                let mut cfg = ModelConfig::llama(11, 8, 2, 4, kv, 16);
                cfg.tie_embeddings = variant == 1;
                cfg.ffn_hidden = 12;
                cfg
            }
        }
    }

    const VARIANTS: [(Arch, usize); 5] =
        [(Arch::Gpt2, 0), (Arch::Gpt2, 1), (Arch::Llama, 0), (Arch::Llama, 1), (Arch::Llama, 2)];

    /// Random parameters of a useful size (the 0.02 init would make every gradient tiny).
    fn randomize(p: &mut ParamMap) {
        for (i, (_, t)) in p.iter_mut().enumerate() {
            let values = random(t.data().len(), 100 + i as u64);
            t.data_mut().iter_mut().zip(values).for_each(|(w, r)| *w = r * 0.5);
        }
    }

    fn random_params(cfg: &ModelConfig) -> ParamMap {
        let mut p = cfg.init(1);
        randomize(&mut p);
        p
    }

    /// A batch of whole rows with random ids and targets.
    fn random_batch(cfg: &ModelConfig, b: usize, t: usize, seed: u64) -> Batch {
        let v = cfg.vocab_size as f32;
        let ids: Vec<u32> = random(b * t, seed).iter().map(|r| ((r + 1.0) / 2.0 * (v - 0.01)) as u32).collect();
        let targets: Vec<u32> = random(b * t, seed + 1).iter().map(|r| ((r + 1.0) / 2.0 * (v - 0.01)) as u32).collect();
        Batch::whole_rows(t, &ids, &targets)
    }

    /// Forward, mean cross-entropy over the predicted targets, backward into `grads`.
    fn forward_backward(
        model: &Model,
        p: &ParamMap,
        batch: &Batch,
        z_loss: f32,
        acts: &mut Activations,
        grads: &mut ParamMap,
    ) -> f32 {
        model.forward(p, batch, acts);
        let n = batch.predicted();
        let sum = cross_entropy(acts, batch, model.cfg.vocab_size, z_loss, n);
        model.backward(p, batch, acts, grads);
        (sum / n.max(1) as f64) as f32
    }

    fn check_gradients(label: &str, model: &Model, params: &ParamMap, batch: &Batch, grads: &ParamMap) {
        let (b, t) = (batch.batch(), batch.time());
        let loss_of = |p: &ParamMap| -> f64 {
            let mut acts = Activations::inference(model, b, t);
            model.loss(p, batch, &mut acts) as f64
        };
        for (name, analytic) in grads.iter().filter(|(_, g)| !g.data().is_empty()) {
            check_relative(&format!("{name} ({label})"), params.get(name), analytic.data(), |x| {
                let mut p = params.clone();
                p.get_mut(name).copy_from_slice(x);
                loss_of(&p)
            });
        }
    }

    #[test]
    fn whole_model_gradients_match_finite_differences() {
        for (arch, variant) in VARIANTS {
            let cfg = tiny(arch, variant);
            let batch = random_batch(&cfg, 2, 4, 7);
            let params = random_params(&cfg);
            let model = Model::new(cfg, &params);
            let mut acts = Activations::new(&cfg, 2, 4);
            let mut grads = params.zeros_like();
            forward_backward(&model, &params, &batch, 0.0, &mut acts, &mut grads);
            check_gradients(&format!("{} {variant}", arch.name()), &model, &params, &batch, &grads);
        }
    }

    /// Two rows packing examples of 3 + 5 and 6 + 2 tokens, random ids, and some targets
    /// ignored as a prompt would be.
    fn packed_batch(cfg: &ModelConfig) -> Batch {
        let mut batch = random_batch(cfg, 2, 8, 3);
        batch.pos.copy_from_slice(&[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1]);
        for i in [0, 3, 4, 8] {
            batch.targets[i] = IGNORE;
        }
        batch
    }

    #[test]
    fn packed_gradients_match_finite_differences() {
        for (arch, variant) in [(Arch::Gpt2, 0), (Arch::Llama, 1)] {
            let cfg = tiny(arch, variant);
            let batch = packed_batch(&cfg);
            let params = random_params(&cfg);
            let model = Model::new(cfg, &params);
            let mut acts = Activations::new(&cfg, 2, 8);
            let mut grads = params.zeros_like();
            forward_backward(&model, &params, &batch, 0.0, &mut acts, &mut grads);
            check_gradients(&format!("packed {}", arch.name()), &model, &params, &batch, &grads);
        }
    }

    #[test]
    fn a_block_packing_examples_gives_each_the_logits_it_gets_alone() {
        for (arch, variant) in VARIANTS {
            let cfg = tiny(arch, variant);
            let params = random_params(&cfg);
            let model = Model::new(cfg, &params);
            let batch = packed_batch(&cfg);
            let mut acts = Activations::inference(&model, 2, 8);
            model.forward(&params, &batch, &mut acts);
            let v = cfg.vocab_size;
            for (start, len) in batch.examples() {
                let ids = &batch.ids[start..start + len];
                let alone = Batch::whole_rows(len, ids, &vec![IGNORE; len]);
                let mut acts1 = Activations::inference(&model, 1, len);
                model.forward(&params, &alone, &mut acts1);
                for (i, (a, b)) in acts.logits[start * v..(start + len) * v].iter().zip(&acts1.logits).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-6,
                        "{} {variant}, example at {start}, logit {i}: {a} vs {b}",
                        arch.name()
                    );
                }
            }
        }
    }

    #[test]
    fn ignored_tokens_and_padding_add_no_gradient() {
        for (arch, variant) in [(Arch::Gpt2, 0), (Arch::Llama, 0)] {
            let cfg = tiny(arch, variant);
            let params = random_params(&cfg);
            let model = Model::new(cfg, &params);
            // One example of 5 tokens, then a 3-token example that predicts nothing (padding).
            let mut batch = random_batch(&cfg, 1, 8, 11);
            batch.pos.copy_from_slice(&[0, 1, 2, 3, 4, 0, 1, 2]);
            batch.targets[5..].fill(IGNORE);
            let mut acts = Activations::new(&cfg, 1, 8);
            let mut grads = params.zeros_like();
            forward_backward(&model, &params, &batch, 1e-3, &mut acts, &mut grads);
            let v = cfg.vocab_size;
            assert!(acts.dlogits[5 * v..].iter().all(|g| *g == 0.0), "ignored rows: exactly zero gradient");
            let alone = Batch::whole_rows(5, &batch.ids[..5], &batch.targets[..5]);
            let mut acts1 = Activations::new(&cfg, 1, 5);
            let mut grads1 = params.zeros_like();
            forward_backward(&model, &params, &alone, 1e-3, &mut acts1, &mut grads1);
            for ((name, a), (_, b)) in grads.iter().zip(grads1.iter()) {
                let close = a.data().iter().zip(b.data()).all(|(x, y)| (x - y).abs() <= 1e-6 * (1.0 + y.abs()));
                assert!(close, "{name}: the padding changed the gradient");
            }
        }
    }

    #[test]
    fn frozen_parameters_get_no_gradient_and_inputs_still_do() {
        for ((arch, variant), dora) in VARIANTS.into_iter().flat_map(|v| [(v, false), (v, true)]) {
            let cfg = tiny(arch, variant);
            let lora = lora_on_everything(&cfg, false, dora);
            let params = adapted(&cfg, &lora);
            let model = Model::with_lora_scale(cfg, &params, lora.scale());
            let batch = random_batch(&cfg, 2, 4, 5);
            let mut acts = Activations::for_training(&model, 2, 4);
            let mut all = params.zeros_like();
            forward_backward(&model, &params, &batch, 0.0, &mut acts, &mut all);
            // Each parameter alone, then the adapters: backward stops below the first that
            // trains, and the input gradient flows back to it through every frozen layer above.
            let names: Vec<String> = params.iter().map(|(name, _)| name.to_string()).collect();
            let alone = names.iter().map(|only| Box::new(move |name: &str| name == only) as Box<dyn Fn(&str) -> bool>);
            for trains in alone.chain([Box::new(crate::nn::lora::is_adapter) as Box<dyn Fn(&str) -> bool>]) {
                let mut some = params.zeros_like_trainable(&trains);
                forward_backward(&model, &params, &batch, 0.0, &mut acts, &mut some);
                for ((name, got), (_, want)) in some.iter().zip(all.iter()) {
                    let want = if trains(name) { want.data() } else { &[] };
                    assert_eq!(got.data(), want, "{name} ({} {variant}, dora {dora})", arch.name());
                }
            }
        }
    }

    #[test]
    fn a_step_costs_the_flops_its_backward_does() {
        let size = |p: &ParamMap, name: &str| p.get(name).len();
        for (arch, variant) in [(Arch::Gpt2, 0), (Arch::Llama, 0)] {
            let cfg = tiny(arch, variant);
            let t = cfg.block_size;
            let attention = cfg.n_layer * cfg.n_head * cfg.head_dim() * t;
            let params = random_params(&cfg);
            let model = Model::new(cfg, &params);
            // Every weight trains: nanoGPT's 6 N + 12 L H D T, N without gpt2's position
            // table; llama's untied embedding has no input gradient.
            let (n, full) = match arch {
                Arch::Gpt2 => {
                    let n = params.num_elements() - size(&params, "transformer.wpe.weight");
                    (n, 6 * n)
                }
                Arch::Llama => {
                    (params.num_elements(), 6 * params.num_elements() - 2 * size(&params, "model.embed_tokens.weight"))
                }
            };
            assert_eq!(model.flops_per_token(&params, &params.zeros_like(), t), (full + 12 * attention) as f64);
            // Nothing trains: forward only.
            let none = params.zeros_like_trainable(|_| false);
            assert_eq!(model.flops_per_token(&params, &none, t), (2 * n + 4 * attention) as f64);
            if arch == Arch::Llama {
                continue;
            }
            // LoRA (or DoRA) on every linear layer: the frozen base costs 4 per element, less 2
            // for the first layer's norm and projection, whose input gradients nothing needs;
            // the adapters cost 6, less 2 for the first projection's A.
            for dora in [false, true] {
                let lora = lora_on_everything(&cfg, false, dora);
                let adapted = adapted(&cfg, &lora);
                let model = Model::with_lora_scale(cfg, &adapted, lora.scale());
                let grads = adapted.zeros_like_trainable(crate::nn::lora::is_adapter);
                let adapters = adapted.num_elements() - params.num_elements();
                let first =
                    ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_attn.lora_A.weight"];
                let below: usize = first.iter().map(|name| size(&adapted, &format!("transformer.h.0.{name}"))).sum();
                let want = 4 * n + 6 * adapters - 2 * below + 12 * attention;
                assert_eq!(model.flops_per_token(&adapted, &grads, t), want as f64, "dora {dora}");
            }
        }
    }

    fn lora_on_everything(cfg: &ModelConfig, rslora: bool, dora: bool) -> LoraConfig {
        LoraConfig { rslora, init: LoraInit::Gaussian, dora, ..LoraConfig::on_every_linear(cfg, 2, 4.0) }
    }

    /// A model of `cfg` with random base weights and adapters whose B is not zero (DoRA's
    /// magnitudes around 1).
    fn adapted(cfg: &ModelConfig, lora: &LoraConfig) -> ParamMap {
        let mut params = random_params(cfg);
        lora.add(cfg, &mut params, 3);
        randomize(&mut params);
        for (_, t) in params.iter_mut().filter(|(n, _)| n.ends_with("lora_magnitude_vector")) {
            t.data_mut().iter_mut().for_each(|m| *m += 1.5);
        }
        params
    }

    #[test]
    fn lora_forward_equals_the_merged_model() {
        for ((arch, variant), dora) in VARIANTS.into_iter().flat_map(|v| [(v, false), (v, true)]) {
            let cfg = tiny(arch, variant);
            let lora = lora_on_everything(&cfg, variant == 1, dora);
            let params = adapted(&cfg, &lora);
            let model = Model::with_lora_scale(cfg, &params, lora.scale());
            let merged = lora.merged(&cfg, &params);
            let plain = Model::new(cfg, &merged);
            let batch = packed_batch(&cfg);
            let (mut a1, mut a2) = (Activations::inference(&model, 2, 8), Activations::inference(&plain, 2, 8));
            model.forward(&params, &batch, &mut a1);
            plain.forward(&merged, &batch, &mut a2);
            for (x, y) in a1.logits.iter().zip(&a2.logits) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{} {variant} dora {dora}: {x} vs {y}", arch.name());
            }
        }
    }

    /// Checkpointed activations give the same logits and gradients, bit for bit, as keeping
    /// every block's (the whole model; LoRA with dropout, NEFTune's noise; DoRA), in less memory.
    #[test]
    fn activation_checkpointing_gives_the_same_bits_in_less_memory() {
        for ((arch, variant), case) in VARIANTS.into_iter().flat_map(|v| [(v, 0), (v, 1), (v, 2)]) {
            let cfg = tiny(arch, variant);
            let lora = lora_on_everything(&cfg, false, case == 2);
            let (params, model) = if case == 0 {
                let params = random_params(&cfg);
                let model = Model::new(cfg, &params);
                (params, model)
            } else {
                let params = adapted(&cfg, &lora);
                let model = Model::with_lora_scale(cfg, &params, lora.scale()).with_lora_dropout(0.25);
                (params, model)
            };
            let mut batch = packed_batch(&cfg);
            batch.dropout_seed = Some(9);
            batch.noise = Some(crate::nn::batch::EmbeddingNoise { alpha: 5.0, seed: 4 });
            let run = |mut acts: Activations| {
                let mut grads = match case {
                    0 => params.zeros_like(),
                    _ => params.zeros_like_trainable(crate::nn::lora::is_adapter),
                };
                forward_backward(&model, &params, &batch, 0.0, &mut acts, &mut grads);
                (acts.logits.clone(), grads, acts.bytes())
            };
            let (logits, grads, kept) = run(Activations::for_training(&model, 2, 8));
            let (again, ckpt_grads, ckpt) = run(Activations::checkpointed(&model, 2, 8));
            let what = format!("{} {variant} case {case}", arch.name());
            assert!(logits.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: logits");
            for ((name, g), (_, h)) in grads.iter().zip(ckpt_grads.iter()) {
                assert!(g.data().iter().zip(h.data()).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: {name}");
            }
            assert!(grads.iter().any(|(_, g)| g.data().iter().any(|v| *v != 0.0)), "{what}: no gradient at all");
            assert!(ckpt < kept, "{what}: {ckpt} bytes checkpointed against {kept}");
        }
    }

    #[test]
    fn lora_gradients_match_finite_differences_and_leave_the_base_frozen() {
        for (arch, variant) in [(Arch::Gpt2, 0), (Arch::Llama, 1)] {
            let cfg = tiny(arch, variant);
            let lora = lora_on_everything(&cfg, false, false);
            let params = adapted(&cfg, &lora);
            let model = Model::with_lora_scale(cfg, &params, lora.scale());
            let batch = packed_batch(&cfg);
            let mut acts = Activations::for_training(&model, 2, 8);
            let mut grads = params.zeros_like_trainable(crate::nn::lora::is_adapter);
            forward_backward(&model, &params, &batch, 0.0, &mut acts, &mut grads);
            assert!(grads.iter().filter(|(_, g)| !g.data().is_empty()).count() == 2 * lora.modules(&cfg).len());
            check_gradients(&format!("lora {}", arch.name()), &model, &params, &batch, &grads);
        }
    }

    #[test]
    fn gradients_accumulate_across_calls() {
        for (arch, variant) in VARIANTS {
            let cfg = tiny(arch, variant);
            let params = random_params(&cfg);
            let model = Model::new(cfg, &params);
            let batch = Batch::whole_rows(4, &[1, 2, 3, 4], &[2, 3, 4, 5]);
            let mut acts = Activations::new(&cfg, 1, 4);
            let mut once = params.zeros_like();
            forward_backward(&model, &params, &batch, 0.0, &mut acts, &mut once);
            let mut twice = params.zeros_like();
            forward_backward(&model, &params, &batch, 0.0, &mut acts, &mut twice);
            forward_backward(&model, &params, &batch, 0.0, &mut acts, &mut twice);
            for ((name, a), (_, b)) in once.iter().zip(twice.iter()) {
                let close = a.data().iter().zip(b.data()).all(|(x, y)| (2.0 * x - y).abs() <= 1e-5 * (1.0 + y.abs()));
                assert!(close, "{name}");
            }
        }
    }

    #[test]
    fn inference_activations_give_the_training_forward_bits() {
        for (arch, variant) in VARIANTS {
            let cfg = tiny(arch, variant);
            let params = random_params(&cfg);
            let model = Model::new(cfg, &params);
            let batch = packed_batch(&cfg);
            let (mut train, mut infer) = (Activations::new(&cfg, 2, 8), Activations::inference(&model, 2, 8));
            let (l1, l2) = (model.loss(&params, &batch, &mut train), model.loss(&params, &batch, &mut infer));
            assert_eq!(train.logits, infer.logits);
            assert_eq!(l1.to_bits(), l2.to_bits());
            assert!(infer.bytes() < train.bytes() / 2, "inference keeps one block and no gradients");
            let (sum, n) = model.target_losses(&params, &batch, &mut infer);
            assert_eq!(n, 12);
            assert!((sum / n as f64 - l1 as f64).abs() < 1e-6);
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
            model.forward(&params, &Batch::whole_rows(ids.len(), &ids, &[IGNORE; 6]), &mut acts);
            let mut dec = Decoder::new(&model);
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

    /// Several tokens in one pass get the bits each gets fed alone, with f32 weights and with
    /// int4 ones; a truncated cache continues as if the cut tokens were never fed. (Widths of
    /// 64 and more, so that matrices quantize in groups of 32.)
    #[test]
    fn a_pass_of_several_tokens_gives_the_bits_of_single_steps() {
        use crate::nn::quant::{rtn_linears, Scheme};
        let mut llama = ModelConfig::llama(11, 8, 2, 4, 2, 64);
        llama.ffn_hidden = 320;
        for (variant, cfg) in [ModelConfig::gpt2(11, 8, 2, 2, 64, true), llama].into_iter().enumerate() {
            let arch = cfg.arch;
            let params = random_params(&cfg);
            let quantized = rtn_linears(&cfg, &params, Scheme { bits: 4, group_size: 32, symmetric: false });
            assert!(quantized.has_quantized());
            for p in [&params, &quantized] {
                let model = Model::new(cfg, p);
                let ids = [3u32, 1, 4, 1, 5, 9, 2];
                let mut single = Decoder::new(&model);
                let steps: Vec<Vec<f32>> = ids.iter().map(|&id| single.step(&model, p, id).to_vec()).collect();
                let mut multi = Decoder::with_rows(&model, 4);
                multi.step(&model, p, ids[0]);
                let rows = multi.extend(&model, p, &ids[1..5]).to_vec();
                for (r, want) in rows.chunks(cfg.vocab_size).zip(&steps[1..5]) {
                    assert!(r.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "{} {variant}", arch.name());
                }
                // Drop the last two, feed the rest again.
                multi.truncate(3);
                multi.extend(&model, p, &ids[3..7]);
                assert_eq!(multi.len(), 7);
                assert!(multi.logits.iter().zip(&steps[6]).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }

    /// A batched decoder gives every sequence the bits it gets decoded alone, whatever the
    /// other rows of a pass are and when its sequence started; a cleared sequence starts again.
    #[test]
    fn a_batched_pass_gives_each_sequence_the_bits_of_its_own_steps() {
        let mut llama = ModelConfig::llama(11, 8, 2, 4, 2, 64);
        llama.ffn_hidden = 320;
        for cfg in [ModelConfig::gpt2(11, 8, 2, 2, 64, true), llama] {
            let params = random_params(&cfg);
            let model = Model::new(cfg, &params);
            let texts: [&[u32]; 3] = [&[3, 1, 4, 1, 5], &[9, 2, 6], &[5, 3, 5, 8, 9, 7]];
            let alone: Vec<Vec<Vec<f32>>> = texts
                .iter()
                .map(|ids| {
                    let mut dec = Decoder::new(&model);
                    ids.iter().map(|&id| dec.step(&model, &params, id).to_vec()).collect()
                })
                .collect();
            let mut batch = Decoder::batched(&model, 3, 6);
            // Sequence 1 starts two passes late, sequence 0 is fed twice from the start.
            let (mut fed, mut rounds) = ([0usize; 3], [0usize; 3]);
            for pass in 0..12 {
                let rows: Vec<(usize, u32)> = (0..3)
                    .filter(|&s| (s != 1 || pass >= 2) && fed[s] < texts[s].len() && rounds[s] < 2 - usize::from(s > 0))
                    .map(|s| (s, texts[s][fed[s]]))
                    .collect();
                if rows.is_empty() {
                    break;
                }
                let logits = batch.feed_each(&model, &params, &rows).to_vec();
                for (&(s, _), got) in rows.iter().zip(logits.chunks(cfg.vocab_size)) {
                    let want = &alone[s][fed[s]];
                    assert!(got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "{s} at {}", fed[s]);
                    fed[s] += 1;
                    assert_eq!(batch.len_of(s), fed[s]);
                    if fed[s] == texts[s].len() {
                        (fed[s], rounds[s]) = (0, rounds[s] + 1);
                        batch.clear_seq(s);
                    }
                }
            }
            assert_eq!(rounds, [2, 1, 1], "every sequence was decoded to its end");
        }
    }

    #[test]
    fn z_loss_adds_a_gradient_toward_small_logits() {
        let cfg = tiny(Arch::Llama, 0);
        let params = random_params(&cfg);
        let model = Model::new(cfg, &params);
        let batch = Batch::whole_rows(4, &[1, 2, 3, 4], &[2, 3, 4, 5]);
        let mut acts = Activations::new(&cfg, 1, 4);
        let (mut g0, mut g1) = (params.zeros_like(), params.zeros_like());
        let l0 = forward_backward(&model, &params, &batch, 0.0, &mut acts, &mut g0);
        let l1 = forward_backward(&model, &params, &batch, 1e-2, &mut acts, &mut g1);
        assert_eq!(l0, l1, "the reported loss is the cross-entropy alone");
        assert_ne!(g0.get("lm_head.weight"), g1.get("lm_head.weight"));
    }

    #[test]
    fn neftune_noise_moves_training_inputs_by_its_scale_only() {
        let cfg = tiny(Arch::Gpt2, 1);
        let params = random_params(&cfg);
        let model = Model::new(cfg, &params);
        let mut batch = packed_batch(&cfg);
        let mut acts = Activations::new(&cfg, 2, 8);
        model.forward(&params, &batch, &mut acts);
        let clean = acts.blocks[0].x_in.clone();
        batch.noise = Some(crate::nn::batch::EmbeddingNoise { alpha: 5.0, seed: 9 });
        model.forward(&params, &batch, &mut acts);
        let c = cfg.n_embd;
        for (start, len) in batch.examples() {
            let bound = 5.0 / ((len * c) as f32).sqrt();
            let rows = start * c..(start + len) * c;
            let moved: Vec<f32> =
                acts.blocks[0].x_in[rows.clone()].iter().zip(&clean[rows]).map(|(a, b)| a - b).collect();
            assert!(moved.iter().all(|d| d.abs() <= bound * 1.0001), "within alpha / sqrt(L d)");
            assert!(moved.iter().any(|d| d.abs() > bound / 2.0), "and of that size");
        }
    }

    /// DoRA's magnitudes against finite differences through the whole model (the norms do not
    /// depend on them; `lora_A` and `lora_B`, whose gradients treat the norms as constants as
    /// PEFT does, are checked layer by layer in `linear.rs`). A fresh DoRA model computes the
    /// base model.
    #[test]
    fn dora_magnitudes_train_and_a_fresh_dora_model_is_the_base_model() {
        for (arch, variant) in [(Arch::Gpt2, 0), (Arch::Llama, 1)] {
            let cfg = tiny(arch, variant);
            let lora = lora_on_everything(&cfg, false, true);
            let params = adapted(&cfg, &lora);
            let model = Model::with_lora_scale(cfg, &params, lora.scale());
            let batch = packed_batch(&cfg);
            let mut acts = Activations::for_training(&model, 2, 8);
            let mut grads = params.zeros_like_trainable(|n| n.ends_with("lora_magnitude_vector"));
            forward_backward(&model, &params, &batch, 0.0, &mut acts, &mut grads);
            check_gradients(&format!("dora {}", arch.name()), &model, &params, &batch, &grads);

            let mut fresh = random_params(&cfg);
            let base = fresh.clone();
            lora.add(&cfg, &mut fresh, 4);
            let adapted = Model::with_lora_scale(cfg, &fresh, lora.scale());
            let (mut a1, mut a2) = (Activations::inference(&adapted, 2, 8), Activations::inference(&model, 2, 8));
            adapted.forward(&fresh, &batch, &mut a1);
            Model::new(cfg, &base).forward(&base, &batch, &mut a2);
            for (x, y) in a1.logits.iter().zip(&a2.logits) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{}: {x} vs {y}", arch.name());
            }
        }
    }
}
