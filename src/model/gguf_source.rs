//! GGUF files as a model source: configuration from `{arch}.*` metadata, tensors renamed to
//! their Hugging Face names (so one model definition serves both formats), dimensions turned
//! from GGUF's innermost-first order into (rows, cols), and quantised blocks passed through.
//!
//! llama.cpp's converter permutes the rows of `attn_q` and `attn_k` for arch `llama` so that
//! pairs (2i, 2i+1) rotate together; kiln then applies interleaved RoPE to those weights
//! (`ModelConfig::rope_interleaved`) instead of un-permuting them. q·k is unchanged because
//! q and k are permuted alike. Arch `qwen2` files are not permuted.

use super::checkpoint::TensorSource;
use super::config::{Architecture, ModelConfig, MoeConfig};
use super::weights::MoeNames;
use crate::gguf::{GgmlType, GgufFile};
use crate::gpu::DType;
use crate::model::config::{MAX_EXPERTS, MAX_TOP_K};
use crate::{KilnError, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What a GGUF tensor is under Hugging Face names: one tensor, or (a layer's `*_exps`, all its
/// experts in one 3-d tensor) one name per expert.
enum HfNames {
    One(String),
    Experts(Vec<String>),
}

/// The Hugging Face name(s) of a GGUF tensor, where there are any. `moe` names the experts'
/// module as the architecture's checkpoints do (`block_sparse_moe` and w1/w3/w2 for Mixtral,
/// `mlp` and gate/up/down_proj for Qwen), and `n_experts` is how many there are.
fn hf_names(gguf: &str, moe: &MoeNames, n_experts: usize) -> Option<HfNames> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(HfNames::One(n.to_string()));
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (module, kind) = part.rsplit_once('.')?;
    let p = format!("model.layers.{layer}");
    let experts = |proj: &str| {
        HfNames::Experts((0..n_experts).map(|e| format!("{p}.{}.experts.{e}.{proj}.{kind}", moe.module)).collect())
    };
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "ffn_gate_inp" => return Some(HfNames::One(format!("{p}.{}.gate.{kind}", moe.module))),
        "ffn_gate_exps" => return Some(experts(moe.gate)),
        "ffn_up_exps" => return Some(experts(moe.up)),
        "ffn_down_exps" => return Some(experts(moe.down)),
        "ffn_gate_shexp" => "mlp.shared_expert.gate_proj",
        "ffn_up_shexp" => "mlp.shared_expert.up_proj",
        "ffn_down_shexp" => "mlp.shared_expert.down_proj",
        "ffn_gate_inp_shexp" => "mlp.shared_expert_gate",
        _ => return None,
    };
    Some(HfNames::One(format!("{p}.{hf}.{kind}")))
}

fn dtype(t: GgmlType) -> DType {
    match t {
        GgmlType::F32 => DType::F32,
        GgmlType::F16 => DType::F16,
        GgmlType::BF16 => DType::BF16,
        GgmlType::Q8_0 => DType::Q8_0,
        GgmlType::Q4_0 => DType::Q4_0,
        GgmlType::Q4_1 => DType::Q4_1,
        GgmlType::Q5_0 => DType::Q5_0,
        GgmlType::Q5_1 => DType::Q5_1,
        GgmlType::Q4_K => DType::Q4K,
        GgmlType::Q5_K => DType::Q5K,
        GgmlType::Q6_K => DType::Q6K,
    }
}

pub struct GgufSource {
    pub file: GgufFile,
    path: PathBuf,
    /// Hugging Face (or, without one, GGUF) name → index into `file.tensors`, and the expert
    /// it is within a stacked `*_exps` tensor.
    by_name: HashMap<String, (usize, Option<u32>)>,
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<GgufSource> {
        Ok(GgufSource::new(GgufFile::open(path)?, path))
    }

    /// A source over a file already parsed; `path` names it in errors.
    pub fn new(file: GgufFile, path: &Path) -> GgufSource {
        let arch = file.architecture().unwrap_or("");
        // Mixtral is arch `llama` with experts; its checkpoints name them as Mixtral's do.
        let moe = if arch == "llama" { MoeNames::MIXTRAL } else { MoeNames::QWEN };
        let n_experts = file.get_u64(&format!("{arch}.expert_count")).unwrap_or(0).min(MAX_EXPERTS as u64) as usize;
        let mut by_name = HashMap::new();
        for (i, t) in file.tensors.iter().enumerate() {
            match hf_names(&t.name, &moe, n_experts) {
                Some(HfNames::One(name)) => {
                    by_name.insert(name, (i, None));
                }
                Some(HfNames::Experts(names)) => {
                    for (e, name) in names.into_iter().enumerate() {
                        by_name.insert(name, (i, Some(e as u32)));
                    }
                }
                None => {
                    by_name.insert(t.name.clone(), (i, None));
                }
            }
        }
        GgufSource { file, path: path.to_path_buf(), by_name }
    }

