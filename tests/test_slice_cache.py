"""The slice cache built file by file (the RSNA layout) and its resumability."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import dicom_cache_config

from ichseg.engine import cache_per_slice
from ichseg.engine.cache import build_slices, cached_skips
from ichseg.errors import ConfigError


@pytest.fixture(scope="module")
def flat_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three phantom studies' slices in one folder under unique names, with RSNA labels, a
    file that is not DICOM, a slice with truncated pixels and a duplicate of another slice."""
    from ichseg.phantom import PhantomConfig, write_dataset

    base = tmp_path_factory.mktemp("flat")
    write_dataset(base / "data", studies=3, seed=9, config=PhantomConfig(size=48, num_slices=8))
    flat = base / "flat"
    flat.mkdir()
    files = sorted((base / "data" / "dicom").glob("*/*.dcm"))
    for path in files:
        shutil.copyfile(path, flat / f"{path.parent.name}_{path.name}")
    (flat / "readme.txt").write_text("not an image")
    victim = flat / f"{files[3].parent.name}_{files[3].name}"
    victim.write_bytes(victim.read_bytes()[:-300])
    shutil.copyfile(files[10], flat / "zz_copy.dcm")
    return flat, base / "data" / "labels_rsna.csv"


def _by_slice(slices) -> dict[tuple[str, int], int]:
    return {
        (str(slices.series[r]), int(slices.slice_index[r])): r
        for r in range(len(slices))
        if slices.slice_index[r] >= 0
    }


@pytest.mark.parametrize("context", [0, 1])
def test_file_by_file_cache_equals_the_series_cache(flat_data, tmp_path: Path, context: int):
    flat, labels = flat_data
    config = dicom_cache_config(flat, labels, tmp_path, context)
    one = build_slices(config, progress=False, per_slice=True, shard_slices=7, workers=1)
    two = build_slices(config, progress=False, per_slice=False, workers=1)
    assert one.folder != two.folder
    assert json.loads((one.folder / "done.json").read_text())["layout"] == "per-slice"
    rows_one, rows_two = _by_slice(one), _by_slice(two)
    assert set(rows_one) == set(rows_two) and len(rows_two) == 24 - 1  # the truncated slice
    for key, b in rows_two.items():
        a = rows_one[key]
        assert np.array_equal(one.images[a], two.images[b])
        assert np.array_equal(one.labels[a], two.labels[b], equal_nan=True)
        assert (one.groups[a], one.sop_uids[a]) == (two.groups[b], two.sop_uids[b])
        assert one.trainable[a] == two.trainable[b]
        assert np.array_equal(one.stack(a), two.stack(b))
    # Scan attributes reach the per-slice layout too (header fields; air needs the pixels).
    for name in ("manufacturer", "kvp", "slice_thickness", "pixel_spacing", "rows"):
        a_values, b_values = one.attribute(name), two.attribute(name)
        for key, b in rows_two.items():
            assert a_values[rows_one[key]] == b_values[b], name
    assert one.attribute("rows")[one.usable()][0] is not None
    assert sorted(one.sop_uids[one.usable()]) == sorted(two.sop_uids[two.usable()])
    skipped = {entry["unit"]: entry["reason"] for entry in cached_skips(one.folder)}
    assert skipped == {f"file:{flat / 'readme.txt'}": "not a DICOM file (no DICM preamble)"}


def test_slices_windowed_at_once_and_in_stacks_keep_their_rows(
    flat_data, tmp_path: Path, monkeypatch
):
    """A shard whose slices go both ways (every third one waits for a stack, as 32-bit stored
    values would) gives the same cache as the series build."""
    from ichseg.preprocess.pipeline import Preprocessor

    flat, labels = flat_data
    calls = iter(range(10**6))
    real = Preprocessor.stored_slice

    def every_third_stacked(self, stored, rescale):
        return None if next(calls) % 3 == 0 else real(self, stored, rescale)

    reference = build_slices(
        dicom_cache_config(flat, labels, tmp_path / "series"),
        progress=False,
        per_slice=False,
        workers=1,
    )
    monkeypatch.setattr(cache_per_slice, "PER_SLICE_BATCH", 2)
    monkeypatch.setattr(Preprocessor, "stored_slice", every_third_stacked)
    mixed = build_slices(
        dicom_cache_config(flat, labels, tmp_path / "mixed"),
        progress=False,
        per_slice=True,
        shard_slices=11,
        workers=1,
    )
    assert next(calls) > 20  # the tables were asked for every decoded slice
    rows_mixed, rows_reference = _by_slice(mixed), _by_slice(reference)
    assert set(rows_mixed) == set(rows_reference)
    for key, b in rows_reference.items():
        a = rows_mixed[key]
        assert np.array_equal(mixed.images[a], reference.images[b])
        assert mixed.sop_uids[a] == reference.sop_uids[b]
        assert mixed.trainable[a] == reference.trainable[b]
        assert np.array_equal(mixed.stack(a), reference.stack(b))


