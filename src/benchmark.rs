//! `tinygpt bench`: runs [`stages::bench`]'s measurements and prints them as text, section by
//! section as they finish, or at the end as one JSON document (`--json`) for scripts such as
//! `benches/vs_pytorch.py`.

use serde_json::{json, Map, Value};
use stages::bench::{self, BenchModel, StepReport, Training};
use stages::nn::kernels::Precision;

use crate::output;

/// Where the figures go: printed as they come, or gathered into one JSON object.
struct Out {
    json: Option<Map<String, Value>>,
}

impl Out {
    fn text(&self, line: impl std::fmt::Display) {
        if self.json.is_none() {
            println!("{line}");
        }
    }
    fn table(&self, header: &[&str], rows: &[Vec<String>]) {
        if self.json.is_none() {
            print!("{}", output::table(header, rows));
        }
    }
    fn put(&mut self, key: &str, value: Value) {
        if let Some(map) = &mut self.json {
            map.insert(key.to_string(), value);
        }
    }
    /// In JSON mode, what runs now goes to stderr, so a long run is not silent.
    fn progress(&self, what: &str) {
        if self.json.is_some() {
            eprintln!("bench: {what}");
        }
    }
}

pub fn run(with_matmul: bool, steps: Option<usize>, json: bool, shards: usize) {
    let mut out = Out { json: json.then(Map::new) };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<usize> = if cores > 1 { vec![1, cores] } else { vec![1] };
    let (fma_isa, simd) = (bench::fma_isa(), stages::nn::kernels::isa().name());
    let (kernel, fingerprint) = (bench::matmul_kernel(), bench::matmul_fingerprint());
    out.text(format_args!(
        "machine: {} {}, {cores} threads, FMA loop {fma_isa}, elementwise kernels {simd} (TINYGPT_SIMD=portable forces portable)",
        std::env::consts::OS,
        std::env::consts::ARCH,
    ));
    out.text(format_args!(
        "matmul kernel {kernel}, fingerprint {fingerprint} (machines that print the same fingerprint round matmuls alike)"
    ));
    let peaks: Vec<f64> = threads.iter().map(|t| bench::fma_peak(*t)).collect();
    for (t, p) in threads.iter().zip(&peaks) {
        out.text(format_args!("fp32 FMA peak, {t} thread(s): {p:.1} GFLOP/s"));
    }
    out.put(
        "machine",
        json!({
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
            "cpu": cpu_name(),
            "threads": cores,
            "fma_isa": fma_isa,
            "elementwise_isa": simd,
            "matmul_kernel": kernel,
            "matmul_fingerprint": fingerprint,
            "fma_peak_gflops": threads.iter().zip(&peaks).map(|(t, p)| json!({"threads": t, "gflops": p})).collect::<Vec<_>>(),
        }),
    );
    // MFU divides by the best peak seen: measured again after each model, so that a peak read
    // while the machine was busy elsewhere cannot inflate it.
    let mut full_peak = *peaks.last().expect("at least one thread count");
    let models = bench::reference_models();
    if with_matmul {
        out.progress("matmul shapes");
        matmuls(&mut out, &models, &threads, &peaks);
    }
    let trained = Training { shards, ..Training::default() };
    let in_shards = if shards > 1 { format!(", each batch in {shards} shards") } else { String::new() };
    out.text(format_args!("\ntraining on {cores} thread(s), random tokens{in_shards}"));
    let mut reports = Vec::new();
    for mut m in models {
        if let Some(n) = steps {
            m.steps = n.max(1);
        }
        out.progress(m.name);
        let r = bench::train_steps(&m, cores, trained);
        full_peak = full_peak.max(bench::fma_peak(cores));
        let mfu = r.flops_per_token * r.tokens_per_s / 1e9 / full_peak;
        training(&out, &m, &r, mfu, full_peak, shards);
        let mut model = json!({
            "name": m.name,
            "n_layer": m.cfg.n_layer,
            "n_embd": m.cfg.n_embd,
            "batch": m.batch,
            "seq_len": m.cfg.block_size,
            "threads": cores,
            "shards": shards,
            "steps": m.steps,
            "mfu": mfu,
            "peak_gflops": full_peak,
            "step": r,
        });
        // The weight products in bf16; MFU still against the f32 FMA peak.
        let bf16 = bench::train_steps(&m, cores, Training { precision: Precision::Bf16, ..trained });
        let bf16_mfu = bf16.flops_per_token * bf16.tokens_per_s / 1e9 / full_peak;
        out.text(format_args!(
            "precision = \"bf16\" ({}): median {:.1} ms/step against {:.1} in f32 ({:.2}x), {:.0} tokens/s, \
             MFU {:.0}% of the f32 peak; matmuls {:.1} ms against {:.1}",
            if stages::nn::kernels::bf16::amx() { "AMX" } else { "emulated: no AMX here" },
            bf16.step_spread[1] * 1e3,
            r.step_spread[1] * 1e3,
            r.step_spread[1] / bf16.step_spread[1],
            bf16.tokens_per_s,
            100.0 * bf16_mfu,
            bf16.seconds_in("matmuls") * 1e3,
            r.seconds_in("matmuls") * 1e3,
        ));
        model["bf16"] = json!({"step": bf16, "mfu": bf16_mfu, "amx": stages::nn::kernels::bf16::amx()});
        // Fine-tuning the same shape with LoRA: the weight gradients and the moments of the
        // frozen model go, the adapters' small products come.
        let lora_r8 = Training { lora_rank: Some(8), ..trained };
        let lora = bench::train_steps(&m, cores, lora_r8);
        let lora_checkpointed = bench::train_steps(&m, cores, Training { checkpointed: true, ..lora_r8 });
        let lora_dropout = bench::train_steps(&m, cores, Training { lora_dropout: 0.1, ..lora_r8 });
        // DoRA: LoRA's products, each output rescaled, and the adapted product kept for backward.
        let dora_r8 = Training { dora: true, ..lora_r8 };
        let dora = bench::train_steps(&m, cores, dora_r8);
        let dora_dropout = bench::train_steps(&m, cores, Training { lora_dropout: 0.1, ..dora_r8 });
        for (what, l) in [
            ("LoRA r=8 on every linear layer", &lora),
            ("LoRA r=8 on every linear layer with activation checkpointing", &lora_checkpointed),
            ("LoRA r=8 on every linear layer with lora_dropout = 0.1", &lora_dropout),
            ("DoRA r=8 on every linear layer", &dora),
            ("DoRA r=8 on every linear layer with lora_dropout = 0.1", &dora_dropout),
        ] {
            out.text(format_args!(
                "{what}: median {:.1} ms/step against {:.1} for every weight \
                 ({:.2}x its speed, {:.2}x its FLOPs); needs {} against {} ({:.0}%)",
                l.step_spread[1] * 1e3,
                r.step_spread[1] * 1e3,
                r.step_spread[1] / l.step_spread[1],
                r.flops_per_token / l.flops_per_token,
                output::human_bytes(l.needed_bytes),
                output::human_bytes(r.needed_bytes),
                100.0 * l.needed_bytes as f64 / r.needed_bytes as f64
            ));
        }
        // Every weight frozen, a rank-1 adapter on the first layer only: what a LoRA step would
        // take if its adapters' products cost nothing.
        let frozen = bench::train_steps(&m, cores, Training { frozen: true, ..trained });
        out.text(format_args!(
            "every weight frozen, a rank-1 adapter on the first layer only: median {:.1} ms/step \
             ({:.2}x every weight's speed, {:.2}x its FLOPs), the bound of an adapter's step; LoRA r=8's \
             is {:.1} ms, {:.2}x the bound's time",
            frozen.step_spread[1] * 1e3,
            r.step_spread[1] / frozen.step_spread[1],
            r.flops_per_token / frozen.flops_per_token,
            lora.step_spread[1] * 1e3,
            lora.step_spread[1] / frozen.step_spread[1],
        ));
        // The same two ratios from steps taken in turn, which a drifting machine moves less.
        let pairs = (2 * m.steps).max(4);
        let lora_paired = bench::paired_steps(&m, cores, trained, lora_r8, pairs);
        let frozen_paired = bench::paired_steps(&m, cores, trained, Training { frozen: true, ..trained }, pairs);
        out.text(format_args!(
            "steps in turn with every weight's ({pairs} pairs, median of the pairs' ratios): LoRA r=8 {:.2}x its speed \
             ({:.2} to {:.2}), every weight frozen {:.2}x ({:.2} to {:.2})",
            lora_paired.median_ratio,
            lora_paired.ratio_range[0],
            lora_paired.ratio_range[1],
            frozen_paired.median_ratio,
            frozen_paired.ratio_range[0],
            frozen_paired.ratio_range[1],
        ));
        model["lora_r8_paired"] = json!(lora_paired);
        model["frozen_paired"] = json!(frozen_paired);
        // LoRA with the frozen base's products in bf16, against every weight in bf16.
        let lora_bf16 = bench::train_steps(&m, cores, Training { precision: Precision::Bf16, ..lora_r8 });
        out.text(format_args!(
            "LoRA r=8 with precision = \"bf16\": median {:.1} ms/step against {:.1} for every weight in bf16 \
             ({:.2}x its speed)",
            lora_bf16.step_spread[1] * 1e3,
            bf16.step_spread[1] * 1e3,
            bf16.step_spread[1] / lora_bf16.step_spread[1],
        ));
        model["lora_r8_bf16"] = json!(lora_bf16);
        model["lora_r8"] = json!(lora);
        model["lora_r8_checkpointed"] = json!(lora_checkpointed);
        model["lora_r8_dropout"] = json!(lora_dropout);
        model["dora_r8"] = json!(dora);
        model["dora_r8_dropout"] = json!(dora_dropout);
        model["frozen"] = json!(frozen);
        let decode = bench::decode_speeds(&m.cfg, 128, cores);
        let f32_rate = decode[0].tokens_per_s;
        let rows: Vec<Vec<String>> = decode
            .iter()
            .map(|d| {
                vec![
                    d.weights.to_string(),
                    format!("{:.0}", d.tokens_per_s),
                    format!("{:.2}x", d.tokens_per_s / f32_rate),
                    output::human_bytes(d.weight_bytes as u64),
                ]
            })
            .collect();
        out.text("decoding at batch 1, greedy, median of 3 x 128 tokens (int8, int4: RTN, groups of 32):");
        out.table(&["weights", "tokens/s", "vs f32", "weight bytes"], &rows);
        model["decode"] = json!(decode);
        let spec = bench::speculative_speed(&m.cfg, 128, 4, cores);
        out.text(format_args!(
            "speculative, the int8 copy as draft, {} tokens a round: {:.0}% kept, {:.0} against {:.0} tokens/s \
             ({:.2}x); a pass over {} tokens costs {:.2} single steps; {}",
            spec.draft_tokens,
            100.0 * spec.acceptance,
            spec.speculative_tokens_per_s,
            spec.plain_tokens_per_s,
            spec.speculative_tokens_per_s / spec.plain_tokens_per_s,
            spec.draft_tokens + 1,
            spec.verify_pass_in_steps,
            if spec.same_tokens { "same tokens as plain decoding" } else { "TOKENS DIFFER FROM PLAIN DECODING" },
        ));
        model["speculative"] = json!(spec);
        if with_matmul && cores > 1 {
            // How the step scales, against the FMA loop, which touches no memory: the gap is
            // what the cores cost each other (shared cache and memory).
            let one = bench::train_steps(&m, 1, trained);
            let fma_scaling = peaks[peaks.len() - 1] / peaks[0]; // all threads against one
            let scaling = one.step_spread[1] / r.step_spread[1];
            out.text(format_args!(
                "on 1 thread: median {:.1} ms/step; {cores} threads are {scaling:.2}x faster (the FMA loop: {fma_scaling:.2}x)",
                one.step_spread[1] * 1e3,
            ));
            model["one_thread"] = json!({"step": one, "scaling": scaling, "fma_scaling": fma_scaling});
        }
        reports.push(model);
    }
    out.put("models", Value::Array(reports));
    if let Some(map) = out.json {
        println!("{}", serde_json::to_string_pretty(&Value::Object(map)).expect("figures serialize"));
    }
}

