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
        default: {
            // PERF: decodes element by element; vector paths for the other block types come
            // with the decode-speed work.
            let bs = block_elems();
            let i = 8u * j;
            let base = (i / bs) * block_bytes();
            let e = i % bs;
            return array<vec4<f32>, 2>(
                vec4<f32>(block_elem(base, e), block_elem(base, e + 1u), block_elem(base, e + 2u), block_elem(base, e + 3u)),
                vec4<f32>(block_elem(base, e + 4u), block_elem(base, e + 5u), block_elem(base, e + 6u), block_elem(base, e + 7u)));
        }
    }
}
