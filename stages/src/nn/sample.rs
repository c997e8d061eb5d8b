//! Choosing the next token from logits: greedy, or temperature with top-k and top-p
//! (nucleus) filtering, drawn from a seeded generator; and speculative sampling's
//! verification, which keeps the target model's distribution whatever the draft proposes.

use crate::nn::rng::SplitMix64;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
}

/// Pick a token. `scratch` holds (probability, id) pairs and is reused between calls.
pub fn pick(logits: &[f32], s: Sampling, rng: &mut SplitMix64, scratch: &mut Vec<(f32, u32)>) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits) as u32;
    }
    let sum = filtered(logits, s, scratch);
    let mut r = rng.unit() * sum;
    for p in scratch.iter() {
        r -= p.0 as f64;
        if r < 0.0 {
            return p.1;
        }
    }
    scratch.last().map_or_else(|| argmax(logits) as u32, |p| p.1)
}

/// The first of equal maxima, so ties break the same way everywhere.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best
}

/// The tokens temperature, top-k and top-p leave, most likely first (equal logits in id
/// order), with their unnormalised probabilities, in `scratch`; returns their sum.
fn filtered(logits: &[f32], s: Sampling, scratch: &mut Vec<(f32, u32)>) -> f64 {
    scratch.clear();
    scratch.extend(logits.iter().enumerate().map(|(i, l)| (l / s.temperature, i as u32)));
    scratch.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    if s.top_k > 0 {
        scratch.truncate(s.top_k.max(1));
    }
    let max = scratch[0].0;
    let mut sum = 0.0f64;
    for p in scratch.iter_mut() {
        p.0 = (p.0 - max).exp();
        sum += p.0 as f64;
    }
    if s.top_p < 1.0 {
        let mut cum = 0.0f64;
        let keep = scratch
            .iter()
            .position(|p| {
                cum += p.0 as f64 / sum;
                cum >= s.top_p as f64
            })
            .map_or(scratch.len(), |i| i + 1);
        scratch.truncate(keep);
        sum = scratch.iter().map(|p| p.0 as f64).sum();
    }
    sum
}

/// The distribution [`pick`] draws from, dense over the vocabulary, into `out`: greedy is all
/// mass on the argmax.
pub fn distribution(logits: &[f32], s: Sampling, out: &mut Vec<f64>, scratch: &mut Vec<(f32, u32)>) {
    out.clear();
    out.resize(logits.len(), 0.0);
    if s.temperature <= 0.0 {
        out[argmax(logits)] = 1.0;
        return;
    }
    let sum = filtered(logits, s, scratch);
    for p in scratch.iter() {
        out[p.1 as usize] = p.0 as f64 / sum;
    }
}

/// A token drawn from a dense distribution (its mass need not sum to 1).
pub fn draw(probs: &[f64], rng: &mut SplitMix64) -> u32 {
    let total: f64 = probs.iter().sum();
    let mut r = rng.unit() * total;
    let mut last = 0;
    for (i, p) in probs.iter().enumerate() {
        if *p > 0.0 {
            last = i;
            r -= p;
            if r < 0.0 {
                return i as u32;
            }
        }
    }
    last as u32
}

