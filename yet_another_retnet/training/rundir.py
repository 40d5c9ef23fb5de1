"""A training run's directory: one run at a time, and ``--overwrite`` that can be undone.

* **An exclusive lock for the run's life.** ``<out>/.retnet-run.lock`` is ``flock``-ed while a
  run (or the checks before it) uses the directory; a second ``retnet train`` on the same ``--out``
  fails at once, before it reads or writes anything there. The kernel drops the lock when its
  holder exits or is killed, so a dead run never keeps it; the file is removed on release.
* **``--overwrite`` replaces the old run only once the new one has a checkpoint.** The old run's
  files move into ``<out>/.previous-run/`` (renames, with a manifest of what moved) and are
  deleted after the new run's first checkpoint is complete; if the new run fails before that, the
  old files come back. A run killed in between leaves ``.previous-run/`` behind, and the next
  command on the directory restores it before it looks at anything (:func:`recover`).
* **A run killed before its first checkpoint** holds its settings and nothing else
  (:func:`state` says ``"unfinished"``): a plain rerun starts it over, ``--resume`` says why it
  cannot continue it.

Only the main process of a distributed run (``RANK`` 0 or unset) takes the lock and moves files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

LOCK_NAME = ".retnet-run.lock"
ASIDE_NAME = ".previous-run"
DISCARD_NAME = ".discarded-run"
_MANIFEST = "MANIFEST.json"

#: Directories whose lock this process holds: resolved path -> [fd, depth].
_held: dict[str, list[int]] = {}


class RunDirectoryBusy(ValueError):
    """Another process is running in (or checking) this run directory."""


def is_main() -> bool:
    return os.environ.get("RANK", "0") in ("0", "")


def _key(out: Path) -> str:
    return os.path.realpath(out)


@contextlib.contextmanager
def hold(out: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``out`` (re-entrant within a process). Creates ``out`` if it is
    missing and removes it again on exit if it is still empty; raises :class:`RunDirectoryBusy`
    at once if another process holds it."""
    out = Path(out)
    key = _key(out)
    if not is_main() or key in _held:
        if key in _held:
            _held[key][1] += 1
        try:
            yield
        finally:
            if key in _held:
                _held[key][1] -= 1
        return
    created = not out.exists()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    # The directories this call creates (out and any missing parents), removed again if left empty.
    made = [d for d in (out.absolute(), *out.absolute().parents) if not d.exists()]
    out.mkdir(parents=True, exist_ok=True)
    fd = _acquire(out / LOCK_NAME, created)
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            (out / LOCK_NAME).unlink()
        os.close(fd)
        for directory in made:  # innermost first; only those the run left empty
            try:
                directory.rmdir()
            except OSError:
                break


def _acquire(path: Path, created: bool) -> int:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX: no lock
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                if created:
                    with contextlib.suppress(OSError):
                        path.parent.rmdir()
                raise RunDirectoryBusy(
                    f"--out {path.parent} is in use by another retnet process; wait for it to finish "
                    f"or choose another --out"
                ) from None
            raise
        # The holder before us may have removed the file between our open and our lock: then we
        # locked an orphaned inode, and must lock the file that is there now.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def state(out: Path, run_files: Sequence[str], config_name: str, checkpoint_name: str,
          ignore: Sequence[str] = ()) -> str:
    """``"missing"``, ``"empty"``, ``"run"`` (settings and a checkpoint), ``"unfinished"``
    (only a run's files, without a checkpoint: stopped before its first one) or ``"foreign"``.
    Names in ``ignore`` (a run's own caches, such as its prepared data) do not count."""
    out = Path(out)
    if not out.is_dir():
        return "missing"
    names = {p.name for p in out.iterdir()} - {LOCK_NAME} - set(ignore)
    ours = {n for n in names if n in run_files or (n.startswith(".") and n.endswith(".tmp"))}
    if not names:
        return "empty"
    if config_name in names and checkpoint_name in names:
        return "run"  # (with files of the user's beside it, maybe)
    return "unfinished" if config_name in names and names <= ours else "foreign"


def recover(out: Path, run_files: Sequence[str]) -> str | None:
    """Finish what a killed run left half done in ``out``: an ``--overwrite`` that never reached
    its first checkpoint is rolled back (the old run restored), one that did is completed.
    Returns a note for the user, or ``None`` if there was nothing to do. Call it under :func:`hold`."""
    out = Path(out)
    note = None
    if (out / DISCARD_NAME).exists():
        shutil.rmtree(out / DISCARD_NAME, ignore_errors=True)
    aside = out / ASIDE_NAME
    if aside.is_dir():
        _restore(out, run_files)
        note = f"restored the run in {out} that an interrupted --overwrite had set aside"
    for name in run_files:  # half-written by a killed run (atomic_write's temporaries)
        for leftover in out.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)
    return note


def set_aside(out: Path, run_files: Sequence[str]) -> None:
    """Move the run files (and directories) in ``out`` into ``.previous-run/`` (kept until
    :func:`checkpointed`)."""
    out = Path(out)
    present = [n for n in run_files if (out / n).exists()]
    if not present:
        return
    aside = out / ASIDE_NAME
    aside.mkdir()
    # The manifest first: a kill part-way leaves files that are either listed there or new.
    tmp = aside / (_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(present))
    os.replace(tmp, aside / _MANIFEST)
    for name in present:
        os.replace(out / name, aside / name)
    _fsync_dir(aside)
    _fsync_dir(out)


def _restore(out: Path, run_files: Sequence[str]) -> None:
    """Put back what :func:`set_aside` moved and delete the new run's files. Idempotent, so a kill
    during it is repaired by running it again."""
    aside = out / ASIDE_NAME
    try:
        moved = set(json.loads((aside / _MANIFEST).read_text()))
    except (OSError, ValueError):
        # Killed before the manifest was in place: nothing had moved, and the new run had written
        # nothing yet, so every run file in `out` is the old run's own.
        shutil.rmtree(aside, ignore_errors=True)
        return
    for name in run_files:
        if name in moved:
            if (aside / name).exists():
                if (out / name).is_dir():  # the new run's logger directory: os.replace cannot replace it
                    remove(out / name)
                os.replace(aside / name, out / name)
        else:
            remove(out / name)
    _fsync_dir(out)
    shutil.rmtree(aside, ignore_errors=True)


def remove(path: Path) -> None:
    """Delete the run file or directory (a logger's, such as ``tensorboard/``) at ``path``, if any."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def abandon(out: Path, run_files: Sequence[str]) -> None:
    """The new run failed before its first checkpoint: bring back the run it was replacing."""
    if (Path(out) / ASIDE_NAME).is_dir():
        _restore(Path(out), run_files)


def checkpointed(out: Path) -> None:
    """The new run's first checkpoint is complete: the run it replaced can go."""
    aside = Path(out) / ASIDE_NAME
    if aside.is_dir():
        discard = Path(out) / DISCARD_NAME
        os.replace(aside, discard)  # one atomic step decides; the deletion may be interrupted
        shutil.rmtree(discard, ignore_errors=True)


def note(text: str) -> None:
    sys.stderr.write(f"retnet: note: {text}\n")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
