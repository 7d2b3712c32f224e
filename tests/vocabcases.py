"""Shared by the tokenizer tests: llama.cpp's vocab test cases, tiny GGUFs carrying a vocabulary,
and the reference tokenisers (sentencepiece, HF tokenizers, tiktoken) of each source."""
from __future__ import annotations

import base64
import contextlib
import io
import os

import modelgen
from conftest import FIXTURES, realdata_path
from wconv.formats import gguf_io

SEPARATOR = "\n__ggml_vocab_test__\n"
TOKENIZER_FIXTURES = os.path.join(FIXTURES, "tokenizers")


def vocab_cases(name: str) -> list:
    """[(text, expected ids)] of llama.cpp's models/ggml-vocab-NAME.gguf.inp/.out, split as
    llama.cpp's tests/test-tokenizer-0.cpp splits them."""
    with open(realdata_path("llamacpp_vocab_tests", f"ggml-vocab-{name}.gguf.inp"), encoding="utf-8") as f:
        raw = f.read()
    with open(realdata_path("llamacpp_vocab_tests", f"ggml-vocab-{name}.gguf.out"), encoding="utf-8") as f:
        out = f.read().split("\n")
    if out and out[-1] == "":
        out.pop()  # getline: a final newline ends the last line, it opens no new one
    texts, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(SEPARATOR, pos)
        if nxt < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(SEPARATOR)
    assert len(texts) == len(out), f"{name}: {len(texts)} inputs, {len(out)} outputs"
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, out)]


def vocab_texts() -> list:
    """The test texts (the .inp files of every vocabulary are the same)."""
    return [t for t, _ in vocab_cases("llama-bpe")]


def tiny_model(tok, rows=None, arch="llama"):
    """A 1-layer random model whose embedding has `rows` (default: one per token) rows, carrying `tok`."""
    make = modelgen.llama_config if arch == "llama" else modelgen.gpt2_config
    cfg = make(vocab_size=rows or len(tok.tokens), dim=8, n_heads=2, n_kv_heads=2, hidden_dim=16, n_layers=1)
    m = modelgen.random_model(cfg, seed=1)
    m.tokenizer = tok
    return m


def write_gguf(tok, path, rows=None) -> str:
    with contextlib.redirect_stderr(io.StringIO()):
        gguf_io.write(tiny_model(tok, rows), os.fspath(path), quiet=True)
    return os.fspath(path)


def tiktoken_encoding(path):
    """tiktoken's own tokeniser of a rank file, with the Llama 3 regex and Meta's special tokens."""
    import tiktoken

    from wconv import pretokenizer
    from wconv.formats import tiktoken_bpe

    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                b64, rank = line.split()
                ranks[base64.b64decode(b64)] = int(rank)
    specials = {s: len(ranks) + i for i, s in enumerate(tiktoken_bpe.special_tokens())}
    return tiktoken.Encoding("wconv-test", pat_str=pretokenizer.LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens=specials)


def reference_encoder(kind: str, path):
    """text -> ids as the source's own library tokenises it (no special tokens added or parsed)."""
    if kind == "sentencepiece":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=os.fspath(path))
        return sp.encode
    if kind == "tokenizers":
        import tokenizers

        t = tokenizers.Tokenizer.from_file(os.fspath(path))
        return lambda s: t.encode(s, add_special_tokens=False).ids
    if kind == "tiktoken":
        enc = tiktoken_encoding(path)
        return lambda s: enc.encode(s, disallowed_special=())
    raise ValueError(kind)
