"""Name -> classifier builder registry; a leaf that imports nothing else of ichseg but errors.

Configs name a model by string ("resnet50"); builders are registered with
``@register_model("resnet50")`` and return a :class:`BackboneSpec`. The builders live in
:mod:`ichseg.models.classifiers`, which ``ichseg.models`` imports so that every name is
registered before anyone asks; :func:`ichseg.models.factory.create_model` adds the head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ichseg.options import look_up_option


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

    module: Any  # torch.nn.Module; untyped here so the registry needs no torch
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


def list_models() -> list[str]:
    """Sorted registered names (what ``model.name`` accepts)."""
    return sorted(_REGISTRY)


def get_model_builder(name: str) -> ModelBuilder:
    """The builder registered under ``name``.

    Args:
        name: a registered model name.

    Raises:
        ConfigError: unknown name; the message lists the valid ones.
    """
    return _REGISTRY[look_up_option("model", name, _REGISTRY)]
