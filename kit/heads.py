"""Pooling heads: backbone tokens -> one low-dimensional clip embedding.

Every head takes the backbone's output ``(tokens [B, N, D], padding_mask [B, N])`` where
``padding_mask`` is True on tokens that come only from padding (``None`` = every token is valid) and
returns ``[B, embed_dim]``. Padded tokens never influence the result, whatever they hold (even NaN),
so a clip gives the same embedding alone or inside a padded batch.

- :class:`AttentiveStatsPool` (``"asp"``): attentive statistics pooling as in ECAPA-TDNN, the head of
  the EAT-ASP report;
- :class:`MeanPool` (``"mean"``): masked mean over the tokens;
- :class:`ClsPool` (``"cls"``): the first token (the backbone's CLS token where it has one);
- :class:`StatsPool` (``"stats"``): mean and standard deviation of every channel over the valid
  tokens, ``[mean; std]``; parameter-free unless a projection to another size is asked for (the
  log-mel statistics detector, and a plain statistics-pooling head for trained backbones).

Each head ends with the same projection, ``Linear -> LayerNorm`` (the parameter-free ``"stats"`` head
has none). LayerNorm rather than BatchNorm1d:
its output does not depend on the other clips of the batch, so training with small batches (16 in
the EAT-ASP report), gradient accumulation or a single clip at inference all behave the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("asp", "mean", "cls", "stats")


def _check_inputs(tokens: torch.Tensor, padding_mask: torch.Tensor | None, in_dim: int) -> torch.Tensor:
    """Validate the shapes and return the mask of VALID tokens ``[B, N, 1]`` (bool)."""
    if tokens.ndim != 3 or tokens.shape[-1] != in_dim:
        raise ValueError(f"expected tokens of shape [batch, tokens, {in_dim}], got {tuple(tokens.shape)}")
    batch, n_tokens, _ = tokens.shape
    if padding_mask is None:
        return torch.ones(batch, n_tokens, 1, dtype=torch.bool, device=tokens.device)
    if padding_mask.shape != (batch, n_tokens):
        raise ValueError(
            f"padding_mask must have shape {(batch, n_tokens)} to match the tokens, "
            f"got {tuple(padding_mask.shape)}"
        )
    valid = ~padding_mask.bool()
    if not bool(valid.any(dim=1).all()):
        empty = (~valid.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"clips {empty} of the batch have no valid token (padding_mask is True everywhere)")
    return valid.unsqueeze(-1)


def _masked_mean_std(x: torch.Tensor, weights: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and standard deviation over dim 1; ``weights`` sum to 1 over that dim.

    The variance is clamped at ``eps`` before the square root: a constant feature would otherwise
    give sqrt(0), whose gradient is infinite.
    """
    mean = (weights * x).sum(dim=1)
    var = (weights * (x - mean.unsqueeze(1)).square()).sum(dim=1)
    return mean, var.clamp(min=eps).sqrt()


class _Projection(nn.Sequential):
    """``Linear -> LayerNorm`` from the pooled features to the embedding."""

    def __init__(self, in_features: int, embed_dim: int):
        super().__init__(nn.Linear(in_features, embed_dim), nn.LayerNorm(embed_dim))


