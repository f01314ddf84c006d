"""Rung 06 (sequence head) against rung 04 on phantoms, calibration before/after, TTA cost.

Trains the demo's intracranial U-Net, then the ladder rungs 04 (SE-ResNet50 + U-Net mask),
05 (+ neighbour slices as channels) and 06 (+ a sequence head over rung 05's embeddings; seed s
reuses rung 05's run of seed s) with the quick profile for ``--seeds`` seeds, on phantom studies
drawn with ``--phantom-seed`` (the rung configs were tuned on the default phantom seed, 100).
Every rung is trained and tested on the same patients. Reports, as one JSON object:

* ``ladder``: the ablation table and consecutive comparisons (05 vs 04, 06 vs 05);
* ``rung06_vs_rung04``: the paired patient-and-seed bootstrap of rung 06 minus rung 04
  (series AUROC(any), series and slice weighted log loss, slice AUROC(any)) and DeLong's test;
* ``calibration``: per rung, the test split's mean expected calibration error and Brier score
  before and after the calibration fitted on validation (slices and series), mean over seeds;
* ``tta``: for seed 0 of rungs 04 and 06, the test metrics with flip TTA and the forward time
  it adds.

Example::

    python benchmarks/sequence.py --out /tmp/seqbench --phantom-seed 2024 --seeds 3

(bf16 autocast falls back to fp32 where it does not pay, most CPUs without AMX included, so no
``train.amp`` override is needed there.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import configure_process, emit, environment, log, resolve_device, rounded

from ichseg.demo import DEMO_SEGMENTER_EPOCHS, DEMO_SEGMENTER_SEED, DEMO_SEGMENTER_STUDIES

RUNGS = (
    "ablation/04_seresnet50_unet.yaml",
    "ablation/05_seresnet50_unet_2p5d.yaml",
    "ablation/06_seresnet50_unet_2p5d_sequence.yaml",
)
# The demo's intracranial U-Net recipe, so rung 04 here masks as it does in the demo.
SEGMENTER_STUDIES, SEGMENTER_SEED = DEMO_SEGMENTER_STUDIES, DEMO_SEGMENTER_SEED


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temp)")
    parser.add_argument("--phantom-seed", type=int, default=2024, help="data.phantom.seed")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per rung")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="config override for every rung, e.g. train.amp=false (repeatable)",
    )
    parser.add_argument(
        "--sequence-set",
        action="append",
        default=[],
        help="override of rung 06 only, e.g. sequence.kind=conv (repeatable)",
    )
    parser.add_argument("--no-tta", action="store_true", help="skip the TTA evaluation")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--omp-spin", action="store_true", help="keep OpenMP spin-waiting")
    parser.add_argument(
        "--default-malloc", action="store_true", help="keep glibc's adaptive memory thresholds"
    )
    return parser.parse_args(argv)


def _segmenter(out: Path) -> Path:
    from ichseg.phantom import PhantomConfig, generate_study
    from ichseg.segmentation.training import train_segmenter
    from ichseg.segmentation.unet import SegmenterConfig

    folder = out / "segmenter"
    if (folder / "best.pt").is_file():
        return folder / "best.pt"
    studies = [
        generate_study(SEGMENTER_SEED + i, PhantomConfig(size=128, num_slices=20))
        for i in range(SEGMENTER_STUDIES)
    ]
    config = SegmenterConfig(epochs=DEMO_SEGMENTER_EPOCHS)
    return train_segmenter(studies, config, folder, progress=False)


def _rung_files(out: Path, sequence_set: list[str]) -> list[str]:
    """The packaged rungs; rung 06 with ``--sequence-set`` overrides as a small delta file."""
    import yaml

    from ichseg.config import packaged_config, parse_override

    rungs = list(RUNGS)
    if sequence_set:
        delta: dict[str, Any] = {"base": str(packaged_config(RUNGS[2]))}
        for item in sequence_set:
            key, value = next(iter(parse_override(item).items()))
            delta.setdefault(key, {}).update(value)
        path = out / "rung06_variant.yaml"
        path.write_text(yaml.safe_dump(delta))
        rungs[2] = str(path)
    return rungs


def _runs(out: Path, names: list[str]) -> list[dict[str, Any]]:
    from ichseg.config import load_config

    runs = []
    for name in names:
        for run in sorted((out / "ablation" / name).glob("seed*")):
            config = load_config(run / "config.yaml")
            runs.append({"rung": name, "seed": config.seed, "dir": run, "config": config})
    return runs


def _calibration(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of the test split's ECE and Brier before/after calibration."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["rung"] for r in runs):
        cells: dict[str, list[float]] = {}
        for run in (r for r in runs if r["rung"] == name):
            summary = json.loads((run["dir"] / "eval" / "test" / "metrics.json").read_text())[
                "calibration"
            ]
            for level in ("slices", "series"):
                for when in ("before", "after"):
                    part = summary[level][when]
                    for key in ("mean_ece", "mean_brier"):
                        cells.setdefault(f"{level}_{key}_{when}", []).append(part[key])
                    cells.setdefault(f"{level}_ece_any_{when}", []).append(part["ece"]["any"])
        out[name] = {
            "method": summary["method"],
            "seeds": len(cells["slices_mean_ece_before"]),
            **{k: rounded(sum(v) / len(v), 4) for k, v in cells.items()},
            "per_seed_slices_mean_ece": {
                "before": [rounded(v, 4) for v in cells["slices_mean_ece_before"]],
                "after": [rounded(v, 4) for v in cells["slices_mean_ece_after"]],
            },
        }
    return out


def _run_seconds(runs: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Wall seconds of each run from its files: config written (start) to test report (end).

    For rung 06 this is the head alone when it reused rung 05's run as its backbone.
    """
    out: dict[str, list[float | None]] = {}
    for run in runs:
        start = run["dir"] / "config.yaml"
        end = run["dir"] / "eval" / "test" / "metrics.json"
        seconds = end.stat().st_mtime - start.stat().st_mtime if end.is_file() else None
        out.setdefault(run["rung"], []).append(rounded(seconds, 1))
    return out


def _tta(runs: list[dict[str, Any]], cache_root: Path) -> dict[str, Any]:
    from ichseg.engine.evaluate import evaluate_run
    from ichseg.engine.predict import TestTimeAugmentation

    keys = ("auroc_any", "weighted_log_loss", "series_auroc_any", "series_weighted_log_loss")
    result = {}
    for run in runs:
        if run["seed"] != min(r["seed"] for r in runs if r["rung"] == run["rung"]):
            continue
        if run["rung"].startswith("05"):
            continue
        plain = json.loads((run["dir"] / "eval" / "test" / "metrics.json").read_text())
        started = time.perf_counter()
        tta = evaluate_run(
            run["dir"],
            split="test",
            cache_root=cache_root,
            progress=False,
            tta=TestTimeAugmentation(),
        )
        result[run["rung"]] = {
            "seed": run["seed"],
            "plain": {k: rounded(plain.get(k), 4) for k in keys},
            "flip_tta": {k: rounded(tta.get(k), 4) for k in keys},
            "timing": tta["tta"],
            "evaluate_wall_s": rounded(time.perf_counter() - started, 2),
        }
    return result


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    configure_process(args)
    device = resolve_device(args.device)
    from ichseg.engine.ablation import analyse, run_ablation
    from ichseg.runtime import configure_cpu

    configure_cpu()
    import torch

    out = args.out or Path(tempfile.mkdtemp(prefix="ichseg-seqbench-"))
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "env": environment(device, torch.get_num_threads()),
        "phantom_seed": args.phantom_seed,
        "overrides": args.overrides,
        "sequence_set": args.sequence_set,
    }
    started = time.perf_counter()
    log("training the intracranial U-Net")
    segmenter = _segmenter(out)
    rungs = _rung_files(out, args.sequence_set)
    overrides = [
        f"data.phantom.seed={args.phantom_seed}",
        f"eval.n_boot={args.n_boot}",
        *args.overrides,
    ]
    log(f"ladder 04-06, {args.seeds} seed(s), phantom seed {args.phantom_seed}")
    ladder = run_ablation(
        rungs,
        out / "ablation",
        seeds=args.seeds,
        profile="quick",
        overrides=overrides,
        segmenter=segmenter,
        cache_root=out / "cache",
        progress=False,
    )
    result["train_wall_s"] = rounded(time.perf_counter() - started, 1)
    result["ladder"] = json.loads(ladder.json_path.read_text())
    names = [row["rung"] for row in ladder.table]
    log("rung 06 vs rung 04 (paired)")
    pair = analyse(_runs(out, [names[0], names[2]]), n_boot=args.n_boot)
    result["rung06_vs_rung04"] = {
        "comparison": pair["comparisons"][0],
        "rung04": pair["table"][0],
        "rung06": pair["table"][1],
    }
    result["calibration"] = _calibration(_runs(out, names))
    result["run_wall_s"] = _run_seconds(_runs(out, names))
    if not args.no_tta:
        log("flip TTA on seed 0 of rungs 04 and 06")
        result["tta"] = _tta(_runs(out, [names[0], names[2]]), out / "cache")
    result["wall_s"] = rounded(time.perf_counter() - started, 1)
    result["out"] = str(out)
    emit(result)


if __name__ == "__main__":
    sys.exit(main())
