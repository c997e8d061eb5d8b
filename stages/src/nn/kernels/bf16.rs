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
//! ([`crate::nn::kernels::Precision`]); attention too.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::thread::LocalKey;

use ndarray::{ArrayView2, ArrayViewMut2};

use crate::nn::kernels::matmul::{then_blocks, then_rows, Dims, Layout};

/// The most rows per block of [`matmul_bf16_then`]: the AMX kernel packs its operands its own
/// way, and 128 measured 3% faster LoRA steps than 256 on gpt2-6x384 (docs/bench.md).
pub const THEN_ROWS: usize = 128;

/// k per block: one tile of 16 pairs.
pub const K_BLOCK: usize = 32;

/// `x` rounded to the nearest bf16, ties to even, a denormal read as zero (NaN stays NaN, made
/// quiet): what AVX512-BF16's `vcvtne2ps2bf16` computes. Branch-free, so that loops over it
/// vectorize.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = flush(x).to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((bits >> 16) | 0x40) as u16;
    if x.is_nan() {
        quiet_nan
    } else {
        rounded
    }
}

/// `x` with a denormal replaced by a zero of its sign. Branch-free, so loops over it vectorize.
#[inline(always)]
fn flush(x: f32) -> f32 {
    let bits = x.to_bits();
    if bits & 0x7f80_0000 == 0 {
        f32::from_bits(bits & 0x8000_0000)
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

/// An operand as stored: element (i, j) of op(x) is `data[i * stride + j]` (`Normal`) or
/// `data[j * stride + i]` (`Transposed`).
#[derive(Clone, Copy, Debug)]
struct Operand<'a> {
    data: &'a [f32],
    layout: Layout,
    stride: usize,
}

impl<'a> Operand<'a> {
    /// op(x) of `rows` x `cols` stored without gaps.
    fn packed(data: &'a [f32], layout: Layout, rows: usize, cols: usize) -> Self {
        let stride = match layout {
            Layout::Normal => cols,
            Layout::Transposed => rows,
        };
        Operand { data, layout, stride }
    }

    /// The elements `v` spans, read in place: rows or columns at unit stride.
    ///
    /// # Panics
    /// If neither axis has unit stride, or one has a negative stride.
    fn of_view(v: &ArrayView2<'a, f32>) -> Self {
        let (rows, cols) = v.dim();
        let [s0, s1] = [0, 1].map(|axis| usize::try_from(v.strides()[axis]).expect("a view with positive strides"));
        let (layout, stride, span) = match (rows, cols) {
            (0, _) | (_, 0) => (Layout::Normal, cols, 0),
            _ if cols == 1 || s1 == 1 => (Layout::Normal, s0, (rows - 1) * s0 + cols),
            _ if rows == 1 || s0 == 1 => (Layout::Transposed, s1, (cols - 1) * s1 + rows),
            _ => panic!("a bf16 product reads rows or columns at unit stride"),
        };
        // SAFETY: the view's first element and the `span` after it lie in the array the view
        // borrows (it reaches its last element there), which nothing writes while it is shared.
        let data = match span {
            0 => &[][..],
            _ => unsafe { std::slice::from_raw_parts(v.as_ptr(), span) },
        };
        Operand { data, layout, stride }
    }

    fn at(&self, row: usize, col: usize) -> f32 {
        match self.layout {
            Layout::Normal => self.data[row * self.stride + col],
            Layout::Transposed => self.data[col * self.stride + row],
        }
    }

    /// op(x) rounded to bf16 (as f32) into `out`, row-major `padded_cols` wide, zeros past
    /// `rows` and `cols`.
    fn round_into(&self, rows: usize, cols: usize, padded_cols: usize, out: &mut [f32]) {
        out.fill(0.0);
        if padded_cols == 0 {
            return;
        }
        for (i, row) in out.chunks_exact_mut(padded_cols).take(rows).enumerate() {
            for (j, r) in row[..cols].iter_mut().enumerate() {
                *r = from_bf16(to_bf16(self.at(i, j)));
            }
        }
    }
}

/// The output of a product: `rows` rows of `cols` floats, `stride` floats apart. Only the
/// rows' own elements are touched, so the gaps may belong to someone else.
struct OutRows<'a> {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    stride: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

impl<'a> OutRows<'a> {
    /// `out`, rows of `cols` without gaps.
    fn packed(out: &'a mut [f32], cols: usize) -> Self {
        let rows = out.len().checked_div(cols).unwrap_or(0);
        OutRows { ptr: out.as_mut_ptr(), rows, cols, stride: cols, _borrow: PhantomData }
    }

    /// # Panics
    /// If its columns are not at unit stride.
    fn of_view(mut v: ArrayViewMut2<'a, f32>) -> Self {
        let (rows, cols) = v.dim();
        assert!(cols <= 1 || v.strides()[1] == 1, "a bf16 product writes rows at unit stride");
        let stride = usize::try_from(v.strides()[0]).expect("a view with positive strides");
        OutRows { ptr: v.as_mut_ptr(), rows, cols, stride, _borrow: PhantomData }
    }

    /// Its `rows` rows from row `i` on.
    #[cfg_attr(not(all(target_arch = "x86_64", target_os = "linux")), allow(dead_code))]
    fn rows_from(&mut self, i: usize, rows: usize) -> OutRows<'_> {
        assert!(i + rows <= self.rows, "rows {i}..{} of {}", i + rows, self.rows);
        OutRows { ptr: self.ptr.wrapping_add(i * self.stride), rows, _borrow: PhantomData, ..*self }
    }

    /// Where element (i, j) is, for writing through.
    #[cfg_attr(not(all(target_arch = "x86_64", target_os = "linux")), allow(dead_code))]
    fn at(&mut self, i: usize, j: usize) -> *mut f32 {
        assert!(i < self.rows && j < self.cols, "({i}, {j}) of {} x {}", self.rows, self.cols);
        self.ptr.wrapping_add(i * self.stride + j)
    }

    /// Row `i`.
    fn row(&mut self, i: usize) -> &mut [f32] {
        assert!(i < self.rows, "row {i} of {}", self.rows);
        // SAFETY: row `i` is `cols` elements the borrow covers, borrowed through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.stride), self.cols) }
    }
}

