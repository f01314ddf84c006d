"""The single-pass and parallel DICOM readers give what the two-pass reader gives.

Every file of every corpus input is read both ways (one parse vs a header read and a decode);
series are assembled from one-parse outcomes, from the compact table, and by the serial reader;
worker processes are compared with reading in this process.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from corpus import CASES, Case, odd_series, write_good

from ichseg.errors import InputError
from ichseg.io import workers as workers_module
from ichseg.io.dicom import (
    NotAnImage,
    SeriesFiles,
    decode_slice,
    discover_series,
    parse_file,
    read_header,
    read_series,
    series_layout,
)
from ichseg.io.dicom_header import unusable_reason
from ichseg.io.dicom_pixels import pixel_problem
from ichseg.io.dicom_table import DicomTable
from ichseg.io.loader import index_input
from ichseg.io.walk import list_compact, list_files

DICOM_CASES = [c for c in CASES if "nifti" not in c.target]


def _two_pass(path: Path) -> dict:
    """What discovery and then ``decode_slice`` make of one file."""
    try:
        header = read_header(path)
    except NotAnImage as other:
        return {"ignored": other.reason}
    except InputError as error:
        return {"skipped": error.reason}
    reason = unusable_reason(header)
    if reason:
        return {"skipped": reason}
    out: dict = {"header": header}
    if pixel_problem(header) is None:
        try:
            out["decoded"] = decode_slice(path)
        except InputError as error:
            out["decode_error"] = error.reason
    return out


def _same_volume(a, b) -> None:
    assert a.series_uid == b.series_uid and a.source == b.source
    assert np.array_equal(a.hu, b.hu)
    assert np.array_equal(a.affine, b.affine)
    assert np.array_equal(a.slice_positions, b.slice_positions)
    assert a.sop_uids == b.sop_uids and a.instance_numbers == b.instance_numbers
    assert a.metadata == b.metadata and a.warnings == b.warnings
    assert a.quality_flags == b.quality_flags and a.dropped == b.dropped


def _read(reader, series):
    try:
        return reader(series)
    except InputError as error:
        return (type(error).__name__, str(error), getattr(error, "dropped", None))


@pytest.mark.parametrize("case", DICOM_CASES, ids=[c.name for c in DICOM_CASES])
def test_one_parse_per_file_matches_the_two_pass_reader(case: Case, tmp_path: Path) -> None:
    root = tmp_path / "input"
    root.mkdir()
    write_good(root)
    case.build(root)
    parsed = {}
    for path in list_files(root).files:
        one = parse_file(path)
        two = _two_pass(path)
        parsed[str(path)] = one
        if "header" not in two:
            assert (one.skipped, one.ignored) == (two.get("skipped"), two.get("ignored")), path
            continue
        assert one.header == two["header"], path
        assert one.decode_error == two.get("decode_error"), path
        if "decoded" in two:
            a, b = one.decoded, two["decoded"]
            assert a is not None and np.array_equal(a.hu, b.hu), path
            assert (a.fixed_12bit, a.slope_assumed, a.intercept_missing, a.signed) == (
                b.fixed_12bit,
                b.slope_assumed,
                b.intercept_missing,
                b.signed,
            )
            assert (a.stored_range, a.has_air, a.shape) == (b.stored_range, b.has_air, b.shape)
        else:
            assert one.decoded is None

    # Series assembled from the one-parse outcomes, and from the compact table.
    table = DicomTable()
    for one in parsed.values():
        table.append(one)
    from_table = dict(table.series_rows())
    for series in discover_series(root, workers=1).series:
        reference = _read(read_series, series)
        decoded = {}
        for header in series.headers:
            one = parsed[str(header.path)]
            if one.decoded is not None:
                decoded[str(header.path)] = one.decoded
            elif one.decode_error is not None:
                decoded[str(header.path)] = one.decode_error
        single = _read(read_series, SeriesFiles(series.series_uid, series.headers, decoded))
        compact = table.series(series.series_uid, from_table[series.series_uid])
        assert compact.headers == series.headers
        layout = _read(series_layout, compact)
        if isinstance(reference, tuple):
            assert single == reference and layout == reference
            continue
        _same_volume(single, reference)
        assert [h.sop_uid for h in layout.headers] == reference.sop_uids
        assert layout.source == reference.source and layout.dropped == reference.dropped
        assert layout.warnings == reference.warnings
        assert layout.quality_flags == reference.quality_flags
        assert np.array_equal(layout.affine, reference.affine)
        assert np.array_equal(layout.slice_positions, reference.slice_positions)
        assert layout.metadata == reference.metadata


@pytest.mark.parametrize("case", DICOM_CASES, ids=[c.name for c in DICOM_CASES])
def test_element_values_are_pydicoms_from_its_dict_or_a_copy(case: Case, tmp_path: Path) -> None:
    """Header values are read from pydicom's own element dict, or from a copy keyed by plain
    tag numbers where a dataset has none: both give what ``Dataset.get`` gives."""
    import types

    import pydicom

    from ichseg.io.dicom_header import _HEADER_TAGS, ElementValues

    root = tmp_path / "input"
    root.mkdir()
    write_good(root)
    case.build(root)
    compared = 0
    for path in list_files(root).files:
        try:
            datasets = [pydicom.dcmread(path, stop_before_pixels=True) for _ in range(3)]
        except Exception:  # not DICOM, or too damaged to read: nothing to compare
            continue
        reference, own, copy = datasets
        # A read-only view is no dict: ElementValues takes its own copy of the elements.
        object.__setattr__(copy, "_dict", types.MappingProxyType(copy._dict))
        live, copied = ElementValues(own), ElementValues(copy)
        assert live.elements is own._dict
        assert isinstance(copied.elements, dict) and copied.elements is not copy._dict
        for keyword in _HEADER_TAGS:
            try:
                expected = reference.get(keyword)
            except Exception:  # a value pydicom cannot convert: read elsewhere as invalid
                continue
            for found in (live.get(keyword), copied.get(keyword)):
                # repr where == cannot tell (a 'NaN' decimal string is not equal to itself)
                assert found == expected or repr(found) == repr(expected), (path, keyword)
            compared += 1
    assert compared > 0


def test_table_survives_saving_and_joining(tmp_path: Path) -> None:
    write_good(tmp_path / "in")
    files = list_files(tmp_path / "in").files
    halves = [DicomTable(), DicomTable()]
    for i, path in enumerate(files):
        halves[i % 2].append(parse_file(path), image_row=i, keep=bool(i % 3))
    for i, half in enumerate(halves):
        half.save(tmp_path / f"{i}.npz")
    joined = DicomTable.concatenate([DicomTable.load(tmp_path / f"{i}.npz") for i in range(2)])
    assert len(joined) == len(files)
    order = [i for h in range(2) for i in range(len(files)) if i % 2 == h]
    assert [str(joined.path(r)) for r in range(len(files))] == [str(files[i]) for i in order]
    assert list(joined.columns["image_row"]) == order
    assert list(joined.columns["keep"]) == [bool(i % 3) for i in order]
    ((uid, rows),) = joined.series_rows()
    assert joined.series(uid, rows).headers == sorted(
        discover_series(tmp_path / "in", workers=1).series[0].headers,
        key=lambda h: order.index(files.index(h.path)),
    )


def test_a_compacted_table_travels_and_keeps_growing(tmp_path: Path) -> None:
    import pickle

    first = list_files(write_good(tmp_path / "in")).files
    second = odd_series(tmp_path / "in")
    whole, grown = DicomTable(), DicomTable()
    for path in first + second:
        whole.append(parse_file(path))
    for path in first:
        grown.append(parse_file(path))
    # As a cache worker sends its shard's table to the building process; a second series
    # then adds strings the table has not seen.
    grown = pickle.loads(pickle.dumps(grown.compact()))
    for path in second:
        grown.append(parse_file(path))

    assert len(grown) == len(whole) == len(first) + len(second)
    assert grown.strings == whole.strings
    for name, column in whole.columns.items():
        assert np.array_equal(grown.columns[name], column, equal_nan=column.dtype.kind == "f")
    series = grown.series_rows()
    assert len(series) == 2
    for uid, rows in series:
        assert grown.series(uid, rows).headers == whole.series(uid, rows).headers


def test_compact_listing_equals_the_path_listing(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.dcm").write_bytes(b"x")
    (tmp_path / "a" / "y.dcm").write_bytes(b"yy")
    os.link(tmp_path / "a" / "y.dcm", tmp_path / "z_hardlink.dcm")  # the same file twice
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "loop")  # a folder loop
    os.symlink(tmp_path / "missing", tmp_path / "broken.dcm")
    (tmp_path / ".hidden").write_bytes(b"h")
    paths = list_files(tmp_path)
    compact = list_compact(tmp_path, chunk=2)
    assert [compact.path(i) for i in range(len(compact))] == paths.files
    assert compact.skipped == paths.skipped
    assert list(compact.sizes) == [p.stat().st_size for p in paths.files]
    before = compact.digest()
    (tmp_path / "a" / "y.dcm").write_bytes(b"changed")
    assert list_compact(tmp_path).digest() != before


@pytest.fixture
def many_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Three series (one with an undecodable slice) read with workers from the first file."""
    from ichseg.phantom import PhantomConfig, write_dataset

    monkeypatch.setattr(workers_module, "MIN_PARALLEL_FILES", 1)
    write_dataset(tmp_path / "data", studies=3, seed=4, config=PhantomConfig(size=48, num_slices=6))
    root = tmp_path / "data" / "dicom"
    victim = sorted(root.glob("*/*.dcm"))[2]
    victim.write_bytes(victim.read_bytes()[:-200])  # truncated pixel data: dropped
    return root


