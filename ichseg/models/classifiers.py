"""Slice classifiers: the registered timm/torchvision backbones behind one head.

Every model is a :class:`ClassifierModel` = backbone (pooled features) + head. Backbones keep their
library's parameter names, so a ``state_dict()`` saved from ``timm.create_model(name)`` or
``torchvision.models.<name>()`` loads into ``model.backbone`` unchanged (see
:mod:`ichseg.models.pretrained`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import timm
import torch
import torchvision
from torch import nn

from ichseg.errors import ConfigError
from ichseg.models.registry import BackboneSpec, register_model

if TYPE_CHECKING:
    from ichseg.models.pretrained import LoadReport

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


def _torchvision_backbone(
    arch: str, in_channels: int, gradcam_layer: str, *, pooled: bool = False
) -> BackboneSpec:
    """VGG/AlexNet features: fc7's output, or with ``pooled`` the globally pooled last conv.

    By default fc6/fc7 stay (their ImageNet-pretrained 4096-d layers, with their own dropout)
    and only the 1000-way layer classifier.6 goes; the adaptive average pool before fc6 lets
    inputs as small as 64x64 through. ``pooled`` drops fc6/fc7 for a global average pool, after
    the GAP networks of Zhou et al. (CVPR 2016): at 64-128 px the 7x7 pool mostly repeats a
    2x2-4x4 map into 102M fc6 weights; from scratch, with batch norm, at the ResNets' rate, those
    sent the loss to 5 in the first epoch and made a step 3x as long. The library's names stay
    either way, so its ImageNet checkpoint loads (the classifier keys that went are ignored as
    the head's).
    """
    module = torchvision.models.get_model(arch, weights=None)
    _replace_first_conv(module.features, in_channels)
    if pooled:
        num_features = [m for m in module.features if isinstance(m, nn.Conv2d)][-1].out_channels
        module.avgpool = nn.AdaptiveAvgPool2d(1)
        module.classifier = nn.Identity()
        head_prefixes: tuple[str, ...] = ("classifier.",)
    else:
        num_features = module.classifier[6].in_features
        module.classifier[6] = nn.Identity()
        head_prefixes = ("classifier.6.",)
    return BackboneSpec(
        module=module,
        num_features=int(num_features),
        in_channels=in_channels,
        first_conv="features.0",
        gradcam_layer=gradcam_layer,
        head_prefixes=head_prefixes,
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


@register_model("vgg16_bn_gap")
def vgg16_bn_gap(in_channels: int = 3) -> BackboneSpec:
    """torchvision VGG-16 with batch norm, globally average-pooled conv5_3 features (512).

    The VGG rung for training from scratch: without batch norm VGG-16 barely moved from the
    label prior in the quick profile's budget, and its fc6/fc7 were two thirds of each step.
    Grad-CAM on the ReLU after conv5_3's batch norm (``features.42``).
    """
    return _torchvision_backbone("vgg16_bn", in_channels, "features.42", pooled=True)


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
    raise ConfigError(f"unknown head {head!r}")  # create_model validates it first


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
        """Logits ``(B, num_classes)``, always float32.

        The head runs outside autocast: bf16 logits have 8 significant bits, which turns close
        scores into ties (biasing AUROC) and coarsens the log loss; the head is cheap in fp32.

        Args:
            x: images ``(B, in_channels, H, W)``.
        """
        features = self.forward_features(x)
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.head(features.float())
