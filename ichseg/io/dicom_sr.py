"""Per-series findings as a DICOM Structured Report (TID 1500 Measurement Report).

Why TID 1500 rather than a free-form Comprehensive SR: it is the DICOM template for quantitative
image analysis results, so PACS viewers and toolkits (highdicom, dcmqi, OHIF) can list its
numbers without knowing ichseg, every number carries a coded name and a UCUM unit, and each
measurement group names the algorithm (TID 4019) that produced it. It is encoded as a
Comprehensive 3D SR, which takes all content TID 1500 allows (3D coordinates included), so
regions can be added later without changing the SOP class.

Content: one measurement group (TID 1501) per label in ``SUBTYPES`` order, tracked by the
label's name. Each group holds, with finding type Hemorrhage (SCT 50960005) and the subtype's
site as finding site (see ``ichseg.io.dicom_seg``; Cranial Cavity for ``any``):

* Probability (DCM 122157, unit 1) of the label for the series,
* Threshold Value (DCM 122411, unit 1): the operating threshold (left out when none could be
  chosen on validation data: an infinite threshold, the label is never called present),
* a qualitative evaluation Hemorrhage = Present (SCT 52101004) or Absent (SCT 272519000):
  probability >= threshold,
* Volume (SCT 118565006, ml) of the segmented voxels when given (``any``: all subtypes),
* for intraparenchymal, Volume of ellipsoid (DCM 121221, ml) by the LWH method (DCM 126029):
  the ABC/2 estimate, when given.

Probabilities and thresholds are stored rounded to 6 decimals (as in ichseg's CSV outputs) and
volumes to 0.001 ml, so the report and the tables hold the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ichseg.errors import InputError
from ichseg.fileio import atomic_path
from ichseg.io.dicom_seg import CRANIAL_CAVITY, HEMORRHAGE, SEGMENT_CODES, Coding, coded
from ichseg.io.dicom_sources import read_source_headers
from ichseg.volume import SUBTYPES, CTVolume

PROBABILITY: Coding = ("122157", "DCM", "Probability")
THRESHOLD_VALUE: Coding = ("122411", "DCM", "Threshold Value")
VOLUME: Coding = ("118565006", "SCT", "Volume")
VOLUME_OF_ELLIPSOID: Coding = ("121221", "DCM", "Volume of ellipsoid")
LWH_METHOD: Coding = ("126029", "DCM", "LWH method for volume of ellipsoid")
PRESENT: Coding = ("52101004", "SCT", "Present")
ABSENT: Coding = ("272519000", "SCT", "Absent")
NO_UNITS: Coding = ("1", "UCUM", "no units")
MILLILITER: Coding = ("ml", "UCUM", "milliliter")
IMAGING_PROCEDURE: Coding = ("363679005", "SCT", "Imaging procedure")
DEVICE_OBSERVER: Coding = ("121007", "DCM", "Device")

PROBABILITY_DECIMALS = 6
VOLUME_DECIMALS = 3
SR_SERIES_NUMBER = 902
TOTAL = "total"


@dataclass(frozen=True)
class SeriesFindings:
    """What the report states about one series.

    Args:
        probabilities: probability per label of ``SUBTYPES`` (all six).
        thresholds: operating threshold per label (all six); a label is present when
            ``probability >= threshold``. ``inf`` means no threshold could be chosen: the
            label is never present and the report states no threshold for it.
        volumes_ml: segmented volume per subtype and optionally ``"total"`` (as returned by
            ``ichseg.volumetry.volumes_by_label``); labels without a volume are left out.
        abc2_ml: ABC/2 estimate of the largest intraparenchymal bleed, if measured.
    """

    probabilities: Mapping[str, float]
    thresholds: Mapping[str, float]
    volumes_ml: Mapping[str, float] = field(default_factory=dict)
    abc2_ml: float | None = None

    def __post_init__(self) -> None:
        for kind, values in (
            ("probabilities", self.probabilities),
            ("thresholds", self.thresholds),
        ):
            missing = [name for name in SUBTYPES if name not in values]
            if missing:
                raise ValueError(f"{kind} lack {missing}")
        unknown = sorted(set(self.volumes_ml) - set(SUBTYPES) - {TOTAL})
        if unknown:
            raise ValueError(f"volumes_ml has unknown labels {unknown}")

    @property
    def positive(self) -> dict[str, int]:
        """0/1 per label: probability at or above the threshold, before any rounding."""
        return {
            name: int(float(self.probabilities[name]) >= float(self.thresholds[name]))
            for name in SUBTYPES
        }


def _rounded(value: float, decimals: int = PROBABILITY_DECIMALS) -> float:
    return round(float(value), decimals)


def _label_text(name: str) -> str:
    return "Intracranial hemorrhage (any)" if name == "any" else SEGMENT_CODES[name].label


def _finding_site(name: str):
    import highdicom as hd

    if name == "any":
        return hd.sr.FindingSite(anatomic_location=coded(CRANIAL_CAVITY))
    coding = SEGMENT_CODES[name]
    modifier = coded(coding.region_modifier) if coding.region_modifier else None
    return hd.sr.FindingSite(
        anatomic_location=coded(coding.region),  # type: ignore[arg-type]
        topographical_modifier=modifier,
    )


def _group(name: str, findings: SeriesFindings, algorithm: Any):
    import highdicom as hd

    measurements = [
        hd.sr.Measurement(
            name=coded(PROBABILITY),
            value=_rounded(findings.probabilities[name]),
            unit=coded(NO_UNITS),
        )
    ]
    if math.isfinite(float(findings.thresholds[name])):
        measurements.append(
            hd.sr.Measurement(
                name=coded(THRESHOLD_VALUE),
                value=_rounded(findings.thresholds[name]),
                unit=coded(NO_UNITS),
            )
        )
    volume_key = TOTAL if name == "any" else name
    if volume_key in findings.volumes_ml:
        measurements.append(
            hd.sr.Measurement(
                name=coded(VOLUME),
                value=_rounded(findings.volumes_ml[volume_key], VOLUME_DECIMALS),
                unit=coded(MILLILITER),
            )
        )
    if name == "intraparenchymal" and findings.abc2_ml is not None:
        measurements.append(
            hd.sr.Measurement(
                name=coded(VOLUME_OF_ELLIPSOID),
                value=_rounded(findings.abc2_ml, VOLUME_DECIMALS),
                unit=coded(MILLILITER),
                method=coded(LWH_METHOD),
            )
        )
    presence = PRESENT if findings.positive[name] else ABSENT
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=_label_text(name)),
        finding_type=coded(HEMORRHAGE),
        finding_sites=[_finding_site(name)],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=coded(HEMORRHAGE), value=coded(presence))
        ],
    )


def write_structured_report(
    volume: CTVolume,
    source_files: Sequence[str | Path],
    findings: SeriesFindings,
    out_path: str | Path,
    *,
    model_name: str,
    model_version: str,
    series_description: str = "ichseg intracranial hemorrhage report",
    series_number: int = SR_SERIES_NUMBER,
    series_instance_uid: str | None = None,
) -> Path:
    """Write the series' findings as a TID 1500 Measurement Report (Comprehensive 3D SR).

    Args:
        volume: the CT the findings are about (read from DICOM).
        source_files: the DICOM file of each slice, in the volume's slice order; all are
            referenced as evidence.
        findings: probabilities, thresholds, volumes and ABC/2 of the series.
        out_path: the ``.dcm`` file to write (atomically).
        model_name: algorithm name (TID 4019) and observer device name.
        model_version: algorithm version.
        series_description: SeriesDescription of the new series.
        series_number: SeriesNumber of the new series.
        series_instance_uid: reuse a series; new UID by default.

    Raises:
        InputError: source files that do not match the volume's slices.
    """
    import highdicom as hd

    sources = read_source_headers(volume, source_files)
    algorithm = hd.sr.AlgorithmIdentification(name=model_name, version=model_version)
    device = hd.sr.ObserverContext(
        observer_type=coded(DEVICE_OBSERVER),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=model_name, manufacturer_name="ichseg", model_name=model_name
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=coded(IMAGING_PROCEDURE),
        imaging_measurements=[_group(name, findings, algorithm) for name in SUBTYPES],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources,
        content=report[0],
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ichseg",
        is_complete=True,
        series_description=series_description,
    )
    with atomic_path(out_path, suffix=".dcm") as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return Path(out_path)


def _code_key(concept: Any) -> tuple[str, str]:
    return str(concept.value), str(concept.scheme_designator)


def read_structured_report(path: str | Path) -> dict[str, Any]:
    """The numbers of a report written by ``write_structured_report``.

    Returns:
        ``model_name``, ``model_version``, ``probabilities``, ``thresholds`` (labels that
        have one) and ``findings`` (0/1) per label, ``volumes_ml`` per subtype with
        ``"total"`` (labels written with a volume), ``abc2_ml`` (or None), ``study_uid`` and
        ``referenced_sop_uids`` (evidence).

    Raises:
        InputError: not a readable SR, or not a Measurement Report with ichseg's groups.
    """
    import highdicom as hd

    path = Path(path)
    try:
        sr = hd.sr.srread(path)
        groups = sr.content.get_image_measurement_groups()
    except Exception as error:  # pydicom and highdicom raise many types on bad files
        raise InputError(
            path, f"not a readable Measurement Report ({type(error).__name__})"
        ) from None
    by_text = {_label_text(name): name for name in SUBTYPES}
    result: dict[str, Any] = {
        "probabilities": {},
        "thresholds": {},
        "findings": {},
        "volumes_ml": {},
        "abc2_ml": None,
    }
    model: tuple[str, str] | None = None
    for group in groups:
        name = by_text.get(str(group.tracking_identifier))
        if name is None:
            continue
        for measurement in group.get_measurements():
            key = _code_key(measurement.name)
            value = float(measurement.value)
            if key == _code_key(coded(PROBABILITY)):
                result["probabilities"][name] = value
            elif key == _code_key(coded(THRESHOLD_VALUE)):
                result["thresholds"][name] = value
            elif key == _code_key(coded(VOLUME)):
                result["volumes_ml"][TOTAL if name == "any" else name] = value
            elif key == _code_key(coded(VOLUME_OF_ELLIPSOID)):
                result["abc2_ml"] = value
        for evaluation in group.get_qualitative_evaluations(name=coded(HEMORRHAGE)):
            result["findings"][name] = int(_code_key(evaluation.value) == _code_key(coded(PRESENT)))
        if model is None:
            model = _algorithm(group)
    missing = [name for name in SUBTYPES if name not in result["probabilities"]]
    if missing:
        raise InputError(path, f"no measurement group for {missing}")
    result["model_name"], result["model_version"] = model or ("", "")
    result["study_uid"] = str(sr.StudyInstanceUID)
    result["referenced_sop_uids"] = [
        str(instance.ReferencedSOPInstanceUID)
        for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    ]
    return result


def _algorithm(group: Any) -> tuple[str, str]:
    """(name, version) from a group's Algorithm Identification (TID 4019) items."""
    values = {}
    for item in group[0].ContentSequence:
        code = item.ConceptNameCodeSequence[0]
        if (str(code.CodeValue), str(code.CodingSchemeDesignator)) in (
            ("111001", "DCM"),
            ("111003", "DCM"),
        ):
            values[str(code.CodeValue)] = str(item.TextValue)
    return values.get("111001", ""), values.get("111003", "")
