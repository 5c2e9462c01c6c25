"""Public entry points reject bad input with a message that says what is wrong.

Checks already covered elsewhere are not repeated here: non-finite and empty data, wrong
``pos`` shapes, wrong denoiser output shapes, devices (``test_diffusion.py``), unknown atom
types (``data/test_qm9.py``), corrupt QM9 caches and qm9pack files (``data/test_qm9.py``),
incompatible checkpoints (``training/test_checkpoint.py``), bad molecules in ``metrics.evaluate``
(``metrics/test_molecules.py``), non-square images and wrong channel counts
(``canonicalizers/test_discrete_rotation.py``, ``groups/test_groups.py``) and the EGNN
canonicalizer's feature width (``canonicalizers/test_egnn_canonicalizer.py``). Non-finite
denoiser outputs, overflowing data, times ``t`` and input dtypes of the provided networks,
the memory estimate of ``sample`` and sizes outside the node-count histogram are in
``test_entry_checks.py``; corrupt image files in ``data/test_rotmnist.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch_geometric.data import Batch, Data

from canonwrap import CanonicalizedDiffusion
from canonwrap.canonicalizers import CenterOfMass
from canonwrap.data.qm9 import qm9_features
from canonwrap.data.rotmnist import read_amat, read_idx
from canonwrap.groups import rotate_images
from canonwrap.groups.images import CyclicRotations
from canonwrap.molecules import MoleculeSpace
from canonwrap.schedules import PolynomialSchedule
from canonwrap.spaces import PointCloudSpace
from canonwrap.training import Trainer

torch.set_num_threads(1)


class Linear(nn.Module):
    """``eps_hat = W [z, t]`` for tensors ``[B, 4]``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(5, 4)

    def forward(self, z, t):
        return self.net(torch.cat([z, t[:, None]], -1))


