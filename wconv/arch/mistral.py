"""Mistral (MistralForCausalLM): Llama's math with an optional sliding attention window.

llama.cpp runs Mistral as its `llama` architecture (its converter writes arch llama with
q/k permuted like Llama's) and attends over the whole context; transformers attends within
`sliding_window` tokens. The two agree on prompts no longer than the window: the GGUF
writer records the window in metadata and says so in a warning.
"""
from __future__ import annotations

from .decoder import HF_KEYS, HF_NAMES, Decoder


class Mistral(Decoder):
    name = "mistral"
    title = "Mistral"
    hf_special_ids = (1, 2)
    gguf_arch = "llama"
    hf_classes = ("MistralForCausalLM",)
    hf_model_types = ("mistral",)
    hf_class = "MistralForCausalLM"
    hf_model_type = "mistral"
    llama2c = True  # run.c computes Llama's math: the window is named in a warning, like for llama.cpp
    rope_scalings = ("linear", "llama3")
    names = {"hf": HF_NAMES}
    hparam_keys = {"hf": {**HF_KEYS, "sliding_window": ("sliding_window",)}}

    def gguf_metadata(self, cfg, n_ctx, n_vocab):
        out = super().gguf_metadata(cfg, n_ctx, n_vocab)
        if cfg.sliding_window:
            out.append(("attention.sliding_window", cfg.sliding_window, "UINT32"))
        return out

    def gguf_cannot_hold(self, cfg, runtime="llama.cpp"):
        if cfg.sliding_window and cfg.sliding_window < cfg.max_seq_len:
            return [f"sliding_window {cfg.sliding_window}: {runtime} attends over the whole context (transformers "
                    f"within {cfg.sliding_window} tokens), so results differ only beyond that many tokens"]
        return []

    def hf_config(self, c):
        config = super().hf_config(c)
        config["sliding_window"] = c.sliding_window or None
        return config


FAMILY = Mistral()
