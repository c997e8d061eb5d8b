//! Causal multi-head self-attention with grouped-query heads, and rotary position embeddings.
//!
//! Layouts: `q` and `out` are (B, T, H, D); `k` and `v` are (B, T, Hkv, D) with H a multiple of
//! Hkv (Hkv = H: multi-head; Hkv = 1: multi-query); query head `h` reads key/value head
//! `h / (H / Hkv)`.
//!
//! Several examples may share a row (packing): `pos` (B, T) gives each token's position in its
//! own example, so row `t` starts its example at `t - pos[t]` and sees keys from there to `t`
//! only (block-diagonal causal attention). A row that is one sequence has `pos[t] = t`.
//!
//! The kernels the model uses never hold a (T, T) matrix: forward keeps two numbers per score
//! row (its maximum and inverse sum) and backward recomputes each block's probabilities from
//! them, as flash attention does. The plain references keep the probabilities (B, H, T, T).

use rayon::prelude::*;

use ndarray::linalg::general_mat_mul;
use ndarray::{s, ArrayView2, ArrayView4, ArrayView5, ArrayViewMut2, ArrayViewMut4, ArrayViewMut5, Axis};

use crate::nn::kernels::bf16::product_bf16;
use crate::nn::kernels::{axpy, dot, exp_fast, simd_fn, with_scratch, Precision};

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub h_kv: usize,
    pub d: usize,
}

impl AttnDims {
    fn check(&self) {
        assert!(
            self.h_kv > 0 && self.h.is_multiple_of(self.h_kv),
            "heads {} are not a multiple of kv heads {}",
            self.h,
            self.h_kv
        );
    }
    /// Floats per batch row of q (and out), of k (and v), and of the probabilities.
    fn lens(&self) -> (usize, usize, usize) {
        (self.t * self.h * self.d, self.t * self.h_kv * self.d, self.h * self.t * self.t)
    }
    /// The shapes of q (B, T, H, D) and of k and v (B, T, Hkv, D).
    fn shapes(&self) -> ([usize; 4], [usize; 4]) {
        ([self.b, self.t, self.h, self.d], [self.b, self.t, self.h_kv, self.d])
    }
    /// The shape of a fused q/k/v (B, T, 3, H, D), which has as many key/value heads as query
    /// heads.
    fn fused_shape(&self) -> [usize; 5] {
        assert_eq!(self.h, self.h_kv, "a fused q/k/v has as many key/value heads as query heads");
        [self.b, self.t, 3, self.h, self.d]
    }
    /// Floats per batch row of the forward's row statistics (H, T, 2).
    fn stats_len(&self) -> usize {
        self.h * self.t * 2
    }
    /// Batch row `b` of q-shaped, kv-shaped and kv-shaped inputs.
    fn row<'a>(&self, b: usize, q: &'a [f32], k: &'a [f32], v: &'a [f32]) -> (&'a [f32], &'a [f32], &'a [f32]) {
        let (ql, kl, _) = self.lens();
        (&q[b * ql..(b + 1) * ql], &k[b * kl..(b + 1) * kl], &v[b * kl..(b + 1) * kl])
    }
    fn q_at(&self, t: usize, h: usize) -> usize {
        (t * self.h + h) * self.d
    }
    fn kv_at(&self, t: usize, h: usize) -> usize {
        (t * self.h_kv + h / (self.h / self.h_kv)) * self.d
    }
}

/// Where the kernels read q, k and v.
#[derive(Clone, Copy, Debug)]
pub enum QkvIn<'a> {
    /// Three buffers: q (B, T, H, D), k and v (B, T, Hkv, D).
    Split { q: &'a [f32], k: &'a [f32], v: &'a [f32] },
    /// One (B, T, 3, H, D) buffer, as gpt2's fused projection writes it (H = Hkv), read in
    /// place.
    Fused(&'a [f32]),
}

/// Where [`attention_backward`] writes the gradients of q, k and v: the same two layouts.
#[derive(Debug)]
pub enum QkvOut<'a> {
    Split { dq: &'a mut [f32], dk: &'a mut [f32], dv: &'a mut [f32] },
    Fused(&'a mut [f32]),
}

type Views<'a> = (ArrayView4<'a, f32>, ArrayView4<'a, f32>, ArrayView4<'a, f32>);
type ViewsMut<'a> = (ArrayViewMut4<'a, f32>, ArrayViewMut4<'a, f32>, ArrayViewMut4<'a, f32>);

impl<'a> QkvIn<'a> {
    /// q (B, T, H, D), k and v (B, T, Hkv, D), strided when fused.
    fn views(self, n: AttnDims) -> Views<'a> {
        let (q_shape, kv_shape) = n.shapes();
        match self {
            QkvIn::Split { q, k, v } => (
                ArrayView4::from_shape(q_shape, q).expect("q is (B, T, H, D)"),
                ArrayView4::from_shape(kv_shape, k).expect("k is (B, T, Hkv, D)"),
                ArrayView4::from_shape(kv_shape, v).expect("v is (B, T, Hkv, D)"),
            ),
            QkvIn::Fused(qkv) => {
                let all = ArrayView5::from_shape(n.fused_shape(), qkv).expect("qkv is (B, T, 3, H, D)");
                let part = |i| all.index_axis_move(Axis(2), i);
                (part(0), part(1), part(2))
            }
        }
    }
}

impl<'a> QkvOut<'a> {
    fn views(self, n: AttnDims) -> ViewsMut<'a> {
        let (q_shape, kv_shape) = n.shapes();
        match self {
            QkvOut::Split { dq, dk, dv } => (
                ArrayViewMut4::from_shape(q_shape, dq).expect("dq is (B, T, H, D)"),
                ArrayViewMut4::from_shape(kv_shape, dk).expect("dk is (B, T, Hkv, D)"),
                ArrayViewMut4::from_shape(kv_shape, dv).expect("dv is (B, T, Hkv, D)"),
            ),
            QkvOut::Fused(dqkv) => {
                let all = ArrayViewMut5::from_shape(n.fused_shape(), dqkv).expect("dqkv is (B, T, 3, H, D)");
                let (dq, rest) = all.split_at(Axis(2), 1);
                let (dk, dv) = rest.split_at(Axis(2), 1);
                let part = |x: ArrayViewMut5<'a, f32>| x.index_axis_move(Axis(2), 0);
                (part(dq), part(dk), part(dv))
            }
        }
    }
}

