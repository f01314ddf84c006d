"""Command line: parse options, call one library function, print.

Heavy libraries (torch, pydicom, nibabel, MONAI) are imported inside the commands so that
``ichseg --help`` answers at once.
"""

from __future__ import annotations

import contextlib
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
    from ichseg.runtime import configure_cpu, keep_freed_memory

    _state["verbose"] = verbose
    # Before any command imports torch: OpenMP reads its settings once, at start-up.
    configure_cpu()
    keep_freed_memory()
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


WorkersOpt = Annotated[
    int | None,
    typer.Option(
        min=1, help="Processes reading DICOM (default: ICHSEG_WORKERS or the CPUs available)."
    ),
]


@contextlib.contextmanager
def _settings(workers: int | None = None, compile: bool | None = None):
    """Within the block: ICHSEG_WORKERS / ICHSEG_COMPILE as given (the readers and the
    classifier take their defaults from them), restored afterwards."""
    import os

    values = {}
    if workers is not None:
        values["ICHSEG_WORKERS"] = str(workers)
    if compile is not None:
        values["ICHSEG_COMPILE"] = "1" if compile else "0"
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
    workers: WorkersOpt = None,
) -> None:
    """Describe every CT series/volume found under INPUT: shape, spacing, HU range, warnings.

    Exit 0 when everything was read, 3 when some files were skipped or slices dropped, 2 when
    nothing usable was found.
    """
    from ichseg.inspection import format_report, inspect_input

    with _settings(workers=workers):
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


@app.command("lr-find")
@user_errors
def lr_find_command(
    config: ConfigArg = None,
    overrides: OverrideOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the curve.")] = Path(
        "lr-find"
    ),
    start_lr: Annotated[float, typer.Option(min=0.0, help="First learning rate.")] = 1e-7,
    end_lr: Annotated[float, typer.Option(min=0.0, help="Last learning rate.")] = 10.0,
    steps: Annotated[int, typer.Option(min=2, help="Mini-batches at most.")] = 100,
    segmenter: Annotated[
        Path | None, typer.Option(help="U-Net checkpoint for masked configs.")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
) -> None:
    """Learning-rate range test: training loss while the rate grows; suggests a rate.

    Trains a throw-away model for up to STEPS mini-batches of the config's training split and
    writes lr_find.png, lr_find.csv and lr_find.json; no run is left behind.
    """
    from ichseg.config import load_config
    from ichseg.engine.lr_find import lr_find
    from ichseg.fileio import check_output_folder

    check_output_folder(out)
    run_config = load_config(config, overrides)
    result = lr_find(
        run_config,
        out,
        start_lr=start_lr,
        end_lr=end_lr,
        steps=steps,
        segmenter=segmenter,
        progress=not quiet,
    )
    record = result.record
    typer.echo(f"suggested lr: {record['suggested_lr']:.2e} ({record['rule']})")
    typer.echo(
        f"loss minimum at {record['minimum_lr']:.2e} (minimum / 10: "
        f"{record['minimum_over_10']:.2e}); tested {record['start_lr']:.0e}.."
        f"{record['end_lr']:.0e}, {record['steps_run']} of {record['steps_requested']} steps "
        f"({record['stopped']})"
    )
    typer.echo(
        f"one-cycle with this peak: --set train.scheduler=onecycle "
        f"--set train.lr={record['suggested_lr']:.2e}"
    )
    typer.echo("wrote " + ", ".join(str(p) for p in result.paths))


