"""GGUF reading and writing.

Independent checks: gguf-py's own GGUFReader reads every file we write; element
data is compared with numpy / torch conversions and with Q8_0/Q4_0 blocks decoded
here from the documented GGML block layout; vocabularies are compared with
llama.cpp's own GGUF vocab files; our header parser is compared with GGUFReader
on real third-party files. llama.cpp itself loads our output in
test_llamacpp_interop.py.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelgen
import wconv
from conftest import fixture_path, realdata_path
from wconv import arch, dtypes, reference
from wconv.convert.save import convert, save
from wconv.errors import FormatError, UnsupportedError, UsageError, WconvError
from wconv.formats import gguf_io, safetensors_io
from wconv.model import Tokenizer
from wconv.tensor import LazyTensor


def write(model, tmp_path, name="m.gguf", **kw):
    path = os.path.join(tmp_path, name)
    gguf_io.write(model, path, quiet=True, **kw)
    return path


def kv_of(reader: GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


# ----------------------------------------------------------------------------- metadata
@pytest.mark.parametrize("tied", [False, True])
def test_llama_metadata_as_gguf_py_reads_it(tmp_path, tied):
    m = modelgen.random_model(modelgen.llama_config(tie_embeddings=tied))
    r = GGUFReader(write(m, tmp_path))
    kv = kv_of(r)
    assert kv["general.architecture"] == "llama"
    assert kv["llama.context_length"] == 32
    assert kv["llama.embedding_length"] == 64
    assert kv["llama.block_count"] == 2
    assert kv["llama.feed_forward_length"] == 160
    assert kv["llama.attention.head_count"] == 4
    assert kv["llama.attention.head_count_kv"] == 2
    assert kv["llama.rope.dimension_count"] == 16
    assert kv["llama.rope.freq_base"] == 10000.0
    assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert kv["llama.vocab_size"] == 96
    assert kv["general.file_type"] == 0  # LLAMA_FTYPE_ALL_F32
    assert kv["tokenizer.ggml.model"] == "no_vocab"
    names = [t.name for t in r.tensors]
    assert names == arch.require("llama").expected_names(modelgen.llama_config(n_layers=2, tie_embeddings=tied))
    assert ("output.weight" in names) is (not tied)


def test_gpt2_metadata_as_gguf_py_reads_it(tmp_path):
    m = modelgen.random_model(modelgen.gpt2_config())
    kv = kv_of(GGUFReader(write(m, tmp_path)))
    assert kv["general.architecture"] == "gpt2"
    assert kv["gpt2.context_length"] == 32
    assert kv["gpt2.embedding_length"] == 48
    assert kv["gpt2.feed_forward_length"] == 192
    assert kv["gpt2.attention.head_count"] == 4
    assert kv["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert not any(k.startswith("gpt2.rope") or k.startswith("llama.") for k in kv)


@pytest.mark.parametrize("dtype,ftype", [(None, 0), ("f32", 0), ("f16", 1), ("bf16", 32), ("q8_0", 7), ("q4_0", 2)])
def test_file_type_is_llama_ftype(tmp_path, dtype, ftype):
    m = modelgen.random_model(modelgen.llama_config())
    assert kv_of(GGUFReader(write(m, tmp_path, dtype=dtype)))["general.file_type"] == ftype


# ----------------------------------------------------------------------------- tensor data
def _bf16_bits_torch(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("dtype", [None, "f32", "f16", "bf16", "q8_0", "q4_0"])
def test_tensor_bytes_match_independent_conversion(tmp_path, dtype):
    m = modelgen.random_model(modelgen.llama_config())
    r = GGUFReader(write(m, tmp_path, dtype=dtype))
    for rt in r.tensors:
        src = m[rt.name].float32()
        raw = np.asarray(rt.data)
        assert tuple(reversed(rt.shape.tolist())) == src.shape
        if src.ndim == 1 or dtype in (None, "f32"):
            assert rt.tensor_type == QT.F32
            np.testing.assert_array_equal(raw, src)
        elif dtype == "f16":
            assert rt.tensor_type == QT.F16
            np.testing.assert_array_equal(raw, src.astype(np.float16))
        elif dtype == "bf16":
            assert rt.tensor_type == QT.BF16
            np.testing.assert_array_equal(raw.reshape(-1).view(np.uint16), _bf16_bits_torch(src).reshape(-1))
        else:
            qt = QT[dtype.upper()]
            if rt.name == "output.weight" and dtype == "q4_0":
                # llama-quantize's rule (followed since k-quants): the classifier gets Q6_K, here
                # Q8_0 since rows of 64 are not whole Q6_K blocks; q8_0 files keep Q8_0.
                qt = QT.Q8_0
            assert rt.tensor_type == qt
            assert raw.tobytes() == quantize(src, qt).tobytes()


def _decode_q8_0(raw: bytes, shape) -> tuple[np.ndarray, np.ndarray]:
    """GGML Q8_0: blocks of [f16 scale d][32 x int8 q]; value = d * q."""
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(shape), d


def _decode_q4_0(raw: bytes, shape) -> tuple[np.ndarray, np.ndarray]:
    """GGML Q4_0: [f16 d][16 bytes]; low nibbles are elements 0-15, high 16-31; value = d * (q - 8)."""
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8
    return (d * q).reshape(shape), d


@pytest.mark.parametrize("dtype,decode", [("q8_0", _decode_q8_0), ("q4_0", _decode_q4_0)])
def test_quantised_blocks_decode_by_hand_and_error_bounded(tmp_path, dtype, decode):
    m = modelgen.random_model(modelgen.llama_config())
    ours = gguf_io.read(write(m, tmp_path, dtype=dtype))
    for name, t in ours.tensors.items():
        src = m[name].float32()
        if src.ndim == 1 or t.dtype.name != dtype.upper():  # q4_0: output.weight is Q8_0 (llama-quantize's rule)
            continue
        values, d = decode(t.raw().tobytes(), src.shape)
        np.testing.assert_array_equal(t.float32(), values)  # our reader's dequantisation
        blocks = src.reshape(-1, 32)
        amax = np.abs(blocks).max(axis=1)
        err = np.abs(values.reshape(-1, 32) - blocks).max(axis=1)
        # Q8_0: step amax/127, rounding error <= half a step. Q4_0: step amax/8, one end
        # clips from +8 to +7, so <= one step. The f16 scale adds <= |q| * d * 2^-11 = amax * 2^-11.
        bound = (amax / 254 if dtype == "q8_0" else amax / 8) + amax * 2.0 ** -10
        assert np.all(err <= bound + 1e-7), name


def test_default_keeps_source_types_and_copies_quantised_blocks(tmp_path):
    m = modelgen.random_model(modelgen.llama_config())
    q = gguf_io.read(write(m, tmp_path, "q.gguf", dtype="q8_0"))
    again = gguf_io.read(write(q, tmp_path, "again.gguf"))
    for name, t in q.tensors.items():
        assert again[name].dtype == t.dtype
        assert again[name].raw().tobytes() == t.raw().tobytes()
    h16 = modelgen.random_model(modelgen.llama_config(), dtype=np.float16)
    kept = gguf_io.read(write(h16, tmp_path, "h.gguf"))
    assert {t.dtype.name for t in kept if len(t.shape) == 2} == {"F16"}
    assert {t.dtype.name for t in kept if len(t.shape) == 1} == {"F32"}


def test_requantising_and_bf16_source(tmp_path):
    m = modelgen.random_model(modelgen.llama_config())
    q4 = gguf_io.read(write(m, tmp_path, "q4.gguf", dtype="q4_0"))
    notes = gguf_io.write(q4, os.path.join(tmp_path, "q8.gguf"), quiet=True, dtype="q8_0")
    n_q4 = sum(t.dtype is dtypes.Q4_0 for t in q4)  # (output.weight is Q8_0 there: llama-quantize's rule)
    assert [n for n in notes if "dequantised and re-quantised" in n] == [
        f"{n_q4} Q4_0 tensors dequantised and re-quantised to q8_0 (Q8_0); quality is lower than quantising "
        "the original f16/f32 weights"]
    q8 = gguf_io.read(os.path.join(tmp_path, "q8.gguf"))
    for name, t in q8.tensors.items():
        if len(t.shape) == 2 and q4[name].dtype is dtypes.Q8_0:
            assert t.raw().tobytes() == q4[name].raw().tobytes()  # same type: copied
        elif len(t.shape) == 2:
            assert t.raw().tobytes() == quantize(q4[name].float32(), QT.Q8_0).tobytes()
    bits = {n: _bf16_bits_torch(t.float32()) for n, t in m.tensors.items()}
    src = modelgen.random_model(modelgen.llama_config())
    src.tensors = {n: LazyTensor.from_array(n, b, dtypes.BF16) for n, b in bits.items()}
    out = gguf_io.read(write(src, tmp_path, "bf.gguf"))
    for n, t in out.tensors.items():
        if len(t.shape) == 2:
            assert t.dtype is dtypes.BF16 and np.array_equal(t.raw(), bits[n])
        else:  # 1-D: widened exactly to F32
            assert t.dtype is dtypes.F32 and np.array_equal(t.raw(), dtypes.bf16_to_f32(bits[n]))


def test_quantisation_falls_back_per_tensor(tmp_path, capsys):
    m = modelgen.random_model(modelgen.gpt2_config())  # dim 48: rows of 48 are not whole Q8_0 blocks
    notes = gguf_io.write(m, os.path.join(tmp_path, "g.gguf"), quiet=True, dtype="q8_0")
    out = gguf_io.read(os.path.join(tmp_path, "g.gguf"))
    for name, t in out.tensors.items():
        if len(t.shape) == 1 or name == "position_embd.weight":  # never quantised (llama-quantize's rule)
            assert t.dtype is dtypes.F32
        elif t.shape[-1] % 32 == 0:  # ffn_down: rows of hidden_dim 192
            assert t.dtype is dtypes.Q8_0, name
        else:
            assert t.dtype is dtypes.F16, name
            assert any(n.startswith(name) for n in notes)
    assert "written as F16 instead of Q8_0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- streaming
def test_writer_streams_one_tensor_at_a_time(tmp_path):
    m = modelgen.random_model(modelgen.llama_config())
    path = os.path.join(tmp_path, "s.gguf")
    seen = []

    def wrap(t):
        def load():
            seen.append((t.name, os.path.getsize(path)))
            return t.loader()
        return LazyTensor(t.name, t.dtype, t.shape, load, t.source)

    m.tensors = {n: wrap(t) for n, t in m.tensors.items()}
    # One thread: the next tensor is loaded only once the previous one is written (with more,
    # the next tensor's first pieces are prepared while the previous one is being written).
    gguf_io.write(m, path, quiet=True, dtype="f16", threads=1)
    assert [n for n, _ in seen] == list(m.tensors)  # each loaded once, in file order
    sizes = [s for _, s in seen]
    assert sizes[0] > 0 and all(b > a for a, b in zip(sizes, sizes[1:]))  # data written between loads


# ----------------------------------------------------------------------------- our reader
def _compare_with_gguf_py(path):
    ours = gguf_io.read(path)
    theirs = GGUFReader(path)
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        want = field.contents()
        got = ours.metadata[key]
        if isinstance(got, dict):  # summarised long array
            assert got["array_length"] == len(want) and got["first"] == want[:len(got["first"])]
        elif isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-6)
        else:
            assert got == want, key
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for rt in theirs.tensors:
        t = ours[rt.name]
        assert t.dtype.name == rt.tensor_type.name
        assert t.shape == tuple(reversed(rt.shape.tolist()))
        assert t.raw().tobytes() == np.asarray(rt.data).tobytes()
    if "tokenizer.ggml.tokens" in theirs.fields:
        f = theirs.fields["tokenizer.ggml.tokens"]
        assert ours.tokenizer.tokens == [bytes(f.parts[i]) for i in f.data]
    return ours


@pytest.mark.slow  # GGUFReader needs 3-7 s per 32k-50k-token vocabulary
@pytest.mark.parametrize("name", ["ollama_llama-2-tiny-random_f16.gguf", "ggml-vocab-llama-spm.gguf",
                                  "ggml-vocab-gpt-2.gguf"])
def test_reader_agrees_with_gguf_py_on_real_files(realdata, name):
    _compare_with_gguf_py(realdata("gguf", name))


@pytest.mark.parametrize("dtype", [None, "f16", "bf16", "q8_0", "q4_0"])
def test_reader_agrees_with_gguf_py_on_written_files(tmp_path, dtype):
    _compare_with_gguf_py(write(modelgen.random_model(modelgen.gpt2_config()), tmp_path, dtype=dtype))


def test_reads_big_endian_gguf_written_by_gguf_py(tmp_path):
    path = os.path.join(tmp_path, "be.gguf")
    w = GGUFWriter(path, "llama", endianess=GGUFEndian.BIG)
    w.add_uint32("llama.embedding_length", 8)
    w.add_array("some.floats", [1.5, -2.0, 3.25])
    x = np.arange(24, dtype=np.float32).reshape(3, 8) / 7
    h = (np.arange(16, dtype=np.float32) / 3).astype(np.float16).reshape(2, 8)
    w.add_tensor("a.weight", x)
    w.add_tensor("b.weight", h)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    m = gguf_io.read(path)
    assert m.metadata["GGUF.byte_order"] == "big"
    assert m.metadata["llama.embedding_length"] == 8 and m.metadata["some.floats"] == [1.5, -2.0, 3.25]
    np.testing.assert_array_equal(m["a.weight"].float32(), x)
    np.testing.assert_array_equal(m["b.weight"].raw(), h)


# ----------------------------------------------------------------------------- real files
def test_real_ollama_gguf_round_trips(realdata, tmp_path):
    src = realdata("gguf", "ollama_llama-2-tiny-random_f16.gguf")
    m = gguf_io.read(src)
    theirs = m.metadata  # our parser matches GGUFReader on this file: test_reader_agrees_with_gguf_py_on_real_files
    c = m.config
    assert (c.arch, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.max_seq_len) == (
        theirs["general.architecture"], theirs["llama.embedding_length"], theirs["llama.block_count"],
        theirs["llama.attention.head_count"], theirs["llama.attention.head_count_kv"],
        theirs["llama.feed_forward_length"], theirs["llama.context_length"])
    assert c.vocab_size == len(m.tokenizer.tokens) == m["token_embd.weight"].shape[0]
    tokens = [1, 450, 4996, 17354, 1701, 29916]
    logits = reference.forward(m, tokens)
    assert logits.shape == (len(tokens), c.vocab_size) and np.isfinite(logits).all()

    out = os.path.join(tmp_path, "copy.gguf")
    save(m, out, quiet=True)
    copy = gguf_io.read(out)
    assert copy.metadata["general.file_type"] == theirs["general.file_type"]
    for name, t in m.tensors.items():
        assert copy[name].dtype == t.dtype and copy[name].raw().tobytes() == t.raw().tobytes()
    assert copy.tokenizer.tokens == m.tokenizer.tokens
    assert copy.tokenizer.scores == m.tokenizer.scores
    assert copy.tokenizer.token_types == m.tokenizer.token_types
    np.testing.assert_array_equal(reference.forward(copy, tokens), logits)


@pytest.mark.parametrize("ext", [".safetensors", ".bin"])
def test_real_ollama_gguf_through_other_formats_and_back(realdata, tmp_path, ext):
    from wconv.convert.load import load_model

    m = gguf_io.read(realdata("gguf", "ollama_llama-2-tiny-random_f16.gguf"))
    tokens = [1, 450, 4996, 17354, 1701, 29916]
    want = reference.forward(m, tokens)
    mid = os.path.join(tmp_path, "mid" + ext)
    save(m, mid, quiet=True)
    back_path = os.path.join(tmp_path, "back.gguf")
    back = load_model(mid)
    back.tokenizer = m.tokenizer
    save(back, back_path, quiet=True)
    back = gguf_io.read(back_path)
    # f16 -> f32 (llama2.c) or f16 (safetensors) -> GGUF is exact: identical logits.
    np.testing.assert_array_equal(reference.forward(back, tokens), want)


def test_vocab_equals_llama_cpp_own_conversion(realdata, tmp_path):
    from wconv.formats import sentencepiece

    spm = sentencepiece.read(realdata("llama2c", "tokenizer.model"))
    llama_cpp_vocab = realdata("gguf", "ggml-vocab-llama-spm.gguf")
    m = modelgen.random_model(modelgen.llama_config(vocab_size=len(spm.tokens), dim=32, n_heads=2, n_kv_heads=2,
                                                    hidden_dim=64, n_layers=1, tie_embeddings=True))
    m.tokenizer = spm
    # Both files through our parser (checked against GGUFReader in the slow tests above).
    ours = gguf_io.read(write(m, tmp_path)).tokenizer
    theirs = gguf_io.read(llama_cpp_vocab).tokenizer
    assert ours.model == theirs.model == "llama"
    assert ours.tokens == theirs.tokens
    assert ours.scores == theirs.scores
    assert ours.token_types == theirs.token_types
    assert (ours.bos_id, ours.eos_id, ours.unk_id) == (theirs.bos_id, theirs.eos_id, theirs.unk_id)


def test_gpt2_vocab_and_merges_survive(realdata, tmp_path):
    vocab = gguf_io.read(realdata("gguf", "ggml-vocab-gpt-2.gguf")).tokenizer
    m = modelgen.random_model(modelgen.gpt2_config(vocab_size=len(vocab.tokens), dim=32, hidden_dim=64, n_layers=1))
    m.tokenizer = vocab
    back = gguf_io.read(write(m, tmp_path)).tokenizer
    assert back.model == "gpt2"
    assert back.tokens == vocab.tokens and back.merges == vocab.merges
    assert back.token_types == vocab.token_types and back.eos_id == vocab.eos_id == 50256
    assert gguf_io.read(os.path.join(tmp_path, "m.gguf")).metadata["tokenizer.ggml.pre"] == "gpt-2"


def test_vocab_only_files_read_for_inspect_refused_for_conversion(realdata, tmp_path):
    from click.testing import CliRunner

    from wconv.cli import main as cli

    path = realdata("gguf", "ggml-vocab-llama-spm.gguf")
    m = gguf_io.read(path)
    assert m.tensors == {} and m.metadata["vocab_only"] is True
    assert m.config.arch == "llama" and len(m.tokenizer.tokens) == 32000
    with pytest.raises(UnsupportedError, match="no tensors"):
        gguf_io.write(m, os.path.join(tmp_path, "x.gguf"))
    for ext in (".gguf", ".safetensors", ".bin", ".ggjt"):
        out = os.path.join(tmp_path, "y" + ext)
        result = CliRunner().invoke(cli, ["convert", path, out])
        assert result.exit_code == 2 and "no tensors" in result.output, ext
        assert not os.path.exists(out)


# ----------------------------------------------------------------------------- writer refusals
def test_writer_refuses_incomplete_or_inconsistent_models(tmp_path):
    out = os.path.join(tmp_path, "x.gguf")
    m = modelgen.random_model(modelgen.llama_config())
    del m.tensors["blk.1.ffn_up.weight"]
    with pytest.raises(UsageError, match="lacks 1 tensor"):
        gguf_io.write(m, out)
    m = modelgen.random_model(modelgen.llama_config())
    m.config.n_kv_heads = 4
    with pytest.raises(UsageError, match="attn_k.weight has shape"):
        gguf_io.write(m, out)
    m = modelgen.random_model(modelgen.llama_config())
    m.add(LazyTensor.from_array("rope_freqs.weight", np.ones(8, np.float32)))
    with pytest.raises(UnsupportedError, match="rope_freqs"):
        gguf_io.write(m, out)
    m = modelgen.random_model(modelgen.llama_config(max_seq_len=0))
    with pytest.raises(UsageError, match="--max-seq-len"):
        gguf_io.write(m, out)
    m = modelgen.random_model(modelgen.llama_config())
    m.add(LazyTensor.from_array("blk.0.ffn_up.weight", np.zeros((160, 64), np.int32)))
    with pytest.raises(UsageError, match="not a weight type"):
        gguf_io.write(m, out)
    m = modelgen.random_model(modelgen.gpt2_config())
    with pytest.raises(UsageError, match="position_embd"):
        gguf_io.write(m, out, max_seq_len=64)
    m.config.arch = "unknown"
    with pytest.raises(UnsupportedError, match="architecture"):
        gguf_io.write(m, out)


def test_context_length_override(tmp_path):
    m = modelgen.random_model(modelgen.llama_config())
    kv = kv_of(GGUFReader(write(m, tmp_path, max_seq_len=4096)))
    assert kv["llama.context_length"] == 4096


def test_tokenizer_sizes(tmp_path):
    m = modelgen.random_model(modelgen.llama_config())
    toks = [b"<unk>", b"<s>", b"</s>"] + [f"t{i}".encode() for i in range(3, 90)]
    m.tokenizer = Tokenizer(model="llama", tokens=toks, scores=[0.0] * 90, token_types=[2, 3, 3] + [1] * 87,
                            bos_id=1, eos_id=2, unk_id=0)
    notes = gguf_io.write(m, os.path.join(tmp_path, "p.gguf"), quiet=True)
    assert any("padded" in n for n in notes)
    back = gguf_io.read(os.path.join(tmp_path, "p.gguf")).tokenizer
    assert back.tokens[:90] == toks and back.tokens[90:] == [f"[PAD{i}]".encode() for i in range(90, 96)]
    assert back.token_types[90:] == [5] * 6 and (back.bos_id, back.eos_id, back.unk_id) == (1, 2, 0)
    m.tokenizer.tokens = toks + [f"x{i}".encode() for i in range(10)]
    m.tokenizer.scores = m.tokenizer.token_types = None
    with pytest.raises(UsageError, match="100 tokens but the model's vocabulary is 96"):
        gguf_io.write(m, os.path.join(tmp_path, "q.gguf"))


# ----------------------------------------------------------------------------- malformed input
def _small_file(tmp_path) -> bytes:
    m = modelgen.random_model(modelgen.llama_config(n_layers=1, dim=32, n_heads=2, n_kv_heads=1, hidden_dim=64,
                                                    vocab_size=40))
    m.tokenizer = Tokenizer(model="llama", tokens=[f"t{i}".encode() for i in range(40)], scores=[0.5] * 40,
                            token_types=[1] * 40)
    with open(write(m, tmp_path, "small.gguf"), "rb") as f:
        return f.read()


def _put(tmp_path, data: bytes, name="bad.gguf") -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_every_truncation_is_a_format_error(tmp_path):
    data = _small_file(tmp_path)
    meta = gguf_io.read(_put(tmp_path, data, "ok.gguf")).metadata  # the intact file parses
    assert meta["GGUF.tensor_count"] == 12
    header_end = min(t.storage_key[1] for t in gguf_io.read(_put(tmp_path, data, "ok.gguf")).tensors.values())
    # every cut in the first 256 bytes, every third through the rest of the header, then a sample of the data
    cuts = list(range(0, 256)) + list(range(256, header_end + 1, 3)) + list(range(header_end + 1, len(data) - 1, 97))
    for cut in cuts:
        with pytest.raises(FormatError):
            gguf_io.read(_put(tmp_path, data[:cut]))


def _header(kv: bytes = b"", n_kv=0, tensors: bytes = b"", n_tensors=0, version=3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kv + tensors


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


@pytest.mark.parametrize("data,error,match", [
    (b"GGUX" + bytes(20), FormatError, "magic"),
    (_header(version=1), UnsupportedError, "version 1"),
    (_header(version=4), UnsupportedError, "unknown GGUF version 4"),
    (_header(n_kv=1 << 60), FormatError, "metadata entries"),
    (_header(n_tensors=1 << 60), FormatError, "tensors, more than"),
    (_header(_s("a") + struct.pack("<IIQ", 9, 4, 1 << 61), 1), FormatError, "declares"),
    (_header(_s("a") + struct.pack("<IIQ", 9, 8, 1 << 61), 1), FormatError, "declares"),
    (_header(_s("a") + struct.pack("<IQ", 8, 1 << 62), 1), FormatError, "truncated"),
    (_header(struct.pack("<Q", 1 << 62) + bytes(16), 1), FormatError, "truncated"),
    (_header(_s("a") + struct.pack("<I", 13) + bytes(8), 1), FormatError, "unknown GGUF value type"),
    (_header(_s("a") + struct.pack("<IIQ", 9, 9, 1) + bytes(8), 1), FormatError, "array of arrays"),
    (_header(_s("a") + struct.pack("<IB", 0, 1) + _s("a") + struct.pack("<IB", 0, 2), 2), FormatError,
     "duplicate metadata key"),
    (_header(_s("general.alignment") + struct.pack("<II", 4, 24), 1), FormatError, "power of two"),
    (_header(tensors=_s("t") + struct.pack("<I", 5) + bytes(64), n_tensors=1), FormatError, "dimensions"),
    (_header(tensors=_s("t") + struct.pack("<IQIQ", 1, 4, 99, 0) + bytes(32), n_tensors=1), FormatError,
     "unknown GGML type"),
    (_header(tensors=_s("t") + struct.pack("<IQIQ", 1, 4, 0, 3) + bytes(32), n_tensors=1), FormatError,
     "not aligned"),
    (_header(tensors=_s("t") + struct.pack("<IQIQ", 1, 40, 8, 0) + bytes(64), n_tensors=1), FormatError,
     "block size"),
    (_header(tensors=_s("t") + struct.pack("<IQIQ", 1, 1 << 40, 0, 0) + bytes(16), n_tensors=1), FormatError,
     "truncated"),
    (_header(tensors=_s("t") + struct.pack("<IQQQQIQ", 4, 1 << 20, 1 << 20, 1 << 20, 1 << 20, 0, 0),
             n_tensors=1), FormatError, "impossible shape"),
    (_header(tensors=(_s("t") + struct.pack("<IQIQ", 1, 4, 0, 0)) * 2 + bytes(64), n_tensors=2), FormatError,
     "duplicate tensor"),
])
def test_malformed_headers(tmp_path, data, error, match):
    with pytest.raises(error, match=match) as info:
        gguf_io.read(_put(tmp_path, data))
    assert str(info.value).startswith(os.path.join(tmp_path, "bad.gguf"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 1999), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_headers_only_raise_wconv_errors(tmp_path, flips):
    data = bytearray(_small_file_cached(tmp_path))
    for pos, val in flips:
        data[pos] = val
    try:
        m = gguf_io.read(_put(tmp_path, bytes(data), "fuzz.gguf"))
    except WconvError:
        return
    for t in m.tensors.values():  # whatever parses must also load
        t.raw()


_CACHE = {}


def _small_file_cached(tmp_path):
    if "small" not in _CACHE:
        _CACHE["small"] = _small_file(tmp_path)
    return _CACHE["small"]


def test_value_types_round_trip_through_our_parser(tmp_path):
    path = os.path.join(tmp_path, "kv.gguf")
    w = GGUFWriter(path, "llama")
    for vt, v in [(GGUFValueType.UINT8, 200), (GGUFValueType.INT8, -5), (GGUFValueType.UINT16, 60000),
                  (GGUFValueType.INT16, -300), (GGUFValueType.UINT32, 4_000_000_000), (GGUFValueType.INT32, -7),
                  (GGUFValueType.FLOAT32, 0.25), (GGUFValueType.BOOL, True), (GGUFValueType.UINT64, 1 << 60),
                  (GGUFValueType.INT64, -(1 << 60)), (GGUFValueType.FLOAT64, 1 / 3)]:
        w.add_key_value(f"t.{vt.name}", v, vt)
    w.add_array("t.strings", ["a", "bé", ""])
    w.add_key_value("t.bools", [True, False], GGUFValueType.ARRAY, sub_type=GGUFValueType.BOOL)
    w.add_key_value("t.long", list(range(100)), GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    md = gguf_io.read(path).metadata
    assert md["t.UINT8"] == 200 and md["t.INT8"] == -5 and md["t.UINT16"] == 60000 and md["t.INT16"] == -300
    assert md["t.UINT32"] == 4_000_000_000 and md["t.INT32"] == -7 and md["t.FLOAT32"] == 0.25
    assert md["t.BOOL"] is True and md["t.UINT64"] == 1 << 60 and md["t.INT64"] == -(1 << 60)
    assert md["t.FLOAT64"] == 1 / 3
    assert md["t.strings"] == ["a", "bé", ""] and md["t.bools"] == [True, False]
    assert md["t.long"] == {"array_length": 100, "element_type": "UINT16", "first": list(range(8))}
    assert md["vocab_only"] is True and gguf_io.read(path).tensors == {}


# ----------------------------------------------------------------------------- memory
def _generated_model(cfg):
    """A model whose tensors are generated when loaded and not kept anywhere."""
    from wconv.model import Model

    m = Model(config=cfg, source_format="memory")
    fam = arch.require(cfg.arch)
    for i, (name, shape) in enumerate(fam.shapes(cfg).items()):

        def load(shape=shape, seed=i):
            return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) / 16
        m.add(LazyTensor(name, dtypes.F32, shape, load))
    return m


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_peak_memory_is_about_one_tensor(tmp_path, dtype):
    import tracemalloc

    cfg = modelgen.llama_config(dim=512, hidden_dim=1408, n_heads=8, n_kv_heads=4, vocab_size=2048, n_layers=6)
    m = _generated_model(cfg)
    total = sum(t.nbytes for t in m)
    largest = max(t.nbytes for t in m)
    tracemalloc.start()
    try:
        gguf_io.write(m, os.path.join(tmp_path, "big.gguf"), quiet=True, dtype=dtype)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"{dtype}: model {total / 2**20:.0f} MiB f32, largest tensor {largest / 2**20:.1f} MiB, "
          f"peak while writing {peak / 2**20:.1f} MiB")
    assert peak < 3 * largest + (1 << 20)
    assert peak < total / 5


def test_reads_gguf_v2_and_shows_float32_metadata_as_written(tmp_path):
    m = modelgen.random_model(modelgen.llama_config())
    m.tokenizer = Tokenizer(model="llama", tokens=[f"t{i}".encode() for i in range(96)],
                            scores=[0.1 * i for i in range(96)], token_types=[1] * 96)
    data = bytearray(open(write(m, tmp_path), "rb").read())
    data[4:8] = struct.pack("<I", 2)  # v2 differs from v3 only in allowing big-endian files
    v2 = gguf_io.read(_put(tmp_path, bytes(data), "v2.gguf"))
    assert v2.metadata["GGUF.version"] == 2 and v2.source_format == "gguf-v2"
    assert GGUFReader(os.path.join(tmp_path, "v2.gguf")).fields["GGUF.version"].contents() == 2
    assert v2.metadata["llama.attention.layer_norm_rms_epsilon"] == 1e-05
    assert v2.metadata["tokenizer.ggml.scores"]["first"][:3] == [0.0, 0.1, 0.2]
    assert v2.tokenizer.scores == pytest.approx([0.1 * i for i in range(96)])
    for name, t in m.tensors.items():
        np.testing.assert_array_equal(v2[name].float32(), t.float32())


def test_neighbouring_tokenizer_of_another_model_is_not_attached(realdata, tmp_path):
    from wconv.convert.load import load_model

    # stories260K.bin (vocab 512) sits beside Llama 2's 32000-token tokenizer.model.
    src = realdata("llama2c", "stories260K.bin")
    assert os.path.exists(os.path.join(os.path.dirname(src), "tokenizer.model"))
    assert load_model(src).tokenizer is None
    out = os.path.join(tmp_path, "s.gguf")
    save(load_model(src), out, quiet=True)
    assert gguf_io.read(out).metadata["tokenizer.ggml.model"] == "no_vocab"


# --- hyperparameters that make no sense ---------------------------------------------------------

@pytest.mark.parametrize("value", [0, -5])
def test_gguf_max_seq_len_must_be_positive(tmp_path, value):
    out = tmp_path / "o.gguf"
    with pytest.raises(UsageError, match="max.seq.len must be (positive|at least 1)"):
        convert(fixture_path("meta-tiny"), out, max_seq_len=value, quiet=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2.5])
def test_gguf_non_integral_hyperparameter_is_a_format_error(tmp_path, value):
    import gguf
    import numpy as np

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_float32("llama.attention.head_count", value)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FormatError, match="llama.attention.head_count"):
        wconv.load(path)


# --- the vocabulary written equals llama.cpp's own conversion of the same tokenizer ------------------
# (read back with gguf-py's GGUFReader, against llama.cpp's ggml-vocab-llama-spm.gguf, for both vocab
# sources a user may have: the sentencepiece tokenizer.model and llama2.c's tokenizer.bin made from it)

VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
VOCAB_IDS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id")


def gguf_vocab(path):
    import gguf

    r = gguf.GGUFReader(path)

    def arr(key):
        f = r.fields[key]
        return [bytes(f.parts[i]) if key.endswith("tokens") else float(f.parts[i][0]) for i in f.data]

    out = {k: arr(k) for k in VOCAB_KEYS}
    out.update({k: int(r.fields[k].parts[r.fields[k].data[0]][0]) for k in VOCAB_IDS})
    out["tokenizer.ggml.model"] = bytes(r.fields["tokenizer.ggml.model"].parts[-1]).decode()
    return out


@pytest.fixture(scope="module")
def llama_cpp_vocab():
    return gguf_vocab(realdata_path("gguf", "ggml-vocab-llama-spm.gguf"))


@pytest.mark.parametrize("source", ["tokenizer.model", "tokenizer.bin"])
def test_gguf_vocab_equals_llama_cpp_conversion(tmp_path, source, llama_cpp_vocab):
    tok = realdata_path("llama2c", source)
    # A small model with the Llama 2 vocabulary size, on disk, converted by the CLI with --tokenizer.
    m = modelgen.random_model(modelgen.llama_config(vocab_size=32000, dim=32, n_heads=4, n_kv_heads=4,
                                                    hidden_dim=64, n_layers=1), seed=3)
    src = tmp_path / "m.safetensors"
    safetensors_io.write(m, str(src), quiet=True)
    out = tmp_path / "m.gguf"
    proc = subprocess.run([sys.executable, "-m", "wconv.cli", "convert", str(src), str(out), "--tokenizer", tok,
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ours = gguf_vocab(str(out))
    assert ours["tokenizer.ggml.model"] == llama_cpp_vocab["tokenizer.ggml.model"] == "llama"
    for key in VOCAB_KEYS + VOCAB_IDS:
        assert ours[key] == llama_cpp_vocab[key], key
    assert np.array_equal(np.array(ours["tokenizer.ggml.scores"]),
                          np.array(llama_cpp_vocab["tokenizer.ggml.scores"]))


def test_typed_arrays_pack_as_gguf_py_packs_them(tmp_path):
    """The vocabulary's arrays are packed in whole-array operations (gguf_io._writer_class);
    the metadata section is byte for byte what gguf-py's own per-element packing writes."""
    import gguf

    rng = np.random.default_rng(3)
    tokens = [bytes(rng.integers(1, 256, rng.integers(0, 9)).astype(np.uint8)) for _ in range(3000)]
    tokens += ["▁héllo".encode(), "<s>".encode(), b""]
    scores = [float(x) for x in rng.standard_normal(len(tokens)).astype(np.float32)]
    types = [int(x) for x in rng.integers(1, 7, len(tokens))]
    merges = ["a b", "▁ t", "é ç"]
    outs = []
    for endian in (gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG):
        for cls in (gguf.GGUFWriter, gguf_io._writer_class()):
            path = tmp_path / f"{cls.__name__}-{endian.name}.gguf"
            w = cls(None, "llama", endianess=endian)
            if cls is gguf.GGUFWriter:
                w.add_token_list(tokens), w.add_token_scores(scores), w.add_token_types(types)
                w.add_token_merges(merges)
            else:
                for key, kind, val in ((gguf.Keys.Tokenizer.LIST, "STRING", tokens),
                                       (gguf.Keys.Tokenizer.SCORES, "FLOAT32", scores),
                                       (gguf.Keys.Tokenizer.TOKEN_TYPE, "INT32", types),
                                       (gguf.Keys.Tokenizer.MERGES, "STRING", merges)):
                    w.add_typed_array(key, kind, val)
            w.add_uint32("llama.context_length", 4096)
            w.write_header_to_file(path)
            w.write_kv_data_to_file()
            w.close()
            outs.append(path.read_bytes())
    assert outs[0] == outs[1] and outs[2] == outs[3]
    assert outs[0] != outs[2]
