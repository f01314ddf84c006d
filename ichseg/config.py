"""Typed run configuration: YAML -> validated pydantic models, base + delta merge.

A config file may name a ``base`` file (relative to itself); the file's keys are merged over the
base recursively, so an ablation rung is a few lines. Unknown keys fail at load and the error
names the full key path (``model.nmae``). The resolved config is saved beside every run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ichseg.errors import ConfigError
from ichseg.volume import RSNA_WEIGHTS, SUBTYPES

PACKAGE_CONFIGS = Path(__file__).parent / "configs"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


WindowSpec = str | dict[str, float]


class PhantomDataConfig(StrictModel):
    studies: int = Field(24, ge=3)
    seed: int = 100
    size: int = Field(128, ge=32)
    slices: int = Field(24, ge=1)
    negative_fraction: float = Field(0.4, ge=0.0, le=1.0)


class SplitConfig(StrictModel):
    """Patient-level split: fractions, or k folds with one held out as validation."""

    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    folds: int | None = Field(None, ge=2)
    fold: int = Field(0, ge=0)
    seed: int = 0


class DataConfig(StrictModel):
    source: Literal["phantom", "dicom", "nifti", "images"] = "phantom"
    root: Path | None = None
    labels: Path | None = None
    phantom: PhantomDataConfig = PhantomDataConfig()
    image_size: int = Field(128, ge=16)
    windows: list[WindowSpec] = ["brain", "subdural", "bone"]
    context: int = Field(0, ge=0, le=4)
    min_brain_fraction: float = Field(0.0, ge=0.0, le=1.0)
    # Cut every volume to the head's bounding box plus head_margin_mm (one box per volume)
    # before resizing: the table and the air around the head stop taking pixels, so a small
    # image_size resolves the brain better. masking.crop (a tighter box) takes precedence.
    head_crop: bool = False
    head_margin_mm: float = Field(5.0, ge=0.0)
    # Regex with a named group `group` applied to each file's path below `root`: the patient
    # id when the files carry none (NIfTI, pictures) or carry the wrong one.
    group_pattern: str | None = None
    # CSV of scan attributes (age, sex, manufacturer, site, kernel, slice thickness) keyed by
    # image, series_uid or patient_id: for subgroups and the metadata baseline on data whose
    # files carry no headers; its values override the headers'.
    demographics: Path | None = None
    split: SplitConfig = SplitConfig()
    cache_dir: Path | None = None
    # Processes that build the slice cache (None: the CPUs available). Not part of the cache key.
    workers: int | None = Field(None, ge=0)

    @field_validator("group_pattern")
    @classmethod
    def _valid_pattern(cls, value: str | None) -> str | None:
        if value is None:
            return value
        import re

        try:
            compiled = re.compile(value)
        except re.error as error:
            raise ValueError(f"invalid regular expression ({error})") from None
        if "group" not in compiled.groupindex:
            raise ValueError("needs a named group, e.g. (?P<group>[^/]+)")
        return value

    @model_validator(mode="after")
    def _pictures_are_single_windowed_slices(self) -> DataConfig:
        if self.source == "images" and self.context:
            raise ValueError("context (2.5D) needs CT volumes; image folders have single slices")
        if self.source == "images" and self.head_crop:
            raise ValueError("head_crop needs CT volumes in HU; image folders are windowed already")
        return self

    @property
    def in_channels(self) -> int:
        if self.source == "images":
            # Pictures are windowed already: grey (one window) or three display channels.
            return 1 if len(self.windows) == 1 else 3
        return len(self.windows) * (2 * self.context + 1)


class TaskConfig(StrictModel):
    mode: Literal["multilabel", "multiclass"] = "multilabel"
    # Multilabel: per-class loss weights; the RSNA metric weights `any` twice.
    class_weights: list[float] | None = list(RSNA_WEIGHTS)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    # Multiclass: the class names (default: normal vs hemorrhage).
    classes: list[str] | None = None

    @property
    def class_names(self) -> list[str]:
        if self.mode == "multilabel":
            return list(SUBTYPES)
        return self.classes or ["normal", "hemorrhage"]

    @property
    def num_outputs(self) -> int:
        return len(self.class_names)


class ModelConfig(StrictModel):
    name: str = "resnet50"
    pretrained: bool | Path = False
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    head: Literal["linear", "fc_bn"] = "linear"
    hidden: int = Field(512, ge=8)


class MaskingConfig(StrictModel):
    """Intracranial masking applied to HU before windowing (rung 4 of the ladder)."""

    enabled: bool = False
    method: Literal["classical", "unet"] = "classical"
    checkpoint: Path | None = None
    background: Literal["air", "min"] = "air"
    crop: bool = False
    margin_mm: float = Field(5.0, ge=0.0)
    dilation_mm: float = Field(2.0, ge=0.0)


class TrainConfig(StrictModel):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["adam", "adamw"] = "adamw"
    lr: float = Field(3e-4, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    # cosine: linear warm-up then cosine annealing; onecycle: Smith's one-cycle policy with
    # `lr` as its peak (pick it with `ichseg lr-find`).
    scheduler: Literal["cosine", "onecycle"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    amp: bool = True
    grad_clip: float | None = 1.0
    early_stopping_patience: int | None = Field(5, ge=1)
    augment: bool = True
    mixup_alpha: float = Field(0.0, ge=0.0)
    balanced_sampling: bool = False
    num_workers: int = Field(0, ge=0)


class EvalConfig(StrictModel):
    n_boot: int = Field(1000, ge=0)
    threshold_rule: Literal["youden", "f1"] = "youden"
    # Probability calibration fitted on the validation split and applied to every output
    # (evaluate, predict, bundle); thresholds are then chosen on calibrated probabilities.
    calibration: Literal["none", "temperature", "isotonic"] = "temperature"
    # How slice probabilities become a series probability, in evaluation and in `predict`:
    # max, mean, or topK (mean of the K highest slices).
    aggregation: str = "max"
    # Subgroup analysis of the evaluated split (eval/<split>/subgroups.json); [] turns it off.
    subgroups: list[str] = ["age", "sex", "manufacturer", "kernel", "slice_thickness"]
    # Groups with fewer patients are listed as too small, without figures.
    subgroup_min_patients: int = Field(10, ge=1)

    @field_validator("subgroups")
    @classmethod
    def _known_subgroups(cls, value: list[str]) -> list[str]:
        from ichseg.metrics.subgroups import SUBGROUP_ATTRIBUTES

        unknown = [name for name in value if name not in SUBGROUP_ATTRIBUTES]
        if unknown:
            raise ValueError(f"unknown {unknown}; choose from {', '.join(SUBGROUP_ATTRIBUTES)}")
        return list(dict.fromkeys(value))

    @field_validator("aggregation")
    @classmethod
    def _known_rule(cls, value: str) -> str:
        from ichseg.metrics.series import check_aggregation

        try:
            return check_aggregation(value)
        except ConfigError as error:
            raise ValueError(str(error)) from None


class SequenceConfig(StrictModel):
    """A series-level sequence head over per-slice embeddings of a trained classifier.

    The backbone (this config with the sequence disabled) embeds every slice once; a
    bidirectional GRU or a 1D convolution runs over the slices of each series in position
    order and predicts every slice, with the run's loss weights and split.
    """

    enabled: bool = False
    kind: Literal["gru", "conv"] = "gru"
    hidden: int = Field(128, ge=4)
    layers: int = Field(1, ge=1, le=6)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    kernel_size: int = Field(3, ge=1)  # conv only; odd, so outputs stay aligned with slices
    epochs: int = Field(30, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(8, ge=1)  # series per batch
    early_stopping_patience: int | None = Field(None, ge=1)
    # A finished classifier run whose best.pt gives the embeddings (its config must equal this
    # one with the sequence disabled); None trains the backbone into <run>/backbone/ first.
    backbone_run: Path | None = None

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be odd (the output of slice z is centred on slice z)")
        return value


class RunConfig(StrictModel):
    name: str = "run"
    seed: int = 0
    data: DataConfig = DataConfig()
    task: TaskConfig = TaskConfig()
    model: ModelConfig = ModelConfig()
    masking: MaskingConfig = MaskingConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    sequence: SequenceConfig = SequenceConfig()

    @model_validator(mode="after")
    def _sequences_need_volumes(self) -> RunConfig:
        if self.sequence.enabled and self.data.source == "images":
            raise ValueError("sequence: a sequence head needs CT series; pictures have none")
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or any(c in value for c in "/\\"):
            raise ValueError("name must be non-empty and hold no path separators")
        return value


def deep_merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """``delta`` over ``base``: mappings merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML") from None
    if data is None:
        # An empty file is a mistake, not a request for every default (a full training run).
        raise ConfigError(f"{path}: config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config and its chain of ``base`` files, merged, not yet validated."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: circular 'base' chain")
    data = _read_yaml(path)
    base_ref = data.pop("base", None)
    if base_ref is None:
        return data
    base_path = Path(base_ref)
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    return deep_merge(load_raw(base_path, _seen + (path,)), data)


def validate_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a merged mapping into a :class:`RunConfig`, with one-line errors."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        from ichseg.options import format_validation_error

        raise ConfigError(format_validation_error(error, source)) from None


def parse_override(text: str) -> dict[str, Any]:
    """``"train.epochs=3"`` -> ``{"train": {"epochs": 3}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw_value = text.split("=", 1)
    value = yaml.safe_load(raw_value) if raw_value else None
    result: dict[str, Any] = {}
    node = result
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return result


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> RunConfig:
    """Load a config file (or the defaults), apply ``extra`` then ``key=value`` overrides."""
    data = load_raw(path) if path is not None else {}
    if extra:
        data = deep_merge(data, extra)
    for override in overrides or []:
        data = deep_merge(data, parse_override(override))
    return validate_config(data, str(path) if path else "config")


def save_config(config: BaseModel, path: str | Path) -> Path:
    """Write the resolved config as YAML atomically."""
    from ichseg.fileio import write_text

    return write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def packaged_config(relative: str) -> Path:
    """Path of a config shipped with the package, e.g. ``ablation/01_vgg16.yaml``."""
    path = PACKAGE_CONFIGS / relative
    if not path.exists():
        available = sorted(
            str(p.relative_to(PACKAGE_CONFIGS)) for p in PACKAGE_CONFIGS.rglob("*.yaml")
        )
        raise ConfigError(f"no packaged config {relative!r}; available: {', '.join(available)}")
    return path
