"""`wconv inspect --stats`: per-tensor statistics equal numpy's / torch's on the same values.

References are computed independently on the whole tensor at once (numpy in float64, or
torch on the checkpoint torch itself loads); wconv computes them piece by piece, so small
piece sizes are used to exercise the combination of pieces.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import modelgen
from conftest import fixture_path, realdata_path
from wconv import dtypes
from wconv.formats import gguf_io
from wconv.inspect.report import format_text, inspect_path
from wconv.inspect.stats import STAT_FIELDS, Moments, piece_moments, tensor_stats
from wconv.tensor import LazyTensor


def numpy_stats(values: np.ndarray) -> dict:
    v = np.asarray(values).reshape(-1)
    finite = v[np.isfinite(v)].astype(np.float64)
    return {"n_elements": v.size, "min": float(finite.min()), "max": float(finite.max()),
            "mean": float(finite.mean()), "std": float(finite.std()), "nan": int(np.isnan(v).sum()),
            "inf": int(np.isinf(v).sum()), "zeros": int((v == 0).sum())}


def assert_stats_equal(got: dict, want: dict, rel=1e-12):
    assert set(got) == set(STAT_FIELDS)
    for k in ("n_elements", "min", "max", "nan", "inf", "zeros"):
        assert got[k] == want[k], (k, got[k], want[k])
    for k in ("mean", "std"):
        assert math.isclose(got[k], want[k], rel_tol=rel, abs_tol=1e-15), (k, got[k], want[k])


def special_values(n=300_001, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 2.5 - 0.75).astype(np.float32)
    x[rng.integers(0, n, 40)] = 0.0
    x[7], x[n // 3], x[-1] = np.nan, np.inf, -np.inf
    x[50] = -0.0
    return x


@pytest.mark.parametrize("piece", [1 << 22, 4096, 1000, 7])
def test_float32_with_nan_inf_zeros_matches_numpy(piece):
    x = special_values(n=20_003 if piece == 7 else 300_001)
    got = tensor_stats(LazyTensor.from_array("x", x.reshape(-1, 1)), max_elements=piece)
    assert_stats_equal(got, numpy_stats(x))


@pytest.mark.parametrize("kind", ["F16", "BF16", "Q8_0", "Q4_0", "I32", "F64", "BOOL"])
def test_other_dtypes_match_numpy_on_the_same_values(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(1)
    x = rng.standard_normal((96, 64)).astype(np.float32)
    if kind == "F16":
        raw, values = x.astype(np.float16), x.astype(np.float16).astype(np.float64)
    elif kind == "BF16":
        raw = dtypes.f32_to_bf16(x)
        values = dtypes.bf16_to_f32(raw)
    elif kind in ("Q8_0", "Q4_0"):
        qt = GGMLQuantizationType[kind]
        raw = quantize(x, qt)
        values = dequantize(raw, qt)  # gguf-py's own dequantiser is the reference
    elif kind == "I32":
        raw = rng.integers(-5, 6, (96, 64)).astype(np.int32)
        values = raw
    elif kind == "F64":
        raw = x.astype(np.float64) * 1e-3 + 1e4  # float32 could not hold these to 1e-12
        values = raw
    else:
        raw = rng.integers(0, 2, (96, 64)).astype(np.bool_)
        values = raw.astype(np.uint8)
    t = LazyTensor("t", dtypes.by_name(kind), (96, 64), lambda: raw)
    assert_stats_equal(tensor_stats(t, max_elements=1024), numpy_stats(values))


def test_mean_and_std_are_numerically_careful():
    # Far from zero with a small spread, combined from many small pieces: checked against an
    # exact (rational) computation. A one-pass sum of squares would lose every digit here.
    from fractions import Fraction

    rng = np.random.default_rng(2)
    x = 1e4 + rng.standard_normal(20_000) * 1e-3
    exact_values = [Fraction(v) for v in x]
    mean = sum(exact_values) / len(x)
    std = math.sqrt(sum((v - mean) ** 2 for v in exact_values) / len(x))
    for values in (x, x.astype(np.float32)):
        got = tensor_stats(LazyTensor.from_array("x", values), max_elements=999)
        if values.dtype == np.float32:
            exact_values32 = [Fraction(float(v)) for v in values]
            mean32 = sum(exact_values32) / len(x)
            mean, std = mean32, math.sqrt(sum((v - mean32) ** 2 for v in exact_values32) / len(x))
        assert math.isclose(got["mean"], float(mean), rel_tol=1e-15)
        assert math.isclose(got["std"], std, rel_tol=1e-12)


def test_piece_combination_is_order_independent():
    x = special_values(n=50_000, seed=3).astype(np.float32)
    parts = np.array_split(x, 13)
    forward, backward = Moments(), Moments()
    for p in parts:
        forward = forward.merged(piece_moments(p))
    for p in reversed(parts):
        backward = backward.merged(piece_moments(p))
    a, b = forward.as_dict(), backward.as_dict()
    assert a["min"] == b["min"] and a["nan"] == b["nan"] and math.isclose(a["std"], b["std"], rel_tol=1e-13)


def test_no_finite_values_and_empty_tensors():
    nan = tensor_stats(LazyTensor.from_array("n", np.full(10, np.nan, dtype=np.float32)))
    assert nan == {"n_elements": 10, "min": None, "max": None, "mean": None, "std": None, "nan": 10, "inf": 0,
                   "zeros": 0}
    empty = tensor_stats(LazyTensor.from_array("e", np.zeros((0, 4), dtype=np.float32)))
    assert empty["n_elements"] == 0 and empty["mean"] is None


def test_inspect_stats_matches_torch_on_a_checkpoint():
    report = inspect_path(fixture_path("meta-tiny"), stats=True)
    sd = torch.load(fixture_path("meta-tiny", "consolidated.00.pth"), weights_only=True)
    from wconv import arch

    assert len(report["tensors"]) == len(sd)
    for entry in report["tensors"]:
        t = sd[entry["name"]].double()  # the file view: stored names
        assert entry["canonical_name"] == arch.require("llama").to_canonical(entry["name"], "meta")
        s = entry["stats"]
        assert s["min"] == t.min().item() and s["max"] == t.max().item()
        assert math.isclose(s["mean"], t.mean().item(), rel_tol=1e-11, abs_tol=1e-15)
        assert math.isclose(s["std"], t.std(unbiased=False).item(), rel_tol=1e-11)
        assert s["zeros"] == int((t == 0).sum()) and s["nan"] == 0 and s["inf"] == 0
    json.dumps(report, allow_nan=False)
    text = format_text(report)
    header = next(line for line in text.splitlines() if line.startswith("name"))
    assert header.split() == ["name", "dtype", "shape", "params", "bytes", "offset", "min", "max", "mean", "std",
                              "nan", "inf", "zeros", "model", "view"]


def test_inspect_stats_on_a_real_gguf_and_quantised_file(tmp_path):
    path = realdata_path("gguf", "ollama_llama-2-tiny-random_f16.gguf")
    report = inspect_path(path, stats=True)
    model = gguf_io.read(path)
    for entry in report["tensors"]:
        assert_stats_equal(entry["stats"], numpy_stats(model[entry["name"]].float32()), rel=1e-10)
    # a Q8_0 file: the statistics are those of gguf-py's dequantisation of the blocks
    m = modelgen.random_model(modelgen.llama_config(), seed=4)
    out = str(tmp_path / "q.gguf")
    gguf_io.write(m, out, quiet=True, dtype="q8_0")
    from gguf import GGUFReader
    from gguf.quants import dequantize

    by_name = {t.name: t for t in GGUFReader(out).tensors}
    for entry in inspect_path(out, stats=True)["tensors"]:
        rt = by_name[entry["name"]]
        values = dequantize(rt.data, rt.tensor_type)
        assert_stats_equal(entry["stats"], numpy_stats(values), rel=1e-10)


def test_cli_inspect_stats_json_and_errors(tmp_path):
    from click.testing import CliRunner

    from wconv.cli import main

    p = CliRunner().invoke(main, ["inspect", "--stats", "--json", fixture_path("llama2c-ckpt.pt")])
    assert p.exit_code == 0, p.stderr
    report = json.loads(p.stdout)
    assert all(set(t["stats"]) == set(STAT_FIELDS) for t in report["tensors"])
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    p = CliRunner().invoke(main, ["inspect", "--stats", str(bad)])
    assert p.exit_code == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("wconv: error: ")


def peak_private_memory(*cli_args) -> int:
    """Peak anonymous RSS (private memory; mapped file pages excluded) of `wconv *cli_args`,
    sampled from /proc every few milliseconds."""
    import time

    proc = subprocess.Popen([sys.executable, "-m", "wconv.cli", *map(str, cli_args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                peak = max(peak, next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("RssAnon:")))
        except (OSError, StopIteration):
            pass
        time.sleep(0.003)
    assert proc.returncode == 0, proc.stderr.read()
    return peak


def test_stats_peak_memory_is_a_few_pieces(tmp_path):
    """One 128 MB bf16 tensor: statistics stream it in pieces instead of widening it whole."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc")
    from wconv.formats import safetensors_io

    path = str(tmp_path / "big.safetensors")
    n = 64 << 20
    raw = np.random.default_rng(5).integers(0, 0x7F00, n, dtype=np.uint16)  # finite bf16 bit patterns
    raw[::2] |= 0x8000  # and negative ones
    m = modelgen.random_model(modelgen.llama_config(), seed=5)
    m.tensors = {"big.weight": LazyTensor("big.weight", dtypes.BF16, (n // 4096, 4096), lambda: raw)}
    safetensors_io.write(m, path, quiet=True)
    del raw, m
    base = peak_private_memory("inspect", path)
    peak = peak_private_memory("inspect", "--stats", "--quiet", path)
    extra = peak - base
    print(f"\nstats of a {n * 2 >> 20} MB bf16 tensor: +{extra >> 20} MB private memory over {base >> 20} MB")
    # Widening the tensor whole would take 256 MB (float32), or 512 MB in float64.
    assert extra < 128 << 20
