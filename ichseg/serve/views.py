"""Pictures for the web page: windowed slices, mask overlays and Grad-CAM heat maps as PNGs.

Everything is at the slice's native pixel grid: the Grad-CAM map computed at the model's input
size is mapped back through the preprocessor's crop box with
:func:`ichseg.inference.native_heatmap`, as in the ``predict`` overlays. Images travel as
``data:image/png;base64`` URLs, so the page needs no second request and the server keeps
nothing after answering.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.volume import CTVolume

BRAIN_WINDOW = (40.0, 80.0)
"""Centre and width (HU) of the displayed window."""

MASK_COLOUR = (0, 230, 118)
_MASK_FILL_ALPHA = 50
_MASK_EDGE_ALPHA = 230


def png_data_url(pixels: np.ndarray) -> str:
    """A ``data:`` URL of a uint8 gray ``(H, W)``, RGB or RGBA ``(H, W, 3|4)`` picture."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def windowed_slice(hu: np.ndarray) -> np.ndarray:
    """uint8 gray picture of one HU slice in the brain window."""
    from ichseg.preprocess.windowing import window

    return np.rint(window(hu, *BRAIN_WINDOW) * 255.0).astype(np.uint8)


def mask_overlay(mask: np.ndarray) -> np.ndarray:
    """RGBA ``(H, W, 4)``: a faint fill inside the mask and a strong edge, clear elsewhere."""
    from scipy.ndimage import binary_erosion

    inside = np.asarray(mask, dtype=bool)
    edge = inside & ~binary_erosion(inside, border_value=0)
    rgba = np.zeros((*inside.shape, 4), dtype=np.uint8)
    rgba[inside, :3] = MASK_COLOUR
    rgba[inside, 3] = _MASK_FILL_ALPHA
    rgba[edge, 3] = _MASK_EDGE_ALPHA
    return rgba


def jet_overlay(heatmap: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """RGBA ``(H, W, 4)`` jet colours of a [0, 1] heat map; opaque in ``region``, clear outside.

    The page sets the overlay's opacity, so the colours here stay at full strength.
    """
    from matplotlib import colormaps

    table = np.rint(colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)
    index = np.rint(np.clip(heatmap, 0.0, 1.0) * 255).astype(np.intp)
    rgba = np.empty((*heatmap.shape, 4), dtype=np.uint8)
    rgba[..., :3] = table[index]
    rgba[..., 3] = 255 if region is None else np.where(region, 255, 0)
    return rgba


def gradcam_class(predictor: Any) -> int | None:
    """The logit the heat maps explain: ``any`` for multilabel models, else the top class."""
    return 0 if predictor.config.task.mode == "multilabel" else None


def volume_views(
    predictor: Any, volume: CTVolume, prediction: Any, batch_size: int = 16
) -> dict[str, Any]:
    """Every slice of one volume as a windowed image, mask overlay and (scored) Grad-CAM overlay.

    Args:
        predictor: the loaded model (:func:`ichseg.inference.load_predictor`).
        volume: the CT.
        prediction: :func:`ichseg.inference.predict_volume` of it.
        batch_size: slices per Grad-CAM pass (bounds memory on long series).
    """
    from ichseg.inference.gradcam import gradcam_maps, input_crop_box, native_heatmap

    native = volume.shape[1:]
    box = input_crop_box(predictor, volume, prediction.mask)
    region_shape = (box[1] - box[0], box[3] - box[2]) if box else native
    region = None
    if box is not None:
        region = np.zeros(native, dtype=bool)
        region[box[0] : box[1], box[2] : box[3]] = True
    scored = [int(z) for z in np.flatnonzero(prediction.scored)]
    heat: dict[int, np.ndarray] = {}
    for start in range(0, len(scored), batch_size):
        chunk = scored[start : start + batch_size]
        maps = gradcam_maps(predictor, prediction.images[chunk], gradcam_class(predictor))
        for z, heatmap in zip(chunk, maps, strict=True):
            heat[z] = native_heatmap(heatmap, region_shape, box, native)
    slices = []
    for z in range(volume.num_slices):
        slices.append(
            {
                "index": z,
                "z_mm": round(float(volume.slice_positions[z]), 3),
                "scored": z in heat,
                "image": png_data_url(windowed_slice(volume.hu[z])),
                "mask": png_data_url(mask_overlay(prediction.mask[z])),
                "heatmap": png_data_url(jet_overlay(heat[z], region)) if z in heat else None,
            }
        )
    _, row_mm, column_mm = volume.spacing
    return {
        "source": volume.source,
        "series_uid": volume.series_uid,
        "rows": int(native[0]),
        "columns": int(native[1]),
        "pixel_spacing_mm": [round(row_mm, 4), round(column_mm, 4)],
        "slices": slices,
    }


def picture_views(predictor: Any, path: Path) -> dict[str, Any]:
    """One windowed PNG/JPG (models trained on pictures) with its Grad-CAM at native size."""
    from ichseg.inference.gradcam import gradcam_maps, native_heatmap
    from ichseg.io.images import load_image

    shown = load_image(path, channels=3)  # the picture as the model reads it (EXIF-oriented)
    native = shown.shape[1:]
    model_input = predictor.preprocessor.image(path)
    heatmap = gradcam_maps(predictor, model_input[None], gradcam_class(predictor))[0]
    full = native_heatmap(heatmap, native, None, native)
    picture = np.rint(np.moveaxis(shown, 0, -1) * 255.0).astype(np.uint8)
    return {
        "source": str(path),
        "series_uid": "",
        "rows": int(native[0]),
        "columns": int(native[1]),
        "pixel_spacing_mm": [1.0, 1.0],
        "slices": [
            {
                "index": 0,
                "z_mm": 0.0,
                "scored": True,
                "image": png_data_url(picture),
                "mask": None,
                "heatmap": png_data_url(jet_overlay(full)),
            }
        ],
    }