class Zero(nn.Module):
    """Predicts zero noise for point clouds with ``width - 3`` features."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, z, t):
        return torch.zeros(z.pos.shape[0], self.width, dtype=z.pos.dtype)


def molecules(*zs: list[int]) -> Batch:
    g = torch.Generator().manual_seed(0)
    return Batch.from_data_list(
        [
            Data(
                pos=torch.randn(len(z), 3, generator=g, dtype=torch.float64),
                x=qm9_features(z).double(),
            )
            for z in zs
        ]
    )


# ------------------------------------------------------------------ CanonicalizedDiffusion


def test_integer_data_and_non_callable_denoisers():
    model = CanonicalizedDiffusion(Linear())
    with pytest.raises(TypeError, match="floating-point tensor, got torch.int64"):
        model.training_loss(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="floating-point tensor, got torch.int32"):
        model.nll(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="denoiser must be callable, got str"):
        CanonicalizedDiffusion("unet")


def test_denoiser_with_the_wrong_signature_is_named():
    class OneArg(nn.Module):
        def forward(self, z):
            return z

    data = torch.randn(3, 4)
    with pytest.raises(TypeError, match=r"denoiser\(z_t, t\).*OneArg\.forward\(z\)"):
        CanonicalizedDiffusion(OneArg()).training_loss(data)
    with pytest.raises(TypeError, match=r"denoiser\(z_t, t\).*<lambda>\(z\)"):
        CanonicalizedDiffusion(lambda z: z).nll(data)

    class Inner(nn.Module):  # a TypeError raised inside a well-formed denoiser is kept
        def forward(self, z, t):
            return torch.cat(z, t)

    with pytest.raises(TypeError) as err:
        CanonicalizedDiffusion(Inner()).training_loss(data)
    assert "denoiser(z_t, t)" not in str(err.value)


def test_features_and_positions_of_different_lengths():
    data = Batch.from_data_list([Data(pos=torch.randn(5, 3), x=torch.randn(4, 2))])
    model = CanonicalizedDiffusion(Zero(5), CenterOfMass())
    with pytest.raises(ValueError, match=r"x must be \[N=5, F\]; got \(4, 2\)"):
        model.training_loss(data)


class Graphs(torch.utils.data.Dataset):
    """A map-style dataset of single graphs, as QM9 is."""

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return Data(pos=torch.randn(4, 3), x=torch.randn(4, 2))


@pytest.mark.parametrize("method", ["training_loss", "nll"])
@pytest.mark.parametrize("kind", ["list", "dataset"])
def test_uncollated_graphs_are_sent_to_batch_from_data_list(method, kind):
    graphs = Graphs() if kind == "dataset" else [Graphs()[i] for i in range(3)]
    want = r"a list of 3 Data objects" if kind == "list" else r"a dataset \(Graphs\)"
    for space in (None, PointCloudSpace()):
        model = CanonicalizedDiffusion(Zero(5), CenterOfMass(), space=space)
        with pytest.raises(TypeError, match=want + r".*Batch\.from_data_list.*DataLoader"):
            getattr(model, method)(graphs)
    with pytest.raises(TypeError, match=r"Data/Batch.*a list of 3 Data objects"):
        CenterOfMass()([Graphs()[i] for i in range(3)])


def test_egnn_canonicalizer_on_featureless_data_suggests_num_features_0():
    from canonwrap.canonicalizers import EGNNCanonicalizer

    data = Batch.from_data_list([Data(pos=torch.randn(4, 3)) for _ in range(2)])
    with pytest.raises(
        ValueError, match=r"got None \(.*no node features: pass EGNNCanonicalizer\(num_features=0\)"
    ):
        EGNNCanonicalizer(hidden=4, layers=1)(data)
    data = Batch.from_data_list([Data(pos=torch.randn(4, 3), x=torch.randn(4, 2))])
    with pytest.raises(ValueError, match=r"pass EGNNCanonicalizer\(num_features=2\)"):
        EGNNCanonicalizer(hidden=4, layers=1)(data)


def test_dtype_mismatch_names_both_dtypes_and_the_fix():
    data64 = molecules([6, 1, 1], [8, 1])
    denoiser = Zero(9)
    denoiser.weight = nn.Parameter(torch.zeros(1))  # float32 parameters
    model = CanonicalizedDiffusion(
        denoiser, CenterOfMass(), schedule=PolynomialSchedule(5), space=MoleculeSpace()
    )
    for method in ("training_loss", "nll"):
        with pytest.raises(
            ValueError,
            match=r"data is torch\.float64 but the model's parameters are torch\.float32; .*"
            r"model\.to\(torch\.float64\).*\.to\(torch\.float32\)",
        ):
            getattr(model, method)(data64)
    with pytest.raises(ValueError, match=r"data is torch\.float64 .*torch\.float32"):
        CanonicalizedDiffusion(Linear()).training_loss(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"sample\(dtype=torch\.float64\) .*torch\.float32"):
        model.sample(num_nodes=[3], dtype=torch.float64)
    assert model.sample(num_nodes=[3]).pos.dtype == torch.float32  # default: the model's


def test_denoiser_output_shape_message_states_f():
    data = Batch.from_data_list([Data(pos=torch.randn(4, 3), x=torch.randn(4, 6))] * 2)
    model = CanonicalizedDiffusion(Zero(3), CenterOfMass())
    with pytest.raises(
        ValueError, match=r"output shape \(8, 3\) .*expected \[N, 3 \+ F\] = \[8, 9\] with F=6"
    ):
        model.training_loss(data)


@pytest.mark.parametrize(
    "num_samples, shape",
    [(-2, (4,)), (0, (4,)), (2, (-1,)), (2, (0, 3)), (3, ()), (None, (4,))],
)
def test_sample_rejects_empty_or_negative_shapes(num_samples, shape):
    model = CanonicalizedDiffusion(Linear(), schedule=PolynomialSchedule(5))
    with pytest.raises(ValueError, match="cannot sample the batch shape"):
        model.sample(num_samples, shape=shape)


@pytest.mark.parametrize(
    "num_nodes, match",
    [
        ([3, 0], "at least one node"),
        ([3, -1], "at least one node"),
        ([2.5], "integers"),
        ([], "empty"),
    ],
)
def test_sample_rejects_bad_node_counts(num_nodes, match):
    space = PointCloudSpace(num_features=0)
    model = CanonicalizedDiffusion(Zero(3), schedule=PolynomialSchedule(5), space=space)
    with pytest.raises(ValueError, match=match):
        model.sample(num_nodes=num_nodes)
    assert space.template(torch.tensor([2.0, 3.0])).num_graphs == 2  # integral floats are fine


# ------------------------------------------------------------------ schedules


@pytest.mark.parametrize("t", [-0.5, 1.5, math.nan, 1.0 + 1e-4])
def test_schedule_rejects_times_outside_the_unit_interval(t):
    sched = PolynomialSchedule(10)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        sched.gamma(torch.tensor([0.5, t], dtype=torch.float64))


def test_schedule_rejects_integer_steps_and_clamps_rounding():
    sched = PolynomialSchedule(10)
    with pytest.raises(ValueError, match="t / T"):
        sched.gamma(torch.tensor([3, 7]))
    t = torch.tensor([-1e-9, 0.0, 1.0, 1.0 + 1e-9], dtype=torch.float64)
    assert torch.equal(sched.gamma(t), sched.gammas[[0, 0, 10, 10]])
    assert torch.equal(sched.gamma(torch.tensor([0, 1])), sched.gammas[[0, 10]])


# ------------------------------------------------------------------ molecules


def test_one_atom_molecules_have_a_finite_nll():
    model = CanonicalizedDiffusion(
        Zero(9), CenterOfMass(), schedule=PolynomialSchedule(10), space=MoleculeSpace()
    )
    out = model.nll(molecules([6], [8, 1, 1]), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.nll).all()
    assert out.dims.tolist() == [6.0, 2 * 3 + 3 * 6.0]  # one atom: 0 position dimensions
    # bare point clouds of one node have no dimension at all
    bare = CanonicalizedDiffusion(Zero(3), CenterOfMass(), schedule=PolynomialSchedule(10))
    one = Batch.from_data_list([Data(pos=torch.randn(1, 3, dtype=torch.float64))] * 2)
    out = bare.nll(one, exact=True)
    assert out.dims.tolist() == [0.0, 0.0] and torch.equal(out.nll, torch.zeros(2).double())


@pytest.mark.parametrize("case", ["unscaled", "soft"])
def test_molecule_nll_rejects_features_that_are_not_one_hot(case):
    data = molecules([6, 1, 1])
    if case == "unscaled":
        data.x[:, :5] = data.x[:, :5] * 4  # one-hot not divided by onehot_scale
    else:
        data.x[1, :5] = torch.tensor([0.1, 0.1, 0.0, 0.05, 0.0], dtype=torch.float64)
    model = CanonicalizedDiffusion(
        Zero(9), CenterOfMass(), schedule=PolynomialSchedule(10), space=MoleculeSpace()
    )
    with pytest.raises(ValueError, match=r"not one-hot atom types divided by onehot_scale=4"):
        model.nll(data)


def test_decode_needs_the_feature_columns():
    space = MoleculeSpace()
    with pytest.raises(ValueError, match=r"decode needs x \[N=3, F=6\].*got None"):
        space.decode(Batch.from_data_list([Data(pos=torch.zeros(3, 3))]))
    with pytest.raises(ValueError, match=r"got \(3, 5\)"):
        space.decode(Batch.from_data_list([Data(pos=torch.zeros(3, 3), x=torch.zeros(3, 5))]))


# ------------------------------------------------------------------ checkpoints


def test_resume_from_a_truncated_checkpoint_names_the_file(tmp_path):
    def trainer(model):
        return Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            [torch.ones(2, 2)],
            loss_fn=lambda m, b: m(b).square().mean(),
            checkpoint_dir=tmp_path,
            max_steps=1,
            progress=False,
        )

    torch.manual_seed(0)
    trainer(nn.Linear(2, 1)).fit()
    path = tmp_path / "ckpt_000000001.pt"
    data = path.read_bytes()
    model = nn.Linear(2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    for cut in (0, len(data) // 2, len(data) - 8):
        path.write_bytes(data[:cut])
        with pytest.raises(
            ValueError,
            match=rf"cannot read checkpoint .*ckpt_000000001\.pt \({cut} bytes; truncated",
        ):
            trainer(model).resume(tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# ------------------------------------------------------------------ images


def test_read_idx_rejects_bad_magic_and_truncated_files(tmp_path):
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in (2, 28, 28))
    bad = tmp_path / "bad-magic"
    bad.write_bytes(b"\x1f\x00" + header[2:] + bytes(2 * 28 * 28))
    with pytest.raises(ValueError, match="bad-magic: not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(header + bytes(28 * 28 + 5))
    with pytest.raises(ValueError, match=r"short: truncated \(789 of 1568 bytes"):
        read_idx(short)


def test_read_amat_rejects_truncated_and_corrupt_rows(tmp_path):
    row = " ".join(["0.5"] * 784) + " 3\n"
    path = tmp_path / "digits.amat"
    path.write_text(row + row[: len(row) // 2] + "\n")
    with pytest.raises(ValueError, match=r"digits\.amat: not a valid \.amat file.*row 2"):
        read_amat(path)
    path.write_text(row + row.replace("0.5", "x", 1))
    with pytest.raises(ValueError, match=r"digits\.amat: not a valid \.amat file"):
        read_amat(path)
    path.write_text("")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="holds no rows"):
        read_amat(path)


def test_interpolated_rotation_needs_float_images():
    images = torch.arange(2 * 25, dtype=torch.uint8).view(2, 1, 5, 5)
    with pytest.raises(TypeError, match="floating-point images; got torch.uint8"):
        CyclicRotations(8).act(torch.tensor([0, 1]), images)
    angles = torch.tensor([math.pi / 2, math.pi], dtype=torch.float64)
    quarter = rotate_images(images, angles)  # multiples of 90 degrees are exact: fine
    assert torch.equal(quarter[0], torch.rot90(images[0], 1, dims=(-2, -1)))


def test_discrete_rotation_canonicalizer_rejects_non_tensors():
    pytest.importorskip("escnn")
    from canonwrap.canonicalizers import DiscreteRotationCanonicalizer

    canon = DiscreteRotationCanonicalizer(n=4, hidden=1, layers=2, kernel_size=3, downsample=0)
    with pytest.raises(TypeError, match="image tensor .* got ndarray"):
        canon(np.zeros((1, 1, 9, 9), dtype=np.float32))
