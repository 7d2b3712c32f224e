"""Compare two models by running the numpy reference on both and diffing the logits.

`compare(a, b)` is meant for "B was converted from A". Two comparisons are made:

* direct: logits of A vs logits of B. Quantisation makes these differ, so the
  default tolerance depends on the lossiest element type involved.
* simulated (the one that decides `ok` whenever it is possible): A's tensors are
  first rounded through B's per-tensor element type (f16, bf16, GGML Q8_0 / Q4_0
  and every other type through wconv.codecs' encoders, byte-identical to ggml's, k-quants
  included, and gguf-py's decoders; llama2.c int8 groups), i.e. we redo the
  conversion's rounding ourselves. A correct conversion then matches to float32
  accuracy; a layout bug does not. This matters for Q4_0: on small models its
  noise alone moved top-1 agreement down to 0.12 and correlation to 0.60,
  further than a wrong q/k permutation did, so no direct tolerance can tell the two apart. (If A is the
  lossy one, B is rounded through A's types instead.)

Default tolerances for the direct comparison: max |Δlogit| as a fraction of the
logit scale (max |logit| of A, floored at 1) and a minimum mean Pearson
correlation between the two logit vectors of each position. Derived from
measurements (docs/parity.md): stories260K, out440k and six random Llama/GPT-2
models, each on three prompts (default, random, greedy), weights rounded
through each type:

  class  max |Δ| / scale      min correlation   measured worst
  f32    1e-4                 -                 8e-6
  f16    2e-2                 0.99              6.1e-3, corr >0.9999
  bf16   0.15                 0.99              6.5e-2, corr 0.9996
  q8     0.5                  0.98              0.22,   corr 0.9974
  q6     0.25                 0.98              0.11,   corr 0.9958  (Q6_K)
  q5     0.5                  0.95              0.20,   corr 0.9857  (Q5_K)
  q4     2.0                  0.5 (weak)        0.95,   corr 0.60    (Q4_0 ... Q5_1, Q4_K)
  q3     2.0                  0.5 (weak)        0.76,   corr 0.77    (Q3_K)
  q2     3.0                  0.3 (weak)        1.05,   corr 0.57    (Q2_K)
  simulated: 1e-3 of scale, any class (exact re-rounding gives 0 to ~1e-6;
  the margin allows a few elements quantised one step differently)

Top-1 agreement is reported but does not decide: quantisation noise alone took
it down to 0.62 (q8_0) and 0.12 (q4_0) on these small models. Broken
conversions measured for contrast (q/k in HF order, w1/w3 swapped, two layers
swapped): max |Δ| 0.7-1.6 of scale, correlation at most 0.89 - so the direct
check separates them from f16/bf16/q8 noise but not from q4 noise.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import types

import numpy as np

from . import arch, codecs
from .errors import UsageError
from .model import Model
from .reference import check_tokens, forward

# class -> (max |Δ| / scale, minimum mean correlation)
TOLERANCES = {
    "f32": (1e-4, None),
    "f16": (2e-2, 0.99),
    "bf16": (0.15, 0.99),
    "q8": (0.5, 0.98),
    "q6": (0.25, 0.98),
    "q5": (0.5, 0.95),
    "q4": (2.0, 0.5),
    "q3": (2.0, 0.5),
    "q2": (3.0, 0.3),
}
SIMULATED_TOLERANCE = 1e-3
LOSS_ORDER = ("f32", "f16", "bf16", "q8", "q6", "q5", "q4", "q3", "q2")
DEFAULT_PROMPT_LEN = 16

_CLASS_OF = {"F64": "f32", "F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8", "Q4_0": "q4",
             "Q6_K": "q6", "Q5_K": "q5", "Q4_K": "q4", "Q3_K": "q3", "Q2_K": "q2"}


def _open(m) -> Model:
    if isinstance(m, Model):
        return m
    from .convert.load import load_model as load

    return load(os.fspath(m))


def tensor_kind(model: Model, name: str) -> str:
    """Element type a tensor was stored in ('LLAMA2C_Q8/g64' for llama2.c v2 matrices)."""
    t = model[name]
    quant = model.metadata.get("quantization") or {}
    if quant.get("scheme") == "llama2c-q8_0" and len(t.shape) == 2:
        return f"LLAMA2C_Q8/g{quant['group_size']}"
    return t.dtype.name


def _class(kind: str) -> str:
    if kind.startswith("LLAMA2C_Q8"):
        return "q8"
    if kind in _CLASS_OF:
        return _CLASS_OF[kind]
    if kind.startswith("Q8") or kind.startswith("F8"):
        return "q8"
    return "q4"  # any other quantised type: judged as loosely as q4


def dtype_summary(model: Model) -> dict:
    counts = {}
    for name in model.tensors:
        k = tensor_kind(model, name)
        counts[k] = counts.get(k, 0) + 1
    return counts


def model_class(model: Model) -> str:
    """The lossiest class among the model's matrices (1-D tensors are usually kept f32)."""
    classes = {_class(tensor_kind(model, n)) for n, t in model.tensors.items() if len(t.shape) >= 2}
    return max(classes, key=LOSS_ORDER.index) if classes else "f32"


