//! CPU dequantisation of ggml tensor blocks to f32: the reference the GPU kernels are tested
//! against, and the loader's fallback.
//!
//! Written from ggml's `dequantize_row_*` in `ggml-quants.c` (block layouts from
//! `ggml-common.h`). Each block function does the same f32 operations in the same order as
//! ggml, one rounding per operation and no fused multiply-add, so results are bit-identical to
//! ggml built without FMA contraction and to gguf-py's numpy `gguf.quants.dequantize` (checked
//! against vectors from the latter in `tests/gguf.rs`).
//!
//! Layouts, bytes in block order (`d`, `m`, `dmin` are little-endian f16):
//!
//! | type | elements | bytes | layout |
//! | --- | --- | --- | --- |
//! | Q4_0 | 32 | 18 | d, qs\[16\]: element j is the low nibble of qs\[j\], j+16 the high nibble; (q − 8)·d |
//! | Q4_1 | 32 | 20 | d, m, qs\[16\]: q·d + m |
//! | Q5_0 | 32 | 22 | d, qh (u32: bit j is the 5th bit of element j), qs\[16\]; (q − 16)·d |
//! | Q5_1 | 32 | 24 | d, m, qh, qs\[16\]: q·d + m |
//! | Q8_0 | 32 | 34 | d, qs\[32\] i8: q·d |
//! | Q4_K | 256 | 144 | d, dmin, scales\[12\] (8 six-bit scale/min pairs), qs\[128\] |
//! | Q5_K | 256 | 176 | d, dmin, scales\[12\], qh\[32\], qs\[128\] |
//! | Q6_K | 256 | 210 | ql\[128\], qh\[64\], scales\[16\] i8, d (last) |

use crate::gguf::GgmlType;
use crate::gpu::DType;
use crate::{KilnError, Result};
use half::f16;

/// Elements per block of the 32-element types (`QK4_0`, `QK8_0`, ...).
pub const QK: usize = 32;

/// Elements per super-block of the K-quants (`QK_K`).
pub const QK_K: usize = 256;

