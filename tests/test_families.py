"""Architecture families (wconv/arch/) end to end, against their real consumers.

Fixtures: fixtures/arch/, made by transformers itself (fixtures/make_arch_fixtures.py) with
large random weights, plus a Meta-format Llama 3.1 directory. For every family:

* the numpy reference matches transformers (float64, eager attention) over a 56-token prompt:
  logits within 1e-4 of the logit scale, argmax equal at every position;
* llama.cpp (llama-cpp-python, F32 KV cache) on our f32 GGUF matches transformers within 1e-4
  of the logit scale - Gemma within GELU_TOL, because llama.cpp's CPU GeGLU reads an F16 table;
  a reference that rounds GELU the same way matches llama.cpp to 1e-4, so nothing else differs;
* transformers loads our `--to hf` output and gives the same logits as on the source (1e-5),
  and so it does on the HF directory converted back from our GGUF;
* `wconv parity` between the source and each output passes; safetensors round-trips;
* each fixture's special feature (RoPE scaling band, window, biases, norm convention, embedding
  scale) moves the logits by far more than the tolerances, so the checks above can fail.

Families wconv does not implement (Granite, Cohere, Phi-3, MoE, Gemma 2) and config fields that
change the math are refused in one line naming them. Measured numbers: docs/gguf.md.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import wconv
from helpers import hf_permute
from wconv import arch, nn, reference
from wconv.arch.decoder import llama3_from_factors
from wconv.arch.family import Problems
from wconv.arch.llama import META_SCALED_ROPE
from wconv.convert.load import load_model
from wconv.convert.save import convert
from wconv.errors import UnsupportedError
from wconv.formats import gguf_io
from test_llamacpp_interop import llama_cpp_logits  # (the F32-cache runner)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures", "arch")
PROMPT_LEN = 56  # > every fixture's scaled-RoPE original context and Mistral's window
TOL = 1e-4  # max |Δlogit| / max |logit|
HF_TOL = 1e-5  # transformers on our HF output vs transformers on the source
GELU_TOL = 2e-3  # llama.cpp's F16 GELU table (measured 4.7e-4 on hf-gemma-tiny)
HF_FIXTURES = ["hf-llama31-tiny", "hf-llama32-tied", "hf-mistral-sw16", "hf-mistral-nosw", "hf-qwen2-tiny",
               "hf-qwen2-tied", "hf-gemma-tiny"]
ALL_FIXTURES = HF_FIXTURES + ["meta-llama31-tiny"]
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM", "GPT2LMHeadModel")


@pytest.fixture(scope="module")
def transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def prompt(vocab: int, bos: int = 1, n: int = PROMPT_LEN) -> list:
    return [bos] + [int(t) for t in np.random.default_rng(11).integers(3, vocab, n - 1)]


def rel(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def quiet(fn, *args, **kw):
    """fn(*args, **kw) with stderr captured: (result, warnings text)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out = fn(*args, **kw)
    return out, err.getvalue()


@functools.lru_cache(maxsize=None)
def _hf_logits(directory, tokens, dtype_name, overrides):
    import transformers

    transformers.logging.set_verbosity_error()
    dtype = getattr(torch, dtype_name)
    m = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="eager",
                                                          **dict(overrides)).eval()
    with torch.no_grad():
        return m(torch.tensor([list(tokens)])).logits[0].double().numpy()


def hf_logits(directory, tokens, dtype="float64", **overrides) -> np.ndarray:
    """transformers' logits (eager attention; float64 is the truth the others are held to)."""
    return _hf_logits(os.fspath(directory), tuple(tokens), dtype, tuple(sorted(overrides.items())))


def report(label, err, tol):
    print(f"{label}: max |Δlogit| / max |logit| = {err:.2e} (tolerance {tol:.0e})")
    assert err <= tol, label


@functools.lru_cache(maxsize=None)
def source(name):
    return load_model(os.path.join(FIX, name))


def tokens_for(name):
    m = source(name)
    return prompt(m.config.vocab_size, bos=2 if m.config.arch == "gemma" else 1)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """name -> {format: path} of each fixture converted once (f32 GGUF, HF dir, safetensors)."""
    base = tmp_path_factory.mktemp("families")
    made = {}

    def get(name, fmt):
        key = (name, fmt)
        if key not in made:
            src = os.path.join(FIX, name)
            out = os.path.join(base, f"{name}.{fmt}")
            opts = {"dtype": "f32"} if fmt == "gguf" else {}
            _, made[(name, fmt, "warnings")] = quiet(convert, src, out, to=fmt, quiet=True, **opts)
            made[key] = out
        return made[key]

    get.warnings = lambda name, fmt: (get(name, fmt), made[(name, fmt, "warnings")])[1]
    return get


