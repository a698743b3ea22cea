//! Block formats that weights are stored in, and their scalar dequantization.
//!
//! The layouts are GGML's, as GGUF files carry them: a row is a sequence of fixed-size blocks,
//! each holding its own scale(s) and packed integers. Weights stay in this form in memory; a
//! kernel expands one row at a time into f32, so a quantized model costs its file size in RAM.

use half::{bf16, f16};
use std::fmt;

use crate::KernelError;

/// Elements in one K-quant super-block.
pub const QK_K: usize = 256;

/// A tensor element type, numbered as in GGUF's `ggml_type`.
///
/// Every GGML type has a variant so that a file using one we cannot compute with gets an
/// error that names it, instead of "unknown type 12".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum TensorType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

impl TensorType {
    /// Maps GGUF's numeric type id; `None` for ids no GGML version has used.
    pub fn from_ggml_id(id: u32) -> Option<Self> {
        use TensorType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            _ => return None,
        })
    }

    /// The GGUF numeric id, for writers.
    pub fn ggml_id(self) -> u32 {
        use TensorType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            IQ2_XXS => 16,
            IQ2_XS => 17,
            IQ3_XXS => 18,
            IQ1_S => 19,
            IQ4_NL => 20,
            IQ3_S => 21,
            IQ2_S => 22,
            IQ4_XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1_M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
        }
    }

    /// Block geometry `(elements per block, bytes per block)` for the types tandem computes
    /// with; `None` for the rest.
    pub fn layout(self) -> Option<(usize, usize)> {
        use TensorType::*;
        Some(match self {
            F32 => (1, 4),
            F16 | BF16 => (1, 2),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q8_0 => (32, 34),
            Q4_K => (QK_K, 144),
            Q5_K => (QK_K, 176),
            Q6_K => (QK_K, 210),
            _ => return None,
        })
    }

    /// Whether tandem has kernels for this type.
    pub fn is_supported(self) -> bool {
        self.layout().is_some()
    }

    /// Bytes a row of `cols` elements takes, checking that the row is whole blocks.
    pub fn row_bytes(self, cols: usize) -> Result<usize, KernelError> {
        let (block, bytes) = self.layout().ok_or(KernelError::UnsupportedType(self))?;
        if !cols.is_multiple_of(block) {
            return Err(KernelError::RaggedRow { ty: self, cols, block });
        }
        Ok(cols / block * bytes)
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Expands one row of `ty` blocks into f32.
///
/// `src` must hold exactly the row's bytes and `dst` the row's elements.
pub fn dequantize_row(ty: TensorType, src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
    let expected = ty.row_bytes(dst.len())?;
    if src.len() != expected {
        return Err(KernelError::ByteLength { what: "dequantize_row", expected, actual: src.len() });
    }
    match ty {
        TensorType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        TensorType::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        TensorType::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        TensorType::Q4_0 | TensorType::Q4_1 | TensorType::Q8_0 if simd_dequant(ty, src, dst) => {}
        TensorType::Q4_0 => blocks(src, dst, 18, 32, dequant_q4_0),
        TensorType::Q4_1 => blocks(src, dst, 20, 32, dequant_q4_1),
        TensorType::Q8_0 => blocks(src, dst, 34, 32, dequant_q8_0),
        TensorType::Q4_K => blocks(src, dst, 144, QK_K, dequant_q4_k),
        TensorType::Q5_K => blocks(src, dst, 176, QK_K, dequant_q5_k),
        TensorType::Q6_K => blocks(src, dst, 210, QK_K, dequant_q6_k),
        other => return Err(KernelError::UnsupportedType(other)),
    }
    Ok(())
}

/// Dequantizes with AVX-512 when the active path has it; false when it does not apply.
/// The vector code performs the same f32 operations as the scalar code (convert, multiply,
/// then add, unfused), so the values are bit-identical.
fn simd_dequant(ty: TensorType, src: &[u8], dst: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::isa() == crate::simd::Isa::Avx512 {
        // SAFETY: the active path is AVX-512, which `isa()` only selects on CPUs with
        // AVX-512F; `src` holds whole blocks for `dst` (checked by the caller).
        unsafe { x86::dequant_avx512(ty, src, dst) };
        return true;
    }
    let _ = (ty, src, dst);
    false
}

fn blocks(src: &[u8], dst: &mut [f32], bytes: usize, elems: usize, f: fn(&[u8], &mut [f32])) {
    for (s, d) in src.chunks_exact(bytes).zip(dst.chunks_exact_mut(elems)) {
        f(s, d);
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// `d: f16, qs: [u8; 16]`; element j is nibble j (low nibbles first), value `(q - 8) * d`.
fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// `d: f16, m: f16, qs: [u8; 16]`; value `q * d + m`.
fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0f) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// `d: f16, qs: [i8; 32]`; value `q * d`.
fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, v) in y.iter_mut().enumerate() {
        *v = (b[2 + j] as i8) as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) packed into K-quants' 12 scale bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        let sc = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (sc, m)
    }
}

