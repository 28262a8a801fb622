//! Every kernel against its CPU reference (f64 accumulation) on lavapipe or any adapter:
//! fresh seeded random inputs, odd shapes (not multiples of any tile), NaN-poisoned outputs,
//! on both the fast path (subgroups, f16 KV cache) and the forced fallback.

mod common;

use common::*;
use kiln::gpu::{DType, Gpu, Weight};
use kiln::ops::{argmax, attention, elementwise, embedding, gemv, matmul, rms_norm, rope, softmax};
use kiln::ops::{KvGeometry, StepTokens, NO_POSITION};
use rand::seq::SliceRandom;
use rand::Rng;

fn weight(gpu: &Gpu, name: &str, rows: usize, cols: usize, dtype: DType, values: &[f32]) -> (Weight, Vec<f32>) {
    match dtype {
        DType::F32 => (
            Weight::upload(gpu, name, rows as u32, cols as u32, dtype, bytemuck::cast_slice(values)).unwrap(),
            values.to_vec(),
        ),
        DType::F16 => {
            (Weight::upload(gpu, name, rows as u32, cols as u32, dtype, &f16_bytes(values)).unwrap(), round_f16(values))
        }
        DType::BF16 => {
            let b: Vec<half::bf16> = values.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let bytes: Vec<u8> = b.iter().flat_map(|v| v.to_le_bytes()).collect();
            (
                Weight::upload(gpu, name, rows as u32, cols as u32, dtype, &bytes).unwrap(),
                b.iter().map(|v| v.to_f32()).collect(),
            )
        }
        other => panic!("{other:?}: block formats are made by `quantized`"),
    }
}

// ---------------------------------------------------------------- rms_norm

#[test]
fn rms_norm_matches_reference() {
    let mut rng = rng("rms_norm");
    for (name, gpu) in devices() {
        for (rows, dim) in [(1usize, 576usize), (3, 129), (7, 1000), (2, 4096)] {
            let x = uniform(&mut rng, rows * dim, -3.0, 3.0);
            let w = uniform(&mut rng, dim, 0.5, 1.5);
            let y = poisoned(&gpu, "y", rows * dim);
            let d = rms_norm::rms_norm(
                &gpu,
                &upload_f32(&gpu, "x", &x),
                &upload_f32(&gpu, "w", &w),
                &y,
                rows as u32,
                dim as u32,
                1e-5,
            )
            .unwrap();
            gpu.run("rms_norm", &[&d]).unwrap();
            let got = gpu.read_f32(&y, rows * dim).unwrap();
            let want = rms_norm::rms_norm_cpu(&x, &w, dim, 1e-5);
            assert_close_each(
                &format!("rms_norm {name} {rows}×{dim}"),
                &got,
                &want,
                |i| want[i].abs() as f64 * (dim as f64 + 8.0) * U32 + 1e-30,
                "sum of dim squares in f32 (≤ dim·u relative), inverseSqrt and two products (≤ 8u)",
            );
        }
    }
}

// ---------------------------------------------------------------- softmax / argmax

#[test]
fn softmax_matches_reference() {
    let mut rng = rng("softmax");
    for (name, gpu) in devices() {
        for (rows, n) in [(2usize, 1003usize), (1, 49152), (3, 7)] {
            let x = uniform(&mut rng, rows * n, -8.0, 8.0);
            let y = poisoned(&gpu, "y", rows * n);
            let d = softmax::softmax(&gpu, &upload_f32(&gpu, "x", &x), &y, rows as u32, n as u32).unwrap();
            gpu.run("softmax", &[&d]).unwrap();
            let got = gpu.read_f32(&y, rows * n).unwrap();
            let want = softmax::softmax_cpu(&x, n);
            assert_close_each(
                &format!("softmax {name} {rows}×{n}"),
                &got,
                &want,
                |i| want[i] as f64 * (n as f64 + 40.0) * U32 + 1e-12,
                "exp within 3 + 2|x| ulp for |x| ≤ 16 (Vulkan precision), sum of n terms ≤ n·u relative",
            );
        }
    }
}

#[test]
fn argmax_picks_first_maximum_and_ignores_nan() {
    let mut rng = rng("argmax");
    for (name, gpu) in devices() {
        for (rows, n) in [(1usize, 151936usize), (4, 1000), (3, 5)] {
            let mut x = uniform(&mut rng, rows * n, -10.0, 10.0);
            for r in 0..rows {
                let row = &mut x[r * n..(r + 1) * n];
                // A planted maximum, repeated later (the first must win), and a NaN before it.
                let i = rng.random_range(0..n);
                row[i] = 20.0;
                if i + 1 < n {
                    row[rng.random_range(i + 1..n)] = 20.0;
                }
                if i > 0 {
                    row[rng.random_range(0..i)] = f32::NAN;
                }
            }
            let out = gpu.upload("out", bytemuck::cast_slice(&vec![u32::MAX; rows])).unwrap();
            let d = argmax::argmax(&gpu, &upload_f32(&gpu, "x", &x), &out, rows as u32, n as u32).unwrap();
            gpu.run("argmax", &[&d]).unwrap();
            let got = gpu.read_u32(&out, rows).unwrap();
            assert_eq!(got, argmax::argmax_cpu(&x, n), "argmax {name} {rows}×{n}");
        }
    }
}

// ---------------------------------------------------------------- element-wise

