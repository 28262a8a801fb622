// Numerically stable softmax over each row: y = exp(x - max(x)) / sum(exp(x - max(x))).
// One workgroup per row; rows may be as long as a vocabulary (150k).

struct Params {
    rows: u32,
    n: u32,
    _pad0: u32,
    _pad1: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;          // (rows, n)
@group(0) @binding(2) var<storage, read_write> y: array<f32>;    // (rows, n)

@compute @workgroup_size(WG)
fn softmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let base = wid.x * p.n;
    var m = -3.0e38;
    for (var i = lid; i < p.n; i += WG) {
        m = max(m, x[base + i]);
    }
    m = workgroup_max(m, lid);
    var s = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        let e = exp(x[base + i] - m);
        y[base + i] = e;
        s += e;
    }
    let inv = 1.0 / workgroup_sum(s, lid);
    for (var i = lid; i < p.n; i += WG) {
        y[base + i] *= inv;
    }
}