/// `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`: eight 32-element sub-blocks, each
/// with a 6-bit scale and min; value `d * sc * q - dmin * m`.
fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let out = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0x0f) as f32 - min1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - min2;
        }
    }
}

/// Q4_K plus a fifth bit per element in `qh: [u8; 32]`:
/// `d, dmin, scales[12], qh[32], qs[128]`.
fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for chunk in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let (bit1, bit2) = (1u8 << (2 * chunk), 1u8 << (2 * chunk + 1));
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let out = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            let hi1 = if qh[l] & bit1 != 0 { 16 } else { 0 };
            let hi2 = if qh[l] & bit2 != 0 { 16 } else { 0 };
            out[l] = d1 * ((q[l] & 0x0f) + hi1) as f32 - min1;
            out[l + 32] = d2 * ((q[l] >> 4) + hi2) as f32 - min2;
        }
    }
}

/// `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`: 6-bit values in 16-element
/// sub-blocks with signed 8-bit scales; value `d * sc * (q - 32)`.
fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let sc = &b[192..208];
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &ql[half * 64..half * 64 + 64];
        let qh = &qh[half * 32..half * 32 + 32];
        let sc = &sc[half * 8..half * 8 + 8];
        let out = &mut y[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            out[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            out[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            out[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{TensorType, f16_at};

    /// # Safety
    /// The CPU must support AVX-512F; `src` must hold exactly the blocks of `dst`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dequant_avx512(ty: TensorType, src: &[u8], dst: &mut [f32]) {
        let bytes = ty.layout().map_or(34, |(_, bytes)| bytes);
        for (b, y) in src.chunks_exact(bytes).zip(dst.chunks_exact_mut(32)) {
            // SAFETY: each load reads 16 bytes inside the block `b` and each store writes 16
            // floats inside `y` (32 elements per block); AVX-512F is enabled.
            unsafe {
                match ty {
                    TensorType::Q4_0 | TensorType::Q4_1 => {
                        let q4_1 = ty == TensorType::Q4_1;
                        let d = _mm512_set1_ps(f16_at(b, 0));
                        let qs = if q4_1 { &b[4..20] } else { &b[2..18] };
                        let raw = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.as_ptr() as *const __m128i));
                        let lo = _mm512_and_si512(raw, _mm512_set1_epi32(0x0f));
                        let hi = _mm512_srli_epi32::<4>(raw);
                        let (lo, hi) = if q4_1 {
                            let m = _mm512_set1_ps(f16_at(b, 2));
                            (
                                _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), d), m),
                                _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), d), m),
                            )
                        } else {
                            let eight = _mm512_set1_epi32(8);
                            (
                                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, eight)), d),
                                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, eight)), d),
                            )
                        };
                        _mm512_storeu_ps(y.as_mut_ptr(), lo);
                        _mm512_storeu_ps(y.as_mut_ptr().add(16), hi);
                    }
                    _ => {
                        let d = _mm512_set1_ps(f16_at(b, 0));
                        for half in 0..2 {
                            let q = _mm_loadu_si128(b.as_ptr().add(2 + 16 * half) as *const __m128i);
                            let v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d);
                            _mm512_storeu_ps(y.as_mut_ptr().add(16 * half), v);
                        }
                    }
                }
            }
        }
    }
}

