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


def _environment(name: str) -> tuple[str | None, str]:
    return os.environ.get(name), os.environ["OMP_NUM_THREADS"]


def test_each_pool_gets_the_callers_current_environment(monkeypatch) -> None:
    # A first pool starts the fork server (where there is one) with today's environment...
    assert list(workers_module.ordered_map(abs, [-1, -2], 2)) == [1, 2]
    # ...so what the caller sets afterwards must still reach a later pool's workers.
    monkeypatch.setenv("ICHSEG_TEST_SETTING", "later")
    results = list(workers_module.ordered_map(_environment, ["ICHSEG_TEST_SETTING"] * 2, 2))
    assert results == [("later", "1")] * 2


def _square_unless_three_in_a_worker(value: int) -> int:
    if value == 3 and os.environ.get("ICHSEG_TEST_PARENT") != str(os.getpid()):
        os._exit(1)  # a worker killed mid-task
    return value * value


def test_a_pool_that_breaks_while_items_are_submitted_loses_none(monkeypatch) -> None:
    # A consumer that takes its time is back in the submitting loop when the break is noticed:
    # submit() then fails for an item already taken from the input, which must still count.
    monkeypatch.setenv("ICHSEG_TEST_PARENT", str(os.getpid()))
    items = list(range(20))
    results = []
    for value in workers_module.ordered_map(_square_unless_three_in_a_worker, items, 2):
        results.append(value)
        time.sleep(0.05)
    assert results == [i * i for i in items]


def _parent_pid(_: int) -> int:
    return os.getppid()


def _parent_and_preloaded(_: int) -> tuple[int, bool]:
    # Nothing this test module imports loads pydicom: only the fork server's preload does.
    return os.getppid(), "pydicom" in sys.modules


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux's")
def test_workers_fork_from_a_server_that_imported_the_readers() -> None:
    results = list(workers_module.ordered_map(_parent_and_preloaded, [0, 1], 2))
    assert all(parent != os.getpid() and preloaded for parent, preloaded in results)


def test_workers_are_spawned_when_the_fork_server_cannot_start(monkeypatch) -> None:
    from multiprocessing import forkserver

    def cannot_start() -> None:
        raise OSError("AF_UNIX path too long")

    monkeypatch.setattr(forkserver, "ensure_running", cannot_start)
    assert list(workers_module.ordered_map(_parent_pid, [0, 1], 2)) == [os.getpid()] * 2


def _build_in_a_child(count: int) -> None:
    assert list(workers_module.ordered_map(abs, range(-count, 0), 2)) == list(range(count, 0, -1))


def test_a_process_that_maps_and_exits_at_once_does_not_hang() -> None:
    # The caller's own pool worker, say: it exits right after the readers' pool is done.
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=_build_in_a_child, args=(8,)) for _ in range(4)]
    for child in children:
        child.start()
    try:
        deadline = time.monotonic() + 60  # each takes a few seconds
        for child in children:
            child.join(timeout=max(0.0, deadline - time.monotonic()))
        assert [child.exitcode for child in children] == [0] * 4
    finally:
        for child in children:
            if child.is_alive():
                child.kill()


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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tested where workers fork")
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
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_running(pid) for pid in pids):
            time.sleep(0.1)
        assert not [pid for pid in pids if _running(pid)], "workers outlived the killed caller"
    finally:
        for pid in pids:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
