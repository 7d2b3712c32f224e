"""`wconv verify`: checksum lists (as md5sum/sha256sum write and check them) and structural checks.

Checksum lists are written by coreutils' md5sum/sha256sum where available (else hashlib), and
our verdict is compared with `md5sum -c` on the same directory. Structural checks are run on
files written by the consumers' own tools (torch.save, safetensors, gguf-py's GGUFWriter incl.
its split sets) and on copies damaged in one place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch

import modelgen
from clirun import wconv
from conftest import fixture_path, realdata_path
from wconv.formats import gguf_io, llama2c
from wconv.verify import format_result, verify_path
from wconv.verify.checksums import parse_list, verify_checksums

HTML = b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head><body>Access denied</body></html>\n"
S3_ERROR = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
            b"<Message>Request has expired</Message></Error>")


def checksum_list(directory, names, tool="md5sum", list_name="checklist.chk", *extra) -> str:
    """The list `tool` (coreutils) writes for `names`; hashlib's equivalent if it is missing."""
    path = os.path.join(directory, list_name)
    if shutil.which(tool):
        out = subprocess.run([tool, *extra, *names], cwd=directory, capture_output=True, check=True).stdout
    else:
        algo = tool.replace("sum", "")
        out = b"".join(f"{hashlib.new(algo, open(os.path.join(directory, n), 'rb').read()).hexdigest()}  {n}\n"
                       .encode() for n in names)
    with open(path, "wb") as f:
        f.write(out)
    return path


def md5sum_check_ok(directory, list_name="checklist.chk"):
    if not shutil.which("md5sum"):
        return None
    return subprocess.run(["md5sum", "-c", "--quiet", list_name], cwd=directory, capture_output=True).returncode == 0


@pytest.fixture
def download(tmp_path):
    """A Meta-style download directory: a real torch checkpoint, params.json, tokenizer.model, checklist."""
    d = tmp_path / "Llama-tiny"
    d.mkdir()
    shutil.copy(fixture_path("meta-tiny", "consolidated.00.pth"), d / "consolidated.00.pth")
    shutil.copy(realdata_path("meta", "Meta-Llama-3-70B", "params.json"), d / "params.json")
    (d / "tokenizer.model").write_bytes(np.random.default_rng(0).bytes(200_000))
    checksum_list(str(d), ["consolidated.00.pth", "params.json", "tokenizer.model"])
    return d


def statuses(result):
    return {r["name"]: r["status"] for r in result["checksums"]["files"]}


def test_good_directory(download):
    r = verify_path(download)
    assert r["ok"] and set(statuses(r).values()) == {"ok"} and r["checksums"]["extra"] == []
    assert md5sum_check_ok(download) in (True, None)
    p = wconv("verify", download)
    assert p.returncode == 0 and "result: OK" in p.stdout, p.stdout + p.stderr


def test_one_flipped_byte(download):
    path = download / "consolidated.00.pth"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    r = verify_path(download)
    assert not r["ok"] and statuses(r) == {"consolidated.00.pth": "mismatch", "params.json": "ok",
                                           "tokenizer.model": "ok"}
    assert md5sum_check_ok(download) in (False, None)
    p = wconv("verify", download)
    assert p.returncode == 1 and "MISMATCH   consolidated.00.pth" in p.stdout


def test_missing_extra_and_html_files(download):
    os.remove(download / "params.json")
    (download / "consolidated.00.pth").write_bytes(HTML)
    (download / "tokenizer.model").write_bytes(S3_ERROR)
    (download / "consolidated.00.pth.1").write_bytes(b"leftover of a retried download")
    (download / ".DS_Store").write_bytes(b"hidden files are not reported")
    r = verify_path(download)
    assert statuses(r) == {"consolidated.00.pth": "html", "params.json": "missing", "tokenizer.model": "html"}
    assert r["checksums"]["extra"] == ["consolidated.00.pth.1"] and not r["ok"]
    rows = {row["name"]: row for row in r["checksums"]["files"]}
    assert "HTML page" in rows["consolidated.00.pth"]["detail"]
    assert "XML error page (AccessDenied)" in rows["tokenizer.model"]["detail"]
    text = format_result(r)
    assert "MISSING    params.json" in text and "EXTRA      consolidated.00.pth.1" in text
    assert wconv("verify", download).returncode == 1


