"""GGUF split sets (llama.cpp's gguf-split layout): split by size and by count, read back as one model,
merge to the original bytes, refuse broken sets naming the part; gguf-py's own split writer produces
the same bytes; llama.cpp loads a set from its first part with the single file's logits.

Without llama-cpp-python the llama.cpp tests skip, except under CI=true, where they fail.
"""
from __future__ import annotations

import contextlib
import filecmp
import io
import os
import shutil

import numpy as np
import pytest

import modelgen
from clirun import wconv
from wconv import gguf_split
from wconv.convert.load import load_model
from wconv.errors import FormatError, UsageError
from wconv.formats import gguf_io, gguf_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_TINY = os.path.join(ROOT, "fixtures", "hf-llama-tiny")
SPLIT_KEYS = {"split.no": "UINT16", "split.count": "UINT16", "split.tensors.count": "INT32"}


def quietly(fn, *args, **kw):
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kw)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """A q8_0 GGUF written by wconv (21 tensors)."""
    path = str(tmp_path_factory.mktemp("single") / "m.gguf")
    quietly(gguf_io.write, modelgen.random_model(modelgen.llama_config(), seed=5), path, quiet=True, dtype="q8_0")
    return path


def fields(path) -> dict:
    """{key: (type name, value)} as gguf-py's GGUFReader reads them (GGUF.* pseudo-keys left out)."""
    from gguf import GGUFReader

    return {k: (f.types[0].name, f.contents()) for k, f in GGUFReader(path).fields.items()
            if not k.startswith("GGUF.")}


def tensor_bytes(model) -> dict:
    return {n: np.asarray(t.raw()).tobytes() for n, t in model.tensors.items()}


def no_temporaries(directory):
    return [n for n in os.listdir(directory) if n.endswith(".wconv-tmp")] == []


# --- planning ----------------------------------------------------------------------------

def test_plan_by_count_and_by_padded_size():
    assert gguf_split.plan_split([10] * 7, max_tensors=3) == [[0, 1, 2], [3, 4, 5], [6]]
    # sizes count padded to 32, as gguf-split counts them: 33 -> 64
    assert gguf_split.plan_split([33, 33, 33], max_bytes=128) == [[0, 1], [2]]
    assert gguf_split.plan_split([32, 32, 32], max_bytes=96) == [[0, 1, 2]]
    # a tensor above the limit gets a part of its own (also when it comes first)
    assert gguf_split.plan_split([500, 10, 10, 500, 10], max_bytes=100) == [[0], [1, 2], [3], [4]]
    assert gguf_split.plan_split([10, 10], max_tensors=1, empty_first=True) == [[], [0], [1]]
    assert gguf_split.plan_split([], max_tensors=4) == [[]]


@pytest.mark.parametrize("text,want", [("5G", 5 * 10**9), ("500M", 500 * 10**6), ("64K", 64000), ("1000", 1000),
                                       ("2GB", 2 * 10**9)])
def test_sizes_in_llama_cpp_units(text, want):
    assert gguf_split.parse_size(text) == want


@pytest.mark.parametrize("text", ["0", "-5G", "5X", "G", "1.5G"])
def test_bad_sizes_refused(text):
    with pytest.raises(UsageError):
        gguf_split.parse_size(text)


# --- the layout ----------------------------------------------------------------------------

def test_split_by_count_names_and_keys(single, tmp_path):
    r = wconv("split", single, tmp_path / "s", "--split-max-tensors", "5")
    assert r.returncode == 0, r.stderr
    names = sorted(os.listdir(tmp_path))
    assert names == [f"s-{i:05d}-of-00005.gguf" for i in range(1, 6)]
    original = fields(single)
    for i, name in enumerate(names):
        got = fields(tmp_path / name)
        assert {k: got[k] for k in SPLIT_KEYS} == {"split.no": ("UINT16", i), "split.count": ("UINT16", 5),
                                                   "split.tensors.count": ("INT32", 21)}
        if i == 0:  # all metadata, in the input's order, then the split keys
            assert list(got) == list(original) + list(SPLIT_KEYS)
            assert all(got[k] == v for k, v in original.items())
        else:
            assert set(got) == set(SPLIT_KEYS)
    counts = [len(gguf_io.read_header(tmp_path / n)[0].tensors) for n in names]
    assert counts == [5, 5, 5, 5, 1]