class AttentiveStatsPool(nn.Module):
    """ECAPA-style attentive statistics pooling.

    For each token, ``[x_t; mean; std]`` (the token beside the masked statistics of the whole clip,
    the "global context" of ECAPA-TDNN) goes through ``Linear(3D, bottleneck) -> tanh ->
    Linear(bottleneck, D)``: one attention logit per token and per channel. A softmax over the valid
    tokens turns them into weights, which give a weighted mean and a weighted standard deviation per
    channel; ``[mean; std]`` (2D) is projected to ``embed_dim``.
    """

    def __init__(self, in_dim: int, embed_dim: int, bottleneck: int = 128, eps: float = 1e-5):
        super().__init__()
        if min(in_dim, embed_dim, bottleneck) < 1:
            raise ValueError(
                f"in_dim, embed_dim and bottleneck must be >= 1, got {in_dim}, {embed_dim}, {bottleneck}"
            )
        self.in_dim, self.embed_dim, self.eps = in_dim, embed_dim, eps
        self.attention = nn.Sequential(
            nn.Linear(3 * in_dim, bottleneck), nn.Tanh(), nn.Linear(bottleneck, in_dim)
        )
        self.projection = _Projection(2 * in_dim, embed_dim)

    def attention_weights(
        self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention weights ``[B, N, D]``: >= 0, zero on padded tokens, summing to 1 over the tokens."""
        return self._weights(*self._prepare(tokens, padding_mask))

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x, valid = self._prepare(tokens, padding_mask)
        mean, std = _masked_mean_std(x, self._weights(x, valid), self.eps)
        return self.projection(torch.cat([mean, std], dim=-1))

    def _prepare(
        self, tokens: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        valid = _check_inputs(tokens, padding_mask, self.in_dim)
        # Zero the padding (not multiply: padding may hold NaN/inf, and NaN * 0 is NaN).
        return torch.where(valid, tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device)), valid

    def _weights(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        counts = valid.sum(dim=1, keepdim=True)
        uniform = valid / counts
        mean, std = _masked_mean_std(x, uniform, self.eps)
        context = torch.cat([x, mean.unsqueeze(1).expand_as(x), std.unsqueeze(1).expand_as(x)], dim=-1)
        logits = self.attention(context).masked_fill(~valid, float("-inf"))
        return F.softmax(logits, dim=1)


class MeanPool(nn.Module):
    """Mean of the valid tokens, projected to ``embed_dim``."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.in_dim, self.embed_dim = in_dim, embed_dim
        self.projection = _Projection(in_dim, embed_dim)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        valid = _check_inputs(tokens, padding_mask, self.in_dim)
        zero = torch.zeros((), dtype=tokens.dtype, device=tokens.device)
        pooled = torch.where(valid, tokens, zero).sum(dim=1) / valid.sum(dim=1)
        return self.projection(pooled)


class ClsPool(nn.Module):
    """The first token (the CLS token of backbones that prepend one), projected to ``embed_dim``."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.in_dim, self.embed_dim = in_dim, embed_dim
        self.projection = _Projection(in_dim, embed_dim)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        valid = _check_inputs(tokens, padding_mask, self.in_dim)
        if not bool(valid[:, 0].all()):
            raise ValueError(
                "ClsPool needs token 0 to be valid in every clip, but padding_mask marks it as padding"
            )
        return self.projection(tokens[:, 0])


class StatsPool(nn.Module):
    """``[mean; std]`` of each of the ``in_dim`` channels over the valid tokens (population standard
    deviation, the variance clamped at ``eps`` before the square root as in ASP).

    ``embed_dim`` None or ``2 * in_dim``: no weights at all, the statistics are the embedding (the
    per-clip log-mel statistics of ``kit.backbones.logmel``). Any other ``embed_dim``: the statistics
    go through the ``Linear -> LayerNorm`` projection of the other heads (statistics pooling without
    attention, a head for trained backbones)."""

    def __init__(self, in_dim: int, embed_dim: int | None = None, eps: float = 1e-5):
        super().__init__()
        if in_dim < 1 or (embed_dim is not None and embed_dim < 1):
            raise ValueError(f"in_dim and embed_dim must be >= 1, got {in_dim}, {embed_dim}")
        self.in_dim, self.eps = in_dim, eps
        self.embed_dim = 2 * in_dim if embed_dim is None else embed_dim
        self.projection = None if self.embed_dim == 2 * in_dim else _Projection(2 * in_dim, self.embed_dim)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        valid = _check_inputs(tokens, padding_mask, self.in_dim)
        # Zero the padding first (it may hold NaN/inf, and NaN * 0 is NaN).
        x = torch.where(valid, tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
        mean, std = _masked_mean_std(x, valid / valid.sum(dim=1, keepdim=True), self.eps)
        pooled = torch.cat([mean, std], dim=-1)
        return pooled if self.projection is None else self.projection(pooled)


def make_head(kind: str, in_dim: int, embed_dim: int | None, **options) -> nn.Module:
    """Build pooling head ``kind`` (``"asp"``, ``"mean"``, ``"cls"`` or ``"stats"``); ``options`` go to its
    constructor (``bottleneck`` for ``"asp"``). ``embed_dim`` None is allowed for ``"stats"`` only
    (the parameter-free ``[mean; std]`` of size ``2 * in_dim``)."""
    classes = {"asp": AttentiveStatsPool, "mean": MeanPool, "cls": ClsPool, "stats": StatsPool}
    if kind not in classes:
        raise ValueError(f"unknown pooling head {kind!r}: expected one of {', '.join(HEADS)}")
    if embed_dim is None and kind != "stats":
        raise ValueError(f"pooling head {kind!r} needs an embed_dim (only 'stats' works without one)")
    return classes[kind](in_dim, embed_dim, **options)
