"""Molecules: EDM's molecule space, molecule sizes, and the QM9 atom types and scales.

Everything specific to molecules lives here, each constant defined once:

- [`QM9_ATOM_TYPES`][canonwrap.molecules.QM9_ATOM_TYPES],
[`QM9_HEAVY_ATOM_TYPES`][canonwrap.molecules.QM9_HEAVY_ATOM_TYPES]: atomic numbers of the one-hot
  columns (with and without hydrogens);
- [`ONE_HOT_SCALE`][canonwrap.molecules.ONE_HOT_SCALE],
[`CHARGE_SCALE`][canonwrap.molecules.CHARGE_SCALE]: EDM's feature normalisation
  ``x = [one_hot / 4, charge / 10]``;
- [`NodeCountDistribution`][canonwrap.molecules.NodeCountDistribution]: the distribution of molecule
sizes;
- [`MoleculeSpace`][canonwrap.molecules.MoleculeSpace]: a
[`PointCloudSpace`][canonwrap.spaces.PointCloudSpace] with EDM's
  discretized likelihood of atom types and charges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from canonwrap.pointclouds import graph_index, nodes_per_graph, num_samples, segment_sum
from canonwrap.spaces import PointCloudSpace

__all__ = [
    "QM9_ATOM_TYPES",
    "QM9_HEAVY_ATOM_TYPES",
    "ONE_HOT_SCALE",
    "CHARGE_SCALE",
    "NodeCountDistribution",
    "MoleculeSpace",
]

QM9_ATOM_TYPES: tuple[int, ...] = (1, 6, 7, 8, 9)
"""Atomic numbers present in QM9, in the order of the one-hot encoding (H, C, N, O, F)."""
QM9_HEAVY_ATOM_TYPES: tuple[int, ...] = (6, 7, 8, 9)
"""Atomic numbers of the one-hot encoding when hydrogens are removed (C, N, O, F)."""
ONE_HOT_SCALE: float = 4.0
"""EDM's normalisation of the one-hot block: features hold ``one_hot / ONE_HOT_SCALE``."""
CHARGE_SCALE: float = 10.0
"""EDM's normalisation of the charge (atomic number) column: ``charge / CHARGE_SCALE``."""


class NodeCountDistribution:
    """Categorical distribution of the number of nodes, from a histogram ``{n: count}``.

    Used to draw molecule sizes for sampling and for the ``-log p(N)`` term of the NLL.
    """

    def __init__(self, histogram: dict[int, int]) -> None:
        if not histogram:
            raise ValueError("the node-count histogram is empty")
        sizes = sorted(int(k) for k in histogram)
        if sizes[0] < 1:
            raise ValueError("node counts must be >= 1")
        counts = torch.tensor([float(histogram[k]) for k in sizes], dtype=torch.float64)
        if (counts < 0).any() or counts.sum() <= 0:
            raise ValueError("histogram counts must be non-negative with a positive total")
        self.sizes = torch.tensor(sizes, dtype=torch.long)
        self.probs = counts / counts.sum()
        self._log_table = torch.full((sizes[-1] + 1,), -math.inf, dtype=torch.float64)
        self._log_table[self.sizes] = torch.log(self.probs)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``num_samples`` node counts, ``[num_samples]`` long (on the CPU).

        ``generator`` may live on any device; the draw runs there.
        """
        probs = self.probs if generator is None else self.probs.to(generator.device)
        idx = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
        return self.sizes[idx.cpu()]

    def log_prob(self, n: Tensor) -> Tensor:
        """``log p(N = n)`` (``-inf`` outside the support), float64 like ``n``'s shape."""
        n = torch.as_tensor(n, dtype=torch.long)
        cpu = n.cpu()
        out = torch.full(cpu.shape, -math.inf, dtype=torch.float64)
        ok = (cpu >= 0) & (cpu < self._log_table.numel())
        out[ok] = self._log_table[cpu[ok]]
        return out.to(n.device)

    def check_support(self, n: Tensor, who: str = "NodeCountDistribution") -> None:
        """Raise ``ValueError`` naming the samples whose node count has probability zero.

        Parameters
        ----------
        n : Tensor
            Node count of each sample, ``[B]``.
        who : str
            Named at the start of the message (the caller, e.g. ``"nll"``).
        """
        counts = torch.as_tensor(n, dtype=torch.long).cpu().reshape(-1)
        bad = torch.isinf(self.log_prob(counts))
        if not bool(bad.any()):
            return
        idx = bad.nonzero().flatten()
        shown = ", ".join(f"sample {int(i)}: {int(counts[i])} nodes" for i in idx[:5])
        more = f" and {idx.numel() - 5} more" if idx.numel() > 5 else ""
        support = _ranges(self.sizes[self.probs > 0].tolist())
        raise ValueError(
            f"{who}: {idx.numel()} sample(s) have a size outside the node-count histogram "
            f"({shown}{more}); the histogram gives sizes {support} a positive probability, so "
            "-log p(N) of these would be infinite. Evaluate sizes the histogram covers, or "
            "build the space's node_counts from a histogram that includes them"
        )


