"""Errors meant for users: one line that names the file and the reason."""

from __future__ import annotations

from pathlib import Path


class IchsegError(Exception):
    """Base class for errors that the CLI reports as one line without a traceback."""


class InputError(IchsegError):
    """An input file or folder that cannot be used, with the path and the reason."""

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class ConfigError(IchsegError):
    """A configuration file that does not validate."""


def one_line(error: BaseException) -> str:
    """``"Type: message"`` on one line, for a reason built from a library's exception.

    Multi-line messages (pydicom lists one line per failed decoder plugin) are joined with
    ``"; "`` so that no part of the reason is lost.
    """
    lines = [line.strip().rstrip(":;") for line in str(error).splitlines() if line.strip()]
    text = "; ".join(line for line in lines if line)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