def can_round(kind: str) -> bool:
    """True if we can redo the rounding of storing values as `kind` (wconv.codecs' encoders)."""
    if kind.startswith("LLAMA2C_Q8/g") or kind == "F64":
        return True
    codecs.load_plugins()
    return kind in codecs.CODECS and codecs.CODECS[kind].encoder is not None


def round_through(x: np.ndarray, kind: str) -> np.ndarray | None:
    """x (float32) as it would be after storing it as `kind`; None if we cannot redo that."""
    if kind in ("F32", "F64"):
        return x
    if kind.startswith("LLAMA2C_Q8/g"):
        from .formats.llama2c import dequantize_groups, quantize_groups

        return dequantize_groups(*quantize_groups(x, int(kind.split("/g")[1]))).reshape(x.shape)
    if can_round(kind):
        return codecs.round_trip(x, codecs.get(kind).dtype)
    return None


def simulate(a: Model, b: Model) -> tuple[Model | None, Model | None, str]:
    """(a', b') with the more precise side rounded through the other's element types.

    A side none of whose tensors needed rounding comes back as the very same Model, so the
    caller can reuse logits it already has. Returns (None, None, reason) when some tensor
    pair cannot be matched that way.
    """
    out_a = Model(config=a.config, metadata=a.metadata, path=a.path)
    out_b = Model(config=b.config, metadata=b.metadata, path=b.path)
    rounded = {id(out_a): 0, id(out_b): 0}
    for name in sorted(set(a.tensors) | set(b.tensors)):
        if name not in a.tensors or name not in b.tensors:
            return None, None, f"tensor {name} is only in one model"
        ka, kb = tensor_kind(a, name), tensor_kind(b, name)
        ca, cb = _class(ka), _class(kb)
        out_a.add(a[name])
        out_b.add(b[name])
        if ka == kb or ca == cb == "f32":
            continue
        # A converter computes round(float32(source), output kind), so rounding the more
        # precise side (A on a tie) through the other's kind redoes the conversion exactly,
        # also across two lossy kinds (bf16 -> llama2.c int8, GGUF Q8_0 -> llama2.c int8).
        if LOSS_ORDER.index(ca) <= LOSS_ORDER.index(cb):
            lossy, precise, target = kb, a[name], out_a
        else:
            lossy, precise, target = ka, b[name], out_b
        if not can_round(lossy):
            return None, None, f"cannot redo {lossy} rounding for {name}"
        target.add(precise.derive(lambda x, k=lossy: round_through(x, k), float_input=True))
        rounded[id(target)] += 1
    note = f"{sum(rounded.values())} tensors rounded through the other model's types"
    return (out_a if rounded[id(out_a)] else a), (out_b if rounded[id(out_b)] else b), note


def default_tokens(model: Model, n: int = DEFAULT_PROMPT_LEN) -> list[int]:
    """BOS (1 unless the tokenizer says otherwise) then ids spread over the vocabulary."""
    c = model.config
    n = max(1, min(n, c.max_seq_len or n))
    bos = model.tokenizer.bos_id if model.tokenizer is not None and model.tokenizer.bos_id is not None else 1
    bos = bos if bos < c.vocab_size else 0
    return [bos] + [(3 + i * 7919) % c.vocab_size for i in range(n - 1)]


def _metrics(la: np.ndarray, lb: np.ndarray) -> dict:
    d = np.abs(la.astype(np.float64) - lb.astype(np.float64))
    a0 = la - la.mean(-1, keepdims=True)
    b0 = lb - lb.mean(-1, keepdims=True)
    denom = np.sqrt((a0 * a0).sum(-1) * (b0 * b0).sum(-1))
    corr = np.where(denom > 0, (a0 * b0).sum(-1) / np.where(denom > 0, denom, 1), 1.0)
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "top1_agreement": float((la.argmax(-1) == lb.argmax(-1)).mean()),
            "mean_correlation": float(corr.mean())}


