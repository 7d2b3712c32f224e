"""`wconv diff A B`: what differs between two models, tensor by tensor.

A and B may be in any formats wconv reads (a .pth and the .gguf made from it, two training
checkpoints, a safetensors file and its re-export); tensors are paired by their canonical
names. Reported: tensors only in A / only in B, shape and dtype changes, and for each common
tensor whether its bytes are identical (same dtype), whether its values are identical (after
widening / dequantising both to float32), the largest |A - B|, the relative error
||A - B|| / ||A|| (L2, over finite values) and how many elements fail
|A - B| <= atol + rtol * |B| (numpy's allclose rule; NaN equals NaN at the same place).
Hyperparameter (Config) and tokenizer differences are listed too.

A common tensor *matches* when no element fails that rule (atol = rtol = 0 by default:
exact). `ok` is True when every common tensor matches; with strict=True the tensor names,
hyperparameters and tokenizers must agree as well.

Tensors stream in bounded pieces (LazyTensor.float32_chunks) compared on a small thread pool;
identical bytes are recognised without widening anything.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .errors import UsageError
from .inspect.stats import has_values, value_pieces
from .parallel import ordered_map
from .progress import progress

PIECE_ELEMENTS = 1 << 21  # per piece and side; the comparison's float64 temporaries are 16 MB each
RAW_PIECE_BYTES = 64 << 20


def _open(m):
    from .convert.load import load_model
    from .model import Model

    if isinstance(m, Model):
        return m
    return load_model(os.fspath(m), strict=False)


# --- one tensor --------------------------------------------------------------------------

def _raw_bytes(t) -> np.ndarray:
    return np.ascontiguousarray(t.raw()).reshape(-1).view(np.uint8)


def _bytes_equal(ta, tb, workers) -> bool:
    ra, rb = _raw_bytes(ta), _raw_bytes(tb)
    if ra.size != rb.size:
        return False
    slices = ((ra[i:i + RAW_PIECE_BYTES], rb[i:i + RAW_PIECE_BYTES]) for i in range(0, ra.size, RAW_PIECE_BYTES))
    for equal in ordered_map(lambda ab: bool(np.array_equal(ab[0], ab[1])), slices, workers=workers):
        if not equal:
            return False
    return True


def _aligned(pieces_a, pieces_b):
    """Pairs of equally long pieces from two piece streams of the same total length."""
    ia, ib = iter(pieces_a), iter(pieces_b)
    ra = rb = None
    while True:
        if ra is None or ra.size == 0:
            ra = next(ia, None)
        if rb is None or rb.size == 0:
            rb = next(ib, None)
        if ra is None or rb is None:
            if (ra is not None and ra.size) or (rb is not None and rb.size):
                raise ValueError("tensors produced different numbers of values")
            return
        n = min(ra.size, rb.size)
        yield ra[:n], rb[:n]
        ra, rb = ra[n:], rb[n:]


def _piece_diff(pair, atol: float, rtol: float) -> tuple:
    """(max |Δ| over finite Δ, Σ Δ², Σ A², elements failing the tolerance, all values equal)."""
    pa, pb = pair
    a = pa.astype(np.float64)
    b = pb.astype(np.float64)
    d = np.abs(a - b)
    finite = bool(np.isfinite(d).all())
    if finite:
        max_abs = float(d.max()) if d.size else 0.0
        sq_diff, sq_a = float(np.dot(d, d)), float(np.dot(a, a))
        if max_abs == 0.0:
            return 0.0, 0.0, sq_a, 0, True
        failing = int(d.size - np.count_nonzero(d <= atol + rtol * np.abs(b)))
        return max_abs, sq_diff, sq_a, failing, False
    same = (a == b) | (np.isnan(a) & np.isnan(b))  # equal infinities, NaN at the same place
    close = same | (d <= atol + rtol * np.abs(b))
    ok = np.isfinite(d)
    dd, aa = d[ok], a[np.isfinite(a)]
    return (float(dd.max()) if dd.size else 0.0, float(np.dot(dd, dd)), float(np.dot(aa, aa)),
            int(close.size - np.count_nonzero(close)), bool(same.all()))


def compare_tensors(name, ta, tb, *, atol: float = 0.0, rtol: float = 0.0, workers=None) -> dict:
    """The comparison of one pair of tensors (see the module docstring for the fields)."""
    row = {"name": name, "dtype_a": ta.dtype.name, "dtype_b": tb.dtype.name, "shape_a": list(ta.shape),
           "shape_b": list(tb.shape), "n_elements": ta.n_elements, "bit_identical": False, "identical": False,
           "max_abs_diff": None, "rel_error": None, "n_mismatched": None, "match": False}
    if ta.shape != tb.shape:
        row["status"] = "shape differs"
        return row
    if ta.dtype == tb.dtype and _bytes_equal(ta, tb, workers):
        row.update(bit_identical=True, identical=True, max_abs_diff=0.0, rel_error=0.0, n_mismatched=0,
                   match=True, status="identical")
        return row
    if not (has_values(ta) and has_values(tb)):
        row["status"] = f"cannot compare {ta.dtype.name} with {tb.dtype.name} values"
        return row
    max_abs, sq_diff, sq_a, failing, same = 0.0, 0.0, 0.0, 0, True
    pairs = _aligned(value_pieces(ta, PIECE_ELEMENTS), value_pieces(tb, PIECE_ELEMENTS))
    for m, sd, sa, f, s in ordered_map(lambda p: _piece_diff(p, atol, rtol), pairs, workers=workers):
        max_abs, sq_diff, sq_a, failing, same = max(max_abs, m), sq_diff + sd, sq_a + sa, failing + f, same and s
    rel = 0.0 if sq_diff == 0 else (math.sqrt(sq_diff / sq_a) if sq_a > 0 else None)
    row.update(identical=same, max_abs_diff=max_abs, rel_error=rel, n_mismatched=failing, match=failing == 0,
               status="identical values" if same else ("within tolerance" if failing == 0 else "differs"))
    return row


# --- side information --------------------------------------------------------------------

def _config_diff(ca, cb) -> dict:
    out = {}
    for key, va in ca.to_dict().items():
        vb = getattr(cb, key)
        if isinstance(va, float) or isinstance(vb, float):
            equal = va == vb or (np.float32(va) == np.float32(vb))  # a GGUF stores float32
        else:
            equal = va == vb
        if not equal:
            out[key] = [va, vb]
    return out


def _as_bytes(t) -> bytes:
    return t if isinstance(t, bytes) else str(t).encode("utf-8")


def _tokenizer_diff(ta, tb) -> dict:
    if ta is None and tb is None:
        return {}
    if ta is None or tb is None:
        return {"tokenizer": ["none" if ta is None else f"{ta.model}, {len(ta.tokens)} tokens",
                              "none" if tb is None else f"{tb.model}, {len(tb.tokens)} tokens"]}
    out = {}
    for field in ("model", "bos_id", "eos_id", "unk_id", "pad_id", "add_bos", "add_eos"):
        if getattr(ta, field) != getattr(tb, field):
            out[field] = [getattr(ta, field), getattr(tb, field)]
    if len(ta.tokens) != len(tb.tokens):
        out["n_tokens"] = [len(ta.tokens), len(tb.tokens)]
    differing = [i for i, (x, y) in enumerate(zip(ta.tokens, tb.tokens)) if _as_bytes(x) != _as_bytes(y)]
    if differing:
        i = differing[0]
        out["tokens"] = {"n_differing": len(differing), "first": i,
                         "a": _as_bytes(ta.tokens[i]).decode("utf-8", "replace"),
                         "b": _as_bytes(tb.tokens[i]).decode("utf-8", "replace")}
    for field in ("scores", "token_types"):
        va, vb = getattr(ta, field), getattr(tb, field)
        if (va is None) != (vb is None):
            out[field] = ["absent" if va is None else "present", "absent" if vb is None else "present"]
        elif va is not None:
            n = min(len(va), len(vb))
            x, y = np.asarray(va[:n], dtype=np.float32), np.asarray(vb[:n], dtype=np.float32)
            bad = int(np.count_nonzero(~((x == y) | (np.isnan(x) & np.isnan(y)))))
            if bad:
                out[field] = {"n_differing": bad}
    ma, mb = ta.merges or [], tb.merges or []
    if list(ma) != list(mb):
        out["merges"] = {"n_a": len(ma), "n_b": len(mb),
                         "n_differing": sum(x != y for x, y in zip(ma, mb)) + abs(len(ma) - len(mb))}
    return out


# --- two models --------------------------------------------------------------------------

def diff_models(a, b, *, atol: float = 0.0, rtol: float = 0.0, strict: bool = False, workers=None,
                quiet: bool = True) -> dict:
    """Compare models A and B (paths or Models); the dict is the `--json` contract."""
    for name, v in (("atol", atol), ("rtol", rtol)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise UsageError(None, f"--{name} must be a finite number >= 0, got {v}")
    ma, mb = _open(a), _open(b)
    names_a, names_b = list(ma.tensors), list(mb.tensors)
    only_a = [n for n in names_a if n not in mb.tensors]
    only_b = [n for n in names_b if n not in ma.tensors]
    common = [n for n in names_a if n in mb.tensors]
    rows = []
    with progress(sum(ma.tensors[n].nbytes + mb.tensors[n].nbytes for n in common), "comparing",
                  quiet=quiet) as bar:
        for n in common:
            rows.append(compare_tensors(n, ma.tensors[n], mb.tensors[n], atol=atol, rtol=rtol, workers=workers))
            bar.update(ma.tensors[n].nbytes + mb.tensors[n].nbytes, n)
    config = _config_diff(ma.config, mb.config)
    tokenizer = _tokenizer_diff(ma.tokenizer, mb.tokenizer)
    tensors_ok = all(r["match"] for r in rows)
    same_sets = not only_a and not only_b and not config and not tokenizer
    return {
        "a": ma.path or "<memory>", "b": mb.path or "<memory>",
        "format_a": ma.source_format, "format_b": mb.source_format,
        "atol": float(atol), "rtol": float(rtol), "strict": strict,
        "ok": tensors_ok and (same_sets or not strict),
        "n_common": len(common), "n_matching": sum(r["match"] for r in rows),
        "n_bit_identical": sum(r["bit_identical"] for r in rows),
        "only_in_a": only_a, "only_in_b": only_b,
        "dtype_changes": [{"name": r["name"], "a": r["dtype_a"], "b": r["dtype_b"]} for r in rows
                          if r["dtype_a"] != r["dtype_b"]],
        "shape_changes": [{"name": r["name"], "a": r["shape_a"], "b": r["shape_b"]} for r in rows
                          if r["shape_a"] != r["shape_b"]],
        "differing": [r["name"] for r in rows if not r["match"]],
        "config": config, "tokenizer": tokenizer,
        "tensors": rows,
    }


def _g(v) -> str:
    return "-" if v is None else (f"{v:.3e}" if v else "0")


def format_diff(r: dict) -> str:
    lines = [f"A: {r['a']} ({r['format_a']})", f"B: {r['b']} ({r['format_b']})",
             f"{r['n_common']} common tensors: {r['n_matching']} match "
             f"(atol {r['atol']:g}, rtol {r['rtol']:g}), {r['n_bit_identical']} bit-identical"]
    for label, names in (("only in A", r["only_in_a"]), ("only in B", r["only_in_b"])):
        if names:
            lines.append(f"{label} ({len(names)}): {', '.join(names[:8])}" + (" ..." if len(names) > 8 else ""))
    for c in r["shape_changes"]:
        lines.append(f"shape changed: {c['name']} {c['a']} -> {c['b']}")
    if r["dtype_changes"]:
        kinds = {}
        for c in r["dtype_changes"]:
            kinds.setdefault(f"{c['a']} -> {c['b']}", []).append(c["name"])
        for k, names in kinds.items():
            lines.append(f"dtype changed ({len(names)} tensors): {k}")
    for key, (va, vb) in r["config"].items():
        lines.append(f"hyperparameter {key}: {va} -> {vb}")
    for key, v in r["tokenizer"].items():
        lines.append(f"tokenizer {key}: {v}")
    differing = [t for t in r["tensors"] if not t["match"]]
    if differing:
        rows = [("tensor", "status", "max |Δ|", "rel error", "mismatched")]
        rows += [(t["name"], t["status"], _g(t["max_abs_diff"]), _g(t["rel_error"]),
                  "-" if t["n_mismatched"] is None else f"{t['n_mismatched']:,}/{t['n_elements']:,}")
                 for t in differing]
        widths = [max(len(x[i]) for x in rows) for i in range(5)]
        lines.append("")
        lines += ["  ".join(f"{c:<{w}}" for c, w in zip(row, widths)).rstrip() for row in rows]
    if r["ok"]:
        lines.append("result: MATCH" + ("" if r["strict"] or not (r["only_in_a"] or r["only_in_b"] or r["config"]
                                                                 or r["tokenizer"]) else
                                        " (common tensors; --strict also requires the rest to agree)"))
    else:
        lines.append(f"result: DIFFERENT ({len(differing)} tensor(s)" +
                     (", and names/hyperparameters/tokenizer" if r["strict"] and not differing else "") + ")")
    return "\n".join(lines)
