// Index of the largest value in each row (the first one on ties, as torch.argmax), for greedy
// sampling on the GPU so that only a token id is read back. NaN never wins.

struct Params {
    rows: u32,
    n: u32,
    _pad0: u32,
    _pad1: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;          // (rows, n)
@group(0) @binding(2) var<storage, read_write> out: array<u32>;  // (rows)

@compute @workgroup_size(WG)
fn argmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let base = wid.x * p.n;
    var best = -3.4e38;
    var best_i = 0xffffffffu;
    for (var i = lid; i < p.n; i += WG) {
        let v = x[base + i];
        if v > best || (best_i == 0xffffffffu && v == best) {
            best = v;
            best_i = i;
        }
    }
    let m = workgroup_max(best, lid);
    let candidate = select(0xffffffffu, best_i, best == m);
    let winner = workgroup_min_u32(candidate, lid);
    if lid == 0u {
        out[wid.x] = select(winner, 0u, winner == 0xffffffffu);
    }
}
