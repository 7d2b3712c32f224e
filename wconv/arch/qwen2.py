"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): Llama-style decoder with q/k/v biases, NEOX rotary.

llama.cpp's `qwen2` architecture rotates half-split pairs (rotate_half), which is how HF
stores q/k: no row permutation either way. Embeddings are tied in the small models.
"""
from __future__ import annotations

from .decoder import HF_KEYS, HF_NAMES, Decoder


class Qwen2(Decoder):
    name = "qwen2"
    title = "Qwen2"
    long_title = "Qwen2 / Qwen2.5"
    gguf_arch = "qwen2"
    hf_classes = ("Qwen2ForCausalLM",)
    hf_model_types = ("qwen2",)
    hf_class = "Qwen2ForCausalLM"
    hf_model_type = "qwen2"
    rope_style = "neox"
    qkv_bias = True
    hf_permuted = False
    names = {"hf": HF_NAMES}
    hparam_keys = {"hf": HF_KEYS}

    def refusals(self, layout, side):
        out = super().refusals(layout, side)
        if layout == "hf" and side.get("use_sliding_window"):
            out.append("use_sliding_window = true (sliding-window layers)")
        return out

    def hf_config(self, c):
        config = super().hf_config(c)
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layers)
        return config


FAMILY = Qwen2()
