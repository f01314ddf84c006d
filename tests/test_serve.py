"""``ichseg serve``: the JSON API against ``ichseg predict``, upload vetting, clean-up, the page.

The API is driven through FastAPI's TestClient; one slow test drives the page in headless
Chromium against the real command line server.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import shutil
import socket
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ichseg.serve import UploadLimits, create_app
from ichseg.serve.app import FILE_COLUMNS
from ichseg.volume import SUBTYPES

pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (pip install -e '.[dev]')")

from fastapi.testclient import TestClient  # noqa: E402

TOLERANCE = 1e-6
PATH_FIELDS = {"source"}
"""Fields that name where a file was: the server shows them relative to the upload."""
FILE_FIELDS = set(FILE_COLUMNS)
"""series.csv columns naming output files, which the API does not keep."""


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve-work")


@pytest.fixture(scope="module")
def client(trained_run: Path, work_dir: Path) -> TestClient:
    return TestClient(create_app(trained_run, device="cpu", work_dir=work_dir))


@pytest.fixture(scope="module")
def cam_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run with non-negative weights from the pooled features to the ``any`` logit.

    One epoch leaves the tiny model's Grad-CAM of ``any`` zero everywhere after its ReLU on the
    phantoms. With non-negative weights on non-negative (post-ReLU) features the map is
    positive wherever the last block responds, so the heat map has a hot end to look for.
    """
    import torch

    run = tmp_path_factory.mktemp("cam") / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval", "last.pt"))
    checkpoint = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    weights = checkpoint["state_dict"]
    last = [k for k in weights if k.startswith("head.") and k.endswith(".weight")][-1]
    weights[last][0] = weights[last][0].abs()
    torch.save(checkpoint, run / "best.pt")
    return run


@pytest.fixture(scope="module")
def cam_client(cam_run: Path, work_dir: Path) -> TestClient:
    return TestClient(create_app(cam_run, device="cpu", work_dir=work_dir))


@pytest.fixture(autouse=True)
def _work_dir_left_empty(request: pytest.FixtureRequest):
    """Every request folder is gone once the answer has been sent, whatever the outcome."""
    yield
    if "work_dir" in request.fixturenames:
        folder = request.getfixturevalue("work_dir")
        assert list(folder.iterdir()) == [], "a request left files behind"


def _study(phantom_dir: Path, index: int = 0) -> Path:
    return sorted(p for p in (phantom_dir / "dicom").iterdir() if p.is_dir())[index]


def _parts(paths: list[Path], root: Path | None = None) -> list[tuple[str, tuple]]:
    return [
        ("files", (p.relative_to(root).as_posix() if root else p.name, p.read_bytes()))
        for p in paths
    ]


def _reference(run: Path, source: Path, out: Path):
    """What ``ichseg predict`` makes of the same files."""
    from ichseg.inference import predict

    return predict(run, source, out, gradcam=False, progress=False)


def _assert_rows_equal(served: list[dict], expected: list[dict], drop: set[str]) -> None:
    """Same rows, same fields (less the path and file columns), same values."""
    assert len(served) == len(expected)
    for got, want in zip(served, expected, strict=True):
        assert set(got) == set(want) - FILE_FIELDS
        for key in set(want) - drop - FILE_FIELDS:
            if isinstance(want[key], float):
                assert got[key] == pytest.approx(want[key], abs=TOLERANCE), key
            else:
                assert got[key] == want[key], key


def _decode_png(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))) as image:
        assert image.format == "PNG"
        return np.asarray(image)


def _assert_one_line_refusal(response, status: int, work_dir: Path) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail"}
    detail = body["detail"]
    assert isinstance(detail, str) and detail
    assert "\n" not in detail and "Traceback" not in detail
    assert str(work_dir) not in detail and "/tmp" not in detail
    return detail


