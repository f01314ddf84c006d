"""Batched probabilities from a classifier: the one forward path of training, evaluation,
prediction and the bundle.

bf16 autocast covers the backbone (1.3-2x faster on CPU, no loss scaling needed unlike fp16);
the classifier head runs in fp32 (see ``ClassifierModel.forward``), so logits are fp32.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np


def autocast(device: Any, enabled: bool):
    """bf16 autocast on CPU and CUDA."""
    import torch

    device_type = device.type if hasattr(device, "type") else str(device).split(":")[0]
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=enabled)


def probabilities(logits: Any, mode: str) -> Any:
    """Sigmoid (multilabel) or softmax (multiclass) of fp32 logits."""
    import torch

    logits = logits.float()
    return torch.sigmoid(logits) if mode == "multilabel" else torch.softmax(logits, dim=1)


def uint8_batches(images: np.ndarray, batch_size: int) -> Iterator[Any]:
    """Float tensors in [0, 1] from a uint8 ``(N, C, H, W)`` array, ``batch_size`` at a time."""
    import torch

    for start in range(0, len(images), batch_size):
        chunk = np.ascontiguousarray(images[start : start + batch_size])
        yield torch.from_numpy(chunk).float().div_(255.0)


def predict_probabilities(
    model: Any, batches: Iterable[Any], device: Any, amp: bool, mode: str
) -> np.ndarray:
    """Probabilities ``(N, K)`` float32 for image batches (tensors, or ``(images, _)`` pairs).

    Args:
        model: a classifier in any memory format; evaluated in ``eval()`` mode.
        batches: float image tensors ``(B, C, H, W)`` in [0, 1], or DataLoader pairs.
        device: where to run.
        amp: bf16 autocast for the backbone.
        mode: ``"multilabel"`` or ``"multiclass"``.
    """
    import torch

    model.eval()
    outputs = []
    with torch.inference_mode():
        for batch in batches:
            images = batch[0] if isinstance(batch, list | tuple) else batch
            images = images.to(device, memory_format=torch.channels_last, non_blocking=True)
            with autocast(device, amp):
                logits = model(images)
            outputs.append(probabilities(logits, mode).cpu().numpy())
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outputs).astype(np.float32, copy=False)
