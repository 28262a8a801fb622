//! Model configuration in two stages (as candle does): `RawConfig` takes config.json as written,
//! tolerating the key spellings of transformers 4 and 5; `ModelConfig` is the validated result
//! with every derived size resolved in one place. Anything we cannot run is an error naming it.

use crate::ops::rope::Llama3Scaling;
use crate::{KilnError, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The model families kiln runs. Relatives that need no new op load as one of these
/// (MistralForCausalLM and SmolLM as Llama).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    /// Qwen2's layout without q/k/v biases, plus RMSNorm of each query and key head before RoPE.
    Qwen3,
    /// Llama's attention (with Mistral's sliding window) and a mixture of experts in every layer.
    Mixtral,
    /// Qwen2's attention; mixtures of experts plus a sigmoid-gated shared expert.
    Qwen2Moe,
    /// Qwen3's attention; mixtures of experts.
    Qwen3Moe,
}

impl Architecture {
    /// q/k/v projections always carry biases.
    pub fn qkv_bias(self) -> bool {
        matches!(self, Architecture::Qwen2 | Architecture::Qwen2Moe)
    }

    /// Each query and key head is RMS-normalised before RoPE.
    pub fn qk_norm(self) -> bool {
        matches!(self, Architecture::Qwen3 | Architecture::Qwen3Moe)
    }

    /// A Qwen family: a sliding window only with `use_sliding_window`, from `max_window_layers` on.
    fn qwen(self) -> bool {
        matches!(self, Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Qwen2Moe | Architecture::Qwen3Moe)
    }
}

/// A mixture of experts in place of the MLP (Shazeer et al. 2017; Mixtral, Qwen-MoE): a router
/// picks `top_k` of `n_experts` SwiGLU experts per token, whose outputs are summed weighted by
/// the router's softmax probabilities (renormalised over the chosen ones where `norm_topk_prob`).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub n_experts: usize,
    pub top_k: usize,
    /// Each expert's intermediate size.
    pub expert_intermediate_size: usize,
    pub norm_topk_prob: bool,
    /// A shared expert every token takes, scaled by sigmoid(x·w) (Qwen2-MoE): its intermediate size.
    pub shared_intermediate_size: Option<usize>,
    /// Per layer: experts (true) or the dense MLP of `intermediate_size` (Qwen's `mlp_only_layers`
    /// and `decoder_sparse_step`).
    pub sparse_layers: Vec<bool>,
}

/// The most experts and chosen experts per token kiln's router kernel handles.
pub const MAX_EXPERTS: usize = 256;
pub const MAX_TOP_K: usize = 16;

#[derive(Debug, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    /// transformers 5 writes `rope_parameters: {rope_type, rope_theta, ...}` instead.
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
    sliding_window: Option<Value>,
    max_window_layers: Option<usize>,
    // Mixtures of experts: Qwen2-MoE / Qwen3-MoE and Mixtral spellings.
    num_experts: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    /// transformers' per-layer attention kinds ("full_attention" / "sliding_attention").
    layer_types: Option<Vec<String>>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

