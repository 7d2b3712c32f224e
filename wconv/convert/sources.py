"""Files and directories on disk -> Model (torch files, safetensors, Meta and HF directories).

A single file is read lazily by its format reader, then wconv.convert.state_dict
recognises the layout. Hyperparameters that live in a separate file are picked up
from beside the weights: Meta's params.json, Hugging Face's config.json.
"""
from __future__ import annotations

import json
import os
import re

from ..errors import FormatError, UnsupportedError
from ..formats import hf_dir
from ..model import Model
from ..sniff import sniff
from . import state_dict as sd

META_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")
HF_WEIGHTS = hf_dir.WEIGHTS
MODEL_EXTENSIONS = (".pth", ".pt", ".bin", ".safetensors", ".gguf", ".ggml", ".ggjt", ".ckpt")


def read_json(path) -> dict:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise FormatError(path, f"cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(path, f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise FormatError(path, "expected a JSON object")
    return data


def _torch_format(path) -> str:
    fmt = sniff(path)
    if fmt not in ("torch-zip", "torch-legacy"):
        raise FormatError(path, f"expected a torch checkpoint, found {fmt}")
    return fmt


def _read_torch(path, allow_unknown_globals):
    """(tensors by name, extras, state-dict found) from one torch file."""
    from ..formats.torch_file import load_pickled

    obj = load_pickled(path, allow_unknown_globals=allow_unknown_globals)
    tensors, extras, found = sd.split_checkpoint(obj)
    if not found and not isinstance(obj, sd.LazyTensor):
        extras = {"content": obj}  # not a state dict: keep a summary of what it is
    return tensors, extras, found


def _stripped(names):
    return {sd.strip_prefixes(n) for n in names}


def _looks_meta(names) -> bool:
    return "tok_embeddings.weight" in _stripped(names)


def _looks_hf(names) -> bool:
    s = _stripped(names)
    return bool(s & {"model.embed_tokens.weight", "transformer.wte.weight", "wte.weight"})


def _beside(path, name):
    candidate = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    return candidate if os.path.isfile(candidate) else None


def _check_not_a_shard(path, strict):
    """A lone shard of a multi-file checkpoint would convert into a broken model."""
    base = os.path.basename(path)
    directory = os.path.dirname(os.path.abspath(path))
    if META_SHARD.match(base):
        shards = [n for n in os.listdir(directory) if META_SHARD.match(n)]
        if len(shards) > 1 and strict:
            raise UnsupportedError(path, f"this is one of {len(shards)} model-parallel shards; "
                                         f"pass the directory {directory} instead")
    for index_name, _, _ in HF_WEIGHTS:
        index = os.path.join(directory, index_name)
        if os.path.isfile(index) and strict:
            try:
                weight_map = read_json(index).get("weight_map")
            except FormatError:
                continue
            if not isinstance(weight_map, dict):  # malformed: not ours to judge when reading one file
                continue
            files = {f for f in weight_map.values() if isinstance(f, str)}
            if base in files and len(files) > 1:
                raise UnsupportedError(path, f"this is one of {len(files)} shards listed in {index_name}; "
                                             f"pass the directory {directory} instead")


def load_torch_file(path, *, allow_unknown_globals: bool = False, strict: bool = True) -> Model:
    path = os.fspath(path)
    fmt = _torch_format(path)
    _check_not_a_shard(path, strict)
    tensors, extras, _ = _read_torch(path, allow_unknown_globals)
    model_args = extras.pop("model_args", None)
    files, params, hf_config = [path], None, None
    if model_args is None and _looks_meta(tensors) and _beside(path, "params.json"):
        params = read_json(_beside(path, "params.json"))
        files.append(_beside(path, "params.json"))
    if _looks_hf(tensors) and _beside(path, "config.json"):
        hf_config = read_json(_beside(path, "config.json"))
        files.append(_beside(path, "config.json"))
    return sd.build_model(tensors, path=path, source_format=fmt, files=files, params=params,
                          model_args=model_args if isinstance(model_args, dict) else None,
                          hf_config=hf_config, extras=extras, strict=strict)


def load_safetensors_file(path, *, strict: bool = True) -> Model:
    from ..formats.safetensors_io import read

    path = os.fspath(path)
    _check_not_a_shard(path, strict)
    tensors, st_metadata = read(path)
    files, hf_config = [path], None
    if _looks_hf(tensors) and _beside(path, "config.json"):
        hf_config = read_json(_beside(path, "config.json"))
        files.append(_beside(path, "config.json"))
    return sd.build_model(tensors, path=path, source_format="safetensors", files=files,
                          hf_config=hf_config, st_metadata=st_metadata, strict=strict)


# --- directories -------------------------------------------------------------------------

def resolve_directory(path) -> tuple[str, str | None]:
    """What a model directory holds: ("meta", None), ("hf", None) or ("file", its one model file)."""
    path = os.fspath(path)
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise FormatError(path, f"cannot list directory: {e.strerror or e}") from None
    if any(META_SHARD.match(n) for n in names):
        return "meta", None
    if "config.json" in names and any(n in names for pair in HF_WEIGHTS for n in pair[:2]):
        return "hf", None
    candidates = [n for n in names if n.endswith(MODEL_EXTENSIONS) and not n.startswith(".")
                  and os.path.isfile(os.path.join(path, n)) and n != "tokenizer.bin"]
    if len(candidates) == 1:
        return "file", os.path.join(path, candidates[0])
    if "config.json" in names:
        raise FormatError(path, "config.json found but no model.safetensors, pytorch_model.bin or "
                                "their .index.json")
    what = f"several candidate files ({', '.join(candidates[:5])})" if candidates else "no model files"
    raise FormatError(path, f"directory has {what}; expected consolidated.NN.pth + params.json, "
                            "config.json + model.safetensors / pytorch_model.bin, or a single model file")


def load_directory(path, kind: str, *, allow_unknown_globals: bool = False, strict: bool = True) -> Model:
    """A Meta or HF model directory (kind from resolve_directory) as a Model."""
    path = os.fspath(path)
    names = sorted(os.listdir(path))
    if kind == "meta":
        return _load_meta_dir(path, names, allow_unknown_globals, strict)
    return _load_hf_dir(path, names, allow_unknown_globals, strict)


def _load_meta_dir(path, names, allow_unknown_globals, strict) -> Model:
    shards = sorted((int(m.group(1)), n) for n in names if (m := META_SHARD.match(n)))
    numbers = [i for i, _ in shards]
    if numbers != list(range(len(shards))):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        if missing:
            raise FormatError(path, f"missing shard consolidated.{missing[0]:02d}.pth "
                                    f"(found {', '.join(n for _, n in shards)})")
        raise FormatError(path, f"duplicate shard numbers in {', '.join(n for _, n in shards)}")
    files = [os.path.join(path, n) for _, n in shards]
    params = None
    params_path = os.path.join(path, "params.json")
    if os.path.isfile(params_path):
        params = read_json(params_path)
    elif strict:
        raise FormatError(path, "Meta checkpoint directory has no params.json")
    loaded, extras, fmt = [], {}, _torch_format(files[0])
    for f in files:
        tensors, more, _ = _read_torch(f, allow_unknown_globals)
        loaded.append((f, tensors))
        if not extras:
            extras = more
    merged = sd.merge_meta_shards(loaded)
    inputs = files + ([params_path] if params is not None else [])
    model = sd.build_model(merged, path=path, source_format=fmt, files=inputs, params=params,
                           extras=extras, strict=strict,
                           stored=[(f, n, t) for f, tensors in loaded for n, t in tensors.items()])
    if len(files) > 1:
        model.metadata["n_shards"] = len(files)
    return model


def _load_hf_dir(path, names, allow_unknown_globals, strict) -> Model:
    files = hf_dir.read_files(path, names, read_torch=lambda f: _read_torch(f, allow_unknown_globals)[0],
                              read_json=read_json)
    fmt = "safetensors" if files.kind == "safetensors" else _torch_format(files.weights[0])
    return sd.build_model(files.tensors, path=path, source_format=fmt, files=files.inputs, hf_config=files.config,
                          st_metadata=files.st_metadata, strict=strict, stored=files.stored)
