"""llama.cpp (through llama-cpp-python) loads the GGUF files we write and agrees with our reference.

For each model we write GGUF, load it with llama_cpp.Llama, evaluate token ids and
compare llama.cpp's logits with wconv.reference.forward (float64) on the SOURCE
model and on the model as written (dequantised). llama.cpp runs with an F32 KV
cache: its default F16 cache alone adds ~5e-4 (relative) to every comparison.

Tolerances, as max |Δlogit| / max |logit of the source| (measured maxima over
random models and prompts in brackets; see docs/gguf.md):
  f32  llama 1e-4 [4e-7]; gpt2 2e-3 [4e-4]: llama.cpp's CPU GELU reads an F16 lookup table
  f16  vs written 5e-3 [1.1e-3], vs source 1e-2 [2.0e-3]
  bf16 vs written 3e-2 [9.3e-3], vs source 5e-2 [1.1e-2]: llama.cpp rounds activations to bf16
  q8_0 vs written 1e-1 [3.7e-2], vs source 1e-1 [3.6e-2]: llama.cpp quantises activations to Q8_0
  q4_0 vs written 1e-1 [2.7e-2]; vs source no bound (4-bit weights: 0.45 on random models)
A wrong layout (transposed matrix, other rotary pairing, wrong block order) gives
errors of the order of the logits themselves. Top-1 must agree wherever the
reference's top-1/top-2 margin exceeds twice the tolerance.

Without llama-cpp-python these tests skip, except under CI=true, where they fail.
"""
from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest

import modelgen
from wconv import reference
from wconv.convert.load import load_model
from wconv.convert.save import convert, save
from wconv.formats import ggml_legacy, gguf_io

pytestmark = pytest.mark.interop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "fixtures")

TOL_VS_WRITTEN = {"f32": 1e-4, None: 1e-4, "f16": 5e-3, "bf16": 3e-2, "q8_0": 1e-1, "q4_0": 1e-1,
                  "q4_1": 1e-1, "q5_0": 1e-1, "q5_1": 1e-1}
TOL_VS_SOURCE = {"f32": 1e-4, None: 1e-4, "f16": 1e-2, "bf16": 5e-2, "q8_0": 1e-1, "q4_0": None,
                 "q4_1": None, "q5_0": None, "q5_1": None}
GPT2_F32_TOL = 2e-3  # GELU through an F16 table
DTYPES = ["f32", "f16", "bf16", "q8_0", "q4_0"]


