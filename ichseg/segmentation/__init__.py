"""Intracranial and hemorrhage segmentation: a classical method, MONAI U-Nets, the masking
step, and the evaluation of hemorrhage label maps.

The mask is the intracranial space (inside the skull's inner table), so epidural and subdural
blood against the bone is kept. Heavy libraries (torch, MONAI, matplotlib) load on first use.
"""

from ichseg.segmentation.api import SegmentResult, segment_folder, write_preview
from ichseg.segmentation.classical import classical_intracranial_mask
from ichseg.segmentation.evaluation import evaluate_hemorrhage_segmenter
from ichseg.segmentation.masking import (
    MaskingConfig,
    apply_mask,
    crop_to_mask,
    dilate_mask,
    make_masker,
    mask_bbox,
)
from ichseg.segmentation.training import SegmentationCase, train_segmenter
from ichseg.segmentation.unet import (
    Segmenter,
    SegmenterConfig,
    build_unet,
    load_segmenter,
    postprocess_label_map,
)

__all__ = [
    "MaskingConfig",
    "SegmentResult",
    "SegmentationCase",
    "Segmenter",
    "SegmenterConfig",
    "apply_mask",
    "build_unet",
    "classical_intracranial_mask",
    "crop_to_mask",
    "dilate_mask",
    "evaluate_hemorrhage_segmenter",
    "load_segmenter",
    "make_masker",
    "mask_bbox",
    "postprocess_label_map",
    "segment_folder",
    "train_segmenter",
    "write_preview",
]
