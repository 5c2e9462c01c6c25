"""The ``Group`` interface: elements are batched tensors, actions act on data."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor


class Group(ABC):
    """A group whose elements are stored as a batch of tensors, one element per sample.

    Subclasses fix the element layout (for instance ``[B, 3, 3]`` rotation matrices) and how
    an element acts on data (plain tensors ``[B, ...]`` or a ``torch_geometric`` ``Batch``).

    Conventions: ``compose(a, b)`` is ``a . b`` (apply ``b`` first, then ``a``), so
    ``act(compose(a, b), x) == act(a, act(b, x))``.
    """

    name: str = "group"
    """Short human-readable name, e.g. ``"SO(3)"``."""
    is_compact: bool = True
    """Whether the group is compact. Then [`random`][canonwrap.groups.Group.random] draws
    from its Haar probability measure, and acting with a random element makes a distribution
    invariant; non-compact groups (translations) have no such measure, and
    ``sample(randomize_pose=True)`` leaves their pose as it is."""

    @abstractmethod
    def identity(
        self, batch_size: int, *, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> Tensor:
        """``batch_size`` copies of the identity element."""

    @abstractmethod
    def random(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ) -> Tensor:
        """``batch_size`` independent elements drawn from the Haar (uniform) measure."""

    @abstractmethod
    def compose(self, a: Tensor, b: Tensor) -> Tensor:
        """Element-wise product ``a . b`` of two batches of elements."""

    @abstractmethod
    def inverse(self, g: Tensor) -> Tensor:
        """Element-wise inverse of a batch of elements."""

    @abstractmethod
    def act(self, g: Tensor, data: Any) -> Any:
        """Act with one element per sample on ``data``; returns data of the same layout."""

    @abstractmethod
    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """A distance between elements per sample, ``[B]``; zero iff equal."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Trivial(Group):
    """The one-element group; elements are zeros ``[B]`` and act as the identity."""

    name = "{e}"

    def identity(self, batch_size, *, dtype=torch.float32, device=None):
        return torch.zeros(batch_size, dtype=dtype, device=device)

    def random(self, batch_size, *, generator=None, dtype=torch.float32, device=None):
        return self.identity(batch_size, dtype=dtype, device=device)

    def compose(self, a, b):
        return a + b

    def inverse(self, g):
        return g

    def act(self, g, data):
        return data

    def distance(self, a, b):
        return (a - b).abs()
