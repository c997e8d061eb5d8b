//! The numeric core: arrays in, arrays out.
//!
//! It knows nothing of recipes, TOML, files or caching, and imports only `crate::nn::*`,
//! ndarray and rayon, so it can become its own crate without edits.
//!
//! Today: the kernels every layer is built from ([`kernels`]), each with a plain reference and
//! a backward checked against finite differences. The layers, the model (gpt2, llama), the
//! optimizer and the `pretrain` stage build on these (issue 3).

pub mod gpt2;
pub mod kernels;
pub mod params;
pub mod rng;

#[cfg(test)]
pub(crate) mod gradcheck;
