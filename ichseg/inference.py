"""Folder inference: per-slice and per-series probabilities, masks and Grad-CAM overlays.

``predict`` is the API behind ``ichseg predict`` and the exported MONAI bundle: it takes a
trained run folder or a bundle, reads every DICOM series and NIfTI volume under the input,
and writes ``predictions.csv`` (one row per slice), ``series.csv`` / ``series.json`` (one row
per series), ``skipped.csv`` (each unusable file with its reason), intracranial masks as NIfTI
and Grad-CAM PNGs for the most positive slices of positive series.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.config import RunConfig, validate_config
from ichseg.errors import ConfigError, InputError
from ichseg.fileio import save_figure, write_csv, write_json
from ichseg.volume import CTVolume

log = logging.getLogger(__name__)

CLASSIFIER_FILE = "classifier.pt"
SEGMENTER_FILE = "segmenter.pt"


@dataclass
class Predictor:
    """A classifier with its config, operating thresholds and intracranial segmenter."""

    config: RunConfig
    model: Any
    thresholds: dict[str, float]
    segmenter: Any
    device: Any

    @property
    def class_names(self) -> list[str]:
        return self.config.task.class_names


def _resolve_model_files(model_path: Path) -> tuple[Path, Path | None, Path | None]:
    """(classifier checkpoint, thresholds json, segmenter checkpoint) of a run or a bundle."""
    if (model_path / "best.pt").exists():  # a training run folder
        thresholds = model_path / "thresholds.json"
        segmenter = model_path / SEGMENTER_FILE
        return model_path / "best.pt", thresholds, segmenter if segmenter.exists() else None
    models = model_path / "models"
    if (models / CLASSIFIER_FILE).exists():  # an exported bundle
        segmenter = models / SEGMENTER_FILE
        return (
            models / CLASSIFIER_FILE,
            models / "thresholds.json",
            segmenter if segmenter.exists() else None,
        )
    raise InputError(model_path, "not a training run (best.pt) or an ichseg bundle (models/)")


def load_predictor(
    model_path: str | Path, segmenter: str | Path | None = None, device: str | None = None
) -> Predictor:
    """Load a run folder or exported bundle for inference.

    Args:
        model_path: a training run folder or a bundle root.
        segmenter: U-Net checkpoint to use instead of the one the model names or carries.
        device: "cpu" or "cuda" (default: cuda when available).
    """
    import torch

    from ichseg.engine.train import build_model, load_checkpoint

    model_path = Path(model_path)
    if not model_path.exists():
        raise InputError(model_path, "no such model folder")
    checkpoint, thresholds_path, carried_segmenter = _resolve_model_files(model_path)
    state = load_checkpoint(checkpoint)
    config = validate_config(state["config"], str(checkpoint))
    if config.model.pretrained is not False:
        # The trained weights replace the backbone anyway; do not look for the original file.
        config = config.model_copy(
            update={"model": config.model.model_copy(update={"pretrained": False})}
        )
    model = build_model(config)
    model.load_state_dict(state["state_dict"])
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # channels_last lets oneDNN (CPU) and cuDNN pick their fastest convolution kernels: a
    # 40-slice study took 1.6 s instead of 2.5 s on 2 CPU cores (benchmarks/inference.py).
    model.to(dev, memory_format=torch.channels_last).eval()
    names = config.task.class_names
    thresholds = {name: 0.5 for name in names}
    if thresholds_path is not None and thresholds_path.exists():
        stored = json.loads(thresholds_path.read_text())
        thresholds.update({k: float(v) for k, v in stored.items() if v == v})  # skip NaN
    seg_path = segmenter or carried_segmenter or config.masking.checkpoint
    if seg_path is not None and Path(seg_path).exists():
        from ichseg.segmentation.unet import load_segmenter

        masker = load_segmenter(seg_path, device=str(dev))
    else:
        if config.masking.enabled and config.masking.method == "unet":
            raise InputError(
                model_path,
                "model was trained on U-Net-masked slices but no "
                "segmenter checkpoint was found; pass --segmenter",
            )
        from ichseg.segmentation.masking import make_masker

        masker = make_masker(config.masking.model_copy(update={"method": "classical"}))
    return Predictor(config, model, thresholds, masker, dev)


@dataclass
class PredictResult:
    out_dir: Path
    slice_rows: list[dict[str, Any]] = field(default_factory=list)
    series_rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds_per_study: float = float("nan")

    @property
    def partial(self) -> bool:
        return bool(self.skipped)


def _batched_probabilities(predictor: Predictor, slices: np.ndarray, batch_size: int):
    import torch

    from ichseg.engine.train import autocast

    outputs = []
    mode = predictor.config.task.mode
    with torch.inference_mode():
        for start in range(0, len(slices), batch_size):
            batch = torch.from_numpy(slices[start : start + batch_size]).float().div_(255.0)
            with autocast(predictor.device, predictor.config.train.amp):
                logits = predictor.model(batch.to(predictor.device)).float()
            probs = torch.sigmoid(logits) if mode == "multilabel" else torch.softmax(logits, 1)
            outputs.append(probs.cpu().numpy())
    return np.concatenate(outputs)


def predict_volume(
    predictor: Predictor, volume: CTVolume, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities ``(Z, K)``, intracranial mask ``(z, y, x)`` and the model input slices."""
    from ichseg.engine.data import preprocess_volume

    mask = np.asarray(predictor.segmenter(volume), dtype=np.uint8)
    slices = preprocess_volume(volume, predictor.config.data, predictor.config.masking, mask=mask)
    return _batched_probabilities(predictor, slices, batch_size), mask, slices