/// Head `h` of batch row `b`: (T, D), rows as far apart as the layout puts them.
fn head<'a>(x: ArrayView4<'a, f32>, b: usize, h: usize) -> ArrayView2<'a, f32> {
    x.index_axis_move(Axis(0), b).index_axis_move(Axis(1), h)
}

/// The keys a block of score rows `r0..r1` (each `t_` wide) may see: columns `k0..r1`, `k0`
/// the start of the example row `r0` belongs to.
fn seen(rows: &[f32], t_: usize, k0: usize, r1: usize) -> ArrayView2<'_, f32> {
    ArrayView2::from_shape((rows.len() / t_, t_), rows).expect("rows * T").slice_move(s![.., k0..r1])
}

fn seen_mut(rows: &mut [f32], t_: usize, k0: usize, r1: usize) -> ArrayViewMut2<'_, f32> {
    ArrayViewMut2::from_shape((rows.len() / t_, t_), rows).expect("rows * T").slice_move(s![.., k0..r1])
}

/// The first key of the query block starting at row `r0`: where its example starts. Starts
/// only grow along a row, so no row of the block sees an earlier key.
fn block_start(pos: &[u32], r0: usize) -> usize {
    r0 - pos[r0] as usize
}

/// Checks that `pos` (B, T) numbers each example of each row 0, 1, 2, ...: every token is
/// either at position 0 or one after the token before it.
///
/// # Panics
/// If it does not: the batch was built wrong, a bug.
pub fn check_positions(pos: &[u32], t_: usize) {
    assert!(t_ > 0 && pos.len().is_multiple_of(t_), "positions are not (B, T)");
    for row in pos.chunks(t_) {
        assert_eq!(row[0], 0, "a row starts an example");
        assert!(row.windows(2).all(|w| w[1] == 0 || w[1] == w[0] + 1), "positions restart at 0 or count up by 1");
    }
}

/// Query rows per block: a block of rows `r0..r1` needs keys `0..r1` only, so the products
/// skip most of the masked upper triangle (all of it above the diagonal blocks).
const QB: usize = 32;

/// `out = alpha a b + beta out`, `beta` 0 or 1: ndarray's `general_mat_mul` in f32; in bf16
/// [`product_bf16`] (on this thread), then scaled by `alpha`, which only a product without
/// `beta` may ask for.
fn product(
    precision: Precision,
    alpha: f32,
    a: &ArrayView2<f32>,
    b: &ArrayView2<f32>,
    beta: f32,
    out: &mut ArrayViewMut2<f32>,
) {
    match precision {
        Precision::F32 => general_mat_mul(alpha, a, b, beta, out),
        Precision::Bf16 => {
            assert!(beta == 0.0 || (beta == 1.0 && alpha == 1.0), "a bf16 product scales only a fresh output");
            product_bf16(a.view(), b.view(), out.view_mut(), beta == 1.0);
            if alpha != 1.0 {
                // Row by row: each row is contiguous, the view as a whole is not (ndarray
                // maps a strided 2-D view element by element).
                for mut row in out.rows_mut() {
                    match row.as_slice_mut() {
                        Some(row) => row.iter_mut().for_each(|x| *x *= alpha),
                        None => row.map_inplace(|x| *x *= alpha),
                    }
                }
            }
        }
    }
}

/// `out = softmax(q k^T / sqrt(D) + mask) v`, per batch row and head, the mask causal within
/// each example of `pos` (B, T; see the module doc); `stats` (B, H, T, 2)
/// receives each score row's maximum and inverse sum, from which backward recomputes the
/// probabilities instead of keeping them.
///
/// Each (batch row, head) is one rayon task and runs in blocks of [`QB`] query rows: two matrix
/// products on the block's scores against the keys it may see (ndarray's `general_mat_mul`)
/// and a row-wise causal softmax between them, in a (QB, T) scratch: no (T, T) matrix is held.
/// A block starts its keys where the example of its first row starts, so the keys of earlier
/// examples in a packed row are skipped, not computed and discarded.
/// A task's arithmetic does not depend on which thread runs it, so neither do the bits.
/// [`attention_forward_plain`], one dot product at a time, is the reference. In
/// [`Precision::Bf16`] both products round their operands to bf16 ([`product_bf16`]); the
/// softmax stays f32.
pub fn attention_forward(
    qkv: QkvIn,
    pos: &[u32],
    out: &mut [f32],
    stats: &mut [f32],
    n: AttnDims,
    precision: Precision,
) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Attention);
    n.check();
    assert_eq!(pos.len(), n.b * n.t, "positions are (B, T)");
    let (t_, d, group) = (n.t, n.d, n.h / n.h_kv);
    let scale = 1.0 / (d as f32).sqrt();
    let (q, k, v) = qkv.views(n);
    let mut out = ArrayViewMut4::from_shape(n.shapes().0, out).expect("out is (B, T, H, D)");
    out.axis_iter_mut(Axis(0)).into_par_iter().zip(stats.par_chunks_mut(n.stats_len())).enumerate().for_each(
        |(b, (mut out, stats))| {
            out.axis_iter_mut(Axis(1)).into_par_iter().zip(stats.par_chunks_mut(t_ * 2)).enumerate().for_each(
                |(h, (mut out, stats))| {
                    let kv = h / group;
                    let (qh, kh, vh) = (head(q, b, h), head(k, b, kv), head(v, b, kv));
                    let pos = &pos[b * t_..(b + 1) * t_];
                    with_scratch(QB.min(t_) * t_, |scratch| {
                        for r0 in (0..t_).step_by(QB) {
                            let (r1, k0) = ((r0 + QB).min(t_), block_start(pos, r0));
                            let rows = &mut scratch[..(r1 - r0) * t_];
                            scores(precision, scale, &qh, &kh, r0, r1, k0, rows, t_);
                            causal_softmax(rows, t_, r0, &pos[r0..r1], &mut stats[r0 * 2..r1 * 2]);
                            let mut out_rows = out.slice_mut(s![r0..r1, ..]);
                            let vs = vh.slice(s![k0..r1, ..]);
                            product(precision, 1.0, &seen(rows, t_, k0, r1), &vs, 0.0, &mut out_rows);
                        }
                    });
                },
            );
        },
    );
}

