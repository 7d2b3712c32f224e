"""llama-quantize's per-tensor type choice ("Q4_K_M" and the other mixes) as data.

Follows src/llama-quant.cpp of the llama.cpp that llama-cpp-python 0.3.36 vendors
(ggml 0.25.3): tensor_allows_quantization, llama_tensor_get_type(_impl),
tensor_type_fallback, init_quantize_state_counters, with no importance matrix and
llama_model_quantize_default_params() otherwise. Only the file types wconv offers are
in the table (no IQ*, TQ*, Q2_K_S, MXFP4 mixes).

Facts that decide the outcome, all from that source:
- llama.cpp visits tensors sorted by (layer from "blk.%d.", -1 for none; then name),
  and the attn_v / ffn_down counters advance in that order;
- n_attention_wv counts every attn_v-like name (attn_v, attn_qkv, attn_kv_b); the
  ffn_down layer count is the block count;
- a fused attn_qkv (GPT-2, Falcon, Phi-2 ...) is "attn_v-like": it takes the attn_v
  rules and counter. llama-quant.cpp also has an ATTENTION_QKV branch further down
  (Q4_K_M -> Q5_K ...), but the attn_v branch comes first, so that branch never runs;
- without output.weight the token embedding is tied and is treated as the output;
- a 1-D tensor, a name not ending in "weight", norms, position embeddings and the
  other names in _NEVER_QUANTISED keep their source type.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .dtypes import ALL as _DTYPES

LLAMA_CPP_SOURCE = "llama.cpp vendored by llama-cpp-python 0.3.36 (ggml 0.25.3), src/llama-quant.cpp"

# ftype name -> (llama_ftype id written as general.file_type, default GGML type)
FTYPES = {
    "f32": (0, "F32"), "f16": (1, "F16"), "bf16": (32, "BF16"),
    "q4_0": (2, "Q4_0"), "q4_1": (3, "Q4_1"), "q5_0": (8, "Q5_0"), "q5_1": (9, "Q5_1"), "q8_0": (7, "Q8_0"),
    "q2_k": (10, "Q2_K"), "q3_k_s": (11, "Q3_K"), "q3_k_m": (12, "Q3_K"), "q3_k_l": (13, "Q3_K"),
    "q4_k_s": (14, "Q4_K"), "q4_k_m": (15, "Q4_K"), "q5_k_s": (16, "Q5_K"), "q5_k_m": (17, "Q5_K"),
    "q6_k": (18, "Q6_K"),
}

# The names a --dtype mix takes: llama-quantize's k-quant mixes (the others are one type each).
K_MIXES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
QUANTISED_FTYPES = K_MIXES + LEGACY

# The tensor types a mix (or an override) may choose, with their block sizes from the dtype table.
BLOCK = {t: _DTYPES[t].block for t in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                                       "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")}
QUANTISED = {t for t, b in BLOCK.items() if b > 1}

# tensor_type_fallback: the type used when a row is not a whole number of blocks
# (and F16 if even that does not fit). 32-blocks have nothing smaller: F16 directly.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# tensor_allows_quantization: substrings that keep a tensor's type, exact names,
# and per-architecture extras.
_NEVER_QUANTISED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
_NEVER_QUANTISED_NAMES = ("position_embd.weight", "token_types.weight")
_NEVER_QUANTISED_ARCH = {
    "glm5-next": ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                  "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
                  "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
                  "attn_v_b.weight"),
}

# tensor_get_category: first match wins (exact names, then substrings).
_CATEGORY_EXACT = {"output.weight": "output", "token_embd.weight": "token_embd",
                   "per_layer_token_embd.weight": "token_embd"}
_CATEGORY_SUBSTR = (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                    ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                    ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"))
_ATTN_V_LIKE = {"attn_v", "attn_qkv", "attn_kv_b"}

# Where llama.cpp's model type is LLM_TYPE_70B (it bumps attn_v): arch -> block count.
_70B_LAYERS = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}

# The mix rules of llama_tensor_get_type_impl for the ftypes above, by category:
# rows (ftypes, condition, type); the first row whose ftype and condition hold decides.
# Conditions are names in _CONDITIONS; "i"/"n" are the layer and layer count the C uses.
_K_MIX_ATTN_OUTPUT_8X = ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m")
RULES = {
    "attn_v": [
        (("q2_k",), "gqa>=4", "Q4_K"),
        (("q2_k",), "always", "Q3_K"),
        (("q3_k_m",), "i_attn_v<2", "Q5_K"),
        (("q3_k_m",), "always", "Q4_K"),
        (("q3_k_l",), "always", "Q5_K"),
        (("q4_k_m", "q5_k_m"), "more_bits(i_attn_v,n_attn_v)", "Q6_K"),
        (("q4_k_s",), "i_attn_v<4", "Q5_K"),
    ],
    # applied after the attn_v rows, in this order
    "attn_v_after": [
        ("70B", ("Q3_K", "Q4_K"), "Q5_K"),
        ("n_expert==8", None, "Q8_0"),
    ],
    "attn_k": [
        (None, "n_expert==8", "Q8_0"),
    ],
    "ffn_down": [
        (("q2_k",), "always", "Q3_K"),
        (("q3_k_m",), "i<n/16", "Q5_K"),
        (("q3_k_m",), "not_falcon", "Q4_K"),
        (("q3_k_m",), "more_bits(i,n)", "Q4_K"),
        (("q3_k_m",), "always", "Q3_K"),
        (("q3_k_l",), "falcon", "Q4_K"),
        (("q3_k_l",), "always", "Q5_K"),
        (("q4_k_m",), "falcon&i<n/16", "Q6_K"),
        (("q4_k_m",), "falcon&more_bits(i,n)", "Q5_K"),
        (("q4_k_m",), "falcon", "Q4_K"),
        (("q4_k_m",), "more_bits(i,n)", "Q6_K"),
        (("q5_k_m",), "more_bits(i,n)", "Q6_K"),
        (("q4_k_s",), "not_falcon&i<n/8", "Q5_K"),
    ],
    "attn_output": [
        (_K_MIX_ATTN_OUTPUT_8X, "not_falcon&n_expert==8", "Q5_K"),
        (None, "not_falcon&n_expert==8", None),  # other ftypes: unchanged
        (("q2_k",), "not_falcon", "Q3_K"),
        (("q3_k_m",), "not_falcon", "Q4_K"),
        (("q3_k_l",), "not_falcon", "Q5_K"),
        (("q3_k_l",), "falcon", "Q4_K"),
    ],
}


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


_CONDITIONS = {
    "always": lambda c: True,
    "gqa>=4": lambda c: c["gqa"] >= 4,
    "i_attn_v<2": lambda c: c["i_attn_v"] < 2,
    "i_attn_v<4": lambda c: c["i_attn_v"] < 4,
    "more_bits(i_attn_v,n_attn_v)": lambda c: _more_bits(c["i_attn_v"], c["n_attn_v"]),
    "n_expert==8": lambda c: c["n_expert"] == 8,
    "i<n/16": lambda c: c["i"] < c["n"] // 16,
    "more_bits(i,n)": lambda c: _more_bits(c["i"], c["n"]),
    "falcon": lambda c: c["arch"] == "falcon",
    "not_falcon": lambda c: c["arch"] != "falcon",
    "falcon&i<n/16": lambda c: c["arch"] == "falcon" and c["i"] < c["n"] // 16,
    "falcon&more_bits(i,n)": lambda c: c["arch"] == "falcon" and _more_bits(c["i"], c["n"]),
    "not_falcon&i<n/8": lambda c: c["arch"] != "falcon" and c["i"] < c["n"] // 8,
    "not_falcon&n_expert==8": lambda c: c["arch"] != "falcon" and c["n_expert"] == 8,
}


@dataclass(frozen=True)
class HParams:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    n_expert: int = 0
    arch: str = "llama"

    @property
    def n_gqa(self) -> int:
        return self.n_heads // self.n_kv_heads if self.n_kv_heads else 0

    @property
    def is_70b(self) -> bool:
        if self.arch == "llama" and (self.n_expert == 8 or self.n_heads == self.n_kv_heads):
            return False
        return _70B_LAYERS.get(self.arch) == self.n_layers


@dataclass(frozen=True)
class Overrides:
    """llama-quantize's --output-tensor-type, --token-embedding-type and --pure."""
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False


