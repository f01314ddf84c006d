"""The slice cache on the RSNA layout: one flat folder of one-slice files, growing.

A synthetic flat folder (``_flat.py``: phantom series copied with unique UIDs under random
names, so consecutive files belong to different series) is grown to each size in ``--files``;
at each size the per-slice slice cache is built from nothing in a fresh child process, which
reports its wall and CPU seconds, the stages (listing, shards, assembly of the series from the
compact index), the peak resident memory of the building process and of the largest process
below it (``VmHWM``; the fork server, the workers it forks and multiprocessing's resource
tracker, or spawned workers where there is no fork server), and the cache's bytes on disk per
slice. From the largest size, the time and disk for the RSNA training set (752,803 slices) are
extrapolated.

Prints one JSON object. Example::

    python benchmarks/flat_folder.py --files 5000,10000,20000 --size 256 --image-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    add_common_args,
    configure_process,
    descendants,
    emit,
    environment,
    log,
    process_tree_cpu_seconds,
    resolve_device,
    rounded,
)

RSNA_TRAIN_SLICES = 752_803


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--files", default="5000,10000,20000", help="folder sizes, ascending")
    parser.add_argument("--size", type=int, default=256, help="phantom in-plane pixels")
    parser.add_argument(
        "--image-size", default="256", help="cache image sizes, comma-separated (each a build)"
    )
    parser.add_argument("--slices", type=int, default=40, help="slices per series")
    parser.add_argument("--workers", type=int, default=None, help="cache workers (default CPUs)")
    parser.add_argument("--work-dir", type=Path, default=None, help="kept when given")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _status_mib(pid: int | str, field: str) -> float | None:
    """``VmHWM`` (peak) or ``VmRSS`` of a process from /proc, in MiB; None when gone.

    ``ru_maxrss`` is no use here: Linux carries it across ``exec``, so a child started by a
    large process reports at least that process's size.
    """
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class _WorkerWatch:
    """Polls the peak resident memory (``VmHWM``) of the processes below this one (the fork
    server and the workers it forks, or spawned workers)."""

    def __init__(self, interval: float = 0.2) -> None:
        import threading

        self.peaks: dict[int, float] = {}
        self.interval = interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for pid in descendants():
                peak = _status_mib(pid, "VmHWM")
                if peak is not None:
                    self.peaks[pid] = max(peak, self.peaks.get(pid, 0.0))
            self.stop.wait(self.interval)

    def __enter__(self) -> _WorkerWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One cache build in this (fresh) process; its figures as a dict."""
    from ichseg.runtime import keep_freed_memory

    keep_freed_memory()  # as the CLI's process would (ICHSEG_KEEP_FREED_MEMORY=0: not)
    from ichseg.config import load_config
    from ichseg.engine import cache, cache_per_slice, sources

    stages: dict[str, float] = {}

    def timed(owner, name: str, key: str) -> None:
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                stages[key] = stages.get(key, 0.0) + time.perf_counter() - start

        setattr(owner, name, wrapper)

    timed(sources.CTFileSource, "listing", "listing")
    timed(cache_per_slice, "_finish_per_slice", "assemble_series")
    config = load_config(
        extra={
            "name": "bench-flat",
            "data": {
                "source": "dicom",
                "root": spec["root"],
                "labels": spec["labels"],
                "image_size": spec["image_size"],
                "workers": spec["workers"],
            },
        }
    )
    rss_start = _status_mib("self", "VmRSS")
    tree_start = process_tree_cpu_seconds()
    cpu_start = time.process_time()
    start = time.perf_counter()
    with _WorkerWatch() as watch:
        slices = cache.build_slices(config, cache_root=Path(spec["cache"]), progress=False)
    wall = time.perf_counter() - start
    cpu_self = time.process_time() - cpu_start
    cpu_tree = process_tree_cpu_seconds() - tree_start
    cache_bytes = sum(p.stat().st_size for p in slices.folder.rglob("*") if p.is_file())
    image_bytes = sum(p.stat().st_size for p in slices.folder.glob("shard-*/images.u8"))
    return {
        "files": spec["files"],
        "image_size": spec["image_size"],
        "slices_cached": len(slices),
        "usable": int(slices.usable().size),
        "series": int(len(set(slices.series[slices.usable()]))),
        "wall_s": wall,
        "cpu_s_self": cpu_self,
        "cpu_s_workers": cpu_tree - cpu_self,
        "stages_s": stages | {"shards": wall - sum(stages.values())},
        "peak_rss_mib": {
            "building_process_at_start": rss_start,
            "building_process": _status_mib("self", "VmHWM"),
            "largest_process_below": max(watch.peaks.values(), default=None),
        },
        "processes_seen_below": len(watch.peaks),
        "cache_bytes": cache_bytes,
        "image_bytes": image_bytes,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    configure_process(args)
    device = resolve_device(args.device)
    from _flat import write_flat_folder, write_rsna_labels

    from ichseg.io.workers import resolve_workers

    env = environment(device, args.threads)
    sizes = sorted(int(x) for x in args.files.split(",") if x.strip())
    image_sizes = [int(x) for x in args.image_size.split(",") if x.strip()]
    workers = resolve_workers(args.workers)
    temporary = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="ichseg-bench-flat-")) if temporary else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        flat = work / "flat"
        written = series = 0
        for size in sizes:
            start = time.perf_counter()
            # Each step adds whole new series after the ones already there.
            write_flat_folder(
                flat, size - written, size=args.size, slices=args.slices, start=series
            )
            series += -(-(size - written) // args.slices)
            labels = write_rsna_labels(work / "labels.csv", series, args.slices)
            log(f"{size} files ({time.perf_counter() - start:.0f} s to write)")
            written = size
            for image_size in image_sizes:
                cache = work / "cache"
                shutil.rmtree(cache, ignore_errors=True)
                spec = {
                    "root": str(flat),
                    "labels": str(labels),
                    "image_size": image_size,
                    "workers": workers,
                    "files": size,
                    "cache": str(cache),
                }
                output = subprocess.run(
                    [sys.executable, __file__, "--child", json.dumps(spec)],
                    check=True,
                    capture_output=True,
                    text=True,
                    env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
                )
                run = json.loads(output.stdout.strip().splitlines()[-1])
                run["files_per_s"] = size / run["wall_s"]
                run["cpu_ms_per_file"] = 1e3 * (run["cpu_s_self"] + run["cpu_s_workers"]) / size
                run["cache_bytes_per_slice"] = run["cache_bytes"] / run["slices_cached"]
                runs.append(run)
                log(
                    f"{size} files -> {image_size} px: {run['wall_s']:.1f} s, "
                    f"{run['files_per_s']:.0f} files/s, peak {run['peak_rss_mib']}"
                )
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)

    extrapolation = {}
    for image_size in image_sizes:
        largest = max((r for r in runs if r["image_size"] == image_size), key=lambda r: r["files"])
        per_slice = largest["cache_bytes_per_slice"]
        extrapolation[f"image_size_{image_size}"] = {
            "from_files": largest["files"],
            "cache_gb": rounded(per_slice * RSNA_TRAIN_SLICES / 1e9, 1),
            "hours_at_measured_rate": rounded(RSNA_TRAIN_SLICES / largest["files_per_s"] / 3600, 2),
            "cpu_hours": rounded(largest["cpu_ms_per_file"] * RSNA_TRAIN_SLICES / 3.6e6, 2),
        }
    growth = {}
    for image_size in image_sizes:
        rows = sorted((r for r in runs if r["image_size"] == image_size), key=lambda r: r["files"])
        if len(rows) > 1:
            first, last = rows[0], rows[-1]
            extra = last["files"] - first["files"]
            growth[f"image_size_{image_size}"] = {
                key: rounded(
                    1024**2
                    * ((last["peak_rss_mib"][key] or 0) - (first["peak_rss_mib"][key] or 0))
                    / extra,
                    1,
                )
                for key in ("building_process", "largest_process_below")
            }
    result = {
        "benchmark": "flat_folder",
        "config": {
            "files": sizes,
            "phantom_px": args.size,
            "image_sizes": image_sizes,
            "slices_per_series": args.slices,
            "workers": workers,
        },
        "env": env,
        "runs": [
            {k: (rounded(v, 3) if isinstance(v, float) else v) for k, v in run.items()}
            for run in runs
        ],
        "peak_rss_bytes_per_extra_file": growth,
        "rsna_extrapolation": {"train_slices": RSNA_TRAIN_SLICES, **extrapolation},
    }
    emit(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
