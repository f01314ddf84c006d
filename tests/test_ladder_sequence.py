"""Rungs 05 and 06: packaged configs, rung 06 reusing rung 05's runs, and ``demo --full``."""

from __future__ import annotations

from pathlib import Path

import pytest

from ichseg.engine.ablation import FULL_LADDER, LADDER, resolve_rung, reuse_backbone


def test_packaged_rungs_05_and_06() -> None:
    four = resolve_rung("ablation/04_seresnet50_unet.yaml", profile="quick")
    five = resolve_rung("ablation/05_seresnet50_unet_2p5d.yaml", profile="quick")
    six = resolve_rung("ablation/06_seresnet50_unet_2p5d_sequence.yaml", profile="quick")
    assert five.data.context == 1 and five.data.in_channels == 9 and five.masking.enabled
    assert five.model_copy(update={"data": four.data, "name": four.name}) == four
    assert six.sequence.enabled and six.sequence.kind == "gru"
    assert len(LADDER) == 4 and FULL_LADDER[4:] == (
        "ablation/05_seresnet50_unet_2p5d.yaml",
        "ablation/06_seresnet50_unet_2p5d_sequence.yaml",
    )


def test_rung_06_reuses_rung_05_of_the_same_seed(tmp_path: Path) -> None:
    five = resolve_rung("ablation/05_seresnet50_unet_2p5d.yaml", profile="quick")
    six = resolve_rung("ablation/06_seresnet50_unet_2p5d_sequence.yaml", profile="quick")
    runs = [
        {
            "rung": five.name,
            "seed": s,
            "dir": tmp_path / f"seed{s}",
            "config": five.model_copy(update={"seed": s}),
        }
        for s in (0, 1)
    ]
    chosen = reuse_backbone(six.model_copy(update={"seed": 1}), runs)
    assert chosen.sequence.backbone_run == tmp_path / "seed1"
    # A seed without a rung 05 run, or a rung 05 of another config, is not reused.
    assert reuse_backbone(six.model_copy(update={"seed": 2}), runs).sequence.backbone_run is None
    other = [
        dict(
            r,
            config=r["config"].model_copy(
                update={"model": six.model.model_copy(update={"dropout": 0.1})}
            ),
        )
        for r in runs
    ]
    assert reuse_backbone(six.model_copy(update={"seed": 1}), other).sequence.backbone_run is None
    # An explicit backbone run is kept.
    given = six.model_copy(
        update={"sequence": six.sequence.model_copy(update={"backbone_run": Path("x")})}
    )
    assert reuse_backbone(given, runs).sequence.backbone_run == Path("x")


@pytest.mark.parametrize("full", [False, True])
def test_demo_full_adds_rungs_05_and_06(full: bool, tmp_path: Path, monkeypatch) -> None:
    import ichseg.engine.ablation as ablation
    import ichseg.phantom as phantom
    import ichseg.segmentation.training as training
    from ichseg.demo import run_demo

    seen = {}

    class Stop(Exception):
        pass

    def fake_ablation(configs, *args, **kwargs):
        seen["configs"] = configs
        raise Stop

    monkeypatch.setattr(phantom, "write_dataset", lambda *a, **k: None)
    monkeypatch.setattr(phantom, "generate_study", lambda *a, **k: None)
    monkeypatch.setattr(training, "train_segmenter", lambda *a, **k: tmp_path / "seg.pt")
    monkeypatch.setattr(ablation, "run_ablation", fake_ablation)
    with pytest.raises(Stop):
        run_demo(tmp_path, seeds=1, full=full, progress=False, echo=lambda line: None)
    assert seen["configs"] == (list(FULL_LADDER) if full else None)