@functools.lru_cache(maxsize=None)
def meta_equivalent_dir(tmp_root):
    """The Meta fixture converted to HF the way transformers' convert_llama_weights_to_hf.py does it
    for Llama 3.1 (q/k rows permuted per head, llama3 rope_scaling 8 / 1 / 4 / 8192), built with torch
    and transformers only."""
    import transformers

    src = os.path.join(FIX, "meta-llama31-tiny")
    params = json.load(open(os.path.join(src, "params.json")))
    sd = torch.load(os.path.join(src, "consolidated.00.pth"), map_location="cpu", weights_only=True)
    dim, n_heads, n_kv = params["dim"], params["n_heads"], params["n_kv_heads"]

    hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
    cfg = transformers.LlamaConfig(
        hidden_size=dim, intermediate_size=hidden, num_attention_heads=n_heads, num_key_value_heads=n_kv,
        num_hidden_layers=params["n_layers"], vocab_size=params["vocab_size"], rms_norm_eps=params["norm_eps"],
        max_position_embeddings=131072, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": params["rope_theta"], "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    hf = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
          "lm_head.weight": sd["output.weight"]}
    for i in range(params["n_layers"]):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        hf.update({
            q + "self_attn.q_proj.weight": hf_permute(sd[p + "attention.wq.weight"], n_heads),
            q + "self_attn.k_proj.weight": hf_permute(sd[p + "attention.wk.weight"], n_kv),
            q + "self_attn.v_proj.weight": sd[p + "attention.wv.weight"],
            q + "self_attn.o_proj.weight": sd[p + "attention.wo.weight"],
            q + "mlp.gate_proj.weight": sd[p + "feed_forward.w1.weight"],
            q + "mlp.down_proj.weight": sd[p + "feed_forward.w2.weight"],
            q + "mlp.up_proj.weight": sd[p + "feed_forward.w3.weight"],
            q + "input_layernorm.weight": sd[p + "attention_norm.weight"],
            q + "post_attention_layernorm.weight": sd[p + "ffn_norm.weight"],
        })
    model = transformers.LlamaForCausalLM(cfg)
    model.load_state_dict({k: v.float() for k, v in hf.items()}, strict=True)
    out = os.path.join(tmp_root, "meta-equivalent-hf")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def truth_dir(tmp_path_factory):
    """name -> the HF directory transformers' truth is computed on (the Meta fixture's equivalent)."""
    root = os.fspath(tmp_path_factory.mktemp("meta-eq"))

    def get(name):
        return meta_equivalent_dir(root) if name.startswith("meta") else os.path.join(FIX, name)
    return get


def truth(truth_dir, name, tokens, **overrides):
    return hf_logits(truth_dir(name), tokens, **overrides)


# --- reference vs transformers -----------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_reference_matches_transformers(transformers, truth_dir, name):
    toks = tokens_for(name)
    want = truth(truth_dir, name, toks)
    got = reference.forward(source(name), toks, float64=True)
    report(f"{name} reference vs transformers", rel(got, want), TOL)
    assert np.array_equal(got.argmax(-1), want.argmax(-1)), name


def _knocked_out(name):
    """(what, model) - the fixture with its distinguishing feature removed."""
    m = source(name)
    c = copy.deepcopy(m.config)
    tensors = dict(m.tensors)
    fam = arch.require(c.arch)
    if c.rope_scaling:
        c.rope_scaling = None
        what = "without RoPE scaling"
    elif c.sliding_window:
        c.sliding_window = 0
        what = "without the sliding window"
    elif fam.qkv_bias:
        tensors = {n: t for n, t in tensors.items()}
        for n in [n for n in tensors if n.endswith(".bias")]:
            tensors[n] = tensors[n].derive(lambda a: np.zeros_like(a), float_input=True)
        what = "with zero q/k/v biases"
    elif fam.norm_plus_one:
        for n in [n for n in tensors if n.endswith("norm.weight")]:
            tensors[n] = tensors[n].derive(lambda a: a - np.float32(1), float_input=True)
        what = "with HF's norm weights used as stored (w instead of 1 + w)"
    elif c.head_width:
        what = "in HF q/k row order (rotary pairs wrong)"  # Mistral NeMo-style: check the permutation
        for n in [n for n in tensors if n.endswith(("attn_q.weight", "attn_k.weight"))]:
            heads = c.n_heads if "attn_q" in n else c.n_kv_heads
            tensors[n] = tensors[n].derive(lambda a, h=heads: hf_permute(a, h), float_input=True)
    else:
        raise AssertionError(f"{name} has no feature to knock out")
    return what, wconv.Model(config=c, tensors=tensors, path=m.path)


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_fixture_features_matter(transformers, truth_dir, name):
    """The feature each fixture exists for moves the logits by far more than every tolerance."""
    toks = tokens_for(name)
    what, model = _knocked_out(name)
    err = rel(reference.forward(model, toks, float64=True), truth(truth_dir, name, toks))
    print(f"{name} {what}: {err:.2e}")
    assert err > 100 * (GELU_TOL if model.config.arch == "gemma" else TOL), (name, what, err)


def test_gemma_embedding_scale_and_activation_matter(transformers):
    toks = tokens_for("hf-gemma-tiny")
    want = hf_logits(os.path.join(FIX, "hf-gemma-tiny"), toks)
    fam = arch.require("gemma")
    model = source("hf-gemma-tiny")
    for attr, value in (("embed_scale", False), ("activation", "silu")):
        other = copy.copy(fam)
        setattr(other, attr, value)
        err = rel(other.forward(model, np.array(toks), np.float64), want)
        print(f"gemma with {attr}={value}: {err:.2e}")
        assert err > 100 * TOL


