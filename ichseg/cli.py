"""Command line: parse options, call one library function, print.

Heavy libraries (torch, pydicom, nibabel, MONAI) are imported inside the commands so that
``ichseg --help`` answers at once.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
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


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show tracebacks and debug logs.")
    ] = False,
) -> None:
    _state["verbose"] = verbose
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
    """Describe every CT series/volume found under INPUT: shape, spacing, HU range, warnings."""
    from ichseg.inspection import inspect_input

    report = inspect_input(input)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        from ichseg.inspection import format_report

        typer.echo(format_report(report))
    if report["skipped"] and report["volumes"]:
        raise typer.Exit(EXIT_PARTIAL)
    if not report["volumes"]:
        raise typer.Exit(EXIT_ERROR)


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


def run() -> None:
    """Entry point that keeps the exit code of typer."""
    sys.exit(app())