def _ranges(values: list[int]) -> str:
    """``1-3, 5, 7-9`` for sorted integers."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def _log_gaussian_bin(centre: Tensor, sigma: Tensor) -> Tensor:
    """``log P(|c + sigma Z| < 0.5)``-type bin mass: ``log(Phi((c+.5)/s) - Phi((c-.5)/s))``."""
    upper = torch.special.ndtr((centre + 0.5) / sigma)
    lower = torch.special.ndtr((centre - 0.5) / sigma)
    return torch.log(upper - lower + 1e-10)


class MoleculeSpace(PointCloudSpace):
    """Molecules as in EDM: positions, one-hot atom types and integer charges.

    Node features ``x = [one_hot / onehot_scale, charge / charge_scale]`` (QM9:
    ``onehot_scale=4``, ``charge_scale=10``) are diffused as continuous variables. At
    ``t = 0`` the decoder is EDM's discretized likelihood: each one-hot entry gets the
    Gaussian mass of the unit bin around 1 (normalized over types), the charge the mass of
    the unit bin around its integer value, both with standard deviation
    ``sigma_0 * scale``; positions keep the Gaussian decoder. ``-log p(N)`` comes from
    ``node_counts``. The likelihood needs the one-hot block of the data to be exactly
    one-hot (after multiplying by ``onehot_scale``); other features raise ``ValueError``.

    Parameters
    ----------
    atom_types
        Atomic numbers of the one-hot columns (default
        [`QM9_ATOM_TYPES`][canonwrap.molecules.QM9_ATOM_TYPES]).
    include_charges
        Whether the last feature column is the scaled charge.
    onehot_scale
        The one-hot block of the features is ``one_hot / onehot_scale`` (default
        [`ONE_HOT_SCALE`][canonwrap.molecules.ONE_HOT_SCALE]).
    charge_scale
        The charge column is ``charge / charge_scale`` (default
        [`CHARGE_SCALE`][canonwrap.molecules.CHARGE_SCALE]).
    node_counts
        Distribution of molecule sizes (for sampling sizes and for ``-log p(N)``).
    """

    def __init__(
        self,
        atom_types: Sequence[int] = QM9_ATOM_TYPES,
        include_charges: bool = True,
        onehot_scale: float = ONE_HOT_SCALE,
        charge_scale: float = CHARGE_SCALE,
        node_counts: NodeCountDistribution | None = None,
    ) -> None:
        self.atom_types = tuple(int(a) for a in atom_types)
        self.include_charges = bool(include_charges)
        self.onehot_scale = float(onehot_scale)
        self.charge_scale = float(charge_scale)
        super().__init__(
            num_features=len(self.atom_types) + int(self.include_charges),
            node_counts=node_counts,
        )

    def _check_one_hot(self, h: Tensor) -> None:
        """Raise ``ValueError`` unless ``h[:, :k] * onehot_scale`` is one-hot in every row."""
        k = len(self.atom_types)
        scaled = h[:, :k].detach() * self.onehot_scale
        binary = ((scaled - scaled.round()).abs() <= 1e-3) & (
            (scaled.round() == 0) | (scaled.round() == 1)
        )
        ok = binary.all(-1) & (scaled.round().sum(-1) == 1)
        if not bool(ok.all()):
            row = int((~ok).nonzero()[0, 0])
            raise ValueError(
                f"the first {k} feature columns of {int((~ok).sum())} node(s) are not one-hot "
                f"atom types divided by onehot_scale={self.onehot_scale:g} (node {row}: "
                f"{scaled[row].tolist()} after multiplying by it); the discretized likelihood "
                "of MoleculeSpace needs x = [one_hot / onehot_scale, charge / charge_scale] "
                "(e.g. canonwrap.data.qm9_features)"
            )

    def reconstruction_nll(self, state, eps, eps_hat, gamma0, template):
        pos, h = state
        k = len(self.atom_types)
        self._check_one_hot(h)
        batch = graph_index(template)
        b = num_samples(template)
        g0 = gamma0.to(pos.dtype)
        sigma0 = torch.sqrt(torch.sigmoid(g0))
        alpha0 = torch.sqrt(torch.sigmoid(-g0))
        # positions: Gaussian decoder on the zero centre-of-mass subspace
        sq = segment_sum(((eps[0] - eps_hat[0]) ** 2).sum(-1), batch, b)
        n = nodes_per_graph(template).to(pos.dtype)
        dof = (n - 1) * 3
        nll_x = 0.5 * sq + dof * (0.5 * g0 + 0.5 * math.log(2 * math.pi))
        # features: z_0 itself (as EDM) rescaled to the data's units
        z_h = alpha0[batch, None] * h + sigma0[batch, None] * eps[1]
        onehot = (h[:, :k] * self.onehot_scale).round()
        est_cat = z_h[:, :k] * self.onehot_scale
        s_cat = (sigma0 * self.onehot_scale)[batch, None]
        log_cat = _log_gaussian_bin(est_cat - 1.0, s_cat)
        log_cat = log_cat - torch.logsumexp(log_cat, dim=-1, keepdim=True)
        log_p_h = (log_cat * onehot).sum(-1)
        if self.include_charges:
            charge = h[:, k] * self.charge_scale
            est_charge = z_h[:, k] * self.charge_scale
            s_int = sigma0[batch] * self.charge_scale
            log_p_h = log_p_h + _log_gaussian_bin(charge.round() - est_charge, s_int)
        nll_h = -segment_sum(log_p_h, batch, b)
        return nll_x + nll_h

    def decode(self, data: Any) -> list[tuple[Tensor, Tensor]]:
        """Molecules ``(z [n], pos [n, 3])`` from a sampled batch: atom type = argmax one-hot.

        The one-hot block of a sample is continuous; only its arg-max is used.
        """
        k = len(self.atom_types)
        h = self._features(data)
        if h is None or h.shape != (data.pos.shape[0], self.num_features):
            shape = None if h is None else tuple(h.shape)
            raise ValueError(
                f"decode needs {self.feature_key} [N={data.pos.shape[0]}, "
                f"F={self.num_features}] (one-hot scores of {self.atom_types}"
                f"{' and a charge' if self.include_charges else ''}); got {shape}"
            )
        types = torch.tensor(self.atom_types, device=data.pos.device)
        z_all = types[h[:, :k].argmax(-1)]
        batch = graph_index(data)
        out = []
        for i in range(num_samples(data)):
            sel = batch == i
            out.append((z_all[sel].cpu(), data.pos[sel].detach().cpu()))
        return out