/// A validated model configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Scaling>,
    /// Per-frequency divisors of the RoPE frequencies (head_dim / 2 of them): GGUF's
    /// `rope_freqs.weight`, where llama.cpp's converter stores Llama 3.1's scaling.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// Rotate pairs (2i, 2i+1) instead of HF's (i, i + d/2): GGUF llama files, whose q/k rows
    /// llama.cpp's converter permuted.
    pub rope_interleaved: bool,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Each query and key head is RMS-normalised (weights of head_dim) before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Per layer: how many keys a query sees under a sliding window (itself and the
    /// `window - 1` before it: transformers' `kv_idx > q_idx - sliding_window`), or None for
    /// full causal attention.
    pub attention_windows: Vec<Option<u32>>,
    /// A mixture of experts in place of the MLP, in the layers it names.
    pub moe: Option<MoeConfig>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// Token ids given as an int or a list of ints.
pub(crate) fn ids(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

/// The most layers a config may have (`check_sizes`); nothing is sized by a larger count first.
const MAX_LAYERS: usize = 1 << 10;

/// Each layer's sliding window, as transformers decides it: an explicit `layer_types` list; else
/// Mistral's `sliding_window` on every layer; else, for the Qwen families, `sliding_window` on
/// layers from `max_window_layers` on, only when `use_sliding_window` is true.
fn attention_windows(
    raw: &RawConfig,
    arch: Architecture,
    n_layers: usize,
) -> std::result::Result<Vec<Option<u32>>, String> {
    let window = match &raw.sliding_window {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(w) if w > 0 && w <= u32::MAX as u64 => Some(w as u32),
            _ => return Err(format!("sliding_window {v} is not a positive number of tokens")),
        },
    };
    let enabled = !arch.qwen() || raw.use_sliding_window == Some(true);
    let Some(window) = window.filter(|_| enabled) else {
        return Ok(vec![None; n_layers.min(MAX_LAYERS)]);
    };
    if let Some(types) = &raw.layer_types {
        if types.len() != n_layers {
            return Err(format!("layer_types lists {} layers, the model has {n_layers}", types.len()));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(None),
                "sliding_attention" => Ok(Some(window)),
                other => Err(format!("layer type `{other}` is not supported (full_attention, sliding_attention)")),
            })
            .collect();
    }
    let first = if arch.qwen() { raw.max_window_layers.unwrap_or(0) } else { 0 };
    Ok((0..n_layers.min(MAX_LAYERS)).map(|i| (i >= first).then_some(window)).collect())
}

