"""Training throughput: ichseg's trainer against a bare loop on the same model and data.

On a phantom run config (cached uint8 slices), each round times, one after the other:

* ``trainer``: ``ichseg.engine.train.train`` for ``--epochs`` epochs; images/s is read from the
  run's ``metrics.jsonl`` (the trainer times its training loop only, not validation or saving);
* ``bare``: the same model, batch, autocast rule (bf16 only where it is faster than fp32, as in
  the trainer: ``bf16_autocast_pays``) and AdamW, on the training slices held in memory as one float
  tensor: forward, BCE loss, backward, step, nothing else;
* ``bare_trainer_step``: the bare loop with the trainer's step (weighted ``TaskLoss``, gradient
  clipping, LR scheduler, ``float(loss)`` each step), still on in-memory data, so that
  trainer vs this is the data pipeline's cost and this vs bare the step extras';
* ``bare_channels_last``: the bare loop with NHWC weights and images, a candidate change;
* ``bare_bf16_forced``: only on a CPU with bf16 instructions where ichseg trains in fp32 (Intel
  with AVX-512 BF16 but no AMX): the bare loop under bf16 autocast regardless, the evidence for
  that rule;
* ``loader``: the trainer's own DataLoader (memmap cache, albumentations) iterated alone.

The first epoch of each is a warm-up and is left out. Figures are medians over rounds; the
overhead ratio is bare images/s over trainer images/s. Peak resident memory is the process's
``ru_maxrss``. Prints one JSON object. Example::

    python benchmarks/training.py --model resnet18 --image-size 128 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    add_common_args,
    configure_process,
    emit,
    environment,
    goal,
    hide_cuda_if_cpu,
    log,
    median,
    resolve_device,
    rounded,
    synchronize,
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--model", default="resnet18", help="registered model name")
    parser.add_argument("--image-size", type=int, default=128, help="network input pixels")
    parser.add_argument("--studies", type=int, default=12, help="phantom studies")
    parser.add_argument("--size", type=int, default=128, help="phantom in-plane pixels")
    parser.add_argument("--slices", type=int, default=16, help="phantom slices per study")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="per round; the first is warm-up")
    parser.add_argument("--num-workers", type=int, default=0, help="trainer DataLoader workers")
    parser.add_argument("--no-augment", action="store_true", help="trainer without augmentation")
    parser.add_argument("--no-amp", action="store_true", help="fp32 instead of bf16 autocast")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, default=None, help="kept when given")
    return parser.parse_args(argv)


def peak_rss_mib() -> dict[str, float]:
    """High-water resident memory of this process and of its finished children (MiB)."""
    # Linux reports ru_maxrss in KiB.
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"self": rounded(own, 1), "children_max": rounded(children, 1)}


def build_config(args: argparse.Namespace, cache: Path):
    from ichseg.config import (
        DataConfig,
        EvalConfig,
        ModelConfig,
        PhantomDataConfig,
        RunConfig,
        TrainConfig,
    )

    return RunConfig(
        name="bench-train",
        data=DataConfig(
            source="phantom",
            phantom=PhantomDataConfig(
                studies=args.studies, seed=args.seed, size=args.size, slices=args.slices
            ),
            image_size=args.image_size,
            cache_dir=cache,
        ),
        model=ModelConfig(name=args.model),
        train=TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            early_stopping_patience=None,
            num_workers=args.num_workers,
            augment=not args.no_augment,
            amp=not args.no_amp,
        ),
        eval=EvalConfig(n_boot=0),
    )


def splits_of(config, slices, run_dir: Path) -> dict[str, np.ndarray]:
    """The trainer's patient-level split (``make_splits``, as ``train`` computes it)."""
    from ichseg.engine.train import make_splits

    return make_splits(config, slices, run_dir)


def run_trainer(config, run_dir: Path, cache: Path) -> tuple[list[float], float]:
    """images/s per epoch as the trainer logs it, and the wall seconds of the whole call."""
    from ichseg.engine.train import train

    start = time.perf_counter()
    train(config, run_dir, cache_root=cache, progress=False, evaluate=False)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [float(row["images_per_s"]) for row in rows], wall


