"""Checkpoint integrity: weights-only loading (crafted pickles run nothing), checksums that
catch altered bytes, no non-finite weights in any checkpoint, resume from the newest
checkpoint that verifies."""

from __future__ import annotations

import ast
import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from canonwrap._io import tree_digest
from canonwrap.evaluation import load_weights
from canonwrap.training import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    Trainer,
    find_latest_checkpoint,
    read_checkpoint,
)
from canonwrap.training.integrity import _with_checksum
from tests.training.helpers import Payload, TinyRegressor, make_trainer, seed_all

ROOT = Path(__file__).resolve().parents[2]


def _trained(folder: Path, steps: int = 2, **kwargs) -> Trainer:
    seed_all(0)
    trainer = make_trainer(folder, max_steps=steps, checkpoint_every=1, log_every=1, **kwargs)
    trainer.fit()
    return trainer


def _ckpt(folder: Path, step: int) -> Path:
    return folder / f"ckpt_{step:09d}.pt"


def _crafted(path: Path, marker: Path, model_state: dict) -> Path:
    torch.save({"format": CHECKPOINT_FORMAT, "model": model_state, "x": Payload(marker)}, path)
    return path


def _overwrite_tensor_bytes(path: Path, tensor: torch.Tensor, count: int = 4) -> None:
    """Overwrite the first ``count`` float64 values of ``tensor`` inside the file ``path``."""
    data = bytearray(path.read_bytes())
    raw = tensor.detach().contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0, "tensor bytes not found once in the file"
    data[at : at + 8 * count] = struct.pack(f"<{count}d", *([0.123] * count))
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------- weights-only loading


def test_the_payload_runs_code_when_unpickled_without_weights_only(tmp_path):
    """Negative control: the crafted file really executes code under a full unpickler."""
    marker = tmp_path / "ran"
    path = _crafted(tmp_path / "evil.pt", marker, {})
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_resume_refuses_a_crafted_pickle(tmp_path):
    run = tmp_path / "run"
    trainer = _trained(run)
    marker = tmp_path / "ran"
    evil = _crafted(_ckpt(run, 3), marker, trainer.model.state_dict())
    fresh = make_trainer(run, max_steps=5)
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*ckpt_000000003.pt"):
        fresh.resume(evil)
    assert fresh.state.step == 0
    with pytest.warns(UserWarning, match=r"skipped 1 newer one\(s\):\n  ckpt_000000003.pt"):
        assert fresh.resume(run).step == 2
    assert not marker.exists()
    assert not evil.exists() and evil.with_name(evil.name + ".corrupt").exists()


def test_load_weights_refuses_a_crafted_pickle(tmp_path):
    marker = tmp_path / "ran"
    model = TinyRegressor().double()
    evil = _crafted(tmp_path / "ckpt_1.pt", marker, model.state_dict())
    with pytest.raises(CheckpointError, match="cannot load checkpoint.*ckpt_1.pt"):
        load_weights(model, evil)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(evil, trainer_only=False)
    assert not marker.exists()


def _torch_load_calls(source: str) -> list[tuple[int, bool]]:
    """``(line, weights_only=True given)`` for every ``torch.load(...)`` call in ``source``."""
    calls = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
        ):
            safe = any(
                k.arg == "weights_only"
                and isinstance(k.value, ast.Constant)
                and k.value.value is True
                for k in node.keywords
            )
            calls.append((node.lineno, safe))
    return calls


