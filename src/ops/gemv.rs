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
    pub x_row: u32,
    pub _pad: [u32; 2],
}

/// The two formulations in `gemv.wgsl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemvKernel {
    /// A workgroup splits K over its invocations for 4 rows, then one workgroup reduction.
    Reduce,
    /// Each invocation computes 4 whole rows, no reduction: for CPU adapters.
    RowPerInvocation,
}

impl GemvKernel {
    pub fn for_device(gpu: &Gpu) -> Self {
        if gpu.is_cpu_adapter() {
            GemvKernel::RowPerInvocation
        } else {
            GemvKernel::Reduce
        }
    }

    /// Entry point and weight rows per workgroup.
    fn entry_and_rows(self) -> (&'static str, u32) {
        match self {
            GemvKernel::Reduce => ("gemv", 4),
            GemvKernel::RowPerInvocation => ("gemv_rows", 16 * 4),
        }
    }
}

/// x (m, K), W (N, K), bias (N) → y (m, N) with the device's preferred kernel.
/// `gemv_with` can also start at row `x_row` of a taller x (the last token of a prefill). One dispatch
/// per chunk of W.
pub fn gemv(
    gpu: &Gpu,
    x: &wgpu::Buffer,
    w: &Weight,
    bias: Option<&wgpu::Buffer>,
    y: &wgpu::Buffer,
    m: u32,
) -> Result<Vec<Dispatch>> {
    gemv_with(gpu, GemvKernel::for_device(gpu), x, w, bias, y, m, 0)
}

#[allow(clippy::too_many_arguments)]
pub fn gemv_with(
    gpu: &Gpu,
    kernel: GemvKernel,
    x: &wgpu::Buffer,
    w: &Weight,
    bias: Option<&wgpu::Buffer>,
    y: &wgpu::Buffer,
    m: u32,
    x_row: u32,
) -> Result<Vec<Dispatch>> {
    if m == 0 {
        return Err(KilnError::shape("gemv", "no input rows"));
    }
    super::check_groups(gpu, "gemv", "input rows", m)?;
    let (entry, rows_per_group) = kernel.entry_and_rows();
    let pipeline = gpu.pipeline(&shaders::GEMV, entry, &[("W_DTYPE", w.dtype.w_dtype())])?;
    w.chunks
        .iter()
        .map(|c| {
            let groups = c.rows.div_ceil(rows_per_group);
            super::check_groups(gpu, "gemv", "weight row groups", groups)?;
            let params = Params {
                k: w.cols,
                rows: c.rows,
                first_row: c.first_row,
                n: w.rows,
                has_bias: bias.is_some() as u32,
                x_row,
                _pad: [0; 2],
            };
            gpu.dispatch(
                format!("{entry} {}", w.name),
                pipeline.clone(),
                &params,
                &[&c.buffer, x, bias.unwrap_or(&gpu.empty), y],
                [groups, m, 1],
            )
        })
        .collect()
}
