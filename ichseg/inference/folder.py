"""``predict``: a model (or an ensemble) over every series, volume or picture in a folder.

Each volume is read, scored and written independently: one that fails is listed in
``skipped.csv`` with its reason and the others go on. The package docstring
(:mod:`ichseg.inference`) lists everything written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.engine.checkpoint import ARGMAX_RULE, Thresholds
from ichseg.engine.predict import ForwardTimer, TestTimeAugmentation
from ichseg.errors import InputError
from ichseg.fileio import check_output_folder, write_csv, write_json
from ichseg.inference.ensemble import EnsemblePredictor, load_models
from ichseg.inference.gradcam import write_gradcam
from ichseg.inference.models import Predictor, finite_or_none, is_model_folder, model_identity
from ichseg.inference.outputs import NEEDS_DICOM, OutputOptions, write_masks, write_report
from ichseg.volume import SUBTYPES

log = logging.getLogger(__name__)


@dataclass
class PredictResult:
    out_dir: Path
    slice_rows: list[dict[str, Any]] = field(default_factory=list)
    series_rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds_per_study: float = float("nan")
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def partial(self) -> bool:
        return bool(self.skipped)


def _labels(probabilities: np.ndarray, names: list[str], thresholds: dict[str, float]):
    return {f"label_{n}": int(bool(probabilities[i] >= thresholds[n])) for i, n in enumerate(names)}


def _slice_labels(probabilities: np.ndarray, names: list[str], thresholds: Thresholds):
    """One slice's labels: its most probable class (multiclass), else at the slice thresholds."""
    if thresholds.rule == ARGMAX_RULE:
        best = int(np.argmax(probabilities))
        return {f"label_{n}": int(i == best) for i, n in enumerate(names)}
    return _labels(probabilities, names, thresholds.slice)


def _series_labels(
    series_prob: np.ndarray, scored: np.ndarray, names: list[str], thresholds: Thresholds
):
    """A series' labels: at the series thresholds, or (multiclass) every class that some
    scored slice was labelled with, so a series is positive when any slice is."""
    if thresholds.rule == ARGMAX_RULE:
        found = set(np.argmax(scored, axis=1).tolist())
        return {f"label_{n}": int(i in found) for i, n in enumerate(names)}
    return _labels(series_prob, names, thresholds.series)


def _is_positive(predictor: Predictor, labels: dict[str, int]) -> bool:
    if predictor.config.task.mode == "multilabel":
        return bool(labels["label_any"])
    return any(v for k, v in labels.items() if k != f"label_{predictor.class_names[0]}")


