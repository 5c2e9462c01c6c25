"""Adapter: an equiadapt discrete image canonicalizer as a canonwrap
[`Canonicalizer`][canonwrap.canonicalizers.Canonicalizer].

`equiadapt <https://pypi.org/project/equiadapt/>`_ (Kaba et al. 2023; Mondal et al. 2023)
ships canonicalizers for images built around an equivariant "canonicalization network",
for instance ``GroupEquivariantImageCanonicalization`` with its e2cnn-based
``ESCNNEquivariantNetwork`` or its ``CustomEquivariantNetwork``. They return only the
canonical image and keep the group element and the activations in a dictionary on the
object (``canonicalization_info_dict``).
[`EquiAdaptCanonicalizer`][canonwrap.canonicalizers.equiadapt.EquiAdaptCanonicalizer] wraps such an
object so that it returns a [`CanonOutput`][canonwrap.canonicalizers.CanonOutput] and can be used
wherever canonwrap expects a canonicalizer (``CanonicalizedDiffusion``, ``frozen``,
``canonwrap.testing``).

equiadapt is optional and not imported by ``import canonwrap``. Import the adapter as
``from canonwrap.canonicalizers.equiadapt import EquiAdaptCanonicalizer`` (or lazily as
``canonwrap.canonicalizers.EquiAdaptCanonicalizer``); equiadapt itself is imported only
when an adapter is built.

Installing equiadapt
:   equiadapt 0.1.2 imports torchvision at module level (``torchvision.transforms`` in its
    image canonicalizers) and needs kornia, e2cnn, omegaconf and hydra-core. The PyPI
    torchvision wheels are built against the CUDA builds of torch, so they do not import
    beside a CPU-only torch (``operator torchvision::nms does not exist``). The project's
    route is a separate environment with a matching pair, which ``scripts/setup.sh --tests``
    creates (``CANONWRAP_EQUIADAPT=0`` skips it):

        bash scripts/setup.sh --tests   # also creates .venv-equiadapt

    which installs ``torch==2.14.1 torchvision==0.29.1`` (a CUDA build that also runs on
    CPU), ``equiadapt`` without its dependencies plus ``e2cnn kornia hydra-core omegaconf``,
    and canonwrap in editable mode. Anywhere torch and torchvision already match,
    ``pip install 'canonwrap[equiadapt]'`` is enough.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from canonwrap.canonicalizers.base import Canonicalizer, CanonOutput
from canonwrap.groups.images import CyclicRotations

__all__ = ["EquiAdaptCanonicalizer"]

_INSTALL_HINT = (
    "EquiAdaptCanonicalizer needs equiadapt (>= 0.1.2) with a torchvision that matches the "
    "installed torch. Create the separate environment with "
    "`bash scripts/setup.sh --tests` (.venv-equiadapt: torch 2.14.1 + "
    "torchvision 0.29.1 + equiadapt), or `pip install 'canonwrap[equiadapt]'` where torch "
    "and torchvision match"
)


def _discrete_image_base() -> type:
    """equiadapt's ``DiscreteGroupImageCanonicalization``, imported on first use."""
    try:
        from equiadapt.images.canonicalization.discrete_group import (
            DiscreteGroupImageCanonicalization,
        )
    except Exception as err:  # ImportError, or torchvision's RuntimeError on a torch mismatch
        raise ImportError(f"{_INSTALL_HINT} (import failed: {err!r})") from err
    return DiscreteGroupImageCanonicalization


