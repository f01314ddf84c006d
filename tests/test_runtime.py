"""Process-wide settings: glibc keeps freed memory for reuse when ichseg asks it to."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ichseg.runtime import keep_freed_memory

HEAP_AFTER_FREE = """
import ctypes, sys
import numpy as np
from ichseg.runtime import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = libc.mallinfo2().arena
arrays = [np.ones(2**20 // 8) for _ in range(8)]  # 8 arrays of 1 MiB
del arrays
print(libc.mallinfo2().arena - before)
"""


def _heap_growth_after_free(mode: str) -> int:
    # glibc's own memory settings from the environment would change what is measured.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MALLOC_", "GLIBC_TUNABLES", "ICHSEG_KEEP_FREED_MEMORY"))
    }
    result = subprocess.run(
        [sys.executable, "-c", HEAP_AFTER_FREE, mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=env,
    )
    return int(result.stdout.strip())


def _has_mallinfo2() -> bool:
    import ctypes

    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")
    except (OSError, TypeError):
        return False


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _has_mallinfo2(),
    reason="glibc 2.33 or later only (mallinfo2)",
)
def test_freed_arrays_stay_in_the_heap_for_reuse():
    default = _heap_growth_after_free("default")
    # By default 1 MiB arrays get their own mappings, returned to the OS when freed; kept, they
    # come from the heap and stay there after they are freed, ready for the next step.
    assert default < 2**20
    assert _heap_growth_after_free("keep") >= 4 * 2**20


@pytest.mark.parametrize("value", ["0", "false", "Off"])
def test_keeping_freed_memory_can_be_turned_off(value):
    assert keep_freed_memory({"ICHSEG_KEEP_FREED_MEMORY": value}) is False


def test_every_command_keeps_freed_memory(monkeypatch, tmp_path):
    import ichseg.runtime
    from ichseg.cli import app

    calls = []
    monkeypatch.setattr(ichseg.runtime, "keep_freed_memory", lambda: calls.append(1) or True)
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "missing")])
    assert result.exit_code != 0
    assert calls == [1]
