import math

import numpy as np
import pytest
import torch
from torch import nn
from torch_geometric.data import Batch, Data

from canonwrap import CanonicalizedDiffusion
from canonwrap.canonicalizers import CenterOfMass, PCACanonicalizer, frozen
from canonwrap.samplers import AncestralSampler, DDIMSampler
from canonwrap.schedules import NoiseSchedule, PolynomialSchedule
from canonwrap.spaces import PointCloudSpace
from tests.helpers import VAR, OptimalGaussianDenoiser


def expected_bound(schedule, var):
    """E_x E_eps of the discrete-time bound, in closed form, for x ~ N(0, diag(var))."""
    g = schedule.gammas
    a2, s2 = torch.sigmoid(-g), torch.sigmoid(g)
    # E ||eps - E[eps | z_t]||^2 = sum_d (1 - s2 / (a2 var_d + s2)) (posterior variance)
    post = (1 - s2[:, None] / (a2[:, None] * var + s2[:, None])).sum(1)
    d = var.numel()
    diffusion = (0.5 * torch.expm1(g[1:] - g[:-1]) * post[1:]).sum()
    kl = d * -0.5 * torch.log(s2[-1]) + 0.5 * (d * s2[-1] + a2[-1] * var.sum()) - 0.5 * d
    recon = 0.5 * post[0] + d * (0.5 * g[0] + 0.5 * math.log(2 * math.pi))
    return (kl + diffusion + recon).item()


def test_nll_matches_closed_form_bound_for_optimal_denoiser(gen):
    sched = PolynomialSchedule(1000)
    model = CanonicalizedDiffusion(OptimalGaussianDenoiser(sched), schedule=sched)
    x = torch.randn(4000, 3, generator=gen, dtype=torch.float64) * VAR.sqrt()
    out = model.nll(x, exact=True, generator=gen)
    want = expected_bound(sched, VAR)
    # Monte Carlo error of the mean over 4000 samples is about 0.02 nats
    assert abs(out.nll.mean().item() - want) < 0.08
    assert torch.allclose(out.nll, out.kl_prior + out.diffusion + out.reconstruction + out.size)
    assert torch.all(out.dims == 3)


def test_nll_approaches_exact_likelihood_on_a_fine_schedule(gen):
    """With small steps in gamma the bound is tight: within 3 % of the exact NLL."""
    T = 2000
    gamma = torch.linspace(-13.0, 11.0, T + 1, dtype=torch.float64)
    sched = NoiseSchedule(torch.sigmoid(-gamma))
    model = CanonicalizedDiffusion(OptimalGaussianDenoiser(sched), schedule=sched)
    x = torch.randn(1500, 3, generator=gen, dtype=torch.float64) * VAR.sqrt()
    bound = model.nll(x, exact=True, generator=gen).nll.mean().item()
    exact = (0.5 * (x**2 / VAR).sum(1) + 0.5 * torch.log(2 * math.pi * VAR).sum()).mean().item()
    assert exact <= bound + 0.05  # an upper bound, up to Monte Carlo noise
    assert abs(bound - exact) / abs(exact) < 0.03


def test_nll_monte_carlo_estimate_is_unbiased(gen):
    sched = PolynomialSchedule(1000)
    model = CanonicalizedDiffusion(OptimalGaussianDenoiser(sched), schedule=sched)
    x = torch.randn(4000, 3, generator=gen, dtype=torch.float64) * VAR.sqrt()
    mc = model.nll(x, num_t_samples=4, generator=gen).nll.mean().item()
    assert abs(mc - expected_bound(sched, VAR)) < 0.25


def test_point_cloud_dimension_count_uses_zero_com_subspace():
    space = PointCloudSpace()
    data = Batch.from_data_list(
        [Data(pos=torch.randn(n, 3), x=torch.randn(n, 2)) for n in (3, 5)]
    )
    assert space.dims(data).tolist() == [(3 - 1) * 3 + 3 * 2, (5 - 1) * 3 + 5 * 2]
    assert space.loss_dims(data).tolist() == [3 * 5, 5 * 5]
    noise = space.noise(space.state(data), data, torch.Generator().manual_seed(0))
    com = torch.zeros(2, 3).index_add_(0, data.batch, noise[0])
    assert com.abs().max() < 1e-5


