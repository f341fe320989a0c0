import pytest
import torch

from kit.heads import (
    BAND_POOLINGS,
    AttentiveStatsPool,
    BandPool,
    ClsPool,
    MeanPool,
    StatsPool,
    band_mean,
    band_pool,
    make_head,
    rdp_pool,
    rdp_weights,
)

KINDS = ["asp", "mean", "cls", "stats"]  # "stats" with embed_dim 6 != 2 * 12: the projected variant


def _padded_batch(lengths, dim=12, fill=0.0, seed=0):
    """Tokens [B, max(lengths), dim] with everything past each length set to ``fill``, and the mask."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(len(lengths), max(lengths), dim, generator=gen)
    padding = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    return tokens.masked_fill(padding[..., None], fill), padding


def _head(kind, dim=12, embed_dim=6):
    torch.manual_seed(0)
    return make_head(kind, dim, embed_dim).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_shapes(kind):
    tokens, padding = _padded_batch([7, 5, 3])
    head = _head(kind)
    assert head(tokens, padding).shape == (3, 6)
    assert head(tokens).shape == (3, 6)  # no mask: every token is valid


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("garbage", [1e4, float("nan"), float("inf")])
def test_padded_tokens_do_not_change_the_output(kind, garbage):
    head = _head(kind)
    clean, padding = _padded_batch([9, 4, 6], fill=0.0)
    dirty, _ = _padded_batch([9, 4, 6], fill=garbage)
    torch.testing.assert_close(head(dirty, padding), head(clean, padding))
    assert torch.isfinite(head(dirty, padding)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_batch_of_different_lengths_equals_single_runs(kind):
    head = _head(kind)
    lengths = [9, 4, 6, 1]
    tokens, padding = _padded_batch(lengths, fill=3.0)
    batched = head(tokens, padding)
    singles = torch.cat([head(tokens[i : i + 1, :n]) for i, n in enumerate(lengths)])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-5)


def test_mean_pool_pools_exactly_the_valid_tokens():
    head = MeanPool(12, 6).eval()
    tokens, padding = _padded_batch([5, 2], fill=7.0)
    expected = head.projection(torch.stack([tokens[0, :5].mean(0), tokens[1, :2].mean(0)]))
    torch.testing.assert_close(head(tokens, padding), expected)


def test_cls_pool_uses_token_zero_only():
    head = ClsPool(12, 6).eval()
    tokens, padding = _padded_batch([5, 3])
    changed = tokens.clone()
    changed[:, 1:] = torch.randn_like(changed[:, 1:])
    torch.testing.assert_close(head(changed, padding), head(tokens, padding))


def test_parameter_free_stats_pool_is_the_mean_and_population_std_of_the_valid_tokens():
    head = make_head("stats", 12, None)
    assert isinstance(head, StatsPool) and head.embed_dim == 24 and not list(head.parameters())
    tokens, padding = _padded_batch([5, 2, 7], fill=float("nan"))
    expected = torch.stack(
        [
            torch.cat([tokens[i, :n].mean(0), tokens[i, :n].std(0, unbiased=False)])
            for i, n in enumerate([5, 2, 7])
        ]
    )
    torch.testing.assert_close(head(tokens, padding), expected)
    assert StatsPool(12, 24).projection is None  # 2 * in_dim asked explicitly: still parameter-free
    # A constant channel has std sqrt(eps), not 0 (a finite gradient), as in ASP.
    constant = head(torch.ones(1, 4, 12))
    torch.testing.assert_close(constant[0, 12:], torch.full((12,), 1e-5**0.5))


def test_asp_weights_sum_to_one_over_valid_tokens():
    head = AttentiveStatsPool(12, 6, bottleneck=16)
    tokens, padding = _padded_batch([9, 4, 6], fill=float("nan"))
    weights = head.attention_weights(tokens, padding)
    assert weights.shape == tokens.shape
    assert torch.all(weights[padding] == 0)
    assert torch.all(weights >= 0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3, 12))
    assert weights[0, :9].std(dim=0).max() > 0  # attention is not uniform


def test_asp_is_a_weighted_mean_and_std_of_the_tokens():
    head = AttentiveStatsPool(12, 6, bottleneck=16).eval()
    tokens, padding = _padded_batch([9, 4])
    weights = head.attention_weights(tokens, padding).detach()
    clean = tokens.masked_fill(padding[..., None], 0.0)
    mean = (weights * clean).sum(1)
    std = (weights * (clean - mean[:, None]) ** 2).sum(1).sqrt()
    torch.testing.assert_close(head(tokens, padding), head.projection(torch.cat([mean, std], dim=-1)))


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_flow_to_tokens_and_parameters(kind):
    head = _head(kind).train()
    tokens, padding = _padded_batch([6, 3])
    tokens.requires_grad_(True)
    head(tokens, padding).square().sum().backward()
    assert tokens.grad[0, 0].abs().sum() > 0
    assert torch.all(tokens.grad[padding] == 0)
    for name, param in head.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_constant_tokens_give_finite_gradients():
    head = AttentiveStatsPool(12, 6, bottleneck=16)
    tokens = torch.ones(2, 5, 12, requires_grad=True)  # zero variance: sqrt(0) without the clamp
    head(tokens).sum().backward()
    assert torch.isfinite(tokens.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_bad_inputs_give_clear_errors():
    head = make_head("asp", 12, 6)
    tokens, padding = _padded_batch([4, 3])
    with pytest.raises(ValueError, match="unknown pooling head 'max'"):
        make_head("max", 12, 6)
    with pytest.raises(ValueError, match="'asp' needs an embed_dim"):
        make_head("asp", 12, None)
    with pytest.raises(ValueError, match=r"shape \[batch, tokens, 12\]"):
        head(tokens[..., :10], padding)
    with pytest.raises(ValueError, match="padding_mask must have shape"):
        head(tokens, padding[:, :3])
    with pytest.raises(ValueError, match=r"clips \[1\] .* no valid token"):
        head(tokens, torch.tensor([[False] * 4, [True] * 4]))
    with pytest.raises(ValueError, match="token 0 to be valid"):
        make_head("cls", 12, 6)(tokens, torch.tensor([[True, False, False, False]] * 2))


# ----------------------------------------------------------------------------------------------
# Per-band pooling over time: [B, T, F, D], [B, T] -> [B, F, D]


def _grid_batch(lengths, bands=3, dim=5, fill=0.0, seed=0):
    """Grid tokens [B, max(lengths), bands, dim], every step past a clip's length set to ``fill``."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(len(lengths), max(lengths), bands, dim, generator=gen)
    padding = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    return tokens.masked_fill(padding[..., None, None], fill), padding


