//! Synthetic models for benchmarks: the exact shapes and weight encodings of real checkpoints,
//! with random values made on the device, so `kiln bench --synthetic NAME` needs no download.
//!
//! Each matrix is filled by tiling a ~1 MiB pattern of valid random blocks (finite scales,
//! random quants) with GPU buffer copies: host memory stays at the pattern's size however
//! large the model. Kernel speed does not depend on the values, and the values are finite,
//! so the forward pass is a real one (no NaN shortcuts).

use super::config::ModelConfig;
use super::weights::{self, Parameters};
use super::{GenerationDefaults, LoadStats, Model};
use crate::gpu::{DType, Gpu, Weight};
use crate::tokenizer::Tokenizer;
use crate::{KilnError, Result};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// A real model's shape (its config.json) and the encoding of each matrix.
pub struct Preset {
    pub name: &'static str,
    pub about: &'static str,
    config: &'static str,
    /// The dtype of each matrix, by Hugging Face name.
    dtype: fn(&str) -> DType,
}

const SMOLLM2_135M: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
  "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
  "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": true}"#;

const QWEN25_05B: &str = r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
  "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
  "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": true}"#;

const LLAMA3_8B: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
  "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": false}"#;

const QWEN3_30B_A3B: &str = r#"{"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 2048,
  "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
  "norm_topk_prob": true, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
  "head_dim": 128, "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
  "max_position_embeddings": 40960, "tie_word_embeddings": false}"#;

fn is_embedding(name: &str) -> bool {
    name == "model.embed_tokens.weight" || name == "lm_head.weight"
}

/// llama.cpp's Q4_K_M mix as it falls on Qwen2.5-0.5B: a K-quant needs rows that are whole
/// 256-blocks, and 896 is not, so every matrix that reads the hidden state falls back (Q4_K →
/// Q5_0, Q6_K → Q8_0); only down_proj (4864 = 19 × 256 columns) keeps K-quants, Q6_K in the
/// layers that get more bits.
fn qwen_q4_k_m(name: &str) -> DType {
    if is_embedding(name) || name.contains("v_proj") {
        DType::Q8_0
    } else if name.contains("down_proj") {
        // llama.cpp's use_more_bits(i, n) for the 24 layers.
        let (i, n): (usize, usize) = (name.split('.').nth(2).and_then(|s| s.parse().ok()).unwrap_or(0), 24);
        if i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2 {
            DType::Q6K
        } else {
            DType::Q4K
        }
    } else {
        DType::Q5_0
    }
}

pub const PRESETS: &[Preset] = &[
    Preset {
        name: "smollm2-135m-q4_1",
        about: "SmolLM2-135M-Instruct as in the Q4_1 GGUF: projections Q4_1, tied embedding Q8_0",
        config: SMOLLM2_135M,
        dtype: |n| if is_embedding(n) { DType::Q8_0 } else { DType::Q4_1 },
    },
    Preset {
        name: "qwen2.5-0.5b-q4_k",
        about: "Qwen2.5-0.5B as llama.cpp's Q4_K_M: Q5_0/Q8_0 where rows are not 256-blocks, Q4_K/Q6_K down_proj",
        config: QWEN25_05B,
        dtype: qwen_q4_k_m,
    },
    Preset {
        name: "qwen2.5-0.5b-q8_0",
        about: "Qwen2.5-0.5B, every matrix Q8_0",
        config: QWEN25_05B,
        dtype: |_| DType::Q8_0,
    },
    Preset {
        name: "llama3-8b-q4_0",
        about: "Llama-3-8B as a Q4_0 GGUF: matrices Q4_0, output Q6_K",
        config: LLAMA3_8B,
        dtype: |n| if n == "lm_head.weight" { DType::Q6K } else { DType::Q4_0 },
    },
    Preset {
        name: "qwen3-30b-a3b-q4_k",
        about: "Qwen3-30B-A3B (128 experts, 8 per token) with Q4_K matrices, Q8_0 embedding, Q6_K output",
        config: QWEN3_30B_A3B,
        dtype: |n| match n {
            "model.embed_tokens.weight" => DType::Q8_0,
            "lm_head.weight" => DType::Q6K,
            _ => DType::Q4K,
        },
    },
    Preset {
        name: "llama3-8b-f16",
        about: "Llama-3-8B in f16 (16 GB of weights)",
        config: LLAMA3_8B,
        dtype: |_| DType::F16,
    },
];