/// The scaled scores of query rows `r0..r1` against keys `k0..r1`, into `rows` ((r1 - r0)
/// rows, T wide; the other columns are left alone).
#[allow(clippy::too_many_arguments)] // slices and dims, as every kernel
fn scores(
    precision: Precision,
    scale: f32,
    qh: &ArrayView2<f32>,
    kh: &ArrayView2<f32>,
    r0: usize,
    r1: usize,
    k0: usize,
    rows: &mut [f32],
    t_: usize,
) {
    let mut scores = seen_mut(rows, t_, k0, r1);
    product(precision, scale, &qh.slice(s![r0..r1, ..]), &kh.slice(s![k0..r1, ..]).t(), 0.0, &mut scores);
}

/// The columns row `t` of a block sees: from its example's start `t - pos` to `t`.
#[inline(always)]
fn seen_cols(t: usize, pos: u32) -> std::ops::RangeInclusive<usize> {
    t - pos as usize..=t
}

/// Rows whose sums [`causal_softmax`] runs side by side.
const LOCKSTEP: usize = 8;

simd_fn! {
    /// Softmax in place over each row of `rows` (T wide), whose first row is position `first`
    /// and whose positions in their examples are `pos`: row `t` keeps the columns it sees
    /// ([`seen_cols`]) and zeroes the rest; its maximum and inverse sum go to `stats[2i..2i + 2]`.
    /// Exponentials by [`exp_fast`]. Each row's sum adds its exponentials along the row in
    /// order, one chain per row, as a plain loop would; [`LOCKSTEP`] rows run their chains side
    /// by side over the columns any of them sees (a column a row does not see adds 0 to its
    /// positive sum, which changes nothing), so the chains' latencies overlap instead of adding
    /// up. A maximum is the same whatever the order, so it runs across the row's lanes.
    fn causal_softmax(rows: &mut [f32], t_: usize, first: usize, pos: &[u32], stats: &mut [f32]) {
        let groups = rows.chunks_mut(LOCKSTEP * t_).zip(stats.chunks_mut(2 * LOCKSTEP).zip(pos.chunks(LOCKSTEP)));
        for (g, (group, (stats, pos))) in groups.enumerate() {
            let first = first + g * LOCKSTEP;
            let mut max = [0.0f32; LOCKSTEP];
            for (i, row) in group.chunks_exact_mut(t_).enumerate() {
                let cols = seen_cols(first + i, pos[i]);
                max[i] = row_max(row, cols.clone());
                exp_row(row, cols.clone(), max[i]);
                mask_row(row, cols);
            }
            let n = group.len() / t_;
            let (lo, hi) = (first - pos[0] as usize, first + n - 1);
            let len = hi + 1 - lo;
            let rows: [&[f32]; LOCKSTEP] = std::array::from_fn(|i| &group[i.min(n - 1) * t_ + lo..][..len]);
            let mut sum = [0.0f32; LOCKSTEP];
            for j in 0..len {
                for (s, row) in sum.iter_mut().zip(&rows) {
                    *s += row[j];
                }
            }
            for (i, (row, stats)) in group.chunks_exact_mut(t_).zip(stats.chunks_exact_mut(2)).enumerate() {
                let inv = 1.0 / sum[i];
                for p in &mut row[seen_cols(first + i, pos[i])] {
                    *p *= inv;
                }
                stats.copy_from_slice(&[max[i], inv]);
            }
        }
    }
}

/// Lanes of the vectors [`exp_row`] and [`row_max`] work in.
const LANES: usize = 16;

/// Where in a row of `len` columns the whole vectors covering `cols` lie: a window of a
/// multiple of [`LANES`] columns (or the whole row) that holds `cols`.
#[inline(always)]
fn window(len: usize, cols: &std::ops::RangeInclusive<usize>) -> std::ops::Range<usize> {
    let width = (cols.end() + 1 - cols.start()).next_multiple_of(LANES).min(len);
    let lo = (*cols.start()).min(len - width);
    lo..lo + width
}

/// The largest of `row[cols]`, lanes across the row: the same value as a fold along it.
#[inline(always)]
fn row_max(row: &[f32], cols: std::ops::RangeInclusive<usize>) -> f32 {
    let at = window(row.len(), &cols);
    let (first, last) = (*cols.start(), *cols.end());
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for (c, chunk) in row[at.clone()].chunks(LANES).enumerate() {
        for (i, (l, v)) in lanes.iter_mut().zip(chunk).enumerate() {
            let j = at.start + c * LANES + i;
            *l = l.max(if j >= first && j <= last { *v } else { f32::NEG_INFINITY });
        }
    }
    lanes.into_iter().fold(f32::NEG_INFINITY, f32::max)
}

/// [`causal_softmax`] one row at a time, the plain loops it must equal bit for bit.
#[cfg(test)]
fn causal_softmax_by_rows(rows: &mut [f32], t_: usize, first: usize, pos: &[u32], stats: &mut [f32]) {
    for (i, (row, stats)) in rows.chunks_exact_mut(t_).zip(stats.chunks_exact_mut(2)).enumerate() {
        let cols = seen_cols(first + i, pos[i]);
        let max = row[cols.clone()].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv = 1.0 / exp_row(row, cols.clone(), max).iter().sum::<f32>();
        normalize_row(row, cols, inv);
        stats.copy_from_slice(&[max, inv]);
    }
}

