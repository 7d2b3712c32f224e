"""wconv.formats.safetensors_io against the `safetensors` library, torch and transformers."""
from __future__ import annotations

import json
import mmap
import struct

import numpy as np
import pytest

import modelgen
import wconv
from conftest import fixture_path, realdata_path
from wconv import dtypes
from wconv.convert.load import load_model, sniff
from wconv.convert.save import convert
from wconv.convert.sources import load_safetensors_file
from wconv.errors import FormatError, UnsupportedError, UsageError
from wconv.formats import safetensors_io
from wconv.tensor import LazyTensor


def _raw_file(path, header: dict, data: bytes = b"", *, length=None):
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob) if length is None else length))
        f.write(blob)
        f.write(data)
    return path


# --- reading ---------------------------------------------------------------------------------

def test_reads_real_hf_gpt2_file_like_safetensors_lib():
    from safetensors import safe_open

    path = realdata_path("safetensors", "lm-buddy_fake_gpt2", "model.safetensors")
    tensors, meta = safetensors_io.read(path)
    assert meta == {"format": "pt"}
    with safe_open(path, framework="numpy") as f:
        assert set(f.keys()) == set(tensors)
        for name in f.keys():
            ours = tensors[name].raw()
            theirs = f.get_tensor(name)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            np.testing.assert_array_equal(ours, theirs)
    # file order is data order: the last tensor in the data region is the big embedding
    assert list(tensors)[-1] == "transformer.wte.weight"


def test_reads_tinygrad_file_without_metadata():
    path = realdata_path("safetensors", "tinygrad_mnist_mlp.safetensors")
    tensors, meta = safetensors_io.read(path)
    assert meta == {}
    assert [(n, t.dtype.name, t.shape) for n, t in tensors.items()] == [
        ("l1.weight", "F32", (128, 784)), ("l2.weight", "F32", (10, 128))]


def test_bf16_fixture_matches_torch():
    import torch
    from safetensors.torch import load_file

    path = fixture_path("hf-llama-tiny", "model.safetensors")
    tensors, _ = safetensors_io.read(path)
    theirs = load_file(path)
    assert set(theirs) == set(tensors)
    for name, t in theirs.items():
        assert tensors[name].dtype is dtypes.BF16
        np.testing.assert_array_equal(tensors[name].raw(), t.view(torch.int16).numpy().view(np.uint16))
        np.testing.assert_array_equal(tensors[name].float32(), t.float().numpy())


def test_tensors_are_lazy_zero_copy_mmap_views(monkeypatch):
    path = fixture_path("hf-llama-tiny", "model.safetensors")
    opened = []
    real_mmap = mmap.mmap

    def counting_mmap(*a, **k):
        opened.append(a)
        return real_mmap(*a, **k)

    monkeypatch.setattr(mmap, "mmap", counting_mmap)  # every map wconv makes (wconv.mapped)
    tensors, _ = safetensors_io.read(path)
    assert opened == []  # opening reads the header only
    for i, t in enumerate(tensors.values()):
        a = t.raw()
        assert len(opened) == i + 1  # one map per tensor, made on request
        assert not a.flags.owndata and not a.flags.writeable
        base = a
        while isinstance(base, (np.ndarray, memoryview)):
            base = base.base if isinstance(base, np.ndarray) else base.obj
        assert isinstance(base, real_mmap)  # the data lives in the mapped file


def test_file_replaced_after_opening(tmp_path):
    import shutil

    path = tmp_path / "m.safetensors"
    shutil.copy(fixture_path("hf-llama-tiny", "model.safetensors"), path)
    tensors, _ = safetensors_io.read(path)
    with open(path, "ab") as f:
        f.write(b"x")
    with pytest.raises(FormatError, match="changed size"):
        next(iter(tensors.values())).raw()


# --- malformed files -------------------------------------------------------------------------

