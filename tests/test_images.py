"""2D image folders: pixel decoding of every PNG/JPG flavour, both layouts, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ichseg.errors import ConfigError, InputError
from ichseg.io.images import (
    ImageFolderIndex,
    canonical_class,
    load_image,
    multilabel_from_classes,
    read_image_folder,
)
from ichseg.volume import SUBTYPES


def save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def gray8(h: int = 4, w: int = 5, value: int | None = None) -> Image.Image:
    """8-bit gray ramp (0, 10, 20, ...) or, with ``value``, a constant image."""
    if value is None:
        data = (np.arange(h * w) * 10 % 256).astype(np.uint8).reshape(h, w)
    else:
        data = np.full((h, w), value, dtype=np.uint8)
    return Image.fromarray(data)


def assert_one_line(exc: pytest.ExceptionInfo[InputError], *words: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


# --------------------------------------------------------------------------------------------
# load_image


def test_gray8_values_and_channel_repeat(tmp_path: Path) -> None:
    path = save(tmp_path / "g.png", gray8())
    expected = np.arange(20, dtype=np.float32).reshape(4, 5) * 10 / 255
    one = load_image(path, channels=1)
    assert one.shape == (1, 4, 5) and one.dtype == np.float32
    np.testing.assert_allclose(one[0], expected, atol=1e-6)
    three = load_image(path)
    assert three.shape == (3, 4, 5)
    for channel in three:
        np.testing.assert_array_equal(channel, one[0])


def test_gray16_scaled_by_full_range(tmp_path: Path) -> None:
    data = np.array([[0, 1000, 65535], [32768, 5, 40000]], dtype=np.uint16)
    path = save(tmp_path / "g16.png", Image.fromarray(data))
    image = load_image(path, channels=1)
    np.testing.assert_allclose(image[0], data / 65535.0, rtol=1e-6)
    # Not rescaled by the image's own maximum: a dim 16-bit image stays dim.
    dim = save(tmp_path / "dim.png", Image.fromarray(np.full((2, 2), 1000, dtype=np.uint16)))
    assert load_image(dim, channels=1).max() == pytest.approx(1000 / 65535)


def test_rgb_to_gray_uses_luma(tmp_path: Path) -> None:
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    path = save(tmp_path / "red.png", Image.fromarray(rgb))
    three = load_image(path)
    np.testing.assert_allclose(three[0], 1.0)
    np.testing.assert_allclose(three[1:], 0.0)
    np.testing.assert_allclose(load_image(path, channels=1), 0.299, atol=1e-6)


def test_rgba_alpha_dropped(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 1] = 200
    rgba[..., 3] = 0  # fully transparent: compositing would change the colour, dropping won't
    path = save(tmp_path / "a.png", Image.fromarray(rgba, mode="RGBA"))
    image = load_image(path)
    assert image.shape == (3, 2, 2)
    np.testing.assert_allclose(image[1], 200 / 255, atol=1e-6)
    np.testing.assert_allclose(image[[0, 2]], 0.0)


def test_palette_and_gray_alpha(tmp_path: Path) -> None:
    palette = Image.new("P", (3, 2))
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * (254 * 3))
    palette.putpixel((1, 0), 1)
    path = save(tmp_path / "p.png", palette)
    with Image.open(path) as check:
        assert check.mode == "P"
    image = load_image(path, channels=1)
    expected = np.zeros((2, 3), dtype=np.float32)
    expected[0, 1] = 1.0
    np.testing.assert_allclose(image[0], expected, atol=1e-6)
    la = save(tmp_path / "la.png", Image.new("LA", (2, 2), (128, 0)))
    np.testing.assert_allclose(load_image(la), 128 / 255, atol=1e-6)


def test_jpeg_gray(tmp_path: Path) -> None:
    path = save(tmp_path / "g.jpg", gray8(8, 8, value=100))
    image = load_image(path, channels=1)
    assert image.shape == (1, 8, 8)
    np.testing.assert_allclose(image, 100 / 255, atol=3 / 255)


def test_resize_and_native_size(tmp_path: Path) -> None:
    big = save(tmp_path / "big.png", gray8(20, 30, value=77))
    small = save(tmp_path / "small.png", Image.fromarray(np.full((5, 7, 3), 77, np.uint8)))
    assert load_image(big).shape == (3, 20, 30)
    assert load_image(small).shape == (3, 5, 7)
    for path in (big, small):
        image = load_image(path, size=(8, 6))
        assert image.shape == (3, 8, 6)
        np.testing.assert_allclose(image, 77 / 255, atol=1e-5)
    g16 = save(tmp_path / "g16.png", Image.fromarray(np.full((4, 4), 300, dtype=np.uint16)))
    np.testing.assert_allclose(load_image(g16, channels=1, size=(2, 2)), 300 / 65535, rtol=1e-5)


def test_load_image_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError) as exc:
        load_image(tmp_path / "none.png")
    assert_one_line(exc, str(tmp_path / "none.png"), "not found")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a png")
    with pytest.raises(InputError) as exc:
        load_image(junk)
    assert_one_line(exc, str(junk), "corrupt")
    full = save(tmp_path / "full.png", gray8(64, 64))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(full.read_bytes()[:60])
    with pytest.raises(InputError) as exc:
        load_image(truncated)
    assert_one_line(exc, str(truncated), "corrupt")
    with pytest.raises(ValueError):
        load_image(full, channels=2)
    with pytest.raises(ValueError):
        load_image(full, size=(0, 4))


# --------------------------------------------------------------------------------------------
# Class sub-folder layout


def test_class_folders(tmp_path: Path) -> None:
    save(tmp_path / "normal" / "b.png", gray8())
    save(tmp_path / "normal" / "a.jpg", gray8(value=3))
    save(tmp_path / "hemorrhage" / "x.JPEG", Image.new("RGB", (6, 3)))
    save(tmp_path / "hemorrhage" / "p7" / "s1.png", gray8())
    save(tmp_path / "hemorrhage" / "._x.png", gray8())  # macOS resource fork, not an image
    (tmp_path / "hemorrhage" / "notes.txt").write_text("ignore me")
    (tmp_path / "empty").mkdir()
    index = read_image_folder(tmp_path, channels=1, size=(4, 4))
    assert isinstance(index, ImageFolderIndex)
    assert index.task == "multiclass"
    assert index.classes == ["normal", "hemorrhage"]  # the negative class is class 0
    names = [p.relative_to(tmp_path).as_posix() for p in index.paths]
    assert names == ["hemorrhage/p7/s1.png", "hemorrhage/x.JPEG", "normal/a.jpg", "normal/b.png"]
    assert index.targets.dtype == np.int64
    assert index.targets.tolist() == [1, 1, 0, 0]
    # p7 is a patient folder; the images directly in a class folder are one group each.
    assert index.groups == ["p7", "hemorrhage/x.JPEG", "normal/a.jpg", "normal/b.png"]
    assert index.group_source == "folder+image"
    assert any("3 of 4 images have no group" in w for w in index.warnings)
    assert any("empty" in w for w in index.warnings)
    image, target = index.load(1)
    assert image.shape == (1, 4, 4) and target == 1
    assert len(index) == 4


def test_empty_folder_and_loose_images(tmp_path: Path) -> None:
    with pytest.raises(InputError) as exc:
        read_image_folder(tmp_path)
    assert_one_line(exc, "no PNG/JPG images found under", str(tmp_path))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("x")
    with pytest.raises(InputError) as exc:
        read_image_folder(tmp_path)
    assert_one_line(exc, "no PNG/JPG images found under")
    save(tmp_path / "loose.png", gray8())
    with pytest.raises(InputError) as exc:
        read_image_folder(tmp_path)
    assert_one_line(exc, str(tmp_path), "labels.csv")
    with pytest.raises(InputError) as exc:
        read_image_folder(tmp_path / "missing")
    assert_one_line(exc, "not found")


# --------------------------------------------------------------------------------------------
# labels.csv layout


def test_csv_multiclass_names_and_groups(tmp_path: Path) -> None:
    save(tmp_path / "img" / "a.png", gray8())
    save(tmp_path / "img" / "b.png", Image.new("RGBA", (9, 2)))
    save(tmp_path / "img" / "c.png", Image.fromarray(np.zeros((3, 3), np.uint16)))
    (tmp_path / "labels.csv").write_text(
        "Filename,Label,patient_id\nimg/a.png,normal,P1\nimg/b.png,epidural,P1\nimg/c.png,normal,\n"
    )
    index = read_image_folder(tmp_path, size=(5, 5))
    assert index.task == "multiclass"
    assert index.classes == ["normal", "epidural"]
    assert index.targets.tolist() == [0, 1, 0]
    assert index.groups == ["P1", "P1", "img/c.png"]  # empty cell: a group of its own
    assert index.group_source == "column:patient_id+image"
    assert any("1 of 3 images have no group" in w for w in index.warnings)
    assert all(index.load(i)[0].shape == (3, 5, 5) for i in range(len(index)))


def test_csv_multiclass_int_labels_kept_as_indices(tmp_path: Path) -> None:
    save(tmp_path / "a.png", gray8())
    save(tmp_path / "b.png", gray8())
    csv = tmp_path / "meta" / "my_labels.csv"
    csv.parent.mkdir()
    csv.write_text("path,label,study_id\na.png,2,S1\nb.png,0,S2\n")
    index = read_image_folder(tmp_path, labels_csv=csv)
    assert index.classes == ["normal", "1", "2"]
    assert index.targets.tolist() == [2, 0]
    assert index.groups == ["S1", "S2"]
    assert index.group_source == "column:study_id"
    assert index.labels_csv == csv
    assert any("class 0 is 'normal'" in w for w in index.warnings)
    np.testing.assert_array_equal(
        index.multilabel_targets(), [[1, *[np.nan] * 5], [0, 0, 0, 0, 0, 0]]
    )


def test_csv_multilabel(tmp_path: Path) -> None:
    save(tmp_path / "a.png", gray8())
    save(tmp_path / "b.png", gray8())
    (tmp_path / "labels.csv").write_text(
        "image," + ",".join(SUBTYPES) + "\na.png,1,0,0,0,1,1\nb.png,0,0,0,0,0,0\n"
    )
    index = read_image_folder(tmp_path)
    assert index.task == "multilabel"
    assert index.classes == list(SUBTYPES)
    assert index.targets.dtype == np.float32 and index.targets.shape == (2, 6)
    np.testing.assert_array_equal(index.targets[0], [1, 0, 0, 0, 1, 1])
    assert index.groups == ["a.png", "b.png"]
    assert index.group_source == "image"
    targets = index.multilabel_targets()
    np.testing.assert_array_equal(targets, index.targets)
    targets[0, 0] = 0  # a copy: the index keeps its own targets
    assert index.targets[0, 0] == 1
    with pytest.raises(InputError) as exc:
        index.multiclass_targets()
    assert_one_line(exc, str(tmp_path / "labels.csv"), "multilabel")


def test_csv_multilabel_without_any_derives_it(tmp_path: Path) -> None:
    save(tmp_path / "a.png", gray8())
    (tmp_path / "labels.csv").write_text("image," + ",".join(SUBTYPES[1:]) + "\na.png,0,1,0,0,0\n")
    index = read_image_folder(tmp_path)
    np.testing.assert_array_equal(index.targets[0], [1, 0, 1, 0, 0, 0])


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("file,label\na.png,x\n", ("no image column", "image, filename, path")),
        ("image,kind\na.png,x\n", ("no label column",)),
        ("image,label\nmissing.png,x\n", ("line 2", "missing.png", "not found")),
        ("image,label\n", ("lists no images",)),
        ("image,label\na.png,\n", ("line 2", "empty label")),
        ("image," + ",".join(SUBTYPES) + "\na.png,1,0,0,0,0,7\n", ("line 2", "subdural")),
    ],
)
def test_csv_errors(tmp_path: Path, text: str, words: tuple[str, ...]) -> None:
    save(tmp_path / "a.png", gray8())
    csv = tmp_path / "labels.csv"
    csv.write_text(text)
    with pytest.raises(InputError) as exc:
        read_image_folder(tmp_path)
    assert_one_line(exc, str(csv), *words)


def test_verify_catches_corrupt_image(tmp_path: Path) -> None:
    save(tmp_path / "ok" / "a.png", gray8())
    bad = tmp_path / "ok" / "b.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    index = read_image_folder(tmp_path)  # indexing alone does not decode pixels
    assert len(index) == 2
    with pytest.raises(InputError) as exc:
        read_image_folder(tmp_path, verify=True)
    assert_one_line(exc, str(bad), "corrupt")
    with pytest.raises(InputError):
        index.load(1)
    with pytest.raises(InputError) as exc:
        read_image_folder(tmp_path, labels_csv=tmp_path / "nope.csv")
    assert_one_line(exc, "nope.csv", "not found")


# --------------------------------------------------------------------------------------------
# Class names


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("normal", "normal"),
        ("Negative", "normal"),
        ("NONE", "normal"),
        ("no_hemorrhage", "normal"),
        ("No Hemorrhage", "normal"),
        ("no-hemorrhage", "normal"),
        (" 0 ", "normal"),
        ("Hemorrhage", "hemorrhage"),
        ("any", "hemorrhage"),
        ("ICH", "hemorrhage"),
        ("1", "hemorrhage"),
        ("EDH", "epidural"),
        ("Epidural", "epidural"),
        ("iph", "intraparenchymal"),
        ("IVH", "intraventricular"),
        ("SAH", "subarachnoid"),
        ("sdh", "subdural"),
        ("Subdural", "subdural"),
        ("fracture", None),
        ("2", None),
    ],
)
def test_canonical_class(label: str, expected: str | None) -> None:
    assert canonical_class(label) == expected


def write_csv(root: Path, text: str, *images: str) -> Path:
    for name in images:
        save(root / name, gray8())
    csv = root / "labels.csv"
    csv.write_text(text)
    return csv


def test_binary_label_column_zero_one(tmp_path: Path) -> None:
    write_csv(tmp_path, "image,label\na.png,1\nb.png,0\nc.png,1\n", "a.png", "b.png", "c.png")
    index = read_image_folder(tmp_path)
    assert index.task == "multiclass"
    assert index.classes == ["normal", "hemorrhage"]
    assert index.targets.tolist() == [1, 0, 1]
    targets, classes = index.multiclass_targets()
    assert targets.dtype == np.int64 and targets.tolist() == [1, 0, 1]
    assert classes == ["normal", "hemorrhage"]
    multilabel = index.multilabel_targets()
    assert multilabel.dtype == np.float32 and multilabel.shape == (3, 6)
    np.testing.assert_array_equal(multilabel[:, 0], [1, 0, 1])
    np.testing.assert_array_equal(multilabel[1], np.zeros(6))  # normal: no subtype either
    assert np.isnan(multilabel[[0, 2], 1:]).all()  # which subtype bled is unknown


def test_binary_data_keeps_both_classes_in_a_one_class_subset(tmp_path: Path) -> None:
    write_csv(tmp_path, "image,label\na.png,0\nb.png,0\n", "a.png", "b.png")
    index = read_image_folder(tmp_path)
    assert index.classes == ["normal", "hemorrhage"]
    assert index.targets.tolist() == [0, 0]


def test_binary_label_column_names(tmp_path: Path) -> None:
    write_csv(
        tmp_path,
        "image,label\na.png,Hemorrhage\nb.png,normal\nc.png,No Hemorrhage\nd.png,NEGATIVE\n"
        "e.png,ich\n",
        *(f"{n}.png" for n in "abcde"),
    )
    index = read_image_folder(tmp_path)
    assert index.classes == ["normal", "hemorrhage"]
    assert index.targets.tolist() == [1, 0, 0, 0, 1]
    assert not [w for w in index.warnings if "not hemorrhage" in w]


def test_subtype_names_in_label_column(tmp_path: Path) -> None:
    write_csv(
        tmp_path,
        "image,label,patient\na.png,SDH,P1\nb.png,normal,P1\nc.png,hemorrhage,P2\n"
        "d.png,Epidural,P3\ne.png,subdural,P3\n",
        *(f"{n}.png" for n in "abcde"),
    )
    index = read_image_folder(tmp_path)
    assert index.classes == ["normal", "hemorrhage", "epidural", "subdural"]
    assert index.targets.tolist() == [3, 0, 1, 2, 3]
    nan = np.nan
    np.testing.assert_array_equal(
        index.multilabel_targets(),
        [
            [1, 0, 0, 0, 0, 1],  # SDH: the other subtypes are 0, the classes are exclusive
            [0, 0, 0, 0, 0, 0],  # normal
            [1, nan, nan, nan, nan, nan],  # hemorrhage of unknown subtype
            [1, 1, 0, 0, 0, 0],  # epidural
            [1, 0, 0, 0, 0, 1],
        ],
    )
    open_ended = index.multilabel_targets(exclusive_subtypes=False)
    np.testing.assert_array_equal(open_ended[0], [1, nan, nan, nan, nan, 1])
    np.testing.assert_array_equal(open_ended[1], np.zeros(6))


def test_class_subfolders_with_subtype_names(tmp_path: Path) -> None:
    save(tmp_path / "Normal" / "p1" / "1.png", gray8())
    save(tmp_path / "IVH" / "p2" / "1.png", gray8())
    save(tmp_path / "IVH" / "p1" / "2.png", gray8())
    save(tmp_path / "SAH" / "p3" / "1.png", gray8())
    index = read_image_folder(tmp_path)
    assert index.classes == ["normal", "intraventricular", "subarachnoid"]
    names = [p.relative_to(tmp_path).as_posix() for p in index.paths]
    assert names == ["IVH/p1/2.png", "IVH/p2/1.png", "Normal/p1/1.png", "SAH/p3/1.png"]
    assert index.targets.tolist() == [1, 1, 0, 2]
    # One patient's folders under two classes stay one group.
    assert index.groups == ["p1", "p2", "p1", "p3"]
    assert index.group_source == "folder"
    assert not [w for w in index.warnings if "group" in w.lower()]
    np.testing.assert_array_equal(
        index.multilabel_targets(),
        [[1, 0, 0, 1, 0, 0], [1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 1, 0]],
    )


def test_class_folders_with_the_same_meaning_merge(tmp_path: Path) -> None:
    save(tmp_path / "normal" / "p1" / "a.png", gray8())
    save(tmp_path / "negative" / "p2" / "a.png", gray8())
    save(tmp_path / "ICH" / "p3" / "a.png", gray8())
    index = read_image_folder(tmp_path)
    assert index.classes == ["normal", "hemorrhage"]
    assert index.targets.tolist() == [1, 0, 0]
    assert any("negative, normal all mean 'normal'" in w for w in index.warnings)


def test_flat_class_folders_warn_one_group_per_image(tmp_path: Path) -> None:
    save(tmp_path / "normal" / "1.png", gray8())
    save(tmp_path / "hemorrhage" / "1.png", gray8())
    index = read_image_folder(tmp_path)
    assert index.group_source == "image"
    # Same file name in two classes: still two images, so two groups.
    assert index.groups == ["hemorrhage/1.png", "normal/1.png"]
    fallback = [w for w in index.warnings if "each image is its own group" in w]
    assert len(fallback) == 1
    assert "split across train and test" in fallback[0]
    assert "<root>/<class>/<patient>/" in fallback[0]


def test_unrecognised_class_names(tmp_path: Path) -> None:
    write_csv(tmp_path, "image,label\na.png,fracture\nb.png,normal\n", "a.png", "b.png", "c.png")
    index = read_image_folder(tmp_path)
    assert index.classes == ["normal", "fracture"]
    assert any("fracture are not hemorrhage" in w for w in index.warnings)
    np.testing.assert_array_equal(index.multilabel_targets()[0], [1, *[np.nan] * 5])
    (tmp_path / "labels.csv").write_text("image,label\na.png,dog\nc.png,Cat\n")
    index = read_image_folder(tmp_path)
    assert index.classes == ["cat", "dog"]
    assert index.targets.tolist() == [1, 0]
    assert any("six-label (multilabel) targets are unavailable" in w for w in index.warnings)
    with pytest.raises(InputError) as exc:
        index.multilabel_targets()
    assert_one_line(exc, str(tmp_path / "labels.csv"), "cat, dog")


def test_multilabel_from_classes_directly() -> None:
    classes = ["normal", "hemorrhage", "intraparenchymal"]
    targets = multilabel_from_classes(np.array([2, 0, 1]), classes)
    np.testing.assert_array_equal(
        targets, [[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, *[np.nan] * 5]]
    )
    assert targets.dtype == np.float32
    assert multilabel_from_classes(np.zeros(0, np.int64), classes).shape == (0, 6)


# --------------------------------------------------------------------------------------------
# Numeric ids in the image column


def test_numeric_id_matches_zero_padded_file(tmp_path: Path) -> None:
    save(tmp_path / "scans" / "049.png", gray8())
    save(tmp_path / "scans" / "deep" / "0007.jpg", gray8())
    save(tmp_path / "scans" / "12.png", gray8())
    save(tmp_path / "scans" / "100a.png", gray8())  # not all digits: never an id match
    (tmp_path / "labels.csv").write_text("image,label\n49,1\n7,0\n12,0\nscans/049.png,1\n")
    index = read_image_folder(tmp_path)
    names = [p.relative_to(tmp_path).as_posix() for p in index.paths]
    assert names == ["scans/049.png", "scans/deep/0007.jpg", "scans/12.png", "scans/049.png"]
    assert index.targets.tolist() == [1, 0, 0, 1]
    assert any("more than once" in w and "lines 2 and 5" in w for w in index.warnings)


def test_numeric_id_prefers_exact_file_name(tmp_path: Path) -> None:
    gray8().save(tmp_path / "5", format="PNG")  # a PNG whose file name is just "5"
    save(tmp_path / "005.png", gray8())
    (tmp_path / "labels.csv").write_text("image,label\n5,0\n")
    index = read_image_folder(tmp_path)
    assert index.paths == [tmp_path / "5"]


@pytest.mark.parametrize(
    ("rows", "words"),
    [
        ("3,1\n", ("line 3", "image id 3 matches no file")),
        ("49,1\n", ("line 3", "image id 49 matches 2 images", "a/049.png", "b/0049.jpg")),
        ("x49,1\n", ("line 3", "x49", "not found")),
    ],
)
def test_numeric_id_errors(tmp_path: Path, rows: str, words: tuple[str, ...]) -> None:
    save(tmp_path / "a" / "049.png", gray8())
    save(tmp_path / "b" / "0049.jpg", gray8())
    save(tmp_path / "a" / "1.png", gray8())
    csv = tmp_path / "labels.csv"
    csv.write_text("image,label\n1,0\n" + rows)
    with pytest.raises(InputError) as exc:
        read_image_folder(tmp_path)
    assert_one_line(exc, str(csv), *words)


# --------------------------------------------------------------------------------------------
# Groups


def test_csv_without_group_column_warns(tmp_path: Path) -> None:
    write_csv(tmp_path, "image,label\nx/a.png,1\nx/b.png,0\n", "x/a.png", "x/b.png")
    index = read_image_folder(tmp_path)
    assert index.group_source == "image"
    assert index.groups == ["x/a.png", "x/b.png"]
    assert len(set(index.groups)) == len(index)
    warning = index.warnings[0]
    assert "\n" not in warning
    assert "labels.csv has no patient/study column" in warning
    assert "each image is its own group" in warning
    assert "split across train and test" in warning
    assert "patient_id" in warning and "group_pattern" in warning


@pytest.mark.parametrize(
    "column", ["patient_id", "Patient", "STUDY_ID", "study", "group", "Case", "Patient ID"]
)
def test_group_column_honoured(tmp_path: Path, column: str) -> None:
    write_csv(
        tmp_path,
        f"image,label,{column}\na.png,1,P1\nb.png,0,P1\nc.png,0,P2\n",
        "a.png",
        "b.png",
        "c.png",
    )
    index = read_image_folder(tmp_path)
    assert index.groups == ["P1", "P1", "P2"]
    assert index.group_source == f"column:{column}"
    assert not [w for w in index.warnings if "group" in w.lower()]


def test_group_column_preference(tmp_path: Path) -> None:
    write_csv(
        tmp_path,
        "image,label,study_id,patient\na.png,1,S1,P1\nb.png,0,S2,P1\n",
        "a.png",
        "b.png",
    )
    index = read_image_folder(tmp_path)
    assert index.groups == ["P1", "P1"]  # a patient's studies stay together
    assert index.group_source == "column:patient"


def test_empty_group_column_falls_back_loudly(tmp_path: Path) -> None:
    write_csv(tmp_path, "image,label,patient_id\na.png,1,\nb.png,0,\n", "a.png", "b.png")
    index = read_image_folder(tmp_path)
    assert index.group_source == "image"
    assert any("'patient_id' of labels.csv is empty" in w for w in index.warnings)


def test_group_pattern_overrides(tmp_path: Path) -> None:
    save(tmp_path / "normal" / "pt01_s1.png", gray8())
    save(tmp_path / "normal" / "pt02_s1.png", gray8())
    save(tmp_path / "hemorrhage" / "pt01_s2.png", gray8())
    index = read_image_folder(tmp_path, group_pattern=r"(?P<group>pt\d+)_")
    assert index.groups == ["pt01", "pt01", "pt02"]
    assert index.group_source == "pattern"
    assert not [w for w in index.warnings if "group" in w.lower()]
    write_csv(
        tmp_path,
        "image,label,patient_id\nnormal/pt01_s1.png,0,X\nhemorrhage/pt01_s2.png,1,Y\n",
    )
    # Searched in the path relative to the root, and stronger than a group column.
    index = read_image_folder(tmp_path, group_pattern=r"^(?P<group>[^/]+)/")
    assert index.groups == ["normal", "hemorrhage"]
    assert index.group_source == "pattern"


def test_group_pattern_errors(tmp_path: Path) -> None:
    save(tmp_path / "normal" / "pt01_s1.png", gray8())
    save(tmp_path / "normal" / "other.png", gray8())
    with pytest.raises(ConfigError, match="named group"):
        read_image_folder(tmp_path, group_pattern=r"pt(\d+)")
    with pytest.raises(ConfigError, match="not a regular expression"):
        read_image_folder(tmp_path, group_pattern=r"(?P<group>pt")
    with pytest.raises(InputError) as exc:
        read_image_folder(tmp_path, group_pattern=r"(?P<group>pt\d+)")
    assert_one_line(exc, str(tmp_path / "normal" / "other.png"), "1 of 2 images do not")
