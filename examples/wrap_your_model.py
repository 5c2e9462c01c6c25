"""Wrap a model that knows nothing about canonwrap, train it briefly, and sample.

The model below is an ordinary message-passing network built from torch_geometric's
``GraphConv`` layers on the fully connected graph of each point cloud. It is not
rotation-equivariant. Wrapped with a canonicalizer, it learns a rotation-invariant
distribution: copies of a fixed 5-point shape in uniformly random orientation.

Run::

    python examples/wrap_your_model.py --train-steps 800
    python examples/wrap_your_model.py --canonicalizer com   # no rotation canonicalization

It prints the loss during training and compares the pairwise distances of generated
point clouds with the data's.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch_geometric.nn import GraphConv

from canonwrap import (
    AncestralSampler,
    CanonicalizedDiffusion,
    CenterOfMass,
    PCACanonicalizer,
    PointCloudSpace,
    PolynomialSchedule,
)
from canonwrap.data.toy import pairwise_distances, rotated_shapes


# ---- a user's model: plain PyTorch Geometric, no canonwrap import needed -------------
class MyGNN(nn.Module):
    """Predicts per-node noise from noisy positions, a node index embedding and time."""

    def __init__(self, num_nodes: int, hidden: int = 128, layers: int = 3) -> None:
        super().__init__()
        self.num_nodes = num_nodes
        self.embed = nn.Embedding(num_nodes, hidden)
        self.inp = nn.Linear(3 + 1, hidden)
        self.convs = nn.ModuleList(GraphConv(hidden, hidden) for _ in range(layers))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 3))

    def forward(self, data, t):
        pos, batch = data.pos, data.batch
        same = batch[:, None] == batch[None, :]
        same.fill_diagonal_(False)
        edge_index = same.nonzero().T  # fully connected within each cloud
        index = torch.arange(pos.shape[0], device=pos.device) - data.ptr[batch]
        h = self.inp(torch.cat([pos, t[batch, None]], -1)) + self.embed(index)
        for conv in self.convs:
            h = h + torch.nn.functional.silu(conv(h, edge_index))
        return self.out(h)


# ---- canonwrap: a few lines ----------------------------------------------------------
def build(canonicalizer: str, timesteps: int) -> CanonicalizedDiffusion:
    canon = PCACanonicalizer() if canonicalizer == "pca" else CenterOfMass()
    return CanonicalizedDiffusion(
        MyGNN(num_nodes=5),
        canon,
        schedule=PolynomialSchedule(timesteps),
        space=PointCloudSpace(num_features=0),
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--train-steps", type=int, default=800, help="training steps (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="point clouds per batch (default: %(default)s)"
    )
    parser.add_argument(
        "--canonicalizer",
        choices=["pca", "com"],
        default="pca",
        help="pca: rotation and translation (PCA frame); com: centring only (default: %(default)s)",
    )
    parser.add_argument(
        "--timesteps", type=int, default=1000, help="diffusion steps T (default: %(default)s)"
    )
    parser.add_argument(
        "--sample-steps",
        type=int,
        default=200,
        help="ancestral sampling steps (default: %(default)s)",
    )
    parser.add_argument(
        "--num-samples", type=int, default=200, help="point clouds sampled (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of weights, data and noise (default: %(default)s)"
    )
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = build(args.canonicalizer, args.timesteps)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    start, losses = time.time(), []
    for step in range(1, args.train_steps + 1):
        batch = rotated_shapes(args.batch_size, generator=gen)
        out = model.training_loss(batch, generator=gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        if step % max(1, args.train_steps // 8) == 0 or step == args.train_steps:
            recent = sum(losses[-50:]) / len(losses[-50:])
            print(f"step {step:5d}  loss {recent:.4f}  ({time.time() - start:.0f} s)")

    model.eval()
    samples = model.sample(
        num_nodes=[5] * args.num_samples,
        sampler=AncestralSampler(args.sample_steps),
        generator=gen,
        randomize_pose=True,
        progress=True,
    )
    ref = rotated_shapes(args.num_samples, generator=gen)
    got = pairwise_distances(samples.pos, samples.batch, 5).median(0).values
    want = pairwise_distances(ref.pos, ref.batch, 5).median(0).values
    err = (got - want).abs().max().item()
    print("median sorted pairwise distances, samples:", [round(v, 2) for v in got.tolist()])
    print("median sorted pairwise distances, data:   ", [round(v, 2) for v in want.tolist()])
    print(f"largest difference: {err:.3f}")
    return {
        "first_loss": losses[0],
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "distance_error": err,
    }


if __name__ == "__main__":
    main()