simd_fn! {
    /// The probabilities [`causal_softmax`] made, again, from the same scores and its `stats`:
    /// the same row helpers, so the same bits.
    fn causal_probs(rows: &mut [f32], t_: usize, first: usize, pos: &[u32], stats: &[f32]) {
        for (i, (row, stats)) in rows.chunks_exact_mut(t_).zip(stats.chunks_exact(2)).enumerate() {
            let cols = seen_cols(first + i, pos[i]);
            exp_row(row, cols.clone(), stats[0]);
            normalize_row(row, cols, stats[1]);
        }
    }
}

/// `row[s] = e^(row[s] - max)` for the columns `cols` a position sees, and returns them; in
/// whole vectors ([`window`]), so the columns around them hold anything after.
#[inline(always)]
fn exp_row(row: &mut [f32], cols: std::ops::RangeInclusive<usize>, max: f32) -> &[f32] {
    let at = window(row.len(), &cols);
    for p in &mut row[at] {
        *p = exp_fast(*p - max);
    }
    &row[cols]
}

/// Scales the seen columns `cols` by `inv` and zeroes the masked ones before and after them.
#[inline(always)]
fn normalize_row(row: &mut [f32], cols: std::ops::RangeInclusive<usize>, inv: f32) {
    for p in mask_row(row, cols) {
        *p *= inv;
    }
}

/// Zeroes the columns of `row` outside `cols`; returns the seen ones.
#[inline(always)]
fn mask_row(row: &mut [f32], cols: std::ops::RangeInclusive<usize>) -> &mut [f32] {
    let (before, rest) = row.split_at_mut(*cols.start());
    let (seen, after) = rest.split_at_mut(cols.end() + 1 - cols.start());
    before.fill(0.0);
    after.fill(0.0);
    seen
}

simd_fn! {
    /// Softmax backward in place on the rows of `ds` (dP in, dS out) with the probabilities:
    /// `dS = P (dP - sum(P dP)) / sqrt(D)` on the seen columns, 0 elsewhere.
    fn causal_softmax_backward(ds: &mut [f32], probs: &[f32], t_: usize, first: usize, pos: &[u32], scale: f32) {
        for (i, (ds, p)) in ds.chunks_exact_mut(t_).zip(probs.chunks_exact(t_)).enumerate() {
            let cols = seen_cols(first + i, pos[i]);
            let inner = dot(&p[cols.clone()], &ds[cols.clone()]);
            for (d, &p) in ds[cols.clone()].iter_mut().zip(&p[cols.clone()]) {
                *d = p * (*d - inner) * scale;
            }
            ds[..*cols.start()].fill(0.0);
            ds[cols.end() + 1..].fill(0.0);
        }
    }
}

/// Gradients of [`attention_forward`] from its `stats` (with the same `pos`): writes `dq`, `dk`,
/// `dv`.
///
/// Each (batch row, key/value head) is one rayon task, which runs the group's query heads in
/// head order and each head's query blocks in order, recomputing the block's probabilities,
/// so a key/value gradient sums its terms in an order fixed by the shapes alone. Its products
/// are in `precision`, as forward's were.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dout: &[f32],
    qkv: QkvIn,
    pos: &[u32],
    stats: &[f32],
    grads: QkvOut,
    n: AttnDims,
    precision: Precision,
) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Attention);
    n.check();
    assert_eq!(pos.len(), n.b * n.t, "positions are (B, T)");
    let (t_, d, group) = (n.t, n.d, n.h / n.h_kv);
    let scale = 1.0 / (d as f32).sqrt();
    let (q, k, v) = qkv.views(n);
    let dout = ArrayView4::from_shape(n.shapes().0, dout).expect("dout is (B, T, H, D)");
    let (mut dq, mut dk, mut dv) = grads.views(n);
    let batch_rows =
        dq.axis_iter_mut(Axis(0)).into_par_iter().zip(dk.axis_iter_mut(Axis(0))).zip(dv.axis_iter_mut(Axis(0)));
    batch_rows.enumerate().for_each(|(b, ((mut dq, mut dk), mut dv))| {
        let stats = &stats[b * n.stats_len()..(b + 1) * n.stats_len()];
        let pos = &pos[b * t_..(b + 1) * t_];
        let kv_heads = dq
            .axis_chunks_iter_mut(Axis(1), group)
            .into_par_iter()
            .zip(dk.axis_iter_mut(Axis(1)))
            .zip(dv.axis_iter_mut(Axis(1)));
        kv_heads.enumerate().for_each(|(kv, ((mut dq, mut dk), mut dv))| {
            let (kh, vh) = (head(k, b, kv), head(v, b, kv));
            dk.fill(0.0);
            dv.fill(0.0);
            let rows = QB.min(t_) * t_;
            with_scratch(2 * rows, |scratch| {
                let (probs, ds) = scratch.split_at_mut(rows);
                for (j, mut dq) in dq.axis_iter_mut(Axis(1)).enumerate() {
                    let h = kv * group + j;
                    let (qh, dout_h) = (head(q, b, h), head(dout, b, h));
                    let stats = &stats[h * t_ * 2..(h + 1) * t_ * 2];
                    for r0 in (0..t_).step_by(QB) {
                        let (r1, k0) = ((r0 + QB).min(t_), block_start(pos, r0));
                        let block_pos = &pos[r0..r1];
                        let probs = &mut probs[..(r1 - r0) * t_];
                        scores(precision, scale, &qh, &kh, r0, r1, k0, probs, t_);
                        causal_probs(probs, t_, r0, block_pos, &stats[r0 * 2..r1 * 2]);
                        let dout_rows = dout_h.slice(s![r0..r1, ..]);
                        // dV[k0..r1] += P^T dO; dP = dO V[k0..r1]^T.
                        let probs_t = seen(probs, t_, k0, r1).reversed_axes();
                        product(precision, 1.0, &probs_t, &dout_rows, 1.0, &mut dv.slice_mut(s![k0..r1, ..]));
                        let ds = &mut ds[..(r1 - r0) * t_];
                        let vs = vh.slice(s![k0..r1, ..]);
                        product(precision, 1.0, &dout_rows, &vs.t(), 0.0, &mut seen_mut(ds, t_, k0, r1));
                        causal_softmax_backward(ds, probs, t_, r0, block_pos, scale);
                        let dscores = seen(ds, t_, k0, r1);
                        // dQ = dS K[k0..r1]; dK[k0..r1] += dS^T Q.
                        let ks = kh.slice(s![k0..r1, ..]);
                        product(precision, 1.0, &dscores, &ks, 0.0, &mut dq.slice_mut(s![r0..r1, ..]));
                        let q_rows = qh.slice(s![r0..r1, ..]);
                        product(precision, 1.0, &dscores.t(), &q_rows, 1.0, &mut dk.slice_mut(s![k0..r1, ..]));
                    }
                }
            });
        });
    });
}

