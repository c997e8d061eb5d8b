//! The GPT-2 architecture (the model nanoGPT trains): token and learned position embeddings,
//! pre-LayerNorm blocks of causal multi-head attention and a GELU MLP (4x), a final LayerNorm,
//! and the output projection tied to the token embedding.
//!
//! Parameters use Hugging Face `GPT2LMHeadModel` names and layouts: `Conv1D` weights are stored
//! (in, out), so a linear layer is `y = x @ W + b`. With `bias = false` (nanoGPT's option) no
//! bias exists, in linear layers or LayerNorms.
//!
//! Explicit forward (saving what backward needs in [`Activations`]) and backward; every loss
//! ends in a gradient on the logits.

use crate::nn::kernels::activation::{gelu_backward, gelu_forward};
use crate::nn::kernels::attention::{attention_backward, attention_forward, AttnDims};
use crate::nn::kernels::cross_entropy::cross_entropy_forward_backward;
use crate::nn::kernels::embedding::{embedding_backward, embedding_forward};
use crate::nn::kernels::matmul::{matmul, Dims, Layout};
use crate::nn::kernels::norm::{layernorm_backward, layernorm_forward};
use crate::nn::params::{ParamMap, Tensor};
use crate::nn::rng::SplitMix64;

const LN_EPS: f32 = 1e-5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub block_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub bias: bool,
}

fn layer(l: usize, name: &str) -> String {
    format!("transformer.h.{l}.{name}")
}

impl Gpt2Config {
    /// Every parameter's Hugging Face name and shape.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (c, b) = (self.n_embd, self.bias);
        let mut out = vec![
            ("transformer.wte.weight".to_string(), vec![self.vocab_size, c]),
            ("transformer.wpe.weight".to_string(), vec![self.block_size, c]),
        ];
        let mut push = |name: String, shape: Vec<usize>, is_bias: bool| {
            if b || !is_bias {
                out.push((name, shape));
            }
        };
        for l in 0..self.n_layer {
            for (name, shape, is_bias) in [
                ("ln_1.weight", vec![c], false),
                ("ln_1.bias", vec![c], true),
                ("attn.c_attn.weight", vec![c, 3 * c], false),
                ("attn.c_attn.bias", vec![3 * c], true),
                ("attn.c_proj.weight", vec![c, c], false),
                ("attn.c_proj.bias", vec![c], true),
                ("ln_2.weight", vec![c], false),
                ("ln_2.bias", vec![c], true),
                ("mlp.c_fc.weight", vec![c, 4 * c], false),
                ("mlp.c_fc.bias", vec![4 * c], true),
                ("mlp.c_proj.weight", vec![4 * c, c], false),
                ("mlp.c_proj.bias", vec![c], true),
            ] {
                push(layer(l, name), shape, is_bias);
            }
        }
        push("transformer.ln_f.weight".into(), vec![c], false);
        push("transformer.ln_f.bias".into(), vec![c], true);
        out
    }

    /// GPT-2's initialisation: weights normal(0, 0.02), residual projections (`c_proj`) scaled
    /// by 1/sqrt(2 n_layer), LayerNorm weights 1, biases 0. Each tensor draws from its own
    /// stream (seed, index in name order), so adding a parameter does not move the others.
    pub fn init(&self, seed: u64) -> ParamMap {
        let mut params = ParamMap::default();
        for (i, (name, shape)) in self.shapes().into_iter().enumerate() {
            let mut t = Tensor::zeros(&shape);
            if name.contains(".ln_") {
                if name.ends_with("weight") {
                    t.data_mut().fill(1.0);
                }
            } else if name.ends_with("weight") {
                let std =
                    if name.ends_with("c_proj.weight") { 0.02 / (2.0 * self.n_layer as f64).sqrt() } else { 0.02 };
                let mut rng = SplitMix64::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                t.data_mut().iter_mut().for_each(|w| *w = (rng.normal() * std) as f32);
            }
            params.insert(name, t);
        }
        params
    }
}

/// What one block's forward saves for its backward.
struct BlockActs {
    x_in: Vec<f32>,
    ln1: Vec<f32>,
    ln1_stats: (Vec<f32>, Vec<f32>),
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    y: Vec<f32>,
    x_mid: Vec<f32>,
    ln2: Vec<f32>,
    ln2_stats: (Vec<f32>, Vec<f32>),
    h: Vec<f32>,
    g: Vec<f32>,
}

