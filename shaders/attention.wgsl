// Fused causal attention with grouped KV heads (GQA; MHA and MQA are its edge cases):
//   out[t, h] = softmax(q[t, h] · K[kvh]ᵀ · scale, keys 0 ..= pos[t] of t's sequence) · V[kvh],  kvh = h / group
// or, under a sliding window of W keys (Mistral; Beltagy et al. 2020), keys pos[t] - W + 1 ..= pos[t].
// (Vaswani et al. 2017; Ainslie et al. 2023 for GQA). The softmax is computed online in tiles of
// 64 keys (Milakov & Gimelshein 2018; FlashAttention), so no (queries × keys) matrix exists.
// One workgroup serves up to 8 query heads that share one KV head, so each key and value row is
// read once for the whole group and never copied per query head.
//
// K and V live in the paged cache pool, (kv_heads, slots, head_dim), in blocks of block_size
// positions (vLLM's PagedAttention, Kwon et al. 2023). Each query token carries its own position
// and its sequence's block table (`tok`), so one step serves any mix of sequences: a decode
// token, a prompt chunk that sees its earlier chunks, a prompt that starts on shared prefix blocks.
// Key j of token t's sequence is in slot block_table[table(t) + j / block_size] · block_size +
// j % block_size. A padding token (position NONE) attends to nothing and writes zeros.
//   prefill:       one workgroup per (query, KV head, block of ≤ 8 query heads) → out
//   decode_split:  the keys split into ranges of `split_len`; one workgroup per (query, KV head,
//                  head block, range) → partial (max, sum, unnormalised output)
//   decode_reduce: one workgroup per (query, head) merges the partials → out
// Split-KV keeps a long-context decode step busy on many cores (flash-decoding).

struct Params {
    n_tokens: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    slots: u32,        // KV pool positions per KV head
    block_size: u32,   // positions per KV block
    n_splits: u32,
    split_len: u32,    // keys per split (multiple of BK)
    group: u32,        // query heads per KV head
    head_blocks: u32,  // ceil(group / GMAX)
    scale: f32,        // 1 / sqrt(head_dim)
    window: u32,       // keys a query sees under a sliding window; 0: all up to itself
}

const WG: u32 = 64u;
const BK: u32 = 64u;      // keys per tile: one per invocation
const GMAX: u32 = 8u;     // query heads per workgroup
const DMAX: u32 = 128u;   // head_dim ≤ 2 · WG: each invocation owns output dims lid and lid + WG
const NEG: f32 = -1.0e30; // running max before any key: finite, so exp(NEG - m) is 0, never NaN
const NONE: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;                // (n_tokens, n_heads, head_dim)
@group(0) @binding(2) var<storage, read> k_cache: array<kv_t>;        // (n_kv_heads, slots, head_dim)
@group(0) @binding(3) var<storage, read> v_cache: array<kv_t>;        // (n_kv_heads, slots, head_dim)
@group(0) @binding(4) var<storage, read_write> out: array<f32>;       // (n_tokens, n_heads, head_dim)
@group(0) @binding(5) var<storage, read_write> part_ml: array<vec2<f32>>; // (n_tokens, n_heads, n_splits): (max, sum)
@group(0) @binding(6) var<storage, read_write> part_acc: array<f32>;  // (n_tokens, n_heads, n_splits, head_dim)
@group(0) @binding(7) var<storage, read> tok: array<vec2<u32>>;       // (n_tokens): (position, first block-table entry)
@group(0) @binding(8) var<storage, read> block_table: array<u32>;     // the step's block tables, concatenated

var<workgroup> q_s: array<f32, 1024>;   // (GMAX, head_dim): scaled queries of the head block
var<workgroup> s_s: array<f32, 512>;    // (GMAX, BK): scores of the tile
var<workgroup> p_s: array<f32, 512>;    // (GMAX, BK): exp(score - running max)

var<private> m_run: array<f32, 8>;      // (GMAX) running max per head
var<private> l_run: array<f32, 8>;      // (GMAX) running sum of exp per head
var<private> acc: array<f32, 16>;       // (GMAX, 2) this invocation's output dims per head

struct Block {
    t: u32,
    kv_len: u32,  // its sequence's keys up to itself: its position + 1 (0 for padding)
    first: u32,   // the first key it sees (0 without a sliding window)
    table: u32,   // its sequence's first block-table entry
    kvh: u32,
    h0: u32,      // first query head of the block
    heads: u32,   // query heads in the block (≤ GMAX)
}

