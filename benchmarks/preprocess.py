"""Preprocessing throughput: phantom DICOM slices -> windowed uint8 multi-channel tensors.

Writes phantom studies as DICOM, copies every slice into one flat folder with unique names (the
RSNA layout), warms the OS file cache, then times on exactly those files, in interleaved rounds:

* ``ichseg``: ``discover_series`` + ``read_series`` + ``preprocess_volume`` per series;
* ``decode_limit``: bare ``pydicom.dcmread(f).pixel_array`` per file (no HU, no windowing);
* ``naive``: the per-slice, per-window loop of the seed papers (float64 HU, one clip per window,
  ``np.stack``, one cv2/PIL resize per channel);
* ``proposed``: ichseg with two contained changes that are NOT in ichseg (see README):
  a leaner ``decode_slice`` and a vectorised ``preprocess_volume``; outputs are compared with
  ichseg's.

Prints one JSON object. Example::

    python benchmarks/preprocess.py --studies 6 --slices 32 --size 256 --image-size 256
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    add_common_args,
    configure_openmp,
    emit,
    environment,
    goal,
    log,
    median,
    resolve_device,
    rounded,
)

# Tags the proposed decoder asks pydicom for besides the pixel module (0028,0002..0103).
_RESCALE_TAGS = [0x00281052, 0x00281053, 0x00280120]  # intercept, slope, padding value


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--studies", type=int, default=6, help="phantom studies")
    parser.add_argument("--slices", type=int, default=32, help="slices per study")
    parser.add_argument("--size", type=int, default=256, help="phantom in-plane pixels")
    parser.add_argument("--image-size", type=int, default=256, help="output pixels (square)")
    parser.add_argument("--context", type=int, default=0, help="2.5D neighbours each side")
    parser.add_argument(
        "--transfer-syntax",
        choices=("explicit", "rle", "jpeg2000"),
        default="explicit",
        help="how the phantom pixels are stored",
    )
    parser.add_argument("--naive-resize", choices=("cv2", "pil"), default="cv2")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--work-dir", type=Path, default=None, help="kept when given")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Data


def _write_phantoms(work: Path, args: argparse.Namespace) -> list[Path]:
    """Phantom DICOM series, then every slice copied into ``work/flat`` under a unique name."""
    from ichseg.phantom import PhantomConfig, Quirks, write_dataset

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
    return sorted(flat.iterdir())


def _warm_file_cache(files: list[Path]) -> int:
    """Read every file once so all methods start from the page cache, not the disk."""
    return sum(len(path.read_bytes()) for path in files)


# ---------------------------------------------------------------------------------------------
# Methods


def run_ichseg(folder: Path, data_cfg, masking_cfg, stages: dict[str, float]) -> list[np.ndarray]:
    """ichseg's own pipeline; ``stages`` receives the seconds of each step."""
    from ichseg.engine.data import preprocess_volume
    from ichseg.io.dicom import discover_series, read_series

    start = time.perf_counter()
    scan = discover_series(folder)
    stages["discover"] = time.perf_counter() - start
    outputs, read_s, prep_s = [], 0.0, 0.0
    for series in scan.series:
        start = time.perf_counter()
        volume = read_series(series)
        middle = time.perf_counter()
        outputs.append(preprocess_volume(volume, data_cfg, masking_cfg))
        read_s += middle - start
        prep_s += time.perf_counter() - middle
    stages["read_series"], stages["preprocess_volume"] = read_s, prep_s
    return outputs


def run_decode_limit(files: list[Path]) -> int:
    """The floor for any reader built on pydicom: parse the file and produce the pixel array."""
    import pydicom

    count = 0
    for path in files:
        count += pydicom.dcmread(path).pixel_array.ndim == 2
    return count


