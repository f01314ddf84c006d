"""Pretrained backbone weights: from timm/torchvision (download or local cache) or a local file.

First-conv adaptation, used whenever a checkpoint's first conv has a different number of input
channels ``c_in`` than the model's ``C``: every new input channel gets the checkpoint kernel summed
over its input channels and divided by ``C``; for RGB weights that is "sum over RGB / 3, repeated,
scaled by 3 / C". A model fed the same image in all ``C`` channels then gives exactly the
pretrained network's response to that grey image, whatever ``C`` is.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ichseg.errors import ConfigError

if TYPE_CHECKING:
    from ichseg.models.classifiers import ClassifierModel

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """Outcome of loading backbone weights.

    Attributes:
        origin: the file or library the weights came from.
        ignored_head: checkpoint keys of the original classifier head, not loaded.
        unexpected: other checkpoint keys the backbone has no use for, not loaded.
        adapted_first_conv: whether the first conv was adapted to a new channel count.
    """

    origin: str
    ignored_head: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted_first_conv: bool = False


def adapt_first_conv_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a conv kernel ``(out, c_in, kh, kw)`` to ``in_channels`` inputs.

    Each new channel gets ``weight.sum(1) / in_channels`` (for RGB: mean over RGB repeated and
    scaled by ``3 / in_channels``), which preserves the response to a grey image.

    Args:
        weight: the checkpoint kernel.
        in_channels: the model's input channels.
    """
    summed = weight.float().sum(dim=1, keepdim=True) / in_channels
    return summed.repeat(1, in_channels, 1, 1).to(weight.dtype)


def _download_weights(source: str, arch: str) -> dict[str, torch.Tensor]:
    """The library's default pretrained state dict (network access unless already cached).

    Args:
        source: ``"timm"`` or ``"torchvision"``.
        arch: architecture name in that library.
    """
    if source == "timm":
        import timm

        return timm.create_model(arch, pretrained=True).state_dict()
    if source == "torchvision":
        import torchvision

        weights = torchvision.models.get_model_weights(arch).DEFAULT
        return weights.get_state_dict(progress=False)
    raise ValueError(f"unknown weight source {source!r}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors``.

    A dict holding the weights under ``"state_dict"`` (training checkpoints) is unwrapped.

    Args:
        path: the weights file.

    Raises:
        ConfigError: missing or unreadable file, or no tensors in it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: pretrained weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt files raise anything from pickle, zip or safetensors
        raise ConfigError(f"{path}: cannot read pretrained weights ({_first_line(exc)})") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{path}: no state dict of tensors found")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel checkpoints prefix "module."; a saved ClassifierModel prefixes "backbone." and
    # carries its own "head." which is ignored like any classifier head.
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def load_backbone_state(
    model: ClassifierModel, state: Mapping[str, torch.Tensor], origin: str
) -> LoadReport:
    """Load a backbone state dict into ``model.backbone``, ignoring the classifier head.

    Args:
        model: the model to fill.
        state: timm/torchvision-named tensors (full model or backbone only).
        origin: file or library name used in messages.

    Raises:
        ConfigError: backbone keys missing from ``state`` or with mismatching shapes.
    """
    state = _strip_wrappers(state)
    own = model.backbone.state_dict()
    report = LoadReport(origin=origin)

    conv_key = f"{model.backbone_first_conv}.weight"
    if conv_key in state and conv_key in own:
        weight = state[conv_key]
        if weight.ndim == 4 and weight.shape[1] != own[conv_key].shape[1]:
            state[conv_key] = adapt_first_conv_weight(weight, model.in_channels)
            report.adapted_first_conv = True

    usable: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in own:
            usable[key] = value
        elif key.startswith(model.head_prefixes):
            report.ignored_head.append(key)
        else:
            report.unexpected.append(key)
    # BN step counters are bookkeeping, absent from many published checkpoints.
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    mismatched = [k for k in usable if usable[k].shape != own[k].shape]
    if missing:
        raise ConfigError(
            f"{origin}: pretrained weights do not fit {model.name}: {len(missing)} of "
            f"{len(own)} backbone keys missing (e.g. {', '.join(missing[:4])})"
        )
    if mismatched:
        examples = ", ".join(
            f"{k} {tuple(usable[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:3]
        )
        raise ConfigError(
            f"{origin}: pretrained weights do not fit {model.name}: "
            f"{len(mismatched)} shape mismatches (e.g. {examples})"
        )
    model.backbone.load_state_dict(usable, strict=False)
    if report.unexpected:
        logger.warning(
            "%s: %d unexpected keys ignored for %s (e.g. %s)",
            origin,
            len(report.unexpected),
            model.name,
            ", ".join(report.unexpected[:4]),
        )
    model.load_report = report
    return report


def load_pretrained(model: ClassifierModel, pretrained: bool | str | Path) -> LoadReport:
    """Fill ``model.backbone`` from the library's default weights or from a local file.

    Args:
        model: the model to fill.
        pretrained: True for the library default (timm ``pretrained=True`` / torchvision
            ``weights="DEFAULT"``), or a path to a weights file.

    Raises:
        ConfigError: download failure (one line, suggesting a local file), or an unusable file.
    """
    if pretrained is True:
        origin = f"{model.weights_source}:{model.weights_arch}"
        try:
            state = _download_weights(model.weights_source, model.weights_arch)
        except Exception as exc:  # network/hub failures come as many exception types
            raise ConfigError(
                f"pretrained weights for {model.name!r} ({origin}) could not be downloaded "
                f"({_first_line(exc)}); pass a local .pt/.pth/.safetensors file as pretrained=PATH"
            ) from exc
        return load_backbone_state(model, state, origin)
    if isinstance(pretrained, str | Path):
        return load_backbone_state(model, read_state_dict(pretrained), str(pretrained))
    raise ConfigError(f"pretrained must be a bool or a weights file path, got {pretrained!r}")
