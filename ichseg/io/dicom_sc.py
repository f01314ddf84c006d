"""A colour image (e.g. a Grad-CAM overlay of one slice) as a DICOM Secondary Capture.

The image joins the source slice's patient and study (copied from its header) in a series of
its own, names the source slice in the Source Image Sequence, and states which way its rows and
columns run (Patient Orientation, from the source's ImageOrientationPatient) and its pixel
spacing when the overlay covers the slice's field of view.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ichseg.errors import InputError
from ichseg.fileio import atomic_path

SC_SERIES_NUMBER = 903
# LPS axes: the letter for the positive and the negative direction of each.
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))
_MIN_COSINE = 1e-4


def orientation_letters(direction: np.ndarray | list[float]) -> str:
    """Patient Orientation letters of an LPS direction, dominant component first."""
    direction = np.asarray(direction, dtype=np.float64)
    order = np.argsort(-np.abs(direction), kind="stable")
    return "".join(
        _AXIS_LETTERS[axis][0 if direction[axis] > 0 else 1]
        for axis in order
        if abs(direction[axis]) > _MIN_COSINE
    )


def write_secondary_capture(
    rgb_uint8_image: np.ndarray,
    source_file: str | Path,
    out_path: str | Path,
    *,
    series_description: str = "ichseg Grad-CAM overlay",
    derivation_description: str = "class activation map blended over the CT slice",
    series_number: int = SC_SERIES_NUMBER,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
    manufacturer_model_name: str = "ichseg",
) -> Path:
    """Write an RGB image as a Secondary Capture in the source slice's patient and study.

    Args:
        rgb_uint8_image: ``(rows, columns, 3)`` uint8 image whose rows and columns run like the
            source slice's (it may be resized: the pixel spacing is scaled to match).
        source_file: the DICOM slice the image was made from.
        out_path: the ``.dcm`` file to write (atomically).
        series_description: SeriesDescription of the new series.
        derivation_description: DerivationDescription (how the image was made).
        series_number: SeriesNumber of the new series.
        series_instance_uid: reuse a series (several overlays of one study); new UID by default.
        instance_number: InstanceNumber within that series.
        manufacturer_model_name: ManufacturerModelName.

    Raises:
        ValueError: the image is not ``(rows, columns, 3)`` uint8.
        InputError: the source file is not a readable DICOM image.
    """
    import highdicom as hd
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian

    image = np.asarray(rgb_uint8_image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected a (rows, columns, 3) uint8 image, got {image.shape} {image.dtype}"
        )
    try:
        source = pydicom.dcmread(source_file, stop_before_pixels=True)
    except Exception as error:  # pydicom raises many types on bad files
        raise InputError(
            source_file, f"not a readable DICOM file ({type(error).__name__})"
        ) from None
    if "SOPInstanceUID" not in source or "StudyInstanceUID" not in source:
        raise InputError(source_file, "no SOPInstanceUID or StudyInstanceUID")

    orientation = None
    if "ImageOrientationPatient" in source:
        iop = np.asarray(source.ImageOrientationPatient, dtype=np.float64)
        orientation = (orientation_letters(iop[:3]), orientation_letters(iop[3:]))
    spacing = None
    if "PixelSpacing" in source and source.get("Rows") and source.get("Columns"):
        row_spacing, column_spacing = (float(v) for v in source.PixelSpacing)
        spacing = (
            row_spacing * int(source.Rows) / image.shape[0],
            column_spacing * int(source.Columns) / image.shape[1],
        )

    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=image,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer="ichseg",
        pixel_spacing=spacing,
        patient_orientation=orientation,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description,
        manufacturer_model_name=manufacturer_model_name,
    )
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    capture.SourceImageSequence = [reference]
    capture.ImageType = ["DERIVED", "SECONDARY"]
    capture.DerivationDescription = derivation_description
    with atomic_path(out_path, suffix=".dcm") as tmp:
        capture.save_as(tmp, enforce_file_format=True)
    return Path(out_path)
