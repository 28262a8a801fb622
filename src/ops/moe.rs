//! Mixture-of-experts routing and expert products (`shaders/moe.wgsl`): the router's top-k, the
//! assignments grouped by expert, each expert's matrix applied to its own tokens only, and the
//! weighted sum back into the residual stream.

use crate::gpu::{shaders, Dispatch, Gpu, Weight};
use crate::{KilnError, Result};

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub n_tokens: u32,
    pub n_experts: u32,
    pub top_k: u32,
    pub norm_topk: u32,
    pub k: u32,
    pub rows: u32,
    pub first_expert: u32,
    pub chunk_experts: u32,
    pub x_per_token: u32,
    pub dim: u32,
    pub has_shared: u32,
    pub _pad: u32,
}

/// The routing of a step: `n_tokens` tokens, each to `top_k` of `n_experts`.
#[derive(Clone, Copy, Debug)]
pub struct Routing {
    pub n_tokens: u32,
    pub n_experts: u32,
    pub top_k: u32,
}

impl Routing {
    /// (token, chosen expert) pairs: n_tokens · top_k.
    pub fn assignments(&self) -> u32 {
        self.n_tokens * self.top_k
    }

    /// u32 entries of the `groups` buffer: expert starts, the active count and list, the order.
    pub fn groups_len(&self) -> u32 {
        2 * self.n_experts + 2 + self.assignments()
    }

    fn params(&self) -> Params {
        Params { n_tokens: self.n_tokens, n_experts: self.n_experts, top_k: self.top_k, ..Default::default() }
    }

    fn check(&self, gpu: &Gpu) -> Result<()> {
        if self.n_tokens == 0 || self.n_experts == 0 || self.top_k == 0 || self.top_k > self.n_experts {
            return Err(KilnError::shape("moe", format!("{self:?}")));
        }
        if self.n_experts as usize > crate::model::config::MAX_EXPERTS
            || self.top_k as usize > crate::model::config::MAX_TOP_K
        {
            return Err(KilnError::shape("moe", format!("{self:?}: at most 256 experts and 16 per token")));
        }
        super::check_groups(gpu, "moe", "tokens", self.n_tokens.div_ceil(64))
    }
}

/// Router logits (n_tokens, n_experts) → each token's top_k experts (ids) and their weights:
/// softmax probabilities, renormalised over the chosen ones when `norm_topk`.
pub fn route(
    gpu: &Gpu,
    r: Routing,
    logits: &wgpu::Buffer,
    ids: &wgpu::Buffer,
    weights: &wgpu::Buffer,
    norm_topk: bool,
) -> Result<Dispatch> {
    r.check(gpu)?;
    let pipeline = gpu.pipeline(&shaders::MOE, "route", &[])?;
    let params = Params { norm_topk: norm_topk as u32, ..r.params() };
    let buffers = [(4, logits), (5, ids), (6, weights)];
    gpu.dispatch_at("moe route", pipeline, &params, &buffers, [r.n_tokens.div_ceil(64), 1, 1])
}

/// The assignments grouped by expert, into `groups` (`Routing::groups_len` u32s).
pub fn group(gpu: &Gpu, r: Routing, ids: &wgpu::Buffer, groups: &wgpu::Buffer) -> Result<Dispatch> {
    r.check(gpu)?;
    let pipeline = gpu.pipeline(&shaders::MOE, "group", &[])?;
    gpu.dispatch_at("moe group", pipeline, &r.params(), &[(5, ids), (7, groups)], [1, 1, 1])
}

/// Rows of one expert each invocation computes, and invocations per workgroup (`EM_ROWS`, `EM_WG`).
const EM_ROWS: u32 = 8;
const EM_WG: u32 = 8;

/// y[a] = W[expert(a)] · x[row(a)] for every assignment a: `w` stacks `n_experts` matrices of
/// (rows × k); x row is a's token (`x_per_token`: the token's hidden state, read by each of its
/// experts) or a itself (the expert's own intermediate activations). y is (assignments, rows).
/// One dispatch per chunk of the stack; each reads only the chosen experts' rows.
pub fn expert_matmul(
    gpu: &Gpu,
    r: Routing,
    w: &Weight,
    x: &wgpu::Buffer,
    x_per_token: bool,
    groups: &wgpu::Buffer,
    y: &wgpu::Buffer,
) -> Result<Vec<Dispatch>> {
    r.check(gpu)?;
    if w.rows % r.n_experts != 0 {
        return Err(KilnError::shape("moe", format!("{}: {} rows are not {} experts", w.name, w.rows, r.n_experts)));
    }
    let rows = w.rows / r.n_experts;
    let pipeline = gpu.pipeline(&shaders::MOE, "expert_matmul", &[("W_DTYPE", w.dtype.w_dtype())])?;
    let row_groups = rows.div_ceil(EM_ROWS * EM_WG);
    // A workgroup row per expert that can have work: no more than there are assignments.
    let slots = r.n_experts.min(r.assignments());
    super::check_groups(gpu, "moe", "expert row groups", row_groups.max(slots))?;
    w.chunks
        .iter()
        .map(|c| {
            if c.first_row % rows != 0 || c.rows % rows != 0 {
                return Err(KilnError::shape("moe", format!("{}: a chunk splits an expert", w.name)));
            }
            let params = Params {
                k: w.cols,
                rows,
                first_expert: c.first_row / rows,
                chunk_experts: c.rows / rows,
                x_per_token: x_per_token as u32,
                ..r.params()
            };
            let buffers = [(1, &c.buffer), (2, x), (3, y), (7, groups)];
            gpu.dispatch_at(
                format!("moe expert_matmul {}", w.name),
                pipeline.clone(),
                &params,
                &buffers,
                [row_groups, slots, 1],
            )
        })
        .collect()
}

