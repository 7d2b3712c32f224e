"""A flat state dict (+ params.json / model_args / config.json) -> Model, through wconv.arch.

What the checkpoint declares decides its architecture (config.json `architectures` /
`model_type`, Meta's params.json, a training checkpoint's model_args, wconv's own
safetensors metadata); the tensor names must then fit that family's names for the source
layout. A declared architecture wconv does not implement, or config fields that change the
math in ways it does not implement, are refused in one line. Only an undeclared checkpoint
is recognised from its names alone, and the model records that it was guessed.

Source layouts (each family module holds the names):
  meta          Meta consolidated.NN.pth (+ params.json), also a bare state dict of Meta names
  llama2c-ckpt  llama2.c ckpt.pt: {"model": Meta names, "model_args": {dim, n_layers, ...}, ...}
  nanogpt       nanoGPT ckpt.pt: {"model": transformer.wte..., "model_args": {n_embd, ...}, ...}
  hf            Hugging Face *ForCausalLM (fix-ups such as HF's q/k permutation undone)
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
import os
import re


from .. import arch
from ..arch.family import Problems, short_list, template_of
from ..errors import FormatError, UnsupportedError
from ..model import Config, Model, Stored
from ..tensor import LazyTensor

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

_IGNORED = re.compile("|".join(f"(?:{p})" for p in IGNORED_TENSORS))
_STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "module")


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


def strip_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in STRIP_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


# --- Meta model-parallel shards --------------------------------------------------------------

def merge_meta_shards(shards: list) -> dict:
    """[(path, {meta name: LazyTensor})] -> {meta name: LazyTensor} concatenated lazily.

    Each tensor is split along the Llama family's Meta shard axis; 1-D tensors are
    replicated, and every replica must have the same shape.
    """
    if len(shards) == 1:
        return dict(shards[0][1])
    llama = arch.require("llama")
    first_path, first = shards[0]
    names = [n for n in first if not _IGNORED.fullmatch(strip_prefixes(n))]
    for path, sd in shards[1:]:
        kept = {n for n in sd if not _IGNORED.fullmatch(strip_prefixes(n))}
        if kept != set(names):
            diff = sorted(kept.symmetric_difference(names))
            raise FormatError(path, f"shard holds different tensors than {os.path.basename(first_path)}: "
                                    f"{short_list(diff)}")
    merged = {}
    for name in names:
        canon = llama.to_canonical(strip_prefixes(name), "meta")
        if canon is None:
            raise UnsupportedError(first_path, f"cannot merge shards: unrecognised tensor {name!r} "
                                               "(no known split axis)")
        axis = llama.shard_axis.get(template_of(canon)[0])
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


# --- which family, which layout ----------------------------------------------------------------

_DECLARED_IN = {"meta": "params.json", "llama2c-ckpt": "model_args", "nanogpt": "model_args",
                "hf": "config.json", "canonical": "wconv safetensors metadata"}


def _names_layout(names) -> tuple[str, str] | None:
    """(family, layout) guessed from tensor names alone, for checkpoints that declare nothing."""
    if "token_embd.weight" in names or any(n.startswith("blk.") for n in names):
        if "position_embd.weight" in names:
            return "gpt2", "canonical"
        return ("qwen2" if "blk.0.attn_q.bias" in names else "llama"), "canonical"
    if "tok_embeddings.weight" in names or any(re.match(r"layers\.\d+\.attention\.", n) for n in names):
        return "llama", "meta"
    if "model.embed_tokens.weight" in names or any(n.startswith("model.layers.") for n in names):
        return ("qwen2" if "model.layers.0.self_attn.q_proj.bias" in names else "llama"), "hf"
    if "transformer.wte.weight" in names or any(n.startswith("transformer.h.") for n in names):
        return "gpt2", "nanogpt"
    return None


def _gpt2_orientation(named: dict) -> str:
    """nanoGPT (nn.Linear [out, in]) or HF (Conv1D [in, out]) from the fused qkv shape."""
    qkv = named.get("transformer.h.0.attn.c_attn.weight")
    if qkv is not None and len(qkv.shape) == 2 and qkv.shape[1] == 3 * qkv.shape[0] != 0:
        return "hf"
    return "nanogpt"


def identify(named: dict, *, params, model_args, hf_config, st_metadata, problems) -> tuple:
    """(family or None, layout, side-file dict, how it was known) for a state dict.

    Declared first: config.json, params.json, model_args, wconv's safetensors metadata; a
    declaration wconv does not implement is refused. Names decide only when nothing is declared.
    """
    if hf_config:
        fam, declared = arch.by_hf(hf_config)
        if declared is not None:
            if fam is None:
                problems.tensor_problem(UnsupportedError, f"config.json declares {arch.unsupported_message(declared)}")
                return None, "hf", hf_config, f"declared by config.json ({declared})"
            return fam, "hf", hf_config, f"declared by config.json ({declared})"
    if params is not None:
        return arch.require("llama"), "meta", params, "declared by params.json (Meta format)"
    if isinstance(model_args, dict):
        if "dim" in model_args or "n_layers" in model_args:
            return arch.require("llama"), "llama2c-ckpt", model_args, "declared by model_args (llama2.c ModelArgs)"
        if "n_embd" in model_args or "n_layer" in model_args:
            return arch.require("gpt2"), "nanogpt", model_args, "declared by model_args (nanoGPT GPTConfig)"
    stated = (st_metadata or {}).get("wconv.arch")
    if stated is not None:
        try:
            name = json.loads(stated)
        except ValueError:
            name = stated
        fam = arch.get(name) if isinstance(name, str) else None
        if fam is None:
            problems.tensor_problem(UnsupportedError, f"wconv.arch metadata names unknown architecture {name!r}; "
                                                      f"wconv converts {', '.join(arch.FAMILIES)}")
            return None, "canonical", {}, "declared by wconv metadata"
        return fam, "canonical", {}, f"declared by wconv metadata ({name})"
    guess = _names_layout(set(named))
    if guess is None:
        return None, "unknown", {}, "unrecognised names"
    family, layout = guess
    if family == "gpt2" and layout == "nanogpt":
        layout = _gpt2_orientation(named)
    side = hf_config or (model_args if isinstance(model_args, dict) else {}) or {}
    return arch.require(family), layout, side, f"guessed from tensor names ({family}, {layout} layout)"


# --- building the model ------------------------------------------------------------------------

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
    if cfg.rope_scaling is not None and not _valid_scaling(cfg.rope_scaling):
        problems.hparam_problem(FormatError, f"bad wconv.* metadata: rope_scaling {cfg.rope_scaling!r:.80}")
        return None
    return cfg


def _valid_scaling(s) -> bool:
    if not isinstance(s, dict):
        return False
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings"),
            "freq_factors": ("factors",)}.get(s.get("type"))
    if need is None or not all(k in s for k in need):
        return False
    values = s["factors"] if s["type"] == "freq_factors" else [s[k] for k in need]
    return isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            and math.isfinite(v) and v > 0 for v in values)


def _same_kind(value, default) -> bool:
    """Whether a JSON value can stand for a Config field whose default is `default`."""
    if default is None:
        return value is None or isinstance(value, dict)  # rope_scaling
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def _to_canonical(tensors: dict, fam, layout: str) -> tuple[dict, list]:
    canon, unrecognised = {}, []
    for name, t in tensors.items():
        c = fam.to_canonical(name, layout)
        if c is None:
            unrecognised.append(name)
            continue
        canon[c] = t
    return canon, unrecognised


def _normalise_names(tensors: dict, path, problems) -> dict:
    out = {}
    for name, t in tensors.items():
        short = strip_prefixes(name)
        if _IGNORED.fullmatch(short):
            continue
        if short in out:
            raise FormatError(path, f"tensor {short!r} appears twice (with and without a wrapper prefix)")
        out[short] = t
    # GPT2Model (no LM head) saves GPT-2 names without "transformer."
    p = HF_GPT2_OPTIONAL_PREFIX
    if "wte.weight" in out and p + "wte.weight" not in out:
        out = {(p + n if n != "lm_head.weight" else n): t for n, t in out.items()}
    return out


def _tied(canon: dict) -> bool:
    emb, out = canon.get("token_embd.weight"), canon.get("output.weight")
    return (emb is not None and out is not None and emb.storage_key is not None
            and emb.storage_key == out.storage_key and emb.shape == out.shape and emb.dtype is out.dtype)


def _not_matrices(canon) -> list:
    # The tensors whose shapes give the hyperparameters must be 2-D before they are unpacked.
    keys = ("token_embd.weight", "position_embd.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight",
            "blk.0.attn_k.weight", "blk.0.attn_q.weight", "blk.0.attn_qkv.weight", "output.weight")
    return [n for n in keys if n in canon and len(canon[n].shape) != 2]


def build_model(tensors: dict, *, path, source_format: str, files, params=None, model_args=None,
                hf_config=None, st_metadata=None, extras=None, strict: bool = True, stored=None) -> Model:
    """Recognise the family and layout of `tensors` (file names -> LazyTensor) and build a Model.

    `stored`: [(file, stored name, tensor)] as the files hold them (several shards), when that
    differs from `tensors`; it becomes Model.stored with each entry's canonical name.
    """
    path = os.fspath(path)
    problems = Problems(path, strict)
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
    fam, layout, side, how = identify(named, params=params, model_args=model_args, hf_config=hf_config,
                                      st_metadata=st_metadata, problems=problems)
    metadata["_arch_source"] = how
    cfg, canon = None, {}
    if fam is None:
        if layout == "unknown":
            problems.tensor_problem(UnsupportedError, "unrecognised checkpoint layout (tensor names like "
                                                      f"{short_list(list(tensors), 3)})")
    else:
        cfg, canon = _build(fam, layout, named, side, st_metadata, params, problems)
    if how.startswith("guessed") and cfg is not None:
        problems.notes.append(f"the checkpoint does not declare its architecture: {how}")

    stored = stored if stored is not None else [(path, n, t) for n, t in tensors.items()]
    if problems.layout or cfg is None:
        if layout != "unknown":
            metadata["layout_guess"] = layout
        metadata["warnings"] = problems.layout + problems.other
        if problems.notes:
            metadata["notes"] = problems.notes
        return Model(config=Config(arch="unknown", norm_eps=0.0, rope_theta=0.0), tensors=dict(tensors),
                     metadata=metadata, source_format=source_format, source_layout="unknown", path=path,
                     stored=[Stored(f, n, t) for f, n, t in stored])

    ordered = {n: canon[n].renamed(n) for n in fam.expected_names(cfg)}
    if problems.other:
        metadata["warnings"] = problems.other
    if problems.notes:
        metadata["notes"] = problems.notes
    return Model(config=cfg, tensors=ordered, metadata=metadata, source_format=source_format,
                 source_layout=layout if layout != "hf" else f"hf-{fam.name}", path=path,
                 stored=_stored_view(stored, fam, layout, ordered))


def _stored_view(stored, fam, layout, tensors) -> list:
    """Model.stored: each stored tensor with the canonical tensor it became (or why none)."""
    out = []
    gpt2_bare = any(strip_prefixes(n) == "wte.weight" for _, n, _ in stored)
    for file, name, t in stored:
        short = strip_prefixes(name)
        if gpt2_bare and short != "lm_head.weight":
            short = HF_GPT2_OPTIONAL_PREFIX + short
        if _IGNORED.fullmatch(strip_prefixes(name)):
            out.append(Stored(file, name, t, None, "a buffer every runtime recomputes; not converted"))
            continue
        canon = fam.to_canonical(short, layout)
        if canon in tensors:
            out.append(Stored(file, name, t, canon))
        elif canon == "output.weight":
            out.append(Stored(file, name, t, None, "the token embedding again (tied classifier)"))
        else:
            out.append(Stored(file, name, t, canon, "not in the model view"))
    return out


def _build(fam, layout, named, side, st_metadata, params, problems):
    """(Config, canonical tensors) of family `fam` from `named` in `layout`, or (None, {})."""
    where = _DECLARED_IN.get(layout, "the checkpoint")
    reasons = fam.refusals(layout, side or {})
    if layout not in fam.names and layout != "canonical":
        problems.tensor_problem(UnsupportedError, f"{fam.title} checkpoints in {layout} layout are not supported")
        return None, {}
    canon, unrecognised = _to_canonical(named, fam, layout)
    if unrecognised:
        what = {"nanogpt": "nanoGPT-style checkpoint", "meta": "Meta-style state dict",
                "llama2c-ckpt": "llama2.c-style checkpoint", "hf": f"Hugging Face {fam.title} checkpoint",
                "canonical": f"{fam.title} checkpoint"}.get(layout, f"{layout} checkpoint")
        also = f"; {where} also has {'; '.join(reasons)}" if reasons else ""
        problems.tensor_problem(UnsupportedError, f"{what} with unrecognised tensors {short_list(unrecognised)}{also}")
        return None, {}
    if reasons:
        problems.tensor_problem(UnsupportedError, f"{where} asks for {'; '.join(reasons)}: wconv does not implement "
                                                  f"that for {fam.title}, so it refuses rather than convert wrongly")
        return None, {}
    if "token_embd.weight" not in canon:
        problems.tensor_problem(FormatError, f"{fam.title} checkpoint has no token embedding tensor")
        return None, {}
    if _not_matrices(canon):
        name = _not_matrices(canon)[0]
        problems.tensor_problem(FormatError, f"{name} has shape {list(canon[name].shape)!r:.80}; expected a matrix")
        return None, {}
    if layout == "canonical":
        cfg = _canonical_config(canon, st_metadata, problems)
        if cfg is not None:
            cfg.arch = fam.name
            fam.check_complete(canon, cfg, problems)
            return cfg, canon
        declared = {}
    else:
        declared = fam.declared(layout, side or {}, problems, where)
    shared = _tied(canon)
    if shared:
        del canon["output.weight"]
    if layout == "hf" and "output.weight" not in canon and not declared.get("tie", fam.hf_tie_default):
        problems.tensor_problem(FormatError, "lm_head.weight is missing and config.json does not set "
                                             "tie_word_embeddings")
        return None, {}
    if layout == "meta" and params and hasattr(fam, "meta_hidden_note"):
        fam.meta_hidden_note(canon, params, problems)
    if layout in ("meta", "llama2c-ckpt") and "output.weight" not in canon and not shared:
        problems.notes.append("no output.weight: the classifier is tied to tok_embeddings")
    fam.orient(canon, layout)
    cfg = fam.build_config(canon, declared, layout, problems)
    fam.from_layout(canon, cfg, layout, problems)
    fam.check_complete(canon, cfg, problems)
    return cfg, canon
