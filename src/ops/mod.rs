//! One module per kernel family in `shaders/`. Each owns its `#[repr(C)]` params struct
//! (laid out exactly as the WGSL `Params` struct it feeds), builds its `Dispatch`es, and
//! carries the CPU reference (`*_cpu`, f64 accumulation) its tests compare against.

pub mod argmax;
pub mod attention;
pub mod elementwise;
pub mod embedding;
pub mod gemv;
pub mod matmul;
pub mod rms_norm;
pub mod rope;
pub mod softmax;

use crate::gpu::Gpu;

/// A grid of `groups` workgroups as (x, y, 1), folding into y past the per-dimension limit.
/// Kernels recover the flat index as `wid.y * groups_x + wid.x` (and bound-check it).
pub(crate) fn flat_grid(gpu: &Gpu, groups: u32) -> [u32; 3] {
    let max = gpu.limits.max_compute_workgroups_per_dimension.max(1);
    let x = groups.clamp(1, max);
    [x, groups.div_ceil(x), 1]
}

/// Check that a grid dimension fits the device.
pub(crate) fn check_groups(gpu: &Gpu, op: &'static str, what: &str, groups: u32) -> crate::Result<()> {
    let max = gpu.limits.max_compute_workgroups_per_dimension;
    if groups > max {
        return Err(crate::KilnError::shape(
            op,
            format!("{what} = {groups} exceeds the device's {max} workgroups per dimension"),
        ));
    }
    Ok(())
}
