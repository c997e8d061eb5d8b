//! One-token-at-a-time inference with a KV cache, for sampling.

use crate::nn::kernels::attention::QkvIn;
use crate::nn::kernels::dot;
use crate::nn::linear::AdapterActs;
use crate::nn::model::{zeros_if, Arch, Model, ModelConfig, NormStats};
use crate::nn::params::ParamMap;

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
    /// Per linear slot, what its adapter keeps for one row.
    xa: Vec<AdapterActs>,
    no_adapter: AdapterActs,
    zeros_c: Vec<f32>,
    pub logits: Vec<f32>,
}

impl Decoder {
    pub fn new(model: &Model) -> Self {
        let cfg = &model.cfg;
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
            xa: model.adapter_shapes().iter().map(|&shape| AdapterActs::new(1, shape)).collect(),
            no_adapter: AdapterActs::default(),
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
        let at = [pos as u32];
        model.embed(p, &[token], &at, &mut self.x);
        for (l, blk) in model.blocks.iter().enumerate() {
            blk.norm1.forward(p, &self.x, &mut self.n, &mut self.stats, eps, &self.zeros_c);
            let (qkv, q, k_new, v_new) = (&mut self.qkv, &mut self.q, &mut self.k_new, &mut self.v_new);
            let (q, k_new, v_new) = match model.project_qkv(blk, p, &self.n, &at, qkv, q, k_new, v_new, &mut self.xa) {
                // One row: q, k and v side by side (H = Hkv).
                QkvIn::Fused(row) => (&row[..ckv], &row[ckv..2 * ckv], &row[2 * ckv..]),
                QkvIn::Split { q, k, v } => (q, k, v),
            };
            self.k[l][pos * ckv..(pos + 1) * ckv].copy_from_slice(k_new);
            self.v[l][pos * ckv..(pos + 1) * ckv].copy_from_slice(v_new);
            attend_cached(q, &self.k[l], &self.v[l], pos + 1, cfg, &mut self.scores, &mut self.y);
            blk.o.forward(p, &self.y, &mut self.x_mid, 1, &mut self.xa[blk.o.slot]);
            self.x_mid.iter_mut().zip(&self.x).for_each(|(m, r)| *m += r);
            blk.norm2.forward(p, &self.x_mid, &mut self.n, &mut self.stats, eps, &self.zeros_c);
            model.mlp_forward(blk, p, &self.n, &mut self.h, &mut self.u, &mut self.g, &mut self.x, &mut self.xa);
            self.x.iter_mut().zip(&self.x_mid).for_each(|(o, m)| *o += m);
        }
        model.norm_f.forward(p, &self.x, &mut self.n, &mut self.stats, eps, &self.zeros_c);
        model.head.forward(p, &self.n, &mut self.logits, 1, &mut self.no_adapter);
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
