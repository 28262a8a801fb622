//! `kiln doctor`: on the user's own adapter and driver, every kernel a model uses runs at that
//! model's shapes against its CPU reference, with the model's own weights (read back from the
//! GPU and decoded on the CPU). Each check reports pass or fail, the worst error against its
//! bound, and its speed; the report names the paths the device chose. Drivers that compute a
//! kernel wrongly show up here instead of as silently wrong text.

use crate::bench::best_seconds;
use crate::gpu::{Gpu, Weight};
use crate::model::Model;
use crate::ops::{argmax, attention, gemv, matmul, rms_norm, rope, KvGeometry, StepTokens};
use crate::{KilnError, Result};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// f32 unit roundoff.
const U: f64 = f32::EPSILON as f64 / 2.0;

#[derive(Clone, Debug)]
pub struct Check {
    pub op: String,
    pub shape: String,
    pub passed: bool,
    pub worst_error: f64,
    /// The bound the worst error is held to, at the element where error / bound is largest.
    pub bound: f64,
    pub seconds: f64,
    /// "… GB/s" or "… GFLOP/s".
    pub rate: String,
}

#[derive(Clone, Debug)]
pub struct DoctorReport {
    pub adapter: String,
    pub model: String,
    pub checks: Vec<Check>,
}

impl DoctorReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "adapter": self.adapter,
            "model": self.model,
            "passed": self.passed(),
            "checks": self.checks.iter().map(|c| json!({
                "op": c.op, "shape": c.shape, "passed": c.passed, "worst_error": c.worst_error,
                "bound": c.bound, "seconds": c.seconds, "rate": c.rate,
            })).collect::<Vec<_>>(),
        })
    }

    pub fn to_table(&self) -> String {
        let mut s = format!("adapter: {}\nmodel:   {}\n\n", self.adapter, self.model);
        s += "| check | shape | result | worst error | bound | time | speed |\n|---|---|---|---|---|---|---|\n";
        for c in &self.checks {
            s += &format!(
                "| {} | {} | {} | {:.2e} | {:.2e} | {:.3} ms | {} |\n",
                c.op,
                c.shape,
                if c.passed { "pass" } else { "FAIL" },
                c.worst_error,
                c.bound,
                c.seconds * 1e3,
                c.rate
            );
        }
        let failed = self.checks.iter().filter(|c| !c.passed).count();
        s += &if failed == 0 {
            format!("\nall {} checks passed\n", self.checks.len())
        } else {
            format!("\n{failed} of {} checks FAILED: this driver computes kiln's kernels wrongly\n", self.checks.len())
        };
        s
    }
}

/// Compare `got` with `want` element by element against `bound(i)`; NaN never passes.
fn compare(got: &[f32], want: &[f32], bound: impl Fn(usize) -> f64) -> (bool, f64, f64) {
    let (mut passed, mut worst, mut worst_bound, mut worst_ratio) = (got.len() == want.len(), 0f64, 0f64, -1f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w as f64).abs();
        let b = bound(i);
        if !g.is_finite() || err.is_nan() || err > b {
            passed = false;
        }
        let ratio = if err.is_nan() { f64::INFINITY } else { err / b.max(1e-300) };
        if ratio > worst_ratio {
            (worst_ratio, worst_bound) = (ratio, b);
        }
        worst = worst.max(if err.is_nan() { f64::INFINITY } else { err });
    }
    (passed, worst, worst_bound)
}

/// The first `rows` rows of a weight, decoded on the CPU from the bytes the GPU holds.
fn weight_rows(gpu: &Gpu, w: &Weight, rows: usize) -> Result<Vec<f32>> {
    let chunk = &w.chunks[0];
    let rows = rows.min(chunk.rows as usize);
    let n = rows * w.cols as usize;
    let bytes = w.dtype.bytes_for(n as u64);
    let raw = gpu.read_bytes(&chunk.buffer, bytes)?;
    crate::quant::decode(w.dtype, &raw, n)
}

/// Rows of each weight checked against the CPU (the GPU computes them all).
const CHECK_ROWS: usize = 1024;