/// Every buffer a training step needs, allocated once for a (batch, time) shape.
pub struct Activations {
    b: usize,
    t: usize,
    blocks: Vec<BlockActs>,
    x_final: Vec<f32>,
    lnf: Vec<f32>,
    lnf_stats: (Vec<f32>, Vec<f32>),
    pub logits: Vec<f32>,
    // Backward scratch.
    dlogits: Vec<f32>,
    dx: Vec<f32>,
    dtmp: Vec<f32>,
    dc: Vec<f32>,
    dqkv: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dwide: Vec<f32>,
    dwide2: Vec<f32>,
    qkv: Vec<f32>,
    zeros_c: Vec<f32>,
}

impl Activations {
    pub fn new(cfg: &Gpt2Config, b: usize, t: usize) -> Self {
        assert!(t <= cfg.block_size, "sequence of {t} is longer than the block size {}", cfg.block_size);
        let (rows, c, v) = (b * t, cfg.n_embd, cfg.vocab_size);
        let z = |n: usize| vec![0.0f32; n];
        let block = || BlockActs {
            x_in: z(rows * c),
            ln1: z(rows * c),
            ln1_stats: (z(rows), z(rows)),
            q: z(rows * c),
            k: z(rows * c),
            v: z(rows * c),
            att: z(b * cfg.n_head * t * t),
            y: z(rows * c),
            x_mid: z(rows * c),
            ln2: z(rows * c),
            ln2_stats: (z(rows), z(rows)),
            h: z(rows * 4 * c),
            g: z(rows * 4 * c),
        };
        Activations {
            b,
            t,
            blocks: (0..cfg.n_layer).map(|_| block()).collect(),
            x_final: z(rows * c),
            lnf: z(rows * c),
            lnf_stats: (z(rows), z(rows)),
            logits: z(rows * v),
            dlogits: z(rows * v),
            dx: z(rows * c),
            dtmp: z(rows * c),
            dc: z(rows * c),
            dqkv: z(rows * 3 * c),
            dq: z(rows * c),
            dk: z(rows * c),
            dv: z(rows * c),
            dwide: z(rows * 4 * c),
            dwide2: z(rows * 4 * c),
            qkv: z(rows * 3 * c),
            zeros_c: z(c),
        }
    }
}

/// `out (rows, cout) = x (rows, cin) @ w (cin, cout) + bias`.
fn linear_forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, out: &mut [f32], rows: usize, cin: usize, cout: usize) {
    matmul(x, Layout::Normal, w, Layout::Normal, out, Dims { m: rows, k: cin, n: cout }, false);
    if let Some(bias) = bias {
        for row in out.chunks_mut(cout) {
            row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
        }
    }
}

/// Gradients of [`linear_forward`]: writes `dx`, adds into `dw` and `dbias`.
#[allow(clippy::too_many_arguments)]
fn linear_backward(
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    dbias: Option<&mut [f32]>,
    rows: usize,
    cin: usize,
    cout: usize,
) {
    matmul(dout, Layout::Normal, w, Layout::Transposed, dx, Dims { m: rows, k: cout, n: cin }, false);
    matmul(x, Layout::Transposed, dout, Layout::Normal, dw, Dims { m: cin, k: rows, n: cout }, true);
    if let Some(db) = dbias {
        for row in dout.chunks(cout) {
            db.iter_mut().zip(row).for_each(|(d, g)| *d += g);
        }
    }
}

fn opt<'a>(p: &'a ParamMap, name: &str) -> Option<&'a [f32]> {
    p.contains(name).then(|| p.get(name))
}

/// Forward pass: fills `acts` and `acts.logits` (B * T, V) for the token ids (B * T).
pub fn forward(cfg: &Gpt2Config, p: &ParamMap, ids: &[u32], acts: &mut Activations) {
    let (b, t, c, v) = (acts.b, acts.t, cfg.n_embd, cfg.vocab_size);
    let rows = b * t;
    assert_eq!(ids.len(), rows, "ids are not B * T");
    let n = AttnDims { b, t, h: cfg.n_head, h_kv: cfg.n_head, d: c / cfg.n_head };
    // x = wte[ids] + wpe[position]
    let mut x = std::mem::take(&mut acts.x_final);
    embedding_forward(ids, p.get("transformer.wte.weight"), &mut x, c);
    let wpe = p.get("transformer.wpe.weight");
    for (r, row) in x.chunks_mut(c).enumerate() {
        let pos = r % t;
        row.iter_mut().zip(&wpe[pos * c..(pos + 1) * c]).for_each(|(a, w)| *a += w);
    }
    for l in 0..cfg.n_layer {
        let a = &mut acts.blocks[l];
        let zeros = acts.zeros_c.as_slice();
        let ln_b = |name: &str| opt(p, &layer(l, name)).unwrap_or(zeros);
        a.x_in.copy_from_slice(&x);
        layernorm_forward(
            &x,
            p.get(&layer(l, "ln_1.weight")),
            ln_b("ln_1.bias"),
            LN_EPS,
            &mut a.ln1,
            &mut a.ln1_stats.0,
            &mut a.ln1_stats.1,
            c,
        );
        linear_forward(
            &a.ln1,
            p.get(&layer(l, "attn.c_attn.weight")),
            opt(p, &layer(l, "attn.c_attn.bias")),
            &mut acts.qkv,
            rows,
            c,
            3 * c,
        );
        // (B*T, 3C) -> q, k, v each (B, T, H, D): the heads of q are the first C columns.
        for (r, row) in acts.qkv.chunks(3 * c).enumerate() {
            a.q[r * c..(r + 1) * c].copy_from_slice(&row[..c]);
            a.k[r * c..(r + 1) * c].copy_from_slice(&row[c..2 * c]);
            a.v[r * c..(r + 1) * c].copy_from_slice(&row[2 * c..]);
        }
        attention_forward(&a.q, &a.k, &a.v, &mut a.y, &mut a.att, n);
        linear_forward(
            &a.y,
            p.get(&layer(l, "attn.c_proj.weight")),
            opt(p, &layer(l, "attn.c_proj.bias")),
            &mut a.x_mid,
            rows,
            c,
            c,
        );
        a.x_mid.iter_mut().zip(&x).for_each(|(m, r)| *m += r);
        layernorm_forward(
            &a.x_mid,
            p.get(&layer(l, "ln_2.weight")),
            ln_b("ln_2.bias"),
            LN_EPS,
            &mut a.ln2,
            &mut a.ln2_stats.0,
            &mut a.ln2_stats.1,
            c,
        );
        linear_forward(
            &a.ln2,
            p.get(&layer(l, "mlp.c_fc.weight")),
            opt(p, &layer(l, "mlp.c_fc.bias")),
            &mut a.h,
            rows,
            c,
            4 * c,
        );
        gelu_forward(&a.h, &mut a.g);
        linear_forward(
            &a.g,
            p.get(&layer(l, "mlp.c_proj.weight")),
            opt(p, &layer(l, "mlp.c_proj.bias")),
            &mut x,
            rows,
            4 * c,
            c,
        );
        x.iter_mut().zip(&a.x_mid).for_each(|(o, m)| *o += m);
    }
    let lnf_b = opt(p, "transformer.ln_f.bias").unwrap_or(&acts.zeros_c);
    layernorm_forward(
        &x,
        p.get("transformer.ln_f.weight"),
        lnf_b,
        LN_EPS,
        &mut acts.lnf,
        &mut acts.lnf_stats.0,
        &mut acts.lnf_stats.1,
        c,
    );
    acts.x_final = x;
    // Tied output: logits = lnf @ wte^T.
    matmul(
        &acts.lnf,
        Layout::Normal,
        p.get("transformer.wte.weight"),
        Layout::Transposed,
        &mut acts.logits,
        Dims { m: rows, k: c, n: v },
        false,
    );
}

