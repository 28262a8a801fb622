//! The forward pass of a Llama/Qwen2 decoder over a batched step, recorded once per step shape
//! as a list of dispatches over preallocated buffers (llama2.c's `forward`, calm's GPU path):
//!
//!   x = embed_tokens[ids]
//!   for each layer:
//!     h = rms_norm(x) · input_layernorm
//!     q, k, v = h·Wqᵀ (+bq), h·Wkᵀ (+bk), h·Wvᵀ (+bv)
//!     q, k = rms_norm(q) · q_norm, rms_norm(k) · k_norm          (per head, Qwen3)
//!     q, k = rope(q, pos), rope(k, pos); cache[slot(pos)] = k, v
//!     x += attention(q, cache) · Woᵀ (+bo)
//!     h = rms_norm(x) · post_attention_layernorm
//!     x += (silu(h·Wgateᵀ) ⊙ h·Wupᵀ) · Wdownᵀ                    (a dense MLP)
//!     or, a mixture of experts: p = softmax(h·Wrouterᵀ); for the top-k experts e of each token,
//!     x += Σ_e p_e · (silu(h·Wgate_eᵀ) ⊙ h·Wup_eᵀ) · Wdown_eᵀ  (+ sigmoid(h·w) · shared_mlp(h))
//!   logits = rms_norm(x[rows]) · norm · lm_headᵀ
//!
//! A step is any mix of tokens from any sequences: each token's position and block table are
//! data in GPU buffers ([`StepInputs`]), not values baked into params, so one recorded plan
//! serves every step with the same [`PlanKey`] (token count and logit rows, rounded up to a
//! bucket; the padding tokens do nothing). Matmuls run over all tokens at once; rope, the K/V
//! writes and attention go through each token's own position and block table in the paged
//! [`KvCache`]. Only the rows that need logits (each sequence's last token, or all) reach the
//! lm-head. Weights and the KV cache never leave the GPU; one submission per step; the host
//! reads back logits, or one token id per row for greedy decoding.

use super::config::ModelConfig;
use super::weights::{DenseMlp, Mlp, Weights};
use crate::gpu::{Dispatch, Gpu, Weight};
use crate::ops::{
    argmax, attention, elementwise, embedding, gemv, lora, matmul, moe, rms_norm, rope, KvGeometry, StepTokens,
};
use crate::{KilnError, Result};

/// The paged KV cache: per layer, one K and one V pool of (n_kv_heads, slots, head_dim), f16
/// where the device has SHADER_F16, else f32, cut into blocks of `block_size` positions. Which
/// blocks a sequence owns is its block table's business (the engine's block pool, or a
/// session's identity table).
pub struct KvCache {
    pub k: Vec<wgpu::Buffer>,
    pub v: Vec<wgpu::Buffer>,
    pub geometry: KvGeometry,
    pub element_bytes: u32,
}

impl KvCache {
    pub fn new(gpu: &Gpu, c: &ModelConfig, blocks: u32, block_size: u32) -> Result<KvCache> {
        if blocks == 0 || block_size == 0 {
            return Err(KilnError::Request(format!("a KV cache of {blocks} blocks of {block_size} positions")));
        }
        let element_bytes = gpu.kv_element_bytes();
        let slots = blocks as u64 * block_size as u64;
        let layer_bytes = c.kv_dim() as u64 * slots * element_bytes as u64;
        if layer_bytes > gpu.max_binding || slots > u32::MAX as u64 / 2 {
            let max_slots = gpu.max_binding / (c.kv_dim() as u64 * element_bytes as u64);
            return Err(KilnError::Request(format!(
                "a KV cache of {slots} positions needs {layer_bytes} bytes of K per layer, over this device's {} byte binding limit; use at most {max_slots} positions",
                gpu.max_binding
            )));
        }
        let total = 2 * c.n_layers as u64 * layer_bytes;
        // Out of memory here is usually a budget too large for what the weights left free.
        let too_big = |e: KilnError| {
            match e {
            KilnError::OutOfMemory { kernel, message } => KilnError::OutOfMemory {
                kernel,
                message: format!(
                    "{message}; the KV cache of {slots} positions needs {:.2} GiB: ask for less KV memory or a shorter context",
                    total as f64 / (1u64 << 30) as f64
                ),
            },
            other => other,
        }
        };
        let mut k = Vec::new();
        let mut v = Vec::new();
        for l in 0..c.n_layers {
            k.push(gpu.buffer(&format!("k cache {l}"), layer_bytes).map_err(too_big)?);
            v.push(gpu.buffer(&format!("v cache {l}"), layer_bytes).map_err(too_big)?);
        }
        Ok(KvCache { k, v, geometry: KvGeometry { slots: slots as u32, block_size }, element_bytes })
    }