def test_workers_hold_a_bounded_number_of_slices(flat_data, tmp_path: Path, monkeypatch):
    """Slices that wait for a stack (here all of them: the lookup tables are switched off) come
    in stacks of at most PER_SLICE_BATCH; with the tables, no file waits for another."""
    from ichseg.preprocess.pipeline import Preprocessor

    flat, labels = flat_data
    holding: list[int] = []
    waiting: list[int] = []
    real = cache_per_slice._window_stacks

    def counting(pending, *args):
        holding.append(sum(p.decoded is not None and p.decoded.stored is not None for p in pending))
        waiting.append(len(pending))
        return real(pending, *args)

    monkeypatch.setattr(cache_per_slice, "_window_stacks", counting)
    build_slices(
        dicom_cache_config(flat, labels, tmp_path / "tables"),
        progress=False,
        per_slice=True,
        workers=1,
    )
    assert waiting and max(waiting) == 0

    holding.clear()
    monkeypatch.setattr(cache_per_slice, "PER_SLICE_BATCH", 5)
    monkeypatch.setattr(Preprocessor, "stored_slice", lambda self, stored, rescale: None)
    config = dicom_cache_config(flat, labels, tmp_path / "stacks")
    build_slices(config, progress=False, per_slice=True, shard_slices=100, workers=1)
    assert max(holding) == 5 and sum(holding) == 24 and len(holding) >= 24 // 5


def test_file_by_file_builds_window_through_the_stored_value_tables(
    flat_data, tmp_path: Path, monkeypatch
):
    """Every decoded slice of an unmasked DICOM build takes the lookup-table path, none the
    float one (both give the same arrays, so only this shows the fast path is used)."""
    from ichseg.preprocess.pipeline import Preprocessor

    flat, labels = flat_data
    looked_up: list[bool] = []
    real_lookup = Preprocessor.stored_slice

    def counting(self, stored, rescale):
        out = real_lookup(self, stored, rescale)
        looked_up.append(out is not None)
        return out

    def float_path(self, volume, mask=None):
        raise AssertionError("a slice went through the float path")

    monkeypatch.setattr(Preprocessor, "stored_slice", counting)
    monkeypatch.setattr(Preprocessor, "__call__", float_path)
    build_slices(
        dicom_cache_config(flat, labels, tmp_path), progress=False, per_slice=True, workers=1
    )
    assert len(looked_up) == 24 and all(looked_up)


def test_masked_runs_need_whole_series(flat_data, tmp_path: Path):
    flat, labels = flat_data
    config = dicom_cache_config(flat, labels, tmp_path)
    config = config.model_copy(
        update={"masking": config.masking.model_copy(update={"enabled": True})}
    )
    config.masking.method = "classical"
    with pytest.raises(ConfigError, match="whole series"):
        build_slices(config, progress=False, per_slice=True, workers=1)
    slices = build_slices(config, progress=False, workers=1)  # automatic: series by series
    assert json.loads((slices.folder / "done.json").read_text()).get("layout") is None


def test_head_cropped_runs_cache_whole_series_cut_to_the_head(flat_data, tmp_path: Path):
    from ichseg.io.dicom import read_dicom
    from ichseg.preprocess.pipeline import Preprocessor

    flat, labels = flat_data
    config = dicom_cache_config(flat, labels, tmp_path, context=0, head_crop=True)
    with pytest.raises(ConfigError, match="whole series"):
        build_slices(config, progress=False, per_slice=True, workers=1)
    slices = build_slices(config, progress=False, workers=1)
    uncropped = build_slices(dicom_cache_config(flat, labels, tmp_path, context=0), progress=False)
    assert slices.folder != uncropped.folder
    rows = _by_slice(slices)
    preprocessor = Preprocessor.from_config(config)
    volumes, _ = read_dicom(flat)
    assert len(volumes) == 3
    for volume in volumes:
        assert preprocessor.crop_box(volume) != (0, 48, 0, 48)
        base = preprocessor(volume).base
        for z in range(volume.num_slices):
            assert np.array_equal(slices.images[rows[(volume.series_uid, z)]], base[z])


