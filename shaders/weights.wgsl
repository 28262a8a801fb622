// How weight elements are stored and decoded, shared by every kernel that reads weights
// (gemv, matmul, embedding). Weights are bound as u32 words; `W_DTYPE` is a pipeline-overridable
// constant, so each variant compiles to straight-line code for its type.
//   0: f32  — one element per word (bitcast)
//   1: f16  — two per word, low half first (`unpack2x16float`: core WGSL, no SHADER_F16 needed)
//   2: bf16 — two per word, low half first; a bf16 is the top 16 bits of an f32

const DT_F32: u32 = 0u;
const DT_F16: u32 = 1u;
const DT_BF16: u32 = 2u;

override W_DTYPE: u32 = DT_F32;

// The two 16-bit elements of one word, as f32.
fn decode_pair(word: u32) -> vec2<f32> {
    if W_DTYPE == DT_BF16 {
        return vec2<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u));
    }
    return unpack2x16float(word);
}

// Elements per u32 word.
fn per_word() -> u32 {
    return select(2u, 1u, W_DTYPE == DT_F32);
}

// Element `i` of a weight array, given the word that holds it.
fn decode_at(word: u32, i: u32) -> f32 {
    if W_DTYPE == DT_F32 {
        return bitcast<f32>(word);
    }
    return decode_pair(word)[i & 1u];
}

// The 8 elements held in 16 bytes of a 16-bit weight array.
fn decode8(q: vec4<u32>) -> array<vec4<f32>, 2> {
    return array<vec4<f32>, 2>(vec4<f32>(decode_pair(q.x), decode_pair(q.y)),
                               vec4<f32>(decode_pair(q.z), decode_pair(q.w)));
}
