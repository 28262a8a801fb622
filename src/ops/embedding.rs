//! Embedding lookup (`shaders/embedding.wgsl`): rows of a possibly chunked f32/f16 table.

use crate::gpu::{shaders, Dispatch, Gpu, Weight};
use crate::Result;

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub n_tokens: u32,
    pub dim: u32,
    pub first_row: u32,
    pub rows: u32,
}

/// ids (n_tokens) u32, table (vocab, dim) → x (n_tokens, dim) f32. One dispatch per chunk of
/// the table; an id outside the table leaves its row of x untouched (callers validate ids).
pub fn embedding(
    gpu: &Gpu,
    ids: &wgpu::Buffer,
    table: &Weight,
    x: &wgpu::Buffer,
    n_tokens: u32,
) -> Result<Vec<Dispatch>> {
    super::check_groups(gpu, "embedding", "tokens", n_tokens)?;
    let pipeline = gpu.pipeline(&shaders::EMBEDDING, "embedding", &[("W_DTYPE", table.dtype.w_dtype())])?;
    table
        .chunks
        .iter()
        .map(|c| {
            let params = Params { n_tokens, dim: table.cols, first_row: c.first_row, rows: c.rows };
            gpu.dispatch(
                format!("embedding {}", table.name),
                pipeline.clone(),
                &params,
                &[ids, &c.buffer, x],
                [n_tokens, 1, 1],
            )
        })
        .collect()
}

pub fn embedding_cpu(ids: &[u32], table: &[f32], dim: usize) -> Vec<f32> {
    ids.iter().flat_map(|&id| table[id as usize * dim..(id as usize + 1) * dim].iter().copied()).collect()
}