def test_every_torch_load_in_package_examples_and_benchmarks_is_weights_only():
    files = [p for d in ("canonwrap", "examples", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    found, unsafe = 0, []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for module in ("pickle", "dill", "cloudpickle", "joblib"):
            assert f"import {module}" not in text, f"{path} imports {module}"
        assert "allow_pickle=True" not in text, path
        for line, safe in _torch_load_calls(text):
            found += 1
            if not safe:
                unsafe.append(f"{path.relative_to(ROOT)}:{line}")
    assert found >= 3  # the checker sees the loaders (integrity, QM9 cache, examples)
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"
    # the checker flags unsafe calls (negative control)
    probe = "torch.load(f, weights_only=False)\nx = torch.load(f)\ntorch.load(f, weights_only=True)"
    assert sorted(_torch_load_calls(probe)) == [(1, False), (2, False), (3, True)]


def test_qm9_example_sample_refuses_a_crafted_checkpoint(tmp_path):
    """``examples/qm9.py sample`` (``load_qm9_run`` -> ``load_weights``) runs no pickled code."""
    from dataclasses import asdict

    from canonwrap.data import qm9 as qm9mod
    from canonwrap.recipes import QM9ModelConfig, qm9_model
    from tests.helpers import load_script

    try:
        qm9mod._qm9pack_csv_paths()
    except FileNotFoundError:
        pytest.skip("qm9pack data not installed")
    config = QM9ModelConfig(denoiser="gnn", canonicalizer="com", hidden=8, layers=1)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_config": asdict(config), "weights": "raw", "remove_h": False})
    )
    (tmp_path / "checkpoints").mkdir()
    marker = tmp_path / "ran"
    _crafted(_ckpt(tmp_path / "checkpoints", 10), marker, qm9_model(config).state_dict())
    qm9 = load_script("examples/qm9.py")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*ckpt_000000010.pt"):
        qm9.main(["sample", "--out", str(tmp_path), "--no-progress"])
    assert not marker.exists()


# ----------------------------------------------------------------- checksums


def test_tree_digest_is_stable_through_save_and_load_and_sees_one_bit(tmp_path):
    trainer = _trained(tmp_path / "run")
    state = trainer.checkpoint_state()
    torch.save(state, tmp_path / "s.pt")
    assert tree_digest(torch.load(tmp_path / "s.pt", weights_only=True)) == tree_digest(state)
    w = state["model"]["net.0.weight"]
    w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(2.0, dtype=w.dtype))  # one ulp
    assert tree_digest(torch.load(tmp_path / "s.pt", weights_only=True)) != tree_digest(state)
    # same bytes, other meaning: dtype, shape, container and number types all count
    x = torch.arange(4, dtype=torch.int32)
    assert tree_digest(x) != tree_digest(x.view(torch.float32))
    assert tree_digest(x) != tree_digest(x.view(2, 2))
    assert tree_digest([1, 2]) != tree_digest((1, 2)) != tree_digest([1.0, 2.0])
    assert tree_digest({"a": 1}) != tree_digest({"a": True})
    assert tree_digest(np.float64(1.5)) != tree_digest(np.float32(1.5))
    assert tree_digest(np.arange(6).reshape(2, 3)[:, ::2]) == tree_digest(
        np.array([[0, 2], [3, 5]])
    )
    with pytest.raises(TypeError, match="cannot checksum a object at /a/0"):
        tree_digest({"a": [object()]})


@pytest.mark.parametrize("where", ["model weight", "optimizer state"])
def test_altered_bytes_are_caught_and_resume_takes_the_newest_that_verifies(tmp_path, where):
    run = tmp_path / "run"
    trainer = _trained(run)
    newest = _ckpt(run, 2)
    saved = torch.load(newest, weights_only=True)
    tensor = (
        saved["model"]["net.0.weight"]
        if where == "model weight"
        else saved["optimizer"]["state"][0]["exp_avg"]
    )
    _overwrite_tensor_bytes(newest, tensor)
    # torch.load alone reads the altered file without a word
    altered = torch.load(newest, weights_only=True)
    assert altered["step"] == 2 and tree_digest(altered) != tree_digest(saved)
    with pytest.raises(CheckpointError, match="ckpt_000000002.pt: checksum mismatch"):
        read_checkpoint(newest)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_weights(TinyRegressor().double(), newest)

    log = run / "log.jsonl"
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]
    fresh = make_trainer(run, max_steps=4)
    with pytest.warns(UserWarning) as record:
        assert fresh.resume().step == 1
    msg = "\n".join(str(w.message) for w in record)
    assert "resuming from ckpt_000000001.pt" in msg
    assert "ckpt_000000002.pt (renamed to ckpt_000000002.pt.corrupt)" in msg
    assert "checksum mismatch" in msg
    # exactly the step-1 weights; the log is cut back to the step actually resumed
    one = torch.load(_ckpt(run, 1), weights_only=True)
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(value, one["model"][name]), name
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1]
    assert find_latest_checkpoint(run) == _ckpt(run, 1)
    fresh.fit()  # and the run goes on from there
    assert read_checkpoint(_ckpt(run, 4))["step"] == 4
    del trainer


def test_unreadable_checkpoints_are_skipped_and_all_bad_is_an_error(tmp_path):
    run = tmp_path / "run"
    _trained(run, steps=3)
    _ckpt(run, 3).write_bytes(_ckpt(run, 3).read_bytes()[:500])  # truncated
    _ckpt(run, 2).write_bytes(bytes(range(256)) * 16)  # random bytes
    fresh = make_trainer(run, max_steps=5)
    with pytest.warns(UserWarning, match=r"skipped 2 newer one\(s\)"):
        assert fresh.resume().step == 1
    _ckpt(run, 1).write_bytes(b"")
    for name in ("ckpt_000000002.pt.corrupt", "ckpt_000000003.pt.corrupt"):
        assert (run / name).is_file()
    other = make_trainer(run, max_steps=5)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* verifies:\n  ckpt_000000001"):
        other.resume()
    assert other.state.step == 0