    pub fn blocks(&self) -> u32 {
        self.geometry.slots / self.geometry.block_size
    }

    pub fn bytes(&self) -> u64 {
        self.k.iter().chain(&self.v).map(|b| b.size()).sum()
    }

    /// Layer `layer`'s K pool as f32, (n_kv_heads, slots, head_dim): for inspection and tests.
    pub fn read_k(&self, gpu: &Gpu, layer: usize) -> Result<Vec<f32>> {
        let bytes = gpu.read_bytes(&self.k[layer], self.k[layer].size())?;
        let dtype = if self.element_bytes == 2 { crate::gpu::DType::F16 } else { crate::gpu::DType::F32 };
        crate::quant::decode(dtype, &bytes, bytes.len() / self.element_bytes as usize)
    }
}

/// What a plan with probes records besides the step: for each probed layer, its attention
/// probabilities (n_heads, tokens, n_keys) and its rotated queries (tokens, n_heads·head_dim)
/// (`kiln attention`); for each probed mixture-of-experts layer, the experts each token chose and
/// their weights. Each in its own buffer. A normal step never has probes.
pub struct Probes {
    pub layers: Vec<ProbedLayer>,
    pub n_keys: u32,
    pub routes: Vec<ProbedRoute>,
}

/// A mixture-of-experts layer's routing: ids and weights, (tokens, top_k) each.
pub struct ProbedRoute {
    pub layer: usize,
    pub ids: wgpu::Buffer,
    pub weights: wgpu::Buffer,
}

pub struct ProbedLayer {
    pub layer: usize,
    pub probs: wgpu::Buffer,
    pub q: wgpu::Buffer,
}

/// The shape a plan is recorded for: tokens per step and rows of logits (both already rounded
/// to their bucket), and whether the rows' argmax is taken on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PlanKey {
    pub tokens: u32,
    /// Rows through the lm-head: 0 (a prompt chunk that is not the last) up to `tokens`.
    pub rows: u32,
    pub argmax: bool,
}

/// Round a count up to its plan bucket: exact up to 16, then multiples of 16, at most `max`.
/// Few enough plans to keep, little padding.
pub fn bucket(n: u32, max: u32) -> u32 {
    let b = if n <= 16 { n } else { n.div_ceil(16) * 16 };
    b.min(max)
}

/// Preallocated activations and step inputs for up to `max_tokens` tokens per step.
pub struct Activations {
    pub max_tokens: u32,
    /// Most rows of logits a step makes: `max_tokens`, or fewer where (rows × vocab) exceeds one
    /// binding.
    pub max_rows: u32,
    /// Entries of `inputs.block_table`.
    pub max_table_entries: u32,
    pub inputs: StepInputs,
    x: wgpu::Buffer,  // (T, hidden) the residual stream
    xn: wgpu::Buffer, // (T, hidden) normalised
    q: wgpu::Buffer,  // (T, n_heads·head_dim)
    k: wgpu::Buffer,  // (T, n_kv_heads·head_dim)
    /// q and k with each head RMS-normalised, for models that do that (Qwen3).
    qk_normed: Option<(wgpu::Buffer, wgpu::Buffer)>,
    v: wgpu::Buffer,          // (T, n_kv_heads·head_dim)
    attn: wgpu::Buffer,       // (T, n_heads·head_dim)
    proj: wgpu::Buffer,       // (T, hidden) o_proj / down_proj output
    gate: wgpu::Buffer,       // (T, intermediate)
    up: wgpu::Buffer,         // (T, intermediate)
    act: wgpu::Buffer,        // (T, intermediate)
    x_rows: wgpu::Buffer,     // (max_rows, hidden) the rows of x whose logits are wanted
    pub logits: wgpu::Buffer, // (max_rows, vocab)
    pub tokens: wgpu::Buffer, // (max_rows) u32: greedy picks
    partials: attention::Partials,
    moe: Option<MoeScratch>,
}

