//! Knowledge distillation from a teacher's top-k log-probabilities: a divergence between the
//! teacher's and the student's distributions at temperature T over k + 1 buckets (the teacher's
//! top-k tokens, and one bucket for every other token), mixed with cross-entropy on the data.
//!
//! The teacher is known by its top-k log-probabilities at T = 1 only. Its tail mass
//! m = 1 - sum(top-k probabilities) is exact; how that mass spreads over the other tokens is
//! not known, so at T != 1 the tail is taken as uniform over them (each other token's logit is
//! lse + ln(m / (V - k))). At T = 1, and for any T when k = V, the buckets are exact. The
//! student's buckets are exact at every T: its tail bucket sums its own probabilities outside
//! the teacher's top k.
//!
//! For bucket masses p (teacher) and q (student) and a divergence D(p, q) with dD/dq_i = g_i,
//! the gradient with respect to a student logit s_u in bucket b(u) is
//! (q_u / T) * (g_b(u) - sum_i q_i g_i), since dq_i/ds_u = (q_u / T)([u in i] - q_i).

use rayon::prelude::*;

use super::cross_entropy::IGNORE;

/// Which divergence of teacher p from student q.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Divergence {
    /// KL(p || q): mass-covering, the classic distillation loss.
    Forward,
    /// KL(q || p): mode-seeking.
    Reverse,
    /// Generalised Jensen-Shannon as GKD: beta KL(p || M) + (1 - beta) KL(q || M) with
    /// M = beta p + (1 - beta) q, beta in (0, 1).
    Jsd(f64),
}

/// The distillation loss's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Distill {
    pub temperature: f64,
    /// Weight of the divergence term (times T^2); 1 - alpha weighs cross-entropy on the data.
    pub alpha: f64,
    pub divergence: Divergence,
}

/// A teacher's top-k log-probabilities (at T = 1) for a run of positions: `ids` and `logprobs`
/// hold k values per position.
#[derive(Clone, Copy, Debug)]
pub struct TopK<'a> {
    pub k: usize,
    pub ids: &'a [u32],
    pub logprobs: &'a [f32],
}

/// For the rows whose target is not [`IGNORE`]: alpha T^2 D(teacher_T, student_T) + (1 - alpha)
/// CE(target), into `row_loss`, and its gradient with respect to the student's logits times
/// `grad_scale` into `dlogits` (zero on ignored rows). Returns the summed loss, added in row
/// order in f64 so that it does not depend on the thread count.
///
/// # Panics
/// If a target or a teacher id is outside the vocabulary, or the teacher's top k repeats an id.
#[allow(clippy::too_many_arguments)] // the logits, targets and teacher in; the loss's settings; the outputs
pub fn distill_forward_backward(
    logits: &[f32],
    targets: &[u32],
    v: usize,
    teacher: TopK<'_>,
    cfg: Distill,
    grad_scale: f32,
    dlogits: &mut [f32],
    row_loss: &mut [f64],
) -> f64 {
    let _time = crate::nn::profile::scope(crate::nn::profile::Kind::CrossEntropy);
    let rows = targets.len();
    let k = teacher.k;
    assert!(k >= 1 && k <= v, "top k = {k} of a vocabulary of {v}");
    let losses = &mut row_loss[..rows];
    dlogits[..rows * v].par_chunks_mut(v).zip(losses.par_iter_mut()).enumerate().for_each_init(
        || (vec![false; v], vec![0.0f64; v]),
        |(in_top, q), (row, (d, loss))| {
            if targets[row] == IGNORE {
                d.fill(0.0);
                *loss = 0.0;
                return;
            }
            let span = row * k..(row + 1) * k;
            let ids = &teacher.ids[span.clone()];
            *loss = distill_row(
                &logits[row * v..(row + 1) * v],
                targets[row] as usize,
                ids,
                &teacher.logprobs[span],
                cfg,
                grad_scale as f64,
                d,
                in_top,
                q,
            );
        },
    );
    losses.iter().sum()
}

