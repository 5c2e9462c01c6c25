"""Evaluation metrics for generated samples.

Molecules (EDM definitions): [`evaluate`][canonwrap.metrics.evaluate] returns atom and molecule
stability, validity, connected validity, uniqueness and novelty;
[`check_stability`][canonwrap.metrics.check_stability],
[`check_validity`][canonwrap.metrics.check_validity],
[`get_bond_order`][canonwrap.metrics.get_bond_order],
[`build_molecule`][canonwrap.metrics.build_molecule] and
[`mol_to_smiles`][canonwrap.metrics.mol_to_smiles] expose the steps.
[`write_xyz`][canonwrap.metrics.write_xyz], [`read_xyz`][canonwrap.metrics.read_xyz] and
[`write_sdf`][canonwrap.metrics.write_sdf] export molecules. RDKit is imported only when a function
needs it (``pip install canonwrap[molecules]``).
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
