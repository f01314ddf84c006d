"""Classifier models: a name registry over timm/torchvision backbones with one head.

Importing this package registers the built-in backbones (:mod:`ichseg.models.classifiers`).
"""

from ichseg.models import classifiers as _builtin_models  # noqa: F401  (registers the names)
from ichseg.models.classifiers import ClassifierModel
from ichseg.models.factory import HEADS, create_model
from ichseg.models.pretrained import (
    LoadReport,
    adapt_first_conv_weight,
    load_backbone_state,
    load_pretrained,
    read_state_dict,
)
from ichseg.models.registry import (
    BackboneSpec,
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
