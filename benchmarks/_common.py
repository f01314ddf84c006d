"""Helpers shared by the benchmark scripts: device choice, timing, environment, JSON output.

The scripts run as ``python benchmarks/<name>.py``, so this module is imported by its bare name.
Nothing here imports torch at module level: ``training.py`` must be able to hide CUDA from torch
before torch is imported.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


def log(message: str) -> None:
    """Progress line on stderr (stdout carries only the JSON result)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--threads`` and ``--repeats``, the same in every script."""
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where torch work runs (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--threads", type=int, default=cpu_count(), help="torch intra-op threads (default: cores)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed rounds; figures are medians (>= 3)"
    )
    parser.add_argument(
        "--omp-spin",
        action="store_true",
        help="keep OpenMP's default spin-waiting (default: OMP_WAIT_POLICY=PASSIVE)",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's adaptive memory thresholds (default: as the CLI, freed memory is "
        "kept for reuse: ichseg.runtime.keep_freed_memory)",
    )


def configure_process(args: argparse.Namespace) -> None:
    """The process settings of ichseg's CLI (``--omp-spin`` and ``--default-malloc`` opt out),
    so that every method a script compares runs under the same ones; call before importing
    torch."""
    configure_openmp(args.omp_spin)
    if args.default_malloc:
        # Read by ichseg's worker processes and child processes too, which inherit it.
        os.environ["ICHSEG_KEEP_FREED_MEMORY"] = "0"
    from ichseg.runtime import keep_freed_memory

    keep_freed_memory()


def configure_openmp(spin: bool) -> str:
    """Choose how idle OpenMP threads wait; call before torch is imported.

    On a machine shared with other busy processes, threads that spin at a barrier burn the
    time slice the thread still holding work needs, and a 4 ms U-Net forward pass was seen to
    take 500 ms. PASSIVE makes them sleep instead; on an idle machine it costs a little latency
    on tiny ops. An OMP_WAIT_POLICY already in the environment is left alone.
    """
    if not spin:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return os.environ.get("OMP_WAIT_POLICY", "default (spin, then sleep)")


def resolve_device(requested: str | None):
    """The torch device to use; exits with a one-line error when CUDA is asked for but absent."""
    import torch

    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda was requested but torch.cuda.is_available() is False")
    return torch.device(requested)


def hide_cuda_if_cpu(requested: str | None) -> None:
    """Make ``--device cpu`` binding for code that picks CUDA by itself (ichseg's trainer).

    Must run before torch initialises CUDA; an empty CUDA_VISIBLE_DEVICES hides every GPU.
    """
    if requested == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def synchronize(device) -> None:
    """Wait for queued GPU work so wall-clock times cover it."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device=None) -> float:
    """Seconds one call of ``fn`` takes (GPU work included)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def rounded(value: float | None, digits: int = 3) -> float | None:
    """``round`` that keeps None and gives 3 significant figures to small numbers."""
    if value is None:
        return None
    if value != 0 and abs(value) < 10 ** (-digits + 1):
        return float(f"{value:.3g}")
    return round(float(value), digits)


def descendants(pid: int | None = None) -> list[int]:
    """The live processes below ``pid`` (default: this one), children first, from Linux's
    /proc; empty elsewhere. Reader workers are grandchildren: they fork from a fork server."""
    found: list[int] = []
    queue = [os.getpid() if pid is None else pid]
    while queue:
        parent = queue.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as handle:
                    children = [int(p) for p in handle.read().split()]
            except OSError:
                continue
            found += children
            queue += children
    return found


def process_tree_cpu_seconds() -> float:
    """CPU seconds of this process and of every process it started, directly or not.

    ``RUSAGE_CHILDREN`` alone counts only children that ended and were waited for: not the
    fork server (it lives on) nor the workers it forked (it waits for them, not us). Each live
    descendant adds its own time and that of the children it waited for, so nothing is
    counted twice.
    """
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + ended.ru_utime + ended.ru_stime
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in descendants():
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile: counted by whoever waited for it
        # utime, stime, cutime, cstime: fields 14-17 of proc(5), 11-14 after the name.
        total += sum(int(v) for v in fields[11:15]) / ticks
    return total


def load_average() -> list[float] | None:
    """1/5/15-minute load averages; above the core count, other processes compete for CPU."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(device, threads: int) -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    info: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host_cpus": cpu_count(),
        "cpu": _cpu_model(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "torch_threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "freed_memory_kept": _freed_memory_kept(),
        "load_average_start": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _freed_memory_kept() -> bool:
    from ichseg.runtime import freed_memory_kept

    return freed_memory_kept()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def goal(value: float, limit: float, at_most: bool) -> dict[str, Any]:
    """A goal entry: the measured value, its bound, and whether it is met."""
    met = value <= limit if at_most else value >= limit
    return {"value": rounded(value), "goal": f"{'<=' if at_most else '>='} {limit}", "met": met}


def emit(result: dict[str, Any]) -> None:
    """Print the one JSON object on stdout, after stamping the load average at the end."""
    result.setdefault("env", {})["load_average_end"] = load_average()
    print(json.dumps(result))
