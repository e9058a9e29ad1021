#!/usr/bin/env python3
"""Independent perplexity of a Llama GGUF over a text, as llama.cpp's llama-perplexity computes
it (the check of `tessera ppl --mode f32`).

Tokenizes with the Python `tokenizers` package built from the GGUF vocabulary and merges (as
scripts/ref_tokenize.py), BOS first when tokenizer.ggml.add_bos_token says so; cuts the tokens
into floor(n / ctx) chunks of ctx tokens, the first of each replaced by BOS (when added); runs
each chunk through a numpy float64 forward pass (as scripts/ref_forward.py: the `gguf` package's
own dequantizers) and scores positions ctx/2 .. ctx-2 (or all with --all-positions).

Diagnostics (not the engine's integer arithmetic, float simulations of its rounding steps):
--a8 quantizes every linear layer's input per token to int8 (N5), --kv8 keys and values per
token to int8, --qprobs the attention probabilities per query (N19).

    pip install gguf numpy tokenizers
    python3 scripts/ref_ppl.py MODEL.gguf data/gpl-3.txt --ctx 512 --chunks 2
"""
import argparse
import math

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers


def field(r, key):
    return r.fields[key].contents()


def build_tokenizer(r):
    tokens = field(r, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field(r, "tokenizer.ggml.merges")]
    types = field(r, "tokenizer.ggml.token_type")
    assert field(r, "tokenizer.ggml.pre") == "smollm"
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty in (3, 4)])
    return tok


def q8_rows(x):
    """N5 per-row symmetric int8, float simulation (round half away from zero)."""
    s = np.abs(x).max(axis=-1, keepdims=True) / 127.0
    s = np.where(s == 0, 1.0, s)
    q = np.clip(np.sign(x / s) * np.floor(np.abs(x / s) + 0.5), -127, 127)
    return q * s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--all-positions", action="store_true")
    ap.add_argument("--a8", action="store_true")
    ap.add_argument("--kv8", action="store_true")
    ap.add_argument("--qprobs", action="store_true")
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
    cache = {}

    def W(name):
        if name not in cache:
            t = tensors[name]
            x = dequantize(t.data, t.tensor_type).astype(np.float64)
            cache[name] = x.reshape([int(v) for v in reversed(t.shape)])
        return cache[name]

    tok = build_tokenizer(r)
    add_bos = "tokenizer.ggml.add_bos_token" in r.fields and bool(field(r, "tokenizer.ggml.add_bos_token"))
    bos = int(field(r, "tokenizer.ggml.bos_token_id"))
    text = open(a.text, encoding="utf-8").read()
    ids = ([bos] if add_bos else []) + tok.encode(text, add_special_tokens=False).ids
    n_chunks = min(a.chunks, len(ids) // a.ctx)
    print(f"{len(ids)} tokens, add_bos {add_bos}, {n_chunks} chunks of {a.ctx}")

    def lin(h, name):
        return (q8_rows(h) if a.a8 else h) @ W(name).T

    n = a.ctx
    pos = np.arange(n, dtype=np.float64)
    inv = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v, heads):
        v = v.reshape(n, heads, hd // 2, 2)
        a0, a1 = v[..., 0], v[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.stack([a0 * c - a1 * s, a0 * s + a1 * c], axis=-1).reshape(n, heads * hd)

    def rms(v, w):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * w

    mask = np.triu(np.full((n, n), -np.inf), 1)
    emb = W("token_embd.weight")
    out_name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    first = 0 if a.all_positions else n // 2
    nll, count = 0.0, 0
    for c in range(n_chunks):
        toks = ids[c * n:(c + 1) * n]
        if add_bos:
            toks[0] = bos
        x = emb[toks]
        for i in range(n_layer):
            p = f"blk.{i}."
            h = rms(x, W(p + "attn_norm.weight"))
            q = rope(lin(h, p + "attn_q.weight"), n_head)
            k = rope(lin(h, p + "attn_k.weight"), n_kv)
            v = lin(h, p + "attn_v.weight")
            att = np.zeros((n, n_head * hd))
            g = n_head // n_kv
            for hh in range(n_head):
                kh = hh // g
                qs = q[:, hh * hd:(hh + 1) * hd]
                ks = k[:, kh * hd:(kh + 1) * hd]
                vs = v[:, kh * hd:(kh + 1) * hd]
                if a.kv8:
                    qs, ks, vs = q8_rows(qs), q8_rows(ks), q8_rows(vs)
                sc = qs @ ks.T / np.sqrt(hd) + mask
                sc = np.exp(sc - sc.max(axis=1, keepdims=True))
                sc /= sc.sum(axis=1, keepdims=True)
                if a.qprobs:
                    sc = q8_rows(sc)
                att[:, hh * hd:(hh + 1) * hd] = sc @ vs
            x = x + lin(att, p + "attn_output.weight")
            h = rms(x, W(p + "ffn_norm.weight"))
            gt = lin(h, p + "ffn_gate.weight")
            up = lin(h, p + "ffn_up.weight")
            x = x + lin(gt / (1 + np.exp(-gt)) * up, p + "ffn_down.weight")
        h = rms(x[first:n - 1], W("output_norm.weight"))
        logits = lin(h, out_name)
        m = logits.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
        tgt = np.array(toks[first + 1:n])
        lp = logits[np.arange(len(tgt)), tgt] - lse
        nll -= lp.sum()
        count += len(tgt)
        print(f"[{c + 1}]{math.exp(nll / count):.4f}", flush=True)
    print(f"perplexity: {math.exp(nll / count):.4f} ({count} scored tokens)")


if __name__ == "__main__":
    main()
