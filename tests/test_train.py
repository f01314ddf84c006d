"""Training: resume after SIGKILL, torchrun DDP on CPU, config and data errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from ichseg.cli import app
from ichseg.engine.checkpoint import load_checkpoint
from ichseg.engine.loop import state_digest

TINY = {
    "name": "tiny",
    "data": {"phantom": {"studies": 8, "size": 64, "slices": 6}, "image_size": 64},
    "model": {"name": "resnet18"},
    "train": {"epochs": 3, "batch_size": 8, "early_stopping_patience": None},
    "eval": {"n_boot": 20},
}


def _write_config(tmp_path: Path, **changes) -> Path:
    config = json.loads(json.dumps(TINY))
    config["data"]["cache_dir"] = str(tmp_path / "cache")
    for key, value in changes.items():
        section, field = key.split("__")
        config[section][field] = value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _train_cmd(run: Path, config: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ichseg",
        "train",
        str(run),
        "--config",
        str(config),
        "--quiet",
        *extra,
    ]


def _last_epoch(run: Path) -> int:
    try:
        return int(load_checkpoint(run / "last.pt")["epoch"])
    except Exception:
        return -1


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path):
    config = _write_config(tmp_path)
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(full, config), check=True, env=_env(), capture_output=True)

    process = subprocess.Popen(
        _train_cmd(killed, config), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while _last_epoch(killed) < 0 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "training ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert _last_epoch(killed) < 2, "the kill came after the last epoch"
    assert not (killed / "eval").exists()

    subprocess.run(
        _train_cmd(killed, config, "--resume"), check=True, env=_env(), capture_output=True
    )
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(killed / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert state_digest(a["state_dict"]) == state_digest(b["state_dict"])
    metrics_a = json.loads((full / "eval" / "test" / "metrics.json").read_text())
    metrics_b = json.loads((killed / "eval" / "test" / "metrics.json").read_text())
    for key in ("auroc_any", "macro_auroc", "weighted_log_loss"):
        assert metrics_a[key] == pytest.approx(metrics_b[key], rel=1e-6, abs=1e-9)
    history_a = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    history_b = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [h["val_loss"] for h in history_a] == pytest.approx([h["val_loss"] for h in history_b])


def test_torchrun_ddp_two_processes_on_cpu(tmp_path: Path):
    config = _write_config(tmp_path, train__epochs=1)
    run = tmp_path / "ddp_run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "ichseg",
        "train",
        str(run),
        "--config",
        str(config),
        "--quiet",
    ]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = [json.loads((run / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    shard0, shard1 = set(ranks[0]["train_indices"]), set(ranks[1]["train_indices"])
    assert shard0 and shard1
    # DistributedSampler pads the shorter shard by repeating at most one sample.
    assert len(shard0 & shard1) <= 1
    checkpoint = load_checkpoint(run / "last.pt")
    assert (
        state_digest(checkpoint["state_dict"]) == ranks[0]["state_sha1"] == ranks[1]["state_sha1"]
    )
    assert (run / "eval" / "test" / "metrics.json").exists()


def test_misspelt_config_key_fails_at_load(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {nmae: vgg16}\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "run"), "--config", str(path)])
    assert result.exit_code == 2
    assert "unknown key 'model.nmae'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_data_folder_without_usable_slices_fails_with_one_line(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("not a scan")
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "ID,Label\nID_abc_any,0\nID_abc_epidural,0\nID_abc_intraparenchymal,0\n"
        "ID_abc_intraventricular,0\nID_abc_subarachnoid,0\nID_abc_subdural,0\n"
    )
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "source": "dicom",
                    "root": str(data),
                    "labels": str(labels),
                    "cache_dir": str(tmp_path / "cache"),
                },
            }
        )
    )
    result = CliRunner().invoke(
        app, ["train", str(tmp_path / "run"), "--config", str(config), "--quiet"]
    )
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and str(data) in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_best_checkpoint_loads_with_weights_only(tmp_path: Path):
    from ichseg.config import load_config
    from ichseg.engine.checkpoint import build_model
    from ichseg.engine.train import train

    config = load_config(_write_config(tmp_path, train__epochs=1))
    result = train(config, tmp_path / "run", progress=False)
    state = torch.load(result.best_checkpoint, weights_only=True)
    model = build_model(config)
    model.load_state_dict(state["state_dict"])
    assert (tmp_path / "run" / "config.yaml").exists()
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["test"])
    assert result.test_metrics is not None and "auroc_any" in result.test_metrics


@pytest.mark.parametrize("bf16_pays", [True, False])
def test_history_and_metrics_record_the_precision_that_ran(
    tmp_path: Path, monkeypatch, bf16_pays: bool
):
    """The same checkpoint scores slightly differently in bf16 and fp32: each run says which."""
    from ichseg.config import load_config
    from ichseg.engine import predict
    from ichseg.engine.train import train

    monkeypatch.setattr(predict, "_bf16_autocast_pays", lambda device_type: bf16_pays)
    config = load_config(_write_config(tmp_path, train__epochs=1))
    result = train(config, tmp_path / "run", progress=False)
    expected = "bf16" if bf16_pays else "fp32"
    assert [row["compute_precision"] for row in result.history] == [expected]
    metrics = json.loads((tmp_path / "run" / "eval" / "test" / "metrics.json").read_text())
    assert metrics["compute_precision"] == expected


def test_progress_output_never_changes_the_batch_order(monkeypatch):
    """Where progress goes (terminal, log, nowhere) must not draw from the shuffle stream."""
    from torch.utils.data import DataLoader

    from ichseg import progress as module

    def first_batches(wrap) -> list[list[int]]:
        generator = torch.Generator().manual_seed(3)
        loader = DataLoader(list(range(20)), batch_size=5, shuffle=True, generator=generator)
        return [[batch.tolist() for batch in wrap(loader)] for _ in range(2)]

    plain = first_batches(lambda loader: loader)
    assert first_batches(lambda loader: module.progress(loader, enabled=False)) == plain
    monkeypatch.setattr(module, "_on_terminal", lambda: False)
    assert first_batches(lambda loader: module.progress(loader)) == plain
    monkeypatch.setattr(module, "_on_terminal", lambda: True)
    assert first_batches(lambda loader: module.progress(loader)) == plain


def test_every_training_family_implements_the_whole_task_protocol() -> None:
    """A family missing a protocol method fails only when the loop first calls it (a sequence
    run lacked ``canonical_config`` until someone resumed one)."""
    from ichseg.engine.loop import TrainTask
    from ichseg.engine.sequence import SequenceTask
    from ichseg.engine.train import ClassifierTask
    from ichseg.segmentation.training import SegmenterTask

    required = [
        name
        for name, value in vars(TrainTask).items()
        if callable(value) and not name.startswith("_")
    ]
    assert "canonical_config" in required
    for family in (ClassifierTask, SequenceTask, SegmenterTask):
        missing = [name for name in required if not callable(getattr(family, name, None))]
        assert not missing, f"{family.__name__} lacks {missing}"