/// `n_elements` values of type `ty` from `data`, which must be exactly their size.
/// Decode `n_elements` weights stored as kiln keeps `dtype` on the GPU (f32, f16 and bf16
/// little-endian; GGUF blocks byte for byte): the CPU reference for any weight buffer.
pub fn decode(dtype: DType, data: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    let pairs = || data.chunks_exact(2).take(n_elements).map(|c| [c[0], c[1]]);
    let ty = match dtype {
        DType::F32 => {
            return Ok(data
                .chunks_exact(4)
                .take(n_elements)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        }
        DType::F16 => return Ok(pairs().map(|b| f16::from_le_bytes(b).to_f32()).collect()),
        DType::BF16 => return Ok(pairs().map(|b| half::bf16::from_le_bytes(b).to_f32()).collect()),
        DType::Q8_0 => GgmlType::Q8_0,
        DType::Q4_0 => GgmlType::Q4_0,
        DType::Q4_1 => GgmlType::Q4_1,
        DType::Q5_0 => GgmlType::Q5_0,
        DType::Q5_1 => GgmlType::Q5_1,
        DType::Q4K => GgmlType::Q4_K,
        DType::Q5K => GgmlType::Q5_K,
        DType::Q6K => GgmlType::Q6_K,
    };
    dequantize(ty, data, n_elements)
}

pub fn dequantize(ty: GgmlType, data: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    check_sizes(ty, data.len(), n_elements)?;
    let mut out = vec![0f32; n_elements];
    dequantize_into(ty, data, &mut out)?;
    Ok(out)
}

/// Dequantise `data` of type `ty` into `out`; `data` must hold exactly `out.len()` elements.
pub fn dequantize_into(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    check_sizes(ty, data.len(), out.len())?;
    match ty {
        GgmlType::F32 => blocks::<4, 1>(data, out, |b, y| y[0] = f32::from_le_bytes(*b)),
        GgmlType::F16 => blocks::<2, 1>(data, out, |b, y| y[0] = f16::from_le_bytes(*b).to_f32()),
        GgmlType::BF16 => blocks::<2, 1>(data, out, |b, y| y[0] = bf16_to_f32(*b)),
        GgmlType::Q4_0 => blocks(data, out, dequantize_block_q4_0),
        GgmlType::Q4_1 => blocks(data, out, dequantize_block_q4_1),
        GgmlType::Q5_0 => blocks(data, out, dequantize_block_q5_0),
        GgmlType::Q5_1 => blocks(data, out, dequantize_block_q5_1),
        GgmlType::Q8_0 => blocks(data, out, dequantize_block_q8_0),
        GgmlType::Q4_K => blocks(data, out, dequantize_block_q4_k),
        GgmlType::Q5_K => blocks(data, out, dequantize_block_q5_k),
        GgmlType::Q6_K => blocks(data, out, dequantize_block_q6_k),
    }
}

/// `n_elements` must be whole blocks and `n_bytes` exactly their size.
fn check_sizes(ty: GgmlType, n_bytes: usize, n_elements: usize) -> Result<()> {
    let block = ty.block_size();
    if !n_elements.is_multiple_of(block) {
        return Err(KilnError::shape(
            "dequantize",
            format!("{n_elements} {ty} elements are not a whole number of blocks of {block}"),
        ));
    }
    let expected = (n_elements / block).checked_mul(ty.type_size());
    if expected != Some(n_bytes) {
        return Err(KilnError::shape(
            "dequantize",
            format!(
                "{n_elements} {ty} elements need {} bytes, got {n_bytes}",
                expected.map_or("more than usize::MAX".to_string(), |e| e.to_string())
            ),
        ));
    }
    Ok(())
}

/// Run `f` over each `TS`-byte block of `data` and its `BS` outputs. Sizes were checked by
/// the caller; the fixed-size arrays let each block function index without bounds failures.
fn blocks<const TS: usize, const BS: usize>(
    data: &[u8],
    out: &mut [f32],
    f: impl Fn(&[u8; TS], &mut [f32; BS]),
) -> Result<()> {
    for (block, y) in data.chunks_exact(TS).zip(out.chunks_exact_mut(BS)) {
        // chunks_exact yields exactly TS and BS items, so these conversions cannot fail.
        let internal = |_| KilnError::shape("dequantize", "internal: ragged block");
        let block: &[u8; TS] = block.try_into().map_err(internal)?;
        let y: &mut [f32; BS] = y.try_into().map_err(internal)?;
        f(block, y);
    }
    Ok(())
}

/// bf16 is the top half of an f32.
fn bf16_to_f32(b: [u8; 2]) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes(b)) << 16)
}

/// The f16 at `block[at..at + 2]`, widened (exactly) to f32 as `GGML_FP16_TO_FP32`.
fn f16_at<const N: usize>(block: &[u8; N], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// `block_q4_0`: `y = (q - 8) * d`.
pub fn dequantize_block_q4_0(block: &[u8; 18], y: &mut [f32; QK]) {
    let d = f16_at(block, 0);
    let qs = &block[2..18];
    for j in 0..QK / 2 {
        let x0 = i32::from(qs[j] & 0x0F) - 8;
        let x1 = i32::from(qs[j] >> 4) - 8;
        y[j] = x0 as f32 * d;
        y[j + QK / 2] = x1 as f32 * d;
    }
}

/// `block_q4_1`: `y = q * d + m` (multiply rounded, then add: no FMA).
pub fn dequantize_block_q4_1(block: &[u8; 20], y: &mut [f32; QK]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let qs = &block[4..20];
    for j in 0..QK / 2 {
        let x0 = i32::from(qs[j] & 0x0F);
        let x1 = i32::from(qs[j] >> 4);
        y[j] = x0 as f32 * d + m;
        y[j + QK / 2] = x1 as f32 * d + m;
    }
}

/// The 5th bits of a Q5 block: bit j of the little-endian u32 belongs to element j.
fn q5_high_bits(qh: &[u8]) -> u32 {
    u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]])
}

