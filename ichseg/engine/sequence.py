"""The sequence family: a series-level head over cached slice embeddings, for the one loop.

A sequence run folder holds its backbone and its head::

    <run>/backbone/best.pt    the classifier whose pooled features are the embeddings (trained
                              there from the run's config with the sequence disabled, or copied
                              from ``sequence.backbone_run``)
    <run>/best.pt, last.pt    the sequence head (checkpoint kind ``"sequence"``; its config
                              records the backbone's SHA-1 and embedding width)
    <run>/splits.json         the backbone's split: the head trains, validates and tests on
                              exactly the backbone's patients

The series of a split are its slices grouped by series and ordered by ``slice_index`` (their
position in the volume), as ``predict`` orders a volume's slices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ichseg.config import RunConfig, SequenceConfig
from ichseg.engine.cache import SliceSet
from ichseg.engine.checkpoint import (
    BACKBONE_DIR,
    BEST,
    config_of,
    load_checkpoint,
    load_classifier,
    load_weights,
)
from ichseg.engine.embeddings import EmbeddingTable, embed_slices
from ichseg.engine.loop import LoopSettings, config_differences, epoch_seed
from ichseg.engine.losses import TaskLoss
from ichseg.engine.predict import ForwardTimer, TestTimeAugmentation, default_device
from ichseg.errors import InputError

SEQUENCE_KIND = "sequence"
IGNORED_FOR_BACKBONE = ("name", "eval", "sequence")
"""Config sections that do not change a backbone's weights: a backbone run may differ in them."""


def backbone_config(config: RunConfig) -> RunConfig:
    """The classifier config a sequence config embeds with: the same, sequence disabled."""
    return config.model_copy(update={"sequence": SequenceConfig()}, deep=True)


def backbone_differences(candidate: RunConfig, config: RunConfig) -> list[str]:
    """How a classifier run's config differs from the backbone ``config`` asks for.

    Args:
        candidate: the classifier run's config.
        config: the sequence run's config.
    """
    a, b = candidate.model_dump(mode="json"), config.model_dump(mode="json")
    for key in IGNORED_FOR_BACKBONE:
        a.pop(key, None)
        b.pop(key, None)
    return config_differences(a, b)


def is_sequence_run(run_dir: str | Path) -> bool:
    """Whether a run folder holds a sequence head over a backbone (not a plain classifier)."""
    return (Path(run_dir) / BACKBONE_DIR / BEST).is_file()


def series_sequences(slices: SliceSet, rows: np.ndarray) -> list[np.ndarray]:
    """Rows grouped by series, each series ordered by slice position (``slice_index``)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return []
    order = np.lexsort((slices.slice_index[rows], slices.series[rows]))
    ordered = rows[order]
    ids = slices.series[ordered]
    return np.split(ordered, np.flatnonzero(ids[1:] != ids[:-1]) + 1)


def build_sequence_head(config: RunConfig, num_features: int):
    """The :class:`~ichseg.models.sequence.SequenceHead` a config describes."""
    from ichseg.models.sequence import SequenceHead

    seq = config.sequence
    return SequenceHead(
        num_features,
        config.task.num_outputs,
        kind=seq.kind,
        hidden=seq.hidden,
        layers=seq.layers,
        dropout=seq.dropout,
        kernel_size=seq.kernel_size,
    )


def sequence_settings(config: RunConfig) -> LoopSettings:
    """Loop settings of the head: its own epochs, rate and patience; fp32 (the head is small)."""
    seq = config.sequence
    return LoopSettings(
        epochs=seq.epochs,
        lr=seq.lr,
        weight_decay=config.train.weight_decay,
        optimizer="adamw",
        scheduler="cosine",
        warmup_epochs=0,
        amp=False,
        grad_clip=1.0,
        patience=seq.early_stopping_patience,
        monitor="val_loss",
        mode="min",
        seed=config.seed,
    )


def _padded(features: list[np.ndarray], device: Any):
    """``(B, L, F)`` zero-padded float tensor and ``(B,)`` lengths of variable-length series."""
    import torch

    lengths = [len(f) for f in features]
    batch = np.zeros((len(features), max(lengths), features[0].shape[1]), dtype=np.float32)
    for i, f in enumerate(features):
        batch[i, : len(f)] = f
    return torch.from_numpy(batch).to(device), torch.as_tensor(lengths, dtype=torch.long)


def series_logits(
    head: Any, features: list[np.ndarray], device: Any, batch_size: int = 16
) -> list[Any]:
    """Logits ``(L_i, K)`` (fp32 tensors on ``device``) of each series' embeddings ``(L_i, F)``."""
    out = []
    for start in range(0, len(features), batch_size):
        chunk = features[start : start + batch_size]
        batch, lengths = _padded(chunk, device)
        logits = head(batch, lengths)
        out += [logits[i, : len(f)] for i, f in enumerate(chunk)]
    return out


