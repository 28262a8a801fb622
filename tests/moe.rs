//! The mixture-of-experts kernels against their CPU references (ops/moe.rs): routing with ties
//! and both weightings, the grouping by expert, expert products over every weight encoding and
//! over stacks split across bindings, and the weighted combine with a shared expert. Fresh
//! seeded inputs, odd shapes, NaN-poisoned outputs, on both device paths.

mod common;

use common::*;
use kiln::gpu::{DType, Gpu, Weight};
use kiln::ops::{matmul, moe};
use rand::Rng;

/// Route `logits` on the GPU: (ids, weights, groups).
fn route_on(gpu: &Gpu, r: moe::Routing, logits: &[f32], norm: bool) -> (Vec<u32>, Vec<f32>, Vec<u32>) {
    let n = r.assignments() as usize;
    let lb = upload_f32(gpu, "logits", logits);
    let ids = gpu.upload("ids", &vec![0xffu8; n * 4]).unwrap();
    let weights = poisoned(gpu, "weights", n);
    let groups = gpu.upload("groups", &vec![0xffu8; r.groups_len() as usize * 4]).unwrap();
    let route = moe::route(gpu, r, &lb, &ids, &weights, norm).unwrap();
    let group = moe::group(gpu, r, &ids, &groups).unwrap();
    gpu.run("moe route", &[&route, &group]).unwrap();
    (
        gpu.read_u32(&ids, n).unwrap(),
        gpu.read_f32(&weights, n).unwrap(),
        gpu.read_u32(&groups, r.groups_len() as usize).unwrap(),
    )
}

/// Check `groups` (as the kernel lays it out) against the reference grouping of `ids`.
fn check_groups(what: &str, groups: &[u32], ids: &[u32], n_experts: usize) {
    let (starts, active, order) = moe::group_cpu(ids, n_experts);
    assert_eq!(&groups[..=n_experts], &starts[..], "{what}: expert starts");
    let n_active = groups[n_experts + 1] as usize;
    assert_eq!(&groups[n_experts + 2..][..n_active], &active[..], "{what}: active experts");
    assert_eq!(&groups[2 * n_experts + 2..], &order[..], "{what}: assignments by expert, stable");
}

#[test]
fn routing_picks_the_top_k_by_probability_ties_to_the_lower_expert() {
    let mut rng = rng("moe_route");
    for (path, gpu) in devices() {
        for (n_experts, top_k, n_tokens) in
            [(8usize, 2usize, 37usize), (60, 4, 5), (256, 8, 3), (3, 3, 1), (128, 1, 17)]
        {
            let mut logits = uniform(&mut rng, n_tokens * n_experts, -4.0, 4.0);
            // Exact ties: the lower expert wins, as torch.topk keeps the first of equal values.
            for t in 0..n_tokens {
                let (a, b) = (rng.random_range(0..n_experts), rng.random_range(0..n_experts));
                logits[t * n_experts + b] = logits[t * n_experts + a];
            }
            let r = moe::Routing { n_tokens: n_tokens as u32, n_experts: n_experts as u32, top_k: top_k as u32 };
            for norm in [false, true] {
                let what = format!("{path} {n_experts} experts top {top_k} norm {norm}");
                let (ids, weights, groups) = route_on(&gpu, r, &logits, norm);
                let (want_ids, want_weights) = moe::route_cpu(&logits, n_experts, top_k, norm);
                assert_eq!(ids, want_ids, "{what}: chosen experts");
                // exp within a few ulp, the sum over n_experts terms within n_experts·u, and as
                // much again for the renormalising sum: ≤ (2·n_experts + 8)·u relative.
                assert_close_each(
                    &what,
                    &weights,
                    &want_weights,
                    |i| want_weights[i] as f64 * (2.0 * n_experts as f64 + 8.0) * U32,
                    "softmax: exp ulps plus the normalising sums",
                );
                if norm {
                    for t in 0..n_tokens {
                        let s: f32 = weights[t * top_k..][..top_k].iter().sum();
                        assert!((s - 1.0).abs() < 1e-5, "{what}: token {t}'s weights sum to {s}");
                    }
                }
                check_groups(&what, &groups, &ids, n_experts);
            }
        }
    }
}

/// A stack of `n_experts` (rows × cols) matrices of `dtype`, uploaded, and its exact values.
fn expert_stack(
    gpu: &Gpu,
    dtype: DType,
    n_experts: usize,
    rows: usize,
    cols: usize,
    rng: &mut rand::rngs::StdRng,
) -> (Weight, Vec<f32>) {
    let n = n_experts * rows * cols;
    let (bytes, exact): (Vec<u8>, Vec<f32>) = match dtype {
        DType::F32 => {
            let v = uniform(rng, n, -1.0, 1.0);
            (bytemuck::cast_slice(&v).to_vec(), v)
        }
        DType::F16 => {
            let v = uniform(rng, n, -1.0, 1.0);
            (f16_bytes(&v), round_f16(&v))
        }
        _ => quantized(dtype, n_experts * rows, cols, rng),
    };
    let (e, r, c) = (n_experts as u32, rows as u32, cols as u32);
    (Weight::upload_stacked(gpu, "experts", e, r, c, dtype, &bytes).unwrap(), exact)
}

