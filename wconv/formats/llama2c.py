"""llama2.c model files (.bin): read and write versions 0, 1 and 2.

Layouts (from karpathy/llama2.c export.py, run.c, runq.c), all little-endian:

* v0 (legacy, what run.c reads): 7 int32 header (dim, hidden_dim, n_layers,
  n_heads, n_kv_heads, vocab_size, seq_len); vocab_size is negative when the
  classifier is NOT shared with the token embedding. Then fp32: token embedding,
  every layer's rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3 (each kind for all
  layers before the next kind), final rms, two RoPE tables (freq_cis_real and
  freq_cis_imag, seq_len x head_dim/2 each; run.c skips them), then the
  classifier when not shared.
* v1: uint32 magic 0x616b3432 ("ak42"), int32 version, the 7 int32 params
  (vocab_size positive), uint8 shared-classifier flag, zero padding to 256
  bytes; fp32 weights with the norms first: all rms_att, all rms_ffn, final rms,
  token embedding, wq, wk, wv, wo, w1, w2, w3, classifier when not shared.
* v2 (what runq.c reads): same header plus an int32 group size right after the
  flag byte (offset 37, unaligned). fp32 norms first (rms_att, rms_ffn, final),
  then each matrix - token embedding, wq, wk, wv, wo, w1, w2, w3, classifier
  when not shared - as int8 values followed by one fp32 scale per group of
  `group_size` consecutive elements (symmetric: scale = max|w| / 127).

Choices (documented in the README/docs):
* v2 group size: default 64, halved until it divides BOTH dim and hidden_dim
  (runq.c quantises activations of both widths in groups of the same size;
  llama2.c's exporter only checks dim, which breaks e.g. hidden_dim 172). Halving
  keeps llama2.c's power-of-two groups. An explicit size that does not divide
  both is a UsageError.
* run.c hard-codes norm eps 1e-5 and RoPE theta 10000: other values are written
  anyway with a warning on stderr (the .bin cannot record them).
* On read, v2 matrices are float32 LazyTensors whose loader dequantises the
  int8 groups on demand (the IR has no dtype for llama2.c's fp32-scale groups);
  `metadata["quantization"]` records the original encoding.
"""
from __future__ import annotations

import math
import os
import struct

import numpy as np

from .. import arch, dtypes, stream
from ..errors import FormatError, UnsupportedError, UsageError
from ..mapped import map_array
from ..model import Config, Model, Stored
from ..progress import progress, warn
from ..tensor import FileSpan, LazyTensor

MAGIC = 0x616B3432  # "ak42" as a little-endian uint32
HEADER_BYTES = 256  # v1 / v2
V0_HEADER_BYTES = 28
DEFAULT_GROUP_SIZE = 64
DEFAULT_SEQ_LEN = 2048  # what llama2.c's export uses for Meta checkpoints (no seq len there)
RUNC_NORM_EPS = 1e-5
RUNC_ROPE_THETA = 10000.0
QMAX = 127.0

# Canonical names of the per-layer tensors, in the order llama2.c groups them.
ATTN = ("attn_q", "attn_k", "attn_v", "attn_output")
FFN = ("ffn_gate", "ffn_down", "ffn_up")  # llama2.c's w1, w2, w3


def _blk(n_layers: int, kind: str) -> list[str]:
    return [f"blk.{i}.{kind}.weight" for i in range(n_layers)]


def tensor_order(version: int, n_layers: int, shared: bool) -> list[str]:
    """Canonical tensor names in file order (v0's RoPE tables are not tensors)."""
    L = n_layers
    cls = [] if shared else ["output.weight"]
    if version == 0:
        names = ["token_embd.weight"] + _blk(L, "attn_norm")
        for kind in ATTN:
            names += _blk(L, kind)
        names += _blk(L, "ffn_norm")
        for kind in FFN:
            names += _blk(L, kind)
        return names + ["output_norm.weight"] + cls
    norms = _blk(L, "attn_norm") + _blk(L, "ffn_norm") + ["output_norm.weight"]
    matrices = ["token_embd.weight"]
    for kind in ATTN + FFN:
        matrices += _blk(L, kind)
    return norms + matrices + cls


