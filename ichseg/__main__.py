"""``python -m ichseg`` (also what torchrun runs with ``-m ichseg``)."""

from ichseg.cli import app

app()
