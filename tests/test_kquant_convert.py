"""`wconv convert --dtype q4_k_m` (and every other llama.cpp file type) end to end.

Each output written through the CLI is checked against llama.cpp itself: its tensor types and
bytes equal what `llama_model_quantize` (default parameters, no imatrix) makes of the f32 GGUF
of the same model; llama.cpp loads and runs it; `wconv parity` passes. Without llama-cpp-python
the llama.cpp tests skip (they fail under CI=true); the rest run anyway.

Tolerance for llama.cpp's logits vs our reference on the model as written (dequantised),
as max |Δlogit| / max |logit|: llama.cpp quantises activations to Q8_K for k-quant matrix
products, so the bound is the q4_0/q8_0 one of tests/test_llamacpp_interop.py (1e-1); measured
maxima are printed (-s) and listed in docs/gguf.md.
"""
from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest

import modelgen
from clirun import wconv
from test_llamacpp_interop import assert_matches, llama_cpp_logits
from test_quant_mix import llama_quantize, read_gguf, with_edge_rows
from wconv import reference, stream
from wconv.convert.save import save
from wconv.formats import gguf_io
from wconv.quant_mix import Overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "fixtures")

MIXES = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]
LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
RUN_IN_LLAMA_CPP = MIXES + LEGACY  # llama.cpp loads and runs every output
TOL_VS_WRITTEN = 1e-1
TOKENS = [1, 5, 9, 20, 33, 100, 200, 255, 2, 17]


def _write(model, path, dtype="f32"):
    with contextlib.redirect_stderr(io.StringIO()):  # the no-tokenizer note
        gguf_io.write(model, path, quiet=True, dtype=dtype)
    return os.fspath(path)


def _convert(src, out, *args):
    res = wconv("convert", src, out, "-q", "--force", *args)
    assert res.returncode == 0, res.stderr
    return res


