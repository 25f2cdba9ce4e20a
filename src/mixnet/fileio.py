"""Files: the path type, crash-safe writing (a reader sees the old file or the new one, never half of
one), and the cache folder."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator, Union

from .errors import MixNetError

PathLike = Union[str, "os.PathLike[str]"]

CACHE_DIR_ENV = "MIXNET_CACHE_DIR"


def mixnet_cache_dir() -> Path:
    """``$MIXNET_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/mixnet`` (``~/.cache/mixnet``): where mixnet
    keeps files of its own (weights go to torch's shared folder unless ``$MIXNET_CACHE_DIR`` is set)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mixnet"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable_file(path: PathLike, what: str = "output", folder: bool = False) -> None:
    """Refuse in one line, before any work, an output path nothing can be written to: a directory where a
    file goes (unless ``folder``: the output is a folder), a path below an existing file, or a place where
    no file can be created (a read-only or unwritable folder), which would otherwise be a traceback after
    the work."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise MixNetError(f"{what} {path}: is a directory; give a file path")
    existing = next((parent for parent in path.absolute().parents if parent.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise MixNetError(f"{what} {path}: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mixnet-write-check.", dir=existing)
    except OSError as e:
        raise MixNetError(f"{what} {path}: cannot create files in {existing} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Write to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    On any error (a full disk included) the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    check_writable_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file ordinary permissions
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
