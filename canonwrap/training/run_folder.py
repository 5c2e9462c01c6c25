"""One run per folder: a lock file with the holder's process id, the claim of a run folder
(refused when it holds another run, unless resuming or overwriting), and the checks of a
checkpoint folder before training (writable, no orphan temporary files).

Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

try:  # POSIX: the kernel drops the lock when its holder dies, however it dies
    import fcntl
except ImportError:  # pragma: no cover - Windows: the process id alone decides
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunLock", "claim_run_folder"]

LOCK_NAME = "run.lock"
"""File name of the lock that [`RunLock`][canonwrap.training.RunLock] keeps in a folder."""
# what atomic_open leaves behind when a save is killed midway, and the writability probe
_ORPHAN_RE = re.compile(r"^\.(ckpt_\d+\.pt|log\.jsonl)\..+\.tmp$|^\.write-test-.*\.tmp$")
_CKPT_RE = re.compile(r"^ckpt_\d+\.pt$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:  # pragma: no cover - e.g. an invalid pid on some platforms
        return False
    return True


def _describe_holder(info: dict[str, Any]) -> str:
    if not info:
        return "an unknown process"
    started = info.get("started")
    when = f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}"
    return f"process {info.get('pid')} on {info.get('host')}" + (when if started else "")


class RunLock:
    """A lock file ``<folder>/run.lock`` that keeps a second live run out of ``folder``.

    The file records the holder's process id, host and start time. On POSIX the file is
    also ``flock``-ed, so the lock disappears with its holder however that ends (a
    ``SIGKILL`` included); the next run then takes the stale file over with a warning that
    names the process it came from. Without ``flock`` (Windows) a lock whose process id is
    not running on this host is stale.

    Use as a context manager (which takes the lock unless it is held already and releases
    it at the end), or call [`acquire`][canonwrap.training.RunLock.acquire] and
    [`release`][canonwrap.training.RunLock.release].

    Parameters
    ----------
    folder : path
        The folder to lock (created if missing).
    name : str, default "run.lock"
        File name of the lock.
    """

    def __init__(self, folder: str | os.PathLike[str], name: str = LOCK_NAME) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def _busy(self, info: dict[str, Any]) -> RuntimeError:
        return RuntimeError(
            f"{self.folder} is in use by {_describe_holder(info)} (lock file {self.path}); two "
            "runs in one folder would overwrite and prune each other's checkpoints. Wait for "
            "it to finish or use another folder"
            + ("" if fcntl is not None else "; delete the lock file if that process is gone")
        )

    def _read(self) -> dict[str, Any]:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def acquire(self) -> RunLock:
        """Take the lock, or raise ``RuntimeError`` naming the live process that holds it.

        Returns
        -------
        RunLock
            ``self``.
        """
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            if fcntl is None:  # pragma: no cover - Windows
                fd, previous = self._acquire_by_pid()
            else:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                except OSError as err:
                    raise PermissionError(
                        f"cannot create the lock file {self.path} ({type(err).__name__}: "
                        f"{err}): is {self.folder} writable?"
                    ) from err
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise self._busy(self._read()) from None
                # the holder may have removed the file between our open and our flock
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                previous = self._read()
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode("utf-8"))
            os.fsync(fd)
            self._fd = fd
            if previous:
                pid, host = previous.get("pid"), previous.get("host")
                here = host == socket.gethostname() and isinstance(pid, int)
                state = (
                    "is no longer running" if here and not _pid_alive(pid) else "holds it no more"
                )
                warnings.warn(
                    f"taking over the stale lock {self.path} of {_describe_holder(previous)}, "
                    f"which {state} (a run that ended without releasing it)",
                    stacklevel=2,
                )
            return self
        raise RuntimeError(f"could not take the lock {self.path}: it keeps changing")

    def _acquire_by_pid(self) -> tuple[int, dict[str, Any]]:  # pragma: no cover - Windows
        previous: dict[str, Any] = {}
        for _ in range(10):
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), previous
            except FileExistsError:
                info = self._read()
                pid = info.get("pid")
                same_host = info.get("host") == socket.gethostname()
                if not isinstance(pid, int) or not same_host or _pid_alive(pid):
                    raise self._busy(info) from None
                previous = info
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        raise RuntimeError(f"could not take the lock {self.path}")

    def release(self) -> None:
        """Remove the lock file and drop the lock (nothing happens if it is not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self if self.held else self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.release()


def _summary(entries: list[Path], checkpoint_dir: str) -> str:
    parts = []
    for entry in entries[:8]:
        if entry.is_dir() and not entry.is_symlink():
            ckpts = sorted(p.name for p in entry.iterdir() if _CKPT_RE.match(p.name))
            what = f"{len(ckpts)} checkpoints, newest {ckpts[-1]}" if ckpts else "folder"
            parts.append(f"{entry.name}/ ({what})")
        else:
            parts.append(entry.name)
    more = f" and {len(entries) - 8} more" if len(entries) > 8 else ""
    return ", ".join(parts) + more


def claim_run_folder(
    folder: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_dir: str = "checkpoints",
) -> RunLock:
    """Lock ``folder`` for one training run; refuse it when it already holds another run.

    A fresh run (neither ``resume`` nor ``overwrite``) needs an empty or missing folder:
    anything in it (checkpoints, ``config.json``, logs, samples) belongs to another run,
    which a fresh run would mix with its own files. ``resume`` continues what is there;
    ``overwrite`` deletes everything in the folder first, with a warning that lists it.
    Claim the run's top folder: a [`Trainer`][canonwrap.training.Trainer] locks its own
    ``checkpoint_dir`` (a sub-folder) while it trains.

    Parameters
    ----------
    folder : path
        The run's output folder (created if missing).
    resume : bool, default False
        The run continues the one in ``folder``.
    overwrite : bool, default False
        Delete the folder's contents (never the folder itself, the current working
        directory, one of its parents or the home directory).
    checkpoint_dir : str, default "checkpoints"
        Sub-folder of the checkpoints, summarised in messages.

    Returns
    -------
    RunLock
        The held lock of ``folder``: release it (or use it as a context manager) when the
        run ends.

    Raises
    ------
    FileExistsError
        If ``folder`` holds another run and neither ``resume`` nor ``overwrite`` is given.
    RuntimeError
        If another live process holds the folder's lock.
    ValueError
        If both ``resume`` and ``overwrite`` are given, or ``overwrite`` would delete the
        contents of the working directory, one of its parents or the home directory.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run or delete it")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"run folder {folder} is a file")
    lock = RunLock(folder).acquire()
    try:
        entries = sorted(p for p in folder.iterdir() if p.name != lock.path.name)
        if entries and not resume:
            found = _summary(entries, checkpoint_dir)
            if not overwrite:
                raise FileExistsError(
                    f"{folder} already holds a run ({found}); resume it, overwrite it (which "
                    "deletes these files) or choose another folder"
                )
            target = folder.resolve()
            protected = [Path.cwd().resolve(), *Path.cwd().resolve().parents, Path.home()]
            if target in protected:
                raise ValueError(
                    f"refusing to overwrite {folder}: it is the working directory, one of its "
                    "parents or the home directory"
                )
            warnings.warn(f"overwrite: deleting the earlier run in {folder}: {found}", stacklevel=2)
            for entry in entries:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    except BaseException:
        lock.release()
        raise
    return lock


def _open_checkpoint_dir(directory: Path, log_name: str) -> tuple[RunLock, list[str]]:
    """Check that ``directory`` takes checkpoints and logs, lock it, remove orphan temporaries.

    Returns the held lock and the names of the temporary files removed (left by saves
    killed midway). Raises ``PermissionError``, ``NotADirectoryError`` or ``ValueError``
    naming what is wrong, and ``RuntimeError`` when another live run holds the folder.
    """
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"checkpoint_dir {directory} exists and is not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", suffix=".tmp", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(
            f"checkpoint folder {directory} is not writable ({type(err).__name__}: {err}); "
            "nothing was trained"
        ) from err
    log = directory / log_name
    if log.exists() or log.is_symlink():
        if not log.is_file():
            raise ValueError(f"{log} is not a regular file, where the training log is written")
        try:
            with open(log, "a", encoding="utf-8"):
                pass
        except OSError as err:
            raise PermissionError(
                f"training log {log} is not writable ({type(err).__name__}: {err}); nothing "
                "was trained"
            ) from err
    lock = RunLock(directory).acquire()
    removed = []
    for entry in sorted(directory.iterdir()):
        if _ORPHAN_RE.match(entry.name) and entry.is_file():
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry.name)
    return lock, removed
