"""Process-wide CPU settings that keep ichseg fast on shared workstations and cluster nodes.

OpenMP threads spin-wait at every barrier by default. With another process on the same cores
the spinning threads fight it for the CPU; ``benchmarks/README.md`` records a 4 ms forward pass
taking 500 ms that way. Passive waiting costs a little latency on tiny operators and removes the
collapse. The setting must be in the environment before the OpenMP runtime starts (the first
``import torch``), so :func:`configure_cpu` runs first thing in the CLI. Users who set
``OMP_WAIT_POLICY`` or the thread count themselves keep their values.
"""

from __future__ import annotations

import os


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
