//! The forward pass of a Llama/Qwen2 decoder, recorded once per step shape as a list of
//! dispatches over preallocated buffers (llama2.c's `forward`, calm's GPU path):
//!
//!   x = embed_tokens[ids]
//!   for each layer:
//!     h = rms_norm(x) · input_layernorm
//!     q, k, v = h·Wqᵀ (+bq), h·Wkᵀ (+bk), h·Wvᵀ (+bv)
//!     q, k = rope(q), rope(k); cache[pos0 ..] = k, v
//!     x += attention(q, cache) · Woᵀ (+bo)
//!     h = rms_norm(x) · post_attention_layernorm
//!     x += (silu(h·Wgateᵀ) ⊙ h·Wupᵀ) · Wdownᵀ
//!   logits = rms_norm(x) · norm · lm_headᵀ
//!
//! A plan is built once per (tokens per step, logits wanted) and replayed: only the position
//! (rope, attention) and the number of KV splits change between steps, written into the
//! existing params buffers. Weights and the KV cache never leave the GPU; one submission per
//! step; the host reads back only logits, or a single token id for greedy decoding.

use super::config::ModelConfig;
use super::weights::Weights;
use crate::gpu::{Dispatch, Gpu, Weight};
use crate::ops::{argmax, attention, elementwise, embedding, gemv, matmul, rms_norm, rope};
use crate::{KilnError, Result};

/// The KV cache of one sequence: per layer, K and V as (n_kv_heads, ctx, head_dim), f16 where
/// the device has SHADER_F16, else f32. Positions past `len` are free; rolling back is
/// lowering `len`.
pub struct KvCache {
    pub k: Vec<wgpu::Buffer>,
    pub v: Vec<wgpu::Buffer>,
    pub ctx: u32,
    pub element_bytes: u32,
}

impl KvCache {
    pub fn new(gpu: &Gpu, c: &ModelConfig, ctx: u32) -> Result<KvCache> {
        let element_bytes = gpu.kv_element_bytes();
        let layer_bytes = c.kv_dim() as u64 * ctx as u64 * element_bytes as u64;
        if layer_bytes > gpu.max_binding {
            let max_ctx = gpu.max_binding / (c.kv_dim() as u64 * element_bytes as u64);
            return Err(KilnError::Request(format!(
                "a context of {ctx} needs {layer_bytes} bytes of K per layer, over this device's {} byte binding limit; use a context of at most {max_ctx}",
                gpu.max_binding
            )));
        }
        let mut k = Vec::new();
        let mut v = Vec::new();
        for l in 0..c.n_layers {
            k.push(gpu.buffer(&format!("k cache {l}"), layer_bytes)?);
            v.push(gpu.buffer(&format!("v cache {l}"), layer_bytes)?);
        }
        Ok(KvCache { k, v, ctx, element_bytes })
    }

    pub fn bytes(&self) -> u64 {
        self.k.iter().chain(&self.v).map(|b| b.size()).sum()
    }
}

/// Which logits a step produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Logits {
    /// None (a prompt chunk that is not the last).
    None,
    /// The last token's row.
    Last,
    /// The last token's row and its argmax on the GPU (greedy decoding reads back 4 bytes).
    LastArgmax,
    /// Every token's row (perplexity, tests).
    All,
}

