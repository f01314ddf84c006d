"""2D image folders: pixel decoding of every PNG/JPG flavour, both layouts, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ichseg.errors import InputError
from ichseg.io.images import ImageFolderIndex, load_image, read_image_folder
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
    assert index.classes == ["hemorrhage", "normal"]
    names = [p.relative_to(tmp_path).as_posix() for p in index.paths]
    assert names == ["hemorrhage/p7/s1.png", "hemorrhage/x.JPEG", "normal/a.jpg", "normal/b.png"]
    assert index.targets.dtype == np.int64
    assert index.targets.tolist() == [0, 0, 1, 1]
    assert index.groups == ["p7", "x", "a", "b"]
    assert any("empty" in w for w in index.warnings)
    image, target = index.load(1)
    assert image.shape == (1, 4, 4) and target == 0
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
    assert index.classes == ["epidural", "normal"]
    assert index.targets.tolist() == [1, 0, 1]
    assert index.groups == ["P1", "P1", "c"]
    assert all(index.load(i)[0].shape == (3, 5, 5) for i in range(len(index)))


def test_csv_multiclass_int_labels_kept_as_indices(tmp_path: Path) -> None:
    save(tmp_path / "a.png", gray8())
    save(tmp_path / "b.png", gray8())
    csv = tmp_path / "meta" / "my_labels.csv"
    csv.parent.mkdir()
    csv.write_text("path,label,study_id\na.png,2,S1\nb.png,0,S2\n")
    index = read_image_folder(tmp_path, labels_csv=csv)
    assert index.classes == ["0", "1", "2"]
    assert index.targets.tolist() == [2, 0]
    assert index.groups == ["S1", "S2"]


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
    assert index.groups == ["a", "b"]


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
