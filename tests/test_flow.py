"""CanonicalizedFlowMatching: the path, the exact likelihood against closed forms, training,
sampling and the input checks it shares with CanonicalizedDiffusion."""

import math

import pytest
import torch
from flow_matching.path import AffineProbPath
from flow_matching.path.scheduler import CosineScheduler
from torch import nn

from canonwrap import CanonicalizedFlowMatching
from canonwrap.canonicalizers import CenterOfMass, PCACanonicalizer
from canonwrap.data.toy import pairwise_distances, rotated_shapes
from canonwrap.flow import AlignedPrior
from canonwrap.molecules import MoleculeSpace, NodeCountDistribution
from canonwrap.spaces import PointCloudSpace
from tests.test_diffusion import PointMLP

torch.set_num_threads(1)


def _point_batch(sizes, features=0, scale=1.0, seed=0, dtype=torch.float64):
    """Ragged point clouds, positions Gaussian (std ``scale``) projected to zero CoM."""
    from torch_geometric.data import Batch, Data

    gen = torch.Generator().manual_seed(seed)
    graphs = []
    for n in sizes:
        pos = scale * torch.randn(n, 3, generator=gen, dtype=dtype)
        fields = {"pos": pos - pos.mean(0)}
        if features:
            fields["x"] = scale * torch.randn(n, features, generator=gen, dtype=dtype)
        graphs.append(Data(**fields))
    return Batch.from_data_list(graphs)


class GaussianVelocity(nn.Module):
    """The exact CondOT marginal velocity for data ``N(mu, s^2 I)`` and noise ``N(0, I)``.

    ``p_t = N(t mu, (t^2 s^2 + (1 - t)^2) I)``, so
    ``u_t(x) = mu + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) (x - t mu)``. The network's
    time input is ``1 - t``. Point clouds: ``mu = 0`` for positions and features.
    """

    def __init__(self, s, mu=None):
        super().__init__()
        self.s, self.mu = s, mu

    def velocity(self, z, t):
        var = t**2 * self.s**2 + (1 - t) ** 2
        mu = 0.0 if self.mu is None else self.mu
        return mu + (t * self.s**2 - (1 - t)) / var * (z - t * mu)

    def forward(self, z, t_net):
        t = 1 - t_net
        if isinstance(z, torch.Tensor):
            return self.velocity(z, t[:, None])
        t_node = t[z.batch][:, None]
        v_pos = self.velocity(z.pos, t_node)
        v_x = self.velocity(z.x, t_node) if getattr(z, "x", None) is not None else None
        return v_pos, v_x


# ---------------------------------------------------------------------- the path
def test_condot_interpolation_is_t_x1_plus_1_minus_t_x0_per_graph():
    data = _point_batch([3, 5, 4], features=2)
    model = CanonicalizedFlowMatching(nn.Identity(), space=PointCloudSpace(num_features=2))
    space = model.space
    x1 = space.state(data)
    gen = torch.Generator().manual_seed(0)
    x0 = space.noise(x1, data, gen)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    xt, dxt = model._interpolate(space, x0, x1, t, data)
    tn = t[data.batch][:, None]
    for a, b, z, v in zip(x0, x1, xt, dxt):
        assert torch.allclose(z, tn * b + (1 - tn) * a, atol=1e-14)
        assert torch.allclose(v, b - a, atol=1e-14)
    # the noise (and so x_t) stays on the zero centre-of-mass subspace of each graph
    com = torch.zeros(3, 3, dtype=torch.float64).index_add_(0, data.batch, xt[0])
    assert com.abs().max() < 1e-12
    # negative control: another schedule gives another x_t
    cosine = CanonicalizedFlowMatching(nn.Identity(), path=AffineProbPath(CosineScheduler()))
    xt_cos, _ = cosine._interpolate(space, x0, x1, t, data)
    assert (xt_cos[0] - xt[0]).abs().max() > 1e-2


# ---------------------------------------------------------------------- exact likelihood
def _gaussian_reference(x, mu, s):
    d = x.shape[1]
    return 0.5 * ((x - mu) ** 2).sum(1) / s**2 + 0.5 * d * math.log(2 * math.pi * s**2)


def test_ode_nll_matches_the_analytic_gaussian_in_float64():
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    s = 0.7
    x = mu + s * torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = _gaussian_reference(x, mu, s)
    out = CanonicalizedFlowMatching(GaussianVelocity(s, mu)).nll(x, atol=1e-10, rtol=1e-10)
    # dopri5's last step overshoots t = 0; the velocity past it is continued by its value at
    # t = 0 (the network's times are clamped to [0, 1]), a kink that costs a little accuracy
    assert (out.nll - ref).abs().max() < 1e-7
    assert torch.equal(out.dims, torch.full((6,), 3.0, dtype=torch.float64))
    assert torch.equal(out.size, torch.zeros(6, dtype=torch.float64))
    # fixed-step midpoint and Hutchinson's estimator agree to their accuracy
    mid = CanonicalizedFlowMatching(GaussianVelocity(s, mu)).nll(x, method="midpoint", steps=200)
    assert (mid.nll - ref).abs().max() < 1e-4
    torch.manual_seed(1)
    hutch = CanonicalizedFlowMatching(GaussianVelocity(s, mu)).nll(
        x, exact_divergence=False, atol=1e-9, rtol=1e-9
    )
    assert (hutch.nll - ref).abs().max() < 1e-6
    # negative control: the velocity of another Gaussian gives a clearly different value
    wrong = CanonicalizedFlowMatching(GaussianVelocity(1.5 * s, mu)).nll(x, atol=1e-10, rtol=1e-10)
    assert (wrong.nll - ref).abs().min() > 0.1


