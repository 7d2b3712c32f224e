"""Architectures: one module per family, found through this registry.

Each module (llama.py, mistral.py, qwen2.py, gemma.py, gpt2.py) defines FAMILY, an instance
of wconv.arch.family.Family holding that architecture's tensor names per source layout,
shapes, hyperparameter keys, fix-ups, GGUF metadata, HF config and reference forward pass.
Adding a family is one new module listed in _MODULES (plus its tests).

Lookups: by our name (Config.arch), by Hugging Face `architectures` / `model_type`, and by
GGUF `general.architecture`. What a checkpoint declares decides its family; names only
confirm it (wconv.convert.state_dict).
"""
from __future__ import annotations

import importlib

from ..errors import UnsupportedError
from .family import Family, Problems, fill, short_list, template_of  # noqa: F401  (re-exported)

_MODULES = ("llama", "mistral", "qwen2", "gemma", "gpt2")
FAMILIES: dict[str, Family] = {}
for _m in _MODULES:
    _f = importlib.import_module(f"{__name__}.{_m}").FAMILY
    FAMILIES[_f.name] = _f

# Architectures people ask about that wconv knowingly does not implement, with why (for messages).
KNOWN_UNSUPPORTED_HF = {
    "MixtralForCausalLM": "Mixture-of-Experts", "Qwen2MoeForCausalLM": "Mixture-of-Experts",
    "Qwen3MoeForCausalLM": "Mixture-of-Experts", "GraniteMoeForCausalLM": "Mixture-of-Experts",
    "Gemma2ForCausalLM": "logit soft-capping and sliding-window layers",
    "Gemma3ForCausalLM": "sliding-window layers and q/k norms", "Phi3ForCausalLM": "fused qkv / gate_up, longrope",
    "GraniteForCausalLM": "embedding/residual/attention/logit multipliers",
    "CohereForCausalLM": "logit scale, LayerNorm",
    "Cohere2ForCausalLM": "logit scale, LayerNorm, sliding-window layers", "Qwen3ForCausalLM": "q/k norms",
}


def get(name: str) -> Family | None:
    return FAMILIES.get(name)


def require(name: str, where=None) -> Family:
    fam = FAMILIES.get(name)
    if fam is None:
        raise UnsupportedError(where, f"architecture {name!r} is not supported; wconv converts "
                                      f"{', '.join(FAMILIES)}")
    return fam


def by_hf(hf_config: dict) -> tuple[Family | None, str | None]:
    """(family, declared name) for a config.json; family None when the declared one is not ours."""
    archs = hf_config.get("architectures")
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    model_type = hf_config.get("model_type") if isinstance(hf_config.get("model_type"), str) else None
    for a in archs:
        for fam in FAMILIES.values():
            if a in fam.hf_classes:
                return fam, a
    if archs:
        return None, archs[0]
    if model_type:
        for fam in FAMILIES.values():
            if model_type in fam.hf_model_types:
                return fam, model_type
        return None, f"model_type {model_type!r}"
    return None, None


def by_gguf(arch: str) -> Family | None:
    for fam in FAMILIES.values():
        if fam.gguf_arch == arch and fam.name == _GGUF_PRIMARY.get(arch, fam.name):
            return fam
    return None


# GGUF arch names shared by several families (Mistral is written as llama): reading them back gives this one.
_GGUF_PRIMARY = {"llama": "llama"}


def comparable(a: str, b: str) -> bool:
    """Whether models of arch names a and b run the same reference math (the same family, or
    Mistral and Llama: a Mistral GGUF without a window reads back as llama)."""
    fa, fb = FAMILIES.get(a), FAMILIES.get(b)
    return a == b or (fa is not None and fb is not None and fa.math_key() == fb.math_key())


def summary() -> str:
    """One line naming every family and what it is read from, for --help and messages."""
    return "; ".join(f"{fam.long_title or fam.title} ({', '.join(fam.hf_classes + fam.other_sources)})"
                     for fam in FAMILIES.values())


def supported_hf() -> str:
    """'LlamaForCausalLM, MistralForCausalLM, ...' for messages."""
    return ", ".join(c for fam in FAMILIES.values() for c in fam.hf_classes)


def unsupported_message(declared: str) -> str:
    why = KNOWN_UNSUPPORTED_HF.get(declared)
    return (f"{declared} is not supported{f' ({why})' if why else ''}; wconv converts {supported_hf()}"
            " (and Meta, llama2.c and nanoGPT checkpoints of those)")