/// The activations of a mixture-of-experts block, for `max_tokens` tokens and their top-k
/// experts ("assignments").
struct MoeScratch {
    router_logits: wgpu::Buffer, // (T, n_experts)
    ids: wgpu::Buffer,           // (T, top_k) u32: the chosen experts
    weights: wgpu::Buffer,       // (T, top_k): their weights
    groups: wgpu::Buffer,        // the assignments grouped by expert (ops/moe.rs)
    gate: wgpu::Buffer,          // (T·top_k, expert_intermediate)
    up: wgpu::Buffer,            // (T·top_k, expert_intermediate)
    act: wgpu::Buffer,           // (T·top_k, expert_intermediate)
    out: wgpu::Buffer,           // (T·top_k, hidden)
    shared_gate: wgpu::Buffer,   // (T): the shared expert's gate logit
}

impl MoeScratch {
    fn buffers(&self) -> [&wgpu::Buffer; 9] {
        [
            &self.router_logits,
            &self.ids,
            &self.weights,
            &self.groups,
            &self.gate,
            &self.up,
            &self.act,
            &self.out,
            &self.shared_gate,
        ]
    }
}

/// What a step is told about its tokens, in GPU buffers the plan reads.
pub struct StepInputs {
    pub ids: wgpu::Buffer,         // (max_tokens) u32 token ids
    pub meta: wgpu::Buffer,        // (max_tokens) (position, first block-table entry)
    pub block_table: wgpu::Buffer, // (max_table_entries) u32: the sequences' block tables
    pub rows: wgpu::Buffer,        // (max_rows) u32: the tokens whose logits are wanted
    pub adapters: wgpu::Buffer,    // (max_tokens) u32: each token's LoRA adapters, a bit mask
}

impl StepInputs {
    fn tokens(&self) -> StepTokens<'_> {
        StepTokens { meta: &self.meta, block_table: &self.block_table }
    }
}

/// Workgroups a decode step's attention aims to fill (KV split across them).
const ATTENTION_TARGET_GROUPS: u32 = 64;

impl Activations {
    /// `max_tokens` per step, sequences of at most `max_context` positions in blocks of
    /// `block_size` (sizes the block-table buffer: every token of a step may be its own sequence).
    pub fn new(gpu: &Gpu, c: &ModelConfig, max_tokens: u32, max_context: u32, block_size: u32) -> Result<Activations> {
        let t = max_tokens as u64;
        let f32s = |n: usize| t * n as u64 * 4;
        let vocab_row = c.vocab_size as u64 * 4;
        let max_rows = (gpu.max_binding / vocab_row).clamp(1, t) as u32;
        let max_table_entries = max_tokens * max_context.div_ceil(block_size);
        let shape = attention_shape(c, KvGeometry { slots: block_size, block_size }, None);
        // The dense MLP's buffers also serve a mixture's shared expert.
        let dense_intermediate =
            c.intermediate_size.max(c.moe.as_ref().and_then(|m| m.shared_intermediate_size).unwrap_or(0));
        let moe = match &c.moe {
            None => None,
            Some(m) => {
                let r = moe::Routing { n_tokens: max_tokens, n_experts: m.n_experts as u32, top_k: m.top_k as u32 };
                let assigned = |n: usize| r.assignments() as u64 * n as u64 * 4;
                Some(MoeScratch {
                    router_logits: gpu.buffer("router logits", f32s(m.n_experts))?,
                    ids: gpu.buffer("expert ids", assigned(1))?,
                    weights: gpu.buffer("expert weights", assigned(1))?,
                    groups: gpu.buffer("expert groups", r.groups_len() as u64 * 4)?,
                    gate: gpu.buffer("expert gate", assigned(m.expert_intermediate_size))?,
                    up: gpu.buffer("expert up", assigned(m.expert_intermediate_size))?,
                    act: gpu.buffer("expert act", assigned(m.expert_intermediate_size))?,
                    out: gpu.buffer("expert out", assigned(c.hidden_size))?,
                    shared_gate: gpu.buffer("shared expert gate", f32s(1))?,
                })
            }
        };
        Ok(Activations {
            max_tokens,
            max_rows,
            max_table_entries,
            inputs: StepInputs {
                ids: gpu.buffer("ids", t * 4)?,
                meta: gpu.buffer("token positions", t * 8)?,
                block_table: gpu.buffer("block tables", max_table_entries as u64 * 4)?,
                rows: gpu.buffer("logit rows", max_rows as u64 * 4)?,
                adapters: gpu.buffer("token adapters", t * 4)?,
            },
            x: gpu.buffer("x", f32s(c.hidden_size))?,
            xn: gpu.buffer("xn", f32s(c.hidden_size))?,
            q: gpu.buffer("q", f32s(c.q_dim()))?,
            k: gpu.buffer("k", f32s(c.kv_dim()))?,
            qk_normed: match c.qk_norm {
                true => Some((gpu.buffer("q normed", f32s(c.q_dim()))?, gpu.buffer("k normed", f32s(c.kv_dim()))?)),
                false => None,
            },
            v: gpu.buffer("v", f32s(c.kv_dim()))?,
            attn: gpu.buffer("attn", f32s(c.q_dim()))?,
            proj: gpu.buffer("proj", f32s(c.hidden_size))?,
            gate: gpu.buffer("gate", f32s(dense_intermediate))?,
            up: gpu.buffer("up", f32s(dense_intermediate))?,
            act: gpu.buffer("act", f32s(dense_intermediate))?,
            x_rows: gpu.buffer("x rows", max_rows as u64 * c.hidden_size as u64 * 4)?,
            logits: gpu.buffer("logits", max_rows as u64 * vocab_row)?,
            tokens: gpu.buffer("greedy tokens", max_rows as u64 * 4)?,
            // `splits` keeps tokens × splits ≤ tokens + target.
            partials: attention::Partials::new(gpu, &shape, max_tokens + ATTENTION_TARGET_GROUPS)?,
            moe,
        })
    }

