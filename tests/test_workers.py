"""Reader worker processes: what they inherit from the caller, and that they end with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ichseg.io import workers as workers_module


def _environment_and_path(name: str) -> tuple[str | None, bool, str]:
    return os.environ.get(name), "/ichseg-test-path" in sys.path, os.environ["OMP_NUM_THREADS"]


def test_each_pool_gets_the_callers_current_environment_and_path(monkeypatch) -> None:
    # A first pool starts the fork server (where there is one) with today's environment...
    assert list(workers_module.ordered_map(abs, [-1, -2], 2)) == [1, 2]
    # ...so what the caller sets afterwards must still reach a later pool's workers.
    monkeypatch.setenv("ICHSEG_TEST_SETTING", "later")
    monkeypatch.syspath_prepend("/ichseg-test-path")
    results = list(
        workers_module.ordered_map(_environment_and_path, ["ICHSEG_TEST_SETTING"] * 2, 2)
    )
    assert results == [("later", True, "1")] * 2


_CHILD = """
import os, sys, time
from pathlib import Path
from ichseg.io.workers import ordered_map

def record_and_wait(item):
    Path(sys.argv[1], f"{os.getpid()}.pid").write_text(str(item))
    time.sleep(600)
    return item

if __name__ == "__main__":
    list(ordered_map(record_and_wait, range(2), 2))
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent has not collected it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal")
def test_workers_end_when_the_calling_process_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_CHILD))
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=os.environ.copy())
    deadline = time.monotonic() + 120
    pids: list[int] = []
    try:
        while time.monotonic() < deadline and len(pids) < 2 and child.poll() is None:
            pids = [int(p.stem) for p in tmp_path.glob("*.pid")]
            time.sleep(0.05)
        assert len(pids) == 2, "the workers never started"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.1)
    assert not [pid for pid in pids if _running(pid)], "workers outlived the killed caller"
