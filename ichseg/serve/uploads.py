"""Receiving uploads safely: streamed multipart parts, zip archives, size limits, file kinds.

Everything a request brings lands in one request folder and nowhere else: the multipart body is
parsed as it streams in (never spooled to the system's temporary folder), each file part is
written straight to ``received/`` under a sanitised name, and zip archives are unpacked into
``input/`` after every member name, type and size has been checked. Limits are enforced while
bytes arrive, so an oversized upload is refused before it is stored whole.

Errors are :class:`UploadError` with an HTTP status and a one-line message: 400 for a malformed
request or archive (names that escape, links, encryption), 413 for anything too large or too
many, 415 for files that are not DICOM, NIfTI, PNG/JPG or zip (or not what the model reads).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MIB = 1 << 20

CT_KINDS = frozenset({"dicom", "nifti"})
PICTURE_KINDS = frozenset({"png", "jpeg"})

_UNSAFE_CHARACTERS = re.compile(r"[^\w.+()\- ]", re.UNICODE)
_MAX_NAME_LENGTH = 150
_MAX_DEPTH = 16
_COPY_CHUNK = 1 << 20
_IGNORED_ARCHIVE_FOLDERS = ("__MACOSX",)  # resource forks added by macOS' archiver


class UploadError(Exception):
    """An upload refused with an HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class UploadLimits:
    """What one request may bring.

    Attributes:
        total_bytes: the whole request body.
        file_bytes: one uploaded file, and one file unpacked from a zip.
        files: file parts in one request.
        unzipped_bytes: everything unpacked from the zips of one request.
        zip_members: files in the zips of one request.
    """

    total_bytes: int = 512 * MIB
    file_bytes: int = 512 * MIB
    files: int = 5000
    unzipped_bytes: int = 2048 * MIB
    zip_members: int = 5000

    @classmethod
    def from_megabytes(
        cls, max_upload_mb: float, max_file_mb: float | None = None, **others: int
    ) -> UploadLimits:
        """Limits from sizes in MiB (``max_file_mb`` defaults to ``max_upload_mb``).

        Args:
            max_upload_mb: the largest request body.
            max_file_mb: the largest single file, uploaded or unpacked.
            others: ``files``, ``unzipped_bytes``, ``zip_members`` to change.
        """
        if max_upload_mb <= 0 or (max_file_mb is not None and max_file_mb <= 0):
            raise ValueError("upload limits must be positive")
        total = int(max_upload_mb * MIB)
        per_file = int((max_file_mb if max_file_mb is not None else max_upload_mb) * MIB)
        return cls(total_bytes=total, file_bytes=per_file, **others)

    def describe(self) -> dict[str, float]:
        """The limits in MiB and counts, for the page and the API."""
        return {
            "max_upload_mb": round(self.total_bytes / MIB, 3),
            "max_file_mb": round(self.file_bytes / MIB, 3),
            "max_files": self.files,
            "max_unzipped_mb": round(self.unzipped_bytes / MIB, 3),
            "max_zip_members": self.zip_members,
        }


def _megabytes(size: int) -> str:
    return f"{size / MIB:.3g} MiB"


def safe_relative_path(name: str, what: str = "file name") -> PurePosixPath | None:
    """A client-chosen path made safe to create under a folder, or None when nothing is left.

    Folders are kept (a browser's folder upload and a zip keep their series apart), ``\\`` is
    read as a separator, each part keeps only word characters and ``.+()- `` and a leading dot
    becomes ``_`` (hidden files would be left out by the folder walker).

    Raises:
        UploadError: 400 for an absolute path, a drive letter or a ``..`` part, which would
            leave the upload folder.
    """
    text = name.replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise UploadError(400, f"{what} {name!r} is an absolute path outside the upload")
    parts = []
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise UploadError(400, f"{what} {name!r} escapes the upload folder (..)")
        clean = _UNSAFE_CHARACTERS.sub("_", part)[:_MAX_NAME_LENGTH]
        if clean.startswith("."):
            clean = "_" + clean[1:]
        parts.append(clean)
    if len(parts) > _MAX_DEPTH:
        raise UploadError(400, f"{what} {name!r} is nested more than {_MAX_DEPTH} folders deep")
    return PurePosixPath(*parts) if parts else None


