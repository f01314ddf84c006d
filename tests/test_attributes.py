"""Scan attributes: DICOM age/sex parsing, demographics CSVs, phantom scanners, the slice cache."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ichseg.errors import InputError
from ichseg.io.attributes import (
    FIELDS,
    air_statistics,
    merge,
    parse_age,
    parse_sex,
    read_demographics,
    volume_attributes,
)
from ichseg.phantom import PhantomConfig, generate_study, write_dataset


@pytest.mark.parametrize(
    ("text", "years"),
    [
        ("065Y", 65.0),
        ("018M", 1.5),
        ("052W", 52 * 7 / 365.25),
        ("007D", 7 / 365.25),
        ("65", 65.0),
        (" 40 ", 40.0),
        (72, 72.0),
        ("", None),
        (None, None),
        ("unknown", None),
        ("200Y", None),
        ("-3", None),
    ],
)
def test_parse_age(text, years) -> None:
    assert parse_age(text) == (pytest.approx(years) if years is not None else None)


@pytest.mark.parametrize(
    ("text", "sex"),
    [("M", "M"), ("f", "F"), ("Female", "F"), ("male", "M"), ("O", "O"), ("", None), ("X", None)],
)
def test_parse_sex(text, sex) -> None:
    assert parse_sex(text) == sex


def test_phantom_scanner_is_drawn_apart_from_the_pixels() -> None:
    config = PhantomConfig(size=32, num_slices=2)
    studies = [generate_study(seed, config) for seed in range(12)]
    # Pixels and demographics of a seed are what they were before scanners were drawn.
    digest = hashlib.sha1(studies[3].hu.tobytes()).hexdigest()
    assert digest == hashlib.sha1(generate_study(3, config).hu.tobytes()).hexdigest()
    assert len({s.manufacturer for s in studies}) > 1
    assert len({s.convolution_kernel for s in studies}) > 1
    assert {s.patient_sex for s in studies} == {"M", "F"}
    # The scanner stream does not depend on the anatomy's settings.
    other = generate_study(3, PhantomConfig(size=48, num_slices=3, negative_fraction=1.0))
    assert (other.manufacturer, other.convolution_kernel, other.kvp) == (
        studies[3].manufacturer,
        studies[3].convolution_kernel,
        studies[3].kvp,
    )


def test_dicom_headers_manifest_and_attributes_agree(tmp_path: Path) -> None:
    from ichseg.io.dicom import discover_series, read_series

    write_dataset(tmp_path, studies=3, seed=5, config=PhantomConfig(size=32, num_slices=3))
    with open(tmp_path / "manifest.csv", newline="") as handle:
        manifest = {row["series_uid"]: row for row in csv.DictReader(handle)}
    scan = discover_series(tmp_path / "dicom")
    assert len(scan.series) == 3
    for series in scan.series:
        volume = read_series(series)
        row = manifest[volume.series_uid]
        record = volume_attributes(volume)
        assert set(record) == set(FIELDS)
        assert record["age"] == float(row["patient_age"])
        assert record["sex"] == row["patient_sex"]
        assert record["manufacturer"] == row["manufacturer"]
        assert record["model"] == row["model_name"]
        assert record["kernel"] == row["convolution_kernel"]
        assert record["kvp"] == float(row["kvp"])
        assert record["tube_current"] == float(row["tube_current_ma"])
        assert record["slice_thickness"] == float(row["slice_thickness_mm"])
        assert record["patient_position"] == "HFS"
        assert (record["window_center"], record["window_width"]) == (40.0, 80.0)
        assert record["rows"] == record["columns"] == 32.0
        assert record["air_hu_std"] == pytest.approx(6.0, rel=0.25)  # the phantom's noise


def test_multi_valued_header_elements(tmp_path: Path) -> None:
    import pydicom

    from ichseg.io.dicom import read_header

    write_dataset(tmp_path, studies=1, seed=1, config=PhantomConfig(size=32, num_slices=1))
    path = next((tmp_path / "dicom").rglob("*.dcm"))
    ds = pydicom.dcmread(path)
    ds.ConvolutionKernel = ["Br40", "3"]
    ds.WindowCenter = ["35", "700"]
    ds.WindowWidth = ["80", "3000"]
    ds.save_as(path)
    metadata = read_header(path).metadata
    assert metadata["ConvolutionKernel"] == "Br40\\3"
    assert (metadata["WindowCenter"], metadata["WindowWidth"]) == (35.0, 80.0)


def test_air_statistics_ignore_everything_but_air() -> None:
    rng = np.random.default_rng(0)
    hu = rng.normal(-1000.0, 5.0, size=(2, 40, 40))
    hu[:, 10:30, 10:30] = 40.0  # brain
    hu[:, 12:14, 12:14] = 1500.0  # bone
    mean, std = air_statistics(hu)
    assert mean == pytest.approx(-1000.0, abs=0.5) and std == pytest.approx(5.0, rel=0.1)
    assert air_statistics(np.full((1, 5, 5), 40.0)) == (None, None)


def test_demographics_keys_aliases_and_conflicts(tmp_path: Path) -> None:
    table = tmp_path / "demo.csv"
    table.write_text(
        "Patient ID,Age (years),Gender,Vendor,Site\n"
        "049,65,Female,GE,north\n"
        "P2,041Y,m,Siemens,south\n"
        "P2,041Y,m,Siemens,south\n"
        "P3,30,F,GE,north\n"
        "P3,31,F,GE,north\n"
    )
    demographics = read_demographics(table)
    assert demographics.columns == {
        "age": "Age (years)",
        "sex": "Gender",
        "manufacturer": "Vendor",
        "site": "Site",
    }
    # Numeric ids match without their leading zeros.
    found = demographics.lookup(patient="49")
    assert found == {"age": 65.0, "sex": "F", "manufacturer": "GE", "site": "north"}
    assert demographics.lookup(patient="P2")["age"] == 41.0  # repeated rows that agree
    assert demographics.lookup(patient="P9") is None
    with pytest.raises(InputError) as exc:
        demographics.lookup(patient="P3")
    assert "lines 5 and 6" in str(exc.value) and str(table) in str(exc.value)
    merged = merge({"manufacturer": "header", "kvp": 120.0}, found)
    assert merged["manufacturer"] == "GE" and merged["kvp"] == 120.0
    assert set(merged) == set(FIELDS)


def test_demographics_image_key_wins_over_patient(tmp_path: Path) -> None:
    table = tmp_path / "demo.csv"
    table.write_text("image,patient_id,site\nscans/a.png,P1,A\nscans/b.png,P1,B\n")
    demographics = read_demographics(table)
    assert demographics.lookup(["scans/b.png", "b.png"], None, "P1")["site"] == "B"
    with pytest.raises(InputError):  # P1's two rows disagree: only the image key is usable
        demographics.lookup(["c.png"], None, "P1")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("age,sex\n40,M\n", ("no key column",)),
        ("patient_id,notes\nP1,x\n", ("no attribute column",)),
        ("", ("empty file",)),
    ],
)
def test_demographics_errors(tmp_path: Path, text: str, words: tuple[str, ...]) -> None:
    table = tmp_path / "bad.csv"
    table.write_text(text)
    with pytest.raises(InputError) as exc:
        read_demographics(table)
    message = str(exc.value)
    assert "\n" not in message and str(table) in message
    assert all(word in message for word in words)


def _phantom_config(tmp_path: Path, **data):
    from ichseg.config import load_config

    base = {
        "phantom": {"studies": 6, "size": 32, "slices": 2},
        "image_size": 16,
        "cache_dir": str(tmp_path / "cache"),
        "workers": 0,
    }
    return load_config(extra={"data": base | data})


def test_cache_carries_phantom_attributes_per_slice(tmp_path: Path) -> None:
    from ichseg.engine.cache import build_slices
    from ichseg.engine.sources import PhantomSource

    config = _phantom_config(tmp_path)
    slices = build_slices(config, progress=False)
    folder = PhantomSource(config.data, tmp_path / "cache")._folder()
    with open(folder / "manifest.csv", newline="") as handle:
        manifest = {row["patient_id"]: row for row in csv.DictReader(handle)}
    manufacturers = slices.attribute("manufacturer")
    ages = slices.attribute("age")
    for row in range(len(slices)):
        study = manifest[slices.groups[row]]
        assert manufacturers[row] == study["manufacturer"]
        assert ages[row] == float(study["patient_age"])
    # One record per series, not per slice.
    assert len(slices.attribute_records) == len(manifest)
    assert slices.attribute("not-a-field").tolist() == [None] * len(slices)


def test_cache_without_attribute_files_reads_as_unknown(tmp_path: Path) -> None:
    from ichseg.engine.cache import build_slices, open_slices

    slices = build_slices(_phantom_config(tmp_path), progress=False)
    for shard in slices.folder.glob("shard-*"):
        index = dict(np.load(shard / "index.npz"))
        del index["attributes"]
        np.savez(shard / "index.npz", **index)
        (shard / "attributes.json").unlink()
    reopened = open_slices(slices.folder)
    assert reopened.attribute("manufacturer").tolist() == [None] * len(slices)
    np.testing.assert_array_equal(reopened.labels, slices.labels)


def test_nifti_volumes_get_attributes_from_a_demographics_csv(tmp_path: Path) -> None:
    import shutil

    from ichseg.config import load_config
    from ichseg.engine.cache import build_slices

    data = tmp_path / "data"
    write_dataset(
        data, studies=3, seed=2, config=PhantomConfig(size=32, num_slices=2), write_dicom=False
    )
    with open(data / "manifest.csv", newline="") as handle:
        studies = list(csv.DictReader(handle))
    # The PhysioNet CT-ICH layout: ct_scans/049.nii.gz, labels by PatientNumber/SliceNumber.
    scans = tmp_path / "ct_scans"
    scans.mkdir()
    labels = [
        "PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,Subarachnoid,"
        "Epidural,Subdural,No_Hemorrhage"
    ]
    for number, study in enumerate(studies, start=1):
        shutil.copy(data / study["ct_nifti"], scans / f"{number:03d}.nii.gz")
        labels += [f"{number},{z},0,0,0,0,0,1" for z in (1, 2)]
    (tmp_path / "labels.csv").write_text("\n".join(labels) + "\n")
    demographics = tmp_path / "demographics.csv"
    lines = ["Patient Number,Age (years),Gender,site"]
    lines += [f"{n},{10 + 10 * n},Female,site{n}" for n in (1, 2, 3)]
    demographics.write_text("\n".join(lines) + "\n")
    config = load_config(
        extra={
            "data": {
                "source": "nifti",
                "root": str(scans),
                "labels": str(tmp_path / "labels.csv"),
                "demographics": str(demographics),
                "image_size": 16,
                "cache_dir": str(tmp_path / "cache"),
                "workers": 0,
            }
        }
    )
    slices = build_slices(config, progress=False)
    sites, ages, sexes = (slices.attribute(n) for n in ("site", "age", "sex"))
    for number in (1, 2, 3):
        rows = slices.groups == f"{number:03d}"
        assert rows.sum() == 2
        assert set(sites[rows]) == {f"site{number}"} and set(ages[rows]) == {10.0 + 10 * number}
        assert set(sexes[rows]) == {"F"}
    # NIfTI has no SliceThickness: the slice spacing stands in.
    assert set(slices.attribute("slice_thickness")) == {5.0}
    records = json.loads(next(slices.folder.glob("shard-*/attributes.json")).read_text())
    assert all(set(r) == set(FIELDS) for r in records)