_CHILD = """
import sys, time
from ichseg.config import load_config
from ichseg.engine import cache, {module}

real = {module}.{function}

def slow(*args, **kwargs):
    out = real(*args, **kwargs)
    time.sleep(0.3)  # time for the test to kill the build between two shards
    return out

{module}.{function} = slow
config = load_config(extra={config!r})
cache.build_slices(config, progress=False, workers=1, shard_slices=4, per_slice={per_slice})
"""


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    "per_slice", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["files", "series"]
)
def test_a_killed_build_resumes_with_its_finished_shards(flat_data, tmp_path: Path, per_slice):
    flat, labels = flat_data
    config = dicom_cache_config(flat, labels, tmp_path / "cache")
    module, function = (
        ("cache_per_slice", "_build_file_shard") if per_slice else ("cache", "_build_shard")
    )
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            _CHILD.format(
                module=module,
                function=function,
                config=config.model_dump(mode="json"),
                per_slice=per_slice,
            )
        )
    )
    child = subprocess.Popen([sys.executable, str(script)], env=os.environ.copy())
    deadline = time.monotonic() + 300
    finished: list[Path] = []
    try:
        while time.monotonic() < deadline and child.poll() is None:
            finished = sorted((tmp_path / "cache").glob("slices-*/shard-*"))
            if len(finished) >= 2:
                break
            time.sleep(0.05)
        assert child.poll() is None, "the build ended before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    folder = finished[0].parent
    assert not (folder / "done.json").exists()
    shards = {p.name for p in folder.glob("shard-*")}
    plan = json.loads((folder / "plan.json").read_text())
    assert 2 <= len(shards) < len(plan["shards"])
    before = {name: _files(folder / name) for name in shards}

    # A file-by-file build resumes with the plan it finds, even where this build would cut
    # shards of another size (the default is 256 files; the killed build used 4).
    resumed = build_slices(
        config,
        progress=False,
        workers=1,
        shard_slices=None if per_slice else 4,
        per_slice=per_slice,
    )
    assert resumed.folder == folder
    assert json.loads((folder / "plan.json").read_text())["shards"] == plan["shards"]
    assert {name: _files(folder / name) for name in shards} == before  # not rewritten

    fresh = build_slices(
        dicom_cache_config(flat, labels, tmp_path / "fresh"),
        progress=False,
        workers=1,
        shard_slices=4,
        per_slice=per_slice,
    )
    assert np.array_equal(
        resumed.images[np.arange(len(resumed))], fresh.images[np.arange(len(fresh))]
    )
    for name in (
        "labels",
        "neighbours",
        "groups",
        "series",
        "sop_uids",
        "slice_index",
        "trainable",
    ):
        assert np.array_equal(
            getattr(resumed, name), getattr(fresh, name), equal_nan=name == "labels"
        )


def test_a_shard_built_twice_is_left_as_it_is(flat_data, tmp_path: Path):
    # A worker pool that breaks hands its unfinished items to the parent, which may include
    # shards a worker had already written: they are kept, not rebuilt over.
    from ichseg.engine.cache_format import shard_name
    from ichseg.engine.cache_per_slice import _build_file_shard
    from ichseg.io.dicom_table import DicomTable

    flat, labels = flat_data
    config = dicom_cache_config(flat, labels, tmp_path / "cache").model_dump(mode="json")
    paths = np.array([os.fsencode(p) for p in sorted(flat.glob("*.dcm"))[:5]])
    first = _build_file_shard(str(tmp_path), 0, paths, config)
    assert first.files == 5
    # The table handed back is the one written (the series are assembled from it).
    stored = DicomTable.load(tmp_path / shard_name(0) / "files.npz")
    assert sorted(first.table.columns) == sorted(stored.columns)
    for name, column in stored.columns.items():
        assert np.array_equal(first.table.columns[name], column, equal_nan=column.dtype.kind == "f")
    assert first.table.strings == stored.strings
    before = _files(tmp_path / shard_name(0))
    again = _build_file_shard(str(tmp_path), 0, paths, config)
    assert again.files == 5 and again.table is None  # the finished shard is read from disk
    assert _files(tmp_path / shard_name(0)) == before
    assert not list(tmp_path.glob(".shard-*"))  # no temporary folder left behind


@pytest.mark.parametrize("count", [1, 5, 63, 64, 65, 255, 256, 257, 1023, 1024, 1025, 4096, 5000])
def test_the_file_plan_covers_every_file_once_with_a_fine_tail(count: int):
    from ichseg.engine.cache_per_slice import TAIL_SHARDS, per_slice_plan

    shards = per_slice_plan(count, 256)
    assert shards[0][0] == 0 and shards[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:], strict=False))  # contiguous
    assert all(0 < end - start <= 256 for start, end in shards)
    # The last TAIL_SHARDS shards' worth of files come in quarter-size shards, so the last
    # shard a worker takes is short.
    tail = [end - start for start, end in shards if start >= count - TAIL_SHARDS * 256]
    assert sum(tail) == min(count, TAIL_SHARDS * 256) and max(tail) <= 64
    assert per_slice_plan(count, 1) == [[i, i + 1] for i in range(count)]
