"""How well a hemorrhage segmenter measures blood: Dice and volume agreement per subtype.

Each case is a CT volume with a reference label map on its grid (codes of
:data:`ichseg.volume.HEMORRHAGE_CODES`). The segmenter's label map (with its post-processing)
is compared with the reference, per subtype and for all blood together:

* Dice, over the cases whose reference holds the subtype (a missed bleed counts 0);
* volume in ml on the volume's true geometry (:func:`ichseg.volumetry.volumes_by_label`):
  the error (predicted - reference) over those cases, its median absolute value and mean
  (bias), and the false-positive volume of the cases without the subtype;
* Bland-Altman agreement of predicted and reference volumes over the cases where either holds
  the subtype: mean difference and 95 % limits of agreement (mean +- 1.96 SD);
* ABC/2 of the largest intraparenchymal bleed (:func:`ichseg.volumetry.largest_component_abc2`),
  on the reference and on the predicted map, against the reference's intraparenchymal volume:
  the bedside estimate's own error beside the segmenter's.

:func:`evaluate_hemorrhage_segmenter` returns the figures as a dict and, given a folder, writes
``metrics.json``, ``per_case.csv``, ``report.md`` and ``bland_altman.png``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.errors import InputError
from ichseg.volume import HEMORRHAGE_CODES, CTVolume

SUBTYPE_NAMES: tuple[str, ...] = tuple(HEMORRHAGE_CODES.values())
TOTAL = "total"
INTRAPARENCHYMAL = "intraparenchymal"
LIMITS_Z = 1.96
"""Bland-Altman limits of agreement: mean difference +- 1.96 standard deviations."""
VOLUME_DECIMALS = 3


@dataclass
class EvaluationCase:
    """One CT volume and its reference hemorrhage label map on the same grid."""

    name: str
    volume: CTVolume
    reference: np.ndarray


def phantom_cases(count: int, seed: int, config: Any | None = None) -> Iterator[EvaluationCase]:
    """Phantom studies ``seed .. seed + count - 1`` with their true label maps.

    Args:
        count: number of studies.
        seed: first seed; use seeds no training run has seen.
        config: a :class:`~ichseg.phantom.PhantomConfig` (default: the phantom's defaults).
    """
    from ichseg.phantom import PhantomConfig, generate_study, study_to_volume

    config = config or PhantomConfig()
    for index in range(count):
        study = generate_study(seed + index, config)
        yield EvaluationCase(study.study_id, study_to_volume(study), study.hemorrhage)


def _reference_path(source: Path, labels_dir: Path) -> Path | None:
    from ichseg.io.nifti import nifti_stem

    stem = nifti_stem(source)
    names = [f"{stem}_hemorrhage.nii.gz", f"{stem}_hemorrhage.nii"]
    if stem.endswith("_ct"):  # the phantom's <id>_ct.nii.gz beside <id>_hemorrhage.nii.gz
        names.insert(0, f"{stem[:-3]}_hemorrhage.nii.gz")
    if labels_dir.resolve() != source.parent.resolve():
        names.append(source.name)
    return next((labels_dir / n for n in names if (labels_dir / n).is_file()), None)


def nifti_cases(images: str | Path, labels: str | Path) -> Iterator[EvaluationCase]:
    """NIfTI CTs under ``images`` with reference label maps from ``labels``.

    A reference is ``<stem>_hemorrhage.nii.gz`` (for the phantom's ``<id>_ct.nii.gz`` also
    ``<id>_hemorrhage.nii.gz``) or, in another folder, a file with the CT's own name. Files
    named ``*_hemorrhage`` or ``*_mask`` are references, not CTs. Its values are the codes of
    ``HEMORRHAGE_CODES``; it must have the CT's shape.

    Raises:
        InputError: no CT, a CT without a reference, or a reference that does not fit.
    """
    import nibabel as nib

    from ichseg.io.dicom import is_nifti
    from ichseg.io.nifti import nifti_stem, read_nifti
    from ichseg.io.walk import list_files

    images, labels = Path(images), Path(labels)
    if not labels.is_dir():
        raise InputError(labels, "reference label folder does not exist")
    listing = list_files(images)
    sources = sorted(
        p
        for p in listing.files
        if is_nifti(p) and not nifti_stem(p).endswith(("_hemorrhage", "_mask"))
    )
    if not sources:
        raise InputError(images, "no NIfTI CT found")
    for source in sources:
        reference = _reference_path(source, labels)
        if reference is None:
            raise InputError(source, f"no reference label map in {labels}")
        volume = read_nifti(source)
        data = np.asarray(nib.load(str(reference)).dataobj)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        label_map = np.rint(data).transpose(2, 1, 0) if data.ndim == 3 else data
        if label_map.shape != volume.shape:
            raise InputError(
                reference, f"label map shape {label_map.shape} differs from the CT {volume.shape}"
            )
        unknown = sorted(set(np.unique(label_map).astype(int)) - {0, *HEMORRHAGE_CODES})
        if unknown:
            raise InputError(reference, f"unknown label value(s) {unknown}")
        yield EvaluationCase(nifti_stem(source), volume, label_map.astype(np.uint8))


def case_measurements(
    predicted: np.ndarray, reference: np.ndarray, volume: CTVolume
) -> dict[str, Any]:
    """Volumes, errors and Dice per subtype and in total, and ABC/2, for one case.

    Returns:
        A flat row: ``ref_ml_<s>``, ``pred_ml_<s>``, ``error_ml_<s>`` (predicted - reference)
        and ``dice_<s>`` (None when neither map holds ``s``) for each subtype and ``total``;
        ``abc2_ref_ml`` / ``abc2_pred_ml`` (largest intraparenchymal bleed of each map, None
        without one in the reference).
    """
    from ichseg.metrics.overlap import dice
    from ichseg.volumetry import largest_component_abc2, volumes_by_label

    ref_ml = volumes_by_label(reference, volume)
    pred_ml = volumes_by_label(predicted, volume)
    row: dict[str, Any] = {}
    masks = {name: code for code, name in HEMORRHAGE_CODES.items()}
    for name in (*SUBTYPE_NAMES, TOTAL):
        if name == TOTAL:
            ref_mask, pred_mask = reference > 0, predicted > 0
        else:
            ref_mask, pred_mask = reference == masks[name], predicted == masks[name]
        present = bool(ref_mask.any() or pred_mask.any())
        row[f"ref_ml_{name}"] = round(ref_ml[name], VOLUME_DECIMALS)
        row[f"pred_ml_{name}"] = round(pred_ml[name], VOLUME_DECIMALS)
        row[f"error_ml_{name}"] = round(pred_ml[name] - ref_ml[name], VOLUME_DECIMALS)
        row[f"dice_{name}"] = round(dice(pred_mask, ref_mask), 4) if present else None
    has_iph = ref_ml[INTRAPARENCHYMAL] > 0
    row["abc2_ref_ml"] = (
        round(largest_component_abc2(reference, volume), VOLUME_DECIMALS) if has_iph else None
    )
    row["abc2_pred_ml"] = (
        round(largest_component_abc2(predicted, volume), VOLUME_DECIMALS) if has_iph else None
    )
    return row


def bland_altman(predicted: Iterable[float], reference: Iterable[float]) -> dict[str, Any]:
    """Mean difference (predicted - reference) and 95 % limits of agreement.

    Returns:
        ``n``, ``mean_difference``, ``sd_difference`` (sample SD, ddof 1) and
        ``limits_of_agreement`` ``[low, high]``; None where ``n`` is too small (SD needs 2).
    """
    a = np.asarray(list(predicted), dtype=np.float64)
    b = np.asarray(list(reference), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{a.size} predicted and {b.size} reference values")
    difference = a - b
    n = int(difference.size)
    mean = float(difference.mean()) if n else None
    sd = float(difference.std(ddof=1)) if n > 1 else None
    limits = None if sd is None else [mean - LIMITS_Z * sd, mean + LIMITS_Z * sd]
    return {"n": n, "mean_difference": mean, "sd_difference": sd, "limits_of_agreement": limits}


def _stat(values: list[float], fn: Callable[[np.ndarray], float]) -> float | None:
    return float(fn(np.asarray(values, dtype=np.float64))) if values else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-subtype (and total) figures over the rows of :func:`case_measurements`."""
    summary: dict[str, Any] = {}
    for name in (*SUBTYPE_NAMES, TOTAL):
        positive = [r for r in rows if r[f"ref_ml_{name}"] > 0]
        negative = [r for r in rows if r[f"ref_ml_{name}"] == 0]
        either = [r for r in rows if r[f"dice_{name}"] is not None]
        dices = [r[f"dice_{name}"] for r in positive]
        errors = [r[f"error_ml_{name}"] for r in positive]
        false_ml = [r[f"pred_ml_{name}"] for r in negative]
        summary[name] = {
            "n_cases": len(rows),
            "n_reference": len(positive),
            "dice_mean": _stat(dices, np.mean),
            "dice_median": _stat(dices, np.median),
            "reference_ml_median": _stat([r[f"ref_ml_{name}"] for r in positive], np.median),
            "abs_error_ml_median": _stat(errors, lambda e: np.median(np.abs(e))),
            "abs_error_ml_mean": _stat(errors, lambda e: np.mean(np.abs(e))),
            "error_ml_mean": _stat(errors, np.mean),
            "false_positive_cases": sum(v > 0 for v in false_ml),
            "false_positive_ml_max": _stat(false_ml, np.max),
            "bland_altman": bland_altman(
                [r[f"pred_ml_{name}"] for r in either], [r[f"ref_ml_{name}"] for r in either]
            ),
        }
    with_iph = [r for r in rows if r["abc2_ref_ml"] is not None]
    truth = [r[f"ref_ml_{INTRAPARENCHYMAL}"] for r in with_iph]

    def errors_of(values: list[float]) -> dict[str, Any]:
        error = np.asarray(values, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
        return {
            "abs_error_ml_median": _stat(list(error), lambda e: np.median(np.abs(e))),
            "error_ml_mean": _stat(list(error), np.mean),
            "relative_error_mean": _stat(
                list(error / np.maximum(truth, 1e-9)) if truth else [], np.mean
            ),
        }

    summary["abc2_intraparenchymal"] = {
        "n_reference": len(with_iph),
        "abc2_on_reference": errors_of([r["abc2_ref_ml"] for r in with_iph]),
        "abc2_on_prediction": errors_of([r["abc2_pred_ml"] for r in with_iph]),
        "segmenter_volume": errors_of([r[f"pred_ml_{INTRAPARENCHYMAL}"] for r in with_iph]),
    }
    return summary


def bland_altman_figure(rows: list[dict[str, Any]], summary: dict[str, Any]):
    """One Bland-Altman panel per subtype and for all blood (a matplotlib Figure)."""
    from ichseg.fileio import new_figure

    names = (*SUBTYPE_NAMES, TOTAL)
    figure = new_figure(figsize=(12, 7))
    axes = figure.subplots(2, 3).ravel()
    for axis, name in zip(axes, names, strict=True):
        either = [r for r in rows if r[f"dice_{name}"] is not None]
        pred = np.array([r[f"pred_ml_{name}"] for r in either], dtype=np.float64)
        ref = np.array([r[f"ref_ml_{name}"] for r in either], dtype=np.float64)
        agreement = summary[name]["bland_altman"]
        axis.scatter((pred + ref) / 2, pred - ref, s=14, alpha=0.7)
        axis.axhline(0.0, color="0.7", linewidth=0.8)
        if agreement["mean_difference"] is not None:
            axis.axhline(agreement["mean_difference"], color="tab:blue", linewidth=1.0)
        if agreement["limits_of_agreement"] is not None:
            for limit in agreement["limits_of_agreement"]:
                axis.axhline(limit, color="tab:red", linestyle="--", linewidth=0.9)
        title = "all blood" if name == TOTAL else name
        axis.set_title(f"{title} (n={agreement['n']})", fontsize=9)
        axis.set_xlabel("mean of predicted and reference (ml)", fontsize=8)
        axis.set_ylabel("predicted - reference (ml)", fontsize=8)
        axis.tick_params(labelsize=7)
    figure.suptitle("Bland-Altman: mean difference (blue), 95 % limits of agreement (red)")
    figure.tight_layout()
    return figure


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def report_markdown(result: dict[str, Any]) -> str:
    """The evaluation as a markdown report."""
    summary = result["summary"]
    lines = [
        "# Hemorrhage segmenter evaluation",
        "",
        f"- checkpoint: `{result['checkpoint']}`",
        f"- cases: {result['n_cases']} ({result['cases']})",
        f"- post-processing: {result['postprocessing']}",
        "",
        "Dice over the cases whose reference holds the subtype (a miss counts 0); volume",
        "error = predicted - reference over the same cases; Bland-Altman over the cases where",
        "either map holds the subtype.",
        "",
        "| subtype | n ref | Dice mean | Dice median | median ref ml | median abs error ml "
        "| mean error ml | mean diff [95 % LoA] ml | false-positive cases (max ml) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in (*SUBTYPE_NAMES, TOTAL):
        s = summary[name]
        agreement = s["bland_altman"]
        limits = agreement["limits_of_agreement"]
        loa = f"{_fmt(agreement['mean_difference'])}"
        if limits is not None:
            loa += f" [{_fmt(limits[0])}, {_fmt(limits[1])}]"
        lines.append(
            f"| {'all blood' if name == TOTAL else name} | {s['n_reference']} "
            f"| {_fmt(s['dice_mean'], 3)} | {_fmt(s['dice_median'], 3)} "
            f"| {_fmt(s['reference_ml_median'])} | {_fmt(s['abs_error_ml_median'])} "
            f"| {_fmt(s['error_ml_mean'])} | {loa} "
            f"| {s['false_positive_cases']} ({_fmt(s['false_positive_ml_max'])}) |"
        )
    abc = summary["abc2_intraparenchymal"]
    lines += [
        "",
        f"## Intraparenchymal volume: ABC/2 vs segmentation (n = {abc['n_reference']})",
        "",
        "Errors against the reference's intraparenchymal voxel volume.",
        "",
        "| estimate | median abs error ml | mean error ml | mean relative error |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("abc2_on_reference", "ABC/2 on the reference mask"),
        ("abc2_on_prediction", "ABC/2 on the predicted mask"),
        ("segmenter_volume", "segmenter voxel volume"),
    ):
        e = abc[key]
        lines.append(
            f"| {label} | {_fmt(e['abs_error_ml_median'])} | {_fmt(e['error_ml_mean'])} "
            f"| {_fmt(e['relative_error_mean'], 3)} |"
        )
    lines += ["", "![Bland-Altman](bland_altman.png)", ""]
    return "\n".join(lines)


def write_evaluation(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``metrics.json``, ``per_case.csv``, ``report.md`` and ``bland_altman.png``."""
    from ichseg.fileio import save_figure, write_csv, write_json, write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result["cases_table"]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return {
        "metrics": write_json(out_dir / "metrics.json", result, indent=2),
        "per_case": write_csv(out_dir / "per_case.csv", rows, columns),
        "report": write_text(out_dir / "report.md", report_markdown(result)),
        "bland_altman": save_figure(
            bland_altman_figure(rows, result["summary"]), out_dir / "bland_altman.png"
        ),
    }


def evaluate_hemorrhage_segmenter(
    checkpoint: str | Path,
    cases: Iterable[EvaluationCase],
    out_dir: str | Path | None = None,
    *,
    restrict_to_intracranial: bool | None = None,
    min_component_ml: float | None = None,
    component_vote: bool | None = None,
    extra_axial_shape: float | None = None,
    cases_description: str = "",
    progress: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Dice and volume agreement of a hemorrhage segmenter against reference label maps.

    Args:
        checkpoint: a hemorrhage U-Net from ``train_segmenter`` (``target: hemorrhage``).
        cases: volumes with reference label maps (:func:`phantom_cases`, :func:`nifti_cases`).
        out_dir: folder for ``metrics.json``, ``per_case.csv``, ``report.md`` and
            ``bland_altman.png``; None writes nothing.
        restrict_to_intracranial: override the checkpoint's post-processing setting.
        min_component_ml: override the checkpoint's smallest kept bleed.
        component_vote: override the checkpoint's one-subtype-per-bleed setting.
        extra_axial_shape: override the checkpoint's extra-axial shape rule (0: off).
        cases_description: how the cases were made, for the report.
        progress: progress output.
        device: torch device.

    Returns:
        ``summary`` (per subtype and ``total``, and ``abc2_intraparenchymal``), ``cases_table``
        (one row per case), ``checkpoint``, ``postprocessing``, ``n_cases`` and ``cases``.

    Raises:
        InputError: a checkpoint that is not a hemorrhage segmenter, or no cases.
    """
    from ichseg.progress import progress as progress_bar
    from ichseg.segmentation.unet import load_segmenter

    segmenter = load_segmenter(checkpoint, device=device)
    if segmenter.config.target != "hemorrhage":
        raise InputError(checkpoint, "is an intracranial segmenter, not a hemorrhage segmenter")
    restrict = (
        segmenter.config.restrict_to_intracranial
        if restrict_to_intracranial is None
        else restrict_to_intracranial
    )
    minimum = segmenter.config.min_component_ml if min_component_ml is None else min_component_ml
    vote = segmenter.config.component_vote if component_vote is None else component_vote
    shape = segmenter.config.extra_axial_shape if extra_axial_shape is None else extra_axial_shape
    rows = []
    for case in progress_bar(cases, desc="evaluate", unit="case", enabled=progress):
        reference = np.asarray(case.reference)
        if reference.shape != case.volume.shape:
            raise InputError(case.name, "reference label map and volume differ in shape")
        predicted = segmenter.predict_volume(
            case.volume,
            restrict_to_intracranial=restrict,
            min_component_ml=minimum,
            component_vote=vote,
            extra_axial_shape=shape,
        )
        rows.append({"case": case.name, **case_measurements(predicted, reference, case.volume)})
    if not rows:
        raise InputError(None, "no cases to evaluate")
    result = {
        "checkpoint": str(checkpoint),
        "postprocessing": {
            "restrict_to_intracranial": bool(restrict),
            "min_component_ml": float(minimum),
            "component_vote": bool(vote),
            "extra_axial_shape": float(shape),
        },
        "n_cases": len(rows),
        "cases": cases_description,
        "summary": summarize(rows),
        "cases_table": rows,
    }
    if out_dir is not None:
        write_evaluation(result, out_dir)
    return result
