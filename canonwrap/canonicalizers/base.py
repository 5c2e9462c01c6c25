"""The ``Canonicalizer`` interface and its output dataclass."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from canonwrap.groups.base import Group


@dataclass
class CanonOutput:
    """What a canonicalizer returns.

    Attributes
    ----------
    canonical
        The data in canonical pose, same layout as the input (tensor ``[B, ...]`` or a
        point-cloud ``Batch``). Invariant: ``c(g . x) == c(x)``.
    element
        The group element per sample, ``h(x)``, in the layout of ``group``. Equivariant:
        ``h(g . x) == g . h(x)``, and ``x == h(x) . c(x)`` (up to the normalisation the
        canonicalizer documents, such as centring).
    prior_loss
        Optional scalar regularisation (e.g. a prior pulling ``h(x)`` towards the identity);
        ``None`` when the canonicalizer has none.
    """

    canonical: Any
    element: Tensor
    prior_loss: Tensor | None = None


class Canonicalizer(nn.Module, ABC):
    """A map ``x -> (h(x), h(x)^-1 . x)`` with ``h`` equivariant under
    [`group`][canonwrap.canonicalizers.Canonicalizer.group].

    Subclasses implement [`forward`][canonwrap.canonicalizers.Canonicalizer.forward] and set
    [`group`][canonwrap.canonicalizers.Canonicalizer.group]. A canonicalizer keeps no state between
    calls: everything it computed is in the returned
    [`CanonOutput`][canonwrap.canonicalizers.CanonOutput].
    """

    group: Group

    @abstractmethod
    def forward(self, data: Any) -> CanonOutput:
        """Canonicalize a batch: returns canonical data and one group element per sample."""

    def normalize(self, data: Any) -> Any:
        """Normalisation applied before the group acts (point clouds: centring). Default: none."""
        return data

    def apply_inverse(self, data: Any, element: Tensor) -> Any:
        """``h^-1 . normalize(x)`` for given elements ``h``: the canonical data."""
        return self.group.act(self.group.inverse(element), self.normalize(data))


class Frozen(Canonicalizer):
    """A canonicalizer whose parameters are fixed (see
    [`frozen`][canonwrap.canonicalizers.frozen])."""

    def __init__(self, inner: Canonicalizer) -> None:
        super().__init__()
        self.inner = inner
        self.group = inner.group
        for p in self.inner.parameters():
            p.requires_grad_(False)
        self.inner.eval()

    def train(self, mode: bool = True) -> Frozen:
        super().train(mode)
        self.inner.eval()  # normalisation statistics stay fixed too
        return self

    def forward(self, data: Any) -> CanonOutput:
        out = self.inner(data)
        element = out.element.detach()
        # Recompute the canonical data from the detached element so that gradients with
        # respect to the data itself still flow (the pose is fixed, the data is not).
        canonical = self.inner.apply_inverse(data, element)
        return CanonOutput(canonical=canonical, element=element, prior_loss=None)

    def normalize(self, data: Any) -> Any:
        return self.inner.normalize(data)

    def apply_inverse(self, data: Any, element: Tensor) -> Any:
        """The inner canonicalizer's ``h^-1 . x`` (it may override the group action)."""
        return self.inner.apply_inverse(data, element)


def frozen(canonicalizer: Canonicalizer) -> Frozen:
    """Freeze a canonicalizer: no parameter receives gradients and it stays in eval mode.

    This is the ``canon(frozen)`` baseline: a randomly initialised (or pre-trained)
    equivariant network used as a fixed canonicalizer.
    """
    if isinstance(canonicalizer, Frozen):
        return canonicalizer
    if not isinstance(canonicalizer, Canonicalizer):
        raise TypeError(f"frozen() expects a Canonicalizer, got {type(canonicalizer).__name__}")
    return Frozen(canonicalizer)
