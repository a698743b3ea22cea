//! Causal attention over a paged KV cache, for any mix of prefill chunks and decode tokens.
//!
//! Work is split into tasks of (sequence, KV head, tile of up to [`Q_TILE`] query tokens).
//! A task walks the sequence's blocks once: it converts each block's keys and values to f32
//! once for all the queries of the tile and all query heads that share the KV head
//! (grouped-query attention without copying K/V per query head), scores them with the shared
//! dot-product tile, and folds them into each query's running softmax (flash-attention
//! style: one pass, no score matrix).
//!
//! For every query the sequence of operations is the same whatever the tile, batch or chunk
//! it sits in (same blocks in the same order, same dot products), so decoding a token gives
//! the same bits as computing it inside a prefill chunk.

use rayon::prelude::*;

use crate::ops::{KvElem, PagedLayout};
use crate::simd::{dots, isa};

/// Query tokens per task: enough to amortize K/V conversion, small enough for many tasks.
pub const Q_TILE: usize = 16;

/// One sequence's share of the batch.
#[derive(Debug, Clone, Copy)]
pub struct AttnSeq<'a> {
    /// Index of the sequence's first token among the batch's query rows.
    pub first_row: usize,
    pub n_tokens: usize,
    /// Position of the first token; token `i` attends to positions `0..=start_pos + i`.
    pub start_pos: usize,
    pub block_table: &'a [u32],
}

/// `out[row] = softmax(q·Kᵀ / √d) V` for every query row of every sequence; `q` and `out` are
/// `rows × (n_heads · head_dim)`.
pub fn paged_attention<T: KvElem>(
    seqs: &[AttnSeq<'_>],
    q: &[f32],
    n_heads: usize,
    layout: PagedLayout,
    k_pool: &[T],
    v_pool: &[T],
    out: &mut [f32],
) {
    let hd = layout.head_dim;
    let group = n_heads / layout.n_kv_heads;
    let q_dim = n_heads * hd;
    let mut tasks = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        for g in 0..layout.n_kv_heads {
            for t0 in (0..seq.n_tokens).step_by(Q_TILE) {
                tasks.push((s, g, t0, (seq.n_tokens - t0).min(Q_TILE)));
            }
        }
    }
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(s, g, t0, nt)| attend_tile(&seqs[s], q, q_dim, group, g, t0, nt, layout, k_pool, v_pool))
        .collect();
    for (&(s, g, t0, nt), res) in tasks.iter().zip(results) {
        let seq = &seqs[s];
        for i in 0..nt {
            let row = seq.first_row + t0 + i;
            for h in 0..group {
                let head = g * group + h;
                let src = (i * group + h) * hd;
                out[row * q_dim + head * hd..row * q_dim + (head + 1) * hd].copy_from_slice(&res[src..src + hd]);
            }
        }
    }
}

