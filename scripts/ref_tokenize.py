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
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers


def main():
    path, texts = sys.argv[1], sys.argv[2:]
    r = GGUFReader(path)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in r.fields["tokenizer.ggml.merges"].contents()]
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty in (3, 4)])
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text, text
        print(json.dumps({"text": text, "ids": ids}, ensure_ascii=False))


if __name__ == "__main__":
    main()