def test_point_cloud_nll_lives_on_the_zero_com_subspace_with_the_size_term():
    s = 0.6
    sizes = [3, 5, 4]
    data = _point_batch(sizes, features=1, scale=s)
    counts = NodeCountDistribution({3: 1, 4: 2, 5: 1})
    space = PointCloudSpace(num_features=1, node_counts=counts)
    model = CanonicalizedFlowMatching(GaussianVelocity(s), space=space)
    out = model.nll(data, atol=1e-10, rtol=1e-10)
    n = torch.tensor(sizes, dtype=torch.float64)
    dims = (n - 1) * 3 + n * 1
    assert torch.equal(out.dims, dims)
    sq = torch.zeros(3, dtype=torch.float64).index_add_(
        0, data.batch, (data.pos**2).sum(1) + (data.x**2).sum(1)
    )
    ref = 0.5 * sq / s**2 + 0.5 * dims * math.log(2 * math.pi * s**2)
    assert (out.flow - ref).abs().max() < 1e-8
    assert torch.allclose(out.size, -counts.log_prob(n.long()).double())
    assert torch.allclose(out.nll, out.flow + out.size)
    # negative control: counting all 3n position dimensions would be off by 1.5 log(2 pi s^2)
    full = 0.5 * sq / s**2 + 0.5 * (n * 4) * math.log(2 * math.pi * s**2)
    assert (out.flow - full).abs().min() > 1.0


def test_decoder_bound_matches_the_exact_nll_on_continuous_data():
    """``decode_at > 0``: noised data scored by the flow plus the Gaussian decoder; for the
    exact velocity the bound's mean equals the exact NLL up to its Monte-Carlo error."""
    s = 0.6
    data = _point_batch([3, 5, 4, 6] * 10, features=1, scale=s)
    model = CanonicalizedFlowMatching(GaussianVelocity(s), space=PointCloudSpace(num_features=1))
    exact = model.nll(data, atol=1e-9, rtol=1e-9)
    bound = model.nll(
        data, decode_at=1e-3, atol=1e-9, rtol=1e-9, generator=torch.Generator().manual_seed(0)
    )
    gap = bound.nll - exact.nll
    se = float(gap.std()) / math.sqrt(gap.numel())
    assert abs(float(gap.mean())) < 4 * se + 1e-3, (float(gap.mean()), se)
    assert torch.allclose(bound.nll, bound.flow + bound.dequantization + bound.reconstruction)
    # negative control: without the entropy of q(z | x) the value is far off
    assert float((bound.nll - bound.dequantization - exact.nll).mean()) < -50


def _molecules(sizes, seed=0):
    from torch_geometric.data import Batch, Data

    gen = torch.Generator().manual_seed(seed)
    mols = []
    for n in sizes:
        pos = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        kind = torch.randint(0, 5, (n,), generator=gen)
        onehot = torch.nn.functional.one_hot(kind, 5).double() / 4
        charge = torch.tensor([1.0, 6.0, 7.0, 8.0, 9.0], dtype=torch.float64)[kind, None] / 10
        mols.append(Data(pos=pos - pos.mean(0), x=torch.cat([onehot, charge], 1)))
    return Batch.from_data_list(mols)


def test_molecule_nll_uses_the_discretized_decoder_of_diffusion():
    data = _molecules([3, 5, 4])
    counts = NodeCountDistribution({3: 1, 4: 1, 5: 2})
    mol = CanonicalizedFlowMatching(GaussianVelocity(1.0), space=MoleculeSpace(node_counts=counts))
    cont = CanonicalizedFlowMatching(
        GaussianVelocity(1.0), space=PointCloudSpace(num_features=6, node_counts=counts)
    )
    a = mol.nll(data, generator=torch.Generator().manual_seed(0))
    b = cont.nll(data, decode_at=1e-3, generator=torch.Generator().manual_seed(0))
    n = torch.tensor([3.0, 5.0, 4.0], dtype=torch.float64)
    assert torch.equal(a.dims, (n - 1) * 3 + 6 * n)
    assert torch.allclose(a.size, -counts.log_prob(n.long()).double())
    # the same flow and entropy terms; only the decoder differs (discretized vs Gaussian)
    assert torch.allclose(a.flow, b.flow) and torch.allclose(a.dequantization, b.dequantization)
    assert (a.reconstruction - b.reconstruction).abs().min() > 1.0
    assert torch.isfinite(a.nll).all()
    with pytest.raises(ValueError, match="decode_at"):
        mol.nll(data, decode_at=0.0)


# ---------------------------------------------------------------------- sampling
def test_sampling_the_exact_velocity_gives_the_gaussian():
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    model = CanonicalizedFlowMatching(GaussianVelocity(0.7, mu))
    gen = torch.Generator().manual_seed(0)
    x = model.sample(20_000, shape=(3,), dtype=torch.float64, method="dopri5", generator=gen)
    assert (x.mean(0) - mu).abs().max() < 0.03
    assert (x.std(0) - 0.7).abs().max() < 0.02
    # negative control: the velocity of another Gaussian lands elsewhere
    other = CanonicalizedFlowMatching(GaussianVelocity(1.4, mu))
    y = other.sample(20_000, shape=(3,), dtype=torch.float64, method="dopri5", generator=gen)
    assert (y.std(0) - 0.7).abs().min() > 0.5