@pytest.fixture(scope="module")
def edgy(tmp_path_factory):
    """An 8-layer GQA Llama with rows of 256 and edge rows (zero, constant, outlier, tiny, heavy tails),
    as an f32 GGUF: the byte-identity source."""
    cfg = modelgen.llama_config(dim=256, hidden_dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=256,
                                max_seq_len=64)
    m = with_edge_rows(modelgen.random_model(cfg, seed=41), seed=4)
    return _write(m, tmp_path_factory.mktemp("edgy") / "src.gguf")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A 4-layer GQA Llama of plain random weights (logits of sane size), as safetensors and f32 GGUF."""
    cfg = modelgen.llama_config(dim=256, hidden_dim=512, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256,
                                max_seq_len=64)
    m = modelgen.random_model(cfg, seed=42)
    d = tmp_path_factory.mktemp("plain")
    st = d / "src.safetensors"
    save(m, st, quiet=True)
    return m, os.fspath(st), _write(m, d / "src.gguf")


def assert_same_as_llama_quantize(llama_cpp, ours, src_f32, ftype, overrides=None, tmp=None):
    ref = os.path.join(tmp, f"ref-{ftype}.gguf")
    with contextlib.redirect_stderr(io.StringIO()):
        llama_quantize(llama_cpp, src_f32, ref, ftype, overrides)
    theirs, their_ftype = read_gguf(ref)
    mine, my_ftype = read_gguf(ours)
    assert my_ftype == their_ftype, ftype
    assert set(mine) == set(theirs)
    assert {n: t for n, (t, _) in mine.items()} == {n: t for n, (t, _) in theirs.items()}, ftype
    for name, (t, data) in theirs.items():
        assert mine[name][1].reshape(-1).view(np.uint8).tobytes() == data.reshape(-1).view(np.uint8).tobytes(), \
            (ftype, name, t)
    return {t for t, _ in mine.values()}


# ----------------------------------------------------------------------------- (a) bytes = llama.cpp's
@pytest.mark.interop
@pytest.mark.parametrize("ftype", MIXES + LEGACY)
def test_cli_output_equals_llama_model_quantize(llama_cpp, edgy, tmp_path, ftype):
    out = tmp_path / f"{ftype}.gguf"
    _convert(edgy, out, "--dtype", ftype)
    types = assert_same_as_llama_quantize(llama_cpp, out, edgy, ftype, tmp=tmp_path)
    if ftype in ("q4_k_m", "q5_k_m"):
        assert "Q6_K" in types  # output and the use_more_bits layers


@pytest.mark.interop
def test_from_safetensors_source_equals_llama_model_quantize(llama_cpp, plain, tmp_path):
    """A non-GGUF source (safetensors, canonical names) gives the same file as from its f32 GGUF."""
    _, st, f32 = plain
    out = tmp_path / "st.gguf"
    _convert(st, out, "--dtype", "q4_k_m")
    assert assert_same_as_llama_quantize(llama_cpp, out, f32, "q4_k_m", tmp=tmp_path) >= {"Q4_K", "Q6_K"}


# ----------------------------------------------------------------------------- (b) llama.cpp runs them
@pytest.mark.interop
@pytest.mark.parametrize("ftype", RUN_IN_LLAMA_CPP)
def test_llama_cpp_runs_k_quant_outputs(llama_cpp, plain, tmp_path, ftype):
    model, st, _ = plain
    out = tmp_path / f"{ftype}.gguf"
    _convert(st, out, "--dtype", ftype)
    got = llama_cpp_logits(llama_cpp, out, TOKENS)
    written = reference.forward(gguf_io.read(out), TOKENS, float64=True)
    assert_matches(got, written, TOL_VS_WRITTEN, f"llama.cpp {ftype} vs written")
    source = reference.forward(model, TOKENS, float64=True)
    print(f"{ftype} vs source: {np.abs(got - source).max() / np.abs(source).max():.2e} (quantisation; not bounded)")


# ----------------------------------------------------------------------------- (c) parity, inspect
@pytest.mark.parametrize("ftype", MIXES)
def test_parity_passes_and_inspect_shows_the_types(plain, tmp_path, ftype):
    _, st, _ = plain
    out = tmp_path / f"{ftype}.gguf"
    _convert(st, out, "--dtype", ftype)
    res = wconv("parity", st, out)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "result: OK (judged by the simulated comparison)" in res.stdout
    assert "simulated: max |Δlogit| 0.000e+00" in res.stdout  # the same encoders: exact
    shown = wconv("inspect", out).stdout
    kinds = {"q2_k": "Q2_K", "q3": "Q3_K", "q4": "Q4_K", "q5": "Q5_K", "q6_k": "Q6_K"}
    base = kinds.get(ftype, kinds.get(ftype[:2]))
    assert any(line.split()[:2] == ["blk.1.attn_q.weight", base] for line in shown.splitlines()), shown
    assert any(line.split()[:2] == ["output.weight", "Q6_K"] for line in shown.splitlines())


def test_parity_catches_a_wrong_k_quant_output(plain, tmp_path):
    """Parity is not vacuous: a layer's Q4_K blocks swapped with another's fails the simulated check."""
    _, st, _ = plain
    out = tmp_path / "q.gguf"
    _convert(st, out, "--dtype", "q4_k_m")
    m = gguf_io.read(out)
    a, b = m.tensors["blk.1.attn_q.weight"], m.tensors["blk.2.attn_q.weight"]
    m.tensors["blk.1.attn_q.weight"], m.tensors["blk.2.attn_q.weight"] = b.renamed(a.name), a.renamed(b.name)
    bad = tmp_path / "bad.gguf"
    with contextlib.redirect_stderr(io.StringIO()):
        gguf_io.write(m, bad, quiet=True)
    res = wconv("parity", st, bad)
    assert res.returncode != 0 and "MISMATCH" in res.stdout


# ----------------------------------------------------------------------------- (d) overrides, --pure
@pytest.mark.interop
@pytest.mark.parametrize("args,overrides", [
    (["--output-tensor-type", "q8_0", "--token-embedding-type", "Q6_K"],
     Overrides(output_tensor_type="q8_0", token_embedding_type="q6_k")),
    (["--pure"], Overrides(pure=True)),
    (["--token-embedding-type", "q5_k"], Overrides(token_embedding_type="q5_k")),
])
def test_overrides_and_pure_equal_llama_model_quantize(llama_cpp, edgy, tmp_path, args, overrides):
    for ftype in ("q4_k_m", "q3_k_m"):
        out = tmp_path / f"{ftype}.gguf"
        _convert(edgy, out, "--dtype", ftype, *args)
        assert_same_as_llama_quantize(llama_cpp, out, edgy, ftype, overrides, tmp=tmp_path)


def test_pure_and_overrides_types(plain, tmp_path):
    _, st, _ = plain
    out = tmp_path / "p.gguf"
    _convert(st, out, "--dtype", "q4_k_m", "--pure")
    types = {t.dtype.name for t in gguf_io.read(out) if len(t.shape) == 2}
    assert types == {"Q4_K"}
    _convert(st, out, "--dtype", "q6_k", "--output-tensor-type", "q8_0")
    m = gguf_io.read(out)
    assert m["output.weight"].dtype.name == "Q8_0" and m["blk.0.attn_v.weight"].dtype.name == "Q6_K"


@pytest.mark.parametrize("args,out_name,message", [
    (["--pure"], "o.gguf", "apply to a quantised --dtype"),
    (["--dtype", "f16", "--output-tensor-type", "q8_0"], "o.gguf", "apply to a quantised --dtype"),
    (["--pure", "--dtype", "q4_k_m"], "o.safetensors", "--pure does not apply to safetensors output"),
    (["--dtype", "q4_k_m", "--token-embedding-type", "q8_0"], "o.bin", "does not apply to llama2c output"),
    (["--dtype", "q4_k_m"], "o.ggjt", "k-quant mix, which GGJT output does not take"),
    (["--dtype", "Q6_K"], "o.ggjt", "k-quant mix, which GGJT output does not take"),
    (["--dtype", "q4_k_m", "--output-tensor-type", "q4_k"], "o.gguf", "row length 96"),
])
def test_refusals_are_one_line(tmp_path, args, out_name, message):
    src = tmp_path / "s.safetensors"
    save(modelgen.random_model(modelgen.llama_config()), src, quiet=True)  # rows of 64 and 160
    if out_name == "o.gguf" and "row length 96" in message:
        src = tmp_path / "v.safetensors"
        save(modelgen.random_model(modelgen.llama_config(dim=96, hidden_dim=256, n_heads=4, n_kv_heads=2)), src,
             quiet=True)
    res = wconv("convert", src, tmp_path / out_name, *args)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert not os.path.exists(tmp_path / out_name)


# ----------------------------------------------------------------------------- (e) GPT-2, other architectures
@pytest.mark.interop
def test_gpt2_fused_qkv_to_q4_k_m(llama_cpp, tmp_path):
    """GPT-2's attn_qkv takes the attn_v rules (Q6_K on the use_more_bits layers); llama.cpp runs it."""
    cfg = modelgen.gpt2_config(dim=256, hidden_dim=1024, n_layers=8, n_heads=4, n_kv_heads=4, vocab_size=256,
                               max_seq_len=64)
    m = modelgen.random_model(cfg, seed=7)
    f32 = _write(m, tmp_path / "g.gguf")
    out = tmp_path / "g-q4km.gguf"
    _convert(f32, out, "--dtype", "q4_k_m")
    assert_same_as_llama_quantize(llama_cpp, out, f32, "q4_k_m", tmp=tmp_path)
    written = gguf_io.read(out)
    assert [written[f"blk.{i}.attn_qkv.weight"].dtype.name for i in range(8)] == \
        ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert written["position_embd.weight"].dtype.name == "F32"  # never quantised
    assert written["token_embd.weight"].dtype.name == "Q6_K"  # tied: it is the output
    got = llama_cpp_logits(llama_cpp, out, TOKENS)
    assert_matches(got, reference.forward(written, TOKENS, float64=True), TOL_VS_WRITTEN, "gpt2 q4_k_m vs written")


