//! Kernel throughput at the real shapes of SmolLM2-135M, Qwen2.5-0.5B and Llama-3-8B, each
//! next to the device's copy bandwidth measured in this same run.
//!
//!     cargo bench --bench kernels                 # all three models
//!     KILN_BENCH_MODELS=smollm2,qwen2.5 cargo bench --bench kernels
//!     KILN_BENCH_ALL_KERNELS=1 ...                # also the kernels not chosen for this device
//!     KILN_BENCH_DTYPE=q4_1 ...                   # weight encoding (default f16)
//!     KILN_BENCH_GEMV_ONLY=1 ...                  # decode projections only
//!
//! GPU time comes from timestamp queries where the adapter has them, else from the host
//! after a full sync. Each figure is the best of 3 runs of a batch of repetitions recorded
//! into one pass, after a warm-up. Weights are zero-filled on the device: the kernels' speed
//! does not depend on the values.

use kiln::gpu::{DType, Dispatch, Gpu, Weight};
use kiln::ops::gemv::GemvKernel;
use kiln::ops::matmul::MatmulKernel;
use kiln::ops::{attention, elementwise, gemv, matmul, KvGeometry, StepTokens};
use kiln::Result;

struct Model {
    name: &'static str,
    key: &'static str,
    hidden: u32,
    ffn: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    vocab: u32,
}

const MODELS: [Model; 3] = [
    Model {
        name: "SmolLM2-135M",
        key: "smollm2",
        hidden: 576,
        ffn: 1536,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        vocab: 49152,
    },
    Model {
        name: "Qwen2.5-0.5B",
        key: "qwen2.5",
        hidden: 896,
        ffn: 4864,
        heads: 14,
        kv_heads: 2,
        head_dim: 64,
        vocab: 151936,
    },
    Model {
        name: "Llama-3-8B",
        key: "llama3-8b",
        hidden: 4096,
        ffn: 14336,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        vocab: 128256,
    },
];

/// Best-of-3 (best-of-2 for slow kernels) seconds per repetition of `dispatches`, repetitions sized to ~`budget` seconds.
fn seconds(gpu: &Gpu, label: &str, dispatches: &[&Dispatch], budget: f64) -> Result<f64> {
    let once = gpu.time(label, dispatches, 1)?; // warm-up, and a first estimate
    let reps = ((budget / once.max(1e-6)) as u32).clamp(1, 200);
    let mut best = f64::MAX;
    // Long kernels (seconds on a software rasteriser) are measured twice, not four times.
    let runs = if once > budget { 1 } else { 3 };
    for _ in 0..runs {
        best = best.min(gpu.time(label, dispatches, reps)? / reps as f64);
    }
    Ok(best)
}

/// The device's own choice first; with KILN_BENCH_ALL_KERNELS=1 the alternatives too.
fn gemv_kernels(gpu: &Gpu) -> Vec<GemvKernel> {
    let own = GemvKernel::for_device(gpu);
    let mut v = vec![own];
    if all_kernels() {
        v.extend(
            [GemvKernel::Reduce, GemvKernel::RowPerInvocation, GemvKernel::Blocks].into_iter().filter(|k| *k != own),
        );
    }
    v
}

fn matmul_kernels(gpu: &Gpu) -> Vec<MatmulKernel> {
    let own = MatmulKernel::for_device(gpu);
    let mut v = vec![own];
    if all_kernels() {
        v.extend(
            [MatmulKernel::Tiled, MatmulKernel::Registers, MatmulKernel::Blocks].into_iter().filter(|k| *k != own),
        );
    }
    v
}

fn all_kernels() -> bool {
    std::env::var("KILN_BENCH_ALL_KERNELS").is_ok_and(|v| v == "1")
}

