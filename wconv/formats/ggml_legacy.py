"""llama.cpp's pre-GGUF model files: unversioned `ggml`, `ggmf` v1, `ggjt` v1-v3.

Byte layout (little-endian; full description in docs/ggjt.md):

    u32 magic          0x67676d6c 'ggml' | 0x67676d66 'ggmf' | 0x67676a74 'ggjt'
    u32 version        absent for 'ggml'; ggmf: 1; ggjt: 1, 2 or 3
    u32 n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype
    n_vocab times:     u32 len, len bytes of text, f32 score (no score in 'ggml')
    until end of file: u32 n_dims, u32 name_len, u32 ggml_type,
                       u32 dims[n_dims] (dims[0] = row length), name bytes,
                       ggjt only: zero padding to the next multiple of 32 (file offset),
                       tensor data (ggml type layout)

Tensor names are Meta's (tok_embeddings.weight, layers.N.attention.wq.weight, ...).
Quantised block layouts changed twice: ggjt v2 changed the nibble order, v3 made
the Q4_0/Q4_1/Q8_0 scales float16. Only the current layouts are read: F32/F16 in
every version, Q5_0/Q5_1 from ggjt v2, Q4_0/Q4_1/Q8_0 and k-quants from ggjt v3.
The files do not record the context length, the norm epsilon or the number of kv
heads: n_kv_heads comes from the shape of wk; context length 2048 and epsilon 5e-6
are assumed, the defaults of llama.cpp's own GGML-to-GGUF converter.

Vocabulary text is stored the way llama.cpp's old convert.py wrote it: spaces as
' ' (not '▁'), byte tokens as the raw byte, <s>/</s> as empty strings and <unk>
as ' \u2047 '. Reading maps it back to GGUF/sentencepiece form with the rules of
llama.cpp's convert_llama_ggml_to_gguf.py; writing applies the inverse.
"""
from __future__ import annotations

import math
import os
import struct

import numpy as np

from .. import arch, codecs, quant, quant_mix, stream
from ..errors import FormatError, UnsupportedError, UsageError
from ..mapped import map_array
from ..model import Config, Model, Stored, Tokenizer
from ..notes import emit as emit_notes
from ..progress import progress
from ..tensor import FileSpan, LazyTensor

MAGIC_GGML, MAGIC_GGMF, MAGIC_GGJT = 0x67676D6C, 0x67676D66, 0x67676A74
ALIGNMENT = 32  # ggjt tensor data alignment (absolute file offset)
N_CTX_ASSUMED = 2048
NORM_EPS_ASSUMED = 5e-6
MAX_NAME_LEN = 4096
MAX_TOKEN_LEN = 1 << 16

# GGML types whose block layout in each file version is the one GGUF uses today.
_CURRENT_FROM = {"F32": 0, "F16": 0, "Q5_0": 2, "Q5_1": 2, "Q4_0": 3, "Q4_1": 3, "Q8_0": 3,
                 "Q2_K": 3, "Q3_K": 3, "Q4_K": 3, "Q5_K": 3, "Q6_K": 3}
GGJT_TYPES = tuple(_CURRENT_FROM)  # what ggjt v3 (and so write_ggjt) can hold
_LEGACY_WRITTEN = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # --dtype values ggjt takes
_LLAMA = arch.require("llama")  # ggml-era files hold Llama models under Meta's tensor names
UNK_TEXT = " \u2047 ".encode()  # how old convert.py stored <unk>
SPM_SPACE = "\u2581".encode()


# ----------------------------------------------------------------------------- reading
def _version_number(kind: str, version: int) -> int:
    """0 for ggml/ggmf/ggjt v1 (old block layouts), else the ggjt version."""
    return version if kind == "ggjt" else 0


def _token_to_gguf(i: int, text: bytes, n_vocab: int) -> tuple[bytes, int]:
    """(GGUF-style text, TokenType) for token i, as convert_llama_ggml_to_gguf.py decides."""
    if i == 0:
        return b"<unk>", 2
    if i == 1:
        return b"<s>", 3
    if i == 2:
        return b"</s>", 3
    if not text:
        return b"", 3
    if 3 <= i <= 258 and len(text) == 1:
        return f"<0x{text[0]:02X}>".encode(), 6
    return text.replace(b" ", SPM_SPACE), 1


