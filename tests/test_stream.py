"""wconv.stream: the data sections every writer streams.

- the output is byte-identical whatever the thread count and piece size (pieces of
  whole rows, pieces inside a row, many pieces per tensor);
- same-type tensors whose bytes are one range of the input go by kernel copy, and that
  gives the same file as copying them through memory or re-encoding them from float32;
- which readers report a file span, and which transforms drop it;
- writeback to disk is started as the output grows, without changing a byte.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil

import numpy as np
import pytest

import modelgen
from conftest import fixture_path
from wconv import dtypes, mapped, stream
from wconv.convert.load import load_model
from wconv.convert.save import convert, save
from wconv.errors import FormatError
from wconv.formats import gguf_io, safetensors_io
from wconv.tensor import LazyTensor


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory):
    """A small llama model as a bf16 safetensors file (with the config wconv records)."""
    d = tmp_path_factory.mktemp("src")
    m = modelgen.random_model(modelgen.llama_config(dim=128, hidden_dim=352, vocab_size=160, n_heads=4,
                                                    n_kv_heads=2), seed=7)
    path = os.path.join(d, "m.safetensors")
    safetensors_io.write(m, path, quiet=True, dtype="bf16")
    return path


# output name, --to, options
OUTPUTS = [
    ("f16.gguf", None, {"dtype": "f16"}),
    ("q8_0.gguf", None, {"dtype": "q8_0"}),
    ("q5_1.gguf", None, {"dtype": "q5_1"}),
    ("q4_1.ggjt", None, {"dtype": "q4_1"}),
    ("v0.bin", None, {"version": 0}),
    ("f16.safetensors", None, {"dtype": "f16"}),
    ("hf", "hf", {"dtype": "f32", "max_shard_size": "200KB"}),
]


def _convert(src, out, to, options, threads):
    with contextlib.redirect_stderr(io.StringIO()):
        convert(src, out, to=to, quiet=True, threads=threads, **options)


def _bytes(path) -> dict:
    if os.path.isdir(path):
        return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}
    return {"": open(path, "rb").read()}


@pytest.mark.parametrize("name, to, options", OUTPUTS)
def test_output_is_identical_for_any_thread_count_and_piece_size(bf16_source, tmp_path, monkeypatch,
                                                                  name, to, options):
    _convert(bf16_source, tmp_path / f"1-{name}", to, options, threads=1)
    want = _bytes(tmp_path / f"1-{name}")
    # 100 values a piece: several rows per piece for short rows, pieces inside 128/352-value rows
    monkeypatch.setattr(stream, "PIECE_ELEMENTS", 100)
    for threads in (2, 3):
        _convert(bf16_source, tmp_path / f"{threads}-{name}", to, options, threads=threads)
        assert _bytes(tmp_path / f"{threads}-{name}") == want, threads
    monkeypatch.setattr(stream, "PIECE_ELEMENTS", 4096)
    _convert(bf16_source, tmp_path / f"big-{name}", to, options, threads=2)
    assert _bytes(tmp_path / f"big-{name}") == want


def _without_span(t: LazyTensor) -> LazyTensor:
    return LazyTensor(t.name, t.dtype, t.shape, t.loader, t.source, t.storage_key)


def test_kernel_copy_equals_memory_copy_and_reencoding(bf16_source, tmp_path, monkeypatch):
    src = tmp_path / "in.gguf"
    _convert(bf16_source, src, None, {"dtype": "bf16"}, threads=1)
    copies = []
    real_copy = mapped.copy_range

    def counting(*args, **kw):
        copies.append(args[2])
        return real_copy(*args, **kw)

    monkeypatch.setattr(stream, "copy_range", counting)
    model = load_model(str(src))
    matrices = [n for n, t in model.tensors.items() if len(t.shape) == 2]
    save(model, tmp_path / "copied.gguf", quiet=True)
    assert len(copies) == len(model.tensors)  # every tensor (bf16 matrices, f32 norms) kernel-copied
    copies.clear()

    model = load_model(str(src))
    model.tensors = {n: _without_span(t) for n, t in model.tensors.items()}
    save(model, tmp_path / "memory.gguf", quiet=True)
    assert copies == []

    model = load_model(str(src))  # re-encoded: bf16 -> float32 -> bf16 is exact
    model.tensors = {n: t.derive(lambda a: a, dtype=dtypes.F32, float_input=True) if n in matrices else t
                     for n, t in model.tensors.items()}
    with contextlib.redirect_stderr(io.StringIO()):
        save(model, tmp_path / "encoded.gguf", quiet=True, dtype="bf16")
    copied = (tmp_path / "copied.gguf").read_bytes()
    assert copied == (tmp_path / "memory.gguf").read_bytes()
    assert copied == (tmp_path / "encoded.gguf").read_bytes()
    assert copied == src.read_bytes()  # and the same as the input: a GGUF copy is the identity


def test_results_say_what_was_done(tmp_path):
    a = np.arange(4096, dtype=np.float32).reshape(64, 64)
    path = tmp_path / "a.safetensors"
    model = modelgen.random_model(modelgen.llama_config(), seed=1)
    safetensors_io.write(model, path, quiet=True)
    tensors, _ = safetensors_io.read(path)
    t = tensors["token_embd.weight"]
    assert t.file_span() is not None
    big = LazyTensor.from_array("big", a * 1e6)
    with open(tmp_path / "out", "wb") as f:
        r = stream.write_tensors(f, [(t, t.dtype), (t, dtypes.F16), (big, dtypes.F16)], threads=2)
    assert [x.copied for x in r] == [True, False, False]
    assert [x.overflowed for x in r] == [False, False, True]
    assert [x.nbytes for x in r] == [t.nbytes, t.nbytes // 2, a.size * 2]
    data = (tmp_path / "out").read_bytes()
    assert data[:t.nbytes] == np.asarray(t.raw()).tobytes()
    assert data[t.nbytes:t.nbytes + t.nbytes // 2] == np.asarray(t.raw()).astype("<f2").tobytes()


def test_readers_report_spans_and_transforms_drop_them(bf16_source, tmp_path):
    st = load_model(bf16_source)
    assert all(t.file_span() is not None for t in st.tensors.values())
    for n, t in st.tensors.items():
        path, offset, nbytes = t.file_span()
        assert mapped.read_bytes(path, offset, nbytes) == np.ascontiguousarray(t.raw()).tobytes(), n
    g = tmp_path / "m.gguf"
    _convert(bf16_source, g, None, {}, threads=1)
    assert all(t.file_span() is not None for t in gguf_io.read(g).tensors.values())
    hf = tmp_path / "hf"
    _convert(bf16_source, hf, "hf", {}, threads=1)
    back = load_model(str(hf))  # HF q/k are permuted on the way in: computed, no span
    assert back.tensors["blk.0.attn_q.weight"].file_span() is None
    assert back.tensors["blk.0.ffn_up.weight"].file_span() is not None
    t = st.tensors["token_embd.weight"]
    assert t.renamed("x").file_span() == t.file_span()
    assert t.derive(lambda a: a).file_span() is None
    assert LazyTensor.concat("c", [t, t], 0).file_span() is None


def test_torch_zip_stored_tensors_have_spans(tmp_path):
    torch = pytest.importorskip("torch")
    sd = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}
    sd["view"] = sd["a"][1:]  # a view at an offset in a's storage
    sd["t"] = sd["a"].t()  # strided: no span
    path = tmp_path / "sd.pt"
    torch.save(sd, path)
    from wconv.formats import torch_file

    tensors = torch_file.load_pickled(str(path))
    for name in ("a", "b", "view"):
        t = tensors[name]
        path_, offset, nbytes = t.file_span()
        assert mapped.read_bytes(path_, offset, nbytes) == np.ascontiguousarray(t.raw()).tobytes(), name
    assert tensors["t"].file_span() is None


def test_writeback_is_started_in_order_and_changes_no_byte(bf16_source, tmp_path, monkeypatch):
    """Outputs are fsynced before the rename; write_tensors starts their writeback as it goes
    (every stream.WRITEBACK bytes), over consecutive ranges, without changing the file."""
    _convert(bf16_source, tmp_path / "plain.gguf", None, {"dtype": "q8_0"}, threads=2)
    ranges = []
    real = mapped.start_writeback

    def recording(f, start, end):
        ranges.append((start, end))
        return real(f, start, end)

    monkeypatch.setattr(stream, "start_writeback", recording)
    monkeypatch.setattr(stream, "WRITEBACK", 4096)
    _convert(bf16_source, tmp_path / "wb.gguf", None, {"dtype": "q8_0"}, threads=2)
    data = (tmp_path / "wb.gguf").read_bytes()
    assert data == (tmp_path / "plain.gguf").read_bytes()
    assert len(ranges) > 3
    assert all(a < b for a, b in ranges)
    assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))  # consecutive, no gaps or overlaps
    assert ranges[-1][1] > len(data) - (64 << 10)  # up to (nearly) the end of the data


def test_start_writeback_is_a_hint(tmp_path, monkeypatch):
    """Where sync_file_range is missing (other systems) it does nothing; where present, the
    file's bytes and position are unchanged."""
    p = tmp_path / "f"
    with open(p, "wb") as f:
        f.write(b"x" * 10000)
        mapped.start_writeback(f, 0, 10000)
        assert f.tell() == 10000
        monkeypatch.setattr(mapped.libc, "function", lambda name, *types: None)
        f.write(b"y" * 10)
        mapped.start_writeback(f, 10000, 10010)
    assert p.read_bytes() == b"x" * 10000 + b"y" * 10