# --- llama.cpp ---------------------------------------------------------------------------------

def _ggml_geglu_gelu(x, dt):
    """GELU as llama.cpp's CPU GeGLU computes it: input rounded to F16, F16 table of tanh-GELU."""
    x32 = np.asarray(x, dtype=np.float32)
    h = x32.astype(np.float16).astype(np.float32)
    y = (np.float32(0.5) * h * (np.float32(1) + np.tanh(np.float32(0.7978845608028654) * h *
                                                          (np.float32(1) + np.float32(0.044715) * h * h))))
    y = y.astype(np.float16).astype(np.float32)
    return np.where(x32 <= -10, 0, np.where(x32 >= 10, x32, y)).astype(dt)


@pytest.mark.interop
@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_llama_cpp_matches_transformers(llama_cpp, transformers, truth_dir, outputs, monkeypatch, name):
    toks = tokens_for(name)
    got = llama_cpp_logits(llama_cpp, outputs(name, "gguf"), toks)
    m = source(name)
    if m.config.sliding_window:
        # llama.cpp attends over everything: equal to transformers without the window, and to
        # transformers with it up to the window (the warning says so)
        report(f"{name} llama.cpp vs transformers (full attention)", rel(got, truth(truth_dir, name, toks,
                                                                                 sliding_window=None)), TOL)
        w = m.config.sliding_window
        report(f"{name} llama.cpp vs transformers (first {w} positions)",
               rel(got[:w], truth(truth_dir, name, toks)[:w]), TOL)
        assert "sliding_window 16: llama.cpp attends over the whole context" in outputs.warnings(name, "gguf")
        assert rel(got, truth(truth_dir, name, toks)) > 0.1  # and it really differs beyond
        return
    want = truth(truth_dir, name, toks)
    if m.config.arch == "gemma":
        report(f"{name} llama.cpp vs transformers (F16 GELU table)", rel(got, want), GELU_TOL)
        monkeypatch.setattr(nn, "gelu_tanh", _ggml_geglu_gelu)
        emulated = reference.forward(m, toks, float64=True)
        # Rounding the same way leaves most positions at float32 noise; the rest carry an occasional
        # gate value that lands on the other side of an F16 rounding boundary (measured: 45 of 56
        # positions <= 4e-6, the others <= 1.2e-4).
        per_position = np.abs(got - emulated).max(-1) / np.abs(emulated).max()
        print(f"{name} llama.cpp vs reference with llama.cpp's GELU rounding: median {np.median(per_position):.1e}, "
              f"max {per_position.max():.1e}")
        assert np.mean(per_position <= 1e-5) >= 2 / 3 and per_position.max() <= 3e-4
        return
    report(f"{name} llama.cpp vs transformers", rel(got, want), TOL)
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


# --- Hugging Face outputs ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_hf_output_gives_transformers_the_same_logits(transformers, truth_dir, outputs, name):
    toks = tokens_for(name)
    out = outputs(name, "hf")
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == [arch.require(source(name).config.arch).hf_class]
    want = hf_logits(truth_dir(name), toks, "float32")
    report(f"{name} transformers on --to hf vs on the source", rel(hf_logits(out, toks, "float32"), want), HF_TOL)


@pytest.mark.interop
@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_gguf_back_to_hf(transformers, truth_dir, outputs, tmp_path, name):
    """GGUF -> HF: the family (and its RoPE scaling, window, biases, norm convention) comes back."""
    toks = tokens_for(name)
    out = os.path.join(tmp_path, "back")
    quiet(convert, outputs(name, "gguf"), out, to="hf", quiet=True)
    config = json.load(open(os.path.join(out, "config.json")))
    src_cfg = source(name).config
    read_back = gguf_io.read(outputs(name, "gguf")).config.arch  # Mistral without a window: llama, same math
    assert arch.comparable(read_back, src_cfg.arch)
    assert config["architectures"] == [arch.require(read_back).hf_class]
    if src_cfg.rope_scaling:  # the same llama3 frequencies (parameters with the same thresholds may differ)
        s = dict(config["rope_scaling"], type=config["rope_scaling"]["rope_type"])
        np.testing.assert_allclose(nn.inv_frequencies(src_cfg.head_dim, src_cfg.rope_theta, s),
                                   nn.inv_frequencies(src_cfg.head_dim, src_cfg.rope_theta, src_cfg.rope_scaling),
                                   rtol=1e-6)
    if src_cfg.sliding_window:
        assert config["sliding_window"] == src_cfg.sliding_window
    want = hf_logits(truth_dir(name), toks, "float32")
    report(f"{name} transformers on GGUF -> hf vs on the source", rel(hf_logits(out, toks, "float32"), want), HF_TOL)


