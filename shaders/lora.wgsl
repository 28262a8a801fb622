// LoRA adapters applied unmerged (Hu et al. 2021), several at once and chosen per token (as
// vLLM's punica kernels "shrink" and "expand"): for a linear y = x·Wᵀ, each adapter i the token
// uses adds  s_i · (x·A_iᵀ)·B_iᵀ,  A_i (r_i × in), B_i (out × r_i), s_i its scale.
//   shrink: u[t, off_i + j] = A_i[j] · x[t]        for j < r_i, if token t uses adapter i (else 0)
//   expand: y[t, o] += Σ_i s_i · B_i[o] · u[t, off_i ..]   over the adapters token t uses
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
@group(0) @binding(5) var<storage, read_write> u: array<f32>;     // (n_tokens, total_rank)
@group(0) @binding(6) var<storage, read> u_in: array<f32>;        // u, read by expand
@group(0) @binding(7) var<storage, read_write> y: array<f32>;     // (n_tokens, out_dim)

// One invocation per (token, column of u).
@compute @workgroup_size(64)
fn shrink(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if i >= p.n_tokens * p.total_rank {
        return;
    }
    let t = i / p.total_rank;
    let col = i % p.total_rank;
    var v = 0.0;
    for (var a = 0u; a < p.n_adapters; a++) {
        let e = table[a];
        if col >= e.u && col < e.u + e.rank && (adapters[t] & (1u << a)) != 0u {
            let row = e.a + (col - e.u) * p.in_dim;
            for (var k = 0u; k < p.in_dim; k++) {
                v += ab[row + k] * x[t * p.in_dim + k];
            }
        }
    }
    u[i] = v;
}

// One invocation per (token, output feature).
@compute @workgroup_size(64)
fn expand(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.y * groups.x * 64u + gid.x;
    if i >= p.n_tokens * p.out_dim {
        return;
    }
    let t = i / p.out_dim;
    let o = i % p.out_dim;
    let mask = adapters[t];
    if mask == 0u {
        return;
    }
    var add = 0.0;
    for (var a = 0u; a < p.n_adapters; a++) {
        let e = table[a];
        if e.rank > 0u && (mask & (1u << a)) != 0u {
            var s = 0.0;
            for (var j = 0u; j < e.rank; j++) {
                s += ab[e.b + o * e.rank + j] * u_in[t * p.total_rank + e.u + j];
            }
            add += e.scale * s;
        }
    }
    y[i] += add;
}
