//! Picking the next token from logits.
//!
//! Order of operations, as in vLLM and Hugging Face: penalties (repetition over prompt and
//! output, presence and frequency over the output) on the raw logits, then temperature, then
//! top-k, top-p and min-p on the resulting distribution, then a draw from the request's own
//! seeded generator. The generator belongs to the request, so a seed gives the same tokens
//! whatever else is in the batch. Logprobs are reported from the unmodified distribution
//! (what the model believes, not what the sampler chose from).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The most top logprobs a request may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// How to sample. `temperature == 0` is greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// Drop tokens whose probability is below `min_p ×` the top token's; 0 disables.
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of tokens seen in prompt or output; 1 disables.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Names the first parameter out of range.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        Ok(())
    }
}

/// A chosen token with its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub id: u32,
    pub logprob: f32,
    /// `(id, logprob)`, most likely first; empty unless asked for.
    pub top: Vec<(u32, f32)>,
}

/// A sampler with its own random stream.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    scratch: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self { params, rng: StdRng::seed_from_u64(params.seed), scratch: Vec::new() }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token id with no history (no penalties apply).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.sample_full(logits, &[], &[], 0).id
    }

    /// The next token given the prompt and the output so far, with `n_top` top logprobs.
    pub fn sample_full(&mut self, logits: &[f32], prompt: &[u32], output: &[u32], n_top: usize) -> Sampled {
        let p = self.params;
        let mut l = std::mem::take(&mut self.scratch);
        l.clear();
        l.extend_from_slice(logits);
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; l.len()];
            for &t in prompt.iter().chain(output) {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (v, s) in l.iter_mut().zip(seen) {
                if s {
                    *v = if *v > 0.0 { *v / p.repetition_penalty } else { *v * p.repetition_penalty };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in output {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                if let Some(v) = l.get_mut(t as usize) {
                    *v -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
        let id = if p.temperature <= 0.0 { argmax(&l) } else { self.draw(&l) };
        self.scratch = l;
        let (logprob, top) = logprobs(logits, id, n_top.min(MAX_TOP_LOGPROBS));
        Sampled { id, logprob, top }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        let inv_t = 1.0 / p.temperature;
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l * inv_t)).collect();
        // Highest first; ties broken by id so the order is deterministic.
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs.iter().position(|q| {
                acc += q;
                acc >= p.top_p
            });
            probs.truncate(keep.map_or(probs.len(), |i| i + 1));
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            let keep = probs.iter().position(|&q| q < floor).unwrap_or(probs.len());
            probs.truncate(keep.max(1));
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, q) in probs.iter().enumerate() {
            r -= q;
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// Log-softmax of `logits` at `id`, and the `n_top` most likely `(id, logprob)`.
pub fn logprobs(logits: &[f32], id: u32, n_top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&v| ((v - max) as f64).exp()).sum::<f64>().ln() as f32;
    let lp = logits.get(id as usize).map_or(f32::NEG_INFINITY, |v| v - lse);
    let mut top = Vec::new();
    if n_top > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = n_top.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |a, b| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b)));
        idx.truncate(k);
        idx.sort_unstable_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b)));
        top = idx.into_iter().map(|i| (i, logits[i as usize] - lse)).collect();
    }
    (lp, top)
}

/// Index of the largest logit; the lowest index wins a tie.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(p: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(p);
        (0..n).map(|_| s.sample(logits)).collect()
    }

    #[test]
    fn greedy_picks_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), 1);
        assert_eq!(Sampler::new(SamplingParams::default()).sample(&[0.5, -1.0, 3.0]), 2);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 17) % 11) as f32 / 3.0).collect();
        let p = SamplingParams { temperature: 1.0, top_p: 0.9, seed: 42, ..Default::default() };
        assert_eq!(draws(p, &logits, 20), draws(p, &logits, 20));
        assert_ne!(draws(p, &logits, 20), draws(SamplingParams { seed: 43, ..p }, &logits, 20));
        assert!(draws(SamplingParams { top_k: 1, ..p }, &logits, 10).iter().all(|&t| t == argmax(&logits)));
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // Probabilities ~0.64, 0.24, 0.09, 0.03.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let p = SamplingParams { temperature: 1.0, seed: 1, ..Default::default() };
        let only_top2 = draws(SamplingParams { top_p: 0.8, ..p }, &logits, 300);
        assert!(only_top2.iter().all(|&t| t < 2) && only_top2.contains(&1));
        let min_p = draws(SamplingParams { min_p: 0.3, ..p }, &logits, 300);
        assert!(min_p.iter().all(|&t| t < 2) && min_p.contains(&1));
        let all = draws(p, &logits, 2000);
        assert!(all.contains(&3));
    }

    #[test]
    fn penalties_move_greedy_choice() {
        let logits = [2.0f32, 1.9, 0.0];
        let mut s = Sampler::new(SamplingParams { presence_penalty: 0.5, ..Default::default() });
        assert_eq!(s.sample_full(&logits, &[], &[0], 0).id, 1);
        let mut s = Sampler::new(SamplingParams { frequency_penalty: 0.06, ..Default::default() });
        assert_eq!(s.sample_full(&logits, &[], &[0], 0).id, 0, "one repeat costs 0.06 < 0.1");
        assert_eq!(s.sample_full(&logits, &[], &[0, 0], 0).id, 1, "two repeats cost 0.12 > 0.1");
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 1.2, ..Default::default() });
        assert_eq!(s.sample_full(&logits, &[0], &[], 0).id, 1, "2.0/1.2 < 1.9");
    }

    #[test]
    fn logprobs_are_normalized_and_sorted() {
        let logits = [1.0f32, 3.0, 2.0, 0.5];
        let (lp, top) = logprobs(&logits, 2, 3);
        let z: f32 = logits.iter().map(|v| v.exp()).sum();
        assert!((lp - (2.0f32.exp() / z).ln()).abs() < 1e-5);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2, 0]);
        let total: f32 = logprobs(&logits, 0, 4).1.iter().map(|t| t.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
    }

    #[test]
    fn validation_names_the_parameter() {
        let bad = SamplingParams { top_p: 0.0, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("top_p"));
        let bad = SamplingParams { frequency_penalty: 3.0, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("frequency_penalty"));
    }
}