pub fn preset(name: &str) -> Result<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        KilnError::Request(format!("no synthetic model `{name}`; presets: {}", names.join(", ")))
    })
}

/// The typical magnitude of a random weight (a trained model's projections are ~N(0, 0.02)).
const WEIGHT_SCALE: f32 = 0.02;

/// `n` blocks of `dtype` with random quants and finite scales chosen so that dequantised
/// values are of the order of `WEIGHT_SCALE`.
pub fn random_blocks(dtype: DType, n: usize, rng: &mut impl Rng) -> Vec<u8> {
    let (_, block) = dtype.block();
    let mut out = vec![0u8; n * block as usize];
    let value = |rng: &mut dyn rand::RngCore| (rng.random::<f32>() * 2.0 - 1.0) * WEIGHT_SCALE * 1.7;
    match dtype {
        DType::F32 => out.chunks_exact_mut(4).for_each(|c| c.copy_from_slice(&value(rng).to_le_bytes())),
        DType::F16 => out.chunks_exact_mut(2).for_each(|c| c.copy_from_slice(&f16::from_f32(value(rng)).to_le_bytes())),
        DType::BF16 => {
            out.chunks_exact_mut(2).for_each(|c| c.copy_from_slice(&bf16::from_f32(value(rng)).to_le_bytes()))
        }
        _ => {
            rng.fill(out.as_mut_slice());
            // (offset of each f16 scale in the block, the scale that makes values ~WEIGHT_SCALE
            // given the quant range).
            let scales: &[(usize, f32)] = match dtype {
                DType::Q8_0 => &[(0, WEIGHT_SCALE / 64.0)],
                DType::Q4_0 | DType::Q5_0 => &[(0, WEIGHT_SCALE / 6.0)],
                DType::Q4_1 | DType::Q5_1 => &[(0, WEIGHT_SCALE / 6.0), (2, -WEIGHT_SCALE)],
                DType::Q4K | DType::Q5K => &[(0, WEIGHT_SCALE / 200.0), (2, WEIGHT_SCALE / 64.0)],
                DType::Q6K => &[(208, WEIGHT_SCALE / 2000.0)],
                _ => unreachable!("float types handled above"),
            };
            for b in out.chunks_exact_mut(block as usize) {
                for &(at, scale) in scales {
                    let s = scale * (0.5 + rng.random::<f32>());
                    b[at..at + 2].copy_from_slice(&f16::from_f32(s).to_le_bytes());
                }
            }
        }
    }
    out
}

/// Random parameters made on the device.
struct RandomParameters<'a> {
    gpu: &'a Gpu,
    shapes: HashMap<String, Vec<usize>>,
    dtype: fn(&str) -> DType,
    rng: rand::rngs::StdRng,
    /// One pattern buffer per dtype, tiled into every matrix of that dtype.
    patterns: HashMap<DType, (wgpu::Buffer, u64)>,
    bytes: u64,
    largest: u64,
}

/// Bytes of a pattern: whole blocks, a multiple of 4 (the copy alignment), about 1 MiB.
fn pattern_blocks(dtype: DType) -> usize {
    let block = dtype.block().1 as usize;
    (1 << 20) / block / 4 * 4
}

impl Parameters for RandomParameters<'_> {
    fn matrix(&mut self, name: &str) -> Result<Weight> {
        let shape = &self.shapes[name];
        let dtype = (self.dtype)(name);
        let w = Weight::zeroed(self.gpu, name, shape[0] as u32, shape[1] as u32, dtype)?;
        self.fill(name, w)
    }

    fn stacked(&mut self, names: &[String]) -> Result<Weight> {
        let shape = &self.shapes[&names[0]];
        let dtype = (self.dtype)(&names[0]);
        let (count, rows, cols) = (names.len() as u32, shape[0] as u32, shape[1] as u32);
        let w = Weight::zeroed_stacked(self.gpu, &names[0], count, rows, cols, dtype)?;
        self.fill(&names[0], w)
    }

    fn vector(&mut self, name: &str) -> Result<wgpu::Buffer> {
        let n = self.shapes[name][0];
        // Norm weights near 1, biases near 0, as in trained models.
        let base = if name.ends_with("norm.weight") { 1.0 } else { 0.0 };
        let values: Vec<f32> = (0..n).map(|_| base + (self.rng.random::<f32>() - 0.5) * 0.1).collect();
        self.bytes += n as u64 * 4;
        self.gpu.upload(name, bytemuck::cast_slice(&values))
    }
}

