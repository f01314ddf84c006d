"""Inference throughput against the machine's matmul peak, and end-to-end seconds per study.

Part 1, models: the intracranial U-Net (``SegmenterConfig()`` at its configured size) and the
SE-ResNet50 classifier (``create_model("seresnet50", in_channels=3, num_classes=6)`` at
``--image-size``) run forward under ``torch.inference_mode`` in eval mode, at each batch size, in
fp32 and under bf16 autocast, with contiguous (NCHW) and channels_last weights and inputs.
FLOPs per image come from ``torch.utils.flop_counter.FlopCounterMode``; the achieved GFLOP/s is
set against a square ``torch.matmul`` measured in the same rounds (fp32 against fp32, bf16
against bf16). With ``--compile`` the bf16 channels_last models are also run through
``torch.compile`` (inductor, weight freezing), which ichseg does not do.

Part 2, end to end: a run folder (``best.pt`` in the trainer's checkpoint format with the
classifier's random weights, ``thresholds.json``, and a U-Net ``segmenter.pt``) and a 40-slice
phantom DICOM study; ``ichseg.inference.predict`` is timed on it with the predictor loaded once,
with Grad-CAM off (a negative study) and forced on (a positive one), plus a per-stage breakdown
and the same call with the channels_last (and compiled) models swapped in.

Prints one JSON object. Example::

    python benchmarks/inference.py --batches 1,8,32 --image-size 256 --compile
"""

from __future__ import annotations

import argparse
import copy
import json
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
    configure_openmp,
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


def matmul_seconds(size: int, dtype, device) -> Callable[[], float]:
    """A closure timing one ``size``-square matmul in ``dtype`` (inputs made once)."""
    import torch

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)  # first call picks the kernel and allocates the output
    return lambda: time_call(lambda: torch.matmul(a, b), device)


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
            for dtype in ("fp32", "bf16"):
                for batch in batches:
                    x = torch.randn(batch, channels, size, size, device=device)
                    if fmt == "channels_last":
                        x = x.contiguous(memory_format=torch.channels_last)
                    variants.append(Variant(name, m, fmt, dtype, batch, x, device))
        if args.compile:
            import torch._inductor.config as inductor_config

            # Freezing folds BatchNorm into the convolutions and pre-packs oneDNN weights.
            inductor_config.freezing = True
            compiled = torch.compile(models["channels_last"], dynamic=False)
            for batch in batches:
                x = torch.randn(batch, channels, size, size, device=device)
                x = x.contiguous(memory_format=torch.channels_last)
                variants.append(
                    Variant(name, compiled, "channels_last+compile", "bf16", batch, x, device)
                )
    return variants, info


def run_models(args, device, batches: list[int]) -> dict[str, Any]:
    import torch

    variants, info = _model_variants(args, device, batches)
    peaks = {
        "fp32": matmul_seconds(args.matmul_size, torch.float32, device),
        "bf16": matmul_seconds(args.matmul_size, torch.bfloat16, device),
    }
    for variant in variants:
        first = variant.calibrate()
        if "compile" in variant.fmt:
            info[variant.name][f"compile_s_batch{variant.batch}"] = rounded(first, 1)
        log(f"warm {variant.name} {variant.fmt} {variant.dtype} b{variant.batch}: {first:.2f}s")
    flop = 2.0 * args.matmul_size**3
    peak_samples: dict[str, list[list[float]]] = {"fp32": [], "bf16": []}
    for round_index in range(args.repeats):
        round_peaks: dict[str, list[float]] = {"fp32": [], "bf16": []}

        def measure_peaks(store: dict[str, list[float]] = round_peaks) -> None:
            for dtype, timer in peaks.items():
                store[dtype] += [flop / timer() / 1e9 for _ in range(3)]

        measure_peaks()
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            variant.sample()
        measure_peaks()  # at both ends: the round's peak brackets its model timings
        for dtype in peak_samples:
            peak_samples[dtype].append(round_peaks[dtype])
        log(
            f"round {round_index + 1}/{args.repeats}: peak fp32 "
            f"{median(round_peaks['fp32']):.0f} bf16 {median(round_peaks['bf16']):.0f} GFLOP/s"
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
            if v.name == args.classifier and v.dtype == "bf16" and v.batch == largest:
                log(f"profiling {v.name} {v.fmt} bf16 b{largest}")
                profiles[f"{v.fmt}/bf16/b{largest}"] = profile_top_ops(v)
    return {
        "models": info,
        "profiles": profiles,
        "matmul_peak_gflop_per_s": peak,
        "matmul_peak_per_round": per_round_peak,
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
    from ichseg.engine.train import build_model
    from ichseg.segmentation.unet import SegmenterConfig, build_unet

    run.mkdir(parents=True, exist_ok=True)
    config = RunConfig(
        name="bench-inference",
        data=DataConfig(image_size=args.image_size),
        model=ModelConfig(name=args.classifier),
    )
    torch.manual_seed(args.seed)
    model = build_model(config)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "config": config.model_dump(mode="json"),
            "epoch": 0,
            "val_loss": 0.0,
        },
        run / "best.pt",
    )
    (run / "thresholds.json").write_text(json.dumps({n: 0.5 for n in config.task.class_names}))
    if args.segmenter_epochs > 0:
        from ichseg.phantom import PhantomConfig, generate_study
        from ichseg.segmentation.unet import train_segmenter

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


