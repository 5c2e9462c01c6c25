"""canonwrap.metrics.images: the paired test loss equals training_loss digit by digit, on
tensors and loaders; pose statistics on hand-made cases; canonwrap.images builds models."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from canonwrap import CanonicalizedDiffusion, CosineSchedule, TensorSpace
from canonwrap.metrics.images import (
    denoising_test_loss,
    exact_pose_mask,
    loss_by_t,
    orientation_concentration,
    split_by_exactness,
    standard_error,
)
from canonwrap.nn import UNet

TINY = dict(base_width=8, channel_mults=(1, 2), num_res_blocks=1)


def _unet_model() -> CanonicalizedDiffusion:
    torch.manual_seed(0)
    return CanonicalizedDiffusion(UNet(**TINY), schedule=CosineSchedule(50), space=TensorSpace())


def test_loss_matches_training_loss_on_tensors_and_loaders():
    model = _unet_model().eval()
    images = torch.rand(6, 1, 12, 12) * 2 - 1
    ev = denoising_test_loss(model, images, batch_size=3, seed=7)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        refs = [model.training_loss(images[i : i + 3], generator=gen) for i in (0, 3)]
    assert torch.allclose(ev["loss"].float(), torch.cat([r.per_sample for r in refs]), atol=1e-6)
    assert torch.equal(ev["t"], torch.cat([r.t for r in refs]))
    assert ev["loss"].dtype == torch.float64 and torch.equal(ev["element"], torch.zeros(6).long())
    loader = DataLoader(TensorDataset(images, torch.zeros(6)), batch_size=3)
    again = denoising_test_loss(model, loader, seed=7)
    assert torch.equal(again["loss"], ev["loss"]) and torch.equal(again["t"], ev["t"])
    plain = denoising_test_loss(model, [images[:3], images[3:]], seed=7)
    assert torch.equal(plain["loss"], ev["loss"])


def test_loss_needs_a_batch_size_and_images():
    model = _unet_model()
    with pytest.raises(ValueError, match="batch_size"):
        denoising_test_loss(model, torch.zeros(2, 1, 8, 8), seed=0)
    with pytest.raises(ValueError, match="no test images"):
        denoising_test_loss(model, [], seed=0)


def test_canonicalized_model_from_image_diffusion():
    pytest.importorskip("escnn")
    from canonwrap.canonicalizers import Frozen, UnitRange
    from canonwrap.images import image_diffusion

    small = dict(TINY, canon_hidden=1, canon_layers=2, canon_downsample=1)
    a = image_diffusion(8, schedule=CosineSchedule(50), seed=3, **small)
    b = image_diffusion(8, freeze_canonicalizer=True, seed=3, **small)
    plain = image_diffusion(None, seed=3, **TINY)
    assert isinstance(a.canonicalizer, UnitRange) and isinstance(b.canonicalizer, Frozen)
    # the same seed gives the same UNet with or without canonicalizer, and the same
    # canonicalizer whether it is frozen or not
    for p, q in zip(a.denoiser.parameters(), plain.denoiser.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(a.canonicalizer.parameters(), b.canonicalizer.parameters()):
        assert torch.equal(p, q)
    images = torch.rand(4, 1, 12, 12) * 2 - 1
    ev = denoising_test_loss(a.eval(), images, batch_size=4, seed=1)
    with torch.no_grad():
        ref = a.training_loss(images, generator=torch.Generator().manual_seed(1))
        element = a.canonicalize(images).element
    assert torch.allclose(ev["loss"].float(), ref.per_sample, atol=1e-6)
    assert torch.equal(ev["element"], element.long())


def test_loss_by_t_and_standard_error():
    loss = torch.tensor([1.0, 2.0, 3.0, 5.0])
    t = torch.tensor([0, 5, 20, 90])
    bins = loss_by_t(loss, t, 100)
    assert bins == {"t<0.1T": 1.5, "0.1T<=t<0.5T": 3.0, "t>=0.5T": 5.0}
    assert math.isnan(loss_by_t(loss[:1], t[:1], 100)["t>=0.5T"])
    assert standard_error(torch.tensor([1.0, 3.0])) == pytest.approx(1.0)
    assert math.isnan(standard_error(torch.tensor([1.0])))


def test_orientation_concentration():
    n = 8
    elements = torch.arange(8)
    labels = torch.zeros(8, dtype=torch.long)
    aligned = 2 * math.pi * elements.double() / n + 0.1  # canonical poses all at 0.1 rad
    conc, chance = orientation_concentration(aligned, elements, labels, n)
    assert conc == pytest.approx(1.0) and chance == pytest.approx(math.sqrt(math.pi / 32))
    spread = orientation_concentration(aligned, torch.zeros(8, dtype=torch.long), labels, n)
    assert spread[0] == pytest.approx(0.0, abs=1e-12)
    assert orientation_concentration(None, elements, labels, n) is None


def test_exact_poses_and_split():
    assert exact_pose_mask(torch.arange(8), 8).tolist() == [
        True,
        False,
        True,
        False,
        True,
        False,
        True,
        False,
    ]
    assert exact_pose_mask(torch.arange(3), 3).tolist() == [True, False, False]
    values = torch.tensor([1.0, 10.0, 3.0, 20.0])
    split = split_by_exactness(values, torch.arange(4), 8)
    assert split["interpolated_fraction"] == 0.5
    assert split["exact"] == 2.0 and split["interpolated"] == 15.0
    assert split["exact_sem"] == pytest.approx(1.0)