# --- parity, safetensors, llama2.c -------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_FIXTURES)
@pytest.mark.parametrize("fmt", ["gguf", "hf", "safetensors"])
def test_parity_source_vs_output(outputs, name, fmt):
    src = os.path.join(FIX, name)
    for tokens in (None, tokens_for(name)):
        result = wconv.parity(src, outputs(name, fmt), tokens=tokens)
        assert result["ok"], (name, fmt, result)


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_safetensors_round_trip(outputs, name):
    from safetensors import safe_open

    src = source(name)
    back = load_model(outputs(name, "safetensors"))
    assert back.config == src.config
    assert list(back.tensors) == list(src.tensors)
    with safe_open(outputs(name, "safetensors"), "pt") as f:  # the safetensors library reads it too
        assert set(f.keys()) == set(src.tensors)
        for n, t in src.tensors.items():
            assert np.array_equal(f.get_tensor(n).float().numpy(), t.float32()), n


@pytest.mark.parametrize("name,refusal", [
    ("hf-llama31-tiny", "cannot apply llama3 RoPE scaling"),
    ("meta-llama31-tiny", "cannot apply llama3 RoPE scaling"),
    ("hf-qwen2-tiny", "holds Llama-architecture models only (wconv writes llama, mistral), not 'qwen2'"),
    ("hf-gemma-tiny", "not 'gemma'"),
    ("hf-mistral-nosw", "a head width (16) other than dim / n_heads"),
])
def test_llama2c_refuses_what_run_c_cannot_compute(tmp_path, name, refusal):
    out = os.path.join(tmp_path, "m.bin")
    with pytest.raises(UnsupportedError, match=refusal.replace("(", r"\(").replace(")", r"\)")):
        quiet(convert, os.path.join(FIX, name), out, to="llama2c", quiet=True)
    assert not os.path.exists(out)


def test_mistral_to_llama2c_warns_about_the_window(tmp_path):
    """Mistral's math is Llama's: run.c computes it, except the window (named in a warning)."""
    src = os.path.join(FIX, "hf-mistral-sw16")
    out = os.path.join(tmp_path, "m.bin")
    _, warnings = quiet(convert, src, out, to="llama2c", quiet=True)
    assert "sliding_window 16: llama2.c's run.c attends over the whole context" in warnings
    assert load_model(out).config.arch == "llama"
    assert wconv.parity(src, out)["ok"]  # 16 tokens: within the window
    long = wconv.parity(src, out, tokens=tokens_for("hf-mistral-sw16"))
    assert not long["ok"]  # beyond it the .bin (full attention) differs, as warned


def test_mistral_gguf_reads_back_with_its_window(outputs):
    back = gguf_io.read(outputs("hf-mistral-sw16", "gguf"))
    assert back.config.arch == "mistral" and back.config.sliding_window == 16
    assert any("read as Mistral" in n for n in back.metadata["notes"])
    plain = gguf_io.read(outputs("hf-mistral-nosw", "gguf"))  # no window: llama, same math
    assert plain.config.arch == "llama" and plain.config.head_width == 16
    assert arch.comparable("mistral", "llama") and not arch.comparable("llama", "qwen2")


# --- Meta Llama 3.1 ------------------------------------------------------------------------------