def run_bare(
    config,
    slices,
    train_idx: np.ndarray,
    device,
    trainer_step: bool = False,
    channels_last: bool = False,
    force_bf16: bool = False,
) -> list[float]:
    """images/s per epoch of a plain loop over in-memory slices.

    ``trainer_step`` adds what the trainer does around forward/backward/step (weighted loss,
    gradient clipping, scheduler, reading the loss back each step), still without a loader.
    ``channels_last`` stores weights and images NHWC (a candidate change for the trainer).
    ``force_bf16`` runs under bf16 autocast whatever ichseg's rule says.
    """
    import torch
    import torch.nn.functional as F

    from ichseg.engine.checkpoint import build_model
    from ichseg.engine.loop import cosine_factor
    from ichseg.engine.train import TaskLoss

    torch.manual_seed(config.seed)
    stacked = np.stack([slices.stack(int(i)) for i in train_idx])
    images = torch.from_numpy(stacked).to(device).float() / 255.0
    targets = torch.from_numpy(slices.targets(config.task)[train_idx]).to(device)
    model = build_model(config, pretrained=False).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay
    )
    batch = config.train.batch_size
    count = len(train_idx)
    steps = count // batch if count > batch else 1  # the trainer drops the last partial batch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_factor(config.train.epochs * steps, 0)
    )
    loss_fn = TaskLoss(config)
    generator = torch.Generator().manual_seed(config.seed)
    from ichseg.engine.predict import autocast

    amp = config.train.amp  # as in the trainer: bf16 only where it is faster than fp32
    rates = []
    for _ in range(config.train.epochs):
        order = torch.randperm(count, generator=generator).to(device)
        synchronize(device)
        start, seen = time.perf_counter(), 0
        for step in range(steps):
            index = order[step * batch : (step + 1) * batch]
            x, y = images[index], targets[index]
            forced = torch.autocast(device.type, dtype=torch.bfloat16) if force_bf16 else None
            with forced or autocast(device, amp):
                logits = model(x)
            if trainer_step:
                loss = loss_fn(logits, y)
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), y.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if trainer_step:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
            optimizer.step()
            if trainer_step:
                scheduler.step()
                float(loss.detach())
            seen += len(index)
        synchronize(device)
        rates.append(seen / (time.perf_counter() - start))
    return rates


def run_loader(config, slices, splits) -> list[float]:
    """images/s per epoch of the trainer's training DataLoader alone (augmentation included)."""
    from ichseg.engine.distributed import DistInfo
    from ichseg.engine.train import ClassifierTask

    task = ClassifierTask(config, slices, splits, DistInfo())
    rates = []
    for epoch in range(config.train.epochs):
        task.start_epoch(epoch)
        start, seen = time.perf_counter(), 0
        for images, _ in task.train_batches():
            seen += len(images)
        rates.append(seen / (time.perf_counter() - start))
    return rates


