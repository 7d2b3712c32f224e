"""Layout detection: a flat state dict (+ params.json / model_args / config.json) -> Model.

Recognised layouts (name maps in wconv/layouts.py):
  meta          Meta consolidated.NN.pth (+ params.json), also a bare state dict of Meta names
  llama2c-ckpt  llama2.c ckpt.pt: {"model": Meta names, "model_args": {dim, n_layers, ...}, ...}
  nanogpt       nanoGPT ckpt.pt: {"model": transformer.wte..., "model_args": {n_embd, ...}, ...}
  hf-llama      Hugging Face LlamaForCausalLM (q/k rows un-permuted back to Meta order)
  hf-gpt2       Hugging Face GPT2LMHeadModel (Conv1D [in, out] weights transposed to [out, in])
  canonical     our own names (a safetensors file wconv wrote; Config in its __metadata__)

Hyperparameters come from the declared config where the shapes cannot tell (n_heads,
norm_eps, rope_theta, max_seq_len) and from the tensor shapes otherwise; a declared value
that contradicts a shape is an error. Tied classifier: the output tensor is dropped when it
shares its storage with the token embedding (same storage_key, shape and dtype). Values are
never compared: that would read tensor data at open time, and keeping an untied copy is
always correct.

strict=False (inspect) never refuses a readable file: an unrecognised or incomplete layout
becomes arch "unknown" with the tensors under their file names, and the problems are listed
in metadata["warnings"].
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re

import numpy as np

from .. import layouts
from ..errors import FormatError, UnsupportedError
from ..model import Config, Model
from ..tensor import LazyTensor

_IGNORED = re.compile("|".join(f"(?:{p})" for p in layouts.IGNORED_TENSORS))
_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "module")
DEFAULT_META_MAX_SEQ_LEN = 2048  # Meta's ModelArgs default; params.json usually omits it

_Q = "blk.{i}.attn_q.weight"
_K = "blk.{i}.attn_k.weight"


# --- bounded, JSON-safe summaries of non-tensor content ---------------------------------

def describe_tensor(t: LazyTensor) -> dict:
    return {"tensor": {"dtype": t.dtype.name, "shape": list(t.shape)}}


def summarise(obj, *, depth: int = 0, max_items: int = 32, max_depth: int = 5, max_str: int = 300):
    """A JSON-serialisable, size-bounded rendering of a pickled object tree (no tensor data)."""
    kw = dict(depth=depth + 1, max_items=max_items, max_depth=max_depth, max_str=max_str)
    if isinstance(obj, LazyTensor):
        return describe_tensor(obj)
    if obj is None or isinstance(obj, (bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, str):
        return obj if len(obj) <= max_str else obj[:max_str] + f"... ({len(obj)} chars)"
    if isinstance(obj, (bytes, bytearray)):
        return f"<{len(obj)} bytes>"
    if isinstance(obj, dict):
        if is_optimizer_state(obj):
            return summarise_optimizer(obj)
        if depth >= max_depth:
            return f"<dict of {len(obj)} entries>"
        out = {}
        for i, (k, v) in enumerate(obj.items()):
            if i >= max_items:
                out["..."] = f"{len(obj) - max_items} more entries"
                break
            out[str(k)] = summarise(v, **kw)
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
        if depth >= max_depth:
            return f"<list of {len(items)} items>"
        if len(items) > max_items:
            n_tensors = sum(isinstance(x, LazyTensor) for x in items)
            return {"list_length": len(items), "n_tensors": n_tensors,
                    "head": [summarise(x, **kw) for x in items[:8]]}
        return [summarise(x, **kw) for x in items]
    text = repr(obj)
    return text if len(text) <= max_str else text[:max_str] + "..."


def is_optimizer_state(obj) -> bool:
    return isinstance(obj, dict) and "state" in obj and "param_groups" in obj


def summarise_optimizer(obj) -> dict:
    """Counts and shapes, not values: optimizer state is often larger than the model."""
    state = obj.get("state") or {}
    tensors = list(iter_tensors(state))
    keys = set()
    if isinstance(state, dict):
        for v in state.values():
            if isinstance(v, dict):
                keys.update(str(k) for k in v)
    groups = []
    for g in obj.get("param_groups") or []:
        if isinstance(g, dict):
            entry = {k: summarise(v, depth=3) for k, v in g.items() if k != "params"}
            entry["n_params"] = len(g.get("params") or [])
            groups.append(entry)
    return {"optimizer": {"n_param_states": len(state) if hasattr(state, "__len__") else 0,
                          "state_keys": sorted(keys), "n_tensors": len(tensors),
                          "n_bytes": sum(t.nbytes for _, t in tensors),
                          "param_groups": groups[:16]}}


def iter_tensors(obj, prefix: str = ""):
    """(dotted path, LazyTensor) for every tensor in a nested dict/list tree."""
    if isinstance(obj, LazyTensor):
        yield prefix or "tensor", obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, f"{prefix}.{i}" if prefix else str(i))


# --- object tree -> (state dict, the rest) ------------------------------------------------

def split_checkpoint(obj) -> tuple[dict, dict, bool]:
    """(tensors by name, other top-level entries, whether a state dict was found)."""
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            sub = obj.get(key)
            if isinstance(sub, dict) and any(isinstance(v, LazyTensor) for v in sub.values()):
                extras = {k: v for k, v in obj.items() if k != key}
                return dict(iter_tensors(sub)), extras, True
        if any(isinstance(v, LazyTensor) for v in obj.values()):
            tensors, extras = {}, {}
            for k, v in obj.items():
                if isinstance(v, LazyTensor):
                    tensors[str(k)] = v
                else:
                    extras[str(k)] = v
            return tensors, extras, True
        return dict(iter_tensors(obj)), {}, False
    return dict(iter_tensors(obj)), {}, False


# --- Meta model-parallel shards --------------------------------------------------------------

def merge_meta_shards(shards: list) -> dict:
    """[(path, {meta name: LazyTensor})] -> {meta name: LazyTensor} concatenated lazily.

    Each tensor is split along layouts.META_SHARD_AXIS; 1-D tensors are replicated, and
    every replica must have the same shape.
    """
    if len(shards) == 1:
        return dict(shards[0][1])
    first_path, first = shards[0]
    names = [n for n in first if not _IGNORED.fullmatch(layouts.strip_prefixes(n))]
    for path, sd in shards[1:]:
        kept = {n for n in sd if not _IGNORED.fullmatch(layouts.strip_prefixes(n))}
        if kept != set(names):
            diff = sorted(kept.symmetric_difference(names))
            raise FormatError(path, f"shard holds different tensors than {os.path.basename(first_path)}: "
                                    f"{_short_list(diff)}")
    merged = {}
    for name in names:
        canon = layouts.to_canonical(layouts.strip_prefixes(name), "meta")
        if canon is None:
            raise UnsupportedError(first_path, f"cannot merge shards: unrecognised tensor {name!r} "
                                               "(no known split axis)")
        axis = layouts.META_SHARD_AXIS[layouts.template_of(canon)[0]]
        parts = [sd[name] for _, sd in shards]
        if axis is None or len(parts[0].shape) < 2:
            for (path, _), p in zip(shards[1:], parts[1:]):
                if p.shape != parts[0].shape:
                    raise FormatError(path, f"replicated tensor {name} has shape {list(p.shape)}, "
                                            f"but {list(parts[0].shape)} in {os.path.basename(first_path)}")
            merged[name] = parts[0]
            continue
        for (path, _), p in zip(shards[1:], parts[1:]):
            other = [s for i, s in enumerate(p.shape) if i != axis]
            if p.dtype is not parts[0].dtype or len(p.shape) != len(parts[0].shape) or \
                    other != [s for i, s in enumerate(parts[0].shape) if i != axis]:
                raise FormatError(path, f"tensor {name}: shard {p.dtype} {list(p.shape)} does not fit "
                                        f"{parts[0].dtype} {list(parts[0].shape)} along axis {axis}")
        merged[name] = LazyTensor.concat(name, parts, axis)
    return merged


# --- layout detection ------------------------------------------------------------------------

def _short_list(items, n: int = 4) -> str:
    items = list(items)
    text = ", ".join(items[:n])
    return text + (f" (and {len(items) - n} more)" if len(items) > n else "")


def _hf_architecture(hf_config: dict | None) -> str | None:
    if not hf_config:
        return None
    archs = hf_config.get("architectures") or []
    if not isinstance(archs, list):
        archs = []
    model_type = hf_config.get("model_type")
    if "LlamaForCausalLM" in archs or model_type == "llama":
        return "hf-llama"
    if "GPT2LMHeadModel" in archs or model_type == "gpt2":
        return "hf-gpt2"
    return None


def detect_layout(names, tensors: dict, *, model_args=None, hf_config=None) -> str:
    names = set(names)
    if "token_embd.weight" in names or any(n.startswith("blk.") for n in names):
        return "canonical"
    if "tok_embeddings.weight" in names or any(re.match(r"layers\.\d+\.attention\.", n) for n in names):
        return "llama2c-ckpt" if isinstance(model_args, dict) and "dim" in model_args else "meta"
    if "model.embed_tokens.weight" in names or any(n.startswith("model.layers.") for n in names):
        return "hf-llama"
    if "transformer.wte.weight" in names or any(n.startswith("transformer.h.") for n in names):
        hint = _hf_architecture(hf_config)
        if hint == "hf-gpt2":
            return "hf-gpt2"
        if isinstance(model_args, dict):
            return "nanogpt"
        qkv = tensors.get("transformer.h.0.attn.c_attn.weight")
        if qkv is not None and len(qkv.shape) == 2 and qkv.shape[1] == 3 * qkv.shape[0] != 0:
            return "hf-gpt2"  # Conv1D stores [in, out]
        return "nanogpt"
    return "unknown"


class _Problems:
    """Problems found while building; raised at once when strict, else kept as warnings."""

    def __init__(self, path, strict):
        self.path, self.strict = path, strict
        self.layout = []  # tensors that do not fit the layout -> arch unknown when not strict
        self.other = []  # hyperparameter gaps: the model is still usable for inspect
        self.notes = []

    def tensor_problem(self, exc_type, message):
        if self.strict:
            raise exc_type(self.path, message)
        self.layout.append(message)

    def hparam_problem(self, exc_type, message):
        if self.strict:
            raise exc_type(self.path, message)
        self.other.append(message)


def _declared(layout: str, params, model_args, hf_config) -> dict:
    """Hyperparameters the checkpoint states, in Config's names (None where not stated)."""
    d = {}
    if layout == "meta" and params:
        d = dict(dim=params.get("dim"), n_layers=params.get("n_layers"), n_heads=params.get("n_heads"),
                 n_kv_heads=params.get("n_kv_heads"), vocab_size=params.get("vocab_size"),
                 max_seq_len=params.get("max_seq_len"), norm_eps=params.get("norm_eps"),
                 rope_theta=params.get("rope_theta"))
    elif layout == "llama2c-ckpt":
        a = model_args
        d = dict(dim=a.get("dim"), n_layers=a.get("n_layers"), n_heads=a.get("n_heads"),
                 n_kv_heads=a.get("n_kv_heads"), vocab_size=a.get("vocab_size"),
                 hidden_dim=a.get("hidden_dim"), max_seq_len=a.get("max_seq_len"),
                 norm_eps=a.get("norm_eps"), rope_theta=a.get("rope_theta"))
    elif layout == "nanogpt" and model_args:
        a = model_args
        d = dict(dim=a.get("n_embd"), n_layers=a.get("n_layer"), n_heads=a.get("n_head"),
                 vocab_size=a.get("vocab_size"), max_seq_len=a.get("block_size"), bias=a.get("bias"),
                 gelu="erf")  # nanoGPT's MLP uses nn.GELU(), the exact erf form
    elif layout == "hf-llama" and hf_config:
        c = hf_config
        d = dict(dim=c.get("hidden_size"), n_layers=c.get("num_hidden_layers"),
                 n_heads=c.get("num_attention_heads"), n_kv_heads=c.get("num_key_value_heads"),
                 vocab_size=c.get("vocab_size"), hidden_dim=c.get("intermediate_size"),
                 max_seq_len=c.get("max_position_embeddings"), norm_eps=c.get("rms_norm_eps"),
                 rope_theta=_hf_rope_theta(c), tie=c.get("tie_word_embeddings", False))
    elif layout == "hf-gpt2" and hf_config:
        c = hf_config
        d = dict(dim=c.get("n_embd"), n_layers=c.get("n_layer"), n_heads=c.get("n_head"),
                 vocab_size=c.get("vocab_size"), hidden_dim=c.get("n_inner"),
                 max_seq_len=c.get("n_positions"), norm_eps=c.get("layer_norm_epsilon"),
                 gelu="erf" if c.get("activation_function") == "gelu" else "tanh")
    v = d.get("vocab_size")
    if isinstance(v, numbers.Integral) and not isinstance(v, bool) and v <= 0:
        d["vocab_size"] = None  # Meta writes -1: "take it from the tokenizer / embedding"
    return {k: v for k, v in d.items() if v is not None}