/// Forward, mean cross-entropy against `targets`, and backward: adds every parameter's
/// gradient into `grads` (same names as `p`). Returns the loss.
pub fn forward_backward(
    cfg: &Gpt2Config,
    p: &ParamMap,
    ids: &[u32],
    targets: &[u32],
    acts: &mut Activations,
    grads: &mut ParamMap,
) -> f32 {
    forward(cfg, p, ids, acts);
    let (b, t, c, v) = (acts.b, acts.t, cfg.n_embd, cfg.vocab_size);
    let rows = b * t;
    let n = AttnDims { b, t, h: cfg.n_head, h_kv: cfg.n_head, d: c / cfg.n_head };
    let loss = cross_entropy_forward_backward(&acts.logits, targets, v, 0.0, &mut acts.dlogits);

    let wte = p.get("transformer.wte.weight");
    matmul(&acts.dlogits, Layout::Normal, wte, Layout::Normal, &mut acts.dtmp, Dims { m: rows, k: v, n: c }, false);
    matmul(
        &acts.dlogits,
        Layout::Transposed,
        &acts.lnf,
        Layout::Normal,
        grads.get_mut("transformer.wte.weight"),
        Dims { m: v, k: rows, n: c },
        true,
    );
    let lnf_bias = cfg.bias.then_some("transformer.ln_f.bias");
    let stats = &acts.lnf_stats;
    norm_backward(
        p,
        grads,
        "transformer.ln_f.weight",
        lnf_bias,
        &acts.dtmp,
        &acts.x_final,
        stats,
        &mut acts.dx,
        &acts.zeros_c,
    );

    for l in (0..cfg.n_layer).rev() {
        let a = &acts.blocks[l];
        // MLP: x_out = x_mid + c_proj(gelu(c_fc(ln2(x_mid)))); acts.dx is d x_out.
        linear_backward(
            &acts.dx,
            &a.g,
            p.get(&layer(l, "mlp.c_proj.weight")),
            &mut acts.dwide,
            grads.get_mut(&layer(l, "mlp.c_proj.weight")),
            None,
            rows,
            4 * c,
            c,
        );
        if cfg.bias {
            add_column_sums(&acts.dx, grads.get_mut(&layer(l, "mlp.c_proj.bias")), c);
        }
        gelu_backward(&acts.dwide, &a.h, &mut acts.dwide2);
        linear_backward(
            &acts.dwide2,
            &a.ln2,
            p.get(&layer(l, "mlp.c_fc.weight")),
            &mut acts.dtmp,
            grads.get_mut(&layer(l, "mlp.c_fc.weight")),
            None,
            rows,
            c,
            4 * c,
        );
        if cfg.bias {
            add_column_sums(&acts.dwide2, grads.get_mut(&layer(l, "mlp.c_fc.bias")), 4 * c);
        }
        let bias = cfg.bias.then(|| layer(l, "ln_2.bias"));
        norm_backward(
            p,
            grads,
            &layer(l, "ln_2.weight"),
            bias.as_deref(),
            &acts.dtmp,
            &a.x_mid,
            &a.ln2_stats,
            &mut acts.dc,
            &acts.zeros_c,
        );
        acts.dx.iter_mut().zip(&acts.dc).for_each(|(d, n)| *d += n); // d x_mid

        // Attention: x_mid = x_in + c_proj(attn(c_attn(ln1(x_in)))).
        linear_backward(
            &acts.dx,
            &a.y,
            p.get(&layer(l, "attn.c_proj.weight")),
            &mut acts.dtmp,
            grads.get_mut(&layer(l, "attn.c_proj.weight")),
            None,
            rows,
            c,
            c,
        );
        if cfg.bias {
            add_column_sums(&acts.dx, grads.get_mut(&layer(l, "attn.c_proj.bias")), c);
        }
        attention_backward(&acts.dtmp, &a.q, &a.k, &a.v, &a.att, &mut acts.dq, &mut acts.dk, &mut acts.dv, n);
        for (r, row) in acts.dqkv.chunks_mut(3 * c).enumerate() {
            row[..c].copy_from_slice(&acts.dq[r * c..(r + 1) * c]);
            row[c..2 * c].copy_from_slice(&acts.dk[r * c..(r + 1) * c]);
            row[2 * c..].copy_from_slice(&acts.dv[r * c..(r + 1) * c]);
        }
        linear_backward(
            &acts.dqkv,
            &a.ln1,
            p.get(&layer(l, "attn.c_attn.weight")),
            &mut acts.dtmp,
            grads.get_mut(&layer(l, "attn.c_attn.weight")),
            None,
            rows,
            c,
            3 * c,
        );
        if cfg.bias {
            add_column_sums(&acts.dqkv, grads.get_mut(&layer(l, "attn.c_attn.bias")), 3 * c);
        }
        let bias = cfg.bias.then(|| layer(l, "ln_1.bias"));
        norm_backward(
            p,
            grads,
            &layer(l, "ln_1.weight"),
            bias.as_deref(),
            &acts.dtmp,
            &a.x_in,
            &a.ln1_stats,
            &mut acts.dc,
            &acts.zeros_c,
        );
        acts.dx.iter_mut().zip(&acts.dc).for_each(|(d, n)| *d += n); // d x_in
    }
    embedding_backward(ids, &acts.dx, grads.get_mut("transformer.wte.weight"), c);
    let dwpe = grads.get_mut("transformer.wpe.weight");
    for (r, row) in acts.dx.chunks(c).enumerate() {
        let pos = r % t;
        dwpe[pos * c..(pos + 1) * c].iter_mut().zip(row).for_each(|(g, d)| *g += d);
    }
    loss
}

