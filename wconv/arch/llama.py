"""Llama 1 / 2 / 3 / 3.1 / 3.2 / 3.3 (Meta, llama2.c, Hugging Face LlamaForCausalLM).

Canonical q/k rows are in Meta's interleaved rotary order, what llama.cpp's `llama`
architecture and llama2.c expect; HF checkpoints store them permuted for rotate_half.
Llama 3.1+ RoPE scaling ("llama3": factor, low/high frequency factors, original context)
comes from config.json's rope_scaling (or rope_parameters) or from Meta's params.json
`use_scaled_rope` (Meta's fixed constants); GGUF gets it as llama.cpp's own converter writes
it, a `rope_freqs.weight` tensor of per-frequency factors.
"""
from __future__ import annotations

import numbers

from .decoder import HF_KEYS, HF_NAMES, Decoder
from .family import refuse

META_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}

# Meta model-parallel shards: the axis each tensor is split along (None: replicated).
# Embeddings, wo and w2 are split on the input axis (1); other matrices on the output axis (0).
META_SHARD_AXIS = {
    "token_embd.weight": 1, "blk.{i}.attn_q.weight": 0, "blk.{i}.attn_k.weight": 0, "blk.{i}.attn_v.weight": 0,
    "blk.{i}.attn_output.weight": 1, "blk.{i}.ffn_gate.weight": 0, "blk.{i}.ffn_down.weight": 1,
    "blk.{i}.ffn_up.weight": 0, "output.weight": 0,
}

# Meta's use_scaled_rope constants (llama-models' apply_scaling).
META_SCALED_ROPE = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}

# params.json keys of Meta's Llama 4 code (llama-models models/llama4/args.py) that change its RoPE.
META_LLAMA4_ROPE = {"rope_scaling_factor", "rope_high_freq_factor"}
# Context length of Meta's scaled-RoPE models (Llama 3.1 / 3.2 / 3.3 model cards: 128K), which
# params.json does not state; transformers' converter writes the same max_position_embeddings.
META_SCALED_ROPE_CONTEXT = 131072

# params.json keys that do not change the math, beyond the ones read as hyperparameters.
META_INERT = {"multiple_of", "ffn_dim_multiplier", "max_batch_size", "model_parallel_size"}
# llama.c model_args / llama2.c ModelArgs keys that do not change the math.
LLAMA2C_INERT = {"multiple_of", "dropout", "max_batch_size"}


