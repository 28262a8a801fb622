// LoRA adapters applied unmerged (Hu et al. 2021), several at once and chosen per token (vLLM's
// punica "shrink" then "expand", in one dispatch): for a linear y = x·Wᵀ, each adapter i the
// token uses adds  s_i · (x·A_iᵀ)·B_iᵀ,  A_i (r_i × in), B_i (out × r_i), s_i its scale.
// One workgroup per token (the work is r·(in + out) multiply-adds, a sliver of the base matrix):
//   shrink: u[off_i + j] = A_i[j] · x[t]   for j < r_i, if token t uses adapter i (else 0), on all
//           lanes, into workgroup memory
//   expand: y[t, o] += Σ_i s_i · B_i[o] · u[off_i ..]   for every output
// Each token carries a bit mask of its adapters (`adapters[t]`, bit i = adapter i); a padding
// token's mask is 0. `table[i]` says where adapter i's A and B of this module sit in `ab` (f32,
// all adapters' matrices back to back), its rank (0: the adapter does not touch this module),
// its columns of u and its scale.

struct Params {
    n_tokens: u32,
    n_adapters: u32,
    in_dim: u32,
    out_dim: u32,
    total_rank: u32,   // columns of u: every adapter's rank for this module, back to back
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

struct Entry {
    a: u32,       // offset of A (rank × in) in ab
    b: u32,       // offset of B (out × rank) in ab
    rank: u32,
    u: u32,       // first column of u
    scale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ab: array<f32>;
@group(0) @binding(2) var<storage, read> table: array<Entry>;     // (n_adapters)
@group(0) @binding(3) var<storage, read> adapters: array<u32>;    // (n_tokens) bit masks
@group(0) @binding(4) var<storage, read> x: array<f32>;           // (n_tokens, in_dim)
@group(0) @binding(5) var<storage, read_write> y: array<f32>;     // (n_tokens, out_dim)

const WG: u32 = 64u;
const MAX_RANK: u32 = 1024u;      // columns of u: the adapters' ranks for one module, summed
var<workgroup> part_s: array<f32, MAX_RANK>;

@compute @workgroup_size(WG)
fn apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.y;
    let mask = adapters[t];
    // Shrink on every lane: with fewer columns than lanes, each column's sum over in_dim is
    // split into `parts` strided pieces (lane = part · total_rank + col), summed after the barrier.
    let parts = max(1u, WG / max(p.total_rank, 1u));
    for (var slot = lid; slot < p.total_rank * parts; slot += WG) {
        let col = slot % p.total_rank;
        let part = slot / p.total_rank;
        var v = 0.0;
        for (var a = 0u; a < p.n_adapters; a++) {
            let e = table[a];
            if col >= e.u && col < e.u + e.rank && (mask & (1u << a)) != 0u {
                let row = e.a + (col - e.u) * p.in_dim;
                for (var k = part; k < p.in_dim; k += parts) {
                    v += ab[row + k] * x[t * p.in_dim + k];
                }
            }
        }
        part_s[slot] = v;
    }
    workgroupBarrier();
    // Sum each column's parts (in order: the same result whatever else the step holds).
    var u = 0.0;
    if lid < p.total_rank && parts > 1u {
        for (var q = 0u; q < parts; q++) {
            u += part_s[q * p.total_rank + lid];
        }
    }
    workgroupBarrier();
    if lid < p.total_rank && parts > 1u {
        part_s[lid] = u;
    }
    workgroupBarrier();
    if mask == 0u {
        return;
    }
    // Expand: every output of this token.
    for (var o = lid; o < p.out_dim; o += WG) {
        var add = 0.0;
        for (var a = 0u; a < p.n_adapters; a++) {
            let e = table[a];
            if e.rank > 0u && (mask & (1u << a)) != 0u {
                var s = 0.0;
                for (var j = 0u; j < e.rank; j++) {
                    s += ab[e.b + o * e.rank + j] * part_s[e.u + j];
                }
                add += e.scale * s;
            }
        }
        y[t * p.out_dim + o] += add;
    }
}