def run_naive(files: list[Path], windows: list[tuple[float, float]], size: int, resizer: str):
    """Per slice and per window, as the seed papers' notebooks do it."""
    import pydicom

    out = []
    for path in files:
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        channels = []
        for center, width in windows:
            low = center - width / 2
            channels.append(np.clip((hu - low) / width, 0.0, 1.0))
        image = np.stack(channels)
        resized = [_naive_resize(channel, size, resizer) for channel in image]
        out.append(np.clip(np.rint(np.stack(resized) * 255.0), 0, 255).astype(np.uint8))
    return out


def _naive_resize(channel: np.ndarray, size: int, resizer: str) -> np.ndarray:
    channel = channel.astype(np.float32)
    if resizer == "cv2":
        import cv2

        return cv2.resize(channel, (size, size), interpolation=cv2.INTER_LINEAR)
    from PIL import Image

    return np.asarray(Image.fromarray(channel, mode="F").resize((size, size), Image.BILINEAR))


# ---------------------------------------------------------------------------------------------
# Proposed changes to ichseg (measured here, not applied to the package)


def proposed_decode_slice(path: Path) -> tuple[np.ndarray, bool]:
    """PROPOSED ``ichseg.io.dicom.decode_slice``: same result, about a third less work.

    ``pydicom.pixels.pixel_array(path, ds_out=..., specific_tags=...)`` reads the pixel module
    and the three rescale tags and decodes, without building the full ``Dataset`` that
    ``dcmread(path).pixel_array`` creates and then converts element by element.
    """
    from pydicom.dataset import Dataset
    from pydicom.pixels import pixel_array

    from ichseg.errors import InputError
    from ichseg.io.dicom import _as_int, hu_from_stored

    header = Dataset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = pixel_array(path, ds_out=header, specific_tags=_RESCALE_TAGS)
    except Exception as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise InputError(
            path, f"cannot decode pixel data ({type(error).__name__}: {detail})"
        ) from None
    if stored.ndim != 2:
        raise InputError(path, f"expected one 2D frame, got pixel array shape {stored.shape}")
    padding = header.get("PixelPaddingValue")
    return hu_from_stored(
        stored,
        slope=float(header.get("RescaleSlope", 1) or 1),
        intercept=float(header.get("RescaleIntercept", 0) or 0),
        bits_stored=_as_int(header.get("BitsStored")),
        pixel_representation=_as_int(header.get("PixelRepresentation")),
        padding_value=None if padding is None else float(padding),
    )


def proposed_resize_to_uint8(images: np.ndarray, size: tuple[int, int], device) -> np.ndarray:
    """PROPOSED bilinear resize (``resize_slices`` order=1) and uint8 rounding in torch.

    ``F.interpolate(..., align_corners=False)`` with edge clamping samples the same grid as
    ``zoom(..., grid_mode=True, mode="nearest")``; the two agree to float rounding (<= 1 uint8
    level). ``torch.round`` rounds half to even like ``np.rint``.
    """
    import torch
    import torch.nn.functional as F

    height, width = images.shape[-2:]
    flat = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    flat = flat.reshape(1, -1, height, width).to(device)
    out = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    out = out.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return out.reshape(*images.shape[:-2], *size).cpu().numpy()


def _window_float(hu: np.ndarray, windows) -> np.ndarray:
    """``(Z, H, W)`` HU -> ``(Z, C, H, W)`` float32 in [0, 1], each window written in place.

    Bit-identical to ``stack_windows(hu, windows)``, without its temporary per window.
    """
    from ichseg.preprocess.windowing import resolve_window

    resolved = [resolve_window(w) for w in windows]
    out = np.empty((hu.shape[0], len(resolved), *hu.shape[1:]), dtype=np.float32)
    for index, w in enumerate(resolved):
        channel = out[:, index]
        np.subtract(hu, np.float32(w.low), out=channel)
        channel /= np.float32(w.width)
        np.clip(channel, 0.0, 1.0, out=channel)
    return out


