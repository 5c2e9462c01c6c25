"""What every canonicalized generative wrapper shares (private).

[`CanonicalizedDiffusion`][canonwrap.diffusion.CanonicalizedDiffusion] and
[`CanonicalizedFlowMatching`][canonwrap.flow_matching.CanonicalizedFlowMatching] hold a
denoiser, a canonicalizer and a space; this module checks their inputs, calls the
denoiser, names the culprit of a non-finite result, builds the batches to sample and
applies a random pose to samples.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from torch import Tensor, nn

from canonwrap.canonicalizers.base import Canonicalizer, CanonOutput
from canonwrap.canonicalizers.basic import Identity
from canonwrap.pointclouds import (
    collate_hint,
    is_point_cloud,
    nodes_per_graph,
    parameter_mismatch,
)
from canonwrap.spaces import PointCloudSpace, Space, State, TensorSpace


def _call_signature_problem(denoiser: Any) -> str | None:
    """Why ``denoiser(z_t, t)`` cannot be called, or ``None`` if its signature allows it."""
    fn = denoiser.forward if isinstance(denoiser, nn.Module) else denoiser
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        return None
    try:
        sig.bind(None, None)
    except TypeError as err:
        name = getattr(fn, "__qualname__", type(denoiser).__name__)
        return (
            f"the denoiser is called as denoiser(z_t, t) (noisy data and normalized times "
            f"[B]), but {name}{sig} cannot take these two arguments: {err}"
        )
    return None


def _component_names(space: Space, count: int) -> tuple[str, ...]:
    """How the components of a state are named in messages."""
    if isinstance(space, PointCloudSpace) and count == 2:
        return ("positions", f"features ({space.feature_key})")
    if count == 1:
        return ("values",)
    return tuple(f"component {i}" for i in range(count))


def _all_finite(state: State) -> Tensor:
    """Whether every entry of every component is finite: a 0-dim bool tensor (no sync)."""
    return torch.stack([torch.isfinite(s).all() for s in state]).all()


def _first_indices(mask: Tensor, limit: int = 5) -> str:
    """``[i, j, ...]`` of the first ``limit`` true entries of ``mask [B]`` (and how many)."""
    idx = mask.reshape(-1).nonzero().flatten()
    shown = idx[:limit].tolist()
    return str(shown) + (f" ({idx.numel()} in all)" if idx.numel() > limit else "")


def _scale_note(state: State, always: bool = False) -> str:
    """A sentence on the data's magnitude when it is large enough to overflow (or ``always``).

    Values above the fourth root of the dtype's largest number overflow once squared and
    summed in a few places (losses, distances, covariances): the data should be rescaled.
    """
    parts = [s.detach() for s in state if s.numel()]
    if not parts:
        return ""
    finite = [p[torch.isfinite(p)] for p in parts]
    largest = max((float(p.abs().max()) for p in finite if p.numel()), default=0.0)
    limit = torch.finfo(parts[0].dtype).max
    if not always and largest <= limit**0.25:
        return ""
    return (
        f"; the data's largest |value| is {largest:.3g}, and {parts[0].dtype} overflows above "
        f"{limit:.3g} (squares above {limit**0.5:.3g}): rescale the data (e.g. to unit "
        "variance)"
    )


_GRAPH_PAIR_WIDTH = 256  # values per node pair in sample's memory estimate (EDM's width)


def _device_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (CPU: physical memory), or ``None`` if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no value
            return None
    return None


def _check_graph_memory(
    counts: Tensor, dtype: torch.dtype, device: Any, limit: float | None
) -> None:
    """Refuse node counts whose fully connected graphs cannot fit (see ``sample``)."""
    n = counts.double()
    pairs = int((n * (n - 1)).sum())
    per_pair = 16 + _GRAPH_PAIR_WIDTH * torch.empty((), dtype=dtype).element_size()
    need = pairs * per_pair
    where = "max_graph_bytes"
    if limit is None:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        limit = _device_memory(dev)
        if limit is None:
            return
        where = f"the total memory of {dev}"
    if need <= limit:
        return
    raise ValueError(
        f"sample: the fully connected graphs of num_nodes (largest {int(counts.max())} nodes, "
        f"{len(counts)} sample(s), {pairs:,} node pairs) need an estimated {_gib(need)} "
        f"({per_pair} bytes per pair: the edge list and one {_GRAPH_PAIR_WIDTH}-wide {dtype} "
        f"vector), more than {where} ({_gib(limit)}); sample fewer or smaller point clouds "
        "per call, or pass max_graph_bytes=<bytes> (math.inf: no check) to try anyway"
    )


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


class CanonicalizedModel(nn.Module):
    """Base of the wrappers: a denoiser, a canonicalizer and a space (see the module doc).

    Subclasses set ``_prediction`` (what the denoiser predicts, for messages) and
    ``_at_times`` (how the times of failing samples are named).
    """

    _prediction = "predictions"

    def __init__(
        self,
        denoiser: nn.Module,
        canonicalizer: Canonicalizer | None = None,
        space: Space | None = None,
    ) -> None:
        super().__init__()
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable, got {type(denoiser).__name__}")
        self.denoiser = denoiser
        self.canonicalizer = canonicalizer if canonicalizer is not None else Identity()
        self.space = space
        self.point_features: int | None = (
            space.num_features if isinstance(space, PointCloudSpace) else None
        )
        """``F`` of the point clouds this model generates (``None``: not known yet)."""

    # ------------------------------------------------------------------ saved with the weights
    def get_extra_state(self) -> dict[str, Any]:
        return {"point_features": self.point_features}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        f = state.get("point_features")
        declared = self.space.num_features if isinstance(self.space, PointCloudSpace) else None
        if f is not None and declared is not None and int(f) != declared:
            raise ValueError(
                f"the saved model generates point clouds with F={f} node features, but this "
                f"model's space declares num_features={declared}"
            )
        if f is not None:
            self.point_features = int(f)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # weights saved before the feature width was part of the state load as they are
        state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ helpers
    def _checked_space(self, data: Any, record: bool = False) -> Space:
        """The space of ``data`` after checking it once (``record``: keep the feature width)."""
        hint = collate_hint(data)
        if hint:
            raise TypeError(
                f"{type(self).__name__} takes one batch (a tensor [B, ...] or a "
                f"torch_geometric Batch); got {type(data).__name__}{hint}"
            )
        if self.space is not None:
            space = self.space
        elif is_point_cloud(data):
            space = PointCloudSpace()
        elif self.point_features is not None:
            raise TypeError(
                f"this model generates point clouds (F={self.point_features} node features); "
                f"got {type(data).__name__}: pass a torch_geometric Batch with pos and x"
            )
        else:
            space = TensorSpace()
        space.check(data)
        self._check_placement(data.pos if is_point_cloud(data) else data, "data")
        if isinstance(space, PointCloudSpace):
            h = getattr(data, space.feature_key, None)
            width = 0 if h is None else int(h.shape[1])
            if self.point_features is None:
                if record:
                    self.point_features = width
            elif width != self.point_features:
                raise ValueError(
                    f"this model generates point clouds with F={self.point_features} node "
                    f"features ({space.feature_key} [N, {self.point_features}]); got data "
                    f"with F={width}"
                )
        return space

    def _check_placement(self, ref: Tensor, what: str) -> None:
        """Raise if ``ref`` (data or samples) and the parameters differ in device or dtype.

        The model's first parameters are compared, and the canonicalizer's as well (a
        learned canonicalizer left in another dtype than the denoiser is named).
        """
        if not isinstance(ref, Tensor):  # a custom space's layout: nothing to compare
            return
        owner, found = "model", parameter_mismatch(self, ref)
        if found is None and isinstance(self.canonicalizer, nn.Module):
            owner, found = "canonicalizer", parameter_mismatch(self.canonicalizer, ref)
        if found is None:
            return
        kind, mine, theirs = found
        if kind == "device":
            raise ValueError(
                f"{what} is on {mine} but the {owner}'s parameters are on {theirs}; "
                "move one of them (model.to(device) or data.to(device))"
            )
        if what == "data":
            fix = (
                f"convert one of them: the model with model.to({mine}), or the data's "
                f"floating-point tensors (of a point-cloud batch: pos and the node features) "
                f"with .to({theirs})"
            )
        else:
            fix = f"leave dtype unset to sample in the model's dtype, or call model.to({mine})"
        raise ValueError(f"{what} is {mine} but the {owner}'s parameters are {theirs}; {fix}")

    def _default_dtype(self) -> torch.dtype:
        p = next((q for q in self.parameters() if q.is_floating_point()), None)
        return p.dtype if p is not None else torch.float32

    def _at_times(self, shown: list) -> str:
        """Where in time the failing samples were, for messages."""
        return f" at t = {shown}"

    def _call_denoiser(self, space: Space, z: State, template: Any, t: Tensor) -> State:
        """``denoiser(z, t)`` parsed as a state; a signature that cannot take it is named."""
        try:
            out = self.denoiser(space.to_data(z, template), t)
        except TypeError as err:
            problem = _call_signature_problem(self.denoiser)
            if problem is None:  # the TypeError came from inside the denoiser
                raise
            raise TypeError(problem) from err
        return space.parse_output(out, z, template)

    def _require_finite(
        self,
        who: str,
        what: str,
        value: Tensor,
        space: Space,
        data: Any,
        template: Any,
        *,
        canonical: State | None = None,
        eps_hat: State | None = None,
        steps: Tensor | None = None,
        prior: Tensor | None = None,
    ) -> None:
        """Raise ``FloatingPointError`` naming the culprit unless ``value`` is finite.

        ``value`` is a loss or a per-sample term (``[B]`` or a scalar): the check is one
        reduction over ``B`` numbers. Only when it fails are the tensors that produced it
        scanned, in order: the canonicalizer's output (``canonical``, the state of the
        canonical pose) and prior loss, the denoiser's output ``eps_hat`` (at the times
        ``steps [B]``), and otherwise an overflow of the arithmetic is reported, with the
        magnitude of the data.
        """
        if bool(torch.isfinite(value.detach()).all()):
            return
        names = _component_names(space, len(space.state(template)))
        scale = _scale_note(space.state(data))
        if canonical is not None:
            found = [
                (n, int((~torch.isfinite(c.detach())).sum())) for n, c in zip(names, canonical)
            ]
            found = [f"{k} in {n}" for n, k in found if k]
            if found:
                raise FloatingPointError(
                    f"{who}: the canonicalizer ({type(self.canonicalizer).__name__}) returned "
                    f"non-finite (NaN/Inf) canonical data from finite data ({', '.join(found)})"
                    f"{scale}"
                )
        if prior is not None and not bool(torch.isfinite(prior.detach()).all()):
            raise FloatingPointError(
                f"{who}: the canonicalizer's ({type(self.canonicalizer).__name__}) prior loss "
                f"is {prior.detach().flatten()[:5].tolist()}{scale}"
            )
        if eps_hat is not None:
            bad = tuple((~torch.isfinite(e.detach())).to(torch.float64) for e in eps_hat)
            if any(bool(b.any()) for b in bad):
                where = [f"{int(b.sum())} in {n}" for n, b in zip(names, bad) if bool(b.any())]
                per = space.sum_per_sample(bad, template) > 0
                at = ""
                if steps is not None:
                    shown = steps.reshape(-1)[per.to(steps.device)][:5].tolist()
                    at = self._at_times(shown)
                raise FloatingPointError(
                    f"{who}: the denoiser ({type(self.denoiser).__name__}) returned non-finite "
                    f"(NaN/Inf) {self._prediction} ({', '.join(where)}) for sample(s) "
                    f"{_first_indices(per)}{at}{scale}"
                )
        flat = value.detach().reshape(-1)
        samples = (
            f" for sample(s) {_first_indices(~torch.isfinite(flat))}" if flat.numel() > 1 else ""
        )
        raise FloatingPointError(
            f"{who}: {what} is {flat[~torch.isfinite(flat)][:5].tolist()}{samples} although the "
            f"data, the canonical pose and the denoiser's output are finite: the arithmetic "
            f"overflowed{_scale_note(space.state(data), always=True)}"
        )

    def _regression_loss(
        self,
        data: Any,
        space: Space,
        canon: CanonOutput,
        x: State,
        target: State,
        pred: State,
        t: Tensor,
    ) -> Any:
        """The ``LossOutput`` of a regression of ``pred`` on ``target`` at times ``t [B]``.

        Squared error per dimension of each sample, averaged over the batch, plus the
        canonicalizer's prior loss; checked for non-finite values (``x``: the canonical
        state).
        """
        from canonwrap.diffusion import LossOutput  # defined there, where it is documented

        template = canon.canonical
        sq = space.sum_per_sample(tuple((a - b) ** 2 for a, b in zip(target, pred)), template)
        per_sample = sq / space.loss_dims(template).to(sq)
        denoising = per_sample.mean()
        loss = denoising
        terms = {"denoising": denoising.detach()}
        if canon.prior_loss is not None:
            loss = loss + canon.prior_loss
            terms["prior"] = canon.prior_loss.detach()
        self._require_finite(
            "training_loss",
            "the loss",
            loss,
            space,
            data,
            template,
            canonical=x,
            eps_hat=pred,
            steps=t,
            prior=canon.prior_loss,
        )
        return LossOutput(
            loss=loss,
            denoising=denoising,
            per_sample=per_sample,
            t=t,
            prior=canon.prior_loss,
            terms=terms,
        )

    def _sample_device(self, device: Any) -> Any:
        """``device`` or the device of the parameters (CPU without parameters)."""
        if device is None:
            p = next(iter(self.parameters()), None)
            device = p.device if p is not None else torch.device("cpu")
        return device

    def _posed(self, out: Any, b: int, randomize_pose: bool, generator, dtype, device) -> Any:
        """``out`` (``b`` samples) with a Haar-random group element applied if asked."""
        if randomize_pose:
            group = self.canonicalizer.group
            if group.is_compact:
                g = group.random(b, generator=generator, dtype=dtype, device=device)
                if isinstance(out, Tensor):
                    # the canonicalizer's own action (``UnitRange``: corners that a rotation
                    # brings in take the background value, not 0); point clouds keep the bare
                    # action, since their canonicalizers' ``normalize`` would re-centre samples
                    # that are centred already
                    out = self.canonicalizer.apply_inverse(out, group.inverse(g))
                else:
                    out = group.act(g, out)
        return out

    # ------------------------------------------------------------------ public API
    def canonicalize(self, data: Any) -> CanonOutput:
        """Canonical pose of ``data`` with the group element per sample."""
        return self.canonicalizer(data)

    def _sampling_template(
        self, num_samples, shape, num_nodes, generator, dtype, device, max_graph_bytes=None
    ):
        """The space to sample in and an all-zero batch of the requested sizes."""
        space = self.space
        if space is None and self.point_features is not None:
            space = PointCloudSpace(num_features=self.point_features)
        if isinstance(space, PointCloudSpace):
            template = space.template(
                self._sizes(space, num_samples, shape, num_nodes, generator),
                dtype=dtype,
                device=device,
                num_features=self.point_features,
            )
            _check_graph_memory(nodes_per_graph(template), dtype, device, max_graph_bytes)
            self._check_placement(template.pos, f"sample(dtype={dtype})")
            return space, template
        if num_nodes is not None:
            raise ValueError(
                "num_nodes is for point clouds, and this model does not know their number of "
                "node features F yet: train it on a batch first, load its weights, or give "
                f"{type(self).__name__}(space=PointCloudSpace(num_features=F))"
            )
        if shape is None:
            raise ValueError("give `shape` (tensors) or `num_nodes` (point clouds) to sample")
        space = space if space is not None else TensorSpace()
        if not isinstance(space, TensorSpace):
            raise ValueError(
                f"sample() builds batches for TensorSpace and PointCloudSpace; got "
                f"{type(space).__name__}"
            )
        full = (int(num_samples),) + tuple(shape) if num_samples is not None else tuple(shape)
        if len(full) < 2 or any(int(d) < 1 for d in full):
            raise ValueError(
                f"cannot sample the batch shape {full}: it needs a batch size and at least one "
                "more dimension, all >= 1 (num_samples=B with shape of one sample, or the "
                "batch shape alone)"
            )
        template = space.template(full, dtype=dtype, device=device)
        self._check_placement(template, f"sample(dtype={dtype})")
        return space, template

    @staticmethod
    def _sizes(space: PointCloudSpace, num_samples, shape, num_nodes, generator) -> Any:
        """Number of nodes of each point cloud to sample: given, or drawn from the space."""
        if shape is not None:
            raise ValueError(
                "`shape` is for tensor data; this model generates point clouds: give "
                "num_nodes=[n_1, ..., n_B] or num_samples=B"
            )
        if num_nodes is not None:
            if num_samples is not None and int(num_samples) != len(num_nodes):
                raise ValueError(
                    f"num_samples={num_samples} but num_nodes has {len(num_nodes)} entries"
                )
            return num_nodes
        if num_samples is None or int(num_samples) < 1:
            raise ValueError(
                f"give num_samples=B >= 1 or num_nodes=[n_1, ..., n_B]; got "
                f"num_samples={num_samples}"
            )
        if space.node_counts is None:
            raise ValueError(
                f"sample(num_samples={num_samples}) draws the size of each point cloud from "
                f"the space's node_counts, but this {type(space).__name__} has none: give "
                "num_nodes=[n_1, ..., n_B], or build the space with node_counts="
                "NodeCountDistribution(histogram)"
            )
        return space.node_counts.sample(int(num_samples), generator=generator)
