//! The model's parameters on the GPU, under their Hugging Face names, and the list of tensors
//! a config implies (so a checkpoint is checked whole before anything is uploaded).

use super::checkpoint::{self, TensorSource};
use super::config::{Architecture, ModelConfig};
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
    pub mlp: Mlp,
}

/// A SwiGLU MLP: down(silu(gate(x)) ⊙ up(x)).
pub struct DenseMlp {
    pub gate_proj: Weight, // (intermediate, hidden)
    pub up_proj: Weight,   // (intermediate, hidden)
    pub down_proj: Weight, // (hidden, intermediate)
}

impl DenseMlp {
    fn matrices(&self) -> [&Weight; 3] {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
    }
}

/// A layer's feed-forward block.
pub enum Mlp {
    Dense(DenseMlp),
    Experts(Experts),
}

/// A mixture of experts: the router and every expert's SwiGLU matrices, each kind stacked into
/// one matrix (expert e's rows are e·rows .. (e+1)·rows), plus Qwen2-MoE's shared expert.
pub struct Experts {
    pub router: Weight,    // (n_experts, hidden)
    pub gate_proj: Weight, // (n_experts · expert_intermediate, hidden)
    pub up_proj: Weight,   // (n_experts · expert_intermediate, hidden)
    pub down_proj: Weight, // (n_experts · hidden, expert_intermediate)
    pub shared: Option<SharedExpert>,
}

/// An expert every token takes, its output scaled by sigmoid(x·gateᵀ).
pub struct SharedExpert {
    pub mlp: DenseMlp,
    pub gate: Weight, // (1, hidden)
}

impl Mlp {
    /// Every matrix of the block.
    pub fn matrices(&self) -> Vec<&Weight> {
        match self {
            Mlp::Dense(d) => d.matrices().to_vec(),
            Mlp::Experts(x) => {
                let mut all = vec![&x.router, &x.gate_proj, &x.up_proj, &x.down_proj];
                if let Some(s) = &x.shared {
                    all.extend(s.mlp.matrices());
                    all.push(&s.gate);
                }
                all
            }
        }
    }

    /// Bytes of weights one token reads: all of a dense MLP; the router, `top_k` experts and the
    /// shared expert of a mixture.
    pub fn bytes_per_token(&self, top_k: usize) -> u64 {
        match self {
            Mlp::Dense(d) => d.matrices().iter().map(|w| w.bytes()).sum(),
            Mlp::Experts(x) => {
                let n_experts = x.router.rows as u64;
                let experts: u64 = [&x.gate_proj, &x.up_proj, &x.down_proj].iter().map(|w| w.bytes()).sum();
                let shared: u64 = x
                    .shared
                    .iter()
                    .flat_map(|s| s.mlp.matrices().into_iter().chain([&s.gate]))
                    .map(|w| w.bytes())
                    .sum();
                x.router.bytes() + experts / n_experts * top_k as u64 + shared
            }
        }
    }
}

/// How a family's checkpoints name their experts: Mixtral's `block_sparse_moe.experts.E.w1`
/// (gate), `w3` (up), `w2` (down); Qwen's `mlp.experts.E.gate_proj` and so on.
pub struct MoeNames {
    pub module: &'static str,
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
}

impl MoeNames {
    pub const MIXTRAL: MoeNames = MoeNames { module: "block_sparse_moe", gate: "w1", up: "w3", down: "w2" };
    pub const QWEN: MoeNames = MoeNames { module: "mlp", gate: "gate_proj", up: "up_proj", down: "down_proj" };

    pub fn of(c: &ModelConfig) -> &'static MoeNames {
        if c.architecture == Architecture::Mixtral {
            &Self::MIXTRAL
        } else {
            &Self::QWEN
        }
    }

    /// The names of every expert's matrix of one kind (`which`: gate, up or down) in layer `layer`.
    fn experts(&self, layer: usize, which: &str, n: usize) -> Vec<String> {
        (0..n).map(|e| format!("model.layers.{layer}.{}.experts.{e}.{which}.weight", self.module)).collect()
    }
}

