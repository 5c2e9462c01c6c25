"""EMA: hand-computed averages, dtypes, mismatched models, late start."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from canonwrap.training import EMA


def test_ema_matches_hand_computation():
    model = nn.Linear(2, 1).double()
    bn = nn.BatchNorm1d(2).double()
    both = nn.Sequential(bn, model)
    p0 = {n: p.detach().clone() for n, p in both.named_parameters()}
    ema = EMA(both, decay=0.9)
    expected = dict(p0)
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in both.parameters():
                p.add_(torch.randn_like(p))
            bn.running_mean.add_(1.0)
        ema.update(both, step)
        for n, p in both.named_parameters():
            expected[n] = 0.9 * expected[n] + 0.1 * p.detach()
    for n in expected:
        torch.testing.assert_close(ema.shadow[n], expected[n], rtol=0, atol=1e-14)
    torch.testing.assert_close(ema.buffers["0.running_mean"], bn.running_mean)  # copied

    raw = {n: p.detach().clone() for n, p in both.named_parameters()}
    raw_mean = bn.running_mean.clone()
    with ema.average_parameters(both):
        for n, p in both.named_parameters():
            assert torch.equal(p, ema.shadow[n])
    for n, p in both.named_parameters():  # restored
        assert torch.equal(p, raw[n])
    assert torch.equal(bn.running_mean, raw_mean)

    other = EMA(nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 1)).double(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and other.num_updates == 3
    for n in expected:
        assert torch.equal(other.shadow[n], ema.shadow[n])
    ema.copy_to(model := nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 1)).double())
    for n, p in model.named_parameters():
        assert torch.equal(p, ema.shadow[n])


def test_ema_keeps_float32_for_half_params_and_rejects_other_models():
    ema = EMA(nn.Linear(2, 2).half(), decay=0.5)
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    with pytest.raises(ValueError, match="weight"):
        ema.update(nn.Linear(3, 2), 1)
    with pytest.raises(ValueError, match="shape mismatch"):
        EMA(nn.Linear(3, 2)).load_state_dict(ema.state_dict())


def test_ema_start_step_copies_before_averaging():
    model = nn.Linear(2, 1).double()
    ema = EMA(model, decay=0.9, start_step=3)
    for step in (1, 2):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model, step)
        assert torch.equal(ema.shadow["weight"], model.weight)  # plain copy
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 3)  # from start_step on: averaging
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * before + 0.1 * model.weight.detach())
