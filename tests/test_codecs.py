"""wconv.codecs: the element-type table against gguf-py's constants, every encoder against
gguf-py and (when llama-cpp-python is installed) against ggml's own quantiser, the
16-bit look-up tables against the float32 round trip, and encoder registration."""
from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

from conftest import import_llama_cpp
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf.quants import dequantize, quantize

from wconv import codecs, dtypes, parity

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
# llama_ftype of each type's "mostly" file (K-quants: the _M mix llama.cpp recommends).
FILE_TYPE_NAMES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
                   "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
                   "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M",
                   "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K"}


def test_table_agrees_with_gguf_py():
    for name, c in codecs.CODECS.items():
        if c.ggml_id is None:
            continue
        qt = GGMLQuantizationType(c.ggml_id)
        assert qt.name == name
        block, block_bytes = GGML_QUANT_SIZES[qt]
        if c.dtype.quantized:
            assert (c.dtype.block, c.dtype.block_bytes) == (block, block_bytes), name
        else:
            assert (1, c.dtype.itemsize) == (block, block_bytes), name
        if name in FILE_TYPE_NAMES:
            assert c.file_type == LlamaFileType[FILE_TYPE_NAMES[name]].value, name
    assert codecs.for_ggml_id(GGMLQuantizationType.IQ4_NL).dtype.block_bytes == 18  # rarer types described
    with pytest.raises(ValueError):
        codecs.for_ggml_id(9999)


def test_options_are_the_writable_ggml_types():
    opts = codecs.options(ggml=True)
    for o in ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"):
        assert o in opts
        assert codecs.by_option(o) is dtypes.by_name(o.upper())
    assert codecs.by_option("q3_k") is None or "q3_k" in opts  # only when an encoder is registered
    assert codecs.by_option("f8_e4m3") is None  # readable, not writable


def _values(rng, n_rows=64, row=256):
    x = rng.standard_normal((n_rows, row)).astype(np.float32)
    x[0] = 0.0
    x[1] = np.round(x[1] * 8) / 2  # exact halves: rounding ties
    x[2, :32] = 0.5  # a constant block (all -0.0 blocks: see the ggml test; gguf-py differs there)
    x[3] *= 1e-30
    x[4] *= 3e4
    x[5, :32] = np.arange(32) - 15.5
    return x


@pytest.mark.parametrize("name", LEGACY + ["BF16", "F16", "F32"])
def test_encoders_match_gguf_py_and_decode_back(name):
    rng = np.random.default_rng(1)
    x = _values(rng)
    c = codecs.get(name)
    got = c.encode(x)
    qt = GGMLQuantizationType[name]
    want = quantize(x, qt)
    assert got.view(np.uint8).tobytes() == np.ascontiguousarray(want).view(np.uint8).tobytes()
    back = c.decode(got)
    np.testing.assert_array_equal(back, dequantize(np.ascontiguousarray(want).view(np.uint8).reshape(-1)
                                                   if c.dtype.quantized else want, qt).reshape(-1))
    np.testing.assert_array_equal(codecs.round_trip(x, c.dtype), back.reshape(x.shape))
    if c.dtype.quantized:  # ordinary rows: the error is at most about one step (max |x| / 8 for Q4_0)
        err = np.abs(back.reshape(x.shape)[6:] - x[6:]).reshape(-1, 32).max(axis=1)
        amax = np.abs(x[6:]).reshape(-1, 32).max(axis=1)
        assert (err <= amax * 0.13).all()


def test_encoders_work_on_pieces_the_same_as_on_the_whole():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((96, 512)).astype(np.float32)
    for name in LEGACY:
        c = codecs.get(name)
        whole = c.encode(x)
        pieces = np.concatenate([c.encode(x[i:i + 7]) for i in range(0, 96, 7)])
        assert whole.tobytes() == pieces.tobytes(), name


