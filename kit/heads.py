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

Per-band pooling (inference only, no parameters): a backbone's frequency-preserving tokens
(``Backbone.grid_tokens``: ``[B, T, F, D]`` and a padding mask ``[B, T]`` over time) pooled over time
in each band, ``[B, F, D]``, for per-band scoring (BEAM):

- :func:`band_mean` (``"band_mean"``): the masked mean over time;
- :func:`rdp_pool` (``"band_rdp"``): relative-deviation pooling, a weighted mean over time whose
  weights ``(1 + r)^gamma`` grow with the frame's distance from the band's mean, relative to the
  farthest frame (the inference of kasahart/asd-experiments, gamma 4): a short event that a plain
  mean dilutes keeps its weight.

:class:`BandPool` wraps either as a module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("asp", "mean", "cls", "stats")
BAND_POOLINGS = ("band_mean", "band_rdp")
RDP_GAMMA = 4.0
RDP_EPS = 1e-8  # a largest deviation at or below this: the frames are one, the weights uniform


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


# ----------------------------------------------------------------------------------------------
# Per-band pooling over time: grid tokens [B, T, F, D] -> [B, F, D]


def _check_grid(tokens: torch.Tensor, padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``tokens [B, T, F, D]`` and the time mask ``[B, T]``; return the tokens with padding
    zeroed (computed in float32 at least: half-precision norms overflow) and the VALID mask
    ``[B, T, 1, 1]``."""
    if tokens.ndim != 4:
        raise ValueError(
            f"per-band pooling expects grid tokens of shape [batch, time, bands, dim], got {tuple(tokens.shape)}"
        )
    batch, frames = tokens.shape[:2]
    if padding_mask is None:
        valid = torch.ones(batch, frames, dtype=torch.bool, device=tokens.device)
    else:
        if padding_mask.shape != (batch, frames):
            raise ValueError(
                f"padding_mask must have shape {(batch, frames)} (batch, time) to match the grid tokens, "
                f"got {tuple(padding_mask.shape)}"
            )
        valid = ~padding_mask.bool()
    if not bool(valid.any(dim=1).all()):
        empty = (~valid.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(
            f"clips {empty} of the batch have no valid time step (padding_mask is True everywhere)"
        )
    valid = valid[:, :, None, None]
    x = tokens if tokens.dtype in (torch.float32, torch.float64) else tokens.float()
    # where, not a product: padding may hold NaN/inf, and NaN * 0 is NaN
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device)), valid


def band_mean(tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the valid time steps of every band: ``[B, T, F, D], [B, T] -> [B, F, D]``."""
    x, valid = _check_grid(tokens, padding_mask)
    return x.sum(dim=1) / valid.sum(dim=1)


def _checked_gamma(gamma) -> float:
    try:
        value = float(gamma)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(gamma, bool) or not 0 <= value < float("inf"):
        raise ValueError(f"RDP gamma must be a finite number >= 0, got {gamma!r}")
    return value


def _rdp_weights(x: torch.Tensor, valid: torch.Tensor, gamma: float) -> torch.Tensor:
    """RDP weights ``[B, T, F]`` of checked tokens (padding zeroed) and their valid mask."""
    mean = x.sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True)
    deviation = torch.linalg.vector_norm(x - mean, dim=-1) * valid[..., 0]  # [B, T, F]; padding 0
    largest = deviation.amax(dim=1, keepdim=True)  # deviations are >= 0: the padding's 0 never wins
    spread = largest > RDP_EPS
    relative = torch.where(spread, deviation / torch.where(spread, largest, 1.0), 0.0)
    # log/softmax rather than powers: the normalisation cannot overflow whatever gamma is
    logits = (gamma * torch.log1p(relative)).masked_fill(~valid[..., 0], float("-inf"))
    return torch.softmax(logits, dim=1)


def rdp_weights(
    tokens: torch.Tensor, padding_mask: torch.Tensor | None = None, gamma: float = RDP_GAMMA
) -> torch.Tensor:
    """The RDP weights ``[B, T, F]``: per band f, ``mu = mean_t x[t, f]`` (valid t),
    ``r[t, f] = ||x[t, f] - mu|| / max_t ||x[t, f] - mu||`` (L2 over D, max over the valid t), and
    ``w = (1 + r)^gamma`` normalised over the valid t. A band whose largest deviation is at most
    ``RDP_EPS`` gets uniform weights; padded steps get 0."""
    gamma = _checked_gamma(gamma)
    return _rdp_weights(*_check_grid(tokens, padding_mask), gamma)


def rdp_pool(
    tokens: torch.Tensor, padding_mask: torch.Tensor | None = None, gamma: float = RDP_GAMMA
) -> torch.Tensor:
    """Relative-deviation pooling over time in every band: ``[B, T, F, D], [B, T] -> [B, F, D]``, the
    weighted mean of the valid steps under :func:`rdp_weights`. ``gamma=0`` is :func:`band_mean`."""
    gamma = _checked_gamma(gamma)
    x, valid = _check_grid(tokens, padding_mask)
    return (_rdp_weights(x, valid, gamma)[..., None] * x).sum(dim=1)


def band_pool(
    kind: str, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None, gamma: float = RDP_GAMMA
) -> torch.Tensor:
    """``"band_mean"`` (:func:`band_mean`) or ``"band_rdp"`` (:func:`rdp_pool` with ``gamma``)."""
    if kind == "band_mean":
        return band_mean(tokens, padding_mask)
    if kind == "band_rdp":
        return rdp_pool(tokens, padding_mask, gamma)
    raise ValueError(f"unknown per-band pooling {kind!r}: expected one of {', '.join(BAND_POOLINGS)}")


class BandPool(nn.Module):
    """Parameter-free per-band pooling over time: ``(tokens [B, T, F, D], padding_mask [B, T]) ->
    [B, F, D]`` with ``kind`` ``"band_mean"`` or ``"band_rdp"`` (``gamma``, default 4)."""

    def __init__(self, kind: str = "band_rdp", gamma: float = RDP_GAMMA):
        super().__init__()
        if kind not in BAND_POOLINGS:
            raise ValueError(f"unknown per-band pooling {kind!r}: expected one of {', '.join(BAND_POOLINGS)}")
        self.kind, self.gamma = kind, _checked_gamma(gamma)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return band_pool(self.kind, tokens, padding_mask, self.gamma)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, gamma={self.gamma}"
