"""How noise, norms and dimension counts work for each kind of data.

A *space* turns user data into a *state*: a tuple of float tensors holding the continuous
variables the diffusion acts on, and back. It also knows how to draw noise in the right
subspace, how to sum over the entries of one sample, and how many dimensions one sample
has (which enters the likelihood).

- [`TensorSpace`][canonwrap.spaces.TensorSpace]: plain tensors ``[B, ...]``; the state is ``(x,)``.
- [`PointCloudSpace`][canonwrap.spaces.PointCloudSpace]: ``torch_geometric`` batches with
``pos [N, 3]`` and optional
  node features ``x [N, F]``; the state is ``(pos, h)``. Positions live in the zero centre
  of mass subspace of each graph (dimension ``(n - 1) * 3``), features are unconstrained.

Molecules (EDM's discretized atom types and charges) are a point-cloud space defined in
[`canonwrap.molecules`][canonwrap.molecules] ([`MoleculeSpace`][canonwrap.molecules.MoleculeSpace]).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from canonwrap.pointclouds import (
    check_point_cloud,
    check_tensor,
    graph_index,
    is_point_cloud,
    nodes_per_graph,
    num_samples,
    remove_mean,
    replace,
    segment_sum,
)

if TYPE_CHECKING:
    from canonwrap.molecules import NodeCountDistribution

State = tuple[Tensor, ...]

__all__ = [
    "Space",
    "TensorSpace",
    "PointCloudSpace",
    "State",
    "space_for",
]


class Space(ABC):
    """Interface shared by all data spaces (see the module docstring)."""

    def check(self, data: Any) -> None:
        """Raise ``TypeError``/``ValueError`` with a clear message unless ``data`` fits.

        Called once per call of ``training_loss``, ``nll``; the default converts the data
        with [`state`][canonwrap.spaces.Space.state].
        """
        self.state(data)

    @abstractmethod
    def state(self, data: Any) -> State:
        """The continuous state of (checked) ``data``, projected to the subspace."""

    @abstractmethod
    def to_data(self, state: State, template: Any) -> Any:
        """Data in the user's layout holding ``state`` (``template`` gives the structure)."""

    @abstractmethod
    def num_samples(self, template: Any) -> int:
        """Number of samples ``B`` in a batch."""

    @abstractmethod
    def expand(self, per_sample: Tensor, state: State, template: Any) -> State:
        """Broadcast per-sample scalars ``[B]`` to each component of ``state``."""

    @abstractmethod
    def project(self, state: State, template: Any) -> State:
        """Project a state (or a noise) onto the subspace the data lives in."""

    @abstractmethod
    def sum_per_sample(self, state: State, template: Any) -> Tensor:
        """Sum of all entries of each sample, ``[B]``."""

    @abstractmethod
    def dims(self, template: Any) -> Tensor:
        """Dimension of each sample's subspace, float64 ``[B]`` (used in the likelihood)."""

    @abstractmethod
    def loss_dims(self, template: Any) -> Tensor:
        """Number of entries averaged over in the training loss, ``[B]``."""

    @abstractmethod
    def parse_output(self, output: Any, state: State, template: Any) -> State:
        """Check a denoiser's output against ``state`` and return it as a state."""

    def noise(self, state: State, template: Any, generator: torch.Generator | None) -> State:
        """Standard Gaussian noise in the data's subspace, shaped like ``state``."""
        raw = tuple(
            torch.randn(s.shape, generator=generator, dtype=s.dtype, device=s.device)
            if generator is None or generator.device == s.device
            else torch.randn(s.shape, generator=generator, dtype=s.dtype).to(s.device)
            for s in state
        )
        return self.project(raw, template)

    def reconstruction_nll(
        self, state: State, eps: State, eps_hat: State, gamma0: Tensor, template: Any
    ) -> Tensor:
        """``-log p(x | z_0)`` per sample for a Gaussian decoder, ``[B]`` nats.

        ``p(x | z_0) = N(x; (z_0 - sigma_0 eps_hat) / alpha_0, (sigma_0 / alpha_0)^2)`` on the
        data subspace, which reduces to ``0.5 ||eps - eps_hat||^2 + d (log(sigma_0/alpha_0) +
        0.5 log 2 pi)``, ``d`` the subspace dimension. ``gamma0`` is ``[B]``.
        Spaces with discrete parts (molecules) override this.
        """
        sq = self.sum_per_sample(tuple((a - b) ** 2 for a, b in zip(eps, eps_hat)), template)
        d = self.dims(template).to(sq)
        log_sigma = 0.5 * gamma0.to(sq)  # log(sigma_0 / alpha_0)
        return 0.5 * sq + d * (log_sigma + 0.5 * math.log(2 * math.pi))

    def size_nll(self, template: Any) -> Tensor:
        """``-log p(size)`` per sample (molecules: number of atoms); zero by default."""
        return torch.zeros(self.num_samples(template), dtype=torch.float64)


