"""Canonicalizers: maps to a canonical pose with an equivariant group element.

``EquiAdaptCanonicalizer`` (an adapter for equiadapt's image canonicalizers, documented in
[`canonwrap.canonicalizers.equiadapt`][canonwrap.canonicalizers.equiadapt]) is loaded lazily on
first attribute access and is not in ``__all__``, so importing canonwrap never imports the adapter
or equiadapt. Import it as
``from canonwrap.canonicalizers.equiadapt import EquiAdaptCanonicalizer``.
"""

from __future__ import annotations

from typing import Any

from canonwrap.canonicalizers.base import Canonicalizer, CanonOutput, Frozen, frozen
from canonwrap.canonicalizers.basic import CenterOfMass, Identity, PCACanonicalizer, centre
from canonwrap.canonicalizers.discrete_rotation import DiscreteRotationCanonicalizer
from canonwrap.canonicalizers.egnn import EGNNCanonicalizer
from canonwrap.canonicalizers.random_pose import RandomPose
from canonwrap.canonicalizers.unit_range import UnitRange

__all__ = [
    "CanonOutput",
    "Canonicalizer",
    "Frozen",
    "frozen",
    "Identity",
    "CenterOfMass",
    "PCACanonicalizer",
    "centre",
    "EGNNCanonicalizer",
    "DiscreteRotationCanonicalizer",
    "UnitRange",
    "RandomPose",
]

_LAZY = {"EquiAdaptCanonicalizer": "canonwrap.canonicalizers.equiadapt"}


def __getattr__(name: str) -> Any:
    """Load optional adapters on first access (PEP 562)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
