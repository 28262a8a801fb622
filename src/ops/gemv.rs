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
    /// One whole row per invocation, decoded a 32-element block at a time with each weight
    /// word loaded once; rows that are not whole blocks take `RowPerInvocation`.
    Blocks,
}

impl GemvKernel {
    pub fn for_device(gpu: &Gpu) -> Self {
        if gpu.is_cpu_adapter() {
            GemvKernel::Blocks
        } else {
            GemvKernel::Reduce
        }
    }

    /// Entry point, weight rows per workgroup and (for `gemv_blocks`) its workgroup size, for
    /// a matrix of `rows` × `cols`.
    fn entry_and_rows(self, rows: u32, cols: u32) -> (&'static str, u32, u32) {
        match self {
            GemvKernel::Reduce => ("gemv", 4, 0),
            GemvKernel::Blocks if cols.is_multiple_of(32) => {
                let wg = blocks_workgroup_size(rows);
                ("gemv_blocks", wg * BLOCK_ROWS, wg)
            }
            GemvKernel::RowPerInvocation | GemvKernel::Blocks => ("gemv_rows", 16 * 4, 0),
        }
    }
}

/// Rows per invocation of `gemv_blocks`.
const BLOCK_ROWS: u32 = 32;

/// Invocations per workgroup of `gemv_blocks` (4, 8 or 16): the most that still gives every core
/// two workgroups.
fn blocks_workgroup_size(rows: u32) -> u32 {
    let cores = std::thread::available_parallelism().map_or(4, |n| n.get()) as u32;
    let wg = rows / (BLOCK_ROWS * 2 * cores);
    if wg >= 16 {
        16
    } else if wg >= 8 {
        8
    } else {
        4
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
    let (entry, rows_per_group, wg) = kernel.entry_and_rows(w.chunks[0].rows, w.cols);
    let mut constants = vec![("W_DTYPE", w.dtype.w_dtype())];
    if wg > 0 {
        constants.push(("BLOCKS_WG", wg));
    }
    let pipeline = gpu.pipeline(&shaders::GEMV, entry, &constants)?;
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