class TensorSpace(Space):
    """Plain tensors ``[B, ...]`` (images, vectors); every entry is a dimension."""

    def check(self, data: Any) -> None:
        x = check_tensor("data", data)
        if x.dim() < 2:
            raise ValueError(f"data must be batched as [B, ...]; got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("empty batch: data has batch size 0")

    def state(self, data: Any) -> State:
        return (data,)

    def to_data(self, state, template):
        return state[0]

    def num_samples(self, template):
        return int(template.shape[0])

    def expand(self, per_sample, state, template):
        x = state[0]
        return (per_sample.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1)),)

    def project(self, state, template):
        return state

    def sum_per_sample(self, state, template):
        return state[0].flatten(1).sum(1)

    def dims(self, template):
        n = math.prod(template.shape[1:])
        return torch.full((template.shape[0],), float(n), dtype=torch.float64)

    def loss_dims(self, template):
        return self.dims(template)

    def parse_output(self, output, state, template):
        if isinstance(output, (tuple, list)) and len(output) == 1:
            output = output[0]
        if not isinstance(output, Tensor):
            raise TypeError(f"denoiser must return a tensor, got {type(output).__name__}")
        if output.shape != state[0].shape:
            raise ValueError(
                f"denoiser output shape {tuple(output.shape)} does not match the data shape "
                f"{tuple(state[0].shape)}"
            )
        return (output,)

    def template(self, shape: Sequence[int], dtype=torch.float32, device=None) -> Tensor:
        """An empty batch of the given shape, for sampling."""
        return torch.zeros(tuple(shape), dtype=dtype, device=device)


