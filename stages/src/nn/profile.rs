//! Time spent per kind of kernel, for `tinygpt bench`'s breakdown of a training step.
//!
//! Off by default: a disabled [`scope`] costs one relaxed atomic load. Kernels are called from
//! one thread (their parallelism is inside), so scopes never overlap and the times add up. A
//! scope opened inside another on the same thread is not timed: the outer one's kind counts
//! it (DoRA's adapter products, run apart from the weight's, count as `adapters`, not as
//! matmuls).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Matmul,
    /// LoRA adapters' work outside the weight products (an adapter's rank-r products run
    /// inside its layer's, block by block, and count as matmuls).
    Adapter,
    Attention,
    CrossEntropy,
    Norm,
    Activation,
    Optimizer,
}

pub const KINDS: [(Kind, &str); 7] = [
    (Kind::Matmul, "matmuls"),
    (Kind::Adapter, "adapters"),
    (Kind::Attention, "attention"),
    (Kind::CrossEntropy, "softmax + cross-entropy"),
    (Kind::Norm, "norms"),
    (Kind::Activation, "activations"),
    (Kind::Optimizer, "optimizer"),
];

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; KINDS.len()] = [const { AtomicU64::new(0) }; KINDS.len()];

/// Start (or stop) recording, clearing what was recorded.
pub fn enable(on: bool) {
    for n in &NANOS {
        n.store(0, Ordering::Relaxed);
    }
    ENABLED.store(on, Ordering::Relaxed);
}

/// Seconds recorded per kind since [`enable`].
pub fn seconds() -> [(Kind, &'static str, f64); KINDS.len()] {
    KINDS.map(|(k, name)| (k, name, NANOS[k as usize].load(Ordering::Relaxed) as f64 / 1e9))
}

thread_local! {
    /// Whether a timed scope is open on this thread.
    static OPEN: Cell<bool> = const { Cell::new(false) };
}

/// Times the enclosing block when recording is on and no other scope is open on this thread.
pub struct Scope(Option<(Kind, Instant)>);

pub fn scope(kind: Kind) -> Scope {
    if !ENABLED.load(Ordering::Relaxed) || OPEN.replace(true) {
        return Scope(None);
    }
    Scope(Some((kind, Instant::now())))
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((kind, start)) = self.0 {
            NANOS[kind as usize].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            OPEN.set(false);
        }
    }
}
