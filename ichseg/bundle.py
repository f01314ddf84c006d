"""Export a trained run as a MONAI bundle that ``monai.bundle run`` and ``ichseg predict`` execute.

Layout of a bundle ``B``::

    B/configs/metadata.json          model-zoo metadata (versions, intended use, I/O format)
    B/configs/metadata_schema.json   ichseg's JSON schema for that metadata (offline verify)
    B/configs/inference.json         MONAI bundle config calling ichseg.inference.predict
    B/configs/logging.conf           stdlib logging setup read by ConfigWorkflow
    B/configs/ichseg_run.yaml        the run's resolved config (provenance)
    B/models/classifier.pt           the run's best.pt ({"state_dict", "config", ...})
    B/models/thresholds.json         operating thresholds chosen on the validation split
    B/models/segmenter.pt            U-Net intracranial segmenter (when one is available)
    B/docs/README.md, B/LICENSE

Run it with::

    python -m monai.bundle run --config_file B/configs/inference.json \\
        --meta_file B/configs/metadata.json --bundle_root B --dataset_dir IN --output_dir OUT
    ichseg predict B IN OUT
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shutil
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from ichseg.config import RunConfig, WindowSpec, save_config, validate_config
from ichseg.errors import ConfigError, InputError

MONAI_META_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
    "meta_schema_20240725.json"
)
"""The model-zoo schema that names ``required_packages_version`` (the key current MONAI reads;
``optional_packages_version`` is deprecated and renamed with a warning at load time).
``metadata.json`` names it for users online; offline, the bundle's own schema is used."""

METADATA_FILE = "metadata.json"
SCHEMA_FILE = "metadata_schema.json"
INFERENCE_FILE = "inference.json"
RUN_CONFIG_FILE = "ichseg_run.yaml"
CLASSIFIER_FILE = "classifier.pt"
SEGMENTER_FILE = "segmenter.pt"
THRESHOLDS_FILE = "thresholds.json"

_SEMVER = r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?$"

_DATA_FORMAT_KEYS = (
    "type",
    "format",
    "num_channels",
    "spatial_shape",
    "dtype",
    "value_range",
    "is_patch_data",
    "channel_def",
)


def metadata_schema() -> dict[str, Any]:
    """ichseg's JSON schema (draft 7) for ``metadata.json``.

    It requires what the MONAI model zoo requires of a bundle's metadata, so that
    ``python -m monai.bundle verify_metadata`` can run offline against the bundle's own copy.
    """
    string = {"type": "string", "minLength": 1}
    tensor_format = {
        "type": "object",
        "required": list(_DATA_FORMAT_KEYS),
        "properties": {
            "type": string,
            "format": string,
            "modality": string,
            "num_channels": {"type": "integer", "minimum": 1},
            "spatial_shape": {
                "type": "array",
                "minItems": 1,
                "items": {"type": ["integer", "string"]},
            },
            "dtype": string,
            "value_range": {"type": "array", "items": {"type": "number"}},
            "is_patch_data": {"type": "boolean"},
            "channel_def": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"pattern": r"^\d+$"},
                "additionalProperties": {"type": "string"},
            },
        },
    }
    tensors = {"type": "object", "minProperties": 1, "additionalProperties": tensor_format}
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "ichseg bundle metadata",
        "type": "object",
        "required": [
            "schema",
            "version",
            "changelog",
            "monai_version",
            "pytorch_version",
            "numpy_version",
            "required_packages_version",
            "task",
            "description",
            "authors",
            "copyright",
            "network_data_format",
        ],
        "properties": {
            "schema": {"type": "string", "format": "uri"},
            "version": {"type": "string", "pattern": _SEMVER},
            "changelog": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"pattern": _SEMVER},
                "additionalProperties": {"type": "string"},
            },
            "monai_version": string,
            "pytorch_version": string,
            "numpy_version": string,
            "required_packages_version": {
                "type": "object",
                "additionalProperties": {"type": "string"},
            },
            "name": string,
            "task": string,
            "description": string,
            "authors": string,
            "copyright": string,
            "intended_use": string,
            "data_source": string,
            "data_type": string,
            "image_classes": string,
            "label_classes": string,
            "pred_classes": string,
            "references": {"type": "array", "items": {"type": "string"}},
            "network_data_format": {
                "type": "object",
                "required": ["inputs", "outputs"],
                "properties": {"inputs": tensors, "outputs": tensors},
            },
        },
    }