def _token_to_ggml(text: bytes, ttype: int | None) -> bytes:
    """The inverse: GGUF-style token text -> old llama.cpp vocabulary text."""
    if ttype == 2:
        return UNK_TEXT
    if ttype == 3:
        return b""
    if ttype == 6 and len(text) == 6 and text.startswith(b"<0x") and text.endswith(b">"):
        return bytes([int(text[3:5], 16)])
    return text.replace(SPM_SPACE, b" ")


class _Reader:
    """Bounds-checked reads at `pos` from an open file of `end` bytes.

    Ordinary buffered reads, not a map of the whole file: tensor headers are scattered
    between the tensors, and each one touched through a map can pull up to 2 MB of the
    file into the resident set (the kernel maps whole large folios).
    """

    def __init__(self, f, path, end: int):
        self.f, self.path, self.pos, self.end = f, path, 0, end

    def _bytes(self, n: int) -> bytes:
        try:
            self.f.seek(self.pos)  # within the read buffer this is free
            b = self.f.read(n)
        except OSError as e:
            raise FormatError(self.path, f"cannot read: {e.strerror or e}") from None
        if len(b) != n:
            raise FormatError(self.path, f"file shrank while being read (offset {self.pos})")
        self.pos += n
        return b

    def u32(self, what: str, n: int = 1):
        if self.pos + 4 * n > self.end:
            raise FormatError(self.path, f"truncated GGML file: {what} at offset {self.pos}")
        vals = struct.unpack(f"<{n}I", self._bytes(4 * n))
        return vals if n != 1 else vals[0]

    def f32(self, what: str) -> float:
        if self.pos + 4 > self.end:
            raise FormatError(self.path, f"truncated GGML file: {what} at offset {self.pos}")
        (v,) = struct.unpack("<f", self._bytes(4))
        return v

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.end:
            raise FormatError(self.path, f"truncated GGML file: {what} ({n} bytes) at offset {self.pos}")
        return self._bytes(n)


def _magic(r: _Reader) -> tuple[str, int]:
    magic = r.u32("magic")
    if magic == MAGIC_GGML:
        return "ggml", 0
    version = r.u32("version")
    if magic == MAGIC_GGMF and version == 1:
        return "ggmf", 1
    if magic == MAGIC_GGJT and version in (1, 2, 3):
        return "ggjt", version
    if magic == MAGIC_GGMF and version in (100, 101):
        raise UnsupportedError(r.path, f"this is an rwkv.cpp model (ggmf version {version}), not a llama.cpp "
                                       "file; wconv does not read RWKV models")
    if magic in (MAGIC_GGMF, MAGIC_GGJT):
        raise UnsupportedError(r.path, f"unknown {'ggmf' if magic == MAGIC_GGMF else 'ggjt'} version {version}")
    raise FormatError(r.path, f"not a GGML/GGMF/GGJT file (magic {magic:#010x})")


def read(path) -> Model:
    """Open a legacy llama.cpp model file lazily (tensors are views of per-tensor memory maps)."""
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise FormatError(path, f"cannot read: {e.strerror or e}") from None
    with f:
        return _read(path, _Reader(f, path, os.fstat(f.fileno()).st_size))


