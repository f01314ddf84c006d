"""CUDA paths: a bf16 training step of every classifier, inference against the CPU's, the
trainer and ``predict`` on a GPU.

Marked ``gpu``: deselected by the default run (``pytest -m gpu`` selects them) and skipped where
no CUDA device is present, as on CI.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ichseg.models import list_models

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.mark.parametrize("name", list_models())
def test_every_model_takes_a_bf16_training_step_on_cuda(name: str) -> None:
    from torch.nn.functional import binary_cross_entropy_with_logits

    from ichseg.engine.predict import autocast, precision_used
    from ichseg.models import create_model

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = create_model(name, in_channels=3, num_classes=6)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.rand(4, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(4, 6, device=device) > 0.5).float()
    before = [p.detach().clone() for p in model.parameters()]

    with autocast(device, True):
        features = model.forward_features(images)
        logits = model(images)
    loss = binary_cross_entropy_with_logits(logits, targets)
    loss.backward()
    optimizer.step()

    if torch.cuda.is_bf16_supported(including_emulation=False):
        assert features.dtype == torch.bfloat16 and precision_used(device, True) == "bf16"
    assert logits.dtype == torch.float32  # the head runs outside autocast, by design
    assert torch.isfinite(loss)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_cuda_probabilities_agree_with_the_cpu(trained_run: Path) -> None:
    from ichseg.inference.models import load_predictor

    on_cpu = load_predictor(trained_run, device="cpu")
    on_cuda = load_predictor(trained_run, device="cuda")
    assert on_cuda.device.type == "cuda" and on_cuda.default_batch() == 32
    images = np.random.default_rng(0).integers(0, 256, (24, 3, 64, 64), dtype=np.uint8)

    expected = on_cpu.probabilities(images)
    found = on_cuda.probabilities(images)

    assert found.shape == expected.shape == (24, len(on_cpu.class_names))
    # bf16 on the GPU against bf16 or fp32 on the CPU: the same model to bf16's precision.
    np.testing.assert_allclose(found, expected, atol=0.03)


def test_trainer_and_predict_run_on_cuda(
    phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from conftest import TINY_CONFIG

    from ichseg.config import load_config
    from ichseg.engine.train import train
    from ichseg.inference.folder import predict

    base = tmp_path_factory.mktemp("cuda_run")
    data = TINY_CONFIG["data"] | {"cache_dir": str(base / "cache")}
    run_dir = base / "run"
    allocations = _cuda_allocations()
    train(load_config(extra=TINY_CONFIG | {"data": data}), run_dir, progress=False)
    assert _cuda_allocations() > allocations, "the trainer did not use the GPU"
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs and all(np.isfinite(epoch["train_loss"]) for epoch in epochs)
    if torch.cuda.is_bf16_supported(including_emulation=False):
        assert all(epoch["compute_precision"] == "bf16" for epoch in epochs)

    allocations = _cuda_allocations()
    predict(run_dir, phantom_dir / "dicom", base / "out", gradcam=False, progress=False)
    assert _cuda_allocations() > allocations, "predict did not use the GPU"

    with (base / "out" / "series.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert len(rows) == 2
    assert all(0.0 <= float(row["any"]) <= 1.0 for row in rows)


def _cuda_allocations() -> int:
    """Memory blocks allocated on the GPU since the process started (a count that only grows,
    unlike the peak, which other tests' live tensors can hold up)."""
    return int(torch.cuda.memory_stats().get("allocation.all.allocated", 0))