def series_probabilities(
    head: Any, features: list[np.ndarray], mode: str, device: Any, batch_size: int = 16
) -> list[np.ndarray]:
    """Probabilities ``(L_i, K)`` float32 of each series' embeddings, in eval mode."""
    import torch

    from ichseg.engine.predict import probabilities

    head.eval()
    with torch.inference_mode():
        logits = series_logits(head, features, device, batch_size)
        return [probabilities(x, mode).cpu().numpy().astype(np.float32) for x in logits]


class SequenceTask:
    """The sequence family for :func:`ichseg.engine.loop.fit`: batches are whole series."""

    kind = SEQUENCE_KIND

    def __init__(
        self,
        config: RunConfig,
        slices: SliceSet,
        splits: dict[str, np.ndarray],
        table: EmbeddingTable,
        backbone_sha1: str,
    ) -> None:
        self.config = config
        self.name = config.name
        self.table = table
        self.backbone_sha1 = backbone_sha1
        self.targets = slices.targets(config.task)
        self.loss_fn = TaskLoss(config)
        self.train_series = series_sequences(slices, splits["train"])
        self.val_series = series_sequences(slices, splits["val"])
        self.batch_size = config.sequence.batch_size
        self.rng = np.random.default_rng(config.seed)

    def build_model(self):
        return build_sequence_head(self.config, self.table.num_features)

    def config_dict(self) -> dict[str, Any]:
        return {
            "run": self.config.model_dump(mode="json"),
            "backbone_sha1": self.backbone_sha1,
            "num_features": self.table.num_features,
        }

    def canonical_config(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A stored :meth:`config_dict` with its run config validated by today's code."""
        from ichseg.config import validate_config

        run = saved.get("run")
        canonical = dict(saved)
        if isinstance(run, dict):
            canonical["run"] = validate_config(run, "checkpoint").model_dump(mode="json")
        return canonical

    def start_epoch(self, epoch: int) -> None:
        self.rng = np.random.default_rng(epoch_seed(self.config.seed, epoch))

    def num_batches(self) -> int:
        return math.ceil(len(self.train_series) / self.batch_size)

    def train_batches(self):
        order = self.rng.permutation(len(self.train_series))
        for start in range(0, len(order), self.batch_size):
            yield [self.train_series[i] for i in order[start : start + self.batch_size]]

    def _targets(self, sequences: list[np.ndarray], device: Any):
        import torch

        return torch.as_tensor(self.targets[np.concatenate(sequences)]).to(device)

    def loss(self, model, batch, device):
        import torch

        features = [self.table.lookup(rows) for rows in batch]
        logits = torch.cat(series_logits(model, features, device, len(batch)))
        return self.loss_fn(logits, self._targets(batch, device)), int(len(logits))

    def validate(self, model, device) -> dict[str, float]:
        import torch

        from ichseg.engine.predict import probabilities
        from ichseg.metrics import auroc

        model.eval()
        with torch.inference_mode():
            features = [self.table.lookup(rows) for rows in self.val_series]
            logits = torch.cat(series_logits(model, features, device))
            targets = self._targets(self.val_series, device)
            loss = float(self.loss_fn(logits, targets))
            prob = probabilities(logits, self.config.task.mode).cpu().numpy()
        truth = self.targets[np.concatenate(self.val_series)]
        if self.config.task.mode == "multilabel":
            score = auroc(truth[:, 0], prob[:, 0])[0]
        else:
            score = auroc((truth > 0).astype(np.float64), 1.0 - prob[:, 0])[0]
        return {"val_loss": loss, "val_auroc": float(score)}


def load_sequence_head(path: str | Path) -> tuple[RunConfig, Any, dict[str, Any]]:
    """Config, head with its trained weights, and the record (backbone SHA-1, width) of a head.

    Raises:
        InputError: a missing, damaged or foreign checkpoint; one line naming the file.
    """
    path = Path(path)
    state = load_checkpoint(path, kind="sequence head")
    if state.get("kind") != SEQUENCE_KIND:
        raise InputError(
            path, f"not a sequence head checkpoint (it holds a {state.get('kind')} model)"
        )
    record = state["config"]
    if not isinstance(record, dict) or not {"run", "backbone_sha1", "num_features"} <= set(record):
        raise InputError(path, "not a sequence head checkpoint (no backbone record)")
    config = config_of({"config": record["run"]}, path)
    head = build_sequence_head(config, int(record["num_features"]))
    load_weights(
        head,
        state["state_dict"],
        path,
        f"a {config.sequence.kind} sequence head over {record['num_features']} features",
    )
    return config, head, record


def check_backbone(head_record: dict[str, Any], backbone_path: Path, head_path: Path) -> str:
    """The backbone file's SHA-1, after checking it is the one the head was trained on."""
    from ichseg.preprocess.pipeline import file_digest

    digest = file_digest(backbone_path)
    if digest != head_record["backbone_sha1"]:
        raise InputError(
            backbone_path,
            f"is not the backbone the sequence head {head_path} was trained on "
            f"(SHA-1 {digest[:12]} vs {str(head_record['backbone_sha1'])[:12]})",
        )
    return digest


@dataclass
class SequenceScorer:
    """Probabilities of slice-cache rows from a sequence run: embed, then run the head per series.

    Attributes:
        config: the sequence run's config.
        backbone: the classifier whose features are the embeddings.
        head: the sequence head.
        backbone_sha1: SHA-1 of the backbone checkpoint (the embeddings' cache key).
    """

    config: RunConfig
    backbone: Any
    head: Any
    backbone_sha1: str

    def probabilities(
        self,
        slices: SliceSet,
        rows: np.ndarray,
        tta: TestTimeAugmentation | None = None,
        timer: ForwardTimer | None = None,
    ) -> np.ndarray:
        """``(len(rows), K)`` probabilities of ``rows`` (whole series), in ``rows`` order.

        Without TTA the embeddings of every usable row are read from (or added to) the cache
        training made; with TTA only ``rows`` are embedded (a separate cache entry).
        """
        device = default_device()
        table = embed_slices(
            self.backbone,
            slices,
            slices.usable() if tta is None else rows,
            backbone_sha1=self.backbone_sha1,
            amp=self.config.train.amp,
            tta=tta,
            timer=timer,
            device=device,
        )
        self.head.to(device)
        return table_probabilities(self.head, table, slices, rows, self.config.task.mode, device)


def table_probabilities(
    head: Any, table: EmbeddingTable, slices: SliceSet, rows: np.ndarray, mode: str, device: Any
) -> np.ndarray:
    """Head probabilities of ``rows`` (in ``rows`` order) from cached embeddings."""
    rows = np.asarray(rows, dtype=np.int64)
    sequences = series_sequences(slices, rows)
    out = np.full((len(rows), 0), np.nan, dtype=np.float32)
    if not sequences:
        return out
    probs = series_probabilities(head, [table.lookup(s) for s in sequences], mode, device)
    position = {int(r): i for i, r in enumerate(rows)}
    out = np.full((len(rows), probs[0].shape[1]), np.nan, dtype=np.float32)
    for sequence, p in zip(sequences, probs, strict=True):
        out[[position[int(r)] for r in sequence]] = p
    return out


def load_sequence_run(run_dir: str | Path) -> SequenceScorer:
    """The scorer of a sequence run folder (head ``best.pt``, ``backbone/best.pt``).

    Raises:
        InputError: a missing or mismatched backbone or head, naming the file.
    """
    run_dir = Path(run_dir)
    head_path, backbone_path = run_dir / BEST, run_dir / BACKBONE_DIR / BEST
    if not head_path.is_file():
        raise InputError(run_dir, f"the sequence head is not trained yet ({BEST} missing)")
    config, head, record = load_sequence_head(head_path)
    digest = check_backbone(record, backbone_path, head_path)
    _, backbone, _ = load_classifier(backbone_path)
    return SequenceScorer(config, backbone, head, digest)
