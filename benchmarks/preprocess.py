"""Preprocessing throughput: DICOM slices in one flat folder -> windowed uint8 classifier input.

Writes phantom studies as DICOM, copies every slice into one flat folder with unique names (the
RSNA layout), warms the OS file cache, then times on exactly those files, in interleaved rounds:

* ``ichseg``: ``build_slices`` on the folder (the per-slice path: each file parsed once, its
  windows written to a cache shard, series assembled afterwards from the compact index), into an
  empty cache folder each round (the previous round's cache is removed before the timer
  starts), with ``--workers`` processes (inputs under ``MIN_PARALLEL_FILES``
  files are processed in the calling process);
* ``ichseg_volumes``: ``index_input`` + ``iter_volumes`` + the run's ``Preprocessor`` per
  volume (the path of ``predict``: whole volumes, header pass then decoding);
* ``decode_limit``: bare ``pydicom.dcmread(f).pixel_array`` per file in one process (no HU, no
  windowing, no sorting);
* ``naive``: the per-slice, per-window loop of the seed papers (float64 HU, one clip per window,
  ``np.stack``, one cv2/PIL resize per channel).

Wall seconds and CPU seconds (this process plus its worker processes) are both reported: on a
machine shared with other busy processes, wall time depends on what they take, CPU time much
less. Prints one JSON object. Example::

    python benchmarks/preprocess.py --studies 6 --slices 32 --size 512 --image-size 256
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    add_common_args,
    configure_process,
    emit,
    environment,
    goal,
    log,
    median,
    process_tree_cpu_seconds,
    resolve_device,
    rounded,
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument(
        "--studies",
        type=int,
        default=128,
        help="phantom studies (default 128 x 32 slices: 4,096 files, enough that the worker "
        "processes' start-up is spread as on a real dataset)",
    )
    parser.add_argument("--slices", type=int, default=32, help="slices per study")
    parser.add_argument("--size", type=int, default=256, help="phantom in-plane pixels")
    parser.add_argument("--image-size", type=int, default=256, help="output pixels (square)")
    parser.add_argument("--context", type=int, default=0, help="2.5D neighbours each side")
    parser.add_argument(
        "--workers", type=int, default=None, help="ichseg worker processes (default: CPUs)"
    )
    parser.add_argument(
        "--transfer-syntax",
        choices=("explicit", "rle", "jpeg2000"),
        default="explicit",
        help="how the phantom pixels are stored",
    )
    parser.add_argument("--naive-resize", choices=("cv2", "pil"), default="cv2")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="kept when given; its phantom is reused by a later run with the same settings",
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Data


def _write_phantoms(work: Path, args: argparse.Namespace) -> tuple[list[Path], Path]:
    """Phantom DICOM series, then every slice copied into ``work/flat`` under a unique name.

    A ``--work-dir`` that already holds the phantom of these settings (``phantom.json``) is
    reused as it is.
    """
    from ichseg.phantom import PhantomConfig, Quirks, write_dataset

    settings = {
        "studies": args.studies,
        "slices": args.slices,
        "size": args.size,
        "transfer_syntax": args.transfer_syntax,
        "seed": args.seed,
    }
    marker = work / "phantom.json"
    labels = work / "phantom" / "labels_rsna.csv"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        log(f"reusing the phantom in {work}")
        return sorted((work / "flat").iterdir()), labels
    marker.unlink(missing_ok=True)
    shutil.rmtree(work / "phantom", ignore_errors=True)  # no studies of other settings left
    log(f"writing {args.studies} x {args.slices} phantom slices ({args.size} px) to {work}")
    write_dataset(
        work / "phantom",
        studies=args.studies,
        seed=args.seed,
        config=PhantomConfig(size=args.size, num_slices=args.slices),
        quirks=Quirks(transfer_syntax=args.transfer_syntax),
        write_nifti=False,
    )
    flat = work / "flat"
    if flat.exists():
        shutil.rmtree(flat)
    flat.mkdir()
    for path in sorted((work / "phantom" / "dicom").glob("*/*.dcm")):
        shutil.copyfile(path, flat / f"{path.parent.name}_{path.name}")
    marker.write_text(json.dumps(settings))
    return sorted(flat.iterdir()), labels


def _warm_file_cache(files: list[Path]) -> int:
    """Read every file once so all methods start from the page cache, not the disk."""
    return sum(len(path.read_bytes()) for path in files)


# ---------------------------------------------------------------------------------------------
# Methods


def run_ichseg(config, cache: Path, workers: int | None):
    """ichseg's slice cache, built into the empty ``cache`` (its product is the cache on disk,
    so reading it back is not timed: see :func:`cached_windows`)."""
    from ichseg.engine.cache import build_slices

    return build_slices(config, cache_root=cache, progress=False, workers=workers)


def empty_cache(cache: Path) -> None:
    """Remove the previous round's cache, untimed: a build starts from an empty cache folder,
    as the other methods start from nothing (deleting 800 MB of shards took 0.06 s)."""
    shutil.rmtree(cache, ignore_errors=True)


def cached_windows(slices) -> dict[tuple[str, int], np.ndarray]:
    """The windows of a built cache by (series UID, slice index), for the agreement check."""
    rows = np.flatnonzero(slices.slice_index >= 0)
    images = slices.images[rows]
    return {
        (str(slices.series[r]), int(slices.slice_index[r])): image
        for r, image in zip(rows, images, strict=True)
    }


def run_ichseg_volumes(folder: Path, preprocessor, workers: int | None) -> dict:
    """The predict path: index, volumes one at a time, the run's preprocessor."""
    from ichseg.io.loader import index_input

    out = {}
    for volume in index_input(folder, workers=workers).iter_volumes(workers=workers):
        base = preprocessor(volume).base
        for z in range(len(base)):
            out[(volume.series_uid, z)] = base[z]
    return out


