// Matrix product for prefill: y = x·Wᵀ (+ bias), x (M × K) activations, W (N × K) row-major
// as checkpoints store linear weights (f32, f16, bf16 or a GGUF block format: weights.wgsl), f32 accumulation.
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

const TILE: u32 = 64u;           // BM = BN
const BK: u32 = 16u;
const WG: u32 = 256u;            // 16 × 16 invocations

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;    // (rows, k) as weights.wgsl stores them
@group(0) @binding(2) var<storage, read> x: array<f32>;          // (m, k)
@group(0) @binding(3) var<storage, read> bias: array<f32>;       // (n), read when has_bias
@group(0) @binding(4) var<storage, read_write> y: array<f32>;    // (m, n)

var<workgroup> xs: array<f32, 1024>;   // (BK, TILE): x tile, k-major
var<workgroup> ws: array<f32, 1024>;   // (BK, TILE): W tile, k-major

fn w_at(i: u32) -> f32 {
    return weight_at(i);
}

// The epilogue shared by both kernels: y[row, first_row + col] = v (+ bias), masked to the
// rows of x and the columns this chunk produces.
fn store(row: u32, col: u32, v: f32) {
    if row < p.m && col < p.rows {
        var out = v;
        if p.has_bias != 0u {
            out += bias[p.first_row + col];
        }
        y[row * p.n + p.first_row + col] = out;
    }
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
            store(row, col, acc[i][j]);
        }
    }
}

// ---- matmul_regs: the same product without shared memory or barriers.
// Each invocation computes a 4 × 4 block of y straight from memory with 16-byte loads along K
// (x rows and W rows are both K-contiguous); a workgroup of 8 × 8 covers a 32 × 32 tile. On
// CPU adapters (lavapipe) barriers cost more than the re-reads they save, so this wins there.

@group(0) @binding(2) var<storage, read> x4: array<vec4<f32>>;   // (m, k) as vec4

const RTILE: u32 = 32u;


fn x4_at(i: u32) -> f32 {
    return x4[i >> 2u][i & 3u];
}


@compute @workgroup_size(8, 8)
fn matmul_regs(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) local: vec3<u32>) {
    let r0 = wid.y * RTILE + local.y * 4u;   // first x row of this invocation's block
    let c0 = wid.x * RTILE + local.x * 4u;   // first W row (y column), within the chunk
    // Clamp reads into range; the store below masks what is outside.
    var rows: array<u32, 4>;
    var cols: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        rows[i] = min(r0 + i, p.m - 1u);
        cols[i] = min(c0 + i, p.rows - 1u);
    }
    var acc: array<vec4<f32>, 4>;   // acc[i][j]: x row i, W row j
    for (var i = 0u; i < 4u; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    if p.k % 8u == 0u {
        let k8 = p.k / 8u;
        for (var j = 0u; j < k8; j++) {
            var wv: array<array<vec4<f32>, 2>, 4>;
            for (var c = 0u; c < 4u; c++) {
                wv[c] = weight8(cols[c] * k8 + j);
            }
            for (var i = 0u; i < 4u; i++) {
                let xa = x4[2u * (rows[i] * k8 + j)];
                let xb = x4[2u * (rows[i] * k8 + j) + 1u];
                acc[i] += vec4<f32>(dot(xa, wv[0][0]) + dot(xb, wv[0][1]),
                                    dot(xa, wv[1][0]) + dot(xb, wv[1][1]),
                                    dot(xa, wv[2][0]) + dot(xb, wv[2][1]),
                                    dot(xa, wv[3][0]) + dot(xb, wv[3][1]));
            }
        }
    } else {
        for (var k = 0u; k < p.k; k++) {
            let wv = vec4<f32>(weight_at(cols[0] * p.k + k), weight_at(cols[1] * p.k + k),
                               weight_at(cols[2] * p.k + k), weight_at(cols[3] * p.k + k));
            for (var i = 0u; i < 4u; i++) {
                acc[i] += x4_at(rows[i] * p.k + k) * wv;
            }
        }
    }
    for (var i = 0u; i < 4u; i++) {
        let row = r0 + i;
        for (var j = 0u; j < 4u; j++) {
            let col = c0 + j;
            store(row, col, acc[i][j]);
        }
    }
}

// ---- matmul_blocks: for CPU adapters and weights in rows of whole 32-element blocks. Each
// invocation computes MB_ROWS weight rows × MB_TOKENS tokens with no shared memory and no
// barrier; per block, each token's 32 x values are loaded once and serve MB_ROWS rows, and
// each weight block is decoded once (weights32) for all MB_TOKENS tokens. On lavapipe every
// storage load is a per-lane gather, so loads per FMA set the speed (benches/RESULTS.md).

const MB_ROWS: u32 = 16u;
const MB_TOKENS: u32 = 4u;
const MB_WG: u32 = 8u;

@compute @workgroup_size(MB_WG)
fn matmul_blocks(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row0 = (wid.x * MB_WG + lid) * MB_ROWS;
    let t0 = wid.y * MB_TOKENS;
    let nb = p.k / 32u;
    var acc: array<array<f32, MB_TOKENS>, MB_ROWS>;
    for (var b = 0u; b < nb; b++) {
        var xs: array<array<vec4<f32>, 8>, MB_TOKENS>;
        for (var t = 0u; t < MB_TOKENS; t++) {
            let xi = (min(t0 + t, p.m - 1u) * p.k) / 4u + 8u * b;   // clamped: reads stay in range
            for (var i = 0u; i < 8u; i++) {
                xs[t][i] = x4[xi + i];
            }
        }
        for (var r = 0u; r < MB_ROWS; r++) {
            let wv = weights32(min(row0 + r, p.rows - 1u) * nb + b);
            for (var t = 0u; t < MB_TOKENS; t++) {
                var s = 0.0;
                for (var i = 0u; i < 8u; i++) {
                    s += dot(wv[i], xs[t][i]);
                }
                acc[r][t] += s;
            }
        }
    }
    for (var r = 0u; r < MB_ROWS; r++) {
        for (var t = 0u; t < MB_TOKENS; t++) {
            store(t0 + t, row0 + r, acc[r][t]);
        }
    }
}
