"""wconv.parity: accepts correct conversions at every element type, rejects broken ones."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

import modelgen
import wconv
from conftest import REALDATA, fixture_path, realdata_path
from helpers import hf_permute
from wconv import dtypes, parity, reference
from wconv.cli import main as cli
from wconv.errors import UsageError
from wconv.formats import llama2c
from wconv.model import Model
from wconv.tensor import LazyTensor

REAL = os.path.join(REALDATA, "llama2c")


def stored_as(model: Model, kind: str) -> Model:
    """`model` with its matrices stored as `kind` (the way a converter would), norms f32."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    out = Model(config=model.config)
    for name, t in model.tensors.items():
        w = t.float32()
        if w.ndim == 1 or kind == "F32":
            out.add(LazyTensor.from_array(name, w))
        elif kind == "F16" or w.shape[-1] % 32:  # rows GGML cannot block: f16, as converters do
            out.add(LazyTensor.from_array(name, w.astype(np.float16)))
        elif kind == "BF16":
            bits = dtypes.f32_to_bf16(w)
            out.add(LazyTensor(name, dtypes.BF16, w.shape, lambda b=bits: b))
        else:
            raw = quantize(w, GGMLQuantizationType[kind])
            out.add(LazyTensor(name, dtypes.by_name(kind), w.shape, lambda r=raw: r))
    return out


def broken(model: Model, how: str) -> Model:
    """Typical conversion bugs: q/k left in HF order, w1/w3 swapped, two layers swapped."""
    c = model.config
    out = Model(config=c)
    for name, t in model.tensors.items():
        w = t.float32()
        if how == "hf-order" and ".attn_q." in name:
            w = hf_permute(w, c.n_heads)
        elif how == "hf-order" and ".attn_k." in name:
            w = hf_permute(w, c.n_kv_heads)
        elif how == "gate-up" and ".ffn_gate." in name:
            w = model[name.replace("gate", "up")].float32()
        elif how == "gate-up" and ".ffn_up." in name:
            w = model[name.replace("up", "gate")].float32()
        elif how == "layers" and name.startswith(("blk.0.", "blk.1.")):
            w = model[("blk.1." if name.startswith("blk.0.") else "blk.0.") + name[6:]].float32()
        out.add(LazyTensor.from_array(name, w))
    return out


