// Matrix-vector product for decode: y[m] = W · x[m] (+ bias), i.e. y = x·Wᵀ for a few rows m
// of x (one per token in the step). W is (rows × K) row-major as checkpoints store linear
// weights, f32, f16, bf16 or a GGUF block format (weights.wgsl). Memory-bound: each workgroup streams 4
// weight rows with 16-byte loads, one partial dot product per row in each invocation, then one
// vec4 workgroup reduction for all 4 rows.

struct Params {
    k: u32,           // input features (columns of W)
    rows: u32,        // rows of W in this chunk
    first_row: u32,   // this chunk's first row within the whole matrix
    n: u32,           // rows of the whole matrix (row stride of y)
    has_bias: u32,
    x_row: u32,       // first row of x to use: y row m is computed from x row x_row + m
    _pad1: u32,
    _pad2: u32,
}

const WG: u32 = 64u;
const ROWS: u32 = 4u;   // weight rows per workgroup (one vec4 lane each)

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;    // (rows, k) as weights.wgsl stores them
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;    // (m, k)
@group(0) @binding(3) var<storage, read> bias: array<f32>;       // (n), read when has_bias
@group(0) @binding(4) var<storage, read_write> y: array<f32>;    // (m, n)

// Element `i` of the flattened chunk, for shapes the vector path cannot take.
fn w_at(i: u32) -> f32 {
    return weight_at(i);
}

fn x_at(i: u32) -> f32 {
    return x[i >> 2u][i & 3u];
}

// Dot product of 8 weights starting at element 8·j of the chunk with xa, xb.
fn dot8(j: u32, xa: vec4<f32>, xb: vec4<f32>) -> f32 {
    let v = weight8(j);
    return dot(v[0], xa) + dot(v[1], xb);
}

// The epilogue shared by every kernel: y[m, first_row + row] = v (+ bias), if this chunk has
// that row.
fn store(m: u32, row: u32, v: f32) {
    if row < p.rows {
        var out = v;
        if p.has_bias != 0u {
            out += bias[p.first_row + row];
        }
        y[m * p.n + p.first_row + row] = out;
    }
}

fn store4(m: u32, row0: u32, v: vec4<f32>) {
    for (var r = 0u; r < 4u; r++) {
        store(m, row0 + r, v[r]);
    }
}

@compute @workgroup_size(WG)
fn gemv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let m = wid.y;
    let xm = p.x_row + m;
    let row0 = wid.x * ROWS;
    var acc = vec4<f32>(0.0);
    if p.k % 8u == 0u {
        let k8 = p.k / 8u;
        let x8 = xm * k8;
        for (var j = lid; j < k8; j += WG) {
            let xa = x[2u * (x8 + j)];
            let xb = x[2u * (x8 + j) + 1u];
            for (var r = 0u; r < ROWS; r++) {
                if row0 + r < p.rows {
                    acc[r] += dot8((row0 + r) * k8 + j, xa, xb);
                }
            }
        }
    } else {
        for (var k = lid; k < p.k; k += WG) {
            let xv = x_at(xm * p.k + k);
            for (var r = 0u; r < ROWS; r++) {
                if row0 + r < p.rows {
                    acc[r] += w_at((row0 + r) * p.k + k) * xv;
                }
            }
        }
    }
    let total = workgroup_sum4(acc, lid);
    if lid == 0u {
        store4(m, row0, total);
    }
}

// ---- gemv_rows: each invocation computes LANE_ROWS whole rows in registers, no reduction and
// so no barrier. Uncoalesced on a GPU, but on CPU adapters (lavapipe) each invocation is a
// SIMD lane streaming its own rows, and every x load serves LANE_ROWS rows.

const LANE_ROWS: u32 = 4u;
const ROWS_WG: u32 = 16u;   // small workgroups: even a 576-row matrix spreads over all cores

@compute @workgroup_size(ROWS_WG)
fn gemv_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let m = wid.y;
    let xm = p.x_row + m;
    let row0 = (wid.x * ROWS_WG + lid) * LANE_ROWS;
    var r: array<u32, 4>;   // clamped rows: reads stay in range, the store is masked
    for (var i = 0u; i < LANE_ROWS; i++) {
        r[i] = min(row0 + i, p.rows - 1u);
    }
    var acc = vec4<f32>(0.0);
    if p.k % 8u == 0u {
        let k8 = p.k / 8u;
        for (var j = 0u; j < k8; j++) {
            let xa = x[2u * (xm * k8 + j)];
            let xb = x[2u * (xm * k8 + j) + 1u];
            acc += vec4<f32>(dot8(r[0] * k8 + j, xa, xb), dot8(r[1] * k8 + j, xa, xb),
                             dot8(r[2] * k8 + j, xa, xb), dot8(r[3] * k8 + j, xa, xb));
        }
    } else {
        for (var k = 0u; k < p.k; k++) {
            let xv = x_at(xm * p.k + k);
            acc += xv * vec4<f32>(w_at(r[0] * p.k + k), w_at(r[1] * p.k + k), w_at(r[2] * p.k + k), w_at(r[3] * p.k + k));
        }
    }
    store4(m, row0, acc);
}

// ---- gemv_blocks: gemv_rows for rows of whole 32-element blocks (every GGUF type; f16/f32 with
// K % 32 == 0): BLOCK_ROWS rows per invocation, each block's weight words loaded once (weights32).
// On CPU adapters every x load is a per-lane gather too, 8 vec4 per block, so each is shared
// by BLOCK_ROWS rows (benches/RESULTS.md).

// Rows per invocation (≤ 16): each x load serves them all. Invocations per workgroup, chosen
// per matrix so that small matrices still spread over the cores (ops/gemv.rs).
const BLOCK_ROWS: u32 = 32u;
override BLOCKS_WG: u32 = 16u;

@compute @workgroup_size(BLOCKS_WG)
fn gemv_blocks(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let m = wid.y;
    let row0 = (wid.x * BLOCKS_WG + lid) * BLOCK_ROWS;
    let nb = p.k / 32u;
    let x0 = (p.x_row + m) * (p.k / 4u);
    var acc: array<f32, BLOCK_ROWS>;
    for (var b = 0u; b < nb; b++) {
        let xb = x0 + 8u * b;
        let xa = x[xb];
        let xc = x[xb + 1u];
        let xd = x[xb + 2u];
        let xe = x[xb + 3u];
        let xf = x[xb + 4u];
        let xg = x[xb + 5u];
        let xh = x[xb + 6u];
        let xi = x[xb + 7u];
        for (var i = 0u; i < BLOCK_ROWS; i++) {
            let r = min(row0 + i, p.rows - 1u);   // reads stay in range, the store is masked
            acc[i] += dot32(r * nb + b, xa, xc, xd, xe, xf, xg, xh, xi);
        }
    }
    for (var i = 0u; i < BLOCK_ROWS; i++) {
        store(m, row0 + i, acc[i]);
    }
}
