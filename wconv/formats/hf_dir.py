"""Hugging Face model directories, as transformers' from_pretrained reads them.

Written: `config.json` (the family's *ForCausalLM class, from wconv.arch), the weights with HF
names and orientation (the family's fix-ups: q/k rows permuted for HF's rotate_half, GPT-2
Conv1D weights stored [in, out], Gemma's norms as w; a tied classifier is left out, HF re-ties
it), and the model's tokenizer as `tokenizer.json` + `tokenizer_config.json` (plus the
sentencepiece `tokenizer.model` when that was its source). Weights go to `model.safetensors`, or,
above the shard limit, to `model-0000N-of-0000M.safetensors` plus `model.safetensors.index.json`
(save_pretrained's layout). Every file is streamed one tensor at a time by safetensors_io.write.

wconv's directory reader (wconv.convert.sources.load_directory, via convert.load.load_model) reads all of it back.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import numpy as np

from .. import arch, codecs, dtypes, sizes
from ..errors import FormatError, UnsupportedError, UsageError, WconvError
from ..model import Model
from ..notes import emit as emit_notes
from ..progress import warn
from ..tensor import LazyTensor
from . import safetensors_io

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # save_pretrained's default, "5GB"
_TORCH_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# Everything wconv may write into an HF directory (weights, config, tokenizer files).
OUTPUT_FILES = {"config.json", SINGLE_FILE, INDEX_FILE, "generation_config.json", "tokenizer.model",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


def own_output(path) -> str | None:
    """None when directory `path` is a previous wconv HF output (and so may be replaced), else why not.

    Ours: only files of the names wconv writes, no subdirectories, and every safetensors file
    carries wconv's `wconv.*` metadata (transformers' save_pretrained writes only {"format": "pt"}).
    """
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:
        return f"it cannot be listed ({e.strerror or e})"
    foreign = [n for n in entries if not (n in OUTPUT_FILES or SHARD_FILE.match(n))
               or not os.path.isfile(os.path.join(path, n)) or os.path.islink(os.path.join(path, n))]
    if foreign:
        return f"it holds {', '.join(foreign[:5])}{' …' if len(foreign) > 5 else ''}, which wconv did not write"
    weights = [n for n in entries if n.endswith(".safetensors")]
    if not weights:
        return "it holds no wconv-written weights"
    for n in weights:
        try:
            _, meta, _, _ = safetensors_io.read_header(os.path.join(path, n))
        except WconvError:
            return f"{n} is not a readable safetensors file"
        if not any(k.startswith(safetensors_io.CONFIG_PREFIX) for k in meta):
            return f"{n} was not written by wconv"
    return None


def parse_size(value) -> int:
    """Bytes of a --max-shard-size ("5GB", "500MB", "64KiB", "1000", as save_pretrained takes it)."""
    return sizes.parse_size(value, "--max-shard-size")


def output_dtype(model, dtype=None) -> dtypes.DType:
    """One element type for every tensor: the requested one, else the source's if it has a
    single f32/f16/bf16 type, else f32 (lossless for mixed and quantised sources)."""
    if dtype is not None:
        return codecs.from_option(dtype, ("f32", "f16", "bf16"), None, "Hugging Face output")
    kinds = {t.dtype for t in model.tensors.values()}
    if len(kinds) == 1 and next(iter(kinds)).name in _TORCH_DTYPE:
        return next(iter(kinds))
    return dtypes.F32


def check_options(model, out, *, dtype=None, max_shard_size=None, max_seq_len=None) -> None:
    """Refuse, naming OUT, what an HF directory cannot hold, before anything is written."""
    try:
        output_dtype(model, dtype)
        if max_shard_size is not None:
            parse_size(max_shard_size)
    except UsageError as e:
        raise UsageError(out, e.message) from None
    c = model.config
    fam = arch.get(c.arch)
    if fam is None or "hf" not in fam.names:
        raise UsageError(out, f"no Hugging Face model class for architecture {c.arch!r}")
    try:
        fam.hf_config(c)  # refuses what config.json cannot express (e.g. a table of RoPE factors)
    except UnsupportedError as e:
        raise UsageError(out, e.message) from None
    if getattr(fam, "hf_permuted", False):
        for name, heads in (("blk.0.attn_q.weight", c.n_heads), ("blk.0.attn_k.weight", c.n_kv_heads)):
            t = model.get(name)
            if not heads or (t is not None and t.shape[0] % (2 * heads)):
                raise UsageError(out, f"{name}: cannot permute its rows for {heads} heads")
    if c.arch == "gpt2" and max_seq_len and max_seq_len != c.max_seq_len:
        raise UsageError(out, f"GPT-2's context is its {c.max_seq_len} position embeddings; "
                              f"cannot write --max-seq-len {max_seq_len}")
    if model.tokenizer is not None and c.vocab_size:
        from .gguf_io import check_vocab_fits

        check_vocab_fits(model.tokenizer, c.vocab_size, model.path or out)


def _special_ids(model) -> tuple:
    tok, c = model.tokenizer, model.config
    ids = (tok.bos_id, tok.eos_id) if tok is not None else arch.require(c.arch).hf_special_ids
    return tuple(i if isinstance(i, int) and 0 <= i < c.vocab_size else None for i in ids)


def hf_config(model, out_dtype: dtypes.DType, *, max_seq_len=None) -> dict:
    """config.json: safetensors_io.hf_config plus dtype, special tokens and the context override."""
    c = model.config
    config = safetensors_io.hf_config(model)
    config["torch_dtype"] = _TORCH_DTYPE[out_dtype.name]
    config["bos_token_id"], config["eos_token_id"] = _special_ids(model)
    if c.arch != "gpt2" and max_seq_len:
        config["max_position_embeddings"] = int(max_seq_len)
    return config


def _hf_tensors(model) -> dict:
    """Canonical name -> tensor to write, with zero biases for a bias-free GPT-2 (HF's GPT-2 always has them; zero is the same model)."""
    # Quantised tensors go as they are: the writer decodes them in row pieces (the HF q/k row
    # order is applied to their blocks, wconv.arch.decoder), so one dtype comes out throughout.
    tensors, c = dict(model.tensors), model.config
    if c.arch == "gpt2" and not c.bias:
        with_bias = dataclasses.replace(c, bias=True)
        for name in arch.require("gpt2").expected_names(with_bias):
            if name.endswith(".bias") and name not in tensors:
                rows = c.hidden_dim if "ffn_up" in name else c.dim * (3 if "attn_qkv" in name else 1)
                tensors[name] = LazyTensor(name, dtypes.F32, (rows,), lambda n=rows: np.zeros(n, np.float32),
                                           "zero bias")
    return tensors


def plan_shards(sizes: list, max_bytes: int) -> list:
    """Greedy split of [(name, nbytes)] in order: a new shard when the next tensor would push
    the current one past max_bytes (a tensor larger than that gets a shard of its own)."""
    shards, current, used = [], [], 0
    for name, n in sizes:
        if current and used + n > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += n
    if current or not shards:
        shards.append(current)
    return shards


def _copy_tokenizer(model, tmp_dir) -> None:
    """Tokenizer files AutoTokenizer loads (wconv.formats.hf_tokenizer): an HF tokenizer.json source is
    copied with its tokenizer_config.json; any other vocabulary (sentencepiece, tiktoken, GPT-2 files,
    GGUF, tokenizer.bin) is written as tokenizer.json + tokenizer_config.json, and a sentencepiece
    tokenizer.model is copied too (HF's slow LlamaTokenizer reads it)."""
    from . import hf_tokenizer

    tok = model.tokenizer
    if tok is None:
        return
    source = tok.source or ""
    if model.config.vocab_size and len(tok.tokens) > model.config.vocab_size:
        raise UsageError(source or None, f"tokenizer has {len(tok.tokens)} tokens but the model only "
                                         f"{model.config.vocab_size} embedding rows")
    if tok.kind == "hf-tokenizer-json" and os.path.isfile(source):
        shutil.copyfile(source, os.path.join(tmp_dir, "tokenizer.json"))
        from ..vocab import sniff

        configs = [f for f in tok.files[1:] if os.path.isfile(f) and sniff(f) == "hf-tokenizer-config"]
        if configs:
            shutil.copyfile(configs[0], os.path.join(tmp_dir, "tokenizer_config.json"))
        else:
            _write_json(os.path.join(tmp_dir, "tokenizer_config.json"),
                        hf_tokenizer.tokenizer_config(tok, model_max_length=model.config.max_seq_len))
        return
    try:
        hf_tokenizer.write(tok, tmp_dir, where=source or model.path, model_max_length=model.config.max_seq_len)
    except UnsupportedError as e:  # the weights are still right: say what is missing, once
        warn(model.path or None, f"no tokenizer files written: {e}")
        return
    if tok.kind == "sentencepiece" and os.path.isfile(source):
        shutil.copyfile(source, os.path.join(tmp_dir, "tokenizer.model"))


def write(model, tmp_dir, *, quiet: bool = False, dtype=None, max_shard_size=None, max_seq_len=None,
          threads=None) -> None:
    """Fill the (empty, temporary) directory tmp_dir with the HF form of `model`."""
    check_options(model, tmp_dir, dtype=dtype, max_shard_size=max_shard_size, max_seq_len=max_seq_len)
    out_dtype = output_dtype(model, dtype)
    limit = DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else parse_size(max_shard_size)
    fam = arch.require(model.config.arch)
    tensors = _hf_tensors(model)
    sizes = [(name, out_dtype.nbytes(t.n_elements)) for name, t in tensors.items()]
    shards = plan_shards(sizes, limit)

    notes = []  # filled by every shard's writer (dequantised tensors, F16 overflow), said once at the end

    def write_shard(names, filename):
        part = Model(config=model.config, tensors={n: tensors[n] for n in names}, path=model.path)
        safetensors_io.write(part, os.path.join(tmp_dir, filename), quiet=quiet, dtype=out_dtype, names="hf",
                             notes=notes, threads=threads)

    if len(shards) == 1:
        write_shard(shards[0], SINGLE_FILE)
    else:
        weight_map = {}
        for i, names in enumerate(shards, 1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_shard(names, filename)
            weight_map.update((fam.from_canonical(n, "hf"), filename) for n in names)
        index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}
        _write_json(os.path.join(tmp_dir, INDEX_FILE), index)
    _write_json(os.path.join(tmp_dir, "config.json"), hf_config(model, out_dtype, max_seq_len=max_seq_len))
    _copy_tokenizer(model, tmp_dir)
    emit_notes(model.path or None, notes)


def _write_json(path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------- reading
# (index file, single file, reader kind), in order of preference.
WEIGHTS = (
    ("model.safetensors.index.json", "model.safetensors", "safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin", "torch"),
)


@dataclasses.dataclass
class HFFiles:
    """The files of an HF model directory, read: config.json and every weight shard's tensors."""
    config: dict
    kind: str  # "safetensors" or "torch"
    weights: list  # weight file paths, in shard order
    tensors: dict  # HF name -> LazyTensor
    stored: list  # [(file, name, LazyTensor)] in file order: the file view
    st_metadata: dict  # the first safetensors shard's __metadata__
    inputs: list  # every file read (index, shards, config.json)


def read_files(path, names, *, read_torch, read_json) -> HFFiles:
    """Read directory `path` (whose entries are `names`) as an HF checkpoint. read_torch(file) ->
    {name: LazyTensor} and read_json(file) -> dict are the caller's (the torch reader lives with the
    checkpoint layouts); shards are checked against their index."""
    config_path = os.path.join(path, "config.json")
    config = read_json(config_path)
    for index_name, single_name, kind in WEIGHTS:
        if index_name in names:
            files = _index_files(os.path.join(path, index_name), read_json)
            index_files = [os.path.join(path, index_name)]
            break
        if single_name in names:
            files, index_files = {single_name: None}, []
            break
    else:
        raise FormatError(path, "config.json found but no model.safetensors, pytorch_model.bin or their .index.json")
    tensors, st_meta, stored = {}, {}, []
    for fname, wanted in files.items():
        fpath = os.path.join(path, fname)
        if kind == "safetensors":
            got, meta = safetensors_io.read(fpath)
            st_meta = st_meta or meta
        else:
            got = read_torch(fpath)
        if wanted is not None:
            absent = [n for n in wanted if n not in got]
            if absent:
                raise FormatError(fpath, f"does not contain {_short(absent)} that {index_files[0]} "
                                         "says it holds")
            got = {n: t for n, t in got.items() if n in wanted}
        for n, t in got.items():
            if n in tensors:
                raise FormatError(fpath, f"tensor {n!r} also appears in another shard")
            tensors[n] = t
            stored.append((fpath, n, t))
    weights = [os.path.join(path, f) for f in files]
    return HFFiles(config, kind, weights, tensors, stored, st_meta, index_files + weights + [config_path])


def _short(items, n=3):
    items = list(items)
    return ", ".join(repr(i) for i in items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def _index_files(index_path, read_json) -> dict:
    """{shard file: set of tensor names} from an HF *.index.json, with the files checked."""
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(index_path, "no weight_map (tensor name -> shard file) in the index")
    files = {}
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or os.path.basename(fname) != fname or fname in ("", ".", ".."):
            raise FormatError(index_path, f"weight_map entry {name!r} names an invalid file {fname!r}")
        files.setdefault(fname, set()).add(name)
    directory = os.path.dirname(index_path)
    files = dict(sorted(files.items()))
    for fname in files:
        if not os.path.isfile(os.path.join(directory, fname)):
            raise FormatError(index_path, f"names shard {fname} which does not exist")
    return files
