//! Hugging Face safetensors checkpoints: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Files are memory-mapped; every header is parsed and its
//! offsets bounds-checked by the `safetensors` crate before any tensor is touched, so a
//! truncated or crafted file is an error naming it, never a panic or an out-of-bounds read.

use crate::gpu::DType;
use crate::{KilnError, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// What a tensor is, without its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Index into `Checkpoint::files`.
    file: usize,
    /// Byte range of the data within that file (checked against the file size at open).
    range: std::ops::Range<usize>,
}

struct Shard {
    path: PathBuf,
    data: Data,
}

/// A shard's bytes: a file mapped into memory, or (for fuzzing and tests) bytes already read.
enum Data {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Data {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Data::Mapped(m) => m,
            Data::Owned(v) => v,
        }
    }
}

/// All tensors of a checkpoint, by name.
pub struct Checkpoint {
    files: Vec<Shard>,
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl Checkpoint {
    /// Open `dir/model.safetensors` or the shards of `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| KilnError::io(&index, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| KilnError::model(&index, format!("not valid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| KilnError::model(&index, "no `weight_map` object"))?;
            let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            files.sort();
            files.dedup();
            for f in &files {
                if f.contains('/') || f.contains('\\') || f.contains("..") {
                    return Err(KilnError::model(&index, format!("shard name `{f}` is not a plain file name")));
                }
            }
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            return Err(KilnError::model(dir, "no model.safetensors or model.safetensors.index.json"));
        };

        let mut checkpoint = Checkpoint { files: Vec::new(), tensors: BTreeMap::new() };
        for path in paths {
            checkpoint.map_shard(path)?;
        }
        Ok(checkpoint)
    }

    /// One safetensors file (a LoRA adapter's `adapter_model.safetensors`).
    pub fn open_file(path: &Path) -> Result<Checkpoint> {
        let mut checkpoint = Checkpoint { files: Vec::new(), tensors: BTreeMap::new() };
        checkpoint.map_shard(path.to_path_buf())?;
        Ok(checkpoint)
    }

    fn map_shard(&mut self, path: PathBuf) -> Result<()> {
        let file = std::fs::File::open(&path).map_err(|e| KilnError::io(&path, e))?;
        // SAFETY: the map is read-only; a file changed under us by another process could
        // change tensor values but not break memory safety of the header checks below,
        // which copy what they need.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| KilnError::io(&path, e))?;
        self.add_shard(path, Data::Mapped(mmap))
    }

    /// A checkpoint of one safetensors file already in memory, named `path` in errors (the
    /// fuzz target's entry point).
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Checkpoint> {
        let mut checkpoint = Checkpoint { files: Vec::new(), tensors: BTreeMap::new() };
        checkpoint.add_shard(path.to_path_buf(), Data::Owned(bytes))?;
        Ok(checkpoint)
    }

    fn add_shard(&mut self, path: PathBuf, data: Data) -> Result<()> {
        let st = SafeTensors::deserialize(&data)
            .map_err(|e| KilnError::model(&path, format!("malformed safetensors file: {e}")))?;
        let file = self.files.len();
        for (name, view) in st.tensors() {
            let start = view.data().as_ptr() as usize - data.as_ptr() as usize;
            let range = start..start + view.data().len();
            let info = TensorInfo { dtype: view.dtype(), shape: view.shape().to_vec(), file, range };
            if self.tensors.insert(name.clone(), info).is_some() {
                return Err(KilnError::model(&path, format!("tensor `{name}` appears in more than one shard")));
            }
        }
        self.files.push(Shard { path, data });
        Ok(())
    }

    /// Path of the file holding `name`.
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.tensors.get(name).map(|t| self.files[t.file].path.as_path())
    }

    /// The raw little-endian bytes of `name`, straight from the map.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let info =
            self.tensors.get(name).ok_or_else(|| KilnError::model("checkpoint", format!("no tensor `{name}`")))?;
        Ok(&self.files[info.file].data[info.range.clone()])
    }

    /// Tell the OS it may drop the pages of `name` (already uploaded), so resident memory
    /// stays near one tensor however large the checkpoint is.
    pub fn release(&self, name: &str) {
        let Some(info) = self.tensors.get(name) else {
            return;
        };
        #[cfg(unix)]
        if let Data::Mapped(mmap) = &self.files[info.file].data {
            // SAFETY: the mapping is a read-only, file-backed map: dropping its pages only makes
            // later reads fault them in again from the file; the data is unchanged.
            unsafe {
                let _ =
                    mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, info.range.start, info.range.len());
            }
        }
        #[cfg(not(unix))]
        let _ = info;
    }
}

