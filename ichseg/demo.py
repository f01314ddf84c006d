"""``ichseg demo``: the whole pipeline on built-in phantom data, sized for a 2-core CPU."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEMO_SEGMENTER_STUDIES = 12
DEMO_SEGMENTER_SEED = 5000
DEMO_SEGMENTER_EPOCHS = 8  # validation Dice passes 0.98 by epoch 8 on these phantoms
DEMO_SCAN_STUDIES = 4
DEMO_SCAN_SEED = 90000


@dataclass
class DemoResult:
    out_dir: Path
    segmenter: Path
    ablation_markdown: Path
    seconds: float


def run_demo(
    out_dir: str | Path,
    *,
    seeds: int = 1,
    full: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Generate phantoms, train the intracranial U-Net, run the quick ladder, print the table.

    Args:
        out_dir: everything is written under this folder (phantoms, cache, runs, reports).
        seeds: seeds per rung of the ladder. One by default, to fit 10 minutes on 2 CPU cores
            that train in bf16 (8.9 on an AMD EPYC Zen 5; CPUs without fast bf16 train in fp32
            and may need up to twice that): the intervals then cover test-patient sampling
            only (the table says so);
            three or more add the seed component, as ``ichseg ablate`` does by default.
        full: also rungs 05 (2.5D input) and 06 (sequence head over rung 05's embeddings);
            takes longer than the default demo's budget.
        progress: progress bars and per-epoch lines.
        echo: where status lines go.
    """
    from ichseg.engine.ablation import FULL_LADDER, format_comparisons, format_table, run_ablation
    from ichseg.engine.checkpoint import BEST
    from ichseg.phantom import PhantomConfig, generate_study, write_dataset
    from ichseg.segmentation.training import train_segmenter
    from ichseg.segmentation.unet import SegmenterConfig

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    echo(f"[1/4] writing {DEMO_SCAN_STUDIES} phantom head CT studies (DICOM + NIfTI)")
    scans = out_dir / "phantom"
    if not (scans / "manifest.csv").exists():
        write_dataset(
            scans,
            studies=DEMO_SCAN_STUDIES,
            seed=DEMO_SCAN_SEED,
            config=PhantomConfig(size=128, num_slices=20),
        )

    echo(f"[2/4] training the intracranial U-Net on {DEMO_SEGMENTER_STUDIES} phantom studies")
    segmenter_dir = out_dir / "segmenter"
    checkpoint = segmenter_dir / BEST
    if not checkpoint.exists():
        studies = [
            generate_study(DEMO_SEGMENTER_SEED + i, PhantomConfig(size=128, num_slices=20))
            for i in range(DEMO_SEGMENTER_STUDIES)
        ]
        checkpoint = train_segmenter(
            studies, SegmenterConfig(epochs=DEMO_SEGMENTER_EPOCHS), segmenter_dir, progress=progress
        )

    ladder = "full ablation ladder (01-06)" if full else "ablation ladder"
    echo(f"[3/4] {ladder}, quick profile, {seeds} seed(s) per rung")
    result = run_ablation(
        list(FULL_LADDER) if full else None,
        out_dir / "ablation",
        seeds=seeds,
        profile="quick",
        segmenter=checkpoint,
        cache_root=out_dir / "cache",
        progress=progress,
    )

    seconds = time.perf_counter() - started
    over = "test patients and seeds" if seeds > 1 else "test patients (one seed)"
    echo(f"[4/4] results on the held-out test patients: mean over seeds [95 % CI over {over}]")
    echo(format_table(result.table))
    echo("each rung minus the previous one (paired, same patients):")
    echo(format_comparisons(result.table))
    echo(f"report: {result.markdown_path}")
    echo(f"table: {result.csv_path}  plot: {result.plot_path}")
    echo(f"segmenter: {checkpoint}  phantom scans: {scans}")
    echo(f"done in {seconds / 60:.1f} min")
    return DemoResult(out_dir, checkpoint, result.markdown_path, seconds)