@pytest.mark.parametrize("kind", BAND_POOLINGS)
@pytest.mark.parametrize("garbage", [1e4, float("nan"), float("inf")])
def test_band_pooling_ignores_masked_frames(kind, garbage):
    tokens, padding = _grid_batch([7, 4, 2])
    dirty, _ = _grid_batch([7, 4, 2], fill=garbage)
    pooled = band_pool(kind, tokens, padding)
    assert pooled.shape == (3, 3, 5)
    torch.testing.assert_close(band_pool(kind, dirty, padding), pooled)
    for row, n in enumerate([7, 4, 2]):  # each clip alone, without padding
        torch.testing.assert_close(band_pool(kind, tokens[row : row + 1, :n]), pooled[row : row + 1])


def test_band_mean_is_the_masked_mean_and_gamma_0_rdp_equals_it():
    tokens, padding = _grid_batch([6, 3])
    expected = torch.stack([tokens[0, :6].mean(0), tokens[1, :3].mean(0)])
    torch.testing.assert_close(band_mean(tokens, padding), expected)
    torch.testing.assert_close(rdp_pool(tokens, padding, gamma=0.0), expected)
    assert not torch.allclose(rdp_pool(tokens, padding), expected)  # gamma 4 does weigh the frames


def test_rdp_hand_computed_case():
    # one band, D = 1: frames 0, 0, 3. mean 1, deviations 1, 1, 2, r = .5, .5, 1,
    # weights 1.5^4, 1.5^4, 2^4 = 5.0625, 5.0625, 16 (sum 26.125): 3 * 16 / 26.125
    tokens = torch.tensor([0.0, 0.0, 3.0]).view(1, 3, 1, 1)
    weights = rdp_weights(tokens)
    torch.testing.assert_close(weights[0, :, 0], torch.tensor([5.0625, 5.0625, 16.0]) / 26.125)
    torch.testing.assert_close(rdp_pool(tokens), torch.tensor([[[48.0 / 26.125]]]))
    # the norm is over D (L2), the maximum over time, per band: band 1 is band 0 scaled, same weights
    two = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]]]).view(1, 3, 1, 2)
    torch.testing.assert_close(rdp_weights(two)[0, :, 0], torch.tensor([5.0625, 5.0625, 16.0]) / 26.125)
    scaled = torch.cat([tokens, 10 * tokens], dim=2)
    torch.testing.assert_close(rdp_weights(scaled)[0, :, 1], weights[0, :, 0])


