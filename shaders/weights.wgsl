// How weight elements are stored and decoded, shared by every kernel that reads weights
// (gemv, matmul, embedding). The kernel binds its weights as `w: array<vec4<u32>>` (rows of
// the matrix back to back, as the checkpoint stores them: GGUF blocks stay packed, never
// expanded); `W_DTYPE` is a pipeline-overridable constant, so each variant compiles to
// straight-line code for its type. Element i is the i-th of the flattened (rows × cols) matrix;
// rows hold whole blocks, so block = i / block_elems() holds it.
//
//   0 F32   1 F16   2 BF16                           one element per 4 / 2 / 2 bytes
//   3 Q8_0  4 Q4_0  5 Q4_1  6 Q5_0  7 Q5_1           32-element blocks (ggml-quants.c)
//   8 Q4_K  9 Q5_K  10 Q6_K                          256-element super-blocks (ggml k-quants)

const DT_F32: u32 = 0u;
const DT_F16: u32 = 1u;
const DT_BF16: u32 = 2u;
const DT_Q8_0: u32 = 3u;
const DT_Q4_0: u32 = 4u;
const DT_Q4_1: u32 = 5u;
const DT_Q5_0: u32 = 6u;
const DT_Q5_1: u32 = 7u;
const DT_Q4_K: u32 = 8u;
const DT_Q5_K: u32 = 9u;
const DT_Q6_K: u32 = 10u;

override W_DTYPE: u32 = DT_F32;

fn w_word(i: u32) -> u32 {
    return w[i >> 2u][i & 3u];
}

// Unsigned byte at byte offset b.
fn w_byte(b: u32) -> u32 {
    return (w_word(b >> 2u) >> ((b & 3u) * 8u)) & 0xffu;
}

// Signed byte at byte offset b.
fn w_sbyte(b: u32) -> f32 {
    return f32(i32(w_byte(b) << 24u) >> 24u);
}

// Little-endian u16 at an even byte offset b.
fn w_u16(b: u32) -> u32 {
    return (w_word(b >> 2u) >> ((b & 2u) * 8u)) & 0xffffu;
}

// f16 at an even byte offset b.
fn w_half(b: u32) -> f32 {
    return unpack2x16float(w_u16(b)).x;
}

// Little-endian u32 at an even byte offset b.
fn w_u32_even(b: u32) -> u32 {
    return w_u16(b) | (w_u16(b + 2u) << 16u);
}

fn block_elems() -> u32 {
    switch W_DTYPE {
        case 8u, 9u, 10u: { return 256u; }
        case 3u, 4u, 5u, 6u, 7u: { return 32u; }
        default: { return 1u; }
    }
}

fn block_bytes() -> u32 {
    switch W_DTYPE {
        case 0u: { return 4u; }
        case 1u, 2u: { return 2u; }
        case 3u: { return 34u; }
        case 4u: { return 18u; }
        case 5u: { return 20u; }
        case 6u: { return 22u; }
        case 7u: { return 24u; }
        case 8u: { return 144u; }
        case 9u: { return 176u; }
        default: { return 210u; }
    }
}

// The two 16-bit floats of one word (F16 or BF16), low half first.
fn decode_pair(word: u32) -> vec2<f32> {
    if W_DTYPE == DT_BF16 {
        return vec2<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u));
    }
    return unpack2x16float(word);
}

