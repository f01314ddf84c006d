"""Listing the files under an input path, safe against symlink loops and broken links.

Directory symlinks are followed, but each real directory is entered once (tracked by
``(st_dev, st_ino)``), so a link back to a parent cannot loop. A file reached twice (a symlink
to a file already listed) is listed once. Hidden entries (names starting with ``.``) are left
out. What cannot be entered or read is reported with a reason instead of aborting the walk.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ichseg.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class FileListing:
    """Files found under a root, in a stable order, and the entries that were skipped."""

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def list_files(root: str | Path) -> FileListing:
    """Every regular, non-hidden file under ``root`` (a folder, or one file).

    Args:
        root: the input path.

    Raises:
        InputError: ``root`` does not exist (or is a broken link) or cannot be listed.
    """
    root = Path(root)
    try:
        root_stat = root.stat()
    except OSError as error:
        reason = "no such file or folder"
        if root.is_symlink():
            reason = f"symbolic link that cannot be followed ({error.strerror})"
        raise InputError(root, reason) from None
    listing = FileListing()
    if not stat.S_ISDIR(root_stat.st_mode):
        if stat.S_ISREG(root_stat.st_mode):
            listing.files.append(root)
            return listing
        raise InputError(root, "not a regular file or folder")
    # (st_dev, st_ino) of every folder entered and file listed: a loop or a second link to the
    # same place is noticed here.
    seen = {(root_stat.st_dev, root_stat.st_ino)}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            if folder == root:
                raise InputError(folder, f"cannot list folder ({error.strerror})") from None
            listing.skipped.append((str(folder), f"cannot list folder ({error.strerror})"))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                info = entry.stat()  # follows a symlink; raises when it is broken or loops
            except OSError as error:
                reason = (
                    f"symbolic link that cannot be followed ({error.strerror})"
                    if entry.is_symlink()
                    else f"cannot read file status ({error.strerror})"
                )
                listing.skipped.append((str(path), reason))
                continue
            is_folder = stat.S_ISDIR(info.st_mode)
            if not is_folder and not stat.S_ISREG(info.st_mode):
                listing.skipped.append((str(path), "not a regular file (device, pipe or socket)"))
                continue
            key = (info.st_dev, info.st_ino)
            if key in seen:
                log.debug("%s was already listed through another path", path)
                continue
            seen.add(key)
            (subfolders if is_folder else listing.files).append(path)
        # Depth-first in name order: push reversed so the first name is entered first.
        stack.extend(reversed(subfolders))
    return listing
