"""Shared, session-scoped fixtures: a phantom data folder, a tiny trained run, a tiny U-Net.

Each is built once per test session (seconds on a CPU) and must be treated as read-only by the
tests that use them: copy before modifying.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_CONFIG = {
    "name": "tiny",
    "data": {"phantom": {"studies": 10, "size": 64, "slices": 8}, "image_size": 64},
    "model": {"name": "resnet18"},
    "train": {"epochs": 1, "batch_size": 16},
    "eval": {"n_boot": 20},
}
"""A phantom run small enough to train and evaluate in about ten seconds on a CPU."""


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two phantom studies (64x64, 8 slices): ``dicom/<study>/*.dcm`` and ``nifti/*.nii.gz``."""
    from ichseg.phantom import PhantomConfig, write_dataset

    root = tmp_path_factory.mktemp("phantom")
    write_dataset(root, studies=2, seed=7, config=PhantomConfig(size=64, num_slices=8))
    return root


@pytest.fixture(scope="session")
def nifti_ct_dir(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom's CT volumes alone (``*_ct.nii.gz``), without its label maps."""
    import shutil

    folder = tmp_path_factory.mktemp("nifti_ct")
    for path in sorted((phantom_dir / "nifti").glob("*_ct.nii.gz")):
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained and evaluated tiny run folder (best.pt, thresholds.json, config.yaml, eval/)."""
    from ichseg.config import load_config
    from ichseg.engine.train import train

    base = tmp_path_factory.mktemp("trained")
    data = TINY_CONFIG["data"] | {"cache_dir": str(base / "cache")}
    config = load_config(extra=TINY_CONFIG | {"data": data})
    run_dir = base / "run"
    train(config, run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="session")
def segmenter_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch 2D U-Net intracranial segmenter trained on three phantom volumes."""
    from ichseg.phantom import PhantomConfig, generate_study
    from ichseg.segmentation.training import train_segmenter
    from ichseg.segmentation.unet import SegmenterConfig

    studies = [generate_study(seed, PhantomConfig(size=64, num_slices=8)) for seed in (1, 2, 3)]
    config = SegmenterConfig(
        image_size=64, channels=(8, 16), strides=(2,), epochs=1, batch_size=8, amp=False
    )
    run_dir = tmp_path_factory.mktemp("segmenter")
    return train_segmenter(studies, config, run_dir, progress=False)


def dicom_cache_config(root: Path, labels: Path, cache: Path, context: int = 1, **data):
    """A run config of a DICOM folder with RSNA labels, cached at 32 px under ``cache``."""
    from ichseg.config import load_config

    return load_config(
        extra={
            "name": "flat",
            "data": {
                "source": "dicom",
                "root": str(root),
                "labels": str(labels),
                "image_size": 32,
                "context": context,
                "cache_dir": str(cache),
                **data,
            },
        }
    )


HEMORRHAGE_SEED = 35
"""A phantom study with epidural, intraparenchymal and intraventricular blood on 4 of 8 slices."""
HEMORRHAGE_STUDY = {"size": 64, "num_slices": 8, "negative_fraction": 0.0}


def tiny_hemorrhage_config(**changes):
    """A small hemorrhage U-Net config that fits one 64x64x8 phantom study in seconds."""
    from ichseg.segmentation.unet import SegmenterConfig

    settings = dict(
        target="hemorrhage",
        image_size=64,
        channels=(8, 16, 32),
        strides=(2, 2),
        epochs=25,
        batch_size=8,
        samples_per_epoch=32,
        foreground_fraction=0.75,
        batch_dice=True,
        amp=False,
        augment=False,
        val_fraction=0.0,
        lr=0.01,
    )
    return SegmenterConfig(**(settings | changes))


@pytest.fixture(scope="session")
def hemorrhage_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny hemorrhage U-Net fitted to the phantom study ``HEMORRHAGE_SEED`` (non-empty maps)."""
    from ichseg.phantom import PhantomConfig, generate_study
    from ichseg.segmentation.training import train_segmenter

    study = generate_study(HEMORRHAGE_SEED, PhantomConfig(**HEMORRHAGE_STUDY))
    run_dir = tmp_path_factory.mktemp("hemorrhage_unet")
    return train_segmenter([study], tiny_hemorrhage_config(), run_dir, progress=False)


@pytest.fixture(scope="session")
def sequence_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sequence run (GRU head, 2 epochs) over the tiny run's embeddings, trained and evaluated."""
    from ichseg.config import load_config
    from ichseg.engine.train import train

    config = load_config(
        trained_run / "config.yaml",
        extra={
            "name": "tiny_sequence",
            "sequence": {
                "enabled": True,
                "epochs": 2,
                "hidden": 16,
                "batch_size": 2,
                "backbone_run": str(trained_run),
            },
        },
    )
    run_dir = tmp_path_factory.mktemp("sequence") / "run"
    train(config, run_dir, progress=False)
    return run_dir
