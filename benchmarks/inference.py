"""Inference throughput against the machine's matmul peak, and end-to-end seconds per study.

Part 1, models: the intracranial U-Net (``SegmenterConfig()`` at its configured size) and the
SE-ResNet50 classifier (``create_model("seresnet50", in_channels=3, num_classes=6)`` at
``--image-size``) run forward under ``torch.inference_mode`` in eval mode, at each batch size, in
fp32 and under bf16 autocast, with contiguous (NCHW) and channels_last weights and inputs.
With ``--compile`` the bf16 channels_last models are also run through ``torch.compile``
(inductor, weight freezing) at each batch shape. FLOPs per image come from
``torch.utils.flop_counter.FlopCounterMode``; the achieved GFLOP/s is set against the matmul
peak measured in the same rounds (fp32 against fp32, bf16 against bf16): the faster of a square
``torch.matmul`` and a 1 x 1 convolution of the same FLOPs (``gemm_timers``), each reported in
``peak_kernels_gflop_per_s``.

``default_path`` is the classifier as ``predict`` runs it: ``prepare_for_inference`` (with the
default compile setting, and with ``--compile`` also compiled), ``predict_probabilities`` over
``uint8_batches`` of ``--path-slices`` uint8 slices (the conversion to float included), bf16
autocast as a run with ``train.amp`` uses.

Part 2, end to end: a run folder (``best.pt`` in the trainer's checkpoint format with the
classifier's random weights, ``thresholds.json``, and a U-Net ``segmenter.pt``) and a 40-slice
phantom DICOM study; ``ichseg.inference.predict`` is timed on it with the predictor loaded once,
with Grad-CAM off (thresholds no series reaches) and on (thresholds every series reaches), plus a
per-stage breakdown and, with ``--compile``, the same with classifier inference compiled (its
first call, which compiles, timed separately).

Prints one JSON object. Example::

    python benchmarks/inference.py --batches 1,8,32 --image-size 256 --compile
"""

from __future__ import annotations

import argparse
import copy
import math
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
    resolve_device,
    rounded,
    time_call,
)

# A timed sample repeats the forward pass until it lasts this long, so batch 1 is not all noise.
MIN_SAMPLE_S = 0.3


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--image-size", type=int, default=256, help="classifier input pixels")
    parser.add_argument("--classifier", default="seresnet50", help="registered model name")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--matmul-size", type=int, default=2048, help="square matmul for peak")
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile'd bf16 channels_last"
    )
    parser.add_argument(
        "--path-slices", type=int, default=64, help="slices through the default predict path"
    )
    parser.add_argument(
        "--dtypes",
        default="auto",
        help="fp32,bf16 or a subset; auto: fp32, and bf16 where it is native (it is emulated, "
        "and several times slower than fp32, on CPUs without AVX-512 BF16 or AMX)",
    )
    parser.add_argument("--study-slices", type=int, default=40, help="slices of the e2e study")
    parser.add_argument("--study-size", type=int, default=256, help="pixels of the e2e study")
    parser.add_argument(
        "--segmenter-epochs",
        type=int,
        default=0,
        help="train the e2e U-Net this many epochs on phantoms (0: random weights)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="add torch.profiler top ops of the classifier's bf16 runs at the largest batch",
    )
    parser.add_argument("--skip-models", action="store_true", help="only the end-to-end part")
    parser.add_argument("--skip-e2e", action="store_true", help="only the model part")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--work-dir", type=Path, default=None, help="kept when given")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Part 1: models against the matmul peak


def gemm_timers(size: int, dtype, device) -> dict[str, Callable[[], float]]:
    """Closures timing the same ``2 * size**3`` FLOPs in ``dtype`` two ways (inputs made once):
    a ``size``-square ``torch.matmul`` (the BLAS library's kernel) and a 1 x 1 convolution of
    ``size / 2`` channels over ``4 * size`` channels_last pixels (the convolution library's).

    The peak is the faster of the two: on an AMD EPYC (Zen 5) torch's fp32 matmul reached no
    more than 168 GFLOP/s at any shape tried while the fp32 convolution reached 321-350, so
    against the matmul alone the models' fp32 throughput came out above 100 % of "peak".
    """
    import torch

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    channels = size // 2
    conv = torch.nn.Conv2d(channels, channels, 1, bias=False).to(device, dtype)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(1, channels, 4, size, device=device).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)

    def convolve() -> None:
        with torch.inference_mode():
            conv(x)

    timers = {"matmul": lambda: torch.matmul(a, b), "conv1x1": convolve}
    for run in timers.values():
        run()  # first call picks the kernel and allocates the output
    return {name: (lambda run=run: time_call(run, device)) for name, run in timers.items()}


