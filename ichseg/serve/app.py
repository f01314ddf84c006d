"""The web application behind ``ichseg serve``: one page and a small JSON API.

``POST /api/predict`` runs :func:`ichseg.inference.predict` (the function behind
``ichseg predict``) on the uploaded files with the model loaded once at start-up, so its series
and slice rows carry the same fields and values as ``series.csv`` and ``predictions.csv``.
Paths in them are relative to the upload (``upload/...``); the columns that name output files
(``FILE_COLUMNS``) are left out because no file outlives the request. With ``?views=true`` it adds,
per series, every slice in the brain window with its intracranial mask and Grad-CAM heat map
at native resolution, which is what the page shows.

Each request works in its own temporary folder (see :mod:`ichseg.serve.uploads`), removed
when the answer is sent unless the app was created with ``keep_uploads``. One model run at a
time: requests upload in parallel and then queue for the model.
"""

import logging
import math
import socket
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ichseg.errors import ConfigError, InputError
from ichseg.serve.uploads import (
    MultipartReceiver,
    UploadError,
    UploadLimits,
    check_kinds,
    remove_folder,
    unpack_uploads,
)

log = logging.getLogger(__name__)

FILE_COLUMNS = ("mask", "hemorrhage_mask", "seg", "sr", "gradcam")
"""Columns of ``series.csv`` that name output files (masks, DICOM SEG and SR, Grad-CAM); the
API leaves them out, since no file outlives the request."""

UPLOAD_NAME = "upload"
"""How paths inside a request's upload are shown (the server's folders never are)."""


class Analyzer:
    """The loaded model and what a request needs to run it.

    Args:
        predictor: from :func:`ichseg.inference.load_predictor`.
        model_path: the run folder or bundle it came from.
        limits: upload limits.
        keep_uploads: leave each request folder in place (its path is logged).
        work_dir: parent of the request folders (default: the system's temporary folder).
        batch_size: slices per model pass (default: 8 on CPU, 32 on CUDA).
    """

    def __init__(
        self,
        predictor: Any,
        model_path: Path,
        limits: UploadLimits,
        keep_uploads: bool = False,
        work_dir: Path | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.predictor = predictor
        self.model_path = model_path
        self.limits = limits
        self.keep_uploads = keep_uploads
        self.work_dir = work_dir
        self.batch_size = batch_size
        self._model_lock = threading.Lock()

    def model_info(self) -> dict[str, Any]:
        """What the page shows about the model and what it accepts."""
        predictor = self.predictor
        config = predictor.config
        return {
            "model": self.model_path.name,
            "architecture": config.model.name,
            "mode": config.task.mode,
            "class_names": predictor.class_names,
            "thresholds": thresholds_json(predictor.thresholds),
            "source_kind": predictor.preprocessor.source_kind,
            "image_size": config.data.image_size,
            "masking": config.masking.method if config.masking.enabled else None,
            "device": str(predictor.device),
            "limits": self.limits.describe(),
        }

    def new_folder(self) -> Path:
        """A fresh, private request folder."""
        if self.work_dir is not None:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="ichseg-serve-", dir=self.work_dir))

    def analyse(self, folder: Path, received: list[Path], views: bool) -> dict[str, Any]:
        """Unpack and check the upload, run the model, and describe the result in plain data.

        Args:
            folder: the request folder; the files are under ``folder/received``.
            received: the files written there.
            views: add the page's per-slice pictures.

        Raises:
            UploadError: the upload is refused (4xx), with paths shown relative to it.
        """
        input_root = folder / "input"
        try:
            kinds = unpack_uploads(received, folder / "received", input_root, self.limits)
            check_kinds(kinds, self.predictor.preprocessor.source_kind, input_root)
            with self._model_lock:
                started = time.perf_counter()
                result = self._run(folder, input_root, views)
                result["seconds"] = round(time.perf_counter() - started, 3)
        except UploadError as error:
            raise UploadError(error.status, _scrub(error.message, folder, input_root)) from None
        except InputError as error:
            raise UploadError(422, _scrub(str(error), folder, input_root)) from None
        return _scrub(result, folder, input_root)

    def _run(self, folder: Path, input_root: Path, views: bool) -> dict[str, Any]:
        from ichseg.inference import predict

        predictor = self.predictor
        outcome = predict(
            self.model_path,
            input_root,
            folder / "output",
            gradcam=False,
            batch_size=self.batch_size,
            progress=False,
            predictor=predictor,
        )
        result: dict[str, Any] = {
            "model": self.model_path.name,
            "mode": predictor.config.task.mode,
            "class_names": predictor.class_names,
            "thresholds": thresholds_json(predictor.thresholds),
            "series": [
                {k: v for k, v in row.items() if k not in FILE_COLUMNS}
                for row in outcome.series_rows
            ],
            "slices": outcome.slice_rows,
            "skipped": [{"path": path, "reason": reason} for path, reason in outcome.skipped],
        }
        if views:
            result["views"] = self._views(outcome, input_root)
        return result

    def _views(self, outcome: Any, input_root: Path) -> list[dict[str, Any]]:
        from ichseg.serve.views import picture_views, volume_views

        if self.predictor.preprocessor.source_kind == "images":
            rows = outcome.slice_rows
            return [picture_views(self.predictor, Path(row["source"])) for row in rows]
        from ichseg.inference import predict_volume
        from ichseg.io.loader import index_input

        wanted = {(row["source"], row["series_uid"]) for row in outcome.series_rows}
        views = []
        for item in index_input(input_root).iter_volumes():
            if isinstance(item, InputError) or (item.source, item.series_uid) not in wanted:
                continue
            prediction = predict_volume(self.predictor, item, self.batch_size)
            views.append(volume_views(self.predictor, item, prediction))
        return views