class Llama(Decoder):
    name = "llama"
    title = "Llama"
    long_title = "Llama 1 / 2 / 3 / 3.1 / 3.2 / 3.3"
    other_sources = ("Meta consolidated.NN.pth + params.json", "llama2.c")
    hf_special_ids = (1, 2)
    gguf_arch = "llama"
    hf_classes = ("LlamaForCausalLM",)
    hf_model_types = ("llama",)
    hf_class = "LlamaForCausalLM"
    hf_model_type = "llama"
    llama2c = True
    rope_scalings = ("linear", "llama3")
    names = {"meta": META_NAMES, "llama2c-ckpt": META_NAMES, "hf": HF_NAMES}
    hparam_keys = {
        "meta": {"dim": ("dim",), "n_layers": ("n_layers",), "n_heads": ("n_heads",), "n_kv_heads": ("n_kv_heads",),
                 "vocab_size": ("vocab_size",), "hidden_dim": ("hidden_dim",), "max_seq_len": ("max_seq_len",),
                 "norm_eps": ("norm_eps",), "rope_theta": ("rope_theta",), "head_width": ("head_dim",)},
        "llama2c-ckpt": {"dim": ("dim",), "n_layers": ("n_layers",), "n_heads": ("n_heads",),
                         "n_kv_heads": ("n_kv_heads",), "vocab_size": ("vocab_size",), "hidden_dim": ("hidden_dim",),
                         "max_seq_len": ("max_seq_len",), "norm_eps": ("norm_eps",), "rope_theta": ("rope_theta",)},
        "hf": HF_KEYS,
    }
    shard_axis = META_SHARD_AXIS

    def declared(self, layout, side, problems, where):
        d = super().declared(layout, side, problems, where)
        if layout == "meta" and side.get("use_scaled_rope") is True:
            # llama-models' Llama 3 code applies these fixed constants whenever use_scaled_rope is set
            # (3.1, 3.2 and 3.3 alike; transformers' converter writes factor 32 for 3.2 on its own account)
            d["rope_scaling"] = dict(META_SCALED_ROPE)
        return d

    def refusals(self, layout, side):
        out = super().refusals(layout, side)
        if layout == "meta":
            known = set(self.hparam_keys["meta"].values()) | {("use_scaled_rope",)}
            known = {k for keys in known for k in keys} | META_INERT
            if side.get("use_scaled_rope") not in (None, True, False):
                out.append(f"params.json use_scaled_rope = {side['use_scaled_rope']!r:.40}")
            llama4 = sorted(k for k in side if k in META_LLAMA4_ROPE)
            if llama4:
                out.append(f"params.json {', '.join(llama4)} (Llama 4's RoPE settings, which Meta's Llama 3 code "
                           "ignores and its Llama 4 code applies)")
            odd = sorted(k for k in side if k not in known and k not in META_LLAMA4_ROPE)
            if odd:
                out.append(f"params.json field(s) {', '.join(odd[:4])} (e.g. Mixture-of-Experts, vision or "
                           "quantisation settings), which wconv does not implement")
        elif layout == "llama2c-ckpt":
            known = {k for keys in self.hparam_keys["llama2c-ckpt"].values() for k in keys} | LLAMA2C_INERT
            odd = sorted(str(k) for k in side if k not in known)
            if odd:
                out.append(f"model_args {', '.join(odd[:4])}, which wconv does not implement")
        return out

    def default_context(self, layout, declared):
        if layout == "meta" and declared.get("rope_scaling") == META_SCALED_ROPE:
            return META_SCALED_ROPE_CONTEXT, "Meta's Llama 3.1-3.3 context, use_scaled_rope"
        return super().default_context(layout, declared)

    def gguf_config(self, kv, tensors, problems):
        cfg = super().gguf_config(kv, tensors, problems)
        if cfg.sliding_window:  # a Mistral with a window, as wconv writes it (llama.cpp ignores the key)
            cfg.arch = "mistral"
            problems.notes.append(f"llama.attention.sliding_window = {cfg.sliding_window}: read as Mistral with "
                                  "that attention window (llama.cpp itself attends over the whole context)")
        return cfg

    def gguf_sliding_window(self, kv, problems):
        v = kv.get("llama.attention.sliding_window", 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            refuse(problems, f"llama.attention.sliding_window is {v!r:.40}, expected a whole number")
            return 0
        return v

    def meta_hidden_note(self, canon, params, problems):
        """Meta's FFN width rule; a mismatch is only noted (the shapes are the truth)."""
        dim, multiple_of = params.get("dim"), params.get("multiple_of")
        w1 = canon.get("blk.0.ffn_gate.weight")
        if not (isinstance(dim, int) and isinstance(multiple_of, int) and multiple_of > 0 and w1 is not None):
            return
        hidden = int(2 * (4 * dim) / 3)
        multiplier = params.get("ffn_dim_multiplier")
        if isinstance(multiplier, bool) or not (multiplier is None or isinstance(multiplier, numbers.Real)):
            problems.notes.append(f"params.json ffn_dim_multiplier {multiplier!r:.40} is not a number; ignored")
            return
        if multiplier:
            hidden = int(multiplier * hidden)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        if hidden != w1.shape[0]:
            problems.notes.append(f"params.json implies hidden_dim {hidden} but w1 has {w1.shape[0]} rows; using w1")


FAMILY = Llama()