def stage_breakdown(predictor, study: Path, out: Path) -> dict[str, float]:
    """Seconds of each stage of ``predict`` for one study, calling ichseg's functions in order."""
    from ichseg.engine.data import preprocess_volume
    from ichseg.inference import _batched_probabilities, volume_name, write_gradcam
    from ichseg.io.loader import index_input
    from ichseg.io.nifti import write_nifti_atomic

    stages: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = fn()
        stages[name] = time.perf_counter() - start
        return value

    index = timed("discover", lambda: index_input(study))
    volume = timed("read_series", lambda: next(iter(index.iter_volumes())))
    mask = timed("segmenter", lambda: np.asarray(predictor.segmenter(volume), dtype=np.uint8))
    config = predictor.config
    slices = timed(
        "preprocess_volume",
        lambda: preprocess_volume(volume, config.data, config.masking, mask=mask),
    )
    probabilities = timed("classifier", lambda: _batched_probabilities(predictor, slices, 32))
    name = volume_name(volume)
    timed(
        "write_mask_nifti",
        lambda: write_nifti_atomic(
            volume.to_nifti(mask, dtype=np.uint8), out / "masks" / f"{name}_mask.nii.gz"
        ),
    )
    timed(
        "gradcam_3_slices",
        lambda: write_gradcam(predictor, volume, slices, probabilities, out / "gc", name, 3),
    )
    return stages


def segmenter_breakdown(predictor, study: Path) -> dict[str, float]:
    """Seconds of the U-Net masker's steps: resize + window, network, postprocessing."""
    import torch
    import torch.nn.functional as F

    from ichseg.io.loader import index_input
    from ichseg.segmentation.unet import (
        RIM_MIN_PROBABILITY,
        _foreground_probability,
        _prepare_slices,
        partial_volume_rim,
        postprocess_mask,
    )

    seg = predictor.segmenter
    hu = next(iter(index_input(study).iter_volumes())).hu
    stages = {}
    start = time.perf_counter()
    stack = _prepare_slices(hu, seg.config)
    stages["resize_window"] = time.perf_counter() - start
    start = time.perf_counter()
    prob = _foreground_probability(seg.model, stack, seg.config, seg.device, seg.config.amp, 32)
    stages["unet_forward"] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.inference_mode():
        prob = F.interpolate(prob[:, None], size=hu.shape[1:], mode="bilinear")[:, 0]
    prob = prob.cpu().numpy()
    stages["upsample"] = time.perf_counter() - start
    start = time.perf_counter()
    mask = postprocess_mask(prob > 0.5).astype(bool)
    mask |= partial_volume_rim(mask, hu) & (prob > RIM_MIN_PROBABILITY)
    stages["postprocess"] = time.perf_counter() - start
    return stages


