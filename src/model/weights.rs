//! The model's parameters on the GPU, under their Hugging Face names, and the list of tensors
//! a config implies (so a checkpoint is checked whole before anything is uploaded).

use super::checkpoint::{self, TensorSource};
use super::config::ModelConfig;
use crate::gpu::{DType, Gpu, Weight};
use crate::{KilnError, Result};
use std::collections::HashMap;

/// `model.layers.{i}`: one decoder block.
pub struct LayerWeights {
    pub input_layernorm: wgpu::Buffer,          // (hidden) f32
    pub q_proj: Weight,                         // (n_heads·head_dim, hidden)
    pub k_proj: Weight,                         // (n_kv_heads·head_dim, hidden)
    pub v_proj: Weight,                         // (n_kv_heads·head_dim, hidden)
    pub o_proj: Weight,                         // (hidden, n_heads·head_dim)
    pub q_bias: Option<wgpu::Buffer>,           // (n_heads·head_dim) f32, Qwen2
    pub k_bias: Option<wgpu::Buffer>,           // (n_kv_heads·head_dim)
    pub v_bias: Option<wgpu::Buffer>,           // (n_kv_heads·head_dim)
    pub o_bias: Option<wgpu::Buffer>,           // (hidden), Llama attention_bias
    pub q_norm: Option<wgpu::Buffer>,           // (head_dim) f32, Qwen3: every query head's RMSNorm
    pub k_norm: Option<wgpu::Buffer>,           // (head_dim) f32, Qwen3: every key head's RMSNorm
    pub post_attention_layernorm: wgpu::Buffer, // (hidden) f32
    pub gate_proj: Weight,                      // (intermediate, hidden)
    pub up_proj: Weight,                        // (intermediate, hidden)
    pub down_proj: Weight,                      // (hidden, intermediate)
}

pub struct Weights {
    pub embed_tokens: Weight, // (vocab, hidden)
    pub layers: Vec<LayerWeights>,
    pub norm: wgpu::Buffer, // (hidden) f32
    /// (vocab, hidden); None when tied to `embed_tokens`.
    pub lm_head: Option<Weight>,
}

impl Weights {
    /// The lm-head matrix: its own, or the embedding when tied.
    pub fn lm_head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Bytes of GPU memory the parameters hold: every matrix chunk and vector buffer, padding
    /// included.
    pub fn resident_bytes(&self) -> u64 {
        let mut matrices: Vec<&Weight> = vec![&self.embed_tokens];
        matrices.extend(self.lm_head.iter());
        let mut vectors: Vec<&wgpu::Buffer> = vec![&self.norm];
        for l in &self.layers {
            matrices.extend([&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj]);
            vectors.extend([&l.input_layernorm, &l.post_attention_layernorm]);
            vectors.extend([&l.q_bias, &l.k_bias, &l.v_bias, &l.o_bias, &l.q_norm, &l.k_norm].into_iter().flatten());
        }
        let chunks: u64 = matrices.iter().flat_map(|w| &w.chunks).map(|c| c.buffer.size()).sum();
        chunks + vectors.iter().map(|b| b.size()).sum::<u64>()
    }

    /// Bytes of weight data resident on the GPU, by dtype.
    pub fn bytes_by_dtype(&self) -> Vec<(DType, u64)> {
        let mut all: Vec<&Weight> = vec![&self.embed_tokens];
        all.extend(self.lm_head.iter());
        for l in &self.layers {
            all.extend([&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj]);
        }
        let mut by: Vec<(DType, u64)> = Vec::new();
        for w in all {
            match by.iter_mut().find(|(d, _)| *d == w.dtype) {
                Some(e) => e.1 += w.bytes(),
                None => by.push((w.dtype, w.bytes())),
            }
        }
        by
    }
}

/// Every tensor name the config implies, with its shape.
pub fn expected_tensors(c: &ModelConfig) -> HashMap<String, Vec<usize>> {
    let (h, f, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
    let mut t: HashMap<String, Vec<usize>> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), vec![c.vocab_size, h]);
    t.insert("model.norm.weight".into(), vec![h]);
    if !c.tie_word_embeddings {
        t.insert("lm_head.weight".into(), vec![c.vocab_size, h]);
    }
    if c.rope_freq_factors.is_some() {
        // Read into the config; listed so the check does not call it an unknown tensor.
        t.insert(super::gguf_source::ROPE_FREQS.into(), vec![c.head_dim / 2]);
    }
    for i in 0..c.n_layers {
        let p = format!("model.layers.{i}");
        t.insert(format!("{p}.input_layernorm.weight"), vec![h]);
        t.insert(format!("{p}.post_attention_layernorm.weight"), vec![h]);
        t.insert(format!("{p}.self_attn.q_proj.weight"), vec![q, h]);
        t.insert(format!("{p}.self_attn.k_proj.weight"), vec![kv, h]);
        t.insert(format!("{p}.self_attn.v_proj.weight"), vec![kv, h]);
        t.insert(format!("{p}.self_attn.o_proj.weight"), vec![h, q]);
        if c.qkv_bias {
            t.insert(format!("{p}.self_attn.q_proj.bias"), vec![q]);
            t.insert(format!("{p}.self_attn.k_proj.bias"), vec![kv]);
            t.insert(format!("{p}.self_attn.v_proj.bias"), vec![kv]);
        }
        if c.o_bias {
            t.insert(format!("{p}.self_attn.o_proj.bias"), vec![h]);
        }
        if c.qk_norm {
            t.insert(format!("{p}.self_attn.q_norm.weight"), vec![c.head_dim]);
            t.insert(format!("{p}.self_attn.k_norm.weight"), vec![c.head_dim]);
        }
        t.insert(format!("{p}.mlp.gate_proj.weight"), vec![f, h]);
        t.insert(format!("{p}.mlp.up_proj.weight"), vec![f, h]);
        t.insert(format!("{p}.mlp.down_proj.weight"), vec![h, f]);
    }
    t
}

