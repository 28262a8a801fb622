//! GGUF reader: the header, metadata key/values and tensor directory of a llama.cpp model file
//! (versions 2 and 3), and the byte range of each tensor's data.
//!
//! Follows the format as ggml's `gguf.cpp` reads it and `docs/gguf.md` describes it:
//!
//! ```text
//! "GGUF"  u32 version  u64 n_tensors  u64 n_kv
//! n_kv    × { string key, u32 value_type, value }
//! n_tensors × { string name, u32 n_dims, u64 dims[n_dims] (innermost first), u32 ggml_type, u64 offset }
//! padding to `general.alignment` (default 32)
//! tensor data; each tensor at data_start + offset, offsets aligned
//! ```
//!
//! Everything is little-endian; a string is a u64 byte length and UTF-8 bytes; an array is a u32
//! element type, a u64 count and the elements. Version 1 (u32 counts) is refused with a clear
//! error.
//!
//! The bytes are untrusted: every count, length, offset and size is checked against the bytes
//! that remain, with checked arithmetic, before anything is allocated or sliced, so a crafted
//! file gets an error naming what is wrong and where, never a panic or a huge allocation.

use crate::quant;
use crate::{KilnError, Result};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Alignment of the data section and of every tensor offset when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The metadata key that overrides [`DEFAULT_ALIGNMENT`].
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// ggml tensors have at most four dimensions (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;

/// How deep arrays of arrays may nest. Real files use at most one level; the cap keeps a crafted
/// file of nested array headers from overflowing the stack of this recursive reader.
pub const MAX_ARRAY_DEPTH: usize = 8;

// ---------------------------------------------------------------------------------------------
// Tensor types

/// The ggml tensor types kiln can dequantise. Ids are ggml's `enum ggml_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
    BF16,
}

