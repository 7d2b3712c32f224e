"""GGML block quantisers in numpy, byte-identical to ggml's reference C code.

Follows ggml/src/ggml-quants.c of the llama.cpp that llama-cpp-python 0.3.36 builds:
quantize_row_q{2,3,4,5,6}_K_ref (what llama-quantize runs when no importance matrix
is given). The legacy 32-blocks (Q4_0 ... Q8_0) are wconv.blockquant's: one encoder
per type in wconv.codecs. Own code, written from the C for the facts that decide the bytes:

- every value is float32 and every expression is evaluated in the C order;
- C sums run sequentially from 0. Arrays here are laid out (elements, sub-blocks), so
  `np.add.reduce(a, axis=0)` walks the element axis in order for every sub-block at
  once; numpy's pairwise summation only applies along the contiguous axis, which is
  never the one summed here (tests/test_kquants.py checks this property of numpy).
  Adding 0.0 afterwards turns a -0.0 result into the +0.0 that `0.0f + ...` gives;
- nearest_int adds 1.5*2^23 and reads the low mantissa bits: round-half-to-even.
  Where the argument is bounded by the quant range the search loops use the float
  form (f + K) - K, equal to it for |f| < 2^22 and never -0.0; chunks holding inf or
  NaN, and all unbounded arguments, use the bit form;
- GGML_FP32_TO_FP16 rounds to nearest even, as numpy's float16 cast does;
- C's strict `>` / `<` running maxima keep the first element of a tie and never take
  a NaN (this decides the sign of a scale and the sign of zeros), so those scans are
  explicit rather than np.max / np.argmax.

Search loops (make_qkx2_quants, make_qx_quants, make_q3_quants) run over their
iterations and elements in Python, each step vectorised over all sub-blocks of a
chunk. Inputs are processed in chunks of blocks so the working set stays in cache.

ENCODERS maps a GGML type name to fn(rows: float32 (nrows, n)) -> uint8 bytes.
"""
from __future__ import annotations

import numpy as np

from .dtypes import ALL as _DTYPES

QK_K = 256
F32 = np.float32
_MAGIC = F32(12582912.0)  # 1.5 * 2**23
_GROUP_MAX_EPS = F32(1e-15)
_CHUNK_BLOCKS = 512  # super-blocks per chunk: a few hundred KB per working array



# ---------------------------------------------------------------- helpers

def _round_into(out: np.ndarray, exact: bool) -> np.ndarray:
    """nearest_int of float32 `out`, in place, as float32 (+0.0 for zero results).

    The fast form (f + K) - K equals the C for |f| < 2^22, which bounded arguments
    always are; `exact` (used for chunks holding inf/NaN) reads the bits as the C does.
    """
    if not exact:
        out += _MAGIC
        out -= _MAGIC
        return out
    out[...] = _nearest_int(out)
    return out


