"""``ichseg serve``: a web page and JSON API to upload a CT and see the model's findings.

:func:`create_app` builds the FastAPI application for one model; :func:`open_socket` and
:func:`run_app` serve it with uvicorn. See :mod:`ichseg.serve.app` for the API and
:mod:`ichseg.serve.uploads` for how uploads are received and vetted.
"""

from ichseg.serve.app import create_app, open_socket, run_app, socket_url
from ichseg.serve.uploads import UploadError, UploadLimits

__all__ = ["UploadError", "UploadLimits", "create_app", "open_socket", "run_app", "socket_url"]
