// Mixture of experts (Shazeer et al. 2017; Mixtral, Jiang et al. 2024; Qwen-MoE): a router picks
// top_k of n_experts SwiGLU experts for each token, and the token's output is the sum of their
// outputs weighted by the router's probabilities.
//   route:          probs = softmax(router logits) per token; the top_k experts (ties: the lower
//                   index, as torch.topk) and their probabilities, renormalised over the chosen
//                   ones where norm_topk → ids, weights (n_tokens · top_k "assignments")
//   group:          the assignments sorted by expert (a counting sort, stable): each expert's
//                   range of `order`, and the list of experts with any work (llama.cpp's
//                   mul_mat_id grouping), so a token reads only its chosen experts' weights and
//                   every chosen expert's weights are decoded once per tile of its tokens
//   expert_matmul:  y[a] = W[expert(a)] · x[row(a)] for every assignment a, one workgroup per
//                   (row range, active expert); W is the stack of all experts' matrices
//                   (weights.wgsl encodings), chunked by whole experts
//   combine:        x[t] += Σ_s weight[t, s] · y[t·top_k + s]  (+ sigmoid(g[t]) · shared[t])
// `groups` holds, in one buffer: expert_start (n_experts + 1), the number of active experts,
// the active experts (n_experts), then order (n_tokens · top_k).

struct Params {
    n_tokens: u32,
    n_experts: u32,
    top_k: u32,
    norm_topk: u32,      // route: renormalise the chosen probabilities
    k: u32,              // expert_matmul: input features
    rows: u32,           // expert_matmul: rows of each expert's matrix
    first_expert: u32,   // expert_matmul: the first expert in this chunk of the stack
    chunk_experts: u32,  // expert_matmul: experts in this chunk
    x_per_token: u32,    // expert_matmul: 1: assignment a reads x row a / top_k; 0: x row a
    dim: u32,            // combine: hidden size
    has_shared: u32,     // combine: add the gated shared expert
    _pad: u32,
}

const NONE: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;              // expert stack chunk
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;              // expert_matmul input
@group(0) @binding(3) var<storage, read_write> y: array<f32>;              // (assignments, rows)
@group(0) @binding(4) var<storage, read> logits: array<f32>;               // (n_tokens, n_experts)
@group(0) @binding(5) var<storage, read_write> ids: array<u32>;            // (n_tokens, top_k)
@group(0) @binding(6) var<storage, read_write> weights: array<f32>;        // (n_tokens, top_k)
@group(0) @binding(7) var<storage, read_write> groups: array<u32>;         // see above
@group(0) @binding(8) var<storage, read> expert_out: array<f32>;           // (n_tokens · top_k, dim)
@group(0) @binding(9) var<storage, read_write> residual: array<f32>;       // (n_tokens, dim)
@group(0) @binding(10) var<storage, read> shared_out: array<f32>;          // (n_tokens, dim)
@group(0) @binding(11) var<storage, read> shared_gate: array<f32>;         // (n_tokens)

@compute @workgroup_size(64)
fn route(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x;
    if t >= p.n_tokens {
        return;
    }
    let base = t * p.n_experts;
    var m = logits[base];
    for (var e = 1u; e < p.n_experts; e++) {
        m = max(m, logits[base + e]);
    }
    var sum = 0.0;
    for (var e = 0u; e < p.n_experts; e++) {
        sum += exp(logits[base + e] - m);
    }
    var taken: array<u32, 8>;   // a bit per expert (≤ 256)
    var chosen = 0.0;
    for (var s = 0u; s < p.top_k; s++) {
        var best = NONE;
        var best_logit = 0.0;
        for (var e = 0u; e < p.n_experts; e++) {
            let l = logits[base + e];
            let free = (taken[e / 32u] & (1u << (e % 32u))) == 0u;
            if free && (best == NONE || l > best_logit) {
                best = e;
                best_logit = l;
            }
        }
        taken[best / 32u] |= 1u << (best % 32u);
        let prob = exp(best_logit - m) / sum;
        ids[t * p.top_k + s] = best;
        weights[t * p.top_k + s] = prob;
        chosen += prob;
    }
    if p.norm_topk != 0u {
        for (var s = 0u; s < p.top_k; s++) {
            weights[t * p.top_k + s] /= chosen;
        }
    }
}