/// `f` on the first `len` elements of this thread's `buffer`, whatever they hold, grown once
/// with `fill` and then reused; on a fresh buffer if this one is in use (a product started
/// while this thread, waiting inside another, ran a stolen task).
fn with_buffer<T: Copy, R>(
    buffer: &'static LocalKey<RefCell<Vec<T>>>,
    len: usize,
    fill: T,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    buffer.with(|buf| match buf.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, fill);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![fill; len]),
    })
}

thread_local! {
    /// The emulation's rounded operands, grown once per thread.
    static ROUNDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
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
/// AMX when [`amx`] is true, on [`matmul_bf16_emulated`] otherwise.
///
/// # Panics
/// If a slice's length does not match its dimensions.
pub fn matmul_bf16(a: &[f32], la: Layout, b: &[f32], lb: Layout, out: &mut [f32], d: Dims, accumulate: bool) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Matmul);
    check(a, b, out, d);
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if amx() && d.m > 0 && d.n > 0 && d.k > 0 {
        tiles::matmul(a, la, b, lb, out, d, accumulate);
        return;
    }
    matmul_bf16_emulated(a, la, b, lb, out, d, accumulate);
}

/// [`matmul_bf16`], then `then(first_row, rows, context)` on each block of [`then_rows`] output
/// rows, as [`super::matmul::matmul_then`] does: on AMX in the task that finished the block,
/// while it is in cache; without AMX after the whole product. The product has
/// [`matmul_bf16`]'s bits.
///
/// # Panics
/// If a slice's length does not match its dimensions, or `contexts` has not one item per block.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16_then<C: Send>(
    a: &[f32],
    la: Layout,
    b: &[f32],
    lb: Layout,
    out: &mut [f32],
    d: Dims,
    accumulate: bool,
    contexts: impl rayon::iter::IndexedParallelIterator<Item = C>,
    then: impl Fn(usize, &mut [f32], C) + Sync + Send,
) {
    use rayon::prelude::*;
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Matmul);
    check(a, b, out, d);
    assert_eq!(contexts.len(), then_blocks(d.m, THEN_ROWS), "one context per block of rows");
    if d.m == 0 || d.n == 0 {
        return;
    }
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if amx() && d.k > 0 {
        tiles::matmul_then(a, la, b, lb, out, d, accumulate, contexts, then);
        return;
    }
    matmul_bf16_emulated(a, la, b, lb, out, d, accumulate);
    let rows = then_rows(d.m, THEN_ROWS);
    out.par_chunks_mut(rows * d.n).zip(contexts).enumerate().for_each(|(i, (block, context))| {
        then(i * rows, block, context);
    });
}

/// `out = [out +] bf16(a) @ bf16(b)` on the calling thread, for the small products of
/// attention: `a` (m, k), `b` (k, n) and `out` (m, n) are views, read and written in place,
/// each with rows or columns at unit stride (a transposed view is read as such). The bits of
/// [`matmul_bf16_reference`] on copies of the operands; on AMX when [`amx`] is true.
///
/// # Panics
/// If the shapes do not fit, or a view has no axis at unit stride.
pub fn product_bf16(a: ArrayView2<f32>, b: ArrayView2<f32>, out: ArrayViewMut2<f32>, accumulate: bool) {
    let d = Dims { m: a.nrows(), k: a.ncols(), n: b.ncols() };
    assert!(
        b.nrows() == d.k && out.dim() == (d.m, d.n),
        "a bf16 product of {:?} by {:?} into {:?}",
        a.dim(),
        b.dim(),
        out.dim()
    );
    let (a, b, mut out) = (Operand::of_view(&a), Operand::of_view(&b), OutRows::of_view(out));
    if d.m == 0 || d.n == 0 {
        return;
    }
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if amx() && d.k > 0 {
        tiles::product(a, b, &mut out, d, accumulate);
        return;
    }
    product_emulated(a, b, &mut out, d, accumulate);
}

/// [`product_bf16`] without AMX: the emulation's rows one after another.
fn product_emulated(a: Operand, b: Operand, out: &mut OutRows, d: Dims, accumulate: bool) {
    let kp = d.k.next_multiple_of(K_BLOCK);
    with_buffer(&ROUNDED, d.m * kp + kp * d.n + 2 * d.n, 0.0, |buf| {
        let (ra, rest) = buf.split_at_mut(d.m * kp);
        let (rb, chains) = rest.split_at_mut(kp * d.n);
        a.round_into(d.m, d.k, kp, ra);
        b.round_into(d.k, d.n, d.n, rb);
        for (i, a_row) in ra.chunks_exact(kp).enumerate() {
            emulated_row(a_row, rb, out.row(i), chains, accumulate);
        }
    });
}

/// Output rows per parallel task of the emulation.
const EMULATED_ROWS: usize = 4;

