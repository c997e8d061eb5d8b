//! The training step's kernels other than the weight products, at the shapes of the two
//! reference models' steps: GELU (exact, as nanoGPT), LayerNorm, attention (in f32 and in
//! bf16, on AMX where there is AMX) and AdamW, forward and backward, on every thread.
//! Microseconds per call, best of 30.
//!
//! Run with `cargo bench -p stages --bench elementwise`; run it again with
//! `TINYGPT_SIMD=portable` to time the portable kernels (the same bits, only slower). Prints
//! figures; asserts nothing.

use std::time::Instant;

use stages::nn::kernels::activation::{gelu_backward, gelu_forward, Gelu};
use stages::nn::kernels::adamw::{adamw_step, AdamW};
use stages::nn::kernels::attention::{attention_backward, attention_forward, AttnDims, QkvIn, QkvOut};
use stages::nn::kernels::norm::{layernorm_backward, layernorm_forward};
use stages::nn::kernels::{isa, Precision};

struct Shape {
    name: &'static str,
    batch: usize,
    t: usize,
    heads: usize,
    c: usize,
    params: usize,
}

fn main() {
    // On a thread of the pool, as a training stage runs: each kernel's parallel loop then
    // starts on the calling thread instead of being handed to the pool from outside, a wait
    // for a sleeping thread that would be timed with it.
    rayon::scope(|_| shapes());
}

fn shapes() {
    println!("elementwise kernels: {}, {} threads", isa().name(), rayon::current_num_threads());
    for s in [
        Shape { name: "shakespeare_char", batch: 12, t: 64, heads: 4, c: 128, params: 804_224 },
        Shape { name: "gpt2-6x384", batch: 8, t: 256, heads: 6, c: 384, params: 30_000_000 },
    ] {
        // `cargo bench --bench elementwise -- NAME` times one model's shapes.
        if std::env::args().skip(1).filter(|a| !a.starts_with('-')).all(|a| a == s.name) {
            run(&s);
        }
    }
}

fn values(len: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32 - 0.5) * 4.0
        })
        .collect()
}

/// Best of 30 calls, in microseconds.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    (0..30)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e6
        })
        .fold(f64::MAX, f64::min)
}

fn run(s: &Shape) {
    let rows = s.batch * s.t;
    let hidden = 4 * s.c;
    println!("{}: {rows} rows of {} (MLP {hidden}), {} heads", s.name, s.c, s.heads);

    let x = values(rows * hidden, 1);
    let dout = values(rows * hidden, 2);
    let mut out = vec![0.0; rows * hidden];
    let forward = time(|| gelu_forward(Gelu::Erf, &x, &mut out));
    let backward = time(|| gelu_backward(Gelu::Erf, &dout, &x, &mut out));
    println!("  GELU (erf) over {rows} x {hidden}: forward {forward:.0} us, backward {backward:.0} us");

    let (x, dout) = (values(rows * s.c, 3), values(rows * s.c, 4));
    let (w, b) = (values(s.c, 5), values(s.c, 6));
    let (mut out, mut dx) = (vec![0.0; rows * s.c], vec![0.0; rows * s.c]);
    let (mut mean, mut rstd) = (vec![0.0; rows], vec![0.0; rows]);
    let (mut dw, mut db) = (vec![0.0; s.c], vec![0.0; s.c]);
    let forward = time(|| layernorm_forward(&x, &w, &b, 1e-5, &mut out, &mut mean, &mut rstd, s.c));
    let backward = time(|| layernorm_backward(&dout, &x, &w, &mean, &rstd, &mut dx, &mut dw, &mut db, s.c));
    println!("  LayerNorm over {rows} x {}: forward {forward:.0} us, backward {backward:.0} us", s.c);

    let n = AttnDims { b: s.batch, t: s.t, h: s.heads, h_kv: s.heads, d: s.c / s.heads };
    let qkv = values(rows * 3 * s.c, 7);
    let dout = values(rows * s.c, 8);
    let pos: Vec<u32> = (0..rows).map(|r| (r % s.t) as u32).collect();
    let (mut out, mut stats) = (vec![0.0; rows * s.c], vec![0.0; s.batch * s.heads * s.t * 2]);
    let mut dqkv = vec![0.0; rows * 3 * s.c];
    for precision in [Precision::F32, Precision::Bf16] {
        let forward = time(|| attention_forward(QkvIn::Fused(&qkv), &pos, &mut out, &mut stats, n, precision));
        let backward = time(|| {
            attention_backward(&dout, QkvIn::Fused(&qkv), &pos, &stats, QkvOut::Fused(&mut dqkv), n, precision)
        });
        println!(
            "  attention {precision:?}, {} x {} heads of {}: forward {forward:.0} us, backward {backward:.0} us",
            s.batch, s.heads, n.d
        );
    }

    let opt = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
    let grad = values(s.params, 9);
    let (mut p, mut m, mut v) = (values(s.params, 10), vec![0.0; s.params], vec![0.0; s.params]);
    let mut step = 0;
    let update = time(|| {
        step += 1;
        adamw_step(opt, step, &mut p, &grad, &mut m, &mut v)
    });
    println!("  AdamW over {} parameters: {update:.0} us", s.params);
}
