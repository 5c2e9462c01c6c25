"""DiscreteRotationCanonicalizer: the shared contract on C4 (every element acts exactly on
the pixel grid), exact 90-degree behaviour for C8/C16, and a measured interpolation bound
for the other multiples of ``2 pi / n``."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("escnn")

from canonwrap.canonicalizers import DiscreteRotationCanonicalizer, frozen  # noqa: E402
from canonwrap.groups import CyclicRotations  # noqa: E402

from .common import CanonicalizerContract  # noqa: E402

SMALL = dict(hidden=2, layers=3, kernel_size=5, downsample=1)


def blobs(batch: int, size: int, gen: torch.Generator, width: float = 2.0,
          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Smooth test images ``[B, 1, size, size]``: three Gaussian blobs inside the disc."""
    c = (size - 1) / 2
    r = torch.arange(size, dtype=dtype) - c
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    out = torch.zeros(batch, 1, size, size, dtype=dtype)
    for i in range(batch):
        for _ in range(3):
            rad = 0.55 * c * torch.rand((), generator=gen, dtype=dtype)
            ang = 2 * math.pi * torch.rand((), generator=gen, dtype=dtype)
            amp = 0.5 + torch.rand((), generator=gen, dtype=dtype)
            d2 = (xx - rad * torch.cos(ang)) ** 2 + (yy - rad * torch.sin(ang)) ** 2
            out[i, 0] += amp * torch.exp(-d2 / (2 * width**2))
    return out


class TestDiscreteRotationC4(CanonicalizerContract):
    """C4 on an even grid (12x12): every group element is an exact pixel permutation."""

    def make_canonicalizer(self, dtype):
        return DiscreteRotationCanonicalizer(n=4, prior_weight=0.1, **SMALL).to(dtype)

    def make_data(self, dtype, generator):
        return torch.rand(4, 1, 12, 12, generator=generator, dtype=torch.float64).to(dtype)