/// [`matmul_bf16_reference`]'s bits in plain Rust, so that a bf16 run gives its bits without
/// AMX (at about a tenth of f32's speed): the operands rounded once into row-major copies
/// padded with zeros to whole k blocks, then for each output row the two chains of each block
/// vectorized across the row's outputs. Each output goes through the reference's operations in
/// the reference's order.
///
/// # Panics
/// If a slice's length does not match its dimensions.
pub fn matmul_bf16_emulated(a: &[f32], la: Layout, b: &[f32], lb: Layout, out: &mut [f32], d: Dims, accumulate: bool) {
    use rayon::prelude::*;
    check(a, b, out, d);
    if d.m == 0 || d.n == 0 {
        return;
    }
    let kp = d.k.next_multiple_of(K_BLOCK);
    with_buffer(&ROUNDED, d.m * kp + kp * d.n, 0.0, |buf| {
        let (ra, rb) = buf.split_at_mut(d.m * kp);
        Operand::packed(a, la, d.m, d.k).round_into(d.m, d.k, kp, ra);
        Operand::packed(b, lb, d.k, d.n).round_into(d.k, d.n, d.n, rb);
        let (ra, rb) = (&*ra, &*rb);
        out.par_chunks_mut(EMULATED_ROWS * d.n).enumerate().for_each(|(r, rows)| {
            crate::nn::kernels::with_scratch(2 * d.n, |chains| {
                for (i, row) in rows.chunks_mut(d.n).enumerate() {
                    let a_row = &ra[(r * EMULATED_ROWS + i) * kp..][..kp];
                    emulated_row(a_row, rb, row, chains, accumulate);
                }
            })
        });
    });
}