// 6-bit scale and min number j of a Q4_K/Q5_K super-block whose 12 scale bytes start at s
// (ggml's get_scale_min_k4).
fn scale_min_k4(j: u32, s: u32) -> vec2<f32> {
    if j < 4u {
        return vec2<f32>(f32(w_byte(s + j) & 63u), f32(w_byte(s + j + 4u) & 63u));
    }
    let sc = (w_byte(s + j + 4u) & 0xfu) | ((w_byte(s + j - 4u) >> 6u) << 4u);
    let mn = (w_byte(s + j + 4u) >> 4u) | ((w_byte(s + j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(mn));
}

// Element e (within its block) of the block starting at byte `base`.
fn block_elem(base: u32, e: u32) -> f32 {
    switch W_DTYPE {
        case 3u: {   // Q8_0: d, qs[32] (i8)
            return w_sbyte(base + 2u + e) * w_half(base);
        }
        case 4u, 5u: {   // Q4_0: d, qs[16] / Q4_1: d, m, qs[16]; low nibbles 0..15, high 16..31
            let qs = base + select(2u, 4u, W_DTYPE == DT_Q4_1);
            let q = (w_byte(qs + (e & 15u)) >> ((e >> 4u) * 4u)) & 0xfu;
            if W_DTYPE == DT_Q4_0 {
                return (f32(q) - 8.0) * w_half(base);
            }
            return f32(q) * w_half(base) + w_half(base + 2u);
        }
        case 6u, 7u: {   // Q5_0: d, qh, qs[16] / Q5_1: d, m, qh, qs[16]; bit e of qh is the 5th bit
            let qh_at = base + select(2u, 4u, W_DTYPE == DT_Q5_1);
            let lo = (w_byte(qh_at + 4u + (e & 15u)) >> ((e >> 4u) * 4u)) & 0xfu;
            let q = lo | (((w_u32_even(qh_at) >> e) & 1u) << 4u);
            if W_DTYPE == DT_Q5_0 {
                return (f32(q) - 16.0) * w_half(base);
            }
            return f32(q) * w_half(base) + w_half(base + 2u);
        }
        case 8u, 9u: {   // Q4_K: d, dmin, scales[12], qs[128] / Q5_K: ..., qh[32], qs[128]
            let pair = e / 64u;
            let l = e % 32u;
            let high = (e % 64u) / 32u;
            let sm = scale_min_k4(2u * pair + high, base + 4u);
            let qs = base + select(16u, 48u, W_DTYPE == DT_Q5_K);
            var q = (w_byte(qs + 32u * pair + l) >> (high * 4u)) & 0xfu;
            if W_DTYPE == DT_Q5_K {
                q += ((w_byte(base + 16u + l) >> (2u * pair + high)) & 1u) * 16u;
            }
            return w_half(base) * sm.x * f32(q) - w_half(base + 2u) * sm.y;
        }
        default: {   // Q6_K: ql[128], qh[64], scales[16] (i8), d
            let n = e / 128u;
            let g = (e % 128u) / 32u;
            let l = e % 32u;
            let ql = w_byte(base + 64u * n + l + 32u * (g & 1u));
            let lo = (ql >> ((g >> 1u) * 4u)) & 0xfu;
            let hi = (w_byte(base + 128u + 32u * n + l) >> (2u * g)) & 3u;
            let sc = w_sbyte(base + 192u + 8u * n + l / 16u + 2u * g);
            return w_half(base + 208u) * sc * (f32(lo | (hi << 4u)) - 32.0);
        }
    }
}

// Element i of the flattened matrix.
fn weight_at(i: u32) -> f32 {
    switch W_DTYPE {
        case 0u: { return bitcast<f32>(w_word(i)); }
        case 1u, 2u: { return decode_pair(w_word(i >> 1u))[i & 1u]; }
        default: {
            let bs = block_elems();
            return block_elem((i / bs) * block_bytes(), i % bs);
        }
    }
}

// The four signed bytes of a word, as f32.
fn i8x4(u: u32) -> vec4<f32> {
    return vec4<f32>(f32(i32(u << 24u) >> 24u), f32(i32(u << 16u) >> 24u), f32(i32(u << 8u) >> 24u), f32(i32(u) >> 24u));
}

// One nibble (bits shift .. shift + 3) of each byte of a word, as f32.
fn nib4(u: u32, shift: u32) -> vec4<f32> {
    let v = (u >> shift) & 0x0f0f0f0fu;
    return vec4<f32>(f32(v & 0xffu), f32((v >> 8u) & 0xffu), f32((v >> 16u) & 0xffu), f32(v >> 24u));
}

// Elements 8j .. 8j + 7 of the flattened matrix, as two vec4.
fn weight8(j: u32) -> array<vec4<f32>, 2> {
    switch W_DTYPE {
        case 0u: {
            return array<vec4<f32>, 2>(bitcast<vec4<f32>>(w[2u * j]), bitcast<vec4<f32>>(w[2u * j + 1u]));
        }
        case 1u, 2u: {
            let q = w[j];
            return array<vec4<f32>, 2>(vec4<f32>(decode_pair(q.x), decode_pair(q.y)),
                                       vec4<f32>(decode_pair(q.z), decode_pair(q.w)));
        }
        case 3u: {   // Q8_0: 8 consecutive i8 at an even offset
            let base = (j / 4u) * 34u;
            let q = base + 2u + 8u * (j % 4u);
            let d = w_half(base);
            return array<vec4<f32>, 2>(i8x4(w_u32_even(q)) * d, i8x4(w_u32_even(q + 4u)) * d);
        }
        case 4u, 5u: {   // Q4_0 / Q4_1: 8 low (elements 0..15) or high (16..31) nibbles
            let sub = j % 4u;
            let base = (j / 4u) * block_bytes();
            let q = base + select(2u, 4u, W_DTYPE == DT_Q4_1) + 8u * (sub & 1u);
            let shift = 4u * (sub >> 1u);
            let d = w_half(base);
            let a = nib4(w_u32_even(q), shift);
            let b = nib4(w_u32_even(q + 4u), shift);
            if W_DTYPE == DT_Q4_0 {
                return array<vec4<f32>, 2>((a - 8.0) * d, (b - 8.0) * d);
            }
            let m = w_half(base + 2u);
            return array<vec4<f32>, 2>(a * d + m, b * d + m);
        }
        case 6u, 7u: {   // Q5_0 / Q5_1: as Q4_0 / Q4_1, plus the 5th bits of elements e0 .. e0 + 7 from qh
            let sub = j % 4u;
            let e0 = 8u * sub;
            let shift = 4u * (sub >> 1u);
            var d: f32;
            var m: f32;
            var qh: u32;
            var w0: u32;
            var w1: u32;
            if W_DTYPE == DT_Q5_0 {
                let base = (j / 4u) * 22u;
                d = w_half(base);
                m = -16.0 * d;
                qh = w_u32_even(base + 2u);
                w0 = w_u32_even(base + 6u + 8u * (sub & 1u));
                w1 = w_u32_even(base + 10u + 8u * (sub & 1u));
            } else {
                let i = (j / 4u) * 6u;
                let dm = unpack2x16float(w_word(i));
                d = dm.x;
                m = dm.y;
                qh = w_word(i + 1u);
                w0 = w_word(i + 2u + 2u * (sub & 1u));
                w1 = w_word(i + 3u + 2u * (sub & 1u));
            }
            return array<vec4<f32>, 2>((nib4(w0, shift) + 16.0 * seq4(qh, e0)) * d + m,
                                       (nib4(w1, shift) + 16.0 * seq4(qh, e0 + 4u)) * d + m);
        }
        case 8u, 9u: {   // Q4_K / Q5_K: 8 elements of one 32-element sub-block
            let base = (j / 32u) * block_bytes();
            let sb = (j % 32u) / 4u;
            let pair = sb >> 1u;
            let high = sb & 1u;
            let l0 = 8u * (j % 4u);
            let dm = k_scale_min(base, sb);
            let d = dm.x;
            let m = dm.y;
            let q = (base + select(16u, 48u, W_DTYPE == DT_Q5_K) + 32u * pair + l0) >> 2u;
            var a = nib4(w_word(q), 4u * high);
            var b = nib4(w_word(q + 1u), 4u * high);
            if W_DTYPE == DT_Q5_K {
                let h = (base + 16u + l0) >> 2u;
                a += 16.0 * bits4(w_word(h), 2u * pair + high);
                b += 16.0 * bits4(w_word(h + 1u), 2u * pair + high);
            }
            return array<vec4<f32>, 2>(a * d - m, b * d - m);
        }
        default: {   // Q6_K: 8 elements of 32-group g of half n
            let base = (j / 32u) * 210u;
            let e0 = 8u * (j % 32u);
            let n = e0 / 128u;
            let g = (e0 % 128u) / 32u;
            let l0 = e0 % 32u;
            let ql = base + 64u * n + l0 + 32u * (g & 1u);
            let qh = base + 128u + 32u * n + l0;
            let d = w_half(base + 208u) * w_sbyte(base + 192u + 8u * n + l0 / 16u + 2u * g);
            let lo_shift = 4u * (g >> 1u);
            let a = nib4(w_u32_even(ql), lo_shift) + 16.0 * crumb4(w_u32_even(qh), 2u * g) - 32.0;
            let b = nib4(w_u32_even(ql + 4u), lo_shift) + 16.0 * crumb4(w_u32_even(qh + 4u), 2u * g) - 32.0;
            return array<vec4<f32>, 2>(a * d, b * d);
        }
    }
}

// ---- Whole 32-element blocks, each weight word loaded once (decode's gemv). On CPU adapters
// every storage load is a per-lane gather, so the number of 32-bit loads, not the arithmetic,
// sets the speed: the element-wise paths above load a block's scale once per element.

// The u32 made of the high half of a and the low half of b (a word at a 2-mod-4 byte offset).
fn join16(a: u32, b: u32) -> u32 {
    return (a >> 16u) | (b << 16u);
}

// The 4 little-endian words at even byte offset a (5 loads).
fn words4(a: u32) -> vec4<u32> {
    let i = a >> 2u;
    let r = vec4<u32>(w_word(i), w_word(i + 1u), w_word(i + 2u), w_word(i + 3u));
    if (a & 2u) == 0u {
        return r;
    }
    let r4 = w_word(i + 4u);
    return vec4<u32>(join16(r.x, r.y), join16(r.y, r.z), join16(r.z, r.w), join16(r.w, r4));
}

// The 4 words at a 4-aligned byte offset a (a vec4 load when 16-aligned).
fn words4_aligned(a: u32) -> vec4<u32> {
    let i = a >> 2u;
    if (i & 3u) == 0u {
        return w[i >> 2u];
    }
    return vec4<u32>(w_word(i), w_word(i + 1u), w_word(i + 2u), w_word(i + 3u));
}

// Bit `bit` of each byte of u, as 0.0 / 1.0.
fn bits4(u: u32, bit: u32) -> vec4<f32> {
    let v = (u >> bit) & 0x01010101u;
    return vec4<f32>(f32(v & 0xffu), f32((v >> 8u) & 0xffu), f32((v >> 16u) & 0xffu), f32(v >> 24u));
}

// Bits b .. b + 3 of u, as 0.0 / 1.0.
fn seq4(u: u32, b: u32) -> vec4<f32> {
    return vec4<f32>(f32((u >> b) & 1u), f32((u >> (b + 1u)) & 1u), f32((u >> (b + 2u)) & 1u), f32((u >> (b + 3u)) & 1u));
}

// Bits shift, shift + 1 of each byte of u (shift ≤ 6), as f32.
fn crumb4(u: u32, shift: u32) -> vec4<f32> {
    let v = (u >> shift) & 0x03030303u;
    return vec4<f32>(f32(v & 0xffu), f32((v >> 8u) & 0xffu), f32((v >> 16u) & 0xffu), f32(v >> 24u));
}

// (d · scale, dmin · min) of sub-block sb (0..7) of the Q4_K/Q5_K super-block at byte `base`
// (ggml's get_scale_min_k4 over the 12 scale bytes): 4 word loads.
fn k_scale_min(base: u32, sb: u32) -> vec2<f32> {
    let i = base >> 2u;
    let dm = unpack2x16float(w_word(i));
    let s = vec3<u32>(w_word(i + 1u), w_word(i + 2u), w_word(i + 3u));
    var sc: u32;
    var mn: u32;
    if sb < 4u {
        sc = byte12(s, sb) & 63u;
        mn = byte12(s, sb + 4u) & 63u;
    } else {
        sc = (byte12(s, sb + 4u) & 0xfu) | ((byte12(s, sb - 4u) >> 6u) << 4u);
        mn = (byte12(s, sb + 4u) >> 4u) | ((byte12(s, sb) >> 6u) << 4u);
    }
    return vec2<f32>(dm.x * f32(sc), dm.y * f32(mn));
}

// Byte k (0..11) of the 12 bytes s.
fn byte12(s: vec3<u32>, k: u32) -> u32 {
    let word = select(select(s.z, s.y, k < 8u), s.x, k < 4u);
    return (word >> ((k & 3u) * 8u)) & 0xffu;
}

// The 32 elements of block `blk` of the chunk (block = 32 consecutive elements of a row; a
// K-quant super-block holds 8), decoded to 8 vec4 with each weight word loaded once.
fn weights32(blk: u32) -> array<vec4<f32>, 8> {
    var o: array<vec4<f32>, 8>;
    switch W_DTYPE {
        case 0u: {
            for (var i = 0u; i < 8u; i++) {
                o[i] = bitcast<vec4<f32>>(w[8u * blk + i]);
            }
        }
        case 1u, 2u: {
            for (var i = 0u; i < 4u; i++) {
                let q = w[4u * blk + i];
                o[2u * i] = vec4<f32>(decode_pair(q.x), decode_pair(q.y));
                o[2u * i + 1u] = vec4<f32>(decode_pair(q.z), decode_pair(q.w));
            }
        }
        case 3u: {
            let base = blk * 34u;
            let d = w_half(base);
            let a = words4(base + 2u);
            let b = words4(base + 18u);
            for (var j = 0u; j < 4u; j++) {
                o[j] = i8x4(a[j]) * d;
                o[j + 4u] = i8x4(b[j]) * d;
            }
        }
        case 4u, 5u, 6u, 7u: {
            var q: vec4<u32>;
            var qh = 0u;
            var d: f32;
            var m: f32;
            if W_DTYPE == DT_Q4_0 {
                let base = blk * 18u;
                d = w_half(base);
                m = -8.0 * d;
                q = words4(base + 2u);
            } else if W_DTYPE == DT_Q4_1 {
                let i = blk * 5u;
                let dm = unpack2x16float(w_word(i));
                d = dm.x;
                m = dm.y;
                q = vec4<u32>(w_word(i + 1u), w_word(i + 2u), w_word(i + 3u), w_word(i + 4u));
            } else if W_DTYPE == DT_Q5_0 {
                let base = blk * 22u;
                d = w_half(base);
                m = -16.0 * d;
                qh = w_u32_even(base + 2u);
                q = words4(base + 6u);
            } else {
                let i = blk * 6u;
                let dm = unpack2x16float(w_word(i));
                d = dm.x;
                m = dm.y;
                qh = w_word(i + 1u);
                q = vec4<u32>(w_word(i + 2u), w_word(i + 3u), w_word(i + 4u), w_word(i + 5u));
            }
            for (var j = 0u; j < 4u; j++) {
                o[j] = (nib4(q[j], 0u) + 16.0 * seq4(qh, 4u * j)) * d + m;
                o[j + 4u] = (nib4(q[j], 4u) + 16.0 * seq4(qh, 16u + 4u * j)) * d + m;
            }
        }
        case 8u, 9u: {
            let sb = blk & 7u;
            let pair = sb >> 1u;
            let high = sb & 1u;
            let base = (blk >> 3u) * block_bytes();
            let dm = k_scale_min(base, sb);
            let qs = base + select(16u, 48u, W_DTYPE == DT_Q5_K) + 32u * pair;
            let qa = words4_aligned(qs);
            let qb = words4_aligned(qs + 16u);
            var ha = vec4<u32>(0u);
            var hb = vec4<u32>(0u);
            if W_DTYPE == DT_Q5_K {
                ha = words4_aligned(base + 16u);
                hb = words4_aligned(base + 32u);
            }
            let bit = 2u * pair + high;
            for (var j = 0u; j < 4u; j++) {
                o[j] = (nib4(qa[j], 4u * high) + 16.0 * bits4(ha[j], bit)) * dm.x - dm.y;
                o[j + 4u] = (nib4(qb[j], 4u * high) + 16.0 * bits4(hb[j], bit)) * dm.x - dm.y;
            }
        }
        default: {
            let sb = blk & 7u;
            let n = sb >> 2u;
            let g = sb & 3u;
            let base = (blk >> 3u) * 210u;
            let d = w_half(base + 208u);
            let sc = w_u16(base + 192u + 8u * n + 2u * g);
            let d0 = d * f32(i32(sc << 24u) >> 24u);
            let d1 = d * f32(i32(sc << 16u) >> 24u);
            let ql = base + 64u * n + 32u * (g & 1u);
            let qla = words4(ql);
            let qlb = words4(ql + 16u);
            let qha = words4(base + 128u + 32u * n);
            let qhb = words4(base + 144u + 32u * n);
            let lo_shift = 4u * (g >> 1u);
            for (var j = 0u; j < 4u; j++) {
                o[j] = (nib4(qla[j], lo_shift) + 16.0 * crumb4(qha[j], 2u * g) - 32.0) * d0;
                o[j + 4u] = (nib4(qlb[j], lo_shift) + 16.0 * crumb4(qhb[j], 2u * g) - 32.0) * d1;
            }
        }
    }
    return o;
}

// Σ W[e] · x[e] over the 32 elements of block `blk`, x given as 8 vec4 (decode's gemv).
fn dot32(blk: u32, x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>,
         x4: vec4<f32>, x5: vec4<f32>, x6: vec4<f32>, x7: vec4<f32>) -> f32 {
    let v = weights32(blk);
    return dot(v[0], x0) + dot(v[1], x1) + dot(v[2], x2) + dot(v[3], x3)
         + dot(v[4], x4) + dot(v[5], x5) + dot(v[6], x6) + dot(v[7], x7);
}