    /// The model configuration the metadata describes.
    pub fn config(&self) -> Result<ModelConfig> {
        let f = &self.file;
        let err = |m: String| KilnError::model(&self.path, m);
        let arch_name = f.architecture()?;
        let architecture = match arch_name {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            "qwen2moe" => Architecture::Qwen2Moe,
            "qwen3moe" => Architecture::Qwen3Moe,
            other => {
                return Err(err(format!(
                    "unknown GGUF architecture `{other}`: kiln runs llama (and Mixtral as llama with experts), qwen2, qwen3, qwen2moe and qwen3moe"
                )))
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let usize_of = |k: &str| f.get_u64(&key(k)).map(|v| v as usize);
        let n_experts = usize_of("expert_count").unwrap_or(0);
        let architecture = match architecture {
            Architecture::Llama if n_experts > 0 => Architecture::Mixtral,
            a => a,
        };
        let hidden_size = usize_of("embedding_length")?;
        let n_heads = usize_of("attention.head_count")?;
        let n_kv_heads = usize_of("attention.head_count_kv").unwrap_or(n_heads);
        let key_length = usize_of("attention.key_length").ok();
        if n_heads == 0
            || n_kv_heads == 0
            || n_heads % n_kv_heads != 0
            || (key_length.is_none() && hidden_size % n_heads != 0)
        {
            return Err(err(format!(
                "{n_heads} heads / {n_kv_heads} kv heads / hidden {hidden_size} do not fit together"
            )));
        }
        // Qwen3 states its head size (q_proj may be wider than the hidden size).
        let head_dim = key_length.unwrap_or(hidden_size / n_heads);
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > 128 {
            return Err(err(format!("head_dim {head_dim} is not supported (even, at most 128)")));
        }
        if let Ok(kind) = f.get_str(&key("rope.scaling.type")) {
            if kind != "none" {
                return Err(err(format!("rope scaling `{kind}` in GGUF files is not supported yet")));
            }
        }
        let vocab_size =
            usize_of("vocab_size").or_else(|_| f.get_str_array("tokenizer.ggml.tokens").map(|t| t.len()))?;
        let eos: Vec<u32> = f.get_u32("tokenizer.ggml.eos_token_id").ok().into_iter().collect();
        let rope_freq_factors = self.rope_freq_factors(head_dim)?;
        let n_layers = usize_of("block_count")?;
        // llama.cpp writes a sliding window for every layer of the archs that have one.
        let window = match f.get_u64(&key("attention.sliding_window")) {
            Ok(0) | Err(_) => None,
            Ok(w) => Some(u32::try_from(w).map_err(|_| err(format!("sliding window {w} is out of range")))?),
        };
        let moe = match architecture {
            Architecture::Mixtral | Architecture::Qwen2Moe | Architecture::Qwen3Moe => {
                let top_k = usize_of("expert_used_count")?;
                if n_experts == 0 || n_experts > MAX_EXPERTS || top_k == 0 || top_k > n_experts.min(MAX_TOP_K) {
                    return Err(err(format!(
                        "{top_k} of {n_experts} experts per token is not supported (at most {MAX_TOP_K} of {MAX_EXPERTS})"
                    )));
                }
                let expert_intermediate_size = match architecture {
                    Architecture::Mixtral => usize_of("feed_forward_length")?,
                    _ => usize_of("expert_feed_forward_length")?,
                };
                let module =
                    if architecture == Architecture::Mixtral { MoeNames::MIXTRAL } else { MoeNames::QWEN }.module;
                Some(MoeConfig {
                    n_experts,
                    top_k,
                    expert_intermediate_size,
                    // llama.cpp's graphs: Mixtral and Qwen3-MoE renormalise, Qwen2-MoE does not.
                    norm_topk_prob: f
                        .get_bool(&key("expert_weights_norm"))
                        .unwrap_or(architecture != Architecture::Qwen2Moe),
                    shared_intermediate_size: match architecture {
                        Architecture::Qwen2Moe => usize_of("expert_shared_feed_forward_length").ok(),
                        _ => None,
                    },
                    sparse_layers: (0..n_layers.min(1 << 10))
                        .map(|l| self.by_name.contains_key(&format!("model.layers.{l}.{module}.gate.weight")))
                        .collect(),
                })
            }
            _ => None,
        };
        ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: usize_of("feed_forward_length").or_else(|e| match &moe {
                Some(m) => Ok(m.expert_intermediate_size),
                None => Err(e),
            })?,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: f.get_f32(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
            rope_theta: f.get_f32(&key("rope.freq_base")).map(f64::from).unwrap_or(10000.0),
            rope_scaling: None,
            rope_freq_factors,
            // llama.cpp permutes q/k rows for arch `llama` (Mixtral included).
            rope_interleaved: arch_name == "llama",
            max_position_embeddings: usize_of("context_length").unwrap_or(4096),
            tie_word_embeddings: !self.by_name.contains_key("lm_head.weight"),
            qkv_bias: self.by_name.contains_key("model.layers.0.self_attn.q_proj.bias"),
            o_bias: self.by_name.contains_key("model.layers.0.self_attn.o_proj.bias"),
            qk_norm: architecture.qk_norm(),
            moe,
            attention_windows: vec![window; n_layers.min(1 << 10)],
            bos_token_id: f.get_u32("tokenizer.ggml.bos_token_id").ok(),
            eos_token_ids: eos,
        }
        .check_sizes(&self.path)
    }
}

impl GgufSource {
    /// `rope_freqs.weight`: head_dim / 2 positive f32 divisors of the RoPE frequencies (Llama
    /// 3.1+ files carry their frequency scaling this way), or None.
    fn rope_freq_factors(&self, head_dim: usize) -> Result<Option<Vec<f32>>> {
        if !self.by_name.contains_key(ROPE_FREQS) {
            return Ok(None);
        }
        let (dtype, shape, bytes) = self.tensor(ROPE_FREQS)?;
        if dtype != DType::F32 || shape != [head_dim / 2] {
            return Err(KilnError::model(
                &self.path,
                format!("{ROPE_FREQS} is {dtype:?} {shape:?}; expected F32 [{}] (head_dim / 2)", head_dim / 2),
            ));
        }
        let factors: Vec<f32> = bytemuck::pod_collect_to_vec(bytes);
        if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
            return Err(KilnError::model(&self.path, format!("{ROPE_FREQS} holds {bad}, not a positive factor")));
        }
        Ok(Some(factors))
    }
}

/// The GGUF tensor of RoPE frequency factors (read into the config, not uploaded).
pub const ROPE_FREQS: &str = "rope_freqs.weight";

impl TensorSource for GgufSource {
    fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    fn tensor(&self, name: &str) -> Result<(DType, Vec<usize>, &[u8])> {
        let (info, expert) = self
            .by_name
            .get(name)
            .and_then(|&(i, e)| Some((self.file.tensors.get(i)?, e)))
            .ok_or_else(|| KilnError::model(&self.path, format!("no tensor `{name}`")))?;
        // GGUF lists dimensions innermost first: [cols, rows] is a (rows × cols) matrix.
        let mut shape: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
        let data = self.file.tensor_data(info)?;
        if name.ends_with("shared_expert_gate.weight") && shape.len() == 1 {
            // llama.cpp stores the shared expert's gate (1 × hidden) as a vector.
            shape.insert(0, 1);
        }
        let Some(e) = expert else {
            return Ok((dtype(info.ggml_type), shape, data));
        };
        // Expert e of an (experts, rows, cols) tensor: its rows are contiguous.
        if shape.len() != 3 || e as usize >= shape[0] {
            return Err(KilnError::model(
                &self.path,
                format!("`{}` has dims {:?}; expected (experts, rows, cols) with expert {e}", info.name, shape),
            ));
        }
        let each = data.len() / shape[0];
        Ok((dtype(info.ggml_type), shape[1..].to_vec(), &data[e as usize * each..][..each]))
    }

    fn path_of(&self, _name: &str) -> PathBuf {
        self.path.clone()
    }

    fn release(&self, name: &str) {
        if let Some(info) = self.by_name.get(name).and_then(|&(i, _)| self.file.tensors.get(i)) {
            self.file.release(info);
        }
    }
}