/// One task; returns `nt × group × head_dim` outputs.
#[allow(clippy::too_many_arguments)]
fn attend_tile<T: KvElem>(
    seq: &AttnSeq<'_>,
    q: &[f32],
    q_dim: usize,
    group: usize,
    g: usize,
    t0: usize,
    nt: usize,
    layout: PagedLayout,
    k_pool: &[T],
    v_pool: &[T],
) -> Vec<f32> {
    let hd = layout.head_dim;
    let bs = layout.block_size;
    let isa = isa();
    let scale = 1.0 / (hd as f32).sqrt();
    let nq = nt * group;
    // Query rows of this tile, grouped-query heads adjacent: row i*group + h.
    let mut qbuf = vec![0f32; nq * hd];
    for i in 0..nt {
        let row = seq.first_row + t0 + i;
        for h in 0..group {
            let head = g * group + h;
            qbuf[(i * group + h) * hd..(i * group + h + 1) * hd]
                .copy_from_slice(&q[row * q_dim + head * hd..row * q_dim + (head + 1) * hd]);
        }
    }
    let mut acc = vec![0f32; nq * hd];
    let mut max = vec![f32::NEG_INFINITY; nq];
    let mut sum = vec![0f32; nq];
    let last_pos = seq.start_pos + t0 + nt - 1;
    let mut kbuf = vec![0f32; bs * hd];
    let mut vbuf = vec![0f32; bs * hd];
    let mut scores = vec![0f32; nq * bs];
    for blk in 0..=last_pos / bs {
        let p0 = blk * bs;
        let nk = (last_pos + 1 - p0).min(bs);
        for j in 0..nk {
            let off = layout.offset(seq.block_table, p0 + j, g);
            T::convert(&k_pool[off..off + hd], &mut kbuf[j * hd..(j + 1) * hd]);
            T::convert(&v_pool[off..off + hd], &mut vbuf[j * hd..(j + 1) * hd]);
        }
        let s = &mut scores[..nq * nk];
        dots(isa, &qbuf, &kbuf[..nk * hd], hd, s);
        for i in 0..nt {
            let pos = seq.start_pos + t0 + i;
            if pos < p0 {
                continue;
            }
            let visible = (pos + 1 - p0).min(nk);
            for h in 0..group {
                let r = i * group + h;
                let sr = &s[r * nk..r * nk + visible];
                let block_max = sr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
                let new_max = max[r].max(block_max);
                let o = &mut acc[r * hd..(r + 1) * hd];
                if new_max > max[r] {
                    let c = (max[r] - new_max).exp();
                    sum[r] *= c;
                    o.iter_mut().for_each(|x| *x *= c);
                    max[r] = new_max;
                }
                for (j, &sv) in sr.iter().enumerate() {
                    let e = (sv * scale - new_max).exp();
                    sum[r] += e;
                    for (x, v) in o.iter_mut().zip(&vbuf[j * hd..(j + 1) * hd]) {
                        *x += e * v;
                    }
                }
            }
        }
    }
    for r in 0..nq {
        let inv = 1.0 / sum[r];
        acc[r * hd..(r + 1) * hd].iter_mut().for_each(|x| *x *= inv);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain two-pass softmax attention in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        keys: &[Vec<f32>],
        vals: &[Vec<f32>],
        n_heads: usize,
        n_kv: usize,
        hd: usize,
        pos: usize,
    ) -> Vec<f32> {
        let group = n_heads / n_kv;
        let mut out = vec![0f32; n_heads * hd];
        for h in 0..n_heads {
            let g = h / group;
            let s: Vec<f64> = (0..=pos)
                .map(|p| {
                    (0..hd).map(|d| q[h * hd + d] as f64 * keys[p][g * hd + d] as f64).sum::<f64>() / (hd as f64).sqrt()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                out[h * hd + d] = (0..=pos).map(|p| e[p] / z * vals[p][g * hd + d] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn prefill_and_decode_match_the_reference_and_each_other() {
        let (n_heads, n_kv, hd, bs) = (6, 2, 16, 4);
        let layout = PagedLayout { block_size: bs, n_kv_heads: n_kv, head_dim: hd };
        let n = 37;
        let table: Vec<u32> = (0..10).map(|i| (i * 3) % 10).collect();
        let val = |i: usize| ((i * 7919 % 113) as f32 - 56.0) / 40.0;
        let keys: Vec<Vec<f32>> = (0..n).map(|p| (0..n_kv * hd).map(|d| val(p * 131 + d)).collect()).collect();
        let vals: Vec<Vec<f32>> = (0..n).map(|p| (0..n_kv * hd).map(|d| val(p * 71 + d + 5)).collect()).collect();
        let mut kp = vec![0f32; 10 * bs * n_kv * hd];
        let mut vp = kp.clone();
        for p in 0..n {
            for g in 0..n_kv {
                let off = layout.offset(&table, p, g);
                kp[off..off + hd].copy_from_slice(&keys[p][g * hd..(g + 1) * hd]);
                vp[off..off + hd].copy_from_slice(&vals[p][g * hd..(g + 1) * hd]);
            }
        }
        let q: Vec<f32> = (0..n * n_heads * hd).map(|i| val(i + 999)).collect();
        let q_dim = n_heads * hd;
        // All 37 tokens as one prefill chunk.
        let mut prefill = vec![0f32; n * q_dim];
        let seq = AttnSeq { first_row: 0, n_tokens: n, start_pos: 0, block_table: &table };
        paged_attention(&[seq], &q, n_heads, layout, &kp, &vp, &mut prefill);
        for pos in 0..n {
            let want = reference(&q[pos * q_dim..(pos + 1) * q_dim], &keys, &vals, n_heads, n_kv, hd, pos);
            for (a, b) in prefill[pos * q_dim..(pos + 1) * q_dim].iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "pos {pos}: {a} vs {b}");
            }
            // The same token decoded alone, batched behind another sequence, gives the same bits.
            let mut one = vec![0f32; 2 * q_dim];
            let other = AttnSeq { first_row: 0, n_tokens: 1, start_pos: 3, block_table: &table };
            let me = AttnSeq { first_row: 1, n_tokens: 1, start_pos: pos, block_table: &table };
            let mut qq = q[..q_dim].to_vec();
            qq.extend_from_slice(&q[pos * q_dim..(pos + 1) * q_dim]);
            paged_attention(&[other, me], &qq, n_heads, layout, &kp, &vp, &mut one);
            assert_eq!(&one[q_dim..], &prefill[pos * q_dim..(pos + 1) * q_dim], "decode vs prefill at {pos}");
        }
    }
}