class EquiAdaptCanonicalizer(Canonicalizer):
    """Wrap an equiadapt discrete rotation canonicalizer for images ``[B, C, H, H]``.

    Parameters
    ----------
    canonicalization
        An equiadapt ``DiscreteGroupImageCanonicalization`` (typically
        ``GroupEquivariantImageCanonicalization``) with ``group_type == "rotation"``. Its
        ``num_rotations`` gives ``n``;
        [`group`][canonwrap.canonicalizers.equiadapt.EquiAdaptCanonicalizer.group] is
        ``CyclicRotations(n)``. It becomes a submodule, so ``.train()``, ``.eval()``,
        ``.parameters()``, ``.to(device)`` and ``state_dict()`` reach it.
    prior_weight
        Weight ``w`` of equiadapt's prior: with ``w > 0``,
        [`CanonOutput.prior_loss`][canonwrap.canonicalizers.CanonOutput.prior_loss] is
        ``w * canonicalization.get_prior_regularization_loss()``, i.e. ``w`` times the cross-entropy
        of the group activations against the identity element (equiadapt's "dataset prior"), already
        weighted so that a training loop (``CanonicalizedDiffusion``) can simply add it. With
        ``w == 0`` (default) ``prior_loss`` is ``None``.

    Notes
    -----
    **What one call does.**
    ``forward(x)`` calls equiadapt's ``canonicalize(x)`` (through its ``forward``), then at
    once reads ``canonicalization_info_dict["group_element"]["rotation"]`` (degrees), the
    prior loss (which equiadapt computes from ``canonicalization_info_dict``), and resets
    that dictionary to ``{}``. So nothing computed in one call, and no autograd graph,
    survives into the next: neither the adapter nor the wrapped object keeps state
    between calls. (equiadapt's own ``invert_canonicalization`` and
    ``get_identity_metric`` read that dictionary and therefore cannot be called after the
    adapter; use [`CanonOutput.element`][canonwrap.canonicalizers.CanonOutput.element] instead.)

    **Conventions (checked by the tests against the installed equiadapt).**
    equiadapt's element ``k`` (``argmax`` of the ``n`` group activations) is stored as the
    angle ``360 k / n`` degrees, and the canonical image is
    ``kornia.geometry.rotate(x, -360 k / n)``. kornia's positive angles rotate
    counter-clockwise as displayed (row 0 on top) about the grid centre
    ``((W - 1) / 2, (H - 1) / 2)``: ``+90`` is ``torch.rot90(x, 1, dims=(-2, -1))``. That
    is canonwrap's convention for [`CyclicRotations`][canonwrap.groups.CyclicRotations], so the
    element is ``k = round(angle * n / 360) mod n`` with no sign flip, and equiadapt's
    equivariant networks shift their activations by ``+n/4`` under ``rot90(x, 1)``, giving
    ``h(g . x) = g + h(x) (mod n)``.

    **Canonical image.**
    [`CanonOutput.canonical`][canonwrap.canonicalizers.CanonOutput.canonical] is exactly the tensor
    equiadapt's ``canonicalize`` returns: the input rotated by kornia (bilinear, zero padding for
    one channel; for more channels equiadapt pads by edge replication before rotating and crops
    after). For multiples of 90 degrees kornia computes ``cos``/``sin`` of the angle in float32, so
    it reproduces ``torch.rot90`` only up to a few ``1e-6`` (relative to the pixel range), not bit
    for bit.
    [`apply_inverse`][canonwrap.canonicalizers.equiadapt.EquiAdaptCanonicalizer.apply_inverse] (used
    by [`frozen`][canonwrap.canonicalizers.frozen]) runs the same equiadapt padding / kornia
    rotation / crop, so a frozen adapter returns the same canonical images as the adapter in eval
    mode.

    **Training and eval modes.**
    In training mode equiadapt uses a straight-through estimator: the rotation angle is
    ``sum((one_hot + softmax(beta a) - softmax(beta a).detach()) * angles)``, so a loss on
    the canonical image reaches the canonicalization network through kornia's
    derivative with respect to the angle. In eval mode the one-hot is hard and the
    canonical image depends on the network only through the (discrete) choice. Note that
    equiadapt's ``ESCNNEquivariantNetwork`` contains dropout (``p = 0.5``) and batch norm:
    in training mode its elements are random from call to call, and invariance holds
    only in eval mode (or for a network without dropout).

    **Dtype.**
    equiadapt computes its angles in float32 (``one_hot(...).float()``, ``linspace``),
    and kornia requires the image and the angle to share a dtype, so only float32 images
    are accepted. Do not call ``.double()`` on e2cnn networks either: e2cnn shares its
    sampled filter bases between all convolutions with the same field types in a
    process, so converting one network converts the bases of all others.

    Examples
    --------
    A C4 canonicalizer with equiadapt's e2cnn network on 13x13 grey images:

        from omegaconf import OmegaConf
        from equiadapt.images.canonicalization.discrete_group import (
            GroupEquivariantImageCanonicalization,
        )
        from equiadapt.images.canonicalization_networks import ESCNNEquivariantNetwork
        from canonwrap.canonicalizers.equiadapt import EquiAdaptCanonicalizer

        net = ESCNNEquivariantNetwork((1, 13, 13), out_channels=8, kernel_size=3,
                                      num_rotations=4, num_layers=2)
        hyper = OmegaConf.create({"beta": 1.0, "input_crop_ratio": 1.0, "resize_shape": 13})
        canon = EquiAdaptCanonicalizer(
            GroupEquivariantImageCanonicalization(net, hyper, (1, 13, 13)), prior_weight=0.1
        )
        out = canon(images)          # out.canonical, out.element (long [B]), out.prior_loss
    """

    def __init__(self, canonicalization: Any, *, prior_weight: float = 0.0) -> None:
        super().__init__()
        base = _discrete_image_base()
        if not isinstance(canonicalization, base):
            raise TypeError(
                "EquiAdaptCanonicalizer wraps an equiadapt DiscreteGroupImageCanonicalization "
                "(e.g. GroupEquivariantImageCanonicalization); got "
                f"{type(canonicalization).__name__}"
            )
        group_type = getattr(canonicalization, "group_type", None)
        if group_type != "rotation":
            raise ValueError(
                "only equiadapt canonicalizers with group_type='rotation' map to canonwrap's "
                f"CyclicRotations; got group_type={group_type!r}"
            )
        n = getattr(canonicalization, "num_rotations", None)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"the equiadapt object has no valid num_rotations (got {n!r})")
        if not prior_weight >= 0:
            raise ValueError(f"prior_weight must be non-negative, got {prior_weight}")
        self.canonicalization = canonicalization
        self.prior_weight = float(prior_weight)
        self.n = n
        self.group = CyclicRotations(n)

    # -- helpers ---------------------------------------------------------------------
    def _check(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(
                f"expected images [B, C, H, W]; got {tuple(getattr(images, 'shape', ()))}"
            )
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images must be square; got {tuple(images.shape[-2:])}")
        if images.dtype != torch.float32:
            raise ValueError(
                "equiadapt computes its rotation angles in float32; pass float32 images "
                f"(got {images.dtype})"
            )

    def _angles(self, device: torch.device) -> Tensor:
        """Degrees of the ``n`` rotations, computed exactly as equiadapt computes them."""
        return torch.linspace(0.0, 360.0, self.n + 1)[: self.n].to(device)

    def element_from_degrees(self, degrees: Tensor) -> Tensor:
        """canonwrap element ``k`` (long ``[B]``) of equiadapt rotation angles in degrees."""
        steps = degrees.detach().double() * (self.n / 360.0)
        k = torch.round(steps)
        off = (steps - k).abs().max().item() if steps.numel() else 0.0
        if off > 1e-3:
            raise RuntimeError(
                f"equiadapt returned an angle {off * 360 / self.n:.3g} degrees away from every "
                f"multiple of 360/{self.n}; not a C{self.n} element"
            )
        return torch.remainder(k.long(), self.n)

    # -- canonicalization ------------------------------------------------------------
    def forward(self, images: Tensor) -> CanonOutput:
        """Canonicalize ``images [B, C, H, H]`` (float32) with the wrapped equiadapt object.

        Returns
        -------
        CanonOutput
            ``canonical`` (equiadapt's canonicalized images, ``[B, C, H, H]``), ``element``
            (long ``[B]`` in ``[0, n)``, counter-clockwise by ``2 pi k / n``) and
            ``prior_loss`` (``prior_weight`` times equiadapt's prior loss, or ``None``).
        """
        self._check(images)
        canon = self.canonicalization
        try:
            canonical = canon(images)
            info = canon.canonicalization_info_dict
            group_element = info.get("group_element") if isinstance(info, dict) else None
            if not group_element or "rotation" not in group_element:
                raise RuntimeError(
                    "the equiadapt object left no canonicalization_info_dict['group_element']"
                    "['rotation'] after canonicalize(); is it a discrete image canonicalizer?"
                )
            element = self.element_from_degrees(group_element["rotation"])
            prior = None
            if self.prior_weight > 0:
                prior = self.prior_weight * canon.get_prior_regularization_loss()
        finally:
            canon.canonicalization_info_dict = {}
        return CanonOutput(canonical=canonical, element=element, prior_loss=prior)

    def apply_inverse(self, data: Tensor, element: Tensor) -> Tensor:
        """``h^-1 . x`` the way equiadapt rotates: its padding, kornia's rotation, its crop.

        For multiples of 90 degrees this is ``group.act(group.inverse(element), x)`` up to a
        few ``1e-6``; for other angles it is equiadapt's bilinear rotation.
        """
        import kornia

        self._check(data)
        canon = self.canonicalization
        degrees = self._angles(data.device)[element.to(data.device).long()]
        x = canon.pad(data)
        x = kornia.geometry.rotate(x, -degrees.to(x.dtype))
        return canon.crop(x)

    def extra_repr(self) -> str:
        return f"n={self.n}, prior_weight={self.prior_weight}"