_INT_HPARAMS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len")
_FLOAT_HPARAMS = ("norm_eps", "rope_theta")
_DECLARED_IN = {"meta": "params.json", "llama2c-ckpt": "model_args", "nanogpt": "model_args",
                "hf-llama": "config.json", "hf-gpt2": "config.json"}


def _check_declared_types(declared: dict, layout: str, problems) -> dict:
    """Drop (and report) declared values of the wrong JSON type: they would crash int()/float() later."""
    out = {}
    for key, v in declared.items():
        number = isinstance(v, numbers.Real) and not isinstance(v, bool)  # numpy scalars from pickles too
        if key in _INT_HPARAMS and not (number and isinstance(v, numbers.Integral)):
            problems.hparam_problem(FormatError, f"{_DECLARED_IN.get(layout, 'the checkpoint')} gives {key}="
                                                 f"{v!r:.60}; expected an integer")
            continue
        if key in _FLOAT_HPARAMS and not (number and math.isfinite(v) and v > 0):
            problems.hparam_problem(FormatError, f"{_DECLARED_IN.get(layout, 'the checkpoint')} gives {key}="
                                                 f"{v!r:.60}; expected a positive finite number")
            continue
        out[key] = int(v) if key in _INT_HPARAMS else v
    return out


def _hf_rope_theta(c: dict):
    """rope_theta from config.json: top level (transformers v4) or inside rope_parameters (v5)."""
    if c.get("rope_theta") is not None:
        return c["rope_theta"]
    params = c.get("rope_parameters")
    return params.get("rope_theta") if isinstance(params, dict) else None