/// `block_q5_0`: `y = (q - 16) * d`, q = nibble | (bit j of qh) << 4.
pub fn dequantize_block_q5_0(block: &[u8; 22], y: &mut [f32; QK]) {
    let d = f16_at(block, 0);
    let qh = q5_high_bits(&block[2..6]);
    let qs = &block[6..22];
    for j in 0..QK / 2 {
        let xh_0 = ((qh >> j) << 4) & 0x10;
        let xh_1 = (qh >> (j + 12)) & 0x10;
        let x0 = (u32::from(qs[j] & 0x0F) | xh_0) as i32 - 16;
        let x1 = (u32::from(qs[j] >> 4) | xh_1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + QK / 2] = x1 as f32 * d;
    }
}

/// `block_q5_1`: `y = q * d + m`, q as in Q5_0 without the offset.
pub fn dequantize_block_q5_1(block: &[u8; 24], y: &mut [f32; QK]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let qh = q5_high_bits(&block[4..8]);
    let qs = &block[8..24];
    for j in 0..QK / 2 {
        let xh_0 = ((qh >> j) << 4) & 0x10;
        let xh_1 = (qh >> (j + 12)) & 0x10;
        let x0 = u32::from(qs[j] & 0x0F) | xh_0;
        let x1 = u32::from(qs[j] >> 4) | xh_1;
        y[j] = x0 as f32 * d + m;
        y[j + QK / 2] = x1 as f32 * d + m;
    }
}

/// `block_q8_0`: `y = q * d`.
pub fn dequantize_block_q8_0(block: &[u8; 34], y: &mut [f32; QK]) {
    let d = f16_at(block, 0);
    for j in 0..QK {
        let q = block[2 + j] as i8;
        y[j] = f32::from(q) * d;
    }
}

/// `get_scale_min_k4`: scale and min of sub-block `j` (0..8) from the 12 packed bytes. Sub-blocks
/// 0..4 keep their 6 bits in the low bits of bytes j and j+4; sub-blocks 4..8 keep 4 low bits in
/// byte j+4 and their top 2 bits in the spare top bits of bytes j-4 and j.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// `block_q4_K`: 8 sub-blocks of 32; sub-block s is `d * scale_s * q - dmin * min_s`. Each 32
/// bytes of qs hold two sub-blocks: low nibbles the first, high nibbles the second.
pub fn dequantize_block_q4_k(block: &[u8; 144], y: &mut [f32; QK_K]) {
    let d = f16_at(block, 0);
    let min = f16_at(block, 2);
    let scales = &block[4..16];
    let qs = &block[16..144];
    for (pair, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc, m) = scale_min_k4(2 * pair, scales);
        let d1 = d * f32::from(sc);
        let m1 = min * f32::from(m);
        let (sc, m) = scale_min_k4(2 * pair + 1, scales);
        let d2 = d * f32::from(sc);
        let m2 = min * f32::from(m);
        let (lo, hi) = y.split_at_mut(32);
        for l in 0..32 {
            lo[l] = d1 * f32::from(q[l] & 0x0F) - m1;
            hi[l] = d2 * f32::from(q[l] >> 4) - m2;
        }
    }
}

/// `block_q5_K`: as Q4_K with a 5th bit per element from qh: bit 2·pair of qh\[l\] for the
/// low-nibble sub-block, bit 2·pair+1 for the high-nibble one.
pub fn dequantize_block_q5_k(block: &[u8; 176], y: &mut [f32; QK_K]) {
    let d = f16_at(block, 0);
    let min = f16_at(block, 2);
    let scales = &block[4..16];
    let qh = &block[16..48];
    let qs = &block[48..176];
    for (pair, (ql, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc, m) = scale_min_k4(2 * pair, scales);
        let d1 = d * f32::from(sc);
        let m1 = min * f32::from(m);
        let (sc, m) = scale_min_k4(2 * pair + 1, scales);
        let d2 = d * f32::from(sc);
        let m2 = min * f32::from(m);
        let u1 = 1u8 << (2 * pair);
        let u2 = 2u8 << (2 * pair);
        let (lo, hi) = y.split_at_mut(32);
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            lo[l] = d1 * f32::from((ql[l] & 0x0F) + h1) - m1;
            hi[l] = d2 * f32::from((ql[l] >> 4) + h2) - m2;
        }
    }
}

