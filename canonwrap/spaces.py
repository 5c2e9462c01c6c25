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
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from canonwrap.groups._data import graph_index, is_point_cloud, num_samples, replace
from canonwrap.utils import check_finite, remove_mean, segment_sum

State = tuple[Tensor, ...]

__all__ = [
    "Space",
    "TensorSpace",
    "PointCloudSpace",
    "MoleculeSpace",
    "NodeCountDistribution",
    "State",
    "space_for",
]


class Space(ABC):
    """Interface shared by all data spaces (see the module docstring)."""

    @abstractmethod
    def state(self, data: Any) -> State:
        """Validate ``data`` and return its continuous state (projected to the subspace)."""

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


def _check_tensor(name: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not torch.is_floating_point(value):
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    check_finite(name, value)
    return value


class TensorSpace(Space):
    """Plain tensors ``[B, ...]`` (images, vectors); every entry is a dimension."""

    def state(self, data: Any) -> State:
        x = _check_tensor("data", data)
        if x.dim() < 2:
            raise ValueError(f"data must be batched as [B, ...]; got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("empty batch: data has batch size 0")
        return (x,)

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
        (0 for bare point clouds). Only needed to draw samples from scratch; for data it is
        read off ``x``.
    feature_key
        Attribute holding the node features.
    """

    def __init__(self, num_features: int | None = None, feature_key: str = "x") -> None:
        self.num_features = num_features
        self.feature_key = feature_key

    def _features(self, data: Any) -> Tensor | None:
        return getattr(data, self.feature_key, None)

    def state(self, data: Any) -> State:
        if not is_point_cloud(data):
            raise TypeError(
                "PointCloudSpace expects a torch_geometric Data/Batch with `pos`; got "
                f"{type(data).__name__}"
            )
        pos = _check_tensor("pos", data.pos)
        if pos.dim() != 2 or pos.shape[1] != 3:
            raise ValueError(f"pos must be [N, 3]; got {tuple(pos.shape)}")
        if pos.shape[0] == 0:
            raise ValueError("empty batch: the point cloud has no nodes")
        h = self._features(data)
        if h is None:
            h = pos.new_zeros(pos.shape[0], 0)
        else:
            h = _check_tensor(self.feature_key, h)
            if h.dim() != 2 or h.shape[0] != pos.shape[0]:
                raise ValueError(
                    f"{self.feature_key} must be [N={pos.shape[0]}, F]; got {tuple(h.shape)}"
                )
            if h.dtype != pos.dtype or h.device != pos.device:
                raise ValueError(
                    f"{self.feature_key} ({h.dtype}, {h.device}) and pos ({pos.dtype}, "
                    f"{pos.device}) must share dtype and device"
                )
            if self.num_features is not None and h.shape[1] != self.num_features:
                raise ValueError(
                    f"expected {self.num_features} node features, got {h.shape[1]}"
                )
        # after the features: a Batch of Data whose x and pos disagree in length gets a
        # batch vector as long as x, and the feature message above says what is wrong
        batch = graph_index(data)
        if batch.shape != (pos.shape[0],):
            raise ValueError(f"batch must be [N={pos.shape[0]}]; got {tuple(batch.shape)}")
        pos = remove_mean(pos, batch, self.num_samples(data))
        return (pos, h)

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

    def _counts(self, template) -> Tensor:
        return torch.bincount(graph_index(template), minlength=self.num_samples(template))

    def _num_features_of(self, template) -> int:
        h = self._features(template)
        return int(h.shape[1]) if h is not None else 0

    def dims(self, template):
        n = self._counts(template).double()
        return (n - 1) * 3 + n * self._num_features_of(template)

    def loss_dims(self, template):
        n = self._counts(template).double()
        return n * (3 + self._num_features_of(template))

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
                    f"[N={pos.shape[0]}, 3 + F={3 + f}] (position noise first, then features)"
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
    ) -> Any:
        """An all-zero batch with ``num_nodes[b]`` nodes in graph ``b``, for sampling."""
        from torch_geometric.data import Batch

        raw = torch.as_tensor(num_nodes)
        if raw.is_floating_point() and not bool((raw == raw.round()).all()):
            raise ValueError(f"num_nodes must hold integers; got {raw.flatten().tolist()}")
        counts = raw.to(torch.long).flatten()
        if counts.numel() == 0:
            raise ValueError("num_nodes is empty: nothing to sample")
        if (counts < 1).any():
            raise ValueError(f"every sample needs at least one node; got {counts.tolist()}")
        if self.num_features is None:
            raise ValueError("PointCloudSpace(num_features=...) must be set to sample from scratch")
        batch = torch.repeat_interleave(torch.arange(counts.numel()), counts).to(device)
        n = int(counts.sum())
        ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(device)
        fields = {
            "pos": torch.zeros(n, 3, dtype=dtype, device=device),
            "batch": batch,
            "ptr": ptr,
        }
        if self.num_features > 0:
            fields[self.feature_key] = torch.zeros(n, self.num_features, dtype=dtype, device=device)
        out = Batch(**fields)
        out._num_graphs = counts.numel()
        return out


def space_for(data: Any) -> Space:
    """The default space of a data object: point clouds or plain tensors."""
    return PointCloudSpace() if is_point_cloud(data) else TensorSpace()


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
        """Draw ``num_samples`` node counts, ``[num_samples]`` long."""
        idx = torch.multinomial(self.probs, num_samples, replacement=True, generator=generator)
        return self.sizes[idx]

    def log_prob(self, n: Tensor) -> Tensor:
        """``log p(N = n)`` (``-inf`` outside the support), float64 like ``n``'s shape."""
        n = torch.as_tensor(n, dtype=torch.long)
        out = torch.full(n.shape, -math.inf, dtype=torch.float64)
        ok = (n >= 0) & (n < self._log_table.numel())
        out[ok] = self._log_table[n[ok].cpu()]
        return out.to(n.device)


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
        Atomic numbers of the one-hot columns, e.g. ``(1, 6, 7, 8, 9)``.
    include_charges
        Whether the last feature column is the scaled charge.
    node_counts
        Distribution of molecule sizes (for sampling sizes and for ``-log p(N)``).
    """

    def __init__(
        self,
        atom_types: Sequence[int] = (1, 6, 7, 8, 9),
        include_charges: bool = True,
        onehot_scale: float = 4.0,
        charge_scale: float = 10.0,
        node_counts: NodeCountDistribution | None = None,
    ) -> None:
        self.atom_types = tuple(int(a) for a in atom_types)
        self.include_charges = bool(include_charges)
        self.onehot_scale = float(onehot_scale)
        self.charge_scale = float(charge_scale)
        self.node_counts = node_counts
        super().__init__(num_features=len(self.atom_types) + int(self.include_charges))

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
        b = self.num_samples(template)
        g0 = gamma0.to(pos.dtype)
        sigma0 = torch.sqrt(torch.sigmoid(g0))
        alpha0 = torch.sqrt(torch.sigmoid(-g0))
        # positions: Gaussian decoder on the zero centre-of-mass subspace
        sq = segment_sum(((eps[0] - eps_hat[0]) ** 2).sum(-1), batch, b)
        n = self._counts(template).to(pos.dtype)
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

    def size_nll(self, template: Any) -> Tensor:
        if self.node_counts is None:
            return super().size_nll(template)
        counts = self._counts(template).cpu()
        return -self.node_counts.log_prob(counts).to(graph_index(template).device)

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
        for i in range(self.num_samples(data)):
            sel = batch == i
            out.append((z_all[sel].cpu(), data.pos[sel].detach().cpu()))
        return out