def run_decode_limit(files: list[Path]) -> int:
    """The floor for any reader built on pydicom: parse the file and produce the pixel array."""
    import pydicom

    count = 0
    for path in files:
        count += pydicom.dcmread(path).pixel_array.ndim == 2
    return count


def run_naive(files: list[Path], windows: list[tuple[float, float]], size: int, resizer: str):
    """Per slice and per window, as the seed papers' notebooks do it; output by SOP UID."""
    import pydicom

    out = {}
    for path in files:
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        channels = []
        for center, width in windows:
            low = center - width / 2
            channels.append(np.clip((hu - low) / width, 0.0, 1.0))
        image = np.stack(channels)
        resized = [_naive_resize(channel, size, resizer) for channel in image]
        out[str(ds.SOPInstanceUID)] = np.clip(np.rint(np.stack(resized) * 255.0), 0, 255).astype(
            np.uint8
        )
    return out


def _naive_resize(channel: np.ndarray, size: int, resizer: str) -> np.ndarray:
    channel = channel.astype(np.float32)
    if channel.shape == (size, size):
        return channel
    if resizer == "cv2":
        import cv2

        return cv2.resize(channel, (size, size), interpolation=cv2.INTER_LINEAR)
    from PIL import Image

    return np.asarray(Image.fromarray(channel, mode="F").resize((size, size), Image.BILINEAR))


# ---------------------------------------------------------------------------------------------
# Where the time goes


