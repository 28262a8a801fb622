//! LoRA adapters in the PEFT format (adapter_config.json + adapter_model.safetensors), kept
//! unmerged on the GPU beside the base weights, so each token of a step can use its own
//! adapters: y = x·Wᵀ + Σ_i s_i·(x·A_iᵀ)·B_iᵀ (Hu et al. 2021; served as vLLM and llama-server do).
//! `merge` folds adapters into a checkpoint instead (`kiln merge-lora`).
//!
//! Scale: s = lora_alpha / r (lora_alpha / √r with use_rslora), times the user's scale
//! (`--lora PATH:SCALE`). An adapter may touch the attention projections and a dense MLP;
//! anything else (embeddings, experts, DoRA, biases, act-order tricks) is refused by name.

use super::checkpoint::{self, Checkpoint, TensorSource};
use super::config::ModelConfig;
use super::weights::{self, Mlp, Weights};
use crate::gpu::Gpu;
use crate::ops::lora::{LoraModule, MAX_ADAPTERS};
use crate::{KilnError, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The linear modules an adapter may touch, by their Hugging Face names.
pub const MODULES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// `--lora PATH[:SCALE]`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterSpec {
    pub path: PathBuf,
    pub scale: f32,
}

impl std::str::FromStr for AdapterSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        // A scale is a number after the last ':'; a path may hold ':' itself.
        if let Some((path, scale)) = s.rsplit_once(':') {
            if let Ok(scale) = scale.parse::<f32>() {
                if !scale.is_finite() {
                    return Err(format!("adapter scale `{scale}` is not a finite number"));
                }
                return Ok(AdapterSpec { path: path.into(), scale });
            }
        }
        Ok(AdapterSpec { path: s.into(), scale: 1.0 })
    }
}

/// An adapter read and checked against a base model, its matrices on the host in f32.
pub struct Adapter {
    /// Its directory's name: requests choose it as `base:name`.
    pub name: String,
    pub path: PathBuf,
    pub rank: usize,
    /// lora_alpha / r (or / √r) times the user's scale.
    pub scale: f32,
    /// (layer, module index in `MODULES`) → (A (r × in), B (out × r)).
    pub matrices: HashMap<(usize, usize), (Vec<f32>, Vec<f32>)>,
}

