"""Training data for the U-Net segmenters, from a YAML config.

Sources: phantom studies (ground-truth masks and hemorrhage label maps), NIfTI CTs with
reference masks or label maps, or any CT (DICOM or NIfTI) with classical pseudo-labels of the
intracranial space, for real data that has no masks. The packaged hemorrhage recipe is
``HEMORRHAGE_RECIPE``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from ichseg.config import PACKAGE_CONFIGS, StrictModel, deep_merge, load_raw, parse_override
from ichseg.errors import ConfigError, InputError
from ichseg.options import format_validation_error

HEMORRHAGE_RECIPE = PACKAGE_CONFIGS / "segmenter" / "hemorrhage.yaml"
"""The packaged recipe of the hemorrhage label-map U-Net (``train-segmenter --target
hemorrhage`` without ``--config``)."""


class SegmenterPhantomData(StrictModel):
    studies: int = Field(20, ge=2)
    seed: int = 1000
    size: int = Field(128, ge=32)
    slices: int = Field(24, ge=1)
    # Share of studies without blood; None keeps the phantom's default.
    negative_fraction: float | None = Field(None, ge=0.0, le=1.0)


class SegmenterDataConfig(StrictModel):
    source: Literal["phantom", "nifti", "pseudo"] = "phantom"
    phantom: SegmenterPhantomData = SegmenterPhantomData()
    images: Path | None = None  # CT folder (NIfTI for "nifti"; DICOM/NIfTI for "pseudo")
    masks: Path | None = None  # reference masks: <stem>_mask.nii.gz or the image's file name


class SegmenterRunConfig(StrictModel):
    data: SegmenterDataConfig = SegmenterDataConfig()
    model: dict = {}

    def segmenter_config(self):
        from pydantic import ValidationError

        from ichseg.segmentation.unet import SegmenterConfig

        try:
            return SegmenterConfig.model_validate(self.model)
        except ValidationError as error:
            raise ConfigError(
                format_validation_error(error, "segmenter config", "model.")
            ) from None


def load_segmenter_run(path: str | Path | None, overrides: list[str] | None = None):
    """Validate a segmenter training YAML (``data`` + ``model`` sections) with overrides."""
    from pydantic import ValidationError

    data = load_raw(path) if path else {}
    for override in overrides or []:
        data = deep_merge(data, parse_override(override))
    try:
        run = SegmenterRunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, str(path or "config"))) from None
    run.segmenter_config()  # fail early on bad model keys
    return run


def training_cases(data: SegmenterDataConfig, target: str = "intracranial") -> list:
    """Training cases (HU, target, patient) for the U-Net trainer.

    Args:
        data: where the volumes and their reference masks come from.
        target: ``intracranial`` (masks) or ``hemorrhage`` (label maps with the codes of
            :data:`ichseg.volume.HEMORRHAGE_CODES`; not available from pseudo-labels).
    """
    from ichseg.segmentation.cases import SegmentationCase

    if data.source == "phantom":
        from ichseg.phantom import PhantomConfig, generate_study

        spec = data.phantom
        extra = (
            {} if spec.negative_fraction is None else {"negative_fraction": spec.negative_fraction}
        )
        config = PhantomConfig(size=spec.size, num_slices=spec.slices, **extra)
        studies = (generate_study(spec.seed + i, config) for i in range(spec.studies))
        return [
            SegmentationCase(
                s.hu,
                s.intracranial_mask if target == "intracranial" else s.hemorrhage,
                s.patient_id,
            )
            for s in studies
        ]
    if data.images is None:
        raise ConfigError(f"data.source '{data.source}' needs data.images")
    from ichseg.io.loader import load_volumes

    volumes, _ = load_volumes(data.images)
    if not volumes:
        raise InputError(data.images, "no CT volume found for segmenter training")
    if data.source == "pseudo":
        if target != "intracranial":
            raise ConfigError("pseudo-labels exist only for the intracranial target")
        from ichseg.segmentation.classical import classical_intracranial_mask

        return [
            SegmentationCase(v.hu, classical_intracranial_mask(v.hu, v.spacing), v.patient_id)
            for v in volumes
        ]
    if data.masks is None:
        raise ConfigError("data.source 'nifti' needs data.masks")
    import nibabel as nib

    from ichseg.io.nifti import nifti_stem

    cases = []
    for volume in volumes:
        source = Path(volume.source)
        candidates = [data.masks / f"{nifti_stem(source)}_mask.nii.gz", data.masks / source.name]
        if target == "hemorrhage":
            candidates.insert(0, data.masks / f"{nifti_stem(source)}_hemorrhage.nii.gz")
        mask_path = next((c for c in candidates if c.exists()), None)
        if mask_path is None:
            raise InputError(source, f"no reference mask in {data.masks}")
        labels = np.asarray(nib.load(str(mask_path)).dataobj).transpose(2, 1, 0)
        if labels.shape != volume.shape:
            raise InputError(mask_path, f"mask shape {labels.shape} differs from CT {volume.shape}")
        labels = labels > 0 if target == "intracranial" else np.rint(labels)
        cases.append(SegmentationCase(volume.hu, labels.astype(np.uint8), volume.patient_id))
    return cases