@pytest.mark.parametrize("head_dim,theta", [(16, 500000.0), (128, 500000.0), (64, 10000.0)])
def test_meta_scaled_rope_frequencies_equal_transformers_llama3(transformers, head_dim, theta):
    """Meta's use_scaled_rope constants give transformers' llama3 inverse frequencies (float32)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": theta,
                                                    **{k: v for k, v in META_SCALED_ROPE.items() if k != "type"}})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = nn.inv_frequencies(head_dim, theta, META_SCALED_ROPE)
    np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=1e-6)  # theirs: float32
    plain = nn.inv_frequencies(head_dim, theta, None)
    assert not np.allclose(ours, plain)  # some bands really are scaled


def test_meta_llama31_declares_scaled_rope_and_context():
    m = source("meta-llama31-tiny")
    assert m.config.rope_scaling == META_SCALED_ROPE
    assert m.config.max_seq_len == 131072
    assert m.config.n_kv_heads == 2 and m.config.hidden_dim == 128 and m.config.rope_theta == 500000.0


@pytest.mark.parametrize("extra,refusal", [
    ({"rope_scaling_factor": 32.0}, "Llama 4's RoPE settings"),
    ({"use_scaled_rope": "yes"}, "use_scaled_rope = 'yes'"),
    ({"moe_args": {"num_experts": 16}}, "moe_args"),
])
def test_meta_params_refusals(tmp_path, extra, refusal):
    src = os.path.join(FIX, "meta-llama31-tiny")
    d = os.path.join(tmp_path, "meta")
    shutil.copytree(src, d)
    params = json.load(open(os.path.join(d, "params.json")))
    json.dump({**params, **extra}, open(os.path.join(d, "params.json"), "w"))
    with pytest.raises(UnsupportedError, match=refusal):
        load_model(d)


# --- RoPE scaling odds and ends ------------------------------------------------------------------

@pytest.mark.interop
def test_linear_rope_scaling_end_to_end(transformers, llama_cpp, tmp_path):
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                   num_key_value_heads=2, num_hidden_layers=1, vocab_size=64,
                                   max_position_embeddings=256, tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1 if p.ndim == 1 else 0))
    src = os.path.join(tmp_path, "src")
    model.save_pretrained(src)
    toks = prompt(64)
    want = hf_logits(src, toks)
    m = load_model(src)
    assert m.config.rope_scaling == {"type": "linear", "factor": 4.0}
    report("linear reference vs transformers", rel(reference.forward(m, toks, float64=True), want), TOL)
    gguf = os.path.join(tmp_path, "m.gguf")
    quiet(convert, src, gguf, quiet=True, dtype="f32")
    assert gguf_io.read(gguf).config.rope_scaling == {"type": "linear", "factor": 4.0}
    report("linear llama.cpp vs transformers", rel(llama_cpp_logits(llama_cpp, gguf, toks), want), TOL)
    back = os.path.join(tmp_path, "back")
    quiet(convert, gguf, back, to="hf", quiet=True)
    report("linear GGUF -> hf", rel(hf_logits(back, toks), want), HF_TOL)
    unscaled = m.config.__class__(**{**m.config.to_dict(), "rope_scaling": None})
    assert rel(reference.forward(wconv.Model(config=unscaled, tensors=m.tensors), toks, float64=True), want) > 0.1


def _llama_cpp_converter_factors(head_dim, theta, s):
    """rope_freqs as llama.cpp's convert_hf_to_gguf computes it (torch float32 frequencies)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    old, low, high, factor = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"], \
        s["factor"]
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("head_dim,theta,scaling", [
    (128, 500000.0, META_SCALED_ROPE),  # Llama 3.1 8B
    (64, 500000.0, {**META_SCALED_ROPE, "factor": 32.0}),  # Llama 3.2 1B (HF config)
    (64, 10000.0, {"type": "llama3", "factor": 6.0, "low_freq_factor": 1.5, "high_freq_factor": 3.7,
                   "original_max_position_embeddings": 100}),  # no round setting: solved
])
def test_rope_freqs_table_turns_back_into_llama3(head_dim, theta, scaling):
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    table = _llama_cpp_converter_factors(head_dim, theta, scaling)
    found = llama3_from_factors(inv, table)
    assert found is not None
    np.testing.assert_allclose(nn.inv_frequencies(head_dim, theta, found),
                               nn.inv_frequencies(head_dim, theta, scaling), rtol=1e-6)
    if scaling["original_max_position_embeddings"] != 100:
        assert found == scaling
    assert llama3_from_factors(inv, np.ones_like(table)) is None
    noise = table * (1 + 0.01 * np.random.default_rng(0).standard_normal(table.size)).astype(np.float32)
    assert llama3_from_factors(inv, noise) is None  # not a llama3 table: kept as a table (HF refuses it)


def _gguf_kv(**keys):
    base = {"llama.embedding_length": 64, "llama.block_count": 2, "llama.attention.head_count": 4,
            "llama.context_length": 128, "llama.feed_forward_length": 96}
    return {**base, **{f"llama.{k.replace('__', '.')}": v for k, v in keys.items()}}


@pytest.mark.parametrize("keys,scaling", [
    ({"rope__scaling__type": b"linear", "rope__scaling__factor": 2.0}, {"type": "linear", "factor": 2.0}),
    ({"rope__scaling__factor": 2.0}, {"type": "linear", "factor": 2.0}),  # llama.cpp's default type is linear
    ({"rope__scale_linear": 4.0}, {"type": "linear", "factor": 4.0}),  # the old key
    ({"rope__scaling__type": b"none", "rope__scaling__factor": 2.0}, None),  # "none": llama.cpp never scales
    ({"rope__scaling__type": b"linear", "rope__scaling__factor": 1.0}, None),
])
def test_gguf_rope_scaling_read_as_llama_cpp_applies_it(keys, scaling):
    cfg = arch.require("llama").gguf_config(_gguf_kv(**keys), {}, Problems("x.gguf", True))
    assert cfg.rope_scaling == scaling


def test_gguf_yarn_refused():
    with pytest.raises(UnsupportedError, match="'yarn' is not implemented"):
        arch.require("llama").gguf_config(_gguf_kv(rope__scaling__type=b"yarn", rope__scaling__factor=4.0), {},
                                          Problems("x.gguf", True))


# --- refusals ------------------------------------------------------------------------------------

def _tiny(transformers, config_cls, **kw):
    base = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return getattr(transformers, config_cls)(**{**base, **kw})


UNSUPPORTED_FAMILIES = [
    ("GraniteConfig", "GraniteForCausalLM", {"embedding_multiplier": 12.0, "logits_scaling": 8.0}),
    ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.0625}),
    ("Phi3Config", "Phi3ForCausalLM", {}),
    ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,
                                               "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16}),
    ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}),
]