    /// Bytes of GPU memory held.
    pub fn bytes(&self) -> u64 {
        let i = &self.inputs;
        let normed = self.qk_normed.iter().flat_map(|(q, k)| [q.size(), k.size()]).sum::<u64>();
        let experts = self.moe.iter().flat_map(|m| m.buffers()).map(|b| b.size()).sum::<u64>();
        normed
            + experts
            + i.adapters.size()
            + [
                &i.ids,
                &i.meta,
                &i.block_table,
                &i.rows,
                &self.x,
                &self.xn,
                &self.q,
                &self.k,
                &self.v,
                &self.attn,
                &self.proj,
                &self.gate,
                &self.up,
                &self.act,
                &self.x_rows,
                &self.logits,
                &self.tokens,
                &self.partials.ml,
                &self.partials.acc,
            ]
            .iter()
            .map(|b| b.size())
            .sum::<u64>()
    }
}

/// The attention geometry of layer `layer` (its sliding window, if any), or of any layer's
/// scratch (`None`: no window).
pub fn attention_shape(c: &ModelConfig, kv: KvGeometry, layer: Option<usize>) -> attention::AttentionShape {
    attention::AttentionShape {
        n_heads: c.n_heads as u32,
        n_kv_heads: c.n_kv_heads as u32,
        head_dim: c.head_dim as u32,
        kv,
        window: layer.and_then(|l| c.attention_windows[l]).unwrap_or(0),
    }
}

/// A layer's split-KV attention: the indices of its (split, reduce) dispatch pair, its shape
/// (the window decides how many keys there are to split) and their params.
struct SplitAttention {
    split: usize,
    reduce: usize,
    shape: attention::AttentionShape,
    params: attention::Params,
}

/// The recorded dispatches of one step shape.
pub struct StepPlan {
    pub key: PlanKey,
    dispatches: Vec<Dispatch>,
    /// With a split kernel, each layer's split count follows the step's longest sequence
    /// (`prepare`).
    split_kernel: Option<attention::SplitKernel>,
    splits: Vec<SplitAttention>,
}

/// y = x·Wᵀ (+ b) for `m` rows: gemv for a single row (decode), tiled matmul otherwise.
fn linear(
    gpu: &Gpu,
    x: &wgpu::Buffer,
    w: &Weight,
    b: Option<&wgpu::Buffer>,
    y: &wgpu::Buffer,
    m: u32,
) -> Result<Vec<Dispatch>> {
    if m == 1 {
        gemv::gemv(gpu, x, w, b, y, 1)
    } else {
        matmul::matmul(gpu, x, w, b, y, m)
    }
}

