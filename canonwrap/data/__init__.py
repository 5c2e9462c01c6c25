"""Datasets. Only molecule data live here so far; image modules are not imported."""

from canonwrap.data.qm9 import QM9, QM9_ATOM_TYPES, qm9_features

__all__ = ["QM9", "QM9_ATOM_TYPES", "qm9_features"]
