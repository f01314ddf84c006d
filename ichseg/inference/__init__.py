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

The model may be a classifier run, a sequence run (its backbone embeds every kept slice of a
volume and the sequence head scores the series in slice order), a bundle of either, or several
of them (an ensemble: their calibrated probabilities are averaged and the spread of the series
probability over the members is reported). Probabilities are calibrated with the run's
``calibration.json``; with test-time augmentation (``tta``) they are averaged over flipped
(and shifted) views. ``predict_info.json`` records the models, calibration, TTA and timings.

The parts: :mod:`ichseg.inference.models` (loading a run or bundle, one volume's prediction),
:mod:`ichseg.inference.ensemble` (several models served as one), :mod:`ichseg.inference.outputs`
(masks, DICOM SEG and SR), :mod:`ichseg.inference.gradcam` (Grad-CAM overlays) and
:mod:`ichseg.inference.folder` (``predict`` over a folder). Every public name is importable from
here.
"""

from ichseg.inference.ensemble import EnsemblePredictor, load_models, make_ensemble
from ichseg.inference.folder import PredictResult, predict, prediction_info
from ichseg.inference.gradcam import (
    GRADCAM_ALPHA,
    gradcam_maps,
    gradcam_overlay_rgb,
    input_crop_box,
    native_heatmap,
    write_gradcam,
)
from ichseg.inference.models import (
    HEMORRHAGE_SEGMENTER_FILE,
    ModelFiles,
    Predictor,
    VolumePrediction,
    is_model_folder,
    load_predictor,
    model_identity,
    predict_volume,
    resolve_model_files,
)
from ichseg.inference.outputs import (
    GRADCAM_FORMATS,
    NEEDS_DICOM,
    OUTPUT_FORMATS,
    OutputOptions,
    write_masks,
    write_report,
)

__all__ = [
    "GRADCAM_ALPHA",
    "GRADCAM_FORMATS",
    "HEMORRHAGE_SEGMENTER_FILE",
    "NEEDS_DICOM",
    "OUTPUT_FORMATS",
    "EnsemblePredictor",
    "ModelFiles",
    "OutputOptions",
    "PredictResult",
    "Predictor",
    "VolumePrediction",
    "gradcam_maps",
    "gradcam_overlay_rgb",
    "input_crop_box",
    "is_model_folder",
    "load_models",
    "load_predictor",
    "make_ensemble",
    "model_identity",
    "native_heatmap",
    "predict",
    "predict_volume",
    "prediction_info",
    "resolve_model_files",
    "write_gradcam",
    "write_masks",
    "write_report",
]
