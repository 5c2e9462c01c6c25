"""Numerical checks of invariance and equivariance, for users and for canonwrap's own tests.

Every check draws random group elements (Haar-random where the group is compact), applies
them to the input and compares both sides, reporting the largest error found. Tolerances
depend on the dtype: about ``1e-9`` in float64 and ``1e-4`` in float32 by default.

Examples
--------
>>> import torch
>>> from canonwrap.groups import SO3
>>> from canonwrap.testing import assert_invariant
>>> x = torch.randn(4, 10, 3, dtype=torch.float64)
>>> assert_invariant(lambda p: p.norm(dim=-1), SO3(), x)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from canonwrap.groups.base import Group
from canonwrap.pointclouds import graph_index, is_point_cloud, num_samples, replace

__all__ = [
    "default_tolerance",
    "assert_invariant",
    "assert_equivariant",
    "assert_canonicalizer",
    "max_abs_difference",
    "permute_nodes",
]

_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def default_tolerance(dtype: torch.dtype) -> float:
    """Absolute tolerance used for outputs of ``dtype`` when the caller gives none."""
    return _TOLERANCE.get(dtype, 1e-4)


def _tensors(value: Any) -> dict[str, Tensor]:
    """Comparable tensors of a tensor, a point cloud, a dataclass or a tuple of them."""
    if isinstance(value, Tensor):
        return {"": value}
    if is_point_cloud(value):
        out = {"pos": value.pos}
        if getattr(value, "x", None) is not None:
            out["x"] = value.x
        return out
    if isinstance(value, (tuple, list)):
        out = {}
        for i, v in enumerate(value):
            out.update({f"[{i}]{k}": t for k, t in _tensors(v).items()})
        return out
    raise TypeError(f"cannot compare values of type {type(value).__name__}")


def max_abs_difference(a: Any, b: Any) -> float:
    """Largest absolute difference between two outputs of the same layout."""
    ta, tb = _tensors(a), _tensors(b)
    if ta.keys() != tb.keys():
        raise ValueError(f"outputs differ in structure: {sorted(ta)} vs {sorted(tb)}")
    worst = 0.0
    for key in ta:
        if ta[key].shape != tb[key].shape:
            raise AssertionError(
                f"output{key} shapes differ: {tuple(ta[key].shape)} vs {tuple(tb[key].shape)}"
            )
        if ta[key].numel():
            diff = (ta[key].double() - tb[key].double()).abs().max().item()
            worst = max(worst, diff if diff == diff else float("inf"))
    return worst


def _dtype_of(value: Any) -> torch.dtype:
    return next(iter(_tensors(value).values())).dtype


def _tol(atol: float | None, value: Any) -> float:
    return atol if atol is not None else default_tolerance(_dtype_of(value))


def _random_elements(group: Group, data: Any, generator: torch.Generator | None) -> Tensor:
    ref = data.pos if is_point_cloud(data) else data
    dtype = ref.dtype if torch.is_floating_point(ref) else torch.float64
    return group.random(num_samples(data), generator=generator, dtype=dtype, device=ref.device)


def assert_invariant(
    fn: Callable[[Any], Any],
    group: Group,
    data: Any,
    *,
    n_trials: int = 3,
    atol: float | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Check ``fn(g . x) == fn(x)`` for random ``g``; returns the largest error seen.

    Raises ``AssertionError`` naming the largest error and the tolerance on failure.
    """
    reference = fn(data)
    tol = _tol(atol, reference)
    worst = 0.0
    for _ in range(n_trials):
        g = _random_elements(group, data, generator)
        worst = max(worst, max_abs_difference(fn(group.act(g, data)), reference))
    if not worst <= tol:
        raise AssertionError(
            f"not invariant under {group.name}: largest error {worst:.3e} > tolerance {tol:.1e}"
        )
    return worst


