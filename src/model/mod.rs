//! Models: configuration, checkpoint loading, weights on the GPU and the forward pass.
//!
//! `Model::load` reads a Hugging Face model directory (config.json, safetensors, tokenizer
//! files, generation_config.json), checks every tensor against the config, and streams the
//! weights to the GPU tensor by tensor. A `Session` (see [`crate::session`]) then holds one
//! conversation's KV cache.

pub mod checkpoint;
pub mod config;
pub mod forward;
pub mod gguf_source;
pub mod lora;
pub mod synthetic;
pub mod weights;

pub use config::{Architecture, ModelConfig};

use crate::gpu::Gpu;
use crate::tokenizer::Tokenizer;
use crate::{KilnError, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Sampling defaults and stop tokens from generation_config.json.
#[derive(Clone, Debug, Default)]
pub struct GenerationDefaults {
    pub eos_token_ids: Vec<u32>,
    pub do_sample: bool,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl GenerationDefaults {
    fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| KilnError::io(path, e))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| KilnError::model(path, format!("not valid JSON: {e}")))?;
        let f = |k: &str| v.get(k).and_then(Value::as_f64).map(|x| x as f32);
        Ok(GenerationDefaults {
            eos_token_ids: config::ids(&v.get("eos_token_id").cloned()),
            do_sample: v.get("do_sample").and_then(Value::as_bool).unwrap_or(false),
            temperature: f("temperature"),
            top_k: v.get("top_k").and_then(Value::as_u64).map(|x| x as usize),
            top_p: f("top_p"),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
        })
    }
}

/// What loading measured.
#[derive(Clone, Debug)]
pub struct LoadStats {
    pub weight_bytes: u64,
    pub seconds: f64,
    /// Peak resident memory of the process after loading (VmHWM), where the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    pub largest_tensor_bytes: u64,
}

/// A loaded model: weights resident on the GPU, tokenizer, defaults.
pub struct Model {
    pub gpu: Arc<Gpu>,
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub weights: weights::Weights,
    pub tokenizer: Tokenizer,
    pub generation: GenerationDefaults,
    pub load_stats: LoadStats,
}

/// The snapshot directory of a hub repo id (`org/name[@revision]`) in the standard Hugging Face
/// cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`, or `~/.cache/huggingface/hub`):
/// `models--org--name/snapshots/<commit>`, the commit read from `refs/<revision>` (default `main`).
pub fn resolve_repo_id(id: &Path) -> Result<PathBuf> {
    let text = id.to_string_lossy();
    let (repo, revision) = text.split_once('@').unwrap_or((&text, "main"));
    let parts: Vec<&str> = repo.split('/').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
        return Err(KilnError::model(id, "no such file or directory, and not a hub repo id (org/name)"));
    }
    let hub = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub")))
        .ok_or_else(|| KilnError::model(id, "no Hugging Face cache directory (set HF_HOME)"))?;
    let repo_dir = hub.join(format!("models--{}--{}", parts[0], parts[1]));
    let refs = repo_dir.join("refs").join(revision);
    let commit = match std::fs::read_to_string(&refs) {
        Ok(c) => c.trim().to_string(),
        // A revision can also be a commit hash directly.
        Err(_) => revision.to_string(),
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(KilnError::model(
            id,
            format!(
                "not in the Hugging Face cache ({} is missing); the hub is not reachable from kiln, download it first",
                snapshot.display()
            ),
        ));
    }
    Ok(snapshot)
}

