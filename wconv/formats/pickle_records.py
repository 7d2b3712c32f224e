"""The inert records wconv's pickle machine produces, and the shape of its table of globals.

Nothing here refers to anything a pickle names: a global is a token (`Global` when it
is in the table, `UnknownGlobal` when not), and what calling an unknown global would
have produced is an `UnknownObject` record. Leaf module: the machine (`pickle_vm`), the
table (`pickle_globals`) and the torch handlers (`torch_tensors`) all import it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Global:
    """A global that is in the table, as a token. Calling it means running *our* handler."""

    module: str
    name: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class UnknownGlobal:
    """A global outside the table (scan, or load with allow_unknown_globals). Never resolved.

    module "?" stands for a global whose name the pickle hides (STACK_GLOBAL of computed
    operands, an extension-registry code)."""

    module: str
    name: str

    @property
    def hidden(self) -> bool:
        return self.module == "?"

    def __str__(self) -> str:
        return "?" if self.hidden else f"{self.module}.{self.name}"


class UnknownObject:
    """What REDUCE/NEWOBJ/INST/OBJ would have produced where wconv builds nothing: a record.

    `cls` is what was called: an UnknownGlobal, or (when scanning, or after a handler
    refused its arguments) a `Global` or whatever object the pickle tried to call."""

    __slots__ = ("cls", "args", "kwargs", "state", "items", "dict_items")

    def __init__(self, cls, args=(), kwargs=None):
        self.cls = cls
        self.args = args
        self.kwargs = kwargs
        self.state = None
        self.items = []  # APPEND/APPENDS/ADDITEMS on it
        self.dict_items = []  # SETITEM/SETITEMS on it, as (key, value) pairs

    def __repr__(self) -> str:
        return f"<UnknownObject {self.cls}>"


@dataclass(frozen=True)
class Marker:
    """A named constant such as a torch dtype or layout (`kind` says which)."""

    kind: str
    name: str

    def __str__(self) -> str:
        return self.name


class Namespace(dict):
    """argparse.Namespace contents, as a plain dict."""


class Pending:
    """An object completed by a later BUILD (numpy arrays); must not leak into results."""

    __slots__ = ("memo_keys", "origin")

    def __init__(self, origin: str = "?"):
        self.memo_keys = []
        self.origin = origin  # the global that made it, for messages


@dataclass
class GlobalSpec:
    """How one global of the table behaves.

    `value`: what the GLOBAL opcode pushes (None: a `Global` token).
    `call(ctx, args)`: REDUCE handler. `new(ctx, args, kwargs)`: NEWOBJ handler.
    `build(ctx, obj, state) -> replacement or None`: BUILD on an object of type `makes`,
    which only this global's handlers produce; without `build`, BUILD on its results is refused.
    """

    value: object = None
    call: Callable | None = None
    new: Callable | None = None
    build: Callable | None = None
    makes: type | None = None
