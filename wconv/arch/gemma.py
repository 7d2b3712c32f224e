"""Gemma (GemmaForCausalLM, the first generation): GeGLU with tanh GELU, embeddings scaled by
sqrt(dim), RMSNorm computed as x·(1 + w), head_dim independent of dim / n_heads, tied classifier.

GGUF (llama.cpp's `gemma` architecture) stores the norm weights as 1 + w, which is what
llama.cpp's converter writes; that is the canonical form here, so HF readers add 1 and HF
writers subtract it. Rotary pairs are half-split (NEOX), as HF stores them.
"""
from __future__ import annotations

from .decoder import HF_KEYS, HF_NAMES, Decoder


class Gemma(Decoder):
    name = "gemma"
    title = "Gemma"
    hf_special_ids = (2, 1)
    gguf_arch = "gemma"
    hf_classes = ("GemmaForCausalLM",)
    hf_model_types = ("gemma",)
    hf_class = "GemmaForCausalLM"
    hf_model_type = "gemma"
    rope_style = "neox"
    hf_permuted = False
    activation = "gelu_tanh"
    embed_scale = True
    norm_plus_one = True
    # transformers runs Gemma's MLP with gelu_pytorch_tanh whatever an old config's hidden_act says
    hf_activations = ("gelu_pytorch_tanh", "gelu")
    names = {"hf": HF_NAMES}
    hparam_keys = {"hf": HF_KEYS}
    hf_tie_default = True

    def present(self, name, cfg):
        if name == "output.weight":
            return False  # Gemma always ties: llama.cpp's gemma loads no output tensor
        return super().present(name, cfg)

    def build_config(self, canon, declared, layout, problems):
        canon.pop("output.weight", None)  # a copy of the embedding some exporters (autoawq) save
        cfg = super().build_config(canon, declared, layout, problems)
        cfg.tie_embeddings = True
        return cfg

    def hf_config(self, c):
        config = super().hf_config(c)
        config["hidden_activation"] = "gelu_pytorch_tanh"
        config["tie_word_embeddings"] = True
        return config


FAMILY = Gemma()
