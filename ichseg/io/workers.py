"""Worker processes for reading: how many, how they start, and results in input order.

Reading DICOM is pure-Python parsing (pydicom) plus a little numpy, so threads do not run it in
parallel; processes do. Workers never fork the calling process (a fork after torch has started
its thread pool can deadlock): where the platform has it they are forked from a fork server, a
clean process started once per calling process that imports the readers' modules once
(:data:`PRELOADED`), so a pool starts in milliseconds instead of each worker importing them for
about half a second; elsewhere they are spawned. Either way they get the caller's environment
and ``sys.path`` as they are when the pool starts, run one OpenMP thread each (one process per
core already fills the machine), keep the memory they free for reuse
(:func:`ichseg.runtime.keep_freed_memory`: windowing a 512-px slice was four times slower
without), inherit the parent's logging level and stop when the calling process dies. The
first pool of a process still waits for those imports, so the readers use workers only for
inputs of at least :data:`MIN_PARALLEL_FILES` files.

``ICHSEG_WORKERS`` sets the default number of workers for every reader (``1``: read in the
calling process); an explicit ``workers`` argument wins over it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

from ichseg.runtime import available_cpus, keep_freed_memory

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

MIN_PARALLEL_FILES = 1000
"""Smallest input (files) for which the readers start worker processes: a process's first pool
costs about as much CPU as reading 500-1000 headers (the fork server's imports, or each
spawned worker's)."""

PRELOADED = (
    "numpy",
    "pydicom",
    "ichseg.config",
    "ichseg.io.dicom",
    "ichseg.io.dicom_pixels",
    "ichseg.io.dicom_table",
    "ichseg.preprocess.pipeline",
    "ichseg.engine.cache_per_slice",
)
"""Modules the fork server imports once for all its workers: what reading and the file-by-file
cache build use. Not torch: its thread pool must start in the worker, after the worker has set
one OpenMP thread."""


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


def _init_worker(level: int, parent: int, environment: dict[str, str], path: list[str]) -> None:
    _stop_with_parent(parent)
    # A fork server keeps the environment and path of the moment it started; a pool gets the
    # caller's current ones, as a spawned worker would.
    os.environ.clear()
    os.environ.update(environment)
    sys.path[:] = path
    keep_freed_memory()
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)


def _stop_with_parent(parent: int) -> None:
    """End this worker as soon as the calling process dies, so that a killed build does not
    leave workers decoding their current task for minutes.

    The worker watches the caller itself: a fork server lives as long as any process holds
    its lifeline pipe, and every worker it forks holds one, so neither the server's end nor
    a parent-death signal would follow the caller.
    """
    import threading

    if not _alive(parent):
        os._exit(1)

    def watch() -> None:
        try:
            handle = os.pidfd_open(parent)  # Linux: readable once the process has ended
        except (AttributeError, OSError):
            handle = None
        if handle is not None:
            import select

            select.select([handle], [], [])
        else:
            while _alive(parent):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="ichseg-caller-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` reader processes (forked from the fork server, else spawned)."""
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # Only read when the server starts (once per process); later calls change nothing.
        # The caller's main module stays preloaded, as a spawned worker would import it.
        context.set_forkserver_preload(["__main__", *PRELOADED])
    else:
        context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(
            logging.getLogger().getEffectiveLevel(),
            os.getpid(),
            dict(os.environ),
            list(sys.path),
        ),
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
    pool = process_pool(workers)
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
    finally:
        # Nothing is left to wait for: the workers exit in the background while the caller
        # goes on (or, when it stopped early, after their current task).
        pool.shutdown(wait=False, cancel_futures=True)
    for item, _ in pending:
        yield function(item)
    for item in iterator:
        yield function(item)


def chunked(items: list[Any], size: int) -> list[list[Any]]:
    """``items`` cut into consecutive lists of at most ``size``."""
    return [items[start : start + size] for start in range(0, len(items), size)]