def compare(a, b, *, tokens=None, random_tokens=None, seed=0, atol=None, float64=False) -> dict:
    """Run both models on the same prompt and compare logits. See the module docstring."""
    ma, mb = _open(a), _open(b)
    where = mb.path or ma.path or None
    if ma.config.vocab_size != mb.config.vocab_size:
        raise UsageError(where, f"vocabulary sizes differ: {ma.config.vocab_size} vs {mb.config.vocab_size}")
    if not arch.comparable(ma.config.arch, mb.config.arch):  # Mistral read back as llama is comparable
        raise UsageError(where, f"architectures differ: {ma.config.arch} vs {mb.config.arch}")
    if tokens is not None and random_tokens is not None:
        raise UsageError(where, "pass either prompt tokens or random tokens, not both")
    if atol is not None and not (math.isfinite(atol) and atol >= 0):  # NaN or < 0 would fail every model
        raise UsageError(where, f"atol must be a finite number >= 0, got {atol}")
    if random_tokens is not None:
        if random_tokens <= 0:
            raise UsageError(where, f"random token count must be positive, got {random_tokens}")
        toks = [int(t) for t in np.random.default_rng(seed).integers(0, ma.config.vocab_size, random_tokens)]
    elif tokens is not None:
        toks = [int(t) for t in tokens]
    else:
        toks = default_tokens(ma)
    check_tokens(ma, toks)
    check_tokens(mb, toks)

    notes = []
    if ma.config.arch == "gpt2" and ma.config.gelu != mb.config.gelu:
        # The weights are what is compared; evaluate B with A's activation and say so
        # (e.g. nanoGPT uses exact erf GELU, GGUF/llama.cpp always the tanh approximation).
        notes.append(f"B's GELU ({mb.config.gelu}) replaced by A's ({ma.config.gelu}) for the comparison")
        mb = Model(config=dataclasses.replace(mb.config, gelu=ma.config.gelu), tensors=mb.tensors,
                   tokenizer=mb.tokenizer, metadata=mb.metadata, path=mb.path)
    la = forward(ma, toks, float64=float64)
    lb = forward(mb, toks, float64=float64)
    scale = float(np.abs(la).max())
    unit = max(scale, 1.0)  # tolerances are relative to the logit scale, floored at 1
    cls = max(model_class(ma), model_class(mb), key=LOSS_ORDER.index)
    rel, min_corr = TOLERANCES[cls]
    direct = _metrics(la, lb)
    direct_atol = atol if atol is not None else rel * unit
    direct_ok = direct["max_abs_diff"] <= direct_atol and \
        (min_corr is None or atol is not None or direct["mean_correlation"] >= min_corr)

    result = {
        "a": ma.path or "<memory>", "b": mb.path or "<memory>",
        "n_tokens": len(toks), "tokens": toks, "logit_scale": scale,
        "dtypes": {"a": dtype_summary(ma), "b": dtype_summary(mb)}, "class": cls,
        **direct, "atol": direct_atol, "min_correlation": min_corr,
        "direct_ok": direct_ok, "simulated": None, "judged_by": "direct", "ok": direct_ok,
        "notes": notes,
    }
    if cls != "f32" and atol is None:
        sa, sb, note = simulate(ma, mb)
        if sa is not None:
            # A side that needed no rounding is the model already run: reuse its logits.
            sim = _metrics(la if sa is ma else forward(sa, toks, float64=float64),
                           lb if sb is mb else forward(sb, toks, float64=float64))
            sim_atol = SIMULATED_TOLERANCE * unit
            sim["atol"] = sim_atol
            sim["ok"] = sim["max_abs_diff"] <= sim_atol
            sim["note"] = note
            result.update(simulated=sim, judged_by="simulated", ok=sim["ok"])
        else:
            result["simulated"] = {"note": note}
    return result


def format_result(r: dict) -> str:
    def dts(d):
        return ", ".join(f"{k}×{v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))

    lines = [
        f"A: {r['a']}  [{dts(r['dtypes']['a'])}]",
        f"B: {r['b']}  [{dts(r['dtypes']['b'])}]",
        f"prompt: {r['n_tokens']} tokens; logit scale (max |logit| of A): {r['logit_scale']:.4g}",
        f"direct:    max |Δlogit| {r['max_abs_diff']:.3e} (allowed {r['atol']:.3e}, class {r['class']}), "
        f"mean {r['mean_abs_diff']:.3e}, top-1 agreement {r['top1_agreement']:.1%}, "
        f"correlation {r['mean_correlation']:.4f}",
    ]
    sim = r.get("simulated")
    if sim and "max_abs_diff" in sim:
        lines.append(f"simulated: max |Δlogit| {sim['max_abs_diff']:.3e} (allowed {sim['atol']:.3e}), "
                     f"top-1 agreement {sim['top1_agreement']:.1%}  ({sim['note']})")
    elif sim:
        lines.append(f"simulated: not possible ({sim['note']}); judged on the direct comparison")
    lines += [f"note: {n}" for n in r.get("notes", [])]
    lines.append(f"result: {'OK' if r['ok'] else 'MISMATCH'} (judged by the {r['judged_by']} comparison)")
    return "\n".join(lines)


class _CallableModule(types.ModuleType):
    """Lets `wconv.parity(a, b, ...)` call compare (see wconv/__init__.py)."""

    def __call__(self, a, b, **options) -> dict:
        return compare(a, b, **options)


sys.modules[__name__].__class__ = _CallableModule