def per_file_costs(files: list[Path]) -> dict[str, float]:
    """CPU milliseconds per file of the reads each pipeline is built from (one pass each)."""
    import pydicom

    from ichseg.io.dicom import decode_slice, parse_file, read_header

    variants: dict[str, Callable[[Path], Any]] = {
        "dcmread_pixel_array": lambda p: pydicom.dcmread(p).pixel_array,
        "dcmread_only": lambda p: pydicom.dcmread(p),
        "ichseg_parse_file_single_pass": parse_file,
        # What the slice cache's workers parse: stored values, in place in the file's bytes.
        "ichseg_parse_file_stored": lambda p: parse_file(p, keep_stored=True),
        "ichseg_read_header": read_header,
        "ichseg_decode_slice": decode_slice,
    }
    costs = {}
    for name, fn in variants.items():
        start = time.process_time()
        for path in files:
            fn(path)
        costs[name] = (time.process_time() - start) / len(files) * 1e3
    return costs


def _agreement(reference: dict, other: dict) -> dict[str, Any]:
    """Largest uint8 difference and the share of differing values over the common keys."""
    keys = sorted(set(reference) & set(other))
    if len(keys) != len(reference) or len(keys) != len(other):
        return {"same_slices": False, "counts": [len(reference), len(other)]}
    ref = np.stack([reference[k] for k in keys]).astype(np.int16)
    alt = np.stack([other[k] for k in keys]).astype(np.int16)
    diff = np.abs(ref - alt)
    return {
        "same_slices": True,
        "max_abs_diff_uint8": int(diff.max()),
        "fraction_differing": rounded(float((diff > 0).mean()), 6),
    }


