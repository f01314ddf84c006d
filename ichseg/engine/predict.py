"""Batched probabilities from a classifier: the one forward path of evaluation, prediction and
the bundle, and the form a classifier takes for inference (:func:`prepare_for_inference`).

bf16 autocast covers the backbone where it is faster than fp32 (CUDA with bf16, CPUs with AMX,
AMD CPUs with AVX-512 BF16: 1.2-2x faster there, no loss scaling needed unlike fp16); the
classifier head runs in fp32 (see ``ClassifierModel.forward``), so logits are fp32. Elsewhere the
model runs in fp32: on a CPU without bf16 instructions autocast emulates bf16 (measured 5x slower
than fp32 for SE-ResNet50 on an AVX2-only AMD EPYC), and on an Intel CPU with AVX-512 BF16 but no
AMX it was still slower than fp32 for training and for inference in ``predict``'s batches
(:func:`bf16_autocast_pays`).

Test-time augmentation (:class:`TestTimeAugmentation`) lives here too, so evaluation and
prediction average the same views the same way: probabilities for a classifier
(:func:`predict_probabilities`), pooled backbone features for a sequence head
(:func:`predict_features`). A :class:`ForwardTimer` splits the forward time into the plain view
and the extra views, which is the runtime TTA adds.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TestTimeAugmentation:
    """Views of each input averaged at test time.

    Attributes:
        flip: add the horizontal (left-right) mirror image.
        shift: when positive, add four copies shifted by ``shift`` pixels up, down, left and
            right (zero fill; no wrap-around).
    """

    __test__ = False  # not a pytest test class despite its name

    flip: bool = True
    shift: int = 0

    def __post_init__(self) -> None:
        if self.shift < 0:
            raise ValueError(f"TTA shift must be >= 0 pixels, got {self.shift}")

    @property
    def enabled(self) -> bool:
        return self.flip or self.shift > 0

    @property
    def name(self) -> str:
        """``none``, ``flip``, ``shift4``, ``flip-shift4``: names the files fitted with it."""
        parts = (["flip"] if self.flip else []) + ([f"shift{self.shift}"] if self.shift else [])
        return "-".join(parts) or "none"

    def views(self) -> list[tuple[bool, int, int]]:
        """``(flip, dy, dx)`` of every view, the identity first."""
        views = [(False, 0, 0)]
        if self.flip:
            views.append((True, 0, 0))
        if self.shift:
            s = self.shift
            views += [(False, -s, 0), (False, s, 0), (False, 0, -s), (False, 0, s)]
        return views

    def to_dict(self) -> dict[str, Any]:
        views = len(self.views())
        return {"name": self.name, "flip": self.flip, "shift": self.shift, "views": views}


def make_tta(flip: bool = False, shift: int = 0) -> TestTimeAugmentation | None:
    """The TTA for command-line switches, or None when both are off."""
    tta = TestTimeAugmentation(flip=flip, shift=shift)
    return tta if tta.enabled else None


def shift_images(images: Any, dy: int, dx: int) -> Any:
    """``(B, C, H, W)`` images moved by ``dy`` rows and ``dx`` columns, zero filled."""
    import torch

    out = torch.zeros_like(images)
    h, w = images.shape[-2:]
    if abs(dy) >= h or abs(dx) >= w:
        return out
    src_y = slice(max(0, -dy), h - max(0, dy))
    dst_y = slice(max(0, dy), h - max(0, -dy))
    src_x = slice(max(0, -dx), w - max(0, dx))
    dst_x = slice(max(0, dx), w - max(0, -dx))
    out[..., dst_y, dst_x] = images[..., src_y, src_x]
    return out


def view_of(images: Any, view: tuple[bool, int, int]) -> Any:
    """One TTA view of a batch (see :meth:`TestTimeAugmentation.views`)."""
    flip, dy, dx = view
    if flip:
        images = images.flip(-1)
    if dy or dx:
        images = shift_images(images, dy, dx)
    return images


@dataclass
class ForwardTimer:
    """Seconds spent in forward passes: the plain view, and the views TTA adds."""

    plain_s: float = 0.0
    extra_s: float = 0.0
    views: int = 1

    @property
    def added_fraction(self) -> float:
        """Extra time over the plain forward passes (0.5 = 50 % slower)."""
        return self.extra_s / self.plain_s if self.plain_s > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "views": self.views,
            "forward_plain_s": round(self.plain_s, 4),
            "forward_tta_added_s": round(self.extra_s, 4),
            "tta_added_fraction": (round(self.added_fraction, 4) if self.plain_s > 0 else None),
        }


def _synchronize(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def _averaged(
    forward: Callable[[Any], Any],
    batches: Iterable[Any],
    device: Any,
    tta: TestTimeAugmentation | None,
    timer: ForwardTimer | None,
) -> np.ndarray:
    """``forward`` of every batch, averaged over the TTA views, as float32 numpy."""
    import torch

    views = tta.views() if tta is not None else [(False, 0, 0)]
    if timer is not None:
        timer.views = max(timer.views, len(views))
    outputs = []
    with torch.inference_mode():
        for batch in batches:
            images = batch[0] if isinstance(batch, list | tuple) else batch
            images = images.to(device, memory_format=torch.channels_last, non_blocking=True)
            total = None
            for position, view in enumerate(views):
                started = time.perf_counter()
                value = forward(view_of(images, view)).float()
                total = value if total is None else total + value
                if timer is not None:
                    _synchronize(device)
                    spent = time.perf_counter() - started
                    if position == 0:
                        timer.plain_s += spent
                    else:
                        timer.extra_s += spent
            outputs.append((total / len(views)).cpu().numpy())
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outputs).astype(np.float32, copy=False)


def autocast(device: Any, enabled: bool):
    """bf16 autocast on CPU and CUDA, where it is faster than fp32 (:func:`bf16_autocast_pays`).

    Elsewhere ``enabled`` is ignored and the model runs in fp32 (logged once per process): a CPU
    with AVX2 only emulates bf16 (a ResNet-50 training step 9x and a U-Net epoch 10x slower
    than fp32 on a 2-core AMD EPYC), and an Intel one with AVX-512 BF16 but no AMX trained
    ResNet-18, ResNet-50, SE-ResNet50 and VGG16 at 0.7-0.97x their fp32 speed, never faster.
    """
    import torch

    device_type = _device_type(device)
    if enabled and not bf16_autocast_pays(device_type):
        _note_fp32_fallback(device_type)
        enabled = False
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=enabled)


def _device_type(device: Any) -> str:
    return device.type if hasattr(device, "type") else str(device).split(":")[0]


@functools.cache
def _note_fp32_fallback(device_type: str) -> None:
    why = (
        "neither AMX nor an AMD CPU with AVX-512 BF16" if device_type == "cpu" else "no native bf16"
    )
    logging.getLogger(__name__).info(
        "bf16 autocast does not pay on this %s (%s): running in fp32", device_type, why
    )


def default_device(device: Any = None) -> Any:
    """``device`` as a torch device; by default CUDA when available, else the CPU."""
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precision_used(device: Any, amp: bool) -> str:
    """``"bf16"`` or ``"fp32"``: what :func:`autocast` runs a model in on ``device``, recorded
    beside training histories, evaluation metrics and cached embeddings, since the same
    checkpoint gives slightly different probabilities in the two."""
    return "bf16" if amp and bf16_autocast_pays(device) else "fp32"


def bf16_autocast_pays(device: Any) -> bool:
    """Whether bf16 autocast is faster than fp32 on ``device``: CUDA devices that support bf16,
    CPUs with AMX tiles, and AMD CPUs with AVX-512 BF16 (Zen 4 and later; measured on Zen 5).

    The rule follows what was measured on 2 cores (``benchmarks/README.md``), decided by the
    CPU's instructions and maker rather than by a timing probe, so that one machine always
    trains in the same precision and reruns give the same numbers:

    - Intel with AVX-512 BF16 but no AMX: the bf16 matmul peak was half the fp32 one, bf16
      autocast trained ResNet-18, ResNet-50, SE-ResNet50 and VGG16 at 0.7-0.97x their fp32
      speed, and SE-ResNet50 inference ran 0.78x as fast in batches of 8 (``predict``'s CPU
      default): fp32 (:func:`bf16_is_native` still says it has the instructions).
    - AMD EPYC (Zen 5) with AVX-512 BF16: the bf16 matmul peak was 3.7-4.1x the fp32 one
      (the fp32 1 x 1 convolution is twice as fast as the fp32 matmul there; against it the
      bf16 convolution reached 2.2x and the bf16 matmul 1.9x),
      SE-ResNet50 inference in batches of 8 ran 1.54-1.67x as fast, the U-Net's 1.24-1.55x in
      batches of 8 and 32, and classifier training at 64 px 1.2-1.3x (VGG16, ResNet-50,
      SE-ResNet50): bf16. Zen 4, whose AVX-512 units are half as wide, was not measured.
    """
    return _bf16_autocast_pays(_device_type(device))


@functools.cache
def _bf16_autocast_pays(device_type: str) -> bool:
    import torch

    if device_type == "cuda":
        return _bf16_is_native(device_type)
    if device_type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    # Older torch without the instruction queries: fp32, the choice that is never emulated.
    if not hasattr(cpu, "_is_amx_tile_supported"):
        return False
    if cpu._is_amx_tile_supported():
        return True
    return _bf16_is_native("cpu") and cpu_vendor() == "AuthenticAMD"


@functools.cache
def cpu_vendor() -> str:
    """The CPU maker's id string (``GenuineIntel``, ``AuthenticAMD``), or ``""`` when unknown."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            return vendor_from_cpuinfo(cpuinfo.read(65536))
    except OSError:  # not Linux
        pass
    # Windows names the maker in the processor string; macOS has no AVX-512 BF16 to decide on.
    return next((v for v in ("GenuineIntel", "AuthenticAMD") if v in platform.processor()), "")


