"""Series-level sequence heads: slice embeddings of a whole series in, one logit row per slice out.

The RSNA 2019 winning teams ran a bidirectional GRU/LSTM or a 1D convolution over the per-slice
embeddings of a series, so each slice's prediction sees its neighbours (a bleed spans several
slices; a single bright slice rarely is one). :class:`SequenceHead` is that model: the
embeddings are normalised (LayerNorm), projected to ``hidden`` features, passed through the
sequence layers, and the projection and the sequence output together give the logits. Padded
positions (series of different lengths in one batch) never influence real ones: the GRU runs on
packed sequences and the convolution sees zeros beyond each series' end, as at its ends.
"""

from __future__ import annotations

import torch
from torch import nn

from ichseg.errors import ConfigError

KINDS = ("gru", "conv")


class SequenceHead(nn.Module):
    """Bidirectional GRU or residual 1D-convolution head over a series of slice embeddings.

    Args:
        num_features: embedding width (the backbone's pooled features).
        num_classes: logits per slice.
        kind: ``"gru"`` or ``"conv"``.
        hidden: projection width (and GRU state width per direction).
        layers: GRU layers or convolution blocks.
        dropout: dropout on the normalised embeddings and before the output layer.
        kernel_size: odd convolution width in slices (``conv`` only).
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        *,
        kind: str = "gru",
        hidden: int = 128,
        layers: int = 1,
        dropout: float = 0.2,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ConfigError(f"unknown sequence kind {kind!r}; valid: {', '.join(KINDS)}")
        if kernel_size % 2 == 0:
            raise ConfigError(f"sequence kernel_size must be odd, got {kernel_size}")
        self.kind = kind
        self.num_features = num_features
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(num_features)
        self.drop_in = nn.Dropout(dropout)
        self.project = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(inplace=True))
        if kind == "gru":
            self.gru = nn.GRU(
                hidden,
                hidden,
                num_layers=layers,
                batch_first=True,
                bidirectional=True,
                dropout=dropout if layers > 1 else 0.0,
            )
            context_width = 2 * hidden
        else:
            self.convs = nn.ModuleList(
                nn.Conv1d(hidden, hidden, kernel_size, padding=kernel_size // 2)
                for _ in range(layers)
            )
            context_width = hidden
        self.drop_out = nn.Dropout(dropout)
        self.out = nn.Linear(hidden + context_width, num_classes)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, L, num_classes)`` float32 for padded embeddings.

        Runs in fp32 whatever autocast is active: the head is small, and bf16 would coarsen
        the logits the loss and the calibration read.

        Args:
            features: ``(B, L, num_features)``; rows beyond a series' length are ignored.
            lengths: ``(B,)`` number of slices of each series (at least 1).
        """
        if features.ndim != 3 or features.shape[-1] != self.num_features:
            raise ValueError(
                f"expected embeddings (B, L, {self.num_features}), got {tuple(features.shape)}"
            )
        with torch.autocast(device_type=features.device.type, enabled=False):
            positions = torch.arange(features.shape[1], device=features.device)
            valid = (positions[None, :] < lengths.to(features.device)[:, None]).unsqueeze(-1)
            x = self.project(self.drop_in(self.norm(features.float())))
            x = x * valid
            context = self._gru(x, lengths) if self.kind == "gru" else self._conv(x, valid)
            return self.out(self.drop_out(torch.cat([x, context], dim=-1)))

    def _gru(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        packed = pack_padded_sequence(
            x, lengths.detach().cpu().long(), batch_first=True, enforce_sorted=False
        )
        output, _ = self.gru(packed)
        padded, _ = pad_packed_sequence(output, batch_first=True, total_length=x.shape[1])
        return padded

    def _conv(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        mask = valid.transpose(1, 2).to(x.dtype)  # (B, 1, L)
        h = x.transpose(1, 2)
        for conv in self.convs:
            h = h + torch.relu(conv(h * mask))
        return (h * mask).transpose(1, 2)
