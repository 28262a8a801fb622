//! One module per kernel family in `shaders/`. Each owns its `#[repr(C)]` params struct
//! (laid out exactly as the WGSL `Params` struct it feeds), builds its `Dispatch`es, and
//! carries the CPU reference (`*_cpu`, f64 accumulation) its tests compare against.

pub mod argmax;
pub mod attention;
pub mod elementwise;
pub mod embedding;
pub mod gemv;
pub mod lora;
pub mod matmul;
pub mod moe;
pub mod rms_norm;
pub mod rope;
pub mod softmax;

use crate::gpu::Gpu;

/// Where a step's tokens sit, for the ops that place them (rope, attention): `meta` holds one
/// (position, first block-table entry) pair of u32 per token, `block_table` the block tables of
/// the step's sequences, concatenated. A position of [`NO_POSITION`] marks a padding token.
#[derive(Clone, Copy)]
pub struct StepTokens<'a> {
    pub meta: &'a wgpu::Buffer,
    pub block_table: &'a wgpu::Buffer,
}

/// The position of a padding token: rope skips it, attention writes zeros for it.
pub const NO_POSITION: u32 = u32::MAX;

/// The paged KV cache's geometry: `slots` positions per KV head, in blocks of `block_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvGeometry {
    pub slots: u32,
    pub block_size: u32,
}

impl KvGeometry {
    /// The cache slot of position `pos` of the sequence whose block table starts at `table`.
    pub fn slot(&self, block_table: &[u32], table: u32, pos: u32) -> u32 {
        block_table[(table + pos / self.block_size) as usize] * self.block_size + pos % self.block_size
    }
}

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
