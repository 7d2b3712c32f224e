"""`wconv edit`: llama.cpp loads the edited GGUF, sees the new metadata, computes the same logits;
gguf-py's GGUFReader sees the values with the right types; refused edits write nothing.

Without llama-cpp-python the llama.cpp tests skip, except under CI=true, where they fail.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest

import modelgen
from clirun import wconv
from conftest import realdata_path
from wconv.formats import gguf_io
from wconv.gguf_edit import edit_gguf, parse_assignment

REAL = ("gguf", "ollama_llama-2-tiny-random_f16.gguf")


def llama_run(llama_cpp, path, tokens=(1, 5, 9, 14, 3)):
    """(logits, metadata) as llama.cpp sees them."""
    llm = llama_cpp.Llama(model_path=os.fspath(path), logits_all=True, n_ctx=32, n_batch=32, n_threads=2,
                          verbose=False)
    try:
        llm.eval(list(tokens))
        return np.array(llm.scores[:len(tokens)], dtype=np.float64), dict(llm.metadata)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("edit") / "m.gguf")
    with contextlib.redirect_stderr(io.StringIO()):
        gguf_io.write(modelgen.random_model(modelgen.llama_config(), seed=21), path, quiet=True, dtype="q8_0")
    return path


def gguf_py_fields(path) -> dict:
    """{key: (GGUFValueType name, element type name or None, python value)} read by gguf-py."""
    from gguf import GGUFReader, GGUFValueType

    out = {}
    for key, field in GGUFReader(path).fields.items():
        if key.startswith("GGUF."):
            continue
        kind = field.types[0]
        element = field.types[1] if kind == GGUFValueType.ARRAY and len(field.types) > 1 else None
        out[key] = (kind.name, element.name if element is not None else None, field.contents())
    return out


def data_section(path) -> bytes:
    h, _ = gguf_io.read_header(path)
    with open(path, "rb") as f:
        f.seek(h.data_offset)
        return f.read()


@pytest.mark.interop
def test_llama_cpp_sees_the_edits_and_computes_the_same_logits(llama_cpp, tmp_path):
    src = realdata_path(*REAL)
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}\n")
    out = tmp_path / "edited.gguf"
    p = wconv("edit", src, out, "--set", "general.name=My model", "--set", "llama.context_length=2048",
              "--set", "tokenizer.ggml.add_bos_token=false", "--set", "my.new.key:u16=7",
              "--delete", "general.file_type", "--chat-template", template)
    assert p.returncode == 0, p.stderr
    before, meta_before = llama_run(llama_cpp, src)
    after, meta = llama_run(llama_cpp, out)
    assert meta["general.name"] == "My model" and meta["llama.context_length"] == "2048"
    assert meta["tokenizer.chat_template"] == template.read_text()
    assert meta["tokenizer.ggml.add_bos_token"] == "false" and meta["my.new.key"] == "7"
    assert "general.file_type" in meta_before and "general.file_type" not in meta
    np.testing.assert_array_equal(after, before)
    assert data_section(out) == data_section(src)


@pytest.mark.interop
def test_in_place_edit_of_a_wconv_file(llama_cpp, small_gguf, tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copy(small_gguf, path)
    before, _ = llama_run(llama_cpp, path)
    ino = os.stat(path).st_ino
    long_name = "a much longer name than before, " * 20  # strings change length: gguf_set_metadata cannot
    r = edit_gguf(path, set=[f"general.name={long_name}"], in_place=True)
    assert r["changed"] == ["general.name"] and r["output"] == str(path)
    after, meta = llama_run(llama_cpp, path)
    assert meta["general.name"] == long_name
    np.testing.assert_array_equal(after, before)
    assert os.stat(path).st_ino != ino  # a new file renamed over the old one
    assert [n for n in os.listdir(tmp_path) if n != "m.gguf"] == []  # no temporary left behind


def test_types_as_gguf_py_reads_them(small_gguf, tmp_path):
    out = tmp_path / "t.gguf"
    edit_gguf(small_gguf, out, set=[
        "llama.context_length=64",            # existing UINT32 stays UINT32
        "llama.rope.freq_base=500000",        # existing FLOAT32 parsed as a float
        "tokenizer.ggml.bos_token_id=0",      # new, known to llama.cpp: UINT32
        "my.int=12", "my.float=2.5", "my.bool=true", "my.text=hello world", "my.quoted=\"x\"",
        "my.u64:u64=18446744073709551615", "my.f64:f64=0.1", "my.i8:i8=-5", "my.str:str=123",
        "my.ints=[1, 2, 3]", "my.strs=[\"a\", \"b\"]", "my.floats:f32[]=[1, 2.5]", "my.empty:i32[]=[]",
    ])
    f = gguf_py_fields(out)
    assert f["llama.context_length"] == ("UINT32", None, 64)
    assert f["llama.rope.freq_base"] == ("FLOAT32", None, 500000.0)
    assert f["tokenizer.ggml.bos_token_id"] == ("UINT32", None, 0)
    assert f["my.int"] == ("INT32", None, 12) and f["my.float"] == ("FLOAT32", None, 2.5)
    assert f["my.bool"] == ("BOOL", None, True) and f["my.text"] == ("STRING", None, "hello world")
    assert f["my.quoted"] == ("STRING", None, '"x"')  # strings are taken verbatim
    assert f["my.u64"] == ("UINT64", None, 2**64 - 1) and f["my.f64"] == ("FLOAT64", None, 0.1)
    assert f["my.i8"] == ("INT8", None, -5) and f["my.str"] == ("STRING", None, "123")
    assert f["my.ints"] == ("ARRAY", "INT32", [1, 2, 3]) and f["my.strs"] == ("ARRAY", "STRING", ["a", "b"])
    assert f["my.floats"] == ("ARRAY", "FLOAT32", [1.0, 2.5]) and f["my.empty"][0] == "ARRAY"
    h, _ = gguf_io.read_header(out)  # gguf-py does not report an empty array's element type
    assert h.kv["my.empty"] == [] and h.kv_types["my.empty"] == ("ARRAY", "INT32")
    # everything else as it was, in the same order; tensor data byte for byte
    before = gguf_py_fields(small_gguf)
    unchanged = [k for k in before if k not in ("llama.context_length", "llama.rope.freq_base")]
    assert all(f[k] == before[k] for k in unchanged)
    assert [k for k in f if k in before] == list(before)
    assert data_section(out) == data_section(small_gguf)


def test_unedited_entries_are_copied_byte_for_byte(small_gguf, tmp_path):
    out = tmp_path / "n.gguf"
    edit_gguf(small_gguf, out, set=["general.name=m"])  # same length as before? no matter
    edit_gguf(out, tmp_path / "back.gguf", set=[f"general.name={gguf_io.read(small_gguf).metadata['general.name']}"])
    assert open(tmp_path / "back.gguf", "rb").read() == open(small_gguf, "rb").read()


def test_big_endian_gguf(tmp_path):
    from gguf import GGUFEndian, GGUFWriter

    path = tmp_path / "be.gguf"
    w = GGUFWriter(path, "llama", endianess=GGUFEndian.BIG)
    w.add_name("big")
    w.add_context_length(16)
    w.add_tensor("x", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    edit_gguf(path, tmp_path / "be2.gguf", set=["general.name=bigger name", "llama.context_length=32"])
    f = gguf_py_fields(tmp_path / "be2.gguf")
    assert f["general.name"][2] == "bigger name" and f["llama.context_length"] == ("UINT32", None, 32)
    np.testing.assert_array_equal(gguf_io.read(tmp_path / "be2.gguf")["x"].raw(), np.arange(12).reshape(3, 4))


REFUSED = [
    (["--set", "llama.context_length:str=long"], "llama.cpp reads llama.context_length as UINT32"),
    (["--set", "general.name:u32=5"], "llama.cpp reads general.name as STRING"),
    (["--set", "tokenizer.ggml.add_bos_token:u8=1"], "as BOOL"),
    (["--set", "llama.context_length=-1"], "does not fit in UINT32"),
    (["--set", "llama.context_length=abc"], "not a valid u32 value"),
    (["--set", "llama.embedding_length=128"], "tensor shapes depend on it"),
    (["--set", "llama.attention.head_count_kv=4"], "tensor shapes depend on it"),
    (["--set", "general.architecture=gpt2"], "cannot change general.architecture"),
    (["--set", "general.alignment=64"], "cannot change general.alignment"),
    (["--set", "tokenizer.ggml.model=gpt2"], "cannot change tokenizer.ggml.model"),
    (["--delete", "llama.block_count"], "cannot delete llama.block_count"),
    (["--delete", "llama.attention.layer_norm_rms_epsilon"], "cannot delete"),
    (["--delete", "no.such.key"], "no such key"),
    (["--set", "tokenizer.ggml.eos_token_id=32000"], "not a token id: the vocabulary has 32000 tokens"),
    (["--set", "tokenizer.ggml.tokens=[\"a\", \"b\"]"], "would have 2 tokens instead of 32000"),
    (["--set", "tokenizer.ggml.scores:f32[]=[0.5]"], "llama.cpp needs one per token"),
    (["--set", "llama.rope.scaling.type=sideways"], "must be one of none, linear, yarn, longrope"),
    (["--set", "my.list=[1, \"a\"]"], "array elements must all be"),
    (["--set", "my.bad:f33=1"], "unknown type 'f33'"),
    (["--set", "noequals"], "expected KEY=VALUE"),
    (["--set", "general.name=x", "--delete", "general.name"], "both set and deleted"),
    ([], "nothing to edit"),
]


@pytest.mark.parametrize("args,message", REFUSED, ids=[m for _, m in REFUSED])
def test_refused_edits_write_nothing(tmp_path, args, message):
    out = tmp_path / "out.gguf"
    p = wconv("edit", realdata_path(*REAL), out, *args)
    assert p.returncode == 2 and p.stdout == "" and message in p.stderr, p.stderr
    assert p.stderr.startswith("wconv: error: ") and p.stderr.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_pre_tokenizer_names_are_checked_for_bpe_vocabularies(tmp_path):
    src = realdata_path("gguf", "ggml-vocab-gpt-2.gguf")  # llama.cpp's own vocab-only test file
    p = wconv("edit", src, tmp_path / "x.gguf", "--set", "tokenizer.ggml.pre=no-such-pre-tokenizer")
    assert p.returncode == 2 and "does not know the pre-tokenizer" in p.stderr
    assert wconv("edit", src, tmp_path / "ok.gguf", "--set", "tokenizer.ggml.pre=qwen2").returncode == 0
    # (gguf-py's reader takes seconds per 50k-entry array: wconv's parser, checked against it in test_gguf)
    before, _ = gguf_io.read_header(src)
    after, _ = gguf_io.read_header(tmp_path / "ok.gguf")
    assert after.kv["tokenizer.ggml.pre"] == b"qwen2" and after.kv_types["tokenizer.ggml.pre"] == ("STRING", None)
    assert {k: v for k, v in after.kv.items() if k != "tokenizer.ggml.pre"} == \
        {k: v for k, v in before.kv.items() if k != "tokenizer.ggml.pre"}


def test_output_rules(small_gguf, tmp_path):
    out = tmp_path / "o.gguf"
    assert wconv("edit", small_gguf, out, "--set", "general.name=a").returncode == 0
    p = wconv("edit", small_gguf, out, "--set", "general.name=b")
    assert p.returncode == 2 and "output exists; pass --force" in p.stderr
    assert wconv("edit", small_gguf, out, "--set", "general.name=b", "--force").returncode == 0
    p = wconv("edit", small_gguf, small_gguf, "--set", "general.name=b", "--force")
    assert p.returncode == 2 and "refusing to write over the input" in p.stderr
    p = wconv("edit", small_gguf, out, "--in-place", "--set", "general.name=b")
    assert p.returncode == 2 and "give no output file" in p.stderr
    p = wconv("edit", small_gguf, "--set", "general.name=b")
    assert p.returncode == 2 and "--in-place" in p.stderr
    p = wconv("edit", realdata_path("llama2c", "stories260K.bin"), out, "--set", "general.name=b", "--force")
    assert p.returncode == 2 and "not a GGUF file" in p.stderr
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8")
    p = wconv("edit", small_gguf, out, "--chat-template", bad, "--force")
    assert p.returncode == 2 and "not UTF-8" in p.stderr
    p = wconv("edit", small_gguf, out, "--set", "llama.contxt_length=4", "--force")
    assert p.returncode == 0 and "a typo?" in p.stderr


def test_parse_assignment():
    assert parse_assignment("general.name=a=b") == ("general.name", None, "a=b")
    assert parse_assignment("k:u32=4") == ("k", ("UINT32", None), "4")
    assert parse_assignment("k:str[]=[\"a\"]") == ("k", ("ARRAY", "STRING"), "[\"a\"]")
    assert parse_assignment("url=http://x") == ("url", None, "http://x")
    assert parse_assignment("weird:Key=1") == ("weird:Key", None, "1")


def test_edit_is_a_copy_of_the_data_section(small_gguf, tmp_path):
    r = edit_gguf(small_gguf, tmp_path / "c.gguf", set=["general.name=c"])
    h, size = gguf_io.read_header(small_gguf)
    assert r["bytes_copied"] == size - h.data_offset > 0
    json.dumps(r)