GOOD_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header,data,length,match", [
    ({"a": GOOD_ENTRY}, b"\0" * 8, 10 ** 9, "exceeds"),
    ({"a": GOOD_ENTRY}, b"\0" * 8, 5000, "past the end"),
    ({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "outside"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "outside"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "non-negative"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "needs dtype"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
    ({"__metadata__": {"format": 1}, "a": GOOD_ENTRY}, b"\0" * 8, None, "__metadata__"),
    ([1, 2], b"", None, "not a JSON object"),
])
def test_malformed_headers_raise_format_error(tmp_path, header, data, length, match):
    path = _raw_file(tmp_path / "bad.safetensors", header, data, length=length)
    with pytest.raises(FormatError, match=match) as e:
        safetensors_io.read(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_truncated_and_garbage_files(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x10\0\0")
    with pytest.raises(FormatError, match="too short"):
        safetensors_io.read(short)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"{\xff\xfe}")
    with pytest.raises(FormatError, match="not valid JSON"):
        safetensors_io.read(garbage)


def test_valid_but_unsupported_dtype(tmp_path):
    path = _raw_file(tmp_path / "f4.safetensors", {"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}},
                     b"\0")
    with pytest.raises(UnsupportedError, match="F4"):
        safetensors_io.read(path)


# --- writing ---------------------------------------------------------------------------------

def _write(model, path, **kw):
    safetensors_io.write(model, str(path), quiet=True, **kw)
    return str(path)


def test_canonical_round_trip_checked_by_safetensors_lib(tmp_path):
    from safetensors import safe_open

    model = modelgen.random_model(modelgen.llama_config(), seed=1)
    path = _write(model, tmp_path / "m.safetensors")
    with safe_open(path, framework="numpy") as f:
        assert list(f.keys()) == sorted(model.tensors)
        meta = f.metadata()
        for name, t in model.tensors.items():
            np.testing.assert_array_equal(f.get_tensor(name), t.raw())
    assert meta["format"] == "pt"
    assert json.loads(meta["wconv.n_kv_heads"]) == 2
    back = load_safetensors_file(path)
    assert back.config == model.config and back.source_layout == "canonical"
    assert list(back.tensors) == list(model.tensors)
    for name, t in model.tensors.items():
        np.testing.assert_array_equal(back[name].raw(), t.raw())


@pytest.mark.parametrize("dtype,torch_dtype", [("f16", "float16"), ("bf16", "bfloat16"), ("f32", "float32")])
def test_dtype_conversion_matches_torch(tmp_path, dtype, torch_dtype):
    import torch
    from safetensors.torch import load_file

    model = modelgen.random_model(modelgen.gpt2_config(), seed=2)
    path = _write(model, tmp_path / f"m-{dtype}.safetensors", dtype=dtype)
    theirs = load_file(path)
    for name, t in model.tensors.items():
        expect = torch.from_numpy(t.float32()).to(getattr(torch, torch_dtype))
        assert theirs[name].dtype == expect.dtype
        assert torch.equal(theirs[name], expect), name


def test_bf16_source_written_unchanged_and_widened(tmp_path):
    from safetensors import safe_open

    src = load_model(fixture_path("hf-llama-tiny"))
    path = _write(src, tmp_path / "same.safetensors")
    with safe_open(path, framework="pt") as f:
        for name, t in src.tensors.items():
            assert str(f.get_slice(name).get_dtype()) == "BF16"
            np.testing.assert_array_equal(f.get_tensor(name).float().numpy(), t.float32())
    wide = _write(src, tmp_path / "wide.safetensors", dtype="f32")
    with safe_open(wide, framework="numpy") as f:
        for name, t in src.tensors.items():
            np.testing.assert_array_equal(f.get_tensor(name), t.float32())


def test_writer_streams_each_tensor_once_in_order(tmp_path):
    model = modelgen.random_model(modelgen.llama_config(n_layers=1), seed=3)
    calls = []
    for name, t in list(model.tensors.items()):
        arr = t.raw()
        model.tensors[name] = LazyTensor(name, t.dtype, t.shape, lambda n=name, a=arr: calls.append(n) or a)
    _write(model, tmp_path / "s.safetensors")
    assert calls == list(model.tensors)


def test_writer_rejects_quantised_dtype_and_bad_names(tmp_path):
    model = modelgen.random_model(modelgen.llama_config(n_layers=1), seed=3)
    with pytest.raises(UsageError, match="f32, f16 or bf16"):
        _write(model, tmp_path / "q.safetensors", dtype="q8_0")
    with pytest.raises(UsageError, match="names"):
        _write(model, tmp_path / "q.safetensors", names="gguf")


def test_quantised_tensor_is_stored_dequantised(tmp_path):
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    from safetensors import safe_open

    model = modelgen.random_model(modelgen.llama_config(n_layers=1), seed=4)
    w = model["blk.0.attn_q.weight"].float32()
    q = quantize(w, GGMLQuantizationType.Q8_0)
    model.tensors["blk.0.attn_q.weight"] = LazyTensor("blk.0.attn_q.weight", dtypes.Q8_0, w.shape, lambda: q)
    path = _write(model, tmp_path / "deq.safetensors")
    with safe_open(path, framework="numpy") as f:
        got = f.get_tensor("blk.0.attn_q.weight")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, model["blk.0.attn_q.weight"].float32())
    assert 0 < np.abs(got - w).max() < 0.05  # really the Q8_0 values, not the originals


@pytest.mark.parametrize("cfg", [modelgen.llama_config(), modelgen.llama_config(tie_embeddings=True, n_kv_heads=1),
                                 modelgen.gpt2_config(), modelgen.gpt2_config(tie_embeddings=False)],
                         ids=["llama-gqa", "llama-tied-mqa", "gpt2-tied", "gpt2-untied"])
def test_hf_names_round_trip(tmp_path, cfg):
    model = modelgen.random_model(cfg, seed=5)
    d = tmp_path / "hf"
    d.mkdir()
    _write(model, d / "model.safetensors", names="hf")
    (d / "config.json").write_text(json.dumps(safetensors_io.hf_config(model)))
    back = load_model(str(d))
    assert back.source_layout == ("hf-llama" if cfg.arch == "llama" else "hf-gpt2")
    assert back.config == model.config
    assert list(back.tensors) == list(model.tensors)
    for name, t in model.tensors.items():
        np.testing.assert_array_equal(back[name].raw(), t.raw(), err_msg=name)


def _transformers_logits(directory, arch, tokens):
    transformers = pytest.importorskip("transformers")
    import torch

    cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.GPT2LMHeadModel
    hf = cls.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.parametrize("cfg", [modelgen.llama_config(), modelgen.gpt2_config()], ids=["llama-gqa", "gpt2"])
def test_hf_output_loads_in_transformers_with_same_logits(tmp_path, cfg):
    pytest.importorskip("transformers")
    from wconv import reference

    model = modelgen.random_model(cfg, seed=6)
    _write(model, tmp_path / "model.safetensors", names="hf")
    (tmp_path / "config.json").write_text(json.dumps(safetensors_io.hf_config(model)))
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, cfg.vocab_size, 12)]
    theirs = _transformers_logits(tmp_path, cfg.arch, tokens)
    ours = reference.forward(model, tokens)
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(theirs).max() > 0.1


