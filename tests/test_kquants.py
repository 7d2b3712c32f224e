"""wconv.kquants against ggml's own quantizer (ggml_quantize_chunk, no imatrix), byte for byte.

The oracle is the libggml-base bundled with llama-cpp-python (tests/ggml_ref.py); without
it these tests skip, and under CI=true they fail.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import ggml_ref
from wconv import codecs, dtypes, kquants

K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
ALL_TYPES = K_TYPES + ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def encoder(qtype):
    """The one encoder wconv has for qtype: kquants' for k-quants, the codec table's (blockquant) otherwise."""
    return kquants.ENCODERS[qtype] if qtype in K_TYPES else codecs.get(qtype).encode

# Round trip through gguf-py's decoder on N(0, 1) rows: bounds on (max |error| / max |x|,
# RMS error / RMS x), about 1.5x what was measured (Q2_K 0.31/0.30, Q4_K 0.053/0.071,
# Q6_K 0.015/0.017, Q8_0 0.004/0.005).
ROUND_TRIP = {"Q2_K": (0.45, 0.42), "Q3_K": (0.2, 0.22), "Q4_K": (0.08, 0.1), "Q5_K": (0.045, 0.055),
              "Q6_K": (0.023, 0.026), "Q4_0": (0.13, 0.13), "Q4_1": (0.075, 0.12), "Q5_0": (0.065, 0.065),
              "Q5_1": (0.038, 0.057), "Q8_0": (0.006, 0.008)}


@pytest.fixture(scope="module")
def ggml():
    lib = ggml_ref.load()
    if lib is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but libggml-base (llama-cpp-python) is not available")
        pytest.skip("libggml-base from llama-cpp-python is not available")
    return lib


def _cases():
    """name -> float32 (rows, 512): the row shapes that decide ggml's branches."""
    rng = np.random.default_rng(12)
    n = 512
    normal = rng.standard_normal((16, n))
    edge = np.zeros((12, n))
    edge[1] = 0.7                                   # constant row
    edge[2] = -3.0                                  # negative constant
    edge[3] = 0.01 * rng.standard_normal(n)
    edge[3, 77] = 1e4                               # one huge outlier
    edge[4] = np.where(np.arange(n) % 2, 1.0, -1.0)  # alternating signs, max-abs ties
    edge[5] = np.abs(rng.standard_normal(n))        # all positive: min clamps to 0
    edge[6] = -np.abs(rng.standard_normal(n)) - 0.5  # all negative
    edge[7, :256] = -0.0                            # signed zeros, whole block
    edge[7, 256] = -0.0
    edge[8] = rng.integers(-2, 3, n) * 0.125        # few distinct values, exact ties in rounding
    edge[9, ::17] = 1.0                             # sparse
    edge[10] = rng.standard_normal(n)
    edge[10, :16] = 0.0                             # one all-zero sub-block in a live block
    edge[11, 100:132] = 5.0                         # a constant sub-block among zeros
    return {
        "normal": normal,
        "student_t": rng.standard_t(2.0, (16, n)),
        "cauchy": rng.standard_t(1.0, (8, n)),
        "edge_rows": edge,
        "tiny_1e-8": 1e-8 * rng.standard_normal((8, n)),
        "tiny_1e-14": 1e-14 * rng.standard_normal((8, n)),   # around GROUP_MAX_EPS and float32 subnormals
        "tiny_1e-20": 1e-20 * rng.standard_normal((4, n)),
        "huge_1e20": 1e20 * rng.standard_normal((4, n)),     # x*x overflows: inf/NaN paths
        "huge_6e4": 6e4 * rng.standard_normal((4, n)),       # FP16 scale overflow
        "mixed_scale": rng.standard_normal((8, n)) * np.exp(3 * rng.standard_normal((8, n))),
        "non_finite": _non_finite(rng, n),  # llama.cpp refuses such tensors; ggml_quantize_chunk does not
    }


def _non_finite(rng, n):
    x = rng.standard_normal((6, n))
    x[0, 5] = np.inf
    x[1, 9] = -np.inf
    x[2, 3] = np.nan
    x[3] = np.inf
    x[4] = 3e38
    x[5, ::2] = -3e38
    return x


CASES = _cases()


@pytest.mark.interop
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_bytes_equal_ggml(ggml, qtype, case):
    x = CASES[case].astype(np.float32)
    want = ggml_ref.quantize(qtype, x)
    got = encoder(qtype)(x)
    assert got.dtype == np.uint8 and got.shape == want.shape
    nbytes = dtypes.ALL[qtype].block_bytes
    bad = np.nonzero((got.reshape(-1, nbytes) != want.reshape(-1, nbytes)).any(axis=1))[0]
    assert bad.size == 0, f"{qtype} {case}: {bad.size} blocks differ, first {bad[:8]}"


