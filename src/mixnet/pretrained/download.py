"""Getting weight files onto this machine: the cache, verified resumable downloads, the Hugging Face hub.

Cache location, first that applies: the ``cache_dir`` argument, ``$MIXNET_CACHE_DIR``, then torch's
standard checkpoint folder (``$TORCH_HOME/hub/checkpoints``, usually ``~/.cache/torch/hub/checkpoints``),
which is where timm and ``torch.hub`` keep the same release files, so a file either of them already
fetched is reused. Release URLs can be pointed at a mirror with ``$MIXNET_WEIGHTS_URL_BASE`` or the
``url_base`` argument (the file name is kept). ``HF_HUB_OFFLINE=1`` turns off all network access.

Every source is checked against a digest registered in ``registry.WEIGHTS``, never against one the
source supplies itself: the GitHub release file against ``sha256`` (the hex digits in its name), the
Hugging Face copy against ``hf_sha256``. A tag with no ``hf_sha256`` is never fetched from the hub, not
even as a fallback (at present no published tag has one: their full digests could not be verified).

A download goes to ``<name>.part`` and is renamed to ``<name>`` only once its sha256 matches, so a file
under its final name is always complete and verified. A dropped connection is retried a few times, each
time resuming with an HTTP Range request; if it still fails the ``.part`` file is kept and the next call
resumes from it. A 404 or a hash mismatch removes the ``.part`` file.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from filelock import FileLock
from tqdm.auto import tqdm

from ..errors import MixNetError, first_line
from ..fileio import CACHE_DIR_ENV, PathLike, mixnet_cache_dir
from .registry import SOURCES, WeightsEntry

URL_BASE_ENV = "MIXNET_WEIGHTS_URL_BASE"
CHUNK_BYTES = 1 << 16
DOWNLOAD_ATTEMPTS = 3
TIMEOUT_S = 30.0
HF_FILENAME = "model.safetensors"  # the file timm's hub repositories hold the weights in


class DownloadError(MixNetError):
    """The file could not be fetched; ``retry_elsewhere`` says whether another source may succeed."""

    def __init__(self, message: str, retry_elsewhere: bool):
        super().__init__(message)
        self.retry_elsewhere = retry_elsewhere


class _ConnectionDropped(Exception):
    pass


def default_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """Where weight files are kept (see the module docstring for the order of precedence)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_DIR_ENV):
        return mixnet_cache_dir()
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def release_url(url: str, url_base: Optional[str] = None) -> str:
    """``url`` with its folder replaced by ``url_base`` (or ``$MIXNET_WEIGHTS_URL_BASE``) when one is set."""
    base = url_base or os.environ.get(URL_BASE_ENV)
    if not base:
        return url
    return f"{base.rstrip('/')}/{url.rsplit('/', 1)[-1]}"


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for no network access at all."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def file_sha256(path: PathLike) -> str:
    """The full sha256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: PathLike, expected: str) -> None:
    """Raise if ``path`` does not hash to ``expected`` (a full digest or at least its first 8 hex digits)."""
    if not re.fullmatch(r"[0-9a-fA-F]{8,64}", expected or ""):
        # An empty prefix would match every file: refuse rather than accept anything.
        raise MixNetError(f"{path}: no usable sha256 to check it against (got {expected!r})")
    actual = file_sha256(path)
    if not actual.startswith(expected.lower()):
        raise MixNetError(f"{path}: sha256 {actual[:len(expected)]}... does not match the expected "
                          f"{expected} (corrupt or not the published file)")


def download(url: str, dest: PathLike, sha256: str, progress: bool = True,
             attempts: int = DOWNLOAD_ATTEMPTS, timeout: float = TIMEOUT_S) -> Path:
    """Fetch ``url`` into ``dest`` through ``dest.part``, verify ``sha256``, then rename into place."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    # Several processes (one per GPU) may ask at once: one downloads, the others then find the file.
    with FileLock(dest.with_name(f".{dest.name}.lock")):
        if dest.exists():
            return dest
        return _download_locked(url, dest, part, sha256, progress, attempts, timeout)


def _download_locked(url: str, dest: Path, part: Path, sha256: str, progress: bool,
                     attempts: int, timeout: float) -> Path:
    for attempt in range(1, attempts + 1):
        try:
            _fetch_into(url, part, dest.name, progress, timeout)
            break
        except _ConnectionDropped as e:
            if attempt == attempts:
                have = part.stat().st_size if part.exists() else 0
                raise DownloadError(f"{dest.name}: download from {url} broke off after {have:,} bytes "
                                    f"({e}); the partial file {part} is kept and the next try resumes it",
                                    retry_elsewhere=True) from None
    try:
        check_sha256(part, sha256)
    except MixNetError:
        actual = file_sha256(part)
        part.unlink()
        raise DownloadError(f"{dest.name}: the file served by {url} has sha256 {actual[:16]}..., not the "
                            f"expected {sha256}; it was discarded", retry_elsewhere=False) from None
    os.replace(part, dest)
    return dest