class PointMLP(nn.Module):
    """A plain, non-equivariant MLP on the flattened coordinates of fixed-size clouds."""

    def __init__(self, n, features=0, hidden=128):
        super().__init__()
        self.n, self.f = n, features
        d = n * (3 + features)
        self.net = nn.Sequential(
            nn.Linear(d + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, d),
        )

    def forward(self, z, t):
        parts = [z.pos.reshape(-1, self.n * 3)]
        if self.f:
            parts.append(z.x.reshape(-1, self.n * self.f))
        out = self.net(torch.cat(parts + [t[:, None]], -1)).reshape(-1, 3 + self.f)
        return out


def test_training_loss_is_algorithm_1_and_gradients_reach_canonicalizer():
    class Learned(PCACanonicalizer):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1.0))

        def forward(self, data):
            out = super().forward(data)
            out.canonical.pos = out.canonical.pos * self.scale
            return out

    from canonwrap.data.toy import rotated_shapes

    data = rotated_shapes(8, generator=torch.Generator().manual_seed(0))
    canon = Learned()
    model = CanonicalizedDiffusion(PointMLP(5), canon)
    out = model.training_loss(data, generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    assert canon.scale.grad is not None and canon.scale.grad.abs() > 0
    assert out.per_sample.shape == (8,) and out.t.min() >= 0 and out.t.max() <= 1000
    assert torch.allclose(out.loss, out.per_sample.mean())

    # recompute Algorithm 1 by hand with the same random draws
    gen = torch.Generator().manual_seed(1)
    steps = torch.randint(0, 1001, (8,), generator=gen)
    canon_pos = canon(data).canonical.pos.detach()
    eps = torch.randn(40, 3, generator=gen)
    eps = eps - eps.reshape(8, 5, 3).mean(1).repeat_interleave(5, 0)
    g = model.schedule.gammas[steps].float()
    a, s = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
    z = a.repeat_interleave(5)[:, None] * canon_pos + s.repeat_interleave(5)[:, None] * eps
    zb = data.clone()
    zb.pos = z
    with torch.no_grad():
        pred = model.denoiser(zb, steps.float() / 1000)
        pred = pred - pred.reshape(8, 5, 3).mean(1).repeat_interleave(5, 0)
    manual = ((eps - pred) ** 2).reshape(8, 15).mean(1)
    assert torch.allclose(out.per_sample.detach(), manual, atol=1e-5)


def _train(model, steps, gen, batch=64, lr=3e-3):
    from canonwrap.data.toy import rotated_shapes

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        data = rotated_shapes(batch, generator=gen)
        loss = model.training_loss(data, generator=gen).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_canonicalized_training_learns_rotation_invariant_toy_distribution():
    from canonwrap.data.toy import TETRA_SHAPE, pairwise_distances, rotated_shapes

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    space = PointCloudSpace(num_features=0)
    canon_model = CanonicalizedDiffusion(PointMLP(5), PCACanonicalizer(), space=space)
    torch.manual_seed(0)
    plain_model = CanonicalizedDiffusion(PointMLP(5), CenterOfMass(), space=space)
    canon_losses = _train(canon_model, 600, gen)
    plain_losses = _train(plain_model, 600, torch.Generator().manual_seed(0))
    first, last = np.mean(canon_losses[:50]), np.mean(canon_losses[-100:])
    assert last < 0.6 * first  # it learns
    assert last < np.mean(plain_losses[-100:])  # the canonical pose is easier to model

    samples = canon_model.sample(
        num_nodes=[5] * 200,
        sampler=AncestralSampler(200),
        generator=torch.Generator().manual_seed(3),
        randomize_pose=True,
    )
    got = pairwise_distances(samples.pos, samples.batch, 5)
    ref_data = rotated_shapes(200, generator=torch.Generator().manual_seed(4))
    ref = pairwise_distances(ref_data.pos, ref_data.batch, 5)
    # the sorted pairwise distances of samples match the shape's within the jitter scale
    assert (got.median(0).values - ref.median(0).values).abs().max() < 0.1
    assert got.shape == (200, 10)
    assert TETRA_SHAPE.shape == (5, 3)


def test_sampling_is_seeded_and_shapes_are_right():
    model = CanonicalizedDiffusion(
        PointMLP(4, features=2), PCACanonicalizer(), PolynomialSchedule(50),
        space=PointCloudSpace(num_features=2),
    )
    a = model.sample(num_nodes=[4, 4, 4], generator=torch.Generator().manual_seed(0))
    b = model.sample(num_nodes=[4, 4, 4], generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.pos, b.pos) and torch.equal(a.x, b.x)
    assert a.pos.shape == (12, 3) and a.x.shape == (12, 2) and a.num_graphs == 3
    com = torch.zeros(3, 3).index_add_(0, a.batch, a.pos)
    assert com.abs().max() < 1e-4
    c = model.sample(num_nodes=[4, 4, 4], sampler=DDIMSampler(10),
                     generator=torch.Generator().manual_seed(0), randomize_pose=True)
    assert torch.isfinite(c.pos).all()


def test_tensor_sampling_with_progress(capsys):
    class Zero(nn.Module):
        def forward(self, z, t):
            return torch.zeros_like(z)

    model = CanonicalizedDiffusion(Zero(), schedule=PolynomialSchedule(20))
    out = model.sample(5, shape=(2, 3), progress=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == (5, 2, 3)


class BadOutput(nn.Module):
    def forward(self, z, t):
        return torch.zeros(z.pos.shape[0], 2)


@pytest.mark.parametrize("case", ["nan", "shape", "empty", "denoiser", "device", "no-space"])
def test_bad_input_is_rejected_with_a_clear_message(case):
    data = Batch.from_data_list([Data(pos=torch.randn(5, 3)) for _ in range(2)])
    model = CanonicalizedDiffusion(PointMLP(5), PCACanonicalizer())
    if case == "nan":
        data.pos[0, 0] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            model.training_loss(data)
    elif case == "shape":
        with pytest.raises(ValueError, match=r"pos must be \[N, 3\]"):
            model.training_loss(Batch.from_data_list([Data(pos=torch.randn(5, 2))]))
    elif case == "empty":
        with pytest.raises(ValueError, match="empty"):
            CanonicalizedDiffusion(nn.Identity()).training_loss(torch.zeros(0, 4))
    elif case == "denoiser":
        with pytest.raises(ValueError, match="does not match"):
            CanonicalizedDiffusion(BadOutput(), PCACanonicalizer()).training_loss(data)
    elif case == "device":
        model.denoiser.to("meta")
        with pytest.raises(ValueError, match="meta"):
            model.training_loss(data)
    else:
        with pytest.raises(ValueError, match="num_features"):
            model.sample(num_nodes=[5])


def test_frozen_canonicalizer_receives_no_gradient():
    class Learned(PCACanonicalizer):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1.0))

    from canonwrap.data.toy import rotated_shapes

    canon = frozen(Learned())
    model = CanonicalizedDiffusion(PointMLP(5), canon)
    model.training_loss(rotated_shapes(4)).loss.backward()
    assert canon.inner.scale.grad is None


