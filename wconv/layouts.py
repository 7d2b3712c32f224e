"""Tensor name maps between layouts, as data. The one place that knows them.

Canonical names are GGUF's (gguf-py `TENSOR_NAMES`), with `{i}` for the block
index. Each layout maps canonical -> its own name. Conversions go through the
canonical name: layout A -> canonical -> layout B.
"""
from __future__ import annotations

import re

import numpy as np

# --- Llama family -------------------------------------------------------------
LLAMA_CANONICAL = (
    "token_embd.weight",
    "blk.{i}.attn_norm.weight",
    "blk.{i}.attn_q.weight",
    "blk.{i}.attn_k.weight",
    "blk.{i}.attn_v.weight",
    "blk.{i}.attn_output.weight",
    "blk.{i}.ffn_norm.weight",
    "blk.{i}.ffn_gate.weight",
    "blk.{i}.ffn_down.weight",
    "blk.{i}.ffn_up.weight",
    "output_norm.weight",
    "output.weight",
)

# Meta's consolidated.NN.pth; llama2.c's model.py (ckpt.pt) uses the same names.
META = {
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
    "token_embd.weight": 1,
    "blk.{i}.attn_norm.weight": None,
    "blk.{i}.attn_q.weight": 0,
    "blk.{i}.attn_k.weight": 0,
    "blk.{i}.attn_v.weight": 0,
    "blk.{i}.attn_output.weight": 1,
    "blk.{i}.ffn_norm.weight": None,
    "blk.{i}.ffn_gate.weight": 0,
    "blk.{i}.ffn_down.weight": 1,
    "blk.{i}.ffn_up.weight": 0,
    "output_norm.weight": None,
    "output.weight": 0,
}

# Hugging Face LlamaForCausalLM. q/k rows are permuted for HF's rotate_half rotary.
HF_LLAMA = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# --- GPT-2 family ---------------------------------------------------------------
GPT2_CANONICAL = (
    "token_embd.weight",
    "position_embd.weight",
    "blk.{i}.attn_norm.weight", "blk.{i}.attn_norm.bias",
    "blk.{i}.attn_qkv.weight", "blk.{i}.attn_qkv.bias",
    "blk.{i}.attn_output.weight", "blk.{i}.attn_output.bias",
    "blk.{i}.ffn_norm.weight", "blk.{i}.ffn_norm.bias",
    "blk.{i}.ffn_up.weight", "blk.{i}.ffn_up.bias",
    "blk.{i}.ffn_down.weight", "blk.{i}.ffn_down.bias",
    "output_norm.weight", "output_norm.bias",
    "output.weight",
)

# nanoGPT's model.py (nn.Linear, [out, in]).
NANOGPT = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "blk.{i}.attn_norm.weight": "transformer.h.{i}.ln_1.weight",
    "blk.{i}.attn_norm.bias": "transformer.h.{i}.ln_1.bias",
    "blk.{i}.attn_qkv.weight": "transformer.h.{i}.attn.c_attn.weight",
    "blk.{i}.attn_qkv.bias": "transformer.h.{i}.attn.c_attn.bias",
    "blk.{i}.attn_output.weight": "transformer.h.{i}.attn.c_proj.weight",
    "blk.{i}.attn_output.bias": "transformer.h.{i}.attn.c_proj.bias",
    "blk.{i}.ffn_norm.weight": "transformer.h.{i}.ln_2.weight",
    "blk.{i}.ffn_norm.bias": "transformer.h.{i}.ln_2.bias",
    "blk.{i}.ffn_up.weight": "transformer.h.{i}.mlp.c_fc.weight",
    "blk.{i}.ffn_up.bias": "transformer.h.{i}.mlp.c_fc.bias",
    "blk.{i}.ffn_down.weight": "transformer.h.{i}.mlp.c_proj.weight",
    "blk.{i}.ffn_down.bias": "transformer.h.{i}.mlp.c_proj.bias",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}

# Hugging Face GPT2LMHeadModel: same names as nanoGPT, but its Conv1D layers store
# weights as [in, out], so these are transposed on the way in and out.
HF_GPT2 = dict(NANOGPT)
HF_GPT2_TRANSPOSED = (
    "blk.{i}.attn_qkv.weight", "blk.{i}.attn_output.weight",
    "blk.{i}.ffn_up.weight", "blk.{i}.ffn_down.weight",
)

LAYOUTS = {"meta": META, "llama2c-ckpt": META, "hf-llama": HF_LLAMA, "nanogpt": NANOGPT,
           "hf-gpt2": HF_GPT2}


# HF's Llama conversion reorders each head's q/k rows for its rotate_half rotary: Meta's
# interleaved pairs (2i, 2i+1) become half-split rows (evens, then odds). k uses n_kv_heads.
def hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta's interleaved rotary rows -> HF's half-split rows (per head: evens then odds)."""
    rows = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def hf_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of hf_permute: HF's half-split rows -> Meta's interleaved rows."""
    rows = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


# Prefixes that wrap a state dict without changing it.
STRIP_PREFIXES = ("_orig_mod.", "module.")

# Buffers some checkpoints save that are not weights (every runtime recomputes them),
# as full-match regexes on names after prefix stripping.
IGNORED_TENSORS = (
    r"rope\.freqs",  # old Meta consolidated.NN.pth
    r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq",  # older HF Llama saves
    r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)",  # GPT-2 causal-mask buffers (HF, nanoGPT)
)

# HF GPT2Model (no LM head) saves the GPT-2 names without this prefix.
HF_GPT2_OPTIONAL_PREFIX = "transformer."


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


_REVERSE = {}


def _reverse(layout: str):
    if layout not in _REVERSE:
        _REVERSE[layout] = [(_pattern(theirs), canon) for canon, theirs in LAYOUTS[layout].items()]
    return _REVERSE[layout]


def to_canonical(name: str, layout: str) -> str | None:
    """The canonical name for a tensor called `name` in `layout`, or None."""
    for pat, canon in _reverse(layout):
        m = pat.match(name)
        if m:
            return canon.replace("{i}", m.group(1)) if m.groups() else canon
    return None


def from_canonical(name: str, layout: str) -> str | None:
    """The name `layout` uses for canonical tensor `name`, or None."""
    template, idx = template_of(name)
    theirs = LAYOUTS[layout].get(template)
    if theirs is None:
        return None
    return theirs.replace("{i}", str(idx)) if idx is not None else theirs


_BLK = re.compile(r"^blk\.(\d+)\.")


def template_of(canonical: str) -> tuple[str, int | None]:
    """('blk.{i}.attn_q.weight', 3) for 'blk.3.attn_q.weight'."""
    m = _BLK.match(canonical)
    if not m:
        return canonical, None
    return "blk.{i}." + canonical[m.end():], int(m.group(1))


def strip_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in STRIP_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def expected_names(arch: str, n_layers: int, tied: bool) -> list[str]:
    """Canonical tensor names of a complete model, in llama.cpp's order."""
    templates = LLAMA_CANONICAL if arch == "llama" else GPT2_CANONICAL
    head = [t for t in templates if "{i}" not in t and not t.startswith("output")]
    block = [t for t in templates if "{i}" in t]
    tail = [t for t in templates if t.startswith("output") and not (tied and t == "output.weight")]
    names = list(head)
    for i in range(n_layers):
        names += [t.replace("{i}", str(i)) for t in block]
    return names + tail
