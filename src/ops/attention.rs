//! Fused causal attention with GQA/MQA over the paged KV cache (`shaders/attention.wgsl`).
//! Each query token brings its own position and block table ([`StepTokens`]), so one dispatch
//! serves every sequence of a batched step.

use super::{KvGeometry, StepTokens, NO_POSITION};
use crate::gpu::{shaders, Dispatch, Gpu};
use crate::{KilnError, Result};

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub n_tokens: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub slots: u32,
    pub block_size: u32,
    pub n_splits: u32,
    pub split_len: u32,
    pub group: u32,
    pub head_blocks: u32,
    pub scale: f32,
    /// Keys a query sees under a sliding window (0: all of them, causally).
    pub window: u32,
}

/// Query heads one workgroup serves (`GMAX`), keys per tile (`BK`), largest head_dim (`DMAX`).
const GMAX: u32 = 8;
const BK: u32 = 64;
const DMAX: u32 = 128;

/// The attention geometry of a model and its cache.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    /// The paged KV pool's geometry.
    pub kv: KvGeometry,
    /// A sliding window: each query sees itself and the `window - 1` keys before it (Mistral);
    /// 0 for full causal attention.
    pub window: u32,
}

impl AttentionShape {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(KilnError::shape("attention", m));
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!("{} query heads do not divide into {} KV heads", self.n_heads, self.n_kv_heads));
        }
        if self.head_dim == 0 || self.head_dim > DMAX {
            return bad(format!("head_dim {} not in 1..={DMAX}", self.head_dim));
        }
        if self.kv.block_size == 0 || !self.kv.slots.is_multiple_of(self.kv.block_size) {
            return bad(format!("{} cache slots do not divide into blocks of {}", self.kv.slots, self.kv.block_size));
        }
        Ok(())
    }

    fn group(&self) -> u32 {
        self.n_heads / self.n_kv_heads
    }

    /// Query heads one `decode_lanes` invocation serves: the largest divisor of the group that
    /// is at most 8 and keeps heads × head_dim ≤ 256 (the kernel's register arrays).
    fn heads_per_lane(&self) -> u32 {
        (1..=8u32.min(self.group()))
            .rev()
            .find(|h| self.group().is_multiple_of(*h) && h * self.head_dim <= 256)
            .unwrap_or(1)
    }

    fn head_blocks(&self) -> u32 {
        self.group().div_ceil(GMAX)
    }

    /// Params for `n_tokens` queries over `n_splits` ranges of `split_len` keys.
    fn params(&self, n_tokens: u32, n_splits: u32, split_len: u32) -> Result<Params> {
        self.validate()?;
        if n_tokens == 0 {
            return Err(KilnError::shape("attention", "no queries"));
        }
        Ok(Params {
            n_tokens,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            slots: self.kv.slots,
            block_size: self.kv.block_size,
            n_splits,
            split_len,
            group: self.group(),
            head_blocks: self.head_blocks(),
            scale: 1.0 / (self.head_dim as f32).sqrt(),
            window: self.window,
        })
    }

    /// The keys a query at sequence length `kv_len` sees: all of them, or the window's worth.
    pub fn visible(&self, kv_len: u32) -> u32 {
        if self.window == 0 {
            kv_len
        } else {
            kv_len.min(self.window)
        }
    }

    /// The first key a query sees when its sequence holds `kv_len` keys (itself included).
    pub fn first_key(&self, kv_len: u32) -> u32 {
        kv_len - self.visible(kv_len)
    }

    /// How to split the keys of `n_tokens` queries that see at most `kv_len` keys so the step
    /// fills about `target_groups` workgroups: (n_splits, split_len), split_len a multiple of the
    /// 64-key tile. Never more than ceil(target_groups / (n_tokens · n_kv_heads)) splits, so
    /// n_tokens · n_splits ≤ n_tokens + target_groups.
    pub fn splits(&self, n_tokens: u32, kv_len: u32, target_groups: u32) -> (u32, u32) {
        let per_split = self.n_kv_heads * self.head_blocks() * n_tokens.max(1);
        let want = target_groups.div_ceil(per_split).max(1);
        let split_len = kv_len.div_ceil(want).div_ceil(BK).max(1) * BK;
        (kv_len.div_ceil(split_len).max(1), split_len)
    }
}

