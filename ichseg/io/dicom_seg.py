"""DICOM Segmentation (binary) of the intracranial space and hemorrhage subtypes.

Each segment is coded with SNOMED CT concepts from the DICOM standard's context groups (all in
pydicom's DICOM code dictionary):

========================  =====================================  ============================
segment                   category / type                        anatomic region (modifier)
========================  =====================================  ============================
intracranial              91723000 Anatomical Structure /        -
                          1101003 Cranial Cavity (CID 7140)
each hemorrhage subtype   49755003 Morphologically Abnormal      see below
                          Structure / 50960005 Hemorrhage
                          (CID 7150 / CID 7159)
epidural                                                         18545000 Dura mater
                                                                 (261074009 External)
subdural                                                         18545000 Dura mater
                                                                 (260521003 Internal)
subarachnoid                                                     33930006 Cranial
                                                                 Subarachnoid Space
intraventricular                                                 35764002 Brain ventricle
intraparenchymal                                                 12738006 Brain
========================  =====================================  ============================

Why the subtype is a site and not its own type: a segmented property type names what the voxels
are (a morphology such as Hemorrhage), while "Subdural hemorrhage" and its siblings are SNOMED
*disorders* (Hemorrhage with a finding site). None of the subtype disorders is in a DICOM context
group, so each is post-coordinated as Hemorrhage plus the Anatomic Region Sequence of its site.
The epidural and subdural spaces have no concept in the DICOM code tables, so those two are
placed relative to the dura mater with the standard anatomic modifiers External (epidural:
outside the dura) and Internal (subdural: beneath it). The segment label names each subtype.

Frames that are empty are left out (highdicom's default; readers treat a missing frame as empty),
while the Referenced Series Sequence lists every source instance of the volume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichseg import __version__
from ichseg.errors import InputError
from ichseg.fileio import atomic_path
from ichseg.io.dicom_sources import read_source_headers
from ichseg.volume import HEMORRHAGE_CODES, SUBTYPES, CTVolume

Coding = tuple[str, str, str]
"""(code value, coding scheme designator, code meaning)."""

ANATOMICAL_STRUCTURE: Coding = ("91723000", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE: Coding = (
    "49755003",
    "SCT",
    "Morphologically Abnormal Structure",
)
HEMORRHAGE: Coding = ("50960005", "SCT", "Hemorrhage")
CRANIAL_CAVITY: Coding = ("1101003", "SCT", "Cranial Cavity")
DURA_MATER: Coding = ("18545000", "SCT", "Dura mater")
EXTERNAL: Coding = ("261074009", "SCT", "External")
INTERNAL: Coding = ("260521003", "SCT", "Internal")
CRANIAL_SUBARACHNOID_SPACE: Coding = ("33930006", "SCT", "Cranial Subarachnoid Space")
BRAIN_VENTRICLE: Coding = ("35764002", "SCT", "Brain ventricle")
BRAIN: Coding = ("12738006", "SCT", "Brain")
ARTIFICIAL_INTELLIGENCE: Coding = ("123110", "DCM", "Artificial Intelligence")


@dataclass(frozen=True)
class SegmentCoding:
    """How one ichseg label is described in a DICOM SEG."""

    label: str
    category: Coding
    property_type: Coding
    region: Coding | None = None
    region_modifier: Coding | None = None
    rgb: tuple[int, int, int] = (255, 0, 0)


SEGMENT_CODES: dict[str, SegmentCoding] = {
    "intracranial": SegmentCoding(
        "Intracranial space", ANATOMICAL_STRUCTURE, CRANIAL_CAVITY, rgb=(128, 174, 128)
    ),
    "epidural": SegmentCoding(
        "Epidural hemorrhage",
        MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        HEMORRHAGE,
        DURA_MATER,
        EXTERNAL,
        rgb=(230, 25, 75),
    ),
    "intraparenchymal": SegmentCoding(
        "Intraparenchymal hemorrhage",
        MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        HEMORRHAGE,
        BRAIN,
        rgb=(245, 130, 48),
    ),
    "intraventricular": SegmentCoding(
        "Intraventricular hemorrhage",
        MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        HEMORRHAGE,
        BRAIN_VENTRICLE,
        rgb=(0, 130, 200),
    ),
    "subarachnoid": SegmentCoding(
        "Subarachnoid hemorrhage",
        MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        HEMORRHAGE,
        CRANIAL_SUBARACHNOID_SPACE,
        rgb=(255, 225, 25),
    ),
    "subdural": SegmentCoding(
        "Subdural hemorrhage",
        MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        HEMORRHAGE,
        DURA_MATER,
        INTERNAL,
        rgb=(145, 30, 180),
    ),
}
"""Segment coding per ichseg name: ``"intracranial"`` and the five hemorrhage subtypes."""

SEGMENT_NAMES: tuple[str, ...] = ("intracranial", *SUBTYPES[1:])
"""Segment order in a written SEG (segment number = position + 1 among those present)."""

SEG_SERIES_NUMBER = 901


def coded(coding: Coding):
    """A highdicom ``CodedConcept`` of a (value, scheme, meaning) triple."""
    import highdicom as hd

    value, scheme, meaning = coding
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def segments_from_label_map(
    label_map: np.ndarray,
    intracranial_mask: np.ndarray | None = None,
    codes: Mapping[int, str] = HEMORRHAGE_CODES,
) -> dict[str, np.ndarray]:
    """Binary masks of the intracranial space and of each subtype present in a label map.

    Args:
        label_map: hemorrhage label map ``(z, y, x)`` (0 = none).
        intracranial_mask: optional ``(z, y, x)`` mask of the intracranial space.
        codes: label value -> subtype name.

    Returns:
        ``{name: uint8 mask}`` in ``SEGMENT_NAMES`` order, subtypes only when present.
    """
    label_map = np.asarray(label_map)
    segments: dict[str, np.ndarray] = {}
    if intracranial_mask is not None:
        segments["intracranial"] = (np.asarray(intracranial_mask) != 0).astype(np.uint8)
    for code, name in sorted(codes.items(), key=lambda item: SEGMENT_NAMES.index(item[1])):
        mask = label_map == code
        if mask.any():
            segments[name] = mask.astype(np.uint8)
    return segments


def _segment_description(number: int, name: str, algorithm: Any, algorithm_type: str):
    import highdicom as hd

    coding = SEGMENT_CODES[name]
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=coding.label,
        segmented_property_category=coded(coding.category),
        segmented_property_type=coded(coding.property_type),
        algorithm_type=algorithm_type,
        algorithm_identification=algorithm,
        anatomic_regions=[coded(coding.region)] if coding.region else None,
        display_color=hd.color.CIELabColor.from_rgb(*coding.rgb),
    )
    if coding.region_modifier is not None:
        region = description.AnatomicRegionSequence[0]
        region.AnatomicRegionModifierSequence = [coded(coding.region_modifier)]
    return description


def write_dicom_seg(
    volume: CTVolume,
    segments: Mapping[str, np.ndarray],
    source_files: Sequence[str | Path],
    out_path: str | Path,
    *,
    series_description: str = "ichseg intracranial hemorrhage segmentation",
    manufacturer_model_name: str = "ichseg",
    software_version: str = __version__,
    algorithm_type: str = "AUTOMATIC",
    series_number: int = SEG_SERIES_NUMBER,
    series_instance_uid: str | None = None,
) -> Path:
    """Write a binary DICOM Segmentation of ``volume`` with one segment per mask.

    Args:
        volume: the CT the masks belong to (read from DICOM).
        segments: ``{name: (z, y, x) mask}``; names from ``SEGMENT_CODES`` (``"intracranial"``
            and the hemorrhage subtypes), written in ``SEGMENT_NAMES`` order.
        source_files: the DICOM file of each slice, in the volume's slice order.
        out_path: the ``.dcm`` file to write (atomically).
        series_description: SeriesDescription of the new series.
        manufacturer_model_name: ManufacturerModelName and algorithm name.
        software_version: SoftwareVersions and algorithm version.
        algorithm_type: ``"AUTOMATIC"``, ``"SEMIAUTOMATIC"`` or ``"MANUAL"``.
        series_number: SeriesNumber of the new series.
        series_instance_uid: reuse a series (several SEGs of one study); new UID by default.

    Raises:
        ValueError: no segments, an unknown name, or a mask whose shape differs from the volume.
        InputError: source files that do not match the volume's slices.
    """
    import highdicom as hd

    unknown = sorted(set(segments) - set(SEGMENT_CODES))
    if unknown:
        raise ValueError(f"unknown segment name(s) {unknown}; choose from {list(SEGMENT_NAMES)}")
    names = [name for name in SEGMENT_NAMES if name in segments]
    if not names:
        raise ValueError("no segments to write")
    for name in names:
        if np.shape(segments[name]) != volume.shape:
            raise ValueError(
                f"segment {name!r} has shape {np.shape(segments[name])}, volume {volume.shape}"
            )
    sources = read_source_headers(volume, source_files)
    pixels = np.stack([np.asarray(segments[name]) != 0 for name in names], axis=-1)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=manufacturer_model_name,
        family=coded(ARTIFICIAL_INTELLIGENCE),
        version=software_version,
    )
    descriptions = [
        _segment_description(number, name, algorithm, algorithm_type)
        for number, name in enumerate(names, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ichseg",
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_version,
        device_serial_number="0",
        series_description=series_description,
    )
    with atomic_path(out_path, suffix=".dcm") as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return Path(out_path)


def read_dicom_seg_as_volume_masks(seg_path: str | Path, volume: CTVolume) -> dict[str, np.ndarray]:
    """The segments of a DICOM SEG as masks on ``volume``'s grid.

    Frames are placed by the SOP Instance UID of the source image they reference, so the
    result follows the volume's slice order whatever the SEG's frame order.

    Args:
        seg_path: a DICOM Segmentation (binary or label map) made from ``volume``'s series.
        volume: the CT read from the SEG's source series.

    Returns:
        ``{SegmentLabel: uint8 (z, y, x) mask}``.

    Raises:
        InputError: not a readable SEG, a volume without SOP Instance UIDs, a SEG frame that
            references an instance outside the volume, or a frame size differing from it.
    """
    import highdicom as hd

    seg_path = Path(seg_path)
    if not all(volume.sop_uids):
        raise InputError(volume.source, "volume has no SOPInstanceUID per slice (not DICOM)")
    try:
        seg = hd.seg.segread(seg_path)
    except Exception as error:  # pydicom and highdicom raise many types on bad files
        raise InputError(seg_path, f"not a readable DICOM SEG ({type(error).__name__})") from None
    if seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL:
        raise InputError(seg_path, "fractional segmentations are not supported")
    if (int(seg.Rows), int(seg.Columns)) != volume.shape[1:]:
        raise InputError(seg_path, f"frame size {seg.Rows}x{seg.Columns} differs from volume")
    framed = {
        str(ref.ReferencedSOPInstanceUID)
        for frame in seg.PerFrameFunctionalGroupsSequence
        for derivation in frame.get("DerivationImageSequence", [])
        for ref in derivation.get("SourceImageSequence", [])
    }
    outside = framed - set(volume.sop_uids)
    if outside:
        raise InputError(
            seg_path, f"{len(outside)} frame source(s) are not slices of {volume.source}"
        )
    numbers = list(seg.segment_numbers)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(volume.sop_uids),
        segment_numbers=numbers,
        assert_missing_frames_are_empty=True,
    )
    masks: dict[str, np.ndarray] = {}
    for index, number in enumerate(numbers):
        label = str(seg.get_segment_description(number).SegmentLabel)
        key = label if label not in masks else f"{label} ({number})"
        masks[key] = (pixels[..., index] != 0).astype(np.uint8)
    return masks
