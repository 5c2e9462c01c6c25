"""One run per folder (locks, refusal, overwrite) and the checks of a checkpoint folder before
training (writable, no non-file under a checkpoint's name, orphan temporaries removed)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from canonwrap.training import RunLock, claim_run_folder, find_latest_checkpoint
from canonwrap.training import run_folder as run_folder_module
from tests.training.helpers import make_trainer, seed_all

ROOT = Path(__file__).resolve().parents[2]

# a second process that takes the lock with the library's module alone (no torch import)
HOLDER = textwrap.dedent(
    """
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("run_folder", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lock = module.RunLock(sys.argv[2]).acquire()
    print("locked", flush=True)
    sys.stdin.readline()
    lock.release()
    """
)


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(ROOT / "canonwrap/training/run_folder.py"), str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _steps_run(trainer) -> list[int]:
    calls = []
    inner = trainer.loss_fn

    def counting(model, batch):
        calls.append(1)
        return inner(model, batch)

    trainer.loss_fn = counting
    return calls


# ----------------------------------------------------------------- locks


def test_a_live_process_keeps_the_folder_and_its_death_frees_it(tmp_path):
    """Two runs in one folder: the second is refused while the first lives (another process),
    and takes the lock over, with a message naming the dead process, after a SIGKILL."""
    folder = tmp_path / "run"
    holder = _holder(folder)
    try:
        with pytest.raises(RuntimeError, match=f"in use by process {holder.pid} on "):
            claim_run_folder(folder)
        trainer = make_trainer(folder, max_steps=2)
        calls = _steps_run(trainer)
        with pytest.raises(RuntimeError, match=f"in use by process {holder.pid}"):
            trainer.fit()
        assert calls == [] and find_latest_checkpoint(folder) is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((folder / "run.lock").read_text())["pid"] == holder.pid  # left behind
    with pytest.warns(UserWarning, match=f"stale lock .*process {holder.pid} .*no longer running"):
        lock = claim_run_folder(folder)
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not (folder / "run.lock").exists()


def test_a_lock_released_normally_leaves_nothing(tmp_path):
    holder = _holder(tmp_path)
    holder.communicate("\n")
    assert holder.returncode == 0 and not (tmp_path / "run.lock").exists()
    with RunLock(tmp_path) as lock:
        assert lock.held
        with pytest.raises(RuntimeError, match=f"in use by process {os.getpid()}"):
            RunLock(tmp_path).acquire()  # a second run in the same process too
    assert not lock.held and list(tmp_path.iterdir()) == []


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": "h", "started": 0}))
    with pytest.warns(UserWarning, match=f"taking over the stale lock .*process {dead.pid} on h"):
        RunLock(tmp_path).acquire().release()
    host = socket.gethostname()
    (tmp_path / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": host}))
    with pytest.warns(UserWarning, match=f"process {dead.pid} on {host}, which is no longer"):
        RunLock(tmp_path).acquire().release()


# ----------------------------------------------------------------- one run per folder


def test_a_fresh_run_refuses_another_runs_folder(tmp_path):
    folder = tmp_path / "run"
    seed_all(0)
    make_trainer(folder / "checkpoints", max_steps=2, checkpoint_every=1).fit()
    (folder / "config.json").write_text("{}")
    with pytest.raises(FileExistsError) as err:
        claim_run_folder(folder)
    msg = str(err.value)
    assert "already holds a run" in msg and "config.json" in msg
    assert "checkpoints/ (2 checkpoints, newest ckpt_000000002.pt)" in msg
    assert find_latest_checkpoint(folder / "checkpoints").name == "ckpt_000000002.pt"
    assert not (folder / "run.lock").exists()  # the refused claim let go of the lock
    with claim_run_folder(folder, resume=True):
        assert (folder / "config.json").exists()
    with pytest.raises(ValueError, match="exclude each other"):
        claim_run_folder(folder, resume=True, overwrite=True)
    with pytest.warns(UserWarning, match="overwrite: deleting .*checkpoints/ .*config.json"):
        lock = claim_run_folder(folder, overwrite=True)
    assert [p.name for p in folder.iterdir()] == ["run.lock"]
    lock.release()
    claim_run_folder(folder).release()  # empty now: a fresh run may start


def test_overwrite_never_clears_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for target in (".", tmp_path, tmp_path.parent):
        with pytest.raises(ValueError, match="refusing to overwrite"):
            claim_run_folder(target, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_examples_refuse_an_occupied_folder_before_any_work(tmp_path, monkeypatch):
    from tests.helpers import load_script

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"x": 1}, out / "checkpoints" / "ckpt_000000030.pt")
    qm9 = load_script("examples/qm9.py")
    monkeypatch.setattr(qm9, "QM9", None)  # fails at once if the refusal came too late
    with pytest.raises(FileExistsError, match="ckpt_000000030.pt"):
        qm9.main(["train", "--model", "gdm", "--quick", "--out", str(out), "--no-progress"])
    with pytest.raises(ValueError, match="exclude each other"):
        qm9.main(["train", "--quick", "--out", str(out), "--resume", "--overwrite"])
    rot = load_script("examples/rotmnist.py")
    args = Namespace(out=str(tmp_path), resume=False, overwrite=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        rot.run_config("run", {}, None, args)


# ----------------------------------------------------------------- checks before training


def test_an_unwritable_checkpoint_folder_fails_before_the_first_step(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path / "ckpt", max_steps=3)
    calls = _steps_run(trainer)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_folder_module.tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError, match="ckpt is not writable .*nothing was trained"):
        trainer.fit()
    assert calls == [] and trainer.state.step == 0


def test_an_unwritable_run_folder_is_named(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_folder_module.os, "open", refuse)
    with pytest.raises(PermissionError, match=r"cannot create the lock file .*run.lock"):
        claim_run_folder(tmp_path / "run")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_a_read_only_checkpoint_folder_fails_before_the_first_step(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        trainer = make_trainer(folder, max_steps=3)
        calls = _steps_run(trainer)
        with pytest.raises(PermissionError, match="not writable"):
            trainer.fit()
        assert calls == []
    finally:
        folder.chmod(0o700)


def test_a_file_or_folder_in_the_wrong_place_fails_before_the_first_step(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        make_trainer(tmp_path / "file", max_steps=1).fit()
    (tmp_path / "ckpt" / "log.jsonl").mkdir(parents=True)
    with pytest.raises(ValueError, match="log.jsonl is not a regular file"):
        make_trainer(tmp_path / "ckpt", max_steps=1).fit()


def test_a_folder_named_like_the_newest_checkpoint_is_an_error_not_a_rollback(tmp_path):
    seed_all(0)
    make_trainer(tmp_path, max_steps=4, checkpoint_every=2, log_every=1).fit()
    log_before = (tmp_path / "log.jsonl").read_text()
    (tmp_path / "ckpt_000000009.pt").mkdir()
    trainer = make_trainer(tmp_path, max_steps=6)
    with pytest.raises(ValueError, match=r"ckpt_000000009.pt is a folder, where a checkpoint"):
        trainer.resume()
    assert trainer.state.step == 0
    assert (tmp_path / "log.jsonl").read_text() == log_before  # no records dropped
    with pytest.raises(ValueError, match="is a folder"):
        find_latest_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="is a folder"):
        trainer.fit()  # nor does a fresh start ignore it


def test_orphan_temporary_files_are_removed_at_start(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    orphans = [".ckpt_000000002.pt.k3j4h5_1.tmp", ".log.jsonl.abcd1234.tmp"]
    for name in orphans:
        (tmp_path / name).write_bytes(b"half a file")
    (tmp_path / ".notes.tmp").write_text("not ours")
    trainer = make_trainer(tmp_path, max_steps=1)
    with pytest.warns(UserWarning, match="removed 2 temporary file.*interrupted: " + orphans[0]):
        trainer.fit()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".notes.tmp", "ckpt_000000001.pt", "log.jsonl"]


def test_list_checkpoints_orders_by_step_and_refuses_folders(tmp_path):
    from canonwrap.training import list_checkpoints

    assert list_checkpoints(tmp_path / "missing") == []
    for step in (10, 2, 300):
        (tmp_path / f"ckpt_{step:09d}.pt").write_bytes(b"x")
    (tmp_path / "ckpt_7.pt.tmp").write_bytes(b"x")  # not a checkpoint name
    (tmp_path / "log.jsonl").write_text("")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 10, 300]
    assert list_checkpoints(tmp_path)[-1][1] == find_latest_checkpoint(tmp_path)
    (tmp_path / "ckpt_000000400.pt").mkdir()
    with pytest.raises(ValueError, match="folder"):
        list_checkpoints(tmp_path)
