//! `tinygpt bench`: what this machine can do and how close training comes to it.
//!
//! - the FMA peak, from a microbenchmark of independent fused multiply-add chains (AVX-512F or
//!   AVX2+FMA on x86-64, NEON on aarch64, chosen at run time; plain `mul_add` elsewhere);
//! - matmul throughput for every shape the two reference models use, forward and backward;
//! - training steps of the two reference models: step time, tokens/s, MFU, a per-kernel time
//!   breakdown, and peak memory against the sum of what training must hold;
//! - decoding at batch 1 in f32, int8 and int4, and speculative decoding with an int8 copy of
//!   the model as its draft.
//!
//! Returns figures (serializable, for `tinygpt bench --json`); the binary prints them.

use std::time::Instant;

use serde::Serialize;

use crate::nn::batch::Batch;
use crate::nn::kernels::adamw::AdamW;
use crate::nn::kernels::matmul::{matmul, Dims, Layout};
use crate::nn::kernels::Precision;
use crate::nn::lora::{a_name, b_name, is_adapter, LoraConfig};
use crate::nn::model::{Model, ModelConfig};
use crate::nn::optim::{AdamWState, TensorOpt};
use crate::nn::params::{ParamMap, Tensor};
use crate::nn::profile;
use crate::nn::rng::SplitMix64;
use crate::nn::step::{train_step, CrossEntropy, LossMean, StepConfig, StepWork, Trainable};

/// One of the two models issue 4 measures, with its batch shape.
#[derive(Clone, Copy, Debug)]
pub struct BenchModel {
    pub name: &'static str,
    pub cfg: ModelConfig,
    pub batch: usize,
    pub steps: usize,
}

/// nanoGPT's CPU recipe for tiny Shakespeare, and a larger gpt2 (6 x 384, block 256).
pub fn reference_models() -> [BenchModel; 2] {
    [
        BenchModel { name: "shakespeare_char", cfg: ModelConfig::gpt2(65, 64, 4, 4, 128, false), batch: 12, steps: 20 },
        BenchModel { name: "gpt2-6x384", cfg: ModelConfig::gpt2(65, 256, 6, 6, 384, false), batch: 8, steps: 3 },
    ]
}

/// The pool of `threads` threads, built once per thread count and kept: a fresh pool per
/// measurement starts with sleeping workers, which a short product may finish without.
fn pool(threads: usize) -> std::sync::Arc<rayon::ThreadPool> {
    use std::sync::{Arc, Mutex};
    static POOLS: Mutex<Vec<(usize, Arc<rayon::ThreadPool>)>> = Mutex::new(Vec::new());
    let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = pools.iter().find(|(t, _)| *t == threads) {
        return p.clone();
    }
    let p = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a thread pool"));
    pools.push((threads, p.clone()));
    p
}

/// Seeded operands of a product with dims `d`, values in [-1, 1): a (m * k), then b (k * n).
fn operands(d: Dims, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = SplitMix64::new(seed);
    let mut fill = |n: usize| (0..n).map(|_| rng.unit() as f32 * 2.0 - 1.0).collect::<Vec<f32>>();
    (fill(d.m * d.k), fill(d.k * d.n))
}

/// A short digest of how this machine's matmul rounds: the bits of one fixed product, long
/// enough in `k` to cross matrixmultiply's blocking. matrixmultiply picks its micro-kernel at
/// run time (AVX-512, AVX2+FMA, AVX, NEON or portable), and kernels that round differently
/// train different weights from the same recipe: two machines can train the same bits only if
/// their fingerprints agree (the golden digests of training stages are kept per fingerprint).
pub fn matmul_fingerprint() -> String {
    let d = Dims { m: 9, k: 600, n: 20 };
    let (a, b) = operands(d, 0x6d61_746d_756c);
    let mut out = vec![0.0f32; d.m * d.n];
    matmul(&a, Layout::Normal, &b, Layout::Normal, &mut out, d, false);
    let bytes: Vec<u8> = out.iter().flat_map(|x| x.to_le_bytes()).collect();
    blake3::hash(&bytes).to_hex()[..12].to_string()
}

/// The vector instructions this CPU offers that the FMA loop and matrixmultiply's kernels use,
/// detected at run time, best first.
#[derive(Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)] // each target builds only its own variants
enum Simd {
    Avx512f,
    Avx2Fma,
    /// AVX without FMA: matrixmultiply has a kernel for it, the FMA loop does not.
    Avx,
    Neon,
    Portable,
}

