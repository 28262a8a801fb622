//! Rotary position embedding (`shaders/rope.wgsl`) and its cos/sin table.

use super::{KvGeometry, StepTokens};
use crate::gpu::{shaders, Dispatch, Gpu};
use crate::{KilnError, Result};

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub n_tokens: u32,
    pub n_heads: u32,
    pub head_dim: u32,
    pub interleaved: u32,
    pub slots: u32,
    pub block_size: u32,
    pub groups_x: u32,
}

/// How the two halves of a rotated pair sit in a head vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs (j, j + D/2): HF `rotate_half`, used by HF Llama and Qwen2 checkpoints.
    HalfSplit,
    /// Pairs (2j, 2j + 1): GPT-J, and llama.cpp's permuted GGUF q/k weights.
    Interleaved,
}

/// Llama 3's frequency scaling (`rope_scaling.rope_type == "llama3"` in config.json).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// inv_freq[j] = 1 / theta^(2j / head_dim), rescaled as HF's `_compute_llama3_parameters`.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: Option<&Llama3Scaling>) -> Vec<f32> {
    inv_freq_with_factors(head_dim, theta, scaling, None)
}

/// As `inv_freq`, each frequency then divided by its factor (GGUF `rope_freqs`, as llama.cpp
/// applies it).
pub fn inv_freq_with_factors(
    head_dim: usize,
    theta: f64,
    scaling: Option<&Llama3Scaling>,
    factors: Option<&[f32]>,
) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|j| {
            let f = 1.0 / theta.powf(2.0 * j as f64 / head_dim as f64);
            let f = match scaling {
                None => f,
                Some(s) => {
                    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
                    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / s.factor
                    } else {
                        let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                            / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - smooth) * f / s.factor + smooth * f
                    }
                }
            };
            let f = match factors {
                Some(d) => f / d[j] as f64,
                None => f,
            };
            f as f32
        })
        .collect()
}

/// (cos, sin) for positions 0..max_pos, (max_pos, head_dim / 2). The angle is the f32
/// product position · inv_freq, as transformers computes it; cos and sin of it in f64.
pub fn cos_sin_table(inv_freq: &[f32], max_pos: usize) -> Vec<[f32; 2]> {
    let mut table = Vec::with_capacity(max_pos * inv_freq.len());
    for pos in 0..max_pos {
        for &f in inv_freq {
            let angle = (pos as f32 * f) as f64;
            table.push([angle.cos() as f32, angle.sin() as f32]);
        }
    }
    table
}

/// Upload the table for `rope_q`/`rope_kv`.
pub fn upload_table(gpu: &Gpu, table: &[[f32; 2]]) -> Result<wgpu::Buffer> {
    gpu.upload("rope cos/sin", bytemuck::cast_slice(table))
}

/// The geometry shared by `rope_q` and `rope_kv`.
#[derive(Clone, Copy, Debug)]
pub struct RopeShape {
    pub n_tokens: u32,
    pub n_heads: u32,
    pub head_dim: u32,
    pub layout: RopeLayout,
}

const WG: u32 = 64;

impl RopeShape {
    fn params(&self, gpu: &Gpu, kv: KvGeometry) -> Result<(Params, [u32; 3])> {
        if !self.head_dim.is_multiple_of(2) {
            return Err(KilnError::shape("rope", format!("head_dim {} is odd", self.head_dim)));
        }
        let pairs = self.n_tokens * self.n_heads * self.head_dim / 2;
        let grid = super::flat_grid(gpu, pairs.div_ceil(WG));
        let params = Params {
            n_tokens: self.n_tokens,
            n_heads: self.n_heads,
            head_dim: self.head_dim,
            interleaved: (self.layout == RopeLayout::Interleaved) as u32,
            slots: kv.slots,
            block_size: kv.block_size,
            groups_x: grid[0],
        };
        Ok((params, grid))
    }
}

/// Rotate q (n_tokens, n_heads, head_dim) in place, each token at its own position
/// (`tokens.meta`; padding tokens are left alone).
pub fn rope_q(
    gpu: &Gpu,
    table: &wgpu::Buffer,
    q: &wgpu::Buffer,
    shape: RopeShape,
    tokens: StepTokens<'_>,
) -> Result<Dispatch> {
    let (params, grid) = shape.params(gpu, KvGeometry { slots: 0, block_size: 1 })?;
    let pipeline = gpu.pipeline(&shaders::ROPE, "rope_q", &[])?;
    gpu.dispatch_at("rope_q", pipeline, &params, &[(1, table), (2, q), (6, tokens.meta)], grid)
}

/// Rotate k and write it and v (both (n_tokens, n_kv_heads, head_dim)) into the paged caches
/// (n_kv_heads, slots, head_dim), each token at its position's slot of its block table.
/// The caller guarantees every position is below the rope table's length and every block-table
/// entry it reaches names a block of the pool.
#[allow(clippy::too_many_arguments)]
pub fn rope_kv(
    gpu: &Gpu,
    table: &wgpu::Buffer,
    k: &wgpu::Buffer,
    v: &wgpu::Buffer,
    k_cache: &wgpu::Buffer,
    v_cache: &wgpu::Buffer,
    shape: RopeShape,
    kv: KvGeometry,
    tokens: StepTokens<'_>,
) -> Result<Dispatch> {
    if kv.block_size == 0 || !kv.slots.is_multiple_of(kv.block_size) {
        return Err(KilnError::shape("rope_kv", format!("{} slots in blocks of {}", kv.slots, kv.block_size)));
    }
    let (params, grid) = shape.params(gpu, kv)?;
    let pipeline = gpu.pipeline(&shaders::ROPE, "rope_kv", &[])?;
    let buffers = [(1, table), (2, k), (3, v), (4, k_cache), (5, v_cache), (6, tokens.meta), (7, tokens.block_table)];
    gpu.dispatch_at("rope_kv", pipeline, &params, &buffers, grid)
}

/// Reference: rotate x (n_tokens, n_heads, head_dim), token t at `positions[t]`, with angles
/// computed from scratch in f64 (pos · inv_freq rounded to f32 as transformers does).
pub fn rope_cpu(x: &[f32], shape: RopeShape, positions: &[u32], inv_freq: &[f32]) -> Vec<f32> {
    let d = shape.head_dim as usize;
    let half = d / 2;
    let mut y = x.to_vec();
    for (row, chunk) in y.chunks_mut(d).enumerate() {
        let t = row / shape.n_heads as usize;
        let pos = positions[t] as usize;
        for (j, &freq) in inv_freq.iter().enumerate().take(half) {
            let angle = (pos as f32 * freq) as f64;
            let (a, b) = match shape.layout {
                RopeLayout::HalfSplit => (j, j + half),
                RopeLayout::Interleaved => (2 * j, 2 * j + 1),
            };
            let (xa, xb) = (chunk[a] as f64, chunk[b] as f64);
            chunk[a] = (xa * angle.cos() - xb * angle.sin()) as f32;
            chunk[b] = (xb * angle.cos() + xa * angle.sin()) as f32;
        }
    }
    y
}
