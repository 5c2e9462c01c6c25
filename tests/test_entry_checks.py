"""Non-finite and out-of-range values are refused where they enter, naming the culprit.

Each test is a probe of issue 11 ("Non-finite values pass through"): a denoiser returning
NaN/Inf, data that overflows, bad times ``t`` into the provided networks, input dtypes that
differ from the network's, ``num_nodes`` whose fully connected graphs cannot fit in memory,
and molecule sizes outside the node-count histogram.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch_geometric.data import Batch, Data

from canonwrap import CanonicalizedDiffusion
from canonwrap.canonicalizers import CenterOfMass
from canonwrap.canonicalizers.base import CanonOutput
from canonwrap.data.qm9 import qm9_features
from canonwrap.molecules import MoleculeSpace, NodeCountDistribution
from canonwrap.nn import EGNNDenoiser, GNNDenoiser, TransformerDenoiser, UNet
from canonwrap.samplers import DDIMSampler
from canonwrap.schedules import PolynomialSchedule
from canonwrap.spaces import PointCloudSpace

torch.set_num_threads(1)


class Linear(nn.Module):
    """``eps_hat = W [z, t]`` for tensors ``[B, 4]``, optionally poisoned at one step."""

    def __init__(self, poison: float | None = None, at_step: int | None = None) -> None:
        super().__init__()
        self.net = nn.Linear(5, 4)
        self.poison, self.at_step = poison, at_step

    def forward(self, z, t):
        out = self.net(torch.cat([z, t[:, None]], -1))
        if self.poison is not None:
            hit = torch.ones_like(t, dtype=torch.bool)
            if self.at_step is not None:
                hit = (t * 5).round() == self.at_step
            out = torch.where(hit[:, None], torch.full_like(out, self.poison), out)
        return out


class PointLinear(nn.Module):
    """``eps_hat = W [pos, x]`` per node, for point clouds with ``f`` features."""

    def __init__(self, f: int = 0) -> None:
        super().__init__()
        self.net = nn.Linear(3 + f, 3 + f)

    def forward(self, z, t):
        h = z.pos if getattr(z, "x", None) is None else torch.cat([z.pos, z.x], -1)
        return self.net(h)


def clouds(scale: float = 1.0, dtype=torch.float32) -> Batch:
    g = torch.Generator().manual_seed(0)
    return Batch.from_data_list(
        [Data(pos=scale * torch.randn(5, 3, generator=g, dtype=dtype)) for _ in range(3)]
    )


def tensor_model(**kw) -> CanonicalizedDiffusion:
    torch.manual_seed(0)
    return CanonicalizedDiffusion(Linear(**kw), schedule=PolynomialSchedule(5))


# ------------------------------------------------------------------ denoiser output


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_training_loss_names_a_non_finite_denoiser_and_the_steps(value):
    data = torch.randn(6, 4)
    with pytest.raises(
        FloatingPointError,
        match=r"training_loss: the denoiser \(Linear\) returned non-finite \(NaN/Inf\) noise "
        r"predictions \(24 in values\) for sample\(s\) \[0, 1, 2, 3, 4\] \(6 in all\) at "
        r"step\(s\) t = \[\d+, \d+, \d+, \d+, \d+\] of T = 5",
    ):
        tensor_model(poison=value).training_loss(data, torch.Generator().manual_seed(0))
    # control: the same model without the poison gives a finite loss
    assert torch.isfinite(tensor_model().training_loss(data).loss)


def test_nll_names_the_step_of_a_non_finite_denoiser():
    model = tensor_model(poison=math.nan, at_step=3)
    with pytest.raises(
        FloatingPointError, match=r"nll: the denoiser \(Linear\) .* at step\(s\) t = \[3, 3\] of T"
    ):
        model.nll(torch.randn(2, 4), exact=True)
    model = tensor_model(poison=math.inf, at_step=0)  # the reconstruction term's call
    with pytest.raises(FloatingPointError, match=r"at step\(s\) t = \[0, 0\] of T = 5"):
        model.nll(torch.randn(2, 4), exact=True)
    assert torch.isfinite(tensor_model().nll(torch.randn(2, 4), exact=True).nll).all()


@pytest.mark.parametrize("step", [4, 0])
def test_sample_names_the_first_step_of_a_non_finite_denoiser(step):
    model = tensor_model(poison=math.nan, at_step=step)
    with pytest.raises(
        FloatingPointError,
        match=rf"sample: the denoiser \(Linear\) returned non-finite .*first at step t = {step} "
        r"of T = 5",
    ):
        model.sample(3, shape=(4,), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(tensor_model().sample(3, shape=(4,))).all()


def test_sample_names_the_sampler_when_finite_predictions_overflow():
    model = tensor_model(poison=3e38)  # finite, but the update divides it by alpha < 1
    with pytest.raises(FloatingPointError, match=r"finite at every step.*DDIMSampler"):
        model.sample(2, shape=(4,), sampler=DDIMSampler(5))


def test_point_cloud_denoiser_output_names_positions_or_features():
    class NaNFeatures(nn.Module):
        def forward(self, z, t):
            return torch.zeros_like(z.pos), torch.full_like(z.x, math.nan)

    g = torch.Generator().manual_seed(0)
    data = Batch.from_data_list(
        [Data(pos=torch.randn(4, 3, generator=g), x=torch.randn(4, 2, generator=g))] * 2
    )
    model = CanonicalizedDiffusion(NaNFeatures(), CenterOfMass(), PolynomialSchedule(5))
    with pytest.raises(
        FloatingPointError, match=r"\(16 in features \(x\)\) for sample\(s\) \[0, 1\]"
    ):
        model.training_loss(data)


# ------------------------------------------------------------------ canonicalizer, overflow


def test_non_finite_canonical_pose_names_the_canonicalizer():
    class Broken(CenterOfMass):
        def forward(self, data):
            out = super().forward(data)
            pos = out.canonical.pos.clone()
            pos[0, 0] = math.nan
            out.canonical.pos = pos
            return CanonOutput(out.canonical, out.element)

    model = CanonicalizedDiffusion(PointLinear(), Broken(), PolynomialSchedule(5))
    with pytest.raises(
        FloatingPointError,
        match=r"the canonicalizer \(Broken\) returned non-finite .*\d+ in positions",
    ):
        model.training_loss(clouds())
    with pytest.raises(FloatingPointError, match=r"nll: the canonicalizer \(Broken\)"):
        model.nll(clouds())


def test_positions_times_1e20_overflow_with_the_magnitude_named():
    torch.manual_seed(0)
    model = CanonicalizedDiffusion(PointLinear(), CenterOfMass(), PolynomialSchedule(5))
    with pytest.raises(
        FloatingPointError,
        match=r"training_loss: the loss is \[inf\] although the data, the canonical pose and the "
        r"denoiser's output are finite: the arithmetic overflowed; the data's largest \|value\| "
        r"is \d(\.\d+)?e\+20, and torch\.float32 overflows above 3\.4e\+38.*rescale the data",
    ):
        model.training_loss(clouds(1e20))
    with pytest.raises(FloatingPointError, match=r"nll: the prior term .* is \[inf, inf, inf\]"):
        model.nll(clouds(1e20))
    # the same positions in float64 do not overflow, and unit-scale float32 data is fine
    assert torch.isfinite(model.double().training_loss(clouds(1e20, torch.float64)).loss)
    assert torch.isfinite(model.float().training_loss(clouds()).loss)


# ------------------------------------------------------------------ data and model dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_data_dtype_other_than_the_models_is_named(dtype):
    model = CanonicalizedDiffusion(PointLinear(), CenterOfMass(), PolynomialSchedule(5))
    for method in ("training_loss", "nll"):
        with pytest.raises(
            ValueError, match=rf"data is {dtype} but the model's parameters are torch\.float32"
        ):
            getattr(model, method)(clouds(dtype=dtype))


def test_a_canonicalizer_in_another_dtype_than_the_denoiser_is_named():
    class Learned(CenterOfMass):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    model = CanonicalizedDiffusion(PointLinear(), Learned(), PolynomialSchedule(5))
    with pytest.raises(
        ValueError,
        match=r"data is torch\.float32 but the canonicalizer's parameters are "
        r"torch\.float64",
    ):
        model.training_loss(clouds())


# ------------------------------------------------------------------ the provided networks


def graph_input(dtype=torch.float32) -> Batch:
    g = torch.Generator().manual_seed(0)
    z = [6, 1, 1, 1, 1]
    return Batch.from_data_list(
        [Data(pos=torch.randn(5, 3, generator=g, dtype=dtype), x=qm9_features(z).to(dtype))] * 2
    )


NETWORKS = {
    "GNNDenoiser": lambda: GNNDenoiser(hidden=8, layers=1),
    "EGNNDenoiser": lambda: EGNNDenoiser(hidden=8, layers=1),
    "TransformerDenoiser": lambda: TransformerDenoiser(hidden=8, layers=1, heads=2),
    "UNet": lambda: UNet(base_width=8, channel_mults=(1,), num_res_blocks=1, attention=False),
}


def call(name: str, net: nn.Module, t, dtype=torch.float32):
    if name == "UNet":
        g = torch.Generator().manual_seed(0)
        return net(torch.randn(2, 1, 6, 6, generator=g, dtype=torch.float64).to(dtype), t)
    return net(graph_input(dtype), t)


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize(
    "t", [math.nan, math.inf, -math.inf, -1.0, 1000.0, 1.0 + 1e-3, -1e-6], ids=str
)
def test_networks_refuse_times_outside_the_unit_interval(name, t):
    net = NETWORKS[name]()
    with pytest.raises(ValueError, match=rf"{name}: t must be normalized times in \[0, 1\]"):
        call(name, net, torch.tensor([0.5, t]))
    with pytest.raises(ValueError, match=rf"{name}: t must be normalized times"):
        call(name, net, t)  # a scalar too


@pytest.mark.parametrize("name", list(NETWORKS))
def test_networks_refuse_integer_times_and_accept_the_end_points(name):
    net = NETWORKS[name]()
    for t in (torch.tensor([0, 1000]), torch.tensor([True, False]), 0):
        with pytest.raises(TypeError, match=rf"{name}: t must hold normalized times.*t / T"):
            call(name, net, t)
    with pytest.raises(ValueError, match=r"one value per sample \(per graph\) \[B=2\]; got 3"):
        call(name, net, torch.rand(3))
    ends = call(name, net, torch.tensor([0.0, 1.0]))
    assert torch.isfinite(ends).all()
    # t of another float dtype is converted; [B, 1] is read as [B]
    assert torch.equal(call(name, net, torch.tensor([[0.0], [1.0]], dtype=torch.float64)), ends)


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_networks_name_an_input_dtype_other_than_their_parameters(name, dtype):
    what = "x" if name == "UNet" else r"z_t\.pos"
    with pytest.raises(
        ValueError,
        match=rf"{name}: {what} is {dtype} but the network's parameters are torch\.float32; "
        rf"convert one of them \(network\.to\({dtype}\), or the input with "
        r"\.to\(torch\.float32\)\)",
    ):
        call(name, NETWORKS[name](), torch.tensor([0.2, 0.4]), dtype)


# ------------------------------------------------------------------ sample: memory estimate


def point_model(dtype=torch.float32) -> CanonicalizedDiffusion:
    space = PointCloudSpace(num_features=0)
    return CanonicalizedDiffusion(PointLinear(), CenterOfMass(), PolynomialSchedule(3), space).to(
        dtype
    )


def test_sample_refuses_graphs_beyond_the_device_memory():
    with pytest.raises(
        ValueError,
        match=r"sample: the fully connected graphs of num_nodes \(largest 100000 nodes, 1 "
        r"sample\(s\), 9,999,900,000 node pairs\) need an estimated 9685\.7 GiB \(1040 bytes per "
        r"pair: .*256-wide torch\.float32 vector\), more than the total memory of cpu "
        r"\(\d+\.\d GiB\).*max_graph_bytes=",
    ):
        point_model().sample(num_nodes=[100_000])


def test_the_probe_num_nodes_10000_is_refused_where_it_cannot_fit():
    """The probe: sample(num_nodes=[10000]) was killed by the out-of-memory killer at 24 GB."""
    from canonwrap.diffusion import _device_memory

    estimate = 10_000 * 9_999 * 1040  # 96.8 GiB
    memory = _device_memory(torch.device("cpu"))
    if memory is None or memory >= estimate:
        pytest.skip(f"this machine has {memory} bytes: the estimate of 96.8 GiB would fit")
    with pytest.raises(ValueError, match=r"need an estimated 96\.8 GiB"):
        point_model().sample(num_nodes=[10_000])


def test_sample_memory_limit_is_an_argument():
    pairs = 20 * 19 + 30 * 29  # 1250 node pairs
    model = point_model(torch.float64)  # 16 + 256 * 8 bytes per pair
    with pytest.raises(ValueError, match=r"1,250 node pairs.*more than max_graph_bytes"):
        model.sample(num_nodes=[20, 30], max_graph_bytes=pairs * 2064 - 1)
    out = model.sample(num_nodes=[20, 30], max_graph_bytes=pairs * 2064)
    assert out.pos.shape == (50, 3) and torch.isfinite(out.pos).all()
    assert model.sample(num_nodes=[4], max_graph_bytes=math.inf).pos.shape == (4, 3)


# ------------------------------------------------------------------ molecule sizes


def test_nll_names_molecule_sizes_outside_the_histogram():
    counts = NodeCountDistribution({3: 5, 4: 2, 5: 0, 6: 1, 8: 1})
    space = MoleculeSpace(node_counts=counts)

    class Zero(nn.Module):
        def forward(self, z, t):
            return torch.zeros(z.pos.shape[0], 9, dtype=z.pos.dtype)

    def molecules(*zs):
        g = torch.Generator().manual_seed(0)
        return Batch.from_data_list(
            [Data(pos=torch.randn(len(z), 3, generator=g), x=qm9_features(z)) for z in zs]
        )

    model = CanonicalizedDiffusion(Zero(), CenterOfMass(), PolynomialSchedule(5), space)
    ok = model.nll(molecules([6, 1, 1], [8, 1, 1, 1, 1, 1]))
    assert torch.isfinite(ok.nll).all()
    assert torch.allclose(ok.size, -torch.log(torch.tensor([5 / 9, 1 / 9])).float())
    with pytest.raises(
        ValueError,
        match=r"nll: 2 sample\(s\) have a size outside the node-count histogram \(sample 1: 5 "
        r"nodes, sample 2: 10 nodes\); the histogram gives sizes 3-4, 6, 8 a positive",
    ):
        model.nll(molecules([6, 1, 1], [6, 1, 1, 1, 1], [6] * 10))