@pytest.mark.interop
@pytest.mark.parametrize("qtype", K_TYPES)
def test_bytes_equal_ggml_many_random_blocks(ggml, qtype):
    """Enough blocks that rare search-loop ties and branch orders show up."""
    rng = np.random.default_rng(hash(qtype) % 2**32)
    x = (rng.standard_normal((64, 2048)) * rng.gamma(0.5, 1.0, (64, 1))).astype(np.float32)
    x[::7, ::5] = rng.standard_t(1.5, x[::7, ::5].shape)
    assert np.array_equal(kquants.ENCODERS[qtype](x), ggml_ref.quantize(qtype, x))


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_round_trip_through_gguf_decoder(qtype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 1024)).astype(np.float32)
    back = dequantize(encoder(qtype)(x), GGMLQuantizationType[qtype]).reshape(x.shape)
    err = np.abs(back - x).max() / np.abs(x).max()
    rel = np.linalg.norm(back - x) / np.linalg.norm(x)
    assert err < ROUND_TRIP[qtype][0] and rel < ROUND_TRIP[qtype][1], f"{qtype}: {err} {rel}"
    zeros = dequantize(encoder(qtype)(np.zeros((2, 512), np.float32)), GGMLQuantizationType[qtype])
    assert not np.any(zeros)


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_output_size_and_row_checks(qtype):
    x = np.ones((3, 512), np.float32)
    dt = dtypes.ALL[qtype]
    assert encoder(qtype)(x).size == 3 * 512 // dt.block * dt.block_bytes
    if dt.block == 256:
        with pytest.raises(ValueError, match="multiple of 256"):
            kquants.ENCODERS[qtype](np.ones((2, 288), np.float32))


@pytest.mark.interop
def test_encoders_chunk_boundaries_do_not_matter(ggml, monkeypatch):
    """Results are per block: a different chunking gives the same bytes."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 256)).astype(np.float32)
    want = {t: kquants.ENCODERS[t](x) for t in K_TYPES}
    monkeypatch.setattr(kquants, "_CHUNK_BLOCKS", 3)
    for t in K_TYPES:
        enc = kquants._encoder(t, {"Q2_K": kquants._q2_K_chunk, "Q3_K": kquants._q3_K_chunk,
                                   "Q4_K": kquants._q4_K_chunk, "Q5_K": kquants._q5_K_chunk,
                                   "Q6_K": kquants._q6_K_chunk}[t])
        assert np.array_equal(enc(x), want[t]), t


def test_numpy_axis0_reduction_is_sequential():
    """kquants relies on np.add.reduce(a, axis=0) of a C-contiguous (n, M) array adding
    a[0] + a[1] + ... in order per column (no pairwise blocking), like the C loops."""
    rng = np.random.default_rng(0)
    for n, m in [(16, 5), (32, 4096), (32, 40000)]:
        a = (rng.standard_normal((n, m)) * np.exp(4 * rng.standard_normal((n, m)))).astype(np.float32)
        seq = a[0].copy()
        for i in range(1, n):
            seq += a[i]
        assert np.array_equal(np.add.reduce(a, axis=0).view(np.uint32), seq.view(np.uint32))


@pytest.mark.interop
def test_gguf_py_signed_zero_blocks_differ_from_ggml_and_ours_do_not(ggml):
    """Why wconv carries its own Q4_0/Q4_1/Q5_0/Q5_1 (wconv.blockquant): gguf-py takes the other signed zero."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    x = np.zeros((3, 64), np.float32)
    x[0] = -0.0                      # all -0.0: ggml's d is -0.0 (0/-8), gguf-py's +0.0
    x[1, 0] = -0.0                   # first element -0.0
    x[2, 1:] = -0.0                  # first +0.0, rest -0.0: min/max keep the first (Q4_1/Q5_1)
    x[2, 32] = -0.0
    for qtype in ["Q4_0", "Q4_1", "Q5_0", "Q5_1"]:
        want = ggml_ref.quantize(qtype, x)
        assert np.array_equal(encoder(qtype)(x), want), qtype
        assert not np.array_equal(quantize(x, GGMLQuantizationType[qtype]).reshape(-1), want), qtype


def test_one_encoder_per_type():
    """k-quants come from wconv.kquants, the legacy 32-blocks from the codec table (wconv.blockquant) only."""
    assert set(kquants.ENCODERS) == set(K_TYPES)
    codecs.load_plugins()
    for t in K_TYPES:
        assert codecs.get(t).encoder is kquants.ENCODERS[t]