/// proj = (silu(xn·Wgateᵀ) ⊙ xn·Wupᵀ) · Wdownᵀ for `n` tokens, into `d`; `adapt(d, m, x, y)`
/// adds module m's LoRA adapters (4 gate, 5 up, 6 down, as `lora::MODULES`) after each product.
fn dense_mlp(
    gpu: &Gpu,
    act: &Activations,
    mlp: &DenseMlp,
    n: u32,
    d: &mut Vec<Dispatch>,
    adapt: impl Fn(&mut Vec<Dispatch>, usize, &wgpu::Buffer, &wgpu::Buffer) -> Result<()>,
) -> Result<()> {
    d.extend(linear(gpu, &act.xn, &mlp.gate_proj, None, &act.gate, n)?);
    adapt(d, 4, &act.xn, &act.gate)?;
    d.extend(linear(gpu, &act.xn, &mlp.up_proj, None, &act.up, n)?);
    adapt(d, 5, &act.xn, &act.up)?;
    d.push(elementwise::swiglu(gpu, &act.gate, &act.up, &act.act, n * mlp.gate_proj.rows)?);
    d.extend(linear(gpu, &act.act, &mlp.down_proj, None, &act.proj, n)?);
    adapt(d, 6, &act.act, &act.proj)
}

/// Build the plan of a step shape (`key.tokens` ≤ `act.max_tokens`, `key.rows` ≤ `act.max_rows`),
/// recording attention probabilities where `probes` asks for them.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    gpu: &Gpu,
    c: &ModelConfig,
    w: &Weights,
    cache: &KvCache,
    act: &Activations,
    rope_table: &wgpu::Buffer,
    key: PlanKey,
    probes: Option<&Probes>,
) -> Result<StepPlan> {
    let n = key.tokens;
    if n == 0 || n > act.max_tokens || key.rows > n.min(act.max_rows) {
        return Err(KilnError::shape(
            "forward",
            format!(
                "a step of {n} tokens and {} logit rows, room for {} and {}",
                key.rows, act.max_tokens, act.max_rows
            ),
        ));
    }
    let hidden = c.hidden_size as u32;
    let tokens = act.inputs.tokens();
    let mut d: Vec<Dispatch> = Vec::new();
    let mut splits = Vec::new();
    let rope_q = rope::RopeShape {
        n_tokens: n,
        n_heads: c.n_heads as u32,
        head_dim: c.head_dim as u32,
        layout: if c.rope_interleaved { rope::RopeLayout::Interleaved } else { rope::RopeLayout::HalfSplit },
    };
    let rope_k = rope::RopeShape { n_heads: c.n_kv_heads as u32, ..rope_q };
    // softmax(q·Kᵀ/√d)·V over each token's sequence. On CPU adapters every step takes the
    // barrier-free split kernel (one invocation per (query, head group, key range)) and a merge;
    // elsewhere a single query splits its keys across workgroups and merges (flash-decoding),
    // and several queries take the fused kernel, a workgroup per (query, KV head).
    let split_kernel = match attention::SplitKernel::for_device(gpu) {
        attention::SplitKernel::Lanes => Some(attention::SplitKernel::Lanes),
        attention::SplitKernel::Workgroup => (n == 1).then_some(attention::SplitKernel::Workgroup),
    };

    d.extend(embedding::embedding(gpu, &act.inputs.ids, &w.embed_tokens, &act.x, n)?);
    for (l, layer) in w.layers.iter().enumerate() {
        let (k_cache, v_cache) = (&cache.k[l], &cache.v[l]);
        let shape = attention_shape(c, cache.geometry, Some(l));
        // Attention block.
        d.push(rms_norm::rms_norm(gpu, &act.x, &layer.input_layernorm, &act.xn, n, hidden, c.rms_norm_eps)?);
        // y = x·Wᵀ (+ b), plus the LoRA adapters of each token that has any for module `m`.
        let adapted = |d: &mut Vec<Dispatch>, m: usize, x: &wgpu::Buffer, y: &wgpu::Buffer| -> Result<()> {
            if let Some(module) = w.lora.modules.get(&(l, m)) {
                d.push(lora::apply(gpu, module, &act.inputs.adapters, x, y, n)?);
            }
            Ok(())
        };
        d.extend(linear(gpu, &act.xn, &layer.q_proj, layer.q_bias.as_ref(), &act.q, n)?);
        adapted(&mut d, 0, &act.xn, &act.q)?;
        d.extend(linear(gpu, &act.xn, &layer.k_proj, layer.k_bias.as_ref(), &act.k, n)?);
        adapted(&mut d, 1, &act.xn, &act.k)?;
        d.extend(linear(gpu, &act.xn, &layer.v_proj, layer.v_bias.as_ref(), &act.v, n)?);
        adapted(&mut d, 2, &act.xn, &act.v)?;
        let (q, k) = match (&act.qk_normed, &layer.q_norm, &layer.k_norm) {
            (Some((qn, kn)), Some(q_norm), Some(k_norm)) => {
                let (heads, kv_heads, dim) = (n * c.n_heads as u32, n * c.n_kv_heads as u32, c.head_dim as u32);
                d.push(rms_norm::rms_norm(gpu, &act.q, q_norm, qn, heads, dim, c.rms_norm_eps)?);
                d.push(rms_norm::rms_norm(gpu, &act.k, k_norm, kn, kv_heads, dim, c.rms_norm_eps)?);
                (qn, kn)
            }
            _ => (&act.q, &act.k),
        };
        d.push(rope::rope_q(gpu, rope_table, q, rope_q, tokens)?);
        d.push(rope::rope_kv(gpu, rope_table, k, &act.v, k_cache, v_cache, rope_k, cache.geometry, tokens)?);
        match split_kernel {
            Some(kernel) => {
                let (out, partials) = (&act.attn, &act.partials);
                // One split to start with; `prepare` re-splits for each step's longest sequence.
                let [split, reduce] = attention::decode_with(
                    gpu,
                    kernel,
                    &shape,
                    q,
                    k_cache,
                    v_cache,
                    out,
                    partials,
                    n,
                    (1, 64),
                    tokens,
                )?;
                let params = *bytemuck::from_bytes(&split.host_params);
                splits.push(SplitAttention { split: d.len(), reduce: d.len() + 1, shape, params });
                d.push(split);
                d.push(reduce);
            }
            None => d.push(attention::prefill(gpu, &shape, q, k_cache, v_cache, &act.attn, n, tokens)?),
        }
        if let Some(p) = probes {
            for pl in p.layers.iter().filter(|pl| pl.layer == l) {
                d.push(attention::probabilities(gpu, &shape, q, k_cache, &pl.probs, n, p.n_keys, tokens)?);
                d.push(elementwise::copy(gpu, q, &pl.q, n as u64 * c.q_dim() as u64 * 4)?);
            }
        }
        d.extend(linear(gpu, &act.attn, &layer.o_proj, layer.o_bias.as_ref(), &act.proj, n)?);
        adapted(&mut d, 3, &act.attn, &act.proj)?;
        d.push(elementwise::add_assign(gpu, &act.x, &act.proj, n * hidden)?);
        // MLP block.
        d.push(rms_norm::rms_norm(gpu, &act.x, &layer.post_attention_layernorm, &act.xn, n, hidden, c.rms_norm_eps)?);
        match &layer.mlp {
            Mlp::Dense(mlp) => {
                dense_mlp(gpu, act, mlp, n, &mut d, adapted)?;
                d.push(elementwise::add_assign(gpu, &act.x, &act.proj, n * hidden)?);
            }
            Mlp::Experts(experts) => {
                let (Some(s), Some(m)) = (&act.moe, &c.moe) else {
                    return Err(KilnError::shape("forward", "experts without a mixture-of-experts config"));
                };
                let r = moe::Routing { n_tokens: n, n_experts: m.n_experts as u32, top_k: m.top_k as u32 };
                d.extend(linear(gpu, &act.xn, &experts.router, None, &s.router_logits, n)?);
                d.push(moe::route(gpu, r, &s.router_logits, &s.ids, &s.weights, m.norm_topk_prob)?);
                for pr in probes.iter().flat_map(|p| &p.routes).filter(|pr| pr.layer == l) {
                    // Buffers are padded to 16 bytes, the copy's granule.
                    let bytes = (r.assignments() as u64 * 4).next_multiple_of(16);
                    d.push(elementwise::copy(gpu, &s.ids, &pr.ids, bytes)?);
                    d.push(elementwise::copy(gpu, &s.weights, &pr.weights, bytes)?);
                }
                d.push(moe::group(gpu, r, &s.ids, &s.groups)?);
                d.extend(moe::expert_matmul(gpu, r, &experts.gate_proj, &act.xn, true, &s.groups, &s.gate)?);
                d.extend(moe::expert_matmul(gpu, r, &experts.up_proj, &act.xn, true, &s.groups, &s.up)?);
                let fe = m.expert_intermediate_size as u32;
                d.push(elementwise::swiglu(gpu, &s.gate, &s.up, &s.act, r.assignments() * fe)?);
                d.extend(moe::expert_matmul(gpu, r, &experts.down_proj, &s.act, false, &s.groups, &s.out)?);
                let shared = match &experts.shared {
                    Some(shared) => {
                        // Adapters never touch experts (lora::Adapter::read refuses them).
                        dense_mlp(gpu, act, &shared.mlp, n, &mut d, |_, _, _, _| Ok(()))?;
                        d.extend(linear(gpu, &act.xn, &shared.gate, None, &s.shared_gate, n)?);
                        Some((&act.proj, &s.shared_gate))
                    }
                    None => None,
                };
                d.push(moe::combine(gpu, r, hidden, &s.weights, &s.out, shared, &act.x)?);
            }
        }
    }
    let rows = key.rows;
    if rows > 0 {
        // Only the wanted rows are normalised and go through the lm-head; a one-token step's
        // row is row 0 already.
        let x_rows = if n == 1 {
            &act.x
        } else {
            d.push(embedding::gather_rows(gpu, &act.x, &act.inputs.rows, &act.x_rows, rows, n, hidden)?);
            &act.x_rows
        };
        d.push(rms_norm::rms_norm(gpu, x_rows, &w.norm, &act.xn, rows, hidden, c.rms_norm_eps)?);
        if rows == 1 {
            let kernel = gemv::GemvKernel::for_device(gpu);
            d.extend(gemv::gemv_with(gpu, kernel, &act.xn, w.lm_head(), None, &act.logits, 1, 0)?);
        } else {
            d.extend(matmul::matmul(gpu, &act.xn, w.lm_head(), None, &act.logits, rows)?);
        }
        if key.argmax {
            d.push(argmax::argmax(gpu, &act.logits, &act.tokens, rows, c.vocab_size as u32)?);
        }
    }
    Ok(StepPlan { key, dispatches: d, split_kernel, splits })
}