impl Adapter {
    /// Read the adapter at `spec.path` for a model of `config`, whose linear weights have the
    /// shapes `weights::expected_tensors` gives. Every mismatch is an error naming the file.
    pub fn read(spec: &AdapterSpec, config: &ModelConfig) -> Result<Adapter> {
        let dir = &spec.path;
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| KilnError::io(&cfg_path, e))?;
        let cfg: Value = serde_json::from_str(&text)
            .map_err(|e| KilnError::model(&cfg_path, format!("not a valid adapter_config.json: {e}")))?;
        let bad = |m: String| KilnError::model(&cfg_path, m);
        let get = |k: &str| cfg.get(k).filter(|v| !v.is_null());
        match get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            other => return Err(bad(format!("peft_type {other:?}: kiln applies LORA adapters"))),
        }
        let rank = get("r").and_then(Value::as_u64).filter(|&r| r > 0).ok_or_else(|| bad("no positive `r`".into()))?;
        let alpha = get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
        let flag = |k: &str| get(k).and_then(Value::as_bool).unwrap_or(false);
        for (key, what) in
            [("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out weights"), ("use_qalora", "QA-LoRA")]
        {
            if flag(key) {
                return Err(bad(format!("`{key}: true`: {what} is not supported")));
            }
        }
        if let Some(b) = get("bias").and_then(Value::as_str).filter(|b| *b != "none") {
            return Err(bad(format!("bias `{b}`: adapters with biases are not supported")));
        }
        for key in ["modules_to_save", "layers_to_transform", "target_parameters"] {
            if get(key).is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
                return Err(bad(format!("`{key}` is not supported")));
            }
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if get(key).is_some_and(|v| v.as_object().is_none_or(|o| !o.is_empty())) {
                return Err(bad(format!("`{key}` (per-module ranks or alphas) is not supported")));
            }
        }
        let targets: Vec<String> = match get("target_modules") {
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
            Some(other) => return Err(bad(format!("target_modules {other}: kiln takes a list of module names"))),
            None => return Err(bad("no target_modules".into())),
        };
        let short: Vec<&str> = MODULES.iter().map(|m| m.rsplit('.').next().unwrap_or(m)).collect();
        if let Some(t) = targets.iter().find(|t| !short.contains(&t.as_str())) {
            return Err(bad(format!("unknown target module `{t}`: kiln adapts {}", short.join(", "))));
        }
        let scaling = if flag("use_rslora") { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 };

        let ckpt = Checkpoint::open_file(&dir.join("adapter_model.safetensors"))?;
        let expected = weights::expected_tensors(config);
        let mut halves: HashMap<(usize, usize), [Option<Vec<f32>>; 2]> = HashMap::new();
        for name in ckpt.names() {
            let path = TensorSource::path_of(&ckpt, &name);
            let err = |m: String| KilnError::model(&path, m);
            // base_model.model.<module>.lora_A[.default].weight
            let inner = name.strip_prefix("base_model.model.").unwrap_or(&name).replace(".default.", ".");
            let (module, half) = match (inner.strip_suffix(".lora_A.weight"), inner.strip_suffix(".lora_B.weight")) {
                (Some(m), _) => (m.to_string(), 0),
                (_, Some(m)) => (m.to_string(), 1),
                _ => return Err(err(format!("`{name}` is not a LoRA A or B matrix"))),
            };
            let layer_module = module
                .strip_prefix("model.layers.")
                .and_then(|r| r.split_once('.'))
                .and_then(|(l, m)| Some((l.parse::<usize>().ok()?, MODULES.iter().position(|x| *x == m)?)));
            let base = format!("{module}.weight");
            let (Some((layer, which)), Some(shape)) = (layer_module, expected.get(&base)) else {
                return Err(err(format!(
                    "`{name}` adapts `{module}`, which is not a linear layer of this model kiln can adapt"
                )));
            };
            if !targets.iter().any(|t| module.ends_with(&format!(".{t}"))) {
                return Err(err(format!("`{name}`: `{module}` is not among target_modules {targets:?}")));
            }
            let (dtype, got, bytes) = ckpt.tensor(&name)?;
            let (out, inp) = (shape[0], shape[1]);
            let want = if half == 0 { vec![rank as usize, inp] } else { vec![out, rank as usize] };
            if got != want {
                return Err(err(format!(
                    "`{name}` has shape {got:?}; rank {rank} on the base's {out} × {inp} `{base}` needs {want:?}"
                )));
            }
            let values = checkpoint::to_f32(dtype, bytes)
                .ok_or_else(|| err(format!("`{name}` is {dtype:?}; adapters are read as F32, F16 or BF16")))?;
            if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
                return Err(err(format!("`{name}` holds {bad}")));
            }
            halves.entry((layer, which)).or_default()[half] = Some(values);
        }
        let mut matrices = HashMap::new();
        for (key, [a, b]) in halves {
            let module = format!("model.layers.{}.{}", key.0, MODULES[key.1]);
            match (a, b) {
                (Some(a), Some(b)) => {
                    matrices.insert(key, (a, b));
                }
                _ => {
                    return Err(KilnError::model(
                        dir.join("adapter_model.safetensors"),
                        format!("`{module}` has only one of lora_A and lora_B"),
                    ))
                }
            }
        }
        if matrices.is_empty() {
            return Err(KilnError::model(dir, "the adapter holds no LoRA matrices"));
        }
        // Experts are not adapted: an adapter for `mlp.gate_proj` on an expert layer has no base.
        if let Some(moe) = &config.moe {
            if let Some((l, _)) = matrices.keys().find(|(l, m)| *m >= 4 && moe.sparse_layers[*l]) {
                return Err(KilnError::model(
                    dir,
                    format!("layer {l}'s MLP is a mixture of experts; kiln adapts no experts"),
                ));
            }
        }
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
        Ok(Adapter {
            name,
            path: dir.clone(),
            rank: rank as usize,
            scale: (scaling * spec.scale as f64) as f32,
            matrices,
        })
    }
}