def _window_to_uint8(hu: np.ndarray, windows) -> np.ndarray:
    """``(Z, H, W)`` HU -> ``(Z, C, H, W)`` uint8 with one float32 scratch buffer.

    The float operations and their order are those of ``window`` then ``np.rint(x * 255.0)``,
    so the result is bit-identical to ichseg's at the native size.
    """
    from ichseg.preprocess.windowing import resolve_window

    resolved = [resolve_window(w) for w in windows]
    out = np.empty((hu.shape[0], len(resolved), *hu.shape[1:]), dtype=np.uint8)
    scratch = np.empty(hu.shape, dtype=np.float32)
    for index, w in enumerate(resolved):
        np.subtract(hu, np.float32(w.low), out=scratch)
        scratch /= np.float32(w.width)
        np.clip(scratch, 0.0, 1.0, out=scratch)
        scratch *= 255.0
        np.rint(scratch, out=scratch)
        out[:, index] = scratch
    return out


def proposed_preprocess_volume(volume, data_cfg, masking_cfg, device) -> np.ndarray:
    """PROPOSED unmasked ``preprocess_volume``: all slices at once, no per-slice Python loop.

    At the native size: window straight into uint8 (bit-identical to ichseg). Otherwise: window
    all slices in place into one float32 array, then resize and round in torch. The 2.5D gather
    is an index into the per-window result instead of re-windowing every neighbour.
    """
    from ichseg.preprocess.windowing import neighbour_indices

    if masking_cfg.enabled:
        raise NotImplementedError("the benchmark measures the unmasked path only")
    hu = np.asarray(volume.hu, dtype=np.float32)
    size = (data_cfg.image_size, data_cfg.image_size)
    if hu.shape[1:] == size:
        channels = _window_to_uint8(hu, data_cfg.windows)
    else:
        channels = proposed_resize_to_uint8(_window_float(hu, data_cfg.windows), size, device)
    if data_cfg.context:
        z = channels.shape[0]
        index = [neighbour_indices(z, i, data_cfg.context) for i in range(z)]
        channels = channels[np.asarray(index)].reshape(z, -1, *size)
    return channels


def run_proposed(
    folder: Path, data_cfg, masking_cfg, device, stages: dict[str, float]
) -> list[np.ndarray]:
    """ichseg's discovery and ``read_series`` with the two proposed replacements swapped in."""
    import ichseg.io.dicom as dicom_module

    original = dicom_module.decode_slice
    dicom_module.decode_slice = proposed_decode_slice  # read_series looks it up at call time
    try:
        start = time.perf_counter()
        scan = dicom_module.discover_series(folder)
        stages["discover"] = time.perf_counter() - start
        outputs, read_s, prep_s = [], 0.0, 0.0
        for series in scan.series:
            start = time.perf_counter()
            volume = dicom_module.read_series(series)
            middle = time.perf_counter()
            outputs.append(proposed_preprocess_volume(volume, data_cfg, masking_cfg, device))
            read_s += middle - start
            prep_s += time.perf_counter() - middle
    finally:
        dicom_module.decode_slice = original
    stages["read_series"], stages["preprocess_volume"] = read_s, prep_s
    return outputs


def preprocess_breakdown(volumes: list, data_cfg) -> dict[str, float]:
    """Seconds of each step of ichseg's ``preprocess_volume`` (unmasked), run step by step."""
    from ichseg.preprocess.windowing import resize_slices, slice_channels

    size = (data_cfg.image_size, data_cfg.image_size)
    window_s = resize_s = quantize_s = 0.0
    for volume in volumes:
        start = time.perf_counter()
        channels = np.stack(
            [
                slice_channels(volume.hu, z, data_cfg.windows, data_cfg.context)
                for z in range(volume.hu.shape[0])
            ]
        )
        window_s += time.perf_counter() - start
        start = time.perf_counter()
        channels = resize_slices(channels, size)
        resize_s += time.perf_counter() - start
        start = time.perf_counter()
        np.clip(np.rint(channels * 255.0), 0, 255).astype(np.uint8)
        quantize_s += time.perf_counter() - start
    return {"window_stack": window_s, "resize": resize_s, "quantize": quantize_s}