@pytest.mark.parametrize("config_cls,hf_class,kw", UNSUPPORTED_FAMILIES, ids=[c[1] for c in UNSUPPORTED_FAMILIES])
def test_unsupported_families_refused_naming_them(transformers, tmp_path, config_cls, hf_class, kw):
    cfg = _tiny(transformers, config_cls, **kw)
    getattr(transformers, hf_class)(cfg).save_pretrained(tmp_path / "m")  # a real (tiny) checkpoint
    with pytest.raises(UnsupportedError) as e:
        load_model(tmp_path / "m")
    msg = str(e.value)
    assert hf_class in msg and "\n" not in msg, msg
    for supported in SUPPORTED:
        assert supported in msg, msg


def test_cli_refusal_is_one_line_and_writes_nothing(transformers, tmp_path):
    cfg = _tiny(transformers, "MixtralConfig", num_local_experts=4, num_experts_per_tok=2)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "m")
    out = tmp_path / "out.gguf"
    r = subprocess.run([sys.executable, "-c", "from wconv.cli import main; main()", "convert", str(tmp_path / "m"),
                        str(out)], capture_output=True, text=True)
    assert r.returncode != 0 and not out.exists()
    assert r.stderr.count("\n") == 1, r.stderr
    assert "MixtralForCausalLM is not supported (Mixture-of-Experts)" in r.stderr


def _llama_named_dir(tmp_path, config: dict, fixture="hf-llama32-tied"):
    """config.json beside a real fixture's (Llama-named) tensors."""
    d = os.path.join(tmp_path, "m")
    os.makedirs(d)
    shutil.copy(os.path.join(FIX, fixture, "model.safetensors"), d)
    json.dump(config, open(os.path.join(d, "config.json"), "w"))
    return d


def _config_of(transformers, cls, fixture, **overrides):
    base = json.load(open(os.path.join(FIX, fixture, "config.json")))
    keep = {k: v for k, v in base.items() if k in ("vocab_size", "hidden_size", "intermediate_size",
                                                    "num_hidden_layers", "num_attention_heads",
                                                    "num_key_value_heads", "tie_word_embeddings", "head_dim")}
    return getattr(transformers, cls)(**{**keep, **overrides}).to_dict()


BAD_FIELDS = [
    ("LlamaConfig", "hf-llama32-tied", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                            "original_max_position_embeddings": 32}},
     "RoPE scaling of type 'yarn' is not implemented"),
    ("LlamaConfig", "hf-llama32-tied", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "'dynamic'"),
    ("LlamaConfig", "hf-llama32-tied", {"attention_bias": True}, "attention_bias = True"),
    ("LlamaConfig", "hf-llama32-tied", {"mlp_bias": True}, "mlp_bias = True"),
    ("LlamaConfig", "hf-llama32-tied", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                            "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ("LlamaConfig", "hf-llama32-tied", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("Qwen2Config", "hf-qwen2-tied", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0},
     "use_sliding_window|sliding_attention"),
    ("Qwen2Config", "hf-qwen2-tied", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 16}},
     "llama.cpp's qwen2 applies linear only"),
    ("GemmaConfig", "hf-gemma-tiny", {"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
]


@pytest.mark.parametrize("cls,fixture,overrides,refusal", BAD_FIELDS,
                         ids=[f"{b[0]}-{next(iter(b[2]))}" for b in BAD_FIELDS])
def test_math_changing_config_fields_refused(transformers, tmp_path, cls, fixture, overrides, refusal):
    config = _config_of(transformers, cls, fixture, **overrides)
    d = _llama_named_dir(tmp_path, config, fixture)
    with pytest.raises(UnsupportedError, match=refusal) as e:
        load_model(d)
    assert "refuses rather than convert wrongly" in str(e.value) and "\n" not in str(e.value)


def test_quantization_config_refused(transformers, tmp_path):
    config = _config_of(transformers, "LlamaConfig", "hf-llama32-tied")
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(UnsupportedError, match="quantization_config"):
        load_model(_llama_named_dir(tmp_path, config))


def test_gemma_with_its_own_lm_head(transformers, tmp_path):
    """transformers 5 classifies with an lm_head.weight in the file even when tied; so do we, and
    GGUF (llama.cpp's gemma ties always) refuses the model instead of dropping the tensor."""
    from safetensors.torch import load_file, save_file

    d = os.path.join(tmp_path, "gemma")
    shutil.copytree(os.path.join(FIX, "hf-gemma-tiny"), d)
    sd = load_file(os.path.join(d, "model.safetensors"))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].flip(0).contiguous()  # a different classifier
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    toks = tokens_for("hf-gemma-tiny")
    want = hf_logits(d, toks)
    assert rel(want, hf_logits(os.path.join(FIX, "hf-gemma-tiny"), toks)) > 0.1
    m = load_model(d)
    assert not m.config.tie_embeddings and "output.weight" in m.tensors
    report("gemma with lm_head: reference vs transformers", rel(reference.forward(m, toks, float64=True), want), TOL)
    with pytest.raises(UnsupportedError, match="always classifies with the token embedding"):
        quiet(convert, d, os.path.join(tmp_path, "g.gguf"), quiet=True)
    assert not os.path.exists(os.path.join(tmp_path, "g.gguf"))
    quiet(convert, d, os.path.join(tmp_path, "hf"), to="hf", quiet=True)
    report("gemma with lm_head: --to hf", rel(hf_logits(os.path.join(tmp_path, "hf"), toks), want), HF_TOL)


