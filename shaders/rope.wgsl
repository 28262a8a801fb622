// Rotary position embedding (Su et al., 2021, "RoFormer").
// Each pair (a, b) of a head vector rotates by angle pos · inv_freq[j]:
//   a' = a cos − b sin,  b' = b cos + a sin
// Pairing: half-split "NeoX" (a = x[j], b = x[j + D/2], HF's rotate_half, used by HF Llama and
// Qwen2 checkpoints) or interleaved (a = x[2j], b = x[2j + 1], GPT-J / llama.cpp layout).
// cos/sin come from a table the host computes once (with Llama 3 frequency scaling, if any) in
// f64, because GPU sin/cos lose accuracy at the large angles of long contexts.
//
//   rope_q:  rotate q in place.
//   rope_kv: rotate k and write it, with v, into each token's KV cache slot.
//
// Every token carries its own position and its sequence's block table (`tok`): one step can hold
// tokens of many sequences at any positions. The KV cache is paged (vLLM's PagedAttention): the
// pool holds `slots` positions per KV head in blocks of `block_size`; position j of a sequence
// lives in slot block_table[table + j / block_size] · block_size + j % block_size.
// A token with position NONE is padding (a plan's bucket is larger than the step) and is skipped.

struct Params {
    n_tokens: u32,
    n_heads: u32,
    head_dim: u32,
    interleaved: u32,  // 0: half-split (HF), 1: interleaved pairs
    slots: u32,        // KV pool positions per head (rope_kv)
    block_size: u32,   // positions per KV block (rope_kv)
    groups_x: u32,     // workgroups along x, to flatten the 2-D grid
}

const NONE: u32 = 0xffffffffu;

const WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> cos_sin: array<vec2<f32>>;    // (max_pos, head_dim / 2)
@group(0) @binding(2) var<storage, read_write> x: array<f32>;          // (n_tokens, n_heads, head_dim): q, or k
@group(0) @binding(3) var<storage, read> v: array<f32>;                // (n_tokens, n_heads, head_dim)
@group(0) @binding(4) var<storage, read_write> k_cache: array<kv_t>;   // (n_heads, slots, head_dim)
@group(0) @binding(5) var<storage, read_write> v_cache: array<kv_t>;   // (n_heads, slots, head_dim)
@group(0) @binding(6) var<storage, read> tok: array<vec2<u32>>;        // (n_tokens): (position, first block-table entry)
@group(0) @binding(7) var<storage, read> block_table: array<u32>;      // the step's block tables, concatenated

struct Pair {
    t: u32,      // token; n_tokens when out of range or padding
    pos: u32,    // its position
    table: u32,  // its first block-table entry
    h: u32,      // head
    a: u32,      // offset of the pair's first element within the head vector
    b: u32,      // offset of its second element
    cs: vec2<f32>,
}

// Pair number `i` of (n_tokens, n_heads, head_dim / 2), or t == n_tokens when out of range or padding.
fn pair(i: u32) -> Pair {
    let half = p.head_dim / 2u;
    let j = i % half;
    let h = (i / half) % p.n_heads;
    let t = i / (half * p.n_heads);
    var r: Pair;
    r.t = t;
    r.h = h;
    if p.interleaved != 0u {
        r.a = 2u * j;
        r.b = 2u * j + 1u;
    } else {
        r.a = j;
        r.b = j + half;
    }
    r.cs = vec2<f32>(1.0, 0.0);
    if t < p.n_tokens {
        let tm = tok[t];
        r.pos = tm.x;
        r.table = tm.y;
        if r.pos == NONE {
            r.t = p.n_tokens;
        } else {
            r.cs = cos_sin[r.pos * half + j];
        }
    }
    return r;
}

fn rotate(a: f32, b: f32, cs: vec2<f32>) -> vec2<f32> {
    return vec2<f32>(a * cs.x - b * cs.y, b * cs.x + a * cs.y);
}

@compute @workgroup_size(WG)
fn rope_q(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let q = pair((wid.y * p.groups_x + wid.x) * WG + lid);
    if q.t >= p.n_tokens {
        return;
    }
    let base = (q.t * p.n_heads + q.h) * p.head_dim;
    let r = rotate(x[base + q.a], x[base + q.b], q.cs);
    x[base + q.a] = r.x;
    x[base + q.b] = r.y;
}

@compute @workgroup_size(WG)
fn rope_kv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let q = pair((wid.y * p.groups_x + wid.x) * WG + lid);
    if q.t >= p.n_tokens {
        return;
    }
    let src = (q.t * p.n_heads + q.h) * p.head_dim;
    let slot = block_table[q.table + q.pos / p.block_size] * p.block_size + q.pos % p.block_size;
    let dst = (q.h * p.slots + slot) * p.head_dim;
    let r = rotate(x[src + q.a], x[src + q.b], q.cs);
    k_cache[dst + q.a] = kv_t(r.x);
    k_cache[dst + q.b] = kv_t(r.y);
    v_cache[dst + q.a] = kv_t(v[src + q.a]);
    v_cache[dst + q.b] = kv_t(v[src + q.b]);
}
