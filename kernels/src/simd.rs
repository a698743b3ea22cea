//! Instruction-set dispatch and the f32 dot-product tile every matrix product uses.
//!
//! One arithmetic contract for every path: each output is accumulated in 16 lanes
//! (`lane l` sums elements `k ≡ l mod 16`, in increasing `k`), the tail zero-padded, then
//! reduced by halving (`l + 8`, `l + 4`, `l + 2`, `l + 1`). The AVX-512 and AVX2 paths both
//! use fused multiply-add, so they give identical bits; the portable path multiplies then
//! adds. Within one path the result for an output never depends on the tile it was computed
//! in, which is what makes a sequence's logits independent of the batch around it.

use std::sync::OnceLock;

/// Elements per accumulator.
pub const LANES: usize = 16;

/// Which implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust, the reference.
    Scalar,
    /// x86-64 AVX2 with FMA.
    Avx2,
    /// x86-64 AVX-512F.
    Avx512,
}

impl Isa {
    /// Whether this machine can run `self`.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every path this machine can run, best last.
    pub fn all_available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|i| i.available()).collect()
    }
}

/// The path in use: the best the CPU supports, or `TANDEM_ISA=scalar|avx2|avx512` when set
/// (to check results or compare speed). An unavailable request falls back to the best path.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let wanted = match std::env::var("TANDEM_ISA").ok().as_deref() {
            Some("scalar") => Some(Isa::Scalar),
            Some("avx2") => Some(Isa::Avx2),
            Some("avx512") => Some(Isa::Avx512),
            _ => None,
        };
        match wanted {
            Some(i) if i.available() => i,
            _ => *Isa::all_available().last().unwrap_or(&Isa::Scalar),
        }
    })
}

/// `out[r * xs_n + t] = dot(rows[r], xs[t])` for `R = rows.len() / k` rows and
/// `xs_n = xs.len() / k` vectors, all of length `k`.
pub fn dots(isa: Isa, rows: &[f32], xs: &[f32], k: usize, out: &mut [f32]) {
    let n_rows = rows.len() / k;
    let n_xs = xs.len() / k;
    assert_eq!(out.len(), n_rows * n_xs, "dots: output length");
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if Isa::Avx512.available() => {
            // SAFETY: AVX-512F is present (checked above); every slice holds whole rows of `k`.
            unsafe { x86::dots_avx512(rows, xs, k, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if Isa::Avx2.available() => {
            // SAFETY: AVX2 and FMA are present (checked above); slices hold whole rows of `k`.
            unsafe { x86::dots_avx2(rows, xs, k, out) }
        }
        _ => {
            for r in 0..n_rows {
                for t in 0..n_xs {
                    out[r * n_xs + t] = dot_scalar(&rows[r * k..(r + 1) * k], &xs[t * k..(t + 1) * k]);
                }
            }
        }
    }
}

/// `out[r * n_xs + t] = dot(dequantize(row r), xs[t])` straight from Q4_0 / Q4_1 / Q8_0
/// blocks, for up to four vectors, without materializing f32 rows: the decode path, where
/// writing and rereading expanded weights would cost more than the arithmetic. Returns false
/// when the active path has no fused kernel for `ty` (the caller then expands rows and uses
/// [`dots`]). The weights are expanded with the same f32 operations as the scalar
/// dequantizer and accumulated under the same contract, so the result is bit-identical to
/// expanding first.
pub fn fused_quant_dots(
    isa: Isa,
    ty: crate::TensorType,
    w: &[u8],
    n_rows: usize,
    k: usize,
    xs: &[f32],
    out: &mut [f32],
) -> bool {
    use crate::TensorType::*;
    let n_xs = xs.len() / k;
    if !matches!(ty, Q4_0 | Q4_1 | Q8_0) || n_xs == 0 || n_xs > 4 || !k.is_multiple_of(32) {
        return false;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if Isa::Avx512.available() => {
            let row_bytes = w.len() / n_rows.max(1);
            assert_eq!(out.len(), n_rows * n_xs, "fused_quant_dots: output length");
            // SAFETY: AVX-512F is present; `w` holds `n_rows` rows of whole blocks, `xs`
            // holds `n_xs` vectors of `k`, `out` has room for every pair.
            unsafe { x86::fused_avx512(ty, w, row_bytes, n_rows, k, xs, n_xs, out) };
            true
        }
        _ => false,
    }
}

/// One dot product under the contract, portable.
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += xa[i] * xb[i];
        }
    }
    for (i, (p, q)) in ra.iter().zip(rb).enumerate() {
        acc[i] += p * q;
    }
    reduce(acc)
}