def flops_per_image(model, channels: int, size: int, device) -> float:
    """Forward FLOPs of one image (FlopCounterMode counts a multiply-add as 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, channels, size, size, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


class Variant:
    """One (model, memory format, dtype, batch) configuration and its timing closure."""

    def __init__(self, name: str, model, fmt: str, dtype: str, batch: int, x, device) -> None:
        self.name, self.model, self.fmt, self.dtype, self.batch = name, model, fmt, dtype, batch
        self.x, self.device = x, device
        self.iterations = 1
        self.samples: list[float] = []  # seconds per forward pass

    def forward(self) -> None:
        import torch

        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, torch.bfloat16, enabled=self.dtype == "bf16"),
        ):
            self.model(self.x)

    def calibrate(self) -> float:
        """Warm up (oneDNN primitive creation, compilation) and size the timed sample."""
        first = time_call(self.forward, self.device)
        again = time_call(self.forward, self.device)
        self.iterations = max(1, math.ceil(MIN_SAMPLE_S / max(again, 1e-6)))
        return first

    def sample(self) -> float:
        def run() -> None:
            for _ in range(self.iterations):
                self.forward()

        seconds = time_call(run, self.device) / self.iterations
        self.samples.append(seconds)
        return seconds


class PathVariant(Variant):
    """The classifier as ``predict`` runs it: ``predict_probabilities`` over uint8 batches."""

    def forward(self) -> None:
        from ichseg.engine.predict import (
            default_inference_batch,
            predict_probabilities,
            uint8_batches,
        )

        # amp as a run trained with bf16 autocast asks for it; predict_probabilities uses bf16
        # only where it pays (bf16_autocast_pays), and ``dtype`` records what actually ran.
        predict_probabilities(
            self.model,
            uint8_batches(self.x, default_inference_batch(self.device)),
            self.device,
            True,
            "multilabel",
        )


def _model_variants(args, device, batches: list[int]) -> tuple[list[Variant], dict[str, Any]]:
    import torch

    from ichseg.models import create_model
    from ichseg.segmentation.unet import SegmenterConfig, build_unet

    seg_cfg = SegmenterConfig()
    specs = {
        "unet": (build_unet(seg_cfg), seg_cfg.in_channels, seg_cfg.image_size),
        args.classifier: (
            create_model(args.classifier, in_channels=3, num_classes=6),
            3,
            args.image_size,
        ),
    }
    info: dict[str, Any] = {}
    variants: list[Variant] = []
    for name, (model, channels, size) in specs.items():
        model = model.to(device).eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        flops = flops_per_image(model, channels, size, device)
        info[name] = {"input": [channels, size, size], "gflop_per_image": rounded(flops / 1e9, 4)}
        models = {
            "contiguous": model,
            "channels_last": copy.deepcopy(model).to(memory_format=torch.channels_last),
        }
        for fmt, m in models.items():
            for dtype in args.dtype_list:
                for batch in batches:
                    x = torch.randn(batch, channels, size, size, device=device)
                    if fmt == "channels_last":
                        x = x.contiguous(memory_format=torch.channels_last)
                    variants.append(Variant(name, m, fmt, dtype, batch, x, device))
        if name == args.classifier:
            from ichseg.engine.predict import (
                bf16_autocast_pays,
                compile_by_default,
                prepare_for_inference,
            )

            path_dtype = "bf16" if bf16_autocast_pays(device) else "fp32"
            slices = torch.randint(0, 256, (args.path_slices, channels, size, size))
            slices = slices.to(torch.uint8).numpy()
            default = prepare_for_inference(copy.deepcopy(model), device)
            label = "default_path+compile" if compile_by_default() else "default_path"
            variants.append(
                PathVariant(name, default, label, path_dtype, len(slices), slices, device)
            )
            if args.compile and not compile_by_default():
                compiled_path = prepare_for_inference(copy.deepcopy(model), device, compile=True)
                variants.append(
                    PathVariant(
                        name, compiled_path, "path+compile", path_dtype, len(slices), slices, device
                    )
                )
        if args.compile:
            # Freezing folds BatchNorm into the convolutions and pre-packs oneDNN weights. Each
            # batch shape compiles anew (minutes on a slow CPU): the largest batch only.
            compiled = torch.compile(
                models["channels_last"], dynamic=False, options={"freezing": True}
            )
            batch = max(batches)
            x = torch.randn(batch, channels, size, size, device=device)
            x = x.contiguous(memory_format=torch.channels_last)
            for dtype in args.dtype_list:
                variants.append(
                    Variant(name, compiled, "channels_last+compile", dtype, batch, x, device)
                )
    return variants, info


def run_models(args, device, batches: list[int]) -> dict[str, Any]:
    import torch

    variants, info = _model_variants(args, device, batches)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    used = sorted({v.dtype for v in variants})
    peaks = {d: gemm_timers(args.matmul_size, dtypes[d], device) for d in used}
    for variant in variants:
        first = variant.calibrate()
        if "compile" in variant.fmt:
            info[variant.name][f"compile_s_batch{variant.batch}"] = rounded(first, 1)
        log(f"warm {variant.name} {variant.fmt} {variant.dtype} b{variant.batch}: {first:.2f}s")
    flop = 2.0 * args.matmul_size**3
    peak_samples: dict[str, list[list[float]]] = {d: [] for d in used}
    kernel_samples: dict[str, dict[str, list[float]]] = {
        d: {name: [] for name in timers} for d, timers in peaks.items()
    }
    for round_index in range(args.repeats):
        round_peaks: dict[str, list[float]] = {d: [] for d in used}

        def measure_peaks(store: dict[str, list[float]] = round_peaks) -> None:
            for dtype, timers in peaks.items():
                for _ in range(3):
                    speeds = {name: flop / timer() / 1e9 for name, timer in timers.items()}
                    for name, speed in speeds.items():
                        kernel_samples[dtype][name].append(speed)
                    store[dtype].append(max(speeds.values()))

        measure_peaks()
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            variant.sample()
        measure_peaks()  # at both ends: the round's peak brackets its model timings
        for dtype in peak_samples:
            peak_samples[dtype].append(round_peaks[dtype])
        log(
            f"round {round_index + 1}/{args.repeats}: peak "
            + ", ".join(f"{d} {median(v):.0f}" for d, v in round_peaks.items())
            + " GFLOP/s"
        )

    rows = []
    for v in variants:
        gflop = info[v.name]["gflop_per_image"] * v.batch
        fractions = [
            gflop / seconds / median(peak_samples[v.dtype][r])
            for r, seconds in enumerate(v.samples)
        ]
        seconds = median(v.samples)
        rows.append(
            {
                "model": v.name,
                "format": v.fmt,
                "dtype": v.dtype,
                "batch": v.batch,
                "ms_per_batch": rounded(seconds * 1e3, 2),
                "slices_per_s": rounded(v.batch / seconds, 2),
                "gflop_per_s": rounded(gflop / seconds, 1),
                "fraction_of_matmul_peak": rounded(median(fractions), 4),
            }
        )
    peak = {
        dtype: rounded(median([x for r in samples for x in r]), 1)
        for dtype, samples in peak_samples.items()
    }
    per_round_peak = {
        dtype: [rounded(median(r), 1) for r in samples] for dtype, samples in peak_samples.items()
    }
    profiles = {}
    if args.profile:
        largest = max(batches)
        for v in variants:
            if v.name == args.classifier and v.dtype == args.dtype_list[-1] and v.batch == largest:
                log(f"profiling {v.name} {v.fmt} {v.dtype} b{largest}")
                profiles[f"{v.fmt}/{v.dtype}/b{largest}"] = profile_top_ops(v)
    kernels = {
        dtype: {name: rounded(median(v), 1) for name, v in by_kernel.items()}
        for dtype, by_kernel in kernel_samples.items()
    }
    return {
        "models": info,
        "profiles": profiles,
        "matmul_peak_gflop_per_s": peak,
        "matmul_peak_per_round": per_round_peak,
        "peak_kernels_gflop_per_s": kernels,
        "results": rows,
        "channels_last_speedup": _format_speedups(variants),
    }


def profile_top_ops(variant: Variant, rows: int = 8) -> dict[str, Any]:
    """Self CPU time per operator of one forward pass (where the time goes, by op)."""
    from torch.profiler import ProfilerActivity, profile

    variant.forward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        variant.forward()
    events = list(prof.key_averages())
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return {
        "total_ms": rounded(total / 1e3, 1),
        "top": [
            {
                "op": e.key,
                "self_ms": rounded(e.self_cpu_time_total / 1e3, 1),
                "share": rounded(e.self_cpu_time_total / total, 3),
                "calls": e.count,
            }
            for e in top
        ],
    }


def _format_speedups(variants: list[Variant]) -> dict[str, float]:
    """Per configuration, contiguous time / channels_last time (median of per-round ratios)."""
    by_key = {(v.name, v.fmt, v.dtype, v.batch): v for v in variants}
    out = {}
    for (name, fmt, dtype, batch), v in by_key.items():
        if fmt != "contiguous":
            continue
        other = by_key[(name, "channels_last", dtype, batch)]
        ratios = [a / b for a, b in zip(v.samples, other.samples, strict=True)]
        out[f"{name}/{dtype}/b{batch}"] = rounded(median(ratios))
    return out


# ---------------------------------------------------------------------------------------------
# Part 2: end to end through ichseg.inference.predict


def build_run_folder(run: Path, args, device) -> Path:
    """A run folder ``load_predictor`` accepts, without training a classifier.

    ``best.pt`` follows the trainer's format (``state_dict``, ``config``, ``epoch``,
    ``val_loss``); ``segmenter.pt`` follows ``train_segmenter``'s.
    """
    import torch

    from ichseg.config import DataConfig, ModelConfig, RunConfig
    from ichseg.engine.checkpoint import Thresholds, build_model, save_thresholds
    from ichseg.segmentation.unet import SegmenterConfig, build_unet

    run.mkdir(parents=True, exist_ok=True)
    config = RunConfig(
        name="bench-inference",
        data=DataConfig(image_size=args.image_size),
        model=ModelConfig(name=args.classifier),
    )
    torch.manual_seed(args.seed)
    model = build_model(config, pretrained=False)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "config": config.model_dump(mode="json"),
            "epoch": 0,
            "val_loss": 0.0,
        },
        run / "best.pt",
    )
    half = {n: 0.5 for n in config.task.class_names}
    save_thresholds(Thresholds(half, half), run / "thresholds.json")
    if args.segmenter_epochs > 0:
        from ichseg.phantom import PhantomConfig, generate_study
        from ichseg.segmentation.training import train_segmenter

        log(f"training the U-Net for {args.segmenter_epochs} epoch(s) on 4 phantom studies")
        studies = [
            generate_study(args.seed * 100 + i, PhantomConfig(size=128, num_slices=24))
            for i in range(4)
        ]
        best = train_segmenter(
            studies,
            SegmenterConfig(epochs=args.segmenter_epochs),
            run / "segmenter_run",
            progress=False,
            device=str(device),
        )
        shutil.copyfile(best, run / "segmenter.pt")
    else:
        seg_cfg = SegmenterConfig()
        torch.save(
            {
                "state_dict": build_unet(seg_cfg).state_dict(),
                "config": seg_cfg.model_dump(mode="json"),
                "epoch": 0,
                "val_dice": None,
            },
            run / "segmenter.pt",
        )
    return run


def _with_thresholds(predictor, value: float):
    """A copy of the predictor whose every slice and series threshold is ``value``."""
    import dataclasses

    from ichseg.engine.checkpoint import Thresholds

    names = predictor.class_names
    fixed = {n: value for n in names}
    return dataclasses.replace(predictor, thresholds=Thresholds(fixed, dict(fixed)))


def stage_breakdown(predictor, study: Path, out: Path) -> dict[str, float]:
    """Seconds of each stage of ``predict`` for one study, calling ichseg's functions in order."""
    from ichseg.inference import VolumePrediction, write_gradcam
    from ichseg.io.loader import index_input, output_name
    from ichseg.io.nifti import write_nifti_atomic

    stages: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = fn()
        stages[name] = time.perf_counter() - start
        return value

    index = timed("discover", lambda: index_input(study))
    volume = timed("read_series", lambda: next(iter(index.iter_volumes())))
    mask = timed("segmenter", lambda: np.asarray(predictor.output_masker(volume), dtype=np.uint8))
    prepared = timed("preprocess", lambda: predictor.preprocessor(volume))
    images = prepared.images
    scored = timed("classifier", lambda: predictor.probabilities(images[prepared.keep], 32))
    probabilities = np.full((volume.num_slices, scored.shape[1]), np.nan, np.float32)
    probabilities[prepared.keep] = scored
    prediction = VolumePrediction(probabilities, prepared.keep, mask, images)
    name = output_name(volume)
    timed(
        "write_mask_nifti",
        lambda: write_nifti_atomic(
            volume.to_nifti(mask, dtype=np.uint8), out / "masks" / f"{name}_mask.nii.gz"
        ),
    )
    timed(
        "gradcam_3_slices",
        lambda: write_gradcam(predictor, volume, prediction, out / "gc", name, 3),
    )
    return stages


