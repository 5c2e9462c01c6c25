"""Checks shared by the provided networks: the diffusion time ``t`` and the input's placement.

Every reference denoiser (GNN, EGNN, transformer, UNet) takes ``t``, the normalized time in
``[0, 1]``, one value per sample or a scalar. A time in steps (``t = 0..T``, an integer
tensor or a float such as 1000.0), a NaN or an infinity would otherwise go through the time
embedding silently. Both checks read metadata and ``B`` values only, never the data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from canonwrap.pointclouds import parameter_mismatch

__all__ = ["checked_times", "check_input_placement"]


def checked_times(
    t: Tensor | float, b: int, who: str, *, dtype: torch.dtype, device: Any
) -> Tensor:
    """``t`` as ``[B]`` floats of ``dtype`` on ``device``, after checking it.

    Parameters
    ----------
    t : Tensor or float
        Normalized times: a scalar shared by all samples, or ``B`` values (any shape with
        ``B`` entries, e.g. ``[B]`` or ``[B, 1]``).
    b : int
        Number of samples ``B``.
    who : str
        Named at the start of each message (the network's class name).
    dtype : torch.dtype
        Floating-point type of the result (the network input's).
    device
        Device of the result (the network input's).

    Returns
    -------
    Tensor
        ``[B]``.

    Raises
    ------
    TypeError
        For integer or boolean times (steps ``0..T`` where ``t / T`` is expected).
    ValueError
        For a count other than 1 or ``B``, and for NaN, infinite or out-of-range values.
    """
    given = t
    t = torch.as_tensor(given, device=device)
    if t.is_floating_point() and not isinstance(given, Tensor):  # Python floats: full precision
        t = torch.as_tensor(given, dtype=torch.float64, device=device)
    if not t.is_floating_point():
        raise TypeError(
            f"{who}: t must hold normalized times in [0, 1] as floating-point numbers; got "
            f"{t.dtype} (integer steps 0..T? pass t / T)"
        )
    t = t.reshape(-1)
    if t.numel() == 1:
        t = t.expand(b)
    if t.numel() != b:
        raise ValueError(
            f"{who}: t must be a scalar or have one value per sample (per graph) [B={b}]; "
            f"got {t.numel()} values"
        )
    bad = ~(torch.isfinite(t) & (t >= 0) & (t <= 1))
    if bool(bad.any()):
        shown = t[bad][:5].tolist()
        raise ValueError(
            f"{who}: t must be normalized times in [0, 1]; got {int(bad.sum())} value(s) "
            f"outside it, NaN or Inf, e.g. {shown} (for steps t = 0..T pass t / T)"
        )
    return t.to(dtype)


def check_input_placement(network: nn.Module, ref: Tensor, what: str, who: str) -> None:
    """Raise ``ValueError`` unless ``ref`` has the device and dtype of ``network``'s parameters.

    Parameters
    ----------
    network : nn.Module
        The network about to read ``ref``.
    ref : Tensor
        Its floating-point input (positions, images).
    what : str
        How the input is named in the message (``"z_t.pos"``, ``"x"``).
    who : str
        Named at the start of the message (the network's class name).
    """
    found: Any = parameter_mismatch(network, ref)
    if found is None:
        return
    kind, mine, theirs = found
    fix = f"network.to({mine})" if kind == "dtype" else "network.to(device)"
    raise ValueError(
        f"{who}: {what} is {'on ' if kind == 'device' else ''}{mine} but the network's "
        f"parameters are {'on ' if kind == 'device' else ''}{theirs}; convert one of them "
        f"({fix}, or the input with .to({theirs}))"
    )