def _shared_memory_names() -> set[str]:
    try:
        return {name for name in os.listdir("/dev/shm") if name.startswith("psm_")}
    except OSError:
        return set()


def test_worker_processes_read_exactly_what_this_process_reads(many_files: Path) -> None:
    before = _shared_memory_names()
    serial = index_input(many_files, workers=1)
    parallel = index_input(many_files, workers=2)
    assert [s.headers for s in parallel.dicom_series] == [s.headers for s in serial.dicom_series]
    assert parallel.skipped == serial.skipped
    one = list(serial.iter_volumes(workers=1))
    two = list(parallel.iter_volumes(workers=2))
    assert len(one) == len(two) == 3
    assert any(v.dropped for v in one)
    for a, b in zip(one, two, strict=True):
        _same_volume(a, b)
    assert all(s.decoded is None for s in parallel.dicom_series)
    assert _shared_memory_names() <= before


def test_stopping_early_frees_what_was_decoded_ahead(many_files: Path) -> None:
    before = _shared_memory_names()
    volumes = index_input(many_files, workers=2).iter_volumes(workers=2)
    first = next(volumes)
    volumes.close()  # the caller stops after one series
    assert first.num_slices > 0
    assert _shared_memory_names() <= before


def test_default_workers_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from ichseg.runtime import available_cpus

    monkeypatch.delenv("ICHSEG_WORKERS", raising=False)
    assert workers_module.resolve_workers(None) == available_cpus()
    monkeypatch.setenv("ICHSEG_WORKERS", "1")
    assert workers_module.resolve_workers(None) == 1
    assert workers_module.resolve_workers(3) == 3
    monkeypatch.setenv("ICHSEG_WORKERS", "many")
    assert workers_module.resolve_workers(None) == available_cpus()


