// RMSNorm (Zhang & Sennrich, 2019) as in Llama and Qwen2:
//   y = x / sqrt(mean(x²) + eps) * weight        (PyTorch: LlamaRMSNorm.forward, in f32)
// One workgroup per row.

struct Params {
    rows: u32,
    dim: u32,
    eps: f32,
    _pad: u32,
}

const WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;          // (rows, dim)
@group(0) @binding(2) var<storage, read> weight: array<f32>;     // (dim)
@group(0) @binding(3) var<storage, read_write> y: array<f32>;    // (rows, dim)

@compute @workgroup_size(WG)
fn rms_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x;
    let base = row * p.dim;
    var sum_sq = 0.0;
    for (var i = lid; i < p.dim; i += WG) {
        let v = x[base + i];
        sum_sq += v * v;
    }
    let scale = inverseSqrt(workgroup_sum(sum_sq, lid) / f32(p.dim) + p.eps);
    for (var i = lid; i < p.dim; i += WG) {
        y[base + i] = x[base + i] * scale * weight[i];
    }
}
