//! The numeric core: arrays in, arrays out.
//!
//! It knows nothing of recipes, TOML, files or caching, and imports only `crate::nn::*`,
//! ndarray and rayon, so it can become its own crate without edits.
//!
//! - [`kernels`]: the arithmetic, each kernel with a plain reference or a backward checked
//!   against finite differences; the only place speed work needs to touch.
//! - [`params`]: the named parameter map.
//! - [`config`]: the architectures' shapes, parameter names and linear-layer table.
//! - [`batch`]: token rows with targets and per-example positions (packing).
//! - [`model`]: gpt2 and llama, forward and backward over [`params::ParamMap`]; [`decoder`]:
//!   one token at a time against a KV cache.
//! - [`linear`]: a linear layer with its LoRA or DoRA adapter; [`lora`]: adapters' names,
//!   initialisation and merging.
//! - [`loss`]: losses that write the logits' gradient.
//! - [`optim`]: AdamW over the trainable tensors, clipping and learning-rate schedules;
//!   [`step`]: one training step (micro-batches, accumulation, clipping, update).
//! - [`sample`]: temperature, top-k and top-p sampling.
//! - [`profile`]: time per kind of kernel, for `tinygpt bench`.

pub mod batch;
pub mod config;
pub mod decoder;
pub mod kernels;
pub mod linear;
pub mod lora;
pub mod loss;
pub mod model;
pub mod optim;
pub mod params;
pub mod preference;
pub mod profile;
pub mod quant;
pub mod rng;
pub mod sample;
pub mod step;
pub mod svd;

#[cfg(test)]
pub(crate) mod gradcheck;
