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


# --- read_rows: computed tensors a few rows at a time -------------------------------------------

def _file_tensor(tmp_path, name, arr, dt, shape=None):
    """A tensor (of `shape`, default arr's) backed by a file range whose whole-tensor loader must
    never run."""
    path = tmp_path / name
    raw = np.ascontiguousarray(arr)
    path.write_bytes(b"\0" * 5 + raw.tobytes())

    def whole():
        raise AssertionError(f"{name}: whole tensor loaded")

    return LazyTensor(name, dt, shape or arr.shape, whole, span=(str(path), 5, raw.nbytes)), raw


def _ranges(rows, group, rng):
    cuts = sorted(set(rng.choice(np.arange(0, rows + 1, group), size=4).tolist()) | {0, rows})
    return list(zip(cuts, cuts[1:]))


def test_read_rows_of_permutations_and_merges_reads_only_those_rows(tmp_path):
    from wconv.arch.decoder import hf_permute, hf_unpermute

    rng = np.random.default_rng(3)
    heads, rows, cols = 4, 32, 24
    a, a_raw = _file_tensor(tmp_path, "a", rng.standard_normal((rows, cols)).astype(np.float16), dtypes.F16)
    b, b_raw = _file_tensor(tmp_path, "b", rng.standard_normal((rows, cols)).astype(np.float16), dtypes.F16)
    per_head = rows // heads
    cases = {
        "unpermute": (a.derive_rows(lambda x: hf_unpermute(x, x.shape[0] // per_head), per_head),
                      hf_unpermute(a_raw, heads)),
        "rows merge": (LazyTensor.concat("r", [a, b], 0), np.concatenate([a_raw, b_raw], 0)),
        "columns merge": (LazyTensor.concat("c", [a, b], 1), np.concatenate([a_raw, b_raw], 1)),
    }
    merged = LazyTensor.concat("m", [a, b], 0)  # a merge, then HF's permutation over 8 heads
    cases["merge+permute"] = (merged.derive_rows(lambda x: hf_permute(x, x.shape[0] // per_head), per_head),
                              hf_permute(np.concatenate([a_raw, b_raw], 0), 2 * heads))
    for what, (t, want) in cases.items():
        assert t.rows_piecewise(), what
        for lo, hi in _ranges(t.shape[0], t.row_group, rng) + [(0, t.shape[0])]:
            np.testing.assert_array_equal(t.read_rows(lo, hi), want[lo:hi], err_msg=f"{what} {lo}:{hi}")
        chunks = list(t.float32_chunks(max_elements=3 * t.shape[1] * t.row_group))
        assert len(chunks) > 1, what
        np.testing.assert_array_equal(np.concatenate(chunks), want.astype(np.float32).reshape(-1), err_msg=what)


def test_read_rows_of_permuted_quantized_rows(tmp_path):
    from wconv import arch
    from wconv.arch.decoder import hf_permute
    from wconv.model import Config

    rng = np.random.default_rng(4)
    heads, rows, cols = 4, 16, 64
    q = quantize(rng.standard_normal((rows, cols)).astype(np.float32), GGMLQuantizationType.Q8_0)
    t, raw = _file_tensor(tmp_path, "q", q, dtypes.Q8_0, shape=(rows, cols))
    cfg = Config(arch="llama", dim=cols, n_layers=1, n_heads=heads, n_kv_heads=heads, vocab_size=8,
                 hidden_dim=8, max_seq_len=8)
    # the family's own fix-up, as the HF writer applies it: quantised rows move as they are
    permuted = arch.require("llama").to_layout("blk.0.attn_q.weight", t, cfg, "hf")
    want = hf_permute(raw.reshape(rows, -1), heads).reshape(-1)
    assert permuted.row_group == rows // heads
    for lo, hi in [(0, 4), (4, 12), (12, 16), (0, 16)]:
        np.testing.assert_array_equal(permuted.read_rows(lo, hi), want[lo * raw.shape[1]:hi * raw.shape[1]])


def test_derive_rows_refuses_rows_that_are_not_whole_groups():
    t = LazyTensor.from_array("t", np.zeros((6, 2), np.float32))
    with pytest.raises(ValueError, match="groups of 4"):
        t.derive_rows(lambda x: x, 4)
