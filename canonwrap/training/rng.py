"""Global RNG states (capture, restore, preserve) and seeds derived from the data seed."""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["get_rng_state", "set_rng_state"]


def get_rng_state() -> dict[str, Any]:
    """Global RNG states of torch (CPU, CUDA), NumPy and Python, in a ``weights_only`` form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": list(py_state), "gauss_next": gauss_next},
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states captured by [`get_rng_state`][canonwrap.training.get_rng_state]."""
    torch.set_rng_state(state["torch"].cpu())
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].cpu().numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            warnings.warn(
                f"checkpoint holds CUDA RNG states for {len(cuda)} devices but "
                f"{torch.cuda.device_count()} are visible; CUDA RNG states not restored",
                stacklevel=2,
            )


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Run a block without changing the global RNG states seen afterwards."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def _derive_seed(seed: int, epoch: int, stream: int) -> int:
    """A well-mixed 63-bit seed for ``(seed, epoch, stream)``."""
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _generator(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen
