"""Classifier models: a name registry over timm/torchvision backbones with one head."""

from ichseg.models.classifiers import (
    ClassifierModel,
    LoadReport,
    adapt_first_conv_weight,
    load_backbone_state,
    load_pretrained,
    read_state_dict,
)
from ichseg.models.registry import (
    HEADS,
    BackboneSpec,
    create_model,
    get_model_builder,
    list_models,
    register_model,
)

__all__ = [
    "HEADS",
    "BackboneSpec",
    "ClassifierModel",
    "LoadReport",
    "adapt_first_conv_weight",
    "create_model",
    "get_model_builder",
    "list_models",
    "load_backbone_state",
    "load_pretrained",
    "read_state_dict",
    "register_model",
]
