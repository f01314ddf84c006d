"""Benchmark of the intracranial segmenters on phantom studies.

Trains the U-Net on phantom studies (seeds 1000+i), then scores it and the classical method on
studies from unseen seeds (900000+i). Prints one JSON object: training time, mean Dice and HD95
per method, and the fraction of epidural + subdural truth voxels inside each predicted mask.

Example::

    python benchmarks/segmenter.py --studies 20 --size 128 --epochs 12 --out runs/bench_seg
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

TRAIN_SEED = 1000
TEST_SEED = 900000
# Hemorrhage codes lying against the skull (HEMORRHAGE_CODES: 1 epidural, 5 subdural).
EXTRA_AXIAL_CODES = (1, 5)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20, help="training studies")
    parser.add_argument("--test-studies", type=int, default=10, help="unseen evaluation studies")
    parser.add_argument("--size", type=int, default=128, help="phantom in-plane size")
    parser.add_argument("--slices", type=int, default=32, help="phantom slices per study")
    parser.add_argument("--epochs", type=int, default=None, help="default: SegmenterConfig")
    parser.add_argument("--image-size", type=int, default=None, help="default: SegmenterConfig")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-amp", action="store_true", help="train without bf16 autocast")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_segmenter"))
    parser.add_argument("--progress", action="store_true", help="show the training bar")
    return parser.parse_args(argv)


def _score(masks: list[np.ndarray], studies: list, spacing: tuple[float, ...]) -> dict:
    from ichseg.segmentation import mask_metrics

    dice, hd95, inside, total = [], [], 0, 0
    for mask, study in zip(masks, studies, strict=True):
        metrics = mask_metrics(mask, study.intracranial_mask, spacing)
        dice.append(metrics["dice"])
        hd95.append(np.nan if metrics["hd95_mm"] is None else metrics["hd95_mm"])
        blood = np.isin(study.hemorrhage, EXTRA_AXIAL_CODES)
        inside += int((mask.astype(bool) & blood).sum())
        total += int(blood.sum())
    return {
        "dice_mean": round(float(np.mean(dice)), 4),
        "dice_min": round(float(np.min(dice)), 4),
        "hd95_mm_mean": round(float(np.nanmean(hd95)), 3),
        "epidural_subdural_inside": round(inside / total, 5) if total else None,
        "epidural_subdural_voxels": total,
    }


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    import torch

    from ichseg.phantom import PhantomConfig, generate_study
    from ichseg.segmentation import (
        SegmenterConfig,
        classical_intracranial_mask,
        load_segmenter,
        train_segmenter,
    )

    torch.set_num_threads(args.threads)
    # Every study holds blood: the mask must learn to keep it, and the extra-axial fraction is
    # then measured on many voxels.
    phantom = PhantomConfig(
        size=args.size, num_slices=args.slices, negative_fraction=0.0, max_bleeds=4
    )
    overrides = {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    if args.no_amp:
        overrides["amp"] = False
    config = SegmenterConfig(**overrides)

    start = time.perf_counter()
    train = [generate_study(TRAIN_SEED + i, phantom) for i in range(args.studies)]
    test = [generate_study(TEST_SEED + i, phantom) for i in range(args.test_studies)]
    generate_seconds = time.perf_counter() - start

    start = time.perf_counter()
    best = train_segmenter(train, config, args.out, progress=args.progress)
    train_seconds = time.perf_counter() - start

    segmenter = load_segmenter(best)
    spacing = (test[0].slice_thickness, *test[0].pixel_spacing)
    start = time.perf_counter()
    unet_masks = [segmenter.predict(study.hu) for study in test]
    unet_seconds = (time.perf_counter() - start) / len(test)
    start = time.perf_counter()
    classical_masks = [classical_intracranial_mask(study.hu, spacing) for study in test]
    classical_seconds = (time.perf_counter() - start) / len(test)

    checkpoint = torch.load(best, weights_only=True)
    result = {
        "train_studies": args.studies,
        "test_studies": args.test_studies,
        "phantom_size": args.size,
        "slices": args.slices,
        "threads": args.threads,
        "config": {k: v for k, v in config.model_dump(mode="json").items()},
        "generate_seconds": round(generate_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "best_epoch": checkpoint["epoch"],
        "best_val_dice": checkpoint["val_dice"],
        "unet": {**_score(unet_masks, test, spacing), "seconds_per_volume": round(unet_seconds, 3)},
        "classical": {
            **_score(classical_masks, test, spacing),
            "seconds_per_volume": round(classical_seconds, 3),
        },
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
