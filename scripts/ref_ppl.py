#!/usr/bin/env python3
"""Independent perplexity of a Llama GGUF over a text, as llama.cpp's llama-perplexity computes
it (the check of `tessera ppl --mode f32`).

Tokenizes with the Python `tokenizers` package built from the GGUF vocabulary and merges, BOS first when tokenizer.ggml.add_bos_token says so; cuts the tokens
into floor(n / ctx) chunks of ctx tokens, the first of each replaced by BOS (when added); runs
each chunk through the numpy float64 forward pass of scripts/ref_llama.py and scores positions ctx/2 .. ctx-2 (or all with --all-positions).

Diagnostics (not the engine's integer arithmetic, float simulations of its rounding steps):
--a8 quantizes every linear layer's input per token to int8 (N5), --kv8 keys and values per
token to int8, --qprobs the attention probabilities per query (N19).

    pip install gguf numpy tokenizers
    python3 scripts/ref_ppl.py MODEL.gguf data/gpl-3.txt --ctx 512 --chunks 2
"""
import argparse
import math

import numpy as np

from ref_llama import Llama, build_tokenizer, field


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

    m = Llama(a.model)
    r = m.reader
    tok = build_tokenizer(r)
    add_bos = "tokenizer.ggml.add_bos_token" in r.fields and bool(field(r, "tokenizer.ggml.add_bos_token"))
    bos = int(field(r, "tokenizer.ggml.bos_token_id"))
    text = open(a.text, encoding="utf-8").read()
    ids = ([bos] if add_bos else []) + tok.encode(text, add_special_tokens=False).ids
    n_chunks = min(a.chunks, len(ids) // a.ctx)
    print(f"{len(ids)} tokens, add_bos {add_bos}, {n_chunks} chunks of {a.ctx}")

    def lin(h, name):
        return (q8_rows(h) if a.a8 else h) @ m.W(name).T

    kv = (lambda q, k, v: (q8_rows(q), q8_rows(k), q8_rows(v))) if a.kv8 else None
    probs = q8_rows if a.qprobs else None
    n = a.ctx
    first = 0 if a.all_positions else n // 2
    nll, count = 0.0, 0
    for c in range(n_chunks):
        toks = ids[c * n:(c + 1) * n]
        if add_bos:
            toks[0] = bos
        x = m.hidden(toks, lin=lin, kv=kv, probs=probs)
        h = m.rms(x[first:n - 1], "output_norm.weight")
        logits = lin(h, m.out_name)
        mx = logits.max(axis=1, keepdims=True)
        lse = (mx[:, 0] + np.log(np.exp(logits - mx).sum(axis=1)))
        tgt = np.array(toks[first + 1:n])
        lp = logits[np.arange(len(tgt)), tgt] - lse
        nll -= lp.sum()
        count += len(tgt)
        print(f"[{c + 1}]{math.exp(nll / count):.4f}", flush=True)
    print(f"perplexity: {math.exp(nll / count):.4f} ({count} scored tokens)")


if __name__ == "__main__":
    main()
