// Element-wise ops of the transformer block.
//   swiglu: y = silu(gate) * up, silu(g) = g * sigmoid(g)   (Shazeer 2020; HF LlamaMLP)
//   add:    y = a + b                                      (residual connection)
// A 2-D grid of 256-wide workgroups covers any length (more than 65535 × 256 elements).

struct Params {
    n: u32,            // elements
    groups_x: u32,     // workgroups along x, to flatten the 2-D grid
    _pad0: u32,
    _pad1: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;          // (n) gate for swiglu
@group(0) @binding(2) var<storage, read> b: array<f32>;          // (n) up for swiglu
@group(0) @binding(3) var<storage, read_write> y: array<f32>;    // (n)

fn index(wid: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * p.groups_x + wid.x) * WG + lid;
}

@compute @workgroup_size(WG)
fn swiglu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, lid);
    if i < p.n {
        let g = a[i];
        y[i] = g / (1.0 + exp(-g)) * b[i];
    }
}

@compute @workgroup_size(WG)
fn add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, lid);
    if i < p.n {
        y[i] = a[i] + b[i];
    }
}

// y += a: the residual stream accumulating a block's output in place.
@compute @workgroup_size(WG)
fn add_assign(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, lid);
    if i < p.n {
        y[i] += a[i];
    }
}

// y = a, 16 bytes per invocation: device copy bandwidth for benchmarks, and cache copies.
// `n` counts vec4s here.
@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y4: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn copy(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, lid);
    if i < p.n {
        y4[i] = a4[i];
    }
}
