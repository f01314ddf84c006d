"""Run folders and checkpoints: the one place that names run files and loads weights.

Every loader here validates before it trusts: the file exists and is not empty, it unpickles
with ``weights_only=True`` (plain tensors and containers; pickled code is refused, never
executed), it holds the keys an ichseg checkpoint has, its config validates, and its weights fit
the model the config describes. Each failure is one line naming the file and the reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ichseg.config import RunConfig, validate_config
from ichseg.errors import ConfigError, InputError
from ichseg.fileio import torch_save, write_json

BEST = "best.pt"
LAST = "last.pt"
CONFIG_FILE = "config.yaml"
SPLITS_FILE = "splits.json"
THRESHOLDS_FILE = "thresholds.json"
CALIBRATION_FILE = "calibration.json"
SEGMENTER_FILE = "segmenter.pt"
HEMORRHAGE_SEGMENTER_FILE = "hemorrhage_segmenter.pt"
CLASSIFIER_FILE = "classifier.pt"
HISTORY_CSV = "metrics.csv"
HISTORY_JSONL = "metrics.jsonl"
CURVES_FILE = "curves.png"
EVAL_DIR = "eval"
BACKBONE_DIR = "backbone"
"""Sequence runs: the folder of the classifier whose slice embeddings the head reads."""
SEQUENCE_FILE = "sequence.pt"
"""Bundles of sequence runs: the head's checkpoint beside ``classifier.pt`` (the backbone)."""
TTA_DIR_PREFIX = "tta-"


def serving_dir(base: str | Path, tta_name: str | None = None) -> Path:
    """Where a run (or bundle ``models/``) keeps thresholds and calibration for a TTA.

    Plain outputs use the run folder itself; ``evaluate --tta`` fits its own thresholds and
    calibration on TTA-averaged validation probabilities and keeps them in ``tta-<name>/``.

    Args:
        base: the run folder or the bundle's ``models`` folder.
        tta_name: :attr:`~ichseg.engine.predict.TestTimeAugmentation.name`, or None.
    """
    base = Path(base)
    return base if tta_name in (None, "none") else base / f"{TTA_DIR_PREFIX}{tta_name}"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def load_checkpoint(
    path: str | Path, *, kind: str = "ichseg", required: tuple[str, ...] = ("state_dict", "config")
) -> dict[str, Any]:
    """Load and vet a checkpoint written by ichseg.

    Args:
        path: the ``.pt`` file.
        kind: what the file should be, for messages (``"classifier"``, ``"segmenter"``).
        required: keys the checkpoint must hold.

    Raises:
        InputError: missing, empty, unreadable, pickled-code or foreign files; one line each.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"{kind} checkpoint not found")
    if path.stat().st_size == 0:
        raise InputError(path, f"{kind} checkpoint is an empty file (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own message advises turning the safety check off; ichseg never does, and
        # never repeats that advice.
        if "unsupported global" in str(error).lower():
            raise InputError(
                path,
                f"not a plain-tensor {kind} checkpoint: it holds pickled Python objects, "
                "which ichseg refuses to load",
            ) from None
        raise InputError(
            path, "not a readable PyTorch checkpoint (damaged or not a checkpoint)"
        ) from None
    except Exception as error:  # zip, EOF and format errors come as many types
        raise InputError(
            path,
            f"not a readable PyTorch checkpoint ({type(error).__name__}: {_first_line(error)})",
        ) from None
    if not isinstance(state, dict):
        raise InputError(path, f"not an ichseg {kind} checkpoint (holds a {type(state).__name__})")
    missing = [key for key in required if key not in state]
    if missing:
        raise InputError(
            path, f"not an ichseg {kind} checkpoint (missing {', '.join(map(repr, missing))})"
        )
    return state


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write a checkpoint atomically."""
    return torch_save(payload, path)


def config_of(state: dict[str, Any], path: str | Path) -> RunConfig:
    """The run config stored in a classifier checkpoint, validated."""
    try:
        return validate_config(state["config"], str(path))
    except ConfigError as error:
        raise InputError(path, f"invalid config in the checkpoint ({error})") from None


def build_model(config: RunConfig, pretrained: bool = True):
    """The classifier a run config describes.

    Args:
        config: the run config.
        pretrained: load ``model.pretrained`` weights; False when trained weights will replace
            them anyway (evaluation, inference).
    """
    from ichseg.models import create_model

    return create_model(
        config.model.name,
        in_channels=config.data.in_channels,
        num_classes=config.task.num_outputs,
        pretrained=config.model.pretrained if pretrained else False,
        dropout=config.model.dropout,
        head=config.model.head,
        hidden=config.model.hidden,
    )


