"""examples/custom_group.py: the smoke run, and its canonicalizer under the shared contract."""

import math

import torch
from torch_geometric.data import Batch, Data

from tests.canonicalizers.common import CanonicalizerContract

from .conftest import load_example

custom_group = load_example("custom_group")


def test_custom_group_smoke():
    out = custom_group.main(
        ["--train-steps", "60", "--timesteps", "100", "--sample-steps", "10", "--num-samples", "32"]
    )
    for checks in (out["contract"], out["contract_trained"]):
        for layout in ("tensor", "point_cloud"):
            assert checks[layout], layout
            assert all(v <= 1e-9 for v in checks[layout].values()), checks[layout]
    assert "permutation" in out["contract"]["point_cloud"]
    assert out["broken_rejected"], "the biased canonicalizer passed the contract check"
    assert "equivariance error" in out["broken_message"]
    assert out["final_loss"] < out["first_loss"]
    assert math.isfinite(out["distance_error"])


class TestSO2Canonicalizer(CanonicalizerContract):
    """The example's canonicalizer on 2D clouds of different sizes in one batch."""

    def make_canonicalizer(self, dtype):
        return custom_group.SO2Canonicalizer().to(dtype)

    def make_data(self, dtype, generator):
        clouds = [torch.randn(n, 2, generator=generator, dtype=torch.float64) for n in (4, 6, 9)]
        return Batch.from_data_list([Data(pos=p.to(dtype)) for p in clouds])


def test_so2_group_laws():
    group = custom_group.SO2()
    gen = torch.Generator().manual_seed(0)
    a, b = (group.random(5, generator=gen, dtype=torch.float64) for _ in range(2))
    x = torch.randn(5, 7, 2, generator=gen, dtype=torch.float64)
    both = group.act(group.compose(a, b), x)
    assert (both - group.act(a, group.act(b, x))).abs().max() < 1e-12
    ident = group.compose(a, group.inverse(a))
    assert group.distance(ident, group.identity(5, dtype=torch.float64)).max() < 1e-12
    angle = group.angle(group.compose(a, b)) - group.angle(a) - group.angle(b)
    assert torch.cos(angle).min() > 1 - 1e-12