def _steady(rates: list[float]) -> float:
    """Mean images/s after the warm-up epoch (all epochs when there is only one)."""
    return float(np.mean(rates[1:] if len(rates) > 1 else rates))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    if args.repeats < 1 or args.epochs < 1:
        sys.exit("error: --repeats and --epochs must be at least 1")
    hide_cuda_if_cpu(args.device)  # the trainer picks CUDA by itself when it sees one
    configure_process(args)
    device = resolve_device(args.device)
    import torch

    from ichseg.engine.cache import build_slices

    torch.set_num_threads(args.threads)
    env = environment(device, args.threads)  # now, so its load average is the starting one
    temporary = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="ichseg-bench-train-")) if temporary else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    rss: dict[str, Any] = {"start": peak_rss_mib()}
    from ichseg.engine.predict import bf16_autocast_pays, bf16_is_native

    # Where the CPU has bf16 instructions but ichseg trains in fp32, show what bf16 would do.
    compare_bf16 = not args.no_amp and bf16_is_native(device) and not bf16_autocast_pays(device)
    try:
        config = build_config(args, cache)
        log(f"building the slice cache: {args.studies} phantom studies x {args.slices} slices")
        start = time.perf_counter()
        slices = build_slices(config, cache_root=cache, progress=False)
        cache_s = time.perf_counter() - start
        rss["after_cache"] = peak_rss_mib()
        splits = splits_of(config, slices, work / "splits")
        train_idx = splits["train"]
        log(f"{len(slices)} slices, {len(train_idx)} in the training split")

        rates: dict[str, list[float]] = {
            "trainer": [],
            "bare": [],
            "bare_trainer_step": [],
            "bare_channels_last": [],
            "loader": [],
        }
        if compare_bf16:
            rates["bare_bf16_forced"] = []
        epochs_logged: dict[str, list[list[float]]] = {name: [] for name in rates}
        trainer_wall = []
        for round_index in range(args.repeats):
            per_epoch, wall = run_trainer(config, work / f"run{round_index}", cache)
            trainer_wall.append(wall)
            epochs_logged["trainer"].append(per_epoch)
            rss["after_trainer"] = peak_rss_mib()
            epochs_logged["bare"].append(run_bare(config, slices, train_idx, device))
            epochs_logged["bare_trainer_step"].append(
                run_bare(config, slices, train_idx, device, trainer_step=True)
            )
            epochs_logged["bare_channels_last"].append(
                run_bare(config, slices, train_idx, device, channels_last=True)
            )
            if compare_bf16:
                epochs_logged["bare_bf16_forced"].append(
                    run_bare(config, slices, train_idx, device, force_bf16=True)
                )
            rss["after_bare"] = peak_rss_mib()
            epochs_logged["loader"].append(run_loader(config, slices, splits))
            for name in rates:
                rates[name].append(_steady(epochs_logged[name][-1]))
            log(
                f"round {round_index + 1}/{args.repeats}: "
                + ", ".join(f"{n} {rates[n][-1]:.1f} img/s" for n in rates)
            )
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    rss["end"] = peak_rss_mib()

    med = {name: median(values) for name, values in rates.items()}
    overhead = med["bare"] / med["trainer"]
    per_round_overhead = [b / t for b, t in zip(rates["bare"], rates["trainer"], strict=True)]
    # With num_workers=0 loading and stepping alternate, so their times per image add up.
    serial = 1.0 / (1.0 / med["loader"] + 1.0 / med["bare_trainer_step"])
    result = {
        "benchmark": "training",
        "config": {
            "model": args.model,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "amp_bf16_requested": not args.no_amp,
            "amp_bf16_used": not args.no_amp and bf16_autocast_pays(device),
            "augment": not args.no_augment,
            "num_workers": args.num_workers,
            "phantom": {"studies": args.studies, "size": args.size, "slices": args.slices},
            "epochs_per_round": args.epochs,
            "repeats": args.repeats,
        },
        "env": env,
        "slices_cached": len(slices),
        "train_slices": int(len(train_idx)),
        "cache_build_s": rounded(cache_s, 2),
        "images_per_s_median": {k: rounded(v, 2) for k, v in med.items()},
        "images_per_s_per_round": {k: [rounded(v, 2) for v in vs] for k, vs in rates.items()},
        "images_per_s_per_epoch": {
            k: [[rounded(v, 1) for v in epoch] for epoch in vs] for k, vs in epochs_logged.items()
        },
        "trainer_wall_s_per_round": [rounded(v, 2) for v in trainer_wall],
        "ratios": {
            "bare_over_trainer": rounded(overhead),
            "bare_over_trainer_per_round": [rounded(v) for v in per_round_overhead],
            "bare_over_bare_trainer_step": rounded(med["bare"] / med["bare_trainer_step"]),
            "bare_trainer_step_over_trainer": rounded(med["bare_trainer_step"] / med["trainer"]),
            "bare_channels_last_over_bare": rounded(med["bare_channels_last"] / med["bare"]),
            "loader_over_model_step": rounded(med["loader"] / med["bare_trainer_step"]),
            "serial_prediction_images_per_s": rounded(serial, 2),
        },
        "peak_rss_mib": rss,
        **(
            {"bare_bf16_forced_over_bare": rounded(med["bare_bf16_forced"] / med["bare"])}
            if compare_bf16
            else {}
        ),
        "goals": {"trainer_overhead_ratio": goal(overhead, 1.15, at_most=True)},
    }
    emit(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