# --- the list of architectures comes from the registry ---------------------------------------------

def _readme_architectures() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index("\nArchitectures")
    return text[start:text.index("\n\n", start + 1)]


def test_readme_help_and_errors_list_the_registry():
    para = " ".join(_readme_architectures().split())
    from click.testing import CliRunner

    from wconv.cli import main

    help_text = " ".join(CliRunner().invoke(main, ["--help"]).output.split())
    message = arch.unsupported_message("FooForCausalLM")
    for fam in arch.FAMILIES.values():
        for name in (fam.long_title or fam.title, *fam.hf_classes):
            assert name in para, f"README's Architectures paragraph lacks {name}"
            assert name in help_text, f"wconv --help lacks {name}"
        for c in fam.hf_classes:
            assert c in message
    assert arch.summary() in help_text


def test_every_registered_family_is_tested_here():
    tested = {source(n).config.arch for n in ALL_FIXTURES} | {"gpt2"}  # GPT-2: tests/test_llamacpp_interop.py
    assert tested == set(arch.FAMILIES)


# --- Mixture-of-Experts fits the spec format (docs/architecture.md) ------------------------------

def _toy_mixtral_family():
    """A test-only Mixtral module, to check the claim in docs/architecture.md that an MoE family is
    one more module: per-expert names with two indices ({i}, {e}), stacking into GGUF's 3-D expert
    tensors as a from_layout fix-up, shapes with an expert axis, GGUF metadata. (No reference
    forward and no HF writer: wconv does not implement MoE.)"""
    from wconv.arch.decoder import HF_KEYS, HF_NAMES, TEMPLATES, Decoder
    from wconv.arch.family import agree, fill, template_of
    from wconv.tensor import LazyTensor

    dense = ("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_down.weight", "blk.{i}.ffn_up.weight")
    experts = {"blk.{i}.ffn_gate_exps.weight": "w1", "blk.{i}.ffn_down_exps.weight": "w2",
               "blk.{i}.ffn_up_exps.weight": "w3"}

    def part(t):  # the canonical name of one expert's slice before stacking
        return t.replace(".weight", ".{e}.weight")

    class ToyMixtral(Decoder):
        name, title, gguf_arch = "toy-mixtral", "Mixtral (test)", "llama"
        hf_classes, hf_model_types = ("MixtralForCausalLM",), ()
        templates = tuple(t for t in TEMPLATES if t not in dense and t != "output.weight") + (
            "blk.{i}.ffn_gate_inp.weight", *experts, "output.weight")
        names = {"hf": {**{c: h for c, h in HF_NAMES.items() if c not in dense},
                        "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
                        **{part(t): f"model.layers.{{i}}.block_sparse_moe.experts.{{e}}.{w}.weight"
                           for t, w in experts.items()}}}
        hparam_keys = {"hf": {**HF_KEYS, "n_experts": ("num_local_experts",),
                              "n_experts_used": ("num_experts_per_tok",)}}
        rope_scalings = ("linear", "llama3")

        def refusals(self, layout, side):
            return [r for r in super().refusals(layout, side) if not r.startswith("num_local_experts")]

        def shape(self, name, c):
            template, _ = template_of(name)
            if template == "blk.{i}.ffn_gate_inp.weight":
                return (c.n_experts, c.dim)
            if template in experts:  # the dense shape with an expert axis in front
                return (c.n_experts,) + ((c.dim, c.hidden_dim) if "down" in template else (c.hidden_dim, c.dim))
            return super().shape(name, c)

        def build_config(self, canon, declared, layout, problems):
            hidden = canon["blk.0.ffn_gate_exps.0.weight"].shape[0]  # (the dense gate is what Decoder reads)
            agree(declared, "hidden_dim", hidden, "the experts' w1", problems)
            cfg = super().build_config(canon, {k: v for k, v in declared.items() if k != "hidden_dim"}, layout,
                                       problems)
            cfg.hidden_dim = hidden
            cfg.n_experts, cfg.n_experts_used = declared["n_experts"], declared["n_experts_used"]
            return cfg

        def from_layout(self, canon, cfg, layout, problems):
            super().from_layout(canon, cfg, layout, problems)  # q/k rotary order, as for Llama
            for i in range(cfg.n_layers):
                for t in experts:  # stacking: n_experts [rows, cols] tensors -> one lazy [n_experts, rows, cols]
                    parts = [canon.pop(fill(part(t), i, e)) for e in range(cfg.n_experts)]
                    canon[fill(t, i)] = LazyTensor.concat(fill(t, i), [p.derive(lambda a: a[None], shape=(1, *p.shape))
                                                                      for p in parts], 0)

        def gguf_metadata(self, cfg, n_ctx, n_vocab):
            return super().gguf_metadata(cfg, n_ctx, n_vocab) + [("expert_count", cfg.n_experts, "UINT32"),
                                                                 ("expert_used_count", cfg.n_experts_used, "UINT32")]

    return ToyMixtral()


