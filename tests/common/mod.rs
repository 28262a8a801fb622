//! Shared test harness: the devices under test, seeded random inputs, NaN-poisoned outputs
//! and a comparison that names the index, the values and the reason for its tolerance.
#![allow(dead_code)]

use kiln::gpu::{DType, Gpu, GpuOptions, KernelFamily};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::{Arc, OnceLock};

/// The paths every kernel is tested on: what the adapter offers ("fast": subgroups, f16 KV
/// cache on lavapipe) and the forced fallback ("fallback": shared-memory reductions, f32 KV).
/// There is no silent skip: without an adapter these panic with the reason.
pub fn devices() -> Vec<(&'static str, Arc<Gpu>)> {
    static FAST: OnceLock<Arc<Gpu>> = OnceLock::new();
    static FALLBACK: OnceLock<Arc<Gpu>> = OnceLock::new();
    let open = |o: GpuOptions| Gpu::with_options(&o).unwrap_or_else(|e| panic!("GPU tests need an adapter: {e}"));
    let fast = FAST.get_or_init(|| open(GpuOptions::default())).clone();
    let fallback = FALLBACK
        .get_or_init(|| open(GpuOptions { disable_subgroups: true, disable_f16: true, ..Default::default() }))
        .clone();
    vec![("fast", fast), ("fallback", fallback)]
}

/// `devices()` plus the kernels chosen for real GPUs (tiled matmul, reduce gemv, workgroup
/// attention) on the same adapter ("gpu-kernels", as `KILN_KERNELS=gpu`): the whole-model tests
/// run them too, so the discrete-GPU path is checked end to end without a GPU.
pub fn model_devices() -> Vec<(&'static str, Arc<Gpu>)> {
    static GPU_KERNELS: OnceLock<Arc<Gpu>> = OnceLock::new();
    let gpu_kernels = GPU_KERNELS
        .get_or_init(|| {
            Gpu::with_options(&GpuOptions { kernels: Some(KernelFamily::Gpu), ..Default::default() })
                .unwrap_or_else(|e| panic!("GPU tests need an adapter: {e}"))
        })
        .clone();
    let mut all = devices();
    all.push(("gpu-kernels", gpu_kernels));
    all
}

/// A device whose storage bindings are capped at `max_binding` bytes, to split weights into
/// several chunks with small test matrices.
pub fn small_binding_device(max_binding: u64) -> Arc<Gpu> {
    Gpu::with_options(&GpuOptions { max_binding: Some(max_binding), ..Default::default() })
        .unwrap_or_else(|e| panic!("GPU tests need an adapter: {e}"))
}

/// A fresh seed per run (KILN_TEST_SEED pins one); printed so a failure can be replayed.
pub fn rng(test: &str) -> StdRng {
    let seed = std::env::var("KILN_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("{test}: KILN_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

pub fn uniform(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// A buffer of `n` f32 NaNs: a kernel that skips an element cannot pass.
pub fn poisoned(gpu: &Gpu, label: &str, n: usize) -> wgpu::Buffer {
    gpu.upload(label, bytemuck::cast_slice(&vec![f32::NAN; n])).unwrap()
}

pub fn upload_f32(gpu: &Gpu, label: &str, data: &[f32]) -> wgpu::Buffer {
    gpu.upload(label, bytemuck::cast_slice(data)).unwrap()
}

/// Round through f16, as a value stored in an f16 buffer reads back.
pub fn round_f16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

pub fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect()
}

/// Assert |actual − expected| ≤ tol[i] everywhere, with every value finite. `why` states where
/// the tolerance comes from; a failure prints the first offending indices with both values.
pub fn assert_close_each(what: &str, actual: &[f32], expected: &[f32], tol: impl Fn(usize) -> f64, why: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let mut bad = Vec::new();
    let mut worst = (0.0f64, 0usize);
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let err = (a as f64 - e as f64).abs();
        if !a.is_finite() || err.is_nan() || err > tol(i) {
            bad.push(i);
        }
        if err > worst.0 {
            worst = (err, i);
        }
    }
    eprintln!("{what}: max |Δ| {:.3e} at [{}]", worst.0, worst.1);
    if !bad.is_empty() {
        let shown: Vec<String> = bad
            .iter()
            .take(8)
            .map(|&i| {
                format!(
                    "  [{i}] actual {} expected {} (|Δ| {:.3e}, tol {:.3e})",
                    actual[i],
                    expected[i],
                    (actual[i] as f64 - expected[i] as f64).abs(),
                    tol(i)
                )
            })
            .collect();
        panic!("{what}: {} of {} elements out of tolerance ({why}):\n{}", bad.len(), actual.len(), shown.join("\n"));
    }
}

/// `assert_close_each` with one absolute tolerance.
pub fn assert_close(what: &str, actual: &[f32], expected: &[f32], atol: f64, why: &str) {
    assert_close_each(what, actual, expected, |_| atol, why)
}

/// Unit roundoff of f32.
pub const U32: f64 = f32::EPSILON as f64 / 2.0;

/// Random valid blocks of `dtype` for a (rows × cols) matrix: random quants, random signs and
/// bits, scales set to moderate f16 values so nothing overflows; and their CPU dequantisation
/// (kiln::quant, bit-exact with ggml) as the reference.
pub fn quantized(dtype: DType, rows: usize, cols: usize, rng: &mut rand::rngs::StdRng) -> (Vec<u8>, Vec<f32>) {
    use kiln::gguf::GgmlType;

    let (ty, scale_offsets): (GgmlType, &[usize]) = match dtype {
        DType::Q8_0 => (GgmlType::Q8_0, &[0]),
        DType::Q4_0 => (GgmlType::Q4_0, &[0]),
        DType::Q4_1 => (GgmlType::Q4_1, &[0, 2]),
        DType::Q5_0 => (GgmlType::Q5_0, &[0]),
        DType::Q5_1 => (GgmlType::Q5_1, &[0, 2]),
        DType::Q4K => (GgmlType::Q4_K, &[0, 2]),
        DType::Q5K => (GgmlType::Q5_K, &[0, 2]),
        DType::Q6K => (GgmlType::Q6_K, &[208]),
        other => panic!("{other:?} is not a block format"),
    };
    let (block_elems, block_bytes) = dtype.block();
    let blocks = rows * cols / block_elems as usize;
    let mut bytes: Vec<u8> = (0..blocks * block_bytes as usize).map(|_| rng.random()).collect();
    for b in 0..blocks {
        for &o in scale_offsets {
            let d = half::f16::from_f32(rng.random_range(0.002f32..0.02) * if rng.random() { 1.0 } else { -1.0 });
            bytes[b * block_bytes as usize + o..][..2].copy_from_slice(&d.to_le_bytes());
        }
    }
    let values = kiln::quant::dequantize(ty, &bytes, rows * cols).unwrap();
    (bytes, values)
}
