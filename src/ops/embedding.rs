//! Embedding lookup (`shaders/embedding.wgsl`): rows of a possibly chunked f32/f16 table.

use crate::gpu::{shaders, DType, Dispatch, Gpu, Weight};
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

/// src (src_rows, dim) f32, rows (n) u32 → out (n, dim): out[i] = src[rows[i]]. A row index
/// outside src leaves its output row untouched (callers validate).
pub fn gather_rows(
    gpu: &Gpu,
    src: &wgpu::Buffer,
    rows: &wgpu::Buffer,
    out: &wgpu::Buffer,
    n: u32,
    src_rows: u32,
    dim: u32,
) -> Result<Dispatch> {
    super::check_groups(gpu, "gather_rows", "rows", n)?;
    let pipeline = gpu.pipeline(&shaders::EMBEDDING, "gather_rows", &[("W_DTYPE", DType::F32.w_dtype())])?;
    let params = Params { n_tokens: n, dim, first_row: 0, rows: src_rows };
    gpu.dispatch_at("gather_rows", pipeline, &params, &[(1, rows), (3, out), (4, src)], [n, 1, 1])
}
