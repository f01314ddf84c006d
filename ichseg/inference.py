"""Folder inference: per-slice and per-series probabilities, masks and Grad-CAM overlays.

``predict`` is the API behind ``ichseg predict`` and the exported MONAI bundle. It loads a run
folder or a bundle (:func:`load_predictor`), reads every DICOM series and NIfTI volume under the
input (each one independently: a volume that fails is listed in ``skipped.csv`` with its
reason and the others go on), and writes ``predictions.csv`` (one row per slice),
``series.csv``/``series.json`` (one row per series), ``skipped.csv``, intracranial masks as
NIfTI and Grad-CAM PNGs for the most positive slices of positive series. Models trained on
windowed PNG/JPG pictures take pictures instead and write ``predictions.csv`` per image.

The classifier input comes from the run's own :class:`~ichseg.preprocess.pipeline.Preprocessor`
(same windows, mask policy and segmenter as in training); the series probability is aggregated
by the run's rule and compared with series thresholds chosen on validation series.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.config import RunConfig
from ichseg.engine.checkpoint import (
    BEST,
    CLASSIFIER_FILE,
    SEGMENTER_FILE,
    THRESHOLDS_FILE,
    Thresholds,
    load_classifier,
    load_thresholds,
)
from ichseg.errors import InputError
from ichseg.fileio import check_output_folder, new_figure, save_figure, write_csv, write_json
from ichseg.volume import CTVolume

log = logging.getLogger(__name__)


@dataclass
class ModelFiles:
    """The files behind a run folder or an exported bundle."""

    classifier: Path
    thresholds: Path
    segmenter: Path | None


def resolve_model_files(model_path: Path) -> ModelFiles:
    """Classifier, thresholds and carried segmenter of a run folder or a bundle."""
    if not model_path.exists():
        raise InputError(model_path, "no such model folder")
    if (model_path / BEST).exists():  # a training run folder
        base = model_path
        classifier = model_path / BEST
    elif (model_path / "models" / CLASSIFIER_FILE).exists():  # an exported bundle
        base = model_path / "models"
        classifier = base / CLASSIFIER_FILE
    else:
        raise InputError(
            model_path,
            f"not a training run ({BEST}) or an ichseg bundle (models/{CLASSIFIER_FILE})",
        )
    segmenter = base / SEGMENTER_FILE
    return ModelFiles(
        classifier, base / THRESHOLDS_FILE, segmenter if segmenter.is_file() else None
    )


@dataclass
class Predictor:
    """A classifier with its preprocessing, operating thresholds and output segmenter.

    Attributes:
        config: the run config stored with the weights.
        model: the classifier (eval mode, channels_last, on ``device``).
        thresholds: slice and series thresholds chosen on validation data.
        preprocessor: the run's input path (windows, mask policy, segmenter).
        output_masker: the intracranial mask written beside the predictions: the
            preprocessor's own when the model is masked, else a U-Net given or carried, else
            the classical method (it never changes the probabilities of an unmasked model).
        device: torch device.
    """

    config: RunConfig
    model: Any
    thresholds: Thresholds
    preprocessor: Any
    output_masker: Any
    device: Any

    @property
    def class_names(self) -> list[str]:
        return self.config.task.class_names

    def probabilities(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """``(N, K)`` probabilities of uint8 ``(N, C, S, S)`` model input."""
        from ichseg.engine.predict import predict_probabilities, uint8_batches

        if len(images) == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        return predict_probabilities(
            self.model,
            uint8_batches(images, batch_size),
            self.device,
            self.config.train.amp,
            self.config.task.mode,
        )


def load_predictor(
    model_path: str | Path, segmenter: str | Path | None = None, device: str | None = None
) -> Predictor:
    """Load a run folder or exported bundle for inference.

    Args:
        model_path: a training run folder or a bundle root.
        segmenter: a U-Net checkpoint to use instead of the one the model carries (for a
            U-Net-masked model this changes its input: use it knowingly).
        device: "cpu" or "cuda" (default: cuda when available).

    Raises:
        InputError: a missing or damaged model, thresholds or segmenter; one line each.
    """
    import torch

    from ichseg.preprocess.pipeline import Preprocessor

    files = resolve_model_files(Path(model_path))
    config, model, _ = load_classifier(files.classifier)
    thresholds = load_thresholds(files.thresholds, config.task.class_names)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    chosen_segmenter = segmenter or files.segmenter
    if config.masking.enabled and config.masking.method == "unet" and chosen_segmenter is None:
        raise InputError(
            model_path,
            "the model was trained on U-Net-masked slices but carries no segmenter; "
            "pass --segmenter",
        )
    preprocessor = Preprocessor.from_config(config, chosen_segmenter)
    if preprocessor.masker is not None:
        output_masker = preprocessor.masker
    elif chosen_segmenter is not None:
        from ichseg.segmentation.unet import load_segmenter

        output_masker = load_segmenter(chosen_segmenter, device=str(dev))
    else:
        from ichseg.segmentation.masking import make_masker

        output_masker = make_masker(config.masking.model_copy(update={"method": "classical"}))
    from ichseg.engine.predict import prepare_for_inference

    prepare_for_inference(model, dev)
    return Predictor(config, model, thresholds, preprocessor, output_masker, dev)


@dataclass
class VolumePrediction:
    """What the model made of one volume.

    Attributes:
        probabilities: ``(Z, K)``; rows of slices outside the model's scope (the run's slice
            filter) are NaN.
        scored: bool ``(Z,)``, the slices that were scored.
        mask: uint8 ``(z, y, x)`` intracranial mask on the volume's grid.
        images: uint8 ``(Z, C, S, S)`` model input (for Grad-CAM).
    """

    probabilities: np.ndarray
    scored: np.ndarray
    mask: np.ndarray
    images: np.ndarray


def predict_volume(
    predictor: Predictor, volume: CTVolume, batch_size: int = 32
) -> VolumePrediction:
    """Run the model on every in-scope slice of one volume."""
    mask = np.asarray(predictor.output_masker(volume), dtype=np.uint8)
    prepared = predictor.preprocessor(
        volume, mask=mask if predictor.preprocessor.masker is not None else None
    )
    images = prepared.images
    probabilities = np.full((volume.num_slices, len(predictor.class_names)), np.nan, np.float32)
    probabilities[prepared.keep] = predictor.probabilities(images[prepared.keep], batch_size)
    return VolumePrediction(probabilities, prepared.keep, mask, images)


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


def _labels(probabilities: np.ndarray, names: list[str], thresholds: dict[str, float]):
    return {f"label_{n}": int(bool(probabilities[i] >= thresholds[n])) for i, n in enumerate(names)}


def _is_positive(predictor: Predictor, labels: dict[str, int]) -> bool:
    if predictor.config.task.mode == "multilabel":
        return bool(labels["label_any"])
    return any(v for k, v in labels.items() if k != f"label_{predictor.class_names[0]}")


def predict(
    model_path: str | Path,
    input_path: str | Path,
    out_dir: str | Path,
    *,
    gradcam: bool = True,
    gradcam_slices: int = 3,
    batch_size: int = 32,
    segmenter: str | Path | None = None,
    progress: bool = True,
    predictor: Predictor | None = None,
) -> PredictResult:
    """Run the model on every series/volume (or picture) under ``input_path``.

    Raises:
        InputError: no model, no usable input at all, or the output inside the input.
    """
    input_path, out_dir = Path(input_path), Path(out_dir)
    check_output_folder(out_dir, [input_path])
    if not input_path.exists():
        raise InputError(input_path, "no such file or folder")
    predictor = predictor or load_predictor(model_path, segmenter)
    out_dir.mkdir(parents=True, exist_ok=True)
    if predictor.preprocessor.source_kind == "images":
        result = _predict_pictures(predictor, input_path, out_dir, batch_size, progress)
    else:
        result = _predict_volumes(
            predictor, input_path, out_dir, gradcam, gradcam_slices, batch_size, progress
        )
    _write_outputs(result, predictor.class_names)
    return result


def _predict_volumes(
    predictor: Predictor,
    input_path: Path,
    out_dir: Path,
    gradcam: bool,
    gradcam_slices: int,
    batch_size: int,
    progress: bool,
) -> PredictResult:
    from ichseg.io.loader import index_input, output_name
    from ichseg.io.nifti import write_nifti_atomic
    from ichseg.metrics.series import aggregate_probabilities
    from ichseg.progress import progress as progress_bar

    index = index_input(input_path)
    result = PredictResult(out_dir, skipped=list(index.skipped))
    names = predictor.class_names
    thresholds = predictor.thresholds
    durations = []
    used_names: set[str] = set()
    bar = progress_bar(
        index.iter_volumes(), total=len(index), desc="predict", unit="series", enabled=progress
    )
    for item in bar:
        if isinstance(item, InputError):
            result.skipped.append((item.path or str(input_path), item.reason))
            continue
        started = time.perf_counter()
        result.skipped += list(item.dropped)
        try:
            prediction = predict_volume(predictor, item, batch_size)
        except InputError as error:
            result.skipped.append((error.path or item.source, error.reason))
            continue
        except Exception as error:  # one bad volume must not cost the others their results
            log.debug("predicting %s failed", item.source, exc_info=True)
            result.skipped.append((item.source, f"{type(error).__name__}: {error}"))
            continue
        name = output_name(item, used_names)
        mask_path = write_nifti_atomic(
            item.to_nifti(prediction.mask, dtype=np.uint8),
            out_dir / "masks" / f"{name}_mask.nii.gz",
        )
        flags = ";".join(item.quality_flags)
        slice_labels_of = thresholds.slice
        for z in range(item.num_slices):
            p = prediction.probabilities[z]
            row = {
                "source": item.source,
                "series_uid": item.series_uid,
                "sop_uid": item.sop_uids[z],
                "slice_index": z,
                "z_mm": round(float(item.slice_positions[z]), 3),
                "scored": int(prediction.scored[z]),
                **{
                    n: ("" if np.isnan(v) else round(float(v), 6))
                    for n, v in zip(names, p, strict=True)
                },
                **(
                    _labels(p, names, slice_labels_of)
                    if prediction.scored[z]
                    else {f"label_{n}": "" for n in names}
                ),
                "flags": flags,
            }
            result.slice_rows.append(row)
        scored = prediction.probabilities[prediction.scored]
        if len(scored) == 0:
            result.skipped.append((item.source, "no slice in the model's scope (slice filter)"))
            continue
        series_prob = aggregate_probabilities(scored, thresholds.aggregation)
        labels = _labels(series_prob, names, thresholds.series)
        row = {
            "source": item.source,
            "series_uid": item.series_uid,
            "name": name,
            "patient_id": item.patient_id,
            "num_slices": item.num_slices,
            "scored_slices": int(prediction.scored.sum()),
            **{n: round(float(p), 6) for n, p in zip(names, series_prob, strict=True)},
            **labels,
            "mask": str(mask_path.relative_to(out_dir)),
            "flags": flags,
            "warnings": "; ".join(item.warnings),
        }
        if gradcam and _is_positive(predictor, labels):
            row["gradcam"] = ";".join(
                str(p.relative_to(out_dir))
                for p in write_gradcam(
                    predictor, item, prediction, out_dir / "gradcam", name, gradcam_slices
                )
            )
        else:
            row["gradcam"] = ""
        result.series_rows.append(row)
        durations.append(time.perf_counter() - started)
    bar.close()
    if not result.series_rows:
        reasons = "; ".join(f"{p}: {r}" for p, r in result.skipped[:3])
        raise InputError(input_path, f"no series could be processed ({reasons})")
    result.seconds_per_study = float(np.mean(durations))
    return result


def _predict_pictures(
    predictor: Predictor, input_path: Path, out_dir: Path, batch_size: int, progress: bool
) -> PredictResult:
    from ichseg.io.images import find_images

    paths = [input_path] if input_path.is_file() else find_images(input_path)
    if not paths:
        raise InputError(input_path, "no PNG/JPG images found (the model was trained on pictures)")
    result = PredictResult(out_dir)
    started = time.perf_counter()
    good, images = [], []
    for path in paths:
        try:
            images.append(predictor.preprocessor.image(path))
            good.append(path)
        except InputError as error:
            result.skipped.append((error.path or str(path), error.reason))
    if not good:
        reasons = "; ".join(f"{p}: {r}" for p, r in result.skipped[:3])
        raise InputError(input_path, f"no image could be processed ({reasons})")
    probabilities = predictor.probabilities(np.stack(images), batch_size)
    names = predictor.class_names
    for path, p in zip(good, probabilities, strict=True):
        result.slice_rows.append(
            {
                "source": str(path),
                **{n: round(float(v), 6) for n, v in zip(names, p, strict=True)},
                **_labels(p, names, predictor.thresholds.slice),
            }
        )
    result.seconds_per_study = (time.perf_counter() - started) / len(good)
    return result


def gradcam_maps(predictor: Predictor, images: np.ndarray, class_index: int | None) -> np.ndarray:
    """Grad-CAM (MONAI) heat maps ``(N, S, S)`` in [0, 1] at the model's input size.

    Args:
        predictor: the loaded model.
        images: uint8 ``(N, C, S, S)`` model input.
        class_index: the logit to explain (None: the top class of each image).
    """
    import torch
    from monai.visualize import GradCAM

    model = predictor.model
    cam = GradCAM(nn_module=model, target_layers=model.gradcam_target_layer())
    batch = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).to(predictor.device)
    with torch.enable_grad():
        maps = cam(x=batch, class_idx=class_index)[:, 0].detach().float().cpu().numpy()
    return maps


def native_heatmap(
    heatmap: np.ndarray, prepared_shape: tuple[int, int], box, native_shape
) -> np.ndarray:
    """A heat map at the model's input size mapped back onto the slice's native pixel grid.

    Args:
        heatmap: ``(S, S)``.
        prepared_shape: ``(h, w)`` of the region the input was resized from (the crop box or the
            whole slice).
        box: ``(y0, y1, x0, x1)`` of that region in the native slice, or None for the whole.
        native_shape: ``(rows, columns)`` of the slice.
    """
    from ichseg.preprocess.windowing import resize_slices

    region = resize_slices(heatmap[None].astype(np.float32), prepared_shape)[0]
    if box is None:
        return region
    out = np.zeros(native_shape, dtype=np.float32)
    y0, y1, x0, x1 = box
    out[y0:y1, x0:x1] = region
    return out


def write_gradcam(
    predictor: Predictor,
    volume: CTVolume,
    prediction: VolumePrediction,
    folder: Path,
    name: str,
    count: int,
) -> list[Path]:
    """Grad-CAM overlays at the slice's full resolution for the ``count`` most positive slices."""
    from ichseg.preprocess.windowing import window

    folder.mkdir(parents=True, exist_ok=True)
    multilabel = predictor.config.task.mode == "multilabel"
    probabilities = np.nan_to_num(prediction.probabilities, nan=-1.0)
    score = probabilities[:, 0] if multilabel else 1.0 - probabilities[:, 0]
    picks = [int(z) for z in np.argsort(score)[::-1][:count] if prediction.scored[z]]
    if not picks:
        return []
    maps = gradcam_maps(predictor, prediction.images[picks], 0 if multilabel else None)
    box = _crop_box(predictor, volume, prediction.mask)
    region = (box[1] - box[0], box[3] - box[2]) if box else volume.shape[1:]
    paths = []
    for z, heatmap in zip(picks, maps, strict=True):
        full = native_heatmap(heatmap, region, box, volume.shape[1:])
        fig = new_figure(figsize=(4, 4))
        ax = fig.add_subplot()
        ax.imshow(window(volume.hu[z], 40, 80), cmap="gray")
        ax.imshow(full, cmap="jet", alpha=0.35, vmin=0.0, vmax=1.0)
        ax.set_title(f"{name} slice {z}: p={score[z]:.2f}", fontsize=8)
        ax.axis("off")
        paths.append(
            save_figure(fig, folder / f"{name}_z{z:03d}.png", dpi=100, bbox_inches="tight")
        )
    return paths


def _crop_box(predictor: Predictor, volume: CTVolume, mask: np.ndarray):
    """The crop box the preprocessor used, or None when it does not crop."""
    masking = predictor.preprocessor.masking
    if not (masking.enabled and masking.crop):
        return None
    from ichseg.segmentation.masking import dilate_mask, mask_bbox

    spacing = volume.spacing[1:]
    grown = dilate_mask(mask, masking.dilation_mm, spacing)
    return mask_bbox(grown, masking.margin_mm, spacing)


def _write_outputs(result: PredictResult, names: list[str]) -> None:
    out = result.out_dir
    if result.slice_rows:
        columns = list(dict.fromkeys(key for row in result.slice_rows for key in row))
        write_csv(out / "predictions.csv", result.slice_rows, columns)
    if result.series_rows:
        columns = list(dict.fromkeys(key for row in result.series_rows for key in row))
        write_csv(out / "series.csv", result.series_rows, columns)
        write_json(out / "series.json", result.series_rows)
    write_csv(
        out / "skipped.csv",
        [{"path": p, "reason": r} for p, r in result.skipped],
        ["path", "reason"],
    )