/// Where a model's parameters come from, by Hugging Face name: a checkpoint (`Uploader`) or
/// random values made on the device (`synthetic`).
pub trait Parameters {
    /// A matrix of the shape `expected_tensors` gives, in its stored encoding.
    fn matrix(&mut self, name: &str) -> Result<Weight>;
    /// A vector (norm weight, bias) as f32.
    fn vector(&mut self, name: &str) -> Result<wgpu::Buffer>;
}

/// Uploads tensors one at a time, releasing each one's pages after, and reports progress.
pub struct Uploader<'a> {
    pub gpu: &'a Gpu,
    pub src: &'a dyn TensorSource,
    pub on_bytes: &'a mut dyn FnMut(u64),
}

impl Parameters for Uploader<'_> {
    /// A matrix, kept in its stored encoding (f32, f16, bf16 or a GGUF block format).
    fn matrix(&mut self, name: &str) -> Result<Weight> {
        let (dtype, shape, bytes) = self.src.tensor(name)?;
        let w = Weight::upload(self.gpu, name, shape[0] as u32, shape[1] as u32, dtype, bytes)?;
        (self.on_bytes)(bytes.len() as u64);
        self.src.release(name);
        Ok(w)
    }

    /// A vector (norm weight, bias), converted to f32.
    fn vector(&mut self, name: &str) -> Result<wgpu::Buffer> {
        let (dtype, _, bytes) = self.src.tensor(name)?;
        let values = checkpoint::to_f32(dtype, bytes).ok_or_else(|| {
            KilnError::model(
                self.src.path_of(name),
                format!("vector `{name}` is stored as {dtype:?}; kiln reads F32, F16, BF16 vectors"),
            )
        })?;
        let buf = self.gpu.upload(name, bytemuck::cast_slice(&values))?;
        (self.on_bytes)(bytes.len() as u64);
        self.src.release(name);
        Ok(buf)
    }
}

/// Every parameter of the model `c` describes, from `p`, in checkpoint order.
pub fn build(src: &mut dyn Parameters, c: &ModelConfig) -> Result<Weights> {
    let mut layers = Vec::with_capacity(c.n_layers);
    let embed_tokens = src.matrix("model.embed_tokens.weight")?;
    for i in 0..c.n_layers {
        let l = format!("model.layers.{i}");
        let opt = |p: &mut dyn Parameters, on: bool, name: String| {
            if on {
                p.vector(&name).map(Some)
            } else {
                Ok(None)
            }
        };
        layers.push(LayerWeights {
            input_layernorm: src.vector(&format!("{l}.input_layernorm.weight"))?,
            q_proj: src.matrix(&format!("{l}.self_attn.q_proj.weight"))?,
            k_proj: src.matrix(&format!("{l}.self_attn.k_proj.weight"))?,
            v_proj: src.matrix(&format!("{l}.self_attn.v_proj.weight"))?,
            o_proj: src.matrix(&format!("{l}.self_attn.o_proj.weight"))?,
            q_bias: opt(src, c.qkv_bias, format!("{l}.self_attn.q_proj.bias"))?,
            k_bias: opt(src, c.qkv_bias, format!("{l}.self_attn.k_proj.bias"))?,
            v_bias: opt(src, c.qkv_bias, format!("{l}.self_attn.v_proj.bias"))?,
            o_bias: opt(src, c.o_bias, format!("{l}.self_attn.o_proj.bias"))?,
            q_norm: opt(src, c.qk_norm, format!("{l}.self_attn.q_norm.weight"))?,
            k_norm: opt(src, c.qk_norm, format!("{l}.self_attn.k_norm.weight"))?,
            post_attention_layernorm: src.vector(&format!("{l}.post_attention_layernorm.weight"))?,
            gate_proj: src.matrix(&format!("{l}.mlp.gate_proj.weight"))?,
            up_proj: src.matrix(&format!("{l}.mlp.up_proj.weight"))?,
            down_proj: src.matrix(&format!("{l}.mlp.down_proj.weight"))?,
        });
    }
    let norm = src.vector("model.norm.weight")?;
    let lm_head = if c.tie_word_embeddings { None } else { Some(src.matrix("lm_head.weight")?) };
    Ok(Weights { embed_tokens, layers, norm, lm_head })
}
