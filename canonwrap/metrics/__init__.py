"""Evaluation metrics for generated samples.

Molecules (EDM definitions): :func:`evaluate` returns atom and molecule stability, validity,
connected validity, uniqueness and novelty; :func:`check_stability`, :func:`check_validity`,
:func:`get_bond_order`, :func:`build_molecule` and :func:`mol_to_smiles` expose the steps.
:func:`write_xyz`, :func:`read_xyz` and :func:`write_sdf` export molecules. RDKit is imported
only when a function needs it (``pip install canonwrap[molecules]``).
"""

from canonwrap.metrics.io import read_xyz, write_sdf, write_xyz
from canonwrap.metrics.molecules import (
    ALLOWED_VALENCES,
    MARGINS_PM,
    SUPPORTED_ELEMENTS,
    bond_order_matrix,
    build_molecule,
    canonicalize_smiles,
    check_stability,
    check_validity,
    evaluate,
    get_bond_order,
    mol_to_smiles,
)

__all__ = [
    "ALLOWED_VALENCES",
    "MARGINS_PM",
    "SUPPORTED_ELEMENTS",
    "bond_order_matrix",
    "build_molecule",
    "canonicalize_smiles",
    "check_stability",
    "check_validity",
    "evaluate",
    "get_bond_order",
    "mol_to_smiles",
    "read_xyz",
    "write_sdf",
    "write_xyz",
]