def _right_angle_multiples(n: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    return (n // 4) * torch.randint(0, 4, (batch,), generator=gen)


@pytest.mark.parametrize("n,size", [(8, 12), (16, 13)])
def test_right_angles_exact(n, size):
    """h(g.x) == g + h(x) and c(g.x) == c(x) (float64, 1e-9) for multiples of 90 degrees."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    channels = 2 if n == 8 else 1  # also exercise several input channels
    canon = DiscreteRotationCanonicalizer(n=n, in_channels=channels, **SMALL).double()
    group = canon.group
    x = torch.rand(6, channels, size, size, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = canon(x)
        for _ in range(3):
            g = _right_angle_multiples(n, x.shape[0], gen)
            moved = canon(group.act(g, x))
            assert torch.equal(moved.element, group.compose(g, out.element))
            assert (moved.canonical - out.canonical).abs().max() <= 1e-9
        recon = group.act(out.element, out.canonical)
    # reconstruction is exact up to interpolation only for non-right-angle elements
    right = out.element % (n // 4) == 0
    if right.any():
        assert (recon[right] - x[right]).abs().max() <= 1e-9


def test_direction_of_the_score_shift():
    """``torch.rot90(x, 1)`` (counter-clockwise as displayed) rolls the scores by +n/4."""
    torch.manual_seed(1)
    n = 8
    canon = DiscreteRotationCanonicalizer(n=n, **SMALL).double()
    x = torch.rand(3, 1, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        s = canon.scores(x)
        s_rot = canon.scores(torch.rot90(x, 1, dims=(-2, -1)))
    # escnn samples its filter basis in float32: shifts are exact to ~1e-6 relative
    assert (s_rot - torch.roll(s, n // 4, dims=-1)).abs().max() <= 1e-5 * s.abs().max()
    assert not torch.allclose(s_rot, torch.roll(s, -(n // 4), dims=-1), atol=1e-4)
    assert torch.equal(s_rot.argmax(-1), (s.argmax(-1) + n // 4) % n)


def test_default_configuration_on_28x28():
    """Default network (C8, 16 fields, 5 layers) on 28x28: exact for 90-degree rotations."""
    torch.manual_seed(2)
    canon = DiscreteRotationCanonicalizer(n=8)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        out = canon(x)
        g = torch.tensor([2, 6])
        moved = canon(canon.group.act(g, x))
    assert out.canonical.shape == x.shape and out.element.dtype == torch.long
    assert torch.equal(moved.element, canon.group.compose(g, out.element))
    assert torch.equal(moved.canonical, out.canonical)


def test_other_multiples_within_interpolation_bound():
    """Rotations by 45 + k 90 degrees (C8) act by bilinear interpolation.

    Bound: ``e_rt``, the largest round-trip error ``|rotate(rotate(x, a), -a) - x|`` of the
    action itself on the same images (measured here: 0.127, 4.6 % of the peak value 2.76,
    for Gaussian blobs of width 2.5 px on 21x21). For every sample whose element is
    equivariant, the canonical images of ``x`` and ``g . x`` differ by at most ``2 e_rt``
    (measured: 0.126, i.e. ``0.99 e_rt``; over other seeds and sizes 0.54-1.00 ``e_rt``;
    it equals ``e_rt`` when ``h(x)`` is a multiple of 90 degrees). The arg-max of a
    randomly initialised network is only approximately equivariant under these rotations
    (near-ties flip): 58 % of samples here (42-92 % over seeds), chance is 12.5 %.
    """
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n = 8
    canon = DiscreteRotationCanonicalizer(n=n, **SMALL).double()
    group = canon.group
    x = blobs(12, 21, gen, width=2.5)
    agree, total, e_rt, worst = 0, 0, 0.0, 0.0
    with torch.no_grad():
        out = canon(x)
        for k in (1, 3, 5, 7):
            g = torch.full((x.shape[0],), k)
            xg = group.act(g, x)
            e_rt = max(e_rt, (group.act(group.inverse(g), xg) - x).abs().max().item())
            moved = canon(xg)
            ok = moved.element == group.compose(g, out.element)
            agree, total = agree + int(ok.sum()), total + ok.numel()
            if ok.any():
                worst = max(worst, (moved.canonical - out.canonical)[ok].abs().max().item())
    assert 0 < e_rt < 0.08 * x.max().item()
    assert worst <= 2 * e_rt
    assert agree / total >= 0.4


def test_straight_through_gradients():
    """Forward is exactly the hard choice; a loss on the canonical image reaches the network."""
    torch.manual_seed(3)
    canon = DiscreteRotationCanonicalizer(n=8, **SMALL).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(3, 1, 12, 12, generator=gen, dtype=torch.float64)
    target = torch.rand(3, 1, 12, 12, generator=gen, dtype=torch.float64)
    out = canon(x)
    assert torch.equal(out.canonical, canon.apply_inverse(x, out.element))
    with torch.no_grad():
        assert torch.equal(canon(x).canonical, out.canonical)
    ((out.canonical - target) ** 2).sum().backward()
    grads = [p.grad for p in canon.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    assert grads[0].abs().sum() > 0  # the first layer too


def test_gradient_reaches_input_through_frozen():
    canon = frozen(DiscreteRotationCanonicalizer(n=8, **SMALL).double())
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    out = canon(x)
    out.canonical.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_prior_loss():
    torch.manual_seed(4)
    x = torch.rand(4, 1, 12, 12)
    assert DiscreteRotationCanonicalizer(n=8, **SMALL)(x).prior_loss is None
    canon = DiscreteRotationCanonicalizer(n=8, prior_weight=1.0, **SMALL)
    out = canon(x)
    assert out.prior_loss.dim() == 0 and out.prior_loss > 0
    # a few steps on the prior alone move every element to the identity
    opt = torch.optim.Adam(canon.parameters(), lr=5e-2)
    for _ in range(12):
        opt.zero_grad()
        canon(x).prior_loss.backward()
        opt.step()
    with torch.no_grad():
        assert torch.equal(canon(x).element, torch.zeros(4, dtype=torch.long))


def test_state_dict_loads_into_eval_mode():
    """escnn caches expanded filters in eval mode; loading must not leave them stale."""
    torch.manual_seed(5)
    a = DiscreteRotationCanonicalizer(n=8, **SMALL)
    b = DiscreteRotationCanonicalizer(n=8, **SMALL).eval()
    assert set(a.state_dict()) == set(a.eval().state_dict())
    b.load_state_dict(a.train().state_dict())
    x = torch.rand(2, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(a.scores(x), b.scores(x))


def test_input_validation():
    canon = DiscreteRotationCanonicalizer(n=4, **SMALL)
    with pytest.raises(ValueError, match="square"):
        canon(torch.rand(1, 1, 12, 13))
    with pytest.raises(ValueError, match="channels"):
        canon(torch.rand(1, 3, 12, 12))
    with pytest.raises(ValueError, match="kernel_size"):
        DiscreteRotationCanonicalizer(n=4, kernel_size=4)
    assert isinstance(canon.group, CyclicRotations) and canon.group.n == 4



@pytest.mark.parametrize("seed, images", [(0, "noise"), (0, "blobs"), (1, "noise"), (1, "blobs")])
def test_scores_of_45_degree_rotations_are_not_shifted_at_initialisation(seed, images):
    """What the class docstring states for elements that are not multiples of 90 degrees.

    Default network (C8, 28x28) in float64, 16 images (uniform noise, or Gaussian blobs of
    width 2.5 px): the scores of ``g . x`` for a 45-degree ``g`` deviate from
    ``roll(scores(x), 1)`` by, in the median over the images, 91 % / 43 % (seed 0, noise /
    blobs) and 36 % / 11 % (seed 1) of each image's score range (measured), and the arg-max
    follows ``g`` for 0, 1, 6 and 13 of the 16 images. For seed 0 and noise the scores stay
    closer to the unshifted ones (16 %). The same network shifts its scores for 90 degrees
    to about 1e-6 (the control).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    canon = DiscreteRotationCanonicalizer(n=8).double()
    if images == "noise":
        x = torch.rand(16, 1, 28, 28, generator=gen, dtype=torch.float64)
    else:
        x = blobs(16, 28, gen, width=2.5)
    with torch.no_grad():
        s = canon.scores(x)
        spread = s.max(-1).values - s.min(-1).values
        moved = {k: canon.scores(canon.group.act(torch.full((16,), k), x)) for k in (1, 2)}
    deviation = {k: (m - torch.roll(s, k, -1)).abs().max(-1).values / spread
                 for k, m in moved.items()}
    follows = {k: int((m.argmax(-1) == (s.argmax(-1) + k) % 8).sum()) for k, m in moved.items()}
    assert deviation[2].max() < 1e-4 and follows[2] == 16
    assert deviation[1].median() > 0.1 and follows[1] <= 13
    if (seed, images) == (0, "noise"):  # not shifted at all: nearer the unshifted scores
        unshifted = (moved[1] - s).abs().max(-1).values / spread
        assert unshifted.median() < 0.2 < 0.5 < deviation[1].median() and follows[1] == 0