def run_e2e(args, device, work: Path) -> dict[str, Any]:
    from ichseg.inference import load_predictor, predict
    from ichseg.phantom import PhantomConfig, write_dataset

    run = build_run_folder(work / "run", args, device)
    write_dataset(
        work / "study",
        studies=1,
        seed=args.seed,
        config=PhantomConfig(size=args.study_size, num_slices=args.study_slices),
        write_nifti=False,
    )
    study = work / "study" / "dicom"
    for path in study.rglob("*.dcm"):
        path.read_bytes()  # warm the file cache

    start = time.perf_counter()
    predictor = load_predictor(run, device=str(device))
    load_s = time.perf_counter() - start
    cases: dict[str, tuple[Any, bool]] = {
        "negative_default": (_with_thresholds(predictor, 1.0 + 1e-9), False),
        "positive_default_gradcam": (_with_thresholds(predictor, 0.0), True),
    }
    compile_s = None
    if args.compile:
        from ichseg.engine.predict import prepare_for_inference

        compiled = load_predictor(run, device=str(device))
        prepare_for_inference(compiled.model, device, compile=True)
        compiled = _with_thresholds(compiled, 1.0 + 1e-9)
        start = time.perf_counter()
        predict(run, study, work / "out-compile-warm", predictor=compiled, progress=False)
        compile_s = time.perf_counter() - start
        cases["negative_compiled"] = (compiled, False)

    seconds: dict[str, list[float]] = {name: [] for name in cases}
    per_study: dict[str, list[float]] = {name: [] for name in cases}
    stages: dict[str, list[float]] = {}
    for name, (pred, gradcam) in cases.items():  # warm-up: oneDNN primitives, imports
        predict(
            run, study, work / f"out-warm-{name}", predictor=pred, progress=False, gradcam=gradcam
        )
    names = list(cases)
    for round_index in range(args.repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            pred, gradcam = cases[name]
            out = work / f"out-{name}-{round_index}"
            start = time.perf_counter()
            result = predict(run, study, out, predictor=pred, progress=False, gradcam=gradcam)
            seconds[name].append(time.perf_counter() - start)
            per_study[name].append(result.seconds_per_study)
            assert result.series_rows and bool(result.series_rows[0]["gradcam"]) == gradcam
        positive = cases["positive_default_gradcam"][0]
        for stage, value in stage_breakdown(positive, study, work / f"st-{round_index}").items():
            stages.setdefault(stage, []).append(value)
        log(
            f"e2e round {round_index + 1}/{args.repeats}: "
            + ", ".join(f"{n} {seconds[n][-1]:.2f}s" for n in names)
        )
    wall = {k: median(v) for k, v in seconds.items()}
    break_even = None
    if compile_s is not None and wall["negative_default"] > wall["negative_compiled"]:
        break_even = compile_s / (wall["negative_default"] - wall["negative_compiled"])
    return {
        "study": {"slices": args.study_slices, "pixels": args.study_size},
        "classifier": args.classifier,
        "classifier_image_size": args.image_size,
        "segmenter_weights": (
            f"trained {args.segmenter_epochs} epoch(s)" if args.segmenter_epochs else "random"
        ),
        "load_predictor_s": rounded(load_s, 2),
        "compile_first_call_s": rounded(compile_s, 1),
        "compile_pays_after_studies": rounded(break_even, 1),
        "predict_wall_s_median": {k: rounded(v, 3) for k, v in wall.items()},
        "predict_seconds_per_study_median": {
            k: rounded(median(v), 3) for k, v in per_study.items()
        },
        "stages_s_median": {k: rounded(median(v), 3) for k, v in stages.items()},
    }


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    if args.repeats < 1:
        sys.exit("error: --repeats must be at least 1")
    configure_process(args)
    device = resolve_device(args.device)
    import torch

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    from ichseg.engine.predict import bf16_is_native

    if args.dtypes == "auto":
        args.dtype_list = ["fp32"] + (["bf16"] if bf16_is_native(device) else [])
    else:
        args.dtype_list = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        if not set(args.dtype_list) <= {"fp32", "bf16"}:
            sys.exit("error: --dtypes takes fp32 and/or bf16")
    result: dict[str, Any] = {
        "benchmark": "inference",
        "config": {
            "classifier": args.classifier,
            "image_size": args.image_size,
            "batches": batches,
            "matmul_size": args.matmul_size,
            "compile": args.compile,
            "dtypes": args.dtype_list,
            "profile": args.profile,
            "repeats": args.repeats,
        },
        "env": environment(device, args.threads),
    }
    if not args.skip_models:
        result["throughput"] = run_models(args, device, batches)
    if not args.skip_e2e:
        temporary = args.work_dir is None
        work = Path(tempfile.mkdtemp(prefix="ichseg-bench-inf-")) if temporary else args.work_dir
        work.mkdir(parents=True, exist_ok=True)
        try:
            result["end_to_end"] = run_e2e(args, device, work)
        finally:
            if temporary:
                shutil.rmtree(work, ignore_errors=True)
    result["goals"] = _goals(result, batches)
    emit(result)
    return result


def _goals(result: dict[str, Any], batches: list[int]) -> dict[str, Any]:
    goals: dict[str, Any] = {}
    throughput = result.get("throughput")
    classifier = result["config"]["classifier"]
    dtype = "bf16" if "bf16" in result["config"]["dtypes"] else "fp32"
    if throughput:
        rows = [r for r in throughput["results"] if r["model"] == classifier]
        for row in rows:
            if row["format"].startswith(("default_path", "path+")):
                entry = goal(row["fraction_of_matmul_peak"], 0.4, at_most=False)
                entry["format"], entry["dtype"] = row["format"], row["dtype"]
                key = f"{classifier}_{row['format']}_fraction_of_{row['dtype']}_peak"
                goals[key] = entry
        rows = [r for r in rows if r["dtype"] == dtype]
        for label, formats in (
            ("eager", ("contiguous", "channels_last")),
            ("compiled", ("channels_last+compile",)),
        ):
            chosen = [r for r in rows if r["batch"] == max(batches) and r["format"] in formats]
            if chosen:
                best = max(chosen, key=lambda r: r["fraction_of_matmul_peak"])
                entry = goal(best["fraction_of_matmul_peak"], 0.4, at_most=False)
                entry["format"] = best["format"]
                key = f"{classifier}_{dtype}_b{max(batches)}_fraction_of_{dtype}_peak_{label}"
                goals[key] = entry
    e2e = result.get("end_to_end")
    if e2e:
        wall = e2e["predict_wall_s_median"]
        prefix = f"study_{e2e['study']['slices']}_slices_seconds"
        goals[f"{prefix}_negative"] = goal(wall["negative_default"], 3.0, True)
        goals[f"{prefix}_positive_gradcam"] = goal(wall["positive_default_gradcam"], 3.0, True)
        if "negative_compiled" in wall:
            goals[f"{prefix}_negative_compiled"] = goal(wall["negative_compiled"], 3.0, True)
    return goals


if __name__ == "__main__":
    main(sys.argv[1:])
