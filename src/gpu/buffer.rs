//! Buffers: allocation with typed OOM errors, uploads, readback, and `Weight`, a matrix that
//! may be larger than one storage binding and is then split into row chunks.

use super::{ErrorScope, Gpu};
use crate::error::{KilnError, Result};

/// Element type of a weight matrix as stored on the GPU: the checkpoint's own encoding, never
/// expanded (`shaders/weights.wgsl` decodes it inside the kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    /// IEEE half, two per u32 word, read with `unpack2x16float`.
    F16,
    /// bfloat16 (the top half of an f32), two per u32 word: kept as stored in checkpoints.
    BF16,
    /// GGUF block formats (ggml-quants.c), blocks kept byte for byte.
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4K,
    Q5K,
    Q6K,
}

impl DType {
    /// (elements, bytes) of one block: a single element for the float types.
    pub fn block(self) -> (u64, u64) {
        match self {
            DType::F32 => (1, 4),
            DType::F16 | DType::BF16 => (1, 2),
            DType::Q8_0 => (32, 34),
            DType::Q4_0 => (32, 18),
            DType::Q4_1 => (32, 20),
            DType::Q5_0 => (32, 22),
            DType::Q5_1 => (32, 24),
            DType::Q4K => (256, 144),
            DType::Q5K => (256, 176),
            DType::Q6K => (256, 210),
        }
    }

    /// Bytes of `elements` elements (a whole number of blocks).
    pub fn bytes_for(self, elements: u64) -> u64 {
        let (n, b) = self.block();
        elements / n * b
    }

    /// Value of the kernels' `W_DTYPE` override constant (weights.wgsl).
    pub fn w_dtype(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
            DType::Q8_0 => 3,
            DType::Q4_0 => 4,
            DType::Q4_1 => 5,
            DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q4K => 8,
            DType::Q5K => 9,
            DType::Q6K => 10,
        }
    }
}

/// Rows `first_row .. first_row + rows` of a weight matrix, in one buffer.
#[derive(Debug)]
pub struct WeightChunk {
    pub buffer: wgpu::Buffer,
    pub first_row: u32,
    pub rows: u32,
}

/// A row-major (rows × cols) matrix, as checkpoints store linear weights (out × in, so a
/// projection computes y = x·Wᵀ). Split into row chunks when it is larger than one binding
/// (a 151936 × 896 f16 lm-head is 272 MB; lavapipe binds at most 128 MiB).
#[derive(Debug)]
pub struct Weight {
    pub name: String,
    pub rows: u32,
    pub cols: u32,
    pub dtype: DType,
    pub chunks: Vec<WeightChunk>,
}

impl Weight {
    /// Upload raw little-endian element bytes (f32 or f16) of a (rows × cols) matrix.
    pub fn upload(gpu: &Gpu, name: &str, rows: u32, cols: u32, dtype: DType, bytes: &[u8]) -> Result<Weight> {
        Self::upload_stacked(gpu, name, 1, rows, cols, dtype, bytes)
    }

    /// Upload `count` matrices of (rows × cols), stacked into one (count·rows × cols) matrix (a
    /// layer's experts). Chunks hold whole matrices, so a kernel that picks one by index finds
    /// all of its rows in one binding.
    pub fn upload_stacked(
        gpu: &Gpu,
        name: &str,
        count: u32,
        rows: u32,
        cols: u32,
        dtype: DType,
        bytes: &[u8],
    ) -> Result<Weight> {
        // One matrix splits anywhere between rows; a stack only between its matrices.
        let group = if count == 1 { 1 } else { rows };
        let rows = count
            .checked_mul(rows)
            .ok_or_else(|| KilnError::shape("weight upload", format!("{name}: {count} matrices of {rows} rows")))?;
        let block = dtype.block().0;
        if !(cols as u64).is_multiple_of(block) {
            return Err(KilnError::shape(
                "weight upload",
                format!("{name}: {cols} columns are not a whole number of {dtype:?} blocks of {block}"),
            ));
        }
        let expected = dtype.bytes_for(rows as u64 * cols as u64);
        if bytes.len() as u64 != expected {
            return Err(KilnError::shape(
                "weight upload",
                format!("{name}: {rows}×{cols} {dtype:?} needs {expected} bytes, got {}", bytes.len()),
            ));
        }
        let row_bytes = dtype.bytes_for(cols as u64) as usize;
        Self::build(gpu, name, rows, cols, dtype, group, |label, first, n| {
            let data = &bytes[first as usize * row_bytes..(first + n) as usize * row_bytes];
            gpu.upload_padded(
                label,
                data,
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            )
        })
    }

    /// A zero-filled matrix, written later (streamed loads) or used as is (benchmarks).
    pub fn zeroed(gpu: &Gpu, name: &str, rows: u32, cols: u32, dtype: DType) -> Result<Weight> {
        Self::zeroed_stacked(gpu, name, 1, rows, cols, dtype)
    }

    /// `count` zero-filled (rows × cols) matrices stacked as `upload_stacked` stacks them.
    pub fn zeroed_stacked(gpu: &Gpu, name: &str, count: u32, rows: u32, cols: u32, dtype: DType) -> Result<Weight> {
        let row_bytes = dtype.bytes_for(cols as u64);
        let (group, rows) = (if count == 1 { 1 } else { rows }, count.saturating_mul(rows));
        Self::build(gpu, name, rows, cols, dtype, group, |label, _, n| gpu.buffer(label, n as u64 * row_bytes))
    }

