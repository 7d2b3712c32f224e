"""wconv.tensor.LazyTensor. float32_chunks: the pieces concatenate to float32() for every stored type."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from wconv import dtypes
from wconv.tensor import LazyTensor

X = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
CASES = {
    "F32": X, "F16": X.astype(np.float16), "BF16": dtypes.f32_to_bf16(X).reshape(X.shape),
    "Q8_0": quantize(X, GGMLQuantizationType.Q8_0), "Q4_0": quantize(X, GGMLQuantizationType.Q4_0),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("max_elements", [1, 999, 4096, 10**9])
def test_chunks_concatenate_to_float32(name, max_elements):
    raw = CASES[name]
    t = LazyTensor("x", dtypes.by_name(name), X.shape, lambda: raw)
    pieces = list(t.float32_chunks(max_elements, multiple_of=32))
    assert all(p.dtype == np.float32 and p.ndim == 1 for p in pieces)
    assert all(p.size % 32 == 0 for p in pieces)  # whole groups / blocks
    assert sum(p.size for p in pieces) == X.size
    assert np.array_equal(np.concatenate(pieces), t.float32().reshape(-1))
    if name == "F32":
        assert np.array_equal(np.concatenate(pieces), X.reshape(-1))


def test_non_contiguous_source():
    base = X.T  # a transposed view: C-order chunks must follow the logical layout
    t = LazyTensor("x", dtypes.F32, base.shape, lambda: base)
    assert np.array_equal(np.concatenate(list(t.float32_chunks(100))), np.ascontiguousarray(base).reshape(-1))