pub struct Weights {
    pub embed_tokens: Weight, // (vocab, hidden)
    pub layers: Vec<LayerWeights>,
    pub norm: wgpu::Buffer, // (hidden) f32
    /// (vocab, hidden); None when tied to `embed_tokens`.
    pub lm_head: Option<Weight>,
    /// LoRA adapters applied unmerged (`Model::add_adapters`); none at load.
    pub lora: super::lora::Adapters,
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
            matrices.extend([&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj]);
            matrices.extend(l.mlp.matrices());
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
            all.extend([&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj]);
            all.extend(l.mlp.matrices());
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
        match &c.moe {
            Some(m) if m.sparse_layers[i] => {
                let names = MoeNames::of(c);
                let fe = m.expert_intermediate_size;
                t.insert(format!("{p}.{}.gate.weight", names.module), vec![m.n_experts, h]);
                for (which, shape) in [(names.gate, [fe, h]), (names.up, [fe, h]), (names.down, [h, fe])] {
                    for name in names.experts(i, which, m.n_experts) {
                        t.insert(name, shape.to_vec());
                    }
                }
                if let Some(fs) = m.shared_intermediate_size {
                    t.insert(format!("{p}.mlp.shared_expert.gate_proj.weight"), vec![fs, h]);
                    t.insert(format!("{p}.mlp.shared_expert.up_proj.weight"), vec![fs, h]);
                    t.insert(format!("{p}.mlp.shared_expert.down_proj.weight"), vec![h, fs]);
                    t.insert(format!("{p}.mlp.shared_expert_gate.weight"), vec![1, h]);
                }
            }
            _ => {
                t.insert(format!("{p}.mlp.gate_proj.weight"), vec![f, h]);
                t.insert(format!("{p}.mlp.up_proj.weight"), vec![f, h]);
                t.insert(format!("{p}.mlp.down_proj.weight"), vec![h, f]);
            }
        }
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
    /// Matrices of one shape and encoding (a layer's experts), stacked into one in order.
    fn stacked(&mut self, names: &[String]) -> Result<Weight>;
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

    /// Matrices stacked in order: copied into one host buffer (host memory: one layer's experts
    /// of one kind), then uploaded in chunks of whole experts.
    fn stacked(&mut self, names: &[String]) -> Result<Weight> {
        let (dtype, shape, first) = self.src.tensor(&names[0])?;
        let mut bytes = Vec::with_capacity(first.len() * names.len());
        for name in names {
            let (d, s, b) = self.src.tensor(name)?;
            if d != dtype || s != shape {
                return Err(KilnError::model(
                    self.src.path_of(name),
                    format!("`{name}` is {d:?} {s:?}, `{}` is {dtype:?} {shape:?}: experts must match", names[0]),
                ));
            }
            bytes.extend_from_slice(b);
        }
        let label = names[0].replace(".experts.0.", ".experts.");
        let (count, rows, cols) = (names.len() as u32, shape[0] as u32, shape[1] as u32);
        let w = Weight::upload_stacked(self.gpu, &label, count, rows, cols, dtype, &bytes)?;
        (self.on_bytes)(bytes.len() as u64);
        for name in names {
            self.src.release(name);
        }
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

/// The SwiGLU matrices under `prefix` (`model.layers.3.mlp`).
fn dense(src: &mut dyn Parameters, prefix: &str) -> Result<DenseMlp> {
    Ok(DenseMlp {
        gate_proj: src.matrix(&format!("{prefix}.gate_proj.weight"))?,
        up_proj: src.matrix(&format!("{prefix}.up_proj.weight"))?,
        down_proj: src.matrix(&format!("{prefix}.down_proj.weight"))?,
    })
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
            mlp: match &c.moe {
                Some(m) if m.sparse_layers[i] => {
                    let names = MoeNames::of(c);
                    let mut stack = |which: &str| src.stacked(&names.experts(i, which, m.n_experts));
                    let (gate_proj, up_proj, down_proj) = (stack(names.gate)?, stack(names.up)?, stack(names.down)?);
                    Mlp::Experts(Experts {
                        router: src.matrix(&format!("{l}.{}.gate.weight", names.module))?,
                        gate_proj,
                        up_proj,
                        down_proj,
                        shared: match m.shared_intermediate_size {
                            Some(_) => Some(SharedExpert {
                                mlp: dense(src, &format!("{l}.mlp.shared_expert"))?,
                                gate: src.matrix(&format!("{l}.mlp.shared_expert_gate.weight"))?,
                            }),
                            None => None,
                        },
                    })
                }
                _ => Mlp::Dense(dense(src, &format!("{l}.mlp"))?),
            },
        });
    }
    let norm = src.vector("model.norm.weight")?;
    let lm_head = if c.tie_word_embeddings { None } else { Some(src.matrix("lm_head.weight")?) };
    Ok(Weights { embed_tokens, layers, norm, lm_head, lora: Default::default() })
}
