"""Learning-rate range test (Smith 2017): the training loss while the rate grows exponentially.

A fresh model is trained for a few mini-batches of the training split, each at a rate
``start * (end / start) ** (i / (steps - 1))``; the loss is smoothed with a debiased
exponential moving average and the test stops once the smoothed loss exceeds ``divergence``
times its best. Everything goes through the run machinery (the config's preprocessing and slice
cache, the patient split, :class:`~ichseg.engine.train.ClassifierTask`, the optimiser of the
training loop, bf16 autocast, gradient clipping), so the curve describes the run that
``ichseg train`` would make. The model and optimiser are discarded afterwards: no checkpoint,
split file or history is written, only the curve.

The suggested rate is the steepest descent of the smoothed loss per decade of learning rate,
searched up to the loss minimum; the rate at the minimum divided by ten is reported beside it.
With ``train.scheduler: onecycle`` the configured ``train.lr`` is the peak of the cycle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.config import RunConfig
from ichseg.errors import ConfigError, InputError
from ichseg.fileio import new_figure, save_figure, write_csv, write_json

CURVE_CSV = "lr_find.csv"
CURVE_JSON = "lr_find.json"
CURVE_PNG = "lr_find.png"
RULE = "steepest descent of the smoothed loss per decade of learning rate, before its minimum"
FALLBACK_RULE = "the rate at the smoothed loss minimum (the loss never fell faster anywhere)"


def lr_schedule(start: float, end: float, steps: int) -> np.ndarray:
    """``steps`` rates from ``start`` to ``end``, evenly spaced on a log scale.

    Args:
        start: first rate (> 0).
        end: last rate (> start).
        steps: number of rates (>= 2).
    """
    if not (0 < start < end) or not math.isfinite(end):
        raise ConfigError(f"learning-rate range needs 0 < start < end, got {start:g}..{end:g}")
    if steps < 2:
        raise ConfigError(f"the range test needs at least 2 steps, got {steps}")
    return np.geomspace(start, end, steps)


@dataclass
class RangeCurve:
    """What the range test recorded, one entry per step taken.

    Attributes:
        lrs: the rate of each step.
        losses: the raw mini-batch training loss.
        smoothed: the debiased exponential moving average of the loss.
        stopped: ``"completed"``, ``"diverged"`` (smoothed loss above ``divergence`` x its
            best) or ``"non-finite loss"``.
    """

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stopped: str = "completed"


def range_test(
    step: Callable[[float], float],
    lrs: np.ndarray,
    smoothing: float = 0.98,
    divergence: float = 4.0,
) -> RangeCurve:
    """Take one training step per rate until the rates run out or the loss diverges.

    Args:
        step: trains one mini-batch at the given rate and returns its loss.
        lrs: the rates, in order.
        smoothing: weight of the past in the moving average (0 keeps the raw loss).
        divergence: stop once the smoothed loss exceeds this multiple of its best.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ConfigError(f"smoothing must lie in [0, 1), got {smoothing}")
    if divergence <= 1.0:
        raise ConfigError(f"divergence must exceed 1, got {divergence}")
    curve = RangeCurve()
    average, best = 0.0, math.inf
    for i, lr in enumerate(lrs):
        loss = float(step(float(lr)))
        if not math.isfinite(loss):
            curve.stopped = "non-finite loss"
            break
        average = smoothing * average + (1.0 - smoothing) * loss
        smoothed = average / (1.0 - smoothing ** (i + 1))
        curve.lrs.append(float(lr))
        curve.losses.append(loss)
        curve.smoothed.append(smoothed)
        best = min(best, smoothed)
        if smoothed > divergence * best:
            curve.stopped = "diverged"
            break
    return curve


@dataclass
class Suggestion:
    """A suggested rate and the figures behind it.

    Attributes:
        lr: the suggested rate (one of the tested rates).
        rule: how it was chosen.
        steepest: rate of the steepest descent (None when the loss never fell).
        minimum: rate at the smoothed loss minimum.
        minimum_over_10: ``minimum / 10``, the other common choice.
    """

    lr: float
    rule: str
    steepest: float | None
    minimum: float
    minimum_over_10: float


def suggest_lr(lrs: Any, smoothed: Any) -> Suggestion:
    """The rate where the smoothed loss falls fastest (per decade), searched up to its minimum.

    Args:
        lrs: tested rates, increasing.
        smoothed: the smoothed loss at each.

    Raises:
        InputError: fewer than two points (the test stopped at once).
    """
    x = np.log10(np.asarray(lrs, dtype=np.float64))
    y = np.asarray(smoothed, dtype=np.float64)
    if x.size < 2 or x.shape != y.shape:
        raise InputError(None, "the range test recorded fewer than two steps; nothing to suggest")
    at_min = int(np.argmin(y))
    minimum = float(10 ** x[at_min])
    steepest = None
    if at_min >= 1:
        slope = np.gradient(y[: at_min + 1], x[: at_min + 1])
        at_steep = int(np.argmin(slope))
        if slope[at_steep] < 0:
            steepest = float(10 ** x[at_steep])
    if steepest is None:
        return Suggestion(minimum, FALLBACK_RULE, None, minimum, minimum / 10)
    return Suggestion(steepest, RULE, steepest, minimum, minimum / 10)


@dataclass
class LRFindResult:
    """The range test's curve, its suggestion and the files written."""

    curve: RangeCurve
    suggestion: Suggestion
    record: dict[str, Any]
    paths: list[Path]