def load_weights(model, state_dict: dict[str, Any], path: str | Path, what: str) -> None:
    """Load ``state_dict`` into ``model`` after checking that every key and shape fits.

    Raises:
        InputError: one line naming the file, what the weights were expected to fit, and the
            first few missing, unexpected or mis-shaped keys.
    """
    import torch

    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise InputError(path, "its state_dict is not a mapping of tensors")
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:2])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:2])}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es), e.g. {mismatched[0]}")
    if problems:
        raise InputError(path, f"weights do not fit {what}: " + "; ".join(problems))
    model.load_state_dict(state_dict)


def describe_model(config: RunConfig) -> str:
    return (
        f"{config.model.name} with {config.data.in_channels} input channel(s) and "
        f"{config.task.num_outputs} output(s)"
    )


def load_classifier(path: str | Path) -> tuple[RunConfig, Any, dict[str, Any]]:
    """Config, model with the trained weights, and the raw checkpoint of a classifier file."""
    path = Path(path)
    state = load_checkpoint(path, kind="classifier")
    config = config_of(state, path)
    model = build_model(config, pretrained=False)
    load_weights(model, state["state_dict"], path, describe_model(config))
    return config, model, state


ARGMAX_RULE = "argmax"
"""The labels rule of multiclass runs: a slice's label is its most probable class; a series
holds every class some scored slice was labelled with. Such thresholds files carry no values."""


@dataclass
class Thresholds:
    """Operating thresholds chosen on validation data, for slices and for aggregated series.

    Attributes:
        slice: class name -> threshold for slice probabilities.
        series: class name -> threshold for the series probability (aggregated by
            ``aggregation``), chosen on validation series, not copied from slices.
        aggregation: the series rule the series thresholds were chosen for.
        rule: how they were chosen (``youden`` or ``f1``), or ``argmax`` (:data:`ARGMAX_RULE`)
            for multiclass runs, whose labels need no threshold.
        calibration: the calibration method applied to the validation probabilities they were
            chosen on (``none``: the raw model output); thresholds apply to probabilities
            calibrated the same way.
        calibrator: that calibration's parameters (``Calibrator.to_dict``), kept with the
            thresholds so they are never applied on another probability scale.
    """

    slice: dict[str, float]
    series: dict[str, float]
    aggregation: str = "max"
    rule: str = "youden"
    calibration: str = "none"
    calibrator: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "slice": self.slice,
            "series": self.series,
            "aggregation": self.aggregation,
            "rule": self.rule,
            "chosen_on": "validation split",
            "probabilities": (
                "uncalibrated"
                if self.calibration == "none"
                else f"calibrated ({self.calibration}, calibration.json)"
            ),
            "calibration": self.calibration,
            **({"calibrator": self.calibrator} if self.calibrator is not None else {}),
        }


def save_thresholds(thresholds: Thresholds, path: str | Path) -> Path:
    return write_json(path, thresholds.to_dict())


def load_thresholds(path: str | Path, class_names: list[str]) -> Thresholds:
    """Read ``thresholds.json``; every class needs a finite threshold in [0, 1] or null.

    Raises:
        InputError: missing or malformed file, naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            path,
            "operating thresholds missing: the run was not evaluated on its validation split "
            "(run `ichseg evaluate RUN --split val`)",
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(path, f"not valid JSON ({_first_line(error)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("slice"), dict):
        raise InputError(path, "not an ichseg thresholds file (no 'slice' thresholds)")
    parsed = {}
    for level in ("slice", "series"):
        values = data.get(level) or {}
        out = {}
        for name in class_names:
            value = values.get(name)
            if value is None:
                # No threshold could be chosen (one label value on validation): never positive.
                out[name] = math.inf
                continue
            if not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
                raise InputError(path, f"{level} threshold of {name!r} must be in [0, 1]")
            out[name] = float(value)
        parsed[level] = out
    return Thresholds(
        parsed["slice"],
        parsed["series"],
        str(data.get("aggregation", "max")),
        str(data.get("rule", "youden")),
        str(data.get("calibration", "none")),
        data.get("calibrator") if isinstance(data.get("calibrator"), dict) else None,
    )