def test_dicom_series_upload_equals_predict(
    client: TestClient, trained_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    study = _study(phantom_dir)
    expected = _reference(trained_run, study, tmp_path / "reference")

    response = client.post("/api/predict", files=_parts(sorted(study.glob("*.dcm"))))

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["class_names"] == list(SUBTYPES)
    _assert_rows_equal(body["series"], expected.series_rows, PATH_FIELDS)
    _assert_rows_equal(body["slices"], expected.slice_rows, PATH_FIELDS)
    assert {row["source"] for row in body["series"]} == {"upload"}
    assert body["skipped"] == []
    assert "views" not in body
    series = body["series"][0]
    for name in body["class_names"]:
        threshold = body["thresholds"]["series"][name]
        positive = threshold is not None and series[name] >= threshold
        assert series[f"label_{name}"] == int(positive)


def test_hemorrhage_volumes_served_without_file_paths(
    trained_run: Path,
    hemorrhage_checkpoint: Path,
    phantom_dir: Path,
    work_dir: Path,
    tmp_path: Path,
) -> None:
    """A run carrying a hemorrhage U-Net: volumes in ml reach the API, the label map, SEG and
    SR paths (files deleted with the request) do not."""
    from ichseg.inference import HEMORRHAGE_SEGMENTER_FILE

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval", "last.pt"))
    shutil.copy(hemorrhage_checkpoint, run / HEMORRHAGE_SEGMENTER_FILE)
    study = _study(phantom_dir)
    expected = _reference(run, study, tmp_path / "reference")
    assert "hemorrhage_mask" in expected.series_rows[0]

    client = TestClient(create_app(run, device="cpu", work_dir=work_dir))
    response = client.post("/api/predict", files=_parts(sorted(study.glob("*.dcm"))))

    assert response.status_code == 200, response.text
    series = response.json()["series"]
    _assert_rows_equal(series, expected.series_rows, PATH_FIELDS)
    assert not set(series[0]) & {"mask", "hemorrhage_mask", "seg", "sr", "gradcam"}
    assert series[0]["volume_ml_total"] == pytest.approx(expected.series_rows[0]["volume_ml_total"])


def test_nifti_upload_with_views_at_native_resolution(
    cam_client: TestClient, cam_run: Path, tmp_path: Path
) -> None:
    from ichseg.phantom import PhantomConfig, write_dataset

    # 96 pixels against the model's 64: the heat maps must come back on the 96-pixel grid.
    write_dataset(tmp_path / "big", studies=1, seed=3, config=PhantomConfig(size=96, num_slices=4))
    volume = next((tmp_path / "big" / "nifti").glob("*_ct.nii.gz"))
    expected = _reference(cam_run, volume, tmp_path / "reference")

    response = cam_client.post("/api/predict?views=true", files=_parts([volume]))

    assert response.status_code == 200, response.text
    body = response.json()
    # A NIfTI's series uid is derived from its absolute path, so it names the copy on the server.
    path_derived = PATH_FIELDS | {"series_uid"}
    _assert_rows_equal(body["series"], expected.series_rows, path_derived)
    _assert_rows_equal(body["slices"], expected.slice_rows, path_derived)
    assert body["series"][0]["source"] == f"upload/{volume.name}"
    (view,) = body["views"]
    assert (view["rows"], view["columns"]) == (96, 96)
    assert [s["index"] for s in view["slices"]] == list(range(4))
    hot = 0
    for picture in view["slices"]:
        assert _decode_png(picture["image"]).shape == (96, 96)
        assert _decode_png(picture["mask"]).shape == (96, 96, 4)
        heat = _decode_png(picture["heatmap"])
        assert heat.shape == (96, 96, 4)
        colours = heat[..., :3].astype(int)
        assert (colours[..., 2] - colours[..., 0] > 100).any()  # jet's cold end
        hot += int((colours[..., 0] - colours[..., 2] > 100).any())
    # Each map is scaled to its own maximum, so every slice where the model responds has a
    # hot end.
    assert hot == len(view["slices"])


def test_zip_upload_equals_predict(
    client: TestClient, trained_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    dicom = phantom_dir / "dicom"
    expected = _reference(trained_run, dicom, tmp_path / "reference")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(dicom.rglob("*.dcm")):
            handle.write(path, f"scans/{path.relative_to(dicom).as_posix()}")

    response = client.post("/api/predict", files=[("files", ("studies.zip", archive.getvalue()))])

    assert response.status_code == 200, response.text
    body = response.json()
    _assert_rows_equal(body["series"], expected.series_rows, PATH_FIELDS)
    _assert_rows_equal(body["slices"], expected.slice_rows, PATH_FIELDS)
    studies = sorted(p.name for p in dicom.iterdir() if p.is_dir())
    assert [row["source"] for row in body["series"]] == [
        f"upload/studies.zip/scans/{name}" for name in studies
    ]


def test_folder_upload_keeps_series_apart(client: TestClient, phantom_dir: Path) -> None:
    dicom = phantom_dir / "dicom"
    # A browser's folder upload names each file by its path inside the folder.
    response = client.post("/api/predict", files=_parts(sorted(dicom.rglob("*.dcm")), dicom))

    assert response.status_code == 200, response.text
    studies = sorted(p.name for p in dicom.iterdir() if p.is_dir())
    assert [row["source"] for row in response.json()["series"]] == [
        f"upload/{name}" for name in studies
    ]


def test_partial_upload_lists_skipped_files(client: TestClient, phantom_dir: Path) -> None:
    study = _study(phantom_dir)
    files = _parts(sorted(study.glob("*.dcm"))) + [("files", ("notes.txt", b"a note\n"))]

    response = client.post("/api/predict", files=files)

    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["series"]) == 1
    assert [s["path"] for s in body["skipped"]] == ["upload/notes.txt"]
    assert "DICOM" in body["skipped"][0]["reason"]


def _zip_bytes(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as handle:
        for name, data in members.items():
            handle.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            handle.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def _truncated_dicom(phantom_dir: Path) -> bytes:
    return next(_study(phantom_dir).glob("*.dcm")).read_bytes()[:300]


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), 128, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_UPLOADS = {
    "junk bytes": (
        lambda _: [("files", ("scan.dcm", bytes(range(256)) * 8))],
        415,
        "not a DICOM, NIfTI",
    ),
    "text named .dcm": (
        lambda _: [("files", ("slice1.dcm", b"patient notes, not an image\n" * 20))],
        415,
        "slice1.dcm",
    ),
    "truncated DICOM": (
        lambda phantom: [("files", ("cut.dcm", _truncated_dicom(phantom)))],
        422,
        "cut.dcm",
    ),
    "picture for a CT model": (
        lambda _: [("files", ("slice.png", _png_bytes()))],
        415,
        "Hounsfield",
    ),
    "zip escaping with ..": (
        lambda _: [("files", ("a.zip", _zip_bytes({"ok/1.dcm": b"x", "../../evil.dcm": b"x"})))],
        400,
        "escapes",
    ),
    "zip with an absolute path": (
        lambda _: [("files", ("a.zip", _zip_bytes({"/etc/cron.d/evil": b"x"})))],
        400,
        "absolute",
    ),
    "zip with a symbolic link": (
        lambda _: [("files", ("a.zip", _zip_bytes({"1.dcm": b"x"}, symlink="link.dcm")))],
        400,
        "symbolic link",
    ),
    "damaged zip": (
        lambda _: [("files", ("a.zip", _zip_bytes({"1.dcm": b"x" * 100})[:60]))],
        400,
        "a.zip",
    ),
    "empty zip": (lambda _: [("files", ("a.zip", _zip_bytes({})))], 400, "no file"),
    "file name escaping with ..": (
        lambda _: [("files", ("../../outside.dcm", b"x"))],
        400,
        "escapes",
    ),
    "form without a file": (lambda _: [("note", (None, b"hello"))], 400, "no file"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_refused_in_one_line(
    client: TestClient, work_dir: Path, phantom_dir: Path, case: str
) -> None:
    build, status, hint = BAD_UPLOADS[case]

    response = client.post("/api/predict", files=build(phantom_dir))

    detail = _assert_one_line_refusal(response, status, work_dir)
    assert hint in detail


def test_truncated_multipart_body_is_refused(client: TestClient, work_dir: Path) -> None:
    body = b'--x\r\nContent-Disposition: form-data; name="f"; filename="a.dcm"\r\n\r\nabc'

    response = client.post(
        "/api/predict", content=body, headers={"content-type": "multipart/form-data; boundary=x"}
    )

    assert "closing boundary" in _assert_one_line_refusal(response, 400, work_dir)


def test_body_that_is_not_a_form_is_refused(client: TestClient, work_dir: Path) -> None:
    response = client.post(
        "/api/predict", content=b"\x00" * 64, headers={"content-type": "application/dicom"}
    )

    assert "multipart" in _assert_one_line_refusal(response, 415, work_dir)


@pytest.fixture(scope="module")
def small_client(trained_run: Path, work_dir: Path) -> TestClient:
    limits = UploadLimits(
        total_bytes=64 * 1024,
        file_bytes=16 * 1024,
        files=50,
        unzipped_bytes=48 * 1024,
        zip_members=20,
    )
    return TestClient(create_app(trained_run, limits=limits, work_dir=work_dir, device="cpu"))


OVERSIZED = {
    "request over the total": lambda: [
        ("files", (f"{i}.dcm", b"\x00" * 15 * 1024)) for i in range(5)
    ],
    "file over the per-file limit": lambda: [("files", ("big.dcm", b"\x00" * 20 * 1024))],
    "too many files": lambda: [("files", (f"{i}.dcm", b"x")) for i in range(51)],
    "zip bomb": lambda: [("files", ("bomb.zip", _zip_bytes({"zeros.dcm": b"\x00" * (1 << 20)})))],
    "zip unpacking over the total": lambda: [
        ("files", ("many.zip", _zip_bytes({f"{i}.dcm": b"\x00" * 10 * 1024 for i in range(6)})))
    ],
    "zip with too many members": lambda: [
        ("files", ("many.zip", _zip_bytes({f"{i}.dcm": b"x" for i in range(21)})))
    ],
}


@pytest.mark.parametrize("case", list(OVERSIZED))
def test_oversized_upload_is_413(small_client: TestClient, work_dir: Path, case: str) -> None:
    response = small_client.post("/api/predict", files=OVERSIZED[case]())

    _assert_one_line_refusal(response, 413, work_dir)
    assert list(work_dir.iterdir()) == []


def test_oversized_declared_length_is_refused_before_reading(
    small_client: TestClient, work_dir: Path
) -> None:
    response = small_client.post(
        "/api/predict",
        content=b"",
        headers={"content-type": "multipart/form-data; boundary=x", "content-length": "999999"},
    )

    _assert_one_line_refusal(response, 413, work_dir)


def test_keep_uploads_leaves_the_request_folder(
    trained_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    kept = tmp_path / "kept"
    app = create_app(trained_run, keep_uploads=True, work_dir=kept, device="cpu")
    files = sorted(_study(phantom_dir).glob("*.dcm"))

    response = TestClient(app).post("/api/predict", files=_parts(files))

    assert response.status_code == 200, response.text
    (folder,) = kept.iterdir()
    assert sorted(p.name for p in (folder / "input").iterdir()) == [p.name for p in files]


def test_picture_model_upload_equals_predict(
    trained_run: Path, work_dir: Path, tmp_path: Path
) -> None:
    from ichseg.inference import load_predictor, predict
    from ichseg.preprocess.pipeline import Preprocessor

    loaded = load_predictor(trained_run, device="cpu")
    data = loaded.config.data.model_copy(update={"source": "images"})
    config = loaded.config.model_copy(update={"data": data})
    predictor = dataclasses.replace(
        loaded, config=config, preprocessor=Preprocessor.from_config(config)
    )
    rng = np.random.default_rng(0)
    picture = tmp_path / "in" / "slice_07.png"
    picture.parent.mkdir()
    Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(picture)
    expected = predict(trained_run, picture, tmp_path / "out", progress=False, predictor=predictor)
    client = TestClient(create_app(trained_run, work_dir=work_dir, predictor=predictor))

    response = client.post("/api/predict?views=true", files=_parts([picture]))

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["series"] == []
    _assert_rows_equal(body["slices"], expected.slice_rows, PATH_FIELDS)
    assert body["slices"][0]["source"] == "upload/slice_07.png"
    (view,) = body["views"]
    assert _decode_png(view["slices"][0]["image"]).shape == (80, 72, 3)
    assert _decode_png(view["slices"][0]["heatmap"]).shape == (80, 72, 4)
    refused = client.post("/api/predict", files=_parts([next(trained_run.glob("*.yaml"))]))
    assert refused.status_code == 415


def test_page_health_and_model(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'type="range"' in html and "/api/predict" in html and 'type="file"' in html
    # Everything is in the one page: no scripts, styles or fonts from elsewhere.
    assert "http://" not in html and "https://" not in html
    assert client.get("/api/health").json() == {"status": "ok", "model": "run"}
    model = client.get("/api/model").json()
    assert model["class_names"][0] == "any" and model["source_kind"] == "hu"
    assert model["limits"]["max_upload_mb"] == 512
    missing = client.get("/api/nothing")
    assert missing.status_code == 404 and set(missing.json()) == {"detail"}


def test_serve_command_reports_bad_model_and_busy_port(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ichseg.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["serve", str(tmp_path / "no-run"), "--port", "0"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "no-run" in result.output

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["serve", str(tmp_path), "--port", str(port)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "cannot listen" in result.output


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.slow
def test_page_in_headless_chromium(
    cam_run: Path, phantom_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from browser import Browser, find_chromedriver, jet_pixels

    chromedriver = find_chromedriver()
    if not CHROMIUM.is_file() or chromedriver is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install them)")
    log = tmp_path / "server.log"
    root = Path(__file__).resolve().parents[1]
    with open(log, "wb") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "ichseg", "serve", str(cam_run), "--port", "0"],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        assert server.stdout is not None
        line = server.stdout.readline().decode()
        match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert match, f"no URL in {line!r}; log: {log.read_text()}"
        url = match.group(1)
        files = sorted(_study(phantom_dir).glob("*.dcm"))
        expected = _reference(cam_run, _study(phantom_dir), tmp_path / "reference")
        with Browser(CHROMIUM, chromedriver, tmp_path / "profile") as browser:
            browser.open(url)
            browser.wait_for("document.getElementById('model-info').textContent.includes('model')")
            browser.upload("#files", files)
            browser.click("#analyse")
            status = browser.wait_for(
                "const s = document.getElementById('status').textContent;"
                "const h = document.getElementById('img-heat');"
                "return (s.startsWith('Done') && h.complete && h.naturalWidth > 0) "
                "|| s.startsWith('Refused') ? s : null;",
                timeout=180,
            )
            assert status.startswith("Done"), status
            shown_any = browser.script(
                "return document.querySelector('#series-table tr:nth-child(2) td:nth-child(2)')"
                ".textContent"
            )
            stage = browser.element_screenshot("#stage")
            screenshot = browser.screenshot()
            browser.set_value("#slice", "0")
            first_slice = browser.script("return document.getElementById('slice-label').innerText")
        page = tmp_path / "page.png"
        page.write_bytes(screenshot)
        cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
        if cache is not None:  # kept where a person can look at it after the run
            shutil.copy(page, cache.mkdir("serve") / "page.png")
        assert float(shown_any) == pytest.approx(expected.series_rows[0]["any"], abs=5e-4)
        assert first_slice.startswith("slice 1 of 8")
        with Image.open(io.BytesIO(stage)) as image:
            pixels = np.asarray(image.convert("RGB"))
        blue, red = jet_pixels(pixels)
        # The heat map lies over the whole brain at half opacity: both ends of jet show.
        assert blue > 0.02 * pixels.shape[0] * pixels.shape[1], blue
        assert red > 0.005 * pixels.shape[0] * pixels.shape[1], red
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()
    assert server.returncode is not None


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("IM0001.dcm", "IM0001.dcm"),
        ("study/series 2/IM1.dcm", "study/series 2/IM1.dcm"),
        ("a//./b.dcm", "a/b.dcm"),
        ("win\\folder\\x.dcm", "win/folder/x.dcm"),
        (".hidden.dcm", "_hidden.dcm"),
        ("a<b>|c.nii.gz", "a_b__c.nii.gz"),
        ("", None),
        ("./", None),
    ],
)
def test_safe_relative_path(name: str, safe: str | None) -> None:
    from ichseg.serve.uploads import safe_relative_path

    result = safe_relative_path(name)
    assert (None if result is None else result.as_posix()) == safe


@pytest.mark.parametrize("name", ["../x.dcm", "a/../../x.dcm", "/etc/passwd", "C:\\x.dcm"])
def test_safe_relative_path_refuses_escapes(name: str) -> None:
    from ichseg.serve.uploads import UploadError, safe_relative_path

    with pytest.raises(UploadError) as refused:
        safe_relative_path(name)
    assert refused.value.status == 400


def test_sniff_kind(phantom_dir: Path, tmp_path: Path) -> None:
    import nibabel as nib

    from ichseg.serve.uploads import sniff_kind

    image = nib.Nifti1Image(np.zeros((4, 4, 2), dtype=np.int16), np.eye(4))
    nib.save(image, tmp_path / "plain.nii")
    nib.save(image, tmp_path / "packed.nii.gz")
    nib.save(nib.Nifti2Image(image.get_fdata(), np.eye(4)), tmp_path / "two.nii")
    (tmp_path / "picture.png").write_bytes(_png_bytes())
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    (tmp_path / "archive.zip").write_bytes(_zip_bytes({"a": b"x"}))
    (tmp_path / "notes.dcm").write_text("not an image\n" * 40)
    (tmp_path / "short").write_bytes(b"\x1f\x8b")
    expected = {
        "plain.nii": "nifti",
        "packed.nii.gz": "nifti",
        "two.nii": "nifti",
        "picture.png": "png",
        "photo.jpg": "jpeg",
        "archive.zip": "zip",
        "notes.dcm": "unknown",
        "short": "unknown",
    }
    assert {name: sniff_kind(tmp_path / name) for name in expected} == expected
    assert sniff_kind(next(_study(phantom_dir).glob("*.dcm"))) == "dicom"


@pytest.mark.parametrize(("batch_size", "expected"), [(None, 8), (5, 5)])
def test_the_app_batches_by_device_unless_told(
    trained_run: Path, tmp_path: Path, batch_size, expected
) -> None:
    app = create_app(trained_run, device="cpu", work_dir=tmp_path, batch_size=batch_size)
    assert app.state.analyzer.batch_size == expected