/// Check `src` against `config` and upload it: (weights, bytes, largest tensor's bytes).
fn upload(
    gpu: &Gpu,
    src: &dyn checkpoint::TensorSource,
    config: &ModelConfig,
    origin: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(weights::Weights, u64, u64)> {
    let (total, largest) = checkpoint::check_tensors(src, &weights::expected_tensors(config), origin)?;
    let mut done = 0u64;
    let mut on_bytes = |b: u64| {
        done += b;
        progress(done, total);
    };
    let built = weights::build(&mut weights::Uploader { gpu, src, on_bytes: &mut on_bytes }, config);
    let weights = built.map_err(|e| with_weight_sizes(e, total, done))?;
    Ok((weights, total, largest))
}

/// An out-of-memory error while making the weights, told with what they need in all and how
/// much was on the device when it ran out (the user's question is "how far off am I?").
pub(crate) fn with_weight_sizes(e: KilnError, total: u64, done: u64) -> KilnError {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match e {
        KilnError::OutOfMemory { kernel, message } => KilnError::OutOfMemory {
            kernel,
            message: format!(
                "{message}; the weights need {:.2} GiB in all, {:.2} GiB were on the device when it ran out",
                gib(total),
                gib(done)
            ),
        },
        other => other,
    }
}

/// Peak resident set size of this process (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl Model {
    /// Load a Hugging Face model directory. `progress(done, total)` is called with weight bytes.
    /// Load a model: a Hugging Face model directory, a `.gguf` file, or a hub repo id
    /// (`org/name`) already in the Hugging Face cache. `progress(done, total)` gets weight bytes.
    pub fn load(path: &Path, gpu: Arc<Gpu>, progress: &mut dyn FnMut(u64, u64)) -> Result<Model> {
        let start = Instant::now();
        let resolved;
        let path = if path.exists() {
            path
        } else {
            resolved = resolve_repo_id(path)?;
            resolved.as_path()
        };
        let (config, tokenizer, mut generation, (weights, total, largest)) = if path.is_file() {
            let src = gguf_source::GgufSource::open(path)?;
            let config = src.config()?;
            let tokenizer = crate::gguf_tokenizer::from_gguf(&src.file, path)?;
            let generation = GenerationDefaults { eos_token_ids: config.eos_token_ids.clone(), ..Default::default() };
            let uploaded = upload(&gpu, &src, &config, path, progress)?;
            (config, tokenizer, generation, uploaded)
        } else {
            let config = ModelConfig::from_file(&path.join("config.json"))?;
            let tokenizer = Tokenizer::from_dir(path)?;
            let gen_path = path.join("generation_config.json");
            let generation = if gen_path.exists() {
                GenerationDefaults::from_file(&gen_path)?
            } else {
                GenerationDefaults::default()
            };
            let ckpt = checkpoint::Checkpoint::open(path)?;
            let uploaded = upload(&gpu, &ckpt, &config, path, progress)?;
            (config, tokenizer, generation, uploaded)
        };
        if generation.eos_token_ids.is_empty() {
            generation.eos_token_ids = config.eos_token_ids.clone();
        }
        if generation.eos_token_ids.is_empty() {
            generation.eos_token_ids.extend(tokenizer.eos_id());
        }
        // Finish the uploads before reporting the load as done.
        gpu.wait_idle("weight upload")?;
        Ok(Model {
            gpu,
            dir: path.to_path_buf(),
            config,
            weights,
            tokenizer,
            generation,
            load_stats: LoadStats {
                weight_bytes: total,
                seconds: start.elapsed().as_secs_f64(),
                peak_rss_bytes: peak_rss_bytes(),
                largest_tensor_bytes: largest,
            },
        })
    }

    /// Read LoRA adapters for this model and keep them on the GPU beside the weights, unmerged:
    /// sessions and requests then choose which apply (`Adapters::mask`). Replaces any loaded.
    pub fn add_adapters(&mut self, specs: &[lora::AdapterSpec]) -> Result<()> {
        let adapters: Vec<lora::Adapter> =
            specs.iter().map(|s| lora::Adapter::read(s, &self.config)).collect::<Result<_>>()?;
        self.weights.lora = lora::Adapters::upload(&self.gpu, &self.weights, &adapters)?;
        Ok(())
    }

    /// The default context: the model's own, at most 4096.
    pub fn default_context(&self) -> usize {
        self.config.max_position_embeddings.min(4096)
    }

    /// Human-readable summary for `kiln info`.
    pub fn info(&self) -> String {
        let c = &self.config;
        let mut s = String::new();
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        s += &format!("model:          {}\n", self.dir.display());
        s += &format!("architecture:   {:?}\n", c.architecture);
        s += &format!("parameters:     {} ({:.1} M)\n", c.parameter_count(), c.parameter_count() as f64 / 1e6);
        s += &format!(
            "shape:          {} layers, hidden {}, mlp {}, {} heads / {} kv heads (head_dim {}), vocab {}\n",
            c.n_layers, c.hidden_size, c.intermediate_size, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size
        );
        s += &format!(
            "rope:           theta {}{}, tied embeddings: {}, qkv bias: {}\n",
            c.rope_theta,
            if c.rope_scaling.is_some() {
                ", llama3 scaling"
            } else if c.rope_freq_factors.is_some() {
                ", rope_freqs factors"
            } else {
                ""
            },
            c.tie_word_embeddings,
            c.qkv_bias
        );
        s += &format!(
            "attention:      {}{}\n",
            windows(&c.attention_windows),
            if c.qk_norm { ", q/k heads RMS-normalised" } else { "" }
        );
        if let Some(m) = &c.moe {
            let sparse = m.sparse_layers.iter().filter(|&&s| s).count();
            s += &format!(
                "experts:        {} of {} per token (intermediate {}), weights {}{}, in {sparse} of {} layers\n",
                m.top_k,
                m.n_experts,
                m.expert_intermediate_size,
                if m.norm_topk_prob { "renormalised" } else { "as the router gives them" },
                m.shared_intermediate_size.map(|f| format!(", a gated shared expert of {f}")).unwrap_or_default(),
                c.n_layers
            );
        }
        for (dtype, bytes) in self.weights.bytes_by_dtype() {
            let name = format!("{dtype:?}").to_lowercase();
            s += &format!("weights {name:5}   {bytes} bytes ({:.3} GiB)\n", gib(bytes));
        }
        let resident = self.weights.resident_bytes();
        s += &format!(
            "weights on GPU: {resident} bytes ({:.3} GiB, every matrix kept in its stored encoding)\n",
            gib(resident)
        );
        let e = self.gpu.kv_element_bytes() as usize;
        let per_token = c.kv_bytes_per_token(e) as u64;
        let ctx = self.default_context() as u64;
        s += &format!(
            "kv cache:       {per_token} bytes/token ({}), {} bytes at context {ctx} ({:.3} GiB); model max {}\n",
            if e == 2 { "f16" } else { "f32" },
            per_token * ctx,
            gib(per_token * ctx),
            c.max_position_embeddings
        );
        for (name, rank, scale) in &self.weights.lora.list {
            s += &format!("lora adapter:   {name} (rank {rank}, scale {scale}), unmerged\n");
        }
        s += &format!("eos ids:        {:?}\n", self.generation.eos_token_ids);
        s += &format!("adapter:        {}\n", self.gpu.describe());
        s
    }
}

/// "full causal", "sliding window of 4096 keys", or which layers slide.
fn windows(per_layer: &[Option<u32>]) -> String {
    let sliding: Vec<usize> = (0..per_layer.len()).filter(|&l| per_layer[l].is_some()).collect();
    match (sliding.len(), per_layer.iter().flatten().next()) {
        (0, _) | (_, None) => "full causal".into(),
        (n, Some(w)) if n == per_layer.len() => format!("sliding window of {w} keys"),
        (_, Some(w)) => format!("sliding window of {w} keys in layers {sliding:?}, full causal in the others"),
    }
}