def run_e2e(args, device, work: Path) -> dict[str, Any]:
    import torch

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
    negative = copy.copy(predictor)
    negative.thresholds = {n: 2.0 for n in predictor.thresholds}  # never positive: no Grad-CAM
    positive = copy.copy(predictor)
    positive.thresholds = {n: -1.0 for n in predictor.thresholds}  # always positive: Grad-CAM

    channels_last = load_predictor(run, device=str(device))
    channels_last.model.to(memory_format=torch.channels_last)
    channels_last.segmenter.model.to(memory_format=torch.channels_last)
    channels_last.thresholds = negative.thresholds
    channels_last_positive = copy.copy(channels_last)
    channels_last_positive.thresholds = positive.thresholds
    cases: dict[str, tuple[Any, bool]] = {
        "negative_no_gradcam": (negative, False),
        "positive_gradcam": (positive, True),
        "channels_last_negative": (channels_last, False),
        "channels_last_positive_gradcam": (channels_last_positive, True),
    }
    compile_s = None
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = load_predictor(run, device=str(device))
        compiled.model.to(memory_format=torch.channels_last)
        compiled.segmenter.model.to(memory_format=torch.channels_last)
        compiled.model = torch.compile(compiled.model, dynamic=False)
        compiled.segmenter.model = torch.compile(compiled.segmenter.model, dynamic=False)
        compiled.thresholds = negative.thresholds
        start = time.perf_counter()
        predict(
            run, study, work / "out-compile-warm", predictor=compiled, progress=False, gradcam=False
        )
        compile_s = time.perf_counter() - start
        cases["compiled_channels_last_negative"] = (compiled, False)

    seconds: dict[str, list[float]] = {name: [] for name in cases}
    per_study: dict[str, list[float]] = {name: [] for name in cases}
    stages: dict[str, list[float]] = {}
    seg_stages: dict[str, list[float]] = {}
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
        for stage, value in stage_breakdown(positive, study, work / f"st-{round_index}").items():
            stages.setdefault(stage, []).append(value)
        for stage, value in segmenter_breakdown(predictor, study).items():
            seg_stages.setdefault(stage, []).append(value)
        log(
            f"e2e round {round_index + 1}/{args.repeats}: "
            + ", ".join(f"{n} {seconds[n][-1]:.2f}s" for n in names)
        )
    return {
        "study": {"slices": args.study_slices, "pixels": args.study_size},
        "classifier": args.classifier,
        "classifier_image_size": args.image_size,
        "segmenter_weights": (
            f"trained {args.segmenter_epochs} epoch(s)" if args.segmenter_epochs else "random"
        ),
        "load_predictor_s": rounded(load_s, 2),
        "compile_first_call_s": rounded(compile_s, 1),
        "predict_wall_s_median": {k: rounded(median(v), 3) for k, v in seconds.items()},
        "predict_seconds_per_study_median": {
            k: rounded(median(v), 3) for k, v in per_study.items()
        },
        "stages_s_median": {k: rounded(median(v), 3) for k, v in stages.items()},
        "segmenter_stages_s_median": {k: rounded(median(v), 3) for k, v in seg_stages.items()},
    }


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    if args.repeats < 1:
        sys.exit("error: --repeats must be at least 1")
    configure_openmp(args.omp_spin)
    device = resolve_device(args.device)
    import torch

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    result: dict[str, Any] = {
        "benchmark": "inference",
        "config": {
            "classifier": args.classifier,
            "image_size": args.image_size,
            "batches": batches,
            "matmul_size": args.matmul_size,
            "compile": args.compile,
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
    if throughput and 32 in batches:
        for label, formats in (
            ("eager", ("contiguous", "channels_last")),
            ("compiled", ("channels_last+compile",)),
        ):
            rows = [
                r
                for r in throughput["results"]
                if r["model"] == classifier
                and r["dtype"] == "bf16"
                and r["batch"] == 32
                and r["format"] in formats
            ]
            if rows:
                best = max(rows, key=lambda r: r["fraction_of_matmul_peak"])
                entry = goal(best["fraction_of_matmul_peak"], 0.5, at_most=False)
                entry["format"] = best["format"]
                goals[f"{classifier}_bf16_b32_fraction_of_bf16_peak_{label}"] = entry
    e2e = result.get("end_to_end")
    if e2e:
        wall = e2e["predict_wall_s_median"]
        prefix = f"study_{e2e['study']['slices']}_slices_seconds"
        goals[f"{prefix}_negative"] = goal(wall["negative_no_gradcam"], 3.0, True)
        goals[f"{prefix}_positive_gradcam"] = goal(wall["positive_gradcam"], 3.0, True)
        if "compiled_channels_last_negative" in wall:
            goals[f"{prefix}_negative_compiled"] = goal(
                wall["compiled_channels_last_negative"], 3.0, True
            )
    return goals


if __name__ == "__main__":
    main(sys.argv[1:])
