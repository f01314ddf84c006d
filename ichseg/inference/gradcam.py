"""Grad-CAM of a classifier's input, mapped back onto the native slice: maps, overlays, files.

Overlays are written as PNG pictures and/or DICOM Secondary Captures in the source study.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ichseg.fileio import new_figure, save_figure
from ichseg.inference.models import Predictor, VolumePrediction
from ichseg.volume import CTVolume

GRADCAM_ALPHA = 0.35


def gradcam_maps(predictor: Predictor, images: np.ndarray, class_index: int | None) -> np.ndarray:
    """Grad-CAM (MONAI) heat maps ``(N, S, S)`` in [0, 1] at the model's input size.

    For a sequence model the maps explain its backbone's own slice classifier (the part that
    sees pixels), not the sequence head's series-aware score.

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
    box = input_crop_box(predictor, volume, prediction.mask)
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


def input_crop_box(predictor: Predictor, volume: CTVolume, mask: np.ndarray | None):
    """The crop box ``(y0, y1, x0, x1)`` the model's preprocessor cut from each slice, or None
    when it does not crop: where a heat map at the input size belongs on the native slice.

    Args:
        predictor: the loaded model (its preprocessor decides the box).
        volume: the CT.
        mask: the intracranial mask the input was prepared with (``VolumePrediction.mask``).
    """
    return predictor.preprocessor.crop_box(volume, mask)
