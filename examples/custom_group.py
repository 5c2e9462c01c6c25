"""A new group end to end: SO(2) on 2D point clouds, a learned canonicalizer, a diffusion model.

The script defines

- ``SO2``, a :class:`canonwrap.groups.Group` whose elements are rotation matrices
  ``[B, 2, 2]``, acting on 2D point clouds (a ``torch_geometric`` ``Batch`` with
  ``pos [N, 2]``) and on tensors ``[B, ..., 2]``;
- ``SO2Canonicalizer``, a learned :class:`canonwrap.canonicalizers.Canonicalizer`: a
  small network gives each point an invariant weight ``w_i`` (from its distance to the
  centroid and its distances to the other points), the cloud's vector is
  ``u = sum_i w_i (x_i - mean x)``, which rotates with the cloud, and the element is the
  rotation taking ``(1, 0)`` to ``u / |u|``. The canonical pose is that rotation's
  inverse applied to the centred cloud;
- ``BiasedCanonicalizer``, the same network with a bug (a constant added to ``u``), as a
  negative control that the contract check must reject.

It checks the contract with :func:`canonwrap.testing.assert_canonicalizer` in float64
(tolerance 1e-9) on both data layouts, then trains a :class:`canonwrap.CanonicalizedDiffusion`
with a plain MLP denoiser on a rotation-invariant data set (a fixed irregular hexagon,
jittered, in uniformly random orientation) and compares the sorted pairwise distances of
samples with the data's.

Data layout for the diffusion: :class:`canonwrap.PointCloudSpace` assumes 3D positions,
so the clouds are kept as dense tensors ``[B, 6, 2]`` with :class:`canonwrap.TensorSpace`.
This is the simplest correct route for clouds of a fixed size: the group acts on the last
axis, the canonicalizer centres (``normalize``), and the MLP reads the 12 numbers of a
cloud flattened. What it gives up: the noise is not projected onto the zero-mean
subspace, so the two centroid coordinates, always zero in canonical data, are diffused
like the others and the denoiser learns to return them to about zero; an NLL of this
model would count ``2 n`` dimensions instead of ``2 (n - 1)``. Clouds of varying size,
or likelihoods on the centred subspace, call for a small :class:`canonwrap.spaces.Space`
that projects as ``PointCloudSpace`` does in 3D.

Run::

    python examples/custom_group.py                      # about 30 s on one CPU thread
    python examples/custom_group.py --canonicalizer none # the same MLP without it
    python examples/custom_group.py --train-steps 60 --timesteps 100 --sample-steps 10
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from canonwrap import AncestralSampler, CanonicalizedDiffusion, PolynomialSchedule, TensorSpace
from canonwrap.canonicalizers import Canonicalizer, CanonOutput, Identity
from canonwrap.groups import Group
from canonwrap.nn import fully_connected_edges
from canonwrap.pointclouds import (
    graph_index,
    is_point_cloud,
    num_samples,
    remove_mean,
    replace,
    segment_sum,
)
from canonwrap.testing import assert_canonicalizer


# ---- the group ----------------------------------------------------------------------
def rotation_matrices(angles: Tensor) -> Tensor:
    """Counter-clockwise rotations ``[B, 2, 2]`` by ``angles [B]`` (radians)."""
    c, s = torch.cos(angles), torch.sin(angles)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


class SO2(Group):
    """Rotations of the plane; elements are rotation matrices ``[B, 2, 2]``.

    Acts on point clouds (``pos [N, 2]``; node ``i`` moved by ``g[batch[i]]``) and on
    tensors ``[B, ..., 2]``.
    """

    name = "SO(2)"

    def identity(self, batch_size, *, dtype=torch.float32, device=None):
        return torch.eye(2, dtype=dtype, device=device).expand(batch_size, 2, 2).clone()

    def random(self, batch_size, *, generator=None, dtype=torch.float32, device=None):
        # Haar measure on SO(2): a uniform angle
        angles = 2 * math.pi * torch.rand(batch_size, generator=generator, dtype=torch.float64)
        return rotation_matrices(angles).to(dtype=dtype, device=device)

    def compose(self, a, b):
        return a @ b

    def inverse(self, g):
        return g.transpose(-1, -2)

    def act(self, g, data):
        if is_point_cloud(data):
            if data.pos.dim() != 2 or data.pos.shape[-1] != 2:
                raise ValueError(f"SO(2) acts on pos [N, 2]; got {tuple(data.pos.shape)}")
            mats = g.to(data.pos.dtype)[graph_index(data)]  # [N, 2, 2]
            return replace(data, pos=torch.einsum("nij,nj->ni", mats, data.pos))
        if not isinstance(data, Tensor) or data.dim() < 2 or data.shape[-1] != 2:
            raise ValueError(
                f"SO(2) acts on point clouds or tensors [B, ..., 2]; got "
                f"{type(data).__name__} {tuple(getattr(data, 'shape', ()))}"
            )
        flat = data.reshape(data.shape[0], -1, 2)
        return torch.einsum("bij,bnj->bni", g.to(data.dtype), flat).reshape(data.shape)

    def distance(self, a, b):
        return (a - b).flatten(1).norm(dim=-1)

    @staticmethod
    def angle(g: Tensor) -> Tensor:
        """Rotation angle in ``(-pi, pi]`` of each element, ``[B]``."""
        return torch.atan2(g[:, 1, 0], g[:, 0, 0])


# ---- the canonicalizer --------------------------------------------------------------
def _nodes(data: Any) -> tuple[Tensor, Tensor, int]:
    """``(pos [N, 2], batch [N], B)`` of a point cloud or of a tensor ``[B, n, 2]``."""
    if is_point_cloud(data):
        pos, batch, b = data.pos, graph_index(data), num_samples(data)
    else:
        if not isinstance(data, Tensor) or data.dim() != 3:
            raise ValueError(f"expected a tensor [B, n, 2]; got {tuple(data.shape)}")
        pos = data.reshape(-1, 2)
        b, n = data.shape[0], data.shape[1]
        batch = torch.arange(b, device=data.device).repeat_interleave(n)
    if pos.dim() != 2 or pos.shape[-1] != 2 or pos.shape[0] == 0:
        raise ValueError(f"expected non-empty 2D positions [N, 2]; got {tuple(pos.shape)}")
    return pos, batch, b


def rotation_from_unit(e: Tensor) -> Tensor:
    """The rotation ``[[e1, -e2], [e2, e1]]`` taking ``(1, 0)`` to each unit vector ``e [B, 2]``."""
    c, s = e[:, 0], e[:, 1]
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


class SO2Canonicalizer(Canonicalizer):
    """Learned SO(2) canonicalizer for 2D point clouds (``pos [N, 2]`` or ``[B, n, 2]``).

    With centred positions ``x_i``, each point gets invariant features: radial basis
    functions of ``|x_i|`` and the mean over the other points ``j`` of radial basis
    functions of ``|x_i - x_j|``. An MLP maps them to a weight ``w_i``, and
    ``u = sum_i w_i x_i`` rotates with the cloud and does not depend on the order of the
    points. The element is ``R = [[e1, -e2], [e2, e1]]`` with ``e = u / |u|`` (so
    ``R (1, 0) = e``), and the canonical pose is ``R^T x``. ``normalize`` is centring;
    ``prior_loss`` is ``None``.

    Degenerate inputs: when ``|u| <= eps`` (a single point, or a cloud whose symmetry
    forces ``u = 0``, such as a regular polygon) the element falls back to the identity,
    which is not equivariant; no equivariant choice exists there.
    """

    def __init__(
        self, hidden: int = 32, num_rbf: int = 8, cutoff: float = 3.0, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.group = SO2()
        self.eps = float(eps)
        self.register_buffer("centres", torch.linspace(0.0, cutoff, num_rbf))
        self.width = cutoff / (num_rbf - 1)
        self.mlp = nn.Sequential(
            nn.Linear(2 * num_rbf, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 1),
        )

    def _rbf(self, d: Tensor) -> Tensor:
        return torch.exp(-(((d[:, None] - self.centres.to(d.dtype)) / self.width) ** 2))

    def normalize(self, data: Any) -> Any:
        if is_point_cloud(data):
            pos, batch, b = _nodes(data)
            return replace(data, pos=remove_mean(pos, batch, b))
        _nodes(data)  # validates the layout
        return data - data.mean(dim=1, keepdim=True)

    def vector(self, data: Any) -> Tensor:
        """The pooled equivariant vector ``u [B, 2]`` of each cloud (centred inside)."""
        pos, batch, b = _nodes(data)
        x = remove_mean(pos, batch, b)
        i, j = fully_connected_edges(batch)
        # sqrt of a clamped square: finite gradients even for coincident points
        dist = (x[i] - x[j]).pow(2).sum(-1).clamp_min(1e-12).sqrt()
        neighbours = torch.bincount(i, minlength=x.shape[0]).clamp_min(1).to(x.dtype)
        pair = segment_sum(self._rbf(dist), i, x.shape[0]) / neighbours[:, None]
        radius = x.pow(2).sum(-1).clamp_min(1e-12).sqrt()
        w = self.mlp(torch.cat([self._rbf(radius), pair], -1))  # [N, 1]
        return segment_sum(w * x, batch, b)

    def frame(self, u: Tensor) -> Tensor:
        """Rotation ``[B, 2, 2]`` taking ``(1, 0)`` to ``u / |u|``; identity if ``|u| <= eps``."""
        sq = u.pow(2).sum(-1, keepdim=True)
        fallback = torch.tensor([1.0, 0.0], dtype=u.dtype, device=u.device).expand_as(u)
        e = torch.where(sq > self.eps**2, u / sq.clamp_min(self.eps**2).sqrt(), fallback)
        return rotation_from_unit(e)

    def forward(self, data: Any) -> CanonOutput:
        rot = self.frame(self.vector(data))
        return CanonOutput(canonical=self.apply_inverse(data, rot), element=rot)


class BiasedCanonicalizer(SO2Canonicalizer):
    """Negative control: a constant added to the pooled vector (a bias on an equivariant output)."""

    def vector(self, data: Any) -> Tensor:
        return super().vector(data) + 0.1


# ---- data ---------------------------------------------------------------------------
#: an irregular hexagon: distinct distances to the centroid, no rotational symmetry
HEXAGON = torch.tensor(
    [[1.2, 0.0], [0.5, 0.9], [-0.6, 1.1], [-1.3, 0.1], [-0.4, -0.8], [0.7, -0.7]],
    dtype=torch.float64,
)


def rotated_hexagons(
    num: int,
    noise: float = 0.05,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``num`` jittered, centred copies of ``HEXAGON`` in random orientation, ``[num, 6, 2]``."""
    pts = HEXAGON + noise * torch.randn(num, 6, 2, generator=generator, dtype=torch.float64)
    pts = pts - pts.mean(1, keepdim=True)
    return SO2().act(SO2().random(num, generator=generator, dtype=torch.float64), pts).to(dtype)