impl GgmlType {
    /// Every supported type, in id order.
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::BF16,
    ];

    /// The type with ggml id `id`; an error naming the id (and ggml's name for it, if it has
    /// one) when kiln cannot read it.
    pub fn from_id(id: u32) -> Result<GgmlType> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            _ => return Err(KilnError::Unsupported(unsupported_type_message(id))),
        })
    }

    /// ggml's id for this type.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// ggml's name for this type (`ggml_type_name`).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Elements per block (`ggml_blck_size`); 1 for the plain float types.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => quant::QK,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => quant::QK_K,
        }
    }

    /// Bytes per block (`ggml_type_size`).
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,  // d f16, 16 bytes of nibbles
            GgmlType::Q4_1 => 20,  // d, m f16, 16 bytes of nibbles
            GgmlType::Q5_0 => 22,  // d f16, qh u32, 16 bytes of nibbles
            GgmlType::Q5_1 => 24,  // d, m f16, qh u32, 16 bytes of nibbles
            GgmlType::Q8_0 => 34,  // d f16, 32 i8
            GgmlType::Q4_K => 144, // d, dmin f16, 12 bytes scales, 128 bytes nibbles
            GgmlType::Q5_K => 176, // d, dmin f16, 12 bytes scales, 32 bytes qh, 128 bytes nibbles
            GgmlType::Q6_K => 210, // 128 ql, 64 qh, 16 i8 scales, d f16
        }
    }

    /// Bytes of one row of `ne0` elements (`ggml_row_size`); an error when `ne0` is not a whole
    /// number of blocks or the size overflows.
    pub fn row_size(self, ne0: u64) -> Result<u64> {
        row_size(self, ne0).map_err(|m| KilnError::shape("ggml row size", m))
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn row_size(ty: GgmlType, ne0: u64) -> std::result::Result<u64, String> {
    let block = ty.block_size() as u64;
    if !ne0.is_multiple_of(block) {
        return Err(format!("a row of {ne0} elements is not a whole number of {ty} blocks of {block}"));
    }
    (ne0 / block)
        .checked_mul(ty.type_size() as u64)
        .ok_or_else(|| format!("a row of {ne0} {ty} elements overflows 64 bits"))
}

/// ggml's names for the type ids kiln does not read, so the error says what the file holds.
fn unsupported_type_message(id: u32) -> String {
    let name = match id {
        4 => Some("Q4_2, removed from ggml"),
        5 => Some("Q4_3, removed from ggml"),
        9 => Some("Q8_1"),
        10 => Some("Q2_K"),
        11 => Some("Q3_K"),
        15 => Some("Q8_K"),
        16 => Some("IQ2_XXS"),
        17 => Some("IQ2_XS"),
        18 => Some("IQ3_XXS"),
        19 => Some("IQ1_S"),
        20 => Some("IQ4_NL"),
        21 => Some("IQ3_S"),
        22 => Some("IQ2_S"),
        23 => Some("IQ4_XS"),
        24 => Some("I8"),
        25 => Some("I16"),
        26 => Some("I32"),
        27 => Some("I64"),
        28 => Some("F64"),
        29 => Some("IQ1_M"),
        31..=33 => Some("Q4_0_4_4/Q4_0_4_8/Q4_0_8_8, removed from ggml"),
        34 => Some("TQ1_0"),
        35 => Some("TQ2_0"),
        36..=38 => Some("IQ4_NL_4_4/IQ4_NL_4_8/IQ4_NL_8_8, removed from ggml"),
        39 => Some("MXFP4"),
        _ => None,
    };
    let supported: Vec<&str> = GgmlType::ALL.iter().map(|t| t.name()).collect();
    match name {
        Some(name) => format!("ggml tensor type {id} ({name}); kiln reads {}", supported.join(", ")),
        None => format!("unknown ggml tensor type id {id}; kiln reads {}", supported.join(", ")),
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata values

/// The type tag of a metadata value (`enum gguf_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    pub fn from_id(id: u32) -> Option<ValueType> {
        Some(match id {
            0 => ValueType::U8,
            1 => ValueType::I8,
            2 => ValueType::U16,
            3 => ValueType::I16,
            4 => ValueType::U32,
            5 => ValueType::I32,
            6 => ValueType::F32,
            7 => ValueType::Bool,
            8 => ValueType::String,
            9 => ValueType::Array,
            10 => ValueType::U64,
            11 => ValueType::I64,
            12 => ValueType::F64,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            ValueType::U8 => 0,
            ValueType::I8 => 1,
            ValueType::U16 => 2,
            ValueType::I16 => 3,
            ValueType::U32 => 4,
            ValueType::I32 => 5,
            ValueType::F32 => 6,
            ValueType::Bool => 7,
            ValueType::String => 8,
            ValueType::Array => 9,
            ValueType::U64 => 10,
            ValueType::I64 => 11,
            ValueType::F64 => 12,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ValueType::U8 => "u8",
            ValueType::I8 => "i8",
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::F32 => "f32",
            ValueType::Bool => "bool",
            ValueType::String => "string",
            ValueType::Array => "array",
            ValueType::U64 => "u64",
            ValueType::I64 => "i64",
            ValueType::F64 => "f64",
        }
    }

    /// The fewest bytes one value of this type occupies in the file: a string is at least its
    /// u64 length, an array at least its u32 type and u64 count. Used to refuse a count that
    /// cannot fit in the bytes left before allocating for it.
    fn min_encoded_size(self) -> usize {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
            ValueType::Array => 12,
        }
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array: all elements share one type, so they are stored unboxed (a 150k-token
/// vocabulary is one `Vec<String>`, its scores one `Vec<f32>`). Arrays may nest.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Any integer value, widened; `None` for floats, bools, strings and arrays.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// A short description for error messages: `u32`, `string`, `array of f32`.
    pub fn type_description(&self) -> String {
        match self {
            Value::Array(a) => format!("array of {}", a.element_type().name()),
            v => v.value_type().name().to_string(),
        }
    }
}

impl Array {
    pub fn element_type(&self) -> ValueType {
        match self {
            Array::U8(_) => ValueType::U8,
            Array::I8(_) => ValueType::I8,
            Array::U16(_) => ValueType::U16,
            Array::I16(_) => ValueType::I16,
            Array::U32(_) => ValueType::U32,
            Array::I32(_) => ValueType::I32,
            Array::F32(_) => ValueType::F32,
            Array::Bool(_) => ValueType::Bool,
            Array::String(_) => ValueType::String,
            Array::Array(_) => ValueType::Array,
            Array::U64(_) => ValueType::U64,
            Array::I64(_) => ValueType::I64,
            Array::F64(_) => ValueType::F64,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor directory

/// One entry of the tensor directory, as the file states it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order, innermost (contiguous) dimension first: a (rows, cols) row-major matrix is
    /// `[cols, rows]`.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements: the product of the dims.
    pub fn n_elements(&self) -> Result<u64> {
        n_elements(&self.dims).map_err(|m| KilnError::model(&self.name, m))
    }

    /// Bytes of data: rows × [`GgmlType::row_size`] of the innermost dimension.
    pub fn n_bytes(&self) -> Result<u64> {
        n_bytes(&self.dims, self.ggml_type).map_err(|m| KilnError::model(&self.name, m))
    }

    /// The dims in row-major order (outermost first), as PyTorch and Hugging Face write shapes.
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

fn n_elements(dims: &[u64]) -> std::result::Result<u64, String> {
    // A zero anywhere makes the product zero, however large the dims before it (a product taken
    // in order would overflow first: found by the gguf fuzz target, fuzz/regressions/gguf/).
    if dims.contains(&0) {
        return Ok(0);
    }
    dims.iter().try_fold(1u64, |n, &d| {
        n.checked_mul(d).ok_or_else(|| format!("element count of dims {dims:?} overflows 64 bits"))
    })
}

fn n_bytes(dims: &[u64], ty: GgmlType) -> std::result::Result<u64, String> {
    let Some((&ne0, outer)) = dims.split_first() else {
        return Err("tensor has no dimensions".to_string());
    };
    let rows = n_elements(outer)?;
    row_size(ty, ne0)?
        .checked_mul(rows)
        .ok_or_else(|| format!("byte size of {ty} tensor with dims {dims:?} overflows 64 bits"))
}

// ---------------------------------------------------------------------------------------------
// The file

/// A parsed GGUF file over its bytes: `B` is a memory map for [`GgufFile::open`], or any byte
/// container (`&[u8]`, `Vec<u8>`) for [`GgufFile::parse`].
pub struct GgufFile<B = Mmap> {
    bytes: B,
    /// Where the bytes came from, for error messages.
    source: String,
    version: u32,
    alignment: u64,
    /// Absolute file offset of the data section (end of the tensor directory, aligned).
    data_start: u64,
    pub metadata: BTreeMap<String, Value>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
}

impl<B> fmt::Debug for GgufFile<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("source", &self.source)
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("data_start", &self.data_start)
            .field("metadata keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile<Mmap> {
    /// Map `path` read-only and parse its header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| KilnError::io(path, e))?;
        // SAFETY: the map is read-only. Another process truncating or rewriting the file while
        // it is mapped could change tensor values or fault on access, which no Rust code can
        // prevent for a shared mapping; the header checks below never assume more than the
        // length the map had when it was made.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| KilnError::io(path, e))?;
        Self::parse_from(mmap, path.display().to_string())
    }

    /// Tell the OS it may drop the pages of `tensor`'s data (already uploaded), so resident
    /// memory stays near one tensor however large the file is.
    pub fn release(&self, tensor: &TensorInfo) {
        let Ok(data) = self.tensor_data(tensor) else { return };
        let offset = data.as_ptr() as usize - self.bytes.as_ptr() as usize;
        #[cfg(unix)]
        // SAFETY: the mapping is read-only and file-backed: dropping its pages only makes later
        // reads fault them in again from the file; the data is unchanged.
        unsafe {
            let _ = self.bytes.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, data.len());
        }
        #[cfg(not(unix))]
        let _ = offset;
    }
}

impl<B: AsRef<[u8]>> GgufFile<B> {
    /// Parse GGUF bytes held in memory. Errors name the source as `<gguf bytes>`.
    pub fn parse(bytes: B) -> Result<Self> {
        Self::parse_from(bytes, "<gguf bytes>".to_string())
    }

    /// Parse GGUF bytes; `source` names them in errors (usually the path).
    pub fn parse_from(bytes: B, source: String) -> Result<Self> {
        let header = parse_header(bytes.as_ref()).map_err(|m| KilnError::model(source.as_str(), m))?;
        Ok(GgufFile {
            bytes,
            source,
            version: header.version,
            alignment: header.alignment,
            data_start: header.data_start,
            metadata: header.metadata,
            tensors: header.tensors,
        })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_ref()
    }

    /// Where the bytes came from (the path, for [`GgufFile::open`]).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// 2 or 3 (they differ only in that 3 allows big-endian files, which kiln does not read).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// `general.alignment`, or 32.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// The tensor named `name`, if the file has one.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of `tensor`'s data, straight from the file. Bounds are checked again here,
    /// so this is safe on a `TensorInfo` from anywhere, not only from this file's directory.
    pub fn tensor_data(&self, tensor: &TensorInfo) -> Result<&[u8]> {
        let err = |m: String| KilnError::model(&self.source, format!("tensor `{}`: {m}", tensor.name));
        let n_bytes = n_bytes(&tensor.dims, tensor.ggml_type).map_err(err)?;
        let start = self
            .data_start
            .checked_add(tensor.offset)
            .ok_or_else(|| err(format!("offset {} overflows 64 bits", tensor.offset)))?;
        let end =
            start.checked_add(n_bytes).ok_or_else(|| err(format!("data end overflows 64 bits ({n_bytes} bytes)")))?;
        let bytes = self.bytes.as_ref();
        usize::try_from(start).ok().zip(usize::try_from(end).ok()).and_then(|(s, e)| bytes.get(s..e)).ok_or_else(|| {
            err(format!("data bytes {start}..{end} lie past the end of the file ({} bytes)", bytes.len()))
        })
    }

    /// `tensor`'s data dequantised to f32, in the file's element order.
    pub fn dequantize(&self, tensor: &TensorInfo) -> Result<Vec<f32>> {
        let data = self.tensor_data(tensor)?;
        let n = tensor
            .n_elements()
            .and_then(|n| {
                usize::try_from(n)
                    .map_err(|_| KilnError::model(&tensor.name, format!("{n} elements do not fit in memory")))
            })
            .map_err(|e| KilnError::model(&self.source, e.to_string()))?;
        quant::dequantize(tensor.ggml_type, data, n)
            .map_err(|e| KilnError::model(&self.source, format!("tensor `{}`: {e}", tensor.name)))
    }

    // -- metadata getters: each error names the key and what was found --------------------

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.metadata.get(key).ok_or_else(|| KilnError::model(&self.source, format!("metadata key `{key}` is missing")))
    }

    fn wrong_type(&self, key: &str, value: &Value, expected: &str) -> KilnError {
        KilnError::model(&self.source, format!("metadata `{key}` is {}, expected {expected}", value.type_description()))
    }

    /// An integer of any width whose value fits `T` (writers differ in the width they pick for
    /// the same key, e.g. `context_length` as u32 or u64).
    fn get_int<T: TryFrom<i128>>(&self, key: &str, expected: &str) -> Result<T> {
        let value = self.require(key)?;
        let wide = value.as_i128().ok_or_else(|| self.wrong_type(key, value, expected))?;
        T::try_from(wide)
            .map_err(|_| KilnError::model(&self.source, format!("metadata `{key}` = {wide} does not fit {expected}")))
    }

    /// Any integer value that fits a u32.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        self.get_int(key, "an integer fitting u32")
    }

    /// Any integer value that fits a u64.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get_int(key, "an integer fitting u64")
    }

    /// Any integer value that fits an i32.
    pub fn get_i32(&self, key: &str) -> Result<i32> {
        self.get_int(key, "an integer fitting i32")
    }

    /// Any integer value that fits an i64.
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        self.get_int(key, "an integer fitting i64")
    }

    /// An f32 value (f64 is refused rather than rounded silently).
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match self.require(key)? {
            Value::F32(v) => Ok(*v),
            v => Err(self.wrong_type(key, v, "f32")),
        }
    }

    /// An f32 or f64 value, widened.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        match self.require(key)? {
            Value::F32(v) => Ok(f64::from(*v)),
            Value::F64(v) => Ok(*v),
            v => Err(self.wrong_type(key, v, "f32 or f64")),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            Value::Bool(v) => Ok(*v),
            v => Err(self.wrong_type(key, v, "bool")),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.require(key)? {
            Value::String(v) => Ok(v),
            v => Err(self.wrong_type(key, v, "string")),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<&Array> {
        match self.require(key)? {
            Value::Array(a) => Ok(a),
            v => Err(self.wrong_type(key, v, "array")),
        }
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<&[String]> {
        match self.require(key)? {
            Value::Array(Array::String(v)) => Ok(v),
            v => Err(self.wrong_type(key, v, "array of string")),
        }
    }

    /// An array of f32 (e.g. `tokenizer.ggml.scores`).
    pub fn get_f32_array(&self, key: &str) -> Result<&[f32]> {
        match self.require(key)? {
            Value::Array(Array::F32(v)) => Ok(v),
            v => Err(self.wrong_type(key, v, "array of f32")),
        }
    }

    /// An array of i32 (e.g. `tokenizer.ggml.token_type`).
    pub fn get_i32_array(&self, key: &str) -> Result<&[i32]> {
        match self.require(key)? {
            Value::Array(Array::I32(v)) => Ok(v),
            v => Err(self.wrong_type(key, v, "array of i32")),
        }
    }

    /// `general.architecture` (`llama`, `qwen2`, ...).
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// Everything the header says, before it is attached to its bytes.
struct Header {
    version: u32,
    alignment: u64,
    data_start: u64,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
}

/// Parser errors are plain messages; [`GgufFile::parse_from`] prefixes the source.
type ParseResult<T> = std::result::Result<T, String>;

fn parse_header(bytes: &[u8]) -> ParseResult<Header> {
    let mut r = Reader { bytes, pos: 0 };

    let magic: [u8; 4] = r.array("magic")?;
    if magic != GGUF_MAGIC {
        return Err(format!("not a GGUF file: starts with {magic:02x?}, expected \"GGUF\""));
    }
    let version = r.u32("version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err("GGUF version 1 is not supported (only versions 2 and 3); \
                 convert the model again with a current llama.cpp"
                .to_string())
        }
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err(format!("big-endian GGUF (version {}) is not supported", v.swap_bytes()))
        }
        v => return Err(format!("unsupported GGUF version {v} (only 2 and 3)")),
    }

    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("metadata count")?;

    // Smallest possible key/value: empty key (u64 length), u32 type, one-byte value.
    let n_kv = r.count(n_kv, 8 + 4 + 1, "metadata entries")?;
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key_at = r.pos;
        let key = r.string_strict(&format!("metadata key #{i}"))?;
        let value = r.value(&key, 0)?;
        if metadata.contains_key(&key) {
            return Err(format!("duplicate metadata key `{key}` at byte {key_at}"));
        }
        metadata.insert(key, value);
    }

    let alignment = match metadata.get(ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some(v) => {
            let a = v
                .as_i128()
                .ok_or_else(|| format!("`{ALIGNMENT_KEY}` is {}, expected an integer", v.type_description()))?;
            match u64::try_from(a) {
                Ok(a) if a.is_power_of_two() => a,
                _ => return Err(format!("`{ALIGNMENT_KEY}` = {a} is not a non-zero power of two")),
            }
        }
    };

    // Smallest possible tensor info: empty name, u32 n_dims, u32 type, u64 offset.
    let n_tensors = r.count(n_tensors, 8 + 4 + 4 + 8, "tensor infos")?;
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors);
    let mut names = std::collections::HashSet::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let info_at = r.pos;
        let name = r.string_strict(&format!("name of tensor #{i}"))?;
        let what = |field: &str| format!("{field} of tensor `{name}`");
        let n_dims = r.u32(&what("n_dims"))?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(format!("tensor `{name}` has {n_dims} dimensions (ggml allows 1 to {MAX_DIMS})"));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = r.u64(&what("dims"))?;
            // ggml holds dims as int64_t.
            if d > i64::MAX as u64 {
                return Err(format!("tensor `{name}` has dimension {d}, past i64::MAX"));
            }
            dims.push(d);
        }
        let type_id = r.u32(&what("type"))?;
        let ggml_type = GgmlType::from_id(type_id)
            .map_err(|_| format!("tensor `{name}`: {}", unsupported_type_message(type_id)))?;
        let offset = r.u64(&what("offset"))?;
        // A set, not a scan of `tensors`: a crafted file may hold many thousands of infos.
        if !names.insert(name.clone()) {
            return Err(format!("duplicate tensor name `{name}` at byte {info_at}"));
        }
        tensors.push(TensorInfo { name, dims, ggml_type, offset });
    }

    let data_start =
        align_up(r.pos as u64, alignment).ok_or_else(|| "data section start overflows 64 bits".to_string())?;
    let file_len = bytes.len() as u64;

    // Each tensor's range must lie in the file; then no two may overlap.
    let mut ranges: Vec<(u64, u64, usize)> = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        let name = &t.name;
        let size = n_bytes(&t.dims, t.ggml_type).map_err(|m| format!("tensor `{name}`: {m}"))?;
        if !t.offset.is_multiple_of(alignment) {
            return Err(format!("tensor `{name}` offset {} is not a multiple of the alignment {alignment}", t.offset));
        }
        let start = data_start
            .checked_add(t.offset)
            .ok_or_else(|| format!("tensor `{name}` offset {} overflows 64 bits", t.offset))?;
        let end = start.checked_add(size).ok_or_else(|| format!("tensor `{name}` end overflows 64 bits"))?;
        if end > file_len {
            return Err(format!(
                "tensor `{name}` data (bytes {start}..{end}, {} {size} bytes) runs past the end \
                 of the file ({file_len} bytes)",
                t.ggml_type
            ));
        }
        if size > 0 {
            ranges.push((start, end, i));
        }
    }
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        if let [(_, end_a, a), (start_b, _, b)] = *pair {
            if start_b < end_a {
                let name = |i: usize| tensors.get(i).map_or("?", |t| t.name.as_str());
                return Err(format!("tensors `{}` and `{}` overlap in the data section", name(a), name(b)));
            }
        }
    }

    Ok(Header { version, alignment, data_start, metadata, tensors })
}

