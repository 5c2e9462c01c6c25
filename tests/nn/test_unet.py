"""UNet denoiser: shapes on even and odd grids, dependence on time, gradients."""

from __future__ import annotations

import pytest
import torch

from canonwrap.nn import UNet
from canonwrap.nn.unet import sinusoidal_embedding


def small_unet(**kw) -> UNet:
    torch.manual_seed(0)
    args = dict(in_channels=1, base_width=8, channel_mults=(1, 2, 2), num_res_blocks=1)
    args.update(kw)
    return UNet(**args)


@pytest.mark.parametrize("size", [28, 29])
def test_shapes(size):
    net = small_unet()
    x = torch.randn(2, 1, size, size)
    y = net(x, torch.rand(2))
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()


def test_non_square_multichannel_scalar_time_and_float64():
    net = small_unet(in_channels=3, channel_mults=(1, 2), attention=False).double()
    x = torch.randn(2, 3, 13, 10, dtype=torch.float64)
    y = net(x, torch.tensor(0.5, dtype=torch.float64))
    assert y.shape == x.shape and y.dtype == torch.float64


def test_output_depends_on_time_and_samples_are_independent():
    net = small_unet().eval()
    x = torch.randn(1, 1, 28, 28).expand(2, 1, 28, 28)
    y = net(x, torch.tensor([0.1, 0.9]))
    assert (y[0] - y[1]).abs().max() > 1e-3
    # each sample only sees its own time (GroupNorm, no batch statistics)
    y0 = net(x[:1], torch.tensor([0.1]))
    assert torch.allclose(y[:1], y0, atol=1e-5)


def test_padding_is_cropped_back():
    """The output at 29x29 comes from a 32x32 pass; it must not be all padding."""
    net = small_unet()
    y = net(torch.randn(1, 1, 29, 29), torch.rand(1))
    assert y.shape[-2:] == (29, 29)
    assert y.std() > 0


def test_gradients_reach_every_parameter():
    net = small_unet()
    x = torch.randn(2, 1, 29, 29, requires_grad=True)
    loss = (net(x, torch.rand(2)) - torch.randn(2, 1, 29, 29)).pow(2).mean()
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_sinusoidal_embedding_closed_form():
    t = torch.tensor([0.0, 0.25])
    emb = sinusoidal_embedding(t, 6)
    w = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)], dtype=torch.float64)
    expected = torch.cat([torch.sin(1000 * t.double()[:, None] * w),
                          torch.cos(1000 * t.double()[:, None] * w)], dim=-1)
    assert torch.allclose(emb, expected)


def test_rejects_bad_time_shape():
    with pytest.raises(ValueError, match="one value per sample"):
        small_unet()(torch.randn(2, 1, 8, 8), torch.rand(3))