def test_the_real_meta_checklist():
    d = realdata_path("meta", "Meta-Llama-3-70B")
    entries = parse_list(os.path.join(d, "checklist.chk"))
    assert [e.name for e in entries] == [f"consolidated.{i:02d}.pth" for i in range(8)] + \
        ["params.json", "tokenizer.model"]
    assert {e.algorithm for e in entries} == {"md5"} and entries[0].digest == "898b2ef9660e940031cb473724d4ba18"
    # The real params.json is the one the real checklist lists; the weights are not here.
    r = verify_path(d)
    st = statuses(r)
    assert st["params.json"] == "ok" and st["consolidated.00.pth"] == "missing" and not r["ok"]
    assert r["checksums"]["extra"] == []  # checklist.chk itself is not an extra file


@pytest.mark.parametrize("tool,extra", [("sha256sum", ()), ("sha1sum", ()), ("sha512sum", ()),
                                        ("sha256sum", ("--tag",)), ("md5sum", ("-b",))])
def test_other_checksum_lists(download, tool, extra):
    if not shutil.which(tool):
        pytest.skip(f"{tool} not installed")
    checksum_list(str(download), ["consolidated.00.pth", "tokenizer.model"], tool, "SUMS", *extra)
    os.remove(download / "checklist.chk")
    r = verify_path(download, checksums=download / "SUMS")
    assert statuses(r) == {"consolidated.00.pth": "ok", "tokenizer.model": "ok"}
    assert r["checksums"]["extra"] == ["params.json"] and not r["ok"]  # listed nowhere
    # one file against its line, wherever the list is
    single = verify_path(download / "tokenizer.model", checksums=download / "SUMS")
    assert single["ok"] and statuses(single) == {"tokenizer.model": "ok"} and single["structure"] == []
    model = verify_path(download / "consolidated.00.pth", checksums=download / "SUMS")
    assert model["ok"] and model["structure"][0]["format"] == "torch-zip"


def test_names_with_escapes_and_subdirectories(tmp_path):
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "consolidated.00.pth").write_bytes(b"abc")
    weird = "new\nline"
    (tmp_path / weird).write_bytes(b"xyz")
    if shutil.which("sha256sum"):
        out = subprocess.run(["sha256sum", "original/consolidated.00.pth", weird], cwd=tmp_path,
                             capture_output=True, check=True).stdout
    else:
        pytest.skip("sha256sum not installed")
    (tmp_path / "SHA256SUMS").write_bytes(out)
    assert out.startswith(b"\\") or b"\n\\" in out  # coreutils escapes the newline in the name
    r = verify_path(tmp_path, checksums=tmp_path / "SHA256SUMS")
    assert r["ok"], format_result(r)


@pytest.mark.parametrize("content,message", [
    (HTML, "is an HTML page"),
    (b"d41d8cd98f00b204e9800998ecf8427e  ok.bin\nnot a checksum line\n", "line 2 is not a checksum line"),
    (b"abc123  x.bin\n", "6-digit digest"),
    (b"d41d8cd98f00b204e9800998ecf8427e  ../../etc/passwd\n", "not a path inside the directory"),
    (b"d41d8cd98f00b204e9800998ecf8427e  /etc/passwd\n", "not a path inside the directory"),
    (b"\n# only a comment\n", "has no checksum lines"),
    (b"d41d8cd98f00b204e9800998ecf8427e  a\n0cc175b9c0f1b6a831c399e269772661  a\n", "again with another digest"),
    (b"\xff\xfe\x00binary", "not UTF-8"),
])
def test_unusable_lists_are_one_line_errors(tmp_path, content, message):
    (tmp_path / "checklist.chk").write_bytes(content)
    p = wconv("verify", tmp_path)
    assert p.returncode == 2 and p.stdout == "", p.stdout
    assert p.stderr.startswith("wconv: error: ") and p.stderr.count("\n") == 1 and message in p.stderr, p.stderr


def test_argument_errors(tmp_path):
    for args, message in ((["verify", tmp_path / "nope"], "no such file or directory"),
                          (["verify", tmp_path], "no checklist.chk and no model files"),
                          (["verify", fixture_path("llama2c-ckpt.pt"), "--checksums", tmp_path / "none"],
                           "checksum list not found")):
        p = wconv(*args)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and message in p.stderr, p.stderr


