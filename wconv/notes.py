"""Writers' notes, printed as summaries: one line per kind of note, the per-tensor list on request.

A note about one tensor (re-quantised, written as F16 instead, overflowed to infinity, ...) is a
`Note`: a str (its full one-tensor text, so lists of notes still read as text) that also carries
`kind`, the words of the summary line shared by every note of that kind ("Q4_K tensors
re-quantised to Q8_0"), and the tensor name. Any other str is a note of its own and is printed
as it is. `emit` is the one place writers' notes reach stderr: 61 notes of one kind become
"61 Q4_K tensors re-quantised to Q8_0 (blk.0.attn_q.weight, ...; --verbose lists them)";
with --verbose (`verbose(True)`) every tensor's line follows its summary.
"""
from __future__ import annotations

import contextlib
import contextvars

_VERBOSE = contextvars.ContextVar("wconv_verbose_notes", default=False)
_EXAMPLES = 2  # tensor names shown in a summary line


class Note(str):
    """A per-tensor note: the str is its own text; `kind` is what its summary line says."""

    kind: str
    tensor: str

    def __new__(cls, kind: str, tensor: str, text: str):
        self = super().__new__(cls, f"{tensor}: {text}")
        self.kind, self.tensor = kind, tensor
        return self


def tensor_note(kind: str, tensor: str, text: str) -> Note:
    return Note(kind, tensor, text)


@contextlib.contextmanager
def verbose(on: bool = True):
    """Within the block, emit() lists every tensor's note after its summary."""
    token = _VERBOSE.set(bool(on))
    try:
        yield
    finally:
        _VERBOSE.reset(token)


def summarise(notes, verbose: bool | None = None) -> list:
    """The lines to print: per kind (in order of first appearance) one summary line when it has
    more than one note, followed by every note's own line only when verbose; other notes as they are."""
    if verbose is None:
        verbose = _VERBOSE.get()
    groups: dict = {}
    order: list = []
    for note in notes:
        kind = getattr(note, "kind", None)
        key = ("kind", kind) if kind else ("text", str(note))
        if key not in groups:
            groups[key] = []
            order.append(key)
        if kind or not groups[key]:  # a repeated plain note is printed once
            groups[key].append(note)
    lines = []
    for key in order:
        group = groups[key]
        if key[0] == "text" or len(group) == 1:
            lines.append(str(group[0]))
            continue
        names = [n.tensor for n in group]
        if verbose:
            lines.append(f"{len(group)} {key[1]}:")
            lines += [f"  {n}" for n in group]
        else:
            shown = ", ".join(names[:_EXAMPLES]) + (", ..." if len(names) > _EXAMPLES else "")
            lines.append(f"{len(group)} {key[1]} ({shown}; --verbose lists them)")
    return lines


def emit(where, notes) -> None:
    """Print `notes` as warnings naming `where`, summarised (see summarise)."""
    from .progress import warn

    for line in summarise(notes):
        warn(where, line)