def _nearest_int(f) -> np.ndarray:
    """nearest_int(f) exactly as the C does it (int32), for any float32 input."""
    bits = (np.asarray(f, dtype=F32) + _MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _csum(a: np.ndarray) -> np.ndarray:
    """C's `float s = 0; for (i...) s += a[i];` along axis 0, for every column."""
    s = np.add.reduce(a, axis=0)
    s += F32(0.0)
    return s


def _fp16_bits(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even) as uint16."""
    with np.errstate(over="ignore"):
        return np.asarray(v, dtype=F32).astype(np.float16).view(np.uint16)


def _fp16_value(bits: np.ndarray) -> np.ndarray:
    return bits.view(np.float16).astype(F32)


def _first_absmax(xt: np.ndarray):
    """C's `if (fabsf(x) > amax) { amax = fabsf(x); max = x; }` from 0, over axis 0."""
    amax = np.zeros(xt.shape[1:], F32)
    vmax = np.zeros(xt.shape[1:], F32)
    for i in range(xt.shape[0]):
        ax = np.abs(xt[i])
        take = ax > amax
        np.copyto(amax, ax, where=take)
        np.copyto(vmax, xt[i], where=take)
    return amax, vmax


def _first_min_max(xt: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """C's `if (x < min) min = x; if (x > max) max = x;` over axis 0 from lo/hi."""
    for i in range(xt.shape[0]):
        np.copyto(lo, xt[i], where=xt[i] < lo)
        np.copyto(hi, xt[i], where=xt[i] > hi)
    return lo, hi


def _sub_blocks(x: np.ndarray, n: int) -> np.ndarray:
    """(nblocks, QK_K) -> (n, nblocks * QK_K / n): element index first, contiguous."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _positive_max(v: np.ndarray) -> np.ndarray:
    """C's `float m = 0; if (v > m) m = v;` over the last axis (NaNs never taken)."""
    m = np.fmax.reduce(v, axis=-1)
    return np.where(m > 0, m, F32(0.0)).astype(F32)


def _first_absmax_last(v: np.ndarray):
    """_first_absmax over the last axis of (nb, k): (amax, signed value), NaNs never taken."""
    return _first_absmax(np.ascontiguousarray(v.T))


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """qs[j/4 + l] = L[j+l] | L[j+l+32]<<2 | L[j+l+64]<<4 | L[j+l+96]<<6, j in {0, 128}."""
    q = L.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


# ------------------------------------------------- make_qkx2_quants (Q2_K, Q4_K, Q5_K)

def _levels(xt, mn, iscale, nmax, out, exact):
    """clamp(nearest_int(iscale * (x - min)), 0, nmax) into `out` (float32, +0.0 for zero)."""
    np.subtract(xt, mn, out=out)
    out *= iscale
    _round_into(out, exact)
    np.clip(out, F32(0.0), F32(nmax), out=out)  # one pass; np.maximum + np.minimum are slower here
    return out


def _make_qkx2(xt, wt, nmax, rmin, rdelta, nstep, use_mad, exact):
    """Scale, -min and levels of each sub-block (column of xt); levels as float32 (n, M).

    Instead of copying the levels of every improving step, the (iscale, min) that
    produced them are kept per sub-block and the winning levels recomputed once.
    """
    mn = xt[0].copy()
    mx = xt[0].copy()
    _first_min_max(xt[1:], mn, mx)
    sum_w = np.add.reduce(wt, axis=0)          # C starts from weights[0]
    sum_x = np.add.reduce(wt * xt, axis=0)     # and from weights[0] * x[0]
    mn = np.where(mn > 0, F32(0.0), mn)
    flat = mx == mn
    fnmax = F32(nmax)
    laux = np.empty_like(xt)
    wl = np.empty_like(xt)
    tmp = np.empty_like(xt)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = fnmax / (mx - mn)
        scale = F32(1.0) / iscale
        best_iscale, best_mn = iscale, mn.copy()  # what produced the current best levels
        _levels(xt, mn, iscale, nmax, laux, exact)
        np.multiply(laux, scale, out=tmp)
        tmp += mn
        tmp -= xt
        np.abs(tmp, out=tmp) if use_mad else np.multiply(tmp, tmp, out=tmp)
        tmp *= wt
        best = _csum(tmp)
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + fnmax) / (mx - mn)
            _levels(xt, mn, iscale, nmax, laux, exact)
            np.multiply(wt, laux, out=wl)
            sum_l = _csum(wl)
            sum_l2 = _csum(np.multiply(wl, laux, out=tmp))
            sum_xl = _csum(np.multiply(wl, xt, out=tmp))
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            if pos.any():
                this_min = np.where(pos, F32(0.0), this_min)
                this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            np.multiply(laux, this_scale, out=tmp)
            tmp += this_min
            tmp -= xt
            np.abs(tmp, out=tmp) if use_mad else np.multiply(tmp, tmp, out=tmp)
            tmp *= wt
            cur = _csum(tmp)
            better = (D > 0) & (cur < best)
            if better.any():
                np.copyto(best_iscale, iscale, where=better)
                np.copyto(best_mn, mn, where=better)
                np.copyto(best, cur, where=better)
                np.copyto(scale, this_scale, where=better)
                np.copyto(mn, this_min, where=better)
        L = _levels(xt, best_mn, best_iscale, nmax, laux, exact)
    if flat.any():
        L[:, flat] = 0
        scale = np.where(flat, F32(0.0), scale)
    return scale.astype(F32), (-mn).astype(F32), L


def _scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12-byte 6-bit scale/min packing of Q4_K/Q5_K (inverse of get_scale_min_k4)."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4]
    out[:, 4:8] = lm[:, 0:4]
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return out


def _final_levels(q: np.ndarray, lo: int, hi: int, offset: int, keep: np.ndarray, L: np.ndarray) -> np.ndarray:
    """clamp(q, lo, hi) + offset where the sub-block's d != 0, else the search's levels L;
    (n, M) ints in, (M, n) uint8 out (sub-blocks back in element order)."""
    qf = q.astype(F32)  # exact: nearest_int results are within +-2^22
    np.clip(qf, F32(lo), F32(hi), out=qf)
    if offset:
        qf += F32(offset)
    np.copyto(qf, L, where=keep)
    return np.ascontiguousarray(qf.astype(np.uint8).T)


def _requantize_with_min(xt, L, d_sub, dm_sub, nmax):
    """Final pass of Q2_K/Q4_K/Q5_K: l = nearest_int((x + dm)/d) where d != 0, else keep L."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = _nearest_int((xt + dm_sub) / d_sub)
    return _final_levels(q, 0, nmax, 0, d_sub == 0, L)


def _q45_K_chunk(x: np.ndarray, nmax: int, rmin: float, nstep: int, exact: bool):
    """Shared part of Q4_K and Q5_K for x (nb, 256): d, dmin, 12 scale bytes, levels (nb, 256)."""
    nb = x.shape[0]
    xt = _sub_blocks(x, 32)
    sum_x2 = _csum(xt * xt)
    av_x = np.sqrt(sum_x2 / F32(32))
    wt = av_x + np.abs(xt)
    scales, mins, L = _make_qkx2(xt, wt, nmax, rmin, 0.1, nstep, False, exact)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63.0) / max_scale, F32(0.0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63.0) / max_min, F32(0.0)).astype(F32)
    # uint8_t ls = nearest_int(...): the int wraps to 8 bits, then MIN(63, ls)
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d = _fp16_bits(max_scale / F32(63.0))
    dmin = _fp16_bits(max_min / F32(63.0))
    d_sub = (_fp16_value(d)[:, None] * ls.astype(F32)).reshape(-1)
    dm_sub = (_fp16_value(dmin)[:, None] * lm.astype(F32)).reshape(-1)
    levels = _requantize_with_min(xt, L, d_sub, dm_sub, nmax).reshape(nb, QK_K)
    return d, dmin, _scale_min_k4(ls, lm), levels


def _q4_K_chunk(x, exact=False):
    d, dmin, sc, L = _q45_K_chunk(x, 15, -1.0, 20, exact)
    q = L.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), sc, qs], axis=1)


def _q5_K_chunk(x, exact=False):
    d, dmin, sc, L = _q45_K_chunk(x, 31, -0.5, 15, exact)
    q = L.reshape(-1, 4, 2, 32)                       # [group n/64][half][j]
    hi = q >> 4                                       # bit 2*group + half of qh[j]
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = np.bitwise_or.reduce(hi << shifts[None, :, :, None], axis=(1, 2)).astype(np.uint8)
    low = q & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), sc, qh, qs], axis=1)


def _q2_K_chunk(x, exact=False):
    nb = x.shape[0]
    xt = _sub_blocks(x, 16)
    wt = np.abs(xt)
    scales, mins, L = _make_qkx2(xt, wt, 3, -0.5, 0.1, 15, True, exact)
    scales = scales.reshape(nb, 16)
    mins = mins.reshape(nb, 16)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    q4scale = F32(15.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(max_scale[:, None] > 0, _nearest_int((q4scale / max_scale)[:, None] * scales), 0)
        mq = np.where(max_min[:, None] > 0, _nearest_int((q4scale / max_min)[:, None] * mins), 0)
    sc_bytes = ((sc & 0xFF) | ((mq << 4) & 0xFF)).astype(np.uint8)
    d = _fp16_bits(np.where(max_scale > 0, max_scale / q4scale, F32(0.0)))
    dmin = _fp16_bits(np.where(max_min > 0, max_min / q4scale, F32(0.0)))
    d_sub = (_fp16_value(d)[:, None] * (sc_bytes & 0xF).astype(F32)).reshape(-1)
    dm_sub = (_fp16_value(dmin)[:, None] * (sc_bytes >> 4).astype(F32)).reshape(-1)
    levels = _requantize_with_min(xt, L, d_sub, dm_sub, 3).reshape(nb, QK_K)
    return np.concatenate([sc_bytes, _pack_2bit(levels), d.view(np.uint8).reshape(-1, 2),
                           dmin.view(np.uint8).reshape(-1, 2)], axis=1)


# ------------------------------------------------------- make_qx_quants (Q6_K)

def _signed_levels(xt, iscale, nmax, out, exact):
    """clamp(nearest_int(iscale * x), -nmax, nmax - 1) into `out` as float32."""
    np.multiply(xt, iscale, out=out)
    _round_into(out, exact)
    np.clip(out, F32(-nmax), F32(nmax - 1), out=out)
    return out


def _zero_sub_blocks(scale, L, fnmax, zero):
    """Levels shifted to unsigned; sub-blocks whose max |x| is below GROUP_MAX_EPS get
    scale 0 and all levels 0 (the C's early `return 0` with L zeroed)."""
    L += fnmax
    if zero.any():
        L[:, zero] = 0
        scale = np.where(zero, F32(0.0), scale)
    return scale, L


def _make_qx_rmse1(xt, nmax, exact):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) per column: scale (M,), L float (n, M).

    The iscale of the best step is kept per sub-block; its levels are recomputed once.
    """
    amax, vmax = _first_absmax(xt)
    zero = amax < _GROUP_MAX_EPS
    fnmax = F32(nmax)
    w = xt * xt
    wx = w * xt
    l = np.empty_like(xt)
    tmp = np.empty_like(xt)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = -fnmax / vmax
        best_iscale = iscale.copy()
        for step in [0] + [s for s in range(-9, 10) if s != 0]:
            if step:
                iscale = -(fnmax + F32(0.1) * F32(step)) / vmax
            _signed_levels(xt, iscale, nmax, l, exact)
            sumlx = _csum(np.multiply(wx, l, out=tmp))
            np.multiply(w, l, out=tmp)
            suml2 = _csum(np.multiply(tmp, l, out=tmp))
            if not step:
                scale = np.where(suml2 != 0, sumlx / suml2, F32(0.0)).astype(F32)
                best = scale * sumlx
                continue
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if take.any():
                new_scale = sumlx / suml2
                np.copyto(best_iscale, iscale, where=take)
                np.copyto(scale, new_scale, where=take)
                np.copyto(best, new_scale * sumlx, where=take)
        L = _signed_levels(xt, best_iscale, nmax, l, exact)
    return _zero_sub_blocks(scale, L, fnmax, zero)


def _q6_K_chunk(x, exact=False):
    nb = x.shape[0]
    xt = _sub_blocks(x, 16)
    scales, L = _make_qx_rmse1(xt, 32, exact)
    scales = scales.reshape(nb, 16)
    max_abs, max_scale = _first_absmax_last(scales)
    zero = max_abs < _GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(zero, F32(1.0), F32(-128.0) / max_scale).astype(F32)
        d = _fp16_bits(F32(1.0) / iscale)
        sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
        d_sub = (_fp16_value(d)[:, None] * sc.astype(F32)).reshape(-1)
        q = _nearest_int(xt / d_sub)
    levels = _final_levels(q, -32, 31, 32, d_sub == 0, L).reshape(nb, QK_K)
    g = levels.reshape(nb, 2, 4, 32)                 # [half of 128][quarter][l]
    low = g & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    hi = g >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8),
                          d.view(np.uint8).reshape(-1, 2)], axis=1)
    if zero.any():
        out[zero] = 0
    return out


# ------------------------------------------------------- make_q3_quants (Q3_K)

def _make_q3_rmse(xt, nmax, exact):
    """make_q3_quants(n, nmax, x, L, do_rmse=true) per column: scale (M,), L float (n, M) in [0, 2nmax)."""
    n = xt.shape[0]
    amax, vmax = _first_absmax(xt)
    zero = amax < _GROUP_MAX_EPS
    fnmax = F32(nmax)
    w = xt * xt
    wx = w * xt
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = -fnmax / vmax
        L = _round_into(iscale * xt, exact)
        np.clip(L, -fnmax, fnmax - 1, out=L)
        sumlx = _csum(wx * L)
        suml2 = _csum((w * L) * L)
        # A sub-block that did not change in a pass would not change in the next (its
        # state is the same; the C breaks there), so each pass only works on the
        # sub-blocks the previous pass changed: about 1.3 passes of work instead of 5.
        active = None
        cur = (L, w, wx, xt, sumlx, suml2)
        for _ in range(5):
            Lc, wc, wxc, xc, slc, s2c = cur
            changed = np.zeros(Lc.shape[1], bool)
            for i in range(n):
                Li, wi, wxi, xi = Lc[i], wc[i], wxc[i], xc[i]
                slx = slc - wxi * Li
                sl2 = s2c - (wi * Li) * Li
                new_l = np.clip(_nearest_int(xi * sl2 / slx), -nmax, nmax - 1).astype(F32)
                slx_new = slx + wxi * new_l
                sl2_new = sl2 + (wi * new_l) * new_l
                take = (slx > 0) & (new_l != Li) & (sl2_new > 0) & \
                       ((slx_new * slx_new) * s2c > (slc * slc) * sl2_new)
                if take.any():
                    changed |= take
                    np.copyto(Li, new_l, where=take)
                    np.copyto(slc, slx_new, where=take)
                    np.copyto(s2c, sl2_new, where=take)
            if active is not None:  # the working copies go back into place
                L[:, active] = Lc
                sumlx[active] = slc
                suml2[active] = s2c
            if not changed.any():
                break
            sel = np.nonzero(changed)[0]
            active = sel if active is None else active[sel]
            cur = tuple(a[:, sel] if a.ndim == 2 else a[sel] for a in cur)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0.0)).astype(F32)
    return _zero_sub_blocks(scale, L, fnmax, zero)


def _q3_K_chunk(x, exact=False):
    nb = x.shape[0]
    xt = _sub_blocks(x, 16)
    scales, L = _make_q3_rmse(xt, 4, exact)
    scales = scales.reshape(nb, 16)
    max_scale = _first_absmax_last(scales)[1]
    nonzero = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(nonzero, F32(-32.0) / max_scale, F32(1.0)).astype(F32)
        l = _nearest_int(iscale[:, None] * scales).astype(np.int8).astype(np.int32)  # int8_t l = ...
    l = np.where(nonzero[:, None], np.clip(l, -32, 31) + 32, 0).astype(np.uint8)
    sc = np.zeros((nb, 12), np.uint8)
    sc[:, 0:8] = (l[:, 0:8] & 0xF) | ((l[:, 8:16] & 0xF) << 4)
    hi = (l >> 4).reshape(nb, 4, 4)                  # [j/4][j%4]
    sc[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    d = np.where(nonzero, _fp16_bits(F32(1.0) / iscale), np.uint16(0)).astype(np.uint16)
    sc_signed = l.astype(F32) - F32(32.0)
    d_sub = (_fp16_value(d)[:, None] * sc_signed).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = _nearest_int(xt / d_sub)
    levels = _final_levels(q, -4, 3, 4, d_sub == 0, L).reshape(nb, QK_K)
    high = levels > 3
    bits = high.reshape(nb, 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]
    hmask = np.bitwise_or.reduce(bits, axis=1).astype(np.uint8)    # bit b of hmask[m]: level 32b + m > 3
    levels = np.where(high, levels - 4, levels).astype(np.uint8)
    return np.concatenate([hmask, _pack_2bit(levels), sc, d.view(np.uint8).reshape(-1, 2)], axis=1)


# ---------------------------------------------------------------- public

def _encoder(name, chunk_fn, chunk_scale=1):
    block, nbytes = _DTYPES[name].block, _DTYPES[name].block_bytes

    def encode(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.ndim == 1:
            rows = rows.reshape(1, -1)
        if rows.shape[-1] % block:
            raise ValueError(f"{name}: row length {rows.shape[-1]} is not a multiple of {block}")
        blocks = np.ascontiguousarray(rows, dtype=F32).reshape(-1, block)
        chunk = _CHUNK_BLOCKS * chunk_scale
        out = np.empty((blocks.shape[0], nbytes), np.uint8)
        with np.errstate(all="ignore"):  # inf/NaN inputs and overflowing scales follow the C silently
            for start in range(0, blocks.shape[0], chunk):
                part = blocks[start:start + chunk]
                out[start:start + chunk] = chunk_fn(part, exact=not np.isfinite(part).all())
        return out.reshape(-1)

    encode.__name__ = f"encode_{name.lower()}"
    encode.__doc__ = f"{name} bytes of float32 rows (nrows, n), n a multiple of {block}; as ggml's reference quantizer."
    return encode


ENCODERS = {
    "Q2_K": _encoder("Q2_K", _q2_K_chunk),
    "Q3_K": _encoder("Q3_K", _q3_K_chunk, 4),  # its descent loop is per element: longer rows pay off
    "Q4_K": _encoder("Q4_K", _q4_K_chunk),
    "Q5_K": _encoder("Q5_K", _q5_K_chunk),
    "Q6_K": _encoder("Q6_K", _q6_K_chunk),
}


def encode(type_name: str, rows: np.ndarray) -> np.ndarray:
    """ENCODERS[type_name](rows)."""
    return ENCODERS[type_name](rows)