def thresholds_json(thresholds: Any) -> dict[str, Any]:
    """The model's thresholds as JSON: a label without one (never positive) is null."""
    data = thresholds.to_dict()
    for level in ("slice", "series"):
        data[level] = {k: v if math.isfinite(v) else None for k, v in data[level].items()}
    return data


def _scrub(value: Any, folder: Path, input_root: Path) -> Any:
    """``value`` with the request folder's paths replaced by ``upload`` (strings, lists, dicts).

    A message or row never shows where the server keeps files, and reads the same whatever
    the temporary folder was.
    """
    if isinstance(value, str):
        for root in (input_root, input_root.resolve(), folder, folder.resolve()):
            value = value.replace(str(root), UPLOAD_NAME)
        return " ".join(value.split()) if "\n" in value else value
    if isinstance(value, dict):
        return {k: _scrub(v, folder, input_root) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, folder, input_root) for v in value]
    return value


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def create_app(
    model_path: str | Path,
    segmenter: str | Path | None = None,
    max_upload_mb: float = 512.0,
    keep_uploads: bool = False,
    *,
    max_file_mb: float | None = None,
    limits: UploadLimits | None = None,
    work_dir: str | Path | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    predictor: Any = None,
    hemorrhage_segmenter: str | Path | None = None,
) -> FastAPI:
    """The FastAPI application serving one model.

    The model is loaded here, once; every request reuses it.

    Args:
        model_path: a training run folder or an exported bundle.
        segmenter: a U-Net checkpoint instead of the one the model carries.
        max_upload_mb: the largest request body, in MiB.
        keep_uploads: leave each request folder in place (for debugging; holds patient data).
        max_file_mb: the largest single file, uploaded or unpacked (default: ``max_upload_mb``).
        limits: all upload limits at once (overrides the two sizes above).
        work_dir: parent of the request folders (default: the system's temporary folder).
        device: "cpu" or "cuda" (default: cuda when available).
        batch_size: slices per model pass (default: 8 on CPU, 32 on CUDA).
        predictor: a predictor already loaded from ``model_path`` (then ``segmenter``,
            ``hemorrhage_segmenter`` and ``device`` are not used).
        hemorrhage_segmenter: a hemorrhage U-Net for volumes in ml (default: the one the model
            carries, if any).

    Raises:
        InputError: a missing or damaged model (one line).
    """
    from ichseg.inference import load_predictor

    model_path = Path(model_path)
    limits = limits or UploadLimits.from_megabytes(max_upload_mb, max_file_mb)
    predictor = predictor or load_predictor(
        model_path, segmenter, device, hemorrhage_segmenter=hemorrhage_segmenter
    )
    if batch_size is None:
        from ichseg.engine.predict import default_inference_batch

        batch_size = default_inference_batch(predictor.device)
    analyzer = Analyzer(
        predictor,
        model_path,
        limits,
        keep_uploads,
        Path(work_dir) if work_dir is not None else None,
        batch_size,
    )
    page = (resources.files("ichseg.serve") / "static" / "index.html").read_text("utf-8")
    # Imported now rather than on the first upload, which would otherwise wait for them.
    import matplotlib.colors  # noqa: F401
    import monai.visualize  # noqa: F401

    app = FastAPI(
        title="ichseg",
        summary="Intracranial hemorrhage detection on head CT",
        docs_url=None,  # the interactive docs load scripts from a CDN
        redoc_url=None,
    )
    app.state.analyzer = analyzer

    def error(status: int, detail: str) -> JSONResponse:
        return JSONResponse({"detail": _one_line(detail)}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(p) for p in item.get('loc', ()))}: {item.get('msg', '')}"
            for item in exc.errors()
        ]
        return error(422, "; ".join(parts) or "invalid request")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        """Liveness: the model is loaded and requests are answered."""
        return {"status": "ok", "model": model_path.name}

    @app.get("/api/model")
    async def model() -> dict[str, Any]:
        """The model's labels, thresholds, input kind and the upload limits."""
        return analyzer.model_info()

    @app.post("/api/predict")
    async def predict(request: Request, views: bool = False) -> JSONResponse:
        """Probabilities for an uploaded DICOM series (files or a zip), NIfTI or PNG/JPG.

        Send the files as ``multipart/form-data`` (any field name). Returns the series and
        slice rows of ``ichseg predict``, the files skipped with reasons, and with
        ``views=true`` the page's per-slice pictures.
        """
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.total_bytes:
            return error(
                413, f"upload larger than the limit of {limits.total_bytes / (1 << 20):.3g} MiB"
            )
        folder = analyzer.new_folder()
        try:
            receiver = MultipartReceiver(
                request.headers.get("content-type"), folder / "received", limits
            )
            try:
                async for chunk in request.stream():
                    receiver.feed(chunk)
                received = receiver.finish()
            finally:
                receiver.close()
            result = await run_in_threadpool(analyzer.analyse, folder, received, views)
            return JSONResponse(result)
        except UploadError as refused:
            return error(refused.status, refused.message)
        except ClientDisconnect:
            return error(400, "the upload was interrupted")
        except Exception as failure:  # a bug must not show a traceback or a server path
            log.exception("analysing an upload failed")
            message = _scrub(f"{type(failure).__name__}: {failure}", folder, folder / "input")
            return error(500, f"internal error while analysing the upload ({message})")
        finally:
            if analyzer.keep_uploads:
                log.warning("upload kept in %s", folder)
            else:
                remove_folder(folder)

    return app


def open_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one).

    Raises:
        ConfigError: the address cannot be resolved or is in use (one line).
    """
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        server = socket.socket(family, kind, protocol)
    except (OSError, socket.gaierror) as failure:
        raise ConfigError(f"cannot listen on {host}:{port} ({failure})") from None
    try:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(address)
        server.listen(64)
    except OSError as failure:
        server.close()
        reason = failure.strerror or str(failure)
        raise ConfigError(f"cannot listen on {host}:{port} ({reason})") from None
    return server


def socket_url(server: socket.socket) -> str:
    """``http://host:port/`` of a listening socket (IPv6 hosts in brackets)."""
    host, port = server.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def run_app(app: Any, server: socket.socket, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn on an open socket until interrupted."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[server])