/// Quantizes a row to Q8_0 / Q4_0 / Q4_1 / F16 / BF16 / F32, so tests and tools can write
/// model files in the formats people download. K-quants are read-only here.
pub fn quantize_row(ty: TensorType, src: &[f32]) -> Result<Vec<u8>, KernelError> {
    let len = ty.row_bytes(src.len())?;
    let mut out = Vec::with_capacity(len);
    match ty {
        TensorType::F32 => src.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        TensorType::F16 => src.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        TensorType::BF16 => src.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        TensorType::Q8_0 => {
            for x in src.chunks_exact(32) {
                let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(x.iter().map(|v| ((v * id).round() as i8) as u8));
            }
        }
        TensorType::Q4_0 => {
            for x in src.chunks_exact(32) {
                // The value of largest magnitude maps to -8, keeping its sign exact.
                let max = x.iter().fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let d = max / -8.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                for j in 0..16 {
                    let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                    out.push(q(x[j]) | (q(x[j + 16]) << 4));
                }
            }
        }
        TensorType::Q4_1 => {
            for x in src.chunks_exact(32) {
                let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                for j in 0..16 {
                    let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    out.push(q(x[j]) | (q(x[j + 16]) << 4));
                }
            }
        }
        other => return Err(KernelError::UnsupportedType(other)),
    }
    debug_assert_eq!(out.len(), len);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ggml_id_round_trips() {
        for id in 0..64 {
            if let Some(t) = TensorType::from_ggml_id(id) {
                assert_eq!(t.ggml_id(), id);
            }
        }
    }

    #[test]
    fn ragged_rows_and_wrong_lengths_are_errors() {
        assert!(matches!(TensorType::Q4_K.row_bytes(100), Err(KernelError::RaggedRow { .. })));
        let mut out = vec![0f32; 32];
        let err = dequantize_row(TensorType::Q8_0, &[0u8; 33], &mut out).unwrap_err();
        assert!(matches!(err, KernelError::ByteLength { expected: 34, actual: 33, .. }));
        let err = dequantize_row(TensorType::IQ2_XS, &[], &mut out).unwrap_err();
        assert_eq!(err.to_string(), "tensor type IQ2_XS has no CPU kernel");
    }

    #[test]
    fn simd_dequantization_is_bit_identical_to_scalar() {
        let mut state = 0x1234_5678u32;
        let mut byte = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        };
        for (ty, bytes, scales) in
            [(TensorType::Q4_0, 18, &[0usize][..]), (TensorType::Q4_1, 20, &[0, 2]), (TensorType::Q8_0, 34, &[0])]
        {
            let mut src: Vec<u8> = (0..bytes * 8).map(|_| byte()).collect();
            for blk in src.chunks_exact_mut(bytes) {
                for &at in scales {
                    let v = f16::from_f32((blk[at] as f32 - 128.0) / 1000.0).to_le_bytes();
                    blk[at..at + 2].copy_from_slice(&v);
                }
            }
            let mut got = vec![0f32; 256];
            dequantize_row(ty, &src, &mut got).unwrap();
            let mut want = vec![0f32; 256];
            let f = match ty {
                TensorType::Q4_0 => dequant_q4_0,
                TensorType::Q4_1 => dequant_q4_1,
                _ => dequant_q8_0,
            };
            blocks(&src, &mut want, bytes, 32, f);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{ty}");
        }
    }

    #[test]
    fn quantize_then_dequantize_is_close() {
        let src: Vec<f32> = (0..64).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        for (ty, tol) in [
            (TensorType::F32, 0.0),
            (TensorType::F16, 1e-3),
            (TensorType::BF16, 1e-2),
            (TensorType::Q8_0, 0.01),
            (TensorType::Q4_0, 0.2),
            (TensorType::Q4_1, 0.11),
        ] {
            let bytes = quantize_row(ty, &src).unwrap();
            let mut back = vec![0f32; src.len()];
            dequantize_row(ty, &bytes, &mut back).unwrap();
            for (a, b) in src.iter().zip(&back) {
                assert!((a - b).abs() <= tol, "{ty}: {a} vs {b}");
            }
        }
    }
}