/// y = x·Wᵀ for `m` rows, gemv (m = 1) or matmul, on the device's kernel choice.
fn check_linear(gpu: &Gpu, w: &Weight, what: &str, m: usize, rng: &mut rand::rngs::StdRng) -> Result<Check> {
    let (k, n) = (w.cols as usize, w.rows as usize);
    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let xb = gpu.upload("doctor x", bytemuck::cast_slice(&x))?;
    let y = gpu.upload("doctor y", bytemuck::cast_slice(&vec![f32::NAN; m * n]))?;
    let dispatches =
        if m == 1 { gemv::gemv(gpu, &xb, w, None, &y, 1)? } else { matmul::matmul(gpu, &xb, w, None, &y, m as u32)? };
    let refs: Vec<&crate::gpu::Dispatch> = dispatches.iter().collect();
    gpu.run("doctor linear", &refs)?;
    let got = gpu.read_f32(&y, m * n)?;
    let rows = CHECK_ROWS.min(w.chunks[0].rows as usize);
    let wr = weight_rows(gpu, w, rows)?;
    let want = matmul::matmul_cpu(&x, &wr, None, m, rows, k);
    // Only the checked rows of each output row.
    let got: Vec<f32> = (0..m).flat_map(|t| got[t * n..t * n + rows].iter().copied()).collect();
    let abs: Vec<f64> = (0..m * rows)
        .map(|i| {
            let (t, r) = (i / rows, i % rows);
            (0..k).map(|j| (x[t * k + j] * wr[r * k + j]).abs() as f64).sum()
        })
        .collect();
    let (passed, worst, bound) = compare(&got, &want, |i| matmul::dot_error_bound(abs[i], k, want[i]));
    let seconds = best_seconds(gpu, "doctor linear", &refs, 0.2)?;
    let rate = if m == 1 {
        format!("{:.2} GB/s", w.bytes() as f64 / seconds / 1e9)
    } else {
        format!("{:.2} GFLOP/s", 2.0 * (m * n * k) as f64 / seconds / 1e9)
    };
    let kind = if m == 1 { "gemv" } else { "matmul" };
    Ok(Check {
        op: format!("{kind} {what}"),
        shape: format!("{m}×{k} · ({n}×{k} {:?})ᵀ", w.dtype),
        passed,
        worst_error: worst,
        bound,
        seconds,
        rate,
    })
}

