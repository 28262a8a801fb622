//! Element-wise ops (`shaders/elementwise.wgsl`): SwiGLU gating and the residual add.

use crate::gpu::{shaders, Dispatch, Gpu};
use crate::Result;

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub n: u32,
    pub groups_x: u32,
    pub _pad: [u32; 2],
}

const WG: u32 = 256;

fn elementwise(
    gpu: &Gpu,
    entry: &'static str,
    a: &wgpu::Buffer,
    b: &wgpu::Buffer,
    y: &wgpu::Buffer,
    n: u32,
) -> Result<Dispatch> {
    let grid = super::flat_grid(gpu, n.div_ceil(WG));
    let pipeline = gpu.pipeline(&shaders::ELEMENTWISE, entry, &[])?;
    gpu.dispatch(entry, pipeline, &Params { n, groups_x: grid[0], _pad: [0; 2] }, &[a, b, y], grid)
}

/// y = silu(gate) · up over n elements (Llama/Qwen2 MLP: down(silu(gate(x)) * up(x))).
pub fn swiglu(gpu: &Gpu, gate: &wgpu::Buffer, up: &wgpu::Buffer, y: &wgpu::Buffer, n: u32) -> Result<Dispatch> {
    elementwise(gpu, "swiglu", gate, up, y, n)
}

/// y = a + b over n elements.
pub fn add(gpu: &Gpu, a: &wgpu::Buffer, b: &wgpu::Buffer, y: &wgpu::Buffer, n: u32) -> Result<Dispatch> {
    elementwise(gpu, "add", a, b, y, n)
}

/// y += a over n elements (the residual stream, updated in place).
pub fn add_assign(gpu: &Gpu, y: &wgpu::Buffer, a: &wgpu::Buffer, n: u32) -> Result<Dispatch> {
    let grid = super::flat_grid(gpu, n.div_ceil(WG));
    let pipeline = gpu.pipeline(&shaders::ELEMENTWISE, "add_assign", &[])?;
    let params = Params { n, groups_x: grid[0], _pad: [0; 2] };
    gpu.dispatch_at("add_assign", pipeline, &params, &[(1, a), (3, y)], grid)
}

/// y = a over `bytes` bytes (a multiple of 16): a plain device copy, also the yardstick the
/// benchmarks divide kernel bandwidth by.
pub fn copy(gpu: &Gpu, a: &wgpu::Buffer, y: &wgpu::Buffer, bytes: u64) -> Result<Dispatch> {
    if !bytes.is_multiple_of(16) {
        return Err(crate::KilnError::shape("copy", format!("{bytes} bytes is not a multiple of 16")));
    }
    let n = (bytes / 16) as u32;
    let grid = super::flat_grid(gpu, n.div_ceil(WG));
    let pipeline = gpu.pipeline(&shaders::ELEMENTWISE, "copy", &[])?;
    let params = Params { n, groups_x: grid[0], _pad: [0; 2] };
    gpu.dispatch_at("copy", pipeline, &params, &[(1, a), (3, y)], grid)
}

pub fn swiglu_cpu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| {
            let g = g as f64;
            (g / (1.0 + (-g).exp()) * u as f64) as f32
        })
        .collect()
}

pub fn add_cpu(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}