impl StepPlan {
    /// Point the plan at a step whose longest sequence holds `max_kv_len` keys: split each
    /// attention's keys (all of them, or its window's worth) to keep the device busy.
    pub fn prepare(&mut self, gpu: &Gpu, max_kv_len: u32) {
        let Some(kernel) = self.split_kernel else { return };
        let n = self.key.tokens;
        for s in &mut self.splits {
            let (n_splits, split_len) = s.shape.splits(n, s.shape.visible(max_kv_len), ATTENTION_TARGET_GROUPS);
            let grid = kernel.grid(&s.shape, n, n_splits);
            s.params.n_splits = n_splits;
            s.params.split_len = split_len;
            self.dispatches[s.split].set_params(gpu, &s.params);
            self.dispatches[s.split].workgroups = grid;
            self.dispatches[s.reduce].set_params(gpu, &s.params);
        }
    }

    /// Run the (prepared) step: every dispatch in one compute pass, one submission.
    pub fn run(&self, gpu: &Gpu, label: &str) -> Result<()> {
        let dispatches: Vec<&Dispatch> = self.dispatches.iter().collect();
        gpu.run(label, &dispatches)
    }

    /// Run the (prepared) step once with a timestamp around each dispatch: (label, seconds).
    pub fn profile(&self, gpu: &Gpu) -> Result<Vec<(String, f64)>> {
        let dispatches: Vec<&Dispatch> = self.dispatches.iter().collect();
        let times = gpu.profile("forward profile", &dispatches)?;
        Ok(self.dispatches.iter().map(|d| d.label.clone()).zip(times).collect())
    }

    pub fn dispatch_count(&self) -> usize {
        self.dispatches.len()
    }
}