def _package_version(name: str) -> str:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return "not installed"


def _window_label(spec: WindowSpec) -> str:
    from ichseg.preprocess.windowing import resolve_window

    window = resolve_window(spec)
    level = f"{window.center:g}/{window.width:g}"
    return f"{spec} window {level}" if isinstance(spec, str) else f"window {level}"


def input_channel_def(config: RunConfig) -> dict[str, str]:
    """Meaning of each model input channel: windows, slice-major over the 2.5D neighbours.

    Args:
        config: the run config (``data.windows`` and ``data.context``).
    """
    context = config.data.context
    labels = {}
    for offset in range(-context, context + 1):
        where = "" if context == 0 else (f"slice z{offset:+d}, " if offset else "slice z, ")
        for spec in config.data.windows:
            labels[str(len(labels))] = where + _window_label(spec)
    return labels


def _data_source(config: RunConfig) -> str:
    data = config.data
    if data.source == "phantom":
        p = data.phantom
        return (
            f"synthetic phantom head CT generated by ichseg ({p.studies} studies, seed {p.seed}, "
            f"{p.slices} slices of {p.size}x{p.size} pixels); no patient data"
        )
    where = f" ({Path(data.root).name})" if data.root else ""
    labels = f", labels {Path(data.labels).name}" if data.labels else ""
    return f"{data.source} data{where}{labels}"


