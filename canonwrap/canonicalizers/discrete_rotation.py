"""A learned canonicalizer for C_n rotations of images, built directly on escnn.

The scoring network is a stack of C_n-steerable convolutions (``escnn.nn.R2Conv``) on
regular fields, so that rotating the input by ``2 pi k / n`` cyclically shifts the ``n``
scores it returns by ``k``. The group element is the arg-max of the scores and the
canonical image is the input rotated back by that element (as in equiadapt's discrete
image canonicalization, Kaba et al. 2023, without its hidden state).

Requires the optional ``escnn`` dependency (``pip install canonwrap[images]``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from canonwrap.canonicalizers.base import Canonicalizer, CanonOutput
from canonwrap.groups.images import CyclicRotations

__all__ = ["DiscreteRotationCanonicalizer", "disc_mask"]


def disc_mask(size: int, *, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Indicator ``[size, size]`` of the disc inscribed in a ``size x size`` grid.

    A pixel is inside when its centre lies at distance at most ``(size - 1) / 2`` from
    the grid centre ``((size - 1) / 2, (size - 1) / 2)``. The mask is exactly invariant
    under rotations of the grid by multiples of 90 degrees.
    """
    c = (size - 1) / 2
    r = torch.arange(size, dtype=torch.float64, device=device) - c
    d2 = r[:, None] ** 2 + r[None, :] ** 2
    return (d2 <= c * c + 1e-9).to(dtype)


