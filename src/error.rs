//! One error type for the whole crate, grouped by kind. Everything a user file, flag or device
//! can cause comes back as a `KilnError`; `assert!` is kept for internal invariants only.

use thiserror::Error;

pub type Result<T, E = KilnError> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum KilnError {
    /// No adapter matched what was asked for (or none exists at all).
    #[error("no GPU adapter found: {0}")]
    NoAdapter(String),

    /// The adapter exists but refused to open a device with the features/limits we asked for.
    #[error("could not open a device on {adapter}: {reason}")]
    DeviceRequest { adapter: String, reason: String },

    /// A WGSL source failed to compile or a pipeline failed to build.
    #[error("kernel `{kernel}`: shader or pipeline error: {message}")]
    Shader { kernel: String, message: String },

    /// wgpu reported a validation error while recording or submitting `kernel`'s work.
    #[error("kernel `{kernel}`: GPU validation error: {message}")]
    Validation { kernel: String, message: String },

    /// The device ran out of memory while allocating or running `kernel`.
    #[error("kernel `{kernel}`: out of GPU memory: {message}")]
    OutOfMemory { kernel: String, message: String },

    /// The GPU device was lost (a driver reset or crash, a removed or sleeping GPU): nothing
    /// more can run on it, and every request in flight fails with this.
    #[error("the GPU device was lost ({0}); restart kiln to continue (a driver reset, a crash or a removed GPU causes this)")]
    DeviceLost(String),

    /// A buffer readback failed (device lost, map error).
    #[error("reading back `{what}` from the GPU failed: {message}")]
    Readback { what: String, message: String },

    /// An op was called with shapes that do not fit together.
    #[error("{op}: shape mismatch: {message}")]
    Shape { op: &'static str, message: String },

    /// A model file (config.json, safetensors, ...) is missing, malformed or inconsistent.
    #[error("{path}: {message}")]
    Model { path: String, message: String },

    /// tokenizer.json / tokenizer_config.json could not be loaded, or encoding/decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),

    /// A request that cannot be served as asked (empty prompt, prompt longer than the context, ...).
    #[error("{0}")]
    Request(String),

    /// The engine is no longer running (shut down, or its thread ended).
    #[error("the engine has stopped: {0}")]
    Stopped(String),

    /// The server is at capacity: its queue of waiting requests is full. Try again later.
    #[error("busy: {0}")]
    Busy(String),

    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },

    /// Anything the user asked for that this device or build cannot do.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl KilnError {
    pub fn model(path: impl AsRef<std::path::Path>, message: impl Into<String>) -> Self {
        KilnError::Model { path: path.as_ref().display().to_string(), message: message.into() }
    }

    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        KilnError::Io { path: path.as_ref().display().to_string(), source }
    }

    pub(crate) fn shape(op: &'static str, message: impl Into<String>) -> Self {
        KilnError::Shape { op, message: message.into() }
    }
}