/// The adapters of a model on the GPU: per (layer, module), every adapter that touches it.
#[derive(Default)]
pub struct Adapters {
    /// Name, rank and scale of each adapter; bit i of a token's mask is adapter i.
    pub list: Vec<(String, usize, f32)>,
    pub modules: HashMap<(usize, usize), LoraModule>,
}

impl Adapters {
    pub fn upload(gpu: &Gpu, weights: &Weights, adapters: &[Adapter]) -> Result<Adapters> {
        if adapters.len() > MAX_ADAPTERS {
            return Err(KilnError::Request(format!("{} adapters: kiln holds at most {MAX_ADAPTERS}", adapters.len())));
        }
        let mut names: Vec<&str> = adapters.iter().map(|a| a.name.as_str()).collect();
        names.sort();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(KilnError::Request(format!("two adapters are named `{}`", w[0])));
        }
        let mut keys: Vec<(usize, usize)> = adapters.iter().flat_map(|a| a.matrices.keys().copied()).collect();
        keys.sort();
        keys.dedup();
        let mut modules = HashMap::new();
        for key in keys {
            let layer = &weights.layers[key.0];
            let w = match (key.1, &layer.mlp) {
                (0, _) => &layer.q_proj,
                (1, _) => &layer.k_proj,
                (2, _) => &layer.v_proj,
                (3, _) => &layer.o_proj,
                (4, Mlp::Dense(d)) => &d.gate_proj,
                (5, Mlp::Dense(d)) => &d.up_proj,
                (6, Mlp::Dense(d)) => &d.down_proj,
                _ => return Err(KilnError::Request(format!("layer {} has no dense MLP to adapt", key.0))),
            };
            let per: Vec<Option<(&[f32], &[f32], f32)>> = adapters
                .iter()
                .map(|a| a.matrices.get(&key).map(|(x, y)| (x.as_slice(), y.as_slice(), a.scale)))
                .collect();
            let label = format!("model.layers.{}.{}", key.0, MODULES[key.1]);
            modules.insert(key, LoraModule::upload(gpu, &label, w.cols, w.rows, &per)?);
        }
        let list = adapters.iter().map(|a| (a.name.clone(), a.rank, a.scale)).collect();
        Ok(Adapters { list, modules })
    }

    /// The bit mask of the adapters named, or an error naming the unknown one.
    pub fn mask(&self, names: &[&str]) -> Result<u32> {
        names.iter().try_fold(0u32, |mask, n| {
            let i = self.list.iter().position(|(name, _, _)| name == n).ok_or_else(|| {
                let known: Vec<&str> = self.list.iter().map(|(n, _, _)| n.as_str()).collect();
                KilnError::Request(format!(
                    "no adapter `{n}`; loaded: {}",
                    if known.is_empty() { "none".into() } else { known.join(", ") }
                ))
            })?;
            Ok(mask | 1 << i)
        })
    }

    /// `mask` names only adapters this model holds.
    pub fn check(&self, mask: u32) -> Result<()> {
        let known = self.all();
        if mask & !known != 0 {
            return Err(KilnError::Request(format!("adapter mask {mask:#x}: the model holds {known:#x}")));
        }
        Ok(())
    }

    /// Every adapter at once.
    pub fn all(&self) -> u32 {
        if self.list.is_empty() {
            0
        } else {
            u32::MAX >> (32 - self.list.len())
        }
    }
}