class DiscreteRotationCanonicalizer(Canonicalizer):
    """C_n canonicalizer for square images ``[B, C, H, H]`` with an escnn scoring network.

    Scoring network
    :   ``layers`` steerable convolutions of kernel ``kernel_size`` (stride 1, "same"
        padding): ``C`` trivial fields -> ``hidden`` regular fields -> ... -> one regular
        field (``n`` channels), with a pointwise ELU between them (pointwise maps commute
        with the channel permutations of regular fields). After each of the first
        ``downsample`` hidden layers a 3x3 average pooling of stride 2 halves the grid.
        The ``n`` channels of the final field are averaged over the disc inscribed in the
        final grid, giving ``scores [B, n]``.

    Grid handling (exact for 90-degree rotations)
    :   ``torch.rot90`` rotates an ``H x H`` array about its centre ``(H - 1) / 2``. On an
        even grid that centre falls between pixels, and a stride-2 pooling samples a set
        of pixels that a 90-degree rotation does not map to itself. The scoring network
        therefore (1) maps an even grid onto an odd one by a 2x2 box average of stride 1
        (``H -> H - 1``; the box is symmetric about its centre, so this commutes with
        ``rot90``), (2) zeroes the input outside the inscribed disc (this also removes the
        corners that non-90-degree rotations cut off), and (3) zero-pads symmetrically to a
        size ``m 2^downsample + 1``, so that every stride-2 pooling samples a
        rotation-symmetric set of pixels. 28x28 becomes 27x27, then 29x29, then 15x15 and
        8x8 after two poolings. With these steps the scores of ``rot90(x)`` are those of
        ``x`` rolled by ``n / 4``, up to about 1e-6 relative in float32 and float64 alike
        (escnn samples its filter basis in float32, so the filters are rotation-symmetric
        only to that precision). Hence the element is exactly equivariant for multiples of
        90 degrees whenever ``n`` is a multiple of 4 and no two scores are that close.

    Other elements (not multiples of 90 degrees)
    :   They act by bilinear interpolation (see
        [`canonwrap.groups.rotate_images`][canonwrap.groups.rotate_images]), and escnn's
        filters, steerable in the continuum, are sampled on the pixel grid: nothing makes the
        scores of such a rotation a shifted copy of the scores of ``x``. At initialisation they
        are not: for the default network (C8, 28x28, float64) and a rotation by 45 degrees,
        the largest deviation of the scores from the shifted ones is, in the median over 16
        images, 11 % to 91 % of each image's range of scores (two seeds, smooth blobs and
        uniform noise; about 1e-6 for 90 degrees), and the arg-max follows the rotation for 0
        to 13 of the 16 images (chance: 2). For seed 0 and noise the scores stay nearer the
        unshifted ones (16 %) than the shifted ones (91 %): not shifted at all. A frozen,
        untrained canonicalizer is therefore invariant under multiples of 90 degrees only;
        training may bring the other elements closer to equivariance, but nothing enforces
        it (``tests/canonicalizers/test_discrete_rotation.py`` measures this).

    Direction convention
    :   Element ``k`` is the counter-clockwise rotation (as displayed, row 0 on top) by
        ``2 pi k / n``, as in [`CyclicRotations`][canonwrap.groups.CyclicRotations]. escnn's action
        of element ``k`` of ``rot2dOnR2(N=n)`` on a field over the grid agrees with this
        (``k = n / 4`` is ``torch.rot90(x, 1, dims=(-2, -1))``), and it maps channel ``j`` of a
        regular field to channel ``j + k``. So ``h(x) = argmax_j scores_j(x)`` satisfies
        ``h(g . x) = g + h(x) (mod n)`` with no re-indexing.

    Straight-through estimator
    :   The arg-max is piecewise constant, so the canonical image is computed as:

            p = softmax(scores / temperature)             # [B, n]
            w = one_hot(k*) + (p - p.detach())            # [B, n]; value: exactly one_hot
            canonical = sum_k w_k * rotate(x, -2 pi k / n)

        The forward value is exactly the hard choice ``rotate(x, -2 pi k* / n)`` (the same
        tensor ``apply_inverse`` returns); the backward pass sends
        ``dL/dscores = J_softmax^T <dL/dcanonical, rotate(x, -2 pi k / n)>_k`` to the
        network, i.e. the gradient of the loss if the pose were a softmax mixture of all
        ``n`` candidate poses. The ``n`` rotated copies are computed only when gradients
        are recorded; under ``torch.no_grad`` only the chosen rotation is computed.

    Prior
    :   With ``prior_weight > 0``,
        [`CanonOutput.prior_loss`][canonwrap.canonicalizers.CanonOutput.prior_loss] is
        ``prior_weight * cross_entropy(scores / temperature, 0)``: a pull of the chosen element
        towards the identity (equiadapt's prior regularisation), already weighted, so a training
        loop can simply add it. With ``prior_weight == 0`` it is ``None``.

    Parameters
    ----------
    n
        Order of the cyclic group (8, 16 or 32 are typical; a multiple of 4 keeps
        90-degree rotations exact).
    in_channels
        Image channels ``C``.
    hidden
        Number of regular fields (each of ``n`` channels) in the hidden layers.
    layers
        Number of steerable convolutions, at least 2.
    kernel_size
        Odd kernel size of every convolution.
    downsample
        Number of stride-2 poolings (after the first ``downsample`` hidden layers).
    prior_weight
        Weight of the identity prior; ``0`` disables it.
    temperature
        Softmax temperature of the straight-through gradient and of the prior.
    mask_input
        Zero the input of the scoring network outside the inscribed disc.

    Examples
    --------
    >>> import torch
    >>> canon = DiscreteRotationCanonicalizer(n=8, hidden=2, layers=2, downsample=1)
    >>> out = canon(torch.rand(3, 1, 28, 28))
    >>> out.canonical.shape, out.element.shape
    (torch.Size([3, 1, 28, 28]), torch.Size([3]))
    """

    def __init__(
        self,
        n: int = 8,
        in_channels: int = 1,
        hidden: int = 16,
        layers: int = 5,
        kernel_size: int = 5,
        downsample: int = 2,
        prior_weight: float = 0.0,
        temperature: float = 1.0,
        mask_input: bool = True,
    ) -> None:
        super().__init__()
        try:
            from escnn import gspaces
            from escnn import nn as enn
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "DiscreteRotationCanonicalizer needs escnn: pip install 'canonwrap[images]'"
            ) from err
        if int(n) < 2:
            raise ValueError(f"n must be at least 2, got {n}")
        if int(layers) < 2:
            raise ValueError(f"layers must be at least 2, got {layers}")
        if int(kernel_size) < 1 or int(kernel_size) % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        if not 0 <= int(downsample) <= int(layers) - 1:
            raise ValueError(f"downsample must be in [0, layers - 1], got {downsample}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if prior_weight < 0:
            raise ValueError(f"prior_weight must be non-negative, got {prior_weight}")

        self.n = int(n)
        self.group = CyclicRotations(self.n)
        self.in_channels = int(in_channels)
        self.downsample = int(downsample)
        self.prior_weight = float(prior_weight)
        self.temperature = float(temperature)
        self.mask_input = bool(mask_input)

        gspace = gspaces.rot2dOnR2(N=self.n)
        self._in_type = enn.FieldType(gspace, self.in_channels * [gspace.trivial_repr])
        hid_type = enn.FieldType(gspace, int(hidden) * [gspace.regular_repr])
        out_type = enn.FieldType(gspace, [gspace.regular_repr])
        pad = int(kernel_size) // 2
        blocks: list = []
        current = self._in_type
        for i in range(int(layers) - 1):
            blocks.append(enn.R2Conv(current, hid_type, kernel_size, padding=pad))
            blocks.append(enn.ELU(hid_type))
            if i < self.downsample:
                blocks.append(enn.PointwiseAvgPool2D(hid_type, kernel_size=3, stride=2, padding=1))
            current = hid_type
        blocks.append(enn.R2Conv(current, out_type, kernel_size, padding=pad))
        # escnn caches the sampled filter bases in modules shared by every R2Conv with the same
        # field types, process-wide: ``.double()`` or ``.to(device)`` on one network would
        # then change the buffers of all others. A deep copy makes them private to this one.
        self.network = copy.deepcopy(enn.SequentialModule(*blocks))
        self.network.train(True)  # drop any cached expanded filters (see :meth:`train`)

    def train(self, mode: bool = True) -> DiscreteRotationCanonicalizer:
        """Set the training flag; the escnn network itself always stays in training mode.

        In eval mode escnn's convolutions cache their expanded filters as buffers, so the
        keys of a ``state_dict`` would depend on the mode and ``load_state_dict`` into a
        module in eval mode would keep stale filters. The scoring network has no dropout or
        batch norm, so keeping it in training mode changes nothing but that cache (filters
        are re-expanded at every call).
        """
        super().train(mode)
        self.network.train(True)
        return self

    # -- scoring ---------------------------------------------------------------------
    def _prepare(self, x: Tensor) -> Tensor:
        """Map ``x [B, C, H, H]`` to the odd, padded, masked grid of the scoring network."""
        if x.shape[-1] % 2 == 0:
            x = F.avg_pool2d(x, kernel_size=2, stride=1)  # H -> H - 1, centre on a pixel
        size = x.shape[-1]
        if self.mask_input:
            x = x * disc_mask(size, dtype=x.dtype, device=x.device)
        step = 2**self.downsample
        p = 0
        while (size + 2 * p - 1) % step:
            p += 1
        return F.pad(x, (p, p, p, p)) if p else x

    def scores(self, images: Tensor) -> Tensor:
        """One score per rotation, ``[B, n]``; ``scores(rot_k x)`` is ``scores(x)`` rolled by ``k``.

        Exact (to float32 rounding of escnn's filter basis) for ``k`` a multiple of
        ``n / 4``; not guaranteed for other ``k`` (see the class notes).
        """
        from escnn import nn as enn

        self._check(images)
        weight = next(self.network.parameters())
        x = self._prepare(images.to(weight.dtype))
        y = self.network(enn.GeometricTensor(x, self._in_type)).tensor  # [B, n, h, h]
        mask = disc_mask(y.shape[-1], dtype=y.dtype, device=y.device)
        return (y * mask).sum(dim=(-2, -1)) / mask.sum()

    def _check(self, images: Tensor) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"expected an image tensor [B, C, H, W]; got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W]; got {tuple(images.shape)}")
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images must be square; got {tuple(images.shape[-2:])}")
        if images.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} channels; got {images.shape[1]}")

    # -- canonicalization ------------------------------------------------------------
    def forward(self, images: Tensor) -> CanonOutput:
        """Canonicalize ``images [B, C, H, H]``.

        Returns
        -------
        CanonOutput
            ``canonical [B, C, H, H]`` (the input rotated by ``-2 pi k / n``, same dtype
            as the input), ``element`` (long ``[B]``, ``k = argmax scores``) and
            ``prior_loss`` (scalar, or ``None`` when ``prior_weight == 0``).
        """
        scores = self.scores(images) / self.temperature
        element = scores.argmax(dim=-1)
        if torch.is_grad_enabled() and scores.requires_grad:
            b = images.shape[0]
            probs = scores.softmax(dim=-1).to(images.dtype)
            # bracketed so that the forward value is exactly one-hot: (p - p.detach()) == 0
            weights = F.one_hot(element, self.n).to(images.dtype) + (probs - probs.detach())
            candidates = torch.arange(self.n, device=images.device).repeat(b)
            stacked = images.repeat_interleave(self.n, dim=0)
            posed = self.apply_inverse(stacked, candidates).view(b, self.n, *images.shape[1:])
            canonical = (weights.view(b, self.n, 1, 1, 1) * posed).sum(dim=1)
        else:
            canonical = self.apply_inverse(images, element)
        prior = None
        if self.prior_weight > 0:
            target = torch.zeros_like(element)
            prior = self.prior_weight * F.cross_entropy(scores, target)
        return CanonOutput(canonical=canonical, element=element, prior_loss=prior)