@pytest.mark.interop
def test_a_mixture_of_experts_family_fits_the_spec(transformers, llama_cpp, monkeypatch, tmp_path):
    torch.manual_seed(5)
    cfg = _tiny(transformers, "MixtralConfig", num_local_experts=4, num_experts_per_tok=2, hidden_size=32,
                num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2, rope_theta=10000.0)
    model = transformers.MixtralForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1 if n.endswith("norm.weight") else 0))
    src = os.path.join(tmp_path, "mixtral")
    model.save_pretrained(src)
    toy = _toy_mixtral_family()
    monkeypatch.setitem(arch.FAMILIES, toy.name, toy)
    m = load_model(src)
    assert m.config.arch == "toy-mixtral"
    stacked = m["blk.1.ffn_down_exps.weight"]
    assert stacked.shape == (4, 32, 32)
    from safetensors.torch import load_file

    sd = load_file(os.path.join(src, "model.safetensors"))
    want = torch.stack([sd[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"] for e in range(4)])
    assert np.array_equal(stacked.float32(), want.numpy())
    gguf = os.path.join(tmp_path, "m.gguf")
    quiet(convert, src, gguf, quiet=True, dtype="f32")
    toks = prompt(64, n=24)
    got = llama_cpp_logits(llama_cpp, gguf, toks)  # llama.cpp runs it as its own Mixtral
    want = hf_logits(src, toks, "float32")  # (transformers' grouped expert matmul has no float64)
    report("toy Mixtral module: llama.cpp vs transformers", rel(got, want), TOL)


# --- llama.cpp's own converter --------------------------------------------------------------------

_RUN_CONVERTER = r"""
import runpy, sys
llama_dir, src, out = sys.argv[1:4]
sys.path[:0] = [llama_dir, llama_dir + "/gguf-py"]
import conversion
real = conversion.get_model_class
def get_model_class(name, mmproj=False):  # the fixtures have no tokenizer: write no_vocab instead
    cls = real(name, mmproj)
    return type(cls.__name__, (cls,), {"model_arch": cls.model_arch,
                                       "set_vocab": lambda self: self.gguf_writer.add_tokenizer_model("no_vocab")})
conversion.get_model_class = get_model_class
sys.argv = ["convert_hf_to_gguf.py", src, "--outfile", out, "--outtype", "f32"]
runpy.run_path(llama_dir + "/convert_hf_to_gguf.py", run_name="__main__")
"""


@pytest.mark.interop
@pytest.mark.parametrize("name", HF_FIXTURES)
def test_tensors_equal_llama_cpp_converter(outputs, tmp_path, name):
    """Our f32 GGUF holds the very tensors llama.cpp's convert_hf_to_gguf.py writes (Gemma's 1 + w
    norms, Qwen2's biases, the llama q/k permutation); rope_freqs to 1 float32 ulp (we compute the
    frequencies in float64). Needs a llama.cpp checkout: WCONV_LLAMA_CPP_DIR (e.g. the vendor/llama.cpp
    of the llama-cpp-python 0.3.36 sdist); skipped otherwise."""
    llama_dir = os.environ.get("WCONV_LLAMA_CPP_DIR")
    if not llama_dir or not os.path.isfile(os.path.join(llama_dir, "convert_hf_to_gguf.py")):
        pytest.skip("WCONV_LLAMA_CPP_DIR does not point at a llama.cpp checkout")
    theirs = os.path.join(tmp_path, "theirs.gguf")
    r = subprocess.run([sys.executable, "-c", _RUN_CONVERTER, llama_dir, os.path.join(FIX, name), theirs],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = gguf_io.read(theirs, strict=False), gguf_io.read(outputs(name, "gguf"))
    assert a.metadata["general.architecture"] == b.metadata["general.architecture"]
    from gguf import GGUFReader

    ta = {t.name: t for t in GGUFReader(theirs).tensors}
    tb = {t.name: t for t in GGUFReader(outputs(name, "gguf")).tensors}
    assert set(ta) == set(tb)
    for n in ta:
        assert list(ta[n].shape) == list(tb[n].shape) and ta[n].tensor_type == tb[n].tensor_type, n
        if n == "rope_freqs.weight":
            np.testing.assert_allclose(ta[n].data, tb[n].data, rtol=2.4e-7)
        else:
            assert ta[n].data.tobytes() == tb[n].data.tobytes(), n
    arch_name = a.metadata["general.architecture"]
    for key, value in a.metadata.items():  # every hyperparameter their file states, ours states alike
        if key.startswith(arch_name + ".") and key not in (f"{arch_name}.attention.key_length",
                                                           f"{arch_name}.attention.value_length"):
            assert b.metadata.get(key) == value, key
    # and wconv reads llama.cpp's own file as the source model (its rope_freqs back into llama3 parameters)
    # (llama.cpp's converter drops Mistral's window: that file equals the source only within it)
    windowed = source(name).config.sliding_window
    assert wconv.parity(os.path.join(FIX, name), theirs, tokens=None if windowed else tokens_for(name))["ok"]