def test_rdp_gives_a_frame_far_from_the_mean_more_weight():
    tokens = 0.01 * torch.randn(1, 20, 2, 4, generator=torch.Generator().manual_seed(1))
    tokens[0, 7, 1] += 5.0  # an event in band 1 only
    weights = rdp_weights(tokens)
    assert weights[0, :, 1].argmax() == 7 and weights[0, 7, 1] > 2 * weights[0, :, 1].median()
    torch.testing.assert_close(weights.sum(1), torch.ones(1, 2))
    # the event keeps more of itself than in the mean: 16 / (19 * ~1..16 + 16) vs 1 / 20
    assert rdp_pool(tokens)[0, 1].norm() > 1.5 * band_mean(tokens)[0, 1].norm()
    assert torch.all(rdp_pool(tokens, gamma=8.0)[0, 1] > rdp_pool(tokens)[0, 1] - 1e-6)  # gamma sharpens


def test_rdp_of_constant_frames_is_uniform_and_half_precision_is_pooled_in_float32():
    constant = torch.ones(2, 5, 3, 4)
    torch.testing.assert_close(rdp_weights(constant), torch.full((2, 5, 3), 0.2))
    tokens, padding = _grid_batch([6, 3])
    half = rdp_pool(tokens.bfloat16(), padding)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    big = torch.full((1, 4, 1, 8), 3e4, dtype=torch.float16)
    big[0, 2] = -3e4  # deviations whose squares overflow fp16
    assert torch.isfinite(rdp_pool(big)).all()


def test_band_pool_module_and_bad_inputs():
    tokens, padding = _grid_batch([4, 3])
    pool = BandPool("band_rdp", gamma=2)
    assert list(pool.parameters()) == [] and "gamma=2.0" in repr(pool)
    torch.testing.assert_close(pool(tokens, padding), rdp_pool(tokens, padding, 2.0))
    torch.testing.assert_close(BandPool("band_mean")(tokens, padding), band_mean(tokens, padding))
    with pytest.raises(ValueError, match="unknown per-band pooling 'max'"):
        BandPool("max")
    with pytest.raises(ValueError, match="unknown per-band pooling 'max'"):
        band_pool("max", tokens, padding)
    for gamma in (-1.0, float("inf"), float("nan"), "four", True):
        with pytest.raises(ValueError, match="RDP gamma must be a finite number >= 0"):
            rdp_pool(tokens, padding, gamma=gamma)
    with pytest.raises(ValueError, match=r"shape \[batch, time, bands, dim\]"):
        band_mean(tokens[..., 0], padding)
    with pytest.raises(ValueError, match=r"padding_mask must have shape \(2, 4\)"):
        rdp_pool(tokens, padding[:, :3])
    with pytest.raises(ValueError, match=r"clips \[0\] .* no valid time step"):
        band_mean(tokens, torch.tensor([[True] * 4, [False] * 4]))