fn block_of(x: u32, t: u32) -> Block {
    var b: Block;
    b.t = t;
    let tm = tok[t];
    b.kv_len = select(tm.x + 1u, 0u, tm.x == NONE);
    b.first = first_key(b.kv_len);
    b.table = tm.y;
    b.kvh = x / p.head_blocks;
    let hb = x % p.head_blocks;
    b.h0 = b.kvh * p.group + hb * GMAX;
    b.heads = min(GMAX, p.group - hb * GMAX);
    return b;
}

// The first key a query sees when its sequence holds kv_len keys up to and including it.
fn first_key(kv_len: u32) -> u32 {
    return select(0u, kv_len - p.window, p.window != 0u && kv_len > p.window);
}

// The cache slot of key j of the sequence whose block table starts at `table`.
fn slot_of(table: u32, j: u32) -> u32 {
    return block_table[table + j / p.block_size] * p.block_size + j % p.block_size;
}

// Online-softmax attention of block `b` over keys [j_begin, j_end) into m_run, l_run, acc.
fn attend(b: Block, j_begin: u32, j_end: u32, lid: u32) {
    let d_len = p.head_dim;
    for (var g = 0u; g < GMAX; g++) {
        m_run[g] = NEG;
        l_run[g] = 0.0;
        acc[2u * g] = 0.0;
        acc[2u * g + 1u] = 0.0;
    }
    for (var i = lid; i < b.heads * d_len; i += WG) {
        let g = i / d_len;
        q_s[i] = q[(b.t * p.n_heads + b.h0 + g) * d_len + i % d_len] * p.scale;
    }
    let kv_base = b.kvh * p.slots;
    for (var start = j_begin; start < j_end; start += BK) {
        let n_valid = min(BK, j_end - start);
        workgroupBarrier(); // q_s is written; p_s readers of the previous tile are done
        // 1. Scores of key start + lid for every head of the block.
        if lid < n_valid {
            var s: array<f32, 8>;
            for (var g = 0u; g < GMAX; g++) {
                s[g] = 0.0;
            }
            let k_row = (kv_base + slot_of(b.table, start + lid)) * d_len;
            for (var d = 0u; d < d_len; d++) {
                let kd = f32(k_cache[k_row + d]);
                for (var g = 0u; g < b.heads; g++) {
                    s[g] += q_s[g * d_len + d] * kd;
                }
            }
            for (var g = 0u; g < b.heads; g++) {
                s_s[g * BK + lid] = s[g];
            }
        }
        workgroupBarrier();
        // 2. New running max per head (every invocation computes the same), and the tile's
        //    probabilities for this invocation's key.
        var corr: array<f32, 8>;
        for (var g = 0u; g < b.heads; g++) {
            var mx = m_run[g];
            for (var jj = 0u; jj < n_valid; jj++) {
                mx = max(mx, s_s[g * BK + jj]);
            }
            corr[g] = exp(m_run[g] - mx);
            m_run[g] = mx;
            if lid < n_valid {
                p_s[g * BK + lid] = exp(s_s[g * BK + lid] - mx);
            }
        }
        workgroupBarrier();
        // 3. Rescale and accumulate p · V for this invocation's output dims.
        for (var g = 0u; g < b.heads; g++) {
            var l = l_run[g] * corr[g];
            for (var jj = 0u; jj < n_valid; jj++) {
                l += p_s[g * BK + jj];
            }
            l_run[g] = l;
            acc[2u * g] *= corr[g];
            acc[2u * g + 1u] *= corr[g];
        }
        for (var jj = 0u; jj < n_valid; jj++) {
            let v_row = (kv_base + slot_of(b.table, start + jj)) * d_len;
            var v0 = 0.0;
            var v1 = 0.0;
            if lid < d_len {
                v0 = f32(v_cache[v_row + lid]);
            }
            if lid + WG < d_len {
                v1 = f32(v_cache[v_row + lid + WG]);
            }
            for (var g = 0u; g < b.heads; g++) {
                let pj = p_s[g * BK + jj];
                acc[2u * g] += pj * v0;
                acc[2u * g + 1u] += pj * v1;
            }
        }
    }
}

@compute @workgroup_size(WG)
fn prefill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = block_of(wid.x, wid.y);
    attend(b, b.first, b.kv_len, lid);
    for (var g = 0u; g < b.heads; g++) {
        let o = (b.t * p.n_heads + b.h0 + g) * p.head_dim;
        let inv = select(1.0 / l_run[g], 0.0, b.kv_len == 0u);
        if lid < p.head_dim {
            out[o + lid] = acc[2u * g] * inv;
        }
        if lid + WG < p.head_dim {
            out[o + lid + WG] = acc[2u * g + 1u] * inv;
        }
    }
}