@dataclass(frozen=True)
class Fallback:
    name: str
    wanted: str
    used: str
    why: str


@dataclass
class MixPlan:
    ftype: str                      # normalised ftype name, e.g. "q4_k_m"
    file_type: int                  # llama_ftype id for general.file_type
    types: dict = field(default_factory=dict)      # tensor name -> GGML type name, in input order
    fallbacks: list = field(default_factory=list)  # [Fallback]
    source: str = LLAMA_CPP_SOURCE


def ftype_names() -> list:
    return list(FTYPES)


def _type_name(t: str | None) -> str | None:
    if t is None:
        return None
    up = str(t).upper()
    if up not in BLOCK:
        raise ValueError(f"unknown tensor type {t!r}; choose one of {', '.join(sorted(BLOCK))}")
    return up


def category(name: str) -> str:
    if name in _CATEGORY_EXACT:
        return _CATEGORY_EXACT[name]
    for needle, cat in _CATEGORY_SUBSTR:
        if needle in name:
            return cat
    return "other"


def _n_dims(shape) -> int:
    """ggml_n_dims for a numpy-order shape: trailing ggml dims of 1 (leading numpy 1s) do not count."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return max(1, len(dims))


def allows_quantization(name: str, shape, arch: str) -> bool:
    """tensor_allows_quantization with default params (quantize_output_tensor on, only_copy off)."""
    if _n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if name in _NEVER_QUANTISED_NAMES:
        return False
    extra = _NEVER_QUANTISED_ARCH.get(arch, ())
    return not any(s in name for s in _NEVER_QUANTISED + extra)


_LAYER = re.compile(r"blk\.([+-]?\d+)\.")


def _layer(name: str) -> int:
    """sscanf(name, "blk.%d.", &layer), -1 when the name does not start that way."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def visiting_order(names) -> list:
    """llama_model_loader's weights_map order: by layer (-1 first), then by name (bytewise)."""
    return sorted(names, key=lambda n: (_layer(n), n.encode()))


