"""Ensembles of runs (seeds, folds): averaged calibrated probabilities and their spread."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.config import RunConfig
from ichseg.engine.checkpoint import Thresholds
from ichseg.engine.predict import ForwardTimer, TestTimeAugmentation
from ichseg.errors import InputError
from ichseg.inference.models import (
    ModelFiles,
    Predictor,
    VolumePrediction,
    load_predictor,
    predict_volume,
)
from ichseg.volume import CTVolume


def _mean_thresholds(members: list[Predictor], level: str) -> dict[str, float]:
    """Per class, the mean of the members' finite thresholds. A member without one (one label
    value on its validation split: "never positive") is left out of that class's mean; with
    none finite the class stays never positive."""
    out = {}
    for name in members[0].class_names:
        values = [getattr(m.thresholds, level)[name] for m in members]
        finite = [v for v in values if np.isfinite(v)]
        out[name] = float(np.mean(finite)) if finite else float("inf")
    return out


@dataclass
class EnsemblePredictor:
    """Several models predicting the same classes, served as one.

    Slice probabilities are the mean of the members' calibrated slice probabilities; the series
    probability is the mean of the members' series probabilities (each aggregated by the shared
    rule from its own calibrated slices), and ``sd_<class>`` is their sample standard deviation
    over the members: an uncertainty per series. Thresholds are the mean of the members' own
    validation thresholds (on calibrated probabilities), not chosen on the ensemble's validation
    output. Grad-CAM, the written mask and the model input shown come from the first member.

    Attributes:
        members: the loaded models, in the order given.
        thresholds: averaged slice and series thresholds.
    """

    members: list[Predictor]
    thresholds: Thresholds

    @property
    def config(self) -> RunConfig:
        return self.members[0].config

    @property
    def class_names(self) -> list[str]:
        return self.members[0].class_names

    @property
    def model(self) -> Any:
        return self.members[0].model

    @property
    def device(self) -> Any:
        return self.members[0].device

    @property
    def preprocessor(self) -> Any:
        return self.members[0].preprocessor

    @property
    def output_masker(self) -> Any:
        return self.members[0].output_masker

    @property
    def hemorrhage(self) -> Any:
        return self.members[0].hemorrhage

    @property
    def files(self) -> ModelFiles | None:
        return self.members[0].files

    @property
    def tta(self) -> TestTimeAugmentation | None:
        return self.members[0].tta

    @property
    def timer(self) -> ForwardTimer:
        total = ForwardTimer()
        for member in self.members:
            total.plain_s += member.timer.plain_s
            total.extra_s += member.timer.extra_s
            total.views = max(total.views, member.timer.views)
        return total

    @timer.setter
    def timer(self, value: ForwardTimer) -> None:
        for member in self.members:
            member.timer = ForwardTimer(views=value.views)

    def score_volume(self, volume: CTVolume, batch_size: int | None = None) -> VolumePrediction:
        """Every member on the volume (input prepared once per preprocessing), averaged."""
        shared: dict = {}
        first = None
        probabilities = []
        for member in self.members:
            prediction = predict_volume(member, volume, batch_size, shared)
            first = first or prediction
            probabilities.append(member.calibrate(prediction.probabilities))
        stacked = np.stack(probabilities)
        return VolumePrediction(
            stacked.mean(axis=0), first.scored, first.mask, first.images, members=stacked
        )

    def score_images(
        self, images: np.ndarray, batch_size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean calibrated probabilities of pictures and their standard deviation over members."""
        stacked = np.stack([m.score_images(images, batch_size)[0] for m in self.members])
        return stacked.mean(axis=0), stacked.std(axis=0, ddof=1)

    def series_summary(self, prediction: VolumePrediction) -> tuple[np.ndarray, dict[str, Any]]:
        """Mean of the members' series probabilities and their sample standard deviation."""
        from ichseg.metrics.series import aggregate_probabilities

        per_member = np.stack(
            [
                aggregate_probabilities(p[prediction.scored], self.thresholds.aggregation)
                for p in prediction.members
            ]
        )
        spread = per_member.std(axis=0, ddof=1)
        columns = {
            f"sd_{n}": round(float(v), 6) for n, v in zip(self.class_names, spread, strict=True)
        }
        return per_member.mean(axis=0), {"members": len(self.members), **columns}

    def rules(self) -> dict[str, Any]:
        """How the members are combined, for ``predict_info.json``."""
        return {
            "members": len(self.members),
            "slice_probability": "mean of the members' calibrated slice probabilities",
            "series_probability": (
                f"mean of the members' series probabilities ({self.thresholds.aggregation} "
                "over each member's calibrated slices)"
            ),
            "uncertainty": "sd_<class>: sample standard deviation of the members' series "
            "probabilities",
            "thresholds": "mean of the members' validation thresholds (not chosen on the "
            "ensemble's own validation output)",
            "gradcam": "first member",
        }


def _slice_filter(member: Predictor) -> float:
    return float(member.preprocessor.describe().get("min_brain_fraction") or 0.0)


def make_ensemble(members: list[Predictor]) -> EnsemblePredictor:
    """Check that the members predict the same thing and combine them.

    Raises:
        InputError: a member with other class names, task, input kind, series rule or slice
            filter.
    """
    first = members[0]
    for member in members[1:]:
        for what, mine, theirs in (
            ("class names", member.class_names, first.class_names),
            ("task", member.config.task.mode, first.config.task.mode),
            ("input kind", member.preprocessor.source_kind, first.preprocessor.source_kind),
            ("series aggregation", member.thresholds.aggregation, first.thresholds.aggregation),
            # Members score the slices their filter keeps: with two filters a slice would be
            # averaged over some members only and a series maximum could be NaN.
            ("slice filter (min_brain_fraction)", _slice_filter(member), _slice_filter(first)),
        ):
            if mine != theirs:
                raise InputError(
                    member.source,
                    f"cannot join the ensemble: its {what} {mine} differ from those of "
                    f"{first.source} ({theirs}); all members must predict the same classes "
                    "the same way",
                )
    thresholds = Thresholds(
        _mean_thresholds(members, "slice"),
        _mean_thresholds(members, "series"),
        first.thresholds.aggregation,
        first.thresholds.rule,
        "+".join(sorted({m.thresholds.calibration for m in members})),
    )
    return EnsemblePredictor(members, thresholds)


def load_models(
    model_paths: list[str | Path],
    segmenter: str | Path | None = None,
    device: str | None = None,
    tta: TestTimeAugmentation | None = None,
    hemorrhage_segmenter: str | Path | None = None,
) -> Predictor | EnsemblePredictor:
    """One model, or several as an :class:`EnsemblePredictor`.

    Args:
        model_paths: run folders and/or bundles (at least one).
        segmenter: a U-Net checkpoint to use instead of each model's own.
        device: "cpu" or "cuda".
        tta: test-time augmentation for every member.
        hemorrhage_segmenter: a hemorrhage U-Net instead of the one the (first) model carries;
            an ensemble's label maps and volumes come from its first member.

    Raises:
        InputError: no model, a bad model, or members that do not match.
    """
    if not model_paths:
        raise InputError(None, "no model given")
    members = [
        load_predictor(p, segmenter, device, tta, hemorrhage_segmenter if i == 0 else None)
        for i, p in enumerate(model_paths)
    ]
    return members[0] if len(members) == 1 else make_ensemble(members)
