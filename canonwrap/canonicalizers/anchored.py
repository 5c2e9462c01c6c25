"""Keeping a learned SO(3) canonicalizer near a fixed reference frame.

A learned canonicalizer trained only through the denoising loss moves its frames a lot
early in training (tens of degrees in the first few hundred steps), so the denoiser chases
a moving pose. Two tools hold it still:

- [`distill_frames`][canonwrap.canonicalizers.anchored.distill_frames] fits the learned
  canonicalizer to a reference frame (for example principal axes) before diffusion training starts,
  so that its frames start PCA-like instead of random;
- [`Anchored`][canonwrap.canonicalizers.anchored.Anchored] adds a prior loss
  ``weight * mean_b ||R_b - R_ref,b||_F^2`` during training, which lets the frame leave the
  reference only where the denoising loss pays for it.

Both compare rotation matrices, so they are invariant to a common rotation of the data:
``||Q R - Q R_ref|| = ||R - R_ref||``. The learned canonicalizer's own equivariance is
untouched (the anchored canonicalizer returns its frame and canonical pose unchanged).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from canonwrap.canonicalizers.base import Canonicalizer, CanonOutput

__all__ = ["Anchored", "distill_frames", "frame_distance", "rotation_angle"]


def frame_distance(a: Tensor, b: Tensor) -> Tensor:
    """Squared Frobenius distance ``||a - b||_F^2`` of rotations ``[B, 3, 3]``, ``[B]``.

    Equals ``2 (3 - tr(a^T b)) = 4 (1 - cos theta)`` for the angle ``theta`` of ``a^T b``.
    """
    return (a - b).pow(2).sum((-2, -1))


def rotation_angle(a: Tensor, b: Tensor) -> Tensor:
    """Angle in degrees of the rotation ``a^T b`` per sample (``[B, 3, 3]`` each), ``[B]``."""
    cos = ((a.transpose(-1, -2) @ b).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


class Anchored(Canonicalizer):
    """A learned canonicalizer with a prior loss pulling its frames towards a reference.

    ``forward`` returns the learned canonicalizer's canonical pose and element unchanged,
    with ``prior_loss = weight * mean_b ||R_b - R_ref,b||_F^2`` (added to the learned
    canonicalizer's own prior loss, if any). The reference is evaluated without
    gradients.

    Parameters
    ----------
    learned : Canonicalizer
        A canonicalizer whose elements are rotation matrices ``[B, 3, 3]`` (for example
        [`EGNNCanonicalizer`][canonwrap.canonicalizers.EGNNCanonicalizer]).
    reference : Canonicalizer
        A fixed canonicalizer on the same group, such as
        [`PCACanonicalizer`][canonwrap.canonicalizers.PCACanonicalizer].
    weight : float
        Strength of the prior (0 disables it; the denoising loss per dimension of QM9 is
        of order 0.1 to 1, and the frame distance lies in ``[0, 8]``).
    """

    def __init__(self, learned: Canonicalizer, reference: Canonicalizer, weight: float = 0.1):
        super().__init__()
        if weight < 0:
            raise ValueError(f"Anchored: weight must be >= 0; got {weight}")
        self.learned = learned
        self.reference = reference
        self.weight = float(weight)
        self.group = learned.group

    def normalize(self, data: Any) -> Any:
        return self.learned.normalize(data)

    def forward(self, data: Any) -> CanonOutput:
        out = self.learned(data)
        prior = out.prior_loss
        if self.weight > 0:
            with torch.no_grad():
                ref = self.reference(data).element.to(out.element.dtype)
            anchor = self.weight * frame_distance(out.element, ref).mean()
            prior = anchor if prior is None else prior + anchor
        return CanonOutput(canonical=out.canonical, element=out.element, prior_loss=prior)


def distill_frames(
    learned: Canonicalizer,
    reference: Canonicalizer,
    batches: Iterable[Any],
    steps: int,
    lr: float = 1e-3,
    progress: bool = False,
    callback: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Fit ``learned``'s frames to ``reference``'s by gradient descent (in place).

    Minimises ``mean_b ||R_b - R_ref,b||_F^2`` with Adam for ``steps`` batches drawn
    from ``batches`` (cycled when it runs out). Use it to start a learned canonicalizer
    from principal-axes-like frames before diffusion training.

    Parameters
    ----------
    learned : Canonicalizer
        As in [`Anchored`][canonwrap.canonicalizers.anchored.Anchored].
    reference : Canonicalizer
        As in [`Anchored`][canonwrap.canonicalizers.anchored.Anchored].
    batches : iterable
        Point-cloud batches (e.g. a ``DataLoader`` over the training set).
    steps : int
        Number of optimisation steps.
    lr : float
        Adam learning rate.
    progress : bool
        Show a progress bar.
    callback : callable, optional
        ``callback(step, loss)`` after every step.

    Returns
    -------
    list of float
        The loss of every step.
    """
    if steps < 0:
        raise ValueError(f"distill_frames: steps must be >= 0; got {steps}")
    params = [p for p in learned.parameters() if p.requires_grad]
    if not params and steps:
        raise ValueError("distill_frames: the learned canonicalizer has no trainable parameters")
    opt = torch.optim.Adam(params, lr=lr) if params else None
    was_training = learned.training
    learned.train()
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="distil frames", unit="step")
    try:
        it = iter(batches)
        for step in range(steps):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(batches)
                batch = next(it)
            device = params[0].device
            batch = batch.to(device) if hasattr(batch, "to") else batch
            with torch.no_grad():
                ref = reference(batch).element
            rot = learned(batch).element
            loss = frame_distance(rot, ref.to(rot.dtype)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if callback is not None:
                callback(step, losses[-1])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        if bar is not None:
            bar.close()
        learned.train(was_training)
    return losses