def test_kernel_copies_start_their_own_writeback(tmp_path, monkeypatch):
    """copy_range (GGUF split, edit, mirror and same-type tensors) starts writeback of exactly
    the range it appended."""
    src = tmp_path / "src"
    src.write_bytes(bytes(range(256)) * 64)
    ranges = []
    monkeypatch.setattr(mapped, "start_writeback", lambda f, a, b: ranges.append((a, b)))
    with open(tmp_path / "dst", "wb") as f:
        f.write(b"head")
        mapped.copy_range(src, 100, 5000, f)
    assert ranges == [(4, 5004)]
    assert (tmp_path / "dst").read_bytes() == b"head" + src.read_bytes()[100:5100]


# --- computed tensors, a few rows at a time ----------------------------------------------------

@pytest.fixture(scope="module")
def computed_sources(bf16_source, tmp_path_factory):
    """Inputs whose tensors are computed on the way in: an HF directory (q/k rows un-permuted)
    and a two-shard Meta checkpoint (every matrix merged, along rows or columns)."""
    d = tmp_path_factory.mktemp("computed")
    _convert(bf16_source, d / "hf", "hf", {}, threads=1)
    return {"hf": str(d / "hf"), "meta-2shard": fixture_path("meta-tiny-2shard")}


@pytest.mark.parametrize("src", ["hf", "meta-2shard"])
@pytest.mark.parametrize("name, to, options", [
    ("bf16.gguf", None, {"dtype": "bf16"}),  # same type: rows stored as computed
    ("q8_0.gguf", None, {"dtype": "q8_0"}),
    ("v0.bin", None, {"version": 0}),
    ("hf", "hf", {}),  # HF output: the permutation applied again on top
])
def test_computed_tensors_by_rows_equal_the_whole_tensor_path(computed_sources, src, name, to, options,
                                                              tmp_path, monkeypatch):
    calls = []
    real = LazyTensor.row_blocks

    def counting(t, *args, **kw):
        blocks = real(t, *args, **kw)
        calls.append((t.name, blocks))
        return blocks

    monkeypatch.setattr(stream, "PIECE_ELEMENTS", 100)  # many pieces per tensor
    monkeypatch.setattr(LazyTensor, "row_blocks", counting)
    _convert(computed_sources[src], tmp_path / f"rows-{name}", to, options, threads=2)
    by_rows = [n for n, blocks in calls if blocks is not None and len(blocks) > 1]
    assert any("attn_q" in n for n in by_rows) and any("attn_k" in n for n in by_rows), calls
    if src == "meta-2shard":
        assert any("attn_output" in n for n in by_rows)  # merged along its columns
    monkeypatch.setattr(LazyTensor, "row_blocks", lambda t, *args, **kw: None)  # whole-tensor fallback
    _convert(computed_sources[src], tmp_path / f"whole-{name}", to, options, threads=1)
    assert _bytes(tmp_path / f"rows-{name}") == _bytes(tmp_path / f"whole-{name}")


