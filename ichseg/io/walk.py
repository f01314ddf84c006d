"""Listing the files under an input path, safe against symlink loops and broken links.

Directory symlinks are followed, but each real directory is entered once (tracked by
``(st_dev, st_ino)``), so a link back to a parent cannot loop. A file reached twice (a symlink
to a file already listed, or a second hard link) is listed once. Hidden entries (names starting
with ``.``) are left out. What cannot be entered or read is reported with a reason instead of
aborting the walk.

Two forms of the same walk: :func:`list_files` gives ``Path`` objects (inputs of a few thousand
files), :func:`list_compact` numpy arrays (a flat folder of ~750,000 one-slice files, the RSNA
layout, costs about 100 bytes a file instead of a few hundred in Python objects).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ichseg.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class FileListing:
    """Files found under a root, in a stable order, and the entries that were skipped."""

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class CompactListing:
    """The files of :func:`list_files` as arrays: ``paths`` (``os.fsencode`` bytes), sizes and
    modification times (ns), in the same order; plus the skipped entries."""

    paths: np.ndarray
    sizes: np.ndarray
    mtimes: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> Path:
        return Path(os.fsdecode(self.paths[index]))

    def digest(self) -> str:
        """SHA-1 over every name, size and mtime: changes when any file does."""
        digest = hashlib.sha1()
        for block in (self.paths, self.sizes, self.mtimes):
            digest.update(np.ascontiguousarray(block).tobytes())
        return digest.hexdigest()


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result | None, str | None]]:
    """``(path, stat, None)`` for every regular file and ``(path, None, reason)`` for every entry
    that cannot be used, depth-first in name order; folders are entered once each."""
    try:
        root_stat = root.stat()
    except OSError as error:
        reason = "no such file or folder"
        if root.is_symlink():
            reason = f"symbolic link that cannot be followed ({error.strerror})"
        raise InputError(root, reason) from None
    if not stat.S_ISDIR(root_stat.st_mode):
        if stat.S_ISREG(root_stat.st_mode):
            yield str(root), root_stat, None
            return
        raise InputError(root, "not a regular file or folder")
    # (st_dev, st_ino) of every folder entered: a loop or a second link to a folder is noticed.
    seen = {(root_stat.st_dev, root_stat.st_ino)}
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as error:
            if folder == str(root):
                raise InputError(folder, f"cannot list folder ({error.strerror})") from None
            yield folder, None, f"cannot list folder ({error.strerror})"
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            # The spelling pathlib gives (``Path(".") / name`` is ``name``).
            path = entry.name if folder == "." else os.path.join(folder, entry.name)
            try:
                info = entry.stat()  # follows a symlink; raises when it is broken or loops
            except OSError as error:
                reason = (
                    f"symbolic link that cannot be followed ({error.strerror})"
                    if entry.is_symlink()
                    else f"cannot read file status ({error.strerror})"
                )
                yield path, None, reason
                continue
            if stat.S_ISDIR(info.st_mode):
                key = (info.st_dev, info.st_ino)
                if key in seen:
                    log.debug("%s was already entered through another path", path)
                    continue
                seen.add(key)
                subfolders.append(path)
            elif stat.S_ISREG(info.st_mode):
                yield path, info, None
            else:
                yield path, None, "not a regular file (device, pipe or socket)"
        # Depth-first in name order: push reversed so the first name is entered first.
        stack.extend(reversed(subfolders))


def list_files(root: str | Path) -> FileListing:
    """Every regular, non-hidden file under ``root`` (a folder, or one file).

    Args:
        root: the input path.

    Raises:
        InputError: ``root`` does not exist (or is a broken link) or cannot be listed.
    """
    listing = FileListing()
    seen: set[tuple[int, int]] = set()
    for path, info, reason in _walk(Path(root)):
        if info is None:
            listing.skipped.append((path, reason or ""))
            continue
        key = (info.st_dev, info.st_ino)
        if key in seen:
            log.debug("%s was already listed through another path", path)
            continue
        seen.add(key)
        listing.files.append(Path(path))
    return listing


def list_compact(root: str | Path, chunk: int = 65536) -> CompactListing:
    """:func:`list_files` as arrays, for folders of hundreds of thousands of files.

    Args:
        root: the input path.
        chunk: entries gathered in Python lists before they are packed into arrays.

    Raises:
        InputError: as :func:`list_files`.
    """
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("paths", "keys", "sizes", "mtimes")}
    pending: list[tuple[bytes, int, int, int, int]] = []
    skipped: list[tuple[str, str]] = []

    def pack() -> None:
        if not pending:
            return
        names, devices, inodes, sizes, mtimes = zip(*pending, strict=True)
        parts["paths"].append(np.array(names, dtype=bytes))
        keys = np.empty(len(pending), dtype=[("dev", np.uint64), ("ino", np.uint64)])
        keys["dev"], keys["ino"] = devices, inodes
        parts["keys"].append(keys)
        parts["sizes"].append(np.array(sizes, dtype=np.int64))
        parts["mtimes"].append(np.array(mtimes, dtype=np.int64))
        pending.clear()

    for path, info, reason in _walk(Path(root)):
        if info is None:
            skipped.append((path, reason or ""))
            continue
        pending.append(
            (os.fsencode(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        )
        if len(pending) >= chunk:
            pack()
    pack()
    if not parts["paths"]:
        empty = np.zeros(0, dtype=np.int64)
        return CompactListing(np.zeros(0, dtype="S1"), empty, empty.copy(), skipped)
    paths = _concatenate_bytes(parts["paths"])
    keys = np.concatenate(parts["keys"])
    # A file reached twice (symlink, hard link) is listed once, at its first place.
    _, first = np.unique(keys, return_index=True)
    if len(first) < len(keys):
        order = np.sort(first)
        for index in np.setdiff1d(np.arange(len(keys)), order):
            log.debug("%s was already listed through another path", os.fsdecode(paths[index]))
    else:
        order = np.arange(len(keys))
    return CompactListing(
        paths[order],
        np.concatenate(parts["sizes"])[order],
        np.concatenate(parts["mtimes"])[order],
        skipped,
    )


def _concatenate_bytes(arrays: list[np.ndarray]) -> np.ndarray:
    width = max(a.dtype.itemsize for a in arrays)
    return np.concatenate([a.astype(f"S{width}") for a in arrays])