/// One output row: `a` (kp) against `b` (kp, n), kp a whole number of k blocks. With AVX2+FMA
/// where the CPU has them, else in plain Rust; the same bits.
fn emulated_row(a: &[f32], b: &[f32], out: &mut [f32], chains: &mut [f32], accumulate: bool) {
    #[cfg(target_arch = "x86_64")]
    if crate::nn::kernels::isa().has_avx2_fma() {
        // SAFETY: `isa` checked that the CPU has AVX2 and FMA.
        return unsafe { emulated_row_fma(a, b, out, chains, accumulate) };
    }
    emulated_row_with(a, b, out, chains, accumulate, fma_plain);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn emulated_row_fma(a: &[f32], b: &[f32], out: &mut [f32], chains: &mut [f32], accumulate: bool) {
    emulated_row_with(a, b, out, chains, accumulate, f32::mul_add);
}

/// `x * y + e` rounded once, for `x` and `y` bf16 values, without an FMA instruction: their
/// product is exact in f64, and so is its sum with `e` unless their exponents lie so far apart
/// that the f32 result is `e` either way. (On aarch64 every CPU has FMA.)
#[inline(always)]
fn fma_plain(x: f32, y: f32, e: f32) -> f32 {
    #[cfg(target_arch = "aarch64")]
    return x.mul_add(y, e);
    #[cfg(not(target_arch = "aarch64"))]
    return (x as f64 * y as f64 + e as f64) as f32;
}

#[inline(always)]
fn emulated_row_with(
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    chains: &mut [f32],
    accumulate: bool,
    fma: impl Fn(f32, f32, f32) -> f32,
) {
    let n = out.len();
    let (even, odd) = chains.split_at_mut(n);
    if !accumulate {
        out.fill(0.0);
    }
    for (block, a_block) in a.chunks_exact(K_BLOCK).enumerate() {
        even.fill(0.0);
        odd.fill(0.0);
        for (q, pair) in a_block.chunks_exact(2).enumerate() {
            let p = block * K_BLOCK + 2 * q;
            let (b0, b1) = (&b[p * n..(p + 1) * n], &b[(p + 1) * n..(p + 2) * n]);
            for (e, y) in even.iter_mut().zip(b0) {
                *e = flush(fma(pair[0], *y, *e));
            }
            for (o, y) in odd.iter_mut().zip(b1) {
                *o = flush(fma(pair[1], *y, *o));
            }
        }
        for ((o, e), d) in out.iter_mut().zip(even.iter()).zip(odd.iter()) {
            *o = flush(flush(*o) + flush(e + d));
        }
    }
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
    use std::arch::x86_64::*;
    use std::cell::{Cell, RefCell};

    /// Rows and columns of an output tile; the kernel computes 2 x 2 of them at a time.
    const TILE: usize = 16;
    const BLOCK: usize = 2 * TILE;
    /// Bytes of packed b per k chunk, at most (one k block of every column tile): what stays
    /// in L2 while every row block of the output passes over it.
    const CHUNK_BYTES: usize = 1 << 20;

    /// CPUID says AMX-TILE and AMX-BF16 (and the AVX-512 the packing is compiled for), and
    /// Linux grants the tile data state.
    pub fn available() -> bool {
        if !(is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bf16"))
        {
            return false;
        }
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

    /// Tiles 0-3 (outputs), 4-5 (a) and 6-7 (b): 16 rows of 64 bytes each, loaded once per
    /// thread.
    fn configure() {
        if CONFIGURED.get() {
            return;
        }
        let mut cfg = TileConfig([0; 64]);
        cfg.0[0] = 1;
        for t in 0..8 {
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

    const ZERO: Tile = Tile([0; 512]);

    /// The first `len` (at most 16) floats of `x`, zeros after.
    #[inline(always)]
    unsafe fn load(x: &[f32], len: usize) -> __m512 {
        debug_assert!(len <= 16 && len <= x.len());
        _mm512_maskz_loadu_ps(((1u32 << len) - 1) as u16, x.as_ptr())
    }

    /// [`to_bf16`] of `lo` then `hi`: 32 bf16 in order.
    #[inline(always)]
    unsafe fn convert(lo: __m512, hi: __m512) -> __m512i {
        // SAFETY: both are 512 bits of plain data.
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
    }

    /// 32 consecutive k (the first `len` of `x`, zeros after) as 16 pairs of bf16, pair q
    /// holding k = 2q in its low half and 2q + 1 in its high half.
    #[inline(always)]
    unsafe fn pairs_along(x: &[f32], len: usize) -> __m512i {
        let hi = match len > 16 {
            true => load(&x[16..], len - 16),
            false => _mm512_setzero_ps(),
        };
        convert(load(x, len.min(16)), hi)
    }

    /// 16 places at two consecutive k, `x` at the even one and `y` (if any) at the odd one
    /// (the first `len` of each, zeros after), as 16 pairs of bf16.
    #[inline(always)]
    unsafe fn pairs_across(x: &[f32], y: Option<&[f32]>, len: usize) -> __m512i {
        let odd = y.map_or_else(|| _mm512_setzero_ps(), |y| load(y, len));
        // x0 .. x15 y0 .. y15 into x0 y0 x1 y1 ...
        let interleave = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
            1, 16, 0,
        );
        _mm512_permutexvar_epi16(interleave, convert(load(x, len), odd))
    }

    /// Row `row` of a tile, 16 pairs.
    #[inline(always)]
    unsafe fn store_row(tile: &mut Tile, row: usize, v: __m512i) {
        _mm512_store_si512(tile.0[row * 32..].as_mut_ptr().cast(), v);
    }

    /// `rows` transposed: lane i of result j is lane j of `rows[i]` (16 x 16 32-bit lanes, in
    /// four rounds of shuffles).
    ///
    /// Plain loops, no closures: an intrinsic inside a closure (`array::from_fn`'s) is inlined
    /// only if the closure is, and a build where it is not calls each shuffle out of line.
    #[inline(always)]
    unsafe fn transpose(r: [__m512i; 16]) -> [__m512i; 16] {
        // Within each 128-bit lane L: t holds pairs of rows, u quads of rows, at columns 4L + c.
        let mut t = [_mm512_setzero_si512(); 16];
        for x in 0..16 {
            let (a, b) = (r[x / 2 * 2], r[x / 2 * 2 + 1]);
            t[x] = match x % 2 {
                0 => _mm512_unpacklo_epi32(a, b),
                _ => _mm512_unpackhi_epi32(a, b),
            };
        }
        // u[4g + c]: rows 4g..4g + 4 at column 4L + c, in lane L.
        let mut u = [_mm512_setzero_si512(); 16];
        for (x, u) in u.iter_mut().enumerate() {
            let (g, c) = (x / 4, x % 4);
            let (a, b) = (t[4 * g + c / 2], t[4 * g + 2 + c / 2]);
            *u = match c % 2 {
                0 => _mm512_unpacklo_epi64(a, b),
                _ => _mm512_unpackhi_epi64(a, b),
            };
        }
        let mut out = [_mm512_setzero_si512(); 16];
        for (j, row) in out.iter_mut().enumerate() {
            let (lane, c) = (j / 4, j % 4);
            let (x, y) = match lane / 2 {
                0 => (_mm512_shuffle_i32x4::<0x44>(u[c], u[4 + c]), _mm512_shuffle_i32x4::<0x44>(u[8 + c], u[12 + c])),
                _ => (_mm512_shuffle_i32x4::<0xEE>(u[c], u[4 + c]), _mm512_shuffle_i32x4::<0xEE>(u[8 + c], u[12 + c])),
            };
            *row = match lane % 2 {
                0 => _mm512_shuffle_i32x4::<0x88>(x, y),
                _ => _mm512_shuffle_i32x4::<0xDD>(x, y),
            };
        }
        out
    }

    /// Rows `row0..` (32, zeros past the edge) of op(a), k blocks `kb0..kb0 + blocks`: two row
    /// tiles of `blocks` tiles each, a tile holding 16 rows of 16 pairs of bf16 (k = 2q, 2q + 1).
    ///
    /// # Safety
    /// The CPU has AVX-512F, BW, VL and BF16 ([`available`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn pack_a(a: Operand, d: Dims, row0: usize, kb0: usize, out: &mut [Tile]) {
        let blocks = out.len() / 2;
        let rows = BLOCK.min(d.m - row0);
        let (k0, k1) = (kb0 * K_BLOCK, ((kb0 + blocks) * K_BLOCK).min(d.k));
        match a.layout {
            Layout::Normal => {
                for i in 0..BLOCK {
                    let row = &a.data[(row0 + i.min(rows - 1)) * a.stride..][..d.k];
                    for (kb, p) in (k0..k1).step_by(K_BLOCK).enumerate() {
                        let v = match i < rows {
                            true => pairs_along(&row[p..], (k1 - p).min(K_BLOCK)),
                            false => _mm512_setzero_si512(),
                        };
                        store_row(&mut out[(i / TILE) * blocks + kb], i % TILE, v);
                    }
                }
            }
            Layout::Transposed => {
                // Per k block and row tile: 16 vectors of pairs, one per pair of k, across the
                // rows; transposed, one per row.
                let at = |p: usize, t: usize| &a.data[p * a.stride + row0 + t * TILE..];
                if rows <= TILE {
                    out[blocks..].fill(ZERO);
                }
                for (kb, p0) in (k0..k1).step_by(K_BLOCK).enumerate() {
                    for t in 0..rows.div_ceil(TILE) {
                        let len = TILE.min(rows - t * TILE);
                        let mut columns = [_mm512_setzero_si512(); 16];
                        for (q, column) in columns.iter_mut().enumerate() {
                            let p = p0 + 2 * q;
                            if p < k1 {
                                *column = pairs_across(at(p, t), (p + 1 < k1).then(|| at(p + 1, t)), len);
                            }
                        }
                        for (i, row) in transpose(columns).into_iter().enumerate() {
                            store_row(&mut out[t * blocks + kb], i, row);
                        }
                    }
                }
            }
        }
    }

    /// Column tile `c` of op(b), k blocks `kb0..kb0 + tiles.len()`: per k block, 16 rows of
    /// pairs, row q holding (k = 2q, 2q + 1) of each of the 16 columns side by side (zeros past
    /// the edges).
    ///
    /// # Safety
    /// The CPU has AVX-512F, BW, VL and BF16 ([`available`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn pack_b(b: Operand, d: Dims, c: usize, kb0: usize, tiles: &mut [Tile]) {
        if c * TILE >= d.n {
            tiles.fill(ZERO);
            return;
        }
        let (col0, cols) = (c * TILE, TILE.min(d.n - c * TILE));
        let (k0, k1) = (kb0 * K_BLOCK, ((kb0 + tiles.len()) * K_BLOCK).min(d.k));
        match b.layout {
            Layout::Normal => {
                let at = |p: usize| &b.data[p * b.stride + col0..];
                for (kb, tile) in tiles.iter_mut().enumerate() {
                    for q in 0..TILE {
                        let v = match k0 + kb * K_BLOCK + 2 * q {
                            p if p < k1 => pairs_across(at(p), (p + 1 < k1).then(|| at(p + 1)), cols),
                            _ => _mm512_setzero_si512(),
                        };
                        store_row(tile, q, v);
                    }
                }
            }
            Layout::Transposed => {
                // Per k block: 16 vectors of pairs, one per column, across k; transposed, one
                // per pair of k.
                let col = |j: usize| &b.data[(col0 + j) * b.stride..][..d.k];
                for (kb, p) in (k0..k1).step_by(K_BLOCK).enumerate() {
                    let mut columns = [_mm512_setzero_si512(); 16];
                    for (j, column) in columns.iter_mut().enumerate().take(cols) {
                        *column = pairs_along(&col(j)[p..], (k1 - p).min(K_BLOCK));
                    }
                    for (q, row) in transpose(columns).into_iter().enumerate() {
                        store_row(&mut tiles[kb], q, row);
                    }
                }
            }
        }
    }

    /// An output tile to load and store: where it is, at what stride in bytes.
    struct Dest {
        ptr: *mut f32,
        stride: usize,
    }

    /// Where output tile `t` (of 2 x 2) of column block `cb` is, for `m` rows of `n`: its
    /// first row and column, and the rows and columns of it that exist (16 x 16 when it lies
    /// inside the output).
    fn place(t: usize, cb: usize, m: usize, n: usize) -> (usize, usize, usize, usize) {
        let (i0, j0) = ((t / 2) * TILE, cb * BLOCK + (t % 2) * TILE);
        match (TILE.min(m.saturating_sub(i0)), TILE.min(n.saturating_sub(j0))) {
            (0, _) | (_, 0) => (i0, j0, 0, 0),
            (h, w) => (i0, j0, h, w),
        }
    }

    pub fn matmul(a: &[f32], la: Layout, b: &[f32], lb: Layout, out: &mut [f32], d: Dims, accumulate: bool) {
        by_chunks(a, la, b, lb, d, |a, kb0, nb, packed_b, chunk, _| {
            every_row_block(a, d, kb0, nb, packed_b, chunk, out, accumulate || kb0 > 0);
        });
    }

    /// [`row_block`] of every block of `out`'s rows, on the pool.
    #[allow(clippy::too_many_arguments)]
    fn every_row_block(
        a: Operand,
        d: Dims,
        kb0: usize,
        nb: usize,
        packed_b: &[Tile],
        chunk: usize,
        out: &mut [f32],
        accumulate: bool,
    ) {
        out.par_chunks_mut(BLOCK * d.n).enumerate().for_each(|(r, rows)| {
            row_block(a, d, r, kb0, nb, packed_b, chunk, &mut OutRows::packed(rows, d.n), accumulate);
        });
    }

    /// [`matmul`], then `then` on each block of [`then_rows`] rows in the task that finished
    /// it (see [`super::matmul_bf16_then`]).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_then<C: Send>(
        a: &[f32],
        la: Layout,
        b: &[f32],
        lb: Layout,
        out: &mut [f32],
        d: Dims,
        accumulate: bool,
        contexts: impl IndexedParallelIterator<Item = C>,
        then: impl Fn(usize, &mut [f32], C) + Sync + Send,
    ) {
        let rows = then_rows(d.m, THEN_ROWS);
        debug_assert_eq!(rows % BLOCK, 0, "blocks of whole AMX row blocks");
        let mut contexts = Some(contexts);
        by_chunks(a, la, b, lb, d, |a, kb0, nb, packed_b, chunk, last| {
            let acc = accumulate || kb0 > 0;
            if !last {
                return every_row_block(a, d, kb0, nb, packed_b, chunk, out, acc);
            }
            let contexts = contexts.take().expect("one last chunk");
            out.par_chunks_mut(rows * d.n).zip(contexts).enumerate().for_each(|(i, (block, context))| {
                for (j, sub) in block.chunks_mut(BLOCK * d.n).enumerate() {
                    let r = i * rows / BLOCK + j;
                    row_block(a, d, r, kb0, nb, packed_b, chunk, &mut OutRows::packed(sub, d.n), acc);
                }
                then(i * rows, block, context);
            });
        });
    }

    /// `pass(a, kb0, nb, packed_b, chunk, last)` for each chunk of k blocks, `b`'s tiles for it
    /// packed: the products over them are the pass's to run.
    fn by_chunks(
        a: &[f32],
        la: Layout,
        b: &[f32],
        lb: Layout,
        d: Dims,
        mut pass: impl FnMut(Operand, usize, usize, &[Tile], usize, bool),
    ) {
        let (a, b) = (Operand::packed(a, la, d.m, d.k), Operand::packed(b, lb, d.k, d.n));
        let blocks = d.k.div_ceil(K_BLOCK);
        let col_tiles = d.n.div_ceil(BLOCK) * 2;
        let chunk = (CHUNK_BYTES / (col_tiles * size_of::<Tile>())).clamp(1, blocks);
        with_buffer(&PACKED_B, col_tiles * chunk, ZERO, |packed_b| {
            for kb0 in (0..blocks).step_by(chunk) {
                let nb = chunk.min(blocks - kb0);
                packed_b.par_chunks_mut(chunk).enumerate().for_each(|(c, tiles)| {
                    // SAFETY: `amx` checked the CPU through `available`.
                    unsafe { pack_b(b, d, c, kb0, &mut tiles[..nb]) }
                });
                pass(a, kb0, nb, packed_b, chunk, kb0 + nb == blocks);
            }
        });
    }

    /// [`super::product_bf16`] on AMX, on this thread: every k block at once.
    pub(super) fn product(a: Operand, b: Operand, out: &mut OutRows, d: Dims, accumulate: bool) {
        let blocks = d.k.div_ceil(K_BLOCK);
        let col_tiles = d.n.div_ceil(BLOCK) * 2;
        with_buffer(&PACKED_B, col_tiles * blocks, ZERO, |packed_b| {
            for (c, tiles) in packed_b.chunks_exact_mut(blocks).enumerate() {
                // SAFETY: `amx` checked the CPU through `available`.
                unsafe { pack_b(b, d, c, 0, tiles) };
            }
            for r in 0..d.m.div_ceil(BLOCK) {
                let mut block = out.rows_from(r * BLOCK, BLOCK.min(d.m - r * BLOCK));
                row_block(a, d, r, 0, blocks, packed_b, blocks, &mut block, accumulate);
            }
        });
    }

    thread_local! {
        /// Packed operands, grown once per thread and reused: b on the calling thread, a on
        /// each thread that computes rows.
        static PACKED_B: RefCell<Vec<Tile>> = const { RefCell::new(Vec::new()) };
        static PACKED_A: RefCell<Vec<Tile>> = const { RefCell::new(Vec::new()) };
    }

    /// Row block `r` of the output (its rows in `out`) plus its products over k blocks
    /// `kb0..kb0 + nb` with `packed_b` (`chunk` tiles per column tile).
    #[allow(clippy::too_many_arguments)]
    fn row_block(
        a: Operand,
        d: Dims,
        r: usize,
        kb0: usize,
        nb: usize,
        packed_b: &[Tile],
        chunk: usize,
        out: &mut OutRows,
        accumulate: bool,
    ) {
        let col_tiles = packed_b.len() / chunk;
        with_buffer(&PACKED_A, 2 * nb, ZERO, |packed_a| {
            configure();
            // SAFETY: as for `pack_b`.
            unsafe { pack_a(a, d, r * BLOCK, kb0, packed_a) };
            let mut staging = [[0.0f32; TILE * TILE]; 4];
            for cb in 0..col_tiles / 2 {
                let places: [_; 4] = std::array::from_fn(|t| place(t, cb, out.rows, d.n));
                // Tiles past the edges go through staging: copied in, and out after.
                for (stage, &(i0, j0, h, w)) in staging.iter_mut().zip(&places) {
                    if (h, w) != (TILE, TILE) {
                        stage.fill(0.0);
                        for i in 0..h {
                            stage[i * TILE..][..w].copy_from_slice(&out.row(i0 + i)[j0..][..w]);
                        }
                    }
                }
                let dests: [Dest; 4] = std::array::from_fn(|t| match places[t] {
                    (i0, j0, TILE, TILE) => Dest { ptr: out.at(i0, j0), stride: 4 * out.stride },
                    _ => Dest { ptr: staging[t].as_mut_ptr(), stride: 4 * TILE },
                });
                let b_tiles = [&packed_b[2 * cb * chunk..][..nb], &packed_b[(2 * cb + 1) * chunk..][..nb]];
                // SAFETY: `configure` loaded this thread's tile configuration; every operand
                // is 16 rows of 64 bytes at its stride (a whole tile's rows are `out`'s).
                unsafe { block_2x2(&dests, &packed_a[..nb], &packed_a[nb..], b_tiles, accumulate) };
                for (stage, &(i0, j0, h, w)) in staging.iter().zip(&places) {
                    if (h, w) != (TILE, TILE) {
                        for i in 0..h {
                            out.row(i0 + i)[j0..][..w].copy_from_slice(&stage[i * TILE..][..w]);
                        }
                    }
                }
            }
        });
    }

    /// The 2 x 2 output tiles at `dests` (each loaded, or zeroed without `accumulate`),
    /// plus the products of the row tiles `a0`, `a1` and the column tiles `b[0]`, `b[1]` over
    /// their k blocks in order.
    ///
    /// # Safety
    /// The tile configuration of [`configure`] is loaded; each `dests` pointer addresses 16
    /// rows of 16 f32 at its stride.
    unsafe fn block_2x2(dests: &[Dest; 4], a0: &[Tile], a1: &[Tile], b: [&[Tile]; 2], accumulate: bool) {
        let [c0, c1, c2, c3] = dests;
        if accumulate {
            asm!(
                "tileloadd tmm0, [{p0} + {s0}]",
                "tileloadd tmm1, [{p1} + {s1}]",
                "tileloadd tmm2, [{p2} + {s2}]",
                "tileloadd tmm3, [{p3} + {s3}]",
                p0 = in(reg) c0.ptr, s0 = in(reg) c0.stride, p1 = in(reg) c1.ptr, s1 = in(reg) c1.stride,
                p2 = in(reg) c2.ptr, s2 = in(reg) c2.stride, p3 = in(reg) c3.ptr, s3 = in(reg) c3.stride,
                options(nostack),
            );
        } else {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack));
        }
        for (((a0, a1), b0), b1) in a0.iter().zip(a1).zip(b[0]).zip(b[1]) {
            asm!(
                "tileloadd tmm4, [{a0} + {s}]",
                "tileloadd tmm6, [{b0} + {s}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s}]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {s}]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0.0.as_ptr(), a1 = in(reg) a1.0.as_ptr(),
                b0 = in(reg) b0.0.as_ptr(), b1 = in(reg) b1.0.as_ptr(), s = in(reg) 64usize,
                options(nostack),
            );
        }
        asm!(
            "tilestored [{p0} + {s0}], tmm0",
            "tilestored [{p1} + {s1}], tmm1",
            "tilestored [{p2} + {s2}], tmm2",
            "tilestored [{p3} + {s3}], tmm3",
            p0 = in(reg) c0.ptr, s0 = in(reg) c0.stride, p1 = in(reg) c1.ptr, s1 = in(reg) c1.stride,
            p2 = in(reg) c2.ptr, s2 = in(reg) c2.stride, p3 = in(reg) c3.ptr, s3 = in(reg) c3.stride,
            options(nostack),
        );
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The vector conversions on ties, NaN, infinities, the largest finite value (which
        /// rounds to infinity), denormals (read as zero, also where rounding would reach the
        /// smallest normal), signed zeros and random values, against [`to_bf16`].
        #[test]
        fn vector_conversion_is_to_bf16() {
            if !amx() {
                eprintln!("SKIPPED: no AMX here, so no AVX-512 packing");
                return;
            }
            let specials = [
                1.0 + 1.0 / 256.0,
                1.0 + 3.0 / 256.0,
                -(1.0 + 1.5 / 256.0),
                f32::NAN,
                -f32::NAN,
                f32::from_bits(0x7f80_0001),
                f32::from_bits(0x7fc1_2345),
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MAX,
                f32::from_bits(0x007f_ffff),
                f32::from_bits(0x807f_8000),
                f32::from_bits(0x8000_0001),
                f32::from_bits(0x0080_7fff),
                0.0,
                -0.0,
            ];
            let random: Vec<f32> =
                (0..32u32).map(|i| f32::from_bits(i.wrapping_mul(0x9E37_79B9).rotate_left(7) ^ 0x1234_5678)).collect();
            for values in [&specials[..], &random[..16], &random[16..]] {
                let (x, y): (Vec<f32>, Vec<f32>) = (values.to_vec(), values.iter().rev().copied().collect());
                let mut along = [0u16; 32];
                let mut across = [0u16; 32];
                let xy: Vec<f32> = x.iter().chain(&y).copied().collect();
                // SAFETY: `amx` checked the CPU through `available`.
                unsafe {
                    _mm512_storeu_si512(along.as_mut_ptr().cast(), pairs_along(&xy, 32));
                    _mm512_storeu_si512(across.as_mut_ptr().cast(), pairs_across(&x, Some(&y), 16));
                }
                for i in 0..16 {
                    assert_eq!(along[i], to_bf16(x[i]), "{:e} ({:#x})", x[i], x[i].to_bits());
                    assert_eq!(along[16 + i], to_bf16(y[i]));
                    assert_eq!((across[2 * i], across[2 * i + 1]), (to_bf16(x[i]), to_bf16(y[i])));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{random, same_bits_on_one_and_two_threads};
    use crate::nn::kernels::matmul::Product;

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
        assert_eq!(to_bf16(f32::from_bits(0x007f_ffff)), 0x0000, "a denormal is zero, not rounded up to normal");
        assert_eq!(to_bf16(f32::from_bits(0x8000_0001)), 0x8000, "a zero of its sign");
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

    /// Every (m, k, n) of `shapes`, every layout, with and without accumulation, with ordinary
    /// values and with values that flush: `fast` against the reference, bit for bit.
    fn same_bits_as_the_reference(shapes: &[(usize, usize, usize)], fast: Product) {
        let tiny = |n: usize, seed: u64| random(n, seed).into_iter().map(|v| v * 1e-19).collect::<Vec<f32>>();
        for &(m, k, n) in shapes {
            let d = Dims { m, k, n };
            for small in [false, true] {
                let (a, b) = match small {
                    false => (random(m * k, 3), random(k * n, 4)),
                    true => (tiny(m * k, 3), tiny(k * n, 4)),
                };
                for la in [Layout::Normal, Layout::Transposed] {
                    for lb in [Layout::Normal, Layout::Transposed] {
                        for accumulate in [false, true] {
                            let mut got = random(m * n, 5);
                            let mut reference = got.clone();
                            fast(&a, la, &b, lb, &mut got, d, accumulate);
                            matmul_bf16_reference(&a, la, &b, lb, &mut reference, d, accumulate);
                            let same = got.iter().zip(&reference).all(|(x, y)| x.to_bits() == y.to_bits());
                            assert!(same, "{m}x{k}x{n} {la:?} {lb:?} accumulate {accumulate} small {small}");
                        }
                    }
                }
            }
        }
    }

    /// Shapes at the tiles' edges, past one k block and past one k chunk (the last).
    #[test]
    fn amx_has_the_bits_of_the_reference() {
        if !amx() {
            eprintln!("SKIPPED: no AMX-BF16 here (or the OS refused it); the emulation runs every product");
            return;
        }
        let shapes =
            [(1, 1, 1), (16, 32, 16), (17, 33, 15), (40, 100, 33), (5, 64, 70), (0, 3, 2), (2, 0, 3), (3, 1300, 520)];
        same_bits_as_the_reference(&shapes, matmul_bf16);
    }

    #[test]
    fn the_emulation_has_the_bits_of_the_reference() {
        let shapes = [(1, 1, 1), (4, 32, 8), (5, 33, 7), (9, 100, 33), (0, 3, 2), (2, 0, 3), (3, 70, 1)];
        same_bits_as_the_reference(&shapes, matmul_bf16_emulated);
    }

    /// Without an FMA instruction the chains go through f64: the same bits as an FMA on bf16
    /// values of every size, products that underflow f32 and zeros of either sign included.
    #[test]
    fn the_plain_chains_round_as_an_fma() {
        let mut values: Vec<f32> = random(4096, 8).iter().map(|v| from_bf16(to_bf16(*v))).collect();
        for (i, v) in values.iter_mut().enumerate() {
            *v *= [1.0, 1e-20, 1e20, -1e-30, 1e-38, 3e-39][i % 6];
            *v = from_bf16(to_bf16(*v));
        }
        let accumulators = [0.0f32, -0.0, 1.0, -3.5e-38, 1.2e-38, 7e30, -2.0e-20];
        for w in values.windows(2) {
            for e in accumulators {
                let (fma, plain) = (w[0].mul_add(w[1], e), fma_plain(w[0], w[1], e));
                assert_eq!(fma.to_bits(), plain.to_bits(), "{:e} * {:e} + {e:e}", w[0], w[1]);
            }
        }
        let (a, b) = (&values[..64], &values[64..64 + 64 * 5]);
        let (mut with_fma, mut without) = (random(5, 9), random(5, 9));
        emulated_row_with(a, b, &mut with_fma, &mut [0.0; 10], true, f32::mul_add);
        emulated_row_with(a, b, &mut without, &mut [0.0; 10], true, fma_plain);
        assert!(with_fma.iter().zip(&without).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    fn one_and_two_threads_give_the_same_bits() {
        same_bits_on_one_and_two_threads(matmul_bf16, Dims { m: 70, k: 90, n: 50 });
    }

    /// Views into larger arrays, as attention reads its heads: each operand normal or
    /// transposed, the output a block of columns of wider rows whose other columns must stay
    /// as they were. Against the reference on copies, bit for bit.
    fn small_products_have_the_bits_of_the_reference(product: fn(Operand, Operand, &mut OutRows, Dims, bool)) {
        use ndarray::{s, Array2};
        for (m, k, n) in [(1, 1, 1), (32, 32, 32), (32, 64, 32), (17, 33, 50), (40, 70, 3), (64, 32, 64)] {
            let d = Dims { m, k, n };
            // op(x) of (rows, cols), stored 5 columns wider than it is, 2 columns in.
            let stored = |rows: usize, cols: usize, layout: Layout, seed: u64| {
                let (r, c) = if layout == Layout::Normal { (rows, cols) } else { (cols, rows) };
                (Array2::from_shape_vec((r, c + 5), random(r * (c + 5), seed)).unwrap(), c)
            };
            fn op(x: &Array2<f32>, c: usize, layout: Layout) -> ndarray::ArrayView2<'_, f32> {
                let v = x.slice(s![.., 2..2 + c]);
                if layout == Layout::Normal {
                    v
                } else {
                    v.reversed_axes()
                }
            }
            for la in [Layout::Normal, Layout::Transposed] {
                for lb in [Layout::Normal, Layout::Transposed] {
                    for accumulate in [false, true] {
                        let ((xa, sa), (xb, sb)) = (stored(m, k, la, 1), stored(k, n, lb, 2));
                        let (a, b) = (op(&xa, sa, la), op(&xb, sb, lb));
                        let mut wide = Array2::from_shape_vec((m, n + 7), random(m * (n + 7), 3)).unwrap();
                        let before = wide.clone();
                        let (ca, cb) = (a.iter().copied().collect::<Vec<_>>(), b.iter().copied().collect::<Vec<_>>());
                        let mut want: Vec<f32> = wide.slice(s![.., 3..3 + n]).iter().copied().collect();
                        matmul_bf16_reference(&ca, Layout::Normal, &cb, Layout::Normal, &mut want, d, accumulate);
                        let mut out = OutRows::of_view(wide.slice_mut(s![.., 3..3 + n]));
                        product(Operand::of_view(&a), Operand::of_view(&b), &mut out, d, accumulate);
                        let got: Vec<f32> = wide.slice(s![.., 3..3 + n]).iter().copied().collect();
                        let same = got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(same, "{m}x{k}x{n} {la:?} {lb:?} accumulate {accumulate}");
                        for cols in [s![.., ..3], s![.., 3 + n..]] {
                            assert_eq!(wide.slice(cols), before.slice(cols), "columns outside the output changed");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn small_products_on_amx_have_the_bits_of_the_reference() {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if amx() {
            return small_products_have_the_bits_of_the_reference(tiles::product);
        }
        eprintln!("SKIPPED: no AMX-BF16 here (or the OS refused it); the emulation runs every product");
    }

    #[test]
    fn small_products_emulated_have_the_bits_of_the_reference() {
        small_products_have_the_bits_of_the_reference(product_emulated);
    }

    #[test]
    fn a_small_product_takes_views() {
        use ndarray::Array2;
        let a = Array2::from_shape_vec((3, 4), random(12, 1)).unwrap();
        let b = Array2::from_shape_vec((5, 4), random(20, 2)).unwrap();
        let mut out = Array2::zeros((3, 5));
        product_bf16(a.view(), b.t(), out.view_mut(), false);
        let mut want = vec![0.0; 15];
        let bt: Vec<f32> = b.t().iter().copied().collect();
        matmul_bf16_reference(
            a.as_slice().unwrap(),
            Layout::Normal,
            &bt,
            Layout::Normal,
            &mut want,
            Dims { m: 3, k: 4, n: 5 },
            false,
        );
        assert!(out.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