@app.command("baseline-metadata")
@user_errors
def baseline_metadata_command(
    config: ConfigArg = None,
    overrides: OverrideOpt = None,
    run: Annotated[
        Path | None,
        typer.Option(help="A training run: its splits.json (and, without --config, its config)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "baseline-metadata"
    ),
    trees: Annotated[int, typer.Option(min=1, help="Trees per forest.")] = 300,
    segmenter: Annotated[
        Path | None, typer.Option(help="U-Net checkpoint for masked configs.")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
) -> None:
    """Random forest on scan attributes only (no pixels): the shortcut a CNN could take.

    Same rows, patient split, metrics and bootstrap CIs as a training run; hyperparameters are
    chosen on validation and the test split is scored once.
    """
    from ichseg.config import load_config
    from ichseg.engine.baseline import metadata_baseline
    from ichseg.engine.checkpoint import CONFIG_FILE
    from ichseg.fileio import check_output_folder

    if config is None and run is None:
        _fail("give --config or --run")
    if config is None and run is not None:
        config = run / CONFIG_FILE
    check_output_folder(out)
    run_config = load_config(config, overrides)
    result = metadata_baseline(
        run_config, out, run_dir=run, segmenter=segmenter, n_estimators=trees, progress=not quiet
    )
    _print_metrics(result.metrics)
    used = result.record["features_used"]
    typer.echo(f"features that vary: {', '.join(used) if used else 'none'}")
    typer.echo(f"report: {out / 'report.md'}")


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
    """Run the ladder VGG16(-BN-GAP) -> ResNet50 -> +SE -> +U-Net over seeds; table with 95 % CIs.

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
    seeds: Annotated[
        int,
        typer.Option(
            min=1, help="Seeds per rung (1: ~9 min on 2 cores in bf16; >= 3 adds seed variance)."
        ),
    ] = 1,
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
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Slices per forward pass [default: 8 on CPU, 32 on CUDA]"),
    ] = None,
    segmenter: Annotated[Path | None, typer.Option(help="Override the U-Net checkpoint.")] = None,
    hemorrhage_segmenter: Annotated[
        Path | None,
        typer.Option(
            help="Hemorrhage U-Net: label maps and volumes in ml per subtype "
            "(default: the run's or bundle's hemorrhage_segmenter.pt, if any)."
        ),
    ] = None,
    output_format: Annotated[
        str, typer.Option(help="Masks as nifti | dicom-seg | both (DICOM inputs for SEG).")
    ] = "nifti",
    sr: Annotated[
        bool, typer.Option("--sr", help="A DICOM Structured Report per series (DICOM inputs).")
    ] = False,
    gradcam_format: Annotated[
        str, typer.Option(help="Grad-CAM as png | dicom (Secondary Capture) | both.")
    ] = "png",
    tta: TtaOpt = False,
    tta_shift: TtaShiftOpt = 0,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    workers: WorkersOpt = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="Compile the classifier (pays after ~20 studies; not sequence models' "
            "backbones; default: ICHSEG_COMPILE).",
        ),
    ] = None,
) -> None:
    """Per-slice and per-series hemorrhage probabilities, masks and Grad-CAM for a folder.

    ichseg predict MODEL [MODEL ...] INPUT OUT: the last two paths are always INPUT and OUT.
    Several models (seeds or folds of one task) are averaged after calibration, and series.csv
    gains sd_<class>, the standard deviation of the series probability over the models.
    """
    from ichseg.engine.predict import make_tta
    from ichseg.inference import predict as run_predict

    with _settings(workers=workers, compile=compile):
        result = run_predict(
            model,
            input,
            out,
            gradcam=gradcam,
            gradcam_slices=gradcam_slices,
            batch_size=batch_size,
            segmenter=segmenter,
            progress=not quiet,
            hemorrhage_segmenter=hemorrhage_segmenter,
            output_format=output_format,
            sr=sr,
            gradcam_format=gradcam_format,
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
    hemorrhage_model: Annotated[
        Path | None,
        typer.Option(help="Hemorrhage U-Net: label map NIfTI and volumes in ml per subtype."),
    ] = None,
    output_format: Annotated[
        str, typer.Option(help="nifti | dicom-seg | both (DICOM SEG for DICOM inputs).")
    ] = "nifti",
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    workers: WorkersOpt = None,
) -> None:
    """Intracranial masks as NIfTI (same grid as the image NIfTI), previews, summary."""
    from ichseg.segmentation.api import segment_folder

    chosen = method or ("unet" if model else "classical")
    if chosen == "unet" and model is None:
        _fail("--method unet needs --model CHECKPOINT")
    with _settings(workers=workers):
        result = segment_folder(
            input,
            out,
            method=chosen,
            checkpoint=model,
            reference_dir=reference,
            progress=not quiet,
            hemorrhage_checkpoint=hemorrhage_model,
            output_format=output_format,
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
    for row in result.rows:
        if row["status"] == "ok" and row["warnings"]:
            typer.echo(f"warning {row['input']}: {row['warnings']}", err=True)
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
    if config is None and target == "hemorrhage":
        from ichseg.segmentation.recipes import HEMORRHAGE_RECIPE

        config = HEMORRHAGE_RECIPE
        typer.echo(f"recipe: {config}")
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


@app.command()
@user_errors
def serve(
    model: Annotated[Path, typer.Argument(help="Training run folder or exported bundle.")],
    host: Annotated[
        str, typer.Option(help="Address to listen on (anything but loopback exposes uploads).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: a free one).")] = 8000,
    segmenter: Annotated[Path | None, typer.Option(help="Override the U-Net checkpoint.")] = None,
    hemorrhage_segmenter: Annotated[
        Path | None,
        typer.Option(help="Hemorrhage U-Net for volumes in ml (default: the model's, if any)."),
    ] = None,
    max_upload_mb: Annotated[float, typer.Option(min=0.001, help="Largest upload in MiB.")] = 512.0,
    max_file_mb: Annotated[
        float | None, typer.Option(min=0.001, help="Largest single file in MiB (default: same).")
    ] = None,
    keep_uploads: Annotated[
        bool, typer.Option(help="Keep each request's temporary folder (holds patient data).")
    ] = False,
    device: Annotated[str | None, typer.Option(help="cpu | cuda (default: cuda if any).")] = None,
) -> None:
    """A web page (and JSON API) to upload a CT and see probabilities, mask and Grad-CAM."""
    from ichseg.serve import create_app, open_socket, run_app, socket_url

    listener = open_socket(host, port)  # a port in use fails before the model is loaded
    web_app = create_app(
        model,
        segmenter,
        max_upload_mb,
        keep_uploads,
        max_file_mb=max_file_mb,
        device=device,
        hemorrhage_segmenter=hemorrhage_segmenter,
    )
    typer.echo(f"serving {model} at {socket_url(listener)} (Ctrl+C to stop)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(
            f"warning: listening on {host}: anyone who can reach it can upload, without login",
            err=True,
        )
    run_app(web_app, listener, log_level="debug" if _state["verbose"] else "info")


@app.command("evaluate-segmenter")
@user_errors
def evaluate_segmenter_command(
    checkpoint: Annotated[Path, typer.Argument(help="Hemorrhage U-Net checkpoint (best.pt).")],
    out: Annotated[Path, typer.Argument(help="Output folder (metrics, report, plot).")],
    phantom_studies: Annotated[
        int, typer.Option(min=1, help="Phantom studies to evaluate on (without --images).")
    ] = 40,
    seed: Annotated[
        int, typer.Option(help="First phantom seed: keep it away from the training seeds.")
    ] = 50000,
    size: Annotated[int, typer.Option(min=32, help="Phantom in-plane pixels.")] = 256,
    slices: Annotated[int, typer.Option(min=1, help="Phantom slices per study.")] = 32,
    images: Annotated[
        Path | None, typer.Option(help="Folder of NIfTI CTs instead of phantom studies.")
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="Reference label maps for --images (<stem>_hemorrhage.nii.gz)."),
    ] = None,
    min_component_ml: Annotated[
        float | None, typer.Option(min=0.0, help="Override the smallest bleed kept (ml).")
    ] = None,
    restrict: Annotated[
        bool | None,
        typer.Option(
            "--restrict/--no-restrict", help="Override keeping blood inside the intracranial mask."
        ),
    ] = None,
    vote: Annotated[
        bool | None,
        typer.Option("--vote/--no-vote", help="Override giving each bleed one subtype."),
    ] = None,
    extra_axial_shape: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Override the extra-axial shape rule: a bleed is subdural when its volume "
            "over its thickness cubed is above this value, else epidural (0: off).",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
) -> None:
    """Dice and volume error per subtype, ABC/2 and Bland-Altman of a hemorrhage segmenter."""
    from ichseg.fileio import check_output_folder
    from ichseg.segmentation.evaluation import (
        evaluate_hemorrhage_segmenter,
        nifti_cases,
        phantom_cases,
    )

    check_output_folder(out, [p for p in (images, labels) if p is not None])
    if images is not None:
        if labels is None:
            _fail("--images needs --labels (a folder of reference label maps)")
        cases = nifti_cases(images, labels)
        described = f"NIfTI CTs in {images}, reference label maps in {labels}"
    else:
        from ichseg.phantom import PhantomConfig

        cases = phantom_cases(phantom_studies, seed, PhantomConfig(size=size, num_slices=slices))
        described = f"phantom seeds {seed}..{seed + phantom_studies - 1}, {size}x{size}x{slices}"
    result = evaluate_hemorrhage_segmenter(
        checkpoint,
        cases,
        out,
        restrict_to_intracranial=restrict,
        min_component_ml=min_component_ml,
        component_vote=vote,
        extra_axial_shape=extra_axial_shape,
        cases_description=described,
        progress=not quiet,
    )
    summary = result["summary"]
    for name, figures in summary.items():
        if name == "abc2_intraparenchymal":
            continue
        dice = figures["dice_mean"]
        error = figures["abs_error_ml_median"]
        typer.echo(
            f"{name:17s} n={figures['n_reference']:3d}  "
            f"dice {'n/a' if dice is None else f'{dice:.3f}'}  "
            f"median |error| {'n/a' if error is None else f'{error:.2f}'} ml"
        )
    typer.echo(f"report: {out / 'report.md'}")


bundle_app = typer.Typer(help="MONAI bundle export.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")


@bundle_app.command("export")
@user_errors
def bundle_export(
    run: Annotated[Path, typer.Argument(help="Training run folder.")],
    out: Annotated[Path, typer.Argument(help="Bundle folder to create.")],
    segmenter: Annotated[Path | None, typer.Option(help="U-Net checkpoint to include.")] = None,
    hemorrhage_segmenter: Annotated[
        Path | None,
        typer.Option(
            help="Hemorrhage U-Net to include, for volumes in ml "
            "(default: the run's hemorrhage_segmenter.pt, if any)."
        ),
    ] = None,
    version: Annotated[str, typer.Option(help="Bundle version.")] = "0.1.0",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle folder.")] = False,
) -> None:
    """Write a MONAI bundle that `python -m monai.bundle run` executes."""
    from ichseg.bundle import export_bundle

    path = export_bundle(
        run,
        out,
        segmenter=segmenter,
        hemorrhage_segmenter=hemorrhage_segmenter,
        version=version,
        overwrite=overwrite,
    )
    typer.echo(f"bundle: {path}")
    typer.echo(
        f"run it: python -m monai.bundle run --config_file {path}/configs/inference.json "
        f"--meta_file {path}/configs/metadata.json --bundle_root {path} "
        "--dataset_dir INPUT --output_dir OUTPUT"
    )