def predict(
    model_path: str | Path | list[str | Path] | tuple[str | Path, ...],
    input_path: str | Path,
    out_dir: str | Path,
    *,
    gradcam: bool = True,
    gradcam_slices: int = 3,
    batch_size: int | None = None,
    segmenter: str | Path | None = None,
    progress: bool = True,
    predictor: Predictor | EnsemblePredictor | None = None,
    tta: TestTimeAugmentation | None = None,
    hemorrhage_segmenter: str | Path | None = None,
    output_format: str = "nifti",
    sr: bool = False,
    gradcam_format: str = "png",
) -> PredictResult:
    """Run the model (or an ensemble) on every series/volume (or picture) under ``input_path``.

    Args:
        model_path: a run folder or bundle, or several (an ensemble, see :func:`load_models`).
        input_path: DICOM folder tree and/or NIfTI files (or pictures for picture models).
        out_dir: output folder; must not be inside the input, nor be a model folder.
        gradcam: Grad-CAM overlays for positive series (ensembles: of the first member).
        gradcam_slices: overlays per positive series.
        batch_size: slices per forward pass (default: 8 on CPU, 32 on CUDA,
            :func:`~ichseg.engine.predict.default_inference_batch`).
        segmenter: a U-Net checkpoint to use instead of the carried one.
        progress: progress bar.
        predictor: an already loaded model (the bundle passes its own).
        tta: test-time augmentation (when the models are loaded here).
        hemorrhage_segmenter: hemorrhage U-Net for label maps and volumes (default: the one
            the run or bundle carries, if any).
        output_format: masks as ``"nifti"``, ``"dicom-seg"`` or ``"both"``.
        sr: write a DICOM Structured Report per series (models of the six RSNA labels).
        gradcam_format: overlays as ``"png"``, ``"dicom"`` (Secondary Capture) or ``"both"``.

    Raises:
        InputError: no model, no usable input at all, the output inside the input, a model
            folder given as input or output, or ensemble members that do not match.
        ConfigError: an unknown output format, or ``sr`` with a model of other labels.
    """
    from ichseg.errors import ConfigError

    options = OutputOptions(gradcam, gradcam_slices, gradcam_format, output_format, sr)
    input_path, out_dir = Path(input_path), Path(out_dir)
    check_output_folder(out_dir, [input_path])
    if not input_path.exists():
        raise InputError(input_path, "no such file or folder")
    for path, role in ((input_path, "INPUT"), (out_dir, "OUT")):
        if path.is_dir() and is_model_folder(path):
            raise InputError(
                path,
                f"is a model folder, not the {role}: the last two paths are INPUT and OUT "
                "(models come first)",
            )
    paths = [model_path] if isinstance(model_path, str | Path) else list(model_path)
    predictor = predictor or load_models(
        paths, segmenter, tta=tta, hemorrhage_segmenter=hemorrhage_segmenter
    )
    if sr and list(predictor.class_names) != list(SUBTYPES):
        raise ConfigError(
            f"--sr reports the six labels {', '.join(SUBTYPES)}; this model predicts "
            f"{', '.join(predictor.class_names)}"
        )
    predictor.timer = ForwardTimer()
    if batch_size is None:
        from ichseg.engine.predict import default_inference_batch

        batch_size = default_inference_batch(predictor.device)
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    if predictor.preprocessor.source_kind == "images":
        result = _predict_pictures(predictor, input_path, out_dir, batch_size, progress)
    else:
        result = _predict_volumes(predictor, input_path, out_dir, options, batch_size, progress)
    result.info = prediction_info(predictor, result, time.perf_counter() - started)
    _write_outputs(result, predictor.class_names)
    write_json(out_dir / "predict_info.json", result.info)
    return result


def prediction_info(
    predictor: Predictor | EnsemblePredictor, result: PredictResult, seconds: float
) -> dict[str, Any]:
    """The record of a ``predict`` call: models, calibration, TTA, ensemble rule, timings."""
    members = predictor.members if isinstance(predictor, EnsemblePredictor) else [predictor]
    tta = predictor.tta
    timing = {
        "seconds_total": round(seconds, 3),
        "seconds_per_study": (
            round(result.seconds_per_study, 4) if np.isfinite(result.seconds_per_study) else None
        ),
        **predictor.timer.to_dict(),
    }
    info: dict[str, Any] = {
        "models": [m.describe() for m in members],
        "tta": tta.to_dict() if tta is not None else {"name": "none", "views": 1},
        "timing": timing,
        "series": len(result.series_rows),
        "slices": len(result.slice_rows),
        "skipped": len(result.skipped),
    }
    if isinstance(predictor, EnsemblePredictor):
        # The averaged thresholds that made the label columns, beside the members' own.
        info["ensemble"] = {
            **predictor.rules(),
            "applied_thresholds": finite_or_none(predictor.thresholds.to_dict()),
        }
    return info