def _eval_metrics(run_dir: Path) -> dict[str, Any]:
    """The run's held-out summary numbers, when it was evaluated (finite scalars only)."""
    path = run_dir / "eval" / "metrics.json"
    if not path.exists():
        return {}
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    scalars = {
        k: v
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    if isinstance(metrics.get("split"), str):
        scalars["split"] = metrics["split"]
    return scalars


def build_metadata(
    config: RunConfig,
    *,
    version: str = "0.1.0",
    authors: str = "ichseg",
    description: str | None = None,
    eval_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The bundle's ``metadata.json`` content for a run.

    Args:
        config: the run config stored in the checkpoint.
        version: bundle version (semantic version).
        authors: author line.
        description: free text; a default describing the model is used when None.
        eval_metrics: held-out metrics of the run to record (optional).
    """
    import monai
    import numpy
    import torch

    import ichseg

    names = config.task.class_names
    size = config.data.image_size
    multilabel = config.task.mode == "multilabel"
    source = _data_source(config)
    masked = (
        f"; slices masked to the intracranial region ({config.masking.method} segmenter)"
        if config.masking.enabled
        else ""
    )
    description = description or (
        f"{config.model.name} classifier of intracranial hemorrhage on head CT slices "
        f"({config.data.in_channels}-channel windowed {size}x{size} input{masked}). "
        "Predicts per-slice probabilities and aggregates them per series; writes an "
        "intracranial mask and Grad-CAM overlays for positive series."
    )
    classes = ", ".join(names)
    label_text = (
        f"multilabel: {classes} (each an independent probability; 'any' is any hemorrhage)"
        if multilabel
        else f"multiclass (mutually exclusive): {classes}"
    )
    meta: dict[str, Any] = {
        "schema": MONAI_META_SCHEMA_URL,
        "version": version,
        "changelog": {version: "initial export"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {
            "ichseg": ichseg.__version__,
            "nibabel": _package_version("nibabel"),
            "pydicom": _package_version("pydicom"),
        },
        "name": f"ichseg hemorrhage classifier ({config.name})",
        "task": "Intracranial hemorrhage detection on head CT (slice and series classification)",
        "description": description,
        "authors": authors,
        "copyright": f"Copyright (c) {datetime.date.today().year} {authors}",
        "intended_use": (
            "Research and education only. Not a medical device; not for clinical use, "
            f"diagnosis or triage. Trained on {source}. Performance on other scanners, "
            "protocols or populations is unknown until measured on them; outputs must not "
            "replace a radiologist's read."
        ),
        "data_source": source,
        "data_type": "dicom/nifti",
        "image_classes": (
            f"{config.data.in_channels}-channel axial CT slice resized to {size}x{size}, "
            "Hounsfield units windowed to [0, 1] per channel"
        ),
        "label_classes": label_text,
        "pred_classes": label_text,
        "references": [
            "Flanders AE et al. Construction of a machine learning dataset through "
            "collaboration: the RSNA 2019 brain CT hemorrhage challenge. Radiol Artif Intell "
            "2020;2(3):e190211.",
            "He K et al. Deep residual learning for image recognition. CVPR 2016.",
            "Hu J et al. Squeeze-and-excitation networks. CVPR 2018.",
            "Ronneberger O et al. U-Net: convolutional networks for biomedical image "
            "segmentation. MICCAI 2015.",
            "Selvaraju RR et al. Grad-CAM: visual explanations from deep networks via "
            "gradient-based localization. ICCV 2017.",
        ],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": config.data.in_channels,
                    "spatial_shape": [size, size],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": input_channel_def(config),
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "probabilities",
                    "num_channels": len(names),
                    "spatial_shape": [len(names)],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {str(i): name for i, name in enumerate(names)},
                }
            },
        },
    }
    if eval_metrics:
        meta["eval_metrics"] = eval_metrics
    return meta


def inference_config() -> dict[str, Any]:
    """The bundle's ``inference.json``: load the predictor, run ``ichseg.inference.predict``.

    ``bundle_root``, ``dataset_dir`` and ``output_dir`` are the model-zoo override names.
    """
    return {
        "imports": ["$import logging", "$import ichseg"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$'cuda' if torch.cuda.is_available() else 'cpu'",
        "aggregation": "max",
        "gradcam": True,
        "gradcam_slices": 3,
        "batch_size": 32,
        "segmenter": None,
        "predictor": {
            "_target_": "ichseg.inference.load_predictor",
            "model_path": "@bundle_root",
            "segmenter": "@segmenter",
            "device": "@device",
        },
        "network_def": "$@predictor.model",
        "inference": {
            "_target_": "ichseg.inference.predict",
            "model_path": "@bundle_root",
            "input_path": "@dataset_dir",
            "out_dir": "@output_dir",
            "aggregation": "@aggregation",
            "gradcam": "@gradcam",
            "gradcam_slices": "@gradcam_slices",
            "batch_size": "@batch_size",
            "progress": False,
            "predictor": "@predictor",
        },
        # pydicom reports every minor standard violation of real archives at WARNING.
        "initialize": ["$logging.getLogger('pydicom').setLevel(logging.ERROR)"],
        "run": ["$@inference"],
        "finalize": [],
    }


_LOGGING_CONF = """\
[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def _license_text(authors: str) -> str:
    year = datetime.date.today().year
    return (
        f"Copyright (c) {year} {authors}\n\n"
        'Licensed under the Apache License, Version 2.0 (the "License");\n'
        "you may not use the files of this bundle except in compliance with the License.\n"
        "You may obtain a copy of the License at\n\n"
        "    https://www.apache.org/licenses/LICENSE-2.0\n\n"
        "Unless required by applicable law or agreed to in writing, software\n"
        'distributed under the License is distributed on an "AS IS" BASIS,\n'
        "WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.\n"
        "See the License for the specific language governing permissions and\n"
        "limitations under the License.\n\n"
        "The model weights are for research use only and are not a medical device.\n"
    )


def _readme(
    meta: dict[str, Any], config: RunConfig, has_segmenter: bool, tuned_thresholds: bool
) -> str:
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    channels = "\n".join(f"  - {k}: {v}" for k, v in image["channel_def"].items())
    classes = ", ".join(pred["channel_def"].values())
    segmenter = (
        "a U-Net intracranial segmenter (`models/segmenter.pt`)"
        if has_segmenter
        else "the classical (threshold + largest component) intracranial segmenter of ichseg"
    )
    thresholds = (
        "chosen on the run's validation split"
        if tuned_thresholds
        else "0.5 for every class: the run was not evaluated"
    )
    metrics = meta.get("eval_metrics") or {}
    performance = (
        "\n".join(f"- {k}: {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        if metrics
        else "- not evaluated at export time"
    )
    return f"""# {meta["name"]}

{meta["description"]}

**Intended use.** {meta["intended_use"]}

## What it does

For every DICOM series and NIfTI CT volume under the input folder, the bundle converts the
stored values to Hounsfield units, computes an intracranial mask with {segmenter},
windows each axial slice into {image["num_channels"]} channel(s), resizes it to
{image["spatial_shape"][0]}x{image["spatial_shape"][1]} and runs the `{config.model.name}`
classifier. Slice probabilities are aggregated per series (maximum by default) and compared with
the operating thresholds in `models/thresholds.json` ({thresholds}).

## Inputs

- a folder tree of DICOM files (CT series; other modalities are skipped) and/or NIfTI CT
  volumes in Hounsfield units (`.nii`, `.nii.gz`). Unreadable or non-CT files are listed in
  `skipped.csv` with the reason; the rest are processed.
- network input: `{image["dtype"]}` tensor `(N, {image["num_channels"]}, \
{image["spatial_shape"][0]}, {image["spatial_shape"][1]})`, values in [0, 1]; channels:
{channels}

## Outputs (in the output folder)

- `predictions.csv`: one row per slice (source, series UID, SOP UID, slice index, z in mm,
  one probability per class: {classes})
- `series.csv`, `series.json`: one row per series (aggregated probabilities, 0/1 labels at the
  operating thresholds, mask path, Grad-CAM paths, reader warnings)
- `skipped.csv`: files that could not be used, with the reason
- `masks/<name>_mask.nii.gz`: intracranial mask on the input grid (same affine)
- `gradcam/*.png`: Grad-CAM overlays of the most positive slices of positive series

## Running

With MONAI (the three overrides follow the model-zoo convention):

```bash
python -m monai.bundle run \\
    --config_file B/configs/inference.json --meta_file B/configs/metadata.json \\
    --bundle_root B --dataset_dir IN --output_dir OUT
```

Options such as `--aggregation mean`, `--gradcam False`, `--device cpu` or
`--segmenter other_unet.pt` override the matching entries of `configs/inference.json`.

With ichseg:

```bash
ichseg predict B IN OUT
```

Verify the metadata offline against the bundled schema (online, drop `--filepath` to use the
MONAI model-zoo schema named in `metadata.json`):

```bash
python -m monai.bundle verify_metadata --meta_file B/configs/metadata.json \\
    --filepath B/configs/metadata_schema.json
```

## Performance (held-out split of the training run)

{performance}

These numbers describe the training data named above ({meta["data_source"]}); they say nothing
about real patient scans.

## Limits

- Research only; not for clinical use. No regulatory clearance.
- Trained on: {meta["data_source"]}.
- Axial head CT only; other body parts, contrast studies and non-CT modalities are out of
  scope. Very thick or tilted slices, motion and metal artifacts degrade the output.
- Grad-CAM maps show where the network looked, not where the bleed is.

## Provenance

`configs/ichseg_run.yaml` is the resolved training configuration of the run; the classifier
checkpoint carries the same configuration.
"""


def _load_run(run_dir: Path) -> tuple[Path, RunConfig]:
    """The run's best checkpoint and its config; InputError naming the folder otherwise."""
    from ichseg.engine.train import load_checkpoint

    if not run_dir.is_dir():
        raise InputError(run_dir, "no such run folder")
    checkpoint = run_dir / "best.pt"
    if not checkpoint.is_file():
        raise InputError(run_dir, "not a training run folder (no best.pt)")
    try:
        state = load_checkpoint(checkpoint)
    except Exception as error:  # torch raises many types for damaged or foreign files
        raise InputError(checkpoint, f"cannot load the checkpoint ({error})") from None
    if not isinstance(state, dict) or "state_dict" not in state or "config" not in state:
        raise InputError(checkpoint, "not an ichseg checkpoint (no state_dict/config)")
    try:
        config = validate_config(state["config"], str(checkpoint))
    except ConfigError as error:
        raise InputError(checkpoint, f"invalid config in the checkpoint ({error})") from None
    return checkpoint, config


def _segmenter_source(
    run_dir: Path, config: RunConfig, segmenter: str | Path | None
) -> Path | None:
    """The U-Net checkpoint to ship: explicit, the run's own, or the config's, in that order."""
    if segmenter is not None:
        path = Path(segmenter)
        if not path.is_file():
            raise InputError(path, "no such segmenter checkpoint")
    elif (run_dir / SEGMENTER_FILE).is_file():
        path = run_dir / SEGMENTER_FILE
    elif config.masking.checkpoint is not None and Path(config.masking.checkpoint).is_file():
        path = Path(config.masking.checkpoint)
    else:
        if config.masking.enabled and config.masking.method == "unet":
            raise InputError(
                run_dir,
                "the run was trained on U-Net-masked slices but its segmenter checkpoint "
                f"({config.masking.checkpoint}) was not found; give one explicitly",
            )
        return None
    try:
        from ichseg.segmentation.unet import load_segmenter

        load_segmenter(path, device="cpu")
    except Exception as error:  # any failure means the bundle could not use it
        raise InputError(path, f"not a usable U-Net segmenter checkpoint ({error})") from None
    return path


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _check_target(run_dir: Path, out_dir: Path, overwrite: bool) -> None:
    source, target = run_dir.resolve(), out_dir.resolve()
    if target == source or target in source.parents:
        raise InputError(out_dir, f"the bundle folder must not be or contain the run {run_dir}")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(out_dir, "folder exists and is not empty (use overwrite)")


def export_bundle(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    segmenter: str | Path | None = None,
    version: str = "0.1.0",
    authors: str = "ichseg",
    description: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a MONAI bundle for a trained run; the folder appears complete or not at all.

    Args:
        run_dir: training run folder (``best.pt``, ``thresholds.json``, ``config.yaml``).
        out_dir: bundle root to create.
        segmenter: U-Net checkpoint to ship; default the run's ``segmenter.pt`` or the config's
            ``masking.checkpoint`` when they exist. Without one, inference uses the classical
            intracranial mask (refused for runs trained on U-Net-masked slices).
        version: bundle version (semantic version, e.g. ``0.1.0``).
        authors: author line of the metadata, README and license.
        description: metadata description; a default describing the model otherwise.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        InputError: bad run folder or segmenter, or ``out_dir`` not empty without overwrite.
        ConfigError: ``version`` is not a semantic version.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not re.match(_SEMVER, version):
        raise ConfigError(f"bundle version {version!r} must look like MAJOR.MINOR.PATCH")
    checkpoint, config = _load_run(run_dir)
    _check_target(run_dir, out_dir, overwrite)
    segmenter_path = _segmenter_source(run_dir, config, segmenter)
    meta = build_metadata(
        config,
        version=version,
        authors=authors,
        description=description,
        eval_metrics=_eval_metrics(run_dir),
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target so the final rename stays on one file system.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
        configs, models, docs = staging / "configs", staging / "models", staging / "docs"
        for folder in (configs, models, docs):
            folder.mkdir()
        _write_json(configs / METADATA_FILE, meta)
        _write_json(configs / SCHEMA_FILE, metadata_schema())
        _write_json(configs / INFERENCE_FILE, inference_config())
        (configs / "logging.conf").write_text(_LOGGING_CONF, encoding="utf-8")
        if (run_dir / "config.yaml").is_file():
            shutil.copyfile(run_dir / "config.yaml", configs / RUN_CONFIG_FILE)
        else:
            save_config(config, configs / RUN_CONFIG_FILE)
        shutil.copyfile(checkpoint, models / CLASSIFIER_FILE)
        thresholds = run_dir / THRESHOLDS_FILE
        tuned = thresholds.is_file()
        if tuned:
            shutil.copyfile(thresholds, models / THRESHOLDS_FILE)
        else:
            # An unevaluated run: the default cut-off that load_predictor would use anyway.
            _write_json(models / THRESHOLDS_FILE, {n: 0.5 for n in config.task.class_names})
        if segmenter_path is not None:
            shutil.copyfile(segmenter_path, models / SEGMENTER_FILE)
        (docs / "README.md").write_text(
            _readme(meta, config, segmenter_path is not None, tuned), encoding="utf-8"
        )
        (staging / "LICENSE").write_text(_license_text(authors), encoding="utf-8")
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished bundle into place, replacing an old one only once the new one is whole."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
    old.rmdir()
    os.replace(out_dir, old)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