/// `block_q6_K`: 16 sub-blocks of 16 with i8 scales; `y = d * scale * (q - 32)` computed as
/// `(d * scale) * q` like ggml. Each half (128 elements) takes 64 bytes of ql and 32 of qh:
/// element l+32k (k = 0..4) has low nibble from ql\[l + 32(k&1)\] (k<2 low nibble, else high)
/// and high 2 bits from qh\[l\] >> 2k.
pub fn dequantize_block_q6_k(block: &[u8; 210], y: &mut [f32; QK_K]) {
    let ql_all = &block[0..128];
    let qh_all = &block[128..192];
    let sc_all = &block[192..208];
    let d = f16_at(block, 208);
    let halves =
        ql_all.chunks_exact(64).zip(qh_all.chunks_exact(32)).zip(sc_all.chunks_exact(8)).zip(y.chunks_exact_mut(128));
    for (((ql, qh), sc), y) in halves {
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            let s = |k: usize| f32::from(sc[is + k] as i8);
            y[l] = d * s(0) * f32::from(q1);
            y[l + 32] = d * s(2) * f32::from(q2);
            y[l + 64] = d * s(4) * f32::from(q3);
            y[l + 96] = d * s(6) * f32::from(q4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q4_0_nibble_order() {
        // Low nibbles are elements 0..16, high nibbles 16..32.
        let mut block = [0u8; 18];
        block[..2].copy_from_slice(&f16_bytes(0.5));
        for j in 0..16 {
            block[2 + j] = (j as u8) | (((15 - j) as u8) << 4);
        }
        let y = dequantize(GgmlType::Q4_0, &block, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(y[j + 16], ((15 - j) as f32 - 8.0) * 0.5);
        }
    }

    #[test]
    fn q5_0_high_bits() {
        // Only qh bit j set: element j is (16 - 16) * d = 0; others -16 * d.
        let mut block = [0u8; 22];
        block[..2].copy_from_slice(&f16_bytes(1.0));
        block[2..6].copy_from_slice(&(1u32 << 20).to_le_bytes());
        let y = dequantize(GgmlType::Q5_0, &block, 32).unwrap();
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, if j == 20 { 0.0 } else { -16.0 }, "element {j}");
        }
    }

    #[test]
    fn q6_k_scale_is_last() {
        let mut block = [0u8; 210];
        // q = 0 → value -32; scales all 1; d = 2 in the last two bytes.
        block[192..208].fill(1);
        block[208..].copy_from_slice(&f16_bytes(2.0));
        let y = dequantize(GgmlType::Q6_K, &block, 256).unwrap();
        assert!(y.iter().all(|&v| v == -64.0));
    }

    #[test]
    fn scale_min_k4_unpacks_six_bits() {
        let mut q = [0u8; 12];
        q[0] = 0b11_000001; // scale 0 = 1; top bits → scale 4's bits 4..6
        q[4] = 0b10_000010; // min 0 = 2; top bits → min 4's bits 4..6
        q[8] = 0x5A; // scale 4 low = 0xA, min 4 low = 0x5
        assert_eq!(scale_min_k4(0, &q), (1, 2));
        assert_eq!(scale_min_k4(4, &q), (0x3A, 0x25));
    }

    #[test]
    fn sizes_are_checked() {
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 18], 31).is_err());
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 17], 32).is_err());
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 36], 32).is_err());
        assert!(dequantize(GgmlType::Q6_K, &[0u8; 210], 256).is_ok());
        assert!(dequantize(GgmlType::F32, &[0u8; 3], 1).is_err());
        assert!(dequantize(GgmlType::F32, &[], usize::MAX).is_err());
        assert_eq!(dequantize(GgmlType::Q8_0, &[], 0).unwrap(), Vec::<f32>::new());
    }

    #[test]
    fn bf16_is_top_half() {
        let y = dequantize(GgmlType::BF16, &[0x80, 0x3f, 0x00, 0xc0], 2).unwrap();
        assert_eq!(y, vec![1.0, -2.0]);
    }
}