/// Speculative sampling's verification (Leviathan et al. 2023, Chen et al. 2023): the draft
/// proposed `xs`, each drawn from `q[i]`; the target's distributions at the same places are
/// `p[i]`, with one more after the last proposal. Proposal `i` is kept with probability
/// `min(1, p_i(x) / q_i(x))`; the first one refused is replaced by a draw from
/// `max(0, p_i - q_i)` renormalised, and when all are kept a last token comes from `p[k]`.
/// Every token that comes out is distributed as the target alone would have drawn it.
///
/// Returns how many proposals were kept and the token that follows them.
pub fn verify(
    xs: &[u32],
    q: &[Vec<f64>],
    p: &[Vec<f64>],
    rng: &mut SplitMix64,
    residual: &mut Vec<f64>,
) -> (usize, u32) {
    assert!(q.len() >= xs.len() && p.len() > xs.len(), "a distribution per proposal, and one more of the target");
    for (i, &x) in xs.iter().enumerate() {
        let (pi, qi) = (p[i][x as usize], q[i][x as usize]);
        if qi > 0.0 && rng.unit() < (pi / qi).min(1.0) {
            continue;
        }
        residual.clear();
        residual.extend(p[i].iter().zip(&q[i]).map(|(a, b)| (a - b).max(0.0)));
        let next = if residual.iter().sum::<f64>() > 0.0 { draw(residual, rng) } else { draw(&p[i], rng) };
        return (i, next);
    }
    (xs.len(), draw(&p[xs.len()], rng))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(logits: &[f32], s: Sampling, n: usize) -> Vec<usize> {
        let (mut rng, mut scratch) = (SplitMix64::new(1), Vec::new());
        let mut c = vec![0; logits.len()];
        for _ in 0..n {
            c[pick(logits, s, &mut rng, &mut scratch) as usize] += 1;
        }
        c
    }

    /// The dense distribution is the one `pick` draws from.
    #[test]
    fn the_dense_distribution_is_the_one_pick_draws_from() {
        let logits = [0.3f32, -1.0, 2.0, 2.0, 0.9, -0.2];
        let (mut dense, mut scratch) = (Vec::new(), Vec::new());
        for s in [
            Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 },
            Sampling { temperature: 0.7, top_k: 0, top_p: 1.0 },
            Sampling { temperature: 1.3, top_k: 3, top_p: 1.0 },
            Sampling { temperature: 1.0, top_k: 0, top_p: 0.6 },
        ] {
            distribution(&logits, s, &mut dense, &mut scratch);
            assert!((dense.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            let n = 40_000;
            let c = counts(&logits, s, n);
            for (got, want) in c.iter().zip(&dense) {
                assert!((*got as f64 / n as f64 - want).abs() < 0.01, "{s:?}: {c:?} vs {dense:?}");
            }
        }
    }

    /// Whatever the draft's distributions, the first token out of a verification (and the one
    /// after a kept proposal) follows the target's distribution.
    #[test]
    fn verification_keeps_the_targets_distribution() {
        let p0 = vec![0.5, 0.3, 0.2, 0.0];
        let p1 = vec![0.1, 0.1, 0.1, 0.7];
        let q0 = vec![0.1, 0.1, 0.4, 0.4]; // a poor draft: proposes 3, which the target never draws
        let (mut rng, mut residual) = (SplitMix64::new(7), Vec::new());
        let n = 60_000;
        let (mut first, mut kept) = (vec![0usize; 4], 0);
        let mut second = vec![0usize; 4];
        for _ in 0..n {
            let x = draw(&q0, &mut rng);
            let (k, next) = verify(&[x], std::slice::from_ref(&q0), &[p0.clone(), p1.clone()], &mut rng, &mut residual);
            if k == 1 {
                first[x as usize] += 1;
                second[next as usize] += 1;
                kept += 1;
            } else {
                first[next as usize] += 1;
            }
        }
        for (got, want) in first.iter().zip(&p0) {
            assert!((*got as f64 / n as f64 - want).abs() < 0.01, "{first:?}");
        }
        for (got, want) in second.iter().zip(&p1) {
            assert!((*got as f64 / kept as f64 - want).abs() < 0.015, "{second:?}");
        }
        // The acceptance rate is sum(min(p, q)) = 0.1 + 0.1 + 0.2 = 0.4.
        assert!((kept as f64 / n as f64 - 0.4).abs() < 0.01);
        // Greedy: one-hot distributions keep the proposal exactly when it is the target's argmax.
        let hot = |i: usize| (0..4).map(|j| if j == i { 1.0 } else { 0.0 }).collect::<Vec<f64>>();
        assert_eq!(verify(&[2, 1], &[hot(2), hot(1)], &[hot(2), hot(3), hot(0)], &mut rng, &mut residual), (1, 3));
        assert_eq!(verify(&[2, 1], &[hot(2), hot(1)], &[hot(2), hot(1), hot(0)], &mut rng, &mut residual), (2, 0));
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let s = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 };
        assert_eq!(counts(&[0.1, 2.0, 2.0, -1.0], s, 5), [0, 5, 0, 0]);
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let logits = [0.0f32, 1.0f32.ln(), 2.0f32.ln(), 3.0f32.ln()]; // probabilities 1/7, 1/7, 2/7, 3/7
        let c = counts(&logits, Sampling { temperature: 1.0, top_k: 0, top_p: 1.0 }, 70_000);
        for (got, want) in c.iter().zip([10_000, 10_000, 20_000, 30_000]) {
            assert!((*got as f64 - want as f64).abs() < 600.0, "{c:?}");
        }
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [0.0f32, 1.0f32.ln(), 2.0f32.ln(), 3.0f32.ln()];
        let k = counts(&logits, Sampling { temperature: 1.0, top_k: 2, top_p: 1.0 }, 1000);
        assert_eq!((k[0], k[1]), (0, 0));
        // 3/7 = 0.43 < 0.5, so top-p 0.5 keeps the two most likely.
        let p = counts(&logits, Sampling { temperature: 1.0, top_k: 0, top_p: 0.5 }, 1000);
        assert_eq!((p[0], p[1]), (0, 0));
        assert!(p[2] > 0 && p[3] > p[2]);
    }
}