/// Run every check for `model` on its device.
pub fn run(model: &Model, mut log: impl FnMut(&str)) -> Result<DoctorReport> {
    let gpu = &model.gpu;
    let c = &model.config;
    let w = &model.weights;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x646f63746f72);
    let mut checks = Vec::new();
    let l0 = &w.layers[0];
    // The first layer's matrices (a mixture's router and expert stacks are matrices too) and the
    // lm-head, by their short names.
    let mut linears: Vec<&Weight> = vec![&l0.q_proj, &l0.k_proj, &l0.v_proj, &l0.o_proj];
    linears.extend(l0.mlp.matrices());
    linears.push(w.lm_head());
    for weight in linears {
        let name = weight.name.trim_start_matches("model.layers.0.").trim_end_matches(".weight");
        let name = name.trim_start_matches("self_attn.").trim_start_matches("mlp.");
        let name = if std::ptr::eq(weight, w.lm_head()) { "lm_head" } else { name };
        for m in [1, 7] {
            log(&format!("{} {name}", if m == 1 { "gemv" } else { "matmul" }));
            checks.push(check_linear(gpu, weight, name, m, &mut rng)?);
        }
    }

    // RMSNorm over the model's hidden size, with its first norm's weights.
    log("rms_norm");
    {
        let (rows, dim) = (5usize, c.hidden_size);
        let x: Vec<f32> = (0..rows * dim).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let weight = gpu.read_f32(&l0.input_layernorm, dim)?;
        let xb = gpu.upload("doctor x", bytemuck::cast_slice(&x))?;
        let y = gpu.upload("doctor y", bytemuck::cast_slice(&vec![f32::NAN; rows * dim]))?;
        let d = rms_norm::rms_norm(gpu, &xb, &l0.input_layernorm, &y, rows as u32, dim as u32, c.rms_norm_eps)?;
        gpu.run("doctor rms_norm", &[&d])?;
        let got = gpu.read_f32(&y, rows * dim)?;
        let want = rms_norm::rms_norm_cpu(&x, &weight, dim, c.rms_norm_eps);
        // The mean of squares carries ≤ dim·u relative error, the inverse square root a few ulps:
        // ≤ (dim + 8)·u relative to each output.
        let (passed, worst, bound) = compare(&got, &want, |i| want[i].abs() as f64 * (dim as f64 + 8.0) * U + 1e-30);
        let seconds = best_seconds(gpu, "doctor rms_norm", &[&d], 0.1)?;
        checks.push(Check {
            op: "rms_norm".into(),
            shape: format!("{rows}×{dim}"),
            passed,
            worst_error: worst,
            bound,
            seconds,
            rate: format!("{:.2} GB/s", (2 * rows * dim * 4) as f64 / seconds / 1e9),
        });
    }

    // RoPE of q at the model's head size and frequencies, at scattered positions.
    log("rope");
    {
        let inv = rope::inv_freq_with_factors(
            c.head_dim,
            c.rope_theta,
            c.rope_scaling.as_ref(),
            c.rope_freq_factors.as_deref(),
        );
        let max_pos = model.default_context();
        let table = rope::upload_table(gpu, &rope::cos_sin_table(&inv, max_pos))?;
        let positions: Vec<u32> = (0..9).map(|_| rng.random_range(0..max_pos as u32)).collect();
        let meta: Vec<[u32; 2]> = positions.iter().map(|&p| [p, 0]).collect();
        let (meta_b, table_b) = (
            gpu.upload("doctor meta", bytemuck::cast_slice(&meta))?,
            gpu.upload("doctor table", bytemuck::cast_slice(&[0u32]))?,
        );
        let shape = rope::RopeShape {
            n_tokens: positions.len() as u32,
            n_heads: c.n_heads as u32,
            head_dim: c.head_dim as u32,
            layout: if c.rope_interleaved { rope::RopeLayout::Interleaved } else { rope::RopeLayout::HalfSplit },
        };
        let n = positions.len() * c.q_dim();
        let x: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let xb = gpu.upload("doctor q", bytemuck::cast_slice(&x))?;
        let d = rope::rope_q(gpu, &table, &xb, shape, StepTokens { meta: &meta_b, block_table: &table_b })?;
        gpu.run("doctor rope", &[&d])?;
        let got = gpu.read_f32(&xb, n)?;
        let want = rope::rope_cpu(&x, shape, &positions, &inv);
        // cos/sin rounded to f32, two products and a sum of |x| ≤ 2 values: ≤ 16u·2.
        let (passed, worst, bound) = compare(&got, &want, |_| 32.0 * U);
        checks.push(Check {
            op: "rope".into(),
            shape: format!("{} tokens × {} heads × {}", positions.len(), c.n_heads, c.head_dim),
            passed,
            worst_error: worst,
            bound,
            seconds: 0.0,
            rate: String::new(),
        });
    }

    // Attention over a paged cache at the model's head shapes: a decode token at position 300
    // and a 7-token prompt chunk, on shuffled blocks; the device's kernels (split and fused).
    log("attention");
    for (what, seqs) in [("decode", vec![(1u32, 300u32)]), ("prompt chunk", vec![(7, 40), (1, 129)])] {
        let block_size = 16u32;
        let blocks: u32 = seqs.iter().map(|&(n, past)| (n + past).div_ceil(block_size)).sum::<u32>() + 3;
        let kv = KvGeometry { slots: blocks * block_size, block_size };
        let shape = attention::AttentionShape {
            n_heads: c.n_heads as u32,
            n_kv_heads: c.n_kv_heads as u32,
            head_dim: c.head_dim as u32,
            kv,
            window: 0,
        };
        let mut order: Vec<u32> = (0..blocks).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let (mut table, mut meta) = (Vec::new(), Vec::new());
        for &(n, past) in &seqs {
            let start = table.len() as u32;
            table.extend_from_slice(&order[start as usize..(start + (n + past).div_ceil(block_size)) as usize]);
            meta.extend((past..past + n).map(|p| [p, start]));
        }
        let n_tokens = meta.len() as u32;
        let max_kv = seqs.iter().map(|&(n, p)| n + p).max().unwrap_or(1);
        let cache_len = (shape.n_kv_heads * kv.slots * shape.head_dim) as usize;
        let mut k: Vec<f32> = (0..cache_len).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut v: Vec<f32> = (0..cache_len).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let upload_kv = |label: &str, x: &mut Vec<f32>| -> Result<wgpu::Buffer> {
            if gpu.caps.f16 {
                let h: Vec<half::f16> = x.iter().map(|&f| half::f16::from_f32(f)).collect();
                *x = h.iter().map(|f| f.to_f32()).collect();
                gpu.upload(label, bytemuck::cast_slice(&h))
            } else {
                gpu.upload(label, bytemuck::cast_slice(x))
            }
        };
        let (kc, vc) = (upload_kv("doctor k", &mut k)?, upload_kv("doctor v", &mut v)?);
        let nq = (n_tokens * shape.n_heads * shape.head_dim) as usize;
        let q: Vec<f32> = (0..nq).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let qb = gpu.upload("doctor q", bytemuck::cast_slice(&q))?;
        let (meta_b, table_b) = (
            gpu.upload("doctor meta", bytemuck::cast_slice(&meta))?,
            gpu.upload("doctor table", bytemuck::cast_slice(&table))?,
        );
        let tokens = StepTokens { meta: &meta_b, block_table: &table_b };
        let out = gpu.upload("doctor out", bytemuck::cast_slice(&vec![f32::NAN; nq]))?;
        let kernel = attention::SplitKernel::for_device(gpu);
        let dispatches: Vec<crate::gpu::Dispatch> = if n_tokens == 1 || kernel == attention::SplitKernel::Lanes {
            let splits = shape.splits(n_tokens, max_kv, 64);
            let partials = attention::Partials::new(gpu, &shape, n_tokens * splits.0)?;
            attention::decode_with(gpu, kernel, &shape, &qb, &kc, &vc, &out, &partials, n_tokens, splits, tokens)?
                .into()
        } else {
            vec![attention::prefill(gpu, &shape, &qb, &kc, &vc, &out, n_tokens, tokens)?]
        };
        let refs: Vec<&crate::gpu::Dispatch> = dispatches.iter().collect();
        gpu.run("doctor attention", &refs)?;
        let got = gpu.read_f32(&out, nq)?;
        let want = attention::attention_cpu(&shape, &q, &k, &v, &meta, &table);
        let tol = attention::output_error_bound(shape.head_dim, max_kv);
        let (passed, worst, bound) = compare(&got, &want, |_| tol);
        let seconds = best_seconds(gpu, "doctor attention", &refs, 0.1)?;
        checks.push(Check {
            op: format!("attention {what} ({kernel:?})"),
            shape: format!("{} q heads / {} kv heads × {}, keys ≤ {max_kv}", c.n_heads, c.n_kv_heads, c.head_dim),
            passed,
            worst_error: worst,
            bound,
            seconds,
            rate: format!(
                "{:.2} GB/s K+V",
                (2 * max_kv as u64 * c.kv_dim() as u64 * gpu.kv_element_bytes() as u64) as f64 / seconds / 1e9
            ),
        });
    }

    // Greedy picks over the vocabulary: exact.
    log("argmax");
    {
        let (rows, n) = (3usize, c.vocab_size);
        let x: Vec<f32> = (0..rows * n).map(|_| rng.random_range(-20.0f32..20.0)).collect();
        let xb = gpu.upload("doctor logits", bytemuck::cast_slice(&x))?;
        let out = gpu.buffer("doctor argmax", rows as u64 * 4)?;
        let d = argmax::argmax(gpu, &xb, &out, rows as u32, n as u32)?;
        gpu.run("doctor argmax", &[&d])?;
        let got = gpu.read_u32(&out, rows)?;
        let want = argmax::argmax_cpu(&x, n);
        let passed = got == want;
        checks.push(Check {
            op: "argmax".into(),
            shape: format!("{rows}×{n}"),
            passed,
            worst_error: if passed { 0.0 } else { 1.0 },
            bound: 0.0,
            seconds: 0.0,
            rate: String::new(),
        });
    }
    if checks.is_empty() {
        return Err(KilnError::Request("no checks ran".into()));
    }
    Ok(DoctorReport { adapter: gpu.describe(), model: model.dir.display().to_string(), checks })
}

#[cfg(test)]
mod tests {
    use super::compare;

    #[test]
    fn a_nan_or_an_error_over_its_bound_fails() {
        assert!(compare(&[1.0, 2.0], &[1.0, 2.0 + 1e-7], |_| 1e-6).0);
        assert!(!compare(&[1.0, f32::NAN], &[1.0, 2.0], |_| 1.0).0, "NaN never passes");
        assert!(!compare(&[1.0, 2.1], &[1.0, 2.0], |_| 0.05).0);
        assert!(!compare(&[1.0], &[1.0, 2.0], |_| 1.0).0, "a short output fails");
        let (_, worst, bound) = compare(&[1.0, 2.01], &[1.0, 2.0], |i| if i == 0 { 1e-9 } else { 0.1 });
        assert!((worst - 0.01).abs() < 1e-6 && bound == 0.1, "the worst error and its own bound");
    }
}
