//! Products of bf16-rounded operands with AMX-BF16's arithmetic: on AMX where the CPU and the
//! OS allow it, in plain Rust elsewhere, with the same bits (docs/bench.md, "bf16").
//!
//! `out (m, n) = [out +] bf16(op(a)) @ bf16(op(b))`, each output computed as `tdpbf16ps`
//! computes it: over k in blocks of 32 (the last one padded with zeros), the even and the odd
//! element of each pair in two FMA chains from zero, then `out + (even + odd)`. bf16 inputs and
//! the output read denormals as zero; every result flushes them. A bf16 product is exact in
//! f32, so the chains are ordinary f32 arithmetic.
//!
//! The training stages' `precision = "bf16"` runs every weight product here
//! ([`crate::nn::linear::Precision`]).

use crate::nn::kernels::matmul::{Dims, Layout};

/// k per block: one tile of 16 pairs.
pub const K_BLOCK: usize = 32;

/// `x` rounded to the nearest bf16, ties to even (NaN stays NaN).
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// `x` with a denormal replaced by a zero of its sign.
fn flush(x: f32) -> f32 {
    if x.is_subnormal() {
        0.0f32.copysign(x)
    } else {
        x
    }
}

/// The f32 value of a bf16, denormals read as zero.
pub fn from_bf16(x: u16) -> f32 {
    flush(f32::from_bits((x as u32) << 16))
}

/// Element (row, col) of op(x), for op(x) of `cols` columns and `rows` rows.
fn at(x: &[f32], layout: Layout, rows: usize, cols: usize, row: usize, col: usize) -> f32 {
    match layout {
        Layout::Normal => x[row * cols + col],
        Layout::Transposed => x[col * rows + row],
    }
}

/// The arithmetic itself, one output at a time: the reference every path must equal.
pub fn matmul_bf16_reference(a: &[f32], la: Layout, b: &[f32], lb: Layout, out: &mut [f32], d: Dims, accumulate: bool) {
    check(a, b, out, d);
    for i in 0..d.m {
        for j in 0..d.n {
            let mut acc = if accumulate { out[i * d.n + j] } else { 0.0 };
            for k0 in (0..d.k).step_by(K_BLOCK) {
                let (mut even, mut odd) = (0.0f32, 0.0f32);
                for p in (k0..k0 + K_BLOCK).step_by(2) {
                    let term = |p: usize| {
                        let (x, y) = match p < d.k {
                            true => (at(a, la, d.m, d.k, i, p), at(b, lb, d.k, d.n, p, j)),
                            false => (0.0, 0.0),
                        };
                        (from_bf16(to_bf16(x)), from_bf16(to_bf16(y)))
                    };
                    let ((x0, y0), (x1, y1)) = (term(p), term(p + 1));
                    even = flush(x0.mul_add(y0, even));
                    odd = flush(x1.mul_add(y1, odd));
                }
                acc = flush(flush(acc) + flush(even + odd));
            }
            out[i * d.n + j] = acc;
        }
    }
}

fn check(a: &[f32], b: &[f32], out: &[f32], d: Dims) {
    assert_eq!(a.len(), d.m * d.k, "a is not m * k");
    assert_eq!(b.len(), d.k * d.n, "b is not k * n");
    assert_eq!(out.len(), d.m * d.n, "out is not m * n");
}

/// `out = [out +] bf16(op(a)) @ bf16(op(b))` with the bits of [`matmul_bf16_reference`]: on
/// AMX when [`amx`] is true, on the reference otherwise.
///
/// # Panics
/// If a slice's length does not match its dimensions.
pub fn matmul_bf16(a: &[f32], la: Layout, b: &[f32], lb: Layout, out: &mut [f32], d: Dims, accumulate: bool) {
    check(a, b, out, d);
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if amx() && d.m > 0 && d.n > 0 && d.k > 0 {
        tiles::matmul(a, la, b, lb, out, d, accumulate);
        return;
    }
    matmul_bf16_reference(a, la, b, lb, out, d, accumulate);
}