/// Fold `adapters` into the base checkpoint at `base` (a Hugging Face directory of f32, f16 or
/// bf16 safetensors) and write a complete model directory at `out`: W' = W + Σ s·B·A in f64,
/// rounded once to the base's dtype; every other file copied. `out` must not exist.
pub fn merge(base: &Path, adapters: &[Adapter], out: &Path, force: bool) -> Result<usize> {
    if out.exists() {
        let same = std::fs::canonicalize(out).ok() == std::fs::canonicalize(base).ok();
        if same || adapters.iter().any(|a| std::fs::canonicalize(&a.path).ok() == std::fs::canonicalize(out).ok()) {
            return Err(KilnError::Request(format!("{} is an input; write the merged model elsewhere", out.display())));
        }
        if !force {
            return Err(KilnError::Request(format!("{} exists; pass --force to replace it", out.display())));
        }
    }
    let ckpt = Checkpoint::open(base)?;
    // Unchanged tensors are written straight from the base's memory map; only merged ones are
    // held in memory.
    let mut merged: Vec<(String, safetensors::Dtype, Vec<usize>, std::borrow::Cow<'_, [u8]>)> = Vec::new();
    let mut changed = 0;
    for name in ckpt.names() {
        let (dtype, shape, bytes) = ckpt.tensor(&name)?;
        let key = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.strip_suffix(".weight"))
            .and_then(|r| r.split_once('.'))
            .and_then(|(l, m)| Some((l.parse::<usize>().ok()?, MODULES.iter().position(|x| *x == m)?)));
        let deltas: Vec<(&[f32], &[f32], f32)> = match key {
            Some(k) => adapters
                .iter()
                .filter_map(|a| a.matrices.get(&k).map(|(x, y)| (x.as_slice(), y.as_slice(), a.scale)))
                .collect(),
            None => Vec::new(),
        };
        let st_dtype = match dtype {
            crate::gpu::DType::F32 => safetensors::Dtype::F32,
            crate::gpu::DType::F16 => safetensors::Dtype::F16,
            crate::gpu::DType::BF16 => safetensors::Dtype::BF16,
            other => return Err(KilnError::model(base, format!("`{name}` is {other:?}; merging needs float weights"))),
        };
        if deltas.is_empty() {
            merged.push((name, st_dtype, shape, bytes.into()));
            continue;
        }
        let w = checkpoint::to_f32(dtype, bytes).expect("float dtypes convert");
        let (rows, cols) = (shape[0], shape[1]);
        let mut out_values = Vec::with_capacity(w.len());
        for r in 0..rows {
            for c in 0..cols {
                let mut v = w[r * cols + c] as f64;
                for (a, b, s) in &deltas {
                    let rank = a.len() / cols;
                    let d: f64 = (0..rank).map(|j| b[r * rank + j] as f64 * a[j * cols + c] as f64).sum();
                    v += *s as f64 * d;
                }
                out_values.push(v as f32);
            }
        }
        let bytes: Vec<u8> = match st_dtype {
            safetensors::Dtype::F32 => bytemuck::cast_slice(&out_values).to_vec(),
            safetensors::Dtype::F16 => out_values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
            _ => out_values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        };
        changed += 1;
        merged.push((name, st_dtype, shape, bytes.into()));
    }
    // Write into a temporary directory beside `out`, then rename: no half-written model ever
    // carries the final name.
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = parent.join(format!(".{}.partial", out.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| KilnError::io(&tmp, e))?;
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = merged
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| KilnError::model(base, format!("`{n}`: {e}")))
        })
        .collect::<Result<_>>()?;
    let file = tmp.join("model.safetensors");
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(metadata), &file).map_err(|e| KilnError::model(&file, e.to_string()))?;
    for entry in std::fs::read_dir(base).map_err(|e| KilnError::io(base, e))? {
        let entry = entry.map_err(|e| KilnError::io(base, e))?;
        let n = entry.file_name().to_string_lossy().into_owned();
        let weights_file = n.ends_with(".safetensors") || n == "model.safetensors.index.json";
        if entry.path().is_file() && !weights_file {
            std::fs::copy(entry.path(), tmp.join(&n)).map_err(|e| KilnError::io(entry.path(), e))?;
        }
    }
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| KilnError::io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| KilnError::io(out, e))?;
    Ok(changed)
}