@compute @workgroup_size(WG)
fn decode_split(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = block_of(wid.x, wid.y);
    let split = wid.z;
    let j_begin = min(b.first + split * p.split_len, b.kv_len);
    let j_end = min(j_begin + p.split_len, b.kv_len);
    attend(b, j_begin, j_end, lid);
    for (var g = 0u; g < b.heads; g++) {
        let slot = (b.t * p.n_heads + b.h0 + g) * p.n_splits + split;
        if lid == 0u {
            part_ml[slot] = vec2<f32>(m_run[g], l_run[g]);
        }
        if lid < p.head_dim {
            part_acc[slot * p.head_dim + lid] = acc[2u * g];
        }
        if lid + WG < p.head_dim {
            part_acc[slot * p.head_dim + lid + WG] = acc[2u * g + 1u];
        }
    }
}

@compute @workgroup_size(WG)
fn decode_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let t = wid.y;
    let first = (t * p.n_heads + h) * p.n_splits;
    var m = NEG;
    for (var s = 0u; s < p.n_splits; s++) {
        m = max(m, part_ml[first + s].x);
    }
    var l = 0.0;
    var o0 = 0.0;
    var o1 = 0.0;
    for (var s = 0u; s < p.n_splits; s++) {
        let ml = part_ml[first + s];
        let wgt = exp(ml.x - m);
        l += wgt * ml.y;
        let a = (first + s) * p.head_dim;
        if lid < p.head_dim {
            o0 += wgt * part_acc[a + lid];
        }
        if lid + WG < p.head_dim {
            o1 += wgt * part_acc[a + lid + WG];
        }
    }
    let o = (t * p.n_heads + h) * p.head_dim;
    // No key at all (a padding token): zeros. A NaN anywhere else still shows.
    let inv = select(1.0 / l, 0.0, tok[t].x == NONE);
    if lid < p.head_dim {
        out[o + lid] = o0 * inv;
    }
    if lid + WG < p.head_dim {
        out[o + lid + WG] = o1 * inv;
    }
}

// ---- decode_lanes: the split step for CPU adapters (lavapipe). One invocation owns one
// (query, KV head, key range) and HEADS_PER_LANE of the query heads that share that KV head:
// each key and value row is loaded once for all of them (on CPU adapters every storage load is
// a per-lane gather, so loads, not FLOPs, set the speed). q, the running max/sum and the
// outputs stay in registers: no shared memory and no barrier. Writes the same partials as
// decode_split, merged by decode_reduce. Needs head_dim % 4 == 0.

@group(0) @binding(2) var<storage, read> k4: array<vec4<kv_t>>;   // (n_kv_heads, slots, head_dim / 4)
@group(0) @binding(3) var<storage, read> v4: array<vec4<kv_t>>;   // (n_kv_heads, slots, head_dim / 4)

const LANES_WG: u32 = 8u;
// head_dim, fixed per pipeline: constant loop bounds let the compiler keep q and the output
// in registers instead of per-invocation memory (~20% faster on lavapipe).
override HEAD_DIM: u32 = 128u;
// Query heads per invocation: a divisor of the group, at most 8, HEADS_PER_LANE · HEAD_DIM ≤ 256.
override HEADS_PER_LANE: u32 = 1u;

