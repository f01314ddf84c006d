"""Training losses shared by the model families trained on slice labels."""

from __future__ import annotations

from ichseg.config import RunConfig


class TaskLoss:
    """Weighted BCE (multilabel; unknown labels left out) or cross-entropy (multiclass)."""

    def __init__(self, config: RunConfig) -> None:
        import torch

        self.mode = config.task.mode
        self.smoothing = config.task.label_smoothing
        weights = config.task.class_weights if self.mode == "multilabel" else None
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float32)

    def __call__(self, logits, targets):
        import torch
        import torch.nn.functional as F

        logits = logits.float()
        if self.mode == "multiclass":
            if targets.dtype.is_floating_point:  # mixup gives soft targets
                return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
            return F.cross_entropy(logits, targets, label_smoothing=self.smoothing)
        targets = targets.float()
        known = ~torch.isnan(targets)
        targets = torch.where(known, targets, torch.zeros_like(targets))
        if self.smoothing:
            targets = targets * (1 - self.smoothing) + 0.5 * self.smoothing
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        weights = (
            torch.ones(logits.shape[1], device=loss.device)
            if self.weights is None
            else self.weights.to(loss.device)
        )
        weighted = known * weights
        # Per sample: weighted mean over its known labels, as the RSNA metric does.
        per_sample = (loss * weighted).sum(dim=1) / weighted.sum(dim=1).clamp_min(1e-12)
        return per_sample[weighted.sum(dim=1) > 0].mean()