def vendor_from_cpuinfo(text: str) -> str:
    """The first ``vendor_id`` in the text of ``/proc/cpuinfo``, or ``""``."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "vendor_id":
            return value.strip()
    return ""


def bf16_is_native(device: Any) -> bool:
    """Whether bf16 arithmetic runs on hardware instructions on ``device``.

    CUDA devices that support bf16; CPUs with AVX-512 BF16 or AMX instructions. Elsewhere bf16
    is emulated: slower than fp32 and less precise. (oneDNN's own "bf16 supported" answers yes
    on any AVX-512 CPU, Skylake and Cascade Lake included, which have no bf16 instructions.)
    """
    return _bf16_is_native(_device_type(device))


@functools.cache
def _bf16_is_native(device_type: str) -> bool:
    import torch

    if device_type == "cuda":  # not counting bf16 that older GPUs (T4, V100) emulate
        return bool(
            torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        )
    if device_type != "cpu":  # other backends (mps, xpu, meta): not known to be native
        return False
    cpu = getattr(torch, "cpu", None)
    if hasattr(cpu, "_is_avx512_bf16_supported") and hasattr(cpu, "_is_amx_tile_supported"):
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    try:  # older torch: oneDNN's answer, which overstates on plain AVX-512 CPUs
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
    model: Any,
    batches: Iterable[Any],
    device: Any,
    amp: bool,
    mode: str,
    tta: TestTimeAugmentation | None = None,
    timer: ForwardTimer | None = None,
) -> np.ndarray:
    """Probabilities ``(N, K)`` float32 for image batches (tensors, or ``(images, _)`` pairs).

    Args:
        model: a classifier in any memory format; evaluated in ``eval()`` mode.
        batches: float image tensors ``(B, C, H, W)`` in [0, 1], or DataLoader pairs.
        device: where to run.
        amp: bf16 autocast for the backbone, where it pays (:func:`bf16_autocast_pays`).
        mode: ``"multilabel"`` or ``"multiclass"``.
        tta: views whose probabilities are averaged (None: the plain image only).
        timer: collects forward seconds, plain and added by TTA.
    """
    model.eval()

    def forward(images):
        with autocast(device, amp):
            return probabilities(model(images), mode)

    return _averaged(forward, batches, device, tta, timer)


def predict_features(
    model: Any,
    batches: Iterable[Any],
    device: Any,
    amp: bool,
    tta: TestTimeAugmentation | None = None,
    timer: ForwardTimer | None = None,
) -> np.ndarray:
    """Pooled backbone features ``(N, F)`` float32 (``ClassifierModel.forward_features``).

    Args:
        model: a :class:`~ichseg.models.classifiers.ClassifierModel`; evaluated in ``eval()``.
        batches: as for :func:`predict_probabilities`.
        device: where to run.
        amp: bf16 autocast for the backbone, where it pays (:func:`bf16_autocast_pays`).
        tta: views whose features are averaged (None: the plain image only).
        timer: collects forward seconds, plain and added by TTA.
    """
    model.eval()

    def forward(images):
        with autocast(device, amp):
            return model.forward_features(images)

    return _averaged(forward, batches, device, tta, timer)


COMPILE_ENV = "ICHSEG_COMPILE"
"""``1``/``0``: compile classifier inference or not, whatever the default."""


def compile_by_default() -> bool:
    """Whether :func:`prepare_for_inference` compiles when not told: ``ICHSEG_COMPILE`` when set,
    else False (see ``benchmarks/README.md``: compiling pays only after many studies)."""
    text = os.environ.get(COMPILE_ENV, "").strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    logging.getLogger(__name__).warning("ignoring %s=%r: not 0 or 1", COMPILE_ENV, text)
    return False


INFERENCE_BATCH = {"cpu": 8, "cuda": 32}
"""Slices per forward pass when the caller does not choose, by device type."""


def default_inference_batch(device: Any) -> int:
    """:data:`INFERENCE_BATCH` for ``device`` (32 on other devices).

    On CPU, smaller batches keep a batch's activations in cache: SE-ResNet50 at 256 px in fp32
    ran 13.2 slices/s in batches of 8 against 10.4 in batches of 32 on one 2-core AMD EPYC (76 %
    against 59 % of the matmul peak), 6.7 against 6.1 on another, and 13.3 against 9.9 on a
    2-core Intel Xeon (``benchmarks/README.md``). GPUs want larger batches.
    """
    return INFERENCE_BATCH.get(_device_type(device), 32)


def prepare_for_inference(
    model: Any, device: Any, compile: bool | None = None, batch_size: int | None = None
) -> Any:
    """Put a classifier in its fastest measured form for inference; returns the same module.

    On ``device``, in eval mode and channels_last (faster convolution kernels on CPU and GPU).
    With ``compile``, calls without gradients (``predict_probabilities``, which runs under
    ``torch.inference_mode``) go through ``torch.compile`` (inductor with frozen weights, so
    BatchNorm is folded into the convolutions and elementwise operators are fused), each batch
    padded to ``batch_size`` (larger batches cut into pieces of that size) so one compiled graph
    serves every batch; calls with gradients (Grad-CAM) run the eager module, hooks and all.
    The first compiled call compiles (tens of seconds on a CPU).

    Args:
        model: the classifier.
        device: where it runs.
        compile: compile inference calls (default: :func:`compile_by_default`).
        batch_size: the padded batch of the compiled graph (default:
            :func:`default_inference_batch`, the batch ``predict`` uses by default).
    """
    import torch

    model.to(device, memory_format=torch.channels_last).eval()
    if compile is None:
        compile = compile_by_default()
    if compile and not hasattr(model, "compiled_forward"):
        _compile_inference(model, batch_size or default_inference_batch(device))
    return model


def _compile_inference(model: Any, batch_size: int) -> None:
    import torch

    eager = model.forward  # the bound eager forward, still used for gradients and Grad-CAM
    compiled = torch.compile(eager, dynamic=False, options={"freezing": True})

    def forward(images, *args, **kwargs):
        count = images.shape[0]
        if args or kwargs or torch.is_grad_enabled():
            return eager(images, *args, **kwargs)
        if count > batch_size:  # a larger batch than compiled for: in pieces, one graph still
            return torch.cat([forward(part) for part in images.split(batch_size)])
        if count < batch_size:
            padding = images.new_zeros((batch_size - count, *images.shape[1:]))
            images = torch.cat([images, padding]).contiguous(memory_format=torch.channels_last)
        return compiled(images)[:count]

    # Instance attributes: the module, its weights and its state dict stay as they are.
    model.compiled_forward = compiled
    model.forward = forward
