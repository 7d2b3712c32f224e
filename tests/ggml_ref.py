"""ggml's own quantizer through ctypes: the byte-identity oracle for wconv.kquants.

`ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)` from the
libggml-base that llama-cpp-python bundles. With imatrix NULL it runs
quantize_row_*_ref for the k-quants and the 32-blocks (ggml.c / ggml-quants.c),
which is what llama-quantize does without an importance matrix.

`load()` returns None when no library is found; WCONV_GGML_BASE may name the .so.
"""
from __future__ import annotations

import ctypes
import glob
import os

import numpy as np

_lib = None


def _candidates():
    env = os.environ.get("WCONV_GGML_BASE")
    if env:
        yield env
    try:
        import llama_cpp
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return
    pkg = os.path.dirname(llama_cpp.__file__)
    for pattern in ("lib/libggml-base.so*", "lib/libggml-base*.dylib", "lib/ggml-base.dll", "lib/libggml.so"):
        yield from sorted(glob.glob(os.path.join(pkg, pattern)))


def load():
    """The ctypes library with ggml_quantize_chunk set up, or None."""
    global _lib
    if _lib is not None:
        return _lib
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
            fn = lib.ggml_quantize_chunk
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_void_p]
        fn.restype = ctypes.c_size_t
        _lib = lib
        return lib
    return None


def quantize(type_name: str, rows: np.ndarray) -> np.ndarray:
    """ggml's bytes for float32 rows (nrows, n) as GGML type `type_name` (no imatrix)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    lib = load()
    if lib is None:
        raise RuntimeError("libggml-base not found")
    qt = GGMLQuantizationType[type_name]
    block, block_bytes = GGML_QUANT_SIZES[qt]
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim == 1:
        rows = rows.reshape(1, -1)
    nrows, n = rows.shape
    out = np.zeros(nrows * (n // block) * block_bytes, np.uint8)
    size = lib.ggml_quantize_chunk(int(qt), rows.ctypes.data, out.ctypes.data, 0, nrows, n, None)
    assert size == out.size, (size, out.size)
    return out
