"""Worker processes for reading: how many, how they start, and results in input order.

Reading DICOM is pure-Python parsing (pydicom) plus a little numpy, so threads do not run it in
parallel; processes do. Workers are started with ``spawn`` (a fork after torch has started its
thread pool can deadlock), run one OpenMP thread each (one process per core already fills the
machine), keep the memory they free for reuse (:func:`ichseg.runtime.keep_freed_memory`:
windowing a 512-px slice was four times slower without) and inherit the parent's logging
level. Starting them costs about a second of CPU (imports), so the readers use them only for
inputs of at least :data:`MIN_PARALLEL_FILES` files.

``ICHSEG_WORKERS`` sets the default number of workers for every reader (``1``: read in the
calling process); an explicit ``workers`` argument wins over it.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

from ichseg.runtime import available_cpus, keep_freed_memory

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

MIN_PARALLEL_FILES = 1000
"""Smallest input (files) for which the readers start worker processes: starting two spawned
workers costs about as much CPU as reading 500-1000 headers."""


def default_workers() -> int:
    """``ICHSEG_WORKERS`` when set to a positive integer, else the CPUs available."""
    text = os.environ.get("ICHSEG_WORKERS", "").strip()
    if text:
        try:
            value = int(text)
        except ValueError:
            log.warning("ignoring ICHSEG_WORKERS=%r: not an integer", text)
        else:
            if value >= 1:
                return value
            log.warning("ignoring ICHSEG_WORKERS=%r: must be at least 1", text)
    return available_cpus()


def resolve_workers(workers: int | None) -> int:
    """The number of processes to use: ``workers`` (at least 1), or :func:`default_workers`."""
    return default_workers() if workers is None else max(1, int(workers))


def _init_worker(level: int, parent: int) -> None:
    _stop_with_parent(parent)
    keep_freed_memory()
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)


def _stop_with_parent(parent: int) -> None:
    """Have Linux end this worker when the process that started it dies, so that a killed
    build does not leave workers decoding their current task for minutes."""
    import signal

    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # the parent died before the request was made
        os._exit(1)


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned reader processes."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(logging.getLogger().getEffectiveLevel(), os.getpid()),
    )


def ordered_map(
    function: Callable[[T], R], items: Iterable[T], workers: int, in_flight: int | None = None
) -> Iterator[R]:
    """``function(item)`` for each item in ``workers`` processes, yielded in input order.

    At most ``in_flight`` items (default ``4 * workers``) are submitted ahead of the one being
    yielded, so the results waiting in memory stay bounded however long ``items`` is. If the
    pool breaks (a worker killed, e.g. by the out-of-memory killer), the items not yet done are
    computed in this process, with a warning.
    """
    from concurrent.futures.process import BrokenProcessPool

    in_flight = in_flight or 4 * workers
    iterator = iter(items)
    pending: deque[tuple[T, Future]] = deque()
    with process_pool(workers) as pool:
        try:
            for item in iterator:
                pending.append((item, pool.submit(function, item)))
                if len(pending) >= in_flight:
                    yield pending[0][1].result()
                    pending.popleft()
            while pending:
                yield pending[0][1].result()
                pending.popleft()
            return
        except BrokenProcessPool:
            log.warning("worker processes stopped unexpectedly; continuing in this process")
    for item, _ in pending:
        yield function(item)
    for item in iterator:
        yield function(item)


def chunked(items: list[Any], size: int) -> list[list[Any]]:
    """``items`` cut into consecutive lists of at most ``size``."""
    return [items[start : start + size] for start in range(0, len(items), size)]