/// The mixture of experts a config describes, or None for a dense model.
fn moe_config(raw: &RawConfig, arch: Architecture, n_layers: usize) -> std::result::Result<Option<MoeConfig>, String> {
    let (n_experts, expert_intermediate_size) = match arch {
        Architecture::Llama | Architecture::Qwen2 | Architecture::Qwen3 => return Ok(None),
        Architecture::Mixtral => (raw.num_local_experts, raw.intermediate_size),
        Architecture::Qwen2Moe | Architecture::Qwen3Moe => (raw.num_experts, raw.moe_intermediate_size),
    };
    let n_experts = n_experts.filter(|&e| e > 0).ok_or("a mixture of experts without a number of experts")?;
    let expert_intermediate_size = expert_intermediate_size
        .filter(|&f| f > 0)
        .ok_or("a mixture of experts without the experts' intermediate size")?;
    let top_k = raw.num_experts_per_tok.unwrap_or(2);
    if n_experts > MAX_EXPERTS || top_k == 0 || top_k > n_experts.min(MAX_TOP_K) {
        return Err(format!(
            "{top_k} of {n_experts} experts per token is not supported (at most {MAX_TOP_K} of {MAX_EXPERTS})"
        ));
    }
    let step = raw.decoder_sparse_step.unwrap_or(1).max(1);
    let dense = raw.mlp_only_layers.clone().unwrap_or_default();
    let sparse_layers = (0..n_layers.min(MAX_LAYERS)).map(|i| !dense.contains(&i) && (i + 1) % step == 0).collect();
    let shared = match arch {
        Architecture::Qwen2Moe => raw.shared_expert_intermediate_size.filter(|&f| f > 0),
        _ => None,
    };
    Ok(Some(MoeConfig {
        n_experts,
        top_k,
        expert_intermediate_size,
        // Mixtral always renormalises; Qwen's default is false.
        norm_topk_prob: arch == Architecture::Mixtral || raw.norm_topk_prob.unwrap_or(false),
        shared_intermediate_size: shared,
        sparse_layers,
    }))
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| KilnError::io(path, e))?;
        Self::from_json(&text, path)
    }

    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| KilnError::model(path, format!("not a valid config.json: {e}")))?;
        let err = |m: String| KilnError::model(path, m);
        let need =
            |v: Option<usize>, key: &str| v.filter(|&x| x > 0).ok_or_else(|| err(format!("missing or zero `{key}`")));

        let names = raw.architectures.clone().unwrap_or_default();
        let architecture = match (names.first().map(String::as_str), raw.model_type.as_deref()) {
            (Some("LlamaForCausalLM"), _) | (None, Some("llama")) => Architecture::Llama,
            (Some("MistralForCausalLM"), _) | (None, Some("mistral")) => Architecture::Llama,
            (Some("Qwen2ForCausalLM"), _) | (None, Some("qwen2")) => Architecture::Qwen2,
            (Some("Qwen3ForCausalLM"), _) | (None, Some("qwen3")) => Architecture::Qwen3,
            (Some("MixtralForCausalLM"), _) | (None, Some("mixtral")) => Architecture::Mixtral,
            (Some("Qwen2MoeForCausalLM"), _) | (None, Some("qwen2_moe")) => Architecture::Qwen2Moe,
            (Some("Qwen3MoeForCausalLM"), _) | (None, Some("qwen3_moe")) => Architecture::Qwen3Moe,
            (Some(other), _) => {
                return Err(err(format!(
                "unknown architecture `{other}`: kiln runs LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, Qwen2MoeForCausalLM, Qwen3ForCausalLM and Qwen3MoeForCausalLM"
            )))
            }
            (None, other) => return Err(err(format!("no `architectures` and unknown model_type {other:?}"))),
        };
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(err(format!("hidden_act `{act}` is not supported (SwiGLU with silu only)")));
            }
        }
        if raw.mlp_bias == Some(true) {
            return Err(err("mlp_bias = true is not supported".into()));
        }

        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let n_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let n_kv_heads = raw.num_key_value_heads.unwrap_or(n_heads);
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(err(format!("{n_heads} attention heads do not divide into {n_kv_heads} key/value heads")));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if hidden_size % n_heads == 0 => hidden_size / n_heads,
            None => {
                return Err(err(format!(
                    "hidden_size {hidden_size} is not a multiple of {n_heads} heads and head_dim is absent"
                )))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > 128 {
            return Err(err(format!("head_dim {head_dim} is not supported (even, at most 128)")));
        }

        // rope_theta and rope scaling: top level (transformers 4) or rope_parameters (5).
        let params = raw.rope_parameters.as_ref();
        let rope_theta = raw
            .rope_theta
            .or_else(|| params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64))
            .unwrap_or(10000.0);
        let scaling = match (&raw.rope_scaling, params) {
            (Some(v), _) if !v.is_null() => Some(v),
            (_, Some(p)) => Some(p),
            _ => None,
        };
        let rope_scaling = match scaling {
            None => None,
            Some(s) => {
                let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
                let f = |k: &str| {
                    s.get(k).and_then(Value::as_f64).ok_or_else(|| err(format!("rope_scaling `llama3` lacks `{k}`")))
                };
                match kind {
                    "default" => None,
                    "llama3" => Some(Llama3Scaling {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position_embeddings: f("original_max_position_embeddings")?,
                    }),
                    other => {
                        return Err(err(format!(
                            "unknown rope_scaling type `{other}` (kiln knows `default` and `llama3`)"
                        )))
                    }
                }
            }
        };

        let n_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        let attention_windows = attention_windows(&raw, architecture, n_layers).map_err(err)?;
        let moe = moe_config(&raw, architecture, n_layers).map_err(err)?;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let qwen2 = architecture.qkv_bias();
        ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            rope_freq_factors: None,
            rope_interleaved: false,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: qwen2 || attention_bias,
            o_bias: !qwen2 && attention_bias,
            qk_norm: architecture.qk_norm(),
            attention_windows,
            moe,
            bos_token_id: ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: ids(&raw.eos_token_id),
        }
        .check_sizes(path)
    }

    /// Refuse sizes no model has, before anything loops over layers or multiplies shapes: a
    /// damaged file's `num_hidden_layers = 10^12` would otherwise hang building the tensor list,
    /// and products of huge dimensions would overflow. The bounds sit far above every released
    /// model (Llama 3.1 405B: 126 layers, hidden 16384, ffn 53248; vocabularies up to 256k).
    pub(crate) fn check_sizes(self, path: &Path) -> Result<Self> {
        let bounds = [
            ("layers", self.n_layers, MAX_LAYERS),
            ("hidden size", self.hidden_size, 1 << 17),
            ("intermediate size", self.intermediate_size, 1 << 20),
            ("attention heads", self.n_heads, 1 << 10),
            ("vocabulary size", self.vocab_size, 1 << 24),
            ("context length", self.max_position_embeddings, 1 << 26),
        ];
        for (what, value, most) in bounds {
            if value == 0 || value > most {
                return Err(KilnError::model(path, format!("{what} {value} is out of range (1 to {most})")));
            }
        }
        if let Some(m) = &self.moe {
            if m.expert_intermediate_size > 1 << 20 || m.shared_intermediate_size.is_some_and(|f| f > 1 << 20) {
                return Err(KilnError::model(path, format!("expert intermediate sizes {m:?} are out of range")));
            }
            if m.sparse_layers.len() != self.n_layers {
                return Err(KilnError::model(path, "the expert layers do not match the layer count"));
            }
        }
        if self.attention_windows.len() != self.n_layers {
            return Err(KilnError::model(
                path,
                format!("{} attention windows for {} layers", self.attention_windows.len(), self.n_layers),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(KilnError::model(path, format!("rms_norm_eps {} is not a positive number", self.rms_norm_eps)));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(KilnError::model(path, format!("rope_theta {} is not a positive number", self.rope_theta)));
        }
        if let Some(s) = &self.rope_scaling {
            let values = [s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings];
            // The smoothing divides by (high - low): equal factors would give NaN frequencies.
            if values.iter().any(|v| !(v.is_finite() && *v > 0.0)) || s.high_freq_factor <= s.low_freq_factor {
                return Err(KilnError::model(
                    path,
                    format!("rope_scaling {s:?}: every value must be positive and high_freq_factor > low_freq_factor"),
                ));
            }
        }
        Ok(self)
    }

    /// Keep only the first `n` layers (a big model's shapes on a small machine: `--layers`).
    pub fn keep_layers(&mut self, n: usize) {
        self.n_layers = n;
        self.attention_windows.truncate(n);
        if let Some(m) = &mut self.moe {
            m.sparse_layers.truncate(n);
        }
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Bytes of KV cache one token takes: layers × kv_heads × head_dim × (K and V) × element size.
    pub fn kv_bytes_per_token(&self, element_bytes: usize) -> usize {
        self.n_layers * self.kv_dim() * 2 * element_bytes
    }

    /// Parameter count implied by the shapes.
    pub fn parameter_count(&self) -> usize {
        let (h, f) = (self.hidden_size, self.intermediate_size);
        let attn = h * self.q_dim() * 2
            + h * self.kv_dim() * 2
            + if self.qkv_bias { self.q_dim() + 2 * self.kv_dim() } else { 0 }
            + if self.o_bias { h } else { 0 }
            + if self.qk_norm { 2 * self.head_dim } else { 0 };
        let mlp = |layer: usize| match &self.moe {
            Some(m) if m.sparse_layers[layer] => {
                let shared = m.shared_intermediate_size.map_or(0, |fs| 3 * h * fs + h);
                m.n_experts * (3 * h * m.expert_intermediate_size + h) + shared
            }
            _ => 3 * h * f,
        };
        let layers: usize = (0..self.n_layers).map(|l| attn + mlp(l) + 2 * h).sum();
        let embed = self.vocab_size * h;
        embed + layers + h + if self.tie_word_embeddings { 0 } else { embed }
    }
}
