//! Element-wise and small reduction ops of a Llama-family layer, and the paged KV layout.

use half::f16;

/// `out = x / rms(x) * weight`, with the mean of squares accumulated in f64 so that the
/// norm is exact to f32 precision whatever the hidden size.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f64 = x.iter().map(|v| (*v as f64) * (*v as f64)).sum();
    let scale = (1.0 / (ss / x.len() as f64 + eps as f64).sqrt()) as f32;
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// How rotary pairs are laid out inside a head.
///
/// GGUF's converter permutes Llama/Mistral q/k rows so that pairs are adjacent
/// (`x[2i], x[2i+1]`); Hugging Face checkpoints, and GGUF Qwen2, pair `x[i]` with
/// `x[i + d/2]` ("rotate half", GGML's NEOX mode). Reading a checkpoint with the wrong
/// style gives fluent-looking garbage, so the style travels with the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    Interleaved,
    HalfSplit,
}

/// Inverse frequencies of each rotary pair, with per-pair divisors already applied
/// (Llama-3 scaling, GGUF's `rope_freqs`).
#[derive(Debug, Clone)]
pub struct Rope {
    pub style: RopeStyle,
    /// Dimensions rotated per head (the rest pass through).
    pub rot_dim: usize,
    inv_freq: Vec<f64>,
}

impl Rope {
    /// `theta_i = base^(-2i / rot_dim) / factor_i`.
    pub fn new(style: RopeStyle, rot_dim: usize, base: f64, factors: Option<&[f32]>) -> Self {
        let inv_freq = (0..rot_dim / 2)
            .map(|i| {
                let f = base.powf(-2.0 * i as f64 / rot_dim as f64);
                f / factors.map_or(1.0, |fs| fs[i] as f64)
            })
            .collect();
        Self { style, rot_dim, inv_freq }
    }

    /// Rotates each `head_dim`-sized head in `x` for position `pos`.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, pos: usize) {
        let half = self.rot_dim / 2;
        for head in x.chunks_exact_mut(head_dim) {
            for (i, f) in self.inv_freq.iter().enumerate() {
                let (sin, cos) = (pos as f64 * f).sin_cos();
                let (sin, cos) = (sin as f32, cos as f32);
                let (a, b) = match self.style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::HalfSplit => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    }
}

/// `gate = silu(gate) * up`, SwiGLU's elementwise half.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// An element a KV cache may store.
pub trait KvElem: Copy + Send + Sync + Default + 'static {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    /// Converts a run of elements (SIMD where the CPU has it).
    fn convert(src: &[Self], dst: &mut [f32]);
}

impl KvElem for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn convert(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl KvElem for f16 {
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn convert(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
}

/// Geometry of one layer's paged KV pool: `[block][slot][kv_head][head_dim]`.
#[derive(Debug, Clone, Copy)]
pub struct PagedLayout {
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl PagedLayout {
    /// Offset of position `pos`'s first element for `kv_head`, through `block_table`.
    pub fn offset(&self, block_table: &[u32], pos: usize, kv_head: usize) -> usize {
        let block = block_table[pos / self.block_size] as usize;
        let slot = pos % self.block_size;
        ((block * self.block_size + slot) * self.n_kv_heads + kv_head) * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_styles_agree_after_permutation() {
        // Interleaving a half-split head's dims turns one style into the other.
        let hd = 8;
        let x: Vec<f32> = (0..hd).map(|i| i as f32 + 1.0).collect();
        let perm: Vec<f32> = (0..hd).map(|j| x[(j % 2) * hd / 2 + j / 2]).collect();
        let (mut a, mut b) = (x.clone(), perm);
        Rope::new(RopeStyle::HalfSplit, hd, 10000.0, None).apply(&mut a, hd, 7);
        Rope::new(RopeStyle::Interleaved, hd, 10000.0, None).apply(&mut b, hd, 7);
        for j in 0..hd {
            assert!((b[j] - a[(j % 2) * hd / 2 + j / 2]).abs() < 1e-6);
        }
    }
}