const GROUP_WG: u32 = 64u;
var<workgroup> count_s: array<u32, 256>;
var<workgroup> start_s: array<u32, 257>;

// One workgroup: count each expert's assignments, prefix-sum them, then let each expert's
// invocation write its assignments in order.
@compute @workgroup_size(GROUP_WG)
fn group(@builtin(local_invocation_index) lid: u32) {
    let n = p.n_tokens * p.top_k;
    let e_n = p.n_experts;
    for (var e = lid; e < e_n; e += GROUP_WG) {
        var c = 0u;
        for (var a = 0u; a < n; a++) {
            c += select(0u, 1u, ids[a] == e);
        }
        count_s[e] = c;
    }
    workgroupBarrier();
    if lid == 0u {
        var at = 0u;
        var n_active = 0u;
        for (var e = 0u; e < e_n; e++) {
            start_s[e] = at;
            groups[e] = at;
            at += count_s[e];
            if count_s[e] > 0u {
                groups[e_n + 2u + n_active] = e;
                n_active++;
            }
        }
        start_s[e_n] = at;
        groups[e_n] = at;
        groups[e_n + 1u] = n_active;
    }
    workgroupBarrier();
    let order = 2u * e_n + 2u;
    for (var e = lid; e < e_n; e += GROUP_WG) {
        var at = start_s[e];
        for (var a = 0u; a < n; a++) {
            if ids[a] == e {
                groups[order + at] = a;
                at++;
            }
        }
    }
}

// Each invocation computes EM_ROWS rows of one expert for a tile of EM_TOKENS of its
// assignments: a weight block is decoded once (weights32) for the whole tile, and each x load
// serves EM_ROWS rows (as matmul_blocks, which CPU adapters favour). Each (assignment, row)
// dot product runs in the same order whatever else the step holds, so batching never changes it.
const EM_ROWS: u32 = 8u;
const EM_TOKENS: u32 = 4u;
const EM_WG: u32 = 8u;

fn x_row(a: u32) -> u32 {
    return select(a, a / p.top_k, p.x_per_token != 0u);
}

fn x_at(i: u32) -> f32 {
    return x[i >> 2u][i & 3u];
}

// y[a][row0 .. row0 + EM_ROWS] for the assignments order[o0 .. o0 + EM_TOKENS] of expert rows
// starting at w_row0: one weight block decoded for the whole tile.
fn expert_tile(o0: u32, w_row0: u32, row0: u32) {
    let order = 2u * p.n_experts + 2u;
    var xr: array<u32, EM_TOKENS>;
    for (var t = 0u; t < EM_TOKENS; t++) {
        xr[t] = x_row(groups[order + o0 + t]);
    }
    var acc: array<array<f32, EM_TOKENS>, EM_ROWS>;
    if p.k % 32u == 0u {
        let nb = p.k / 32u;
        for (var b = 0u; b < nb; b++) {
            var xs: array<array<vec4<f32>, 8>, EM_TOKENS>;
            for (var t = 0u; t < EM_TOKENS; t++) {
                let xi = xr[t] * (p.k / 4u) + 8u * b;
                for (var i = 0u; i < 8u; i++) {
                    xs[t][i] = x[xi + i];
                }
            }
            for (var r = 0u; r < EM_ROWS; r++) {
                let wv = weights32((w_row0 + min(row0 + r, p.rows - 1u)) * nb + b);
                for (var t = 0u; t < EM_TOKENS; t++) {
                    var s = 0.0;
                    for (var i = 0u; i < 8u; i++) {
                        s += dot(wv[i], xs[t][i]);
                    }
                    acc[r][t] += s;
                }
            }
        }
    } else {
        for (var kk = 0u; kk < p.k; kk++) {
            var xv: array<f32, EM_TOKENS>;
            for (var t = 0u; t < EM_TOKENS; t++) {
                xv[t] = x_at(xr[t] * p.k + kk);
            }
            for (var r = 0u; r < EM_ROWS; r++) {
                let wv = weight_at((w_row0 + min(row0 + r, p.rows - 1u)) * p.k + kk);
                for (var t = 0u; t < EM_TOKENS; t++) {
                    acc[r][t] += wv * xv[t];
                }
            }
        }
    }
    for (var t = 0u; t < EM_TOKENS; t++) {
        let a = groups[order + o0 + t];
        for (var r = 0u; r < EM_ROWS; r++) {
            if row0 + r < p.rows {
                y[a * p.rows + row0 + r] = acc[r][t];
            }
        }
    }
}