/// The matmul table: every shape of both models at each thread count.
fn matmuls(out: &mut Out, models: &[BenchModel], threads: &[usize], peaks: &[f64]) {
    use stages::nn::kernels::matmul::Layout;
    out.text("\nmatmul: GFLOP/s and % of the FMA peak at that thread count");
    let (mut rows, mut records) = (Vec::new(), Vec::new());
    for m in models {
        for s in bench::matmul_shapes(&m.cfg, m.batch) {
            let layout = |l| if matches!(l, Layout::Transposed) { "T" } else { "N" };
            let ops = format!("{}{}", layout(s.la), layout(s.lb));
            let mut row =
                vec![m.name.to_string(), s.what.to_string(), format!("{}x{}x{}", s.d.m, s.d.k, s.d.n), ops.clone()];
            let mut at = Vec::new();
            for (t, peak) in threads.iter().zip(peaks) {
                let g = bench::matmul_gflops(&s, *t);
                row.push(format!("{g:.1} ({:.0}%)", 100.0 * g / peak));
                at.push(json!({"threads": t, "gflops": g, "of_peak": g / peak}));
            }
            rows.push(row);
            records.push(json!({
                "model": m.name, "layer": s.what, "m": s.d.m, "k": s.d.k, "n": s.d.n, "ops": ops, "runs": at,
            }));
        }
    }
    let mut header = vec!["model", "layer", "m x k x n", "ops"];
    let labels: Vec<String> = threads.iter().map(|t| format!("{t} thread(s)")).collect();
    header.extend(labels.iter().map(String::as_str));
    out.table(&header, &rows);
    out.put("matmul", Value::Array(records));
}