/// Preallocated activations for up to `max_tokens` tokens per step.
pub struct Activations {
    pub max_tokens: u32,
    /// Rows of `logits`: `max_tokens`, or fewer where (tokens × vocab) exceeds one binding.
    pub logit_rows: u32,
    pub ids: wgpu::Buffer,    // (max_tokens) u32
    x: wgpu::Buffer,          // (T, hidden) the residual stream
    xn: wgpu::Buffer,         // (T, hidden) normalised
    q: wgpu::Buffer,          // (T, n_heads·head_dim)
    k: wgpu::Buffer,          // (T, n_kv_heads·head_dim)
    v: wgpu::Buffer,          // (T, n_kv_heads·head_dim)
    attn: wgpu::Buffer,       // (T, n_heads·head_dim)
    proj: wgpu::Buffer,       // (T, hidden) o_proj / down_proj output
    gate: wgpu::Buffer,       // (T, intermediate)
    up: wgpu::Buffer,         // (T, intermediate)
    act: wgpu::Buffer,        // (T, intermediate)
    pub logits: wgpu::Buffer, // (logit_rows, vocab)
    pub token: wgpu::Buffer,  // (1) u32: greedy pick
    partials: attention::Partials,
    /// (max_tokens, heads, 1 split): prefill attention on CPU adapters.
    prefill_partials: Option<attention::Partials>,
    max_splits: u32,
}

impl Activations {
    /// Bytes of GPU memory held.
    pub fn bytes(&self) -> u64 {
        let mut all = vec![
            &self.ids,
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
            &self.logits,
            &self.token,
        ];
        for p in std::iter::once(&self.partials).chain(&self.prefill_partials) {
            all.extend([&p.ml, &p.acc]);
        }
        all.iter().map(|b| b.size()).sum()
    }
}

/// Workgroups a decode step's attention aims to fill (KV split across them).
const ATTENTION_TARGET_GROUPS: u32 = 64;

impl Activations {
    pub fn new(gpu: &Gpu, c: &ModelConfig, max_tokens: u32, ctx: u32) -> Result<Activations> {
        let t = max_tokens as u64;
        let f32s = |n: usize| t * n as u64 * 4;
        let vocab_row = c.vocab_size as u64 * 4;
        let logit_rows = (gpu.max_binding / vocab_row).clamp(1, t) as u32;
        let shape = attention_shape(c, ctx);
        // `splits` never makes more than ceil(target / kv_heads) splits.
        let max_splits = ATTENTION_TARGET_GROUPS.div_ceil(c.n_kv_heads as u32);
        Ok(Activations {
            max_tokens,
            logit_rows,
            ids: gpu.buffer("ids", t * 4)?,
            x: gpu.buffer("x", f32s(c.hidden_size))?,
            xn: gpu.buffer("xn", f32s(c.hidden_size))?,
            q: gpu.buffer("q", f32s(c.q_dim()))?,
            k: gpu.buffer("k", f32s(c.kv_dim()))?,
            v: gpu.buffer("v", f32s(c.kv_dim()))?,
            attn: gpu.buffer("attn", f32s(c.q_dim()))?,
            proj: gpu.buffer("proj", f32s(c.hidden_size))?,
            gate: gpu.buffer("gate", f32s(c.intermediate_size))?,
            up: gpu.buffer("up", f32s(c.intermediate_size))?,
            act: gpu.buffer("act", f32s(c.intermediate_size))?,
            logits: gpu.buffer("logits", logit_rows as u64 * vocab_row)?,
            token: gpu.buffer("token", 4)?,
            partials: attention::Partials::new(gpu, &shape, 1, max_splits)?,
            prefill_partials: match attention::SplitKernel::for_device(gpu) {
                attention::SplitKernel::Lanes => Some(attention::Partials::new(gpu, &shape, max_tokens, 1)?),
                attention::SplitKernel::Workgroup => None,
            },
            max_splits,
        })
    }
}

pub fn attention_shape(c: &ModelConfig, ctx: u32) -> attention::AttentionShape {
    attention::AttentionShape {
        n_heads: c.n_heads as u32,
        n_kv_heads: c.n_kv_heads as u32,
        head_dim: c.head_dim as u32,
        ctx,
    }
}

/// A dispatch whose params depend on the step's position.
enum Positional {
    Rope(rope::Params),
    Attention(attention::Params),
    /// Split-KV decode: (split dispatch, reduce dispatch) share params.
    AttentionSplit(attention::Params, usize, attention::SplitKernel),
}