def _predict_volumes(
    predictor: Predictor,
    input_path: Path,
    out_dir: Path,
    options: OutputOptions,
    batch_size: int,
    progress: bool,
) -> PredictResult:
    from ichseg.io.loader import index_input, output_name
    from ichseg.progress import progress as progress_bar
    from ichseg.segmentation.hemorrhage import hemorrhage_volumes

    index = index_input(input_path)
    result = PredictResult(out_dir, skipped=list(index.skipped))
    names = predictor.class_names
    thresholds = predictor.thresholds
    durations = []
    # The model's name and version hash its weights: once per run, not per report.
    identity = model_identity(predictor) if options.sr else None
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
            prediction = predictor.score_volume(item, batch_size)
            # After the classifier, from the same mask: its probabilities cannot change.
            labels = (
                None
                if predictor.hemorrhage is None or not prediction.scored.any()
                else predictor.hemorrhage.predict_volume(item, intracranial_mask=prediction.mask)
            )
        except InputError as error:
            result.skipped.append((error.path or item.source, error.reason))
            continue
        except Exception as error:  # one bad volume must not cost the others their results
            log.debug("predicting %s failed", item.source, exc_info=True)
            result.skipped.append((item.source, f"{type(error).__name__}: {error}"))
            continue
        name = output_name(item, used_names)
        flags = ";".join(item.quality_flags)
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
                    _slice_labels(p, names, thresholds)
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
        written = _attempt(
            "masks",
            item.source,
            result.skipped,
            write_masks,
            item,
            prediction.mask,
            labels,
            out_dir,
            name,
            options,
        )
        series_prob, spread = predictor.series_summary(prediction)
        labels_row = _series_labels(series_prob, scored, names, thresholds)
        volumes = {} if labels is None else hemorrhage_volumes(labels, item)
        row = {
            "source": item.source,
            "series_uid": item.series_uid,
            "name": name,
            "patient_id": item.patient_id,
            "num_slices": item.num_slices,
            "scored_slices": int(prediction.scored.sum()),
            **{n: round(float(p), 6) for n, p in zip(names, series_prob, strict=True)},
            **labels_row,
            **spread,
            **volumes,
            **(written or {}),
            "flags": flags,
            "warnings": "; ".join(item.warnings),
        }
        if options.sr:
            row["sr"] = ""
        if options.sr and item.slice_paths:
            path = _attempt(
                "report",
                item.source,
                result.skipped,
                write_report,
                predictor,
                item,
                series_prob,
                volumes,
                out_dir / "sr" / f"{name}_sr.dcm",
                identity,
            )
            row["sr"] = "" if path is None else str(path.relative_to(out_dir))
        overlays: list[Path] = []
        if options.gradcam and _is_positive(predictor, labels_row):
            overlays = (
                _attempt(
                    "Grad-CAM",
                    item.source,
                    result.skipped,
                    write_gradcam,
                    predictor,
                    item,
                    prediction,
                    out_dir / "gradcam",
                    name,
                    options.gradcam_slices,
                    formats=options.gradcam_format,
                )
                or []
            )
        row["gradcam"] = ";".join(str(p.relative_to(out_dir)) for p in overlays)
        wanted = options.dicom_outputs(bool(overlays))
        if wanted and not item.slice_paths:
            note = NEEDS_DICOM.format(what=", ".join(wanted))
            log.warning("%s: %s", item.source, note)
            result.skipped.append((item.source, note))
        result.series_rows.append(row)
        durations.append(time.perf_counter() - started)
    bar.close()
    if not result.series_rows:
        reasons = "; ".join(f"{p}: {r}" for p, r in result.skipped[:3])
        raise InputError(input_path, f"no series could be processed ({reasons})")
    result.seconds_per_study = float(np.mean(durations))
    return result


def _attempt(
    what: str, source: str, skipped: list, write: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """``write(*args, **kwargs)``, or None with the failure listed in ``skipped``.

    An output that cannot be written (a SEG whose sources lack a frame of reference, source
    files changed since they were read) must not cost the series its probabilities or the other
    series theirs.
    """
    try:
        return write(*args, **kwargs)
    except InputError as error:
        skipped.append((error.path or source, f"{what}: {error.reason}"))
    except Exception as error:
        log.debug("writing the %s of %s failed", what, source, exc_info=True)
        skipped.append((source, f"{what}: {type(error).__name__}: {error}"))
    return None


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
    probabilities, spread = predictor.score_images(np.stack(images), batch_size)
    names = predictor.class_names
    for i, (path, p) in enumerate(zip(good, probabilities, strict=True)):
        sd = [] if spread is None else zip(names, spread[i], strict=True)
        result.slice_rows.append(
            {
                "source": str(path),
                **{n: round(float(v), 6) for n, v in zip(names, p, strict=True)},
                **_slice_labels(p, names, predictor.thresholds),
                **{f"sd_{n}": round(float(v), 6) for n, v in sd},
            }
        )
    result.seconds_per_study = (time.perf_counter() - started) / len(good)
    return result


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