def assert_equivariant(
    fn: Callable[[Any], Any],
    group: Group,
    data: Any,
    *,
    out_act: Callable[[Tensor, Any], Any] | None = None,
    n_trials: int = 3,
    atol: float | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Check ``fn(g . x) == g . fn(x)`` for random ``g``; returns the largest error seen.

    ``out_act(g, y)`` is how the group acts on outputs (default: ``group.act``). For
    functions that return group elements use ``out_act=group.compose``.
    """
    act_out = out_act if out_act is not None else group.act
    reference = fn(data)
    tol = _tol(atol, reference)
    worst = 0.0
    for _ in range(n_trials):
        g = _random_elements(group, data, generator)
        worst = max(worst, max_abs_difference(fn(group.act(g, data)), act_out(g, reference)))
    if not worst <= tol:
        raise AssertionError(
            f"not equivariant under {group.name}: largest error {worst:.3e} > tolerance {tol:.1e}"
        )
    return worst


def permute_nodes(data: Any, generator: torch.Generator | None = None) -> tuple[Any, Tensor]:
    """Randomly permute nodes within each graph of a point-cloud batch.

    Returns the permuted batch and ``perm`` with ``new.field[i] == old.field[perm[i]]`` for
    every node-level field. Graph membership (``batch``) is unchanged.
    """
    batch = graph_index(data)
    n = batch.shape[0]
    keys = torch.rand(n, generator=generator, dtype=torch.float64).to(batch.device)
    perm = torch.argsort(batch.double() * 2.0 + keys)  # sort by graph, random inside
    fields = {}
    for key, value in data.items() if hasattr(data, "items") else []:
        if key in ("batch", "edge_index", "ptr"):
            continue
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == n:
            fields[key] = value[perm]
    return replace(data, **fields), perm


def assert_canonicalizer(
    canonicalizer: Any,
    data: Any,
    *,
    n_trials: int = 3,
    atol: float | None = None,
    generator: torch.Generator | None = None,
    check_element: bool = True,
    check_permutation: bool = True,
) -> dict[str, float]:
    """Check a canonicalizer's contract on ``data``; returns the largest error of each check.

    Checks, each over ``n_trials`` random group elements:

    - ``invariance``: the canonical data of ``g . x`` equals that of ``x``;
    - ``equivariance`` (``check_element``): ``h(g . x) == g . h(x)`` via ``group.distance``;
    - ``reconstruction``: ``h(x) . c(x) == normalize(x)``;
    - ``permutation`` (point clouds, ``check_permutation``): permuting nodes inside each
      graph permutes the canonical nodes the same way and leaves the element unchanged.
    """
    group = canonicalizer.group
    out = canonicalizer(data)
    tol = _tol(atol, out.canonical)
    errors: dict[str, float] = {}

    recon = group.act(out.element, out.canonical)
    errors["reconstruction"] = max_abs_difference(recon, canonicalizer.normalize(data))

    inv, eqv = 0.0, 0.0
    for _ in range(n_trials):
        g = _random_elements(group, data, generator)
        moved = canonicalizer(group.act(g, data))
        inv = max(inv, max_abs_difference(moved.canonical, out.canonical))
        if check_element:
            expected = group.compose(g.to(out.element.dtype), out.element)
            eqv = max(eqv, group.distance(moved.element, expected).max().item())
    errors["invariance"] = inv
    if check_element:
        errors["equivariance"] = eqv

    if check_permutation and is_point_cloud(data):
        permuted, perm = permute_nodes(data, generator)
        moved = canonicalizer(permuted)
        errors["permutation"] = max(
            max_abs_difference(moved.canonical.pos, out.canonical.pos[perm]),
            group.distance(moved.element, out.element).max().item(),
        )

    failed = {k: v for k, v in errors.items() if not v <= tol}
    if failed:
        detail = ", ".join(f"{k} error {v:.3e}" for k, v in failed.items())
        raise AssertionError(
            f"{type(canonicalizer).__name__} breaks its contract under {group.name}: {detail} "
            f"(tolerance {tol:.1e})"
        )
    return errors
