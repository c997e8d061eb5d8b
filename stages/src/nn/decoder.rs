//! Inference with a KV cache, a token (or a few) at a time: sampling and speculative decoding.

use rayon::prelude::*;

use crate::nn::kernels::attention::QkvIn;
use crate::nn::kernels::{exp_fast, simd_fn, with_scratch};
use crate::nn::linear::AdapterActs;
use crate::nn::model::{zeros_if, Arch, Model, ModelConfig, NormStats};
use crate::nn::params::ParamMap;

/// Below this much attention work (rows x cached positions x width) a pass attends on the
/// calling thread: handing out the heads would cost more than they take.
const PARALLEL_ATTENTION: usize = 1 << 16;

/// Inference with a KV cache: each step feeds one token (or, for speculative decoding's
/// verification, a few) through every layer and attends over the cached positions. A batched
/// decoder keeps several sequences' caches and feeds one token of each in a pass.
///
/// Feeding several tokens in one pass gives each the bits it gets fed alone: every kernel of the
/// pass computes rows independently (and the weights are read once for all of them).
pub struct Decoder {
    /// One cache per sequence.
    caches: Vec<KvCache>,
    /// Positions each cache holds.
    capacity: usize,
    /// The most tokens one pass takes.
    max_rows: usize,
    /// The positions of a pass's tokens.
    positions: Vec<u32>,
    /// The sequence of each of a pass's tokens.
    seqs: Vec<usize>,
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
    /// Per linear slot, what its adapter keeps for the rows.
    xa: Vec<AdapterActs>,
    no_adapter: AdapterActs,
    zeros_c: Vec<f32>,
    /// The logits of the last pass's rows, (rows, V).
    all_logits: Vec<f32>,
    /// The last token's logits: what predicts the next one.
    pub logits: Vec<f32>,
    /// The token ids of a batched pass.
    ids: Vec<u32>,
}

/// One sequence's cached keys and values.
struct KvCache {
    /// Per layer, keys of every cached position, transposed: (n_kv_head, D, capacity), so that
    /// a query's scores are a sum of contiguous rows, one per dimension.
    k: Vec<Vec<f32>>,
    /// Per layer, values of every cached position: (capacity, n_kv_head, D).
    v: Vec<Vec<f32>>,
    len: usize,
}

impl Decoder {
    /// A decoder of one sequence that feeds one token per pass.
    pub fn new(model: &Model) -> Self {
        Self::with_rows(model, 1)
    }

    /// A decoder of one sequence that feeds up to `max_rows` tokens per pass.
    pub fn with_rows(model: &Model, max_rows: usize) -> Self {
        Self::with_caches(model, max_rows, 1, model.cfg.block_size)
    }

    /// A decoder of `sequences` sequences of up to `capacity` positions each (at most the
    /// block size), fed one token of each in a pass by [`Decoder::feed_each`].
    pub fn batched(model: &Model, sequences: usize, capacity: usize) -> Self {
        Self::with_caches(model, sequences, sequences, capacity)
    }

    fn with_caches(model: &Model, max_rows: usize, sequences: usize, capacity: usize) -> Self {
        let cfg = &model.cfg;
        let (c, f, r) = (cfg.n_embd, cfg.ffn_hidden, max_rows.max(1));
        let ckv = cfg.n_kv_head * cfg.head_dim();
        let fused = cfg.arch == Arch::Gpt2;
        assert!(capacity <= cfg.block_size, "a cache of {capacity} positions for a block of {}", cfg.block_size);
        let z = |n: usize| vec![0.0f32; n];
        let cache = || KvCache {
            k: (0..cfg.n_layer).map(|_| z(capacity * ckv)).collect(),
            v: (0..cfg.n_layer).map(|_| z(capacity * ckv)).collect(),
            len: 0,
        };
        Decoder {
            caches: (0..sequences.max(1)).map(|_| cache()).collect(),
            capacity,
            max_rows: r,
            positions: vec![0; r],
            seqs: vec![0; r],
            x: z(r * c),
            n: z(r * c),
            stats: NormStats::new(r),
            qkv: zeros_if(fused, r * 3 * c),
            q: zeros_if(!fused, r * c),
            k_new: zeros_if(!fused, r * ckv),
            v_new: zeros_if(!fused, r * ckv),
            y: z(r * c),
            x_mid: z(r * c),
            h: z(r * f),
            u: z(r * f),
            g: z(r * f),
            xa: model.adapter_shapes().iter().map(|&shape| AdapterActs::new(r, shape)).collect(),
            no_adapter: AdapterActs::default(),
            zeros_c: z(c),
            all_logits: z(r * cfg.vocab_size),
            logits: z(cfg.vocab_size),
            ids: Vec::with_capacity(r),
        }
    }

