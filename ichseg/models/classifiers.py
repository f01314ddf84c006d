"""Slice classifiers: timm/torchvision backbones behind one head and one weight-loading path.

Every model is a :class:`ClassifierModel` = backbone (pooled features) + head. Backbones keep their
library's parameter names, so a ``state_dict()`` saved from ``timm.create_model(name)`` or
``torchvision.models.<name>()`` loads into ``model.backbone`` unchanged.

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
from typing import Any

import timm
import torch
import torchvision
from torch import nn

from ichseg.errors import ConfigError
from ichseg.models.registry import BackboneSpec, register_model

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


def _timm_backbone(arch: str, in_channels: int, gradcam_layer: str) -> BackboneSpec:
    # num_classes=0 makes timm return globally pooled features and drop its classifier.
    module = timm.create_model(arch, pretrained=False, in_chans=in_channels, num_classes=0)
    cfg = module.pretrained_cfg
    classifier = cfg.get("classifier", "fc")
    return BackboneSpec(
        module=module,
        num_features=int(module.num_features),
        in_channels=in_channels,
        first_conv=str(cfg.get("first_conv", "conv1")),
        gradcam_layer=gradcam_layer,
        head_prefixes=(f"{classifier}.",),
        source="timm",
        arch=arch,
    )


def _last_block(module: nn.Module, stage: str) -> str:
    """Path of the last child of ``stage`` (e.g. ``layer4.2``), the last convolutional block."""
    last = list(dict(module.named_modules())[stage].named_children())[-1][0]
    return f"{stage}.{last}"


def _timm_resnet(arch: str, in_channels: int) -> BackboneSpec:
    spec = _timm_backbone(arch, in_channels, gradcam_layer="layer4")
    spec.gradcam_layer = _last_block(spec.module, "layer4")
    return spec


def _replace_first_conv(features: nn.Sequential, in_channels: int) -> None:
    old = features[0]
    if in_channels != old.in_channels:
        features[0] = nn.Conv2d(
            in_channels,
            old.out_channels,
            kernel_size=old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            bias=old.bias is not None,
        )


def _torchvision_backbone(arch: str, in_channels: int, gradcam_layer: str) -> BackboneSpec:
    # VGG16 and AlexNet keep fc6/fc7 (their ImageNet-pretrained 4096-d layers, with their own
    # dropout) so the features are the fc7 output; only the 1000-way layer classifier.6 goes.
    # The adaptive average pool before fc6 lets inputs as small as 64x64 through.
    module = torchvision.models.get_model(arch, weights=None)
    _replace_first_conv(module.features, in_channels)
    num_features = module.classifier[6].in_features
    module.classifier[6] = nn.Identity()
    return BackboneSpec(
        module=module,
        num_features=int(num_features),
        in_channels=in_channels,
        first_conv="features.0",
        gradcam_layer=gradcam_layer,
        head_prefixes=("classifier.6.",),
        source="torchvision",
        arch=arch,
    )


@register_model("resnet18")
def resnet18(in_channels: int = 3) -> BackboneSpec:
    """timm ResNet-18."""
    return _timm_resnet("resnet18", in_channels)


@register_model("resnet50")
def resnet50(in_channels: int = 3) -> BackboneSpec:
    """timm ResNet-50."""
    return _timm_resnet("resnet50", in_channels)


@register_model("resnet101")
def resnet101(in_channels: int = 3) -> BackboneSpec:
    """timm ResNet-101."""
    return _timm_resnet("resnet101", in_channels)


@register_model("seresnet50")
def seresnet50(in_channels: int = 3) -> BackboneSpec:
    """timm SE-ResNet-50: the timm ResNet-50 class with an SE module in every bottleneck.

    Same implementation family as ``resnet50`` on purpose, so an ablation rung "+SE" changes
    nothing but the SE blocks.
    """
    return _timm_resnet("seresnet50", in_channels)


@register_model("densenet121")
def densenet121(in_channels: int = 3) -> BackboneSpec:
    """timm DenseNet-121; Grad-CAM on the final BN+ReLU (``features.norm5``) that feeds pooling."""
    return _timm_backbone("densenet121", in_channels, gradcam_layer="features.norm5")


@register_model("efficientnet_b4")
def efficientnet_b4(in_channels: int = 3) -> BackboneSpec:
    """timm EfficientNet-B4; Grad-CAM on the head conv's BN+SiLU (``bn2``) that feeds pooling."""
    return _timm_backbone("efficientnet_b4", in_channels, gradcam_layer="bn2")


@register_model("vgg16")
def vgg16(in_channels: int = 3) -> BackboneSpec:
    """torchvision VGG-16 (no BN); Grad-CAM on the ReLU after conv5_3 (``features.29``)."""
    return _torchvision_backbone("vgg16", in_channels, gradcam_layer="features.29")


@register_model("alexnet")
def alexnet(in_channels: int = 3) -> BackboneSpec:
    """torchvision AlexNet; Grad-CAM on the ReLU after conv5 (``features.11``)."""
    return _torchvision_backbone("alexnet", in_channels, gradcam_layer="features.11")


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def _build_head(
    num_features: int, num_classes: int, head: str, dropout: float, hidden: int
) -> nn.Sequential:
    if head == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))
    if head == "fc_bn":
        return nn.Sequential(
            nn.Linear(num_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
    raise ConfigError(f"unknown head {head!r}; valid: linear, fc_bn")


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


class ClassifierModel(nn.Module):
    """A backbone producing pooled features followed by a classification head.

    Args:
        name: registry name.
        spec: what the builder returned.
        num_classes: number of logits.
        head: ``"linear"`` or ``"fc_bn"``.
        dropout: dropout probability before the final linear layer.
        hidden: hidden width of the ``"fc_bn"`` head.

    Attributes:
        name: registry name, e.g. ``"resnet50"``.
        in_channels: input channels.
        num_classes: number of logits.
        backbone: the timm/torchvision feature extractor (library parameter names).
        head: ``nn.Sequential`` mapping features to logits.
        load_report: a :class:`LoadReport` after pretrained weights were loaded, else None.
    """

    def __init__(
        self,
        name: str,
        spec: BackboneSpec,
        *,
        num_classes: int = 6,
        head: str = "linear",
        dropout: float = 0.0,
        hidden: int = 512,
    ) -> None:
        super().__init__()
        self.name = name
        self.in_channels = spec.in_channels
        self.num_classes = num_classes
        self.head_type = head
        self.backbone = spec.module
        self.head = _build_head(spec.num_features, num_classes, head, dropout, hidden)
        self.num_features = spec.num_features
        self.backbone_first_conv = spec.first_conv
        self.backbone_gradcam_layer = spec.gradcam_layer
        self.head_prefixes = spec.head_prefixes
        self.weights_source = spec.source
        self.weights_arch = spec.arch
        self.load_report: LoadReport | None = None

    @property
    def first_conv(self) -> str:
        """Module path (as in ``named_modules()``) of the first convolution."""
        return f"backbone.{self.backbone_first_conv}"

    def gradcam_target_layer(self) -> str:
        """Module path of the last convolutional block, for ``monai.visualize.GradCAM``."""
        return f"backbone.{self.backbone_gradcam_layer}"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(B, num_features)``.

        Args:
            x: images ``(B, in_channels, H, W)``.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.name} expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``.

        Args:
            x: images ``(B, in_channels, H, W)``.
        """
        return self.head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# Pretrained weights
# ---------------------------------------------------------------------------------------------


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
        return timm.create_model(arch, pretrained=True).state_dict()
    if source == "torchvision":
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