def _read(path: str, r: _Reader) -> Model:
    if r.end < 8:
        raise FormatError(path, "too short for a GGML file")
    kind, version = _magic(r)
    n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype = r.u32("hyperparameters", 7)
    has_scores = kind != "ggml"
    # llama.cpp's vocab-only files (models/ggml-vocab*.bin of 2023) zero every hyperparameter but n_vocab.
    vocab_only = (n_embd, n_mult, n_head, n_layer, n_rot) == (0, 0, 0, 0, 0) and n_vocab > 0
    if not vocab_only and not (0 < n_embd < 1 << 20 and 0 < n_head <= n_embd and 0 < n_layer < 1 << 16):
        raise FormatError(path, f"implausible hyperparameters n_embd={n_embd} n_head={n_head} n_layer={n_layer} "
                                "(is this a llama.cpp file?)")
    if n_vocab * (8 if has_scores else 4) > r.end - r.pos:
        raise FormatError(path, f"declares {n_vocab} vocabulary entries, more than the file can hold")

    texts, scores = [], [] if has_scores else None
    for i in range(n_vocab):
        n = r.u32(f"length of token {i}")
        if n > MAX_TOKEN_LEN:
            raise FormatError(path, f"token {i} claims {n} bytes (is this a llama.cpp file?)")
        texts.append(r.take(n, f"token {i}"))
        if has_scores:
            scores.append(r.f32(f"score of token {i}"))

    tensors, raw_names = {}, {}
    if vocab_only and r.pos < r.end:
        raise FormatError(path, "hyperparameters are zero (a vocab-only file) but tensor data follows the vocabulary")
    base = os.path.basename(path)
    vnum = _version_number(kind, version)
    while r.pos < r.end:
        n_dims, name_len, ttype = r.u32("tensor header", 3)
        if not 1 <= n_dims <= 4 or name_len > MAX_NAME_LEN:
            raise FormatError(path, f"bad tensor header at offset {r.pos - 12} (n_dims {n_dims}, name length {name_len})")
        dims = r.u32("tensor dims", n_dims)
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        name = r.take(name_len, "tensor name").decode("utf-8", "replace")
        try:
            dt = quant.ggml_dtype(ttype)
        except (ValueError, KeyError):
            raise FormatError(path, f"tensor {name}: unknown GGML type {ttype}") from None
        if dt.name not in _CURRENT_FROM:
            raise UnsupportedError(path, f"tensor {name}: type {dt.name} is not used by llama.cpp GGML files")
        if vnum < _CURRENT_FROM[dt.name]:
            label = f"{kind} v{version}" if kind != "ggml" else "unversioned ggml"
            raise UnsupportedError(path, f"tensor {name}: {dt.name} blocks in {label} files use an old layout "
                                         "that llama.cpp itself dropped; re-quantise from the original weights")
        if kind == "ggjt":
            r.pos += -r.pos % ALIGNMENT
        n_el = math.prod(dims)
        if dt.quantized and dims[0] % dt.block:
            raise FormatError(path, f"tensor {name}: bad shape {list(dims)} for {dt.name}")
        nbytes = dt.nbytes(n_el)
        if r.pos + nbytes > r.end:
            raise FormatError(path, f"truncated GGML file: tensor {name} needs {nbytes} bytes at offset {r.pos}")
        canon = _LLAMA.to_canonical(name, "meta") or name
        if canon in tensors:
            raise FormatError(path, f"duplicate tensor {name}")
        shape = tuple(reversed(dims))
        tensors[canon] = LazyTensor(canon, dt, shape, _loader(path, r.end, name, r.pos, nbytes, dt, shape),
                                    source=f"{base}:{name}", storage_key=(path, r.pos), span=FileSpan(path, r.pos, nbytes, r.end))
        raw_names[canon] = name
        r.pos += nbytes

    if tensors:
        # Tensors run to the end of the file with no count: a file cut at a tensor boundary
        # would otherwise read as a smaller model. (Vocab-only files have no tensors at all.)
        missing = [n for n in _LLAMA.expected_names(Config(n_layers=n_layer)) if n not in tensors]
        if missing:
            raise FormatError(path, f"truncated or incomplete GGML file: {len(missing)} of the tensors of a "
                                    f"{n_layer}-layer llama model are missing, e.g. "
                                    f"{_LLAMA.from_canonical(missing[0], 'meta')}")

    tokenizer = None
    if any(texts):
        toks, types = zip(*(_token_to_gguf(i, t, n_vocab) for i, t in enumerate(texts))) if texts else ((), ())
        tokenizer = Tokenizer(model="llama", tokens=list(toks), scores=scores, token_types=list(types),
                              bos_id=1, eos_id=2, unk_id=0, source=path)

    head_dim = n_embd // n_head if n_head else 0
    wk = tensors.get("blk.0.attn_k.weight")
    gate = tensors.get("blk.0.ffn_gate.weight")
    hidden = gate.shape[0] if gate is not None else ((8 * n_embd // 3 + n_mult - 1) // max(n_mult, 1)) * n_mult
    cfg = Config(arch="llama", dim=n_embd, n_layers=n_layer, n_heads=n_head,
                 n_kv_heads=(wk.shape[0] // head_dim) if wk is not None and head_dim else n_head,
                 vocab_size=n_vocab, hidden_dim=hidden, max_seq_len=N_CTX_ASSUMED,
                 norm_eps=NORM_EPS_ASSUMED, tie_embeddings=bool(tensors) and "output.weight" not in tensors)
    metadata = {"_input_files": [path], "_arch_source": f"{kind} files hold Llama models", "format": kind, "version": version, "n_mult": n_mult, "n_rot": n_rot,
                "ftype": ftype,
                "assumed": {"max_seq_len": N_CTX_ASSUMED, "norm_eps": NORM_EPS_ASSUMED},
                "tensor_names": {k: v for k, v in raw_names.items() if k != v}}
    if not tensors:
        metadata["vocab_only"] = True
    stored = [Stored(path, raw_names[c], t, c if _LLAMA.to_canonical(c, "canonical") else None)
              for c, t in tensors.items()]
    return Model(config=cfg, tensors=tensors, tokenizer=tokenizer, metadata=metadata,
                 source_format=f"{kind}-v{version}" if kind != "ggml" else "ggml", source_layout="meta",
                 path=path, stored=stored)


def _loader(path, size, name, offset, nbytes, dt, shape):
    def load():
        # A map of this tensor's bytes only, unmapped when the caller drops the array.
        storage = np.dtype(np.uint8) if dt.quantized else dt.storage.newbyteorder("<")
        arr = map_array(path, offset, nbytes, storage, file_size=size, what=f"tensor {name}")
        return arr if dt.quantized else arr.reshape(shape)
    return load


# ----------------------------------------------------------------------------- writing
def n_mult_for(dim: int, hidden: int) -> int | None:
    """An n_mult for which old llama.cpp's formula gives `hidden`, or None if none does.

    llama.cpp (ggjt era) computed n_ff = ceil((8 * n_embd / 3) / n_mult) * n_mult
    with integer division; n_mult = hidden works whenever 8 * n_embd / 3 <= hidden.
    """
    base = 8 * dim // 3
    for m in (256, 128, 64, 32, hidden):
        if m > 0 and (base + m - 1) // m * m == hidden:
            return m
    return None


def refuse_k_mix(out, dtype) -> None:
    """GGJT holds the legacy types only: llama-quantize's k-quant mixes are GGUF's."""
    if isinstance(dtype, str) and dtype.lower() in quant_mix.K_MIXES:
        raise UsageError(out, f"--dtype {dtype.lower()} is a k-quant mix, which GGJT output does not take; "
                              "use f32, f16, q8_0, q4_0, q4_1, q5_0 or q5_1, or write GGUF")


def _check_model(model: Model, where, out, dtype):
    """What ggjt cannot hold of the model (names `where`) or of --dtype (names `out`); the family."""
    cfg = model.config
    fam = arch.get(cfg.arch)
    if fam is None or not fam.llama2c:
        raise UnsupportedError(where, f"ggjt files hold llama models only, not {cfg.arch!r}")
    refuse_k_mix(out, dtype)
    can_write = [o for o in codecs.options(ggml=True) if o.upper() in GGJT_TYPES and o.upper() in _LEGACY_WRITTEN]
    if dtype is not None and str(dtype).lower() not in can_write:
        raise UsageError(out, f"ggjt has no {str(dtype).lower()} type; use {', '.join(can_write)}")
    if cfg.rope_scaling or cfg.head_width:
        raise UnsupportedError(where, "ggjt cannot record " + ("RoPE scaling" if cfg.rope_scaling else
                                                              f"a head width ({cfg.head_dim}) other than dim / n_heads"))
    return fam


def check_options(model: Model, out, *, dtype: str | None = None) -> None:
    """Every check `write_ggjt` makes before its first byte, run before the temporary output
    exists: what the model cannot be written as names the input, the options name OUT."""
    from .gguf_io import check_vocab_fits, check_writable

    where = model.path or os.fspath(out)
    _check_model(model, where, out, dtype)
    names, _ = check_writable(model, where)
    try:
        quant.plan_types([model.tensors[n] for n in names], dtype, can_hold=lambda dt: dt.name in GGJT_TYPES)
    except ValueError as e:
        raise UsageError(where, str(e)) from None
    tok = model.tokenizer
    if tok is not None:
        if tok.model != "llama":
            raise UnsupportedError(tok.source or where, f"ggjt stores sentencepiece (llama) vocabularies, not "
                                                        f"{tok.model!r}")
        check_vocab_fits(tok, model.tensors["token_embd.weight"].shape[0], where)


def write_ggjt(model: Model, tmp_path, *, quiet: bool = False, dtype: str | None = None,
               threads: int | None = None) -> list:
    """Write a llama model as ggjt v3 (the last pre-GGUF llama.cpp format). Returns notes."""
    from .gguf_io import check_writable  # the same completeness/shape checks as GGUF output

    where = model.path or os.fspath(tmp_path)
    cfg = model.config
    fam = _check_model(model, where, where, dtype)
    dtype = dtype.lower() if isinstance(dtype, str) else dtype
    names, _ = check_writable(model, where)
    hidden = cfg.hidden_dim
    notes = cannot_hold(cfg) + fam.gguf_cannot_hold(cfg)
    tensors = [model.tensors[n] for n in names]
    if "output.weight" not in model.tensors:
        # ggjt-era llama.cpp always loaded output.weight: store the embedding a second time.
        tensors.append(model.tensors["token_embd.weight"].renamed("output.weight"))
        notes.append("tied classifier: token_embd.weight is also written as output.weight")
    try:
        plan = quant.plan_types(tensors, dtype, can_hold=lambda dt: dt.name in GGJT_TYPES)
    except ValueError as e:
        raise UsageError(where, str(e)) from None
    notes += plan.notes
    n_kv = cfg.n_kv_heads or cfg.n_heads
    if n_kv != cfg.n_heads:
        notes.append(f"grouped-query attention ({cfg.n_heads} heads, {n_kv} kv heads) is not recorded in ggjt; "
                     "readers must infer it from the wk shape (old llama.cpp needed -gqa)")
    n_mult = n_mult_for(cfg.dim, hidden)
    if n_mult is None:
        n_mult = 256
        notes.append(f"no n_mult reproduces hidden_dim {hidden} with old llama.cpp's formula; "
                     "wrote 256 (wconv reads the size from the tensors)")
    n_vocab = model.tensors["token_embd.weight"].shape[0]
    vocab = _ggml_vocab(model, n_vocab, where, notes)

    with open(tmp_path, "wb") as f:
        f.write(struct.pack("<II", MAGIC_GGJT, 3))
        f.write(struct.pack("<7I", n_vocab, cfg.dim, n_mult, cfg.n_heads, cfg.n_layers, cfg.head_dim,
                            plan.file_type()))
        for text, score in vocab:
            f.write(struct.pack("<I", len(text)) + text + struct.pack("<f", score))
        jobs = [(t, plan.types[t.name]) for t in tensors]

        def tensor_header(i):  # each tensor's header sits just before its (aligned) data
            t, dt = jobs[i]
            name = _LLAMA.from_canonical(t.name, "meta").encode()
            dims = tuple(reversed(t.shape))
            f.write(struct.pack(f"<3I{len(dims)}I", len(dims), len(name), int(quant.ggml_type(dt)), *dims))
            f.write(name)
            stream.pad(f, ALIGNMENT)

        with progress(sum(t.nbytes for t in tensors), "writing ggjt", quiet=quiet) as bar:
            results = stream.write_tensors(f, jobs, threads=threads, before=tensor_header,
                                           after=lambda i: bar.update(jobs[i][0].nbytes, jobs[i][0].name))
        notes += [quant.overflow_note(t.name) for (t, _), r in zip(jobs, results) if r.overflowed]
    emit_notes(where, notes)
    return notes


def cannot_hold(cfg: Config) -> list:
    """What a ggjt reader will assume instead of this model's values (the format has no field for them)."""
    out = []
    if abs(cfg.norm_eps - NORM_EPS_ASSUMED) > 1e-12:
        out.append(f"ggjt has no norm epsilon: readers assume {NORM_EPS_ASSUMED:g} (llama.cpp's converter), "
                   f"this model uses {cfg.norm_eps:g}")
    if cfg.max_seq_len != N_CTX_ASSUMED:
        out.append(f"ggjt has no context length: readers assume {N_CTX_ASSUMED}, this model has {cfg.max_seq_len}")
    if cfg.rope_theta != 10000.0:
        out.append(f"ggjt has no RoPE base: readers assume 10000, this model uses {cfg.rope_theta:g}")
    return out


def _ggml_vocab(model: Model, n_vocab: int, where: str, notes: list) -> list:
    tok = model.tokenizer
    if tok is None:
        notes.append("no tokenizer: wrote an empty vocabulary of the right size")
        return [(b"", 0.0)] * n_vocab
    if tok.model != "llama":
        raise UnsupportedError(where, f"ggjt stores sentencepiece (llama) vocabularies, not {tok.model!r}")
    n = len(tok.tokens)
    if n > n_vocab:
        raise UsageError(where, f"tokenizer has {n} tokens but the model's vocabulary is {n_vocab}")
    types = tok.token_types or [None] * n
    scores = tok.scores or [0.0] * n
    out = [(_token_to_ggml(t if isinstance(t, bytes) else str(t).encode(), ty), float(s))
           for t, ty, s in zip(tok.tokens, types, scores)]
    if n < n_vocab:
        notes.append(f"tokenizer has {n} tokens, model vocabulary {n_vocab}: padded with empty tokens")
        out += [(b"", 0.0)] * (n_vocab - n)
    return out