def test_hashing_uses_large_reads_and_both_cores_agree(download):
    big = download / "consolidated.01.pth"
    big.write_bytes(np.random.default_rng(1).bytes(20_000_003))
    checksum_list(str(download), ["consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"])
    one = verify_checksums(download, download / "checklist.chk", workers=1)
    two = verify_checksums(download, download / "checklist.chk", workers=2)
    assert one["ok"] and two["ok"] and [r["actual"] for r in one["files"]] == [r["actual"] for r in two["files"]]
    assert two["bytes_hashed"] == sum(os.path.getsize(download / r["name"]) for r in two["files"])


# --- structure ---------------------------------------------------------------------------

def structure(path, **kw):
    r = verify_path(path, **kw)
    assert len(r["structure"]) == 1
    return r["structure"][0]


def test_torch_zip_structure_crc_and_deep(tmp_path):
    src = fixture_path("meta-tiny", "consolidated.00.pth")
    s = structure(src, crc=True, deep=True)
    assert s["ok"] and s["format"] == "torch-zip" and s["n_tensors"] == 21, s
    assert any("CRC-32 of" in c for c in s["checks"]) and any("no NaN/Inf" in c for c in s["checks"])
    # one flipped bit inside a tensor's stored bytes: only the CRC can tell
    sd = torch.load(src, weights_only=True)
    data = bytearray(open(src, "rb").read())
    needle = sd["layers.0.attention.wq.weight"].view(torch.int16).numpy().tobytes()[:64]
    at = bytes(data).index(needle)
    data[at + 10] ^= 0x04
    bad = tmp_path / "flipped.pth"
    bad.write_bytes(bytes(data))
    assert structure(bad)["ok"]
    s = structure(bad, crc=True)
    assert not s["ok"] and "fails its CRC-32 check" in s["problems"][0]
    # truncated: the zip directory is gone
    cut = tmp_path / "cut.pth"
    cut.write_bytes(bytes(data[: len(data) // 2]))
    s = structure(cut)
    assert not s["ok"] and "end-of-central-directory" in s["problems"][0]
    p = wconv("verify", cut)
    assert p.returncode == 1 and "PROBLEM" in p.stdout


def test_deep_scan_names_the_tensor_with_nan(tmp_path):
    sd = {"a.weight": torch.ones(4, 4), "b.weight": torch.ones(8)}
    sd["b.weight"][3] = float("nan")
    sd["b.weight"][5] = float("inf")
    torch.save(sd, tmp_path / "m.pt")
    assert structure(tmp_path / "m.pt")["ok"]
    s = structure(tmp_path / "m.pt", deep=True)
    assert not s["ok"] and s["nonfinite"] == [{"name": "b.weight", "nan": 1, "inf": 1}]


def test_legacy_torch_and_html_instead_of_a_file(tmp_path):
    torch.save({"w": torch.arange(10.0)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert structure(tmp_path / "old.pt", deep=True)["ok"]
    data = (tmp_path / "old.pt").read_bytes()
    (tmp_path / "short.pt").write_bytes(data[:-8])
    assert not structure(tmp_path / "short.pt")["ok"]
    (tmp_path / "model.safetensors").write_bytes(HTML)
    s = structure(tmp_path / "model.safetensors")
    assert s["format"] == "html" and "HTML page" in s["problems"][0]


def test_safetensors_structure(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = tmp_path / "m.safetensors"
    save_file({"a": np.ones((3, 4), np.float32), "b": np.zeros(5, np.float16)}, str(path))
    assert structure(path, deep=True)["ok"]
    # appended bytes: our reader would read it, the safetensors library refuses it
    grown = tmp_path / "grown.safetensors"
    grown.write_bytes(path.read_bytes() + b"\0" * 16)
    with pytest.raises(Exception):
        with safe_open(str(grown), "np") as f:
            f.get_tensor("a")
    s = structure(grown)
    assert not s["ok"] and "after the last tensor" in s["problems"][0]
    # truncated inside the data
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:-3])
    assert "outside the" in structure(tmp_path / "cut.safetensors")["problems"][0]


def _gguf_file(tmp_path, name="m.gguf", **kw):
    m = modelgen.random_model(modelgen.llama_config(), seed=7)
    path = str(tmp_path / name)
    gguf_io.write(m, path, quiet=True, **kw)
    return path


def _rewrite_tensor_offset(path, out, index, new_relative_offset):
    h, _ = gguf_io.read_header(path)
    data = bytearray(open(path, "rb").read())
    # the offset is the last u64 of the tensor's info record; find that record by its name
    info = h.tensors[index]
    name = info.name.encode()
    at = bytes(data).index(struct.pack("<Q", len(name)) + name, h.info_span[0])
    at += 8 + len(name) + 4 + 8 * len(info.dims) + 4
    struct.pack_into("<Q", data, at, new_relative_offset)
    open(out, "wb").write(bytes(data))


def test_gguf_structure(tmp_path):
    path = _gguf_file(tmp_path, dtype="q8_0")
    s = structure(path, deep=True)
    assert s["ok"] and s["n_tensors"] == 21, s
    h, _ = gguf_io.read_header(path)
    # two tensors on the same bytes
    _rewrite_tensor_offset(path, tmp_path / "overlap.gguf", 1, h.tensors[0].offset - h.data_offset)
    s = structure(tmp_path / "overlap.gguf")
    assert not s["ok"] and "overlap" in s["problems"][0]
    # a tensor moved to a later, aligned, in-bounds place: our reader could read it, llama.cpp cannot
    last = h.tensors[-1]
    _rewrite_tensor_offset(path, tmp_path / "gap.gguf", len(h.tensors) - 1, last.offset - h.data_offset + 32)
    data = open(tmp_path / "gap.gguf", "rb").read() + b"\0" * 64
    open(tmp_path / "gap.gguf", "wb").write(data)
    s = structure(tmp_path / "gap.gguf")
    assert not s["ok"] and "llama.cpp expects" in s["problems"][0]
    # truncated
    open(tmp_path / "cut.gguf", "wb").write(open(path, "rb").read()[:-100])
    assert "truncated GGUF" in structure(tmp_path / "cut.gguf")["problems"][0]


def _gguf_py_split_set(tmp_path, n_per_part=7):
    """A split set written by gguf-py's own GGUFWriter (gguf-split's layout)."""
    from gguf import GGUFWriter

    m = modelgen.random_model(modelgen.llama_config(), seed=8)
    w = GGUFWriter(tmp_path / "model.gguf", "llama", split_max_tensors=n_per_part)
    w.add_block_count(2)
    for t in m:
        w.add_tensor(t.name, np.asarray(t.raw()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(str(p) for p in tmp_path.glob("model-*-of-*.gguf"))


def test_gguf_split_set(tmp_path):
    parts = _gguf_py_split_set(tmp_path)
    assert len(parts) == 3 and parts[0].endswith("model-00001-of-00003.gguf")
    s = structure(parts[0], deep=True)
    assert s["ok"] and s["files"] == parts and s["n_tensors"] == 21, s
    assert structure(parts[1])["ok"]  # any part names the whole set
    r = verify_path(tmp_path)  # a directory: the set is checked once
    assert r["ok"] and len(r["structure"]) == 1
    os.remove(parts[2])
    s = structure(parts[0])
    assert not s["ok"] and "part 3 of the 3-part split set is missing" in s["problems"][0]


def test_llama2c_and_ggjt_structure(tmp_path):
    from wconv.formats import ggml_legacy

    m = modelgen.random_model(modelgen.llama_config(), seed=9)
    llama2c.write(m, tmp_path / "m.bin", quiet=True, version=2)
    ggml_legacy.write_ggjt(m, tmp_path / "m.ggjt", quiet=True, dtype="q4_0")
    for name in ("m.bin", "m.ggjt"):
        assert structure(tmp_path / name, deep=True, crc=True)["ok"]
        data = (tmp_path / name).read_bytes()
        (tmp_path / ("cut-" + name)).write_bytes(data[:-50])
        s = structure(tmp_path / ("cut-" + name))
        assert not s["ok"] and s["problems"][0].count("\n") == 0
    real = realdata_path("llama2c", "stories260K.bin")
    assert structure(real, deep=True)["ok"]


def test_json_output_is_strict(download):
    p = wconv("verify", "--json", "--crc", "--deep", download)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    json.dumps(r, allow_nan=False)
    assert r["checksums"]["n_files"] == 3 and r["structure"][0]["format"] == "torch-zip"