@pytest.mark.interop
@pytest.mark.parametrize("fixture", ["nanogpt-ckpt.pt", "arch/hf-qwen2-tiny", "arch/hf-gemma-tiny",
                                     "arch/hf-mistral-nosw", "arch/hf-llama32-tied", "hf-llama-tiny"])
def test_fixtures_to_q4_k_m_equal_llama_model_quantize_and_run(llama_cpp, tmp_path, fixture):
    """Every architecture the GGUF writer has (tiny fixtures: rows below 256, so the fallbacks decide)."""
    src = os.path.join(FIXTURES, fixture)
    f32 = tmp_path / "f32.gguf"
    _convert(src, f32, "--dtype", "f32")
    out = tmp_path / "q.gguf"
    _convert(src, out, "--dtype", "q4_k_m")
    assert_same_as_llama_quantize(llama_cpp, out, f32, "q4_k_m", tmp=tmp_path)
    written = gguf_io.read(out)
    toks = [1, 3, 7, 11, 20]
    got = llama_cpp_logits(llama_cpp, out, toks)
    assert_matches(got, reference.forward(written, toks, float64=True), TOL_VS_WRITTEN, f"{fixture} q4_k_m")


# ----------------------------------------------------------------------------- (f) quantised source
def test_q8_0_source_to_q4_k_m_is_dequantised_with_one_loud_line(plain, tmp_path):
    from wconv import codecs

    _, st, _ = plain
    q8 = tmp_path / "q8.gguf"
    _convert(st, q8, "--dtype", "q8_0")
    src = gguf_io.read(q8)
    n_q8 = sum(t.dtype.name == "Q8_0" for t in src)
    out = tmp_path / "q4km.gguf"
    res = wconv("convert", q8, out, "--dtype", "q4_k_m")
    assert res.returncode == 0, res.stderr
    loud = [line for line in res.stderr.splitlines() if "dequantised" in line]
    assert loud == [f"wconv: warning: {q8}: {n_q8} Q8_0 tensors dequantised and re-quantised to q4_k_m "
                    "(Q4_K, Q6_K); quality is lower than quantising the original f16/f32 weights"], res.stderr
    written = gguf_io.read(out)
    for name in ("blk.0.attn_q.weight", "output.weight"):
        t = written[name]
        assert t.raw().tobytes() == codecs.get(t.dtype).encode(src[name].float32()).tobytes()
    res = wconv("parity", q8, out)
    assert res.returncode == 0 and "judged by the simulated" in res.stdout, res.stdout