def tensor_shapes(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size) -> dict:
    kv_dim = dim // n_heads * n_kv_heads
    shapes = {"token_embd.weight": (vocab_size, dim), "output_norm.weight": (dim,),
              "output.weight": (vocab_size, dim)}
    per_layer = {"attn_norm": (dim,), "ffn_norm": (dim,), "attn_q": (dim, dim), "attn_k": (kv_dim, dim),
                 "attn_v": (kv_dim, dim), "attn_output": (dim, dim), "ffn_gate": (hidden_dim, dim),
                 "ffn_down": (dim, hidden_dim), "ffn_up": (hidden_dim, dim)}
    for i in range(n_layers):
        for kind, shape in per_layer.items():
            shapes[f"blk.{i}.{kind}.weight"] = shape
    return shapes


def rope_tables(seq_len: int, head_dim: int, theta: float = RUNC_ROPE_THETA):
    """cos/sin tables [seq_len, head_dim/2] computed in float32 like llama2.c's model.py."""
    half = head_dim // 2
    exponents = np.arange(0, head_dim, 2)[:half].astype(np.float32) / np.float32(head_dim)
    freqs = np.float32(1.0) / np.power(np.float32(theta), exponents, dtype=np.float32)
    angles = np.outer(np.arange(seq_len, dtype=np.float32), freqs).astype(np.float32)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def pick_group_size(dim: int, hidden_dim: int, requested: int | None, path=None) -> int:
    if requested is not None:
        if requested <= 0 or dim % requested or hidden_dim % requested:
            raise UsageError(path, f"group size {requested} must divide both dim ({dim}) and "
                                   f"hidden_dim ({hidden_dim})")
        return requested
    gs = DEFAULT_GROUP_SIZE
    while dim % gs or hidden_dim % gs:
        gs //= 2
    return gs


# --------------------------------------------------------------------------- read

class _Header:
    def __init__(self, version, dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len,
                 shared, group_size=None):
        self.version = version
        self.dim, self.hidden_dim, self.n_layers = dim, hidden_dim, n_layers
        self.n_heads, self.n_kv_heads, self.vocab_size, self.seq_len = n_heads, n_kv_heads, vocab_size, seq_len
        self.shared, self.group_size = shared, group_size

    def shapes(self):
        return tensor_shapes(self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads,
                             self.vocab_size)


def _read_header(path: str, size: int) -> _Header:
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise FormatError(path, f"cannot read: {e.strerror or e}") from None
    if len(head) < V0_HEADER_BYTES:
        raise FormatError(path, f"too short for a llama2.c file ({len(head)} bytes)")
    if struct.unpack_from("<I", head, 0)[0] == MAGIC:
        version = struct.unpack_from("<i", head, 4)[0]
        if version not in (1, 2):
            raise UnsupportedError(path, f"llama2.c .bin version {version} is not supported (known: 0, 1, 2)")
        if len(head) < HEADER_BYTES:
            raise FormatError(path, f"truncated header: {len(head)} of {HEADER_BYTES} bytes")
        params = struct.unpack_from("<7i", head, 8)
        shared = head[36]
        if shared not in (0, 1):
            raise FormatError(path, f"shared-classifier flag is {shared}, expected 0 or 1")
        group_size = struct.unpack_from("<i", head, 37)[0] if version == 2 else None
        hdr = _Header(version, *params, bool(shared), group_size)
    else:
        params = list(struct.unpack_from("<7i", head, 0))
        shared = params[5] > 0
        params[5] = abs(params[5])
        hdr = _Header(0, *params, shared)
    _validate_params(path, hdr)
    return hdr