/// `pos` rounded up to a multiple of `alignment` (a power of two); `None` on overflow.
fn align_up(pos: u64, alignment: u64) -> Option<u64> {
    Some(pos.checked_add(alignment - 1)? & !(alignment - 1))
}

/// A cursor over the untrusted bytes. Every read checks the bytes that remain first.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, what: &str) -> ParseResult<&'a [u8]> {
        let slice = self.pos.checked_add(n).and_then(|end| self.bytes.get(self.pos..end)).ok_or_else(|| {
            format!("truncated: {what} needs {n} bytes at byte {}, but only {} remain", self.pos, self.remaining())
        })?;
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> ParseResult<[u8; N]> {
        let slice = self.take(N, what)?;
        // `take` returned exactly N bytes, so the conversion cannot fail.
        slice.try_into().map_err(|_| format!("internal: short read for {what}"))
    }

    fn u8(&mut self, what: &str) -> ParseResult<u8> {
        Ok(u8::from_le_bytes(self.array(what)?))
    }
    fn i8(&mut self, what: &str) -> ParseResult<i8> {
        Ok(i8::from_le_bytes(self.array(what)?))
    }
    fn u16(&mut self, what: &str) -> ParseResult<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn i16(&mut self, what: &str) -> ParseResult<i16> {
        Ok(i16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> ParseResult<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn i32(&mut self, what: &str) -> ParseResult<i32> {
        Ok(i32::from_le_bytes(self.array(what)?))
    }
    fn f32(&mut self, what: &str) -> ParseResult<f32> {
        Ok(f32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> ParseResult<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn i64(&mut self, what: &str) -> ParseResult<i64> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }
    fn f64(&mut self, what: &str) -> ParseResult<f64> {
        Ok(f64::from_le_bytes(self.array(what)?))
    }

    fn bool(&mut self, what: &str) -> ParseResult<bool> {
        let at = self.pos;
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("{what}: bool byte {b} at byte {at} is neither 0 nor 1")),
        }
    }

    /// A count read from the file, refused unless `count` items of at least `min_size` bytes
    /// each fit in what remains, so the caller may allocate `count` items.
    fn count(&mut self, count: u64, min_size: usize, what: &str) -> ParseResult<usize> {
        let fits =
            usize::try_from(count).ok().filter(|&n| n.checked_mul(min_size).is_some_and(|b| b <= self.remaining()));
        fits.ok_or_else(|| {
            format!("{count} {what} cannot fit in the {} bytes left after byte {}", self.remaining(), self.pos)
        })
    }

    fn string_bytes(&mut self, what: &str) -> ParseResult<&'a [u8]> {
        let at = self.pos;
        // `what` is formatted only on error: this runs once per vocabulary entry.
        let len = self.u64(what)?;
        let len = usize::try_from(len).ok().filter(|&n| n <= self.remaining()).ok_or_else(|| {
            format!("{what}: string of {len} bytes at byte {at} runs past the end ({} bytes remain)", self.remaining())
        })?;
        self.take(len, what)
    }

    /// A string that must be valid UTF-8: keys and tensor names, which code looks up by name.
    fn string_strict(&mut self, what: &str) -> ParseResult<String> {
        let at = self.pos;
        let raw = self.string_bytes(what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| format!("{what} at byte {at} is not UTF-8"))
    }

    /// A string value. NOTE: invalid UTF-8 is replaced (U+FFFD) rather than refused, as
    /// llama.cpp does not validate string values either; gguf-py always writes UTF-8.
    fn string_value(&mut self, what: &str) -> ParseResult<String> {
        let raw = self.string_bytes(what)?;
        Ok(String::from_utf8_lossy(raw).into_owned())
    }

    fn value_type(&mut self, what: &str) -> ParseResult<ValueType> {
        let at = self.pos;
        let id = self.u32(what)?;
        ValueType::from_id(id).ok_or_else(|| format!("{what}: unknown metadata value type {id} at byte {at}"))
    }

    /// A tagged value of metadata `key`; `depth` counts enclosing arrays.
    fn value(&mut self, key: &str, depth: usize) -> ParseResult<Value> {
        let what = format!("value of `{key}`");
        let ty = self.value_type(&format!("type of `{key}`"))?;
        Ok(match ty {
            ValueType::U8 => Value::U8(self.u8(&what)?),
            ValueType::I8 => Value::I8(self.i8(&what)?),
            ValueType::U16 => Value::U16(self.u16(&what)?),
            ValueType::I16 => Value::I16(self.i16(&what)?),
            ValueType::U32 => Value::U32(self.u32(&what)?),
            ValueType::I32 => Value::I32(self.i32(&what)?),
            ValueType::F32 => Value::F32(self.f32(&what)?),
            ValueType::Bool => Value::Bool(self.bool(&what)?),
            ValueType::String => Value::String(self.string_value(&what)?),
            ValueType::U64 => Value::U64(self.u64(&what)?),
            ValueType::I64 => Value::I64(self.i64(&what)?),
            ValueType::F64 => Value::F64(self.f64(&what)?),
            ValueType::Array => Value::Array(self.array_value(key, depth + 1)?),
        })
    }

    /// An array body (element type, count, elements) of metadata `key`.
    fn array_value(&mut self, key: &str, depth: usize) -> ParseResult<Array> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(format!("`{key}`: arrays nested more than {MAX_ARRAY_DEPTH} deep at byte {}", self.pos));
        }
        let what = format!("element of `{key}`");
        let ty = self.value_type(&format!("element type of `{key}`"))?;
        let count = self.u64(&format!("length of `{key}`"))?;
        let n = self.count(count, ty.min_encoded_size(), &format!("elements of `{key}`"))?;

        /// `n` elements read by `read`, allocated only after `count` proved they can fit.
        fn many<'a, T>(
            r: &mut Reader<'a>,
            n: usize,
            mut read: impl FnMut(&mut Reader<'a>) -> ParseResult<T>,
        ) -> ParseResult<Vec<T>> {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read(r)?);
            }
            Ok(v)
        }

        Ok(match ty {
            ValueType::U8 => Array::U8(many(self, n, |r| r.u8(&what))?),
            ValueType::I8 => Array::I8(many(self, n, |r| r.i8(&what))?),
            ValueType::U16 => Array::U16(many(self, n, |r| r.u16(&what))?),
            ValueType::I16 => Array::I16(many(self, n, |r| r.i16(&what))?),
            ValueType::U32 => Array::U32(many(self, n, |r| r.u32(&what))?),
            ValueType::I32 => Array::I32(many(self, n, |r| r.i32(&what))?),
            ValueType::F32 => Array::F32(many(self, n, |r| r.f32(&what))?),
            ValueType::Bool => Array::Bool(many(self, n, |r| r.bool(&what))?),
            ValueType::String => Array::String(many(self, n, |r| r.string_value(&what))?),
            ValueType::U64 => Array::U64(many(self, n, |r| r.u64(&what))?),
            ValueType::I64 => Array::I64(many(self, n, |r| r.i64(&what))?),
            ValueType::F64 => Array::F64(many(self, n, |r| r.f64(&what))?),
            ValueType::Array => Array::Array(many(self, n, |r| r.array_value(key, depth + 1))?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_sizes_match_ggml() {
        let expected = [
            (GgmlType::F32, 1, 4),
            (GgmlType::F16, 1, 2),
            (GgmlType::Q4_0, 32, 18),
            (GgmlType::Q4_1, 32, 20),
            (GgmlType::Q5_0, 32, 22),
            (GgmlType::Q5_1, 32, 24),
            (GgmlType::Q8_0, 32, 34),
            (GgmlType::Q4_K, 256, 144),
            (GgmlType::Q5_K, 256, 176),
            (GgmlType::Q6_K, 256, 210),
            (GgmlType::BF16, 1, 2),
        ];
        for (ty, block, size) in expected {
            assert_eq!((ty.block_size(), ty.type_size()), (block, size), "{ty}");
            assert_eq!(GgmlType::from_id(ty.id()).ok(), Some(ty));
        }
    }

    #[test]
    fn unknown_type_ids_are_named() {
        let e = GgmlType::from_id(10).unwrap_err().to_string();
        assert!(e.contains("10") && e.contains("Q2_K"), "{e}");
        let e = GgmlType::from_id(999).unwrap_err().to_string();
        assert!(e.contains("999"), "{e}");
    }

    #[test]
    fn row_size_needs_whole_blocks() {
        assert_eq!(GgmlType::Q4_0.row_size(64).ok(), Some(36));
        assert_eq!(GgmlType::Q6_K.row_size(512).ok(), Some(420));
        assert!(GgmlType::Q4_K.row_size(255).is_err());
        assert!(GgmlType::F32.row_size(u64::MAX).is_err());
    }

    #[test]
    fn align_up_rounds_to_power_of_two() {
        assert_eq!(align_up(0, 32), Some(0));
        assert_eq!(align_up(1, 32), Some(32));
        assert_eq!(align_up(64, 32), Some(64));
        assert_eq!(align_up(u64::MAX, 32), None);
    }

    #[test]
    fn count_refuses_what_cannot_fit() {
        let bytes = [0u8; 16];
        let mut r = Reader { bytes: &bytes, pos: 0 };
        assert_eq!(r.count(2, 8, "x"), Ok(2));
        assert!(r.count(3, 8, "x").is_err());
        assert!(r.count(1 << 60, 8, "x").is_err());
        assert!(r.count(u64::MAX, 1, "x").is_err());
    }
}
