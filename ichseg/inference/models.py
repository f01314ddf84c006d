"""Loading a model for inference, and running it on one volume.

:func:`load_predictor` loads a training run folder or an exported bundle (a classifier or a
sequence model) with its preprocessing, thresholds, calibration and carried segmenters into a
:class:`Predictor`; :func:`predict_volume` scores every in-scope slice of one volume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ichseg.config import RunConfig
from ichseg.engine.checkpoint import (
    BACKBONE_DIR,
    BEST,
    CALIBRATION_FILE,
    CLASSIFIER_FILE,
    HEMORRHAGE_SEGMENTER_FILE,
    SEGMENTER_FILE,
    SEQUENCE_FILE,
    THRESHOLDS_FILE,
    Thresholds,
    load_classifier,
    load_thresholds,
    serving_dir,
)
from ichseg.engine.predict import (
    ForwardTimer,
    TestTimeAugmentation,
    default_device,
    precision_used,
)
from ichseg.errors import InputError
from ichseg.volume import CTVolume

if TYPE_CHECKING:
    from ichseg.inference.ensemble import EnsemblePredictor


@dataclass
class ModelFiles:
    """The files behind a run folder or an exported bundle.

    Attributes:
        classifier: the classifier checkpoint (for sequence models: the backbone).
        thresholds: ``thresholds.json`` of plain (non-TTA) outputs.
        segmenter: the carried U-Net, when there is one.
        sequence: the sequence head checkpoint of a sequence run or bundle, else None.
        base: the folder holding thresholds and calibration (run folder or ``models/``).
        hemorrhage: the carried hemorrhage U-Net (``hemorrhage_segmenter.pt``), if any.
        bundle_root: the bundle's root folder when the model is a bundle, else None.
    """

    classifier: Path
    thresholds: Path
    segmenter: Path | None
    sequence: Path | None = None
    base: Path | None = None
    hemorrhage: Path | None = None
    bundle_root: Path | None = None


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` is a training run folder or an ichseg bundle."""
    return (path / BEST).is_file() or (path / "models" / CLASSIFIER_FILE).is_file()


def resolve_model_files(model_path: Path) -> ModelFiles:
    """Classifier, thresholds, carried segmenter (and sequence head) of a run or a bundle."""
    if not model_path.exists():
        raise InputError(model_path, "no such model folder")
    sequence = None
    if (model_path / BACKBONE_DIR / BEST).exists():  # a sequence run folder
        base = model_path
        classifier = model_path / BACKBONE_DIR / BEST
        sequence = model_path / BEST
        if not sequence.is_file():
            raise InputError(model_path, f"the sequence head is not trained yet ({BEST} missing)")
    elif (model_path / BEST).exists():  # a training run folder
        base = model_path
        classifier = model_path / BEST
    elif (model_path / "models" / CLASSIFIER_FILE).exists():  # an exported bundle
        base = model_path / "models"
        classifier = base / CLASSIFIER_FILE
        if (base / SEQUENCE_FILE).is_file():
            sequence = base / SEQUENCE_FILE
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
        sequence=sequence,
        base=base,
        hemorrhage=hemorrhage if hemorrhage.is_file() else None,
        bundle_root=model_path if base != model_path else None,
    )