fn main() -> Result<()> {
    let gpu = Gpu::new()?;
    let wanted = std::env::var("KILN_BENCH_MODELS").unwrap_or_default();
    let dtype = match std::env::var("KILN_BENCH_DTYPE").as_deref().unwrap_or("f16") {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "q8_0" => DType::Q8_0,
        "q4_0" => DType::Q4_0,
        "q4_1" => DType::Q4_1,
        "q5_0" => DType::Q5_0,
        "q4_k" => DType::Q4K,
        "q6_k" => DType::Q6K,
        other => panic!("KILN_BENCH_DTYPE={other}: f32, f16, q8_0, q4_0, q4_1, q5_0, q4_k, q6_k"),
    };
    let gemv_only = std::env::var("KILN_BENCH_GEMV_ONLY").is_ok_and(|v| v == "1");
    let prefill_m: u32 = std::env::var("KILN_BENCH_M").ok().and_then(|s| s.parse().ok()).unwrap_or(128);
    println!("device: {}", gpu.describe());
    println!("timing: {:?}", gpu.timer());

    // Copy bandwidth: read + write of a 64 MiB buffer by a vec4 copy kernel.
    let bytes = 64u64 << 20;
    let (src, dst) = (gpu.buffer("copy src", bytes)?, gpu.buffer("copy dst", bytes)?);
    let copy = elementwise::copy(&gpu, &src, &dst, bytes)?;
    let copy_gbs = 2.0 * bytes as f64 / seconds(&gpu, "copy", &[&copy], 0.5)? / 1e9;
    println!("copy bandwidth (read + write): {copy_gbs:.2} GB/s\n");
    drop((src, dst, copy));

    let mut matmul_rows = Vec::new();
    println!("| model | kernel | shape | time | throughput | ratio |");
    println!("|---|---|---|---|---|---|");
    for model in MODELS.iter().filter(|m| wanted.is_empty() || wanted.split(',').any(|w| w == m.key)) {
        let kv_dim = model.kv_heads * model.head_dim;
        let projections = [
            ("q_proj", model.hidden, model.hidden),
            ("k_proj", kv_dim, model.hidden),
            ("gate_proj", model.ffn, model.hidden),
            ("down_proj", model.hidden, model.ffn),
            ("lm_head", model.vocab, model.hidden),
        ];
        for (name, n, k) in projections {
            let w = Weight::zeroed(&gpu, name, n, k, dtype)?;
            // Decode: one token.
            let (x, y) = (gpu.buffer("x", k as u64 * 4)?, gpu.buffer("y", n as u64 * 4)?);
            for kind in gemv_kernels(&gpu) {
                let ds = gemv::gemv_with(&gpu, kind, &x, &w, None, &y, 1, 0)?;
                let t = seconds(&gpu, name, &ds.iter().collect::<Vec<_>>(), 0.3)?;
                let gbs = (w.bytes() + k as u64 * 4 + n as u64 * 4) as f64 / t / 1e9;
                println!(
                    "| {} | gemv {dtype:?} {kind:?} | {name} {n}×{k} | {:.3} ms | {gbs:.2} GB/s | {:.0}% of copy |",
                    model.name,
                    t * 1e3,
                    100.0 * gbs / copy_gbs
                );
            }
            // Prefill: a batch of tokens (the lm-head is applied to the last token only).
            if name != "lm_head" && !gemv_only {
                let (x, y) =
                    (gpu.buffer("x", (prefill_m * k) as u64 * 4)?, gpu.buffer("y", (prefill_m * n) as u64 * 4)?);
                for kind in matmul_kernels(&gpu) {
                    let ds = matmul::matmul_with(&gpu, kind, &x, &w, None, &y, prefill_m)?;
                    let t = seconds(&gpu, name, &ds.iter().collect::<Vec<_>>(), 0.5)?;
                    let gflops = 2.0 * prefill_m as f64 * n as f64 * k as f64 / t / 1e9;
                    matmul_rows.push((
                        format!(
                            "| {} | matmul {dtype:?} {kind:?} | {name} M={prefill_m} {n}×{k} | {:.2} ms",
                            model.name,
                            t * 1e3
                        ),
                        gflops,
                    ));
                }
            }
        }

        if gemv_only {
            continue;
        }
        // Attention: prefill of prefill_m tokens, and one decode step at several cache fills.
        // One sequence on a paged cache of 16-position blocks in order.
        let ctx = 4096u32;
        let kv = KvGeometry { slots: ctx, block_size: 16 };
        let shape = attention::AttentionShape {
            n_heads: model.heads,
            n_kv_heads: model.kv_heads,
            head_dim: model.head_dim,
            kv,
            window: 0,
        };
        let table: Vec<u32> = (0..ctx / 16).collect();
        let table = gpu.upload("block table", bytemuck::cast_slice(&table))?;
        let prefill_meta: Vec<[u32; 2]> = (0..prefill_m).map(|p| [p, 0]).collect();
        let prefill_meta = gpu.upload("positions", bytemuck::cast_slice(&prefill_meta))?;
        let prefill_tokens = StepTokens { meta: &prefill_meta, block_table: &table };
        let elem = gpu.kv_element_bytes() as u64;
        let cache = (kv_dim as u64) * ctx as u64 * elem;
        let (kc, vc) = (gpu.buffer("k cache", cache)?, gpu.buffer("v cache", cache)?);
        let q_len = (prefill_m * model.heads * model.head_dim) as u64 * 4;
        let (q, out) = (gpu.buffer("q", q_len)?, gpu.buffer("out", q_len)?);
        let d = attention::prefill(&gpu, &shape, &q, &kc, &vc, &out, prefill_m, prefill_tokens)?;
        let t = seconds(&gpu, "attention prefill", &[&d], 0.5)?;
        println!("| {} | attention prefill | T={prefill_m} | {:.3} ms | | |", model.name, t * 1e3);
        for kv_len in [512u32, 2048, 4096] {
            let splits = shape.splits(1, kv_len, 64);
            let partials = attention::Partials::new(&gpu, &shape, splits.0)?;
            let meta = gpu.upload("position", bytemuck::cast_slice(&[kv_len - 1, 0]))?;
            let tokens = StepTokens { meta: &meta, block_table: &table };
            let own = attention::SplitKernel::for_device(&gpu);
            let mut kernels = vec![own];
            if all_kernels() {
                kernels.extend(
                    [attention::SplitKernel::Workgroup, attention::SplitKernel::Lanes]
                        .into_iter()
                        .filter(|k| *k != own),
                );
            }
            for kernel in kernels {
                let [a, b] =
                    attention::decode_with(&gpu, kernel, &shape, &q, &kc, &vc, &out, &partials, 1, splits, tokens)?;
                let t = seconds(&gpu, "attention decode", &[&a, &b], 0.3)?;
                let gbs = (2 * kv_len as u64 * kv_dim as u64 * elem) as f64 / t / 1e9;
                println!(
                    "| {} | attention decode {kernel:?} | kv={kv_len} splits={} | {:.3} ms | {gbs:.2} GB/s (K+V) | {:.0}% of copy |",
                    model.name,
                    splits.0,
                    t * 1e3,
                    100.0 * gbs / copy_gbs
                );
            }
        }
    }
    let best = matmul_rows.iter().map(|r| r.1).fold(0.0, f64::max);
    for (row, gflops) in &matmul_rows {
        println!("{row} | {gflops:.2} GFLOP/s | {:.0}% of best matmul |", 100.0 * gflops / best);
    }
    Ok(())
}