def source():
    return modelgen.random_model(modelgen.llama_config(dim=128, hidden_dim=256, vocab_size=256,
                                                       max_seq_len=64), seed=21)


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0"])
def test_correct_conversions_pass(kind):
    a = source()
    r = parity.compare(a, stored_as(a, kind))
    assert r["ok"] and r["direct_ok"]
    assert r["class"] == {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8", "Q4_0": "q4"}[kind]
    if kind != "F32":
        assert r["judged_by"] == "simulated" and r["simulated"]["max_abs_diff"] <= 1e-5
    json.dumps(r)  # the --json output


@pytest.mark.parametrize("kind", ["F32", "F16", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("how", ["hf-order", "gate-up", "layers"])
def test_broken_conversions_fail(kind, how):
    a = source()
    r = parity.compare(a, stored_as(broken(a, how), kind))
    assert not r["ok"]
    if kind in ("F32", "F16", "Q8_0"):
        assert not r["direct_ok"]  # the direct tolerances alone catch these too


def test_gpt2_and_reverse_direction():
    a = modelgen.random_model(modelgen.gpt2_config(), seed=22)
    q = stored_as(a, "Q8_0")
    assert parity.compare(a, q)["ok"]
    r = parity.compare(q, a)  # lossy side first: the float side is rounded instead
    assert r["ok"] and r["judged_by"] == "simulated"


def test_llama2c_v2_file_against_source(tmp_path):
    a = source()
    llama2c.write(a, str(tmp_path / "q.bin"), quiet=True, version=2)
    llama2c.write(a, str(tmp_path / "f.bin"), quiet=True, version=0)
    r = parity.compare(str(tmp_path / "f.bin"), str(tmp_path / "q.bin"))
    assert r["ok"] and r["judged_by"] == "simulated" and r["simulated"]["max_abs_diff"] == 0.0
    assert r["dtypes"]["b"] == {"LLAMA2C_Q8/g64": 16, "F32": 5}
    bad = broken(a, "hf-order")
    llama2c.write(bad, str(tmp_path / "bad.bin"), quiet=True, version=2)
    assert not parity.compare(str(tmp_path / "f.bin"), str(tmp_path / "bad.bin"))["ok"]


def test_direct_judgement_when_simulation_is_impossible():
    # A tied source against a Q8_0 copy that spells the classifier out as output.weight.
    tied_src = modelgen.random_model(modelgen.llama_config(dim=128, hidden_dim=256, vocab_size=256,
                                                           max_seq_len=64, tie_embeddings=True), seed=23)
    tied_q = stored_as(tied_src, "Q8_0")
    tied_q.add(tied_q["token_embd.weight"].renamed("output.weight"))
    r = parity.compare(tied_src, tied_q)
    assert r["simulated"] == {"note": "tensor output.weight is only in one model"}
    assert r["judged_by"] == "direct" and r["ok"] == r["direct_ok"] and r["ok"]


def test_tokens_options_and_errors():
    a = source()
    r = parity.compare(a, a, tokens=[1, 2, 3])
    assert r["n_tokens"] == 3 and r["max_abs_diff"] == 0.0 and r["ok"]
    r = parity.compare(a, a, random_tokens=10, seed=3)
    assert r["n_tokens"] == 10 and all(0 <= t < 256 for t in r["tokens"])
    assert r["tokens"] == parity.compare(a, a, random_tokens=10, seed=3)["tokens"]
    default = parity.default_tokens(a)
    assert default[0] == 1 and len(default) == parity.DEFAULT_PROMPT_LEN and max(default) < 256
    with pytest.raises(UsageError):
        parity.compare(a, a, tokens=[1], random_tokens=3)
    with pytest.raises(UsageError):
        parity.compare(a, a, tokens=[256])
    small = modelgen.random_model(modelgen.llama_config(vocab_size=100))
    with pytest.raises(UsageError):
        parity.compare(a, small)
    with pytest.raises(UsageError):
        parity.compare(a, modelgen.random_model(modelgen.gpt2_config(vocab_size=256)))


def test_explicit_atol_and_float64():
    a = source()
    b = stored_as(a, "F16")
    r = parity.compare(a, b, atol=1e-9)
    assert not r["ok"] and r["judged_by"] == "direct" and r["atol"] == 1e-9
    r64 = parity.compare(a, b, float64=True)
    assert r64["ok"] and abs(r64["max_abs_diff"] - parity.compare(a, b)["max_abs_diff"]) < 1e-3


def test_callable_module_and_format():
    a = source()
    assert wconv.parity(a, a)["ok"]
    text = parity.format_result(parity.compare(a, stored_as(a, "Q4_0")))
    assert "simulated" in text and "result: OK" in text and len(text.splitlines()) <= 8


def test_cli_parity_and_generate(tmp_path):
    a = source()
    llama2c.write(a, str(tmp_path / "a.bin"), quiet=True)
    llama2c.write(a, str(tmp_path / "q.bin"), quiet=True, version=2)
    llama2c.write(broken(a, "gate-up"), str(tmp_path / "bad.bin"), quiet=True, version=2)
    runner = CliRunner()
    res = runner.invoke(cli, ["parity", str(tmp_path / "a.bin"), str(tmp_path / "q.bin")])
    assert res.exit_code == 0 and "result: OK" in res.output
    res = runner.invoke(cli, ["parity", str(tmp_path / "a.bin"), str(tmp_path / "bad.bin"), "--json"])
    assert res.exit_code == 1 and json.loads(res.output)["ok"] is False
    res = runner.invoke(cli, ["parity", str(tmp_path / "a.bin"), str(tmp_path / "q.bin"), "--prompt-tokens", "1,999"])
    assert res.exit_code == 2
    res = runner.invoke(cli, ["generate", str(tmp_path / "a.bin"), "--tokens", "1,7", "-n", "5"])
    assert res.exit_code == 0
    assert [int(t) for t in res.output.strip().split(",")] == reference.generate(a, [1, 7], 5)


def test_real_stories260k_against_its_v2(tmp_path):
    src = realdata_path("llama2c", "stories260K.bin")
    llama2c.write(wconv.load(src), str(tmp_path / "q.bin"), quiet=True, version=2)
    r = parity.compare(src, str(tmp_path / "q.bin"))
    assert r["ok"] and r["direct_ok"] and r["mean_correlation"] > 0.99


# --------------------------------------------- the measurement behind the defaults

@pytest.mark.slow
def test_default_tolerances_cover_measured_noise_and_catch_bugs():
    """Re-measures docs/parity.md's table: quantisation noise of each class stays inside its
    direct tolerance with margin, and the broken conversions fall outside (except q4)."""
    models = [modelgen.random_model(modelgen.llama_config(dim=128, hidden_dim=256, vocab_size=256,
                                                          max_seq_len=64), seed=s) for s in range(3)]
    models += [modelgen.random_model(modelgen.gpt2_config(dim=128, hidden_dim=512, vocab_size=256,
                                                          max_seq_len=64), seed=s) for s in range(3)]
    for name in ("stories260K.bin", "out440k_v2_int8.bin"):
        if os.path.exists(os.path.join(REAL, name)):
            models.append(wconv.load(os.path.join(REAL, name)))
    classes = {"F16": "f16", "BF16": "bf16", "Q8_0": "q8", "Q4_0": "q4"}
    worst = {c: [0.0, 1.0] for c in classes.values()}
    bug_corr = 0.0
    for m in models:
        prompts = [parity.default_tokens(m), reference.generate(m, [1], 31),
                   [int(t) for t in np.random.default_rng(0).integers(0, m.config.vocab_size, 16)]]
        for toks in prompts:
            la = reference.forward(m, toks)
            unit = max(float(np.abs(la).max()), 1.0)
            for kind, cls in classes.items():
                met = parity._metrics(la, reference.forward(stored_as(m, kind), toks))
                worst[cls][0] = max(worst[cls][0], met["max_abs_diff"] / unit)
                worst[cls][1] = min(worst[cls][1], met["mean_correlation"])
            if m.config.arch == "llama":
                for how in ("hf-order", "gate-up", "layers"):
                    met = parity._metrics(la, reference.forward(broken(m, how), toks))
                    bug_corr = max(bug_corr, met["mean_correlation"])
    print({c: (f"{w[0]:.3g}", f"{w[1]:.4f}") for c, w in worst.items()}, f"bug corr <= {bug_corr:.3f}")
    for cls, (max_rel, min_corr) in worst.items():
        rel_tol, corr_tol = parity.TOLERANCES[cls]
        assert max_rel * 1.5 <= rel_tol and min_corr >= corr_tol
    for cls in ("f16", "bf16", "q8"):
        assert bug_corr < parity.TOLERANCES[cls][1]


# --- meaningless tolerances ---------------------------------------------------------------------

@pytest.mark.parametrize("atol", [-1.0, float("nan"), float("inf")])
def test_parity_refuses_meaningless_atol(atol):
    m = fixture_path("meta-tiny")
    with pytest.raises(UsageError, match="atol"):
        wconv.parity(m, m, atol=atol)
