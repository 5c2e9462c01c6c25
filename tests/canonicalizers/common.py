"""Shared contract tests that every canonicalizer's test class inherits.

A subclass provides ``make_canonicalizer(dtype)`` and ``make_data(dtype, generator)`` and
may override the class attributes below. It then gets invariance, equivariance,
reconstruction, node-permutation, shape, dtype, ``state_dict`` and frozen-variant tests,
in float64 (tight tolerance) and float32.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from canonwrap.canonicalizers import Canonicalizer, frozen
from canonwrap.pointclouds import is_point_cloud
from canonwrap.testing import assert_canonicalizer, max_abs_difference


class CanonicalizerContract:
    #: tolerance in float64 / float32 for the contract checks
    atol64: float = 1e-9
    atol32: float = 1e-4
    #: whether the group element is expected to be exactly equivariant on the test data
    check_element: bool = True
    n_trials: int = 3

    def make_canonicalizer(self, dtype: torch.dtype) -> Canonicalizer:
        raise NotImplementedError

    def make_data(self, dtype: torch.dtype, generator: torch.Generator) -> Any:
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------
    def _setup(self, dtype):
        gen = torch.Generator().manual_seed(7)
        torch.manual_seed(7)
        canon = self.make_canonicalizer(dtype)
        data = self.make_data(dtype, gen)
        return canon, data, gen

    # -- the contract ----------------------------------------------------------------
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    def test_contract(self, dtype):
        canon, data, gen = self._setup(dtype)
        atol = self.atol64 if dtype == torch.float64 else self.atol32
        errors = assert_canonicalizer(
            canon, data, atol=atol, generator=gen, n_trials=self.n_trials,
            check_element=self.check_element,
        )
        assert all(v <= atol for v in errors.values())

    def test_negative_control(self):
        """Adding a non-equivariant perturbation to the output must fail the check."""
        canon, data, gen = self._setup(torch.float64)

        class Broken(Canonicalizer):
            def __init__(self, inner):
                super().__init__()
                self.inner, self.group = inner, inner.group

            def normalize(self, d):
                return self.inner.normalize(d)

            def forward(self, d):
                out = self.inner(d)
                c = out.canonical
                if is_point_cloud(c):
                    # depends on the absolute pose of the input: breaks invariance
                    shifted = c.pos + 1e-3 * d.pos[:, :1]
                    c = copy.copy(c)
                    c.pos = shifted
                else:
                    c = c + 1e-3 * d.flip(-1)
                return type(out)(canonical=c, element=out.element, prior_loss=out.prior_loss)

        with pytest.raises(AssertionError, match="largest error|error"):
            assert_canonicalizer(Broken(canon), data, atol=1e-9, generator=gen)

    def test_shapes_and_dtype(self):
        for dtype in (torch.float64, torch.float32):
            canon, data, _ = self._setup(dtype)
            out = canon(data)
            if is_point_cloud(data):
                assert out.canonical.pos.shape == data.pos.shape
                assert out.canonical.pos.dtype == dtype
                n = int(data.batch.max()) + 1
            else:
                assert out.canonical.shape == data.shape
                assert out.canonical.dtype == dtype
                n = data.shape[0]
            assert out.element.shape[0] == n
            if out.prior_loss is not None:
                assert out.prior_loss.dim() == 0 and torch.isfinite(out.prior_loss)

    def test_state_dict_round_trip(self):
        canon, data, _ = self._setup(torch.float64)
        clone = self.make_canonicalizer(torch.float64)
        clone.load_state_dict(copy.deepcopy(canon.state_dict()))
        a, b = canon(data), clone(data)
        assert max_abs_difference(a.canonical, b.canonical) <= 1e-12
        assert (a.element.double() - b.element.double()).abs().max() <= 1e-12

    def test_frozen_variant(self):
        canon, data, gen = self._setup(torch.float64)
        fz = frozen(canon)
        fz.train()
        assert all(not p.requires_grad for p in fz.parameters())
        assert_canonicalizer(fz, data, atol=self.atol64, generator=gen,
                             check_element=self.check_element)
        a, b = canon(data), fz(data)
        assert max_abs_difference(a.canonical, b.canonical) <= 1e-9
