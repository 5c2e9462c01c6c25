"""Datasets: QM9 molecules ([`canonwrap.data.qm9`][canonwrap.data.qm9]) and rotated MNIST
([`canonwrap.data.rotmnist`][canonwrap.data.rotmnist]; needs only numpy and torch, its rotations are
[`canonwrap.groups.rotate_images`][canonwrap.groups.rotate_images]). Toy point clouds are in
[`canonwrap.data.toy`][canonwrap.data.toy]."""

from canonwrap.data.qm9 import QM9, QM9_ATOM_TYPES, qm9_features
from canonwrap.data.rotmnist import RotatedMNIST

__all__ = ["QM9", "QM9_ATOM_TYPES", "qm9_features", "RotatedMNIST"]
