"""One way to reject an option: the same message shape everywhere, naming the valid values."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from ichseg.errors import ConfigError

T = TypeVar("T")


MASK_FORMATS = ("nifti", "dicom-seg", "both")
"""How ``segment`` and ``predict`` write masks: NIfTI, DICOM SEG (DICOM inputs), or both."""


def look_up_option(
    name: str, value: T, valid: Iterable[Any], error: type[Exception] = ConfigError
) -> T:
    """``value`` if it is one of ``valid``, else ``error("unknown <name> 'x'; valid: a, b")``.

    Args:
        name: what the option is, for the message ("model", "window", "profile").
        value: the value given.
        valid: the accepted values.
        error: the exception type (ConfigError for user configs, ValueError for API misuse).
    """
    choices = list(valid)
    if value in choices:
        return value
    shown = ", ".join(str(c) for c in sorted(choices, key=str))
    raise error(f"unknown {name} {value!r}; valid: {shown}")


def format_validation_error(error: Any, source: str, prefix: str = "") -> str:
    """One line for a pydantic ``ValidationError``: the first problem with its dotted key.

    Args:
        error: the ``pydantic.ValidationError``.
        source: where the data came from (a file name), put first.
        prefix: section prepended to the key path (``"model."`` for a nested model).
    """
    problems = error.errors()
    first = problems[0]
    location = prefix + ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        message = f"unknown key '{location}'"
    else:
        message = f"'{location}': {first['msg']}"
    more = len(problems) - 1
    suffix = f" (and {more} more problem(s))" if more else ""
    return f"{source}: {message}{suffix}"
