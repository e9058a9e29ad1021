#!/usr/bin/env python3
"""Independent numpy (float64) forward pass of a Llama GGUF, the reference for Tessera's runtime.

Reads the file with the `gguf` package (its own dequantizers), runs the prompt's token ids through
the model as llama.cpp's LLM_ARCH_LLAMA graph does (RMSNorm, "normal" RoPE pairing adjacent
elements on the GGUF-permuted Q/K, GQA attention, SiLU-gated FFN, output head tied to the token
embedding when there is no output.weight), and prints the last token's top logits. With --json it
writes what tests/data/runtime_ref_logits.json holds: the token ids, the top-k ids and logits,
the logits at every `stride`-th id, and the largest |logit|. With --npy it saves all logits.

    pip install gguf numpy
    python3 scripts/ref_forward.py MODEL.gguf --tokens 504,3458,282 [--json out.json] [--npy l.npy]
"""
import argparse
import json

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def field(r, key):
    f = r.fields[key]
    return f.contents()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", required=True, help="comma-separated token ids")
    ap.add_argument("--json")
    ap.add_argument("--npy")
    ap.add_argument("--stride", type=int, default=997)
    ap.add_argument("--topk", type=int, default=10)
    a = ap.parse_args()

    r = GGUFReader(a.model)
    arch = field(r, "general.architecture")
    assert arch == "llama", arch
    n_layer = int(field(r, f"{arch}.block_count"))
    n_head = int(field(r, f"{arch}.attention.head_count"))
    n_kv = int(field(r, f"{arch}.attention.head_count_kv"))
    d = int(field(r, f"{arch}.embedding_length"))
    base = float(field(r, f"{arch}.rope.freq_base"))
    eps = float(field(r, f"{arch}.attention.layer_norm_rms_epsilon"))
    hd = d // n_head
    tensors = {t.name: t for t in r.tensors}

    def W(name):
        t = tensors[name]
        x = dequantize(t.data, t.tensor_type).astype(np.float64)
        return x.reshape([int(v) for v in reversed(t.shape)])  # (rows, ne0)

    toks = [int(t) for t in a.tokens.split(",")]
    n = len(toks)
    emb = W("token_embd.weight")
    out_w = W("output.weight") if "output.weight" in tensors else emb
    x = emb[toks]  # (n, d)

    def rms(v, w):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * w

    pos = np.arange(n, dtype=np.float64)
    inv = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = pos[:, None] * inv[None, :]  # (n, hd/2)
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v, heads):
        v = v.reshape(n, heads, hd // 2, 2)
        a0, a1 = v[..., 0], v[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.stack([a0 * c - a1 * s, a0 * s + a1 * c], axis=-1).reshape(n, heads * hd)

    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(n_layer):
        p = f"blk.{i}."
        h = rms(x, W(p + "attn_norm.weight"))
        q = rope(h @ W(p + "attn_q.weight").T, n_head)
        k = rope(h @ W(p + "attn_k.weight").T, n_kv)
        v = h @ W(p + "attn_v.weight").T
        att = np.zeros((n, n_head * hd))
        g = n_head // n_kv
        for hh in range(n_head):
            kh = hh // g
            qs = q[:, hh * hd:(hh + 1) * hd]
            ks = k[:, kh * hd:(kh + 1) * hd]
            vs = v[:, kh * hd:(kh + 1) * hd]
            sc = qs @ ks.T / np.sqrt(hd) + mask
            sc = np.exp(sc - sc.max(axis=1, keepdims=True))
            sc /= sc.sum(axis=1, keepdims=True)
            att[:, hh * hd:(hh + 1) * hd] = sc @ vs
        x = x + att @ W(p + "attn_output.weight").T
        h = rms(x, W(p + "ffn_norm.weight"))
        gt = h @ W(p + "ffn_gate.weight").T
        up = h @ W(p + "ffn_up.weight").T
        x = x + (gt / (1 + np.exp(-gt)) * up) @ W(p + "ffn_down.weight").T
    h = rms(x[-1], W("output_norm.weight"))
    logits = out_w @ h

    top = np.argsort(-logits, kind="stable")[: a.topk]
    for t in top:
        print(f"{int(t)}\t{logits[t]:.6f}")
    if a.npy:
        np.save(a.npy, logits.astype(np.float32))
    if a.json:
        ids = list(range(0, len(logits), a.stride))
        with open(a.json, "w") as f:
            json.dump(
                {
                    "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
                    "tokens": toks,
                    "top_ids": [int(t) for t in top],
                    "top_logits": [float(logits[t]) for t in top],
                    "stride": a.stride,
                    "strided_logits": [float(logits[i]) for i in ids],
                    "max_abs": float(np.max(np.abs(logits))),
                },
                f,
                indent=1,
            )
            f.write("\n")


if __name__ == "__main__":
    main()