def _naive_by_slice(naive: dict, cached: dict, files: list[Path]) -> dict:
    """Naive output keyed like ichseg's, through each file's series UID and slice index."""
    from ichseg.io.loader import index_input

    out = {}
    for volume in index_input(files[0].parent, workers=1).iter_volumes(workers=1):
        for z, sop in enumerate(volume.sop_uids):
            out[(volume.series_uid, z)] = naive[sop]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    if args.repeats < 1:
        sys.exit("error: --repeats must be at least 1")
    configure_process(args)
    device = resolve_device(args.device)
    import torch

    from ichseg.config import load_config
    from ichseg.io.workers import MIN_PARALLEL_FILES, resolve_workers
    from ichseg.preprocess.pipeline import Preprocessor
    from ichseg.preprocess.windowing import resolve_window

    torch.set_num_threads(args.threads)
    env = environment(device, args.threads)  # now, so its load average is the starting one
    temporary = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="ichseg-bench-pre-")) if temporary else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        files, labels = _write_phantoms(work, args)
        folder = files[0].parent
        size_bytes = _warm_file_cache(files)
        log(f"{len(files)} files, {size_bytes / 2**20:.1f} MiB, file cache warmed")
        config = load_config(
            extra={
                "name": "bench-preprocess",
                "data": {
                    "source": "dicom",
                    "root": str(folder),
                    "labels": str(labels),
                    "image_size": args.image_size,
                    "context": args.context,
                },
            }
        )
        preprocessor = Preprocessor.from_config(config)
        windows = [(w.center, w.width) for w in map(resolve_window, config.data.windows)]
        workers = resolve_workers(args.workers)

        methods: dict[str, Callable[[], Any]] = {
            "ichseg": lambda: run_ichseg(config, work / "cache", workers),
            "ichseg_volumes": lambda: run_ichseg_volumes(folder, preprocessor, workers),
            "decode_limit": lambda: run_decode_limit(files),
            "naive": lambda: run_naive(files, windows, args.image_size, args.naive_resize),
        }
        # Untimed steps before each call of a method.
        before: dict[str, Callable[[], None]] = {"ichseg": lambda: empty_cache(work / "cache")}
        log("warm-up round (imports, allocator, the readers' fork server)")
        outputs, warm_up = {}, {}
        for name, fn in methods.items():
            before.get(name, lambda: None)()
            start = time.perf_counter()
            outputs[name] = fn()
            warm_up[name] = time.perf_counter() - start
        outputs["ichseg"] = cached_windows(outputs["ichseg"])  # before a round removes it
        seconds: dict[str, list[float]] = {name: [] for name in methods}
        cpu: dict[str, list[float]] = {name: [] for name in methods}
        file_costs: dict[str, list[float]] = {}
        names = list(methods)
        for round_index in range(args.repeats):
            # Rotating the order spreads slow spells of a shared machine over all methods.
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                before.get(name, lambda: None)()
                cpu_start, start = process_tree_cpu_seconds(), time.perf_counter()
                methods[name]()
                seconds[name].append(time.perf_counter() - start)
                cpu[name].append(process_tree_cpu_seconds() - cpu_start)
            for step, value in per_file_costs(files).items():
                file_costs.setdefault(step, []).append(value)
            log(
                f"round {round_index + 1}/{args.repeats}: "
                + ", ".join(f"{n} {seconds[n][-1]:.3f}s" for n in names)
            )
        naive_keyed = _naive_by_slice(outputs["naive"], outputs["ichseg"], files)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)

    n = len(files)
    med = {name: median(values) for name, values in seconds.items()}
    med_cpu = {name: median(values) for name, values in cpu.items()}

    def per_round(a: str, b: str) -> list[float | None]:
        return [rounded(x / y) for x, y in zip(seconds[a], seconds[b], strict=True)]

    ichseg_over_decode = med["ichseg"] / med["decode_limit"]
    naive_speedup = med["naive"] / med["ichseg"]
    result = {
        "benchmark": "preprocess",
        "config": {
            "studies": args.studies,
            "slices_per_study": args.slices,
            "phantom_px": args.size,
            "image_size": args.image_size,
            "windows": [str(w) for w in config.data.windows],
            "context": args.context,
            "transfer_syntax": args.transfer_syntax,
            "naive_resize": args.naive_resize,
            "layout": "flat (all slices in one folder, unique names)",
            "workers": workers,
            "workers_used": workers if n >= MIN_PARALLEL_FILES else 1,
            "min_parallel_files": MIN_PARALLEL_FILES,
            "repeats": args.repeats,
        },
        "env": env,
        "files": n,
        "megabytes": rounded(size_bytes / 2**20, 1),
        "seconds_median": {k: rounded(v, 4) for k, v in med.items()},
        # Each method's first call in this process, untimed in the rounds: ichseg's includes
        # starting the fork server its workers come from (once per process), as a one-off
        # command's build would.
        "seconds_warm_up_round": {k: rounded(v, 4) for k, v in warm_up.items()},
        "cpu_seconds_median": {k: rounded(v, 4) for k, v in med_cpu.items()},
        "slices_per_s": {k: rounded(n / v, 1) for k, v in med.items()},
        "per_file_cpu_ms_median": {k: rounded(median(v), 4) for k, v in file_costs.items()},
        "ratios": {
            "ichseg_over_decode_limit_time": rounded(ichseg_over_decode),
            "ichseg_over_decode_limit_cpu": rounded(med_cpu["ichseg"] / med_cpu["decode_limit"]),
            "naive_over_ichseg_time": rounded(naive_speedup),
            "naive_over_ichseg_cpu": rounded(med_cpu["naive"] / med_cpu["ichseg"]),
            "ichseg_volumes_over_decode_limit_time": rounded(
                med["ichseg_volumes"] / med["decode_limit"]
            ),
            "naive_over_ichseg_volumes_time": rounded(med["naive"] / med["ichseg_volumes"]),
            "per_round": {
                "ichseg_over_decode_limit": per_round("ichseg", "decode_limit"),
                "naive_over_ichseg": per_round("naive", "ichseg"),
            },
        },
        "goals": {
            "ichseg_over_decode_limit": goal(ichseg_over_decode, 1.25, at_most=True),
            "naive_over_ichseg_speedup": goal(naive_speedup, 2.5, at_most=False),
        },
        "agreement_with_ichseg": {
            "ichseg_volumes": _agreement(outputs["ichseg"], outputs["ichseg_volumes"]),
            "naive": _agreement(outputs["ichseg"], naive_keyed),
        },
    }
    emit(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
