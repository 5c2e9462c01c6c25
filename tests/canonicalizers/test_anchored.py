"""Anchored canonicalizer (learned frame + prior towards PCA), frame distillation, drift."""

from __future__ import annotations

import pytest
import torch

from canonwrap.canonicalizers import PCACanonicalizer
from canonwrap.canonicalizers.anchored import (
    Anchored,
    distill_frames,
    frame_distance,
    rotation_angle,
)
from canonwrap.evaluation import FrameDrift
from canonwrap.groups import SO3
from canonwrap.recipes import QM9ModelConfig, canonicalizer_warmup, qm9_model, qm9_optimizer
from tests.canonicalizers.common import CanonicalizerContract
from tests.canonicalizers.test_egnn_canonicalizer import _canon
from tests.nn.test_gnn import random_molecules


class TestAnchored(CanonicalizerContract):
    def make_canonicalizer(self, dtype):
        return Anchored(_canon(dtype), PCACanonicalizer(), weight=0.5)

    def make_data(self, dtype, generator):
        sizes = torch.randint(4, 10, (5,), generator=generator).tolist()
        return random_molecules(sizes, dtype=dtype, generator=generator)


def test_prior_is_the_frame_distance_and_rotation_invariant():
    gen = torch.Generator().manual_seed(0)
    data = random_molecules([5, 7, 6], generator=gen)
    learned, pca = _canon(), PCACanonicalizer()
    out = Anchored(learned, pca, weight=0.5)(data)
    expected = 0.5 * frame_distance(learned(data).element, pca(data).element).mean()
    assert torch.allclose(out.prior_loss, expected, atol=1e-12)
    assert torch.equal(out.element, learned(data).element)
    # rotating every molecule leaves the prior unchanged (both frames rotate along)
    rot = SO3().random(3, generator=gen, dtype=torch.float64)
    rotated = SO3().act(rot, data)
    again = Anchored(learned, pca, weight=0.5)(rotated).prior_loss
    assert (again - out.prior_loss).abs() < 1e-9
    # negative control: a frame that ignores the rotation changes the prior
    fixed = frame_distance(learned(data).element, pca(rotated).element).mean() * 0.5
    assert (fixed - out.prior_loss).abs() > 1e-3
    assert Anchored(learned, pca, weight=0.0)(data).prior_loss is None
    with pytest.raises(ValueError, match="weight"):
        Anchored(learned, pca, weight=-1.0)


def test_frame_distance_and_angle_closed_form():
    theta = torch.tensor([0.3, 1.2, 3.0], dtype=torch.float64)
    c, s = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(3, 3, 3, dtype=torch.float64)
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = c, -s, s, c, 1
    eye = torch.eye(3, dtype=torch.float64).expand(3, 3, 3)
    assert torch.allclose(frame_distance(eye, rot), 4 * (1 - c), atol=1e-12)
    assert torch.allclose(rotation_angle(eye, rot), torch.rad2deg(theta), atol=1e-9)


def test_distillation_lowers_the_frame_distance():
    gen = torch.Generator().manual_seed(2)
    data = random_molecules([6, 7, 8, 9], dtype=torch.float32, generator=gen)
    learned = _canon(torch.float32)
    pca = PCACanonicalizer()
    losses = distill_frames(learned, pca, [data], steps=60, lr=3e-3)
    assert len(losses) == 60 and losses[-1] < losses[0]
    with pytest.raises(ValueError, match="steps"):
        distill_frames(learned, pca, [data], steps=-1)


def test_frame_drift_reports_motion():
    gen = torch.Generator().manual_seed(3)
    probe = random_molecules([5, 6, 7], generator=gen)
    canon = _canon()
    drift = FrameDrift(probe)
    assert drift(canon) == {}
    still = drift(canon)
    assert still["frame_drift_deg"] < 1e-5
    with torch.no_grad():
        for p in canon.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = drift(canon)
    assert moved["frame_drift_deg"] > 0.1
    assert moved["frame_drift_total_deg"] == pytest.approx(moved["frame_drift_deg"], rel=1e-6)


def test_canonicalizer_warmup_holds_then_ramps():
    model = qm9_model(QM9ModelConfig(denoiser="gnn", canonicalizer="egnn", hidden=8, layers=1,
                                     canon_hidden=8, canon_layers=1))
    opt = qm9_optimizer(model, lr=1e-3, canon_lr_ratio=0.1)
    sched = canonicalizer_warmup(opt, 4)
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
    assert rates[:5] == [0.0] * 5
    assert rates[6] == pytest.approx(1e-4 * 0.5) and rates[9] == pytest.approx(1e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert canonicalizer_warmup(opt, 0) is None


class _Payload:
    """Stands in for pickled code in a crafted checkpoint."""


def test_load_weights_refuses_pickled_objects(tmp_path):
    from canonwrap.evaluation import load_weights

    model = qm9_model(QM9ModelConfig(denoiser="gnn", canonicalizer="com", hidden=8, layers=1))
    good = tmp_path / "ckpt_1.pt"
    torch.save({"model": model.state_dict()}, good)
    other = qm9_model(QM9ModelConfig(denoiser="gnn", canonicalizer="com", hidden=8, layers=1))
    load_weights(other, good)
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    bad = tmp_path / "ckpt_2.pt"
    torch.save({"model": model.state_dict(), "extra": _Payload()}, bad)
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        load_weights(other, bad)
    with pytest.raises(ValueError, match="no EMA"):
        load_weights(other, good, weights="ema")