def _fetch_into(url: str, part: Path, label: str, progress: bool, timeout: float) -> None:
    """One HTTP request appending to (Range) or rewriting ``part``; raises _ConnectionDropped if cut short."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "mixnet"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part is complete (the hash decides)
            return
        part.unlink(missing_ok=True)
        raise DownloadError(f"{label}: {url} answered HTTP {e.code} {e.reason}", retry_elsewhere=True) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"{label}: cannot reach {url} ({reason})", retry_elsewhere=True) from None
    with response:
        resumed = have and response.status == 206 and _range_start(response) == have
        if not resumed:
            have = 0  # the server sent the whole file: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        received = have
        with open(part, "ab" if resumed else "wb") as f, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=label, disable=not progress, leave=False) as bar:
            try:
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (http.client.IncompleteRead, ConnectionError, socket.timeout, OSError) as e:
                raise _ConnectionDropped(f"{type(e).__name__}: {e}") from None
            finally:
                f.flush()
                os.fsync(f.fileno())
        if total is not None and received < total:
            raise _ConnectionDropped(f"connection closed at {received:,} of {total:,} bytes")


def _range_start(response) -> Optional[int]:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def hf_download(repo_id: str, filename: str, sha256: str, cache_dir: Optional[PathLike] = None,
                local_only: bool = False) -> Path:
    """A file of a Hugging Face hub repository via ``hf_hub_download`` (honours ``HF_ENDPOINT`` and
    ``HF_HUB_OFFLINE``), refused unless it hashes to ``sha256``, the digest registered for it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # With the cache moved (argument or environment), hub files go there too; else the hub's own cache.
    moved = cache_dir if cache_dir is not None else os.environ.get(CACHE_DIR_ENV)
    hf_cache = Path(moved).expanduser() / "huggingface" if moved else None
    try:
        path = Path(hf_hub_download(repo_id, filename, cache_dir=hf_cache, local_files_only=local_only))
    except LocalEntryNotFoundError:
        raise DownloadError(f"{filename}: not in the Hugging Face cache for {repo_id} and the hub is "
                            f"unreachable or offline", retry_elsewhere=True) from None
    except Exception as e:  # the hub raises many kinds (HTTP, repo or file not found, network)
        raise DownloadError(f"{filename}: Hugging Face hub {repo_id}: {first_line(e)}",
                            retry_elsewhere=True) from None
    try:
        check_sha256(path, sha256)
    except MixNetError as e:
        raise DownloadError(f"{repo_id}/{filename}: refused, not the registered file ({e})",
                            retry_elsewhere=False) from None
    return path


def fetch(entry: WeightsEntry, cache_dir: Optional[PathLike] = None, url_base: Optional[str] = None,
          source: str = "auto", progress: bool = True) -> Path:
    """The verified local file of a published tag: from the cache, else downloaded.

    ``source``: "github" (the release URL), "hf" (the Hugging Face hub), or "auto": GitHub first, then
    the hub when GitHub cannot be reached or lacks the file (never after a hash mismatch). The hub is only
    used for a tag whose hub file has a registered digest (``entry.hf_sha256``).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "hf" and not (entry.hf_hub_id and entry.hf_sha256):
        raise MixNetError(f"{entry.tag}: no sha256 is registered for a Hugging Face copy, so it is not "
                          f"loaded unverified; use source='github'")
    dest = default_cache_dir(cache_dir) / entry.filename
    url = release_url(entry.url, url_base)
    if source != "hf" and dest.is_file():
        try:
            check_sha256(dest, entry.sha256)
        except MixNetError as e:
            raise MixNetError(f"{e}; delete the cached file to download it again") from None
        return dest
    use_hub = source == "hf" or (source == "auto" and entry.hf_hub_id and entry.hf_sha256)
    if use_hub and source == "auto":  # the hub's cache counts as a cache too
        try:
            return hf_download(entry.hf_hub_id, HF_FILENAME, entry.hf_sha256, cache_dir, local_only=True)
        except DownloadError as e:
            if not e.retry_elsewhere:
                raise
    failures = []
    if is_offline():
        failures.append("offline (HF_HUB_OFFLINE is set)")
    else:
        if source != "hf":
            try:
                return download(url, dest, entry.sha256, progress)
            except DownloadError as e:
                if not e.retry_elsewhere:  # a wrong file is an alarm, not an outage: no advice to fetch it
                    raise
                failures.append(str(e))
        if use_hub:
            try:
                return hf_download(entry.hf_hub_id, HF_FILENAME, entry.hf_sha256, cache_dir)
            except DownloadError as e:
                if not e.retry_elsewhere:
                    raise
                failures.append(str(e))
    raise MixNetError(f"{entry.tag}: weights file {entry.filename} is not cached and could not be "
                      f"downloaded ({'; '.join(failures)}); fetch {url} yourself and put it at {dest} "
                      f"(or point ${CACHE_DIR_ENV} / cache_dir at the folder holding it)")