/// residual[t] += Σ_s weights[t, s] · expert_out[t·top_k + s] (+ sigmoid(shared_gate[t]) ·
/// shared_out[t] with a shared expert).
pub fn combine(
    gpu: &Gpu,
    r: Routing,
    dim: u32,
    weights: &wgpu::Buffer,
    expert_out: &wgpu::Buffer,
    shared: Option<(&wgpu::Buffer, &wgpu::Buffer)>,
    residual: &wgpu::Buffer,
) -> Result<Dispatch> {
    r.check(gpu)?;
    let pipeline = gpu.pipeline(&shaders::MOE, "combine", &[])?;
    let params = Params { dim, has_shared: shared.is_some() as u32, ..r.params() };
    let (shared_out, shared_gate) = shared.unwrap_or((&gpu.empty, &gpu.empty));
    let buffers = [(6, weights), (8, expert_out), (9, residual), (10, shared_out), (11, shared_gate)];
    let grid = super::flat_grid(gpu, (r.n_tokens * dim).div_ceil(64));
    gpu.dispatch_at("moe combine", pipeline, &params, &buffers, grid)
}

/// Reference routing in f64: per token, the top_k experts by logit (ties: the lower index) and
/// their softmax probabilities, renormalised over the chosen ones when `norm_topk`.
pub fn route_cpu(logits: &[f32], n_experts: usize, top_k: usize, norm_topk: bool) -> (Vec<u32>, Vec<f32>) {
    let (mut ids, mut weights) = (Vec::new(), Vec::new());
    for row in logits.chunks(n_experts) {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &l| m.max(l as f64));
        let sum: f64 = row.iter().map(|&l| (l as f64 - m).exp()).sum();
        let mut order: Vec<usize> = (0..n_experts).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        let chosen: Vec<f64> = order[..top_k].iter().map(|&e| (row[e] as f64 - m).exp() / sum).collect();
        let total: f64 = chosen.iter().sum();
        for (&e, p) in order[..top_k].iter().zip(&chosen) {
            ids.push(e as u32);
            weights.push(if norm_topk { p / total } else { *p } as f32);
        }
    }
    (ids, weights)
}

/// Reference of the grouping: (expert starts, active experts, order), as `group` lays them out.
pub fn group_cpu(ids: &[u32], n_experts: usize) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut starts = vec![0u32; n_experts + 1];
    for e in 0..n_experts {
        starts[e + 1] = starts[e] + ids.iter().filter(|&&i| i as usize == e).count() as u32;
    }
    let active = (0..n_experts as u32).filter(|&e| starts[e as usize + 1] > starts[e as usize]).collect();
    let mut order: Vec<u32> = (0..ids.len() as u32).collect();
    order.sort_by_key(|&a| ids[a as usize]);
    (starts, active, order)
}

/// Reference expert products in f64: `w` the stacked experts dequantised, (n_experts · rows, k).
pub fn expert_matmul_cpu(
    w: &[f32],
    k: usize,
    rows: usize,
    x: &[f32],
    ids: &[u32],
    top_k: usize,
    x_per_token: bool,
) -> Vec<f32> {
    let mut y = vec![0f32; ids.len() * rows];
    for (a, &e) in ids.iter().enumerate() {
        let xr = if x_per_token { a / top_k } else { a };
        let xv = &x[xr * k..][..k];
        for r in 0..rows {
            let wr = &w[(e as usize * rows + r) * k..][..k];
            y[a * rows + r] = wr.iter().zip(xv).map(|(&p, &q)| p as f64 * q as f64).sum::<f64>() as f32;
        }
    }
    y
}

/// Reference of `combine`, in f64, returning the new residual.
pub fn combine_cpu(
    residual: &[f32],
    dim: usize,
    top_k: usize,
    weights: &[f32],
    expert_out: &[f32],
    shared: Option<(&[f32], &[f32])>,
) -> Vec<f32> {
    residual
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let (t, d) = (i / dim, i % dim);
            let mut s: f64 =
                (0..top_k).map(|j| weights[t * top_k + j] as f64 * expert_out[(t * top_k + j) * dim + d] as f64).sum();
            if let Some((out, gate)) = shared {
                s += out[i] as f64 / (1.0 + (-gate[t] as f64).exp());
            }
            (x as f64 + s) as f32
        })
        .collect()
}