AGGREGATION_RULES = "max, mean, topK (mean of the K highest slices, K >= 1, e.g. top3)"


def aggregate_series(probabilities: np.ndarray, rule: str = "max") -> np.ndarray:
    """One probability vector per series: maximum (default), mean, or mean of the top K slices.

    Raises:
        ConfigError: an unknown rule.
    """
    if rule == "max":
        return probabilities.max(axis=0)
    if rule == "mean":
        return probabilities.mean(axis=0)
    match = re.fullmatch(r"top(\d+)", rule)
    if match and int(match.group(1)) >= 1:
        top = np.sort(probabilities, axis=0)[-int(match.group(1)) :]
        return top.mean(axis=0)
    raise ConfigError(f"unknown aggregation {rule!r}; valid: {AGGREGATION_RULES}")


def predict(
    model_path: str | Path,
    input_path: str | Path,
    out_dir: str | Path,
    *,
    aggregation: str = "max",
    gradcam: bool = True,
    gradcam_slices: int = 3,
    batch_size: int = 32,
    segmenter: str | Path | None = None,
    progress: bool = True,
    predictor: Predictor | None = None,
) -> PredictResult:
    """Run the model on every series/volume under ``input_path``; write the tables to ``out_dir``.

    Raises:
        InputError: no model, no CT under the input, the output inside the input, or no series
            could be processed at all.
    """
    from tqdm.auto import tqdm

    from ichseg.io.loader import index_input, output_name
    from ichseg.io.nifti import write_nifti_atomic

    input_path, out_dir = Path(input_path), Path(out_dir)
    _refuse_output_inside_input(input_path, out_dir)
    aggregate_series(np.zeros((1, 1)), aggregation)  # validate the rule before any work
    predictor = predictor or load_predictor(model_path, segmenter)
    index = index_input(input_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = PredictResult(out_dir, skipped=list(index.skipped))
    names = predictor.class_names
    durations = []
    used_names: set[str] = set()
    bar = tqdm(
        index.iter_volumes(), total=len(index), desc="predict", unit="series", disable=not progress
    )
    for item in bar:
        if isinstance(item, InputError):
            result.skipped.append((item.path or str(input_path), item.reason))
            continue
        started = time.perf_counter()
        probabilities, mask, slices = predict_volume(predictor, item, batch_size)
        name = output_name(item, used_names)
        write_nifti_atomic(
            item.to_nifti(mask, dtype=np.uint8), out_dir / "masks" / f"{name}_mask.nii.gz"
        )
        for z in range(item.num_slices):
            result.slice_rows.append(
                {
                    "source": item.source,
                    "series_uid": item.series_uid,
                    "sop_uid": item.sop_uids[z],
                    "slice_index": z,
                    "z_mm": round(float(item.slice_positions[z]), 3),
                    **{n: round(float(p), 6) for n, p in zip(names, probabilities[z], strict=True)},
                }
            )
        series_prob = aggregate_series(probabilities, aggregation)
        labels = {
            f"label_{n}": int(series_prob[i] >= predictor.thresholds[n])
            for i, n in enumerate(names)
        }
        row = {
            "source": item.source,
            "series_uid": item.series_uid,
            "name": name,
            "patient_id": item.patient_id,
            "num_slices": item.num_slices,
            **{n: round(float(p), 6) for n, p in zip(names, series_prob, strict=True)},
            **labels,
            "mask": f"masks/{name}_mask.nii.gz",
            "warnings": "; ".join(item.warnings),
        }
        if gradcam and _is_positive(predictor, labels):
            row["gradcam"] = ";".join(
                str(p.relative_to(out_dir))
                for p in write_gradcam(
                    predictor,
                    item,
                    slices,
                    probabilities,
                    out_dir / "gradcam",
                    name,
                    gradcam_slices,
                )
            )
        else:
            row["gradcam"] = ""
        result.series_rows.append(row)
        durations.append(time.perf_counter() - started)
    if not result.series_rows:
        reasons = "; ".join(f"{p}: {r}" for p, r in result.skipped[:3])
        raise InputError(input_path, f"no series could be processed ({reasons})")
    result.seconds_per_study = float(np.mean(durations))
    _write_outputs(result, names)
    return result


def _is_positive(predictor: Predictor, labels: dict[str, int]) -> bool:
    if predictor.config.task.mode == "multilabel":
        return bool(labels["label_any"])
    return any(v for k, v in labels.items() if k != f"label_{predictor.class_names[0]}")


def _refuse_output_inside_input(input_path: Path, out_dir: Path) -> None:
    source = input_path.resolve()
    target = out_dir.resolve()
    if source.is_dir() and (target == source or source in target.parents):
        raise InputError(out_dir, f"output folder must not be inside the input {input_path}")


def write_gradcam(
    predictor: Predictor,
    volume: CTVolume,
    slices: np.ndarray,
    probabilities: np.ndarray,
    folder: Path,
    name: str,
    count: int,
) -> list[Path]:
    """Grad-CAM (MONAI) of the top class score on the ``count`` most positive slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from monai.visualize import GradCAM

    from ichseg.preprocess.windowing import resize_slices, window

    folder.mkdir(parents=True, exist_ok=True)
    model = predictor.model
    cam = GradCAM(nn_module=model, target_layers=model.gradcam_target_layer())
    # Positive evidence: `any` for multilabel, the most likely non-normal class otherwise.
    score = (
        probabilities[:, 0]
        if predictor.config.task.mode == "multilabel"
        else (1.0 - probabilities[:, 0])
    )
    class_index = 0 if predictor.config.task.mode == "multilabel" else None
    paths = []
    for z in np.argsort(score)[::-1][:count]:
        batch = torch.from_numpy(slices[z : z + 1]).float().div_(255.0).to(predictor.device)
        with torch.enable_grad():
            heatmap = cam(x=batch, class_idx=class_index)[0, 0].detach().cpu().numpy()
        size = slices.shape[-2:]
        image = window(resize_slices(volume.hu[z][None], size)[0], 40, 80)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(image, cmap="gray")
        ax.imshow(heatmap, cmap="jet", alpha=0.35)
        ax.set_title(f"{name} slice {z}: p(any)={score[z]:.2f}", fontsize=8)
        ax.axis("off")
        path = folder / f"{name}_z{int(z):03d}.png"
        paths.append(save_figure(fig, path, dpi=100, bbox_inches="tight"))
    return paths


def _write_outputs(result: PredictResult, names: list[str]) -> None:
    out = result.out_dir
    write_csv(
        out / "predictions.csv",
        result.slice_rows,
        ["source", "series_uid", "sop_uid", "slice_index", "z_mm", *names],
    )
    write_csv(out / "series.csv", result.series_rows, list(result.series_rows[0]))
    write_json(out / "series.json", result.series_rows)
    write_csv(
        out / "skipped.csv",
        [{"path": p, "reason": r} for p, r in result.skipped],
        ["path", "reason"],
    )
