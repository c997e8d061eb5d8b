//! What bf16 products could gain on this CPU, and the arithmetic a portable path would have to
//! copy to give AMX's bits (issue 18's bf16 idea; docs/bench.md).
//!
//! - Throughput of one thread on operands in L1: a 12 x 32 f32 FMA micro-tile (AVX-512F), the
//!   same tile with AVX512-BF16's `vdpbf16ps`, and AMX's `tdpbf16ps` on 2 x 2 tiles of 16 x 16.
//! - `tdpbf16ps` on random tiles (through `kernels::bf16` on AMX) against its emulation in
//!   plain f32, `kernels::bf16`'s reference: the even and the odd bf16 of each pair in two FMA
//!   chains from zero over the tile's 16 pairs, then `dest + (even + odd)`, with bf16 and
//!   destination denormals read as zero and every result's denormals flushed. Once with values
//!   of ordinary size, once near and below f32's normal range.
//!
//! - Whole products of the gpt2-6x384 and shakespeare_char steps' shapes on every thread
//!   (called from a pool thread, as training calls them): f32 (`kernels::matmul`) against bf16
//!   (`kernels::bf16`, on AMX where there is AMX) and against the plain emulation that runs
//!   where there is not.
//!
//! Run with `cargo bench -p stages --bench amx_bf16`. Prints figures and counts; asserts
//! nothing. Each part says SKIPPED where the CPU or the OS lacks what it needs.

fn main() {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    x86::main();
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    println!("SKIPPED: this bench asks Linux for the AMX state; x86-64 Linux only");
    // On a thread of the pool, as a training stage calls its products: from outside it, each
    // call would also time handing its work to the pool and waiting.
    rayon::scope(|_| products());
}