    /// The most tokens one pass takes.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// Positions in the (first sequence's) cache.
    pub fn len(&self) -> usize {
        self.len_of(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Positions in sequence `s`'s cache.
    pub fn len_of(&self, s: usize) -> usize {
        self.caches[s].len
    }
    /// Forget every cached position (of the first sequence).
    pub fn clear(&mut self) {
        self.clear_seq(0);
    }
    /// Forget every cached position of sequence `s`: it starts again at position 0.
    pub fn clear_seq(&mut self, s: usize) {
        self.caches[s].len = 0;
    }
    /// Forget the cached positions from `len` on (the rejected tokens of a speculation). The
    /// logits are stale until the next pass.
    pub fn truncate(&mut self, len: usize) {
        let c = &mut self.caches[0];
        c.len = c.len.min(len);
    }

    /// Feed one token at the next position; `self.logits` then predicts the one after it.
    ///
    /// # Panics
    /// If the cache already holds `block_size` positions (call [`Decoder::clear`] and feed a
    /// shorter context again).
    pub fn step(&mut self, model: &Model, p: &ParamMap, token: u32) -> &[f32] {
        self.extend(model, p, &[token]);
        &self.logits
    }

    /// Feed `tokens` at the next positions in one pass; returns each one's logits (predicting
    /// the token after it), (tokens, V), and leaves the last row in `self.logits`.
    ///
    /// # Panics
    /// If there are more tokens than the decoder takes per pass, or than the cache has room for.
    pub fn extend(&mut self, model: &Model, p: &ParamMap, tokens: &[u32]) -> &[f32] {
        let (rows, pos) = (tokens.len(), self.len());
        assert!(rows >= 1 && rows <= self.max_rows, "{rows} tokens in a pass of at most {}", self.max_rows);
        assert!(pos + rows <= self.capacity, "the KV cache is full ({pos} positions)");
        self.seqs[..rows].fill(0);
        self.positions[..rows].iter_mut().enumerate().for_each(|(r, a)| *a = (pos + r) as u32);
        self.pass(model, p, tokens);
        self.logits.copy_from_slice(&self.all_logits[(rows - 1) * model.cfg.vocab_size..rows * model.cfg.vocab_size]);
        &self.all_logits[..rows * model.cfg.vocab_size]
    }

    /// Feed each `(sequence, token)` at the next position of that sequence, all in one pass (a
    /// sequence at most once); returns each row's logits, (rows, V), predicting the token after
    /// it.
    ///
    /// # Panics
    /// If a sequence appears twice, or its cache is full.
    pub fn feed_each(&mut self, model: &Model, p: &ParamMap, tokens: &[(usize, u32)]) -> &[f32] {
        let rows = tokens.len();
        assert!(rows >= 1 && rows <= self.max_rows, "{rows} tokens in a pass of at most {}", self.max_rows);
        let mut ids = std::mem::take(&mut self.ids);
        ids.clear();
        for (r, &(s, id)) in tokens.iter().enumerate() {
            assert!(!tokens[..r].iter().any(|t| t.0 == s), "sequence {s} twice in one pass");
            let pos = self.caches[s].len;
            assert!(pos < self.capacity, "the KV cache of sequence {s} is full ({pos} positions)");
            (self.seqs[r], self.positions[r]) = (s, pos as u32);
            ids.push(id);
        }
        self.pass(model, p, &ids);
        self.ids = ids;
        &self.all_logits[..rows * model.cfg.vocab_size]
    }

    /// One pass over `tokens`, row r at position `positions[r]` of sequence `seqs[r]`: every
    /// row's key and value go into its cache, each row attends to its cache up to its own
    /// position, and the rows' logits land in `all_logits`.
    fn pass(&mut self, model: &Model, p: &ParamMap, tokens: &[u32]) {
        let cfg = &model.cfg;
        let (rows, c, f, v) = (tokens.len(), cfg.n_embd, cfg.ffn_hidden, cfg.vocab_size);
        let (d, eps, cap) = (cfg.head_dim(), cfg.norm_eps, self.capacity);
        let group = cfg.n_head / cfg.n_kv_head;
        let ckv = cfg.n_kv_head * d;
        let (at, seqs) = (&self.positions[..rows], &self.seqs[..rows]);
        // Attention's work: each row against its cached positions.
        let work: usize = at.iter().map(|&a| (a as usize + 1) * c).sum();
        let (x, n, y, x_mid) =
            (&mut self.x[..rows * c], &mut self.n[..rows * c], &mut self.y[..rows * c], &mut self.x_mid[..rows * c]);
        let (h, u, g) = (&mut self.h[..rows * f], &mut self.u[..rows * f], &mut self.g[..rows * f]);
        model.embed(p, tokens, at, x);
        for (l, blk) in model.blocks.iter().enumerate() {
            blk.norm1.forward(p, x, n, &mut self.stats, eps, &self.zeros_c);
            let fused = cfg.arch == Arch::Gpt2;
            let qkv = if fused { &mut self.qkv[..rows * 3 * c] } else { &mut self.qkv[..] };
            let q = if fused { &mut self.q[..] } else { &mut self.q[..rows * c] };
            let (k_new, v_new) = if fused {
                (&mut self.k_new[..], &mut self.v_new[..])
            } else {
                (&mut self.k_new[..rows * ckv], &mut self.v_new[..rows * ckv])
            };
            let qkv = model.project_qkv(blk, p, n, at, qkv, q, k_new, v_new, &mut self.xa);
            // Row r's q, k and v (gpt2: side by side, H = Hkv).
            let row = |r: usize| -> (&[f32], &[f32], &[f32]) {
                match &qkv {
                    QkvIn::Fused(all) => {
                        let row = &all[r * 3 * c..(r + 1) * 3 * c];
                        (&row[..ckv], &row[ckv..2 * ckv], &row[2 * ckv..])
                    }
                    QkvIn::Split { q, k, v } => {
                        (&q[r * c..(r + 1) * c], &k[r * ckv..(r + 1) * ckv], &v[r * ckv..(r + 1) * ckv])
                    }
                }
            };
            // Every row's key and value into its cache, then each row attends to its cache up
            // to its own position.
            for r in 0..rows {
                let (_, kr, vr) = row(r);
                let (cache, at) = (&mut self.caches[seqs[r]], at[r] as usize);
                for (j, kj) in kr.iter().enumerate() {
                    cache.k[l][j * cap + at] = *kj;
                }
                cache.v[l][at * ckv..(at + 1) * ckv].copy_from_slice(vr);
            }
            let caches = &self.caches;
            let head = |i: usize, out: &mut [f32]| {
                let (r, hd) = (i / cfg.n_head, i % cfg.n_head);
                let (q, kv) = (&row(r).0[hd * d..(hd + 1) * d], hd / group);
                let cache = &caches[seqs[r]];
                let keys = &cache.k[l][kv * d * cap..(kv + 1) * d * cap];
                let len = at[r] as usize + 1;
                with_scratch(len, |scores| attend_head(q, keys, cap, &cache.v[l], kv, cfg, scores, out));
            };
            // Fed alone, a short context is not worth handing out.
            if work < PARALLEL_ATTENTION {
                y.chunks_mut(d).enumerate().for_each(|(i, out)| head(i, out));
            } else {
                y.par_chunks_mut(d).enumerate().for_each(|(i, out)| head(i, out));
            }
            blk.o.forward(p, y, x_mid, rows, &mut self.xa[blk.o.slot]);
            x_mid.iter_mut().zip(x.iter()).for_each(|(m, r)| *m += r);
            blk.norm2.forward(p, x_mid, n, &mut self.stats, eps, &self.zeros_c);
            model.mlp_forward(blk, p, n, h, u, g, x, &mut self.xa);
            x.iter_mut().zip(x_mid.iter()).for_each(|(o, m)| *o += m);
        }
        model.norm_f.forward(p, x, n, &mut self.stats, eps, &self.zeros_c);
        model.head.forward(p, n, &mut self.all_logits[..rows * v], rows, &mut self.no_adapter);
        for (&s, &a) in seqs.iter().zip(at) {
            let cache = &mut self.caches[s];
            cache.len = cache.len.max(a as usize + 1);
        }
    }
}

simd_fn! {
    /// One head of one query row (D) against the first `scores.len()` cached positions: its keys
    /// `keys` (D, cap), transposed, and the values (len, Hkv, D) of key/value head `kv`. Each
    /// score sums over the dimensions in order; the softmax of the scaled scores, in order of
    /// position, weights the values.
    #[allow(clippy::too_many_arguments)]
    fn attend_head(
        q: &[f32],
        keys: &[f32],
        cap: usize,
        v: &[f32],
        kv: usize,
        cfg: &ModelConfig,
        scores: &mut [f32],
        y: &mut [f32],
    ) {
        let (h_kv, d, len) = (cfg.n_kv_head, cfg.head_dim(), scores.len());
        let scale = 1.0 / (d as f32).sqrt();
        scores.fill(0.0);
        for (j, qj) in q.iter().enumerate() {
            let kj = &keys[j * cap..j * cap + len];
            scores.iter_mut().zip(kj).for_each(|(s, k)| *s += qj * k);
        }
        let mut max = f32::NEG_INFINITY;
        for s in scores.iter_mut() {
            *s *= scale;
            max = max.max(*s);
        }
        // The exponentials in one loop (it vectorizes), their sum in order in another.
        scores.iter_mut().for_each(|s| *s = exp_fast(*s - max));
        let sum = scores.iter().fold(0.0f32, |sum, s| sum + s);
        y.fill(0.0);
        for (s, score) in scores.iter().enumerate() {
            let w = score / sum;
            let vs = &v[(s * h_kv + kv) * d..(s * h_kv + kv + 1) * d];
            y.iter_mut().zip(vs).for_each(|(o, v)| *o += w * v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::random;

    /// [`attend_head`] against the plain formula, bit for bit: each score sums its products in
    /// order of dimension from zero, then the softmax (with `exp_fast`) weights the values in
    /// order of position. Lengths from one position to the whole cache, heads of 8 and 72
    /// dimensions.
    #[test]
    fn attention_against_the_cache_is_the_plain_formula() {
        for cfg in [ModelConfig::llama(11, 80, 1, 1, 1, 72), ModelConfig::llama(11, 80, 1, 4, 2, 32)] {
            check_heads(&cfg);
        }
    }

    fn check_heads(cfg: &ModelConfig) {
        let (d, h_kv, cap) = (cfg.head_dim(), cfg.n_kv_head, cfg.block_size);
        let q = random(d, 1);
        let keys = random(h_kv * d * cap, 2);
        let v = random(cap * h_kv * d, 3);
        for len in [1, 7, 31, 32, 33, 64, 79, 80] {
            for kv in 0..h_kv {
                let kt = &keys[kv * d * cap..(kv + 1) * d * cap];
                let (mut scores, mut y) = (vec![f32::NAN; len], vec![f32::NAN; d]);
                attend_head(&q, kt, cap, &v, kv, cfg, &mut scores, &mut y);
                let scale = 1.0 / (d as f32).sqrt();
                let raw: Vec<f32> =
                    (0..len).map(|s| (0..d).fold(0.0f32, |acc, j| acc + q[j] * kt[j * cap + s]) * scale).collect();
                let max = raw.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
                let e: Vec<f32> = raw.iter().map(|x| exp_fast(x - max)).collect();
                let sum = e.iter().fold(0.0f32, |a, x| a + x);
                let mut want = vec![0.0f32; d];
                for (s, es) in e.iter().enumerate() {
                    let w = es / sum;
                    for (o, vv) in want.iter_mut().zip(&v[(s * h_kv + kv) * d..(s * h_kv + kv + 1) * d]) {
                        *o += w * vv;
                    }
                }
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y), bits(&want), "len {len}, kv head {kv}");
            }
        }
    }
}