def finite_or_none(value: Any) -> Any:
    """JSON-safe copy: infinite thresholds (no threshold could be chosen) become None."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


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
        head: the sequence head of a sequence model (``model`` is then its backbone), else
            None.
        calibration: the run's :class:`~ichseg.engine.calibrate.RunCalibration` (None: raw
            probabilities).
        tta: test-time augmentation of every forward pass, or None.
        timer: forward seconds, plain and added by TTA, since the last reset.
        source: the model folder it was loaded from.
        notes: warnings about how it is served (recorded in ``predict_info.json``).
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
    head: Any = None
    calibration: Any = None
    tta: TestTimeAugmentation | None = None
    timer: ForwardTimer = field(default_factory=ForwardTimer)
    source: str = ""
    notes: list[str] = field(default_factory=list)
    hemorrhage: Any = None
    files: ModelFiles | None = None

    @property
    def class_names(self) -> list[str]:
        return self.config.task.class_names

    def default_batch(self) -> int:
        """Slices per forward pass when the caller does not choose: 8 on CPU, 32 on CUDA
        (:func:`~ichseg.engine.predict.default_inference_batch`)."""
        from ichseg.engine.predict import default_inference_batch

        return default_inference_batch(self.device)

    def probabilities(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """``(N, K)`` uncalibrated classifier probabilities of uint8 ``(N, C, S, S)`` input,
        ``batch_size`` slices per forward pass (default: :meth:`default_batch`)."""
        from ichseg.engine.predict import predict_probabilities, uint8_batches

        if len(images) == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        return predict_probabilities(
            self.model,
            uint8_batches(images, batch_size or self.default_batch()),
            self.device,
            self.config.train.amp,
            self.config.task.mode,
            self.tta,
            self.timer,
        )

    def sequence_probabilities(
        self, images: np.ndarray, batch_size: int | None = None
    ) -> np.ndarray:
        """``(N, K)`` uncalibrated sequence-head probabilities of one series' slices in order."""
        from ichseg.engine.predict import predict_features, uint8_batches
        from ichseg.engine.sequence import series_probabilities

        features = predict_features(
            self.model,
            uint8_batches(images, batch_size or self.default_batch()),
            self.device,
            self.config.train.amp,
            self.tta,
            self.timer,
        )
        return series_probabilities(self.head, [features], self.config.task.mode, self.device)[0]

    def calibrate(self, probabilities: np.ndarray) -> np.ndarray:
        """Probabilities through the run's calibration (unchanged without one)."""
        if self.calibration is None:
            return probabilities
        return self.calibration.apply(probabilities)

    def score_volume(self, volume: CTVolume, batch_size: int | None = None) -> VolumePrediction:
        """:func:`predict_volume` with calibrated probabilities: what ``predict`` writes."""
        prediction = predict_volume(self, volume, batch_size)
        prediction.probabilities = self.calibrate(prediction.probabilities)
        return prediction

    def score_images(
        self, images: np.ndarray, batch_size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Calibrated probabilities of pictures, and no member spread (one model)."""
        return self.calibrate(self.probabilities(images, batch_size)), None

    def series_summary(self, prediction: VolumePrediction) -> tuple[np.ndarray, dict[str, Any]]:
        """The series probability by the run's rule, and no extra columns (one model)."""
        from ichseg.metrics.series import aggregate_probabilities

        scored = prediction.probabilities[prediction.scored]
        return aggregate_probabilities(scored, self.thresholds.aggregation), {}

    def describe(self) -> dict[str, Any]:
        """How this model is served, for ``predict_info.json``."""
        return {
            "path": self.source,
            "kind": "sequence" if self.head is not None else "classifier",
            "model": self.config.model.name
            + (f" + {self.config.sequence.kind} sequence head" if self.head is not None else ""),
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "thresholds": finite_or_none(self.thresholds.to_dict()),
            "notes": list(self.notes),
            # The classifier's (a sequence model's backbone's); its evaluation records its own.
            "compute_precision": precision_used(self.device, self.config.train.amp),
        }


def load_predictor(
    model_path: str | Path,
    segmenter: str | Path | None = None,
    device: str | None = None,
    tta: TestTimeAugmentation | None = None,
    hemorrhage_segmenter: str | Path | None = None,
) -> Predictor:
    """Load a run folder or exported bundle for inference.

    Args:
        model_path: a training run folder or a bundle root (classifier or sequence model).
        segmenter: a U-Net checkpoint to use instead of the one the model carries (for a
            U-Net-masked model this changes its input: use it knowingly).
        device: "cpu" or "cuda" (default: cuda when available).
        tta: test-time augmentation; the thresholds and calibration fitted with the same TTA
            (``tta-<name>/``, written by ``evaluate --tta``) are used when the model has them,
            else the plain ones (with a note).
        hemorrhage_segmenter: a hemorrhage U-Net for label maps and volumes; default the one
            the run or bundle carries as ``hemorrhage_segmenter.pt``, if any.

    Raises:
        InputError: a missing or damaged model, head, thresholds, calibration or segmenter.
    """
    from ichseg.engine.calibrate import serving_calibration
    from ichseg.preprocess.pipeline import Preprocessor

    files = resolve_model_files(Path(model_path))
    config, model, _ = load_classifier(files.classifier)
    head, notes = None, []
    if files.sequence is not None:
        from ichseg.engine.sequence import check_backbone, load_sequence_head

        config, head, record = load_sequence_head(files.sequence)
        check_backbone(record, files.classifier, files.sequence)
    names, mode = config.task.class_names, config.task.mode
    base = files.base or files.thresholds.parent
    folder = base
    if tta is not None:
        folder = serving_dir(base, tta.name)
        if not (folder / THRESHOLDS_FILE).is_file():
            notes.append(
                f"no thresholds/calibration fitted with TTA {tta.name} (run `ichseg evaluate "
                f"--split val --tta` for them); using those fitted without TTA"
            )
            folder = base
    thresholds = load_thresholds(folder / THRESHOLDS_FILE, names)
    calibration = serving_calibration(folder / CALIBRATION_FILE, thresholds, names, mode)
    dev = default_device(device)
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
    if head is not None:
        head.to(dev).eval()
    hemorrhage = load_hemorrhage_segmenter(hemorrhage_segmenter or files.hemorrhage, str(dev))
    return Predictor(
        config,
        model,
        thresholds,
        preprocessor,
        output_masker,
        dev,
        hemorrhage=hemorrhage,
        files=files,
        head=head,
        calibration=calibration,
        tta=tta,
        source=str(model_path),
        notes=notes,
    )


def model_identity(predictor: Predictor | EnsemblePredictor) -> tuple[str, str]:
    """(name, version) of the classifier, as DICOM reports name the algorithm.

    The name is ``ichseg <architecture> (<run name>)`` (an ensemble: ``ichseg ensemble of M
    (<first run name>, ...)``); the version is the bundle's version for a single bundle, else
    ichseg's version with the first 12 hex digits of the SHA-1 of the weights files (every
    member's, for an ensemble), so two reports of the same version come from the same weights.
    """
    import hashlib
    import json

    from ichseg import __version__

    members = getattr(predictor, "members", None) or [predictor]
    if len(members) > 1:
        runs = ", ".join(m.config.name for m in members)
        name = f"ichseg ensemble of {len(members)} ({runs})"[:64]
    else:
        name = f"ichseg {predictor.config.model.name} ({predictor.config.name})"[:64]
    files = [m.files for m in members]
    if any(f is None for f in files):
        return name, __version__
    if len(files) == 1 and files[0].bundle_root is not None:
        metadata = files[0].bundle_root / "configs" / "metadata.json"
        try:
            return name, str(json.loads(metadata.read_text())["version"])
        except (OSError, ValueError, KeyError):
            pass
    digest = hashlib.sha1()
    for member_files in files:
        for path in (member_files.classifier, member_files.sequence):
            if path is None:
                continue
            with open(path, "rb") as handle:
                for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
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
        members: ``(M, Z, K)`` each ensemble member's calibrated probabilities, else None.
    """

    probabilities: np.ndarray
    scored: np.ndarray
    mask: np.ndarray
    images: np.ndarray
    members: np.ndarray | None = None


def _model_input(predictor: Predictor, volume: CTVolume, shared: dict | None = None):
    """Output mask and prepared input of a volume; ``shared`` reuses them across models with
    the same preprocessing (ensemble members)."""
    import json

    key = json.dumps(predictor.preprocessor.describe(), sort_keys=True, default=str)
    if shared is not None and key in shared:
        return shared[key]
    mask = np.asarray(predictor.output_masker(volume), dtype=np.uint8)
    prepared = predictor.preprocessor(
        volume, mask=mask if predictor.preprocessor.masker is not None else None
    )
    if shared is not None:
        shared[key] = (mask, prepared)
    return mask, prepared


def predict_volume(
    predictor: Predictor,
    volume: CTVolume,
    batch_size: int | None = None,
    shared: dict | None = None,
) -> VolumePrediction:
    """Run the model on every in-scope slice of one volume (uncalibrated probabilities).

    A sequence model embeds the in-scope slices in volume order and its head scores them as
    one series.

    Args:
        predictor: the loaded model.
        volume: the CT.
        batch_size: slices per forward pass.
        shared: a dict reused across calls on the same volume (ensembles prepare the input of
            members with the same preprocessing once).
    """
    mask, prepared = _model_input(predictor, volume, shared)
    images = prepared.images
    probabilities = np.full((volume.num_slices, len(predictor.class_names)), np.nan, np.float32)
    keep = prepared.keep
    if predictor.head is None:
        probabilities[keep] = predictor.probabilities(images[keep], batch_size)
    elif keep.any():
        probabilities[keep] = predictor.sequence_probabilities(images[keep], batch_size)
    return VolumePrediction(probabilities, keep, mask, images)