fn add_column_sums(dout: &[f32], db: &mut [f32], cols: usize) {
    for row in dout.chunks(cols) {
        db.iter_mut().zip(row).for_each(|(d, g)| *d += g);
    }
}

/// Backward of a LayerNorm with these parameter names: writes `dx`, adds into the weight (and
/// bias, when the model has biases) gradients.
#[allow(clippy::too_many_arguments)]
fn norm_backward(
    p: &ParamMap,
    grads: &mut ParamMap,
    weight: &str,
    bias: Option<&str>,
    dout: &[f32],
    x: &[f32],
    stats: &(Vec<f32>, Vec<f32>),
    dx: &mut [f32],
    zeros: &[f32],
) {
    // Copies of C floats: the map hands out one mutable tensor at a time.
    let mut dw = grads.get(weight).to_vec();
    let mut db = bias.map_or_else(|| zeros.to_vec(), |b| grads.get(b).to_vec());
    layernorm_backward(dout, x, p.get(weight), &stats.0, &stats.1, dx, &mut dw, &mut db, zeros.len());
    grads.get_mut(weight).copy_from_slice(&dw);
    if let Some(b) = bias {
        grads.get_mut(b).copy_from_slice(&db);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check_relative, random};

    fn tiny(bias: bool) -> Gpt2Config {
        Gpt2Config { vocab_size: 11, block_size: 4, n_layer: 2, n_head: 2, n_embd: 8, bias }
    }

    /// Random parameters of a useful size (the 0.02 init would make every gradient tiny).
    fn random_params(cfg: &Gpt2Config) -> ParamMap {
        let mut p = cfg.init(1);
        for (i, (_, t)) in p.iter_mut().enumerate() {
            let values = random(t.data().len(), 100 + i as u64);
            t.data_mut().iter_mut().zip(values).for_each(|(w, r)| *w = r * 0.5);
        }
        p
    }

    #[test]
    fn hugging_face_names_and_shapes() {
        let cfg = Gpt2Config { vocab_size: 50257, block_size: 1024, n_layer: 12, n_head: 12, n_embd: 768, bias: true };
        let p = cfg.init(0);
        // GPT-2 small has 124,439,808 parameters (the tied lm_head counted once).
        assert_eq!(p.num_elements(), 124_439_808);
        let shapes: std::collections::BTreeMap<String, Vec<usize>> = cfg.shapes().into_iter().collect();
        assert_eq!(shapes["transformer.h.0.attn.c_attn.weight"], vec![768, 2304]);
        assert_eq!(shapes["transformer.h.11.mlp.c_proj.weight"], vec![3072, 768]);
        assert!(!tiny(false).shapes().iter().any(|(n, _)| n.ends_with("bias")));
    }

    #[test]
    fn init_scales_residual_projections() {
        let cfg = Gpt2Config { vocab_size: 64, block_size: 16, n_layer: 4, n_head: 4, n_embd: 64, bias: false };
        let p = cfg.init(3);
        let std = |name: &str| {
            let d = p.get(name);
            (d.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / d.len() as f64).sqrt()
        };
        assert!((std("transformer.h.0.mlp.c_fc.weight") - 0.02).abs() < 0.002);
        assert!((std("transformer.h.0.mlp.c_proj.weight") - 0.02 / 8f64.sqrt()).abs() < 0.001);
        assert!(p.get("transformer.h.1.ln_2.weight").iter().all(|w| *w == 1.0));
    }

    #[test]
    fn whole_model_gradients_match_finite_differences() {
        for bias in [true, false] {
            let cfg = tiny(bias);
            let (b, t) = (2, 4);
            let ids: Vec<u32> = random(b * t, 7).iter().map(|r| ((r + 1.0) * 5.4) as u32).collect();
            let targets: Vec<u32> = random(b * t, 8).iter().map(|r| ((r + 1.0) * 5.4) as u32).collect();
            let params = random_params(&cfg);
            let mut acts = Activations::new(&cfg, b, t);
            let mut grads = params.zeros_like();
            forward_backward(&cfg, &params, &ids, &targets, &mut acts, &mut grads);
            let loss_of = |p: &ParamMap| -> f64 {
                let mut acts = Activations::new(&cfg, b, t);
                let mut g = p.zeros_like();
                forward_backward(&cfg, p, &ids, &targets, &mut acts, &mut g) as f64
            };
            for (name, analytic) in grads.iter() {
                check_relative(&format!("{name} (bias {bias})"), params.get(name), analytic.data(), |x| {
                    let mut p = params.clone();
                    p.get_mut(name).copy_from_slice(x);
                    loss_of(&p)
                });
            }
        }
    }

    #[test]
    fn gradients_accumulate_across_calls() {
        let cfg = tiny(true);
        let params = random_params(&cfg);
        let (ids, targets) = ([1u32, 2, 3, 4], [2u32, 3, 4, 5]);
        let mut acts = Activations::new(&cfg, 1, 4);
        let mut once = params.zeros_like();
        forward_backward(&cfg, &params, &ids, &targets, &mut acts, &mut once);
        let mut twice = params.zeros_like();
        forward_backward(&cfg, &params, &ids, &targets, &mut acts, &mut twice);
        forward_backward(&cfg, &params, &ids, &targets, &mut acts, &mut twice);
        for ((_, a), (_, b)) in once.iter().zip(twice.iter()) {
            assert!(a.data().iter().zip(b.data()).all(|(x, y)| (2.0 * x - y).abs() <= 1e-5 * (1.0 + y.abs())));
        }
    }

    /// `steps` AdamW steps on one fixed batch; returns the losses and the final parameters.
    fn train(cfg: &Gpt2Config, steps: u32, threads: usize) -> (Vec<f32>, ParamMap) {
        use crate::nn::kernels::adamw::{adamw_step, AdamW};
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let (b, t) = (2, cfg.block_size);
            let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % cfg.vocab_size) as u32).collect();
            let targets: Vec<u32> = (0..b * t).map(|i| ((i * 7 + 3) % cfg.vocab_size) as u32).collect();
            let mut params = cfg.init(5);
            let (mut grads, mut m, mut v) = (params.zeros_like(), params.zeros_like(), params.zeros_like());
            let mut acts = Activations::new(cfg, b, t);
            let opt = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0 };
            let mut losses = Vec::new();
            for step in 1..=steps {
                grads.fill_zero();
                losses.push(forward_backward(cfg, &params, &ids, &targets, &mut acts, &mut grads));
                let names: Vec<String> = params.iter().map(|(n, _)| n.to_string()).collect();
                for name in names {
                    let g = grads.get(&name).to_vec();
                    let mut mm = m.get(&name).to_vec();
                    let mut vv = v.get(&name).to_vec();
                    adamw_step(opt, step, params.get_mut(&name), &g, &mut mm, &mut vv);
                    m.get_mut(&name).copy_from_slice(&mm);
                    v.get_mut(&name).copy_from_slice(&vv);
                }
            }
            (losses, params)
        })
    }

    #[test]
    fn a_tiny_model_overfits_one_batch() {
        let cfg = Gpt2Config { vocab_size: 16, block_size: 8, n_layer: 2, n_head: 2, n_embd: 32, bias: true };
        let (losses, _) = train(&cfg, 150, 2);
        assert!((losses[0] - (16f32).ln()).abs() < 0.1, "starts near ln V: {}", losses[0]);
        assert!(*losses.last().unwrap() < 0.05, "memorised the batch: {:?}", &losses[losses.len() - 5..]);
    }

    #[test]
    fn one_and_two_threads_train_to_the_same_bits() {
        let cfg = Gpt2Config { vocab_size: 50, block_size: 70, n_layer: 1, n_head: 2, n_embd: 16, bias: false };
        let (l1, p1) = train(&cfg, 5, 1);
        let (l2, p2) = train(&cfg, 5, 2);
        assert_eq!(
            l1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            l2.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        for ((name, a), (_, b)) in p1.iter().zip(p2.iter()) {
            assert!(a.data().iter().zip(b.data()).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} differs");
        }
    }
}
