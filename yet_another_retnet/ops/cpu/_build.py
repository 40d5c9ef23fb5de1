"""A C++ library build that survives being killed: built aside, moved into place, loaded from there.

``torch.utils.cpp_extension.load`` builds in a fixed directory guarded by a lock *file*
(``FileBaton``): a process killed while it builds leaves that file behind, and every later process
that loads the extension from the same cache waits for it forever. Here instead:

* the finished library lives at ``<root>/yaretnet/<name>_<digest>.so``, the digest covering the
  sources, the headers they include, the flags and the versions of torch and Python; once it
  exists it is loaded directly (no compiler, no ninja, no lock);
* a build runs in a fresh temporary directory next to it and its result is copied over the final
  name by an atomic rename, so a kill at any moment leaves either no library or a whole one;
* builders take an ``flock`` on ``<name>.lock`` only so that two of them do not do the same work;
  the kernel releases it when its holder dies, however it dies, so it cannot be left held;
* under that lock, temporary directories of earlier builds are leftovers of killed ones (a live
  builder would hold the lock) and are removed.

``<root>`` is ``$TORCH_EXTENSIONS_DIR`` or torch's default extensions directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

__all__ = ["build_and_load", "library_path"]

_TMP_PREFIX = ".build-"


def extensions_root() -> Path:
    """Where built libraries are kept: ``$TORCH_EXTENSIONS_DIR/yaretnet`` or torch's default."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils import cpp_extension

        root = cpp_extension.get_default_build_root()
    return Path(root) / "yaretnet"


def library_path(name: str, sources: Sequence[Path], cflags: Sequence[str], ldflags: Sequence[str],
                 headers: Sequence[Path] = ()) -> Path:
    """The final path of the library ``name`` built from ``sources`` (including ``headers``) with
    these flags. Pure: reads the sources, builds nothing."""
    digest = hashlib.sha256()
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    toolkit = f"cuda {torch.version.cuda} hip {getattr(torch.version, 'hip', None)}"
    for part in (torch.__version__, python, toolkit, name, *cflags, "|", *ldflags):
        digest.update(part.encode() + b"\0")
    for source in (*sources, *headers):
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return extensions_root() / f"{name}_{digest.hexdigest()[:16]}.so"


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an ``flock`` on ``path`` (created if missing); the kernel drops it when the holder
    exits or is killed. Without ``fcntl`` (Windows) builds are not serialised."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_leftovers(root: Path, name: str) -> None:
    """Temporary build directories of ``name``: with the lock held, only killed builds left them."""
    for leftover in root.glob(f"{_TMP_PREFIX}{name}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _install(built: Path, final: Path) -> None:
    """Copy ``built`` to ``final`` through a temporary name and an atomic rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(built, "rb") as src:
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o755)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_and_load(name: str, sources: Sequence[Path], cflags: Sequence[str] = (),
                   ldflags: Sequence[str] = (), *, headers: Sequence[Path] = (),
                   include_dirs: Sequence[Path] = (), notice: str | None = None) -> Path:
    """Load the library built from ``sources`` into this process (``torch.ops.load_library``),
    building it first if no finished build exists; returns the loaded file's path.

    ``headers`` enter the digest (a changed header rebuilds); ``include_dirs`` are searched for
    them. ``notice``, if given, is printed to stderr before a build (or the wait for another
    process's build), so that a command does not sit silent for its minutes.

    Raises whatever the build raises (no compiler, a compile error); a process killed at any point
    of this leaves the cache usable by the next one.
    """
    final = library_path(name, sources, cflags, ldflags, headers)
    root = final.parent
    if final.is_file():
        torch.ops.load_library(str(final))
        return final
    if notice:
        print(notice, file=sys.stderr, flush=True)
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f"{name}.lock"):
        if final.is_file():  # another process built it while this one waited
            torch.ops.load_library(str(final))
            return final
        _remove_leftovers(root, name)
        from torch.utils import cpp_extension

        build_dir = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=root)
        try:
            # Loads the library from the temporary directory (a mapped file outlives its name).
            built = cpp_extension.load(name=name, sources=[str(s) for s in sources], build_directory=build_dir,
                                       extra_cflags=list(cflags), extra_ldflags=list(ldflags),
                                       extra_include_paths=[str(d) for d in include_dirs],
                                       is_python_module=False, verbose=False)
            # PyTorch 2.2 returns None here, later releases the library's path: the same file.
            _install(Path(build_dir) / f"{name}.so" if built is None else Path(str(built)), final)
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)
    return final
