"""Worker processes for reading: how many, how they start, and results in input order.

Reading DICOM is pure-Python parsing (pydicom) plus a little numpy, so threads do not run it in
parallel; processes do. Workers never fork the calling process (a fork after torch has started
its thread pool can deadlock). On Linux they are forked from a fork server: a clean process,
started once per calling process, that imports the readers' modules once (:data:`PRELOADED`),
so a pool starts in milliseconds instead of each worker importing them for about half a
second. Elsewhere, or where the fork server cannot start (a socket path too long under
``TMPDIR``, a process that is itself a fork of one that started a server), they are spawned.

Either way a worker gets the caller's environment as it is when the pool starts (a fork server
keeps the one it started with), has torch, if it imports it, run one thread (one process per
core already fills the machine), keeps the memory it frees for reuse
(:func:`ichseg.runtime.keep_freed_memory`: windowing a 512-px slice was four times slower
without), inherits the caller's logging level and ends when the caller dies. The first pool of
a process still waits for the imports, so the readers use workers only for inputs of at least
:data:`MIN_PARALLEL_FILES` files.

The fork server is multiprocessing's, one per process: its preload list is a process-wide
setting, which ichseg sets before the server starts (a server someone else started first is
used as it is, without ichseg's preloads). A long-lived process (a notebook, the web app) keeps
the reader code its server imported, even after the modules are reloaded.

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
one OpenMP thread. (The caller's main module is imported by each worker, as under spawn.)"""


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


def _init_worker(level: int, parent: int, environment: dict[str, str]) -> None:
    _stop_with_parent(parent)
    # A fork server keeps the environment of the moment it started; a pool gets the caller's
    # current one, as a spawned worker would. (multiprocessing itself passes sys.path and the
    # working directory to every worker.)
    os.environ.clear()
    os.environ.update(environment)
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
    a parent-death signal would follow the caller. On Linux a pidfd, opened before anything
    else, says when the caller ends; other POSIX systems poll its pid once a second. Windows
    workers are not watched (``os.kill(pid, 0)`` there would send the caller a Ctrl-C).
    """
    if os.name != "posix":
        return
    import threading

    handle = None
    if hasattr(os, "pidfd_open"):
        try:
            handle = os.pidfd_open(parent)
        except ProcessLookupError:
            os._exit(1)  # died before this worker started
        except OSError:  # a kernel without pidfds
            handle = None
    if handle is None and not _alive(parent):
        os._exit(1)

    def watch() -> None:
        if handle is not None:
            import select

            waiting = select.poll()  # select() fails for descriptors above 1023
            waiting.register(handle, select.POLLIN)
            waiting.poll()
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
        pass  # it exists, owned by another user
    return True


def _context():
    """The fork server's multiprocessing context on Linux (server started, preloads set), else
    or when it cannot start, spawn's."""
    import multiprocessing

    if sys.platform.startswith("linux"):
        from multiprocessing import forkserver

        context = multiprocessing.get_context("forkserver")
        # Read when the server starts (once per process); later calls change nothing.
        context.set_forkserver_preload(list(PRELOADED))
        try:
            forkserver.ensure_running()
        except (OSError, ChildProcessError) as error:
            log.debug("no fork server (%s); spawning the workers", error)
        else:
            return context
    return multiprocessing.get_context("spawn")


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` reader processes (forked from the fork server, else spawned)."""
    return ProcessPoolExecutor(
        workers,
        mp_context=_context(),
        initializer=_init_worker,
        initargs=(logging.getLogger().getEffectiveLevel(), os.getpid(), dict(os.environ)),
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
    in_hand: list[T] = []  # taken from the iterator, not yet pending (submit may fail)
    pool = process_pool(workers)
    try:
        for item in iterator:
            in_hand.append(item)
            pending.append((item, pool.submit(function, item)))
            in_hand.clear()
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
        # Waiting costs milliseconds once every result is in. Not waiting could leave a
        # process that exits right after (a worker of the caller's own pool) stuck at exit:
        # multiprocessing's exit handlers close the pool's queues before its manager thread
        # has told the workers to stop.
        pool.shutdown(wait=True, cancel_futures=True)
    for item, _ in pending:
        yield function(item)
    for item in in_hand:
        yield function(item)
    for item in iterator:
        yield function(item)


def chunked(items: list[Any], size: int) -> list[list[Any]]:
    """``items`` cut into consecutive lists of at most ``size``."""
    return [items[start : start + size] for start in range(0, len(items), size)]
