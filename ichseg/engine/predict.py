"""Batched probabilities from a classifier: the one forward path of evaluation, prediction and
the bundle, and the form a classifier takes for inference (:func:`prepare_for_inference`).

bf16 autocast covers the backbone where bf16 is native (CUDA, CPUs with AVX-512 BF16 or AMX:
1.3-2x faster than fp32 there, no loss scaling needed unlike fp16); the classifier head runs in
fp32 (see ``ClassifierModel.forward``), so logits are fp32. On a CPU without bf16 instructions
autocast would emulate bf16 (measured 5x slower than fp32 for SE-ResNet50 on an AVX2-only
AMD EPYC), so inference there runs in fp32.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np


def autocast(device: Any, enabled: bool):
    """bf16 autocast on CPU and CUDA."""
    import torch

    device_type = device.type if hasattr(device, "type") else str(device).split(":")[0]
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=enabled)


def bf16_is_native(device: Any) -> bool:
    """Whether bf16 arithmetic runs on hardware instructions on ``device``.

    CUDA devices that support bf16; CPUs whose oneDNN build reports bf16 support (AVX-512 BF16,
    AMX). Elsewhere bf16 is emulated: slower than fp32 and less precise.
    """
    import torch

    device_type = device.type if hasattr(device, "type") else str(device).split(":")[0]
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


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
        amp: bf16 autocast for the backbone, where bf16 is native (:func:`bf16_is_native`).
        mode: ``"multilabel"`` or ``"multiclass"``.
    """
    import torch

    amp = amp and bf16_is_native(device)
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


COMPILE_ENV = "ICHSEG_COMPILE"
"""``1``/``0``: compile classifier inference or not, whatever the default."""


def compile_by_default(device: Any) -> bool:
    """Whether :func:`prepare_for_inference` compiles when not told: ``ICHSEG_COMPILE`` when set,
    else False (see ``benchmarks/README.md``: compiling pays only after many studies)."""
    import logging

    text = os.environ.get(COMPILE_ENV, "").strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    logging.getLogger(__name__).warning("ignoring %s=%r: not 0 or 1", COMPILE_ENV, text)
    return False


def prepare_for_inference(
    model: Any, device: Any, compile: bool | None = None, batch_size: int = 32
) -> Any:
    """Put a classifier in its fastest measured form for inference; returns the same module.

    On ``device``, in eval mode and channels_last (faster convolution kernels on CPU and GPU).
    With ``compile``, calls without gradients (``predict_probabilities``, which runs under
    ``torch.inference_mode``) go through ``torch.compile`` (inductor with frozen weights, so
    BatchNorm is folded into the convolutions and elementwise operators are fused), each batch
    padded to ``batch_size`` so one compiled graph serves every batch; calls with gradients
    (Grad-CAM) and larger batches run the eager module, hooks and all. The first compiled call
    compiles (tens of seconds on a CPU).

    Args:
        model: the classifier.
        device: where it runs.
        compile: compile inference calls (default: :func:`compile_by_default`).
        batch_size: the padded batch of the compiled graph.
    """
    import torch

    model.to(device, memory_format=torch.channels_last).eval()
    if compile is None:
        compile = compile_by_default(device)
    if compile and not hasattr(model, "compiled_forward"):
        _compile_inference(model, batch_size)
    return model


def _compile_inference(model: Any, batch_size: int) -> None:
    import torch

    eager = model.forward  # the bound eager forward, still used for gradients and Grad-CAM
    compiled = torch.compile(eager, dynamic=False, options={"freezing": True})

    def forward(images, *args, **kwargs):
        count = images.shape[0]
        if args or kwargs or torch.is_grad_enabled() or count > batch_size:
            return eager(images, *args, **kwargs)
        if count < batch_size:
            padding = images.new_zeros((batch_size - count, *images.shape[1:]))
            images = torch.cat([images, padding]).contiguous(memory_format=torch.channels_last)
        return compiled(images)[:count]

    # Instance attributes: the module, its weights and its state dict stay as they are.
    model.compiled_forward = compiled
    model.forward = forward
