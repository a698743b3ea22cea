//! Matrix products against weights kept in their stored block format.
//!
//! A task expands a block of weight rows into f32 once and runs the shared dot-product tile
//! ([`crate::simd`]) against every token's activations, so dequantization is paid once per
//! row per call and the batch only adds multiply-adds. Each (row, token) dot follows the
//! same arithmetic contract whatever the batch: a sequence's logits do not depend on what
//! else is in the batch.

use rayon::prelude::*;

use crate::KernelError;
use crate::quant::{TensorType, dequantize_row};
pub use crate::simd::dot;
use crate::simd::{dots, fused_quant_dots, isa};

/// A borrowed `rows × cols` weight matrix in row-major block layout.
#[derive(Debug, Clone, Copy)]
pub struct WeightMatrix<'a> {
    pub ty: TensorType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> WeightMatrix<'a> {
    /// Checks that `data` is exactly `rows` whole rows of `ty`.
    pub fn new(ty: TensorType, rows: usize, cols: usize, data: &'a [u8]) -> Result<Self, KernelError> {
        let expected = ty.row_bytes(cols)?.checked_mul(rows).ok_or(KernelError::Shape {
            what: "weight matrix size overflows",
            left: rows,
            right: cols,
        })?;
        if data.len() != expected {
            return Err(KernelError::ByteLength { what: "weight matrix", expected, actual: data.len() });
        }
        Ok(Self { ty, rows, cols, data })
    }

    /// The stored bytes of row `r`.
    pub fn row_bytes(&self, r: usize) -> &'a [u8] {
        let n = self.data.len() / self.rows.max(1);
        &self.data[r * n..(r + 1) * n]
    }

    /// Row `r` expanded to f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<(), KernelError> {
        if r >= self.rows {
            return Err(KernelError::Shape { what: "row index past the matrix", left: r, right: self.rows });
        }
        dequantize_row(self.ty, self.row_bytes(r), out)
    }
}

/// Rows handed to one task: enough work to amortise scheduling, small enough to balance.
const MIN_ROWS_PER_TASK: usize = 16;

/// Rows per task: about four tasks per thread (enough to balance, few enough that waking
/// threads does not dominate a small matrix), a multiple of 4 for the tiles, and at most 64
/// when rows are expanded to f32 so the expanded block stays in L2.
fn rows_per_task(rows: usize, cols: usize) -> usize {
    let per = rows.div_ceil(4 * rayon::current_num_threads().max(1));
    let cap = (256 * 1024 / (4 * cols.max(1))).max(MIN_ROWS_PER_TASK);
    per.clamp(MIN_ROWS_PER_TASK, cap.max(MIN_ROWS_PER_TASK)).next_multiple_of(4)
}

/// `y[t][r] = Σ_c w[r][c] · x[t][c]` for `n_tokens = x.len() / cols` tokens.
pub fn matmul(w: &WeightMatrix<'_>, x: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
    if !x.len().is_multiple_of(w.cols) {
        return Err(KernelError::Shape { what: "matmul input length vs cols", left: x.len(), right: w.cols });
    }
    let n_tokens = x.len() / w.cols;
    if y.len() != n_tokens * w.rows {
        return Err(KernelError::Shape { what: "matmul output length", left: y.len(), right: n_tokens * w.rows });
    }
    w.ty.row_bytes(w.cols)?;
    let isa = isa();
    let per_task = rows_per_task(w.rows, w.cols);
    let tasks: Vec<(usize, Vec<f32>)> = (0..w.rows.div_ceil(per_task))
        .into_par_iter()
        .map(|task| {
            let r0 = task * per_task;
            let r1 = (r0 + per_task).min(w.rows);
            let mut out = vec![0f32; (r1 - r0) * n_tokens];
            let bytes = &w.data[r0 * w.data.len() / w.rows..r1 * w.data.len() / w.rows];
            if fused_quant_dots(isa, w.ty, bytes, r1 - r0, w.cols, x, &mut out) {
                return (r0, out);
            }
            let mut rows = vec![0f32; (r1 - r0) * w.cols];
            for (r, buf) in (r0..r1).zip(rows.chunks_exact_mut(w.cols)) {
                // Length and type were checked above, so this cannot fail.
                let _ = dequantize_row(w.ty, w.row_bytes(r), buf);
            }
            dots(isa, &rows, x, w.cols, &mut out);
            (r0, out)
        })
        .collect();
    for (r0, out) in tasks {
        let n_rows = out.len() / n_tokens.max(1);
        for i in 0..n_rows {
            for t in 0..n_tokens {
                y[t * w.rows + r0 + i] = out[i * n_tokens + t];
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize_row;

    fn reference(w: &[f32], rows: usize, cols: usize, x: &[f32]) -> Vec<f32> {
        let n = x.len() / cols;
        let mut y = vec![0f32; n * rows];
        for t in 0..n {
            for r in 0..rows {
                let s: f64 = (0..cols).map(|c| w[r * cols + c] as f64 * x[t * cols + c] as f64).sum();
                y[t * rows + r] = s as f32;
            }
        }
        y
    }

    #[test]
    fn matmul_matches_reference_and_is_batch_invariant() {
        let (rows, cols) = (70, 64);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 101) as f32 - 50.0) / 50.0).collect();
        let x: Vec<f32> = (0..3 * cols).map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0).collect();
        let bytes: Vec<u8> = w.chunks(cols).flat_map(|r| quantize_row(TensorType::F32, r).unwrap()).collect();
        let m = WeightMatrix::new(TensorType::F32, rows, cols, &bytes).unwrap();
        let mut y = vec![0f32; 3 * rows];
        matmul(&m, &x, &mut y).unwrap();
        let want = reference(&w, rows, cols, &x);
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        // The second token alone gives the same bits as inside the batch.
        let mut y1 = vec![0f32; rows];
        matmul(&m, &x[cols..2 * cols], &mut y1).unwrap();
        assert_eq!(&y1[..], &y[rows..2 * rows]);
    }

    #[test]
    fn shape_errors_name_the_problem() {
        let bytes = vec![0u8; 34 * 2];
        assert!(WeightMatrix::new(TensorType::Q8_0, 2, 32, &bytes[..60]).is_err());
        let m = WeightMatrix::new(TensorType::Q8_0, 2, 32, &bytes).unwrap();
        let mut y = vec![0f32; 3];
        let err = matmul(&m, &[0f32; 32], &mut y).unwrap_err();
        assert!(err.to_string().contains("matmul output length"));
    }
}
