//! The numeric core: arrays in, arrays out.
//!
//! It knows nothing of recipes, TOML, files or caching, and imports only `crate::nn::*`,
//! ndarray and rayon, so it can become its own crate without edits.
//!
//! - [`kernels`]: the arithmetic, each kernel with a plain reference or a backward checked
//!   against finite differences; the only place the speed work (issue 4) needs to touch.
//! - [`params`]: the named parameter map.
//! - [`model`]: gpt2 and llama, forward and backward over [`params::ParamMap`], and a KV-cache
//!   decoder.
//! - [`optim`]: AdamW over the whole map, clipping and learning-rate schedules; [`step`]: one
//!   training step (micro-batches, accumulation, clipping, update).
//! - [`sample`]: temperature, top-k and top-p sampling.
//! - [`profile`]: time per kind of kernel, for `tinygpt bench`.

pub mod kernels;
pub mod model;
pub mod optim;
pub mod params;
pub mod profile;
pub mod rng;
pub mod sample;
pub mod step;

#[cfg(test)]
pub(crate) mod gradcheck;