def test_non_finite_and_unchecksummed_checkpoints_are_refused(tmp_path):
    run = tmp_path / "run"
    _trained(run)
    ckpt = read_checkpoint(_ckpt(run, 2))
    ckpt["ema"]["shadow"]["net.3.bias"][0] = float("nan")
    torch.save(_with_checksum(ckpt), _ckpt(run, 2))  # a valid checksum of bad weights
    with pytest.raises(CheckpointError, match="non-finite weights: ema net.3.bias"):
        read_checkpoint(_ckpt(run, 2))
    ckpt["ema"]["shadow"]["net.3.bias"][0] = 0.0
    torch.save(ckpt, _ckpt(run, 2))  # current format without its checksum
    with pytest.raises(CheckpointError, match="has no checksum"):
        read_checkpoint(_ckpt(run, 2))
    torch.save({**ckpt, "format": "something/else"}, _ckpt(run, 2))
    with pytest.raises(CheckpointError, match="not a canonwrap Trainer checkpoint"):
        read_checkpoint(_ckpt(run, 2))
    # a masked-out buffer may hold -inf: only parameters and the EMA must be finite
    model = TinyRegressor().double()
    model.register_buffer("mask", torch.tensor([0.0, -float("inf")]))
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), [], progress=False)
    trainer.save_checkpoint(tmp_path / "masked.pt")
    assert read_checkpoint(tmp_path / "masked.pt")["model"]["mask"][1] == -float("inf")


def test_checkpoints_of_the_previous_format_load_with_a_warning(tmp_path):
    run = tmp_path / "run"
    trainer = _trained(run)
    ckpt = read_checkpoint(_ckpt(run, 2))
    ckpt["format"] = "canonwrap.trainer/1"
    del ckpt["parameter_names"]
    torch.save(ckpt, _ckpt(run, 2))
    fresh = make_trainer(run, max_steps=4)
    with pytest.warns(UserWarning, match="older canonwrap .*without a checksum"):
        assert fresh.resume().step == 2
    for name, value in fresh.model.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[name]), name


# ----------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("last_step", [False, True])
def test_a_step_that_breaks_the_weights_stops_training_and_keeps_the_last_good_checkpoint(
    tmp_path, last_step
):
    run = tmp_path / "run"
    trainer = _trained(run, steps=3)
    trainer.max_steps = 4 if last_step else 6
    for group in trainer.optimizer.param_groups:
        group["lr"] = float("inf")  # the update overflows (the probe used 3e38 in float32)
    with pytest.raises(FloatingPointError) as err:
        trainer.fit()
    msg = str(err.value)
    assert "non-finite weights after the optimizer step of step 4" in msg
    assert "net.0.weight" in msg and "ema net.0.weight" in msg
    assert "the last good one is " + str(_ckpt(run, 3)) in msg
    assert trainer.state.step == 3
    assert sorted(p.name for p in run.glob("ckpt_*")) == [_ckpt(run, s).name for s in (1, 2, 3)]
    for step in (1, 2, 3):
        read_checkpoint(_ckpt(run, step))  # all verify, all finite
    with pytest.raises(FloatingPointError, match="checkpoint of step 3 not written"):
        trainer.save_checkpoint()
    fresh = make_trainer(run, max_steps=4)
    assert fresh.resume().step == 3
    fresh.fit()
    assert read_checkpoint(_ckpt(run, 4))["step"] == 4


def test_a_non_finite_ema_stops_training(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3, log_every=1)
    next(iter(trainer.ema.shadow.values()))[0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"step 1 .*: ema net.0.weight"):
        trainer.fit()
    assert not list(tmp_path.glob("ckpt_*"))


def test_save_checkpoint_refuses_non_finite_weights(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    with torch.no_grad():
        trainer.model.net[3].bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match="not written .*non-finite weights net.3.bias"):
        trainer.save_checkpoint()
    assert list(tmp_path.iterdir()) == []


def test_finiteness_check_passes_finite_runs_unchanged(tmp_path):
    """The check is silent on a normal run and every checkpoint written verifies."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = _trained(tmp_path / "run", steps=4)
    assert trainer.state.step == 4
    assert read_checkpoint(find_latest_checkpoint(tmp_path / "run"))["step"] == 4


def test_qm9_example_train_stops_on_non_finite_weights(tmp_path):
    """The probe: a learning rate that overflows the weights on the last step used to end
    with exit 0, ``val_loss: nan`` and a checkpoint of NaN weights."""
    from canonwrap.data import qm9 as qm9mod
    from tests.helpers import load_script

    try:
        qm9mod._qm9pack_csv_paths()
    except FileNotFoundError:
        pytest.skip("qm9pack data not installed")
    tiny = ["--quick", "--train-size", "16", "--val-size", "8", "--nll-size", "8", "--hidden",
            "8", "--layers", "1", "--timesteps", "20", "--batch-size", "8", "--threads", "1",
            "--no-progress", "--eval-every", "100"]  # fmt: skip
    out = tmp_path / "run"
    qm9 = load_script("examples/qm9.py")
    with pytest.raises(FloatingPointError, match="optimizer step of step 1 "):
        qm9.main(["train", "--model", "gdm", "--out", str(out), "--max-steps", "1",
                  "--lr", "inf", *tiny])  # fmt: skip
    assert find_latest_checkpoint(out / "checkpoints") is None
    assert not (out / "train_result.json").exists()
    assert not (out / "run.lock").exists() and not (out / "checkpoints" / "run.lock").exists()