impl RandomParameters<'_> {
    /// Tile `w` with its dtype's random pattern.
    fn fill(&mut self, name: &str, w: Weight) -> Result<Weight> {
        let dtype = w.dtype;
        if !self.patterns.contains_key(&dtype) {
            let data = random_blocks(dtype, pattern_blocks(dtype), &mut self.rng);
            let buffer = self.gpu.upload(&format!("synthetic {dtype:?} pattern"), &data)?;
            self.patterns.insert(dtype, (buffer, data.len() as u64));
        }
        let (pattern, len) = &self.patterns[&dtype];
        let mut encoder = self.gpu.encoder("synthetic weights");
        for chunk in &w.chunks {
            let size = chunk.buffer.size();
            let mut at = 0;
            while at < size {
                let n = (*len).min(size - at);
                encoder.copy_buffer_to_buffer(pattern, 0, &chunk.buffer, at, n);
                at += n;
            }
        }
        self.gpu.submit_and_wait(name, encoder)?;
        self.bytes += w.bytes();
        self.largest = self.largest.max(w.bytes());
        Ok(w)
    }
}

/// A tokenizer for models without one: the 256 bytes as tokens (GPT-2's byte-to-character
/// map), no merges. Synthetic models are fed token ids directly; this keeps `Model` whole.
fn byte_tokenizer() -> Result<Tokenizer> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let vocab: serde_json::Map<String, serde_json::Value> = printable
        .iter()
        .zip(&chars)
        .map(|(&b, &c)| (char::from_u32(c).expect("valid char").to_string(), serde_json::json!(b)))
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
    });
    Tokenizer::from_json_values(&json, &serde_json::json!({}), std::path::Path::new("synthetic byte tokenizer"))
}

impl Model {
    /// A synthetic model (`PRESETS`) with random weights made on the device, optionally cut to
    /// its first `layers` layers (to fit a big preset on a small machine).
    pub fn synthetic(name: &str, layers: Option<usize>, gpu: Arc<Gpu>, seed: u64) -> Result<Model> {
        let start = Instant::now();
        let preset = preset(name)?;
        let origin = PathBuf::from(format!("synthetic:{name}"));
        let mut config = ModelConfig::from_json(preset.config, &origin)?;
        if let Some(n) = layers {
            if n == 0 || n > config.n_layers {
                return Err(KilnError::Request(format!("--layers {n}: {name} has 1..={} layers", config.n_layers)));
            }
            config.keep_layers(n);
        }
        let mut src = RandomParameters {
            gpu: &gpu,
            shapes: weights::expected_tensors(&config),
            dtype: preset.dtype,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            patterns: HashMap::new(),
            bytes: 0,
            largest: 0,
        };
        let total: u64 = src
            .shapes
            .iter()
            .map(|(name, shape)| match shape[..] {
                [rows, cols] => (preset.dtype)(name).bytes_for((rows * cols) as u64),
                _ => shape.iter().product::<usize>() as u64 * 4,
            })
            .sum();
        let weights = weights::build(&mut src, &config).map_err(|e| super::with_weight_sizes(e, total, src.bytes))?;
        let (bytes, largest) = (src.bytes, src.largest);
        drop(src);
        Ok(Model {
            gpu,
            dir: origin,
            config,
            weights,
            tokenizer: byte_tokenizer()?,
            generation: GenerationDefaults::default(),
            load_stats: LoadStats {
                weight_bytes: bytes,
                seconds: start.elapsed().as_secs_f64(),
                peak_rss_bytes: super::peak_rss_bytes(),
                largest_tensor_bytes: largest,
            },
        })
    }
}
