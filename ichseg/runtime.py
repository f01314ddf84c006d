"""Process-wide CPU settings that keep ichseg fast on shared workstations and cluster nodes.

OpenMP threads spin-wait at every barrier by default. With another process on the same cores
the spinning threads fight it for the CPU; ``benchmarks/README.md`` records a 4 ms forward pass
taking 500 ms that way. Passive waiting costs a little latency on tiny operators and removes the
collapse. The setting must be in the environment before the OpenMP runtime starts (the first
``import torch``), so :func:`configure_cpu` runs first thing in the CLI. Users who set
``OMP_WAIT_POLICY`` or the thread count themselves keep their values.

glibc hands freed memory back to the operating system as soon as a couple of MB lie free at the
top of the heap, so a loop that allocates and frees the same arrays every step faults their
pages in again every step. Where page faults are slow (virtual machines), that cost a ResNet-50
training step at 128 px a third of its time and made windowing a 512-px slice four times
slower (``benchmarks/README.md``). :func:`keep_freed_memory` keeps that memory for reuse; the
CLI and ichseg's worker processes call it.
"""

from __future__ import annotations

import os
import sys


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, which containers and schedulers set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def configure_cpu(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set a passive OpenMP wait policy and the thread count, unless the user chose them.

    Args:
        environ: the environment to update (default ``os.environ``).

    Returns:
        The settings in force afterwards (for logging and run records).
    """
    env = os.environ if environ is None else environ
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("OMP_NUM_THREADS", str(available_cpus()))
    return {key: env[key] for key in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}


def apply_torch_threads() -> int:
    """Give torch the thread count of ``OMP_NUM_THREADS`` (set by :func:`configure_cpu`)."""
    import torch

    try:
        threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    except ValueError:
        threads = 0
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


KEPT_FREE_BYTES = 2**31 - 1
"""Free heap memory a process keeps before glibc returns any to the OS (``M_TRIM_THRESHOLD``;
``mallopt`` takes an ``int``)."""
MMAP_THRESHOLD_BYTES = 32 * 1024**2
"""Allocations above this still get their own mapping, returned to the OS when freed
(``M_MMAP_THRESHOLD``): whole volumes, not the per-step arrays of training or windowing."""


def keep_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """Have glibc keep freed memory for reuse instead of returning it to the OS at once.

    Fixed thresholds replace glibc's adaptive ones for the rest of the process: allocations up
    to :data:`MMAP_THRESHOLD_BYTES` come from the heap, and up to :data:`KEPT_FREE_BYTES` of
    free heap stay with the process (resident memory stays at its high-water mark instead).
    ``ICHSEG_KEEP_FREED_MEMORY=0`` (or ``false``, ``no``, ``off``) turns it off; worker
    processes read it too.

    Returns:
        Whether the thresholds were set (False off glibc or when turned off).
    """
    env = os.environ if environ is None else environ
    if env.get("ICHSEG_KEEP_FREED_MEMORY", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library to ask, or not glibc
        return False
    # The mmap threshold first: where glibc refuses it (32-bit builds cap it at 16 MiB) the
    # trim threshold is left alone too.
    if not mallopt(-3, MMAP_THRESHOLD_BYTES):  # M_MMAP_THRESHOLD
        return False
    _memory_settings["kept"] = bool(mallopt(-1, KEPT_FREE_BYTES))  # M_TRIM_THRESHOLD
    return _memory_settings["kept"]


_memory_settings = {"kept": False}


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` set glibc's thresholds in this process."""
    return _memory_settings["kept"]