def test_same_type_tensors_are_copied_not_requantised(plain, tmp_path):
    _, st, _ = plain
    q6 = tmp_path / "q6.gguf"
    _convert(st, q6, "--dtype", "q6_k")
    out = tmp_path / "again.gguf"
    res = wconv("convert", q6, out, "--dtype", "q6_k")
    assert res.returncode == 0 and "dequantised" not in res.stderr, res.stderr
    a, b = gguf_io.read(q6), gguf_io.read(out)
    for name, t in a.tensors.items():
        assert b[name].dtype == t.dtype and b[name].raw().tobytes() == t.raw().tobytes()


# ----------------------------------------------------------------------------- (g) names, (h) threads
def test_dtype_names_are_case_insensitive(plain, tmp_path):
    _, st, _ = plain
    files = []
    for spelling in ("q4_k_m", "Q4_K_M", "q4_K_m"):
        out = tmp_path / f"{spelling}.gguf"
        _convert(st, out, "--dtype", spelling)
        files.append(out.read_bytes())
    assert files[0] == files[1] == files[2]
    assert gguf_io.read(tmp_path / "Q4_K_M.gguf").metadata["general.file_type"] == 15
    res = wconv("convert", st, tmp_path / "x.gguf", "--dtype", "q4_k")  # not a llama.cpp file type
    assert res.returncode != 0 and "q4_k_m" in res.stderr


def test_threads_and_piece_size_do_not_change_the_bytes(plain, tmp_path, monkeypatch):
    _, st, _ = plain
    outs = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}.gguf"
        _convert(st, out, "--dtype", "q3_k_m", "--threads", threads)
        outs.append(out.read_bytes())
    monkeypatch.setattr(stream, "PIECE_ELEMENTS", 4096)  # many pieces per tensor, split mid-tensor
    out = tmp_path / "small.gguf"
    _convert(st, out, "--dtype", "q3_k_m", "--threads", "2")
    assert outs[0] == outs[1] == out.read_bytes()


def test_dry_run_and_ftype_template(plain, tmp_path):
    _, st, _ = plain
    res = wconv("convert", st, tmp_path / "m-{ftype}.gguf", "--dtype", "q5_k_m")
    assert res.returncode == 0, res.stderr
    assert os.path.exists(tmp_path / "m-q5_k_m.gguf")