def _validate_params(path, h: _Header):
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    values = (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len)
    what = "not a llama2.c model file" if h.version == 0 else "bad llama2.c header"
    for n, v in zip(names, values):
        if not 0 < v < 1 << 24:
            raise FormatError(path, f"{what}: {n} = {v}")
    if h.dim % h.n_heads or h.n_heads % h.n_kv_heads or (h.dim // h.n_heads) % 2:
        raise FormatError(path, f"{what}: dim {h.dim}, n_heads {h.n_heads}, n_kv_heads {h.n_kv_heads} "
                                "do not fit together")
    if h.version == 2:
        gs = h.group_size
        if gs is None or gs <= 0 or h.dim % gs or h.hidden_dim % gs:
            raise FormatError(path, f"{what}: group size {gs} does not divide dim {h.dim} and "
                                    f"hidden_dim {h.hidden_dim}")


def read(path) -> Model:
    """Open a llama2.c .bin lazily (v0, v1, v2); no tensor bytes are read here."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise FormatError(path, f"cannot read: {e.strerror or e}") from None
    h = _read_header(path, size)
    if h.n_layers * 8 * h.dim > size:  # every layer has two float32 norms: refuse before a loop over layers
        raise FormatError(path, f"file size {size} is smaller than the norms alone of its {h.n_layers} layers "
                                f"of dim {h.dim}: truncated or not a llama2.c file")
    shapes = h.shapes()
    names = tensor_order(h.version, h.n_layers, h.shared)
    base = os.path.basename(path)
    tensors = {}
    rope_tables_present = None
    if h.version == 2:
        offsets, end = _v2_offsets(h, names, shapes)
    else:
        offsets, end = {}, V0_HEADER_BYTES if h.version == 0 else HEADER_BYTES
        for name in names:
            if name == "output.weight" and h.version == 0:
                # v0: the RoPE tables sit between the final norm and the classifier.
                rope_tables_present = _v0_has_rope_tables(path, h, end, size)
                if rope_tables_present:
                    end += 4 * h.seq_len * (h.dim // h.n_heads)
            offsets[name] = end
            end += 4 * math.prod(shapes[name])
        if h.version == 0 and rope_tables_present is None:
            rope_tables_present = _v0_has_rope_tables(path, h, end, size)
            if rope_tables_present:
                end += 4 * h.seq_len * (h.dim // h.n_heads)
    if end != size:
        raise FormatError(path, f"file size {size} does not match its llama2.c v{h.version} header "
                                f"(expected {end} bytes): truncated or not a llama2.c file")
    for name in names:
        shape = shapes[name]
        if h.version == 2 and len(shape) == 2:
            tensors[name] = _q8_tensor(path, size, base, name, shape, offsets[name], h.group_size)
        else:
            tensors[name] = _f32_tensor(path, size, base, name, shape, offsets[name])
    config = Config(arch="llama", dim=h.dim, n_layers=h.n_layers, n_heads=h.n_heads, n_kv_heads=h.n_kv_heads,
                    vocab_size=h.vocab_size, hidden_dim=h.hidden_dim, max_seq_len=h.seq_len,
                    norm_eps=RUNC_NORM_EPS, rope_theta=RUNC_ROPE_THETA, tie_embeddings=h.shared)
    metadata = {"llama2c_version": h.version, "shared_classifier": h.shared, "_input_files": [path],
                "_arch_source": "llama2.c .bin files hold Llama models"}
    if h.version == 0:
        metadata["rope_tables"] = bool(rope_tables_present)
    if h.version == 2:
        metadata["group_size"] = h.group_size
        metadata["quantization"] = {"scheme": "llama2c-q8_0", "group_size": h.group_size,
                                    "note": "int8 values with one fp32 scale per group; dequantised on read"}
    # The file has no names: its tensors are known by position, which llama2.c's order fixes.
    stored = [Stored(path, n, t, n, "int8 groups + fp32 scales" if h.version == 2 and len(t.shape) == 2 else "")
              for n, t in tensors.items()]
    return Model(config=config, tensors=tensors, metadata=metadata, source_format=f"llama2c-v{h.version}",
                 source_layout="llama2c", path=path, stored=stored)


def _plausible_v0_header(path):
    """The v0 header of `path` if its seven ints are plausible hyperparameters, else None."""
    with open(path, "rb") as f:
        head = f.read(V0_HEADER_BYTES)
    if len(head) < V0_HEADER_BYTES or struct.unpack_from("<I", head)[0] == MAGIC:
        return None
    params = list(struct.unpack_from("<7i", head))
    shared = params[5] > 0
    params[5] = abs(params[5])
    h = _Header(0, *params, shared)
    _validate_params(path, h)
    return h


def has_v0_header(path) -> bool:
    """True when `path` starts with plausible v0 hyperparameters (sizes not checked)."""
    try:
        return _plausible_v0_header(path) is not None
    except (OSError, FormatError, struct.error):
        return False


def looks_like_v0(path) -> bool:
    """True when `path` has a plausible v0 header whose sizes add up to the file size."""
    try:
        size = os.path.getsize(path)
        h = _plausible_v0_header(path)
        if h is None:
            return False
        weights = sum(math.prod(s) for n, s in h.shapes().items() if n != "output.weight")
        after = V0_HEADER_BYTES + 4 * weights
        return _v0_has_rope_tables(path, h, after, size) in (True, False)
    except (OSError, FormatError, struct.error):
        return False


def _v0_has_rope_tables(path, h: _Header, after_final_norm: int, size: int) -> bool:
    """Whether a v0 file carries the two RoPE tables (current exporters write them)."""
    tables = 4 * h.seq_len * (h.dim // h.n_heads)
    cls = 0 if h.shared else 4 * h.vocab_size * h.dim
    if size == after_final_norm + tables + cls:
        return True
    if size == after_final_norm + cls:
        return False
    with_tables = after_final_norm + tables + cls
    raise FormatError(path, f"file size {size} does not match its llama2.c v0 header (expected "
                            f"{with_tables} bytes, or {with_tables - tables} without RoPE tables): "
                            "truncated or not a llama2.c file")


def _v2_offsets(h: _Header, names, shapes):
    offsets, pos = {}, HEADER_BYTES
    for name in names:
        n = math.prod(shapes[name])
        offsets[name] = pos
        pos += 4 * n if len(shapes[name]) == 1 else n + 4 * (n // h.group_size)
    return offsets, pos


def _memmap(path, size, dtype, offset, count, name):
    """`count` elements at `offset`, zero-copy; the map goes away with the array."""
    dtype = np.dtype(dtype)
    return map_array(path, offset, count * dtype.itemsize, dtype, file_size=size, what=f"tensor {name}")


def _f32_tensor(path, size, base, name, shape, offset) -> LazyTensor:
    n = math.prod(shape)
    return LazyTensor(name, dtypes.F32, shape, lambda: _memmap(path, size, "<f4", offset, n, name).reshape(shape),
                      f"{base}@{offset}", storage_key=(path, offset), span=FileSpan(path, offset, 4 * n, size))


def _q8_tensor(path, size, base, name, shape, offset, group_size) -> LazyTensor:
    n = math.prod(shape)

    def load():
        q = _memmap(path, size, np.int8, offset, n, name).reshape(-1, group_size)
        scales = _memmap(path, size, "<f4", offset + n, n // group_size, name)
        return dequantize_groups(q, scales).reshape(shape)

    return LazyTensor(name, dtypes.F32, shape, load, f"{base}@{offset}:int8 g{group_size}",
                      storage_key=(path, offset))


def dequantize_groups(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 [groups, group_size] x fp32 scale per group -> float32 (as runq.c does)."""
    return q.astype(np.float32) * np.asarray(scales, dtype=np.float32)[:, None]


def quantize_groups(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per group like llama2.c's quantize_q80; all-zero groups get scale 0."""
    g = np.asarray(w, dtype=np.float32).reshape(-1, group_size)
    scale = (np.abs(g).max(axis=1) / np.float32(QMAX)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)
    q = np.round(g / safe[:, None]).astype(np.int8)  # round half to even, like torch.round
    return q, scale


# -------------------------------------------------------------------------- write

def _check_model(model: Model, where=None) -> tuple[dict, bool, int]:
    """Validate that llama2.c can represent `model`; return (shapes, shared, hidden_dim)."""
    c, where = model.config, where or model.path or None
    fam = arch.get(c.arch)
    if fam is None or not fam.llama2c:
        raise UnsupportedError(where, f"llama2.c .bin holds Llama-architecture models only (wconv writes "
                                      f"{', '.join(n for n, f in arch.FAMILIES.items() if f.llama2c)}), not {c.arch!r}")
    if c.rope_scaling or c.head_width:
        raise UnsupportedError(where, "llama2.c's run.c cannot apply " + (
            f"{c.rope_scaling['type']} RoPE scaling" if c.rope_scaling else
            f"a head width ({c.head_dim}) other than dim / n_heads"))
    biases = [n for n in model.tensors if n.endswith(".bias")]
    if c.bias or biases:
        raise UnsupportedError(where, "llama2.c .bin cannot store biases" +
                               (f" (e.g. {biases[0]})" if biases else ""))
    if not c.dim or not c.n_heads or not c.n_layers or c.dim % c.n_heads:
        raise UnsupportedError(where, f"incomplete config: dim {c.dim}, n_heads {c.n_heads}, "
                                      f"n_layers {c.n_layers}")
    n_kv = c.n_kv_heads or c.n_heads
    gate = model.get("blk.0.ffn_gate.weight")
    hidden = gate.shape[0] if gate is not None else c.hidden_dim
    emb = model.get("token_embd.weight")
    vocab = emb.shape[0] if emb is not None else c.vocab_size
    shared = model.get("output.weight") is None
    shapes = tensor_shapes(c.dim, hidden, c.n_layers, c.n_heads, n_kv, vocab)
    needed = tensor_order(1, c.n_layers, shared)
    missing = [n for n in needed if n not in model.tensors]
    if missing:
        raise UnsupportedError(where, f"missing tensor {missing[0]} ({len(missing)} missing)")
    extra = [n for n in model.tensors if n not in shapes]
    if extra:
        raise UnsupportedError(where, f"llama2.c .bin has no place for tensor {extra[0]}")
    for n in needed:
        if model[n].shape != shapes[n]:
            raise UnsupportedError(where, f"tensor {n} has shape {list(model[n].shape)}, "
                                          f"expected {list(shapes[n])}")
    return shapes, shared, hidden


def cannot_hold(model: Model) -> list:
    """What run.c will use instead of this model's values (the .bin has no field for them)."""
    c = model.config
    out = list(arch.require(c.arch).gguf_cannot_hold(c, runtime="llama2.c's run.c"))  # e.g. a sliding window
    if c.norm_eps and abs(c.norm_eps - RUNC_NORM_EPS) > 1e-12:
        out.append(f"norm eps is {c.norm_eps:g} but run.c hard-codes 1e-5; llama2.c will run this model with 1e-5")
    if c.rope_theta and c.rope_theta != RUNC_ROPE_THETA:
        out.append(f"rope theta is {c.rope_theta:g} but run.c hard-codes 10000; llama2.c will produce "
                   "different outputs")
    return out


def check_options(model: Model, out, *, version: int = 0, group_size: int | None = None,
                  max_seq_len: int | None = None) -> None:
    """Every check `write` makes before its first byte, run before the temporary output exists:
    what the model cannot be written as names the input, what the options ask for names OUT."""
    if version not in (0, 1, 2):
        raise UsageError(out, f"unknown llama2.c version {version} (0, 1 or 2)")
    if group_size is not None and version != 2:
        raise UsageError(out, "--group-size only applies to version 2")
    if max_seq_len is not None and max_seq_len <= 0:
        raise UsageError(out, f"--max-seq-len must be positive, got {max_seq_len}")
    if max_seq_len is not None and max_seq_len > (1 << 31) - 1:
        raise UsageError(out, f"--max-seq-len {max_seq_len} is too large (llama2.c's header holds an int32)")
    _, _, hidden = _check_model(model, model.path or out)
    if version == 2:
        pick_group_size(model.config.dim, hidden, group_size, out)


def _write_f32(f, t: LazyTensor, threads=None):
    stream.write_tensors(f, [(t, dtypes.F32)], threads=threads)


def _write_q8(f, t: LazyTensor, group_size: int, chunk_groups: int = 1 << 16) -> float:
    """Quantise one tensor in chunks; write int8 values then the fp32 scales. Returns max error."""
    scales, max_err = [], 0.0
    for piece in t.float32_chunks(chunk_groups * group_size, multiple_of=group_size):
        block = piece.reshape(-1, group_size)
        q, s = quantize_groups(block, group_size)
        f.write(memoryview(np.ascontiguousarray(q)).cast("B"))
        scales.append(s)
        max_err = max(max_err, float(np.abs(dequantize_groups(q, s) - block).max(initial=0.0)))
    f.write(memoryview(np.ascontiguousarray(np.concatenate(scales), dtype="<f4")).cast("B"))
    return max_err


def write(model: Model, tmp_path, *, quiet: bool = False, version: int = 0, group_size: int | None = None,
          max_seq_len: int | None = None, threads: int | None = None) -> dict:
    """Write `model` as a llama2.c .bin of `version` to `tmp_path`, one tensor at a time.

    Returns a small summary (version, group_size, max quantisation error for v2).
    """
    if version not in (0, 1, 2):
        raise UsageError(model.path or None, f"unknown llama2.c version {version} (0, 1 or 2)")
    if group_size is not None and version != 2:
        raise UsageError(model.path or None, "--group-size only applies to version 2")
    shapes, shared, hidden = _check_model(model)
    for note in cannot_hold(model):
        warn(None, note)
    c = model.config
    n_kv = c.n_kv_heads or c.n_heads
    vocab = shapes["token_embd.weight"][0]
    seq_len = max_seq_len if max_seq_len is not None else c.max_seq_len
    if max_seq_len is not None and max_seq_len <= 0:
        raise UsageError(model.path or None, f"max_seq_len must be positive, got {max_seq_len}")
    if not seq_len:
        seq_len = DEFAULT_SEQ_LEN
        warn(None, f"the model does not record a context length; writing seq_len {seq_len} "
              "(override with --max-seq-len)")
    gs = pick_group_size(c.dim, hidden, group_size, model.path or None) if version == 2 else None
    if version == 2 and group_size is None and gs != DEFAULT_GROUP_SIZE:
        warn(None, f"group size {DEFAULT_GROUP_SIZE} does not divide both dim {c.dim} and hidden_dim {hidden}; "
              f"using {gs}")
    params = (c.dim, hidden, c.n_layers, c.n_heads, n_kv, vocab, seq_len)
    names = tensor_order(version, c.n_layers, shared)
    total = sum(model[n].n_elements for n in names)
    summary = {"version": version, "shared_classifier": shared, "seq_len": seq_len}
    max_err = 0.0
    with open(tmp_path, "wb") as f, progress(total, f"writing llama2.c v{version}", quiet=quiet) as bar:
        if version == 0:
            v0_params = params[:5] + (vocab if shared else -vocab,) + params[6:]
            f.write(struct.pack("<7i", *v0_params))
        else:
            head = struct.pack("<Ii7iB", MAGIC, version, *params, int(shared))
            if version == 2:
                head += struct.pack("<i", gs)
            f.write(head + b"\0" * (HEADER_BYTES - len(head)))
        if version == 2:
            for name in names:
                t = model[name]
                if len(shapes[name]) == 2:
                    max_err = max(max_err, _write_q8(f, t, gs))
                else:
                    _write_f32(f, t, threads)
                bar.update(t.n_elements)
        else:  # all fp32: one stream over every tensor, the v0 RoPE tables in their place
            def before(i):
                if version == 0 and names[i] == "output.weight":
                    _write_rope_tables(f, seq_len, c.dim // c.n_heads, c.rope_theta or RUNC_ROPE_THETA)
            stream.write_tensors(f, [(model[n], dtypes.F32) for n in names], threads=threads, before=before,
                                 after=lambda i: bar.update(model[names[i]].n_elements))
        if version == 0 and shared:
            _write_rope_tables(f, seq_len, c.dim // c.n_heads, c.rope_theta or RUNC_ROPE_THETA)
    if version == 2:
        summary.update(group_size=gs, max_quantization_error=max_err)
    return summary


def _write_rope_tables(f, seq_len, head_dim, theta):
    cos, sin = rope_tables(seq_len, head_dim, theta)
    f.write(memoryview(np.ascontiguousarray(cos, dtype="<f4")).cast("B"))
    f.write(memoryview(np.ascontiguousarray(sin, dtype="<f4")).cast("B"))