#[test]
fn expert_products_use_each_assignments_own_expert_in_every_encoding() {
    let mut rng = rng("moe_experts");
    let mut cases: Vec<(&str, std::sync::Arc<Gpu>)> = devices();
    // A binding of 32 KiB holds four experts of 37 × 96 f16 (two of f32): the stack is split,
    // by whole experts.
    cases.push(("chunked", small_binding_device(32 << 10)));
    for (path, gpu) in cases {
        for dtype in [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4K, DType::Q6K] {
            // Columns: whole 32-blocks (the block path), whole 256-blocks for K-quants, and 44
            // (f32 only) for the element-by-element path.
            let cols_list: &[usize] = match dtype {
                DType::Q4K | DType::Q6K => &[256],
                DType::F32 => &[96, 44],
                _ => &[96],
            };
            for &cols in cols_list {
                let (n_experts, top_k, n_tokens, rows) = (7usize, 2usize, 9usize, 37usize);
                let (w, exact) = expert_stack(&gpu, dtype, n_experts, rows, cols, &mut rng);
                if path == "chunked" && dtype == DType::F16 {
                    assert!(w.chunks.len() > 1, "the stack is split ({} chunks)", w.chunks.len());
                }
                let r = moe::Routing { n_tokens: n_tokens as u32, n_experts: n_experts as u32, top_k: top_k as u32 };
                let logits = uniform(&mut rng, n_tokens * n_experts, -2.0, 2.0);
                let (ids, _, groups) = route_on(&gpu, r, &logits, true);
                let groups_b = gpu.upload("groups", bytemuck::cast_slice(&groups)).unwrap();
                for x_per_token in [true, false] {
                    let x_rows = if x_per_token { n_tokens } else { n_tokens * top_k };
                    let x = uniform(&mut rng, x_rows * cols, -1.0, 1.0);
                    let y = poisoned(&gpu, "y", ids.len() * rows);
                    let ds = moe::expert_matmul(&gpu, r, &w, &upload_f32(&gpu, "x", &x), x_per_token, &groups_b, &y)
                        .unwrap();
                    gpu.run("expert_matmul", &ds.iter().collect::<Vec<_>>()).unwrap();
                    let got = gpu.read_f32(&y, ids.len() * rows).unwrap();
                    let want = moe::expert_matmul_cpu(&exact, cols, rows, &x, &ids, top_k, x_per_token);
                    let abs = |v: &[f32]| v.iter().map(|a| a.abs()).collect::<Vec<_>>();
                    let abs_sum = moe::expert_matmul_cpu(&abs(&exact), cols, rows, &abs(&x), &ids, top_k, x_per_token);
                    assert_close_each(
                        &format!("{path} {dtype:?} cols {cols} x per token {x_per_token}"),
                        &got,
                        &want,
                        |i| matmul::dot_error_bound(abs_sum[i] as f64, cols + 6, want[i]),
                        "per-element decode within 4u, then f32 accumulation of k products (as the linear kernels)",
                    );
                }
            }
        }
    }
}

#[test]
fn combine_adds_the_weighted_experts_and_the_gated_shared_expert() {
    let mut rng = rng("moe_combine");
    for (path, gpu) in devices() {
        let (n_tokens, top_k, dim) = (13usize, 3usize, 75usize);
        let r = moe::Routing { n_tokens: n_tokens as u32, n_experts: 5, top_k: top_k as u32 };
        let weights = uniform(&mut rng, n_tokens * top_k, 0.0, 1.0);
        let out = uniform(&mut rng, n_tokens * top_k * dim, -2.0, 2.0);
        let shared_out = uniform(&mut rng, n_tokens * dim, -2.0, 2.0);
        let gate = uniform(&mut rng, n_tokens, -3.0, 3.0);
        for with_shared in [false, true] {
            let residual = uniform(&mut rng, n_tokens * dim, -1.0, 1.0);
            let res_b = upload_f32(&gpu, "residual", &residual);
            let (sob, gb) = (upload_f32(&gpu, "shared", &shared_out), upload_f32(&gpu, "gate", &gate));
            let shared = with_shared.then_some((&sob, &gb));
            let d = moe::combine(
                &gpu,
                r,
                dim as u32,
                &upload_f32(&gpu, "weights", &weights),
                &upload_f32(&gpu, "out", &out),
                shared,
                &res_b,
            )
            .unwrap();
            gpu.run("combine", &[&d]).unwrap();
            let shared_ref = with_shared.then_some((&shared_out[..], &gate[..]));
            let want = moe::combine_cpu(&residual, dim, top_k, &weights, &out, shared_ref);
            assert_close(
                &format!("{path} combine shared {with_shared}"),
                &gpu.read_f32(&res_b, n_tokens * dim).unwrap(),
                &want,
                1e-5,
                "a sum of ≤ 5 terms of magnitude ≤ 2 with a sigmoid: a few ulps of 10",
            );
        }
    }
}
