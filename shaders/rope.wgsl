// Rotary position embedding (Su et al., 2021, "RoFormer").
// Each pair (a, b) of a head vector rotates by angle pos · inv_freq[j]:
//   a' = a cos − b sin,  b' = b cos + a sin
// Pairing: half-split "NeoX" (a = x[j], b = x[j + D/2], HF's rotate_half, used by HF Llama and
// Qwen2 checkpoints) or interleaved (a = x[2j], b = x[2j + 1], GPT-J / llama.cpp layout).
// cos/sin come from a table the host computes once (with Llama 3 frequency scaling, if any) in
// f64, because GPU sin/cos lose accuracy at the large angles of long contexts.
//
//   rope_q:  rotate q in place.
//   rope_kv: rotate k and append it, with v, to the KV cache at positions pos0 .. pos0 + T.

struct Params {
    n_tokens: u32,
    n_heads: u32,
    head_dim: u32,
    pos0: u32,         // absolute position of token 0
    interleaved: u32,  // 0: half-split (HF), 1: interleaved pairs
    ctx: u32,          // KV cache capacity in positions (rope_kv)
    groups_x: u32,     // workgroups along x, to flatten the 2-D grid
    _pad: u32,
}

const WG: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> cos_sin: array<vec2<f32>>;    // (max_pos, head_dim / 2)
@group(0) @binding(2) var<storage, read_write> x: array<f32>;          // (n_tokens, n_heads, head_dim): q, or k
@group(0) @binding(3) var<storage, read> v: array<f32>;                // (n_tokens, n_heads, head_dim)
@group(0) @binding(4) var<storage, read_write> k_cache: array<kv_t>;   // (n_heads, ctx, head_dim)
@group(0) @binding(5) var<storage, read_write> v_cache: array<kv_t>;   // (n_heads, ctx, head_dim)

struct Pair {
    t: u32,      // token
    h: u32,      // head
    a: u32,      // offset of the pair's first element within the head vector
    b: u32,      // offset of its second element
    cs: vec2<f32>,
}

// Pair number `i` of (n_tokens, n_heads, head_dim / 2), or t == n_tokens when out of range.
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
        r.cs = cos_sin[(p.pos0 + t) * half + j];
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
    let dst = (q.h * p.ctx + p.pos0 + q.t) * p.head_dim;
    let r = rotate(x[src + q.a], x[src + q.b], q.cs);
    k_cache[dst + q.a] = kv_t(r.x);
    k_cache[dst + q.b] = kv_t(r.y);
    v_cache[dst + q.a] = kv_t(v[src + q.a]);
    v_cache[dst + q.b] = kv_t(v[src + q.b]);
}
