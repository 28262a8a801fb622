//! Row-wise argmax for greedy sampling on the GPU (`shaders/argmax.wgsl`).

use crate::gpu::{shaders, Dispatch, Gpu};
use crate::Result;

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub rows: u32,
    pub n: u32,
    pub _pad: [u32; 2],
}

/// x (rows, n) f32 → out (rows) u32: the first index of each row's maximum.
pub fn argmax(gpu: &Gpu, x: &wgpu::Buffer, out: &wgpu::Buffer, rows: u32, n: u32) -> Result<Dispatch> {
    super::check_groups(gpu, "argmax", "rows", rows)?;
    let pipeline = gpu.pipeline(&shaders::ARGMAX, "argmax", &[])?;
    gpu.dispatch("argmax", pipeline, &Params { rows, n, _pad: [0; 2] }, &[x, out], [rows, 1, 1])
}

/// The first index of the maximum of each row (NaN never wins), as torch.argmax.
pub fn argmax_cpu(x: &[f32], n: usize) -> Vec<u32> {
    x.chunks(n)
        .map(|row| {
            let mut best = 0usize;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] || row[best].is_nan() && !v.is_nan() {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}
