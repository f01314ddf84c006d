"""Command line: parse options, call one library function, print.

Heavy libraries (torch, pydicom, nibabel, MONAI) are imported inside the commands so that
``ichseg --help`` answers at once.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="ichseg",
    help="Intracranial hemorrhage detection on head CT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"verbose": False}

EXIT_ERROR = 2
EXIT_PARTIAL = 3
"""Exit code when some inputs were processed and others were skipped."""
_SKIPPED_SHOWN = 10


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show tracebacks and debug logs.")
    ] = False,
) -> None:
    from ichseg.runtime import configure_cpu

    _state["verbose"] = verbose
    # Before any command imports torch: OpenMP reads its settings once, at start-up.
    configure_cpu()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        # pydicom logs every minor standard violation of real archives at WARNING.
        logging.getLogger("pydicom").setLevel(logging.ERROR)


def _fail(message: str, code: int = EXIT_ERROR) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def user_errors(command):
    """Report library errors as one line and a non-zero exit; tracebacks only with --verbose."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any):
        from ichseg.errors import IchsegError

        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except IchsegError as error:
            if _state["verbose"]:
                raise
            _fail(str(error))
        except KeyboardInterrupt:
            _fail("interrupted", code=130)
        except Exception as error:  # an unexpected failure still gets one line by default
            if _state["verbose"]:
                raise
            _fail(f"{type(error).__name__}: {error} (run with --verbose for the traceback)")

    return wrapper