def per_file_costs(files: list[Path]) -> dict[str, float]:
    """Seconds per file of the reads each pipeline is built from, one pass over all files each.

    ``pixel_array_only`` is what decoding would cost if discovery kept the rescale tags it
    already reads; ``dcmread_header_tags`` is pydicom's own cost of the discovery read, without
    ichseg's value conversions.
    """
    import pydicom
    from pydicom.pixels import pixel_array

    from ichseg.io.dicom import _HEADER_TAGS, decode_slice, read_header

    variants: dict[str, Callable[[Path], Any]] = {
        "dcmread_pixel_array": lambda p: pydicom.dcmread(p).pixel_array,
        "ichseg_decode_slice": decode_slice,
        "proposed_decode_slice": proposed_decode_slice,
        "pixel_array_only": pixel_array,
        "ichseg_read_header": read_header,
        "dcmread_header_tags": lambda p: pydicom.dcmread(
            p, stop_before_pixels=True, specific_tags=_HEADER_TAGS
        ),
    }
    costs = {}
    for name, fn in variants.items():
        start = time.perf_counter()
        for path in files:
            fn(path)
        costs[name] = (time.perf_counter() - start) / len(files)
    return costs


# ---------------------------------------------------------------------------------------------


def _agreement(reference: list[np.ndarray], other: list[np.ndarray]) -> dict[str, Any]:
    """Largest uint8 difference and the share of differing values between two outputs."""
    ref = np.concatenate(reference).astype(np.int16)
    alt = np.concatenate(other).astype(np.int16)
    if ref.shape != alt.shape:
        return {"same_shape": False, "shapes": [list(ref.shape), list(alt.shape)]}
    diff = np.abs(ref - alt)
    return {
        "same_shape": True,
        "max_abs_diff_uint8": int(diff.max()),
        "fraction_differing": rounded(float((diff > 0).mean()), 6),
    }