def llama_cpp_logits(llama_cpp, path, tokens) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=os.fspath(path), logits_all=True, n_ctx=64, n_batch=64, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    try:
        llm.eval(list(tokens))
        return np.array(llm.scores[:len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def write_gguf(model, tmp_path, dtype=None, name="m.gguf"):
    path = os.path.join(tmp_path, name)
    with contextlib.redirect_stderr(io.StringIO()):  # the no-tokenizer / fallback notes
        gguf_io.write(model, path, quiet=True, dtype=dtype)
    return path


def rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def assert_matches(got, want, tol, label):
    err = rel_err(got, want)
    print(f"{label}: max |Δlogit| / max |logit| = {err:.2e} (tolerance {tol:.0e})")
    assert err <= tol, label
    scale = np.abs(want).max()
    s = np.sort(want, axis=-1)
    decided = (s[:, -1] - s[:, -2]) > 2 * tol * scale
    assert np.array_equal(got.argmax(-1)[decided], want.argmax(-1)[decided]), label
    return err


def check(llama_cpp, model, tokens, tmp_path, dtype, *, f32_tol=TOL_VS_WRITTEN["f32"], label=""):
    path = write_gguf(model, tmp_path, dtype)
    got = llama_cpp_logits(llama_cpp, path, tokens)
    source = reference.forward(model, tokens, float64=True)
    written = reference.forward(gguf_io.read(path), tokens, float64=True)
    label = f"{label} {dtype}"
    if dtype in ("f32", None):
        assert_matches(got, source, f32_tol, label + " vs source")
        return
    assert_matches(got, written, TOL_VS_WRITTEN[dtype], label + " vs written")
    if TOL_VS_SOURCE[dtype] is not None:
        assert_matches(got, source, TOL_VS_SOURCE[dtype], label + " vs source")
    else:
        print(f"{label} vs source: {rel_err(got, source):.2e} (4-bit weights; not bounded)")


# ----------------------------------------------------------------------------- random models
@pytest.fixture(scope="module")
def spm_llama(realdata_module):
    """Llama GQA model, 32000-token Llama 2 vocabulary (sentencepiece reader), separate classifier."""
    from wconv.formats import sentencepiece

    tok = sentencepiece.read(realdata_module("llama2c", "tokenizer.model"))
    m = modelgen.random_model(modelgen.llama_config(vocab_size=len(tok.tokens)), seed=1)
    m.tokenizer = tok
    return m


@pytest.fixture(scope="module")
def realdata_module():
    from conftest import realdata_path

    return realdata_path


@pytest.mark.parametrize("dtype", DTYPES)
def test_llama_gqa_real_vocab(llama_cpp, spm_llama, tmp_path, dtype):
    check(llama_cpp, spm_llama, [1, 15043, 3186, 29892, 920, 526, 366, 29973, 13, 450], tmp_path, dtype,
          label="llama gqa spm")


@pytest.mark.parametrize("dtype", DTYPES)
def test_llama_tied_classifier_no_vocab(llama_cpp, tmp_path, dtype):
    m = modelgen.random_model(modelgen.llama_config(tie_embeddings=True, n_kv_heads=4, rope_theta=500000.0), seed=2)
    check(llama_cpp, m, [3, 17, 42, 88, 5, 61, 60, 2, 95, 0], tmp_path, dtype, label="llama tied")


@pytest.fixture(scope="module")
def gpt2_model(realdata_module):
    vocab = gguf_io.read(realdata_module("gguf", "ggml-vocab-gpt-2.gguf")).tokenizer
    m = modelgen.random_model(modelgen.gpt2_config(vocab_size=len(vocab.tokens), dim=64, hidden_dim=256), seed=3)
    m.tokenizer = vocab
    return m


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpt2_with_gpt2_vocab(llama_cpp, gpt2_model, tmp_path, dtype):
    check(llama_cpp, gpt2_model, [15496, 995, 11, 703, 389, 345, 30, 198, 464, 50256], tmp_path, dtype,
          f32_tol=GPT2_F32_TOL, label="gpt2")


@pytest.mark.parametrize("dtype", ["q4_1", "q5_0", "q5_1"])
def test_llama_more_legacy_quant_types(llama_cpp, spm_llama, tmp_path, dtype):
    """Q4_1/Q5_0/Q5_1 (wconv.blockquant): llama.cpp loads them and computes what our dequantised
    weights compute; file type and tensor types are the requested ones."""
    check(llama_cpp, spm_llama, [1, 15043, 3186, 29892, 920, 526, 366, 29973, 13, 450], tmp_path, dtype,
          label="llama gqa spm")
    written = gguf_io.read(os.path.join(tmp_path, "m.gguf"))
    assert written["blk.0.attn_q.weight"].dtype.name == dtype.upper()
    assert written.metadata["general.file_type"] == {"q4_1": 3, "q5_0": 8, "q5_1": 9}[dtype]


def test_gpt2_no_vocab_untied(llama_cpp, tmp_path):
    m = modelgen.random_model(modelgen.gpt2_config(tie_embeddings=False), seed=4)
    check(llama_cpp, m, [1, 2, 3, 79, 40, 41], tmp_path, "f32", f32_tol=GPT2_F32_TOL, label="gpt2 untied")


# ----------------------------------------------------------------------------- vocabularies
def test_llama_cpp_tokenises_our_vocab_like_its_own(llama_cpp, spm_llama, realdata_module, tmp_path):
    ours = llama_cpp.Llama(model_path=write_gguf(spm_llama, tmp_path), vocab_only=True, verbose=False)
    theirs = llama_cpp.Llama(model_path=realdata_module("gguf", "ggml-vocab-llama-spm.gguf"), vocab_only=True,
                             verbose=False)
    for text in [b"Hello world, how are you?", b"  leading spaces\nand\ttabs", "naïve café 東京 🦙".encode()]:
        assert ours.tokenize(text) == theirs.tokenize(text)
        ids = theirs.tokenize(text, add_bos=False)
        assert ours.detokenize(ids) == theirs.detokenize(ids)


def test_llama_cpp_tokenises_our_gpt2_vocab_like_its_own(llama_cpp, gpt2_model, realdata_module, tmp_path):
    ours = llama_cpp.Llama(model_path=write_gguf(gpt2_model, tmp_path), vocab_only=True, verbose=False)
    theirs = llama_cpp.Llama(model_path=realdata_module("gguf", "ggml-vocab-gpt-2.gguf"), vocab_only=True,
                             verbose=False)
    for text in [b"Hello world, how are you?", b"It's 2024 -- 100% sure!\n\n", "naïve café".encode()]:
        assert ours.tokenize(text, add_bos=False) == theirs.tokenize(text, add_bos=False)


# ----------------------------------------------------------------------------- real and fixture models
def test_real_ollama_gguf_rewritten_is_identical_to_llama_cpp(llama_cpp, realdata_module, tmp_path):
    src = realdata_module("gguf", "ollama_llama-2-tiny-random_f16.gguf")
    tokens = [1, 450, 4996, 17354, 1701, 29916, 432, 17204]
    original = llama_cpp_logits(llama_cpp, src, tokens)
    copy = os.path.join(tmp_path, "copy.gguf")
    save(gguf_io.read(src), copy, quiet=True)
    np.testing.assert_array_equal(llama_cpp_logits(llama_cpp, copy, tokens), original)
    assert_matches(original, reference.forward(gguf_io.read(src), tokens, float64=True), 5e-3,
                   "ollama f16 (llama.cpp's own reading) vs reference")


FIXTURE_MODELS = ["meta-tiny", "meta-tiny-2shard", "meta-tiny-f16", "hf-llama-tiny", "hf-llama-tiny-bin",
                  "llama2c-ckpt.pt", "nanogpt-ckpt.pt"]


@pytest.mark.parametrize("fixture", FIXTURE_MODELS)
def test_fixture_checkpoints_convert_for_llama_cpp(llama_cpp, tmp_path, fixture):
    src = os.path.join(FIXTURES, fixture)
    if not os.path.exists(src):
        pytest.skip(f"{src} not generated")
    model = load_model(src)
    out = os.path.join(tmp_path, "out.gguf")
    with contextlib.redirect_stderr(io.StringIO()):
        convert(src, out, quiet=True)
    tokens = list(np.random.default_rng(5).integers(0, model.config.vocab_size, 12))
    got = llama_cpp_logits(llama_cpp, out, tokens)
    want = reference.forward(model, tokens, float64=True)
    source_types = {t.dtype.name for t in model if len(t.shape) == 2}
    tol = {"F32": 1e-4, "F16": TOL_VS_WRITTEN["f16"], "BF16": TOL_VS_WRITTEN["bf16"]}[source_types.pop()]
    if model.config.arch == "gpt2":
        tol = max(tol, GPT2_F32_TOL)
    assert_matches(got, want, tol, f"{fixture} (kept {model['token_embd.weight'].dtype.name}) vs source")


def test_ggjt_upgraded_to_gguf_loads(llama_cpp, spm_llama, tmp_path):
    old = os.path.join(tmp_path, "old.ggjt")
    with contextlib.redirect_stderr(io.StringIO()):
        ggml_legacy.write_ggjt(spm_llama, old, quiet=True, dtype="q8_0")
        new = os.path.join(tmp_path, "new.gguf")
        convert(old, new, quiet=True, max_seq_len=64)
    tokens = [1, 15043, 3186, 29892, 920, 526]
    got = llama_cpp_logits(llama_cpp, new, tokens)
    upgraded = gguf_io.read(new)
    assert upgraded.config.norm_eps == ggml_legacy.NORM_EPS_ASSUMED  # not stored in ggjt
    assert_matches(got, reference.forward(upgraded, tokens, float64=True), TOL_VS_WRITTEN["q8_0"],
                   "ggjt q8_0 -> gguf vs written")
    legacy = ggml_legacy.read(old)
    for name, t in upgraded.tensors.items():  # quantised blocks carried over unchanged
        if t.dtype.quantized:
            assert t.raw().tobytes() == legacy[name].raw().tobytes()


# ----------------------------------------------------------------------------- llama.cpp's own quantiser
def llama_cpp_quantize(llama_cpp, src, dst, ftype_name):
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    assert llama_cpp.llama_model_quantize(os.fspath(src).encode(), os.fspath(dst).encode(), ctypes.byref(params)) == 0


@pytest.fixture(scope="module")
def quant_source(tmp_path_factory):
    m = modelgen.random_model(modelgen.llama_config(dim=256, hidden_dim=512, vocab_size=512, n_heads=4,
                                                    n_kv_heads=2), seed=6)
    return m, write_gguf(m, tmp_path_factory.mktemp("quant"), name="src.gguf")


@pytest.mark.parametrize("ftype,dtype", [("F16", "f16"), ("BF16", "bf16"), ("Q8_0", "q8_0"), ("Q4_0", "q4_0")])
def test_our_bytes_equal_llama_cpp_quantize(llama_cpp, quant_source, tmp_path, ftype, dtype):
    """llama.cpp's `llama-quantize` of our f32 file and our own --dtype output hold identical tensors."""
    model, src = quant_source
    theirs_path = os.path.join(tmp_path, "theirs.gguf")
    llama_cpp_quantize(llama_cpp, src, theirs_path, ftype)
    theirs, ours = gguf_io.read(theirs_path), gguf_io.read(write_gguf(model, tmp_path, dtype, "ours.gguf"))
    assert set(theirs.tensors) == set(ours.tensors)
    for name, t in theirs.tensors.items():  # Q4_0 included: llama.cpp's recipe (output.weight Q6_K) is ours
        assert t.dtype == ours[name].dtype, name
        assert t.raw().tobytes() == ours[name].raw().tobytes(), name


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q6_K", "Q5_0", "Q4_1", "Q3_K_M", "Q2_K", "IQ4_NL"])
def test_we_read_llama_cpp_quantised_files(llama_cpp, quant_source, tmp_path, ftype):
    """Files quantised by llama.cpp (k-quants, IQ4_NL...): our reader + gguf-py dequantisation agree
    with llama.cpp's own evaluation (activation rounding only: measured 1.3e-2 to 2.8e-2 of the logit scale)."""
    _, src = quant_source
    path = os.path.join(tmp_path, "q.gguf")
    llama_cpp_quantize(llama_cpp, src, path, ftype)
    model = gguf_io.read(path)
    assert model.metadata["general.file_type"] == getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    assert any(t.dtype.quantized and t.dtype.name not in ("Q8_0", "Q4_0") for t in model)
    tokens = [1, 5, 9, 20, 33, 300, 511, 2]
    assert_matches(llama_cpp_logits(llama_cpp, path, tokens), reference.forward(model, tokens, float64=True),
                   TOL_VS_WRITTEN["q4_0"], f"llama.cpp {ftype} file vs our reading")


@pytest.mark.parametrize("name", ["stories260K.bin", "out440k_v2_int8.bin"])
def test_real_llama2c_exports_convert_for_llama_cpp(llama_cpp, realdata_module, tmp_path, name):
    """Real llama2.c exports (fp32 v0 with GQA; int8 v2, dequantised on read) -> GGUF f32 -> llama.cpp."""
    src = realdata_module("llama2c", name)
    model = load_model(src)
    out = os.path.join(tmp_path, "out.gguf")
    with contextlib.redirect_stderr(io.StringIO()):
        convert(src, out, quiet=True, dtype="f32")
    tokens = [1, 5, 9, 20, 33, 100, 200, 300, 400, 500]
    assert_matches(llama_cpp_logits(llama_cpp, out, tokens), reference.forward(model, tokens, float64=True),
                   TOL_VS_WRITTEN["f32"], f"{name} vs source")
