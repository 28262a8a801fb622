//! Tiled matrix product for prefill (`shaders/matmul.wgsl`): y = x·Wᵀ (+ bias).

use crate::gpu::{shaders, Dispatch, Gpu, Weight};
use crate::{KilnError, Result};

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub m: u32,
    pub k: u32,
    pub rows: u32,
    pub first_row: u32,
    pub n: u32,
    pub has_bias: u32,
    pub _pad: [u32; 2],
}

/// Output tile edge (`TILE` in the shader).
const TILE: u32 = 64;

/// x (M, K), W (N, K), bias (N) → y (M, N). One dispatch per chunk of W.
pub fn matmul(gpu: &Gpu, x: &wgpu::Buffer, w: &Weight, bias: Option<&wgpu::Buffer>, y: &wgpu::Buffer, m: u32) -> Result<Vec<Dispatch>> {
    if m == 0 {
        return Err(KilnError::shape("matmul", "no input rows"));
    }
    super::check_groups(gpu, "matmul", "row tiles", m.div_ceil(TILE))?;
    let pipeline = gpu.pipeline(&shaders::MATMUL, "matmul", &[("W_F16", w.dtype.w_f16())])?;
    w.chunks
        .iter()
        .map(|c| {
            let params = Params { m, k: w.cols, rows: c.rows, first_row: c.first_row, n: w.rows, has_bias: bias.is_some() as u32, _pad: [0; 2] };
            let grid = [c.rows.div_ceil(TILE), m.div_ceil(TILE), 1];
            super::check_groups(gpu, "matmul", "column tiles", grid[0])?;
            gpu.dispatch(format!("matmul {}", w.name), pipeline.clone(), &params, &[&c.buffer, x, bias.unwrap_or(&gpu.empty), y], grid)
        })
        .collect()
}

/// y = x·Wᵀ (+ bias) with f64 accumulation: the reference for both matmul and gemv.
pub fn matmul_cpu(x: &[f32], w: &[f32], bias: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let wr = &w[j * k..(j + 1) * k];
            let mut acc = bias.map_or(0.0, |b| b[j] as f64);
            for (a, b) in xr.iter().zip(wr) {
                acc += *a as f64 * *b as f64;
            }
            y[i * n + j] = acc as f32;
        }
    }
    y
}
