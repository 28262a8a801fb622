// Matrix product for prefill: y = x·Wᵀ (+ bias), x (M × K) activations, W (N × K) row-major
// as checkpoints store linear weights (f32, or f16 two per u32 with `W_F16`), f32 accumulation.
// Tiled: a workgroup of 16 × 16 invocations computes a 64 × 64 tile of y, each invocation a
// 4 × 4 block held in registers, stepping through K in slices of 16 staged in shared memory.
// Any M, N, K: partial tiles are zero-filled on load and masked on store.

struct Params {
    m: u32,           // rows of x and y
    k: u32,           // inner dimension
    rows: u32,        // rows of W in this chunk (columns of y it produces)
    first_row: u32,   // this chunk's first row within the whole W
    n: u32,           // rows of the whole W (row stride of y)
    has_bias: u32,
    _pad0: u32,
    _pad1: u32,
}

override W_F16: bool = false;
const TILE: u32 = 64u;           // BM = BN
const BK: u32 = 16u;
const WG: u32 = 256u;            // 16 × 16 invocations

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;          // (rows, k) f32 bits or packed f16
@group(0) @binding(2) var<storage, read> x: array<f32>;          // (m, k)
@group(0) @binding(3) var<storage, read> bias: array<f32>;       // (n), read when has_bias
@group(0) @binding(4) var<storage, read_write> y: array<f32>;    // (m, n)

var<workgroup> xs: array<f32, 1024>;   // (BK, TILE): x tile, k-major
var<workgroup> ws: array<f32, 1024>;   // (BK, TILE): W tile, k-major

fn w_at(i: u32) -> f32 {
    if W_F16 {
        return unpack2x16float(w[i >> 1u])[i & 1u];
    }
    return bitcast<f32>(w[i]);
}

@compute @workgroup_size(16, 16)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>,
          @builtin(local_invocation_id) local: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let n0 = wid.x * TILE;   // first W row (y column) of the tile, within the chunk
    let m0 = wid.y * TILE;   // first x row of the tile
    var acc: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // Stage both tiles: 1024 elements each, 4 per invocation, contiguous along k.
        for (var e = 0u; e < 4u; e++) {
            let idx = lid + e * WG;
            let r = idx / BK;
            let kk = idx % BK;
            let k = k0 + kk;
            var xv = 0.0;
            if m0 + r < p.m && k < p.k {
                xv = x[(m0 + r) * p.k + k];
            }
            xs[kk * TILE + r] = xv;
            var wv = 0.0;
            if n0 + r < p.rows && k < p.k {
                wv = w_at((n0 + r) * p.k + k);
            }
            ws[kk * TILE + r] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let a = vec4<f32>(xs[kk * TILE + local.y * 4u], xs[kk * TILE + local.y * 4u + 1u],
                              xs[kk * TILE + local.y * 4u + 2u], xs[kk * TILE + local.y * 4u + 3u]);
            let b = vec4<f32>(ws[kk * TILE + local.x * 4u], ws[kk * TILE + local.x * 4u + 1u],
                              ws[kk * TILE + local.x * 4u + 2u], ws[kk * TILE + local.x * 4u + 3u]);
            acc[0] += a.x * b;
            acc[1] += a.y * b;
            acc[2] += a.z * b;
            acc[3] += a.w * b;
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let row = m0 + local.y * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let col = n0 + local.x * 4u + j;
            if row < p.m && col < p.rows {
                var v = acc[i][j];
                if p.has_bias != 0u {
                    v += bias[p.first_row + col];
                }
                y[row * p.n + p.first_row + col] = v;
            }
        }
    }
}
