"""Converter conveniences llama.cpp's convert_hf_to_gguf.py users expect: --vocab-only (llama.cpp's
vocab_only load tokenises like the full model), --dry-run (prints the plan, creates nothing), output
name templates ({ftype}, {name}), --name and --metadata (general.* keys, read back by gguf-py and
llama.cpp).

Without llama-cpp-python the llama.cpp tests skip, except under CI=true, where they fail.
"""
from __future__ import annotations

import json
import os

import pytest

from clirun import wconv
from vocabcases import TOKENIZER_FIXTURES, write_gguf
from wconv.formats import gguf_io
from wconv.vocab import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_TINY = os.path.join(ROOT, "fixtures", "hf-llama-tiny")  # bf16 weights, no tokenizer


def fields(path) -> dict:
    from gguf import GGUFReader

    return {k: (f.types[0].name, f.contents()) for k, f in GGUFReader(os.fspath(path)).fields.items()
            if not k.startswith("GGUF.")}


@pytest.fixture(scope="module")
def with_vocab(tmp_path_factory):
    """A small GGUF model carrying the Qwen2 byte-level BPE fixture vocabulary."""
    tok = load_tokenizer(os.path.join(TOKENIZER_FIXTURES, "qwen2-bpe", "tokenizer.json"))
    return write_gguf(tok, tmp_path_factory.mktemp("vocab") / "full.gguf")


# --- --vocab-only ------------------------------------------------------------------------------

def test_vocab_only_has_no_tensors_and_the_same_vocabulary(with_vocab, tmp_path):
    out = tmp_path / "v.gguf"
    r = wconv("convert", with_vocab, out, "--vocab-only")
    assert r.returncode == 0, r.stderr
    h, _ = gguf_io.read_header(out)
    assert h.tensors == [] and os.path.getsize(out) < os.path.getsize(with_vocab)
    full, vocab = fields(with_vocab), fields(out)
    assert {k: v for k, v in full.items() if k.startswith("tokenizer.")} == \
           {k: v for k, v in vocab.items() if k.startswith("tokenizer.")}
    assert {k: v for k, v in full.items() if k.startswith("llama.")} == \
           {k: v for k, v in vocab.items() if k.startswith("llama.")}
    assert gguf_io.read(out).metadata["vocab_only"] is True


def test_vocab_only_tokenises_in_llama_cpp_like_the_full_model(llama_cpp, with_vocab, tmp_path):
    out = tmp_path / "v.gguf"
    assert wconv("convert", with_vocab, out, "--vocab-only").returncode == 0
    texts = ["Hello world", "  leading spaces\tand tabs\n", "numbers 12345 and ünïcödé", "<|endoftext|> x"]
    full = llama_cpp.Llama(model_path=os.fspath(with_vocab), n_ctx=32, verbose=False)
    vocab = llama_cpp.Llama(model_path=os.fspath(out), vocab_only=True, verbose=False)
    try:
        for text in texts:
            want = full.tokenize(text.encode(), add_bos=False, special=True)
            assert vocab.tokenize(text.encode(), add_bos=False, special=True) == want and len(want) > 1
    finally:
        full.close(), vocab.close()


def test_vocab_only_without_a_vocabulary_refused(tmp_path):
    r = wconv("convert", HF_TINY, tmp_path / "v.gguf", "--vocab-only")
    assert r.returncode == 2 and "no vocabulary" in r.stderr and os.listdir(tmp_path) == []


# --- --dry-run ---------------------------------------------------------------------------------

def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path):
    before = os.listdir(tmp_path)
    r = wconv("convert", HF_TINY, tmp_path / "sub-{ftype}.gguf", "--dtype", "q8_0", "--split-max-tensors", "10",
              "--dry-run")
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == before
    out = r.stdout
    for i in (1, 2, 3):
        assert f"sub-q8_0-{i:05d}-of-00003.gguf" in out
    assert "blk.0.attn_q.weight" in out and "BF16 -> Q8_0" in out and "4,352" in out  # 64x64 Q8_0: 128 blocks of 34
    assert "blk.0.attn_norm.weight" in out and "BF16 -> F32" in out
    assert "warning: no tokenizer" in out


def test_dry_run_of_a_split_command_creates_nothing(tmp_path):
    single = tmp_path / "m.gguf"
    assert wconv("convert", HF_TINY, single, "-q").returncode == 0
    r = wconv("split", single, tmp_path / "s", "--split-max-tensors", "7", "--dry-run")
    assert r.returncode == 0 and "n_split: 3" in r.stdout and "s-00003-of-00003.gguf" in r.stdout
    assert os.listdir(tmp_path) == ["m.gguf"]


def test_dry_run_only_for_gguf(tmp_path):
    r = wconv("convert", HF_TINY, tmp_path / "x.safetensors", "--dry-run")
    assert r.returncode == 2 and "--dry-run does not apply to safetensors" in r.stderr


# --- templates -------------------------------------------------------------------------------