#[test]
fn swiglu_and_residual_add_match_reference() {
    let mut rng = rng("elementwise");
    for (name, gpu) in devices() {
        for n in [1usize, 255, 1537 * 3] {
            let a = uniform(&mut rng, n, -8.0, 8.0);
            let b = uniform(&mut rng, n, -2.0, 2.0);
            let (ab, bb) = (upload_f32(&gpu, "a", &a), upload_f32(&gpu, "b", &b));

            let y = poisoned(&gpu, "y", n);
            gpu.run("swiglu", &[&elementwise::swiglu(&gpu, &ab, &bb, &y, n as u32).unwrap()]).unwrap();
            let want = elementwise::swiglu_cpu(&a, &b);
            assert_close_each(
                &format!("swiglu {name} n={n}"),
                &gpu.read_f32(&y, n).unwrap(),
                &want,
                |i| want[i].abs() as f64 * 64.0 * U32 + 1e-30,
                "exp(-g) within 3 + 2|g| ≤ 19 ulp (|g| ≤ 8), then add, divide, multiply: ≤ 64u relative",
            );

            let y = poisoned(&gpu, "y", n);
            gpu.run("add", &[&elementwise::add(&gpu, &ab, &bb, &y, n as u32).unwrap()]).unwrap();
            assert_close(
                &format!("add {name} n={n}"),
                &gpu.read_f32(&y, n).unwrap(),
                &elementwise::add_cpu(&a, &b),
                0.0,
                "one correctly rounded f32 add, as on the CPU",
            );

            let y = poisoned(&gpu, "y", n.div_ceil(4) * 4);
            gpu.run("copy", &[&elementwise::copy(&gpu, &ab, &y, n.div_ceil(4) as u64 * 16).unwrap()]).unwrap();
            assert_close(
                &format!("copy {name} n={n}"),
                &gpu.read_f32(&y, n).unwrap(),
                &a,
                0.0,
                "a copy changes no bits",
            );

            let acc = upload_f32(&gpu, "acc", &a);
            gpu.run("add_assign", &[&elementwise::add_assign(&gpu, &acc, &bb, n as u32).unwrap()]).unwrap();
            assert_close(
                &format!("add_assign {name} n={n}"),
                &gpu.read_f32(&acc, n).unwrap(),
                &elementwise::add_cpu(&a, &b),
                0.0,
                "one correctly rounded f32 add",
            );
        }
    }
}

// ---------------------------------------------------------------- embedding

fn check_embedding(
    gpu: &Gpu,
    what: &str,
    vocab: usize,
    dim: usize,
    dtype: DType,
    rng: &mut rand::rngs::StdRng,
) -> usize {
    let values = uniform(rng, vocab * dim, -1.0, 1.0);
    let (table, exact) = weight(gpu, "embed", vocab, dim, dtype, &values);
    let mut ids: Vec<u32> = (0..9).map(|_| rng.random_range(0..vocab as u32)).collect();
    ids.extend([0, vocab as u32 - 1]);
    let x = poisoned(gpu, "x", ids.len() * dim);
    let ds = embedding::embedding(
        gpu,
        &gpu.upload("ids", bytemuck::cast_slice(&ids)).unwrap(),
        &table,
        &x,
        ids.len() as u32,
    )
    .unwrap();
    gpu.run("embedding", &ds.iter().collect::<Vec<_>>()).unwrap();
    let want = embedding::embedding_cpu(&ids, &exact, dim);
    assert_close(
        what,
        &gpu.read_f32(&x, ids.len() * dim).unwrap(),
        &want,
        0.0,
        "a gather (and exact f16 → f32 widening) changes no bits",
    );
    table.chunks.len()
}

#[test]
fn embedding_gathers_rows_of_f32_and_f16_tables() {
    let mut rng = rng("embedding");
    for (name, gpu) in devices() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            check_embedding(&gpu, &format!("embedding {name} {dtype:?}"), 1000, 77, dtype, &mut rng);
        }
    }
    let small = small_binding_device(4096);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let chunks = check_embedding(&small, &format!("embedding chunked {dtype:?}"), 301, 33, dtype, &mut rng);
        assert!(chunks > 1, "the 4 KiB binding cap must split the table ({chunks} chunk)");
    }
}

// ---------------------------------------------------------------- gemv / matmul

/// The bound gemv and matmul are held to (`matmul::dot_error_bound`).
fn dot_bound(abs_sum: f32, k: usize, value: f32) -> f64 {
    matmul::dot_error_bound(abs_sum as f64, k, value)
}

enum Kernel {
    Gemv(gemv::GemvKernel),
    Matmul(matmul::MatmulKernel),
}

#[allow(clippy::too_many_arguments)]
fn check_linear(
    gpu: &Gpu,
    kernel: &Kernel,
    what: &str,
    m: usize,
    n: usize,
    k: usize,
    dtype: DType,
    with_bias: bool,
    rng: &mut rand::rngs::StdRng,
) -> usize {
    let x = uniform(rng, m * k, -1.0, 1.0);
    let (w, w_exact) = weight(gpu, "w", n, k, dtype, &uniform(rng, n * k, -1.0, 1.0));
    let bias = uniform(rng, n, -1.0, 1.0);
    let bias_buf = upload_f32(gpu, "bias", &bias);
    let y = poisoned(gpu, "y", m * n);
    let xb = upload_f32(gpu, "x", &x);
    let b = with_bias.then_some(&bias_buf);
    let ds = match kernel {
        Kernel::Gemv(kind) => gemv::gemv_with(gpu, *kind, &xb, &w, b, &y, m as u32, 0),
        Kernel::Matmul(kind) => matmul::matmul_with(gpu, *kind, &xb, &w, b, &y, m as u32),
    }
    .unwrap();
    gpu.run(what, &ds.iter().collect::<Vec<_>>()).unwrap();
    let got = gpu.read_f32(&y, m * n).unwrap();
    let bias_ref = with_bias.then_some(&bias[..]);
    let want = matmul::matmul_cpu(&x, &w_exact, bias_ref, m, n, k);
    let abs_x: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let abs_w: Vec<f32> = w_exact.iter().map(|v| v.abs()).collect();
    let abs_b: Vec<f32> = bias.iter().map(|v| v.abs()).collect();
    let abs_sum = matmul::matmul_cpu(&abs_x, &abs_w, with_bias.then_some(&abs_b[..]), m, n, k);
    assert_close_each(
        what,
        &got,
        &want,
        |i| dot_bound(abs_sum[i], k + 1, want[i]),
        "f32 accumulation of k products: ≤ (k+2)·u·Σ|xw| + 2u|y|",
    );
    w.chunks.len()
}