def test_encode_refuses_rows_that_are_not_whole_blocks():
    with pytest.raises(ValueError, match="not whole Q8_0 blocks"):
        codecs.get("Q8_0").encode(np.zeros((2, 48), np.float32))


def test_converter_tables_equal_the_float32_round_trip_for_every_pattern():
    for src, dst in [(dtypes.BF16, dtypes.F16), (dtypes.F16, dtypes.BF16), (dtypes.F8_E4M3, dtypes.F16),
                     (dtypes.F8_E5M2, dtypes.BF16)]:
        patterns = np.arange(1 << (8 * src.itemsize), dtype=f"<u{src.itemsize}").view(src.storage)
        via = codecs.get(dst).encode(codecs.get(src).decode(patterns).reshape(1, -1))
        got = codecs.converter(src, dst)(patterns, (1, patterns.size))
        assert got.view(np.uint8).tobytes() == via.view(np.uint8).tobytes(), (src, dst)
    # BF16 -> F16 computes most values instead of looking them up (codecs._bf16_to_f16), in
    # steps: every pattern again, shuffled across several steps
    patterns = np.random.default_rng(5).permutation(np.tile(np.arange(1 << 16, dtype="<u2"), 9))
    got = codecs.converter(dtypes.BF16, dtypes.F16)(patterns.view(dtypes.BF16.storage), (1, patterns.size))
    assert got.view("<u2").tobytes() == codecs._luts[("BF16", "F16")].view("<u2")[patterns].tobytes()
    # and through gguf-py's BF16 rounding, for every F16 value
    f16 = np.arange(1 << 16, dtype="<u2").view(np.float16)
    want = quantize(f16.astype(np.float32).reshape(1, -1), GGMLQuantizationType.BF16)
    assert codecs.converter(dtypes.F16, dtypes.BF16)(f16, (1, f16.size)).tobytes() == want.tobytes()


def test_register_encoder_adds_an_option(monkeypatch):
    c = codecs.get("Q6_K")
    if c.encoder is not None:
        pytest.skip("Q6_K already has an encoder (wconv.kquants)")

    def fake(rows):
        return np.zeros(rows.size // 256 * 210, np.uint8)

    monkeypatch.setattr(c, "encoder", None)
    codecs.register_encoder("Q6_K", fake)
    assert "q6_k" in codecs.options(ggml=True)
    assert codecs.by_option("q6_k") is dtypes.Q6_K
    assert codecs.get("Q6_K").encode(np.zeros((1, 512), np.float32)).nbytes == 420
    assert parity.can_round("Q6_K")
    with pytest.raises(ValueError, match="already registered"):
        codecs.register_encoder("Q6_K", lambda rows: rows)


# --- against ggml itself ------------------------------------------------------------------------

def _ggml_quantize_chunk():
    llama_cpp = import_llama_cpp()
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]

    def run(x: np.ndarray, name: str) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        c = codecs.get(name)
        out = np.zeros(c.dtype.nbytes(x.size), np.uint8)
        n = fn(c.ggml_id, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        assert n == out.nbytes
        return out
    return run


def _hard_blocks(rng) -> np.ndarray:
    """Blocks of 32 where ggml's C and a straightforward numpy port can part ways."""
    e = np.zeros((32, 32), np.float32)
    e[1, :] = -0.0
    e[2] = np.arange(32) - 15.5
    e[3, 0], e[3, 1:] = 127, np.arange(31) + 0.5
    e[4] = np.linspace(-1, 1, 32)
    e[4, 5] = np.nan  # NaN inside a block
    e[5] = np.linspace(-1, 1, 32)
    e[5, 31] = np.nan  # NaN last: ggml's running MAX keeps it
    e[6] = np.inf
    e[7, 3] = -np.inf
    e[8] = rng.standard_normal(32) * 1e30
    e[9] = np.float32(1e-40)  # subnormal: 1/d overflows
    e[10] = 70000.0  # d beyond the F16 range
    e[11, ::2], e[11, 1::2] = 1.0, -1.0
    e[12] = np.nextafter(np.float32(0.5), 0) * np.arange(32)
    e[13] = np.nan
    e[14:24] = np.round(rng.standard_normal((10, 32)) * 10) / 2
    # signalling NaNs (0x7F81 is a BF16 NaN, decoded bit for bit), which numpy's fmin/fmax do
    # not skip, and NaN payloads, which GGML_FP32_TO_FP16 drops
    snan, neg_snan = np.uint32(0x7F810000).view(np.float32), np.uint32(0xFF800001).view(np.float32)
    e[24, 0], e[24, 17] = 3.0, snan
    e[25, 31], e[25, 3] = snan, 3.0
    e[26, 27], e[26, 28] = -np.inf, neg_snan
    e[27] = rng.standard_normal(32)
    e[27, 5] = neg_snan
    e[28] = np.linspace(-2, 1, 32)
    e[28, 0], e[28, 31] = snan, neg_snan
    e[29, :16] = snan
    e[30] = np.uint32(0x7FC12345).view(np.float32)  # a quiet NaN with a payload everywhere
    e[31, 31] = np.uint32(0xFFC12345).view(np.float32)
    e[31, 0] = 1.0
    return e


@pytest.mark.interop
@pytest.mark.parametrize("name", LEGACY)
def test_encoders_are_bit_exact_with_ggml(name):
    ggml = _ggml_quantize_chunk()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 1024)).astype(np.float32)
    assert codecs.get(name).encode(x).tobytes() == ggml(x, name).tobytes()
    hard = _hard_blocks(rng).reshape(-1, 256)
    with np.errstate(all="ignore"):
        got = codecs.get(name).encode(hard).reshape(-1, codecs.get(name).dtype.block_bytes)
    want = ggml(hard, name).reshape(got.shape)
    bad = [i for i in range(len(got)) if got[i].tobytes() != want[i].tobytes()]
    assert not bad, f"{name}: blocks {bad} differ from ggml"