def test_split_by_size_keeps_every_part_under_the_limit(single, tmp_path):
    limit = 20000
    paths = quietly(gguf_split.split, single, tmp_path / "s.gguf", max_bytes=limit)
    assert len(paths) > 2 and all(os.path.basename(p).startswith("s-0000") for p in paths)
    for p in paths:
        h, _ = gguf_io.read_header(p)
        padded = sum(-(-t.nbytes // 32) * 32 for t in h.tensors)
        assert padded <= limit or len(h.tensors) == 1


@pytest.mark.parametrize("mode", [{"split_max_tensors": 4}, {"split_max_size": 1000}])
def test_same_bytes_as_gguf_py_split_writer(tmp_path, mode):
    """gguf-py's GGUFWriter (llama.cpp's converter) writes split sets itself: ours must equal its output."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(0)
    arrays = {f"t{i}": rng.standard_normal((i % 3 + 1, 64)).astype(np.float32) for i in range(11)}

    def write(path, **split):
        w = GGUFWriter(path, "llama", **split)
        w.add_name("split test")
        w.add_uint32("llama.block_count", 1)
        w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
        for n, a in arrays.items():
            w.add_tensor(n, a)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    (tmp_path / "theirs").mkdir()
    write(str(tmp_path / "theirs" / "m.gguf"), **mode)
    write(str(tmp_path / "single.gguf"))
    ours = quietly(gguf_split.split, tmp_path / "single.gguf", tmp_path / "m",
                   max_bytes=mode.get("split_max_size"), max_tensors=mode.get("split_max_tensors"))
    theirs = sorted(os.listdir(tmp_path / "theirs"))
    assert [os.path.basename(p) for p in ours] == theirs and len(theirs) > 1
    for p in ours:
        assert filecmp.cmp(p, tmp_path / "theirs" / os.path.basename(p), shallow=False), p


def test_read_back_as_one_model(single, tmp_path):
    first = quietly(gguf_split.split, single, tmp_path / "s", max_tensors=3)[0]
    whole, parts = gguf_io.read(single), load_model(first)
    assert list(parts.tensors) == list(whole.tensors)
    assert tensor_bytes(parts) == tensor_bytes(whole)
    assert parts.config == whole.config
    assert parts.metadata["GGUF.tensor_count"] == 21
    assert {s.file for s in parts.stored} == set(parts.metadata["GGUF.split_files"])
    assert wconv("diff", single, first).returncode == 0
    r = wconv("verify", first)
    assert r.returncode == 0, r.stdout


def test_merge_gives_the_original_bytes(single, tmp_path):
    first = quietly(gguf_split.split, single, tmp_path / "s", max_bytes=15000)[0]
    r = wconv("merge", first, tmp_path / "merged.gguf")
    assert r.returncode == 0, r.stderr
    assert filecmp.cmp(single, tmp_path / "merged.gguf", shallow=False)
    assert "split.count" not in fields(tmp_path / "merged.gguf")


def test_convert_with_split_then_merge_equals_plain_convert(tmp_path):
    r = wconv("convert", HF_TINY, tmp_path / "x.gguf", "--dtype", "f16", "--split-max-tensors", "8", "-q")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == [f"x-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    assert no_temporaries(tmp_path)
    assert wconv("convert", HF_TINY, tmp_path / "plain.gguf", "--dtype", "f16", "-q").returncode == 0
    assert wconv("merge", tmp_path / "x-00001-of-00003.gguf", tmp_path / "merged.gguf").returncode == 0
    assert filecmp.cmp(tmp_path / "plain.gguf", tmp_path / "merged.gguf", shallow=False)
    # convert first-part.gguf out.gguf reads the set as one model and writes one file
    r = wconv("convert", tmp_path / "x-00001-of-00003.gguf", tmp_path / "conv.gguf", "-q")
    assert r.returncode == 0, r.stderr
    assert tensor_bytes(gguf_io.read(tmp_path / "conv.gguf")) == tensor_bytes(gguf_io.read(tmp_path / "plain.gguf"))


def test_one_part_is_a_plain_file(tmp_path):
    """As llama.cpp's converter does: a model under the limit is written as OUT, without split keys."""
    r = wconv("convert", HF_TINY, tmp_path / "x.gguf", "--split-max-size", "5G", "-q")
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == ["x.gguf"]
    assert "split.count" not in fields(tmp_path / "x.gguf")


def test_non_default_alignment_is_declared_in_every_part(tmp_path):
    from gguf import GGUFWriter

    path = str(tmp_path / "a.gguf")
    w = GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    for i in range(4):
        w.add_tensor(f"t{i}", np.full((3, 8), i, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    paths = quietly(gguf_split.split, path, tmp_path / "s", max_tensors=2)
    for p in paths:
        h, _ = gguf_io.read_header(p)
        assert h.alignment == 64 and all((t.offset - h.data_offset) % 64 == 0 for t in h.tensors)
    from gguf import GGUFReader

    assert [np.asarray(t.data).sum() for p in paths for t in GGUFReader(p).tensors] == [0, 24, 48, 72]
    merged = quietly(gguf_split.merge, paths[0], tmp_path / "m.gguf")
    assert filecmp.cmp(path, merged, shallow=False)


# --- broken sets ------------------------------------------------------------------------------

@pytest.fixture
def parts(single, tmp_path):
    return quietly(gguf_split.split, single, tmp_path / "s", max_tensors=6)


def one_line_error(r, *words):
    assert r.returncode == 2 and r.stdout == ""
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    for w in words:
        assert w in line, line


def test_missing_part_named(parts, tmp_path):
    os.remove(parts[2])
    for command in (["inspect"], ["convert", "--to", "safetensors"], ["merge"], ["diff", parts[1]]):
        args = [command[0], parts[0], *command[1:]]
        if command[0] in ("convert", "merge"):
            args.insert(2, tmp_path / "out.gguf")
        one_line_error(wconv(*args), os.path.basename(parts[2]), "part 3 of the 4-part")
    assert not os.path.exists(tmp_path / "out.gguf") and no_temporaries(tmp_path)
    r = wconv("verify", parts[0])
    assert r.returncode == 1 and os.path.basename(parts[2]) in r.stdout


def test_a_later_part_is_not_a_model(parts):
    one_line_error(wconv("inspect", parts[1]), "part 2 of a 4-part", os.path.basename(parts[0]))


def test_parts_swapped_refused(parts):
    a, b = parts[1], parts[2]
    shutil.move(a, a + ".x"), shutil.move(b, a), shutil.move(a + ".x", b)
    with pytest.raises(FormatError, match="split.no is 2, but the file is named as part 2"):
        gguf_io.read(parts[0])


def test_wrong_tensor_total_refused(parts):
    raw = bytearray(open(parts[0], "rb").read())
    at = raw.index(b"split.tensors.count") + len("split.tensors.count") + 4  # key, then its type, then the value
    raw[at:at + 4] = (20).to_bytes(4, "little")
    open(parts[0], "wb").write(bytes(raw))
    with pytest.raises(FormatError, match="split.tensors.count says 20 tensors, the 4 parts hold 21"):
        gguf_io.read(parts[0])


def test_first_part_metadata_edited_in_place(parts):
    r = wconv("edit", parts[0], "--in-place", "--set", "general.name=renamed set")
    assert r.returncode == 0, r.stderr
    model = gguf_io.read(parts[0])
    assert model.metadata["general.name"] == "renamed set" and len(model.tensors) == 21


def test_named_as_a_part_but_not_one(single, tmp_path):
    lone = tmp_path / "m-00001-of-00002.gguf"
    shutil.copy(single, lone)
    assert gguf_io.read(lone).metadata["GGUF.tensor_count"] == 21  # no split.count: an ordinary file


def test_existing_part_not_replaced_without_force(single, tmp_path):
    (tmp_path / "s-00002-of-00004.gguf").write_bytes(b"precious")
    r = wconv("split", single, tmp_path / "s", "--split-max-tensors", "6")
    one_line_error(r, "s-00002-of-00004.gguf", "--force")
    assert sorted(os.listdir(tmp_path)) == ["s-00002-of-00004.gguf"]
    r = wconv("split", single, tmp_path / "s", "--split-max-tensors", "6", "--force")
    one_line_error(r, "not a GGUF")  # --force replaces only GGUF files
    assert (tmp_path / "s-00002-of-00004.gguf").read_bytes() == b"precious"


def test_merge_of_a_plain_file_refused(single, tmp_path):
    one_line_error(wconv("merge", single, tmp_path / "o.gguf"), "not the first part")


# --- llama.cpp ------------------------------------------------------------------------------

def test_llama_cpp_loads_the_set_from_its_first_part(llama_cpp, tmp_path):
    from test_llamacpp_interop import llama_cpp_logits

    r = wconv("convert", HF_TINY, tmp_path / "x.gguf", "--dtype", "q8_0", "--split-max-size", "40K", "-q")
    assert r.returncode == 0, r.stderr
    first = tmp_path / "x-00001-of-00005.gguf"
    assert first.exists(), os.listdir(tmp_path)
    assert wconv("convert", HF_TINY, tmp_path / "one.gguf", "--dtype", "q8_0", "-q").returncode == 0
    tokens = [1, 7, 42, 99, 3, 250]
    split_logits = llama_cpp_logits(llama_cpp, first, tokens)
    assert np.array_equal(split_logits, llama_cpp_logits(llama_cpp, tmp_path / "one.gguf", tokens))
    assert np.isfinite(split_logits).all() and split_logits.std() > 0


def test_real_gguf_split_merges_back_and_loads_in_llama_cpp(llama_cpp, tmp_path):
    """A third-party GGUF (with its vocabulary): split by size, merged back to its own bytes, and the
    set gives llama.cpp the original file's logits."""
    from conftest import realdata_path
    from test_edit import REAL, llama_run

    real = realdata_path(*REAL)
    paths = quietly(gguf_split.split, real, tmp_path / "r", max_bytes=200_000)
    assert len(paths) > 2
    assert filecmp.cmp(real, quietly(gguf_split.merge, paths[0], tmp_path / "m.gguf"), shallow=False)
    got, meta = llama_run(llama_cpp, paths[0])
    want, _ = llama_run(llama_cpp, real)
    assert np.array_equal(got, want) and meta["split.count"] == str(len(paths))