#[test]
fn gemv_matches_reference_at_odd_shapes() {
    let mut rng = rng("gemv");
    for (name, gpu) in devices() {
        for kind in [gemv::GemvKernel::Reduce, gemv::GemvKernel::RowPerInvocation, gemv::GemvKernel::Blocks] {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                // K % 8 == 0 takes the 16-byte-load path, other K the scalar path; N not a multiple of the rows per workgroup.
                for (m, n, k) in
                    [(1usize, 37usize, 576usize), (1, 131, 1000), (3, 67, 577), (1, 3, 13), (2, 5, 8), (1, 1, 1)]
                {
                    for bias in [false, true] {
                        check_linear(
                            &gpu,
                            &Kernel::Gemv(kind),
                            &format!("gemv {kind:?} {name} {dtype:?} m={m} n={n} k={k} bias={bias}"),
                            m,
                            n,
                            k,
                            dtype,
                            bias,
                            &mut rng,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_matches_reference_at_odd_shapes() {
    let mut rng = rng("matmul");
    for (name, gpu) in devices() {
        for kind in [matmul::MatmulKernel::Tiled, matmul::MatmulKernel::Registers, matmul::MatmulKernel::Blocks] {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                for (m, n, k) in
                    [(2usize, 3usize, 5usize), (67, 129, 77), (130, 65, 576), (64, 64, 64), (7, 200, 33), (33, 31, 24)]
                {
                    for bias in [false, true] {
                        check_linear(
                            &gpu,
                            &Kernel::Matmul(kind),
                            &format!("matmul {kind:?} {name} {dtype:?} m={m} n={n} k={k} bias={bias}"),
                            m,
                            n,
                            k,
                            dtype,
                            bias,
                            &mut rng,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn linear_kernels_handle_weights_split_across_bindings() {
    let mut rng = rng("linear chunked");
    let gpu = small_binding_device(4096);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for kernel in [
            Kernel::Gemv(gemv::GemvKernel::Reduce),
            Kernel::Gemv(gemv::GemvKernel::RowPerInvocation),
            Kernel::Matmul(matmul::MatmulKernel::Tiled),
            Kernel::Matmul(matmul::MatmulKernel::Registers),
        ] {
            let chunks = check_linear(&gpu, &kernel, &format!("chunked {dtype:?}"), 3, 301, 40, dtype, true, &mut rng);
            assert!(chunks > 2, "301 rows over a 4 KiB binding cap must make several chunks, got {chunks}");
        }
    }
}

/// The real case: Qwen2.5-0.5B's 151936 × 896 f16 tied embedding / lm-head (272 MB) is over
/// lavapipe's 128 MiB binding limit.
#[test]
fn lm_head_larger_than_one_binding_works() {
    let mut rng = rng("lm head");
    let (gpu_name, gpu) = devices().remove(0);
    let (n, k) = (151936usize, 896usize);
    let values: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let (w, exact) = weight(&gpu, "lm_head", n, k, DType::F16, &values);
    drop(values);
    if w.bytes() > gpu.max_binding {
        assert!(w.chunks.len() > 1);
    }
    let x = uniform(&mut rng, k, -1.0, 1.0);
    let y = poisoned(&gpu, "logits", n);
    let ds = gemv::gemv(&gpu, &upload_f32(&gpu, "x", &x), &w, None, &y, 1).unwrap();
    gpu.run("lm_head", &ds.iter().collect::<Vec<_>>()).unwrap();
    let got = gpu.read_f32(&y, n).unwrap();
    let want = matmul::matmul_cpu(&x, &exact, None, 1, n, k);
    let abs_x: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let abs_w: Vec<f32> = exact.iter().map(|v| v.abs()).collect();
    let abs_sum = matmul::matmul_cpu(&abs_x, &abs_w, None, 1, n, k);
    assert_close_each(
        &format!("lm_head gemv {gpu_name} ({} chunks)", w.chunks.len()),
        &got,
        &want,
        |i| dot_bound(abs_sum[i], k, want[i]),
        "f32 accumulation of k products",
    );

    // And the same table as an embedding: the last rows live in the last chunk.
    let ids = [0u32, 77_777, n as u32 - 1];
    let xe = poisoned(&gpu, "x", ids.len() * k);
    let ds = embedding::embedding(&gpu, &gpu.upload("ids", bytemuck::cast_slice(&ids)).unwrap(), &w, &xe, 3).unwrap();
    gpu.run("embedding", &ds.iter().collect::<Vec<_>>()).unwrap();
    assert_close(
        "embedding from a split table",
        &gpu.read_f32(&xe, ids.len() * k).unwrap(),
        &embedding::embedding_cpu(&ids, &exact, k),
        0.0,
        "exact gather",
    );
}

// ---------------------------------------------------------------- rope

/// Upload a step's token metadata ((position, first block-table entry) per token) and block tables.
fn step_tokens(gpu: &Gpu, meta: &[[u32; 2]], table: &[u32]) -> (wgpu::Buffer, wgpu::Buffer) {
    let table = if table.is_empty() { &[0u32][..] } else { table };
    (
        gpu.upload("meta", bytemuck::cast_slice(meta)).unwrap(),
        gpu.upload("block table", bytemuck::cast_slice(table)).unwrap(),
    )
}

#[test]
fn rope_rotates_q_in_both_layouts_at_any_position() {
    let mut rng = rng("rope");
    let scaling = rope::Llama3Scaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    for (name, gpu) in devices() {
        for (head_dim, theta, scaled) in [(64usize, 1e4, false), (128, 5e5, true), (80, 1e6, false), (96, 1e5, false)] {
            let inv = rope::inv_freq(head_dim, theta, scaled.then_some(&scaling));
            let max_pos = 4200;
            let table = rope::upload_table(&gpu, &rope::cos_sin_table(&inv, max_pos)).unwrap();
            for layout in [rope::RopeLayout::HalfSplit, rope::RopeLayout::Interleaved] {
                for (n_tokens, n_heads) in [(1u32, 9u32), (13, 3), (2, 5)] {
                    // Each token at its own position (tokens of different sequences), the last
                    // one padding when there are several: it must be left alone.
                    let mut positions: Vec<u32> = (0..n_tokens).map(|_| rng.random_range(0..max_pos as u32)).collect();
                    if n_tokens > 1 {
                        positions[n_tokens as usize - 1] = NO_POSITION;
                    }
                    let meta: Vec<[u32; 2]> = positions.iter().map(|&p| [p, 0]).collect();
                    let (meta_b, table_b) = step_tokens(&gpu, &meta, &[]);
                    let tokens = StepTokens { meta: &meta_b, block_table: &table_b };
                    let shape = rope::RopeShape { n_tokens, n_heads, head_dim: head_dim as u32, layout };
                    let n = (n_tokens * n_heads) as usize * head_dim;
                    let x = uniform(&mut rng, n, -2.0, 2.0);
                    let buf = upload_f32(&gpu, "q", &x);
                    gpu.run("rope_q", &[&rope::rope_q(&gpu, &table, &buf, shape, tokens).unwrap()]).unwrap();
                    let real: Vec<u32> = positions.iter().map(|&p| if p == NO_POSITION { 0 } else { p }).collect();
                    let mut want = rope::rope_cpu(&x, shape, &real, &inv);
                    let row = n_heads as usize * head_dim;
                    if n_tokens > 1 {
                        let pad = (n_tokens as usize - 1) * row;
                        want[pad..].copy_from_slice(&x[pad..]);
                    }
                    assert_close(
                        &format!(
                            "rope_q {name} D={head_dim} {layout:?} T={n_tokens} H={n_heads} positions={positions:?}"
                        ),
                        &gpu.read_f32(&buf, n).unwrap(),
                        &want,
                        16.0 * U32 * 2.0,
                        "cos/sin rounded to f32 (u), two products and a sum of |x| ≤ 2 values: ≤ 8u·2 absolute",
                    );
                }
            }
        }
    }
}

#[test]
fn llama3_frequency_scaling_follows_the_reference_formula() {
    // Llama 3.1: theta 5e5, head_dim 128, factor 8, low 1, high 4, original context 8192.
    let s = rope::Llama3Scaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    };
    let plain = rope::inv_freq(128, 5e5, None);
    let scaled = rope::inv_freq(128, 5e5, Some(&s));
    let wavelen = |f: f32| 2.0 * std::f64::consts::PI / f as f64;
    let mut seen = [0; 3];
    for (&p, &q) in plain.iter().zip(&scaled) {
        if wavelen(p) < 8192.0 / 4.0 {
            assert_eq!(p, q, "high frequencies (wavelength < 2048) are kept");
            seen[0] += 1;
        } else if wavelen(p) > 8192.0 {
            assert!(
                ((q / p) as f64 - 1.0 / 8.0).abs() < 1e-6,
                "low frequencies (wavelength > 8192) are divided by the factor"
            );
            seen[1] += 1;
        } else {
            assert!(q < p && q > p / 8.0, "medium frequencies interpolate between the two");
            seen[2] += 1;
        }
    }
    assert!(seen.iter().all(|&c| c > 0), "all three bands occur: {seen:?}");
}

/// A shuffled pool of `blocks` block ids, dealt out to sequences as non-contiguous tables.
fn shuffled_blocks(rng: &mut rand::rngs::StdRng, blocks: u32) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..blocks).collect();
    ids.shuffle(rng);
    ids
}

#[test]
fn rope_kv_writes_rotated_keys_and_values_into_paged_slots() {
    let mut rng = rng("rope_kv");
    for (name, gpu) in devices() {
        let (head_dim, n_kv, block_size, blocks) = (64usize, 3usize, 4u32, 12u32);
        let kv = KvGeometry { slots: blocks * block_size, block_size };
        let slots = kv.slots as usize;
        let inv = rope::inv_freq(head_dim, 1e4, None);
        let table = rope::upload_table(&gpu, &rope::cos_sin_table(&inv, 64)).unwrap();
        let elem = if gpu.caps.f16 { 2 } else { 4 };
        let cache_bytes = n_kv * slots * head_dim * elem;
        // Poison the cache: slots not written must stay NaN.
        let nan_cache: Vec<u8> = if gpu.caps.f16 {
            f16_bytes(&vec![f32::NAN; n_kv * slots * head_dim])
        } else {
            bytemuck::cast_slice(&vec![f32::NAN; n_kv * slots * head_dim]).to_vec()
        };
        let (kc, vc) = (gpu.upload("k cache", &nan_cache).unwrap(), gpu.upload("v cache", &nan_cache).unwrap());
        // Two sequences on shuffled blocks: one writes positions 9..14 (a chunk crossing block
        // boundaries), the other 2..4; then a padding token that writes nothing.
        let pool = shuffled_blocks(&mut rng, blocks);
        let (table_a, table_b) = (&pool[..4], &pool[4..5]);
        let block_table: Vec<u32> = table_a.iter().chain(table_b).copied().collect();
        let mut meta: Vec<[u32; 2]> = (9..15).map(|p| [p, 0]).collect();
        meta.extend((2..4).map(|p| [p, 4]));
        meta.push([NO_POSITION, 0]);
        let n_tokens = meta.len() as u32;
        let (meta_b, table_buf) = step_tokens(&gpu, &meta, &block_table);
        let tokens = StepTokens { meta: &meta_b, block_table: &table_buf };
        let n = n_tokens as usize * n_kv * head_dim;
        let (k, v) = (uniform(&mut rng, n, -2.0, 2.0), uniform(&mut rng, n, -2.0, 2.0));
        let shape = rope::RopeShape {
            n_tokens,
            n_heads: n_kv as u32,
            head_dim: head_dim as u32,
            layout: rope::RopeLayout::HalfSplit,
        };
        let d = rope::rope_kv(
            &gpu,
            &table,
            &upload_f32(&gpu, "k", &k),
            &upload_f32(&gpu, "v", &v),
            &kc,
            &vc,
            shape,
            kv,
            tokens,
        )
        .unwrap();
        gpu.run("rope_kv", &[&d]).unwrap();
        let read = |b: &wgpu::Buffer| -> Vec<f32> {
            let bytes = gpu.read_bytes(b, cache_bytes as u64).unwrap();
            if gpu.caps.f16 {
                bytes.chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            } else {
                bytemuck::pod_collect_to_vec(&bytes)
            }
        };
        let (kc_host, vc_host) = (read(&kc), read(&vc));
        let positions: Vec<u32> = meta.iter().map(|m| if m[0] == NO_POSITION { 0 } else { m[0] }).collect();
        let k_rot = rope::rope_cpu(&k, shape, &positions, &inv);
        // Store tolerance: one f16 rounding (2^-11 relative) when the cache is f16, else the rope bound.
        let tol = |x: f32| {
            if gpu.caps.f16 {
                x.abs() as f64 * 2f64.powi(-10) + 1e-7
            } else {
                32.0 * U32
            }
        };
        // Which token (if any) owns each slot.
        let mut owner = vec![None; slots];
        for (t, m) in meta.iter().enumerate() {
            if m[0] != NO_POSITION {
                owner[kv.slot(&block_table, m[1], m[0]) as usize] = Some(t);
            }
        }
        assert_eq!(owner.iter().flatten().count(), 8, "every real token has its own slot");
        for h in 0..n_kv {
            for (slot, who) in owner.iter().enumerate() {
                let at = (h * slots + slot) * head_dim;
                for e in 0..head_dim {
                    let Some(t) = who else {
                        assert!(
                            kc_host[at + e].is_nan() && vc_host[at + e].is_nan(),
                            "{name}: cache slot {slot} head {h} was overwritten"
                        );
                        continue;
                    };
                    let src = (t * n_kv + h) * head_dim + e;
                    let (gk, gv) = (kc_host[at + e], vc_host[at + e]);
                    assert!(
                        (gk - k_rot[src]).abs() as f64 <= tol(k_rot[src]),
                        "{name}: k slot {slot} h={h} e={e}: {gk} vs {}",
                        k_rot[src]
                    );
                    assert!(
                        (gv - v[src]).abs() as f64 <= tol(v[src]),
                        "{name}: v slot {slot} h={h} e={e}: {gv} vs {}",
                        v[src]
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------- attention

struct AttnCase {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    /// Per sequence: (tokens in this step, positions already in the cache before them).
    seqs: &'static [(u32, u32)],
    /// Sliding window (0: none).
    window: u32,
}

/// Paged attention against the reference: the step's sequences on random, shuffled,
/// non-contiguous block tables (blocks of 16) in a pool with spare blocks; every slot the step
/// must not read is NaN (spare blocks, and keys older than any query's sliding window); a
/// padding token at the end must come out as zeros.
fn check_attention(gpu: &Gpu, name: &str, c: &AttnCase, rng: &mut rand::rngs::StdRng) -> u32 {
    let block_size = 16u32;
    let d = c.head_dim as usize;
    let needed: u32 = c.seqs.iter().map(|&(n, past)| (n + past).div_ceil(block_size)).sum();
    let blocks = needed + 5;
    let kv = KvGeometry { slots: blocks * block_size, block_size };
    let shape = attention::AttentionShape {
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
        kv,
        window: c.window,
    };
    let pool = shuffled_blocks(rng, blocks);
    let mut block_table = Vec::new();
    let mut meta = Vec::new();
    let mut readable = vec![false; kv.slots as usize];
    for &(n, past) in c.seqs {
        let start = block_table.len() as u32;
        let len = n + past;
        block_table.extend_from_slice(&pool[start as usize..(start + len.div_ceil(block_size)) as usize]);
        // The step's first query (at `past`) sees the oldest keys any of its queries sees.
        for pos in shape.first_key(past + 1)..len {
            readable[kv.slot(&block_table, start, pos) as usize] = true;
        }
        meta.extend((past..len).map(|pos| [pos, start]));
    }
    meta.push([NO_POSITION, 0]);
    let n_tokens = meta.len() as u32;
    let max_kv_len = c.seqs.iter().map(|&(n, past)| n + past).max().unwrap();
    let slots = kv.slots as usize;
    let cache_len = c.n_kv_heads as usize * slots * d;
    let mut k = uniform(rng, cache_len, -1.0, 1.0);
    let mut v = uniform(rng, cache_len, -1.0, 1.0);
    for h in 0..c.n_kv_heads as usize {
        for (slot, _) in readable.iter().enumerate().filter(|(_, r)| !**r) {
            for e in 0..d {
                k[(h * slots + slot) * d + e] = f32::NAN;
                v[(h * slots + slot) * d + e] = f32::NAN;
            }
        }
    }
    let (k, v) = if gpu.caps.f16 { (round_f16(&k), round_f16(&v)) } else { (k, v) };
    let upload = |label: &str, x: &[f32]| {
        if gpu.caps.f16 {
            gpu.upload(label, &f16_bytes(x)).unwrap()
        } else {
            upload_f32(gpu, label, x)
        }
    };
    let (kc, vc) = (upload("k cache", &k), upload("v cache", &v));
    let (meta_b, table_b) = step_tokens(gpu, &meta, &block_table);
    let tokens = StepTokens { meta: &meta_b, block_table: &table_b };
    let nq = (n_tokens * c.n_heads) as usize * d;
    let q = uniform(rng, nq, -1.0, 1.0);
    let qb = upload_f32(gpu, "q", &q);
    let want = attention::attention_cpu(&shape, &q, &k, &v, &meta, &block_table);
    assert!(want[nq - c.n_heads as usize * d..].iter().all(|&x| x == 0.0), "the reference zeroes padding");

    let tol = attention::output_error_bound(c.head_dim, max_kv_len);
    let why =
        "score error D·u·|s|max plus exp error (3+2|s|) ulp, doubled for the normalisation, plus kv_len·u summation";
    let what =
        format!("{name} Hq={} Hkv={} D={} seqs={:?} window={}", c.n_heads, c.n_kv_heads, c.head_dim, c.seqs, c.window);

    let out = poisoned(gpu, "out", nq);
    gpu.run("attention prefill", &[&attention::prefill(gpu, &shape, &qb, &kc, &vc, &out, n_tokens, tokens).unwrap()])
        .unwrap();
    assert_close(&format!("attention prefill {what}"), &gpu.read_f32(&out, nq).unwrap(), &want, tol, why);

    let splits = shape.splits(n_tokens, shape.visible(max_kv_len), 64);
    let partials = attention::Partials::new(gpu, &shape, n_tokens * splits.0).unwrap();
    for kernel in [attention::SplitKernel::Workgroup, attention::SplitKernel::Lanes] {
        let out = poisoned(gpu, "out", nq);
        let [split, reduce] =
            attention::decode_with(gpu, kernel, &shape, &qb, &kc, &vc, &out, &partials, n_tokens, splits, tokens)
                .unwrap();
        gpu.run("attention decode", &[&split, &reduce]).unwrap();
        assert_close(
            &format!("attention split-KV {kernel:?} {what} splits={splits:?}"),
            &gpu.read_f32(&out, nq).unwrap(),
            &want,
            tol,
            why,
        );
    }
    splits.0
}

#[test]
fn paged_attention_matches_reference_for_mha_gqa_mqa_and_every_head_dim() {
    let mut rng = rng("attention");
    for (name, gpu) in devices() {
        let cases = [
            // head_dim 64, 80, 96, 128 with GQA groups of 3, 7 (MQA-like), 4.
            AttnCase { n_heads: 9, n_kv_heads: 3, head_dim: 64, seqs: &[(37, 0)], window: 0 },
            AttnCase { n_heads: 7, n_kv_heads: 1, head_dim: 80, seqs: &[(5, 70), (1, 16), (3, 0)], window: 0 },
            AttnCase { n_heads: 8, n_kv_heads: 2, head_dim: 96, seqs: &[(1, 300)], window: 0 },
            AttnCase { n_heads: 4, n_kv_heads: 1, head_dim: 128, seqs: &[(67, 3), (1, 31)], window: 0 },
            // MHA, and a group larger than one workgroup's 8 heads (MQA with 18 heads).
            AttnCase { n_heads: 3, n_kv_heads: 3, head_dim: 64, seqs: &[(2, 130), (1, 15), (16, 0)], window: 0 },
            AttnCase { n_heads: 18, n_kv_heads: 1, head_dim: 64, seqs: &[(3, 200)], window: 0 },
            // Many decoding sequences at once, each at its own length.
            AttnCase {
                n_heads: 9,
                n_kv_heads: 3,
                head_dim: 64,
                seqs: &[(1, 0), (1, 15), (1, 16), (1, 17), (1, 100), (1, 63)],
                window: 0,
            },
            // Sliding windows: shorter and longer than the sequences, one key (itself), a
            // window that is not a multiple of the block size, and one long enough to split.
            AttnCase {
                n_heads: 8,
                n_kv_heads: 2,
                head_dim: 64,
                seqs: &[(5, 70), (1, 16), (3, 0), (40, 0), (1, 15)],
                window: 16,
            },
            AttnCase { n_heads: 7, n_kv_heads: 1, head_dim: 80, seqs: &[(37, 11), (1, 90)], window: 23 },
            AttnCase { n_heads: 4, n_kv_heads: 2, head_dim: 32, seqs: &[(9, 4), (1, 40)], window: 1 },
            AttnCase { n_heads: 8, n_kv_heads: 2, head_dim: 96, seqs: &[(1, 600), (2, 300)], window: 257 },
        ];
        let mut max_splits = 0;
        for c in &cases {
            max_splits = max_splits.max(check_attention(&gpu, name, c, &mut rng));
        }
        assert!(max_splits > 1, "some case must exercise several KV splits");
    }
}

#[test]
fn attention_rejects_impossible_shapes() {
    let kv = KvGeometry { slots: 64, block_size: 16 };
    let shape = attention::AttentionShape { n_heads: 6, n_kv_heads: 4, head_dim: 64, kv, window: 0 };
    assert!(shape.validate().is_err(), "6 heads cannot share 4 KV heads");
    let shape = attention::AttentionShape { n_heads: 4, n_kv_heads: 2, head_dim: 256, kv, window: 0 };
    assert!(shape.validate().is_err(), "head_dim 256 is over the kernel's 128");
    let ragged = KvGeometry { slots: 60, block_size: 16 };
    let shape = attention::AttentionShape { n_heads: 4, n_kv_heads: 2, head_dim: 64, kv: ragged, window: 0 };
    let err = shape.validate().expect_err("a pool of partial blocks must fail");
    assert!(err.to_string().contains("blocks"), "{err}");
}

#[test]
fn gemv_can_start_at_a_later_row_of_x() {
    // The lm-head of a prefill reads only the last token's row of the normed activations.
    let mut rng = rng("gemv x_row");
    for (name, gpu) in devices() {
        for kind in [gemv::GemvKernel::Reduce, gemv::GemvKernel::RowPerInvocation, gemv::GemvKernel::Blocks] {
            for k in [64usize, 67] {
                let (rows_x, n) = (5usize, 23usize);
                let x = uniform(&mut rng, rows_x * k, -1.0, 1.0);
                let (w, exact) = weight(&gpu, "w", n, k, DType::F16, &uniform(&mut rng, n * k, -1.0, 1.0));
                let y = poisoned(&gpu, "y", n);
                let ds = gemv::gemv_with(&gpu, kind, &upload_f32(&gpu, "x", &x), &w, None, &y, 1, 4).unwrap();
                gpu.run("gemv x_row", &ds.iter().collect::<Vec<_>>()).unwrap();
                let want = matmul::matmul_cpu(&x[4 * k..], &exact, None, 1, n, k);
                let abs_sum = matmul::matmul_cpu(
                    &x[4 * k..].iter().map(|v| v.abs()).collect::<Vec<_>>(),
                    &exact.iter().map(|v| v.abs()).collect::<Vec<_>>(),
                    None,
                    1,
                    n,
                    k,
                );
                assert_close_each(
                    &format!("gemv x_row {name} {kind:?} k={k}"),
                    &gpu.read_f32(&y, n).unwrap(),
                    &want,
                    |i| dot_bound(abs_sum[i], k, want[i]),
                    "f32 accumulation of k products",
                );
            }
        }
    }
}

// ---------------------------------------------------------------- GGUF block formats

const BLOCK_TYPES: [DType; 8] =
    [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q4K, DType::Q5K, DType::Q6K];

#[test]
fn quantized_weights_decode_inside_gemv_matmul_and_embedding() {
    let mut rng = rng("quantized");
    let (_, gpu) = devices().remove(0);
    let small = small_binding_device(1024);
    for dtype in BLOCK_TYPES {
        // Odd block counts per row (3 × 32, 1 × 256 + ...) make rows start at unaligned bytes.
        let cols = if dtype.block().0 == 32 { 96 } else { 512 };
        for (gname, g) in [("whole", &gpu), ("chunked", &small)] {
            let (m, n) = (3usize, 37usize);
            let (bytes, exact) = quantized(dtype, n, cols, &mut rng);
            let w = Weight::upload(g, "wq", n as u32, cols as u32, dtype, &bytes).unwrap();
            if gname == "chunked" {
                assert!(w.chunks.len() > 1, "{dtype:?}: {} chunk", w.chunks.len());
            }
            let x = uniform(&mut rng, m * cols, -1.0, 1.0);
            let xb = upload_f32(g, "x", &x);
            let want = matmul::matmul_cpu(&x, &exact, None, m, n, cols);
            let abs_sum = matmul::matmul_cpu(
                &x.iter().map(|v| v.abs()).collect::<Vec<_>>(),
                &exact.iter().map(|v| v.abs()).collect::<Vec<_>>(),
                None,
                m,
                n,
                cols,
            );
            for kind in [
                "gemv Reduce",
                "gemv RowPerInvocation",
                "gemv Blocks",
                "matmul Tiled",
                "matmul Registers",
                "matmul Blocks",
            ] {
                let y = poisoned(g, "y", m * n);
                let ds = match kind {
                    "gemv Reduce" => gemv::gemv_with(g, gemv::GemvKernel::Reduce, &xb, &w, None, &y, m as u32, 0),
                    "gemv RowPerInvocation" => {
                        gemv::gemv_with(g, gemv::GemvKernel::RowPerInvocation, &xb, &w, None, &y, m as u32, 0)
                    }
                    "gemv Blocks" => gemv::gemv_with(g, gemv::GemvKernel::Blocks, &xb, &w, None, &y, m as u32, 0),
                    "matmul Tiled" => matmul::matmul_with(g, matmul::MatmulKernel::Tiled, &xb, &w, None, &y, m as u32),
                    "matmul Blocks" => {
                        matmul::matmul_with(g, matmul::MatmulKernel::Blocks, &xb, &w, None, &y, m as u32)
                    }
                    _ => matmul::matmul_with(g, matmul::MatmulKernel::Registers, &xb, &w, None, &y, m as u32),
                }
                .unwrap();
                g.run(kind, &ds.iter().collect::<Vec<_>>()).unwrap();
                assert_close_each(&format!("{kind} {dtype:?} {gname}"), &g.read_f32(&y, m * n).unwrap(), &want, |i| dot_bound(abs_sum[i], cols + 6, want[i]),
                    "per-element decode within 4u (scale products may fuse differently), then f32 accumulation of k products");
            }
            let ids = [0u32, 17, n as u32 - 1];
            let xe = poisoned(g, "x", ids.len() * cols);
            let ds = embedding::embedding(
                g,
                &g.upload("ids", bytemuck::cast_slice(&ids)).unwrap(),
                &w,
                &xe,
                ids.len() as u32,
            )
            .unwrap();
            g.run("embedding", &ds.iter().collect::<Vec<_>>()).unwrap();
            let want_rows = embedding::embedding_cpu(&ids, &exact, cols);
            assert_close_each(
                &format!("embedding {dtype:?} {gname}"),
                &g.read_f32(&xe, ids.len() * cols).unwrap(),
                &want_rows,
                |i| want_rows[i].abs() as f64 * 4.0 * U32 + 1e-30,
                "decode of one element: a product (and a sum) of exact f16 scales and small integers, ≤ 4u",
            );
        }
    }
}

#[test]
fn gather_rows_picks_the_wanted_rows() {
    let mut rng = rng("gather_rows");
    for (name, gpu) in devices() {
        let (src_rows, dim) = (37usize, 579usize);
        let src = uniform(&mut rng, src_rows * dim, -3.0, 3.0);
        let rows: Vec<u32> = (0..11).map(|_| rng.random_range(0..src_rows as u32)).collect();
        let out = poisoned(&gpu, "out", rows.len() * dim);
        let d = embedding::gather_rows(
            &gpu,
            &upload_f32(&gpu, "src", &src),
            &gpu.upload("rows", bytemuck::cast_slice(&rows)).unwrap(),
            &out,
            rows.len() as u32,
            src_rows as u32,
            dim as u32,
        )
        .unwrap();
        gpu.run("gather_rows", &[&d]).unwrap();
        let want = embedding::embedding_cpu(&rows, &src, dim);
        assert_close(
            &format!("gather_rows {name}"),
            &gpu.read_f32(&out, want.len()).unwrap(),
            &want,
            0.0,
            "a copy is exact",
        );
    }
}

#[test]
fn attention_probabilities_match_reference_on_paged_tables() {
    let mut rng = rng("attention_probs");
    // Full causal attention, and a 13-key sliding window.
    for ((name, gpu), window) in devices().into_iter().flat_map(|d| [(d.clone(), 0u32), (d, 13)]) {
        let (n_heads, n_kv_heads, head_dim, block_size) = (9u32, 3u32, 64u32, 16u32);
        let blocks = 9u32;
        let kv = KvGeometry { slots: blocks * block_size, block_size };
        let shape = attention::AttentionShape { n_heads, n_kv_heads, head_dim, kv, window };
        let pool = shuffled_blocks(&mut rng, blocks);
        // A 21-token prompt chunk after 17 cached positions, a decode token at 40, a padding token.
        let block_table: Vec<u32> = pool[..3].iter().chain(&pool[3..6]).copied().collect();
        let mut meta: Vec<[u32; 2]> = (17..38).map(|p| [p, 0]).collect();
        meta.push([40, 3]);
        meta.push([NO_POSITION, 0]);
        let n_tokens = meta.len() as u32;
        let n_keys = 41usize;
        let cache_len = (n_kv_heads * kv.slots * head_dim) as usize;
        let k = uniform(&mut rng, cache_len, -1.0, 1.0);
        let k = if gpu.caps.f16 { round_f16(&k) } else { k };
        let kc = if gpu.caps.f16 { gpu.upload("k", &f16_bytes(&k)).unwrap() } else { upload_f32(&gpu, "k", &k) };
        let q = uniform(&mut rng, (n_tokens * n_heads * head_dim) as usize, -1.0, 1.0);
        let (meta_b, table_b) = step_tokens(&gpu, &meta, &block_table);
        let tokens = StepTokens { meta: &meta_b, block_table: &table_b };
        let len = n_heads as usize * n_tokens as usize * n_keys;
        let probs = poisoned(&gpu, "probs", len);
        let d = attention::probabilities(
            &gpu,
            &shape,
            &upload_f32(&gpu, "q", &q),
            &kc,
            &probs,
            n_tokens,
            n_keys as u32,
            tokens,
        )
        .unwrap();
        gpu.run("attention probs", &[&d]).unwrap();
        let got = gpu.read_f32(&probs, len).unwrap();
        let want = attention::probabilities_cpu(&shape, &q, &k, &meta, &block_table, n_keys);
        let tol = attention::probability_error_bound(head_dim, n_keys as u32);
        let what = format!("attention probs {name} window {window}");
        assert_close(&what, &got, &want, tol, "score, exp and sum error bounds");
        for (row, r) in got.chunks(n_keys).enumerate() {
            let t = row % n_tokens as usize;
            let sum: f32 = r.iter().sum();
            if meta[t][0] == NO_POSITION {
                assert!(r.iter().all(|&x| x == 0.0), "{what}: a padding row is zeros");
            } else {
                let pos = meta[t][0] as usize;
                assert!((sum - 1.0).abs() < 1e-5, "{what}: row {row} sums to {sum}");
                assert!(r[pos + 1..].iter().all(|&x| x == 0.0), "{what}: row {row} sees no later key");
                let first = shape.first_key(pos as u32 + 1) as usize;
                assert_eq!(first, if window == 0 { 0 } else { (pos + 1).saturating_sub(13) });
                assert!(r[..first].iter().all(|&x| x == 0.0), "{what}: row {row} sees no key before its window");
                assert!(r[first..=pos].iter().all(|&x| x > 0.0), "{what}: row {row} sees its window");
            }
        }
    }
}