def _apply_rows(rows, ftype, ctx, new_type):
    for ftypes, cond, t in rows:
        if (ftypes is None or ftype in ftypes) and _CONDITIONS[cond](ctx):
            return new_type if t is None else t
    return new_type


class _State:
    def __init__(self, names, hp: HParams):
        self.n_attn_v = sum(category(n) in _ATTN_V_LIKE for n in names)
        self.tied = "output.weight" not in names
        self.n_ffn = hp.n_layers
        self.i_attn_v = 0
        self.i_ffn_down = 0


def _mix_type(st: _State, hp: HParams, ftype: str, name: str, shape, new_type: str, out_override) -> str:
    """llama_tensor_get_type_impl for the ftypes in FTYPES."""
    cat = category(name)
    ctx = {"gqa": hp.n_gqa, "n_expert": hp.n_expert, "arch": hp.arch}
    if cat == "output" or (st.tied and cat == "token_embd"):
        if out_override is not None:
            return out_override
        if hp.arch == "falcon" or shape[-1] % BLOCK[new_type]:
            return "Q8_0"
        return "Q6_K" if new_type != "Q8_0" else new_type
    if cat == "token_embd":
        return new_type
    if cat in _ATTN_V_LIKE:
        ctx.update(i_attn_v=st.i_attn_v, n_attn_v=st.n_attn_v)
        new_type = _apply_rows(RULES["attn_v"], ftype, ctx, new_type)
        for cond, only, t in RULES["attn_v_after"]:
            hit = hp.is_70b if cond == "70B" else _CONDITIONS[cond](ctx)
            if hit and (only is None or new_type in only):
                new_type = t
        st.i_attn_v += 1
        return new_type
    if cat == "attn_k":
        return _apply_rows(RULES["attn_k"], ftype, ctx, new_type)
    if cat == "ffn_down":
        i = st.i_ffn_down
        if hp.n_expert > 1:  # expert tensors are not visited one per layer: the C reads the name
            i = _layer(name)
            if not 0 <= i < st.n_ffn:
                raise ValueError(f"cannot tell the layer of tensor {name} (block count {st.n_ffn})")
        ctx.update(i=i, n=st.n_ffn)
        new_type = _apply_rows(RULES["ffn_down"], ftype, ctx, new_type)
        st.i_ffn_down += 1
        return new_type
    if cat == "attn_output":
        return _apply_rows(RULES["attn_output"], ftype, ctx, new_type)
    return new_type