def as_point_cloud(clouds: Tensor):
    """The same clouds as a ``torch_geometric`` ``Batch`` with ``pos [B * n, 2]``."""
    from torch_geometric.data import Batch, Data

    return Batch.from_data_list([Data(pos=p) for p in clouds])


def sorted_distances(clouds: Tensor) -> Tensor:
    """Sorted pairwise distances of each cloud ``[B, n, 2]``: ``[B, n (n - 1) / 2]``."""
    n = clouds.shape[1]
    d = torch.cdist(clouds.double(), clouds.double())
    iu = torch.triu_indices(n, n, 1)
    return d[:, iu[0], iu[1]].sort(-1).values


# ---- the denoiser: a plain MLP, no symmetry -----------------------------------------
class MLPDenoiser(nn.Module):
    """Predicts the noise of ``z [B, n, 2]`` from the flattened coordinates and the time."""

    def __init__(self, num_points: int = 6, hidden: int = 256, frequencies: int = 8) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.pi * 2.0 ** torch.arange(frequencies))
        d = 2 * num_points
        self.net = nn.Sequential(
            nn.Linear(d + 2 * frequencies, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, d),
        )

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        arg = t[:, None] * self.freqs.to(z.dtype)
        h = torch.cat([z.flatten(1), torch.sin(arg), torch.cos(arg)], -1)
        return self.net(h).view_as(z)