def _clouds(f, n=5, count=3):
    gen = torch.Generator().manual_seed(f)
    return Batch.from_data_list(
        [
            Data(pos=torch.randn(n, 3, generator=gen), x=torch.randn(n, f, generator=gen))
            for _ in range(count)
        ]
    )


def test_feature_width_comes_from_the_first_batch_and_travels_with_the_weights(tmp_path):
    def build(space=None):
        return CanonicalizedDiffusion(
            PointMLP(5, features=2, hidden=8), PCACanonicalizer(), PolynomialSchedule(10), space
        )

    model = build()
    with pytest.raises(ValueError, match=r"num_features=F"):
        model.sample(num_nodes=[5])
    model.training_loss(_clouds(2))
    assert model.point_features == 2
    out = model.sample(num_nodes=[5, 5], generator=torch.Generator().manual_seed(0))
    assert out.pos.shape == (10, 3) and out.x.shape == (10, 2)

    torch.save(model.state_dict(), tmp_path / "weights.pt")
    loaded = build()
    loaded.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    assert loaded.point_features == 2
    again = loaded.sample(num_nodes=[5, 5], generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.pos, out.pos) and torch.equal(again.x, out.x)

    with pytest.raises(ValueError, match=r"F=2 node features .*got data with F=3"):
        loaded.training_loss(_clouds(3))
    with pytest.raises(TypeError, match=r"generates point clouds \(F=2"):
        loaded.nll(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"F=2 node features, but .*num_features=3"):
        build(PointCloudSpace(num_features=3)).load_state_dict(model.state_dict())
    # weights saved before the width was part of the state still load
    older = {k: v for k, v in model.state_dict().items() if k != "_extra_state"}
    fresh = build()
    fresh.load_state_dict(older)
    assert fresh.point_features is None


