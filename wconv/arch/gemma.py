"""Gemma (GemmaForCausalLM, the first generation): GeGLU with tanh GELU, embeddings scaled by
sqrt(dim), RMSNorm computed as x·(1 + w), head_dim independent of dim / n_heads, tied classifier.

A checkpoint that also stores lm_head.weight (autoawq exports do) keeps it as output.weight:
transformers 5 classifies with that tensor when it is in the file, and the two are only the same
when the values are. GGUF refuses such a model (llama.cpp's gemma loads no output tensor);
HF and safetensors outputs carry it.

GGUF (llama.cpp's `gemma` architecture) stores the norm weights as 1 + w, which is what
llama.cpp's converter writes; that is the canonical form here, so HF readers add 1 and HF
writers subtract it. Rotary pairs are half-split (NEOX), as HF stores them.
"""
from __future__ import annotations

from .decoder import HF_KEYS, HF_NAMES, Decoder


class Gemma(Decoder):
    name = "gemma"
    title = "Gemma"
    long_title = "Gemma (first generation)"
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

    def hf_activation_refusals(self, side):
        # transformers 5 runs ACT2FN[hidden_act] with the legacy "gelu" meaning tanh; 4.x ran
        # hidden_activation when set (else tanh). Both read as tanh-GELU or the config is refused.
        out = []
        if side.get("hidden_act") not in (None, "gelu", "gelu_pytorch_tanh"):
            out.append(f"hidden_act {side['hidden_act']!r:.40} (Gemma's MLP is tanh-GELU)")
        if side.get("hidden_activation") not in (None, "gelu_pytorch_tanh"):
            out.append(f"hidden_activation {side['hidden_activation']!r:.40} (transformers 4 and 5 would "
                       "disagree on it; Gemma's MLP is tanh-GELU)")
        return out

    def gguf_refusal(self, cfg):
        if not cfg.tie_embeddings:
            return ("this Gemma checkpoint has its own lm_head.weight, which transformers uses as the classifier; "
                    "llama.cpp's gemma architecture always classifies with the token embedding")
        return None

    def hf_config(self, c):
        config = super().hf_config(c)
        config["hidden_activation"] = "gelu_pytorch_tanh"
        return config


FAMILY = Gemma()
