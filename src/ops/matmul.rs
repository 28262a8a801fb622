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

/// The formulations in `matmul.wgsl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulKernel {
    /// 64 × 64 tiles staged through shared memory: fewer memory reads, two barriers per K slice.
    Tiled,
    /// 32 × 32 tiles straight from memory into registers, no barriers.
    Registers,
    /// 8 weight rows × 4 tokens per invocation, weights read a whole 32-element block at a time
    /// (rows of whole blocks; other shapes take `Registers`): for CPU adapters.
    Blocks,
}

impl MatmulKernel {
    /// Registers on CPU adapters (lavapipe), where a barrier costs more than the re-reads it
    /// saves (benches/RESULTS.md); shared-memory tiles elsewhere.
    pub fn for_device(gpu: &Gpu) -> Self {
        if gpu.is_cpu_adapter() {
            MatmulKernel::Blocks
        } else {
            MatmulKernel::Tiled
        }
    }

    /// Entry point and the (weight rows, x rows) of y one workgroup computes, for `cols` columns.
    fn entry_and_tiles(self, cols: u32) -> (&'static str, u32, u32) {
        match self {
            MatmulKernel::Tiled => ("matmul", 64, 64),
            MatmulKernel::Blocks if cols.is_multiple_of(32) => ("matmul_blocks", 8 * 16, 4),
            MatmulKernel::Registers | MatmulKernel::Blocks => ("matmul_regs", 32, 32),
        }
    }
}

/// x (M, K), W (N, K), bias (N) → y (M, N) with the device's preferred kernel. One dispatch
/// per chunk of W.
pub fn matmul(
    gpu: &Gpu,
    x: &wgpu::Buffer,
    w: &Weight,
    bias: Option<&wgpu::Buffer>,
    y: &wgpu::Buffer,
    m: u32,
) -> Result<Vec<Dispatch>> {
    matmul_with(gpu, MatmulKernel::for_device(gpu), x, w, bias, y, m)
}

pub fn matmul_with(
    gpu: &Gpu,
    kernel: MatmulKernel,
    x: &wgpu::Buffer,
    w: &Weight,
    bias: Option<&wgpu::Buffer>,
    y: &wgpu::Buffer,
    m: u32,
) -> Result<Vec<Dispatch>> {
    if m == 0 {
        return Err(KilnError::shape("matmul", "no input rows"));
    }
    let (entry, n_tile, m_tile) = kernel.entry_and_tiles(w.cols);
    super::check_groups(gpu, "matmul", "row tiles", m.div_ceil(m_tile))?;
    let pipeline = gpu.pipeline(&shaders::MATMUL, entry, &[("W_DTYPE", w.dtype.w_dtype())])?;
    w.chunks
        .iter()
        .map(|c| {
            let params = Params {
                m,
                k: w.cols,
                rows: c.rows,
                first_row: c.first_row,
                n: w.rows,
                has_bias: bias.is_some() as u32,
                _pad: [0; 2],
            };
            let grid = [c.rows.div_ceil(n_tile), m.div_ceil(m_tile), 1];
            super::check_groups(gpu, "matmul", "column tiles", grid[0])?;
            gpu.dispatch(
                format!("{entry} {}", w.name),
                pipeline.clone(),
                &params,
                &[&c.buffer, x, bias.unwrap_or(&gpu.empty), y],
                grid,
            )
        })
        .collect()
}

/// How far an f32-accumulated dot product of length `k` may be from the exact one: k·u·Σ|xᵢwᵢ|
/// (recursive summation's worst case; the kernels' blocked sums do better) plus the rounding of
/// the result itself. `abs_sum` is Σ|xᵢwᵢ|; the bound the tests and `kiln doctor` hold gemv and
/// matmul to.
pub fn dot_error_bound(abs_sum: f64, k: usize, value: f32) -> f64 {
    let u = f32::EPSILON as f64 / 2.0;
    abs_sum * (k as f64 + 2.0) * u + value.abs() as f64 * 2.0 * u + 1e-30
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