def _fallback(name: str, shape, target: str, plan: MixPlan) -> str:
    """tensor_type_fallback: a type whose block divides the row length."""
    ncols = shape[-1]
    if ncols % BLOCK[target] == 0:
        return target
    why = f"row length {ncols} is not a multiple of {BLOCK[target]}"
    used = FALLBACK.get(target, target)
    if ncols % BLOCK[used]:
        if used != target:
            why += f" nor of {BLOCK[used]}"
        used = "F16"
    plan.fallbacks.append(Fallback(name, target, used, why))
    return used


def _entries(tensors):
    """(name, shape, source type) from a mapping name -> shape or an iterable of tuples."""
    items = tensors.items() if hasattr(tensors, "items") else tensors
    for item in items:
        if len(item) == 2:
            name, shape = item
            src = "F32"
        else:
            name, shape, src = item
        yield str(name), tuple(int(d) for d in shape), str(src).upper()


def plan(tensors, hparams: HParams, ftype_name: str, overrides: Overrides | dict | None = None) -> MixPlan:
    """The type llama-quantize gives each tensor for `ftype_name` (e.g. "Q4_K_M").

    tensors: {name: shape} or [(name, shape[, source type name])], GGUF names and numpy
    (rows, cols) shapes; the source type (default F32) is kept by tensors that are
    never quantised. hparams: block count, heads, KV heads, experts, GGUF arch name.
    Returns a MixPlan: .types {name: GGML type name} in input order, .fallbacks with
    why, .file_type (llama_ftype). Raises ValueError for an unknown ftype or type, or a
    forced type (override) whose block does not divide a row (llama.cpp aborts there).
    """
    ftype = str(ftype_name).lower()
    if ftype not in FTYPES:
        raise ValueError(f"unknown quantisation {ftype_name!r}; choose one of {', '.join(FTYPES)}")
    if isinstance(overrides, dict):
        overrides = Overrides(**overrides)
    overrides = overrides or Overrides()
    out_t = _type_name(overrides.output_tensor_type)
    emb_t = _type_name(overrides.token_embedding_type)
    file_type, default = FTYPES[ftype]
    entries = list(_entries(tensors))
    by_name = {name: (shape, src) for name, shape, src in entries}
    st = _State(list(by_name), hparams)
    result = MixPlan(ftype=ftype, file_type=file_type)
    chosen = {}
    for name in visiting_order(by_name):
        shape, src = by_name[name]
        cat = category(name)
        if not allows_quantization(name, shape, hparams.arch):
            t = src
        elif emb_t is not None and cat == "token_embd":
            t = _forced(name, shape, emb_t, "token embedding type")
        elif out_t is not None and cat == "output":
            t = _forced(name, shape, out_t, "output tensor type")
        else:
            t = default
            if t in QUANTISED:
                if not overrides.pure:
                    t = _mix_type(st, hparams, ftype, name, shape, t, out_t)
                t = _fallback(name, shape, t, result)
        chosen[name] = t
    result.types = {name: chosen[name] for name, _, _ in entries}
    return result


def _forced(name, shape, t, what):
    if shape[-1] % BLOCK[t]:
        raise ValueError(f"{what} {t} cannot hold tensor {name}: row length {shape[-1]} is not a multiple of "
                         f"{BLOCK[t]}")
    return t