@pytest.mark.interop
@pytest.mark.parametrize("name", LEGACY)
def test_signalling_nans_are_skipped_as_ggml_skips_them(name):
    """numpy's fmin/fmax skip only quiet NaNs, and whether a signalling one propagates depends
    on the reduction's vector path, hence on a piece's block count: small pieces, every place."""
    ggml = _ggml_quantize_chunk()
    rng = np.random.default_rng(7)
    snan = np.uint32(0x7F810000).view(np.float32)  # the BF16 NaN 0x7F81, decoded bit for bit
    bad = []
    for i in range(32):
        for j in (0, 5, 17, 31):
            if i == j:
                continue
            x = np.zeros((8, 32), np.float32)
            x[3, i], x[3, j] = 3.0, snan
            x[5] = rng.standard_normal(32)
            x[5, j] = -snan
            x = x.reshape(1, -1)
            with np.errstate(all="ignore"):
                if codecs.get(name).encode(x).tobytes() != ggml(x, name).tobytes():
                    bad.append((i, j))
    assert not bad, f"{name}: (value, NaN) places {bad} differ from ggml"


def test_plugins_load_once_for_concurrent_first_users(monkeypatch):
    """Encoder threads may be the first to need a plugin's encoder: none sees it missing."""
    import threading
    import time

    for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        monkeypatch.setattr(codecs.get(name), "encoder", None)
    monkeypatch.setattr(codecs, "_plugins_loaded", False)
    real_import = codecs.importlib.import_module

    def slow_import(name):  # widen the window in which the first thread is still registering
        time.sleep(0.05)
        return real_import(name)

    monkeypatch.setattr(codecs.importlib, "import_module", slow_import)
    errors, start = [], threading.Barrier(8)

    def first_use():
        start.wait()
        try:
            codecs.get("Q6_K").encode(np.zeros((1, 256), np.float32))
        except Exception as e:  # noqa: BLE001 - the failure under test
            errors.append(e)

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