impl Simd {
    fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Simd::Avx512f;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Simd::Avx2Fma;
            }
            if std::is_x86_feature_detected!("avx") {
                return Simd::Avx;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            return Simd::Neon;
        }
        #[allow(unreachable_code)]
        Simd::Portable
    }
}

/// Which FMA loop the peak measurement uses on this machine.
pub fn fma_isa() -> &'static str {
    match Simd::detect() {
        Simd::Avx512f => "avx512f",
        Simd::Avx2Fma => "avx2+fma",
        Simd::Neon => "neon",
        Simd::Avx | Simd::Portable => "portable",
    }
}

/// Which micro-kernel matrixmultiply runs on this machine: its run-time dispatch, restated
/// (AVX-512F first, built in through the crate's `avx512` feature; then AVX2+FMA, AVX, NEON,
/// and its portable kernel).
pub fn matmul_kernel() -> &'static str {
    match Simd::detect() {
        Simd::Avx512f => "avx512f (16x16)",
        Simd::Avx2Fma => "avx2+fma (8x8)",
        Simd::Avx => "avx (8x8)",
        Simd::Neon => "neon (8x8)",
        Simd::Portable => "portable (8x4)",
    }
}

/// Runs `iters` iterations of independent FMA chains; returns the flops done and a value that
/// keeps the work alive.
fn fma_loop(iters: u64) -> (f64, f32) {
    match Simd::detect() {
        // SAFETY: the features were detected at run time.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512f => unsafe { fma_avx512(iters) },
        // SAFETY: the features were detected at run time.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2Fma => unsafe { fma_avx2(iters) },
        // SAFETY: NEON is part of the aarch64 baseline.
        #[cfg(target_arch = "aarch64")]
        Simd::Neon => unsafe { fma_neon(iters) },
        _ => fma_portable(iters),
    }
}

