"""The one factory: a registered backbone plus a fresh head, optionally with pretrained weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ichseg.errors import ConfigError
from ichseg.models.registry import get_model_builder
from ichseg.options import look_up_option

if TYPE_CHECKING:
    from ichseg.models.classifiers import ClassifierModel

HEADS: tuple[str, ...] = ("linear", "fc_bn")


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
    look_up_option("head", head, HEADS)
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
    if head == "fc_bn" and (not isinstance(hidden, int) or hidden < 1):
        raise ConfigError(f"hidden must be a positive integer, got {hidden!r}")

    from ichseg.models.classifiers import ClassifierModel
    from ichseg.models.pretrained import load_pretrained

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