/// The reference for [`attention_forward`]: one dot product at a time.
pub fn attention_forward_plain(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pos: &[u32],
    out: &mut [f32],
    att: &mut [f32],
    n: AttnDims,
) {
    n.check();
    let (t_, d) = (n.t, n.d);
    let scale = 1.0 / (d as f32).sqrt();
    let (q_len, _, att_len) = n.lens();
    out.par_chunks_mut(q_len).zip(att.par_chunks_mut(att_len)).enumerate().for_each(|(b, (out, att))| {
        let (q, k, v) = n.row(b, q, k, v);
        let pos = &pos[b * t_..(b + 1) * t_];
        for h in 0..n.h {
            for t in 0..t_ {
                let start = t - pos[t] as usize;
                let qt = &q[n.q_at(t, h)..n.q_at(t, h) + d];
                let row = &mut att[(h * t_ + t) * t_..(h * t_ + t + 1) * t_];
                row.fill(0.0);
                let mut max = f32::NEG_INFINITY;
                for s in start..=t {
                    let ks = &k[n.kv_at(s, h)..n.kv_at(s, h) + d];
                    row[s] = dot(qt, ks) * scale;
                    max = max.max(row[s]);
                }
                let mut sum = 0.0f32;
                for p in &mut row[start..=t] {
                    *p = (*p - max).exp();
                    sum += *p;
                }
                for p in &mut row[start..=t] {
                    *p /= sum;
                }
                let o = &mut out[n.q_at(t, h)..n.q_at(t, h) + d];
                o.fill(0.0);
                for s in start..=t {
                    axpy(row[s], &v[n.kv_at(s, h)..n.kv_at(s, h) + d], o);
                }
            }
        }
    });
}

/// The reference for [`attention_backward`].
#[allow(clippy::too_many_arguments)] // slices and dims, as every kernel
pub fn attention_backward_plain(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pos: &[u32],
    att: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    n: AttnDims,
) {
    n.check();
    let (t_, d) = (n.t, n.d);
    let scale = 1.0 / (d as f32).sqrt();
    let (q_len, kv_len, att_len) = n.lens();
    dq.par_chunks_mut(q_len).zip(dk.par_chunks_mut(kv_len).zip(dv.par_chunks_mut(kv_len))).enumerate().for_each(
        |(b, (dq, (dk, dv)))| {
            let (q, k, v) = n.row(b, q, k, v);
            let (dout, att) = (&dout[b * q_len..(b + 1) * q_len], &att[b * att_len..(b + 1) * att_len]);
            let pos = &pos[b * t_..(b + 1) * t_];
            dq.fill(0.0);
            dk.fill(0.0);
            dv.fill(0.0);
            let mut datt = vec![0.0f32; t_];
            for h in 0..n.h {
                for t in 0..t_ {
                    let start = t - pos[t] as usize;
                    let p = &att[(h * t_ + t) * t_..(h * t_ + t + 1) * t_];
                    let dout_t = &dout[n.q_at(t, h)..n.q_at(t, h) + d];
                    // dp_s = dout_t . v_s; dv_s += p_s dout_t
                    for s in start..=t {
                        let at = n.kv_at(s, h);
                        datt[s] = dot(dout_t, &v[at..at + d]);
                        axpy(p[s], dout_t, &mut dv[at..at + d]);
                    }
                    // Softmax backward: dscore_s = p_s (dp_s - sum_r p_r dp_r).
                    let inner: f32 = (start..=t).map(|s| p[s] * datt[s]).sum();
                    for s in start..=t {
                        let ds = p[s] * (datt[s] - inner) * scale;
                        let (qa, ka) = (n.q_at(t, h), n.kv_at(s, h));
                        axpy(ds, &k[ka..ka + d], &mut dq[qa..qa + d]);
                        axpy(ds, &q[qa..qa + d], &mut dk[ka..ka + d]);
                    }
                }
            }
        },
    );
}

