//! RMSNorm: y = x / sqrt(mean(x²) + eps) · weight, per row (`shaders/rms_norm.wgsl`).

use crate::gpu::{shaders, Dispatch, Gpu};
use crate::Result;

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub rows: u32,
    pub dim: u32,
    pub eps: f32,
    pub _pad: u32,
}

/// x (rows, dim), weight (dim) → y (rows, dim). `y` may be `x`'s buffer only if distinct
/// bindings are not required; pass separate buffers.
pub fn rms_norm(
    gpu: &Gpu,
    x: &wgpu::Buffer,
    weight: &wgpu::Buffer,
    y: &wgpu::Buffer,
    rows: u32,
    dim: u32,
    eps: f32,
) -> Result<Dispatch> {
    super::check_groups(gpu, "rms_norm", "rows", rows)?;
    let pipeline = gpu.pipeline(&shaders::RMS_NORM, "rms_norm", &[])?;
    gpu.dispatch("rms_norm", pipeline, &Params { rows, dim, eps, _pad: 0 }, &[x, weight, y], [rows, 1, 1])
}

pub fn rms_norm_cpu(x: &[f32], weight: &[f32], dim: usize, eps: f32) -> Vec<f32> {
    x.chunks(dim)
        .flat_map(|row| {
            let mean_sq = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
            let scale = 1.0 / (mean_sq + eps as f64).sqrt();
            row.iter().zip(weight).map(move |(&v, &w)| (v as f64 * scale * w as f64) as f32)
        })
        .collect()
}
