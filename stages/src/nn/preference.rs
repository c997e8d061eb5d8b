//! Preference losses over one pair: a prompt with a chosen and a rejected response, each
//! known by the policy's summed log-probability of its tokens (and the reference's, for the
//! losses that have one) and its token count. Each loss returns its value and its derivatives
//! with respect to the policy's two sums; the objective turns those into gradients on the
//! logits (`d log p(token) / d logits = onehot - softmax`).
//!
//! Notation: pi = log pi(y | x) summed over the response, ref likewise under the reference,
//! n the response's token count, sigma the logistic function.

/// One pair as a loss sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pair {
    pub chosen: Seq,
    pub rejected: Seq,
}

/// One response: the policy's and the reference's summed log-probabilities and its tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Seq {
    pub logp: f64,
    /// 0 for a loss without a reference.
    pub ref_logp: f64,
    pub tokens: usize,
}

impl Seq {
    /// The log-ratio to the reference, pi - ref.
    pub fn delta(&self) -> f64 {
        self.logp - self.ref_logp
    }
    /// The length-normalised log-probability, pi / n.
    pub fn mean(&self) -> f64 {
        self.logp / self.tokens.max(1) as f64
    }
}

/// Which loss, with its settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PairLoss {
    /// -(1 - eps) log sigma(h) - eps log sigma(-h), h = beta ((pi_c - ref_c) - (pi_r - ref_r));
    /// eps = `label_smoothing` (conservative DPO).
    Dpo { beta: f64, label_smoothing: f64 },
    /// (((pi_c - ref_c) - (pi_r - ref_r)) - 1 / (2 beta))^2, as in the IPO paper (TRL divides
    /// each log-ratio by its response's length first).
    Ipo { beta: f64 },
    /// -(1 - eps) log sigma(h) - eps log sigma(-h), h = beta (pi_c / n_c - pi_r / n_r) - gamma:
    /// no reference.
    Simpo { beta: f64, gamma: f64, label_smoothing: f64 },
    /// -pi_c / n_c + lambda * -log sigma(log odds), log odds = (m_c - m_r) -
    /// (log(1 - e^m_c) - log(1 - e^m_r)) with m = pi / n: no reference.
    Orpo { lambda: f64 },
}

impl PairLoss {
    pub fn uses_reference(&self) -> bool {
        matches!(self, PairLoss::Dpo { .. } | PairLoss::Ipo { .. })
    }

    /// The implicit rewards of the two responses, as TRL reports them: beta times the
    /// log-ratio for the losses with a reference, beta (lambda for ORPO) times the
    /// length-normalised log-probability for the others.
    pub fn rewards(&self, pair: &Pair) -> (f64, f64) {
        match *self {
            PairLoss::Dpo { beta, .. } | PairLoss::Ipo { beta } => {
                (beta * pair.chosen.delta(), beta * pair.rejected.delta())
            }
            PairLoss::Simpo { beta, .. } => (beta * pair.chosen.mean(), beta * pair.rejected.mean()),
            PairLoss::Orpo { lambda } => (lambda * pair.chosen.mean(), lambda * pair.rejected.mean()),
        }
    }

    /// The loss of one pair and its derivatives with respect to pi_c and pi_r.
    pub fn loss(&self, pair: &Pair) -> (f64, f64, f64) {
        let (c, r) = (pair.chosen, pair.rejected);
        let (nc, nr) = (c.tokens.max(1) as f64, r.tokens.max(1) as f64);
        match *self {
            PairLoss::Dpo { beta, label_smoothing } => {
                let h = beta * (c.delta() - r.delta());
                let (l, dh) = smoothed_logistic(h, label_smoothing);
                (l, beta * dh, -beta * dh)
            }
            PairLoss::Ipo { beta } => {
                let h = c.delta() - r.delta() - 1.0 / (2.0 * beta);
                (h * h, 2.0 * h, -2.0 * h)
            }
            PairLoss::Simpo { beta, gamma, label_smoothing } => {
                let h = beta * (c.mean() - r.mean()) - gamma;
                let (l, dh) = smoothed_logistic(h, label_smoothing);
                (l, beta * dh / nc, -beta * dh / nr)
            }
            PairLoss::Orpo { lambda } => {
                let (mc, mr) = (c.mean().min(-1e-12), r.mean().min(-1e-12));
                let odds = (mc - mr) - (log1mexp(mc) - log1mexp(mr));
                let l = -mc + lambda * -log_sigmoid(odds);
                let dodds = -lambda * sigmoid(-odds);
                // d log(1 - e^m) / dm = -e^m / (1 - e^m), so d odds / dm_c = 1 / (1 - e^m_c).
                let dmc = -1.0 + dodds / -(mc.exp_m1());
                let dmr = -dodds / -(mr.exp_m1());
                (l, dmc / nc, dmr / nr)
            }
        }
    }
}