def test_a_broken_pool_finishes_in_this_process(tmp_path: Path, caplog) -> None:
    items = list(range(6))
    results = list(workers_module.ordered_map(_die_on_three, items, 2))
    assert results == [i * i for i in items]
    assert "continuing in this process" in caplog.text


def _die_on_three(value: int) -> int:
    if value == 3 and os.environ.get("ICHSEG_TEST_PARENT") != str(os.getpid()):
        os._exit(1)  # a worker killed mid-task
    return value * value


@pytest.fixture(autouse=True)
def _parent_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICHSEG_TEST_PARENT", str(os.getpid()))


def test_flat_folder_copies_are_found_as_series(tmp_path: Path) -> None:
    """Slices of several series mixed in one folder (the RSNA layout) are grouped back."""
    write_good(tmp_path / "tree")
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted((tmp_path / "tree").rglob("*.dcm")):
        shutil.copyfile(path, flat / f"{path.parent.name}_{path.name}")
    (volume,) = [v for v in index_input(flat, workers=1).iter_volumes(workers=1)]
    (reference,) = list(index_input(tmp_path / "tree", workers=1).iter_volumes(workers=1))
    assert np.array_equal(volume.hu, reference.hu) and volume.sop_uids == reference.sop_uids


def test_the_workers_option_applies_to_one_command(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from ichseg.cli import app

    monkeypatch.delenv("ICHSEG_WORKERS", raising=False)
    seen: list[int] = []
    real = workers_module.resolve_workers

    def recording(workers):
        seen.append(real(workers))
        return seen[-1]

    monkeypatch.setattr(workers_module, "resolve_workers", recording)
    write_good(tmp_path)
    result = CliRunner().invoke(app, ["inspect", str(tmp_path), "--workers", "3"])
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {3}
    assert "ICHSEG_WORKERS" not in os.environ


RLE_LOSSLESS = "1.2.840.10008.1.2.5"


def _rewritten(source: Path, target: Path, syntax: str, change=None) -> Path:
    import pydicom

    ds = pydicom.dcmread(source)
    if change is not None:
        change(ds)
    if syntax == RLE_LOSSLESS:
        ds.compress(RLE_LOSSLESS, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(target, enforce_file_format=True)
    return target


def _eight_bit_odd(ds) -> None:
    # 5 x 7 pixels of one byte: an odd length, padded to even in the file.
    ds.Rows, ds.Columns = 5, 7
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = (np.arange(35, dtype=np.uint8) * 7).tobytes()


def _twelve_bit_signed(ds) -> None:
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 1
    ds.PhotometricInterpretation = "MONOCHROME1"


def _trailing_padding(ds) -> None:
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 64)  # Data Set Trailing Padding after the pixels


def _mislabelled(source: Path, target: Path, written_implicit: bool) -> Path:
    """A slice whose meta information declares one VR encoding and whose elements use the
    other; 128 x 128 pixels, so that reading a VR as a length (or the reverse) would not
    fit inside the file unnoticed."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ds = pydicom.dcmread(source)
    ds.Rows = ds.Columns = 128
    ds.PixelData = (np.arange(128 * 128, dtype=np.int16) % 2000 - 1000).tobytes()
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 64)  # bytes after the pixels
    declared = ExplicitVRLittleEndian if written_implicit else ImplicitVRLittleEndian
    ds.file_meta.TransferSyntaxUID = declared
    pydicom.dcmwrite(
        target, ds, implicit_vr=written_implicit, little_endian=True, force_encoding=True
    )
    return target


def _bytes_behind(array: np.ndarray) -> int:
    """Size of the buffer an array views (the whole file's bytes when read in place)."""
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return len(base) if isinstance(base, bytes | bytearray) else -1


@pytest.mark.parametrize(
    ("syntax", "change", "in_place"),
    [
        ("1.2.840.10008.1.2.1", None, True),
        ("1.2.840.10008.1.2", None, True),
        ("1.2.840.10008.1.2.1", _eight_bit_odd, True),
        ("1.2.840.10008.1.2", _eight_bit_odd, True),
        ("1.2.840.10008.1.2.1", _trailing_padding, True),
        # 12 of 16 bits stored: the decoder sign-extends bit 11 (values above 2047 here), so
        # the slice goes through it.
        ("1.2.840.10008.1.2.1", _twelve_bit_signed, False),
        (RLE_LOSSLESS, None, False),  # compressed: read in full, then decoded
        ("written_implicit", None, True),  # explicit VR declared, implicit VR written
        ("written_explicit", None, True),  # implicit VR declared, explicit VR written
    ],
    ids=[
        "explicit",
        "implicit",
        "explicit_8bit_odd",
        "implicit_8bit_odd",
        "trailing",
        "12bit_monochrome1",
        "rle",
        "declared_explicit_written_implicit",
        "declared_implicit_written_explicit",
    ],
)
def test_pixels_are_read_in_place_from_the_file_bytes(
    phantom_dir: Path, tmp_path: Path, syntax, change, in_place
) -> None:
    # The pixel element of an uncompressed little-endian file is a view on the bytes read
    # (no copy), and the stored values are exactly pydicom's.
    import warnings

    import pydicom

    source = sorted((phantom_dir / "dicom").glob("*/*.dcm"))[3]
    if syntax.startswith("written_"):
        path = _mislabelled(source, tmp_path / "slice.dcm", syntax == "written_implicit")
    else:
        path = _rewritten(source, tmp_path / "slice.dcm", syntax, change)
    decoded = parse_file(path, keep_stored=True).decoded
    assert decoded is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = pydicom.dcmread(path).pixel_array
    assert decoded.stored.dtype == expected.dtype
    assert np.array_equal(decoded.stored, expected)
    assert (_bytes_behind(decoded.stored) == path.stat().st_size) is in_place
    hu = parse_file(path).decoded.hu
    assert np.array_equal(hu, decoded.rescale.hu(expected))


def test_declared_syntax_is_read_from_the_meta_bytes(phantom_dir: Path, tmp_path: Path) -> None:
    # Compressed files skip the header-only parse (one full read, as before the in-place
    # reader); files without a preamble or meta information give None.
    from ichseg.io.dicom_header import declared_transfer_syntax

    source = sorted((phantom_dir / "dicom").glob("*/*.dcm"))[3]
    rle = _rewritten(source, tmp_path / "rle.dcm", RLE_LOSSLESS)
    implicit = _rewritten(source, tmp_path / "implicit.dcm", "1.2.840.10008.1.2")
    assert declared_transfer_syntax(rle.read_bytes()) == RLE_LOSSLESS
    assert declared_transfer_syntax(implicit.read_bytes()) == "1.2.840.10008.1.2"
    assert declared_transfer_syntax(source.read_bytes()[128:]) is None
    assert declared_transfer_syntax(b"") is None


def test_plain_12bit_slices_skip_the_decoder_with_its_values(
    phantom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 12 of 16 bits stored, high bits holding garbage: the decoder masks (unsigned) or
    # sign-extends (signed) them; the plain path must give the same values without it.
    import pydicom
    import pydicom.pixels

    source = sorted((phantom_dir / "dicom").glob("*/*.dcm"))[3]
    for representation in (0, 1):

        def twelve_bits(ds, representation=representation) -> None:
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, representation
            values = np.arange(ds.Rows * ds.Columns, dtype=np.uint16) * 37  # all 16 bits
            ds.PixelData = values.astype(np.int16 if representation else np.uint16).tobytes()

        path = _rewritten(
            source, tmp_path / f"r{representation}.dcm", "1.2.840.10008.1.2.1", twelve_bits
        )
        expected = pydicom.dcmread(path).pixel_array
        assert expected.max() < 4096 if representation == 0 else expected.min() >= -2048

        def no_decoder(*args, **kwargs):
            raise AssertionError("the decoder was used")

        with monkeypatch.context() as patch:
            patch.setattr(pydicom.pixels, "get_decoder", no_decoder)
            decoded = parse_file(path, keep_stored=True).decoded
        assert decoded is not None
        assert decoded.stored.dtype == expected.dtype
        assert np.array_equal(decoded.stored, expected)


def _elements(ds) -> dict:
    """Every top-level element as pydicom converts it: (VR, value's repr, which makes NaN
    equal to NaN), or the error converting it raises."""
    out = {}
    for tag in ds.keys():
        try:
            element = ds[tag]
            out[int(tag)] = (element.VR, repr(element.value))
        except Exception as error:  # the same failure both ways is the same outcome
            out[int(tag)] = type(error).__name__
    return out


def _with_command_set(source: Path, target: Path) -> Path:
    """A slice with a command-set element (group 0000, always implicit VR) before the data."""
    data = bytearray(source.read_bytes())
    (meta_length,) = np.frombuffer(bytes(data[140:144]), dtype="<u4")
    start = 144 + int(meta_length)
    element = bytes([0x00, 0x00, 0x00, 0x01]) + (2).to_bytes(4, "little") + b"\x01\x00"
    target.write_bytes(bytes(data[:start]) + element + bytes(data[start:]))
    return target


@pytest.mark.parametrize("case", DICOM_CASES, ids=[c.name for c in DICOM_CASES])
def test_the_short_header_read_is_what_dcmread_reads(case: Case, tmp_path: Path) -> None:
    """Up to the pixels, every file reads as ``dcmread(stop_before_pixels=True)`` reads it:
    the same elements with the same VRs and bytes, the same meta information and character
    set; or the short read declines (None) and dcmread is used."""
    import io
    import warnings

    import pydicom

    from ichseg.io.dicom_header import declared_transfer_syntax, read_up_to_pixels

    root = tmp_path / "input"
    root.mkdir()
    source = sorted(write_good(root).glob("*.dcm"))[0]
    case.build(root)
    extra = [
        _mislabelled(source, tmp_path / "implicit_written.dcm", written_implicit=True),
        _mislabelled(source, tmp_path / "explicit_written.dcm", written_implicit=False),
        _rewritten(source, tmp_path / "implicit.dcm", "1.2.840.10008.1.2"),
    ]
    read = declined = 0
    for path in [*list_files(root).files, *extra]:
        data = path.read_bytes()
        declared = declared_transfer_syntax(data)
        if declared not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
            continue
        full, part = io.BytesIO(data), io.BytesIO(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                expected = pydicom.dcmread(full, stop_before_pixels=True)
            except Exception:
                continue  # the reader falls back to dcmread, which reports it
            short = read_up_to_pixels(part, declared)
        if short is None:
            declined += 1
            continue
        read += 1
        assert part.tell() == full.tell(), path  # where the pixel element is looked for
        assert _elements(short) == _elements(expected), path
        assert short.file_meta == expected.file_meta, path
        assert short.original_character_set == expected.original_character_set, path
        assert short.original_encoding == expected.original_encoding, path
    assert read >= len(extra)
    with_command = _with_command_set(source, tmp_path / "command.dcm")
    assert read_up_to_pixels(io.BytesIO(with_command.read_bytes()), "1.2.840.10008.1.2.1") is None


def _with_long_header(source: Path, target: Path) -> Path:
    """A slice whose elements before the pixels outgrow the header read's first bytes."""
    import pydicom

    from ichseg.io.dicom_header import HEADER_PREFIX_BYTES

    ds = pydicom.dcmread(source)
    ds.add_new(0x00091010, "OB", b"\1" * (HEADER_PREFIX_BYTES + 100))  # a private blob
    ds.save_as(target)
    return target


def _with_open_ended_blob(source: Path, target: Path, first: bytes) -> Path:
    """A slice with a private OB element of undefined length (ended by a sequence delimiter)
    that runs past the header read's first bytes; its value starts with ``first``."""
    import struct

    import pydicom

    from ichseg.io.dicom_header import HEADER_PREFIX_BYTES

    ds = pydicom.dcmread(source)
    ds.add_new(0x00090010, "LO", "ICHSEG TEST")
    ds.add_new(0x00091001, "OB", b"\xaa\xbb\xcc\xdd")
    ds.save_as(target)
    data = target.read_bytes()
    element = struct.pack("<HH2sHI", 0x0009, 0x1001, b"OB", 0, 4) + b"\xaa\xbb\xcc\xdd"
    at = data.index(element)
    value = first + b"\x11" * (HEADER_PREFIX_BYTES + 100) + b"\xfe\xff\xdd\xe0\0\0\0\0"
    open_ended = struct.pack("<HH2sHI", 0x0009, 0x1001, b"OB", 0, 0xFFFFFFFF) + value
    target.write_bytes(data[:at] + open_ended + data[at + len(element) :])
    return target


def _header_outcome(path: Path, monkeypatch: pytest.MonkeyPatch, short: bool):
    from ichseg.io import dicom_header

    with monkeypatch.context() as patch:
        if not short:
            patch.setattr(dicom_header, "_header_from_first_bytes", lambda path: None)
        try:
            return read_header(path)
        except InputError as error:  # NotAnImage included
            return (type(error).__name__, error.reason)


@pytest.mark.parametrize("case", DICOM_CASES, ids=[c.name for c in DICOM_CASES])
def test_header_reads_from_the_first_bytes_are_what_dcmread_gives(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header-only read from the file's first bytes gives the header (or the reason it
    cannot) that dcmread from the path gives, and is declined where the header is longer."""
    from ichseg.io import dicom_header

    root = tmp_path / "input"
    root.mkdir()
    source = sorted(write_good(root).glob("*.dcm"))[0]
    case.build(root)
    long_header = _with_long_header(source, tmp_path / "long.dcm")
    # Cut inside a value of undefined length, which pydicom abandons with a partial dataset;
    # one such value starts with bytes that look like the pixel data tag.
    open_ended = [
        _with_open_ended_blob(source, tmp_path / f"open_{i}.dcm", first)
        for i, first in enumerate((b"\x22" * 4, b"\xe0\x7f\x10\x00"))
    ]
    extra = [
        _mislabelled(source, tmp_path / "implicit_written.dcm", written_implicit=True),
        _mislabelled(source, tmp_path / "explicit_written.dcm", written_implicit=False),
        _rewritten(source, tmp_path / "implicit.dcm", "1.2.840.10008.1.2"),
        long_header,
        *open_ended,
    ]
    taken = []
    real = dicom_header._header_from_first_bytes

    def counting(path):
        out = real(path)
        taken.append((path, out is not None))
        return out

    monkeypatch.setattr(dicom_header, "_header_from_first_bytes", counting)
    for path in [*list_files(root).files, *extra]:
        expected = _header_outcome(path, monkeypatch, short=False)
        assert _header_outcome(path, monkeypatch, short=True) == expected, path
    used = dict(taken)
    assert used[source] and used[extra[0]] and used[extra[2]]
    assert not used[long_header] and not any(used[path] for path in open_ended)
    assert not isinstance(_header_outcome(open_ended[1], monkeypatch, short=False), tuple)