def test_zero_row_tensors_and_sources_that_cannot_be_read_by_rows(tmp_path, monkeypatch):
    empty = LazyTensor("z", dtypes.F16, (0, 4), lambda: np.zeros((0, 4), np.float16))
    jobs = [(empty, dtypes.F16), (LazyTensor.concat("c", [empty, empty], 1), dtypes.F16),
            (empty.derive_rows(lambda a: a, 1), dtypes.F32)]
    with open(tmp_path / "z.bin", "wb") as f:
        assert [r.nbytes for r in stream.write_tensors(f, jobs)] == [0, 0, 0]
    assert list(LazyTensor.concat("c", [empty, empty], 1).float32_chunks(10)) == []

    # A computed tensor over a source with no file range (e.g. llama2.c's dequantised int8
    # groups): reading it by rows would rebuild the source for every block, so it is built once.
    loads = []
    arr = np.arange(64 * 48, dtype=np.float32).reshape(64, 48)
    src = LazyTensor("s", dtypes.F32, arr.shape, lambda: loads.append(1) or arr)
    permuted = src.derive_rows(lambda a: a[::-1].copy(), 8)
    assert not permuted.rows_piecewise()
    monkeypatch.setattr(stream, "PIECE_ELEMENTS", 100)
    with open(tmp_path / "p.bin", "wb") as f:
        stream.write_tensors(f, [(permuted, dtypes.F16), (permuted, dtypes.F32)], threads=2)
    assert len(loads) == 2  # once per job, not once per block
    want = permuted.raw()
    data = (tmp_path / "p.bin").read_bytes()
    assert data == want.astype("<f2").tobytes() + want.astype("<f4").tobytes()