/// Tensor data by Hugging Face name, from a safetensors checkpoint or a GGUF file.
pub trait TensorSource {
    /// Every tensor name the file holds, as a Hugging Face name where it maps to one.
    fn names(&self) -> Vec<String>;
    /// Storage type, shape (rows, cols) or (n), and the raw bytes of `name`.
    fn tensor(&self, name: &str) -> Result<(DType, Vec<usize>, &[u8])>;
    /// The file that holds `name`, for messages.
    fn path_of(&self, name: &str) -> PathBuf;
    /// The data of `name` has been uploaded: its pages may go.
    fn release(&self, name: &str);
}

impl TensorSource for Checkpoint {
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn tensor(&self, name: &str) -> Result<(DType, Vec<usize>, &[u8])> {
        let info =
            self.tensors.get(name).ok_or_else(|| KilnError::model("checkpoint", format!("no tensor `{name}`")))?;
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                return Err(KilnError::model(
                    &self.files[info.file].path,
                    format!("tensor `{name}` has dtype {other:?}; kiln loads F32, F16 and BF16"),
                ))
            }
        };
        Ok((dtype, info.shape.clone(), self.bytes(name)?))
    }

    fn path_of(&self, name: &str) -> PathBuf {
        Checkpoint::path_of(self, name).map(Path::to_path_buf).unwrap_or_default()
    }

    fn release(&self, name: &str) {
        Checkpoint::release(self, name)
    }
}

/// Convert a float vector (norm weight, bias) to f32; block formats are not used for vectors.
pub fn to_f32(dtype: DType, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}

/// Check a source against the tensors a config implies: a missing, extra or mis-shaped tensor,
/// or one of a type kiln cannot read, is an error naming it, before anything is uploaded.
/// Returns (total, largest) bytes of the tensors that will be uploaded.
pub fn check_tensors(
    src: &dyn TensorSource,
    expected: &HashMap<String, Vec<usize>>,
    origin: &Path,
) -> Result<(u64, u64)> {
    let names = src.names();
    let present: std::collections::HashSet<&String> = names.iter().collect();
    let mut missing: Vec<&String> = expected.keys().filter(|n| !present.contains(n)).collect();
    missing.sort();
    if let Some(name) = missing.first() {
        return Err(KilnError::model(origin, format!("missing tensor `{name}` ({} missing in all)", missing.len())));
    }
    let (mut total, mut largest) = (0u64, 0u64);
    for name in &names {
        let path = src.path_of(name);
        match expected.get(name) {
            // Non-parameter buffers some exporters keep; they are recomputed here.
            None if name.ends_with("rotary_emb.inv_freq") => {}
            None => return Err(KilnError::model(path, format!("unexpected tensor `{name}` for this config"))),
            Some(shape) => {
                let (_, actual, bytes) = src.tensor(name)?;
                total += bytes.len() as u64;
                largest = largest.max(bytes.len() as u64);
                if *shape != actual {
                    return Err(KilnError::model(
                        path,
                        format!("tensor `{name}` has shape {actual:?}, config implies {shape:?}"),
                    ));
                }
            }
        }
    }
    Ok((total, largest))
}