# ---- the checks and the run ---------------------------------------------------------
def check_contract(canon: Canonicalizer, generator: torch.Generator) -> dict[str, dict]:
    """assert_canonicalizer in float64 (tolerance 1e-9) on tensors and on point clouds."""
    canon = copy.deepcopy(canon).double().eval()
    clouds = rotated_hexagons(8, generator=generator, dtype=torch.float64)
    return {
        "tensor": assert_canonicalizer(canon, clouds, atol=1e-9, generator=generator),
        "point_cloud": assert_canonicalizer(
            canon, as_point_cloud(clouds), atol=1e-9, generator=generator
        ),
    }


def _fmt(errors: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1e}" for k, v in errors.items())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--train-steps", type=int, default=2000, help="training steps (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    parser.add_argument(
        "--timesteps", type=int, default=1000, help="diffusion steps T (default: 1000)"
    )
    parser.add_argument(
        "--sample-steps", type=int, default=200, help="ancestral sampling steps (default: 200)"
    )
    parser.add_argument("--num-samples", type=int, default=500, help="samples drawn (default: 500)")
    parser.add_argument(
        "--canonicalizer",
        choices=["learned", "none"],
        default="learned",
        help="learned: the SO(2) canonicalizer; none: the MLP sees the data in random "
        "orientation (default: learned)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of everything (default: 0)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    canon = SO2Canonicalizer()

    # 1. the contract, before training
    contract = check_contract(canon, gen)
    for layout, errors in contract.items():
        print(f"contract ({layout}, float64): {_fmt(errors)}")
    try:
        check_contract(BiasedCanonicalizer(), gen)
        broken = None
    except AssertionError as err:
        broken = str(err)
    print(f"negative control: {'rejected: ' + broken if broken else 'NOT rejected'}")

    # 2. training behind the canonicalizer
    behind = canon if args.canonicalizer == "learned" else Identity(SO2())
    model = CanonicalizedDiffusion(
        MLPDenoiser(), behind, schedule=PolynomialSchedule(args.timesteps), space=TensorSpace()
    )
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    start, losses = time.time(), []
    window = max(1, min(50, args.train_steps // 4))
    for step in range(1, args.train_steps + 1):
        out = model.training_loss(rotated_hexagons(args.batch_size, generator=gen), generator=gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        if step % max(1, args.train_steps // 8) == 0 or step == args.train_steps:
            recent = sum(losses[-window:]) / len(losses[-window:])
            print(f"step {step:5d}  loss {recent:.4f}  ({time.time() - start:.0f} s)")

    # 3. the contract still holds after training (it is built into the architecture)
    trained = check_contract(canon, gen)
    print(f"contract after training (tensor): {_fmt(trained['tensor'])}")

    # 4. samples against data
    model.eval()
    samples = model.sample(
        args.num_samples,
        shape=(6, 2),
        sampler=AncestralSampler(args.sample_steps),
        generator=gen,
        randomize_pose=True,
    )
    d_samples = sorted_distances(samples)
    d_data = sorted_distances(rotated_hexagons(args.num_samples, generator=gen))
    got, want = d_samples.median(0).values, d_data.median(0).values
    err = (got - want).abs().max().item()
    print("median sorted pairwise distances, samples:", [round(v, 2) for v in got.tolist()])
    print("median sorted pairwise distances, data:   ", [round(v, 2) for v in want.tolist()])
    print(f"largest difference: {err:.3f}")
    # per cloud: largest deviation from the noiseless hexagon's distances
    exact = sorted_distances(HEXAGON[None])
    dev_s = (d_samples - exact).abs().amax(-1).median().item()
    dev_d = (d_data - exact).abs().amax(-1).median().item()
    print(f"median deviation from the hexagon: samples {dev_s:.3f}, data {dev_d:.3f}")
    return {
        "contract": contract,
        "contract_trained": trained,
        "broken_rejected": broken is not None,
        "broken_message": broken,
        "first_loss": sum(losses[:window]) / window,
        "final_loss": sum(losses[-window:]) / window,
        "distance_error": err,
        "shape_deviation": {"samples": dev_s, "data": dev_d},
    }


if __name__ == "__main__":
    main()
