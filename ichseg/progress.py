"""Progress output that suits where it goes: a live bar on a terminal, plain lines in a log.

A tqdm bar written to a file or pipe (CI logs, ``nohup``) leaves every carriage-return frame in
the log. Off a terminal the same calls print one line per :data:`LOG_STEPS` th of the work and
one at the end instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
LOG_STEPS = 10


def _on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class _LineProgress:
    """The tqdm subset ichseg uses, printing a few plain lines instead of frames."""

    def __init__(self, iterable: Iterable[Any] | None, total: int | None, desc: str, unit: str):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.desc = desc
        self.unit = unit
        self.count = 0
        self.postfix = ""
        self.started = time.perf_counter()
        self.next_report = 1

    def _maybe_report(self, final: bool = False) -> None:
        if self.total:
            step = max(1, self.total // LOG_STEPS)
            due = final or self.count >= self.total or self.count >= self.next_report * step
            if not due:
                return
            self.next_report = self.count // step + 1
            where = f"{self.count}/{self.total}"
        elif not final:
            return
        else:
            where = str(self.count)
        elapsed = time.perf_counter() - self.started
        extra = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {where} {self.unit} ({elapsed:.0f} s){extra}", file=sys.stderr)

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.count += n
        self._maybe_report()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.total is None or self.count < self.total:
            self._maybe_report(final=True)


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    leave: bool = True,
) -> Any:
    """A progress wrapper: tqdm on a terminal, a few log lines elsewhere, nothing if disabled.

    Args:
        iterable: what to iterate (or None and call ``update``).
        total: number of steps when ``iterable`` has no length.
        desc: label.
        unit: unit name.
        enabled: False turns all output off.
        leave: keep the finished bar on a terminal.
    """
    if enabled and _on_terminal():
        # The plain tqdm class: tqdm.auto's asyncio variant calls iter() on the iterable in its
        # constructor, which for a DataLoader draws one extra shuffle from the sampler's
        # generator, so batch order would depend on where the output goes.
        from tqdm.std import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave)
    if not enabled:
        return _Silent(iterable)
    return _LineProgress(iterable, total, desc, unit)


class _Silent:
    """The same interface, printing nothing and iterating the iterable exactly once."""

    def __init__(self, iterable: Iterable[Any] | None) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass
