//! kiln: large language models on any desktop GPU through WebGPU (wgpu).
//!
//! Layers, bottom up:
//! - [`gpu`]: device selection, pipelines, buffers, typed GPU errors.
//! - [`ops`]: one module per kernel family in `shaders/`, each with its CPU reference.

pub mod error;
pub mod gpu;
pub mod ops;

pub use error::{KilnError, Result};
pub use gpu::Gpu;