/// One model's training figures: the headline, the kernel breakdown, the spread and memory.
fn training(out: &Out, m: &BenchModel, r: &StepReport, mfu: f64, peak: f64, shards: usize) {
    out.text(format_args!(
        "\n{}: {} layers x {} wide, batch {} x {}: {:.1} ms/step, {:.0} tokens/s, {:.2} MFLOP/token, MFU {:.1}% \
         (of {peak:.1} GFLOP/s, the best peak so far)",
        m.name,
        m.cfg.n_layer,
        m.cfg.n_embd,
        m.batch,
        m.cfg.block_size,
        r.step_seconds * 1e3,
        r.tokens_per_s,
        r.flops_per_token / 1e6,
        100.0 * mfu,
    ));
    let rows: Vec<Vec<String>> = r
        .breakdown
        .iter()
        // A step without adapters has no adapters' row to show.
        .filter(|(name, s)| *name != "adapters" || *s > 0.0)
        .map(|(name, s)| {
            vec![name.to_string(), format!("{:.2}", s * 1e3), format!("{:.1}%", 100.0 * s / r.step_seconds)]
        })
        .collect();
    out.table(&["kernel", "ms/step", "share"], &rows);
    if shards > 1 {
        out.text("(the shards run side by side: each kernel's times add up over them, and can pass the step's)");
    }
    let [fastest, median, slowest] = r.step_spread.map(|s| s * 1e3);
    out.text(format_args!(
        "step times over {} steps: fastest {fastest:.1} ms, median {median:.1} ms, slowest {slowest:.1} ms",
        m.steps
    ));
    let needed = output::human_bytes(r.needed_bytes);
    match (r.peak_bytes, r.baseline_bytes) {
        (Some(peak), Some(base)) => out.text(format_args!(
            "peak memory {}: {} above the {} held before the model was built, against {needed} needed \
             (parameters, gradients, moments, activations): {:.2}x",
            output::human_bytes(peak),
            output::human_bytes(peak.saturating_sub(base)),
            output::human_bytes(base),
            peak.saturating_sub(base) as f64 / r.needed_bytes as f64
        )),
        _ => out.text(format_args!("peak memory: not reported by this OS; {needed} needed")),
    }
}

/// The CPU's model name where the OS says it (Linux's /proc/cpuinfo), for the record.
fn cpu_name() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}