@app.command()
@user_errors
def inspect(
    input: Annotated[Path, typer.Argument(help="DICOM file or folder tree, NIfTI file, or mix.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Describe every CT series/volume found under INPUT: shape, spacing, HU range, warnings.

    Exit 0 when everything was read, 3 when some files were skipped or slices dropped, 2 when
    nothing usable was found.
    """
    from ichseg.inspection import format_report, inspect_input

    report = inspect_input(input)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if not report["volumes"]:
        raise typer.Exit(EXIT_ERROR)
    if report["partial"]:
        raise typer.Exit(EXIT_PARTIAL)


@app.command()
@user_errors
def phantom(
    out: Annotated[Path, typer.Argument(help="Output folder (created).")],
    studies: Annotated[int, typer.Option(min=1, help="Number of studies.")] = 20,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same data.")] = 0,
    size: Annotated[int, typer.Option(min=32, help="In-plane pixels.")] = 256,
    slices: Annotated[int, typer.Option(min=1, help="Slices per study.")] = 32,
    thickness: Annotated[float, typer.Option(help="Slice thickness in mm.")] = 5.0,
    negative_fraction: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.4,
    rsna_12bit: Annotated[bool, typer.Option(help="Write the RSNA 12-bit quirk.")] = False,
    tilt: Annotated[float, typer.Option(help="Gantry tilt in degrees.")] = 0.0,
    shuffle_names: Annotated[bool, typer.Option(help="Random file names.")] = False,
    missing_slice: Annotated[bool, typer.Option(help="Drop one interior DICOM file.")] = False,
    transfer_syntax: Annotated[str, typer.Option(help="explicit | jpeg2000 | rle")] = "explicit",
) -> None:
    """Write synthetic head CT studies (DICOM + NIfTI + masks + labels) with known truth."""
    from ichseg.phantom import PhantomConfig, Quirks, write_dataset

    config = PhantomConfig(
        size=size,
        num_slices=slices,
        slice_thickness_mm=thickness,
        negative_fraction=negative_fraction,
    )
    quirks = Quirks(
        rsna_12bit=rsna_12bit,
        gantry_tilt_deg=tilt,
        shuffle_names=shuffle_names,
        missing_slice=missing_slice,
        transfer_syntax=transfer_syntax,
    )
    manifest = write_dataset(out, studies=studies, seed=seed, config=config, quirks=quirks)
    typer.echo(f"wrote {studies} studies to {out} (manifest: {manifest})")


ConfigArg = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML run config (may name a base).")
]
OverrideOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key, e.g. --set train.epochs=3."),
]


@app.command()
@user_errors
def train(
    out: Annotated[Path, typer.Argument(help="Run folder (checkpoints, metrics, report).")],
    config: ConfigArg = None,
    overrides: OverrideOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pt (same config).")] = False,
    segmenter: Annotated[
        Path | None, typer.Option(help="U-Net checkpoint for masked configs.")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
) -> None:
    """Train a classifier from a YAML config; torchrun-aware (DDP on CPU with gloo or GPU)."""
    from ichseg.config import load_config
    from ichseg.engine.train import train as train_run
    from ichseg.fileio import check_output_folder

    check_output_folder(out)
    run_config = load_config(config, overrides)
    result = train_run(run_config, out, resume=resume, segmenter=segmenter, progress=not quiet)
    if result.test_metrics is not None:
        _print_metrics(result.test_metrics)
        typer.echo(f"report: {out / 'eval' / 'test' / 'report.md'}")


def _print_metrics(metrics: dict[str, Any]) -> None:
    keys = (
        "auroc_any",
        "macro_auroc",
        "weighted_log_loss",
        "series_auroc_any",
        "series_weighted_log_loss",
        "accuracy",
    )
    parts = [f"{k} {metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), float)]
    typer.echo(f"{metrics.get('split', 'test')}: " + "  ".join(parts))


TtaOpt = Annotated[
    bool, typer.Option("--tta", help="Test-time augmentation: average with the left-right flip.")
]
TtaShiftOpt = Annotated[
    int,
    typer.Option(
        "--tta-shift", min=0, help="TTA: also average 4 copies shifted by this many pixels."
    ),
]


def _echo_tta(record: dict[str, Any] | None) -> None:
    if not record or record.get("views", 1) <= 1:
        return
    added = record.get("forward_tta_added_s") or 0.0
    plain = record.get("forward_plain_s") or 0.0
    share = f" (+{100 * added / plain:.0f} %)" if plain > 0 else ""
    typer.echo(
        f"TTA {record.get('name')}: {record['views']} views; forward passes {plain:.2f} s plain "
        f"+ {added:.2f} s added by TTA{share}"
    )


@app.command()
@user_errors
def evaluate(
    run: Annotated[Path, typer.Argument(help="A training run folder.")],
    split: Annotated[str, typer.Option(help="val | test")] = "test",
    segmenter: Annotated[
        Path | None, typer.Option(help="Another U-Net than the run's own (changes the input).")
    ] = None,
    tta: TtaOpt = False,
    tta_shift: TtaShiftOpt = 0,
) -> None:
    """Re-evaluate a run's best checkpoint on its own held-out split (from splits.json).

    Calibration (the config's eval.calibration) is fitted on validation and saved; thresholds
    are chosen on the calibrated validation probabilities. With --tta the probabilities (for
    sequence runs: the embeddings) are averaged over flipped (and shifted) views; its
    thresholds and calibration go to RUN/tta-<name>/ and the report to eval/<split>_<name>/.
    """
    from ichseg.engine.evaluate import eval_folder, evaluate_run
    from ichseg.engine.predict import make_tta

    if split not in ("val", "test"):
        _fail(f"--split must be val or test, got {split!r}")
    augmentation = make_tta(tta, tta_shift)
    metrics = evaluate_run(run, split=split, segmenter=segmenter, tta=augmentation)
    _print_metrics(metrics)
    _echo_calibration(metrics.get("calibration"))
    _echo_tta(metrics.get("tta"))
    typer.echo(f"report: {run / 'eval' / eval_folder(split, augmentation) / 'report.md'}")


def _echo_calibration(summary: dict[str, Any] | None) -> None:
    if not summary or summary.get("method") == "none":
        return
    for level in ("slices", "series"):
        part = summary.get(level)
        if part and part["before"]["mean_ece"] is not None:
            typer.echo(
                f"calibration ({summary['method']}), {level}: mean ECE "
                f"{part['before']['mean_ece']:.4f} -> {part['after']['mean_ece']:.4f}, "
                f"mean Brier {part['before']['mean_brier']:.4f} -> "
                f"{part['after']['mean_brier']:.4f}"
            )


@app.command()
@user_errors
def ablate(
    configs: Annotated[
        list[Path] | None, typer.Argument(help="Rung configs (default: the packaged ladder).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("ablation"),
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per rung (>= 3 for CIs).")] = 3,
    profile: Annotated[str | None, typer.Option(help="quick: small CPU profile.")] = None,
    overrides: OverrideOpt = None,
    segmenter: Annotated[Path | None, typer.Option(help="U-Net checkpoint for rung 4.")] = None,
    full: Annotated[
        bool, typer.Option("--full", help="Default ladder plus 05 (2.5D) and 06 (sequence).")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
) -> None:
    """Run the ladder VGG16 -> ResNet50 -> +SE -> +U-Net over seeds; table with 95 % CIs.

    --full adds rung 05 (neighbour slices as channels) and 06 (a sequence head over rung 05's
    embeddings; seed s reuses rung 05's run of seed s as its backbone).
    """
    from ichseg.engine.ablation import FULL_LADDER, format_table, run_ablation

    if full and configs:
        _fail("--full runs the packaged ladder; give either --full or rung configs")
    result = run_ablation(
        list(FULL_LADDER) if full else configs,
        out,
        seeds=seeds,
        profile=profile,
        overrides=overrides,
        segmenter=segmenter,
        progress=not quiet,
    )
    typer.echo(format_table(result.table))
    typer.echo(f"wrote {result.csv_path}, {result.markdown_path}, {result.plot_path}")


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("ichseg-demo"),
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per rung.")] = 3,
    full: Annotated[
        bool,
        typer.Option("--full", help="Also rungs 05 (2.5D) and 06 (sequence head); longer."),
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
) -> None:
    """Run the whole pipeline on built-in phantom data: segmenter, ladder, report."""
    from ichseg.demo import run_demo

    run_demo(out, seeds=seeds, full=full, progress=not quiet, echo=typer.echo)


@app.command()
@user_errors
def predict(
    model: Annotated[
        list[Path],
        typer.Argument(
            help="Training run folder(s) or exported bundle(s); several form an ensemble.",
            show_default=False,
        ),
    ],
    input: Annotated[Path, typer.Argument(help="DICOM folder tree and/or NIfTI files.")],
    out: Annotated[Path, typer.Argument(help="Output folder (must not be inside INPUT).")],
    gradcam: Annotated[bool, typer.Option(help="Grad-CAM PNGs for positive series.")] = True,
    gradcam_slices: Annotated[int, typer.Option(min=1, help="Slices per positive series.")] = 3,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    segmenter: Annotated[Path | None, typer.Option(help="Override the U-Net checkpoint.")] = None,
    tta: TtaOpt = False,
    tta_shift: TtaShiftOpt = 0,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Per-slice and per-series hemorrhage probabilities, masks and Grad-CAM for a folder.

    ichseg predict MODEL [MODEL ...] INPUT OUT: the last two paths are always INPUT and OUT.
    Several models (seeds or folds of one task) are averaged after calibration, and series.csv
    gains sd_<class>, the standard deviation of the series probability over the models.
    """
    from ichseg.engine.predict import make_tta
    from ichseg.inference import predict as run_predict

    result = run_predict(
        model,
        input,
        out,
        gradcam=gradcam,
        gradcam_slices=gradcam_slices,
        batch_size=batch_size,
        segmenter=segmenter,
        progress=not quiet,
        tta=make_tta(tta, tta_shift),
    )
    positive = sum(1 for r in result.series_rows if r.get("label_any", 0))
    members = f" (ensemble of {len(model)})" if len(model) > 1 else ""
    typer.echo(
        f"{len(result.series_rows)} series, {len(result.slice_rows)} slices, "
        f"{positive} positive{members}; {result.seconds_per_study:.2f} s per study; "
        f"{len(result.skipped)} file(s) skipped"
    )
    _echo_tta({**result.info.get("tta", {}), **result.info.get("timing", {})})
    for member in result.info.get("models", []):
        for note in member.get("notes", []):
            typer.echo(f"note: {member['path']}: {note}", err=True)
    written = [
        n
        for n in ("predictions.csv", "series.csv", "series.json", "predict_info.json")
        if (out / n).exists()
    ]
    typer.echo("wrote " + ", ".join(str(out / n) for n in written))
    if result.partial:
        typer.echo(f"skipped files and reasons: {out / 'skipped.csv'}", err=True)
        raise typer.Exit(EXIT_PARTIAL)


@app.command()
@user_errors
def segment(
    input: Annotated[Path, typer.Argument(help="DICOM folder tree, NIfTI file or folder.")],
    out: Annotated[Path, typer.Argument(help="Output folder (must not be inside INPUT).")],
    model: Annotated[Path | None, typer.Option(help="U-Net checkpoint (best.pt).")] = None,
    method: Annotated[
        str | None, typer.Option(help="classical | unet (default: unet with --model).")
    ] = None,
    reference: Annotated[
        Path | None, typer.Option(help="Folder of reference masks: adds Dice and HD95.")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Intracranial masks as NIfTI (same grid as the image NIfTI), previews, summary."""
    from ichseg.segmentation.api import segment_folder

    chosen = method or ("unet" if model else "classical")
    if chosen == "unet" and model is None:
        _fail("--method unet needs --model CHECKPOINT")
    result = segment_folder(
        input, out, method=chosen, checkpoint=model, reference_dir=reference, progress=not quiet
    )
    typer.echo(
        f"{result.num_ok} volume(s) segmented, {result.num_error} failed, "
        f"{len(result.skipped)} file(s) skipped; summary: {result.summary_csv}"
    )
    for row in result.rows:
        if row["status"] == "error":
            message = (
                row["error"] if row["input"] in row["error"] else f"{row['input']}: {row['error']}"
            )
            typer.echo(f"failed {message}", err=True)
    for path, reason in result.skipped[:_SKIPPED_SHOWN]:
        typer.echo(f"skipped {path}: {reason}", err=True)
    if len(result.skipped) > _SKIPPED_SHOWN:
        typer.echo(f"... and {len(result.skipped) - _SKIPPED_SHOWN} more in the summary", err=True)
    if result.num_error or result.skipped:
        raise typer.Exit(EXIT_PARTIAL)


@app.command("train-segmenter")
@user_errors
def train_segmenter_command(
    out: Annotated[Path, typer.Argument(help="Run folder (best.pt, last.pt, metrics).")],
    config: ConfigArg = None,
    overrides: OverrideOpt = None,
    target: Annotated[
        str | None, typer.Option(help="intracranial | hemorrhage (default: the config's).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pt (same config).")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
) -> None:
    """Train a U-Net: the intracranial mask, or hemorrhage label maps (--target hemorrhage)."""
    from ichseg.fileio import check_output_folder
    from ichseg.segmentation.recipes import load_segmenter_run, training_cases
    from ichseg.segmentation.training import train_segmenter

    check_output_folder(out)
    extra = [f"model.target={target}"] if target else []
    run = load_segmenter_run(config, [*(overrides or []), *extra])
    model = run.segmenter_config()
    checkpoint = train_segmenter(
        training_cases(run.data, model.target),
        model,
        out,
        data=run.data.model_dump(mode="json"),
        resume=resume,
        progress=not quiet,
    )
    typer.echo(f"best checkpoint: {checkpoint}")


bundle_app = typer.Typer(help="MONAI bundle export.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")


@bundle_app.command("export")
@user_errors
def bundle_export(
    run: Annotated[Path, typer.Argument(help="Training run folder.")],
    out: Annotated[Path, typer.Argument(help="Bundle folder to create.")],
    segmenter: Annotated[Path | None, typer.Option(help="U-Net checkpoint to include.")] = None,
    version: Annotated[str, typer.Option(help="Bundle version.")] = "0.1.0",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle folder.")] = False,
) -> None:
    """Write a MONAI bundle that `python -m monai.bundle run` executes."""
    from ichseg.bundle import export_bundle

    path = export_bundle(run, out, segmenter=segmenter, version=version, overwrite=overwrite)
    typer.echo(f"bundle: {path}")
    typer.echo(
        f"run it: python -m monai.bundle run --config_file {path}/configs/inference.json "
        f"--meta_file {path}/configs/metadata.json --bundle_root {path} "
        "--dataset_dir INPUT --output_dir OUTPUT"
    )