def unique_path(root: Path, relative: PurePosixPath) -> Path:
    """``root / relative`` made unique with ``-2``, ``-3``, ... and checked to stay in ``root``."""
    target = root.joinpath(*relative.parts)
    stem_suffix = _split_suffix(target.name)
    number = 2
    while target.exists():
        target = target.with_name(f"{stem_suffix[0]}-{number}{stem_suffix[1]}")
        number += 1
    if not target.resolve().is_relative_to(root.resolve()):
        raise UploadError(400, f"file name {str(relative)!r} escapes the upload folder")
    return target


def _split_suffix(name: str) -> tuple[str, str]:
    lower = name.lower()
    for suffix in (".nii.gz", ".tar.gz"):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix) :]
    stem, dot, suffix = name.rpartition(".")
    return (stem, dot + suffix) if stem else (name, "")


def _disposition(headers: dict[str, str]) -> tuple[str, str | None]:
    """(field name, file name or None) of a part's Content-Disposition."""
    from python_multipart.multipart import parse_options_header

    _, options = parse_options_header(headers.get("content-disposition", ""))
    name = options.get(b"name", b"").decode("utf-8", "replace")
    filename = options.get(b"filename")
    return name, None if filename is None else filename.decode("utf-8", "replace")


class MultipartReceiver:
    """Writes the file parts of a ``multipart/form-data`` body into a folder as it streams in.

    Feed it the body chunk by chunk (:meth:`feed`), then call :meth:`finish`. Form fields
    without a file name are read and dropped.

    Args:
        content_type: the request's Content-Type header.
        folder: where the files go (created).
        limits: sizes and counts to enforce while the bytes arrive.

    Raises:
        UploadError: 415 when the body is not multipart/form-data, 400 when it is malformed,
            413 when a limit is exceeded.
    """

    def __init__(self, content_type: str | None, folder: Path, limits: UploadLimits) -> None:
        from python_multipart.multipart import MultipartParser, parse_options_header

        kind, options = parse_options_header(content_type or "")
        if kind != b"multipart/form-data":
            raise UploadError(415, "send the files as multipart/form-data (a form upload)")
        boundary = options.get(b"boundary")
        if not boundary:
            raise UploadError(400, "multipart/form-data without a boundary")
        self.folder = folder
        self.limits = limits
        self.files: list[Path] = []
        self._received = 0
        self._headers: dict[str, str] = {}
        self._field = b""
        self._value = b""
        self._handle = None
        self._written = 0
        self._name = ""
        self._finished = False
        folder.mkdir(parents=True, exist_ok=True)
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    def feed(self, chunk: bytes) -> None:
        """Parse the next piece of the body."""
        self._received += len(chunk)
        if self._received > self.limits.total_bytes:
            raise UploadError(
                413, f"upload larger than the limit of {_megabytes(self.limits.total_bytes)}"
            )
        from python_multipart.exceptions import MultipartParseError

        try:
            self._parser.write(chunk)
        except MultipartParseError as error:
            raise UploadError(400, f"malformed multipart body ({error})") from None

    def finish(self) -> list[Path]:
        """The files received, once the whole body has been fed.

        Raises:
            UploadError: 400 for a truncated body or one without any file.
        """
        self.close()
        if not self._finished:
            raise UploadError(400, "the multipart body ended before its closing boundary")
        if not self.files:
            raise UploadError(400, "no file in the upload")
        return self.files

    def close(self) -> None:
        """Close a file still open (after an error)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self._headers[name] = self._value.decode("utf-8", "replace").strip()
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, filename = _disposition(self._headers)
        if not filename:  # a plain form field, or a file input left empty
            return
        if len(self.files) >= self.limits.files:
            raise UploadError(413, f"more than {self.limits.files} files in one upload")
        relative = safe_relative_path(filename) or PurePosixPath("upload")
        target = unique_path(self.folder, relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(target, "xb")  # noqa: SIM115 - closed in _part_end or close()
        self._written = 0
        self._name = filename
        self.files.append(target)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._handle is None:
            return
        self._written += end - start
        if self._written > self.limits.file_bytes:
            raise UploadError(
                413,
                f"{self._name}: file larger than the limit of {_megabytes(self.limits.file_bytes)}",
            )
        self._handle.write(data[start:end])

    def _part_end(self) -> None:
        self.close()

    def _end(self) -> None:
        self._finished = True


def sniff_kind(path: Path) -> str:
    """What a file holds, from its first bytes: dicom, nifti, png, jpeg, zip or unknown.

    DICOM is a file with the ``DICM`` preamble, or one starting with a group-0008 tag (old
    dumps without preamble, which the DICOM reader also accepts). NIfTI (1 or 2, plain or
    gzipped) is recognised by its header size field and magic.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(544)
    except OSError:
        return "unknown"
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        return "zip"
    if head[128:132] == b"DICM" or head[:2] == b"\x08\x00":
        return "dicom"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as handle:
                head = handle.read(544)
        except (OSError, EOFError):
            return "unknown"
    if _is_nifti_header(head):
        return "nifti"
    return "unknown"


def _is_nifti_header(head: bytes) -> bool:
    if len(head) < 348:
        return False
    for order in ("little", "big"):
        size = int.from_bytes(head[:4], order)
        if size == 348 and head[344:347] in (b"n+1", b"ni1"):
            return True
        if size == 540 and head[4:7] in (b"n+2", b"ni2"):
            return True
    return False


def unpack_uploads(
    received: list[Path], received_root: Path, input_root: Path, limits: UploadLimits
) -> dict[Path, str]:
    """Move the received files into ``input_root``, unpacking each zip into a folder of its name.

    Zips inside zips are not opened. Every member of every archive is checked before anything
    is unpacked (see :func:`check_archive`).

    Args:
        received: files written by :class:`MultipartReceiver`.
        received_root: the folder they are in.
        input_root: where the model's input is assembled (created).
        limits: archive limits.

    Returns:
        Each file now under ``input_root`` with its kind (:func:`sniff_kind`).

    Raises:
        UploadError: a damaged, escaping or oversized archive.
    """
    input_root.mkdir(parents=True, exist_ok=True)
    kinds: dict[Path, str] = {}
    archives = [p for p in received if sniff_kind(p) == "zip"]
    budget = _ArchiveBudget(limits)
    plans = [(archive, check_archive(archive, budget)) for archive in archives]
    for path in received:
        if path in archives:
            continue
        relative = PurePosixPath(path.relative_to(received_root).as_posix())
        target = unique_path(input_root, relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        kinds[target] = sniff_kind(target)
    for archive, members in plans:
        relative = PurePosixPath(archive.relative_to(received_root).as_posix())
        folder = unique_path(input_root, relative)
        for target in _extract(archive, members, folder, limits):
            kinds[target] = sniff_kind(target)
        archive.unlink()
    return kinds


class _ArchiveBudget:
    """Members and bytes left for all the archives of one request."""

    def __init__(self, limits: UploadLimits) -> None:
        self.members = limits.zip_members
        self.bytes = limits.unzipped_bytes
        self.file_bytes = limits.file_bytes


def check_archive(
    archive: Path, budget: _ArchiveBudget
) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Vet every member of a zip before anything is unpacked.

    Returns:
        The regular-file members with their safe relative paths.

    Raises:
        UploadError: 400 for an unreadable or encrypted archive, a member whose name leaves
            the folder, or one that is a link or another special file; 413 for a member larger
            than the per-file limit, or when the members' count or declared size exceeds what
            is left of the request's budget.
    """
    name = archive.name
    try:
        with zipfile.ZipFile(archive) as handle:
            infos = handle.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as error:
        raise UploadError(400, f"{name}: not a readable zip archive ({error})") from None
    members = []
    for info in infos:
        if info.filename.split("/")[0] in _IGNORED_ARCHIVE_FOLDERS:
            continue
        relative = safe_relative_path(info.filename, what=f"{name}: member")
        if info.is_dir() or relative is None:
            continue
        # Unix archivers store the file type in the high bits; others leave them 0.
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind and kind != stat.S_IFREG:
            what = "a symbolic link" if kind == stat.S_IFLNK else "not a regular file"
            raise UploadError(400, f"{name}: member {info.filename!r} is {what}")
        if info.flag_bits & 0x1:
            raise UploadError(400, f"{name}: member {info.filename!r} is encrypted")
        if info.file_size > budget.file_bytes:
            raise UploadError(
                413,
                f"{name}: member {info.filename!r} unpacks to more than the per-file limit of "
                f"{_megabytes(budget.file_bytes)}",
            )
        budget.members -= 1
        budget.bytes -= info.file_size
        if budget.members < 0:
            raise UploadError(413, f"{name}: more files in the zip archives than allowed")
        if budget.bytes < 0:
            raise UploadError(413, f"{name}: the zip archives unpack to more than allowed")
        members.append((info, relative))
    return members


def _extract(
    archive: Path,
    members: list[tuple[zipfile.ZipInfo, PurePosixPath]],
    folder: Path,
    limits: UploadLimits,
) -> list[Path]:
    """Unpack vetted members, counting the bytes actually written (headers can lie)."""
    written: list[Path] = []
    with zipfile.ZipFile(archive) as handle:
        for info, relative in members:
            target = unique_path(folder, relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            size = 0
            try:
                with handle.open(info) as source, open(target, "xb") as sink:
                    while block := source.read(_COPY_CHUNK):
                        size += len(block)
                        if size > min(info.file_size, limits.file_bytes):
                            raise UploadError(
                                413,
                                f"{archive.name}: member {info.filename!r} unpacks to more "
                                f"than its declared size or the per-file limit",
                            )
                        sink.write(block)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as error:
                raise UploadError(
                    400, f"{archive.name}: member {info.filename!r} cannot be unpacked ({error})"
                ) from None
            written.append(target)
    return written


def check_kinds(kinds: dict[Path, str], source_kind: str, root: Path) -> None:
    """Refuse an upload of which the model can read nothing.

    Args:
        kinds: file -> kind from :func:`unpack_uploads`.
        source_kind: ``"hu"`` (the model reads CT) or ``"images"`` (windowed pictures).
        root: the upload folder (for the file names in messages).

    Raises:
        UploadError: 400 when there is no file at all; 415 when no file is of a kind the
            model reads, saying whether they are pictures for a CT model, CT for a picture
            model, or not medical images at all.
    """
    if not kinds:
        raise UploadError(400, "the upload holds no file (empty zip archive?)")
    wanted = CT_KINDS if source_kind == "hu" else PICTURE_KINDS
    if any(kind in wanted for kind in kinds.values()):
        return
    other = PICTURE_KINDS if source_kind == "hu" else CT_KINDS
    if any(kind in other for kind in kinds.values()):
        if source_kind == "hu":
            raise UploadError(
                415,
                "this model reads CT in Hounsfield units: upload DICOM or NIfTI, not PNG/JPG "
                "pictures",
            )
        raise UploadError(
            415, "this model was trained on windowed PNG/JPG pictures: upload pictures, not CT"
        )
    first = sorted(kinds)[0]
    count = len(kinds)
    others = f" (and {count - 1} other file(s))" if count > 1 else ""
    raise UploadError(
        415,
        f"{first.relative_to(root).as_posix()}{others}: not a DICOM, NIfTI, PNG/JPG or zip file",
    )


def remove_folder(folder: Path) -> None:
    """Delete a request folder and everything in it."""
    shutil.rmtree(folder, ignore_errors=True)
