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
