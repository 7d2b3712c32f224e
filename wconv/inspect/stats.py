"""Per-tensor value statistics (`wconv inspect --stats`) and the NaN/Inf scan of `verify --deep`.

Values are read one tensor at a time, in bounded flat pieces (LazyTensor.float32_chunks:
widened or dequantised to float32, PIECE_ELEMENTS at a time), so memory stays at a few
pieces whatever the model size. Each piece is reduced with vectorised numpy on a small
thread pool (wconv.parallel) while the next piece is being produced.

Numerics: every piece is reduced in float64 - its mean, then the sum of squared
deviations from that mean (two passes, so no cancellation) - relative to a shift (the first
piece's mean), and pieces are combined with the pairwise update of Chan, Golub and LeVeque;
results agree with an exact computation to ~1e-15 relative even for data like 1e4 +- 1e-3. min, max, mean and std are over the finite values (NaN and
±Inf are counted, not averaged); std is the population standard deviation (ddof=0, as
numpy's default). Integer and bool tensors are reduced from their stored values in
float64 (exact below 2**53).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from ..errors import WconvError
from ..parallel import ordered_map
from ..progress import progress

PIECE_ELEMENTS = 1 << 21  # 8 MB of float32 per piece (plus a 16 MB float64 temporary while reduced)
STAT_FIELDS = ("n_elements", "min", "max", "mean", "std", "nan", "inf", "zeros")


@dataclass
class Moments:
    """Running statistics of a set of values; `n` counts the finite ones."""

    n_elements: int = 0
    n: int = 0
    min: float = math.inf
    max: float = -math.inf
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean (finite values)
    nan: int = 0
    inf: int = 0
    zeros: int = 0

    def merged(self, o: "Moments") -> "Moments":
        if o.n_elements == 0:
            return self
        if self.n_elements == 0:
            return o
        n = self.n + o.n
        if n:
            delta = o.mean - self.mean
            mean = self.mean + delta * (o.n / n)
            m2 = self.m2 + o.m2 + delta * delta * (self.n * o.n / n)
        else:
            mean, m2 = 0.0, 0.0
        return Moments(self.n_elements + o.n_elements, n, min(self.min, o.min), max(self.max, o.max),
                       mean, m2, self.nan + o.nan, self.inf + o.inf, self.zeros + o.zeros)

    def as_dict(self) -> dict:
        """The JSON form (docs/inspect-json.md); min/max/mean/std are null without finite values."""
        finite = self.n > 0
        return {"n_elements": self.n_elements,
                "min": float(self.min) if finite else None, "max": float(self.max) if finite else None,
                "mean": float(self.mean) if finite else None,
                "std": math.sqrt(max(self.m2, 0.0) / self.n) if finite else None,
                "nan": self.nan, "inf": self.inf, "zeros": self.zeros}


def piece_moments(x: np.ndarray, shift: float = 0.0) -> Moments:
    """Statistics of one flat piece (float32 or float64), reduced in float64.

    `mean` comes back relative to `shift` (a value near the data's mean): the deviations of
    pieces from each other are then small numbers computed exactly, even for data far from 0.
    """
    size = int(x.size)
    if size == 0:
        return Moments()
    zeros = size - int(np.count_nonzero(x))  # NaN counts as non-zero, -0.0 as zero
    lo, hi = x.min(), x.max()  # NaN anywhere makes these NaN; ±Inf shows up as themselves
    nan = inf = 0
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = np.isfinite(x)
        n_finite = int(np.count_nonzero(finite))
        nan = int(np.count_nonzero(np.isnan(x)))
        inf = size - n_finite - nan
        x = x[finite]
        if x.size == 0:
            return Moments(size, 0, math.inf, -math.inf, 0.0, 0.0, nan, inf, zeros)
        lo, hi = x.min(), x.max()
    y = x.astype(np.float64)  # a copy: shifted and centred in place below
    if shift:
        y -= shift
    mean = float(y.sum()) / y.size  # numpy sums pairwise
    y -= mean
    m2 = float(np.dot(y, y))
    return Moments(size, int(y.size), float(lo), float(hi), mean, m2, nan, inf, zeros)


def nonfinite_counts(x: np.ndarray) -> tuple[int, int]:
    """(NaN count, ±Inf count) of a piece; two vectorised passes when everything is finite."""
    if x.size == 0 or (math.isfinite(x.min()) and math.isfinite(x.max())):
        return 0, 0
    nan = int(np.count_nonzero(np.isnan(x)))
    return nan, int(x.size) - int(np.count_nonzero(np.isfinite(x))) - nan


def has_values(t) -> bool:
    """Whether statistics mean anything for this tensor's element type (not complex / opaque)."""
    name = t.dtype.name
    return not name.startswith("C") and not name.startswith("torch.")


def value_pieces(t, max_elements: int = PIECE_ELEMENTS):
    """Flat pieces of the tensor's values: float32 for float types (quantised ones dequantised),
    stored integers / bools as they are (reduced in float64 by the consumer)."""
    if t.dtype.is_float and t.dtype.name != "F64":  # F64 is reduced as stored, not through float32
        yield from t.float32_chunks(max_elements)
        return
    flat = t.raw().reshape(-1)
    if flat.dtype == np.bool_:
        flat = flat.view(np.uint8)
    for start in range(0, flat.size, max_elements):
        yield flat[start:start + max_elements]


def tensor_moments(t, *, workers=None, max_elements: int = PIECE_ELEMENTS) -> Moments:
    pieces = value_pieces(t, max_elements)
    first = next(pieces, None)
    if first is None:
        return Moments()
    # Shift by the first piece's mean (the "shifted data" method): far from zero, e.g. 1e4 +- 1e-3,
    # the combination of pieces would otherwise lose digits to their large, nearly equal means.
    head = piece_moments(first)
    shift = head.mean if head.n else 0.0
    total = Moments()
    for m in ordered_map(lambda x: piece_moments(x, shift), itertools.chain([first], pieces), workers=workers):
        total = total.merged(m)
    del first
    total.mean += shift
    return total


def tensor_stats(t, *, workers=None, max_elements: int = PIECE_ELEMENTS) -> dict:
    """The statistics of one LazyTensor as a dict (fields STAT_FIELDS), or {"error": why}."""
    if not has_values(t):
        return {"n_elements": t.n_elements, "error": f"{t.dtype.name} values have no statistics"}
    try:
        return tensor_moments(t, workers=workers, max_elements=max_elements).as_dict()
    except WconvError as e:  # e.g. a tensor saved on torch's meta device: report it, go on
        return {"n_elements": t.n_elements, "error": str(e)}


def model_stats(model, *, workers=None, quiet: bool = True, max_elements: int = PIECE_ELEMENTS) -> dict:
    """{tensor name: tensor_stats(...)} for every tensor of `model`, one tensor at a time."""
    out = {}
    with progress(sum(t.nbytes for t in model.tensors.values()), "statistics", quiet=quiet) as bar:
        for name, t in model.tensors.items():
            out[name] = tensor_stats(t, workers=workers, max_elements=max_elements)
            bar.update(t.nbytes, name)
    return out


def nonfinite_scan(t, *, workers=None, max_elements: int = PIECE_ELEMENTS) -> tuple[int, int]:
    """(NaN count, Inf count) over a tensor, streamed like tensor_stats."""
    nan = inf = 0
    for a, b in ordered_map(nonfinite_counts, value_pieces(t, max_elements), workers=workers):
        nan += a
        inf += b
    return nan, inf