/// One row of [`distill_forward_backward`]; `in_top` (all false) and `q` are V-long scratch.
#[allow(clippy::too_many_arguments)] // one row's inputs, settings, output and scratch
fn distill_row(
    s: &[f32],
    target: usize,
    ids: &[u32],
    teacher_lp: &[f32],
    cfg: Distill,
    grad_scale: f64,
    d: &mut [f32],
    in_top: &mut [bool],
    q: &mut [f64],
) -> f64 {
    let (v, k, t) = (s.len(), ids.len(), cfg.temperature);
    assert!(target < v, "target {target} is outside the vocabulary of {v}");
    for &id in ids {
        assert!((id as usize) < v, "teacher id {id} is outside the vocabulary of {v}");
        assert!(!in_top[id as usize], "the teacher's top k repeats id {id}");
        in_top[id as usize] = true;
    }
    // Teacher buckets at T: the top k, then the tail (none when k = V).
    let tail = k < v;
    let top_mass: f64 = teacher_lp.iter().map(|&lp| (lp as f64).exp()).sum();
    let mut a: Vec<f64> = teacher_lp.iter().map(|&lp| lp as f64 / t).collect();
    if tail {
        let m = (1.0 - top_mass).max(1e-12);
        let others = (v - k) as f64;
        a.push(others.ln() + (m / others).ln() / t);
    }
    let lse_a = log_sum_exp(&a);
    let log_p: Vec<f64> = a.iter().map(|x| x - lse_a).collect();

    // Student: the full softmax at T (into q) and at 1 (for cross-entropy).
    let scaled: Vec<f64> = s.iter().map(|&x| x as f64 / t).collect();
    let lse_t = log_sum_exp(&scaled);
    for (qu, x) in q.iter_mut().zip(&scaled) {
        *qu = (x - lse_t).exp();
    }
    let mut log_q: Vec<f64> = ids.iter().map(|&id| scaled[id as usize] - lse_t).collect();
    if tail {
        let q_tail: f64 = (0..v).filter(|&u| !in_top[u]).map(|u| q[u]).sum();
        log_q.push(q_tail.max(1e-300).ln());
    }

    // The divergence and g_i = dD/dq_i per bucket, then sum_i q_i g_i.
    let buckets = log_p.len();
    let (p, qb): (Vec<f64>, Vec<f64>) = (0..buckets).map(|i| (log_p[i].exp(), log_q[i].exp())).unzip();
    let (div, g): (f64, Vec<f64>) = match cfg.divergence {
        Divergence::Forward => {
            let div = (0..buckets).map(|i| if p[i] > 0.0 { p[i] * (log_p[i] - log_q[i]) } else { 0.0 }).sum();
            (div, (0..buckets).map(|i| -(log_p[i] - log_q[i]).exp()).collect())
        }
        Divergence::Reverse => {
            let r: Vec<f64> = (0..buckets).map(|i| log_q[i] - log_p[i]).collect();
            let div = (0..buckets).map(|i| if qb[i] > 0.0 { qb[i] * r[i] } else { 0.0 }).sum();
            (div, r.iter().map(|x| x + 1.0).collect())
        }
        Divergence::Jsd(beta) => {
            let mut div = 0.0;
            let mut g = Vec::with_capacity(buckets);
            for i in 0..buckets {
                let log_m = (beta * p[i] + (1.0 - beta) * qb[i]).max(1e-300).ln();
                if p[i] > 0.0 {
                    div += beta * p[i] * (log_p[i] - log_m);
                }
                if qb[i] > 0.0 {
                    div += (1.0 - beta) * qb[i] * (log_q[i] - log_m);
                }
                g.push((1.0 - beta) * (log_q[i] - log_m));
            }
            (div, g)
        }
    };
    let mean_g: f64 = (0..buckets).map(|i| qb[i] * g[i]).sum();

    // Cross-entropy at T = 1.
    let lse_1 = log_sum_exp_f32(s);
    let ce = lse_1 - s[target] as f64;

    let (alpha, kd_scale) = (cfg.alpha, cfg.alpha * t * t);
    let top_index = |u: usize| ids.iter().position(|&id| id as usize == u);
    for u in 0..v {
        let b = if in_top[u] { top_index(u).expect("marked ids are in the top k") } else { k };
        // For the forward KL, g_b q_u = -p_b q_u / q_b: for a top-k token q_u = q_b, so the
        // ratio is exactly p_u; written as such it does not lose q_u to underflow.
        let kd = match cfg.divergence {
            Divergence::Forward if b < k => q[u] - p[b],
            Divergence::Forward => q[u] * (1.0 - (log_p[b] - log_q[b]).exp()),
            _ => q[u] * (g[b] - mean_g),
        } / t;
        let softmax = ((s[u] as f64) - lse_1).exp();
        let ce_grad = softmax - if u == target { 1.0 } else { 0.0 };
        d[u] = ((kd_scale * kd + (1.0 - alpha) * ce_grad) * grad_scale) as f32;
    }
    for &id in ids {
        in_top[id as usize] = false;
    }
    kd_scale * div + (1.0 - alpha) * ce
}

