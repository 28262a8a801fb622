//! Row-wise softmax (`shaders/softmax.wgsl`).

use crate::gpu::{shaders, Dispatch, Gpu};
use crate::Result;

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub rows: u32,
    pub n: u32,
    pub _pad: [u32; 2],
}

/// x (rows, n) → y (rows, n).
pub fn softmax(gpu: &Gpu, x: &wgpu::Buffer, y: &wgpu::Buffer, rows: u32, n: u32) -> Result<Dispatch> {
    super::check_groups(gpu, "softmax", "rows", rows)?;
    let pipeline = gpu.pipeline(&shaders::SOFTMAX, "softmax", &[])?;
    gpu.dispatch("softmax", pipeline, &Params { rows, n, _pad: [0; 2] }, &[x, y], [rows, 1, 1])
}

pub fn softmax_cpu(x: &[f32], n: usize) -> Vec<f32> {
    x.chunks(n)
        .flat_map(|row| {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            row.iter().map(move |&v| ((v as f64 - m).exp() / sum) as f32)
        })
        .collect()
}
