//! Time spent per kind of kernel, for `tinygpt bench`'s breakdown of a training step.
//!
//! Off by default: a disabled [`scope`] costs one relaxed atomic load. Kernels are called from
//! one thread (their parallelism is inside), so scopes never overlap and the times add up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Matmul,
    Attention,
    CrossEntropy,
    Norm,
    Activation,
    Optimizer,
}

pub const KINDS: [(Kind, &str); 6] = [
    (Kind::Matmul, "matmuls"),
    (Kind::Attention, "attention"),
    (Kind::CrossEntropy, "softmax + cross-entropy"),
    (Kind::Norm, "norms"),
    (Kind::Activation, "activations"),
    (Kind::Optimizer, "optimizer"),
];

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// Start (or stop) recording, clearing what was recorded.
pub fn enable(on: bool) {
    for n in &NANOS {
        n.store(0, Ordering::Relaxed);
    }
    ENABLED.store(on, Ordering::Relaxed);
}

/// Seconds recorded per kind since [`enable`].
pub fn seconds() -> [(Kind, &'static str, f64); 6] {
    KINDS.map(|(k, name)| (k, name, NANOS[k as usize].load(Ordering::Relaxed) as f64 / 1e9))
}

/// Times the enclosing block when recording is on.
pub struct Scope(Option<(Kind, Instant)>);

pub fn scope(kind: Kind) -> Scope {
    Scope(ENABLED.load(Ordering::Relaxed).then(|| (kind, Instant::now())))
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((kind, start)) = self.0 {
            NANOS[kind as usize].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
}