/// q (n_tokens, n_heads, head_dim) attends causally to the paged cache (n_kv_heads, slots,
/// head_dim): token t to keys 0 ..= its position of its sequence (the last `window` of them
/// under a sliding window), which the cache already holds
/// → out, same shape as q. The caller guarantees the block tables cover those keys.
pub fn prefill(
    gpu: &Gpu,
    shape: &AttentionShape,
    q: &wgpu::Buffer,
    k_cache: &wgpu::Buffer,
    v_cache: &wgpu::Buffer,
    out: &wgpu::Buffer,
    n_tokens: u32,
    tokens: StepTokens<'_>,
) -> Result<Dispatch> {
    let params = shape.params(n_tokens, 1, 0)?;
    super::check_groups(gpu, "attention", "queries", n_tokens)?;
    let pipeline = gpu.pipeline(&shaders::ATTENTION, "prefill", &[])?;
    let grid = [shape.n_kv_heads * shape.head_blocks(), n_tokens, 1];
    let buffers = [(1, q), (2, k_cache), (3, v_cache), (4, out), (7, tokens.meta), (8, tokens.block_table)];
    gpu.dispatch_at("attention prefill", pipeline, &params, &buffers, grid)
}

/// Scratch for split-KV decoding: room for `query_splits` (query, split) partial results.
pub struct Partials {
    pub ml: wgpu::Buffer,
    pub acc: wgpu::Buffer,
    pub query_splits: u32,
}

impl Partials {
    pub fn new(gpu: &Gpu, shape: &AttentionShape, query_splits: u32) -> Result<Self> {
        let slots = query_splits as u64 * shape.n_heads as u64;
        Ok(Partials {
            ml: gpu.buffer("attention partial max/sum", slots * 8)?,
            acc: gpu.buffer("attention partial output", slots * shape.head_dim as u64 * 4)?,
            query_splits,
        })
    }
}

/// The two formulations of the split step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitKernel {
    /// A workgroup per (query, KV head, head block, split): 64 keys at a time through shared memory.
    Workgroup,
    /// An invocation per (query, head, split), streaming its keys in registers: for CPU adapters.
    Lanes,
}

impl SplitKernel {
    pub fn for_device(gpu: &Gpu) -> Self {
        if gpu.is_cpu_adapter() {
            SplitKernel::Lanes
        } else {
            SplitKernel::Workgroup
        }
    }

    /// The split dispatch's grid for `n_tokens` queries and `n_splits` ranges.
    pub fn grid(self, shape: &AttentionShape, n_tokens: u32, n_splits: u32) -> [u32; 3] {
        match self {
            SplitKernel::Workgroup => [shape.n_kv_heads * shape.head_blocks(), n_tokens, n_splits],
            SplitKernel::Lanes => {
                let lanes = shape.n_kv_heads * (shape.group() / shape.heads_per_lane());
                [(lanes * n_splits).div_ceil(LANES_WG), n_tokens, 1]
            }
        }
    }
}

/// Invocations per workgroup of `decode_lanes` (`LANES_WG`).
const LANES_WG: u32 = 8;

/// The same result as `prefill`, computed as `n_splits` ranges of `split_len` keys in
/// parallel and then merged: two dispatches (split, reduce), with the device's split kernel.
#[allow(clippy::too_many_arguments)]
pub fn decode(
    gpu: &Gpu,
    shape: &AttentionShape,
    q: &wgpu::Buffer,
    k_cache: &wgpu::Buffer,
    v_cache: &wgpu::Buffer,
    out: &wgpu::Buffer,
    partials: &Partials,
    n_tokens: u32,
    splits: (u32, u32),
    tokens: StepTokens<'_>,
) -> Result<[Dispatch; 2]> {
    decode_with(gpu, SplitKernel::for_device(gpu), shape, q, k_cache, v_cache, out, partials, n_tokens, splits, tokens)
}

