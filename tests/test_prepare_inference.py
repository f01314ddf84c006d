"""``prepare_for_inference``: the classifier's inference form, compiled or not."""

from __future__ import annotations

import numpy as np
import pytest

from ichseg.engine.predict import (
    compile_by_default,
    predict_probabilities,
    prepare_for_inference,
    uint8_batches,
)


def _model():
    import torch

    from ichseg.models import create_model

    torch.manual_seed(0)
    return create_model("resnet18", in_channels=3, num_classes=6)


def test_compiling_is_chosen_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ICHSEG_COMPILE", raising=False)
    assert compile_by_default() is False
    monkeypatch.setenv("ICHSEG_COMPILE", "1")
    assert compile_by_default() is True
    monkeypatch.setenv("ICHSEG_COMPILE", "0")
    assert compile_by_default() is False


def test_eager_form_is_channels_last_in_eval_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.delenv("ICHSEG_COMPILE", raising=False)
    model = _model().train()
    assert prepare_for_inference(model, torch.device("cpu")) is model
    assert not model.training and not hasattr(model, "compiled_forward")
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_compiled_inference_matches_eager_and_keeps_gradients() -> None:
    """Compiled calls (any batch up to the padded size) give the eager probabilities; calls
    with gradients, as Grad-CAM makes them, still run the eager module."""
    import torch

    device = torch.device("cpu")
    eager = prepare_for_inference(_model(), device, compile=False)
    compiled = prepare_for_inference(_model(), device, compile=True, batch_size=8)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (11, 3, 64, 64), dtype=np.uint8)
    for batch in (8, 3, 11):
        a = predict_probabilities(eager, uint8_batches(images, batch), device, False, "multilabel")
        b = predict_probabilities(
            compiled, uint8_batches(images, batch), device, False, "multilabel"
        )
        np.testing.assert_allclose(a, b, atol=2e-4)
    x = torch.from_numpy(images[:2]).float().div(255).requires_grad_(True)
    compiled(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_batches_larger_than_compiled_go_through_the_graph_in_pieces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`predict --compile --batch-size 32` with a graph compiled for 8 still uses the graph."""
    import torch

    seen: list[int] = []

    def fake_compile(function, **kwargs):
        def compiled(images):
            seen.append(images.shape[0])
            return function(images)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    device = torch.device("cpu")
    eager = prepare_for_inference(_model(), device, compile=False)
    compiled = prepare_for_inference(_model(), device, compile=True, batch_size=4)
    images = np.random.default_rng(1).integers(0, 256, (10, 3, 32, 32), dtype=np.uint8)
    a = predict_probabilities(eager, uint8_batches(images, 10), device, False, "multilabel")
    b = predict_probabilities(compiled, uint8_batches(images, 10), device, False, "multilabel")
    assert seen == [4, 4, 4]  # 4 + 4 + 2 padded to 4
    np.testing.assert_allclose(a, b, atol=1e-5)