def _check_int(value, what, problems):
    if isinstance(value, bool) or not isinstance(value, int):
        problems.hparam_problem(FormatError, f"{what} must be an integer, got {value!r}")
        return None
    return value


def _agree(declared: dict, key: str, actual: int, what: str, problems: _Problems):
    if key in declared and declared[key] != actual:
        problems.hparam_problem(FormatError, f"declared {key}={declared[key]!r} but {what} gives {actual}")


def _layer_count(canon: dict) -> int:
    idx = [layouts.template_of(n)[1] for n in canon]
    return max((i for i in idx if i is not None), default=-1) + 1


def _tied(canon: dict) -> bool:
    emb, out = canon.get("token_embd.weight"), canon.get("output.weight")
    return (emb is not None and out is not None and emb.storage_key is not None
            and emb.storage_key == out.storage_key and emb.shape == out.shape and emb.dtype is out.dtype)


def _llama_config(canon, declared, layout, problems) -> Config:
    emb = canon["token_embd.weight"]
    vocab, dim = emb.shape
    n_layers = _layer_count(canon)
    hidden = canon["blk.0.ffn_gate.weight"].shape[0] if "blk.0.ffn_gate.weight" in canon else 0
    _agree(declared, "dim", dim, "the token embedding", problems)
    _agree(declared, "n_layers", n_layers, "the layer tensors", problems)
    _agree(declared, "vocab_size", vocab, "the token embedding", problems)
    _agree(declared, "hidden_dim", hidden, "the feed-forward w1/gate tensor", problems)
    n_heads = declared.get("n_heads")
    kv_rows = canon["blk.0.attn_k.weight"].shape[0] if "blk.0.attn_k.weight" in canon else 0
    n_kv_heads = 0
    if n_heads is None:
        src = {"meta": "params.json beside the checkpoint", "hf-llama": "config.json",
               "llama2c-ckpt": "model_args"}.get(layout, "the checkpoint")
        problems.hparam_problem(UnsupportedError, "n_heads cannot be inferred from tensor shapes; "
                                                  f"it must be given in {src} (Meta: params.json with n_heads)")
        n_heads = 0
    elif _check_int(n_heads, "n_heads", problems) is None:
        n_heads = 0
    elif n_heads <= 0 or dim % n_heads or (dim // n_heads) % 2:
        problems.hparam_problem(FormatError, f"n_heads={n_heads} does not split dim {dim} into even-sized heads")
        n_heads = 0
    if n_heads:
        head_dim = dim // n_heads
        n_kv_heads = declared.get("n_kv_heads") or n_heads
        if kv_rows != n_kv_heads * head_dim:
            if "n_kv_heads" in declared or kv_rows % head_dim:
                problems.hparam_problem(FormatError, f"attn_k has {kv_rows} rows, which does not fit "
                                                     f"n_kv_heads={n_kv_heads} x head_dim {head_dim}")
            n_kv_heads = kv_rows // head_dim if kv_rows % head_dim == 0 else 0
        if n_kv_heads and n_heads % n_kv_heads:
            problems.hparam_problem(FormatError, f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    max_seq_len = declared.get("max_seq_len")
    if max_seq_len is None:
        max_seq_len = DEFAULT_META_MAX_SEQ_LEN
        problems.notes.append(f"max_seq_len not stated; using Meta's default {DEFAULT_META_MAX_SEQ_LEN}")
    tie = "output.weight" not in canon
    return Config(arch="llama", dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                  vocab_size=vocab, hidden_dim=hidden, max_seq_len=int(max_seq_len),
                  norm_eps=float(declared.get("norm_eps", 1e-5)),
                  rope_theta=float(declared.get("rope_theta", 10000.0)), tie_embeddings=tie, bias=False)


def _gpt2_config(canon, declared, layout, problems) -> Config:
    vocab, dim = canon["token_embd.weight"].shape
    n_ctx = canon["position_embd.weight"].shape[0] if "position_embd.weight" in canon else 0
    n_layers = _layer_count(canon)
    hidden = canon["blk.0.ffn_up.weight"].shape[0] if "blk.0.ffn_up.weight" in canon else 0
    _agree(declared, "dim", dim, "the token embedding", problems)
    _agree(declared, "n_layers", n_layers, "the layer tensors", problems)
    _agree(declared, "vocab_size", vocab, "the token embedding", problems)
    _agree(declared, "max_seq_len", n_ctx, "the position embedding", problems)
    _agree(declared, "hidden_dim", hidden, "the c_fc tensor", problems)
    bias = "blk.0.attn_qkv.bias" in canon
    _agree(declared, "bias", bias, "the presence of c_attn.bias", problems)
    n_heads = declared.get("n_heads")
    if n_heads is None:
        problems.hparam_problem(UnsupportedError, "n_heads cannot be inferred from tensor shapes; it must be "
                                                  "given in model_args (n_head) or config.json")
        n_heads = 0
    elif _check_int(n_heads, "n_heads", problems) is None or n_heads <= 0 or dim % n_heads:
        problems.hparam_problem(FormatError, f"n_heads={n_heads!r} does not divide dim {dim}")
        n_heads = 0
    return Config(arch="gpt2", dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
                  vocab_size=vocab, hidden_dim=hidden, max_seq_len=n_ctx,
                  norm_eps=float(declared.get("norm_eps", 1e-5)),
                  tie_embeddings="output.weight" not in canon, bias=bias,
                  gelu=declared.get("gelu", "tanh"))


def _canonical_config(canon, st_metadata, problems) -> Config | None:
    """The Config wconv's safetensors writer stored, or None."""
    prefix = "wconv."
    fields = {k[len(prefix):]: v for k, v in (st_metadata or {}).items() if k.startswith(prefix)}
    if not fields:
        return None
    cfg = Config()
    try:
        for key, text in fields.items():
            if hasattr(cfg, key) and not key.startswith("_"):
                value, default = json.loads(text), getattr(cfg, key)
                if not _same_kind(value, default):
                    problems.hparam_problem(FormatError, f"bad wconv.* metadata: {prefix}{key} is {value!r:.60}, "
                                                         f"expected a {type(default).__name__}")
                    return None
                setattr(cfg, key, value)
    except (ValueError, RecursionError) as e:
        problems.hparam_problem(FormatError, f"bad wconv.* metadata: {e}")
        return None
    return cfg


def _same_kind(value, default) -> bool:
    """Whether a JSON value can stand for a Config field whose default is `default`."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def _expected(cfg: Config, canon: dict) -> list:
    names = layouts.expected_names(cfg.arch, cfg.n_layers, cfg.tie_embeddings)
    if cfg.arch == "gpt2" and not cfg.bias:
        names = [n for n in names if not n.endswith(".bias")]
    return names


def _to_canonical(tensors: dict, layout: str) -> tuple[dict, list]:
    canon, unrecognised = {}, []
    for name, t in tensors.items():
        c = name if layout == "canonical" else layouts.to_canonical(name, layout)
        if c is None or (layout == "canonical" and layouts.template_of(c)[0] not in
                         set(layouts.LLAMA_CANONICAL) | set(layouts.GPT2_CANONICAL)):
            unrecognised.append(name)
            continue
        canon[c] = t
    return canon, unrecognised


def _transpose_conv1d(canon: dict) -> None:
    """HF GPT-2 Conv1D weights are [in, out]; canonical is [out, in]. Lazy."""
    for name, t in list(canon.items()):
        if layouts.template_of(name)[0] in layouts.HF_GPT2_TRANSPOSED and len(t.shape) == 2:
            canon[name] = t.derive(lambda a: np.ascontiguousarray(a.T), shape=t.shape[::-1])


def _unpermute_hf_llama(canon: dict, cfg: Config, problems) -> None:
    """Undo HF's rotary row permutation of q (n_heads) and k (n_kv_heads), lazily."""
    for name, t in list(canon.items()):
        template, _ = layouts.template_of(name)
        if template in (_Q, _K):
            heads = cfg.n_heads if template == _Q else cfg.n_kv_heads
            if not heads or t.shape[0] % (2 * heads):
                problems.notes.append(f"{name}: left in HF rotary order (head count unknown)")
                continue
            canon[name] = t.derive(lambda a, h=heads: layouts.hf_unpermute(a, h))


def _normalise_names(tensors: dict, path, problems) -> dict:
    out = {}
    for name, t in tensors.items():
        short = layouts.strip_prefixes(name)
        if _IGNORED.fullmatch(short):
            continue
        if short in out:
            raise FormatError(path, f"tensor {short!r} appears twice (with and without a wrapper prefix)")
        out[short] = t
    # GPT2Model (no LM head) saves GPT-2 names without "transformer."
    p = layouts.HF_GPT2_OPTIONAL_PREFIX
    if "wte.weight" in out and p + "wte.weight" not in out:
        out = {(p + n if n != "lm_head.weight" else n): t for n, t in out.items()}
    return out


def build_model(tensors: dict, *, path, source_format: str, files, params=None, model_args=None,
                hf_config=None, st_metadata=None, extras=None, strict: bool = True) -> Model:
    """Recognise the layout of `tensors` (file names -> LazyTensor) and build a Model."""
    path = os.fspath(path)
    problems = _Problems(path, strict)
    metadata = {"_input_files": [os.fspath(f) for f in files]}
    if params is not None:
        metadata["params"] = summarise(params)
    if model_args is not None:
        metadata["model_args"] = summarise(model_args)
    if hf_config is not None:
        metadata["hf_config"] = summarise(hf_config)
    if st_metadata:
        metadata["safetensors_metadata"] = summarise(st_metadata)
    for k, v in (extras or {}).items():
        if k not in ("model_args",):
            metadata[k] = summarise(v)

    named = _normalise_names(tensors, path, problems)
    layout = detect_layout(named, named, model_args=model_args, hf_config=hf_config)
    cfg, canon = None, {}
    if layout == "unknown":
        problems.tensor_problem(UnsupportedError, "unrecognised checkpoint layout (tensor names like "
                                                  f"{_short_list(list(tensors), 3)})")
    else:
        canon, unrecognised = _to_canonical(named, layout)
        if unrecognised:
            what = {"nanogpt": "nanoGPT-style checkpoint", "meta": "Meta-style state dict",
                    "llama2c-ckpt": "llama2.c-style checkpoint"}.get(layout, f"{layout} checkpoint")
            extra = ""
            if isinstance(model_args, dict) and layout == "nanogpt":
                odd = [k for k in model_args if k not in
                       ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")]
                if odd:
                    extra = f"; unexpected model_args {_short_list(odd)}"
            problems.tensor_problem(UnsupportedError, f"{what} with unrecognised tensors "
                                                      f"{_short_list(unrecognised)}{extra}")
        elif "token_embd.weight" not in canon:
            problems.tensor_problem(FormatError, f"{layout} checkpoint has no token embedding tensor")
        elif _not_matrices(canon):
            name = _not_matrices(canon)[0]
            problems.tensor_problem(FormatError, f"{name} has shape {list(canon[name].shape)!r:.80}; "
                                                 "expected a matrix")
        else:
            if layout == "hf-gpt2":
                _transpose_conv1d(canon)
            cfg = _config_for(layout, canon, params, model_args, hf_config, st_metadata, problems)
            if cfg is not None:
                if layout == "hf-llama":
                    _unpermute_hf_llama(canon, cfg, problems)
                _check_complete(canon, cfg, problems)

    if problems.layout or cfg is None:
        if layout != "unknown":
            metadata["layout_guess"] = layout
        metadata["warnings"] = problems.layout + problems.other
        if problems.notes:
            metadata["notes"] = problems.notes
        return Model(config=Config(arch="unknown", norm_eps=0.0, rope_theta=0.0), tensors=dict(tensors),
                     metadata=metadata, source_format=source_format, source_layout="unknown", path=path)

    ordered = {n: canon[n].renamed(n) for n in _expected(cfg, canon)}
    if problems.other:
        metadata["warnings"] = problems.other
    if problems.notes:
        metadata["notes"] = problems.notes
    return Model(config=cfg, tensors=ordered, metadata=metadata, source_format=source_format,
                 source_layout=layout, path=path)


def _not_matrices(canon) -> list:
    # The tensors whose shapes give the hyperparameters must be 2-D before they are unpacked.
    keys = ("token_embd.weight", "position_embd.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight",
            "blk.0.attn_k.weight", "blk.0.attn_qkv.weight", "output.weight")
    return [n for n in keys if n in canon and len(canon[n].shape) != 2]


def _config_for(layout, canon, params, model_args, hf_config, st_metadata, problems) -> Config | None:
    if layout == "canonical":
        cfg = _canonical_config(canon, st_metadata, problems)
        if cfg is not None and cfg.arch not in ("llama", "gpt2"):
            problems.tensor_problem(UnsupportedError, f"wconv.arch metadata names unknown architecture {cfg.arch!r}")
            return None
        if cfg is not None:
            return cfg
        arch = "gpt2" if "position_embd.weight" in canon else "llama"
        declared = {}
    else:
        arch = "gpt2" if layout in ("nanogpt", "hf-gpt2") else "llama"
        declared = _check_declared_types(_declared(layout, params or {}, model_args or {}, hf_config or {}),
                                         layout, problems)
    shared = _tied(canon)
    if shared:
        del canon["output.weight"]
    if arch == "llama":
        if layout == "hf-llama" and "output.weight" not in canon and not declared.get("tie", False):
            problems.tensor_problem(FormatError, "lm_head.weight is missing and config.json does not set "
                                                 "tie_word_embeddings")
            return None
        if layout == "hf-llama" and hf_config:
            head_dim = hf_config.get("head_dim")
            if head_dim and declared.get("n_heads") and head_dim * declared["n_heads"] != declared.get("dim"):
                problems.tensor_problem(UnsupportedError, f"head_dim {head_dim} x {declared['n_heads']} heads "
                                                          "differs from hidden_size")
                return None
            if hf_config.get("rope_scaling"):
                problems.notes.append("rope_scaling in config.json is not represented in the converted model")
        if layout == "meta" and params:
            _note_meta_hidden(canon, params, problems)
        if layout in ("meta", "llama2c-ckpt") and "output.weight" not in canon and not shared:
            problems.notes.append("no output.weight: the classifier is tied to tok_embeddings")
        return _llama_config(canon, declared, layout, problems)
    return _gpt2_config(canon, declared, layout, problems)


def _note_meta_hidden(canon, params, problems):
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


def _check_complete(canon: dict, cfg: Config, problems) -> None:
    expected = _expected(cfg, canon)
    missing = [n for n in expected if n not in canon]
    extra = [n for n in canon if n not in set(expected)]
    if missing:
        problems.tensor_problem(FormatError, f"{cfg.arch} checkpoint is missing tensors {_short_list(missing)}")
    if extra:
        problems.tensor_problem(UnsupportedError, f"unexpected tensors {_short_list(extra)}")
    for name in expected:
        t = canon.get(name)
        want = _expected_shape(name, cfg)
        if t is not None and want is not None and tuple(t.shape) != want:
            problems.tensor_problem(FormatError, f"{name} has shape {list(t.shape)}, expected {list(want)}")


def _expected_shape(name: str, c: Config):
    template, _ = layouts.template_of(name)
    hd = c.dim // c.n_heads if c.n_heads else None
    shapes = {
        "token_embd.weight": (c.vocab_size, c.dim),
        "output.weight": (c.vocab_size, c.dim),
        "position_embd.weight": (c.max_seq_len, c.dim),
        "blk.{i}.attn_q.weight": (c.dim, c.dim),
        "blk.{i}.attn_k.weight": (c.n_kv_heads * hd, c.dim) if hd and c.n_kv_heads else None,
        "blk.{i}.attn_v.weight": (c.n_kv_heads * hd, c.dim) if hd and c.n_kv_heads else None,
        "blk.{i}.attn_output.weight": (c.dim, c.dim),
        "blk.{i}.ffn_gate.weight": (c.hidden_dim, c.dim),
        "blk.{i}.ffn_up.weight": (c.hidden_dim, c.dim),
        "blk.{i}.ffn_down.weight": (c.dim, c.hidden_dim),
        "blk.{i}.attn_qkv.weight": (3 * c.dim, c.dim),
        "blk.{i}.attn_qkv.bias": (3 * c.dim,),
        "blk.{i}.ffn_up.bias": (c.hidden_dim,),
    }
    if template in shapes:
        return shapes[template]
    return (c.dim,)  # norms, their biases, attn_output/ffn_down biases