#[allow(clippy::too_many_arguments)]
pub fn decode_with(
    gpu: &Gpu,
    kernel: SplitKernel,
    shape: &AttentionShape,
    q: &wgpu::Buffer,
    k_cache: &wgpu::Buffer,
    v_cache: &wgpu::Buffer,
    out: &wgpu::Buffer,
    partials: &Partials,
    n_tokens: u32,
    (n_splits, split_len): (u32, u32),
    tokens: StepTokens<'_>,
) -> Result<[Dispatch; 2]> {
    if n_tokens as u64 * n_splits as u64 > partials.query_splits as u64 {
        return Err(KilnError::shape(
            "attention",
            format!("{n_tokens} queries × {n_splits} splits exceed the scratch for {}", partials.query_splits),
        ));
    }
    if split_len == 0 || split_len % BK != 0 {
        return Err(KilnError::shape("attention", format!("splits of {split_len} keys are not whole 64-key tiles")));
    }
    let params = shape.params(n_tokens, n_splits, split_len)?;
    super::check_groups(gpu, "attention", "queries", n_tokens)?;
    if kernel == SplitKernel::Lanes && !shape.head_dim.is_multiple_of(4) {
        return Err(KilnError::shape(
            "attention",
            format!("decode_lanes needs head_dim % 4 == 0, got {}", shape.head_dim),
        ));
    }
    let entry = match kernel {
        SplitKernel::Workgroup => "decode_split",
        SplitKernel::Lanes => "decode_lanes",
    };
    let split = match kernel {
        SplitKernel::Workgroup => gpu.pipeline(&shaders::ATTENTION, entry, &[])?,
        SplitKernel::Lanes => gpu.pipeline(
            &shaders::ATTENTION,
            entry,
            &[("HEAD_DIM", shape.head_dim), ("HEADS_PER_LANE", shape.heads_per_lane())],
        )?,
    };
    let reduce = gpu.pipeline(&shaders::ATTENTION, "decode_reduce", &[])?;
    let grid = kernel.grid(shape, n_tokens, n_splits);
    Ok([
        gpu.dispatch_at(
            "attention split",
            split,
            &params,
            &[
                (1, q),
                (2, k_cache),
                (3, v_cache),
                (5, &partials.ml),
                (6, &partials.acc),
                (7, tokens.meta),
                (8, tokens.block_table),
            ],
            grid,
        )?,
        gpu.dispatch_at(
            "attention reduce",
            reduce,
            &params,
            &[(4, out), (5, &partials.ml), (6, &partials.acc), (7, tokens.meta)],
            [shape.n_heads, n_tokens, 1],
        )?,
    ])
}

/// The attention probabilities of q (n_tokens, n_heads, head_dim) over the paged cache →
/// probs (n_heads, n_tokens, n_keys): row (h, t) is softmax(q[t, h]·Kᵀ·scale) over the keys the
/// token sees (0 ..= its position, or its window of them), zeros elsewhere. `n_keys` ≥ every token's position + 1. For inspection
/// (`kiln attention`), not for the forward pass.
#[allow(clippy::too_many_arguments)]
pub fn probabilities(
    gpu: &Gpu,
    shape: &AttentionShape,
    q: &wgpu::Buffer,
    k_cache: &wgpu::Buffer,
    probs: &wgpu::Buffer,
    n_tokens: u32,
    n_keys: u32,
    tokens: StepTokens<'_>,
) -> Result<Dispatch> {
    // `split_len` carries the row length of probs for this entry point.
    let params = shape.params(n_tokens, 1, n_keys)?;
    let pipeline = gpu.pipeline(&shaders::ATTENTION, "attention_probs", &[])?;
    let groups = (n_tokens * shape.n_heads).div_ceil(64);
    super::check_groups(gpu, "attention", "query heads", groups)?;
    let buffers = [(1, q), (2, k_cache), (7, tokens.meta), (8, tokens.block_table), (9, probs)];
    gpu.dispatch_at("attention probs", pipeline, &params, &buffers, [groups, 1, 1])
}