    /// Split the rows into chunks no larger than one storage binding, each a whole number of
    /// `group` rows; `make(label, first, n)` creates the buffer of rows first .. first + n. Every
    /// chunk starts a buffer, so even an f16 matrix with odd `cols` starts each chunk on a u32 word.
    #[allow(clippy::too_many_arguments)]
    fn build(
        gpu: &Gpu,
        name: &str,
        rows: u32,
        cols: u32,
        dtype: DType,
        group: u32,
        mut make: impl FnMut(&str, u32, u32) -> Result<wgpu::Buffer>,
    ) -> Result<Weight> {
        let group_bytes = dtype.bytes_for(cols as u64 * group.max(1) as u64).max(1);
        // Leave room for the 16-byte padding of the last row.
        let limit = gpu.max_binding.saturating_sub(16);
        if group_bytes > limit {
            let what = if group <= 1 { "one row" } else { "one stacked matrix" };
            return Err(KilnError::Unsupported(format!(
                "{name}: {what} is {group_bytes} bytes, more than the device's {} byte storage binding",
                gpu.max_binding
            )));
        }
        let group = group.max(1);
        let rows_per_chunk = ((limit / group_bytes).min(u32::MAX as u64) as u32).saturating_mul(group).min(rows.max(1));
        let mut chunks = Vec::new();
        let mut first = 0u32;
        while first < rows {
            let n = rows_per_chunk.min(rows - first);
            let label = if n == rows { name.to_string() } else { format!("{name}[{first}..{}]", first + n) };
            chunks.push(WeightChunk { buffer: make(&label, first, n)?, first_row: first, rows: n });
            first += n;
        }
        Ok(Weight { name: name.into(), rows, cols, dtype, chunks })
    }

    pub fn bytes(&self) -> u64 {
        self.dtype.bytes_for(self.rows as u64 * self.cols as u64)
    }
}

/// Storage buffers are bound as arrays of vec4, so every size is padded to 16 bytes.
pub(crate) fn padded(size: u64) -> u64 {
    size.div_ceil(16).max(1) * 16
}

impl Gpu {
    /// A zero-filled storage buffer that can also be copied to and from.
    pub fn buffer(&self, label: &str, size: u64) -> Result<wgpu::Buffer> {
        self.alloc(
            label,
            padded(size),
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        )
    }

    fn alloc(&self, label: &str, size: u64, usage: wgpu::BufferUsages) -> Result<wgpu::Buffer> {
        if size > self.limits.max_buffer_size {
            return Err(KilnError::OutOfMemory {
                kernel: label.into(),
                message: format!("{size} bytes exceeds the device's max buffer size {}", self.limits.max_buffer_size),
            });
        }
        let scope = ErrorScope::push(self);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        });
        scope.pop(label)?;
        Ok(buffer)
    }

    /// A storage buffer holding `data` (padded with zeros to 16 bytes).
    pub fn upload(&self, label: &str, data: &[u8]) -> Result<wgpu::Buffer> {
        self.upload_padded(
            label,
            data,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        )
    }

    fn upload_padded(&self, label: &str, data: &[u8], usage: wgpu::BufferUsages) -> Result<wgpu::Buffer> {
        let size = padded(data.len() as u64);
        let scope = ErrorScope::push(self);
        let buffer = self.buffer_with(label, data, size, usage);
        scope.pop(label)?;
        Ok(buffer)
    }

    /// A uniform buffer holding one params struct.
    pub fn uniform<T: bytemuck::Pod>(&self, label: &str, params: &T) -> wgpu::Buffer {
        let data = bytemuck::bytes_of(params);
        self.buffer_with(
            label,
            data,
            padded(data.len() as u64),
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )
    }

    /// A buffer of `size` bytes (a multiple of 4) starting with `data`, the rest zero. wgpu's own
    /// `create_buffer_init` panics when the buffer cannot be mapped (a lost device); here the
    /// buffer is left unfilled, and the loss is reported by the next scope or submission.
    fn buffer_with(&self, label: &str, data: &[u8], size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: true,
        });
        if let Ok(mut view) = buffer.get_mapped_range_mut(..) {
            view.slice(..data.len()).copy_from_slice(data);
        }
        buffer.unmap();
        buffer
    }

    /// Copy `bytes` bytes from the start of `buffer` back to the host. Waits for the GPU.
    pub fn read_bytes(&self, buffer: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        // On a lost device the map fails; the loss is the error to report.
        let failed = |message: String| {
            self.health.lost().unwrap_or_else(|| KilnError::Readback { what: "a GPU buffer".into(), message })
        };
        let size = bytes.div_ceil(4) * 4;
        let staging =
            self.alloc("readback staging", size.max(4), wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST)?;
        let mut encoder = self.encoder("readback");
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, size);
        self.submit_and_wait("readback", encoder)?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| failed(e.to_string()))?;
        rx.recv().map_err(|e| failed(e.to_string()))?.map_err(|e| failed(e.to_string()))?;
        let view = staging.get_mapped_range(..).map_err(|e| failed(format!("{e:?}")))?;
        let mut out = view.to_vec();
        out.truncate(bytes as usize);
        Ok(out)
    }

    pub fn read_f32(&self, buffer: &wgpu::Buffer, count: usize) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(buffer, count as u64 * 4)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    pub fn read_u32(&self, buffer: &wgpu::Buffer, count: usize) -> Result<Vec<u32>> {
        let bytes = self.read_bytes(buffer, count as u64 * 4)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}
