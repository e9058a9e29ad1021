#!/usr/bin/env python3
"""Reference token ids for Tessera's tokenizer tests, from a GGUF's vocabulary and merges.

Builds a byte-level BPE with the Python `tokenizers` package the way llama.cpp tokenizes
`tokenizer.ggml.pre = "smollm"` (each digit split off, then the GPT-2 regex; control tokens in
the text recognised), and prints one JSON line per sentence: {"text": ..., "ids": [...]}.

    pip install gguf tokenizers
    python3 scripts/ref_tokenize.py MODEL.gguf "Hello world" "123 + 4567" ...
"""
import json
import sys

from gguf import GGUFReader

from ref_llama import build_tokenizer


def main():
    path, texts = sys.argv[1], sys.argv[2:]
    tok = build_tokenizer(GGUFReader(path))
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text, text
        print(json.dumps({"text": text, "ids": ids}, ensure_ascii=False))


if __name__ == "__main__":
    main()
