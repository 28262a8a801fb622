//! kiln: large language models on any desktop GPU through WebGPU (wgpu).
//!
//! Layers, bottom up:
//! - [`gpu`]: device selection, pipelines, buffers, typed GPU errors.
//! - [`ops`]: one module per kernel family in `shaders/`, each with its CPU reference.
//! - [`model`]: config, checkpoint loading, weights on the GPU, the forward pass.
//! - [`engine`]: many sequences per step over a paged, prefix-sharing KV cache; the scheduler.
//! - [`session`]: one conversation on the same machinery; feed tokens, get logits or stream new text.
//! - [`server`]: `kiln serve`, the OpenAI-compatible HTTP server on the engine.
//! - [`bench`], [`doctor`], [`pictures`]: whole-model benchmarks, kernel checks on the user's
//!   driver, attention maps and charts.

pub mod bench;
pub mod doctor;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod gpu;
pub mod model;
pub mod ops;
pub mod pictures;
pub mod quant;
pub mod sampling;
pub mod server;
pub mod session;
pub mod speculative;
pub mod tokenizer;

pub use error::{KilnError, Result};
pub use gpu::Gpu;
pub use model::Model;
pub use session::{GenerateParams, Generation, Session, StopReason};
