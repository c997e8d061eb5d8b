//! Choosing the next token from logits: greedy, or temperature with top-k and top-p
//! (nucleus) filtering, drawn from a seeded generator.

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
    let argmax = || {
        // The first of equal maxima, so ties break the same way everywhere.
        let mut best = 0;
        for (i, l) in logits.iter().enumerate() {
            if *l > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    scratch.clear();
    scratch.extend(logits.iter().enumerate().map(|(i, l)| (l / s.temperature, i as u32)));
    // Most likely first; equal logits in id order.
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
    let mut r = rng.unit() * sum;
    for p in scratch.iter() {
        r -= p.0 as f64;
        if r < 0.0 {
            return p.1;
        }
    }
    scratch.last().map_or_else(argmax, |p| p.1)
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