def _train(model, steps, gen, batch=64, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model.training_loss(rotated_shapes(batch, generator=gen), generator=gen).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _held_out(model):
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        data = rotated_shapes(512, generator=gen)
        return float(model.training_loss(data, generator=gen).loss)


def test_training_lowers_the_loss_and_samples_keep_zero_com():
    torch.manual_seed(0)
    model = CanonicalizedFlowMatching(
        PointMLP(5), PCACanonicalizer(), space=PointCloudSpace(num_features=0)
    )
    before = _held_out(model)
    _train(model, 150, torch.Generator().manual_seed(0))
    after = _held_out(model)
    assert after < 0.5 * before, (before, after)

    gen = torch.Generator().manual_seed(3)
    samples = model.sample(num_nodes=[5] * 64, steps=20, generator=gen, randomize_pose=True)
    assert samples.pos.shape == (320, 3) and samples.num_graphs == 64
    com = samples.pos.reshape(64, 5, 3).mean(1)
    assert com.abs().max() < 1e-5
    # the shape is learnt: the sorted pairwise distances are near the data's
    got = pairwise_distances(samples.pos, samples.batch, 5).median(0).values
    ref_data = rotated_shapes(64, generator=torch.Generator().manual_seed(4))
    ref = pairwise_distances(ref_data.pos, ref_data.batch, 5).median(0).values
    assert (got - ref).abs().max() < 0.35, (got, ref)


def test_the_denoiser_sees_canonical_poses_and_random_poses_are_rotations():
    seen = []

    class Recorder(PointMLP):
        def forward(self, z, t):
            seen.append(z.pos.detach().clone())
            return super().forward(z, t)

    data = rotated_shapes(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    from canonwrap.groups import SO3

    rotated = SO3().act(
        SO3().random(8, generator=torch.Generator().manual_seed(1), dtype=torch.float64), data
    )
    for canon, same in ((PCACanonicalizer(), True), (CenterOfMass(), False)):
        seen.clear()
        model = CanonicalizedFlowMatching(Recorder(5), canon).double()
        a = model.training_loss(data, generator=torch.Generator().manual_seed(2))
        b = model.training_loss(rotated, generator=torch.Generator().manual_seed(2))
        assert torch.allclose(seen[0], seen[1], atol=1e-9) is same
        assert torch.allclose(a.loss, b.loss, atol=1e-9) is same
        assert a.t.min() >= 0 and a.t.max() <= 1

    # randomize_pose: the same draw, rotated per sample (distances kept, poses changed)
    model = CanonicalizedFlowMatching(PointMLP(5), PCACanonicalizer())
    model.training_loss(rotated_shapes(4, generator=torch.Generator().manual_seed(0)))
    plain = model.sample(num_nodes=[5] * 4, steps=4, generator=torch.Generator().manual_seed(5))
    posed = model.sample(
        num_nodes=[5] * 4, steps=4, generator=torch.Generator().manual_seed(5), randomize_pose=True
    )
    assert torch.allclose(
        pairwise_distances(plain.pos, plain.batch, 5),
        pairwise_distances(posed.pos, posed.batch, 5),
        atol=1e-4,
    )
    assert (plain.pos - posed.pos).abs().max() > 1e-2


# ---------------------------------------------------------------------- input checks
def test_input_errors_are_as_clear_as_diffusion():
    from torch_geometric.data import Data

    model = CanonicalizedFlowMatching(PointMLP(5))
    with pytest.raises(TypeError, match="CanonicalizedFlowMatching takes one batch"):
        model.training_loss([Data(pos=torch.randn(5, 3))])

    class TwoArgs(nn.Module):
        def forward(self, z):
            return z

    with pytest.raises(TypeError, match=r"called as denoiser\(z_t, t\)"):
        CanonicalizedFlowMatching(TwoArgs()).training_loss(torch.randn(4, 3))

    class Nan(nn.Module):
        def forward(self, z, t):
            return z * float("nan")

    with pytest.raises(FloatingPointError, match="velocity predictions.*flow time"):
        CanonicalizedFlowMatching(Nan()).training_loss(torch.randn(4, 3))
    with pytest.raises(FloatingPointError, match="velocity predictions, first at flow time"):
        CanonicalizedFlowMatching(Nan()).sample(2, shape=(3,), steps=3)
    with pytest.raises(FloatingPointError, match="velocity predictions"):
        CanonicalizedFlowMatching(Nan()).nll(torch.randn(4, 3))
    with pytest.raises(
        ValueError, match="torch.float64 but the model.s parameters are torch.float32"
    ):
        CanonicalizedFlowMatching(nn.Linear(3, 3)).training_loss(torch.randn(4, 3).double())
    with pytest.raises(TypeError, match="AffineProbPath"):
        CanonicalizedFlowMatching(nn.Identity(), path=object())
    with pytest.raises(ValueError, match="steps must be >= 1"):
        CanonicalizedFlowMatching(GaussianVelocity(1.0)).sample(2, shape=(3,), steps=0)
    with pytest.raises(ValueError, match="give `shape`"):
        CanonicalizedFlowMatching(GaussianVelocity(1.0)).sample(2)


# ---------------------------------------------------------------------- aligned priors
def test_kabsch_recovers_a_rotation_and_never_reflects():
    from canonwrap._couplings import kabsch_rotations
    from canonwrap.groups import SO3

    data = _point_batch([4, 6, 5])
    batch = data.batch
    rot = SO3().random(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = torch.einsum("nij,nj->ni", rot[batch], data.pos)
    found = kabsch_rotations(data.pos, target, batch, 3)
    assert (found - rot).abs().max() < 1e-10
    # negative control: a mirrored target is best fitted by a reflection, which is refused
    mirrored = target * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    found = kabsch_rotations(data.pos, mirrored, batch, 3)
    assert torch.allclose(torch.linalg.det(found), torch.ones(3, dtype=torch.float64))
    assert (torch.einsum("nij,nj->ni", found[batch], data.pos) - mirrored).abs().max() > 0.1


def test_assignment_permutes_within_graphs_and_types():
    from canonwrap._couplings import assignment_permutation

    data = _point_batch([4, 6])
    types = torch.tensor([0, 1, 0, 1, 0, 0, 1, 1, 2, 0])
    noise = data.pos.flip(0)
    perm = assignment_permutation(noise, data.pos, data.batch, types)
    assert sorted(perm.tolist()) == list(range(10))
    assert torch.equal(types[perm], types) and torch.equal(data.batch[perm], data.batch)
    # with the data itself as noise, the identity is the optimal assignment
    same = assignment_permutation(data.pos, data.pos, data.batch, types)
    assert torch.equal(same, torch.arange(10))


def test_aligned_priors_shorten_paths_and_keep_zero_com():
    data = rotated_shapes(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    space = PointCloudSpace(num_features=0)
    canon = PCACanonicalizer()(data).canonical
    x1 = space.state(canon)
    x0 = space.noise(x1, canon, torch.Generator().manual_seed(1))

    def path_length(noise):
        return float(((x1[0] - noise[0]) ** 2).sum(1).mean())

    lengths = {}
    for name, prior in (
        ("independent", None),
        ("rotation", AlignedPrior()),
        ("assignment", AlignedPrior(rotation=False, assignment=True)),
        ("both", AlignedPrior(assignment=True)),
    ):
        noise = x0 if prior is None else prior(x0, x1, space, canon)
        assert noise[0].reshape(400, 5, 3).mean(1).abs().max() < 1e-12
        # each sample's noise is moved rigidly or re-labelled: its norm is kept
        norms = (noise[0] ** 2).reshape(400, 15).sum(1)
        assert torch.allclose(norms, (x0[0] ** 2).reshape(400, 15).sum(1), atol=1e-10)
        lengths[name] = path_length(noise)
    assert lengths["rotation"] < 0.7 * lengths["independent"], lengths
    assert lengths["assignment"] < 0.7 * lengths["independent"], lengths
    assert lengths["both"] < min(lengths["rotation"], lengths["assignment"]), lengths


def test_training_with_an_aligned_prior_uses_the_aligned_noise():
    seen = []

    class Recorder(PointMLP):
        def forward(self, z, t):
            seen.append((z.pos.detach().clone(), t.detach().clone()))
            return super().forward(z, t)

    data = rotated_shapes(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    space = PointCloudSpace(num_features=0)
    for prior in (None, AlignedPrior(assignment=True)):
        seen.clear()
        model = CanonicalizedFlowMatching(
            Recorder(5), PCACanonicalizer(), space=space, coupling=prior
        ).double()
        out = model.training_loss(data, generator=torch.Generator().manual_seed(2))
        out.loss.backward()
        assert all(p.grad is not None for p in model.denoiser.parameters())
        z, t_net = seen[0]
        tn = (1 - t_net)[data.batch][:, None]
        x1 = PCACanonicalizer()(data).canonical.pos
        x0 = (z - tn * x1) / (1 - tn)  # the noise the loss used
        dist = ((x0 - x1) ** 2).sum(1).mean()
        if prior is None:
            independent = dist
    assert dist < 0.7 * independent


def test_the_reference_graph_denoisers_work_unchanged():
    """canonwrap.nn's networks serve as velocity models: train step, sample, molecule NLL."""
    from canonwrap.nn import GNNDenoiser, TransformerDenoiser

    data = _molecules([3, 5, 4])
    data.pos, data.x = data.pos.float(), data.x.float()
    counts = NodeCountDistribution({3: 1, 4: 1, 5: 2})
    nets = (GNNDenoiser(6, hidden=16, layers=2), TransformerDenoiser(6, hidden=16, layers=1))
    for net in nets:
        torch.manual_seed(0)
        model = CanonicalizedFlowMatching(
            net,
            PCACanonicalizer(),
            space=MoleculeSpace(node_counts=counts),
            coupling=AlignedPrior(assignment=True, type_columns=slice(0, 5)),
        )
        out = model.training_loss(data, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        samples = model.sample(3, steps=3, generator=torch.Generator().manual_seed(1))
        assert samples.x.shape[1] == 6 and samples.num_graphs == 3
        nll = model.nll(data, method="euler", steps=4, generator=torch.Generator().manual_seed(2))
        assert torch.isfinite(nll.nll).all()


def test_adaptive_solvers_never_call_the_network_outside_its_times():
    """dopri5 steps past the interval's end and interpolates back; the network (which,
    like canonwrap.nn's, refuses times outside [0, 1]) sees only times inside it."""
    from canonwrap.nn import TransformerDenoiser

    data = _molecules([3, 4])
    data.pos, data.x = data.pos.float(), data.x.float()
    torch.manual_seed(0)
    net = TransformerDenoiser(6, hidden=8, layers=1)
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append(args[1].detach().clone()))
    model = CanonicalizedFlowMatching(net, CenterOfMass(), space=MoleculeSpace())
    samples = model.sample(num_nodes=[3, 4], method="dopri5", atol=1e-3, rtol=1e-3)
    assert samples.num_graphs == 2 and torch.isfinite(samples.pos).all()
    nll = model.nll(data, atol=1e-3, rtol=1e-3, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(nll.nll).all()
    times = torch.cat(seen)
    assert bool(((times >= 0) & (times <= 1)).all()) and len(seen) > 2


def test_canonical_noise_is_used_in_training_and_sampling_alike():
    class Still(nn.Module):
        def forward(self, z, t):
            return torch.zeros_like(z.pos)

    canon = PCACanonicalizer()
    space = PointCloudSpace(num_features=0)
    for flag in (True, False):
        model = CanonicalizedFlowMatching(Still(), canon, space=space, canonical_noise=flag)
        # a zero velocity returns the start: canonical noise is already in canonical pose
        x = model.sample(
            num_nodes=[5] * 8,
            steps=2,
            dtype=torch.float64,
            generator=torch.Generator().manual_seed(0),
        )
        again = canon(x).canonical.pos
        assert torch.allclose(again, x.pos, atol=1e-9) is flag
    with pytest.raises(NotImplementedError, match="canonical_noise"):
        model = CanonicalizedFlowMatching(Still(), canon, space=space, canonical_noise=True)
        model.nll(rotated_shapes(2, dtype=torch.float64))


class _FlowPointMass(nn.Module):
    """The exact CondOT velocity towards data at the point ``x_star``: ``(x* - z) / s``
    (``s = 1 - t``: the denoiser's time)."""

    def __init__(self, x_star):
        super().__init__()
        self.register_buffer("x_star", x_star)

    def forward(self, z, s):
        return (self.x_star - z) / s[:, None]


def _flow_point_mass_samples(x_star, method, clip, steps=20):
    model = CanonicalizedFlowMatching(_FlowPointMass(x_star))
    gen = torch.Generator().manual_seed(3)
    return model.sample(
        64, shape=(x_star.numel(),), method=method, steps=steps, generator=gen,
        dtype=torch.float64, clip_denoised=clip,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_flow_clip_denoised_changes_nothing_inside_the_range_and_bounds_outside(method):
    inside = torch.tensor([-0.9, -0.3, 0.0, 0.4, 0.85], dtype=torch.float64)
    clipped = _flow_point_mass_samples(inside, method, (-1.0, 1.0))
    torch.testing.assert_close(clipped, _flow_point_mass_samples(inside, method, None),
                               rtol=0, atol=1e-10)  # fmt: skip
    torch.testing.assert_close(clipped, inside.expand_as(clipped), rtol=0, atol=1e-10)
    # negative control: data outside the range is reproduced without clipping ...
    outside = torch.tensor([1.5, -0.2, -3.0], dtype=torch.float64)
    plain = _flow_point_mass_samples(outside, method, None)
    torch.testing.assert_close(plain, outside.expand_as(plain), rtol=0, atol=1e-10)
    # ... and with clipping every predicted x_1, hence the sample, is the nearest point
    clipped = _flow_point_mass_samples(outside, method, (-1.0, 1.0))
    expect = torch.tensor([1.0, -0.2, -1.0], dtype=torch.float64).expand_as(clipped)
    torch.testing.assert_close(clipped, expect, rtol=0, atol=1e-10)


def test_flow_clip_denoised_tames_a_wild_velocity_and_checks_its_arguments():
    class Drift(nn.Module):  # x_1 = x_0 + 5: far out of [-1, 1]
        def forward(self, z, s):
            return torch.full_like(z, 5.0)

    model = CanonicalizedFlowMatching(Drift())
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    wild = model.sample(32, shape=(4,), steps=10, generator=gen())
    tame = model.sample(32, shape=(4,), steps=10, generator=gen(), clip_denoised=(-1, 1))
    assert wild.min() > 1.0 and tame.abs().max() <= 1.0
    # the adaptive solver evaluates t = 1 (sigma_t = 0): the velocity is left finite there
    assert torch.isfinite(model.sample(4, shape=(4,), method="dopri5", clip_denoised=(-1, 1))).all()
    for bad in [(1.0, -1.0), (0.0, float("nan")), (0.0,), "ab", 3.0]:
        with pytest.raises(ValueError, match="clip_denoised"):
            model.sample(2, shape=(2,), steps=2, clip_denoised=bad)
    points = CanonicalizedFlowMatching(PointMLP(5), space=PointCloudSpace(num_features=0))
    with pytest.raises(ValueError, match="not bounded"):
        points.sample(num_nodes=[5], steps=2, clip_denoised=(-1, 1))


# ---------------------------------------------------------------------- the time grid
class _Zero(nn.Module):
    """Velocity 0: ``sample`` returns its starting noise unchanged."""

    def forward(self, z, s):
        return torch.zeros_like(z)


@pytest.mark.parametrize("method,per_step", [("euler", [0.0]), ("midpoint", [0.0, 0.5])])
def test_grid_power_places_the_solver_times(method, per_step):
    seen = []
    net = _Zero()
    net.register_forward_pre_hook(lambda m, args: seen.append(float(1 - args[1][0])))
    model = CanonicalizedFlowMatching(net)

    def times(power):
        seen.clear()
        model.sample(2, shape=(3,), method=method, steps=4, grid_power=power, dtype=torch.float64)
        return seen.copy()

    for power, grid in [(2.0, [0.0, 0.4375, 0.75, 0.9375, 1.0]), (1.0, [0, 0.25, 0.5, 0.75, 1])]:
        expect = [a + f * (b - a) for a, b in zip(grid, grid[1:]) for f in per_step]
        assert times(power) == pytest.approx(expect, abs=1e-12)


def test_grid_power_lowers_the_euler_error_of_a_narrow_gaussian():
    """Data N(0, s^2 I), noise N(0, I): the exact flow maps x_0 to s x_0, and Euler with
    the exact (linear) velocity multiplies x_0 by prod_i (1 + h_i a(t_i)), exactly."""
    s, steps = 0.1, 10

    def a(t):
        return (t * s**2 - (1 - t)) / (t**2 * s**2 + (1 - t) ** 2)

    def euler_factor(power):
        u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        t = 1 - (1 - u) ** power
        return math.prod(float(1 + (t[i + 1] - t[i]) * a(t[i])) for i in range(steps))

    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    x0 = CanonicalizedFlowMatching(_Zero()).sample(
        256, shape=(3,), steps=steps, generator=gen(), dtype=torch.float64
    )
    model = CanonicalizedFlowMatching(GaussianVelocity(s))
    errors = {}
    for power in (1.0, 2.0):
        x1 = model.sample(256, shape=(3,), steps=steps, grid_power=power, generator=gen(),
                          dtype=torch.float64)  # fmt: skip
        torch.testing.assert_close(x1, euler_factor(power) * x0, rtol=1e-12, atol=1e-14)
        errors[power] = abs(euler_factor(power) - s)
    # uniform steps shrink the samples to 0.62 s, the power-2 grid to 0.82 s (exact: s)
    assert errors[2.0] < 0.5 * errors[1.0]


def test_grid_power_is_checked():
    model = CanonicalizedFlowMatching(_Zero())
    for bad in [0.0, -1.0, float("nan"), float("inf"), "two", None]:
        with pytest.raises(ValueError, match="grid_power"):
            model.sample(2, shape=(2,), steps=2, grid_power=bad)
    with pytest.raises(ValueError, match="adaptive 'dopri5' chooses its own steps"):
        model.sample(2, shape=(2,), method="dopri5", grid_power=2.0)
    assert model.sample(2, shape=(2,), method="dopri5", grid_power=1).shape == (2, 2)


# ---------------------------------------------------------------------- training times
class _TimeSpy(nn.Module):
    """Records the flow times ``t = 1 - t_net`` that training hands the network."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.times = []

    def forward(self, z, t_net):
        self.times.append((1 - t_net).detach().clone())
        return self.lin(z)


def _training_times(time_distribution, n=4000, seed=0):
    spy = _TimeSpy().double()
    model = CanonicalizedFlowMatching(spy, time_distribution=time_distribution)
    data = torch.randn(n, 2, dtype=torch.float64)
    model.training_loss(data, generator=torch.Generator().manual_seed(seed))
    return spy.times[0]


def test_time_distribution_sets_the_training_times():
    """Beta(2, 1) training times follow its CDF t^2 (Kolmogorov-Smirnov distance of 4,000
    draws well under 0.03); the uniform default follows t, and is far from t^2 (control)."""
    beta = torch.sort(_training_times(torch.distributions.Beta(2.0, 1.0))).values
    uniform = torch.sort(_training_times(None)).values
    ecdf = torch.arange(1, 4001, dtype=torch.float64) / 4000
    assert beta.dtype == torch.float64 and bool(((beta >= 0) & (beta <= 1)).all())
    assert float((ecdf - beta**2).abs().max()) < 0.03
    assert float((ecdf - uniform).abs().max()) < 0.03
    assert float((ecdf - uniform**2).abs().max()) > 0.2  # the test tells the two apart
    logit_normal = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(0.0, 1.0), torch.distributions.transforms.SigmoidTransform()
    )
    t = _training_times(logit_normal)
    assert abs(float(t.median()) - 0.5) < 0.03 and float(t.std()) < 0.22  # U(0, 1): 0.289


def test_time_distribution_draws_are_reproducible_and_leave_the_global_rng_alone():
    beta = torch.distributions.Beta(2.0, 1.0)
    spy = _TimeSpy().double()
    model = CanonicalizedFlowMatching(spy, time_distribution=beta)
    data = torch.randn(64, 2, dtype=torch.float64)
    state = torch.get_rng_state()
    model.training_loss(data, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    first, again = spy.times[0], _training_times(beta, n=64)
    assert torch.equal(first, again)
    assert not torch.equal(first, _training_times(beta, n=64, seed=1))
    # the default keeps drawing torch.rand from the generator, as before the option
    gen = torch.Generator().manual_seed(0)
    expected = torch.rand(64, generator=gen, dtype=torch.float64)
    assert torch.equal(_training_times(None, n=64), expected)


def test_time_distribution_is_checked():
    dists = torch.distributions
    with pytest.raises(TypeError, match="torch.distributions.Distribution; got str"):
        CanonicalizedFlowMatching(nn.Identity(), time_distribution="beta")
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        CanonicalizedFlowMatching(nn.Identity(), time_distribution=dists.Normal(0.0, 1.0))
    with pytest.raises(ValueError, match="one scalar time per sample"):
        CanonicalizedFlowMatching(
            nn.Identity(),
            time_distribution=dists.Beta(torch.ones(2), torch.ones(2)),
        )
    model = CanonicalizedFlowMatching(nn.Identity(), time_distribution=dists.Beta(2.0, 1.0))
    assert isinstance(model.time_distribution, dists.Beta)  # control


# ---------------------------------------------------------------------- clean-data prediction
class GaussianCleanData(nn.Module):
    """The exact ``E[x_1 | x_t]`` for data ``N(mu, s^2 I)`` on the CondOT path:
    ``mu + t s^2 / (t^2 s^2 + (1 - t)^2) (x - t mu)`` (point clouds: ``mu = 0``), whose
    velocity ``(E[x_1 | x_t] - x) / (1 - t)`` is ``GaussianVelocity``'s."""

    def __init__(self, s, mu=None):
        super().__init__()
        self.s, self.mu = s, mu

    def clean(self, z, t):
        var = t**2 * self.s**2 + (1 - t) ** 2
        mu = 0.0 if self.mu is None else self.mu
        return mu + t * self.s**2 / var * (z - t * mu)

    def forward(self, z, t_net):
        t = 1 - t_net
        if isinstance(z, torch.Tensor):
            return self.clean(z, t[:, None])
        t_node = t[z.batch][:, None]
        return self.clean(z.pos, t_node), self.clean(z.x, t_node)


def test_clean_data_prediction_turns_into_the_exact_velocity():
    """float64: the velocity derived from the exact ``E[x_1 | x_t]`` is the exact CondOT
    velocity, on tensors and on zero-CoM point clouds; past ``1 - DATA_END_GAP`` the
    conversion holds ``t`` (control: there it differs)."""
    from canonwrap.flow import DATA_END_GAP

    s = 0.7
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    data_model = CanonicalizedFlowMatching(GaussianCleanData(s, mu), prediction="data")
    vel_model = CanonicalizedFlowMatching(GaussianVelocity(s, mu))
    space = vel_model._checked_space(x)
    data_model._checked_space(x)
    t = torch.tensor([0.0, 0.3, 0.9, 0.998], dtype=torch.float64)
    (v_data,) = data_model._velocity(space, (x,), x, t)
    (v_ref,) = vel_model._velocity(space, (x,), x, t)
    assert (v_data - v_ref).abs().max() < 1e-11
    held = torch.full((4,), 1 - DATA_END_GAP / 2, dtype=torch.float64)
    (v_held,) = data_model._velocity(space, (x,), x, held)
    (v_true,) = vel_model._velocity(space, (x,), x, held)
    assert (v_held - v_true).abs().max() > 1e-2

    pc = _point_batch([3, 5, 4], features=2)
    pc_space = PointCloudSpace(num_features=2)
    pc_data = CanonicalizedFlowMatching(GaussianCleanData(s), space=pc_space, prediction="data")
    pc_vel = CanonicalizedFlowMatching(GaussianVelocity(s), space=pc_space)
    state = pc_space.state(pc)
    t3 = torch.tensor([0.1, 0.5, 0.95], dtype=torch.float64)
    got, ref = pc_data._velocity(pc_space, state, pc, t3), pc_vel._velocity(pc_space, state, pc, t3)
    for a, b in zip(got, ref):
        assert (a - b).abs().max() < 1e-11
    com = torch.zeros(3, 3, dtype=torch.float64).index_add_(0, pc.batch, got[0])
    assert com.abs().max() < 1e-12


def test_clean_data_prediction_samples_and_scores_like_the_velocity_it_implies():
    """Same noise, same solver: the data-predicting model's samples and likelihood bound
    are the velocity model's (float64); a wrong clean-data estimate changes both."""
    s = 0.7
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    data_model = CanonicalizedFlowMatching(GaussianCleanData(s, mu), prediction="data")
    vel_model = CanonicalizedFlowMatching(GaussianVelocity(s, mu))
    wrong = CanonicalizedFlowMatching(GaussianCleanData(1.5 * s, mu), prediction="data")

    def draw(model):
        gen = torch.Generator().manual_seed(0)
        return model.sample(2000, shape=(3,), dtype=torch.float64, method="midpoint", steps=20,
                            generator=gen)  # fmt: skip

    got, ref = draw(data_model), draw(vel_model)
    assert (got - ref).abs().max() < 1e-10
    assert (got.std(0) - s).abs().max() < 0.05
    assert (draw(wrong).std(0) - s).abs().min() > 0.3

    x = mu + s * torch.randn(
        200, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )

    def score(model):
        gen = torch.Generator().manual_seed(2)
        return model.nll(x, decode_at=1e-3, atol=1e-10, rtol=1e-10, generator=gen).nll

    bound, ref_bound = score(data_model), score(vel_model)
    assert (bound - ref_bound).abs().max() < 1e-6
    # the bound's mean is the exact NLL up to its Monte-Carlo error
    gap = bound - _gaussian_reference(x, mu, s)
    assert abs(float(gap.mean())) < 4 * float(gap.std()) / math.sqrt(200) + 1e-3
    assert float((score(wrong) - bound).mean()) > 0.1
    # the default decode_at of a data-predicting model is 1e-3, also for continuous data
    default = data_model.nll(
        x[:4], atol=1e-10, rtol=1e-10, generator=torch.Generator().manual_seed(2)
    )
    assert float(default.dequantization.abs().min()) > 0
    with pytest.raises(ValueError, match="prediction='data', whose velocity is undefined"):
        data_model.nll(x, decode_at=0.0)


class _Constant(nn.Module):
    """Returns ``value`` everywhere (positions and features of a point cloud)."""

    def __init__(self, value):
        super().__init__()
        self.value = value
        self.p = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, z, t_net):
        if isinstance(z, torch.Tensor):
            return torch.full_like(z, self.value) + 0 * self.p
        return torch.full_like(z.pos, self.value), torch.full_like(z.x, self.value)


def test_clean_data_prediction_regresses_on_the_data_itself():
    """The loss of ``prediction="data"`` is ``|| x_1_hat - x_1 ||^2 / dim`` with the
    prediction projected to zero CoM; the velocity loss of the same output differs."""
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    out = CanonicalizedFlowMatching(_Constant(0.0), prediction="data").training_loss(x, gen)
    assert torch.allclose(out.per_sample, (x**2).mean(1), atol=1e-14)
    vel = CanonicalizedFlowMatching(_Constant(0.0)).training_loss(
        x, torch.Generator().manual_seed(1)
    )
    assert (vel.per_sample - out.per_sample).abs().max() > 0.1  # control

    pc = _point_batch([3, 5, 4], features=2)
    space = PointCloudSpace(num_features=2)
    model = CanonicalizedFlowMatching(_Constant(1.0), space=space, prediction="data")
    got = model.training_loss(pc, torch.Generator().manual_seed(0)).per_sample
    # the ones on the positions are a translation, projected away; on the features they stay
    sq = torch.zeros(3, dtype=torch.float64).index_add_(
        0, pc.batch, (pc.pos**2).sum(1) + ((pc.x - 1) ** 2).sum(1)
    )
    assert torch.allclose(got, sq / space.loss_dims(pc).to(sq), atol=1e-13)


def test_clean_data_prediction_trains_and_is_checked():
    torch.manual_seed(0)
    model = CanonicalizedFlowMatching(
        PointMLP(5), PCACanonicalizer(), space=PointCloudSpace(num_features=0), prediction="data"
    )
    before = _held_out(model)
    _train(model, 150, torch.Generator().manual_seed(0))
    assert _held_out(model) < 0.5 * before
    gen = torch.Generator().manual_seed(3)
    samples = model.sample(num_nodes=[5] * 64, steps=20, generator=gen)
    got = pairwise_distances(samples.pos, samples.batch, 5).median(0).values
    ref_data = rotated_shapes(64, generator=torch.Generator().manual_seed(4))
    ref = pairwise_distances(ref_data.pos, ref_data.batch, 5).median(0).values
    assert (got - ref).abs().max() < 0.35, (got, ref)
    with pytest.raises(ValueError, match="prediction must be one of 'velocity', 'data'; got 'x1'"):
        CanonicalizedFlowMatching(nn.Identity(), prediction="x1")
    assert CanonicalizedFlowMatching(nn.Identity()).prediction == "velocity"


def test_clean_data_prediction_is_clipped_as_predicted():
    """clip_denoised clamps the network's own clean-data prediction: a constant prediction
    of 5 clipped to [-1, 1] lands every Euler sample on 1 (control: unclipped, on 5)."""
    model = CanonicalizedFlowMatching(_Constant(5.0), prediction="data")
    gen = torch.Generator().manual_seed(0)
    clipped = model.sample(8, shape=(3,), steps=10, clip_denoised=(-1.0, 1.0), generator=gen,
                           dtype=torch.float64)  # fmt: skip
    assert (clipped - 1.0).abs().max() < 1e-12
    free = model.sample(8, shape=(3,), steps=10, generator=gen, dtype=torch.float64)
    assert (free - 5.0).abs().max() < 1e-12
    # past 1 - DATA_END_GAP (an adaptive solver's last stage) the clipped velocity still
    # heads for the clipped prediction: (1 - x) / DATA_END_GAP
    from canonwrap.flow import DATA_END_GAP

    x = torch.zeros(2, 3, dtype=torch.float64)
    space = model._checked_space(x)
    t = torch.tensor(1.0 - DATA_END_GAP / 2, dtype=torch.float64)
    v = model._velocity(space, (x,), x, t.expand(2))
    (got,) = model._clipped_velocity(space, (x,), v, t, x, (-1.0, 1.0))
    assert torch.allclose(got, (1.0 - x) / DATA_END_GAP, rtol=1e-12)


# ---------------------------------------------------------------------- SDE sampler
def test_euler_maruyama_keeps_the_flows_marginals_on_a_gaussian():
    """float64, exact velocity: the SDE with the score from the velocity lands on the data
    Gaussian for every noise scale (200 steps), is the Euler ODE at noise 0, and without
    the score term (control) the noise widens the samples."""
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    s = 0.3

    def draw(model, noise, steps=200, method="euler_maruyama"):
        gen = torch.Generator().manual_seed(0)
        extra = {} if noise is None else {"noise_scale": noise}
        return model.sample(20_000, shape=(3,), dtype=torch.float64, method=method, steps=steps,
                            generator=gen, **extra)  # fmt: skip

    model = CanonicalizedFlowMatching(GaussianVelocity(s, mu))
    for noise in (0.5, 1.0, 3.0):
        x = draw(model, noise)
        assert (x.mean(0) - mu).abs().max() < 0.01
        assert (x.std(0) - s).abs().max() < 0.01, (noise, x.std(0))
    euler = draw(model, None, steps=20, method="euler")
    assert torch.equal(draw(model, 0.0, steps=20), euler)
    # at 20 steps the noise corrects the Euler ODE's shrinkage of the spread
    assert (draw(model, 1.0, steps=20).std(0) - s).abs().max() < 0.01
    assert (euler.std(0) - s).abs().min() > 0.02

    # control: the same noise without the score term in the drift spreads the samples
    no_score = CanonicalizedFlowMatching(GaussianVelocity(s, mu))
    no_score.path.velocity_to_epsilon = lambda v, x, t: torch.zeros_like(x)
    wrong = draw(no_score, 1.0)
    assert (wrong.std(0) - s).abs().min() > 0.1


def test_euler_maruyama_on_point_clouds_and_its_checks():
    """Zero-CoM samples, reproducible from the generator, other samples than the ODE's;
    refused for canonical noise and an ODE method given a noise scale."""
    s = 0.6
    model = CanonicalizedFlowMatching(GaussianVelocity(s), space=PointCloudSpace(num_features=1))
    kwargs = dict(num_nodes=[3, 5, 4], method="euler_maruyama", steps=10, dtype=torch.float64)
    a = model.sample(generator=torch.Generator().manual_seed(0), **kwargs)
    b = model.sample(generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(a.pos, b.pos) and torch.equal(a.x, b.x)
    com = torch.zeros(3, 3, dtype=torch.float64).index_add_(0, a.batch, a.pos)
    assert com.abs().max() < 1e-12
    ode = model.sample(generator=torch.Generator().manual_seed(0), **{**kwargs, "method": "euler"})
    assert (ode.pos - a.pos).abs().max() > 1e-3
    with pytest.raises(ValueError, match="the ODE method 'midpoint' adds none"):
        model.sample(num_nodes=[3], method="midpoint", steps=2, noise_scale=1.0)
    with pytest.raises(ValueError, match="noise_scale must be finite and >= 0"):
        model.sample(num_nodes=[3], method="euler_maruyama", steps=2, noise_scale=-0.1)
    canonical = CanonicalizedFlowMatching(
        GaussianVelocity(s), PCACanonicalizer(), space=PointCloudSpace(num_features=1),
        canonical_noise=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="needs the score of a Gaussian start"):
        canonical.sample(num_nodes=[3], method="euler_maruyama", steps=2)