/// The contract's lane reduction.
pub fn reduce(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0]
}

/// One dot product on the active path.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut out = [0f32];
    let k = a.len().min(b.len());
    dots(isa(), &a[..k], &b[..k], k, &mut out);
    out[0]
}

// Index loops over small register arrays mirror the tile's shape; iterators would hide it.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    use super::LANES;

    /// # Safety
    /// The CPU must support AVX-512F; `rows` and `xs` hold whole rows of `k`, `out` has room
    /// for every pair.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dots_avx512(rows: &[f32], xs: &[f32], k: usize, out: &mut [f32]) {
        let n_rows = rows.len() / k;
        let n_xs = xs.len() / k;
        let mut r = 0;
        while r < n_rows {
            let rb = (n_rows - r).min(4);
            let mut t = 0;
            while t < n_xs {
                let tb = (n_xs - t).min(4);
                // SAFETY: AVX-512F is enabled for this function; indices stay inside the slices.
                unsafe {
                    match (rb, tb) {
                        (4, 4) => tile512::<4, 4>(rows, xs, k, r, t, n_xs, out),
                        (4, _) => tile512::<4, 1>(rows, xs, k, r, t, n_xs, out),
                        (_, 4) => tile512::<1, 4>(rows, xs, k, r, t, n_xs, out),
                        _ => tile512::<1, 1>(rows, xs, k, r, t, n_xs, out),
                    }
                }
                t += match (rb, tb) {
                    (4, 4) | (_, 4) => 4,
                    _ => 1,
                };
            }
            r += if rb == 4 { 4 } else { 1 };
        }
    }

    /// `R × T` outputs starting at row `r0`, vector `t0`.
    ///
    /// # Safety
    /// AVX-512F must be available; rows `r0..r0+R` and vectors `t0..t0+T` must exist.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile512<const R: usize, const T: usize>(
        rows: &[f32],
        xs: &[f32],
        k: usize,
        r0: usize,
        t0: usize,
        n_xs: usize,
        out: &mut [f32],
    ) {
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let full = k / LANES;
        let tail = k % LANES;
        let rp = rows.as_ptr();
        let xp = xs.as_ptr();
        // SAFETY: every load reads 16 floats (or a masked tail) inside row `r0 + i` or vector
        // `t0 + j`, which the caller guarantees exist.
        unsafe {
            for c in 0..full {
                let mut xv = [_mm512_setzero_ps(); T];
                for j in 0..T {
                    xv[j] = _mm512_loadu_ps(xp.add((t0 + j) * k + c * LANES));
                }
                for i in 0..R {
                    let w = _mm512_loadu_ps(rp.add((r0 + i) * k + c * LANES));
                    for j in 0..T {
                        acc[i][j] = _mm512_fmadd_ps(w, xv[j], acc[i][j]);
                    }
                }
            }
            if tail != 0 {
                let m: __mmask16 = (1u32 << tail) as u16 - 1;
                let base = full * LANES;
                let mut xv = [_mm512_setzero_ps(); T];
                for j in 0..T {
                    xv[j] = _mm512_maskz_loadu_ps(m, xp.add((t0 + j) * k + base));
                }
                for i in 0..R {
                    let w = _mm512_maskz_loadu_ps(m, rp.add((r0 + i) * k + base));
                    for j in 0..T {
                        acc[i][j] = _mm512_fmadd_ps(w, xv[j], acc[i][j]);
                    }
                }
            }
            for i in 0..R {
                for j in 0..T {
                    out[(r0 + i) * n_xs + t0 + j] = hsum512(acc[i][j]);
                }
            }
        }
    }

    /// The contract's halving reduction of one 16-lane vector.
    #[target_feature(enable = "avx512f")]
    fn hsum512(v: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        hsum256_tree(_mm256_add_ps(lo, hi))
    }

    /// Lanes `l + 4`, `l + 2`, `l + 1` of an 8-lane vector.
    #[target_feature(enable = "avx")]
    fn hsum256_tree(v: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2));
        _mm_cvtss_f32(s1)
    }

    /// # Safety
    /// AVX-512F must be available; `w` holds `n_rows` rows of `row_bytes` (whole blocks of
    /// `ty`), `xs` holds `n_xs <= 4` vectors of `k`, `out` holds `n_rows * n_xs`.
    #[target_feature(enable = "avx512f,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn fused_avx512(
        ty: crate::TensorType,
        w: &[u8],
        row_bytes: usize,
        n_rows: usize,
        k: usize,
        xs: &[f32],
        n_xs: usize,
        out: &mut [f32],
    ) {
        let mut r = 0;
        while r < n_rows {
            let rb = if n_rows - r >= 4 { 4 } else { 1 };
            let kind = match ty {
                crate::TensorType::Q8_0 => Q8_0,
                crate::TensorType::Q4_0 => Q4_0,
                _ => Q4_1,
            };
            // SAFETY: rows r..r+rb exist; AVX-512F and F16C are enabled; see the contract.
            unsafe {
                macro_rules! go {
                    ($k:expr) => {
                        match (rb, n_xs) {
                            (4, 1) => fused_tile::<$k, 4, 1>(w, row_bytes, r, k, xs, out),
                            (4, 2) => fused_tile::<$k, 4, 2>(w, row_bytes, r, k, xs, out),
                            (4, 3) => fused_tile::<$k, 4, 3>(w, row_bytes, r, k, xs, out),
                            (4, _) => fused_tile::<$k, 4, 4>(w, row_bytes, r, k, xs, out),
                            (_, 1) => fused_tile::<$k, 1, 1>(w, row_bytes, r, k, xs, out),
                            (_, 2) => fused_tile::<$k, 1, 2>(w, row_bytes, r, k, xs, out),
                            (_, 3) => fused_tile::<$k, 1, 3>(w, row_bytes, r, k, xs, out),
                            _ => fused_tile::<$k, 1, 4>(w, row_bytes, r, k, xs, out),
                        }
                    };
                }
                match kind {
                    Q8_0 => go!(Q8_0),
                    Q4_0 => go!(Q4_0),
                    _ => go!(Q4_1),
                }
            }
            r += rb;
        }
    }

    /// Block kinds of [`fused_tile`], a const parameter so the expansion is chosen at compile
    /// time and inlined into the loop.
    const Q8_0: u8 = 0;
    const Q4_0: u8 = 1;
    const Q4_1: u8 = 2;

    /// Expands the 32-element block at `$b` into two 16-lane vectors with the scalar
    /// dequantizer's exact operations (convert, multiply, then add: never fused).
    macro_rules! expand {
        ($kind:expr, $b:expr) => {{
            let b: *const u8 = $b;
            let d = _mm512_cvtph_ps(_mm256_set1_epi16(i16::from_le_bytes([*b, *b.add(1)])));
            if $kind == Q8_0 {
                let lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(2) as *const __m128i));
                let hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(18) as *const __m128i));
                (_mm512_mul_ps(_mm512_cvtepi32_ps(lo), d), _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d))
            } else if $kind == Q4_1 {
                let m = _mm512_cvtph_ps(_mm256_set1_epi16(i16::from_le_bytes([*b.add(2), *b.add(3)])));
                let raw = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.add(4) as *const __m128i));
                let lo = _mm512_cvtepi32_ps(_mm512_and_si512(raw, _mm512_set1_epi32(0x0f)));
                let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(raw));
                (_mm512_add_ps(_mm512_mul_ps(lo, d), m), _mm512_add_ps(_mm512_mul_ps(hi, d), m))
            } else {
                let raw = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.add(2) as *const __m128i));
                let eight = _mm512_set1_epi32(8);
                let lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(raw, _mm512_set1_epi32(0x0f)), eight));
                let hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32::<4>(raw), eight));
                (_mm512_mul_ps(lo, d), _mm512_mul_ps(hi, d))
            }
        }};
    }

    /// # Safety
    /// As [`fused_avx512`], with rows `r0..r0+R` present and `T == n_xs`.
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn fused_tile<const KIND: u8, const R: usize, const T: usize>(
        w: &[u8],
        row_bytes: usize,
        r0: usize,
        k: usize,
        xs: &[f32],
        out: &mut [f32],
    ) {
        let n_blocks = k / 32;
        let block_bytes = row_bytes / n_blocks;
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        // SAFETY: block `blk` of row `r0 + i` lies inside `w` (the caller guarantees the
        // rows); the vector loads read 16 floats inside `xs[t]`; F16C comes with AVX-512.
        unsafe {
            let wp = w.as_ptr().add(r0 * row_bytes);
            let xp = xs.as_ptr();
            for blk in 0..n_blocks {
                let mut xl = [_mm512_setzero_ps(); T];
                let mut xh = [_mm512_setzero_ps(); T];
                for t in 0..T {
                    xl[t] = _mm512_loadu_ps(xp.add(t * k + blk * 32));
                    xh[t] = _mm512_loadu_ps(xp.add(t * k + blk * 32 + 16));
                }
                for i in 0..R {
                    let (wl, wh) = expand!(KIND, wp.add(i * row_bytes + blk * block_bytes));
                    for t in 0..T {
                        acc[i][t] = _mm512_fmadd_ps(wl, xl[t], acc[i][t]);
                        acc[i][t] = _mm512_fmadd_ps(wh, xh[t], acc[i][t]);
                    }
                }
            }
            for i in 0..R {
                for t in 0..T {
                    out[(r0 + i) * T + t] = hsum512(acc[i][t]);
                }
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; slices as in [`dots_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots_avx2(rows: &[f32], xs: &[f32], k: usize, out: &mut [f32]) {
        let n_rows = rows.len() / k;
        let n_xs = xs.len() / k;
        let full = k / LANES;
        let tail = k % LANES;
        for r in 0..n_rows {
            let mut t = 0;
            while t < n_xs {
                let tb = (n_xs - t).min(2);
                // Two vectors at a time: 4 accumulators (lanes 0-7 and 8-15 of each output).
                let mut lo = [_mm256_setzero_ps(); 2];
                let mut hi = [_mm256_setzero_ps(); 2];
                // SAFETY: loads stay inside row `r` and vectors `t..t+tb`; AVX2/FMA enabled.
                unsafe {
                    let w = rows.as_ptr().add(r * k);
                    for c in 0..full {
                        let wl = _mm256_loadu_ps(w.add(c * LANES));
                        let wh = _mm256_loadu_ps(w.add(c * LANES + 8));
                        for j in 0..tb {
                            let x = xs.as_ptr().add((t + j) * k + c * LANES);
                            lo[j] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(x), lo[j]);
                            hi[j] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(x.add(8)), hi[j]);
                        }
                    }
                    if tail != 0 {
                        let base = full * LANES;
                        let mut wb = [0f32; LANES];
                        wb[..tail].copy_from_slice(&rows[r * k + base..r * k + k]);
                        for j in 0..tb {
                            let mut xb = [0f32; LANES];
                            xb[..tail].copy_from_slice(&xs[(t + j) * k + base..(t + j) * k + k]);
                            lo[j] = _mm256_fmadd_ps(_mm256_loadu_ps(wb.as_ptr()), _mm256_loadu_ps(xb.as_ptr()), lo[j]);
                            hi[j] = _mm256_fmadd_ps(
                                _mm256_loadu_ps(wb.as_ptr().add(8)),
                                _mm256_loadu_ps(xb.as_ptr().add(8)),
                                hi[j],
                            );
                        }
                    }
                    for j in 0..tb {
                        out[r * n_xs + t + j] = hsum256_tree(_mm256_add_ps(lo[j], hi[j]));
                    }
                }
                t += tb;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    fn every_path_matches_the_scalar_reference_on_every_shape() {
        for k in [1, 7, 16, 33, 64, 576] {
            for (nr, nx) in [(1, 1), (3, 5), (4, 4), (9, 2), (8, 13)] {
                let rows = data(nr * k, 1);
                let xs = data(nx * k, 2);
                let mut want = vec![0f32; nr * nx];
                dots(Isa::Scalar, &rows, &xs, k, &mut want);
                for isa in Isa::all_available() {
                    let mut got = vec![0f32; nr * nx];
                    dots(isa, &rows, &xs, k, &mut got);
                    for (g, w) in got.iter().zip(&want) {
                        assert!((g - w).abs() <= 1e-5 * (k as f32).sqrt().max(1.0), "{isa:?} k={k}: {g} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn fused_quantized_dots_equal_expanding_first() {
        use crate::TensorType;
        use crate::quant::{dequantize_row, quantize_row};
        let (rows, k) = (9, 96);
        let wf = data(rows * k, 5);
        for ty in [TensorType::Q4_0, TensorType::Q4_1, TensorType::Q8_0] {
            let w: Vec<u8> = wf.chunks(k).flat_map(|r| quantize_row(ty, r).unwrap()).collect();
            let mut expanded = vec![0f32; rows * k];
            for (r, out) in expanded.chunks_mut(k).enumerate() {
                let rb = w.len() / rows;
                dequantize_row(ty, &w[r * rb..(r + 1) * rb], out).unwrap();
            }
            for n in 1..=4 {
                let xs = data(n * k, 6 + n as u32);
                for isa in Isa::all_available() {
                    let mut fused = vec![0f32; rows * n];
                    if !fused_quant_dots(isa, ty, &w, rows, k, &xs, &mut fused) {
                        continue;
                    }
                    let mut want = vec![0f32; rows * n];
                    dots(isa, &expanded, &xs, k, &mut want);
                    assert_eq!(fused, want, "{isa:?} {ty} n={n}");
                }
            }
        }
    }

    #[test]
    fn simd_paths_agree_bit_for_bit_and_do_not_depend_on_the_tile() {
        let k = 100;
        let rows = data(9 * k, 3);
        let xs = data(7 * k, 4);
        let simd: Vec<Isa> = Isa::all_available().into_iter().filter(|i| *i != Isa::Scalar).collect();
        let mut first: Option<Vec<f32>> = None;
        for isa in simd {
            let mut all = vec![0f32; 9 * 7];
            dots(isa, &rows, &xs, k, &mut all);
            // Each output alone equals the same output computed inside the big tile.
            for r in 0..9 {
                for t in 0..7 {
                    let mut one = [0f32];
                    dots(isa, &rows[r * k..(r + 1) * k], &xs[t * k..(t + 1) * k], k, &mut one);
                    assert_eq!(one[0].to_bits(), all[r * 7 + t].to_bits(), "{isa:?} ({r},{t})");
                }
            }
            match &first {
                None => first = Some(all),
                Some(f) => assert_eq!(f, &all, "AVX2 and AVX-512 must agree exactly"),
            }
        }
    }
}
