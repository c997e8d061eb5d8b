//! A linear layer with an optional adapter: `out = x W (+ b)` with W stored (in, out)
//! (`Conv1D`) or (out, in) (`nn.Linear`), plus a LoRA adapter's `scale * x A^T B^T`, or DoRA's
//! rescaling of the adapted layer's output per output feature.
//!
//! LoRA dropout, as PEFT's `lora_dropout`, drops the adapter's input only (`B A dropout(x)`),
//! in training (when the batch carries a dropout seed); the mask comes from the seed and each
//! element's place, so it is the same whatever the thread count, and backward draws it again
//! rather than keeping it.
//!
//! DoRA (Liu et al. 2024) as PEFT computes it:
//! `out = m / |W + s B A| * (x W^T + s x A^T B^T) + b`, the norm taken over each output row of
//! the adapted weight and treated as a constant in backward (PEFT detaches it). The norm is
//! found without forming `W + s B A`: `|W_o|^2 + 2 s B_o . (W A^T)_o + s^2 B_o (A A^T) B_o^T`.
//! With the norms constant, DoRA's backward is LoRA's on the output gradient scaled per
//! output, so both run in the same blocks of rows.

use crate::nn::config::WeightLayout;
use crate::nn::kernels::bias::{add_bias, bias_backward};
use crate::nn::kernels::gemv;
use crate::nn::kernels::lowrank;
use crate::nn::kernels::matmul::{matmul, Dims, Layout};
use crate::nn::kernels::qmatmul::qmatmul;
use crate::nn::kernels::Precision;
use crate::nn::kernels::{add_to, simd_fn, with_scratch};
use crate::nn::params::{ParamId, ParamMap};
use crate::nn::profile;
use crate::nn::rng::SplitMix64;
use rayon::prelude::*;

/// A LoRA adapter on a linear layer: `lora_A` (r, in) and `lora_B` (out, r), scaled, and for
/// DoRA a magnitude (out).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Adapter {
    pub(crate) a: ParamId,
    pub(crate) b: ParamId,
    pub(crate) r: usize,
    pub(crate) scale: f32,
    pub(crate) magnitude: Option<ParamId>,
    /// The probability that an input element of the adapter is dropped in training.
    pub(crate) dropout: f32,
}

/// The buffers a block's layer needs for its adapter.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct AdapterShape {
    pub(crate) r: usize,
    pub(crate) cin: usize,
    pub(crate) cout: usize,
    pub(crate) dora: bool,
}

/// What a linear layer's adapter keeps between forward and backward, sized for its shape.
#[derive(Clone, Debug, Default)]
pub(crate) struct AdapterActs {
    /// The scaled `s x A^T` (rows, r).
    xa: Vec<f32>,
    /// `B^T` (r, out), as forward read it: the rank-r kernels take `B`'s rows of outputs.
    bt: Vec<f32>,
    /// DoRA: the adapted product before rescaling (rows, out).
    z: Vec<f32>,
    /// DoRA: each output's norm `|W_o + s (B A)_o|` and factor `m_o / norm` (2 * out).
    norm_and_factor: Vec<f32>,
    /// DoRA scratch: `W A^T` (out, r) and `A A^T` (r, r).
    wa: Vec<f32>,
    gram: Vec<f32>,
    /// The seed of this pass's dropout mask (none: no dropout, as in evaluation).
    pub(crate) dropout_seed: Option<u64>,
    /// The place of the pass's first row among the rows its batch was cut from: row `r`'s
    /// mask is drawn as row `first_row + r`'s.
    pub(crate) first_row: usize,
}

impl AdapterActs {
    /// Buffers for `rows` rows through a layer with an adapter of this shape (`r` 0: none).
    pub(crate) fn new(rows: usize, shape: AdapterShape) -> Self {
        let AdapterShape { r, cout, dora, .. } = shape;
        let z = |n: usize| vec![0.0f32; n];
        let d = |n: usize| if dora { z(n) } else { Vec::new() };
        AdapterActs {
            xa: z(rows * r),
            bt: z(r * cout),
            z: d(rows * cout),
            norm_and_factor: d(2 * cout),
            wa: d(cout * r),
            gram: d(r * r),
            dropout_seed: None,
            first_row: 0,
        }
    }
    pub(crate) fn floats(&self) -> usize {
        self.xa.len() + self.bt.len() + self.z.len() + self.norm_and_factor.len() + self.wa.len() + self.gram.len()
    }

    /// The seed of this pass's dropout mask, when `ad` drops its input and the pass trains.
    fn dropout_for(&self, ad: &Adapter) -> Option<u64> {
        self.dropout_seed.filter(|_| ad.dropout > 0.0)
    }
}

/// The adapter's input (rows of `cin`): `x`, or with a dropout seed and the place of the first
/// row, `x` after dropout, written into `x_drop`.
fn adapter_input<'a>(x: &'a [f32], x_drop: &'a mut [f32], seed: Option<(u64, usize)>, p: f32, cin: usize) -> &'a [f32] {
    let Some((seed, first_row)) = seed else { return x };
    let dropped = &mut x_drop[..x.len()];
    dropout_rows(x, dropped, cin, (seed, first_row), DropoutMask::new(p), false);
    dropped
}

/// `dx += dropped * mask` for the rows of `dx` (`cin` wide), row `i` through the mask of the
/// pass's row `first_row + i`, as [`adapter_input`] drew it in forward.
fn add_through_dropout(dx: &mut [f32], dropped: &[f32], place: (u64, usize), p: f32, cin: usize) {
    dropout_rows(dropped, dx, cin, place, DropoutMask::new(p), true);
}

/// Inverted dropout of probability `p`: each element of row `row` draws `u`, the next value
/// of its row's SplitMix64 stream (seed, row) as a uniform in [0, 1) rounded to f32, and is
/// dropped (factor 0) when `u < p`, else kept (factor 1 / (1 - p)).
///
/// The comparison runs on the draw's 53 integer bits against the least that rounds to `p` or
/// above (rounding is monotonic, so it decides alike), and element `i` of a stream is computed
/// from the stream's start, so a row's draws are independent of each other and vectorize.
#[derive(Clone, Copy, Debug)]
struct DropoutMask {
    /// Draws (53 bits) below this are dropped.
    below: u64,
    keep: f32,
}

