#!/usr/bin/env python3
"""Independent numpy (float64) forward pass of a Llama GGUF, the reference for Tessera's runtime.

Reads the file with the `gguf` package (its own dequantizers), runs the prompt's token ids through
the model as llama.cpp's LLM_ARCH_LLAMA graph does (scripts/ref_llama.py), and prints the last
token's top logits. With --json it writes what tests/data/runtime_ref_logits.json holds: the token ids, the top-k ids and logits,
the logits at every `stride`-th id, and the largest |logit|. With --npy it saves all logits.

    pip install gguf numpy
    python3 scripts/ref_forward.py MODEL.gguf --tokens 504,3458,282 [--json out.json] [--npy l.npy]
"""
import argparse
import json

import numpy as np

from ref_llama import Llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", required=True, help="comma-separated token ids")
    ap.add_argument("--json")
    ap.add_argument("--npy")
    ap.add_argument("--stride", type=int, default=997)
    ap.add_argument("--topk", type=int, default=10)
    a = ap.parse_args()

    m = Llama(a.model)
    toks = [int(t) for t in a.tokens.split(",")]
    x = m.hidden(toks)
    h = m.rms(x[-1], "output_norm.weight")
    logits = m.W(m.out_name) @ h

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