class PointCloudSpace(Space):
    """Point clouds: zero centre-of-mass positions ``pos [N, 3]`` and features ``x [N, F]``.

    Parameters
    ----------
    num_features
        ``F``, the number of continuous node features diffused with the positions
        (0 for bare point clouds). When given, data must have it; when not, it is read off
        the data (and [`CanonicalizedDiffusion`][canonwrap.diffusion.CanonicalizedDiffusion] keeps
        the width of its first training batch for sampling).
    feature_key
        Attribute holding the node features.
    node_counts
        Distribution of the number of nodes (e.g.
        [`NodeCountDistribution`][canonwrap.molecules.NodeCountDistribution]): sampling draws sizes
        from it, and the likelihood adds ``-log p(N)``. ``None``: sizes are given when sampling and
        the likelihood has no size term.
    """

    def __init__(
        self,
        num_features: int | None = None,
        feature_key: str = "x",
        node_counts: NodeCountDistribution | None = None,
    ) -> None:
        self.num_features = num_features
        self.feature_key = feature_key
        self.node_counts = node_counts

    def _features(self, data: Any) -> Tensor | None:
        return getattr(data, self.feature_key, None)

    def check(self, data: Any) -> None:
        check_point_cloud(
            data,
            type(self).__name__,
            feature_key=self.feature_key,
            num_features=self.num_features,
        )

    def state(self, data: Any) -> State:
        pos = data.pos
        h = self._features(data)
        if h is None:
            h = pos.new_zeros(pos.shape[0], 0)
        return (remove_mean(pos, graph_index(data), num_samples(data)), h)

    def to_data(self, state, template):
        fields = {"pos": state[0]}
        if state[1].shape[1] > 0 or self._features(template) is not None:
            fields[self.feature_key] = state[1]
        return replace(template, **fields)

    def num_samples(self, template):
        return num_samples(template)

    def expand(self, per_sample, state, template):
        per_node = per_sample.to(state[0].dtype)[graph_index(template)].unsqueeze(-1)
        return tuple(per_node for _ in state)

    def project(self, state, template):
        batch = graph_index(template)
        return (remove_mean(state[0], batch, self.num_samples(template)),) + tuple(state[1:])

    def sum_per_sample(self, state, template):
        per_node = sum(s.sum(-1) for s in state)
        return segment_sum(per_node, graph_index(template), self.num_samples(template))

    def _num_features_of(self, template) -> int:
        h = self._features(template)
        return int(h.shape[1]) if h is not None else 0

    def dims(self, template):
        n = nodes_per_graph(template).double()
        return (n - 1) * 3 + n * self._num_features_of(template)

    def loss_dims(self, template):
        n = nodes_per_graph(template).double()
        return n * (3 + self._num_features_of(template))

    def size_nll(self, template):
        if self.node_counts is None:
            return super().size_nll(template)
        counts = nodes_per_graph(template)
        return -self.node_counts.log_prob(counts.cpu()).to(counts.device)

    def parse_output(self, output, state, template):
        pos, h = state
        f = h.shape[1]
        if isinstance(output, (tuple, list)):
            if len(output) != 2:
                raise ValueError(
                    f"denoiser returned {len(output)} tensors; expected (eps_pos, eps_x)"
                )
            eps_pos, eps_h = output
            if eps_h is None:
                eps_h = h.new_zeros(h.shape)
        elif isinstance(output, Tensor):
            if output.shape != (pos.shape[0], 3 + f):
                raise ValueError(
                    f"denoiser output shape {tuple(output.shape)} does not match the expected "
                    f"[N, 3 + F] = [{pos.shape[0]}, {3 + f}] with F={f} node features "
                    "(position noise first, then features)"
                )
            eps_pos, eps_h = output[:, :3], output[:, 3:]
        else:
            raise TypeError(
                f"denoiser must return a tensor or a pair, got {type(output).__name__}"
            )
        if eps_pos.shape != pos.shape or eps_h.shape != h.shape:
            raise ValueError(
                f"denoiser output shapes {tuple(eps_pos.shape)}, {tuple(eps_h.shape)} do not "
                f"match pos {tuple(pos.shape)} and features {tuple(h.shape)}"
            )
        return self.project((eps_pos, eps_h), template)

    def template(
        self,
        num_nodes: Sequence[int] | Tensor,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
        num_features: int | None = None,
    ) -> Any:
        """An all-zero batch with ``num_nodes[b]`` nodes in graph ``b``, for sampling.

        ``num_features`` gives ``F`` when the space leaves it open (``num_features=None``).
        """
        from torch_geometric.data import Batch

        raw = torch.as_tensor(num_nodes)
        if raw.is_floating_point() and not bool((raw == raw.round()).all()):
            raise ValueError(f"num_nodes must hold integers; got {raw.flatten().tolist()}")
        counts = raw.to(torch.long).flatten()
        if counts.numel() == 0:
            raise ValueError("num_nodes is empty: nothing to sample")
        if (counts < 1).any():
            raise ValueError(f"every sample needs at least one node; got {counts.tolist()}")
        width = self.num_features if self.num_features is not None else num_features
        if width is None:
            raise ValueError(
                f"the number of node features F is unknown: give {type(self).__name__}"
                "(num_features=F) to sample from scratch"
            )
        batch = torch.repeat_interleave(torch.arange(counts.numel()), counts).to(device)
        n = int(counts.sum())
        ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(device)
        fields = {
            "pos": torch.zeros(n, 3, dtype=dtype, device=device),
            "batch": batch,
            "ptr": ptr,
        }
        if width > 0:
            fields[self.feature_key] = torch.zeros(n, width, dtype=dtype, device=device)
        out = Batch(**fields)
        out._num_graphs = counts.numel()
        return out


def space_for(data: Any) -> Space:
    """The default space of a data object: point clouds or plain tensors."""
    return PointCloudSpace() if is_point_cloud(data) else TensorSpace()
