"""`wconv diff`: a model against itself in every format wconv writes, and against copies with
one tensor changed (by the consumers' own writers: torch.save, safetensors, a byte patch)."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch

import modelgen
from clirun import wconv
from conftest import fixture_path, realdata_path
from wconv.convert.load import load_model
from wconv.convert.save import save
from wconv.diff import diff_models, format_diff
from wconv.formats import gguf_io


@pytest.fixture(scope="module")
def model():
    return modelgen.random_model(modelgen.llama_config(), seed=11)


# (file name, save options, values identical to the f32 source?)
WRITTEN = [
    ("m.gguf", {}, True), ("m-f16.gguf", {"dtype": "f16"}, False), ("m-bf16.gguf", {"dtype": "bf16"}, False),
    ("m-q8.gguf", {"dtype": "q8_0"}, False), ("m-q4.gguf", {"dtype": "q4_0"}, False),
    ("m.safetensors", {}, True), ("m-bf16.safetensors", {"dtype": "bf16"}, False),
    ("m-v0.bin", {"version": 0}, True), ("m-v1.bin", {"version": 1}, True), ("m-v2.bin", {"version": 2}, False),
    ("m.ggjt", {}, True), ("m-q8.ggjt", {"dtype": "q8_0"}, False), ("hf", {"to": "hf"}, True),
]


@pytest.fixture(scope="module")
def written(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("written")
    out = {}
    for name, options, _ in WRITTEN:
        path = str(d / name)
        with _quiet():
            save(model, path, quiet=True, **options)
        out[name] = path
    return out


def _quiet():
    return contextlib.redirect_stderr(io.StringIO())  # the writers' notes (no tokenizer, ...)


@pytest.mark.parametrize("name,options,exact", WRITTEN, ids=[w[0] for w in WRITTEN])
def test_against_itself_and_the_source(written, model, name, options, exact):
    path = written[name]
    same = diff_models(path, path)
    assert same["ok"] and same["n_bit_identical"] == same["n_common"] == len(model.tensors), format_diff(same)
    r = diff_models(model, path)
    assert r["n_common"] == len(model.tensors) and not r["only_in_a"] and not r["only_in_b"]
    assert not r["shape_changes"]
    if exact:
        assert r["ok"] and all(t["identical"] for t in r["tensors"]), format_diff(r)
    else:
        lossy = [t for t in r["tensors"] if not t["identical"]]
        assert lossy and not r["ok"] and all(t["rel_error"] < 0.2 for t in lossy)
        assert set(r["differing"]) == {t["name"] for t in lossy}
        assert diff_models(model, path, atol=0.5)["ok"]  # within a loose tolerance


def test_max_abs_diff_equals_an_independent_dequantisation(model, written):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = {t["name"]: t for t in diff_models(model, written["m-q8.gguf"])["tensors"]}
    for rt in GGUFReader(written["m-q8.gguf"]).tensors:
        values = dequantize(rt.data, rt.tensor_type).reshape(model[rt.name].shape)
        src = model[rt.name].float32().astype(np.float64)
        d = np.abs(src - values)
        assert r[rt.name]["max_abs_diff"] == pytest.approx(float(d.max()), rel=1e-12, abs=0)
        assert r[rt.name]["rel_error"] == pytest.approx(float(np.linalg.norm(d) / np.linalg.norm(src)), rel=1e-9)
        assert r[rt.name]["n_mismatched"] == int((d > 0).sum())


def _patch_gguf_value(src, dst, name, index, value):
    """A byte-level copy of a GGUF with one F32 element of tensor `name` replaced."""
    shutil.copy(src, dst)
    h, _ = gguf_io.read_header(src)
    info = next(t for t in h.tensors if t.name == name)
    with open(dst, "r+b") as f:
        f.seek(info.offset + 4 * index)
        f.write(np.float32(value).tobytes())


def test_one_perturbed_tensor_is_the_only_one_reported(model, written, tmp_path):
    src = written["m.gguf"]
    name = "blk.1.ffn_down.weight"
    old = float(model[name].float32().reshape(-1)[123])
    _patch_gguf_value(src, tmp_path / "p.gguf", name, 123, old + 0.25)
    r = diff_models(src, tmp_path / "p.gguf")
    assert not r["ok"] and r["differing"] == [name]
    row = next(t for t in r["tensors"] if t["name"] == name)
    assert row["n_mismatched"] == 1 and row["max_abs_diff"] == pytest.approx(0.25, rel=1e-6)
    assert r["n_bit_identical"] == len(model.tensors) - 1
    assert diff_models(src, tmp_path / "p.gguf", atol=0.3)["ok"]
    assert not diff_models(src, tmp_path / "p.gguf", rtol=0.01)["ok"]
    p = wconv("diff", src, tmp_path / "p.gguf")
    assert p.returncode == 1 and name in p.stdout and p.stdout.count("differs") == 1


def test_a_safetensors_file_and_its_re_export(written, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(written["m.safetensors"])  # the safetensors library reads ours...
    tensors["blk.0.attn_k.weight"] = tensors["blk.0.attn_k.weight"].copy()
    tensors["blk.0.attn_k.weight"][0, 0] = np.nan
    save_file(tensors, str(tmp_path / "re.safetensors"))  # ...and writes the re-export (without our config)
    r = diff_models(written["m.safetensors"], tmp_path / "re.safetensors")
    assert r["differing"] == ["blk.0.attn_k.weight"] and r["n_common"] == len(tensors)
    row = next(t for t in r["tensors"] if t["name"] == "blk.0.attn_k.weight")
    assert row["n_mismatched"] == 1 and row["status"] == "differs"
    json.dumps(r, allow_nan=False)


def test_two_training_checkpoints(tmp_path):
    src = fixture_path("llama2c-ckpt.pt")
    ck = torch.load(src, weights_only=True)
    ck["model"]["layers.1.feed_forward.w3.weight"][2, :] *= 1.5
    ck["iter_num"] += 1
    torch.save(ck, tmp_path / "ckpt.pt")
    r = diff_models(src, tmp_path / "ckpt.pt")
    assert r["differing"] == ["blk.1.ffn_up.weight"], format_diff(r)
    p = wconv("diff", "--json", src, tmp_path / "ckpt.pt")
    assert p.returncode == 1 and json.loads(p.stdout)["differing"] == ["blk.1.ffn_up.weight"]


def test_a_pth_and_its_gguf(tmp_path):
    src = fixture_path("meta-tiny")
    out = tmp_path / "m.gguf"
    with _quiet():
        save(load_model(src), out, quiet=True)
    r = diff_models(src, out)
    assert r["ok"] and r["n_common"] == 21, format_diff(r)
    assert {c["a"] + ">" + c["b"] for c in r["dtype_changes"]} == {"BF16>F32"}  # the norms
    assert all(t["identical"] for t in r["tensors"]) and r["n_bit_identical"] == 16
    assert wconv("diff", src, out).returncode == 0


def test_hyperparameters_tokenizer_and_tensor_sets(tmp_path, written, model):
    from wconv.gguf_edit import edit_gguf

    edit_gguf(written["m.gguf"], tmp_path / "ctx.gguf", set=["llama.context_length=77"])
    r = diff_models(written["m.gguf"], tmp_path / "ctx.gguf")
    assert r["ok"] and r["config"] == {"max_seq_len": [32, 77]}
    assert not diff_models(written["m.gguf"], tmp_path / "ctx.gguf", strict=True)["ok"]
    assert wconv("diff", "--strict", written["m.gguf"], tmp_path / "ctx.gguf").returncode == 1

    real = realdata_path("gguf", "ollama_llama-2-tiny-random_f16.gguf")
    edit_gguf(real, tmp_path / "tok.gguf", set=["tokenizer.ggml.bos_token_id=5", "tokenizer.ggml.tokens=" +
                                                json.dumps(["<unk>", "<s>", "</s>X"] + [
                                                    t.decode("utf-8", "replace") for t in
                                                    gguf_io.read(real).tokenizer.tokens[3:]])])
    r = diff_models(real, tmp_path / "tok.gguf")
    assert r["ok"] and r["tokenizer"]["bos_id"] == [1, 5]
    assert r["tokenizer"]["tokens"] == {"n_differing": 1, "first": 2, "a": "</s>", "b": "</s>X"}

    tied = modelgen.random_model(modelgen.llama_config(tie_embeddings=True), seed=11)
    r = diff_models(model, tied)
    assert r["only_in_a"] == ["output.weight"] and r["ok"] and r["config"] == {"tie_embeddings": [False, True]}
    wider = modelgen.random_model(modelgen.llama_config(vocab_size=100), seed=11)
    r = diff_models(model, wider)
    assert not r["ok"] and {c["name"] for c in r["shape_changes"]} == {"token_embd.weight", "output.weight"}


def test_errors_are_one_line_with_exit_2(tmp_path, written):
    for args, message in ((["diff", tmp_path / "nope", written["m.gguf"]], "no such file"),
                          (["diff", written["m.gguf"], written["m.gguf"], "--atol", "-1"], "--atol must be"),
                          (["diff", written["m.gguf"], written["m.gguf"], "--rtol", "nan"], "--rtol must be")):
        p = wconv(*args)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(open(written["m.gguf"], "rb").read()[:5000])
    p = wconv("diff", written["m.gguf"], bad)
    assert p.returncode == 2 and p.stderr.startswith("wconv: error: ") and p.stderr.count("\n") == 1
