"""Canonicalizers: maps to a canonical pose with an equivariant group element."""

from canonwrap.canonicalizers.base import CanonOutput, Canonicalizer, Frozen, frozen
from canonwrap.canonicalizers.basic import CenterOfMass, Identity, PCACanonicalizer, centre

__all__ = [
    "CanonOutput",
    "Canonicalizer",
    "Frozen",
    "frozen",
    "Identity",
    "CenterOfMass",
    "PCACanonicalizer",
    "centre",
]
