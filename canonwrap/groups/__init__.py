"""Groups and their actions on data: SO(3), O(3), translations, C_n on images."""

from canonwrap.groups.base import Group, Trivial
from canonwrap.groups.images import CyclicRotations, rotate_images
from canonwrap.groups.rotations import O3, SO3, quaternion_to_matrix, rotate_points
from canonwrap.groups.translations import Translations

__all__ = [
    "Group",
    "Trivial",
    "SO3",
    "O3",
    "Translations",
    "CyclicRotations",
    "rotate_images",
    "rotate_points",
    "quaternion_to_matrix",
]
