"""Folder inference: per-slice and per-series probabilities, masks and Grad-CAM overlays.

``predict`` is the API behind ``ichseg predict`` and the exported MONAI bundle. It loads a run
folder or a bundle (:func:`load_predictor`), reads every DICOM series and NIfTI volume under the
input (each one independently: a volume that fails is listed in ``skipped.csv`` with its
reason and the others go on), and writes ``predictions.csv`` (one row per slice),
``series.csv``/``series.json`` (one row per series), ``skipped.csv``, intracranial masks as
NIfTI and Grad-CAM PNGs for the most positive slices of positive series. Models trained on
windowed PNG/JPG pictures take pictures instead and write ``predictions.csv`` per image.

With a hemorrhage segmenter (given, or carried as ``hemorrhage_segmenter.pt``) each series also
gets its label map (``masks/<name>_hemorrhage.nii.gz``) and its volumes in ml on the true voxel
geometry: ``volume_ml_<subtype>``, ``volume_ml_total`` and ``abc2_ml_intraparenchymal`` (ABC/2
of the largest intraparenchymal bleed). The segmenter runs after the classifier and never
changes its input or its probabilities.

DICOM outputs, for series read from DICOM (NIfTI inputs keep NIfTI masks, and ``skipped.csv``
says why they got no DICOM object): ``output_format="dicom-seg"`` or ``"both"`` writes
``seg/<name>_seg.dcm``, a DICOM Segmentation of the intracranial mask and the hemorrhage
subtypes referencing the source instances; ``sr=True`` writes ``sr/<name>_sr.dcm``, a TID 1500
Measurement Report with the series probabilities, thresholds, findings, volumes and the
model's name and version; ``gradcam_format="dicom"`` or ``"both"`` writes each Grad-CAM overlay
as a Secondary Capture in the source study.

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
from ichseg.volume import HEMORRHAGE_CODES, SUBTYPES, CTVolume

log = logging.getLogger(__name__)

HEMORRHAGE_SEGMENTER_FILE = "hemorrhage_segmenter.pt"
"""A hemorrhage U-Net carried in a run folder (or a bundle's ``models/``) for volumes."""
OUTPUT_FORMATS = ("nifti", "dicom-seg", "both")
GRADCAM_FORMATS = ("png", "dicom", "both")
GRADCAM_ALPHA = 0.35
NEEDS_DICOM = "{what} not written: DICOM outputs need DICOM sources (masks are in NIfTI)"


@dataclass
class ModelFiles:
    """The files behind a run folder or an exported bundle."""

    classifier: Path
    thresholds: Path
    segmenter: Path | None
    hemorrhage: Path | None = None
    bundle_root: Path | None = None


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
    hemorrhage = base / HEMORRHAGE_SEGMENTER_FILE
    return ModelFiles(
        classifier,
        base / THRESHOLDS_FILE,
        segmenter if segmenter.is_file() else None,
        hemorrhage if hemorrhage.is_file() else None,
        model_path if base != model_path else None,
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
        hemorrhage: a hemorrhage U-Net (:class:`~ichseg.segmentation.unet.Segmenter`) for
            label maps and volumes, or None.
        files: the files the model was loaded from.
    """

    config: RunConfig
    model: Any
    thresholds: Thresholds
    preprocessor: Any
    output_masker: Any
    device: Any
    hemorrhage: Any = None
    files: ModelFiles | None = None

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
    model_path: str | Path,
    segmenter: str | Path | None = None,
    device: str | None = None,
    hemorrhage_segmenter: str | Path | None = None,
) -> Predictor:
    """Load a run folder or exported bundle for inference.

    Args:
        model_path: a training run folder or a bundle root.
        segmenter: a U-Net checkpoint to use instead of the one the model carries (for a
            U-Net-masked model this changes its input: use it knowingly).
        device: "cpu" or "cuda" (default: cuda when available).
        hemorrhage_segmenter: a hemorrhage U-Net for label maps and volumes; default the one
            the run or bundle carries as ``hemorrhage_segmenter.pt``, if any.

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
    from ichseg.segmentation.hemorrhage import load_hemorrhage_segmenter

    prepare_for_inference(model, dev)
    hemorrhage = load_hemorrhage_segmenter(hemorrhage_segmenter or files.hemorrhage, str(dev))
    return Predictor(config, model, thresholds, preprocessor, output_masker, dev, hemorrhage, files)


def model_identity(predictor: Predictor) -> tuple[str, str]:
    """(name, version) of the classifier, as DICOM reports name the algorithm.

    The name is ``ichseg <architecture> (<run name>)``; the version is the bundle's version
    for a bundle, else ichseg's version with the first 12 hex digits of the SHA-1 of the
    weights file, so two reports of the same version come from the same weights.
    """
    import hashlib
    import json

    from ichseg import __version__

    config = predictor.config
    name = f"ichseg {config.model.name} ({config.name})"[:64]
    files = predictor.files
    if files is None:
        return name, __version__
    if files.bundle_root is not None:
        metadata = files.bundle_root / "configs" / "metadata.json"
        try:
            return name, str(json.loads(metadata.read_text())["version"])
        except (OSError, ValueError, KeyError):
            pass
    digest = hashlib.sha1()
    with open(files.classifier, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return name, f"{__version__}+{digest.hexdigest()[:12]}"


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


@dataclass
class OutputOptions:
    """What ``predict`` writes for each series beside the tables.

    Attributes:
        gradcam: Grad-CAM overlays for positive series.
        gradcam_slices: overlays per positive series.
        gradcam_format: ``"png"``, ``"dicom"`` (Secondary Capture) or ``"both"``.
        output_format: masks as ``"nifti"``, ``"dicom-seg"`` or ``"both"``.
        sr: a DICOM Structured Report per series.
    """

    gradcam: bool = True
    gradcam_slices: int = 3
    gradcam_format: str = "png"
    output_format: str = "nifti"
    sr: bool = False

    def __post_init__(self) -> None:
        from ichseg.errors import ConfigError

        if self.output_format not in OUTPUT_FORMATS:
            raise ConfigError(
                f"output format must be one of {', '.join(OUTPUT_FORMATS)}, "
                f"got {self.output_format!r}"
            )
        if self.gradcam_format not in GRADCAM_FORMATS:
            raise ConfigError(
                f"Grad-CAM format must be one of {', '.join(GRADCAM_FORMATS)}, "
                f"got {self.gradcam_format!r}"
            )

    @property
    def nifti(self) -> bool:
        return self.output_format in ("nifti", "both")

    @property
    def seg(self) -> bool:
        return self.output_format in ("dicom-seg", "both")

    def dicom_outputs(self, gradcam_written: bool) -> list[str]:
        """Names of the DICOM objects asked for (Grad-CAM only when overlays are written)."""
        wanted = ["SEG"] if self.seg else []
        wanted += ["SR"] if self.sr else []
        if gradcam_written and self.gradcam_format in ("dicom", "both"):
            wanted.append("Secondary Capture")
        return wanted


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
    hemorrhage_segmenter: str | Path | None = None,
    output_format: str = "nifti",
    sr: bool = False,
    gradcam_format: str = "png",
) -> PredictResult:
    """Run the model on every series/volume (or picture) under ``input_path``.

    Args:
        model_path: a training run folder or a bundle root.
        input_path: DICOM folder tree and/or NIfTI files (or pictures for picture models).
        out_dir: output folder; must not be inside the input.
        gradcam: Grad-CAM overlays for positive series.
        gradcam_slices: overlays per positive series.
        batch_size: slices per forward pass.
        segmenter: intracranial U-Net to use instead of the one the model carries.
        progress: progress bar.
        predictor: an already loaded predictor (then the model arguments are not read).
        hemorrhage_segmenter: hemorrhage U-Net for label maps and volumes (default: the one
            the run or bundle carries, if any).
        output_format: masks as ``"nifti"``, ``"dicom-seg"`` or ``"both"``.
        sr: write a DICOM Structured Report per series (models of the six RSNA labels).
        gradcam_format: overlays as ``"png"``, ``"dicom"`` (Secondary Capture) or ``"both"``.

    Raises:
        InputError: no model, no usable input at all, or the output inside the input.
        ConfigError: an unknown output format, or ``sr`` with a model of other labels.
    """
    from ichseg.errors import ConfigError

    options = OutputOptions(gradcam, gradcam_slices, gradcam_format, output_format, sr)
    input_path, out_dir = Path(input_path), Path(out_dir)
    check_output_folder(out_dir, [input_path])
    if not input_path.exists():
        raise InputError(input_path, "no such file or folder")
    predictor = predictor or load_predictor(
        model_path, segmenter, hemorrhage_segmenter=hemorrhage_segmenter
    )
    if sr and list(predictor.class_names) != list(SUBTYPES):
        raise ConfigError(
            f"--sr reports the six labels {', '.join(SUBTYPES)}; this model predicts "
            f"{', '.join(predictor.class_names)}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    if predictor.preprocessor.source_kind == "images":
        result = _predict_pictures(predictor, input_path, out_dir, batch_size, progress)
    else:
        result = _predict_volumes(predictor, input_path, out_dir, options, batch_size, progress)
    _write_outputs(result, predictor.class_names)
    return result


def _write_masks(
    volume: CTVolume,
    mask: np.ndarray,
    labels: np.ndarray | None,
    out_dir: Path,
    name: str,
    options: OutputOptions,
) -> dict[str, str]:
    """NIfTI masks and/or the DICOM SEG of one series; relative paths by column."""
    from ichseg.io.nifti import write_nifti_atomic

    written = {"mask": ""}
    if labels is not None:
        written["hemorrhage_mask"] = ""
    if options.seg:
        written["seg"] = ""
    dicom = bool(volume.slice_paths)
    if options.nifti or not dicom:
        path = write_nifti_atomic(
            volume.to_nifti(mask, dtype=np.uint8), out_dir / "masks" / f"{name}_mask.nii.gz"
        )
        written["mask"] = str(path.relative_to(out_dir))
        if labels is not None:
            path = write_nifti_atomic(
                volume.to_nifti(labels, dtype=np.uint8),
                out_dir / "masks" / f"{name}_hemorrhage.nii.gz",
            )
            written["hemorrhage_mask"] = str(path.relative_to(out_dir))
    if options.seg and dicom:
        from ichseg.segmentation.hemorrhage import write_series_seg

        path = write_series_seg(volume, mask, labels, out_dir / "seg" / f"{name}_seg.dcm")
        written["seg"] = str(path.relative_to(out_dir))
    return written


def _write_report(
    predictor: Predictor,
    volume: CTVolume,
    probabilities: np.ndarray,
    volumes: dict[str, float],
    path: Path,
) -> Path:
    """The series' Structured Report: probabilities, series thresholds, volumes, ABC/2."""
    from ichseg.io.dicom_sr import SeriesFindings, write_structured_report

    names = predictor.class_names
    volumes_ml = {}
    if volumes:
        volumes_ml = {n: volumes[f"volume_ml_{n}"] for n in HEMORRHAGE_CODES.values()}
        volumes_ml["total"] = volumes["volume_ml_total"]
    findings = SeriesFindings(
        probabilities={n: float(p) for n, p in zip(names, probabilities, strict=True)},
        thresholds={n: float(predictor.thresholds.series[n]) for n in names},
        volumes_ml=volumes_ml,
        abc2_ml=volumes.get("abc2_ml_intraparenchymal") if volumes else None,
    )
    model_name, model_version = model_identity(predictor)
    return write_structured_report(
        volume,
        volume.slice_paths,
        findings,
        path,
        model_name=model_name,
        model_version=model_version,
    )


def _predict_volumes(
    predictor: Predictor,
    input_path: Path,
    out_dir: Path,
    options: OutputOptions,
    batch_size: int,
    progress: bool,
) -> PredictResult:
    from ichseg.io.loader import index_input, output_name
    from ichseg.metrics.series import aggregate_probabilities
    from ichseg.progress import progress as progress_bar
    from ichseg.segmentation.hemorrhage import hemorrhage_volumes

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
            # After the classifier, from the same mask: its probabilities cannot change.
            labels = (
                None
                if predictor.hemorrhage is None
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
        try:
            written = _write_masks(item, prediction.mask, labels, out_dir, name, options)
        except InputError as error:  # source files changed since they were read
            result.skipped.append((error.path or item.source, f"masks: {error.reason}"))
            written = {}
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
        labels_row = _labels(series_prob, names, thresholds.series)
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
            **volumes,
            **written,
            "flags": flags,
            "warnings": "; ".join(item.warnings),
        }
        if options.sr and item.slice_paths:
            try:
                path = _write_report(
                    predictor, item, series_prob, volumes, out_dir / "sr" / f"{name}_sr.dcm"
                )
                row["sr"] = str(path.relative_to(out_dir))
            except InputError as error:
                result.skipped.append((error.path or item.source, f"report: {error.reason}"))
                row["sr"] = ""
        elif options.sr:
            row["sr"] = ""
        overlays: list[Path] = []
        if options.gradcam and _is_positive(predictor, labels_row):
            overlays = write_gradcam(
                predictor,
                item,
                prediction,
                out_dir / "gradcam",
                name,
                options.gradcam_slices,
                formats=options.gradcam_format,
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


def gradcam_overlay_rgb(hu_slice: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """uint8 ``(rows, columns, 3)``: the slice in the brain window with the heat map blended.

    The same picture as the PNG overlay: the jet colour map at ``GRADCAM_ALPHA`` over grey.

    Args:
        hu_slice: ``(rows, columns)`` HU.
        heatmap: ``(rows, columns)`` in [0, 1] on the slice's pixel grid.
    """
    from matplotlib import colormaps

    from ichseg.preprocess.windowing import window

    grey = window(np.asarray(hu_slice, dtype=np.float32), 40, 80)[..., None]
    heat = colormaps["jet"](np.clip(heatmap, 0.0, 1.0))[..., :3]
    blended = (1.0 - GRADCAM_ALPHA) * grey + GRADCAM_ALPHA * heat
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)


def write_gradcam(
    predictor: Predictor,
    volume: CTVolume,
    prediction: VolumePrediction,
    folder: Path,
    name: str,
    count: int,
    formats: str = "png",
) -> list[Path]:
    """Grad-CAM overlays at the slice's full resolution for the ``count`` most positive slices.

    Args:
        formats: ``"png"``, ``"dicom"`` (a Secondary Capture per slice, one series per input
            series, in the source study) or ``"both"``. A volume not read from DICOM gets PNGs.
    """
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
    dicom = formats in ("dicom", "both") and bool(volume.slice_paths)
    png = formats in ("png", "both") or not dicom
    series_uid = None
    if dicom:
        import highdicom as hd

        series_uid = hd.UID()
    paths = []
    for number, (z, heatmap) in enumerate(zip(picks, maps, strict=True), start=1):
        full = native_heatmap(heatmap, region, box, volume.shape[1:])
        if png:
            fig = new_figure(figsize=(4, 4))
            ax = fig.add_subplot()
            ax.imshow(window(volume.hu[z], 40, 80), cmap="gray")
            ax.imshow(full, cmap="jet", alpha=GRADCAM_ALPHA, vmin=0.0, vmax=1.0)
            ax.set_title(f"{name} slice {z}: p={score[z]:.2f}", fontsize=8)
            ax.axis("off")
            paths.append(
                save_figure(fig, folder / f"{name}_z{z:03d}.png", dpi=100, bbox_inches="tight")
            )
        if dicom:
            from ichseg.io.dicom_sc import write_secondary_capture

            paths.append(
                write_secondary_capture(
                    gradcam_overlay_rgb(volume.hu[z], full),
                    volume.slice_paths[z],
                    folder / f"{name}_z{z:03d}.dcm",
                    series_instance_uid=series_uid,
                    instance_number=number,
                    derivation_description=(
                        f"Grad-CAM of {predictor.class_names[0]} blended over the slice "
                        f"(brain window); p={score[z]:.2f}"
                    ),
                )
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
