"""NIfTI volumes (.nii, .nii.gz) read with nibabel, values taken as HU.

A NIfTI carries no patient identity. A BIDS-style JSON sidecar ``<stem>.json`` beside the file
may give it (keys ``PatientID`` and optionally ``StudyInstanceUID``); without one the file stem
is used, with a warning and the ``patient_id_fallback`` quality flag.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.errors import InputError, one_line
from ichseg.volume import CTVolume

# A CT in HU has air near -1000; an image whose minimum is at or above zero while it reaches
# bone-like values most likely holds raw stored values without the rescale intercept.
_RAW_VALUE_HINT = (0.0, 2000.0)
# |det| of the 3x3 part relative to the product of its column lengths (1 for orthogonal axes);
# below this the axes are (nearly) collinear and voxel positions are meaningless.
_MIN_AFFINE_ORTHOGONALITY = 1e-3


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_nifti(path: str | Path, patient_id: str | None = None) -> CTVolume:
    """Read a 3D NIfTI CT.

    The affine is kept as stored (``img.affine``: sform, else qform, else pixdim only, which is
    flagged ``orientation_assumed``). A 4D image with a single volume is squeezed; any other 4D
    image, images holding NaN or Inf, and affines that are not finite or not invertible are
    refused.

    Args:
        path: the ``.nii`` / ``.nii.gz`` file.
        patient_id: the patient this volume belongs to. Default: ``PatientID`` of the sidecar
            ``<stem>.json``, else the file stem (flagged ``patient_id_fallback``).

    Raises:
        InputError: unreadable file or sidecar, not 3D, non-finite values, or a degenerate
            affine.
    """
    import nibabel as nib

    path = Path(path)
    try:
        image = nib.load(str(path))
    except Exception as error:
        raise InputError(path, f"not a readable NIfTI file ({one_line(error)})") from None
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(path, f"expected a 3D volume, got shape {tuple(image.shape)}")
    if min(shape) < 1:
        raise InputError(path, f"empty volume of shape {tuple(image.shape)}")
    if _codes(image) == (0, 0):
        _check_stored_pixdim(path, image)
    affine = np.asarray(image.affine, dtype=np.float64)
    _check_affine(path, affine)
    try:
        data = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except Exception as error:
        raise InputError(path, f"cannot read voxel data ({one_line(error)})") from None
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise InputError(path, f"{bad} voxel(s) are NaN or Inf")
    _refuse_label_map(path, image, data)
    warnings: list[str] = []
    flags: list[str] = []
    if data.min() >= _RAW_VALUE_HINT[0] and data.max() > _RAW_VALUE_HINT[1]:
        flags.append("hu_range_suspect")
        warnings.append(
            f"values range {data.min():.0f}..{data.max():.0f}: looks like raw stored values, not HU"
        )
    if _codes(image) == (0, 0):
        flags.append("orientation_assumed")
        warnings.append("no sform or qform: orientation and origin assumed from pixdim only")
    hu = np.ascontiguousarray(data.transpose(2, 1, 0))
    z_axis = affine[:3, 2]
    # Positions along the slice plane's normal, as the DICOM reader measures them: with a
    # gantry tilt the slice axis is sheared, and distances along it overstate the spacing.
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    normal = normal / np.linalg.norm(normal)
    if float(np.dot(normal, z_axis)) < 0:
        normal = -normal
    origins = affine[:3, 3][None, :] + np.arange(hu.shape[0])[:, None] * z_axis[None, :]
    positions = origins @ normal
    # A stable id per file so outputs and splits can refer to a NIfTI like to a DICOM series.
    series_uid = "nifti-" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    stem = nifti_stem(path)
    identity = _identity(path, stem, patient_id, warnings, flags)
    return CTVolume(
        hu=hu,
        affine=affine,
        source=str(path),
        series_uid=series_uid,
        slice_positions=positions,
        metadata={**identity, "SeriesInstanceUID": series_uid},
        warnings=warnings,
        quality_flags=flags,
    )


def _codes(image) -> tuple[int, int]:
    header = image.header
    try:
        return int(header["sform_code"]), int(header["qform_code"])
    except (KeyError, ValueError, TypeError):  # formats without codes (Analyze)
        return (-1, -1)


def _check_stored_pixdim(path: Path, image) -> None:
    """Refuse a zero/negative/non-finite voxel size when no sform or qform is there to say it.

    nibabel replaces such pixdim values by 1 mm while loading, so the header is read again as
    stored, without that fix.
    """
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as handle:
            stored = type(image.header).from_fileobj(handle, check=False)
        pixdim = np.asarray(stored["pixdim"][1:4], dtype=np.float64)
    except Exception as error:
        raise InputError(path, f"not a readable NIfTI header ({one_line(error)})") from None
    if not np.isfinite(pixdim).all() or (pixdim <= 0).any():
        values = ", ".join(f"{v:g}" for v in pixdim)
        raise InputError(path, f"no sform or qform, and pixdim ({values}) is not a voxel size")


def _check_affine(path: Path, affine: np.ndarray) -> None:
    """Refuse affines that cannot place voxels: non-finite, a zero axis, or singular."""
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise InputError(path, "affine holds NaN or Inf: voxel positions are undefined")
    lengths = np.linalg.norm(affine[:3, :3], axis=0)
    if (lengths <= 0).any():
        axes = ", ".join("xyz"[i] for i in np.flatnonzero(lengths <= 0))
        raise InputError(path, f"affine has zero voxel size along {axes} (pixdim or sform 0)")
    orthogonality = abs(float(np.linalg.det(affine[:3, :3]))) / float(np.prod(lengths))
    if orthogonality < _MIN_AFFINE_ORTHOGONALITY:
        raise InputError(path, "affine is singular (voxel axes are collinear)")


def sidecar_path(path: Path) -> Path:
    """The BIDS-style JSON sidecar of a NIfTI file: ``<stem>.json`` in the same folder."""
    return path.with_name(nifti_stem(path) + ".json")


def _identity(
    path: Path, stem: str, patient_id: str | None, warnings: list[str], flags: list[str]
) -> dict[str, str]:
    """PatientID and StudyInstanceUID: from the caller, the sidecar, or the file stem."""
    sidecar = sidecar_path(path)
    fields = _read_sidecar(sidecar) if sidecar.is_file() else {}
    study = fields.get("StudyInstanceUID", "")
    if patient_id:
        return {"PatientID": str(patient_id), "StudyInstanceUID": study or stem}
    if fields.get("PatientID"):
        return {"PatientID": fields["PatientID"], "StudyInstanceUID": study or stem}
    where = f"sidecar {sidecar.name} has no PatientID" if fields else f"no sidecar {sidecar.name}"
    flags.append("patient_id_fallback")
    warnings.append(
        f"PatientID unknown ({where}): file stem {stem!r} used as patient id, so a "
        "patient-level split treats each file as its own patient"
    )
    return {"PatientID": stem, "StudyInstanceUID": study or stem}


def _read_sidecar(sidecar: Path) -> dict[str, str]:
    try:
        payload: Any = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(sidecar, f"cannot read sidecar ({one_line(error)})") from None
    except json.JSONDecodeError as error:
        reason = f"sidecar is not valid JSON ({error.msg}, line {error.lineno})"
        raise InputError(sidecar, reason) from None
    if not isinstance(payload, dict):
        raise InputError(sidecar, "sidecar must hold a JSON object")
    fields = {}
    for key in ("PatientID", "StudyInstanceUID"):
        value = payload.get(key)
        if value is None:
            continue
        if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
            raise InputError(sidecar, f"sidecar {key} must be a non-empty string, got {value!r}")
        fields[key] = str(value).strip()
    return fields


# A CT has thousands of distinct values; a mask or label map stored as integers has a handful.
_LABEL_MAP_MAX_VALUES = 16


def _refuse_label_map(path: Path, image, data: np.ndarray) -> None:
    if not np.issubdtype(image.get_data_dtype(), np.integer):
        return
    sample = data[:: max(1, data.shape[0] // 8)]
    values = np.unique(sample)
    if len(values) <= _LABEL_MAP_MAX_VALUES and values.min() >= 0 and values.max() < 256:
        raise InputError(
            path, f"looks like a mask or label map ({len(values)} distinct values), not a CT"
        )


def write_nifti_atomic(image, path: str | Path) -> Path:
    """Save a nibabel image through a temporary file and a rename."""
    import nibabel as nib

    from ichseg.fileio import atomic_path

    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(image, str(tmp))
    return path