/// KTO on one example, given the batch's KL reference point z0 (detached, at least 0):
/// desirable: w_d (1 - sigma(beta (Delta - z0))), undesirable: w_u (1 - sigma(beta (z0 - Delta))),
/// Delta = pi - ref.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Kto {
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

impl Kto {
    /// The loss of one example and its derivative with respect to pi.
    pub fn loss(&self, seq: &Seq, z0: f64, desirable: bool) -> (f64, f64) {
        let d = seq.delta() - z0;
        let (h, w, sign) = if desirable {
            (self.beta * d, self.desirable_weight, 1.0)
        } else {
            (-self.beta * d, self.undesirable_weight, -1.0)
        };
        let s = sigmoid(h);
        (w * (1.0 - s), -w * s * (1.0 - s) * self.beta * sign)
    }
}

/// -(1 - eps) log sigma(h) - eps log sigma(-h) and its derivative in h.
fn smoothed_logistic(h: f64, eps: f64) -> (f64, f64) {
    let l = -(1.0 - eps) * log_sigmoid(h) - eps * log_sigmoid(-h);
    (l, -(1.0 - eps) * sigmoid(-h) + eps * sigmoid(h))
}

pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// log sigma(x), stable for large |x|.
pub fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// log(1 - e^x) for x < 0, stable at both ends.
pub fn log1mexp(x: f64) -> f64 {
    if x < -std::f64::consts::LN_2 {
        (-x.exp()).ln_1p()
    } else {
        (-x.exp_m1()).ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(pc: f64, rc: f64, nc: usize, pr: f64, rr: f64, nr: usize) -> Pair {
        Pair {
            chosen: Seq { logp: pc, ref_logp: rc, tokens: nc },
            rejected: Seq { logp: pr, ref_logp: rr, tokens: nr },
        }
    }

    /// Central differences of the loss in pi_c and pi_r.
    fn numeric(loss: PairLoss, p: Pair) -> (f64, f64) {
        let h = 1e-6;
        let at = |dc: f64, dr: f64| {
            let mut q = p;
            q.chosen.logp += dc;
            q.rejected.logp += dr;
            loss.loss(&q).0
        };
        ((at(h, 0.0) - at(-h, 0.0)) / (2.0 * h), (at(0.0, h) - at(0.0, -h)) / (2.0 * h))
    }

    const LOSSES: [PairLoss; 5] = [
        PairLoss::Dpo { beta: 0.1, label_smoothing: 0.0 },
        PairLoss::Dpo { beta: 0.5, label_smoothing: 0.2 },
        PairLoss::Ipo { beta: 0.1 },
        PairLoss::Simpo { beta: 2.0, gamma: 1.0, label_smoothing: 0.1 },
        PairLoss::Orpo { lambda: 0.1 },
    ];

    #[test]
    fn hand_worked_values() {
        // DPO, beta = 0.1: chosen -10 (ref -12), rejected -15 (ref -14): h = 0.1 (2 - -1) = 0.3,
        // L = -log sigma(0.3) = log(1 + e^-0.3) = 0.554355; dL/dh = -sigma(-0.3) = -0.425557.
        let p = pair(-10.0, -12.0, 5, -15.0, -14.0, 6);
        let (l, gc, gr) = PairLoss::Dpo { beta: 0.1, label_smoothing: 0.0 }.loss(&p);
        assert!((l - 0.554355).abs() < 1e-6 && (gc + 0.0425557).abs() < 1e-6 && (gr - 0.0425557).abs() < 1e-6);
        // IPO, beta = 0.1: (3 - 5)^2 = 4, dL/dpi_c = 2 (3 - 5) = -4.
        let (l, gc, _) = PairLoss::Ipo { beta: 0.1 }.loss(&p);
        assert!((l - 4.0).abs() < 1e-12 && (gc + 4.0).abs() < 1e-12);
        // SimPO, beta = 2, gamma = 1: h = 2 (-10/5 - -15/6) - 1 = 2 (0.5) - 1 = 0, L = ln 2.
        let (l, _, _) = PairLoss::Simpo { beta: 2.0, gamma: 1.0, label_smoothing: 0.0 }.loss(&p);
        assert!((l - std::f64::consts::LN_2).abs() < 1e-12);
        // ORPO, lambda = 0.1, chosen mean log-prob ln 0.5, rejected ln 0.25 (one token each):
        // odds = ln(0.5 / 0.5) - ln(0.25 / 0.75) = ln 3, L = ln 2 + 0.1 log(1 + 1/3) = 0.721915.
        let p = pair(0.5f64.ln(), 0.0, 1, 0.25f64.ln(), 0.0, 1);
        let (l, _, _) = PairLoss::Orpo { lambda: 0.1 }.loss(&p);
        assert!((l - (std::f64::consts::LN_2 + 0.1 * (4.0f64 / 3.0).ln())).abs() < 1e-12, "{l}");
    }

    #[test]
    fn derivatives_match_finite_differences() {
        for loss in LOSSES {
            for p in [pair(-10.0, -12.0, 5, -15.0, -14.0, 6), pair(-3.0, -2.0, 2, -1.0, -1.5, 1)] {
                let (_, gc, gr) = loss.loss(&p);
                let (nc, nr) = numeric(loss, p);
                assert!((gc - nc).abs() < 1e-5 && (gr - nr).abs() < 1e-5, "{loss:?}: ({gc}, {gr}) vs ({nc}, {nr})");
            }
        }
    }

    #[test]
    fn kto_by_hand_and_numerically() {
        // beta = 0.1, Delta = 2 - z0 with z0 = 1: desirable 1 - sigma(0.1) = 0.475021,
        // undesirable (weight 2) 2 (1 - sigma(-0.1)) = 2 * 0.524979 = 1.049958.
        let kto = Kto { beta: 0.1, desirable_weight: 1.0, undesirable_weight: 2.0 };
        let seq = Seq { logp: -8.0, ref_logp: -10.0, tokens: 4 };
        assert!((kto.loss(&seq, 1.0, true).0 - 0.475021).abs() < 1e-6);
        assert!((kto.loss(&seq, 1.0, false).0 - 1.049958).abs() < 1e-6);
        for desirable in [true, false] {
            let (_, g) = kto.loss(&seq, 1.0, desirable);
            let at = |dx: f64| kto.loss(&Seq { logp: seq.logp + dx, ..seq }, 1.0, desirable).0;
            let numeric = (at(1e-6) - at(-1e-6)) / 2e-6;
            assert!((g - numeric).abs() < 1e-8, "{g} vs {numeric}");
            // Raising a desirable response's log-prob lowers its loss, and the reverse.
            assert_eq!(g < 0.0, desirable);
        }
    }

    #[test]
    fn limits() {
        // Identical responses: DPO sits at log 2 with a gradient that cancels between them.
        let same = pair(-4.0, -5.0, 3, -4.0, -5.0, 3);
        let (l, gc, gr) = PairLoss::Dpo { beta: 0.1, label_smoothing: 0.0 }.loss(&same);
        assert!((l - std::f64::consts::LN_2).abs() < 1e-12 && gc + gr == 0.0);
        // beta -> 0: DPO's loss tends to log 2 and its gradient to 0, whatever the pair.
        let p = pair(-10.0, -12.0, 5, -15.0, -14.0, 6);
        let (l, gc, _) = PairLoss::Dpo { beta: 1e-9, label_smoothing: 0.0 }.loss(&p);
        assert!((l - std::f64::consts::LN_2).abs() < 1e-8 && gc.abs() < 1e-8);
        // Label smoothing 0.5 trusts neither label: the loss is least at a zero margin, so a
        // chosen response ahead (h = 0.3 here) is pushed back down.
        let (_, gc, gr) = PairLoss::Dpo { beta: 0.1, label_smoothing: 0.5 }.loss(&p);
        assert!(gc > 0.0 && gr < 0.0);
        let (l0, gc0, _) = PairLoss::Dpo { beta: 0.1, label_smoothing: 0.5 }.loss(&pair(-1.0, 0.0, 1, -1.0, 0.0, 1));
        assert!((l0 - std::f64::consts::LN_2).abs() < 1e-12 && gc0 == 0.0);
        // Stable helpers at the extremes.
        assert!((log_sigmoid(-800.0) + 800.0).abs() < 1e-9 && log_sigmoid(800.0) == 0.0);
        assert!((log1mexp(-1e-10) - (1e-10f64).ln()).abs() < 1e-6 && log1mexp(-50.0).abs() < 1e-20);
    }
}