def _endless_batches(task: Any, seed: int) -> Iterator[Any]:
    """The training loader's batches, epoch after epoch, seeded like the training loop."""
    import torch

    from ichseg.engine.loop import epoch_seed

    epoch = 0
    while True:
        task.start_epoch(epoch)
        torch.manual_seed(epoch_seed(seed, epoch))
        np.random.seed(epoch_seed(seed, epoch) % (2**32))
        yield from task.train_batches()
        epoch += 1


def lr_find(
    config: RunConfig,
    out_dir: str | Path,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    smoothing: float = 0.98,
    divergence: float = 4.0,
    segmenter: str | Path | None = None,
    cache_root: Path | None = None,
    progress: bool = True,
    device: Any = None,
) -> LRFindResult:
    """Run the range test for a config; write ``lr_find.png``, ``.csv`` and ``.json``.

    Args:
        config: the run config (data, model, optimiser, batch size, augmentation, AMP).
        out_dir: folder for the curve files (created).
        start_lr: first rate.
        end_lr: last rate.
        steps: mini-batches at most (the training split is cycled when it is shorter).
        smoothing: moving-average weight of the past loss.
        divergence: stop once the smoothed loss exceeds this multiple of its best.
        segmenter: U-Net checkpoint for ``masking.method: unet`` (default the config's).
        cache_root: where preprocessed slices are cached.
        progress: progress output.
        device: torch device (default: CUDA when available).
    """
    import torch

    from ichseg.engine.cache import build_slices
    from ichseg.engine.distributed import DistInfo
    from ichseg.engine.loop import build_optimizer, seed_everything
    from ichseg.engine.predict import autocast, default_device
    from ichseg.engine.train import ClassifierTask, make_splits, settings_of
    from ichseg.preprocess.pipeline import Preprocessor
    from ichseg.progress import progress as progress_bar

    lrs = lr_schedule(start_lr, end_lr, steps)
    out = Path(out_dir)
    seed_everything(config.seed)
    preprocessor = Preprocessor.from_config(config, segmenter)
    slices = build_slices(config, preprocessor, cache_root, progress)
    splits = make_splits(config, slices, None)
    task = ClassifierTask(config, slices, splits, DistInfo())
    if task.num_batches() == 0:
        raise InputError(None, "the training split holds no batch")
    device = default_device(device)
    settings = settings_of(config)
    model = task.build_model().to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(replace(settings, lr=float(lrs[0])), model)
    batches = _endless_batches(task, config.seed)
    bar = progress_bar(total=steps, desc="lr-find", unit="batch", enabled=progress)

    def step(lr: float) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        with autocast(device, settings.amp):
            loss, _ = task.loss(model, next(batches), device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        bar.update(1)
        value = float(loss.detach())
        bar.set_postfix(lr=f"{lr:.2e}", loss=f"{value:.4f}")
        return value

    # The model and optimiser live only in this call: the weights the test leaves are a
    # by-product, never saved.
    try:
        curve = range_test(step, lrs, smoothing, divergence)
    finally:
        bar.close()
    suggestion = suggest_lr(curve.lrs, curve.smoothed)
    record = {
        "suggested_lr": suggestion.lr,
        "rule": suggestion.rule,
        "steepest_lr": suggestion.steepest,
        "minimum_lr": suggestion.minimum,
        "minimum_over_10": suggestion.minimum_over_10,
        "start_lr": float(lrs[0]),
        "end_lr": float(lrs[-1]),
        "steps_requested": steps,
        "steps_run": len(curve.lrs),
        "stopped": curve.stopped,
        "smoothing": smoothing,
        "divergence": divergence,
        "config": config.name,
        "model": config.model.name,
        "optimizer": config.train.optimizer,
        "weight_decay": config.train.weight_decay,
        "batch_size": config.train.batch_size,
        "amp": config.train.amp,
        "train_slices": int(len(splits["train"])),
        "device": str(device),
    }
    paths = write_curve(curve, suggestion, record, out)
    return LRFindResult(curve, suggestion, record, paths)


def write_curve(
    curve: RangeCurve, suggestion: Suggestion, record: dict[str, Any], out_dir: Path
) -> list[Path]:
    """Write the curve as CSV, the record as JSON and the plot as PNG; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        {"step": i + 1, "lr": lr, "loss": loss, "smoothed_loss": smooth}
        for i, (lr, loss, smooth) in enumerate(
            zip(curve.lrs, curve.losses, curve.smoothed, strict=True)
        )
    ]
    paths = [
        write_csv(out_dir / CURVE_CSV, rows, ["step", "lr", "loss", "smoothed_loss"]),
        write_json(out_dir / CURVE_JSON, record),
    ]
    paths.append(save_figure(curve_figure(curve, suggestion), out_dir / CURVE_PNG))
    return paths


def curve_figure(curve: RangeCurve, suggestion: Suggestion) -> Any:
    """Loss against learning rate (log axis) with the suggestion marked."""
    fig = new_figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    ax.plot(curve.lrs, curve.losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    ax.plot(curve.lrs, curve.smoothed, color="tab:blue", linewidth=2, label="smoothed loss")
    ax.axvline(
        suggestion.lr, color="tab:red", linestyle="--", label=f"suggested {suggestion.lr:.2e}"
    )
    if curve.lrs[0] <= suggestion.minimum_over_10 <= curve.lrs[-1]:
        ax.axvline(
            suggestion.minimum_over_10,
            color="tab:green",
            linestyle=":",
            label=f"minimum / 10 = {suggestion.minimum_over_10:.2e}",
        )
    ax.set_xscale("log")
    smoothed = np.asarray(curve.smoothed)
    # Raw spikes near divergence would squash the curve; the smoothed loss sets the scale.
    low, high = float(np.min(curve.losses)), float(np.max(smoothed))
    if high > low:
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"learning-rate range test ({curve.stopped} after {len(curve.lrs)} steps)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