@compute @workgroup_size(LANES_WG)
fn decode_lanes(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.y;
    let chunks = p.group / HEADS_PER_LANE;
    let per_split = p.n_kv_heads * chunks;
    let split = gid.x / per_split;
    if split >= p.n_splits {
        return;
    }
    let kvh = (gid.x % per_split) / chunks;
    let h0 = kvh * p.group + (gid.x % chunks) * HEADS_PER_LANE;
    let d4 = HEAD_DIM / 4u;
    let tm = tok[t];
    let kv_len = select(tm.x + 1u, 0u, tm.x == NONE);
    let j_begin = min(first_key(kv_len) + split * p.split_len, kv_len);
    let j_end = min(j_begin + p.split_len, kv_len);

    var qv: array<vec4<f32>, 64>;     // (heads, head_dim / 4) scaled queries
    var o: array<vec4<f32>, 64>;      // (heads, head_dim / 4) unnormalised outputs
    var m: array<f32, 8>;
    var l: array<f32, 8>;
    for (var hh = 0u; hh < HEADS_PER_LANE; hh++) {
        let q_base = (t * p.n_heads + h0 + hh) * p.head_dim;
        for (var i = 0u; i < d4; i++) {
            let a = q_base + 4u * i;
            qv[hh * d4 + i] = vec4<f32>(q[a], q[a + 1u], q[a + 2u], q[a + 3u]) * p.scale;
            o[hh * d4 + i] = vec4<f32>(0.0);
        }
        m[hh] = NEG;
        l[hh] = 0.0;
    }
    // The slot walks through a block and is looked up again at each block boundary.
    var slot = 0u;
    for (var j = j_begin; j < j_end; j++) {
        if j == j_begin || j % p.block_size == 0u {
            slot = slot_of(tm.y, j);
        } else {
            slot += 1u;
        }
        let row = (kvh * p.slots + slot) * d4;
        var s: array<f32, 8>;
        for (var i = 0u; i < d4; i++) {
            let kv = vec4<f32>(k4[row + i]);
            for (var hh = 0u; hh < HEADS_PER_LANE; hh++) {
                s[hh] += dot(qv[hh * d4 + i], kv);
            }
        }
        var corr: array<f32, 8>;
        var pj: array<f32, 8>;
        for (var hh = 0u; hh < HEADS_PER_LANE; hh++) {
            let m_new = max(m[hh], s[hh]);
            corr[hh] = exp(m[hh] - m_new);
            pj[hh] = exp(s[hh] - m_new);
            l[hh] = l[hh] * corr[hh] + pj[hh];
            m[hh] = m_new;
        }
        for (var i = 0u; i < d4; i++) {
            let vv = vec4<f32>(v4[row + i]);
            for (var hh = 0u; hh < HEADS_PER_LANE; hh++) {
                o[hh * d4 + i] = o[hh * d4 + i] * corr[hh] + pj[hh] * vv;
            }
        }
    }
    for (var hh = 0u; hh < HEADS_PER_LANE; hh++) {
        let slot = (t * p.n_heads + h0 + hh) * p.n_splits + split;
        part_ml[slot] = vec2<f32>(m[hh], l[hh]);
        for (var i = 0u; i < d4; i++) {
            let a = slot * p.head_dim + 4u * i;
            let v = o[hh * d4 + i];
            part_acc[a] = v.x;
            part_acc[a + 1u] = v.y;
            part_acc[a + 2u] = v.z;
            part_acc[a + 3u] = v.w;
        }
    }
}

// ---- attention_probs: the attention probabilities themselves, for `kiln attention` (a plan
// with probes; never part of a normal step). One invocation per (query, head):
//   probs[h, t, j] = softmax_j(q[t, h] · K[kvh, j] · scale) for the keys t sees, 0 for the others,
// with j < split_len (here: the row length of `probs`, the step's longest sequence).

@group(0) @binding(9) var<storage, read_write> probs: array<f32>;   // (n_heads, n_tokens, split_len)

@compute @workgroup_size(WG)
fn attention_probs(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if i >= p.n_tokens * p.n_heads {
        return;
    }
    let t = i / p.n_heads;
    let h = i % p.n_heads;
    let tm = tok[t];
    let kv_len = select(min(tm.x + 1u, p.split_len), 0u, tm.x == NONE);
    let first = first_key(select(tm.x + 1u, 0u, tm.x == NONE));
    let kv_base = (h / p.group) * p.slots;
    let q_row = (t * p.n_heads + h) * p.head_dim;
    let out = (h * p.n_tokens + t) * p.split_len;
    var m = NEG;
    for (var j = first; j < kv_len; j++) {
        m = max(m, probe_score(q_row, (kv_base + slot_of(tm.y, j)) * p.head_dim));
    }
    var l = 0.0;
    for (var j = first; j < kv_len; j++) {
        l += exp(probe_score(q_row, (kv_base + slot_of(tm.y, j)) * p.head_dim) - m);
    }
    for (var j = 0u; j < p.split_len; j++) {
        var pj = 0.0;
        if j >= first && j < kv_len {
            pj = exp(probe_score(q_row, (kv_base + slot_of(tm.y, j)) * p.head_dim) - m) / l;
        }
        probs[out + j] = pj;
    }
}

fn probe_score(q_row: u32, k_row: u32) -> f32 {
    var s = 0.0;
    for (var d = 0u; d < p.head_dim; d++) {
        s += q[q_row + d] * f32(k_cache[k_row + d]);
    }
    return s * p.scale;
}