/// GFLOP/s of the f32 product, the bf16 product (on AMX where there is AMX) and the bf16
/// emulation for the step's shapes, best of five.
fn products() {
    use stages::nn::kernels::bf16::{amx, matmul_bf16, matmul_bf16_emulated};
    use stages::nn::kernels::matmul::{matmul, Dims, Layout, Product};
    use Layout::{Normal as N, Transposed as T};
    let path = if amx() { "AMX" } else { "emulated: no AMX here" };
    println!("whole products, {} threads, bf16 {path}:", rayon::current_num_threads());
    // gpt2-6x384's attention input, its gradient and weight gradient, and the MLP's input;
    // shakespeare_char's the same, and its head.
    for (m, k, n, la, lb) in [
        (2048, 384, 1152, N, N),
        (2048, 1152, 384, N, T),
        (384, 2048, 1152, T, N),
        (2048, 384, 1536, N, N),
        (768, 128, 384, N, N),
        (768, 384, 128, N, T),
        (128, 768, 384, T, N),
        (768, 128, 65, N, T),
    ] {
        let d = Dims { m, k, n };
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut out = vec![0.0f32; m * n];
        let mut time = |product: Product| {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let start = std::time::Instant::now();
                product(&a, la, &b, lb, &mut out, d, false);
                best = best.min(start.elapsed().as_secs_f64());
            }
            2.0 * (m * n * k) as f64 / best / 1e9
        };
        let (f32_rate, bf16_rate, emulated) = (time(matmul), time(matmul_bf16), time(matmul_bf16_emulated));
        println!(
            "  {m}x{k}x{n} {la:?}/{lb:?}: f32 {f32_rate:.0} GFLOP/s, bf16 {bf16_rate:.0} ({:.1}x), emulated {emulated:.0} ({:.2}x)",
            bf16_rate / f32_rate,
            emulated / f32_rate,
        );
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;
    use std::time::Instant;

    use stages::nn::kernels::bf16::{amx, matmul_bf16, matmul_bf16_reference};
    use stages::nn::kernels::matmul::{Dims, Layout};

    const MR: usize = 12;
    const NR: usize = 32;
    const KC: usize = 256;
    const CALLS: usize = 200_000;

    pub fn main() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            println!("SKIPPED: no AVX-512F");
        } else {
            let f32_tile = best_of_3(|| unsafe { time_f32_tile() });
            println!("f32 FMA tile (12 x 32, AVX-512F), one thread, in L1: {f32_tile:.1} GFLOP/s");
            if std::arch::is_x86_feature_detected!("avx512bf16") {
                let bf16_tile = best_of_3(|| unsafe { time_bf16_tile() });
                println!(
                    "bf16 dot tile (12 x 32, vdpbf16ps), one thread, in L1: {bf16_tile:.1} GFLOP/s ({:.2}x the f32 tile)",
                    bf16_tile / f32_tile
                );
            } else {
                println!("SKIPPED: no AVX512-BF16");
            }
        }
        if !amx() {
            println!("SKIPPED: no AMX-BF16 on this CPU, or Linux refused the tile state");
            return;
        }
        let amx = best_of_3(|| unsafe { time_amx() });
        println!("AMX tdpbf16ps (2 x 2 tiles of 16 x 16), one thread, in L1: {amx:.0} GFLOP/s");
        for (what, small) in [("values of ordinary size", false), ("near and below f32's normal range", true)] {
            let (same, total) = compare_with_emulation(small);
            println!("tdpbf16ps against its emulation, {what}: {same} of {total} outputs bit for bit");
        }
    }

    fn best_of_3(f: impl Fn() -> f64) -> f64 {
        (0..3).map(|_| f()).fold(0.0, f64::max)
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn f32_tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..kc {
            let (b0, b1) = unsafe { (_mm512_loadu_ps(b.add(p * NR)), _mm512_loadu_ps(b.add(p * NR + 16))) };
            for (i, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(unsafe { *a.add(p * MR + i) });
                acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            unsafe {
                _mm512_storeu_ps(c.add(i * NR), acc[0]);
                _mm512_storeu_ps(c.add(i * NR + 16), acc[1]);
            }
        }
    }

    /// `kc2` pairs of k; `a` holds one bf16 pair per row and pair, `b` two vectors of pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn bf16_tile(kc2: usize, a: *const i32, b: *const __m512bh, c: *mut f32) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..kc2 {
            let (b0, b1) = unsafe { (*b.add(2 * p), *b.add(2 * p + 1)) };
            for (i, acc) in acc.iter_mut().enumerate() {
                let av: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(*a.add(p * MR + i))) };
                acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            unsafe {
                _mm512_storeu_ps(c.add(i * NR), acc[0]);
                _mm512_storeu_ps(c.add(i * NR + 16), acc[1]);
            }
        }
    }

    fn gflops(macs: usize, seconds: f64) -> f64 {
        2.0 * macs as f64 / seconds / 1e9
    }

    unsafe fn time_f32_tile() -> f64 {
        let (a, b, mut c) = (vec![0.5f32; KC * MR], vec![0.25f32; KC * NR], vec![0.0f32; MR * NR]);
        let start = Instant::now();
        for _ in 0..CALLS {
            unsafe { f32_tile(KC, a.as_ptr(), b.as_ptr(), c.as_mut_ptr()) };
            std::hint::black_box(&mut c);
        }
        gflops(MR * NR * KC * CALLS, start.elapsed().as_secs_f64())
    }

    unsafe fn time_bf16_tile() -> f64 {
        // 0x3f00 is bf16 0.5, 0x3e80 is 0.25.
        let a = vec![0x3f00_3f00i32; KC / 2 * MR];
        let b: Vec<__m512bh> =
            (0..KC).map(|_| unsafe { std::mem::transmute(_mm512_set1_epi32(0x3e80_3e80)) }).collect();
        let mut c = vec![0.0f32; MR * NR];
        let start = Instant::now();
        for _ in 0..CALLS {
            unsafe { bf16_tile(KC / 2, a.as_ptr(), b.as_ptr(), c.as_mut_ptr()) };
            std::hint::black_box(&mut c);
        }
        gflops(MR * NR * KC * CALLS, start.elapsed().as_secs_f64())
    }

    /// Tile configuration: palette 1, `tiles` tiles of 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    fn config(tiles: usize) -> TileConfig {
        let mut cfg = TileConfig([0; 64]);
        cfg.0[0] = 1;
        for t in 0..tiles {
            cfg.0[16 + 2 * t] = 64;
            cfg.0[48 + t] = 16;
        }
        cfg
    }

    #[repr(C, align(64))]
    struct Tile([u16; 512]);

    unsafe fn time_amx() -> f64 {
        let cfg = config(8);
        let (a, b) = ([Tile([0x3f00; 512]), Tile([0x3f00; 512])], [Tile([0x3e80; 512]), Tile([0x3e80; 512])]);
        let calls = 10 * CALLS;
        let start = Instant::now();
        // SAFETY: the OS granted the tile state; the tiles are 1 KiB each, rows 64 bytes apart.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr());
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3");
            for _ in 0..calls {
                asm!(
                    "tileloadd tmm4, [{a0} + {s}]",
                    "tileloadd tmm5, [{a1} + {s}]",
                    "tileloadd tmm6, [{b0} + {s}]",
                    "tileloadd tmm7, [{b1} + {s}]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a[0].0.as_ptr(), a1 = in(reg) a[1].0.as_ptr(),
                    b0 = in(reg) b[0].0.as_ptr(), b1 = in(reg) b[1].0.as_ptr(),
                    s = in(reg) 64usize,
                );
            }
            asm!("tilerelease");
        }
        gflops(4 * 16 * 16 * 32 * calls, start.elapsed().as_secs_f64())
    }

    /// Outputs equal to the emulation's, of all outputs, over 200 random tiles.
    fn compare_with_emulation(small: bool) -> (usize, usize) {
        let mut state = if small { 0x9e37_79b9_7f4a_7c15u64 } else { 0x1234_5678_9abc_def0 };
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut same, mut total) = (0, 0);
        let d = Dims { m: 16, k: 32, n: 16 };
        for _ in 0..200 {
            // bf16 values as f32 (rounding them to bf16 again changes nothing): biased exponents
            // 112..141 (2^-15 .. 2^14), or 0..80 (denormals and products below f32's normal
            // range); random sign and mantissa.
            let mut operand = |len: usize| -> Vec<f32> {
                (0..len)
                    .map(|_| {
                        let r = next();
                        let exp = if small { (r % 81) as u32 } else { 112 + (r % 30) as u32 };
                        let bits = ((r >> 8) as u32 & 0x8000) | (exp << 7) | ((r >> 20) as u32 & 0x7f);
                        f32::from_bits(bits << 16)
                    })
                    .collect()
            };
            let (a, b) = (operand(d.m * d.k), operand(d.k * d.n));
            let dest: Vec<f32> = (0..d.m * d.n)
                .map(|_| {
                    let r = next();
                    match small {
                        true => f32::from_bits(((r >> 3) as u32 & 0x8000_0000) | (r % 0x0180_0000) as u32),
                        false => (r % 2000) as f32 / 7.0 - 140.0,
                    }
                })
                .collect();
            let (mut got, mut want) = (dest.clone(), dest);
            matmul_bf16(&a, Layout::Normal, &b, Layout::Normal, &mut got, d, true);
            matmul_bf16_reference(&a, Layout::Normal, &b, Layout::Normal, &mut want, d, true);
            total += got.len();
            same += got.iter().zip(&want).filter(|(x, y)| x.to_bits() == y.to_bits()).count();
        }
        (same, total)
    }
}
