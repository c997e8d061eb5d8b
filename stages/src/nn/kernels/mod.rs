//! Hot numeric kernels: small functions over slices with explicit dimensions, allocating
//! nothing. Shapes use B, T, C, V (batch, time, channels, vocabulary); a `rows` argument is
//! B * T flattened.
//!
//! Determinism: every reduction runs in an order that does not depend on the number of
//! threads (fixed-size chunks, combined in order), so 1 and 2 threads give the same bits.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod matmul;
pub mod norm;
