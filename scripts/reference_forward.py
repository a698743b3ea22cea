#!/usr/bin/env python3
"""An independent f32 forward pass of a llama-architecture GGUF model in numpy, for checking
tandem's engine on the real model: weights dequantized by the `gguf` package (llama.cpp's own
Python reader), no KV cache, the whole sequence recomputed at every step.

    pip install gguf numpy
    python3 scripts/reference_forward.py MODEL.gguf --ids 504,3575,282,4649,314 --steps 32

Prints one JSON object: the greedy ids and, per step, the top-1 minus top-2 logit gap (a
small gap means another correct implementation may pick differently), plus the last
position's logits for the prompt when --dump-logits is given.
"""
import argparse
import json

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def load(path):
    r = GGUFReader(path)
    meta = {}
    for k, f in r.fields.items():
        try:
            meta[k] = f.contents()
        except Exception:
            pass
    w = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float32)
        w[t.name] = a.reshape([int(d) for d in reversed(t.shape)]) if a.ndim == 1 and len(t.shape) > 1 else a
    return meta, w


def forward(meta, w, ids):
    arch = meta["general.architecture"]
    n_layers = meta[f"{arch}.block_count"]
    n_heads = meta[f"{arch}.attention.head_count"]
    n_kv = meta.get(f"{arch}.attention.head_count_kv", n_heads)
    eps = meta[f"{arch}.attention.layer_norm_rms_epsilon"]
    theta = meta.get(f"{arch}.rope.freq_base", 10000.0)
    x = w["token_embd.weight"][ids].astype(np.float32)
    hidden = x.shape[1]
    hd = hidden // n_heads
    n = len(ids)
    pos = np.arange(n, dtype=np.float64)
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    if "rope_freqs.weight" in w:
        inv = inv / w["rope_freqs.weight"].astype(np.float64)
    ang = np.outer(pos, inv)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)

    def rms(v, g):
        return v / np.sqrt((v.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps).astype(np.float32) * g

    def rope(v, heads):
        # GGUF llama q/k rows are permuted so rotary pairs are adjacent (2i, 2i+1).
        v = v.reshape(n, heads, hd // 2, 2)
        a, b = v[..., 0], v[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.stack([a * c - b * s, a * s + b * c], -1).reshape(n, heads * hd)

    mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
    for l in range(n_layers):
        p = f"blk.{l}."
        h = rms(x, w[p + "attn_norm.weight"])
        q = rope(h @ w[p + "attn_q.weight"].T, n_heads)
        k = rope(h @ w[p + "attn_k.weight"].T, n_kv)
        v = h @ w[p + "attn_v.weight"].T
        q = q.reshape(n, n_heads, hd).transpose(1, 0, 2)
        k = np.repeat(k.reshape(n, n_kv, hd).transpose(1, 0, 2), n_heads // n_kv, 0)
        v = np.repeat(v.reshape(n, n_kv, hd).transpose(1, 0, 2), n_heads // n_kv, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(1, 0, 2).reshape(n, hidden)
        x = x + o @ w[p + "attn_output.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        g = h @ w[p + "ffn_gate.weight"].T
        u = h @ w[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])
    return rms(x[-1:], w["output_norm.weight"]) @ head.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--ids", required=True, help="comma-separated prompt token ids")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dump-logits", action="store_true")
    a = ap.parse_args()
    meta, w = load(a.model)
    ids = [int(t) for t in a.ids.split(",")]
    out, gaps, first = [], [], None
    for _ in range(a.steps):
        logits = forward(meta, w, ids + out)[0]
        if first is None:
            first = logits
        top = np.argsort(-logits)[:2]
        gaps.append(float(logits[top[0]] - logits[top[1]]))
        out.append(int(top[0]))
    res = {"prompt_ids": ids, "greedy_ids": out, "top1_minus_top2_logit": gaps}
    if a.dump_logits:
        res["prompt_last_logits"] = [float(v) for v in first]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