def _naive_in_ichseg_order(naive: list[np.ndarray], files: list[Path]) -> list[np.ndarray]:
    """Naive output regrouped like ichseg's (series sorted by path, slices by position)."""
    from ichseg.io.dicom import discover_series, read_series

    by_name = {path.name: image for path, image in zip(files, naive, strict=True)}
    grouped = []
    for series in discover_series(files[0].parent).series:
        volume = read_series(series)
        names = {h.sop_uid: h.path.name for h in series.headers}
        grouped.append(np.stack([by_name[names[uid]] for uid in volume.sop_uids]))
    return grouped


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    if args.repeats < 1:
        sys.exit("error: --repeats must be at least 1")
    configure_openmp(args.omp_spin)
    device = resolve_device(args.device)
    import torch

    from ichseg.config import DataConfig, MaskingConfig
    from ichseg.preprocess.windowing import resolve_window

    torch.set_num_threads(args.threads)
    env = environment(device, args.threads)  # now, so its load average is the starting one
    data_cfg = DataConfig(image_size=args.image_size, context=args.context)
    masking_cfg = MaskingConfig()
    windows = [(w.center, w.width) for w in map(resolve_window, data_cfg.windows)]

    temporary = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="ichseg-bench-pre-")) if temporary else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        log(f"writing {args.studies} x {args.slices} phantom slices ({args.size} px) to {work}")
        files = _write_phantoms(work, args)
        folder = files[0].parent
        size_bytes = _warm_file_cache(files)
        log(f"{len(files)} files, {size_bytes / 2**20:.1f} MiB, file cache warmed")

        methods: dict[str, Callable[[dict[str, float]], Any]] = {
            "ichseg": lambda st: run_ichseg(folder, data_cfg, masking_cfg, st),
            "decode_limit": lambda st: run_decode_limit(files),
            "naive": lambda st: run_naive(files, windows, args.image_size, args.naive_resize),
            "proposed": lambda st: run_proposed(folder, data_cfg, masking_cfg, device, st),
        }
        log("warm-up round (imports, allocator)")
        outputs = {name: fn({}) for name, fn in methods.items()}
        seconds: dict[str, list[float]] = {name: [] for name in methods}
        stages: dict[str, dict[str, list[float]]] = {"ichseg": {}, "proposed": {}}
        breakdown: dict[str, list[float]] = {}
        file_costs: dict[str, list[float]] = {}
        volumes = None
        names = list(methods)
        for round_index in range(args.repeats):
            # Rotating the order spreads slow spells of a shared machine over all methods.
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                record: dict[str, float] = {}
                start = time.perf_counter()
                methods[name](record)
                seconds[name].append(time.perf_counter() - start)
                for stage, value in record.items():
                    stages.setdefault(name, {}).setdefault(stage, []).append(value)
            if volumes is None:
                from ichseg.io.dicom import discover_series, read_series

                volumes = [read_series(s) for s in discover_series(folder).series]
            for step, value in preprocess_breakdown(volumes, data_cfg).items():
                breakdown.setdefault(step, []).append(value)
            for step, value in per_file_costs(files).items():
                file_costs.setdefault(step, []).append(value)
            log(
                f"round {round_index + 1}/{args.repeats}: "
                + ", ".join(f"{n} {seconds[n][-1]:.3f}s" for n in names)
            )
        naive_grouped = _naive_in_ichseg_order(outputs["naive"], files)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)

    n = len(files)
    med = {name: median(values) for name, values in seconds.items()}
    per_round = {
        "ichseg_over_decode_limit": [
            a / b for a, b in zip(seconds["ichseg"], seconds["decode_limit"], strict=True)
        ],
        "naive_over_ichseg": [
            a / b for a, b in zip(seconds["naive"], seconds["ichseg"], strict=True)
        ],
    }
    ichseg_over_decode = med["ichseg"] / med["decode_limit"]
    naive_speedup = med["naive"] / med["ichseg"]
    discover_s = median(stages["ichseg"]["discover"])
    result = {
        "benchmark": "preprocess",
        "config": {
            "studies": args.studies,
            "slices_per_study": args.slices,
            "phantom_px": args.size,
            "image_size": args.image_size,
            "windows": [str(w) for w in data_cfg.windows],
            "context": args.context,
            "transfer_syntax": args.transfer_syntax,
            "naive_resize": args.naive_resize,
            "layout": "flat (all slices in one folder, unique names)",
            "repeats": args.repeats,
        },
        "env": env,
        "files": n,
        "megabytes": rounded(size_bytes / 2**20, 1),
        "seconds_median": {k: rounded(v, 4) for k, v in med.items()},
        "slices_per_s": {k: rounded(n / v, 1) for k, v in med.items()},
        "discovery_files_per_s": rounded(n / discover_s, 1),
        "stages_s_median": {
            name: {stage: rounded(median(v), 4) for stage, v in st.items()}
            for name, st in stages.items()
            if st
        },
        "ichseg_preprocess_breakdown_s_median": {
            k: rounded(median(v), 4) for k, v in breakdown.items()
        },
        "per_file_ms_median": {k: rounded(1e3 * median(v), 4) for k, v in file_costs.items()},
        "ratios": {
            "ichseg_over_decode_limit_time": rounded(ichseg_over_decode),
            "ichseg_without_discovery_over_decode_limit_time": rounded(
                (med["ichseg"] - discover_s) / med["decode_limit"]
            ),
            "naive_over_ichseg_time": rounded(naive_speedup),
            "proposed_over_decode_limit_time": rounded(med["proposed"] / med["decode_limit"]),
            "naive_over_proposed_time": rounded(med["naive"] / med["proposed"]),
            "ichseg_over_proposed_time": rounded(med["ichseg"] / med["proposed"]),
            "per_round": {k: [rounded(v) for v in vs] for k, vs in per_round.items()},
        },
        "goals": {
            "ichseg_over_decode_limit": goal(ichseg_over_decode, 1.25, at_most=True),
            "naive_over_ichseg_speedup": goal(naive_speedup, 3.0, at_most=False),
        },
        "agreement_with_ichseg": {
            "proposed": _agreement(outputs["ichseg"], outputs["proposed"]),
            "naive": _agreement(outputs["ichseg"], naive_grouped),
        },
    }
    emit(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
