"""Every corpus case (tests/corpus.py) through ``inspect`` and ``segment --method classical``.

For each case and command: the exit code, a report line or row naming the file with the
reason, no traceback, inputs byte-identical afterwards, no temporary file left in the output
folder, and the good series next to the bad input still processed in full.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from corpus import CASES, GOOD_SEED, SLICES, Case, series_uid, write_good
from typer.testing import CliRunner

from ichseg.cli import app


def tree_digest(root: Path) -> str:
    """Hash of every name, symlink target and regular file's bytes (pipes are not opened)."""
    digest = hashlib.sha1()
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(folder) / name
            info = path.lstat()
            digest.update(str(path.relative_to(root)).encode())
            if stat.S_ISLNK(info.st_mode):
                digest.update(b"link:" + os.readlink(path).encode())
            elif stat.S_ISREG(info.st_mode):
                digest.update(path.read_bytes())
            else:
                digest.update(f"mode:{stat.S_IFMT(info.st_mode)}".encode())
    return digest.hexdigest()


@pytest.fixture
def fast_previews(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain PNG instead of the matplotlib grid: the grid is tested in test_segmentation
    and would dominate the corpus' run time. The PNG still goes through the atomic writer."""
    from matplotlib.image import imsave

    from ichseg.segmentation import api

    def preview(hu, mask, path, title=""):
        return api._replace_atomic(Path(path), lambda tmp: imsave(tmp, hu[hu.shape[0] // 2]))

    monkeypatch.setattr(api, "write_preview", preview)


def _build(tmp_path: Path, case: Case) -> tuple[Path, Path]:
    root = tmp_path / "input"
    root.mkdir()
    write_good(root)
    case.build(root)
    return root, root / case.target


def _check_common(result, case: Case) -> None:
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == case.exit_code, result.output


def _lines_naming(output: str, target: Path) -> list[str]:
    return [line for line in output.splitlines() if str(target) in line]


def _check_inspect(root: Path, target: Path, case: Case) -> None:
    runner = CliRunner()
    text = runner.invoke(app, ["inspect", str(root)])
    _check_common(text, case)
    as_json = runner.invoke(app, ["inspect", str(root), "--json"])
    _check_common(as_json, case)
    report = json.loads(as_json.stdout)

    volumes = report["volumes"]
    assert len(volumes) == case.volumes, text.output
    good = [v for v in volumes if v["series_uid"] == series_uid(GOOD_SEED)]
    assert len(good) == 1 and good[0]["num_slices"] == SLICES and not good[0]["dropped"]
    assert good[0]["quality_flags"] == []

    named = _lines_naming(text.output, target)
    if case.outcome in ("skipped", "unreadable"):
        assert any(f"skipped {target}: " in line and case.fragment in line for line in named), (
            text.output
        )
    elif case.outcome == "dropped":
        assert any(f"dropped {target}: " in line and case.fragment in line for line in named), (
            text.output
        )
        (volume,) = [v for v in volumes if any(d["path"] == str(target) for d in v["dropped"])]
        assert "slices_dropped" in volume["quality_flags"]
    elif case.outcome in ("flagged", "ok"):
        (volume,) = [v for v in volumes if v["source"] == str(target)]
        assert not volume["dropped"]
        if case.outcome == "flagged":
            assert case.fragment in volume["quality_flags"], volume
            assert any(
                "quality flags: " in line and case.fragment in line
                for line in text.output.splitlines()
            )
        else:
            assert volume["quality_flags"] == [] and volume["num_slices"] == SLICES, volume
    elif case.outcome == "ignored":
        assert not named and report["ignored"] and not report["skipped"], text.output


def _check_segment(root: Path, target: Path, out: Path, case: Case) -> None:
    result = CliRunner().invoke(
        app, ["segment", str(root), str(out), "--method", "classical", "--quiet"]
    )
    _check_common(result, case)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") or ".tmp" in p.name]
    assert leftovers == []
    rows = json.loads((out / "summary.json").read_text())
    good = [r for r in rows if r["series_uid"] == series_uid(GOOD_SEED)]
    assert [r["status"] for r in good] == ["ok"] and good[0]["num_slices"] == SLICES
    assert (out / f"{good[0]['name']}_mask.nii.gz").is_file()
    assert sum(r["status"] == "ok" for r in rows) == case.volumes

    if case.outcome in ("skipped", "dropped"):
        (row,) = [r for r in rows if r["input"] == str(target)]
        assert row["status"] == "skipped" and case.fragment in row["error"], row
        assert any(f"skipped {target}: " in line for line in result.output.splitlines())
    elif case.outcome == "unreadable":
        errors = [r for r in rows if r["status"] == "error"]
        assert any(str(target) in r["error"] and case.fragment in r["error"] for r in errors), rows
        assert any(str(target) in line for line in result.output.splitlines()), result.output
    elif case.outcome in ("flagged", "ok"):
        (row,) = [r for r in rows if r["input"] == str(target)]
        assert row["status"] == "ok"
        flags = row["quality_flags"].split(";") if row["quality_flags"] else []
        assert (case.fragment in flags) if case.outcome == "flagged" else flags == [], row
    elif case.outcome == "ignored":
        assert not [r for r in rows if r["status"] != "ok"], rows


@pytest.mark.usefixtures("fast_previews")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case(case: Case, tmp_path: Path) -> None:
    root, target = _build(tmp_path, case)
    before = tree_digest(root)
    if "inspect" in case.commands:
        _check_inspect(root, target, case)
    if "segment" in case.commands:
        _check_segment(root, target, tmp_path / "out", case)
    assert tree_digest(root) == before


def test_corpus_is_broad() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.outcome for c in CASES} == {
        "skipped",
        "dropped",
        "unreadable",
        "flagged",
        "ok",
        "ignored",
    }
