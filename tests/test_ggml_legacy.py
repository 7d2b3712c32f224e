"""Legacy llama.cpp files (ggml, ggmf v1, ggjt v1-v3): reading, ggjt v3 writing, upgrade to GGUF.

Input files are built here by a writer that follows the documented byte layout
(docs/ggjt.md, llama.cpp's convert_llama_ggml_to_gguf.py), not by wconv's writer;
files wconv writes are parsed here by an equally independent parser.
"""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelgen
from wconv.cli import main as cli
from wconv.convert.load import load_model
from wconv.errors import FormatError, UnsupportedError, UsageError, WconvError
from wconv.formats import ggml_legacy, gguf_io
from wconv.inspect.report import format_text, inspect_path
from wconv.model import Tokenizer

MAGIC = {"ggml": 0x67676D6C, "ggmf": 0x67676D66, "ggjt": 0x67676A74}
META_NAMES = {  # Meta / old llama.cpp tensor names -> canonical (GGUF) names
    "tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
META_LAYER = {"attention_norm.weight": "attn_norm.weight", "attention.wq.weight": "attn_q.weight",
              "attention.wk.weight": "attn_k.weight", "attention.wv.weight": "attn_v.weight",
              "attention.wo.weight": "attn_output.weight", "ffn_norm.weight": "ffn_norm.weight",
              "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
              "feed_forward.w3.weight": "ffn_up.weight"}


def meta_names(n_layers):
    names = dict(META_NAMES)
    for i in range(n_layers):
        names.update({f"layers.{i}.{k}": f"blk.{i}.{v}" for k, v in META_LAYER.items()})
    return names


# --------------------------------------------------------------------------- independent writer / parser
def legacy_bytes(kind, version, hparams, vocab, tensors) -> bytes:
    """hparams: 7 ints; vocab: [(text, score)]; tensors: [(name, ggml_type, dims (row length first), data)]."""
    out = bytearray(struct.pack("<I", MAGIC[kind]))
    if kind != "ggml":
        out += struct.pack("<I", version)
    out += struct.pack("<7I", *hparams)
    for text, score in vocab:
        out += struct.pack("<I", len(text)) + text
        if kind != "ggml":
            out += struct.pack("<f", score)
    for name, ttype, dims, data in tensors:
        out += struct.pack("<3I", len(dims), len(name), ttype) + struct.pack(f"<{len(dims)}I", *dims) + name
        if kind == "ggjt":
            out += bytes(-len(out) % 32)
        out += data
    return bytes(out)


def parse_ggjt(data: bytes):
    """Parse a ggjt v3 file per docs/ggjt.md: (hparams, vocab, {name: (type, dims, offset, bytes)})."""
    magic, version = struct.unpack_from("<II", data, 0)
    assert (magic, version) == (MAGIC["ggjt"], 3)
    hp = struct.unpack_from("<7I", data, 8)
    pos, vocab = 36, []
    for _ in range(hp[0]):
        (n,) = struct.unpack_from("<I", data, pos)
        text = data[pos + 4:pos + 4 + n]
        (score,) = struct.unpack_from("<f", data, pos + 4 + n)
        vocab.append((text, score))
        pos += 8 + n
    tensors = {}
    sizes = {0: (1, 4), 1: (1, 2), 8: (32, 34), 2: (32, 18)}
    while pos < len(data):
        n_dims, name_len, ttype = struct.unpack_from("<3I", data, pos)
        dims = struct.unpack_from(f"<{n_dims}I", data, pos + 12)
        pos += 12 + 4 * n_dims
        name = data[pos:pos + name_len].decode()
        pos += name_len
        pos += -pos % 32
        block, size = sizes[ttype]
        nbytes = int(np.prod(dims)) // block * size
        tensors[name] = (ttype, dims, pos, data[pos:pos + nbytes])
        pos += nbytes
    assert pos == len(data)
    return hp, vocab, tensors


def old_vocab(n_extra_words=()):
    """A vocabulary the way llama.cpp's old convert.py stored Llama's: <unk> as ' ⁇ ', <s>/</s> empty,
    byte tokens as raw bytes (ids 3-258), spaces as ' '."""
    vocab = [(" \u2047 ".encode(), 0.0), (b"", 0.0), (b"", 0.0)]
    vocab += [(bytes([b]), 0.0) for b in range(256)]
    words = [b" the", b"ing", b" wo", b"rld", "中".encode()] + list(n_extra_words)
    vocab += [(w, -float(i + 1)) for i, w in enumerate(words)]
    expected_tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    expected_tokens += [w.replace(b" ", "\u2581".encode()) for w in words]
    expected_types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    return vocab, expected_tokens, expected_types


def legacy_model_file(tmp_path, kind, version, ttype=QT.F32, name="m.bin", n_vocab=264):
    cfg = modelgen.llama_config(vocab_size=n_vocab, n_kv_heads=4, hidden_dim=192, dim=64)
    m = modelgen.random_model(cfg, seed=7)
    vocab, tokens, types = old_vocab()
    tensors = []
    for meta, canon in meta_names(cfg.n_layers).items():
        x = m[canon].float32()
        qt = ttype if x.ndim == 2 else QT.F32
        data = quantize(x, qt).tobytes() if qt not in (QT.F32,) else x.tobytes()
        tensors.append((meta.encode(), int(qt), tuple(reversed(x.shape)), data))
    hp = (n_vocab, 64, 256, 4, 2, 16, {QT.F32: 0, QT.F16: 1, QT.Q4_0: 2, QT.Q8_0: 7, QT.Q5_0: 8}[ttype])
    path = os.path.join(tmp_path, name)
    with open(path, "wb") as f:
        f.write(legacy_bytes(kind, version, hp, vocab, tensors))
    return path, m, tokens, types, [s for _, s in vocab]


# --------------------------------------------------------------------------- reading
@pytest.mark.parametrize("kind,version", [("ggml", 0), ("ggmf", 1), ("ggjt", 1), ("ggjt", 2), ("ggjt", 3)])
@pytest.mark.parametrize("ttype", [QT.F32, QT.F16])
def test_read_every_version(tmp_path, kind, version, ttype):
    path, src, tokens, types, scores = legacy_model_file(tmp_path, kind, version, ttype)
    m = load_model(path)  # sniffed by magic
    assert m.source_format == (kind if kind == "ggml" else f"{kind}-v{version}")
    c = m.config
    assert (c.arch, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.hidden_dim) == \
        ("llama", 64, 2, 4, 4, 264, 192)
    assert (c.max_seq_len, c.norm_eps) == (2048, 5e-6)  # not stored in these files
    assert set(m.tensors) == set(src.tensors)
    for name, t in src.tensors.items():
        want = t.float32()
        if want.ndim == 2 and ttype == QT.F16:
            want = want.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(m[name].float32(), want)
    assert m.tokenizer.tokens == tokens and m.tokenizer.token_types == types
    assert m.tokenizer.scores == (None if kind == "ggml" else pytest.approx(scores))
    assert (m.tokenizer.bos_id, m.tokenizer.eos_id, m.tokenizer.unk_id) == (1, 2, 0)


@pytest.mark.parametrize("ttype", [QT.Q8_0, QT.Q4_0])
def test_read_ggjt_v3_quantised(tmp_path, ttype):
    path, src, *_ = legacy_model_file(tmp_path, "ggjt", 3, ttype)
    m = ggml_legacy.read(path)
    for name, t in src.tensors.items():
        if len(t.shape) == 2:
            q = quantize(t.float32(), ttype)
            assert m[name].dtype.name == ttype.name and m[name].raw().tobytes() == q.tobytes()
            np.testing.assert_array_equal(m[name].float32(), dequantize(q, ttype).reshape(t.shape))


def test_q5_0_from_ggjt_v2_is_current_layout(tmp_path):
    path, src, *_ = legacy_model_file(tmp_path, "ggjt", 2, QT.Q5_0)
    m = ggml_legacy.read(path)
    w = src["blk.0.attn_q.weight"].float32()
    np.testing.assert_array_equal(m["blk.0.attn_q.weight"].float32(),
                                  dequantize(quantize(w, QT.Q5_0), QT.Q5_0).reshape(w.shape))


@pytest.mark.parametrize("kind,version,ttype", [("ggjt", 2, QT.Q4_0), ("ggjt", 2, QT.Q8_0), ("ggjt", 1, QT.Q4_0),
                                                ("ggmf", 1, QT.Q4_0), ("ggml", 0, QT.Q8_0)])
def test_old_quantisation_layouts_refused(tmp_path, kind, version, ttype):
    path, *_ = legacy_model_file(tmp_path, kind, version, ttype)
    with pytest.raises(UnsupportedError, match="old layout"):
        ggml_legacy.read(path)


def test_every_truncation_is_a_format_error(tmp_path):
    path, *_ = legacy_model_file(tmp_path, "ggjt", 3, QT.F16)
    data = open(path, "rb").read()
    cuts = list(range(0, 3000, 7)) + list(range(3000, len(data) - 1, 1013))
    for cut in cuts:
        bad = os.path.join(tmp_path, "cut.bin")
        with open(bad, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(FormatError):
            ggml_legacy.read(bad)


@pytest.mark.parametrize("data,error,match", [
    (struct.pack("<II", MAGIC["ggjt"], 4) + bytes(40), UnsupportedError, "unknown ggjt version 4"),
    (struct.pack("<II", MAGIC["ggmf"], 2) + bytes(40), UnsupportedError, "unknown ggmf version 2"),
    (struct.pack("<II", 0x12345678, 1) + bytes(40), FormatError, "not a GGML"),
    (struct.pack("<II7I", MAGIC["ggjt"], 3, 1 << 30, 64, 256, 4, 2, 16, 0), FormatError, "vocabulary entries"),
    (struct.pack("<II7I", MAGIC["ggjt"], 3, 1, 0, 256, 4, 2, 16, 0) + bytes(8), FormatError, "implausible"),
    (struct.pack("<II7II", MAGIC["ggjt"], 3, 1, 64, 256, 4, 2, 16, 0, 1 << 30) + bytes(8), FormatError, "claims"),
    (struct.pack("<II7III3I", MAGIC["ggjt"], 3, 1, 64, 256, 4, 2, 16, 0, 0, 0, 7, 1, 0) + bytes(64), FormatError,
     "bad tensor header"),
    (struct.pack("<II7III3II", MAGIC["ggjt"], 3, 1, 64, 256, 4, 2, 16, 0, 0, 0, 1, 1, 99, 4) + bytes(64),
     FormatError, "unknown GGML type"),
    (struct.pack("<II7III3II", MAGIC["ggjt"], 3, 1, 64, 256, 4, 2, 16, 0, 0, 0, 1, 1, 0, 1 << 30) + b"x" +
     bytes(64), FormatError, "truncated"),
    (struct.pack("<II7III3II", MAGIC["ggjt"], 3, 1, 64, 256, 4, 2, 16, 0, 0, 0, 1, 1, 8, 20) + b"x" + bytes(64),
     FormatError, "bad shape"),
])
def test_malformed_files(tmp_path, data, error, match):
    path = os.path.join(tmp_path, "bad.ggjt")
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(error, match=match) as info:
        ggml_legacy.read(path)
    assert str(info.value).startswith(path)


# --------------------------------------------------------------------------- writing
def spm_like_tokenizer(n):
    toks = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    toks += [("\u2581w" + str(i)).encode() for i in range(n - len(toks))]
    types = [2, 3, 3] + [6] * 256 + [1] * (n - 259)
    return Tokenizer(model="llama", tokens=toks, scores=[-float(i) for i in range(n)], token_types=types,
                     bos_id=1, eos_id=2, unk_id=0)


@pytest.mark.parametrize("dtype,qt", [(None, QT.F32), ("f16", QT.F16), ("q8_0", QT.Q8_0), ("q4_0", QT.Q4_0)])
def test_write_ggjt_layout_parsed_independently(tmp_path, dtype, qt):
    m = modelgen.random_model(modelgen.llama_config(vocab_size=300, hidden_dim=192))
    m.tokenizer = spm_like_tokenizer(300)
    path = os.path.join(tmp_path, "w.ggjt")
    ggml_legacy.write_ggjt(m, path, quiet=True, dtype=dtype)
    hp, vocab, tensors = parse_ggjt(open(path, "rb").read())
    n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype = hp
    assert (n_vocab, n_embd, n_head, n_layer, n_rot) == (300, 64, 4, 2, 16)
    assert ftype == {QT.F32: 0, QT.F16: 1, QT.Q8_0: 7, QT.Q4_0: 2}[qt]
    assert ((8 * n_embd // 3 + n_mult - 1) // n_mult) * n_mult == 192  # old llama.cpp's n_ff formula
    assert vocab[:3] == [(" \u2047 ".encode(), 0.0), (b"", -1.0), (b"", -2.0)]
    assert vocab[3 + 0x41] == (b"A", -float(3 + 0x41))
    assert vocab[299] == (b" w40", -299.0)
    names = meta_names(2)
    assert set(tensors) == set(names)
    for meta, (ttype, dims, offset, data) in tensors.items():
        x = m[names[meta]].float32()
        assert offset % 32 == 0 and dims == tuple(reversed(x.shape))
        if x.ndim == 1 or qt == QT.F32:
            assert ttype == 0 and data == x.tobytes()
        elif qt == QT.F16:
            assert ttype == 1 and data == x.astype(np.float16).tobytes()
        else:
            assert ttype == int(qt) and data == quantize(x, qt).tobytes()


def test_write_read_round_trip_and_tied_classifier(tmp_path):
    m = modelgen.random_model(modelgen.llama_config(vocab_size=300, tie_embeddings=True))
    m.tokenizer = spm_like_tokenizer(300)
    path = os.path.join(tmp_path, "t.ggjt")
    notes = ggml_legacy.write_ggjt(m, path, quiet=True, dtype="f16")
    assert any("tied classifier" in n for n in notes) and any("grouped-query" in n for n in notes)
    back = ggml_legacy.read(path)
    c, b = m.config, back.config
    assert (b.dim, b.n_layers, b.n_heads, b.n_kv_heads, b.vocab_size, b.hidden_dim) == \
        (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.hidden_dim)
    assert back.tokenizer.tokens == m.tokenizer.tokens
    assert back.tokenizer.token_types == m.tokenizer.token_types
    assert back.tokenizer.scores == m.tokenizer.scores
    np.testing.assert_array_equal(back["output.weight"].raw(), back["token_embd.weight"].raw())
    for name, t in m.tensors.items():
        want = t.float32() if len(t.shape) == 1 else t.float32().astype(np.float16)
        np.testing.assert_array_equal(back[name].raw(), want)


def test_upgrade_ggjt_to_gguf_with_cli(tmp_path):
    path, src, tokens, types, scores = legacy_model_file(tmp_path, "ggjt", 3, QT.Q8_0, name="old.ggjt")
    out = os.path.join(tmp_path, "new.gguf")
    result = CliRunner().invoke(cli, ["convert", path, out, "-q"])
    assert result.exit_code == 0, result.output
    new = gguf_io.read(out)
    old = ggml_legacy.read(path)
    assert new.metadata["general.file_type"] == 7 and new.metadata["llama.context_length"] == 2048
    for name, t in old.tensors.items():
        assert new[name].dtype == t.dtype and new[name].raw().tobytes() == t.raw().tobytes()
    assert new.tokenizer.tokens == tokens and new.tokenizer.token_types == types


def test_write_refusals_and_missing_tokenizer(tmp_path):
    out = os.path.join(tmp_path, "x.ggjt")
    with pytest.raises(UnsupportedError, match="llama models only"):
        ggml_legacy.write_ggjt(modelgen.random_model(modelgen.gpt2_config()), out)
    m = modelgen.random_model(modelgen.llama_config())
    with pytest.raises(UsageError, match="bf16"):
        ggml_legacy.write_ggjt(m, out, dtype="bf16")
    m.tokenizer = spm_like_tokenizer(300)
    with pytest.raises(UsageError, match="300 tokens"):
        ggml_legacy.write_ggjt(m, out)
    m.tokenizer = None
    notes = ggml_legacy.write_ggjt(m, out, quiet=True)
    assert any("no tokenizer" in n for n in notes)
    assert ggml_legacy.read(out).tokenizer is None


def test_n_mult_for_known_llama_sizes():
    # LLaMA 7B / 13B / 65B: multiple_of 256 and the 8/3 rule give these hidden sizes.
    for dim, hidden in [(4096, 11008), (5120, 13824), (8192, 22016)]:
        m = ggml_legacy.n_mult_for(dim, hidden)
        assert m is not None and ((8 * dim // 3 + m - 1) // m) * m == hidden
    assert ggml_legacy.n_mult_for(64, 160) is None  # smaller than 8/3 * dim: no n_mult reproduces it


def test_write_ggjt_peak_memory_is_about_one_tensor(tmp_path):
    import tracemalloc

    from test_gguf import _generated_model

    m = _generated_model(modelgen.llama_config(dim=512, hidden_dim=1408, n_heads=8, n_kv_heads=8,
                                               vocab_size=2048, n_layers=6))
    largest = max(t.nbytes for t in m)
    tracemalloc.start()
    try:
        ggml_legacy.write_ggjt(m, os.path.join(tmp_path, "big.ggjt"), quiet=True, dtype="q8_0")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * largest + (1 << 20)
    assert peak < sum(t.nbytes for t in m) / 5


_FUZZ = {}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6))
def test_corrupted_files_only_raise_wconv_errors(tmp_path, flips):
    if "data" not in _FUZZ:
        path, *_ = legacy_model_file(tmp_path, "ggjt", 3, QT.Q8_0, name="fuzz-src.ggjt")
        _FUZZ["data"] = open(path, "rb").read()
    data = bytearray(_FUZZ["data"])
    for pos, val in flips:
        data[pos % len(data)] = val
    path = os.path.join(tmp_path, "fuzz.ggjt")
    with open(path, "wb") as f:
        f.write(bytes(data))
    try:
        m = ggml_legacy.read(path)
    except WconvError:
        return
    for t in m.tensors.values():
        t.float32()


def test_vocab_only_ggjt_and_rwkv_files(tmp_path):
    # llama.cpp's 2023 vocab-only files zero every hyperparameter but n_vocab: shown as a vocabulary.
    path = tmp_path / "ggml-vocab.bin"
    tokens = [b"", b"", b"", b" a", b" b"]
    with open(path, "wb") as f:
        f.write(struct.pack("<II", 0x67676A74, 1) + struct.pack("<7I", len(tokens), 0, 0, 0, 0, 0, 0))
        for t in tokens:
            f.write(struct.pack("<I", len(t)) + t + struct.pack("<f", -float(len(t))))
    report = inspect_path(str(path))
    assert report["metadata"]["vocab_only"] and report["n_tensors"] == 0
    assert report["tokenizer"]["n_tokens"] == 5
    assert "a vocabulary only" in format_text(report)
    with open(path, "ab") as f:  # ...but tensor data after a zeroed header is a broken file
        f.write(b"\0" * 64)
    with pytest.raises(FormatError, match="vocab-only"):
        ggml_legacy.read(str(path))
    # rwkv.cpp also used the ggmf magic, with versions 100 and 101: named, not called implausible.
    for version in (100, 101):
        rwkv = tmp_path / f"rwkv{version}.bin"
        rwkv.write_bytes(struct.pack("<II", 0x67676D66, version) + b"\0" * 64)
        with pytest.raises(UnsupportedError, match=f"rwkv.cpp model \\(ggmf version {version}\\)"):
            inspect_path(str(rwkv))
