"""Label table readers: RSNA, CQ500, PhysioNet CT-ICH, ichseg per-slice tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ichseg.errors import InputError
from ichseg.io.labels import (
    FORMATS,
    LabelTable,
    ctich_key,
    ctich_patient_id,
    detect_label_format,
    read_cq500_reads,
    read_ichseg_slices,
    read_labels,
    read_physionet_ctich,
    read_rsna_labels,
    rsna_image_id,
    rsna_key,
    split_rsna_id,
    write_rsna_labels,
)
from ichseg.volume import SUBTYPES

RSNA_ORDER = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def rsna_rows(sop: str, values: dict[str, int]) -> str:
    """Six RSNA rows for one image, in the official order (subtypes, then any)."""
    return "".join(f"ID_{sop}_{s},{values.get(s, 0)}\n" for s in (*RSNA_ORDER, "any"))


def vec(*positives: str) -> np.ndarray:
    return np.array([int(s in positives) for s in SUBTYPES], dtype=np.uint8)


def assert_input_error(exc: pytest.ExceptionInfo[InputError], path: Path, *words: str) -> None:
    message = str(exc.value)
    assert str(path) in message
    assert "\n" not in message
    for word in words:
        assert word in message, message


# --------------------------------------------------------------------------------------------
# RSNA


def test_rsna_vectors_in_subtype_order(tmp_path: Path) -> None:
    path = write(
        tmp_path / "train.csv",
        "ID,Label\n"
        + rsna_rows("63eb1e259", {})
        + rsna_rows("2669954a7", {"any": 1, "subdural": 1, "subarachnoid": 1}),
    )
    table = read_rsna_labels(path)
    assert table.format == "rsna"
    assert table.ids() == ["63eb1e259", "2669954a7"]
    assert table["63eb1e259"].dtype == np.uint8
    np.testing.assert_array_equal(table["63eb1e259"], vec())
    np.testing.assert_array_equal(table["2669954a7"], vec("any", "subarachnoid", "subdural"))
    assert table.warnings == []
    assert table.matrix().shape == (2, 6)


def test_rsna_dotted_uid_and_underscore_sop(tmp_path: Path) -> None:
    path = write(
        tmp_path / "train.csv",
        "ID,Label\n" + rsna_rows("1.2.840.113619.2.55", {}) + rsna_rows("a_b", {"any": 1}),
    )
    table = read_rsna_labels(path)
    assert set(table.ids()) == {"1.2.840.113619.2.55", "a_b"}
    assert table["a_b"][0] == 1


def test_rsna_id_helpers() -> None:
    assert rsna_image_id("63eb1e259") == "ID_63eb1e259"
    assert rsna_key("ID_63eb1e259") == "63eb1e259"
    assert rsna_key("1.2.3") == "1.2.3"
    assert split_rsna_id("ID_63eb1e259_epidural") == ("63eb1e259", "epidural")
    assert split_rsna_id("ID_x_y_any") == ("x_y", "any")
    with pytest.raises(ValueError):
        split_rsna_id("nounderscore")


def test_rsna_identical_duplicates_are_silent(tmp_path: Path) -> None:
    rows = rsna_rows("abc", {"any": 1, "epidural": 1})
    path = write(tmp_path / "train.csv", "ID,Label\n" + rows + rows.splitlines()[0] + "\n")
    table = read_rsna_labels(path)
    np.testing.assert_array_equal(table["abc"], vec("any", "epidural"))
    assert table.warnings == []


def test_rsna_conflicting_duplicate_positive_wins(tmp_path: Path) -> None:
    path = write(
        tmp_path / "train.csv",
        "ID,Label\n" + rsna_rows("abc", {"any": 1, "subdural": 1}) + "ID_abc_subdural,0\n",
    )
    table = read_rsna_labels(path)
    np.testing.assert_array_equal(table["abc"], vec("any", "subdural"))
    assert len(table.warnings) == 1
    assert "ID_abc_subdural" in table.warnings[0] and "line 8" in table.warnings[0]


def test_rsna_any_repaired_with_warning(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "ID,Label\n" + rsna_rows("abc", {"epidural": 1}))
    table = read_rsna_labels(path)
    np.testing.assert_array_equal(table["abc"], vec("any", "epidural"))
    assert len(table.warnings) == 1 and "any" in table.warnings[0]


def test_rsna_missing_subtype_names_image_and_file(tmp_path: Path) -> None:
    rows = rsna_rows("abc", {}).splitlines()
    path = write(tmp_path / "train.csv", "ID,Label\n" + "\n".join(rows[:-2]) + "\n")
    with pytest.raises(InputError) as exc:
        read_rsna_labels(path)
    assert_input_error(exc, path, "ID_abc", "subdural", "any")


def test_rsna_unknown_subtype_names_line(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "ID,Label\nID_abc_epidural,0\nID_abc_chronic,1\n")
    with pytest.raises(InputError) as exc:
        read_rsna_labels(path)
    assert_input_error(exc, path, "line 3", "chronic")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", ("empty",)),
        ("ID,Prob\nID_a_any,1\n", ("ID,Label",)),
        ("ID,Label\nID_a_any,2\n", ("line 2", "0 or 1")),
        ("ID,Label\nID_a_any\n", ("line 2", "fields")),
        ("ID,Label\nnounderscore,1\n", ("line 2",)),
    ],
)
def test_rsna_bad_input(tmp_path: Path, text: str, words: tuple[str, ...]) -> None:
    path = write(tmp_path / "train.csv", text)
    with pytest.raises(InputError) as exc:
        read_rsna_labels(path)
    assert_input_error(exc, path, *words)


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(InputError) as exc:
        read_labels(tmp_path / "nope.csv")
    assert_input_error(exc, tmp_path / "nope.csv", "not found")
    with pytest.raises(InputError) as exc:
        read_labels(tmp_path)
    assert_input_error(exc, tmp_path, "folder")
    bad = tmp_path / "latin1.csv"
    bad.write_bytes(b"ID,Label\nID_\xe9_any,1\n")
    with pytest.raises(InputError) as exc:
        read_rsna_labels(bad)
    assert_input_error(exc, bad, "UTF-8")


def test_rsna_round_trip_and_atomic_write(tmp_path: Path) -> None:
    src = write(
        tmp_path / "train.csv",
        "ID,Label\n" + rsna_rows("a", {"any": 1, "intraventricular": 1}) + rsna_rows("b.1", {}),
    )
    table = read_rsna_labels(src)
    out = tmp_path / "out.csv"
    out.write_text("old contents\n")
    write_rsna_labels(out, table)
    assert out.read_text() == src.read_text()
    back = read_rsna_labels(out)
    assert back.ids() == table.ids()
    np.testing.assert_array_equal(back.matrix(), table.matrix())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "train.csv"]


def test_rsna_write_rejects_bad_vector_and_keeps_old_file(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    out.write_text("old\n")
    with pytest.raises(ValueError):
        write_rsna_labels(out, {"a": np.array([1, 0, 0])})
    with pytest.raises(ValueError):
        write_rsna_labels(out, {"a": np.array([2, 0, 0, 0, 0, 0])})
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


# --------------------------------------------------------------------------------------------
# CQ500

CQ500_FINDINGS = ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "Fracture")


def cq500_csv(path: Path, rows: list[tuple[str, list[dict[str, int]]]]) -> Path:
    """reads.csv with name, Category and the findings of three readers."""
    header = ["name", "Category"] + [f"R{r}:{f}" for r in (1, 2, 3) for f in CQ500_FINDINGS]
    lines = [",".join(header)]
    for name, readers in rows:
        cells = [name, "B1"]
        for reads in readers:
            cells += [str(reads.get(f, 0)) for f in CQ500_FINDINGS]
        lines.append(",".join(cells))
    return write(path, "\n".join(lines) + "\n")


def test_cq500_majority(tmp_path: Path) -> None:
    yes = {"ICH": 1, "SDH": 1, "Fracture": 1}
    path = cq500_csv(
        tmp_path / "reads.csv",
        [
            ("CQ500-CT-1", [yes, yes, {}]),  # 2 of 3 -> positive
            ("CQ500-CT-2", [yes, {}, {}]),  # 1 of 3 -> negative
            ("CQ500-CT-3", [{"ICH": 1, "IPH": 1}, {"ICH": 1, "SAH": 1}, {}]),
        ],
    )
    table = read_cq500_reads(path)
    assert table.format == "cq500"
    np.testing.assert_array_equal(table["CQ500-CT-1"], vec("any", "subdural"))
    np.testing.assert_array_equal(table["CQ500-CT-2"], vec())
    # ICH has a majority but no single subtype does: any without a subtype is legitimate.
    np.testing.assert_array_equal(table["CQ500-CT-3"], vec("any"))
    assert table.warnings == []


def test_cq500_mapping_of_every_finding(tmp_path: Path) -> None:
    everything = {f: 1 for f in ("ICH", "EDH", "IPH", "IVH", "SAH", "SDH")}
    path = cq500_csv(tmp_path / "reads.csv", [("s", [everything, everything, everything])])
    np.testing.assert_array_equal(read_cq500_reads(path)["s"], np.ones(6, dtype=np.uint8))


def test_cq500_subtype_without_ich_sets_any(tmp_path: Path) -> None:
    path = cq500_csv(tmp_path / "reads.csv", [("s", [{"EDH": 1}, {"EDH": 1}, {}])])
    table = read_cq500_reads(path)
    np.testing.assert_array_equal(table["s"], vec("any", "epidural"))
    assert len(table.warnings) == 1


def test_cq500_missing_reader_column(tmp_path: Path) -> None:
    header = "name,Category," + ",".join(f"R{r}:{f}" for r in (1, 2) for f in CQ500_FINDINGS)
    path = write(tmp_path / "reads.csv", header + "\n")
    with pytest.raises(InputError) as exc:
        read_cq500_reads(path)
    assert_input_error(exc, path, "R3:ICH", "R3:SAH")


def test_cq500_bad_value(tmp_path: Path) -> None:
    path = cq500_csv(tmp_path / "reads.csv", [("s", [{"ICH": 7}, {}, {}])])
    with pytest.raises(InputError) as exc:
        read_cq500_reads(path)
    assert_input_error(exc, path, "line 2", "R1:ICH")


# --------------------------------------------------------------------------------------------
# PhysioNet CT-ICH

CTICH_HEADER = (
    "PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,Subarachnoid,"
    "Epidural,Subdural,No_Hemorrhage,Fracture_Yes_No\n"
)


def test_ctich_keys_and_vectors(tmp_path: Path) -> None:
    path = write(
        tmp_path / "hemorrhage_diagnosis_raw_ct.csv",
        CTICH_HEADER + "49,1,0,0,0,0,0,1,0\n49,12,1,0,0,0,1,0,1\n100,3,0,1,0,0,0,0,0\n",
    )
    table = read_physionet_ctich(path)
    assert table.format == "ctich"
    assert table.ids() == ["049/1", "049/12", "100/3"]
    np.testing.assert_array_equal(table["049/1"], vec())
    np.testing.assert_array_equal(table["049/12"], vec("any", "intraventricular", "subdural"))
    np.testing.assert_array_equal(table["100/3"], vec("any", "intraparenchymal"))
    assert table.warnings == []
    assert ctich_key(49, "12") == "049/12"
    assert [ctich_patient_id(k) for k in table.ids()] == ["049", "049", "100"]
    with pytest.raises(ValueError):
        ctich_patient_id("049")


def test_ctich_inconsistent_any_warns_and_positive_wins(tmp_path: Path) -> None:
    path = write(
        tmp_path / "ct.csv",
        CTICH_HEADER + "50,1,0,0,1,0,0,1,0\n50,2,0,0,0,0,0,0,0\n",
    )
    table = read_physionet_ctich(path)
    np.testing.assert_array_equal(table["050/1"], vec("any", "subarachnoid"))
    np.testing.assert_array_equal(table["050/2"], vec("any"))
    assert len(table.warnings) == 2
    assert "050/1" in table.warnings[0] and "050/2" in table.warnings[1]


def test_ctich_bad_numbers_and_missing_column(tmp_path: Path) -> None:
    path = write(tmp_path / "ct.csv", CTICH_HEADER + "x,1,0,0,0,0,0,1,0\n")
    with pytest.raises(InputError) as exc:
        read_physionet_ctich(path)
    assert_input_error(exc, path, "line 2", "PatientNumber")
    path = write(tmp_path / "ct2.csv", CTICH_HEADER.replace("Epidural,", ""))
    with pytest.raises(InputError) as exc:
        read_physionet_ctich(path)
    assert_input_error(exc, path, "Epidural")


# --------------------------------------------------------------------------------------------
# ichseg per-slice tables, detection, dispatch


def test_ichseg_slices(tmp_path: Path) -> None:
    path = write(
        tmp_path / "slices.csv",
        "series_uid,sop_uid," + ",".join(SUBTYPES) + "\n"
        "s1,1.2.3,1,0,0,0,0,1\n"
        "s1,1.2.4,0,0,0,0,0,0\n"
        "s1,1.2.4,0,0,0,0,0,0\n",
    )
    table = read_ichseg_slices(path)
    assert table.ids() == ["1.2.3", "1.2.4"]
    np.testing.assert_array_equal(table["1.2.3"], vec("any", "subdural"))
    assert table.warnings == []


def make_all_formats(tmp_path: Path) -> dict[str, Path]:
    return {
        "rsna": write(tmp_path / "rsna.csv", "ID,Label\n" + rsna_rows("a", {})),
        "cq500": cq500_csv(tmp_path / "reads.csv", [("CQ500-CT-0", [{}, {}, {}])]),
        "ctich": write(tmp_path / "ctich.csv", CTICH_HEADER + "49,1,0,0,0,0,0,1,0\n"),
        "ichseg-slices": write(
            tmp_path / "slices.csv", "sop_uid," + ",".join(SUBTYPES) + "\n1.2,0,0,0,0,0,0\n"
        ),
    }


def test_detect_and_dispatch_leave_files_unchanged(tmp_path: Path) -> None:
    files = make_all_formats(tmp_path)
    assert set(files) == set(FORMATS)
    before = {name: path.read_bytes() for name, path in files.items()}
    for name, path in files.items():
        assert detect_label_format(path) == name
        table = read_labels(path)
        assert isinstance(table, LabelTable)
        assert table.format == name and table.source == str(path) and len(table) == 1
        assert path.read_bytes() == before[name]


def test_detect_handles_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "rsna.csv"
    path.write_bytes(
        b"\xef\xbb\xbfID,Label\r\n" + rsna_rows("a", {}).replace("\n", "\r\n").encode()
    )
    assert detect_label_format(path) == "rsna"
    assert read_labels(path).ids() == ["a"]


def test_detect_unknown_header_lists_formats(tmp_path: Path) -> None:
    path = write(tmp_path / "other.csv", "foo,bar\n1,2\n")
    with pytest.raises(InputError) as exc:
        detect_label_format(path)
    assert_input_error(exc, path, "foo,bar", *FORMATS)


def test_matrix_subset_and_empty() -> None:
    table = LabelTable({"a": vec("any"), "b": vec()})
    np.testing.assert_array_equal(table.matrix(["b", "a"]), np.stack([vec(), vec("any")]))
    assert table.matrix([]).shape == (0, 6)
    assert "a" in table and "z" not in table