fn log_sum_exp(x: &[f64]) -> f64 {
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    max + x.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
}

fn log_sum_exp_f32(x: &[f32]) -> f64 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max as f64 + x.iter().map(|v| ((v - max) as f64).exp()).sum::<f64>().ln()
}

/// The top `k` log-probabilities of one row of logits (at T = 1), highest first (ties by
/// lower id), into `ids` and `logprobs`; returns the row's log-sum-exp.
pub fn top_k(logits: &[f32], k: usize, order: &mut Vec<u32>, ids: &mut [u32], logprobs: &mut [f32]) -> f64 {
    let lse = log_sum_exp_f32(logits);
    order.clear();
    order.extend(0..logits.len() as u32);
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if k < order.len() {
        order.select_nth_unstable_by(k, by_logit);
        order.truncate(k);
    }
    order.sort_unstable_by(by_logit);
    for ((id, lp), &u) in ids.iter_mut().zip(logprobs.iter_mut()).zip(order.iter()) {
        *id = u;
        *lp = (logits[u as usize] as f64 - lse) as f32;
    }
    lse
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::gradcheck::{check, random};

    /// The divergence over the full vocabulary, written plainly from the definitions.
    fn full_divergence(teacher: &[f64], student: &[f32], t: f64, div: Divergence) -> f64 {
        let soft = |x: Vec<f64>| {
            let lse = log_sum_exp(&x);
            x.iter().map(|v| (v - lse).exp()).collect::<Vec<f64>>()
        };
        let p = soft(teacher.iter().map(|x| x / t).collect());
        let q = soft(student.iter().map(|x| *x as f64 / t).collect());
        let kl = |a: &[f64], b: &[f64]| {
            a.iter().zip(b).map(|(x, y)| if *x > 0.0 { x * (x / y).ln() } else { 0.0 }).sum::<f64>()
        };
        match div {
            Divergence::Forward => kl(&p, &q),
            Divergence::Reverse => kl(&q, &p),
            Divergence::Jsd(beta) => {
                let m: Vec<f64> = p.iter().zip(&q).map(|(a, b)| beta * a + (1.0 - beta) * b).collect();
                beta * kl(&p, &m) + (1.0 - beta) * kl(&q, &m)
            }
        }
    }

    fn one_row(s: &[f32], target: u32, ids: &[u32], lp: &[f32], cfg: Distill) -> (f64, Vec<f32>) {
        let mut d = vec![0.0; s.len()];
        let top = TopK { k: ids.len(), ids, logprobs: lp };
        let loss = distill_forward_backward(s, &[target], s.len(), top, cfg, 1.0, &mut d, &mut [0.0]);
        (loss, d)
    }

    const DIVERGENCES: [Divergence; 3] = [Divergence::Forward, Divergence::Reverse, Divergence::Jsd(0.3)];

    #[test]
    fn a_hand_worked_forward_kl() {
        // Teacher p = (0.75, 0.25), student logits (0, 0) so q = (0.5, 0.5), T = 1, alpha = 1:
        // KL = 0.75 ln(0.75 / 0.5) + 0.25 ln(0.25 / 0.5) = 0.304099 - 0.173287 = 0.130812,
        // and the gradient is q - p = (-0.25, 0.25).
        let cfg = Distill { temperature: 1.0, alpha: 1.0, divergence: Divergence::Forward };
        let lp = [0.75f32.ln(), 0.25f32.ln()];
        let (loss, d) = one_row(&[0.0, 0.0], 0, &[0, 1], &lp, cfg);
        assert!((loss - 0.130812).abs() < 1e-6, "{loss}");
        assert!((d[0] + 0.25).abs() < 1e-6 && (d[1] - 0.25).abs() < 1e-6, "{d:?}");
        // Reverse: 0.5 ln(0.5 / 0.75) + 0.5 ln(0.5 / 0.25) = -0.202733 + 0.346574 = 0.143841.
        let (loss, _) = one_row(&[0.0, 0.0], 0, &[0, 1], &lp, Distill { divergence: Divergence::Reverse, ..cfg });
        assert!((loss - 0.143841).abs() < 1e-6, "{loss}");
    }

    #[test]
    fn with_k_equal_to_the_vocabulary_it_is_the_full_divergence() {
        let v = 13;
        let teacher: Vec<f64> = random(v, 3).iter().map(|x| *x as f64 * 4.0).collect();
        let student: Vec<f32> = random(v, 4).iter().map(|x| x * 3.0).collect();
        let lse = log_sum_exp(&teacher);
        let (mut ids, mut lp) = (vec![0u32; v], vec![0f32; v]);
        let t32: Vec<f32> = teacher.iter().map(|x| *x as f32).collect();
        top_k(&t32, v, &mut Vec::new(), &mut ids, &mut lp);
        assert!((lp[0] as f64 - (teacher[ids[0] as usize] - lse)).abs() < 1e-5);
        for divergence in DIVERGENCES {
            for temperature in [0.5, 1.0, 2.0] {
                let cfg = Distill { temperature, alpha: 1.0, divergence };
                let (loss, _) = one_row(&student, 2, &ids, &lp, cfg);
                let full = temperature * temperature * full_divergence(&teacher, &student, temperature, divergence);
                assert!((loss - full).abs() < 1e-5 * (1.0 + full), "{divergence:?} T={temperature}: {loss} vs {full}");
            }
        }
    }

    #[test]
    fn at_temperature_one_the_tail_bucket_is_exact() {
        // With k < V at T = 1 the loss is the divergence between the k + 1 bucket masses.
        let v = 11;
        let teacher: Vec<f32> = random(v, 5).iter().map(|x| x * 4.0).collect();
        let student: Vec<f32> = random(v, 6).iter().map(|x| x * 3.0).collect();
        let (mut ids, mut lp) = (vec![0u32; 3], vec![0f32; 3]);
        top_k(&teacher, 3, &mut Vec::new(), &mut ids, &mut lp);
        let buckets = |l: &[f32]| {
            let lse = log_sum_exp_f32(l);
            let mut b: Vec<f64> = ids.iter().map(|&i| (l[i as usize] as f64 - lse).exp()).collect();
            b.push(1.0 - b.iter().sum::<f64>());
            b
        };
        let (p, q) = (buckets(&teacher), buckets(&student));
        let kl: f64 = p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum();
        let cfg = Distill { temperature: 1.0, alpha: 1.0, divergence: Divergence::Forward };
        let (loss, _) = one_row(&student, 0, &ids, &lp, cfg);
        assert!((loss - kl).abs() < 1e-6, "{loss} vs {kl}");
    }

    #[test]
    fn alpha_zero_is_plain_cross_entropy() {
        let v = 9;
        let student: Vec<f32> = random(v, 7).iter().map(|x| x * 3.0).collect();
        let cfg = Distill { temperature: 2.0, alpha: 0.0, divergence: Divergence::Reverse };
        let (loss, d) = one_row(&student, 4, &[1, 2], &[-0.5, -1.5], cfg);
        let mut ce_d = vec![0.0; v];
        let ce = super::super::cross_entropy::cross_entropy_forward_backward(
            &student,
            &[4],
            v,
            0.0,
            1.0,
            &mut ce_d,
            &mut [0.0],
        );
        assert!((loss - ce).abs() < 1e-12, "{loss} vs {ce}");
        for (a, b) in d.iter().zip(&ce_d) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let v = 10;
        let student: Vec<f32> = random(v, 8).iter().map(|x| x * 2.0).collect();
        let teacher: Vec<f32> = random(v, 9).iter().map(|x| x * 3.0).collect();
        let (mut ids, mut lp) = (vec![0u32; 4], vec![0f32; 4]);
        top_k(&teacher, 4, &mut Vec::new(), &mut ids, &mut lp);
        for divergence in DIVERGENCES {
            for temperature in [0.7, 1.0, 2.0] {
                let cfg = Distill { temperature, alpha: 0.6, divergence };
                let (_, d) = one_row(&student, 3, &ids, &lp, cfg);
                check(&format!("{divergence:?} T={temperature}"), &student, &d, |s| one_row(s, 3, &ids, &lp, cfg).0);
            }
        }
    }

    #[test]
    fn ignored_rows_add_nothing() {
        let v = 5;
        let logits: Vec<f32> = random(2 * v, 10);
        let top = TopK { k: 1, ids: &[0, 1], logprobs: &[-0.1, -0.2] };
        let cfg = Distill { temperature: 1.0, alpha: 0.5, divergence: Divergence::Forward };
        let mut d = vec![1.0; 2 * v];
        let mut losses = [9.0; 2];
        let sum = distill_forward_backward(&logits, &[IGNORE, 2], v, top, cfg, 1.0, &mut d, &mut losses);
        assert_eq!(losses[0], 0.0);
        assert!(d[..v].iter().all(|x| *x == 0.0));
        assert_eq!(sum, losses[1]);
    }
}
