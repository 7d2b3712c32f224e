"""Inspection: the `wconv inspect` report and `wconv scan`.

`wconv.inspect(path)` calls inspect_path: this package is made callable because
importing a submodule rebinds the package attribute `wconv.inspect`, which would
otherwise replace a plain function of that name on first use.
"""
from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, path, **options) -> dict:
        from .report import inspect_path

        return inspect_path(path, **options)


sys.modules[__name__].__class__ = _CallableModule