/// Rotary position embedding in place on (B, T, H, D), in Hugging Face llama's convention:
/// dimension `i` pairs with `i + D/2`, rotated by `pos * theta^(-2i/D)`, where token `r` sits at
/// position `pos[r]` (its place in its example; after a KV cache's positions when decoding).
/// `inverse` rotates back, which is also the backward (the rotation is orthogonal).
pub fn rope(x: &mut [f32], pos: &[u32], h: usize, d: usize, theta: f32, inverse: bool) {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::Attention);
    assert!(d.is_multiple_of(2), "rotary embeddings need an even head size, not {d}");
    assert_eq!(x.len(), pos.len() * h * d, "x is not (B, T, H, D)");
    let half = d / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    x.par_chunks_mut(h * d).zip(pos).for_each(|(heads, &pos)| {
        let pos = pos as f32;
        // Each angle once per token, for all its heads.
        for i in 0..half {
            let freq = theta.powf(-2.0 * i as f32 / d as f32);
            let (sin, cos) = (pos * freq).sin_cos();
            for head in heads.chunks_mut(d) {
                let (a, c) = (head[i], head[i + half]);
                head[i] = a * cos - sign * c * sin;
                head[i + half] = c * cos + sign * a * sin;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, probe_loss, random};
    use Precision::F32;

    /// Positions of rows that are one sequence each.
    fn whole(n: AttnDims) -> Vec<u32> {
        (0..n.b * n.t).map(|r| (r % n.t) as u32).collect()
    }

    /// Positions of rows that pack examples of the given lengths, over and over.
    fn packed(n: AttnDims, lens: &[usize]) -> Vec<u32> {
        let mut pos = Vec::new();
        for _ in 0..n.b {
            let row: Vec<u32> = lens.iter().cycle().flat_map(|&l| 0..l as u32).take(n.t).collect();
            pos.extend(row);
        }
        pos
    }

    fn forward_at(q: &[f32], k: &[f32], v: &[f32], pos: &[u32], n: AttnDims) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![0.0; n.b * n.t * n.h * n.d];
        let mut stats = vec![0.0; n.b * n.h * n.t * 2];
        attention_forward(QkvIn::Split { q, k, v }, pos, &mut out, &mut stats, n, F32);
        (out, stats)
    }

    fn forward(q: &[f32], k: &[f32], v: &[f32], n: AttnDims) -> (Vec<f32>, Vec<f32>) {
        forward_at(q, k, v, &whole(n), n)
    }

    /// In bf16 both the forward and the backward products round their operands: other bits
    /// than f32, within bf16's precision of them, on packed rows and grouped heads, fused and
    /// split.
    #[test]
    fn bf16_attention_is_f32_attention_to_bf16_precision() {
        let n = AttnDims { b: 2, t: 70, h: 4, h_kv: 2, d: 32 };
        let pos = packed(n, &[40, 30]);
        let (qn, kn) = (n.b * n.t * n.h * n.d, n.b * n.t * n.h_kv * n.d);
        let (q, k, v, dout) = (random(qn, 1), random(kn, 2), random(kn, 3), random(qn, 4));
        let run = |precision: Precision| {
            let (mut out, mut stats) = (vec![0.0; qn], vec![0.0; n.b * n.h * n.t * 2]);
            attention_forward(QkvIn::Split { q: &q, k: &k, v: &v }, &pos, &mut out, &mut stats, n, precision);
            let (mut dq, mut dk, mut dv) = (vec![9.0; qn], vec![9.0; kn], vec![9.0; kn]);
            let grads = QkvOut::Split { dq: &mut dq, dk: &mut dk, dv: &mut dv };
            attention_backward(&dout, QkvIn::Split { q: &q, k: &k, v: &v }, &pos, &stats, grads, n, precision);
            [out, dq, dk, dv]
        };
        let (f32s, bf16s) = (run(F32), run(Precision::Bf16));
        for (what, (x, y)) in ["out", "dq", "dk", "dv"].iter().zip(f32s.iter().zip(&bf16s)) {
            let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let worst = x.iter().zip(y).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst <= 0.02 * scale, "{what}: off by {worst} of {scale}");
            assert!(x != y, "{what}: bf16 gave the bits of f32");
        }
    }

    #[test]
    fn the_first_position_sees_only_itself_and_rows_sum_to_one() {
        let n = AttnDims { b: 2, t: 4, h: 2, h_kv: 2, d: 3 };
        let (q, k, v) = (random(48, 1), random(48, 2), random(48, 3));
        let (out, stats) = forward(&q, &k, &v, n);
        let (mut out_ref, mut att) = (vec![0.0; 48], vec![0.0; 2 * 2 * 4 * 4]);
        attention_forward_plain(&q, &k, &v, &whole(n), &mut out_ref, &mut att, n);
        for b in 0..2 {
            for h in 0..2 {
                let at = (b * 4 * 2 + h) * 3;
                assert_eq!(&out[at..at + 3], &v[at..at + 3], "t = 0 copies its own value");
                assert_eq!(&out_ref[at..at + 3], &v[at..at + 3], "t = 0 copies its own value (plain)");
                assert_eq!(stats[(b * 2 + h) * 4 * 2 + 1], 1.0, "t = 0 sums one probability of 1");
                for t in 0..4 {
                    let row = &att[((b * 2 + h) * 4 + t) * 4..((b * 2 + h) * 4 + t + 1) * 4];
                    assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
                    assert!(row[t + 1..].iter().all(|p| *p == 0.0), "causal");
                }
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences_for_multi_head_grouped_and_multi_query() {
        for h_kv in [4, 2, 1] {
            let n = AttnDims { b: 2, t: 3, h: 4, h_kv, d: 2 };
            let (qn, kn) = (n.b * n.t * n.h * n.d, n.b * n.t * h_kv * n.d);
            let (q, k, v, probe) = (random(qn, 4), random(kn, 5), random(kn, 6), random(qn, 7));
            let (_, stats) = forward(&q, &k, &v, n);
            let (mut dq, mut dk, mut dv) = (vec![0.0; qn], vec![0.0; kn], vec![0.0; kn]);
            let grads = QkvOut::Split { dq: &mut dq, dk: &mut dk, dv: &mut dv };
            attention_backward(&probe, QkvIn::Split { q: &q, k: &k, v: &v }, &whole(n), &stats, grads, n, F32);
            check(&format!("dq (kv heads {h_kv})"), &q, &dq, |q| probe_loss(&forward(q, &k, &v, n).0, &probe));
            check(&format!("dk (kv heads {h_kv})"), &k, &dk, |k| probe_loss(&forward(&q, k, &v, n).0, &probe));
            check(&format!("dv (kv heads {h_kv})"), &v, &dv, |v| probe_loss(&forward(&q, &k, v, n).0, &probe));
        }
    }

    /// Rows side by side sum as rows one at a time: whole rows and packed ones, a last group
    /// short of [`LOCKSTEP`], scores large enough that exponentials underflow.
    #[test]
    fn softmax_in_lockstep_has_the_bits_of_one_row_at_a_time() {
        for (t_, first, rows, period) in [(64, 0, 32, 64), (64, 32, 32, 64), (40, 7, 19, 4), (9, 0, 9, 3), (5, 4, 1, 9)]
        {
            let scores: Vec<f32> = random(rows * t_, 13).iter().map(|x| x * 60.0).collect();
            let pos: Vec<u32> = (first..first + rows).map(|t| (t % period) as u32).collect();
            let (mut lockstep, mut stats) = (scores.clone(), vec![0.0; rows * 2]);
            causal_softmax(&mut lockstep, t_, first, &pos, &mut stats);
            let (mut by_rows, mut stats_by_rows) = (scores.clone(), vec![0.0; rows * 2]);
            causal_softmax_by_rows(&mut by_rows, t_, first, &pos, &mut stats_by_rows);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&lockstep), bits(&by_rows), "T {t_}, rows {first}..{}", first + rows);
            assert_eq!(bits(&stats), bits(&stats_by_rows));
        }
    }

    #[test]
    fn probabilities_recomputed_from_the_row_statistics_are_the_same_bits() {
        let (t_, first, rows) = (40, 7, 5);
        let scores: Vec<f32> = random(rows * t_, 12).iter().map(|x| x * 6.0).collect();
        let pos: Vec<u32> = (first..first + rows).map(|t| t as u32 % 4).collect();
        let (mut probs, mut stats) = (scores.clone(), vec![0.0; rows * 2]);
        causal_softmax(&mut probs, t_, first, &pos, &mut stats);
        let mut again = scores.clone();
        causal_probs(&mut again, t_, first, &pos, &stats);
        assert_eq!(probs, again);
        for (i, row) in probs.chunks(t_).enumerate() {
            let cols = seen_cols(first + i, pos[i]);
            assert!(row[..*cols.start()].iter().chain(&row[cols.end() + 1..]).all(|p| *p == 0.0));
        }
    }

    #[test]
    fn the_blocked_version_matches_the_plain_one() {
        // Lengths below, at and past the query block, with a partial last block; whole rows and
        // rows packing examples shorter and longer than a block.
        let cases =
            [(4, 4, 9, 0), (4, 2, 16, 0), (6, 1, 5, 0), (2, 2, 64, 0), (4, 2, 75, 0), (4, 2, 75, 1), (2, 1, 9, 2)];
        for (h, h_kv, t, packing) in cases {
            let n = AttnDims { b: 3, t, h, h_kv, d: 8 };
            let pos = match packing {
                0 => whole(n),
                1 => packed(n, &[40, 7, 1, 30]),
                _ => packed(n, &[3, 1, 2]),
            };
            let (qn, kn) = (n.b * t * h * 8, n.b * t * h_kv * 8);
            let (q, k, v, dout) = (random(qn, 1), random(kn, 2), random(kn, 3), random(qn, 4));
            let (out, stats) = forward_at(&q, &k, &v, &pos, n);
            let (mut out_ref, mut att_ref) = (vec![0.0; qn], vec![0.0; n.b * h * t * t]);
            attention_forward_plain(&q, &k, &v, &pos, &mut out_ref, &mut att_ref, n);
            let close = |a: &[f32], b: &[f32], what: &str| {
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{what}[{i}] ({h}/{h_kv} heads): {x} vs {y}");
                }
            };
            close(&out, &out_ref, "out");
            let (mut dq, mut dk, mut dv) = (vec![9.0; qn], vec![9.0; kn], vec![9.0; kn]);
            let grads = QkvOut::Split { dq: &mut dq, dk: &mut dk, dv: &mut dv };
            attention_backward(&dout, QkvIn::Split { q: &q, k: &k, v: &v }, &pos, &stats, grads, n, F32);
            let (mut dq_ref, mut dk_ref, mut dv_ref) = (vec![9.0; qn], vec![9.0; kn], vec![9.0; kn]);
            attention_backward_plain(&dout, &q, &k, &v, &pos, &att_ref, &mut dq_ref, &mut dk_ref, &mut dv_ref, n);
            close(&dq, &dq_ref, "dq");
            close(&dk, &dk_ref, "dk");
            close(&dv, &dv_ref, "dv");
        }
    }

    #[test]
    fn a_fused_qkv_read_and_written_in_place_gives_the_bits_of_split_buffers() {
        let n = AttnDims { b: 2, t: 37, h: 3, h_kv: 3, d: 4 };
        let len = n.b * n.t * n.h * n.d;
        let (q, k, v, dout) = (random(len, 1), random(len, 2), random(len, 3), random(len, 4));
        let c = n.h * n.d;
        let fused: Vec<f32> =
            (0..n.b * n.t).flat_map(|r| [&q, &k, &v].map(|x| &x[r * c..(r + 1) * c]).concat()).collect();
        let (out, stats) = forward(&q, &k, &v, n);
        let (mut out_fused, mut stats_fused) = (vec![0.0; len], vec![0.0; stats.len()]);
        let pos = whole(n);
        attention_forward(QkvIn::Fused(&fused), &pos, &mut out_fused, &mut stats_fused, n, F32);
        assert_eq!((&out, &stats), (&out_fused, &stats_fused));
        let (mut dq, mut dk, mut dv) = (vec![0.0; len], vec![0.0; len], vec![0.0; len]);
        let grads = QkvOut::Split { dq: &mut dq, dk: &mut dk, dv: &mut dv };
        attention_backward(&dout, QkvIn::Split { q: &q, k: &k, v: &v }, &pos, &stats, grads, n, F32);
        let mut dqkv = vec![9.0; 3 * len];
        attention_backward(&dout, QkvIn::Fused(&fused), &pos, &stats, QkvOut::Fused(&mut dqkv), n, F32);
        let want: Vec<f32> =
            (0..n.b * n.t).flat_map(|r| [&dq, &dk, &dv].map(|x| &x[r * c..(r + 1) * c]).concat()).collect();
        assert_eq!(dqkv, want);
    }

    #[test]
    fn rope_depends_only_on_relative_position_and_inverts() {
        let (t, d) = (6, 8);
        let base_q = random(d, 8);
        let base_k = random(d, 9);
        // The same q and k at every position.
        let mut q: Vec<f32> = (0..t).flat_map(|_| base_q.clone()).collect();
        let mut k: Vec<f32> = (0..t).flat_map(|_| base_k.clone()).collect();
        let original = q.clone();
        let pos: Vec<u32> = (0..t as u32).collect();
        rope(&mut q, &pos, 1, d, 10_000.0, false);
        rope(&mut k, &pos, 1, d, 10_000.0, false);
        let dot = |m: usize, n: usize| -> f32 { (0..d).map(|i| q[m * d + i] * k[n * d + i]).sum() };
        assert!((dot(3, 1) - dot(5, 3)).abs() < 1e-4, "same offset, same score");
        assert!((dot(3, 1) - dot(3, 2)).abs() > 1e-4, "another offset, another score");
        assert_eq!(&q[..d], &original[..d], "position 0 is not rotated");
        let mut alone = base_q.clone();
        rope(&mut alone, &[4], 1, d, 10_000.0, false);
        assert_eq!(alone, &q[4 * d..5 * d], "a row's position places it");
        rope(&mut q, &pos, 1, d, 10_000.0, true);
        assert!(q.iter().zip(&original).all(|(a, b)| (a - b).abs() < 1e-5));
    }

    #[test]
    fn rope_backward_is_the_inverse_rotation() {
        let (b, t, h, d) = (2, 3, 2, 4);
        let (x, probe) = (random(b * t * h * d, 10), random(b * t * h * d, 11));
        let pos: Vec<u32> = (0..b * t).map(|r| (r % t) as u32).collect();
        let mut grad = probe.clone();
        rope(&mut grad, &pos, h, d, 10_000.0, true);
        check("drope", &x, &grad, |x| {
            let mut y = x.to_vec();
            rope(&mut y, &pos, h, d, 10_000.0, false);
            probe_loss(&y, &probe)
        });
    }

    #[test]
    fn a_packed_row_gives_each_example_what_it_gets_alone() {
        let n = AttnDims { b: 1, t: 50, h: 4, h_kv: 2, d: 8 };
        let lens = [20, 1, 29];
        let pos = packed(n, &lens);
        check_positions(&pos, n.t);
        let (qn, kn) = (n.t * n.h * n.d, n.t * n.h_kv * n.d);
        let (q, k, v, dout) = (random(qn, 1), random(kn, 2), random(kn, 3), random(qn, 4));
        let (out, stats) = forward_at(&q, &k, &v, &pos, n);
        let (mut dq, mut dk, mut dv) = (vec![0.0; qn], vec![0.0; kn], vec![0.0; kn]);
        let grads = QkvOut::Split { dq: &mut dq, dk: &mut dk, dv: &mut dv };
        attention_backward(&dout, QkvIn::Split { q: &q, k: &k, v: &v }, &pos, &stats, grads, n, F32);
        let (qr, kr) = (n.h * n.d, n.h_kv * n.d);
        let mut start = 0;
        for len in lens {
            let alone = AttnDims { t: len, ..n };
            let (qs, ks) = (start * qr..(start + len) * qr, start * kr..(start + len) * kr);
            let (q1, k1, v1) = (&q[qs.clone()], &k[ks.clone()], &v[ks.clone()]);
            let (out1, stats1) = forward(q1, k1, v1, alone);
            let (mut dq1, mut dk1, mut dv1) = (vec![0.0; len * qr], vec![0.0; len * kr], vec![0.0; len * kr]);
            let grads = QkvOut::Split { dq: &mut dq1, dk: &mut dk1, dv: &mut dv1 };
            let pos1 = whole(alone);
            attention_backward(
                &dout[qs.clone()],
                QkvIn::Split { q: q1, k: k1, v: v1 },
                &pos1,
                &stats1,
                grads,
                alone,
                F32,
            );
            for (what, a, b) in [("out", &out[qs.clone()], &out1[..]), ("dq", &dq[qs.clone()], &dq1[..])]
                .into_iter()
                .chain([("dk", &dk[ks.clone()], &dk1[..]), ("dv", &dv[ks.clone()], &dv1[..])])
            {
                assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-6), "{what} of the example at {start}");
            }
            start += len;
        }
    }

    #[test]
    fn packed_backward_matches_finite_differences() {
        let n = AttnDims { b: 2, t: 5, h: 2, h_kv: 1, d: 2 };
        let pos = packed(n, &[2, 3]);
        let (qn, kn) = (n.b * n.t * n.h * n.d, n.b * n.t * n.h_kv * n.d);
        let (q, k, v, probe) = (random(qn, 4), random(kn, 5), random(kn, 6), random(qn, 7));
        let (_, stats) = forward_at(&q, &k, &v, &pos, n);
        let (mut dq, mut dk, mut dv) = (vec![0.0; qn], vec![0.0; kn], vec![0.0; kn]);
        let grads = QkvOut::Split { dq: &mut dq, dk: &mut dk, dv: &mut dv };
        attention_backward(&probe, QkvIn::Split { q: &q, k: &k, v: &v }, &pos, &stats, grads, n, F32);
        check("dq (packed)", &q, &dq, |q| probe_loss(&forward_at(q, &k, &v, &pos, n).0, &probe));
        check("dk (packed)", &k, &dk, |k| probe_loss(&forward_at(&q, k, &v, &pos, n).0, &probe));
        check("dv (packed)", &v, &dv, |v| probe_loss(&forward_at(&q, &k, v, &pos, n).0, &probe));
    }
}
