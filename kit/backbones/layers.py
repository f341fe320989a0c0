"""Layers shared by the data2vec-2.0 style encoders (EAT and FISHER): fused-qkv attention, the MLP,
the ``AltBlock`` transformer block and the fixed 2-D sin-cos position table.

Parameter names follow the releases (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``norm1``,
``norm2``), so checkpoints load under their own block keys. BEATs keeps its own layers (separate q/k/v
projections, gated relative position bias, deep-norm residual scale).

Attention goes through ``F.scaled_dot_product_attention`` looked up at call time, so
``kit.tools.bench``'s eager reference can swap it for explicit softmax attention.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_positions(embed_dim: int, rows: int, cols: int, dtype=np.float64) -> torch.Tensor:
    """Fixed 2-D sin-cos table ``[1, rows * cols, embed_dim]`` (float32) in row-major token order
    (MAE convention: the first half of the channels encodes the column index, the second half the
    row index; each half is ``[sin, cos]`` of ``index * 10000 ** (-k / (embed_dim / 4))``).

    ``dtype`` is the precision the table is computed in before the cast: EAT's official code uses
    float64, FISHER's float32; the two tables differ by up to about 1e-5, so each backbone passes
    its own to match its release bit for bit. Computed with numpy, as both sources do."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim {embed_dim} must be a multiple of 4 for 2-D sin-cos positions")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=dtype) / (embed_dim / 4.0))

    def encode(index: np.ndarray) -> np.ndarray:
        angles = np.einsum("m,d->md", index.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    row_index, col_index = np.meshgrid(
        np.arange(rows, dtype=dtype), np.arange(cols, dtype=dtype), indexing="ij"
    )
    table = np.concatenate([encode(col_index), encode(row_index)], axis=1)
    return torch.from_numpy(table).float()[None]


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection.

    ``forward(x [B, N, D], attend=None)``: ``attend`` is an optional attention mask broadcastable to
    ``[B, H, N, N]`` (boolean: True = attend; FISHER masks padded keys with ``[B, 1, 1, N]``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attend)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """data2vec 2.0 ``AltBlock``, inference path (no dropout, no drop-path).

    Post-LN (``layer_norm_first=False``, every EAT and FISHER release):
    ``r = norm1(x + attn(x)); out = norm2(r + mlp(r))``. Pre-LN: ``x = x + attn(norm1(x))``, then the
    reference adds the MLP output to itself and drops the residual (``r = x = mlp(norm2(x));
    x = r + x``), so ``out = 2 * mlp(norm2(x))``; a checkpoint trained that way needs the same."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        norm_affine: bool = True,
        layer_norm_first: bool = False,
    ) -> None:
        super().__init__()
        self.layer_norm_first = layer_norm_first
        # Registration order (norm1, attn, norm2, mlp) as the reference: it fixes the parameter order.
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_affine)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_affine)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None = None) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.attn(self.norm1(x), attend)
            return 2 * self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, attend))
        return self.norm2(x + self.mlp(x))