/// How far an attention probability may be from the reference, for queries and keys with
/// entries in [-1, 1] (so |s| ≤ √head_dim after the 1/√d scale): the score carries
/// ≤ D·u·|s|max, exp adds ≤ (3 + 2|s|) ulp, the normalising sum kv_len·u; probabilities are ≤ 1,
/// so that relative bound, doubled, is absolute.
pub fn probability_error_bound(head_dim: u32, kv_len: u32) -> f64 {
    let (u, d) = (f32::EPSILON as f64 / 2.0, head_dim as f64);
    let smax = d.sqrt();
    2.0 * (d * u * smax + (3.0 + 4.0 * smax) * u + kv_len as f64 * u)
}

/// How far an attention output may be from the reference, for q, K and V entries in [-1, 1]:
/// the weights are off by ≤ 2× the score and exp error, the output (a convex mix of |v| ≤ 1) by as
/// much, plus kv_len·u from summing the mix; doubled.
pub fn output_error_bound(head_dim: u32, kv_len: u32) -> f64 {
    let (u, d) = (f32::EPSILON as f64 / 2.0, head_dim as f64);
    let smax = d.sqrt();
    (2.0 * (d * u * smax + (3.0 + 4.0 * smax) * u) + 2.0 * kv_len as f64 * u) * 2.0
}

/// The reference's core, in f64: for each real token t and head h, the cache slots of the keys
/// it sees (0 ..= pos(t), or the window's last ones) and softmax(q[t, h]·Kᵀ·scale) over them; `f(t, h, slots, probabilities)`.
fn reference_softmax(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    meta: &[[u32; 2]],
    block_table: &[u32],
    mut f: impl FnMut(usize, usize, &[usize], &[f64]),
) {
    let (h_n, d, slots) = (shape.n_heads as usize, shape.head_dim as usize, shape.kv.slots as usize);
    let group = (shape.n_heads / shape.n_kv_heads) as usize;
    let scale = 1.0 / (d as f64).sqrt();
    for (t, &[pos, table]) in meta.iter().enumerate() {
        if pos == NO_POSITION {
            continue;
        }
        let first = shape.first_key(pos + 1);
        let rows: Vec<usize> = (first..=pos).map(|j| shape.kv.slot(block_table, table, j) as usize).collect();
        for h in 0..h_n {
            let kvh = h / group;
            let qv = &q[(t * h_n + h) * d..][..d];
            let scores: Vec<f64> = rows
                .iter()
                .map(|&r| {
                    let kr = &k[(kvh * slots + r) * d..][..d];
                    qv.iter().zip(kr).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let sum: f64 = w.iter().sum();
            let p: Vec<f64> = w.iter().map(|x| x / sum).collect();
            let kv_rows: Vec<usize> = rows.iter().map(|&r| kvh * slots + r).collect();
            f(t, h, &kv_rows, &p);
        }
    }
}

/// Reference attention probabilities in f64, laid out as `probabilities` writes them.
pub fn probabilities_cpu(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    meta: &[[u32; 2]],
    block_table: &[u32],
    n_keys: usize,
) -> Vec<f32> {
    let (h_n, n_tokens) = (shape.n_heads as usize, meta.len());
    let mut out = vec![0f32; h_n * n_tokens * n_keys];
    reference_softmax(shape, q, k, meta, block_table, |t, h, _, p| {
        let first = shape.first_key(meta[t][0] + 1) as usize;
        for (j, pj) in p.iter().enumerate() {
            out[(h * n_tokens + t) * n_keys + first + j] = *pj as f32;
        }
    });
    out
}

/// Reference causal attention in f64. q (n_tokens, n_heads, d); k, v the paged pools
/// (n_kv_heads, slots, d); `meta[t]` = (position, first block-table entry) of token t, position
/// [`NO_POSITION`] for padding (zeros out).
pub fn attention_cpu(
    shape: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    meta: &[[u32; 2]],
    block_table: &[u32],
) -> Vec<f32> {
    let (h_n, d) = (shape.n_heads as usize, shape.head_dim as usize);
    let mut out = vec![0f32; meta.len() * h_n * d];
    reference_softmax(shape, q, k, meta, block_table, |t, h, rows, p| {
        for e in 0..d {
            let o: f64 = rows.iter().zip(p).map(|(&r, pj)| pj * v[r * d + e] as f64).sum();
            out[(t * h_n + h) * d + e] = o as f32;
        }
    });
    out
}