impl DropoutMask {
    fn new(p: f32) -> Self {
        // The least 53-bit draw whose uniform, rounded to f32, is not below p.
        let (mut lo, mut hi) = (0u64, 1u64 << 53);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if Self::uniform(mid) < p {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        DropoutMask { below: lo, keep: 1.0 / (1.0 - p) }
    }

    /// A 53-bit draw as the uniform in [0, 1) it stands for, rounded to f32.
    fn uniform(bits: u64) -> f32 {
        (bits as f64 / (1u64 << 53) as f64) as f32
    }
}

simd_fn! {
    /// `out = x * mask` (or `out += x * mask` when `add`) for rows of `cin`, row `i` through
    /// the mask of row `first_row + i` drawn from `seed`; 64-bit lanes for the draws where the
    /// machine has them.
    fn dropout_rows(x: &[f32], out: &mut [f32], cin: usize, place: (u64, usize), mask: DropoutMask, add: bool) {
        let ((seed, first_row), DropoutMask { below, keep }) = (place, mask);
        for (r, (out, x)) in out.chunks_mut(cin).zip(x.chunks(cin)).enumerate() {
            let start = seed ^ ((first_row + r) as u64 + 1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
            for (i, (out, x)) in out.iter_mut().zip(x).enumerate() {
                let factor = if SplitMix64::at(start, i as u64) >> 11 < below { 0.0 } else { keep };
                *out = if add { *out + x * factor } else { x * factor };
            }
        }
    }
}

simd_fn! {
    /// DoRA's magnitude gradient for the outputs `first..first + dm.len()` of rows `cout`
    /// wide: `dm_o += dout_io z_io / norm_o` for each row `i` in order.
    fn add_magnitude_gradient(dm: &mut [f32], dout: &[f32], z: &[f32], norms: &[f32], first: usize, cout: usize) {
        for (drow, zrow) in dout.chunks(cout).zip(z.chunks(cout)) {
            let (drow, zrow) = (&drow[first..first + dm.len()], &zrow[first..first + dm.len()]);
            for (((dm, d), z), n) in dm.iter_mut().zip(drow).zip(zrow).zip(norms) {
                *dm += d * z / n;
            }
        }
    }
}

simd_fn! {
    /// `sq_j += w_ij^2` in f64 for the rows `i` of `w` (each `width` wide) in order, `j` from
    /// column `first`: the squared norms of a run of columns, as many at once as the lanes hold.
    fn add_column_squares(sq: &mut [f64], w: &[f32], first: usize, width: usize) {
        for row in w.chunks(width) {
            for (s, x) in sq.iter_mut().zip(&row[first..]) {
                *s += *x as f64 * *x as f64;
            }
        }
    }
}

/// DoRA's rescaling of a block of outputs (rows of `factors.len()`): the block kept in `z`,
/// then each output multiplied by its factor `m_o / |W_o + s (B A)_o|`.
fn dora_rescale(out: &mut [f32], z: &mut [f32], factors: &[f32]) {
    z.copy_from_slice(out);
    for row in out.chunks_mut(factors.len()) {
        row.iter_mut().zip(factors).for_each(|(o, f)| *o *= f);
    }
}

/// Backward's scratch for adapters: `d(x A^T)` (rows, r), DoRA's rescaled output gradient
/// (rows, out), and each block of rows' part of an adapter's gradients ([`lora_partial`] per
/// block), sized for the widest layer.
pub(crate) struct AdapterScratch<'a> {
    pub(crate) dxa: &'a mut [f32],
    pub(crate) dz: &'a mut [f32],
    pub(crate) partials: &'a mut [f32],
}

/// `dst (r, out) = src^T`, `src` stored (out, r): `B^T` from `B`.
fn transpose_into(dst: &mut [f32], src: &[f32], r: usize) {
    let cout = src.len() / r;
    for (o, row) in src.chunks_exact(r).enumerate() {
        for (j, v) in row.iter().enumerate() {
            dst[j * cout + o] = *v;
        }
    }
}

/// `acc (out, r) += x^T`, `x` stored (r, out).
fn add_transposed(acc: &mut [f32], x: &[f32], r: usize) {
    let cout = acc.len() / r;
    for (o, row) in acc.chunks_exact_mut(r).enumerate() {
        for (j, a) in row.iter_mut().enumerate() {
            *a += x[j * cout + o];
        }
    }
}

/// Floats of one block's part of an adapter's gradients: `B`'s transposed (r, out), then
/// `A`'s (r, in).
pub(crate) fn lora_partial(r: usize, cin: usize, cout: usize) -> usize {
    r * (cin + cout)
}

/// What a layer's backward does with the gradient of its input.
pub(crate) enum InputGradient<'a> {
    /// Writes it into the slice.
    Write(&'a mut [f32]),
    /// Adds it into the slice.
    Add(&'a mut [f32]),
    /// Leaves it: nothing below the layer trains.
    Skip,
}

impl<'a> InputGradient<'a> {
    /// `Write(dx)` when `needed`, else `Skip`.
    pub(crate) fn write_if(needed: bool, dx: &'a mut [f32]) -> Self {
        if needed {
            InputGradient::Write(dx)
        } else {
            InputGradient::Skip
        }
    }

    /// `Add(dx)` when `needed`, else `Skip`.
    pub(crate) fn add_if(needed: bool, dx: &'a mut [f32]) -> Self {
        if needed {
            InputGradient::Add(dx)
        } else {
            InputGradient::Skip
        }
    }

    /// The slice and whether to add into it; none for `Skip`.
    fn target(self) -> Option<(&'a mut [f32], bool)> {
        match self {
            InputGradient::Write(dx) => Some((dx, false)),
            InputGradient::Add(dx) => Some((dx, true)),
            InputGradient::Skip => None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Linear {
    pub(crate) w: ParamId,
    pub(crate) b: Option<ParamId>,
    pub(crate) cin: usize,
    pub(crate) cout: usize,
    pub(crate) layout: WeightLayout,
    pub(crate) adapter: Option<Adapter>,
    /// The layer's place in its block: where its adapter's buffers are.
    pub(crate) slot: usize,
    pub(crate) precision: Precision,
}

impl Linear {
    /// Whether `g` holds a gradient for the layer's weight, bias or adapter.
    pub(crate) fn trains(&self, g: &ParamMap) -> bool {
        let adapter = self.adapter.iter().flat_map(|ad| [Some(ad.a), Some(ad.b), ad.magnitude]);
        [Some(self.w), self.b].into_iter().chain(adapter).flatten().any(|id| !g.at(id).is_empty())
    }

    /// How the weight reads as (in, out), the forward product's right operand.
    fn w_layout(&self) -> Layout {
        match self.layout {
            WeightLayout::OutIn => Layout::Transposed,
            WeightLayout::InOut => Layout::Normal,
        }
    }

    /// How the weight reads as (out, in), the input gradient's right operand (and DoRA's `W A^T`
    /// left one).
    fn w_transposed_layout(&self) -> Layout {
        match self.layout {
            WeightLayout::OutIn => Layout::Normal,
            WeightLayout::InOut => Layout::Transposed,
        }
    }

    /// `out = x W + b` with the adapter's term.
    pub(crate) fn forward(&self, p: &ParamMap, x: &[f32], out: &mut [f32], rows: usize, acts: &mut AdapterActs) {
        self.product(p, x, out, rows, acts);
        if let Some(b) = self.b {
            add_bias(out, p.at(b));
        }
    }

    /// `out = x W` with the adapter's term (and DoRA's rescaling), the bias left to the caller.
    pub(crate) fn product(&self, p: &ParamMap, x: &[f32], out: &mut [f32], rows: usize, acts: &mut AdapterActs) {
        if let Some(q) = p.quantized(self.w) {
            assert!(self.adapter.is_none(), "an adapter on a quantized layer");
            return qmatmul(x, rows, q, out);
        }
        let many_rows = rows > gemv::MAX_ROWS || self.precision != Precision::F32;
        if let Some(ad) = self.adapter.filter(|_| many_rows) {
            return self.product_with_adapter(p, x, out, rows, acts, ad);
        }
        match self.layout {
            _ if many_rows => {
                let d = Dims { m: rows, k: self.cin, n: self.cout };
                self.precision.matmul(x, Layout::Normal, p.at(self.w), self.w_layout(), out, d, false);
            }
            WeightLayout::OutIn => gemv::rows_times_out_in(x, rows, p.at(self.w), out),
            WeightLayout::InOut => gemv::rows_times_in_out(x, rows, p.at(self.w), out),
        }
        let Some(ad) = self.adapter else { return };
        let _time = profile::scope(profile::Kind::Adapter);
        let seed = acts.dropout_for(&ad).map(|s| (s, acts.first_row));
        if let Some(m) = ad.magnitude {
            self.dora_factors(p, ad, m, acts);
        }
        transpose_into(&mut acts.bt, p.at(ad.b), ad.r);
        let (z, factors): (&mut [f32], &[f32]) = match ad.magnitude {
            Some(_) => (&mut acts.z[..rows * self.cout], &acts.norm_and_factor[self.cout..]),
            None => (&mut [], &[]),
        };
        self.add_adapter_term(p, ad, x, out, &mut acts.xa[..rows * ad.r], &acts.bt, z, factors, seed);
    }

    /// The adapter's term on rows of `x` whose products are in `out`, on the calling thread:
    /// `xa = s x A^T` (of the rows after dropout, when `seed` gives the mask and the place of
    /// the first row), then `out += xa B^T` (`bt` is `B^T`), and for DoRA (`factors` not
    /// empty) the rows kept in `z` and rescaled per output.
    #[allow(clippy::too_many_arguments)]
    fn add_adapter_term(
        &self,
        p: &ParamMap,
        ad: Adapter,
        x: &[f32],
        out: &mut [f32],
        xa: &mut [f32],
        bt: &[f32],
        z: &mut [f32],
        factors: &[f32],
        seed: Option<(u64, usize)>,
    ) {
        let (cin, cout, n) = (self.cin, self.cout, xa.len() / ad.r);
        let times_a = |input: &[f32], xa: &mut [f32]| lowrank::dot_rows(input, p.at(ad.a), xa, cin);
        match seed {
            None => times_a(x, xa),
            Some(place) => {
                with_scratch(n * cin, |dropped| times_a(adapter_input(x, dropped, Some(place), ad.dropout, cin), xa))
            }
        }
        xa.iter_mut().for_each(|v| *v *= ad.scale);
        lowrank::add_combinations(out, xa, bt, cout);
        if !factors.is_empty() {
            dora_rescale(out, z, factors);
        }
    }

    /// [`Self::product`] over many rows: each block of rows gets its adapter's term
    /// ([`Self::add_adapter_term`]) in the task that computed its product, while the block's
    /// input and output are in cache.
    fn product_with_adapter(
        &self,
        p: &ParamMap,
        x: &[f32],
        out: &mut [f32],
        rows: usize,
        acts: &mut AdapterActs,
        ad: Adapter,
    ) {
        let (cin, cout, r) = (self.cin, self.cout, ad.r);
        let seed = acts.dropout_for(&ad).map(|s| (s, acts.first_row));
        if let Some(m) = ad.magnitude {
            self.dora_factors(p, ad, m, acts);
        }
        let height = self.precision.then_rows(rows);
        let z_blocks: Vec<&mut [f32]> = match ad.magnitude {
            Some(_) => acts.z[..rows * cout].chunks_mut(height * cout).collect(),
            None => (0..self.precision.then_blocks(rows)).map(|_| &mut [][..]).collect(),
        };
        let factors: &[f32] = if ad.magnitude.is_some() { &acts.norm_and_factor[cout..] } else { &[] };
        transpose_into(&mut acts.bt, p.at(ad.b), r);
        let bt = &acts.bt;
        let blocks = acts.xa[..rows * r].par_chunks_mut(height * r).zip(z_blocks);
        let d = Dims { m: rows, k: cin, n: cout };
        self.precision.matmul_then(
            x,
            Layout::Normal,
            p.at(self.w),
            self.w_layout(),
            out,
            d,
            false,
            blocks,
            |first, out, (xa, z)| {
                let x = &x[first * cin..][..out.len() / cout * cin];
                let place = seed.map(|(seed, first_row)| (seed, first_row + first));
                self.add_adapter_term(p, ad, x, out, xa, bt, z, factors, place);
            },
        );
    }

    /// DoRA's norms and factors into `acts.norm_and_factor`: each output's norm
    /// `|W_o + s (B A)_o|`, then its factor `m_o / norm`.
    fn dora_factors(&self, p: &ParamMap, ad: Adapter, m: ParamId, acts: &mut AdapterActs) {
        let _time = profile::scope(profile::Kind::Adapter);
        self.dora_norms(p, ad, acts);
        let (norms, factors) = acts.norm_and_factor.split_at_mut(self.cout);
        for ((f, n), m) in factors.iter_mut().zip(norms.iter()).zip(p.at(m)) {
            *f = m / n;
        }
    }

    /// Each output's `|W_o + s (B A)_o|` into the first half of `acts.norm_and_factor`.
    fn dora_norms(&self, p: &ParamMap, ad: Adapter, acts: &mut AdapterActs) {
        let (cin, cout, r) = (self.cin, self.cout, ad.r);
        let (w, a, b) = (p.at(self.w), p.at(ad.a), p.at(ad.b));
        // W's rows (outputs) against A's rows: (out, in) x (in, r).
        let wa_layout = self.w_transposed_layout();
        matmul(w, wa_layout, a, Layout::Transposed, &mut acts.wa, Dims { m: cout, k: cin, n: r }, false);
        matmul(a, Layout::Normal, a, Layout::Transposed, &mut acts.gram, Dims { m: r, k: cin, n: r }, false);
        let s = ad.scale as f64;
        let (wa, gram) = (&acts.wa, &acts.gram);
        // Runs of outputs, each output's squared norm summed over its inputs in order: (in, out)
        // weights row by row, a column per lane; (out, in) weights eight rows at a time, eight
        // independent chains of additions.
        const RUN: usize = 64;
        acts.norm_and_factor[..cout].par_chunks_mut(RUN).enumerate().for_each(|(run, norms)| {
            let first = run * RUN;
            let mut w_sq = [0.0f64; RUN];
            let w_sq = &mut w_sq[..norms.len()];
            match self.layout {
                WeightLayout::OutIn => {
                    for (sums, rows) in w_sq.chunks_mut(8).zip(w[first * cin..].chunks(8 * cin)) {
                        for i in 0..cin {
                            for (sum, row) in sums.iter_mut().zip(rows.chunks(cin)) {
                                *sum += row[i] as f64 * row[i] as f64;
                            }
                        }
                    }
                }
                WeightLayout::InOut => add_column_squares(w_sq, w, first, cout),
            }
            for (o, (norm, w_sq)) in (first..).zip(norms.iter_mut().zip(w_sq)) {
                let bo = &b[o * r..(o + 1) * r];
                let cross: f64 = bo.iter().zip(&wa[o * r..(o + 1) * r]).map(|(x, y)| *x as f64 * *y as f64).sum();
                let mut quad = 0.0f64;
                for j in 0..r {
                    for k in 0..r {
                        quad += bo[j] as f64 * gram[j * r + k] as f64 * bo[k] as f64;
                    }
                }
                *norm = (*w_sq + 2.0 * s * cross + s * s * quad).max(0.0).sqrt().max(1e-12) as f32;
            }
        });
    }

    /// `dx = [dx +] dout W^T` of a layer with an adapter, with the adapter's backward (DoRA's on
    /// its rescaled `dout`), each block of rows in the task that computed its product, while
    /// the block's `dout` and `dx` are in cache:
    /// `dxa = s dout B`, `dx += dxa A` (through the dropout's mask when there was one), and the
    /// block's part of the adapter's gradients, `dout^T xa` and `dxa^T x` (`x` dropped again
    /// with forward's mask), added to theirs block by block in order after the product. Without
    /// `dx`, the same blocks without the product.
    #[allow(clippy::too_many_arguments)]
    fn input_gradient_with_adapter(
        &self,
        p: &ParamMap,
        g: &mut ParamMap,
        dout: &[f32],
        x: &[f32],
        acts: &AdapterActs,
        (dxa, partials): (&mut [f32], &mut [f32]),
        dx: Option<(&mut [f32], bool)>,
        rows: usize,
        ad: Adapter,
    ) {
        let (cin, cout, r) = (self.cin, self.cout, ad.r);
        let (train_a, train_b) = (!g.at(ad.a).is_empty(), !g.at(ad.b).is_empty());
        let seed = acts.dropout_for(&ad);
        let (xa, a) = (&acts.xa[..rows * r], p.at(ad.a));
        let part = lora_partial(r, cin, cout);
        let partials = &mut partials[..self.precision.then_blocks(rows) * part];
        let blocks =
            dxa[..rows * r].par_chunks_mut(self.precision.then_rows(rows) * r).zip(partials.par_chunks_mut(part));
        let block = |first: usize, dx: Option<&mut [f32]>, (dxa, partial): (&mut [f32], &mut [f32])| {
            let n = dxa.len() / r;
            let (dout, xa, x) =
                (&dout[first * cout..][..n * cout], &xa[first * r..][..n * r], &x[first * cin..][..n * cin]);
            let (db, da) = partial.split_at_mut(r * cout);
            if train_b {
                lowrank::outer_sums(xa, dout, db, cout);
            }
            if !train_a && dx.is_none() {
                return;
            }
            lowrank::dot_rows(dout, &acts.bt, dxa, cout);
            dxa.iter_mut().for_each(|v| *v *= ad.scale);
            let dxa = &*dxa;
            let mut da_from = |input: &[f32]| lowrank::outer_sums(dxa, input, da, cin);
            match seed {
                None => {
                    if train_a {
                        da_from(x);
                    }
                    if let Some(dx) = dx {
                        lowrank::add_combinations(dx, dxa, a, cin);
                    }
                }
                Some(seed) => with_scratch(n * cin, |scratch| {
                    let place = (seed, acts.first_row + first);
                    if train_a {
                        da_from(adapter_input(x, scratch, Some(place), ad.dropout, cin));
                    }
                    if let Some(dx) = dx {
                        scratch.fill(0.0);
                        lowrank::add_combinations(scratch, dxa, a, cin);
                        add_through_dropout(dx, scratch, place, ad.dropout, cin);
                    }
                }),
            }
        };
        match dx {
            Some((dx, add_dx)) => {
                let d = Dims { m: rows, k: cout, n: cin };
                let w_layout = self.w_transposed_layout();
                self.precision.matmul_then(
                    dout,
                    Layout::Normal,
                    p.at(self.w),
                    w_layout,
                    dx,
                    d,
                    add_dx,
                    blocks,
                    |first, dx, c| block(first, Some(dx), c),
                );
            }
            None => {
                let _time = profile::scope(profile::Kind::Adapter);
                let height = self.precision.then_rows(rows);
                blocks.enumerate().for_each(|(i, c)| block(i * height, None, c));
            }
        }
        let _time = profile::scope(profile::Kind::Adapter);
        for partial in partials.chunks(part) {
            let (db, da) = partial.split_at(r * cout);
            if train_b {
                add_transposed(g.at_mut(ad.b), db, r);
            }
            if train_a {
                add_to(g.at_mut(ad.a), da);
            }
        }
    }

    /// Writes, adds or skips the input's gradient as `dx` says; adds into the gradients of the
    /// weight, bias and adapter that are not frozen. `acts` is what forward saved for this
    /// layer.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &self,
        p: &ParamMap,
        g: &mut ParamMap,
        dout: &[f32],
        x: &[f32],
        acts: &AdapterActs,
        scratch: &mut AdapterScratch<'_>,
        dx: InputGradient<'_>,
        rows: usize,
    ) {
        let mut dx = dx.target();
        let (cin, cout) = (self.cin, self.cout);
        if let Some(b) = self.b.filter(|b| !g.at(*b).is_empty()) {
            bias_backward(dout, g.at_mut(b));
        }
        // DoRA: the product's gradient is dout scaled per output; the magnitude's is dout . z / norm.
        let dout: &[f32] = match self.adapter.and_then(|ad| ad.magnitude) {
            Some(m) => {
                let _time = profile::scope(profile::Kind::Adapter);
                let (norms, factors) = acts.norm_and_factor.split_at(cout);
                let z = &acts.z[..rows * cout];
                if !g.at(m).is_empty() {
                    // Each task a run of outputs, each summed over the rows in order: the
                    // same bits on any number of threads.
                    let width = cout.div_ceil(2 * rayon::current_num_threads()).next_multiple_of(16);
                    g.at_mut(m).par_chunks_mut(width).enumerate().for_each(|(i, dm)| {
                        let first = i * width;
                        add_magnitude_gradient(dm, dout, z, &norms[first..first + dm.len()], first, cout);
                    });
                }
                let dz = &mut scratch.dz[..rows * cout];
                dz.par_chunks_mut(cout).zip(dout.par_chunks(cout)).for_each(|(dzrow, drow)| {
                    dzrow.iter_mut().zip(drow).zip(factors).for_each(|((z, d), f)| *z = d * f);
                });
                dz
            }
            None => dout,
        };
        let prec = self.precision;
        match (self.adapter, &mut dx) {
            (Some(ad), _) => {
                let adapter_scratch = (&mut *scratch.dxa, &mut *scratch.partials);
                let dx = dx.as_mut().map(|(dx, add)| (&mut **dx, *add));
                self.input_gradient_with_adapter(p, g, dout, x, acts, adapter_scratch, dx, rows, ad)
            }
            (None, Some((dx, add_dx))) => {
                let d = Dims { m: rows, k: cout, n: cin };
                prec.matmul(dout, Layout::Normal, p.at(self.w), self.w_transposed_layout(), dx, d, *add_dx)
            }
            (None, None) => {}
        }
        if !g.at(self.w).is_empty() {
            match self.layout {
                WeightLayout::OutIn => {
                    let d = Dims { m: cout, k: rows, n: cin };
                    prec.matmul(dout, Layout::Transposed, x, Layout::Normal, g.at_mut(self.w), d, true);
                }
                WeightLayout::InOut => {
                    let d = Dims { m: cin, k: rows, n: cout };
                    prec.matmul(x, Layout::Transposed, dout, Layout::Normal, g.at_mut(self.w), d, true);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, probe_loss, random};
    use crate::nn::kernels::matmul::matmul_naive;
    use crate::nn::params::Tensor;

    /// A layer of 5 inputs and 4 outputs with a rank-2 adapter in `layout`, random values.
    fn layer(layout: WeightLayout, dora: bool) -> (Linear, ParamMap) {
        layer_with(layout, dora, 0.0)
    }

    fn layer_with(layout: WeightLayout, dora: bool, dropout: f32) -> (Linear, ParamMap) {
        layer_sized(layout, dora, dropout, (5, 4, 2))
    }

    /// A layer of `cin` inputs and `cout` outputs with a rank-`r` adapter, random values.
    fn layer_sized(
        layout: WeightLayout,
        dora: bool,
        dropout: f32,
        (cin, cout, r): (usize, usize, usize),
    ) -> (Linear, ParamMap) {
        let mut p = ParamMap::default();
        let shape = if layout == WeightLayout::OutIn { [cout, cin] } else { [cin, cout] };
        p.insert("w", Tensor::from_vec(&shape, random(cin * cout, 1)));
        p.insert("b", Tensor::from_vec(&[cout], random(cout, 2)));
        p.insert("a", Tensor::from_vec(&[r, cin], random(r * cin, 3)));
        p.insert("bb", Tensor::from_vec(&[cout, r], random(cout * r, 4)));
        p.insert("m", Tensor::from_vec(&[cout], random(cout, 5).iter().map(|x| 1.0 + x * 0.5).collect()));
        let ad = Adapter {
            a: p.id("a").unwrap(),
            b: p.id("bb").unwrap(),
            r,
            scale: 1.5,
            magnitude: dora.then(|| p.id("m").unwrap()),
            dropout,
        };
        let lin = Linear {
            w: p.id("w").unwrap(),
            b: p.id("b"),
            cin,
            cout,
            layout,
            adapter: Some(ad),
            slot: 0,
            precision: Precision::F32,
        };
        (lin, p)
    }

    /// The dropout seed of [`forward`], a training pass.
    const SEED: u64 = 17;

    fn forward(lin: &Linear, p: &ParamMap, x: &[f32], rows: usize) -> (Vec<f32>, AdapterActs) {
        let ad = lin.adapter.unwrap();
        let shape = AdapterShape { r: 2, cin: lin.cin, cout: lin.cout, dora: ad.magnitude.is_some() };
        let mut acts = AdapterActs::new(rows, shape);
        acts.dropout_seed = Some(SEED);
        let mut out = vec![0.0; rows * lin.cout];
        lin.forward(p, x, &mut out, rows, &mut acts);
        (out, acts)
    }

    /// The adapted weight `W + s B A` as (out, in), formed explicitly.
    fn adapted_weight(lin: &Linear, p: &ParamMap) -> Vec<f32> {
        let ad = lin.adapter.unwrap();
        let (w, a, b) = (p.at(lin.w), p.at(ad.a), p.at(ad.b));
        let mut out = vec![0.0; lin.cout * lin.cin];
        for o in 0..lin.cout {
            for i in 0..lin.cin {
                let wi = if lin.layout == WeightLayout::OutIn { w[o * lin.cin + i] } else { w[i * lin.cout + o] };
                let ba: f32 = (0..ad.r).map(|k| b[o * ad.r + k] * a[k * lin.cin + i]).sum();
                out[o * lin.cin + i] = wi + ad.scale * ba;
            }
        }
        out
    }

    #[test]
    fn dora_rescales_each_output_by_magnitude_over_the_adapted_norm() {
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            let (lin, p) = layer(layout, true);
            let rows = 3;
            let x = random(rows * 5, 6);
            let (out, _) = forward(&lin, &p, &x, rows);
            let w = adapted_weight(&lin, &p);
            for row in 0..rows {
                for o in 0..4 {
                    let wo = &w[o * 5..(o + 1) * 5];
                    let norm = wo.iter().map(|v| v * v).sum::<f32>().sqrt();
                    let z: f32 = wo.iter().zip(&x[row * 5..(row + 1) * 5]).map(|(a, b)| a * b).sum();
                    let want = p.get("m")[o] / norm * z + p.get("b")[o];
                    assert!((out[row * 4 + o] - want).abs() < 1e-5, "{layout:?} [{row}, {o}]");
                }
            }
        }
    }

    /// LoRA's gradients against finite differences; DoRA's against finite differences of the
    /// same forward with its norms held at their values (PEFT detaches them), and the
    /// magnitude's against the true forward (the norms do not depend on it).
    #[test]
    fn adapter_gradients_match_finite_differences() {
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            for (dora, dropout) in [(false, 0.0), (true, 0.0), (false, 0.4), (true, 0.4)] {
                let (lin, p) = layer_with(layout, dora, dropout);
                let rows = 3;
                let x = random(rows * 5, 7);
                let probe = random(rows * 4, 8);
                let (_, acts) = forward(&lin, &p, &x, rows);
                let mut g = p.zeros_like_trainable(|n| n != "w");
                let (mut dxa, mut dz) = (vec![0.0; rows * 2], vec![0.0; rows * 4]);
                let mut partials = vec![0.0; lin.precision.then_blocks(rows) * lora_partial(2, 5, 4)];
                let mut scratch = AdapterScratch { dxa: &mut dxa, dz: &mut dz, partials: &mut partials };
                let mut dx = vec![0.0; rows * 5];
                lin.backward(&p, &mut g, &probe, &x, &acts, &mut scratch, InputGradient::Write(&mut dx), rows);
                let factors: Vec<f32> = if dora { acts.norm_and_factor[4..].to_vec() } else { vec![1.0; 4] };
                // The forward with the norm factors fixed: the plain LoRA layer, scaled.
                let fixed = |p: &ParamMap, x: &[f32]| -> f64 {
                    let plain = Linear { adapter: Some(Adapter { magnitude: None, ..lin.adapter.unwrap() }), ..lin };
                    let (mut out, _) = forward(&plain, p, x, rows);
                    let bias = p.get("b");
                    for row in out.chunks_mut(4) {
                        for o in 0..4 {
                            row[o] = (row[o] - bias[o]) * factors[o] + bias[o];
                        }
                    }
                    probe_loss(&out, &probe)
                };
                let label = |what: &str| format!("{what} ({layout:?}, dora {dora}, dropout {dropout})");
                check(&label("dx"), &x, &dx, |x| fixed(&p, x));
                for name in ["a", "bb", "b"] {
                    check(&label(name), p.get(name), g.get(name), |v| {
                        let mut q = p.clone();
                        q.get_mut(name).copy_from_slice(v);
                        fixed(&q, &x)
                    });
                }
                if dora {
                    check(&label("m"), p.get("m"), g.get("m"), |v| {
                        let mut q = p.clone();
                        q.get_mut("m").copy_from_slice(v);
                        probe_loss(&forward(&lin, &q, &x, rows).0, &probe)
                    });
                }
            }
        }
    }

    /// The adapter's input after dropout, as [`forward`] draws it.
    fn dropped(x: &[f32], first_row: usize, p: f32, cin: usize) -> Vec<f32> {
        let mut out = vec![0.0; x.len()];
        adapter_input(x, &mut out, Some((SEED, first_row)), p, cin);
        out
    }

    /// The mask's integer comparison decides as the draw's uniform rounded to f32 against `p`
    /// would, at the threshold and away from it, and a row's factors are those of its stream
    /// drawn in order.
    #[test]
    fn the_dropout_mask_is_the_streams_uniforms_against_p() {
        for p in [1e-7, 0.05, 0.1, 0.25, 1.0 / 3.0, 0.5, 0.9, 0.99] {
            let mask = DropoutMask::new(p);
            let edges = [mask.below.saturating_sub(1), mask.below, mask.below + 1];
            let mut rng = SplitMix64::new(p.to_bits() as u64);
            for bits in edges.into_iter().chain((0..2000).map(|_| rng.next_u64() >> 11)) {
                assert_eq!(bits < mask.below, DropoutMask::uniform(bits) < p, "p = {p}, draw {bits}");
            }
            let (seed, row, cin) = (99, 3, 37);
            let mut factors = vec![0.0; cin];
            dropout_rows(&vec![1.0; cin], &mut factors, cin, (seed, row), mask, false);
            let mut stream = SplitMix64::new(seed ^ (row as u64 + 1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F));
            for (i, f) in factors.iter().enumerate() {
                let want = if (stream.unit() as f32) < p { 0.0 } else { 1.0 / (1.0 - p) };
                assert_eq!(f.to_bits(), want.to_bits(), "p = {p}, element {i}");
            }
        }
    }

    #[test]
    fn dropout_drops_the_adapters_input_only_in_training() {
        let (lin, p) = layer_with(WeightLayout::OutIn, false, 0.5);
        let (rows, x) = (4, random(4 * 5, 9));
        let x_drop = dropped(&x, 0, 0.5, 5);
        let zeros = x_drop.iter().filter(|v| **v == 0.0).count();
        assert!((4..=16).contains(&zeros), "about half of 20 inputs dropped: {zeros}");
        assert!(x_drop.iter().zip(&x).all(|(d, x)| *d == 0.0 || *d == 2.0 * x), "kept ones scaled by 1/(1-p)");
        let (dropped, acts) = forward(&lin, &p, &x, rows);
        assert_eq!(acts.floats(), rows * 2 + 2 * 4, "the layer keeps x A^T and B^T, no dropped copy of its input");
        let mut xa = vec![0.0; rows * 2];
        let d = Dims { m: rows, k: 5, n: 2 };
        matmul_naive(&x_drop, Layout::Normal, p.get("a"), Layout::Transposed, &mut xa, d, false);
        let scale = lin.adapter.unwrap().scale;
        for (got, want) in acts.xa.iter().zip(&xa) {
            assert!((got - want * scale).abs() < 1e-6, "x A^T of the dropped input: {got} vs {}", want * scale);
        }
        let shape = AdapterShape { r: 2, cin: 5, cout: 4, dora: false };
        let mut eval = AdapterActs::new(rows, shape);
        let mut out = vec![0.0; rows * 4];
        lin.forward(&p, &x, &mut out, rows, &mut eval);
        let plain = Linear { adapter: Some(Adapter { dropout: 0.0, ..lin.adapter.unwrap() }), ..lin };
        assert_eq!(out, forward(&plain, &p, &x, rows).0, "without a seed (evaluation) nothing drops");
        assert_ne!(out, dropped);
        assert_eq!(forward(&lin, &p, &x, rows).0, dropped, "the mask is a function of the seed");
    }

    /// Over many rows a LoRA or DoRA layer runs its adapter block by block inside the weight's
    /// products; forward and backward still compute `x W + s x A^T B^T` (DoRA: rescaled per
    /// output) and its gradients (against plain f64 products, in each layout and precision,
    /// with and without dropout), keeping no copy of the input, and the gradients summed over
    /// the blocks have the same bits on one and two threads.
    #[test]
    fn an_adapter_over_many_blocks_computes_the_plain_products() {
        use crate::nn::gradcheck::on_threads;
        let (cin, cout, r, rows) = (40, 72, 4, 300);
        assert!(Precision::F32.then_blocks(rows) > 2 && Precision::Bf16.then_blocks(rows) > 2, "several blocks");
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            for precision in [Precision::F32, Precision::Bf16] {
                for (dora, dropout) in [(false, 0.0), (false, 0.3), (true, 0.0), (true, 0.3)] {
                    let (lin, p) = layer_sized(layout, dora, dropout, (cin, cout, r));
                    let lin = Linear { precision, ..lin };
                    let ad = lin.adapter.unwrap();
                    let (x, dout) = (random(rows * cin, 11), random(rows * cout, 12));
                    let shape = AdapterShape { r, cin, cout, dora };
                    let run = |threads| {
                        on_threads(threads, || {
                            let mut acts = AdapterActs::new(rows, shape);
                            acts.dropout_seed = Some(5);
                            acts.first_row = 7;
                            let mut out = vec![0.0; rows * cout];
                            lin.product(&p, &x, &mut out, rows, &mut acts);
                            let kept =
                                rows * r + r * cout + if dora { rows * cout + 2 * cout + cout * r + r * r } else { 0 };
                            assert_eq!(
                                acts.floats(),
                                kept,
                                "x A^T, B^T (DoRA: z, norms, W A^T, A A^T), no dropped input"
                            );
                            let mut g = p.zeros_like_trainable(|n| ["a", "bb", "m"].contains(&n));
                            let (mut dxa, mut dz) = (vec![0.0; rows * r], vec![0.0; rows * cout]);
                            let mut partials = vec![0.0; precision.then_blocks(rows) * lora_partial(r, cin, cout)];
                            let mut scratch = AdapterScratch { dxa: &mut dxa, dz: &mut dz, partials: &mut partials };
                            let mut dx = vec![0.0; rows * cin];
                            let dx_out = InputGradient::Write(&mut dx);
                            lin.backward(&p, &mut g, &dout, &x, &acts, &mut scratch, dx_out, rows);
                            (out, dx, g.get("a").to_vec(), g.get("bb").to_vec(), g.get("m").to_vec())
                        })
                    };
                    let (out, dx, da, db, dm) = run(1);
                    let mut x_drop = vec![0.0; rows * cin];
                    adapter_input(&x, &mut x_drop, Some((5, 7)), dropout, cin);
                    let label = format!("{layout:?}, {precision:?}, DoRA {dora}, dropout {dropout}");
                    let two = run(2);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        (bits(&dx), bits(&da), bits(&db), bits(&dm)),
                        (bits(&two.1), bits(&two.2), bits(&two.3), bits(&two.4)),
                        "{label}"
                    );
                    // The reference in f64; the weight's products from bf16-rounded operands in bf16.
                    let round = |v: f32| match precision {
                        Precision::F32 => v as f64,
                        Precision::Bf16 => {
                            use crate::nn::kernels::bf16::{from_bf16, to_bf16};
                            from_bf16(to_bf16(v)) as f64
                        }
                    };
                    let w = |i: usize, o: usize| {
                        let w = p.get("w");
                        if layout == WeightLayout::OutIn {
                            w[o * cin + i]
                        } else {
                            w[i * cout + o]
                        }
                    };
                    let input = if dropout > 0.0 { &x_drop[..] } else { &x[..] };
                    let (a, b, s) = (p.get("a"), p.get("bb"), ad.scale as f64);
                    // DoRA's norms of the adapted weight's rows, and its factors (LoRA: 1).
                    let norms: Vec<f64> = (0..cout)
                        .map(|o| {
                            let adapted = |i: usize| {
                                w(i, o) as f64
                                    + s * (0..r).map(|j| b[o * r + j] as f64 * a[j * cin + i] as f64).sum::<f64>()
                            };
                            (0..cin).map(|i| adapted(i).powi(2)).sum::<f64>().sqrt()
                        })
                        .collect();
                    let factor = |o: usize| if dora { p.get("m")[o] as f64 / norms[o] } else { 1.0 };
                    let xa = |n: usize, j: usize| {
                        (0..cin).map(|i| input[n * cin + i] as f64 * a[j * cin + i] as f64).sum::<f64>() * s
                    };
                    // The adapted product's gradient: dout, rescaled for DoRA.
                    let dz = |n: usize, o: usize| (dout[n * cout + o] as f64 * factor(o)) as f32;
                    let dxa =
                        |n: usize, j: usize| (0..cout).map(|o| dz(n, o) as f64 * b[o * r + j] as f64).sum::<f64>() * s;
                    let close = |what: &str, got: f32, want: f64| {
                        assert!(
                            (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{what} ({label}): {got} vs {want}"
                        );
                    };
                    let mut want_dm = vec![0.0f64; cout];
                    for n in 0..rows {
                        let xan: Vec<f64> = (0..r).map(|j| xa(n, j)).collect();
                        for o in 0..cout {
                            let base: f64 = (0..cin).map(|i| round(x[n * cin + i]) * round(w(i, o))).sum();
                            let lora: f64 = (0..r).map(|j| xan[j] * b[o * r + j] as f64).sum();
                            want_dm[o] += dout[n * cout + o] as f64 * (base + lora) / norms[o];
                            if n % 7 == 0 {
                                close("out", out[n * cout + o], (base + lora) * factor(o));
                            }
                        }
                        if n % 7 != 0 {
                            continue;
                        }
                        let dxan: Vec<f64> = (0..r).map(|j| dxa(n, j)).collect();
                        for i in 0..cin {
                            let base: f64 = (0..cout).map(|o| round(dz(n, o)) * round(w(i, o))).sum();
                            let lora: f64 = (0..r).map(|j| dxan[j] * a[j * cin + i] as f64).sum();
                            let kept = if dropout > 0.0 {
                                if x_drop[n * cin + i] == 0.0 && x[n * cin + i] != 0.0 {
                                    0.0
                                } else {
                                    1.0 / (1.0 - dropout as f64)
                                }
                            } else {
                                1.0
                            };
                            close("dx", dx[n * cin + i], base + lora * kept);
                        }
                    }
                    for j in 0..r {
                        for o in 0..cout {
                            let want: f64 = (0..rows).map(|n| dz(n, o) as f64 * xa(n, j)).sum();
                            close("dB", db[o * r + j], want);
                        }
                        for i in (0..cin).step_by(3) {
                            let want: f64 = (0..rows).map(|n| dxa(n, j) * input[n * cin + i] as f64).sum();
                            close("dA", da[j * cin + i], want);
                        }
                    }
                    if dora {
                        for o in 0..cout {
                            close("dm", dm[o], want_dm[o]);
                        }
                    }
                }
            }
        }
    }

    /// A bf16 layer's forward product and both backward products are those of the operands
    /// rounded to bf16, summed exactly up to f32 rounding; the bias stays f32.
    #[test]
    fn a_bf16_layer_multiplies_rounded_operands() {
        use crate::nn::kernels::bf16::{from_bf16, to_bf16};
        let r = |v: f32| from_bf16(to_bf16(v)) as f64;
        let (cin, cout, rows) = (5, 4, 3);
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            let (lin, p) = layer(layout, false);
            let lin = Linear { adapter: None, precision: Precision::Bf16, ..lin };
            let w = |i: usize, o: usize| {
                let w = p.get("w");
                r(if layout == WeightLayout::OutIn { w[o * cin + i] } else { w[i * cout + o] })
            };
            let (x, dout) = (random(rows * cin, 9), random(rows * cout, 10));
            let mut out = vec![0.0; rows * cout];
            lin.forward(&p, &x, &mut out, rows, &mut AdapterActs::default());
            let mut g = p.zeros_like_trainable(|n| n == "w" || n == "b");
            let mut dx = vec![0.0; rows * cin];
            let mut scratch = AdapterScratch { dxa: &mut [], dz: &mut [], partials: &mut [] };
            let dx_out = InputGradient::Write(&mut dx);
            lin.backward(&p, &mut g, &dout, &x, &AdapterActs::default(), &mut scratch, dx_out, rows);
            let close = |what: &str, got: f32, want: f64| {
                assert!((got as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "{what} {layout:?}: {got} vs {want}");
            };
            for row in 0..rows {
                for o in 0..cout {
                    let want: f64 = (0..cin).map(|i| r(x[row * cin + i]) * w(i, o)).sum::<f64>();
                    let bias = p.get("b")[o];
                    close("forward", out[row * cout + o], (want as f32 + bias) as f64);
                }
                for i in 0..cin {
                    let want: f64 = (0..cout).map(|o| r(dout[row * cout + o]) * w(i, o)).sum();
                    close("dx", dx[row * cin + i], want);
                }
            }
            for i in 0..cin {
                for o in 0..cout {
                    let want: f64 = (0..rows).map(|row| r(x[row * cin + i]) * r(dout[row * cout + o])).sum();
                    let at = if layout == WeightLayout::OutIn { o * cin + i } else { i * cout + o };
                    close("dW", g.get("w")[at], want);
                }
            }
        }
    }
}