/// Whether products run on AMX: the CPU has AMX-BF16, Linux granted the tile state (other
/// systems ask for it differently, not done here), and `TINYGPT_SIMD` does not ask for
/// portable kernels. Decided once per process.
pub fn amx() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AMX.get_or_init(|| crate::nn::kernels::isa() != crate::nn::kernels::Isa::Portable && tiles::available())
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    false
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod tiles {
    use super::*;
    use rayon::prelude::*;
    use std::arch::asm;
    use std::cell::Cell;

    /// Rows and columns of an output tile.
    const TILE: usize = 16;

    /// CPUID says AMX-TILE and AMX-BF16, and Linux grants the tile data state.
    pub fn available() -> bool {
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        if edx & (1 << 24) == 0 || edx & (1 << 22) == 0 {
            return false;
        }
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: a system call that changes only this process's permissions.
        unsafe {
            asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => ret, in("rdi") ARCH_REQ_XCOMP_PERM,
                 in("rsi") XFEATURE_XTILEDATA, lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret == 0
    }

    thread_local! {
        static CONFIGURED: Cell<bool> = const { Cell::new(false) };
    }

    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    /// Tiles 0 (output), 1 (a) and 2 (b): 16 rows of 64 bytes each, loaded once per thread.
    fn configure() {
        if CONFIGURED.get() {
            return;
        }
        let mut cfg = TileConfig([0; 64]);
        cfg.0[0] = 1;
        for t in 0..3 {
            cfg.0[16 + 2 * t] = 64;
            cfg.0[48 + t] = TILE as u8;
        }
        // SAFETY: `available` checked the CPU and the OS; the configuration is valid.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack)) };
        CONFIGURED.set(true);
    }

    /// One tile of 16 rows of 64 bytes.
    #[repr(C, align(64))]
    #[derive(Clone, Copy)]
    struct Tile([u16; 512]);

    /// Row block `r` of op(a): per k block, a tile of 16 rows by 32 bf16 (zeros past the edges).
    fn pack_a(a: &[f32], la: Layout, d: Dims, r: usize, blocks: usize, out: &mut Vec<Tile>) {
        out.clear();
        out.resize(blocks, Tile([0; 512]));
        for (kb, tile) in out.iter_mut().enumerate() {
            for i in 0..TILE.min(d.m - r * TILE) {
                for p in 0..K_BLOCK.min(d.k - kb * K_BLOCK) {
                    tile.0[i * K_BLOCK + p] = to_bf16(at(a, la, d.m, d.k, r * TILE + i, kb * K_BLOCK + p));
                }
            }
        }
    }

    /// Column block `c` of op(b): per k block, 16 rows of pairs, row q holding (k = 2q, 2q + 1)
    /// of each of the 16 columns side by side (zeros past the edges).
    fn pack_b(b: &[f32], lb: Layout, d: Dims, c: usize, tiles: &mut [Tile]) {
        for (kb, tile) in tiles.iter_mut().enumerate() {
            *tile = Tile([0; 512]);
            for p in 0..K_BLOCK.min(d.k - kb * K_BLOCK) {
                for j in 0..TILE.min(d.n - c * TILE) {
                    tile.0[(p / 2) * 32 + 2 * j + p % 2] = to_bf16(at(b, lb, d.k, d.n, kb * K_BLOCK + p, c * TILE + j));
                }
            }
        }
    }

    pub fn matmul(a: &[f32], la: Layout, b: &[f32], lb: Layout, out: &mut [f32], d: Dims, accumulate: bool) {
        let blocks = d.k.div_ceil(K_BLOCK);
        let cols = d.n.div_ceil(TILE);
        let mut packed_b = vec![Tile([0; 512]); cols * blocks];
        packed_b.par_chunks_mut(blocks).enumerate().for_each(|(c, tiles)| pack_b(b, lb, d, c, tiles));
        out.par_chunks_mut(TILE * d.n).enumerate().for_each_init(Vec::new, |packed_a, (r, rows)| {
            configure();
            pack_a(a, la, d, r, blocks, packed_a);
            let m = rows.len() / d.n;
            for c in 0..cols {
                let width = TILE.min(d.n - c * TILE);
                let mut acc = [0.0f32; TILE * TILE];
                if accumulate {
                    for i in 0..m {
                        let src = &rows[i * d.n + c * TILE..i * d.n + c * TILE + width];
                        acc[i * TILE..i * TILE + width].copy_from_slice(src);
                    }
                }
                let b_tiles = &packed_b[c * blocks..(c + 1) * blocks];
                // SAFETY: `configure` loaded this thread's tile configuration; every operand is
                // 16 rows of 64 bytes.
                unsafe {
                    asm!("tileloadd tmm0, [{c} + {s}]", c = in(reg) acc.as_ptr(), s = in(reg) 64usize, options(nostack));
                    for (a_tile, b_tile) in packed_a.iter().zip(b_tiles) {
                        asm!(
                            "tileloadd tmm1, [{a} + {s}]",
                            "tileloadd tmm2, [{b} + {s}]",
                            "tdpbf16ps tmm0, tmm1, tmm2",
                            a = in(reg) a_tile.0.as_ptr(), b = in(reg) b_tile.0.as_ptr(), s = in(reg) 64usize,
                            options(nostack),
                        );
                    }
                    asm!("tilestored [{c} + {s}], tmm0", c = in(reg) acc.as_mut_ptr(), s = in(reg) 64usize, options(nostack));
                }
                for i in 0..m {
                    rows[i * d.n + c * TILE..i * d.n + c * TILE + width].copy_from_slice(&acc[i * TILE..i * TILE + width]);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{on_threads, random};

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16: ties to the even one, 1.0.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82, "halfway again: up to the even one");
        assert_eq!(to_bf16(1.0 + 1.5 / 256.0), 0x3f81, "above halfway: up");
        assert_eq!(to_bf16(-2.0), 0xc000);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(to_bf16(f32::MAX), 0x7f80, "rounds up to infinity");
        assert_eq!(from_bf16(0x0001), 0.0, "a denormal reads as zero");
    }

    #[test]
    fn the_reference_is_the_product_of_the_rounded_operands() {
        for (m, k, n) in [(1, 1, 1), (3, 31, 5), (4, 32, 4), (5, 33, 7), (2, 100, 3)] {
            let d = Dims { m, k, n };
            let (a, b) = (random(m * k, 1), random(k * n, 2));
            let mut out = vec![0.0; m * n];
            matmul_bf16_reference(&a, Layout::Normal, &b, Layout::Normal, &mut out, d, false);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|p| from_bf16(to_bf16(a[i * k + p])) as f64 * from_bf16(to_bf16(b[p * n + j])) as f64)
                        .sum();
                    let got = out[i * n + j] as f64;
                    assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{m}x{k}x{n} ({i}, {j}): {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn a_block_is_two_chains_then_their_sum_added_to_the_output() {
        // One block of k = 4: even chain 1 * 2^24 + 1 * 1, odd chain 1 * -2^24 + 1 * 1; in f32
        // the even chain is 2^24 (1 is lost), the odd chain -2^24 + 1 = -16777215.
        let a = [1.0, 1.0, 1.0, 1.0];
        let b = [16_777_216.0, -16_777_216.0, 1.0, 1.0];
        let mut out = [0.5f32];
        matmul_bf16_reference(&a, Layout::Normal, &b, Layout::Normal, &mut out, Dims { m: 1, k: 4, n: 1 }, true);
        assert_eq!(out[0], 0.5 + 1.0, "even + odd = 2^24 - 16777215 = 1, added to 0.5");
    }

    /// Shapes at the tiles' edges and past one k block, every layout, with and without
    /// accumulation, with ordinary values and with values that flush.
    #[test]
    fn amx_has_the_bits_of_the_reference() {
        if !amx() {
            eprintln!("SKIPPED: no AMX-BF16 here (or the OS refused it); the reference runs every product");
            return;
        }
        let tiny = |n: usize, seed: u64| random(n, seed).into_iter().map(|v| v * 1e-19).collect::<Vec<f32>>();
        for (m, k, n) in [(1, 1, 1), (16, 32, 16), (17, 33, 15), (40, 100, 33), (5, 64, 70), (0, 3, 2), (2, 0, 3)] {
            let d = Dims { m, k, n };
            for small in [false, true] {
                let (a, b) = match small {
                    false => (random(m * k, 3), random(k * n, 4)),
                    true => (tiny(m * k, 3), tiny(k * n, 4)),
                };
                for la in [Layout::Normal, Layout::Transposed] {
                    for lb in [Layout::Normal, Layout::Transposed] {
                        for accumulate in [false, true] {
                            let mut fast = random(m * n, 5);
                            let mut reference = fast.clone();
                            matmul_bf16(&a, la, &b, lb, &mut fast, d, accumulate);
                            matmul_bf16_reference(&a, la, &b, lb, &mut reference, d, accumulate);
                            let same = fast.iter().zip(&reference).all(|(x, y)| x.to_bits() == y.to_bits());
                            assert!(same, "{m}x{k}x{n} {la:?} {lb:?} accumulate {accumulate} small {small}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn one_and_two_threads_give_the_same_bits() {
        let d = Dims { m: 70, k: 90, n: 50 };
        let (a, b) = (random(d.m * d.k, 6), random(d.k * d.n, 7));
        let run = |threads| {
            let mut out = vec![0.0; d.m * d.n];
            on_threads(threads, || matmul_bf16(&a, Layout::Normal, &b, Layout::Transposed, &mut out, d, false));
            out
        };
        assert!(run(1).iter().zip(&run(2)).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