/// The recorded dispatches of one step shape.
pub struct StepPlan {
    pub n_tokens: u32,
    pub logits: Logits,
    dispatches: Vec<Dispatch>,
    positional: Vec<(usize, Positional)>,
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

/// Build the plan of a step of `n` tokens (≤ `act.max_tokens`).
pub fn plan(
    gpu: &Gpu,
    c: &ModelConfig,
    w: &Weights,
    cache: &KvCache,
    act: &Activations,
    rope_table: &wgpu::Buffer,
    n: u32,
    logits: Logits,
) -> Result<StepPlan> {
    assert!(n >= 1 && n <= act.max_tokens, "plan of {n} tokens with room for {}", act.max_tokens);
    let (hidden, f) = (c.hidden_size as u32, c.intermediate_size as u32);
    let shape = attention_shape(c, cache.ctx);
    let mut d: Vec<Dispatch> = Vec::new();
    let mut positional = Vec::new();
    let rope_q = rope::RopeShape {
        n_tokens: n,
        n_heads: c.n_heads as u32,
        head_dim: c.head_dim as u32,
        pos0: 0,
        layout: if c.rope_interleaved { rope::RopeLayout::Interleaved } else { rope::RopeLayout::HalfSplit },
    };
    let rope_k = rope::RopeShape { n_heads: c.n_kv_heads as u32, ..rope_q };

    d.extend(embedding::embedding(gpu, &act.ids, &w.embed_tokens, &act.x, n)?);
    for (l, layer) in w.layers.iter().enumerate() {
        // Attention block.
        d.push(rms_norm::rms_norm(gpu, &act.x, &layer.input_layernorm, &act.xn, n, hidden, c.rms_norm_eps)?);
        d.extend(linear(gpu, &act.xn, &layer.q_proj, layer.q_bias.as_ref(), &act.q, n)?);
        d.extend(linear(gpu, &act.xn, &layer.k_proj, layer.k_bias.as_ref(), &act.k, n)?);
        d.extend(linear(gpu, &act.xn, &layer.v_proj, layer.v_bias.as_ref(), &act.v, n)?);
        let rq = rope::rope_q(gpu, rope_table, &act.q, rope_q)?;
        positional.push((d.len(), Positional::Rope(rope_params(&rq))));
        d.push(rq);
        let rk = rope::rope_kv(gpu, rope_table, &act.k, &act.v, &cache.k[l], &cache.v[l], rope_k, cache.ctx)?;
        positional.push((d.len(), Positional::Rope(rope_params(&rk))));
        d.push(rk);
        // softmax(q·Kᵀ/√d)·V over the cache. Decode (n == 1) splits the keys across workgroups and
        // merges; on CPU adapters prefill takes the same two steps with one invocation per
        // (query, head) over its whole causal range; elsewhere the fused prefill kernel.
        let split_path = if n == 1 {
            Some((
                attention::SplitKernel::for_device(gpu),
                &act.partials,
                (1, shape.splits(1, ATTENTION_TARGET_GROUPS).1),
            ))
        } else {
            act.prefill_partials.as_ref().map(|p| (attention::SplitKernel::Lanes, p, (1, cache.ctx.div_ceil(64) * 64)))
        };
        match split_path {
            Some((kernel, partials, splits)) => {
                let (k, v) = (&cache.k[l], &cache.v[l]);
                let [split, reduce] =
                    attention::decode_with(gpu, kernel, &shape, &act.q, k, v, &act.attn, partials, n, 0, splits)?;
                let params = attention_params(&split);
                // Decode re-splits as the cache grows; prefill keeps one range per query.
                let p = if n == 1 {
                    Positional::AttentionSplit(params, d.len() + 1, kernel)
                } else {
                    Positional::Attention(params)
                };
                positional.push((d.len(), p));
                d.push(split);
                d.push(reduce);
            }
            None => {
                let a = attention::prefill(gpu, &shape, &act.q, &cache.k[l], &cache.v[l], &act.attn, n, 0)?;
                positional.push((d.len(), Positional::Attention(attention_params(&a))));
                d.push(a);
            }
        }
        d.extend(linear(gpu, &act.attn, &layer.o_proj, layer.o_bias.as_ref(), &act.proj, n)?);
        d.push(elementwise::add_assign(gpu, &act.x, &act.proj, n * hidden)?);
        // MLP block.
        d.push(rms_norm::rms_norm(gpu, &act.x, &layer.post_attention_layernorm, &act.xn, n, hidden, c.rms_norm_eps)?);
        d.extend(linear(gpu, &act.xn, &layer.gate_proj, None, &act.gate, n)?);
        d.extend(linear(gpu, &act.xn, &layer.up_proj, None, &act.up, n)?);
        d.push(elementwise::swiglu(gpu, &act.gate, &act.up, &act.act, n * f)?);
        d.extend(linear(gpu, &act.act, &layer.down_proj, None, &act.proj, n)?);
        d.push(elementwise::add_assign(gpu, &act.x, &act.proj, n * hidden)?);
    }
    let vocab = c.vocab_size as u32;
    if logits == Logits::All && n > act.logit_rows {
        return Err(KilnError::shape("forward", format!("{n} rows of logits, room for {}", act.logit_rows)));
    }
    if logits != Logits::None {
        d.push(rms_norm::rms_norm(gpu, &act.x, &w.norm, &act.xn, n, hidden, c.rms_norm_eps)?);
    }
    match logits {
        Logits::None => {}
        Logits::Last | Logits::LastArgmax => {
            // Only the last token's row goes through the lm-head.
            let kernel = gemv::GemvKernel::for_device(gpu);
            d.extend(gemv::gemv_with(gpu, kernel, &act.xn, w.lm_head(), None, &act.logits, 1, n - 1)?);
            if logits == Logits::LastArgmax {
                d.push(argmax::argmax(gpu, &act.logits, &act.token, 1, vocab)?);
            }
        }
        Logits::All => d.extend(linear(gpu, &act.xn, w.lm_head(), None, &act.logits, n)?),
    }
    Ok(StepPlan { n_tokens: n, logits, dispatches: d, positional })
}

// The plan patches the position into the params each op built, read from the dispatch's
// host copy (so the ops' own params logic is not repeated here).
fn rope_params(d: &Dispatch) -> rope::Params {
    *bytemuck::from_bytes(&d.host_params)
}

fn attention_params(d: &Dispatch) -> attention::Params {
    *bytemuck::from_bytes(&d.host_params)
}

impl StepPlan {
    /// Point the plan at position `pos0`: patch the positional params and grids.
    pub fn prepare(&mut self, gpu: &Gpu, act: &Activations, pos0: u32) {
        let kv_len = pos0 + self.n_tokens;
        for (i, p) in self.positional.iter_mut() {
            match p {
                Positional::Rope(params) => {
                    params.pos0 = pos0;
                    self.dispatches[*i].set_params(gpu, params);
                }
                Positional::Attention(params) => {
                    params.pos0 = pos0;
                    self.dispatches[*i].set_params(gpu, params);
                }
                Positional::AttentionSplit(params, reduce, kernel) => {
                    let shape = attention::AttentionShape {
                        n_heads: params.n_heads,
                        n_kv_heads: params.n_kv_heads,
                        head_dim: params.head_dim,
                        ctx: params.ctx,
                    };
                    let (n_splits, split_len) = shape.splits(kv_len, ATTENTION_TARGET_GROUPS);
                    debug_assert!(n_splits <= act.max_splits);
                    params.pos0 = pos0;
                    params.n_splits = n_splits;
                    params.split_len = split_len;
                    self.dispatches[*i].set_params(gpu, params);
                    self.dispatches[*i].workgroups = kernel.grid(&shape, self.n_tokens, n_splits);
                    self.dispatches[*reduce].set_params(gpu, params);
                }
            }
        }
    }

    /// Record the (prepared) step into `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        for d in &self.dispatches {
            d.record(pass);
        }
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
