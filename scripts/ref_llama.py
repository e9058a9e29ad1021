"""Shared pieces of Tessera's independent Python references (scripts/ref_*.py).

Reads a Llama GGUF with the `gguf` package (its own dequantizers, float64), builds the byte-level
BPE tokenizer from the GGUF vocabulary and merges with the `tokenizers` package, and runs the
forward pass as llama.cpp's LLM_ARCH_LLAMA graph does: RMSNorm, "normal" RoPE pairing adjacent
elements on the GGUF-permuted Q/K, GQA attention, SiLU-gated FFN, output head tied to the token
embedding when there is no output.weight. Nothing here imports Tessera: it is the yardstick.
"""
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def field(r, key):
    return r.fields[key].contents()


class Llama:
    """Hyper-parameters and (cached, float64) weights of a Llama GGUF."""

    def __init__(self, path):
        r = GGUFReader(path)
        self.reader = r
        arch = field(r, "general.architecture")
        assert arch == "llama", arch
        self.n_layer = int(field(r, f"{arch}.block_count"))
        self.n_head = int(field(r, f"{arch}.attention.head_count"))
        self.n_kv = int(field(r, f"{arch}.attention.head_count_kv"))
        self.d = int(field(r, f"{arch}.embedding_length"))
        self.base = float(field(r, f"{arch}.rope.freq_base"))
        self.eps = float(field(r, f"{arch}.attention.layer_norm_rms_epsilon"))
        self.hd = self.d // self.n_head
        self.tensors = {t.name: t for t in r.tensors}
        self.out_name = "output.weight" if "output.weight" in self.tensors else "token_embd.weight"
        self._cache = {}

    def W(self, name):
        """A tensor as float64, shape (rows, ne0)."""
        if name not in self._cache:
            t = self.tensors[name]
            x = dequantize(t.data, t.tensor_type).astype(np.float64)
            self._cache[name] = x.reshape([int(v) for v in reversed(t.shape)])
        return self._cache[name]

    def hidden(self, toks, lin=None, kv=None, probs=None):
        """Final hidden states (before output_norm) of the token ids `toks`, shape (n, d).

        Hooks for diagnostics (float simulations, not the engine's integers): `lin(h, name)` is
        every linear layer (default h @ W(name).T); `kv(q, k, v)` sees each head's operands of
        the attention products and returns them; `probs(p)` sees each head's probabilities."""
        lin = lin or (lambda h, name: h @ self.W(name).T)
        n, hd, eps = len(toks), self.hd, self.eps
        pos = np.arange(n, dtype=np.float64)
        inv = self.base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        ang = pos[:, None] * inv[None, :]
        cos, sin = np.cos(ang), np.sin(ang)

        def rope(v, heads):
            v = v.reshape(n, heads, hd // 2, 2)
            a0, a1 = v[..., 0], v[..., 1]
            c, s = cos[:, None, :], sin[:, None, :]
            return np.stack([a0 * c - a1 * s, a0 * s + a1 * c], axis=-1).reshape(n, heads * hd)

        mask = np.triu(np.full((n, n), -np.inf), 1)
        x = self.W("token_embd.weight")[toks]
        g = self.n_head // self.n_kv
        for i in range(self.n_layer):
            p = f"blk.{i}."
            h = self.rms(x, p + "attn_norm.weight")
            q = rope(lin(h, p + "attn_q.weight"), self.n_head)
            k = rope(lin(h, p + "attn_k.weight"), self.n_kv)
            v = lin(h, p + "attn_v.weight")
            att = np.zeros((n, self.n_head * hd))
            for hh in range(self.n_head):
                kh = hh // g
                qs = q[:, hh * hd:(hh + 1) * hd]
                ks = k[:, kh * hd:(kh + 1) * hd]
                vs = v[:, kh * hd:(kh + 1) * hd]
                if kv:
                    qs, ks, vs = kv(qs, ks, vs)
                sc = qs @ ks.T / np.sqrt(hd) + mask
                sc = np.exp(sc - sc.max(axis=1, keepdims=True))
                sc /= sc.sum(axis=1, keepdims=True)
                if probs:
                    sc = probs(sc)
                att[:, hh * hd:(hh + 1) * hd] = sc @ vs
            x = x + lin(att, p + "attn_output.weight")
            h = self.rms(x, p + "ffn_norm.weight")
            gt = lin(h, p + "ffn_gate.weight")
            up = lin(h, p + "ffn_up.weight")
            x = x + lin(gt / (1 + np.exp(-gt)) * up, p + "ffn_down.weight")
        return x

    def rms(self, v, weight_name):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + self.eps) * self.W(weight_name)


def build_tokenizer(r):
    """The GGUF's byte-level BPE as llama.cpp tokenizes pre = "smollm": each digit split off,
    then the GPT-2 regex; control and user-defined tokens recognised in the text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

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