// The same for the single assignment order[o] (a decode step's token, or a tile's remainder):
// no work for tile slots that would only repeat it.
fn expert_one(o: u32, w_row0: u32, row0: u32) {
    let a = groups[2u * p.n_experts + 2u + o];
    let xr = x_row(a);
    var acc: array<f32, EM_ROWS>;
    if p.k % 32u == 0u {
        let nb = p.k / 32u;
        for (var b = 0u; b < nb; b++) {
            var xs: array<vec4<f32>, 8>;
            let xi = xr * (p.k / 4u) + 8u * b;
            for (var i = 0u; i < 8u; i++) {
                xs[i] = x[xi + i];
            }
            for (var r = 0u; r < EM_ROWS; r++) {
                let wv = weights32((w_row0 + min(row0 + r, p.rows - 1u)) * nb + b);
                var s = 0.0;
                for (var i = 0u; i < 8u; i++) {
                    s += dot(wv[i], xs[i]);
                }
                acc[r] += s;
            }
        }
    } else {
        for (var kk = 0u; kk < p.k; kk++) {
            let xv = x_at(xr * p.k + kk);
            for (var r = 0u; r < EM_ROWS; r++) {
                acc[r] += weight_at((w_row0 + min(row0 + r, p.rows - 1u)) * p.k + kk) * xv;
            }
        }
    }
    for (var r = 0u; r < EM_ROWS; r++) {
        if row0 + r < p.rows {
            y[a * p.rows + row0 + r] = acc[r];
        }
    }
}

@compute @workgroup_size(EM_WG)
fn expert_matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e_n = p.n_experts;
    if wid.y >= groups[e_n + 1u] {
        return;
    }
    let e = groups[e_n + 2u + wid.y];
    if e < p.first_expert || e >= p.first_expert + p.chunk_experts {
        return;
    }
    let a_begin = groups[e];
    let a_end = groups[e + 1u];
    let row0 = (wid.x * EM_WG + lid) * EM_ROWS;
    let w_row0 = (e - p.first_expert) * p.rows;
    // Whole tiles, then the rest one at a time. Either way each (assignment, row) dot product
    // sums its blocks in the same order, so batching never changes it.
    var o = a_begin;
    for (; o + EM_TOKENS <= a_end; o += EM_TOKENS) {
        expert_tile(o, w_row0, row0);
    }
    for (; o < a_end; o++) {
        expert_one(o, w_row0, row0);
    }
}

@compute @workgroup_size(64)
fn combine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups_n: vec3<u32>) {
    let i = gid.y * groups_n.x * 64u + gid.x;
    if i >= p.n_tokens * p.dim {
        return;
    }
    let t = i / p.dim;
    let d = i % p.dim;
    var s = 0.0;
    for (var slot = 0u; slot < p.top_k; slot++) {
        let a = t * p.top_k + slot;
        s += weights[a] * expert_out[a * p.dim + d];
    }
    if p.has_shared != 0u {
        s += shared_out[i] / (1.0 + exp(-shared_gate[t]));
    }
    residual[i] += s;
}