/// Twelve chains: enough to cover FMA latency times the ports on current cores.
const CHAINS: usize = 12;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_avx512(iters: u64) -> (f64, f32) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(0.0); CHAINS];
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    for _ in 0..iters {
        for x in &mut acc {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    let mut sum = _mm512_set1_ps(0.0);
    for x in acc {
        sum = _mm512_add_ps(sum, x);
    }
    ((iters as usize * CHAINS * 16 * 2) as f64, _mm512_reduce_add_ps(sum))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_avx2(iters: u64) -> (f64, f32) {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(0.0); CHAINS];
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    for _ in 0..iters {
        for x in &mut acc {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    let mut out = [0.0f32; 8];
    let mut sum = _mm256_set1_ps(0.0);
    for x in acc {
        sum = _mm256_add_ps(sum, x);
    }
    _mm256_storeu_ps(out.as_mut_ptr(), sum);
    ((iters as usize * CHAINS * 8 * 2) as f64, out.iter().sum())
}

#[cfg(target_arch = "aarch64")]
unsafe fn fma_neon(iters: u64) -> (f64, f32) {
    use std::arch::aarch64::*;
    let mut acc = [vdupq_n_f32(0.0); CHAINS];
    let (a, b) = (vdupq_n_f32(0.999_999), vdupq_n_f32(1e-7));
    for _ in 0..iters {
        for x in &mut acc {
            *x = vfmaq_f32(b, *x, a);
        }
    }
    let mut sum = 0.0f32;
    for x in acc {
        sum += vaddvq_f32(x);
    }
    ((iters as usize * CHAINS * 4 * 2) as f64, sum)
}

fn fma_portable(iters: u64) -> (f64, f32) {
    let mut acc = [0.0f32; CHAINS * 8];
    for _ in 0..iters {
        for x in &mut acc {
            *x = x.mul_add(0.999_999, 1e-7);
        }
    }
    ((iters as usize * CHAINS * 8 * 2) as f64, acc.iter().sum())
}

/// Peak FMA throughput in GFLOP/s with `threads` threads each running its own chains.
pub fn fma_peak(threads: usize) -> f64 {
    let iters = 20_000_000u64;
    let pool = pool(threads);
    let run = || {
        let start = Instant::now();
        let flops: f64 = pool
            .broadcast(|_| {
                let (flops, keep) = fma_loop(iters);
                std::hint::black_box(keep);
                flops
            })
            .iter()
            .sum();
        flops / start.elapsed().as_secs_f64() / 1e9
    };
    run(); // warm the cores up
    (0..7).map(|_| run()).fold(0.0, f64::max)
}

/// One matmul the models run: `op(a) (m, k) @ op(b) (k, n)`.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub what: &'static str,
    pub d: Dims,
    pub la: Layout,
    pub lb: Layout,
}

/// Every matmul shape of one forward and backward of a gpt2 with this batch shape.
pub fn matmul_shapes(cfg: &ModelConfig, batch: usize) -> Vec<Shape> {
    let (rows, c, f, v) = (batch * cfg.block_size, cfg.n_embd, cfg.ffn_hidden, cfg.vocab_size);
    let (n, t) = (Layout::Normal, Layout::Transposed);
    let mut out = Vec::new();
    // Conv1D layers: forward x W (in, out); backward dx = dy W^T, dW = x^T dy.
    for (what, cin, cout) in [("c_attn", c, 3 * c), ("attn c_proj", c, c), ("c_fc", c, f), ("mlp c_proj", f, c)] {
        out.push(Shape { what, d: Dims { m: rows, k: cin, n: cout }, la: n, lb: n });
        out.push(Shape { what, d: Dims { m: rows, k: cout, n: cin }, la: n, lb: t });
        out.push(Shape { what, d: Dims { m: cin, k: rows, n: cout }, la: t, lb: n });
    }
    // The tied head: logits = x wte^T; dx = dlogits wte; dwte = dlogits^T x.
    out.push(Shape { what: "lm_head", d: Dims { m: rows, k: c, n: v }, la: n, lb: t });
    out.push(Shape { what: "lm_head", d: Dims { m: rows, k: v, n: c }, la: n, lb: n });
    out.push(Shape { what: "lm_head", d: Dims { m: v, k: rows, n: c }, la: t, lb: n });
    out
}

/// GFLOP/s of `matmul` on this shape with `threads` threads (best of a few runs).
pub fn matmul_gflops(s: &Shape, threads: usize) -> f64 {
    let d = s.d;
    let (a, b) = operands(d, 1);
    let mut out = vec![0.0f32; d.m * d.n];
    let flops = 2.0 * (d.m * d.k * d.n) as f64;
    let reps = ((2e8 / flops) as usize).clamp(1, 1000);
    pool(threads).install(|| {
        matmul(&a, s.la, &b, s.lb, &mut out, d, false);
        (0..5)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..reps {
                    matmul(&a, s.la, &b, s.lb, &mut out, d, false);
                }
                flops * reps as f64 / start.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
    })
}

/// Training throughput of one reference model.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    /// Mean seconds per step (the breakdown's shares are of this).
    pub step_seconds: f64,
    /// The fastest, the median and the slowest step: on a shared machine one slow step can
    /// move the mean, and the spread shows it.
    pub step_spread: [f64; 3],
    pub tokens_per_s: f64,
    /// The model FLOPs of the step's forward and backward per token
    /// ([`Model::flops_per_token`]: nanoGPT's `6 N + 12 L H D T` when every weight trains;
    /// fewer for frozen weights; recomputation not counted).
    pub flops_per_token: f64,
    /// Seconds per step in each kind of kernel, and "other" (the rest of the step).
    #[serde(serialize_with = "as_map")]
    pub breakdown: Vec<(&'static str, f64)>,
    /// Resident-set high-water mark while training, if the OS reports it.
    pub peak_bytes: Option<u64>,
    /// Resident set before the model was built (the binary, the runtime, earlier allocations).
    pub baseline_bytes: Option<u64>,
    /// Parameters, gradients, both AdamW moments and the activations backward needs.
    pub needed_bytes: u64,
}

impl StepReport {
    /// Seconds per step in one kind of kernel of the breakdown (0 if it has none).
    pub fn seconds_in(&self, kind: &str) -> f64 {
        self.breakdown.iter().find(|(k, _)| *k == kind).map_or(0.0, |(_, s)| *s)
    }
}

/// Linux's peak resident set size, reset first so the figure covers only what follows. Memory
/// freed earlier (the matmul benchmark, the previous model) is first handed back to the OS, or
/// the new model would reuse it unseen and the growth would read too low.
fn reset_peak() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim only releases free memory; it takes no pointer.
        unsafe { malloc_trim(0) };
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A `/proc/self/status` size in bytes: `VmHWM` (peak) or `VmRSS` (now).
fn status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The kernel-time breakdown as a JSON object, kinds in the breakdown's order.
fn as_map<S: serde::Serializer>(kinds: &[(&'static str, f64)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(kinds.len()))?;
    for (name, seconds) in kinds {
        map.serialize_entry(name, seconds)?;
    }
    map.end()
}

/// Greedy decoding speed of one kind of weights.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeSpeed {
    /// `f32`, `int8` or `int4`.
    pub weights: &'static str,
    pub tokens_per_s: f64,
    /// Bytes of the weights as stored (packed values and scales for the quantized layers).
    pub weight_bytes: usize,
}

/// Decoding at batch 1: greedy tokens/s of one model's weights in f32, int8 and int4 (RTN,
/// groups of 32, every linear layer of the blocks), each the median of three runs of
/// `tokens` tokens after a warm-up, with the bytes of its weights.
pub fn decode_speeds(cfg: &ModelConfig, tokens: usize, threads: usize) -> Vec<DecodeSpeed> {
    use crate::nn::decoder::Decoder;
    use crate::nn::quant::{rtn_linears, Scheme};
    pool(threads).install(|| {
        let f32_params = cfg.init(1);
        let variants = [
            ("f32", f32_params.clone()),
            ("int8", rtn_linears(cfg, &f32_params, Scheme { bits: 8, group_size: 32, symmetric: true })),
            ("int4", rtn_linears(cfg, &f32_params, Scheme { bits: 4, group_size: 32, symmetric: false })),
        ];
        variants
            .into_iter()
            .map(|(label, p)| {
                let model = Model::new(*cfg, &p);
                let mut dec = Decoder::new(&model);
                let mut run = || {
                    dec.clear();
                    let start = Instant::now();
                    let mut token = 0u32;
                    for _ in 0..tokens.min(cfg.block_size) {
                        let logits = dec.step(&model, &p, token);
                        token = crate::nn::sample::argmax(logits) as u32;
                    }
                    tokens.min(cfg.block_size) as f64 / start.elapsed().as_secs_f64()
                };
                run();
                let rate = median3([run(), run(), run()]);
                let bytes = p
                    .iter()
                    .map(|(name, t)| {
                        let q = p.quantized(p.id(name).expect("a name of the map"));
                        q.map_or(4 * t.data().len(), |q| q.bytes())
                    })
                    .sum();
                DecodeSpeed { weights: label, tokens_per_s: rate, weight_bytes: bytes }
            })
            .collect()
    })
}

/// Speculative decoding at batch 1, greedy: the model verifies tokens proposed by an int8 copy
/// of itself (RTN, groups of 32, every linear layer of the blocks).
#[derive(Clone, Debug, Serialize)]
pub struct SpeculativeSpeed {
    pub draft: &'static str,
    /// Tokens the draft proposes per round.
    pub draft_tokens: usize,
    /// The share of proposals the model kept.
    pub acceptance: f64,
    pub plain_tokens_per_s: f64,
    pub speculative_tokens_per_s: f64,
    /// One pass of the model over `draft_tokens + 1` tokens (a verification), in single-token
    /// steps: what a round costs besides the draft's steps.
    pub verify_pass_in_steps: f64,
    /// Whether speculation generated plain decoding's tokens, as greedy decoding must.
    pub same_tokens: bool,
}

/// [`SpeculativeSpeed`] of `cfg`'s seeded weights over `tokens` tokens from an empty prompt,
/// the median of three timed runs of each after a warm-up.
pub fn speculative_speed(cfg: &ModelConfig, tokens: usize, draft_tokens: usize, threads: usize) -> SpeculativeSpeed {
    use crate::generate::{generate_with_draft, Draft, GenOptions, LoadedModel};
    use crate::nn::decoder::Decoder;
    use crate::nn::quant::{rtn_linears, Scheme};
    use crate::nn::sample::Sampling;
    pool(threads).install(|| {
        let params = cfg.init(1);
        let loaded = |params: ParamMap| LoadedModel {
            model: Model::new(*cfg, &params),
            params,
            tokenizer: crate::tokenize::byte_tokenizer(),
            eot: 0,
        };
        let int8 = rtn_linears(cfg, &params, Scheme { bits: 8, group_size: 32, symmetric: true });
        let (target, draft) = (loaded(params), loaded(int8));
        let opts = GenOptions {
            sampling: Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 },
            max_new_tokens: tokens,
            seed: 1,
            stop_at_eot: false,
        };
        let run = |draft: Option<Draft>| {
            let start = Instant::now();
            let (text, stats) =
                generate_with_draft(&target, draft, "", opts, |_| {}).expect("the prompt and vocabularies fit");
            (stats.tokens as f64 / start.elapsed().as_secs_f64(), text, stats)
        };
        let draft = Some(Draft { lm: &draft, tokens: draft_tokens });
        let (mut plain, mut spec) = (Vec::new(), Vec::new());
        let (mut plain_text, mut spec_text, mut acceptance) = (String::new(), String::new(), 0.0);
        for i in 0..4 {
            let (rate, text, _) = run(None);
            let (spec_rate, text_with_draft, stats) = run(draft);
            if i > 0 {
                plain.push(rate);
                spec.push(spec_rate);
            }
            (plain_text, spec_text, acceptance) = (text, text_with_draft, stats.acceptance());
        }
        // A verification pass against single steps, both from the same cached context.
        let t = &target;
        let context: Vec<u32> = (0..cfg.block_size as u32 / 2).map(|i| i % cfg.vocab_size as u32).collect();
        let proposals: Vec<u32> = (0..draft_tokens as u32 + 1).collect();
        let mut dec = Decoder::with_rows(&t.model, proposals.len());
        for part in context.chunks(proposals.len()) {
            dec.extend(&t.model, &t.params, part);
        }
        let mut time = |pass: bool| {
            let start = Instant::now();
            for _ in 0..20 {
                if pass {
                    dec.extend(&t.model, &t.params, &proposals);
                } else {
                    dec.step(&t.model, &t.params, proposals[0]);
                }
                dec.truncate(context.len());
            }
            start.elapsed().as_secs_f64()
        };
        time(true);
        let (pass, step) =
            (median3([time(true), time(true), time(true)]), median3([time(false), time(false), time(false)]));
        SpeculativeSpeed {
            draft: "int8",
            draft_tokens,
            acceptance,
            plain_tokens_per_s: median3([plain[0], plain[1], plain[2]]),
            speculative_tokens_per_s: median3([spec[0], spec[1], spec[2]]),
            verify_pass_in_steps: pass / step,
            same_tokens: plain_text == spec_text,
        }
    })
}

fn median3(mut x: [f64; 3]) -> f64 {
    x.sort_by(f64::total_cmp);
    x[1]
}

/// How [`train_steps`] trains: every weight, or with `lora_rank` LoRA adapters of that rank on
/// every linear layer of a frozen model, or with `frozen` (and no rank) a frozen model with a
/// rank-1 adapter on its first linear layer only (forward and the input gradients down to
/// that layer, as far as adapters on every layer need them: the step an adapter's approaches
/// as its own products cost nothing); with `checkpointed`, activation checkpointing; its
/// weight products in `precision`; each batch in `shards` shards (the recipe key); the
/// adapters' inputs dropped with probability `lora_dropout` (the recipe key; 0: none); with
/// `dora` (and a rank), DoRA adapters.
#[derive(Clone, Copy, Debug)]
pub struct Training {
    pub lora_rank: Option<usize>,
    pub lora_dropout: f32,
    pub dora: bool,
    pub frozen: bool,
    pub checkpointed: bool,
    pub precision: Precision,
    pub shards: usize,
}

impl Default for Training {
    fn default() -> Self {
        Training {
            lora_rank: None,
            lora_dropout: 0.0,
            dora: false,
            frozen: false,
            checkpointed: false,
            precision: Precision::default(),
            shards: 1,
        }
    }
}

/// One model set up to train on random tokens as a [`Training`] says, stepped one step at a
/// time (so that two can take turns).
struct Run {
    model: Model,
    params: ParamMap,
    grads: ParamMap,
    opt: AdamWState,
    opts: Vec<TensorOpt>,
    work: StepWork,
    batches: [Batch; 1],
    rng: SplitMix64,
    vocab: usize,
    lora_dropout: f32,
}

impl Run {
    fn new(m: &BenchModel, how: Training) -> Self {
        let Training { lora_rank, lora_dropout, dora, frozen, checkpointed, precision, shards } = how;
        let cfg = m.cfg;
        let mut params = cfg.init(1);
        let lora = lora_rank.map(|r| LoraConfig { dora, ..LoraConfig::on_every_linear(&cfg, r, 2.0 * r as f32) });
        if let Some(lora) = &lora {
            lora.add(&cfg, &mut params, 2);
        }
        if frozen && lora.is_none() {
            // A rank-1 adapter on the first linear layer only: backward goes as far down as
            // with an adapter on every layer.
            let first = &cfg.linear_modules()[0];
            params.insert(a_name(&first.path), Tensor::zeros(&[1, first.cin]));
            params.insert(b_name(&first.path), Tensor::zeros(&[first.cout, 1]));
        }
        let model = Model::with_lora_scale(cfg, &params, lora.as_ref().map_or(1.0, LoraConfig::scale))
            .with_precision(precision)
            .with_lora_dropout(lora_dropout);
        let grads =
            if frozen || lora.is_some() { params.zeros_like_trainable(is_adapter) } else { params.zeros_like() };
        let opt = AdamWState::new(&grads);
        let work = StepWork::new(&model, m.batch, cfg.block_size, shards, checkpointed, &grads);
        let opts = TensorOpt::defaults(&params);
        let batches = [Batch::new(m.batch, cfg.block_size)];
        Run {
            model,
            params,
            grads,
            opt,
            opts,
            work,
            batches,
            rng: SplitMix64::new(2),
            vocab: cfg.vocab_size,
            lora_dropout,
        }
    }

    /// One training step on fresh random tokens; its seconds.
    fn step(&mut self) -> f64 {
        let start = Instant::now();
        for batch in &mut self.batches {
            batch.ids.iter_mut().chain(batch.targets.iter_mut()).for_each(|id| *id = self.rng.below(self.vocab) as u32);
            batch.dropout_seed = (self.lora_dropout > 0.0).then(|| self.rng.next_u64());
        }
        let step_cfg = StepConfig {
            adamw: AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 },
            grad_clip: 1.0,
            mean: LossMean::PerMicroBatch,
        };
        let trainable =
            Trainable { params: &mut self.params, grads: &mut self.grads, opt: &mut self.opt, opts: &self.opts };
        train_step(&self.model, trainable, &mut self.work, &self.batches, step_cfg, &mut CrossEntropy::default());
        start.elapsed().as_secs_f64()
    }
}

/// Train `m` for `m.steps` steps on random tokens with `threads` threads, as `how` says.
pub fn train_steps(m: &BenchModel, threads: usize, how: Training) -> StepReport {
    pool(threads).install(|| {
        reset_peak();
        let baseline_bytes = status_bytes("VmRSS:");
        let t = m.cfg.block_size;
        let mut run = Run::new(m, how);
        run.step(); // warm-up
        profile::enable(true);
        let start = Instant::now();
        let mut times: Vec<f64> = (0..m.steps).map(|_| run.step()).collect();
        let total = start.elapsed().as_secs_f64();
        times.sort_by(f64::total_cmp);
        let step_spread = [times[0], times[times.len() / 2], times[times.len() - 1]];
        let kinds = profile::seconds();
        profile::enable(false);
        let step_seconds = total / m.steps as f64;
        let mut breakdown: Vec<(&'static str, f64)> =
            kinds.iter().map(|(_, name, s)| (*name, s / m.steps as f64)).collect();
        let known: f64 = breakdown.iter().map(|(_, s)| s).sum();
        breakdown.push(("other", (step_seconds - known).max(0.0)));
        let n_params = run.params.num_elements();
        let trainable = run.grads.num_elements();
        let flops_per_token = run.model.flops_per_token(&run.params, &run.grads, t);
        StepReport {
            step_seconds,
            step_spread,
            tokens_per_s: (m.batch * t) as f64 / step_seconds,
            flops_per_token,
            breakdown,
            peak_bytes: status_bytes("VmHWM:"),
            baseline_bytes,
            needed_bytes: (4 * (n_params + 3 * trainable) + run.work.bytes()) as u64,
        }
    })
}

/// Two ways of training one model compared step by step: the speed ratio of `b` over `a`.
#[derive(Clone, Debug, Serialize)]
pub struct PairedSpeed {
    /// Pairs of steps taken, `a`'s then `b`'s.
    pub pairs: usize,
    /// The median over the pairs of `a`'s step time over `b`'s (above 1: `b` is faster).
    pub median_ratio: f64,
    /// The least and the greatest pair's ratio.
    pub ratio_range: [f64; 2],
}

/// `m` set up both ways at once, each warmed up by a step, then `pairs` pairs of steps in
/// turn (`a`, then `b`) on `threads` threads. On a shared machine whose speed drifts from one
/// second to the next, two steps taken back to back see about the same machine, so the median
/// of the pairs' ratios moves less than a ratio of two separate runs' medians.
pub fn paired_steps(m: &BenchModel, threads: usize, a: Training, b: Training, pairs: usize) -> PairedSpeed {
    pool(threads).install(|| {
        let (mut first, mut second) = (Run::new(m, a), Run::new(m, b));
        first.step();
        second.step();
        let mut ratios: Vec<f64> = (0..pairs.max(1)).map(|_| first.step() / second.step()).collect();
        ratios.sort_by(f64::total_cmp);
        PairedSpeed {
            pairs: ratios.len(),
            median_ratio: ratios[ratios.len() / 2],
            ratio_range: [ratios[0], ratios[ratios.len() - 1]],
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fma_loop_counts_its_flops_and_computes_the_same_chain() {
        // x -> 0.999999 x + 1e-7 from 0, n times: the same value on every path (up to rounding).
        let (flops, value) = fma_portable(1000);
        assert_eq!(flops, (1000 * CHAINS * 8 * 2) as f64);
        let (dispatched_flops, dispatched) = fma_loop(1000);
        let lanes = dispatched_flops / (1000 * CHAINS * 2) as f64;
        let per_chain = |v: f32, lanes: f64| v as f64 / (CHAINS as f64 * lanes);
        assert!((per_chain(value, 8.0) - per_chain(dispatched, lanes)).abs() < 1e-9, "{value} vs {dispatched}");
        assert!(per_chain(value, 8.0) > 9.9e-5, "the chains ran");
    }

    #[test]
    fn the_matmul_fingerprint_does_not_depend_on_the_thread_count() {
        let (one, two) = (pool(1).install(matmul_fingerprint), pool(2).install(matmul_fingerprint));
        assert_eq!(one, two);
        assert_eq!(one.len(), 12);
    }

    #[test]
    fn the_shape_list_covers_each_linear_three_times_and_the_head() {
        let cfg = ModelConfig::gpt2(65, 64, 4, 4, 128, false);
        let shapes = matmul_shapes(&cfg, 12);
        assert_eq!(shapes.len(), 5 * 3);
        let flops: usize = shapes.iter().map(|s| 2 * s.d.m * s.d.k * s.d.n).sum();
        // Forward + backward is three times the forward's 2 * rows * (weights of one layer + head).
        let per_layer = 128 * 384 + 128 * 128 + 2 * 128 * 512;
        assert_eq!(flops, 3 * 2 * 768 * (per_layer + 128 * 65));
    }

    #[test]
    fn speculation_with_the_int8_copy_keeps_plain_decoding_tokens() {
        let cfg = ModelConfig::gpt2(11, 16, 1, 2, 32, false);
        let s = speculative_speed(&cfg, 40, 3, 2);
        assert!(s.same_tokens, "greedy speculation changed the text: {s:?}");
        assert!((0.0..=1.0).contains(&s.acceptance) && s.acceptance > 0.0, "{s:?}");
        assert!(s.plain_tokens_per_s > 0.0 && s.speculative_tokens_per_s > 0.0 && s.verify_pass_in_steps > 0.0);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["draft"], "int8");
        assert_eq!(json["draft_tokens"], 3);
    }

    #[test]
    fn a_profiled_step_times_its_matmuls_and_counts_its_memory() {
        let m = BenchModel { name: "tiny", cfg: ModelConfig::gpt2(11, 8, 1, 2, 16, false), batch: 2, steps: 2 };
        let r = train_steps(&m, 1, Training::default());
        assert!(r.breakdown.iter().any(|(name, s)| *name == "matmuls" && *s > 0.0));
        let [fastest, median, slowest] = r.step_spread;
        assert!(0.0 < fastest && fastest <= median && median <= slowest, "{:?}", r.step_spread);
        assert!(fastest <= r.step_seconds * 1.0001, "the mean step is faster than the fastest: {r:?}");
        assert!(r.needed_bytes > 16 * m.cfg.init(0).num_elements() as u64);
        if let (Some(peak), Some(base)) = (r.peak_bytes, r.baseline_bytes) {
            assert!(peak >= base, "the peak {peak} is below the resident set {base} it started from");
        }
        // A second shard holds gradients of its own.
        let sharded = train_steps(&m, 1, Training { shards: 2, ..Training::default() });
        let gradients = 4 * m.cfg.init(0).num_elements() as u64;
        assert!(sharded.needed_bytes >= r.needed_bytes + gradients, "{} vs {}", sharded.needed_bytes, r.needed_bytes);
        // LoRA keeps the frozen weights but no gradients or moments for them.
        let lora = train_steps(&m, 1, Training { lora_rank: Some(2), ..Training::default() });
        assert!(lora.needed_bytes < r.needed_bytes, "{} vs {}", lora.needed_bytes, r.needed_bytes);
        // Dropout on the adapters' inputs keeps no dropped copy of them.
        let dropout = train_steps(&m, 1, Training { lora_rank: Some(2), lora_dropout: 0.1, ..Training::default() });
        assert_eq!(dropout.needed_bytes, lora.needed_bytes);
        // DoRA keeps each adapted product for its magnitude's gradient, and with dropout no more.
        let dora = train_steps(&m, 1, Training { lora_rank: Some(2), dora: true, ..Training::default() });
        assert!(dora.needed_bytes > lora.needed_bytes, "{} vs {}", dora.needed_bytes, lora.needed_bytes);
        let dora_with_dropout = Training { lora_rank: Some(2), dora: true, lora_dropout: 0.1, ..Training::default() };
        let dora_dropout = train_steps(&m, 1, dora_with_dropout);
        assert_eq!(dora_dropout.needed_bytes, dora.needed_bytes);
        // Checkpointing holds one block's activations and every block's input (three layers).
        let deep = BenchModel { cfg: ModelConfig::gpt2(11, 8, 3, 2, 16, false), ..m };
        let lora = train_steps(&deep, 1, Training { lora_rank: Some(2), ..Training::default() });
        assert!(lora.seconds_in("adapters") > 0.0, "the adapters' work outside the products is timed as theirs");
        let frozen = train_steps(&deep, 1, Training { frozen: true, ..Training::default() });
        assert!(frozen.needed_bytes < lora.needed_bytes, "{} vs {}", frozen.needed_bytes, lora.needed_bytes);
        let both = train_steps(&deep, 1, Training { lora_rank: Some(2), checkpointed: true, ..Training::default() });
        assert!(both.needed_bytes < lora.needed_bytes, "{} vs {}", both.needed_bytes, lora.needed_bytes);
        // Each step's FLOPs are its own: frozen weights skip their gradients, adapters add
        // theirs, and recomputation is not counted.
        let full = train_steps(&deep, 1, Training::default());
        assert!(frozen.flops_per_token < lora.flops_per_token && lora.flops_per_token < full.flops_per_token);
        assert_eq!(both.flops_per_token, lora.flops_per_token);
    }

    /// Each run trains what its `Training` says (a LoRA run moves its adapters and leaves the
    /// frozen weights' bits alone), and the paired comparison reports every pair.
    #[test]
    fn paired_runs_train_in_turn_and_report_each_pair() {
        let m = BenchModel { name: "tiny", cfg: ModelConfig::gpt2(11, 8, 2, 2, 16, false), batch: 2, steps: 2 };
        let lora = Training { lora_rank: Some(2), ..Training::default() };
        let mut run = Run::new(&m, lora);
        let before = run.params.clone();
        run.step();
        run.step();
        for (name, t) in before.iter() {
            let now = run.params.get(name);
            let same = t.data().iter().zip(now).all(|(x, y)| x.to_bits() == y.to_bits());
            assert_eq!(same, !is_adapter(name), "{name}: frozen weights keep their bits, adapters train");
        }
        let paired = paired_steps(&m, 1, Training::default(), lora, 5);
        let [least, most] = paired.ratio_range;
        assert_eq!(paired.pairs, 5);
        assert!(0.0 < least && least <= paired.median_ratio && paired.median_ratio <= most, "{paired:?}");
    }
}
