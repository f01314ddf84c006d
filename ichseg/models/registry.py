"""Name -> classifier builder registry and the one factory, :func:`create_model`.

Configs name a model by string ("resnet50"); builders are registered with
``@register_model("resnet50")`` and return a :class:`BackboneSpec`. :func:`create_model` adds the
classification head and, when asked, pretrained backbone weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ichseg.errors import ConfigError

if TYPE_CHECKING:
    from ichseg.models.classifiers import ClassifierModel

HEADS: tuple[str, ...] = ("linear", "fc_bn")


@dataclass
class BackboneSpec:
    """What a builder returns: a feature extractor plus the facts needed around it.

    Attributes:
        module: maps ``(B, C, H, W)`` to pooled features ``(B, num_features)``; its parameter names
            are those of the timm/torchvision model it comes from, so their checkpoints load.
        num_features: width of the feature vector.
        in_channels: input channels the first conv was built for.
        first_conv: path of the first conv inside ``module`` (adapted when channel counts differ).
        gradcam_layer: path inside ``module`` of the last convolutional block.
        head_prefixes: key prefixes of the original classifier head in full checkpoints; ignored.
        source: ``"timm"`` or ``"torchvision"``, where ``pretrained=True`` fetches weights from.
        arch: architecture name in that library.
    """

    module: nn.Module
    num_features: int
    in_channels: int
    first_conv: str
    gradcam_layer: str
    head_prefixes: tuple[str, ...]
    source: str
    arch: str


ModelBuilder = Callable[[int], BackboneSpec]

_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering ``builder(in_channels) -> BackboneSpec`` under ``name``.

    Args:
        name: the name configs use; must be new.
    """

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorator


def _ensure_builtin_models() -> None:
    # The built-in builders register themselves on import; importing here keeps registry.py free of
    # a top-level import cycle (classifiers.py imports this module).
    import ichseg.models.classifiers  # noqa: F401


def list_models() -> list[str]:
    """Sorted names accepted by :func:`create_model`."""
    _ensure_builtin_models()
    return sorted(_REGISTRY)


def get_model_builder(name: str) -> ModelBuilder:
    """The builder registered under ``name``.

    Args:
        name: a registered model name.

    Raises:
        ConfigError: unknown name; the message lists the valid ones.
    """
    _ensure_builtin_models()
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"unknown model {name!r}; valid: {valid}") from None


def create_model(
    name: str,
    *,
    in_channels: int = 3,
    num_classes: int = 6,
    pretrained: bool | str | Path = False,
    dropout: float = 0.0,
    head: str = "linear",
    hidden: int = 512,
) -> ClassifierModel:
    """Build a registered classifier with a fresh head.

    Args:
        name: registered model name (see :func:`list_models`).
        in_channels: input channels, e.g. 3 windows x (2k+1) slices for 2.5D input.
        num_classes: output logits.
        pretrained: False for random init; True for the library's default ImageNet weights
            (downloaded, or taken from the local timm/torch cache); or a local ``.pt``/``.pth``/
            ``.safetensors`` backbone state dict. The original classifier head is ignored and the
            first conv is adapted when ``in_channels`` differs from the checkpoint's.
        dropout: dropout probability right before the final linear layer.
        head: ``"linear"`` (features -> dropout -> linear) or ``"fc_bn"`` (features ->
            linear(hidden) -> BatchNorm1d -> ReLU -> dropout -> linear).
        hidden: width of the hidden layer of the ``"fc_bn"`` head.

    Raises:
        ConfigError: unknown name or head, invalid sizes, unusable or unreachable weights.
    """
    builder = get_model_builder(name)
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"in_channels must be a positive integer, got {in_channels!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if head not in HEADS:
        raise ConfigError(f"unknown head {head!r}; valid: {', '.join(HEADS)}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    if head == "fc_bn" and (not isinstance(hidden, int) or hidden < 1):
        raise ConfigError(f"hidden must be a positive integer, got {hidden!r}")

    from ichseg.models.classifiers import ClassifierModel, load_pretrained

    model = ClassifierModel(
        name,
        builder(in_channels),
        num_classes=num_classes,
        head=head,
        dropout=float(dropout),
        hidden=hidden,
    )
    if pretrained is not False and pretrained is not None:
        load_pretrained(model, pretrained)
    return model
