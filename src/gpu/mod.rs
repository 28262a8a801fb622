//! The GPU layer: one `Gpu` owns the wgpu device and queue, knows what the adapter can do
//! (`Caps`), builds every compute pipeline once (`pipelines`), and turns wgpu's validation and
//! out-of-memory errors into `KilnError`s that name the kernel.
//!
//! Everything above this module (ops, the executor) records `Dispatch`es into one command
//! encoder per step and submits once.

mod adapter;
mod buffer;
mod dispatch;
mod health;
mod pipelines;
pub mod shaders;
mod timer;

pub use adapter::{Backend, GpuOptions, KernelFamily};
pub use buffer::{DType, Weight, WeightChunk};
pub use dispatch::Dispatch;
pub use pipelines::{PipelineKey, Variant};
pub use timer::GpuTimer;

use crate::error::{KilnError, Result};
use std::sync::Arc;

/// What the adapter offers that changes which kernels we build. Each flag can be forced off
/// (`GpuOptions`) so the fallback path is tested on hardware that has the feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Caps {
    /// `SHADER_F16`: the KV cache is stored as f16 (`enable f16;`); without it, as f32.
    /// f16 *weights* need no feature: they are packed two per u32 and read with the core
    /// builtin `unpack2x16float`, so they stay half-size on every adapter.
    pub f16: bool,
    /// `SUBGROUP`: reductions use `subgroupAdd`/`subgroupMax` plus one shared-memory step;
    /// without it, a shared-memory tree reduction.
    pub subgroups: bool,
    /// `TIMESTAMP_QUERY`: benchmarks read GPU time; without it, they time on the host after a sync.
    pub timestamps: bool,
    /// Ops pick the kernels written for CPU adapters (barrier-free, many rows per invocation):
    /// on software adapters, unless `KILN_KERNELS` says otherwise.
    pub cpu_kernels: bool,
}

pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub caps: Caps,
    /// Largest byte size one storage binding may cover (the adapter's limit, or a smaller
    /// override used by tests to exercise weight chunking).
    pub max_binding: u64,
    /// Bound where a kernel's optional input (a bias) is absent.
    pub(crate) empty: wgpu::Buffer,
    pipelines: pipelines::PipelineCache,
    health: Arc<health::Health>,
}

impl Gpu {
    /// Open the best adapter, honouring `KILN_BACKEND`, `KILN_ADAPTER`, `KILN_NO_SUBGROUPS`
    /// and `KILN_NO_F16` from the environment.
    pub fn new() -> Result<Arc<Gpu>> {
        Self::with_options(&GpuOptions::from_env()?)
    }

    pub fn with_options(options: &GpuOptions) -> Result<Arc<Gpu>> {
        pollster::block_on(adapter::open(options)).map(Arc::new)
    }

    /// One line for logs: adapter name, backend, device type and the chosen paths.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}{}); f16 KV: {}, subgroups: {}, timestamps: {}, kernels: {}, max binding {} MiB",
            self.info.name,
            self.info.backend,
            self.info.device_type,
            if self.info.driver_info.is_empty() { String::new() } else { format!(", {}", self.info.driver_info) },
            self.caps.f16,
            self.caps.subgroups,
            self.caps.timestamps,
            if self.caps.cpu_kernels { "cpu" } else { "gpu" },
            self.max_binding >> 20
        )
    }

    /// Submit `encoder` and wait for the GPU, surfacing validation and OOM errors as
    /// typed errors naming `kernel`.
    pub fn submit_and_wait(&self, kernel: &str, encoder: wgpu::CommandEncoder) -> Result<()> {
        let scope = ErrorScope::push(self);
        let index = self.queue.submit([encoder.finish()]);
        scope.pop(kernel)?;
        let waited = self.device.poll(wgpu::PollType::Wait { submission_index: Some(index), timeout: None });
        self.surface_loss(&waited);
        self.health.check(kernel)?;
        waited.map_err(|e| KilnError::Validation { kernel: kernel.into(), message: e.to_string() })?;
        Ok(())
    }

    /// Wait until everything submitted so far has finished (uploads included).
    pub fn wait_idle(&self, what: &str) -> Result<()> {
        let waited = self.device.poll(wgpu::PollType::wait_indefinitely());
        self.surface_loss(&waited);
        self.health.check(what)?;
        waited.map_err(|e| KilnError::Validation { kernel: what.into(), message: e.to_string() })?;
        Ok(())
    }

    /// A failed wait returns before wgpu checks whether the device was destroyed, and that check
    /// is what reports the loss; poll once more so the loss, the cause, is the error returned.
    fn surface_loss<T, E>(&self, waited: &std::result::Result<T, E>) {
        if waited.is_err() {
            let _ = self.device.poll(wgpu::PollType::Poll);
        }
    }

    /// Record `dispatches` into one compute pass and run them.
    pub fn run(&self, label: &str, dispatches: &[&Dispatch]) -> Result<()> {
        let mut encoder = self.encoder(label);
        {
            let mut pass =
                encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(label), timestamp_writes: None });
            for d in dispatches {
                d.record(&mut pass);
            }
        }
        self.submit_and_wait(label, encoder)
    }

    /// Bytes of one KV-cache element: f16 where the adapter has SHADER_F16 (`kv_t` in the
    /// shaders), else f32.
    pub fn kv_element_bytes(&self) -> u32 {
        if self.caps.f16 {
            2
        } else {
            4
        }
    }

    /// Whether ops pick their kernels for CPU adapters. On a software adapter (lavapipe, WARP,
    /// SwiftShader) workgroups run as SIMD loops on CPU cores, where barriers and cross-lane shared
    /// memory cost more than re-reading memory, so the barrier-free variants win
    /// (benches/RESULTS.md); real GPUs take the shared-memory kernels. `KILN_KERNELS=gpu|cpu`
    /// overrides the choice, so the GPU kernels run whole models on lavapipe in CI.
    pub fn is_cpu_adapter(&self) -> bool {
        self.caps.cpu_kernels
    }

    pub fn encoder(&self, label: &str) -> wgpu::CommandEncoder {
        self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
    }
}

/// Captures validation and out-of-memory errors raised between `push` and `pop` on this thread.
pub(crate) struct ErrorScope {
    oom: wgpu::ErrorScopeGuard,
    validation: wgpu::ErrorScopeGuard,
    health: Arc<health::Health>,
    device: wgpu::Device,
}

impl ErrorScope {
    pub(crate) fn push(gpu: &Gpu) -> Self {
        let oom = gpu.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
        ErrorScope { oom, validation, health: gpu.health.clone(), device: gpu.device.clone() }
    }

    /// Pop both scopes (inner first) and return the first error, attributed to `kernel`; a lost
    /// device (whose errors no scope sees) or an error raised outside any scope comes first.
    pub(crate) fn pop(self, kernel: &str) -> Result<()> {
        let validation = pollster::block_on(self.validation.pop());
        let oom = pollster::block_on(self.oom.pop());
        if oom.is_some() || validation.is_some() || self.health.has_uncaptured() {
            // A destroyed device reports its loss on the next poll: let it, so that the loss, the
            // cause, is the error returned rather than the invalid objects it left behind.
            let _ = self.device.poll(wgpu::PollType::Poll);
        }
        self.health.check(kernel)?;
        if let Some(e) = oom {
            return Err(KilnError::OutOfMemory { kernel: kernel.into(), message: e.to_string() });
        }
        if let Some(e) = validation {
            return Err(KilnError::Validation { kernel: kernel.into(), message: e.to_string() });
        }
        Ok(())
    }
}
