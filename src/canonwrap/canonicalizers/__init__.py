"""Canonicalizers: maps to a canonical pose with an equivariant group element."""

from canonwrap.canonicalizers.base import Canonicalizer, CanonOutput, Frozen, frozen
from canonwrap.canonicalizers.basic import CenterOfMass, Identity, PCACanonicalizer, centre
from canonwrap.canonicalizers.discrete_rotation import DiscreteRotationCanonicalizer
from canonwrap.canonicalizers.egnn import EGNNCanonicalizer

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
]
