"""The training objectives, one module each (:mod:`vigos_megatron.objectives.base` says what a module holds).

:func:`get` returns the :class:`~vigos_megatron.objectives.base.Objective` of a ``loss.objective``
value; :data:`MODULES` is the registry (adding an objective adds its module's name here).
"""

from __future__ import annotations

import importlib

from vigos_megatron.objectives.base import Objective

#: the registry: ``loss.objective`` values, each the name of its module in this package
MODULES = ("vigos", "opsd", "vgs", "opd")


def get(name: str) -> Objective:
    """The objective registered as ``name`` (``ValueError`` naming the registered ones otherwise)."""
    if name not in MODULES:
        raise ValueError(f"unknown objective {name!r}; registered: {', '.join(MODULES)}")
    return importlib.import_module(f"{__name__}.{name}").OBJECTIVE