def test_canonical_names_without_or_with_bad_wconv_metadata(tmp_path):
    from safetensors.numpy import save_file

    model = modelgen.random_model(modelgen.llama_config(), seed=7)
    arrays = {n: np.ascontiguousarray(t.raw()) for n, t in model.tensors.items()}
    plain = str(tmp_path / "plain.safetensors")
    save_file(arrays, plain)  # another tool's file with GGUF-style names: no hyperparameters
    with pytest.raises(UnsupportedError, match="n_heads cannot be inferred"):
        load_safetensors_file(plain)
    loose = load_safetensors_file(plain, strict=False)
    assert loose.source_layout == "canonical" and loose.config.dim == 64 and loose.config.n_heads == 0
    odd = str(tmp_path / "odd.safetensors")
    save_file(arrays, odd, metadata={"wconv.arch": '"mamba"'})
    with pytest.raises(UnsupportedError, match="mamba"):
        load_safetensors_file(odd)


# --- wconv's own metadata, wrongly typed ------------------------------------------------------

def test_wrongly_typed_wconv_metadata_is_a_format_error(tmp_path):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    good = tmp_path / "good.safetensors"
    convert(fixture_path("meta-tiny"), good, dtype="f32", quiet=True)
    with safe_open(str(good), "np") as f:
        metadata = f.metadata()
    assert json.loads(metadata["wconv.dim"]) == 64
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(good)), str(bad), metadata={**metadata, "wconv.dim": '"64"'})
    with pytest.raises(FormatError, match="wconv.dim"):
        wconv.load(bad)


# --- recognised whatever the low byte of the header length (it also starts pickles: 0x80, '(', '}', ']', 'c')

@pytest.mark.parametrize("first_byte", [0x80, ord("("), ord("}"), ord("]"), ord("c"), ord("{")])
def test_header_length_that_looks_like_a_pickle_opcode(tmp_path, first_byte):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * ((first_byte - len(header)) % 256)  # JSON may end in spaces
    assert len(header) & 0xFF == first_byte
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + np.array([1.5, -2], "<f4").tobytes())
    assert sniff(str(path)) == "safetensors"
    tensors, _ = safetensors_io.read(path)
    np.testing.assert_array_equal(tensors["a"].raw(), [1.5, -2])


def test_truncated_safetensors_still_goes_to_the_safetensors_reader(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) + 1000) + header)
    assert sniff(str(path)) == "safetensors"