@pytest.mark.parametrize("args,template,want", [
    (["--dtype", "q8_0"], "m-{ftype}.gguf", "m-q8_0.gguf"),
    ([], "m-{ftype}.gguf", "m-bf16.gguf"),  # no --dtype: the type the weights keep
    (["--dtype", "f16"], "m.{FTYPE}.gguf", "m.F16.gguf"),
    (["--dtype", "f32"], "{outtype}-{}.gguf", "f32-f32.gguf"),
    (["--name", "My Model/v2"], "{name}-{ftype}.gguf", "My-Model-v2-bf16.gguf"),
    ([], "{name}.gguf", "hf-llama-tiny.gguf"),
    ([], "a{{b}}.gguf", "a{b}.gguf"),
])
def test_output_name_templates(tmp_path, args, template, want):
    r = wconv("convert", HF_TINY, tmp_path / template, "-q", *args)
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == [want]


def test_unknown_template_field_refused(tmp_path):
    r = wconv("convert", HF_TINY, tmp_path / "m-{quant}.gguf", "-q")
    assert r.returncode == 2 and "{quant}" in r.stderr and os.listdir(tmp_path) == []


def test_template_for_other_formats_refused(tmp_path):
    r = wconv("convert", HF_TINY, tmp_path / "m-{ftype}.safetensors")
    assert r.returncode == 2 and "apply to GGUF" in r.stderr


# --- --name / --metadata ---------------------------------------------------------------------

def test_name_and_metadata_file_end_up_in_general_keys(tmp_path, llama_cpp):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({
        "general.name": "from file", "general.author": "Ada", "general.version": "v1.2",
        "general.license.name": "apache-2.0", "general.tags": ["tiny", "test"], "general.languages": ["en"],
        "general.sampling.top_k": 40, "general.sampling.temp": 0.7,
        "general.base_models": [{"name": "Base", "organization": "Org", "repo_url": "https://x/y"}],
        "general.datasets": [{"name": "D1"}, {"name": "D2"}],
    }))
    out = tmp_path / "m.gguf"
    r = wconv("convert", HF_TINY, out, "-q", "--metadata", meta, "--name", "from flag")
    assert r.returncode == 0, r.stderr
    f = fields(out)
    assert f["general.name"] == ("STRING", "from flag")  # --name wins, as --model-name does
    assert f["general.author"] == ("STRING", "Ada") and f["general.version"] == ("STRING", "v1.2")
    assert f["general.license.name"] == ("STRING", "apache-2.0")
    assert f["general.tags"] == ("ARRAY", ["tiny", "test"]) and f["general.languages"] == ("ARRAY", ["en"])
    assert f["general.sampling.top_k"] == ("INT32", 40)
    assert f["general.sampling.temp"][0] == "FLOAT32" and abs(f["general.sampling.temp"][1] - 0.7) < 1e-6
    assert f["general.base_model.count"] == ("UINT32", 1)
    assert f["general.base_model.0.organization"] == ("STRING", "Org")
    assert f["general.dataset.count"] == ("UINT32", 2) and f["general.dataset.1.name"] == ("STRING", "D2")
    llm = llama_cpp.Llama(model_path=os.fspath(out), n_ctx=16, verbose=False)
    try:
        assert llm.metadata["general.name"] == "from flag" and llm.metadata["general.author"] == "Ada"
    finally:
        llm.close()


def test_unknown_metadata_keys_named_not_written(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"general.author": "A", "general.colour": "blue"}))
    r = wconv("convert", HF_TINY, tmp_path / "m.gguf", "-q", "--metadata", meta)
    assert r.returncode == 0 and "general.colour" in r.stderr
    assert "general.colour" not in fields(tmp_path / "m.gguf")


@pytest.mark.parametrize("content,words", [
    ('{"general.sampling.top_k": "forty"}', "general.sampling.top_k must be an integer"),
    ('{"general.tags": "x"}', "general.tags must be a list of strings"),
    ("[1, 2]", "JSON object"),
    ("{not json", "not a JSON metadata file"),
])
def test_bad_metadata_file_refused(tmp_path, content, words):
    meta = tmp_path / "meta.json"
    meta.write_text(content)
    r = wconv("convert", HF_TINY, tmp_path / "m.gguf", "--metadata", meta)
    assert r.returncode == 2 and words in r.stderr and "meta.json" in r.stderr
    assert os.listdir(tmp_path) == ["meta.json"]


def test_name_only_for_gguf(tmp_path):
    r = wconv("convert", HF_TINY, tmp_path / "x.safetensors", "--name", "n")
    assert r.returncode == 2 and "--name does not apply to safetensors" in r.stderr


def test_vocab_only_of_a_real_gguf_tokenises_like_it(llama_cpp, tmp_path):
    from conftest import realdata_path
    from test_edit import REAL

    real = realdata_path(*REAL)
    out = tmp_path / "v.gguf"
    r = wconv("convert", real, out, "--vocab-only")
    assert r.returncode == 0, r.stderr
    full = llama_cpp.Llama(model_path=real, n_ctx=32, verbose=False)
    vocab = llama_cpp.Llama(model_path=os.fspath(out), vocab_only=True, verbose=False)
    try:
        for text in ["Hello world", " the quick brown fox", "Ünïcode and 12345", "\n\n  x"]:
            want = full.tokenize(text.encode(), add_bos=True)
            assert vocab.tokenize(text.encode(), add_bos=True) == want and len(want) > 2
    finally:
        full.close(), vocab.close()
