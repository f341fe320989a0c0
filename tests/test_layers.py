"""The layers EAT and FISHER share: sin-cos positions against their closed form, attention against
explicit softmax attention (with a key mask), the post-LN block formula and the release names."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kit.backbones import eat, fisher, layers


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sincos_positions_follow_the_closed_form(dtype):
    dim, rows, cols = 16, 5, 3
    table = layers.sincos_positions(dim, rows, cols, dtype=dtype)
    assert table.shape == (1, rows * cols, dim) and table.dtype == torch.float32
    quarter = dim // 4
    for row in range(rows):
        for col in range(cols):
            token = table[0, row * cols + col]  # row-major: the column varies fastest
            for k in range(quarter):
                omega = 10000 ** (-k / quarter)
                expected = [
                    math.sin(col * omega),
                    math.cos(col * omega),
                    math.sin(row * omega),
                    math.cos(row * omega),
                ]
                actual = [token[k], token[quarter + k], token[2 * quarter + k], token[3 * quarter + k]]
                assert [float(a) for a in actual] == pytest.approx(expected, abs=1e-6)


def test_the_two_precisions_differ_only_in_rounding():
    wide = layers.sincos_positions(384, 128, 50, dtype=np.float64)
    narrow = layers.sincos_positions(384, 128, 50, dtype=np.float32)
    assert not torch.equal(wide, narrow)  # why EAT and FISHER each pass their own
    assert (wide - narrow).abs().max() < 1e-4
    with pytest.raises(ValueError, match="multiple of 4"):
        layers.sincos_positions(30, 2, 2)


def _explicit_attention(attn: layers.Attention, x: torch.Tensor, attend=None) -> torch.Tensor:
    batch, tokens, dim = x.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(x).split(dim, dim=-1)
    q, k, v = (t.view(batch, tokens, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(dim // heads)
    if attend is not None:
        scores = scores.masked_fill(~attend, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


def test_attention_is_softmax_attention_and_masked_keys_do_not_matter():
    torch.manual_seed(0)
    attn = layers.Attention(12, 3)
    x = torch.randn(2, 7, 12)
    torch.testing.assert_close(attn(x), _explicit_attention(attn, x))
    attend = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    attend[1, ..., 4:] = False  # clip 1: the last three tokens are padding
    masked = attn(x, attend)
    torch.testing.assert_close(masked, _explicit_attention(attn, x, attend))
    changed = x.clone()
    changed[1, 4:] = torch.randn(3, 12)
    torch.testing.assert_close(attn(changed, attend)[1, :4], masked[1, :4])
    with pytest.raises(ValueError, match="not divisible"):
        layers.Attention(10, 3)


def test_post_ln_block_formula_and_release_names():
    torch.manual_seed(0)
    block = layers.Block(8, 2, mlp_ratio=2.0, qkv_bias=False)
    x = torch.randn(3, 4, 8)
    residual = block.norm1(x + block.attn(x))
    torch.testing.assert_close(block(x), block.norm2(residual + block.mlp(residual)))
    assert [n for n, _ in block.named_parameters()] == [
        "norm1.weight",
        "norm1.bias",
        "attn.qkv.weight",
        "attn.proj.weight",
        "attn.proj.bias",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    ]
    assert block.mlp.fc1.out_features == 16
    plain = layers.Block(8, 2, norm_affine=False)
    assert plain.norm1.weight is None and plain.norm2.weight is None


def test_eat_and_fisher_run_the_shared_layers():
    eat_model = eat.build("unit", target_length=64)
    fisher_model = fisher.build("unit")
    assert all(isinstance(b, layers.Block) for b in [*eat_model.blocks, *fisher_model.blocks])
    # EAT keeps its historical parameter order (optimiser states of saved runs are indexed by it)
    assert [n for n, _ in eat_model.blocks[0].named_children()] == ["attn", "norm1", "mlp", "norm2"]
    assert [n for n, _ in fisher_model.blocks[0].named_children()] == ["norm1", "attn", "norm2", "mlp"]
