//! Matrix-vector product for decode (`shaders/gemv.wgsl`): y = x·Wᵀ (+ bias) for a few rows of x.

use crate::gpu::{shaders, Dispatch, Gpu, Weight};
use crate::{KilnError, Result};

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub k: u32,
    pub rows: u32,
    pub first_row: u32,
    pub n: u32,
    pub has_bias: u32,
    pub _pad: [u32; 3],
}

/// Weight rows per workgroup (`ROWS` in the shader).
const ROWS: u32 = 4;

/// x (m, K), W (N, K), bias (N) → y (m, N). One dispatch per chunk of W.
pub fn gemv(gpu: &Gpu, x: &wgpu::Buffer, w: &Weight, bias: Option<&wgpu::Buffer>, y: &wgpu::Buffer, m: u32) -> Result<Vec<Dispatch>> {
    if m == 0 {
        return Err(KilnError::shape("gemv", "no input rows"));
    }
    super::check_groups(gpu, "gemv", "input rows", m)?;
    let pipeline = gpu.pipeline(&shaders::GEMV, "gemv", &[("W_F16", w.dtype.w_f16())])?;
    w.chunks
        .iter()
        .map(|c| {
            let groups = c.rows.div_ceil(ROWS);
            super::check_groups(gpu, "gemv", "weight rows / 4", groups)?;
            let params = Params { k: w.cols, rows: c.rows, first_row: c.first_row, n: w.rows, has_bias: bias.is_some() as u32, _pad: [0; 3] };
            gpu.dispatch(format!("gemv {}", w.name), pipeline.clone(), &params, &[&c.buffer, x, bias.unwrap_or(&gpu.empty), y], [groups, m, 1])
        })
        .collect()
}