@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "1000000"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}])
def test_malloc_thresholds_set_by_the_user_stand(monkeypatch, env):
    calls = []
    monkeypatch.setattr(stream.libc, "function", lambda name, *types: calls.append(name))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(stream, "_malloc_tuned", False)
    stream.keep_freed_memory()
    assert calls == []
    monkeypatch.delenv(next(iter(env)))
    monkeypatch.setattr(stream, "_malloc_tuned", False)
    stream.keep_freed_memory()  # (the stand-in finds no mallopt: taken as "not glibc")
    assert calls == ["mallopt"]


def _grown_source(kind, bf16_source, tmp_path):
    """(path to load, file whose size to change): one source per reader that gives file spans."""
    if kind == "safetensors":
        shutil.copy(bf16_source, tmp_path / "m.safetensors")
        return tmp_path / "m.safetensors", tmp_path / "m.safetensors"
    if kind == "meta":
        shutil.copytree(fixture_path("meta-tiny"), tmp_path / "meta")
        return tmp_path / "meta", tmp_path / "meta" / "consolidated.00.pth"
    out = tmp_path / {"gguf": "m.gguf", "llama2c": "m.bin", "ggjt": "m.ggjt"}[kind]
    _convert(bf16_source, str(out), None, {"gguf": {"dtype": "f32"}, "llama2c": {"version": 1},
                                           "ggjt": {"dtype": "f32"}}[kind], 1)
    return out, out


@pytest.mark.parametrize("kind", ["safetensors", "gguf", "llama2c", "ggjt", "meta"])
@pytest.mark.parametrize("dtype", [None, "q8_0"])  # None: the source's own type (kernel copies)
def test_a_source_changed_after_it_was_read_is_refused_not_copied_from(kind, dtype, bf16_source, tmp_path):
    """Writers read tensors by file range long after the headers were parsed; a source that has
    changed size since (re-downloaded, edited in place) is refused, naming it, and nothing is written."""
    src, grown = _grown_source(kind, bf16_source, tmp_path)
    model = load_model(str(src))
    with open(grown, "ab") as f:
        f.write(b"\0" * 4096)
    out = tmp_path / "out.gguf"
    with pytest.raises(FormatError, match="changed size since it was opened") as e, \
            contextlib.redirect_stderr(io.StringIO()):
        save(model, str(out), quiet=True, **({"dtype": dtype} if dtype else {}))
    assert str(grown) in str(e.value) and not out.exists()


def test_a_source_truncated_under_the_pieces_is_an_error_not_a_crash(bf16_source, tmp_path, monkeypatch):
    """Pieces are read (pread), not mapped: a source cut short while its pieces are being encoded
    gives a FormatError naming it, where a map would have killed the process with SIGBUS."""
    src = tmp_path / "m.safetensors"
    shutil.copy(bf16_source, src)
    real_read, calls = stream.read_array, []

    def read_then_truncate(path, offset, nbytes, *a, **k):
        arr = real_read(path, offset, nbytes, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            os.truncate(path, offset + 64)
        return arr
    monkeypatch.setattr(stream, "read_array", read_then_truncate)
    with pytest.raises(FormatError, match="changed size since it was opened") as e, \
            contextlib.redirect_stderr(io.StringIO()):
        convert(str(src), str(tmp_path / "out.gguf"), dtype="q8_0", quiet=True, threads=2)
    assert e.value.path == str(src) and sorted(os.listdir(tmp_path)) == ["m.safetensors"]


@pytest.mark.parametrize("tool", ["split", "edit"])
def test_gguf_split_and_edit_refuse_a_source_changed_after_it_was_parsed(tool, bf16_source, tmp_path, monkeypatch):
    from wconv import gguf_edit, gguf_split

    src = tmp_path / "m.gguf"
    _convert(bf16_source, str(src), None, {"dtype": "f16"}, 1)
    module = gguf_split if tool == "split" else gguf_edit
    real_copy = module.copy_range

    def grow_then_copy(*a, **k):
        with open(src, "ab") as f:
            f.write(b"\0" * 64)
        return real_copy(*a, **k)
    monkeypatch.setattr(module, "copy_range", grow_then_copy)
    with pytest.raises(FormatError, match="changed size since it was opened"), \
            contextlib.redirect_stderr(io.StringIO()):
        if tool == "split":
            gguf_split.split(str(src), str(tmp_path / "part"), max_tensors=4, quiet=True)
        else:
            gguf_edit.edit_gguf(str(src), str(tmp_path / "e.gguf"), set=["general.name=x"])
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]