def test_bare_point_clouds_record_zero_features():
    from canonwrap.data.toy import rotated_shapes

    model = CanonicalizedDiffusion(PointMLP(5, hidden=8), schedule=PolynomialSchedule(5))
    model.training_loss(rotated_shapes(3))
    assert model.point_features == 0
    out = model.sample(num_nodes=[5])
    assert out.pos.shape == (5, 3) and getattr(out, "x", None) is None


def test_randomize_pose_acts_with_compact_groups_only():
    from canonwrap.canonicalizers import CenterOfMass

    space = PointCloudSpace(num_features=0)
    kwargs = dict(num_nodes=[5, 5], generator=None)
    for canon, moved in ((CenterOfMass(), False), (PCACanonicalizer(), True)):
        model = CanonicalizedDiffusion(PointMLP(5, hidden=8), canon, PolynomialSchedule(5), space)
        kwargs["generator"] = torch.Generator().manual_seed(0)
        plain = model.sample(**kwargs)
        kwargs["generator"] = torch.Generator().manual_seed(0)
        posed = model.sample(randomize_pose=True, **kwargs)
        assert torch.equal(plain.pos, posed.pos) != moved
        for i in range(2):  # rotations keep the pairwise distances of each cloud
            a, b = plain.pos[plain.batch == i], posed.pos[posed.batch == i]
            assert torch.allclose(torch.cdist(a, a), torch.cdist(b, b), rtol=1e-4, atol=1e-4)


def test_randomize_pose_of_images_pads_with_the_background():
    """A Haar-random C_8 pose of an all-background image is all background: rotations act as
    the canonicalizer does (``UnitRange``: corners take the value ``low``), not with zeros."""
    pytest.importorskip("escnn")
    from canonwrap.images import image_diffusion

    model = image_diffusion(8, base_width=8, seed=0).double().eval()
    background = torch.full((64, 1, 12, 12), -1.0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    posed = model._posed(background, 64, True, gen, torch.float64, torch.device("cpu"))
    torch.testing.assert_close(posed, background, rtol=0, atol=1e-12)
    # negative control: the bare group action pads with zeros at 45 degree elements
    group = model.canonicalizer.group
    g = group.random(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (group.act(g, background) == 0).any()
    # and a digit-like image keeps its values inside [-1, 1], its pose changed for some samples
    img = background.clone()
    img[:, :, 3:9, 5:7] = 1.0
    turned = model._posed(img, 64, True, torch.Generator().manual_seed(1), torch.float64, "cpu")
    assert turned.min() >= -1 - 1e-12 and turned.max() <= 1 + 1e-12
    assert not torch.equal(turned, img)
